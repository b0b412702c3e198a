//! Virtio devices in snapshots: what a machine records of its devices in
//! a snapshot (so a restore rebuilds them with no device configuration),
//! the copies of its disks a snapshot holds (`DIR/disks/<id>.<format>`),
//! and how a restore puts the disks back (rolls each one back to the copy)
//! or takes the caller's own disk, TAP or vsock socket instead
//! ([`RestoreOverrides`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_block::Format;
use vireo_devices::virtio::balloon::BalloonConfig;
use vireo_devices::virtio::block::BlockConfig;
use vireo_devices::virtio::console::ConsoleConfig;
use vireo_devices::virtio::net::NetConfig;
use vireo_devices::virtio::rng::RngConfig;
use vireo_devices::virtio::vsock::VsockConfig;

use crate::devices::DeviceConfigs;

/// Where a snapshot keeps its disk copies.
pub const DISKS_DIR: &str = "disks";

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

fn absolute(p: &Path) -> PathBuf {
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
        reason: String,
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

/// A writable disk of the running machine (read-only disks are not
/// copied: the snapshot refers to them where they are).
#[derive(Debug, Clone)]
pub struct DiskFile {
    pub id: String,
    pub path: PathBuf,
    pub format: Format,
}

/// A disk copy in a snapshot (also the `disks` entries of the `snapshot`
/// reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    pub id: String,
    /// The copy's path (absolute at snapshot time).
    pub path: PathBuf,
    /// The copy's name inside the snapshot directory (`disks/<id>.<fmt>`),
    /// what a restore uses (the directory may have moved).
    pub file: String,
    pub format: String,
    /// The copy's length in bytes.
    pub bytes: u64,
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

/// Why a snapshot's disk copies could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CopyDisksError {
    #[error("{}: {source}", .path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Copies are named by disk id.
    #[error("two disks have the id {0}; each disk needs its own id to snapshot this VM")]
    DuplicateId(String),
    #[error("disk id {0:?} cannot name a file; a disk in a snapshot needs an id without '/' that does not start with '.'")]
    IdNotAFileName(String),
    #[error("disk {id}: copying {} to {}: {source}", .from.display(), .to.display())]
    Copy {
        id: String,
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Copy each writable disk into `dir/disks/<id>.<format>` (reflink when
/// the filesystem can, else a sparse copy). The devices must be quiesced
/// (their images flushed) and the vCPUs paused.
pub fn copy_disks(dir: &Path, disks: &[DiskFile]) -> Result<Vec<DiskCopy>, CopyDisksError> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let target = dir.join(DISKS_DIR);
    std::fs::create_dir_all(&target).map_err(|source| CopyDisksError::Dir {
        path: target.clone(),
        source,
    })?;
    let mut copies: Vec<DiskCopy> = Vec::with_capacity(disks.len());
    for d in disks {
        if copies.iter().any(|c| c.id == d.id) {
            return Err(CopyDisksError::DuplicateId(d.id.clone()));
        }
        if d.id.contains('/') || d.id.starts_with('.') {
            return Err(CopyDisksError::IdNotAFileName(d.id.clone()));
        }
        let file = format!("{DISKS_DIR}/{}.{}", d.id, d.format.name());
        let dst = dir.join(&file);
        let started = std::time::Instant::now();
        let (bytes, how) =
            copy_file(&d.path, &dst, false).map_err(|source| CopyDisksError::Copy {
                id: d.id.clone(),
                from: d.path.clone(),
                to: dst.clone(),
                source,
            })?;
        tracing::info!(
            "snapshot: disk {} ({}) copied to {} ({how}, {} MiB, {} ms)",
            d.id,
            d.path.display(),
            dst.display(),
            bytes >> 20,
            started.elapsed().as_millis()
        );
        copies.push(DiskCopy {
            id: d.id.clone(),
            path: absolute(&dst),
            file,
            format: d.format.name().to_string(),
            bytes,
        });
    }
    Ok(copies)
}

/// Copy `src` to `dst`: a reflink (FICLONE) where the filesystem shares
/// blocks, else a copy of the data extents only (SEEK_DATA/SEEK_HOLE), so
/// a sparse image stays sparse. `replace` writes a temporary file next
/// to `dst` and renames it over `dst`; otherwise `dst` must not exist.
/// Returns the length and how it was copied.
pub fn copy_file(src: &Path, dst: &Path, replace: bool) -> std::io::Result<(u64, &'static str)> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let tmp = if replace {
        let mut name = dst.file_name().unwrap_or_default().to_os_string();
        name.push(".vireo-restore.tmp");
        dst.with_file_name(name)
    } else {
        dst.to_path_buf()
    };
    if replace {
        let _ = std::fs::remove_file(&tmp);
    }
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let result = (|| {
        // SAFETY: FICLONE takes the source fd as its argument; both fds
        // are open files owned by this function.
        let cloned = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0;
        if cloned {
            return Ok("reflink");
        }
        to.set_len(len)?;
        sparse_copy(&from, &to, len)?;
        Ok("sparse copy")
    })();
    let how = match result.and_then(|how| to.sync_all().map(|()| how)) {
        Ok(how) => how,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if replace {
        std::fs::rename(&tmp, dst)?;
    }
    Ok((len, how))
}

/// Copy the data extents of `from` (length `len`) to the same offsets of
/// `to` (already `len` long).
fn sparse_copy(from: &File, to: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let seek = |whence: libc::c_int, at: u64| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let r = unsafe { libc::lseek(from.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data past `at`.
                Some(libc::ENXIO) => Ok(None),
                // No SEEK_DATA here: everything is data.
                Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(at)),
                Some(libc::EINVAL) => Ok(Some(len)),
                _ => Err(e),
            };
        }
        Ok(Some(r as u64))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let Some(data) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        let mut off = data;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
        at = end.max(data + 1);
    }
    Ok(())
}

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

fn ids_or_none(ids: &[String]) -> String {
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
        reason: String,
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
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// `vireo run`-style device flags as (flag, options) pairs; a flag
    /// without options (`--rng`) has empty ones.
    fn pairs<'a>(flags: &[&'a str]) -> Vec<(&'a str, &'a str)> {
        let mut out = Vec::new();
        let mut it = flags.iter().peekable();
        while let Some(flag) = it.next() {
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().copied().unwrap_or(""),
                _ => "",
            };
            out.push((*flag, value));
        }
        out
    }

    /// A scratch directory removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir() -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vireo-vsnap-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempdir();
        let src = dir.path().join("a.raw");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let dst = dir.path().join("b.raw");
        let (len, _) = copy_file(&src, &dst, false).unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Refuses to overwrite unless replacing; replacing works.
        assert!(copy_file(&src, &dst, false).is_err());
        std::fs::write(&src, b"short").unwrap();
        copy_file(&src, &dst, true).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"short");
        assert!(!dir.path().join("b.raw.vireo-restore.tmp").exists());
    }

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

    fn saved() -> DeviceConfigs {
        DeviceConfigs {
            disks: vec![
                BlockConfig::from_options("path=/d/root.raw,id=root").unwrap(),
                BlockConfig::from_options("path=/d/data.qcow2,id=data").unwrap(),
            ],
            nets: vec![
                NetConfig::from_options("tap=t0").unwrap(),
                NetConfig::from_options("tap=t1,id=lan").unwrap(),
            ],
            vsock: Some(VsockConfig::from_options("cid=5,socket=/run/a.sock").unwrap()),
            rng: Some(RngConfig::default()),
            console: Some(ConsoleConfig::default()),
            balloon: Some(BalloonConfig::default()),
            backing_dirs: Vec::new(),
        }
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
