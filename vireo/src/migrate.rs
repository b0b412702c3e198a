//! Live migration between two `vireo run` processes: the source's
//! control-socket command `migrate-to ADDR` and the target's `vireo run
//! --migrate-from ADDR`. The stream format is in
//! [`vireo_vmcore::migration`]; this module is the transport and the
//! pre-copy loop.
//!
//! Transport: `unix:PATH` (a socket on this host, created 0600) or
//! `tcp:HOST:PORT`, which is always TLS (rustls) and always authenticates
//! the source: by a one-time secret (`--migrate-secret-file` on the
//! target, `--secret-file` on the source, sent first in an `Auth`
//! message and compared in constant time) and/or by a client certificate
//! (`--migrate-client-ca` on the target, `--cert`/`--key` on the source).
//! A peer that fails is logged with its address and dropped; the target
//! keeps listening for the real source, up to [`MAX_AUTH_FAILURES`]
//! failures with [`AUTH_RETRY_DELAY`] between them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hypervisor::dirty;
use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use vireo_vmcore::migration::{self as stream, Kind, MigrationError, PAGES_PER_MESSAGE};
use vireo_vmcore::snapshot::{LoadedSnapshot, MachineConfig, SharedSnapshottable};
use vireo_vmcore::{RunState, RunningVm};

use crate::machine::{Quiesced, VirtioFunctions};
use vireo_api::control::MigrateTo;

/// Pre-copy rounds after the first full copy before the source stops the
/// guest whatever is left (a guest dirtying memory faster than the link
/// carries it never converges).
pub const MAX_ROUNDS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other before calling it gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connecting peer has to finish TLS and send its secret.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed authentications the target takes before it gives up.
pub const MAX_AUTH_FAILURES: u32 = 5;
/// The pause after each failed authentication (a rate limit on guessing).
pub const AUTH_RETRY_DELAY: Duration = Duration::from_secs(1);

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

/// `tcp:HOST:PORT` (HOST may be `[v6]`) or `unix:PATH`.
pub fn parse_addr(uri: &str) -> Result<Addr, String> {
    if let Some(path) = uri.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("{uri:?}: no socket path (unix:PATH)"));
        }
        return Ok(Addr::Unix(PathBuf::from(path)));
    }
    let (host, port) = parse_uri(uri)?;
    Ok(Addr::Tcp { host, port })
}

/// `tcp:HOST:PORT` (HOST may be `[v6]`) as (host, port).
pub fn parse_uri(uri: &str) -> Result<(String, u16), String> {
    let rest = uri.strip_prefix("tcp:").ok_or_else(|| {
        format!(
            "{uri:?}: a migration address is tcp:HOST:PORT (e.g. tcp:10.0.0.2:4444) or unix:PATH"
        )
    })?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{uri:?}: no port (tcp:HOST:PORT)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{uri:?}: {port:?} is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{uri:?}: no host (tcp:HOST:PORT)"));
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

    fn set_timeouts(&self, t: Duration) -> Result<(), String> {
        let r = match self {
            Sock::Tcp(s) => s
                .set_read_timeout(Some(t))
                .and_then(|()| s.set_write_timeout(Some(t))),
            Sock::Unix(s) => s
                .set_read_timeout(Some(t))
                .and_then(|()| s.set_write_timeout(Some(t))),
        };
        r.map_err(|e| format!("migration socket: {e}"))
    }

    /// End the connection both ways (a blocked read returns).
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn try_clone(&self) -> Result<Sock, String> {
        match self {
            Sock::Tcp(s) => s.try_clone().map(Sock::Tcp),
            Sock::Unix(s) => s.try_clone().map(Sock::Unix),
        }
        .map_err(|e| format!("migration socket: {e}"))
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

/// Read a one-time secret from `path` (`flag` names it in errors):
/// the file's bytes without surrounding whitespace.
pub fn read_secret(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(format!(
            "{flag} {}: a migration secret must be at least 16 characters (e.g. `openssl rand -hex 32 > FILE`)",
            path.display()
        ));
    }
    if secret.len() > stream::MAX_SECRET {
        return Err(format!(
            "{flag} {}: longer than {} bytes",
            path.display(),
            stream::MAX_SECRET
        ));
    }
    Ok(secret)
}

/// The figures of a finished migration (the `migrate-to` reply's
/// `"migration"` object).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub bytes_sent: u64,
    /// Pre-copy rounds, the first full copy included (the final,
    /// paused one is not counted).
    pub rounds: u32,
    pub pages_sent: u64,
    /// The post-copy phase, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
}

