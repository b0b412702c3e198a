//! The host side of the vsock device: Unix sockets.
//!
//! * Guest → host: a REQUEST to host port N connects to the Unix socket
//!   `<socket>_N`; if nothing listens there the guest gets RST.
//! * Host → guest: a program connects to `<socket>`, writes `CONNECT N\n`;
//!   we send a REQUEST to guest port N from a local port L, and on the
//!   guest's RESPONSE write `OK L\n` back. From then on the stream is
//!   transparent both ways. A bad line or an RST closes the host socket.
//!
//! The [`Muxer`] owns every host fd; the device thread calls it with the
//! guest's packets, with host fd readiness, and to fill rx buffers.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, ConnState, Connection};
use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use crate::virtio::worker::EpollCtl;
use vireo_api::devices::vsock::{port_path, SUN_PATH_MAX};

/// Most connections (host programs still writing their CONNECT line
/// included) the device keeps at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest `CONNECT <port>` line, newline included.
const MAX_CONNECT_LINE: usize = 32;
/// Tokens the muxer hands out for host fds start here; the device keeps
/// the ones below for its queues and the listener.
pub const FIRST_CONN_TOKEN: u64 = 16;
/// Local ports for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// The listening socket for host-initiated connections, bound at `path`.
/// A file already there is replaced only if it is a socket nobody listens
/// on (left behind by a VM that died).
pub fn bind_listener(path: &Path) -> Result<UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; remove it or choose another socket= path",
                path.display()
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{} is in use: a program listens on it (another VM?); stop it or choose \
                     another socket= path",
                    path.display()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| {
                    format!("cannot remove the stale socket {}: {e}", path.display())
                })?;
            }
            Err(e) => {
                return Err(format!(
                    "{} exists and cannot be checked ({e}); remove it or choose another \
                     socket= path",
                    path.display()
                ))
            }
        }
    }
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// The identity of a socket file we created, to remove only our own.
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Connect to a Unix socket without ever blocking: a listener whose
/// backlog is full counts as refusing.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > SUN_PATH_MAX || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call and
    // `len` does not exceed its size; the result is checked.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Parse `CONNECT <port>` (the newline already removed; a trailing CR is
/// tolerated).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// A host program that connected to the listener and has not finished its
/// `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a host fd token stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    Pending,
    Conn(ConnKey),
}

/// A control packet waiting for an rx buffer.
#[derive(Debug, Clone, Copy)]
struct Ctl {
    key: ConnKey,
    op: u16,
    flags: u32,
}

pub struct Muxer {
    name: String,
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    pending: HashMap<u64, PendingHost>,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Ctl>,
    /// Connections whose host socket was readable when we last looked.
    readable: VecDeque<ConnKey>,
}

