//! The VMs' processes: each running VM is a `vireo run` child in its own
//! session, so it outlives the daemon. Its serial console (stdout) is a pipe
//! the daemon reads into a scrollback ring; its stderr (vireo's log, at info
//! level) goes to `vms/NAME/vireo.log` in the state directory and tells why
//! the VM ended.
//!
//! The child also inherits the pipe's read end as fd 3 and never reads it:
//! it keeps the pipe open while no daemon runs, so the guest's console
//! writes do not fail with EPIPE (they block once the 1 MiB pipe buffer is
//! full, until a daemon re-adopts the VM). A restarted daemon re-attaches to
//! the console by opening /proc/PID/fd/1.
//!
//! The console's input is a second pipe, the child's stdin: the daemon
//! writes what WebSocket clients type into it (see [`crate::console`]). The
//! child inherits its write end as fd 4 (and never writes it), so its stdin
//! never reaches EOF while no daemon runs; a restarted daemon re-opens
//! /proc/PID/fd/0 for writing.
//!
//! A reboot (`POST .../reboot`, or the guest resetting the machine) ends the
//! VM process with "reset"; the daemon then starts the same definition
//! again as a new process, keeping the console (scrollback and subscribers).
//! Guest resets are capped ([`MAX_GUEST_RESETS`] in [`GUEST_RESET_WINDOW`])
//! so a guest that resets at once on every boot ends stopped.
//!
//! Children this daemon started are reaped with wait(), which gives the exit
//! status; adopted ones (started by an earlier daemon) are polled in /proc
//! (pid + start time) and their end is read from their log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use crate::console::Console;
use crate::db::{Db, ProcessId, VmRecord};
use crate::error::ApiError;
use crate::observe::{Change, ConsoleTap, Observe};
use crate::procfs;
use crate::storage::Storage;
use vireo_api::control::{Command, Reply, ReplyError};
use vireo_api::model::{
    check_config, check_name, pin_macs, BalloonStatus, CreateVm, StopVm, UpdateVm, VmState,
    DEFAULT_STOP_TIMEOUT_SECS, MAX_STOP_TIMEOUT_SECS,
};
use vireo_api::vm::Accel;
use vireo_sandbox::jail::JailIds;

/// How long `start` waits for a VM that fails at once (bad kernel, no
/// /dev/kvm) so it can answer with the reason instead of "running".
const EARLY_EXIT_WAIT: Duration = Duration::from_millis(250);
/// How often adopted VMs are checked in /proc.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// How long a SIGKILLed VM may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Pipe buffer for the console while no daemon reads it.
const CONSOLE_PIPE_SIZE: libc::c_int = 1 << 20;
/// The log file of a VM's `vireo run` (its stderr).
pub const VM_LOG: &str = "vireo.log";
/// The `vireo run --control-socket` of each VM, in its directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// How long a pause or resume may take before the API gives up.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Guest-initiated resets allowed in [`GUEST_RESET_WINDOW`]; one more and
/// the VM is left stopped (a boot loop).
pub const MAX_GUEST_RESETS: usize = 5;
pub const GUEST_RESET_WINDOW: Duration = Duration::from_secs(60);
/// What `vireo run` logs when the guest resets the machine, and the reason
/// recorded for it.
const GUEST_RESET: &str = "the guest reset the machine";
/// What `vireo run` logs when its control socket's `reset` ended the VM.
const RESET_ON_REQUEST: &str = "the VM was reset on request";

mod jail;
mod migrate;
mod snapshots;

pub use migrate::{Migrate, MigrateInReady, Migrated, MigrationTls};
pub use snapshots::clone_disk;

/// How a VM's process starts: booting its definition, or from a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Boot {
    #[default]
    Definition,
    /// `vireo run --restore DIR [--restore-lazy]` plus device overrides
    /// (`--disk=id=..,path=..`, ... for a clone's own disks, TAPs, vsock).
    Restore {
        dir: PathBuf,
        lazy: bool,
        overrides: Vec<String>,
    },
    /// `vireo run --migrate-from LISTEN` with the daemon's TLS identity,
    /// the one-time secret the source must send, and the VM's own
    /// definition (vCPUs, memory, devices): the target builds that
    /// machine and refuses a source whose machine differs.
    MigrateFrom {
        listen: String,
        cert: PathBuf,
        key: PathBuf,
        secret_file: PathBuf,
    },
}

/// A VM process the daemon watches.
struct Proc {
    id: ProcessId,
    /// Set when the daemon itself signalled the VM: the reason to record.
    requested: Option<String>,
    /// Set by `reboot`: start the VM again when this process ends.
    reboot: bool,
    /// With `reboot`: how to start it again (a snapshot restore).
    then: Boot,
    /// The tag of the last snapshot this process took (a diff snapshot's
    /// parent).
    last_snapshot: Option<String>,
    /// Started to receive a migration: if it fails to (exit status 2),
    /// the VM's record goes.
    incoming: bool,
}

impl Proc {
    fn new(id: ProcessId) -> Proc {
        Proc {
            id,
            requested: None,
            reboot: false,
            then: Boot::Definition,
            last_snapshot: None,
            incoming: false,
        }
    }
}

struct Inner {
    db: Db,
    procs: HashMap<String, Proc>,
    consoles: HashMap<String, Arc<Console>>,
    /// When each VM's guest last reset itself (within the window).
    guest_resets: HashMap<String, VecDeque<Instant>>,
    /// VMs with a snapshot, restore or clone under way (one at a time).
    busy: HashSet<String>,
}

/// How a VM process ended, as far as the daemon can tell.
#[derive(Debug, Clone, Copy)]
enum Exit {
    /// Reaped by this daemon.
    Status(ExitStatus),
    /// An adopted process vanished; its status is unknown.
    Unknown,
}

