//! The state database: VM definitions and their runtime state in SQLite.
//!
//! WAL journal with `synchronous=FULL`: every commit is fsynced before the API
//! answers, so a definition the API acknowledged survives not only `kill -9`
//! of the daemon (which WAL with NORMAL would also survive) but a host crash
//! or power loss. Writes are rare (a create, a state change), so the fsync per
//! commit costs nothing that matters, and reads never wait for it.
//!
//! The schema is versioned: `schema_migrations` records each migration applied;
//! [`MIGRATIONS`] are applied in order, each in its own transaction.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::clock::{now_secs, rfc3339};
use vireo_api::model::{Devices, SnapshotDisk, Vm, VmConfig, VmState};
use vireo_api::units::MemorySize;
use vireo_api::vm::Accel;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database {path}: schema version {found} is newer than this vireo knows ({known}); upgrade vireo")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("state database: corrupt row for VM {name}: {what}")]
    Corrupt { name: String, what: String },
}

/// Schema migrations, in order; version N is `MIGRATIONS[N - 1]`.
const MIGRATIONS: &[&str] = &[
    // 1: definitions and runtime state, kept apart: definitions change only on
    // create/patch/delete, runtime rows on every start and exit.
    "CREATE TABLE vm_definitions (
        name        TEXT PRIMARY KEY NOT NULL,
        vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
        memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
        kernel      TEXT,
        initrd      TEXT,
        cmdline     TEXT,
        image       TEXT,
        accel       TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE vm_runtime (
        name            TEXT PRIMARY KEY NOT NULL
                        REFERENCES vm_definitions(name) ON DELETE CASCADE,
        state           TEXT NOT NULL,
        pid             INTEGER,
        pid_start_time  INTEGER,
        started_at      INTEGER,
        last_exit       TEXT,
        last_exit_at    INTEGER
    ) STRICT;",
    // 2: paravirtual devices, as `vireo run` option strings. The lists are
    // JSON arrays of strings; VMs defined before get none.
    "ALTER TABLE vm_definitions ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE vm_definitions ADD COLUMN nets TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE vm_definitions ADD COLUMN vsock TEXT;
    ALTER TABLE vm_definitions ADD COLUMN rng TEXT;
    ALTER TABLE vm_definitions ADD COLUMN balloon TEXT;",
    // 3: API tokens for TCP clients. Only the SHA-256 of each token's secret
    // is kept; a revoked token's row is deleted.
    "CREATE TABLE api_tokens (
        id             TEXT PRIMARY KEY NOT NULL,
        name           TEXT NOT NULL,
        role           TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
        secret_sha256  BLOB NOT NULL CHECK (length(secret_sha256) = 32),
        created_at     INTEGER NOT NULL
    ) STRICT;",
    // 4: snapshots (their files are in vms/NAME/snapshots/TAG/), and where a
    // clone came from: a clone's disks are overlays of, and its memory a
    // copy-on-write mapping of, its origin snapshot's files, so that
    // snapshot must outlive the clone.
    "CREATE TABLE vm_snapshots (
        vm            TEXT NOT NULL REFERENCES vm_definitions(name) ON DELETE CASCADE,
        tag           TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        vm_state      TEXT NOT NULL,
        memory_bytes  INTEGER NOT NULL,
        disks         TEXT NOT NULL DEFAULT '[]',
        parent        TEXT,
        size_bytes    INTEGER NOT NULL,
        PRIMARY KEY (vm, tag)
    ) STRICT;
    ALTER TABLE vm_definitions ADD COLUMN origin_vm TEXT;
    ALTER TABLE vm_definitions ADD COLUMN origin_snapshot TEXT;",
];

/// A snapshot as stored: its files are in the VM's `snapshots/TAG/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub vm: String,
    pub tag: String,
    pub created_at: i64,
    /// The VM's state when it was taken (running or paused).
    pub vm_state: VmState,
    pub memory_bytes: u64,
    /// The disks captured, as `vireo run` reported them.
    pub disks: Vec<SnapshotDisk>,
    /// The snapshot a diff snapshot is relative to.
    pub parent: Option<String>,
    /// Bytes its files take on disk.
    pub size_bytes: u64,
}

