//! Network namespaces for the tests that give a guest a TAP: every TAP,
//! address and listener lives in a namespace the test creates and deletes,
//! so nothing touches the host's own interfaces.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::Command;

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

/// Why namespaces cannot be made here, or None.
pub fn unavailable_reason() -> Option<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    match out {
        Err(e) => Some(format!("`ip` (iproute2) is not usable: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "`ip netns` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) if unsafe_geteuid() != 0 => Some("network namespaces need root".into()),
        Ok(_) => None,
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vireo-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs { name }
    }

    /// A persistent TAP `tap` in the namespace with `addr` (CIDR), up.
    pub fn add_tap(&self, tap: &str, addr: &str) {
        ip(&["-n", &self.name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", tap]);
        ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }

    /// Bind a TCP listener inside the namespace (from a helper thread that
    /// enters it; the socket stays in the namespace).
    pub fn tcp_listener(&self, addr: &str) -> TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        let addr = addr.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            TcpListener::bind(&addr).expect("bind in the namespace")
        })
        .join()
        .expect("listener thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
