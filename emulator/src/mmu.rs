//! Linear → physical translation: the 4-level long-mode page walk with
//! present/write/user/NX checks, accessed and dirty bits, a software TLB and
//! page faults with the architectural error code and CR2.

use crate::cpu::state::{cr0, efer};
use crate::cpu::{Cpu, Flow, Trap};
use crate::exceptions::{GP, PF};
use crate::memory::PAGE_SIZE;

/// Physical address width the emulator implements (CPUID 0x80000008).
pub const PHYS_ADDR_BITS: u32 = 40;
/// Linear address width (4-level paging).
pub const VIRT_ADDR_BITS: u32 = 48;

const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical address bits of a table entry below MAXPHYADDR.
const ADDR_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;
/// Bits 51:MAXPHYADDR must be zero.
const RSVD_HIGH: u64 = ((1u64 << 52) - 1) & !((1u64 << PHYS_ADDR_BITS) - 1);

/// #PF error code bits.
pub mod pf {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

/// The kind of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// Who makes an access: the current privilege level, or the CPU itself
/// (descriptor tables, the stack of an event delivery), which always acts
/// as the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    Current,
    Supervisor,
}

#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    /// Linear page number, or `u64::MAX` when empty.
    vpn: u64,
    /// Physical page address.
    ppage: u64,
    writable: bool,
    user: bool,
    nx: bool,
    dirty: bool,
}

const TLB_SIZE: usize = 512;
const EMPTY: TlbEntry = TlbEntry {
    vpn: u64::MAX,
    ppage: 0,
    writable: false,
    user: false,
    nx: false,
    dirty: false,
};

/// Entries of each fast (host pointer) table.
pub(crate) const FAST_SIZE: usize = 1024;

/// A translation straight to host memory, for one kind of access by one
/// privilege: `tag` is `(la >> 12) << 1 | user` (or [`NO_TAG`]), `host`
/// the host address of the 4 KiB RAM page, `ppage` its guest physical
/// address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastEntry {
    pub tag: u64,
    pub host: usize,
    pub ppage: u64,
}

pub(crate) const NO_TAG: u64 = u64::MAX;
const FAST_EMPTY: FastEntry = FastEntry {
    tag: NO_TAG,
    host: 0,
    ppage: 0,
};

/// The fast tables: translations of linear pages to host RAM that passed
/// the permission checks of one access kind, so a hit needs no walk, no
/// permission check and no region lookup. Filled only for RAM; write
/// entries only for pages without decoded code (a write there must drop
/// the decoded instructions) and with the dirty bit set.
pub(crate) struct FastTlb {
    pub read: Box<[FastEntry; FAST_SIZE]>,
    pub write: Box<[FastEntry; FAST_SIZE]>,
    pub fetch: Box<[FastEntry; FAST_SIZE]>,
}

impl FastTlb {
    fn new() -> Self {
        FastTlb {
            read: Box::new([FAST_EMPTY; FAST_SIZE]),
            write: Box::new([FAST_EMPTY; FAST_SIZE]),
            fetch: Box::new([FAST_EMPTY; FAST_SIZE]),
        }
    }

    fn flush_all(&mut self) {
        self.read.fill(FAST_EMPTY);
        self.write.fill(FAST_EMPTY);
        self.fetch.fill(FAST_EMPTY);
    }

    fn flush_vpn(&mut self, vpn: u64) {
        let slot = fast_slot(vpn);
        for t in [&mut self.read, &mut self.write, &mut self.fetch] {
            if t[slot].tag >> 1 == vpn {
                t[slot] = FAST_EMPTY;
            }
        }
    }

    /// Forget the translations of every page of 2 MiB region `region`
    /// (linear address >> 21).
    fn flush_region(&mut self, region: u64) {
        for t in [&mut self.read, &mut self.write, &mut self.fetch] {
            for e in t.iter_mut() {
                if e.tag != NO_TAG && e.tag >> 10 == region {
                    *e = FAST_EMPTY;
                }
            }
        }
    }

    /// Forget every write translation (dirty tracking: the next write to
    /// each page goes the slow way and marks it).
    pub(crate) fn flush_writes(&mut self) {
        self.write.fill(FAST_EMPTY);
    }

