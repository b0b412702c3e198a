//! `vireo run --jail` end to end: a tiny guest runs jailed, and the host
//! sees the VMM process (the supervisor's child) unprivileged, without
//! capabilities, in its own namespaces, under a private root and in its
//! cgroup with the limits asked for. Needs root and a backend (KVM, or the
//! emulator with VIREO_TEST_ACCEL=emu); skips with a message otherwise.

mod support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::guest::{self, assemble64};
use support::{KernelKind, LiveVm, TempDir};

#[path = "support/jail.rs"]
mod jail_support;
use jail_support::*;

/// A uid/gid no account uses, as the daemon's per-VM ids are.
const JAIL_UID: u32 = 10_999_001;

macro_rules! require_root_and_backend {
    () => {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: the jail needs root");
            return;
        }
        if let Some(why) = support::backend_unavailable_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

fn power_button_kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), guest::wait_for_power_button);
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

fn control(socket: &Path, command: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(s, "{command}").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn a_jailed_vm_runs_unprivileged_in_its_namespaces_root_and_cgroup() {
    require_root_and_backend!();
    let dir = TempDir::new("jail-direct");
    let kernel = power_button_kernel(&dir);
    // The VM's own directory: its control socket, owned by the jail uid.
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    std::os::unix::fs::chown(&vm_dir, Some(JAIL_UID), Some(JAIL_UID)).unwrap();
    let jail_root = dir.path().join("root");
    let socket = vm_dir.join("ctl.sock");
    let cgroup = format!("jailtest-{}", std::process::id());
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &[
            "--jail",
            "--jail-uid",
            &JAIL_UID.to_string(),
            "--jail-dir",
            jail_root.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
            "--cgroup",
            &cgroup,
            "--cgroup-cpus",
            "1.5",
            "--cgroup-memory",
            "300",
            "--cgroup-pids",
            "64",
        ],
    );
    assert!(
        vm.read_until("waiting for the power button"),
        "no guest output: {}",
        vm.output()
    );
    let supervisor = vm.pid();
    let vmm = wait_for_child(supervisor);
    assert_jailed(vmm, supervisor, JAIL_UID);
    // Its own network namespace (--jail-net own, the default).
    assert_ne!(ns(vmm, "net"), ns(std::process::id(), "net"));
    let (quota, period, memory, pids) = cgroup_limits(vmm);
    assert_eq!((quota.as_str(), period.as_str()), ("150000", "100000"));
    assert_eq!(memory, (300u64 << 20).to_string());
    assert_eq!(pids, "64");
    let cg_dir = cgroup_dir(vmm, "pids");
    assert!(
        cg_dir.ends_with(format!("vireo/{cgroup}")),
        "{}",
        cg_dir.display()
    );
    // The jail's root holds the bound socket directory at the same path,
    // and /dev/null; nothing of the host's /tmp else.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    assert!(root
        .join(vm_dir.strip_prefix("/").unwrap())
        .join("ctl.sock")
        .exists());
    assert!(!root.join(kernel.strip_prefix("/").unwrap()).exists());
    assert!(root.join("dev/null").exists());
    // The control socket works through the jail; the guest powers off.
    let reply = control(&socket, "power-button");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let status = vm.wait("the jailed VM to power off");
    assert_eq!(status.code(), Some(0), "{}", vm.output());
    assert!(vm.output().contains("power button pressed"));
    remove_cgroups(&[cgroup]);
}

