//! The common configuration structure in BAR 0 (virtio 1.2 §4.1.4.3):
//! feature selection, status, the MSI-X vectors and each queue's size,
//! rings and enable bit, as the driver reads and writes them.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;

use super::{lock, status, QueueSlot, VirtioPciDevice, NO_VECTOR};

impl VirtioPciDevice {
    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupts.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self
                .selected_queue()
                .map_or(0, |q| u64::from(q.queue.size())),
            (0x1a, 2) => self
                .interrupts
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            (0x1c, 2) => self
                .selected_queue()
                .map_or(0, |q| u64::from(q.queue.ready())),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4 | 8) => {
                let Some(q) = self.selected_queue() else {
                    data.fill(0);
                    return;
                };
                let field = match offset & !7 {
                    0x20 => q.queue.desc_table(),
                    0x28 => q.queue.avail_ring(),
                    _ => q.queue.used_ring(),
                };
                if offset & 4 != 0 {
                    field >> 32
                } else {
                    field
                }
            }
            _ => {
                tracing::debug!(
                    "{}: unexpected {}-byte read of common configuration at {offset:#x}",
                    self.device.name(),
                    data.len()
                );
                0
            }
        };
        // Accesses wider than 8 bytes (an emulated SSE load) read the
        // value zero-extended.
        let bytes = v.to_le_bytes();
        let n = data.len().min(bytes.len());
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(b);
        // Queue setup is only allowed before DRIVER_OK (§4.1.4.3.2).
        let queue_locked = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => {
                if self.status & status::FEATURES_OK != 0 {
                    tracing::warn!(
                        "{}: feature write after FEATURES_OK ignored",
                        self.device.name()
                    );
                    return;
                }
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            (0x10, 2) => self
                .interrupts
                .config_vector
                .store(self.checked_vector(v as u16), Ordering::Release),
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !queue_locked => {
                if let Some(q) = self.selected_queue() {
                    // An invalid size is kept out; the queue then fails
                    // validation at DRIVER_OK.
                    if q.queue.try_set_size(v as u16).is_err() {
                        tracing::warn!("virtio: queue size {v} refused");
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(v as u16);
                if let Some(slot) = self
                    .interrupts
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(vector, Ordering::Release);
                }
            }
            (0x1c, 2) if !queue_locked => {
                if v == 1 {
                    if let Some(q) = self.selected_queue() {
                        q.queue.set_ready(true);
                    }
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4 | 8) if !queue_locked => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let (low, high) = match (offset & 4 != 0, data.len()) {
                    (false, 8) => (Some(v as u32), Some((v >> 32) as u32)),
                    (false, _) => (Some(v as u32), None),
                    (true, _) => (None, Some(v as u32)),
                };
                match offset & !7 {
                    0x20 => q.queue.set_desc_table_address(low, high),
                    0x28 => q.queue.set_avail_ring_address(low, high),
                    _ => q.queue.set_used_ring_address(low, high),
                }
            }
            _ => tracing::debug!(
                "{}: ignored {}-byte write of common configuration at {offset:#x}",
                self.device.name(),
                data.len()
            ),
        }
    }

    /// A vector the table has, or NO_VECTOR (which the driver reads back
    /// to learn the assignment failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if v == NO_VECTOR || v < lock(&self.interrupts.msix).vectors() {
            v
        } else {
            NO_VECTOR
        }
    }
}
