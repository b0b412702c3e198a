//! Live migration between two `vireo run` processes: the source's
//! control-socket command `migrate-to tcp:HOST:PORT` and the target's
//! `vireo run --migrate-from tcp:HOST:PORT`. The stream format is in
//! [`vireo_vmcore::migration`]; this module is the transport (TCP,
//! optionally TLS with rustls) and the pre-copy loop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hypervisor::dirty;
use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use vireo_vmcore::migration::{self as stream, Kind, MigrationError, PAGES_PER_MESSAGE};
use vireo_vmcore::snapshot::{LoadedSnapshot, MachineConfig, SharedSnapshottable};
use vireo_vmcore::{RunState, RunningVm};

use crate::machine::{Quiesced, VirtioFunctions};

/// The downtime the pre-copy aims for when the command gives none.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Pre-copy rounds after the first full copy before the source stops the
/// guest whatever is left (a guest dirtying memory faster than the link
/// carries it never converges).
pub const MAX_ROUNDS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other before calling it gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// `tcp:HOST:PORT` (HOST may be `[v6]`) as (host, port).
pub fn parse_uri(uri: &str) -> Result<(String, u16), String> {
    let rest = uri.strip_prefix("tcp:").ok_or_else(|| {
        format!("{uri:?}: a migration address is tcp:HOST:PORT (e.g. tcp:10.0.0.2:4444)")
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

/// A byte stream to the peer: plain TCP or TLS over it.
pub(crate) trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// What `migrate-to` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateTo {
    pub uri: String,
    /// CA certificate (PEM) to verify the target's TLS certificate; TLS
    /// is used exactly when it is given.
    pub ca: Option<PathBuf>,
    pub downtime_ms: u64,
    /// Switch to post-copy after the first full copy
    /// ([`crate::postcopy`]).
    pub postcopy: bool,
    /// Post-copy: the most bytes per second the background push may take
    /// (pages the target asks for are never held back).
    pub postcopy_bandwidth: Option<u64>,
}

impl MigrateTo {
    /// `tcp:HOST:PORT [--ca CA.pem] [--downtime-ms N] [--postcopy
    /// [--postcopy-bandwidth RATE]]` (the words after `migrate-to`; RATE
    /// in bytes per second with an optional K/M/G suffix).
    pub fn parse(args: &str) -> Option<MigrateTo> {
        let mut words = args.split_whitespace();
        let uri = words.next()?.to_string();
        let mut m = MigrateTo {
            uri,
            ca: None,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            postcopy: false,
            postcopy_bandwidth: None,
        };
        while let Some(w) = words.next() {
            match w {
                "--postcopy" => m.postcopy = true,
                "--postcopy-bandwidth" => {
                    m.postcopy_bandwidth =
                        Some(vireo_devices::rate_limiter::parse_rate(words.next()?).ok()?)
                }
                "--ca" => m.ca = Some(words.next()?.into()),
                "--downtime-ms" => m.downtime_ms = words.next()?.parse().ok()?,
                _ => return None,
            }
        }
        Some(m)
    }
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
    let (host, port) = parse_uri(&req.uri)?;
    let (mut conn, tcp) = connect(&host, port, req.ca.as_deref())?;
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

fn connect(host: &str, port: u16, ca: Option<&Path>) -> Result<(Box<dyn Conn>, TcpStream), String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        // From a jail with a network of its own: a socket kept from the host's.
        match crate::jail_run::connect_tcp(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        format!(
            "cannot connect to the migration target {host}:{port}: {} (is `vireo run --migrate-from` listening there?)",
            last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into())
        )
    })?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("migration socket: {e}"))?;
    let ctl = tcp
        .try_clone()
        .map_err(|e| format!("migration socket: {e}"))?;
    let Some(ca) = ca else {
        return Ok((Box::new(tcp), ctl));
    };
    let roots = load_roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host}: not a host name TLS can verify: {e}"))?;
    let tls = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| format!("TLS set-up: {e}"))?;
    Ok((Box::new(rustls::StreamOwned::new(tls, tcp)), ctl))
}

