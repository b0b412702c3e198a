//! Storage directories: the only places host files named through the API
//! (disk images, kernels, initrds, guest kit directories) may come from.
//!
//! An API admin is not host root: without this, `"disks": ["/etc/shadow"]`
//! or `"/dev/loop0"` would hand a guest any file the daemon can open. So
//! every such path is opened beneath one of the storage directories
//! (`vireo serve --storage DIR`, repeatable; default `STATE_DIR/storage`)
//! with openat2(2) and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS` relative to the directory's descriptor: no `..`
//! out of it, no symlink anywhere on the way (the last component
//! included), no /proc magic links. What is found must be of the expected
//! kind (disks, kernels and initrds regular files, never block or character
//! devices; guest kits directories) and must not be one of the daemon's own
//! state files.
//!
//! On kernels without openat2 (before 5.6: ENOSYS) the fallback is weaker:
//! the path is canonicalized, must equal the path as named (so no symlink
//! was followed) and lie beneath the storage directory, and is then opened
//! with O_NOFOLLOW; a directory swapped for a symlink between the check and
//! the open is not caught there (openat2 resolves atomically).
//!
//! Paths are checked when a definition is stored and again each time the
//! VM starts, so a symlink swapped in after the VM was defined is refused.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use vireo_api::devices::block::{BlockConfig, Format};
use vireo_api::devices::vsock::VsockConfig;
use vireo_api::options::Options;

use vireo_api::model::{Invalid, VmConfig, KIT_MANIFEST};

/// The error code of a path outside the storage directories.
pub const PATH_NOT_ALLOWED: &str = "path_not_allowed";
/// The default storage directory's name in the state directory.
pub const DEFAULT_STORAGE: &str = "storage";

/// What a path must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A disk image: a regular file (never a device node).
    Disk,
    /// A kernel or an initrd: a regular file.
    File,
    /// A guest kit: a directory holding [`KIT_MANIFEST`].
    Kit,
    /// A directory (where a vsock socket is made).
    Dir,
}

/// The storage directories and the state directory they must not expose.
#[derive(Debug, Clone)]
pub struct Storage {
    /// (as configured, canonical); the first is where relative paths go.
    dirs: Vec<(PathBuf, PathBuf)>,
    /// The state directory, canonical.
    state_dir: PathBuf,
    /// (device, inode) of other files of the daemon's (its TLS key and
    /// certificate), wherever they are.
    own: Vec<(u64, u64)>,
}

/// A path that passed: where it is, and the file opened there.
#[derive(Debug)]
pub struct Opened {
    /// The absolute path (beneath a storage directory as configured).
    pub path: PathBuf,
    /// An `O_PATH` descriptor of what was found (for disks: readable).
    pub fd: OwnedFd,
}

/// `struct open_how` of openat2(2).
#[repr(C)]
#[derive(Debug, Default)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

