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

use iced_x86::code_asm::registers::gpr64::get_gpr64;
use iced_x86::code_asm::*;
use iced_x86::{
    Code, CodeSize, ConditionCode, Encoder, Instruction, InstructionInfoFactory, MemoryOperand,
    Mnemonic, OpAccess, OpKind, Register,
};
use std::mem::offset_of;

use crate::cpu::state::CpuState;
use crate::decode::Block;
use crate::mmu::{FastEntry, FAST_SIZE};
use arena::Arena;

/// Runs of a block before it is translated.
pub(crate) const HOT: u32 = 400;
/// Bytes of translated code before the region is recycled.
const ARENA_SIZE: usize = 64 << 20;

/// Set in a translated block's result when it wrote the next RIP itself
/// (it ran to its end or took a branch); otherwise the interpreter resumes
/// at the instruction whose index is the low half.
pub(crate) const FINISHED: u64 = 1 << 32;

/// `extern "sysv64" fn(state, read table, write table) -> result`.
type Entry = unsafe extern "sysv64" fn(*mut CpuState, *const FastEntry, *const FastEntry) -> u64;

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
}

/// The translator of one vCPU.
pub(crate) struct Jit {
    arena: Option<Arena>,
    /// The arena could not be mapped: stay with the interpreter.
    broken: bool,
    /// Runs before translation ([`HOT`] unless a test asks otherwise).
    pub hot: u32,
    info: InstructionInfoFactory,
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

fn asm64(n: usize) -> AsmRegister64 {
    // Every `r64` is a 64-bit GPR.
    get_gpr64(r64(n)).unwrap_or(rax)
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
    base: Option<usize>,
    index: Option<usize>,
    scale: u32,
    displ: i64,
    absolute: Option<u64>,
    /// FS or GS: add its base.
    seg: Option<usize>,
    len: u64,
    write: bool,
    /// Free host registers for the lookup; the rewritten operand is
    /// `[a + b]`.
    a: usize,
    b: usize,
}

/// One native instruction, ready to emit.
struct NativeOp {
    instr: Instruction,
    /// (guest, host) registers to load before and store after.
    load: Vec<(usize, usize)>,
    store: Vec<(usize, usize)>,
    access: Option<Access>,
    /// Needs the guest flags in the host RFLAGS before it runs.
    needs_flags: bool,
    /// Writes some flags.
    sets_flags: bool,
}

enum Plan {
    Native(Box<NativeOp>),
    /// Does nothing (NOP, ENDBR64, PAUSE).
    Nothing,
    Jcc {
        cc: ConditionCode,
        target: u64,
    },
    Jmp {
        target: u64,
    },
    /// PUSH/POP of a 64-bit register.
    Push(usize),
    Pop(usize),
    /// Near CALL to an address or to a register's value; `ret` is pushed.
    Call {
        target: Target,
        ret: u64,
    },
    /// JMP to a register's value.
    JmpReg(usize),
    /// Near RET without an immediate.
    Ret,
}

#[derive(Clone, Copy)]
enum Target {
    Direct(u64),
    Reg(usize),
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
const STACK_A: usize = 0;
const STACK_B: usize = 1;
const RSP: usize = 4;

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
        let tr = self.translate(block, user);
        self.stats.translate_ns += t0.elapsed().as_nanos() as u64;
        let Some(bytes) = tr else {
            block.jit.set(Jitted::Never);
            return None;
        };
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
        let entry = match arena.alloc(&bytes) {
            Some(p) => p,
            None => {
                // Full: forget every translation (their blocks see the new
                // epoch) and start over.
                arena.reset();
                self.stats.resets += 1;
                arena.alloc(&bytes)?
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

    /// Run translated code.
    ///
    /// # Safety
    /// `entry` must come from [`Jit::code`] of this `Jit` for a block of
    /// the CPU owning `state` and the tables, in the current arena epoch,
    /// with the privilege the code was made for; the tables must be the
    /// CPU's fast read and write tables.
    pub unsafe fn run(
        entry: usize,
        state: &mut CpuState,
        read: *const FastEntry,
        write: *const FastEntry,
    ) -> u64 {
        // SAFETY: `entry` is the start of a function with this signature
        // (the caller's promise), emitted by `translate`.
        let f: Entry = unsafe { std::mem::transmute::<usize, Entry>(entry) };
        // SAFETY: the code reads and writes `state` and RAM pages the
        // tables map (valid while the CPU's memory lives), nothing else.
        unsafe { f(state, read, write) }
    }

    /// Plan one instruction, or `None` if it must be interpreted.
    fn plan(&mut self, i: &Instruction) -> Option<Plan> {
        use Mnemonic as M;
        if i.code_size() != CodeSize::Code64 {
            return None;
        }
        match i.mnemonic() {
            M::Nop | M::Endbr64 | M::Pause => return Some(Plan::Nothing),
            M::Jmp if i.op0_kind() == OpKind::NearBranch64 => {
                return Some(Plan::Jmp {
                    target: i.near_branch_target(),
                })
            }
            m if crate::exec::is_jcc(m)
                && i.op0_kind() == OpKind::NearBranch64
                && i.condition_code() != ConditionCode::None =>
            {
                return Some(Plan::Jcc {
                    cc: i.condition_code(),
                    target: i.near_branch_target(),
                })
            }
            M::Push if i.code() == Code::Push_r64 => {
                return Some(Plan::Push(gpr_number(i.op0_register())?))
            }
            M::Pop if i.code() == Code::Pop_r64 => {
                return Some(Plan::Pop(gpr_number(i.op0_register())?))
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
                    target: Target::Reg(gpr_number(i.op0_register())?),
                    ret: i.next_ip(),
                });
            }
            M::Jmp if i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Register => {
                return Some(Plan::JmpReg(gpr_number(i.op0_register())?))
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
                        base,
                        index,
                        scale: i.memory_index_scale(),
                        displ,
                        absolute,
                        seg,
                        len,
                        write,
                        a,
                        b,
                    });
                }
            }
        }
        // The host must be able to encode it (AH..BH next to a REX
        // register cannot be).
        Encoder::new(64).encode(&instr, 0).ok()?;
        let mut load = Vec::new();
        let mut store = Vec::new();
        for g in 0..16 {
            if let Some(acc) = used[g] {
                load.push((g, host[g]));
                if !matches!(acc, OpAccess::Read | OpAccess::CondRead | OpAccess::None) {
                    store.push((g, host[g]));
                }
            }
        }
        Some(Plan::Native(Box::new(NativeOp {
            instr,
            load,
            store,
            access,
            needs_flags: flags_read || (modified != 0 && modified != ARITH) || shift(i.mnemonic()),
            sets_flags: modified != 0,
        })))
    }

    /// Host code for the longest translatable start of `block` (`None` if
    /// its first instruction is not).
    fn translate(&mut self, block: &Block, user: bool) -> Option<Vec<u8>> {
        let mut plans = Vec::new();
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
        if plans.is_empty() || plans.iter().all(|p| matches!(p, Plan::Nothing)) {
            return None;
        }
        let fallthrough = block
            .ops
            .get(plans.len())
            .map(|op| op.instr.ip())
            .or_else(|| block.ops.last().map(|op| op.instr.next_ip()))?;
        let finished_all = plans.len() == block.ops.len();
        emit(&plans, user, finished_all, fallthrough).ok()
    }
}

