//! `vireo serve`: take the state directory's lock, open the database,
//! re-adopt running VMs, and answer the API on the Unix socket until SIGTERM
//! or SIGINT. VMs keep running when the daemon exits; the next daemon on the
//! same state directory re-adopts them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::db::Db;
use crate::vms::Daemon;

/// Where `vireo serve` keeps state and listens.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The `vireo` binary that runs each VM (`vireo run`).
    pub vmm: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something the user can fix (lock held, socket in use, bad path).
    #[error("{0}")]
    Usage(String),
    /// The daemon failed.
    #[error("{0}")]
    Failed(String),
}

/// The name of the lock file in the state directory.
pub const LOCK_FILE: &str = "daemon.lock";
/// The database file in the state directory.
pub const DB_FILE: &str = "state.db";

/// Parse `--listen`: `unix:PATH` (TCP with TLS comes later).
pub fn parse_listen(s: &str) -> Result<PathBuf, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("--listen unix: needs a path, e.g. unix:/run/vireo.sock".into());
        }
        return Ok(PathBuf::from(path));
    }
    if s.starts_with("tcp:") {
        return Err(format!(
            "--listen {s}: TCP listeners (with TLS and tokens) are not implemented yet; use unix:PATH"
        ));
    }
    Err(format!(
        "--listen {s}: expected unix:PATH (e.g. unix:/run/vireo.sock)"
    ))
}

/// Hold the state directory's lock for the life of the daemon (flock: the
/// kernel drops it when the daemon dies, even by kill -9).
fn take_lock(dir: &Path) -> Result<File, ServeError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| {
            ServeError::Usage(format!("cannot open the lock file {}: {e}", path.display()))
        })?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            let who = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(ServeError::Usage(format!(
                "another vireo daemon{who} is already using the state directory {}; stop it first or pass a different --state-dir",
                dir.display()
            )));
        }
        return Err(ServeError::Failed(format!(
            "cannot lock {}: {err}",
            path.display()
        )));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    let _ = f.sync_all();
    Ok(f)
}

/// Make sure fds 0-2 are open, so no pipe the daemon creates lands on them
/// (a child's stdio set-up would clobber it).
fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: opening /dev/null; the fd is deliberately leaked as fd 0-2.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ServeError::Usage(format!("cannot create {}: {e}", parent.display())))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::Usage(format!(
                "another daemon is already listening on {}; stop it or pass a different --listen unix:PATH",
                socket.display()
            )));
        }
        // A stale socket from a daemon that died.
        let _ = std::fs::remove_file(socket);
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| ServeError::Usage(format!("cannot listen on {}: {e}", socket.display())))?;
    // Owner and group may use the API; everyone else may not.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| ServeError::Failed(format!("chmod {}: {e}", socket.display())))?;
    give_to_vireo_group(socket);
    Ok(listener)
}

/// If a `vireo` group exists, hand the socket to it (members may use the API).
fn give_to_vireo_group(socket: &Path) {
    // SAFETY: getgrnam returns a pointer to static storage or null; we read
    // gr_gid at once, on this thread, before any other getgr* call.
    let gid = unsafe {
        let g = libc::getgrnam(c"vireo".as_ptr());
        if g.is_null() {
            return;
        }
        (*g).gr_gid
    };
    let Ok(path) = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: chown with a valid C string; failure only means no group access.
    if unsafe { libc::chown(path.as_ptr(), u32::MAX, gid) } != 0 {
        tracing::warn!(
            "cannot give {} to the vireo group: {}",
            socket.display(),
            std::io::Error::last_os_error()
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down (VMs keep running; the next daemon re-adopts them)");
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    ensure_stdio();
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        ServeError::Usage(format!(
            "cannot create the state directory {}: {e}",
            cfg.state_dir.display()
        ))
    })?;
    let _ = std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o750));
    let _lock = take_lock(&cfg.state_dir)?;
    let db =
        Db::open(&cfg.state_dir.join(DB_FILE)).map_err(|e| ServeError::Failed(e.to_string()))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Failed(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let daemon = Daemon::new(db, cfg.state_dir.clone(), cfg.vmm.clone());
        daemon
            .recover()
            .map_err(|e| ServeError::Failed(format!("re-adopting VMs: {}", e.message)))?;
        let listener = bind(&cfg.socket)?;
        eprintln!(
            "vireo: serving the API on unix:{} (state in {})",
            cfg.socket.display(),
            cfg.state_dir.display()
        );
        let app = crate::api::router(daemon.clone());
        let observe = daemon.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                // End the event streams, or their connections keep the
                // graceful shutdown waiting.
                observe.observe.close();
            })
            .await;
        crate::console_ws::close_all(&daemon, std::time::Duration::from_secs(1)).await;
        let _ = std::fs::remove_file(&cfg.socket);
        served.map_err(|e| ServeError::Failed(format!("serving the API: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("unix:/run/v.sock"),
            Ok(PathBuf::from("/run/v.sock"))
        );
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("tcp:127.0.0.1:8443")
            .unwrap_err()
            .contains("not implemented"));
        assert!(parse_listen("/run/v.sock").is_err());
    }

    #[test]
    fn the_lock_refuses_a_second_holder() {
        let dir = std::env::temp_dir().join(format!("vireo-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = take_lock(&dir).unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another daemon would.
        match take_lock(&dir) {
            Err(ServeError::Usage(m)) => {
                assert!(m.contains("already using the state directory"), "{m}");
                assert!(m.contains(&format!("pid {}", std::process::id())), "{m}");
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        assert!(take_lock(&dir).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
