//! A migration target against the source's record of its devices: each
//! difference named, and the target's own devices (with the source's MACs
//! where the target gives none) as what it builds.

use super::record::{DeviceSet, FrontendRecord};
use super::restore::ids_or_none;
use crate::devices::DeviceConfigs;
use vireo_api::devices::mac::MacError;

/// A virtio device kind, as a difference between two machines names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Console,
    Rng,
    Balloon,
    Vsock,
    Disk,
    Net,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Console => "virtio-console",
            DeviceKind::Rng => "rng",
            DeviceKind::Balloon => "balloon",
            DeviceKind::Vsock => "vsock device",
            DeviceKind::Disk => "disk",
            DeviceKind::Net => "network device",
        })
    }
}

/// One way the source's devices differ from this target's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceDiff {
    /// One side has the device, the other not (`at_source`: the source
    /// has it).
    Presence {
        kind: DeviceKind,
        at_source: bool,
    },
    VsockCid {
        source: u64,
        own: u64,
    },
    DiskCount {
        source: Vec<String>,
        own: Vec<String>,
    },
    DiskId {
        index: usize,
        source: String,
        own: String,
    },
    DiskFormat {
        id: String,
        source: Option<String>,
        own: Option<String>,
    },
    DiskReadOnly {
        id: String,
        source: bool,
        own: bool,
    },
    DiskSerial {
        id: String,
        source: String,
        own: String,
    },
    NetCount {
        source: usize,
        own: usize,
    },
    NetId {
        index: usize,
        source: Option<String>,
        own: Option<String>,
    },
    /// The guest keeps its MAC (its driver read it at boot).
    NetMac {
        index: usize,
        source: String,
        own: String,
    },
    NetMtu {
        index: usize,
        source: Option<u16>,
        own: Option<u16>,
    },
}

impl DeviceDiff {
    /// The kind of device that differs.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceDiff::Presence { kind, .. } => *kind,
            DeviceDiff::VsockCid { .. } => DeviceKind::Vsock,
            DeviceDiff::DiskCount { .. }
            | DeviceDiff::DiskId { .. }
            | DeviceDiff::DiskFormat { .. }
            | DeviceDiff::DiskReadOnly { .. }
            | DeviceDiff::DiskSerial { .. } => DeviceKind::Disk,
            DeviceDiff::NetCount { .. }
            | DeviceDiff::NetId { .. }
            | DeviceDiff::NetMac { .. }
            | DeviceDiff::NetMtu { .. } => DeviceKind::Net,
        }
    }
}

impl std::fmt::Display for DeviceDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceDiff::Presence { kind, at_source } => write!(
                f,
                "the source has {} {kind}, this target {}",
                if *at_source { "a" } else { "no" },
                if *at_source { "has none" } else { "has one" }
            ),
            DeviceDiff::VsockCid { source, own } => write!(
                f,
                "vsock: the source's guest has cid={source}, this target cid={own}"
            ),
            DeviceDiff::DiskCount { source, own } => write!(
                f,
                "the source has {} disk(s) ({}), this target {} ({})",
                source.len(),
                ids_or_none(source),
                own.len(),
                ids_or_none(own)
            ),
            DeviceDiff::DiskId { index, source, own } => write!(
                f,
                "disk {index}: the source's has id={source}, this target's id={own}"
            ),
            DeviceDiff::DiskFormat { id, source, own } => {
                let name = |f: &Option<String>| f.clone().unwrap_or_else(|| "none given".into());
                write!(
                    f,
                    "disk {id}: format {} at the source, {} here",
                    name(source),
                    name(own)
                )
            }
            DeviceDiff::DiskReadOnly { id, source, own } => {
                let ro = |r: bool| if r { "read-only" } else { "writable" };
                write!(f, "disk {id}: {} at the source, {} here", ro(*source), ro(*own))
            }
            DeviceDiff::DiskSerial { id, source, own } => write!(
                f,
                "disk {id}: serial {source:?} at the source, {own:?} here"
            ),
            DeviceDiff::NetCount { source, own } => write!(
                f,
                "the source has {source} network device(s), this target {own}"
            ),
            DeviceDiff::NetId { index, source, own } => write!(
                f,
                "network device {index}: id={} at the source, id={} here",
                source.as_deref().unwrap_or("(none)"),
                own.as_deref().unwrap_or("(none)")
            ),
            DeviceDiff::NetMac { index, source, own } => write!(
                f,
                "network device {index}: MAC {source} at the source, {own} here (the guest keeps its MAC)"
            ),
            DeviceDiff::NetMtu { index, source, own } => write!(
                f,
                "network device {index}: MTU {source:?} at the source, {own:?} here"
            ),
        }
    }
}

