//! The per-VM samples of `GET /v1/stats` (and `/metrics`): CPU time and
//! RSS of each running VM's process from /proc, and the VM's own counters
//! (vCPU exits, disk and network I/O) from its control socket's `stats`
//! command.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use vireo_api::control::{Command, DeviceStats, DiskStats, NetStats, Reply};
use vireo_api::model::VmState;
use vireo_api::units::MemorySize;

use crate::procfs::{process_stats, ProcessStats};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
