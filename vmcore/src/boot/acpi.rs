//! ACPI tables: RSDP → XSDT → FADT (→ FACS, DSDT) and MADT, built with the
//! rust-vmm `acpi_tables` crate and placed at [`layout::ACPI_START`].
//!
//! The FADT describes a legacy (not hardware-reduced) PC: PM1a event and
//! control blocks and the PM timer on I/O ports, the SCI on IRQ 9, and a
//! reset register, so that Linux powers off with `SLP_TYP=S5 | SLP_EN` and can
//! reboot through ACPI. The DSDT names `\_S5` and the legacy devices.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::Aml;
use acpi_tables::{facs::FACS, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};

use crate::layout::{self, ports};

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;

/// The `SLP_TYP` value the DSDT's `\_S5` package gives for soft-off.
pub const SLP_TYP_S5: u8 = 5;

/// One ACPI table and where it goes in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    pub address: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {vcpus} vCPUs need {size} bytes, more than the {room} bytes reserved for them")]
    TooLarge { vcpus: u32, size: u64, room: u64 },
    #[error("{0} vCPUs cannot be described in the MADT (xAPIC ids stop at 254)")]
    TooManyVcpus(u32),
}

/// Build every table for a machine with `vcpus` vCPUs. The RSDP is the first
/// entry and sits at `layout::ACPI_START`.
pub fn build_tables(vcpus: u32) -> Result<Vec<PlacedTable>, AcpiError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let mut placer = Placer::new(layout::ACPI_START);
    let rsdp_addr = placer.reserve(Rsdp::len() as u64);

    let mut dsdt_bytes = Vec::new();
    dsdt(&mut dsdt_bytes);
    let dsdt_addr = placer.reserve(dsdt_bytes.len() as u64);
    let facs_addr = placer.reserve(FACS::len() as u64);
    let mut facs_bytes = Vec::new();
    FACS::new().to_aml_bytes(&mut facs_bytes);

    let mut fadt_bytes = Vec::new();
    fadt(dsdt_addr, facs_addr).to_aml_bytes(&mut fadt_bytes);
    let fadt_addr = placer.reserve(fadt_bytes.len() as u64);

    let mut madt_bytes = Vec::new();
    madt(vcpus).to_aml_bytes(&mut madt_bytes);
    append_madt_structure(&mut madt_bytes, &sci_override());
    let madt_addr = placer.reserve(madt_bytes.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = placer.reserve(xsdt_bytes.len() as u64);

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    if placer.next > layout::ACPI_END {
        return Err(AcpiError::TooLarge {
            vcpus,
            size: placer.next - layout::ACPI_START,
            room: layout::ACPI_END - layout::ACPI_START,
        });
    }
    Ok(vec![
        PlacedTable {
            address: rsdp_addr,
            bytes: rsdp_bytes,
        },
        PlacedTable {
            address: dsdt_addr,
            bytes: dsdt_bytes,
        },
        PlacedTable {
            address: facs_addr,
            bytes: facs_bytes,
        },
        PlacedTable {
            address: fadt_addr,
            bytes: fadt_bytes,
        },
        PlacedTable {
            address: madt_addr,
            bytes: madt_bytes,
        },
        PlacedTable {
            address: xsdt_addr,
            bytes: xsdt_bytes,
        },
    ])
}

/// Hands out 64-byte aligned addresses (the FACS must be 64-byte aligned, the
/// RSDP 16-byte aligned).
struct Placer {
    next: u64,
}

impl Placer {
    fn new(start: u64) -> Self {
        Placer { next: start }
    }

