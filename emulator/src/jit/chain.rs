//! Chaining: a translated block's exit patched to enter the next block's
//! code directly, through a stub that checks what keeps the target valid.

use super::asm::{Mem, RAX, RBP, RCX, RDX, RSP as HOST_RSP};
use super::emit::{ADD, CMP, SHL, SHR, SUB};
use super::{Jit, Jitted, SITE_SHIFT, SLOT_BEFORE, SLOT_BLOCK, SLOT_BUDGET, SLOT_OUT};
use crate::decode::Block;

/// A chainable exit the last run took (see [`Jit::chain`]).
#[derive(Clone, Copy)]
pub(super) struct Pending {
    /// The executable address of the jump's displacement.
    pub(super) site: usize,
    /// Its target is computed (RET, indirect JMP/CALL).
    pub(super) dynamic: bool,
    /// The block it belongs to, its instructions on that path, and the
    /// privilege its code was made for.
    pub(super) from: *const Block,
    pub(super) from_len: u64,
    pub(super) user: bool,
    /// The RIP it left for.
    pub(super) rip: u64,
    /// The arena's epoch, the decode cache's generation and the TLB's
    /// epoch then.
    pub(super) epoch: u64,
    pub(super) generation: u64,
    pub(super) tlb_epoch: u64,
}

/// A stub a site was pointed at (see [`Jit::chain`]).
pub(super) struct Stub {
    at: usize,
    len: usize,
    /// Where its failure path leaves: the site's original target.
    out: usize,
    /// The block it enters and the epochs it checks for.
    next: *const Block,
    generation: u64,
    tlb_epoch: u64,
    /// Times it was rewritten for another block.
    retargets: u32,
}

/// Rewrites of a stub for another block (a RET returning to many
/// callers) before the site is left to the dispatcher.
const MAX_RETARGETS: u32 = 4;

impl Jit {
    /// The block `next` at RIP is about to run from `entry`: if the last
    /// run left through a site (see [`super::emit::exit_to`]) for this RIP, point that
    /// site at a stub that enters `next` directly, while the budget lasts
    /// and `next` was checked against guest memory in the same code epoch
    /// as the block it comes from; for a computed target (RET) while the
    /// RIP is the same; and, unless both blocks are on one page, while
    /// the decode cache dropped no block (so `next` is alive) and the TLB
    /// was not flushed (so the RIP still leads to it). A site already
    /// pointing at a stub gets it rewritten for the new target.
    ///
    /// Why a page needs no more: both blocks are then decoded from the
    /// same physical page through the same translation, so whatever drops
    /// `next` from the decode cache (a write to the page, a new epoch of
    /// the whole cache) drops the block holding the jump too, and a block
    /// the cache no longer holds is never entered.
    pub fn chain(
        &mut self,
        next: &Block,
        entry: usize,
        rip: u64,
        (generation, tlb_epoch): (u64, u64),
    ) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let body = self.body;
        let Some(arena) = self.arena.as_mut() else {
            return;
        };
        if p.generation != generation
            || p.tlb_epoch != tlb_epoch
            || p.rip != rip
            || p.epoch != arena.epoch
            || next.rip != rip
            || !matches!(next.jit.get(), Jitted::Code { user, .. } if user == p.user)
        {
            return;
        }
        // SAFETY: `from` returned in the last run, and the decode cache has
        // dropped no block since (same generation): it still holds `from`.
        let from = unsafe { &*p.from };
        let guarded = p.dynamic || from.rip >> 12 != rip >> 12;
        let existing = self.stubs.get(&p.site);
        if let Some(st) = existing {
            let same = std::ptr::eq(st.next, next);
            if same && (!guarded || st.generation == generation && st.tlb_epoch == tlb_epoch) {
                // It failed for the budget (or a new code epoch): as meant.
                return;
            }
            if !same && st.retargets >= MAX_RETARGETS {
                return;
            }
        }
        let (out, at, retargets) = match existing {
            Some(st) => (
                st.out,
                st.at,
                st.retargets + u32::from(!std::ptr::eq(st.next, next)),
            ),
            None => match (arena.read_rel32(p.site), arena.next_addr()) {
                (Some(old), Some(at)) => ((p.site as i64 + 4 + i64::from(old)) as usize, at, 0),
                _ => return,
            },
        };
        let mut a = std::mem::take(&mut self.asm);
        a.clear();
        // Failures for another target or new epochs leave asking to be
        // chained again (the stub may be rewritten); for the budget or a
        // new code epoch, not.
        let fail = a.label();
        let done = a.label();
        if p.dynamic {
            a.mov_imm64(RCX, rip);
            a.cmp_reg(RBP, RCX);
            a.jcc(5, fail); // jne
        }
        let total = p.from_len + next.ops.len() as u64;
        a.alu_mem_imm32(CMP, Mem::Base(HOST_RSP, SLOT_BUDGET), total as i32);
        a.jcc(2, done); // jb
        if guarded {
            a.load(RDX, Mem::Base(HOST_RSP, SLOT_OUT));
            a.mov_imm64(RCX, generation);
            a.cmp_mem(Mem::Base(RDX, 16), RCX);
            a.jcc(5, fail);
            a.mov_imm64(RCX, tlb_epoch);
            a.cmp_mem(Mem::Base(RDX, 24), RCX);
            a.jcc(5, fail);
        }
        a.mov_imm64(RDX, next.checked.as_ptr() as u64);
        a.load(RDX, Mem::Base(RDX, 0));
        a.mov_imm64(RCX, from.checked.as_ptr() as u64);
        a.cmp_mem(Mem::Base(RCX, 0), RDX);
        a.jcc(5, done);
        a.alu_mem_imm32(ADD, Mem::Base(HOST_RSP, SLOT_BEFORE), p.from_len as i32);
        a.alu_mem_imm32(SUB, Mem::Base(HOST_RSP, SLOT_BUDGET), p.from_len as i32);
        a.mov_imm64(RDX, next as *const Block as u64);
        a.store(Mem::Base(HOST_RSP, SLOT_BLOCK), RDX);
        a.jmp_abs(at, entry + body);
        a.bind(done);
        a.shift_imm(SHL, RAX, 64 - SITE_SHIFT as u8);
        a.shift_imm(SHR, RAX, 64 - SITE_SHIFT as u8);
        a.bind(fail);
        a.jmp_abs(at, out);
        let fresh = existing.is_none();
        if a.finish() {
            let placed = if fresh {
                let ok = arena.alloc(&a.buf) == Some(at);
                if ok {
                    arena.write_rel32(p.site, (at as i64 - (p.site as i64 + 4)) as i32);
                }
                ok
            } else {
                // Same site, same kind of stub: the same length.
                let ok = self
                    .stubs
                    .get(&p.site)
                    .is_some_and(|st| st.len == a.buf.len());
                if ok {
                    arena.write_bytes(at, &a.buf);
                }
                ok
            };
            if placed {
                self.stubs.insert(
                    p.site,
                    Stub {
                        at,
                        len: a.buf.len(),
                        out,
                        next,
                        generation,
                        tlb_epoch,
                        retargets,
                    },
                );
                self.stats.chained += 1;
            }
        }
        self.asm = a;
    }
}
