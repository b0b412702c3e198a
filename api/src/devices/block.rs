//! `--disk` / the API's `disks[i]`: a disk image and how the guest sees it,
//! and the image formats every layer names (`vireo-block` opens them).

use std::fmt;
use std::path::PathBuf;

use super::rate::parse_rate;
use crate::options::{Options, OptionsError};

/// The serial number's length on the wire (virtio-blk's
/// `VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_BYTES: usize = 20;

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

/// A disk's options, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes (and open the file read-only).
    pub read_only: bool,
    /// The name in log lines; defaults to the file stem.
    pub id: String,
    /// The serial number the guest reads (GET_ID), at most
    /// [`SERIAL_BYTES`]; defaults to the id (cut to fit).
    pub serial: String,
    /// The image format. `None` is accepted only for a read-only disk
    /// (its format is then detected); a writable disk without one is
    /// refused when opened, since a guest could write a qcow2 header onto a
    /// raw disk and have it read as qcow2 after its next boot.
    pub format: Option<Format>,
    /// Bandwidth limit in bytes per second.
    pub bandwidth: Option<u64>,
    /// Request limit per second.
    pub ops: Option<u64>,
}

impl BlockConfig {
    /// Parse `path=disk.qcow2[,readonly=on][,id=root][,serial=ABC]
    /// [,format=raw|qcow2][,bw=10M][,ops=1000]`; a bare first word is the
    /// path.
    pub fn from_options(s: &str) -> Result<BlockConfig, OptionsError> {
        let mut o = Options::parse("disk", s, Some("path"))?;
        let path = o.required("path")?;
        let err = |message: String| OptionsError::new("disk", message);
        if path.is_empty() {
            return Err(err("path= is empty; give the disk image file".into()));
        }
        let path = PathBuf::from(path);
        let read_only = o.bool("readonly")?.unwrap_or(false);
        let id = match o.string("id") {
            Some(id) if id.is_empty() => return Err(err("id= is empty".into())),
            Some(id) => id,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "disk".into()),
        };
        let serial = match o.string("serial") {
            Some(s) if s.len() > SERIAL_BYTES => {
                return Err(err(format!(
                    "serial={s}: {} bytes, at most {SERIAL_BYTES} fit (virtio-blk's limit)",
                    s.len()
                )))
            }
            Some(s) => s,
            None => {
                let mut end = id.len().min(SERIAL_BYTES);
                while !id.is_char_boundary(end) {
                    end -= 1;
                }
                id[..end].to_string()
            }
        };
        let format = o.with("format", |v| {
            Format::from_name(v).ok_or("unknown format; use raw or qcow2")
        })?;
        let bandwidth = o.with("bw", parse_rate)?;
        let ops = o.with("ops", parse_rate)?;
        o.finish()?;
        Ok(BlockConfig {
            path,
            read_only,
            id,
            serial,
            format,
            bandwidth,
            ops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_with_defaults_and_refuse_mistakes() {
        let c = BlockConfig::from_options(
            "path=/img/root.qcow2,readonly=on,id=root,serial=ABC,format=qcow2,bw=10M,ops=1000",
        )
        .unwrap();
        assert_eq!(
            c,
            BlockConfig {
                path: "/img/root.qcow2".into(),
                read_only: true,
                id: "root".into(),
                serial: "ABC".into(),
                format: Some(Format::Qcow2),
                bandwidth: Some(10 << 20),
                ops: Some(1000),
            }
        );
        let c = BlockConfig::from_options("/img/a-very-long-disk-name-indeed.img").unwrap();
        assert_eq!(
            c.path,
            PathBuf::from("/img/a-very-long-disk-name-indeed.img")
        );
        assert_eq!(c.id, "a-very-long-disk-name-indeed");
        assert_eq!(c.serial, "a-very-long-disk-nam");
        assert!(!c.read_only);
        assert_eq!((c.format, c.bandwidth, c.ops), (None, None, None));

        for (bad, says) in [
            ("path=a.img,serial=123456789012345678901", "at most 20"),
            ("path=a.img,format=vmdk", "raw or qcow2"),
            ("path=a.img,raedonly=on", "raedonly"),
            ("path=a.img,bw=fast", "bw=fast"),
            ("readonly=on", "path= is required"),
            ("path=", "path= is empty"),
        ] {
            let e = BlockConfig::from_options(bad).unwrap_err();
            assert!(e.device == "disk" && e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn format_names() {
        for f in [Format::Raw, Format::Qcow2] {
            assert_eq!(Format::from_name(f.name()), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
        assert_eq!(Format::from_name("vmdk"), None);
    }
}
