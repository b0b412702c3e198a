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

mod arena;
mod asm;

use iced_x86::{
    Code, CodeSize, ConditionCode, Encoder, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};
use std::mem::offset_of;

use crate::cpu::state::CpuState;
use crate::decode::Block;
use crate::mmu::{FastEntry, FAST_SIZE};
use arena::Arena;
use asm::{Asm, Label, Mem, R12, R13, R14, R15, RAX, RBP, RBX, RCX, RDX, RSP as HOST_RSP};

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

/// A chainable exit the last run took (see [`Jit::chain`]).
#[derive(Clone, Copy)]
struct Pending {
    /// The executable address of the jump's displacement.
    site: usize,
    /// Its target is computed (RET, indirect JMP/CALL).
    dynamic: bool,
    /// The block it belongs to, its instructions on that path, and the
    /// privilege its code was made for.
    from: *const Block,
    from_len: u64,
    user: bool,
    /// The RIP it left for.
    rip: u64,
    /// The arena's epoch, the decode cache's generation and the TLB's
    /// epoch then.
    epoch: u64,
    generation: u64,
    tlb_epoch: u64,
}

/// A stub a site was pointed at (see [`Jit::chain`]).
struct Stub {
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

const ARITH: u32 = 0x3f; // iced RflagsBits: OF SF ZF AF CF PF
const GUEST_ARITH: i32 = 0x8d5; // the same bits in RFLAGS

/// Host registers guest registers are loaded into (by host number). RSP,
/// R12 (guest state), R13/R14 (fast read/write tables), R15 (effective
/// address) and RBP (flags) are the translator's own.
const POOL: [usize; 10] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11];

fn in_pool(h: usize) -> bool {
    POOL.contains(&h)
}

/// Host (or guest) 64-bit register number `n`.
fn r64(n: usize) -> Register {
    Register::try_from(Register::RAX as usize + (n & 15)).unwrap_or(Register::RAX)
}

/// Number (0-15) of the 64-bit register holding GPR `r`.
fn gpr_number(r: Register) -> Option<usize> {
    if !r.is_gpr() {
        return None;
    }
    Some(r.full_register() as usize - Register::RAX as usize)
}

/// `r` (a GPR of some width) moved to host register `h`, or `None` if it
/// has no such form (AH..BH live only in RAX..RBX).
fn resize(r: Register, h: usize) -> Option<Register> {
    use Register as R;
    let g = gpr_number(r)?;
    // Registers of one width are consecutive in iced's enum.
    let base =
        |first: Register, n: usize| Register::try_from(first as usize + n).unwrap_or(R::None);
    let out = if r.is_gpr64() {
        base(R::RAX, h)
    } else if r.is_gpr32() {
        base(R::EAX, h)
    } else if r.is_gpr16() {
        base(R::AX, h)
    } else if (R::AH as usize..=R::BH as usize).contains(&(r as usize)) {
        if h != g {
            return None;
        }
        r
    } else if h < 4 {
        base(R::AL, h)
    } else if h < 8 {
        base(R::SPL, h - 4)
    } else {
        base(R::R8L, h - 8)
    };
    (out != R::None).then_some(out)
}

