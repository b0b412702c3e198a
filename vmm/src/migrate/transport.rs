//! The migration transport: addresses (`tcp:HOST:PORT`, `unix:PATH`),
//! the byte stream to the peer and the socket under it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `tcp:HOST:PORT`: TLS, the source authenticated.
    Tcp { host: String, port: u16 },
    /// `unix:PATH`: a socket on this host.
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Addr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why a migration address does not parse (each names the address).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{0:?}: a migration address is tcp:HOST:PORT (e.g. tcp:10.0.0.2:4444) or unix:PATH")]
    Scheme(String),
    #[error("{0:?}: no socket path (unix:PATH)")]
    NoSocketPath(String),
    #[error("{0:?}: no port (tcp:HOST:PORT)")]
    NoPort(String),
    #[error("{uri:?}: {port:?} is not a port number")]
    BadPort { uri: String, port: String },
    #[error("{0:?}: no host (tcp:HOST:PORT)")]
    NoHost(String),
}

/// `tcp:HOST:PORT` (HOST may be `[v6]`) or `unix:PATH`.
pub fn parse_addr(uri: &str) -> Result<Addr, AddrError> {
    if let Some(path) = uri.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(AddrError::NoSocketPath(uri.to_string()));
        }
        return Ok(Addr::Unix(PathBuf::from(path)));
    }
    let (host, port) = parse_uri(uri)?;
    Ok(Addr::Tcp { host, port })
}

/// `tcp:HOST:PORT` (HOST may be `[v6]`) as (host, port).
pub fn parse_uri(uri: &str) -> Result<(String, u16), AddrError> {
    let rest = uri
        .strip_prefix("tcp:")
        .ok_or_else(|| AddrError::Scheme(uri.to_string()))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| AddrError::NoPort(uri.to_string()))?;
    let port: u16 = port.parse().map_err(|_| AddrError::BadPort {
        uri: uri.to_string(),
        port: port.to_string(),
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(AddrError::NoHost(uri.to_string()));
    }
    Ok((host.to_string(), port))
}

/// A byte stream to the peer: a Unix socket or TLS over TCP.
pub(crate) trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// The socket under a [`Conn`], for its timeouts and poll(2).
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s
                .set_read_timeout(Some(t))
                .and_then(|()| s.set_write_timeout(Some(t))),
            Sock::Unix(s) => s
                .set_read_timeout(Some(t))
                .and_then(|()| s.set_write_timeout(Some(t))),
        }
    }

    /// End the connection both ways (a blocked read returns).
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    pub(super) fn try_clone(&self) -> std::io::Result<Sock> {
        match self {
            Sock::Tcp(s) => s.try_clone().map(Sock::Tcp),
            Sock::Unix(s) => s.try_clone().map(Sock::Unix),
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("tcp:127.0.0.1:4444").unwrap(),
            ("127.0.0.1".into(), 4444)
        );
        assert_eq!(parse_uri("tcp:[::1]:5").unwrap(), ("::1".into(), 5));
        for bad in [
            "127.0.0.1:4444",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:/x",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_addr("unix:/run/m.sock").unwrap(),
            Addr::Unix("/run/m.sock".into())
        );
        assert_eq!(
            parse_addr("tcp:[::1]:5").unwrap().to_string(),
            "tcp:[::1]:5"
        );
        assert!(parse_addr("unix:").is_err());
        assert!(parse_addr("vsock:3:4").is_err());
    }
}
