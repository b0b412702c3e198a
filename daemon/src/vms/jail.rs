//! How the daemon jails each VM process (`vireo run --jail ...`, see
//! `vireo_sandbox::jail`): a uid/gid of its own from a range no account
//! uses, the VM's directory owned by it (the VMM binds its control socket
//! and writes snapshots there, seen at the same path inside the jail), a
//! cgroup named after the VM and the daemon's state directory with limits
//! from the definition, and a directory to mount the jail's root on.
//!
//! The slot of a running VM's ids is the uid its process runs as (read in
//! /proc), so it survives a daemon restart without a record of its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vireo_sandbox::cgroup::{self, CgroupName};
use vireo_sandbox::jail::JailIds;

use crate::db::VmRecord;

/// The first uid (and gid) of VM processes: far above any account's.
pub const UID_BASE: u32 = 10_000_000;
/// How many VMs may run jailed at once.
pub const UID_SLOTS: u32 = 65_536;
/// What a VM process may use beyond guest memory before its memory
/// cgroup limit (threads, the emulator's caches, device buffers).
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// pids.max of a VM: vCPU and device threads with room to spare.
pub const VM_PIDS: u64 = 256;
/// Where the jails' roots are mounted, one empty directory per VM.
const JAILS: &str = "jail";
/// The descriptors `spawn_vm` passes on purpose (the console pipes).
const KEPT_FDS: [&str; 2] = ["3", "4"];
/// The network a daemon VM sees: an empty namespace of its own. Its TAPs
/// are opened, a migration target's listener bound, and sockets for an
/// outgoing migration made in the host's network before the jail locks.
const JAIL_NET: &str = "own";

/// The uid a process runs as (from /proc/PID/status).
pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The lowest free ids, given the uids running VMs have.
pub fn pick_ids(used: &[u32]) -> Option<JailIds> {
    (UID_BASE..UID_BASE + UID_SLOTS)
        .find(|u| !used.contains(u))
        .map(|uid| JailIds { uid, gid: uid })
}

/// A VM's cgroup: its name and a short stable hash of the state directory,
/// so two daemons' VMs of the same name never share one.
pub fn cgroup_name(state_dir: &Path, vm: &str) -> String {
    // FNV-1a: stable across builds (a restarted daemon finds its VMs').
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{vm}.{h:08x}")
}

pub fn jail_dir(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(JAILS).join(vm)
}

/// The VM directory and its snapshots directory belong to the VM's ids
/// (the VMM creates its control socket and snapshot files there); the
/// jail's mount point exists.
pub fn prepare(state_dir: &Path, vm_dir: &Path, vm: &str, ids: JailIds) -> std::io::Result<()> {
    let snapshots = vm_dir.join(super::snapshots::SNAPSHOTS);
    std::fs::create_dir_all(&snapshots)?;
    for d in [vm_dir, snapshots.as_path()] {
        std::os::unix::fs::chown(d, Some(ids.uid), Some(ids.gid))?;
    }
    std::fs::create_dir_all(jail_dir(state_dir, vm))
}

/// `vireo run`'s jail flags for `rec`.
pub fn run_args(state_dir: &Path, rec: &VmRecord, ids: JailIds) -> Vec<OsString> {
    let c = &rec.config;
    let mut a: Vec<OsString> = vec![
        "--jail".into(),
        "--jail-uid".into(),
        ids.uid.to_string().into(),
        "--jail-gid".into(),
        ids.gid.to_string().into(),
        "--jail-dir".into(),
        jail_dir(state_dir, &rec.name).into(),
        "--jail-net".into(),
        JAIL_NET.into(),
        "--cgroup".into(),
        cgroup_name(state_dir, &rec.name).into(),
        "--cgroup-cpus".into(),
        (c.vcpus + 1).to_string().into(),
        "--cgroup-memory".into(),
        (c.memory_mib.mib() + VMM_OVERHEAD_MIB).to_string().into(),
        "--cgroup-pids".into(),
        VM_PIDS.to_string().into(),
    ];
    for fd in KEPT_FDS {
        a.push("--jail-keep-fd".into());
        a.push(fd.into());
    }
    a
}

