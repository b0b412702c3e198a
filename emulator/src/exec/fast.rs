//! Handlers specialised at decode time for the operand forms that the
//! guest kit's boot executes most after MOV/ALU/Jcc (see
//! `emulator/PERFORMANCE.md`): MOVZX/MOVSX/MOVSXD, LEA, shifts and
//! rotates of a register, INC/DEC/NEG/NOT, IMUL with two or three
//! operands, PUSH/POP of a 64-bit register, near CALL/RET/JMP,
//! SETcc/CMOVcc and the memory-destination ALU forms.
//!
//! Every handler here computes exactly what the generic handler of its
//! mnemonic computes (the differential tests cover each form), reads and
//! checks everything that may fault before it writes a register, and so
//! needs no register snapshot (see [`super::dispatch::handler_info`]).
//!
//! `A64` handlers are chosen only for 64-bit code whose memory operand uses
//! 64-bit addressing (base and index absent, RIP or 64-bit GPRs): their
//! effective address is [`Cpu::ea64`], without the address-size and
//! segment logic of [`Cpu::ea`]. The decode cache is emptied when the code
//! size changes, so such a handler never runs outside 64-bit code.

use iced_x86::{Instruction, Register};

use crate::cpu::flags::{self, mask, sext};
use crate::cpu::state::gpr::{RCX, RSP};
use crate::cpu::state::rflags::{AF, ARITH, CF, OF, PF, SF, ZF};
use crate::cpu::state::SegReg;
use crate::cpu::{Cpu, Flow};
use crate::exceptions::gp0;
use crate::mmu::is_canonical;

use super::operand::gpr_info;

impl Cpu {
    /// The linear address of the memory operand of 64-bit code with 64-bit
    /// addressing (see the module documentation).
    #[inline(always)]
    pub(crate) fn ea64(&self, i: &Instruction) -> u64 {
        let mut a = i.memory_displacement64();
        let b = i.memory_base();
        if b != Register::None && b != Register::RIP {
            a = a.wrapping_add(
                self.state.gpr[(b as usize).wrapping_sub(Register::RAX as usize) & 15],
            );
        }
        let x = i.memory_index();
        if x != Register::None {
            let v = self.state.gpr[(x as usize).wrapping_sub(Register::RAX as usize) & 15];
            a = a.wrapping_add(v.wrapping_mul(u64::from(i.memory_index_scale())));
        }
        match i.memory_segment() {
            Register::FS => a.wrapping_add(self.state.seg[SegReg::Fs as usize].base),
            Register::GS => a.wrapping_add(self.state.seg[SegReg::Gs as usize].base),
            _ => a,
        }
    }

    /// [`Cpu::ea64`] or [`Cpu::ea`], as chosen at decode time.
    #[inline(always)]
    pub(crate) fn ea_form<const A64: bool>(&self, i: &Instruction) -> u64 {
        if A64 {
            self.ea64(i)
        } else {
            self.ea(i)
        }
    }
}

/// True if the memory operand of `i` (64-bit code) uses 64-bit addressing
/// that [`Cpu::ea64`] computes.
pub(crate) fn addr64(i: &Instruction) -> bool {
    let r64 =
        |r: Register| (r as u32) >= Register::RAX as u32 && (r as u32) <= Register::R15 as u32;
    let b = i.memory_base();
    let x = i.memory_index();
    i.code_size() == iced_x86::CodeSize::Code64
        && (b == Register::None || b == Register::RIP || r64(b))
        && (x == Register::None || r64(x))
}

/// The condition `CC` (an iced `ConditionCode` as u8) on `f`.
#[inline(always)]
pub(crate) fn cond<const CC: u8>(f: u64) -> bool {
    use iced_x86::ConditionCode as C;
    let set = |b: u64| f & b != 0;
    match CC {
        x if x == C::o as u8 => set(OF),
        x if x == C::no as u8 => !set(OF),
        x if x == C::b as u8 => set(CF),
        x if x == C::ae as u8 => !set(CF),
        x if x == C::e as u8 => set(ZF),
        x if x == C::ne as u8 => !set(ZF),
        x if x == C::be as u8 => set(CF) || set(ZF),
        x if x == C::a as u8 => !set(CF) && !set(ZF),
        x if x == C::s as u8 => set(SF),
        x if x == C::ns as u8 => !set(SF),
        x if x == C::p as u8 => set(PF),
        x if x == C::np as u8 => !set(PF),
        x if x == C::l as u8 => set(SF) != set(OF),
        x if x == C::ge as u8 => set(SF) == set(OF),
        x if x == C::le as u8 => set(ZF) || set(SF) != set(OF),
        _ => !set(ZF) && set(SF) == set(OF),
    }
}

