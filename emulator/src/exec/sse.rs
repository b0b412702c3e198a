//! The SSE2 integer and logic subset: 128-bit moves, MOVD/MOVQ, bitwise
//! logic, packed compare/add/subtract, unpacks, PSHUFD, byte shifts and
//! mask extraction. MMX register forms and VEX encodings are not
//! implemented (#UD), and SSE/SSE2 are not advertised in CPUID until the
//! set is complete.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::{gpr_info, xmm_index};
use crate::cpu::state::{cr0, cr4};
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{exc, gp0, ud, NM};

pub(crate) fn handles(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Movdqa
            | M::Movdqu
            | M::Movaps
            | M::Movups
            | M::Movapd
            | M::Movupd
            | M::Movq
            | M::Movd
            | M::Pxor
            | M::Por
            | M::Pand
            | M::Pandn
            | M::Xorps
            | M::Xorpd
            | M::Andps
            | M::Andpd
            | M::Orps
            | M::Orpd
            | M::Andnps
            | M::Andnpd
            | M::Pcmpeqb
            | M::Pcmpeqw
            | M::Pcmpeqd
            | M::Pcmpgtb
            | M::Pcmpgtw
            | M::Pcmpgtd
            | M::Pmovmskb
            | M::Paddb
            | M::Paddw
            | M::Paddd
            | M::Paddq
            | M::Psubb
            | M::Psubw
            | M::Psubd
            | M::Psubq
            | M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Pshufd
            | M::Pslldq
            | M::Psrldq
            | M::Pminub
            | M::Pmaxub
            | M::Movmskps
            | M::Movmskpd
    )
}

fn is_mmx(r: Register) -> bool {
    (r as u32) >= Register::MM0 as u32 && (r as u32) <= Register::MM7 as u32
}

/// Moves that allow unaligned 128-bit memory operands.
fn unaligned_ok(m: Mnemonic) -> bool {
    matches!(m, Mnemonic::Movdqu | Mnemonic::Movups | Mnemonic::Movupd)
}

impl Cpu {
    fn read_x(&mut self, i: &Instruction, n: u32) -> Flow<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match xmm_index(r) {
                    Some(x) => Ok(self.state.xmm[x]),
                    None => Ok(u128::from(self.reg(r))),
                }
            }
            OpKind::Memory => {
                let la = self.ea(i);
                match i.memory_size().size() {
                    16 => {
                        if la & 15 != 0 && !unaligned_ok(i.mnemonic()) {
                            return Err(gp0());
                        }
                        self.read_u128(la)
                    }
                    sz => Ok(u128::from(self.read_mem(la, sz)?)),
                }
            }
            OpKind::Immediate8 => Ok(u128::from(i.immediate8())),
            _ => Err(ud()),
        }
    }

    fn write_x(&mut self, i: &Instruction, n: u32, v: u128) -> Flow {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match xmm_index(r) {
                    Some(x) => self.state.xmm[x] = v,
                    None => self.set_reg(r, v as u64),
                }
                Ok(())
            }
            OpKind::Memory => {
                let la = self.ea(i);
                match i.memory_size().size() {
                    16 => {
                        if la & 15 != 0 && !unaligned_ok(i.mnemonic()) {
                            return Err(gp0());
                        }
                        self.write_u128(la, v)
                    }
                    sz => self.write_mem(la, sz, v as u64),
                }
            }
            _ => Err(ud()),
        }
    }
}

/// Apply `f` to each `w`-byte lane of `a` and `b`.
fn lanes(a: u128, b: u128, w: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let bits = w * 8;
    let m: u128 = if bits == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << bits) - 1
    };
    let mut r = 0u128;
    for k in 0..(16 / w) {
        let sh = k * bits;
        let x = ((a >> sh) & m) as u64;
        let y = ((b >> sh) & m) as u64;
        r |= (u128::from(f(x, y)) & m) << sh;
    }
    r
}

/// Interleave the low (or high) `w`-byte lanes of `a` and `b`.
fn unpack(a: u128, b: u128, w: u32, high: bool) -> u128 {
    let bits = w * 8;
    let m: u128 = if bits == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << bits) - 1
    };
    let half = 8 / w;
    let base = if high { half } else { 0 };
    let mut r = 0u128;
    for k in 0..half {
        let x = (a >> ((base + k) * bits)) & m;
        let y = (b >> ((base + k) * bits)) & m;
        r |= x << (2 * k * bits);
        r |= y << ((2 * k + 1) * bits);
    }
    r
}

fn sign_mask(v: u128, w: u32) -> u64 {
    let bits = w * 8;
    (0..16 / w).fold(0u64, |acc, k| {
        acc | ((((v >> (k * bits + bits - 1)) & 1) as u64) << k)
    })
}

