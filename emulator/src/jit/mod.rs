//! A translator of hot decoded blocks to host code, for x86-64 hosts.
//!
//! Guest and host are the same architecture, so most integer instructions
//! are not reimplemented at all: the guest instruction itself is
//! re-encoded with host registers in place of guest registers (iced's
//! encoder) and runs natively, which gives the exact results and flags of
//! the hardware the differential tests compare with. Around it the
//! translator emits the glue an emulator needs:
//!
//! - **Registers**: guest GPRs live in [`CpuState::gpr`]; each instruction
//!   loads the ones it uses into host registers and stores the ones it
//!   writes. A guest register is mapped to the same host register when
//!   that one is free for guest use (so implicit operands such as RAX/RDX
//!   of MUL and CL of a shift stay where the instruction expects them),
//!   otherwise to a free one; an instruction with an implicit operand that
//!   cannot be mapped (RSP of PUSH, ...) is not translated.
//! - **Memory**: the guest effective address is computed, looked up in the
//!   fast tables of the software TLB ([`crate::mmu::FastTlb`]: host pages
//!   that passed the permission checks for this access kind and
//!   privilege, writes only to pages without decoded code), and the
//!   memory operand rewritten to the host address. A miss, an access that
//!   leaves its page, MMIO, a write to a page holding code: the block
//!   returns to the interpreter *before* that instruction, which runs it
//!   the full way (page walk, faults, device exits, invalidation).
//! - **Flags**: the guest's arithmetic flags are kept in the host RFLAGS
//!   between instructions that produce and consume them (a CMP and its
//!   Jcc); they are written back to [`CpuState::rflags`] before any glue
//!   that would clobber them and at every exit, and loaded back (POPFQ of
//!   the six arithmetic bits only, so DF, TF and AC of the host stay
//!   clear) before an instruction that reads them or leaves some of them
//!   unchanged.
//! - **Control**: a Jcc inside a block leaves it when taken; a JMP, CALL
//!   or RET at its end writes the next RIP. Anything else (system
//!   instructions, string instructions, SSE/x87, DIV, ...) ends the
//!   translated part: the interpreter goes on from there within the same
//!   block.
//!
//! A block is translated after it has run [`HOT`] times, for the
//! privilege it ran at. Translated code is tied to its decoded block: the
//! cache drops both together, and the code region is recycled (all
//! translations forgotten) when it fills. Executing the code needs no
//! checks beyond those of the interpreter's block loop: the block was
//! validated against guest memory as for the interpreter, and a
//! translated block never writes a page that holds decoded code.
//!
//! `VIREO_EMU_JIT=off` turns it off (the interpreter alone), for
//! comparisons and as a way out.
//!
//! Here: the translator's state and its entry points (translate, run).
//! `plan` decides what each instruction becomes, `emit` writes the host
//! code, `chain` patches exits to enter the next block directly, `asm`
//! encodes host instructions and `arena` holds the executable code.

mod arena;
mod asm;
mod chain;
mod emit;
mod plan;

use iced_x86::{Encoder, InstructionInfoFactory};

use crate::cpu::state::CpuState;
use crate::decode::Block;
use crate::mmu::FastEntry;
use arena::Arena;
use asm::Asm;
use chain::{Pending, Stub};
use emit::prologue_len;
use plan::Plan;

/// Runs of a block before it is translated.
pub(crate) const HOT: u32 = 64;
/// Bytes of translated code before the region is recycled.
const ARENA_SIZE: usize = 64 << 20;

/// Set in a translated block's result when it wrote the next RIP itself
/// (it ran to its end or took a branch); otherwise the interpreter resumes
/// at the instruction whose index is the low half.
pub(crate) const FINISHED: u64 = 1 << 32;

/// `extern "sysv64" fn(state, read table, write table, budget, block,
/// out) -> result`.
type Entry = unsafe extern "sysv64" fn(
    *mut CpuState,
    *const FastEntry,
    *const FastEntry,
    u64,
    *const Block,
    *mut ChainOut,
) -> u64;

/// Where a run of translated code ended when blocks were chained.
#[repr(C)]
pub(crate) struct ChainOut {
    /// The block whose code returned.
    pub block: *const Block,
    /// Instructions the blocks chained before it retired.
    pub before: u64,
    /// The decode cache's generation and the TLB's epoch during the run
    /// (read by the stubs of chains that leave their page).
    pub generation: u64,
    pub tlb_epoch: u64,
}

