//! Instruction semantics, grouped by kind, and the operand access helpers
//! they share.

pub mod alu;
pub mod bits;
pub mod branch;
pub mod fast;
pub mod float;
pub mod mov;
pub mod muldiv;
pub mod shift;
pub mod sse;
pub mod stack;
pub mod string;
pub mod system;
pub mod x87;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::state::SegReg;
use crate::cpu::{Cpu, Flow};
use crate::exceptions::ud;

/// Execute one decoded instruction. On success `cpu.next_rip` holds the
/// new RIP; on a trap no architectural register has been committed that
/// the caller does not roll back.
pub(crate) fn execute(cpu: &mut Cpu, i: &Instruction) -> Flow {
    if i.has_lock_prefix() && !lock_allowed(i) {
        return Err(ud());
    }
    let locked = i.has_lock_prefix()
        || (i.mnemonic() == Mnemonic::Xchg
            && (i.op0_kind() == OpKind::Memory || i.op1_kind() == OpKind::Memory));
    if locked {
        cpu.atomic = Some(crate::cpu::AtomicOp::default());
        let r = dispatch(cpu, i);
        cpu.atomic = None;
        r
    } else {
        dispatch(cpu, i)
    }
}

fn dispatch(cpu: &mut Cpu, i: &Instruction) -> Flow {
    select(i).0(cpu, i)
}

/// The semantics of `i` (without the LOCK handling of [`execute`]), and
/// whether it is a system instruction.
fn select(i: &Instruction) -> (Handler, bool) {
    use Mnemonic as M;
    match i.mnemonic() {
        M::Add | M::Adc | M::Sub | M::Sbb | M::Cmp | M::And | M::Or | M::Xor | M::Test => {
            (alu::binary, false)
        }
        M::Inc | M::Dec | M::Neg | M::Not => (alu::unary, false),
        M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => (alu::convert, false),
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std | M::Lahf | M::Sahf => (alu::flag_op, false),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
            (shift::shift, false)
        }
        M::Shld | M::Shrd => (shift::double, false),
        M::Mul | M::Imul | M::Div | M::Idiv => (muldiv::muldiv, false),
        M::Bsf
        | M::Bsr
        | M::Tzcnt
        | M::Lzcnt
        | M::Bt
        | M::Bts
        | M::Btr
        | M::Btc
        | M::Bswap
        | M::Popcnt => (bits::bits, false),
        M::Mov
        | M::Movzx
        | M::Movsx
        | M::Movsxd
        | M::Lea
        | M::Xchg
        | M::Cmpxchg
        | M::Xadd
        | M::Cmpxchg8b
        | M::Cmpxchg16b => (mov::mov, false),
        m if is_cmovcc(m) => (mov::cmov, false),
        m if is_setcc(m) => (mov::setcc, false),
        M::Push
        | M::Pop
        | M::Pushfq
        | M::Popfq
        | M::Pushf
        | M::Popf
        | M::Pushfd
        | M::Popfd
        | M::Pusha
        | M::Pushad
        | M::Popa
        | M::Popad
        | M::Leave
        | M::Enter => (stack::stack, false),
        M::Jmp
        | M::Call
        | M::Ret
        | M::Ja
        | M::Jae
        | M::Jb
        | M::Jbe
        | M::Je
        | M::Jg
        | M::Jge
        | M::Jl
        | M::Jle
        | M::Jne
        | M::Jno
        | M::Jnp
        | M::Jns
        | M::Jo
        | M::Jp
        | M::Js
        | M::Loop
        | M::Loope
        | M::Loopne
        | M::Jrcxz
        | M::Jecxz
        | M::Jcxz
        | M::Retf => (branch::branch, false),
        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Cmpsq
        | M::Outsb
        | M::Outsw
        | M::Outsd
        | M::Insb
        | M::Insw
        | M::Insd
            if is_string(i) =>
        {
            (string::string, false)
        }
        M::Nop
        | M::Pause
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Clflush
        | M::Clflushopt
        | M::Endbr64 => (nop, false),
        M::Ud2 | M::Ud0 | M::Ud1 => (undefined, false),
        m if x87::handles(m) => (x87::x87, false),
        m if sse::handles(m) => (sse::sse, false),
        _ => (system::system, true),
    }
}

