//! Kernel images: recognise a 64-bit ELF `vmlinux` or a `bzImage` and load it
//! with the rust-vmm `linux-loader` crate.

use std::io::Cursor;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::layout;
use crate::memory::GuestMemory;

use super::BootError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF vmlinux",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const HDRS_OFFSET: usize = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// The boot protocol's 64-bit entry lives 0x200 bytes into the protected-mode
/// kernel of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1;

/// Recognise the format from the first bytes of the file.
pub fn detect_format(image: &[u8]) -> Option<KernelFormat> {
    if image.starts_with(ELF_MAGIC) {
        Some(KernelFormat::Elf)
    } else if image.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(&HDRS_MAGIC[..]) {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Guest physical address of the 64-bit entry point.
    pub entry: u64,
    /// First byte after the memory the kernel needs (its image or, for a
    /// bzImage, the `init_size` it decompresses into).
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// A bzImage whose payload was decompressed on the host and loaded as
    /// the vmlinux ELF it holds.
    pub unpacked: bool,
}

/// The largest kernel vireo unpacks on the host.
const MAX_UNPACKED_KERNEL: u64 = 1 << 30;

/// Decompress a bzImage's payload (the vmlinux ELF) on the host. `Ok(None)`
/// when there is no payload vireo can find or a compression it does not
/// unpack (the kernel's own decompressor then runs in the guest); an error
/// for a recognised payload that is corrupt.
pub fn unpack_bzimage(image: &[u8], hdr: &setup_header) -> Result<Option<Vec<u8>>, String> {
    unpack_bzimage_limited(image, hdr, MAX_UNPACKED_KERNEL)
}

/// The most memory reserved up front for an unpacked kernel: the size the
/// trailer claims is only believed as far as the decompressed bytes go.
const MAX_UNPACK_RESERVE: u64 = 64 << 20;

/// [`unpack_bzimage`] accepting at most `max` unpacked bytes (the fuzz
/// target keeps each run small).
pub fn unpack_bzimage_limited(
    image: &[u8],
    hdr: &setup_header,
    max: u64,
) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    // The payload fields exist from boot protocol 2.08. A header without
    // them, or with fields that do not describe a payload inside the file,
    // leaves the work to the kernel's own decompressor (which finds its
    // payload without the header).
    if hdr.version < 0x0208 {
        return Ok(None);
    }
    let start = (setup_sects + 1) * 512 + hdr.payload_offset as usize;
    let Some(payload) = start
        .checked_add(hdr.payload_length as usize)
        .and_then(|end| image.get(start..end))
        .filter(|p| p.len() > 4)
    else {
        return Ok(None);
    };
    // The build appends the unpacked size as a little-endian u32.
    let (stream, size) = payload.split_at(payload.len() - 4);
    let size = u64::from(u32::from_le_bytes([size[0], size[1], size[2], size[3]]));
    if size > max {
        return Err(format!(
            "the payload claims {size} bytes unpacked, more than vireo accepts"
        ));
    }
    let reader: Box<dyn Read + '_> = match stream {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Box::new(xz2::read::XzDecoder::new(stream)),
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(stream)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(stream)
                .map_err(|e| format!("zstd payload: {e}"))?,
        ),
        _ => return Ok(None),
    };
    let mut out = Vec::with_capacity(size.min(MAX_UNPACK_RESERVE) as usize);
    reader
        .take(size + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot decompress the payload: {e}"))?;
    if out.len() as u64 != size {
        return Err(format!(
            "the payload unpacked to {} bytes, its trailer says {size}",
            out.len()
        ));
    }
    if !out.starts_with(ELF_MAGIC) {
        return Err("the unpacked payload is not an ELF vmlinux".into());
    }
    Ok(Some(out))
}

/// Load `image` (the bytes of the file at `path`, named in errors). With
/// `unpack`, a bzImage is decompressed on the host when vireo knows its
/// payload's compression, and the vmlinux inside is loaded instead.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &str,
    image: &[u8],
    unpack: bool,
) -> Result<LoadedKernel, BootError> {
    let format = detect_format(image).ok_or_else(|| BootError::NotAKernel(path.into()))?;
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    let mut reader = Cursor::new(image);
    let bad = |e: linux_loader::loader::Error| BootError::BadKernel {
        path: path.into(),
        format,
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
            check_elf_header(path, image)?;
            let r = Elf::load(mem, None, &mut reader, highmem).map_err(bad)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
                unpacked: false,
            })
        }
        KernelFormat::BzImage => {
            let hdr = read_setup_header(image).ok_or_else(|| BootError::NotAKernel(path.into()))?;
            let version = hdr.version;
            let xloadflags = hdr.xloadflags;
            if version < 0x0206 || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::BadKernel {
                    path: path.into(),
                    format,
                    reason: format!(
                        "boot protocol {}.{:02} without a 64-bit entry point; vireo needs protocol 2.06+ with XLF_KERNEL_64 (a 64-bit kernel)",
                        version >> 8,
                        version & 0xff
                    ),
                });
            }
            if unpack {
                let vmlinux =
                    unpack_bzimage(image, &hdr).map_err(|reason| BootError::BadKernel {
                        path: path.into(),
                        format,
                        reason,
                    })?;
                if let Some(vmlinux) = vmlinux {
                    check_elf_header(path, &vmlinux)?;
                    let r =
                        Elf::load(mem, None, &mut Cursor::new(&vmlinux), highmem).map_err(bad)?;
                    let init_end = hdr.pref_address.saturating_add(u64::from(hdr.init_size));
                    return Ok(LoadedKernel {
                        format,
                        entry: r.kernel_load.0,
                        end: r.kernel_end.max(init_end),
                        // The kernel reads its own header back (init_size,
                        // kernel_alignment): keep the bzImage's.
                        setup_header: Some(hdr),
                        unpacked: true,
                    });
                }
            }
            let r = BzImage::load(
                mem,
                Some(GuestAddress(layout::HIGH_MEMORY_START)),
                &mut reader,
                highmem,
            )
            .map_err(bad)?;
            let init_size = u64::from(hdr.init_size);
            let end = r.kernel_end.max(layout::HIGH_MEMORY_START + init_size);
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                setup_header: r.setup_header,
                unpacked: false,
            })
        }
    }
}