/// What the daemon knows about a VM process it started (or adopted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    /// /proc/PID/stat start time: tells a reused pid from our VM.
    pub start_time: u64,
}

/// A stored VM: definition and runtime state.
#[derive(Debug, Clone)]
pub struct VmRecord {
    pub name: String,
    pub config: VmConfig,
    pub created_at: i64,
    pub state: VmState,
    pub process: Option<ProcessId>,
    pub started_at: Option<i64>,
    pub last_exit: Option<String>,
    pub last_exit_at: Option<i64>,
}

impl VmRecord {
    /// Seconds since the VM's process started, while it runs.
    pub fn uptime_secs(&self) -> Option<u64> {
        if !self.state.is_active() {
            return None;
        }
        self.started_at
            .map(|t| now_secs().saturating_sub(t).max(0) as u64)
    }

    pub fn to_api(&self) -> Vm {
        Vm {
            name: self.name.clone(),
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            kernel: self.config.kernel.clone(),
            initrd: self.config.initrd.clone(),
            cmdline: self.config.cmdline.clone(),
            image: self.config.image.clone(),
            accel: self.config.accel,
            disks: self.config.devices.disks.clone(),
            nets: self.config.devices.nets.clone(),
            vsock: self.config.devices.vsock.clone(),
            rng: self.config.devices.rng.clone(),
            balloon: self.config.devices.balloon.clone(),
            created_at: rfc3339(self.created_at),
            state: self.state,
            pid: self.process.map(|p| p.pid),
            started_at: self.started_at.map(rfc3339),
            uptime_secs: self.uptime_secs(),
            last_exit: self.last_exit.clone(),
            last_exit_at: self.last_exit_at.map(rfc3339),
        }
    }
}

pub struct Db {
    conn: Connection,
    /// The last [`Db::list`], and the connection's total_changes() when it
    /// was read: every INSERT, UPDATE or DELETE through this connection
    /// (the daemon is the only writer) makes it stale. Listing is the API's
    /// commonest request; this spares SQLite and the row decoding.
    list_cache: std::cell::RefCell<Option<(u64, Vec<VmRecord>)>>,
}

const SELECT: &str = "SELECT d.name, d.vcpus, d.memory_mib, d.kernel, d.initrd, d.cmdline, d.image,
        d.accel, d.created_at, r.state, r.pid, r.pid_start_time, r.started_at, r.last_exit,
        r.last_exit_at, d.disks, d.nets, d.vsock, d.rng, d.balloon
    FROM vm_definitions d JOIN vm_runtime r ON r.name = d.name";

impl Db {
    /// Open (creating if needed) the database at `path` and migrate it.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        Self::setup(conn, &path.display().to_string())
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Db, DbError> {
        Self::setup(Connection::open_in_memory()?, ":memory:")
    }