fn nop(_: &mut Cpu, _: &Instruction) -> Flow {
    Ok(())
}

fn undefined(_: &mut Cpu, _: &Instruction) -> Flow {
    Err(ud())
}

/// The semantics of one instruction: its handler.
pub(crate) type Handler = fn(&mut Cpu, &Instruction) -> Flow;

/// The handler that runs `i`, chosen once when it is decoded; whether `i`
/// must end a block (unconditional control transfers, system instructions
/// and moves to or from control, debug and segment registers, which may
/// change the mode, paging or interrupt state the rest of a block was
/// decoded for); and whether the registers must be saved before it. They
/// need not be for the simple integer instructions whose handlers read
/// everything, may fault, and only then write, so that a fault or restart
/// finds the registers and RFLAGS as they were.
pub(crate) fn handler_info(i: &Instruction) -> (Handler, bool, bool) {
    use Mnemonic as M;
    let (run, ends) = handler_parts(i);
    let fast = specialised(i);
    let run = match fast {
        Some(f) => f,
        None if generic_census::on() => generic_census::counted,
        None => run,
    };
    // Every specialised handler reads and checks all that may fault
    // before it writes (near CALL/RET/JMP too, which end blocks).
    let clean = fast.is_some()
        || !ends
            && !i.has_lock_prefix()
            && (is_jcc(i.mnemonic())
                || matches!(
                    i.mnemonic(),
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
                        | M::Shl
                        | M::Sal
                        | M::Shr
                        | M::Sar
                        | M::Rol
                        | M::Ror
                        | M::Mov
                        | M::Movzx
                        | M::Movsx
                        | M::Movsxd
                        | M::Lea
                        | M::Cmova
                        | M::Cmovae
                        | M::Cmovb
                        | M::Cmovbe
                        | M::Cmove
                        | M::Cmovg
                        | M::Cmovge
                        | M::Cmovl
                        | M::Cmovle
                        | M::Cmovne
                        | M::Cmovs
                        | M::Cmovns
                        | M::Seta
                        | M::Setae
                        | M::Setb
                        | M::Setbe
                        | M::Sete
                        | M::Setg
                        | M::Setge
                        | M::Setl
                        | M::Setle
                        | M::Setne
                        | M::Sets
                        | M::Setns
                        | M::Nop
                        | M::Push
                ))
        || (!ends
            && !i.has_lock_prefix()
            && i.mnemonic() == M::Pop
            && i.op0_kind() == OpKind::Register
            && gpr_info(i.op0_register()).is_some());
    (run, ends, !clean)
}