/// The state and reason recorded for an exit, and whether it was a start
/// failure (`vireo run` exit status 2: bad input).
#[derive(Debug, Clone)]
struct Outcome {
    state: VmState,
    reason: String,
    start_failed: bool,
}

pub struct Daemon {
    inner: Mutex<Inner>,
    state_dir: PathBuf,
    vmm: PathBuf,
    /// Where host files named through the API may come from.
    pub storage: Storage,
    /// The event stream and the API counters.
    pub observe: Observe,
    /// The TLS identity migrations are received with (set when the
    /// daemon has a TCP listener).
    pub migration_tls: std::sync::OnceLock<MigrationTls>,
    /// `vireo serve --no-jail`: VMs run unjailed, as root (debugging).
    no_jail: std::sync::atomic::AtomicBool,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    /// `vmm` is the `vireo` binary that runs VMs (`vireo run`); host files
    /// named through the API must be in `storage`.
    pub fn new(db: Db, state_dir: PathBuf, vmm: PathBuf, storage: Storage) -> Arc<Daemon> {
        Arc::new(Daemon {
            inner: Mutex::new(Inner {
                db,
                procs: HashMap::new(),
                consoles: HashMap::new(),
                guest_resets: HashMap::new(),
                busy: HashSet::new(),
            }),
            state_dir,
            vmm,
            storage,
            observe: Observe::default(),
            migration_tls: std::sync::OnceLock::new(),
            no_jail: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `vireo serve --no-jail`: start VMs without the jail (each start
    /// logs a warning and an audit line).
    pub fn set_no_jail(&self, no_jail: bool) {
        self.no_jail
            .store(no_jail, std::sync::atomic::Ordering::Relaxed);
    }

    /// The jail ids for a VM about to start (None: no jail), its directory
    /// made theirs.
    fn jail_ids(&self, inner: &Inner, name: &str) -> Result<Option<JailIds>, ApiError> {
        if self.no_jail.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let used: Vec<u32> = inner
            .procs
            .values()
            .filter_map(|p| jail::uid_of(p.id.pid))
            .collect();
        let ids = jail::pick_ids(&used).ok_or_else(|| {
            ApiError::conflict(
                "no_jail_ids",
                format!(
                    "cannot start VM {name}: all {} jail uids are in use",
                    jail::UID_SLOTS
                ),
            )
        })?;
        jail::prepare(&self.state_dir, &self.vm_dir(name), name, ids).map_err(|e| {
            ApiError::internal(format!("cannot prepare the jail of VM {name}: {e}"))
        })?;
        Ok(Some(ids))
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("vms").join(name)
    }

    /// The daemon-made disks of a VM (a clone's), allowed besides the
    /// storage directories for that VM only.
    fn own_disks(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("disks")
    }

    /// Give every stored disk without `format=` (records from before
    /// formats were fixed at define time) the format its first bytes show
    /// now, once, and log it. Runs at start, before any VM is started.
    pub fn pin_formats(&self) -> Result<(), ApiError> {
        let mut inner = lock(&self.inner);
        for rec in inner.db.list()? {
            let mut cfg = rec.config.clone();
            let mut changed = Vec::new();
            for s in &mut cfg.devices.disks {
                if crate::storage::disk_format(s).is_some() {
                    continue;
                }
                let Ok(disk) = vireo_api::devices::block::BlockConfig::from_options(s) else {
                    continue;
                };
                match crate::storage::probe_path(&disk.path) {
                    Ok(format) => {
                        *s = crate::storage::rewrite_disk(s, &disk.path, format);
                        changed.push(format!("{} as {}", disk.path.display(), format.name()));
                    }
                    Err(e) => tracing::warn!(
                        "VM {}: cannot probe disk {} to record its format: {e}; the VM will not start until its disks say format=",
                        rec.name,
                        disk.path.display()
                    ),
                }
            }
            if !changed.is_empty() {
                inner.db.update(&rec.name, &cfg)?;
                tracing::info!(
                    "VM {}: recorded disk formats once (the record had none): {}",
                    rec.name,
                    changed.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The control socket of the VM's `vireo run` process.
    pub fn control_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(CONTROL_SOCKET)
    }

    /// After a (re)start: adopt VM processes that still run, and mark the
    /// others stopped with the reason. Must run inside the tokio runtime.
    pub fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        let mut inner = lock(&self.inner);
        for rec in inner.db.list()? {
            if !rec.state.is_active() {
                continue;
            }
            match rec.process {
                Some(p) if procfs::is_same_process(p.pid, p.start_time) => {
                    tracing::info!("re-adopting VM {} (pid {})", rec.name, p.pid);
                    let console = Console::new();
                    inner
                        .consoles
                        .insert(rec.name.clone(), Arc::clone(&console));
                    inner.procs.insert(rec.name.clone(), Proc::new(p));
                    if let Some(tx) = reattach_input(p.pid) {
                        console.attach_input(tx);
                    }
                    let console = reattach_console(p.pid)
                        .map(|rx| spawn_pump(rx, console, self.observe.console_tap(&rec.name)));
                    let me = Arc::clone(self);
                    let name = rec.name.clone();
                    tokio::spawn(async move {
                        while procfs::is_same_process(p.pid, p.start_time) {
                            tokio::time::sleep(ADOPTED_POLL).await;
                        }
                        drain(console).await;
                        me.on_exit(&name, p, Exit::Unknown);
                    });
                }
                _ => {
                    let log = read_log_tail(&self.vm_dir(&rec.name));
                    let mut o = outcome(Exit::Unknown, None, &log);
                    o.reason = format!("{} (found gone when the daemon restarted)", o.reason);
                    tracing::info!("VM {}: {}", rec.name, o.reason);
                    inner.db.set_exited(&rec.name, o.state, &o.reason)?;
                    self.observe
                        .vm(&rec.name, exit_change(o.state), Some(o.state), &o.reason);
                }
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, ApiError> {
        Ok(lock(&self.inner).db.list()?)
    }

    pub fn get(&self, name: &str) -> Result<VmRecord, ApiError> {
        lock(&self.inner)
            .db
            .get(name)?
            .ok_or_else(|| ApiError::no_vm(name))
    }

    pub fn create(&self, req: &CreateVm) -> Result<VmRecord, ApiError> {
        check_name(&req.name)?;
        let mut cfg = req.config();
        self.storage.confine(&mut cfg, None)?;
        check_config(&cfg, vireo_api::host::memory())?;
        pin_macs(&mut cfg.devices);
        let mut inner = lock(&self.inner);
        if !inner.db.create(&req.name, &cfg)? {
            return Err(ApiError::conflict(
                "already_exists",
                format!("a VM named {:?} already exists", req.name),
            ));
        }
        inner.consoles.remove(&req.name);
        tracing::info!("created VM {}", req.name);
        let rec = inner.db.get(&req.name)?.expect("just created");
        self.observe
            .vm(&req.name, Change::Created, Some(rec.state), "created");
        Ok(rec)
    }

    pub fn update(&self, name: &str, req: &UpdateVm) -> Result<VmRecord, ApiError> {
        let mut inner = lock(&self.inner);
        let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        if rec.state.is_active() {
            return Err(ApiError::conflict(
                "invalid_state",
                format!(
                    "VM {name} is {}: stop it before changing its definition",
                    rec.state.as_str()
                ),
            ));
        }
        let mut cfg = req.apply(&rec.config);
        self.storage
            .confine(&mut cfg, Some(&self.own_disks(name)))?;
        check_config(&cfg, vireo_api::host::memory())?;
        pin_macs(&mut cfg.devices);
        inner.db.update(name, &cfg)?;
        Ok(inner.db.get(name)?.expect("just updated"))
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = lock(&self.inner);
        let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        if rec.state.is_active() {
            return Err(ApiError::conflict(
                "invalid_state",
                format!(
                    "VM {name} is {}: stop or kill it before deleting it",
                    rec.state.as_str()
                ),
            ));
        }
        let clones = inner.db.clones_of(name, None)?;
        if !clones.is_empty() {
            return Err(ApiError::conflict(
                "in_use",
                format!(
                    "VM {name} has clones made from its snapshots ({}); delete them first",
                    clones.join(", ")
                ),
            ));
        }
        if inner.busy.contains(name) {
            return Err(ApiError::conflict(
                "busy",
                format!("VM {name} has a snapshot operation under way; try again when it is done"),
            ));
        }
        inner.db.delete(name)?;
        inner.consoles.remove(name);
        drop(inner);
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        jail::forget(&self.state_dir, name);
        tracing::info!("deleted VM {name}");
        self.observe.vm(name, Change::Deleted, None, "deleted");
        Ok(())
    }

    /// The console scrollback of a VM (empty if it never ran under this daemon).
    pub fn console(&self, name: &str) -> Result<Vec<u8>, ApiError> {
        let inner = lock(&self.inner);
        if inner.db.get(name)?.is_none() {
            return Err(ApiError::no_vm(name));
        }
        Ok(inner
            .consoles
            .get(name)
            .map(|c| c.contents())
            .unwrap_or_default())
    }

    /// The daemon is shutting down: let go of every console's subscribers.
    pub fn close_consoles(&self) {
        for c in lock(&self.inner).consoles.values() {
            c.close();
        }
    }

    /// The VM's console, for live subscribers: its scrollback and output
    /// from now on (a stopped VM's console reports the stop at once).
    pub fn live_console(&self, name: &str) -> Result<Arc<Console>, ApiError> {
        let mut inner = lock(&self.inner);
        let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        let live = rec.state.is_active() && inner.procs.contains_key(name);
        let console = Arc::clone(
            inner
                .consoles
                .entry(name.to_string())
                .or_insert_with(Console::new),
        );
        if !live {
            console.end(rec.last_exit.as_deref().unwrap_or("never started"));
        }
        Ok(console)
    }

    /// Start the VM's `vireo run` process.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            if rec.state.is_active() {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!(
                        "VM {name} is already {} (pid {})",
                        rec.state.as_str(),
                        rec.process.map(|p| p.pid).unwrap_or(0)
                    ),
                ));
            }
            check_config(&rec.config, vireo_api::host::memory())?;
            let console = Console::new();
            inner.guest_resets.remove(name);
            self.launch(&mut inner, &rec, console, Some(tx), &Boot::Definition)?;
        }
        if let Ok(Ok(Some(o))) = tokio::time::timeout(EARLY_EXIT_WAIT, rx).await {
            if o.start_failed {
                return Err(ApiError::bad_request(
                    "start_failed",
                    format!("VM {name} did not start: {}", o.reason),
                ));
            }
        }
        self.get(name)
    }

    /// Spawn `rec`'s `vireo run` with `console`, record it running, and
    /// watch it; its outcome goes to `early` when given.
    fn launch(
        self: &Arc<Self>,
        inner: &mut Inner,
        rec: &VmRecord,
        console: Arc<Console>,
        early: Option<oneshot::Sender<Option<Outcome>>>,
        boot: &Boot,
    ) -> Result<ProcessId, ApiError> {
        let name = rec.name.as_str();
        let dir = self.vm_dir(name);
        // Every host path again, at each start (a restore runs the same
        // disks): a symlink swapped in since the VM was defined is refused
        // here; an incoming migration runs this host's definition, checked
        // the same way.
        let _opened = self
            .storage
            .recheck(&rec.config, Some(&self.own_disks(name)))?;
        let ids = self.jail_ids(inner, name)?;
        let jail_args = match ids {
            Some(ids) => jail::run_args(&self.state_dir, rec, ids),
            None => vec!["--no-jail".into()],
        };
        let (mut child, output, input) = spawn_vm(&self.vmm, &dir, rec, boot, &jail_args)
            .map_err(|e| ApiError::internal(format!("cannot start VM {name}: {e}")))?;
        let pid = child.id().unwrap_or(0) as i32;
        if ids.is_none() {
            tracing::warn!("VM {name} (pid {pid}) runs without the jail (vireo serve --no-jail)");
            jail::audit_no_jail(&self.state_dir, name, pid);
        }
        let id = ProcessId {
            pid,
            start_time: procfs::start_time(pid).unwrap_or(0),
        };
        if let Err(e) = inner.db.set_running(name, id) {
            // Never leave a VM running that the database does not know.
            let _ = child.start_kill();
            return Err(e.into());
        }
        inner.procs.insert(name.to_string(), Proc::new(id));
        inner
            .consoles
            .insert(name.to_string(), Arc::clone(&console));
        console.attach_input(input);
        tracing::info!("started VM {name} (pid {pid})");
        self.observe.vm(
            name,
            Change::Started,
            Some(VmState::Running),
            &format!("started (pid {pid})"),
        );
        let pump = spawn_pump(output, console, self.observe.console_tap(name));
        let me = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => Exit::Status(status),
                Err(e) => {
                    tracing::warn!("waiting for VM {name}: {e}");
                    Exit::Unknown
                }
            };
            drain(Some(pump)).await;
            let outcome = me.on_exit(&name, id, exit);
            if let Some(tx) = early {
                let _ = tx.send(outcome);
            }
        });
        Ok(id)
    }