/// Emit the function for `plans` (the first instructions of a block);
/// `all` if they are the whole block, whose next instruction is then at
/// `next`; otherwise the interpreter resumes at instruction `plans.len()`.
fn emit(plans: &[Plan], user: bool, all: bool, next: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut out = a.create_label();
    // Exits jumped to from the body: (label, result, new RIP).
    let mut stubs: Vec<(CodeLabel, u64, Option<u64>, bool)> = Vec::new();
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r)?;
    }
    a.mov(r12, rdi)?;
    a.mov(r13, rsi)?;
    a.mov(r14, rdx)?;
    let mut in_host = false;
    for (k, plan) in plans.iter().enumerate() {
        match plan {
            Plan::Nothing => {}
            Plan::Jmp { target } => {
                spill(&mut a, &mut in_host)?;
                finish(&mut a, *target, k as u64 + 1)?;
                a.jmp(out)?;
            }
            Plan::Jcc { cc, target } => {
                if !in_host {
                    fill(&mut a)?;
                    in_host = true;
                }
                let taken = a.create_label();
                jcc(&mut a, *cc, taken)?;
                stubs.push((taken, FINISHED | (k as u64 + 1), Some(*target), true));
            }
            Plan::Push(g) => {
                spill(&mut a, &mut in_host)?;
                a.mov(r15, qword_ptr(r12 + off_gpr(RSP)))?;
                a.sub(r15, 8)?;
                let miss = a.create_label();
                lookup(&mut a, &stack_access(true), user, miss)?;
                stubs.push((miss, k as u64, None, false));
                a.mov(rdx, qword_ptr(r12 + off_gpr(*g)))?;
                a.mov(qword_ptr(rax + rcx), rdx)?;
                a.mov(qword_ptr(r12 + off_gpr(RSP)), r15)?;
            }
            Plan::Pop(g) => {
                spill(&mut a, &mut in_host)?;
                a.mov(r15, qword_ptr(r12 + off_gpr(RSP)))?;
                let miss = a.create_label();
                lookup(&mut a, &stack_access(false), user, miss)?;
                stubs.push((miss, k as u64, None, false));
                a.mov(rdx, qword_ptr(rax + rcx))?;
                a.add(r15, 8)?;
                // RSP first: POP RSP loads the popped value.
                a.mov(qword_ptr(r12 + off_gpr(RSP)), r15)?;
                a.mov(qword_ptr(r12 + off_gpr(*g)), rdx)?;
            }
            Plan::Call { target, ret } => {
                spill(&mut a, &mut in_host)?;
                let miss = a.create_label();
                stubs.push((miss, k as u64, None, false));
                if let Target::Reg(g) = target {
                    a.mov(rbp, qword_ptr(r12 + off_gpr(*g)))?;
                    canonical_or(&mut a, rbp, miss)?;
                }
                a.mov(r15, qword_ptr(r12 + off_gpr(RSP)))?;
                a.sub(r15, 8)?;
                lookup(&mut a, &stack_access(true), user, miss)?;
                a.mov(rdx, *ret)?;
                a.mov(qword_ptr(rax + rcx), rdx)?;
                a.mov(qword_ptr(r12 + off_gpr(RSP)), r15)?;
                match target {
                    Target::Direct(t) => finish(&mut a, *t, k as u64 + 1)?,
                    Target::Reg(_) => finish_to_rbp(&mut a, k as u64 + 1)?,
                }
                a.jmp(out)?;
            }
            Plan::JmpReg(g) => {
                spill(&mut a, &mut in_host)?;
                let miss = a.create_label();
                stubs.push((miss, k as u64, None, false));
                a.mov(rbp, qword_ptr(r12 + off_gpr(*g)))?;
                canonical_or(&mut a, rbp, miss)?;
                finish_to_rbp(&mut a, k as u64 + 1)?;
                a.jmp(out)?;
            }
            Plan::Ret => {
                spill(&mut a, &mut in_host)?;
                a.mov(r15, qword_ptr(r12 + off_gpr(RSP)))?;
                let miss = a.create_label();
                stubs.push((miss, k as u64, None, false));
                lookup(&mut a, &stack_access(false), user, miss)?;
                a.mov(rbp, qword_ptr(rax + rcx))?;
                canonical_or(&mut a, rbp, miss)?;
                a.add(r15, 8)?;
                a.mov(qword_ptr(r12 + off_gpr(RSP)), r15)?;
                finish_to_rbp(&mut a, k as u64 + 1)?;
                a.jmp(out)?;
            }
            Plan::Native(op) => {
                for &(g, h) in &op.load {
                    a.mov(asm64(h), qword_ptr(r12 + off_gpr(g)))?;
                }
                if let Some(m) = &op.access {
                    // The lookup clobbers the host flags.
                    spill(&mut a, &mut in_host)?;
                    effective_address(&mut a, m)?;
                    let miss = a.create_label();
                    lookup(&mut a, m, user, miss)?;
                    stubs.push((miss, k as u64, None, false));
                }
                if op.needs_flags && !in_host {
                    fill(&mut a)?;
                }
                a.add_instruction(op.instr)?;
                if op.sets_flags || op.needs_flags {
                    in_host = true;
                }
                for &(g, h) in &op.store {
                    a.mov(qword_ptr(r12 + off_gpr(g)), asm64(h))?;
                }
            }
        }
    }
    if !plans.last().is_some_and(Plan::ends) {
        spill(&mut a, &mut in_host)?;
        if all {
            finish(&mut a, next, plans.len() as u64)?;
        } else {
            a.mov(rax, plans.len() as u64)?;
        }
        a.jmp(out)?;
    }
    for (mut label, result, rip, flags_in_host) in stubs {
        a.set_label(&mut label)?;
        let mut f = flags_in_host;
        spill(&mut a, &mut f)?;
        match rip {
            Some(rip) => finish(&mut a, rip, result & !FINISHED)?,
            None => a.mov(rax, result)?,
        }
        a.jmp(out)?;
    }
    a.set_label(&mut out)?;
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r)?;
    }
    a.ret()?;
    a.assemble(0)
}

