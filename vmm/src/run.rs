//! Running one machine in this process: build it (boot, restore or
//! migrate in), start it in a fixed order (confinement before any guest
//! code, the Main thread's filter once set-up is done), carry out
//! control-socket commands until it exits; and the snapshot, restore and
//! migration orchestration those commands and starts need.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;
use vireo_api::units::MemorySize;
use vireo_hypervisor::host::HostVirt;
use vireo_hypervisor::{BackendKind, Hypervisor};
use vireo_vmcore::boot::BootSpec;

use vireo_vmcore::vcpu::VcpuStats;
use vireo_vmcore::{ExitReason, RunState, RunningVm, VmConfig, VmControl, VmError};

use crate::backend::{self, Accel, BackendError};
use crate::control_socket::{self, Command, ControlSocket};
use crate::devices::{self, Attached, DeviceConfigs, DeviceError};
use crate::machine::{self, PowerButton};
use crate::migrate::{PemFile, SourceError};
use crate::snapshot_devices::{self, RestoreDevicesError, RestoreOverrides};
use crate::stdout::StdoutWriter;
use vireo_devices::legacy::SerialInput;
use vireo_devices::virtio::balloon::BalloonHandle;
use vireo_devices::virtio::console::ConsoleInput;
use vireo_sandbox::seccomp::{self, SeccompError};
use vireo_vmcore::snapshot::device::DeviceList;
use vireo_vmcore::snapshot::SnapshotError;

/// The machine to run and how it starts.
pub struct VmSpec {
    /// The machine's vCPUs and memory: a boot's, or a migration target's
    /// own definition the source's machine must match (a restore takes
    /// the snapshot's).
    pub vcpus: u32,
    pub memory: MemorySize,
    pub accel: Accel,
    pub start: Start,
    /// The per-thread seccomp filters; `None` runs without any.
    pub seccomp: Option<seccomp::Policy>,
    /// Where to listen for control commands.
    pub control_socket: Option<PathBuf>,
    /// Where `snapshot DIR` may write: beneath this directory only.
    pub snapshot_dir_root: Option<PathBuf>,
}

/// How the machine comes to be.
pub enum Start {
    /// Boot a kernel with these virtio devices.
    Boot {
        boot: BootSpec,
        devices: DeviceConfigs,
    },
    /// Restore the snapshot in `dir` (its memory mapped lazily if `lazy`),
    /// its virtio devices rebuilt from the snapshot's record.
    Restore {
        dir: PathBuf,
        lazy: bool,
        overrides: RestoreOverrides,
    },
    /// Receive a running machine from a source, refused unless it is this
    /// target's own definition: its `devices`, and which network devices
    /// name their MAC (the others take the source's).
    MigrateIn {
        listen: crate::migrate::Listen,
        devices: DeviceConfigs,
        mac_given: Vec<bool>,
    },
}

/// Where the guest's console input comes from.
pub enum GuestConsole {
    /// COM1 (ttyS0).
    Serial(SerialInput),
    /// virtio-console (hvc0).
    Virtio(ConsoleInput),
}

/// What the front end does at fixed points of the start sequence.
pub trait Frontend {
    /// Tell the user something about how the VM runs (a slower backend).
    fn notice(&mut self, message: &str);
    /// An incoming migration listens on `addr` (a supervisor waits for
    /// this to start the source).
    fn migration_listening(&mut self, addr: &str);
    /// The VM is confined and about to start: take the terminal (raw
    /// mode) for the guest console, until the front end is dropped.
    fn take_terminal(&mut self);
    /// Stop the VM cleanly on the signals the front end handles.
    fn stop_on_signals(&mut self, control: Arc<VmControl>);
    /// The vCPUs run: feed the guest console from the user.
    fn started(&mut self, console: GuestConsole, control: Arc<VmControl>);
}