/// A handler specialised for the operand form of the most common
/// instructions (MOV, the two-operand ALU group, MOVZX/MOVSX/MOVSXD, LEA,
/// shifts and rotates, INC/DEC, PUSH/POP, near CALL/RET/JMP, Jcc, SETcc,
/// CMOVcc), or `None`: the instruction then runs its generic handler.
fn specialised(i: &Instruction) -> Option<Handler> {
    use iced_x86::Code as C;
    use Mnemonic as M;
    if i.has_lock_prefix() {
        return None;
    }
    let code64 = i.code_size() == iced_x86::CodeSize::Code64;
    if i.op_count() == 1
        && matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    {
        return match i.code() {
            C::Call_rel32_64 if code64 => Some(fast::call_rel64),
            C::Jmp_rel32_64 | C::Jmp_rel8_64 if code64 => Some(fast::jmp_rel64),
            _ => jcc(i),
        };
    }
    let gpr = |n: u32| i.op_kind(n) == OpKind::Register && gpr_info(i.op_register(n)).is_some();
    let r64 = |n: u32| gpr(n) && i.op_register(n).size() == 8;
    match i.code() {
        C::Retnq if code64 => return Some(fast::ret64::<false>),
        C::Retnq_imm16 if code64 => return Some(fast::ret64::<true>),
        C::Push_r64 if code64 && r64(0) => return Some(fast::push64),
        C::Pop_r64 if code64 && r64(0) => return Some(fast::pop64),
        _ => {}
    }
    if i.op_count() == 1 && gpr(0) {
        return match i.mnemonic() {
            M::Inc => Some(fast::incdec_form::<true>),
            M::Dec => Some(fast::incdec_form::<false>),
            M::Neg => Some(fast::negnot_form::<true>),
            M::Not => Some(fast::negnot_form::<false>),
            m if is_setcc(m) => by_cc(i, CcKind::Set),
            _ => None,
        };
    }
    let imm = |n: u32| {
        matches!(
            i.op_kind(n),
            OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64
        )
    };
    let mem =
        |n: u32| i.op_kind(n) == OpKind::Memory && matches!(i.memory_size().size(), 1 | 2 | 4 | 8);
    let a64 = (0..2).any(|n| i.op_kind(n) == OpKind::Memory) && fast::addr64(i);
    // The same form with 64-bit addressing or with the general one.
    macro_rules! a {
        ($f:ident, $($p:tt),*) => {
            if a64 {
                $f::<$($p,)* true> as Handler
            } else {
                $f::<$($p,)* false> as Handler
            }
        };
    }
    // The same form with 32-bit, 64-bit or any-width register operands
    // (`w`: the width every register operand of `i` has, or 0), and with
    // 64-bit or general addressing.
    let w = {
        let regs: Vec<u32> = (0..i.op_count().min(2))
            .filter(|&n| i.op_kind(n) == OpKind::Register)
            .map(|n| gpr_width(i, n))
            .collect();
        match regs.first() {
            Some(&w) if regs.iter().all(|&x| x == w) => w,
            _ => 0,
        }
    };
    macro_rules! aw {
        ($f:ident, $($p:tt),*) => {
            match (a64, w) {
                (true, 64) => $f::<$($p,)* true, 64> as Handler,
                (true, 32) => $f::<$($p,)* true, 32> as Handler,
                (true, _) => $f::<$($p,)* true, 0> as Handler,
                (false, 64) => $f::<$($p,)* false, 64> as Handler,
                (false, 32) => $f::<$($p,)* false, 32> as Handler,
                (false, _) => $f::<$($p,)* false, 0> as Handler,
            }
        };
    }
    if i.mnemonic() == M::Imul && gpr(0) && i.op_count() >= 2 {
        use fast::imul_form;
        let three = i.op_count() == 3;
        if three && !imm(2) {
            return None;
        }
        return Some(match () {
            _ if gpr(1) && three => imul_form::<true, false, false>,
            _ if gpr(1) => imul_form::<false, false, false>,
            _ if mem(1) && three => a!(imul_form, true, true),
            _ if mem(1) => a!(imul_form, false, true),
            _ => return None,
        });
    }
    if i.op_count() != 2 {
        return None;
    }
    match i.mnemonic() {
        M::Mov => {
            use mov::form as F;
            use mov::mov_form;
            return Some(match () {
                _ if gpr(0) && gpr(1) => aw!(mov_form, { F::REG_REG }),
                _ if gpr(0) && mem(1) => aw!(mov_form, { F::REG_MEM }),
                _ if mem(0) && gpr(1) => aw!(mov_form, { F::MEM_REG }),
                _ if gpr(0) && imm(1) => aw!(mov_form, { F::REG_IMM }),
                _ if mem(0) && imm(1) && a64 => mov_form::<{ F::MEM_IMM }, true, 0>,
                _ if mem(0) && imm(1) => mov_form::<{ F::MEM_IMM }, false, 0>,
                _ => return None,
            });
        }
        M::Movzx | M::Movsx | M::Movsxd if gpr(0) => {
            use fast::movx_form;
            let sign = i.mnemonic() != M::Movzx;
            let src = if gpr(1) {
                gpr_info(i.op1_register()).map_or(0, |(_, b, _)| b)
            } else if mem(1) {
                (i.memory_size().size() * 8) as u32
            } else {
                0
            };
            let m = i.op1_kind() == OpKind::Memory;
            return Some(match (sign, src, m) {
                (false, 8, false) => movx_form::<false, 8, false, false>,
                (false, 16, false) => movx_form::<false, 16, false, false>,
                (true, 8, false) => movx_form::<true, 8, false, false>,
                (true, 16, false) => movx_form::<true, 16, false, false>,
                (true, 32, false) => movx_form::<true, 32, false, false>,
                (false, 8, true) => a!(movx_form, false, 8, true),
                (false, 16, true) => a!(movx_form, false, 16, true),
                (true, 8, true) => a!(movx_form, true, 8, true),
                (true, 16, true) => a!(movx_form, true, 16, true),
                (true, 32, true) => a!(movx_form, true, 32, true),
                _ => return None,
            });
        }
        M::Lea if gpr(0) && i.op1_kind() == OpKind::Memory && a64 => return Some(fast::lea64),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if gpr(0) => {
            use fast::{count as N, sh, shift_form};
            let cnt = match i.op1_kind() {
                OpKind::Immediate8 if i.immediate8() == 1 => N::ONE,
                OpKind::Immediate8 => N::IMM,
                OpKind::Register if i.op1_register() == Register::CL => N::CL,
                _ => return None,
            };
            macro_rules! sh {
                ($op:expr) => {
                    match cnt {
                        N::ONE => shift_form::<{ $op }, { N::ONE }> as Handler,
                        N::IMM => shift_form::<{ $op }, { N::IMM }>,
                        _ => shift_form::<{ $op }, { N::CL }>,
                    }
                };
            }
            return Some(match i.mnemonic() {
                M::Shl | M::Sal => sh!(sh::SHL),
                M::Shr => sh!(sh::SHR),
                M::Sar => sh!(sh::SAR),
                M::Rol => sh!(sh::ROL),
                _ => sh!(sh::ROR),
            });
        }
        m if is_cmovcc(m) && gpr(0) => {
            return match () {
                _ if gpr(1) => by_cc(i, CcKind::CmovReg),
                _ if mem(1) && a64 => by_cc(i, CcKind::CmovMem64),
                _ if mem(1) => by_cc(i, CcKind::CmovMem),
                _ => None,
            };
        }
        _ => {}
    }
    use alu::op as O;
    let op = match i.mnemonic() {
        M::Add => O::ADD,
        M::Adc => O::ADC,
        M::Sub => O::SUB,
        M::Sbb => O::SBB,
        M::Cmp => O::CMP,
        M::And => O::AND,
        M::Or => O::OR,
        M::Xor => O::XOR,
        M::Test => O::TEST,
        _ => return None,
    };
    macro_rules! alu {
        ($op:expr) => {{
            use alu::binary_form;
            use alu::form as F;
            use fast::binary_mem_form;
            match () {
                _ if gpr(0) && gpr(1) => aw!(binary_form, { $op }, { F::REG_REG }),
                _ if gpr(0) && imm(1) => aw!(binary_form, { $op }, { F::REG_IMM }),
                _ if gpr(0) && mem(1) => aw!(binary_form, { $op }, { F::REG_MEM }),
                _ if mem(0) && gpr(1) => a!(binary_mem_form, { $op }, false),
                _ if mem(0) && imm(1) => a!(binary_mem_form, { $op }, true),
                _ => return None,
            }
        }};
    }
    Some(match op {
        O::ADD => alu!(O::ADD),
        O::ADC => alu!(O::ADC),
        O::SUB => alu!(O::SUB),
        O::SBB => alu!(O::SBB),
        O::CMP => alu!(O::CMP),
        O::AND => alu!(O::AND),
        O::OR => alu!(O::OR),
        O::XOR => alu!(O::XOR),
        _ => alu!(O::TEST),
    })
}

