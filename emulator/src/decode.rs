//! Instruction decoding with iced-x86, and a cache of decoded blocks per
//! physical page.
//!
//! A block is a run of instructions of one page up to the first control
//! transfer or system instruction, each with its semantics
//! ([`crate::exec::dispatch::handler_info`]) chosen once. The cache is keyed by the
//! physical page of the block and, within it, by the linear RIP of its
//! first instruction (iced resolves branch targets and RIP-relative
//! operands against the RIP, and one physical page may be mapped at
//! several linear addresses).
//!
//! Coherence with writes to guest code:
//! - this vCPU's own writes to a physical page drop that page's blocks
//!   (and stop a block running from it), so self-modifying code is seen
//!   from the next instruction on;
//! - writes this vCPU does not see (devices and the VMM writing guest RAM
//!   through their own mappings, other vCPUs) are caught by validation:
//!   each block keeps the bytes it was decoded from and compares them
//!   with guest memory (through the host pointer of the fast fetch table)
//!   before it runs, once per *code epoch*. A mismatch drops the page's
//!   blocks and decodes again. Blocks never leave their page (an
//!   instruction that crosses a page is decoded alone each time it runs),
//!   so one page's bytes are all a block depends on. A new epoch
//!   ([`Cpu::code_sync`]) starts at the first [`Cpu::run`] after every
//!   exit the VMM handled (I/O, MMIO: e.g. a device's status read), every
//!   [`crate::cpu::CODE_SYNC_INSTRS`] instructions, at every
//!   interrupt or exception delivery and at the serializing CPUID and
//!   IRET when another vCPU may have written code ([`Cpu::serialize`]:
//!   not in a VM with one vCPU). That covers the x86 rule for
//!   cross-modifying code (the executing CPU serializes before it runs
//!   code another CPU wrote) and
//!   device writes (the guest learns of them by an interrupt, or by
//!   polling, which is seen within CODE_SYNC_INSTRS instructions), while a
//!   hot loop pays the comparison once per epoch rather than per block.
//!   As on hardware, a block already running when another thread rewrites
//!   it runs to its end.
//!
//! Chaining: each block remembers the blocks that ran right after it (one
//! link for its fall-through address, one for any other target), so the
//! common case of the next block skips the fetch translation and the cache
//! probe. A link is a cache entry keyed by the linear address of the next
//! block and is followed only while nothing it depends on changed: the
//! cache's generation (no block was dropped or replaced, so the pointer is
//! alive), the TLB's epoch (no flush, so the linear address still
//! translates to the same page with the same rights), the privilege of
//! the fetch, and the code epoch (a block not yet checked in this epoch
//! is compared with guest memory through the host address the link
//! keeps, and takes the full path only if its bytes changed).

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction};

use crate::cpu::{Cpu, Flow, Trap};
use crate::exceptions::UD;
use crate::memory::PAGE_SIZE;

/// Upper bound of cached instructions before the cache is emptied.
const MAX_CACHED: usize = 1 << 20;

/// A multiplicative hasher for the cache's u64 keys (page numbers and
/// linear addresses): SipHash was half of the emulator's run time.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<AddrHasher>>;

/// Entries of the direct-mapped first level.
const L0_SIZE: usize = 4096;
/// Most instructions in one block.
pub(crate) const MAX_BLOCK: usize = 32;

/// An instruction with its semantics chosen once, at decode time.
pub(crate) struct Op {
    pub instr: Instruction,
    pub run: crate::exec::dispatch::Handler,
    /// The registers must be saved before the instruction, since its
    /// handler may write some and then fault (see
    /// [`crate::exec::dispatch::handler_info`]).
    pub save: bool,
}

/// A run of instructions decoded from one page, ending at the first
/// control transfer or system instruction (or the end of the page, or
/// [`MAX_BLOCK`] instructions). Executed in order while each one falls
/// through to the next.
pub(crate) struct Block {
    /// RIP of the first instruction (the cache key is its linear address).
    pub rip: u64,
    pub ops: Box<[Op]>,
    /// The instruction bytes the block was decoded from, which start at
    /// its linear address and end inside the same page.
    pub code: Box<[u8]>,
    /// The code epoch ([`Cpu::code_sync`]) in which `code` last matched
    /// guest memory.
    pub checked: Cell<u64>,
    /// The blocks that ran next: \[0\] at the fall-through address, \[1\]
    /// anywhere else (see the module documentation).
    links: [Cell<Link>; 2],
    /// Runs so far, or the block's host code (see [`crate::jit`]).
    #[cfg(target_arch = "x86_64")]
    pub(crate) jit: Cell<crate::jit::Jitted>,
}

