//! Authenticating the source: the one-time secret it sends (read from a
//! file on each side) and the target's acceptance of one connection (TLS
//! with the client certificate when asked for, then the `Auth` message),
//! within one deadline.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vireo_vmcore::migration::{self as stream, Kind, MigrationError};

use super::target::Listener;
use super::transport::{Conn, Sock};

/// How long a connecting peer has to finish TLS and send its secret.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed authentications the target takes before it gives up.
pub const MAX_AUTH_FAILURES: u32 = 5;
/// The pause after each failed authentication (a rate limit on guessing).
pub const AUTH_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Why a secret file cannot be used (each names the file).
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: a migration secret must be at least 16 characters (e.g. `openssl rand -hex 32 > FILE`)", .path.display())]
    TooShort { path: PathBuf },
    #[error("{}: longer than {max} bytes", .path.display())]
    TooLong { path: PathBuf, max: usize },
}

/// Read a one-time secret from `path`: the file's bytes without
/// surrounding whitespace.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(SecretError::TooShort {
            path: path.to_path_buf(),
        });
    }
    if secret.len() > stream::MAX_SECRET {
        return Err(SecretError::TooLong {
            path: path.to_path_buf(),
            max: stream::MAX_SECRET,
        });
    }
    Ok(secret)
}

/// Why the target refused a connecting peer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("accept: {0}")]
    Accept(#[source] std::io::Error),
    #[error("migration socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("TLS set-up: {0}")]
    Tls(#[source] rustls::Error),
    /// The link or TLS failed (no handshake, no or a bad client
    /// certificate): nothing can be said over it.
    #[error("TLS or I/O: {0}")]
    Link(#[source] std::io::Error),
    /// The peer's first message is not a usable `Auth`.
    #[error(transparent)]
    Stream(MigrationError),
    #[error("no migration secret given (migrate-to ... --secret-file FILE)")]
    NoSecret,
    #[error("wrong migration secret")]
    WrongSecret,
}

/// A peer that did not authenticate: who, and why.
pub(super) struct Refused {
    /// Its address (`?` when it never got one).
    pub peer: String,
    pub why: AuthError,
}

/// An authenticated source: its stream, socket and address.
pub(super) type Authenticated = (Box<dyn Conn>, Sock, String);

/// Accept one connection and authenticate it: TLS (with the client
/// certificate when asked for), then the `Auth` message. On failure the
/// peer is told (when the link allows) and dropped.
pub(super) fn accept_one(
    listener: &Listener,
    secret: Option<&[u8]>,
) -> Result<Authenticated, Refused> {
    let refused = |peer: &str, why: AuthError| Refused {
        peer: peer.to_string(),
        why,
    };
    let (mut conn, sock, peer): (Box<dyn Conn>, Sock, String) = match listener {
        Listener::Tcp(l, config) => {
            let (tcp, peer) = l.accept().map_err(|e| refused("?", AuthError::Accept(e)))?;
            let peer = peer.to_string();
            let _ = tcp.set_nodelay(true);
            // A second handle on the same socket: its timeouts are the
            // stream's.
            let ctl = Sock::Tcp(
                tcp.try_clone()
                    .map_err(|e| refused(&peer, AuthError::Socket(e)))?,
            );
            ctl.set_timeouts(AUTH_TIMEOUT)
                .map_err(|e| refused(&peer, AuthError::Socket(e)))?;
            let tls = rustls::ServerConnection::new(Arc::clone(config))
                .map_err(|e| refused(&peer, AuthError::Tls(e)))?;
            (Box::new(rustls::StreamOwned::new(tls, tcp)), ctl, peer)
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().map_err(|e| refused("?", AuthError::Accept(e)))?;
            let peer = unix_peer(&s);
            let ctl = Sock::Unix(
                s.try_clone()
                    .map_err(|e| refused(&peer, AuthError::Socket(e)))?,
            );
            ctl.set_timeouts(AUTH_TIMEOUT)
                .map_err(|e| refused(&peer, AuthError::Socket(e)))?;
            (Box::new(s), ctl, peer)
        }
    };
    // The whole authentication has one deadline, however the peer trickles
    // its bytes: past it a watchdog shuts the socket, failing the reads.
    let (done, watched) = std::sync::mpsc::channel::<()>();
    if let Ok(watch) = sock.try_clone() {
        let _ = std::thread::Builder::new()
            .name("migration-auth-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    watched.recv_timeout(AUTH_TIMEOUT)
                {
                    watch.shutdown();
                }
            });
    }
    // The TLS handshake (client certificate included) happens here, on
    // the first read.
    let result = stream::read_auth(conn.as_mut());
    let _ = done.send(());
    // Refusals are answered with a short write timeout: a peer that does
    // not read does not hold the listener.
    let _ = sock.set_timeouts(Duration::from_secs(1));
    let given = match result {
        Ok(g) => g,
        Err(MigrationError::Io(e)) => return Err(refused(&peer, AuthError::Link(e))),
        Err(e) => {
            let _ = stream::write_message(conn.as_mut(), Kind::Error, e.to_string().as_bytes());
            let _ = conn.flush();
            return Err(refused(&peer, AuthError::Stream(e)));
        }
    };
    if let Some(expected) = secret {
        if !stream::secrets_equal(&given, expected) {
            let why = if given.is_empty() {
                AuthError::NoSecret
            } else {
                AuthError::WrongSecret
            };
            let _ = stream::write_message(conn.as_mut(), Kind::Error, why.to_string().as_bytes());
            let _ = conn.flush();
            return Err(refused(&peer, why));
        }
    }
    Ok((conn, sock, peer))
}

/// Who is at the other end of a Unix socket (pid and uid).
fn unix_peer(s: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a
    // ucred we own; the fd is a live Unix socket.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        format!("pid {} uid {}", cred.pid, cred.uid)
    } else {
        "an unknown local peer".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_read_from_files_and_checked() {
        let dir = std::env::temp_dir().join(format!("vireo-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(read_secret(&f).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&f, "short\n").unwrap();
        let e = read_secret(&f).unwrap_err();
        assert!(matches!(e, SecretError::TooShort { .. }), "{e}");
        assert!(e.to_string().contains("at least 16"), "{e}");
        // The error names the file.
        let none = dir.join("none");
        let e = read_secret(&none).unwrap_err();
        assert!(
            e.to_string().starts_with(&none.display().to_string()),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
