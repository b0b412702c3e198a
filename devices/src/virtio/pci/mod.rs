//! The virtio-over-PCI transport, modern interface only (virtio 1.2 §4.1):
//! the common, notify, ISR and device configuration structures in BAR 0,
//! found through vendor capabilities, with MSI-X (table and PBA in the same
//! BAR) and INTx as the fallback when the driver does not enable MSI-X.
//!
//! BAR 0 layout:
//! ```text
//! 0x0000 common configuration     0x3000 notifications (4 bytes per queue)
//! 0x1000 ISR status               0x4000 MSI-X table
//! 0x2000 device configuration     0x6000 MSI-X pending bits
//! ```

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vireo_hypervisor::InterruptLine;
use vireo_vmcore::memory::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, Activation, ActiveQueue, Interrupt, InterruptKind, VirtioDevice};
use crate::pci::config::{ClassCode, PciConfig, PciIdentity, COMMAND, COMMAND_INTX_DISABLE};
use crate::pci::msix::{MsiSender, Msix};
use crate::pci::{IoEventRegistrar, PciDevice};

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device id.
const DEVICE_ID_BASE: u16 = 0x1040;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have here (the notify area is 0x1000 bytes).
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_MULTIPLIER as usize;

const CAP_VENDOR: u8 = 0x09;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const CFG_TYPE_PCI: u8 = 5;

pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (§2.1).
mod common_config;
mod interrupt;
mod persist;
use interrupt::InterruptState;
pub use persist::{QueueSnapshot, TransportState, TransportStateError};

pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The PCI class a device of `device_type` reports.
fn class_of(device_type: u32) -> ClassCode {
    let (class, subclass) = match device_type {
        super::device_type::NET => (0x02, 0x00),
        super::device_type::BLOCK => (0x01, 0x80),
        super::device_type::CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    };
    ClassCode {
        class,
        subclass,
        prog_if: 0,
    }
}