/// Store the guest flags held in the host RFLAGS.
fn spill(a: &mut CodeAssembler, in_host: &mut bool) -> Result<(), IcedError> {
    if *in_host {
        a.pushfq()?;
        a.pop(rbp)?;
        a.and(ebp, GUEST_ARITH)?;
        a.and(qword_ptr(r12 + off_rflags()), !GUEST_ARITH)?;
        a.or(qword_ptr(r12 + off_rflags()), rbp)?;
        *in_host = false;
    }
    Ok(())
}

/// Load the guest's arithmetic flags into the host RFLAGS (IF set as in
/// any user process; DF, TF, AC clear).
fn fill(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rbp, qword_ptr(r12 + off_rflags()))?;
    a.and(ebp, GUEST_ARITH)?;
    a.or(ebp, 0x202)?;
    a.push(rbp)?;
    a.popfq()?;
    Ok(())
}

/// Write RIP and return `FINISHED | retired`.
fn finish(a: &mut CodeAssembler, rip: u64, retired: u64) -> Result<(), IcedError> {
    a.mov(rbp, rip)?;
    a.mov(qword_ptr(r12 + off_rip()), rbp)?;
    a.mov(rax, FINISHED | retired)?;
    Ok(())
}

/// Write RIP from RBP and return `FINISHED | retired`.
fn finish_to_rbp(a: &mut CodeAssembler, retired: u64) -> Result<(), IcedError> {
    a.mov(qword_ptr(r12 + off_rip()), rbp)?;
    a.mov(rax, FINISHED | retired)?;
    Ok(())
}

