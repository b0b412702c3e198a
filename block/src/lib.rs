//! Disk image formats for vireo: raw and qcow2.
//!
//! This crate never depends on the VM core, the devices or the front ends
//! (only on `vireo-api`, for the image `Format` every layer names):
//! a block device (virtio-blk) speaks virtio to the guest and a
//! [`DiskImage`] to this crate; the image speaks its format to the host file.
//!
//! ```no_run
//! use vireo_api::devices::block::Format;
//! use vireo_block::{open_as, OpenOptions};
//! let mut disk = open_as("disk.qcow2".as_ref(), Format::Qcow2, OpenOptions::writable())?;
//! let mut sector = [0u8; 512];
//! disk.read_at(&mut sector, 0)?;
//! disk.write_at(&sector, 4096)?;
//! disk.flush()?;
//! # Ok::<(), vireo_block::Error>(())
//! ```
//!
//! [`open_as`] opens an image of a known format; [`open_probed`] detects
//! the format of a read-only image by its magic number (qcow2 starts with
//! `QFI\xfb`; anything else is raw) and refuses writable ones. Backing
//! files are opened read-only, recursively, up to [`MAX_BACKING_DEPTH`]
//! deep, refusing loops, in the format their overlay records (raw when it
//! records none), confined to the overlay's directory and the directories
//! the caller allows ([`resolve_backing`]).

mod error;
mod file;
pub mod qcow2;
mod raw;

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

pub use error::{DisplayPath, Error, Result};
pub use qcow2::{create_qcow2, Qcow2};
pub use raw::Raw;

use file::{DiskFile, HostFile};
use vireo_api::devices::block::Format;

/// How deep a chain of backing files may be (the image itself not counted).
pub const MAX_BACKING_DEPTH: usize = 16;

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions<'a> {
    /// Refuse writes; the file is opened read-only.
    pub read_only: bool,
    /// Directories, besides each image's own, that backing files may live
    /// in (a daemon's storage directories). A backing file outside all of
    /// them is refused.
    pub backing_dirs: &'a [PathBuf],
}

impl OpenOptions<'_> {
    /// Read-only, backing files only beside their overlay.
    pub fn read_only() -> OpenOptions<'static> {
        OpenOptions {
            read_only: true,
            backing_dirs: &[],
        }
    }

    /// Writable, backing files only beside their overlay.
    pub fn writable() -> OpenOptions<'static> {
        OpenOptions {
            read_only: false,
            backing_dirs: &[],
        }
    }
}

/// A virtual disk backed by an image file.
///
/// Offsets and lengths are in bytes and need no alignment. An access that
/// reaches past [`size`](DiskImage::size) is an error and changes nothing.
pub trait DiskImage: Send {
    /// The format of this image (its top layer).
    fn format(&self) -> Format;
    /// The virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` with the disk's bytes from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (fsync), metadata included.
    fn flush(&mut self) -> Result<()>;
    /// Tells the image the range's contents are no longer needed; it may
    /// free space. What the range reads afterwards is unspecified (zeros or
    /// the old data).
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes the range read as zeros, freeing space where the format can.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;
    /// What this layer (not its backing files) is.
    fn layer_info(&mut self) -> Result<LayerInfo>;
    /// The backing image, if this image has one.
    fn backing(&mut self) -> Option<&mut dyn DiskImage>;
}

/// A description of one image file in a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The file's path as opened.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The virtual disk size in bytes.
    pub virtual_size: u64,
    /// qcow2's cluster size.
    pub cluster_size: Option<u64>,
    /// Guest bytes this file holds itself (qcow2: allocated or compressed
    /// clusters times the cluster size; raw: the host blocks in use).
    pub allocated_bytes: u64,
    /// The host file's length.
    pub file_size: u64,
    /// qcow2's version (2 or 3).
    pub version: Option<u32>,
    /// The backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// The backing file format as stored in the image, if stored.
    pub backing_format: Option<String>,
}

