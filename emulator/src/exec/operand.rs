//! Operand access shared by every instruction group: general purpose
//! registers of each width, effective addresses and segment bases, and
//! reading and writing an instruction's operands.

use iced_x86::{Instruction, OpKind, Register};

use crate::cpu::state::SegReg;
use crate::cpu::{Cpu, Flow};
use crate::exceptions::ud;

/// The index of `r`, a 32-bit (`W` = 32) or 64-bit GPR, which the decoder
/// checked with [`gpr_width`]. (`W` = 0: unused, 0.)
#[inline(always)]
pub(crate) fn full_gpr<const W: u32>(r: Register) -> usize {
    let base = match W {
        32 => Register::EAX,
        64 => Register::RAX,
        _ => return 0,
    };
    (r as usize).wrapping_sub(base as usize) & 15
}

/// 32 or 64 if operand `n` of `i` is a 32-bit or 64-bit GPR, else 0.
pub(super) fn gpr_width(i: &Instruction, n: u32) -> u32 {
    if i.op_kind(n) != OpKind::Register {
        return 0;
    }
    match gpr_info(i.op_register(n)) {
        Some((_, b @ (32 | 64), false)) => b,
        _ => 0,
    }
}

/// GPR_TABLE entry bits: valid, legacy high byte, width code (8 << code
/// bits), register index.
const G_VALID: u8 = 0x80;
const G_HIGH: u8 = 0x40;

const fn gpr_entry(v: u32) -> u8 {
    let al = Register::AL as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    if v >= al && v < al + 20 {
        let k = v - al;
        if k < 4 {
            G_VALID | k as u8
        } else if k < 8 {
            G_VALID | G_HIGH | (k - 4) as u8
        } else {
            G_VALID | (k - 4) as u8
        }
    } else if v >= ax && v < ax + 16 {
        G_VALID | (1 << 4) | (v - ax) as u8
    } else if v >= eax && v < eax + 16 {
        G_VALID | (2 << 4) | (v - eax) as u8
    } else if v >= rax && v < rax + 16 {
        G_VALID | (3 << 4) | (v - rax) as u8
    } else {
        0
    }
}

/// [`gpr_info`] for every register number, computed at compile time.
static GPR_TABLE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut v = 0;
    while v < 256 {
        t[v] = gpr_entry(v as u32);
        v += 1;
    }
    t
};

const WIDTH_MASK: [u64; 4] = [0xff, 0xffff, 0xffff_ffff, u64::MAX];

/// A general purpose register: (index, width in bits, legacy high byte).
#[inline(always)]
pub(crate) fn gpr_info(r: Register) -> Option<(usize, u32, bool)> {
    let e = GPR_TABLE[r as usize & 0xff];
    (e & G_VALID != 0).then(|| (usize::from(e & 0xf), 8 << ((e >> 4) & 3), e & G_HIGH != 0))
}

/// XMM register number.
pub(crate) fn xmm_index(r: Register) -> Option<usize> {
    let v = r as u32;
    (v >= Register::XMM0 as u32 && v <= Register::XMM15 as u32)
        .then(|| (v - Register::XMM0 as u32) as usize)
}

impl Cpu {
    #[inline]
    pub(crate) fn reg(&self, r: Register) -> u64 {
        let e = GPR_TABLE[r as usize & 0xff];
        if e & G_VALID != 0 {
            let v = self.state.gpr[usize::from(e & 0xf)];
            if e & G_HIGH != 0 {
                return (v >> 8) & 0xff;
            }
            return v & WIDTH_MASK[usize::from((e >> 4) & 3)];
        }
        match r {
            Register::RIP => self.next_rip,
            Register::EIP => self.next_rip & 0xffff_ffff,
            _ => 0,
        }
    }

