//! Booting a Linux kernel: load the kernel, initrd and command line, write
//! the zero page, ACPI tables and boot page tables into guest memory, and
//! compute each vCPU's CPUID and start state.

pub mod acpi;
pub mod cpu;
pub mod cpuid;
pub mod kernel;
pub mod params;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::{GuestMemory, RamLayout};
pub use kernel::KernelFormat;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {0}: cannot read it: {1}")]
    ReadKernel(PathBuf, std::io::Error),
    #[error("kernel {0}: neither a 64-bit ELF vmlinux nor a bzImage — pass a Linux kernel image (e.g. /boot/vmlinuz-*)")]
    NotAKernel(PathBuf),
    #[error("kernel {path}: this {format} cannot be booted: {reason}")]
    BadKernel {
        path: PathBuf,
        format: KernelFormat,
        reason: String,
    },
    #[error("initrd {0}: cannot read it: {1}")]
    ReadInitrd(PathBuf, std::io::Error),
    #[error("initrd {path}: {size_mib} MiB does not fit in guest memory between the kernel (ends at {kernel_end_mib} MiB) and {top_mib} MiB — give the guest more memory")]
    InitrdTooLarge {
        path: PathBuf,
        size_mib: u64,
        kernel_end_mib: u64,
        top_mib: u64,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max} — shorten it")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is not valid: {0}")]
    BadCmdline(String),
    #[error("guest memory is too small to hold the {0} — give the guest more memory")]
    GuestMemoryTooSmall(&'static str),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("setting up the boot vCPU state: {0}")]
    Vcpu(#[from] vireo_hypervisor::HypervisorError),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
}

/// The result of preparing guest memory for boot.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub format: KernelFormat,
    /// The bzImage's payload was decompressed on the host.
    pub unpacked: bool,
    pub entry: u64,
    /// Some(true/false) when the image could be checked for PVM guest support.
    pub pvm_guest: Option<bool>,
}

/// Load everything the kernel needs into `mem`, whose RAM `ram` lays out.
/// With `unpack`, a bzImage whose payload vireo can decompress is booted as
/// the vmlinux inside it.
pub fn prepare(
    mem: &GuestMemory,
    ram: &RamLayout,
    spec: &BootSpec,
    unpack: bool,
) -> Result<BootInfo, BootError> {
    let image =
        std::fs::read(&spec.kernel).map_err(|e| BootError::ReadKernel(spec.kernel.clone(), e))?;
    let path = spec.kernel.display().to_string();
    let loaded = kernel::load_kernel(mem, &path, &image, unpack)?;
    let pvm_guest = kernel::mentions_pvm_guest(&image);
    drop(image);

    let cmdline_max = match loaded.setup_header {
        Some(h) if h.cmdline_size > 0 => {
            (h.cmdline_size as usize).min(layout::CMDLINE_MAX_SIZE - 1)
        }
        _ => layout::CMDLINE_MAX_SIZE - 1,
    };
    let cmdline_len = write_cmdline(mem, &spec.cmdline, cmdline_max)?;

    let initrd = match &spec.initrd {
        Some(p) => Some(load_initrd(mem, ram, p, &loaded)?),
        None => None,
    };

    let tables = acpi::build_tables(spec.vcpus)?;
    let rsdp_addr = tables[0].address;
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.address))
            .map_err(|_| BootError::GuestMemoryTooSmall("ACPI tables"))?;
    }
    cpu::write_boot_tables(mem)?;

    let ranges: Vec<(u64, u64)> = ram.ranges().iter().map(|(a, len)| (a.0, *len)).collect();
    let zero_page = params::zero_page(&params::ZeroPageInputs {
        setup_header: loaded.setup_header,
        cmdline_addr: layout::CMDLINE_START,
        cmdline_len,
        initrd,
        rsdp_addr,
        e820: params::e820_map(&ranges),
    });
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&zero_page, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| BootError::GuestMemoryTooSmall("zero page"))?;

    Ok(BootInfo {
        format: loaded.format,
        unpacked: loaded.unpacked,
        entry: loaded.entry,
        pvm_guest,
    })
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str, max: usize) -> Result<usize, BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline
        .bytes()
        .any(|b| b == 0 || !(b.is_ascii_graphic() || b == b' '))
    {
        return Err(BootError::BadCmdline(
            "it may only hold printable ASCII characters and spaces".into(),
        ));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|_| BootError::GuestMemoryTooSmall("kernel command line"))?;
    Ok(cmdline.len())
}

/// Put the initrd as high as the kernel allows in low RAM, page aligned, and
/// above everything the kernel occupies.
fn load_initrd(
    mem: &GuestMemory,
    ram: &RamLayout,
    path: &Path,
    kernel: &kernel::LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::ReadInitrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::ReadInitrd(path.into(), e))?
        .len();
    let mut top = ram.below_hole();
    if let Some(h) = kernel.setup_header {
        if h.initrd_addr_max != 0 {
            top = top.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size_mib: size.div_ceil(1 << 20),
        kernel_end_mib: kernel.end.div_ceil(1 << 20),
        top_mib: top >> 20,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd(path.into(), std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_testkit::kernel::elf_vmlinux;
    use vireo_testkit::TempDir;

    #[test]
    fn prepares_elf_kernel_with_initrd_and_cmdline() {
        let ram = RamLayout::new(vireo_api::units::MemorySize::mib_const(32));
        let mem = crate::memory::create_guest_memory(&ram).unwrap();
        let dir = TempDir::new("boot");
        let k = dir.write("k.elf", &elf_vmlinux(0x10_0000, &[0xf4; 32]));
        let i = dir.write("initrd", &[0xab; 5000]);
        let info = prepare(
            &mem,
            &ram,
            &BootSpec {
                kernel: k.clone(),
                initrd: Some(i.clone()),
                cmdline: "console=ttyS0 panic=-1".into(),
                vcpus: 2,
            },
            false,
        )
        .unwrap();
        assert_eq!(info.entry, 0x10_0000);
        let p: linux_loader::bootparam::boot_params =
            mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let (rd, rd_size) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!(rd_size, 5000);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + 5000 <= 32 << 20);
        let byte: u8 = mem.read_obj(GuestAddress(u64::from(rd) + 4999)).unwrap();
        assert_eq!(byte, 0xab);
        let mut cmd = [0u8; 23];
        mem.read_slice(&mut cmd, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=-1\0");
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let ram = RamLayout::new(vireo_api::units::MemorySize::mib_const(16));
        let mem = crate::memory::create_guest_memory(&ram).unwrap();
        let dir = TempDir::new("boot");
        let k = dir.write("k2.elf", &elf_vmlinux(0x10_0000, &[0xf4; 32]));
        let i = dir.write("big-initrd", &vec![0u8; 17 << 20]);
        let e = prepare(
            &mem,
            &ram,
            &BootSpec {
                kernel: k.clone(),
                initrd: Some(i.clone()),
                cmdline: String::new(),
                vcpus: 1,
            },
            false,
        )
        .unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("more memory"), "{e}");
    }

    #[test]
    fn cmdline_limits() {
        let mem = crate::memory::test_memory(16);
        assert!(write_cmdline(&mem, &"a".repeat(2047), 2047).is_ok());
        let e = write_cmdline(&mem, &"a".repeat(2048), 2047).unwrap_err();
        assert!(matches!(
            e,
            BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        ));
        assert!(write_cmdline(&mem, "bad\nline", 2047).is_err());
    }
}