pub(crate) fn sse(cpu: &mut Cpu, i: &Instruction) -> Flow {
    use Mnemonic as M;
    if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && is_mmx(i.op_register(n))) {
        return cpu.unimplemented(i);
    }
    if cpu.state.cr0 & cr0::EM != 0 || cpu.state.cr4 & cr4::OSFXSR == 0 {
        return Err(ud());
    }
    if cpu.state.cr0 & cr0::TS != 0 {
        return Err(exc(NM, None));
    }
    let m = i.mnemonic();
    let dst_xmm = i.op0_kind() == OpKind::Register && xmm_index(i.op0_register()).is_some();
    match m {
        M::Movdqa | M::Movdqu | M::Movaps | M::Movups | M::Movapd | M::Movupd => {
            let v = cpu.read_x(i, 1)?;
            cpu.write_x(i, 0, v)
        }
        M::Movq | M::Movd => {
            let v = cpu.read_x(i, 1)?;
            let v = if m == M::Movd {
                v & 0xffff_ffff
            } else {
                v & u128::from(u64::MAX)
            };
            // To an XMM register the rest is zeroed; to a GPR or memory only
            // the low 32/64 bits are written.
            if !dst_xmm {
                if let (OpKind::Register, Some((_, _, _))) =
                    (i.op0_kind(), gpr_info(i.op0_register()))
                {
                    cpu.set_reg(i.op0_register(), v as u64);
                    return Ok(());
                }
            }
            cpu.write_x(i, 0, v)
        }
        M::Pmovmskb | M::Movmskps | M::Movmskpd => {
            let v = cpu.read_x(i, 1)?;
            let w = match m {
                M::Pmovmskb => 1,
                M::Movmskps => 4,
                _ => 8,
            };
            cpu.set_reg(i.op0_register(), sign_mask(v, w));
            Ok(())
        }
        M::Pshufd => {
            let src = cpu.read_x(i, 1)?;
            let imm = i.immediate8();
            let mut r = 0u128;
            for k in 0..4 {
                let sel = u32::from((imm >> (2 * k)) & 3);
                r |= ((src >> (32 * sel)) & 0xffff_ffff) << (32 * k);
            }
            cpu.write_x(i, 0, r)
        }
        M::Pslldq | M::Psrldq => {
            let a = cpu.read_x(i, 0)?;
            let n = u32::from(i.immediate8());
            let r = if n > 15 {
                0
            } else if m == M::Pslldq {
                a << (8 * n)
            } else {
                a >> (8 * n)
            };
            cpu.write_x(i, 0, r)
        }
        _ => {
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let sx = |v: u64, w: u32| crate::cpu::flags::sext(w * 8, v) as i64;
            let r = match m {
                M::Pxor | M::Xorps | M::Xorpd => a ^ b,
                M::Por | M::Orps | M::Orpd => a | b,
                M::Pand | M::Andps | M::Andpd => a & b,
                M::Pandn | M::Andnps | M::Andnpd => !a & b,
                M::Pcmpeqb => lanes(a, b, 1, |x, y| if x == y { u64::MAX } else { 0 }),
                M::Pcmpeqw => lanes(a, b, 2, |x, y| if x == y { u64::MAX } else { 0 }),
                M::Pcmpeqd => lanes(a, b, 4, |x, y| if x == y { u64::MAX } else { 0 }),
                M::Pcmpgtb => lanes(
                    a,
                    b,
                    1,
                    |x, y| if sx(x, 1) > sx(y, 1) { u64::MAX } else { 0 },
                ),
                M::Pcmpgtw => lanes(
                    a,
                    b,
                    2,
                    |x, y| if sx(x, 2) > sx(y, 2) { u64::MAX } else { 0 },
                ),
                M::Pcmpgtd => lanes(
                    a,
                    b,
                    4,
                    |x, y| if sx(x, 4) > sx(y, 4) { u64::MAX } else { 0 },
                ),
                M::Paddb => lanes(a, b, 1, u64::wrapping_add),
                M::Paddw => lanes(a, b, 2, u64::wrapping_add),
                M::Paddd => lanes(a, b, 4, u64::wrapping_add),
                M::Paddq => lanes(a, b, 8, u64::wrapping_add),
                M::Psubb => lanes(a, b, 1, u64::wrapping_sub),
                M::Psubw => lanes(a, b, 2, u64::wrapping_sub),
                M::Psubd => lanes(a, b, 4, u64::wrapping_sub),
                M::Psubq => lanes(a, b, 8, u64::wrapping_sub),
                M::Pminub => lanes(a, b, 1, u64::min),
                M::Pmaxub => lanes(a, b, 1, u64::max),
                M::Punpcklbw => unpack(a, b, 1, false),
                M::Punpcklwd => unpack(a, b, 2, false),
                M::Punpckldq => unpack(a, b, 4, false),
                M::Punpcklqdq => unpack(a, b, 8, false),
                M::Punpckhbw => unpack(a, b, 1, true),
                M::Punpckhwd => unpack(a, b, 2, true),
                M::Punpckhdq => unpack(a, b, 4, true),
                _ => unpack(a, b, 8, true),
            };
            cpu.write_x(i, 0, r)
        }
    }
}