/// Migrate `running` to the target at `req.uri`. On success the target
/// has acknowledged the state and runs the guest: the caller replies and
/// ends this process. On failure the VM runs again here (if it ran
/// before) and the error says why.
pub fn migrate_to(
    running: &RunningVm,
    devices: &[(String, SharedSnapshottable)],
    virtio: &VirtioFunctions,
    frontend: serde_json::Value,
    req: &MigrateTo,
) -> Result<Stats, String> {
    let started = Instant::now();
    let (mut conn, tcp) = connect(req)?;
    let was_running = running.control().state() == RunState::Running;
    let mut source = Source {
        running,
        conn: conn.as_mut(),
        tcp,
        stats: Stats::default(),
        paused: false,
        split: false,
        virtio,
        quiesced: None,
    };
    let result = source.run(devices, frontend, req, started);
    if result.is_err() && source.split {
        // Post-copy failed after the target took over: its guest may have
        // run on, so this copy stays paused (see crate::postcopy).
        tracing::error!("migration: post-copy failed after the switch; the VM stays paused here");
    } else if result.is_err() {
        // Devices first, then the vCPUs.
        drop(source.quiesced.take());
        if let Err(e) = running.stop_dirty_log() {
            tracing::warn!("migration: stopping dirty page tracking: {e}");
        }
        if source.paused && was_running {
            if let Err(e) = running.resume() {
                tracing::warn!("migration: resuming the VM: {e}");
            }
        }
    }
    let mut stats = result?;
    stats.total_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

/// Connect to the target and authenticate: TLS for `tcp:` (the target's
/// certificate checked against `--ca`, ours given with `--cert`), then
/// the `Auth` message with the secret (empty without one).
fn connect(req: &MigrateTo) -> Result<(Box<dyn Conn>, Sock), String> {
    let addr = parse_addr(&req.uri)?;
    if req.cert.is_some() != req.key.is_some() {
        return Err("--cert and --key go together (the client certificate and its key)".into());
    }
    let secret = match &req.secret_file {
        Some(f) => read_secret("--secret-file", f)?,
        None => Vec::new(),
    };
    let (mut conn, sock): (Box<dyn Conn>, Sock) = match &addr {
        Addr::Unix(path) => {
            if req.ca.is_some() || req.cert.is_some() {
                return Err(format!(
                    "{addr}: a Unix socket needs no TLS; drop --ca, --cert and --key"
                ));
            }
            let s = UnixStream::connect(path).map_err(|e| {
                format!(
                    "cannot connect to the migration target {addr}: {e} (is `vireo run --migrate-from {addr}` listening there?)"
                )
            })?;
            let ctl = Sock::Unix(
                s.try_clone()
                    .map_err(|e| format!("migration socket: {e}"))?,
            );
            ctl.set_timeouts(IO_TIMEOUT)?;
            (Box::new(s), ctl)
        }
        Addr::Tcp { host, port } => {
            let Some(ca) = req.ca.as_deref() else {
                return Err(format!(
                    "{addr}: a TCP migration is always TLS: give --ca CA.pem (the CA of the target's --migrate-tls-cert), or use unix:PATH on this host"
                ));
            };
            let tcp = tcp_connect(host, *port)?;
            let sock = Sock::Tcp(tcp);
            sock.set_timeouts(IO_TIMEOUT)?;
            let ctl = sock.try_clone()?;
            let Sock::Tcp(tcp) = sock else {
                return Err("migration socket: not TCP".into());
            };
            let roots = load_roots(ca)?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS set-up: {e}"))?
                .with_root_certificates(roots);
            let config = match (&req.cert, &req.key) {
                (Some(cert), Some(key)) => {
                    let (certs, key_der) = load_identity("--cert", cert, "--key", key)?;
                    builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                        format!("--cert {} / --key {}: {e}", cert.display(), key.display())
                    })?
                }
                _ => builder.with_no_client_auth(),
            };
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host}: not a host name TLS can verify: {e}"))?;
            let tls = rustls::ClientConnection::new(Arc::new(config), name)
                .map_err(|e| format!("TLS set-up: {e}"))?;
            (Box::new(rustls::StreamOwned::new(tls, tcp)), ctl)
        }
    };
    // The secret goes first (inside TLS for tcp:), before anything about
    // the VM: a target that does not take it learns nothing more.
    conn.write_all(&stream::auth_message(&secret))
        .and_then(|()| conn.flush())
        .map_err(|e| format!("the migration target {addr} did not take the connection: {e}"))?;
    Ok((conn, sock))
}

fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = None;
    for a in addrs {
        // From a jail with a network of its own: a socket kept from the host's.
        match crate::jail_run::connect_tcp(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(format!(
        "cannot connect to the migration target {host}:{port}: {} (is `vireo run --migrate-from` listening there?)",
        last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into())
    ))
}

/// A certificate chain and its private key (PEM files).
fn load_identity(
    cert_flag: &str,
    cert: &Path,
    key_flag: &str,
    key: &Path,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "{cert_flag} {}: cannot read a PEM certificate: {e:?}",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{cert_flag} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "{key_flag} {}: cannot read a PEM private key: {e:?}",
            key.display()
        )
    })?;
    Ok((certs, key_der))
}

fn load_roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    load_roots_for("--ca", ca)
}

fn load_roots_for(flag: &str, ca: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "{flag} {}: cannot read a PEM certificate: {e:?}",
                ca.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            ca.display()
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("{flag} {}: not a usable CA certificate: {e}", ca.display()))?;
    }
    Ok(roots)
}

struct Source<'a> {
    running: &'a RunningVm,
    conn: &'a mut dyn Conn,
    /// The socket under `conn`, for its timeouts.
    tcp: Sock,
    stats: Stats,
    /// Whether this migration paused the VM (and must resume it on failure).
    paused: bool,
    /// Post-copy: the target acknowledged the state and runs the guest
    /// (a failure now must not resume it here).
    split: bool,
    virtio: &'a VirtioFunctions,
    /// The virtio devices, held still from the final pause on.
    quiesced: Option<Quiesced<'a>>,
}

