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

mod metrics;
mod persist;
pub mod tap;
mod worker;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use vireo_sandbox::seccomp::Device;

use virtio_bindings::virtio_net as vn;

use super::worker::Worker;
use super::{
    device_type, features, read_config_bytes, take_queues, ActivateError, Activation, QueueT,
    VirtioDevice,
};
use crate::rate_limiter::{Limit, RateLimiter};
use vireo_api::devices::net::NetConfig;
use worker::{NetWorker, WorkerQueue};

pub use metrics::{NetCounters, NetStats};
pub use persist::{NetPersistState, NetStateError};
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
            .map_err(ActivateError::Tap)?;
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let mut rx_queue = rx.queue;
        let mut tx_queue = tx.queue;
        rx_queue.set_event_idx(event_idx);
        tx_queue.set_event_idx(event_idx);
        let limiter = || limiter(&self.config).map_err(ActivateError::RateTimer);
        let kick_rx = rx.notify.try_clone().map_err(ActivateError::Thread)?;
        let kick_tx = tx.notify.try_clone().map_err(ActivateError::Thread)?;
        let handler = NetWorker::new(
            self,
            memory,
            interrupt,
            acked,
            WorkerQueue {
                queue: rx_queue,
                notify: rx.notify,
                limiter: limiter()?,
            },
            WorkerQueue {
                queue: tx_queue,
                notify: tx.notify,
                limiter: limiter()?,
            },
        );
        let fds = handler.fds();
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
}
