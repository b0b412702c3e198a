//! Carrying out control-socket commands on the running machine: pause,
//! resume, reset, the power button, the balloon, stats, snapshots and
//! outgoing migrations, and the replies to them.

use std::path::PathBuf;
use std::time::Duration;

use vireo_api::control::{
    self, Command, DeviceStats, DiskStats, MigrateTo, MigrationStats, NetStats, PostcopyStats,
    Reply, SnapshotReport,
};
use vireo_api::model::{BalloonStatus, SnapshotDisk};
use vireo_devices::virtio::balloon::{BalloonHandle, BalloonStats};
use vireo_vmcore::snapshot::device::DeviceList;
use vireo_vmcore::snapshot::SnapshotError;
use vireo_vmcore::vcpu::VcpuStats;
use vireo_vmcore::{ExitReason, RunState, RunningVm, VmError};

use crate::control_socket::ControlSocket;
use crate::devices::Attached;
use crate::machine::PowerButton;
use crate::migrate::{PemFile, SourceError};
use crate::snapshot_devices;
use crate::start::Frontend;

/// Carry out control-socket commands until the VM exits; whether a
/// `reset` command ended it.
pub(crate) fn serve_control(
    running: &RunningVm,
    power_button: &PowerButton,
    attached: &Attached,
    vcpu_stats: &VcpuStats,
    saveable: &Saveable<'_>,
    socket: &ControlSocket,
    frontend: &mut dyn Frontend,
) -> bool {
    let balloon = attached.balloon.as_ref();
    let control = running.control();
    let mut reset = false;
    // The last snapshot this process wrote: the parent of a `--diff`.
    let mut last_snapshot: Option<PathBuf> = None;
    loop {
        if control
            .wait_exit_timeout(Duration::from_millis(20))
            .is_some()
        {
            return reset;
        }
        while let Ok(pending) = socket.commands.try_recv() {
            let result = match pending.command {
                Command::Pause => running.pause(),
                Command::Resume => running.resume(),
                Command::PowerButton => {
                    power_button.press();
                    Ok(())
                }
                Command::Reset => {
                    reset = control.exit_reason().is_none();
                    control.request_exit(ExitReason::Reset);
                    Ok(())
                }
                Command::Status => Ok(()),
                Command::Balloon(target) => {
                    let reply = balloon_command(balloon, target, state_name(control.state()));
                    let _ = pending.reply.send(reply);
                    continue;
                }
                Command::Snapshot {
                    dir,
                    stay_paused,
                    diff,
                } => {
                    let reply = snapshot_command(
                        running,
                        saveable,
                        &dir,
                        stay_paused,
                        diff,
                        &mut last_snapshot,
                    );
                    let _ = pending.reply.send(reply);
                    continue;
                }
                Command::MigrateTo(req) => {
                    let (reply, migrated) = migrate_command(running, saveable, &req);
                    let _ = pending.reply.send(reply);
                    if migrated {
                        // The target runs the guest now; end this process
                        // (exit 0) once the reply is written.
                        tracing::info!("migrated to {}", req.uri);
                        frontend.notice(&format!("migrated to {}", req.uri));
                        control.request_exit(ExitReason::Stopped);
                        return false;
                    }
                    continue;
                }
                Command::Stats => {
                    let reply = Reply {
                        stats: Some(device_stats(vcpu_stats, attached)),
                        ..Reply::ok(state_name(control.state()))
                    };
                    let _ = pending.reply.send(reply.encode());
                    continue;
                }
            };
            let reply = match result {
                Ok(()) => Reply::ok(state_name(control.state())),
                Err(e) => Reply::error(e.to_string()),
            };
            let _ = pending.reply.send(reply.encode());
        }
    }
}

/// What a snapshot or a migration saves: every device by id (paused
/// around it), and the record of the virtio devices and disks.
pub(crate) struct Saveable<'a> {
    pub(crate) devices: &'a DeviceList,
    pub(crate) attached: &'a Attached,
}

