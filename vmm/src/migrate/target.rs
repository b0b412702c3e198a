//! The target's side: how it listens (checked before anything is bound),
//! receiving the machine from an authenticated source, and the answer
//! (acknowledge, refuse, or hand the connection to post-copy).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::migration::{self as stream, Kind, MigrationError};
use vireo_vmcore::snapshot::{LoadedSnapshot, MachineConfig};

use super::auth::{self, AuthError, AUTH_RETRY_DELAY, MAX_AUTH_FAILURES};
use super::postcopy::{self, PostcopyError};
use super::tls::{self, TlsError};
use super::transport::{parse_addr, Addr, AddrError, Conn, Sock};
use super::IO_TIMEOUT;

/// The target's side: what `--migrate-from` listens with.
pub struct Listen {
    pub uri: String,
    /// Certificate and key (PEM) of the TLS server: required for `tcp:`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Sources must present a client certificate issued by this CA.
    pub client_ca: Option<PathBuf>,
    /// The one-time secret the source must send first.
    pub secret: Option<Vec<u8>>,
}

/// What the target received: the machine's state (memory filled in),
/// ready for [`crate::machine::restore`], and the connection to answer on.
pub struct Incoming {
    pub loaded: LoadedSnapshot,
    pub memory: GuestMemory,
    /// Post-copy: the pages (per region) still to come; the machine must
    /// be built through [`Incoming::start_postcopy`].
    pub postcopy: Option<Vec<Vec<u64>>>,
    conn: Box<dyn Conn>,
    tcp: Sock,
}

impl Incoming {
    /// Post-copy: arm guest memory for the missing pages and hand the
    /// connection to the post-copy threads; build the machine after this
    /// and answer through the returned handle.
    pub fn start_postcopy(self) -> Result<postcopy::Target, PostcopyError> {
        let missing = self.postcopy.unwrap_or_default();
        postcopy::Target::start(&self.memory, &missing, self.conn, self.tcp)
    }

    /// Tell the source the machine is built: it exits, this side runs.
    pub fn ack(mut self) -> Result<(), TargetError> {
        stream::write_message(self.conn.as_mut(), Kind::Ack, &[])
            .and_then(|_| self.conn.flush().map_err(MigrationError::Io))
            .map_err(TargetError::Ack)
    }

    /// Tell the source the state cannot be used here (it resumes).
    pub fn refuse(mut self, why: &str) {
        let _ = stream::write_message(self.conn.as_mut(), Kind::Error, why.as_bytes());
        let _ = self.conn.flush();
    }
}