/// Why a VM could not be built or run, or how it ended badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The seccomp filters could not be turned on.
    #[error("{0}")]
    SeccompPolicy(#[source] SeccompError),
    #[error("{0}")]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Boot(VmError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("snapshot {}: {source}", .dir.display())]
    Restore {
        dir: PathBuf,
        #[source]
        source: RestoreError,
    },
    /// The target's own definition does not fit this host.
    #[error(transparent)]
    Machine(#[from] MachineMismatch),
    /// The target cannot listen as asked.
    #[error(transparent)]
    Listen(#[from] crate::migrate::ListenError),
    /// The listener or the incoming migration failed.
    #[error("migration from {uri}: {source}")]
    MigrateIn {
        uri: String,
        #[source]
        source: Box<MigrateInError>,
    },
    #[error("control socket {}: {source}", .path.display())]
    ControlSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(VmError),
    /// The VM ended with a fault or a failure.
    #[error("{0}")]
    Exit(ExitReason),
}

impl Error {
    /// Whether the caller's input is at fault (a file, a definition, a
    /// snapshot), not the VMM or the guest.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Backend(_)
            | Error::Machine(_)
            | Error::Listen(_)
            | Error::MigrateIn { .. }
            | Error::ControlSocket { .. } => true,
            Error::Boot(e) => e.is_user_error(),
            Error::Devices(e) => e.is_user_error(),
            Error::Restore { source, .. } => source.is_user_error(),
            Error::SeccompPolicy(_) | Error::Seccomp(_) | Error::Start(_) | Error::Exit(_) => false,
        }
    }
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Load(SnapshotError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Build(VmError),
    #[error(transparent)]
    Devices(#[from] RestoreDevicesError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A saved state does not fit the rebuilt devices.
    #[error(transparent)]
    State(VmError),
}

impl RestoreError {
    fn is_user_error(&self) -> bool {
        match self {
            RestoreError::Load(_) | RestoreError::Backend(_) | RestoreError::State(_) => true,
            RestoreError::Devices(e) => e.is_user_error(),
            RestoreError::Device(e) => e.is_user_error(),
            RestoreError::Build(_) => false,
        }
    }
}

/// A built machine, not started yet.
pub struct Vmm {
    hv: Box<dyn Hypervisor>,
    machine: machine::Machine,
    attached: Attached,
    control_socket: Option<PathBuf>,
    snapshot_dir_root: Option<PathBuf>,
}

impl Vmm {
    /// Turn the seccomp filters on (before any other thread starts:
    /// restores and migrations start device and post-copy threads), then
    /// build the machine the spec describes. Nothing has run in the guest
    /// yet: the caller confines the process now (the jail), then calls
    /// [`Vmm::run`].
    pub fn build(spec: VmSpec, frontend: &mut dyn Frontend) -> Result<Vmm, Error> {
        if let Some(policy) = spec.seccomp {
            seccomp::enable(policy).map_err(Error::SeccompPolicy)?;
        }
        let fresh_boot = matches!(spec.start, Start::Boot { .. });
        let (hv, machine, attached) = match spec.start {
            Start::MigrateIn {
                listen,
                devices,
                mac_given,
            } => migrate_in(
                frontend,
                &listen,
                devices,
                &mac_given,
                spec.vcpus,
                spec.memory,
                spec.accel,
            )?,
            Start::Restore {
                dir,
                lazy,
                overrides,
            } => restore_machine(&dir, lazy, &overrides, spec.accel)
                .map_err(|source| Error::Restore { dir, source })?,
            Start::Boot { boot, devices } => {
                let hv = backend::open(spec.accel, &boot.kernel, &mut |m| frontend.notice(m))?;
                let cfg = VmConfig {
                    vcpus: spec.vcpus,
                    memory: spec.memory,
                    boot,
                };
                let mut machine = machine::build(hv.as_ref(), &cfg, Box::new(StdoutWriter))
                    .map_err(Error::Boot)?;
                let attached = devices::open(&mut machine, devices)?;
                if let Some(info) = machine.vm.boot_info() {
                    tracing::info!(
                        "booting {}{} {} at {:#x} on {} with {} vCPU(s), {}",
                        info.format,
                        if info.unpacked {
                            " (payload unpacked on the host)"
                        } else {
                            ""
                        },
                        cfg.boot.kernel.display(),
                        info.entry,
                        hv.name(),
                        cfg.vcpus,
                        cfg.memory
                    );
                }
                (hv, machine, attached)
            }
        };
        let host = HostVirt::detect();
        let pvm_guest = machine.vm.boot_info().and_then(|i| i.pvm_guest);
        if fresh_boot
            && hv.kind() == BackendKind::Kvm
            && host.kvm_is_pvm_only()
            && pvm_guest != Some(true)
        {
            frontend.notice(
                "note: /dev/kvm here is PVM (kvm_pvm) on a CPU without VT-x/AMD-V, and this kernel is not PVM-aware: \
                 the host emulates each guest instruction (~1 µs), so a stock distro kernel takes many minutes to boot. \
                 Small guests are fine; for a stock kernel use accel emu (vireo's emulator: seconds for the guest kit), \
                 a PVM guest kernel, or a host with hardware virtualization.",
            );
        }
        Ok(Vmm {
            hv,
            machine,
            attached,
            control_socket: spec.control_socket,
            snapshot_dir_root: spec.snapshot_dir_root,
        })
    }

    /// The host-side handles of the virtio devices (what a jail must keep
    /// reachable).
    pub fn attached(&self) -> &Attached {
        &self.attached
    }

    /// Start the VM and carry out control commands until it exits: `Ok`
    /// when it ended cleanly (or was reset on request).
    pub fn run(self, frontend: &mut dyn Frontend) -> Result<(), Error> {
        // The backend outlives the VM built on it.
        let Vmm {
            hv: _hv,
            machine,
            attached,
            control_socket,
            snapshot_dir_root,
        } = self;
        let machine::Machine {
            vm,
            input,
            power_button,
            devices,
            ..
        } = machine;
        // The thread that starts threads for filtered ones (a device the
        // guest activates from a vCPU), before any vCPU runs.
        seccomp::start_launcher()?;
        frontend.take_terminal();
        let control_socket = match &control_socket {
            Some(path) => Some(
                control_socket::listen(path, snapshot_dir_root.as_deref()).map_err(|source| {
                    Error::ControlSocket {
                        path: path.clone(),
                        source,
                    }
                })?,
            ),
            None => None,
        };
        let control = vm.control();
        let vcpu_stats = vm.vcpu_stats();
        frontend.stop_on_signals(Arc::clone(&control));
        let running = vm.start().map_err(Error::Start)?;
        let console_input = match attached.virtio_console.clone() {
            Some(hvc) => GuestConsole::Virtio(hvc),
            None => GuestConsole::Serial(input),
        };
        frontend.started(console_input, Arc::clone(&control));
        // Set-up is done: the main thread only carries out control commands now.
        seccomp::apply(seccomp::ThreadKind::Main)?;
        let reset_requested = match &control_socket {
            Some(socket) => serve_control(
                &running,
                &power_button,
                &attached,
                &vcpu_stats,
                &Saveable {
                    devices: &devices,
                    attached: &attached,
                },
                socket,
                frontend,
            ),
            None => false,
        };
        let reason = running.wait();
        drop(control_socket);
        match reason {
            // The daemon tells a guest's own reset (restart it, count it
            // against boot loops) from one it asked for by this line.
            ExitReason::Reset if reset_requested => {
                tracing::info!("the VM was reset on request");
                Ok(())
            }
            r if r.is_clean() => {
                tracing::info!("{r}");
                Ok(())
            }
            other => Err(Error::Exit(other)),
        }
    }
}

/// Carry out control-socket commands until the VM exits; whether a
/// `reset` command ended it.
fn serve_control(
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
                    let reply = control_socket::ok_reply_with(
                        state_name(control.state()),
                        serde_json::json!({ "stats": stats_json(vcpu_stats, attached) }),
                    );
                    let _ = pending.reply.send(reply);
                    continue;
                }
            };
            let reply = match result {
                Ok(()) => control_socket::ok_reply(state_name(control.state())),
                Err(e) => control_socket::error_reply(&e.to_string()),
            };
            let _ = pending.reply.send(reply);
        }
    }
}

