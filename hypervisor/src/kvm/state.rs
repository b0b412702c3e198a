//! Save and restore of KVM vCPUs and of the in-kernel irqchip, PIT and
//! kvmclock, through the backend-neutral structures of [`crate::state`].

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_mp_state, kvm_pic_state,
    kvm_pit_state2, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::state::{
    DebugRegs, FpuFull, IoapicState, PicState, PitChannelState, PitState, PlatformState,
    VcpuEvents, VcpuState,
};
use crate::{HypervisorError, LapicState, MsrEntry, Result};

use super::convert;

fn err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::ioctl(op, e)
}

/// Read every MSR in `indices` that KVM lets us read. KVM_GET_MSRS stops
/// at the first MSR it refuses, so skip that one and go on after it.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<_> = rest
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&chunk).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_GET_MSRS",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut list).map_err(err("KVM_GET_MSRS"))?;
        out.extend(list.as_slice()[..read].iter().map(|e| MsrEntry {
            index: e.index,
            value: e.data,
        }));
        // Skip the refused MSR (if the chunk stopped early).
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

pub fn save_vcpu(id: u32, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(err("KVM_GET_FPU"))?;
    // Not every KVM has XSAVE (or XCRs, or debug register access): fall
    // back to the FXSAVE part and say so in the log.
    let xsave = match fd.get_xsave() {
        Ok(x) => Some(x.region.to_vec()),
        Err(e) => {
            tracing::debug!("KVM_GET_XSAVE: {e}; saving the legacy FPU state only");
            None
        }
    };
    let xcrs = match fd.get_xcrs() {
        Ok(x) => x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
            .iter()
            .map(|x| (x.xcr, x.value))
            .collect(),
        Err(e) => {
            tracing::debug!("KVM_GET_XCRS: {e}");
            Vec::new()
        }
    };
    let debug_regs = fd
        .get_debug_regs()
        .map(|d| DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        })
        .unwrap_or_default();
    let msrs = read_msrs(fd, msr_indices)?;
    let l = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let mut lapic = LapicState::default();
    for (dst, src) in lapic.regs.iter_mut().zip(l.regs.iter()) {
        *dst = *src as u8;
    }
    let e = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
    let mp = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    Ok(VcpuState {
        id,
        regs: convert::regs_from_kvm(&regs),
        sregs: convert::sregs_from_kvm(&sregs),
        interrupt_bitmap: sregs.interrupt_bitmap,
        fpu: FpuFull {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        },
        xsave,
        xcrs,
        debug_regs,
        msrs,
        lapic,
        events: events_from_kvm(&e),
        mp_state: mp.mp_state,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Load `s` in the order KVM needs: MP state, registers, special registers
/// (APIC base before the LAPIC), FPU/XSAVE, XCRs, debug registers, LAPIC,
/// MSRs (the TSC among them: the guest's TSC goes on from the saved value),
/// then the pending events last (they depend on all the rest).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(
                    "vCPU {}: cannot set the TSC to the saved {khz} kHz ({e}); the guest's TSC rate changes",
                    s.id
                );
            }
        }
    }
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&convert::regs_to_kvm(&s.regs))
        .map_err(err("KVM_SET_REGS"))?;
    let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    convert::sregs_to_kvm(&s.sregs, &mut sregs);
    sregs.interrupt_bitmap = s.interrupt_bitmap;
    fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    let fpu = kvm_fpu {
        fpr: s.fpu.fpr,
        fcw: s.fpu.fcw,
        fsw: s.fpu.fsw,
        ftwx: s.fpu.ftwx,
        last_opcode: s.fpu.last_opcode,
        last_ip: s.fpu.last_ip,
        last_dp: s.fpu.last_dp,
        xmm: s.fpu.xmm,
        mxcsr: s.fpu.mxcsr,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
    if let Some(region) = &s.xsave {
        let mut x = kvm_xsave::default();
        if region.len() != x.region.len() {
            return Err(HypervisorError::BadState(format!(
                "vCPU {}: XSAVE area of {} words, KVM's is {}",
                s.id,
                region.len(),
                x.region.len()
            )));
        }
        x.region.copy_from_slice(region);
        // SAFETY: `x` is a whole kvm_xsave (4 KiB region, no dynamically
        // enabled features, so KVM reads nothing past it).
        unsafe { fd.set_xsave(&x) }.map_err(err("KVM_SET_XSAVE"))?;
    }
    if !s.xcrs.is_empty() {
        let mut x = kvm_xcrs::default();
        if s.xcrs.len() > x.xcrs.len() {
            return Err(HypervisorError::BadState(format!(
                "vCPU {}: {} XCRs saved",
                s.id,
                s.xcrs.len()
            )));
        }
        x.nr_xcrs = s.xcrs.len() as u32;
        for (dst, (xcr, value)) in x.xcrs.iter_mut().zip(&s.xcrs) {
            dst.xcr = *xcr;
            dst.value = *value;
        }
        fd.set_xcrs(&x).map_err(err("KVM_SET_XCRS"))?;
    }
    let d = kvm_debugregs {
        db: s.debug_regs.db,
        dr6: s.debug_regs.dr6,
        dr7: s.debug_regs.dr7,
        ..Default::default()
    };
    if let Err(e) = fd.set_debug_regs(&d) {
        tracing::debug!("KVM_SET_DEBUGREGS: {e}");
    }
    let mut l = kvm_bindings::kvm_lapic_state::default();
    for (dst, src) in l.regs.iter_mut().zip(s.lapic.regs.iter()) {
        *dst = *src as _;
    }
    fd.set_lapic(&l).map_err(err("KVM_SET_LAPIC"))?;
    set_msrs(fd, s.id, &s.msrs)?;
    fd.set_vcpu_events(&events_to_kvm(&s.events))
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn set_msrs(fd: &VcpuFd, id: u32, msrs: &[MsrEntry]) -> Result<()> {
    for chunk in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_MSRS",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        let written = fd.set_msrs(&list).map_err(err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let failed = entries.get(written).map(|e| e.index).unwrap_or(0);
            return Err(HypervisorError::BadState(format!(
                "vCPU {id}: KVM refused the saved MSR {failed:#x}"
            )));
        }
    }
    Ok(())
}

fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected != 0,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code != 0,
        exception_pending: e.exception.pending != 0,
        exception_error_code: e.exception.error_code,
        exception_has_payload: e.exception_has_payload != 0,
        exception_payload: e.exception_payload,
        interrupt_injected: e.interrupt.injected != 0,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft != 0,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
        sipi_vector: e.sipi_vector,
        flags: e.flags,
        smi_smm: e.smi.smm != 0,
        smi_pending: e.smi.pending != 0,
        smi_inside_nmi: e.smi.smm_inside_nmi != 0,
        smi_latched_init: e.smi.latched_init,
        triple_fault_pending: e.triple_fault.pending != 0,
    }
}

fn events_to_kvm(s: &VcpuEvents) -> kvm_vcpu_events {
    let mut e = kvm_vcpu_events::default();
    e.exception.injected = s.exception_injected.into();
    e.exception.nr = s.exception_nr;
    e.exception.has_error_code = s.exception_has_error_code.into();
    e.exception.pending = s.exception_pending.into();
    e.exception.error_code = s.exception_error_code;
    e.exception_has_payload = s.exception_has_payload.into();
    e.exception_payload = s.exception_payload;
    e.interrupt.injected = s.interrupt_injected.into();
    e.interrupt.nr = s.interrupt_nr;
    e.interrupt.soft = s.interrupt_soft.into();
    e.interrupt.shadow = s.interrupt_shadow;
    e.nmi.injected = s.nmi_injected.into();
    e.nmi.pending = s.nmi_pending.into();
    e.nmi.masked = s.nmi_masked.into();
    e.sipi_vector = s.sipi_vector;
    e.flags = s.flags;
    e.smi.smm = s.smi_smm.into();
    e.smi.pending = s.smi_pending.into();
    e.smi.smm_inside_nmi = s.smi_inside_nmi.into();
    e.smi.latched_init = s.smi_latched_init;
    e.triple_fault.pending = s.triple_fault_pending.into();
    e
}