    fn setup(conn: Connection, path: &str) -> Result<Db, DbError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode returns a row; query it rather than execute.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        let mut db = Db {
            conn,
            list_cache: std::cell::RefCell::new(None),
        };
        db.migrate(path)?;
        Ok(db)
    }

    fn migrate(&mut self, path: &str) -> Result<(), DbError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version     INTEGER PRIMARY KEY NOT NULL,
                applied_at  INTEGER NOT NULL
            )",
        )?;
        let current = self.schema_version()?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(DbError::TooNew {
                path: path.to_string(),
                found: current,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![i as i64 + 1, now_secs()],
            )?;
            tx.commit()?;
            tracing::info!("state database: applied schema migration {}", i + 1);
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, DbError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            name: r.get(0)?,
            vcpus: r.get(1)?,
            memory_mib: r.get(2)?,
            kernel: r.get(3)?,
            initrd: r.get(4)?,
            cmdline: r.get(5)?,
            image: r.get(6)?,
            accel: r.get(7)?,
            created_at: r.get(8)?,
            state: r.get(9)?,
            pid: r.get(10)?,
            pid_start_time: r.get(11)?,
            started_at: r.get(12)?,
            last_exit: r.get(13)?,
            last_exit_at: r.get(14)?,
            disks: r.get(15)?,
            nets: r.get(16)?,
            vsock: r.get(17)?,
            rng: r.get(18)?,
            balloon: r.get(19)?,
        })
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, DbError> {
        let version = self.conn.total_changes();
        if let Some((v, records)) = &*self.list_cache.borrow() {
            if *v == version {
                return Ok(records.clone());
            }
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{SELECT} ORDER BY d.name"))?;
        let rows = stmt.query_map([], Self::row)?;
        let records: Vec<VmRecord> = rows.map(|r| r?.into_record()).collect::<Result<_, _>>()?;
        *self.list_cache.borrow_mut() = Some((version, records.clone()));
        Ok(records)
    }

    pub fn get(&self, name: &str) -> Result<Option<VmRecord>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{SELECT} WHERE d.name = ?1"))?;
        match stmt.query_row([name], Self::row).optional()? {
            Some(raw) => Ok(Some(raw.into_record()?)),
            None => Ok(None),
        }
    }

    /// Insert a new VM (stopped). False if the name is taken.
    pub fn create(&mut self, name: &str, cfg: &VmConfig) -> Result<bool, DbError> {
        let (disks, nets) = lists(cfg);
        let d = &cfg.devices;
        let tx = self.conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO vm_definitions
                (name, vcpus, memory_mib, kernel, initrd, cmdline, image, accel, created_at,
                 disks, nets, vsock, rng, balloon)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                name,
                cfg.vcpus,
                memory_column(cfg.memory_mib),
                cfg.kernel,
                cfg.initrd,
                cfg.cmdline,
                cfg.image,
                cfg.accel.as_str(),
                now_secs(),
                disks,
                nets,
                d.vsock,
                d.rng,
                d.balloon
            ],
        )?;
        if inserted == 0 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO vm_runtime (name, state) VALUES (?1, 'stopped')",
            [name],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Replace a VM's definition. False if there is no such VM.
    pub fn update(&mut self, name: &str, cfg: &VmConfig) -> Result<bool, DbError> {
        let (disks, nets) = lists(cfg);
        let d = &cfg.devices;
        let n = self.conn.execute(
            "UPDATE vm_definitions SET vcpus = ?2, memory_mib = ?3, kernel = ?4, initrd = ?5,
                cmdline = ?6, image = ?7, accel = ?8, disks = ?9, nets = ?10, vsock = ?11,
                rng = ?12, balloon = ?13 WHERE name = ?1",
            params![
                name,
                cfg.vcpus,
                memory_column(cfg.memory_mib),
                cfg.kernel,
                cfg.initrd,
                cfg.cmdline,
                cfg.image,
                cfg.accel.as_str(),
                disks,
                nets,
                d.vsock,
                d.rng,
                d.balloon
            ],
        )?;
        Ok(n == 1)
    }

    /// Delete a VM (its runtime row goes with it). False if there was none.
    pub fn delete(&mut self, name: &str) -> Result<bool, DbError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM vm_runtime WHERE name = ?1", [name])?;
        let n = tx.execute("DELETE FROM vm_definitions WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// Record that the VM's process `p` is running.
    pub fn set_running(&mut self, name: &str, p: ProcessId) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        set_runtime(
            &tx,
            name,
            "UPDATE vm_runtime SET state = 'running', pid = ?2, pid_start_time = ?3,
                started_at = ?4 WHERE name = ?1",
            params![name, p.pid, p.start_time as i64, now_secs()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Record that a live VM is now `state` (running or paused).
    pub fn set_live_state(&mut self, name: &str, state: VmState) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        set_runtime(
            &tx,
            name,
            "UPDATE vm_runtime SET state = ?2 WHERE name = ?1",
            params![name, state.as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Record that the VM's process is gone: `state` (stopped or crashed)
    /// and why.
    pub fn set_exited(&mut self, name: &str, state: VmState, reason: &str) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        set_runtime(
            &tx,
            name,
            "UPDATE vm_runtime SET state = ?2, pid = NULL, pid_start_time = NULL,
                last_exit = ?3, last_exit_at = ?4 WHERE name = ?1",
            params![name, state.as_str(), reason, now_secs()],
        )?;
        tx.commit()?;
        Ok(())
    }
}

impl Db {
    /// Store a new API token (its secret's hash only).
    pub fn create_token(&mut self, t: &crate::auth::StoredToken) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO api_tokens (id, name, role, secret_sha256, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                t.id,
                t.name,
                t.role.as_str(),
                &t.secret_sha256[..],
                t.created_at
            ],
        )?;
        Ok(())
    }

    pub fn list_tokens(&self) -> Result<Vec<crate::auth::StoredToken>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, name, role, secret_sha256, created_at FROM api_tokens ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|r| {
            let (id, name, role, hash, created_at) = r?;
            let corrupt = |what: String| DbError::Corrupt {
                name: format!("(token {id})"),
                what,
            };
            let role = vireo_api::model::Role::parse(&role)
                .ok_or_else(|| corrupt(format!("role {role:?}")))?;
            let secret_sha256: [u8; 32] = hash
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(format!("hash of {} bytes", hash.len())))?;
            Ok(crate::auth::StoredToken {
                id,
                name,
                role,
                created_at,
                secret_sha256,
            })
        })
        .collect()
    }

    /// Delete a token. False if there was none.
    pub fn delete_token(&mut self, id: &str) -> Result<bool, DbError> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE id = ?1", [id])?
            == 1)
    }
}

