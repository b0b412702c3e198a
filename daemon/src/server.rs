//! `vireo serve`: take the state directory's lock, open the database,
//! re-adopt running VMs, and answer the API on the Unix socket until SIGTERM
//! or SIGINT. VMs keep running when the daemon exits; the next daemon on the
//! same state directory re-adopts them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::auth::{Auth, Transport, AUDIT_LOG};
use crate::db::Db;
use crate::vms::Daemon;

/// Where `vireo serve` keeps state and listens.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub state_dir: PathBuf,
    /// Every listener (`--listen`, repeatable); at least one.
    pub listen: Vec<Listen>,
    /// PEM certificate chain and private key for the `tcp:` listeners.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The `vireo` binary that runs each VM (`vireo run`).
    pub vmm: PathBuf,
    /// Storage directories (`--storage`, repeatable): the only places host
    /// files named through the API may come from. Empty: `STATE_DIR/storage`.
    pub storage: Vec<PathBuf>,
    /// Most connections the TLS listeners hold at once (`--max-connections`).
    pub max_connections: usize,
    /// `--no-jail`: start VMs without the jail (debugging; audit-logged).
    pub no_jail: bool,
}

/// The default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// One `--listen` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket: clients act as admin (the socket's permissions decide
    /// who may connect).
    Unix(PathBuf),
    /// TCP with TLS, `HOST:PORT`; clients need a token.
    Tcp(String),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
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

/// Parse `--listen`: `unix:PATH` or `tcp:HOST:PORT` (IPv6 as `tcp:[::1]:PORT`).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("--listen unix: needs a path, e.g. unix:/run/vireo.sock".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = s.strip_prefix("tcp:") {
        let bad = || {
            format!("--listen {s}: expected tcp:HOST:PORT, e.g. tcp:0.0.0.0:8443 or tcp:[::1]:8443")
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty() && !host.contains(':')
        };
        if !host_ok || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        return Ok(Listen::Tcp(addr.to_string()));
    }
    Err(format!(
        "--listen {s}: expected unix:PATH (e.g. unix:/run/vireo.sock) or tcp:HOST:PORT with --tls-cert and --tls-key"
    ))
}

/// Check the listeners and the TLS flags together: TCP needs both TLS
/// files; TLS files without a TCP listener are a mistake.
pub fn check_listeners(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.listen.is_empty() {
        return Err(ServeError::Usage("no --listen address".into()));
    }
    let tcp: Vec<String> = cfg
        .listen
        .iter()
        .filter(|l| matches!(l, Listen::Tcp(_)))
        .map(|l| l.to_string())
        .collect();
    let tls = cfg.tls_cert.is_some() || cfg.tls_key.is_some();
    if !tcp.is_empty() && (cfg.tls_cert.is_none() || cfg.tls_key.is_none()) {
        return Err(ServeError::Usage(format!(
            "--listen {} needs TLS: pass both --tls-cert CERT.pem and --tls-key KEY.pem (the API is not served over plain TCP: tokens would cross the network in clear)",
            tcp.join(", ")
        )));
    }
    if tcp.is_empty() && tls {
        return Err(ServeError::Usage(
            "--tls-cert and --tls-key are for TCP listeners: add --listen tcp:HOST:PORT".into(),
        ));
    }
    Ok(())
}