    /// Record a VM process's end, or start it again after a reboot or a
    /// reset by the guest. Returns what was recorded, or None when `id` is
    /// no longer the VM's current process.
    fn on_exit(self: &Arc<Self>, name: &str, id: ProcessId, exit: Exit) -> Option<Outcome> {
        let mut inner = lock(&self.inner);
        match inner.procs.get(name) {
            Some(p) if p.id == id => {}
            _ => return None,
        }
        let proc = inner.procs.remove(name)?;
        // The process is gone: so goes its cgroup (a restart makes it anew).
        jail::remove_cgroup(&self.state_dir, name);
        let console = inner.consoles.get(name).cloned();
        if let Some(c) = &console {
            c.detach_input();
        }
        let log = read_log_tail(&self.vm_dir(name));
        let mut o = outcome(exit, proc.requested.as_deref(), &log);
        if proc.incoming && o.start_failed {
            // The migration never arrived: the VM still lives on its source.
            tracing::warn!("VM {name}: the incoming migration failed: {}", o.reason);
            let _ = inner.db.delete(name);
            inner.consoles.remove(name);
            let _ = std::fs::remove_dir_all(self.vm_dir(name));
            self.observe.vm(name, Change::Deleted, None, &o.reason);
            return Some(o);
        }
        let guest_reset =
            proc.requested.is_none() && o.state == VmState::Stopped && o.reason == GUEST_RESET;
        if proc.reboot || guest_reset {
            let then = if proc.reboot {
                proc.then.clone()
            } else {
                Boot::Definition
            };
            let why = match (&then, proc.reboot) {
                (Boot::Restore { .. }, _) => "ended to restore a snapshot",
                (_, true) => "rebooted on request",
                _ => GUEST_RESET,
            };
            match self.restart(&mut inner, name, console.clone(), guest_reset, &then) {
                Ok(new) => {
                    tracing::info!(
                        "VM {name} (pid {}): {why}; started again (pid {})",
                        id.pid,
                        new.pid
                    );
                    return Some(Outcome {
                        state: VmState::Running,
                        reason: o.reason,
                        start_failed: false,
                    });
                }
                Err(why) => {
                    o.state = if guest_reset {
                        VmState::Stopped
                    } else {
                        VmState::Crashed
                    };
                    o.reason = why;
                }
            }
        }
        tracing::info!("VM {name} (pid {}): {}", id.pid, o.reason);
        if let Err(e) = inner.db.set_exited(name, o.state, &o.reason) {
            tracing::error!("recording the end of VM {name}: {e}");
        }
        if let Some(c) = console {
            c.end(&o.reason);
        }
        self.observe
            .vm(name, exit_change(o.state), Some(o.state), &o.reason);
        Some(o)
    }

