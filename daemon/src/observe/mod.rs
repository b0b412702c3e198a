//! Observability: the event stream behind `GET /v1/events` (server-sent
//! events), the per-VM samples behind `GET /v1/stats` and their Prometheus
//! rendering for `GET /metrics`.
//!
//! Events go through one tokio broadcast channel: the places in `vms` that
//! change a VM's state publish a [`Event::Vm`], the console pump feeds each
//! chunk of output to a [`ConsoleTap`] (console events for `?console=1`
//! subscribers, one `panic` event per run when a line shows `Kernel panic`).
//! A subscriber that falls behind by more than [`EVENT_BUFFER`] events
//! misses some (it is told so with a comment); publishers never block.
//!
//! Samples: CPU time and RSS of each running VM's `vireo run` process from
//! /proc, and the VM's own counters (vCPU exits, disk and network I/O) from
//! its control socket's `stats` command.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use vireo_api::control::{Command, DeviceStats, DiskStats, NetStats, Reply};
use vireo_api::model::VmState;
use vireo_api::units::MemorySize;

/// Events a slow subscriber may fall behind by before it misses some.
pub const EVENT_BUFFER: usize = 1024;
/// Longest console line kept while looking for a kernel panic.
const MAX_LINE: usize = 1024;
/// What marks a guest kernel's panic on its console.
pub const PANIC_MARKER: &str = "Kernel panic";

/// What changed about a VM (the `event` member of a `vm` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Started,
    Paused,
    Resumed,
    Stopped,
    Crashed,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Started => "started",
            Change::Paused => "paused",
            Change::Resumed => "resumed",
            Change::Stopped => "stopped",
            Change::Crashed => "crashed",
            Change::Deleted => "deleted",
        }
    }
}

/// `event: vm`: a VM's state changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEvent {
    pub name: String,
    /// The change: created, started, paused, resumed, stopped, crashed,
    /// deleted.
    pub event: Change,
    /// The VM's state after the change (`stopped`, `running`, `paused`,
    /// `crashed`; `deleted` once it is gone).
    pub state: String,
    /// Why, in words: the exit reason for stopped and crashed, else the
    /// change itself ("created", "started on request", ...).
    pub reason: String,
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
}

/// `event: panic`: the VM's console showed a kernel panic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PanicEvent {
    pub name: String,
    /// The console line that shows it.
    pub line: String,
    pub time: String,
}

/// `event: console` (only with `?console=1`): a chunk of console output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleEvent {
    pub name: String,
    /// The bytes as UTF-8 (invalid sequences replaced).
    pub data: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Vm(VmEvent),
    Panic(PanicEvent),
    Console(ConsoleEvent),
}

impl Event {
    pub fn vm_name(&self) -> &str {
        match self {
            Event::Vm(e) => &e.name,
            Event::Panic(e) => &e.name,
            Event::Console(e) => &e.name,
        }
    }

    /// The SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Vm(_) => "vm",
            Event::Panic(_) => "panic",
            Event::Console(_) => "console",
        }
    }

    /// The SSE `data:` payload (one line of JSON).
    pub fn data(&self) -> String {
        let v = match self {
            Event::Vm(e) => serde_json::to_string(e),
            Event::Panic(e) => serde_json::to_string(e),
            Event::Console(e) => serde_json::to_string(e),
        };
        v.unwrap_or_else(|_| "{}".into())
    }
}

/// What a subscriber asked for: `?vm=NAME` and `?console=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub vm: Option<String>,
    pub console: bool,
}

impl EventFilter {
    /// Parse the query string of `GET /v1/events`. Errors name the
    /// parameter.
    pub fn from_query(query: Option<&str>) -> Result<EventFilter, String> {
        let mut f = EventFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "vm" => {
                    vireo_api::model::check_name(value)
                        .map_err(|e| format!("vm: {}", e.message.trim_start_matches("name: ")))?;
                    f.vm = Some(value.to_string());
                }
                "console" => {
                    f.console = match value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        other => {
                            return Err(format!(
                                "console: {other:?} is not a boolean; use console=1"
                            ))
                        }
                    }
                }
                // Tokens travel in the query string for browsers (the auth
                // layer reads them); other parameters are ignored, as HTTP
                // APIs commonly do with cache-busting ones.
                _ => {}
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &Event) -> bool {
        if matches!(e, Event::Console(_)) && !self.console {
            return false;
        }
        self.vm.as_deref().is_none_or(|vm| vm == e.vm_name())
    }
}

