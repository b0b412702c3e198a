//! Helpers for the integration tests that boot tiny guests through the
//! `vireo` binary: kernel image builders (ELF vmlinux and bzImage around a
//! blob of 64-bit machine code), a runner with a hard timeout, and a KVM
//! availability probe.
//!
//! The guests themselves are assembled with iced-x86's `CodeAssembler`; see
//! [`guest`].

// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod checksum;
pub mod daemon;
pub mod guest;
pub mod kit;
pub mod netns;

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

/// Where the boot protocol loads the kernel (and where the ELF segment goes).
pub const KERNEL_LOAD: u64 = 0x10_0000;
/// The 64-bit entry point of a bzImage: 0x200 bytes into the protected-mode
/// part, which is loaded at [`KERNEL_LOAD`].
pub const BZIMAGE_ENTRY64: u64 = KERNEL_LOAD + 0x200;

/// Generous upper bound for one guest run; a hung guest is killed after it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The two kernel formats vireo boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
}

impl KernelKind {
    /// Guest physical address the 64-bit code starts at (assemble for it).
    pub fn entry(self) -> u64 {
        match self {
            KernelKind::Elf => KERNEL_LOAD,
            KernelKind::BzImage => BZIMAGE_ENTRY64,
        }
    }

    /// Wrap 64-bit code assembled for [`Self::entry`] into a kernel file.
    pub fn wrap(self, code64: &[u8]) -> Vec<u8> {
        match self {
            KernelKind::Elf => elf_vmlinux(code64),
            KernelKind::BzImage => bzimage(code64),
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            KernelKind::Elf => "vmlinux",
            KernelKind::BzImage => "bzImage",
        }
    }
}

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
/// (and virtual) address 0x100000, entered at 0x100000 like a vmlinux whose
/// `e_entry` is the physical 64-bit entry point.
pub fn elf_vmlinux(code: &[u8]) -> Vec<u8> {
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
    put64(&mut f, 24, KERNEL_LOAD); // e_entry
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
    put64(&mut f, ph + 16, KERNEL_LOAD); // p_vaddr
    put64(&mut f, ph + 24, KERNEL_LOAD); // p_paddr
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
    let version = b"vireo test guest\0";
    f[BZ_KERNEL_VERSION_OFFSET..BZ_KERNEL_VERSION_OFFSET + version.len()].copy_from_slice(version);

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
    put16(&mut f, 0x206, BZ_PROTOCOL); // version
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
    put16(&mut f, 0x236, 0x0001 | 0x0002); // xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    put32(&mut f, 0x238, 2047); // cmdline_size
    put32(&mut f, 0x23c, 0); // hardware_subarch
    put64(&mut f, 0x240, 0); // hardware_subarch_data
    put32(&mut f, 0x248, 0); // payload_offset: nothing compressed
    put32(&mut f, 0x24c, 0); // payload_length
    put64(&mut f, 0x250, 0); // setup_data
    put64(&mut f, 0x258, KERNEL_LOAD); // pref_address
    put32(&mut f, 0x260, payload.len().next_multiple_of(0x1000) as u32); // init_size
    put32(&mut f, 0x264, 0); // handover_offset
    put32(&mut f, 0x268, 0); // kernel_info_offset

    f.extend_from_slice(&payload);
    f
}

/// What a `vireo` run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit status, or None when it was killed by a signal (including our
    /// own kill on timeout).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// The command line, for messages.
    pub command: String,
    pub elapsed: Duration,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> status {:?}{} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.command,
            self.status,
            if self.timed_out { " (TIMED OUT, killed)" } else { "" },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

impl Outcome {
    /// Panic unless the run finished in time with exit status `code`.
    pub fn assert_status(&self, code: i32) {
        assert!(
            !self.timed_out,
            "the guest hung: vireo did not exit within the timeout\n{self}"
        );
        assert_eq!(
            self.status,
            Some(code),
            "expected exit status {code}, saw {:?}\n{self}",
            self.status
        );
    }
}

/// The `vireo` binary under test.
pub fn vireo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vireo")
}

/// Run `vireo run --kernel KERNEL ARGS...` with stdin closed; kill it if it
/// has not exited after `timeout`.
pub fn run_vireo(kernel: &Path, args: &[&str], timeout: Duration) -> Outcome {
    let mut full: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
    ];
    full.extend(args.iter().map(|s| s.to_string()));
    run_vireo_args(&full, timeout)
}

/// Run `vireo ARGS...` (no implicit `run`/`--kernel`).
pub fn run_vireo_args(args: &[String], timeout: Duration) -> Outcome {
    run_vireo_with_input(args, None, timeout)
}

/// Run `vireo ARGS...` with `input` written to its stdin (a pipe, then
/// closed), or stdin closed when `input` is None.
pub fn run_vireo_with_input(args: &[String], input: Option<&[u8]>, timeout: Duration) -> Outcome {
    let mut args = args.to_vec();
    // Tests name their backend: KVM unless VIREO_TEST_ACCEL says otherwise
    // (`--accel auto` would pick the emulator on PVM-only hosts).
    let accel = test_accel().unwrap_or_else(|| "kvm".into());
    if args.first().map(String::as_str) == Some("run") && !args.iter().any(|a| a == "--accel") {
        args.push("--accel".into());
        args.push(accel);
    }
    let command = format!("vireo {}", args.join(" "));
    let start = Instant::now();
    let mut child = Command::new(vireo_bin())
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", vireo_bin()));
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
    }
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));

    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("waiting for the killed vireo");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for vireo: {e}"),
        }
    };
    let elapsed = start.elapsed();
    Outcome {
        status: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        timed_out,
        command,
        elapsed,
    }
}

