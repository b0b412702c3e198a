//! The jail of a VM process, in the manner of Firecracker's jailer, in two
//! steps inside the VM's own `vireo run` (no separate jailer binary, so
//! the daemon starts and watches one process as before):
//!
//! 1. [`enter`] at the very start, while the process is single-threaded:
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
//! 2. [`lock_down`] once the VMM opened everything it needs (/dev/kvm,
//!    disks, TAPs, kernel and initrd read, migration listener bound) and
//!    before any guest code runs: a tmpfs root holding only the bound paths
//!    and /dev/null + /dev/urandom, `pivot_root` into it, the old root
//!    gone, then the jail uid/gid with no supplementary groups (which
//!    clears every capability), rlimits, `PR_SET_DUMPABLE` 0 and Landlock
//!    where the kernel has it.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::cgroup::{CgroupError, CgroupName, Layout, Limits};

/// The ids the VM process runs as after [`lock_down`].
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

/// Whose network the VM process sees after [`lock_down`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailNet {
    /// An empty network namespace of its own (TAPs opened before keep
    /// working: they stay attached to the host's interfaces).
    Own,
    /// The host's: for a VM that connects out over TCP (an outgoing live
    /// migration).
    Host,
}

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

/// The process's thread count, from /proc/self/task (0 if unreadable).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
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

/// The VMM's way back to the host's network namespace until
/// [`lock_down`]: for what must be made there (TAPs looked up by name, a
/// migration listener, sockets kept for an outgoing migration). Dropping
/// it closes both namespace descriptors.
#[derive(Debug)]
pub struct NetNamespaces {
    host: std::os::fd::OwnedFd,
    jail: std::os::fd::OwnedFd,
}

fn open_netns() -> Result<std::os::fd::OwnedFd, JailError> {
    std::fs::File::open("/proc/thread-self/ns/net")
        .map(std::os::fd::OwnedFd::from)
        .map_err(sys("opening /proc/thread-self/ns/net"))
}

fn setns(fd: &std::os::fd::OwnedFd, which: &str) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace descriptor this struct owns; it moves
    // only the calling thread.
    check(
        unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
        &format!("setns into the {which} network namespace"),
    )
}

impl NetNamespaces {
    /// Move this thread into an empty network namespace of its own,
    /// remembering the one it leaves.
    pub fn unshare() -> Result<NetNamespaces, JailError> {
        let host = open_netns()?;
        // SAFETY: flags only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc < 0 {
            return Err(JailError::Host(format!(
                "unshare(CLONE_NEWNET) was refused ({}): the kernel needs network namespaces \
                 (CONFIG_NET_NS); see `vireo doctor`",
                std::io::Error::last_os_error()
            )));
        }
        let jail = open_netns()?;
        Ok(NetNamespaces { host, jail })
    }

    /// Run `f` on this thread in the host's network namespace, then come
    /// back. A thread `f` starts would stay in the host's: `f` must not
    /// start any.
    pub fn in_host<T>(&self, f: impl FnOnce() -> T) -> Result<T, JailError> {
        setns(&self.host, "host's")?;
        let out = f();
        setns(&self.jail, "jail's")?;
        Ok(out)
    }
}

/// Step 1 (see the module documentation). Returns in the VMM child only
/// (with its way back to the host's network for [`JailNet::Own`]); the
/// supervisor never returns (it exits as the child did).
pub fn enter(e: &Enter) -> Result<Option<NetNamespaces>, JailError> {
    check_host()?;
    close_inherited_fds(&e.keep_fds)?;
    let drop_env: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            !e.keep_env
                .iter()
                .any(|keep| k.as_bytes() == keep.as_bytes())
        })
        .collect();
    for k in drop_env {
        std::env::remove_var(k);
    }
    if let Some((layout, name, limits)) = &e.cgroup {
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
    }
    // SAFETY: unshare takes flags only; the process is single-threaded
    // (checked above), as CLONE_NEWPID's fork below wants.
    let rc = unsafe {
        libc::unshare(
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        return Err(JailError::Host(format!(
            "unshare(CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWIPC|CLONE_NEWUTS) was refused ({err}): the kernel needs \
             PID, mount, IPC and UTS namespaces (CONFIG_PID_NS, ...) and a container runtime must allow \
             unshare (seccomp profile, CAP_SYS_ADMIN); see `vireo doctor`"
        )));
    }
    // Nothing this mount namespace does reaches the host's, and nothing
    // mounted on the host later shows up in it.
    let root = c"/";
    // SAFETY: mount with a valid C string target and null source/type/data.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "making / private in the jail's mount namespace",
    )?;

    // Signals the supervisor forwards are blocked across the fork, so none
    // is lost before it waits for them; the child unblocks them.
    let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in forwarded {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
    }
    // SAFETY: the process is single-threaded, so the child owns a
    // consistent copy of every lock and allocation.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(sys("fork into the jail's PID namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    if child == 0 {
        // SAFETY: restores the mask saved above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        die_with_parent()?;
        // Every thread the VMM starts inherits both: no capability can be
        // gained by exec, and seccomp filters need no privilege.
        drop_bounding_set()?;
        set_no_new_privs()?;
        // Still single-threaded: every thread the VMM starts is in it.
        return match e.net {
            JailNet::Own => NetNamespaces::unshare().map(Some),
            JailNet::Host => Ok(None),
        };
    }
    supervise(child, &set, e.ids)
}