/// Mnemonics whose register and memory operands are all explicit (or
/// RAX/RCX/RDX, which keep their own host register), that cannot fault
/// except on their memory operand, and that compute the same on the host
/// as the emulator does (the differential tests check that).
fn native(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Add
            | M::Adc
            | M::Sub
            | M::Sbb
            | M::Cmp
            | M::And
            | M::Or
            | M::Xor
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shld
            | M::Shrd
            | M::Imul
            | M::Mul
            | M::Xchg
            | M::Xadd
            | M::Cmpxchg
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Bswap
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

/// Shifts and rotates leave the flags alone for a count of 0.
fn shift(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// A guest memory access of a native instruction.
struct Access {
    /// Effective address: base and index host registers, scale, and a
    /// displacement, or an absolute address (RIP-relative).
    base: Option<u8>,
    index: Option<u8>,
    scale: u8,
    displ: i64,
    absolute: Option<u64>,
    /// FS or GS: add its base.
    seg: Option<usize>,
    len: u64,
    write: bool,
    /// Free host registers for the lookup; the rewritten operand is
    /// `[a + b]`.
    a: u8,
    b: u8,
}

/// One native instruction, ready to emit.
struct NativeOp {
    /// The guest instruction with host registers, encoded.
    code: [u8; 15],
    len: u8,
    /// (guest, host) registers to load before and store after.
    load: [(u8, u8); 16],
    loads: u8,
    store: [(u8, u8); 16],
    stores: u8,
    access: Option<Access>,
    /// Needs the guest flags in the host RFLAGS before it runs.
    needs_flags: bool,
    /// Writes some flags.
    sets_flags: bool,
}

#[allow(clippy::large_enum_variant)] // kept in one reused Vec
enum Plan {
    Native(NativeOp),
    /// Does nothing (NOP, ENDBR64, PAUSE).
    Nothing,
    Jcc {
        /// The condition's encoding (0 O .. 15 G).
        cc: u8,
        target: u64,
    },
    Jmp {
        target: u64,
    },
    /// PUSH/POP of a 64-bit register.
    Push(u8),
    Pop(u8),
    /// Near CALL to an address or to a register's value; `ret` is pushed.
    Call {
        target: Target,
        ret: u64,
    },
    /// JMP to a register's value.
    JmpReg(u8),
    /// Near RET without an immediate.
    Ret,
}

#[derive(Clone, Copy)]
enum Target {
    Direct(u64),
    Reg(u8),
}

impl Plan {
    /// It writes RIP: the block ends with it.
    fn ends(&self) -> bool {
        matches!(
            self,
            Plan::Jmp { .. } | Plan::Call { .. } | Plan::JmpReg(_) | Plan::Ret
        )
    }
}

/// The lookup registers of the stack templates (no guest register is held
/// in a host register there): page in RAX, offset in RCX, value in RDX.
const STACK_A: u8 = RAX;
const STACK_B: u8 = RCX;
const RSP: u8 = 4;

fn stack_access(write: bool) -> Access {
    Access {
        base: None,
        index: None,
        scale: 1,
        displ: 0,
        absolute: None,
        seg: None,
        len: 8,
        write,
        a: STACK_A,
        b: STACK_B,
    }
}

/// Offsets into [`CpuState`] (R12 points to it).
fn off_gpr(g: usize) -> i32 {
    (offset_of!(CpuState, gpr) + 8 * g) as i32
}
fn off_rflags() -> i32 {
    offset_of!(CpuState, rflags) as i32
}
fn off_rip() -> i32 {
    offset_of!(CpuState, rip) as i32
}
fn off_seg_base(seg: usize) -> i32 {
    (offset_of!(CpuState, seg)
        + seg * std::mem::size_of::<vireo_hypervisor::Segment>()
        + offset_of!(vireo_hypervisor::Segment, base)) as i32
}

// The lookup below indexes the fast tables as 24-byte entries with the tag
// first and the host page address second.
const _: () = assert!(std::mem::size_of::<FastEntry>() == 24);
const _: () = assert!(offset_of!(FastEntry, tag) == 0);
const _: () = assert!(offset_of!(FastEntry, host) == 8);
const _: () = assert!(FAST_SIZE.is_power_of_two());

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

    /// The block `next` at RIP is about to run from `entry`: if the last
    /// run left through a site (see [`exit_to`]) for this RIP, point that
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

    /// Plan one instruction, or `None` if it must be interpreted.
    fn plan(&mut self, i: &Instruction) -> Option<Plan> {
        use Mnemonic as M;
        if i.code_size() != CodeSize::Code64 {
            return None;
        }
        match i.mnemonic() {
            M::Nop | M::Endbr64 | M::Pause => return Some(Plan::Nothing),
            // A branch to a non-canonical address raises #GP at the
            // branch: the interpreter does that.
            M::Jmp
                if i.op0_kind() == OpKind::NearBranch64
                    && crate::mmu::is_canonical(i.near_branch_target()) =>
            {
                return Some(Plan::Jmp {
                    target: i.near_branch_target(),
                })
            }
            m if crate::exec::is_jcc(m)
                && i.op0_kind() == OpKind::NearBranch64
                && i.condition_code() != ConditionCode::None
                && crate::mmu::is_canonical(i.near_branch_target()) =>
            {
                // iced numbers the conditions from 1 in encoding order.
                return Some(Plan::Jcc {
                    cc: i.condition_code() as u8 - 1,
                    target: i.near_branch_target(),
                });
            }
            M::Push if i.code() == Code::Push_r64 => {
                return Some(Plan::Push(gpr_number(i.op0_register())? as u8))
            }
            M::Pop if i.code() == Code::Pop_r64 => {
                return Some(Plan::Pop(gpr_number(i.op0_register())? as u8))
            }
            M::Call if i.code() == Code::Call_rel32_64 => {
                let target = i.near_branch_target();
                return crate::mmu::is_canonical(target).then_some(Plan::Call {
                    target: Target::Direct(target),
                    ret: i.next_ip(),
                });
            }
            M::Call if i.code() == Code::Call_rm64 && i.op0_kind() == OpKind::Register => {
                return Some(Plan::Call {
                    target: Target::Reg(gpr_number(i.op0_register())? as u8),
                    ret: i.next_ip(),
                });
            }
            M::Jmp if i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Register => {
                return Some(Plan::JmpReg(gpr_number(i.op0_register())? as u8))
            }
            M::Ret if i.code() == Code::Retnq => return Some(Plan::Ret),
            m if native(m) => {}
            _ => return None,
        }
        if i.has_rep_prefix() || i.has_repne_prefix() {
            return None;
        }
        let info = self.info.info(i);
        // Guest registers used and how.
        let mut used: [Option<OpAccess>; 16] = [None; 16];
        for u in info.used_registers() {
            let r = u.register();
            if let Some(g) = gpr_number(r) {
                used[g] = Some(match (used[g], u.access()) {
                    (None, a) => a,
                    (Some(a), b) if a == b => a,
                    _ => OpAccess::ReadWrite,
                });
            } else if !(r.is_segment_register() || r == Register::RIP) {
                return None;
            }
        }
        let mems = info.used_memory();
        let mem_access = match mems {
            [] => None,
            [m] => Some(m.access()),
            _ => return None,
        };
        let flags_read = i.rflags_read() & ARITH != 0;
        let modified = i.rflags_modified() & ARITH;
        // Explicit register operands (any guest register can be moved to
        // another host register there).
        let mut explicit = [false; 16];
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                if let Some(g) = gpr_number(i.op_register(n)) {
                    explicit[g] = true;
                }
            }
        }
        let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
        if has_mem {
            for r in [i.memory_base(), i.memory_index()] {
                if let Some(g) = gpr_number(r) {
                    explicit[g] = true;
                }
            }
            if !crate::exec::fast::addr64(i) {
                return None;
            }
        }
        // Map: identity for guest registers the pool has, else a free one.
        let mut host = [usize::MAX; 16];
        let mut taken = [false; 16];
        for g in 0..16 {
            if used[g].is_some() && in_pool(g) {
                host[g] = g;
                taken[g] = true;
            }
        }
        for g in 0..16 {
            if used[g].is_some() && host[g] == usize::MAX {
                if !explicit[g] {
                    return None;
                }
                let h = *POOL.iter().find(|&&h| !taken[h])?;
                host[g] = h;
                taken[h] = true;
            }
        }
        let mut instr = *i;
        // MOV's moffs forms address memory by an absolute address with no
        // ModRM byte, so they cannot take the host address: use the ModRM
        // forms, same operands.
        let modrm = match i.code() {
            Code::Mov_AL_moffs8 => Some(Code::Mov_r8_rm8),
            Code::Mov_AX_moffs16 => Some(Code::Mov_r16_rm16),
            Code::Mov_EAX_moffs32 => Some(Code::Mov_r32_rm32),
            Code::Mov_RAX_moffs64 => Some(Code::Mov_r64_rm64),
            Code::Mov_moffs8_AL => Some(Code::Mov_rm8_r8),
            Code::Mov_moffs16_AX => Some(Code::Mov_rm16_r16),
            Code::Mov_moffs32_EAX => Some(Code::Mov_rm32_r32),
            Code::Mov_moffs64_RAX => Some(Code::Mov_rm64_r64),
            _ => None,
        };
        if let Some(code) = modrm {
            instr.set_code(code);
        }
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                let r = i.op_register(n);
                let g = gpr_number(r)?;
                instr.set_op_register(n, resize(r, host[g])?);
            }
        }
        let mut access = None;
        if has_mem {
            let base = gpr_number(i.memory_base()).map(|g| host[g]);
            let index = gpr_number(i.memory_index()).map(|g| host[g]);
            let (base8, index8) = (base.map(|h| h as u8), index.map(|h| h as u8));
            let displ = i.memory_displacement64() as i64;
            let absolute = (i.memory_base() == Register::RIP).then(|| i.memory_displacement64());
            if absolute.is_none() && i32::try_from(displ).is_err() {
                return None;
            }
            match mem_access {
                Some(OpAccess::NoMemAccess) | None => {
                    // LEA (or a NOP-like form): registers only.
                    if i.mnemonic() != M::Lea {
                        return None;
                    }
                    let (b, d) = match absolute {
                        Some(abs) => (Register::None, i32::try_from(abs as i64).ok()? as i64),
                        None => (base.map_or(Register::None, r64), displ),
                    };
                    instr.set_memory_base(b);
                    instr.set_memory_index(index.map_or(Register::None, r64));
                    instr.set_memory_displacement64(d as u64);
                    // iced's displacement size of 64-bit addressing: 8.
                    instr.set_memory_displ_size(if d == 0 && b != Register::None { 0 } else { 8 });
                    instr.set_segment_prefix(Register::None);
                }
                Some(acc) => {
                    let len = i.memory_size().size() as u64;
                    if !matches!(len, 1 | 2 | 4 | 8) {
                        return None;
                    }
                    // A register bit offset addresses beyond the operand.
                    if matches!(i.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
                        && i.op1_kind() == OpKind::Register
                    {
                        return None;
                    }
                    let seg = match i.memory_segment() {
                        Register::FS => Some(4),
                        Register::GS => Some(5),
                        _ => None,
                    };
                    let mut free = POOL.iter().copied().filter(|&h| !taken[h]);
                    let a = free.next()?;
                    let b = free.next()?;
                    let write = !matches!(acc, OpAccess::Read | OpAccess::CondRead);
                    instr.set_memory_base(r64(a));
                    instr.set_memory_index(r64(b));
                    instr.set_memory_index_scale(1);
                    instr.set_memory_displacement64(0);
                    instr.set_memory_displ_size(0);
                    instr.set_segment_prefix(Register::None);
                    access = Some(Access {
                        base: base8,
                        index: index8,
                        scale: i.memory_index_scale() as u8,
                        displ,
                        absolute,
                        seg,
                        len,
                        write,
                        a: a as u8,
                        b: b as u8,
                    });
                }
            }
        }
        // The host must be able to encode it (AH..BH next to a REX
        // register cannot be).
        let len = self.encoder.encode(&instr, 0).ok()?;
        // What the encoder wrote must be what was meant: decode it back
        // (a form that cannot take the rewritten operands would otherwise
        // address something else on the host).
        let check = {
            let buf = self.encoder.take_buffer();
            let back =
                iced_x86::Decoder::with_ip(64, &buf, 0, iced_x86::DecoderOptions::NONE).decode();
            self.encoder.set_buffer(buf);
            back
        };
        if check.code() != instr.code()
            || check.len() != len
            || (has_mem
                && (check.memory_base() != instr.memory_base()
                    || check.memory_index() != instr.memory_index()
                    || check.memory_displacement64() != instr.memory_displacement64()))
        {
            let mut buf = self.encoder.take_buffer();
            buf.clear();
            self.encoder.set_buffer(buf);
            return None;
        }
        let mut bytes = self.encoder.take_buffer();
        let mut code = [0u8; 15];
        let copied = bytes
            .get(..len)
            .zip(code.get_mut(..len))
            .map(|(from, to)| to.copy_from_slice(from));
        bytes.clear();
        self.encoder.set_buffer(bytes);
        copied?;
        let mut op = NativeOp {
            code,
            len: len as u8,
            load: [(0, 0); 16],
            loads: 0,
            store: [(0, 0); 16],
            stores: 0,
            access,
            needs_flags: flags_read || (modified != 0 && modified != ARITH) || shift(i.mnemonic()),
            sets_flags: modified != 0,
        };
        for g in 0..16 {
            if let Some(acc) = used[g] {
                op.load[op.loads as usize] = (g as u8, host[g] as u8);
                op.loads += 1;
                if !matches!(acc, OpAccess::Read | OpAccess::CondRead | OpAccess::None) {
                    op.store[op.stores as usize] = (g as u8, host[g] as u8);
                    op.stores += 1;
                }
            }
        }
        Some(Plan::Native(op))
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
                emit(&mut self.asm, &plans, user, all, next)
            }
            _ => false,
        };
        self.plans = plans;
        ok
    }
}

