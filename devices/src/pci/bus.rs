//! One PCI bus: slots, configuration mechanism #1 and the MMIO window.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vireo_vmcore::bus::{BusDevice, SharedDevice};

use super::config::BAR_COUNT;
use super::PciDevice;

pub const SLOTS: usize = 32;

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("all {SLOTS} PCI slots are in use")]
    NoFreeSlot,
    #[error("the PCI MMIO window has no room for a BAR of {0:#x} bytes")]
    NoBarSpace(u64),
}

/// Bus 0 with its devices and the allocator for the MMIO window.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    window_start: u64,
    window_end: u64,
    next_bar: u64,
}

impl PciBus {
    /// A bus whose BARs live in `[window_start, window_start + window_len)`.
    pub fn new(window_start: u64, window_len: u64) -> PciBus {
        PciBus {
            slots: vec![None; SLOTS],
            window_start,
            window_end: window_start + window_len,
            next_bar: window_start,
        }
    }

    /// The next free slot number.
    pub fn free_slot(&self) -> Result<u8, PciBusError> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|s| s as u8)
            .ok_or(PciBusError::NoFreeSlot)
    }

    /// Reserve `size` bytes (a power of two) of the window, aligned to
    /// its size, for a BAR.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u32, PciBusError> {
        let addr = self.next_bar.next_multiple_of(size.max(1));
        let end = addr
            .checked_add(size)
            .filter(|&e| e <= self.window_end)
            .ok_or(PciBusError::NoBarSpace(size))?;
        self.next_bar = end;
        u32::try_from(addr).map_err(|_| PciBusError::NoBarSpace(size))
    }

    /// Put `dev` in `slot` (from [`PciBus::free_slot`]).
    pub fn insert(&mut self, slot: u8, dev: SharedPciDevice) -> Result<(), PciBusError> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(dev);
                Ok(())
            }
            _ => Err(PciBusError::NoFreeSlot),
        }
    }

    pub fn window(&self) -> (u64, u64) {
        (self.window_start, self.window_end - self.window_start)
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// The device and BAR claiming guest address `addr` for `len` bytes.
    fn find_bar(&self, addr: u64, len: usize) -> Option<(&SharedPciDevice, usize, u64)> {
        for dev in self.slots.iter().flatten() {
            let d = lock(dev);
            for bar in 0..BAR_COUNT {
                if let Some((base, size)) = d.config().bar_range(bar) {
                    if addr >= base && addr + len as u64 <= base + size {
                        return Some((dev, bar, addr - base));
                    }
                }
            }
        }
        None
    }
}

pub type SharedPciBus = Arc<Mutex<PciBus>>;

/// Configuration mechanism #1: the address register at 0xCF8 and the data
/// window at 0xCFC-0xCFF, as one 8-byte I/O device. A byte access at 0xCF9
/// is the chipset's reset control register and goes to `reset`.
pub struct PciConfigIo {
    bus: SharedPciBus,
    address: u32,
    reset: Option<SharedDevice>,
}

impl PciConfigIo {
    pub fn new(bus: SharedPciBus, reset: Option<SharedDevice>) -> PciConfigIo {
        PciConfigIo {
            bus,
            address: 0,
            reset,
        }
    }

