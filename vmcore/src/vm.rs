//! A VM from configuration to exit: guest memory, vCPUs, boot, the buses, and
//! the threads that run it.

use std::sync::Arc;

use std::sync::Mutex;

use vireo_api::units::MemorySize;
use vireo_api::vm::{check_resources, HostLimits, LimitError};
use vireo_hypervisor::{BackendKind, CpuidEntry, Hypervisor, HypervisorError, InterruptLine};

use crate::boot::{self, BootError, BootInfo, BootSpec};
use crate::bus::{Bus, BusError, SharedDevice};
use crate::control::{ExitReason, StateError, VmControl};
use crate::memory::{self, GuestMemory, MemoryError, RamLayout};
use crate::snapshot::device::DeviceList;
use crate::snapshot::{MachineConfig, SnapshotError, VmSnapshot};
use crate::vcpu::{self, Buses, SharedVcpu, VcpuStats, VcpuThread};

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory: MemorySize,
    pub boot: BootSpec,
}

/// Errors creating or running a VM. [`VmError::is_user_error`] tells the
/// configuration mistakes (the user can fix them) from VMM failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The vCPU count or memory size is outside vireo's, the backend's
    /// or the host's limits.
    #[error("{source} (on {backend})")]
    Limit {
        source: LimitError,
        backend: &'static str,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot start vCPU threads: {0}")]
    Thread(std::io::Error),
}

impl VmError {
    pub fn is_user_error(&self) -> bool {
        match self {
            VmError::Limit { .. } => true,
            VmError::Boot(e) => !matches!(e, BootError::Vcpu(_)),
            VmError::Hypervisor(e) => matches!(
                e,
                HypervisorError::KvmMissing | HypervisorError::KvmPermission
            ),
            _ => false,
        }
    }
}

/// Check the vCPU count and memory size before anything is allocated:
/// the one check every definition passes (`vireo_api::vm`), against this
/// backend's and this host's limits.
pub fn validate(hv: &dyn Hypervisor, cfg: &VmConfig) -> Result<(), VmError> {
    let limits = HostLimits::new(hv.max_vcpus() as u32, vireo_api::host::memory());
    check_resources(cfg.vcpus, cfg.memory, limits).map_err(|source| VmError::Limit {
        source,
        backend: hv.name(),
    })
}

/// A VM that is set up and booted into memory but not yet running: the
/// place to attach devices.
pub struct Vm {
    hv_vm: Arc<dyn vireo_hypervisor::Vm>,
    memory: GuestMemory,
    vcpus: Vec<SharedVcpu>,
    io_bus: Bus,
    mmio_bus: Bus,
    control: Arc<VmControl>,
    stats: Arc<VcpuStats>,
    /// None for a VM restored from a snapshot (nothing was booted).
    boot: Option<BootInfo>,
    saved: SaveInfo,
}

/// What a snapshot of this VM needs beyond its live state.
#[derive(Clone)]
struct SaveInfo {
    backend: BackendKind,
    vcpus: u32,
    ram: RamLayout,
    cpuid: Vec<Vec<CpuidEntry>>,
    msr_indices: Vec<u32>,
}

