//! The device's traffic counters.

use std::sync::atomic::{AtomicU64, Ordering};

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

pub(super) fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