/// Jump to `bad` unless `r` is a canonical address (the interpreter then
/// raises the #GP). Uses RDX and the flags.
fn canonical_or(a: &mut CodeAssembler, r: AsmRegister64, bad: CodeLabel) -> Result<(), IcedError> {
    a.mov(rdx, r)?;
    a.sar(rdx, 47)?;
    a.add(rdx, 1)?;
    a.cmp(rdx, 1)?;
    a.ja(bad)?;
    Ok(())
}

/// R15 = the guest linear address of `m`.
fn effective_address(a: &mut CodeAssembler, m: &Access) -> Result<(), IcedError> {
    if let Some(abs) = m.absolute {
        a.mov(r15, abs)?;
    } else {
        let base = m.base.map_or(Register::None, r64);
        let index = m.index.map_or(Register::None, r64);
        if base == Register::None && index == Register::None {
            a.mov(r15, m.displ as u64)?;
        } else {
            let mem = MemoryOperand::with_base_index_scale_displ_size(
                base,
                index,
                if index == Register::None { 1 } else { m.scale },
                m.displ,
                if m.displ == 0 && base != Register::None {
                    0
                } else {
                    8
                },
            );
            a.add_instruction(Instruction::with2(Code::Lea_r64_m, Register::R15, mem)?)?;
        }
    }
    if let Some(seg) = m.seg {
        a.add(r15, qword_ptr(r12 + off_seg_base(seg)))?;
    }
    Ok(())
}

/// Look R15 up in the fast table for `m` and leave the host page in `a`
/// and the offset in `b`; jump to `miss` when the page is not there (or
/// the access leaves it).
fn lookup(a: &mut CodeAssembler, m: &Access, user: bool, miss: CodeLabel) -> Result<(), IcedError> {
    let (ra, rb) = (asm64(m.a), asm64(m.b));
    let table = if m.write { r14 } else { r13 };
    // The tag of the access's last byte: an access that leaves the page
    // does not match the entry of its first byte.
    a.lea(ra, qword_ptr(r15 + (m.len as i32 - 1)))?;
    a.shr(ra, 12)?;
    a.lea(ra, qword_ptr(ra + ra * 1 + i32::from(user)))?;
    a.mov(rb, r15)?;
    a.shr(rb, 12)?;
    a.and(rb, (FAST_SIZE - 1) as i32)?;
    a.lea(rb, qword_ptr(rb + rb * 2))?;
    a.cmp(qword_ptr(table + rb * 8), ra)?;
    a.jne(miss)?;
    a.mov(ra, qword_ptr(table + rb * 8 + 8))?;
    a.mov(rb, r15)?;
    a.and(rb, 0xfff)?;
    Ok(())
}

fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Result<(), IcedError> {
    use ConditionCode as C;
    match cc {
        C::o => a.jo(l),
        C::no => a.jno(l),
        C::b => a.jb(l),
        C::ae => a.jae(l),
        C::e => a.je(l),
        C::ne => a.jne(l),
        C::be => a.jbe(l),
        C::a => a.ja(l),
        C::s => a.js(l),
        C::ns => a.jns(l),
        C::p => a.jp(l),
        C::np => a.jnp(l),
        C::l => a.jl(l),
        C::ge => a.jge(l),
        C::le => a.jle(l),
        C::g => a.jg(l),
        // `Jit::plan` makes no Jcc without a condition.
        C::None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
