//! Live migration of a VM between two daemons.
//!
//! The source daemon (`POST /v1/vms/{name}/migrate {"to": "https://HOST:PORT",
//! "token", "ca_cert"}`) sends the VM's definition to the target daemon's
//! `POST /v1/vms/{name}/migrate-in` over its TLS API (with the token). The
//! target checks and records the VM, makes a one-time secret (256 random
//! bits, written 0600 into the VM's directory), starts `vireo run
//! --migrate-from tcp:IP:0` with the daemon's own TLS certificate and key,
//! that secret and the VM's own definition (vCPUs, memory, devices: the
//! target builds that machine and refuses a source whose machine differs),
//! and answers the port its process listens on and the secret. The source
//! then sends `migrate-to tcp:HOST:PORT --ca CA --secret-file FILE` to its
//! VM's process, which copies the memory while the guest runs, pauses it
//! for the last pages and the device state, and exits once the target has
//! acknowledged; the source daemon then forgets the VM. If anything fails
//! before that, the VM keeps running on the source and the target's process
//! exits 2, upon which the target daemon forgets its half-made record.
//!
//! Disks are expected on shared storage: both ends open the same paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use super::{lock, Boot, Daemon, EARLY_EXIT_WAIT, VM_LOG};
use crate::console::Console;
use crate::error::ApiError;
use crate::observe::Change;
use vireo_api::client::{Client, ClientError, Response};
use vireo_api::control::{Command, MigrateTo};
use vireo_api::model::{check_config, check_name, CreateVm, Migrate, MigrateInReady, Migrated};

/// How long a migration may take (pre-copy of a big, busy guest).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the target's `vireo run` may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long the request to the target daemon may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// The CA bundle used when the request names none.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
/// What the target's `vireo run --migrate-from` prints once it listens.
const LISTENING: &str = "migration: listening on ";

/// The daemon's own TLS identity, for the migration streams it receives.
#[derive(Debug, Clone)]
pub struct MigrationTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The address of the daemon's TCP listener: the target's `vireo run`
    /// listens on the same one.
    pub ip: std::net::IpAddr,
}

/// Where a VM's directory keeps the one-time migration secret (on the
/// target: what its `vireo run` expects; on the source: what its VM sends).
const SECRET_FILE: &str = "migrate-secret";

/// A one-time migration secret: 256 random bits as hex.
fn new_secret() -> Result<String, ApiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal("the system's random number generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write `secret` to `path`, readable by this user only (created 0600,
/// never through a link left there).
fn write_secret(path: &Path, secret: &str) -> Result<(), ApiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))
}

/// `https://HOST:PORT` -> (HOST, PORT); `[v6]` keeps its brackets off.
fn parse_to(to: &str) -> Result<(String, u16), ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(
            "invalid_value",
            format!("to: {to:?} {why} (expected https://HOST:PORT, the target daemon's TLS API)"),
        )
    };
    let rest = to
        .strip_prefix("https://")
        .ok_or_else(|| bad("is not an https:// URL"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(bad("has no valid host"));
    }
    Ok((host.to_string(), port))
}

fn definition(name: &str, c: &vireo_api::model::VmConfig) -> CreateVm {
    CreateVm {
        name: name.to_string(),
        vcpus: c.vcpus,
        memory_mib: c.memory_mib,
        kernel: c.kernel.clone(),
        initrd: c.initrd.clone(),
        cmdline: c.cmdline.clone(),
        image: c.image.clone(),
        accel: c.accel,
        disks: c.devices.disks.clone(),
        nets: c.devices.nets.clone(),
        vsock: c.devices.vsock.clone(),
        rng: c.devices.rng.clone(),
        balloon: c.devices.balloon.clone(),
    }
}

/// The `vireo run --migrate-from` address in the VM's log, once printed.
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|l| {
        let addr = &l[l.find(LISTENING)? + LISTENING.len()..];
        addr.trim().rsplit_once(':')?.1.parse().ok()
    })
}

