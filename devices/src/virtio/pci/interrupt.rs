//! Interrupt routing of a virtio PCI function: MSI-X when the driver
//! enabled it, else the ISR bits and the level-triggered INTx line.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vireo_hypervisor::InterruptLine;

use super::{lock, ISR_CONFIG, ISR_QUEUE, NO_VECTOR};
use crate::pci::msix::Msix;
use crate::virtio::{Interrupt, InterruptKind};

/// Interrupt routing shared by the transport and the device's thread.
pub(super) struct InterruptState {
    pub(super) msix: Mutex<Msix>,
    /// MSI-X vector of each queue, then of configuration changes.
    pub(super) queue_vectors: Vec<AtomicU16>,
    pub(super) config_vector: AtomicU16,
    pub(super) isr: AtomicU8,
    pub(super) intx: Option<Arc<dyn InterruptLine>>,
}

impl Interrupt for InterruptState {
    fn signal(&self, kind: InterruptKind) -> std::io::Result<()> {
        let (vector, isr_bit) = match kind {
            InterruptKind::Queue(q) => (
                self.queue_vectors
                    .get(usize::from(q))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
                ISR_QUEUE,
            ),
            InterruptKind::Config => (self.config_vector.load(Ordering::Acquire), ISR_CONFIG),
        };
        let mut msix = lock(&self.msix);
        if msix.enabled() {
            if vector != NO_VECTOR {
                msix.trigger(vector);
            }
            return Ok(());
        }
        drop(msix);
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        match &self.intx {
            Some(line) => line.set_level(true),
            None => Ok(()),
        }
    }
}

impl InterruptState {
    /// The driver read the ISR: it clears, and INTx drops.
    pub(super) fn read_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::AcqRel);
        if v != 0 {
            if let Some(line) = &self.intx {
                if let Err(e) = line.set_level(false) {
                    tracing::warn!("virtio INTx: cannot deassert: {e}");
                }
            }
        }
        v
    }
}
