//! Control transfer: JMP/CALL/RET near and far, Jcc, LOOP*, JCXZ/JECXZ/
//! JRCXZ and RETF, in 16-, 32- and 64-bit code.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use crate::cpu::state::gpr::RSP;
use crate::cpu::state::{efer, SegReg};
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{exc, gp0, null_segment, GP};
use crate::mmu::is_canonical;

impl Cpu {
    fn jump(&mut self, target: u64) -> Flow {
        if !is_canonical(target) {
            return Err(gp0());
        }
        self.next_rip = target;
        Ok(())
    }

    /// Load CS for a far JMP/CALL/RET to `sel:off` at the current
    /// privilege (real mode: selector * 16; protected mode: a code segment
    /// descriptor, same privilege level).
    pub(crate) fn far_transfer(&mut self, sel: u16, off: u64) -> Flow {
        if self.state.real_mode() {
            let cs = &mut self.state.seg[SegReg::Cs as usize];
            cs.selector = sel;
            cs.base = u64::from(sel) << 4;
            self.next_rip = off & 0xffff_ffff;
            return Ok(());
        }
        let cpl = self.state.cpl();
        let mut cs = self.code_segment(sel, GP)?;
        let err = Some(u32::from(sel & !3));
        let conforming = cs.type_ & 4 != 0;
        if (conforming && cs.dpl > cpl) || (!conforming && (cs.dpl != cpl || (sel & 3) as u8 > cpl))
        {
            return Err(exc(GP, err));
        }
        let long = self.state.efer & efer::LMA != 0;
        if long && cs.l != 0 && cs.db != 0 {
            return Err(exc(GP, err));
        }
        let to64 = long && cs.l != 0;
        let off = if to64 { off } else { off & 0xffff_ffff };
        if !is_canonical(off) {
            return Err(gp0());
        }
        cs.dpl = cpl;
        cs.selector = (sel & !3) | u16::from(cpl);
        self.state.seg[SegReg::Cs as usize] = cs;
        self.next_rip = off;
        Ok(())
    }

    /// Read a far pointer `m16:16/32/64` (offset first) at the memory operand.
    fn far_pointer(&mut self, i: &Instruction, off_bytes: usize) -> Flow<(u16, u64)> {
        let la = self.ea(i);
        let off = self.read_mem(la, off_bytes)?;
        let sel = self.read_mem(la.wrapping_add(off_bytes as u64), 2)? as u16;
        Ok((sel, off))
    }
}

fn near_size(kind: OpKind) -> usize {
    match kind {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        _ => 8,
    }
}

/// Width of the counter LOOP/JCXZ use, from the iced code name.
fn counter_bits(i: &Instruction) -> u32 {
    let name = format!("{:?}", i.code());
    if name.ends_with("_CX") || name.starts_with("Jcxz") {
        16
    } else if name.contains("ECX") || name.starts_with("Jecxz") {
        32
    } else {
        64
    }
}

pub(crate) fn branch(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let rel_target = || i.near_branch_target();
    let is_near = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    match i.mnemonic() {
        Mnemonic::Jmp => match i.code() {
            _ if is_near => cpu.jump(rel_target()),
            Code::Jmp_rm64 | Code::Jmp_rm32 | Code::Jmp_rm16 => {
                let t = cpu.read_op(i, 0)?;
                cpu.jump(t)
            }
            Code::Jmp_ptr1616 => {
                cpu.far_transfer(i.far_branch_selector(), u64::from(i.far_branch16()))
            }
            Code::Jmp_ptr1632 => {
                cpu.far_transfer(i.far_branch_selector(), u64::from(i.far_branch32()))
            }
            Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664 => {
                let n = match i.code() {
                    Code::Jmp_m1616 => 2,
                    Code::Jmp_m1632 => 4,
                    _ => 8,
                };
                let (sel, off) = cpu.far_pointer(i, n)?;
                cpu.far_transfer(sel, off)
            }
            _ => cpu.unimplemented(i),
        },
        Mnemonic::Call => {
            let far = match i.code() {
                Code::Call_ptr1616 => {
                    Some((2, i.far_branch_selector(), u64::from(i.far_branch16())))
                }
                Code::Call_ptr1632 => {
                    Some((4, i.far_branch_selector(), u64::from(i.far_branch32())))
                }
                Code::Call_m1616 | Code::Call_m1632 | Code::Call_m1664 => {
                    let n = match i.code() {
                        Code::Call_m1616 => 2,
                        Code::Call_m1632 => 4,
                        _ => 8,
                    };
                    let (sel, off) = cpu.far_pointer(i, n)?;
                    Some((n, sel, off))
                }
                _ => None,
            };
            if let Some((n, sel, off)) = far {
                let ret_cs = u64::from(cpu.state.seg(SegReg::Cs).selector);
                let ret_ip = cpu.next_rip;
                let old_cs = *cpu.state.seg(SegReg::Cs);
                let sp = cpu.state.gpr[RSP];
                cpu.far_transfer(sel, off)?;
                let pushed = cpu.push(n, ret_cs).and_then(|()| cpu.push(n, ret_ip));
                if let Err(e) = pushed {
                    cpu.state.seg[SegReg::Cs as usize] = old_cs;
                    cpu.state.gpr[RSP] = sp;
                    return Err(e);
                }
                return Ok(());
            }
            let (target, size) = if is_near {
                (rel_target(), near_size(i.op0_kind()))
            } else {
                match i.code() {
                    Code::Call_rm64 => (cpu.read_op(i, 0)?, 8),
                    Code::Call_rm32 => (cpu.read_op(i, 0)?, 4),
                    Code::Call_rm16 => (cpu.read_op(i, 0)?, 2),
                    _ => return cpu.unimplemented(i),
                }
            };
            if !is_canonical(target) {
                return Err(gp0());
            }
            cpu.push(size, cpu.next_rip)?;
            cpu.next_rip = target;
            Ok(())
        }
        Mnemonic::Ret => {
            let extra = if i.op_count() > 0 {
                u64::from(i.immediate16())
            } else {
                0
            };
            let size = match i.code() {
                Code::Retnq | Code::Retnq_imm16 => 8,
                Code::Retnd | Code::Retnd_imm16 => 4,
                _ => 2,
            };
            let t = cpu.stack_slot(0, size)?;
            cpu.jump(t)?;
            let sp = cpu.state.gpr[RSP].wrapping_add(size as u64 + extra);
            cpu.set_sp(sp);
            Ok(())
        }
        Mnemonic::Retf => retf(cpu, i),
        Mnemonic::Loop
        | Mnemonic::Loope
        | Mnemonic::Loopne
        | Mnemonic::Jrcxz
        | Mnemonic::Jecxz
        | Mnemonic::Jcxz => {
            let (creg, bits) = match counter_bits(i) {
                16 => (Register::CX, 16),
                32 => (Register::ECX, 32),
                _ => (Register::RCX, 64),
            };
            let cmask = crate::cpu::flags::mask(bits);
            let c0 = cpu.reg(creg) & cmask;
            let take = if matches!(
                i.mnemonic(),
                Mnemonic::Jrcxz | Mnemonic::Jecxz | Mnemonic::Jcxz
            ) {
                c0 == 0
            } else {
                let c = c0.wrapping_sub(1) & cmask;
                let zf = cpu.state.flag(crate::cpu::state::rflags::ZF);
                let go = c != 0
                    && match i.mnemonic() {
                        Mnemonic::Loope => zf,
                        Mnemonic::Loopne => !zf,
                        _ => true,
                    };
                cpu.set_reg(creg, c);
                go
            };
            if take {
                cpu.jump(rel_target())
            } else {
                Ok(())
            }
        }
        _ => {
            // Jcc
            if cpu.cond(i.condition_code()) {
                cpu.jump(rel_target())
            } else {
                Ok(())
            }
        }
    }
}

