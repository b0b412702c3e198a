//! Capabilities and `no_new_privs`: the bounding set emptied on both sides
//! of the fork and `no_new_privs` set (so no thread gains a capability
//! through exec), every other set emptied after the drop to the jail's ids.

use super::{check, sys, JailError};

pub(super) fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "PR_SET_NO_NEW_PRIVS",
    )
}

/// The highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

pub(super) fn drop_bounding_set() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clearing the ambient capabilities",
    )?;
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            // A capability this kernel does not have.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(sys(format!("PR_CAPBSET_DROP {cap}"))(err));
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empty every capability set of this thread (set*id already emptied the
/// permitted and effective ones; the inheritable set is kept otherwise).
pub(super) fn clear_capabilities() -> Result<(), JailError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int },
        "capset (clearing every capability)",
    )?;
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clearing the ambient capabilities",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_count_is_read_from_the_kernel() {
        let n = last_cap();
        // CAP_CHECKPOINT_RESTORE (40) exists on every kernel vireo supports.
        assert!((40..64).contains(&n), "{n}");
    }
}
