//! `vireo run --jail`: the two steps of [`vireo_sandbox::jail`] with what
//! `vireo run`'s flags say (ids, cgroup and limits, the new root, which
//! paths the jailed VMM still needs).

use std::path::{Path, PathBuf};

use vireo_sandbox::cgroup::{self, CgroupName, CpuQuota, Limits};
use vireo_sandbox::jail::{self, Bind, Enter, JailIds, JailNet, LockDown};

use crate::cli::{JailNetArg, RunArgs};
use crate::Failure;
use vireo_vmm::devices::Attached;

/// Where a direct `vireo run --jail` mounts its new root: one empty
/// directory serves every VM, as each mounts its tmpfs there in its own
/// private mount namespace.
pub const DEFAULT_JAIL_DIR: &str = "/run/vireo/jail";
/// What the VMM itself may use beyond guest memory (its threads, the
/// emulator's translation caches, device buffers) before the memory
/// cgroup limit: the default limit is guest memory plus this.
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// Default pids.max: vCPU and device threads with room to spare.
pub const DEFAULT_PIDS: u64 = 256;
/// Default RLIMIT_NOFILE inside the jail.
pub const MAX_FILES: u64 = 4096;
/// Default RLIMIT_FSIZE (MiB): disks grow, so large.
pub const DEFAULT_MAX_FILE_SIZE_MIB: u64 = 16 << 20;
/// The environment kept across the jail (the log filter).
const KEEP_ENV: [&str; 2] = ["VIREO_LOG", "RUST_BACKTRACE"];

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(format!("--jail: {e}"))
}

pub fn ids(args: &RunArgs) -> JailIds {
    let uid = args.jail_uid.unwrap_or(JailIds::NOBODY.uid);
    JailIds {
        uid,
        gid: args.jail_gid.unwrap_or(if args.jail_uid.is_some() {
            uid
        } else {
            JailIds::NOBODY.gid
        }),
    }
}

/// The cgroup limits `args` ask for; guest-sized defaults when the flags
/// give the machine's size (a boot, or a migration target, which runs its
/// own definition); a restore learns its size later, so only explicit
/// limits apply there.
pub fn limits(args: &RunArgs) -> Limits {
    let sized = args.restore.is_none();
    let cpus = args
        .cgroup_cpus
        .or(sized.then(|| f64::from(args.cpus()) + 1.0));
    let memory = args
        .cgroup_memory
        .or(sized.then(|| args.memory().mib() + VMM_OVERHEAD_MIB));
    Limits {
        cpu: cpus.map(|c| CpuQuota {
            quota_us: (c * 100_000.0).round().max(1000.0) as u64,
            period_us: 100_000,
        }),
        memory_bytes: memory.map(|m| m << 20),
        pids: Some(args.cgroup_pids.unwrap_or(DEFAULT_PIDS)),
    }
}

/// Step 1, at the very start of `vireo run --jail` (single-threaded).
/// Returns in the VMM process; the supervisor exits from inside.
pub fn enter(args: &RunArgs) -> Result<(), Failure> {
    if !args.jail {
        return Ok(());
    }
    jail::check_host().map_err(usage)?;
    let name = match &args.cgroup {
        Some(n) => n.clone(),
        None => format!("run-{}", std::process::id()),
    };
    let name = CgroupName::new(&name).map_err(|e| Failure::Usage(format!("--cgroup {e}")))?;
    let layout = cgroup::detect().map_err(usage)?;
    let netns = jail::enter(&Enter {
        keep_fds: args.jail_keep_fd.clone(),
        keep_env: KEEP_ENV.iter().map(|s| s.to_string()).collect(),
        cgroup: Some((layout, name, limits(args))),
        ids: ids(args),
        net: net(args),
    })
    .map_err(usage)?;
    vireo_vmm::host_net::set_host_namespaces(netns);
    Ok(())
}

fn net(args: &RunArgs) -> JailNet {
    match args.jail_net {
        JailNetArg::Own => JailNet::Own,
        JailNetArg::Host => JailNet::Host,
    }
}

