//! System instructions: CPUID, RDMSR/WRMSR, RDTSC(P), MOV CR/DR, segment
//! and descriptor-table loads, IN/OUT, HLT, CLI/STI, INVLPG, SWAPGS,
//! SYSCALL/SYSRET, IRETQ and INT n.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use vireo_hypervisor::{CpuidEntry, Segment};

use crate::cpu::state::gpr::{R11, RAX, RBX, RCX, RDX, RSP};
use crate::cpu::state::{cr0, cr4, efer, msr, rflags, SegReg};
use crate::cpu::{Cpu, Exit, Flow};
use crate::exceptions::{exc, gp0, null_segment, ud, EventKind, GP, NP, SS};
use crate::mmu::{is_canonical, Privilege, PHYS_ADDR_BITS, VIRT_ADDR_BITS};

/// CPUID.1:EDX bits the emulator implements: FPU, DE, PSE, TSC, MSR, PAE,
/// CX8, PGE, CMOV, PAT, CLFSH, FXSR, SSE, SSE2. (No MMX: its register
/// forms raise #UD.)
const LEAF1_EDX: u32 = 1
    | (1 << 24)
    | (1 << 25)
    | (1 << 26)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 19);
/// CPUID.1:ECX: CX16, POPCNT, hypervisor.
const LEAF1_ECX: u32 = (1 << 13) | (1 << 23) | (1 << 31);
/// CPUID.1:EDX APIC: on-chip local APIC (with a platform).
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// CPUID.1:ECX TSC-deadline timer (with a platform).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// The hypervisor leaves' signature.
const HV_SIGNATURE: &[u8; 12] = b"VireoEmuCPU\0";
/// CPUID.80000001:EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// CPUID.80000001:ECX: LAHF/SAHF in 64-bit mode.
const EXT1_ECX: u32 = 1;
/// CPUID.7.0:EBX: the IA32_TSC_ADJUST MSR.
const LEAF7_EBX: u32 = 1 << 1;
/// CPUID.7.0:EDX: the IA32_ARCH_CAPABILITIES MSR.
const LEAF7_EDX: u32 = 1 << 29;
/// CPUID.80000007:EDX: invariant TSC (with a platform, where the TSC runs
/// on host time at a constant rate, in every power state).
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// IA32_ARCH_CAPABILITIES: an interpreter executes nothing speculatively
/// and has no fill buffers, store buffers or L1D for a guest to sample, so
/// it is not affected by Meltdown/L1TF (RDCL_NO), speculative store bypass
/// (SSB_NO), MDS/TAA (MDS_NO, TAA_NO), MMIO stale data (SBDR_SSDP_NO,
/// FBSDP_NO, PSDP_NO), page-size-change machine checks (PSCHANGE_MC_NO),
/// branch history injection (BHI_NO), post-barrier RSB predictions
/// (PBRSB_NO), GDS (GDS_NO) or RFDS (RFDS_NO). Saying so spares the guest
/// kernel page-table isolation (a CR3 switch on every kernel entry) and
/// buffer clearing on every return to user space. Spectre v1/v2 have no
/// such bit; Linux keeps its retpolines on an unknown vendor.
pub const ARCH_CAPABILITIES: u64 = (1 << 0)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27);

fn entry(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    }
}

fn str_regs(s: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (w(0), w(4), w(8))
}

/// The CPUID leaves the emulator presents: only features it implements.
pub fn supported_cpuid() -> Vec<CpuidEntry> {
    let (b, d, c) = str_regs(b"VireoSoftCPU");
    let mut brand = [0u8; 48];
    let name = b"vireo software x86-64 CPU";
    brand[..name.len()].copy_from_slice(name);
    let mut v = vec![
        entry(0, 7, b, c, d),
        // Family 6, model 2, stepping 3; CLFLUSH line 8 qwords, 1 logical CPU.
        entry(1, 0x0000_0623, (1 << 16) | (8 << 8), LEAF1_ECX, LEAF1_EDX),
        // Sub-leaf 0 only (EAX = 0).
        CpuidEntry {
            flags: CpuidEntry::FLAG_SIGNIFICANT_INDEX,
            ..entry(7, 0, LEAF7_EBX, 0, LEAF7_EDX)
        },
        entry(0x8000_0000, 0x8000_0008, 0, 0, 0),
        entry(0x8000_0001, 0, 0, EXT1_ECX, EXT1_EDX),
        entry(0x8000_0008, PHYS_ADDR_BITS | (VIRT_ADDR_BITS << 8), 0, 0, 0),
    ];
    for (k, chunk) in brand.chunks(16).enumerate() {
        let w = |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
        v.push(entry(0x8000_0002 + k as u32, w(0), w(4), w(8), w(12)));
    }
    v
}

