//! Snapshots, restores and clones of the daemon's VMs.
//!
//! A snapshot is `vireo run`'s own (the control socket's `snapshot DIR`)
//! written to `STATE_DIR/vms/NAME/snapshots/TAG/`; the daemon keeps its
//! metadata in the state database. A restore ends the VM's process (if it
//! runs) and starts `vireo run --restore DIR` under the same name, keeping
//! the console like a reboot (`vireo run` rolls the disks back to the
//! snapshot's copies). A clone is a new VM started from a snapshot with
//! `--restore-lazy` (its memory a copy-on-write mapping of the snapshot's
//! memory file), with its own disks (qcow2 overlays backed by the
//! snapshot's qcow2 copies, or copies of its raw ones), its own TAP names
//! and vsock socket: the snapshot must outlive its clones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::oneshot;
use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::vsock::VsockConfig;

use super::{lock, Boot, Daemon, CONTROL_SOCKET, EARLY_EXIT_WAIT};
use crate::clock::rfc3339;
use crate::console::Console;
use crate::db::{SnapshotRecord, VmRecord};
use crate::error::ApiError;
use vireo_api::control::{Command, Reply, SnapshotReport};
use vireo_api::model::{
    check_name, check_tag, pin_macs, CloneVm, CreateSnapshot, Snapshot, SnapshotDisk, VmState,
};

/// How long writing a snapshot may take (a big guest's memory and disks).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The directory under a VM's directory that holds its snapshots.
pub const SNAPSHOTS: &str = "snapshots";
/// The snapshot file `vireo run --restore` needs.
const STATE_FILE: &str = "state.vsnap";

/// Marks a VM busy with a snapshot operation until dropped.
pub(super) struct Busy<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(&self.daemon.inner).busy.remove(&self.name);
    }
}

fn busy(name: &str) -> ApiError {
    ApiError::conflict(
        "busy",
        format!("VM {name} has a snapshot, restore or clone under way; try again when it is done"),
    )
}

fn no_snapshot(name: &str, tag: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("VM {name} has no snapshot {tag:?} (list them with `vireo vm snapshots {name}`)"),
    )
}

/// The default tag: the UTC time, `YYYYmmdd-HHMMSS`.
fn default_tag(secs: i64) -> String {
    // rfc3339 is `YYYY-mm-ddTHH:MM:SSZ`.
    let t: String = rfc3339(secs)
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    t.replace('T', "-")
}

/// Bytes the files under `dir` take on disk (allocated blocks).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// A disk option string with its path (and format, id) replaced.
fn rewrite_disk(options: &str, id: &str, path: &Path, format: &str) -> String {
    let mut out = vec![
        format!("path={}", path.display()),
        format!("id={id}"),
        format!("format={format}"),
    ];
    for (i, part) in options.split(',').enumerate() {
        let key = part.split_once('=').map(|(k, _)| k);
        match key {
            // A bare first word is the path.
            None if i == 0 => {}
            Some("path" | "id" | "format") => {}
            _ => out.push(part.to_string()),
        }
    }
    out.join(",")
}

/// A net option string with its TAP replaced and its MAC dropped (a
/// fresh one is pinned for the clone's own boots).
fn rewrite_net(options: &str, tap: &str) -> String {
    let mut out = vec![format!("tap={tap}")];
    for (i, part) in options.split(',').enumerate() {
        match part.split_once('=').map(|(k, _)| k) {
            None if i == 0 => {}
            Some("tap" | "mac") => {}
            _ => out.push(part.to_string()),
        }
    }
    out.join(",")
}

/// A TAP name for a clone's `index`th network device: at most 15 bytes
/// (IFNAMSIZ - 1), from a hash of the clone's name.
fn clone_tap(clone: &str, index: usize) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, clone.as_bytes());
    let hex: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("vc{hex}n{index}")
}

