//! The emulator as a complete backend: [`EmuHypervisor`] → [`EmuVm`] →
//! [`EmuVcpu`], with guest memory shared by all vCPUs and the software
//! platform ([`crate::platform`]) behind `interrupt_line`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use vireo_hypervisor::dirty::DirtyBitmap;

use vireo_hypervisor::{
    CpuidEntry, EventFd, Hypervisor, HypervisorError, InterruptLine, Result, Vcpu, Vm,
};

use crate::cpu::state::msr;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::platform::{CpuLink, Platform};
use crate::{Cpu, EmuVcpu};

/// vCPUs per VM.
pub const MAX_VCPUS: usize = 64;
/// RAM regions per VM.
const MAX_REGIONS: usize = 32;

fn error(op: &'static str, what: String) -> HypervisorError {
    HypervisorError::Ioctl {
        op,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
    }
}

/// The software emulator as a [`Hypervisor`] (`--accel emu`).
#[derive(Debug, Default, Clone, Copy)]
pub struct EmuHypervisor;

impl EmuHypervisor {
    pub fn new() -> Self {
        EmuHypervisor
    }
}

/// MSRs `set_msrs`/`msrs` handle.
pub const SUPPORTED_MSRS: [u32; 19] = [
    msr::TSC,
    msr::TSC_ADJUST,
    msr::APIC_BASE,
    msr::SYSENTER_CS,
    msr::SYSENTER_ESP,
    msr::SYSENTER_EIP,
    msr::MISC_ENABLE,
    msr::PAT,
    msr::MTRR_DEF_TYPE,
    msr::TSC_DEADLINE,
    msr::EFER,
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::FS_BASE,
    msr::GS_BASE,
    msr::KERNEL_GS_BASE,
    msr::TSC_AUX,
];

impl Hypervisor for EmuHypervisor {
    fn prefers_unpacked_kernel(&self) -> bool {
        // The kernel's xz decompressor alone is billions of instructions.
        true
    }

    fn kind(&self) -> vireo_hypervisor::BackendKind {
        vireo_hypervisor::BackendKind::Emu
    }

    fn max_vcpus(&self) -> usize {
        MAX_VCPUS
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(crate::exec::system::platform_cpuid())
    }

    fn supported_msrs(&self) -> Result<Vec<u32>> {
        Ok(SUPPORTED_MSRS.to_vec())
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(EmuVm::new()))
    }
}

/// Guest RAM of a VM: host mappings registered by `map_memory`, seen by
/// every vCPU. Regions are only ever added, so readers scan a published
/// prefix of the table without locks.
pub struct VmMemory {
    /// (guest address, length, host address) per region.
    regions: [[AtomicU64; 3]; MAX_REGIONS],
    count: AtomicUsize,
    add: Mutex<()>,
    /// Per region: its slot number and the pages written while
    /// `logging` is on.
    dirty: [OnceLock<(u32, DirtyBitmap)>; MAX_REGIONS],
    logging: AtomicBool,
}

impl Default for VmMemory {
    fn default() -> Self {
        VmMemory {
            regions: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            count: AtomicUsize::new(0),
            add: Mutex::new(()),
            dirty: std::array::from_fn(|_| OnceLock::new()),
            logging: AtomicBool::new(false),
        }
    }
}

impl VmMemory {
    /// Add a region.
    ///
    /// # Safety
    /// `host` must point to `len` readable and writable bytes that stay
    /// mapped for as long as this object (and every vCPU using it) lives.
    pub unsafe fn add(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        host: u64,
    ) -> std::result::Result<(), String> {
        let _g = self.add.lock().unwrap_or_else(PoisonError::into_inner);
        if len == 0 || gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || host == 0 {
            return Err(format!(
                "region {gpa:#x}+{len:#x} is empty or not page aligned"
            ));
        }
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| format!("region {gpa:#x}+{len:#x} wraps"))?;
        let n = self.count.load(Ordering::Acquire);
        for r in &self.regions[..n] {
            let (g, l) = (r[0].load(Ordering::Relaxed), r[1].load(Ordering::Relaxed));
            if gpa < g + l && g < end {
                return Err(format!("region {gpa:#x}+{len:#x} overlaps another"));
            }
        }
        if n == MAX_REGIONS {
            return Err(format!("more than {MAX_REGIONS} memory regions"));
        }
        let r = &self.regions[n];
        r[0].store(gpa, Ordering::Relaxed);
        r[1].store(len, Ordering::Relaxed);
        r[2].store(host, Ordering::Relaxed);
        // A slot of this index was never published (count < n + 1), so
        // the cell is empty.
        let _ = self.dirty[n].set((slot, DirtyBitmap::new(len)));
        self.count.store(n + 1, Ordering::Release);
        Ok(())
    }

    /// Record writes from now on (`true`) or stop.
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::SeqCst);
    }

    /// The pages of `slot` written since the last call, cleared.
    pub fn take_dirty(&self, slot: u32) -> Option<Vec<u64>> {
        let n = self.count.load(Ordering::Acquire);
        self.dirty[..n]
            .iter()
            .filter_map(|d| d.get())
            .find(|(s, _)| *s == slot)
            .map(|(_, b)| b.take())
    }
}

