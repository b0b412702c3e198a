//! `--vsock` / the API's `vsock`: the guest's context id and the host
//! socket its connections go through.

use std::path::{Path, PathBuf};

use crate::options::{Options, OptionsError};

/// The smallest and largest CID a guest may have (0-2 are reserved,
/// `u32::MAX` means "any").
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// The longest `sun_path`, NUL excluded.
pub const SUN_PATH_MAX: usize = 107;

/// `cid=N,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u64,
    /// The host program socket; guest connections to port N go to
    /// `<socket>_N`.
    pub socket: PathBuf,
}

impl VsockConfig {
    /// Parse the vsock's options (`cid=3,socket=/run/vm.vsock`).
    pub fn from_options(s: &str) -> Result<VsockConfig, OptionsError> {
        let err = |message: String| OptionsError::new("vsock", message);
        let mut o = Options::parse("vsock", s, None)?;
        let cid_s = o.required("cid")?;
        let socket = o.required("socket")?;
        o.finish()?;
        let cid: u64 = cid_s.parse().map_err(|_| {
            err(format!(
                "cid={cid_s}: not a number; give the guest a cid from {MIN_GUEST_CID} to \
                 {MAX_GUEST_CID}"
            ))
        })?;
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(err(format!(
                "cid={cid}: the guest cid must be from {MIN_GUEST_CID} to {MAX_GUEST_CID} \
                 (0-2 are reserved, {} means any)",
                u32::MAX
            )));
        }
        if socket.is_empty() {
            return Err(err(
                "socket= is empty; give a path like /run/vm.vsock".into()
            ));
        }
        let socket = PathBuf::from(socket);
        check_socket_path_len(&socket).map_err(|e| err(format!("socket=: {e}")))?;
        Ok(VsockConfig { cid, socket })
    }
}

/// The path a guest connection to host `port` goes to.
pub fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// A socket path whose port paths do not fit a Unix socket address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the path is too long: {socket} with a port suffix is {len} bytes, a Unix socket path \
     holds {SUN_PATH_MAX}; use a shorter path"
)]
pub struct SocketPathTooLong {
    pub socket: String,
    pub len: usize,
}

/// Check that `<socket>_<any port>` fits in a Unix socket address.
pub fn check_socket_path_len(socket: &Path) -> Result<(), SocketPathTooLong> {
    let len = port_path(socket, u32::MAX).as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(SocketPathTooLong {
            socket: socket.display().to_string(),
            len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let c = VsockConfig::from_options("cid=3,socket=/run/vm.vsock").unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.socket, PathBuf::from("/run/vm.vsock"));
        let c = VsockConfig::from_options("socket=/a,cid=4294967294").unwrap();
        assert_eq!(c.cid, u64::from(u32::MAX) - 1);
        for (bad, needle) in [
            ("cid=2,socket=/a", "cid=2"),
            ("cid=0,socket=/a", "cid=0"),
            ("cid=4294967295,socket=/a", "4294967295"),
            ("cid=x,socket=/a", "not a number"),
            ("socket=/a", "cid= is required"),
            ("cid=3", "socket= is required"),
            ("cid=3,socket=", "empty"),
            ("cid=3,socket=/a,port=1", "unknown option"),
        ] {
            let e = VsockConfig::from_options(bad).unwrap_err();
            assert_eq!(e.device, "vsock");
            assert!(e.message.contains(needle), "{bad}: {e}");
        }
        let long = format!("cid=3,socket=/{}", "x".repeat(100));
        assert!(VsockConfig::from_options(&long)
            .unwrap_err()
            .message
            .contains("too long"));
    }

    #[test]
    fn port_paths_and_length_limit() {
        assert_eq!(
            port_path(Path::new("/run/vm.vsock"), 1234),
            PathBuf::from("/run/vm.vsock_1234")
        );
        assert!(check_socket_path_len(Path::new("/run/vm.vsock")).is_ok());
        let long = format!("/{}", "a".repeat(100));
        let e = check_socket_path_len(Path::new(&long)).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }
}