/// Which condition-code handler [`by_cc`] picks.
#[derive(Clone, Copy)]
enum CcKind {
    Set,
    CmovReg,
    CmovMem,
    CmovMem64,
}

/// SETcc / CMOVcc specialised for the condition of `i`.
fn by_cc(i: &Instruction, kind: CcKind) -> Option<Handler> {
    use iced_x86::ConditionCode as C;
    macro_rules! cc {
        ($($c:ident),*) => {
            match i.condition_code() {
                $(C::$c => Some(match kind {
                    CcKind::Set => fast::setcc_form::<{ C::$c as u8 }> as Handler,
                    CcKind::CmovReg => fast::cmov_form::<{ C::$c as u8 }, false, false>,
                    CcKind::CmovMem => fast::cmov_form::<{ C::$c as u8 }, true, false>,
                    CcKind::CmovMem64 => fast::cmov_form::<{ C::$c as u8 }, true, true>,
                }),)*
                _ => None,
            }
        };
    }
    cc!(o, no, b, ae, e, ne, be, a, s, ns, p, np, l, ge, le, g)
}

/// A census of the instructions that run their generic handler, for
/// finding the forms worth specialising: with `VIREO_EMU_GENERIC=FILE`,
/// instructions without a specialised handler are decoded with
/// [`counted`](generic_census::counted), which counts them by iced `Code`
/// and whether they have a memory operand, and rewrites FILE (`COUNT CODE
/// reg|mem` lines, most frequent first) every 2^22 counts. Without the
/// variable nothing changes: the handler is chosen at decode time.
mod generic_census {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use iced_x86::{Code, Instruction, OpKind};

