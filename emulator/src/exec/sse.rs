//! SSE and SSE2: 128-bit, scalar and partial moves, integer arithmetic,
//! logic, compares, shifts, shuffles, packs and unpacks, and scalar and
//! packed single/double arithmetic, compares and conversions with MXCSR
//! rounding, DAZ/FTZ and exception flags (unmasked exceptions raise #XM,
//! or #UD without CR4.OSXMMEXCPT). MMX register forms, MASKMOVDQU,
//! RCPPS/RSQRTPS and VEX encodings are not implemented (#UD).

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::float::{self, Ctl, Fmt, Op};
use super::operand::{gpr_info, xmm_index};
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
    ) || sse2_more(m)
}

/// The rest of SSE/SSE2: scalar and packed float, conversions, shuffles,
/// the remaining integer operations and moves.
fn sse2_more(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Movss
            | M::Movsd
            | M::Movhps
            | M::Movlps
            | M::Movhpd
            | M::Movlpd
            | M::Movhlps
            | M::Movlhps
            | M::Movntdq
            | M::Movnti
            | M::Movntps
            | M::Movntpd
            | M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad
            | M::Pshuflw
            | M::Pshufhw
            | M::Packsswb
            | M::Packssdw
            | M::Packuswb
            | M::Psadbw
            | M::Pmuludq
            | M::Pmullw
            | M::Pmulhw
            | M::Pmulhuw
            | M::Pmaddwd
            | M::Pavgb
            | M::Pavgw
            | M::Paddsb
            | M::Paddsw
            | M::Paddusb
            | M::Paddusw
            | M::Psubsb
            | M::Psubsw
            | M::Psubusb
            | M::Psubusw
            | M::Pminsw
            | M::Pmaxsw
            | M::Pextrw
            | M::Pinsrw
            | M::Addss
            | M::Addsd
            | M::Addps
            | M::Addpd
            | M::Subss
            | M::Subsd
            | M::Subps
            | M::Subpd
            | M::Mulss
            | M::Mulsd
            | M::Mulps
            | M::Mulpd
            | M::Divss
            | M::Divsd
            | M::Divps
            | M::Divpd
            | M::Sqrtss
            | M::Sqrtsd
            | M::Sqrtps
            | M::Sqrtpd
            | M::Minss
            | M::Minsd
            | M::Minps
            | M::Minpd
            | M::Maxss
            | M::Maxsd
            | M::Maxps
            | M::Maxpd
            | M::Cmpss
            | M::Cmpsd
            | M::Cmpps
            | M::Cmppd
            | M::Ucomiss
            | M::Ucomisd
            | M::Comiss
            | M::Comisd
            | M::Cvtsi2ss
            | M::Cvtsi2sd
            | M::Cvtss2si
            | M::Cvtsd2si
            | M::Cvttss2si
            | M::Cvttsd2si
            | M::Cvtss2sd
            | M::Cvtsd2ss
            | M::Cvtps2pd
            | M::Cvtpd2ps
            | M::Cvtdq2ps
            | M::Cvtps2dq
            | M::Cvttps2dq
            | M::Cvtdq2pd
            | M::Cvtpd2dq
            | M::Cvttpd2dq
            | M::Shufps
            | M::Shufpd
            | M::Unpcklps
            | M::Unpckhps
            | M::Unpcklpd
            | M::Unpckhpd
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
    if sse2_more(m) {
        return more(cpu, i);
    }
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

/// #XM vector.
const XM: u8 = 19;

impl Cpu {
    /// Merge float exception flags into MXCSR; an unmasked one raises #XM
    /// (or #UD without CR4.OSXMMEXCPT) and the destination is not written.
    fn mxcsr_flags(&mut self, flags: u32) -> Flow {
        let unmasked = flags & !(self.state.mxcsr >> 7) & 0x3f;
        self.state.mxcsr |= flags & 0x3f;
        if unmasked != 0 {
            if self.state.cr4 & cr4::OSXMMEXCPT == 0 {
                return Err(ud());
            }
            return Err(exc(XM, None));
        }
        Ok(())
    }
}

fn lane(v: u128, w: u32, k: u32) -> u64 {
    let bits = w * 8;
    if bits == 64 {
        (v >> (64 * k)) as u64
    } else {
        ((v >> (k * bits)) as u64) & ((1u64 << bits) - 1)
    }
}

fn set_lane(v: u128, w: u32, k: u32, x: u64) -> u128 {
    let bits = w * 8;
    let m: u128 = if bits == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << bits) - 1
    };
    (v & !(m << (k * bits))) | ((u128::from(x) & m) << (k * bits))
}