/// The host paths the jailed VMM still uses, at the same paths: the
/// directories of its control and vsock sockets (it binds the control
/// socket and connects to `vsock_PORT` sockets there), each writable
/// disk read-only (a snapshot copies it by path; the VMM writes through
/// the descriptor it opened before), and `--jail-bind` paths.
pub fn binds(args: &RunArgs, attached: &Attached) -> Vec<Bind> {
    let mut out: Vec<Bind> = Vec::new();
    let mut add = |path: &Path, writable: bool| {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !out.iter().any(|b| b.path == path) {
            out.push(Bind { path, writable });
        }
    };
    let parent = |p: &Path| -> PathBuf {
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        abs.parent().map(Path::to_path_buf).unwrap_or(abs)
    };
    for p in &args.jail_bind {
        add(p, true);
    }
    if let Some(sock) = &args.control_socket {
        add(&parent(sock), true);
    }
    if let Some((_, sock)) = &attached.device_set.vsock {
        add(&parent(sock), true);
    }
    for d in &attached.disk_files {
        add(&d.path, false);
    }
    out
}

/// A bound directory above another (the vsock socket's directory holding
/// the VM's own) would show the VM the host's directories in between,
/// with their permissions: refuse it, naming the fix.
fn check_nesting(binds: &[Bind]) -> Result<(), Failure> {
    for outer in binds {
        for inner in binds {
            if inner.path != outer.path
                && inner.path.starts_with(&outer.path)
                && std::fs::metadata(&inner.path).is_ok_and(|m| m.is_dir())
            {
                return Err(Failure::Usage(format!(
                    "--jail: {} (the directory of a socket) holds {}, which the jail also binds: \
                     the VM would see everything in between; put each socket in a directory of its own \
                     (or both in the VM's directory)",
                    outer.path.display(),
                    inner.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Can `ids` create a file in `dir` (by its owner, group and mode)?
fn can_create_in(dir: &Path, ids: JailIds) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dir) else {
        return false;
    };
    let mode = m.mode();
    let wx = |shift: u32| mode >> shift & 0o3 == 0o3;
    (m.uid() == ids.uid && wx(6)) || (m.gid() == ids.gid && wx(3)) || wx(0)
}

/// Step 2, once the machine is built and before anything else starts.
pub fn lock_down(args: &RunArgs, attached: &Attached) -> Result<(), Failure> {
    if !args.jail {
        return Ok(());
    }
    if let Some(sock) = &args.control_socket {
        let abs = std::path::absolute(sock).unwrap_or_else(|_| sock.clone());
        let dir = abs.parent().unwrap_or(Path::new("/"));
        let ids = ids(args);
        if !can_create_in(dir, ids) {
            return Err(Failure::Usage(format!(
                "--control-socket {}: the jail's uid {} cannot create it in {}: \
                 chown {}:{} {} (the daemon does so for its VMs), or use a directory of the VM's own",
                sock.display(),
                ids.uid,
                dir.display(),
                ids.uid,
                ids.gid,
                dir.display()
            )));
        }
    }
    let l = LockDown {
        root: args
            .jail_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JAIL_DIR)),
        binds: {
            let b = binds(args, attached);
            check_nesting(&b)?;
            b
        },
        ids: ids(args),
        max_files: MAX_FILES,
        max_file_size: args
            .jail_max_file_size
            .unwrap_or(DEFAULT_MAX_FILE_SIZE_MIB)
            .saturating_mul(1 << 20),
    };
    vireo_vmm::host_net::reserve_sockets().map_err(|e| Failure::Vm(format!("--jail: {e}")))?;
    let landlock = jail::lock_down(&l).map_err(usage)?;
    tracing::info!(
        "jailed: uid {} gid {}, root {} with {} bound path(s), {} network, Landlock {}",
        l.ids.uid,
        l.ids.gid,
        l.root.display(),
        l.binds.len(),
        match net(args) {
            JailNet::Own => "its own",
            JailNet::Host => "the host's",
        },
        match landlock {
            jail::LandlockOutcome::Enforced { abi } => format!("enforced (ABI {abi})"),
            jail::LandlockOutcome::Skipped(why) => format!("skipped: {why}"),
        }
    );
    Ok(())
}