fn load_roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "--ca {}: cannot read a PEM certificate: {e:?}",
                ca.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--ca {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            ca.display()
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("--ca {}: not a usable CA certificate: {e}", ca.display()))?;
    }
    Ok(roots)
}

struct Source<'a> {
    running: &'a RunningVm,
    conn: &'a mut dyn Conn,
    /// The socket under `conn`, for its timeouts.
    tcp: TcpStream,
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
    pub tls: Option<(PathBuf, PathBuf)>,
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
    tcp: TcpStream,
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

/// Bind, announce the address on stderr (`migration: listening on
/// ADDR`), accept one source and receive the whole stream. `backend`
/// checks the configuration and returns the backend's name to build it
/// on, before any memory is allocated.
pub fn receive(
    listen: &Listen,
    backend: &dyn Fn(&MachineConfig) -> Result<(), String>,
) -> Result<Incoming, String> {
    let (host, port) = parse_uri(&listen.uri)?;
    let tls = match &listen.tls {
        Some((cert, key)) => Some(Arc::new(server_config(cert, key)?)),
        None => None,
    };
    // In the host's network, also from a jail with a network of its own.
    let listener = crate::jail_run::in_host_net(|| TcpListener::bind((host.as_str(), port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("--migrate-from {}: cannot listen: {e}", listen.uri))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("--migrate-from {}: {e}", listen.uri))?;
    eprintln!("migration: listening on {addr}");
    let (tcp, peer) = listener
        .accept()
        .map_err(|e| format!("--migrate-from {}: accept: {e}", listen.uri))?;
    drop(listener);
    tracing::info!("migration: source {peer} connected");
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("migration socket: {e}"))?;
    let ctl = tcp
        .try_clone()
        .map_err(|e| format!("migration socket: {e}"))?;
    let mut conn: Box<dyn Conn> = match tls {
        Some(config) => {
            let tls =
                rustls::ServerConnection::new(config).map_err(|e| format!("TLS set-up: {e}"))?;
            Box::new(rustls::StreamOwned::new(tls, tcp))
        }
        None => Box::new(tcp),
    };
    match receive_stream(conn.as_mut(), backend) {
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
    backend: &dyn Fn(&MachineConfig) -> Result<(), String>,
) -> Result<Received, ReceiveError> {
    let peer_version = stream::read_header(conn)?;
    let (kind, payload) = stream::read_message(conn)?;
    if kind != Kind::Config {
        return Err(
            MigrationError::Corrupt(format!("expected the configuration, got {kind:?}")).into(),
        );
    }
    let config = stream::decode_config(&payload)?;
    backend(&config).map_err(ReceiveError::Refused)?;
    let memory = vireo_vmcore::memory::create_guest_memory(config.memory_mib << 20)
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
                if snap.config.backend != config.backend
                    || snap.config.vcpus != config.vcpus
                    || snap.config.memory_mib != config.memory_mib
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

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "--migrate-tls-cert {}: cannot read a PEM certificate: {e:?}",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--migrate-tls-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--migrate-tls-key {}: cannot read a PEM private key: {e:?}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
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
    }

    #[test]
    fn command_arguments() {
        assert_eq!(
            MigrateTo::parse("tcp:h:1"),
            Some(MigrateTo {
                uri: "tcp:h:1".into(),
                ca: None,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                postcopy: false,
                postcopy_bandwidth: None,
            })
        );
        assert_eq!(
            MigrateTo::parse(
                "tcp:h:1 --ca /c.pem --downtime-ms 50 --postcopy --postcopy-bandwidth 8M"
            ),
            Some(MigrateTo {
                uri: "tcp:h:1".into(),
                ca: Some("/c.pem".into()),
                downtime_ms: 50,
                postcopy: true,
                postcopy_bandwidth: Some(8 << 20),
            })
        );
        for bad in [
            "",
            "tcp:h:1 --ca",
            "tcp:h:1 --downtime-ms x",
            "tcp:h:1 --what",
            "tcp:h:1 --postcopy --postcopy-bandwidth 0",
        ] {
            assert_eq!(MigrateTo::parse(bad), None, "{bad}");
        }
    }
}
