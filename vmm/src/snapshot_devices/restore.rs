//! How a restore rebuilds a snapshot's virtio devices: the snapshot's
//! record with the caller's own disks, TAPs or vsock socket in place
//! ([`RestoreOverrides`]), and every other writable disk rolled back to
//! the snapshot's copy.

use std::path::{Path, PathBuf};

use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::block::Format;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::vsock::VsockConfig;

use super::disk_copy::copy_file;
use super::record::{FrontendRecord, RecordError};
use crate::devices::DeviceConfigs;

/// What the caller gives instead of a snapshot's saved disks, TAPs and
/// vsock socket, matched by id (network devices without one by position).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    pub disks: Vec<BlockConfig>,
    /// Each network device, with whether its MAC was given (a restored
    /// guest keeps its own: its driver read it at boot).
    pub nets: Vec<(NetConfig, bool)>,
    pub vsock: Option<VsockConfig>,
    /// Directories besides each image's own that its backing files may be in.
    pub backing_dirs: Vec<PathBuf>,
}

/// Why a snapshot's virtio devices cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RestoreDevicesError {
    #[error("the snapshot's device record does not parse: {0}")]
    RecordParse(#[source] serde_json::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the snapshot holds no copy of disk {0}; give that disk (id={0}) in its place")]
    NoCopy(String),
    #[error("disk {id}: {}: {source}", .path.display())]
    CopyUnreadable {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {id}: {} is {len} bytes, the snapshot recorded {recorded}; the copy was changed", .path.display())]
    CopyChanged {
        id: String,
        path: PathBuf,
        len: u64,
        recorded: u64,
    },
    #[error("the snapshot has no disk with id={id} (its disks: {}); a disk given with a restore replaces the saved disk of its id", ids_or_none(.saved))]
    NoSuchDisk { id: String, saved: Vec<String> },
    #[error("disk id={0}: given twice")]
    DiskTwice(String),
    #[error("network device tap={tap}: the snapshot has no such network device ({saved} saved); a network device given with a restore (by id, or in order) replaces a saved TAP")]
    NoSuchNet { tap: String, saved: usize },
    #[error("network device tap={0}: that device is given twice")]
    NetTwice(String),
    #[error("network device tap={tap}: the restored guest keeps MAC {saved} (its driver read it at boot); drop mac=")]
    MacChanged { tap: String, saved: String },
    #[error("vsock cid={0}: the snapshot has no vsock device")]
    NoVsock(u64),
    #[error("vsock cid={given}: the snapshot's guest has cid={saved}; keep it (only socket= may change)")]
    VsockCid { given: u64, saved: u64 },
    #[error("rolling disk {id} back ({} over {}): {source}", .from.display(), .to.display())]
    Rollback {
        id: String,
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RestoreDevicesError {
    /// Whether the snapshot, its copies or the caller's overrides are at
    /// fault (not the host failing to write a disk back).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, RestoreDevicesError::Rollback { .. })
    }
}

pub(super) fn ids_or_none(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

/// The devices to rebuild for a restore from `dir`: the snapshot's, with
/// the caller's overrides, and every disk not overridden rolled back to the
/// snapshot's copy (copied over its recorded path). Everything is checked
/// before any disk is written.
pub fn restore_configs(
    dir: &Path,
    frontend: &serde_json::Value,
    overrides: &RestoreOverrides,
) -> Result<DeviceConfigs, RestoreDevicesError> {
    let record: FrontendRecord = if frontend.is_null() {
        FrontendRecord::default()
    } else {
        serde_json::from_value(frontend.clone()).map_err(RestoreDevicesError::RecordParse)?
    };
    let mut configs = record.virtio.to_configs()?;
    configs.backing_dirs = overrides.backing_dirs.clone();
    let overridden = apply_overrides(&mut configs, overrides)?;
    // Check every disk to roll back has its copy before writing any.
    let mut rollbacks = Vec::new();
    for (i, d) in configs.disks.iter_mut().enumerate() {
        if overridden[i] || d.read_only {
            continue;
        }
        let Some(copy) = record.disks.iter().find(|c| c.id == d.id) else {
            return Err(RestoreDevicesError::NoCopy(d.id.clone()));
        };
        let src = dir.join(&copy.file);
        let len = std::fs::metadata(&src)
            .map_err(|source| RestoreDevicesError::CopyUnreadable {
                id: d.id.clone(),
                path: src.clone(),
                source,
            })?
            .len();
        if len != copy.bytes {
            return Err(RestoreDevicesError::CopyChanged {
                id: d.id.clone(),
                path: src,
                len,
                recorded: copy.bytes,
            });
        }
        d.format = Format::from_name(&copy.format);
        rollbacks.push((d.id.clone(), src, d.path.clone()));
    }
    for (id, src, dst) in rollbacks {
        let started = std::time::Instant::now();
        let (bytes, how) =
            copy_file(&src, &dst, true).map_err(|source| RestoreDevicesError::Rollback {
                id: id.clone(),
                from: src.clone(),
                to: dst.clone(),
                source,
            })?;
        tracing::info!(
            "restore: disk {id} rolled back to the snapshot: {} copied over {} ({how}, {} MiB, {} ms)",
            src.display(),
            dst.display(),
            bytes >> 20,
            started.elapsed().as_millis()
        );
    }
    Ok(configs)
}

/// Apply the disks, network devices and vsock given with a restore;
/// returns which disks were overridden.
fn apply_overrides(
    configs: &mut DeviceConfigs,
    overrides: &RestoreOverrides,
) -> Result<Vec<bool>, RestoreDevicesError> {
    let mut overridden = vec![false; configs.disks.len()];
    for o in &overrides.disks {
        let Some(i) = configs.disks.iter().position(|d| d.id == o.id) else {
            return Err(RestoreDevicesError::NoSuchDisk {
                id: o.id.clone(),
                saved: configs.disks.iter().map(|d| d.id.clone()).collect(),
            });
        };
        if overridden[i] {
            return Err(RestoreDevicesError::DiskTwice(o.id.clone()));
        }
        let d = &mut configs.disks[i];
        tracing::info!(
            "restore: disk {} from {} (instead of {})",
            d.id,
            o.path.display(),
            d.path.display()
        );
        d.path = o.path.clone();
        d.format = o.format;
        overridden[i] = true;
    }
    let mut by_position = 0usize;
    let mut net_done = vec![false; configs.nets.len()];
    for (o, mac_given) in &overrides.nets {
        let i = match &o.id {
            Some(id) => configs.nets.iter().position(|n| n.id.as_ref() == Some(id)),
            None => {
                by_position += 1;
                Some(by_position - 1).filter(|&i| i < configs.nets.len())
            }
        };
        let Some(i) = i else {
            return Err(RestoreDevicesError::NoSuchNet {
                tap: o.tap.clone(),
                saved: configs.nets.len(),
            });
        };
        if net_done[i] {
            return Err(RestoreDevicesError::NetTwice(o.tap.clone()));
        }
        net_done[i] = true;
        if *mac_given && o.mac != configs.nets[i].mac {
            return Err(RestoreDevicesError::MacChanged {
                tap: o.tap.clone(),
                saved: configs.nets[i].mac.to_string(),
            });
        }
        tracing::info!(
            "restore: network device {i} on TAP {} (instead of {})",
            o.tap,
            configs.nets[i].tap
        );
        configs.nets[i].tap = o.tap.clone();
    }
    if let Some(o) = &overrides.vsock {
        let Some(v) = configs.vsock.as_mut() else {
            return Err(RestoreDevicesError::NoVsock(o.cid));
        };
        if o.cid != v.cid {
            return Err(RestoreDevicesError::VsockCid {
                given: o.cid,
                saved: v.cid,
            });
        }
        v.socket = o.socket.clone();
    }
    Ok(overridden)
}

#[cfg(test)]
mod tests {
    use super::super::disk_copy::{copy_disks, DiskFile};
    use super::super::record::DeviceSet;
    use super::super::test_util::{pairs, saved, tempdir};
    use super::*;

    /// The overrides of a restore given these flags.
    fn args(flags: &[&str]) -> RestoreOverrides {
        let mut o = RestoreOverrides::default();
        for (flag, value) in pairs(flags) {
            match flag {
                "--disk" => o.disks.push(BlockConfig::from_options(value).unwrap()),
                "--net" => o.nets.push((
                    NetConfig::from_options(value).unwrap(),
                    value.contains("mac="),
                )),
                "--vsock" => o.vsock = Some(VsockConfig::from_options(value).unwrap()),
                other => panic!("{other}"),
            }
        }
        o
    }

    #[test]
    fn overrides_replace_by_id_or_position_and_unknown_ones_are_refused() {
        let mut c = saved();
        let o = apply_overrides(
            &mut c,
            &args(&[
                "--disk",
                "id=data,path=/clone/data.qcow2",
                "--net",
                "tap=c0",
                "--net",
                "id=lan,tap=c1",
                "--vsock",
                "cid=5,socket=/run/b.sock",
            ]),
        )
        .unwrap();
        assert_eq!(o, vec![false, true]);
        assert_eq!(c.disks[1].path, PathBuf::from("/clone/data.qcow2"));
        assert_eq!(c.disks[0].path, PathBuf::from("/d/root.raw"));
        assert_eq!(
            (c.nets[0].tap.as_str(), c.nets[1].tap.as_str()),
            ("c0", "c1")
        );
        assert_eq!(c.vsock.unwrap().socket, PathBuf::from("/run/b.sock"));
        for bad in [
            &["--disk", "id=nope,path=/x"][..],
            &["--net", "id=nope,tap=x"],
            &["--vsock", "cid=6,socket=/run/c.sock"],
            &["--disk", "id=root,path=/a", "--disk", "id=root,path=/b"],
            &["--net", "tap=c0,mac=52:54:00:00:00:01"],
        ] {
            assert!(
                apply_overrides(&mut saved(), &args(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn restore_rolls_disks_back_and_checks_the_copies() {
        let dir = tempdir();
        let disk = dir.path().join("root.raw");
        std::fs::write(&disk, b"saved").unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let copies = copy_disks(
            &snap,
            &[DiskFile {
                id: "root".into(),
                path: disk.clone(),
                format: Format::Raw,
            }],
        )
        .unwrap();
        assert_eq!(copies[0].file, "disks/root.raw");
        std::fs::write(&disk, b"later").unwrap();
        let cfg = DeviceConfigs {
            disks: vec![
                BlockConfig::from_options(&format!("path={},id=root", disk.display())).unwrap(),
            ],
            ..DeviceConfigs::default()
        };
        let record = FrontendRecord {
            devices: vec![],
            virtio: DeviceSet::from_configs(&cfg),
            disks: copies.clone(),
        };
        let fe = serde_json::to_value(&record).unwrap();
        restore_configs(&snap, &fe, &args(&[])).unwrap();
        assert_eq!(std::fs::read(&disk).unwrap(), b"saved");
        // An override leaves the disk alone.
        std::fs::write(&disk, b"later").unwrap();
        let other = dir.path().join("other.raw");
        std::fs::write(&other, b"x").unwrap();
        let c = restore_configs(
            &snap,
            &fe,
            &args(&["--disk", &format!("id=root,path={}", other.display())]),
        )
        .unwrap();
        assert_eq!(c.disks[0].path, other);
        assert_eq!(std::fs::read(&disk).unwrap(), b"later");
        // A copy that changed size is refused before anything is written.
        std::fs::write(snap.join("disks/root.raw"), b"tampered!").unwrap();
        let e = restore_configs(&snap, &fe, &args(&[])).err().unwrap();
        assert!(matches!(e, RestoreDevicesError::CopyChanged { .. }), "{e}");
        assert!(e.to_string().contains("was changed"), "{e}");
        assert_eq!(std::fs::read(&disk).unwrap(), b"later");
    }
}