    use crate::cpu::{Cpu, Flow};

    struct Census {
        path: std::path::PathBuf,
        counts: HashMap<(Code, bool), u64>,
        total: u64,
    }

    fn census() -> &'static Option<Mutex<Census>> {
        static C: OnceLock<Option<Mutex<Census>>> = OnceLock::new();
        C.get_or_init(|| {
            std::env::var_os("VIREO_EMU_GENERIC").map(|p| {
                Mutex::new(Census {
                    path: p.into(),
                    counts: HashMap::new(),
                    total: 0,
                })
            })
        })
    }

    pub(super) fn on() -> bool {
        census().is_some()
    }

    pub(super) fn counted(cpu: &mut Cpu, i: &Instruction) -> Flow {
        if let Some(c) = census() {
            let mut c = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
            *c.counts.entry((i.code(), mem)).or_insert(0) += 1;
            c.total += 1;
            if c.total % (1 << 22) == 0 {
                let mut rows: Vec<_> = c.counts.iter().collect();
                rows.sort_unstable_by_key(|r| std::cmp::Reverse(*r.1));
                let text: String = rows
                    .iter()
                    .map(|((code, mem), n)| {
                        format!("{n} {code:?} {}\n", if *mem { "mem" } else { "reg" })
                    })
                    .collect();
                if let Err(e) = std::fs::write(&c.path, text) {
                    tracing::warn!("cannot write {}: {e}", c.path.display());
                }
            }
        }
        super::handler_parts(i).0(cpu, i)
    }
}

/// The sixteen conditional jumps (not LOOP/JCXZ).
pub(crate) fn is_jcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg
    )
}

/// CMOVcc, any condition.
fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs
    )
}

/// SETcc, any condition.
fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets
    )
}

/// Jcc (not LOOP/JCXZ) specialised for its condition.
fn jcc(i: &Instruction) -> Option<Handler> {
    use iced_x86::ConditionCode as C;
    if !is_jcc(i.mnemonic()) {
        return None;
    }
    macro_rules! cc {
        ($($c:ident),*) => {
            match i.condition_code() {
                $(C::$c => Some(branch::jcc_form::<{ C::$c as u8 }> as Handler),)*
                _ => None,
            }
        };
    }
    cc!(o, no, b, ae, e, ne, be, a, s, ns, p, np, l, ge, le, g)
}

