//! Guest physical memory as the emulator sees it.
//!
//! RAM is a set of regions backed by host memory; every other physical
//! address is MMIO (or unmapped, which the VMM treats the same way) and
//! turns into an MMIO exit. The emulator only ever asks for a host pointer
//! to a range wholly inside one RAM region, so a backend can be anything
//! that can answer [`GuestMemory::host_ptr`].

use std::ptr::NonNull;

/// Page size the MMU and the decode cache work in.
pub const PAGE_SIZE: u64 = 4096;

/// Guest physical memory.
pub trait GuestMemory: Send + Sync {
    /// A host pointer to guest physical `[gpa, gpa + len)` if that range is
    /// RAM and lies inside one region, or `None` for MMIO/unmapped.
    ///
    /// The pointer must stay valid for `len` bytes for as long as this
    /// memory object lives. Guest memory is shared with other vCPUs and
    /// devices, so it may change under the emulator at any time; the
    /// emulator only copies bytes in and out through the pointer.
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>>;

    /// Copy guest RAM into `buf`. Returns false (and copies nothing) if any
    /// byte is not RAM in one region.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host_ptr(gpa, buf.len()) {
            Some(p) => {
                // SAFETY: `host_ptr` promises `buf.len()` valid bytes at `p`;
                // `buf` is a distinct Rust allocation so the ranges do not
                // overlap.
                unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.as_mut_ptr(), buf.len()) };
                true
            }
            None => false,
        }
    }

    /// Record that `[gpa, gpa + len)` is being written through a host
    /// pointer (dirty page tracking; a no-op unless the backend tracks).
    /// Whoever writes guest RAM other than through [`GuestMemory::write`]
    /// calls this first.
    fn mark_dirty(&self, _gpa: u64, _len: usize) {}

    /// Copy `data` into guest RAM. Returns false (and writes nothing) if any
    /// byte is not RAM in one region.
    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.host_ptr(gpa, data.len()) {
            Some(p) => {
                self.mark_dirty(gpa, data.len());
                // SAFETY: as in `read`, with the copy going the other way.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
                true
            }
            None => false,
        }
    }

    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }

    fn write_u64(&self, gpa: u64, v: u64) -> bool {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// One RAM region.
#[derive(Debug)]
struct Region {
    gpa: u64,
    len: u64,
    host: NonNull<u8>,
    /// Set when the region was allocated by [`PhysMemory::add_owned`] and
    /// must be freed with it.
    owned: bool,
}

/// Errors adding RAM regions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("RAM region at {gpa:#x} (+{len:#x}) is not page aligned or is empty")]
    Unaligned { gpa: u64, len: u64 },
    #[error("RAM region at {gpa:#x} (+{len:#x}) overlaps another region")]
    Overlap { gpa: u64, len: u64 },
}

/// A simple [`GuestMemory`]: a list of RAM regions, either borrowed host
/// mappings (what a VMM passes to `Vm::map_memory`) or allocations it owns.
#[derive(Debug, Default)]
pub struct PhysMemory {
    regions: Vec<Region>,
}

// SAFETY: the regions are plain host memory that the owner of this object
// promised stays mapped (see `add_region`); the emulator only copies bytes
// through the pointers, which is how every VMM shares guest memory between
// threads.
unsafe impl Send for PhysMemory {}
// SAFETY: see above; nothing in PhysMemory is mutated through `&self`.
unsafe impl Sync for PhysMemory {}

impl PhysMemory {
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0
            || gpa % PAGE_SIZE != 0
            || len % PAGE_SIZE != 0
            || gpa.checked_add(len).is_none()
        {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        if self
            .regions
            .iter()
            .any(|r| gpa < r.gpa + r.len && r.gpa < gpa + len)
        {
            return Err(MemoryError::Overlap { gpa, len });
        }
        Ok(())
    }

    /// Add RAM backed by host memory at `host`.
    ///
    /// # Safety
    /// `host` must point to `len` bytes of readable and writable memory that
    /// stay mapped for the whole life of this object.
    pub unsafe fn add_region(
        &mut self,
        gpa: u64,
        len: u64,
        host: NonNull<u8>,
    ) -> Result<(), MemoryError> {
        self.check(gpa, len)?;
        self.regions.push(Region {
            gpa,
            len,
            host,
            owned: false,
        });
        self.regions.sort_by_key(|r| r.gpa);
        Ok(())
    }

    /// Add `len` bytes of zeroed RAM owned by this object.
    pub fn add_owned(&mut self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.check(gpa, len)?;
        let size = usize::try_from(len).map_err(|_| MemoryError::Unaligned { gpa, len })?;
        let buf: Box<[u8]> = vec![0u8; size].into_boxed_slice();
        let raw = Box::into_raw(buf) as *mut u8;
        let host = NonNull::new(raw).ok_or(MemoryError::Unaligned { gpa, len })?;
        self.regions.push(Region {
            gpa,
            len,
            host,
            owned: true,
        });
        self.regions.sort_by_key(|r| r.gpa);
        Ok(())
    }
}

impl Drop for PhysMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            if r.owned {
                let slice = std::ptr::slice_from_raw_parts_mut(r.host.as_ptr(), r.len as usize);
                // SAFETY: owned regions were made by `Box::into_raw` on a
                // boxed slice of exactly `len` bytes in `add_owned`, and are
                // freed only here, once.
                drop(unsafe { Box::from_raw(slice) });
            }
        }
    }
}

impl GuestMemory for PhysMemory {
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let idx = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[idx];
        let off = gpa - r.gpa;
        let end = off.checked_add(len as u64)?;
        if end > r.len {
            return None;
        }
        // SAFETY: `off + len <= r.len`, so the pointer stays inside the
        // region the caller of `add_region`/`add_owned` vouched for.
        NonNull::new(unsafe { r.host.as_ptr().add(off as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_regions_read_write_and_reject_mmio() {
        let mut m = PhysMemory::new();
        m.add_owned(0, 0x2000).unwrap();
        m.add_owned(0x10000, 0x1000).unwrap();
        assert_eq!(
            m.add_owned(0x1000, 0x1000),
            Err(MemoryError::Overlap {
                gpa: 0x1000,
                len: 0x1000
            })
        );
        assert!(m.write_u64(0x1ff8, 0x1122_3344_5566_7788));
        assert_eq!(m.read_u64(0x1ff8), Some(0x1122_3344_5566_7788));
        // Crosses the end of the first region.
        assert!(m.read_u64(0x1ffc).is_none());
        assert!(m.read_u64(0x5000).is_none());
        assert!(m.write(0x10ff8, &[1; 8]));
        assert!(!m.write(0x10ffc, &[1; 8]));
    }
}
