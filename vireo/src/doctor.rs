//! `vireo doctor`: what this host offers VMs and their jail, one line per
//! check, each failure naming the fix.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use vireo_hypervisor::host::HostVirt;
use vireo_hypervisor::kvm::KvmHypervisor;
use vireo_hypervisor::BackendKind;
use vireo_sandbox::{cgroup, jail};
use vireo_vmm::backend::auto_backend;

use crate::Failure;

/// `vireo doctor`'s flags: which daemon's directories and socket to look at
/// (the defaults are those `vireo serve` and `vireo vm` use).
#[derive(Debug, Args, Default)]
pub struct DoctorArgs {
    /// Print the checks as a JSON array of {name, verdict, detail}
    /// (verdict: ok, info, warn or fail) for scripts.
    #[arg(long)]
    pub json: bool,
    /// The daemon's state directory whose free space to check
    /// [default: as vireo serve: /var/lib/vireo for root].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A storage directory whose free space to check, repeatable
    /// [default: STATE_DIR/storage].
    #[arg(long, value_name = "DIR")]
    pub storage: Vec<PathBuf>,
    /// The daemon's socket to try [default: as vireo vm].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Below this much free space a state or storage directory gets a WARN:
/// one disk image or a snapshot of a 1 GiB guest no longer fits.
const LOW_SPACE: u64 = 1 << 30;

pub const DOCTOR_EXAMPLES: &str = "\
Examples:
  vireo doctor
  sudo vireo doctor          # as the daemon runs: the namespace checks need root

  vireo doctor --json | jq -r '.[] | select(.verdict == \"fail\") | .detail'
  vireo doctor --state-dir /srv/vireo --storage /srv/images --socket /srv/vireo.sock

Checks /dev/kvm and the kind of hardware virtualization, what --accel auto
picks for a stock kernel, and what the jail of every daemon VM (and
`vireo run --jail`) needs: root, cgroup v2 or v1 controllers (cpu, memory,
pids), PID/mount/IPC/UTS/network namespaces, seccomp; reports Landlock,
userfaultfd (post-copy migration), /dev/net/tun, nftables, cgroup
delegation, user namespaces, free space in the state and storage
directories (WARN below 1 GiB), the daemon's socket, the embedded web UI
and the build. Exits 0 when no line is FAIL (the jail can run here), 1
when a FAIL line says what is missing.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Not needed by the jail; said for information.
    Info,
    /// Works, but something is likely to fail soon (e.g. low disk space).
    Warn,
    /// The jail cannot run without it.
    Fail,
}

#[derive(Debug, Serialize)]
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
pub fn checks(args: &DoctorArgs) -> Vec<Check> {
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
    out.push(accel_auto(KvmHypervisor::new().map(|_| ()), virt));
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
    out.push(tun());
    out.push(nftables());
    out.push(cgroup_delegation());
    out.push(user_namespaces());
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(vireo_daemon::paths::default_state_dir);
    out.push(free_space("state-dir", &state_dir));
    let storage = if args.storage.is_empty() {
        vec![state_dir.join("storage")]
    } else {
        args.storage.clone()
    };
    for dir in &storage {
        out.push(free_space("storage-dir", dir));
    }
    out.push(socket(&vireo_daemon::paths::client_socket(
        args.socket.clone(),
    )));
    out.push(if vireo_daemon::web::built() {
        check(
            "web-ui",
            Verdict::Ok,
            format!(
                "embedded ({} files): vireo serve serves it at /",
                vireo_daemon::web::files().len()
            ),
        )
    } else {
        check(
            "web-ui",
            Verdict::Info,
            "not in this build (VIREO_WEB_DIST named a directory without index.html): \
             rebuild without VIREO_WEB_DIST to embed the committed web/dist",
        )
    });
    out.push(check(
        "build",
        Verdict::Info,
        format!("vireo {}", vireo_daemon::version::LONG),
    ));
    out
}

