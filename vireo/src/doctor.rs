//! `vireo doctor`: what this host offers VMs and their jail, one line per
//! check, each failure naming the fix.

use vireo_hypervisor::host::HostVirt;
use vireo_sandbox::{cgroup, jail};

use crate::Failure;

pub const DOCTOR_EXAMPLES: &str = "\
Examples:
  vireo doctor
  sudo vireo doctor          # as the daemon runs: the namespace checks need root

Checks /dev/kvm and the kind of hardware virtualization, and what the jail
of every daemon VM (and `vireo run --jail`) needs: root, cgroup v2 or v1
controllers (cpu, memory, pids), PID/mount/IPC/UTS/network namespaces,
seccomp; reports Landlock and userfaultfd (post-copy migration). Exits 0
when the jail can run here, 1 when a FAIL line says what is missing.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Not needed by the jail; said for information.
    Info,
    /// The jail cannot run without it.
    Fail,
}

pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
    }
}

/// Every check, in the order printed.
pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    out.push(if root {
        check("root", Verdict::Ok, "running as root: the jail can drop each VM to its own uid")
    } else {
        check(
            "root",
            Verdict::Fail,
            "not root: the jail (every daemon VM, vireo run --jail) needs root — run vireo serve as root",
        )
    });
    out.push(
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => check("/dev/kvm", Verdict::Ok, "opened read-write"),
            Err(e) => check(
                "/dev/kvm",
                Verdict::Info,
                format!("{e}: VMs run on vireo's emulator (--accel emu) only"),
            ),
        },
    );
    let virt = HostVirt::detect();
    out.push(check(
        "virtualization",
        Verdict::Info,
        match (virt.hardware_virt, virt.kvm_pvm) {
            (true, _) => "VT-x/AMD-V: KVM runs any guest at hardware speed".to_string(),
            (false, true) => "PVM only (kvm_pvm, no VT-x/AMD-V): KVM runs PVM guest kernels; \
                              other kernels run on vireo's emulator (--accel auto picks it)"
                .to_string(),
            (false, false) => "no VT-x/AMD-V and no PVM: the emulator only".to_string(),
        },
    ));
    out.push(match cgroup::detect() {
        Ok(cgroup::Layout::V2 { base }) => check(
            "cgroups",
            Verdict::Ok,
            format!("v2 with cpu, memory, pids: VM cgroups in {}/vireo", base.display()),
        ),
        Ok(cgroup::Layout::V1 { cpu, memory, pids }) => check(
            "cgroups",
            Verdict::Ok,
            format!(
                "v1 (the unified hierarchy has no controllers): VM cgroups in {}, {}, {} (each /vireo)",
                cpu.display(),
                memory.display(),
                pids.display()
            ),
        ),
        Err(e) => check("cgroups", Verdict::Fail, e.to_string()),
    });
    out.push(if root {
        match jail::probe_namespaces() {
            Ok(()) => check(
                "namespaces",
                Verdict::Ok,
                "PID, mount, IPC, UTS and network",
            ),
            Err(e) => check(
                "namespaces",
                Verdict::Fail,
                format!(
                    "{e}: the kernel needs CONFIG_*_NS and a container runtime must allow unshare"
                ),
            ),
        }
    } else {
        check(
            "namespaces",
            Verdict::Info,
            "not tried (creating them needs root; run sudo vireo doctor)",
        )
    });
    // SAFETY: prctl with integer arguments.
    let seccomp = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    out.push(if seccomp >= 0 {
        check("seccomp", Verdict::Ok, "filters supported")
    } else {
        check(
            "seccomp",
            Verdict::Fail,
            format!(
                "{}: build the kernel with CONFIG_SECCOMP_FILTER",
                std::io::Error::last_os_error()
            ),
        )
    });
    out.push(match jail::landlock_abi() {
        Ok(abi) => check(
            "Landlock",
            Verdict::Info,
            format!("ABI {abi}: a jailed VM's file access is limited to its bound paths"),
        ),
        Err(why) => check("Landlock", Verdict::Info, why),
    });
    out.push(userfaultfd());
    out
}

fn userfaultfd() -> Check {
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    // SAFETY: userfaultfd takes flags and returns a descriptor we close.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as libc::c_int;
    if fd >= 0 {
        // SAFETY: closing the descriptor just created.
        unsafe { libc::close(fd) };
        check(
            "userfaultfd",
            Verdict::Ok,
            format!(
                "available (vm.unprivileged_userfaultfd={unprivileged}; a post-copy migration target \
                 creates it before its jail drops privileges)"
            ),
        )
    } else {
        check(
            "userfaultfd",
            Verdict::Info,
            format!(
                "{} (vm.unprivileged_userfaultfd={unprivileged}): post-copy migration cannot run; pre-copy can",
                std::io::Error::last_os_error()
            ),
        )
    }
}

pub fn doctor() -> Result<(), Failure> {
    let checks = checks();
    println!("vireo doctor: this host, for VMs and their jail");
    for c in &checks {
        let tag = match c.verdict {
            Verdict::Ok => "ok",
            Verdict::Info => "--",
            Verdict::Fail => "FAIL",
        };
        println!("  {tag:<5} {:<15} {}", c.name, c.detail);
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        println!(
            "jail: cannot run here — fix the FAIL lines (or vireo serve --no-jail, debugging only)"
        );
        std::process::exit(1);
    }
    println!("jail: ready");
    Ok(())
}