impl Db {
    /// Record a new snapshot. False if the VM already has one with its tag.
    pub fn create_snapshot(&mut self, s: &SnapshotRecord) -> Result<bool, DbError> {
        let disks = serde_json::to_string(&s.disks).unwrap_or_else(|_| "[]".into());
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO vm_snapshots
                (vm, tag, created_at, vm_state, memory_bytes, disks, parent, size_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                s.vm,
                s.tag,
                s.created_at,
                s.vm_state.as_str(),
                s.memory_bytes as i64,
                disks,
                s.parent,
                s.size_bytes as i64
            ],
        )?;
        Ok(n == 1)
    }

    /// A VM's snapshots, oldest first.
    pub fn list_snapshots(&self, vm: &str) -> Result<Vec<SnapshotRecord>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT vm, tag, created_at, vm_state, memory_bytes, disks, parent, size_bytes
             FROM vm_snapshots WHERE vm = ?1 ORDER BY created_at, rowid",
        )?;
        let rows = stmt.query_map([vm], snapshot_row)?;
        rows.map(|r| r?).collect()
    }

    pub fn get_snapshot(&self, vm: &str, tag: &str) -> Result<Option<SnapshotRecord>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT vm, tag, created_at, vm_state, memory_bytes, disks, parent, size_bytes
             FROM vm_snapshots WHERE vm = ?1 AND tag = ?2",
        )?;
        match stmt.query_row([vm, tag], snapshot_row).optional()? {
            Some(r) => Ok(Some(r?)),
            None => Ok(None),
        }
    }

    /// Forget a snapshot. False if there was none.
    pub fn delete_snapshot(&mut self, vm: &str, tag: &str) -> Result<bool, DbError> {
        Ok(self.conn.execute(
            "DELETE FROM vm_snapshots WHERE vm = ?1 AND tag = ?2",
            [vm, tag],
        )? == 1)
    }

    /// The snapshots of `vm` whose parent is `tag` (diff children).
    pub fn snapshot_children(&self, vm: &str, tag: &str) -> Result<Vec<String>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT tag FROM vm_snapshots WHERE vm = ?1 AND parent = ?2 ORDER BY tag",
        )?;
        let rows = stmt.query_map([vm, tag], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record that VM `name` is a clone of `vm`'s snapshot `tag`.
    pub fn set_origin(&mut self, name: &str, vm: &str, tag: &str) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vm_definitions SET origin_vm = ?2, origin_snapshot = ?3 WHERE name = ?1",
            [name, vm, tag],
        )?;
        Ok(())
    }

    /// The VMs cloned from `vm`'s snapshot `tag` (every snapshot of `vm`
    /// when `tag` is None).
    pub fn clones_of(&self, vm: &str, tag: Option<&str>) -> Result<Vec<String>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name FROM vm_definitions
             WHERE origin_vm = ?1 AND (?2 IS NULL OR origin_snapshot = ?2) ORDER BY name",
        )?;
        let rows = stmt.query_map(params![vm, tag], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, DbError>> {
    let vm: String = r.get(0)?;
    let tag: String = r.get(1)?;
    let state: String = r.get(3)?;
    let disks: String = r.get(5)?;
    let corrupt = |what: String| DbError::Corrupt {
        name: format!("{vm} (snapshot {tag})"),
        what,
    };
    let vm_state = match VmState::parse(&state) {
        Some(s) => s,
        None => return Ok(Err(corrupt(format!("vm_state {state:?}")))),
    };
    let disks = match serde_json::from_str(&disks) {
        Ok(d) => d,
        Err(e) => return Ok(Err(corrupt(format!("disks {disks:?}: {e}")))),
    };
    Ok(Ok(SnapshotRecord {
        created_at: r.get(2)?,
        vm_state,
        memory_bytes: r.get::<_, i64>(4)?.max(0) as u64,
        disks,
        parent: r.get(6)?,
        size_bytes: r.get::<_, i64>(7)?.max(0) as u64,
        vm,
        tag,
    }))
}

/// The device lists as stored: JSON arrays of strings.
fn lists(cfg: &VmConfig) -> (String, String) {
    let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    (json(&cfg.devices.disks), json(&cfg.devices.nets))
}

fn set_runtime(
    tx: &Transaction<'_>,
    name: &str,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<(), DbError> {
    let n = tx.execute(sql, params)?;
    if n != 1 {
        tracing::warn!("state database: no runtime row for VM {name}");
    }
    Ok(())
}

/// A memory size as its column: whole MiB (at most `MemorySize::MAX_MIB`,
/// 2^44 - 1, so it always fits an INTEGER).
fn memory_column(m: MemorySize) -> i64 {
    m.mib() as i64
}

struct RawRow {
    name: String,
    vcpus: u32,
    memory_mib: i64,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    image: Option<String>,
    accel: String,
    created_at: i64,
    state: String,
    pid: Option<i32>,
    pid_start_time: Option<i64>,
    started_at: Option<i64>,
    last_exit: Option<String>,
    last_exit_at: Option<i64>,
    disks: String,
    nets: String,
    vsock: Option<String>,
    rng: Option<String>,
    balloon: Option<String>,
}

impl RawRow {
    fn into_record(self) -> Result<VmRecord, DbError> {
        let corrupt = |what: String| DbError::Corrupt {
            name: self.name.clone(),
            what,
        };
        let accel =
            Accel::parse(&self.accel).ok_or_else(|| corrupt(format!("accel {:?}", self.accel)))?;
        let state = VmState::parse(&self.state)
            .ok_or_else(|| corrupt(format!("state {:?}", self.state)))?;
        let list = |what: &str, text: &str| {
            serde_json::from_str::<Vec<String>>(text)
                .map_err(|e| corrupt(format!("{what} {text:?}: {e}")))
        };
        let disks = list("disks", &self.disks)?;
        let nets = list("nets", &self.nets)?;
        let process = match (self.pid, self.pid_start_time) {
            (Some(pid), Some(start)) => Some(ProcessId {
                pid,
                start_time: start as u64,
            }),
            _ => None,
        };
        Ok(VmRecord {
            config: VmConfig {
                vcpus: self.vcpus,
                memory_mib: u64::try_from(self.memory_mib)
                    .ok()
                    .and_then(|m| MemorySize::from_mib(m).ok())
                    .ok_or_else(|| corrupt(format!("memory_mib {}", self.memory_mib)))?,
                kernel: self.kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
                image: self.image,
                accel,
                devices: Devices {
                    disks,
                    nets,
                    vsock: self.vsock,
                    rng: self.rng,
                    balloon: self.balloon,
                },
            },
            name: self.name,
            created_at: self.created_at,
            state,
            process,
            started_at: self.started_at,
            last_exit: self.last_exit,
            last_exit_at: self.last_exit_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: MemorySize::mib_const(128),
            kernel: Some("/k".into()),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            image: None,
            accel: Accel::Emu,
            devices: Devices::default(),
        }
    }

    #[test]
    fn create_get_update_delete() {
        let mut db = Db::open_in_memory().unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert!(db.create("a", &cfg()).unwrap());
        assert!(!db.create("a", &cfg()).unwrap(), "duplicate name");
        let r = db.get("a").unwrap().unwrap();
        assert_eq!((r.config.clone(), r.state), (cfg(), VmState::Stopped));
        let mut c = cfg();
        c.vcpus = 4;
        assert!(db.update("a", &c).unwrap());
        assert!(!db.update("b", &c).unwrap());
        db.set_running(
            "a",
            ProcessId {
                pid: 42,
                start_time: 7,
            },
        )
        .unwrap();
        let r = db.get("a").unwrap().unwrap();
        assert_eq!(r.state, VmState::Running);
        assert_eq!(
            r.process,
            Some(ProcessId {
                pid: 42,
                start_time: 7
            })
        );
        db.set_exited("a", VmState::Stopped, "powered off").unwrap();
        let r = db.get("a").unwrap().unwrap();
        assert_eq!(
            (r.state, r.process, r.last_exit.as_deref()),
            (VmState::Stopped, None, Some("powered off"))
        );
        assert_eq!(db.list().unwrap().len(), 1);
        assert!(db.delete("a").unwrap());
        assert!(!db.delete("a").unwrap());
        assert!(db.get("a").unwrap().is_none());
    }

    /// The cached list follows every change.
    #[test]
    fn the_list_follows_every_write() {
        let mut db = Db::open_in_memory().unwrap();
        assert!(db.list().unwrap().is_empty());
        db.create("a", &cfg()).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
        assert_eq!(db.list().unwrap()[0].state, VmState::Stopped);
        let p = ProcessId {
            pid: 42,
            start_time: 7,
        };
        db.set_running("a", p).unwrap();
        assert_eq!(db.list().unwrap()[0].process, Some(p));
        db.set_live_state("a", VmState::Paused).unwrap();
        assert_eq!(db.list().unwrap()[0].state, VmState::Paused);
        db.set_exited("a", VmState::Crashed, "boom").unwrap();
        let r = &db.list().unwrap()[0];
        assert_eq!(
            (r.state, r.last_exit.as_deref()),
            (VmState::Crashed, Some("boom"))
        );
        let mut c = cfg();
        c.vcpus = 3;
        db.update("a", &c).unwrap();
        assert_eq!(db.list().unwrap()[0].config.vcpus, 3);
        db.create("b", &cfg()).unwrap();
        assert_eq!(db.list().unwrap().len(), 2);
        db.delete("a").unwrap();
        let names: Vec<String> = db.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["b"]);
    }

    /// Snapshots list in the order they were taken, even within a second.
    #[test]
    fn snapshots_round_trip_in_order() {
        let mut db = Db::open_in_memory().unwrap();
        db.create("a", &cfg()).unwrap();
        let snap = |tag: &str, parent: Option<&str>| SnapshotRecord {
            vm: "a".into(),
            tag: tag.into(),
            created_at: 7,
            vm_state: VmState::Paused,
            memory_bytes: 1 << 20,
            disks: vec![SnapshotDisk {
                id: "root".into(),
                path: "disks/root.qcow2".into(),
                format: "qcow2".into(),
                bytes: 9,
            }],
            parent: parent.map(Into::into),
            size_bytes: 4096,
        };
        assert!(db.create_snapshot(&snap("z", None)).unwrap());
        assert!(db.create_snapshot(&snap("b", Some("z"))).unwrap());
        assert!(
            !db.create_snapshot(&snap("b", None)).unwrap(),
            "duplicate tag"
        );
        let tags: Vec<String> = db
            .list_snapshots("a")
            .unwrap()
            .into_iter()
            .map(|s| s.tag)
            .collect();
        assert_eq!(tags, ["z", "b"]);
        assert_eq!(
            db.get_snapshot("a", "b").unwrap(),
            Some(snap("b", Some("z")))
        );
        assert_eq!(db.snapshot_children("a", "z").unwrap(), ["b"]);
        db.create("c", &cfg()).unwrap();
        db.set_origin("c", "a", "z").unwrap();
        assert_eq!(db.clones_of("a", Some("z")).unwrap(), ["c"]);
        assert_eq!(db.clones_of("a", None).unwrap(), ["c"]);
        assert!(db.clones_of("a", Some("b")).unwrap().is_empty());
        assert!(db.delete_snapshot("a", "b").unwrap());
        assert!(!db.delete_snapshot("a", "b").unwrap());
        // A VM's snapshots go with it.
        db.delete("c").unwrap();
        db.delete("a").unwrap();
        assert!(db.list_snapshots("a").unwrap().is_empty());
    }

    #[test]
    fn tokens_round_trip() {
        let mut db = Db::open_in_memory().unwrap();
        let t = crate::auth::StoredToken {
            id: "0123456789abcdef".into(),
            name: "ci".into(),
            role: vireo_api::model::Role::Operator,
            created_at: 7,
            secret_sha256: [9; 32],
        };
        db.create_token(&t).unwrap();
        assert!(db.create_token(&t).is_err(), "duplicate id");
        let got = db.list_tokens().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].id.as_str(), got[0].name.as_str(), got[0].role),
            ("0123456789abcdef", "ci", vireo_api::model::Role::Operator)
        );
        assert_eq!((got[0].created_at, got[0].secret_sha256), (7, [9; 32]));
        assert!(db.delete_token(&t.id).unwrap());
        assert!(!db.delete_token(&t.id).unwrap());
        assert!(db.list_tokens().unwrap().is_empty());
    }

    #[test]
    fn devices_round_trip() {
        let mut db = Db::open_in_memory().unwrap();
        let mut c = cfg();
        c.devices = Devices {
            disks: vec!["path=/a,readonly=on".into(), "/b".into()],
            nets: vec!["tap0,mac=52:54:00:00:00:01".into()],
            vsock: Some("cid=3,socket=/s".into()),
            rng: Some(String::new()),
            balloon: None,
        };
        db.create("d", &c).unwrap();
        assert_eq!(db.get("d").unwrap().unwrap().config, c);
        c.devices.disks.clear();
        c.devices.balloon = Some("target=8".into());
        db.update("d", &c).unwrap();
        assert_eq!(db.get("d").unwrap().unwrap().config, c);
    }

    /// A database made by a vireo that knew only schema 1 gains the device
    /// columns; its VMs have no devices and keep everything else.
    #[test]
    fn an_old_database_is_migrated() {
        let dir = std::env::temp_dir().join(format!("vireo-db-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (
                    version INTEGER PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 0);",
            )
            .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO vm_definitions VALUES ('old', 2, 128, '/k', NULL, 'x', NULL, 'emu', 5);
                 INSERT INTO vm_runtime (name, state, last_exit) VALUES ('old', 'stopped', 'powered off');",
            )
            .unwrap();
        }
        let mut db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert!(db.list_tokens().unwrap().is_empty());
        let r = db.get("old").unwrap().unwrap();
        assert_eq!(r.config.devices, Devices::default());
        assert_eq!(
            (r.config.vcpus, r.config.cmdline.as_deref(), r.created_at),
            (2, Some("x"), 5)
        );
        assert_eq!(r.last_exit.as_deref(), Some("powered off"));
        let mut c = r.config.clone();
        c.devices.rng = Some(String::new());
        assert!(db.update("old", &c).unwrap());
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.get("old")
                .unwrap()
                .unwrap()
                .config
                .devices
                .rng
                .as_deref(),
            Some("")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopening_keeps_data_and_does_not_remigrate() {
        let dir = std::env::temp_dir().join(format!("vireo-db-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let mut db = Db::open(&path).unwrap();
            db.create("keep", &cfg()).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert!(db.get("keep").unwrap().is_some());
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // A database from a newer vireo is refused, not misread.
        db.conn
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)",
                [],
            )
            .unwrap();
        drop(db);
        assert!(matches!(Db::open(&path), Err(DbError::TooNew { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