/// What a snapshot or a migration saves: every device by id (paused
/// around it), and the record of the virtio devices and disks.
struct Saveable<'a> {
    devices: &'a DeviceList,
    attached: &'a Attached,
}

/// The front end's description of the machine recorded with its state:
/// the device ids, the virtio devices (so a restore rebuilds them with no
/// device flags, and a migration target checks its own against them) and
/// the snapshot's disk copies.
fn frontend(saveable: &Saveable<'_>, disks: Vec<snapshot_devices::DiskCopy>) -> serde_json::Value {
    serde_json::to_value(snapshot_devices::FrontendRecord {
        devices: saveable.devices.ids(),
        virtio: saveable.attached.device_set.clone(),
        disks,
    })
    .unwrap_or_default()
}

/// `migrate-to ...`: the reply, and whether the VM now runs on the target.
fn migrate_command(
    running: &RunningVm,
    saveable: &Saveable<'_>,
    req: &crate::migrate::MigrateTo,
) -> (String, bool) {
    tracing::info!("migration to {} started", req.uri);
    // Disks are shared storage: the target's own --disk names the same
    // images (it never opens the paths recorded here).
    match crate::migrate::migrate_to(
        running,
        saveable.devices,
        frontend(saveable, Vec::new()),
        req,
    ) {
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
            (
                control_socket::ok_reply_with(
                    "migrated",
                    serde_json::json!({ "migration": stats }),
                ),
                true,
            )
        }
        Err(e) => {
            tracing::warn!("migration to {} failed: {e}", req.uri);
            (
                control_socket::error_reply(&format!(
                    "migration to {}: {}",
                    req.uri,
                    migrate_to_message(&e)
                )),
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
            return control_socket::error_reply(
                "snapshot --diff needs an earlier snapshot (full or diff) taken by this process as its parent; take a full snapshot first",
            )
        }
    };
    if vireo_vmcore::snapshot::state_path(dir).exists() {
        return control_socket::error_reply(&format!(
            "snapshot to {}: it already holds a snapshot; pick a new directory or delete it first",
            dir.display()
        ));
    }
    let control = running.control();
    let was_running = control.state() == RunState::Running;
    let started = std::time::Instant::now();
    if was_running {
        if let Err(e) = running.pause() {
            return control_socket::error_reply(&e.to_string());
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
        .and_then(|mut snap| {
            disks = snapshot_devices::copy_disks(dir, &saveable.attached.disk_files)
                .map_err(|e| vireo_vmcore::snapshot::SnapshotError::Mismatch(e.to_string()))?;
            snap.config.frontend = frontend(saveable, disks.clone());
            Ok(snap)
        })
        .and_then(|snap| match &parent {
            None => {
                vireo_vmcore::snapshot::write(dir, &snap, running.memory(), &mut progress)?;
                running.mark_snapshot_base()?;
                Ok(None)
            }
            Some(parent) => {
                let dirty = running.take_snapshot_dirty()?.ok_or_else(|| {
                    vireo_vmcore::VmError::Device(
                        "dirty page tracking is off; take a full snapshot first".into(),
                    )
                })?;
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
            let mut snapshot = serde_json::json!({
                "dir": dir.display().to_string(),
                "memory_bytes": memory_bytes,
                "pause_ms": pause_ms,
                "disks": disks.iter().map(|d| serde_json::json!({
                    "id": d.id,
                    "path": d.path.display().to_string(),
                    "format": d.format,
                    "bytes": d.bytes,
                })).collect::<Vec<_>>(),
            });
            if let (Some(pages), Some(parent), Some(obj)) =
                (pages, &parent, snapshot.as_object_mut())
            {
                obj.insert("diff".into(), true.into());
                obj.insert("parent".into(), parent.display().to_string().into());
                obj.insert("pages".into(), pages.into());
            }
            control_socket::ok_reply_with(
                state_name(control.state()),
                serde_json::json!({ "snapshot": snapshot }),
            )
        }
        Err(e) => control_socket::error_reply(&format!("snapshot to {}: {e}", dir.display())),
    }
}

/// A restore: check the snapshot in `dir` whole, open its backend, load
/// its memory (or map it, `lazy`) and build the machine in the saved
/// state, its virtio devices included (see [`restore_virtio`]).
fn restore_machine(
    dir: &Path,
    lazy: bool,
    overrides: &RestoreOverrides,
    accel: Accel,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), RestoreError> {
    let loaded = vireo_vmcore::snapshot::load(dir).map_err(RestoreError::Load)?;
    let backend = loaded.snapshot.config.backend;
    let hv = backend::for_saved(backend, accel)?;
    let started = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        if total >= 1 << 30 && done % (256 << 20) == 0 {
            tracing::info!("restore: {} of {} MiB read", done >> 20, total >> 20);
        }
    };
    let memory = loaded
        .memory(lazy, &mut progress)
        .map_err(RestoreError::Load)?;
    let mut machine = machine::restore(hv.as_ref(), &loaded, memory, Box::new(StdoutWriter))
        .map_err(RestoreError::Build)?;
    let attached = restore_virtio(&mut machine, &loaded.snapshot, overrides, dir)?;
    tracing::info!(
        "restored {} ({} vCPU(s), {} on {}) in {} ms{}",
        dir.display(),
        loaded.snapshot.config.vcpus,
        loaded.snapshot.config.memory,
        backend,
        started.elapsed().as_millis(),
        if lazy { ", memory mapped lazily" } else { "" }
    );
    Ok((hv, machine, attached))
}

/// Rebuild the virtio devices a snapshot records (disks rolled back, or
/// the `overrides`) and load every device's saved state.
fn restore_virtio(
    machine: &mut machine::Machine,
    snap: &vireo_vmcore::snapshot::VmSnapshot,
    overrides: &RestoreOverrides,
    dir: &Path,
) -> Result<Attached, RestoreError> {
    let configs = snapshot_devices::restore_configs(dir, &snap.config.frontend, overrides)?;
    let attached = devices::open(machine, configs)?;
    // A saved state that does not fit the rebuilt devices (a damaged
    // snapshot, an override of another size) is the caller's to fix.
    machine::restore_devices(machine, snap).map_err(RestoreError::State)?;
    Ok(attached)
}

/// Build a migrated machine from its state and memory: the vCPUs and
/// platform, then the virtio devices of this target's own definition
/// (checked against the source's record again: the state's record is
/// the one the configuration carried), then every device's state.
fn build_migrated(
    hv: &dyn Hypervisor,
    loaded: &vireo_vmcore::snapshot::LoadedSnapshot,
    memory: vireo_vmcore::memory::GuestMemory,
    own: &DeviceConfigs,
    mac_given: &[bool],
) -> Result<(machine::Machine, Attached), MigrateInError> {
    let configs = snapshot_devices::migrated_configs(
        &loaded.snapshot.config.frontend,
        own.clone(),
        mac_given,
    )
    .map_err(MigrateInError::Devices)?;
    let mut machine = machine::restore(hv, loaded, memory, Box::new(StdoutWriter))
        .map_err(MigrateInError::Build)?;
    let attached = devices::open(&mut machine, configs)?;
    machine::restore_devices(&machine, &loaded.snapshot).map_err(MigrateInError::State)?;
    Ok((machine, attached))
}

/// Why an incoming migration failed after its listener was checked.
#[derive(Debug, thiserror::Error)]
pub enum MigrateInError {
    #[error(transparent)]
    Target(#[from] crate::migrate::TargetError),
    #[error(transparent)]
    Postcopy(#[from] crate::migrate::PostcopyError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// This target's devices do not match the source's record.
    #[error(transparent)]
    Devices(#[from] snapshot_devices::PeerDevicesError),
    #[error("cannot build the migrated VM: {0}")]
    Build(#[source] VmError),
    #[error(transparent)]
    Open(#[from] DeviceError),
    #[error("the migrated device state does not fit: {0}")]
    State(#[source] VmError),
}

/// How a machine differs from this target's definition or does not fit
/// this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineMismatch {
    #[error("the source's VM has {source_vcpus} vCPU(s), this target's definition {own}")]
    Vcpus { source_vcpus: u32, own: u32 },
    #[error("the source's VM has {source_memory} of memory, this target's definition {own}")]
    Memory {
        source_memory: MemorySize,
        own: MemorySize,
    },
    #[error("{vcpus} vCPUs: this backend runs 1 to {max} vCPUs")]
    VcpusOutOfRange { vcpus: u32, max: u32 },
    #[error("{memory} of memory: at least {min} MiB")]
    TooLittleMemory { memory: MemorySize, min: u64 },
    #[error("{memory} of memory: more than this host's {host} MiB of RAM and swap")]
    MoreThanHost { memory: MemorySize, host: u64 },
}

/// The machine a source offers, checked against this target's own
/// definition (its vCPUs and memory) and the host before any memory is
/// allocated: equal vCPUs and memory, within the backend's vCPU limit and
/// the host's memory (RAM plus swap).
fn check_offered_machine(
    config: &vireo_vmcore::snapshot::MachineConfig,
    cpus: u32,
    memory: MemorySize,
    max_vcpus: u32,
    host_memory_mib: Option<u64>,
) -> Result<(), MachineMismatch> {
    if config.vcpus != cpus {
        return Err(MachineMismatch::Vcpus {
            source_vcpus: config.vcpus,
            own: cpus,
        });
    }
    if config.memory != memory {
        return Err(MachineMismatch::Memory {
            source_memory: config.memory,
            own: memory,
        });
    }
    check_fits_host(cpus, memory, max_vcpus, host_memory_mib)
}

/// vCPUs within the backend's limit, memory within the host's.
fn check_fits_host(
    cpus: u32,
    memory: MemorySize,
    max_vcpus: u32,
    host_memory_mib: Option<u64>,
) -> Result<(), MachineMismatch> {
    if cpus == 0 || cpus > max_vcpus {
        return Err(MachineMismatch::VcpusOutOfRange {
            vcpus: cpus,
            max: max_vcpus,
        });
    }
    if memory.mib() < vireo_vmcore::vm::MIN_MEMORY_MIB {
        return Err(MachineMismatch::TooLittleMemory {
            memory,
            min: vireo_vmcore::vm::MIN_MEMORY_MIB,
        });
    }
    if let Some(host) = host_memory_mib {
        if memory.mib() > host {
            return Err(MachineMismatch::MoreThanHost { memory, host });
        }
    }
    Ok(())
}

/// An incoming migration: check this target's own definition, receive
/// the machine from a source (refused unless it is that machine), build
/// it from the target's own devices, acknowledge.
fn migrate_in(
    frontend: &mut dyn Frontend,
    listen: &crate::migrate::Listen,
    own: DeviceConfigs,
    mac_given: &[bool],
    cpus: u32,
    memory: MemorySize,
    accel: Accel,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), Error> {
    let uri = listen.uri.as_str();
    let own_set = snapshot_devices::DeviceSet::from_configs(&own);
    let host_mib = vireo_hypervisor::host::host_memory_bytes().map(|b| b >> 20);
    check_fits_host(cpus, memory, vireo_vmcore::vm::MAX_VCPUS_XAPIC, host_mib)?;
    crate::migrate::check_listen(listen)?;
    let check =
        |config: &vireo_vmcore::snapshot::MachineConfig| -> Result<(), crate::migrate::Refusal> {
            let hv = backend::for_saved(config.backend, accel)?;
            let max = (hv.max_vcpus() as u32).min(vireo_vmcore::vm::MAX_VCPUS_XAPIC);
            check_offered_machine(config, cpus, memory, max, host_mib)?;
            snapshot_devices::check_peer_record(&config.frontend, &own_set, mac_given)?;
            Ok(())
        };
    let refused = |source: MigrateInError| Error::MigrateIn {
        uri: uri.to_string(),
        source: Box::new(source),
    };
    let started = std::time::Instant::now();
    let incoming = crate::migrate::receive(listen, &check, &mut |addr| {
        frontend.migration_listening(addr)
    })
    .map_err(|e| refused(e.into()))?;
    let config = incoming.loaded.snapshot.config.clone();
    let hv = match backend::for_saved(config.backend, accel) {
        Ok(hv) => hv,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(refused(e.into()));
        }
    };
    if incoming.postcopy.is_some() {
        // Post-copy: guest memory is armed before anything (the device
        // restore included) touches a page that is still at the source.
        let loaded = vireo_vmcore::snapshot::LoadedSnapshot::without_memory(
            incoming.loaded.snapshot.clone(),
        );
        let memory = incoming.memory.clone();
        let target = incoming.start_postcopy().map_err(|e| refused(e.into()))?;
        let (machine, attached) =
            match build_migrated(hv.as_ref(), &loaded, memory, &own, mac_given) {
                Ok(m) => m,
                Err(e) => {
                    target.refuse(&e.to_string());
                    return Err(refused(e));
                }
            };
        target.ack(machine.vm.control());
        tracing::info!(
            "migrated in (post-copy): {} vCPU(s), {} on {} ({} ms after listening); \
             the rest of memory follows while the guest runs",
            config.vcpus,
            config.memory,
            config.backend,
            started.elapsed().as_millis()
        );
        return Ok((hv, machine, attached));
    }
    let (machine, attached) = match build_migrated(
        hv.as_ref(),
        &incoming.loaded,
        incoming.memory.clone(),
        &own,
        mac_given,
    ) {
        Ok(m) => m,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(refused(e));
        }
    };
    incoming.ack().map_err(|e| refused(e.into()))?;
    tracing::info!(
        "migrated in: {} vCPU(s), {} on {} ({} ms after listening)",
        config.vcpus,
        config.memory,
        config.backend,
        started.elapsed().as_millis()
    );
    Ok((hv, machine, attached))
}

/// The `stats` reply's counters: vCPU exits, disk and network I/O.
fn stats_json(vcpus: &VcpuStats, attached: &Attached) -> serde_json::Value {
    let vcpus: Vec<_> = vcpus
        .exits()
        .into_iter()
        .map(|exits| serde_json::json!({ "exits": exits }))
        .collect();
    let disks: Vec<_> = attached
        .disks
        .iter()
        .map(|(id, c)| {
            let s = c.snapshot();
            serde_json::json!({
                "id": id,
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "read_ops": s.read_ops,
                "write_ops": s.write_ops,
            })
        })
        .collect();
    let nets: Vec<_> = attached
        .nets
        .iter()
        .map(|(id, c)| {
            let s = c.snapshot();
            serde_json::json!({
                "id": id,
                "rx_bytes": s.rx_bytes,
                "tx_bytes": s.tx_bytes,
                "rx_packets": s.rx_packets,
                "tx_packets": s.tx_packets,
            })
        })
        .collect();
    serde_json::json!({ "vcpus": vcpus, "disks": disks, "nets": nets })
}

/// `balloon [MIB]`: set the target if given, and report the balloon.
fn balloon_command(balloon: Option<&BalloonHandle>, target: Option<u64>, state: &str) -> String {
    let Some(b) = balloon else {
        return control_socket::error_reply("this VM has no balloon (start it with --balloon)");
    };
    if let Some(mib) = target {
        if let Err(e) = b.set_target_mib(mib) {
            return control_socket::error_reply(&e.to_string());
        }
    }
    b.request_stats();
    let stats = b.stats();
    control_socket::ok_reply_with(
        state,
        serde_json::json!({"balloon": {
            "target_mib": b.target_mib(),
            "actual_mib": b.actual_mib(),
            "free_mib": stats.as_ref().and_then(|s| s.free_memory).map(|v| v >> 20),
            "available_mib": stats.as_ref().and_then(|s| s.available_memory).map(|v| v >> 20),
            "total_mib": stats.as_ref().and_then(|s| s.total_memory).map(|v| v >> 20),
        }}),
    )
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
            stats_json(&vcpus, &attached),
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

    fn mib(n: u64) -> MemorySize {
        MemorySize::from_mib(n).unwrap()
    }

    fn offered(vcpus: u32, memory_mib: u64) -> vireo_vmcore::snapshot::MachineConfig {
        vireo_vmcore::snapshot::MachineConfig {
            backend: BackendKind::Emu,
            vcpus,
            memory: mib(memory_mib),
            frontend: serde_json::Value::Null,
        }
    }

    /// A forged configuration of 4 TiB (or other vCPUs) is refused by the
    /// check that runs before guest memory is allocated.
    #[test]
    fn the_offered_machine_must_be_the_targets_own_and_fit_the_host() {
        let four_tib = 4 << 20;
        let e =
            check_offered_machine(&offered(1, four_tib), 1, mib(64), 64, Some(8192)).unwrap_err();
        assert_eq!(
            e,
            MachineMismatch::Memory {
                source_memory: mib(four_tib),
                own: mib(64)
            }
        );
        assert!(e.to_string().contains("4194304 MiB"), "{e}");
        let e = check_offered_machine(&offered(4, 64), 1, mib(64), 64, Some(8192)).unwrap_err();
        assert!(e.to_string().contains("4 vCPU(s)"), "{e}");
        // Even a target defined that big is refused by the host check.
        let e = check_offered_machine(&offered(1, four_tib), 1, mib(four_tib), 64, Some(8192))
            .unwrap_err();
        assert!(e.to_string().contains("more than this host"), "{e}");
        let e =
            check_offered_machine(&offered(300, 64), 300, mib(64), 254, Some(8192)).unwrap_err();
        assert!(e.to_string().contains("1 to 254"), "{e}");
        assert!(check_offered_machine(&offered(2, 64), 2, mib(64), 64, Some(8192)).is_ok());
    }
}
