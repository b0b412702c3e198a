//! The device driven like a guest driver would: queues in test memory,
//! packets on tx, buffers on rx, and real Unix sockets on the host side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::connection::BUF_ALLOC;
use super::packet::{op, shutdown, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};
use vireo_vmcore::snapshot::device::{DynSnapshottable, SavedState};

const CID: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(5);

/// A used element: head, written length, the chain's buffers.
type Used = (u16, u32, Vec<(u64, u32)>);

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "vireo-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The device on the shared test driver, with the host side's sockets.
struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    drv: TestDriver,
    dev: Vsock,
    /// The buffers of each chain posted and not used yet, by queue and
    /// head (to read a received packet back).
    chains: HashMap<(u16, u16), Vec<(u64, u32)>>,
    next_buf: u64,
    /// The guest's receive counter (payload bytes it consumed).
    fwd_cnt: u32,
}

const BUF_BASE: u64 = DATA_START;
const MEM_SIZE: u64 = 64 << 20;

impl Harness {
    fn new() -> Harness {
        let dir = temp_dir();
        let socket = dir.join("v.sock");
        let dev = Vsock::new(VsockConfig {
            cid: CID,
            socket: socket.clone(),
        })
        .unwrap();
        Self::with_device(dir, socket, dev, None)
    }

    /// Activate `dev` with `features` (default: all it offers).
    fn with_device(
        dir: PathBuf,
        socket: PathBuf,
        mut dev: Vsock,
        features: Option<u64>,
    ) -> Harness {
        let mut drv = TestDriver::new(MEM_SIZE as usize, &[QUEUE_SIZE; 3]);
        dev.activate(drv.activation(features.unwrap_or(dev.features())))
            .unwrap();
        Harness {
            dir,
            socket,
            drv,
            dev,
            chains: HashMap::new(),
            next_buf: BUF_BASE,
            fwd_cnt: 0,
        }
    }

    /// Post a chain of (address, length, device-writable) buffers on
    /// queue `q` without notifying; returns its head.
    fn post(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        let descs: Vec<Desc> = bufs
            .iter()
            .map(|&(a, len, w)| {
                if w {
                    Desc::writable(a, len)
                } else {
                    Desc::readable(a, len)
                }
            })
            .collect();
        let head = self.drv.add_chain(q, &descs);
        self.chains
            .insert((q, head), bufs.iter().map(|&(a, l, _)| (a, l)).collect());
        head
    }