/// RFC 3339 UTC with milliseconds, for event times.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The daemon's observability state: the event channel and the API request
/// counters.
pub struct Observe {
    events: broadcast::Sender<Event>,
    /// Set when the daemon shuts down: event streams end (an open stream
    /// would otherwise keep the graceful shutdown waiting forever).
    closing: tokio::sync::watch::Sender<bool>,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    total_requests: AtomicU64,
}

impl Default for Observe {
    fn default() -> Self {
        Observe {
            events: broadcast::channel(EVENT_BUFFER).0,
            closing: tokio::sync::watch::channel(false).0,
            requests: Mutex::new(BTreeMap::new()),
            total_requests: AtomicU64::new(0),
        }
    }
}

impl Observe {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Tells event streams to end (`closing()` resolves).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Observe::close`] has been called.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    pub fn publish(&self, e: Event) {
        // An error only means nobody listens.
        let _ = self.events.send(e);
    }

    /// Publish a VM state change.
    pub fn vm(&self, name: &str, change: Change, state: Option<VmState>, reason: &str) {
        self.publish(Event::Vm(VmEvent {
            name: name.to_string(),
            event: change,
            state: state.map_or("deleted", VmState::as_str).to_string(),
            reason: reason.to_string(),
            time: now_rfc3339(),
        }));
    }

    /// A tap for the console pump of VM `name`.
    pub fn console_tap(&self, name: &str) -> ConsoleTap {
        ConsoleTap {
            name: name.to_string(),
            events: self.events.clone(),
            line: Vec::new(),
            panicked: false,
        }
    }

    /// Count one API request (method and response status).
    pub fn count_request(&self, method: &str, status: u16) {
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((method.to_string(), status)).or_insert(0) += 1;
    }

    /// The request counters by method and status.
    pub fn requests(&self) -> Vec<(String, u16, u64)> {
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|((m, s), n)| (m.clone(), *s, *n)).collect()
    }
}

/// Watches one VM run's console output: publishes it to `?console=1`
/// subscribers and the first kernel panic line as a `panic` event.
pub struct ConsoleTap {
    name: String,
    events: broadcast::Sender<Event>,
    /// The current, unfinished line (cut at [`MAX_LINE`] bytes).
    line: Vec<u8>,
    /// One panic event per run (the panic banner repeats the marker).
    panicked: bool,
}

impl ConsoleTap {
    /// A chunk of console output arrived.
    pub fn output(&mut self, chunk: &[u8]) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Event::Console(ConsoleEvent {
                name: self.name.clone(),
                data: String::from_utf8_lossy(chunk).into_owned(),
            }));
        }
        if self.panicked {
            return;
        }
        for &b in chunk {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    /// The console closed: a last line without a newline still counts.
    pub fn finish(&mut self) {
        if !self.panicked {
            self.end_line();
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if line.contains(PANIC_MARKER) {
            self.panicked = true;
            let _ = self.events.send(Event::Panic(PanicEvent {
                name: self.name.clone(),
                line: line.trim().to_string(),
                time: now_rfc3339(),
            }));
        }
    }
}

/// The counters of a `stats` reply.
fn stats_of(reply: Reply) -> Result<DeviceStats, String> {
    reply
        .into_result()?
        .stats
        .ok_or_else(|| "the reply has no stats (an older vireo run?)".into())
}

/// One VM in `GET /v1/stats`. Counters are totals since the VM process
/// started; clients compute rates from two samples. A stopped VM has zeros
/// and a null uptime; a running VM that did not answer its control socket
/// in time has null device counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    #[schema(schema_with = vireo_api::model::schema::vm_name)]
    pub name: String,
    pub state: VmState,
    /// Seconds since the VM's process started; null when it does not run.
    #[schema(required = true)]
    pub uptime_secs: Option<u64>,
    /// User plus system CPU time of the VM's process (vCPUs and devices).
    #[schema(minimum = 0)]
    pub cpu_seconds: f64,
    /// Resident memory of the VM's process.
    pub memory_rss_bytes: u64,
    /// The configured guest memory.
    pub memory_bytes: u64,
    /// All disks together.
    #[schema(required = true)]
    pub disk_read_bytes: Option<u64>,
    /// All disks together.
    #[schema(required = true)]
    pub disk_write_bytes: Option<u64>,
    /// All network devices together.
    #[schema(required = true)]
    pub net_rx_bytes: Option<u64>,
    /// All network devices together.
    #[schema(required = true)]
    pub net_tx_bytes: Option<u64>,
    /// vCPU exits to the VMM, all vCPUs together.
    #[schema(required = true)]
    pub exits: Option<u64>,
    /// Per-disk counters (empty when unknown).
    pub disks: Vec<DiskStats>,
    /// Per-network-device counters (empty when unknown).
    pub nets: Vec<NetStats>,
}

impl VmStats {
    /// A sample from what /proc says of the process and what the VM said
    /// over its control socket (`None`: it did not answer).
    pub fn new(
        name: &str,
        state: VmState,
        uptime_secs: Option<u64>,
        memory: MemorySize,
        process: Option<ProcessStats>,
        devices: Option<DeviceStats>,
    ) -> VmStats {
        let p = process.unwrap_or_default();
        let sum = |f: &dyn Fn(&DeviceStats) -> u64| devices.as_ref().map(f);
        let stopped = !state.is_active();
        let or_zero = |v: Option<u64>| if stopped { Some(0) } else { v };
        VmStats {
            name: name.to_string(),
            state,
            uptime_secs,
            cpu_seconds: p.cpu_seconds,
            memory_rss_bytes: p.rss_bytes,
            memory_bytes: memory.bytes(),
            disk_read_bytes: or_zero(sum(&|d| d.disks.iter().map(|x| x.read_bytes).sum())),
            disk_write_bytes: or_zero(sum(&|d| d.disks.iter().map(|x| x.write_bytes).sum())),
            net_rx_bytes: or_zero(sum(&|d| d.nets.iter().map(|x| x.rx_bytes).sum())),
            net_tx_bytes: or_zero(sum(&|d| d.nets.iter().map(|x| x.tx_bytes).sum())),
            exits: or_zero(sum(&|d| d.vcpus.iter().map(|x| x.exits).sum())),
            disks: devices
                .as_ref()
                .map(|d| d.disks.clone())
                .unwrap_or_default(),
            nets: devices.map(|d| d.nets).unwrap_or_default(),
        }
    }
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsList {
    /// When the sample was taken, Unix seconds.
    pub time: f64,
    pub vms: Vec<VmStats>,
}

/// What /proc tells about a VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// CPU time (utime + stime, fields 14 and 15 of /proc/PID/stat) in clock
/// ticks.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3; utime is field 14.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of /proc/PID/status, in bytes.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_ascii_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// CPU time and RSS of process `pid`, if it is still there.
pub fn process_stats(pid: i32) -> Option<ProcessStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(ProcessStats {
        cpu_seconds: parse_cpu_ticks(&stat)? as f64 / hz,
        rss_bytes: parse_rss_bytes(&status).unwrap_or(0),
    })
}

/// How long `GET /v1/stats` and `/metrics` wait for a VM's `stats` reply.
pub const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Ask the VM process behind `socket` for its counters.
async fn device_stats(socket: std::path::PathBuf) -> Option<DeviceStats> {
    let reply = tokio::time::timeout(
        STATS_TIMEOUT,
        crate::vms::control_request(&socket, &Command::Stats),
    )
    .await;
    match reply {
        Ok(Ok(reply)) => match stats_of(reply) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("{}: stats: {e}", socket.display());
                None
            }
        },
        Ok(Err(e)) => {
            tracing::debug!("{}: stats: {e}", socket.display());
            None
        }
        Err(_) => {
            tracing::debug!("{}: stats: no answer in time", socket.display());
            None
        }
    }
}

/// Sample every VM: /proc for the running ones' processes, and their
/// control sockets (all at once, each with [`STATS_TIMEOUT`]).
pub async fn sample(d: &crate::vms::Daemon) -> Result<StatsList, crate::error::ApiError> {
    let records = d.list()?;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_secs_f64())
        .unwrap_or(0.0);
    let asks: Vec<_> = records
        .iter()
        .map(|r| match r.process {
            Some(_) if r.state.is_active() => {
                Some(tokio::spawn(device_stats(d.control_socket(&r.name))))
            }
            _ => None,
        })
        .collect();
    let mut vms = Vec::with_capacity(records.len());
    for (r, ask) in records.iter().zip(asks) {
        let process = match r.process {
            Some(p)
                if r.state.is_active() && crate::procfs::is_same_process(p.pid, p.start_time) =>
            {
                // A jailed VM's VMM is its supervisor's child.
                process_stats(crate::procfs::vmm_pid(p.pid))
            }
            _ => None,
        };
        let devices = match ask {
            Some(h) => h.await.ok().flatten(),
            None => None,
        };
        vms.push(VmStats::new(
            &r.name,
            r.state,
            r.uptime_secs(),
            r.config.memory_mib,
            process,
            devices,
        ));
    }
    Ok(StatsList { time, vms })
}

/// A label value in the Prometheus text format: backslash, double quote and
/// newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A family of samples: `# HELP`, `# TYPE`, then one line per sample.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

/// A float as Prometheus writes it (integers without a fraction).
fn float(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "NaN".into()
    }
}

