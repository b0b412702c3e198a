//! What a machine records of its virtio devices in a snapshot or a
//! migration (so a restore rebuilds them with no device configuration,
//! and a migration target checks its own against them).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_api::devices::balloon::BalloonConfig;
use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::block::Format;
use vireo_api::devices::console::ConsoleConfig;
use vireo_api::devices::mac::MacError;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::rng::RngConfig;
use vireo_api::devices::vsock::VsockConfig;

use super::disk_copy::DiskCopy;
use crate::devices::DeviceConfigs;

/// A disk as recorded in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: String,
    /// Absolute when it could be resolved at snapshot time.
    pub path: PathBuf,
    pub format: Option<String>,
    pub read_only: bool,
    pub serial: String,
    pub bandwidth: Option<u64>,
    pub ops: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    pub tap: String,
    pub mac: String,
    pub id: Option<String>,
    pub mtu: Option<u16>,
    pub bandwidth: Option<u64>,
    pub ops: Option<u64>,
}

/// An rng as recorded (a struct: `Option<Option<_>>` would read back a
/// `Some(None)` as `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngRecord {
    /// Bytes per second, if limited.
    pub bandwidth: Option<u64>,
}

/// The virtio devices of a machine, as a snapshot records them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSet {
    #[serde(default)]
    pub console: Option<(u16, u16)>,
    #[serde(default)]
    pub disks: Vec<DiskRecord>,
    #[serde(default)]
    pub nets: Vec<NetRecord>,
    #[serde(default)]
    pub rng: Option<RngRecord>,
    /// (cid, socket)
    #[serde(default)]
    pub vsock: Option<(u64, PathBuf)>,
    /// (target MiB, deflate_on_oom, free_page_reporting)
    #[serde(default)]
    pub balloon: Option<(u64, bool, bool)>,
}

pub(super) fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

impl DeviceSet {
    pub fn from_configs(c: &DeviceConfigs) -> DeviceSet {
        DeviceSet {
            console: c.console.map(|c| (c.cols, c.rows)),
            disks: c
                .disks
                .iter()
                .map(|d| DiskRecord {
                    id: d.id.clone(),
                    path: absolute(&d.path),
                    format: d.format.map(|f| f.name().to_string()),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    bandwidth: d.bandwidth,
                    ops: d.ops,
                })
                .collect(),
            nets: c
                .nets
                .iter()
                .map(|n| NetRecord {
                    tap: n.tap.clone(),
                    mac: n.mac.to_string(),
                    id: n.id.clone(),
                    mtu: n.mtu,
                    bandwidth: n.bandwidth,
                    ops: n.ops,
                })
                .collect(),
            rng: c.rng.as_ref().map(|r| RngRecord {
                bandwidth: r.bandwidth,
            }),
            vsock: c
                .vsock
                .as_ref()
                .map(|v| (v.cid, absolute_socket(&v.socket))),
            balloon: c
                .balloon
                .map(|b| (b.target_mib, b.deflate_on_oom, b.free_page_reporting)),
        }
    }

    /// The configurations to open the devices with; an error names the
    /// record that does not parse (a damaged snapshot).
    pub fn to_configs(&self) -> Result<DeviceConfigs, RecordError> {
        let mut disks = Vec::new();
        for d in &self.disks {
            let format = match &d.format {
                Some(name) => {
                    Some(
                        Format::from_name(name).ok_or_else(|| RecordError::UnknownFormat {
                            disk: d.id.clone(),
                            format: name.clone(),
                        })?,
                    )
                }
                None => None,
            };
            disks.push(BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
                serial: d.serial.clone(),
                format,
                bandwidth: d.bandwidth,
                ops: d.ops,
            });
        }
        let mut nets = Vec::new();
        for n in &self.nets {
            nets.push(NetConfig {
                tap: n.tap.clone(),
                mac: n.mac.parse().map_err(|reason| RecordError::BadMac {
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                    reason,
                })?,
                id: n.id.clone(),
                mtu: n.mtu,
                bandwidth: n.bandwidth,
                ops: n.ops,
            });
        }
        Ok(DeviceConfigs {
            console: self
                .console
                .map(|(cols, rows)| ConsoleConfig { cols, rows }),
            disks,
            nets,
            rng: self.rng.map(|r| RngConfig {
                bandwidth: r.bandwidth,
            }),
            vsock: self
                .vsock
                .clone()
                .map(|(cid, socket)| VsockConfig { cid, socket }),
            balloon: self
                .balloon
                .map(
                    |(target_mib, deflate_on_oom, free_page_reporting)| BalloonConfig {
                        target_mib,
                        deflate_on_oom,
                        free_page_reporting,
                    },
                ),
            backing_dirs: Vec::new(),
        })
    }
}

/// A device record entry that does not parse (a damaged snapshot or
/// source).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("disk {disk}: unknown format {format}")]
    UnknownFormat { disk: String, format: String },
    #[error("net {tap}: MAC {mac}: {reason}")]
    BadMac {
        tap: String,
        mac: String,
        #[source]
        reason: MacError,
    },
}

/// A socket path made absolute through its directory (the socket itself
/// may not exist any more when the snapshot is restored).
fn absolute_socket(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => absolute(dir).join(name),
        (_, Some(name)) => std::env::current_dir()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| p.to_path_buf()),
        _ => p.to_path_buf(),
    }
}

/// What `vireo run` puts in `MachineConfig.frontend`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FrontendRecord {
    /// The snapshot ids of the devices, in machine order.
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub virtio: DeviceSet,
    #[serde(default)]
    pub disks: Vec<DiskCopy>,
}

#[cfg(test)]
mod tests {
    use super::super::test_util::saved;
    use super::*;

    #[test]
    fn the_device_record_round_trips() {
        let c = saved();
        let set = DeviceSet::from_configs(&c);
        let json = serde_json::to_value(&set).unwrap();
        let back: DeviceSet = serde_json::from_value(json).unwrap();
        let c2 = back.to_configs().unwrap();
        assert_eq!(c2.disks[0].id, "root");
        assert_eq!(c2.nets[0].mac, c.nets[0].mac, "random MAC kept");
        assert_eq!(c2.vsock.unwrap().cid, 5);
        assert_eq!(
            c2.rng,
            Some(RngConfig::default()),
            "an unlimited rng is kept"
        );
        assert_eq!(c2.console, Some(ConsoleConfig::default()));
        assert_eq!(c2.balloon, Some(BalloonConfig::default()));
        let mut broken = set.clone();
        broken.disks[0].format = Some("vmdk".into());
        assert!(broken.to_configs().is_err());
    }
}
