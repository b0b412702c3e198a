//! The host's network from inside a jail with a network namespace of its
//! own: the way back into the host's namespace while the machine is built
//! (opening a TAP by name, binding a migration listener), and TCP sockets
//! made there before the jail is locked, for outgoing live migrations.
//! The jail's front end hands the namespaces over when it enters the jail
//! ([`set_host_namespaces`]) and calls [`reserve_sockets`] when it locks
//! it; without a jail every function here acts in the process's own
//! network.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vireo_sandbox::jail::{JailError, NetNamespaces};

/// The way back to the host's network namespace, from
/// [`set_host_namespaces`] (own network) until [`reserve_sockets`].
static HOST_NET: Mutex<Option<NetNamespaces>> = Mutex::new(None);
/// Whether the VMM runs in a network namespace of its own (set by
/// [`reserve_sockets`]): then TCP connections out use [`RESERVED`].
static OWN_NET: AtomicBool = AtomicBool::new(false);
/// TCP sockets made in the host's network namespace before the jail was
/// locked, for outgoing live migrations (a socket stays in the namespace
/// it was made in).
static RESERVED: Mutex<Vec<(socket2::Domain, socket2::Socket)>> = Mutex::new(Vec::new());
/// How many sockets of each family are kept: one migration each, and
/// retries.
const RESERVED_PER_FAMILY: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The jail entered a network namespace of its own: `ns` leads back to
/// the host's (`None`: the process stays in the host's network).
pub fn set_host_namespaces(ns: Option<NetNamespaces>) {
    *lock(&HOST_NET) = ns;
}

/// Run `f` in the host's network namespace when the VMM is in its own
/// and the jail not locked yet (opening a TAP by name, binding a
/// migration listener); else just run it. `f` must start no thread.
pub fn in_host_net<T>(f: impl FnOnce() -> T) -> Result<T, JailError> {
    match lock(&HOST_NET).as_ref() {
        Some(ns) => ns.in_host(f),
        None => Ok(f()),
    }
}

/// A TCP connection to `addr`: from a socket reserved in the host's
/// network when the jail has a network of its own (its namespace is
/// empty), else a plain connect.
pub fn connect_tcp(addr: &SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    if !OWN_NET.load(Ordering::Acquire) {
        return TcpStream::connect_timeout(addr, timeout);
    }
    let domain = socket2::Domain::for_address(*addr);
    let socket = {
        let mut reserved = lock(&RESERVED);
        let at = reserved.iter().position(|(d, _)| *d == domain);
        at.map(|i| reserved.remove(i).1)
    };
    let Some(socket) = socket else {
        return Err(std::io::Error::other(format!(
            "the jail's network namespace is empty and the {RESERVED_PER_FAMILY} sockets kept for \
             connections to {} addresses are used up: restart the VM (or run it with --jail-net host)",
            if addr.is_ipv4() { "IPv4" } else { "IPv6" }
        )));
    };
    socket.connect_timeout(&(*addr).into(), timeout)?;
    Ok(socket.into())
}

/// Make the reserved sockets (in the host's network) and close the way
/// back: after this the VMM cannot enter the host's network again.
pub fn reserve_sockets() -> Result<(), JailError> {
    let Some(ns) = lock(&HOST_NET).take() else {
        return Ok(());
    };
    let made = ns.in_host(|| {
        let mut v = Vec::new();
        for domain in [socket2::Domain::IPV4, socket2::Domain::IPV6] {
            for _ in 0..RESERVED_PER_FAMILY {
                // A host without IPv6 has no IPv6 sockets to keep.
                if let Ok(s) = socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                ) {
                    v.push((domain, s));
                }
            }
        }
        v
    })?;
    *lock(&RESERVED) = made;
    OWN_NET.store(true, Ordering::Release);
    Ok(())
}
