//! `/bin/vsock-send`: a tiny static x86-64 Linux program that the kit
//! builder assembles itself (iced-x86's `CodeAssembler`), because busybox
//! has no AF_VSOCK support and there is no C compiler for the guest.
//!
//! ```text
//! vsock-send CID PORT
//! ```
//!
//! connects an AF_VSOCK stream socket to CID:PORT (decimal, each 0 to
//! 4294967295), copies stdin to it until EOF, shuts down the sending side
//! (`shutdown(SHUT_WR)`, so the peer reads EOF), then copies everything the
//! peer sends to stdout until the peer closes, and exits 0. A guest reaches
//! the host with CID 2: `echo hi | vsock-send 2 5000` talks to the Unix
//! socket `PATH_5000` of `vireo run --vsock cid=3,socket=PATH`.
//!
//! Exit status: 0 on success; 1 when a system call fails, after
//! `vsock-send: STEP failed (errno N)` on stderr, STEP being one of
//! `socket`, `connect`, `read stdin`, `send`, `shutdown`, `receive`,
//! `write stdout`; 2 for bad arguments (a usage line on stderr).
//!
//! Only raw system calls are used. Reads and writes interrupted by a signal
//! (`EINTR`) are retried and short writes are continued. Data goes to the
//! socket with `sendto(..., MSG_NOSIGNAL)`, so a peer that closed early is a
//! `send failed (errno 32)` rather than a silent death by SIGPIPE.
//!
//! The file is one ELF64 `ET_EXEC` with a single read+execute `PT_LOAD`
//! segment mapping the whole file at [`LOAD_ADDR`]; the code starts right
//! after the two headers. The 64 KiB copy buffer and the socket address
//! live on the stack.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Where the program's one segment is mapped.
pub const LOAD_ADDR: u64 = 0x40_0000;
const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
/// File offset (and offset from [`LOAD_ADDR`]) of the first instruction.
const CODE_OFFSET: u64 = EHDR_SIZE as u64 + PHDR_SIZE as u64;

/// Size of the copy buffer on the stack.
const BUF_SIZE: i32 = 64 * 1024;
/// Stack frame: the 16-byte socket address, padding, then the buffer.
const BUF_AT: i32 = 32;
const FRAME: i32 = BUF_AT + BUF_SIZE;
/// Where the error path formats its errno digits (inside the buffer).
const DIGITS_END: i32 = BUF_AT + 64;

const SYS_READ: i32 = 0;
const SYS_WRITE: i32 = 1;
const SYS_SOCKET: i32 = 41;
const SYS_CONNECT: i32 = 42;
const SYS_SENDTO: i32 = 44;
const SYS_SHUTDOWN: i32 = 48;
const SYS_EXIT_GROUP: i32 = 231;
const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SHUT_WR: i32 = 1;
const MSG_NOSIGNAL: i32 = 0x4000;
const EINTR: i32 = 4;
const EIO: i32 = 5;

const USAGE: &[u8] = concat!(
    "usage: vsock-send CID PORT\n",
    "  connect to AF_VSOCK CID:PORT (decimal; the host is CID 2), send stdin,\n",
    "  shut down sending, then copy the reply to stdout\n",
)
.as_bytes();

/// The address family the program connects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// AF_VSOCK: `struct sockaddr_vm { u16 family; u16 reserved; u32 port;
    /// u32 cid; u8 flags; u8 zero[3]; }`. What the kit ships.
    Vsock,
    /// AF_INET, for testing the same copy loops on a host without vsock:
    /// CID is the IPv4 address as a host-order number (127.0.0.1 is
    /// 2130706433) and PORT must fit 16 bits.
    #[cfg(test)]
    Inet,
}

/// The complete executable, ready to be written with mode 0755.
pub fn elf() -> Result<Vec<u8>, IcedError> {
    elf_for(Family::Vsock)
}

/// The executable connecting with `family` (see [`Family`]).
pub fn elf_for(family: Family) -> Result<Vec<u8>, IcedError> {
    let code = assemble(family, LOAD_ADDR + CODE_OFFSET)?;
    Ok(elf_image(&code))
}

/// Wrap `code` (assembled for `LOAD_ADDR + CODE_OFFSET`, entry at its first
/// byte) in an ELF64 header and one PT_LOAD program header.
fn elf_image(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(CODE_OFFSET as usize + code.len());
    let total = CODE_OFFSET + code.len() as u64;
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV.
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(LOAD_ADDR + CODE_OFFSET).to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&PHDR_SIZE.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(f.len(), usize::from(EHDR_SIZE));
    // The program header: the whole file, read + execute, at LOAD_ADDR.
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: PF_R | PF_X
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&total.to_le_bytes()); // p_filesz
    f.extend_from_slice(&total.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    debug_assert_eq!(f.len() as u64, CODE_OFFSET);
    f.extend_from_slice(code);
    f
}

