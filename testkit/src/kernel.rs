//! Kernel images around a blob of machine code, as the boot protocol
//! describes them: an ELF vmlinux and a bzImage (Documentation/arch/x86/
//! boot.rst), for the loader's unit tests and the tiny guests of the
//! integration tests.

use iced_x86::code_asm::*;

/// Where the boot protocol loads the kernel (and where the ELF segment goes).
pub const KERNEL_LOAD: u64 = 0x10_0000;
/// The 64-bit entry point of a bzImage: 0x200 bytes into the protected-mode
/// part, which is loaded at [`KERNEL_LOAD`].
pub const BZIMAGE_ENTRY64: u64 = KERNEL_LOAD + 0x200;

/// xloadflags: the kernel has a 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 0x0001;
/// xloadflags: the kernel may be loaded above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 0x0002;

fn put16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the single PT_LOAD segment in the ELF file (page aligned).
pub const ELF_SEGMENT_OFFSET: usize = 0x1000;

/// A minimal ELF64 x86-64 executable: one PT_LOAD holding `code` at physical
/// (and virtual) address `paddr`, entered there like a vmlinux whose
/// `e_entry` is the physical 64-bit entry point.
pub fn elf_vmlinux(paddr: u64, code: &[u8]) -> Vec<u8> {
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    let mut f = vec![0u8; ELF_SEGMENT_OFFSET];
    // e_ident
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // ELFDATA2LSB
    f[6] = 1; // EV_CURRENT
    f[7] = 0; // ELFOSABI_SYSV
    put16(&mut f, 16, 2); // e_type = ET_EXEC
    put16(&mut f, 18, 62); // e_machine = EM_X86_64
    put32(&mut f, 20, 1); // e_version
    put64(&mut f, 24, paddr); // e_entry
    put64(&mut f, 32, u64::from(EHDR_SIZE)); // e_phoff: right after the header
    put64(&mut f, 40, 0); // e_shoff: no sections
    put32(&mut f, 48, 0); // e_flags
    put16(&mut f, 52, EHDR_SIZE); // e_ehsize
    put16(&mut f, 54, PHDR_SIZE); // e_phentsize
    put16(&mut f, 56, 1); // e_phnum
    put16(&mut f, 58, 64); // e_shentsize
    put16(&mut f, 60, 0); // e_shnum
    put16(&mut f, 62, 0); // e_shstrndx

    let ph = usize::from(EHDR_SIZE);
    let len = code.len() as u64;
    put32(&mut f, ph, 1); // p_type = PT_LOAD
    put32(&mut f, ph + 4, 7); // p_flags = R | W | X
    put64(&mut f, ph + 8, ELF_SEGMENT_OFFSET as u64); // p_offset
    put64(&mut f, ph + 16, paddr); // p_vaddr
    put64(&mut f, ph + 24, paddr); // p_paddr
    put64(&mut f, ph + 32, len); // p_filesz
    put64(&mut f, ph + 40, len); // p_memsz
    put64(&mut f, ph + 48, 0x1000); // p_align
    f.extend_from_slice(code);
    f
}

/// Number of 512-byte setup sectors after the boot sector in [`bzimage`].
pub const BZ_SETUP_SECTS: u8 = 4;
/// File offset of the protected-mode part of [`bzimage`].
pub const BZ_PAYLOAD_OFFSET: usize = (BZ_SETUP_SECTS as usize + 1) * 512;
/// Boot protocol version written by [`bzimage`] (2.15).
pub const BZ_PROTOCOL: u16 = 0x020f;
const BZ_KERNEL_VERSION_OFFSET: usize = 0x300;
const BZ_SETUP_CODE_OFFSET: usize = 0x26c;

