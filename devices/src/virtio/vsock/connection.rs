//! One vsock stream between a guest port and a host Unix socket: its state,
//! the bytes waiting for the host, and credit-based flow control both ways
//! (virtio 1.2 §5.10.6.3).
//!
//! Guest → host: we advertise [`BUF_ALLOC`] bytes of buffer and count in
//! `fwd_cnt` what we have written to the host socket; a guest that sends
//! beyond its credit is reset. When the host is slow, our buffer fills,
//! `fwd_cnt` stops moving and the guest runs out of credit: we never buffer
//! more than [`BUF_ALLOC`] bytes per connection.
//!
//! Host → guest: we read from the host socket only while the guest has
//! credit (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`), and never more than
//! that in one packet.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, MAX_PKT_PAYLOAD};

/// The receive buffer we advertise for each connection (bytes the guest
/// may have in flight to the host).
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Send the guest a CREDIT_UPDATE once the free space it believes we have
/// falls below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = MAX_PKT_PAYLOAD as u32;

/// A connection's address: our port on the host (CID 2) and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub host_port: u32,
    pub guest_port: u32,
}

impl ConnKey {
    /// The key of a packet the guest sent.
    pub fn of_guest_packet(h: &Header) -> ConnKey {
        ConnKey {
            host_port: h.dst_port,
            guest_port: h.src_port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    Established,
    /// The guest shut down both directions: flush what the host has not
    /// taken yet, then RST.
    Closing,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes with {free} bytes of credit left")]
    CreditExceeded { len: usize, free: u32 },
    #[error("host socket: {0}")]
    Host(io::Error),
}

pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    /// The epoll token of `stream`.
    pub token: u64,
    pub state: ConnState,
    /// What `stream` is registered for in epoll (empty: not registered).
    pub registered: EventSet,
    /// Queued in the muxer's list of connections with host data to read.
    pub readable: bool,
    /// A CREDIT_UPDATE for this connection waits in the control queue.
    pub credit_update_queued: bool,
    /// A CREDIT_REQUEST went out and no credit has come back yet.
    pub credit_requested: bool,

    // guest → host
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that did not come from the guest
    /// (the `OK <port>` line) and so do not count against its credit.
    local_prefix: usize,
    /// Bytes received from the guest.
    rx_cnt: u32,
    /// Guest bytes written to the host socket.
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_sent: u32,

    // host → guest
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,

    /// The host socket gave EOF; SHUTDOWN(SEND) went to the guest.
    pub host_eof: bool,
    /// The guest will send no more; the host socket's write side is shut
    /// once everything is flushed.
    pub guest_shut_send: bool,
    /// The guest will receive no more; we stop reading from the host.
    pub guest_shut_rcv: bool,
    host_write_shut: bool,
}

impl Connection {
    pub fn new(key: ConnKey, stream: UnixStream, token: u64, state: ConnState) -> Connection {
        Connection {
            key,
            stream,
            token,
            state,
            registered: EventSet::empty(),
            readable: false,
            credit_update_queued: false,
            credit_requested: false,
            to_host: VecDeque::new(),
            local_prefix: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
        }
    }

    /// Take the credit information every guest packet carries.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// How many more bytes the guest can take. A guest reporting more
    /// forwarded than we sent gets nothing rather than a wrapped count.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Stamp our side's credit on a header going to the guest.
    pub fn stamp(&mut self, h: &mut Header) {
        h.buf_alloc = BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
    }

    /// Count `n` payload bytes sent to the guest.
    pub fn sent_to_guest(&mut self, n: usize) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
    }

    /// Whether the guest should hear about space we freed.
    pub fn needs_credit_update(&self) -> bool {
        let guest_view_used = self.rx_cnt.wrapping_sub(self.fwd_cnt_sent);
        let guest_view_free = BUF_ALLOC.saturating_sub(guest_view_used);
        self.fwd_cnt != self.fwd_cnt_sent && guest_view_free < CREDIT_UPDATE_THRESHOLD
    }

