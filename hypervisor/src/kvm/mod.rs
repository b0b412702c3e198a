//! The KVM backend: `/dev/kvm` through the rust-vmm `kvm-ioctls` crate, with
//! the in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT.

mod convert;
mod state;

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    CpuidEntry, FpuState, Hypervisor, HypervisorError, InterruptLine, LapicState, MsrEntry,
    PlatformState, Regs, Result, SpecialRegs, Vcpu, VcpuExit, VcpuState, Vm,
};

/// Where KVM's VMX backend puts its three-page TSS and the identity-map page:
/// just below the IOAPIC/LAPIC window, inside the 32-bit MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// KVM as a [`Hypervisor`].
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Open `/dev/kvm`, turning the usual failures into errors that say how
    /// to fix them.
    pub fn new() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => HypervisorError::KvmMissing,
                std::io::ErrorKind::PermissionDenied => HypervisorError::KvmPermission,
                _ => HypervisorError::KvmOpen(e),
            })?;
        // SAFETY: the descriptor was just opened on /dev/kvm and its ownership
        // moves into the Kvm object, which closes it on drop.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(HypervisorError::KvmApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> crate::BackendKind {
        crate::BackendKind::Kvm
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| {
                let mut e = convert::cpuid_from_kvm(e);
                // KVM emulates the TSC-deadline timer in its in-kernel LAPIC
                // but leaves the bit for the VMM to set.
                if e.function == 1 && tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                e
            })
            .collect())
    }

    fn supported_msrs(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_MSR_INDEX_LIST", e))?;
        Ok(list.as_slice().to_vec())
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VM", e))?;
        // Intel VMX needs these pages to run real-mode code; other backends
        // (AMD SVM, PVM) may refuse them, which is harmless.
        if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR not accepted: {e}");
        }
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR not accepted: {e}");
        }
        Ok(Arc::new(KvmVm {
            fd: Arc::new(fd),
            platform: OnceLock::new(),
            slots: std::sync::Mutex::new(Vec::new()),
        }))
    }
}

/// A KVM VM file descriptor.
pub struct KvmVm {
    fd: Arc<VmFd>,
    /// Set once the in-kernel irqchip and PIT exist.
    platform: OnceLock<()>,
    /// Every memory slot as mapped (flags updated when dirty logging is
    /// turned on or off).
    slots: std::sync::Mutex<Vec<kvm_userspace_memory_region>>,
}

impl KvmVm {
    /// Re-register every slot with `flags` (KVM allows changing
    /// KVM_MEM_LOG_DIRTY_PAGES on a live slot).
    fn set_slot_flags(&self, flags: u32) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for region in slots.iter_mut() {
            let mut r = *region;
            r.flags = flags;
            // SAFETY: the same host range as registered by `map_memory`,
            // whose caller guaranteed it outlives the VM.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|e| {
                HypervisorError::ioctl("KVM_SET_USER_MEMORY_REGION (dirty logging)", e)
            })?;
            *region = r;
        }
        Ok(())
    }
}

impl KvmVm {
    fn require_platform(&self) -> Result<()> {
        self.platform
            .get()
            .copied()
            .ok_or(HypervisorError::PlatformMissing("Vm::create_platform"))
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range stays valid for the
        // life of the VM (see the trait's contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|r| r.slot != slot);
        slots.push(region);
        Ok(())
    }

    fn start_dirty_log(&self) -> Result<()> {
        self.set_slot_flags(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)?;
        // Clear what the kernel may report for the time before.
        let slots: Vec<u32> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.iter().map(|r| r.slot).collect()
        };
        for slot in slots {
            self.dirty_log(slot)?;
        }
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<()> {
        self.set_slot_flags(0)
    }

    fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let size = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .find(|r| r.slot == slot)
                .map(|r| r.memory_size)
                .ok_or(HypervisorError::BadState(format!("no memory slot {slot}")))?
        };
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_DIRTY_LOG", e))
    }

    fn create_platform(&self) -> Result<()> {
        if self.platform.get().is_some() {
            return Ok(());
        }
        self.fd
            .create_irq_chip()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_PIT2", e))?;
        let _ = self.platform.set(());
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        self.require_platform()?;
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            immediate_exit: false,
        }))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        self.require_platform()?;
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| HypervisorError::Ioctl {
            op: "eventfd",
            source: e,
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| HypervisorError::ioctl("KVM_IRQFD", e))?;
        Ok(Arc::new(IrqFdLine { evt }))
    }

    fn level_interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        self.require_platform()?;
        Ok(Arc::new(IrqLevelLine {
            vm: Arc::clone(&self.fd),
            gsi,
        }))
    }

    fn register_mmio_event(&self, addr: u64, evt: &EventFd) -> Result<bool> {
        // No datamatch: a zero-length MMIO ioeventfd (KVM's fast MMIO path)
        // matches writes of any size.
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| HypervisorError::ioctl("KVM_IOEVENTFD", e))?;
        Ok(true)
    }

    fn unregister_mmio_event(&self, addr: u64, evt: &EventFd) -> Result<()> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| HypervisorError::ioctl("KVM_IOEVENTFD deassign", e))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.require_platform()?;
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // Ok(0) means the guest blocked the message (e.g. a masked LAPIC
        // vector): not an error of the VMM.
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| HypervisorError::ioctl("KVM_SIGNAL_MSI", e))
    }

    fn save_platform(&self) -> Result<PlatformState> {
        self.require_platform()?;
        state::save_platform(&self.fd)
    }

    fn restore_platform(&self, s: &PlatformState) -> Result<()> {
        self.require_platform()?;
        state::restore_platform(&self.fd, s)
    }
}

