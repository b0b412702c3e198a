//! `vireo run`: boot one guest in this process.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;
use vireo_emulator::EmuHypervisor;
use vireo_hypervisor::host::HostVirt;
use vireo_hypervisor::kvm::KvmHypervisor;
use vireo_hypervisor::Hypervisor;
use vireo_vmcore::boot::BootSpec;

use vireo_vmcore::vcpu::VcpuStats;
use vireo_vmcore::{ExitReason, RunState, RunningVm, VmConfig};

use crate::cli::RunArgs;
use crate::console::{self, RawTerminal, StdoutWriter};
use crate::control_socket::{self, ControlSocket};
use crate::devices::{self, Attached};
use crate::image::GuestKit;
use crate::machine::{self, PowerButton};
use crate::signals;
use crate::snapshot_devices;
use crate::Failure;
use vireo_api::control::{
    self, Command, DeviceStats, DiskStats, MigrateTo, MigrationStats, NetStats, PostcopyStats,
    Reply, SnapshotReport,
};
use vireo_api::model::{BalloonStatus, SnapshotDisk};
use vireo_api::units::MemorySize;
use vireo_api::vm::{check_resources, Accel, HostLimits, MAX_VCPUS};
use vireo_devices::virtio::balloon::{BalloonHandle, BalloonStats};
use vireo_vmcore::snapshot::SharedSnapshottable;

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=k";

/// Resolve kernel, initrd and command line from the flags and the kit.
fn boot_spec(args: &RunArgs) -> Result<BootSpec, Failure> {
    let (kernel, initrd, cmdline) = match (&args.image, &args.kernel) {
        (Some(dir), _) => {
            let kit = GuestKit::open(dir).map_err(|e| Failure::Usage(e.to_string()))?;
            (kit.kernel, args.initrd.clone().or(Some(kit.initrd)), kit.cmdline)
        }
        (None, Some(kernel)) => (kernel.clone(), args.initrd.clone(), DEFAULT_CMDLINE.to_string()),
        (None, None) => {
            return Err(Failure::Usage(
                "nothing to boot — pass --kernel PATH or --image DIR (make one with `vireo image build`)".into(),
            ))
        }
    };
    let mut cmdline = args.cmdline.clone().unwrap_or(cmdline);
    if let Some(extra) = &args.append {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    for (flag, path) in [("--kernel", Some(&kernel)), ("--initrd", initrd.as_ref())] {
        if let Some(p) = path {
            check_readable(flag, p)?;
        }
    }
    Ok(BootSpec {
        kernel,
        initrd,
        cmdline,
        vcpus: args.cpus(),
    })
}

fn check_readable(flag: &str, path: &PathBuf) -> Result<(), Failure> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Failure::Usage(format!(
            "{flag} {}: not a regular file",
            path.display()
        ))),
        Err(e) => Err(Failure::Usage(format!("{flag} {}: {e}", path.display()))),
    }
}

/// Open the backend `--accel` asks for. `auto` takes KVM when it can run
/// this kernel at hardware speed and the emulator otherwise, and says so.
fn open_backend(accel: Accel, kernel: &std::path::Path) -> Result<Box<dyn Hypervisor>, Failure> {
    match accel {
        Accel::Kvm => KvmHypervisor::new()
            .map(|kvm| Box::new(kvm) as Box<dyn Hypervisor>)
            .map_err(|e| Failure::Usage(e.to_string())),
        Accel::Emu => Ok(Box::new(EmuHypervisor::new())),
        Accel::Auto => {
            let kvm = match KvmHypervisor::new() {
                Ok(kvm) => kvm,
                Err(e) => {
                    eprintln!("vireo: KVM is not usable ({e}); running on the emulator (--accel emu), which is much slower");
                    return Ok(Box::new(EmuHypervisor::new()));
                }
            };
            if HostVirt::detect().kvm_is_pvm_only() && !kernel_is_pvm_guest(kernel) {
                eprintln!(
                    "vireo: /dev/kvm here is PVM (kvm_pvm) without VT-x/AMD-V and this kernel is not a PVM guest, \
                     so KVM would emulate every instruction in the host kernel; running on vireo's emulator instead \
                     (--accel kvm forces KVM)"
                );
                return Ok(Box::new(EmuHypervisor::new()));
            }
            Ok(Box::new(kvm))
        }
    }
}

