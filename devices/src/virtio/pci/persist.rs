//! The transport's part of the device lifecycle: pausing the device model
//! and saving the common virtio state (status, features, queues, MSI-X,
//! PCI configuration space) around the device's own typed state, so a
//! virtio device adds only what is its own.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vireo_vmcore::snapshot::device::{DeviceStateError, Pausable, SavedState, Snapshottable};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{features, lock, status, VirtioPciDevice, VirtioPciError, NO_VECTOR};
use crate::pci::config::{ConfigError, COMMAND_INTX_DISABLE};
use crate::pci::msix::{MsixError, MsixState};

/// One queue as a snapshot saves it (see [`VirtioPciDevice`]'s
/// [`Snapshottable::save`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    /// MSI-X vector (0xffff: none).
    pub vector: u16,
}

/// A virtio PCI function's saved state: transport, PCI configuration
/// space, MSI-X and the device model's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// The features the device offered (must match on restore).
    pub device_features: u64,
    /// The 256-byte PCI configuration space (BARs, command, capabilities).
    pub pci_config: Vec<u8>,
    pub status: u8,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub config_generation: u8,
    /// The device was running (DRIVER_OK and activated).
    pub active: bool,
    pub config_vector: u16,
    pub isr: u8,
    pub msix: MsixState,
    pub queues: Vec<QueueSnapshot>,
    /// The device model's own [`Snapshottable::State`].
    pub device: SavedState,
}

