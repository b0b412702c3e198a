//! Exception and interrupt delivery through the 64-bit IDT, with the
//! double-fault and triple-fault (shutdown) rules.

use vireo_hypervisor::Segment;

use crate::cpu::state::{rflags, SegReg};
use crate::cpu::{Cpu, Exit, Flow, Trap};
use crate::mmu::{is_canonical, Privilege};

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const BP: u8 = 3;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const AC: u8 = 17;

/// How an event arose: this decides the pushed RIP and the gate DPL check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A fault of the current instruction.
    Fault,
    /// INT n / INT3 / INTO: gate DPL is checked against CPL.
    Software,
    /// An external interrupt.
    External,
}

/// A `Trap` for `#vector(error)`.
pub(crate) fn exc(vector: u8, error: Option<u32>) -> Trap {
    Trap::Exception { vector, error }
}

pub(crate) fn gp0() -> Trap {
    exc(GP, Some(0))
}

pub(crate) fn ud() -> Trap {
    exc(UD, None)
}

fn has_error_code(vector: u8) -> bool {
    matches!(vector, DF | TS | NP | SS | GP | PF | AC)
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

fn class(vector: u8) -> Class {
    match vector {
        DE | TS | NP | SS | GP => Class::Contributory,
        PF => Class::PageFault,
        DF => Class::DoubleFault,
        _ => Class::Benign,
    }
}

impl Cpu {
    /// Deliver an event; a fault during delivery escalates to #DF and then to
    /// a triple fault, which is returned as [`Exit::Shutdown`].
    pub(crate) fn deliver_or_shutdown(
        &mut self,
        vector: u8,
        error: Option<u32>,
        return_rip: u64,
        kind: EventKind,
    ) -> Option<Exit> {
        let (mut vector, mut error, mut kind) = (vector, error, kind);
        // Events serialize: the handler sees code other threads wrote.
        self.code_sync();
        loop {
            let first = class(vector);
            match self.deliver(vector, error, return_rip, kind) {
                Ok(()) => return None,
                Err(Trap::Exception {
                    vector: v2,
                    error: e2,
                }) => {
                    let second = class(v2);
                    let double = match first {
                        Class::DoubleFault => {
                            tracing::warn!(vector = v2, "emulator: triple fault, shutting down");
                            return Some(Exit::Shutdown);
                        }
                        Class::Contributory => second == Class::Contributory,
                        Class::PageFault => {
                            matches!(second, Class::Contributory | Class::PageFault)
                        }
                        Class::Benign => false,
                    };
                    if double {
                        (vector, error) = (DF, Some(0));
                    } else {
                        (vector, error) = (v2, e2);
                    }
                    kind = EventKind::Fault;
                }
                Err(Trap::NeedInput(_)) => {
                    return Some(Exit::InternalError(format!(
                    "delivery of vector {vector} touched MMIO (IDT, GDT, TSS or stack outside RAM)"
                )))
                }
                Err(Trap::Internal(why)) => return Some(Exit::InternalError(why.into())),
                Err(Trap::Retry) => {
                    return Some(Exit::InternalError(format!(
                        "delivery of vector {vector} raced with another vCPU"
                    )))
                }
            }
        }
    }

    /// Read the descriptor `selector` names in the GDT (or LDT). Faults
    /// with #GP(selector) if it is outside the table.
    pub(crate) fn read_descriptor(&mut self, selector: u16) -> Flow<u64> {
        let (base, limit) = if selector & 4 != 0 {
            if self.state.ldt.unusable != 0 || self.state.ldt.present == 0 {
                return Err(exc(GP, Some(u32::from(selector & !3))));
            }
            (self.state.ldt.base, self.state.ldt.limit)
        } else {
            (self.state.gdt.base, u32::from(self.state.gdt.limit))
        };
        let off = u64::from(selector & !7);
        if off + 7 > u64::from(limit) {
            return Err(exc(GP, Some(u32::from(selector & !3))));
        }
        self.read_sys_u64(base.wrapping_add(off))
    }

    /// Load CS for a control transfer to a 64-bit code segment at privilege
    /// `cpl`; the checks common to interrupts, IRET and far returns.
    pub(crate) fn code_segment(&mut self, selector: u16, err_vec: u8) -> Flow<Segment> {
        if selector & !3 == 0 {
            return Err(exc(GP, Some(0)));
        }
        let desc = self.read_descriptor(selector)?;
        let seg = Segment::from_descriptor(selector, desc);
        let err = Some(u32::from(selector & !3));
        if seg.s == 0 || seg.type_ & 8 == 0 {
            return Err(exc(err_vec, err));
        }
        if seg.present == 0 {
            return Err(exc(NP, err));
        }
        Ok(seg)
    }

    /// Deliver one event: through the IVT in real mode, the 32-bit IDT in
    /// protected mode, the 64-bit IDT in long mode.
    fn deliver(
        &mut self,
        vector: u8,
        error: Option<u32>,
        return_rip: u64,
        kind: EventKind,
    ) -> Flow {
        if self.state.real_mode() {
            self.deliver_real(vector, return_rip)
        } else if self.state.efer & crate::cpu::state::efer::LMA == 0 {
            self.deliver_pm32(vector, error, return_rip, kind)
        } else {
            self.deliver64(vector, error, return_rip, kind)
        }
    }

    /// Real mode: FLAGS, CS, IP on the stack, CS:IP from the IVT.
    fn deliver_real(&mut self, vector: u8, return_rip: u64) -> Flow {
        let off = u64::from(vector) * 4;
        let idt = self.state.idt;
        if off + 3 > u64::from(idt.limit) {
            return Err(exc(GP, Some(0)));
        }
        let mut b = [0u8; 4];
        self.read_lin(
            idt.base.wrapping_add(off) & 0xffff_ffff,
            &mut b,
            Privilege::Supervisor,
        )?;
        let ip = u64::from(u16::from_le_bytes([b[0], b[1]]));
        let sel = u16::from_le_bytes([b[2], b[3]]);
        let flags = self.state.rflags;
        let cs = u64::from(self.state.seg(SegReg::Cs).selector);
        let sp = self.state.gpr[4];
        let pushed = self
            .push(2, flags)
            .and_then(|()| self.push(2, cs))
            .and_then(|()| self.push(2, return_rip & 0xffff));
        if let Err(e) = pushed {
            self.state.gpr[4] = sp;
            return Err(e);
        }
        self.state.rflags &= !(rflags::IF | rflags::TF | rflags::AC | rflags::RF);
        let c = &mut self.state.seg[SegReg::Cs as usize];
        c.selector = sel;
        c.base = u64::from(sel) << 4;
        self.state.rip = ip;
        self.next_rip = ip;
        Ok(())
    }

    /// Protected mode: 32-bit interrupt and trap gates to a handler at the
    /// same privilege level.
    fn deliver_pm32(
        &mut self,
        vector: u8,
        error: Option<u32>,
        return_rip: u64,
        kind: EventKind,
    ) -> Flow {
        let ext = u32::from(kind != EventKind::Software);
        let idt_err = Some(u32::from(vector) * 8 + 2 + ext);
        let idt = self.state.idt;
        let off = u64::from(vector) * 8;
        if off + 7 > u64::from(idt.limit) {
            return Err(exc(GP, idt_err));
        }
        let lo = self.read_sys_u64(idt.base.wrapping_add(off) & 0xffff_ffff)?;
        let gate_type = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        if gate_type != 0xe && gate_type != 0xf {
            return Err(exc(GP, idt_err));
        }
        let cpl = self.state.cpl();
        if kind == EventKind::Software && dpl < cpl {
            return Err(exc(GP, idt_err));
        }
        if (lo >> 47) & 1 == 0 {
            return Err(exc(NP, idt_err));
        }
        let selector = ((lo >> 16) & 0xffff) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        let mut cs = self.code_segment(selector, GP)?;
        let new_cpl = if cs.type_ & 4 != 0 { cpl } else { cs.dpl };
        if new_cpl != cpl {
            return Err(Trap::Internal(format!(
                "32-bit protected-mode delivery of vector {vector} to another privilege level is not emulated"
            )
            .into()));
        }
        let sp = self.state.gpr[4];
        let mut pushed = self
            .push(4, self.state.rflags)
            .and_then(|()| self.push(4, u64::from(self.state.seg(SegReg::Cs).selector)))
            .and_then(|()| self.push(4, return_rip));
        if let Some(code) = error.filter(|_| has_error_code(vector) && kind != EventKind::Software)
        {
            pushed = pushed.and_then(|()| self.push(4, u64::from(code)));
        }
        if let Err(e) = pushed {
            self.state.gpr[4] = sp;
            return Err(e);
        }
        cs.selector = (selector & !3) | u16::from(cpl);
        cs.dpl = cpl;
        self.state.seg[SegReg::Cs as usize] = cs;
        self.state.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if gate_type == 0xe {
            self.state.rflags &= !rflags::IF;
        }
        self.state.rip = target;
        self.next_rip = target;
        Ok(())
    }

    /// Deliver one event through the IDT (IA-32e mode, 16-byte gates).
    fn deliver64(
        &mut self,
        vector: u8,
        error: Option<u32>,
        return_rip: u64,
        kind: EventKind,
    ) -> Flow {
        let ext = u32::from(kind != EventKind::Software);
        let idt_err = Some(u32::from(vector) * 8 + 2 + ext);
        let idt = self.state.idt;
        let off = u64::from(vector) * 16;
        if off + 15 > u64::from(idt.limit) {
            return Err(exc(GP, idt_err));
        }
        let lo = self.read_sys_u64(idt.base.wrapping_add(off))?;
        let hi = self.read_sys_u64(idt.base.wrapping_add(off + 8))?;
        let gate_type = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = (lo >> 47) & 1 == 1;
        if gate_type != 0xe && gate_type != 0xf {
            return Err(exc(GP, idt_err));
        }
        let cpl = self.state.cpl();
        if kind == EventKind::Software && dpl < cpl {
            return Err(exc(GP, idt_err));
        }
        if !present {
            return Err(exc(NP, idt_err));
        }
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
        let selector = ((lo >> 16) & 0xffff) as u16;
        let ist = (lo >> 32) & 7;
        let mut cs = self.code_segment(selector, GP)?;
        let new_cpl = if cs.type_ & 4 != 0 { cpl } else { cs.dpl };
        if new_cpl > cpl || cs.l == 0 || cs.db != 0 {
            return Err(exc(GP, Some(u32::from(selector & !3))));
        }
        if !is_canonical(target) {
            return Err(exc(GP, Some(0)));
        }
        let old_ss = self.state.seg(SegReg::Ss).selector;
        let old_rsp = self.state.gpr[4];
        let tss = self.state.tr.base;
        let mut rsp = if ist != 0 {
            self.read_sys_u64(tss.wrapping_add(0x24 + 8 * (ist - 1)))?
        } else if new_cpl < cpl {
            self.read_sys_u64(tss.wrapping_add(4 + 8 * u64::from(new_cpl)))?
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let mut frame = [0u64; 6];
        let mut n = 0;
        if let Some(code) = error.filter(|_| has_error_code(vector) && kind != EventKind::Software)
        {
            frame[n] = u64::from(code);
            n += 1;
        }
        frame[n] = return_rip;
        frame[n + 1] = u64::from(self.state.seg(SegReg::Cs).selector);
        frame[n + 2] = self.state.rflags;
        frame[n + 3] = old_rsp;
        frame[n + 4] = u64::from(old_ss);
        n += 5;
        let mut bytes = [0u8; 48];
        for (i, v) in frame[..n].iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let new_rsp = rsp.wrapping_sub(8 * n as u64);
        if !is_canonical(new_rsp) {
            return Err(exc(SS, Some(0)));
        }
        // Write the frame as 16-byte pieces; translate all first so a fault
        // leaves nothing half-written.
        for chunk in (0..n * 8).step_by(16) {
            let la = new_rsp.wrapping_add(chunk as u64);
            // The last piece may be 8 bytes: probe only the bytes written
            // (the page above an odd-sized frame may be read-only, as
            // Linux's TSS is right above its entry stack).
            let last = ((chunk + 16).min(n * 8) - chunk - 1) as u64;
            self.translate(la, crate::mmu::AccessKind::Write, Privilege::Supervisor)?;
            self.translate(
                la.wrapping_add(last),
                crate::mmu::AccessKind::Write,
                Privilege::Supervisor,
            )?;
        }
        for chunk in (0..n * 8).step_by(16) {
            let end = (chunk + 16).min(n * 8);
            let la = new_rsp.wrapping_add(chunk as u64);
            self.write_lin(la, &bytes[chunk..end], Privilege::Supervisor)?;
        }
        cs.selector = (selector & !3) | u16::from(new_cpl);
        cs.dpl = new_cpl;
        if new_cpl != cpl {
            self.state.seg[SegReg::Ss as usize] = null_segment(u16::from(new_cpl), new_cpl);
        }
        self.state.seg[SegReg::Cs as usize] = cs;
        self.state.gpr[4] = new_rsp;
        self.state.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if gate_type == 0xe {
            self.state.rflags &= !rflags::IF;
        }
        self.state.rip = target;
        self.next_rip = target;
        Ok(())
    }
}

/// The hidden state of a segment register loaded with a null selector.
pub(crate) fn null_segment(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        dpl,
        unusable: 1,
        ..Segment::default()
    }
}
