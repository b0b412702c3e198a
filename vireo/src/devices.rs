//! The paravirtual devices of `vireo run`: each `--disk`, `--net`,
//! `--vsock`, `--rng`, `--balloon` and `--virtio-console` flag becomes a
//! virtio device on the machine's PCI bus.

use std::path::PathBuf;
use std::sync::Arc;
use vireo_api::devices::balloon::BalloonConfig;
use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::console::ConsoleConfig;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::rng::RngConfig;
use vireo_api::devices::vsock::VsockConfig;
use vireo_api::options::OptionsError;
use vireo_api::units::MemorySize;
use vireo_devices::virtio::balloon::{Balloon, BalloonHandle};
use vireo_devices::virtio::block::{check_format_given, Block, BlockCounters};
use vireo_devices::virtio::console::{Console, ConsoleInput};
use vireo_devices::virtio::net::{Net, NetCounters};
use vireo_devices::virtio::rng::Rng;
use vireo_devices::virtio::vsock::Vsock;
use vireo_devices::virtio::VirtioDevice;

use crate::cli::RunArgs;
use crate::console::StdoutWriter;
use crate::machine::Machine;
use crate::snapshot_devices::{DeviceSet, DiskFile};
use crate::Failure;

/// The virtio devices of a machine, parsed from the flags (or from a
/// snapshot's record of them), not opened yet.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfigs {
    pub console: Option<ConsoleConfig>,
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: Option<RngConfig>,
    pub vsock: Option<VsockConfig>,
    pub balloon: Option<BalloonConfig>,
    /// Directories besides each image's own that its backing files may be
    /// in (`--backing-dir`).
    pub backing_dirs: Vec<PathBuf>,
}

/// Host-side handles of the devices that have them.
#[derive(Default)]
pub struct Attached {
    /// What a snapshot records to rebuild these devices.
    pub device_set: DeviceSet,
    /// Each writable disk's file, for a snapshot to copy.
    pub disk_files: Vec<DiskFile>,
    /// Where stdin goes when the guest console is virtio-console (hvc0).
    pub virtio_console: Option<ConsoleInput>,
    pub balloon: Option<BalloonHandle>,
    /// Each disk's id and I/O counters, in flag order.
    pub disks: Vec<(String, Arc<BlockCounters>)>,
    /// Each network device's id (its `id=`, else the TAP name) and
    /// traffic counters, in flag order.
    pub nets: Vec<(String, Arc<NetCounters>)>,
}

/// Parse every device flag first (so a typo fails before anything is
/// opened), then open and attach the devices in flag order.
pub fn attach(machine: &mut Machine, args: &RunArgs) -> Result<Attached, Failure> {
    let configs = parse(args)?;
    open(machine, configs)
}

/// A device's options refused, named by its flag (`--disk: …`).
pub fn options_usage(e: OptionsError) -> Failure {
    Failure::Usage(format!("--{}: {}", e.device, e.message))
}

/// Parse the device flags.
pub fn parse(args: &RunArgs) -> Result<DeviceConfigs, Failure> {
    let usage = options_usage;
    let disks = args
        .disk
        .iter()
        .map(|s| BlockConfig::from_options(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    for d in &disks {
        check_format_given(d).map_err(|e| Failure::Usage(e.to_string()))?;
    }
    let nets = args
        .net
        .iter()
        .map(|s| NetConfig::from_options(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    let vsock = args
        .vsock
        .as_deref()
        .map(VsockConfig::from_options)
        .transpose()
        .map_err(usage)?;
    let rng = args
        .rng
        .as_deref()
        .map(RngConfig::from_options)
        .transpose()
        .map_err(usage)?;
    let balloon = args
        .balloon
        .as_deref()
        .map(BalloonConfig::from_options)
        .transpose()
        .map_err(usage)?;
    if let Some(b) = &balloon {
        let memory = MemorySize::from_mib(args.memory())
            .map_err(|e| Failure::Usage(format!("--memory: {e}")))?;
        vireo_api::vm::check_balloon(b.target_mib, memory)
            .map_err(|e| Failure::Usage(crate::cli::limit_usage(&e)))?;
    }
    let console = args
        .virtio_console
        .as_deref()
        .map(ConsoleConfig::from_options)
        .transpose()
        .map_err(usage)?;
    Ok(DeviceConfigs {
        console,
        disks,
        nets,
        rng,
        vsock,
        balloon,
        backing_dirs: args.backing_dir.clone(),
    })
}

/// Open the devices and put them on the machine's PCI bus: the console,
/// disks in flag order (the first is vda), nets, rng, vsock, balloon.
/// Each gets its stable snapshot id (`virtio/<kind>[/<id>]`).
pub fn open(machine: &mut Machine, configs: DeviceConfigs) -> Result<Attached, Failure> {
    let mut attached = Attached {
        device_set: DeviceSet::from_configs(&configs),
        ..Attached::default()
    };
    let DeviceConfigs {
        console,
        disks,
        nets,
        rng,
        vsock,
        balloon,
        backing_dirs,
    } = configs;
    let mut devices: Vec<(Box<dyn VirtioDevice>, String)> = Vec::new();
    if let Some(cfg) = console {
        let c = Console::new(cfg, Box::new(StdoutWriter))
            .map_err(|e| Failure::Vm(format!("--virtio-console: {e}")))?;
        attached.virtio_console = Some(c.input());
        devices.push((Box::new(c), "virtio/console".into()));
    }
    // Disks in flag order: the first --disk is vda.
    for cfg in disks {
        let b = Block::open(cfg, &backing_dirs).map_err(|e| Failure::Usage(e.to_string()))?;
        let id = b.config().id.clone();
        attached.disks.push((id.clone(), b.counters()));
        if !b.state().read_only {
            attached.disk_files.push(DiskFile {
                id: id.clone(),
                path: b.config().path.clone(),
                format: b.format(),
            });
        }
        devices.push((Box::new(b), format!("virtio/blk/{id}")));
    }
    for (i, cfg) in nets.into_iter().enumerate() {
        let tap = cfg.tap.clone();
        let mac = cfg.mac;
        // The TAP is found (or made) by name in the host's network, also
        // from a jail with a network of its own (see jail_run).
        let n = crate::jail_run::in_host_net(|| Net::new(cfg))?
            .map_err(|e| Failure::Usage(format!("--net tap={tap}: {e}")))?;
        tracing::info!("--net: {tap}, guest MAC {mac}");
        let snapshot_id = format!(
            "virtio/net/{}",
            n.config().id.clone().unwrap_or_else(|| format!("net{i}"))
        );
        let id = n.config().id.clone().unwrap_or(tap);
        attached.nets.push((id, n.counters()));
        devices.push((Box::new(n), snapshot_id));
    }
    if let Some(cfg) = rng {
        devices.push((Box::new(Rng::new(cfg)), "virtio/rng".into()));
    }
    if let Some(cfg) = vsock {
        let v = Vsock::new(cfg).map_err(|e| Failure::Usage(e.to_string()))?;
        devices.push((Box::new(v), "virtio/vsock".into()));
    }
    if let Some(cfg) = balloon {
        let b = Balloon::new(cfg).map_err(|e| Failure::Vm(format!("--balloon: {e}")))?;
        attached.balloon = Some(b.handle());
        devices.push((Box::new(b), "virtio/balloon".into()));
    }
    for (d, snapshot_id) in devices {
        machine
            .add_virtio(d, snapshot_id)
            .map_err(|e| Failure::Vm(e.to_string()))?;
    }
    Ok(attached)
}