/// A message in the program's data, with its length.
struct Text {
    label: CodeLabel,
    bytes: Vec<u8>,
}

/// The program: code followed by its messages, assembled for address `ip`.
fn assemble(family: Family, ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let usage_msg = Text {
        label: a.create_label(),
        bytes: USAGE.to_vec(),
    };
    let step = |a: &mut CodeAssembler, name: &str| Text {
        label: a.create_label(),
        bytes: format!("vsock-send: {name} failed (errno ").into_bytes(),
    };
    let socket_msg = step(&mut a, "socket");
    let connect_msg = step(&mut a, "connect");
    let read_msg = step(&mut a, "read stdin");
    let send_msg = step(&mut a, "send");
    let shutdown_msg = step(&mut a, "shutdown");
    let receive_msg = step(&mut a, "receive");
    let write_msg = step(&mut a, "write stdout");

    let mut usage = a.create_label();
    let mut parse_u32 = a.create_label();
    let mut write_all = a.create_label();
    let mut fail = a.create_label();

    // Registers kept across the program: rbx = the entry stack pointer
    // (argc, argv), r12d = CID, r13d = PORT, r14 = the socket,
    // r15 = the system call write_all uses.
    a.mov(rbx, rsp)?;
    a.sub(rsp, FRAME)?;

    // Arguments: exactly two decimal numbers.
    a.cmp(qword_ptr(rbx), 3)?;
    a.jne(usage)?;
    a.mov(rdi, qword_ptr(rbx + 16))?;
    a.call(parse_u32)?;
    a.test(rax, rax)?;
    a.js(usage)?;
    a.mov(r12d, eax)?;
    a.mov(rdi, qword_ptr(rbx + 24))?;
    a.call(parse_u32)?;
    a.test(rax, rax)?;
    a.js(usage)?;
    a.mov(r13d, eax)?;

    // The socket address at [rsp].
    let domain = match family {
        Family::Vsock => {
            a.mov(dword_ptr(rsp), AF_VSOCK)?; // family, reserved = 0
            a.mov(dword_ptr(rsp + 4), r13d)?; // port
            a.mov(dword_ptr(rsp + 8), r12d)?; // cid
            a.mov(dword_ptr(rsp + 12), 0)?; // flags, padding
            AF_VSOCK
        }
        #[cfg(test)]
        Family::Inet => {
            const AF_INET: i32 = 2;
            a.cmp(r13d, 0xffff)?;
            a.ja(usage)?;
            a.mov(eax, r13d)?;
            a.rol(ax, 8)?; // port in network byte order
            a.shl(eax, 16)?;
            a.or(eax, AF_INET)?;
            a.mov(dword_ptr(rsp), eax)?;
            a.mov(eax, r12d)?;
            a.bswap(eax)?;
            a.mov(dword_ptr(rsp + 4), eax)?;
            a.mov(qword_ptr(rsp + 8), 0)?;
            AF_INET
        }
    };

    // socket(domain, SOCK_STREAM, 0)
    a.mov(eax, SYS_SOCKET)?;
    a.mov(edi, domain)?;
    a.mov(esi, SOCK_STREAM)?;
    a.xor(edx, edx)?;
    a.syscall()?;
    a.lea(rsi, ptr(socket_msg.label))?;
    a.mov(edx, socket_msg.bytes.len() as u32)?;
    a.test(rax, rax)?;
    a.js(fail)?;
    a.mov(r14, rax)?;

    // connect(fd, &addr, 16)
    a.mov(eax, SYS_CONNECT)?;
    a.mov(rdi, r14)?;
    a.mov(rsi, rsp)?;
    a.mov(edx, 16)?;
    a.syscall()?;
    a.lea(rsi, ptr(connect_msg.label))?;
    a.mov(edx, connect_msg.bytes.len() as u32)?;
    a.test(rax, rax)?;
    a.js(fail)?;

    // stdin -> socket, until EOF.
    let mut up = a.create_label();
    let mut up_done = a.create_label();
    a.set_label(&mut up)?;
    a.mov(eax, SYS_READ)?;
    a.xor(edi, edi)?;
    a.lea(rsi, qword_ptr(rsp + BUF_AT))?;
    a.mov(edx, BUF_SIZE)?;
    a.syscall()?;
    a.cmp(rax, -EINTR)?;
    a.je(up)?;
    a.test(rax, rax)?;
    a.je(up_done)?;
    a.lea(rsi, ptr(read_msg.label))?;
    a.mov(edx, read_msg.bytes.len() as u32)?;
    a.js(fail)?;
    a.mov(rdi, r14)?;
    a.lea(rsi, qword_ptr(rsp + BUF_AT))?;
    a.mov(rdx, rax)?;
    a.mov(r15d, SYS_SENDTO)?;
    a.mov(r10d, MSG_NOSIGNAL)?;
    a.xor(r8d, r8d)?;
    a.xor(r9d, r9d)?;
    a.call(write_all)?;
    a.lea(rsi, ptr(send_msg.label))?;
    a.mov(edx, send_msg.bytes.len() as u32)?;
    a.test(rax, rax)?;
    a.js(fail)?;
    a.jmp(up)?;
    a.set_label(&mut up_done)?;

    // shutdown(fd, SHUT_WR): the peer reads EOF.
    a.mov(eax, SYS_SHUTDOWN)?;
    a.mov(rdi, r14)?;
    a.mov(esi, SHUT_WR)?;
    a.syscall()?;
    a.lea(rsi, ptr(shutdown_msg.label))?;
    a.mov(edx, shutdown_msg.bytes.len() as u32)?;
    a.test(rax, rax)?;
    a.js(fail)?;

    // socket -> stdout, until the peer closes.
    let mut down = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut down)?;
    a.mov(eax, SYS_READ)?;
    a.mov(rdi, r14)?;
    a.lea(rsi, qword_ptr(rsp + BUF_AT))?;
    a.mov(edx, BUF_SIZE)?;
    a.syscall()?;
    a.cmp(rax, -EINTR)?;
    a.je(down)?;
    a.test(rax, rax)?;
    a.je(done)?;
    a.lea(rsi, ptr(receive_msg.label))?;
    a.mov(edx, receive_msg.bytes.len() as u32)?;
    a.js(fail)?;
    a.mov(edi, 1)?;
    a.lea(rsi, qword_ptr(rsp + BUF_AT))?;
    a.mov(rdx, rax)?;
    a.mov(r15d, SYS_WRITE)?;
    a.call(write_all)?;
    a.lea(rsi, ptr(write_msg.label))?;
    a.mov(edx, write_msg.bytes.len() as u32)?;
    a.test(rax, rax)?;
    a.js(fail)?;
    a.jmp(down)?;
    a.set_label(&mut done)?;
    a.mov(eax, SYS_EXIT_GROUP)?;
    a.xor(edi, edi)?;
    a.syscall()?;

    // usage: the usage text on stderr, exit 2.
    a.set_label(&mut usage)?;
    a.mov(eax, SYS_WRITE)?;
    a.mov(edi, 2)?;
    a.lea(rsi, ptr(usage_msg.label))?;
    a.mov(edx, usage_msg.bytes.len() as u32)?;
    a.syscall()?;
    a.mov(eax, SYS_EXIT_GROUP)?;
    a.mov(edi, 2)?;
    a.syscall()?;

    // fail: rsi/edx = the step's message, rax = -errno. Writes
    // "vsock-send: STEP failed (errno N)\n" to stderr and exits 1.
    a.set_label(&mut fail)?;
    a.mov(r12, rax)?;
    a.mov(eax, SYS_WRITE)?;
    a.mov(edi, 2)?;
    a.syscall()?;
    a.mov(rax, r12)?;
    a.neg(rax)?;
    a.lea(rdi, qword_ptr(rsp + DIGITS_END))?;
    a.mov(byte_ptr(rdi), b')' as u32)?;
    a.mov(byte_ptr(rdi + 1), b'\n' as u32)?;
    a.mov(ecx, 10)?;
    let mut digit = a.create_label();
    a.set_label(&mut digit)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.add(dl, b'0' as u32)?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(digit)?;
    a.mov(rsi, rdi)?;
    a.lea(rdx, qword_ptr(rsp + DIGITS_END + 2))?;
    a.sub(rdx, rdi)?;
    a.mov(eax, SYS_WRITE)?;
    a.mov(edi, 2)?;
    a.syscall()?;
    a.mov(eax, SYS_EXIT_GROUP)?;
    a.mov(edi, 1)?;
    a.syscall()?;

    // parse_u32: rdi = a NUL-terminated string. Returns its decimal value in
    // rax, or -1 if it is empty, has a non-digit or exceeds 4294967295.
    a.set_label(&mut parse_u32)?;
    {
        let mut next = a.create_label();
        let mut end = a.create_label();
        let mut bad = a.create_label();
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?; // digits seen
        a.set_label(&mut next)?;
        a.movzx(edx, byte_ptr(rdi))?;
        a.test(edx, edx)?;
        a.jz(end)?;
        a.sub(edx, b'0' as i32)?;
        a.cmp(edx, 9)?;
        a.ja(bad)?; // below '0' wraps around, so it is caught too
        a.imul_3(rax, rax, 10)?; // rax <= 2^32 - 1: no 64-bit overflow
        a.add(rax, rdx)?;
        a.mov(edx, u32::MAX)?;
        a.cmp(rax, rdx)?;
        a.ja(bad)?;
        a.inc(rdi)?;
        a.inc(ecx)?;
        a.jmp(next)?;
        a.set_label(&mut end)?;
        a.test(ecx, ecx)?;
        a.jz(bad)?;
        a.ret()?;
        a.set_label(&mut bad)?;
        a.mov(rax, -1i64)?;
        a.ret()?;
    }

    // write_all: rdi = fd, rsi = buffer, rdx = length (> 0), r15 = the
    // system call (write, or sendto with r10/r8/r9 already set). Continues
    // short writes and retries EINTR. Returns 0, or -errno in rax.
    a.set_label(&mut write_all)?;
    {
        let again = write_all;
        let mut zero = a.create_label();
        let mut out = a.create_label();
        a.mov(rax, r15)?;
        a.syscall()?; // clobbers rcx and r11 only
        a.cmp(rax, -EINTR)?;
        a.je(again)?;
        a.test(rax, rax)?;
        a.js(out)?;
        a.jz(zero)?; // no progress: would loop forever
        a.add(rsi, rax)?;
        a.sub(rdx, rax)?;
        a.jnz(again)?;
        a.xor(eax, eax)?;
        a.set_label(&mut out)?;
        a.ret()?;
        a.set_label(&mut zero)?;
        a.mov(rax, -i64::from(EIO))?;
        a.ret()?;
    }

    // The messages.
    for mut t in [
        usage_msg,
        socket_msg,
        connect_msg,
        read_msg,
        send_msg,
        shutdown_msg,
        receive_msg,
        write_msg,
    ] {
        a.set_label(&mut t.label)?;
        a.db(&t.bytes)?;
    }
    a.assemble(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    fn u16_at(f: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(f[at..at + 2].try_into().unwrap())
    }
    fn u32_at(f: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(f[at..at + 4].try_into().unwrap())
    }
    fn u64_at(f: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(f[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn elf_header_is_a_static_x86_64_executable() {
        let f = elf().unwrap();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!((f[4], f[5], f[6]), (2, 1, 1), "ELF64, LSB, version 1");
        assert_eq!(u16_at(&f, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&f, 18), 62, "EM_X86_64");
        assert_eq!(u32_at(&f, 20), 1, "e_version");
        assert_eq!(u16_at(&f, 52), EHDR_SIZE);
        assert_eq!(u16_at(&f, 54), PHDR_SIZE);
        assert_eq!(u16_at(&f, 56), 1, "one program header");
        let phoff = u64_at(&f, 32) as usize;
        assert_eq!(u32_at(&f, phoff), 1, "PT_LOAD");
        assert_eq!(u32_at(&f, phoff + 4), 5, "R | X");
        let (offset, vaddr) = (u64_at(&f, phoff + 8), u64_at(&f, phoff + 16));
        let (filesz, memsz) = (u64_at(&f, phoff + 32), u64_at(&f, phoff + 40));
        let align = u64_at(&f, phoff + 48);
        assert_eq!(offset % align, vaddr % align, "mappable");
        assert_eq!(filesz, f.len() as u64);
        assert!(memsz >= filesz);
        let entry = u64_at(&f, 24);
        assert!(
            (vaddr..vaddr + filesz).contains(&entry),
            "entry {entry:#x} outside the segment {vaddr:#x}+{filesz:#x}"
        );
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET);
        // The kit's own check for a busybox agrees it needs no loader.
        super::super::debian::check_static_elf(&f).unwrap();
        // Small, and the same bytes every build.
        assert!(f.len() < 4096, "{} bytes", f.len());
        assert_eq!(f, elf().unwrap());
    }

    #[test]
    fn first_instructions_decode() {
        let f = elf().unwrap();
        let code = &f[CODE_OFFSET as usize..];
        let mut d = iced_x86::Decoder::with_ip(
            64,
            code,
            LOAD_ADDR + CODE_OFFSET,
            iced_x86::DecoderOptions::NONE,
        );
        let first = d.decode();
        assert_eq!(first.mnemonic(), iced_x86::Mnemonic::Mov);
        assert!(!first.is_invalid());
        // Every message is in the file.
        let has = |s: &[u8]| f.windows(s.len()).any(|w| w == s);
        assert!(has(b"vsock-send: connect failed (errno "));
        assert!(has(USAGE));
    }

    /// The binary written to a temporary executable file, removed on drop.
    struct Program(PathBuf);

    impl Program {
        fn new(tag: &str, family: Family) -> Program {
            use std::os::unix::fs::PermissionsExt;
            let path =
                std::env::temp_dir().join(format!("vireo-vsock-send-{tag}-{}", std::process::id()));
            std::fs::write(&path, elf_for(family).unwrap()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            Program(path)
        }

        /// Run with `args`, feeding `input`. Retries ETXTBSY: another test
        /// thread's fork may briefly hold the file open for writing.
        fn run(&self, args: &[&str], input: &[u8]) -> Output {
            let mut tries = 0;
            let mut child = loop {
                match Command::new(&self.0)
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                {
                    Ok(child) => break child,
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("running {}: {e}", self.0.display()),
                }
            };
            let mut stdin = child.stdin.take().unwrap();
            let input = input.to_vec();
            // Feed stdin from a thread: the program may stop reading early.
            let feeder = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let out = child.wait_with_output().unwrap();
            feeder.join().unwrap();
            out
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Program {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn bad_arguments_print_usage_and_exit_2() {
        let p = Program::new("usage", Family::Vsock);
        for args in [
            &[][..],
            &["2"],
            &["2", "5000", "extra"],
            &["", "5000"],
            &["2", ""],
            &["x", "5000"],
            &["2", "50a0"],
            &["-1", "5000"],
            &["2", "+5"],
            &["4294967296", "5000"],
            &["2", "99999999999999999999999"],
        ] {
            let out = p.run(args, b"");
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).starts_with("usage: vsock-send CID PORT\n"),
                "{args:?}: {}",
                stderr(&out)
            );
            assert!(out.stdout.is_empty());
        }
    }

    #[test]
    fn unreachable_vsock_peer_is_exit_1_naming_the_step() {
        let p = Program::new("unreachable", Family::Vsock);
        // CID 1 is the local machine: nothing listens on port 9 there, and
        // without the loopback transport the connect fails anyway. On a host
        // without AF_VSOCK at all, the socket call itself fails.
        let out = p.run(&["1", "9"], b"data");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with("vsock-send: connect failed (errno ")
                || err.starts_with("vsock-send: socket failed (errno "),
            "{err}"
        );
        assert!(err.ends_with(")\n"), "{err}");
        eprintln!("vsock-send 1 9 on this host: {}", err.trim_end());
        // The largest CID and port parse (VMADDR_CID_ANY is refused by the
        // kernel, not by the parser).
        let out = p.run(&["4294967295", "4294967295"], b"");
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    }

    /// A TCP peer on 127.0.0.1 that reads everything up to EOF, then sends
    /// back a header and the data reversed, and closes. Returns its port.
    fn tcp_echo_peer() -> (u16, std::thread::JoinHandle<Vec<u8>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap(); // needs the SHUT_WR
            let mut reply = format!("got {} bytes\n", got.len()).into_bytes();
            reply.extend(got.iter().rev());
            // The program may have gone (a test of its failures).
            let _ = s.write_all(&reply);
            got
        });
        (port, peer)
    }

    fn expected_reply(data: &[u8]) -> Vec<u8> {
        let mut reply = format!("got {} bytes\n", data.len()).into_bytes();
        reply.extend(data.iter().rev());
        reply
    }

    const LOCALHOST: &str = "2130706433"; // 127.0.0.1

    /// The same code with an AF_INET address: the copy loops, the shutdown
    /// and the exit status for real, on any host.
    #[test]
    fn round_trip_over_tcp_loopback() {
        let p = Program::new("tcp", Family::Inet);
        // Larger than the 64 KiB buffer and than a pipe, so reads come in
        // pieces and writes can be short.
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (port, peer) = tcp_echo_peer();
        let out = p.run(&[LOCALHOST, &port.to_string()], &data);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(out.stderr.is_empty(), "{}", stderr(&out));
        assert_eq!(peer.join().unwrap(), data);
        assert!(out.stdout == expected_reply(&data), "reply differs");

        // Empty input: the peer still sees EOF and replies.
        let (port, peer) = tcp_echo_peer();
        let out = p.run(&[LOCALHOST, &port.to_string()], b"");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(peer.join().unwrap().is_empty());
        assert_eq!(out.stdout, b"got 0 bytes\n");

        // Nobody listening: connect fails with ECONNREFUSED (111).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let out = p.run(&[LOCALHOST, &port.to_string()], b"x");
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stderr(&out), "vsock-send: connect failed (errno 111)\n");

        // The AF_INET variant's own limit: a port must fit 16 bits.
        let out = p.run(&[LOCALHOST, "65536"], b"");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    }

    /// An unreadable stdin is `read stdin failed` with the errno.
    #[test]
    fn stdin_errors_are_named() {
        let p = Program::new("stdin", Family::Inet);
        let (port, _peer) = tcp_echo_peer();
        // A directory as stdin: read() fails with EISDIR (21).
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let mut tries = 0;
        let out = loop {
            match Command::new(p.path())
                .args([LOCALHOST, &port.to_string()])
                .stdin(dir.try_clone().unwrap())
                .output()
            {
                Ok(out) => break out,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stderr(&out), "vsock-send: read stdin failed (errno 21)\n");
    }

    /// A real AF_VSOCK round trip through the host's loopback transport
    /// (CID 1), where the kernel has one; otherwise a skip line says why.
    #[test]
    fn round_trip_over_vsock_loopback() {
        use std::os::fd::{AsRawFd, FromRawFd};
        const VMADDR_CID_ANY: u32 = u32::MAX;
        const VMADDR_CID_LOCAL: u32 = 1;
        fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
            let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            a.svm_cid = cid;
            a.svm_port = port;
            a
        }
        fn skip(why: String) {
            eprintln!("SKIP vsock-send AF_VSOCK round trip: {why}");
        }
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        assert_eq!(len, 16);

        // SAFETY: plain socket calls on descriptors this test owns.
        let listener = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
        if listener < 0 {
            return skip(format!(
                "no AF_VSOCK sockets here ({})",
                std::io::Error::last_os_error()
            ));
        }
        let listener = unsafe { std::os::fd::OwnedFd::from_raw_fd(listener) };
        let port = 0x5600 + std::process::id() % 0x1000;
        let a = addr(VMADDR_CID_ANY, port);
        let bound = unsafe {
            libc::bind(
                listener.as_raw_fd(),
                &a as *const libc::sockaddr_vm as *const libc::sockaddr,
                len,
            ) == 0
                && libc::listen(listener.as_raw_fd(), 4) == 0
        };
        if !bound {
            return skip(format!(
                "cannot listen on AF_VSOCK port {port} ({}); the loopback transport needs CONFIG_VSOCKETS_LOOPBACK (`modprobe vsock_loopback`)",
                std::io::Error::last_os_error()
            ));
        }
        // Is there a loopback transport? Try CID 1 from here first.
        let probe = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
        assert!(probe >= 0);
        let probe = unsafe { std::os::fd::OwnedFd::from_raw_fd(probe) };
        let local = addr(VMADDR_CID_LOCAL, port);
        let connected = unsafe {
            libc::connect(
                probe.as_raw_fd(),
                &local as *const libc::sockaddr_vm as *const libc::sockaddr,
                len,
            ) == 0
        };
        if !connected {
            return skip(format!(
                "connecting to CID 1 failed ({}); no vsock loopback transport (`modprobe vsock_loopback`)",
                std::io::Error::last_os_error()
            ));
        }
        // Take the probe connection off the queue.
        let c = unsafe {
            libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert!(c >= 0);
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(c) });
        drop(probe);

        let peer = std::thread::spawn(move || {
            let c = unsafe {
                libc::accept(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            assert!(c >= 0, "{}", std::io::Error::last_os_error());
            let mut s = unsafe { std::fs::File::from_raw_fd(c) };
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&expected_reply(&got)).unwrap();
            got
        });
        let p = Program::new("vsock", Family::Vsock);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let out = p.run(&["1", &port.to_string()], &data);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(peer.join().unwrap(), data);
        assert!(out.stdout == expected_reply(&data), "reply differs");
        eprintln!("vsock-send AF_VSOCK round trip over CID 1 port {port}: ok");
    }
}