    /// Start the VM again after a reset, with the same console; the reason
    /// to record instead when it must not or cannot be.
    fn restart(
        self: &Arc<Self>,
        inner: &mut Inner,
        name: &str,
        console: Option<Arc<Console>>,
        guest_reset: bool,
        boot: &Boot,
    ) -> Result<ProcessId, String> {
        if guest_reset {
            let now = Instant::now();
            let resets = inner.guest_resets.entry(name.to_string()).or_default();
            resets.retain(|t| now.duration_since(*t) < GUEST_RESET_WINDOW);
            resets.push_back(now);
            if resets.len() > MAX_GUEST_RESETS {
                resets.clear();
                return Err(format!(
                    "the guest reset the machine {} times within {} s; left stopped to break a boot loop",
                    MAX_GUEST_RESETS + 1,
                    GUEST_RESET_WINDOW.as_secs()
                ));
            }
        }
        let rec = inner
            .db
            .get(name)
            .map_err(|e| format!("reboot failed: {e}"))?
            .ok_or_else(|| "reboot failed: the VM's definition is gone".to_string())?;
        let console = console.unwrap_or_else(Console::new);
        self.launch(inner, &rec, console, None, boot)
            .map_err(|e| format!("reboot failed: {}", e.message))
    }

    /// Reset the VM: its process ends (through the control socket's
    /// `reset`, else SIGKILL) and the daemon starts it again. Returns the
    /// VM as it is once the new process runs.
    pub async fn reboot(&self, name: &str) -> Result<VmRecord, ApiError> {
        let id = {
            let mut inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            match inner.procs.get_mut(name) {
                Some(p) if rec.state.is_active() => {
                    p.reboot = true;
                    p.id
                }
                _ => {
                    return Err(ApiError::conflict(
                        "invalid_state",
                        format!(
                            "VM {name} is not running (it is {}); start it instead",
                            rec.state.as_str()
                        ),
                    ))
                }
            }
        };
        let socket = self.vm_dir(name).join(CONTROL_SOCKET);
        let reset = match tokio::time::timeout(
            CONTROL_TIMEOUT,
            control_request(&socket, &Command::Reset),
        )
        .await
        {
            Ok(Ok(reply)) if reply.ok => true,
            other => {
                tracing::warn!("VM {name}: no reset through the control socket ({other:?}); killing it to reboot");
                false
            }
        };
        if !reset && procfs::is_same_process(id.pid, id.start_time) {
            // SAFETY: kill has no memory-safety preconditions; the pid was
            // just checked to still be the VM's process.
            unsafe { libc::kill(id.pid, libc::SIGKILL) };
        }
        if !self.wait_exit(name, id, CONTROL_TIMEOUT).await {
            return Err(ApiError::internal(format!(
                "VM {name} (pid {}) did not end after the reset",
                id.pid
            )));
        }
        self.get(name)
    }