/// Why KVM cannot be used here, or None when /dev/kvm opens read/write.
pub fn kvm_unavailable_reason() -> Option<String> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Some("/dev/kvm does not exist".into());
    }
    match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm read/write: {e}")),
    }
}

pub fn kvm_available() -> bool {
    kvm_unavailable_reason().is_none()
}

/// The backend the guest tests run on: `VIREO_TEST_ACCEL` (e.g. `emu`), or
/// KVM when unset.
pub fn test_accel() -> Option<String> {
    std::env::var("VIREO_TEST_ACCEL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Why the guests of these tests cannot run here, or None. Only the KVM
/// backend can be missing; the emulator runs anywhere.
pub fn backend_unavailable_reason() -> Option<String> {
    match test_accel().as_deref() {
        Some("emu") => None,
        _ => kvm_unavailable_reason().map(|why| format!("/dev/kvm is missing ({why})")),
    }
}

/// Return from the calling test (after saying why) when KVM is unusable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(why) = $crate::support::backend_unavailable_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A `vireo run` the test talks to while it runs: stdout piped, stderr
/// kept, killed if the test ends early.
pub struct LiveVm {
    child: std::process::Child,
    /// Chunks of stdout from a reader thread (closed at EOF).
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    timeout: Duration,
}

impl LiveVm {
    /// `vireo run --kernel KERNEL EXTRA...` on the test backend.
    pub fn start_kernel(kernel: &Path, extra: &[&str]) -> LiveVm {
        let mut args = vec![
            "run".to_string(),
            "--kernel".into(),
            kernel.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        LiveVm::start(&[], &args, RUN_TIMEOUT)
    }

    /// `PREFIX... vireo ARGS...` (a prefix such as `ip netns exec NS`), with
    /// `--accel` of the test backend added to `run`; `timeout` bounds each wait.
    pub fn start(prefix: &[&str], args: &[String], timeout: Duration) -> LiveVm {
        LiveVm::start_env(prefix, args, &[], timeout)
    }

    /// [`LiveVm::start`] with extra environment variables for vireo.
    pub fn start_env(
        prefix: &[&str],
        args: &[String],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> LiveVm {
        let mut args = args.to_vec();
        if args.first().map(String::as_str) == Some("run") && !args.iter().any(|a| a == "--accel") {
            args.push("--accel".into());
            args.push(test_accel().unwrap_or_else(|| "kvm".into()));
        }
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(vireo_bin());
                c
            }
            None => Command::new(vireo_bin()),
        };
        let mut child = command
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vireo");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        LiveVm {
            child,
            output,
            seen: Vec::new(),
            timeout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Read the guest's output until `marker` shows up; false at EOF or
    /// after the timeout.
    pub fn read_until(&mut self, marker: &str) -> bool {
        let deadline = Instant::now() + self.timeout;
        while !self.output().contains(marker) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => return false,
            }
        }
        true
    }

    /// Wait up to `wait` for more output: Some(true) when some came,
    /// Some(false) when none did, None at EOF.
    pub fn read_chunk(&mut self, wait: Duration) -> Option<bool> {
        match self.output.recv_timeout(wait) {
            Ok(chunk) => {
                self.seen.extend_from_slice(&chunk);
                Some(true)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Some(false),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Everything the guest printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Read to EOF, then wait for vireo to exit; panic (after killing it)
    /// past the timeout.
    pub fn wait(&mut self, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            while let Ok(chunk) = self.output.try_recv() {
                self.seen.extend_from_slice(&chunk);
            }
            if let Some(s) = self.child.try_wait().expect("wait") {
                // The rest of stdout, up to EOF.
                while let Ok(chunk) = self.output.recv_timeout(Duration::from_secs(5)) {
                    self.seen.extend_from_slice(&chunk);
                }
                return s;
            }
            if start.elapsed() > self.timeout {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}: {}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl LiveVm {
    /// Kill vireo now and read what it printed up to EOF (what a guest
    /// printed just before the kill is still in the pipe).
    pub fn kill_and_drain(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(chunk) = self.output.recv_timeout(Duration::from_secs(5)) {
            self.seen.extend_from_slice(&chunk);
        }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One thread of a process as /proc/PID/task/TID/status shows it.
#[derive(Debug, Clone)]
pub struct ThreadStatus {
    pub tid: u32,
    pub name: String,
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp: Option<u32>,
    pub no_new_privs: Option<u32>,
}

/// Every thread of process `pid` (threads that end while we read are
/// skipped).
pub fn threads_of(pid: u32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        out.push(ThreadStatus {
            tid: entry.file_name().to_string_lossy().parse().unwrap_or(0),
            name: field("Name:").unwrap_or_default(),
            seccomp: field("Seccomp:").and_then(|v| v.parse().ok()),
            no_new_privs: field("NoNewPrivs:").and_then(|v| v.parse().ok()),
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// Wait (up to 10 s: the main thread filters itself once set-up is done)
/// until every thread of `pid` has a seccomp filter and no_new_privs and
/// the threads named `expected` exist; return the threads, or panic with
/// the ones that are not filtered.
pub fn assert_every_thread_filtered(pid: u32, expected: &[&str]) -> Vec<ThreadStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let threads = threads_of(pid);
        let all_filtered = !threads.is_empty()
            && threads
                .iter()
                .all(|t| t.seccomp == Some(2) && t.no_new_privs == Some(1));
        let all_there = expected
            .iter()
            .all(|name| threads.iter().any(|t| t.name == *name));
        if all_filtered && all_there {
            return threads;
        }
        if Instant::now() > deadline {
            panic!(
                "every thread of vireo (pid {pid}) should show Seccomp: 2 and NoNewPrivs: 1, \
                 and threads {expected:?} should exist; saw {threads:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vireo-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `bytes` to a file named `name` in the directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
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
        let f = elf_vmlinux(&code);
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
