//! virtio-net (virtio 1.2 §5.1) on a host TAP interface.
//!
//! One receive queue (0) and one transmit queue (1). Frames cross between
//! the guest and the TAP with their 12-byte `virtio_net_hdr_v1` as is: the
//! TAP is opened with IFF_VNET_HDR, so checksum offload and TSO pass
//! through in both directions and a 64 KiB TCP segment costs one
//! read/write instead of forty-odd.
//!
//! Receive reads each frame straight into the guest's buffers; with
//! mergeable buffers (VIRTIO_NET_F_MRG_RXBUF) one frame spreads over
//! several and the header's `num_buffers` says how many. A frame larger
//! than the buffers on hand waits, its tail in an overflow buffer, until
//! the driver adds more (without mergeable buffers it is dropped and
//! counted). When the guest has no buffers at all the device stops reading
//! the TAP (the kernel queues frames meanwhile) until the driver adds some.
//! Transmit gathers each chain's readable buffers into one `writev`; a full
//! TAP keeps the chain and retries when the TAP is writable again.
//!
//! Front ends build the device from the `--net` string:
//!
//! ```text
//! --net tap=tap0[,mac=52:54:00:12:34:56][,id=net0][,mtu=1500][,bw=100M][,ops=20000]
//! ```
//!
//! `vireo_api::devices::net::NetConfig` parses it, [`Net::new`] opens the TAP, and
//! [`Net::counters`] gives the traffic counters.

pub mod tap;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vireo_sandbox::seccomp::Device;

use vireo_vmcore::memory::GuestMemory;
use virtio_bindings::virtio_net as vn;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{EpollCtl, EventHandler, Worker};
use super::{
    device_type, features, read_config_bytes, take_queues, ActivateError, Activation, Interrupt,
    InterruptKind, Queue, QueueT, VirtioDevice,
};
use crate::rate_limiter::{Limit, RateLimiter};
use vireo_api::devices::net::NetConfig;

pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The largest frame, header included: a 64 KiB GSO packet, its Ethernet
/// header and the virtio header (65562 bytes).
pub const MAX_FRAME: usize = 65536 + ETH_HLEN + VNET_HDR_LEN;
const ETH_HLEN: usize = 14;
/// The shortest transmit chain accepted: the header and an Ethernet header.
const MIN_TX_FRAME: usize = VNET_HDR_LEN + ETH_HLEN;
/// At most this many iovecs per readv/writev (the kernel's UIO_MAXIOV).
const MAX_IOVS: usize = 1024;
/// Frames one direction handles before the worker looks at its other
/// fds, so a flood one way does not starve the other.
const BUDGET: usize = 64;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The transmit offloads the driver accepted: what a transmit header may
/// ask of the host kernel's offload code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: partial checksums (NEEDS_CSUM).
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_HOST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_HOST_ECN.
    pub ecn: bool,
}

impl TxOffloads {
    /// The offloads in an accepted feature set.
    pub fn from_features(acked: u64) -> TxOffloads {
        let has = |b: u32| acked & bit(b) != 0;
        TxOffloads {
            csum: has(vn::VIRTIO_NET_F_CSUM),
            tso4: has(vn::VIRTIO_NET_F_HOST_TSO4),
            tso6: has(vn::VIRTIO_NET_F_HOST_TSO6),
            ecn: has(vn::VIRTIO_NET_F_HOST_ECN),
        }
    }
}