    /// The next used element of queue `q`, if there is one now.
    fn take_used(&mut self, q: u16) -> Option<Used> {
        let (head, len) = self.drv.wait_used(q, Duration::ZERO)?;
        let bufs = self.chains.remove(&(q, head)).unwrap_or_default();
        Some((head, len, bufs))
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).max(1).next_multiple_of(64);
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    /// Offer `n` rx buffers of `size` bytes.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.alloc(size);
            self.post(RX_QUEUE, &[(a, size, true)]);
        }
        self.drv.kick(RX_QUEUE);
    }

    /// Put a chain of readable (or writable) buffers with these contents
    /// on tx and wait until the device used it.
    fn send_raw(&mut self, parts: &[(&[u8], bool)]) {
        let mut bufs = Vec::new();
        for (data, writable) in parts {
            let a = self.alloc(data.len() as u32);
            self.drv.mem.write_slice(data, GuestAddress(a)).unwrap();
            bufs.push((a, data.len() as u32, *writable));
        }
        let head = self.post(TX_QUEUE, &bufs);
        self.drv.kick(TX_QUEUE);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((h, len, _)) = self.take_used(TX_QUEUE) {
                assert_eq!(h, head, "tx chains are used in order");
                assert_eq!(len, 0, "the device writes nothing into tx buffers");
                return;
            }
            assert!(Instant::now() < deadline, "tx chain {head} never used");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Send a packet, header and payload in separate descriptors.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let hb = h.to_bytes();
        if payload.is_empty() {
            self.send_raw(&[(&hb, false)]);
        } else {
            self.send_raw(&[(&hb, false), (payload, false)]);
        }
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, len, bufs)) = self.take_used(RX_QUEUE) {
                let mut data = Vec::new();
                for (a, l) in bufs {
                    let mut b = vec![0u8; l as usize];
                    self.drv.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                    data.extend_from_slice(&b);
                }
                assert!(len as usize <= data.len(), "used length beyond the buffer");
                data.truncate(len as usize);
                if data.len() < HDR_LEN {
                    return Some((Header::default(), data));
                }
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&data[..HDR_LEN]);
                let h = Header::from_bytes(&hb);
                let payload = data[HDR_LEN..].to_vec();
                assert_eq!(h.len as usize, payload.len(), "len matches the payload");
                assert_eq!(h.src_cid, HOST_CID);
                assert_eq!(h.dst_cid, CID);
                assert_eq!(h.type_, TYPE_STREAM);
                return Some((h, payload));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(TIMEOUT).expect("no packet on the rx queue")
    }

    fn port_socket(&self, port: u32) -> PathBuf {
        vireo_api::devices::vsock::port_path(&self.socket, port)
    }

    /// A guest-initiated connection from guest `gport` to a host listener
    /// on `hport`; returns the host's end.
    fn guest_connect(&mut self, gport: u32, hport: u32, guest_buf: u32) -> UnixStream {
        let l = UnixListener::bind(self.port_socket(hport)).unwrap();
        let h = Header {
            buf_alloc: guest_buf,
            ..self.hdr(op::REQUEST, gport, hport, 0)
        };
        self.send(h, &[]);
        let (r, _) = self.recv();
        assert_eq!(r.op, op::RESPONSE, "{r:?}");
        assert_eq!((r.src_port, r.dst_port), (hport, gport));
        assert_eq!(r.buf_alloc, BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.dev.reset();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Wait until the host end sees its peer gone (EOF after any data).
fn host_sees_close(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn config_space_and_features() {
    let h = Harness::new();
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0xffu8; 4];
    h.dev.read_config(4, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    assert_ne!(h.dev.features() & features::VERSION_1, 0);
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes(), vec![256; 3]);
}

#[test]
fn stale_socket_is_replaced_live_one_and_plain_file_refused() {
    let dir = temp_dir();
    let cfg = |p: &Path| VsockConfig {
        cid: 3,
        socket: p.to_path_buf(),
    };
    // A socket left behind by a dead process.
    let stale = dir.join("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let dev = Vsock::new(cfg(&stale)).unwrap();
    // It listens now: host programs connect.
    UnixStream::connect(&stale).unwrap();
    // A second device on the same path is refused, naming it.
    let e = Vsock::new(cfg(&stale)).err().unwrap().to_string();
    assert!(e.contains("in use") && e.contains("stale"), "{e}");
    drop(dev);
    assert!(!stale.exists(), "the device removes its socket");

    let file = dir.join("file");
    std::fs::write(&file, b"data").unwrap();
    let e = Vsock::new(cfg(&file)).err().unwrap().to_string();
    assert!(e.contains("not a socket") && e.contains("file"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    guest_connect_echo(Harness::new());
}

#[test]
fn without_event_idx_every_rx_batch_interrupts() {
    let dir = temp_dir();
    let socket = dir.join("v.sock");
    let dev = Vsock::new(VsockConfig {
        cid: CID,
        socket: socket.clone(),
    })
    .unwrap();
    let mut h = Harness::with_device(dir, socket, dev, Some(features::VERSION_1));
    h.give_rx(4, 4096);
    for i in 0..3 {
        h.drv.interrupt.clear();
        let hdr = h.hdr(op::REQUEST, 7000 + i, 4000, 0);
        h.send(hdr, &[]);
        assert_eq!(h.recv().0.op, op::RST);
        assert!(h.drv.interrupt.raised(InterruptKind::Queue(0), 1));
        assert!(h.drv.interrupt.raised(InterruptKind::Queue(1), 1));
    }
    guest_connect_echo(h);
}

fn guest_connect_echo(mut h: Harness) {
    h.give_rx(16, 4096);
    let mut host = h.guest_connect(5000, 1234, 64 * 1024);

    // Guest → host.
    let hdr = h.hdr(op::RW, 5000, 1234, 5);
    h.send(hdr, b"hello");
    assert_eq!(read_exactly(&mut host, 5), b"hello");
    // Header and payload in one descriptor works as well.
    let mut one = h.hdr(op::RW, 5000, 1234, 3).to_bytes().to_vec();
    one.extend_from_slice(b"abc");
    h.send_raw(&[(&one, false)]);
    assert_eq!(read_exactly(&mut host, 3), b"abc");

    // Host → guest.
    host.write_all(b"world").unwrap();
    let (r, data) = h.recv();
    assert_eq!(r.op, op::RW);
    assert_eq!((r.src_port, r.dst_port), (1234, 5000));
    assert_eq!(data, b"world");
    assert_eq!(r.fwd_cnt, 8, "the device forwarded 8 bytes to the host");
    assert!(h.drv.interrupt.raised(InterruptKind::Queue(0), 1));

    // Host shuts its sending side: the guest gets SHUTDOWN(SEND) but can
    // still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (r, _) = h.recv();
    assert_eq!((r.op, r.flags), (op::SHUTDOWN, shutdown::SEND));
    let hdr = h.hdr(op::RW, 5000, 1234, 4);
    h.send(hdr, b"more");
    assert_eq!(read_exactly(&mut host, 4), b"more");

    // The guest closes: SHUTDOWN both ways → RST and the host socket is
    // closed (the device let go of its fd).
    let mut hdr = h.hdr(op::SHUTDOWN, 5000, 1234, 0);
    hdr.flags = shutdown::BOTH;
    h.send(hdr, &[]);
    let (r, _) = h.recv();
    assert_eq!(r.op, op::RST);
    assert!(host_sees_close(&mut host));
    // Anything more on that connection is answered with RST.
    let hdr = h.hdr(op::RW, 5000, 1234, 1);
    h.send(hdr, b"x");
    assert_eq!(h.recv().0.op, op::RST);
}

#[test]
fn connect_to_a_port_nobody_listens_on_is_reset() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let hdr = h.hdr(op::REQUEST, 7000, 4321, 0);
    h.send(hdr, &[]);
    let (r, _) = h.recv();
    assert_eq!(r.op, op::RST);
    assert_eq!((r.src_port, r.dst_port), (4321, 7000));
    // A socket file whose listener is gone: RST as well.
    drop(UnixListener::bind(h.port_socket(4322)).unwrap());
    let hdr = h.hdr(op::REQUEST, 7001, 4322, 0);
    h.send(hdr, &[]);
    assert_eq!(h.recv().0.op, op::RST);
}

#[test]
fn host_connect_line_reaches_the_guest_and_data_flows() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    let mut host = UnixStream::connect(&h.socket).unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, 52);
    let local = req.src_port;
    assert!(local >= 1 << 30, "local ports come from the high range");
    assert_eq!(req.buf_alloc, BUF_ALLOC);

    let hdr = h.hdr(op::RESPONSE, 52, local, 0);
    h.send(hdr, &[]);
    let want = format!("OK {local}\n");
    assert_eq!(read_exactly(&mut host, want.len()), want.as_bytes());

    host.write_all(b"ping").unwrap();
    let (r, data) = h.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (op::RW, local, 52));
    assert_eq!(data, b"ping");
    let hdr = h.hdr(op::RW, 52, local, 4);
    h.send(hdr, b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");

    // A second host connection gets another local port.
    let mut host2 = UnixStream::connect(&h.socket).unwrap();
    host2.write_all(b"CONNECT 52\n").unwrap();
    let (req2, _) = h.recv();
    assert_eq!(req2.op, op::REQUEST);
    assert_ne!(req2.src_port, local);
    // The guest refuses it: the host socket closes.
    let hdr = h.hdr(op::RST, 52, req2.src_port, 0);
    h.send(hdr, &[]);
    assert!(host_sees_close(&mut host2));

    // The guest resets the first one: closed too.
    let hdr = h.hdr(op::RST, 52, local, 0);
    h.send(hdr, &[]);
    assert!(host_sees_close(&mut host));
    assert!(
        h.try_recv(Duration::from_millis(100)).is_none(),
        "an RST is never answered"
    );
}

#[test]
fn a_malformed_connect_line_closes_the_host_socket() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'C'; 64],
    ] {
        let mut host = UnixStream::connect(&h.socket).unwrap();
        host.write_all(line).unwrap();
        assert!(host_sees_close(&mut host), "{line:?}");
    }
    // A program that hangs up mid-line.
    let mut host = UnixStream::connect(&h.socket).unwrap();
    host.write_all(b"CONN").unwrap();
    drop(host);
    assert!(
        h.try_recv(Duration::from_millis(200)).is_none(),
        "no REQUEST reaches the guest"
    );
}