/// MOVZX (`SIGN` false) / MOVSX / MOVSXD of a `SRC`-bit register
/// (`MEM` false) or memory operand into a register.
pub(crate) fn movx_form<const SIGN: bool, const SRC: u32, const MEM: bool, const A64: bool>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    let v = if MEM {
        let la = cpu.ea_form::<A64>(i);
        cpu.read_mem(la, (SRC / 8) as usize)?
    } else {
        cpu.reg(i.op1_register())
    };
    let v = if SIGN { sext(SRC, v) } else { v & mask(SRC) };
    cpu.set_reg(i.op0_register(), v);
    Ok(())
}

/// LEA with 64-bit addressing in 64-bit code (no segment base: LEA
/// computes the offset).
pub(crate) fn lea64(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let mut a = i.memory_displacement64();
    let b = i.memory_base();
    if b != Register::None && b != Register::RIP {
        a = a.wrapping_add(cpu.state.gpr[(b as usize).wrapping_sub(Register::RAX as usize) & 15]);
    }
    let x = i.memory_index();
    if x != Register::None {
        let v = cpu.state.gpr[(x as usize).wrapping_sub(Register::RAX as usize) & 15];
        a = a.wrapping_add(v.wrapping_mul(u64::from(i.memory_index_scale())));
    }
    cpu.set_reg(i.op0_register(), a);
    Ok(())
}

/// Shift/rotate operations of [`shift_form`].
pub(crate) mod sh {
    pub const SHL: u8 = 0;
    pub const SHR: u8 = 1;
    pub const SAR: u8 = 2;
    pub const ROL: u8 = 3;
    pub const ROR: u8 = 4;
}

/// Where the count of [`shift_form`] comes from.
pub(crate) mod count {
    pub const IMM: u8 = 0;
    pub const ONE: u8 = 1;
    pub const CL: u8 = 2;
}

/// SHL/SHR/SAR/ROL/ROR of a register by an immediate, 1 or CL. The
/// results and flags are [`super::shift::compute`]'s, as for the generic
/// handler.
pub(crate) fn shift_form<const OP: u8, const CNT: u8>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let dst = i.op0_register();
    let Some((_, bits, _)) = gpr_info(dst) else {
        return super::shift::shift(cpu, i);
    };
    let cmask = if bits == 64 { 0x3f } else { 0x1f };
    let count = match CNT {
        count::IMM => u64::from(i.immediate8()),
        count::ONE => 1,
        _ => cpu.state.gpr[RCX] & 0xff,
    } & cmask;
    let a = cpu.reg(dst);
    if count == 0 {
        // No flags change; a 32-bit destination is still zero-extended.
        cpu.set_reg(dst, a);
        return Ok(());
    }
    let (r, fmask, f) = super::shift::compute(OP, bits, a, count, cpu.state.flag(CF));
    cpu.set_reg(dst, r);
    cpu.state.set_arith(fmask, f);
    Ok(())
}

/// INC (`INC` true) / DEC of a register: CF is kept.
pub(crate) fn incdec_form<const INC: bool>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let dst = i.op0_register();
    let Some((_, bits, _)) = gpr_info(dst) else {
        return super::alu::unary(cpu, i);
    };
    let a = cpu.reg(dst);
    let (r, f) = if INC {
        flags::add(bits, a, 1, false)
    } else {
        flags::sub(bits, a, 1, false)
    };
    cpu.set_reg(dst, r);
    cpu.state.set_arith(OF | SF | ZF | AF | PF, f);
    Ok(())
}

/// PUSH of a 64-bit register in 64-bit code (64-bit stack).
pub(crate) fn push64(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let v = cpu.reg(i.op0_register());
    let sp = cpu.state.gpr[RSP].wrapping_sub(8);
    cpu.write_mem(sp, 8, v)?;
    cpu.state.gpr[RSP] = sp;
    Ok(())
}

/// POP into a 64-bit register in 64-bit code (POP RSP loads the value
/// read, as on hardware).
pub(crate) fn pop64(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let sp = cpu.state.gpr[RSP];
    let v = cpu.read_mem(sp, 8)?;
    cpu.state.gpr[RSP] = sp.wrapping_add(8);
    cpu.set_reg(i.op0_register(), v);
    Ok(())
}

/// CALL rel32 in 64-bit code.
pub(crate) fn call_rel64(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let target = i.near_branch64();
    if !is_canonical(target) {
        return Err(gp0());
    }
    let sp = cpu.state.gpr[RSP].wrapping_sub(8);
    cpu.write_mem(sp, 8, cpu.next_rip)?;
    cpu.state.gpr[RSP] = sp;
    cpu.next_rip = target;
    Ok(())
}

