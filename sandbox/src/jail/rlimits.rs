//! The resource limits the VM process runs under once locked down.

use super::{check, JailError};

/// At most `max_files` open descriptors, no file written beyond
/// `max_file_size` bytes, no core dumps.
pub(super) fn set_rlimits(max_files: u64, max_file_size: u64) -> Result<(), JailError> {
    set_rlimit(libc::RLIMIT_NOFILE, max_files, "RLIMIT_NOFILE")?;
    set_rlimit(libc::RLIMIT_FSIZE, max_file_size, "RLIMIT_FSIZE")?;
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &str,
) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit struct.
    check(unsafe { libc::setrlimit(resource, &lim) }, what)
}