/// The CPUID leaves of a CPU in an [`crate::EmuVm`]: those of
/// [`supported_cpuid`] plus the local APIC, the TSC-deadline timer, the
/// invariant TSC, the leaf 0xB topology (filled in by the VMM) and the
/// hypervisor leaf.
pub fn platform_cpuid() -> Vec<CpuidEntry> {
    let mut v = supported_cpuid();
    for e in &mut v {
        match e.function {
            0 => e.eax = 0xb,
            1 => {
                e.edx |= LEAF1_EDX_APIC;
                e.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
            _ => {}
        }
    }
    for index in 0..3 {
        v.push(CpuidEntry {
            function: 0xb,
            index,
            flags: CpuidEntry::FLAG_SIGNIFICANT_INDEX,
            ..CpuidEntry::default()
        });
    }
    v.push(entry(0x8000_0007, 0, 0, 0, EXT7_EDX_INVARIANT_TSC));
    let (b, c, d) = str_regs(HV_SIGNATURE);
    v.push(entry(0x4000_0000, 0x4000_0000, b, c, d));
    v
}

/// Keep the caller's CPUID table but clear every feature bit the emulator
/// does not implement, and drop leaves that describe unimplemented
/// hardware (XSAVE, PMU, paravirtual interfaces, ...).
pub fn filter_cpuid(entries: &[CpuidEntry]) -> Vec<CpuidEntry> {
    filter_cpuid_with(entries, false)
}

/// [`filter_cpuid`] for a CPU with (`apic`) or without a local APIC.
pub fn filter_cpuid_with(entries: &[CpuidEntry], apic: bool) -> Vec<CpuidEntry> {
    let (edx1, ecx1, ext7_edx) = if apic {
        (
            LEAF1_EDX | LEAF1_EDX_APIC,
            LEAF1_ECX | LEAF1_ECX_TSC_DEADLINE,
            EXT7_EDX_INVARIANT_TSC,
        )
    } else {
        (LEAF1_EDX, LEAF1_ECX, 0)
    };
    entries
        .iter()
        .filter_map(|e| {
            let mut e = *e;
            match e.function {
                0 => e.eax = e.eax.min(0xb),
                1 => {
                    e.ecx &= ecx1;
                    e.edx &= edx1;
                }
                0x4000_0000 => e.eax = 0x4000_0000,
                2 | 4 | 0xb => {}
                7 if e.index == 0 => {
                    e.eax = 0;
                    e.ebx &= LEAF7_EBX;
                    e.ecx = 0;
                    e.edx &= LEAF7_EDX;
                }
                7 => return None,
                0x8000_0000 => e.eax = e.eax.min(0x8000_0008),
                0x8000_0001 => {
                    e.ecx &= EXT1_ECX;
                    e.edx &= EXT1_EDX;
                }
                0x8000_0002..=0x8000_0004 | 0x8000_0006 => {}
                0x8000_0007 => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx &= ext7_edx;
                }
                0x8000_0008 => e.eax = PHYS_ADDR_BITS | (VIRT_ADDR_BITS << 8),
                _ => return None,
            }
            Some(e)
        })
        .collect()
}

impl Cpu {
    fn cpuid(&self, function: u32, index: u32) -> (u32, u32, u32, u32) {
        let find = |f: u32| {
            self.cpuid.iter().find(|e| {
                e.function == f
                    && (e.flags & CpuidEntry::FLAG_SIGNIFICANT_INDEX == 0 || e.index == index)
            })
        };
        let max_basic = find(0).map_or(0, |e| e.eax);
        let max_ext = find(0x8000_0000).map_or(0, |e| e.eax);
        // Leaves above the maximum report the highest basic leaf.
        let out_of_range = if function < 0x8000_0000 {
            function > max_basic
        } else {
            function > max_ext
        };
        let f = if out_of_range { max_basic } else { function };
        find(f).map_or((0, 0, 0, 0), |e| (e.eax, e.ebx, e.ecx, e.edx))
    }

    fn require_cpl0(&self) -> Flow {
        if self.state.cpl() != 0 {
            Err(gp0())
        } else {
            Ok(())
        }
    }

    /// #GP(0) unless CPL <= IOPL (the TSS I/O bitmap is not consulted).
    pub(crate) fn check_io(&self, _port: u16, _size: usize) -> Flow {
        let iopl = ((self.state.rflags & rflags::IOPL) >> 12) as u8;
        if self.state.cpl() > iopl {
            Err(gp0())
        } else {
            Ok(())
        }
    }

    pub(crate) fn port_in(&mut self, port: u16, size: usize) -> Flow<u64> {
        if let Some(v) = self.platform_port_in(port, size) {
            return Ok(v);
        }
        let mut b = [0u8; 8];
        self.take_input(
            Exit::IoIn {
                port,
                size: size as u8,
            },
            &mut b[..size.min(8)],
        )?;
        Ok(u64::from_le_bytes(b))
    }