/// Checks a transmit chain's `virtio_net_hdr_v1` against the frame after it
/// (`frame_len` bytes) and the accepted offloads, before the TAP hands it
/// to the host kernel's GSO and checksum code: only known flags, GSO types
/// the driver negotiated (with a partial checksum and a segment size),
/// checksum and header positions inside the frame.
pub fn check_tx_header(
    hdr: &[u8; VNET_HDR_LEN],
    frame_len: usize,
    offloads: TxOffloads,
) -> Result<(), String> {
    let le16 = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
    let (flags, gso_type) = (u32::from(hdr[0]), u32::from(hdr[1]));
    let (hdr_len, gso_size, csum_start, csum_offset) = (le16(2), le16(4), le16(6), le16(8));
    let needs_csum = flags & vn::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if flags & !vn::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(format!("a header with flags {flags:#x}"));
    }
    // The kernel copies hdr_len bytes as the packet's headers.
    if hdr_len > frame_len {
        return Err(format!(
            "a header length of {hdr_len} in a {frame_len}-byte frame"
        ));
    }
    if needs_csum {
        if !offloads.csum {
            return Err("a partial checksum (NEEDS_CSUM) without VIRTIO_NET_F_CSUM".into());
        }
        // The 2-byte checksum field lies inside the frame.
        if csum_start + csum_offset + 2 > frame_len {
            return Err(format!(
                "a checksum at {csum_start}+{csum_offset} outside the {frame_len}-byte frame"
            ));
        }
    }
    let ecn = gso_type & vn::VIRTIO_NET_HDR_GSO_ECN != 0;
    let allowed = match gso_type & !vn::VIRTIO_NET_HDR_GSO_ECN {
        vn::VIRTIO_NET_HDR_GSO_NONE => {
            if ecn {
                return Err("the GSO ECN bit without a GSO type".into());
            }
            return Ok(());
        }
        vn::VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4,
        vn::VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6,
        _ => false,
    };
    if !allowed || (ecn && !offloads.ecn) {
        return Err(format!("GSO type {gso_type:#x}, not negotiated"));
    }
    if !needs_csum {
        return Err("a GSO frame without a partial checksum".into());
    }
    if gso_size == 0 {
        return Err("a GSO frame with a segment size of 0".into());
    }
    Ok(())
}

/// A rate limiter for one direction of `config`'s traffic.
fn limiter(config: &NetConfig) -> io::Result<RateLimiter> {
    RateLimiter::new(
        config.bandwidth.map(Limit::per_second),
        config.ops.map(Limit::per_second),
    )
}

/// Traffic counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    /// Frame bytes (without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP that did not fit the guest's buffers.
    pub rx_dropped: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Frame bytes (without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Malformed transmit chains and frames the TAP refused.
    pub tx_dropped: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What a saved device needs besides its queues: its configuration space
/// and counters (the TAP is reopened by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub mac: [u8; 6],
    pub status: u16,
    pub mtu: Option<u16>,
    pub stats: NetStats,
}

/// A virtio-net device bound to a TAP.
pub struct Net {
    config: NetConfig,
    tap: Arc<Tap>,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    /// Open `config.tap` and build the device.
    pub fn new(config: NetConfig) -> Result<Net, TapError> {
        let tap = Tap::open(&config.tap)?;
        Ok(Net::with_tap(config, tap))
    }

    /// Build the device on an already open TAP.
    pub fn with_tap(config: NetConfig, tap: Tap) -> Net {
        Net {
            config,
            tap: Arc::new(tap),
            counters: Arc::new(NetCounters::default()),
            worker: None,
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn state(&self) -> NetState {
        NetState {
            mac: self.config.mac.bytes(),
            status: vn::VIRTIO_NET_S_LINK_UP as u16,
            mtu: self.config.mtu,
            stats: self.counters.snapshot(),
        }
    }

    /// `struct virtio_net_config` up to `mtu`: mac, status,
    /// max_virtqueue_pairs, mtu.
    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.config.mac.bytes());
        c[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.unwrap_or(0).to_le_bytes());
        c
    }
}

/// Which TAP offloads match the features the driver accepted: what the
/// TAP may hand us is what the guest said it can receive.
fn tap_offload(features: u64) -> u32 {
    let mut f = 0;
    if features & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0 {
        f |= tap::offload::CSUM;
        if features & bit(vn::VIRTIO_NET_F_GUEST_TSO4) != 0 {
            f |= tap::offload::TSO4;
        }
        if features & bit(vn::VIRTIO_NET_F_GUEST_TSO6) != 0 {
            f |= tap::offload::TSO6;
        }
        if f & (tap::offload::TSO4 | tap::offload::TSO6) != 0
            && features & bit(vn::VIRTIO_NET_F_GUEST_ECN) != 0
        {
            f |= tap::offload::TSO_ECN;
        }
        if features & bit(vn::VIRTIO_NET_F_GUEST_UFO) != 0 {
            f |= tap::offload::UFO;
        }
    }
    f
}

