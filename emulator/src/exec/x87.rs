//! The x87 FPU: register stack with TOP and tags, control/status words,
//! environment and state save/restore (FNSTENV/FLDENV, FNSAVE/FRSTOR),
//! loads and stores of every memory format, integer conversions,
//! arithmetic, comparisons and FXSAVE/FXRSTOR, LDMXCSR/STMXCSR and EMMS.
//!
//! Values are kept as 80-bit [`F80`]s; moves, loads, stores, integer
//! conversions, FABS/FCHS/FXCH and comparisons are exact, and so are
//! FADD/FSUB/FMUL/FDIV (integer arithmetic on the significands, one
//! rounding to FCW.PC and FCW.RC; denormal results are truncated rather
//! than re-rounded). FSQRT is computed in double precision (exact for
//! PC = 53 bits and values in the double range). Unmasked exceptions set FSW.ES and
//! raise #MF (CR0.NE) at the next waiting x87 instruction, but the
//! destination still receives the masked response. FIP/FDP/FOP are not
//! tracked (saved as zero). C1 is only set on stack overflow.

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};

use super::float::{self, Ctl, Fmt, Op, DE, F80, IE, PE, ZE};
use crate::cpu::state::{cr0, cr4};
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{exc, gp0, ud, NM};
use crate::mmu::Privilege;

/// #MF
const MF: u8 = 16;

const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const SF: u16 = 1 << 6;
const ES: u16 = 1 << 7;
const B: u16 = 1 << 15;

/// MXCSR bits this CPU implements (MXCSR_MASK): flags, DAZ, masks, RC, FTZ.
pub const MXCSR_MASK: u32 = 0xffff;

pub(crate) fn handles(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Fninit
            | M::Finit
            | M::Fnstcw
            | M::Fstcw
            | M::Fldcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnclex
            | M::Fclex
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Wait
            | M::Fld
            | M::Fst
            | M::Fstp
            | M::Fild
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fld1
            | M::Fldz
            | M::Fldpi
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Ficom
            | M::Ficomp
            | M::Ftst
            | M::Fxam
            | M::Fxch
            | M::Fabs
            | M::Fchs
            | M::Ffree
            | M::Ffreep
            | M::Fsqrt
            | M::Frndint
            | M::Fincstp
            | M::Fdecstp
            | M::Fnop
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Ldmxcsr
            | M::Stmxcsr
            | M::Emms
    )
}

fn st_index(r: Register) -> Option<usize> {
    let v = r as u32;
    (v >= Register::ST0 as u32 && v <= Register::ST7 as u32)
        .then(|| (v - Register::ST0 as u32) as usize)
}

