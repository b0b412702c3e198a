#!/usr/bin/env python3
"""Write a tiny x86 guest that prints one marker byte on COM1 (port 0x3f8).

The default output is a *dual-entry bzImage*: one file that both vireo and
QEMU can boot, running a handful of instructions in each.

  file offset    what                          who runs it
  0x000-0x1ff    boot sector (unused, 0xaa55)   nobody
  0x1f1-0x26f    Linux setup header, protocol 2.15, LOADED_HIGH, XLF_KERNEL_64
  0x200          `jmp short 0x270` (the header's own jump)
  0x270          16-bit real-mode entry        QEMU: its firmware (qboot for
                                               -M microvm, SeaBIOS+linuxboot
                                               for -M pc) jumps to the setup
                                               code at setup_seg+0x20:0000,
                                               i.e. file offset 0x200
  0x400          protected-mode kernel, loaded at guest physical 0x100000
  0x600          64-bit entry (0x100000+0x200)  vireo: enters the bzImage's
                                               64-bit entry point in long mode

Both entries do the same thing: `out 0x3f8, MARKER`, then (``--then halt``,
the default) `cli; hlt` forever so the VMM stays alive for a memory reading,
or (``--then poweroff``) write 0x3400 to port 0x604 (vireo's ACPI PM1a_CNT:
SLP_TYP=5, SLP_EN, i.e. S5) before halting. Only vireo has a PM1a control
block at 0x604; on QEMU the poweroff write is ignored and the guest halts.

``--format elf`` writes a 64-bit ELF vmlinux instead (vireo only: QEMU's
-kernel does not boot a plain ELF64 without a PVH note).

Standard library only.  Usage:

  python3 bench/tiny_guest.py OUT [--marker '!'] [--then halt|poweroff] [--format bzimage|elf]
"""

import argparse
import struct
import sys

SETUP_SECTS = 1  # setup = boot sector + 1 sector = 0x400 bytes
SETUP_SIZE = (SETUP_SECTS + 1) * 512
REAL_MODE_ENTRY = 0x270  # file offset of the 16-bit code (header's jmp target)
PM_LOAD_ADDR = 0x100000  # where both VMMs load the protected-mode part
ENTRY64_OFFSET = 0x200  # boot protocol: 64-bit entry = load address + 0x200
PM_SIZE = 0x400  # protected-mode part: 0x200 of padding + the 64-bit code


def out_marker_16(marker: int) -> bytes:
    """16-bit code: mov dx,0x3f8; mov al,marker; out dx,al."""
    return bytes([0xBA, 0xF8, 0x03, 0xB0, marker, 0xEE])


def out_marker_64(marker: int) -> bytes:
    """64-bit code: mov dx,0x3f8 (0x66 prefix); mov al,marker; out dx,al."""
    return bytes([0x66, 0xBA, 0xF8, 0x03, 0xB0, marker, 0xEE])


def poweroff_16() -> bytes:
    """mov dx,0x604; mov ax,0x3400; out dx,ax (16-bit operand size)."""
    return bytes([0xBA, 0x04, 0x06, 0xB8, 0x00, 0x34, 0xEF])


def poweroff_64() -> bytes:
    """The same with 0x66 operand-size prefixes in 64-bit mode."""
    return bytes([0x66, 0xBA, 0x04, 0x06, 0x66, 0xB8, 0x00, 0x34, 0x66, 0xEF])


# cli; hlt; jmp back to hlt (an NMI or SMI would resume after hlt)
HALT_FOREVER = bytes([0xFA, 0xF4, 0xEB, 0xFD])


def code16(marker: int, then: str) -> bytes:
    c = out_marker_16(marker)
    if then == "poweroff":
        c += poweroff_16()
    return c + HALT_FOREVER


def code64(marker: int, then: str) -> bytes:
    c = out_marker_64(marker)
    if then == "poweroff":
        c += poweroff_64()
    return c + HALT_FOREVER


def bzimage(marker: int, then: str) -> bytes:
    f = bytearray(SETUP_SIZE + PM_SIZE)

    # --- setup header (Documentation/arch/x86/boot.rst) ---
    def put(off, fmt, val):
        struct.pack_into("<" + fmt, f, off, val)

    put(0x1F1, "B", SETUP_SECTS)  # setup_sects
    put(0x1F4, "I", PM_SIZE // 16)  # syssize (16-byte paragraphs)
    put(0x1FE, "H", 0xAA55)  # boot_flag
    # 0x200: jump: the real-mode entry; a 2-byte short jmp to REAL_MODE_ENTRY
    f[0x200] = 0xEB
    f[0x201] = REAL_MODE_ENTRY - 0x202
    f[0x202:0x206] = b"HdrS"  # header magic
    put(0x206, "H", 0x020F)  # version 2.15
    put(0x211, "B", 0x01)  # loadflags: LOADED_HIGH (protected-mode part at 1 MiB)
    put(0x214, "I", PM_LOAD_ADDR)  # code32_start
    put(0x22C, "I", 0x7FFFFFFF)  # initrd_addr_max
    put(0x230, "I", 0x200000)  # kernel_alignment
    put(0x236, "H", 0x0001)  # xloadflags: XLF_KERNEL_64 (64-bit entry at +0x200)
    put(0x238, "I", 2047)  # cmdline_size
    put(0x260, "I", 0x10000)  # init_size: 64 KiB is plenty

    c16 = code16(marker, then)
    assert REAL_MODE_ENTRY + len(c16) <= SETUP_SIZE
    f[REAL_MODE_ENTRY : REAL_MODE_ENTRY + len(c16)] = c16

    c64 = code64(marker, then)
    off = SETUP_SIZE + ENTRY64_OFFSET
    f[off : off + len(c64)] = c64
    return bytes(f)


def elf(marker: int, then: str) -> bytes:
    """ELF64 ET_EXEC EM_X86_64, one PT_LOAD at 0x100000 (p_offset 0x1000)."""
    code = code64(marker, then)
    f = bytearray(0x1000)
    f[0:4] = b"\x7fELF"
    f[4], f[5], f[6] = 2, 1, 1  # ELFCLASS64, little endian, EV_CURRENT
    struct.pack_into("<HHIQQQIHHHHHH", f, 16,
                     2, 62, 1,  # ET_EXEC, EM_X86_64, EV_CURRENT
                     PM_LOAD_ADDR,  # e_entry
                     64, 0,  # e_phoff, e_shoff
                     0, 64, 56, 1, 0, 0, 0)  # flags, ehsize, phentsize, phnum, sh*
    struct.pack_into("<IIQQQQQQ", f, 64,
                     1, 5,  # PT_LOAD, R+X
                     0x1000, PM_LOAD_ADDR, PM_LOAD_ADDR,  # offset, vaddr, paddr
                     len(code), len(code), 0x1000)  # filesz, memsz, align
    return bytes(f) + code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="file to write")
    ap.add_argument("--marker", default="!", help="the byte printed on COM1 (one ASCII character; default '!')")
    ap.add_argument("--then", choices=["halt", "poweroff"], default="halt",
                    help="after the marker: halt forever (default) or ACPI S5 via port 0x604 (vireo)")
    ap.add_argument("--format", choices=["bzimage", "elf"], default="bzimage")
    a = ap.parse_args(argv)
    if len(a.marker.encode()) != 1:
        ap.error("--marker must be exactly one byte")
    marker = a.marker.encode()[0]
    data = bzimage(marker, a.then) if a.format == "bzimage" else elf(marker, a.then)
    with open(a.out, "wb") as fh:
        fh.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