    /// Send `signal` to the VM's process, remembering `reason` for its exit.
    fn signal(
        &self,
        name: &str,
        signal: libc::c_int,
        reason: String,
    ) -> Result<ProcessId, ApiError> {
        let mut inner = lock(&self.inner);
        let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        let proc = match inner.procs.get_mut(name) {
            Some(p) if rec.state.is_active() => p,
            _ => {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!("VM {name} is not running (it is {})", rec.state.as_str()),
                ))
            }
        };
        proc.requested = Some(reason);
        proc.reboot = false;
        let id = proc.id;
        if procfs::is_same_process(id.pid, id.start_time) {
            // SAFETY: kill has no memory-safety preconditions; the pid was
            // just checked to still be the VM's process.
            unsafe { libc::kill(id.pid, signal) };
        }
        Ok(id)
    }

    /// Wait until the VM's process `id` has been recorded as ended.
    async fn wait_exit(&self, name: &str, id: ProcessId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if lock(&self.inner).procs.get(name).map(|p| p.id) != Some(id) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Press the guest's ACPI power button and wait for it to shut down;
    /// with `force`, stop the VM process (SIGTERM, then SIGKILL) when the
    /// guest has not shut down after the timeout.
    pub async fn stop(&self, name: &str, req: &StopVm) -> Result<VmRecord, ApiError> {
        let secs = req.timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS);
        if secs > MAX_STOP_TIMEOUT_SECS {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("timeout_secs: must be at most {MAX_STOP_TIMEOUT_SECS}, got {secs}"),
            ));
        }
        let id = self.live_process(name)?;
        let socket = self.vm_dir(name).join(CONTROL_SOCKET);
        let pressed = match tokio::time::timeout(
            CONTROL_TIMEOUT,
            control_request(&socket, &Command::PowerButton),
        )
        .await
        {
            Ok(Ok(reply)) if reply.ok => true,
            other => {
                tracing::warn!("VM {name}: could not press the power button: {other:?}");
                false
            }
        };
        if pressed && self.wait_exit(name, id, Duration::from_secs(secs)).await {
            return self.get(name);
        }
        if !req.force {
            let why = if pressed {
                format!("did not shut down within {secs} s of the ACPI power button")
            } else {
                "could not be sent the ACPI power button".to_string()
            };
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "stop_timeout",
                format!("VM {name} {why}; stop it with force or kill it"),
            ));
        }
        self.signal(
            name,
            libc::SIGTERM,
            "stopped on request (the guest did not shut down on the power button)".into(),
        )?;
        if self.wait_exit(name, id, KILL_WAIT).await {
            return self.get(name);
        }
        self.signal(
            name,
            libc::SIGKILL,
            "killed on request (SIGKILL): the VM ignored the power button and SIGTERM".into(),
        )?;
        if !self.wait_exit(name, id, KILL_WAIT).await {
            return Err(ApiError::internal(format!(
                "VM {name} (pid {}) did not exit after SIGKILL",
                id.pid
            )));
        }
        self.get(name)
    }

    /// The process of a VM that is running or paused.
    fn live_process(&self, name: &str) -> Result<ProcessId, ApiError> {
        let inner = lock(&self.inner);
        let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
        match inner.procs.get(name) {
            Some(p) if rec.state.is_active() => Ok(p.id),
            _ => Err(ApiError::conflict(
                "invalid_state",
                format!("VM {name} is not running (it is {})", rec.state.as_str()),
            )),
        }
    }

    /// Pause (`paused = true`) or resume the VM's vCPUs through its control
    /// socket.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<VmRecord, ApiError> {
        let (socket, state) = {
            let inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            if !rec.state.is_active() {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!("VM {name} is not running (it is {})", rec.state.as_str()),
                ));
            }
            (self.vm_dir(name).join(CONTROL_SOCKET), rec.state)
        };
        let want = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        if state == want {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("VM {name} is already {}", want.as_str()),
            ));
        }
        let command = if paused {
            Command::Pause
        } else {
            Command::Resume
        };
        let reply = self.control(name, &socket, &command).await?;
        if let Err(why) = reply.into_result() {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("VM {name}: {why}"),
            ));
        }
        lock(&self.inner).db.set_live_state(name, want)?;
        tracing::info!("VM {name} {}", want.as_str());
        let change = if want == VmState::Paused {
            Change::Paused
        } else {
            Change::Resumed
        };
        self.observe.vm(name, change, Some(want), change.as_str());
        self.get(name)
    }

    /// Report the VM's balloon, after setting its target to `target_mib`
    /// when given, through the VM process's control socket.
    pub async fn balloon(
        &self,
        name: &str,
        target_mib: Option<u64>,
    ) -> Result<BalloonStatus, ApiError> {
        let socket = {
            let inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            if !rec.state.is_active() {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!("VM {name} is not running (it is {})", rec.state.as_str()),
                ));
            }
            if rec.config.devices.balloon.is_none() {
                return Err(ApiError::conflict(
                    "no_balloon",
                    format!(
                        "VM {name} has no balloon device; stop it, add one (`vireo vm update {name} \
                         --balloon`, or PATCH {{\"balloon\": \"\"}}) and start it again"
                    ),
                ));
            }
            if let Some(t) = target_mib {
                if t >= rec.config.memory_mib.mib() {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        format!(
                            "target_mib: {t} MiB is not less than the VM's memory ({} MiB)",
                            rec.config.memory_mib.mib()
                        ),
                    ));
                }
            }
            self.vm_dir(name).join(CONTROL_SOCKET)
        };
        let command = Command::Balloon(target_mib);
        let reply = self
            .control(name, &socket, &command)
            .await?
            .into_result()
            .map_err(|why| ApiError::conflict("balloon_failed", format!("VM {name}: {why}")))?;
        reply.balloon.ok_or_else(|| {
            ApiError::internal(format!(
                "VM {name} answered `{command}` without a balloon report"
            ))
        })
    }

    /// One control-socket request to the VM's process, its reply parsed.
    async fn control(
        &self,
        name: &str,
        socket: &Path,
        command: &Command,
    ) -> Result<Reply, ApiError> {
        self.control_within(name, socket, command, CONTROL_TIMEOUT)
            .await
    }

    /// [`Daemon::control`] with its own time limit (snapshots take longer).
    async fn control_within(
        &self,
        name: &str,
        socket: &Path,
        command: &Command,
        limit: Duration,
    ) -> Result<Reply, ApiError> {
        // A VM started a moment ago may not listen yet (`vireo run` binds
        // its control socket once the machine is built): retry until it
        // does, within the same time limit.
        let ask = async {
            loop {
                match control_request(socket, command).await {
                    Err(ControlError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) && self.live_process(name).is_ok() =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        };
        tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| {
                ApiError::internal(format!("VM {name} did not answer `{command}` in time"))
            })?
            .map_err(|e| match e {
                ControlError::Io(e) => ApiError::internal(format!(
                    "cannot reach VM {name}'s control socket {}: {e}",
                    socket.display()
                )),
                ControlError::Reply(e) => {
                    ApiError::internal(format!("VM {name} answered `{command}` with garbage: {e}"))
                }
            })
    }

    /// SIGKILL at once.
    pub async fn kill(&self, name: &str) -> Result<VmRecord, ApiError> {
        let id = self.signal(name, libc::SIGKILL, "killed on request (SIGKILL)".into())?;
        if !self.wait_exit(name, id, KILL_WAIT).await {
            return Err(ApiError::internal(format!(
                "VM {name} (pid {}) did not exit after SIGKILL",
                id.pid
            )));
        }
        self.get(name)
    }
}