    fn reserve(&mut self, len: u64) -> u64 {
        let addr = self.next;
        self.next = (addr + len + 63) & !63;
        addr
    }
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> acpi_tables::fadt::FADT {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // PWR_BUTTON clear: the power button is the fixed-feature one (PM1
        // PWRBTN_STS/EN, what `power-button` presses), so the guest's ACPI
        // button driver binds to it; SLP_BUTTON set: there is no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::TmrValExt);
    // SMI_CMD stays 0: the platform is always in ACPI mode (SCI_EN is set
    // from reset), so the OS never needs an SMI handshake.
    b.sci_int = (ports::ACPI_SCI_IRQ as u16).into();
    b.pm1a_evt_blk = u32::from(ports::PM1A_EVT).into();
    b.pm1a_cnt_blk = u32::from(ports::PM1A_CNT).into();
    b.pm_tmr_blk = u32::from(ports::PM_TMR).into();
    b.pm1_evt_len = 4;
    b.pm1_cnt_len = 2;
    b.pm_tmr_len = 4;
    b.century = 0x32;
    // IA-PC boot architecture: legacy devices present, 8042 present.
    b.iapc_boot_arch = 0x3u16.into();
    b.x_pm1a_evt_blk = io_gas(ports::PM1A_EVT, 32, AccessSize::WordAccess);
    b.x_pm1a_cnt_blk = io_gas(ports::PM1A_CNT, 16, AccessSize::WordAccess);
    b.x_pm_tmr_blk = io_gas(ports::PM_TMR, 32, AccessSize::DwordAccess);
    b.reset_reg = io_gas(ports::RESET_CONTROL, 8, AccessSize::ByteAccess);
    b.reset_value = 0x6;
    b.finalize()
}

fn madt(vcpus: u32) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..vcpus {
        // Checked by the caller: id < 254.
        let id = id as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    madt
}

/// MADT interrupt source override: the SCI (ISA IRQ 9) on GSI 9, level
/// triggered, active high. Without it the OS assumes active low, which
/// KVM's IOAPIC does not model.
fn sci_override() -> [u8; 10] {
    const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
    const POLARITY_ACTIVE_HIGH: u16 = 0b01;
    const TRIGGER_LEVEL: u16 = 0b11 << 2;
    let mut s = [0u8; 10];
    s[0] = TYPE_INTERRUPT_SOURCE_OVERRIDE;
    s[1] = 10;
    s[2] = 0; // ISA bus
    s[3] = ports::ACPI_SCI_IRQ as u8;
    s[4..8].copy_from_slice(&ports::ACPI_SCI_IRQ.to_le_bytes());
    s[8..10].copy_from_slice(&(POLARITY_ACTIVE_HIGH | TRIGGER_LEVEL).to_le_bytes());
    s
}

/// Append an interrupt controller structure the `acpi_tables` MADT type
/// does not offer, fixing the table's length and checksum.
fn append_madt_structure(madt: &mut Vec<u8>, structure: &[u8]) {
    madt.extend_from_slice(structure);
    let len = madt.len() as u32;
    madt[4..8].copy_from_slice(&len.to_le_bytes());
    madt[9] = 0;
    let sum = madt.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    madt[9] = 0u8.wrapping_sub(sum);
}

/// The DSDT: the S5 sleep package and the legacy devices, so the OS finds
/// the UART, the keyboard controller and the RTC through ACPI PnP.
fn dsdt(out: &mut Vec<u8>) {
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut devices = Vec::new();
    devices.extend(legacy_device(
        "COM1",
        "PNP0501",
        1,
        &[(ports::COM1, 8)],
        ports::COM1_IRQ,
    ));
    devices.extend(legacy_device(
        "PS2K",
        "PNP0303",
        0,
        &[(ports::I8042, 1), (ports::I8042 + 4, 1)],
        ports::I8042_IRQ,
    ));
    devices.extend(legacy_device(
        "RTC_",
        "PNP0B00",
        0,
        &[(ports::CMOS, 2)],
        ports::RTC_IRQ,
    ));
    devices.extend(pci_host_bridge());
    body.extend(aml::Scope::raw("\\_SB_".into(), devices));

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    out.extend_from_slice(sdt.as_slice());
}

/// The PCI host bridge (bus 0): its bus, I/O and memory windows for the
/// OS to assign from, and the INTx routing of every slot (pin A of slot N
/// on GSI 16 + N % 8; the other pins rotate as on real boards).
fn pci_host_bridge() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new("_HID".into(), &hid);
    let cid = aml::Name::new("_CID".into(), &cid);
    let uid = aml::Name::new("_UID".into(), &0u8);
    let seg = aml::Name::new("_SEG".into(), &0u8);
    let bbn = aml::Name::new("_BBN".into(), &0u8);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(
        ports::PCI_CONFIG,
        ports::PCI_CONFIG,
        1,
        ports::PCI_CONFIG_LEN as u8,
    );
    // Every port apart from the configuration mechanism's is passed down.
    let io_low = aml::AddressSpace::new_io(0u16, ports::PCI_CONFIG - 1, None);
    let io_high =
        aml::AddressSpace::new_io(ports::PCI_CONFIG + ports::PCI_CONFIG_LEN, 0xffffu16, None);
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        (layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mem]);
    let crs = aml::Name::new("_CRS".into(), &crs);

    let mut entries = Vec::new();
    for slot in 0..32u32 {
        for pin in 0..4u32 {
            let gsi = ports::PCI_INTX_GSI_BASE + (slot + pin) % ports::PCI_INTX_GSIS;
            entries.push((slot << 16 | 0xffff, pin as u8, gsi));
        }
    }
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &0u8, gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());
    let prt = aml::Name::new("_PRT".into(), &prt);
    let mut out = Vec::new();
    aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &uid, &seg, &bbn, &crs, &prt],
    )
    .to_aml_bytes(&mut out);
    out
}

