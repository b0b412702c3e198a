//! Integer arithmetic and logic: ADD/ADC/SUB/SBB/CMP/AND/OR/XOR/TEST,
//! INC/DEC/NEG/NOT, sign conversions and the flag instructions.

use iced_x86::{Instruction, Mnemonic};

use crate::cpu::flags::{self, mask};
use crate::cpu::state::gpr::{RAX, RDX};
use crate::cpu::state::rflags::{self, AF, ARITH, CF, OF, PF, SF, ZF};
use crate::cpu::{Cpu, Flow};

pub(crate) fn binary(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bits = cpu.width(i, 0)?;
    let a = cpu.read_op(i, 0)? & mask(bits);
    let b = cpu.read_op(i, 1)? & mask(bits);
    let cf = cpu.state.flag(CF);
    let (r, f, write) = match i.mnemonic() {
        Mnemonic::Add => with(flags::add(bits, a, b, false), true),
        Mnemonic::Adc => with(flags::add(bits, a, b, cf), true),
        Mnemonic::Sub => with(flags::sub(bits, a, b, false), true),
        Mnemonic::Sbb => with(flags::sub(bits, a, b, cf), true),
        Mnemonic::Cmp => with(flags::sub(bits, a, b, false), false),
        Mnemonic::And => (a & b, flags::logic(bits, a & b), true),
        Mnemonic::Or => (a | b, flags::logic(bits, a | b), true),
        Mnemonic::Xor => (a ^ b, flags::logic(bits, a ^ b), true),
        _ => (a & b, flags::logic(bits, a & b), false), // TEST
    };
    if write {
        cpu.write_op(i, 0, r)?;
    }
    cpu.state.set_arith(ARITH, f);
    Ok(())
}

/// ALU operations of [`binary_form`].
pub(crate) mod op {
    pub const ADD: u8 = 0;
    pub const ADC: u8 = 1;
    pub const SUB: u8 = 2;
    pub const SBB: u8 = 3;
    pub const CMP: u8 = 4;
    pub const AND: u8 = 5;
    pub const OR: u8 = 6;
    pub const XOR: u8 = 7;
    pub const TEST: u8 = 8;
}

/// Operand forms of [`binary_form`]: destination register and a register,
/// immediate or memory source.
pub(crate) mod form {
    pub const REG_REG: u8 = 0;
    pub const REG_IMM: u8 = 1;
    pub const REG_MEM: u8 = 2;
}

/// [`binary`] specialised at decode time for one operation and a register
/// destination (the common forms), so that neither the operation nor the
/// operand kinds are looked up again on every execution.
///
/// `W` is 32 or 64 when every register operand is known at decode time to
/// be a 32-bit or 64-bit GPR (see [`super::operand::full_gpr`]): the registers are
/// then indexed directly and the width is a constant; 0 handles any width.
pub(crate) fn binary_form<const OP: u8, const FORM: u8, const A64: bool, const W: u32>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    let dst = i.op0_register();
    let bits = if W != 0 {
        W
    } else {
        let Some((_, bits, _)) = super::operand::gpr_info(dst) else {
            return binary(cpu, i);
        };
        bits
    };
    let m = mask(bits);
    let b = match FORM {
        form::REG_REG if W != 0 => {
            cpu.state.gpr[super::operand::full_gpr::<W>(i.op1_register())] & m
        }
        form::REG_REG => cpu.reg(i.op1_register()),
        form::REG_IMM => i.immediate(1) & m,
        _ => {
            let la = cpu.ea_form::<A64>(i);
            cpu.read_mem(la, (bits / 8) as usize)?
        }
    };
    let d = super::operand::full_gpr::<W>(dst);
    let a = if W != 0 {
        cpu.state.gpr[d] & m
    } else {
        cpu.reg(dst)
    };
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
        if W != 0 {
            // A 32-bit destination is zero-extended (`r` is masked).
            cpu.state.gpr[d] = r;
        } else {
            cpu.set_reg(dst, r);
        }
    }
    cpu.state.set_arith(ARITH, f);
    Ok(())
}

fn with((r, f): (u64, u64), write: bool) -> (u64, u64, bool) {
    (r, f, write)
}

pub(crate) fn unary(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bits = cpu.width(i, 0)?;
    let a = cpu.read_op(i, 0)? & mask(bits);
    match i.mnemonic() {
        Mnemonic::Inc | Mnemonic::Dec => {
            let (r, f) = if i.mnemonic() == Mnemonic::Inc {
                flags::add(bits, a, 1, false)
            } else {
                flags::sub(bits, a, 1, false)
            };
            cpu.write_op(i, 0, r)?;
            // CF is not affected.
            cpu.state.set_arith(OF | SF | ZF | AF | PF, f);
        }
        Mnemonic::Neg => {
            let (r, f) = flags::sub(bits, 0, a, false);
            cpu.write_op(i, 0, r)?;
            cpu.state.set_arith(ARITH, f);
        }
        _ => cpu.write_op(i, 0, !a & mask(bits))?, // NOT: no flags
    }
    Ok(())
}

/// CBW/CWDE/CDQE and CWD/CDQ/CQO.
pub(crate) fn convert(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let rax = cpu.state.gpr[RAX];
    let s = &mut cpu.state;
    match i.mnemonic() {
        Mnemonic::Cbw => s.gpr[RAX] = (rax & !0xffff) | (flags::sext(8, rax) & 0xffff),
        Mnemonic::Cwde => s.gpr[RAX] = flags::sext(16, rax) & 0xffff_ffff,
        Mnemonic::Cdqe => s.gpr[RAX] = flags::sext(32, rax),
        Mnemonic::Cwd => {
            let hi = (flags::sext(16, rax) >> 16) & 0xffff;
            s.gpr[RDX] = (s.gpr[RDX] & !0xffff) | hi;
        }
        Mnemonic::Cdq => s.gpr[RDX] = (flags::sext(32, rax) >> 32) & 0xffff_ffff,
        _ => s.gpr[RDX] = ((rax as i64) >> 63) as u64, // CQO
    }
    Ok(())
}

pub(crate) fn flag_op(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let s = &mut cpu.state;
    match i.mnemonic() {
        Mnemonic::Clc => s.set_flag(CF, false),
        Mnemonic::Stc => s.set_flag(CF, true),
        Mnemonic::Cmc => s.rflags ^= CF,
        Mnemonic::Cld => s.set_flag(rflags::DF, false),
        Mnemonic::Std => s.set_flag(rflags::DF, true),
        Mnemonic::Lahf => {
            let ah = (s.rflags & (SF | ZF | AF | PF | CF)) | rflags::FIXED1;
            s.gpr[RAX] = (s.gpr[RAX] & !0xff00) | (ah << 8);
        }
        _ => {
            // SAHF
            let ah = (s.gpr[RAX] >> 8) & 0xff;
            s.set_arith(SF | ZF | AF | PF | CF, ah);
        }
    }
    Ok(())
}
