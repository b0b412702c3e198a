//! [`vireo_hypervisor::Vcpu`] for an emulated CPU.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vireo_hypervisor::state::{mp_state, DebugRegs, FpuFull, VcpuEvents};
use vireo_hypervisor::{
    CpuidEntry, FpuState, HypervisorError, LapicState, MsrEntry, Regs, Result, SpecialRegs, Vcpu,
    VcpuExit, VcpuState,
};

use crate::cpu::state::{efer, SegReg};
use crate::{Cpu, Exit};

/// Instructions per [`Vcpu::run`] before it returns
/// [`VcpuExit::Interrupted`] so the caller can check for pause/stop.
pub const DEFAULT_BUDGET: u64 = 1 << 20;
/// With a platform, `run` returns [`VcpuExit::Interrupted`] at least this
/// often (also while halted), so that a VMM's pause/stop is seen promptly.
pub const RUN_SLICE_TIME: Duration = Duration::from_millis(1);
/// Instructions between checks of the clock, the timers and the kick flag.
const SLICE: u64 = 2048;

/// Makes a vCPU's [`Vcpu::run`] return [`VcpuExit::Interrupted`] soon
/// (within one slice, or at once if it is halted). Cheap to clone and
/// usable from any thread.
#[derive(Clone)]
pub struct Kicker(Arc<crate::platform::LocalApic>);

impl Kicker {
    pub fn kick(&self) {
        self.0.kick();
    }
}

/// One emulated vCPU.
pub struct EmuVcpu {
    id: u32,
    cpu: Mutex<Cpu>,
    budget: u64,
    /// Stored for save/restore; no local APIC is emulated yet.
    lapic: Mutex<LapicState>,
    /// Last time the vCPU's position was logged (debug level, once a
    /// second: `VIREO_LOG=vireo_emulator=debug`).
    traced: Instant,
    /// Instructions executed, for the debug log.
    retired: u64,
    /// Guest RIP samples, when `VIREO_EMU_PROFILE` asks for them.
    profile: Option<Profile>,
}

/// A sampling profile of guest code: with `VIREO_EMU_PROFILE=FILE`, each
/// vCPU notes its RIP at the end of every slice of [`SLICE`] instructions
/// it ran in full and the instruction there, and writes `RIP COUNT` lines
/// (hex, decimal) to `FILE.vcpuN` and `MNEMONIC COUNT` lines to
/// `FILE.vcpuN.ops` when it is dropped. `emulator/bench/guest_profile.py`
/// maps the RIPs to the guest kernel's symbols.
struct Profile {
    path: std::path::PathBuf,
    samples: std::collections::HashMap<u64, u64>,
    mnemonics: std::collections::HashMap<iced_x86::Mnemonic, u64>,
}

impl Profile {
    fn from_env(id: u32) -> Option<Profile> {
        let base = std::env::var_os("VIREO_EMU_PROFILE")?;
        let mut path = std::path::PathBuf::from(base);
        path.as_mut_os_string().push(format!(".vcpu{id}"));
        Some(Profile {
            path,
            samples: std::collections::HashMap::new(),
            mnemonics: std::collections::HashMap::new(),
        })
    }
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        let Some(p) = self.profile.take() else {
            return;
        };
        let mut rows: Vec<(u64, u64)> = p.samples.into_iter().collect();
        rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        let text: String = rows
            .iter()
            .map(|(rip, n)| format!("{rip:#x} {n}\n"))
            .collect();
        let mut ops: Vec<_> = p.mnemonics.into_iter().collect();
        ops.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        let ops: String = ops.iter().map(|(m, n)| format!("{m:?} {n}\n")).collect();
        let mut ops_path = p.path.clone();
        ops_path.as_mut_os_string().push(".ops");
        match std::fs::write(&p.path, text).and_then(|()| std::fs::write(&ops_path, ops)) {
            Ok(()) => tracing::info!(
                "guest profile of vCPU {} written to {}",
                self.id,
                p.path.display()
            ),
            Err(e) => tracing::warn!("cannot write the guest profile {}: {e}", p.path.display()),
        }
    }
}