fn pic_from_kvm(p: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
        single: 0,
    }
}

fn pic_to_kvm(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save_platform(vm: &VmFd) -> Result<PlatformState> {
    let master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled the union member that matches `chip_id`; every
    // member is plain integers, valid for any bit pattern.
    let (master, slave, io) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let pit = vm.get_pit2().map_err(err("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(err("KVM_GET_CLOCK"))?;
    Ok(PlatformState {
        pic: [pic_from_kvm(&master), pic_from_kvm(&slave)],
        ioapic: IoapicState {
            base_address: io.base_address,
            ioregsel: io.ioregsel,
            id: io.id,
            irr: io.irr,
            // SAFETY: `bits` covers the whole 64-bit entry.
            redirtbl: io.redirtbl.iter().map(|r| unsafe { r.bits }).collect(),
        },
        pit: PitState {
            channels: pit.channels.map(|c| PitChannelState {
                count: c.count,
                latched_count: c.latched_count,
                count_latched: c.count_latched,
                status_latched: c.status_latched,
                status: c.status,
                read_state: c.read_state,
                write_state: c.write_state,
                write_latch: c.write_latch,
                rw_mode: c.rw_mode,
                mode: c.mode,
                bcd: c.bcd,
                gate: c.gate,
            }),
            flags: pit.flags,
        },
        clock_ns: Some(clock.clock),
    })
}

pub fn restore_platform(vm: &VmFd, s: &PlatformState) -> Result<()> {
    for (chip_id, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic[0]),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic[1]),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic_to_kvm(pic);
        vm.set_irqchip(&chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    let mut chip = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: the chip is the IOAPIC, so `ioapic` is the member KVM uses.
    let mut io = unsafe { chip.chip.ioapic };
    if s.ioapic.redirtbl.len() != io.redirtbl.len() {
        return Err(HypervisorError::BadState(format!(
            "IOAPIC with {} pins saved, KVM's has {}",
            s.ioapic.redirtbl.len(),
            io.redirtbl.len()
        )));
    }
    io.base_address = s.ioapic.base_address;
    io.ioregsel = s.ioapic.ioregsel;
    io.id = s.ioapic.id;
    io.irr = s.ioapic.irr;
    for (dst, bits) in io.redirtbl.iter_mut().zip(&s.ioapic.redirtbl) {
        dst.bits = *bits;
    }
    chip.chip.ioapic = io;
    vm.set_irqchip(&chip).map_err(err("KVM_SET_IRQCHIP"))?;
    let mut pit = kvm_pit_state2 {
        flags: s.pit.flags,
        ..Default::default()
    };
    for (dst, c) in pit.channels.iter_mut().zip(&s.pit.channels) {
        dst.count = c.count;
        dst.latched_count = c.latched_count;
        dst.count_latched = c.count_latched;
        dst.status_latched = c.status_latched;
        dst.status = c.status;
        dst.read_state = c.read_state;
        dst.write_state = c.write_state;
        dst.write_latch = c.write_latch;
        dst.rw_mode = c.rw_mode;
        dst.mode = c.mode;
        dst.bcd = c.bcd;
        dst.gate = c.gate;
    }
    vm.set_pit2(&pit).map_err(err("KVM_SET_PIT2"))?;
    if let Some(ns) = s.clock_ns {
        // Without KVM_CLOCK_REALTIME: kvmclock goes on from the saved
        // value, as if the VM had been paused meanwhile.
        let clock = kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    }
    Ok(())
}
