//! Shifts and rotates: SHL/SAL/SHR/SAR/ROL/ROR/RCL/RCR and SHLD/SHRD.
//!
//! Flags left undefined by the architecture are given the values of the
//! single-bit case (OF) or left unchanged (AF is cleared by shifts).

use iced_x86::{Instruction, Mnemonic};

use crate::cpu::flags::{mask, sext, sign_bit, szp};
use crate::cpu::state::rflags::{AF, ARITH, CF, OF};
use crate::cpu::{Cpu, Flow};

fn count_mask(bits: u32) -> u64 {
    if bits == 64 {
        0x3f
    } else {
        0x1f
    }
}

pub(crate) fn shift(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bits = cpu.width(i, 0)?;
    let a = cpu.read_op(i, 0)? & mask(bits);
    let count = cpu.read_op(i, 1)? & count_mask(bits);
    if count == 0 {
        // No flags change, but a 32-bit register destination is still
        // written (zero-extended), as on hardware.
        if i.op0_kind() == iced_x86::OpKind::Register {
            cpu.write_op(i, 0, a)?;
        }
        return Ok(());
    }
    let cf_in = cpu.state.flag(CF);
    use super::fast::sh;
    let op = match i.mnemonic() {
        Mnemonic::Shl | Mnemonic::Sal => sh::SHL,
        Mnemonic::Shr => sh::SHR,
        Mnemonic::Sar => sh::SAR,
        Mnemonic::Rol => sh::ROL,
        Mnemonic::Ror => sh::ROR,
        Mnemonic::Rcl => RCL,
        _ => RCR,
    };
    let (r, fmask, f) = compute(op, bits, a, count, cf_in);
    cpu.write_op(i, 0, r)?;
    cpu.state.set_arith(fmask, f);
    Ok(())
}

const RCL: u8 = 5;
const RCR: u8 = 6;

/// The result of shift or rotate `op` ([`super::fast::sh`], or RCL/RCR)
/// of the `bits`-bit value `a` by `count` (already masked, not 0), and the
/// RFLAGS bits it writes with their values.
#[inline(always)]
pub(crate) fn compute(op: u8, bits: u32, a: u64, count: u64, cf_in: bool) -> (u64, u64, u64) {
    use super::fast::sh;
    let m = mask(bits);
    let msb = sign_bit(bits);
    let a = a & m;
    let bit = |v: u64, n: u64| -> bool { n < 64 && (v >> n) & 1 == 1 };
    // (result, CF, OF, whether SF/ZF/PF/AF are written)
    let (r, cf, of, szp_written) = match op {
        sh::SHL => {
            let r = if count >= 64 { 0 } else { (a << count) & m };
            let cf = count <= u64::from(bits) && bit(a, u64::from(bits) - count);
            (r, cf, (r & msb != 0) ^ cf, true)
        }
        sh::SHR => {
            let r = if count >= 64 { 0 } else { a >> count };
            (r, bit(a, count - 1), a & msb != 0, true)
        }
        sh::SAR => {
            let sa = sext(bits, a) as i64;
            let r = (sa >> count.min(63)) as u64 & m;
            let cf = (sa >> (count - 1).min(63)) & 1 == 1;
            (r, cf, false, true)
        }
        sh::ROL => {
            let rc = count % u64::from(bits);
            let r = if rc == 0 {
                a
            } else {
                ((a << rc) | (a >> (u64::from(bits) - rc))) & m
            };
            let cf = r & 1 == 1;
            (r, cf, (r & msb != 0) ^ cf, false)
        }
        sh::ROR => {
            let rc = count % u64::from(bits);
            let r = if rc == 0 {
                a
            } else {
                ((a >> rc) | (a << (u64::from(bits) - rc))) & m
            };
            let cf = r & msb != 0;
            (r, cf, cf ^ (r & (msb >> 1) != 0), false)
        }
        RCL => {
            let rc = count % (u64::from(bits) + 1);
            let (mut v, mut c) = (a, cf_in);
            for _ in 0..rc {
                let out = v & msb != 0;
                v = ((v << 1) | u64::from(c)) & m;
                c = out;
            }
            (v, c, (v & msb != 0) ^ c, false)
        }
        _ => {
            // RCR
            let rc = count % (u64::from(bits) + 1);
            let of = (a & msb != 0) ^ cf_in;
            let (mut v, mut c) = (a, cf_in);
            for _ in 0..rc {
                let out = v & 1 != 0;
                v = (v >> 1) | if c { msb } else { 0 };
                c = out;
            }
            (v, c, of, false)
        }
    };
    let f = if cf { CF } else { 0 } | if of { OF } else { 0 };
    if szp_written {
        (r, ARITH, (f | szp(bits, r)) & !AF)
    } else {
        (r, CF | OF, f)
    }
}

/// SHLD/SHRD.
pub(crate) fn double(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bits = cpu.width(i, 0)?;
    let m = mask(bits);
    let msb = sign_bit(bits);
    let dst = cpu.read_op(i, 0)? & m;
    let src = cpu.read_op(i, 1)? & m;
    let count = cpu.read_op(i, 2)? & count_mask(bits);
    if count == 0 {
        // No flags change, but a 32-bit register destination is still
        // written (zero-extended), as on hardware.
        if i.op0_kind() == iced_x86::OpKind::Register {
            cpu.write_op(i, 0, dst)?;
        }
        return Ok(());
    }
    let b = u64::from(bits);
    // For 16-bit operands with counts above 16 the result is undefined;
    // this repeats the source pattern, as a 48-bit funnel would.
    let (r, cf) = if i.mnemonic() == Mnemonic::Shld {
        let v = (u128::from(dst) << b) | u128::from(src);
        let (v, top) = if count > b {
            ((v << b) | u128::from(src), 3 * b)
        } else {
            (v, 2 * b)
        };
        let r = ((v << count) >> (top - b)) as u64 & m;
        let cf = (v >> (top - count)) & 1 == 1;
        (r, cf)
    } else {
        let v = (u128::from(src) << b) | u128::from(dst);
        let v = if count > b {
            v | (u128::from(src) << (2 * b))
        } else {
            v
        };
        let r = (v >> count) as u64 & m;
        let cf = (v >> (count - 1)) & 1 == 1;
        (r, cf)
    };
    cpu.write_op(i, 0, r)?;
    let of = (r & msb != 0) ^ (dst & msb != 0);
    let f = szp(bits, r) | if cf { CF } else { 0 } | if of { OF } else { 0 };
    cpu.state.set_arith(ARITH, f);
    Ok(())
}