/// Wait (bounded) for the console pump to read what the VM wrote last.
async fn drain(pump: Option<tokio::task::JoinHandle<()>>) {
    if let Some(p) = pump {
        let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
    }
}

/// The event of a VM process's end recorded as `state`.
fn exit_change(state: VmState) -> Change {
    if state == VmState::Crashed {
        Change::Crashed
    } else {
        Change::Stopped
    }
}

fn spawn_pump(
    mut rx: tokio::net::unix::pipe::Receiver,
    console: Arc<Console>,
    mut tap: ConsoleTap,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    console.push(&buf[..n]);
                    tap.output(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("console: {e}");
                    break;
                }
            }
        }
        tap.finish();
    })
}

/// Open the console pipe of an adopted VM through /proc/PID/fd/1.
fn reattach_console(pid: i32) -> Option<tokio::net::unix::pipe::Receiver> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/1"));
    if !procfs::is_pipe(&path) {
        tracing::warn!("VM pid {pid}: its stdout is not a pipe; no console");
        return None;
    }
    let opened = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(false)
        .open_receiver(&path);
    match opened {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!("VM pid {pid}: cannot re-attach to its console: {e}");
            None
        }
    }
}

/// Open the console input pipe of an adopted VM through /proc/PID/fd/0.
fn reattach_input(pid: i32) -> Option<tokio::net::unix::pipe::Sender> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/0"));
    if !procfs::is_pipe(&path) {
        tracing::info!(
            "VM pid {pid}: its stdin is not a pipe (started by an older daemon?); no console input"
        );
        return None;
    }
    match tokio::net::unix::pipe::OpenOptions::new().open_sender(&path) {
        Ok(tx) => Some(tx),
        Err(e) => {
            tracing::warn!("VM pid {pid}: cannot re-open its console input: {e}");
            None
        }
    }
}

