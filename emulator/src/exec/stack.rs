//! Stack instructions: PUSH/POP (register, memory, immediate, FS/GS),
//! PUSHF/POPF, LEAVE and ENTER.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::state::gpr::{RBP, RSP};
use crate::cpu::state::rflags;
use crate::cpu::{Cpu, Flow};

impl Cpu {
    pub(crate) fn push(&mut self, bytes: usize, v: u64) -> Flow {
        let rsp = self.state.gpr[RSP].wrapping_sub(bytes as u64);
        self.write_mem(rsp, bytes, v)?;
        self.state.gpr[RSP] = rsp;
        Ok(())
    }

    pub(crate) fn pop(&mut self, bytes: usize) -> Flow<u64> {
        let rsp = self.state.gpr[RSP];
        let v = self.read_mem(rsp, bytes)?;
        self.state.gpr[RSP] = rsp.wrapping_add(bytes as u64);
        Ok(v)
    }

    /// RFLAGS after POPF/IRET loading `new` at the current privilege.
    pub(crate) fn merge_rflags(&self, new: u64, bytes: usize) -> u64 {
        let cpl = u64::from(self.state.cpl());
        let iopl = (self.state.rflags & rflags::IOPL) >> 12;
        let mut writable = rflags::WRITABLE;
        if cpl > 0 {
            writable &= !rflags::IOPL;
        }
        if cpl > iopl {
            writable &= !rflags::IF;
        }
        if bytes == 2 {
            writable &= 0xffff;
        }
        (self.state.rflags & !writable) | (new & writable) | rflags::FIXED1
    }
}

fn sreg(r: Register) -> Option<crate::cpu::state::SegReg> {
    use crate::cpu::state::SegReg;
    match r {
        Register::FS => Some(SegReg::Fs),
        Register::GS => Some(SegReg::Gs),
        _ => None,
    }
}

pub(crate) fn stack(cpu: &mut Cpu, i: &Instruction) -> Flow {
    match i.mnemonic() {
        Mnemonic::Push => {
            if i.op0_kind() == OpKind::Register {
                if let Some(s) = sreg(i.op0_register()) {
                    let sel = u64::from(cpu.state.seg(s).selector);
                    let bytes = if i.code() == iced_x86::Code::Pushw_FS
                        || i.code() == iced_x86::Code::Pushw_GS
                    {
                        2
                    } else {
                        8
                    };
                    return cpu.push(bytes, sel);
                }
            }
            let bytes = (cpu.op_bits(i, 0) / 8) as usize;
            let v = cpu.read_op(i, 0)?;
            cpu.push(bytes, v)
        }
        Mnemonic::Pop => {
            if i.op0_kind() == OpKind::Register {
                if let Some(s) = sreg(i.op0_register()) {
                    let bytes = if i.code() == iced_x86::Code::Popw_FS
                        || i.code() == iced_x86::Code::Popw_GS
                    {
                        2
                    } else {
                        8
                    };
                    let sel = cpu.pop(bytes)? as u16;
                    return cpu.load_sreg(s, sel);
                }
            }
            let bytes = (cpu.op_bits(i, 0) / 8) as usize;
            let v = cpu.pop(bytes)?;
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Pushfq | Mnemonic::Pushf => {
            let bytes = if i.mnemonic() == Mnemonic::Pushf {
                2
            } else {
                8
            };
            let v = cpu.state.rflags & !(rflags::VM | rflags::RF);
            cpu.push(bytes, v)
        }
        Mnemonic::Popfq | Mnemonic::Popf => {
            let bytes = if i.mnemonic() == Mnemonic::Popf { 2 } else { 8 };
            let v = cpu.pop(bytes)?;
            cpu.state.rflags = cpu.merge_rflags(v, bytes) & !rflags::RF;
            Ok(())
        }
        Mnemonic::Leave => {
            let bytes = if i.code() == iced_x86::Code::Leavew {
                2
            } else {
                8
            };
            let rbp = cpu.state.gpr[RBP];
            let v = cpu.read_mem(rbp, bytes)?;
            cpu.state.gpr[RSP] = rbp.wrapping_add(bytes as u64);
            if bytes == 2 {
                cpu.set_reg(Register::BP, v);
            } else {
                cpu.state.gpr[RBP] = v;
            }
            Ok(())
        }
        _ => {
            // ENTER size, 0 (nested levels are not implemented).
            if i.immediate8_2nd() != 0 || i.code() != iced_x86::Code::Enterq_imm16_imm8 {
                return cpu.unimplemented(i);
            }
            let size = u64::from(i.immediate16());
            cpu.push(8, cpu.state.gpr[RBP])?;
            let frame = cpu.state.gpr[RSP];
            cpu.state.gpr[RBP] = frame;
            cpu.state.gpr[RSP] = frame.wrapping_sub(size);
            Ok(())
        }
    }
}