/// `GET /metrics`: the Prometheus text format 0.0.4.
pub fn render_prometheus(stats: &StatsList, requests: &[(String, u16, u64)]) -> String {
    let mut out = String::new();
    let vms = &stats.vms;
    {
        let mut f = family(&mut out, "vireo_vms", "gauge", "VMs defined, by state.");
        for state in [
            VmState::Running,
            VmState::Paused,
            VmState::Stopped,
            VmState::Crashed,
        ] {
            let n = vms.iter().filter(|v| v.state == state).count();
            f.sample("vireo_vms", &[("state", state.as_str())], n);
        }
    }
    {
        let mut f = family(
            &mut out,
            "vireo_api_requests_total",
            "counter",
            "API requests answered, by method and status code.",
        );
        for (method, code, n) in requests {
            f.sample(
                "vireo_api_requests_total",
                &[("method", method), ("code", &code.to_string())],
                n,
            );
        }
    }
    {
        let mut f = family(
            &mut out,
            "vireo_vm_up",
            "gauge",
            "1 while the VM's process runs (running or paused), else 0.",
        );
        for v in vms {
            f.sample(
                "vireo_vm_up",
                &[("vm", &v.name)],
                u8::from(v.state.is_active()),
            );
        }
    }
    type Get = fn(&VmStats) -> Option<String>;
    let per_vm: [(&str, &str, &str, Get); 4] = [
        (
            "vireo_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's process (vCPUs and devices), user plus system.",
            |v| Some(float(v.cpu_seconds)),
        ),
        (
            "vireo_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of the VM's process.",
            |v| Some(v.memory_rss_bytes.to_string()),
        ),
        (
            "vireo_vm_memory_bytes",
            "gauge",
            "Guest memory configured.",
            |v| Some(v.memory_bytes.to_string()),
        ),
        (
            "vireo_vm_exits_total",
            "counter",
            "vCPU exits to the VMM, all vCPUs together.",
            |v| v.exits.map(|n| n.to_string()),
        ),
    ];
    for (name, kind, help, get) in per_vm {
        let mut f = family(&mut out, name, kind, help);
        for v in vms {
            if let Some(value) = get(v) {
                f.sample(name, &[("vm", &v.name)], value);
            }
        }
    }
    type DiskGet = fn(&DiskStats) -> u64;
    for (name, help, get) in [
        (
            "vireo_vm_disk_read_bytes_total",
            "Bytes the guest read from the disk.",
            (|d| d.read_bytes) as DiskGet,
        ),
        (
            "vireo_vm_disk_write_bytes_total",
            "Bytes the guest wrote to the disk.",
            |d| d.write_bytes,
        ),
        (
            "vireo_vm_disk_read_ops_total",
            "Read requests the guest made.",
            |d| d.read_ops,
        ),
        (
            "vireo_vm_disk_write_ops_total",
            "Write requests the guest made.",
            |d| d.write_ops,
        ),
    ] {
        let mut f = family(&mut out, name, "counter", help);
        for v in vms {
            for d in &v.disks {
                f.sample(name, &[("vm", &v.name), ("disk", &d.id)], get(d));
            }
        }
    }
    type NetGet = fn(&NetStats) -> u64;
    for (name, help, get) in [
        (
            "vireo_vm_net_rx_bytes_total",
            "Frame bytes the guest received.",
            (|n| n.rx_bytes) as NetGet,
        ),
        (
            "vireo_vm_net_tx_bytes_total",
            "Frame bytes the guest sent.",
            |n| n.tx_bytes,
        ),
        (
            "vireo_vm_net_rx_packets_total",
            "Frames the guest received.",
            |n| n.rx_packets,
        ),
        (
            "vireo_vm_net_tx_packets_total",
            "Frames the guest sent.",
            |n| n.tx_packets,
        ),
    ] {
        let mut f = family(&mut out, name, "counter", help);
        for v in vms {
            for n in &v.nets {
                f.sample(name, &[("vm", &v.name), ("net", &n.id)], get(n));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_event(name: &str) -> Event {
        Event::Vm(VmEvent {
            name: name.into(),
            event: Change::Started,
            state: "running".into(),
            reason: "started".into(),
            time: now_rfc3339(),
        })
    }

    fn console(name: &str) -> Event {
        Event::Console(ConsoleEvent {
            name: name.into(),
            data: "x".into(),
        })
    }

    #[test]
    fn filters_select_by_vm_and_console() {
        let all = EventFilter::from_query(None).unwrap();
        assert!(all.matches(&vm_event("a")));
        assert!(!all.matches(&console("a")), "console only when asked");
        let f = EventFilter::from_query(Some("vm=web&console=1")).unwrap();
        assert_eq!(
            f,
            EventFilter {
                vm: Some("web".into()),
                console: true
            }
        );
        assert!(f.matches(&vm_event("web")) && f.matches(&console("web")));
        assert!(!f.matches(&vm_event("db")) && !f.matches(&console("db")));
        let f = EventFilter::from_query(Some("console=0&access_token=abc")).unwrap();
        assert!(!f.console && f.vm.is_none());
        let e = EventFilter::from_query(Some("console=maybe")).unwrap_err();
        assert!(e.starts_with("console: "), "{e}");
        let e = EventFilter::from_query(Some("vm=../x")).unwrap_err();
        assert!(e.starts_with("vm: "), "{e}");
        let e = EventFilter::from_query(Some("vm=")).unwrap_err();
        assert!(e.starts_with("vm: "), "{e}");
    }

    #[test]
    fn a_kernel_panic_line_becomes_one_panic_event() {
        let o = Observe::default();
        let mut rx = o.subscribe();
        let mut tap = o.console_tap("web");
        tap.output(b"booting\r\n[    1.0] Kernel pa");
        tap.output(b"nic - not syncing: VFS: Unable to mount root fs\r\n");
        tap.output(b"---[ end Kernel panic - not syncing: VFS ]---\n");
        tap.finish();
        let mut panics = Vec::new();
        let mut console = String::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Panic(p) => panics.push(p),
                Event::Console(c) => console.push_str(&c.data),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(panics.len(), 1, "{panics:?}");
        assert_eq!(panics[0].name, "web");
        assert_eq!(
            panics[0].line,
            "[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs"
        );
        assert!(console.starts_with("booting\r\n") && console.ends_with("]---\n"));

        // A panic line without a newline counts when the console closes.
        let mut tap = o.console_tap("db");
        tap.output(b"Kernel panic - not syncing: Attempted to kill init!");
        assert!(!matches!(rx.try_recv(), Ok(Event::Panic(_))));
        tap.finish();
        let mut got = None;
        while let Ok(e) = rx.try_recv() {
            if let Event::Panic(p) = e {
                got = Some(p);
            }
        }
        assert_eq!(got.expect("a panic event").name, "db");
    }

    #[test]
    fn events_serialize_as_the_contract_says() {
        let o = Observe::default();
        let mut rx = o.subscribe();
        o.vm("a", Change::Stopped, Some(VmState::Stopped), "powered off");
        o.vm("a", Change::Deleted, None, "deleted");
        let e = rx.try_recv().unwrap();
        assert_eq!(e.kind(), "vm");
        let v: serde_json::Value = serde_json::from_str(&e.data()).unwrap();
        assert_eq!(v["name"], "a");
        assert_eq!(v["event"], "stopped");
        assert_eq!(v["state"], "stopped");
        assert_eq!(v["reason"], "powered off");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        let v: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap().data()).unwrap();
        assert_eq!(
            (&v["event"], &v["state"]),
            (&"deleted".into(), &"deleted".into())
        );
    }

    #[test]
    fn stats_replies_parse() {
        let line = r#"{"ok":true,"state":"running","stats":{"vcpus":[{"exits":5},{"exits":7}],"disks":[{"id":"root","read_bytes":4096,"write_bytes":512,"read_ops":2,"write_ops":1}],"nets":[{"id":"tap0","rx_bytes":60,"tx_bytes":42,"rx_packets":1,"tx_packets":1}]}}"#;
        let stats = |line: &str| {
            Reply::parse(line)
                .map_err(|e| e.to_string())
                .and_then(stats_of)
        };
        let s = stats(line).unwrap();
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.disks[0].id, "root");
        let v = VmStats::new(
            "a",
            VmState::Running,
            Some(3),
            MemorySize::mib_const(64),
            None,
            Some(s),
        );
        assert_eq!(v.exits, Some(12));
        assert_eq!(
            (v.disk_read_bytes, v.disk_write_bytes),
            (Some(4096), Some(512))
        );
        assert_eq!((v.net_rx_bytes, v.net_tx_bytes), (Some(60), Some(42)));
        assert_eq!(v.memory_bytes, 64 << 20);
        assert!(stats(r#"{"ok":false,"error":"gone"}"#)
            .unwrap_err()
            .contains("gone"));
        assert!(stats(r#"{"ok":true,"state":"running"}"#).is_err());
        assert!(stats("garbage").is_err());
        // No answer: no device counters; stopped: zeros.
        let silent = VmStats::new(
            "a",
            VmState::Running,
            Some(1),
            MemorySize::mib_const(64),
            None,
            None,
        );
        assert_eq!((silent.exits, silent.disk_read_bytes), (None, None));
        let stopped = VmStats::new(
            "a",
            VmState::Stopped,
            None,
            MemorySize::mib_const(64),
            None,
            None,
        );
        assert_eq!((stopped.exits, stopped.net_tx_bytes), (Some(0), Some(0)));
    }

    #[test]
    fn proc_fields_parse() {
        // utime 5, stime 6 (fields 14 and 15).
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_cpu_ticks(line), Some(11));
        assert_eq!(parse_cpu_ticks("nonsense"), None);
        let status = "Name:\tvireo\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(parse_rss_bytes(status), Some(2048 * 1024));
        assert_eq!(parse_rss_bytes("Name: x\n"), None);
        let me = process_stats(std::process::id() as i32).expect("own stats");
        assert!(me.rss_bytes > 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("plain"), "plain");
    }

    /// Every line is a comment or `name{labels} value` with a float value.
    pub fn check_exposition(text: &str) {
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok() || value == "NaN", "{line}");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "{line}");
            }
        }
    }

    #[test]
    fn prometheus_text_renders_every_family() {
        let dev = DeviceStats {
            vcpus: vec![vireo_api::control::VcpuStats { exits: 9 }],
            disks: vec![DiskStats {
                id: "we\"ird\\disk".into(),
                read_bytes: 1,
                write_bytes: 2,
                read_ops: 3,
                write_ops: 4,
            }],
            nets: vec![NetStats {
                id: "net0".into(),
                rx_bytes: 5,
                tx_bytes: 6,
                rx_packets: 7,
                tx_packets: 8,
            }],
        };
        let stats = StatsList {
            time: 1.5,
            vms: vec![
                VmStats::new(
                    "web",
                    VmState::Running,
                    Some(10),
                    MemorySize::mib_const(32),
                    Some(ProcessStats {
                        cpu_seconds: 1.25,
                        rss_bytes: 4096,
                    }),
                    Some(dev),
                ),
                VmStats::new(
                    "db",
                    VmState::Stopped,
                    None,
                    MemorySize::mib_const(64),
                    None,
                    None,
                ),
            ],
        };
        let text = render_prometheus(&stats, &[("GET".into(), 200, 3)]);
        check_exposition(&text);
        for needle in [
            "vireo_vms{state=\"running\"} 1\n",
            "vireo_vms{state=\"stopped\"} 1\n",
            "vireo_api_requests_total{method=\"GET\",code=\"200\"} 3\n",
            "vireo_vm_up{vm=\"web\"} 1\n",
            "vireo_vm_up{vm=\"db\"} 0\n",
            "vireo_vm_cpu_seconds_total{vm=\"web\"} 1.25\n",
            "vireo_vm_memory_rss_bytes{vm=\"web\"} 4096\n",
            "vireo_vm_memory_bytes{vm=\"db\"} 67108864\n",
            "vireo_vm_exits_total{vm=\"web\"} 9\n",
            "vireo_vm_disk_read_bytes_total{vm=\"web\",disk=\"we\\\"ird\\\\disk\"} 1\n",
            "vireo_vm_disk_write_bytes_total{vm=\"web\",disk=\"we\\\"ird\\\\disk\"} 2\n",
            "vireo_vm_net_rx_bytes_total{vm=\"web\",net=\"net0\"} 5\n",
            "vireo_vm_net_tx_bytes_total{vm=\"web\",net=\"net0\"} 6\n",
            "# TYPE vireo_vm_cpu_seconds_total counter\n",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        // Each family's HELP and TYPE appear once.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
    }
}
