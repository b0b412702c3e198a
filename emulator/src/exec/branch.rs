//! Control transfer: JMP/CALL/RET (near), Jcc, LOOP*, JRCXZ and far
//! return (RETF, as Linux uses to reload CS).

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use crate::cpu::state::gpr::{RCX, RSP};
use crate::cpu::state::SegReg;
use crate::cpu::{Cpu, Flow};
use crate::exceptions::{gp0, null_segment, GP};
use crate::mmu::is_canonical;

impl Cpu {
    fn jump(&mut self, target: u64) -> Flow {
        if !is_canonical(target) {
            return Err(gp0());
        }
        self.next_rip = target;
        Ok(())
    }
}

pub(crate) fn branch(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let rel_target = || i.near_branch_target();
    let is_near = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    match i.mnemonic() {
        Mnemonic::Jmp => {
            if is_near {
                cpu.jump(rel_target())
            } else if matches!(i.code(), Code::Jmp_rm64) {
                let t = cpu.read_op(i, 0)?;
                cpu.jump(t)
            } else {
                cpu.unimplemented(i)
            }
        }
        Mnemonic::Call => {
            let target = if is_near {
                rel_target()
            } else if matches!(i.code(), Code::Call_rm64) {
                cpu.read_op(i, 0)?
            } else {
                return cpu.unimplemented(i);
            };
            if !is_canonical(target) {
                return Err(gp0());
            }
            cpu.push(8, cpu.next_rip)?;
            cpu.next_rip = target;
            Ok(())
        }
        Mnemonic::Ret => {
            let extra = if i.op_count() > 0 {
                u64::from(i.immediate16())
            } else {
                0
            };
            if !matches!(i.code(), Code::Retnq | Code::Retnq_imm16) {
                return cpu.unimplemented(i);
            }
            let rsp = cpu.state.gpr[RSP];
            let t = cpu.read_mem(rsp, 8)?;
            cpu.jump(t)?;
            cpu.state.gpr[RSP] = rsp.wrapping_add(8 + extra);
            Ok(())
        }
        Mnemonic::Retf => retf(cpu, i),
        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz => {
            let ecx_only = matches!(
                i.code(),
                Code::Loop_rel8_64_ECX
                    | Code::Loope_rel8_64_ECX
                    | Code::Loopne_rel8_64_ECX
                    | Code::Jecxz_rel8_64
            );
            let cmask = if ecx_only { 0xffff_ffff } else { u64::MAX };
            let take = if matches!(i.mnemonic(), Mnemonic::Jrcxz | Mnemonic::Jecxz) {
                cpu.state.gpr[RCX] & cmask == 0
            } else {
                let c = cpu.state.gpr[RCX].wrapping_sub(1) & cmask;
                let zf = cpu.state.flag(crate::cpu::state::rflags::ZF);
                let go = c != 0
                    && match i.mnemonic() {
                        Mnemonic::Loope => zf,
                        Mnemonic::Loopne => !zf,
                        _ => true,
                    };
                cpu.state.gpr[RCX] = c;
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

/// RETF in 64-bit mode (64-bit operand size only).
fn retf(cpu: &mut Cpu, i: &Instruction) -> Flow {
    if !matches!(i.code(), Code::Retfq | Code::Retfq_imm16) {
        return cpu.unimplemented(i);
    }
    let extra = if i.op_count() > 0 {
        u64::from(i.immediate16())
    } else {
        0
    };
    let rsp = cpu.state.gpr[RSP];
    let rip = cpu.read_mem(rsp, 8)?;
    let sel = cpu.read_mem(rsp.wrapping_add(8), 8)? as u16;
    let cpl = cpu.state.cpl();
    let rpl = (sel & 3) as u8;
    if rpl < cpl {
        return Err(crate::exceptions::exc(GP, Some(u32::from(sel & !3))));
    }
    let mut cs = cpu.code_segment(sel, GP)?;
    if !is_canonical(rip) {
        return Err(gp0());
    }
    let mut new_rsp = rsp.wrapping_add(16 + extra);
    if rpl > cpl {
        let outer_rsp = cpu.read_mem(new_rsp, 8)?;
        let ss_sel = cpu.read_mem(new_rsp.wrapping_add(8), 8)? as u16;
        cpu.load_sreg_checked(SegReg::Ss, ss_sel, rpl)?;
        new_rsp = outer_rsp.wrapping_add(extra);
    }
    cs.dpl = rpl;
    cpu.state.seg[SegReg::Cs as usize] = cs;
    cpu.state.gpr[RSP] = new_rsp;
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