/// The result's bits 40-63: the offset in the returning block's code of a
/// jump to its exit that may be patched to lead straight to the next
/// block (0: none).
const SITE_SHIFT: u32 = 40;
/// Set with a site whose target is computed (RET, indirect JMP/CALL).
const DYNAMIC: u64 = 1 << 33;

/// The frame every translated block shares (chained blocks run in the
/// frame of the first): `[rsp]` instructions retired by earlier chained
/// blocks, `[rsp+8]` the budget left at the current block's start,
/// `[rsp+16]` the current block, `[rsp+24]` the `ChainOut`.
const SLOT_BEFORE: i32 = 0;
const SLOT_BUDGET: i32 = 8;
const SLOT_BLOCK: i32 = 16;
const SLOT_OUT: i32 = 24;

/// Translation state of one decoded block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Jitted {
    /// Run this many times so far.
    Cold(u32),
    /// Translated: code at `entry` while the arena's epoch is `epoch`, for
    /// accesses at user privilege if `user`.
    Code {
        entry: usize,
        epoch: u64,
        user: bool,
    },
    /// Its first instruction cannot be translated.
    Never,
}

/// Counters for the performance notes.
#[derive(Debug, Default, Clone, Copy)]
pub struct JitStats {
    pub blocks: u64,
    pub bytes: u64,
    pub resets: u64,
    /// Time spent translating.
    pub translate_ns: u64,
    /// Runs of translated code, those that ran to the block's end or took
    /// a branch, and the instructions they retired.
    pub runs: u64,
    pub finished: u64,
    pub retired: u64,
    /// Jumps patched to lead straight to the next block.
    pub chained: u64,
}

/// The translator of one vCPU.
pub(crate) struct Jit {
    arena: Option<Arena>,
    /// The arena could not be mapped: stay with the interpreter.
    broken: bool,
    /// Runs before translation ([`HOT`] unless a test asks otherwise).
    pub hot: u32,
    info: InstructionInfoFactory,
    encoder: Encoder,
    asm: Asm,
    plans: Vec<Plan>,
    /// The last run ended at a chainable site: (its absolute address, the
    /// block it belongs to, that block's instructions on this path, the
    /// RIP it left for, the arena epoch).
    pending: Option<Pending>,
    /// Bytes into a block's code where a chained jump enters it.
    body: usize,
    /// The stub each patched site jumps to.
    stubs: crate::decode::FastMap<usize, Stub>,
    pub stats: JitStats,
}

// SAFETY: the only non-Send part is the block pointer of `pending`, a
// block of the decode cache of the CPU that owns this `Jit`; it is only
// dereferenced by that CPU (see `Jit::chain`), and moves between threads
// with it, like the cache (see `DecodeCache`).
unsafe impl Send for Jit {}

impl Drop for Jit {
    fn drop(&mut self) {
        tracing::debug!(stats = ?self.stats, "emulator: translated code");
    }
}

impl Jit {
    pub fn new() -> Jit {
        Jit {
            arena: None,
            broken: false,
            hot: HOT,
            info: InstructionInfoFactory::new(),
            encoder: Encoder::new(64),
            asm: Asm::default(),
            plans: Vec::new(),
            pending: None,
            body: prologue_len(),
            stubs: Default::default(),
            stats: JitStats::default(),
        }
    }

    /// The host code of `block` for privilege `user`, translating it once
    /// it is hot. `None`: interpret it.
    pub fn code(&mut self, block: &Block, user: bool) -> Option<usize> {
        let epoch = self.arena.as_ref().map(|a| a.epoch);
        match block.jit.get() {
            Jitted::Code {
                entry,
                epoch: e,
                user: u,
            } if Some(e) == epoch => return (u == user).then_some(entry),
            Jitted::Code { .. } => {} // the arena was recycled: again
            Jitted::Cold(n) if n + 1 < self.hot => {
                block.jit.set(Jitted::Cold(n + 1));
                return None;
            }
            Jitted::Cold(_) => {}
            Jitted::Never => return None,
        }
        if self.broken {
            return None;
        }
        let t0 = std::time::Instant::now();
        let ok = self.translate(block, user);
        self.stats.translate_ns += t0.elapsed().as_nanos() as u64;
        if !ok {
            block.jit.set(Jitted::Never);
            return None;
        }
        let bytes = &self.asm.buf;
        let arena = match &mut self.arena {
            Some(a) => a,
            None => match Arena::new(ARENA_SIZE) {
                Ok(a) => self.arena.insert(a),
                Err(e) => {
                    tracing::warn!(
                        "emulator: no memory for translated code ({e}); interpreting only"
                    );
                    self.broken = true;
                    return None;
                }
            },
        };
        let entry = match arena.alloc(bytes) {
            Some(p) => p,
            None => {
                // Full: forget every translation (their blocks see the new
                // epoch) and start over.
                arena.reset();
                self.stubs.clear();
                self.stats.resets += 1;
                arena.alloc(bytes)?
            }
        };
        self.stats.blocks += 1;
        self.stats.bytes += bytes.len() as u64;
        block.jit.set(Jitted::Code {
            entry,
            epoch: arena.epoch,
            user,
        });
        Some(entry)
    }