impl Storage {
    /// The storage directories `dirs` (created 0700 when missing) for a
    /// daemon whose state is in `state_dir`.
    pub fn new(dirs: &[PathBuf], state_dir: &Path) -> Result<Storage, String> {
        if dirs.is_empty() {
            return Err("no storage directory".into());
        }
        let state_dir = std::fs::canonicalize(state_dir)
            .map_err(|e| format!("the state directory {}: {e}", state_dir.display()))?;
        let mut out = Vec::new();
        for d in dirs {
            if !d.is_absolute() {
                return Err(format!(
                    "--storage {}: must be an absolute path",
                    d.display()
                ));
            }
            if !d.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .map_err(|e| format!("--storage {}: cannot create it: {e}", d.display()))?;
            }
            let canon =
                std::fs::canonicalize(d).map_err(|e| format!("--storage {}: {e}", d.display()))?;
            if !canon.is_dir() {
                return Err(format!("--storage {}: not a directory", d.display()));
            }
            if canon == state_dir {
                return Err(format!(
                    "--storage {}: is the state directory itself; give a directory for images (e.g. {})",
                    d.display(),
                    state_dir.join(DEFAULT_STORAGE).display()
                ));
            }
            out.push((d.clone(), canon));
        }
        Ok(Storage {
            dirs: out,
            state_dir,
            own: Vec::new(),
        })
    }

    /// Refuse `files` too (e.g. the TLS key), by identity: a hard link or
    /// any path to them in a storage directory is refused.
    pub fn protect(&mut self, files: &[&Path]) {
        for f in files {
            if let Ok(m) = std::fs::metadata(f) {
                self.own.push((m.dev(), m.ino()));
            }
        }
    }

    /// The storage directories as configured.
    pub fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|(d, _)| d.as_path()).collect()
    }

    /// The error for `path` named in `field`: where it must be, and the fix.
    fn not_allowed(&self, field: &str, path: &str, why: &str) -> Invalid {
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect();
        Invalid {
            code: PATH_NOT_ALLOWED,
            message: format!(
                "{field}: {path} {why}; host files must be beneath a storage directory ({}): \
                 copy the image into {} or start vireo serve with --storage DIR",
                dirs.join(", "),
                dirs[0]
            ),
        }
    }

    /// Find `path` (absolute beneath a storage directory or `extra`, or
    /// relative to the first storage directory) and open it as `kind`.
    /// `extra` is a daemon-made directory also allowed for this VM (a
    /// clone's own disks).
    pub fn open(
        &self,
        field: &str,
        path: &str,
        kind: Kind,
        extra: Option<&Path>,
    ) -> Result<Opened, Invalid> {
        let p = Path::new(path);
        if path.is_empty() || path.contains('\0') {
            return Err(self.not_allowed(field, &format!("{path:?}"), "is not a file name"));
        }
        let extra = extra.map(|e| {
            let canon = std::fs::canonicalize(e).unwrap_or_else(|_| e.to_path_buf());
            (e.to_path_buf(), canon)
        });
        let roots = self.dirs.iter().chain(extra.iter());
        let (root, canon_root, rel) = if p.is_absolute() {
            // The most specific root that holds it (a clone's own disks
            // directory may lie inside a storage directory).
            let found = roots
                .clone()
                .filter_map(|(d, c)| {
                    p.strip_prefix(d)
                        .ok()
                        .map(|r| (d, c, r))
                        .or_else(|| p.strip_prefix(c).ok().map(|r| (d, c, r)))
                })
                .min_by_key(|(_, _, r)| r.components().count());
            match found {
                Some((d, c, r)) => (d.clone(), c.clone(), r.to_path_buf()),
                None => {
                    return Err(self.not_allowed(field, path, "is not beneath a storage directory"))
                }
            }
        } else {
            let (d, c) = &self.dirs[0];
            (d.clone(), c.clone(), p.to_path_buf())
        };
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(self.not_allowed(field, path, "leads out of its directory (..)"));
        }
        let shown = root.join(&rel);
        let fd = open_beneath(&canon_root, &rel).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Invalid {
                code: "missing_file",
                message: match kind {
                    Kind::Disk => format!(
                        "{field}: path={}: no such file (make one with `vireo image create {} --size 10G`)",
                        shown.display(),
                        shown.display()
                    ),
                    _ => format!("{field}: {}: no such file or directory", shown.display()),
                },
            },
            Some(libc::ELOOP) => {
                self.not_allowed(field, path, "is a symlink or passes through one")
            }
            Some(libc::EXDEV) => self.not_allowed(field, path, "leads out of its storage directory"),
            _ => self.not_allowed(field, path, &format!("cannot be opened ({e})")),
        })?;
        let meta = fstat(&fd).map_err(|e| Invalid {
            code: "missing_file",
            message: format!("{field}: {}: {e}", shown.display()),
        })?;
        let ft = meta.file_type();
        match kind {
            Kind::Disk | Kind::File if !ft.is_file() => {
                let what = if ft.is_block_device() || ft.is_char_device() {
                    "is a device node (only image files are allowed)"
                } else if ft.is_dir() {
                    "is a directory, not a file"
                } else {
                    "is not a regular file"
                };
                return Err(self.not_allowed(field, path, what));
            }
            Kind::Dir if !ft.is_dir() => {
                return Err(self.not_allowed(field, path, "is not a directory"));
            }
            Kind::Kit if !ft.is_dir() => {
                return Err(Invalid {
                    code: "missing_file",
                    message: format!(
                        "{field}: {} is not a directory (make a guest kit with `vireo image build --out DIR`)",
                        shown.display()
                    ),
                })
            }
            _ => {}
        }
        let real = canon_root.join(&rel);
        if self.is_state(&real, &canon_root, &meta) {
            return Err(self.not_allowed(
                field,
                path,
                "is one of the daemon's own state files (or its TLS key or certificate)",
            ));
        }
        if kind == Kind::Kit {
            let manifest = open_beneath(&canon_root, &rel.join(KIT_MANIFEST));
            let ok = manifest
                .as_ref()
                .ok()
                .and_then(|f| fstat(f).ok())
                .is_some_and(|m| m.is_file());
            if !ok {
                return Err(Invalid {
                    code: "missing_file",
                    message: format!(
                        "{field}: {} holds no guest kit ({KIT_MANIFEST} is missing or not a regular file); make one with `vireo image build --out {}`",
                        shown.display(),
                        shown.display()
                    ),
                });
            }
            // The files the manifest names are read by `vireo run`: they
            // must be in the kit (a `kernel=/etc/shadow` line would load a
            // host file into the guest).
            if let Ok(m) = manifest {
                self.check_kit_files(field, path, &canon_root, &rel, &shown, &m)?;
            }
        }
        Ok(Opened { path: shown, fd })
    }

    /// Each `kernel=` and `initrd=` file of a kit's manifest (read through
    /// `manifest`) must be a regular file beneath the kit directory.
    fn check_kit_files(
        &self,
        field: &str,
        path: &str,
        root: &Path,
        kit: &Path,
        shown: &Path,
        manifest: &OwnedFd,
    ) -> Result<(), Invalid> {
        let mut text = String::new();
        reopen_readable(manifest)
            .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
            .map_err(|e| Invalid {
                code: "missing_file",
                message: format!("{field}: {}/{KIT_MANIFEST}: {e}", shown.display()),
            })?;
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let key = key.trim();
            if key != "kernel" && key != "initrd" {
                continue;
            }
            let value = value.trim();
            let name = Path::new(value);
            if value.is_empty()
                || name.is_absolute()
                || name
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(self.not_allowed(
                    field,
                    path,
                    &format!("names {key}={value} in its {KIT_MANIFEST}, which is not a file inside the kit"),
                ));
            }
            let ok = open_beneath(root, &kit.join(name))
                .ok()
                .and_then(|f| fstat(&f).ok())
                .is_some_and(|m| m.is_file());
            if !ok {
                return Err(self.not_allowed(
                    field,
                    path,
                    &format!("names {key}={value} in its {KIT_MANIFEST}, which is missing, a symlink or not a regular file"),
                ));
            }
        }
        Ok(())
    }

    /// Whether `real` (found beneath `root`) is the daemon's own: beneath
    /// the state directory while its storage directory is not, or a hard
    /// link to one of the state directory's files.
    fn is_state(&self, real: &Path, root: &Path, meta: &std::fs::Metadata) -> bool {
        if real.starts_with(&self.state_dir) && !root.starts_with(&self.state_dir) {
            return true;
        }
        if self.own.contains(&(meta.dev(), meta.ino())) {
            return true;
        }
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.dev() == meta.dev() && m.ino() == meta.ino())
        })
    }

    /// Check every host path of `cfg` (opening each), resolving relative
    /// ones, and fix each disk's format: the client's `format=`, else the
    /// one its first bytes show now, before any guest has run on it.
    /// `extra`: a daemon-made directory also allowed (see [`Storage::open`]).
    pub fn confine(
        &self,
        cfg: &mut VmConfig,
        extra: Option<&Path>,
    ) -> Result<Vec<Opened>, Invalid> {
        let mut opened = Vec::new();
        for (field, value, kind) in [
            ("kernel", &mut cfg.kernel, Kind::File),
            ("initrd", &mut cfg.initrd, Kind::File),
            ("image", &mut cfg.image, Kind::Kit),
        ] {
            if let Some(p) = value {
                let o = self.open(field, p, kind, extra)?;
                *p = o.path.display().to_string();
                opened.push(o);
            }
        }
        for (i, s) in cfg.devices.disks.iter_mut().enumerate() {
            let field = format!("disks[{i}]");
            let disk = BlockConfig::from_options(s).map_err(|e| Invalid {
                code: "invalid_value",
                message: format!("{field}: {}", e.message),
            })?;
            let path = disk.path.display().to_string();
            let o = self.open(&field, &path, Kind::Disk, extra)?;
            let detected = probe(&o.fd).map_err(|e| Invalid {
                code: "missing_file",
                message: format!("{field}: path={}: cannot read it: {e}", o.path.display()),
            })?;
            let format = match disk.format {
                Some(Format::Qcow2) if detected != Format::Qcow2 => {
                    return Err(Invalid {
                        code: "invalid_value",
                        message: format!(
                            "{field}: path={} is not a qcow2 image (no QFI\\xfb magic) but format=qcow2 was given; give format=raw or the right file",
                            o.path.display()
                        ),
                    })
                }
                Some(f) => f,
                None => detected,
            };
            *s = rewrite_disk(s, &o.path, format);
            opened.push(o);
        }
        // The vsock socket is made by `vireo run` (and the guest's
        // connections go to `SOCKET_PORT` next to it): its directory must
        // be a storage directory's, or the VM's own (a clone's socket).
        if let Some(s) = &cfg.devices.vsock {
            if let Ok(v) = VsockConfig::from_options(s) {
                let own = extra.and_then(Path::parent);
                if let (Some(dir), Some(_)) = (v.socket.parent(), v.socket.file_name()) {
                    if v.socket.is_absolute() && Some(dir) != own {
                        let o = self.open("vsock", &dir.display().to_string(), Kind::Dir, None)?;
                        // A jailed VM sees its socket's directory writable:
                        // a storage directory itself would show it every
                        // other image there.
                        let canon = std::fs::canonicalize(dir).ok();
                        if self
                            .dirs
                            .iter()
                            .any(|(_, c)| canon.as_deref() == Some(c.as_path()))
                        {
                            return Err(self.not_allowed(
                                "vsock",
                                &v.socket.display().to_string(),
                                "is directly in a storage directory, which its VM would see whole; put the socket in a subdirectory of its own (e.g. STORAGE/vsock-VM/)",
                            ));
                        }
                        opened.push(o);
                    }
                }
            }
        }
        Ok(opened)
    }

    /// Check `cfg` again before its VM starts: every path must still
    /// resolve beneath a storage directory (or `extra`) to the same place,
    /// and every disk must have its format recorded.
    pub fn recheck(&self, cfg: &VmConfig, extra: Option<&Path>) -> Result<Vec<Opened>, Invalid> {
        for (i, s) in cfg.devices.disks.iter().enumerate() {
            if disk_format(s).is_none() {
                return Err(Invalid {
                    code: "invalid_value",
                    message: format!(
                        "disks[{i}]: {s:?} has no format= recorded; PATCH the VM's disks with format=raw or format=qcow2"
                    ),
                });
            }
        }
        let mut copy = cfg.clone();
        let opened = self.confine(&mut copy, extra)?;
        // The same files, named the same way, with the same formats (the
        // option strings' order may differ: a clone's are written by the
        // daemon).
        let disk = |s: &str| {
            BlockConfig::from_options(s)
                .ok()
                .map(|d| (d.path, d.format.map(|f| f.name())))
        };
        let same = copy.kernel == cfg.kernel
            && copy.initrd == cfg.initrd
            && copy.image == cfg.image
            && copy.devices.disks.len() == cfg.devices.disks.len()
            && copy
                .devices
                .disks
                .iter()
                .zip(&cfg.devices.disks)
                .all(|(a, b)| disk(a).is_some() && disk(a) == disk(b));
        if !same {
            return Err(Invalid {
                code: PATH_NOT_ALLOWED,
                message: "the VM's host paths no longer resolve to what was defined; update its definition".into(),
            });
        }
        Ok(opened)
    }
}