/// A chained successor of a block.
#[derive(Clone, Copy)]
struct Link {
    la: u64,
    generation: u64,
    tlb_epoch: u64,
    user: bool,
    /// Alive while the cache's generation is `generation`: the cache holds
    /// an `Rc` of every block it links to until it bumps the generation.
    block: *const Block,
    /// The host address of the block's first byte in guest RAM, valid
    /// while the TLB epoch is `tlb_epoch` (the linear address still maps
    /// to the same page): a block not yet checked in this code epoch is
    /// compared with guest memory from here, without the fetch
    /// translation and the cache probe.
    host: usize,
}

const NO_LINK: Link = Link {
    la: 0,
    generation: 0,
    tlb_epoch: 0,
    user: false,
    block: std::ptr::null(),
    host: 0,
};

impl Block {
    /// The link slot of a successor at `rip`.
    #[inline(always)]
    fn slot(&self, rip: u64) -> usize {
        usize::from(rip != self.rip.wrapping_add(self.code.len() as u64))
    }
}

/// True if the `code.len()` bytes of guest RAM at host address `host` are
/// still `code`.
///
/// # Safety
/// `host` must point to at least `code.len()` bytes of guest RAM (a
/// `GuestMemory::host_ptr` range that is still mapped).
#[inline(always)]
unsafe fn code_unchanged(host: usize, code: &[u8]) -> bool {
    let p = host as *const u8;
    let n = code.len();
    let mut i = 0;
    // Guest RAM is shared with device threads and other vCPUs, so it is
    // read by copies through the raw pointer (never as a Rust slice), as
    // everywhere else in the emulator.
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` bytes are valid at `p` (the caller's
        // promise) and in `code`.
        let (a, b) = unsafe {
            (
                std::ptr::read_unaligned(p.add(i) as *const u64),
                std::ptr::read_unaligned(code.as_ptr().add(i) as *const u64),
            )
        };
        if a != b {
            return false;
        }
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, as above.
        if unsafe { std::ptr::read(p.add(i)) } != code[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[derive(Clone, Default)]
struct L0Entry {
    la: u64,
    ppage: u64,
    /// Valid while equal to the cache's generation.
    generation: u64,
    block: Option<Rc<Block>>,
}

/// Decoded blocks: a direct-mapped first level by linear address in front
/// of a map per physical page. Dropping any page (or everything) bumps the
/// generation, which empties the first level at once and tells a running
/// block to stop.
pub struct DecodeCache {
    pages: FastMap<u64, FastMap<u64, Rc<Block>>>,
    count: usize,
    l0: Vec<L0Entry>,
    pub(crate) generation: u64,
    /// The block that ran last and completed normally: the next block
    /// found is linked from it.
    pub(crate) last: Option<Rc<Block>>,
}

// SAFETY: the only non-Send parts are the `Rc<Block>`s and the raw block
// pointers of their links. Every clone of them is owned by this cache
// (including `last`), or is a local of `Cpu::step` (the block being run)
// dropped before it returns; the links point only to blocks of this
// cache, so all clones of a block always
// move between threads together with the `Cpu` that owns the cache and are
// never used from two threads.
unsafe impl Send for DecodeCache {}

impl Default for DecodeCache {
    fn default() -> Self {
        DecodeCache {
            pages: FastMap::default(),
            count: 0,
            l0: vec![L0Entry::default(); L0_SIZE],
            generation: 1,
            last: None,
        }
    }
}

fn l0_slot(la: u64) -> usize {
    ((la ^ (la >> 12)) as usize) & (L0_SIZE - 1)
}

impl DecodeCache {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn get(&mut self, ppage: u64, la: u64) -> Option<Rc<Block>> {
        let slot = l0_slot(la);
        let e = &self.l0[slot];
        if e.generation == self.generation && e.la == la && e.ppage == ppage {
            return e.block.clone();
        }
        let block = self.pages.get(&ppage)?.get(&la)?.clone();
        self.l0[slot] = L0Entry {
            la,
            ppage,
            generation: self.generation,
            block: Some(block.clone()),
        };
        Some(block)
    }

    /// True if code decoded from physical page number `ppage` is cached.
    pub fn has_page(&self, ppage: u64) -> bool {
        self.count != 0 && self.pages.contains_key(&ppage)
    }

    /// Cache `block`; returns true if `ppage` had no decoded code before.
    fn insert(&mut self, ppage: u64, la: u64, block: Rc<Block>) -> bool {
        if self.count >= MAX_CACHED {
            self.invalidate_all();
        }
        let mut new_page = false;
        let page = self.pages.entry(ppage).or_insert_with(|| {
            new_page = true;
            FastMap::default()
        });
        let n = block.ops.len();
        if let Some(old) = page.insert(la, block.clone()) {
            self.count -= old.ops.len();
            // Links to the replaced block must not be followed.
            self.generation += 1;
        }
        self.count += n;
        self.l0[l0_slot(la)] = L0Entry {
            la,
            ppage,
            generation: self.generation,
            block: Some(block),
        };
        new_page
    }

    /// Drop everything decoded from physical page number `ppage`.
    pub fn invalidate_page(&mut self, ppage: u64) {
        if self.count == 0 {
            return;
        }
        if let Some(p) = self.pages.remove(&ppage) {
            self.count -= p.values().map(|b| b.ops.len()).sum::<usize>();
            self.generation += 1;
        }
    }

    pub fn invalidate_all(&mut self) {
        self.pages.clear();
        self.count = 0;
        self.generation += 1;
        // Release the blocks the first level still holds.
        for e in &mut self.l0 {
            e.block = None;
        }
    }
}

/// Decode one instruction of `bits`-bit code from `bytes` at `rip`.
/// `Ok(None)` means the bytes ran out before the instruction ended.
fn decode(bits: u32, bytes: &[u8], rip: u64) -> Option<Option<Instruction>> {
    let mut d = Decoder::with_ip(bits, bytes, rip, DecoderOptions::NONE);
    let instr = d.decode();
    match d.last_error() {
        DecoderError::None if instr.code() != Code::INVALID => Some(Some(instr)),
        DecoderError::NoMoreBytes => Some(None),
        _ => None,
    }
}

impl Cpu {
    /// The linear address of CS:RIP.
    fn code_la(&self, bits: u32) -> u64 {
        let rip = self.state.rip;
        if bits == 64 {
            rip
        } else {
            self.state
                .seg(crate::cpu::state::SegReg::Cs)
                .base
                .wrapping_add(rip)
                & 0xffff_ffff
        }
    }

    /// The physical page number of a fetch at `la` and the host address
    /// of that page (`None` if it is not RAM).
    #[inline]
    fn fetch_page(&mut self, la: u64) -> Flow<(u64, Option<usize>)> {
        if let Some((p, host)) = self.fast_fetch_page(la) {
            return Ok((p >> 12, Some(host)));
        }
        let pa = self.translate(
            la,
            crate::mmu::AccessKind::Fetch,
            crate::mmu::Privilege::Current,
        )?;
        let user = self.user_access(crate::mmu::Privilege::Current);
        let host = self.fill_fast(la, pa, crate::mmu::AccessKind::Fetch, user);
        Ok((pa >> 12, host))
    }

    /// The decoded block at CS:RIP of `bits`-bit code, or `None` when the
    /// instruction there crosses into the next page (it is then run alone
    /// through [`Cpu::fetch_decode`], not cached, since a write to either
    /// page would have to drop it). Invalid encodings raise #UD. `prev`,
    /// the block that ran just before, may link to it (see the module
    /// documentation).
    pub(crate) fn block_at(&mut self, bits: u32, prev: Option<&Block>) -> Flow<Option<Rc<Block>>> {
        let rip = self.state.rip;
        let la = self.code_la(bits);
        let user = self.user_access(crate::mmu::Privilege::Current);
        let Some(prev) = prev else {
            return Ok(self.block_lookup(bits, rip, la)?.map(|(b, _)| b));
        };
        let link = &prev.links[prev.slot(rip)];
        let l = link.get();
        if l.la == la
            && l.generation == self.icache.generation
            && l.tlb_epoch == self.tlb.epoch
            && l.user == user
            && !l.block.is_null()
        {
            // SAFETY: the generation is unchanged since the link was made,
            // so the cache still holds an `Rc` of the block (see `Link`).
            let b = unsafe { &*l.block };
            // SAFETY: `l.host` is the host address of the block's bytes in
            // a RAM page (see `Link::host`), valid while the TLB epoch is
            // unchanged (checked above).
            if b.rip == rip
                && (b.checked.get() == self.code_epoch
                    || unsafe { code_unchanged(l.host, &b.code) } && {
                        b.checked.set(self.code_epoch);
                        true
                    })
            {
                // SAFETY: `l.block` came from `Rc::as_ptr` of a live `Rc`
                // (above); the new strong count is owned by the `Rc`
                // returned.
                return Ok(Some(unsafe {
                    Rc::increment_strong_count(l.block);
                    Rc::from_raw(l.block)
                }));
            }
        }
        let found = self.block_lookup(bits, rip, la)?;
        if let Some((b, host)) = &found {
            link.set(Link {
                la,
                generation: self.icache.generation,
                tlb_epoch: self.tlb.epoch,
                user,
                block: Rc::as_ptr(b),
                host: *host,
            });
        }
        Ok(found.map(|(b, _)| b))
    }

    /// [`Cpu::block_at`] without links: through the fetch translation
    /// and the cache. Also returns the host address of the block's bytes.
    fn block_lookup(&mut self, bits: u32, rip: u64, la: u64) -> Flow<Option<(Rc<Block>, usize)>> {
        let (ppage, host) = self.fetch_page(la)?;
        let off = (la & (PAGE_SIZE - 1)) as usize;
        let Some(host) = host else {
            return Err(Trap::Internal(
                format!(
                    "instruction fetch from non-RAM physical address {:#x} (RIP {la:#x})",
                    (ppage << 12) + off as u64
                )
                .into(),
            ));
        };
        let host = host + off;
        if let Some(b) = self.icache.get(ppage, la) {
            if b.rip == rip {
                if b.checked.get() == self.code_epoch {
                    return Ok(Some((b, host)));
                }
                // SAFETY: `host` is `off` bytes into a RAM page the memory
                // vouched for, and the block's bytes end inside that page.
                if unsafe { code_unchanged(host, &b.code) } {
                    b.checked.set(self.code_epoch);
                    return Ok(Some((b, host)));
                }
                // Rewritten behind the emulator's back (by a device, the
                // VMM or another vCPU): the page's other blocks are likely
                // stale too.
                drop(b);
                self.icache.invalidate_page(ppage);
            }
        }
        let room = PAGE_SIZE as usize - off;
        let n = room.min(MAX_BLOCK * 15);
        let mut buf = [0u8; MAX_BLOCK * 15];
        // SAFETY: `n <= room` bytes from `host` stay inside the RAM page;
        // `buf` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), n) };
        let mut d = Decoder::with_ip(bits, &buf[..n], rip, DecoderOptions::NONE);
        let mut ops = Vec::new();
        while ops.len() < MAX_BLOCK {
            let instr = d.decode();
            match d.last_error() {
                DecoderError::None if instr.code() != Code::INVALID => {}
                // Crosses the page (n == room here: MAX_BLOCK instructions
                // always fit in the buffer otherwise).
                DecoderError::NoMoreBytes if ops.is_empty() => return Ok(None),
                _ if ops.is_empty() => {
                    return Err(Trap::Exception {
                        vector: UD,
                        error: None,
                    })
                }
                // Stop before it; it raises #UD (or is run alone) when reached.
                _ => break,
            }
            let (run, ends, save) = crate::exec::dispatch::handler_info(&instr);
            ops.push(Op { instr, run, save });
            if ends {
                break;
            }
        }
        let len = ops.iter().map(|op| op.instr.len()).sum::<usize>();
        let block = Rc::new(Block {
            rip,
            ops: ops.into_boxed_slice(),
            code: buf[..len].into(),
            checked: Cell::new(self.code_epoch),
            links: [Cell::new(NO_LINK), Cell::new(NO_LINK)],
            #[cfg(target_arch = "x86_64")]
            jit: Cell::new(crate::jit::Jitted::Cold(0)),
        });
        if self.icache.insert(ppage, la, block.clone()) {
            // Writes to this page must now drop its decoded code.
            self.tlb.fast.drop_writes_to(ppage << 12);
        }
        Ok(Some((block, host)))
    }

    /// Fetch and decode the instruction at CS:RIP, uncached; invalid
    /// encodings raise #UD.
    pub(crate) fn fetch_decode(&mut self) -> Flow<Instruction> {
        let rip = self.state.rip;
        let bits = self.state.code_bits();
        let la = self.code_la(bits);
        let ud = Trap::Exception {
            vector: UD,
            error: None,
        };
        let mut buf = [0u8; 15];
        let (_, n) = self.fetch_bytes(la, &mut buf, false)?;
        match decode(bits, &buf[..n], rip) {
            Some(Some(i)) => Ok(i),
            None => Err(ud),
            Some(None) if n == 15 => Err(ud),
            Some(None) => {
                // The instruction crosses into the next page.
                let (_, n) = self.fetch_bytes(la, &mut buf, true)?;
                match decode(bits, &buf[..n], rip) {
                    Some(Some(i)) => Ok(i),
                    _ => Err(ud),
                }
            }
        }
    }
}
