//! virtio 1.x device models and their PCI transport.
//!
//! A device model implements [`VirtioDevice`]: what it offers (type,
//! features, queue sizes, configuration space) and what it does once the
//! driver has set it up ([`VirtioDevice::activate`]). The transport
//! ([`pci::VirtioPciDevice`]) owns feature negotiation, queue setup, status
//! and interrupts, and hands the device its ready queues. Devices do their
//! work on their own thread ([`worker::Worker`]), woken by the queue-notify
//! eventfds the transport signals.
//!
//! A device joins snapshots and migration by implementing the VM core's
//! [`Pausable`] and [`Snapshottable`](vireo_vmcore::snapshot::device::Snapshottable)
//! (see [`VirtioDevice`]); the transport pauses it with the machine, saves
//! the common virtio state (status, features, queues, MSI-X) and puts the
//! device's own typed state inside. The tests' probe device in
//! `pci/tests.rs` is the smallest example:
//!
//! ```ignore
//! impl Pausable for Probe {} // no thread to stop
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct ProbeState { resets: usize }
//!
//! impl Snapshottable for Probe {
//!     type State = ProbeState;
//!     type Error = std::convert::Infallible;
//!     const STATE_VERSION: u32 = 1;
//!     fn save(&self) -> Result<ProbeState, Self::Error> { /* ... */ }
//!     fn restore(&mut self, state: ProbeState) -> Result<(), Self::Error> { /* ... */ }
//! }
//! ```
//!
//! Everything in a descriptor chain comes from the guest and is hostile: a
//! device checks every length, direction and address and answers a bad
//! request with the virtio error status (or marks itself as needing a
//! reset), logging one line — it never panics on guest input.

pub mod balloon;
pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
mod test_driver;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{DynSnapshottable, Pausable};
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueT};

/// Feature bits shared by every device (virtio 1.2 §6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// virtio device ids (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were used on queue `n`.
    Queue(u16),
    /// The device configuration space changed.
    Config,
}

/// How a device raises interrupts; the transport decides whether that is
/// an MSI-X message or the legacy INTx line with the ISR bits.
pub trait Interrupt: Send + Sync {
    fn signal(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// One queue the driver has set up and enabled.
pub struct ActiveQueue {
    /// The queue's index in the device (0 = first queue).
    pub index: u16,
    pub queue: Queue,
    /// Signalled by the transport each time the driver notifies the queue.
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub memory: GuestMemory,
    /// The enabled queues, in index order. Queues the driver left disabled
    /// are absent.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn Interrupt>,
    /// The features the driver accepted (a subset of the offered ones).
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues, the device needs {need}")]
    MissingQueues { need: usize, got: usize },
    #[error("cannot start the device thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create the rate limiter's timer: {0}")]
    RateTimer(#[source] std::io::Error),
    #[error("TAP offloads: {0}")]
    Tap(#[source] net::TapError),
    #[error("{path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Take the queues with `indices`, in that order, from an activation's
/// queues (others are dropped); [`ActivateError::MissingQueues`] when the
/// driver did not enable one of them.
pub fn take_queues<const N: usize>(
    queues: Vec<ActiveQueue>,
    indices: [u16; N],
) -> Result<[ActiveQueue; N], ActivateError> {
    let got = queues.len();
    let mut slots: [Option<ActiveQueue>; N] = std::array::from_fn(|_| None);
    for q in queues {
        if let Some(pos) = indices.iter().position(|&i| i == q.index) {
            slots[pos] = Some(q);
        }
    }
    let missing = || ActivateError::MissingQueues { need: N, got };
    let found: Vec<ActiveQueue> = slots
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(missing)?;
    found.try_into().map_err(|_| missing())
}

/// A virtio device model, independent of the transport.
///
/// It joins snapshots and migration through its supertraits:
/// [`Pausable`] (stop its thread without losing a request; a disk also
/// flushes, so that what the guest wrote is durable) and
/// [`Snapshottable`](vireo_vmcore::snapshot::device::Snapshottable)
/// (its own typed state, beyond its queues and features, which the
/// transport saves, and beyond what its options give). The transport
/// pauses, saves and restores it; nothing else is needed.
///
/// When paused, every request taken from a queue was completed; buffers
/// the device holds unused (receive buffers) are re-read from the avail
/// ring by a restored device. Its state is saved while paused (or never
/// activated) and restored into a device built from the same options,
/// before it is activated in the restored state.
pub trait VirtioDevice: Send + Pausable + DynSnapshottable {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// A short name for log lines ("virtio-blk root").
    fn name(&self) -> String;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The feature bits offered to the driver, [`features::VERSION_1`]
    /// included.
    fn features(&self) -> u64;
    /// Read the device-specific configuration space. Bytes beyond it read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration space; read-only fields
    /// ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "{}: ignored write of {} bytes to configuration offset {offset:#x}",
            self.name(),
            data.len()
        );
    }
    /// Start processing the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stop processing (joining any device thread) and return to the state
    /// before activation; the driver may set the device up again.
    fn reset(&mut self);
}

/// Copy `src` (a configuration structure) into `data` from `offset`,
/// reading zeros past its end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < src.len() {
        let n = data.len().min(src.len() - start);
        data[..n].copy_from_slice(&src[start..start + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let src = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&src, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&src, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&src, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