const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_RX_TIMER: u64 = 3;
const TOKEN_TX_TIMER: u64 = 4;

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn name(&self) -> String {
        match &self.config.id {
            Some(id) => format!("virtio-net {id}"),
            None => format!("virtio-net {}", self.config.tap),
        }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | bit(vn::VIRTIO_NET_F_MAC)
            | bit(vn::VIRTIO_NET_F_STATUS)
            | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
            | bit(vn::VIRTIO_NET_F_CSUM)
            | bit(vn::VIRTIO_NET_F_HOST_TSO4)
            | bit(vn::VIRTIO_NET_F_HOST_TSO6)
            | bit(vn::VIRTIO_NET_F_HOST_ECN)
            | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
            | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
            | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
            | bit(vn::VIRTIO_NET_F_GUEST_ECN);
        if self.config.mtu.is_some() {
            f |= bit(vn::VIRTIO_NET_F_MTU);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            features: acked,
        } = activation;
        let [rx, tx] = take_queues(queues, [RX_QUEUE, TX_QUEUE])?;
        self.tap
            .set_offload(tap_offload(acked))
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let mut rx_queue = rx.queue;
        let mut tx_queue = tx.queue;
        rx_queue.set_event_idx(event_idx);
        tx_queue.set_event_idx(event_idx);
        let limiter = || {
            limiter(&self.config)
                .map_err(|e| ActivateError::Device(format!("rate limiter timer: {e}")))
        };
        let kick_rx = rx.notify.try_clone().map_err(ActivateError::Thread)?;
        let kick_tx = tx.notify.try_clone().map_err(ActivateError::Thread)?;
        let handler = NetWorker {
            name: self.name(),
            mem: memory,
            interrupt,
            tap: self.tap.clone(),
            counters: self.counters.clone(),
            mrg_rxbuf: acked & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0,
            tx_offloads: TxOffloads::from_features(acked),
            tap_events: EventSet::IN,
            rx: RxState {
                queue: rx_queue,
                index: RX_QUEUE,
                notify: rx.notify,
                limiter: limiter()?,
                chains: VecDeque::new(),
                avail: 0,
                pending: None,
                overflow: vec![0u8; MAX_FRAME + 1],
                waiting: false,
            },
            tx: TxState {
                queue: tx_queue,
                index: TX_QUEUE,
                notify: tx.notify,
                limiter: limiter()?,
                pending: None,
                blocked_on_tap: false,
            },
            warned: Warned::default(),
        };
        let fds: [(RawFd, EventSet, u64); 5] = [
            (handler.rx.notify.as_raw_fd(), EventSet::IN, TOKEN_RX_QUEUE),
            (handler.tx.notify.as_raw_fd(), EventSet::IN, TOKEN_TX_QUEUE),
            (self.tap.as_raw_fd(), EventSet::IN, TOKEN_TAP),
            (handler.rx.limiter.timer_fd(), EventSet::IN, TOKEN_RX_TIMER),
            (handler.tx.limiter.timer_fd(), EventSet::IN, TOKEN_TX_TIMER),
        ];
        let thread = format!(
            "net-{}",
            self.config.id.as_deref().unwrap_or(&self.config.tap)
        );
        let worker =
            Worker::spawn(&thread, Device::Net, &fds, handler).map_err(ActivateError::Thread)?;
        // Chains the driver made available before DRIVER_OK are served now.
        let _ = kick_rx.write(1);
        let _ = kick_tx.write(1);
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }

    // A frame read from the TAP but not yet delivered (waiting for receive
    // buffers) is not saved: a restored device drops it, like a lost
    // packet. Transmit chains are re-read from the avail ring, so a frame
    // the guest queued may be sent twice — both are normal on a network.
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.config.mac.to_string() })
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Saved {
            mac: String,
        }
        let saved: Saved = super::decode_state(state)?;
        // The guest driver read its MAC at probe time: keep that one (a
        // random MAC would otherwise change across the restore).
        self.config.mac = saved
            .mac
            .parse()
            .map_err(|e| format!("saved MAC {}: {e}", saved.mac))?;
        Ok(())
    }
}

/// A receive buffer popped from the queue, checked: writable, inside
/// guest memory, capped at [`MAX_FRAME`] bytes.
struct RxChain {
    head: u16,
    bufs: Bufs,
    cap: usize,
}

/// A frame read from the TAP, not yet handed to the guest: its first
/// `in_chains` bytes are in the first chains of `RxState::chains`, the rest
/// at the start of the overflow buffer (waiting for more guest buffers).
struct PendingRx {
    len: usize,
    in_chains: usize,
}