fn sat_s(v: i64, bits: u32) -> u64 {
    let lo = -(1i64 << (bits - 1));
    let hi = (1i64 << (bits - 1)) - 1;
    v.clamp(lo, hi) as u64
}

fn sat_u(v: i64, bits: u32) -> u64 {
    v.clamp(0, (1i64 << bits) - 1) as u64
}

fn sx(v: u64, w: u32) -> i64 {
    crate::cpu::flags::sext(w * 8, v) as i64
}

fn fmt_of(m: Mnemonic) -> (Fmt, bool) {
    let name = format!("{m:?}");
    let packed = name.ends_with("ps") || name.ends_with("pd");
    let f = if name.ends_with('s') && !name.ends_with("ps") || name.ends_with("ps") {
        Fmt::S
    } else {
        Fmt::D
    };
    (f, packed)
}

fn more(cpu: &mut Cpu, i: &Instruction) -> Flow {
    use Mnemonic as M;
    let m = i.mnemonic();
    let ctl = Ctl::from_mxcsr(cpu.state.mxcsr);
    let op0_xmm = i.op0_kind() == OpKind::Register && xmm_index(i.op0_register()).is_some();
    match m {
        M::Movss | M::Movsd => {
            let w = if m == M::Movss { 4 } else { 8 };
            let mask = if w == 4 {
                0xffff_ffffu128
            } else {
                u128::from(u64::MAX)
            };
            let src = cpu.read_x(i, 1)?;
            if op0_xmm && i.op1_kind() == OpKind::Register {
                let d = cpu.read_x(i, 0)?;
                cpu.write_x(i, 0, (d & !mask) | (src & mask))
            } else {
                cpu.write_x(i, 0, src & mask)
            }
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd | M::Movhlps | M::Movlhps => {
            let lo = u128::from(u64::MAX);
            if !op0_xmm {
                let v = cpu.read_x(i, 1)?;
                let v = if matches!(m, M::Movhps | M::Movhpd) {
                    v >> 64
                } else {
                    v & lo
                };
                return cpu.write_x(i, 0, v);
            }
            let d = cpu.read_x(i, 0)?;
            let s = cpu.read_x(i, 1)?;
            let r = match m {
                M::Movlps | M::Movlpd => (d & !lo) | (s & lo),
                M::Movhps | M::Movhpd | M::Movlhps => (d & lo) | (s << 64),
                _ => (d & !lo) | (s >> 64),
            };
            cpu.write_x(i, 0, r)
        }
        M::Movntdq | M::Movntps | M::Movntpd => {
            let v = cpu.read_x(i, 1)?;
            cpu.write_x(i, 0, v)
        }
        M::Movnti => {
            let v = cpu.read_op(i, 1)?;
            cpu.write_op(i, 0, v)
        }
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad => {
            let a = cpu.read_x(i, 0)?;
            let count = if i.op1_kind() == OpKind::Immediate8 {
                u64::from(i.immediate8())
            } else {
                cpu.read_x(i, 1)? as u64
            };
            let w = match m {
                M::Psllw | M::Psrlw | M::Psraw => 2,
                M::Pslld | M::Psrld | M::Psrad => 4,
                _ => 8,
            };
            let bits = u64::from(w * 8);
            let r = lanes(a, 0, w, |x, _| match m {
                M::Psllw | M::Pslld | M::Psllq => {
                    if count >= bits {
                        0
                    } else {
                        x << count
                    }
                }
                M::Psrlw | M::Psrld | M::Psrlq => {
                    if count >= bits {
                        0
                    } else {
                        x >> count
                    }
                }
                _ => (sx(x, w) >> count.min(bits - 1)) as u64,
            });
            cpu.write_x(i, 0, r)
        }
        M::Pshuflw | M::Pshufhw => {
            let src = cpu.read_x(i, 1)?;
            let imm = i.immediate8();
            let base = if m == M::Pshufhw { 4 } else { 0 };
            let mut r = src;
            for k in 0..4 {
                let sel = u32::from((imm >> (2 * k)) & 3);
                r = set_lane(r, 2, base + k, lane(src, 2, base + sel));
            }
            cpu.write_x(i, 0, r)
        }
        M::Pextrw => {
            if i.op0_kind() != OpKind::Register {
                // The memory form is SSE4.1.
                return cpu.unimplemented(i);
            }
            let src = cpu.read_x(i, 1)?;
            let v = lane(src, 2, u32::from(i.immediate8() & 7));
            cpu.set_reg(i.op0_register(), v);
            if let Some((_, 64, _)) = gpr_info(i.op0_register()) {
                cpu.set_reg(i.op0_register(), v);
            }
            Ok(())
        }
        M::Pinsrw => {
            let d = cpu.read_x(i, 0)?;
            let v = if i.op1_kind() == OpKind::Memory {
                let la = cpu.ea(i);
                cpu.read_mem(la, 2)?
            } else {
                cpu.reg(i.op1_register())
            };
            cpu.write_x(i, 0, set_lane(d, 2, u32::from(i.immediate8() & 7), v))
        }
        M::Shufps | M::Shufpd | M::Unpcklps | M::Unpckhps | M::Unpcklpd | M::Unpckhpd => {
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let r = match m {
                M::Shufps => {
                    let imm = i.immediate8();
                    let sel = |k: u8| u32::from((imm >> (2 * k)) & 3);
                    let mut r = 0u128;
                    r = set_lane(r, 4, 0, lane(a, 4, sel(0)));
                    r = set_lane(r, 4, 1, lane(a, 4, sel(1)));
                    r = set_lane(r, 4, 2, lane(b, 4, sel(2)));
                    set_lane(r, 4, 3, lane(b, 4, sel(3)))
                }
                M::Shufpd => {
                    let imm = u32::from(i.immediate8());
                    let r = set_lane(0, 8, 0, lane(a, 8, imm & 1));
                    set_lane(r, 8, 1, lane(b, 8, (imm >> 1) & 1))
                }
                M::Unpcklps => unpack(a, b, 4, false),
                M::Unpckhps => unpack(a, b, 4, true),
                M::Unpcklpd => unpack(a, b, 8, false),
                _ => unpack(a, b, 8, true),
            };
            cpu.write_x(i, 0, r)
        }
        M::Packsswb | M::Packssdw | M::Packuswb => {
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let (w, out) = if m == M::Packssdw { (4, 2) } else { (2, 1) };
            let n = 16 / w;
            let mut r = 0u128;
            for k in 0..2 * n {
                let v = if k < n {
                    lane(a, w, k)
                } else {
                    lane(b, w, k - n)
                };
                let v = sx(v, w);
                let o = if m == M::Packuswb {
                    sat_u(v, 8)
                } else {
                    sat_s(v, out * 8)
                };
                r = set_lane(r, out, k, o);
            }
            cpu.write_x(i, 0, r)
        }
        M::Addss
        | M::Addsd
        | M::Addps
        | M::Addpd
        | M::Subss
        | M::Subsd
        | M::Subps
        | M::Subpd
        | M::Mulss
        | M::Mulsd
        | M::Mulps
        | M::Mulpd
        | M::Divss
        | M::Divsd
        | M::Divps
        | M::Divpd
        | M::Minss
        | M::Minsd
        | M::Minps
        | M::Minpd
        | M::Maxss
        | M::Maxsd
        | M::Maxps
        | M::Maxpd
        | M::Sqrtss
        | M::Sqrtsd
        | M::Sqrtps
        | M::Sqrtpd
        | M::Cmpss
        | M::Cmpsd
        | M::Cmpps
        | M::Cmppd => {
            let (f, packed) = fmt_of(m);
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let w = f.bytes();
            let n = if packed { 16 / w } else { 1 };
            let mut r = a;
            let mut flags = 0;
            for k in 0..n {
                let (x, y) = (lane(a, w, k), lane(b, w, k));
                let name = format!("{m:?}");
                let (v, fl) = match &name[..3] {
                    "Add" => float::arith(f, Op::Add, x, y, ctl),
                    "Sub" => float::arith(f, Op::Sub, x, y, ctl),
                    "Mul" => float::arith(f, Op::Mul, x, y, ctl),
                    "Div" => float::arith(f, Op::Div, x, y, ctl),
                    "Min" => float::minmax(f, false, x, y, ctl),
                    "Max" => float::minmax(f, true, x, y, ctl),
                    "Sqr" => float::sqrt(f, y, ctl),
                    _ => {
                        let (t, fl) = float::cmp(f, i.immediate8(), x, y, ctl);
                        (if t { u64::MAX } else { 0 }, fl)
                    }
                };
                flags |= fl;
                r = set_lane(r, w, k, v);
            }
            cpu.mxcsr_flags(flags)?;
            cpu.write_x(i, 0, r)
        }
        M::Ucomiss | M::Ucomisd | M::Comiss | M::Comisd => {
            let f = if matches!(m, M::Ucomiss | M::Comiss) {
                Fmt::S
            } else {
                Fmt::D
            };
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let w = f.bytes();
            let signalling = matches!(m, M::Comiss | M::Comisd);
            let ((z, p, c), fl) = float::comi(f, signalling, lane(a, w, 0), lane(b, w, 0), ctl);
            cpu.mxcsr_flags(fl)?;
            use crate::cpu::state::rflags::{AF, CF, OF, PF, SF, ZF};
            let v = (if z { ZF } else { 0 }) | (if p { PF } else { 0 }) | (if c { CF } else { 0 });
            cpu.state.set_arith(ZF | PF | CF | OF | AF | SF, v);
            Ok(())
        }
        M::Cvtsi2ss | M::Cvtsi2sd => {
            let f = if m == M::Cvtsi2ss { Fmt::S } else { Fmt::D };
            let bits = cpu.op_bits(i, 1);
            let v = cpu.read_op(i, 1)?;
            let v = if bits == 32 {
                i64::from(v as u32 as i32)
            } else {
                v as i64
            };
            let (r, fl) = float::from_int(f, v, ctl);
            cpu.mxcsr_flags(fl)?;
            let a = cpu.read_x(i, 0)?;
            cpu.write_x(i, 0, set_lane(a, f.bytes(), 0, r))
        }
        M::Cvtss2si | M::Cvtsd2si | M::Cvttss2si | M::Cvttsd2si => {
            let f = if matches!(m, M::Cvtss2si | M::Cvttss2si) {
                Fmt::S
            } else {
                Fmt::D
            };
            let truncate = matches!(m, M::Cvttss2si | M::Cvttsd2si);
            let a = cpu.read_x(i, 1)?;
            let bits = cpu.op_bits(i, 0);
            let (r, fl) = float::to_int(f, lane(a, f.bytes(), 0), bits, truncate, ctl);
            cpu.mxcsr_flags(fl)?;
            cpu.set_reg(i.op0_register(), r as u64);
            Ok(())
        }
        M::Cvtss2sd | M::Cvtsd2ss => {
            let (from, to) = if m == M::Cvtss2sd {
                (Fmt::S, Fmt::D)
            } else {
                (Fmt::D, Fmt::S)
            };
            let b = cpu.read_x(i, 1)?;
            let (r, fl) = float::convert(from, to, lane(b, from.bytes(), 0), ctl);
            cpu.mxcsr_flags(fl)?;
            let a = cpu.read_x(i, 0)?;
            cpu.write_x(i, 0, set_lane(a, to.bytes(), 0, r))
        }
        M::Cvtps2pd
        | M::Cvtpd2ps
        | M::Cvtdq2ps
        | M::Cvtps2dq
        | M::Cvttps2dq
        | M::Cvtdq2pd
        | M::Cvtpd2dq
        | M::Cvttpd2dq => {
            let b = cpu.read_x(i, 1)?;
            let mut r = 0u128;
            let mut flags = 0;
            match m {
                M::Cvtps2pd => {
                    for k in 0..2 {
                        let (v, fl) = float::convert(Fmt::S, Fmt::D, lane(b, 4, k), ctl);
                        flags |= fl;
                        r = set_lane(r, 8, k, v);
                    }
                }
                M::Cvtpd2ps => {
                    for k in 0..2 {
                        let (v, fl) = float::convert(Fmt::D, Fmt::S, lane(b, 8, k), ctl);
                        flags |= fl;
                        r = set_lane(r, 4, k, v);
                    }
                }
                M::Cvtdq2ps => {
                    for k in 0..4 {
                        let v = i64::from(lane(b, 4, k) as u32 as i32);
                        let (v, fl) = float::from_int(Fmt::S, v, ctl);
                        flags |= fl;
                        r = set_lane(r, 4, k, v);
                    }
                }
                M::Cvtdq2pd => {
                    for k in 0..2 {
                        let v = i64::from(lane(b, 4, k) as u32 as i32);
                        let (v, fl) = float::from_int(Fmt::D, v, ctl);
                        flags |= fl;
                        r = set_lane(r, 8, k, v);
                    }
                }
                M::Cvtps2dq | M::Cvttps2dq => {
                    for k in 0..4 {
                        let (v, fl) =
                            float::to_int(Fmt::S, lane(b, 4, k), 32, m == M::Cvttps2dq, ctl);
                        flags |= fl;
                        r = set_lane(r, 4, k, v as u64);
                    }
                }
                _ => {
                    for k in 0..2 {
                        let (v, fl) =
                            float::to_int(Fmt::D, lane(b, 8, k), 32, m == M::Cvttpd2dq, ctl);
                        flags |= fl;
                        r = set_lane(r, 4, k, v as u64);
                    }
                }
            }
            cpu.mxcsr_flags(flags)?;
            cpu.write_x(i, 0, r)
        }
        _ => {
            let b = cpu.read_x(i, 1)?;
            let a = cpu.read_x(i, 0)?;
            let r = match m {
                M::Psadbw => {
                    let mut r = 0u128;
                    for h in 0..2 {
                        let s: u64 = (0..8)
                            .map(|k| lane(a, 1, 8 * h + k).abs_diff(lane(b, 1, 8 * h + k)))
                            .sum();
                        r = set_lane(r, 8, h, s);
                    }
                    r
                }
                M::Pmuludq => {
                    let mut r = 0u128;
                    for h in 0..2 {
                        r = set_lane(r, 8, h, lane(a, 4, 2 * h) * lane(b, 4, 2 * h));
                    }
                    r
                }
                M::Pmaddwd => {
                    let mut r = 0u128;
                    for k in 0..4 {
                        let p0 = sx(lane(a, 2, 2 * k), 2) * sx(lane(b, 2, 2 * k), 2);
                        let p1 = sx(lane(a, 2, 2 * k + 1), 2) * sx(lane(b, 2, 2 * k + 1), 2);
                        r = set_lane(r, 4, k, (p0 + p1) as u64);
                    }
                    r
                }
                M::Pmullw => lanes(a, b, 2, |x, y| (sx(x, 2) * sx(y, 2)) as u64),
                M::Pmulhw => lanes(a, b, 2, |x, y| ((sx(x, 2) * sx(y, 2)) >> 16) as u64),
                M::Pmulhuw => lanes(a, b, 2, |x, y| (x * y) >> 16),
                M::Pavgb => lanes(a, b, 1, |x, y| (x + y + 1) >> 1),
                M::Pavgw => lanes(a, b, 2, |x, y| (x + y + 1) >> 1),
                M::Paddsb => lanes(a, b, 1, |x, y| sat_s(sx(x, 1) + sx(y, 1), 8)),
                M::Paddsw => lanes(a, b, 2, |x, y| sat_s(sx(x, 2) + sx(y, 2), 16)),
                M::Paddusb => lanes(a, b, 1, |x, y| sat_u((x + y) as i64, 8)),
                M::Paddusw => lanes(a, b, 2, |x, y| sat_u((x + y) as i64, 16)),
                M::Psubsb => lanes(a, b, 1, |x, y| sat_s(sx(x, 1) - sx(y, 1), 8)),
                M::Psubsw => lanes(a, b, 2, |x, y| sat_s(sx(x, 2) - sx(y, 2), 16)),
                M::Psubusb => lanes(a, b, 1, |x, y| sat_u(x as i64 - y as i64, 8)),
                M::Psubusw => lanes(a, b, 2, |x, y| sat_u(x as i64 - y as i64, 16)),
                M::Pminsw => lanes(a, b, 2, |x, y| if sx(x, 2) < sx(y, 2) { x } else { y }),
                M::Pmaxsw => lanes(a, b, 2, |x, y| if sx(x, 2) > sx(y, 2) { x } else { y }),
                _ => return cpu.unimplemented(i),
            };
            cpu.write_x(i, 0, r)
        }
    }
}
