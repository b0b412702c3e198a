//! The zero page (`struct boot_params`) and its E820 memory map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id, as the boot protocol asks of loaders without one.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map: low RAM up to the EBDA, the BIOS area (holding the ACPI
/// tables) reserved, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIGH_MEMORY_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for &(start, size) in ram {
        let end = start + size;
        let start = start.max(layout::HIGH_MEMORY_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initrd, the command line and the ACPI tables are, for the zero page.
#[derive(Debug, Clone, Default)]
pub struct ZeroPageInputs {
    pub setup_header: Option<setup_header>,
    pub cmdline_addr: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    pub rsdp_addr: u64,
    pub e820: Vec<E820Entry>,
}

/// Build the zero page. For a bzImage the kernel's own setup header is kept
/// (the kernel reads fields such as `init_size` back from it); for an ELF
/// kernel a header is synthesized.
pub fn zero_page(inputs: &ZeroPageInputs) -> boot_params {
    let hdr = inputs.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    });
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = inputs.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (inputs.cmdline_addr >> 32) as u32;
    params.hdr.cmdline_size = inputs.cmdline_len as u32;
    if let Some((addr, size)) = inputs.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = inputs.rsdp_addr;
    let n = inputs.e820.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(&inputs.e820[..n]) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = n as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_guest() {
        let map = e820_map(&[(0, 128 << 20)]);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= layout::ACPI_START && map[1].addr + map[1].size >= layout::ACPI_END);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_for_guest_above_4g() {
        let map = e820_map(&[(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        // No entry overlaps another.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let p = zero_page(&ZeroPageInputs {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 12,
            initrd: Some((0x700_0000, 0x1234)),
            rsdp_addr: 0xe0000,
            e820: e820_map(&[(0, 128 << 20)]),
        });
        let (ptr, size, flag, magic) = (
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_size,
            p.hdr.boot_flag,
            p.hdr.header,
        );
        assert_eq!(ptr, 0x20000);
        assert_eq!(size, 0x1234);
        assert_eq!(flag, 0xaa55);
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let (entries, rsdp) = (p.e820_entries, p.acpi_rsdp_addr);
        assert_eq!(entries, 3);
        assert_eq!(rsdp, 0xe0000);
    }
}