/// The rustls server configuration from PEM files, with errors that name
/// the file and what is wrong with it.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ServeError> {
    use rustls_pki_types::pem::{self, PemObject};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read_err = |what: &str, p: &Path, e: pem::Error| -> ServeError {
        let why = match e {
            pem::Error::Io(e) => e.to_string(),
            pem::Error::NoItemsFound => match what {
                "certificate" => "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
                _ => "no PEM private key in it (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)".into(),
            },
            other => format!("not valid PEM: {other:?}"),
        };
        ServeError::Usage(format!(
            "--tls-{} {}: {why}",
            if what == "certificate" { "cert" } else { "key" },
            p.display()
        ))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err("certificate", cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err("certificate", cert, e))?;
    if certs.is_empty() {
        return Err(read_err("certificate", cert, pem::Error::NoItemsFound));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err("key", key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Failed(format!("TLS set-up: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the private key does not belong to the certificate".to_string()
                }
                other => other.to_string(),
            };
            ServeError::Usage(format!(
                "--tls-cert {} / --tls-key {}: {why}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
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

/// How long a TLS client may take for its handshake and a request's head.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve one connection (HTTP/1.1 with upgrades, for WebSockets) with the
/// router; every request carries the connection's [`Transport`].
async fn serve_connection<I>(io: I, transport: Transport, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(transport);
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req).await }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    if matches!(transport, Transport::Tls(_)) {
        builder.header_read_timeout(CLIENT_TIMEOUT);
    } else {
        builder.header_read_timeout(None);
    }
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("API connection ({transport:?}): {e}");
    }
}

/// A failed accept (fd limit, aborted connection): log it and pause a
/// moment rather than spin.
async fn accept_failed(what: &str, e: std::io::Error) {
    tracing::warn!("accepting an API connection on {what}: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_unix(listener: tokio::net::UnixListener, app: Router) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Who connected, for the audit log (SO_PEERCRED).
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                tokio::spawn(serve_connection(
                    stream,
                    Transport::Unix { uid },
                    app.clone(),
                ));
            }
            Err(e) => accept_failed("the Unix socket", e).await,
        }
    }
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    slots: Arc<tokio::sync::Semaphore>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // At the cap, a new connection is closed at once: idle or
                // slow clients cannot hold more than the cap of the
                // daemon's descriptors and memory.
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(
                        "closing a connection from {peer} at once: the TLS listeners hold --max-connections connections already"
                    );
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_connection(tls, Transport::Tls(peer), app).await,
                        Ok(Err(e)) => tracing::info!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::info!("TLS handshake with {peer} timed out"),
                    }
                });
            }
            Err(e) => accept_failed("TCP", e).await,
        }
    }
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    ensure_stdio();
    check_listeners(&cfg)?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(c, k)?))),
        _ => None,
    };
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        ServeError::Usage(format!(
            "cannot create the state directory {}: {e}",
            cfg.state_dir.display()
        ))
    })?;
    let _ = std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o750));
    let _lock = take_lock(&cfg.state_dir)?;
    let storage_dirs = if cfg.storage.is_empty() {
        vec![cfg.state_dir.join(crate::storage::DEFAULT_STORAGE)]
    } else {
        cfg.storage.clone()
    };
    let mut storage =
        crate::storage::Storage::new(&storage_dirs, &cfg.state_dir).map_err(ServeError::Usage)?;
    // Its TLS key and certificate are the daemon's own too.
    let tls_files: Vec<&Path> = [&cfg.tls_cert, &cfg.tls_key]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    storage.protect(&tls_files);
    eprintln!(
        "vireo: storage directories (disk images, kernels, initrds and guest kits named through the API must be beneath one): {}",
        storage_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let db_path = cfg.state_dir.join(DB_FILE);
    let db = Db::open(&db_path).map_err(|e| ServeError::Failed(e.to_string()))?;
    // The tokens have their own connection to the same database (WAL), so
    // a token check never waits behind a VM operation.
    let auth = Auth::new(
        Db::open(&db_path).map_err(|e| ServeError::Failed(e.to_string()))?,
        Some(&cfg.state_dir.join(AUDIT_LOG)),
    )
    .map_err(ServeError::Failed)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Failed(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let daemon = Daemon::new(db, cfg.state_dir.clone(), cfg.vmm.clone(), storage);
        daemon
            .pin_formats()
            .map_err(|e| ServeError::Failed(format!("recording disk formats: {}", e.message)))?;
        daemon.set_no_jail(cfg.no_jail);
        if cfg.no_jail {
            tracing::warn!("--no-jail: VMs run unconfined, with the daemon's privileges");
        }
        daemon
            .recover()
            .map_err(|e| ServeError::Failed(format!("re-adopting VMs: {}", e.message)))?;
        let app = crate::auth::protect(crate::api::router(daemon.clone()), auth);
        let mut servers = tokio::task::JoinSet::new();
        // One cap for all TLS listeners together.
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1)));
        let mut sockets = Vec::new();
        for l in &cfg.listen {
            match l {
                Listen::Unix(path) => {
                    let listener = bind(path)?;
                    eprintln!(
                        "vireo: serving the API on unix:{} (state in {})",
                        path.display(),
                        cfg.state_dir.display()
                    );
                    sockets.push(path.clone());
                    servers.spawn(serve_unix(listener, app.clone()));
                }
                Listen::Tcp(addr) => {
                    let Some(acceptor) = tls.clone() else {
                        return Err(ServeError::Usage(format!("--listen tcp:{addr} needs --tls-cert and --tls-key")));
                    };
                    let listener = tokio::net::TcpListener::bind(addr.as_str())
                        .await
                        .map_err(|e| ServeError::Usage(format!("cannot listen on tcp:{addr}: {e}")))?;
                    let local = listener
                        .local_addr()
                        .map_err(|e| ServeError::Failed(format!("tcp:{addr}: {e}")))?;
                    eprintln!(
                        "vireo: serving the API on https://{local} (TLS; clients need a token, see `vireo token create --help`)"
                    );
                    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
                        let _ = daemon.migration_tls.set(crate::vms::MigrationTls {
                            cert: cert.clone(),
                            key: key.clone(),
                            ip: local.ip(),
                        });
                    }
                    servers.spawn(serve_tls(listener, acceptor, app.clone(), Arc::clone(&slots)));
                }
            }
        }
        shutdown_signal().await;
        // End the event streams and say goodbye (1001) on the console
        // WebSockets before the connections are dropped.
        daemon.observe.close();
        crate::console_ws::close_all(&daemon, std::time::Duration::from_secs(1)).await;
        servers.abort_all();
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("unix:/run/v.sock"),
            Ok(Listen::Unix(PathBuf::from("/run/v.sock")))
        );
        assert!(parse_listen("unix:").is_err());
        assert_eq!(
            parse_listen("tcp:127.0.0.1:8443"),
            Ok(Listen::Tcp("127.0.0.1:8443".into()))
        );
        assert_eq!(
            parse_listen("tcp:[::1]:0"),
            Ok(Listen::Tcp("[::1]:0".into()))
        );
        assert_eq!(
            parse_listen("tcp:vm-host.example:443"),
            Ok(Listen::Tcp("vm-host.example:443".into()))
        );
        for bad in [
            "tcp:",
            "tcp:8443",
            "tcp::8443",
            "tcp:host:",
            "tcp:host:99999",
            "tcp:::1:80",
            "tcp:[nope]:80",
            "/run/v.sock",
            "http://x",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    fn cfg(listen: &[&str], cert: bool, key: bool) -> ServeConfig {
        ServeConfig {
            state_dir: PathBuf::from("/nonexistent"),
            listen: listen.iter().map(|l| parse_listen(l).unwrap()).collect(),
            tls_cert: cert.then(|| PathBuf::from("c.pem")),
            tls_key: key.then(|| PathBuf::from("k.pem")),
            vmm: PathBuf::from("vireo"),
            storage: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            no_jail: false,
        }
    }

    #[test]
    fn tcp_needs_tls() {
        assert!(check_listeners(&cfg(&["unix:/s"], false, false)).is_ok());
        assert!(check_listeners(&cfg(&["unix:/s", "tcp:127.0.0.1:1"], true, true)).is_ok());
        for (c, k) in [(false, false), (true, false), (false, true)] {
            let Err(ServeError::Usage(m)) = check_listeners(&cfg(&["tcp:127.0.0.1:1"], c, k))
            else {
                panic!("plain TCP accepted")
            };
            assert!(m.contains("--tls-cert") && m.contains("--tls-key"), "{m}");
        }
        assert!(check_listeners(&cfg(&["unix:/s"], true, true)).is_err());
    }

    #[test]
    fn bad_tls_files_are_named() {
        let dir = std::env::temp_dir().join(format!("vireo-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let msg = |r: Result<rustls::ServerConfig, ServeError>| match r {
            Err(ServeError::Usage(m)) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        };
        let m = msg(tls_config(&missing, &garbage));
        assert!(m.contains("--tls-cert") && m.contains("missing.pem"), "{m}");
        let m = msg(tls_config(&garbage, &garbage));
        assert!(
            m.contains("garbage.pem") && m.contains("no PEM certificate"),
            "{m}"
        );
        let _ = std::fs::remove_dir_all(&dir);
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