/// Emit the function for `plans` (the first instructions of a block) into
/// `a`; `all` if they are the whole block, whose next instruction is then
/// at `next`; otherwise the interpreter resumes at instruction
/// `plans.len()`. `false` if it could not be assembled.
fn emit(a: &mut Asm, plans: &[Plan], user: bool, all: bool, next: u64) -> bool {
    a.clear();
    let out = a.label();
    // Exits jumped to from the body: (label, result, new RIP, flags in
    // host, guest registers to write back).
    let mut stubs: Vec<(Label, u64, Option<u64>, bool, u16)> = Vec::new();
    prologue(a);
    let mut in_host = false;
    let mut c = Cache::default();
    for (k, plan) in plans.iter().enumerate() {
        let k = k as u64;
        match plan {
            Plan::Nothing => {}
            Plan::Jmp { target } => {
                spill(a, &mut in_host);
                c.write_back(a);
                exit_to(a, *target, k + 1, out);
            }
            Plan::Jcc { cc, target } => {
                if !in_host {
                    fill(a);
                    in_host = true;
                }
                let taken = a.label();
                a.jcc(*cc, taken);
                stubs.push((taken, FINISHED | (k + 1), Some(*target), true, c.dirty));
            }
            Plan::Push(g) => {
                spill(a, &mut in_host);
                c.flush_all_of(a, &[STACK_A, STACK_B, RDX, *g]);
                a.load(R15, gpr(RSP));
                a.alu_imm(true, SUB, R15, 8);
                let miss = a.label();
                lookup(a, &stack_access(true), user, miss);
                stubs.push((miss, k, None, false, c.dirty));
                a.load(RDX, gpr(*g));
                a.store(Mem::Sib(STACK_A, STACK_B, 1, 0), RDX);
                a.store(gpr(RSP), R15);
            }
            Plan::Pop(g) => {
                spill(a, &mut in_host);
                c.flush_all_of(a, &[STACK_A, STACK_B, RDX]);
                a.load(R15, gpr(RSP));
                let miss = a.label();
                lookup(a, &stack_access(false), user, miss);
                stubs.push((miss, k, None, false, c.dirty));
                a.load(RDX, Mem::Sib(STACK_A, STACK_B, 1, 0));
                a.alu_imm(true, ADD, R15, 8);
                // RSP first: POP RSP loads the popped value.
                a.store(gpr(RSP), R15);
                a.store(gpr(*g), RDX);
                c.forget(*g);
            }
            Plan::Call { target, ret } => {
                spill(a, &mut in_host);
                c.write_back(a);
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                if let Target::Reg(g) = target {
                    a.load(RBP, gpr(*g));
                    canonical_or(a, RBP, miss);
                }
                a.load(R15, gpr(RSP));
                a.alu_imm(true, SUB, R15, 8);
                lookup(a, &stack_access(true), user, miss);
                a.mov_imm(RDX, *ret);
                a.store(Mem::Sib(STACK_A, STACK_B, 1, 0), RDX);
                a.store(gpr(RSP), R15);
                match target {
                    Target::Direct(t) => exit_to(a, *t, k + 1, out),
                    Target::Reg(_) => exit_to_rbp(a, k + 1, out),
                }
            }
            Plan::JmpReg(g) => {
                spill(a, &mut in_host);
                c.write_back(a);
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                a.load(RBP, gpr(*g));
                canonical_or(a, RBP, miss);
                exit_to_rbp(a, k + 1, out);
            }
            Plan::Ret => {
                spill(a, &mut in_host);
                c.write_back(a);
                a.load(R15, gpr(RSP));
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                lookup(a, &stack_access(false), user, miss);
                a.load(RBP, Mem::Sib(STACK_A, STACK_B, 1, 0));
                canonical_or(a, RBP, miss);
                a.alu_imm(true, ADD, R15, 8);
                a.store(gpr(RSP), R15);
                exit_to_rbp(a, k + 1, out);
            }
            Plan::Native(op) => {
                // Host registers this instruction takes for something else
                // than their own guest register give up what they cache.
                for &(g, h) in &op.load[..op.loads as usize] {
                    if g != h {
                        c.flush(a, h);
                    }
                }
                if let Some(m) = &op.access {
                    c.flush(a, m.a);
                    c.flush(a, m.b);
                }
                for &(g, h) in &op.load[..op.loads as usize] {
                    if g != h {
                        a.load(h, gpr(g));
                    } else if !c.has(g) {
                        a.load(h, gpr(g));
                        c.valid |= 1 << g;
                    }
                }
                if let Some(m) = &op.access {
                    // The lookup clobbers the host flags.
                    spill(a, &mut in_host);
                    effective_address(a, m);
                    let miss = a.label();
                    lookup(a, m, user, miss);
                    stubs.push((miss, k, None, false, c.dirty));
                }
                if op.needs_flags && !in_host {
                    fill(a);
                }
                a.bytes(&op.code[..op.len as usize]);
                if op.sets_flags || op.needs_flags {
                    in_host = true;
                }
                for &(g, h) in &op.store[..op.stores as usize] {
                    if g != h {
                        a.store(gpr(g), h);
                    } else {
                        c.dirty |= 1 << g;
                    }
                }
            }
        }
    }
    if !plans.last().is_some_and(Plan::ends) {
        spill(a, &mut in_host);
        c.write_back(a);
        if all {
            exit_to(a, next, plans.len() as u64, out);
        } else {
            a.mov_imm(RAX, plans.len() as u64);
            a.jmp(out);
        }
    }
    for (label, result, rip, flags_in_host, dirty) in stubs {
        a.bind(label);
        let mut f = flags_in_host;
        spill(a, &mut f);
        Cache {
            valid: dirty,
            dirty,
        }
        .write_back(a);
        match rip {
            Some(rip) => exit_to(a, rip, result & !FINISHED, out),
            None => {
                a.mov_imm(RAX, result);
                a.jmp(out);
            }
        }
    }
    a.bind(out);
    epilogue(a);
    a.finish()
}

