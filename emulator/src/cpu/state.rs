//! Architectural state of one x86-64 CPU: registers, flags, segments,
//! control registers and the MSRs the emulator models.

use vireo_hypervisor::{Segment, TableRegister};

/// RFLAGS bits.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software may change with POPF/IRET at CPL 0 (VM, VIF and VIP
    /// are left out: virtual-8086 mode is not modelled).
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | AC | ID;
}

/// CR0 bits.
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
    pub const VALID: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
}

/// CR4 bits.
pub mod cr4 {
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const PGE: u64 = 1 << 7;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Bits the emulator lets software set. Everything else (VMXE, SMEP,
    /// SMAP, LA57, PCIDE, OSXSAVE, FSGSBASE, ...) is not implemented, is
    /// not advertised in CPUID and makes MOV CR4 raise #GP.
    pub const VALID: u64 = DE | PSE | PAE | PGE | OSFXSR | OSXMMEXCPT;
}

/// EFER bits.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
    pub const VALID: u64 = SCE | LME | LMA | NXE;
}

/// MSR indices the emulator implements.
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const TSC_ADJUST: u32 = 0x3b;
    pub const ARCH_CAPABILITIES: u32 = 0x10a;
    pub const APIC_BASE: u32 = 0x1b;
    pub const MTRRCAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// Segment register numbers, in the encoding order of the ModRM `reg` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegReg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// General purpose register numbers.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R11: usize = 11;
}

/// MSRs the emulator keeps as plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    /// IA32_TSC_ADJUST: what software added to the TSC by writing it.
    pub tsc_adjust: u64,
}

/// The whole architectural state of one CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (indexed by [`SegReg`]).
    pub seg: [Segment; 6],
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: TableRegister,
    pub idt: TableRegister,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub msr: Msrs,
    /// XMM0-15, little endian.
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub fcw: u16,
    /// x87 status word; TOP is bits 11-13.
    pub fsw: u16,
    /// Abridged tag word (FXSAVE format): bit i set when physical
    /// register i is in use.
    pub ftw: u8,
    /// x87 physical registers R0-R7 (80-bit values in the low bits; MMX
    /// registers alias the significands).
    pub fpr: [u128; 8],
    /// Time stamp counter: advanced by one per retired instruction.
    pub tsc: u64,
}

impl Default for CpuState {
    /// The architectural reset state (real mode at F000:FFF0), as after INIT.
    fn default() -> Self {
        let data = Segment {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_: 3,
            s: 1,
            present: 1,
            ..Segment::default()
        };
        let mut cs = data;
        cs.selector = 0xf000;
        cs.base = 0xffff_0000;
        cs.type_ = 0xb;
        let mut seg = [data; 6];
        seg[SegReg::Cs as usize] = cs;
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: rflags::FIXED1,
            seg,
            tr: Segment {
                limit: 0xffff,
                type_: 0xb,
                present: 1,
                ..Segment::default()
            },
            ldt: Segment {
                limit: 0xffff,
                type_: 2,
                present: 1,
                ..Segment::default()
            },
            gdt: TableRegister {
                base: 0,
                limit: 0xffff,
            },
            idt: TableRegister {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                apic_base: 0xfee0_0900,
                misc_enable: 1,
                ..Msrs::default()
            },
            xmm: [0; 16],
            mxcsr: 0x1f80,
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fpr: [0; 8],
            tsc: 0,
        }
    }
}

impl CpuState {
    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        self.seg[SegReg::Cs as usize].dpl
    }

    /// True in 64-bit mode (long mode active and CS.L set).
    pub fn long_mode_64(&self) -> bool {
        self.efer & efer::LMA != 0 && self.seg[SegReg::Cs as usize].l != 0
    }

    /// Real-address mode (CR0.PE clear).
    pub fn real_mode(&self) -> bool {
        self.cr0 & cr0::PE == 0
    }

    /// Default operand/address size of the code being run: 16 (real mode
    /// or a 16-bit segment), 32 or 64.
    pub fn code_bits(&self) -> u32 {
        let cs = &self.seg[SegReg::Cs as usize];
        if self.real_mode() {
            16
        } else if self.efer & efer::LMA != 0 && cs.l != 0 {
            64
        } else if cs.db != 0 {
            32
        } else {
            16
        }
    }

    /// Width of the stack pointer: 64 in 64-bit mode, else SS.B.
    pub fn stack_bits(&self) -> u32 {
        if self.long_mode_64() {
            64
        } else if self.seg[SegReg::Ss as usize].db != 0 {
            32
        } else {
            16
        }
    }

    pub fn flag(&self, bit: u64) -> bool {
        self.rflags & bit != 0
    }

    pub fn set_flag(&mut self, bit: u64, on: bool) {
        if on {
            self.rflags |= bit;
        } else {
            self.rflags &= !bit;
        }
    }

    /// Replace the arithmetic flags selected by `mask` with those in `value`.
    pub fn set_arith(&mut self, mask: u64, value: u64) {
        self.rflags = (self.rflags & !mask) | (value & mask);
    }

    pub fn seg(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }
}
