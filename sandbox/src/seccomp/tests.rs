use super::install::forbidden_syscall;
use super::tables::Args;
use super::*;
use std::collections::BTreeSet;

fn nrs(kind: ThreadKind) -> BTreeSet<libc::c_long> {
    kind.allowed().iter().map(|a| a.nr).collect()
}

#[test]
fn every_kind_compiles_for_both_actions() {
    for kind in ThreadKind::ALL {
        for action in [OnViolation::KillProcess, OnViolation::Log] {
            let prog = compile(kind, action).unwrap_or_else(|e| panic!("{e}"));
            // The kernel takes at most 4096 instructions per filter.
            assert!(
                !prog.is_empty() && prog.len() < 4096,
                "{kind}: {} instructions",
                prog.len()
            );
        }
    }
}

#[test]
fn every_entry_says_who_needs_it() {
    for kind in ThreadKind::ALL {
        for a in kind.allowed() {
            assert!(!a.why.trim().is_empty(), "{kind}: {} has no reason", a.name);
        }
    }
}

/// What turns a thread into something else: new processes, programs,
/// debugging other processes, new filesystems or privileges.
const NEVER: &[(libc::c_long, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_keyctl, "keyctl"),
];

#[test]
fn no_kind_may_exec_fork_trace_or_mount() {
    for kind in ThreadKind::ALL {
        let allowed = nrs(kind);
        for (nr, name) in NEVER {
            assert!(!allowed.contains(nr), "{kind} allows {name}");
        }
        // Creating threads is the launcher's alone.
        if kind != ThreadKind::Launcher {
            for (nr, name) in [(libc::SYS_clone, "clone"), (libc::SYS_clone3, "clone3")] {
                assert!(!allowed.contains(&nr), "{kind} allows {name}");
            }
        }
    }
}

#[test]
fn vcpus_open_no_files_and_make_no_sockets() {
    for kind in [ThreadKind::Vcpu, ThreadKind::EmulatorVcpu] {
        let allowed = nrs(kind);
        for (nr, name) in [
            (libc::SYS_open, "open"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_openat2, "openat2"),
            (libc::SYS_socket, "socket"),
            (libc::SYS_connect, "connect"),
            (libc::SYS_accept4, "accept4"),
            (libc::SYS_unlink, "unlink"),
            (libc::SYS_mkdir, "mkdir"),
        ] {
            assert!(!allowed.contains(&nr), "{kind} allows {name}");
        }
    }
}

#[test]
fn ioctl_and_socket_are_always_narrowed() {
    for kind in ThreadKind::ALL {
        for a in kind.allowed() {
            if a.nr == libc::SYS_ioctl {
                assert!(
                    matches!(a.args, Args::Ioctl(_)),
                    "{kind}: ioctl with any request"
                );
            }
            if a.nr == libc::SYS_socket {
                assert!(
                    matches!(a.args, Args::OneOf { arg: 0, .. }),
                    "{kind}: socket of any domain"
                );
            }
        }
    }
}

#[test]
fn only_the_emulators_vcpu_may_map_executable_memory() {
    for kind in ThreadKind::ALL {
        let exec = kind.allowed().iter().any(|a| {
            (a.nr == libc::SYS_mmap || a.nr == libc::SYS_mprotect) && matches!(a.args, Args::Any)
        });
        assert_eq!(
            exec,
            kind == ThreadKind::EmulatorVcpu,
            "{kind}: PROT_EXEC allowed = {exec}"
        );
    }
}

#[test]
fn the_launcher_covers_every_kind_it_starts() {
    let launcher = nrs(ThreadKind::Launcher);
    for kind in ThreadKind::ALL.into_iter().filter(|k| k.launchable()) {
        let missing: Vec<_> = nrs(kind).difference(&launcher).copied().collect();
        assert!(
            missing.is_empty(),
            "{kind}: {missing:?} not in the launcher's filter"
        );
    }
}

#[test]
fn apply_and_spawn_do_nothing_until_enabled() {
    // This test process never calls `enable`.
    assert!(!is_enabled());
    apply(ThreadKind::Vcpu).unwrap();
    let t = spawn(
        ThreadKind::Device(Device::Block),
        std::thread::Builder::new(),
        || {
            // Unfiltered: a forbidden syscall is just a syscall.
            // SAFETY: getppid takes no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) }
        },
    )
    .unwrap();
    assert!(t.join().unwrap() > 0);
    assert!(std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .contains("Seccomp:\t0"));
}