/// Guest registers of the pool held in their own host register across the
/// instructions of a block (bit n: guest register n in host register n).
#[derive(Default, Clone, Copy)]
struct Cache {
    /// The host register holds the guest register's value.
    valid: u16,
    /// ... which is newer than the guest state in memory.
    dirty: u16,
}

impl Cache {
    fn has(&self, g: u8) -> bool {
        self.valid & (1 << g) != 0
    }

    /// Host register `h` is needed for something else: write its guest
    /// register back if changed, and forget it.
    fn flush(&mut self, a: &mut Asm, h: u8) {
        if self.dirty & (1 << h) != 0 {
            a.store(gpr(h), h);
        }
        self.forget(h);
    }

    fn flush_all_of(&mut self, a: &mut Asm, hs: &[u8]) {
        for &h in hs {
            self.flush(a, h);
        }
    }

    /// The guest register changed in memory: the host copy is stale.
    fn forget(&mut self, g: u8) {
        self.valid &= !(1 << g);
        self.dirty &= !(1 << g);
    }

    /// Store every changed register (before leaving the block).
    fn write_back(&mut self, a: &mut Asm) {
        for h in 0..16u8 {
            if self.dirty & (1 << h) != 0 {
                a.store(gpr(h), h);
            }
        }
        self.dirty = 0;
    }
}

