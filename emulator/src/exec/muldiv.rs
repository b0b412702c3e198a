//! MUL/IMUL (one, two and three operand forms) and DIV/IDIV with #DE.

use iced_x86::{Instruction, Mnemonic};

use crate::cpu::flags::{mask, sext, szp};
use crate::cpu::state::gpr::{RAX, RDX};
use crate::cpu::state::rflags::{ARITH, CF, OF};
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{exc, DE};

pub(crate) fn muldiv(cpu: &mut Cpu, i: &Instruction) -> Flow {
    if i.mnemonic() == Mnemonic::Imul && i.op_count() > 1 {
        return imul_n(cpu, i);
    }
    let bits = cpu.width(i, 0)?;
    let m = mask(bits);
    let src = cpu.read_op(i, 0)? & m;
    // The implicit accumulator pair as one 128-bit value (hi:lo).
    let (lo, hi) = if bits == 8 {
        (cpu.state.gpr[RAX] & 0xff, (cpu.state.gpr[RAX] >> 8) & 0xff)
    } else {
        (cpu.state.gpr[RAX] & m, cpu.state.gpr[RDX] & m)
    };
    let (rlo, rhi) = match i.mnemonic() {
        Mnemonic::Mul => {
            let p = u128::from(lo) * u128::from(src);
            let (rlo, rhi) = (p as u64 & m, (p >> bits) as u64 & m);
            set_mul_flags(cpu, bits, rlo, rhi != 0);
            (rlo, rhi)
        }
        Mnemonic::Imul => {
            let p = i128::from(sext(bits, lo) as i64) * i128::from(sext(bits, src) as i64);
            let rlo = p as u64 & m;
            let rhi = (p >> bits) as u64 & m;
            set_mul_flags(cpu, bits, rlo, p != i128::from(sext(bits, rlo) as i64));
            (rlo, rhi)
        }
        Mnemonic::Div => {
            let dividend = (u128::from(hi) << bits) | u128::from(lo);
            let d = u128::from(src);
            if d == 0 {
                return Err(exc(DE, None));
            }
            let q = dividend / d;
            if q > u128::from(m) {
                return Err(exc(DE, None));
            }
            (q as u64, (dividend % d) as u64)
        }
        _ => {
            // IDIV
            let dividend = ((i128::from(sext(bits, hi) as i64)) << bits) | i128::from(lo);
            let d = i128::from(sext(bits, src) as i64);
            let (Some(q), Some(r)) = (dividend.checked_div(d), dividend.checked_rem(d)) else {
                return Err(exc(DE, None));
            };
            let min = -(1i128 << (bits - 1));
            let max = (1i128 << (bits - 1)) - 1;
            if q < min || q > max {
                return Err(exc(DE, None));
            }
            (q as u64 & m, r as u64 & m)
        }
    };
    if bits == 8 {
        let ax = (rlo & 0xff) | ((rhi & 0xff) << 8);
        cpu.state.gpr[RAX] = (cpu.state.gpr[RAX] & !0xffff) | ax;
    } else {
        cpu.set_reg(acc(bits, RAX), rlo);
        cpu.set_reg(acc(bits, RDX), rhi);
    }
    Ok(())
}

fn acc(bits: u32, idx: usize) -> iced_x86::Register {
    use iced_x86::Register as R;
    match (bits, idx) {
        (16, RAX) => R::AX,
        (16, _) => R::DX,
        (32, RAX) => R::EAX,
        (32, _) => R::EDX,
        (_, RAX) => R::RAX,
        _ => R::RDX,
    }
}

/// CF = OF = the result did not fit; SF/ZF/PF (undefined) from the low half.
pub(crate) fn set_mul_flags(cpu: &mut Cpu, bits: u32, lo: u64, overflow: bool) {
    let mut f = szp(bits, lo);
    if overflow {
        f |= CF | OF;
    }
    cpu.state.set_arith(ARITH, f);
}

/// IMUL r, r/m and IMUL r, r/m, imm.
fn imul_n(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bits = cpu.width(i, 0)?;
    let (a, b) = if i.op_count() == 3 {
        (cpu.read_op(i, 1)?, cpu.read_op(i, 2)?)
    } else {
        (cpu.read_op(i, 0)?, cpu.read_op(i, 1)?)
    };
    let p = i128::from(sext(bits, a) as i64) * i128::from(sext(bits, b) as i64);
    let r = p as u64 & mask(bits);
    cpu.write_op(i, 0, r)?;
    set_mul_flags(cpu, bits, r, p != i128::from(sext(bits, r) as i64));
    Ok(())
}