#[test]
fn the_supervisor_forwards_sigterm_and_ends_as_the_vmm_did() {
    require_root_and_backend!();
    let dir = TempDir::new("jail-signals");
    let kernel = power_button_kernel(&dir);
    let names: Vec<String> = ["term", "kill", "parent"]
        .iter()
        .map(|t| format!("jailtest-{t}-{}", std::process::id()))
        .collect();
    let start = |tag: usize| {
        let mut vm = LiveVm::start_kernel(
            &kernel,
            &[
                "--jail",
                "--jail-dir",
                dir.path().join("root").to_str().unwrap(),
                "--cgroup",
                &names[tag],
            ],
        );
        assert!(
            vm.read_until("waiting for the power button"),
            "{}",
            vm.output()
        );
        let vmm = wait_for_child(vm.pid());
        (vm, vmm)
    };
    // SIGTERM to the supervisor reaches the VMM, which stops the VM
    // cleanly (as without the jail).
    let (mut vm, vmm) = start(0);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let status = vm.wait("the VM to stop on SIGTERM");
    assert!(!Path::new(&format!("/proc/{vmm}")).exists());
    assert!(status.code().is_some(), "{status:?}");
    // A VMM killed by a signal: the supervisor ends by the same signal.
    let (mut vm, vmm) = start(1);
    // SAFETY: as above.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    let status = vm.wait("the supervisor to follow its VMM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    // Killing the supervisor takes the VMM with it.
    let (mut vm, vmm) = start(2);
    // SAFETY: as above.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
    vm.wait("the supervisor to die");
    let start = Instant::now();
    while Path::new(&format!("/proc/{vmm}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the VMM outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_cgroups(&names);
}

#[test]
fn without_root_the_jail_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to start vireo as another user");
        return;
    }
    let dir = TempDir::new("jail-noroot");
    let kernel = dir.write("vmlinux", b"not a kernel");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new(support::vireo_bin())
        .args(["run", "--jail", "--kernel", kernel.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Permission denied") && out.status.code() != Some(2) {
        eprintln!("skipping: nobody cannot execute the test binary here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--jail needs root"), "{stderr}");
    assert!(stderr.contains("--no-jail"), "{stderr}");
}

/// A TAP opened before the jail's network namespace keeps its host end:
/// the VMM sits in an empty namespace of its own while the TAP (in the
/// test's namespace) has a reader attached (carrier up) — the guest's
/// frames still flow through the descriptor.
#[test]
fn a_tap_keeps_working_from_the_jails_own_network_namespace() {
    require_root_and_backend!();
    if let Some(why) = support::netns::unavailable_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    if Command::new("nsenter").arg("--version").output().is_err() {
        eprintln!("skipping: nsenter (util-linux) is not installed");
        return;
    }
    let dir = TempDir::new("jail-tap");
    let kernel = power_button_kernel(&dir);
    let netns = support::netns::NetNs::new("jailtap");
    netns.add_tap("tap0", "10.0.9.1/24");
    let ns_path = format!("/var/run/netns/{}", netns.name);
    let carrier = || {
        let out = Command::new("ip")
            .args(["-n", &netns.name, "-o", "link", "show", "tap0"])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&out.stdout).contains("NO-CARRIER")
    };
    assert!(!carrier(), "no VM yet, yet the TAP has a carrier");
    // nsenter, not `ip netns exec`: that one remounts /sys, taking the
    // cgroup hierarchies with it.
    let net_arg = format!("--net={ns_path}");
    let mut vm = LiveVm::start(
        &["nsenter", &net_arg, "--"],
        &[
            "run".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--net".into(),
            "tap=tap0".into(),
            "--jail".into(),
            "--jail-dir".into(),
            dir.path().join("root").display().to_string(),
            "--cgroup".into(),
            format!("jailtest-tap-{}", std::process::id()),
        ],
        support::RUN_TIMEOUT,
    );
    assert!(
        vm.read_until("waiting for the power button"),
        "{}",
        vm.output()
    );
    let vmm = wait_for_child(vm.pid());
    let vmm_net = ns(vmm, "net");
    let tap_ns_ino = std::fs::metadata(&ns_path).unwrap().ino();
    assert_ne!(vmm_net, PathBuf::from(format!("net:[{tap_ns_ino}]")));
    assert_ne!(vmm_net, ns(std::process::id(), "net"));
    assert!(carrier(), "the jailed VMM let go of its TAP");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    vm.wait("the VM to stop");
    remove_cgroups(&[format!("jailtest-tap-{}", std::process::id())]);
}

#[test]
fn a_control_socket_the_jail_cannot_create_is_a_clear_error() {
    require_root_and_backend!();
    let dir = TempDir::new("jail-ctl");
    let kernel = power_button_kernel(&dir);
    // Root's 0755 directory: nobody (the default jail uid) cannot write it.
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let socket = vm_dir.join("ctl.sock");
    let out = support::run_vireo(
        &kernel,
        &[
            "--jail",
            "--jail-dir",
            dir.path().join("root").to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
        ],
        support::RUN_TIMEOUT,
    );
    out.assert_status(2);
    assert!(
        out.stderr.contains("cannot create it in") && out.stderr.contains("chown 65534:65534"),
        "{out}"
    );
}

#[test]
fn doctor_reports_every_check_and_whether_the_jail_can_run() {
    let out = support::run_vireo_args(&["doctor".to_string()], support::RUN_TIMEOUT);
    for check in [
        "root",
        "/dev/kvm",
        "virtualization",
        "cgroups",
        "namespaces",
        "seccomp",
        "Landlock",
        "userfaultfd",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(check)),
            "no {check} line\n{out}"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !out.stdout.contains("FAIL") {
        out.assert_status(0);
        assert!(out.stdout.contains("jail: ready"), "{out}");
    } else {
        out.assert_status(1);
        assert!(out.stdout.contains("jail: cannot run here"), "{out}");
    }
}

#[test]
fn doctor_json_lists_the_same_checks_and_exits_by_the_same_rule() {
    let text = support::run_vireo_args(&["doctor".to_string()], support::RUN_TIMEOUT);
    let out = support::run_vireo_args(
        &["doctor".to_string(), "--json".to_string()],
        support::RUN_TIMEOUT,
    );
    let checks: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{out}"));
    let checks = checks.as_array().expect("a JSON array");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    let text_names: Vec<&str> = text
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(names.len())
        .collect();
    assert_eq!(names, text_names, "{out}\n{text}");
    for want in [
        "accel-auto",
        "/dev/net/tun",
        "state-dir",
        "socket",
        "web-ui",
        "build",
    ] {
        assert!(names.contains(&want), "no {want}: {names:?}");
    }
    let failed = checks.iter().any(|c| c["verdict"] == "fail");
    out.assert_status(i32::from(failed));
}