/// Save the host's callee-saved registers, build the frame (see
/// [`SLOT_BEFORE`]) and load R12-R14 from the arguments.
fn prologue(a: &mut Asm) {
    for r in [RBX, RBP, R12, R13, R14, R15] {
        a.push(r);
    }
    a.push(9); // R9: the ChainOut
    a.push(8); // R8: the block
    a.push(RCX); // the budget
    a.push_zero(); // retired before
    a.mov(R12, 7); // RDI: the guest state
    a.mov(R13, 6); // RSI: the fast read table
    a.mov(R14, RDX); // the fast write table
}

/// Bytes of [`prologue`]: a chained jump enters a block this far in.
fn prologue_len() -> usize {
    let mut a = Asm::default();
    prologue(&mut a);
    a.buf.len()
}

/// Report the current block and the count before it, drop the frame and
/// return RAX.
fn epilogue(a: &mut Asm) {
    a.load(RDX, Mem::Base(HOST_RSP, SLOT_OUT));
    a.load(RCX, Mem::Base(HOST_RSP, SLOT_BLOCK));
    a.store(Mem::Base(RDX, 0), RCX);
    a.load(RCX, Mem::Base(HOST_RSP, SLOT_BEFORE));
    a.store(Mem::Base(RDX, 8), RCX);
    a.alu_imm(true, ADD, HOST_RSP, 32);
    for r in [R15, R14, R13, R12, RBP, RBX] {
        a.pop(r);
    }
    a.ret();
}