/// Transport-side state of one queue.
struct QueueSlot {
    queue: Queue,
    notify: EventFd,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemory,
    interrupts: Arc<InterruptState>,
    msix_cap_offset: usize,
    pci_cfg_cap_offset: usize,
    queues: Vec<QueueSlot>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    status: u8,
    config_generation: u8,
    active: bool,
    /// The device thread is stopped for a snapshot (see [`persist`]).
    paused: bool,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    /// BAR 0 base the notify eventfds are registered at.
    ioevents_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("{name}: {count} queues is more than the transport's {MAX_QUEUES}")]
    TooManyQueues { name: String, count: usize },
    #[error(
        "{name}: queue {index} has an invalid maximum size {size} (a power of two up to 32768)"
    )]
    BadQueueSize {
        name: String,
        index: usize,
        size: u16,
    },
    #[error("{0}: the device does not offer VIRTIO_F_VERSION_1, which the modern transport needs")]
    NotModern(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("PCI configuration: {0}")]
    Config(#[from] crate::pci::config::ConfigError),
    #[error("queue {index} is invalid (size {size}, rings at {desc:#x}/{avail:#x}/{used:#x} outside guest memory or misaligned)")]
    InvalidQueue {
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    #[error("queue {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error(transparent)]
    Activate(#[from] super::ActivateError),
}

impl VirtioPciDevice {
    /// Wrap `device` for the PCI bus with BAR 0 at `bar_addr` (from
    /// `PciBus::allocate_bar(BAR_SIZE)`), MSI-X messages through `msi` and
    /// INTx on `intx` (with its IRQ number `intx_irq` for the interrupt
    /// line register).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        bar_addr: u32,
        msi: Arc<dyn MsiSender>,
        intx: Option<(Arc<dyn InterruptLine>, u8)>,
    ) -> Result<VirtioPciDevice, VirtioPciError> {
        let name = device.name();
        let sizes = device.queue_max_sizes();
        if sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues {
                name,
                count: sizes.len(),
            });
        }
        if device.features() & features::VERSION_1 == 0 {
            return Err(VirtioPciError::NotModern(name));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| VirtioPciError::BadQueueSize {
                name: name.clone(),
                index,
                size,
            })?;
            let notify = EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?;
            queues.push(QueueSlot { queue, notify });
        }
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.add_memory_bar(0, BAR_SIZE, bar_addr)?;
        let vectors = sizes.len() as u16 + 1;
        let msix = Msix::new(vectors, msi);
        let (cap, mask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap_offset = config.add_capability(&cap, &mask)?;
        let notify_len = (sizes.len().max(1) as u32) * NOTIFY_MULTIPLIER;
        config.add_capability(
            &vendor_cap(CFG_TYPE_COMMON, COMMON_OFFSET, COMMON_LEN as u32, None),
            &[],
        )?;
        config.add_capability(
            &vendor_cap(
                CFG_TYPE_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        )?;
        config.add_capability(&vendor_cap(CFG_TYPE_ISR, ISR_OFFSET, 1, None), &[])?;
        config.add_capability(
            &vendor_cap(
                CFG_TYPE_DEVICE,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN as u32,
                None,
            ),
            &[],
        )?;
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through
        // configuration space; bar, offset, length and data are writable.
        let pci_cfg = vendor_cap(CFG_TYPE_PCI, 0, 0, Some(0));
        let mut pci_cfg_mask = vec![0u8; 20];
        pci_cfg_mask[4] = 0xff;
        pci_cfg_mask[8..20].fill(0xff);
        let pci_cfg_cap_offset = config.add_capability(&pci_cfg, &pci_cfg_mask)?;
        let intx_line = match intx {
            Some((line, irq)) => {
                config.set_interrupt_pin(1, irq);
                Some(line)
            }
            None => None,
        };
        Ok(VirtioPciDevice {
            config,
            memory,
            interrupts: Arc::new(InterruptState {
                msix: Mutex::new(msix),
                queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
                config_vector: AtomicU16::new(NO_VECTOR),
                isr: AtomicU8::new(0),
                intx: intx_line,
            }),
            device,
            msix_cap_offset,
            pci_cfg_cap_offset,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            active: false,
            paused: false,
            ioevents: None,
            ioevents_at: None,
        })
    }

    /// Let the hypervisor signal the queue-notify eventfds itself (KVM
    /// ioeventfd) wherever the guest puts BAR 0.
    pub fn set_ioevent_registrar(&mut self, registrar: Arc<dyn IoEventRegistrar>) {
        self.ioevents = Some(registrar);
        self.update_ioevents();
    }

    /// Follow BAR 0 (and memory decoding) with the ioeventfd registrations.
    fn update_ioevents(&mut self) {
        let Some(reg) = self.ioevents.clone() else {
            return;
        };
        let now = self.config.bar_range(0).map(|(base, _)| base);
        if now == self.ioevents_at {
            return;
        }
        if let Some(old) = self.ioevents_at.take() {
            for (q, slot) in self.queues.iter().enumerate() {
                let addr = old + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = reg.unregister(addr, &slot.notify) {
                    tracing::warn!("{}: ioeventfd at {addr:#x}: {e}", self.device.name());
                }
            }
        }
        let Some(base) = now else {
            return;
        };
        for (q, slot) in self.queues.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            match reg.register(addr, &slot.notify) {
                Ok(true) => {}
                Ok(false) => {
                    // No fast path on this backend: notifications come as MMIO.
                    self.ioevents = None;
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        "{}: ioeventfd at {addr:#x}: {e}; notifications take the slow path",
                        self.device.name()
                    );
                }
            }
        }
        self.ioevents_at = Some(base);
    }

    pub fn name(&self) -> String {
        self.device.name()
    }

    /// The device model (to reach its host-side configuration).
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The eventfd signalled when the driver notifies queue `index` (for
    /// registering as a KVM ioeventfd).
    pub fn notify_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.queues.get(index).map(|q| &q.notify)
    }

    /// Tell the driver the device configuration changed.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupts.signal(InterruptKind::Config) {
            tracing::warn!("{}: configuration interrupt: {e}", self.device.name());
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.queue.reset();
            // Drain a stale notification so the next activation starts clean.
            let _ = q.notify.read();
        }
        for v in &self.interrupts.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.interrupts
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        self.interrupts.read_isr();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let name = self.device.name();
        let mut new = new;
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                tracing::warn!(
                    "{name}: driver accepted features {:#x} (not offered: {unknown:#x}); FEATURES_OK refused",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 && !self.active {
            if new & status::FEATURES_OK == 0 {
                tracing::warn!("{name}: DRIVER_OK without FEATURES_OK; device needs a reset");
                new |= status::NEEDS_RESET;
            } else if let Err(e) = self.activate() {
                tracing::warn!("{name}: cannot start: {e}; device needs a reset");
                new |= status::NEEDS_RESET;
                self.status = new;
                self.config_changed();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), VirtioPciError> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter_mut().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(&self.memory) {
                return Err(VirtioPciError::InvalidQueue {
                    index,
                    size: slot.queue.size(),
                    desc: slot.queue.desc_table(),
                    avail: slot.queue.avail_ring(),
                    used: slot.queue.used_ring(),
                });
            }
            slot.queue.set_event_idx(event_idx);
            let notify = slot.notify.try_clone().map_err(VirtioPciError::EventFd)?;
            let queue = Queue::try_from(slot.queue.state())
                .map_err(|source| VirtioPciError::Queue { index, source })?;
            queues.push(ActiveQueue {
                index: index as u16,
                queue,
                notify,
            });
        }
        self.device.activate(Activation {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupts.clone(),
            features: self.driver_features,
        })?;
        self.active = true;
        Ok(())
    }

    fn notify(&self, offset: u64) {
        let index = (offset / u64::from(NOTIFY_MULTIPLIER)) as usize;
        match self.queues.get(index) {
            Some(q) => {
                if let Err(e) = q.notify.write(1) {
                    tracing::warn!("{}: queue {index} notify: {e}", self.device.name());
                }
            }
            None => tracing::debug!("{}: notify of missing queue {index}", self.device.name()),
        }
    }

    /// The window of VIRTIO_PCI_CAP_PCI_CFG: (bar, offset, length) as the
    /// driver last wrote them.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let c = &self.config.bytes()[self.pci_cfg_cap_offset..];
        let bar = c[4];
        let offset = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
        let length = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
        (bar, u64::from(offset), length as usize)
    }
}

