//! The CPU state the Linux x86-64 boot protocol asks for at the 64-bit entry:
//! long mode with an identity map, a flat GDT with `__BOOT_CS` = 0x10 and
//! `__BOOT_DS` = 0x18, interrupts off, RSI pointing at the zero page.

use vireo_hypervisor::{
    FpuState, LapicState, MsrEntry, Regs, Segment, SpecialRegs, TableRegister, Vcpu,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

use super::BootError;

/// GDT: null, unused, 64-bit code (0x10), data (0x18), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_PAGE_SIZE: u64 = 0x80;

/// Write the GDT, an empty IDT and identity-mapping page tables for the first
/// [`layout::IDENTITY_MAP_GIB`] GiB (2 MiB pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let w = |v: u64, addr: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| BootError::GuestMemoryTooSmall("boot page tables"))
    };
    for (i, entry) in GDT.iter().enumerate() {
        w(*entry, layout::GDT_START + 8 * i as u64)?;
    }
    w(0, layout::IDT_START)?;
    w(layout::PDPT_START | PTE_PRESENT_RW, layout::PML4_START)?;
    for gib in 0..layout::IDENTITY_MAP_GIB {
        let pd = layout::PD_START + gib * 0x1000;
        w(pd | PTE_PRESENT_RW, layout::PDPT_START + gib * 8)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(phys | PTE_PRESENT_RW | PDE_PAGE_SIZE, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Special registers for the 64-bit entry, from the current (reset) state.
pub fn long_mode_sregs(mut sregs: SpecialRegs) -> SpecialRegs {
    let seg = |sel: u16| Segment::from_descriptor(sel, GDT[usize::from(sel) / 8]);
    sregs.cs = seg(BOOT_CS);
    let data = seg(BOOT_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(BOOT_TSS);
    sregs.gdt = TableRegister {
        base: layout::GDT_START,
        limit: (std::mem::size_of_val(&GDT) - 1) as u16,
    };
    sregs.idt = TableRegister {
        base: layout::IDT_START,
        limit: 7,
    };
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

pub fn entry_regs(entry: u64) -> Regs {
    Regs {
        rip: entry,
        rsi: layout::ZERO_PAGE_START,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        // Bit 1 is reserved and always set; IF is clear.
        rflags: 0x2,
        ..Default::default()
    }
}

mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// MSRs set at boot, limited to those the backend can set.
pub fn boot_msrs(supported: &[u32]) -> Vec<MsrEntry> {
    use msr_index::*;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    // MTRRs enabled, default memory type write-back.
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, value)| MsrEntry { index, value })
    .collect()
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers the 8259's ExtINT, LINT1 is the NMI line: the virtual-wire
/// wiring Linux expects from PC firmware.
pub fn wire_local_interrupts(lapic: &mut LapicState) {
    let lint0 = lapic.reg(APIC_LVT_LINT0);
    lapic.set_reg(APIC_LVT_LINT0, set_delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic.reg(APIC_LVT_LINT1);
    lapic.set_reg(APIC_LVT_LINT1, set_delivery_mode(lint1, APIC_MODE_NMI));
}

/// Per-vCPU state every vCPU gets: MSRs, FPU and LAPIC wiring. The BSP also
/// gets the entry registers through [`setup_bsp`].
pub fn setup_common(vcpu: &dyn Vcpu, msrs: &[MsrEntry]) -> Result<(), BootError> {
    vcpu.set_msrs(msrs)?;
    vcpu.set_fpu(&FpuState::default())?;
    let mut lapic = vcpu.lapic()?;
    wire_local_interrupts(&mut lapic);
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

/// Put the bootstrap processor at the kernel's 64-bit entry point.
pub fn setup_bsp(vcpu: &dyn Vcpu, entry: u64) -> Result<(), BootError> {
    let sregs = long_mode_sregs(vcpu.special_regs()?);
    vcpu.set_special_regs(&sregs)?;
    vcpu.set_regs(&entry_regs(entry))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_covers_the_first_4gib() {
        let mem = crate::memory::test_memory(64);
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_START);
        // Walk a few addresses through the tables.
        for addr in [0u64, 0x10_0000, 0x3fff_ffff, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(layout::PDPT_START + (addr >> 30) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
    }

    #[test]
    fn long_mode_segments_are_flat_and_64bit() {
        let s = long_mode_sregs(SpecialRegs::default());
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.ss.db, 1);
        assert_eq!(s.tr.type_, 0xb);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr3, layout::PML4_START);
    }

    #[test]
    fn lints_get_extint_and_nmi() {
        let mut l = LapicState::default();
        l.set_reg(APIC_LVT_LINT0, 0x1_0000); // masked, fixed
        wire_local_interrupts(&mut l);
        assert_eq!(l.reg(APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(l.reg(APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn msrs_filtered_to_supported() {
        let m = boot_msrs(&[0x174, 0x2ff]);
        assert_eq!(m.len(), 2);
        assert!(m.iter().any(|e| e.index == 0x2ff && e.value == 0x806));
    }
}