impl GuestMemory for VmMemory {
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let n = self.count.load(Ordering::Acquire);
        for r in &self.regions[..n] {
            let g = r[0].load(Ordering::Relaxed);
            let l = r[1].load(Ordering::Relaxed);
            if gpa >= g && gpa - g < l {
                let off = gpa - g;
                if off.checked_add(len as u64)? > l {
                    return None;
                }
                let host = r[2].load(Ordering::Relaxed);
                return NonNull::new((host + off) as *mut u8);
            }
        }
        None
    }

    fn mark_dirty(&self, gpa: u64, len: usize) {
        if !self.logging.load(Ordering::Relaxed) {
            return;
        }
        let n = self.count.load(Ordering::Acquire);
        for (r, d) in self.regions[..n].iter().zip(&self.dirty) {
            let g = r[0].load(Ordering::Relaxed);
            let l = r[1].load(Ordering::Relaxed);
            if gpa >= g && gpa - g < l {
                if let Some((_, bitmap)) = d.get() {
                    bitmap.mark(gpa - g, len as u64);
                }
                return;
            }
        }
    }
}

/// A VM of the software emulator.
pub struct EmuVm {
    memory: Arc<VmMemory>,
    platform: Arc<Platform>,
    vcpus: Mutex<Vec<u32>>,
}

impl Default for EmuVm {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuVm {
    pub fn new() -> Self {
        EmuVm {
            memory: Arc::new(VmMemory::default()),
            platform: Platform::new(),
            vcpus: Mutex::new(Vec::new()),
        }
    }

    /// The VM's interrupt controllers and timer.
    pub fn platform(&self) -> &Arc<Platform> {
        &self.platform
    }

    /// The concrete vCPU (with [`EmuVcpu::kicker`]); [`Vm::create_vcpu`]
    /// boxes this.
    pub fn create_emu_vcpu(&self, id: u32) -> Result<EmuVcpu> {
        let mut ids = self.vcpus.lock().unwrap_or_else(PoisonError::into_inner);
        if id as usize >= MAX_VCPUS || ids.contains(&id) {
            return Err(error(
                "emulator create_vcpu",
                format!("vCPU id {id} is out of range or already exists"),
            ));
        }
        ids.push(id);
        let mut cpu = Cpu::new(self.memory.clone());
        // APIC base 0xFEE00000, enabled; bit 8 marks the bootstrap processor.
        cpu.state.msr.apic_base = 0xfee0_0800 | if id == 0 { 1 << 8 } else { 0 };
        let lapic = self.platform.add_lapic(id);
        cpu.attach(
            CpuLink {
                platform: self.platform.clone(),
                lapic,
            },
            id != 0,
        );
        cpu.set_cpuid(&crate::exec::system::platform_cpuid());
        Ok(EmuVcpu::new(id, cpu))
    }
}

impl Vm for EmuVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.memory.add(slot, guest_addr, size, host_addr) }
            .map_err(|e| error("emulator map_memory", e))
    }

    fn start_dirty_log(&self) -> Result<()> {
        self.memory.set_logging(true);
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<()> {
        self.memory.set_logging(false);
        Ok(())
    }

    fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        self.memory
            .take_dirty(slot)
            .ok_or_else(|| error("emulator dirty_log", format!("no memory slot {slot}")))
    }

    fn dirty_log_needs_vcpu_sync(&self) -> bool {
        true
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_emu_vcpu(id)?))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        if gsi as usize >= crate::platform::ioapic::PINS {
            return Err(error(
                "emulator interrupt_line",
                format!("GSI {gsi} does not exist (the IOAPIC has 24 pins)"),
            ));
        }
        Ok(Arc::new(EmuLine {
            platform: self.platform.clone(),
            gsi,
        }))
    }

    fn level_interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        if gsi as usize >= crate::platform::ioapic::PINS {
            return Err(error(
                "emulator level_interrupt_line",
                format!("GSI {gsi} does not exist (the IOAPIC has 24 pins)"),
            ));
        }
        Ok(Arc::new(EmuLevelLine(EmuLine {
            platform: self.platform.clone(),
            gsi,
        })))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.platform.deliver_msi(address, data);
        Ok(())
    }

    fn save_platform(&self) -> Result<vireo_hypervisor::PlatformState> {
        Ok(self.platform.save_state())
    }

    fn restore_platform(&self, state: &vireo_hypervisor::PlatformState) -> Result<()> {
        self.platform
            .restore_state(state)
            .map_err(HypervisorError::BadState)
    }
}

/// A level-triggered line into the emulated IOAPIC (and PIC for GSI < 16).
struct EmuLevelLine(EmuLine);

impl InterruptLine for EmuLevelLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.0.platform.set_gsi_level(self.0.gsi, asserted);
        Ok(())
    }

    fn eventfd(&self) -> std::io::Result<EventFd> {
        self.0.eventfd()
    }
}

/// An edge-triggered line into the emulated IOAPIC (and PIC for GSI < 16).
struct EmuLine {
    platform: Arc<Platform>,
    gsi: u32,
}

impl InterruptLine for EmuLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.platform.pulse_gsi(self.gsi);
        Ok(())
    }

    fn eventfd(&self) -> std::io::Result<EventFd> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "emulator interrupt lines have no eventfd; use trigger()",
        ))
    }
}