/// A pipe with both ends close-on-exec: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these fds; each is owned once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Start `vireo run` for `rec` in its own session; returns the child, the
/// read end of its console pipe and the write end of its stdin pipe.
fn spawn_vm(
    vmm: &Path,
    dir: &Path,
    rec: &VmRecord,
    boot: &Boot,
    jail_args: &[std::ffi::OsString],
) -> std::io::Result<(
    tokio::process::Child,
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join(VM_LOG))?;
    let (read, write) = pipe()?;
    // SAFETY: fcntl on a valid fd; failure (e.g. above pipe-max-size) is harmless.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CONSOLE_PIPE_SIZE) };
    let (stdin_read, stdin_write) = pipe()?;
    // SAFETY: as above; a bigger buffer lets a paste wait for the guest.
    unsafe {
        libc::fcntl(
            stdin_write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            CONSOLE_PIPE_SIZE,
        )
    };

    let mut cmd = tokio::process::Command::new(vmm);
    cmd.arg("run")
        .args(run_args(dir, rec, boot))
        .args(jail_args);
    cmd
        // The exit reason ("the guest powered off") is logged at info level.
        .env("VIREO_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::from(stdin_read))
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(log))
        .kill_on_drop(false);
    let keep = read.as_raw_fd();
    let keep_in = stdin_write.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setsid() < 0 {
                return fail();
            }
            // Move the stdin pipe's write end out of fd 3's way first.
            let mut keep_in = keep_in;
            if keep_in == 3 {
                keep_in = libc::fcntl(3, libc::F_DUPFD_CLOEXEC, 5);
                if keep_in < 0 {
                    return fail();
                }
            }
            // The console pipe's read end as fd 3 and the stdin pipe's
            // write end as fd 4, open across exec.
            for (fd, target) in [(keep, 3), (keep_in, 4)] {
                if fd == target {
                    if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                        return fail();
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return fail();
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let tx = tokio::net::unix::pipe::Sender::from_owned_fd(stdin_write)?;
    Ok((child, rx, tx))
}

/// `vireo run`'s arguments for `rec` started as `boot`, its control
/// socket in `dir`.
fn run_args(dir: &Path, rec: &VmRecord, boot: &Boot) -> Vec<std::ffi::OsString> {
    let c = &rec.config;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut arg = |a: &str, v: &std::ffi::OsStr| {
        args.push(a.into());
        args.push(v.to_owned());
    };
    match boot {
        Boot::Definition => {
            if let Some(image) = &c.image {
                arg("--image", image.as_ref());
            }
            if let Some(kernel) = &c.kernel {
                arg("--kernel", kernel.as_ref());
            }
            if let Some(initrd) = &c.initrd {
                arg("--initrd", initrd.as_ref());
            }
            if let Some(cmdline) = &c.cmdline {
                arg("--cmdline", cmdline.as_ref());
            }
            arg("--cpus", c.vcpus.to_string().as_ref());
            arg("--memory", c.memory_mib.mib().to_string().as_ref());
        }
        // The machine (vCPUs, memory, devices) is the snapshot's.
        Boot::Restore { dir: snap, .. } => arg("--restore", snap.as_os_str()),
        // The VM's own definition, which the source's machine must match.
        Boot::MigrateFrom {
            listen,
            cert,
            key,
            secret_file,
        } => {
            arg("--migrate-from", listen.as_ref());
            arg("--migrate-tls-cert", cert.as_os_str());
            arg("--migrate-tls-key", key.as_os_str());
            arg("--migrate-secret-file", secret_file.as_os_str());
            arg("--cpus", c.vcpus.to_string().as_ref());
            arg("--memory", c.memory_mib.mib().to_string().as_ref());
        }
    }
    arg("--control-socket", dir.join(CONTROL_SOCKET).as_os_str());
    // Its snapshots go only to the VM's own snapshots directory.
    arg(
        "--snapshot-dir-root",
        dir.join(snapshots::SNAPSHOTS).as_os_str(),
    );
    // A clone's qcow2 disk is backed by a snapshot's copy in another VM's
    // directory; backing files may come from the daemon's VM directories
    // (the headers naming them are the daemon's, never a guest's).
    if let Some(vms) = dir.parent() {
        arg("--backing-dir", vms.as_os_str());
    }
    arg(
        "--accel",
        match c.accel {
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
            Accel::Emu => "emu",
        }
        .as_ref(),
    );
    match boot {
        Boot::Definition | Boot::MigrateFrom { .. } => {
            args.extend(c.devices.run_args().into_iter().map(Into::into))
        }
        Boot::Restore {
            lazy, overrides, ..
        } => {
            if *lazy {
                args.push("--restore-lazy".into());
            }
            args.extend(overrides.iter().map(Into::into));
        }
    }
    args
}

/// The last 64 KiB of a VM's log.
fn read_log_tail(dir: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(dir.join(VM_LOG)) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// What the VM's log says about its end: `vireo run`'s error line, or the
/// clean end it logged at info level.
fn log_verdict(log: &str) -> Option<(VmState, String)> {
    for line in log.lines().rev() {
        if let Some(i) = line.find("vireo: error: ") {
            return Some((
                VmState::Crashed,
                line[i + "vireo: error: ".len()..].trim().to_string(),
            ));
        }
        if line.contains("the guest powered off") {
            return Some((VmState::Stopped, "powered off".into()));
        }
        if line.contains(GUEST_RESET) {
            return Some((VmState::Stopped, GUEST_RESET.into()));
        }
        if line.contains(RESET_ON_REQUEST) {
            return Some((VmState::Stopped, "reset on request".into()));
        }
        if line.contains("the VM was stopped") {
            return Some((VmState::Stopped, "stopped".into()));
        }
    }
    None
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Decide the state and reason to record for an exit.
fn outcome(exit: Exit, requested: Option<&str>, log: &str) -> Outcome {
    let verdict = log_verdict(log);
    let code = match exit {
        Exit::Status(s) => s.code(),
        Exit::Unknown => None,
    };
    let (state, reason, start_failed) = match (exit, requested) {
        // The daemon signalled it: that is the reason, unless the log says
        // the guest ended on its own (or the VM failed) first.
        (_, Some(req)) => match verdict {
            Some((VmState::Stopped, why)) if why != "stopped" && code != Some(2) => {
                (VmState::Stopped, why, false)
            }
            Some((VmState::Crashed, why)) if code == Some(1) => {
                (VmState::Crashed, format!("VM failed: {why}"), false)
            }
            _ => (VmState::Stopped, req.to_string(), false),
        },
        (Exit::Status(s), _) => match (s.code(), s.signal()) {
            (Some(0), _) => match verdict {
                Some((VmState::Stopped, why)) => (VmState::Stopped, why, false),
                _ => (VmState::Stopped, "exited".into(), false),
            },
            (Some(1), _) => (
                VmState::Crashed,
                match verdict {
                    Some((VmState::Crashed, why)) => format!("VM failed: {why}"),
                    _ => "VM failed (vireo run exit status 1)".into(),
                },
                false,
            ),
            (Some(2), _) => (
                VmState::Crashed,
                match verdict {
                    Some((VmState::Crashed, why)) => format!("failed to start: {why}"),
                    _ => "failed to start (vireo run exit status 2)".into(),
                },
                true,
            ),
            (Some(code), _) => (
                VmState::Crashed,
                format!("vireo run exited with status {code}"),
                false,
            ),
            (None, Some(sig)) => (
                VmState::Crashed,
                format!("killed by signal {sig} ({})", signal_name(sig)),
                false,
            ),
            (None, None) => (VmState::Crashed, "ended (no status)".into(), false),
        },
        (Exit::Unknown, None) => match verdict {
            Some((VmState::Crashed, why)) => (VmState::Crashed, format!("VM failed: {why}"), false),
            Some((state, why)) => (state, why, false),
            None => (
                VmState::Stopped,
                "exited while not a child of this daemon (exit status unknown)".into(),
                false,
            ),
        },
    };
    Outcome {
        state,
        reason,
        start_failed,
    }
}

/// A control-socket request that got no reply to read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

/// Send one command to a `vireo run` control socket and read its reply.
pub(crate) async fn control_request(
    socket: &Path,
    command: &Command,
) -> Result<Reply, ControlError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(64 * 1024)
        .read_line(&mut line)
        .await?;
    Ok(Reply::parse(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The target of a migration runs the VM's own definition: vCPUs,
    /// memory and every device flag (as a boot does), plus the secret;
    /// no kernel (it is in the source's memory).
    #[test]
    fn a_migration_target_gets_the_vms_own_definition_and_the_secret() {
        let rec = VmRecord {
            name: "m".into(),
            config: vireo_api::model::VmConfig {
                vcpus: 2,
                memory_mib: vireo_api::units::MemorySize::mib_const(512),
                kernel: Some("/k".into()),
                initrd: None,
                cmdline: None,
                image: None,
                accel: Accel::Emu,
                devices: vireo_api::model::Devices {
                    disks: vec!["path=/srv/m.raw,format=raw".into()],
                    nets: vec!["tap=t0,mac=52:54:00:00:00:01".into()],
                    vsock: None,
                    rng: Some(String::new()),
                    balloon: None,
                },
            },
            created_at: 0,
            state: VmState::Stopped,
            process: None,
            started_at: None,
            last_exit: None,
            last_exit_at: None,
        };
        let boot = Boot::MigrateFrom {
            listen: "tcp:10.0.0.1:0".into(),
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            secret_file: "/vms/m/migrate-secret".into(),
        };
        let args: Vec<String> = run_args(Path::new("/vms/m"), &rec, &boot)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for want in [
            "--migrate-from tcp:10.0.0.1:0",
            "--migrate-secret-file /vms/m/migrate-secret",
            "--cpus 2",
            "--memory 512",
            "--disk=path=/srv/m.raw,format=raw",
            "--net=tap=t0,mac=52:54:00:00:00:01",
            "--rng",
        ] {
            assert!(line.contains(want), "{want:?} missing: {line}");
        }
        assert!(!line.contains("--kernel"), "{line}");
    }

    fn status(raw: i32) -> Exit {
        Exit::Status(ExitStatus::from_raw(raw))
    }

    const POWERED_OFF: &str = "2024-01-01T00:00:00Z  INFO booting ELF\n2024-01-01T00:00:01Z  INFO the guest powered off\n";

    #[test]
    fn outcomes() {
        let o = outcome(status(0), None, POWERED_OFF);
        assert_eq!(
            (o.state, o.reason.as_str()),
            (VmState::Stopped, "powered off")
        );
        let o = outcome(
            status(1 << 8),
            None,
            "vireo: error: vCPU 0 hit a triple fault\n",
        );
        assert_eq!(o.state, VmState::Crashed);
        assert_eq!(o.reason, "VM failed: vCPU 0 hit a triple fault");
        let o = outcome(
            status(2 << 8),
            None,
            "vireo: error: --kernel /x: not found\n",
        );
        assert!(o.start_failed && o.reason.contains("--kernel /x"), "{o:?}");
        let o = outcome(status(libc::SIGSEGV), None, "");
        assert_eq!(o.reason, "killed by signal 11 (SIGSEGV)");
        let o = outcome(status(libc::SIGTERM), Some("stopped (SIGTERM)"), "");
        assert_eq!(
            (o.state, o.reason.as_str()),
            (VmState::Stopped, "stopped (SIGTERM)")
        );
        let o = outcome(Exit::Unknown, None, POWERED_OFF);
        assert_eq!(o.reason, "powered off");
        let o = outcome(Exit::Unknown, None, "");
        assert_eq!(o.state, VmState::Stopped);
        assert!(o.reason.contains("unknown"));
    }
}