/// Opens an image whose format the caller knows (no probing): `Format::Raw`
/// opens even a file that starts with the qcow2 magic as raw, so a guest
/// that writes a qcow2 header onto its raw disk only ever sees its own
/// bytes. A qcow2 image's backing files are opened read-only, confined to
/// the overlay's directory and `options.backing_dirs` (see
/// [`resolve_backing`]).
pub fn open_as(
    path: &Path,
    format: Format,
    options: OpenOptions<'_>,
) -> Result<Box<dyn DiskImage>> {
    let mut chain = Vec::new();
    open_layer(
        path,
        options.read_only,
        format,
        Some(options.backing_dirs),
        &mut chain,
    )
}

/// Opens a read-only image of unknown format, detecting it by its magic
/// number. Guessing is how QEMU let guests read host files (a guest writes
/// a qcow2 header naming a host file onto its raw disk), so it is refused
/// for a writable image, a probed qcow2 is logged, and a probed qcow2 may
/// not have a backing file: give the format to use one.
pub fn open_probed(path: &Path, options: OpenOptions<'_>) -> Result<Box<dyn DiskImage>> {
    if !options.read_only {
        return Err(Error::invalid(
            path,
            "no format given for a writable image; give it (raw or qcow2): vireo never guesses \
             the format of a writable disk, since a guest could write a qcow2 header onto a raw disk",
        ));
    }
    let format = probe(path)?;
    if format == Format::Qcow2 {
        tracing::warn!(
            "{}: no format given; the read-only image starts with the qcow2 magic and is opened \
             as qcow2 (give format=qcow2 to silence this)",
            path.display()
        );
    }
    let mut chain = Vec::new();
    open_layer(path, true, format, None, &mut chain)
}

/// Describes an image and its whole backing chain, top first. The top's
/// format is `format` or, when `None`, detected by its magic number (an
/// operator's look at a file, as `qemu-img info` does); the backing files
/// are confined as for [`open_as`] (to their overlay's directory and
/// `backing_dirs`).
pub fn info(
    path: &Path,
    format: Option<Format>,
    backing_dirs: &[PathBuf],
) -> Result<Vec<LayerInfo>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let options = OpenOptions {
        read_only: true,
        backing_dirs,
    };
    let mut image = open_as(path, format, options)?;
    let mut layers = Vec::new();
    let mut current: Option<&mut dyn DiskImage> = Some(image.as_mut());
    while let Some(layer) = current {
        layers.push(layer.layer_info()?);
        current = layer.backing();
    }
    Ok(layers)
}

/// Detects the format of the file at `path` by its magic number.
pub fn probe(path: &Path) -> Result<Format> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    let host = DiskFile::new(file, path);
    probe_host(&host)
}

fn probe_host(file: &dyn HostFile) -> Result<Format> {
    let mut magic = [0u8; 4];
    if file.len()? >= 4 {
        file.read_at(&mut magic, 0)?;
    }
    Ok(if magic == qcow2::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Host trees no backing file may come from, whatever directories are
/// allowed: kernel interfaces and device nodes.
const FORBIDDEN_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Where the backing file `name` stored in the image at `overlay` is.
///
/// A relative name is relative to the overlay's directory (as qemu-img
/// stores it). The name is resolved with every symlink and `..` followed
/// and must land inside the overlay's directory or one of `backing_dirs`,
/// outside `/proc`, `/sys` and `/dev`, on a regular file: the name is
/// written by whoever wrote the image (possibly a guest), so it may not
/// reach anything else on the host.
pub fn resolve_backing(overlay: &Path, name: &str, backing_dirs: &[PathBuf]) -> Result<PathBuf> {
    let refuse = |why: String| {
        Error::invalid(
            overlay,
            format!(
                "its backing file name {name:?} is refused: {why}; backing files must be regular \
                 files in the image's directory or a storage directory (rebase the overlay with \
                 `qemu-img rebase -u -b NAME -F FORMAT`)"
            ),
        )
    };
    if name.is_empty() || name.contains('\0') {
        return Err(refuse("the name is empty or holds a NUL byte".into()));
    }
    let dir = match overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let own_dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, "resolving", e))?;
    let candidate = own_dir.join(name);
    let resolved = std::fs::canonicalize(&candidate)
        .map_err(|e| Error::io(&candidate, "opening the backing file", e))?;
    if FORBIDDEN_TREES
        .iter()
        .any(|t| resolved.starts_with(Path::new(t)))
    {
        return Err(refuse(format!(
            "it resolves to {}, under /proc, /sys or /dev",
            resolved.display()
        )));
    }
    let inside = std::iter::once(own_dir.clone())
        .chain(
            backing_dirs
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok()),
        )
        .any(|root| resolved.starts_with(&root));
    if !inside {
        return Err(refuse(format!(
            "it resolves to {}, outside {}{}",
            resolved.display(),
            own_dir.display(),
            if backing_dirs.is_empty() {
                String::new()
            } else {
                " and the storage directories".into()
            }
        )));
    }
    let meta = std::fs::metadata(&resolved).map_err(|e| Error::io(&resolved, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!(
            "{} is not a regular file (a device, FIFO, socket or directory)",
            resolved.display()
        )));
    }
    Ok(resolved)
}