/// An ISA device with a PnP id, I/O port ranges and one edge-triggered IRQ.
fn legacy_device(name: &str, hid: &str, uid: u8, io: &[(u16, u8)], irq: u32) -> Vec<u8> {
    let ios: Vec<aml::IO> = io
        .iter()
        .map(|&(port, len)| aml::IO::new(port, port, 1, len))
        .collect();
    let irq = aml::Interrupt::new(true, true, false, false, irq);
    let mut resources: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    resources.push(&irq);
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::EISAName::new(hid);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table<'a>(tables: &'a [PlacedTable], sig: &[u8]) -> &'a PlacedTable {
        tables
            .iter()
            .find(|t| &t.bytes[..sig.len()] == sig)
            .expect("table present")
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let tables = build_tables(4).unwrap();
        for t in &tables {
            if &t.bytes[..8] == b"RSD PTR " {
                assert!(checksum_ok(&t.bytes[..20]), "RSDP v1 checksum");
                assert!(checksum_ok(&t.bytes), "RSDP extended checksum");
            } else {
                let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, t.bytes.len(), "{:?} length", &t.bytes[..4]);
                // The FACS is the one table without a checksum.
                if &t.bytes[..4] != b"FACS" {
                    assert!(checksum_ok(&t.bytes), "{:?} checksum", &t.bytes[..4]);
                }
            }
        }
    }

    #[test]
    fn rsdp_points_to_xsdt_which_lists_fadt_and_madt() {
        let tables = build_tables(2).unwrap();
        let rsdp = &tables[0];
        assert_eq!(rsdp.address, layout::ACPI_START);
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(rsdp.bytes[24..32].try_into().unwrap());
        let xsdt = tables.iter().find(|t| t.address == xsdt_addr).unwrap();
        assert_eq!(&xsdt.bytes[..4], b"XSDT");
        let entries: Vec<u64> = xsdt.bytes[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<&[u8]> = entries
            .iter()
            .map(|a| &tables.iter().find(|t| t.address == *a).unwrap().bytes[..4])
            .collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu() {
        for n in [1u32, 3, 8] {
            let tables = build_tables(n).unwrap();
            let madt = table(&tables, b"APIC");
            let mut off = 44;
            let mut ids = Vec::new();
            while off < madt.bytes.len() {
                let (kind, len) = (madt.bytes[off], madt.bytes[off + 1] as usize);
                if kind == 0 {
                    assert_eq!(madt.bytes[off + 4] & 1, 1, "enabled");
                    ids.push(madt.bytes[off + 3]);
                }
                off += len;
            }
            assert_eq!(ids, (0..n as u8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn madt_overrides_the_sci_to_level_active_high() {
        let tables = build_tables(2).unwrap();
        let madt = table(&tables, b"APIC");
        let mut off = 44;
        let mut found = None;
        while off < madt.bytes.len() {
            let (kind, len) = (madt.bytes[off], madt.bytes[off + 1] as usize);
            if kind == 2 {
                found = Some(madt.bytes[off..off + len].to_vec());
            }
            off += len;
        }
        let iso = found.expect("interrupt source override");
        assert_eq!((iso[3], iso[4]), (9, 9), "IRQ 9 -> GSI 9");
        assert_eq!(u16::from_le_bytes([iso[8], iso[9]]), 0x000d);
    }

    #[test]
    fn fadt_points_at_pm1_control_and_dsdt_has_s5() {
        let tables = build_tables(1).unwrap();
        let fadt = table(&tables, b"FACP");
        let pm1a_cnt = u32::from_le_bytes(fadt.bytes[64..68].try_into().unwrap());
        assert_eq!(pm1a_cnt, u32::from(ports::PM1A_CNT));
        assert_eq!(fadt.bytes[89], 2, "PM1_CNT_LEN");
        // Flags at offset 112: a fixed-feature power button (bit 4 clear),
        // no sleep button (bit 5 set).
        let flags = u32::from_le_bytes(fadt.bytes[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 4), 0, "PWR_BUTTON: the fixed power button");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON: no sleep button");
        let dsdt = table(&tables, b"DSDT");
        assert!(dsdt.bytes.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.bytes.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.bytes.windows(4).any(|w| w == b"PCI0"));
        assert!(dsdt.bytes.windows(4).any(|w| w == b"_PRT"));
    }

    #[test]
    fn refuses_impossible_vcpu_counts() {
        assert!(build_tables(0).is_err());
        assert!(build_tables(255).is_err());
        assert!(build_tables(254).is_ok());
    }
}
