//! The checks a VM definition must pass before the daemon stores it: the
//! quantities with [`crate::vm`]'s one check, the devices with their own
//! parsers, and what only the daemon can see (paths are absolute, the
//! files exist).

use std::path::Path;

use super::*;

/// A definition that fails a check: which field, what is wrong, and whether
/// it is a missing file (code `missing_file`) or a bad value (`invalid_value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
}

pub(super) fn invalid(field: &str, what: impl std::fmt::Display) -> Invalid {
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

/// A definition's quantity out of its limits, named by its field.
fn limit_invalid(e: LimitError) -> Invalid {
    match e {
        LimitError::VcpuCount { requested, max } => invalid(
            "vcpus",
            format!("must be between {MIN_VCPUS} and {max}, got {requested}"),
        ),
        LimitError::MemoryTooSmall { requested } => invalid(
            "memory_mib",
            format!(
                "must be at least {} MiB, got {}",
                MIN_MEMORY.mib(),
                requested.mib()
            ),
        ),
        LimitError::MemoryTooLarge { requested, host } => invalid(
            "memory_mib",
            format!(
                "{} MiB is more than this host's {} MiB of RAM",
                requested.mib(),
                host.mib()
            ),
        ),
        LimitError::BalloonTooLarge { target_mib, memory } => invalid(
            "balloon",
            format!(
                "target={target_mib} must be less than memory_mib ({}): the balloon takes that much from the guest",
                memory.mib()
            ),
        ),
    }
}

/// Check a definition: ranges (the checks `vireo run` makes, against
/// vireo's own vCPU limit and `host_memory`, the host's memory when known),
/// exactly one of kernel and image, absolute paths to files that exist.
pub fn check_config(cfg: &VmConfig, host_memory: Option<MemorySize>) -> Result<(), Invalid> {
    check_resources(
        cfg.vcpus,
        cfg.memory_mib,
        HostLimits::new(MAX_VCPUS, host_memory),
    )
    .map_err(limit_invalid)?;
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
    check_devices(&cfg.devices, cfg.memory_mib)
}

/// A device option string's error: the field path and the parser's words
/// (`nets[1]: mac=zz: ...`).
fn bad_options(field: &str, e: OptionsError) -> Invalid {
    invalid(field, e.message)
}

/// Check the device option strings with the devices' own parsers, plus
/// what only the daemon can see: paths must be absolute (the VM runs in
/// the daemon's state directory), disk images must exist, a disk or TAP
/// may be used once, the balloon must be smaller than the memory.
pub fn check_devices(d: &Devices, memory: MemorySize) -> Result<(), Invalid> {
    if d.disks.len() > MAX_DISKS {
        return Err(invalid(
            "disks",
            format!("at most {MAX_DISKS} disks, got {}", d.disks.len()),
        ));
    }
    if d.nets.len() > MAX_NETS {
        return Err(invalid(
            "nets",
            format!("at most {MAX_NETS} network devices, got {}", d.nets.len()),
        ));
    }
    let mut disk_paths: Vec<std::path::PathBuf> = Vec::new();
    for (i, s) in d.disks.iter().enumerate() {
        let field = format!("disks[{i}]");
        let disk = BlockConfig::from_options(s).map_err(|e| bad_options(&field, e))?;
        let path = disk.path.display().to_string();
        if !disk.path.is_absolute() {
            return Err(invalid(
                &field,
                format!("path={path} must be an absolute path (the daemon does not share your working directory)"),
            ));
        }
        match std::fs::metadata(&disk.path) {
            Ok(m)
                if m.is_file()
                    || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
            Ok(_) => {
                return Err(missing(
                    &field,
                    format!("path={path} is not a disk image file or block device"),
                ))
            }
            Err(e) => {
                return Err(missing(
                    &field,
                    format!(
                        "path={path}: {e} (make one with `vireo image create {path} --size 10G`)"
                    ),
                ))
            }
        }
        let real = std::fs::canonicalize(&disk.path).unwrap_or(disk.path.clone());
        if let Some(j) = disk_paths.iter().position(|p| *p == real) {
            return Err(invalid(
                &field,
                format!("path={path} is already disks[{j}]; a VM may use an image once"),
            ));
        }
        disk_paths.push(real);
    }
    let mut taps: Vec<String> = Vec::new();
    for (i, s) in d.nets.iter().enumerate() {
        let field = format!("nets[{i}]");
        let net = NetConfig::from_options(s).map_err(|e| bad_options(&field, e))?;
        if let Some(j) = taps.iter().position(|t| *t == net.tap) {
            return Err(invalid(
                &field,
                format!(
                    "tap={} is already nets[{j}]; give each network device its own TAP",
                    net.tap
                ),
            ));
        }
        taps.push(net.tap);
    }
    if let Some(s) = &d.vsock {
        let v = VsockConfig::from_options(s).map_err(|e| bad_options("vsock", e))?;
        let path = v.socket.display().to_string();
        if !v.socket.is_absolute() {
            return Err(invalid(
                "vsock",
                format!("socket={path} must be an absolute path (the daemon does not share your working directory)"),
            ));
        }
        match v.socket.parent() {
            Some(dir) if dir.is_dir() => {}
            _ => {
                return Err(missing(
                    "vsock",
                    format!("socket={path}: its directory does not exist"),
                ))
            }
        }
    }
    if let Some(s) = &d.rng {
        RngConfig::from_options(s).map_err(|e| bad_options("rng", e))?;
    }
    if let Some(s) = &d.balloon {
        let b = BalloonConfig::from_options(s).map_err(|e| bad_options("balloon", e))?;
        check_balloon(b.target_mib, memory).map_err(limit_invalid)?;
    }
    Ok(())
}

/// Give each network device without `mac=` a fixed random one, so the
/// guest keeps its address across restarts (`vireo run` would pick a new
/// one each time). Call after [`check_devices`].
pub fn pin_macs(d: &mut Devices) {
    for s in &mut d.nets {
        if !NetConfig::options_give_mac(s) {
            s.push_str(&format!(",mac={}", Mac::random()));
        }
    }
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