/// The hypervisor-level exit for an emulator exit, borrowing `buf` (the
/// CPU's I/O data buffer).
fn vcpu_exit(exit: Exit, buf: &mut [u8; crate::cpu::MAX_IO_LEN]) -> VcpuExit<'_> {
    match exit {
        Exit::IoIn { port, size } => VcpuExit::IoIn(port, &mut buf[..usize::from(size)]),
        Exit::IoOut { port, size } => VcpuExit::IoOut(port, &buf[..usize::from(size)]),
        Exit::MmioRead { gpa, len } => VcpuExit::MmioRead(gpa, &mut buf[..usize::from(len)]),
        Exit::MmioWrite { gpa, len } => VcpuExit::MmioWrite(gpa, &buf[..usize::from(len)]),
        Exit::Halt => VcpuExit::Halt,
        Exit::Shutdown => VcpuExit::Shutdown,
        Exit::BudgetExhausted => VcpuExit::Interrupted,
        Exit::InternalError(why) => VcpuExit::InternalError(why),
    }
}

fn emu_error(op: &'static str, what: String) -> HypervisorError {
    HypervisorError::Ioctl {
        op,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
    }
}

impl EmuVcpu {
    pub fn new(id: u32, cpu: Cpu) -> Self {
        EmuVcpu {
            id,
            cpu: Mutex::new(cpu),
            budget: DEFAULT_BUDGET,
            lapic: Mutex::new(LapicState::default()),
            traced: Instant::now(),
            retired: 0,
            profile: Profile::from_env(id),
        }
    }

