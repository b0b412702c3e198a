//! Linear and physical memory accesses of the CPU: page splitting, RAM vs.
//! MMIO, and invalidation of decoded code on writes.

use super::state::SegReg;
use super::{Cpu, Exit, Flow, Trap, MAX_IO_LEN};
use crate::memory::PAGE_SIZE;
use crate::mmu::{fast_slot, fast_tag, AccessKind, FastEntry, Privilege, FAST_SIZE};

/// The host address of `len` bytes at `la` if `table` has a translation
/// of its page for this privilege and the bytes do not leave the page.
#[inline(always)]
fn fast_host(table: &[FastEntry; FAST_SIZE], la: u64, len: usize, user: bool) -> Option<usize> {
    let off = (la & (PAGE_SIZE - 1)) as usize;
    if off + len > PAGE_SIZE as usize {
        return None;
    }
    let e = &table[fast_slot(la >> 12)];
    (e.tag == fast_tag(la, user)).then_some(e.host + off)
}

impl Cpu {
    /// True if an access by `who` is a user-mode access (CPL 3).
    #[inline(always)]
    pub(crate) fn user_access(&self, who: Privilege) -> bool {
        who == Privilege::Current && self.state.seg[SegReg::Cs as usize].dpl == 3
    }

    /// After `la` translated to `pa` for `kind`, remember the host page in
    /// the fast tables if it is RAM (and, for writes, holds no decoded
    /// code). Returns the host address of the page if it is RAM.
    pub(crate) fn fill_fast(
        &mut self,
        la: u64,
        pa: u64,
        kind: AccessKind,
        user: bool,
    ) -> Option<usize> {
        let ppage = pa & !(PAGE_SIZE - 1);
        let host = self.mem.host_ptr(ppage, PAGE_SIZE as usize)?.as_ptr() as usize;
        let fast = &mut self.tlb.fast;
        let table = match kind {
            AccessKind::Read => &mut fast.read,
            AccessKind::Fetch => {
                self.tlb.mark_code(la >> 12);
                &mut self.tlb.fast.fetch
            }
            AccessKind::Write => {
                if self.icache.has_page(ppage >> 12) {
                    return Some(host);
                }
                // Dirty tracking: the page is marked when its write entry
                // is installed; `Cpu::drop_fast_writes` (before each look
                // at the dirty log) makes the next write install it again.
                self.mem.mark_dirty(ppage, PAGE_SIZE as usize);
                &mut fast.write
            }
        };
        table[fast_slot(la >> 12)] = FastEntry {
            tag: fast_tag(la, user),
            host,
            ppage,
        };
        Some(host)
    }

    /// The physical page address and host page address of a fetch at `la`
    /// from the fast table.
    #[inline(always)]
    pub(crate) fn fast_fetch_page(&self, la: u64) -> Option<(u64, usize)> {
        let user = self.user_access(Privilege::Current);
        let e = &self.tlb.fast.fetch[fast_slot(la >> 12)];
        (e.tag == fast_tag(la, user)).then_some((e.ppage, e.host))
    }

    /// The host address of `len` bytes at `la` for a plain (not LOCKed)
    /// read (`write` false) or write at the current privilege, if the fast
    /// tables hold the page and the bytes stay inside it: RAM and, for a
    /// write, a page without decoded code. `None`: take the full path.
    #[inline]
    pub(crate) fn fast_span(&self, la: u64, len: usize, write: bool) -> Option<usize> {
        if self.atomic.is_some() {
            return None;
        }
        let user = self.user_access(Privilege::Current);
        let table = if write {
            &self.tlb.fast.write
        } else {
            &self.tlb.fast.read
        };
        fast_host(table, la, len, user)
    }