    pub(crate) fn port_out(&mut self, port: u16, size: usize, v: u64) {
        if self.platform_port_out(port, size, v) {
            return;
        }
        let n = size.min(8);
        self.io_buf[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        self.exit_after = Some(Exit::IoOut {
            port,
            size: n as u8,
        });
    }

    /// Load a data segment register or SS at the current privilege.
    pub(crate) fn load_sreg(&mut self, s: SegReg, sel: u16) -> Flow {
        if self.state.real_mode() {
            let seg = &mut self.state.seg[s as usize];
            seg.selector = sel;
            seg.base = u64::from(sel) << 4;
            seg.present = 1;
            seg.unusable = 0;
            return Ok(());
        }
        let cpl = self.state.cpl();
        self.load_sreg_checked(s, sel, cpl)
    }

    /// Load a data segment register or SS as code at privilege `cpl` would.
    pub(crate) fn load_sreg_checked(&mut self, s: SegReg, sel: u16, cpl: u8) -> Flow {
        let rpl = (sel & 3) as u8;
        let err = Some(u32::from(sel & !3));
        if sel & !3 == 0 {
            if s == SegReg::Ss && (cpl == 3 || rpl != cpl) {
                return Err(gp0());
            }
            self.state.seg[s as usize] = null_segment(sel, if s == SegReg::Ss { cpl } else { 0 });
            return Ok(());
        }
        let desc = self.read_descriptor(sel)?;
        let seg = Segment::from_descriptor(sel, desc);
        if seg.s == 0 {
            return Err(exc(GP, err));
        }
        let code = seg.type_ & 8 != 0;
        if s == SegReg::Ss {
            if code || seg.type_ & 2 == 0 || rpl != cpl || seg.dpl != cpl {
                return Err(exc(GP, err));
            }
            if seg.present == 0 {
                return Err(exc(SS, err));
            }
        } else {
            if code && seg.type_ & 2 == 0 {
                return Err(exc(GP, err));
            }
            let conforming = code && seg.type_ & 4 != 0;
            if !conforming && seg.dpl < cpl.max(rpl) {
                return Err(exc(GP, err));
            }
            if seg.present == 0 {
                return Err(exc(NP, err));
            }
        }
        self.state.seg[s as usize] = seg;
        Ok(())
    }

    fn write_cr(&mut self, n: usize, v: u64) -> Flow {
        let s = &self.state;
        match n {
            0 => {
                if v >> 32 != 0
                    || (v & cr0::NW != 0 && v & cr0::CD == 0)
                    || (v & cr0::PG != 0 && v & cr0::PE == 0)
                {
                    return Err(gp0());
                }
                let v = (v & cr0::VALID) | cr0::ET;
                let old = s.cr0;
                let mut new_efer = s.efer;
                if v & cr0::PG != 0 && old & cr0::PG == 0 && s.efer & efer::LME != 0 {
                    if s.cr4 & cr4::PAE == 0 {
                        return Err(gp0());
                    }
                    new_efer |= efer::LMA;
                }
                if v & cr0::PG == 0 && old & cr0::PG != 0 && s.efer & efer::LMA != 0 {
                    // Leaving long mode from 64-bit code is not allowed.
                    return Err(gp0());
                }
                self.state.cr0 = v;
                self.state.efer = new_efer;
                if (old ^ v) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
                    self.flush_tlb();
                }
            }
            2 => self.state.cr2 = v,
            3 => {
                if v >> PHYS_ADDR_BITS != 0 {
                    return Err(gp0());
                }
                self.state.cr3 = v;
                self.tlb.flush_all();
            }
            4 => {
                if v & !cr4::VALID != 0 || (s.efer & efer::LMA != 0 && v & cr4::PAE == 0) {
                    return Err(gp0());
                }
                let old = s.cr4;
                self.state.cr4 = v;
                if (old ^ v) & (cr4::PGE | cr4::PAE | cr4::PSE) != 0 {
                    self.flush_tlb();
                }
            }
            8 => {
                if v > 15 {
                    return Err(gp0());
                }
                self.state.cr8 = v;
                self.cr8_changed();
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    fn read_cr(&self, n: usize) -> Flow<u64> {
        let s = &self.state;
        Ok(match n {
            0 => s.cr0,
            2 => s.cr2,
            3 => s.cr3,
            4 => s.cr4,
            8 => self.read_cr8(),
            _ => return Err(ud()),
        })
    }

    fn rdmsr(&self, index: u32) -> Flow<u64> {
        let s = &self.state;
        let m = &s.msr;
        Ok(match index {
            msr::TSC => self.tsc(),
            msr::TSC_DEADLINE => self.tsc_deadline().ok_or_else(gp0)?,
            msr::MTRR_DEF_TYPE => m.mtrr_def_type,
            msr::APIC_BASE => m.apic_base,
            msr::SYSENTER_CS => m.sysenter_cs,
            msr::SYSENTER_ESP => m.sysenter_esp,
            msr::SYSENTER_EIP => m.sysenter_eip,
            msr::MISC_ENABLE => m.misc_enable,
            msr::PAT => m.pat,
            msr::EFER => s.efer,
            msr::STAR => m.star,
            msr::LSTAR => m.lstar,
            msr::CSTAR => m.cstar,
            msr::SFMASK => m.sfmask,
            msr::FS_BASE => s.seg(SegReg::Fs).base,
            msr::GS_BASE => s.seg(SegReg::Gs).base,
            msr::KERNEL_GS_BASE => m.kernel_gs_base,
            msr::TSC_AUX => m.tsc_aux,
            msr::TSC_ADJUST if self.has_feature(7, LEAF7_EBX, 0) => m.tsc_adjust,
            msr::ARCH_CAPABILITIES if self.has_feature(7, 0, LEAF7_EDX) => ARCH_CAPABILITIES,
            _ => return Err(gp0()),
        })
    }

    /// Does CPUID leaf `function` (sub-leaf 0) as presented to the guest set
    /// all of `ebx` and `edx`? (MSRs enumerated by CPUID #GP when hidden.)
    fn has_feature(&self, function: u32, ebx: u32, edx: u32) -> bool {
        let (_, b, _, d) = self.cpuid(function, 0);
        b & ebx == ebx && d & edx == edx
    }

    /// WRMSR semantics (also used by the `Vcpu::set_msrs` path).
    pub(crate) fn wrmsr(&mut self, index: u32, v: u64) -> Flow {
        let canonical = |v: u64| if is_canonical(v) { Ok(v) } else { Err(gp0()) };
        match index {
            msr::TSC => {
                // Writing the TSC moves IA32_TSC_ADJUST by the same amount.
                let delta = v.wrapping_sub(self.tsc());
                self.state.msr.tsc_adjust = self.state.msr.tsc_adjust.wrapping_add(delta);
                self.set_tsc(v);
            }
            msr::TSC_ADJUST if self.has_feature(7, LEAF7_EBX, 0) => {
                let delta = v.wrapping_sub(self.state.msr.tsc_adjust);
                self.set_tsc(self.tsc().wrapping_add(delta));
                self.state.msr.tsc_adjust = v;
            }
            msr::TSC_DEADLINE => {
                if !self.set_tsc_deadline(v) {
                    return Err(gp0());
                }
            }
            msr::MTRR_DEF_TYPE => {
                if v & !0xcff != 0 {
                    return Err(gp0());
                }
                self.state.msr.mtrr_def_type = v;
            }
            msr::APIC_BASE => {
                // Bits 8 (BSP), 11 (enable) and the page address; x2APIC
                // (bit 10) is not implemented.
                if v & !(0x000f_ffff_ffff_f000 | (1 << 8) | (1 << 11)) != 0 {
                    return Err(gp0());
                }
                self.state.msr.apic_base = v;
                self.apic_base_changed();
            }
            msr::SYSENTER_CS => self.state.msr.sysenter_cs = v,
            msr::SYSENTER_ESP => self.state.msr.sysenter_esp = canonical(v)?,
            msr::SYSENTER_EIP => self.state.msr.sysenter_eip = canonical(v)?,
            msr::MISC_ENABLE => self.state.msr.misc_enable = v,
            msr::PAT => {
                // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                if v.to_le_bytes().iter().any(|&b| b > 7 || b == 2 || b == 3) {
                    return Err(gp0());
                }
                self.state.msr.pat = v;
            }
            msr::EFER => {
                if v & !efer::VALID != 0 {
                    return Err(gp0());
                }
                let old = self.state.efer;
                if self.state.cr0 & cr0::PG != 0 && (old ^ v) & efer::LME != 0 {
                    return Err(gp0());
                }
                // LMA is read-only.
                self.state.efer = (v & !efer::LMA) | (old & efer::LMA);
                if (old ^ v) & efer::NXE != 0 {
                    self.flush_tlb();
                }
            }
            msr::STAR => self.state.msr.star = v,
            msr::LSTAR => self.state.msr.lstar = canonical(v)?,
            msr::CSTAR => self.state.msr.cstar = canonical(v)?,
            msr::SFMASK => self.state.msr.sfmask = v & 0xffff_ffff,
            msr::FS_BASE => self.state.seg[SegReg::Fs as usize].base = canonical(v)?,
            msr::GS_BASE => self.state.seg[SegReg::Gs as usize].base = canonical(v)?,
            msr::KERNEL_GS_BASE => self.state.msr.kernel_gs_base = canonical(v)?,
            msr::TSC_AUX => self.state.msr.tsc_aux = v & 0xffff_ffff,
            _ => return Err(gp0()),
        }
        Ok(())
    }

    /// Read an MSR for `Vcpu::msrs`; `None` if it is not implemented.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.rdmsr(index).ok()
    }

    /// Write an MSR as WRMSR at CPL 0 would; false if it would #GP.
    pub fn set_msr(&mut self, index: u32, value: u64) -> bool {
        self.wrmsr(index, value).is_ok()
    }

    /// Write an MSR on behalf of the VMM (`Vcpu::set_msrs`: loading saved
    /// state). As KVM does for host-initiated writes, the TSC and
    /// IA32_TSC_ADJUST are set independently: a guest WRMSR to one moves
    /// the other, but a restore that loaded the TSC and then the saved
    /// TSC_ADJUST must not take the TSC back by the adjustment.
    pub fn set_msr_host(&mut self, index: u32, value: u64) -> bool {
        match index {
            msr::TSC => {
                self.set_tsc(value);
                true
            }
            msr::TSC_ADJUST if self.has_feature(7, LEAF7_EBX, 0) => {
                self.state.msr.tsc_adjust = value;
                true
            }
            _ => self.set_msr(index, value),
        }
    }

    /// Software interrupt (INT n, INT3, INT1): delivered now, returning to
    /// the next instruction.
    fn soft_int(&mut self, vector: u8, kind: EventKind) -> Flow {
        let ret = self.next_rip;
        if let Some(exit) = self.deliver_or_shutdown(vector, None, ret, kind) {
            self.exit_after = Some(exit);
        }
        self.next_rip = self.state.rip;
        Ok(())
    }

    /// IRET with operand size `b` bytes: real mode, same or outer
    /// privilege in protected mode, and IRETQ/IRETD in long mode (which
    /// always pops SS:RSP).
    pub(crate) fn iret(&mut self, b: usize) -> Flow {
        // Serializing (Linux's sync_core after cross-modifying code).
        self.serialize();
        let rip = self.stack_slot(0, b)?;
        let cs_sel = self.stack_slot(1, b)? as u16;
        let flags = self.stack_slot(2, b)?;
        if self.state.real_mode() {
            let new_flags = self.merge_rflags(flags, b);
            self.far_transfer(cs_sel, rip & crate::cpu::flags::mask(b as u32 * 8))?;
            let sp = self.state.gpr[RSP].wrapping_add(3 * b as u64);
            self.set_sp(sp);
            self.state.rflags = new_flags;
            self.nmi_blocked = false;
            return Ok(());
        }
        let long = self.state.efer & efer::LMA != 0;
        let cpl = self.state.cpl();
        let rpl = (cs_sel & 3) as u8;
        if rpl < cpl {
            return Err(exc(GP, Some(u32::from(cs_sel & !3))));
        }
        let mut cs = self.code_segment(cs_sel, GP)?;
        let to64 = long && cs.l != 0;
        let rip = if to64 { rip } else { rip & 0xffff_ffff };
        if !is_canonical(rip) {
            return Err(gp0());
        }
        let new_flags = self.merge_rflags(flags, b);
        if long || rpl > cpl {
            let new_rsp = self.stack_slot(3, b)?;
            let ss_sel = self.stack_slot(4, b)? as u16;
            self.load_sreg_checked(SegReg::Ss, ss_sel, rpl)?;
            self.state.gpr[RSP] = new_rsp;
        } else {
            let sp = self.state.gpr[RSP].wrapping_add(3 * b as u64);
            self.set_sp(sp);
        }
        cs.dpl = rpl;
        self.state.seg[SegReg::Cs as usize] = cs;
        self.state.rflags = new_flags;
        self.next_rip = rip;
        self.nmi_blocked = false;
        Ok(())
    }

    fn syscall(&mut self) -> Flow {
        if self.state.efer & efer::SCE == 0 {
            return Err(ud());
        }
        let star = self.state.msr.star;
        let sel = ((star >> 32) & 0xfffc) as u16;
        self.state.gpr[RCX] = self.next_rip;
        self.state.gpr[R11] = self.state.rflags & !rflags::RF;
        self.state.rflags &= !(self.state.msr.sfmask | rflags::RF);
        self.state.rflags |= rflags::FIXED1;
        self.state.seg[SegReg::Cs as usize] = flat(sel, 0xb, 0, true);
        self.state.seg[SegReg::Ss as usize] = flat(sel + 8, 0x3, 0, false);
        self.next_rip = self.state.msr.lstar;
        Ok(())
    }

    fn sysret(&mut self, i: &Instruction) -> Flow {
        if self.state.efer & efer::SCE == 0 {
            return Err(ud());
        }
        self.require_cpl0()?;
        if i.code() != Code::Sysretq {
            return self.unimplemented(i);
        }
        let rcx = self.state.gpr[RCX];
        if !is_canonical(rcx) {
            return Err(gp0());
        }
        let base = ((self.state.msr.star >> 48) & 0xffff) as u16;
        self.state.rflags = (self.state.gpr[R11] & 0x3c_7fd7) | rflags::FIXED1;
        self.state.seg[SegReg::Cs as usize] = flat((base + 16) | 3, 0xb, 3, true);
        // SS keeps its hidden state flat; only the selector and DPL change.
        self.state.seg[SegReg::Ss as usize] = flat((base + 8) | 3, 0x3, 3, false);
        self.next_rip = rcx;
        Ok(())
    }

    /// VERR/VERW/LAR/LSL: ZF reports whether the selector names a
    /// descriptor of the right kind visible at max(CPL, RPL); invalid
    /// selectors clear ZF without faulting.
    fn check_selector(&mut self, i: &Instruction) -> Flow {
        use crate::cpu::state::rflags::ZF;
        if self.state.real_mode() {
            return Err(ud());
        }
        let m = i.mnemonic();
        let src = if matches!(m, Mnemonic::Verr | Mnemonic::Verw) {
            0
        } else {
            1
        };
        let sel = self.read_op(i, src)? as u16;
        let (base, limit, usable) = if sel & 4 != 0 {
            let l = &self.state.ldt;
            (l.base, l.limit, l.unusable == 0 && l.present != 0)
        } else {
            (self.state.gdt.base, u32::from(self.state.gdt.limit), true)
        };
        let off = u64::from(sel & !7);
        let in_table = sel & !3 != 0 && usable && off + 7 <= u64::from(limit);
        let desc = if in_table {
            Some(self.read_sys_u64(base.wrapping_add(off))?)
        } else {
            None
        };
        let seg = desc.map(|d| Segment::from_descriptor(sel, d));
        let rpl = (sel & 3) as u8;
        let cpl = self.state.cpl();
        let ok = seg.is_some_and(|g| {
            let code = g.s != 0 && g.type_ & 8 != 0;
            let conforming = code && g.type_ & 4 != 0;
            let visible = conforming || g.dpl >= cpl.max(rpl);
            visible
                && match m {
                    Mnemonic::Verr => g.s != 0 && (!code || g.type_ & 2 != 0),
                    Mnemonic::Verw => g.s != 0 && !code && g.type_ & 2 != 0,
                    Mnemonic::Lar => g.s != 0 || matches!(g.type_, 2 | 9 | 0xb | 0xc),
                    _ => g.s != 0 || matches!(g.type_, 2 | 9 | 0xb),
                }
        });
        self.state.set_flag(ZF, ok);
        if ok {
            let d = desc.unwrap_or(0);
            let v = if m == Mnemonic::Lar {
                (d >> 32) & 0x00f0_ff00
            } else if m == Mnemonic::Lsl {
                let raw = (d & 0xffff) | ((d >> 32) & 0xf_0000);
                if d & (1 << 55) != 0 {
                    (raw << 12) | 0xfff
                } else {
                    raw
                }
            } else {
                return Ok(());
            };
            self.write_op(i, 0, v)?;
        }
        Ok(())
    }

    fn ltr(&mut self, sel: u16) -> Flow {
        let err = Some(u32::from(sel & !3));
        if sel & !3 == 0 || sel & 4 != 0 {
            return Err(exc(GP, err));
        }
        let desc = self.read_descriptor(sel)?;
        let mut seg = Segment::from_descriptor(sel, desc);
        if seg.s != 0 || seg.type_ != 9 {
            return Err(exc(GP, err));
        }
        if seg.present == 0 {
            return Err(exc(NP, err));
        }
        let gdt_off = self.state.gdt.base.wrapping_add(u64::from(sel & !7));
        if u64::from(sel & !7) + 15 > u64::from(self.state.gdt.limit) {
            return Err(exc(GP, err));
        }
        let hi = self.read_sys_u64(gdt_off.wrapping_add(8))?;
        seg.base |= (hi & 0xffff_ffff) << 32;
        // Mark the descriptor busy.
        self.write_lin(
            gdt_off,
            &(desc | (1 << 41)).to_le_bytes(),
            Privilege::Supervisor,
        )?;
        seg.type_ = 0xb;
        self.state.tr = seg;
        Ok(())
    }

    fn lldt(&mut self, sel: u16) -> Flow {
        let err = Some(u32::from(sel & !3));
        if sel & !3 == 0 {
            self.state.ldt = null_segment(sel, 0);
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(exc(GP, err));
        }
        let desc = self.read_descriptor(sel)?;
        let mut seg = Segment::from_descriptor(sel, desc);
        if seg.s != 0 || seg.type_ != 2 {
            return Err(exc(GP, err));
        }
        if seg.present == 0 {
            return Err(exc(NP, err));
        }
        let hi = self.read_sys_u64(self.state.gdt.base.wrapping_add(u64::from(sel & !7) + 8))?;
        seg.base |= (hi & 0xffff_ffff) << 32;
        self.state.ldt = seg;
        Ok(())
    }
}

/// A flat segment as SYSCALL/SYSRET load it.
fn flat(selector: u16, type_: u8, dpl: u8, code: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        s: 1,
        dpl,
        present: 1,
        avl: 0,
        l: u8::from(code),
        db: u8::from(!code),
        g: 1,
        unusable: 0,
    }
}

