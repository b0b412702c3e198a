//! The REST API's JSON types, shared by the daemon, the `vireo vm` client
//! and the tests, and the checks a VM definition must pass before the
//! daemon stores it (the quantities with [`crate::vm`]'s one check, the
//! devices with their own parsers, plus what only the daemon can see: paths
//! are absolute and the files exist).

use crate::devices::balloon::BalloonConfig;
use crate::devices::block::BlockConfig;
use crate::devices::net::{Mac, NetConfig};
use crate::devices::rng::RngConfig;
use crate::devices::vsock::VsockConfig;
use crate::options::OptionsError;
use crate::units::MemorySize;
use crate::vm::Accel;
use crate::vm::{
    check_balloon, check_resources, HostLimits, LimitError, DEFAULT_MEMORY, DEFAULT_VCPUS,
    MAX_CMDLINE, MAX_VCPUS, MIN_MEMORY, MIN_VCPUS,
};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

pub const MAX_NAME: usize = 63;
/// The file a guest kit directory holds (see `vireo image build`).
pub const KIT_MANIFEST: &str = "vireo-kit.conf";
/// Most disks and network devices a VM may have (each is a PCI function).
pub const MAX_DISKS: usize = 16;
pub const MAX_NETS: usize = 8;

mod check;
pub mod schema;

use check::invalid;
pub use check::{check_config, check_devices, check_name, pin_macs, Invalid};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, no process (never started, stopped, powered off).
    Stopped,
    /// Its `vireo run` process is alive.
    Running,
    /// Its process is alive and its vCPUs are paused.
    Paused,
    /// Its process ended abnormally (VM failure, unexpected signal).
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Crashed => "crashed",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        match s {
            "stopped" => Some(VmState::Stopped),
            "running" => Some(VmState::Running),
            "paused" => Some(VmState::Paused),
            "crashed" => Some(VmState::Crashed),
            _ => None,
        }
    }

    /// True while a process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

/// What a VM boots and with how much: the stored definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory_mib: MemorySize,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub image: Option<String>,
    pub accel: Accel,
    /// The VM's paravirtual devices, as the option strings of `vireo run`'s
    /// flags: `--disk` and `--net` each (in order), `--vsock`, `--rng`
    /// and `--balloon` (`""` = the defaults).
    pub devices: Devices,
}

/// A VM's paravirtual devices: each entry is the value of one `vireo run`
/// flag, parsed by the device's own config type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    /// `--disk` values (the first is the guest's vda).
    #[serde(default)]
    pub disks: Vec<String>,
    /// `--net` values.
    #[serde(default)]
    pub nets: Vec<String>,
    /// `--vsock` value.
    #[serde(default)]
    pub vsock: Option<String>,
    /// `--rng` value (`""`: the defaults).
    #[serde(default)]
    pub rng: Option<String>,
    /// `--balloon` value (`""`: the defaults).
    #[serde(default)]
    pub balloon: Option<String>,
}

impl Devices {
    /// The `vireo run` arguments that attach these devices.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for d in &self.disks {
            args.push(format!("--disk={d}"));
        }
        for n in &self.nets {
            args.push(format!("--net={n}"));
        }
        // `--flag=VALUE` in one word: an empty value stays a value and
        // one starting with '-' is not taken for a flag.
        for (flag, v) in [
            ("vsock", &self.vsock),
            ("rng", &self.rng),
            ("balloon", &self.balloon),
        ] {
            match v.as_deref() {
                Some("") if flag != "vsock" => args.push(format!("--{flag}")),
                Some(v) => args.push(format!("--{flag}={v}")),
                None => {}
            }
        }
        args
    }
}

