//! Choosing an instruction's semantics: the handler each decoded
//! instruction runs (picked once, at decode time, with the specialised
//! forms of `fast`), whether it ends a block, and the LOCK prefix rules.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::operand::{gpr_info, gpr_width};
use super::{alu, bits, branch, fast, mov, muldiv, shift, sse, stack, string, system, x87};
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