impl Daemon {
    fn snapshots_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(SNAPSHOTS)
    }

    fn snapshot_dir(&self, name: &str, tag: &str) -> PathBuf {
        self.snapshots_dir(name).join(tag)
    }

    fn snapshot_api(&self, s: &SnapshotRecord) -> Result<Snapshot, ApiError> {
        let clones = lock(&self.inner).db.clones_of(&s.vm, Some(&s.tag))?;
        Ok(Snapshot {
            vm: s.vm.clone(),
            tag: s.tag.clone(),
            created_at: rfc3339(s.created_at),
            vm_state: s.vm_state,
            memory_bytes: s.memory_bytes,
            disks: s.disks.clone(),
            parent: s.parent.clone(),
            size_bytes: s.size_bytes,
            dir: self.snapshot_dir(&s.vm, &s.tag).display().to_string(),
            clones,
        })
    }

    /// Mark `name` busy; 409 if it already is.
    pub(super) fn claim(&self, inner: &mut super::Inner, name: &str) -> Result<Busy<'_>, ApiError> {
        if !inner.busy.insert(name.to_string()) {
            return Err(busy(name));
        }
        Ok(Busy {
            daemon: self,
            name: name.to_string(),
        })
    }

    pub fn list_snapshots(&self, name: &str) -> Result<Vec<Snapshot>, ApiError> {
        let records = {
            let inner = lock(&self.inner);
            inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            inner.db.list_snapshots(name)?
        };
        records.iter().map(|s| self.snapshot_api(s)).collect()
    }

    fn snapshot_record(&self, name: &str, tag: &str) -> Result<SnapshotRecord, ApiError> {
        let inner = lock(&self.inner);
        inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        inner
            .db
            .get_snapshot(name, tag)?
            .ok_or_else(|| no_snapshot(name, tag))
    }

    pub fn get_snapshot(&self, name: &str, tag: &str) -> Result<Snapshot, ApiError> {
        self.snapshot_api(&self.snapshot_record(name, tag)?)
    }

    /// Take a snapshot of a running or paused VM (it stays as it was).
    pub async fn snapshot(&self, name: &str, req: &CreateSnapshot) -> Result<Snapshot, ApiError> {
        if let Some(t) = &req.tag {
            check_tag("tag", t)?;
        }
        let (tag, parent, vm_state, _busy) = {
            let mut inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            let proc = match inner.procs.get(name) {
                Some(p) if rec.state.is_active() => p,
                _ => {
                    return Err(ApiError::conflict(
                        "invalid_state",
                        format!(
                        "VM {name} is {}: a snapshot saves a running or paused VM; start it first",
                        rec.state.as_str()
                    ),
                    ))
                }
            };
            let parent = match (&proc.last_snapshot, req.diff) {
                (_, false) => None,
                (Some(p), true) if inner.db.get_snapshot(name, p)?.is_some() => Some(p.clone()),
                _ => {
                    return Err(ApiError::conflict(
                        "no_parent",
                        format!(
                            "VM {name}: a diff snapshot saves the changes since this run's last snapshot, \
                             and this run has none (left); take a full snapshot first"
                        ),
                    ))
                }
            };
            let tag = match &req.tag {
                Some(t) => {
                    if inner.db.get_snapshot(name, t)?.is_some() {
                        return Err(ApiError::conflict(
                            "already_exists",
                            format!("VM {name} already has a snapshot {t:?}; pick another tag or delete it"),
                        ));
                    }
                    t.clone()
                }
                None => {
                    let base = default_tag(crate::clock::now_secs());
                    let mut t = base.clone();
                    let mut n = 2;
                    while inner.db.get_snapshot(name, &t)?.is_some() {
                        t = format!("{base}-{n}");
                        n += 1;
                    }
                    t
                }
            };
            let b = self.claim(&mut inner, name)?;
            (tag, parent, rec.state, b)
        };
        let dir = self.snapshot_dir(name, &tag);
        // Leftovers of a snapshot that was never recorded (the daemon died
        // while writing it): the tag is free, so is its directory.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| {
                ApiError::internal(format!("removing the stale {}: {e}", dir.display()))
            })?;
        }
        std::fs::create_dir_all(self.snapshots_dir(name)).map_err(|e| {
            ApiError::internal(format!(
                "creating {}: {e}",
                self.snapshots_dir(name).display()
            ))
        })?;
        let command = Command::Snapshot {
            dir: dir.clone(),
            stay_paused: false,
            diff: parent.is_some(),
        };
        tracing::info!("VM {name}: taking snapshot {tag} into {}", dir.display());
        let socket = self.vm_dir(name).join(CONTROL_SOCKET);
        let reply = self
            .control_within(name, &socket, &command, SNAPSHOT_TIMEOUT)
            .await;
        let reply = match reply.map(Reply::into_result) {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ApiError::conflict(
                    "snapshot_failed",
                    format!("VM {name}: {why}"),
                ));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let SnapshotReport {
            memory_bytes,
            disks,
            pause_ms,
            ..
        } = reply.snapshot.unwrap_or_default();
        let record = SnapshotRecord {
            vm: name.to_string(),
            tag: tag.clone(),
            created_at: crate::clock::now_secs(),
            vm_state,
            memory_bytes,
            disks,
            parent,
            size_bytes: disk_usage(&dir),
        };
        {
            let mut inner = lock(&self.inner);
            if !inner.db.create_snapshot(&record)? {
                return Err(ApiError::internal(format!(
                    "VM {name}: snapshot {tag} was recorded twice"
                )));
            }
            if let Some(p) = inner.procs.get_mut(name) {
                p.last_snapshot = Some(tag.clone());
            }
        }
        tracing::info!(
            "VM {name}: snapshot {tag} taken ({} MiB of memory, {} disk(s), {} MiB on disk, paused {} ms)",
            memory_bytes >> 20,
            record.disks.len(),
            record.size_bytes >> 20,
            pause_ms
        );
        self.snapshot_api(&record)
    }

    /// Delete a snapshot no clone and no diff snapshot depends on.
    pub fn delete_snapshot(&self, name: &str, tag: &str) -> Result<(), ApiError> {
        let mut inner = lock(&self.inner);
        inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        if inner.db.get_snapshot(name, tag)?.is_none() {
            return Err(no_snapshot(name, tag));
        }
        let clones = inner.db.clones_of(name, Some(tag))?;
        if !clones.is_empty() {
            return Err(ApiError::conflict(
                "in_use",
                format!(
                    "snapshot {tag} of VM {name} backs the clone(s) {}; delete them first",
                    clones.join(", ")
                ),
            ));
        }
        let children = inner.db.snapshot_children(name, tag)?;
        if !children.is_empty() {
            return Err(ApiError::conflict(
                "in_use",
                format!(
                    "snapshot {tag} of VM {name} is the parent of the diff snapshot(s) {}; delete them first",
                    children.join(", ")
                ),
            ));
        }
        if inner.busy.contains(name) {
            return Err(busy(name));
        }
        let dir = self.snapshot_dir(name, tag);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
        }
        inner.db.delete_snapshot(name, tag)?;
        if let Some(p) = inner.procs.get_mut(name) {
            if p.last_snapshot.as_deref() == Some(tag) {
                p.last_snapshot = None;
            }
        }
        tracing::info!("VM {name}: deleted snapshot {tag}");
        Ok(())
    }

    /// The snapshot's directory, checked to still hold its state file.
    fn snapshot_files(&self, name: &str, tag: &str) -> Result<PathBuf, ApiError> {
        let dir = self.snapshot_dir(name, tag);
        if !dir.join(STATE_FILE).is_file() {
            return Err(ApiError::conflict(
                "snapshot_missing",
                format!(
                    "snapshot {tag} of VM {name}: {} is gone; delete the snapshot",
                    dir.join(STATE_FILE).display()
                ),
            ));
        }
        Ok(dir)
    }

    /// Start the VM from its snapshot `tag`: a running VM's process ends
    /// first (its console stays, like a reboot); `vireo run --restore`
    /// rolls its disks back to the snapshot's copies.
    pub async fn restore(self: &Arc<Self>, name: &str, tag: &str) -> Result<VmRecord, ApiError> {
        check_tag("tag", tag)?;
        let dir = {
            self.snapshot_record(name, tag)?;
            self.snapshot_files(name, tag)?
        };
        let boot = Boot::Restore {
            dir,
            lazy: false,
            overrides: Vec::new(),
        };
        let (early_rx, old, _busy) = {
            let mut inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            let b = self.claim(&mut inner, name)?;
            match inner.procs.get_mut(name) {
                Some(p) if rec.state.is_active() => {
                    p.reboot = true;
                    p.then = boot;
                    (None, Some(p.id), b)
                }
                _ => {
                    let (tx, rx) = oneshot::channel();
                    inner.guest_resets.remove(name);
                    self.launch(&mut inner, &rec, Console::new(), Some(tx), &boot)?;
                    (Some(rx), None, b)
                }
            }
        };
        tracing::info!("VM {name}: restoring snapshot {tag}");
        if let Some(id) = old {
            if crate::procfs::is_same_process(id.pid, id.start_time) {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // was just checked to still be the VM's process.
                unsafe { libc::kill(id.pid, libc::SIGKILL) };
            }
            if !self.wait_exit(name, id, super::KILL_WAIT).await {
                return Err(ApiError::internal(format!(
                    "VM {name} (pid {}) did not end to restore snapshot {tag}",
                    id.pid
                )));
            }
        }
        self.settle(
            name,
            early_rx,
            "restore_failed",
            &format!("restoring snapshot {tag}"),
        )
        .await
    }

    /// After a launch: wait the short while a VM that fails at once takes
    /// to fail, and report that failure as `code`.
    async fn settle(
        &self,
        name: &str,
        early: Option<oneshot::Receiver<Option<super::Outcome>>>,
        code: &'static str,
        what: &str,
    ) -> Result<VmRecord, ApiError> {
        let failed = |reason: &str| {
            ApiError::new(
                StatusCode::CONFLICT,
                code,
                format!("VM {name}: {what} failed: {reason}"),
            )
        };
        match early {
            Some(rx) => {
                if let Ok(Ok(Some(o))) = tokio::time::timeout(EARLY_EXIT_WAIT, rx).await {
                    return Err(failed(&o.reason));
                }
            }
            None => {
                // Restarted by on_exit: poll the record for an early end.
                let deadline = tokio::time::Instant::now() + EARLY_EXIT_WAIT;
                while tokio::time::Instant::now() < deadline {
                    let rec = self.get(name)?;
                    if !rec.state.is_active() {
                        return Err(failed(rec.last_exit.as_deref().unwrap_or("it ended")));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let rec = self.get(name)?;
        if !rec.state.is_active() {
            return Err(failed(rec.last_exit.as_deref().unwrap_or("it ended")));
        }
        Ok(rec)
    }

    /// A new VM `req.name` started from `origin`'s snapshot, with its own
    /// disks (overlays of the snapshot's), TAPs and vsock socket, its
    /// memory mapped copy-on-write from the snapshot's.
    pub async fn clone_vm(
        self: &Arc<Self>,
        origin: &str,
        req: &CloneVm,
    ) -> Result<VmRecord, ApiError> {
        check_name(&req.name)?;
        check_tag("from_snapshot", &req.from_snapshot)?;
        let new = req.name.as_str();
        let tag = req.from_snapshot.as_str();
        let snap = self.snapshot_record(origin, tag)?;
        let snap_dir = self.snapshot_files(origin, tag)?;
        let (rec, _busy) = {
            let mut inner = lock(&self.inner);
            let rec = inner
                .db
                .get(origin)?
                .ok_or_else(|| ApiError::no_vm(origin))?;
            if inner.db.get(new)?.is_some() {
                return Err(ApiError::conflict(
                    "already_exists",
                    format!("a VM named {new:?} already exists"),
                ));
            }
            let b = self.claim(&mut inner, new)?;
            (rec, b)
        };
        let dir = self.vm_dir(new);
        // A directory left by an earlier VM of that name (deleted by hand).
        let _ = std::fs::remove_dir_all(&dir);
        let made = self.clone_devices(&rec, &snap, &snap_dir, new, &dir).await;
        let (cfg, overrides) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let boot = Boot::Restore {
            dir: snap_dir,
            lazy: true,
            overrides,
        };
        let early = {
            let mut inner = lock(&self.inner);
            if !inner.db.create(new, &cfg)? {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ApiError::conflict(
                    "already_exists",
                    format!("a VM named {new:?} already exists"),
                ));
            }
            inner.db.set_origin(new, origin, tag)?;
            inner.consoles.remove(new);
            let created = inner.db.get(new)?.ok_or_else(|| {
                ApiError::internal(format!("clone {new} vanished from the database"))
            })?;
            self.observe.vm(
                new,
                crate::observe::Change::Created,
                Some(VmState::Stopped),
                &format!("cloned from {origin}@{tag}"),
            );
            let (tx, rx) = oneshot::channel();
            if let Err(e) = self.launch(&mut inner, &created, Console::new(), Some(tx), &boot) {
                let _ = inner.db.delete(new);
                drop(inner);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            rx
        };
        tracing::info!("VM {new}: cloned from snapshot {tag} of VM {origin}");
        match self
            .settle(
                new,
                Some(early),
                "clone_failed",
                &format!("cloning {origin}@{tag}"),
            )
            .await
        {
            Ok(rec) => Ok(rec),
            Err(e) => {
                // Undo: a clone that never ran is no use to anyone.
                let _ = self.delete(new);
                Err(e)
            }
        }
    }

    /// The clone's definition and its `--restore` device overrides: its
    /// disks made in `dir/disks/`, new TAP names, its own vsock socket.
    async fn clone_devices(
        &self,
        rec: &VmRecord,
        snap: &SnapshotRecord,
        snap_dir: &Path,
        new: &str,
        dir: &Path,
    ) -> Result<(vireo_api::model::VmConfig, Vec<String>), ApiError> {
        let mut cfg = rec.config.clone();
        let mut overrides = Vec::new();
        let invalid = |what: String| ApiError::conflict("invalid_origin", what);
        let disks_dir = dir.join("disks");
        if !cfg.devices.disks.is_empty() {
            std::fs::create_dir_all(&disks_dir).map_err(|e| {
                ApiError::internal(format!("creating {}: {e}", disks_dir.display()))
            })?;
        }
        let mut disks = Vec::new();
        for options in &cfg.devices.disks {
            let disk = BlockConfig::from_options(options).map_err(|e| {
                invalid(format!("VM {}: disk {options:?}: {}", rec.name, e.message))
            })?;
            let Some(copy) = snap.disks.iter().find(|d| d.id == disk.id) else {
                return Err(invalid(format!(
                    "snapshot {} of VM {} holds no copy of disk {:?}; a clone needs every disk captured",
                    snap.tag, rec.name, disk.id
                )));
            };
            let (path, format) = clone_disk(&self.vmm, copy, snap_dir, &disks_dir).await?;
            overrides.push(format!(
                "--disk=id={},path={},format={format}",
                disk.id,
                path.display()
            ));
            disks.push(rewrite_disk(options, &disk.id, &path, format));
        }
        cfg.devices.disks = disks;
        let mut nets = Vec::new();
        for (i, options) in cfg.devices.nets.iter().enumerate() {
            let net = NetConfig::from_options(options)
                .map_err(|e| invalid(format!("VM {}: net {options:?}: {}", rec.name, e.message)))?;
            let tap = clone_tap(new, i);
            overrides.push(match &net.id {
                Some(id) => format!("--net=id={id},tap={tap}"),
                None => format!("--net=tap={tap}"),
            });
            nets.push(rewrite_net(options, &tap));
        }
        cfg.devices.nets = nets;
        pin_macs(&mut cfg.devices);
        if let Some(options) = &cfg.devices.vsock {
            let v = VsockConfig::from_options(options).map_err(|e| {
                invalid(format!("VM {}: vsock {options:?}: {}", rec.name, e.message))
            })?;
            let socket = dir.join("vsock.sock");
            let s = format!("cid={},socket={}", v.cid, socket.display());
            overrides.push(format!("--vsock={s}"));
            cfg.devices.vsock = Some(s);
        }
        Ok((cfg, overrides))
    }
}

/// A clone's own disk in `disks_dir` from the snapshot's copy `copy`
/// (its path relative to `snap_dir` unless absolute): a qcow2 overlay
/// backed by a qcow2 copy (made with `vmm image create --backing`), or a
/// copy of a raw one. Returns the new file and its format.
pub async fn clone_disk(
    vmm: &Path,
    copy: &SnapshotDisk,
    snap_dir: &Path,
    disks_dir: &Path,
) -> Result<(PathBuf, &'static str), ApiError> {
    let mut src = PathBuf::from(&copy.path);
    if src.is_relative() {
        src = snap_dir.join(src);
    }
    if copy.id.is_empty() || copy.id.contains(['/', '\0']) || copy.id.starts_with('.') {
        return Err(ApiError::conflict(
            "invalid_origin",
            format!("the snapshot's disk id {:?} cannot name a file", copy.id),
        ));
    }
    match copy.format.as_str() {
        "qcow2" => {
            let path = disks_dir.join(format!("{}.qcow2", copy.id));
            make_overlay(vmm, &src, &path).await?;
            Ok((path, "qcow2"))
        }
        _ => {
            let path = disks_dir.join(format!("{}.raw", copy.id));
            copy_sparse(&src, &path).await?;
            Ok((path, "raw"))
        }
    }
}

/// `vireo image create OVERLAY --backing BASE`.
async fn make_overlay(vmm: &Path, base: &Path, overlay: &Path) -> Result<(), ApiError> {
    let out = tokio::process::Command::new(vmm)
        .arg("image")
        .arg("create")
        .arg(overlay)
        .arg("--backing")
        .arg(base)
        .output()
        .await
        .map_err(|e| ApiError::internal(format!("running vireo image create: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "creating the overlay {} over {}: {}",
            overlay.display(),
            base.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copy a raw image, sharing blocks (reflink) where the filesystem can and
/// skipping holes otherwise: coreutils' cp does both.
async fn copy_sparse(from: &Path, to: &Path) -> Result<(), ApiError> {
    let out = tokio::process::Command::new("cp")
        .arg("--reflink=auto")
        .arg("--sparse=always")
        .arg("--")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| ApiError::internal(format!("running cp: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "copying {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tags_are_utc_timestamps() {
        assert_eq!(default_tag(0), "19700101-000000");
        assert_eq!(default_tag(1_732_400_000), "20241123-221320");
        assert!(check_tag("tag", &default_tag(1_732_400_000)).is_ok());
    }

    #[test]
    fn disk_and_net_options_are_rewritten_for_a_clone() {
        let p = Path::new("/s/vms/c/disks/root.qcow2");
        assert_eq!(
            rewrite_disk("/img/a.raw", "a", p, "qcow2"),
            "path=/s/vms/c/disks/root.qcow2,id=a,format=qcow2"
        );
        assert_eq!(
            rewrite_disk(
                "path=/img/a.raw,readonly=on,id=root,format=raw,serial=X",
                "root",
                p,
                "qcow2"
            ),
            "path=/s/vms/c/disks/root.qcow2,id=root,format=qcow2,readonly=on,serial=X"
        );
        // The rewritten options parse and say what they should.
        let d =
            BlockConfig::from_options(&rewrite_disk("/img/a.raw,ops=10", "a", p, "qcow2")).unwrap();
        assert_eq!((d.path.as_path(), d.id.as_str()), (p, "a"));
        assert_eq!(
            rewrite_net("tap0,mac=52:54:00:00:00:01,id=net0,mtu=1400", "vcabn0"),
            "tap=vcabn0,id=net0,mtu=1400"
        );
        let n = NetConfig::from_options(&rewrite_net("tap=tap0,id=n", "vc1n0")).unwrap();
        assert_eq!((n.tap.as_str(), n.id.as_deref()), ("vc1n0", Some("n")));
    }

    #[test]
    fn clone_taps_fit_ifnamsiz_and_differ() {
        let long = "x".repeat(63);
        let a = clone_tap(&long, 7);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(clone_tap("a", 0), clone_tap("b", 0));
        assert_ne!(clone_tap("a", 0), clone_tap("a", 1));
    }

    /// A raw disk copy for a clone: the same bytes, holes kept.
    #[test]
    fn a_raw_disk_is_copied_sparse() {
        let dir = std::env::temp_dir().join(format!("vireo-clone-raw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("snap/disks")).unwrap();
        std::fs::create_dir_all(dir.join("clone")).unwrap();
        let src = dir.join("snap/disks/root.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 1 << 20).unwrap();
        let copy = SnapshotDisk {
            id: "root".into(),
            path: "disks/root.raw".into(),
            format: "raw".into(),
            bytes: 64 << 20,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (path, format) = rt
            .block_on(clone_disk(
                Path::new("/nonexistent/vireo"),
                &copy,
                &dir.join("snap"),
                &dir.join("clone"),
            ))
            .unwrap();
        assert_eq!((path.clone(), format), (dir.join("clone/root.raw"), "raw"));
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 64 << 20);
        assert_eq!(&got[1 << 20..(1 << 20) + 5], b"hello");
        assert!(
            disk_usage(&dir.join("clone")) < 8 << 20,
            "the copy of a sparse disk is not sparse"
        );
        // A bad id from a damaged record names no file outside the directory.
        let bad = SnapshotDisk {
            id: "../x".into(),
            ..copy
        };
        let e = rt
            .block_on(clone_disk(
                Path::new("/x"),
                &bad,
                &dir.join("snap"),
                &dir.join("clone"),
            ))
            .unwrap_err();
        assert_eq!(e.code, "invalid_origin");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn disk_usage_counts_allocated_blocks() {
        let dir = std::env::temp_dir().join(format!("vireo-du-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("disks")).unwrap();
        std::fs::write(dir.join("memory.raw"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::write(dir.join("disks/a.raw"), vec![1u8; 8192]).unwrap();
        // A sparse file takes (almost) nothing.
        let f = std::fs::File::create(dir.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        let used = disk_usage(&dir);
        assert!(
            (72 * 1024..(1 << 20)).contains(&used),
            "{used} bytes counted"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
