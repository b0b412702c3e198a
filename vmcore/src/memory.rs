//! Guest physical memory: anonymous host mappings (vm-memory's
//! `GuestMemoryMmap`) laid out around the 32-bit MMIO hole.

use vm_memory::GuestAddress;

use crate::layout;

/// Guest memory; each region's [`AtomicBitmap`] records the pages written
/// through vm-memory (by devices), for dirty page tracking.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub use vm_memory::bitmap::AtomicBitmap;
pub use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {reason}")]
    Map { mib: u64, reason: String },
}

/// The guest RAM ranges for `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(layout::MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// Map `size` bytes of guest RAM (lazily backed: pages are only allocated
/// when the guest touches them).
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(|e| MemoryError::Map {
        mib: size >> 20,
        reason: e.to_string(),
    })
}

/// End of RAM below the MMIO hole.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().0 == 0)
        .map(|r| r.len())
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_writes_are_tracked_per_region() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_guest_memory(4 << 20).unwrap();
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
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 1 << 30));
    }
}
