//! Landlock: file access limited to the jail's bound paths, where the
//! kernel has it (the private root confines the process either way).

use super::root::Bind;
use super::{check, cstr, sys, JailError};

/// What Landlock did in [`lock_down`](super::lock_down()).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// File access limited to the bound paths, with this ABI.
    Enforced { abi: u32 },
    /// Not done, and why (no Landlock in this kernel, or threads already
    /// running that a ruleset cannot reach).
    Skipped(String),
}

const LANDLOCK_ACCESS_FS_EXECUTE: u64 = 1 << 0;
const LANDLOCK_ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
const LANDLOCK_ACCESS_FS_READ_FILE: u64 = 1 << 2;
const LANDLOCK_ACCESS_FS_MAKE_CHAR: u64 = 1 << 6;
const LANDLOCK_ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
const LANDLOCK_ACCESS_FS_REFER: u64 = 1 << 13;
const LANDLOCK_ACCESS_FS_TRUNCATE: u64 = 1 << 14;
const LANDLOCK_ACCESS_FS_IOCTL_DEV: u64 = 1 << 15;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct LandlockPathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The file-system rights Landlock ABI `abi` knows.
fn landlock_fs_rights(abi: u32) -> u64 {
    let mut r = (1u64 << 13) - 1; // ABI 1: EXECUTE ..= MAKE_SYM
    if abi >= 2 {
        r |= LANDLOCK_ACCESS_FS_REFER;
    }
    if abi >= 3 {
        r |= LANDLOCK_ACCESS_FS_TRUNCATE;
    }
    if abi >= 5 {
        r |= LANDLOCK_ACCESS_FS_IOCTL_DEV;
    }
    r
}

/// Limit this thread (and the threads it starts) to `paths`: directories
/// `writable` get every right but executing and making device nodes, the
/// others reading; nothing else of the file system. With ABI 6, also no
/// abstract Unix sockets or signals to processes outside the domain.
/// Needs no_new_privs (or CAP_SYS_ADMIN). `threads`: how many the process
/// runs (counted before the pivot: the jail has no /proc).
pub fn landlock_restrict(paths: &[Bind], threads: usize) -> Result<LandlockOutcome, JailError> {
    let abi = match landlock_abi() {
        Ok(abi) => abi,
        Err(why) => return Ok(LandlockOutcome::Skipped(why)),
    };
    if threads != 1 {
        return Ok(LandlockOutcome::Skipped(format!(
            "{threads} threads run already and a ruleset reaches only the thread that makes it \
             (the private root still confines them)"
        )));
    }
    let handled = landlock_fs_rights(abi);
    let attr = LandlockRulesetAttr {
        handled_access_fs: handled,
        handled_access_net: 0,
        scoped: if abi >= 6 {
            LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
        } else {
            0
        },
    };
    // ABI < 4 knows no handled_access_net, < 6 no scoped: pass the size
    // of what it knows.
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<LandlockRulesetAttr>(),
    };
    // SAFETY: the attribute struct outlives the call; size <= its size.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const LandlockRulesetAttr,
            size,
            0u32,
        )
    } as libc::c_int;
    if ruleset < 0 {
        return Err(sys("landlock_create_ruleset")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the descriptor was just created and is owned here.
    let ruleset = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ruleset) };
    use std::os::fd::AsRawFd;
    for b in paths {
        let c = cstr(&b.path)?;
        // SAFETY: a valid C string; O_PATH opens no file content.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(sys(format!("landlock: opening {}", b.path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: as above.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let is_dir = std::fs::metadata(&b.path).is_ok_and(|m| m.is_dir());
        let allowed = match (is_dir, b.writable) {
            (true, true) => {
                handled
                    & !(LANDLOCK_ACCESS_FS_EXECUTE
                        | LANDLOCK_ACCESS_FS_MAKE_CHAR
                        | LANDLOCK_ACCESS_FS_MAKE_BLOCK)
            }
            (true, false) => LANDLOCK_ACCESS_FS_READ_FILE | (1 << 3), // READ_DIR
            (false, true) => {
                LANDLOCK_ACCESS_FS_READ_FILE
                    | LANDLOCK_ACCESS_FS_WRITE_FILE
                    | (handled & LANDLOCK_ACCESS_FS_TRUNCATE)
            }
            (false, false) => LANDLOCK_ACCESS_FS_READ_FILE,
        };
        let rule = LandlockPathBeneathAttr {
            allowed_access: allowed,
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: the rule struct and both descriptors outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                LANDLOCK_RULE_PATH_BENEATH,
                &rule as *const LandlockPathBeneathAttr,
                0u32,
            )
        } as libc::c_int;
        check(rc, &format!("landlock_add_rule {}", b.path.display()))?;
    }
    // SAFETY: a ruleset descriptor and no flags.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) }
        as libc::c_int;
    check(rc, "landlock_restrict_self")?;
    Ok(LandlockOutcome::Enforced { abi })
}

/// The Landlock ABI version, or why there is none.
pub fn landlock_abi() -> Result<u32, String> {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a number.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi > 0 {
        return Ok(abi as u32);
    }
    let err = std::io::Error::last_os_error();
    Err(if lsms.is_empty() {
        format!("not available ({err}; /sys/kernel/security/lsm unreadable)")
    } else if !lsms.split(',').any(|l| l.trim() == "landlock") {
        format!("not available (not among the active LSMs: {})", lsms.trim())
    } else {
        format!("not available ({err})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::capabilities::set_no_new_privs;

    /// In a forked child (single-threaded, as the VMM is), a ruleset for
    /// one directory: a file there opens, one beside it does not.
    #[test]
    fn landlock_confines_file_access_to_the_given_paths() {
        if let Err(why) = landlock_abi() {
            eprintln!("skipping: Landlock {why}");
            return;
        }
        let base = std::env::temp_dir().join(format!("vireo-landlock-{}", std::process::id()));
        let inside = base.join("inside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("f"), b"x").unwrap();
        std::fs::write(base.join("outside"), b"y").unwrap();
        let binds = vec![Bind {
            path: inside.clone(),
            writable: true,
        }];
        let (ok_path, denied_path) = (inside.join("f"), base.join("outside"));
        // SAFETY: the child only makes syscalls and allocates (glibc
        // resets its allocator locks across fork), then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                set_no_new_privs().ok()?;
                match landlock_restrict(&binds, 1).ok()? {
                    LandlockOutcome::Enforced { .. } => {}
                    LandlockOutcome::Skipped(_) => return Some(3),
                }
                if std::fs::read(&ok_path).is_err() {
                    return Some(4);
                }
                if std::fs::write(ok_path.with_file_name("new"), b"z").is_err() {
                    return Some(5);
                }
                match std::fs::read(&denied_path) {
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(0),
                    _ => Some(6),
                }
            })()
            .unwrap_or(2);
            // SAFETY: ends the forked child without unwinding.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = std::fs::remove_dir_all(&base);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "see the exit codes in the child"
        );
    }

    #[test]
    fn landlock_rights_grow_with_the_abi() {
        assert_eq!(landlock_fs_rights(1), (1 << 13) - 1);
        assert_eq!(landlock_fs_rights(3), (1 << 15) - 1);
        assert_eq!(landlock_fs_rights(7), (1 << 16) - 1);
    }
}
