//! Virtio devices in snapshots, the front end's part: what `vireo run`
//! records of its devices in a snapshot (so `--restore` rebuilds them with
//! no device flags), the copies of its disks a snapshot holds
//! (`DIR/disks/<id>.<format>`), and how `--restore` puts the disks back
//! (rolls each one back to the copy) or takes the caller's own disk, TAP
//! or vsock socket instead (`--disk id=ID,path=P`, `--net id=ID,tap=T`,
//! `--vsock cid=N,socket=S`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_api::devices::balloon::BalloonConfig;
use vireo_api::devices::block::{BlockConfig, Format};
use vireo_api::devices::console::ConsoleConfig;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::rng::RngConfig;
use vireo_api::devices::vsock::VsockConfig;

use crate::cli::RunArgs;
use crate::devices::DeviceConfigs;
use crate::Failure;

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
    pub fn to_configs(&self) -> Result<DeviceConfigs, String> {
        let mut disks = Vec::new();
        for d in &self.disks {
            let format = match &d.format {
                Some(name) => Some(
                    Format::from_name(name)
                        .ok_or_else(|| format!("disk {}: unknown format {name}", d.id))?,
                ),
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
                mac: n
                    .mac
                    .parse()
                    .map_err(|e| format!("net {}: MAC {}: {e}", n.tap, n.mac))?,
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

/// Copy each writable disk into `dir/disks/<id>.<format>` (reflink when
/// the filesystem can, else a sparse copy). The devices must be quiesced
/// (their images flushed) and the vCPUs paused.
pub fn copy_disks(dir: &Path, disks: &[DiskFile]) -> Result<Vec<DiskCopy>, String> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let target = dir.join(DISKS_DIR);
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    let mut copies: Vec<DiskCopy> = Vec::with_capacity(disks.len());
    for d in disks {
        if copies.iter().any(|c| c.id == d.id) {
            return Err(format!(
                "two disks have the id {}; give each --disk its own id= to snapshot this VM",
                d.id
            ));
        }
        if d.id.contains('/') || d.id.starts_with('.') {
            return Err(format!(
                "disk id {:?} cannot name a file; give the --disk an id= without '/'",
                d.id
            ));
        }
        let file = format!("{DISKS_DIR}/{}.{}", d.id, d.format.name());
        let dst = dir.join(&file);
        let started = std::time::Instant::now();
        let (bytes, how) = copy_file(&d.path, &dst, false).map_err(|e| {
            format!(
                "disk {}: copying {} to {}: {e}",
                d.id,
                d.path.display(),
                dst.display()
            )
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

/// The device flags `--restore` accepts (as overrides); any other device
/// or boot flag is refused.
pub fn check_restore_flags(args: &RunArgs, why: &str) -> Result<(), Failure> {
    let refused = args.rng.is_some()
        || args.balloon.is_some()
        || args.virtio_console.is_some()
        || args.initrd.is_some()
        || args.cmdline.is_some()
        || args.append.is_some();
    if refused {
        return Err(Failure::Usage(format!(
            "{why}: drop --rng, --balloon, --virtio-console, --initrd, --cmdline and --append \
             (--disk id=ID,path=P, --net id=ID,tap=NAME and --vsock cid=N,socket=PATH may replace a saved disk, TAP or socket)"
        )));
    }
    Ok(())
}

/// The devices to rebuild for `--restore DIR`: the snapshot's, with the
/// caller's overrides, and every disk not overridden rolled back to the
/// snapshot's copy (copied over its recorded path). Everything is checked
/// before any disk is written.
pub fn restore_configs(
    dir: &Path,
    frontend: &serde_json::Value,
    args: &RunArgs,
) -> Result<DeviceConfigs, Failure> {
    let usage = |m: String| Failure::Usage(format!("--restore {}: {m}", dir.display()));
    let record: FrontendRecord = if frontend.is_null() {
        FrontendRecord::default()
    } else {
        serde_json::from_value(frontend.clone())
            .map_err(|e| usage(format!("the snapshot's device record does not parse: {e}")))?
    };
    let mut configs = record.virtio.to_configs().map_err(usage)?;
    configs.backing_dirs = args.backing_dir.clone();
    let overridden = apply_overrides(&mut configs, args)?;
    // Check every disk to roll back has its copy before writing any.
    let mut rollbacks = Vec::new();
    for (i, d) in configs.disks.iter_mut().enumerate() {
        if overridden[i] || d.read_only {
            continue;
        }
        let Some(copy) = record.disks.iter().find(|c| c.id == d.id) else {
            return Err(usage(format!(
                "the snapshot holds no copy of disk {}; give it with --disk id={},path=FILE",
                d.id, d.id
            )));
        };
        let src = dir.join(&copy.file);
        let len = std::fs::metadata(&src)
            .map_err(|e| usage(format!("disk {}: {}: {e}", d.id, src.display())))?
            .len();
        if len != copy.bytes {
            return Err(usage(format!(
                "disk {}: {} is {len} bytes, the snapshot recorded {}; the copy was changed",
                d.id,
                src.display(),
                copy.bytes
            )));
        }
        d.format = Format::from_name(&copy.format);
        rollbacks.push((d.id.clone(), src, d.path.clone()));
    }
    for (id, src, dst) in rollbacks {
        let started = std::time::Instant::now();
        let (bytes, how) = copy_file(&src, &dst, true).map_err(|e| {
            Failure::Vm(format!(
                "--restore {}: rolling disk {id} back ({} over {}): {e}",
                dir.display(),
                src.display(),
                dst.display()
            ))
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

/// The flags `--migrate-from` needs and refuses: the target's own
/// machine (`--cpus`, `--memory`, the device flags) is required, the boot
/// flags are refused (the kernel is in the source's memory).
pub fn check_migrate_flags(args: &RunArgs) -> Result<(), Failure> {
    if args.initrd.is_some() || args.cmdline.is_some() || args.append.is_some() {
        return Err(Failure::Usage(
            "--migrate-from takes the running kernel from the source: drop --initrd, --cmdline and --append"
                .into(),
        ));
    }
    if args.cpus.is_none() || args.memory.is_none() {
        return Err(Failure::Usage(
            "--migrate-from: the target needs its own definition of the machine: give --cpus and --memory \
             and the device flags (--disk, --net, --vsock, --rng, --balloon, --virtio-console) the source \
             was started with; the source's machine is checked against them, never taken from it"
                .into(),
        ));
    }
    Ok(())
}

/// The source's device record from its machine configuration.
fn peer_record(frontend: &serde_json::Value) -> Result<FrontendRecord, String> {
    if frontend.is_null() {
        return Ok(FrontendRecord::default());
    }
    serde_json::from_value(frontend.clone())
        .map_err(|e| format!("the source's device record does not parse: {e}"))
}

/// Check the source's record of its virtio devices against this target's
/// own: the same kinds, count and ids; disks of the same formats,
/// read-only flags and serials; network devices with the same MACs (a
/// target `--net` without `mac=` takes the source's: the guest's driver
/// read it at boot) and MTUs; vsock with the same cid. Every difference
/// is named. Only the target's own paths, TAPs and sockets are used;
/// nothing in the record is opened.
pub fn check_peer_devices(
    peer: &DeviceSet,
    own: &DeviceSet,
    mac_given: &[bool],
) -> Result<(), String> {
    let mut diffs: Vec<String> = Vec::new();
    let presence = |what: &str, p: bool, o: bool, flag: &str, diffs: &mut Vec<String>| {
        if p != o {
            diffs.push(format!(
                "the source has {} {what}, this target {} (--{flag})",
                if p { "a" } else { "no" },
                if o { "has one" } else { "has none" }
            ));
        }
    };
    for (what, p, o, flag) in [
        (
            "virtio-console",
            peer.console.is_some(),
            own.console.is_some(),
            "virtio-console",
        ),
        ("rng", peer.rng.is_some(), own.rng.is_some(), "rng"),
        (
            "balloon",
            peer.balloon.is_some(),
            own.balloon.is_some(),
            "balloon",
        ),
        (
            "vsock device",
            peer.vsock.is_some(),
            own.vsock.is_some(),
            "vsock",
        ),
    ] {
        presence(what, p, o, flag, &mut diffs);
    }
    if let (Some((pc, _)), Some((oc, _))) = (&peer.vsock, &own.vsock) {
        if pc != oc {
            diffs.push(format!(
                "vsock: the source's guest has cid={pc}, this target cid={oc}"
            ));
        }
    }
    if peer.disks.len() != own.disks.len() {
        diffs.push(format!(
            "the source has {} disk(s) ({}), this target {} ({}) (--disk)",
            peer.disks.len(),
            ids(peer.disks.iter().map(|d| d.id.as_str())),
            own.disks.len(),
            ids(own.disks.iter().map(|d| d.id.as_str())),
        ));
    } else {
        for (i, (p, o)) in peer.disks.iter().zip(&own.disks).enumerate() {
            if p.id != o.id {
                diffs.push(format!(
                    "disk {i}: the source's has id={}, this target's id={}",
                    p.id, o.id
                ));
                continue;
            }
            let name = |f: &Option<String>| f.clone().unwrap_or_else(|| "none given".into());
            if p.format != o.format {
                diffs.push(format!(
                    "disk {}: format {} at the source, {} here (format=)",
                    o.id,
                    name(&p.format),
                    name(&o.format)
                ));
            }
            if p.read_only != o.read_only {
                let ro = |r: bool| if r { "read-only" } else { "writable" };
                diffs.push(format!(
                    "disk {}: {} at the source, {} here (readonly=)",
                    o.id,
                    ro(p.read_only),
                    ro(o.read_only)
                ));
            }
            if p.serial != o.serial {
                diffs.push(format!(
                    "disk {}: serial {:?} at the source, {:?} here (serial=)",
                    o.id, p.serial, o.serial
                ));
            }
        }
    }
    if peer.nets.len() != own.nets.len() {
        diffs.push(format!(
            "the source has {} network device(s), this target {} (--net)",
            peer.nets.len(),
            own.nets.len()
        ));
    } else {
        for (i, (p, o)) in peer.nets.iter().zip(&own.nets).enumerate() {
            if p.id != o.id {
                diffs.push(format!(
                    "network device {i}: id={} at the source, id={} here",
                    p.id.as_deref().unwrap_or("(none)"),
                    o.id.as_deref().unwrap_or("(none)")
                ));
            }
            if mac_given.get(i).copied().unwrap_or(true) && !p.mac.eq_ignore_ascii_case(&o.mac) {
                diffs.push(format!(
                    "network device {i}: MAC {} at the source, {} here (the guest keeps its MAC; drop mac= or give the source's)",
                    p.mac, o.mac
                ));
            }
            if p.mtu != o.mtu {
                diffs.push(format!(
                    "network device {i}: MTU {:?} at the source, {:?} here (mtu=)",
                    p.mtu, o.mtu
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the source's devices differ from this target's definition: {}",
            diffs.join("; ")
        ))
    }
}

fn ids<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Which `--net` flags name their MAC.
pub fn macs_given(args: &RunArgs) -> Vec<bool> {
    args.net
        .iter()
        .map(|n| n.split(',').any(|kv| kv.trim_start().starts_with("mac=")))
        .collect()
}

/// The devices to build for `--migrate-from`: this target's own (`own`,
/// from its flags), after [`check_peer_devices`] against the source's
/// record in `frontend`; a network device without `mac=` takes the
/// source's MAC. Disks are shared storage: the target's `--disk` names
/// the same image the source runs on.
pub fn migrated_configs(
    frontend: &serde_json::Value,
    mut own: DeviceConfigs,
    mac_given: &[bool],
) -> Result<DeviceConfigs, String> {
    let record = peer_record(frontend)?;
    let own_set = DeviceSet::from_configs(&own);
    check_peer_devices(&record.virtio, &own_set, mac_given)?;
    for (i, (n, p)) in own.nets.iter_mut().zip(&record.virtio.nets).enumerate() {
        if !mac_given.get(i).copied().unwrap_or(true) {
            n.mac = p
                .mac
                .parse()
                .map_err(|e| format!("the source's network device {i}: MAC {}: {e}", p.mac))?;
        }
    }
    Ok(own)
}

/// [`check_peer_devices`] for a machine configuration's `frontend`.
pub fn check_peer_record(
    frontend: &serde_json::Value,
    own: &DeviceSet,
    mac_given: &[bool],
) -> Result<(), String> {
    check_peer_devices(&peer_record(frontend)?.virtio, own, mac_given)
}

/// Apply `--disk`, `--net` and `--vsock` given with `--restore`; returns
/// which disks were overridden.
fn apply_overrides(configs: &mut DeviceConfigs, args: &RunArgs) -> Result<Vec<bool>, Failure> {
    let usage = crate::devices::options_usage;
    let mut overridden = vec![false; configs.disks.len()];
    for s in &args.disk {
        let o = BlockConfig::from_options(s).map_err(usage)?;
        let ids: Vec<&str> = configs.disks.iter().map(|d| d.id.as_str()).collect();
        let Some(i) = configs.disks.iter().position(|d| d.id == o.id) else {
            return Err(Failure::Usage(format!(
                "--disk {s}: the snapshot has no disk with id={} (its disks: {}); with --restore, --disk id=ID,path=FILE replaces a saved disk",
                o.id,
                if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
            )));
        };
        if overridden[i] {
            return Err(Failure::Usage(format!("--disk id={}: given twice", o.id)));
        }
        let d = &mut configs.disks[i];
        tracing::info!(
            "restore: disk {} from {} (instead of {})",
            d.id,
            o.path.display(),
            d.path.display()
        );
        d.path = o.path;
        d.format = o.format;
        overridden[i] = true;
    }
    let mut by_position = 0usize;
    let mut net_done = vec![false; configs.nets.len()];
    for s in &args.net {
        let o = NetConfig::from_options(s).map_err(usage)?;
        let i = match &o.id {
            Some(id) => configs.nets.iter().position(|n| n.id.as_ref() == Some(id)),
            None => {
                by_position += 1;
                Some(by_position - 1).filter(|&i| i < configs.nets.len())
            }
        };
        let Some(i) = i else {
            return Err(Failure::Usage(format!(
                "--net {s}: the snapshot has no such network device ({} saved); with --restore, --net id=ID,tap=NAME (or tap=NAME in order) replaces a saved TAP",
                configs.nets.len()
            )));
        };
        if net_done[i] {
            return Err(Failure::Usage(format!(
                "--net {s}: that device is given twice"
            )));
        }
        net_done[i] = true;
        if s.contains("mac=") && o.mac != configs.nets[i].mac {
            return Err(Failure::Usage(format!(
                "--net {s}: the restored guest keeps MAC {} (its driver read it at boot); drop mac=",
                configs.nets[i].mac
            )));
        }
        tracing::info!(
            "restore: network device {i} on TAP {} (instead of {})",
            o.tap,
            configs.nets[i].tap
        );
        configs.nets[i].tap = o.tap;
    }
    if let Some(s) = &args.vsock {
        let o = VsockConfig::from_options(s).map_err(usage)?;
        let Some(v) = configs.vsock.as_mut() else {
            return Err(Failure::Usage(format!(
                "--vsock {s}: the snapshot has no vsock device"
            )));
        };
        if o.cid != v.cid {
            return Err(Failure::Usage(format!(
                "--vsock {s}: the snapshot's guest has cid={}; keep it (only socket= may change)",
                v.cid
            )));
        }
        v.socket = o.socket;
    }
    Ok(overridden)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::{Seek, SeekFrom, Write};

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

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["run", "--restore", "/x"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(std::iter::once("vireo").chain(v)) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Run(a),
                ..
            }) => a,
            other => panic!("{:?}", other.err()),
        }
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
        assert!(check_restore_flags(&args(&["--rng"]), "--restore").is_err());
        assert!(check_restore_flags(&args(&["--disk", "id=a,path=b"]), "--restore").is_ok());
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
        assert!(matches!(e, Failure::Usage(m) if m.contains("was changed")));
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

    fn own(flags: &[&str]) -> (DeviceConfigs, Vec<bool>) {
        let a = args_migrate(flags);
        (crate::devices::parse(&a).unwrap(), macs_given(&a))
    }

    fn args_migrate(extra: &[&str]) -> RunArgs {
        let mut v = vec![
            "run",
            "--migrate-from",
            "unix:/x",
            "--cpus",
            "1",
            "--memory",
            "64",
        ];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(std::iter::once("vireo").chain(v)) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Run(a),
                ..
            }) => a,
            other => panic!("{:?}", other.err()),
        }
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
            let e = migrated_configs(&record, mine, &macs).unwrap_err();
            assert!(e.contains(says), "expected {says:?} in: {e}");
            assert!(e.contains("differ from this target's definition"), "{e}");
        }
        // No device flags at all against a source with devices.
        let (mine, macs) = own(&[]);
        let e = migrated_configs(&peer(&[("root", "/x", Some("raw"), false)]), mine, &macs)
            .unwrap_err();
        assert!(e.contains("1 disk(s) (root), this target 0 (none)"), "{e}");
        // A record that does not parse.
        let (mine, macs) = own(OWN);
        assert!(migrated_configs(&serde_json::json!({"virtio": 5}), mine, &macs).is_err());
    }

    #[test]
    fn migrate_from_needs_the_targets_own_definition() {
        let bare =
            match crate::cli::Cli::try_parse_from(["vireo", "run", "--migrate-from", "unix:/x"]) {
                Ok(crate::cli::Cli {
                    command: crate::cli::Command::Run(a),
                    ..
                }) => a,
                other => panic!("{:?}", other.err()),
            };
        let e = check_migrate_flags(&bare).err().unwrap();
        assert!(
            matches!(&e, Failure::Usage(m) if m.contains("needs its own definition")),
            "{e:?}"
        );
        assert!(check_migrate_flags(&args_migrate(OWN)).is_ok());
        assert!(check_migrate_flags(&args_migrate(&["--append", "x"])).is_err());
    }
}