impl Source<'_> {
    fn run(
        &mut self,
        devices: &[(String, SharedSnapshottable)],
        frontend: serde_json::Value,
        req: &MigrateTo,
        started: Instant,
    ) -> Result<Stats, String> {
        let downtime_ms = req.downtime_ms;
        let config = self.running.machine_config(frontend.clone());
        self.send_raw(&stream::header())?;
        self.send(Kind::Config, &stream::encode_config(&config))?;
        self.running
            .start_dirty_log()
            .map_err(|e| format!("cannot track dirty pages: {e}"))?;

        // Round 1: all of memory but the pages that are still zero (the
        // target's fresh memory is zero).
        let t = Instant::now();
        let mut sent = 0u64;
        let regions: Vec<Vec<u64>> = self
            .running
            .memory()
            .iter()
            .map(|r| {
                vec![u64::MAX; dirty::bitmap_words(vireo_vmcore::memory::GuestMemoryRegion::len(r))]
            })
            .collect();
        sent += self.send_pages(&regions, true)?;
        self.stats.rounds = 1;
        let mut rate = bytes_per_ms(sent, t.elapsed());
        tracing::info!(
            "migration: round 1 sent {} MiB in {} ms",
            sent >> 20,
            t.elapsed().as_millis()
        );

        let mut pending = self.take_dirty()?;
        if req.postcopy {
            return self.postcopy(devices, frontend, pending, req, started);
        }

        // Pre-copy: resend what the guest dirtied until the rest fits in
        // the downtime (or the rounds run out).
        while self.stats.rounds <= MAX_ROUNDS {
            let bytes = count(&pending) * stream::PAGE_SIZE;
            let expect_ms = bytes / rate.max(1);
            if expect_ms <= downtime_ms {
                break;
            }
            let t = Instant::now();
            let sent = self.send_pages(&pending, false)?;
            rate = bytes_per_ms(sent, t.elapsed()).max(rate / 2);
            self.stats.rounds += 1;
            tracing::debug!(
                "migration: round {} sent {} pages",
                self.stats.rounds,
                sent / stream::PAGE_SIZE
            );
            pending = self.take_dirty()?;
        }

        // Stop the guest, send the last pages and the state.
        let down = Instant::now();
        if self.running.control().state() == RunState::Running {
            self.running
                .pause()
                .map_err(|e| format!("cannot pause the VM: {e}"))?;
            self.paused = true;
        }
        // Device threads finish what is in flight and hold still (their
        // writes to guest memory land in the dirty log taken next).
        self.quiesced = Some(self.virtio.quiesce());
        for (p, last) in pending.iter_mut().zip(self.take_dirty()?) {
            dirty::merge(p, &last);
        }
        self.send_pages(&pending, false)?;
        let snap = self
            .running
            .capture(devices, frontend)
            .map_err(|e| format!("cannot capture the VM state: {e}"))?;
        let state = vireo_vmcore::snapshot::encode_state(&snap)
            .map_err(|e| format!("cannot encode the VM state: {e}"))?;
        self.send(Kind::State, &state)?;
        self.conn
            .flush()
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        match stream::read_message(self.conn) {
            Ok((Kind::Ack, _)) => {}
            Ok((Kind::Error, msg)) => {
                return Err(
                    MigrationError::Refused(String::from_utf8_lossy(&msg).into()).to_string(),
                )
            }
            Ok((kind, _)) => {
                return Err(format!(
                    "the target answered {kind:?} instead of acknowledging the state"
                ))
            }
            Err(MigrationError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "the target did not acknowledge the state within {} s; the VM keeps running here",
                    IO_TIMEOUT.as_secs()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "no acknowledgement from the target: {e}; the VM keeps running here"
                ))
            }
        }
        self.stats.downtime_ms = down.elapsed().as_millis() as u64;
        self.stats.total_ms = started.elapsed().as_millis() as u64;
        Ok(self.stats.clone())
    }

    /// The switch to post-copy after the first round: stop the guest,
    /// send the list of pages it dirtied since (the target fetches those)
    /// and the state, then serve pages until the target has them all.
    fn postcopy(
        &mut self,
        devices: &[(String, SharedSnapshottable)],
        frontend: serde_json::Value,
        mut pending: Vec<Vec<u64>>,
        req: &MigrateTo,
        started: Instant,
    ) -> Result<Stats, String> {
        let down = Instant::now();
        if self.running.control().state() == RunState::Running {
            self.running
                .pause()
                .map_err(|e| format!("cannot pause the VM: {e}"))?;
            self.paused = true;
        }
        // Device threads finish what is in flight and hold still (their
        // writes to guest memory land in the dirty log taken next).
        self.quiesced = Some(self.virtio.quiesce());
        for (p, last) in pending.iter_mut().zip(self.take_dirty()?) {
            dirty::merge(p, &last);
        }
        let missing = crate::postcopy::count(&pending);
        tracing::info!(
            "migration: switching to post-copy with {missing} pages ({} MiB) left",
            (missing * stream::PAGE_SIZE) >> 20
        );
        self.send(Kind::Postcopy, &stream::encode_bitmaps(&pending))?;
        let snap = self
            .running
            .capture(devices, frontend)
            .map_err(|e| format!("cannot capture the VM state: {e}"))?;
        let state = vireo_vmcore::snapshot::encode_state(&snap)
            .map_err(|e| format!("cannot encode the VM state: {e}"))?;
        self.send(Kind::State, &state)?;
        self.conn
            .flush()
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        let mut pc = crate::postcopy::PostcopyStats::default();
        let mut bytes = 0u64;
        let mut downtime_ms = 0u64;
        let mut split = false;
        let result = crate::postcopy::serve(
            self.conn,
            &self.tcp,
            self.running.memory(),
            pending,
            req.postcopy_bandwidth,
            &mut pc,
            &mut bytes,
            &mut || {
                downtime_ms = down.elapsed().as_millis() as u64;
                split = true;
            },
        );
        self.stats.bytes_sent += bytes;
        self.stats.pages_sent += pc.pages_requested + pc.pages_pushed;
        self.split = split;
        match result {
            Ok(()) => {
                self.stats.downtime_ms = downtime_ms;
                self.stats.total_ms = started.elapsed().as_millis() as u64;
                self.stats.postcopy = Some(pc);
                Ok(self.stats.clone())
            }
            Err(crate::postcopy::ServeError::BeforeAck(e)) => {
                self.split = false;
                Err(format!("{e}; the VM keeps running here"))
            }
            Err(crate::postcopy::ServeError::AfterAck(e)) => Err(format!(
                "post-copy failed after the target took over: {e}; the VM is paused here with                  its memory intact (the target stops its copy): resume it here with `resume`                  only if the target's copy is gone"
            )),
        }
    }

    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        self.running
            .take_dirty_log()
            .map_err(|e| format!("cannot read the dirty page log: {e}"))
    }

    /// Send every page set in `bitmaps` (per region); with `skip_zero`,
    /// pages that are all zero are left out. Returns the page bytes sent.
    fn send_pages(&mut self, bitmaps: &[Vec<u64>], skip_zero: bool) -> Result<u64, String> {
        let mem: &GuestMemory = self.running.memory();
        let mut bytes = 0;
        for (index, (region, bits)) in mem.iter().zip(bitmaps).enumerate() {
            let region_pages =
                vireo_vmcore::memory::GuestMemoryRegion::len(region) / stream::PAGE_SIZE;
            let mut pages = Vec::with_capacity(PAGES_PER_MESSAGE);
            let mut data = Vec::with_capacity(PAGES_PER_MESSAGE * stream::PAGE_SIZE as usize);
            for page in dirty::dirty_pages(bits).take_while(|p| *p < region_pages) {
                let b = stream::page_bytes(region, page);
                if skip_zero && stream::is_zero(b) {
                    continue;
                }
                pages.push(page);
                data.extend_from_slice(b);
                if pages.len() == PAGES_PER_MESSAGE {
                    bytes += self.flush_pages(index as u32, &mut pages, &mut data)?;
                }
            }
            if !pages.is_empty() {
                bytes += self.flush_pages(index as u32, &mut pages, &mut data)?;
            }
        }
        Ok(bytes)
    }

    fn flush_pages(
        &mut self,
        region: u32,
        pages: &mut Vec<u64>,
        data: &mut Vec<u8>,
    ) -> Result<u64, String> {
        self.send(Kind::Pages, &stream::encode_pages(region, pages, data))?;
        self.stats.pages_sent += pages.len() as u64;
        let n = data.len() as u64;
        pages.clear();
        data.clear();
        Ok(n)
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), String> {
        match stream::write_message(self.conn, kind, payload) {
            Ok(n) => {
                self.stats.bytes_sent += n;
                Ok(())
            }
            Err(e) => Err(self.lost(e)),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.conn
            .write_all(bytes)
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        self.stats.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// The error for a failed send: the target's own reason when it sent
    /// one before closing (e.g. a version it does not speak).
    fn lost(&mut self, e: MigrationError) -> String {
        if let Ok((Kind::Error, msg)) = stream::read_message(self.conn) {
            return MigrationError::Refused(String::from_utf8_lossy(&msg).into()).to_string();
        }
        format!("sending to the target failed: {e}")
    }
}

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps.iter().map(|b| dirty::count(b)).sum()
}