    /// Run translated code from `block` (at `entry`, from [`Jit::code`]),
    /// chained blocks included, for at most `budget` instructions.
    /// Returns the block whose code returned, the instructions retired,
    /// and where to go on: `None` if RIP was written (the last block ran to
    /// its end or took a branch), else the index of the instruction of the
    /// returned block the interpreter resumes at.
    ///
    /// # Safety
    /// `entry` must come from [`Jit::code`] of this `Jit` for `block`, a
    /// block of the CPU owning `state` and the tables, in the current arena
    /// epoch, with the privilege the code was made for; the tables must be
    /// the CPU's fast read and write tables; `block` must be alive (the
    /// blocks it is chained to live as long as it, see [`Jit::chain`]).
    pub unsafe fn run(
        &mut self,
        entry: usize,
        block: &Block,
        state: &mut CpuState,
        [read, write]: [*const FastEntry; 2],
        budget: u64,
        (generation, tlb_epoch): (u64, u64),
    ) -> (*const Block, u64, Option<usize>) {
        // SAFETY: `entry` is the start of a function with this signature
        // (the caller's promise), emitted by `translate`.
        let f: Entry = unsafe { std::mem::transmute::<usize, Entry>(entry) };
        let mut out = ChainOut {
            block,
            before: 0,
            generation,
            tlb_epoch,
        };
        // SAFETY: the code reads and writes `state`, RAM pages the tables
        // map (valid while the CPU's memory lives), its own frame and
        // `out`, and reads the `checked` cells of live blocks it chains.
        let r = unsafe { f(state, read, write, budget, block, &mut out) };
        let own = r & 0xffff_ffff;
        let retired = out.before + own;
        self.stats.runs += 1;
        self.stats.retired += retired;
        if r & FINISHED == 0 {
            self.pending = None;
            return (out.block, retired, Some(own as usize));
        }
        self.stats.finished += 1;
        let site = (r >> SITE_SHIFT) as usize;
        // The code of the block that returned: the entry of the block run
        // first, or of a chained one (read from its translation state).
        // SAFETY: `out.block` is `block` or a block chained from it, alive
        // (see above).
        let last = unsafe { &*out.block };
        self.pending = match (site, last.jit.get(), &self.arena) {
            (1.., Jitted::Code { entry, epoch, user }, Some(a)) if epoch == a.epoch => {
                Some(Pending {
                    site: entry + site,
                    dynamic: r & DYNAMIC != 0,
                    from: out.block,
                    from_len: own,
                    user,
                    rip: state.rip,
                    epoch,
                    generation,
                    tlb_epoch,
                })
            }
            _ => None,
        };
        (out.block, retired, None)
    }

    /// Something else than a translated block runs next: the last run's
    /// exit is not chained.
    pub fn forget_pending(&mut self) {
        self.pending = None;
    }

    /// Host code for the longest translatable start of `block`, into `self.asm`; `false` if not even the first instruction can be
    /// translated.
    fn translate(&mut self, block: &Block, user: bool) -> bool {
        let mut plans = std::mem::take(&mut self.plans);
        plans.clear();
        for op in block.ops.iter() {
            match self.plan(&op.instr) {
                Some(p) => {
                    let ends = p.ends();
                    plans.push(p);
                    if ends {
                        break;
                    }
                }
                None => break,
            }
        }
        let fallthrough = block
            .ops
            .get(plans.len())
            .map(|op| op.instr.ip())
            .or_else(|| block.ops.last().map(|op| op.instr.next_ip()));
        let ok = match fallthrough {
            Some(next) if plans.iter().any(|p| !matches!(p, Plan::Nothing)) => {
                let all = plans.len() == block.ops.len();
                emit::emit(&mut self.asm, &plans, user, all, next)
            }
            _ => false,
        };
        self.plans = plans;
        ok
    }
}
