//! Bit instructions: BSF/BSR, BT/BTS/BTR/BTC, BSWAP and POPCNT. TZCNT and
//! LZCNT (F3-prefixed BSF/BSR) run as BSF/BSR, as on CPUs without BMI1
//! and LZCNT, which CPUID does not advertise (Linux's `rep; bsf` relies
//! on this).

use iced_x86::{Instruction, Mnemonic, OpKind};

use crate::cpu::flags::{mask, sext, szp};
use crate::cpu::state::rflags::{ARITH, CF, ZF};
use crate::cpu::{Cpu, Flow};

pub(crate) fn bits(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let w = cpu.width(i, 0)?;
    let m = match i.mnemonic() {
        Mnemonic::Tzcnt => Mnemonic::Bsf,
        Mnemonic::Lzcnt => Mnemonic::Bsr,
        m => m,
    };
    match m {
        Mnemonic::Bsf | Mnemonic::Bsr => {
            let src = cpu.read_op(i, 1)? & mask(w);
            if src == 0 {
                // Destination unchanged (as hardware does); ZF set.
                cpu.state.set_arith(ARITH, ZF | szp(w, 0) & !ZF);
                return Ok(());
            }
            let r = if m == Mnemonic::Bsf {
                u64::from(src.trailing_zeros())
            } else {
                u64::from(63 - src.leading_zeros())
            };
            cpu.write_op(i, 0, r)?;
            cpu.state.set_arith(ARITH, szp(w, r) & !ZF);
        }
        Mnemonic::Popcnt => {
            let src = cpu.read_op(i, 1)? & mask(w);
            let r = u64::from(src.count_ones());
            cpu.write_op(i, 0, r)?;
            cpu.state.set_arith(ARITH, if src == 0 { ZF } else { 0 });
        }
        Mnemonic::Bswap => {
            let v = cpu.read_op(i, 0)?;
            let r = match w {
                64 => v.swap_bytes(),
                32 => u64::from((v as u32).swap_bytes()),
                _ => 0, // BSWAP r16 is undefined; hardware gives zero.
            };
            cpu.write_op(i, 0, r)?;
        }
        _ => {
            // BT/BTS/BTR/BTC. With a register offset and a memory base the
            // offset addresses any bit relative to the operand.
            let off = cpu.read_op(i, 1)?;
            let (val, bit, la) =
                if i.op0_kind() == OpKind::Memory && i.op1_kind() == OpKind::Register {
                    let soff = sext(w, off & mask(w)) as i64;
                    let bytes = i64::from(w / 8);
                    let disp = soff.div_euclid(i64::from(w)) * bytes;
                    let la = cpu.ea(i).wrapping_add(disp as u64);
                    (
                        cpu.read_mem(la, (w / 8) as usize)?,
                        soff.rem_euclid(i64::from(w)) as u32,
                        Some(la),
                    )
                } else {
                    (cpu.read_op(i, 0)?, (off & u64::from(w - 1)) as u32, None)
                };
            let cf = (val >> bit) & 1 == 1;
            let new = match i.mnemonic() {
                Mnemonic::Bts => Some(val | (1 << bit)),
                Mnemonic::Btr => Some(val & !(1 << bit)),
                Mnemonic::Btc => Some(val ^ (1 << bit)),
                _ => None,
            };
            if let Some(n) = new {
                match la {
                    Some(la) => cpu.write_mem(la, (w / 8) as usize, n)?,
                    None => cpu.write_op(i, 0, n)?,
                }
            }
            cpu.state.set_flag(CF, cf);
        }
    }
    Ok(())
}
