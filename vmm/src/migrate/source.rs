//! The source's side: the `migrate-to` request, connecting and
//! authenticating to the target, the pre-copy loop, and the switch to
//! post-copy ([`super::postcopy`] serves the pages after it).

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vireo_hypervisor::dirty;
use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use vireo_vmcore::migration::{self as stream, Kind, MigrationError, PAGES_PER_MESSAGE};
use vireo_vmcore::snapshot::device::{DeviceList, Quiesced};
use vireo_vmcore::snapshot::SnapshotError;
use vireo_vmcore::{RunState, RunningVm, VmError};

use super::auth::{read_secret, SecretError};
use super::postcopy::{self, PostcopyStats, ServeError};
use super::tls::{self, TlsError};
use super::transport::{parse_addr, Addr, AddrError, Conn, Sock};
use super::IO_TIMEOUT;
pub use vireo_api::control::MigrateTo;

/// Pre-copy rounds after the first full copy before the source stops the
/// guest whatever is left (a guest dirtying memory faster than the link
/// carries it never converges).
pub const MAX_ROUNDS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub postcopy: Option<postcopy::PostcopyStats>,
}

/// Why a migration from this side failed (each names the target, the
/// file or the step).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Address(#[from] AddrError),
    #[error("a client certificate and its key go together")]
    CertWithoutKey,
    #[error("secret file {0}")]
    Secret(#[from] SecretError),
    #[error("{0}: a Unix socket needs no TLS; drop the CA and the client certificate")]
    TlsOnUnix(Addr),
    #[error("{0}: a TCP migration is always TLS: it needs the CA certificate of the target's TLS certificate, or use unix:PATH on this host")]
    NoCa(Addr),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the migration target {target}: {} (is a migration target listening there?)", .source.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "no address".into()))]
    Connect {
        target: String,
        source: Option<std::io::Error>,
    },
    #[error("migration socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the migration target {addr} did not take the connection: {source}")]
    NotTaken { addr: Addr, source: std::io::Error },
    #[error("cannot track dirty pages: {0}")]
    DirtyLog(#[source] VmError),
    #[error("cannot read the dirty page log: {0}")]
    ReadDirtyLog(#[source] VmError),
    #[error("cannot pause the VM: {0}")]
    Pause(#[source] VmError),
    #[error("cannot capture the VM state: {0}")]
    Capture(#[source] VmError),
    #[error("cannot encode the VM state: {0}")]
    Encode(#[source] SnapshotError),
    /// The target said why it refused (e.g. a version it does not speak).
    #[error(transparent)]
    Refused(MigrationError),
    #[error("sending to the target failed: {0}")]
    Send(#[source] MigrationError),
    #[error("the target answered {0:?} instead of acknowledging the state")]
    UnexpectedReply(Kind),
    #[error("the target did not acknowledge the state within {} s; the VM keeps running here", .0.as_secs())]
    AckTimeout(Duration),
    #[error("no acknowledgement from the target: {0}; the VM keeps running here")]
    NoAck(#[source] MigrationError),
    #[error(transparent)]
    Postcopy(#[from] ServeError),
}

/// Migrate `running` to the target at `req.uri`. On success the target
/// has acknowledged the state and runs the guest: the caller replies and
/// ends this process. On failure the VM runs again here (if it ran
/// before) and the error says why.
pub fn migrate_to(
    running: &RunningVm,
    devices: &DeviceList,
    frontend: serde_json::Value,
    req: &MigrateTo,
) -> Result<Stats, SourceError> {
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
        devices,
        quiesced: None,
    };
    let result = source.run(frontend, req, started);
    if result.is_err() && source.split {
        // Post-copy failed after the target took over: its guest may have
        // run on, so this copy stays paused (see super::postcopy).
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
/// certificate checked against the CA, ours given when asked for), then
/// the `Auth` message with the secret (empty without one).
fn connect(req: &MigrateTo) -> Result<(Box<dyn Conn>, Sock), SourceError> {
    let addr = parse_addr(&req.uri)?;
    if req.cert.is_some() != req.key.is_some() {
        return Err(SourceError::CertWithoutKey);
    }
    let secret = match &req.secret_file {
        Some(f) => read_secret(f)?,
        None => Vec::new(),
    };
    let (mut conn, sock): (Box<dyn Conn>, Sock) = match &addr {
        Addr::Unix(path) => {
            if req.ca.is_some() || req.cert.is_some() {
                return Err(SourceError::TlsOnUnix(addr));
            }
            let s = UnixStream::connect(path).map_err(|e| SourceError::Connect {
                target: addr.to_string(),
                source: Some(e),
            })?;
            let ctl = Sock::Unix(s.try_clone().map_err(SourceError::Socket)?);
            ctl.set_timeouts(IO_TIMEOUT).map_err(SourceError::Socket)?;
            (Box::new(s), ctl)
        }
        Addr::Tcp { host, port } => {
            let Some(ca) = req.ca.as_deref() else {
                return Err(SourceError::NoCa(addr));
            };
            let tcp = tcp_connect(host, *port)?;
            // A second handle on the same socket: its timeouts are the
            // stream's.
            let ctl = Sock::Tcp(tcp.try_clone().map_err(SourceError::Socket)?);
            ctl.set_timeouts(IO_TIMEOUT).map_err(SourceError::Socket)?;
            let identity = req.cert.as_deref().zip(req.key.as_deref());
            let tls = tls::client_connection(host, ca, identity)?;
            (Box::new(rustls::StreamOwned::new(tls, tcp)), ctl)
        }
    };
    // The secret goes first (inside TLS for tcp:), before anything about
    // the VM: a target that does not take it learns nothing more.
    conn.write_all(&stream::auth_message(&secret))
        .and_then(|()| conn.flush())
        .map_err(|source| SourceError::NotTaken {
            addr: addr.clone(),
            source,
        })?;
    Ok((conn, sock))
}

fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, SourceError> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|source| SourceError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in addrs {
        // From a jail with a network of its own: a socket kept from the host's.
        match crate::host_net::connect_tcp(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(SourceError::Connect {
        target: format!("{host}:{port}"),
        source: last,
    })
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
    devices: &'a DeviceList,
    /// The devices, held still from the final pause on.
    quiesced: Option<Quiesced<'a>>,
}

impl Source<'_> {
    fn run(
        &mut self,
        frontend: serde_json::Value,
        req: &MigrateTo,
        started: Instant,
    ) -> Result<Stats, SourceError> {
        let downtime_ms = req.downtime_ms;
        let config = self.running.machine_config(frontend.clone());
        self.send_raw(&stream::header())?;
        self.send(Kind::Config, &stream::encode_config(&config))?;
        self.running
            .start_dirty_log()
            .map_err(SourceError::DirtyLog)?;

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
            return self.postcopy(frontend, pending, req, started);
        }

        // Pre-copy: resend what the guest dirtied until the rest fits in
        // the downtime (or the rounds run out).
        while self.stats.rounds <= MAX_ROUNDS {
            let bytes = postcopy::count(&pending) * stream::PAGE_SIZE;
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
            self.running.pause().map_err(SourceError::Pause)?;
            self.paused = true;
        }
        // Device threads finish what is in flight and hold still (their
        // writes to guest memory land in the dirty log taken next).
        self.quiesced = Some(self.devices.quiesce());
        for (p, last) in pending.iter_mut().zip(self.take_dirty()?) {
            dirty::merge(p, &last);
        }
        self.send_pages(&pending, false)?;
        let snap = self
            .running
            .capture(self.devices, frontend)
            .map_err(SourceError::Capture)?;
        let state = vireo_vmcore::snapshot::encode_state(&snap).map_err(SourceError::Encode)?;
        self.send(Kind::State, &state)?;
        self.conn
            .flush()
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        match stream::read_message(self.conn) {
            Ok((Kind::Ack, _)) => {}
            Ok((Kind::Error, msg)) => {
                return Err(SourceError::Refused(MigrationError::Refused(
                    String::from_utf8_lossy(&msg).into(),
                )))
            }
            Ok((kind, _)) => return Err(SourceError::UnexpectedReply(kind)),
            Err(MigrationError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SourceError::AckTimeout(IO_TIMEOUT))
            }
            Err(e) => return Err(SourceError::NoAck(e)),
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
        frontend: serde_json::Value,
        mut pending: Vec<Vec<u64>>,
        req: &MigrateTo,
        started: Instant,
    ) -> Result<Stats, SourceError> {
        let down = Instant::now();
        if self.running.control().state() == RunState::Running {
            self.running.pause().map_err(SourceError::Pause)?;
            self.paused = true;
        }
        // Device threads finish what is in flight and hold still (their
        // writes to guest memory land in the dirty log taken next).
        self.quiesced = Some(self.devices.quiesce());
        for (p, last) in pending.iter_mut().zip(self.take_dirty()?) {
            dirty::merge(p, &last);
        }
        let missing = postcopy::count(&pending);
        tracing::info!(
            "migration: switching to post-copy with {missing} pages ({} MiB) left",
            (missing * stream::PAGE_SIZE) >> 20
        );
        self.send(Kind::Postcopy, &stream::encode_bitmaps(&pending))?;
        let snap = self
            .running
            .capture(self.devices, frontend)
            .map_err(SourceError::Capture)?;
        let state = vireo_vmcore::snapshot::encode_state(&snap).map_err(SourceError::Encode)?;
        self.send(Kind::State, &state)?;
        self.conn
            .flush()
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        let mut pc = PostcopyStats::default();
        let mut bytes = 0u64;
        let mut downtime_ms = 0u64;
        let mut split = false;
        let result = postcopy::serve(
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
            Err(e @ ServeError::BeforeAck(_)) => {
                self.split = false;
                Err(e.into())
            }
            Err(e @ ServeError::AfterAck(_)) => Err(e.into()),
        }
    }

    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, SourceError> {
        self.running
            .take_dirty_log()
            .map_err(SourceError::ReadDirtyLog)
    }

    /// Send every page set in `bitmaps` (per region); with `skip_zero`,
    /// pages that are all zero are left out. Returns the page bytes sent.
    fn send_pages(&mut self, bitmaps: &[Vec<u64>], skip_zero: bool) -> Result<u64, SourceError> {
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
    ) -> Result<u64, SourceError> {
        self.send(Kind::Pages, &stream::encode_pages(region, pages, data))?;
        self.stats.pages_sent += pages.len() as u64;
        let n = data.len() as u64;
        pages.clear();
        data.clear();
        Ok(n)
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), SourceError> {
        match stream::write_message(self.conn, kind, payload) {
            Ok(n) => {
                self.stats.bytes_sent += n;
                Ok(())
            }
            Err(e) => Err(self.lost(e)),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        self.conn
            .write_all(bytes)
            .map_err(|e| self.lost(MigrationError::Io(e)))?;
        self.stats.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// The error for a failed send: the target's own reason when it sent
    /// one before closing (e.g. a version it does not speak).
    fn lost(&mut self, e: MigrationError) -> SourceError {
        if let Ok((Kind::Error, msg)) = stream::read_message(self.conn) {
            return SourceError::Refused(MigrationError::Refused(
                String::from_utf8_lossy(&msg).into(),
            ));
        }
        SourceError::Send(e)
    }
}

fn bytes_per_ms(bytes: u64, took: Duration) -> u64 {
    let ms = took.as_millis().max(1) as u64;
    (bytes / ms).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_refuses_tcp_without_a_ca() {
        let req = MigrateTo::parse("tcp:127.0.0.1:1").unwrap();
        let e = connect(&req).err().unwrap();
        assert!(matches!(e, SourceError::NoCa(_)), "{e}");
        assert!(e.to_string().contains("always TLS"), "{e}");
        let req = MigrateTo::parse("unix:/nonexistent/x.sock --ca /c.pem").unwrap();
        let e = connect(&req).err().unwrap();
        assert!(e.to_string().contains("needs no TLS"), "{e}");
        let req = MigrateTo::parse("unix:/nonexistent/x.sock --cert /c.pem").unwrap();
        assert!(matches!(connect(&req), Err(SourceError::CertWithoutKey)));
        let req = MigrateTo::parse("unix:/nonexistent/x.sock").unwrap();
        let e = connect(&req).err().unwrap();
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }
}
