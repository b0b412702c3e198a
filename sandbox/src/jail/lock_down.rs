//! Step 2 of the jail, [`lock_down`] (see [`crate::jail`]): once the VMM
//! opened everything, in the order that matters, what [`super`]'s other
//! files do.

use std::path::PathBuf;

use super::capabilities::{clear_capabilities, set_no_new_privs};
use super::ids::{set_ids, JailIds};
use super::landlock::{landlock_restrict, LandlockOutcome};
use super::rlimits::set_rlimits;
use super::root::{build_root, pivot_into, Bind, DEV_NODES};
use super::supervisor::die_with_parent;
use super::{check, thread_count, JailError};

/// What [`lock_down`] builds and drops to.
#[derive(Debug, Clone)]
pub struct LockDown {
    /// Where the new root (a tmpfs) is mounted before `pivot_root`: an
    /// empty host directory (the tmpfs exists only in the jail's private
    /// mount namespace).
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    pub ids: JailIds,
    /// RLIMIT_NOFILE.
    pub max_files: u64,
    /// RLIMIT_FSIZE: the largest file the VM may write (disks grow).
    pub max_file_size: u64,
}

/// Step 2 (see the module documentation of [`crate::jail`]). Says what
/// Landlock did.
pub fn lock_down(l: &LockDown) -> Result<LandlockOutcome, JailError> {
    // Counted before the pivot: the jail has no /proc.
    let threads = thread_count();
    build_root(l)?;
    pivot_into(&l.root)?;
    set_ids(l.ids)?;
    // The kernel clears the parent-death signal when the ids change.
    die_with_parent()?;
    clear_capabilities()?;
    set_no_new_privs()?;
    set_rlimits(l.max_files, l.max_file_size)?;
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
        "PR_SET_DUMPABLE",
    )?;
    let mut allowed: Vec<Bind> = DEV_NODES
        .iter()
        .map(|d| Bind {
            path: d.into(),
            writable: true,
        })
        .collect();
    allowed.extend(l.binds.iter().cloned());
    landlock_restrict(&allowed, threads)
}