fn open_layer(
    path: &Path,
    read_only: bool,
    format: Format,
    backing_dirs: Option<&[PathBuf]>,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskImage>> {
    // `backing_dirs` is None for a probed image: it may have no backing file.
    use std::os::unix::fs::OpenOptionsExt;

    let is_backing = !chain.is_empty();
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, "opening", e))?;
    if chain.contains(&canonical) {
        let names: Vec<String> = chain
            .iter()
            .chain(std::iter::once(&canonical))
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::invalid(
            path,
            format!(
                "the backing chain loops ({}); point one of these images at another backing file \
                 with `qemu-img rebase -u`",
                names.join(" -> ")
            ),
        ));
    }
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(Error::invalid(
            path,
            format!(
                "the backing chain is deeper than {MAX_BACKING_DEPTH} images; flatten it with \
                 `vireo image convert`"
            ),
        ));
    }
    chain.push(canonical);
    let mut fs_options = FsOpenOptions::new();
    fs_options.read(true).write(!read_only);
    if is_backing {
        // `path` was resolved with every symlink followed; one put in its
        // place since then is not followed.
        fs_options.custom_flags(libc::O_NOFOLLOW);
    }
    let file = fs_options.open(path).map_err(|e| {
        let op = if read_only {
            "opening"
        } else {
            "opening for writing"
        };
        Error::io(path, op, e)
    })?;
    if is_backing {
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if !meta.file_type().is_file() {
            return Err(Error::invalid(
                path,
                "the backing file is not a regular file (a device or FIFO); backing files must \
                 be image files",
            ));
        }
    }
    let host: Box<dyn HostFile> = Box::new(DiskFile::new(file, path));
    let detected = probe_host(host.as_ref())?;
    match format {
        Format::Raw => {
            if is_backing && detected == Format::Qcow2 {
                tracing::warn!(
                    "{}: a backing file recorded without a format is read as raw, yet it starts \
                     with the qcow2 magic; if it is a qcow2 image, record that with \
                     `qemu-img rebase -u -b NAME -F qcow2` on the overlay",
                    path.display()
                );
            }
            Ok(Box::new(Raw::open(host, read_only)?))
        }
        Format::Qcow2 => {
            if detected != Format::Qcow2 {
                return Err(Error::invalid(
                    path,
                    "is not a qcow2 image (no QFI\\xfb magic) although its format is given as \
                     qcow2; check format= or the backing format recorded in the overlay",
                ));
            }
            let overlay = path.to_path_buf();
            // Errors are wrapped once, naming the top image; the inner
            // error names the file that failed.
            let mut open_backing =
                |name: &str, fmt: Option<Format>| -> Result<Option<Box<dyn DiskImage>>> {
                    // A backing file's format is what the overlay records,
                    // never guessed: without a record it is raw.
                    let Some(dirs) = backing_dirs else {
                        return Err(Error::invalid(
                            &overlay,
                            format!(
                                "its format was guessed, not given, and it names a backing file \
                                 ({name:?}); give format=qcow2 to use the backing file"
                            ),
                        ));
                    };
                    let opened = resolve_backing(&overlay, name, dirs).and_then(|p| {
                        open_layer(&p, true, fmt.unwrap_or(Format::Raw), Some(dirs), chain)
                    });
                    match opened {
                        Ok(image) => Ok(Some(image)),
                        Err(e) if is_backing => Err(e),
                        Err(e) => Err(Error::Backing {
                            path: DisplayPath(overlay.clone()),
                            name: name.to_string(),
                            source: Box::new(e),
                        }),
                    }
                };
            Ok(Box::new(Qcow2::open(host, read_only, &mut open_backing)?))
        }
    }
}