impl Cpu {
    fn top(&self) -> usize {
        usize::from((self.state.fsw >> 11) & 7)
    }
    fn set_top(&mut self, t: usize) {
        self.state.fsw = (self.state.fsw & !(7 << 11)) | (((t & 7) as u16) << 11);
    }
    fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }
    fn st_empty(&self, i: usize) -> bool {
        self.state.ftw & (1 << self.phys(i)) == 0
    }
    fn st_raw(&self, i: usize) -> F80 {
        F80::from_bits(self.state.fpr[self.phys(i)])
    }
    fn set_st(&mut self, i: usize, v: F80) {
        let p = self.phys(i);
        self.state.fpr[p] = v.bits();
        self.state.ftw |= 1 << p;
    }

    /// Record exception flags in FSW (ES/B when one is unmasked).
    fn fpu_flags(&mut self, flags: u32) {
        let f = (flags & 0x3f) as u16;
        self.state.fsw |= f;
        if f & !self.state.fcw & 0x3f != 0 {
            self.state.fsw |= ES | B;
        }
    }

    /// Read ST(i); an empty register is a stack underflow (IE, SF, C1=0)
    /// and reads as the indefinite.
    fn st(&mut self, i: usize) -> F80 {
        if self.st_empty(i) {
            self.state.fsw &= !C1;
            self.state.fsw |= SF;
            self.fpu_flags(IE);
            return F80::INDEFINITE;
        }
        self.st_raw(i)
    }

    fn fpush(&mut self, v: F80) {
        let t = (self.top() + 7) & 7;
        self.set_top(t);
        if self.state.ftw & (1 << t) != 0 {
            // Stack overflow.
            self.state.fsw |= SF | C1;
            self.fpu_flags(IE);
            self.set_st(0, F80::INDEFINITE);
            return;
        }
        self.set_st(0, v);
    }

    fn fpop(&mut self) {
        let p = self.phys(0);
        self.state.ftw &= !(1 << p);
        self.set_top(self.top() + 1);
    }

    fn fninit(&mut self) {
        self.state.fcw = 0x37f;
        self.state.fsw = 0;
        self.state.ftw = 0;
    }

    fn fpu_ctl(&self) -> Ctl {
        Ctl {
            rc: ((self.state.fcw >> 10) & 3) as u8,
            daz: false,
            ftz: false,
            um: true,
        }
    }

    /// The full 16-bit tag word (FNSTENV format), from the registers.
    pub(crate) fn full_tag_word(&self) -> u16 {
        (0..8).fold(0u16, |acc, p| {
            let tag = if self.state.ftw & (1 << p) == 0 {
                3
            } else {
                let v = F80::from_bits(self.state.fpr[p]);
                if v.exp() == 0x7fff
                    || (v.exp() == 0 && v.m != 0)
                    || (v.exp() != 0 && v.m >> 63 == 0)
                {
                    2
                } else if v.exp() == 0 && v.m == 0 {
                    1
                } else {
                    0
                }
            };
            acc | (tag << (2 * p))
        })
    }

    fn read_f80(&mut self, la: u64) -> Flow<F80> {
        let mut b = [0u8; 10];
        self.read_lin(la, &mut b, Privilege::Current)?;
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[..8]);
        Ok(F80 {
            m: u64::from_le_bytes(m),
            se: u16::from_le_bytes([b[8], b[9]]),
        })
    }

    fn write_f80(&mut self, la: u64, v: F80) -> Flow {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&v.m.to_le_bytes());
        b[8..].copy_from_slice(&v.se.to_le_bytes());
        self.write_lin(la, &b, Privilege::Current)
    }

    /// Read a memory operand as an F80 (float or integer formats).
    fn read_fp_mem(&mut self, i: &Instruction) -> Flow<F80> {
        let la = self.ea(i);
        Ok(match i.memory_size() {
            MemorySize::Float32 => {
                let v = f32::from_bits(self.read_mem(la, 4)? as u32);
                if v.is_nan() && v.to_bits() & (1 << 22) == 0 {
                    self.fpu_flags(IE);
                    F80::from_f32(v).quiet()
                } else {
                    if v.is_subnormal() {
                        self.fpu_flags(DE);
                    }
                    F80::from_f32(v)
                }
            }
            MemorySize::Float64 => {
                let v = f64::from_bits(self.read_mem(la, 8)?);
                if v.is_nan() && v.to_bits() & (1 << 51) == 0 {
                    self.fpu_flags(IE);
                    F80::from_f64(v).quiet()
                } else {
                    if v.is_subnormal() {
                        self.fpu_flags(DE);
                    }
                    F80::from_f64(v)
                }
            }
            MemorySize::Float80 => self.read_f80(la)?,
            MemorySize::Int16 => F80::from_i64(i64::from(self.read_mem(la, 2)? as i16)),
            MemorySize::Int32 => F80::from_i64(i64::from(self.read_mem(la, 4)? as i32)),
            MemorySize::Int64 => F80::from_i64(self.read_mem(la, 8)? as i64),
            _ => return Err(ud()),
        })
    }

    /// The source operand of a two-operand arithmetic/compare form:
    /// memory, or the ST register that is not the destination.
    fn fp_operands(&mut self, i: &Instruction) -> Flow<(usize, F80, F80)> {
        // (destination ST index, destination value, source value)
        if i.op_count() == 1 && i.op0_kind() == OpKind::Memory {
            // A stack underflow hides the memory operand's exceptions.
            let empty = self.st_empty(0);
            let fsw = self.state.fsw;
            let src = self.read_fp_mem(i)?;
            if empty {
                self.state.fsw = fsw;
            }
            return Ok((0, self.st(0), src));
        }
        if i.op_count() == 0 {
            // FCOMPP / FUCOMPP / FCOM with no operand: ST(0) vs ST(1).
            return Ok((0, self.st(0), self.st(1)));
        }
        if i.op_count() == 1 {
            let s = st_index(i.op0_register()).ok_or_else(ud)?;
            return Ok((0, self.st(0), self.st(s)));
        }
        let d = st_index(i.op0_register()).ok_or_else(ud)?;
        let s = st_index(i.op1_register()).ok_or_else(ud)?;
        Ok((d, self.st(d), self.st(s)))
    }

    /// x87 arithmetic on two values (see the module docs on precision).
    fn fp_arith(&mut self, op: Op, a: F80, b: F80) -> F80 {
        if a.is_nan() || b.is_nan() {
            if a.is_snan() || b.is_snan() {
                self.fpu_flags(IE);
            }
            let r = match (a.is_nan(), b.is_nan()) {
                (true, true) => {
                    if (a.m << 1) >= (b.m << 1) {
                        a
                    } else {
                        b
                    }
                }
                (true, false) => a,
                _ => b,
            };
            return r.quiet();
        }
        if a.is_denormal() || b.is_denormal() {
            self.fpu_flags(DE);
        }
        let (ai, bi) = (a.is_inf(), b.is_inf());
        let invalid = match op {
            Op::Add => ai && bi && a.sign() != b.sign(),
            Op::Sub => ai && bi && a.sign() == b.sign(),
            Op::Mul => (ai && b.is_zero()) || (a.is_zero() && bi),
            Op::Div => (a.is_zero() && b.is_zero()) || (ai && bi),
        };
        if invalid {
            self.fpu_flags(IE);
            return F80::INDEFINITE;
        }
        if ai || bi {
            let sign = match op {
                Op::Add => {
                    if ai {
                        a.sign()
                    } else {
                        b.sign()
                    }
                }
                Op::Sub => {
                    if ai {
                        a.sign()
                    } else {
                        !b.sign()
                    }
                }
                _ => a.sign() != b.sign(),
            };
            let zero = op == Op::Div && bi;
            let s = u16::from(sign) << 15;
            return if zero {
                F80 { se: s, m: 0 }
            } else {
                F80 {
                    se: s | 0x7fff,
                    m: 1 << 63,
                }
            };
        }
        let pbits = match (self.state.fcw >> 8) & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        };
        let (r, flags) = float::f80_arith(op, a, b, pbits, self.fpu_ctl().rc);
        self.fpu_flags(flags);
        r
    }

    /// Set C3/C2/C0 from a comparison (unordered: all three).
    fn fp_compare(&mut self, a: F80, b: F80, unordered_ok: bool) -> Option<std::cmp::Ordering> {
        let r = a.compare(b);
        if a.is_snan() || b.is_snan() || (r.is_none() && !unordered_ok) {
            self.fpu_flags(IE);
        } else if a.is_denormal() || b.is_denormal() {
            self.fpu_flags(DE);
        }
        r
    }

    fn fenv_len(i: &Instruction) -> usize {
        if matches!(
            i.memory_size(),
            MemorySize::FpuEnv14 | MemorySize::FpuState94
        ) {
            14
        } else {
            28
        }
    }

    fn store_env(&mut self, la: u64, len: usize) -> Flow {
        let tag = self.full_tag_word();
        let mut b = [0u8; 28];
        if len == 14 {
            b[0..2].copy_from_slice(&self.state.fcw.to_le_bytes());
            b[2..4].copy_from_slice(&self.state.fsw.to_le_bytes());
            b[4..6].copy_from_slice(&tag.to_le_bytes());
        } else {
            b[0..4].copy_from_slice(&(u32::from(self.state.fcw) | 0xffff_0000).to_le_bytes());
            b[4..8].copy_from_slice(&(u32::from(self.state.fsw) | 0xffff_0000).to_le_bytes());
            b[8..12].copy_from_slice(&(u32::from(tag) | 0xffff_0000).to_le_bytes());
            // FDS upper half.
            b[24..28].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        }
        self.write_lin(la, &b[..len.min(16)], Privilege::Current)?;
        if len > 16 {
            self.write_lin(la + 16, &b[16..len], Privilege::Current)?;
        }
        Ok(())
    }

    fn load_env(&mut self, la: u64, len: usize) -> Flow<(u16, u16, u16)> {
        let mut b = [0u8; 28];
        self.read_lin(la, &mut b[..len.min(16)], Privilege::Current)?;
        if len > 16 {
            self.read_lin(la + 16, &mut b[16..len], Privilege::Current)?;
        }
        let w = |k: usize| u16::from_le_bytes([b[k], b[k + 1]]);
        Ok(if len == 14 {
            (w(0), w(2), w(4))
        } else {
            (w(0), w(4), w(8))
        })
    }

    fn set_env(&mut self, fcw: u16, fsw: u16, tag: u16) {
        self.state.fcw = fcw | 0x40;
        self.state.fsw = fsw;
        self.state.ftw = (0..8).fold(0u8, |acc, p| {
            acc | (u8::from((tag >> (2 * p)) & 3 != 3) << p)
        });
        self.update_es();
    }

    /// ES/B follow the unmasked exceptions after FLDCW/FLDENV/FRSTOR.
    fn update_es(&mut self) {
        if self.state.fsw & !self.state.fcw & 0x3f != 0 {
            self.state.fsw |= ES | B;
        } else {
            self.state.fsw &= !(ES | B);
        }
    }

    /// The FXSAVE image (512 bytes; `rex_w` selects the 64-bit layout).
    pub fn fxsave_image(&self, rex_w: bool) -> [u8; 512] {
        let s = &self.state;
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&s.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&s.fsw.to_le_bytes());
        b[4] = s.ftw;
        let _ = rex_w; // FIP/FDP/FOP are not tracked: zero in both layouts.
        b[24..28].copy_from_slice(&s.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
        for k in 0..8 {
            let v = s.fpr[(self.top() + k) & 7] & ((1u128 << 80) - 1);
            b[32 + 16 * k..48 + 16 * k].copy_from_slice(&v.to_le_bytes());
        }
        let nxmm = if s.long_mode_64() { 16 } else { 8 };
        for k in 0..nxmm {
            b[160 + 16 * k..176 + 16 * k].copy_from_slice(&s.xmm[k].to_le_bytes());
        }
        b
    }

    /// Load an FXSAVE image (64-bit layout in 64-bit mode); false if its
    /// MXCSR has reserved bits set.
    pub fn load_fxsave_image(&mut self, b: &[u8; 512]) -> bool {
        self.fxrstor_image(b).is_ok()
    }

    /// Load an FXSAVE image; #GP if MXCSR has reserved bits set.
    pub(crate) fn fxrstor_image(&mut self, b: &[u8; 512]) -> Flow {
        let mx = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if mx & !MXCSR_MASK != 0 {
            return Err(gp0());
        }
        let s = &mut self.state;
        s.fcw = u16::from_le_bytes([b[0], b[1]]);
        s.fsw = u16::from_le_bytes([b[2], b[3]]);
        s.ftw = b[4];
        s.mxcsr = mx;
        let top = usize::from((s.fsw >> 11) & 7);
        for k in 0..8 {
            let mut r = [0u8; 16];
            r[..10].copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
            s.fpr[(top + k) & 7] = u128::from_le_bytes(r);
        }
        let nxmm = if s.long_mode_64() { 16 } else { 8 };
        for k in 0..nxmm {
            let mut r = [0u8; 16];
            r.copy_from_slice(&b[160 + 16 * k..176 + 16 * k]);
            s.xmm[k] = u128::from_le_bytes(r);
        }
        self.update_es();
        Ok(())
    }
}