/// Does the kernel image say it is PVM-aware? (Only uncompressed images
/// can tell; a bzImage counts as not.)
fn kernel_is_pvm_guest(kernel: &std::path::Path) -> bool {
    std::fs::read(kernel)
        .ok()
        .and_then(|image| vireo_vmcore::boot::kernel::mentions_pvm_guest(&image))
        .unwrap_or(false)
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    // First, while single-threaded: the jail's cgroup, namespaces and
    // supervisor (only the VMM child returns).
    crate::jail_run::enter(&args)?;
    // Then, before any other thread starts (restores and migrations start
    // device and post-copy threads; enabling starts the launcher thread):
    // every thread installs its kind's filter.
    install_seccomp_policy(&args)?;
    let vm_failure = |e: vireo_vmcore::VmError| {
        if let vireo_vmcore::VmError::Limit { source, .. } = &e {
            Failure::Usage(crate::cli::limit_usage(source))
        } else if e.is_user_error() {
            Failure::Usage(e.to_string())
        } else {
            Failure::Vm(e.to_string())
        }
    };
    let (hv, machine, attached) = match (&args.restore, &args.migrate_from) {
        (_, Some(uri)) => migrate_in(&args, uri)?,
        (Some(dir), None) => restore_machine(&args, dir)?,
        (None, None) => {
            let spec = boot_spec(&args)?;
            let hv = open_backend(args.accel, &spec.kernel)?;
            let cfg = VmConfig {
                vcpus: args.cpus(),
                memory_mib: args.memory(),
                boot: spec,
            };
            let mut machine =
                machine::build(hv.as_ref(), &cfg, Box::new(StdoutWriter)).map_err(vm_failure)?;
            let attached = devices::attach(&mut machine, &args)?;
            if let Some(info) = machine.vm.boot_info() {
                tracing::info!(
                    "booting {}{} {} at {:#x} on {} with {} vCPU(s), {} MiB",
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
                    cfg.memory_mib
                );
            }
            (hv, machine, attached)
        }
    };
    let machine::Machine {
        vm,
        input,
        power_button,
        snapshot_devices,
        virtio,
        ..
    } = machine;

    let host = HostVirt::detect();
    let pvm_guest = vm.boot_info().and_then(|i| i.pvm_guest);
    if args.restore.is_none()
        && args.migrate_from.is_none()
        && hv.name() == "kvm"
        && host.kvm_is_pvm_only()
        && pvm_guest != Some(true)
    {
        eprintln!(
            "vireo: note: /dev/kvm here is PVM (kvm_pvm) on a CPU without VT-x/AMD-V, and this kernel is not PVM-aware: \
             the host emulates each guest instruction (~1 µs), so a stock distro kernel takes many minutes to boot. \
             Small guests are fine; for a stock kernel use --accel emu (vireo's emulator: seconds for the guest kit), \
             a PVM guest kernel, or a host with hardware virtualization."
        );
    }

    // Everything is open and no guest code ran: into the jail, before the
    // control socket and the vCPUs start.
    crate::jail_run::lock_down(&args, &attached)?;
    // Then the thread that starts threads for filtered ones (a device the
    // guest activates from a vCPU), before any vCPU runs.
    vireo_sandbox::seccomp::start_launcher().map_err(|e| Failure::Vm(e.to_string()))?;

    let tty = console::stdin_is_tty();
    let raw = if tty {
        match RawTerminal::enable() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("console: cannot put the terminal in raw mode: {e}");
                None
            }
        }
    } else {
        None
    };
    let control_socket = match &args.control_socket {
        Some(path) => Some(
            control_socket::listen(path, args.snapshot_dir_root.as_deref())
                .map_err(|e| Failure::Usage(format!("--control-socket {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let control = vm.control();
    let vcpu_stats = vm.vcpu_stats();
    if let Err(e) = signals::stop_vm_on_signals(Arc::clone(&control)) {
        tracing::warn!("SIGTERM will not stop the VM cleanly: {e}");
    }
    let running = vm.start().map_err(|e| Failure::Vm(e.to_string()))?;
    let console_input = match attached.virtio_console.clone() {
        Some(hvc) => console::ConsoleTarget::Virtio(hvc),
        None => console::ConsoleTarget::Serial(input),
    };
    console::spawn_stdin_pump(console_input, Arc::clone(&control), tty);
    // Set-up is done: the main thread only carries out control commands now.
    vireo_sandbox::seccomp::apply(vireo_sandbox::seccomp::ThreadKind::Main)
        .map_err(|e| Failure::Vm(e.to_string()))?;
    let reset_requested = match &control_socket {
        Some(socket) => serve_control(
            &running,
            &power_button,
            &attached,
            &vcpu_stats,
            &Saveable {
                devices: &snapshot_devices,
                virtio: &virtio,
                attached: &attached,
            },
            socket,
        ),
        None => false,
    };
    let reason = running.wait();
    drop(control_socket);
    drop(raw);
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
        ExitReason::TripleFault { .. } | ExitReason::Failed(_) => {
            Err(Failure::Vm(reason.to_string()))
        }
        other => Err(Failure::Vm(other.to_string())),
    }
}

/// Turn the per-thread seccomp filters on (the default) or, with
/// `--no-seccomp`, say what is lost.
fn install_seccomp_policy(args: &RunArgs) -> Result<(), Failure> {
    use vireo_sandbox::seccomp;
    if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VM's threads run without seccomp filters; a guest that takes over a vCPU \
             or device thread can make any syscall (open host files, exec programs, make sockets)"
        );
        return Ok(());
    }
    let mut policy = seccomp::Policy::from_env();
    // The jail drops the whole process to its ids after threads run.
    if args.jail {
        let ids = crate::jail_run::ids(args);
        policy.drop_to = Some(seccomp::DropTo {
            uid: ids.uid,
            gid: ids.gid,
        });
    }
    seccomp::enable(policy).map_err(|e| {
        Failure::Vm(format!(
            "{e} (--no-seccomp runs without filters, for debugging)"
        ))
    })
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
                        eprintln!("vireo: migrated to {}", req.uri);
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

/// What a snapshot or a migration saves: every device by id, the virtio
/// functions to quiesce, and the record of the virtio devices and disks.
struct Saveable<'a> {
    devices: &'a [(String, SharedSnapshottable)],
    virtio: &'a machine::VirtioFunctions,
    attached: &'a Attached,
}

/// The front end's description of the machine recorded with its state:
/// the device ids, the virtio devices (so a restore rebuilds them with no
/// device flags, and a migration target checks its own against them) and
/// the snapshot's disk copies.
fn frontend(saveable: &Saveable<'_>, disks: Vec<snapshot_devices::DiskCopy>) -> serde_json::Value {
    serde_json::to_value(snapshot_devices::FrontendRecord {
        devices: saveable.devices.iter().map(|(id, _)| id.clone()).collect(),
        virtio: saveable.attached.device_set.clone(),
        disks,
    })
    .unwrap_or_default()
}

/// `migrate-to ...`: the reply, and whether the VM now runs on the target.
fn migrate_command(
    running: &RunningVm,
    saveable: &Saveable<'_>,
    req: &MigrateTo,
) -> (String, bool) {
    tracing::info!("migration to {} started", req.uri);
    // Disks are shared storage: the target's own --disk names the same
    // images (it never opens the paths recorded here).
    match crate::migrate::migrate_to(
        running,
        saveable.devices,
        saveable.virtio,
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
                Reply::error(format!("migration to {}: {e}", req.uri)).encode(),
                false,
            )
        }
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
    let quiesced = saveable.virtio.quiesce();
    let mut disks = Vec::new();
    let result = running
        .capture(saveable.devices, serde_json::Value::Null)
        .and_then(|mut snap| {
            disks = snapshot_devices::copy_disks(dir, &saveable.attached.disk_files)
                .map_err(vireo_vmcore::snapshot::SnapshotError::Mismatch)?;
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

/// `--restore DIR`: check the snapshot whole, open its backend, load its
/// memory (or map it with `--restore-lazy`) and build the machine in the
/// saved state, its virtio devices included (see [`restore_virtio`]).
fn restore_machine(
    args: &RunArgs,
    dir: &std::path::Path,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), Failure> {
    snapshot_devices::check_restore_flags(args, "--restore takes the machine from the snapshot")?;
    let loaded = vireo_vmcore::snapshot::load(dir)
        .map_err(|e| Failure::Usage(format!("--restore {}: {e}", dir.display())))?;
    let backend = loaded.snapshot.config.backend.clone();
    let hv = backend_for(&backend, args.accel)
        .map_err(|e| Failure::Usage(format!("--restore {}: {e}", dir.display())))?;
    let started = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        if total >= 1 << 30 && done % (256 << 20) == 0 {
            tracing::info!("restore: {} of {} MiB read", done >> 20, total >> 20);
        }
    };
    let memory = loaded
        .memory(args.restore_lazy, &mut progress)
        .map_err(|e| Failure::Usage(format!("--restore {}: {e}", dir.display())))?;
    let mut machine = machine::restore(hv.as_ref(), &loaded, memory, Box::new(StdoutWriter))
        .map_err(|e| Failure::Vm(format!("--restore {}: {e}", dir.display())))?;
    let attached = restore_virtio(&mut machine, &loaded.snapshot, args, dir)?;
    tracing::info!(
        "restored {} ({} vCPU(s), {} MiB on {}) in {} ms{}",
        dir.display(),
        loaded.snapshot.config.vcpus,
        loaded.snapshot.config.memory_mib,
        backend,
        started.elapsed().as_millis(),
        if args.restore_lazy {
            ", memory mapped lazily"
        } else {
            ""
        }
    );
    Ok((hv, machine, attached))
}

/// Rebuild the virtio devices a snapshot records (disks rolled back, or
/// the overrides `args` gives) and load every device's saved state.
fn restore_virtio(
    machine: &mut machine::Machine,
    snap: &vireo_vmcore::snapshot::VmSnapshot,
    args: &RunArgs,
    dir: &std::path::Path,
) -> Result<Attached, Failure> {
    let configs = snapshot_devices::restore_configs(dir, &snap.config.frontend, args)?;
    let attached = devices::open(machine, configs)?;
    // A saved state that does not fit the rebuilt devices (a damaged
    // snapshot, an override of another size) is the caller's to fix.
    machine::restore_devices(machine, snap)
        .map_err(|e| Failure::Usage(format!("--restore {}: {e}", dir.display())))?;
    Ok(attached)
}

/// The backend a saved machine of `backend` runs on under `--accel`.
fn backend_for(backend: &str, accel: Accel) -> Result<Box<dyn Hypervisor>, String> {
    match (backend, accel) {
        ("kvm", Accel::Kvm | Accel::Auto) => KvmHypervisor::new()
            .map(|k| Box::new(k) as Box<dyn Hypervisor>)
            .map_err(|e| e.to_string()),
        ("emu", Accel::Emu | Accel::Auto) => Ok(Box::new(EmuHypervisor::new())),
        (saved, accel) => Err(format!(
            "the VM ran on the {saved} backend; it cannot run on --accel {}",
            format!("{accel:?}").to_lowercase()
        )),
    }
}

/// Build a migrated machine from its state and memory: the vCPUs and
/// platform, then the virtio devices of this target's own definition
/// (checked against the source's record again: the state's record is
/// the one the configuration carried), then every device's state.
fn build_migrated(
    hv: &dyn Hypervisor,
    loaded: &vireo_vmcore::snapshot::LoadedSnapshot,
    memory: vireo_vmcore::memory::GuestMemory,
    own: &crate::devices::DeviceConfigs,
    mac_given: &[bool],
) -> Result<(machine::Machine, Attached), String> {
    let configs = snapshot_devices::migrated_configs(
        &loaded.snapshot.config.frontend,
        own.clone(),
        mac_given,
    )?;
    let mut machine = machine::restore(hv, loaded, memory, Box::new(StdoutWriter))
        .map_err(|e| format!("cannot build the migrated VM: {e}"))?;
    let attached = devices::open(&mut machine, configs).map_err(|e| e.to_string())?;
    machine::restore_devices(&machine, &loaded.snapshot)
        .map_err(|e| format!("the migrated device state does not fit: {e}"))?;
    Ok((machine, attached))
}

/// The machine a source offers, checked against this target's own
/// definition (`--cpus`, `--memory`) and the host before any memory is
/// allocated: equal vCPUs and memory, within the backend's vCPU limit and
/// the host's memory (RAM plus swap).
pub(crate) fn check_offered_machine(
    config: &vireo_vmcore::snapshot::MachineConfig,
    cpus: u32,
    memory_mib: u64,
    max_vcpus: u32,
    host_memory_mib: Option<u64>,
) -> Result<(), String> {
    if config.vcpus != cpus {
        return Err(format!(
            "the source's VM has {} vCPU(s), this target's definition {cpus} (--cpus)",
            config.vcpus
        ));
    }
    if config.memory_mib != memory_mib {
        return Err(format!(
            "the source's VM has {} MiB of memory, this target's definition {memory_mib} MiB (--memory)",
            config.memory_mib
        ));
    }
    check_fits_host(cpus, memory_mib, max_vcpus, host_memory_mib)
}

/// vCPUs within the backend's limit, memory within the host's: the
/// definition check every VM passes (`vireo_api::vm`), in the flags' words.
fn check_fits_host(
    cpus: u32,
    memory_mib: u64,
    max_vcpus: u32,
    host_memory_mib: Option<u64>,
) -> Result<(), String> {
    let mib = |m: u64| MemorySize::from_mib(m).map_err(|e| format!("--memory {m}: {e}"));
    let memory = mib(memory_mib)?;
    let host = host_memory_mib.map(mib).transpose()?;
    check_resources(cpus, memory, HostLimits::new(max_vcpus, host))
        .map_err(|e| crate::cli::limit_usage(&e))
}

/// `--migrate-from ADDR`: check this target's own definition, receive the
/// machine from a source (refused unless it is that machine), build it
/// from the target's own devices, acknowledge.
fn migrate_in(
    args: &RunArgs,
    uri: &str,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), Failure> {
    snapshot_devices::check_migrate_flags(args)?;
    let own = devices::parse(args)?;
    let own_set = snapshot_devices::DeviceSet::from_configs(&own);
    let mac_given = snapshot_devices::macs_given(args);
    let (cpus, memory_mib) = (args.cpus(), args.memory());
    let host_mib = vireo_api::host::memory().map(MemorySize::mib);
    check_fits_host(cpus, memory_mib, MAX_VCPUS, host_mib).map_err(Failure::Usage)?;
    let secret = args
        .migrate_secret_file
        .as_deref()
        .map(|f| crate::migrate::read_secret("--migrate-secret-file", f))
        .transpose()
        .map_err(Failure::Usage)?;
    let listen = crate::migrate::Listen {
        uri: uri.to_string(),
        tls: args
            .migrate_tls_cert
            .clone()
            .zip(args.migrate_tls_key.clone()),
        client_ca: args.migrate_client_ca.clone(),
        secret,
    };
    crate::migrate::check_listen(&listen).map_err(Failure::Usage)?;
    let accel = args.accel;
    let check = |config: &vireo_vmcore::snapshot::MachineConfig| {
        let hv = backend_for(&config.backend, accel)?;
        let max = (hv.max_vcpus() as u32).min(MAX_VCPUS);
        check_offered_machine(config, cpus, memory_mib, max, host_mib)?;
        snapshot_devices::check_peer_record(&config.frontend, &own_set, &mac_given)
    };
    let started = std::time::Instant::now();
    let incoming = crate::migrate::receive(&listen, &check).map_err(Failure::Usage)?;
    let config = incoming.loaded.snapshot.config.clone();
    let hv = match backend_for(&config.backend, accel) {
        Ok(hv) => hv,
        Err(e) => {
            incoming.refuse(&e);
            return Err(Failure::Usage(format!("--migrate-from {uri}: {e}")));
        }
    };
    if incoming.postcopy.is_some() {
        // Post-copy: guest memory is armed before anything (the device
        // restore included) touches a page that is still at the source.
        let loaded = vireo_vmcore::snapshot::LoadedSnapshot::without_memory(
            incoming.loaded.snapshot.clone(),
        );
        let memory = incoming.memory.clone();
        let target = incoming
            .start_postcopy()
            .map_err(|e| Failure::Usage(format!("--migrate-from {uri}: {e}")))?;
        let (machine, attached) =
            match build_migrated(hv.as_ref(), &loaded, memory, &own, &mac_given) {
                Ok(m) => m,
                Err(msg) => {
                    target.refuse(&msg);
                    return Err(Failure::Usage(format!("--migrate-from {uri}: {msg}")));
                }
            };
        target.ack(machine.vm.control());
        tracing::info!(
            "migrated in (post-copy): {} vCPU(s), {} MiB on {} ({} ms after listening); \
             the rest of memory follows while the guest runs",
            config.vcpus,
            config.memory_mib,
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
        &mac_given,
    ) {
        Ok(m) => m,
        Err(msg) => {
            incoming.refuse(&msg);
            return Err(Failure::Usage(format!("--migrate-from {uri}: {msg}")));
        }
    };
    incoming
        .ack()
        .map_err(|e| Failure::Usage(format!("--migrate-from {uri}: {e}")))?;
    tracing::info!(
        "migrated in: {} vCPU(s), {} MiB on {} ({} ms after listening)",
        config.vcpus,
        config.memory_mib,
        config.backend,
        started.elapsed().as_millis()
    );
    Ok((hv, machine, attached))
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

    fn offered(vcpus: u32, memory_mib: u64) -> vireo_vmcore::snapshot::MachineConfig {
        vireo_vmcore::snapshot::MachineConfig {
            backend: "emu".into(),
            vcpus,
            memory_mib,
            frontend: serde_json::Value::Null,
        }
    }

    /// A forged configuration of 4 TiB (or other vCPUs) is refused by the
    /// check that runs before guest memory is allocated.
    #[test]
    fn the_offered_machine_must_be_the_targets_own_and_fit_the_host() {
        let four_tib = 4 << 20;
        let e = check_offered_machine(&offered(1, four_tib), 1, 64, 64, Some(8192)).unwrap_err();
        assert!(e.contains("4194304 MiB") && e.contains("--memory"), "{e}");
        let e = check_offered_machine(&offered(4, 64), 1, 64, 64, Some(8192)).unwrap_err();
        assert!(e.contains("4 vCPU(s)") && e.contains("--cpus"), "{e}");
        // Even a target defined that big is refused by the host check.
        let e =
            check_offered_machine(&offered(1, four_tib), 1, four_tib, 64, Some(8192)).unwrap_err();
        assert!(e.contains("more than this host"), "{e}");
        let e = check_offered_machine(&offered(300, 64), 300, 64, 254, Some(8192)).unwrap_err();
        assert!(e.contains("1 to 254"), "{e}");
        assert!(check_offered_machine(&offered(2, 64), 2, 64, 64, Some(8192)).is_ok());
    }
}
