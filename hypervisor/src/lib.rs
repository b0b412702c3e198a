//! Hypervisor backends for vireo.
//!
//! This crate is the lowest layer: it hides KVM (and, later, the software
//! emulator) behind three small traits, [`Hypervisor`] → [`Vm`] → [`Vcpu`].
//! Nothing above this crate issues an ioctl. It must never depend on the VM
//! core, the devices or any front end.

pub mod arch;
pub mod dirty;
pub mod host;
pub mod kvm;
pub mod state;

use std::sync::Arc;

pub use arch::{
    CpuidEntry, FpuState, LapicState, MsrEntry, Regs, Segment, SpecialRegs, TableRegister,
};
pub use state::{PlatformState, VcpuState};
pub use vmm_sys_util::eventfd::EventFd;

/// Errors of a hypervisor backend. Each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("/dev/kvm does not exist — load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) or use the emulator backend (emu), which needs no KVM")]
    KvmMissing,
    #[error("/dev/kvm: permission denied — add your user to the kvm group (`sudo usermod -aG kvm $USER`, then log in again)")]
    KvmPermission,
    #[error("/dev/kvm: {0}")]
    KvmOpen(std::io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("{0} must be called before creating vCPUs or interrupt lines")]
    PlatformMissing(&'static str),
    #[error("KVM lacks the capability {0}, which vireo needs")]
    MissingCapability(&'static str),
    #[error("the {backend} backend cannot {what} yet")]
    Unsupported {
        backend: &'static str,
        what: &'static str,
    },
    #[error("saved state does not fit this VM: {0}")]
    BadState(String),
    #[error("{op}: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl HypervisorError {
    fn ioctl(op: &'static str, err: kvm_ioctls::Error) -> Self {
        HypervisorError::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(err.errno()),
        }
    }
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Which backend a hypervisor is. Saved machines record it (state of one
/// cannot be loaded into the other) under its short name, `"kvm"` or
/// `"emu"`, which is also how logs and `--accel` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Linux KVM (`/dev/kvm`).
    Kvm,
    /// vireo's own x86-64 emulator.
    Emu,
}

impl BackendKind {
    /// The short name: `"kvm"` or `"emu"`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Emu => "emu",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A hypervisor: something that can create VMs.
pub trait Hypervisor: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// A short name for logs and `--accel` ("kvm").
    fn name(&self) -> &'static str {
        self.kind().name()
    }
    /// The largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// The CPUID leaves this backend can present to a guest, before any
    /// per-VM filtering.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// MSR indices the backend can save and restore.
    fn supported_msrs(&self) -> Result<Vec<u32>>;
    /// True when this backend runs guest code so slowly that a compressed
    /// kernel's own decompressor would dominate boot time; vireo then
    /// unpacks a bzImage's payload on the host and boots the vmlinux inside.
    fn prefers_unpacked_kernel(&self) -> bool {
        false
    }
    /// Create an empty VM: map its memory, then call [`Vm::create_platform`].
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
}

/// A VM: guest physical memory, interrupt lines and vCPUs.
pub trait Vm: Send + Sync {
    /// Map `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped and valid for the whole life of the VM.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Create the platform's interrupt controllers and timer. Call it once,
    /// after guest RAM is mapped and before creating vCPUs or interrupt
    /// lines: on KVM every memory slot change made after the irqchip exists
    /// waits for an SRCU grace period (milliseconds of startup time).
    fn create_platform(&self) -> Result<()> {
        Ok(())
    }
    /// Create vCPU `id`. The vCPU with id 0 is the bootstrap processor.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// An edge-triggered interrupt line wired to global system interrupt `gsi`
    /// (ISA IRQs 0-15 are GSIs 0-15 on the IOAPIC and PIC).
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>>;
    /// A level-triggered line on `gsi`, for sources that stay asserted until
    /// the guest clears them (the ACPI SCI). Backends without level lines
    /// fall back to an edge line that pulses when asserted.
    fn level_interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        self.interrupt_line(gsi)
    }
    /// Deliver one message-signalled interrupt (MSI/MSI-X): `address` and
    /// `data` as the guest programmed them into the device (x86: address
    /// 0xFEEx_xxxx names the destination APIC, data the vector and mode).
    fn signal_msi(&self, address: u64, data: u32) -> Result<()>;
    /// Save the interrupt controllers, timer and clock. Call it while
    /// every vCPU is paused.
    fn save_platform(&self) -> Result<PlatformState> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "save its platform state",
        })
    }
    /// Load state saved by [`Vm::save_platform`] (of the same backend kind)
    /// into a VM whose platform exists and whose vCPUs have not run.
    fn restore_platform(&self, _state: &PlatformState) -> Result<()> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "restore its platform state",
        })
    }
    /// Have guest writes (any size, any value) to MMIO address `addr`
    /// signal `evt` inside the hypervisor, without a vCPU exit to the VMM.
    /// Returns false when the backend has no such fast path; the write then
    /// arrives as an ordinary MMIO exit.
    fn register_mmio_event(&self, _addr: u64, _evt: &EventFd) -> Result<bool> {
        Ok(false)
    }
    /// Undo [`Vm::register_mmio_event`].
    fn unregister_mmio_event(&self, _addr: u64, _evt: &EventFd) -> Result<()> {
        Ok(())
    }
    /// Start tracking guest writes to every mapped slot (writes made by
    /// the vCPUs; devices writing through vm-memory are tracked by the
    /// VMM's own bitmap). The first [`Vm::dirty_log`] after this reports
    /// what was written since.
    fn start_dirty_log(&self) -> Result<()> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "track dirty pages",
        })
    }
    /// Stop tracking (the guest runs at full speed again).
    fn stop_dirty_log(&self) -> Result<()> {
        Ok(())
    }
    /// The pages of memory slot `slot` written since the last call (or
    /// since [`Vm::start_dirty_log`]), as a bitmap in the layout of
    /// [`dirty`], and clear them.
    fn dirty_log(&self, _slot: u32) -> Result<Vec<u64>> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "track dirty pages",
        })
    }
    /// True when [`Vm::dirty_log`] is only complete if every vCPU is
    /// paused and [`Vcpu::sync_dirty_log`] was called on it first (the
    /// emulator: a vCPU keeps host pointers to pages it writes).
    fn dirty_log_needs_vcpu_sync(&self) -> bool {
        false
    }
}

