//! The unprivileged uid/gid the VM process (and its supervisor) drop to.

use super::{check, JailError};

/// The ids the VM process runs as after [`lock_down`](super::lock_down()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
}

impl JailIds {
    /// `nobody`: the ids of a direct `vireo run --jail` given no others.
    pub const NOBODY: JailIds = JailIds {
        uid: 65534,
        gid: 65534,
    };
}

/// No supplementary groups, then the jail's gid and uid (real, effective,
/// saved), which clears the permitted, effective and ambient capabilities
/// of every thread (glibc applies set*id to all threads).
pub(super) fn set_ids(ids: JailIds) -> Result<(), JailError> {
    // SAFETY: setgroups with an empty list.
    check(
        unsafe { libc::setgroups(0, std::ptr::null()) },
        "setgroups(0)",
    )?;
    // SAFETY: integer arguments.
    check(
        unsafe { libc::setresgid(ids.gid, ids.gid, ids.gid) },
        &format!("setresgid({})", ids.gid),
    )?;
    // SAFETY: integer arguments.
    check(
        unsafe { libc::setresuid(ids.uid, ids.uid, ids.uid) },
        &format!("setresuid({})", ids.uid),
    )?;
    Ok(())
}