#[test]
fn the_device_never_sends_more_than_the_guests_credit() {
    let mut h = Harness::new();
    h.give_rx(64, 4096);
    let mut host = h.guest_connect(6000, 80, 1000);
    host.write_all(&[0x5a; 5000]).unwrap();

    let mut got = 0usize;
    let mut credit_requests = 0;
    while let Some((r, data)) = h.try_recv(Duration::from_millis(300)) {
        match r.op {
            op::RW => got += data.len(),
            op::CREDIT_REQUEST => credit_requests += 1,
            o => panic!("unexpected op {o}"),
        }
        assert!(got <= 1000, "the device sent {got} bytes on 1000 of credit");
    }
    assert_eq!(got, 1000);
    assert_eq!(credit_requests, 1);

    // The guest consumed 600 bytes: exactly 600 more come.
    h.fwd_cnt = 600;
    let hdr = Header {
        buf_alloc: 1000,
        ..h.hdr(op::CREDIT_UPDATE, 6000, 80, 0)
    };
    h.send(hdr, &[]);
    let mut more = 0;
    while let Some((r, data)) = h.try_recv(Duration::from_millis(300)) {
        if r.op == op::RW {
            more += data.len();
        }
    }
    assert_eq!(more, 600);

    // A larger buffer: the rest arrives, each packet within the rx buffer.
    h.fwd_cnt = 1600;
    let hdr = Header {
        buf_alloc: 1 << 20,
        ..h.hdr(op::CREDIT_UPDATE, 6000, 80, 0)
    };
    h.send(hdr, &[]);
    let mut rest = 0;
    while rest < 3400 {
        let (r, data) = h.recv();
        assert_eq!(r.op, op::RW);
        assert!(data.len() <= 4096 - HDR_LEN);
        rest += data.len();
    }
    assert_eq!(rest, 3400);

    // CREDIT_REQUEST from the guest is answered with our counters.
    let hdr = h.hdr(op::CREDIT_REQUEST, 6000, 80, 0);
    h.send(hdr, &[]);
    let (r, _) = h.recv();
    assert_eq!(r.op, op::CREDIT_UPDATE);
    assert_eq!(r.buf_alloc, BUF_ALLOC);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut h = Harness::new();
    h.give_rx(64, 4096);
    let mut host = h.guest_connect(6001, 81, 64 * 1024);
    // The host does not read; the guest ignores the credit it is given
    // and sends 64 KiB packets until the device refuses.
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    let mut sent = 0usize;
    let mut advertised_fwd = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        let hdr = h.hdr(op::RW, 6001, 81, chunk.len() as u32);
        h.send(hdr, &chunk);
        sent += chunk.len();
        while let Some((r, _)) = h.try_recv(Duration::from_millis(20)) {
            match r.op {
                op::CREDIT_UPDATE => advertised_fwd = r.fwd_cnt as usize,
                op::RST => reset = true,
                _ => panic!("unexpected {r:?}"),
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "sending {sent} bytes was never refused");
    assert!(
        sent > advertised_fwd + BUF_ALLOC as usize,
        "reset after {sent} bytes although {advertised_fwd} + {BUF_ALLOC} were allowed"
    );
    assert!(host_sees_close(&mut host));
}

#[test]
fn a_slow_host_holds_a_well_behaved_guest_back_by_credit() {
    let mut h = Harness::new();
    h.give_rx(128, 4096);
    let host = h.guest_connect(6002, 82, 64 * 1024);
    const TOTAL: usize = 2 << 20;
    // The host reads slowly, in small pieces.
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut got = Vec::with_capacity(TOTAL);
        let mut b = [0u8; 16 * 1024];
        while got.len() < TOTAL {
            let n = host.read(&mut b).unwrap();
            assert_ne!(n, 0, "early EOF");
            got.extend_from_slice(&b[..n]);
            std::thread::sleep(Duration::from_millis(2));
        }
        got
    });
    let mut sent = 0usize;
    let mut advertised_fwd = 0u32;
    let mut buf_alloc = BUF_ALLOC as usize;
    let mut updates = 0;
    let mut stalls = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent < TOTAL {
        assert!(Instant::now() < deadline, "stuck at {sent} bytes");
        let credit = buf_alloc - (sent - advertised_fwd as usize);
        let n = credit.min(MAX_PKT_PAYLOAD).min(TOTAL - sent);
        if n > 0 {
            let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
            let hdr = h.hdr(op::RW, 6002, 82, n as u32);
            h.send(hdr, &data);
            sent += n;
        } else {
            // Out of credit: wait for the device to tell us about space.
            stalls += 1;
            let (r, _) = h.recv();
            assert_eq!(r.op, op::CREDIT_UPDATE);
            assert!(r.fwd_cnt as usize <= sent);
            advertised_fwd = r.fwd_cnt;
            buf_alloc = r.buf_alloc as usize;
            updates += 1;
            h.give_rx(1, 4096);
        }
        while let Some((r, _)) = h.try_recv(Duration::ZERO) {
            assert_eq!(r.op, op::CREDIT_UPDATE);
            advertised_fwd = r.fwd_cnt;
            updates += 1;
            h.give_rx(1, 4096);
        }
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert!(stalls > 0, "the slow host never held the guest back");
    assert!(updates > 0);
}

