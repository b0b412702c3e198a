//! The per-thread seccomp filters of `vireo run` (on by default): every
//! thread of a running VM shows `Seccomp: 2` and `NoNewPrivs: 1`; a thread
//! that makes a syscall outside its filter kills the whole VM process with
//! SIGSYS (`VIREO_TEST_FORBIDDEN_SYSCALL=KIND` makes the first thread of
//! that kind call execve right after installing its filter); and
//! `--no-seccomp` runs unfiltered and says so. Device threads are checked
//! by snapshot_virtio, whose tiny guest drives a disk and an rng.
//!
//! On KVM, or on the emulator with `VIREO_TEST_ACCEL=emu`.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use support::guest::assemble64;
use support::{
    assert_every_thread_filtered, run_vireo, test_accel, threads_of, KernelKind, LiveVm, TempDir,
    RUN_TIMEOUT,
};

/// A guest that says it runs, then halts with interrupts off for good.
fn idle_kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), |g| {
        g.print("running\n")?;
        g.halt_forever()
    });
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

fn power_off_kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), |g| {
        g.print("running\n")?;
        g.power_off()
    });
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

/// The vCPU kind's label on the test backend.
fn vcpu_kind() -> &'static str {
    match test_accel().as_deref() {
        Some("emu") => "emulator-vcpu",
        _ => "vcpu",
    }
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    require_kvm!();
    let dir = TempDir::new("seccomp-all");
    let kernel = idle_kernel(&dir);
    let socket = dir.path().join("ctl.sock");
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &[
            "--cpus",
            "2",
            "--control-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    assert!(vm.read_until("running\n"), "{}", vm.output());
    let threads = assert_every_thread_filtered(
        vm.pid(),
        &["vcpu0", "vcpu1", "control", "signals", "launcher"],
    );
    assert!(
        threads.iter().any(|t| t.tid == vm.pid()),
        "the main thread is among them: {threads:#?}"
    );
    eprintln!(
        "filtered threads: {:?}",
        threads.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
}

#[test]
fn no_seccomp_runs_unfiltered_and_warns() {
    require_kvm!();
    let dir = TempDir::new("seccomp-off");
    let kernel = idle_kernel(&dir);
    let mut vm = LiveVm::start_kernel(&kernel, &["--no-seccomp"]);
    assert!(vm.read_until("running\n"), "{}", vm.output());
    // Give the main thread the time it takes to filter itself when on.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let threads = threads_of(vm.pid());
    assert!(threads.iter().any(|t| t.name == "vcpu0"), "{threads:#?}");
    assert!(
        threads.iter().all(|t| t.seccomp == Some(0)),
        "--no-seccomp: no thread is filtered: {threads:#?}"
    );
    drop(vm);
    let out = run_vireo(&power_off_kernel(&dir), &["--no-seccomp"], RUN_TIMEOUT);
    out.assert_status(0);
    assert!(
        out.stderr.contains("--no-seccomp") && out.stderr.contains("without seccomp filters"),
        "the warning names what is lost:\n{out}"
    );
}

/// Start the idle guest with `kind` misbehaving; it must die of SIGSYS.
fn dies_of_sigsys(kind: &str) {
    let dir = TempDir::new("seccomp-kill");
    let kernel = idle_kernel(&dir);
    let socket = dir.path().join("ctl.sock");
    let args: Vec<String> = [
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--control-socket",
        socket.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = LiveVm::start_env(
        &[],
        &args,
        &[("VIREO_TEST_FORBIDDEN_SYSCALL", kind)],
        RUN_TIMEOUT,
    );
    let status = vm.wait(&format!(
        "the {kind} thread's forbidden syscall to kill vireo"
    ));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "a {kind} thread's execve must kill the whole process with SIGSYS; status {status:?}, output {}",
        vm.output()
    );
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_kills_the_vm() {
    require_kvm!();
    dies_of_sigsys(vcpu_kind());
}

#[test]
fn a_forbidden_syscall_on_the_control_thread_kills_the_vm() {
    require_kvm!();
    dies_of_sigsys("control");
}

#[test]
fn a_forbidden_syscall_on_the_main_thread_kills_the_vm() {
    require_kvm!();
    dies_of_sigsys("main");
}

#[test]
fn a_forbidden_syscall_on_a_console_thread_kills_the_vm() {
    require_kvm!();
    dies_of_sigsys("console");
}

#[test]
fn a_forbidden_syscall_on_the_launcher_kills_the_vm() {
    require_kvm!();
    dies_of_sigsys("launcher");
}

/// The hook names a kind no thread of this VM has: it runs normally (the
/// kills above come from the hook's thread kind, not from the hook alone).
#[test]
fn the_hook_for_an_absent_kind_changes_nothing() {
    require_kvm!();
    let dir = TempDir::new("seccomp-absent");
    let kernel = power_off_kernel(&dir);
    let args: Vec<String> = ["run", "--kernel", kernel.to_str().expect("utf-8")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // No --control-socket: no control thread.
    let mut vm = LiveVm::start_env(
        &[],
        &args,
        &[("VIREO_TEST_FORBIDDEN_SYSCALL", "control")],
        RUN_TIMEOUT,
    );
    let status = vm.wait("the guest to power off");
    assert_eq!(status.code(), Some(0), "{status:?} {}", vm.output());
    assert!(vm.output().contains("running"), "{}", vm.output());
}

/// A filtered VM stopped and continued (`kill -STOP`, `kill -CONT`, a
/// debugger's stop) goes on: the kernel resumes interrupted sleeps with
/// restart_syscall, which every thread's filter allows.
#[test]
fn a_vm_stopped_and_continued_runs_on() {
    require_kvm!();
    let dir = TempDir::new("seccomp-stop");
    let kernel = idle_kernel(&dir);
    let mut vm = LiveVm::start_kernel(&kernel, &[]);
    assert!(vm.read_until("running\n"), "{}", vm.output());
    assert_every_thread_filtered(vm.pid(), &["vcpu0", "signals"]);
    let pid = vm.pid() as libc::pid_t;
    for _ in 0..3 {
        // SAFETY: signals to the child this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let threads = threads_of(vm.pid());
    assert!(
        threads.iter().any(|t| t.name == "vcpu0"),
        "the VM died after SIGSTOP/SIGCONT: {threads:#?}\n{}",
        vm.output()
    );
}