    /// Forget the write translations to physical page `ppage` (it now holds
    /// decoded code).
    pub(crate) fn drop_writes_to(&mut self, ppage: u64) {
        for e in self.write.iter_mut() {
            if e.ppage == ppage && e.tag != NO_TAG {
                *e = FAST_EMPTY;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn fast_slot(vpn: u64) -> usize {
    (vpn as usize) & (FAST_SIZE - 1)
}

#[inline(always)]
pub(crate) fn fast_tag(la: u64, user: bool) -> u64 {
    ((la >> 12) << 1) | u64::from(user)
}

/// A direct-mapped software TLB of 4 KiB translations (large pages are
/// cached one 4 KiB piece at a time).
pub struct Tlb {
    entries: Box<[TlbEntry; TLB_SIZE]>,
    /// 2 MiB regions (hashed into bits) with cached pieces of a large page:
    /// INVLPG anywhere in one must drop all its pieces.
    large_2m: Box<[u64; REGION_WORDS]>,
    /// A 1 GiB page is cached: INVLPG flushes everything.
    has_1g: bool,
    /// Pages (hashed into bits) that code was fetched from since the last
    /// full flush: only INVLPG of one of them starts a new epoch.
    code_pages: Box<[u64; REGION_WORDS]>,
    pub(crate) fast: FastTlb,
    /// Bumped by every flush that may change a translation code was
    /// fetched through: a chained block link (see [`crate::decode`]) or a
    /// chained translated block made under an older epoch is not followed.
    pub(crate) epoch: u64,
}

/// Words of the hashed bit sets (64 Ki bits each).
const REGION_WORDS: usize = 1024;

fn bit(key: u64) -> (usize, u64) {
    let h = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as usize;
    (h / 64 % REGION_WORDS, 1u64 << (h % 64))
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    pub fn new() -> Self {
        Tlb {
            entries: Box::new([EMPTY; TLB_SIZE]),
            large_2m: Box::new([0; REGION_WORDS]),
            has_1g: false,
            code_pages: Box::new([0; REGION_WORDS]),
            fast: FastTlb::new(),
            epoch: 0,
        }
    }

    pub fn flush_all(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.entries.fill(EMPTY);
        self.large_2m.fill(0);
        self.has_1g = false;
        self.code_pages.fill(0);
        self.fast.flush_all();
    }

    /// Code is fetched through the translation of page `vpn`.
    pub(crate) fn mark_code(&mut self, vpn: u64) {
        let (w, b) = bit(vpn);
        self.code_pages[w] |= b;
    }

    /// INVLPG: drop the translations of the page of `la`, and of every
    /// piece of a large page it belongs to.
    pub fn flush_page(&mut self, la: u64) {
        if self.has_1g {
            self.flush_all();
            return;
        }
        let vpn = la >> 12;
        let region = vpn >> 9;
        let (w, b) = bit(region);
        if self.large_2m[w] & b != 0 {
            // The pieces of a 2 MiB page (or of a region sharing its bit).
            self.epoch = self.epoch.wrapping_add(1);
            for e in self.entries.iter_mut() {
                if e.vpn >> 9 == region {
                    *e = EMPTY;
                }
            }
            self.fast.flush_region(region);
            return;
        }
        let (cw, cb) = bit(vpn);
        if self.code_pages[cw] & cb != 0 {
            self.epoch = self.epoch.wrapping_add(1);
        }
        let e = &mut self.entries[(vpn as usize) % TLB_SIZE];
        if e.vpn == vpn {
            *e = EMPTY;
        }
        self.fast.flush_vpn(vpn);
    }
}

/// True if `la` is canonical for 48-bit linear addresses.
pub fn is_canonical(la: u64) -> bool {
    let top = (la as i64) >> (VIRT_ADDR_BITS - 1);
    top == 0 || top == -1
}

impl Cpu {
    /// Translate linear address `la` for an access of `kind`.
    pub(crate) fn translate(&mut self, la: u64, kind: AccessKind, who: Privilege) -> Flow<u64> {
        let s = &self.state;
        if s.cr0 & cr0::PG == 0 {
            return Ok(la & 0xffff_ffff);
        }
        if s.efer & efer::LMA == 0 {
            return Err(Trap::Internal(
                "paging outside long mode (32-bit/PAE paging) is not emulated".into(),
            ));
        }
        if !is_canonical(la) {
            return Err(Trap::Exception {
                vector: GP,
                error: Some(0),
            });
        }
        let user = who == Privilege::Current && s.cpl() == 3;
        let wp = s.cr0 & cr0::WP != 0;
        let vpn = la >> 12;
        let slot = (vpn as usize) % TLB_SIZE;
        let e = self.tlb.entries[slot];
        if e.vpn == vpn
            && access_allowed(kind, user, wp, e.writable, e.user, e.nx)
            && (kind != AccessKind::Write || e.dirty)
        {
            return Ok(e.ppage | (la & 0xfff));
        }
        self.walk(la, kind, user, wp)
    }

    fn walk(&mut self, la: u64, kind: AccessKind, user: bool, wp: bool) -> Flow<u64> {
        let nxe = self.state.efer & efer::NXE != 0;
        let fault = |cpu: &mut Cpu, extra: u32| {
            let mut code = extra;
            if kind == AccessKind::Write {
                code |= pf::WRITE;
            }
            if user {
                code |= pf::USER;
            }
            if kind == AccessKind::Fetch && nxe {
                code |= pf::FETCH;
            }
            cpu.state.cr2 = la;
            Trap::Exception {
                vector: PF,
                error: Some(code),
            }
        };
        let mut table = self.state.cr3 & ADDR_MASK;
        let (mut writable, mut usr, mut nx) = (true, true, false);
        // (entry address, entry value) of each level, to set A/D afterwards.
        let mut path = [(0u64, 0u64); 4];
        let mut depth = 0;
        let mut page_size_shift = 12;
        let mut ppage = 0;
        for level in (0..4).rev() {
            let shift = 12 + 9 * level;
            let idx = (la >> shift) & 0x1ff;
            let addr = table + idx * 8;
            let Some(entry) = self.mem.read_u64(addr) else {
                // Page tables outside RAM read as not present.
                return Err(fault(self, 0));
            };
            if entry & PTE_P == 0 {
                return Err(fault(self, 0));
            }
            let is_leaf = level == 0 || (level <= 2 && entry & PTE_PS != 0);
            let mut rsvd = entry & RSVD_HIGH != 0 || (!nxe && entry & PTE_NX != 0);
            if level == 3 && entry & PTE_PS != 0 {
                rsvd = true;
            }
            if is_leaf && level > 0 {
                // Large page: bits below the page frame (except PAT bit 12)
                // must be zero.
                let low = ((1u64 << shift) - 1) & !0x1fff;
                rsvd |= entry & low != 0;
            }
            if rsvd {
                return Err(fault(self, pf::PRESENT | pf::RSVD));
            }
            writable &= entry & PTE_W != 0;
            usr &= entry & PTE_U != 0;
            nx |= nxe && entry & PTE_NX != 0;
            path[depth] = (addr, entry);
            depth += 1;
            if is_leaf {
                page_size_shift = shift;
                ppage = entry & ADDR_MASK & !((1u64 << shift) - 1);
                break;
            }
            table = entry & ADDR_MASK;
        }
        if !access_allowed(kind, user, wp, writable, usr, nx) {
            return Err(fault(self, pf::PRESENT));
        }
        // Accessed on every level, dirty on the leaf for writes.
        for (i, &(addr, entry)) in path[..depth].iter().enumerate() {
            let mut new = entry | PTE_A;
            if i == depth - 1 && kind == AccessKind::Write {
                new |= PTE_D;
            }
            if new != entry {
                self.mem.write_u64(addr, new);
                self.icache.invalidate_page(addr >> 12);
            }
        }
        let page_off = la & ((1u64 << page_size_shift) - 1) & !0xfff;
        let pa_page = ppage | page_off;
        let vpn = la >> 12;
        let dirty = kind == AccessKind::Write || path[depth - 1].1 & PTE_D != 0;
        self.tlb.entries[(vpn as usize) % TLB_SIZE] = TlbEntry {
            vpn,
            ppage: pa_page,
            writable,
            user: usr,
            nx,
            dirty,
        };
        if page_size_shift > 21 {
            self.tlb.has_1g = true;
        } else if page_size_shift > 12 {
            let (w, b) = bit(vpn >> 9);
            self.tlb.large_2m[w] |= b;
        }
        Ok(pa_page | (la & (PAGE_SIZE - 1)))
    }
}

fn access_allowed(
    kind: AccessKind,
    user: bool,
    wp: bool,
    writable: bool,
    usr: bool,
    nx: bool,
) -> bool {
    if user && !usr {
        return false;
    }
    match kind {
        AccessKind::Read => true,
        AccessKind::Write => writable || (!user && !wp),
        AccessKind::Fetch => !nx,
    }
}