#[test]
fn hostile_packets_are_dropped_or_reset_without_harm() {
    let mut h = Harness::new();
    // A tiny rx buffer first: skipped (used with length 0).
    let a = h.alloc(8);
    h.post(RX_QUEUE, &[(a, 8, true)]);
    h.give_rx(16, 4096);

    // Short header: dropped.
    h.send_raw(&[(&[0u8; 20], false)]);
    // The header in a device-writable descriptor: not readable, dropped.
    let hb = h.hdr(op::REQUEST, 1, 2, 0).to_bytes();
    h.send_raw(&[(&hb, true)]);
    // Wrong src_cid / dst_cid: dropped.
    let hb = Header {
        src_cid: 99,
        ..h.hdr(op::REQUEST, 1, 2, 0)
    };
    h.send(hb, &[]);
    let hb = Header {
        dst_cid: 5,
        ..h.hdr(op::REQUEST, 1, 2, 0)
    };
    h.send(hb, &[]);
    // A descriptor outside guest memory: dropped.
    let head = h.post(TX_QUEUE, &[(MEM_SIZE - 8, 64, false)]);
    h.drv.kick(TX_QUEUE);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some((id, _, _)) = h.take_used(TX_QUEUE) {
            assert_eq!(id, head);
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing reached the guest.
    assert!(h.try_recv(Duration::from_millis(100)).is_none());

    // len beyond the descriptors, wrong type, unknown op, payload on a
    // control op, RW for an unknown connection: RST each.
    let hb = h.hdr(op::RW, 10, 20, 100);
    h.send(hb, &[7u8; 10]);
    let hb = Header {
        type_: 2,
        ..h.hdr(op::REQUEST, 11, 20, 0)
    };
    h.send(hb, &[]);
    let hb = h.hdr(99, 12, 20, 0);
    h.send(hb, &[]);
    let hb = h.hdr(op::REQUEST, 13, 20, 3);
    h.send(hb, b"abc");
    let hb = h.hdr(op::RW, 14, 20, 3);
    h.send(hb, b"abc");
    let hb = Header {
        len: u32::MAX,
        ..h.hdr(op::RW, 15, 20, 0)
    };
    h.send(hb, &[]);
    // The tiny rx buffer comes back empty when the first RST is due.
    let (_, d) = h.recv();
    assert!(d.is_empty(), "the tiny rx buffer is returned unused");
    for port in 10..=15 {
        let (r, _) = h.recv();
        assert_eq!(r.op, op::RST, "port {port}");
        assert_eq!((r.src_port, r.dst_port), (20, port));
    }
    assert!(h.try_recv(Duration::from_millis(100)).is_none());

    // The device still works.
    let mut host = h.guest_connect(100, 200, 4096);
    let hb = h.hdr(op::RW, 100, 200, 2);
    h.send(hb, b"ok");
    assert_eq!(read_exactly(&mut host, 2), b"ok");
    // A RESPONSE on an established connection is a protocol error: RST,
    // and the host socket closes.
    let hb = h.hdr(op::RESPONSE, 100, 200, 0);
    h.send(hb, &[]);
    assert_eq!(h.recv().0.op, op::RST);
    assert!(host_sees_close(&mut host));
}

#[test]
fn reset_closes_every_host_socket_and_reactivation_works() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let mut a = h.guest_connect(1, 300, 4096);
    let mut b = UnixStream::connect(&h.socket).unwrap();
    b.write_all(b"CONNECT 9\n").unwrap();
    assert_eq!(h.recv().0.op, op::REQUEST);
    h.dev.reset();
    assert!(host_sees_close(&mut a));
    assert!(host_sees_close(&mut b));
    assert_eq!(h.dev.state().acked_features, 0);

    // The device comes up again on the same socket.
    let dir = std::mem::replace(&mut h.dir, temp_dir());
    let socket = h.socket.clone();
    let dev = std::mem::replace(
        &mut h.dev,
        Vsock::new(VsockConfig {
            cid: CID,
            socket: h.dir.join("other"),
        })
        .unwrap(),
    );
    let mut h2 = Harness::with_device(dir, socket, dev, None);
    h2.give_rx(4, 4096);
    let mut c = UnixStream::connect(&h2.socket).unwrap();
    c.write_all(b"CONNECT 10\n").unwrap();
    let (r, _) = h2.recv();
    assert_eq!((r.op, r.dst_port), (op::REQUEST, 10));
    assert_ne!(h2.dev.state().acked_features, 0);
}