/// `POST /v1/vms`. Exactly one of kernel and image. Paths are absolute and
/// must exist. Device option strings are checked by the devices' parsers;
/// an error names the field, e.g. `nets[1]: mac=zz: ...`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[schema(schema_with = schema::vm_name)]
    pub name: String,
    #[serde(default = "default_vcpus")]
    #[schema(minimum = 1, maximum = 254, default = 1)]
    pub vcpus: u32,
    /// At most the host's RAM.
    #[serde(default = "default_memory")]
    #[schema(value_type = u64, minimum = 16, default = 256)]
    pub memory_mib: MemorySize,
    /// Absolute path of a 64-bit ELF vmlinux or a bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Absolute path of an initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 2047)]
    pub cmdline: Option<String>,
    /// Absolute path of a guest kit directory (`vireo image build`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub accel: Accel,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = schema::disks)]
    pub disks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = schema::nets)]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::vsock)]
    pub vsock: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::rng)]
    pub rng: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::balloon)]
    pub balloon: Option<String>,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory() -> MemorySize {
    DEFAULT_MEMORY
}

impl CreateVm {
    pub fn config(&self) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            image: self.image.clone(),
            accel: self.accel,
            devices: Devices {
                disks: self.disks.clone(),
                nets: self.nets.clone(),
                vsock: self.vsock.clone(),
                rng: self.rng.clone(),
                balloon: self.balloon.clone(),
            },
        }
    }
}

/// `PATCH /v1/vms/{name}`: the fields to change; `null` clears an optional one.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 254)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 16)]
    pub memory_mib: Option<MemorySize>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>, max_length = 2047)]
    pub cmdline: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub image: Option<Option<String>>,
    #[serde(default)]
    pub accel: Option<Accel>,
    /// Replaces the list (`[]` or `null` removes every disk).
    #[serde(default, deserialize_with = "list")]
    #[schema(schema_with = schema::disks_update)]
    pub disks: Option<Vec<String>>,
    /// Replaces the list (`[]` or `null` removes every network device).
    #[serde(default, deserialize_with = "list")]
    #[schema(schema_with = schema::nets_update)]
    pub nets: Option<Vec<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(schema_with = schema::vsock)]
    pub vsock: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(schema_with = schema::rng)]
    pub rng: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(schema_with = schema::balloon)]
    pub balloon: Option<Option<String>>,
}

/// A present field (even `null`) becomes `Some(value)`; absent stays `None`.
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A present list field becomes `Some(list)`, `null` an empty list.
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Option::<Vec<String>>::deserialize(d).map(|v| Some(v.unwrap_or_default()))
}

impl UpdateVm {
    pub fn apply(&self, cfg: &VmConfig) -> VmConfig {
        /// Replace `field` when the update carries a value for it.
        fn set<T: Clone>(field: &mut T, update: &Option<T>) {
            if let Some(v) = update {
                *field = v.clone();
            }
        }
        let mut c = cfg.clone();
        set(&mut c.vcpus, &self.vcpus);
        set(&mut c.memory_mib, &self.memory_mib);
        set(&mut c.kernel, &self.kernel);
        set(&mut c.initrd, &self.initrd);
        set(&mut c.cmdline, &self.cmdline);
        set(&mut c.image, &self.image);
        set(&mut c.accel, &self.accel);
        let d = &mut c.devices;
        set(&mut d.disks, &self.disks);
        set(&mut d.nets, &self.nets);
        set(&mut d.vsock, &self.vsock);
        set(&mut d.rng, &self.rng);
        set(&mut d.balloon, &self.balloon);
        c
    }
}

/// `POST /v1/vms/{name}/stop` (the body is optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// Stop the VM process (SIGTERM, then SIGKILL) if the guest has not
    /// shut down `timeout_secs` after the ACPI power button.
    #[serde(default)]
    #[schema(default = false)]
    pub force: bool,
    /// How long to wait for the guest to shut down [default 10, at most 300].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 300, default = 10)]
    pub timeout_secs: Option<u64>,
}

pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;
pub const MAX_STOP_TIMEOUT_SECS: u64 = 300;