/// The supervisor: drop privileges, forward signals, exit as the child.
fn supervise(child: libc::pid_t, set: &libc::sigset_t, ids: JailIds) -> ! {
    // Its root and working directory move into the jail with the child's
    // pivot_root only if they are the old root: a working directory left
    // elsewhere would keep the host's tree reachable.
    // SAFETY: chdir with a valid C string.
    unsafe { libc::chdir(c"/".as_ptr()) };
    if let Err(e) = drop_bounding_set()
        .and_then(|()| set_ids(ids))
        .and_then(|()| set_no_new_privs())
    {
        eprintln!("vireo: error: jail supervisor: {e}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child, libc::SIGKILL) };
        std::process::exit(1);
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Its own filter: it only waits, forwards signals and reaps.
    let filter = crate::seccomp::compile_supervisor(child);
    if let Err(e) = filter.and_then(|f| {
        seccompiler::apply_filter(&f).map_err(|e| crate::seccomp::SeccompError::Compile {
            kind: crate::seccomp::ThreadKind::Supervisor,
            why: e.to_string(),
        })
    }) {
        eprintln!("vireo: error: jail supervisor: seccomp: {e}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child, libc::SIGKILL) };
        std::process::exit(1);
    }
    loop {
        // SAFETY: siginfo_t is plain data that sigwaitinfo fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to the blocked set and the siginfo.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            // SAFETY: as above.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let s = libc::WTERMSIG(status);
            // The daemon reads "killed by SIGKILL/SIGSYS" from the status:
            // end the same way; 128+signal if the signal does not kill.
            // SAFETY: plain signal calls on this single-threaded process.
            unsafe {
                libc::signal(s, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, s);
                libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(s);
            }
            std::process::exit(128 + s);
        }
    }
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

fn die_with_parent() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )
}

fn set_no_new_privs() -> Result<(), JailError> {
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

fn drop_bounding_set() -> Result<(), JailError> {
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

/// No supplementary groups, then the jail's gid and uid (real, effective,
/// saved), which clears the permitted, effective and ambient capabilities
/// of every thread (glibc applies set*id to all threads).
fn set_ids(ids: JailIds) -> Result<(), JailError> {
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

/// A host path visible at the same path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

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

/// Device nodes the VMM may still open inside the jail.
const DEV_NODES: [&str; 2] = ["/dev/null", "/dev/urandom"];

/// Step 2 (see the module documentation). Says what Landlock did.
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
    set_rlimit(libc::RLIMIT_NOFILE, l.max_files, "RLIMIT_NOFILE")?;
    set_rlimit(libc::RLIMIT_FSIZE, l.max_file_size, "RLIMIT_FSIZE")?;
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
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

fn build_root(l: &LockDown) -> Result<(), JailError> {
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

fn pivot_into(root: &Path) -> Result<(), JailError> {
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
fn clear_capabilities() -> Result<(), JailError> {
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

/// What Landlock did in [`lock_down`].
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

/// Try, in a throw-away child, the namespaces the jail creates (PID,
/// mount, IPC, UTS, network); the error of the first refused.
pub fn probe_namespaces() -> Result<(), String> {
    let flags = [
        (libc::CLONE_NEWPID, "PID"),
        (libc::CLONE_NEWNS, "mount"),
        (libc::CLONE_NEWIPC, "IPC"),
        (libc::CLONE_NEWUTS, "UTS"),
        (libc::CLONE_NEWNET, "network"),
    ];
    // SAFETY: the child only calls unshare and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        for (i, (flag, _)) in flags.iter().enumerate() {
            // SAFETY: flags only; then _exit without running destructors.
            unsafe {
                if libc::unshare(*flag) < 0 {
                    libc::_exit(10 + i as libc::c_int);
                }
            }
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 if libc::WIFEXITED(status) => Ok(()),
        n if (10..10 + flags.len() as i32).contains(&n) => Err(format!(
            "unshare of a {} namespace refused",
            flags[(n - 10) as usize].1
        )),
        _ => Err(format!("the probe ended with status {status:#x}")),
    }
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

    #[test]
    fn the_capability_count_is_read_from_the_kernel() {
        let n = last_cap();
        // CAP_CHECKPOINT_RESTORE (40) exists on every kernel vireo supports.
        assert!((40..64).contains(&n), "{n}");
    }

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

    /// In a forked child: after unshare the host's loopback listener is
    /// out of reach, through `in_host` it is not, and a socket made there
    /// connects from the jail's namespace.
    #[test]
    fn in_host_reaches_the_host_network_from_the_jails() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: network namespaces need root");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // SAFETY: the child makes syscalls and allocates (glibc resets its
        // allocator locks across fork), then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                let ns = NetNamespaces::unshare().ok()?;
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(3);
                }
                let kept = ns.in_host(socket_v4).ok()?.ok()?;
                // Back in the jail's namespace: a socket made in the host's
                // still connects there.
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(4);
                }
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: addr.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                use std::os::fd::AsRawFd;
                // SAFETY: connect with a valid sockaddr_in and its size.
                let rc = unsafe {
                    libc::connect(
                        kept.as_raw_fd(),
                        &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                Some(if rc == 0 { 0 } else { 5 })
            })()
            .unwrap_or(2);
            // SAFETY: ends the forked child without unwinding.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        drop(listener);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "see the exit codes in the child"
        );
    }

    fn socket_v4() -> std::io::Result<std::os::fd::OwnedFd> {
        // SAFETY: socket takes integers; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created, owned once.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}