#[test]
fn many_connections_interleave() {
    let mut h = Harness::new();
    h.give_rx(128, 4096);
    let mut hosts: Vec<UnixStream> = (0..8)
        .map(|i| h.guest_connect(2000 + i, 500 + i, 64 * 1024))
        .collect();
    for (i, s) in hosts.iter_mut().enumerate() {
        s.write_all(format!("from host {i}").as_bytes()).unwrap();
    }
    let mut seen = HashMap::new();
    while seen.len() < 8 {
        let (r, data) = h.recv();
        assert_eq!(r.op, op::RW);
        seen.entry(r.dst_port)
            .or_insert_with(Vec::new)
            .extend_from_slice(&data);
    }
    for i in 0..8u32 {
        assert_eq!(seen[&(2000 + i)], format!("from host {i}").as_bytes());
    }
    for i in 0..8u32 {
        let msg = format!("to host {i}");
        let hb = h.hdr(op::RW, 2000 + i, 500 + i, msg.len() as u32);
        h.send(hb, msg.as_bytes());
    }
    for (i, s) in hosts.iter_mut().enumerate() {
        let msg = format!("to host {i}");
        assert_eq!(read_exactly(s, msg.len()), msg.as_bytes());
    }
}

#[test]
fn a_restored_device_tells_the_driver_its_connections_were_reset() {
    let dir = temp_dir();
    let socket = dir.join("r.sock");
    let mut dev = Vsock::new(VsockConfig {
        cid: CID,
        socket: socket.clone(),
    })
    .unwrap();
    // Another guest's state does not fit.
    let mut other = dev.state();
    other.guest_cid = CID + 1;
    let e = dev.restore(other).unwrap_err().to_string();
    assert!(e.contains("cid"), "{e}");
    assert!(dev
        .restore_dyn(SavedState {
            version: 1,
            state: serde_json::json!("junk"),
        })
        .is_err());
    dev.restore(dev.state()).unwrap();

    let mut drv = TestDriver::new(MEM_SIZE as usize, &[QUEUE_SIZE; 3]);
    let activation = drv.activation(dev.features());
    drv.mem
        .write_obj(0xffff_ffffu32, GuestAddress(BUF_BASE))
        .unwrap();
    let head = drv.add_chain(EVENT_QUEUE, &[Desc::writable(BUF_BASE, 8)]);
    dev.activate(activation).unwrap();
    assert!(drv.interrupt.raised(InterruptKind::Queue(EVENT_QUEUE), 1));
    assert_eq!(drv.used(EVENT_QUEUE), (head, 4));
    let id: u32 = drv.mem.read_obj(GuestAddress(BUF_BASE)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    drop(dev);
    let _ = std::fs::remove_dir_all(dir);
}
