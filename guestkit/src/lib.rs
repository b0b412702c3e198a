//! `vireo image build`: make a guest kit — a Debian kernel, and an initramfs
//! that vireo writes itself holding a static busybox, the virtio modules and
//! an `/init` that runs one command (or a shell) and powers off.
//!
//! The kernel and busybox come from Debian's package registry through
//! `apt-get download` and are unpacked with `dpkg-deb -x`: nothing is
//! installed on the host. The kit directory holds `vmlinuz`, `initrd.img`
//! and the manifest `vireo-kit.conf` that [`GuestKit::open`] reads.
//!
//! Guest side (see [`init`]): put `vireo.run=COMMAND` last on the kernel
//! command line to run COMMAND; `vireo-init: ready` is printed just before
//! it starts, and `vireo: command exited with status N` after.
//! `/bin/vsock-send CID PORT` (see [`vsock_send`]) connects to an AF_VSOCK
//! port, sends its stdin and prints the reply: the host is CID 2.

pub mod cpio;
mod debian;
mod init;
mod modules;
pub mod vsock_send;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cpio::{CpioError, CpioWriter};
use modules::{ModulePlan, ModulesError};

/// The kernel command line a kit records. `cryptomgr.notests` skips the
/// crypto self-tests Debian's kernel runs at boot: on the emulator they are
/// the largest part of the boot (a minute and more), and a test kit gains
/// nothing from them.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=k cryptomgr.notests";
/// The manifest file inside a kit directory.
pub const MANIFEST: &str = "vireo-kit.conf";
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.img";
/// The AF_VSOCK client vireo assembles into the kit (see [`vsock_send`]).
pub const VSOCK_SEND: &str = "bin/vsock-send";
/// Prefix of the scratch directory a build unpacks packages into.
const WORK_PREFIX: &str = ".vireo-image-build-";

pub struct BuildOptions {
    pub out: PathBuf,
}

/// A built guest kit: what to boot and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKit {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub kernel_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("`{tool}` was not found: `vireo image build` needs Debian's package tools; install the `{package}` package (this works on Debian and Ubuntu hosts only)")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("could not start `{tool}`: {source}; check that it is installed and runnable")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("apt does not know the package `{package}` ({detail}): the package lists are empty or incomplete; run `apt-get update` and build again")]
    AptListsEmpty { package: String, detail: String },
    #[error("downloading `{package}` failed because the package lists are out of date ({detail}); run `apt-get update` and build again")]
    AptListsStale { package: String, detail: String },
    #[error("downloading `{package}` failed: the Debian package mirror could not be reached ({detail}); check the network connection or apt's proxy settings and build again")]
    Network { package: String, detail: String },
    #[error("`{command}` failed: {detail}; fix the apt/dpkg problem it names and build again")]
    CommandFailed { command: String, detail: String },
    #[error("`apt-cache depends linux-image-amd64` named no linux-image-* package ({detail}); run `apt-get update` and build again")]
    KernelUnresolved { detail: String },
    #[error("could not {action} {path}: {source}; check that the directory is writable and has room (a build needs about 500 MB while it runs)")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the package `{package}` {problem}; it may be damaged: run `apt-get clean` and build again"
    )]
    PackageContent { package: String, problem: String },
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error("the initramfs vireo just wrote fails its own check ({problem}); this is a bug in vireo, please report it")]
    InitrdCheck { problem: String },
    #[error("{dir} holds no guest kit ({MANIFEST} is missing); run `vireo image build --out {dir}` to make one")]
    KitMissing { dir: PathBuf },
    #[error("the guest kit in {dir} is incomplete: {problem}; run `vireo image build --out {dir}` to rebuild it")]
    KitInvalid { dir: PathBuf, problem: String },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}