/// What the target listens on.
pub(super) enum Listener {
    Tcp(TcpListener, Arc<rustls::ServerConfig>),
    /// The listener and its path (removed when done).
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Why a target cannot listen as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// The address does not parse.
    #[error(transparent)]
    Address(#[from] AddrError),
    #[error("{0}: a TCP migration must be encrypted: the target needs a TLS certificate and key (or use unix:PATH for a migration on this host)")]
    Unencrypted(Addr),
    #[error("{0}: the target must know its source: give it a one-time secret (the source sends the same file with `migrate-to ... --secret-file FILE`) and/or a CA for client certificates (the source gives --cert and --key)")]
    Unauthenticated(Addr),
    #[error("{0}: a Unix socket needs no TLS; drop the TLS certificate, key and client CA")]
    TlsOnUnix(Addr),
}

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The jail's hold on the host's network failed.
    #[error("{0}")]
    HostNet(#[source] vireo_sandbox::jail::JailError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: Addr, source: std::io::Error },
    #[error("{addr}: {source}")]
    Socket { addr: Addr, source: std::io::Error },
    #[error(
        "gave up after {failures} sources failed to authenticate (the last, from {peer}: {why})"
    )]
    GaveUp {
        failures: u32,
        peer: String,
        why: AuthError,
    },
    #[error("migration socket: {0}")]
    Timeouts(#[source] std::io::Error),
    #[error("migration from {peer} failed: {source}")]
    Receive { peer: String, source: ReceiveError },
    #[error("cannot acknowledge the migration to the source: {0}")]
    Ack(#[source] MigrationError),
}

/// Check how a target listens against its address: TCP only with TLS
/// and a way to authenticate the source; a Unix socket without TLS.
pub fn check_listen(listen: &Listen) -> Result<Addr, ListenError> {
    let addr = parse_addr(&listen.uri)?;
    match &addr {
        Addr::Tcp { .. } => {
            if listen.tls.is_none() {
                return Err(ListenError::Unencrypted(addr));
            }
            if listen.secret.is_none() && listen.client_ca.is_none() {
                return Err(ListenError::Unauthenticated(addr));
            }
        }
        Addr::Unix(_) => {
            if listen.tls.is_some() || listen.client_ca.is_some() {
                return Err(ListenError::TlsOnUnix(addr));
            }
        }
    }
    Ok(addr)
}

fn bind(listen: &Listen, addr: &Addr) -> Result<(Listener, String), TargetError> {
    match addr {
        Addr::Tcp { host, port } => {
            let Some((cert, key)) = &listen.tls else {
                return Err(ListenError::Unencrypted(addr.clone()).into());
            };
            let config = Arc::new(tls::server_config(cert, key, listen.client_ca.as_deref())?);
            // In the host's network, also from a jail with a network of its own.
            let l = crate::host_net::in_host_net(|| TcpListener::bind((host.as_str(), *port)))
                .map_err(TargetError::HostNet)?
                .map_err(|source| TargetError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            let local = l.local_addr().map_err(|source| TargetError::Socket {
                addr: addr.clone(),
                source,
            })?;
            Ok((Listener::Tcp(l, config), local.to_string()))
        }
        Addr::Unix(path) => {
            // A stale socket of an earlier run may go; any other file stays.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(TargetError::NotASocket(path.clone()));
                }
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(|source| TargetError::Bind {
                addr: addr.clone(),
                source,
            })?;
            let listener = Listener::Unix(l, path.clone());
            // Only this user may connect (the secret is the second lock).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| TargetError::Socket {
                    addr: addr.clone(),
                    source,
                },
            )?;
            Ok((listener, path.display().to_string()))
        }
    }
}

/// Why this target's own definition or host refuses an offered machine.
pub type Refusal = Box<dyn std::error::Error + Send + Sync>;

/// Why this target says no to what a source sends (the reason goes back
/// to the source too).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Stream(#[from] MigrationError),
    /// The target's own definition or its host refuses the machine.
    #[error("{0}")]
    Refused(Refusal),
    #[error("{0}")]
    Memory(#[source] vireo_vmcore::memory::MemoryError),
}

/// Bind, announce the address (`listening`: a supervisor waits for it
/// to start the source), wait for the source (refusing, with a pause each, up to
/// [`MAX_AUTH_FAILURES`] peers that do not authenticate) and receive the
/// whole stream. `check` checks the machine configuration against this
/// target's own definition and host before any memory is allocated.
pub fn receive(
    listen: &Listen,
    check: &dyn Fn(&MachineConfig) -> Result<(), Refusal>,
    listening: &mut dyn FnMut(&str),
) -> Result<Incoming, TargetError> {
    let addr = check_listen(listen)?;
    let (listener, shown) = bind(listen, &addr)?;
    listening(&shown);
    let mut failures = 0u32;
    let (mut conn, ctl, peer) = loop {
        match auth::accept_one(&listener, listen.secret.as_deref()) {
            Ok(c) => break c,
            Err(auth::Refused { peer, why }) => {
                failures += 1;
                tracing::warn!(
                    "migration: refused a source from {peer}: {why} ({failures} of {MAX_AUTH_FAILURES} failed attempts)"
                );
                if failures >= MAX_AUTH_FAILURES {
                    return Err(TargetError::GaveUp {
                        failures,
                        peer,
                        why,
                    });
                }
                std::thread::sleep(AUTH_RETRY_DELAY);
            }
        }
    };
    drop(listener);
    tracing::info!("migration: source {peer} connected and authenticated");
    ctl.set_timeouts(IO_TIMEOUT)
        .map_err(TargetError::Timeouts)?;
    match receive_stream(conn.as_mut(), check) {
        Ok((loaded, memory, postcopy)) => Ok(Incoming {
            loaded,
            memory,
            postcopy,
            conn,
            tcp: ctl,
        }),
        Err(source) => {
            let msg = source.to_string();
            let _ = stream::write_message(conn.as_mut(), Kind::Error, msg.as_bytes());
            let _ = conn.flush();
            Err(TargetError::Receive { peer, source })
        }
    }
}

