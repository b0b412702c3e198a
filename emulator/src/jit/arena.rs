//! Executable memory for translated blocks, never writable and executable
//! at one address: one memfd mapped twice, read-write where the
//! translator writes and read-execute where the vCPU runs (W^X without an
//! `mprotect` per block).

use std::io;

/// A bump allocator over a fixed code region. When it is full the owner
/// calls [`Arena::reset`], which makes every earlier allocation invalid:
/// code pointers carry the [`Arena::epoch`] they were made in.
pub(crate) struct Arena {
    rw: *mut u8,
    rx: *const u8,
    size: usize,
    used: usize,
    /// Bumped by every reset.
    pub epoch: u64,
}

// SAFETY: the arena owns its two mappings; it moves between threads with
// the `Cpu` that owns it and is used by one thread at a time.
unsafe impl Send for Arena {}

impl Arena {
    /// Map `size` bytes (a multiple of the page size).
    pub fn new(size: usize) -> io::Result<Arena> {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is
        // checked, and closed below once both mappings hold the file.
        let fd = unsafe { libc::memfd_create(c"vireo-jit".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = Self::map(fd, size);
        // SAFETY: `fd` is ours; the mappings (if any) keep the file alive.
        unsafe { libc::close(fd) };
        result
    }

    fn map(fd: i32, size: usize) -> io::Result<Arena> {
        // SAFETY: ftruncate of our own memfd.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = |prot| {
            // SAFETY: a new shared mapping of the memfd, at an address the
            // kernel picks; checked for MAP_FAILED.
            let p =
                unsafe { libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd, 0) };
            if p == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(p)
            }
        };
        let rw = map(libc::PROT_READ | libc::PROT_WRITE)?;
        let rx = match map(libc::PROT_READ | libc::PROT_EXEC) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `rw` is the mapping made just above.
                unsafe { libc::munmap(rw, size) };
                return Err(e);
            }
        };
        Ok(Arena {
            rw: rw.cast(),
            rx: rx.cast(),
            size,
            used: 0,
            epoch: 1,
        })
    }

    /// Copy `code` in; returns its executable address, or `None` when the
    /// arena is full.
    pub fn alloc(&mut self, code: &[u8]) -> Option<usize> {
        // Blocks start on 16-byte boundaries (the branch predictor likes it).
        let start = self.used.next_multiple_of(16);
        if start + code.len() > self.size {
            return None;
        }
        // SAFETY: `start + code.len() <= size` bytes of the writable mapping;
        // `code` is a separate buffer. Nothing executes this range now: it
        // is past every live allocation of this epoch.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(start), code.len()) };
        self.used = start + code.len();
        Some(self.rx as usize + start)
    }

    /// The address the next allocation gets, if there is any room.
    pub fn next_addr(&self) -> Option<usize> {
        let start = self.used.next_multiple_of(16);
        (start + 256 <= self.size).then_some(self.rx as usize + start)
    }

    /// The offset into the mapping of executable address `at`, if `at..at
    /// + 4` is allocated.
    fn offset(&self, at: usize) -> Option<usize> {
        let off = at.checked_sub(self.rx as usize)?;
        (off + 4 <= self.used).then_some(off)
    }

    /// Read the 32-bit value at executable address `at`.
    pub fn read_rel32(&self, at: usize) -> Option<i32> {
        let off = self.offset(at)?;
        let mut b = [0u8; 4];
        // SAFETY: `off + 4 <= used <= size` bytes of the writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.rw.add(off), b.as_mut_ptr(), 4) };
        Some(i32::from_le_bytes(b))
    }

    /// Write the 32-bit value at executable address `at` (a jump's
    /// displacement; no code runs while the vCPU that owns the arena
    /// patches it).
    pub fn write_rel32(&mut self, at: usize, v: i32) {
        if let Some(off) = self.offset(at) {
            // SAFETY: as in `read_rel32`.
            unsafe { std::ptr::copy_nonoverlapping(v.to_le_bytes().as_ptr(), self.rw.add(off), 4) };
        }
    }

    /// Overwrite allocated bytes at executable address `at` (a stub
    /// being pointed elsewhere; no code runs while its vCPU patches it).
    pub fn write_bytes(&mut self, at: usize, bytes: &[u8]) {
        let Some(off) = at.checked_sub(self.rx as usize) else {
            return;
        };
        if off + bytes.len() <= self.used {
            // SAFETY: `off + len <= used <= size` bytes of the writable
            // mapping; `bytes` is a separate buffer.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.add(off), bytes.len()) };
        }
    }

    /// Forget every allocation.
    pub fn reset(&mut self) {
        self.used = 0;
        self.epoch += 1;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the two mappings made in `map`, unused from here on.
        unsafe {
            libc::munmap(self.rw.cast(), self.size);
            libc::munmap(self.rx as *mut libc::c_void, self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_runs_from_the_executable_view() {
        let mut a = Arena::new(1 << 16).expect("memfd arena");
        // mov eax, 42; ret
        let p = a.alloc(&[0xb8, 42, 0, 0, 0, 0xc3]).expect("room");
        // SAFETY: the bytes above are a complete function of this type.
        let f: extern "sysv64" fn() -> u32 = unsafe { std::mem::transmute(p) };
        assert_eq!(f(), 42);
        let q = a.alloc(&[0xc3]).expect("room");
        assert_eq!(q % 16, 0);
        assert!(q > p);
        a.reset();
        assert_eq!(a.alloc(&[0xc3]), Some(p));
        assert!(a.alloc(&vec![0x90; 1 << 17]).is_none());
    }
}