/// Jcc with its condition fixed at decode time (`CC` is the iced
/// `ConditionCode` as u8).
pub(crate) fn jcc_form<const CC: u8>(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let taken = super::fast::cond::<CC>(cpu.state.rflags);
    if taken {
        cpu.jump(i.near_branch_target())
    } else {
        Ok(())
    }
}

/// RETF: 16-, 32- or 64-bit operand size; a return to an outer privilege
/// level also pops SS:RSP.
fn retf(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let b = match i.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfd | Code::Retfd_imm16 => 4,
        _ => 8,
    };
    let extra = if i.op_count() > 0 {
        u64::from(i.immediate16())
    } else {
        0
    };
    let rsp = cpu.state.gpr[RSP];
    let rip = cpu.stack_slot(0, b)?;
    let sel = cpu.stack_slot(1, b)? as u16;
    if cpu.state.real_mode() {
        cpu.far_transfer(sel, rip)?;
        cpu.set_sp(rsp.wrapping_add(2 * b as u64 + extra));
        return Ok(());
    }
    let cpl = cpu.state.cpl();
    let rpl = (sel & 3) as u8;
    if rpl < cpl {
        return Err(exc(GP, Some(u32::from(sel & !3))));
    }
    let mut cs = cpu.code_segment(sel, GP)?;
    let to64 = cpu.state.efer & efer::LMA != 0 && cs.l != 0;
    let rip = if to64 { rip } else { rip & 0xffff_ffff };
    if !is_canonical(rip) {
        return Err(gp0());
    }
    let mut new_rsp = rsp.wrapping_add(2 * b as u64 + extra);
    if rpl > cpl {
        let la = cpu.stack_la(new_rsp);
        let outer_rsp = cpu.read_mem(la, b)?;
        let la = cpu.stack_la(new_rsp.wrapping_add(b as u64));
        let ss_sel = cpu.read_mem(la, b)? as u16;
        cpu.load_sreg_checked(SegReg::Ss, ss_sel, rpl)?;
        new_rsp = outer_rsp.wrapping_add(extra);
        cs.dpl = rpl;
        cpu.state.seg[SegReg::Cs as usize] = cs;
        cpu.state.gpr[RSP] = new_rsp;
    } else {
        cs.dpl = rpl;
        cpu.state.seg[SegReg::Cs as usize] = cs;
        cpu.set_sp(new_rsp);
    }
    cpu.next_rip = rip;
    if rpl > cpl {
        for s in [SegReg::Ds, SegReg::Es, SegReg::Fs, SegReg::Gs] {
            let seg = cpu.state.seg(s);
            if seg.unusable == 0 && seg.type_ & 0xc != 0xc && seg.dpl < rpl {
                let base = seg.base;
                cpu.state.seg[s as usize] = null_segment(0, 0);
                if matches!(s, SegReg::Fs | SegReg::Gs) {
                    cpu.state.seg[s as usize].base = base;
                }
            }
        }
    }
    Ok(())
}