/// Waiting x87 instructions first check for a pending unmasked exception.
fn is_waiting(m: Mnemonic) -> bool {
    use Mnemonic as M;
    !matches!(
        m,
        M::Fninit
            | M::Fnstcw
            | M::Fnstsw
            | M::Fnclex
            | M::Fnstenv
            | M::Fnsave
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Ldmxcsr
            | M::Stmxcsr
            | M::Emms
    )
}

pub(crate) fn x87(cpu: &mut Cpu, i: &Instruction) -> Flow {
    use Mnemonic as M;
    let m = i.mnemonic();
    let c0 = cpu.state.cr0;
    match m {
        M::Wait => {
            if c0 & (cr0::TS | cr0::MP) == cr0::TS | cr0::MP {
                return Err(exc(NM, None));
            }
        }
        M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 | M::Ldmxcsr | M::Stmxcsr => {
            if c0 & cr0::EM != 0 {
                return Err(ud());
            }
            if matches!(m, M::Ldmxcsr | M::Stmxcsr) && cpu.state.cr4 & cr4::OSFXSR == 0 {
                return Err(ud());
            }
            if c0 & cr0::TS != 0 {
                return Err(exc(NM, None));
            }
        }
        _ => {
            if c0 & (cr0::EM | cr0::TS) != 0 {
                return Err(exc(NM, None));
            }
        }
    }
    // Without CR0.NE the error would go to FERR#/IRQ13: ignored.
    if is_waiting(m) && cpu.state.fsw & ES != 0 && c0 & cr0::NE != 0 {
        return Err(exc(MF, None));
    }
    match m {
        M::Wait | M::Fnop => {}
        M::Fninit | M::Finit => cpu.fninit(),
        M::Fnclex | M::Fclex => cpu.state.fsw &= !(0xff | B),
        M::Fnstcw | M::Fstcw => cpu.write_op(i, 0, u64::from(cpu.state.fcw))?,
        M::Fldcw => {
            let v = cpu.read_op(i, 0)? as u16;
            cpu.state.fcw = v | 0x40;
            cpu.update_es();
        }
        M::Fnstsw | M::Fstsw => cpu.write_op(i, 0, u64::from(cpu.state.fsw))?,
        M::Fnstenv | M::Fstenv => {
            let la = cpu.ea(i);
            cpu.store_env(la, Cpu::fenv_len(i))?;
            cpu.state.fcw |= 0x3f;
        }
        M::Fldenv => {
            let la = cpu.ea(i);
            let (cw, sw, tag) = cpu.load_env(la, Cpu::fenv_len(i))?;
            cpu.set_env(cw, sw, tag);
        }
        M::Fnsave | M::Fsave => {
            let la = cpu.ea(i);
            let len = Cpu::fenv_len(i);
            cpu.probe_write(la, len + 80)?;
            cpu.store_env(la, len)?;
            for k in 0..8 {
                let v = cpu.st_raw(k);
                cpu.write_f80(la + (len + 10 * k) as u64, v)?;
            }
            cpu.fninit();
        }
        M::Frstor => {
            let la = cpu.ea(i);
            let len = Cpu::fenv_len(i);
            let (cw, sw, tag) = cpu.load_env(la, len)?;
            let mut regs = [F80::ZERO; 8];
            for (k, r) in regs.iter_mut().enumerate() {
                *r = cpu.read_f80(la + (len + 10 * k) as u64)?;
            }
            cpu.set_env(cw, sw, tag);
            let ftw = cpu.state.ftw;
            for (k, r) in regs.iter().enumerate() {
                let p = cpu.phys(k);
                cpu.state.fpr[p] = r.bits();
            }
            cpu.state.ftw = ftw;
        }
        M::Fxsave | M::Fxsave64 => {
            let la = cpu.ea(i);
            if la & 15 != 0 {
                return Err(gp0());
            }
            cpu.probe_write(la, 512)?;
            let img = cpu.fxsave_image(m == M::Fxsave64);
            // Bytes 464-511 are available to software: not written.
            for k in 0..29 {
                cpu.write_lin(
                    la + 16 * k as u64,
                    &img[16 * k..16 * k + 16],
                    Privilege::Current,
                )?;
            }
        }
        M::Fxrstor | M::Fxrstor64 => {
            let la = cpu.ea(i);
            if la & 15 != 0 {
                return Err(gp0());
            }
            let mut img = [0u8; 512];
            for k in 0..32 {
                cpu.read_lin(
                    la + 16 * k as u64,
                    &mut img[16 * k..16 * k + 16],
                    Privilege::Current,
                )?;
            }
            cpu.fxrstor_image(&img)?;
        }
        M::Ldmxcsr => {
            let v = cpu.read_op(i, 0)? as u32;
            if v & !MXCSR_MASK != 0 {
                return Err(gp0());
            }
            cpu.state.mxcsr = v;
        }
        M::Stmxcsr => cpu.write_op(i, 0, u64::from(cpu.state.mxcsr))?,
        M::Emms => {
            cpu.state.ftw = 0;
            cpu.set_top(0);
        }
        M::Fld => {
            let v = if i.op0_kind() == OpKind::Memory {
                // On a stack overflow the operand's own exceptions are not
                // reported.
                let full = cpu.state.ftw & (1 << ((cpu.top() + 7) & 7)) != 0;
                let fsw = cpu.state.fsw;
                let v = cpu.read_fp_mem(i)?;
                if full {
                    cpu.state.fsw = fsw;
                }
                v
            } else {
                let s = st_index(i.op0_register()).ok_or_else(ud)?;
                cpu.st(s)
            };
            cpu.state.fsw &= !C1;
            cpu.fpush(v);
        }
        M::Fild => {
            let v = cpu.read_fp_mem(i)?;
            cpu.state.fsw &= !C1;
            cpu.fpush(v);
        }
        M::Fld1 | M::Fldz | M::Fldpi | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 => {
            let v = match m {
                M::Fld1 => F80::ONE,
                M::Fldz => F80::ZERO,
                M::Fldpi => F80 {
                    se: 0x4000,
                    m: 0xc90f_daa2_2168_c235,
                },
                M::Fldl2e => F80 {
                    se: 0x3fff,
                    m: 0xb8aa_3b29_5c17_f0bc,
                },
                M::Fldl2t => F80 {
                    se: 0x4000,
                    m: 0xd49a_784b_cd1b_8afe,
                },
                M::Fldlg2 => F80 {
                    se: 0x3ffd,
                    m: 0x9a20_9a84_fbcf_f799,
                },
                _ => F80 {
                    se: 0x3ffe,
                    m: 0xb172_17f7_d1cf_79ac,
                },
            };
            cpu.state.fsw &= !C1;
            cpu.fpush(v);
        }
        M::Fst | M::Fstp => {
            let v = cpu.st(0);
            cpu.state.fsw &= !C1;
            if i.op0_kind() == OpKind::Memory {
                let la = cpu.ea(i);
                let rc = cpu.fpu_ctl().rc;
                match i.memory_size() {
                    MemorySize::Float32 => {
                        let (b, f) = v.to_binary(23, 127, rc);
                        let f = if v.is_denormal() { f | DE } else { f };
                        cpu.write_mem(la, 4, b)?;
                        cpu.fpu_flags(f);
                    }
                    MemorySize::Float64 => {
                        let (b, f) = v.to_binary(52, 1023, rc);
                        let f = if v.is_denormal() { f | DE } else { f };
                        cpu.write_mem(la, 8, b)?;
                        cpu.fpu_flags(f);
                    }
                    MemorySize::Float80 => cpu.write_f80(la, v)?,
                    _ => return Err(ud()),
                }
            } else {
                let d = st_index(i.op0_register()).ok_or_else(ud)?;
                cpu.set_st(d, v);
            }
            if m == M::Fstp {
                cpu.fpop();
            }
        }
        M::Fist | M::Fistp | M::Fisttp => {
            let v = cpu.st(0);
            cpu.state.fsw &= !C1;
            let bits = (i.memory_size().size() * 8) as u32;
            if !matches!(bits, 16 | 32 | 64) {
                return Err(ud());
            }
            let rc = if m == M::Fisttp { 3 } else { cpu.fpu_ctl().rc };
            let (r, f) = v.to_int(bits, rc);
            let la = cpu.ea(i);
            cpu.write_mem(la, bits as usize / 8, r as u64)?;
            cpu.fpu_flags(f);
            if m != M::Fist {
                cpu.fpop();
            }
        }
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => {
            let empty = cpu.st_empty(0)
                || (i.op_count() == 2 && {
                    let r = if st_index(i.op0_register()) == Some(0) {
                        i.op1_register()
                    } else {
                        i.op0_register()
                    };
                    st_index(r).is_some_and(|k| cpu.st_empty(k))
                });
            let fsw_before = cpu.state.fsw;
            let (d, a, b) = cpu.fp_operands(i)?;
            let (op, rev) = match m {
                M::Fadd | M::Faddp | M::Fiadd => (Op::Add, false),
                M::Fsub | M::Fsubp | M::Fisub => (Op::Sub, false),
                M::Fsubr | M::Fsubrp | M::Fisubr => (Op::Sub, true),
                M::Fmul | M::Fmulp | M::Fimul => (Op::Mul, false),
                M::Fdiv | M::Fdivp | M::Fidiv => (Op::Div, false),
                _ => (Op::Div, true),
            };
            // A stack underflow's masked response replaces the operation.
            let r = if empty {
                F80::INDEFINITE
            } else if rev {
                cpu.fp_arith(op, b, a)
            } else {
                cpu.fp_arith(op, a, b)
            };
            let (num, den) = if rev { (b, a) } else { (a, b) };
            if op == Op::Div && den.is_zero() && !num.is_zero() && !num.is_nan() && !num.is_inf() {
                // Division by zero does not report a denormal dividend.
                let de = DE as u16;
                cpu.state.fsw = (cpu.state.fsw & !de) | (fsw_before & de);
            }
            cpu.state.fsw &= !C1;
            cpu.set_st(d, r);
            if matches!(
                m,
                M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
            ) {
                cpu.fpop();
            }
        }
        M::Fcom
        | M::Fcomp
        | M::Fcompp
        | M::Fucom
        | M::Fucomp
        | M::Fucompp
        | M::Ficom
        | M::Ficomp
        | M::Ftst => {
            let (a, b) = if m == M::Ftst {
                (cpu.st(0), F80::ZERO)
            } else {
                let (_, a, b) = cpu.fp_operands(i)?;
                (a, b)
            };
            let unordered_ok = matches!(m, M::Fucom | M::Fucomp | M::Fucompp);
            let r = cpu.fp_compare(a, b, unordered_ok);
            let cc = match r {
                None => C3 | C2 | C0,
                Some(std::cmp::Ordering::Less) => C0,
                Some(std::cmp::Ordering::Equal) => C3,
                Some(std::cmp::Ordering::Greater) => 0,
            };
            cpu.state.fsw = (cpu.state.fsw & !(C0 | C1 | C2 | C3)) | cc;
            match m {
                M::Fcomp | M::Fucomp | M::Ficomp => cpu.fpop(),
                M::Fcompp | M::Fucompp => {
                    cpu.fpop();
                    cpu.fpop();
                }
                _ => {}
            }
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            let (_, a, b) = cpu.fp_operands(i)?;
            let unordered_ok = matches!(m, M::Fucomi | M::Fucomip);
            let r = cpu.fp_compare(a, b, unordered_ok);
            use crate::cpu::state::rflags::{AF, CF, OF, PF, SF as RSF, ZF};
            let f = match r {
                None => ZF | PF | CF,
                Some(std::cmp::Ordering::Less) => CF,
                Some(std::cmp::Ordering::Equal) => ZF,
                Some(std::cmp::Ordering::Greater) => 0,
            };
            cpu.state.set_arith(ZF | PF | CF | OF | AF | RSF, f);
            cpu.state.fsw &= !C1;
            if matches!(m, M::Fcomip | M::Fucomip) {
                cpu.fpop();
            }
        }
        M::Fxam => {
            let v = cpu.st_raw(0);
            let sign = if v.sign() { C1 } else { 0 };
            let cc = if cpu.st_empty(0) {
                C3 | C0
            } else if v.is_nan() {
                C0
            } else if v.is_inf() {
                C2 | C0
            } else if v.is_zero() {
                C3
            } else if v.is_denormal() {
                C3 | C2
            } else if v.m >> 63 == 0 {
                0
            } else {
                C2
            };
            cpu.state.fsw = (cpu.state.fsw & !(C0 | C1 | C2 | C3)) | cc | sign;
        }
        M::Fxch => {
            let s = if i.op_count() == 2 {
                st_index(i.op1_register()).ok_or_else(ud)?
            } else {
                1
            };
            let a = cpu.st(0);
            let b = cpu.st(s);
            cpu.set_st(0, b);
            cpu.set_st(s, a);
            cpu.state.fsw &= !C1;
        }
        M::Fabs | M::Fchs => {
            let empty = cpu.st_empty(0);
            let v = cpu.st(0);
            let r = if empty {
                v
            } else if m == M::Fabs {
                v.abs()
            } else {
                v.negate()
            };
            cpu.set_st(0, r);
            cpu.state.fsw &= !C1;
        }
        M::Ffree | M::Ffreep => {
            let s = st_index(i.op0_register()).ok_or_else(ud)?;
            let p = cpu.phys(s);
            cpu.state.ftw &= !(1 << p);
            if m == M::Ffreep {
                cpu.fpop();
            }
        }
        M::Fincstp => {
            cpu.set_top(cpu.top() + 1);
            cpu.state.fsw &= !C1;
        }
        M::Fdecstp => {
            cpu.set_top(cpu.top() + 7);
            cpu.state.fsw &= !C1;
        }
        M::Fsqrt | M::Frndint => {
            let v = cpu.st(0);
            let r = if v.is_nan() {
                if v.is_snan() {
                    cpu.fpu_flags(IE);
                }
                v.quiet()
            } else if m == M::Fsqrt {
                if v.sign() && !v.is_zero() {
                    cpu.fpu_flags(IE);
                    F80::INDEFINITE
                } else if v.is_zero() || v.is_inf() {
                    v
                } else {
                    let (x, _) = v.to_f64(0);
                    let (bits, f) = float::sqrt(Fmt::D, x.to_bits(), cpu.fpu_ctl());
                    cpu.fpu_flags(f & (IE | PE));
                    F80::from_f64(f64::from_bits(bits))
                }
            } else if v.is_inf() || v.is_zero() || v.exp() >= 16383 + 63 {
                v
            } else {
                let (r, f) = v.to_int(64, cpu.fpu_ctl().rc);
                cpu.fpu_flags(f & PE);
                if r == 0 {
                    F80 {
                        se: v.se & 0x8000,
                        m: 0,
                    }
                } else {
                    F80::from_i64(r)
                }
            };
            cpu.state.fsw &= !C1;
            cpu.set_st(0, r);
        }
        M::Fcmovb
        | M::Fcmove
        | M::Fcmovbe
        | M::Fcmovu
        | M::Fcmovnb
        | M::Fcmovne
        | M::Fcmovnbe
        | M::Fcmovnu => {
            use crate::cpu::state::rflags::{CF, PF, ZF};
            let f = |b| cpu.state.flag(b);
            let take = match m {
                M::Fcmovb => f(CF),
                M::Fcmove => f(ZF),
                M::Fcmovbe => f(CF) || f(ZF),
                M::Fcmovu => f(PF),
                M::Fcmovnb => !f(CF),
                M::Fcmovne => !f(ZF),
                M::Fcmovnbe => !f(CF) && !f(ZF),
                _ => !f(PF),
            };
            let s = st_index(i.op1_register()).ok_or_else(ud)?;
            if cpu.st_empty(0) || cpu.st_empty(s) {
                // Stack underflow whatever the condition.
                cpu.st(if cpu.st_empty(0) { 0 } else { s });
                cpu.set_st(0, F80::INDEFINITE);
            } else if take {
                let v = cpu.st(s);
                cpu.set_st(0, v);
            }
            cpu.state.fsw &= !C1;
        }
        _ => return cpu.unimplemented(i),
    }
    let _ = ZE;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_the_core_set() {
        for m in [
            Mnemonic::Fninit,
            Mnemonic::Fxsave64,
            Mnemonic::Fld,
            Mnemonic::Wait,
        ] {
            assert!(handles(m));
        }
        assert_eq!(st_index(Register::ST3), Some(3));
        assert_eq!(st_index(Register::XMM0), None);
    }
}
