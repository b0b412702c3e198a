//! The I/O-port and MMIO buses: address ranges mapped to device models.
//!
//! A bus is built before the vCPUs start and is then shared, read-only, by
//! every vCPU thread; each device sits behind its own lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device model reached through port or memory-mapped I/O. `offset` is
/// relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps one already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {0:#x} is empty or wraps around")]
    BadRange(u64),
}

#[derive(Default)]
pub struct Bus {
    /// Keyed by base address; value is (length, device).
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset + size as u64 <= *len).then_some((offset, dev))
    }

    /// Dispatch a read; false when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device that panicked while holding its lock has already been reported;
/// keep serving the others rather than poisoning the whole VM.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3f8, &[0x20]));
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 0x20);
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(0x70, 2, Arc::new(Mutex::new(Echo(0)))).unwrap();
        let mut w = [0u8; 4];
        assert!(!bus.read(0x70, &mut w));
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        assert!(bus.insert(0x108, 4, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(0xf8, 0x10, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        assert!(bus.insert(0x110, 4, Arc::new(Mutex::new(Echo(0)))).is_ok());
        assert!(bus.insert(0x200, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0))))
            .is_err());
    }
}
