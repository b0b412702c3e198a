//! Step 1 of the jail, [`enter`] (see [`crate::jail`]): at the start of
//! the process, in the order that matters, what [`super`]'s other files do.

use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

use super::capabilities::{drop_bounding_set, set_no_new_privs};
use super::ids::JailIds;
use super::namespaces::{enter_namespaces, JailNet, NetNamespaces};
use super::supervisor::fork_supervised;
use super::{sys, thread_count, JailError};
use crate::cgroup::{CgroupError, CgroupName, Layout, Limits};

/// What the jail needs from the host, checked before anything changes:
/// root (or its capabilities) and a single thread. One line each, naming
/// the fix.
pub fn check_host() -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Host(
            "--jail needs root (to create namespaces and a cgroup, pivot_root and drop to the jail's uid): \
             run it as root (sudo), or pass --no-jail to debug without the jail"
                .into(),
        ));
    }
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Host(format!(
            "the jail must be entered while the process is single-threaded, and it has {threads} threads"
        )));
    }
    Ok(())
}

/// What [`enter`] does before the fork.
#[derive(Debug, Clone)]
pub struct Enter {
    /// Descriptors above 2 that stay open (the daemon's console pipes).
    pub keep_fds: Vec<RawFd>,
    /// Environment variables that stay; all others go.
    pub keep_env: Vec<String>,
    /// The VM's cgroup: created with these limits and joined.
    pub cgroup: Option<(Layout, CgroupName, Limits)>,
    /// The supervisor's ids (the same as the VMM's).
    pub ids: JailIds,
    /// [`JailNet::Own`]: the VMM enters an empty network namespace at once,
    /// so every thread it ever starts is in it.
    pub net: JailNet,
}

/// Step 1 (see the module documentation of [`crate::jail`]). Returns in the VMM child only
/// (with its way back to the host's network for [`JailNet::Own`]); the
/// supervisor never returns (it exits as the child did).
pub fn enter(e: &Enter) -> Result<Option<NetNamespaces>, JailError> {
    check_host()?;
    close_inherited_fds(&e.keep_fds)?;
    clear_environment(&e.keep_env);
    if let Some((layout, name, limits)) = &e.cgroup {
        join_cgroup(layout, name, limits)?;
    }
    // The process is single-threaded (checked above), as CLONE_NEWPID's
    // fork wants.
    enter_namespaces()?;
    fork_supervised(e.ids)?;
    // Every thread the VMM starts inherits both: no capability can be
    // gained by exec, and seccomp filters need no privilege.
    drop_bounding_set()?;
    set_no_new_privs()?;
    // Still single-threaded: every thread the VMM starts is in it.
    match e.net {
        JailNet::Own => NetNamespaces::unshare().map(Some),
        JailNet::Host => Ok(None),
    }
}

/// Every environment variable but those in `keep` goes.
fn clear_environment(keep: &[String]) {
    let drop_env: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| !keep.iter().any(|kept| k.as_bytes() == kept.as_bytes()))
        .collect();
    for k in drop_env {
        std::env::remove_var(k);
    }
}

/// Create the VM's cgroup with its limits and move this process into it.
fn join_cgroup(layout: &Layout, name: &CgroupName, limits: &Limits) -> Result<(), JailError> {
    sweep_empty_cgroups(layout);
    // Another start's sweep may remove the new cgroup before this
    // process is in it (it is empty until then): make it again.
    let mut tries = 0;
    loop {
        match layout.create(name, limits).and_then(|cg| cg.join(0)) {
            Ok(()) => break,
            // NotFound: the directory went; ENODEV: writing into one
            // the kernel is removing.
            Err(CgroupError::Io { source, .. })
                if (source.kind() == std::io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ENODEV))
                    && tries < 10 =>
            {
                tries += 1;
                // A removal in progress finishes first.
                std::thread::sleep(std::time::Duration::from_millis(10 * tries));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Remove leftover empty VM cgroups (of direct runs, of VMs whose daemon
/// was killed); one holding processes refuses (EBUSY) and stays.
fn sweep_empty_cgroups(layout: &Layout) {
    for parent in layout.parents() {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

fn close_inherited_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(sys("listing /proc/self/fd"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor this process holds and no Rust
            // object owns yet (the process just started); the read_dir's
            // own descriptor is already closed (EBADF is harmless).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}