impl Vm {
    pub fn new(hv: &dyn Hypervisor, cfg: &VmConfig) -> Result<Vm, VmError> {
        validate(hv, cfg)?;
        let ram = RamLayout::new(cfg.memory);
        let memory = memory::create_guest_memory(&ram)?;
        let boot = boot::prepare(
            &memory,
            &ram,
            &BootSpec {
                vcpus: cfg.vcpus,
                ..cfg.boot.clone()
            },
            hv.prefers_unpacked_kernel(),
        )?;
        let hv_vm = hv.create_vm()?;
        for (slot, (guest, size, host)) in memory::host_mappings(&memory).into_iter().enumerate() {
            // SAFETY: the mapping belongs to `memory`, which this Vm owns and
            // keeps alive for as long as the hypervisor VM and its vCPUs.
            unsafe { hv_vm.map_memory(slot as u32, guest, size, host)? };
        }
        // After the memory: see `create_platform` on why the order matters.
        hv_vm.create_platform()?;
        let supported_cpuid = hv.supported_cpuid()?;
        let msrs = boot::cpu::boot_msrs(&hv.supported_msrs()?);
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        let mut cpuids = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..cfg.vcpus {
            let vcpu = hv_vm.create_vcpu(id)?;
            let cpuid = boot::cpuid::guest_cpuid(&supported_cpuid, id, cfg.vcpus);
            vcpu.set_cpuid(&cpuid)?;
            cpuids.push(cpuid);
            boot::cpu::setup_common(vcpu.as_ref(), &msrs)?;
            if id == 0 {
                boot::cpu::setup_bsp(vcpu.as_ref(), boot.entry)?;
            }
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        Ok(Vm {
            hv_vm,
            memory,
            vcpus,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            control: Arc::new(VmControl::default()),
            stats: Arc::new(VcpuStats::new(cfg.vcpus as usize)),
            boot: Some(boot),
            saved: SaveInfo {
                backend: hv.kind(),
                vcpus: cfg.vcpus,
                ram,
                cpuid: cpuids,
                msr_indices: hv.supported_msrs()?,
            },
        })
    }

    /// A VM in the state `snap` saved, over `memory` (from
    /// [`crate::snapshot::LoadedSnapshot::memory`]): platform and vCPUs
    /// restored, devices still to attach and restore.
    pub fn from_snapshot(
        hv: &dyn Hypervisor,
        snap: &VmSnapshot,
        memory: GuestMemory,
    ) -> Result<Vm, VmError> {
        let cfg = &snap.config;
        if cfg.backend != hv.kind() {
            return Err(SnapshotError::Backend {
                saved: cfg.backend,
                running: hv.kind(),
            }
            .into());
        }
        let dummy = VmConfig {
            vcpus: cfg.vcpus,
            memory: cfg.memory,
            boot: BootSpec {
                kernel: Default::default(),
                initrd: None,
                cmdline: String::new(),
                vcpus: cfg.vcpus,
            },
        };
        validate(hv, &dummy)?;
        let hv_vm = hv.create_vm()?;
        for (slot, (guest, size, host)) in memory::host_mappings(&memory).into_iter().enumerate() {
            // SAFETY: as in `Vm::new`: `memory` is owned by this Vm and
            // outlives the hypervisor VM and its vCPUs.
            unsafe { hv_vm.map_memory(slot as u32, guest, size, host)? };
        }
        hv_vm.create_platform()?;
        hv_vm.restore_platform(&snap.platform)?;
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for (state, cpuid) in snap.vcpus.iter().zip(&snap.cpuid) {
            let vcpu = hv_vm.create_vcpu(state.id)?;
            vcpu.set_cpuid(cpuid)?;
            vcpu.restore_state(state)?;
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        Ok(Vm {
            hv_vm,
            memory,
            vcpus,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            control: Arc::new(VmControl::default()),
            stats: Arc::new(VcpuStats::new(cfg.vcpus as usize)),
            boot: None,
            saved: SaveInfo {
                backend: hv.kind(),
                vcpus: cfg.vcpus,
                ram: cfg.ram_layout(),
                cpuid: snap.cpuid.clone(),
                msr_indices: hv.supported_msrs()?,
            },
        })
    }

    /// How the kernel was booted; None for a VM restored from a snapshot.
    pub fn boot_info(&self) -> Option<&BootInfo> {
        self.boot.as_ref()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Where the guest's RAM is (what the CMOS and the E820 table report).
    pub fn ram_layout(&self) -> RamLayout {
        self.saved.ram
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// The vCPUs' exit counters (live once the VM runs).
    pub fn vcpu_stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// The hypervisor's VM, for devices that signal MSIs.
    pub fn hypervisor_vm(&self) -> Arc<dyn vireo_hypervisor::Vm> {
        self.hv_vm.clone()
    }

    pub fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, VmError> {
        Ok(self.hv_vm.interrupt_line(gsi)?)
    }

    pub fn level_interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, VmError> {
        Ok(self.hv_vm.level_interrupt_line(gsi)?)
    }

    pub fn add_io_device(&mut self, port: u16, len: u16, dev: SharedDevice) -> Result<(), VmError> {
        Ok(self.io_bus.insert(u64::from(port), u64::from(len), dev)?)
    }

    pub fn add_mmio_device(
        &mut self,
        addr: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        Ok(self.mmio_bus.insert(addr, len, dev)?)
    }

    /// Start one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Thread)?;
        self.control.mark_running()?;
        let buses = Buses {
            io: Arc::new(self.io_bus),
            mmio: Arc::new(self.mmio_bus),
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            match vcpu::spawn(
                v.clone(),
                buses.clone(),
                self.control.clone(),
                self.stats.clone(),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.control.request_exit(ExitReason::Failed(e.to_string()));
                    let running = RunningVm {
                        hv_vm: self.hv_vm,
                        memory: self.memory,
                        vcpus: self.vcpus,
                        threads,
                        control: self.control,
                        saved: self.saved,
                        since_snapshot: Mutex::new(None),
                    };
                    running.stop_and_join();
                    return Err(VmError::Thread(e));
                }
            }
        }
        Ok(RunningVm {
            hv_vm: self.hv_vm,
            memory: self.memory,
            vcpus: self.vcpus,
            threads,
            control: self.control,
            saved: self.saved,
            since_snapshot: Mutex::new(None),
        })
    }
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    // Kept alive until every vCPU thread has been joined.
    hv_vm: Arc<dyn vireo_hypervisor::Vm>,
    memory: GuestMemory,
    vcpus: Vec<SharedVcpu>,
    threads: Vec<VcpuThread>,
    control: Arc<VmControl>,
    saved: SaveInfo,
    /// Pages dirtied since the last snapshot, while snapshots track them
    /// (every [`RunningVm::take_dirty_log`] adds to it, so a migration
    /// attempt in between loses nothing).
    since_snapshot: Mutex<Option<Vec<Vec<u64>>>>,
}

impl RunningVm {
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The machine's configuration (what a target must build before any
    /// state arrives), with `frontend` as in [`RunningVm::capture`].
    pub fn machine_config(&self, frontend: serde_json::Value) -> MachineConfig {
        MachineConfig {
            backend: self.saved.backend,
            vcpus: self.saved.vcpus,
            memory: self.saved.ram.size(),
            frontend,
        }
    }

    /// Capture the state of the paused VM: every vCPU, the platform and
    /// each of `devices` (id, device), with `frontend` (the front end's
    /// description of the machine) recorded in its configuration.
    pub fn capture(
        &self,
        devices: &DeviceList,
        frontend: serde_json::Value,
    ) -> Result<VmSnapshot, VmError> {
        let state = self.control.state();
        if state != crate::RunState::Paused {
            return Err(SnapshotError::NotPaused(state).into());
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(vcpu::lock_vcpu(v).save_state(&self.saved.msr_indices)?);
        }
        let platform = self.hv_vm.save_platform()?;
        let saved = devices.save().map_err(SnapshotError::from)?;
        Ok(VmSnapshot {
            config: MachineConfig {
                backend: self.saved.backend,
                vcpus: self.saved.vcpus,
                memory: self.saved.ram.size(),
                frontend,
            },
            cpuid: self.saved.cpuid.clone(),
            vcpus,
            platform,
            devices: saved,
        })
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// Start dirty page tracking (vCPU writes through the hypervisor's
    /// log, device writes through guest memory's bitmaps). Pages written
    /// before this call are not reported: the caller copies all memory
    /// once after it.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        if self.snapshot_tracking() {
            // Already on for snapshots: set a new baseline only (what is
            // taken also goes to the snapshot accumulator).
            return self.take_dirty_log().map(|_| ());
        }
        self.with_vcpus_synced(|| {
            self.hv_vm.start_dirty_log()?;
            crate::memory::take_device_dirty(&self.memory);
            Ok(())
        })?;
        // Drain what the backend recorded before tracking began.
        self.take_dirty_log().map(|_| ())
    }

    /// Stop dirty page tracking.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        if self.snapshot_tracking() {
            // Diff snapshots still need it.
            return Ok(());
        }
        Ok(self.hv_vm.stop_dirty_log()?)
    }

    fn snapshot_tracking(&self) -> bool {
        self.since_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// A snapshot of all memory was just written: from now on, track the
    /// pages written for the next diff snapshot (see
    /// [`RunningVm::take_snapshot_dirty`]).
    pub fn mark_snapshot_base(&self) -> Result<(), VmError> {
        if !self.snapshot_tracking() {
            self.start_dirty_log()?;
        } else {
            self.take_dirty_log()?;
        }
        let empty = memory::host_mappings(&self.memory)
            .iter()
            .map(|(_, size, _)| vec![0u64; vireo_hypervisor::dirty::bitmap_words(*size)])
            .collect();
        *self
            .since_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(empty);
        Ok(())
    }

    /// The pages written since the last snapshot (full or diff), per
    /// region, and start counting again; None when no snapshot was taken
    /// by this process (a diff then has no base).
    pub fn take_snapshot_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, VmError> {
        if !self.snapshot_tracking() {
            return Ok(None);
        }
        self.take_dirty_log()?;
        let mut acc = self
            .since_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(acc.as_mut().map(|bits| {
            bits.iter_mut()
                .map(|b| std::mem::replace(b, vec![0; b.len()]))
                .collect()
        }))
    }

    /// Stop tracking for snapshots (a diff snapshot failed half-way: the
    /// next one must be full).
    pub fn forget_snapshot_base(&self) {
        *self
            .since_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = self.hv_vm.stop_dirty_log() {
            tracing::warn!("stopping dirty page tracking: {e}");
        }
    }

    /// The pages written since [`RunningVm::start_dirty_log`] or the last
    /// call, per memory region (in [`GuestMemory`] order), as bitmaps of
    /// [`vireo_hypervisor::dirty`]'s layout; cleared. Works on a running
    /// VM (backends that need it are paused for the moment of the take)
    /// and on a paused one (which stays paused).
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut out = Vec::new();
        self.with_vcpus_synced(|| {
            for slot in 0..memory::host_mappings(&self.memory).len() {
                out.push(self.hv_vm.dirty_log(slot as u32)?);
            }
            Ok(())
        })?;
        for (bits, dev) in out
            .iter_mut()
            .zip(crate::memory::take_device_dirty(&self.memory))
        {
            vireo_hypervisor::dirty::merge(bits, &dev);
        }
        if let Some(acc) = self
            .since_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            for (a, b) in acc.iter_mut().zip(&out) {
                vireo_hypervisor::dirty::merge(a, b);
            }
        }
        Ok(out)
    }

    /// Run `f` at a moment when every vCPU has made its writes visible to
    /// the dirty log (see [`vireo_hypervisor::Vm::dirty_log_needs_vcpu_sync`]):
    /// for backends that need it, a running VM is paused around it.
    fn with_vcpus_synced(
        &self,
        f: impl FnOnce() -> Result<(), HypervisorError>,
    ) -> Result<(), VmError> {
        if !self.hv_vm.dirty_log_needs_vcpu_sync() {
            return Ok(f()?);
        }
        let pause = self.control.state() == crate::RunState::Running;
        if pause {
            self.pause()?;
        }
        let mut result = Ok(());
        for v in &self.vcpus {
            if let Err(e) = vcpu::lock_vcpu(v).sync_dirty_log() {
                result = Err(e);
            }
        }
        let result = result.and_then(|()| f());
        if pause {
            self.resume()?;
        }
        Ok(result?)
    }

    fn kick_all(&self) {
        for t in &self.threads {
            t.kick();
        }
    }

    /// Stop every vCPU at its next exit and keep it out of the guest.
    pub fn pause(&self) -> Result<(), VmError> {
        Ok(self
            .control
            .pause(self.threads.len(), &|| self.kick_all())?)
    }

    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.control.resume()?)
    }

    /// Wait for the guest (or a device, or a failure) to end the VM, then
    /// stop and join every vCPU thread.
    pub fn wait(self) -> ExitReason {
        let reason = self.control.wait_exit();
        self.stop_and_join();
        reason
    }

    /// End the VM now.
    pub fn stop(self) -> ExitReason {
        self.control.request_exit(ExitReason::Stopped);
        self.wait()
    }

    fn stop_and_join(self) {
        // Threads blocked in the guest (e.g. halted) only leave on a kick;
        // keep kicking until each one has finished.
        for t in self.threads {
            while !t.is_finished() {
                t.kick();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;
    use vireo_hypervisor::kvm::KvmHypervisor;
    use vireo_testkit::kernel::elf_vmlinux;
    use vireo_testkit::TempDir;

    struct Counter(Arc<AtomicU64>);
    impl BusDevice for Counter {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: &[u8]) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn kvm() -> Option<KvmHypervisor> {
        match KvmHypervisor::new() {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("skipping: KVM is not usable here ({e})");
                None
            }
        }
    }

    /// A guest that writes port 0x500 forever: `mov dx, 0x500; l: out dx, al; jmp l`.
    fn spinning_guest(dir: &TempDir) -> std::path::PathBuf {
        let code = [0x66, 0xba, 0x00, 0x05, 0xee, 0xeb, 0xfd];
        dir.write("spin.elf", &elf_vmlinux(0x10_0000, &code))
    }

    #[test]
    fn pause_stops_every_vcpu_and_resume_continues_on_kvm() {
        let Some(kvm) = kvm() else { return };
        pause_and_resume(&kvm);
    }

    #[test]
    fn pause_stops_every_vcpu_and_resume_continues_on_the_emulator() {
        pause_and_resume(&vireo_emulator::EmuHypervisor::new());
    }

    fn pause_and_resume(hv: &dyn Hypervisor) {
        let dir = TempDir::new("vm-spin");
        let kernel = spinning_guest(&dir);
        let cfg = VmConfig {
            vcpus: 2,
            memory: MemorySize::mib_const(32),
            boot: BootSpec {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: String::new(),
                vcpus: 2,
            },
        };
        let mut vm = Vm::new(hv, &cfg).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        vm.add_io_device(0x500, 1, Arc::new(Mutex::new(Counter(count.clone()))))
            .unwrap();
        let stats = vm.vcpu_stats();
        let running = vm.start().unwrap();
        let wait_for_progress = |from: u64| {
            for _ in 0..2000 {
                if count.load(Ordering::SeqCst) > from + 10 {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        };
        assert!(wait_for_progress(0), "guest never wrote its port");
        let exits = stats.exits();
        assert_eq!(exits.len(), 2);
        assert!(
            exits.iter().sum::<u64>() > 0,
            "port writes are exits, but none was counted: {exits:?}"
        );

        running.pause().unwrap();
        assert_eq!(running.control().state(), crate::RunState::Paused);
        let frozen = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            count.load(Ordering::SeqCst),
            frozen,
            "a vCPU ran while paused"
        );
        assert!(running.pause().is_err(), "double pause is refused");

        running.resume().unwrap();
        assert!(
            wait_for_progress(frozen),
            "guest did not continue after resume"
        );
        assert_eq!(running.stop(), ExitReason::Stopped);
    }

    /// A guest write to an address registered as an MMIO event signals the
    /// eventfd inside KVM and never reaches the MMIO bus.
    #[test]
    fn mmio_events_signal_without_an_exit_on_kvm() {
        let Some(kvm) = kvm() else { return };
        // mov eax, 0xd0003000; mov word [rax], 1; jmp $
        let code = [
            0xb8, 0x00, 0x30, 0x00, 0xd0, 0x66, 0xc7, 0x00, 0x01, 0x00, 0xeb, 0xfe,
        ];
        let dir = TempDir::new("vm-ioevent");
        let kernel = dir.write("ioevent.elf", &elf_vmlinux(0x10_0000, &code));
        let cfg = VmConfig {
            vcpus: 1,
            memory: MemorySize::mib_const(32),
            boot: BootSpec {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: String::new(),
                vcpus: 1,
            },
        };
        let mut vm = Vm::new(&kvm, &cfg).unwrap();
        let exits = Arc::new(AtomicU64::new(0));
        vm.add_mmio_device(
            0xd000_0000,
            0x1_0000,
            Arc::new(Mutex::new(Counter(exits.clone()))),
        )
        .unwrap();
        let evt = vireo_hypervisor::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(vm
            .hypervisor_vm()
            .register_mmio_event(0xd000_3000, &evt)
            .unwrap());
        let running = vm.start().unwrap();
        let mut signalled = false;
        for _ in 0..2000 {
            if evt.read().is_ok() {
                signalled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(running.stop(), ExitReason::Stopped);
        assert!(signalled, "the eventfd was not signalled");
        assert_eq!(
            exits.load(Ordering::SeqCst),
            0,
            "the write reached the MMIO bus"
        );
    }

    /// A guest that increments the dword at 0x20_0000 forever; the page
    /// shows up in the dirty log each round, a page nobody writes does
    /// not, and a device write through guest memory does.
    fn dirty_log_sees_guest_and_device_writes(hv: &dyn Hypervisor) {
        use vm_memory::{Bytes, GuestAddress};
        // mov eax, 0x200000; l: inc dword [eax]; jmp l
        let code = [0xb8, 0x00, 0x00, 0x20, 0x00, 0xff, 0x00, 0xeb, 0xfc];
        let dir = TempDir::new("vm-dirty");
        let kernel = dir.write("dirty.elf", &elf_vmlinux(0x10_0000, &code));
        let cfg = VmConfig {
            vcpus: 1,
            memory: MemorySize::mib_const(32),
            boot: BootSpec {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: String::new(),
                vcpus: 1,
            },
        };
        let vm = Vm::new(hv, &cfg).unwrap();
        let running = vm.start().unwrap();
        running.start_dirty_log().unwrap();
        let page_set =
            |bits: &[u64], page: u64| bits[(page / 64) as usize] & (1 << (page % 64)) != 0;
        for round in 0..3 {
            let mut seen = false;
            for _ in 0..2000 {
                let log = running.take_dirty_log().unwrap();
                assert!(
                    !page_set(&log[0], 0x300),
                    "round {round}: a page nobody writes is dirty"
                );
                if page_set(&log[0], 0x200) {
                    seen = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                seen,
                "round {round}: the guest's page never showed up dirty"
            );
        }
        running
            .memory()
            .write_obj(7u32, GuestAddress(0x30_0000))
            .unwrap();
        let log = running.take_dirty_log().unwrap();
        assert!(page_set(&log[0], 0x300), "a device write was not logged");
        // Paused: the guest writes nothing, so after one take nothing is dirty.
        running.pause().unwrap();
        running.take_dirty_log().unwrap();
        let log = running.take_dirty_log().unwrap();
        assert_eq!(
            vireo_hypervisor::dirty::count(&log[0]),
            0,
            "dirty while paused"
        );
        assert_eq!(running.control().state(), crate::RunState::Paused);
        running.resume().unwrap();
        running.stop_dirty_log().unwrap();
        assert_eq!(running.stop(), ExitReason::Stopped);
    }

    #[test]
    fn dirty_log_on_the_emulator() {
        dirty_log_sees_guest_and_device_writes(&vireo_emulator::EmuHypervisor::new());
    }

    #[test]
    fn dirty_log_on_kvm() {
        let Some(kvm) = kvm() else { return };
        dirty_log_sees_guest_and_device_writes(&kvm);
    }

    #[test]
    fn bad_vcpu_and_memory_values_are_user_errors() {
        let Some(kvm) = kvm() else { return };
        let spec = BootSpec {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
        };
        for (vcpus, mib) in [(0, 64), (100_000, 64), (1, 1), (1, u64::MAX >> 21)] {
            let cfg = VmConfig {
                vcpus,
                memory: MemorySize::from_mib(mib).unwrap(),
                boot: spec.clone(),
            };
            let e = Vm::new(&kvm, &cfg).err().expect("refused");
            assert!(e.is_user_error(), "{e}");
        }
    }
}