/// The front end's description of the machine recorded with its state:
/// the device ids, the virtio devices (so a restore rebuilds them with no
/// device flags, and a migration target checks its own against them) and
/// the snapshot's disk copies.
fn frontend(
    saveable: &Saveable<'_>,
    disks: Vec<snapshot_devices::DiskCopy>,
) -> Result<serde_json::Value, RecordDevicesError> {
    serde_json::to_value(snapshot_devices::FrontendRecord {
        devices: saveable.devices.ids(),
        virtio: saveable.attached.device_set.clone(),
        disks,
    })
    .map_err(RecordDevicesError)
}

/// The front end's description of the machine could not be recorded
/// (a machine without it could not be restored or migrated in).
#[derive(Debug, thiserror::Error)]
#[error("cannot record the machine's devices: {0}")]
struct RecordDevicesError(#[source] serde_json::Error);

/// Why `snapshot` failed.
#[derive(Debug, thiserror::Error)]
enum SnapshotCommandError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Disks(#[from] snapshot_devices::CopyDisksError),
    #[error(transparent)]
    Record(#[from] RecordDevicesError),
    #[error("dirty page tracking is off; take a full snapshot first")]
    NoDirtyLog,
}

/// `migrate-to ...`: the reply, and whether the VM now runs on the target.
fn migrate_command(
    running: &RunningVm,
    saveable: &Saveable<'_>,
    req: &MigrateTo,
) -> (String, bool) {
    tracing::info!("migration to {} started", req.uri);
    // Disks are shared storage: the target's own disks name the same
    // images (it never opens the paths recorded here).
    let record = match frontend(saveable, Vec::new()) {
        Ok(r) => r,
        Err(e) => {
            return (
                Reply::error(format!("migration to {}: {e}", req.uri)).encode(),
                false,
            )
        }
    };
    match crate::migrate::migrate_to(running, saveable.devices, record, req) {
        Ok(stats) => {
            tracing::info!(
                "migration to {}: {} ms total, {} ms downtime, {} rounds, {} pages, {} bytes",
                req.uri,
                stats.total_ms,
                stats.downtime_ms,
                stats.rounds,
                stats.pages_sent,
                stats.bytes_sent
            );
            let migration = MigrationStats {
                total_ms: stats.total_ms,
                downtime_ms: stats.downtime_ms,
                bytes_sent: stats.bytes_sent,
                rounds: u64::from(stats.rounds),
                pages_sent: stats.pages_sent,
                postcopy: stats.postcopy.map(|p| PostcopyStats {
                    pages_requested: p.pages_requested,
                    pages_pushed: p.pages_pushed,
                    postcopy_ms: p.postcopy_ms,
                }),
            };
            let reply = Reply {
                migration: Some(migration),
                ..Reply::ok("migrated")
            };
            (reply.encode(), true)
        }
        Err(e) => {
            tracing::warn!("migration to {} failed: {e}", req.uri);
            (
                Reply::error(format!(
                    "migration to {}: {}",
                    req.uri,
                    migrate_to_message(&e)
                ))
                .encode(),
                false,
            )
        }
    }
}

/// A `migrate-to` failure in the command's own words: the options it
/// was given (`--ca`, `--cert`, `--key`, `--secret-file`) where the
/// library names the file or the setting.
fn migrate_to_message(e: &SourceError) -> String {
    match e {
        SourceError::NoCa(addr) => format!(
            "{addr}: a TCP migration is always TLS: give --ca CA.pem (the CA of the target's --migrate-tls-cert), or use unix:PATH on this host"
        ),
        SourceError::TlsOnUnix(addr) => {
            format!("{addr}: a Unix socket needs no TLS; drop --ca, --cert and --key")
        }
        SourceError::CertWithoutKey => {
            "--cert and --key go together (the client certificate and its key)".into()
        }
        SourceError::Secret(e) => format!("--secret-file {e}"),
        SourceError::Tls(e) => match e.file() {
            Some(PemFile::Ca) => format!("--ca: {e}"),
            Some(PemFile::ClientCert) => format!("--cert: {e}"),
            Some(PemFile::ClientKey) => format!("--key: {e}"),
            _ => e.to_string(),
        },
        other => other.to_string(),
    }
}

/// `snapshot [--paused] [--diff] DIR`: pause, capture, write, resume.
/// A full snapshot becomes the base of dirty page tracking; a diff writes
/// the pages dirtied since `last` (this process's previous snapshot).
fn snapshot_command(
    running: &RunningVm,
    saveable: &Saveable<'_>,
    dir: &std::path::Path,
    stay_paused: bool,
    diff: bool,
    last: &mut Option<PathBuf>,
) -> String {
    let parent = match (diff, last.as_ref()) {
        (false, _) => None,
        (true, Some(p)) => Some(p.clone()),
        (true, None) => {
            return Reply::error(
                "snapshot --diff needs an earlier snapshot (full or diff) taken by this process as its parent; take a full snapshot first",
            )
            .encode()
        }
    };
    if vireo_vmcore::snapshot::state_path(dir).exists() {
        return Reply::error(format!(
            "snapshot to {}: it already holds a snapshot; pick a new directory or delete it first",
            dir.display()
        ))
        .encode();
    }
    let control = running.control();
    let was_running = control.state() == RunState::Running;
    let started = std::time::Instant::now();
    if was_running {
        if let Err(e) = running.pause() {
            return Reply::error(e.to_string()).encode();
        }
    }
    let memory_bytes: u64 = vireo_vmcore::memory::host_mappings(running.memory())
        .iter()
        .map(|(_, size, _)| size)
        .sum();
    let mut last_report = 0u64;
    let mut progress = |done: u64, total: u64| {
        // Big guests: say how far the memory file got, every 256 MiB.
        if total >= 1 << 30 && (done - last_report >= 256 << 20 || done == total) {
            last_report = done;
            tracing::info!("snapshot: {} of {} MiB written", done >> 20, total >> 20);
        }
    };
    // Device threads stop (requests in flight completed, disks flushed)
    // until the memory, the state and the disk copies are written.
    let quiesced = saveable.devices.quiesce();
    let mut disks = Vec::new();
    let result = running
        .capture(saveable.devices, serde_json::Value::Null)
        .map_err(SnapshotCommandError::from)
        .and_then(|mut snap| {
            disks = snapshot_devices::copy_disks(dir, &saveable.attached.disk_files)?;
            snap.config.frontend = frontend(saveable, disks.clone())?;
            Ok(snap)
        })
        .and_then(|snap| match &parent {
            None => {
                vireo_vmcore::snapshot::write(dir, &snap, running.memory(), &mut progress)?;
                running.mark_snapshot_base()?;
                Ok(None)
            }
            Some(parent) => {
                let dirty = running
                    .take_snapshot_dirty()?
                    .ok_or(SnapshotCommandError::NoDirtyLog)?;
                let pages = vireo_vmcore::snapshot::write_diff(
                    dir,
                    &snap,
                    running.memory(),
                    &dirty,
                    parent,
                    &mut progress,
                )?;
                Ok(Some(pages))
            }
        });
    drop(quiesced);
    match &result {
        Ok(_) => *last = Some(dir.to_path_buf()),
        Err(_) => {
            // The pages taken for a failed diff are gone: the next diff
            // would miss them, so it needs a new full snapshot.
            if last.take().is_some() || parent.is_some() {
                running.forget_snapshot_base();
            }
        }
    }
    let pause_ms = started.elapsed().as_millis() as u64;
    if was_running && !stay_paused {
        if let Err(e) = running.resume() {
            tracing::warn!("resuming after the snapshot: {e}");
        }
    }
    match result {
        Ok(pages) => {
            tracing::info!(
                "{} written to {} in {pause_ms} ms",
                if pages.is_some() {
                    "diff snapshot"
                } else {
                    "snapshot"
                },
                dir.display()
            );
            let snapshot = SnapshotReport {
                dir: dir.display().to_string(),
                memory_bytes,
                pause_ms,
                disks: disks
                    .iter()
                    .map(|d| SnapshotDisk {
                        id: d.id.clone(),
                        path: d.path.display().to_string(),
                        format: d.format.to_string(),
                        bytes: d.bytes,
                    })
                    .collect(),
                diff: pages.is_some() && parent.is_some(),
                parent: pages.and(parent.as_ref()).map(|p| p.display().to_string()),
                pages: pages.filter(|_| parent.is_some()),
            };
            Reply {
                snapshot: Some(snapshot),
                ..Reply::ok(state_name(control.state()))
            }
            .encode()
        }
        Err(e) => Reply::error(format!("snapshot to {}: {e}", dir.display())).encode(),
    }
}

/// The `stats` reply's counters: vCPU exits, disk and network I/O.
fn device_stats(vcpus: &VcpuStats, attached: &Attached) -> DeviceStats {
    DeviceStats {
        vcpus: vcpus
            .exits()
            .into_iter()
            .map(|exits| control::VcpuStats { exits })
            .collect(),
        disks: attached
            .disks
            .iter()
            .map(|(id, c)| {
                let s = c.snapshot();
                DiskStats {
                    id: id.clone(),
                    read_bytes: s.read_bytes,
                    write_bytes: s.write_bytes,
                    read_ops: s.read_ops,
                    write_ops: s.write_ops,
                }
            })
            .collect(),
        nets: attached
            .nets
            .iter()
            .map(|(id, c)| {
                let s = c.snapshot();
                NetStats {
                    id: id.clone(),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    rx_packets: s.rx_packets,
                    tx_packets: s.tx_packets,
                }
            })
            .collect(),
    }
}

/// `balloon [MIB]`: set the target if given, and report the balloon.
fn balloon_command(balloon: Option<&BalloonHandle>, target: Option<u64>, state: &str) -> String {
    let Some(b) = balloon else {
        return Reply::error("this VM has no balloon (start it with --balloon)").encode();
    };
    if let Some(mib) = target {
        if let Err(e) = b.set_target_mib(mib) {
            return Reply::error(e.to_string()).encode();
        }
    }
    b.request_stats();
    let stats = b.stats();
    let mib = |f: fn(&BalloonStats) -> Option<u64>| stats.as_ref().and_then(f).map(|v| v >> 20);
    Reply {
        balloon: Some(BalloonStatus {
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            free_mib: mib(|s| s.free_memory),
            available_mib: mib(|s| s.available_memory),
            total_mib: mib(|s| s.total_memory),
        }),
        ..Reply::ok(state)
    }
    .encode()
}

fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Created => "created",
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Exited => "exited",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use vireo_devices::virtio::block::BlockCounters;
    use vireo_devices::virtio::net::NetCounters;

    #[test]
    fn stats_reply_has_the_contracts_shape() {
        let vcpus = VcpuStats::new(2);
        vcpus.count_exit(0);
        vcpus.count_exit(1);
        vcpus.count_exit(1);
        let disk = Arc::new(BlockCounters::default());
        disk.read_bytes.store(4096, Ordering::Relaxed);
        disk.read_ops.store(1, Ordering::Relaxed);
        let net = Arc::new(NetCounters::default());
        net.tx_bytes.store(42, Ordering::Relaxed);
        net.tx_packets.store(1, Ordering::Relaxed);
        let attached = Attached {
            disks: vec![("root".into(), disk)],
            nets: vec![("net0".into(), net)],
            ..Attached::default()
        };
        assert_eq!(
            serde_json::to_value(device_stats(&vcpus, &attached)).unwrap(),
            serde_json::json!({
                "vcpus": [{"exits": 1}, {"exits": 2}],
                "disks": [{"id": "root", "read_bytes": 4096, "write_bytes": 0, "read_ops": 1, "write_ops": 0}],
                "nets": [{"id": "net0", "rx_bytes": 0, "tx_bytes": 42, "rx_packets": 0, "tx_packets": 1}],
            })
        );
    }

    /// The library names the file or setting; the control socket's
    /// reply names the `migrate-to` option.
    #[test]
    fn migrate_to_failures_name_the_commands_options() {
        let addr = crate::migrate::parse_addr("tcp:h:1").unwrap();
        let m = migrate_to_message(&SourceError::NoCa(addr));
        assert!(m.contains("always TLS") && m.contains("--ca CA.pem"), "{m}");
        let m = migrate_to_message(&SourceError::CertWithoutKey);
        assert!(m.contains("--cert and --key"), "{m}");
    }
}
