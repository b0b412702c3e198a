//! Disk image formats for vireo: raw and qcow2.
//!
//! This crate never depends on the VM core, the devices or the front ends:
//! a block device (virtio-blk) speaks virtio to the guest and a
//! [`DiskImage`] to this crate; the image speaks its format to the host file.
//!
//! ```no_run
//! use vireo_block::{open, OpenOptions};
//! let mut disk = open("disk.qcow2".as_ref(), OpenOptions { read_only: false })?;
//! let mut sector = [0u8; 512];
//! disk.read_at(&mut sector, 0)?;
//! disk.write_at(&sector, 4096)?;
//! disk.flush()?;
//! # Ok::<(), vireo_block::Error>(())
//! ```
//!
//! [`open`] detects the format by its magic number (qcow2 starts with
//! `QFI\xfb`; anything else is raw) and opens backing files read-only,
//! recursively, up to [`MAX_BACKING_DEPTH`] deep, refusing loops.

mod error;
mod file;
pub mod qcow2;
mod raw;

use std::fmt;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

pub use error::{DisplayPath, Error, Result};
pub use qcow2::{create_qcow2, Qcow2};
pub use raw::Raw;

use file::{DiskFile, HostFile};

/// How deep a chain of backing files may be (the image itself not counted).
pub const MAX_BACKING_DEPTH: usize = 16;

/// The image formats vireo reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk, byte for byte.
    Raw,
    /// QEMU copy-on-write version 2 or 3.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a format name as qemu-img spells it.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse writes; the file is opened read-only.
    pub read_only: bool,
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

/// Opens an image, detecting its format by magic number; backing files are
/// opened read-only.
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn DiskImage>> {
    let mut chain = Vec::new();
    open_layer(path, options.read_only, None, &mut chain)
}

/// Opens an image with a known format (no probing): `Format::Raw` opens
/// even a file that starts with the qcow2 magic as raw.
pub fn open_as(path: &Path, format: Format, options: OpenOptions) -> Result<Box<dyn DiskImage>> {
    let mut chain = Vec::new();
    open_layer(path, options.read_only, Some(format), &mut chain)
}

/// Describes an image and its whole backing chain, top first.
pub fn info(path: &Path) -> Result<Vec<LayerInfo>> {
    let mut image = open(path, OpenOptions { read_only: true })?;
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

fn open_layer(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskImage>> {
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
    let file = FsOpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| {
            let op = if read_only {
                "opening"
            } else {
                "opening for writing"
            };
            Error::io(path, op, e)
        })?;
    let host: Box<dyn HostFile> = Box::new(DiskFile::new(file, path));
    let detected = probe_host(host.as_ref())?;
    let format =
        match (format, detected) {
            (Some(Format::Qcow2), Format::Raw) => return Err(Error::invalid(
                path,
                "is not a qcow2 image (no QFI\\xfb magic) although its format is given as qcow2; \
                 check the backing format recorded in the overlay",
            )),
            (Some(f), _) => f,
            (None, f) => f,
        };
    match format {
        Format::Raw => Ok(Box::new(Raw::open(host, read_only)?)),
        Format::Qcow2 => {
            let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let overlay = path.to_path_buf();
            // Errors are wrapped once, naming the top image; the inner
            // error names the file that failed.
            let is_top = chain.len() == 1;
            let mut open_backing =
                |name: &str, fmt: Option<Format>| -> Result<Option<Box<dyn DiskImage>>> {
                    let backing_path = base_dir.join(name);
                    match open_layer(&backing_path, true, fmt, chain) {
                        Ok(image) => Ok(Some(image)),
                        Err(e) if !is_top => Err(e),
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

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("vireo-block-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating the test directory");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open_err(path: &Path) -> String {
        match open(path, OpenOptions { read_only: true }) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn format_is_probed_by_magic() {
        let dir = TempDir::new("probe");
        let q = dir.0.join("a.qcow2");
        create_qcow2(&q, 1 << 20, 65536, None).expect("create");
        let r = dir.0.join("a.img");
        create_raw(&r, 3).expect("create");
        assert_eq!(probe(&q).expect("probe"), Format::Qcow2);
        assert_eq!(probe(&r).expect("probe"), Format::Raw);
        assert_eq!(
            open(&q, OpenOptions::default()).expect("open").format(),
            Format::Qcow2
        );
        // Opened as raw on purpose, a qcow2 file is just bytes.
        let as_raw = open_as(&q, Format::Raw, OpenOptions { read_only: true }).expect("open");
        assert_eq!(as_raw.size(), std::fs::metadata(&q).expect("stat").len());
        let text = match open_as(&r, Format::Qcow2, OpenOptions { read_only: true }) {
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
        let r = dir.0.join("disk.raw");
        create_raw(&r, 8192).expect("create");
        let mut img = open(&r, OpenOptions::default()).expect("open");
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
        let mut ro = open(&r, OpenOptions { read_only: true }).expect("open");
        assert!(ro.write_at(&[1], 0).is_err());
        assert!(ro.read_only());
    }

    #[test]
    fn backing_chains_loops_and_depth() {
        let dir = TempDir::new("chain");
        let p = |n: usize| dir.0.join(format!("l{n}.qcow2"));
        create_raw(&dir.0.join("base.raw"), 1 << 20).expect("create");
        create_qcow2(&p(0), 1 << 20, 65536, Some(("base.raw", Format::Raw))).expect("create");
        for n in 1..=MAX_BACKING_DEPTH {
            let below = format!("l{}.qcow2", n - 1);
            create_qcow2(&p(n), 1 << 20, 65536, Some((&below, Format::Qcow2))).expect("create");
        }
        // base.raw + l0..l15 = 17 files: the top has 16 below it.
        let chain = info(&p(MAX_BACKING_DEPTH - 1)).expect("a chain at the limit opens");
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
            &dir.0.join("a.qcow2"),
            1 << 20,
            65536,
            Some(("b.qcow2", Format::Qcow2)),
        )
        .expect("create");
        create_qcow2(
            &dir.0.join("b.qcow2"),
            1 << 20,
            65536,
            Some(("a.qcow2", Format::Qcow2)),
        )
        .expect("create");
        create_qcow2(
            &dir.0.join("self.qcow2"),
            1 << 20,
            512,
            Some(("self.qcow2", Format::Qcow2)),
        )
        .expect("create");
        for name in ["a.qcow2", "self.qcow2"] {
            let text = open_err(&dir.0.join(name));
            assert!(text.contains("the backing chain loops"), "{text}");
        }
        // A missing backing file names the overlay and the name it stores.
        create_qcow2(
            &dir.0.join("orphan.qcow2"),
            1 << 20,
            65536,
            Some(("gone.raw", Format::Raw)),
        )
        .expect("create");
        let text = open_err(&dir.0.join("orphan.qcow2"));
        assert!(
            text.contains("orphan.qcow2: its backing file gone.raw: ")
                && text.contains("No such file"),
            "{text}"
        );
    }
}