struct RxState {
    queue: Queue,
    index: u16,
    notify: EventFd,
    limiter: RateLimiter,
    chains: VecDeque<RxChain>,
    /// Sum of `chains`' capacities.
    avail: usize,
    pending: Option<PendingRx>,
    /// Where a read puts what the guest's buffers cannot hold (one byte
    /// more than the largest frame, to see a frame that is too large).
    overflow: Vec<u8>,
    /// Out of buffers; waiting for the driver's notification.
    waiting: bool,
}

/// A transmit chain, checked: readable, inside guest memory, of a sane
/// length.
struct TxChain {
    head: u16,
    bufs: Bufs,
    len: usize,
    charged: bool,
}

struct TxState {
    queue: Queue,
    index: u16,
    notify: EventFd,
    limiter: RateLimiter,
    /// A chain that waits for the TAP or the rate limiter.
    pending: Option<TxChain>,
    blocked_on_tap: bool,
}

/// One log line per kind of trouble, not one per frame.
#[derive(Default)]
struct Warned {
    bad_tx: bool,
    bad_rx: bool,
    rx_too_big: bool,
    tap_write: bool,
}

/// The reason the worker stops.
struct Fatal(String);

impl From<virtio_queue::Error> for Fatal {
    fn from(e: virtio_queue::Error) -> Fatal {
        Fatal(format!("queue error: {e}"))
    }
}

struct NetWorker {
    name: String,
    mem: GuestMemory,
    interrupt: Arc<dyn Interrupt>,
    tap: Arc<Tap>,
    counters: Arc<NetCounters>,
    mrg_rxbuf: bool,
    /// The driver accepted VIRTIO_NET_F_GUEST_CSUM.
    guest_csum: bool,
    /// What transmit headers may ask for.
    tx_offloads: TxOffloads,
    /// What the TAP is watched for now.
    tap_events: EventSet,
    rx: RxState,
    tx: TxState,
    warned: Warned,
}

/// A chain's buffers, translated once when the chain is popped: guest
/// addresses for the device's own small writes, host addresses (in the
/// guest memory mapping the worker keeps alive) for readv/writev.
#[derive(Default)]
struct Bufs {
    guest: Vec<(GuestAddress, usize)>,
    host: Vec<(usize, usize)>,
}

impl Bufs {
    /// Add `len` bytes at `addr`; false if they are not all guest RAM.
    fn push(&mut self, mem: &GuestMemory, addr: GuestAddress, len: usize) -> bool {
        let start = self.host.len();
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            match slice {
                Ok(s) => self
                    .host
                    .push((s.ptr_guard_mut().as_ptr() as usize, s.len())),
                Err(_) => {
                    self.host.truncate(start);
                    return false;
                }
            }
        }
        self.guest.push((addr, len));
        true
    }

    /// Append iovecs for the buffers to `out` until it has `max`; returns
    /// the bytes they cover.
    fn iovecs(&self, out: &mut Vec<libc::iovec>, max: usize) -> usize {
        let mut total = 0;
        for &(p, len) in &self.host {
            if out.len() >= max {
                break;
            }
            out.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: len,
            });
            total += len;
        }
        total
    }
}

/// Marks the first `n` bytes of `chains`' buffers dirty in guest memory's
/// bitmap: readv wrote them through host pointers, which neither
/// vm-memory's bitmap nor the hypervisor's dirty log sees, and a migration
/// or diff snapshot that missed them would carry stale frame data.
fn mark_read_dirty<'a>(mem: &GuestMemory, chains: impl Iterator<Item = &'a RxChain>, mut n: usize) {
    for c in chains {
        for &(addr, len) in &c.bufs.guest {
            if n == 0 {
                return;
            }
            let k = len.min(n);
            // The buffers were translated when popped and the mapping is
            // kept alive, so every slice is found again.
            for s in GuestMemoryBackend::get_slices(mem, addr, k).flatten() {
                s.bitmap().mark_dirty(0, s.len());
            }
            n -= k;
        }
    }
}

/// Fill `out` from the start of the buffer `descs` describe.
fn read_chain_at(
    mem: &GuestMemory,
    descs: &[(GuestAddress, usize)],
    mut out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for &(addr, len) in descs {
        if out.is_empty() {
            break;
        }
        let n = len.min(out.len());
        mem.read_slice(&mut out[..n], addr)?;
        out = &mut out[n..];
    }
    Ok(())
}