/// Leave for `rip` after `retired` instructions of the block (flags
/// spilled), through a site the dispatcher may later point at the next
/// block (see [`Jit::chain`]); its offset goes into the result.
fn exit_to(a: &mut Asm, rip: u64, retired: u64, out: Label) {
    a.mov_imm(RBP, rip);
    exit_via_site(a, retired, 0, out);
}

/// Leave for the RIP in RBP (RET, indirect JMP/CALL) through a site, like
/// [`exit_to`]; a stub there also compares the RIP.
fn exit_to_rbp(a: &mut Asm, retired: u64, out: Label) {
    exit_via_site(a, retired, DYNAMIC, out);
}

fn exit_via_site(a: &mut Asm, retired: u64, kind: u64, out: Label) {
    a.store(Mem::Base(R12, off_rip()), RBP);
    // mov rax, imm64 (10 bytes), then the jump's opcode byte.
    let site = (a.buf.len() + 11) as u64;
    a.mov_imm64(RAX, FINISHED | kind | retired | (site << SITE_SHIFT));
    a.jmp(out);
}

const ADD: u8 = 0;
const OR: u8 = 1;
const AND: u8 = 4;
const SUB: u8 = 5;
const CMP: u8 = 7;
const SHL: u8 = 4;
const SHR: u8 = 5;
const SAR: u8 = 7;