/// The machine, its memory, and (post-copy) the pages still to come.
type Received = (LoadedSnapshot, GuestMemory, Option<Vec<Vec<u64>>>);

fn receive_stream(
    conn: &mut dyn Conn,
    check: &dyn Fn(&MachineConfig) -> Result<(), Refusal>,
) -> Result<Received, ReceiveError> {
    let peer_version = stream::read_header(conn)?;
    let (kind, payload) = stream::read_message(conn)?;
    if kind != Kind::Config {
        return Err(
            MigrationError::Corrupt(format!("expected the configuration, got {kind:?}")).into(),
        );
    }
    let config = stream::decode_config(&payload)?;
    // The target's own definition and the host decide; nothing is
    // allocated for a machine they refuse.
    check(&config).map_err(ReceiveError::Refused)?;
    let memory = vireo_vmcore::memory::create_guest_memory(&config.ram_layout())
        .map_err(ReceiveError::Memory)?;
    tracing::info!(
        "migration: receiving a {}, {} vCPU VM on {} from vireo {peer_version}",
        config.memory,
        config.vcpus,
        config.backend
    );
    let mut postcopy = None;
    loop {
        let (kind, payload) = stream::read_message(conn)?;
        match kind {
            Kind::Postcopy if postcopy.is_none() => {
                postcopy = Some(stream::decode_bitmaps(&payload, &memory)?);
            }
            Kind::Pages => {
                let (region, pages, data) = stream::decode_pages(&payload)?;
                stream::apply_pages(&memory, region, &pages, data)?;
            }
            Kind::State => {
                let snap = vireo_vmcore::snapshot::decode_state(&payload)
                    .map_err(|e| MigrationError::Corrupt(format!("VM state: {e}")))?;
                // The device record was checked with the configuration:
                // the state must not describe anything else.
                if snap.config.backend != config.backend
                    || snap.config.vcpus != config.vcpus
                    || snap.config.memory != config.memory
                    || snap.config.frontend != config.frontend
                {
                    return Err(MigrationError::Corrupt(
                        "the final state describes another machine than the configuration".into(),
                    )
                    .into());
                }
                return Ok((LoadedSnapshot::without_memory(snap), memory, postcopy));
            }
            other => {
                return Err(MigrationError::Corrupt(format!("unexpected {other:?} message")).into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(uri: &str) -> Listen {
        Listen {
            uri: uri.into(),
            tls: None,
            client_ca: None,
            secret: None,
        }
    }

    #[test]
    fn tcp_needs_tls_and_an_authenticated_source() {
        // Plain TCP: refused, whatever else is given.
        let mut l = listen("tcp:127.0.0.1:0");
        l.secret = Some(b"0123456789abcdef".to_vec());
        let e = check_listen(&l).unwrap_err();
        assert!(matches!(e, ListenError::Unencrypted(_)), "{e}");
        assert!(e.to_string().contains("must be encrypted"), "{e}");
        // TLS but nothing to know the source by.
        let mut l = listen("tcp:127.0.0.1:0");
        l.tls = Some(("c.pem".into(), "k.pem".into()));
        let e = check_listen(&l).unwrap_err();
        assert!(matches!(e, ListenError::Unauthenticated(_)), "{e}");
        l.secret = Some(b"0123456789abcdef".to_vec());
        assert!(check_listen(&l).is_ok());
        l.secret = None;
        l.client_ca = Some("ca.pem".into());
        assert!(check_listen(&l).is_ok());
        // A Unix socket: no TLS flags, the secret optional.
        assert!(check_listen(&listen("unix:/tmp/x.sock")).is_ok());
        let mut l = listen("unix:/tmp/x.sock");
        l.tls = Some(("c.pem".into(), "k.pem".into()));
        assert!(matches!(check_listen(&l), Err(ListenError::TlsOnUnix(_))));
    }
}