/// A level-triggered line driven with KVM_IRQ_LINE.
struct IrqLevelLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl InterruptLine for IrqLevelLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.vm
            .set_irq_line(self.gsi, asserted)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn eventfd(&self) -> std::io::Result<EventFd> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a level-triggered line has no eventfd",
        ))
    }
}

/// An interrupt line backed by a KVM irqfd: a write to the eventfd pulses the GSI.
struct IrqFdLine {
    evt: EventFd,
}

impl InterruptLine for IrqFdLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }

    fn eventfd(&self) -> std::io::Result<EventFd> {
        self.evt.try_clone()
    }
}

/// A KVM vCPU file descriptor.
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// `immediate_exit` is set in the run structure (see
    /// [`Vcpu::complete_pending_io`]).
    immediate_exit: bool,
}

impl KvmVcpu {
    fn run_raw(&mut self) -> Result<VcpuExit<'_>> {
        use kvm_ioctls::VcpuExit as K;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                K::IoIn(port, data) => VcpuExit::IoIn(port, data),
                K::IoOut(port, data) => VcpuExit::IoOut(port, data),
                K::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
                K::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
                K::Hlt => VcpuExit::Halt,
                K::Shutdown => VcpuExit::Shutdown,
                K::Intr => VcpuExit::Interrupted,
                K::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => VcpuExit::InternalError("guest crash event".into()),
                    other => VcpuExit::Unknown(format!("system event {other}")),
                },
                K::FailEntry(reason, cpu) => VcpuExit::InternalError(format!(
                    "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                )),
                K::InternalError => {
                    VcpuExit::InternalError("KVM internal error (emulation failure)".into())
                }
                other => VcpuExit::Unknown(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::ioctl("KVM_RUN", e)),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.immediate_exit {
            self.fd.set_kvm_immediate_exit(0);
            self.immediate_exit = false;
        }
        self.run_raw()
    }

    fn complete_pending_io(&mut self) -> Result<Option<VcpuExit<'_>>> {
        // KVM finishes an I/O or MMIO exit only on the next KVM_RUN; with
        // immediate_exit set it does that and returns EINTR before running
        // any guest instruction (Documentation/virt/kvm/api.rst, KVM_RUN).
        // The next ordinary `run` clears the flag.
        self.fd.set_kvm_immediate_exit(1);
        self.immediate_exit = true;
        match self.run_raw()? {
            VcpuExit::Interrupted => Ok(None),
            other => Ok(Some(other)),
        }
    }

    fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState> {
        state::save_vcpu(self.id, &self.fd, msr_indices)
    }

    fn restore_state(&self, s: &VcpuState) -> Result<()> {
        state::restore_vcpu(&self.fd, s)
    }

    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_REGS", e))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_REGS", e))
    }

    fn special_regs(&self) -> Result<SpecialRegs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()> {
        // Start from the current state so fields we do not model (the
        // interrupt bitmap) keep their values.
        let mut s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e))?;
        convert::sregs_to_kvm(sregs, &mut s);
        self.fd
            .set_sregs(&s)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_SREGS", e))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let f = kvm_bindings::kvm_fpu {
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd
            .set_fpu(&f)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_FPU", e))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CPUID2", e))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<_> = msrs
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
        let written = self
            .fd
            .set_msrs(&list)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_MSRS", e))?;
        if written != entries.len() {
            let failed = entries.get(written).map(|e| e.index).unwrap_or(0);
            return Err(HypervisorError::Ioctl {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!(
                    "KVM refused MSR {failed:#x} ({written} of {} written)",
                    entries.len()
                )),
            });
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_GET_MSRS",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        let read = self
            .fd
            .get_msrs(&mut list)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_MSRS", e))?;
        Ok(list.as_slice()[..read]
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                value: e.data,
            })
            .collect())
    }

    fn lapic(&self) -> Result<LapicState> {
        let l = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_LAPIC", e))?;
        let mut state = LapicState::default();
        for (dst, src) in state.regs.iter_mut().zip(l.regs.iter()) {
            *dst = *src as u8;
        }
        Ok(state)
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        let mut l = kvm_bindings::kvm_lapic_state::default();
        for (dst, src) in l.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = *src as _;
        }
        self.fd
            .set_lapic(&l)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_LAPIC", e))
    }
}