/// Remove a VM's cgroup once its process ended. One whose VMM is still
/// exiting stays (the next start of the VM reuses it).
pub fn remove_cgroup(state_dir: &Path, vm: &str) {
    let Ok(name) = CgroupName::new(&cgroup_name(state_dir, vm)) else {
        return;
    };
    let Ok(layout) = cgroup::detect() else {
        return;
    };
    if let Err(e) = layout.remove(&name) {
        // Its VMM may still be exiting (it dies with its supervisor); the
        // next jailed start anywhere sweeps empty cgroups.
        tracing::debug!("VM {vm}: cgroup left for now: {e}");
    }
}

/// A deleted VM's jail: its cgroup and the directory its root was
/// mounted on.
pub fn forget(state_dir: &Path, vm: &str) {
    remove_cgroup(state_dir, vm);
    let _ = std::fs::remove_dir(jail_dir(state_dir, vm));
}

/// The audit log line of a VM started without the jail (`vireo serve
/// --no-jail`).
pub fn audit_no_jail(state_dir: &Path, vm: &str, pid: i32) {
    use std::io::Write;
    let line = serde_json::json!({
        "time": crate::observe::now_rfc3339(),
        "event": "vm_started_without_jail",
        "vm": vm,
        "pid": pid,
        "warning": "the daemon runs with --no-jail: this VM's process runs as root, unconfined",
    });
    let path = state_dir.join(crate::auth::AUDIT_LOG);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_lowest_free_slot() {
        assert_eq!(pick_ids(&[]).map(|i| i.uid), Some(UID_BASE));
        assert_eq!(
            pick_ids(&[UID_BASE, UID_BASE + 2]).map(|i| (i.uid, i.gid)),
            Some((UID_BASE + 1, UID_BASE + 1))
        );
        let all: Vec<u32> = (UID_BASE..UID_BASE + UID_SLOTS).collect();
        assert_eq!(pick_ids(&all), None);
    }

    #[test]
    fn cgroup_names_are_valid_and_per_state_dir() {
        let a = cgroup_name(Path::new("/var/lib/vireo"), "web-1");
        let b = cgroup_name(Path::new("/tmp/other"), "web-1");
        assert_ne!(a, b);
        assert!(a.starts_with("web-1."));
        // The longest VM name still makes a valid cgroup name.
        let long = "x".repeat(vireo_api::model::MAX_NAME);
        assert!(CgroupName::new(&cgroup_name(Path::new("/"), &long)).is_ok());
        assert!(CgroupName::new(&cgroup_name(Path::new("/"), "web-1")).is_ok());
    }
}

/// Make `path` belong to the uid process `pid` runs as, when that is a
/// jail uid (an unjailed VM runs as the daemon's user: nothing to do).
pub fn give_to_process(path: &Path, pid: i32) -> std::io::Result<()> {
    match uid_of(pid) {
        Some(uid) if (UID_BASE..UID_BASE + UID_SLOTS).contains(&uid) => {
            std::os::unix::fs::chown(path, Some(uid), Some(uid))
        }
        _ => Ok(()),
    }
}

impl super::Daemon {
    /// Give a file the daemon wrote for a running VM's process to read at
    /// run time (a migration's one-time secret, a CA certificate; both in
    /// the VM's directory, which the jail shows at the same path) to the
    /// VM's jail uid: a 0600 root file is unreadable inside the jail.
    pub fn hand_to_vm(&self, name: &str, path: &Path) -> std::io::Result<()> {
        let pid = super::lock(&self.inner).procs.get(name).map(|p| p.id.pid);
        match pid {
            Some(pid) => give_to_process(path, pid),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod give_tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn files_go_to_jail_uids_only() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: chown needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vireo-give-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, b"s").unwrap();
        use std::os::unix::fs::MetadataExt;
        // This process runs as root, not a jail uid: unchanged.
        give_to_process(&f, std::process::id() as i32).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 0);
        // A process running as a jail uid gets it.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .uid(UID_BASE + 7)
            .gid(UID_BASE + 7)
            .spawn()
            .unwrap();
        give_to_process(&f, child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), UID_BASE + 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