/// Why the source's machine cannot be rebuilt from this target's own
/// devices.
#[derive(Debug, thiserror::Error)]
pub enum PeerDevicesError {
    #[error("the source's device record does not parse: {0}")]
    Parse(#[source] serde_json::Error),
    /// Every difference, in device order.
    #[error("the source's devices differ from this target's definition: {}", join(.0))]
    Differ(Vec<DeviceDiff>),
    #[error("the source's network device {index}: MAC {mac}: {reason}")]
    BadMac {
        index: usize,
        mac: String,
        #[source]
        reason: MacError,
    },
}

fn join(diffs: &[DeviceDiff]) -> String {
    diffs
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The source's device record from its machine configuration.
fn peer_record(frontend: &serde_json::Value) -> Result<FrontendRecord, PeerDevicesError> {
    if frontend.is_null() {
        return Ok(FrontendRecord::default());
    }
    serde_json::from_value(frontend.clone()).map_err(PeerDevicesError::Parse)
}

/// Check the source's record of its virtio devices against this target's
/// own: the same kinds, count and ids; disks of the same formats,
/// read-only flags and serials; network devices with the same MACs (a
/// target network device without a MAC of its own takes the source's: the
/// guest's driver read it at boot) and MTUs; vsock with the same cid.
/// Every difference is named. Only the target's own paths, TAPs and
/// sockets are used; nothing in the record is opened.
pub fn check_peer_devices(
    peer: &DeviceSet,
    own: &DeviceSet,
    mac_given: &[bool],
) -> Result<(), PeerDevicesError> {
    let mut diffs: Vec<DeviceDiff> = Vec::new();
    for (kind, p, o) in [
        (
            DeviceKind::Console,
            peer.console.is_some(),
            own.console.is_some(),
        ),
        (DeviceKind::Rng, peer.rng.is_some(), own.rng.is_some()),
        (
            DeviceKind::Balloon,
            peer.balloon.is_some(),
            own.balloon.is_some(),
        ),
        (DeviceKind::Vsock, peer.vsock.is_some(), own.vsock.is_some()),
    ] {
        if p != o {
            diffs.push(DeviceDiff::Presence { kind, at_source: p });
        }
    }
    if let (Some((pc, _)), Some((oc, _))) = (&peer.vsock, &own.vsock) {
        if pc != oc {
            diffs.push(DeviceDiff::VsockCid {
                source: *pc,
                own: *oc,
            });
        }
    }
    if peer.disks.len() != own.disks.len() {
        diffs.push(DeviceDiff::DiskCount {
            source: peer.disks.iter().map(|d| d.id.clone()).collect(),
            own: own.disks.iter().map(|d| d.id.clone()).collect(),
        });
    } else {
        for (i, (p, o)) in peer.disks.iter().zip(&own.disks).enumerate() {
            if p.id != o.id {
                diffs.push(DeviceDiff::DiskId {
                    index: i,
                    source: p.id.clone(),
                    own: o.id.clone(),
                });
                continue;
            }
            if p.format != o.format {
                diffs.push(DeviceDiff::DiskFormat {
                    id: o.id.clone(),
                    source: p.format.clone(),
                    own: o.format.clone(),
                });
            }
            if p.read_only != o.read_only {
                diffs.push(DeviceDiff::DiskReadOnly {
                    id: o.id.clone(),
                    source: p.read_only,
                    own: o.read_only,
                });
            }
            if p.serial != o.serial {
                diffs.push(DeviceDiff::DiskSerial {
                    id: o.id.clone(),
                    source: p.serial.clone(),
                    own: o.serial.clone(),
                });
            }
        }
    }
    if peer.nets.len() != own.nets.len() {
        diffs.push(DeviceDiff::NetCount {
            source: peer.nets.len(),
            own: own.nets.len(),
        });
    } else {
        for (i, (p, o)) in peer.nets.iter().zip(&own.nets).enumerate() {
            if p.id != o.id {
                diffs.push(DeviceDiff::NetId {
                    index: i,
                    source: p.id.clone(),
                    own: o.id.clone(),
                });
            }
            if mac_given.get(i).copied().unwrap_or(true) && !p.mac.eq_ignore_ascii_case(&o.mac) {
                diffs.push(DeviceDiff::NetMac {
                    index: i,
                    source: p.mac.clone(),
                    own: o.mac.clone(),
                });
            }
            if p.mtu != o.mtu {
                diffs.push(DeviceDiff::NetMtu {
                    index: i,
                    source: p.mtu,
                    own: o.mtu,
                });
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(PeerDevicesError::Differ(diffs))
    }
}

/// The devices to build for an incoming migration: this target's own
/// (`own`), after [`check_peer_devices`] against the source's
/// record in `frontend`; a network device without a MAC of its own takes
/// the source's. Disks are shared storage: the target's disks name the
/// same images the source runs on.
pub fn migrated_configs(
    frontend: &serde_json::Value,
    mut own: DeviceConfigs,
    mac_given: &[bool],
) -> Result<DeviceConfigs, PeerDevicesError> {
    let record = peer_record(frontend)?;
    let own_set = DeviceSet::from_configs(&own);
    check_peer_devices(&record.virtio, &own_set, mac_given)?;
    for (i, (n, p)) in own.nets.iter_mut().zip(&record.virtio.nets).enumerate() {
        if !mac_given.get(i).copied().unwrap_or(true) {
            n.mac = p.mac.parse().map_err(|reason| PeerDevicesError::BadMac {
                index: i,
                mac: p.mac.clone(),
                reason,
            })?;
        }
    }
    Ok(own)
}

/// [`check_peer_devices`] for a machine configuration's `frontend`.
pub fn check_peer_record(
    frontend: &serde_json::Value,
    own: &DeviceSet,
    mac_given: &[bool],
) -> Result<(), PeerDevicesError> {
    check_peer_devices(&peer_record(frontend)?.virtio, own, mac_given)
}

#[cfg(test)]
mod tests {
    use super::super::record::{DiskRecord, NetRecord, RngRecord};
    use super::super::test_util::pairs;
    use super::*;
    use std::path::PathBuf;
    use vireo_api::devices::balloon::BalloonConfig;
    use vireo_api::devices::block::BlockConfig;
    use vireo_api::devices::console::ConsoleConfig;
    use vireo_api::devices::net::NetConfig;
    use vireo_api::devices::rng::RngConfig;
    use vireo_api::devices::vsock::VsockConfig;

    /// The source's record of its devices, as a (possibly hostile) peer
    /// sends it: paths anywhere, and the fields to vary.
    fn peer(disks: &[(&str, &str, Option<&str>, bool)]) -> serde_json::Value {
        let set = DeviceSet {
            disks: disks
                .iter()
                .map(|(id, path, format, ro)| DiskRecord {
                    id: id.to_string(),
                    path: PathBuf::from(path),
                    format: format.map(String::from),
                    read_only: *ro,
                    serial: id.to_string(),
                    bandwidth: None,
                    ops: None,
                })
                .collect(),
            nets: vec![NetRecord {
                tap: "victim-tap".into(),
                mac: "52:54:00:aa:bb:cc".into(),
                id: None,
                mtu: None,
                bandwidth: None,
                ops: None,
            }],
            rng: Some(RngRecord { bandwidth: None }),
            vsock: Some((7, PathBuf::from("/etc/peer.sock"))),
            ..DeviceSet::default()
        };
        serde_json::to_value(FrontendRecord {
            devices: vec![],
            virtio: set,
            disks: vec![],
        })
        .unwrap()
    }

    /// A migration target's own devices given these flags, and which
    /// network devices name their MAC.
    fn own(flags: &[&str]) -> (DeviceConfigs, Vec<bool>) {
        let mut c = DeviceConfigs::default();
        let mut macs = Vec::new();
        for (flag, value) in pairs(flags) {
            match flag {
                "--disk" => c.disks.push(BlockConfig::from_options(value).unwrap()),
                "--net" => {
                    c.nets.push(NetConfig::from_options(value).unwrap());
                    macs.push(
                        value
                            .split(',')
                            .any(|kv| kv.trim_start().starts_with("mac=")),
                    );
                }
                "--vsock" => c.vsock = Some(VsockConfig::from_options(value).unwrap()),
                "--rng" => c.rng = Some(RngConfig::from_options(value).unwrap()),
                "--balloon" => c.balloon = Some(BalloonConfig::from_options(value).unwrap()),
                "--virtio-console" => c.console = Some(ConsoleConfig::from_options(value).unwrap()),
                other => panic!("{other}"),
            }
        }
        (c, macs)
    }

    const OWN: &[&str] = &[
        "--disk",
        "path=/srv/vm/root.raw,id=root,format=raw",
        "--net",
        "tap=tap-own",
        "--rng",
        "--vsock",
        "cid=7,socket=/run/own.sock",
    ];

    #[test]
    fn a_migration_target_builds_only_its_own_devices() {
        // The source names /etc/shadow as its disk, another TAP and
        // socket: the target's own paths are what it opens.
        let (mine, macs) = own(OWN);
        let fe = peer(&[("root", "/etc/shadow", Some("raw"), false)]);
        let c = migrated_configs(&fe, mine, &macs).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/srv/vm/root.raw"));
        assert_eq!(c.nets[0].tap, "tap-own");
        assert_eq!(
            c.vsock.as_ref().unwrap().socket,
            PathBuf::from("/run/own.sock")
        );
        // No mac= here: the guest keeps the source's.
        assert_eq!(c.nets[0].mac.to_string(), "52:54:00:aa:bb:cc");
    }

    #[test]
    fn a_source_whose_devices_differ_is_refused_by_name() {
        for (record, flags, says) in [
            // Another disk id, format, read-only flag, count.
            (peer(&[("data", "/x", Some("raw"), false)]), OWN, "id=data"),
            (
                peer(&[("root", "/x", Some("qcow2"), false)]),
                OWN,
                "format qcow2",
            ),
            (
                peer(&[("root", "/x", Some("raw"), true)]),
                OWN,
                "read-only at the source",
            ),
            (
                peer(&[
                    ("root", "/x", Some("raw"), false),
                    ("two", "/etc/passwd", None, false),
                ]),
                OWN,
                "2 disk(s)",
            ),
            // A device kind the target does not define.
            (
                peer(&[("root", "/x", Some("raw"), false)]),
                &OWN[..5],
                "vsock",
            ),
            (
                peer(&[("root", "/x", Some("raw"), false)]),
                &[
                    "--disk",
                    "path=/srv/vm/root.raw,id=root,format=raw",
                    "--net",
                    "tap=tap-own,mac=52:54:00:00:00:01",
                    "--rng",
                    "--vsock",
                    "cid=7,socket=/run/own.sock",
                ][..],
                "MAC 52:54:00:aa:bb:cc",
            ),
            (
                peer(&[("root", "/x", Some("raw"), false)]),
                &[
                    "--disk",
                    "path=/srv/vm/root.raw,id=root,format=raw",
                    "--net",
                    "tap=tap-own",
                    "--rng",
                    "--vsock",
                    "cid=8,socket=/run/own.sock",
                ][..],
                "cid=7",
            ),
        ] {
            let (mine, macs) = own(flags);
            let e = migrated_configs(&record, mine, &macs)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "expected {says:?} in: {e}");
            assert!(e.contains("differ from this target's definition"), "{e}");
        }
        // No device flags at all against a source with devices.
        let (mine, macs) = own(&[]);
        let e = migrated_configs(&peer(&[("root", "/x", Some("raw"), false)]), mine, &macs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 disk(s) (root), this target 0 (none)"), "{e}");
        // A record that does not parse.
        let (mine, macs) = own(OWN);
        assert!(migrated_configs(&serde_json::json!({"virtio": 5}), mine, &macs).is_err());
    }
}