/// Write `data` at byte `offset` of the buffer `descs` describe.
fn write_chain_at(
    mem: &GuestMemory,
    descs: &[(GuestAddress, usize)],
    mut offset: usize,
    mut data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for &(addr, len) in descs {
        if data.is_empty() {
            break;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        mem.write_slice(&data[..n], addr.unchecked_add(offset as u64))?;
        data = &data[n..];
        offset = 0;
    }
    Ok(())
}

impl NetWorker {
    fn signal(&mut self, index: u16) -> Result<(), Fatal> {
        let q = if index == RX_QUEUE {
            &mut self.rx.queue
        } else {
            &mut self.tx.queue
        };
        if q.needs_notification(&self.mem)? {
            if let Err(e) = self.interrupt.signal(InterruptKind::Queue(index)) {
                return Err(Fatal(format!("cannot signal queue {index}: {e}")));
            }
        }
        Ok(())
    }

    // ---- transmit ----

    /// Check a transmit chain; the error says what is wrong with it.
    fn check_tx(
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        offloads: TxOffloads,
    ) -> Result<TxChain, String> {
        let head = chain.head_index();
        let mut bufs = Bufs::default();
        let mut len = 0usize;
        for d in chain {
            if d.is_write_only() {
                return Err("a device-writable buffer in a transmit chain".to_string());
            }
            let n = d.len() as usize;
            if n == 0 {
                continue;
            }
            len += n;
            if len > MAX_FRAME {
                return Err(format!("a frame of more than {MAX_FRAME} bytes"));
            }
            if !bufs.push(mem, d.addr(), n) {
                return Err(format!(
                    "a buffer at {:#x} (+{n}) outside guest memory",
                    d.addr().0
                ));
            }
            if bufs.host.len() > MAX_IOVS {
                return Err(format!(
                    "more than {MAX_IOVS} pieces of memory in one frame"
                ));
            }
        }
        if len < MIN_TX_FRAME {
            return Err(format!(
                "a frame of {len} bytes, shorter than the virtio and Ethernet headers ({MIN_TX_FRAME})"
            ));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        read_chain_at(mem, &bufs.guest, &mut hdr)
            .map_err(|e| format!("a header that cannot be read: {e}"))?;
        check_tx_header(&hdr, len - VNET_HDR_LEN, offloads)?;
        Ok(TxChain {
            head,
            bufs,
            len,
            charged: false,
        })
    }

    fn drop_tx(&mut self, head: u16, why: &str, used: &mut bool) -> Result<(), Fatal> {
        inc(&self.counters.tx_dropped, 1);
        if !self.warned.bad_tx {
            self.warned.bad_tx = true;
            tracing::warn!(
                "{}: dropped a transmit chain with {why} (further ones are only counted)",
                self.name
            );
        }
        self.tx.queue.add_used(&self.mem, head, 0)?;
        *used = true;
        Ok(())
    }

    /// The next good transmit chain, dropping bad ones; each dropped chain
    /// takes one of `budget`. None when the queue is empty, its avail ring
    /// is broken, or the budget ran out (then the worker kicks itself to
    /// come back after its other fds).
    fn pop_tx(&mut self, used: &mut bool, budget: &mut usize) -> Result<Option<TxChain>, Fatal> {
        let mut popped_since_enable = true;
        loop {
            let Some(chain) = self.tx.queue.pop_descriptor_chain(&self.mem) else {
                // More may have come while notifications were off; an
                // index that says more yet yields nothing twice running
                // is a broken ring: stop rather than spin.
                if self.tx.queue.enable_notification(&self.mem)? && popped_since_enable {
                    popped_since_enable = false;
                    continue;
                }
                return Ok(None);
            };
            popped_since_enable = true;
            let head = chain.head_index();
            match Self::check_tx(&self.mem, chain, self.tx_offloads) {
                Ok(c) => return Ok(Some(c)),
                Err(why) => {
                    self.drop_tx(head, &why, used)?;
                    *budget = budget.saturating_sub(1);
                    if *budget == 0 {
                        let _ = self.tx.notify.write(1);
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn process_tx(&mut self) -> Result<(), Fatal> {
        let mut used = false;
        let r = self.tx_loop(&mut used);
        if used {
            self.signal(self.tx.index)?;
        }
        r
    }

    fn tx_loop(&mut self, used: &mut bool) -> Result<(), Fatal> {
        self.tx.queue.disable_notification(&self.mem)?;
        let mut budget = BUDGET;
        while !self.tx.blocked_on_tap {
            if budget == 0 {
                // More may be queued: come back after the other fds.
                let _ = self.tx.notify.write(1);
                break;
            }
            budget -= 1;
            let mut chain = match self.tx.pending.take() {
                Some(c) => c,
                None => match self.pop_tx(used, &mut budget)? {
                    Some(c) => c,
                    None => break,
                },
            };
            let frame_len = (chain.len - VNET_HDR_LEN) as u64;
            if !chain.charged {
                if !self.tx.limiter.consume(frame_len) {
                    // The limiter's timer wakes us.
                    self.tx.pending = Some(chain);
                    break;
                }
                chain.charged = true;
            }
            let mut iovs = Vec::with_capacity(chain.bufs.host.len());
            chain.bufs.iovecs(&mut iovs, MAX_IOVS);
            match self.tap.writev(&iovs) {
                Ok(_) => {
                    inc(&self.counters.tx_packets, 1);
                    inc(&self.counters.tx_bytes, frame_len);
                    self.tx.queue.add_used(&self.mem, chain.head, 0)?;
                    *used = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Full: keep the chain, wait for EPOLLOUT.
                    self.tx.pending = Some(chain);
                    self.tx.blocked_on_tap = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.tx.pending = Some(chain);
                }
                Err(e) => {
                    inc(&self.counters.tx_dropped, 1);
                    if !self.warned.tap_write {
                        self.warned.tap_write = true;
                        tracing::warn!(
                            "{}: TAP {} refused a frame: {e} (further ones are only counted)",
                            self.name,
                            self.tap.name()
                        );
                    }
                    self.tx.queue.add_used(&self.mem, chain.head, 0)?;
                    *used = true;
                }
            }
        }
        Ok(())
    }

    // ---- receive ----

    fn check_rx(
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> Result<RxChain, String> {
        let head = chain.head_index();
        let mut bufs = Bufs::default();
        let mut cap = 0usize;
        for d in chain {
            if !d.is_write_only() {
                return Err("a device-readable buffer in a receive chain".to_string());
            }
            let n = (d.len() as usize).min(MAX_FRAME - cap);
            if n == 0 {
                continue;
            }
            if !bufs.push(mem, d.addr(), n) {
                return Err(format!(
                    "a buffer at {:#x} (+{n}) outside guest memory",
                    d.addr().0
                ));
            }
            cap += n;
        }
        if cap < VNET_HDR_LEN {
            return Err(format!(
                "{cap} bytes, less than the {VNET_HDR_LEN}-byte header"
            ));
        }
        Ok(RxChain { head, bufs, cap })
    }

    /// Pop receive buffers until they hold `need` bytes or the queue is
    /// empty.
    fn fill_rx(&mut self, need: usize, used: &mut bool) -> Result<(), Fatal> {
        // Bad chains returned per call: a ring that keeps offering them
        // (a used ring laid over the avail ring) cannot hold the thread.
        let mut bad_left = BUDGET;
        while self.rx.avail < need && bad_left > 0 {
            let Some(chain) = self.rx.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            match Self::check_rx(&self.mem, chain) {
                Ok(c) => {
                    self.rx.avail += c.cap;
                    self.rx.chains.push_back(c);
                }
                Err(why) => {
                    if !self.warned.bad_rx {
                        self.warned.bad_rx = true;
                        tracing::warn!(
                            "{}: returned a receive chain with {why} unused (further ones are not logged)",
                            self.name
                        );
                    }
                    self.rx.queue.add_used(&self.mem, head, 0)?;
                    *used = true;
                    bad_left -= 1;
                }
            }
        }
        Ok(())
    }

    /// Out of buffers: ask the driver to notify. True if buffers arrived
    /// meanwhile (try again).
    fn rx_wait_for_buffers(&mut self) -> Result<bool, Fatal> {
        if self.rx.queue.enable_notification(&self.mem)? {
            // An avail index further ahead than the ring is long says
            // "more" forever while nothing can be popped: wait for the
            // driver's next kick instead of retrying on every TAP wakeup.
            let avail = self.rx.queue.avail_idx(&self.mem, Ordering::Acquire)?;
            if avail.0.wrapping_sub(self.rx.queue.next_avail()) <= self.rx.queue.size() {
                return Ok(true);
            }
            if !self.warned.bad_rx {
                self.warned.bad_rx = true;
                tracing::warn!(
                    "{}: the receive queue's avail index is {} entries ahead of the device; \
                     waiting for the driver to fix or reset it (not logged again)",
                    self.name,
                    avail.0.wrapping_sub(self.rx.queue.next_avail())
                );
            }
        }
        self.rx.waiting = true;
        Ok(false)
    }

    fn process_rx(&mut self) -> Result<(), Fatal> {
        let mut used = false;
        let r = self.rx_loop(&mut used);
        if used {
            self.signal(self.rx.index)?;
        }
        r
    }

    fn rx_loop(&mut self, used: &mut bool) -> Result<(), Fatal> {
        // The TAP stays readable (level-triggered), so stopping here only
        // lets the other fds go first.
        for _ in 0..BUDGET {
            if let Some(p) = self.rx.pending.take() {
                if !self.deliver(p, used)? {
                    return Ok(());
                }
                continue;
            }
            if self.rx.waiting || self.rx.limiter.is_blocked() {
                return Ok(());
            }
            let need = if self.mrg_rxbuf { MAX_FRAME } else { 1 };
            self.fill_rx(need, used)?;
            if self.rx.chains.is_empty() {
                if self.rx_wait_for_buffers()? {
                    continue;
                }
                return Ok(());
            }
            // Straight into the guest's buffers (all of them with mergeable
            // buffers, else the first), and past them into the overflow
            // buffer: the TAP cuts a frame to the space given without
            // saying so, so the read always has room for the largest one.
            let take = if self.mrg_rxbuf {
                self.rx.chains.len()
            } else {
                1
            };
            let mut iovs = Vec::with_capacity(8);
            let mut guest_cap = 0;
            for c in self.rx.chains.iter().take(take) {
                guest_cap += c.bufs.iovecs(&mut iovs, MAX_IOVS - 1);
                if guest_cap >= MAX_FRAME {
                    break;
                }
            }
            iovs.push(libc::iovec {
                iov_base: self.rx.overflow.as_mut_ptr().cast(),
                iov_len: self.rx.overflow.len(),
            });
            let read = self.tap.readv(&iovs);
            if let Ok(n) = read {
                mark_read_dirty(
                    &self.mem,
                    self.rx.chains.iter().take(take),
                    n.min(guest_cap),
                );
            }
            match read {
                Ok(n)
                    if !(VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                        || (!self.mrg_rxbuf && n > guest_cap) =>
                {
                    inc(&self.counters.rx_dropped, 1);
                    if !self.warned.rx_too_big {
                        self.warned.rx_too_big = true;
                        tracing::warn!(
                            "{}: dropped a {n}-byte frame from TAP {}: the guest's receive buffer holds {guest_cap} \
                             (further drops are only counted)",
                            self.name,
                            self.tap.name()
                        );
                    }
                }
                Ok(len) => {
                    let p = PendingRx {
                        len,
                        in_chains: len.min(guest_cap),
                    };
                    if !self.deliver(p, used)? {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Fatal(format!(
                        "reading TAP {} failed: {e}",
                        self.tap.name()
                    )))
                }
            }
        }
        // Out of budget with nothing pending: the TAP is still watched.
        Ok(())
    }

    /// Hand a read frame to the guest. False: it waits (for buffers or the
    /// rate limiter) and is back in `rx.pending`.
    fn deliver(&mut self, mut p: PendingRx, used: &mut bool) -> Result<bool, Fatal> {
        let len = p.len;
        if p.in_chains < len {
            loop {
                self.fill_rx(len, used)?;
                if self.rx.avail >= len {
                    break;
                }
                if !self.rx_wait_for_buffers()? {
                    self.rx.pending = Some(p);
                    return Ok(false);
                }
            }
            // The rest of the frame goes on where the read stopped.
            let mut data = &self.rx.overflow[..len - p.in_chains];
            let mut skip = p.in_chains;
            'chains: for c in &self.rx.chains {
                for &(addr, n) in &c.bufs.guest {
                    if data.is_empty() {
                        break 'chains;
                    }
                    if skip >= n {
                        skip -= n;
                        continue;
                    }
                    let k = (n - skip).min(data.len());
                    self.mem
                        .write_slice(&data[..k], addr.unchecked_add(skip as u64))
                        .map_err(|e| Fatal(format!("receive buffer: {e}")))?;
                    data = &data[k..];
                    skip = 0;
                }
            }
            p.in_chains = len;
        }
        // Charged once, just before the guest sees it.
        if !self.rx.limiter.consume((len - VNET_HDR_LEN) as u64) {
            self.rx.pending = Some(p);
            return Ok(false);
        }
        // The chains the frame fills, in order.
        let mut count = 0usize;
        let mut left = len;
        for c in &self.rx.chains {
            if left == 0 {
                break;
            }
            left -= c.cap.min(left);
            count += 1;
        }
        // Without mergeable buffers the frame is in one chain (read into
        // the first only); num_buffers is 1 then, as virtio 1.x requires.
        let nb = (count as u16).to_le_bytes();
        if let Some(first) = self.rx.chains.front() {
            let g = &first.bufs.guest;
            write_chain_at(&self.mem, g, NUM_BUFFERS_OFFSET, &nb)
                .map_err(|e| Fatal(format!("receive buffer: {e}")))?;
            if !self.guest_csum {
                // The TAP may mark a frame DATA_VALID; without
                // GUEST_CSUM the flags must be zero (virtio 1.2 5.1.6.4.1).
                write_chain_at(&self.mem, g, 0, &[0])
                    .map_err(|e| Fatal(format!("receive buffer: {e}")))?;
            }
        }
        let mut left = len;
        for _ in 0..count {
            let Some(c) = self.rx.chains.pop_front() else {
                break;
            };
            self.rx.avail -= c.cap;
            let n = c.cap.min(left);
            left -= n;
            self.rx.queue.add_used(&self.mem, c.head, n as u32)?;
        }
        *used = true;
        inc(&self.counters.rx_packets, 1);
        inc(&self.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(true)
    }

    /// Watch the TAP for reading only while a frame can go somewhere, and
    /// for writing only while a chain waits for room.
    fn update_tap_events(&mut self, ctl: &EpollCtl) -> Result<(), Fatal> {
        let mut want = EventSet::empty();
        if self.rx.pending.is_none() && !self.rx.waiting && !self.rx.limiter.is_blocked() {
            want |= EventSet::IN;
        }
        if self.tx.blocked_on_tap {
            want |= EventSet::OUT;
        }
        if want != self.tap_events {
            ctl.modify(self.tap.as_raw_fd(), want, TOKEN_TAP)
                .map_err(|e| Fatal(format!("epoll on TAP {}: {e}", self.tap.name())))?;
            self.tap_events = want;
        }
        Ok(())
    }

    fn dispatch(&mut self, token: u64, events: EventSet) -> Result<(), Fatal> {
        match token {
            TOKEN_RX_QUEUE => {
                let _ = self.rx.notify.read();
                self.rx.waiting = false;
                self.rx.queue.disable_notification(&self.mem)?;
                self.process_rx()
            }
            TOKEN_TX_QUEUE => {
                let _ = self.tx.notify.read();
                self.process_tx()
            }
            TOKEN_TAP => {
                if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    return Err(Fatal(format!(
                        "TAP {} failed or was deleted",
                        self.tap.name()
                    )));
                }
                if events.contains(EventSet::OUT) {
                    self.tx.blocked_on_tap = false;
                    self.process_tx()?;
                }
                if events.contains(EventSet::IN) {
                    self.process_rx()?;
                }
                Ok(())
            }
            TOKEN_RX_TIMER => {
                self.rx.limiter.on_timer();
                self.process_rx()
            }
            TOKEN_TX_TIMER => {
                self.tx.limiter.on_timer();
                self.process_tx()
            }
            _ => Ok(()),
        }
    }
}

impl EventHandler for NetWorker {
    fn handle(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) -> bool {
        let r = self
            .dispatch(token, events)
            .and_then(|()| self.update_tap_events(ctl));
        match r {
            Ok(()) => true,
            Err(Fatal(msg)) => {
                tracing::warn!("{}: {msg}", self.name);
                false
            }
        }
    }
}