/// What `--accel auto` ([`vireo_vmm::backend::auto_backend`]) picks for
/// a stock kernel, one that is not a PVM guest.
fn accel_auto(kvm: Result<(), impl std::fmt::Display>, virt: HostVirt) -> Check {
    let pvm_only = virt.kvm_is_pvm_only();
    match (auto_backend(kvm.is_ok(), pvm_only, false), kvm) {
        (BackendKind::Kvm, _) => check(
            "accel-auto",
            Verdict::Ok,
            "kvm: a stock kernel runs at hardware speed",
        ),
        (BackendKind::Emu, Err(e)) => check(
            "accel-auto",
            Verdict::Info,
            format!(
                "emu: every kernel runs on vireo's emulator, much slower than KVM; KVM is not usable: {e}"
            ),
        ),
        (BackendKind::Emu, Ok(())) => check(
            "accel-auto",
            Verdict::Info,
            "emu for a stock kernel (KVM here is PVM-only and would emulate it in the host kernel); \
             kvm for a PVM guest kernel — a host with VT-x/AMD-V runs any kernel on KVM",
        ),
    }
}

fn tun() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => check("/dev/net/tun", Verdict::Ok, "opened read-write: --net tap works"),
        Err(e) => check(
            "/dev/net/tun",
            Verdict::Info,
            format!(
                "{e}: no TAP networking (--net tap) — modprobe tun, and run as root or with CAP_NET_ADMIN"
            ),
        ),
    }
}

/// The first directory of `$PATH` (and the sbin directories root has)
/// holding an executable `name`.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn nftables() -> Check {
    let module = Path::new("/sys/module/nf_tables").exists();
    let detail = match (find_program("nft"), module) {
        (Some(nft), true) => format!("{} and the nf_tables module", nft.display()),
        (Some(nft), false) => format!(
            "{}; nf_tables not loaded (it loads on first use, or is built in)",
            nft.display()
        ),
        (None, true) => {
            "nf_tables module loaded, no nft binary — apt install nftables to write NAT rules".into()
        }
        (None, false) => {
            "no nft binary and no nf_tables module: vireo makes TAPs, not firewall rules; NAT for a VM network \
             needs them — apt install nftables"
                .into()
        }
    };
    check("nftables", Verdict::Info, detail)
}

/// Where the cgroup v2 (unified) hierarchy is mounted, from mountinfo
/// (`/sys/fs/cgroup` on a v2 host, `/sys/fs/cgroup/unified` on a hybrid one).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

fn cgroup_delegation() -> Check {
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| cgroup2_mount(&m));
    let controllers = match &mount {
        Some(m) => std::fs::read_to_string(m.join("cgroup.controllers")),
        None => Err(std::io::ErrorKind::NotFound.into()),
    };
    let detail = match (controllers, cgroup::detect()) {
        (Err(_), _) => "no cgroup v2 unified hierarchy mounted (v1 only; delegation does not apply)"
            .to_string(),
        (Ok(c), Ok(cgroup::Layout::V2 { base })) => {
            let writable = access_w(&base);
            format!(
                "unified hierarchy controllers: {}; this process's cgroup {} is {}",
                nonempty(c.trim()),
                base.display(),
                if writable {
                    "writable (delegated: VM cgroups can be made under it)"
                } else {
                    "not writable — run as root, or under systemd with Delegate=yes (vireo.service has it)"
                }
            )
        }
        (Ok(c), _) => format!(
            "unified hierarchy at {} has controllers: {} (not all of cpu, memory, pids: v1 is used)",
            mount.as_deref().unwrap_or(Path::new("?")).display(),
            nonempty(c.trim())
        ),
    };
    check("cgroup-delegation", Verdict::Info, detail)
}

