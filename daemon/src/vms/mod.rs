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
//!
//! Here: the definitions and the lifecycle verbs (create, start, stop,
//! reboot, kill, exits and restarts). Apart: `process` (spawning `vireo
//! run`, its pipes, re-adoption), `exit` (what an exit means), `control`
//! (the control socket and the verbs that use it), `jail`, `snapshots` and
//! `migrate`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::oneshot;

use crate::console::Console;
use crate::db::{Db, ProcessId, VmRecord};
use crate::error::ApiError;
use crate::observe::{Change, Observe};
use crate::procfs;
use crate::storage::Storage;
use vireo_api::control::Command;
use vireo_api::model::{
    check_config, check_name, pin_macs, CreateVm, StopVm, UpdateVm, VmState,
    DEFAULT_STOP_TIMEOUT_SECS, MAX_STOP_TIMEOUT_SECS,
};
use vireo_sandbox::jail::JailIds;

/// How long `start` waits for a VM that fails at once (bad kernel, no
/// /dev/kvm) so it can answer with the reason instead of "running".
const EARLY_EXIT_WAIT: Duration = Duration::from_millis(250);
/// How often adopted VMs are checked in /proc.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// How long a SIGKILLed VM may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// The log file of a VM's `vireo run` (its stderr).
pub const VM_LOG: &str = "vireo.log";
/// The `vireo run --control-socket` of each VM, in its directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Guest-initiated resets allowed in [`GUEST_RESET_WINDOW`]; one more and
/// the VM is left stopped (a boot loop).
pub const MAX_GUEST_RESETS: usize = 5;
pub const GUEST_RESET_WINDOW: Duration = Duration::from_secs(60);

mod control;
mod exit;
mod jail;
mod migrate;
mod process;
mod snapshots;

pub(crate) use control::control_request;
use control::CONTROL_TIMEOUT;
use exit::{exit_change, outcome, read_log_tail, Exit, Outcome, GUEST_RESET};
pub use migrate::MigrationTls;
use process::{drain, spawn_pump, spawn_vm};
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