    /// Write a GPR with x86 merge rules: 32-bit writes zero the upper half,
    /// 8/16-bit writes keep the rest.
    #[inline]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let e = GPR_TABLE[r as usize & 0xff];
        if e & G_VALID == 0 {
            return;
        }
        let slot = &mut self.state.gpr[usize::from(e & 0xf)];
        let old = *slot;
        *slot = if e & G_HIGH != 0 {
            (old & !0xff00) | ((v & 0xff) << 8)
        } else {
            match (e >> 4) & 3 {
                0 => (old & !0xff) | (v & 0xff),
                1 => (old & !0xffff) | (v & 0xffff),
                2 => v & 0xffff_ffff,
                _ => v,
            }
        };
    }

    /// The linear address of the explicit memory operand.
    #[inline]
    pub(crate) fn ea(&self, i: &Instruction) -> u64 {
        let la = self
            .offset(i)
            .wrapping_add(self.seg_base(i.memory_segment()));
        if self.state.long_mode_64() {
            la
        } else {
            la & 0xffff_ffff
        }
    }

    /// The effective address (offset, without segment base) of the
    /// explicit memory operand, as LEA computes it, wrapped to the
    /// address size.
    #[inline]
    pub(crate) fn offset(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        let index = i.memory_index();
        let mut a = i.memory_displacement64();
        let mut abits = 0;
        if base == Register::RIP || base == Register::EIP {
            abits = if base == Register::EIP { 32 } else { 64 };
        } else {
            if base != Register::None {
                a = a.wrapping_add(self.reg(base));
                abits = gpr_info(base).map_or(64, |(_, b, _)| b);
            }
            if index != Register::None {
                a = a.wrapping_add(
                    self.reg(index)
                        .wrapping_mul(u64::from(i.memory_index_scale())),
                );
                abits = abits.max(gpr_info(index).map_or(64, |(_, b, _)| b));
            }
        }
        if abits == 0 {
            abits = if self.state.long_mode_64() {
                64
            } else if i.memory_displ_size() == 2 {
                16
            } else {
                32
            };
        }
        a & crate::cpu::flags::mask(abits)
    }

    /// Segment base: in 64-bit mode only FS and GS have one.
    #[inline]
    pub(crate) fn seg_base(&self, seg: Register) -> u64 {
        let s = match seg {
            Register::FS => SegReg::Fs,
            Register::GS => SegReg::Gs,
            _ if self.state.long_mode_64() => return 0,
            Register::ES => SegReg::Es,
            Register::CS => SegReg::Cs,
            Register::SS => SegReg::Ss,
            Register::DS => SegReg::Ds,
            _ => return 0,
        };
        self.state.seg(s).base
    }

    /// Width in bits of operand `n`.
    #[inline]
    pub(crate) fn op_bits(&self, i: &Instruction, n: u32) -> u32 {
        match i.op_kind(n) {
            OpKind::Register => gpr_info(i.op_register(n)).map_or(0, |(_, b, _)| b),
            OpKind::Memory => (i.memory_size().size() * 8) as u32,
            OpKind::Immediate8 => 8,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 16,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 32,
            _ => 64,
        }
    }

    /// Width of integer operand `n`, or #UD for an operand that is not an
    /// 8/16/32/64-bit integer (never panics on odd encodings).
    #[inline]
    pub(crate) fn width(&self, i: &Instruction, n: u32) -> Flow<u32> {
        match self.op_bits(i, n) {
            b @ (8 | 16 | 32 | 64) => Ok(b),
            _ => Err(ud()),
        }
    }

    /// Read operand `n` (register, memory or immediate), zero-extended.
    #[inline]
    pub(crate) fn read_op(&mut self, i: &Instruction, n: u32) -> Flow<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg(i.op_register(n))),
            OpKind::Memory => {
                let bytes = i.memory_size().size();
                let la = self.ea(i);
                self.read_mem(la, bytes)
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(i.immediate(n)),
            OpKind::Immediate8_2nd => Ok(u64::from(i.immediate8_2nd())),
            _ => Err(ud()),
        }
    }

    /// Write operand `n` (register or memory).
    #[inline]
    pub(crate) fn write_op(&mut self, i: &Instruction, n: u32, v: u64) -> Flow {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let bytes = i.memory_size().size();
                let la = self.ea(i);
                self.write_mem(la, bytes, v)
            }
            _ => Err(ud()),
        }
    }

    /// Evaluate a condition code against RFLAGS.
    #[inline]
    pub(crate) fn cond(&self, cc: iced_x86::ConditionCode) -> bool {
        use crate::cpu::state::rflags::{CF, OF, PF, SF, ZF};
        use iced_x86::ConditionCode as C;
        let f = |b| self.state.flag(b);
        match cc {
            C::o => f(OF),
            C::no => !f(OF),
            C::b => f(CF),
            C::ae => !f(CF),
            C::e => f(ZF),
            C::ne => !f(ZF),
            C::be => f(CF) || f(ZF),
            C::a => !f(CF) && !f(ZF),
            C::s => f(SF),
            C::ns => !f(SF),
            C::p => f(PF),
            C::np => !f(PF),
            C::l => f(SF) != f(OF),
            C::ge => f(SF) == f(OF),
            C::le => f(ZF) || f(SF) != f(OF),
            C::g => !f(ZF) && f(SF) == f(OF),
            C::None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_numbering_matches_iced() {
        assert_eq!(gpr_info(Register::AL), Some((0, 8, false)));
        assert_eq!(gpr_info(Register::BH), Some((3, 8, true)));
        assert_eq!(gpr_info(Register::SPL), Some((4, 8, false)));
        assert_eq!(gpr_info(Register::DIL), Some((7, 8, false)));
        assert_eq!(gpr_info(Register::R15L), Some((15, 8, false)));
        assert_eq!(gpr_info(Register::R9W), Some((9, 16, false)));
        assert_eq!(gpr_info(Register::R13D), Some((13, 32, false)));
        assert_eq!(gpr_info(Register::RSP), Some((4, 64, false)));
        assert_eq!(gpr_info(Register::XMM1), None);
        assert_eq!(xmm_index(Register::XMM15), Some(15));
    }
}