/// A VM as the API shows it: definition plus runtime state. Every field is
/// always present (`null` when unset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    #[schema(schema_with = schema::vm_name)]
    pub name: String,
    pub vcpus: u32,
    #[schema(value_type = u64)]
    pub memory_mib: MemorySize,
    #[schema(required = true)]
    pub kernel: Option<String>,
    #[schema(required = true)]
    pub initrd: Option<String>,
    #[schema(required = true)]
    pub cmdline: Option<String>,
    #[schema(required = true)]
    pub image: Option<String>,
    pub accel: Accel,
    /// `vireo run --disk` option strings, in order.
    #[schema(schema_with = schema::disks)]
    pub disks: Vec<String>,
    /// `vireo run --net` option strings, in order.
    #[schema(schema_with = schema::nets)]
    pub nets: Vec<String>,
    #[schema(schema_with = schema::vsock, required = true)]
    pub vsock: Option<String>,
    #[schema(schema_with = schema::rng, required = true)]
    pub rng: Option<String>,
    #[schema(schema_with = schema::balloon, required = true)]
    pub balloon: Option<String>,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    pub created_at: String,
    pub state: VmState,
    /// The VM's `vireo run` process while it is running.
    #[schema(required = true)]
    pub pid: Option<i32>,
    /// When the VM's process last started (RFC 3339, UTC); kept across
    /// daemon restarts.
    #[schema(format = DateTime, required = true)]
    pub started_at: Option<String>,
    /// Seconds since then, while the VM runs (null when it does not).
    #[serde(default)]
    #[schema(required = true)]
    pub uptime_secs: Option<u64>,
    /// Why the VM's last run ended, e.g. "powered off".
    #[schema(required = true)]
    pub last_exit: Option<String>,
    #[schema(format = DateTime, required = true)]
    pub last_exit_at: Option<String>,
}

/// `PUT /v1/vms/{name}/balloon`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBalloon {
    /// How much memory the balloon should take from the guest, in MiB;
    /// less than the VM's memory_mib.
    pub target_mib: u64,
}

/// `GET /v1/vms/{name}/balloon`: what the VM's balloon device reports.
/// The guest fills in the statistics (`null` until it has sent them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[schema(as = Balloon)]
pub struct BalloonStatus {
    /// The size the host asked for, in MiB.
    pub target_mib: u64,
    /// The size the guest has inflated the balloon to, in MiB.
    pub actual_mib: u64,
    #[schema(required = true)]
    pub free_mib: Option<u64>,
    #[schema(required = true)]
    pub available_mib: Option<u64>,
    #[schema(required = true)]
    pub total_mib: Option<u64>,
}

/// One disk captured in a snapshot (`DIR/disks/<id>.<format>`), as
/// `vireo run`'s `snapshot` reply gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDisk {
    /// The disk's id (`--disk ...,id=`, else the image's file stem).
    pub id: String,
    /// The copy in the snapshot.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Longest snapshot tag.
pub const MAX_TAG: usize = 64;

/// Check a snapshot tag: 1-64 of `[A-Za-z0-9._-]`, not `.` or `..` (tags
/// name directories).
pub fn check_tag(field: &str, tag: &str) -> Result<(), Invalid> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && tag != "."
        && tag != "..";
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{tag:?} must be 1 to {MAX_TAG} of letters, digits, '.', '_' and '-' (and not \".\" or \"..\")"),
        ))
    }
}

/// `POST /v1/vms/{name}/snapshots` (the body is optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The snapshot's name [default: the UTC time, `YYYYmmdd-HHMMSS`].
    #[serde(default)]
    #[schema(schema_with = schema::snapshot_tag_or_null)]
    pub tag: Option<String>,
    /// Save only the memory changed since this VM process's last snapshot.
    #[serde(default)]
    #[schema(default = false)]
    pub diff: bool,
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    #[schema(schema_with = schema::vm_name)]
    pub vm: String,
    #[schema(schema_with = schema::snapshot_tag)]
    pub tag: String,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The VM's state when the snapshot was taken (running or paused).
    pub vm_state: VmState,
    pub memory_bytes: u64,
    pub disks: Vec<SnapshotDisk>,
    /// The snapshot a diff snapshot holds the changes since.
    #[schema(required = true)]
    pub parent: Option<String>,
    /// Bytes its files take on disk.
    pub size_bytes: u64,
    /// Its directory in the daemon's state directory.
    pub dir: String,
    /// VMs cloned from it (it cannot be deleted while they exist).
    #[schema(schema_with = schema::vm_names)]
    pub clones: Vec<String>,
}

