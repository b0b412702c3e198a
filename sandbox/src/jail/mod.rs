//! The jail of a VM process, in the manner of Firecracker's jailer, in two
//! steps inside the VM's own `vireo run` (no separate jailer binary, so
//! the daemon starts and watches one process as before):
//!
//! 1. [`enter`](fn@enter) at the very start, while the process is single-threaded:
//!    close inherited descriptors (but the ones kept on purpose), clear the
//!    environment, join the VM's cgroup, `unshare` PID, mount, IPC and UTS
//!    namespaces and fork. The parent becomes a small supervisor (the
//!    process the daemon started, kills, waits for and re-adopts): it drops
//!    to the jail ids at once, forwards SIGTERM/SIGINT/SIGHUP to the child
//!    and exits as the child did. The child — PID 1 of the new PID
//!    namespace, killed when the supervisor dies — returns and becomes the
//!    VMM, still root and still seeing the host's files, with no
//!    capabilities left in its bounding set and `no_new_privs` set, and
//!    (unless the VM needs the host's) in an empty network namespace, so
//!    every thread it starts inherits all three. [`NetNamespaces`] keeps
//!    its way back to the host's network for what must be made there.
//! 2. [`lock_down`](fn@lock_down) once the VMM opened everything it needs (/dev/kvm,
//!    disks, TAPs, kernel and initrd read, migration listener bound) and
//!    before any guest code runs: a tmpfs root holding only the bound paths
//!    and /dev/null + /dev/urandom, `pivot_root` into it, the old root
//!    gone, then the jail uid/gid with no supplementary groups (which
//!    clears every capability), rlimits, `PR_SET_DUMPABLE` 0 and Landlock
//!    where the kernel has it.
//!
//! The two steps (`enter.rs`, `lock_down.rs`) only put in order what the
//! other files do, one concept each: the namespaces (`namespaces.rs`), the
//! fork and the supervisor (`supervisor.rs`), the private root
//! (`root.rs`), the jail's ids (`ids.rs`), capabilities and
//! `no_new_privs` (`capabilities.rs`), rlimits (`rlimits.rs`) and Landlock
//! (`landlock.rs`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::cgroup::CgroupError;

mod capabilities;
mod enter;
mod ids;
mod landlock;
mod lock_down;
mod namespaces;
mod rlimits;
mod root;
mod supervisor;

pub use enter::{check_host, enter, Enter};
pub use ids::JailIds;
pub use landlock::{landlock_abi, landlock_restrict, LandlockOutcome};
pub use lock_down::{lock_down, LockDown};
pub use namespaces::{probe_namespaces, JailNet, NetNamespaces};
pub use root::Bind;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{0}")]
    Host(String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn check(rc: libc::c_int, what: &str) -> Result<(), JailError> {
    if rc < 0 {
        Err(sys(what)(std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Host(format!("{}: a path with a NUL byte", path.display())))
}

/// The process's thread count, from /proc/self/task (0 if unreadable).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}
