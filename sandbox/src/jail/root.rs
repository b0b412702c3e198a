//! The jail's private root: a tmpfs holding only the bound paths and two
//! device nodes, `pivot_root` into it, the host's root detached.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::lock_down::LockDown;
use super::{check, cstr, sys, JailError};

/// A host path visible at the same path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// Device nodes the VMM may still open inside the jail.
pub(super) const DEV_NODES: [&str; 2] = ["/dev/null", "/dev/urandom"];

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = format!(
        "mount {} on {}",
        src.map(|s| s.display().to_string())
            .or(fstype.map(str::to_string))
            .unwrap_or_default(),
        dst.display()
    );
    let src = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fstype = fstype
        .map(|t| CString::new(t).map_err(|_| JailError::Host("fstype".into())))
        .transpose()?;
    let data = data
        .map(|d| CString::new(d).map_err(|_| JailError::Host("mount data".into())))
        .transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a valid C string or null, alive for the call.
    let rc = unsafe { libc::mount(p(&src), dst_c.as_ptr(), p(&fstype), flags, p(&data).cast()) };
    check(rc, &what)
}

pub(super) fn build_root(l: &LockDown) -> Result<(), JailError> {
    let root = &l.root;
    std::fs::create_dir_all(root).map_err(sys(format!("creating {}", root.display())))?;
    let hard = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        None,
        root,
        Some("tmpfs"),
        hard,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut binds: Vec<Bind> = DEV_NODES
        .iter()
        .map(|d| Bind {
            path: d.into(),
            writable: true,
        })
        .collect();
    binds.extend(l.binds.iter().cloned());
    // Parents before what lies beneath them; a path inside a directory
    // already bound is seen through it (binding it again would create its
    // mount point through the bind, on the host).
    binds.sort_by_key(|b| b.path.components().count());
    let mut bound: Vec<PathBuf> = Vec::new();
    for b in &binds {
        if bound.iter().any(|p| b.path.starts_with(p)) {
            continue;
        }
        if !b.path.is_absolute() {
            return Err(JailError::Host(format!(
                "jail bind {}: not an absolute path",
                b.path.display()
            )));
        }
        let meta =
            std::fs::metadata(&b.path).map_err(sys(format!("jail bind {}", b.path.display())))?;
        let target = inside(&b.path);
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            // An empty file in the tmpfs to mount on (never truncating).
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&target)
                        .map(drop)
                })
        }
        .map_err(sys(format!("creating {}", target.display())))?;
        mount(Some(&b.path), &target, None, libc::MS_BIND, None)?;
        if meta.is_dir() {
            bound.push(b.path.clone());
        }
        // Bind mounts take their own flags only on a remount.
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
        if !DEV_NODES.iter().any(|d| Path::new(d) == b.path) {
            flags |= libc::MS_NODEV | libc::MS_NOEXEC;
        }
        if !b.writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    Ok(())
}

pub(super) fn pivot_into(root: &Path) -> Result<(), JailError> {
    let root_c = cstr(root)?;
    let dot = c".";
    // SAFETY: valid C strings; pivot_root(".", ".") stacks the old root
    // on the new one, which the umount below then detaches.
    unsafe {
        check(libc::chdir(root_c.as_ptr()), "chdir into the jail")?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
            "pivot_root into the jail",
        )?;
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
            "detaching the host's root",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    // The root itself (its directories and mount points) read-only.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
}