    /// Whether we want to read host data for the guest now.
    pub fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && !self.readable
            && self.peer_credit() > 0
    }

    /// What the host socket should be watched for.
    pub fn interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.wants_host_read() {
            e |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Bytes waiting for the host.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Queue bytes of our own (not the guest's) for the host.
    pub fn push_local(&mut self, data: &[u8]) {
        // The prefix must stay in front: only push it while nothing from
        // the guest is queued (true for the `OK` line, sent on RESPONSE).
        debug_assert_eq!(self.to_host.len(), self.local_prefix);
        self.to_host.extend(data);
        self.local_prefix += data.len();
    }

    /// Queue guest data for the host, refusing data beyond the credit we
    /// gave.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let used = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        let free = BUF_ALLOC.saturating_sub(used);
        if data.len() > free as usize {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                free,
            });
        }
        self.to_host.extend(data);
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        Ok(())
    }

    /// Write what we can to the host without blocking. Once everything is
    /// out and the guest has shut its sending side, shut the socket's write
    /// side so the host program sees EOF.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => {
                    return Err(ConnError::Host(io::Error::from(io::ErrorKind::WriteZero)));
                }
                Ok(n) => {
                    self.to_host.drain(..n);
                    let local = n.min(self.local_prefix);
                    self.local_prefix -= local;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - local) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        if self.to_host.is_empty() {
            // Release the memory of a burst.
            if self.to_host.capacity() > 2 * MAX_PKT_PAYLOAD {
                self.to_host = VecDeque::new();
            }
            if self.guest_shut_send && !self.host_write_shut {
                self.host_write_shut = true;
                // The host may already be gone; the next read tells.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(())
    }

    /// Read host data for the guest into `buf`, no more than the guest's
    /// credit. `Ok(0)` is EOF.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.peer_credit() as usize);
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        loop {
            match self.stream.read(&mut buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = ConnKey {
            host_port: 5,
            guest_port: 6,
        };
        (Connection::new(key, a, 100, ConnState::Established), b)
    }

    fn credit_hdr(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn host_reads_are_bounded_by_the_guests_credit() {
        let (mut c, mut host) = pair();
        host.write_all(&[7u8; 100]).unwrap();
        let mut buf = [0u8; 100];
        // No credit yet: nothing is read, and no read interest.
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.interest().contains(EventSet::IN));
        assert!(c.read_from_host(&mut buf).is_err());
        c.update_peer_credit(&credit_hdr(30, 0));
        assert!(c.interest().contains(EventSet::IN));
        let n = c.read_from_host(&mut buf).unwrap();
        assert_eq!(n, 30);
        c.sent_to_guest(n);
        assert_eq!(c.peer_credit(), 0);
        // The guest forwards 20 of them.
        c.update_peer_credit(&credit_hdr(30, 20));
        assert_eq!(c.peer_credit(), 20);
        // A guest claiming to have forwarded more than it got gets nothing.
        c.update_peer_credit(&credit_hdr(30, 31));
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.tx_cnt = 5;
        c.update_peer_credit(&credit_hdr(100, u32::MAX - 4));
        assert_eq!(c.peer_credit(), 90);
    }

    #[test]
    fn guest_data_beyond_our_buffer_is_refused() {
        let (mut c, _host) = pair();
        c.push_from_guest(&vec![1u8; BUF_ALLOC as usize - 10])
            .unwrap();
        assert!(matches!(
            c.push_from_guest(&[0u8; 11]),
            Err(ConnError::CreditExceeded { len: 11, free: 10 })
        ));
        c.push_from_guest(&[0u8; 10]).unwrap();
    }

    #[test]
    fn flushing_moves_fwd_cnt_and_triggers_a_credit_update() {
        let (mut c, mut host) = pair();
        c.push_local(b"OK 5\n");
        let data = vec![9u8; BUF_ALLOC as usize - 1000];
        c.push_from_guest(&data).unwrap();
        assert!(c.interest().contains(EventSet::OUT));
        assert!(!c.needs_credit_update());
        // Read on the host side until everything arrived.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < data.len() + 5 {
            c.flush_to_host().unwrap();
            let n = host.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..5], b"OK 5\n");
        assert!(got[5..].iter().all(|&b| b == 9));
        assert_eq!(
            c.fwd_cnt as usize,
            data.len(),
            "the OK line is not guest data"
        );
        assert!(c.needs_credit_update());
        let mut h = Header::default();
        c.stamp(&mut h);
        assert_eq!(h.fwd_cnt as usize, data.len());
        assert_eq!(h.buf_alloc, BUF_ALLOC);
        assert!(!c.needs_credit_update());
        assert!(!c.interest().contains(EventSet::OUT));
    }

    #[test]
    fn guest_shutdown_send_shuts_the_host_write_side_after_flush() {
        let (mut c, mut host) = pair();
        c.push_from_guest(b"bye").unwrap();
        c.guest_shut_send = true;
        c.flush_to_host().unwrap();
        let mut s = String::new();
        host.read_to_string(&mut s).unwrap();
        assert_eq!(s, "bye");
    }
}