/// An interrupt line a device can pulse.
pub trait InterruptLine: Send + Sync {
    /// Pulse the line (edge).
    fn trigger(&self) -> std::io::Result<()>;
    /// Hold the line asserted (`true`) or deasserted. An edge line pulses
    /// on assert.
    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        if asserted {
            self.trigger()
        } else {
            Ok(())
        }
    }
    /// The eventfd behind the line, for device models (vm-superio) that
    /// want one.
    fn eventfd(&self) -> std::io::Result<EventFd>;
}

/// What stopped a vCPU. I/O and MMIO exits borrow the data buffer of the
/// exit: a read must be answered by filling it before the next `run`.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// The vCPU halted and the backend has no interrupt controller to wait on.
    Halt,
    /// Triple fault or other shutdown condition.
    Shutdown,
    /// The guest asked for a system reset (e.g. PSCI or a KVM system event).
    Reset,
    /// The guest asked to be powered off.
    PowerOff,
    /// A signal interrupted the run; the caller should check for pause/stop.
    Interrupted,
    /// The backend could not run or enter the guest.
    InternalError(String),
    /// An exit the backend does not model; logged and ignored by the caller.
    Unknown(String),
}

/// One virtual CPU. Owned by exactly one thread at a time.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Whether running this vCPU writes and executes host machine code (a
    /// translator's code arena): its thread then needs executable
    /// mappings, which other vCPU threads' seccomp filters refuse.
    fn generates_host_code(&self) -> bool {
        false
    }
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    fn special_regs(&self) -> Result<SpecialRegs>;
    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    fn lapic(&self) -> Result<LapicState>;
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Finish an instruction that waits for data the VMM already supplied
    /// (an `IN` or MMIO read just answered), without running any further
    /// guest code, so that the saved state is consistent. Returns an exit
    /// to dispatch before calling again (a string instruction may need
    /// more), or `None` when nothing is left pending.
    fn complete_pending_io(&mut self) -> Result<Option<VcpuExit<'_>>> {
        Ok(None)
    }
    /// Save the whole vCPU (see [`VcpuState`]), reading the MSRs in
    /// `msr_indices` that the backend has. Call it on a paused vCPU after
    /// [`Vcpu::complete_pending_io`].
    fn save_state(&self, _msr_indices: &[u32]) -> Result<VcpuState> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "save vCPU state",
        })
    }
    /// Make the vCPU's writes so far visible to [`Vm::dirty_log`] and
    /// have its next write to each page recorded again. Called on a paused
    /// vCPU when [`Vm::dirty_log_needs_vcpu_sync`] says so.
    fn sync_dirty_log(&mut self) -> Result<()> {
        Ok(())
    }
    /// Load a state saved by [`Vcpu::save_state`] into a vCPU whose CPUID
    /// is already set and that has not run.
    fn restore_state(&self, _state: &VcpuState) -> Result<()> {
        Err(HypervisorError::Unsupported {
            backend: "this",
            what: "restore vCPU state",
        })
    }
}
