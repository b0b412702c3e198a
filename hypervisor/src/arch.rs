//! Backend-neutral x86-64 CPU state: what the VM core reads and writes, and
//! what every backend (KVM, emulator) converts to its own form.

use serde::{Deserialize, Serialize};

/// General purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// S bit: code/data (1) or system (0).
    pub s: u8,
    pub dpl: u8,
    pub present: u8,
    pub avl: u8,
    /// L bit: 64-bit code segment.
    pub l: u8,
    /// D/B bit: default operand size 32.
    pub db: u8,
    /// G bit: limit in 4 KiB units.
    pub g: u8,
    pub unusable: u8,
}

impl Segment {
    /// Decode a GDT descriptor into the cached form a CPU holds after loading
    /// `selector`.
    pub fn from_descriptor(selector: u16, desc: u64) -> Self {
        let limit_raw = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
        let g = ((desc >> 55) & 1) as u8;
        Segment {
            base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
            limit: if g == 1 {
                (limit_raw << 12) | 0xfff
            } else {
                limit_raw
            },
            selector,
            type_: ((desc >> 40) & 0xf) as u8,
            s: ((desc >> 44) & 1) as u8,
            dpl: ((desc >> 45) & 3) as u8,
            present: ((desc >> 47) & 1) as u8,
            avl: ((desc >> 52) & 1) as u8,
            l: ((desc >> 53) & 1) as u8,
            db: ((desc >> 54) & 1) as u8,
            g,
            unusable: if (desc >> 47) & 1 == 1 { 0 } else { 1 },
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRegister {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
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
    pub apic_base: u64,
}

/// The legacy FXSAVE-format floating point state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub mxcsr: u32,
}

impl Default for FpuState {
    /// The state after FNINIT with the default MXCSR, as Linux expects at entry.
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            fsw: 0,
            ftwx: 0,
            mxcsr: 0x1f80,
        }
    }
}

/// One CPUID leaf/subleaf as presented to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Bit 0: the leaf is indexed by ECX (subleaf significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;
}

/// A model-specific register and its value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub value: u64,
}

/// The local APIC's 1 KiB register page.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    #[serde(with = "crate::state::byte_array")]
    pub regs: [u8; 1024],
}

impl Default for LapicState {
    fn default() -> Self {
        LapicState { regs: [0; 1024] }
    }
}

impl std::fmt::Debug for LapicState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapicState")
            .field("id", &(self.reg(0x20) >> 24))
            .finish_non_exhaustive()
    }
}

impl LapicState {
    /// Read the 32-bit register at byte `offset` (e.g. 0x350 for LVT LINT0).
    pub fn reg(&self, offset: usize) -> u32 {
        let b = &self.regs[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    pub fn set_reg(&mut self, offset: usize, value: u32) {
        self.regs[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_64bit_code_descriptor_decodes() {
        // Present, DPL0, code execute/read, L=1, G=1, limit 0xfffff.
        let s = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.type_, 0xb);
        assert_eq!((s.s, s.present, s.l, s.db, s.g), (1, 1, 1, 0, 1));
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn lapic_register_roundtrip() {
        let mut l = LapicState::default();
        l.set_reg(0x350, 0x700);
        assert_eq!(l.reg(0x350), 0x700);
        assert_eq!(l.regs[0x351], 0x07);
    }
}