fn nonempty(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

fn access_w(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn user_namespaces() -> Check {
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().parse::<u64>())
    {
        Ok(Ok(n)) if n > 0 => check(
            "user-namespaces",
            Verdict::Info,
            format!("allowed (user.max_user_namespaces={n})"),
        ),
        Ok(Ok(_)) => check(
            "user-namespaces",
            Verdict::Info,
            "disabled (user.max_user_namespaces=0) — sysctl -w user.max_user_namespaces=15000 to allow them",
        ),
        Ok(Err(e)) => check(
            "user-namespaces",
            Verdict::Info,
            format!("/proc/sys/user/max_user_namespaces unreadable as a number: {e}"),
        ),
        Err(e) => check(
            "user-namespaces",
            Verdict::Info,
            format!("/proc/sys/user/max_user_namespaces: {e} (kernel without CONFIG_USER_NS?)"),
        ),
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`,
/// or its nearest existing ancestor when `dir` is not made yet.
fn free_bytes(dir: &Path) -> std::io::Result<(PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt;
    // A relative --state-dir is the daemon's too: beneath the working directory.
    let dir = &std::path::absolute(dir)?;
    let mut at = dir.as_path();
    while !at.exists() {
        at = match at.parent() {
            Some(p) => p,
            None => break,
        };
    }
    let c = std::ffi::CString::new(at.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((at.to_path_buf(), st.f_bavail as u64 * st.f_frsize as u64))
}

fn space_verdict(name: &'static str, dir: &Path, at: &Path, free: u64) -> Check {
    let gib = free as f64 / (1u64 << 30) as f64;
    let where_ = if at == dir {
        dir.display().to_string()
    } else {
        format!(
            "{} (not made yet; its filesystem at {})",
            dir.display(),
            at.display()
        )
    };
    if free < LOW_SPACE {
        check(
            name,
            Verdict::Warn,
            format!("{where_}: {gib:.2} GiB free, under 1 GiB — free space there or point vireo serve at another disk"),
        )
    } else {
        check(name, Verdict::Ok, format!("{where_}: {gib:.1} GiB free"))
    }
}

fn free_space(name: &'static str, dir: &Path) -> Check {
    match free_bytes(dir) {
        Ok((at, free)) => space_verdict(name, dir, &at, free),
        Err(e) => check(
            name,
            Verdict::Warn,
            format!("{}: statvfs: {e}", dir.display()),
        ),
    }
}

fn socket(path: &Path) -> Check {
    if !path.exists() {
        return check(
            "socket",
            Verdict::Info,
            format!(
                "{}: no daemon listening — start one with vireo serve (or systemctl start vireo)",
                path.display()
            ),
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => check(
            "socket",
            Verdict::Ok,
            format!("{}: a daemon accepts connections", path.display()),
        ),
        Err(e) => check(
            "socket",
            Verdict::Info,
            format!(
                "{}: {e} — a stale socket (start vireo serve), or join the vireo group for /run/vireo.sock",
                path.display()
            ),
        ),
    }
}

/// 0 when no check failed, 1 otherwise.
pub fn exit_status(checks: &[Check]) -> i32 {
    i32::from(checks.iter().any(|c| c.verdict == Verdict::Fail))
}

/// The `--json` form: an array of {name, verdict, detail}.
pub fn to_json(checks: &[Check]) -> String {
    // Serializing owned strings and a unit enum cannot fail.
    serde_json::to_string_pretty(checks).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
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

pub fn doctor(args: DoctorArgs) -> Result<(), Failure> {
    let checks = checks(&args);
    if args.json {
        println!("{}", to_json(&checks));
        std::process::exit(exit_status(&checks));
    }
    println!("vireo doctor: this host, for VMs and their jail");
    for c in &checks {
        let tag = match c.verdict {
            Verdict::Ok => "ok",
            Verdict::Info => "--",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        println!("  {tag:<5} {:<17} {}", c.name, c.detail);
    }
    if exit_status(&checks) != 0 {
        println!(
            "jail: cannot run here — fix the FAIL lines (or vireo serve --no-jail, debugging only)"
        );
        std::process::exit(1);
    }
    println!("jail: ready");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &'static str, verdict: Verdict) -> Check {
        check(name, verdict, format!("{name} detail"))
    }

    #[test]
    fn exits_1_only_when_a_check_fails() {
        assert_eq!(exit_status(&[]), 0);
        assert_eq!(
            exit_status(&[
                c("a", Verdict::Ok),
                c("b", Verdict::Info),
                c("c", Verdict::Warn)
            ]),
            0
        );
        assert_eq!(
            exit_status(&[
                c("a", Verdict::Ok),
                c("b", Verdict::Fail),
                c("c", Verdict::Warn)
            ]),
            1
        );
    }

    #[test]
    fn json_is_an_array_of_name_verdict_detail() {
        let checks = [
            c("root", Verdict::Ok),
            c("socket", Verdict::Info),
            c("state-dir", Verdict::Warn),
            check("cgroups", Verdict::Fail, "quote \" and\nnewline"),
        ];
        let v: serde_json::Value = serde_json::from_str(&to_json(&checks)).expect("valid JSON");
        let arr = v.as_array().expect("an array");
        assert_eq!(arr.len(), 4);
        let verdicts: Vec<&str> = arr
            .iter()
            .map(|e| e["verdict"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(verdicts, ["ok", "info", "warn", "fail"]);
        assert_eq!(arr[0]["name"], "root");
        assert_eq!(arr[3]["detail"], "quote \" and\nnewline");
        for e in arr {
            let mut keys: Vec<&String> = e.as_object().expect("an object").keys().collect();
            keys.sort();
            assert_eq!(keys, ["detail", "name", "verdict"]);
        }
    }

    #[test]
    fn every_check_runs_and_names_are_one_word() {
        let dir = std::env::temp_dir().join(format!("vireo-doctor-{}", std::process::id()));
        let args = DoctorArgs {
            state_dir: Some(dir.join("state")),
            storage: vec![dir.join("a"), dir.join("b")],
            socket: Some(dir.join("no.sock")),
            ..Default::default()
        };
        let checks = checks(&args);
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        for want in [
            "root",
            "/dev/kvm",
            "accel-auto",
            "virtualization",
            "cgroups",
            "namespaces",
            "seccomp",
            "Landlock",
            "userfaultfd",
            "/dev/net/tun",
            "nftables",
            "cgroup-delegation",
            "user-namespaces",
            "state-dir",
            "socket",
            "web-ui",
            "build",
        ] {
            assert!(names.contains(&want), "no {want} in {names:?}");
        }
        // One storage-dir line per --storage.
        assert_eq!(names.iter().filter(|n| **n == "storage-dir").count(), 2);
        // The text form's second column is the name: no spaces in it.
        assert!(names.iter().all(|n| !n.contains(' ')), "{names:?}");
        let sock = checks.iter().find(|c| c.name == "socket").expect("socket");
        assert_eq!(sock.verdict, Verdict::Info, "{}", sock.detail);
        assert!(sock.detail.contains("no.sock"), "{}", sock.detail);
    }

    #[test]
    fn a_socket_with_a_listener_is_ok() {
        let dir = std::env::temp_dir().join(format!("vireo-doctor-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("d.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert_eq!(socket(&path).verdict, Verdict::Ok);
        drop(listener);
        // A socket file nobody listens on: refused, said as Info.
        assert_eq!(socket(&path).verdict, Verdict::Info);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn low_space_warns_and_a_missing_dir_uses_its_ancestor() {
        let d = Path::new("/x/y");
        assert_eq!(
            space_verdict("state-dir", d, d, LOW_SPACE - 1).verdict,
            Verdict::Warn
        );
        assert_eq!(
            space_verdict("state-dir", d, d, LOW_SPACE).verdict,
            Verdict::Ok
        );
        let (at, _) = free_bytes(Path::new("/tmp/vireo-doctor-never/made/here")).expect("statvfs");
        assert_eq!(at, Path::new("/tmp"));
        // A relative path that does not exist: its filesystem is the working directory's.
        let (at, _) = free_bytes(Path::new("vireo-doctor-never-made")).expect("statvfs");
        assert_eq!(at, std::env::current_dir().expect("cwd"));
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn accel_auto_is_the_backend_factorys_choice() {
        let pvm_only = HostVirt::from_sources("flags\t: fpu\n", true);
        let vtx = HostVirt::from_sources("flags\t: fpu vmx\n", false);
        let ok: Result<(), &str> = Ok(());
        assert!(accel_auto(ok, pvm_only).detail.starts_with("emu"));
        assert!(accel_auto(ok, vtx).detail.starts_with("kvm"));
        assert!(accel_auto(Err("no /dev/kvm"), vtx)
            .detail
            .starts_with("emu"));
    }
}