/// Guest register `g` in the state R12 points to.
fn gpr(g: u8) -> Mem {
    Mem::Base(R12, off_gpr(g as usize))
}

/// Store the guest flags held in the host RFLAGS.
fn spill(a: &mut Asm, in_host: &mut bool) {
    if *in_host {
        a.pushfq();
        a.pop(RBP);
        a.alu_imm(false, AND, RBP, GUEST_ARITH);
        a.and_mem_imm(Mem::Base(R12, off_rflags()), !GUEST_ARITH);
        a.or_mem(Mem::Base(R12, off_rflags()), RBP);
        *in_host = false;
    }
}

/// Load the guest's arithmetic flags into the host RFLAGS (IF set as in
/// any user process; DF, TF, AC clear).
fn fill(a: &mut Asm) {
    a.load(RBP, Mem::Base(R12, off_rflags()));
    a.alu_imm(false, AND, RBP, GUEST_ARITH);
    a.alu_imm(false, OR, RBP, 0x202);
    a.push(RBP);
    a.popfq();
}

/// Jump to `bad` unless `r` is a canonical address (the interpreter then
/// raises the #GP). Uses RDX and the flags.
fn canonical_or(a: &mut Asm, r: u8, bad: Label) {
    a.mov(RDX, r);
    a.shift_imm(SAR, RDX, 47);
    a.alu_imm(true, ADD, RDX, 1);
    a.alu_imm(true, CMP, RDX, 1);
    a.jcc(7, bad); // ja
}

/// R15 = the guest linear address of `m`.
fn effective_address(a: &mut Asm, m: &Access) {
    match (m.absolute, m.base, m.index) {
        (Some(abs), _, _) => a.mov_imm(R15, abs),
        (None, None, None) => a.mov_imm(R15, m.displ as u64),
        (None, Some(b), None) => a.lea(R15, Mem::Base(b, m.displ as i32)),
        (None, Some(b), Some(i)) => a.lea(R15, Mem::Sib(b, i, m.scale, m.displ as i32)),
        (None, None, Some(i)) => a.lea(R15, Mem::Index(i, m.scale, m.displ as i32)),
    }
    if let Some(seg) = m.seg {
        a.add_load(R15, Mem::Base(R12, off_seg_base(seg)));
    }
}