/// Why a transport's state cannot be saved or does not fit.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("{0}: saved while running; pause it first")]
    NotPaused(String),
    #[error("{name}: queue {index}: cannot read the used ring: {source}")]
    UsedRing {
        name: String,
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("{0}: restore into a device the driver already set up")]
    AlreadySetUp(String),
    #[error("saved virtio device type {saved} is not this {name} (type {here})")]
    DeviceType { name: String, saved: u32, here: u32 },
    #[error("{name}: the saved device offered features {saved:#x}, this one offers {offered:#x} (was it started with other options?)")]
    Features {
        name: String,
        saved: u64,
        offered: u64,
    },
    #[error("{name}: saved driver features {driver:#x} were never offered")]
    DriverFeatures { name: String, driver: u64 },
    #[error("{name}: {saved} queues saved, the device has {here}")]
    QueueCount {
        name: String,
        saved: usize,
        here: usize,
    },
    #[error("{name}: a saved MSI-X vector is beyond the {vectors}-entry table")]
    Vector { name: String, vectors: u16 },
    #[error("{name}: saved queue {index}: {source}")]
    Queue {
        name: String,
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("{name}: saved queue {index} (size {size}, rings at {desc:#x}/{avail:#x}/{used:#x}) is not valid in guest memory")]
    QueueOutsideMemory {
        name: String,
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    #[error("{name}: {source}")]
    Config {
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error("{name}: {source}")]
    Msix {
        name: String,
        #[source]
        source: MsixError,
    },
    #[error("{name}: {source}")]
    Device {
        name: String,
        #[source]
        source: DeviceStateError,
    },
    #[error("{0}: saved as running without DRIVER_OK")]
    RunningWithoutDriverOk(String),
    #[error("{name}: cannot start in the saved state: {source}")]
    Start {
        name: String,
        #[source]
        source: VirtioPciError,
    },
    #[error("{name}: INTx: {source}")]
    Intx {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Quiescing the device for a snapshot: its thread stops with every
/// request it took completed, and a disk flushes. Guest accesses to the
/// transport still work (the vCPUs are expected to be paused too).
impl Pausable for VirtioPciDevice {
    fn pause(&mut self) {
        if !self.paused {
            // Also when not active: a disk the driver reset still flushes.
            self.device.pause();
        }
        self.paused = true;
    }

    fn resume(&mut self) {
        if self.paused {
            self.device.resume();
        }
        self.paused = false;
    }
}

impl Snapshottable for VirtioPciDevice {
    type State = TransportState;
    type Error = TransportStateError;
    const STATE_VERSION: u32 = 1;

    /// The transport's and the device's state; a running device must be
    /// paused first.
    ///
    /// An active queue is saved with `next_avail` = `next_used` = the used
    /// ring's index in guest memory: requests the device completed are
    /// behind it, and chains it took but holds unused (receive buffers)
    /// are ahead of it, so a restored device reads them from the avail
    /// ring again and none is lost. (Every device completes the chains of
    /// a queue in the order it took them.)
    fn save(&self) -> Result<TransportState, TransportStateError> {
        let name = || self.device.name();
        if self.active && !self.paused {
            return Err(TransportStateError::NotPaused(name()));
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, slot) in self.queues.iter().enumerate() {
            let st = slot.queue.state();
            let (next_avail, next_used) = if self.active && st.ready {
                let used = slot
                    .queue
                    .used_idx(&self.memory, Ordering::Acquire)
                    .map_err(|source| TransportStateError::UsedRing {
                        name: name(),
                        index,
                        source,
                    })?;
                (used.0, used.0)
            } else {
                (st.next_avail, st.next_used)
            };
            queues.push(QueueSnapshot {
                size: st.size,
                ready: st.ready,
                desc_table: st.desc_table,
                avail_ring: st.avail_ring,
                used_ring: st.used_ring,
                next_avail,
                next_used,
                event_idx: self.active && event_idx,
                vector: self.interrupts.queue_vectors[index].load(Ordering::Acquire),
            });
        }
        let device = self
            .device
            .save_dyn()
            .map_err(|source| TransportStateError::Device {
                name: name(),
                source,
            })?;
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features: self.device.features(),
            pci_config: self.config.bytes().to_vec(),
            status: self.status,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            active: self.active,
            config_vector: self.interrupts.config_vector.load(Ordering::Acquire),
            isr: self.interrupts.isr.load(Ordering::Acquire),
            msix: lock(&self.interrupts.msix).save(),
            queues,
            device,
        })
    }

    /// Put a freshly built transport (same device kind and options, guest
    /// memory already restored) in the saved state and, if the driver had
    /// the device running, start it there: no re-negotiation, the queues
    /// carry on from the saved ring positions, and ioeventfds follow the
    /// restored BAR. Everything is checked against this device first; an
    /// error says what does not fit.
    fn restore(&mut self, s: TransportState) -> Result<(), TransportStateError> {
        let name = self.device.name();
        if self.active || self.status != 0 {
            return Err(TransportStateError::AlreadySetUp(name));
        }
        if s.device_type != self.device.device_type() {
            return Err(TransportStateError::DeviceType {
                name,
                saved: s.device_type,
                here: self.device.device_type(),
            });
        }
        let offered = self.device.features();
        if s.device_features != offered {
            return Err(TransportStateError::Features {
                name,
                saved: s.device_features,
                offered,
            });
        }
        if s.driver_features & !offered != 0 {
            return Err(TransportStateError::DriverFeatures {
                name,
                driver: s.driver_features,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                name,
                saved: s.queues.len(),
                here: self.queues.len(),
            });
        }
        let vectors = lock(&self.interrupts.msix).vectors();
        let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
        if !vector_ok(s.config_vector) || !s.queues.iter().all(|q| vector_ok(q.vector)) {
            return Err(TransportStateError::Vector { name, vectors });
        }
        let mut restored = Vec::with_capacity(self.queues.len());
        for (index, (slot, q)) in self.queues.iter().zip(&s.queues).enumerate() {
            let queue = Queue::try_from(QueueState {
                max_size: slot.queue.max_size(),
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|source| TransportStateError::Queue {
                name: name.clone(),
                index,
                source,
            })?;
            if q.ready && s.active && !queue.is_valid(&self.memory) {
                return Err(TransportStateError::QueueOutsideMemory {
                    name,
                    index,
                    size: q.size,
                    desc: q.desc_table,
                    avail: q.avail_ring,
                    used: q.used_ring,
                });
            }
            restored.push(queue);
        }
        self.config
            .restore(&s.pci_config)
            .map_err(|source| TransportStateError::Config {
                name: name.clone(),
                source,
            })?;
        lock(&self.interrupts.msix)
            .restore(&s.msix)
            .map_err(|source| TransportStateError::Msix {
                name: name.clone(),
                source,
            })?;
        self.device
            .restore_dyn(s.device)
            .map_err(|source| TransportStateError::Device {
                name: name.clone(),
                source,
            })?;
        for (slot, queue) in self.queues.iter_mut().zip(restored) {
            slot.queue = queue;
            let _ = slot.notify.read();
        }
        for (v, q) in self.interrupts.queue_vectors.iter().zip(&s.queues) {
            v.store(q.vector, Ordering::Release);
        }
        self.interrupts
            .config_vector
            .store(s.config_vector, Ordering::Release);
        self.interrupts.isr.store(s.isr, Ordering::Release);
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.update_ioevents();
        if s.active {
            if s.status & status::DRIVER_OK == 0 {
                return Err(TransportStateError::RunningWithoutDriverOk(name));
            }
            self.activate()
                .map_err(|source| TransportStateError::Start {
                    name: name.clone(),
                    source,
                })?;
            // Requests the driver posted before the snapshot (and chains
            // the old device held) are waiting in the avail rings.
            for slot in self.queues.iter().filter(|q| q.queue.ready()) {
                let _ = slot.notify.write(1);
            }
        }
        self.status = s.status;
        // A level-triggered INTx the driver had not acknowledged yet.
        let msix_on = lock(&self.interrupts.msix).enabled();
        if s.isr != 0 && !msix_on && self.config.command() & COMMAND_INTX_DISABLE == 0 {
            if let Some(line) = &self.interrupts.intx {
                line.set_level(true)
                    .map_err(|source| TransportStateError::Intx { name, source })?;
            }
        }
        Ok(())
    }
}
