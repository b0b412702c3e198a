//! The paravirtual devices of a machine: each configured disk, network
//! device, vsock, rng, balloon and virtio console becomes a virtio device
//! on the machine's PCI bus.

use std::path::PathBuf;
use std::sync::Arc;
use vireo_api::devices::balloon::BalloonConfig;
use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::console::ConsoleConfig;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::rng::RngConfig;
use vireo_api::devices::vsock::VsockConfig;
use vireo_devices::virtio::balloon::{Balloon, BalloonHandle};
use vireo_devices::virtio::block::{Block, BlockCounters};
use vireo_devices::virtio::console::{Console, ConsoleInput};
use vireo_devices::virtio::net::{Net, NetCounters};
use vireo_devices::virtio::rng::Rng;
use vireo_devices::virtio::vsock::Vsock;
use vireo_devices::virtio::VirtioDevice;

use crate::machine::{AttachError, Machine};
use crate::snapshot_devices::{DeviceSet, DiskFile};
use crate::stdout::StdoutWriter;

/// The virtio devices of a machine, as configured (or from a snapshot's
/// record of them), not opened yet.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfigs {
    pub console: Option<ConsoleConfig>,
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: Option<RngConfig>,
    pub vsock: Option<VsockConfig>,
    pub balloon: Option<BalloonConfig>,
    /// Directories besides each image's own that its backing files may be
    /// in.
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

/// Why a virtio device could not be opened or attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtio-console: {0}")]
    Console(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] vireo_devices::virtio::block::BlockError),
    #[error("net tap={tap}: {source}")]
    Net {
        tap: String,
        #[source]
        source: vireo_devices::virtio::net::TapError,
    },
    /// The host's network could not be entered from the jail.
    #[error("jail: {0}")]
    HostNet(#[from] vireo_sandbox::jail::JailError),
    #[error(transparent)]
    Vsock(#[from] vireo_devices::virtio::vsock::VsockError),
    #[error("balloon: {0}")]
    Balloon(#[source] std::io::Error),
    #[error(transparent)]
    Attach(#[from] AttachError),
}

impl DeviceError {
    /// Whether the configuration is at fault (a missing image, TAP or
    /// socket), not the VMM.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            DeviceError::Disk(_) | DeviceError::Net { .. } | DeviceError::Vsock(_)
        )
    }
}

/// Open the devices and put them on the machine's PCI bus: the console,
/// disks in order (the first is vda), nets, rng, vsock, balloon.
/// Each gets its stable snapshot id (`virtio/<kind>[/<id>]`).
pub fn open(machine: &mut Machine, configs: DeviceConfigs) -> Result<Attached, DeviceError> {
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
        let c = Console::new(cfg, Box::new(StdoutWriter)).map_err(DeviceError::Console)?;
        attached.virtio_console = Some(c.input());
        devices.push((Box::new(c), "virtio/console".into()));
    }
    // Disks in order: the first is vda.
    for cfg in disks {
        let b = Block::open(cfg, &backing_dirs)?;
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
        // from a jail with a network of its own (see host_net).
        let n =
            crate::host_net::in_host_net(|| Net::new(cfg))?.map_err(|source| DeviceError::Net {
                tap: tap.clone(),
                source,
            })?;
        tracing::info!("net: {tap}, guest MAC {mac}");
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
        let v = Vsock::new(cfg)?;
        devices.push((Box::new(v), "virtio/vsock".into()));
    }
    if let Some(cfg) = balloon {
        let b = Balloon::new(cfg).map_err(DeviceError::Balloon)?;
        attached.balloon = Some(b.handle());
        devices.push((Box::new(b), "virtio/balloon".into()));
    }
    for (d, snapshot_id) in devices {
        machine.add_virtio(d, snapshot_id)?;
    }
    Ok(attached)
}
