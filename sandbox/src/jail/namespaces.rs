//! The namespaces of the jail: the PID, mount, IPC and UTS ones entered
//! before the fork, the network one the VMM enters after it (with its way
//! back to the host's), and a probe of all of them for `vireo doctor`.

use super::{check, sys, JailError};

/// Whose network the VM process sees after [`lock_down`](super::lock_down()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailNet {
    /// An empty network namespace of its own (TAPs opened before keep
    /// working: they stay attached to the host's interfaces).
    Own,
    /// The host's: for a VM that connects out over TCP (an outgoing live
    /// migration).
    Host,
}

/// Unshare the PID, mount, IPC and UTS namespaces, the mount one private
/// from the host's. The caller is single-threaded and forks next: its
/// child is PID 1 of the new PID namespace.
pub(super) fn enter_namespaces() -> Result<(), JailError> {
    // SAFETY: unshare takes flags only; the caller is single-threaded, as
    // CLONE_NEWPID's fork after it wants.
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
    )
}

/// The VMM's way back to the host's network namespace until
/// [`lock_down`](super::lock_down()): for what must be made there (TAPs
/// looked up by name, a migration listener, sockets kept for an outgoing
/// migration). Dropping it closes both namespace descriptors.
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

#[cfg(test)]
mod tests {
    use super::*;

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