impl Muxer {
    pub fn new(name: String, guest_cid: u64, socket: PathBuf, listener: UnixListener) -> Muxer {
        Muxer {
            name,
            guest_cid,
            socket,
            listener,
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            readable: VecDeque::new(),
        }
    }

    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }

    /// Control packets waiting for rx buffers.
    pub fn control_backlog(&self) -> usize {
        self.control.len()
    }

    /// Whether there is anything to put in the rx queue.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.readable.is_empty()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn queue(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(Ctl { key, op, flags });
    }

    /// Bring `key`'s epoll registration in line with what it wants.
    fn sync(&mut self, key: ConnKey, ctl: &EpollCtl) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.interest();
        if want == c.registered {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let r = if want.is_empty() {
            ctl.remove(fd)
        } else if c.registered.is_empty() {
            ctl.add(fd, want, c.token)
        } else {
            ctl.modify(fd, want, c.token)
        };
        match r {
            Ok(()) => c.registered = want,
            Err(e) => {
                tracing::warn!(
                    "{}: cannot watch the host socket of port {}: {e}; connection reset",
                    self.name,
                    key.host_port
                );
                self.reset(key, ctl);
            }
        }
    }

    /// Drop a connection and its host socket, without telling the guest.
    fn remove(&mut self, key: ConnKey, ctl: &EpollCtl) {
        if let Some(c) = self.conns.remove(&key) {
            if !c.registered.is_empty() {
                let _ = ctl.remove(c.stream.as_raw_fd());
            }
            self.tokens.remove(&c.token);
        }
    }

    /// Drop a connection and send the guest an RST for it.
    fn reset(&mut self, key: ConnKey, ctl: &EpollCtl) {
        self.remove(key, ctl);
        self.queue(key, op::RST, 0);
    }

    /// Answer a packet that failed validation with an RST (ending the
    /// connection it names, if any).
    pub fn reject(&mut self, h: &Header, ctl: &EpollCtl) {
        if h.op == op::RST {
            // Never answer an RST with one.
            self.remove(ConnKey::of_guest_packet(h), ctl);
        } else {
            self.reset(ConnKey::of_guest_packet(h), ctl);
        }
    }

    /// Act on a validated packet from the guest.
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8], ctl: &EpollCtl) {
        let key = ConnKey::of_guest_packet(h);
        if h.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                tracing::warn!(
                    "{}: REQUEST for the open connection {}:{}; reset",
                    self.name,
                    key.guest_port,
                    key.host_port
                );
                self.reset(key, ctl);
            } else {
                self.guest_connect(h, ctl);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.queue(key, op::RST, 0);
            }
            return;
        };
        c.update_peer_credit(h);
        match (h.op, c.state) {
            (op::RST, _) => {
                self.remove(key, ctl);
                return;
            }
            (op::RESPONSE, ConnState::Connecting) => {
                c.state = ConnState::Established;
                c.push_local(format!("OK {}\n", key.host_port).as_bytes());
            }
            (op::RESPONSE, _) | (_, ConnState::Connecting) => {
                self.reset(key, ctl);
                return;
            }
            (op::RW, ConnState::Established) if !c.guest_shut_send => {
                if let Err(e) = c.push_from_guest(payload) {
                    tracing::warn!(
                        "{}: connection {}:{}: {e}; reset",
                        self.name,
                        key.guest_port,
                        key.host_port
                    );
                    self.reset(key, ctl);
                    return;
                }
            }
            (op::RW, _) => {
                // Data after the guest said it would send no more.
                self.reset(key, ctl);
                return;
            }
            (op::SHUTDOWN, _) => {
                if h.flags & shutdown::SEND != 0 {
                    c.guest_shut_send = true;
                }
                if h.flags & shutdown::RCV != 0 {
                    c.guest_shut_rcv = true;
                }
                if c.guest_shut_send && c.guest_shut_rcv {
                    c.state = ConnState::Closing;
                }
            }
            (op::CREDIT_REQUEST, _) if !c.credit_update_queued => {
                c.credit_update_queued = true;
                self.queue(key, op::CREDIT_UPDATE, 0);
            }
            // CREDIT_UPDATE: the credit was taken above; a CREDIT_REQUEST
            // with an update already queued needs nothing more.
            _ => {}
        }
        self.after_host_io(key, ctl);
    }

    /// Flush pending host writes, close a finished connection, ask for a
    /// credit update and fix the epoll registration.
    fn after_host_io(&mut self, key: ConnKey, ctl: &EpollCtl) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = c.flush_to_host() {
            tracing::debug!("{}: port {}: {e}; reset", self.name, key.host_port);
            self.reset(key, ctl);
            return;
        }
        if c.state == ConnState::Closing && c.pending_to_host() == 0 {
            // Both sides are done: the RST completes the clean shutdown.
            self.reset(key, ctl);
            return;
        }
        if c.needs_credit_update() && !c.credit_update_queued {
            c.credit_update_queued = true;
            self.queue(key, op::CREDIT_UPDATE, 0);
        }
        self.sync(key, ctl);
    }

    fn guest_connect(&mut self, h: &Header, ctl: &EpollCtl) {
        let key = ConnKey::of_guest_packet(h);
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "{}: {MAX_CONNECTIONS} connections open; the guest's connection to port {} \
                 is refused",
                self.name,
                key.host_port
            );
            self.queue(key, op::RST, 0);
            return;
        }
        let path = port_path(&self.socket, key.host_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "{}: guest port {} → {}: {e}; RST",
                    self.name,
                    key.guest_port,
                    path.display()
                );
                self.queue(key, op::RST, 0);
                return;
            }
        };
        let token = self.token();
        let mut c = Connection::new(key, stream, token, ConnState::Established);
        c.update_peer_credit(h);
        self.conns.insert(key, c);
        self.tokens.insert(token, Target::Conn(key));
        self.queue(key, op::RESPONSE, 0);
        self.sync(key, ctl);
    }

    /// A host fd of ours is ready.
    pub fn host_event(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) {
        match self.tokens.get(&token).copied() {
            Some(Target::Pending) => self.pending_readable(token, ctl),
            Some(Target::Conn(key)) => self.conn_event(key, events, ctl),
            None => {}
        }
    }

    /// The listener is readable: take every waiting host program.
    pub fn accept(&mut self, ctl: &EpollCtl) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("{}: accept on {}: {e}", self.name, self.socket.display());
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                tracing::warn!(
                    "{}: {MAX_CONNECTIONS} connections open; a host connection is refused",
                    self.name
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.token();
            if let Err(e) = ctl.add(stream.as_raw_fd(), EventSet::IN, token) {
                tracing::warn!("{}: cannot watch a host connection: {e}", self.name);
                continue;
            }
            self.tokens.insert(token, Target::Pending);
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Read a host program's `CONNECT` line, a byte at a time so nothing
    /// after the newline is taken before the guest accepted.
    fn pending_readable(&mut self, token: u64, ctl: &EpollCtl) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let line = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break Some(std::mem::take(&mut p.line)),
                Ok(_) if p.line.len() + 1 >= MAX_CONNECT_LINE => break None,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        self.tokens.remove(&token);
        let _ = ctl.remove(p.stream.as_raw_fd());
        let Some(guest_port) = line.as_deref().and_then(parse_connect_line) else {
            tracing::debug!(
                "{}: a host connection sent no valid CONNECT line; closed",
                self.name
            );
            return;
        };
        let Some(host_port) = self.local_port() else {
            return;
        };
        let key = ConnKey {
            host_port,
            guest_port,
        };
        let c = Connection::new(key, p.stream, token, ConnState::Connecting);
        self.conns.insert(key, c);
        self.tokens.insert(token, Target::Conn(key));
        self.queue(key, op::REQUEST, 0);
    }

    fn local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.host_port == p) {
                return Some(p);
            }
        }
        None
    }

    fn conn_event(&mut self, key: ConnKey, events: EventSet, ctl: &EpollCtl) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if (events.contains(EventSet::IN) || hup) && !c.readable && c.wants_host_read() {
            c.readable = true;
            self.readable.push_back(key);
        }
        // OUT (or a hang-up, which the write then reports).
        self.after_host_io(key, ctl);
    }

    /// The next packet for the guest, its payload (if any) in
    /// `buf[..len]`, where `buf.len()` is the room in the rx buffer.
    pub fn next_rx(&mut self, buf: &mut [u8], ctl: &EpollCtl) -> Option<(Header, usize)> {
        if let Some(ctl_pkt) = self.control.pop_front() {
            let mut h = self.header(ctl_pkt.key, ctl_pkt.op, ctl_pkt.flags, 0);
            if let Some(c) = self.conns.get_mut(&ctl_pkt.key) {
                if ctl_pkt.op == op::CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                c.stamp(&mut h);
            }
            return Some((h, 0));
        }
        while let Some(key) = self.readable.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if !c.readable {
                continue;
            }
            c.readable = false;
            if !c.wants_host_read() {
                // Credit ran out or the guest stopped receiving.
                self.sync(key, ctl);
                continue;
            }
            match c.read_from_host(buf) {
                Ok(0) => {
                    c.host_eof = true;
                    let mut h = self.header(key, op::SHUTDOWN, shutdown::SEND, 0);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.stamp(&mut h);
                    }
                    self.sync(key, ctl);
                    return Some((h, 0));
                }
                Ok(n) => {
                    c.sent_to_guest(n);
                    let mut h = self.header(key, op::RW, 0, n as u32);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.stamp(&mut h);
                        if c.wants_host_read() {
                            // Maybe more: come back to it after the others.
                            c.readable = true;
                            self.readable.push_back(key);
                        } else if c.peer_credit() == 0 && !c.credit_requested {
                            c.credit_requested = true;
                            self.queue(key, op::CREDIT_REQUEST, 0);
                        }
                    }
                    self.sync(key, ctl);
                    return Some((h, n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sync(key, ctl),
                Err(e) => {
                    tracing::debug!("{}: port {}: {e}; reset", self.name, key.host_port);
                    self.reset(key, ctl);
                    // The RST is now first in the control queue.
                    return self.next_rx(buf, ctl);
                }
            }
        }
        None
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Close everything (device reset): host programs see their sockets
    /// close.
    pub fn close_all(&mut self, ctl: &EpollCtl) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k, ctl);
        }
        for (_, p) in self.pending.drain() {
            let _ = ctl.remove(p.stream.as_raw_fd());
        }
        self.tokens.clear();
        self.control.clear();
        self.readable.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Flush what the host can take right away; the rest is lost with
        // the device.
        for c in self.conns.values_mut() {
            let _ = c.flush_to_host();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 4294967296",
            b"connect 5",
            b"CONNECT 5 6",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