    /// The address register (CONFIG_ADDRESS) as the guest last wrote it.
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Set the address register (a snapshot's restore).
    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// The selected (device, register) when the enable bit is set.
    fn target(&self, data_offset: u64) -> Option<(SharedPciDevice, u64)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let register = u64::from(self.address & 0xfc) + data_offset;
        let dev = lock(&self.bus).device(bus, slot, function)?.clone();
        Some((dev, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            1 if data.len() == 1 => match &self.reset {
                Some(r) => lock(r).read(0, data),
                None => data.fill(0),
            },
            4..=7 => match self.target(offset - 4) {
                Some((dev, reg)) => lock(&dev).config_read(reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            1 if data.len() == 1 => {
                if let Some(r) = &self.reset {
                    lock(r).write(0, data);
                }
            }
            4..=7 => {
                if let Some((dev, reg)) = self.target(offset - 4) {
                    lock(&dev).config_write(reg, data);
                }
            }
            _ => tracing::debug!(
                "PCI config: ignored {}-byte write at 0xcf8+{offset}",
                data.len()
            ),
        }
    }
}

/// The 32-bit MMIO window: routes each access to the BAR that holds it.
pub struct PciMmioWindow {
    bus: SharedPciBus,
}

impl PciMmioWindow {
    pub fn new(bus: SharedPciBus) -> PciMmioWindow {
        PciMmioWindow { bus }
    }

    fn route(&self, offset: u64, len: usize) -> Option<(SharedPciDevice, usize, u64)> {
        let bus = lock(&self.bus);
        let addr = bus.window_start + offset;
        bus.find_bar(addr, len)
            .map(|(d, bar, off)| (d.clone(), bar, off))
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.route(offset, data.len()) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.route(offset, data.len()) {
            lock(&dev).bar_write(bar, off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{COMMAND, COMMAND_MEMORY};
    use crate::pci::{HostBridge, PciConfig};

    struct Echo {
        config: PciConfig,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Echo {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
    }

    fn cfg_addr(slot: u32, reg: u32) -> [u8; 4] {
        (0x8000_0000 | slot << 11 | reg).to_le_bytes()
    }

    #[test]
    fn mechanism_one_reaches_slots_and_empty_slots_read_ones() {
        let bus = Arc::new(Mutex::new(PciBus::new(0xc000_0000, 0x1000_0000)));
        lock(&bus)
            .insert(0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let mut io = PciConfigIo::new(bus.clone(), None);
        io.write(0, &cfg_addr(0, 0));
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        io.write(0, &cfg_addr(5, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Enable bit clear: nothing selected.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Class code of the host bridge through a 2-byte read at 0xCFE.
        io.write(0, &cfg_addr(0, 8));
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(w, [0x00, 0x06]);
    }

    #[test]
    fn mmio_window_follows_the_bar_the_guest_programs() {
        let bus = Arc::new(Mutex::new(PciBus::new(0xc000_0000, 0x1000_0000)));
        let mut config = HostBridge::new().config;
        let addr = lock(&bus).allocate_bar(0x1000).unwrap();
        assert_eq!(addr, 0xc000_0000);
        config.add_memory_bar(0, 0x1000, addr).unwrap();
        let dev = Arc::new(Mutex::new(Echo { config, last: None }));
        let slot = lock(&bus).free_slot().unwrap();
        lock(&bus).insert(slot, dev.clone()).unwrap();
        let mut win = PciMmioWindow::new(bus.clone());
        let mut d = [0u8; 4];
        win.read(0x10, &mut d);
        assert_eq!(d, [0xff; 4], "decoding is off until the guest enables it");
        let mut io = PciConfigIo::new(bus.clone(), None);
        io.write(0, &cfg_addr(u32::from(slot), COMMAND as u32));
        io.write(4, &COMMAND_MEMORY.to_le_bytes());
        win.read(0x10, &mut d);
        assert_eq!(d, [0x10; 4]);
        // Move the BAR up by 64 KiB.
        io.write(0, &cfg_addr(u32::from(slot), 0x10));
        io.write(4, &0xc001_0000u32.to_le_bytes());
        win.read(0x10, &mut d);
        assert_eq!(d, [0xff; 4]);
        win.write(0x1_0008, &[1, 2]);
        assert_eq!(lock(&dev).last, Some((0, 8, vec![1, 2])));
        // An access straddling the BAR's end goes nowhere.
        win.read(0x1_0ffe, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bar_allocation_is_aligned_and_bounded() {
        let mut bus = PciBus::new(0xc000_0000, 0x10000);
        assert_eq!(bus.allocate_bar(0x100).unwrap(), 0xc000_0000);
        assert_eq!(bus.allocate_bar(0x8000).unwrap(), 0xc000_8000);
        assert_eq!(
            bus.allocate_bar(0x8000),
            Err(PciBusError::NoBarSpace(0x8000))
        );
    }
}
