//! Stack instructions: PUSH/POP (register, memory, immediate, segment
//! registers), PUSHF/POPF, PUSHA/POPA, LEAVE and ENTER, in 16-, 32- and
//! 64-bit stack and operand sizes.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::state::gpr::{RBP, RSP};
use crate::cpu::state::{rflags, SegReg};
use crate::cpu::{Cpu, Flow};

impl Cpu {
    /// The linear address of stack offset `sp` (SS base and SP width
    /// outside 64-bit mode).
    pub(crate) fn stack_la(&self, sp: u64) -> u64 {
        match self.state.stack_bits() {
            64 => sp,
            32 => {
                self.state
                    .seg(SegReg::Ss)
                    .base
                    .wrapping_add(sp & 0xffff_ffff)
                    & 0xffff_ffff
            }
            _ => self.state.seg(SegReg::Ss).base.wrapping_add(sp & 0xffff) & 0xffff_ffff,
        }
    }

    /// Set the stack pointer at the stack's width (SP keeps RSP's upper bits).
    pub(crate) fn set_sp(&mut self, v: u64) {
        let old = self.state.gpr[RSP];
        self.state.gpr[RSP] = match self.state.stack_bits() {
            64 => v,
            32 => v & 0xffff_ffff,
            _ => (old & !0xffff) | (v & 0xffff),
        };
    }

    pub(crate) fn push(&mut self, bytes: usize, v: u64) -> Flow {
        let sp = self.state.gpr[RSP].wrapping_sub(bytes as u64);
        let la = self.stack_la(sp);
        self.write_mem(la, bytes, v)?;
        self.set_sp(sp);
        Ok(())
    }

    pub(crate) fn pop(&mut self, bytes: usize) -> Flow<u64> {
        let sp = self.state.gpr[RSP];
        let v = self.read_mem(self.stack_la(sp), bytes)?;
        self.set_sp(sp.wrapping_add(bytes as u64));
        Ok(v)
    }

    /// Read the `k`-th `bytes`-sized slot above the stack pointer.
    pub(crate) fn stack_slot(&mut self, k: u64, bytes: usize) -> Flow<u64> {
        let sp = self.state.gpr[RSP].wrapping_add(k * bytes as u64);
        self.read_mem(self.stack_la(sp), bytes)
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

fn sreg(r: Register) -> Option<SegReg> {
    Some(match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::DS => SegReg::Ds,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => return None,
    })
}

/// Operand size in bytes from an iced code name (`Pushw_`, `Pushd_`, ...).
fn size_of_code(i: &Instruction) -> usize {
    let name = format!("{:?}", i.code());
    if name.contains("w_") || name.ends_with('w') {
        2
    } else if name.contains("d_") || name.ends_with('d') {
        4
    } else {
        8
    }
}

const GPR16: [Register; 8] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
];
const GPR32: [Register; 8] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
];

pub(crate) fn stack(cpu: &mut Cpu, i: &Instruction) -> Flow {
    match i.mnemonic() {
        Mnemonic::Push => {
            if i.op0_kind() == OpKind::Register {
                if let Some(s) = sreg(i.op0_register()) {
                    let sel = u64::from(cpu.state.seg(s).selector);
                    return cpu.push(size_of_code(i), sel);
                }
            }
            let bytes = (cpu.op_bits(i, 0) / 8) as usize;
            let v = cpu.read_op(i, 0)?;
            cpu.push(bytes, v)
        }
        Mnemonic::Pop => {
            if i.op0_kind() == OpKind::Register {
                if let Some(s) = sreg(i.op0_register()) {
                    if s == SegReg::Cs {
                        return Err(crate::exceptions::ud());
                    }
                    let bytes = size_of_code(i);
                    let sel = cpu.stack_slot(0, bytes)? as u16;
                    cpu.load_sreg(s, sel)?;
                    let sp = cpu.state.gpr[RSP].wrapping_add(bytes as u64);
                    cpu.set_sp(sp);
                    if s == SegReg::Ss {
                        cpu.int_shadow = true;
                    }
                    return Ok(());
                }
            }
            let bytes = (cpu.op_bits(i, 0) / 8) as usize;
            let v = cpu.pop(bytes)?;
            cpu.write_op(i, 0, v)
        }
        Mnemonic::Pushfq | Mnemonic::Pushf | Mnemonic::Pushfd => {
            let bytes = match i.mnemonic() {
                Mnemonic::Pushf => 2,
                Mnemonic::Pushfd => 4,
                _ => 8,
            };
            let v = cpu.state.rflags & !(rflags::VM | rflags::RF);
            cpu.push(bytes, v)
        }
        Mnemonic::Popfq | Mnemonic::Popf | Mnemonic::Popfd => {
            let bytes = match i.mnemonic() {
                Mnemonic::Popf => 2,
                Mnemonic::Popfd => 4,
                _ => 8,
            };
            let v = cpu.pop(bytes)?;
            cpu.state.rflags = cpu.merge_rflags(v, bytes) & !rflags::RF;
            Ok(())
        }
        Mnemonic::Pusha | Mnemonic::Pushad => {
            let (regs, bytes) = if i.mnemonic() == Mnemonic::Pusha {
                (GPR16, 2)
            } else {
                (GPR32, 4)
            };
            let sp0 = cpu.state.gpr[RSP];
            for (k, r) in regs.iter().enumerate() {
                let v = cpu.reg(*r);
                let sp = sp0.wrapping_sub(bytes as u64 * (k as u64 + 1));
                let la = cpu.stack_la(sp);
                cpu.write_mem(la, bytes, v)?;
            }
            cpu.set_sp(sp0.wrapping_sub(8 * bytes as u64));
            Ok(())
        }
        Mnemonic::Popa | Mnemonic::Popad => {
            let (regs, bytes) = if i.mnemonic() == Mnemonic::Popa {
                (GPR16, 2)
            } else {
                (GPR32, 4)
            };
            let mut vals = [0u64; 8];
            for (k, v) in vals.iter_mut().enumerate() {
                *v = cpu.stack_slot(7 - k as u64, bytes)?;
            }
            for (k, r) in regs.iter().enumerate() {
                if k != 4 {
                    cpu.set_reg(*r, vals[k]);
                }
            }
            let sp = cpu.state.gpr[RSP].wrapping_add(8 * bytes as u64);
            cpu.set_sp(sp);
            Ok(())
        }
        Mnemonic::Leave => {
            let bytes = size_of_code(i);
            let rbp = cpu.state.gpr[RBP];
            let v = cpu.read_mem(cpu.stack_la(rbp), bytes)?;
            cpu.set_sp(rbp.wrapping_add(bytes as u64));
            match bytes {
                2 => cpu.set_reg(Register::BP, v),
                4 => cpu.set_reg(Register::EBP, v),
                _ => cpu.state.gpr[RBP] = v,
            }
            Ok(())
        }
        _ => {
            // ENTER size, 0 (nested levels are not implemented).
            if i.immediate8_2nd() != 0 {
                return cpu.unimplemented(i);
            }
            let bytes = size_of_code(i);
            let size = u64::from(i.immediate16());
            cpu.push(bytes, cpu.state.gpr[RBP])?;
            let frame = cpu.state.gpr[RSP];
            match bytes {
                2 => cpu.set_reg(Register::BP, frame),
                4 => cpu.set_reg(Register::EBP, frame),
                _ => cpu.state.gpr[RBP] = frame,
            }
            cpu.set_sp(frame.wrapping_sub(size));
            Ok(())
        }
    }
}