/// A bzImage per the Linux x86 boot protocol (Documentation/arch/x86/boot.rst)
/// whose protected-mode part is 0x200 bytes of 32-bit entry (a halt loop,
/// never used by a 64-bit loader) followed by `code64`, which must be
/// assembled for [`BZIMAGE_ENTRY64`].
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    // The 32-bit entry at the load address: halt forever.
    let mut entry32 = {
        let mut a = CodeAssembler::new(32).expect("32-bit assembler");
        let mut l = a.create_label();
        a.set_label(&mut l).expect("label");
        a.cli().expect("cli");
        a.hlt().expect("hlt");
        a.jmp(l).expect("jmp");
        a.assemble(KERNEL_LOAD)
            .expect("assembling the 32-bit entry")
    };
    assert!(entry32.len() <= 0x200);
    entry32.resize(0x200, 0xcc);
    let mut payload = entry32;
    payload.extend_from_slice(code64);
    // syssize counts 16-byte paragraphs; keep the file a whole number of them.
    payload.resize(payload.len().next_multiple_of(16), 0);
    bzimage_with(
        BZ_PROTOCOL,
        XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
        payload.len().next_multiple_of(0x1000) as u32,
        &payload,
    )
}

/// The bzImage [`bzimage`] writes, with protocol `version`, `xloadflags`
/// and `init_size` as given and `payload` as its protected-mode part (for
/// loader tests that vary them).
pub fn bzimage_with(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; BZ_PAYLOAD_OFFSET];
    // The real-mode setup code (never run by vireo): the jump at 0x200 goes
    // past the header to a halt loop, as a real setup would start there.
    let setup = {
        let mut a = CodeAssembler::new(16).expect("16-bit assembler");
        a.jmp(BZ_SETUP_CODE_OFFSET as u64).expect("jmp");
        a.assemble(0x200).expect("assembling the setup jump")
    };
    assert_eq!(setup.len(), 2, "the jump at 0x200 must be a short jump");
    f[0x200..0x202].copy_from_slice(&setup);
    let stop = {
        let mut a = CodeAssembler::new(16).expect("16-bit assembler");
        let mut l = a.create_label();
        a.set_label(&mut l).expect("label");
        a.cli().expect("cli");
        a.hlt().expect("hlt");
        a.jmp(l).expect("jmp");
        a.assemble(BZ_SETUP_CODE_OFFSET as u64)
            .expect("assembling the setup stop")
    };
    f[BZ_SETUP_CODE_OFFSET..BZ_SETUP_CODE_OFFSET + stop.len()].copy_from_slice(&stop);
    let kernel_version = b"vireo test guest\0";
    f[BZ_KERNEL_VERSION_OFFSET..BZ_KERNEL_VERSION_OFFSET + kernel_version.len()]
        .copy_from_slice(kernel_version);

    // struct setup_header, at 0x1f1.
    f[0x1f1] = BZ_SETUP_SECTS; // setup_sects
    put16(&mut f, 0x1f2, 0); // root_flags
    put32(&mut f, 0x1f4, (payload.len() / 16) as u32); // syssize
    put16(&mut f, 0x1f8, 0); // ram_size (obsolete)
    put16(&mut f, 0x1fa, 0xffff); // vid_mode: "normal"
    put16(&mut f, 0x1fc, 0); // root_dev
    put16(&mut f, 0x1fe, 0xaa55); // boot_flag
                                  // 0x200: jump (above)
    f[0x202..0x206].copy_from_slice(b"HdrS"); // header
    put16(&mut f, 0x206, version); // version
    put32(&mut f, 0x208, 0); // realmode_swtch
    put16(&mut f, 0x20c, 0x1000); // start_sys_seg (obsolete)
    put16(&mut f, 0x20e, (BZ_KERNEL_VERSION_OFFSET - 0x200) as u16); // kernel_version
    f[0x210] = 0; // type_of_loader: filled in by the boot loader
    f[0x211] = 0x01; // loadflags: LOADED_HIGH
    put16(&mut f, 0x212, 0x8000); // setup_move_size
    put32(&mut f, 0x214, KERNEL_LOAD as u32); // code32_start
    put32(&mut f, 0x218, 0); // ramdisk_image
    put32(&mut f, 0x21c, 0); // ramdisk_size
    put32(&mut f, 0x220, 0); // bootsect_kludge
    put16(&mut f, 0x224, 0); // heap_end_ptr
    f[0x226] = 0; // ext_loader_ver
    f[0x227] = 0; // ext_loader_type
    put32(&mut f, 0x228, 0); // cmd_line_ptr
    put32(&mut f, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut f, 0x230, 0x20_0000); // kernel_alignment
    f[0x234] = 1; // relocatable_kernel
    f[0x235] = 21; // min_alignment: 2 MiB, as log2
    put16(&mut f, 0x236, xloadflags); // xloadflags
    put32(&mut f, 0x238, 2047); // cmdline_size
    put32(&mut f, 0x23c, 0); // hardware_subarch
    put64(&mut f, 0x240, 0); // hardware_subarch_data
    put32(&mut f, 0x248, 0); // payload_offset: nothing compressed
    put32(&mut f, 0x24c, 0); // payload_length
    put64(&mut f, 0x250, 0); // setup_data
    put64(&mut f, 0x258, KERNEL_LOAD); // pref_address
    put32(&mut f, 0x260, init_size); // init_size
    put32(&mut f, 0x264, 0); // handover_offset
    put32(&mut f, 0x268, 0); // kernel_info_offset

    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn elf_vmlinux_layout() {
        let code = [0x90u8; 37];
        let f = elf_vmlinux(KERNEL_LOAD, &code);
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!((f[4], f[5], f[6]), (2, 1, 1));
        assert_eq!(u16_at(&f, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&f, 18), 62, "EM_X86_64");
        assert_eq!(u64_at(&f, 24), 0x10_0000, "e_entry");
        let phoff = u64_at(&f, 32) as usize;
        assert_eq!(phoff, 64);
        assert_eq!(u16_at(&f, 54), 56, "e_phentsize");
        assert_eq!(u16_at(&f, 56), 1, "e_phnum");
        assert_eq!(u32_at(&f, phoff), 1, "PT_LOAD");
        let off = u64_at(&f, phoff + 8) as usize;
        assert_eq!(off % 4096, 0);
        assert_eq!(u64_at(&f, phoff + 16), 0x10_0000);
        assert_eq!(u64_at(&f, phoff + 24), 0x10_0000);
        assert_eq!(u64_at(&f, phoff + 32), code.len() as u64);
        assert_eq!(&f[off..off + code.len()], &code);
        assert_eq!(f.len(), off + code.len());
    }

    #[test]
    fn bzimage_layout() {
        let code = [0x90u8; 45];
        let f = bzimage(&code);
        let setup_sects = usize::from(f[0x1f1]);
        assert_eq!(setup_sects, 4);
        assert_eq!(u16_at(&f, 0x1fe), 0xaa55);
        assert_eq!(f[0x200], 0xeb, "short jump at 0x200");
        assert_eq!(0x202 + usize::from(f[0x201]), BZ_SETUP_CODE_OFFSET);
        assert_eq!(&f[0x202..0x206], b"HdrS");
        assert_eq!(u16_at(&f, 0x206), 0x020f);
        assert_eq!(f[0x211] & 1, 1, "LOADED_HIGH");
        assert_eq!(u32_at(&f, 0x214), 0x10_0000);
        assert_eq!(u32_at(&f, 0x230), 0x20_0000);
        assert_eq!(f[0x234], 1);
        assert_eq!(u16_at(&f, 0x236) & 3, 3);
        assert_eq!(u64_at(&f, 0x258), 0x10_0000);
        let payload = &f[(setup_sects + 1) * 512..];
        assert_eq!(u32_at(&f, 0x1f4) as usize * 16, payload.len(), "syssize");
        assert!(u32_at(&f, 0x260) as usize >= payload.len(), "init_size");
        assert_eq!(&payload[0x200..0x200 + code.len()], &code);
        let kv = 0x200 + usize::from(u16_at(&f, 0x20e));
        assert!(f[kv..].starts_with(b"vireo test guest\0"));
    }
}