/// Creates a raw image of `size` bytes (sparse). Refuses to overwrite.
pub fn create_raw(path: &Path, size: u64) -> Result<()> {
    let file = FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, "creating", e))?;
    file.set_len(size)
        .map_err(|e| Error::io(path, format!("setting the size to {size} bytes"), e))?;
    file.sync_all().map_err(|e| Error::io(path, "fsync", e))
}

/// Checks that `len` bytes at `offset` lie within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds {
            path: path.into(),
            offset,
            len,
            size,
        }),
    }
}

/// The bytes the host file system has allocated for `path`.
pub(crate) fn host_allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_testkit::TempDir;

    fn open_err(path: &Path) -> String {
        match open_as(path, Format::Qcow2, OpenOptions::read_only()) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn format_is_probed_by_magic() {
        let dir = TempDir::new("probe");
        let q = dir.path().join("a.qcow2");
        create_qcow2(&q, 1 << 20, 65536, None).expect("create");
        let r = dir.path().join("a.img");
        create_raw(&r, 3).expect("create");
        assert_eq!(probe(&q).expect("probe"), Format::Qcow2);
        assert_eq!(probe(&r).expect("probe"), Format::Raw);
        assert_eq!(
            open_probed(&q, OpenOptions::read_only())
                .expect("open")
                .format(),
            Format::Qcow2
        );
        // Opened as raw on purpose, a qcow2 file is just bytes.
        let as_raw = open_as(&q, Format::Raw, OpenOptions::read_only()).expect("open");
        assert_eq!(as_raw.size(), std::fs::metadata(&q).expect("stat").len());
        let text = match open_as(&r, Format::Qcow2, OpenOptions::read_only()) {
            Ok(_) => panic!("raw opened as qcow2"),
            Err(e) => e.to_string(),
        };
        assert!(text.contains("is not a qcow2 image"), "{text}");
        // Creating never overwrites.
        assert!(create_qcow2(&q, 1 << 20, 65536, None).is_err());
        assert!(create_raw(&r, 1).is_err());
    }

    #[test]
    fn raw_images_are_bounds_checked_and_never_grow() {
        let dir = TempDir::new("raw");
        let r = dir.path().join("disk.raw");
        create_raw(&r, 8192).expect("create");
        let mut img = open_as(&r, Format::Raw, OpenOptions::writable()).expect("open");
        img.write_at(&[7; 100], 8000).expect("write");
        let text = img
            .write_at(&[7; 100], 8100)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            text.contains("past the end of the 8192-byte disk"),
            "{text}"
        );
        assert!(img.read_at(&mut [0; 1], 8192).is_err());
        assert!(img.write_zeroes(8000, 193).is_err());
        img.write_zeroes(8000, 50).expect("zeroes");
        img.discard(0, 4096).expect("discard");
        img.flush().expect("flush");
        let mut buf = vec![1u8; 8192];
        img.read_at(&mut buf, 0).expect("read");
        assert!(buf[..8050].iter().all(|&b| b == 0) && buf[8050..8100].iter().all(|&b| b == 7));
        drop(img);
        assert_eq!(std::fs::metadata(&r).expect("stat").len(), 8192);
        let mut ro = open_as(&r, Format::Raw, OpenOptions::read_only()).expect("open");
        assert!(ro.write_at(&[1], 0).is_err());
        assert!(ro.read_only());
    }

    #[test]
    fn backing_chains_loops_and_depth() {
        let dir = TempDir::new("chain");
        let p = |n: usize| dir.path().join(format!("l{n}.qcow2"));
        create_raw(&dir.path().join("base.raw"), 1 << 20).expect("create");
        create_qcow2(&p(0), 1 << 20, 65536, Some(("base.raw", Format::Raw))).expect("create");
        for n in 1..=MAX_BACKING_DEPTH {
            let below = format!("l{}.qcow2", n - 1);
            create_qcow2(&p(n), 1 << 20, 65536, Some((&below, Format::Qcow2))).expect("create");
        }
        // base.raw + l0..l15 = 17 files: the top has 16 below it.
        let chain = info(&p(MAX_BACKING_DEPTH - 1), Some(Format::Qcow2), &[])
            .expect("a chain at the limit opens");
        assert_eq!(chain.len(), MAX_BACKING_DEPTH + 1);
        assert_eq!(chain.last().map(|l| l.format), Some(Format::Raw));
        let text = open_err(&p(MAX_BACKING_DEPTH));
        assert!(text.contains("deeper than 16"), "{text}");
        assert!(
            text.starts_with(&format!(
                "{}: its backing file",
                p(MAX_BACKING_DEPTH).display()
            )),
            "{text}"
        );

        // a -> b -> a, and a -> a.
        create_qcow2(
            &dir.path().join("a.qcow2"),
            1 << 20,
            65536,
            Some(("b.qcow2", Format::Qcow2)),
        )
        .expect("create");
        create_qcow2(
            &dir.path().join("b.qcow2"),
            1 << 20,
            65536,
            Some(("a.qcow2", Format::Qcow2)),
        )
        .expect("create");
        create_qcow2(
            &dir.path().join("self.qcow2"),
            1 << 20,
            512,
            Some(("self.qcow2", Format::Qcow2)),
        )
        .expect("create");
        for name in ["a.qcow2", "self.qcow2"] {
            let text = open_err(&dir.path().join(name));
            assert!(text.contains("the backing chain loops"), "{text}");
        }
        // A missing backing file names the overlay and the name it stores.
        create_qcow2(
            &dir.path().join("orphan.qcow2"),
            1 << 20,
            65536,
            Some(("gone.raw", Format::Raw)),
        )
        .expect("create");
        let text = open_err(&dir.path().join("orphan.qcow2"));
        assert!(
            text.contains("orphan.qcow2: its backing file gone.raw: ")
                && text.contains("No such file"),
            "{text}"
        );
    }

    /// A raw disk whose guest wrote a qcow2 header naming a host file:
    /// the bytes of a qcow2 image (made by `create_qcow2`) with the given
    /// backing name, copied into `path`.
    fn hostile_raw_disk(dir: &TempDir, path: &Path, backing: &str) {
        let scratch = dir.path().join("scratch.qcow2");
        let _ = std::fs::remove_file(&scratch);
        create_qcow2(&scratch, 1 << 20, 65536, Some((backing, Format::Raw))).expect("create");
        let header = std::fs::read(&scratch).expect("read");
        std::fs::remove_file(&scratch).expect("remove");
        let mut disk = header;
        disk.resize(1 << 20, 0);
        std::fs::write(path, &disk).expect("write");
    }

    #[test]
    fn a_raw_disk_holding_a_qcow2_header_is_never_read_through() {
        let dir = TempDir::new("hostile");
        let outside = TempDir::new("hostile-outside");
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"host secret bytes").expect("write");
        let disk = dir.path().join("vda.raw");
        hostile_raw_disk(&dir, &disk, &secret.display().to_string());
        let on_disk = std::fs::read(&disk).expect("read");

        // format=raw: the guest sees its own bytes, the header included.
        let mut raw = open_as(&disk, Format::Raw, OpenOptions::writable()).expect("open as raw");
        assert_eq!(raw.format(), Format::Raw);
        assert_eq!(raw.size(), 1 << 20);
        let mut buf = vec![0u8; 4096];
        raw.read_at(&mut buf, 0).expect("read");
        assert_eq!(&buf[..], &on_disk[..4096]);
        drop(raw);

        // No format and writable: refused, saying what to give.
        let text = match open_probed(&disk, OpenOptions::writable()) {
            Ok(_) => panic!("a writable disk was opened with a guessed format"),
            Err(e) => e.to_string(),
        };
        assert!(
            text.contains("no format given for a writable image") && text.contains("never guesses"),
            "{text}"
        );
        // No format, read-only: the probe says qcow2, but a guessed image
        // may not use a backing file.
        let text = match open_probed(&disk, OpenOptions::read_only()) {
            Ok(_) => panic!("a probed qcow2 opened its backing file"),
            Err(e) => e.to_string(),
        };
        assert!(text.contains("give format=qcow2"), "{text}");
        // Even as qcow2 on purpose, the name outside the directory is refused.
        let text = match open_as(&disk, Format::Qcow2, OpenOptions::read_only()) {
            Ok(_) => panic!("a backing file outside the image's directory opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            text.contains("is refused") && text.contains("outside"),
            "{text}"
        );
        // ... unless that directory is one the caller allows.
        let allowed = [outside.path().to_path_buf()];
        let opts = OpenOptions {
            read_only: true,
            backing_dirs: &allowed,
        };
        let mut img = open_as(&disk, Format::Qcow2, opts).expect("allowed directory");
        let mut b = [0u8; 17];
        img.read_at(&mut b, 0).expect("read");
        assert_eq!(&b, b"host secret bytes");
    }

    #[test]
    fn backing_names_that_escape_are_refused() {
        let dir = TempDir::new("escape");
        let outside = TempDir::new("escape-outside");
        std::fs::write(outside.path().join("base.raw"), vec![0u8; 4096]).expect("write");
        std::os::unix::fs::symlink(outside.path().join("base.raw"), dir.path().join("link.raw"))
            .expect("symlink");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/inner.raw"), vec![0u8; 4096]).expect("write");
        let escape = format!(
            "../{}/base.raw",
            outside
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
        );
        let cases: [(&str, &str); 8] = [
            ("/etc/hostname", "outside"),
            ("/proc/self/environ", "under /proc, /sys or /dev"),
            ("/dev/null", "under /proc, /sys or /dev"),
            ("/sys/kernel/notes", "under /proc, /sys or /dev"),
            (&escape, "outside"),
            ("link.raw", "outside"),
            ("sub", "not a regular file"),
            ("", "No such file"),
        ];
        for (i, (name, why)) in cases.iter().enumerate() {
            let top = dir.path().join(format!("top{i}.qcow2"));
            if name.is_empty() {
                create_qcow2(&top, 1 << 20, 65536, Some(("gone", Format::Raw))).expect("create");
            } else {
                create_qcow2(&top, 1 << 20, 65536, Some((name, Format::Raw))).expect("create");
            }
            let text = open_err(&top);
            assert!(
                text.contains(why) && text.contains("its backing file"),
                "{name}: {text}"
            );
        }
        // A FIFO in the directory is not a backing file either.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("cstr");
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let top = dir.path().join("fifo.qcow2");
        create_qcow2(&top, 1 << 20, 65536, Some(("fifo", Format::Raw))).expect("create");
        let text = open_err(&top);
        assert!(text.contains("not a regular file"), "{text}");
        // `..` that stays inside, and a subdirectory, are fine.
        let top = dir.path().join("sub/ok.qcow2");
        create_qcow2(
            &top,
            1 << 20,
            65536,
            Some(("../sub/inner.raw", Format::Raw)),
        )
        .expect("create");
        let layers = info(&top, Some(Format::Qcow2), &[]).expect("inside the directory");
        assert_eq!(layers.len(), 2);
    }

    #[test]
    fn a_backing_file_without_a_recorded_format_is_raw() {
        let dir = TempDir::new("unrecorded");
        let base = dir.path().join("base.qcow2");
        create_qcow2(&base, 1 << 20, 65536, None).expect("create");
        let top = dir.path().join("top.qcow2");
        create_qcow2(&top, 1 << 20, 65536, Some(("base.qcow2", Format::Qcow2))).expect("create");
        // Drop the backing format extension by zeroing its type (the
        // header's extensions start after the fixed part).
        let mut bytes = std::fs::read(&top).expect("read");
        let ext = (0x68..bytes.len() - 4)
            .find(|&i| bytes[i..i + 4] == 0xE279_2ACAu32.to_be_bytes())
            .expect("a backing format extension");
        bytes[ext..ext + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        std::fs::write(&top, &bytes).expect("write");
        let layers = info(&top, Some(Format::Qcow2), &[]).expect("open");
        assert_eq!(layers[0].backing_format, None);
        assert_eq!(layers[1].format, Format::Raw, "never probed");
    }
}