/// The `format=` of a `--disk` option string, if it has one.
pub fn disk_format(s: &str) -> Option<String> {
    Options::parse("disk", s, Some("path"))
        .ok()
        .and_then(|mut o| o.string("format"))
}

/// `s` with its path replaced by `path` and `format=` set to `format`
/// (other options kept as given). Option strings hold no escapes: a path
/// cannot contain ',' (the parser would have split it).
pub fn rewrite_disk(s: &str, path: &Path, format: Format) -> String {
    let mut parts = vec![format!("path={}", path.display())];
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some(("path", _)) | Some(("format", _)) => {}
            None if i == 0 => {}
            _ => parts.push(part.to_string()),
        }
    }
    parts.push(format!("format={}", format.name()));
    parts.join(",")
}

/// The format the first bytes of the regular file at `path` claim (no
/// symlink followed at its last component): for records from before
/// formats were recorded.
pub fn probe_path(path: &Path) -> std::io::Result<Format> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    probe_file(f)
}

/// The format an image's first bytes claim (read through `fd`, an
/// `O_PATH` descriptor reopened for reading through /proc/self/fd, or
/// directly when readable).
fn probe(fd: &OwnedFd) -> std::io::Result<Format> {
    probe_file(reopen_readable(fd)?)
}

fn probe_file(mut f: File) -> std::io::Result<Format> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(if got == 4 && magic == vireo_block::qcow2::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// A readable descriptor of the same file as the `O_PATH` one: reopened
/// through its /proc/self/fd link (the same inode, no path lookup).
fn reopen_readable(fd: &OwnedFd) -> std::io::Result<File> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(link)?;
    Ok(f)
}