/// RET and RET imm16 (near, 64-bit operand size) in 64-bit code.
pub(crate) fn ret64<const IMM: bool>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let sp = cpu.state.gpr[RSP];
    let target = cpu.read_mem(sp, 8)?;
    if !is_canonical(target) {
        return Err(gp0());
    }
    let extra = if IMM { u64::from(i.immediate16()) } else { 0 };
    cpu.state.gpr[RSP] = sp.wrapping_add(8 + extra);
    cpu.next_rip = target;
    Ok(())
}

/// JMP rel8/rel32 in 64-bit code.
pub(crate) fn jmp_rel64(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let target = i.near_branch64();
    if !is_canonical(target) {
        return Err(gp0());
    }
    cpu.next_rip = target;
    Ok(())
}

/// SETcc of a byte register.
pub(crate) fn setcc_form<const CC: u8>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let v = u64::from(cond::<CC>(cpu.state.rflags));
    cpu.set_reg(i.op0_register(), v);
    Ok(())
}

/// CMOVcc from a register or memory into a register. The memory operand
/// is read (and may fault) whether or not the move is done, as on
/// hardware; a 32-bit destination is zero-extended either way.
pub(crate) fn cmov_form<const CC: u8, const MEM: bool, const A64: bool>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    let dst = i.op0_register();
    let src = if MEM {
        let la = cpu.ea_form::<A64>(i);
        cpu.read_mem(la, i.memory_size().size())?
    } else {
        cpu.reg(i.op1_register())
    };
    let v = if cond::<CC>(cpu.state.rflags) {
        src
    } else {
        cpu.reg(dst)
    };
    cpu.set_reg(dst, v);
    Ok(())
}

/// ADD/ADC/SUB/SBB/CMP/AND/OR/XOR/TEST with a memory destination and a
/// register (`IMM` false) or immediate source. The memory is written
/// before RFLAGS, so a faulting write leaves the registers as they were.
pub(crate) fn binary_mem_form<const OP: u8, const IMM: bool, const A64: bool>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    use super::alu::op;
    let bytes = i.memory_size().size();
    let bits = (bytes * 8) as u32;
    let m = mask(bits);
    let b = if IMM {
        i.immediate(1) & m
    } else {
        cpu.reg(i.op1_register())
    };
    let la = cpu.ea_form::<A64>(i);
    let a = cpu.read_mem(la, bytes)?;
    let cf = cpu.state.flag(CF);
    let (r, f) = match OP {
        op::ADD => flags::add(bits, a, b, false),
        op::ADC => flags::add(bits, a, b, cf),
        op::SUB | op::CMP => flags::sub(bits, a, b, false),
        op::SBB => flags::sub(bits, a, b, cf),
        op::AND | op::TEST => (a & b, flags::logic(bits, a & b)),
        op::OR => (a | b, flags::logic(bits, a | b)),
        _ => (a ^ b, flags::logic(bits, a ^ b)),
    };
    if OP != op::CMP && OP != op::TEST {
        cpu.write_mem(la, bytes, r)?;
    }
    cpu.state.set_arith(ARITH, f);
    Ok(())
}

/// NEG (`NEG` true) / NOT of a register (NOT changes no flags).
pub(crate) fn negnot_form<const NEG: bool>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let dst = i.op0_register();
    let Some((_, bits, _)) = gpr_info(dst) else {
        return super::alu::unary(cpu, i);
    };
    let a = cpu.reg(dst);
    if NEG {
        let (r, f) = flags::sub(bits, 0, a, false);
        cpu.set_reg(dst, r);
        cpu.state.set_arith(ARITH, f);
    } else {
        cpu.set_reg(dst, !a & mask(bits));
    }
    Ok(())
}

/// IMUL r, r/m (`THREE` false: the destination times the source) and
/// IMUL r, r/m, imm, with a register (`MEM` false) or memory source.
pub(crate) fn imul_form<const THREE: bool, const MEM: bool, const A64: bool>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    let dst = i.op0_register();
    let Some((_, bits, _)) = gpr_info(dst) else {
        return super::muldiv::muldiv(cpu, i);
    };
    let src = if MEM {
        let la = cpu.ea_form::<A64>(i);
        cpu.read_mem(la, (bits / 8) as usize)?
    } else {
        cpu.reg(i.op1_register())
    };
    let (a, b) = if THREE {
        (src, i.immediate(2))
    } else {
        (cpu.reg(dst), src)
    };
    let p = i128::from(sext(bits, a) as i64) * i128::from(sext(bits, b) as i64);
    let r = p as u64 & mask(bits);
    cpu.set_reg(dst, r);
    super::muldiv::set_mul_flags(cpu, bits, r, p != i128::from(sext(bits, r) as i64));
    Ok(())
}