/// Run `body` in a forked child under `kind`'s filter; how the child ended.
fn in_filtered_child(kind: ThreadKind, body: fn()) -> libc::c_int {
    // Compiled before the fork: the child only makes syscalls.
    let prog = compile(kind, OnViolation::KillProcess).unwrap();
    // SAFETY: the child runs only async-signal-safe code (prctl, seccomp,
    // raw syscalls, _exit) and never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        if seccompiler::apply_filter(&prog).is_err() {
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(3) };
        }
        body();
        // exit(2), not _exit's exit_group (which only Main may make): the
        // child's only thread ends, and with it the child.
        // SAFETY: leaving the forked child.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn a_forbidden_syscall_kills_and_an_allowed_one_does_not() {
    let allowed = in_filtered_child(ThreadKind::Vcpu, || {
        // SAFETY: gettid takes no arguments.
        unsafe { libc::syscall(libc::SYS_gettid) };
    });
    assert!(
        libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0,
        "status {allowed:#x}"
    );
    let exec = in_filtered_child(ThreadKind::Vcpu, forbidden_syscall);
    assert!(killed_by_sigsys(exec), "execve on a vCPU: status {exec:#x}");
    let open = in_filtered_child(ThreadKind::Device(Device::Block), || {
        // SAFETY: openat of a NUL-terminated path; the fd (if any) is leaked
        // by a child that exits at once.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/passwd".as_ptr(),
                libc::O_RDONLY,
            )
        };
    });
    assert!(
        killed_by_sigsys(open),
        "openat on a disk thread: status {open:#x}"
    );
}

#[test]
fn ioctl_requests_outside_the_list_kill() {
    // KVM_RUN is a vCPU's; on a bad fd it just fails with EBADF.
    let run = in_filtered_child(ThreadKind::Vcpu, || {
        // SAFETY: ioctl on an fd that is not open fails with EBADF.
        unsafe { libc::ioctl(-1, 0xae80) };
    });
    assert!(libc::WIFEXITED(run), "KVM_RUN on a vCPU: status {run:#x}");
    // TIOCSTI (push input into a terminal) is nobody's.
    let sti = in_filtered_child(ThreadKind::Vcpu, || {
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, libc::TIOCSTI) };
    });
    assert!(killed_by_sigsys(sti), "TIOCSTI on a vCPU: status {sti:#x}");
}

fn map_exec() {
    // SAFETY: a fresh anonymous mapping, left to the exiting child.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
}

#[test]
fn executable_mappings_only_for_the_emulators_vcpu() {
    assert!(killed_by_sigsys(in_filtered_child(
        ThreadKind::Vcpu,
        map_exec
    )));
    assert!(killed_by_sigsys(in_filtered_child(
        ThreadKind::Device(Device::Net),
        map_exec
    )));
    let emu = in_filtered_child(ThreadKind::EmulatorVcpu, map_exec);
    assert!(libc::WIFEXITED(emu), "status {emu:#x}");
}

#[test]
fn sockets_only_of_the_listed_domains() {
    let unix = in_filtered_child(ThreadKind::Device(Device::Vsock), || {
        // SAFETY: socket(2); the fd is left to the exiting child.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    });
    assert!(libc::WIFEXITED(unix), "status {unix:#x}");
    let inet = in_filtered_child(ThreadKind::Device(Device::Vsock), || {
        // SAFETY: as above.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    });
    assert!(
        killed_by_sigsys(inet),
        "AF_INET on a vsock thread: status {inet:#x}"
    );
    let netlink = in_filtered_child(ThreadKind::Main, || {
        // SAFETY: as above.
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
    });
    assert!(
        killed_by_sigsys(netlink),
        "AF_NETLINK on main: status {netlink:#x}"
    );
}

#[test]
fn clone_only_for_threads_and_only_on_the_launcher() {
    // A fork-like clone (no CLONE_THREAD) from the launcher dies.
    let fork = in_filtered_child(ThreadKind::Launcher, || {
        // SAFETY: clone(SIGCHLD) is fork; if it ran, both sides exit at once.
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    });
    assert!(killed_by_sigsys(fork), "status {fork:#x}");
}