impl GuestKit {
    /// Read the manifest a build wrote into `dir`.
    pub fn open(dir: &Path) -> Result<GuestKit, ImageError> {
        let manifest = dir.join(MANIFEST);
        let text = match fs::read_to_string(&manifest) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::KitMissing {
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(ImageError::Io {
                    action: "read the guest kit manifest",
                    path: manifest,
                    source,
                })
            }
        };
        let invalid = |problem: String| ImageError::KitInvalid {
            dir: dir.to_path_buf(),
            problem,
        };
        let mut values = std::collections::BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| {
                invalid(format!(
                    "{MANIFEST} line {} is not key=value: {line:?}",
                    i + 1
                ))
            })?;
            values.insert(key.trim(), value.trim());
        }
        let get = |key: &str| {
            values
                .get(key)
                .map(|v| v.to_string())
                .ok_or_else(|| invalid(format!("{MANIFEST} has no `{key}=` line")))
        };
        let kit = GuestKit {
            dir: dir.to_path_buf(),
            kernel: dir.join(get("kernel")?),
            initrd: dir.join(get("initrd")?),
            cmdline: get("cmdline")?,
            kernel_version: get("kernel_version")?,
        };
        for file in [&kit.kernel, &kit.initrd] {
            if !file.is_file() {
                return Err(invalid(format!("{} is missing", file.display())));
            }
        }
        Ok(kit)
    }
}