fn bytes_per_ms(bytes: u64, took: Duration) -> u64 {
    let ms = took.as_millis().max(1) as u64;
    (bytes / ms).max(1)
}

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
    pub fn start_postcopy(self) -> Result<crate::postcopy::Target, String> {
        let missing = self.postcopy.unwrap_or_default();
        crate::postcopy::Target::start(&self.memory, &missing, self.conn, self.tcp)
    }

    /// Tell the source the machine is built: it exits, this side runs.
    pub fn ack(mut self) -> Result<(), String> {
        stream::write_message(self.conn.as_mut(), Kind::Ack, &[])
            .and_then(|_| self.conn.flush().map_err(MigrationError::Io))
            .map_err(|e| format!("cannot acknowledge the migration to the source: {e}"))
    }

    /// Tell the source the state cannot be used here (it resumes).
    pub fn refuse(mut self, why: &str) {
        let _ = stream::write_message(self.conn.as_mut(), Kind::Error, why.as_bytes());
        let _ = self.conn.flush();
    }
}

/// What the target listens on.
enum Listener {
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

/// Check the flags of `--migrate-from` against its address: TCP only
/// with TLS and a way to authenticate the source; a Unix socket without
/// TLS.
pub fn check_listen(listen: &Listen) -> Result<Addr, String> {
    let addr = parse_addr(&listen.uri)?;
    match &addr {
        Addr::Tcp { .. } => {
            if listen.tls.is_none() {
                return Err(format!(
                    "--migrate-from {addr}: a TCP migration must be encrypted: give --migrate-tls-cert and --migrate-tls-key \
                     (or use unix:PATH for a migration on this host)"
                ));
            }
            if listen.secret.is_none() && listen.client_ca.is_none() {
                return Err(format!(
                    "--migrate-from {addr}: the target must know its source: give --migrate-secret-file FILE \
                     (the source sends the same file with `migrate-to ... --secret-file FILE`) \
                     and/or --migrate-client-ca CA.pem (the source gives --cert and --key)"
                ));
            }
        }
        Addr::Unix(_) => {
            if listen.tls.is_some() || listen.client_ca.is_some() {
                return Err(format!(
                    "--migrate-from {addr}: a Unix socket needs no TLS; drop --migrate-tls-cert, --migrate-tls-key and --migrate-client-ca"
                ));
            }
        }
    }
    Ok(addr)
}

fn bind(listen: &Listen, addr: &Addr) -> Result<(Listener, String), String> {
    let uri = &listen.uri;
    match addr {
        Addr::Tcp { host, port } => {
            let Some((cert, key)) = &listen.tls else {
                return Err(format!("--migrate-from {uri}: TLS is required for tcp:"));
            };
            let config = Arc::new(server_config(cert, key, listen.client_ca.as_deref())?);
            // In the host's network, also from a jail with a network of its own.
            let l = crate::jail_run::in_host_net(|| TcpListener::bind((host.as_str(), *port)))
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("--migrate-from {uri}: cannot listen: {e}"))?;
            let local = l
                .local_addr()
                .map_err(|e| format!("--migrate-from {uri}: {e}"))?;
            Ok((Listener::Tcp(l, config), local.to_string()))
        }
        Addr::Unix(path) => {
            // A stale socket of an earlier run may go; any other file stays.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(format!(
                        "--migrate-from {uri}: {} exists and is not a socket",
                        path.display()
                    ));
                }
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path)
                .map_err(|e| format!("--migrate-from {uri}: cannot listen: {e}"))?;
            let listener = Listener::Unix(l, path.clone());
            // Only this user may connect (the secret is the second lock).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("--migrate-from {uri}: {e}"))?;
            Ok((listener, path.display().to_string()))
        }
    }
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