    /// Read `buf.len()` (at most 16) bytes at linear address `la`.
    pub(crate) fn read_lin(&mut self, la: u64, buf: &mut [u8], who: Privilege) -> Flow {
        let user = self.user_access(who);
        if let Some(h) = fast_host(&self.tlb.fast.read, la, buf.len(), user) {
            // SAFETY: `h` lies in a RAM page `GuestMemory::host_ptr` vouched
            // for (valid while `self.mem` lives) and the range does not
            // leave the page; `buf` is a separate Rust buffer.
            unsafe { std::ptr::copy_nonoverlapping(h as *const u8, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        self.access_lin(la, buf.len(), AccessKind::Read, who)
            .and_then(|(pa1, first, pa2)| {
                let (a, b) = buf.split_at_mut(first);
                self.read_phys(pa1, a)?;
                if let Some(pa2) = pa2 {
                    self.read_phys(pa2, b)?;
                }
                Ok(())
            })
    }

    /// Write `data` (at most 16 bytes) at linear address `la`. Both pages of
    /// a split access are translated before any byte is written, so a fault
    /// leaves memory untouched.
    pub(crate) fn write_lin(&mut self, la: u64, data: &[u8], who: Privilege) -> Flow {
        let user = self.user_access(who);
        if let Some(h) = fast_host(&self.tlb.fast.write, la, data.len(), user) {
            // SAFETY: as in `read_lin`; the page holds no decoded code, so
            // nothing needs invalidating.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), h as *mut u8, data.len()) };
            return Ok(());
        }
        let (pa1, first, pa2) = self.access_lin(la, data.len(), AccessKind::Write, who)?;
        self.write_phys(pa1, &data[..first]);
        if let Some(pa2) = pa2 {
            self.write_phys(pa2, &data[first..]);
        }
        Ok(())
    }

    /// Translate the one or two pages an access touches: (first physical
    /// address, bytes on the first page, second physical address).
    fn access_lin(
        &mut self,
        la: u64,
        len: usize,
        kind: AccessKind,
        who: Privilege,
    ) -> Flow<(u64, usize, Option<u64>)> {
        let room = (PAGE_SIZE - (la & (PAGE_SIZE - 1))) as usize;
        let first = len.min(room);
        let user = self.user_access(who);
        let pa1 = self.translate(la, kind, who)?;
        self.fill_fast(la, pa1, kind, user);
        let pa2 = if first < len {
            let la2 = la.wrapping_add(first as u64);
            let pa2 = self.translate(la2, kind, who)?;
            self.fill_fast(la2, pa2, kind, user);
            Some(pa2)
        } else {
            None
        };
        Ok((pa1, first, pa2))
    }

    /// Read guest physical memory; MMIO asks the VMM.
    pub(crate) fn read_phys(&mut self, pa: u64, buf: &mut [u8]) -> Flow {
        if buf.is_empty() || self.mem.read(pa, buf) || self.platform_mmio_read(pa, buf) {
            return Ok(());
        }
        self.take_input(
            Exit::MmioRead {
                gpa: pa,
                len: buf.len() as u8,
            },
            buf,
        )
    }

    /// Write guest physical memory; MMIO writes are queued for the VMM.
    pub(crate) fn write_phys(&mut self, pa: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.mem.write(pa, data) {
            self.icache.invalidate_page(pa >> 12);
            let last = pa + data.len() as u64 - 1;
            if last >> 12 != pa >> 12 {
                self.icache.invalidate_page(last >> 12);
            }
            return;
        }
        if self.platform_mmio_write(pa, data) {
            return;
        }
        let mut buf = [0u8; MAX_IO_LEN];
        let n = data.len().min(MAX_IO_LEN);
        buf[..n].copy_from_slice(&data[..n]);
        self.mmio_writes.push_back((pa, buf, n as u8));
    }

    /// Read a little-endian value of `bytes` (1, 2, 4 or 8) bytes.
    #[inline]
    pub(crate) fn read_mem(&mut self, la: u64, bytes: usize) -> Flow<u64> {
        if self.atomic.is_none() {
            let user = self.user_access(Privilege::Current);
            if let Some(h) = fast_host(&self.tlb.fast.read, la, bytes, user) {
                // SAFETY: as in `read_lin`: `bytes` valid bytes at `h`.
                let v = unsafe {
                    match bytes {
                        1 => u64::from(*(h as *const u8)),
                        2 => u64::from(std::ptr::read_unaligned(h as *const u16)),
                        4 => u64::from(std::ptr::read_unaligned(h as *const u32)),
                        8 => std::ptr::read_unaligned(h as *const u64),
                        _ => return self.read_mem_slow(la, bytes),
                    }
                };
                return Ok(v);
            }
        }
        self.read_mem_slow(la, bytes)
    }

    fn read_mem_slow(&mut self, la: u64, bytes: usize) -> Flow<u64> {
        let mut b = [0u8; 8];
        let n = bytes.min(8);
        self.read_lin(la, &mut b[..n], Privilege::Current)?;
        let v = u64::from_le_bytes(b);
        if let Some(op) = &mut self.atomic {
            if op.la.is_none() {
                *op = super::AtomicOp {
                    la: Some(la),
                    len: n,
                    old: v,
                };
            }
        }
        Ok(v)
    }

    #[inline]
    pub(crate) fn write_mem(&mut self, la: u64, bytes: usize, v: u64) -> Flow {
        let n = bytes.min(8);
        if self.atomic.is_none() {
            let user = self.user_access(Privilege::Current);
            if let Some(h) = fast_host(&self.tlb.fast.write, la, n, user) {
                // SAFETY: as in `write_lin`: `n` valid bytes at `h`, on a
                // page without decoded code.
                unsafe {
                    match n {
                        1 => *(h as *mut u8) = v as u8,
                        2 => std::ptr::write_unaligned(h as *mut u16, v as u16),
                        4 => std::ptr::write_unaligned(h as *mut u32, v as u32),
                        8 => std::ptr::write_unaligned(h as *mut u64, v),
                        _ => return self.write_lin(la, &v.to_le_bytes()[..n], Privilege::Current),
                    }
                }
                return Ok(());
            }
        }
        if let Some(op) = self.atomic {
            if op.la == Some(la) && op.len == n {
                return self.cas_mem(la, n, op.old, v);
            }
        }
        self.write_lin(la, &v.to_le_bytes()[..n], Privilege::Current)
    }

    /// The write of a LOCKed read-modify-write: a host compare-and-swap
    /// against the value the instruction read, so that vCPUs racing on the
    /// same location see x86 atomicity. A lost race restarts the
    /// instruction. Accesses that are not naturally aligned RAM fall back
    /// to a plain write.
    fn cas_mem(&mut self, la: u64, n: usize, old: u64, new: u64) -> Flow {
        use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
        let (pa, first, pa2) = self.access_lin(la, n, AccessKind::Write, Privilege::Current)?;
        let ptr = if matches!(n, 1 | 2 | 4 | 8) && pa2.is_none() && first == n && pa % n as u64 == 0
        {
            self.mem.host_ptr(pa, n)
        } else {
            None
        };
        let Some(p) = ptr.filter(|p| p.as_ptr() as usize % n == 0) else {
            return self.write_lin(la, &new.to_le_bytes()[..n], Privilege::Current);
        };
        self.mem.mark_dirty(pa, n);
        let p = p.as_ptr();
        // SAFETY: `host_ptr` vouches for `n` valid bytes at `p`, which is
        // aligned to `n` (checked above); guest RAM is only ever accessed
        // by copies and by these atomics.
        let ok = unsafe {
            match n {
                1 => AtomicU8::from_ptr(p)
                    .compare_exchange(old as u8, new as u8, SeqCst, SeqCst)
                    .is_ok(),
                2 => AtomicU16::from_ptr(p.cast())
                    .compare_exchange(old as u16, new as u16, SeqCst, SeqCst)
                    .is_ok(),
                4 => AtomicU32::from_ptr(p.cast())
                    .compare_exchange(old as u32, new as u32, SeqCst, SeqCst)
                    .is_ok(),
                _ => AtomicU64::from_ptr(p.cast())
                    .compare_exchange(old, new, SeqCst, SeqCst)
                    .is_ok(),
            }
        };
        if !ok {
            return Err(super::Trap::Retry);
        }
        self.icache.invalidate_page(pa >> 12);
        Ok(())
    }

    /// A supervisor (implicit) 8-byte read, e.g. of a descriptor table.
    pub(crate) fn read_sys_u64(&mut self, la: u64) -> Flow<u64> {
        let mut b = [0u8; 8];
        self.read_lin(la, &mut b, Privilege::Supervisor)?;
        Ok(u64::from_le_bytes(b))
    }

    pub(crate) fn read_u128(&mut self, la: u64) -> Flow<u128> {
        let mut b = [0u8; 16];
        self.read_lin(la, &mut b, Privilege::Current)?;
        Ok(u128::from_le_bytes(b))
    }

    pub(crate) fn write_u128(&mut self, la: u64, v: u128) -> Flow {
        self.write_lin(la, &v.to_le_bytes(), Privilege::Current)
    }

    /// Check that a write of `len` bytes at `la` would succeed, without
    /// writing (for instructions that must not fault after a first write).
    pub(crate) fn probe_write(&mut self, la: u64, len: usize) -> Flow {
        self.access_lin(la, len, AccessKind::Write, Privilege::Current)
            .map(|_| ())
    }

    /// Fetch up to 15 instruction bytes at `la`, stopping at the end of
    /// the page unless `cross` is set. Returns the byte count.
    pub(crate) fn fetch_bytes(
        &mut self,
        la: u64,
        buf: &mut [u8; 15],
        cross: bool,
    ) -> Flow<(u64, usize)> {
        let pa = self.translate(la, AccessKind::Fetch, Privilege::Current)?;
        let room = (PAGE_SIZE - (la & (PAGE_SIZE - 1))) as usize;
        let first = room.min(15);
        if !self.mem.read(pa, &mut buf[..first]) {
            return Err(Trap::Internal(
                format!("instruction fetch from non-RAM physical address {pa:#x} (RIP {la:#x})")
                    .into(),
            ));
        }
        if first == 15 || !cross {
            return Ok((pa, first));
        }
        let la2 = la.wrapping_add(first as u64);
        let pa2 = self.translate(la2, AccessKind::Fetch, Privilege::Current)?;
        if !self.mem.read(pa2, &mut buf[first..]) {
            return Err(Trap::Internal(
                format!("instruction fetch from non-RAM physical address {pa2:#x} (RIP {la2:#x})")
                    .into(),
            ));
        }
        Ok((pa, 15))
    }
}