    /// Set the instructions run per [`Vcpu::run`] call.
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget.max(1);
    }

    fn lock(&self) -> MutexGuard<'_, Cpu> {
        self.cpu.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle that kicks this vCPU out of `run`; `None` for a vCPU that
    /// is not part of an [`crate::EmuVm`] (its `run` returns after its
    /// instruction budget anyway).
    pub fn kicker(&self) -> Option<Kicker> {
        let c = self.lock();
        c.link.as_ref().map(|l| Kicker(l.lapic.clone()))
    }

    /// Direct access to the emulated CPU.
    pub fn cpu_mut(&mut self) -> &mut Cpu {
        self.cpu.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    /// The translator maps its code arena executable on this thread.
    fn generates_host_code(&self) -> bool {
        true
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let budget = self.budget;
        let cpu = self.cpu.get_mut().unwrap_or_else(PoisonError::into_inner);
        let exit = match cpu.link.clone() {
            None => cpu.run(budget),
            Some(link) => {
                let start = Instant::now();
                let until = start + RUN_SLICE_TIME;
                let mut left = budget;
                loop {
                    if link
                        .lapic
                        .kick
                        .swap(false, std::sync::atomic::Ordering::AcqRel)
                    {
                        break Exit::BudgetExhausted;
                    }
                    let now = Instant::now();
                    cpu.poll_timers(now);
                    if now >= until || left == 0 {
                        break Exit::BudgetExhausted;
                    }
                    let n = SLICE.min(left);
                    left -= n;
                    self.retired += n;
                    match cpu.run(n) {
                        Exit::BudgetExhausted => {
                            if let Some(p) = &mut self.profile {
                                *p.samples.entry(cpu.state.rip).or_insert(0) += 1;
                                if let Ok(i) = cpu.fetch_decode() {
                                    *p.mnemonics.entry(i.mnemonic()).or_insert(0) += 1;
                                }
                            }
                        }
                        // HLT, or an AP waiting for SIPI: sleep until an
                        // interrupt, a timer or the end of this slice.
                        Exit::Halt => cpu.wait_for_event(until),
                        other => break other,
                    }
                }
            }
        };
        if self.traced.elapsed() >= Duration::from_secs(1) {
            self.traced = Instant::now();
            let code = cpu
                .fetch_decode()
                .map_or_else(|_| "?".to_string(), |i| format!("{:?}", i.code()));
            let s = &cpu.state;
            tracing::debug!(
                vcpu = self.id,
                rip = format_args!("{:#x}", s.rip),
                code,
                rcx = format_args!("{:#x}", s.gpr[1]),
                rsi = format_args!("{:#x}", s.gpr[6]),
                rdi = format_args!("{:#x}", s.gpr[7]),
                cs = format_args!("{:#x}", s.seg[SegReg::Cs as usize].selector),
                cr0 = format_args!("{:#x}", s.cr0),
                cr3 = format_args!("{:#x}", s.cr3),
                rflags = format_args!("{:#x}", s.rflags),
                retired = self.retired,
                halted = cpu.halted,
                "emulated vCPU position"
            );
        }
        Ok(vcpu_exit(exit, &mut cpu.io_buf))
    }

    fn sync_dirty_log(&mut self) -> Result<()> {
        self.cpu_mut().drop_fast_writes();
        Ok(())
    }

    fn complete_pending_io(&mut self) -> Result<Option<VcpuExit<'_>>> {
        let cpu = self.cpu.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !cpu.io_pending() {
            return Ok(None);
        }
        // One instruction: the one that waits for its input.
        let exit = cpu.run(1);
        Ok(match vcpu_exit(exit, &mut cpu.io_buf) {
            VcpuExit::Interrupted => None,
            other => Some(other),
        })
    }

    fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState> {
        let regs = self.regs()?;
        let sregs = self.special_regs()?;
        let lapic = self.lapic()?;
        let c = self.lock();
        let s = &c.state;
        let msrs = msr_indices
            .iter()
            .filter_map(|&index| c.msr(index).map(|value| MsrEntry { index, value }))
            .collect();
        let mp_state = if c.wait_sipi {
            mp_state::INIT_RECEIVED
        } else if c.halted {
            mp_state::HALTED
        } else {
            mp_state::RUNNABLE
        };
        Ok(VcpuState {
            id: self.id,
            regs,
            sregs,
            interrupt_bitmap: [0; 4],
            fpu: FpuFull {
                fpr: s.fpr.map(u128::to_le_bytes),
                fcw: s.fcw,
                fsw: s.fsw,
                ftwx: s.ftw,
                last_opcode: 0,
                last_ip: 0,
                last_dp: 0,
                xmm: s.xmm.map(u128::to_le_bytes),
                mxcsr: s.mxcsr,
            },
            xsave: None,
            xcrs: Vec::new(),
            debug_regs: DebugRegs {
                db: [c.dr[0], c.dr[1], c.dr[2], c.dr[3]],
                dr6: c.dr[6],
                dr7: c.dr[7],
            },
            msrs,
            lapic,
            events: VcpuEvents {
                interrupt_shadow: u8::from(c.int_shadow),
                nmi_pending: c.nmi_pending,
                nmi_masked: c.nmi_blocked,
                ..VcpuEvents::default()
            },
            mp_state,
            tsc_khz: None,
        })
    }

    fn restore_state(&self, s: &VcpuState) -> Result<()> {
        if s.xsave.is_some() || s.events.exception_injected || s.events.interrupt_injected {
            return Err(HypervisorError::BadState(
                "this state holds XSAVE data or a half-injected event, which the emulator cannot load (was it saved on KVM?)".into(),
            ));
        }
        self.set_regs(&s.regs)?;
        self.set_special_regs(&s.sregs)?;
        {
            let mut c = self.lock();
            let st = &mut c.state;
            st.fpr = s.fpu.fpr.map(u128::from_le_bytes);
            st.xmm = s.fpu.xmm.map(u128::from_le_bytes);
            st.fcw = s.fpu.fcw;
            st.fsw = s.fpu.fsw;
            st.ftw = s.fpu.ftwx;
            st.mxcsr = s.fpu.mxcsr;
            c.dr[..4].copy_from_slice(&s.debug_regs.db);
            c.dr[6] = s.debug_regs.dr6;
            c.dr[7] = s.debug_regs.dr7;
            c.int_shadow = s.events.interrupt_shadow != 0;
            c.nmi_pending = s.events.nmi_pending;
            c.nmi_blocked = s.events.nmi_masked;
            c.halted = s.mp_state == mp_state::HALTED;
            c.wait_sipi = matches!(
                s.mp_state,
                mp_state::INIT_RECEIVED | mp_state::UNINITIALIZED
            );
        }
        // The local APIC before the MSRs: IA32_TSC_DEADLINE is ignored
        // unless the LVT timer is in TSC-deadline mode, so loading it into
        // a fresh APIC would drop an armed deadline and leave a restored
        // guest waiting for a timer interrupt that never comes (KVM has
        // the same rule; its restore orders them the same way). Then the
        // MSRs in the saved order: the TSC before its deadline.
        self.set_lapic(&s.lapic)?;
        self.set_msrs(&s.msrs)?;
        Ok(())
    }

    fn regs(&self) -> Result<Regs> {
        let c = self.lock();
        let g = &c.state.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: c.state.rip,
            rflags: c.state.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<()> {
        let mut c = self.lock();
        c.state.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        c.state.rip = r.rip;
        c.state.rflags = r.rflags | crate::cpu::state::rflags::FIXED1;
        Ok(())
    }

    fn special_regs(&self) -> Result<SpecialRegs> {
        let c = self.lock();
        let s = &c.state;
        Ok(SpecialRegs {
            cs: s.seg[SegReg::Cs as usize],
            ds: s.seg[SegReg::Ds as usize],
            es: s.seg[SegReg::Es as usize],
            fs: s.seg[SegReg::Fs as usize],
            gs: s.seg[SegReg::Gs as usize],
            ss: s.seg[SegReg::Ss as usize],
            tr: s.tr,
            ldt: s.ldt,
            gdt: s.gdt,
            idt: s.idt,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.msr.apic_base,
        })
    }

    fn set_special_regs(&self, r: &SpecialRegs) -> Result<()> {
        let mut c = self.lock();
        let s = &mut c.state;
        s.seg[SegReg::Cs as usize] = r.cs;
        s.seg[SegReg::Ds as usize] = r.ds;
        s.seg[SegReg::Es as usize] = r.es;
        s.seg[SegReg::Fs as usize] = r.fs;
        s.seg[SegReg::Gs as usize] = r.gs;
        s.seg[SegReg::Ss as usize] = r.ss;
        s.tr = r.tr;
        s.ldt = r.ldt;
        s.gdt = r.gdt;
        s.idt = r.idt;
        s.cr0 = r.cr0;
        s.cr2 = r.cr2;
        s.cr3 = r.cr3;
        s.cr4 = r.cr4;
        s.cr8 = r.cr8;
        s.efer = r.efer & efer::VALID;
        s.msr.apic_base = r.apic_base;
        c.flush_tlb();
        c.apic_base_changed();
        Ok(())
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let mut c = self.lock();
        c.state.fcw = fpu.fcw;
        c.state.fsw = fpu.fsw;
        c.state.ftw = fpu.ftwx;
        c.state.mxcsr = fpu.mxcsr;
        Ok(())
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        self.lock().set_cpuid(entries);
        Ok(())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let mut c = self.lock();
        for m in msrs {
            if !c.set_msr_host(m.index, m.value) {
                return Err(emu_error(
                    "emulator set_msrs",
                    format!(
                        "MSR {:#x} (value {:#x}) is not emulated or invalid",
                        m.index, m.value
                    ),
                ));
            }
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let c = self.lock();
        Ok(indices
            .iter()
            .filter_map(|&index| c.msr(index).map(|value| MsrEntry { index, value }))
            .collect())
    }

    fn lapic(&self) -> Result<LapicState> {
        if let Some(link) = &self.lock().link {
            return Ok(LapicState {
                regs: link.lapic.lock().to_page(Instant::now()),
            });
        }
        Ok(self
            .lapic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        if let Some(link) = &self.lock().link {
            link.lapic
                .post(|l| l.load_page(&lapic.regs, Instant::now()));
            return Ok(());
        }
        *self.lapic.lock().unwrap_or_else(PoisonError::into_inner) = lapic.clone();
        Ok(())
    }
}
