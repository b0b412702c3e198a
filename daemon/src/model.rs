//! The API's JSON types, shared by the daemon and the `vireo vm` client, and
//! the checks a VM definition must pass before it is stored.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

/// Fewest vCPUs and most (xAPIC ids) a VM may have.
pub const MIN_VCPUS: u32 = 1;
pub const MAX_VCPUS: u32 = vireo_vmcore::vm::MAX_VCPUS_XAPIC;
/// Smallest guest RAM `vireo run` accepts.
pub const MIN_MEMORY_MIB: u64 = vireo_vmcore::vm::MIN_MEMORY_MIB;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// The Linux boot protocol's command line limit (without the NUL).
pub const MAX_CMDLINE: usize = 2047;
pub const MAX_NAME: usize = 63;
/// The file a guest kit directory holds (see `vireo image build`).
pub const KIT_MANIFEST: &str = "vireo-kit.conf";

/// Which backend runs the VM, as `vireo run --accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    #[default]
    Auto,
    Emu,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
            Accel::Emu => "emu",
        }
    }

    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "auto" => Some(Accel::Auto),
            "emu" => Some(Accel::Emu),
            _ => None,
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    pub memory_mib: u64,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub image: Option<String>,
    pub accel: Accel,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub accel: Accel,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
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
        }
    }
}

/// `PATCH /v1/vms/{name}`: the fields to change; `null` clears an optional one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default, deserialize_with = "some")]
    pub kernel: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    pub initrd: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    pub cmdline: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    pub image: Option<Option<String>>,
    #[serde(default)]
    pub accel: Option<Accel>,
}

/// A present field (even `null`) becomes `Some(value)`; absent stays `None`.
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl UpdateVm {
    pub fn apply(&self, cfg: &VmConfig) -> VmConfig {
        let mut c = cfg.clone();
        if let Some(v) = self.vcpus {
            c.vcpus = v;
        }
        if let Some(v) = self.memory_mib {
            c.memory_mib = v;
        }
        if let Some(v) = &self.kernel {
            c.kernel = v.clone();
        }
        if let Some(v) = &self.initrd {
            c.initrd = v.clone();
        }
        if let Some(v) = &self.cmdline {
            c.cmdline = v.clone();
        }
        if let Some(v) = &self.image {
            c.image = v.clone();
        }
        if let Some(v) = self.accel {
            c.accel = v;
        }
        c
    }
}

/// `POST /v1/vms/{name}/stop` (the body is optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// Stop the VM process (SIGTERM, then SIGKILL) if the guest has not
    /// shut down `timeout_secs` after the ACPI power button.
    #[serde(default)]
    pub force: bool,
    /// How long to wait for the guest to shut down [default 10, at most 300].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;
pub const MAX_STOP_TIMEOUT_SECS: u64 = 300;

/// A VM as the API shows it: definition plus runtime state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub image: Option<String>,
    pub accel: Accel,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub state: VmState,
    /// The VM's `vireo run` process while it is running.
    pub pid: Option<i32>,
    pub started_at: Option<String>,
    /// Why the VM's last run ended, e.g. "powered off".
    pub last_exit: Option<String>,
    pub last_exit_at: Option<String>,
}

/// `{ "vms": [...] }` from `GET /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmList {
    pub vms: Vec<Vm>,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// A definition that fails a check: which field, what is wrong, and whether
/// it is a missing file (code `missing_file`) or a bad value (`invalid_value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
}

fn invalid(field: &str, what: impl std::fmt::Display) -> Invalid {
    Invalid {
        code: "invalid_value",
        message: format!("{field}: {what}"),
    }
}

/// Check a VM name: 1-63 characters, letters, digits, `-`, `_`, `.`, not
/// starting with `-` or `.` (names appear in URLs, file names and tables).
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid(
            "name",
            format!("must be 1 to {MAX_NAME} characters, got {}", name.len()),
        ));
    }
    if !name.chars().all(ok_char) || name.starts_with(['-', '.']) {
        return Err(invalid(
            "name",
            format!("{name:?} may hold only letters, digits, '-', '_' and '.', and must start with a letter or digit"),
        ));
    }
    Ok(())
}

