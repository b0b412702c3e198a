//! Instruction decoding with iced-x86, and a cache of decoded instructions
//! per physical page.
//!
//! The cache is keyed by the physical page of the instruction's first byte
//! and, within it, by the linear RIP (iced resolves branch targets and
//! RIP-relative operands against the RIP, and one physical page may be
//! mapped at several linear addresses). Every emulated write to a physical
//! page drops that page's entries. Writes the emulator does not see (the
//! VMM or a device writing guest code) need [`crate::Cpu::flush_tlb`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction};

use crate::cpu::{Cpu, Flow, Trap};
use crate::exceptions::UD;

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

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<AddrHasher>>;

/// Entries of the direct-mapped first level.
const L0_SIZE: usize = 4096;

#[derive(Clone, Copy, Default)]
struct L0Entry {
    la: u64,
    ppage: u64,
    /// Valid while equal to the cache's generation.
    generation: u64,
    instr: Instruction,
}

/// Decoded instructions: a direct-mapped first level by linear address in
/// front of a map per physical page. Dropping any page (or everything)
/// bumps the generation, which empties the first level at once.
pub struct DecodeCache {
    pages: FastMap<u64, FastMap<u64, Instruction>>,
    count: usize,
    l0: Vec<L0Entry>,
    generation: u64,
}

impl Default for DecodeCache {
    fn default() -> Self {
        DecodeCache {
            pages: FastMap::default(),
            count: 0,
            l0: vec![L0Entry::default(); L0_SIZE],
            generation: 1,
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

    fn get(&mut self, ppage: u64, la: u64) -> Option<Instruction> {
        let slot = l0_slot(la);
        let e = &self.l0[slot];
        if e.generation == self.generation && e.la == la && e.ppage == ppage {
            return Some(e.instr);
        }
        let instr = *self.pages.get(&ppage)?.get(&la)?;
        self.l0[slot] = L0Entry {
            la,
            ppage,
            generation: self.generation,
            instr,
        };
        Some(instr)
    }

    /// True if instructions decoded from physical page number `ppage`
    /// are cached.
    pub fn has_page(&self, ppage: u64) -> bool {
        self.count != 0 && self.pages.contains_key(&ppage)
    }

    /// Cache `instr`; returns true if `ppage` had no decoded code before.
    fn insert(&mut self, ppage: u64, la: u64, instr: Instruction) -> bool {
        if self.count >= MAX_CACHED {
            self.invalidate_all();
        }
        let mut new_page = false;
        let page = self.pages.entry(ppage).or_insert_with(|| {
            new_page = true;
            FastMap::default()
        });
        if page.insert(la, instr).is_none() {
            self.count += 1;
        }
        self.l0[l0_slot(la)] = L0Entry {
            la,
            ppage,
            generation: self.generation,
            instr,
        };
        new_page
    }

    /// Drop everything decoded from physical page number `ppage`.
    pub fn invalidate_page(&mut self, ppage: u64) {
        if self.count == 0 {
            return;
        }
        if let Some(p) = self.pages.remove(&ppage) {
            self.count -= p.len();
            self.generation += 1;
        }
    }

    pub fn invalidate_all(&mut self) {
        self.pages.clear();
        self.count = 0;
        self.generation += 1;
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
    /// Fetch and decode the instruction at CS:RIP; invalid encodings raise
    /// #UD. The cache is keyed by the linear address; a hit must also have
    /// been decoded at the same RIP (the same linear address can be
    /// reached through different CS bases).
    pub(crate) fn fetch_decode(&mut self) -> Flow<Instruction> {
        let rip = self.state.rip;
        let bits = self.state.code_bits();
        let la = if bits == 64 {
            rip
        } else {
            self.state
                .seg(crate::cpu::state::SegReg::Cs)
                .base
                .wrapping_add(rip)
                & 0xffff_ffff
        };
        let ppage = match self.fast_fetch_page(la) {
            Some(p) => p >> 12,
            None => {
                let pa = self.translate(
                    la,
                    crate::mmu::AccessKind::Fetch,
                    crate::mmu::Privilege::Current,
                )?;
                let user = self.user_access(crate::mmu::Privilege::Current);
                self.fill_fast(la, pa, crate::mmu::AccessKind::Fetch, user);
                pa >> 12
            }
        };
        if let Some(i) = self.icache.get(ppage, la) {
            if i.ip() == rip {
                return Ok(i);
            }
        }
        let ud = Trap::Exception {
            vector: UD,
            error: None,
        };
        let mut buf = [0u8; 15];
        let (_, n) = self.fetch_bytes(la, &mut buf, false)?;
        match decode(bits, &buf[..n], rip) {
            Some(Some(i)) => {
                if self.icache.insert(ppage, la, i) {
                    // Writes to this page must now drop its decoded code.
                    self.tlb.fast.drop_writes_to(ppage << 12);
                }
                Ok(i)
            }
            None => Err(ud),
            Some(None) if n == 15 => Err(ud),
            Some(None) => {
                // The instruction crosses into the next page: not cached,
                // since a write to either page would have to drop it.
                let (_, n) = self.fetch_bytes(la, &mut buf, true)?;
                match decode(bits, &buf[..n], rip) {
                    Some(Some(i)) => Ok(i),
                    _ => Err(ud),
                }
            }
        }
    }
}
