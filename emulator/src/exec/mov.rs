//! Data movement: MOV/MOVZX/MOVSX/MOVSXD, LEA, XCHG, CMPXCHG(8B/16B),
//! XADD, CMOVcc and SETcc.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::flags::{self, mask, sext};
use crate::cpu::state::gpr::{RAX, RBX, RCX, RDX};
use crate::cpu::state::rflags::{ARITH, ZF};
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{gp0, ud};

fn is_special(r: Register) -> bool {
    let v = r as u32;
    (v >= Register::CR0 as u32 && v <= Register::CR15 as u32)
        || (v >= Register::DR0 as u32 && v <= Register::DR15 as u32)
}

fn is_sreg(r: Register) -> bool {
    matches!(
        r,
        Register::ES | Register::CS | Register::SS | Register::DS | Register::FS | Register::GS
    )
}

pub(crate) fn mov(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let reg_op = |n: u32| (i.op_kind(n) == OpKind::Register).then(|| i.op_register(n));
    if [reg_op(0), reg_op(1)].into_iter().flatten().any(is_special) {
        return super::system::mov_cr_dr(cpu, i);
    }
    if [reg_op(0), reg_op(1)].into_iter().flatten().any(is_sreg) {
        return super::system::mov_sreg(cpu, i);
    }
    match i.mnemonic() {
        Mnemonic::Mov => {
            let v = cpu.read_op(i, 1)?;
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Movzx => {
            let v = cpu.read_op(i, 1)? & mask(cpu.width(i, 1)?);
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Movsx | Mnemonic::Movsxd => {
            let v = sext(cpu.width(i, 1)?, cpu.read_op(i, 1)?);
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Lea => {
            if i.op1_kind() != OpKind::Memory {
                return Err(ud());
            }
            let v = cpu.offset(i);
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Xchg => {
            let a = cpu.read_op(i, 0)?;
            let b = cpu.read_op(i, 1)?;
            // Memory (if any) first so a fault leaves registers alone.
            if i.op1_kind() == OpKind::Memory {
                cpu.write_op(i, 1, a)?;
                cpu.write_op(i, 0, b)
            } else {
                cpu.write_op(i, 0, b)?;
                cpu.write_op(i, 1, a)
            }
        }
        Mnemonic::Xadd => {
            let bits = cpu.width(i, 0)?;
            let d = cpu.read_op(i, 0)?;
            let s = cpu.read_op(i, 1)?;
            let (r, f) = flags::add(bits, d, s, false);
            if i.op0_kind() == OpKind::Memory {
                cpu.write_op(i, 0, r)?;
                cpu.write_op(i, 1, d)?;
            } else {
                cpu.write_op(i, 1, d)?;
                cpu.write_op(i, 0, r)?;
            }
            cpu.state.set_arith(ARITH, f);
            Ok(())
        }
        Mnemonic::Cmpxchg => {
            let bits = cpu.width(i, 0)?;
            let d = cpu.read_op(i, 0)? & mask(bits);
            let acc = cpu.state.gpr[RAX] & mask(bits);
            let (_, f) = flags::sub(bits, acc, d, false);
            if acc == d {
                let s = cpu.read_op(i, 1)?;
                cpu.write_op(i, 0, s)?;
            } else {
                if i.op0_kind() == OpKind::Memory {
                    cpu.write_op(i, 0, d)?;
                }
                let r = match bits {
                    8 => Register::AL,
                    16 => Register::AX,
                    32 => Register::EAX,
                    _ => Register::RAX,
                };
                cpu.set_reg(r, d);
            }
            cpu.state.set_arith(ARITH, f);
            Ok(())
        }
        Mnemonic::Cmpxchg8b => {
            let la = cpu.ea(i);
            let m = cpu.read_mem(la, 8)?;
            let s = &cpu.state;
            let cmp = (s.gpr[RDX] << 32) | (s.gpr[RAX] & 0xffff_ffff);
            if m == cmp {
                let new = (s.gpr[RCX] << 32) | (s.gpr[RBX] & 0xffff_ffff);
                cpu.write_mem(la, 8, new)?;
                cpu.state.set_flag(ZF, true);
            } else {
                cpu.write_mem(la, 8, m)?;
                cpu.state.gpr[RAX] = m & 0xffff_ffff;
                cpu.state.gpr[RDX] = m >> 32;
                cpu.state.set_flag(ZF, false);
            }
            Ok(())
        }
        Mnemonic::Cmpxchg16b => {
            let la = cpu.ea(i);
            if la & 15 != 0 {
                return Err(gp0());
            }
            let m = cpu.read_u128(la)?;
            let s = &cpu.state;
            let cmp = (u128::from(s.gpr[RDX]) << 64) | u128::from(s.gpr[RAX]);
            if m == cmp {
                let new = (u128::from(s.gpr[RCX]) << 64) | u128::from(s.gpr[RBX]);
                cpu.write_u128(la, new)?;
                cpu.state.set_flag(ZF, true);
            } else {
                cpu.write_u128(la, m)?;
                cpu.state.gpr[RAX] = m as u64;
                cpu.state.gpr[RDX] = (m >> 64) as u64;
                cpu.state.set_flag(ZF, false);
            }
            Ok(())
        }
        _ => Err(ud()),
    }
}

/// Operand forms of [`mov_form`].
pub(crate) mod form {
    /// Register to register.
    pub const REG_REG: u8 = 0;
    /// Memory to register.
    pub const REG_MEM: u8 = 1;
    /// Register to memory.
    pub const MEM_REG: u8 = 2;
    /// Immediate to register.
    pub const REG_IMM: u8 = 3;
    /// Immediate to memory.
    pub const MEM_IMM: u8 = 4;
}

/// MOV between general purpose registers, memory and immediates,
/// specialised at decode time for one operand form. `W` (32 or 64, or 0
/// for any width) as for [`super::alu::binary_form`].
pub(crate) fn mov_form<const FORM: u8, const A64: bool, const W: u32>(
    cpu: &mut Cpu,
    i: &Instruction,
) -> Flow {
    use super::operand::full_gpr;
    let m = mask(W);
    if W != 0 {
        match FORM {
            form::REG_REG => {
                let v = cpu.state.gpr[full_gpr::<W>(i.op1_register())] & m;
                cpu.state.gpr[full_gpr::<W>(i.op0_register())] = v;
                return Ok(());
            }
            form::REG_MEM => {
                let la = cpu.ea_form::<A64>(i);
                let v = cpu.read_mem(la, (W / 8) as usize)?;
                cpu.state.gpr[full_gpr::<W>(i.op0_register())] = v;
                return Ok(());
            }
            form::MEM_REG => {
                let v = cpu.state.gpr[full_gpr::<W>(i.op1_register())];
                let la = cpu.ea_form::<A64>(i);
                return cpu.write_mem(la, (W / 8) as usize, v);
            }
            form::REG_IMM => {
                cpu.state.gpr[full_gpr::<W>(i.op0_register())] = i.immediate(1) & m;
                return Ok(());
            }
            _ => {}
        }
    }
    match FORM {
        form::REG_REG => {
            let v = cpu.reg(i.op1_register());
            cpu.set_reg(i.op0_register(), v);
            Ok(())
        }
        form::REG_MEM => {
            let la = cpu.ea_form::<A64>(i);
            let v = cpu.read_mem(la, i.memory_size().size())?;
            cpu.set_reg(i.op0_register(), v);
            Ok(())
        }
        form::MEM_REG => {
            let v = cpu.reg(i.op1_register());
            let la = cpu.ea_form::<A64>(i);
            cpu.write_mem(la, i.memory_size().size(), v)
        }
        form::REG_IMM => {
            cpu.set_reg(i.op0_register(), i.immediate(1));
            Ok(())
        }
        _ => {
            let la = cpu.ea_form::<A64>(i);
            cpu.write_mem(la, i.memory_size().size(), i.immediate(1))
        }
    }
}

pub(crate) fn cmov(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let src = cpu.read_op(i, 1)?;
    // A 32-bit destination is zero-extended even when the move is not done.
    let v = if cpu.cond(i.condition_code()) {
        src
    } else {
        cpu.read_op(i, 0)?
    };
    cpu.write_op(i, 0, v)
}

pub(crate) fn setcc(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let v = u64::from(cpu.cond(i.condition_code()));
    cpu.write_op(i, 0, v)
}
