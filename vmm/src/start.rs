//! The start sequence: build the machine a [`VmSpec`] describes (boot a
//! kernel, restore a snapshot through [`crate::restore`], or receive it
//! from a migration source through [`crate::incoming`]), then start it in
//! a fixed order (confinement before any guest code, the Main thread's
//! filter once set-up is done) and carry out control-socket commands
//! (`run`) until it exits.

use std::path::PathBuf;
use std::sync::Arc;

use vireo_api::units::MemorySize;
use vireo_devices::legacy::SerialInput;
use vireo_devices::virtio::console::ConsoleInput;
use vireo_hypervisor::host::HostVirt;
use vireo_hypervisor::{BackendKind, Hypervisor};
use vireo_sandbox::seccomp::{self, SeccompError};
use vireo_vmcore::boot::BootSpec;
use vireo_vmcore::{ExitReason, VmConfig, VmControl, VmError};

use crate::backend::{self, Accel, BackendError};
use crate::control_socket;
use crate::devices::{self, Attached, DeviceConfigs, DeviceError};
use crate::incoming::{self, MachineMismatch, MigrateInError};
use crate::machine;
use crate::restore::{self, RestoreError};
use crate::run::{serve_control, Saveable};
use crate::snapshot_devices::RestoreOverrides;
use crate::stdout::StdoutWriter;

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
            } => incoming::migrate_in(
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
            } => restore::restore_machine(&dir, lazy, &overrides, spec.accel)
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