fn special_index(r: Register, first: Register) -> usize {
    (r as u32).wrapping_sub(first as u32) as usize
}

/// MOV to/from CR0-CR8 and DR0-DR7.
pub(crate) fn mov_cr_dr(cpu: &mut Cpu, i: &Instruction) -> Flow {
    cpu.require_cpl0()?;
    let (special, gpr, to_special) = if i.op_kind(0) == OpKind::Register && gpr_of(i.op0_register())
    {
        (i.op1_register(), i.op0_register(), false)
    } else {
        (i.op0_register(), i.op1_register(), true)
    };
    let is_cr =
        (special as u32) >= Register::CR0 as u32 && (special as u32) <= Register::CR15 as u32;
    if is_cr {
        let n = special_index(special, Register::CR0);
        if to_special {
            cpu.write_cr(n, cpu.reg(gpr))
        } else {
            let v = cpu.read_cr(n)?;
            cpu.set_reg(gpr, v);
            Ok(())
        }
    } else {
        let mut n = special_index(special, Register::DR0);
        if n == 4 || n == 5 {
            if cpu.state.cr4 & cr4::DE != 0 {
                return Err(ud());
            }
            n += 2;
        }
        if n > 7 {
            return Err(ud());
        }
        if to_special {
            let v = cpu.reg(gpr);
            if (n == 6 || n == 7) && v >> 32 != 0 {
                return Err(gp0());
            }
            cpu.dr[n] = match n {
                6 => v | 0xffff_0ff0,
                7 => (v | 0x400) & !0x2000,
                _ => v,
            };
        } else {
            let v = cpu.dr[n];
            cpu.set_reg(gpr, v);
        }
        Ok(())
    }
}

