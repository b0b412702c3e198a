//! Guest physical memory: anonymous host mappings (vm-memory's
//! `GuestMemoryMmap`) laid out around the 32-bit MMIO hole.

use vireo_api::units::MemorySize;
use vm_memory::GuestAddress;

use crate::layout;

/// Guest memory; each region's [`AtomicBitmap`] records the pages written
/// through vm-memory (by devices), for dirty page tracking.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub use vm_memory::bitmap::AtomicBitmap;
pub use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} of guest memory: {reason}")]
    Map { size: MemorySize, reason: String },
}

/// Where a guest's RAM is: from 0 up to the 32-bit MMIO hole, and the rest
/// from 4 GiB. Guest memory, the E820 table, the CMOS, snapshots and
/// migration all read it from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    size: MemorySize,
}

impl RamLayout {
    pub const fn new(size: MemorySize) -> RamLayout {
        RamLayout { size }
    }

    /// The RAM the guest has.
    pub const fn size(&self) -> MemorySize {
        self.size
    }

    /// Bytes of RAM below the MMIO hole (from address 0): also where low
    /// RAM ends.
    pub fn below_hole(&self) -> u64 {
        self.size.bytes().min(layout::MMIO_HOLE_START)
    }

    /// Bytes of RAM from 4 GiB up (0 for a guest that fits below the hole).
    pub fn above_4g(&self) -> u64 {
        self.size.bytes() - self.below_hole()
    }

    /// The guest physical address just past the highest byte of RAM.
    pub fn top(&self) -> u64 {
        match self.above_4g() {
            0 => self.below_hole(),
            above => layout::MMIO_HOLE_END + above,
        }
    }

    /// The RAM ranges, (start, length) in address order: below the hole,
    /// then above 4 GiB if there is more.
    pub fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        let mut ranges = vec![(GuestAddress(0), self.below_hole())];
        if self.above_4g() > 0 {
            ranges.push((GuestAddress(layout::MMIO_HOLE_END), self.above_4g()));
        }
        ranges
    }
}

/// Map the guest RAM `ram` lays out (lazily backed: pages are only
/// allocated when the guest touches them).
pub fn create_guest_memory(ram: &RamLayout) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram
        .ranges()
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size: ram.size(),
        reason: e.to_string(),
    })
}

/// Host mapping of each region, for the hypervisor: (guest address, size, host address).
pub fn host_mappings(mem: &GuestMemory) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect()
}

/// Per region (in `mem.iter()` order, which is slot order): the pages
/// written through vm-memory since the last call, cleared.
pub fn take_device_dirty(mem: &GuestMemory) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
        .collect()
}

/// `mib` MiB of guest memory, for tests.
#[cfg(test)]
pub(crate) fn test_memory(mib: u64) -> GuestMemory {
    create_guest_memory(&RamLayout::new(MemorySize::mib_const(mib))).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_writes_are_tracked_per_region() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = test_memory(4);
        take_device_dirty(&mem);
        mem.write_obj(0xdead_beefu32, GuestAddress(3 * 4096 + 10))
            .unwrap();
        mem.write_slice(&[1u8; 4097], GuestAddress(100 * 4096))
            .unwrap();
        let dirty = take_device_dirty(&mem);
        let pages: Vec<u64> = vireo_hypervisor::dirty::dirty_pages(&dirty[0]).collect();
        assert_eq!(pages, vec![3, 100, 101]);
        assert!(take_device_dirty(&mem)[0].iter().all(|w| *w == 0));
    }

    #[test]
    fn small_memory_is_one_range() {
        let ram = RamLayout::new(MemorySize::mib_const(256));
        assert_eq!(ram.ranges(), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!((ram.below_hole(), ram.above_4g()), (256 << 20, 0));
        assert_eq!(ram.top(), 256 << 20);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let ram = RamLayout::new(MemorySize::mib_const(4 << 10));
        let r = ram.ranges();
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 1 << 30));
        assert_eq!((ram.below_hole(), ram.above_4g()), (3 << 30, 1 << 30));
        assert_eq!(ram.top(), 5 << 30);
    }
}