/// A virtio vendor capability (§4.1.4): cfg_type, BAR 0, offset, length
/// and, for notifications, the offset multiplier.
fn vendor_cap(cfg_type: u8, offset: u64, length: u32, multiplier: Option<u32>) -> Vec<u8> {
    let mut cap = vec![0u8; 16];
    cap[0] = CAP_VENDOR;
    cap[2] = if multiplier.is_some() { 20 } else { 16 };
    cap[3] = cfg_type;
    cap[4] = 0; // BAR 0
    cap[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    cap[12..16].copy_from_slice(&length.to_le_bytes());
    if let Some(m) = multiplier {
        cap.extend_from_slice(&m.to_le_bytes());
    }
    cap
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let data_off = (self.pci_cfg_cap_offset + 16) as u64;
        if offset == data_off && data.len() <= 4 {
            let (bar, off, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                data.fill(0);
                self.bar_read(0, off, &mut data[..len]);
                return;
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let data_off = (self.pci_cfg_cap_offset + 16) as u64;
        if offset == data_off && data.len() <= 4 {
            let (bar, off, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                self.bar_write(0, off, &data[..len]);
            }
            return;
        }
        self.config.write(offset, data);
        let ctl_off = self.msix_cap_offset + 2;
        let end = offset + data.len() as u64;
        if offset < ctl_off as u64 + 2 && end > ctl_off as u64 {
            let c = self.config.bytes();
            let control = u16::from_le_bytes([c[ctl_off], c[ctl_off + 1]]);
            lock(&self.interrupts.msix).set_control(control);
        }
        self.update_ioevents();
        if offset <= COMMAND as u64 + 1 && end > COMMAND as u64 {
            // INTx disable drops the line.
            if self.config.command() & COMMAND_INTX_DISABLE != 0 {
                if let Some(line) = &self.interrupts.intx {
                    let _ = line.set_level(false);
                }
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o - COMMON_OFFSET, data),
            o if o == ISR_OFFSET && data.len() == 1 => data[0] = self.interrupts.read_isr(),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.interrupts.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.interrupts.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + 0x1000).contains(&o) => {
                self.notify(o - NOTIFY_OFFSET)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.interrupts.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => tracing::debug!(
                "{}: ignored {}-byte write at BAR 0 + {offset:#x}",
                self.device.name(),
                data.len()
            ),
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests;