/// `{ "snapshots": [...] }` from `GET /v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// `POST /v1/vms/{name}/clone`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVm {
    /// The new VM's name.
    #[schema(schema_with = schema::vm_name)]
    pub name: String,
    /// The snapshot of the origin VM to start the clone from.
    #[schema(schema_with = schema::snapshot_tag)]
    pub from_snapshot: String,
}

/// `{ "vms": [...] }` from `GET /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<Vm>,
}

/// `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Migrate {
    /// The target daemon's TLS API, `https://HOST:PORT`.
    pub to: String,
    /// An admin token of the target daemon.
    #[serde(default)]
    pub token: Option<String>,
    /// The CA certificate (PEM text) the target daemon's certificate is
    /// checked against [default: the system's CA bundle].
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// Post-copy: after one full copy the guest runs on the target at
    /// once and fetches the pages it dirtied since on demand (for guests
    /// that dirty memory faster than pre-copy can send it).
    #[serde(default)]
    #[schema(default = false)]
    pub postcopy: bool,
}

/// The reply to `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Migrated {
    #[schema(schema_with = crate::model::schema::vm_name)]
    pub vm: String,
    pub to: String,
    pub migration: crate::control::MigrationStats,
}

/// The reply to `POST /v1/vms/{name}/migrate-in`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct MigrateInReady {
    /// The TCP port the target's `vireo run --migrate-from` listens on
    /// (TLS, with the target daemon's certificate).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// The one-time secret the source must send first (64 hex digits);
    /// anyone else who connects to the port is refused.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub secret: String,
}