/// The handler of `i` and whether it ends a block.
fn handler_parts(i: &Instruction) -> (Handler, bool) {
    let locked = i.has_lock_prefix()
        || (i.mnemonic() == Mnemonic::Xchg
            && (i.op0_kind() == OpKind::Memory || i.op1_kind() == OpKind::Memory));
    let (run, system) = select(i);
    let run = if locked { execute as Handler } else { run };
    let special = (0..i.op_count().min(2)).any(|n| {
        i.op_kind(n) == OpKind::Register && {
            let r = i.op_register(n);
            !r.is_gpr() && !r.is_xmm() && !r.is_st()
        }
    });
    // A conditional branch does not end a block: when it is taken, RIP is
    // not the next instruction's and the block stops there.
    let ends = system
        || special
        || !matches!(
            i.flow_control(),
            iced_x86::FlowControl::Next | iced_x86::FlowControl::ConditionalBranch
        );
    (run, ends)
}

/// String instructions are recognised by their implicit memory operands
/// (MOVSD/CMPSD are also SSE2 mnemonics).
fn is_string(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| {
        matches!(
            i.op_kind(n),
            OpKind::MemorySegRSI
                | OpKind::MemorySegESI
                | OpKind::MemoryESRDI
                | OpKind::MemoryESEDI
                | OpKind::MemorySegSI
                | OpKind::MemoryESDI
        )
    })
}

fn lock_allowed(i: &Instruction) -> bool {
    use Mnemonic as M;
    matches!(
        i.mnemonic(),
        M::Add
            | M::Adc
            | M::And
            | M::Btc
            | M::Btr
            | M::Bts
            | M::Cmpxchg
            | M::Cmpxchg8b
            | M::Cmpxchg16b
            | M::Dec
            | M::Inc
            | M::Neg
            | M::Not
            | M::Or
            | M::Sbb
            | M::Sub
            | M::Xor
            | M::Xadd
            | M::Xchg
    ) && i.op_count() > 0
        && i.op0_kind() == OpKind::Memory
}

/// The index of `r`, a 32-bit (`W` = 32) or 64-bit GPR, which the decoder
/// checked with [`gpr_width`]. (`W` = 0: unused, 0.)
#[inline(always)]
pub(crate) fn full_gpr<const W: u32>(r: Register) -> usize {
    let base = match W {
        32 => Register::EAX,
        64 => Register::RAX,
        _ => return 0,
    };
    (r as usize).wrapping_sub(base as usize) & 15
}

/// 32 or 64 if operand `n` of `i` is a 32-bit or 64-bit GPR, else 0.
fn gpr_width(i: &Instruction, n: u32) -> u32 {
    if i.op_kind(n) != OpKind::Register {
        return 0;
    }
    match gpr_info(i.op_register(n)) {
        Some((_, b @ (32 | 64), false)) => b,
        _ => 0,
    }
}

/// GPR_TABLE entry bits: valid, legacy high byte, width code (8 << code
/// bits), register index.
const G_VALID: u8 = 0x80;
const G_HIGH: u8 = 0x40;

const fn gpr_entry(v: u32) -> u8 {
    let al = Register::AL as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    if v >= al && v < al + 20 {
        let k = v - al;
        if k < 4 {
            G_VALID | k as u8
        } else if k < 8 {
            G_VALID | G_HIGH | (k - 4) as u8
        } else {
            G_VALID | (k - 4) as u8
        }
    } else if v >= ax && v < ax + 16 {
        G_VALID | (1 << 4) | (v - ax) as u8
    } else if v >= eax && v < eax + 16 {
        G_VALID | (2 << 4) | (v - eax) as u8
    } else if v >= rax && v < rax + 16 {
        G_VALID | (3 << 4) | (v - rax) as u8
    } else {
        0
    }
}

