//! Helpers for the integration tests that boot tiny guests through the
//! `vireo` binary: the kernel formats (over `vireo-testkit`'s ELF vmlinux
//! and bzImage builders), a runner with a hard timeout, and a KVM
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
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use vireo_testkit::kernel::{bzimage, elf_vmlinux, BZIMAGE_ENTRY64, KERNEL_LOAD};
/// The scratch directory every crate's tests share.
pub use vireo_testkit::TempDir;

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
            KernelKind::Elf => elf_vmlinux(KERNEL_LOAD, code64),
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