/// Look R15 up in the fast table for `m` and leave the host page in `a`
/// and the offset in `b`; jump to `miss` when the page is not there (or
/// the access leaves it).
fn lookup(a: &mut Asm, m: &Access, user: bool, miss: Label) {
    let (ra, rb) = (m.a, m.b);
    let table = if m.write { R14 } else { R13 };
    // The tag of the access's last byte: an access that leaves the page
    // does not match the entry of its first byte.
    a.lea(ra, Mem::Base(R15, m.len as i32 - 1));
    a.shift_imm(SHR, ra, 12);
    a.lea(ra, Mem::Sib(ra, ra, 1, i32::from(user)));
    a.mov(rb, R15);
    a.shift_imm(SHR, rb, 12);
    a.alu_imm(true, AND, rb, (FAST_SIZE - 1) as i32);
    a.lea(rb, Mem::Sib(rb, rb, 2, 0));
    a.cmp_mem(Mem::Sib(table, rb, 8, 0), ra);
    a.jcc(5, miss); // jne
    a.load(ra, Mem::Sib(table, rb, 8, 8));
    a.mov(rb, R15);
    a.alu_imm(true, AND, rb, 0xfff);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_bytes(bytes: &[u8]) -> Option<Instruction> {
        let i = iced_x86::Decoder::with_ip(64, bytes, 0x10_0000, iced_x86::DecoderOptions::NONE)
            .decode();
        match Jit::new().plan(&i)? {
            Plan::Native(op) => Some(
                iced_x86::Decoder::with_ip(
                    64,
                    &op.code[..op.len as usize],
                    0,
                    iced_x86::DecoderOptions::NONE,
                )
                .decode(),
            ),
            _ => None,
        }
    }

    #[test]
    fn memory_operands_become_host_addresses() {
        // mov [0x100000], rax (moffs: no ModRM byte) -> mov [a+b], rax
        let i = plan_bytes(&[0x48, 0xa3, 0, 0, 0x10, 0, 0, 0, 0, 0]).expect("translated");
        assert_eq!(i.code(), Code::Mov_rm64_r64);
        assert_eq!(i.op1_register(), Register::RAX);
        assert_ne!(i.memory_base(), Register::None);
        assert_eq!(i.memory_displacement64(), 0);
        // add r12d, [rsp+rbx*4+8]: R12 and RSP move to free host registers.
        let i = plan_bytes(&[0x44, 0x03, 0x64, 0x9c, 0x08]).expect("translated");
        assert_eq!(i.code(), Code::Add_r32_rm32);
        assert!(!matches!(i.op0_register(), Register::R12D | Register::ESP));
        assert_eq!(i.memory_index_scale(), 1);
        // lea rax, [rip+0x10] -> an absolute address
        let i = plan_bytes(&[0x48, 0x8d, 0x05, 0x10, 0, 0, 0]).expect("translated");
        assert_eq!(i.memory_base(), Register::None);
        assert_eq!(i.memory_displacement64(), 0x10_0017);
        // mov ah, [rbx]: AH stays in RAX, the lookup registers need no REX.
        assert!(plan_bytes(&[0x8a, 0x27]).is_some());
        // jmp to a non-canonical address (#GP at the jmp): interpreted.
        let i = iced_x86::Decoder::with_ip(
            64,
            &[0xe9, 0, 0, 0, 0],
            0x7fff_ffff_fffb,
            iced_x86::DecoderOptions::NONE,
        )
        .decode();
        assert!(Jit::new().plan(&i).is_none());
        // div rcx: may fault (#DE), interpreted.
        assert!(plan_bytes(&[0x48, 0xf7, 0xf1]).is_none());
        // mov rax, [0xffffffff_00000000] (moffs beyond 32 bits): interpreted.
        assert!(plan_bytes(&[0x48, 0xa1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn registers_move_between_widths() {
        assert_eq!(resize(Register::R12D, 1), Some(Register::ECX));
        assert_eq!(resize(Register::R13, 8), Some(Register::R8));
        assert_eq!(resize(Register::SPL, 2), Some(Register::DL));
        assert_eq!(resize(Register::BL, 9), Some(Register::R9L));
        assert_eq!(resize(Register::AL, 6), Some(Register::SIL));
        assert_eq!(resize(Register::AH, 0), Some(Register::AH));
        assert_eq!(resize(Register::BH, 6), None);
        assert_eq!(resize(Register::R15W, 3), Some(Register::BX));
    }
}