/// [`gpr_info`] for every register number, computed at compile time.
static GPR_TABLE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut v = 0;
    while v < 256 {
        t[v] = gpr_entry(v as u32);
        v += 1;
    }
    t
};

const WIDTH_MASK: [u64; 4] = [0xff, 0xffff, 0xffff_ffff, u64::MAX];

/// A general purpose register: (index, width in bits, legacy high byte).
#[inline(always)]
pub(crate) fn gpr_info(r: Register) -> Option<(usize, u32, bool)> {
    let e = GPR_TABLE[r as usize & 0xff];
    (e & G_VALID != 0).then(|| (usize::from(e & 0xf), 8 << ((e >> 4) & 3), e & G_HIGH != 0))
}

/// XMM register number.
pub(crate) fn xmm_index(r: Register) -> Option<usize> {
    let v = r as u32;
    (v >= Register::XMM0 as u32 && v <= Register::XMM15 as u32)
        .then(|| (v - Register::XMM0 as u32) as usize)
}

impl Cpu {
    #[inline]
    pub(crate) fn reg(&self, r: Register) -> u64 {
        let e = GPR_TABLE[r as usize & 0xff];
        if e & G_VALID != 0 {
            let v = self.state.gpr[usize::from(e & 0xf)];
            if e & G_HIGH != 0 {
                return (v >> 8) & 0xff;
            }
            return v & WIDTH_MASK[usize::from((e >> 4) & 3)];
        }
        match r {
            Register::RIP => self.next_rip,
            Register::EIP => self.next_rip & 0xffff_ffff,
            _ => 0,
        }
    }