fn gpr_of(r: Register) -> bool {
    super::operand::gpr_info(r).is_some()
}

fn seg_of(r: Register) -> Option<SegReg> {
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

/// MOV Sreg, r/m16 and MOV r/m, Sreg.
pub(crate) fn mov_sreg(cpu: &mut Cpu, i: &Instruction) -> Flow {
    if i.op0_kind() == OpKind::Register {
        if let Some(s) = seg_of(i.op0_register()) {
            if s == SegReg::Cs {
                return Err(ud());
            }
            let sel = cpu.read_op(i, 1)? as u16;
            cpu.load_sreg(s, sel)?;
            if s == SegReg::Ss {
                cpu.int_shadow = true;
            }
            return Ok(());
        }
    }
    let s = seg_of(i.op1_register()).ok_or_else(ud)?;
    let sel = u64::from(cpu.state.seg(s).selector);
    cpu.write_op(i, 0, sel)
}

pub(crate) fn system(cpu: &mut Cpu, i: &Instruction) -> Flow {
    use Mnemonic as M;
    match i.mnemonic() {
        M::Cpuid => {
            // Serializing: code other vCPUs wrote is seen after it.
            cpu.serialize();
            let s = &cpu.state;
            let (a, b, c, d) = cpu.cpuid(s.gpr[RAX] as u32, s.gpr[RCX] as u32);
            let s = &mut cpu.state;
            s.gpr[RAX] = u64::from(a);
            s.gpr[RBX] = u64::from(b);
            s.gpr[RCX] = u64::from(c);
            s.gpr[RDX] = u64::from(d);
        }
        M::Rdmsr => {
            cpu.require_cpl0()?;
            let v = cpu.rdmsr(cpu.state.gpr[RCX] as u32)?;
            cpu.state.gpr[RAX] = v & 0xffff_ffff;
            cpu.state.gpr[RDX] = v >> 32;
        }
        M::Wrmsr => {
            cpu.require_cpl0()?;
            let s = &cpu.state;
            let v = (s.gpr[RDX] << 32) | (s.gpr[RAX] & 0xffff_ffff);
            cpu.wrmsr(s.gpr[RCX] as u32, v)?;
        }
        M::Rdtsc | M::Rdtscp => {
            let t = cpu.tsc();
            cpu.state.gpr[RAX] = t & 0xffff_ffff;
            cpu.state.gpr[RDX] = t >> 32;
            if i.mnemonic() == M::Rdtscp {
                cpu.state.gpr[RCX] = cpu.state.msr.tsc_aux & 0xffff_ffff;
            }
        }
        M::Lgdt | M::Lidt => {
            cpu.require_cpl0()?;
            let la = cpu.ea(i);
            let limit = cpu.read_mem(la, 2)? as u16;
            let base = if cpu.state.long_mode_64() {
                cpu.read_mem(la.wrapping_add(2), 8)?
            } else if matches!(i.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
                cpu.read_mem(la.wrapping_add(2), 4)? & 0x00ff_ffff
            } else {
                cpu.read_mem(la.wrapping_add(2), 4)?
            };
            if !is_canonical(base) {
                return Err(gp0());
            }
            let t = vireo_hypervisor::TableRegister { base, limit };
            if i.mnemonic() == M::Lgdt {
                cpu.state.gdt = t;
            } else {
                cpu.state.idt = t;
            }
        }
        M::Sgdt | M::Sidt => {
            let t = if i.mnemonic() == M::Sgdt {
                cpu.state.gdt
            } else {
                cpu.state.idt
            };
            let la = cpu.ea(i);
            let mut b = [0u8; 10];
            b[..2].copy_from_slice(&t.limit.to_le_bytes());
            b[2..].copy_from_slice(&t.base.to_le_bytes());
            let n = if cpu.state.long_mode_64() { 10 } else { 6 };
            cpu.write_lin(la, &b[..n], Privilege::Current)?;
        }
        M::Ltr => {
            cpu.require_cpl0()?;
            let sel = cpu.read_op(i, 0)? as u16;
            cpu.ltr(sel)?;
        }
        M::Lldt => {
            cpu.require_cpl0()?;
            let sel = cpu.read_op(i, 0)? as u16;
            cpu.lldt(sel)?;
        }
        M::Str | M::Sldt => {
            let sel = if i.mnemonic() == M::Str {
                cpu.state.tr.selector
            } else {
                cpu.state.ldt.selector
            };
            cpu.write_op(i, 0, u64::from(sel))?;
        }
        M::Smsw => cpu.write_op(i, 0, cpu.state.cr0 & 0xffff)?,
        M::Lmsw => {
            cpu.require_cpl0()?;
            let v = cpu.read_op(i, 0)? & 0xf;
            // LMSW cannot clear PE.
            let new = (cpu.state.cr0 & !0xe) | v | (cpu.state.cr0 & cr0::PE);
            cpu.write_cr(0, new)?;
        }
        M::Clts => {
            cpu.require_cpl0()?;
            cpu.state.cr0 &= !cr0::TS;
        }
        M::In => {
            let size = (cpu.op_bits(i, 0) / 8) as usize;
            let port = cpu.read_op(i, 1)? as u16;
            cpu.check_io(port, size)?;
            let v = cpu.port_in(port, size)?;
            cpu.set_reg(i.op0_register(), v);
        }
        M::Out => {
            let size = (cpu.op_bits(i, 1) / 8) as usize;
            let port = cpu.read_op(i, 0)? as u16;
            cpu.check_io(port, size)?;
            let v = cpu.read_op(i, 1)?;
            cpu.port_out(port, size, v);
        }
        M::Hlt => {
            cpu.require_cpl0()?;
            cpu.halted = true;
            cpu.exit_after = Some(Exit::Halt);
        }
        M::Cli | M::Sti => {
            let iopl = ((cpu.state.rflags & rflags::IOPL) >> 12) as u8;
            if cpu.state.cpl() > iopl {
                return Err(gp0());
            }
            if i.mnemonic() == M::Sti {
                if !cpu.state.flag(rflags::IF) {
                    cpu.int_shadow = true;
                }
                cpu.state.set_flag(rflags::IF, true);
            } else {
                cpu.state.set_flag(rflags::IF, false);
            }
        }
        M::Invlpg => {
            cpu.require_cpl0()?;
            let la = cpu.ea(i);
            cpu.tlb.flush_page(la);
        }
        M::Wbinvd | M::Invd => cpu.require_cpl0()?,
        M::Swapgs => {
            cpu.require_cpl0()?;
            let s = &mut cpu.state;
            std::mem::swap(
                &mut s.seg[SegReg::Gs as usize].base,
                &mut s.msr.kernel_gs_base,
            );
        }
        M::Verr | M::Verw | M::Lar | M::Lsl => cpu.check_selector(i)?,
        M::Syscall => cpu.syscall()?,
        M::Sysret | M::Sysretq => cpu.sysret(i)?,
        M::Iretq => cpu.iret(8)?,
        M::Iretd => cpu.iret(4)?,
        M::Iret => cpu.iret(2)?,
        M::Int => cpu.soft_int(i.immediate8(), EventKind::Software)?,
        M::Int3 => cpu.soft_int(crate::exceptions::BP, EventKind::Software)?,
        M::Int1 => cpu.soft_int(crate::exceptions::DB, EventKind::External)?,
        _ => return cpu.unimplemented(i),
    }
    Ok(())
}