/// Check a definition: ranges, exactly one of kernel and image, absolute
/// paths to files that exist. `host_mib` is the host's RAM, when known.
pub fn check_config(cfg: &VmConfig, host_mib: Option<u64>) -> Result<(), Invalid> {
    if !(MIN_VCPUS..=MAX_VCPUS).contains(&cfg.vcpus) {
        return Err(invalid(
            "vcpus",
            format!(
                "must be between {MIN_VCPUS} and {MAX_VCPUS}, got {}",
                cfg.vcpus
            ),
        ));
    }
    if cfg.memory_mib < MIN_MEMORY_MIB {
        return Err(invalid(
            "memory_mib",
            format!(
                "must be at least {MIN_MEMORY_MIB} MiB, got {}",
                cfg.memory_mib
            ),
        ));
    }
    if let Some(host) = host_mib {
        if cfg.memory_mib > host {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is more than this host's {host} MiB of RAM",
                    cfg.memory_mib
                ),
            ));
        }
    }
    match (&cfg.kernel, &cfg.image) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "image",
                "give either `kernel` or `image`, not both",
            ))
        }
        (None, None) => return Err(invalid(
            "kernel",
            "one of `kernel` (a vmlinux or bzImage) or `image` (a guest kit directory) is required",
        )),
        _ => {}
    }
    if let Some(cmdline) = &cfg.cmdline {
        if cmdline.len() > MAX_CMDLINE {
            return Err(invalid(
                "cmdline",
                format!(
                    "{} bytes is longer than the {MAX_CMDLINE} bytes Linux accepts",
                    cmdline.len()
                ),
            ));
        }
        if cmdline.contains('\0') {
            return Err(invalid("cmdline", "must not contain NUL characters"));
        }
    }
    for (field, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if let Some(p) = path {
            check_path(field, p)?;
            match std::fs::metadata(p) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(missing(field, format!("{p} is not a regular file"))),
                Err(e) => return Err(missing(field, format!("{p}: {e}"))),
            }
        }
    }
    if let Some(dir) = &cfg.image {
        check_path("image", dir)?;
        if !Path::new(dir).is_dir() {
            return Err(missing(
                "image",
                format!("{dir} is not a directory (make a guest kit with `vireo image build --out DIR`)"),
            ));
        }
        if !Path::new(dir).join(KIT_MANIFEST).is_file() {
            return Err(missing(
                "image",
                format!("{dir} holds no guest kit ({KIT_MANIFEST} is missing); make one with `vireo image build --out {dir}`"),
            ));
        }
    }
    Ok(())
}

fn missing(field: &str, what: String) -> Invalid {
    Invalid {
        code: "missing_file",
        message: format!("{field}: {what}"),
    }
}

fn check_path(field: &str, p: &str) -> Result<(), Invalid> {
    if !Path::new(p).is_absolute() {
        return Err(invalid(
            field,
            format!(
                "{p:?} must be an absolute path (the daemon does not share your working directory)"
            ),
        ));
    }
    Ok(())
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now, in seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_cfg(path: &str) -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: 64,
            kernel: Some(path.into()),
            initrd: None,
            cmdline: None,
            image: None,
            accel: Accel::Emu,
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800), "2024-05-01T12:00:00Z");
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
        assert!(check_config(&kernel_cfg(&exe), Some(1024)).is_ok());
        let mut c = kernel_cfg(&exe);
        c.vcpus = 0;
        assert!(check_config(&c, None)
            .unwrap_err()
            .message
            .starts_with("vcpus:"));
        let mut c = kernel_cfg(&exe);
        c.memory_mib = 4096;
        assert!(check_config(&c, Some(1024))
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