    /// Write a GPR with x86 merge rules: 32-bit writes zero the upper half,
    /// 8/16-bit writes keep the rest.
    #[inline]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let e = GPR_TABLE[r as usize & 0xff];
        if e & G_VALID == 0 {
            return;
        }
        let slot = &mut self.state.gpr[usize::from(e & 0xf)];
        let old = *slot;
        *slot = if e & G_HIGH != 0 {
            (old & !0xff00) | ((v & 0xff) << 8)
        } else {
            match (e >> 4) & 3 {
                0 => (old & !0xff) | (v & 0xff),
                1 => (old & !0xffff) | (v & 0xffff),
                2 => v & 0xffff_ffff,
                _ => v,
            }
        };
    }

    /// The linear address of the explicit memory operand.
    #[inline]
    pub(crate) fn ea(&self, i: &Instruction) -> u64 {
        let la = self
            .offset(i)
            .wrapping_add(self.seg_base(i.memory_segment()));
        if self.state.long_mode_64() {
            la
        } else {
            la & 0xffff_ffff
        }
    }

    /// The effective address (offset, without segment base) of the
    /// explicit memory operand, as LEA computes it, wrapped to the
    /// address size.
    #[inline]
    pub(crate) fn offset(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        let index = i.memory_index();
        let mut a = i.memory_displacement64();
        let mut abits = 0;
        if base == Register::RIP || base == Register::EIP {
            abits = if base == Register::EIP { 32 } else { 64 };
        } else {
            if base != Register::None {
                a = a.wrapping_add(self.reg(base));
                abits = gpr_info(base).map_or(64, |(_, b, _)| b);
            }
            if index != Register::None {
                a = a.wrapping_add(
                    self.reg(index)
                        .wrapping_mul(u64::from(i.memory_index_scale())),
                );
                abits = abits.max(gpr_info(index).map_or(64, |(_, b, _)| b));
            }
        }
        if abits == 0 {
            abits = if self.state.long_mode_64() {
                64
            } else if i.memory_displ_size() == 2 {
                16
            } else {
                32
            };
        }
        a & crate::cpu::flags::mask(abits)
    }

    /// Segment base: in 64-bit mode only FS and GS have one.
    #[inline]
    pub(crate) fn seg_base(&self, seg: Register) -> u64 {
        let s = match seg {
            Register::FS => SegReg::Fs,
            Register::GS => SegReg::Gs,
            _ if self.state.long_mode_64() => return 0,
            Register::ES => SegReg::Es,
            Register::CS => SegReg::Cs,
            Register::SS => SegReg::Ss,
            Register::DS => SegReg::Ds,
            _ => return 0,
        };
        self.state.seg(s).base
    }

    /// Width in bits of operand `n`.
    #[inline]
    pub(crate) fn op_bits(&self, i: &Instruction, n: u32) -> u32 {
        match i.op_kind(n) {
            OpKind::Register => gpr_info(i.op_register(n)).map_or(0, |(_, b, _)| b),
            OpKind::Memory => (i.memory_size().size() * 8) as u32,
            OpKind::Immediate8 => 8,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 16,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 32,
            _ => 64,
        }
    }

    /// Width of integer operand `n`, or #UD for an operand that is not an
    /// 8/16/32/64-bit integer (never panics on odd encodings).
    #[inline]
    pub(crate) fn width(&self, i: &Instruction, n: u32) -> Flow<u32> {
        match self.op_bits(i, n) {
            b @ (8 | 16 | 32 | 64) => Ok(b),
            _ => Err(ud()),
        }
    }

    /// Read operand `n` (register, memory or immediate), zero-extended.
    #[inline]
    pub(crate) fn read_op(&mut self, i: &Instruction, n: u32) -> Flow<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg(i.op_register(n))),
            OpKind::Memory => {
                let bytes = i.memory_size().size();
                let la = self.ea(i);
                self.read_mem(la, bytes)
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(i.immediate(n)),
            OpKind::Immediate8_2nd => Ok(u64::from(i.immediate8_2nd())),
            _ => Err(ud()),
        }
    }

    /// Write operand `n` (register or memory).
    #[inline]
    pub(crate) fn write_op(&mut self, i: &Instruction, n: u32, v: u64) -> Flow {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let bytes = i.memory_size().size();
                let la = self.ea(i);
                self.write_mem(la, bytes, v)
            }
            _ => Err(ud()),
        }
    }

    /// Evaluate a condition code against RFLAGS.
    #[inline]
    pub(crate) fn cond(&self, cc: iced_x86::ConditionCode) -> bool {
        use crate::cpu::state::rflags::{CF, OF, PF, SF, ZF};
        use iced_x86::ConditionCode as C;
        let f = |b| self.state.flag(b);
        match cc {
            C::o => f(OF),
            C::no => !f(OF),
            C::b => f(CF),
            C::ae => !f(CF),
            C::e => f(ZF),
            C::ne => !f(ZF),
            C::be => f(CF) || f(ZF),
            C::a => !f(CF) && !f(ZF),
            C::s => f(SF),
            C::ns => !f(SF),
            C::p => f(PF),
            C::np => !f(PF),
            C::l => f(SF) != f(OF),
            C::ge => f(SF) == f(OF),
            C::le => f(ZF) || f(SF) != f(OF),
            C::g => !f(ZF) && f(SF) == f(OF),
            C::None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_numbering_matches_iced() {
        assert_eq!(gpr_info(Register::AL), Some((0, 8, false)));
        assert_eq!(gpr_info(Register::BH), Some((3, 8, true)));
        assert_eq!(gpr_info(Register::SPL), Some((4, 8, false)));
        assert_eq!(gpr_info(Register::DIL), Some((7, 8, false)));
        assert_eq!(gpr_info(Register::R15L), Some((15, 8, false)));
        assert_eq!(gpr_info(Register::R9W), Some((9, 16, false)));
        assert_eq!(gpr_info(Register::R13D), Some((13, 32, false)));
        assert_eq!(gpr_info(Register::RSP), Some((4, 64, false)));
        assert_eq!(gpr_info(Register::XMM1), None);
        assert_eq!(xmm_index(Register::XMM15), Some(15));
    }
}
