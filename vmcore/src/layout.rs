//! The guest physical address map of a vireo x86-64 machine.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT (empty)             0x0000_8ff0  initial BSP stack top
//! 0x0000_9000  PML4, PDPT, 4 PDs (identity map of the first 4 GiB)
//! 0x0001_0000  free low memory (64 KiB; e.g. an AP trampoline)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)         0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  kernel                  … initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (512 MiB), IOAPIC 0xfec0_0000,
//!              LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
/// Four page directories, one per GiB of the identity map.
pub const PD_START: u64 = 0xb000;
pub const IDENTITY_MAP_GIB: u64 = 4;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux on x86 accepts at most 2048 bytes of command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where the 64-bit kernel is loaded: 1 MiB, as the boot protocol prefers.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The PCI host bridge's window for device BARs: the first 512 MiB of the
/// hole, below the IOAPIC and LAPIC pages.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports of the platform devices.
pub mod ports {
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    pub const I8042: u16 = 0x60;
    pub const I8042_IRQ: u32 = 1;
    pub const CMOS: u16 = 0x70;
    pub const RTC_IRQ: u32 = 8;
    /// ACPI fixed hardware: PM1a event block (4 bytes), PM1a control block
    /// (2 bytes), PM timer (4 bytes).
    pub const PM1A_EVT: u16 = 0x600;
    pub const PM1A_CNT: u16 = 0x604;
    pub const PM_TMR: u16 = 0x608;
    pub const ACPI_SCI_IRQ: u32 = 9;
    /// The reset control register (as on PIIX/ICH chipsets); the FADT's
    /// RESET_REG points here.
    pub const RESET_CONTROL: u16 = 0xcf9;
    /// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC
    /// (the range holds the reset control register too).
    pub const PCI_CONFIG: u16 = 0xcf8;
    pub const PCI_CONFIG_LEN: u16 = 8;
    /// PCI INTx: slot N's pin A is GSI `PCI_INTX_GSI_BASE + N % PCI_INTX_GSIS`
    /// (IOAPIC pins 16-23, level-triggered, active low as PCI requires).
    pub const PCI_INTX_GSI_BASE: u32 = 16;
    pub const PCI_INTX_GSIS: u32 = 8;
}