fn fstat(fd: &OwnedFd) -> std::io::Result<std::fs::Metadata> {
    // An O_PATH descriptor supports fstat; File::metadata is fstat.
    let dup = fd.try_clone()?;
    File::from(dup).metadata()
}

/// Open `rel` beneath the directory `root` as an `O_PATH` descriptor, no
/// symlinks followed and no escape: openat2, or the weaker fallback on
/// kernels without it.
pub(crate) fn open_beneath(root: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let dir = File::open(root)?;
    match openat2(&dir, rel) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_fallback(root, rel),
        other => other,
    }
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat2(dir: &File, rel: &Path) -> std::io::Result<OwnedFd> {
    let name = c_path(rel)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (its size passed) and the NUL-terminated
    // name; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; it is owned once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// For kernels without openat2: canonicalize, require the result to be the
/// path as named (no symlink on the way) beneath `root`, open O_NOFOLLOW.
pub(crate) fn open_fallback(root: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    let named = root.join(rel);
    let named: PathBuf = named
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    let real = std::fs::canonicalize(&named)?;
    if !real.starts_with(root) {
        return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
    }
    if real != named {
        return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
    }
    let name = c_path(&real)?;
    // SAFETY: open with a NUL-terminated path; returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open just returned this fd; it is owned once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_api::model::Devices;
    use vireo_api::vm::Accel;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!(
                "vireo-storage-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(std::fs::canonicalize(&p).unwrap())
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(kernel: &str, disks: &[&str]) -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: vireo_api::units::MemorySize::mib_const(64),
            kernel: Some(kernel.into()),
            initrd: None,
            cmdline: None,
            image: None,
            accel: Accel::Emu,
            devices: Devices {
                disks: disks.iter().map(|s| s.to_string()).collect(),
                ..Devices::default()
            },
        }
    }

    /// A state dir `t/state` with its files, a storage dir `t/images`.
    fn setup(t: &Tmp) -> Storage {
        let state = t.0.join("state");
        std::fs::create_dir_all(state.join("vms/a")).unwrap();
        std::fs::write(state.join("state.db"), b"db").unwrap();
        std::fs::write(state.join("vms/a/vireo.log"), b"log").unwrap();
        let images = t.0.join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(images.join("disk.raw"), vec![0u8; 4096]).unwrap();
        let mut q = vec![0u8; 4096];
        q[..4].copy_from_slice(&vireo_block::qcow2::MAGIC);
        std::fs::write(images.join("disk.qcow2"), q).unwrap();
        Storage::new(&[images], &state).unwrap()
    }

    fn refused(s: &Storage, c: &mut VmConfig, needle: &str) -> Invalid {
        let e = s.confine(c, None).unwrap_err();
        assert!(e.message.contains(needle), "{e:?} should say {needle:?}");
        e
    }

    #[test]
    fn paths_resolve_beneath_the_storage_dirs_and_formats_are_pinned() {
        let t = Tmp::new("ok");
        let s = setup(&t);
        let images = t.0.join("images");
        let mut c = cfg(
            "vmlinux",
            &[
                &format!("{}/disk.raw,readonly=on", images.display()),
                "path=disk.qcow2,id=d",
            ],
        );
        s.confine(&mut c, None).unwrap();
        assert_eq!(
            c.kernel.as_deref(),
            Some(&*images.join("vmlinux").display().to_string())
        );
        assert_eq!(
            c.devices.disks,
            [
                format!("path={}/disk.raw,readonly=on,format=raw", images.display()),
                format!("path={}/disk.qcow2,id=d,format=qcow2", images.display()),
            ]
        );
        // Pinned: a guest writing a qcow2 header into the raw disk changes
        // nothing the definition says.
        let mut q = vec![0u8; 4096];
        q[..4].copy_from_slice(&vireo_block::qcow2::MAGIC);
        std::fs::write(images.join("disk.raw"), q).unwrap();
        let again = c.clone();
        s.recheck(&again, None).unwrap();
        // Options in another order (as the daemon writes a clone's) are the
        // same definition.
        let mut reordered = c.clone();
        reordered.devices.disks[0] =
            format!("path={}/disk.raw,format=raw,readonly=on", images.display());
        s.recheck(&reordered, None).unwrap();
        assert!(again.devices.disks[0].ends_with("format=raw"));
        // A given format is kept; qcow2 claimed for a file without the magic is refused.
        std::fs::write(images.join("plain.img"), vec![0u8; 512]).unwrap();
        let mut c = cfg("vmlinux", &["plain.img,format=qcow2"]);
        let e = s.confine(&mut c, None).unwrap_err();
        assert!(e.message.contains("not a qcow2 image"), "{e:?}");
    }

    #[test]
    fn paths_outside_symlinks_devices_and_state_files_are_refused() {
        let t = Tmp::new("bad");
        let s = setup(&t);
        let images = t.0.join("images");
        let e = refused(
            &s,
            &mut cfg("/etc/passwd", &[]),
            "not beneath a storage directory",
        );
        assert_eq!(e.code, PATH_NOT_ALLOWED);
        assert!(e.message.contains(&images.display().to_string()), "{e:?}");
        assert!(e.message.contains("--storage DIR"), "{e:?}");
        refused(&s, &mut cfg("../state/state.db", &[]), "..");
        refused(
            &s,
            &mut cfg(&format!("{}/../state/state.db", images.display()), &[]),
            "..",
        );
        // Symlinks: to outside, to inside, and a directory on the way.
        std::os::unix::fs::symlink("/etc/passwd", images.join("out")).unwrap();
        std::os::unix::fs::symlink("vmlinux", images.join("in")).unwrap();
        std::os::unix::fs::symlink("/etc", images.join("etc")).unwrap();
        refused(&s, &mut cfg("out", &[]), "symlink");
        refused(&s, &mut cfg("in", &[]), "symlink");
        refused(&s, &mut cfg("etc/passwd", &[]), "symlink");
        refused(&s, &mut cfg("vmlinux", &["out"]), "symlink");
        // Not regular files.
        std::fs::create_dir(images.join("sub")).unwrap();
        refused(&s, &mut cfg("sub", &[]), "directory");
        let fifo = c_path(&images.join("fifo")).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        refused(&s, &mut cfg("vmlinux", &["fifo"]), "not a regular file");
        let null = c_path(&images.join("null")).unwrap();
        // SAFETY: mknod with a NUL-terminated path (needs root; skipped otherwise).
        if unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } == 0 {
            refused(&s, &mut cfg("vmlinux", &["null"]), "device node");
        }
        let e = s.confine(&mut cfg("missing", &[]), None).unwrap_err();
        assert_eq!(e.code, "missing_file");
        // A vsock socket outside the storage directories (the guest's
        // connections would go to sockets next to it).
        let mut c = cfg("vmlinux", &[]);
        c.devices.vsock = Some("cid=3,socket=/run/x.sock".into());
        refused(&s, &mut c, "vsock: /run");
        c.devices.vsock = Some(format!("cid=3,socket={}/sub/x.sock", images.display()));
        s.confine(&mut c, None).unwrap();
        // ... and not directly in one: a jailed VM would see every image.
        c.devices.vsock = Some(format!("cid=3,socket={}/x.sock", images.display()));
        refused(&s, &mut c, "subdirectory of its own");
        c.devices.vsock = Some(format!("cid=3,socket={}/etc/x.sock", images.display()));
        refused(&s, &mut c, "symlink");
        // The state directory inside a storage directory stays off limits,
        // hard links to its files too.
        let wide = Storage::new(std::slice::from_ref(&t.0), &t.0.join("state")).unwrap();
        refused(&wide, &mut cfg("state/state.db", &[]), "state files");
        refused(
            &wide,
            &mut cfg("images/vmlinux", &["state/vms/a/vireo.log"]),
            "state files",
        );
        std::fs::hard_link(t.0.join("state/state.db"), t.0.join("db-link")).unwrap();
        refused(&wide, &mut cfg("db-link", &[]), "state files");
        // Its TLS key, wherever it is.
        let mut s = s;
        std::fs::write(images.join("key.pem"), b"secret").unwrap();
        s.protect(&[&images.join("key.pem")]);
        refused(&s, &mut cfg("key.pem", &[]), "state files");
        assert!(Storage::new(&[t.0.join("state")], &t.0.join("state")).is_err());
    }

    #[test]
    fn a_symlink_swapped_in_after_definition_is_caught_on_recheck() {
        let t = Tmp::new("swap");
        let s = setup(&t);
        let images = t.0.join("images");
        let mut c = cfg("vmlinux", &["disk.raw"]);
        s.confine(&mut c, None).unwrap();
        s.recheck(&c, None).unwrap();
        std::fs::remove_file(images.join("disk.raw")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", images.join("disk.raw")).unwrap();
        let e = s.recheck(&c, None).unwrap_err();
        assert_eq!(e.code, PATH_NOT_ALLOWED);
        // A record from before formats were pinned is refused too.
        let mut old = cfg("vmlinux", &[]);
        old.devices.disks = vec![format!("{}/disk.qcow2", images.display())];
        assert!(s
            .recheck(&old, None)
            .unwrap_err()
            .message
            .contains("no format="));
    }

    #[test]
    fn kits_must_hold_the_files_their_manifest_names() {
        let t = Tmp::new("kit");
        let s = setup(&t);
        let kit = t.0.join("images/kit");
        std::fs::create_dir_all(&kit).unwrap();
        std::fs::write(kit.join("vmlinuz"), b"k").unwrap();
        std::fs::write(kit.join("initrd.img"), b"i").unwrap();
        let manifest = |kernel: &str| {
            std::fs::write(
                kit.join(KIT_MANIFEST),
                format!("kernel={kernel}\ninitrd=initrd.img\ncmdline=x\nkernel_version=1\n"),
            )
            .unwrap()
        };
        let with_image = || {
            let mut c = cfg("x", &[]);
            c.kernel = None;
            c.image = Some("kit".into());
            c
        };
        manifest("vmlinuz");
        let mut c = with_image();
        s.confine(&mut c, None).unwrap();
        assert_eq!(c.image.as_deref(), Some(&*kit.display().to_string()));
        for bad in ["/etc/shadow", "../vmlinux", "missing"] {
            manifest(bad);
            let e = s.confine(&mut with_image(), None).unwrap_err();
            assert_eq!(e.code, PATH_NOT_ALLOWED, "{bad}: {e:?}");
            assert!(e.message.contains(&format!("kernel={bad}")), "{e:?}");
        }
        std::os::unix::fs::symlink("/etc/passwd", kit.join("link")).unwrap();
        manifest("link");
        assert!(s.confine(&mut with_image(), None).is_err());
    }

    #[test]
    fn the_fallback_refuses_symlinks_and_escapes() {
        let t = Tmp::new("fallback");
        let _s = setup(&t);
        let images = t.0.join("images");
        std::os::unix::fs::symlink("/etc/passwd", images.join("out")).unwrap();
        std::os::unix::fs::symlink("vmlinux", images.join("in")).unwrap();
        assert!(open_fallback(&images, Path::new("vmlinux")).is_ok());
        let err = |rel: &str| {
            open_fallback(&images, Path::new(rel))
                .unwrap_err()
                .raw_os_error()
        };
        assert_eq!(err("out"), Some(libc::EXDEV));
        assert_eq!(err("in"), Some(libc::ELOOP));
        assert_eq!(err("../state/state.db"), Some(libc::EXDEV));
        assert_eq!(err("nope"), Some(libc::ENOENT));
    }

    #[test]
    fn disk_strings_are_rewritten_keeping_their_options() {
        let f = Format::Raw;
        assert_eq!(
            rewrite_disk("d.img,readonly=on,format=raw", Path::new("/s/d.img"), f),
            "path=/s/d.img,readonly=on,format=raw"
        );
        assert_eq!(
            rewrite_disk("id=x,path=d.img,bw=1M", Path::new("/s/d.img"), f),
            "path=/s/d.img,id=x,bw=1M,format=raw"
        );
        assert_eq!(
            disk_format("path=/a,format=qcow2").as_deref(),
            Some("qcow2")
        );
        assert_eq!(disk_format("/a"), None);
    }
}
