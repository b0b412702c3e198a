//! The device driven like a guest driver would: queues in test memory,
//! packets on tx, buffers on rx, and real Unix sockets on the host side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::BUF_ALLOC;
use super::packet::{op, shutdown, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::ActiveQueue;

const CID: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(5);
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A used element: head, written length, the chain's buffers.
type Used = (u16, u32, Vec<(u64, u32)>);

/// The driver's view of one split queue in test memory.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Head descriptor → the buffers of its chain.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl DriverQueue {
    fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let mut list = Vec::new();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(at + 14))
                .unwrap();
            list.push((addr, len));
        }
        self.chains.insert(head, list);
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The next used element: (head, written length, buffers).
    fn take_used(&mut self, mem: &GuestMemory) -> Option<Used> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = id as u16;
        let bufs = self.chains.remove(&head).unwrap_or_default();
        Some((head, len, bufs))
    }
}

#[derive(Default)]
struct TestIrq(Mutex<Vec<InterruptKind>>);
impl Interrupt for TestIrq {
    fn signal(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

impl TestIrq {
    /// Whether `kind` was signalled (waiting for the device thread, which
    /// signals after publishing a batch).
    fn wait_for(&self, kind: InterruptKind) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.0.lock().unwrap().contains(&kind) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

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

struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    mem: GuestMemory,
    dev: Vsock,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<TestIrq>,
    next_buf: u64,
    /// The guest's receive counter (payload bytes it consumed).
    fwd_cnt: u32,
}

const BUF_BASE: u64 = 0x10_0000;
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
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let irq = Arc::new(TestIrq::default());
        let mut queues = Vec::new();
        let mut drivers = Vec::new();
        let mut kicks = Vec::new();
        for i in 0..3u16 {
            let base = 0x1000 + 0x4000 * u64::from(i);
            // Lay the rings out by hand: MockSplitQueue::create places the
            // used ring inside the avail ring of a 256-entry queue.
            let desc = base;
            let avail = desc + 16 * u64::from(QUEUE_SIZE);
            let used = (avail + 6 + 2 * u64::from(QUEUE_SIZE)).next_multiple_of(4);
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(desc as u32), Some(0));
            queue.set_avail_ring_address(Some(avail as u32), Some(0));
            queue.set_used_ring_address(Some(used as u32), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(&mem));
            drivers.push(DriverQueue {
                desc,
                avail,
                used,
                size: QUEUE_SIZE,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                chains: HashMap::new(),
            });
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(notify.try_clone().unwrap());
            queues.push(ActiveQueue {
                index: i,
                queue,
                notify,
            });
        }
        dev.activate(Activation {
            memory: mem.clone(),
            queues,
            interrupt: irq.clone(),
            features: features.unwrap_or(dev.features()),
        })
        .unwrap();
        let mut drivers = drivers.into_iter();
        let mut kicks = kicks.into_iter();
        Harness {
            dir,
            socket,
            mem,
            dev,
            rx: drivers.next().unwrap(),
            tx: drivers.next().unwrap(),
            rx_kick: kicks.next().unwrap(),
            tx_kick: kicks.next().unwrap(),
            irq,
            next_buf: BUF_BASE,
            fwd_cnt: 0,
        }
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
            self.rx.add_chain(&self.mem, &[(a, size, true)]);
        }
        self.rx_kick.write(1).unwrap();
    }

    /// Put a chain of readable (or writable) buffers with these contents
    /// on tx and wait until the device used it.
    fn send_raw(&mut self, parts: &[(&[u8], bool)]) {
        let mut bufs = Vec::new();
        for (data, writable) in parts {
            let a = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(a)).unwrap();
            bufs.push((a, data.len() as u32, *writable));
        }
        let head = self.tx.add_chain(&self.mem, &bufs);
        self.tx_kick.write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((h, len, _)) = self.tx.take_used(&self.mem) {
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
            if let Some((_, len, bufs)) = self.rx.take_used(&self.mem) {
                let mut data = Vec::new();
                for (a, l) in bufs {
                    let mut b = vec![0u8; l as usize];
                    self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
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
        h.irq.0.lock().unwrap().clear();
        let hdr = h.hdr(op::REQUEST, 7000 + i, 4000, 0);
        h.send(hdr, &[]);
        assert_eq!(h.recv().0.op, op::RST);
        assert!(h.irq.wait_for(InterruptKind::Queue(0)));
        assert!(h.irq.wait_for(InterruptKind::Queue(1)));
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
    assert!(h.irq.wait_for(InterruptKind::Queue(0)));

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
    h.rx.add_chain(&h.mem, &[(a, 8, true)]);
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
    let head = h.tx.add_chain(&h.mem, &[(MEM_SIZE - 8, 64, false)]);
    h.tx_kick.write(1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some((id, _, _)) = h.tx.take_used(&h.mem) {
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
    let e = dev
        .restore_state(crate::virtio::encode_state(&other))
        .unwrap_err();
    assert!(e.contains("cid"), "{e}");
    assert!(dev.restore_state(serde_json::json!("junk")).is_err());
    dev.restore_state(crate::virtio::encode_state(&dev.state()))
        .unwrap();

    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let irq = Arc::new(TestIrq::default());
    let mut queues = Vec::new();
    let mut event = None;
    for i in 0..3u16 {
        let desc = 0x1000 + 0x4000 * u64::from(i);
        let avail = desc + 16 * u64::from(QUEUE_SIZE);
        let used = (avail + 6 + 2 * u64::from(QUEUE_SIZE)).next_multiple_of(4);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        let mut dq = DriverQueue {
            desc,
            avail,
            used,
            size: QUEUE_SIZE,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
        };
        if i == EVENT_QUEUE {
            mem.write_obj(0xffff_ffffu32, GuestAddress(BUF_BASE))
                .unwrap();
            dq.add_chain(&mem, &[(BUF_BASE, 8, true)]);
            event = Some(dq);
        }
        queues.push(ActiveQueue {
            index: i,
            queue,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
    }
    dev.activate(Activation {
        memory: mem.clone(),
        queues,
        interrupt: irq.clone(),
        features: dev.features(),
    })
    .unwrap();
    assert!(irq.wait_for(InterruptKind::Queue(EVENT_QUEUE)));
    let (_, len, bufs) = event.as_mut().unwrap().take_used(&mem).expect("event used");
    assert_eq!(len, 4);
    let id: u32 = mem.read_obj(GuestAddress(bufs[0].0)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    drop(dev);
    let _ = std::fs::remove_dir_all(dir);
}