impl Daemon {
    /// Receive a VM: record it, start `vireo run --migrate-from` and
    /// answer the port it listens on.
    pub async fn migrate_in(
        self: &Arc<Self>,
        name: &str,
        req: &CreateVm,
    ) -> Result<MigrateInReady, ApiError> {
        check_name(name)?;
        if req.name != name {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!(
                    "name: {:?} differs from the VM in the path ({name:?})",
                    req.name
                ),
            ));
        }
        let Some(tls) = self.migration_tls.get().cloned() else {
            return Err(ApiError::conflict(
                "no_tls",
                "this daemon has no TLS listener (--listen tcp:HOST:PORT with --tls-cert and --tls-key): it cannot receive migrations",
            ));
        };
        // The source's definition, held to this host's rules: its host
        // paths must lie beneath this daemon's storage directories (shared
        // storage mounted there), and its formats are fixed here too.
        let mut cfg = req.config();
        self.storage.confine(&mut cfg, None)?;
        check_config(&cfg, vireo_api::host::memory())?;
        let dir = self.vm_dir(name);
        let secret = {
            let mut inner = lock(&self.inner);
            if !inner.db.create(name, &cfg)? {
                return Err(ApiError::conflict(
                    "already_exists",
                    format!("a VM named {name:?} already exists here"),
                ));
            }
            inner.consoles.remove(name);
            let rec = inner
                .db
                .get(name)?
                .ok_or_else(|| ApiError::internal(format!("VM {name} vanished")))?;
            let _ = std::fs::remove_dir_all(&dir);
            let secret_file = dir.join(SECRET_FILE);
            let prepared = new_secret().and_then(|s| {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
                write_secret(&secret_file, &s)?;
                Ok(s)
            });
            let secret = match prepared {
                Ok(s) => s,
                Err(e) => {
                    let _ = inner.db.delete(name);
                    return Err(e);
                }
            };
            let boot = Boot::MigrateFrom {
                listen: format!("tcp:{}:0", tls.ip),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                secret_file,
            };
            if let Err(e) = self.launch(&mut inner, &rec, Console::new(), None, &boot) {
                let _ = inner.db.delete(name);
                return Err(e);
            }
            if let Some(p) = inner.procs.get_mut(name) {
                p.incoming = true;
            }
            secret
        };
        self.observe.vm(
            name,
            Change::Created,
            Some(vireo_api::model::VmState::Running),
            "migrating in",
        );
        let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
        loop {
            let log = std::fs::read_to_string(dir.join(VM_LOG)).unwrap_or_default();
            if let Some(port) = listening_port(&log) {
                tracing::info!("VM {name}: waiting for its migration on port {port}");
                // The process has read its secret; the reply carries it on.
                let _ = std::fs::remove_file(dir.join(SECRET_FILE));
                return Ok(MigrateInReady { port, secret });
            }
            let gone = !lock(&self.inner).procs.contains_key(name);
            if gone || tokio::time::Instant::now() >= deadline {
                let why = super::exit::log_verdict(&log)
                    .map(|(_, why)| why)
                    .unwrap_or_else(|| "it did not listen in time".into());
                self.forget_incoming(name);
                return Err(ApiError::conflict(
                    "migrate_in_failed",
                    format!("VM {name}: cannot receive the migration: {why}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drop a VM whose migration never arrived (its process is killed).
    pub(super) fn forget_incoming(&self, name: &str) {
        let mut inner = lock(&self.inner);
        if let Some(p) = inner.procs.remove(name) {
            if crate::procfs::is_same_process(p.id.pid, p.id.start_time) {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // was just checked to still be the VM's process.
                unsafe { libc::kill(p.id.pid, libc::SIGKILL) };
            }
        }
        let _ = inner.db.delete(name);
        inner.consoles.remove(name);
        drop(inner);
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        self.observe
            .vm(name, Change::Deleted, None, "the migration did not arrive");
    }

    /// Live-migrate a running VM to another daemon; on success it is
    /// gone from this one.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        req: &Migrate,
    ) -> Result<Migrated, ApiError> {
        // Checked here for the API's own message; the client reads the port.
        let (host, _) = parse_to(&req.to)?;
        if let Some(t) = &req.token {
            if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "token: must be a token as `vireo token create` printed it",
                ));
            }
        }
        let (rec, id, _busy) = {
            let mut inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            let id = match inner.procs.get(name) {
                Some(p) if rec.state.is_active() => p.id,
                _ => {
                    return Err(ApiError::conflict(
                        "invalid_state",
                        format!(
                            "VM {name} is {}: only a running or paused VM migrates live",
                            rec.state.as_str()
                        ),
                    ))
                }
            };
            if !inner.db.list_snapshots(name)?.is_empty() {
                return Err(ApiError::conflict(
                    "has_snapshots",
                    format!("VM {name} has snapshots, which stay here; delete them (`vireo vm snapshots {name}`) before migrating it"),
                ));
            }
            let b = self.claim(&mut inner, name)?;
            (rec, id, b)
        };
        let dir = self.vm_dir(name);
        // The CA goes into the VM's directory, the one place a jailed VM
        // process sees at the same path (the system bundle is not in its
        // root), readable by the VM's uid.
        let pem = match &req.ca_cert {
            Some(pem) => pem.clone().into_bytes(),
            None => std::fs::read(SYSTEM_CA)
                .map_err(|e| ApiError::internal(format!("reading {SYSTEM_CA}: {e}")))?,
        };
        let ca_file = dir.join("migrate-ca.pem");
        std::fs::write(&ca_file, pem)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", ca_file.display())))?;
        self.hand_to_vm(name, &ca_file).map_err(|e| {
            ApiError::internal(format!("handing {} to VM {name}: {e}", ca_file.display()))
        })?;
        // The api crate's client, as `vireo vm` uses it, on a blocking
        // thread: one request, then the reply.
        let client =
            Client::tls(&req.to, Some(&ca_file), req.token.clone()).map_err(|e| match e {
                ClientError::CaCert { why, .. } => {
                    ApiError::bad_request("invalid_value", format!("ca_cert: {why}"))
                }
                other => ApiError::bad_request("invalid_value", format!("to: {other}")),
            })?;
        tracing::info!("VM {name}: migrating to {}", req.to);
        let body = serde_json::to_vec(&definition(name, &rec.config))
            .map_err(|e| ApiError::internal(format!("encoding VM {name}: {e}")))?;
        let path = format!("/v1/vms/{name}/migrate-in");
        let asked = tokio::task::spawn_blocking(move || {
            client.send("POST", &path, Some(&body), PEER_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let Response {
            status,
            body: reply,
            ..
        } = asked.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "target_unreachable",
                format!("cannot ask {} to receive VM {name}: {e}", req.to),
            )
        })?;
        if status != 201 {
            let why = serde_json::from_slice::<vireo_api::model::ErrorBody>(&reply)
                .map(|e| format!("{} ({})", e.error.message, e.error.code))
                .unwrap_or_else(|_| String::from_utf8_lossy(&reply).into_owned());
            return Err(ApiError::conflict(
                "migration_refused",
                format!("{} refused VM {name} (HTTP {status}): {why}", req.to),
            ));
        }
        let ready: MigrateInReady = serde_json::from_slice(&reply).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "target_unreachable",
                format!("{} answered migrate-in with garbage: {e}", req.to),
            )
        })?;
        // The process's exit is the migration's success: record it so.
        if let Some(p) = lock(&self.inner).procs.get_mut(name) {
            p.requested = Some(format!("migrated to {}", req.to));
        }
        let target = if host.contains(':') {
            format!("tcp:[{host}]:{}", ready.port)
        } else {
            format!("tcp:{host}:{}", ready.port)
        };
        let socket = dir.join(super::CONTROL_SOCKET);
        // The target's secret goes to the VM's process as a file (0600 in
        // the VM's directory), never on a command line.
        let secret_file = dir.join(SECRET_FILE);
        write_secret(&secret_file, &ready.secret)?;
        self.hand_to_vm(name, &secret_file).map_err(|e| {
            ApiError::internal(format!(
                "handing {} to VM {name}: {e}",
                secret_file.display()
            ))
        })?;
        let command = Command::MigrateTo(MigrateTo {
            ca: Some(ca_file.clone()),
            secret_file: Some(secret_file.clone()),
            postcopy: req.postcopy,
            ..MigrateTo::new(&target)
        });
        let reply = self
            .control_within(name, &socket, &command, MIGRATION_TIMEOUT)
            .await;
        let _ = std::fs::remove_file(&secret_file);
        let outcome = match reply {
            Ok(r) => r.into_result(),
            Err(e) => Err(e.message),
        };
        let reply = match outcome {
            Ok(r) => r,
            Err(why) => {
                if let Some(p) = lock(&self.inner).procs.get_mut(name) {
                    p.requested = None;
                }
                return Err(ApiError::conflict(
                    "migration_failed",
                    format!("VM {name} stays here: {why}"),
                ));
            }
        };
        let migration = reply.migration.unwrap_or_default();
        if !self.wait_exit(name, id, Duration::from_secs(30)).await {
            tracing::warn!("VM {name}: its process did not end after migrating; killing it");
            if crate::procfs::is_same_process(id.pid, id.start_time) {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // was just checked to still be the VM's process.
                unsafe { libc::kill(id.pid, libc::SIGKILL) };
            }
            self.wait_exit(name, id, super::KILL_WAIT).await;
        }
        {
            let mut inner = lock(&self.inner);
            inner.db.delete(name)?;
            inner.consoles.remove(name);
        }
        let _ = std::fs::remove_dir_all(&dir);
        self.observe.vm(
            name,
            Change::Deleted,
            None,
            &format!("migrated to {}", req.to),
        );
        tracing::info!(
            "VM {name}: migrated to {} ({} ms, {} ms paused, {} rounds, {} bytes)",
            req.to,
            migration.total_ms,
            migration.downtime_ms,
            migration.rounds,
            migration.bytes_sent
        );
        let _ = EARLY_EXIT_WAIT;
        Ok(Migrated {
            vm: name.to_string(),
            to: req.to.clone(),
            migration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls() {
        assert_eq!(
            parse_to("https://10.0.0.2:8443").unwrap(),
            ("10.0.0.2".into(), 8443)
        );
        assert_eq!(
            parse_to("https://[::1]:8443/").unwrap(),
            ("::1".into(), 8443)
        );
        for bad in [
            "http://a:1",
            "https://a",
            "https://a:0",
            "https://:5",
            "https://a:x",
            "a:1",
        ] {
            let e = parse_to(bad).unwrap_err();
            assert!(e.message.starts_with("to: "), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn the_listening_port_is_read_from_the_log() {
        let log = "2026-11-23T00:00:00Z  INFO something\nmigration: listening on 127.0.0.1:40123\n";
        assert_eq!(listening_port(log), Some(40123));
        assert_eq!(listening_port("migration: listening on [::1]:7\n"), Some(7));
        assert_eq!(listening_port("nothing yet"), None);
    }
}