/// What a caller may do; each role includes the ones before it. viewer:
/// every read; operator: viewer + start/stop/kill/pause/resume/reboot, the
/// balloon target, taking and restoring snapshots; admin: operator +
/// creating, changing and deleting VMs, deleting snapshots, cloning and
/// migrating VMs, and tokens.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A token as the API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Public id (the part after `vireo_`).
    #[schema(pattern = "^[0-9a-f]{16}$")]
    pub id: String,
    #[schema(max_length = 64)]
    pub name: String,
    pub role: Role,
    #[schema(format = DateTime)]
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who or what uses the token (no control characters). Default empty.
    #[serde(default)]
    #[schema(max_length = 64)]
    pub name: String,
    pub role: Role,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    #[schema(pattern = "^[0-9a-f]{16}$")]
    pub id: String,
    pub name: String,
    pub role: Role,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The secret, shown only in this answer (the daemon keeps its SHA-256).
    #[schema(pattern = "^vireo_[0-9a-f]{16}_[0-9a-f]{64}$")]
    pub token: String,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    #[schema(inline)]
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: malformed_json, invalid_request, invalid_value,
    /// missing_file, path_not_allowed, not_found, unauthorized, forbidden,
    /// already_exists, invalid_state, start_failed, stop_timeout,
    /// not_implemented, method_not_allowed, body_too_large,
    /// too_many_failures, internal.
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_cfg(path: &str) -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: MemorySize::mib_const(64),
            kernel: Some(path.into()),
            initrd: None,
            cmdline: None,
            image: None,
            accel: Accel::Emu,
            devices: Devices::default(),
        }
    }

    #[test]
    fn tags() {
        for ok in [
            "a",
            "20241123-223000",
            "before.upgrade_2",
            &"x".repeat(MAX_TAG),
        ] {
            assert!(check_tag("tag", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(MAX_TAG + 1)] {
            let e = check_tag("tag", bad).unwrap_err();
            assert!(e.message.starts_with("tag: "), "{}", e.message);
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "db_2.prod", &"x".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "ä", &"x".repeat(64)] {
            let e = check_name(bad).unwrap_err();
            assert!(e.message.starts_with("name: "), "{e:?}");
        }
    }

    #[test]
    fn config_checks_name_the_field() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let gib = MemorySize::from_mib(1024).ok();
        assert!(check_config(&kernel_cfg(&exe), gib).is_ok());
        let mut c = kernel_cfg(&exe);
        c.vcpus = 0;
        assert!(check_config(&c, None)
            .unwrap_err()
            .message
            .starts_with("vcpus:"));
        let mut c = kernel_cfg(&exe);
        c.memory_mib = MemorySize::mib_const(4096);
        assert!(check_config(&c, gib)
            .unwrap_err()
            .message
            .starts_with("memory_mib:"));
        let e = check_config(&kernel_cfg("/nonexistent/vmlinux"), None).unwrap_err();
        assert_eq!(e.code, "missing_file");
        assert!(e.message.starts_with("kernel:"));
        let e = check_config(&kernel_cfg("relative/vmlinux"), None).unwrap_err();
        assert!(e.message.contains("absolute"));
        let mut c = kernel_cfg(&exe);
        c.image = Some("/".into());
        assert!(check_config(&c, None)
            .unwrap_err()
            .message
            .starts_with("image:"));
        c.kernel = None;
        assert_eq!(check_config(&c, None).unwrap_err().code, "missing_file");
    }

    /// A device error: its field path prefix, and that it holds `needle`.
    fn device_error(d: Devices, field: &str, needle: &str) -> Invalid {
        let e = check_devices(&d, DEFAULT_MEMORY).unwrap_err();
        assert!(
            e.message.starts_with(&format!("{field}: ")) && e.message.contains(needle),
            "{d:?}: {e:?} should start with {field:?} and mention {needle:?}"
        );
        e
    }

    #[test]
    fn device_options_are_checked_by_the_devices_parsers() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let dir = std::env::temp_dir().display().to_string();
        let good = Devices {
            disks: vec![
                format!("path={exe},readonly=on,id=root,bw=10M"),
                "/dev/null".into(),
            ],
            nets: vec!["tap=tap0,mac=52:54:00:12:34:56".into(), "tap1".into()],
            vsock: Some(format!("cid=3,socket={dir}/vm.vsock")),
            rng: Some(String::new()),
            balloon: Some("target=64".into()),
        };
        // /dev/null is a character device, not a disk.
        device_error(good.clone(), "disks[1]", "not a disk image");
        let mut ok = good.clone();
        ok.disks.truncate(1);
        assert_eq!(check_devices(&ok, DEFAULT_MEMORY), Ok(()));

        let with = |f: &dyn Fn(&mut Devices)| {
            let mut d = ok.clone();
            f(&mut d);
            d
        };
        device_error(
            with(&|d| d.nets[1] = "tap=tap0,mac=zz".into()),
            "nets[1]",
            "mac=zz",
        );
        device_error(
            with(&|d| d.nets[1] = "tap0".into()),
            "nets[1]",
            "already nets[0]",
        );
        device_error(
            with(&|d| d.disks = vec!["readonly=on".into()]),
            "disks[0]",
            "path= is required",
        );
        device_error(
            with(&|d| d.disks.push(format!("{exe},colour=blue"))),
            "disks[1]",
            "unknown option \"colour\"",
        );
        device_error(
            with(&|d| d.disks.push(format!("{exe},id=again"))),
            "disks[1]",
            "already disks[0]",
        );
        device_error(
            with(&|d| d.disks = vec!["disk.qcow2".into()]),
            "disks[0]",
            "absolute",
        );
        let e = device_error(
            with(&|d| d.disks = vec!["/nonexistent/disk.qcow2".into()]),
            "disks[0]",
            "vireo image create",
        );
        assert_eq!(e.code, "missing_file");
        device_error(
            with(&|d| d.vsock = Some("cid=2,socket=/tmp/x".into())),
            "vsock",
            "cid=2",
        );
        device_error(
            with(&|d| d.vsock = Some("cid=3,socket=vm.vsock".into())),
            "vsock",
            "absolute",
        );
        device_error(
            with(&|d| d.vsock = Some("cid=3,socket=/nonexistent/vm.vsock".into())),
            "vsock",
            "directory does not exist",
        );
        device_error(with(&|d| d.rng = Some("bw=fast".into())), "rng", "bw=fast");
        device_error(
            with(&|d| d.balloon = Some("target=256".into())),
            "balloon",
            "less than memory_mib",
        );
        device_error(
            with(&|d| d.balloon = Some("size=1".into())),
            "balloon",
            "unknown option",
        );
        device_error(
            with(&|d| d.nets = vec!["tap0".into(); MAX_NETS + 1]),
            "nets",
            "at most",
        );
    }

    #[test]
    fn devices_become_run_flags_and_macs_are_pinned() {
        let mut d = Devices {
            disks: vec!["path=/a.qcow2".into(), "/b.raw,readonly=on".into()],
            nets: vec!["tap0".into(), "tap=tap1,mac=52:54:00:00:00:01".into()],
            vsock: Some("cid=3,socket=/s".into()),
            rng: Some(String::new()),
            balloon: Some("target=8".into()),
        };
        assert_eq!(
            d.run_args(),
            [
                "--disk=path=/a.qcow2",
                "--disk=/b.raw,readonly=on",
                "--net=tap0",
                "--net=tap=tap1,mac=52:54:00:00:00:01",
                "--vsock=cid=3,socket=/s",
                "--rng",
                "--balloon=target=8",
            ]
        );
        pin_macs(&mut d);
        let mac = d.nets[0].strip_prefix("tap0,mac=").expect("a MAC added");
        assert!(mac.parse::<Mac>().is_ok(), "{mac}");
        assert_eq!(
            d.nets[1], "tap=tap1,mac=52:54:00:00:00:01",
            "given MAC kept"
        );
        let pinned = d.nets.clone();
        pin_macs(&mut d);
        assert_eq!(d.nets, pinned, "pinning twice changes nothing");
        assert!(Devices::default().run_args().is_empty());
    }

    #[test]
    fn patch_replaces_device_lists_and_clears_with_null() {
        let u: UpdateVm =
            serde_json::from_str(r#"{"disks": ["/d"], "rng": null, "balloon": ""}"#).unwrap();
        let mut c = kernel_cfg("/k");
        c.devices.disks = vec!["/a".into(), "/b".into()];
        c.devices.nets = vec!["tap0".into()];
        c.devices.rng = Some("bw=1M".into());
        let n = u.apply(&c).devices;
        assert_eq!(n.disks, ["/d"]);
        assert_eq!(n.nets, ["tap0"], "absent: unchanged");
        assert_eq!((n.rng, n.balloon), (None, Some(String::new())));
        let u: UpdateVm = serde_json::from_str(r#"{"disks": null}"#).unwrap();
        assert!(u.apply(&c).devices.disks.is_empty());
        assert!(serde_json::from_str::<UpdateVm>(r#"{"disks": "/d"}"#).is_err());
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let u: UpdateVm = serde_json::from_str(r#"{"initrd": null, "vcpus": 2}"#).unwrap();
        let mut c = kernel_cfg("/k");
        c.initrd = Some("/i".into());
        c.cmdline = Some("x".into());
        let n = u.apply(&c);
        assert_eq!((n.initrd, n.cmdline, n.vcpus), (None, Some("x".into()), 2));
        assert!(serde_json::from_str::<UpdateVm>(r#"{"name": "x"}"#).is_err());
    }
}