/// linux-loader accepts some ELF files we cannot boot; refuse them with a
/// clear reason first.
fn check_elf_header(path: &str, image: &[u8]) -> Result<(), BootError> {
    let fail = |reason: &str| BootError::BadKernel {
        path: path.into(),
        format: KernelFormat::Elf,
        reason: reason.into(),
    };
    if image.len() < 64 {
        return Err(fail("the file is shorter than an ELF header (truncated?)"));
    }
    if image[4] != 2 {
        return Err(fail("not a 64-bit ELF (ELFCLASS64 required)"));
    }
    if image[5] != 1 {
        return Err(fail("not a little-endian ELF"));
    }
    let machine = u16::from_le_bytes([image[18], image[19]]);
    if machine != 62 {
        return Err(fail("not an x86-64 ELF (e_machine is not EM_X86_64)"));
    }
    Ok(())
}

pub(crate) fn read_setup_header(image: &[u8]) -> Option<setup_header> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = image.get(0x1f1..0x1f1 + size)?;
    let mut hdr = setup_header::default();
    // setup_header is plain old data (ByteValued), so any byte pattern is a
    // valid value.
    vm_memory::ByteValued::as_mut_slice(&mut hdr).copy_from_slice(bytes);
    Some(hdr)
}

/// Whether the kernel image carries the PVM guest support of the PVM
/// patch set (its log prefix is in the image when CONFIG_PVM_GUEST is set).
/// Only uncompressed images can be checked; a bzImage reports `None`.
pub fn mentions_pvm_guest(image: &[u8]) -> Option<bool> {
    match detect_format(image)? {
        KernelFormat::Elf => Some(image.windows(11).any(|w| w == b"pvm-guest: ")),
        KernelFormat::BzImage => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vireo_testkit::kernel::{bzimage_with, elf_vmlinux};
    use vm_memory::Bytes;

    /// What the loader tests' bzImages decompress into (4 MiB).
    pub(crate) const INIT_SIZE: u32 = 0x40_0000;

    /// A bzImage whose payload is `vmlinux` compressed by `compress`, with
    /// the size trailer and payload fields a real build writes.
    fn packed_bzimage(vmlinux: &[u8], compress: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let mut payload = compress(vmlinux);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        // 0x100 bytes of "decompressor" before the payload.
        let mut pm = vec![0xccu8; 0x100];
        pm.extend_from_slice(&payload);
        let mut f = bzimage_with(0x20f, 1, INIT_SIZE, &pm);
        f[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn unpacks_gzip_and_xz_payloads_on_the_host() {
        let vmlinux = elf_vmlinux(0x20_0000, &[0xf4, 0x90, 0x90, 0x0f, 0x0b]);
        for (name, image) in [
            ("gzip", packed_bzimage(&vmlinux, gzip)),
            ("xz", packed_bzimage(&vmlinux, xz)),
        ] {
            let mem = crate::memory::test_memory(32);
            let k = load_kernel(&mem, name, &image, true).unwrap();
            assert!(k.unpacked, "{name}");
            assert_eq!(k.format, KernelFormat::BzImage);
            assert_eq!(k.entry, 0x20_0000, "{name}: the vmlinux's entry");
            assert_eq!(k.end, 0x100_0000 + 0x40_0000, "pref_address + init_size");
            assert!(k.setup_header.is_some(), "the bzImage's header is kept");
            let b: [u8; 5] = mem.read_obj(GuestAddress(0x20_0000)).unwrap();
            assert_eq!(b, [0xf4, 0x90, 0x90, 0x0f, 0x0b]);
            // Without unpacking, the same file boots its own decompressor.
            let k = load_kernel(&mem, name, &image, false).unwrap();
            assert!(!k.unpacked);
            assert_eq!(k.entry, 0x10_0200);
        }
    }

    #[test]
    fn corrupt_or_unknown_payloads() {
        let vmlinux = elf_vmlinux(0x20_0000, &[0xf4]);
        let mem = crate::memory::test_memory(32);
        // A flipped byte inside the xz stream: refused, naming the problem.
        let mut image = packed_bzimage(&vmlinux, xz);
        let mid = 5 * 512 + 0x100 + 40;
        image[mid] ^= 0xff;
        let e = load_kernel(&mem, "bad", &image, true).unwrap_err();
        assert!(e.to_string().contains("payload"), "{e}");
        // A wrong size trailer.
        let mut image = packed_bzimage(&vmlinux, gzip);
        let n = image.len();
        image[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert!(load_kernel(&mem, "size", &image, true).is_err());
        // A compression vireo does not unpack (LZ4): the guest decompresses.
        let image = packed_bzimage(&vmlinux, |d| {
            let mut v = vec![0x02, 0x21, 0x4c, 0x18];
            v.extend_from_slice(d);
            v
        });
        let k = load_kernel(&mem, "lz4", &image, true).unwrap();
        assert!(!k.unpacked);
        // A payload that is not an ELF.
        let image = packed_bzimage(b"not an elf at all", gzip);
        assert!(load_kernel(&mem, "notelf", &image, true).is_err());
        // Payload fields pointing past the file, or none at all (protocol
        // before 2.08, or zero): the guest's decompressor does the work.
        let mut image = packed_bzimage(&vmlinux, gzip);
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!load_kernel(&mem, "past", &image, true).unwrap().unpacked);
        let mut payload = vec![0u8; 0x200];
        payload.push(0xf4);
        let k = load_kernel(
            &mem,
            "nopayload",
            &bzimage_with(0x20f, 1, INIT_SIZE, &payload),
            true,
        )
        .unwrap();
        assert!(!k.unpacked);
        assert_eq!(k.entry, 0x10_0200);
    }

    #[test]
    fn loads_elf_at_paddr_and_enters_at_e_entry() {
        let mem = crate::memory::test_memory(16);
        let image = elf_vmlinux(0x20_0000, &[0xf4, 0x90, 0x90]);
        let k = load_kernel(&mem, "vmlinux", &image, false).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, 0x20_0000);
        let b: u8 = mem.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn loads_bzimage_with_64bit_entry_and_init_size() {
        let mem = crate::memory::test_memory(16);
        let mut payload = vec![0u8; 0x200];
        payload.push(0xf4);
        let k = load_kernel(
            &mem,
            "bzImage",
            &bzimage_with(0x20f, 1, INIT_SIZE, &payload),
            false,
        )
        .unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + 0x40_0000);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0200)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn refuses_old_or_32bit_bzimage() {
        let mem = crate::memory::test_memory(16);
        let e = load_kernel(
            &mem,
            "old",
            &bzimage_with(0x205, 1, INIT_SIZE, &[0; 0x300]),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("2.05"), "{e}");
        let e = load_kernel(
            &mem,
            "32",
            &bzimage_with(0x20f, 0, INIT_SIZE, &[0; 0x300]),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("64-bit"), "{e}");
    }

    #[test]
    fn refuses_non_kernels_truncated_and_corrupt_files() {
        let mem = crate::memory::test_memory(16);
        let e = load_kernel(&mem, "junk.bin", b"hello world, not a kernel", false).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)));
        assert!(e.to_string().contains("junk.bin"));

        let elf = elf_vmlinux(0x20_0000, &[0x90; 64]);
        for cut in [10, 63, 100, 0x1010] {
            assert!(
                load_kernel(&mem, "cut", &elf[..cut], false).is_err(),
                "cut at {cut}"
            );
        }
        let mut wrong_class = elf.clone();
        wrong_class[4] = 1;
        assert!(load_kernel(&mem, "x", &wrong_class, false).is_err());
        let mut wrong_machine = elf.clone();
        wrong_machine[18] = 3;
        assert!(load_kernel(&mem, "x", &wrong_machine, false).is_err());
        // Program header pointing far outside the file.
        let mut bad_ph = elf.clone();
        bad_ph[64 + 8..64 + 16].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
        assert!(load_kernel(&mem, "x", &bad_ph, false).is_err());
        // Segment outside guest memory.
        let far = elf_vmlinux(0x4000_0000, &[0x90; 16]);
        assert!(load_kernel(&mem, "x", &far, false).is_err());

        let bz = bzimage_with(0x20f, 1, INIT_SIZE, &[0u8; 0x300]);
        assert!(load_kernel(&mem, "cut", &bz[..0x210], false).is_err());
        assert!(load_kernel(&mem, "cut", &bz[..0x300], false).is_err());
    }

    #[test]
    fn pvm_marker_only_checked_in_uncompressed_images() {
        let mut with = elf_vmlinux(0x20_0000, &[0x90; 16]);
        with.extend_from_slice(b"..pvm-guest: ..");
        assert_eq!(mentions_pvm_guest(&with), Some(true));
        assert_eq!(
            mentions_pvm_guest(&elf_vmlinux(0x20_0000, &[0; 4])),
            Some(false)
        );
        assert_eq!(
            mentions_pvm_guest(&bzimage_with(0x20f, 1, INIT_SIZE, &[0; 4])),
            None
        );
    }
}