/// An authenticated source: its stream, socket and address.
type Authenticated = (Box<dyn Conn>, Sock, String);

/// Accept one connection and authenticate it: TLS (with the client
/// certificate when asked for), then the `Auth` message. On failure the
/// peer is told (when the link allows) and dropped; the error is (peer,
/// why).
fn accept_one(
    listener: &Listener,
    secret: Option<&[u8]>,
) -> Result<Authenticated, (String, String)> {
    let (mut conn, sock, peer): (Box<dyn Conn>, Sock, String) = match listener {
        Listener::Tcp(l, config) => {
            let (tcp, peer) = l
                .accept()
                .map_err(|e| ("?".to_string(), format!("accept: {e}")))?;
            let peer = peer.to_string();
            let _ = tcp.set_nodelay(true);
            let sock = Sock::Tcp(tcp);
            sock.set_timeouts(AUTH_TIMEOUT)
                .map_err(|e| (peer.clone(), e))?;
            let ctl = sock.try_clone().map_err(|e| (peer.clone(), e))?;
            let Sock::Tcp(tcp) = sock else {
                return Err((peer, "not TCP".into()));
            };
            let tls = rustls::ServerConnection::new(Arc::clone(config))
                .map_err(|e| (peer.clone(), format!("TLS set-up: {e}")))?;
            (Box::new(rustls::StreamOwned::new(tls, tcp)), ctl, peer)
        }
        Listener::Unix(l, _) => {
            let (s, _) = l
                .accept()
                .map_err(|e| ("?".to_string(), format!("accept: {e}")))?;
            let peer = unix_peer(&s);
            let ctl = Sock::Unix(
                s.try_clone()
                    .map_err(|e| (peer.clone(), format!("migration socket: {e}")))?,
            );
            ctl.set_timeouts(AUTH_TIMEOUT)
                .map_err(|e| (peer.clone(), e))?;
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
        // An I/O error is the link or TLS failing (no handshake, no or a
        // bad client certificate): nothing can be said over it.
        Err(MigrationError::Io(e)) => return Err((peer, format!("TLS or I/O: {e}"))),
        Err(e) => {
            let _ = stream::write_message(conn.as_mut(), Kind::Error, e.to_string().as_bytes());
            let _ = conn.flush();
            return Err((peer, e.to_string()));
        }
    };
    if let Some(expected) = secret {
        if !stream::secrets_equal(&given, expected) {
            let why = if given.is_empty() {
                "no migration secret given (migrate-to ... --secret-file FILE)"
            } else {
                "wrong migration secret"
            };
            let _ = stream::write_message(conn.as_mut(), Kind::Error, why.as_bytes());
            let _ = conn.flush();
            return Err((peer, why.to_string()));
        }
    }
    Ok((conn, sock, peer))
}

/// Bind, announce the address on stderr (`migration: listening on
/// ADDR`), wait for the source (refusing, with a pause each, up to
/// [`MAX_AUTH_FAILURES`] peers that do not authenticate) and receive the
/// whole stream. `check` checks the machine configuration against this
/// target's own definition and host before any memory is allocated.
pub fn receive(
    listen: &Listen,
    check: &dyn Fn(&MachineConfig) -> Result<(), String>,
) -> Result<Incoming, String> {
    let addr = check_listen(listen)?;
    let (listener, shown) = bind(listen, &addr)?;
    eprintln!("migration: listening on {shown}");
    let mut failures = 0u32;
    let (mut conn, ctl, peer) = loop {
        match accept_one(&listener, listen.secret.as_deref()) {
            Ok(c) => break c,
            Err((peer, why)) => {
                failures += 1;
                tracing::warn!(
                    "migration: refused a source from {peer}: {why} ({failures} of {MAX_AUTH_FAILURES} failed attempts)"
                );
                if failures >= MAX_AUTH_FAILURES {
                    return Err(format!(
                        "--migrate-from {}: gave up after {failures} sources failed to authenticate (the last, from {peer}: {why})",
                        listen.uri
                    ));
                }
                std::thread::sleep(AUTH_RETRY_DELAY);
            }
        }
    };
    drop(listener);
    tracing::info!("migration: source {peer} connected and authenticated");
    ctl.set_timeouts(IO_TIMEOUT)?;
    match receive_stream(conn.as_mut(), check) {
        Ok((loaded, memory, postcopy)) => Ok(Incoming {
            loaded,
            memory,
            postcopy,
            conn,
            tcp: ctl,
        }),
        Err(e) => {
            let msg = e.to_string();
            let _ = stream::write_message(conn.as_mut(), Kind::Error, msg.as_bytes());
            let _ = conn.flush();
            Err(format!("migration from {peer} failed: {msg}"))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error(transparent)]
    Stream(#[from] MigrationError),
    #[error("{0}")]
    Refused(String),
}

/// The machine, its memory, and (post-copy) the pages still to come.
type Received = (LoadedSnapshot, GuestMemory, Option<Vec<Vec<u64>>>);

fn receive_stream(
    conn: &mut dyn Conn,
    check: &dyn Fn(&MachineConfig) -> Result<(), String>,
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
    let bytes = config
        .memory_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| ReceiveError::Refused(format!("{} MiB of memory", config.memory_mib)))?;
    let memory = vireo_vmcore::memory::create_guest_memory(bytes)
        .map_err(|e| ReceiveError::Refused(e.to_string()))?;
    tracing::info!(
        "migration: receiving a {} MiB, {} vCPU VM on {} from vireo {peer_version}",
        config.memory_mib,
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
                    || snap.config.memory_mib != config.memory_mib
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

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, String> {
    let (certs, key_der) = load_identity("--migrate-tls-cert", cert, "--migrate-tls-key", key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = load_roots_for("--migrate-client-ca", ca)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("--migrate-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(certs, key_der).map_err(|e| {
        format!(
            "--migrate-tls-cert {} / --migrate-tls-key {}: {e}",
            cert.display(),
            key.display()
        )
    })
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
        assert!(
            e.contains("must be encrypted") && e.contains("--migrate-tls-cert"),
            "{e}"
        );
        // TLS but nothing to know the source by.
        let mut l = listen("tcp:127.0.0.1:0");
        l.tls = Some(("c.pem".into(), "k.pem".into()));
        let e = check_listen(&l).unwrap_err();
        assert!(e.contains("--migrate-secret-file"), "{e}");
        l.secret = Some(b"0123456789abcdef".to_vec());
        assert!(check_listen(&l).is_ok());
        l.secret = None;
        l.client_ca = Some("ca.pem".into());
        assert!(check_listen(&l).is_ok());
        // A Unix socket: no TLS flags, the secret optional.
        assert!(check_listen(&listen("unix:/tmp/x.sock")).is_ok());
        let mut l = listen("unix:/tmp/x.sock");
        l.tls = Some(("c.pem".into(), "k.pem".into()));
        assert!(check_listen(&l).unwrap_err().contains("needs no TLS"));
    }

    #[test]
    fn the_source_refuses_tcp_without_a_ca() {
        let req = MigrateTo::parse("tcp:127.0.0.1:1").unwrap();
        let e = connect(&req).err().unwrap();
        assert!(e.contains("always TLS") && e.contains("--ca"), "{e}");
        let req = MigrateTo::parse("unix:/nonexistent/x.sock --ca /c.pem").unwrap();
        assert!(connect(&req).err().unwrap().contains("needs no TLS"));
        let req = MigrateTo::parse("unix:/nonexistent/x.sock --cert /c.pem").unwrap();
        assert!(connect(&req).err().unwrap().contains("go together"));
        let req = MigrateTo::parse("unix:/nonexistent/x.sock").unwrap();
        assert!(connect(&req).err().unwrap().contains("cannot connect"));
    }

    #[test]
    fn secrets_are_read_from_files_and_checked() {
        let dir = std::env::temp_dir().join(format!("vireo-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(read_secret("--x", &f).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&f, "short\n").unwrap();
        assert!(read_secret("--x", &f).unwrap_err().contains("at least 16"));
        assert!(read_secret("--x", &dir.join("none"))
            .unwrap_err()
            .starts_with("--x "));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