/// The scratch directory of one build, removed when dropped (also on error).
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(out: &Path) -> Result<WorkDir, ImageError> {
        // Remove what builds that died left behind (their process is gone).
        if let Ok(entries) = fs::read_dir(out) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(WORK_PREFIX) {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let path = out.join(format!("{WORK_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_err("create the work directory", &path))?;
        Ok(WorkDir(path))
    }

    fn subdir(&self, name: &str) -> Result<PathBuf, ImageError> {
        let path = self.0.join(name);
        fs::create_dir_all(&path).map_err(io_err("create the work directory", &path))?;
        Ok(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a
/// failed build never leaves a half-written file under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Fetch and unpack one package into `work/<dir_name>`.
fn fetch(
    work: &WorkDir,
    package: &str,
    dir_name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    progress(&format!("downloading {package} …"));
    let deb = debian::download(package, &work.subdir(&format!("{dir_name}-deb"))?)?;
    progress(&format!("unpacking {package} …"));
    let root = work.subdir(dir_name)?;
    debian::unpack(&deb, &root)?;
    Ok(root)
}

/// The kernel image in an unpacked kernel package, and its version (from
/// the file name `boot/vmlinuz-VERSION`).
fn find_kernel(root: &Path, package: &str) -> Result<(PathBuf, String), ImageError> {
    let boot = root.join("boot");
    let mut found = Vec::new();
    for entry in fs::read_dir(&boot).map_err(io_err("list", &boot))? {
        let entry = entry.map_err(io_err("list", &boot))?;
        if let Some(version) = entry.file_name().to_string_lossy().strip_prefix("vmlinuz-") {
            found.push((entry.path(), version.to_string()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(ImageError::PackageContent {
            package: package.to_string(),
            problem: format!("has {n} boot/vmlinuz-* files where one was expected"),
        }),
    }
}

/// Whether `image` is a bzImage: the setup header magic "HdrS" at 0x202.
fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS")
}

/// The initramfs as a newc cpio, gzip-compressed; also its entry count.
fn make_initramfs(
    busybox: &[u8],
    plan: &ModulePlan,
    script: &str,
) -> Result<(Vec<u8>, usize), ImageError> {
    let fail = |e: std::io::Error| ImageError::InitrdCheck {
        problem: format!("writing the archive failed: {e}"),
    };
    let mut w = CpioWriter::new(Vec::new());
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        init::MODULE_DIR,
    ] {
        w.dir(dir, 0o755).map_err(fail)?;
    }
    // The kernel opens /dev/console for init's stdio before init runs.
    w.char_dev("dev/console", 0o600, 5, 1).map_err(fail)?;
    w.char_dev("dev/null", 0o666, 1, 3).map_err(fail)?;
    w.file("bin/busybox", 0o755, busybox).map_err(fail)?;
    for applet in init::APPLETS {
        w.symlink(&format!("bin/{applet}"), "busybox")
            .map_err(fail)?;
    }
    let vsock_send = vsock_send::elf().map_err(|e| ImageError::InitrdCheck {
        problem: format!("assembling /{VSOCK_SEND} failed: {e}"),
    })?;
    w.file(VSOCK_SEND, 0o755, &vsock_send).map_err(fail)?;
    w.file("init", 0o755, script.as_bytes()).map_err(fail)?;
    for (name, path) in &plan.order {
        let bytes = modules::read_module(path)?;
        w.file(&format!("{}/{name}.ko", init::MODULE_DIR), 0o644, &bytes)
            .map_err(fail)?;
    }
    let entries = w.entries();
    let cpio = w.finish().map_err(fail)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&cpio).map_err(fail)?;
    Ok((gz.finish().map_err(fail)?, entries))
}

/// Read the compressed initramfs back and check the pieces the guest needs.
fn check_initramfs(gz: &[u8], plan: &ModulePlan) -> Result<(), ImageError> {
    let problem = |problem: String| ImageError::InitrdCheck { problem };
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut cpio)
        .map_err(|e| problem(format!("gunzip: {e}")))?;
    let entries = cpio::read_newc(&cpio).map_err(|e: CpioError| problem(e.to_string()))?;
    let find = |name: &str| entries.iter().find(|e| e.name == name);
    match find("init") {
        Some(e)
            if e.file_type() == cpio::S_IFREG
                && e.permissions() == 0o755
                && e.data.starts_with(b"#!/bin/sh") => {}
        _ => {
            return Err(problem(
                "/init is missing or not an executable script".into(),
            ))
        }
    }
    match find("bin/busybox") {
        Some(e) if e.file_type() == cpio::S_IFREG && e.data.starts_with(b"\x7fELF") => {}
        _ => return Err(problem("/bin/busybox is missing".into())),
    }
    match find("bin/sh") {
        Some(e) if e.file_type() == cpio::S_IFLNK && e.data == b"busybox" => {}
        _ => return Err(problem("/bin/sh is not a link to busybox".into())),
    }
    match find(VSOCK_SEND) {
        Some(e)
            if e.file_type() == cpio::S_IFREG
                && e.permissions() == 0o755
                && e.data.starts_with(b"\x7fELF") => {}
        _ => return Err(problem(format!("/{VSOCK_SEND} is missing"))),
    }
    match find("dev/console") {
        Some(e) if e.file_type() == cpio::S_IFCHR && (e.rdev_major, e.rdev_minor) == (5, 1) => {}
        _ => return Err(problem("/dev/console is not character device 5:1".into())),
    }
    for (name, _) in &plan.order {
        let file = format!("{}/{name}.ko", init::MODULE_DIR);
        if !find(&file).is_some_and(|e| e.data.starts_with(b"\x7fELF")) {
            return Err(problem(format!("/{file} is missing")));
        }
    }
    Ok(())
}

/// Build a guest kit into `opts.out`. `progress` receives one human line per
/// step ("downloading linux-image-6.1.0-xx-amd64 …").
pub fn build(opts: &BuildOptions, progress: &mut dyn FnMut(&str)) -> Result<GuestKit, ImageError> {
    let started = Instant::now();
    fs::create_dir_all(&opts.out).map_err(io_err("create the output directory", &opts.out))?;
    let out = opts
        .out
        .canonicalize()
        .map_err(io_err("resolve the output directory", &opts.out))?;
    // A rebuild that fails half way must not leave the old manifest pointing
    // at new or missing files.
    let manifest = out.join(MANIFEST);
    match fs::remove_file(&manifest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ImageError::Io {
                action: "remove the old manifest",
                path: manifest,
                source,
            })
        }
    }
    let work = WorkDir::create(&out)?;

    progress(&format!(
        "resolving the kernel package behind {} …",
        debian::KERNEL_META
    ));
    let kernel_package = debian::resolve_kernel_package()?;
    let kernel_root = fetch(&work, &kernel_package, "kernel", progress)?;
    let (vmlinuz, version) = find_kernel(&kernel_root, &kernel_package)?;
    let image = fs::read(&vmlinuz).map_err(io_err("read", &vmlinuz))?;
    if !is_bzimage(&image) {
        return Err(ImageError::PackageContent {
            package: kernel_package,
            problem: format!(
                "has a {} that is not a bzImage (no \"HdrS\" at 0x202)",
                vmlinuz.display()
            ),
        });
    }
    let modules_root = kernel_root.join("lib/modules").join(&version);
    if !modules_root.is_dir() {
        return Err(ImageError::PackageContent {
            package: kernel_package,
            problem: format!("has no lib/modules/{version} directory"),
        });
    }
    // The config only backs up modules.builtin, so a missing one is fine.
    let config = fs::read_to_string(kernel_root.join("boot").join(format!("config-{version}")))
        .unwrap_or_default();

    let busybox_root = fetch(&work, debian::BUSYBOX, "busybox", progress)?;
    let busybox_path = busybox_root.join("bin/busybox");
    let busybox = fs::read(&busybox_path).map_err(|e| ImageError::PackageContent {
        package: debian::BUSYBOX.to_string(),
        problem: format!("has no usable bin/busybox ({e})"),
    })?;
    debian::check_static_elf(&busybox).map_err(|problem| ImageError::PackageContent {
        package: debian::BUSYBOX.to_string(),
        problem: format!("has a bin/busybox that {problem}"),
    })?;

    progress(&format!("resolving virtio modules of Linux {version} …"));
    let plan = modules::plan(&modules_root, &config)?;
    let names: Vec<String> = plan.order.iter().map(|(n, _)| n.clone()).collect();
    progress(&format!("modules to load, in order: {}", names.join(" ")));
    if !plan.builtin.is_empty() {
        progress(&format!(
            "built into the kernel: {}",
            plan.builtin.join(" ")
        ));
    }
    if !plan.unavailable.is_empty() {
        progress(&format!(
            "not in this kernel, skipped: {}",
            plan.unavailable.join(" ")
        ));
    }

    progress("writing the initramfs …");
    let script = init::script(&names);
    let (initrd, entries) = make_initramfs(&busybox, &plan, &script)?;
    check_initramfs(&initrd, &plan)?;
    let kernel_path = out.join(KERNEL_FILE);
    let initrd_path = out.join(INITRD_FILE);
    write_atomically(&kernel_path, &image)?;
    write_atomically(&initrd_path, &initrd)?;

    let text = format!(
        "# vireo guest kit, written by `vireo image build`; paths are relative to this directory.\n\
         kernel={KERNEL_FILE}\n\
         initrd={INITRD_FILE}\n\
         cmdline={DEFAULT_CMDLINE}\n\
         kernel_version={version}\n\
         kernel_package={kernel_package}\n\
         modules={}\n",
        names.join(" ")
    );
    write_atomically(&manifest, text.as_bytes())?;
    drop(work);

    let kit = GuestKit::open(&out)?;
    progress(&format!(
        "guest kit ready in {:.1} s: {} (Linux {version}, {}), {} ({entries} entries, {} modules, {}), {}",
        started.elapsed().as_secs_f64(),
        kit.kernel.display(),
        mib(image.len()),
        kit.initrd.display(),
        names.len(),
        mib(initrd.len()),
        manifest.display(),
    ));
    Ok(kit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_testkit::TempDir;

    #[test]
    fn open_reads_the_manifest() {
        let tmp = TempDir::new("image-open");
        let dir = tmp.path().to_path_buf();
        fs::write(dir.join("vmlinuz"), b"k").unwrap();
        fs::write(dir.join("initrd.img"), b"i").unwrap();
        fs::write(
            dir.join(MANIFEST),
            "# comment\nkernel=vmlinuz\ninitrd=initrd.img\ncmdline=console=ttyS0 panic=-1 reboot=k\nkernel_version=6.1.0-1-amd64\nextra=ignored\n",
        )
        .unwrap();
        let kit = GuestKit::open(&dir).unwrap();
        assert_eq!(kit.kernel, dir.join("vmlinuz"));
        assert_eq!(kit.initrd, dir.join("initrd.img"));
        assert_eq!(kit.cmdline, "console=ttyS0 panic=-1 reboot=k");
        assert_eq!(kit.kernel_version, "6.1.0-1-amd64");

        fs::remove_file(dir.join("initrd.img")).unwrap();
        let e = GuestKit::open(&dir).unwrap_err();
        assert!(matches!(e, ImageError::KitInvalid { .. }), "{e}");
        assert!(e.to_string().contains("vireo image build --out"), "{e}");

        fs::write(dir.join(MANIFEST), "kernel=vmlinuz\n").unwrap();
        assert!(matches!(
            GuestKit::open(&dir),
            Err(ImageError::KitInvalid { .. })
        ));
    }

    #[test]
    fn open_without_a_kit_names_the_fix() {
        let tmp = TempDir::new("image-missing");
        let dir = tmp.path().to_path_buf();
        let e = GuestKit::open(&dir).unwrap_err();
        assert!(matches!(e, ImageError::KitMissing { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.display().to_string())
                && msg.contains("run `vireo image build --out"),
            "{msg}"
        );
    }

    #[test]
    fn initramfs_passes_its_own_check() {
        let plan = ModulePlan::default();
        let busybox = b"\x7fELF not really".to_vec();
        let (gz, entries) = make_initramfs(&busybox, &plan, &init::script(&[])).unwrap();
        assert!(entries > init::APPLETS.len());
        check_initramfs(&gz, &plan).unwrap();
        // The listing: the assembled AF_VSOCK client is an executable file.
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut cpio)
            .unwrap();
        let listed = cpio::read_newc(&cpio).unwrap();
        assert_eq!(listed.len(), entries);
        let tool = listed
            .iter()
            .find(|e| e.name == "bin/vsock-send")
            .expect("bin/vsock-send in the initramfs");
        assert_eq!(tool.file_type(), cpio::S_IFREG);
        assert_eq!(tool.permissions(), 0o755);
        assert_eq!(tool.data, vsock_send::elf().unwrap());
        let busybox_entry = listed.iter().find(|e| e.name == "bin/busybox").unwrap();
        assert_eq!(busybox_entry.permissions(), 0o755);
        // A plan naming a module the archive lacks fails the check.
        let plan = ModulePlan {
            order: vec![("virtio".into(), PathBuf::from("/nonexistent"))],
            ..Default::default()
        };
        assert!(matches!(
            check_initramfs(&gz, &plan),
            Err(ImageError::InitrdCheck { .. })
        ));
        // So does garbage.
        assert!(check_initramfs(b"not gzip", &plan).is_err());
    }

    #[test]
    fn bzimage_magic() {
        let mut image = vec![0u8; 0x300];
        assert!(!is_bzimage(&image));
        image[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&image));
        assert!(!is_bzimage(b"short"));
    }

    /// The real thing, against Debian's registry. Opt in with
    /// VIREO_IMAGE_BUILD_TEST=1 (the integration test covers it through the
    /// binary).
    #[test]
    fn real_build() {
        if std::env::var_os("VIREO_IMAGE_BUILD_TEST").is_none() {
            return;
        }
        let tmp = TempDir::new("image-build");
        let dir = tmp.path().to_path_buf();
        let kit = build(&BuildOptions { out: dir.clone() }, &mut |l| {
            eprintln!("{l}")
        })
        .unwrap();
        assert!(kit.kernel.is_file() && kit.initrd.is_file());
    }
}
