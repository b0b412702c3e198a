//! The "newc" cpio format (magic `070701`), the one the Linux kernel unpacks
//! as an initramfs: a writer for building one and a reader that lists one
//! back.
//!
//! Each entry is a 110-byte ASCII header (the magic, then 13 fields of 8 hex
//! digits), the NUL-terminated name padded so that header + name is a
//! multiple of 4 bytes, then the data padded to a multiple of 4. The archive
//! ends with an entry named `TRAILER!!!`.
//!
//! Names are stored without a leading `/` (`bin/busybox`), as the kernel and
//! GNU cpio expect; the writer strips one if given.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// The magic of a newc header (`070702` is the same layout with a checksum).
const MAGIC: &[u8; 6] = b"070701";
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

/// One entry listed back by [`read_newc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// The name as stored (no leading `/`).
    pub name: String,
    /// Full `st_mode`: file type bits and permissions.
    pub mode: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// The file type bits (`S_IFREG`, `S_IFDIR`, ...).
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }

    /// The permission bits (`0o755`, ...).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Why an archive could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("cpio archive is truncated at byte {offset}: {what} needs {needed} bytes, {available} left; the file is incomplete, rebuild it")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("no newc cpio header at byte {offset} (expected magic \"070701\"); this is not a newc archive or it is corrupt, rebuild it")]
    BadMagic { offset: usize },
    #[error("cpio header at byte {offset} has a malformed {field} field (not 8 hex digits); the archive is corrupt, rebuild it")]
    BadField { offset: usize, field: &'static str },
    #[error("cpio entry at byte {offset} has a malformed name ({problem}); the archive is corrupt, rebuild it")]
    BadName {
        offset: usize,
        problem: &'static str,
    },
    #[error("cpio archive ends at byte {offset} without the TRAILER!!! entry; the file is incomplete, rebuild it")]
    MissingTrailer { offset: usize },
}

/// Round `n` up to a multiple of 4, or `None` on overflow.
fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

/// Writes a newc archive entry by entry. Parent directories that were not
/// written explicitly are added (mode 0755) before their first child, since
/// the kernel does not create them while unpacking.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far (for padding).
    offset: usize,
    next_ino: u32,
    dirs: BTreeSet<String>,
    entries: usize,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
            entries: 0,
        }
    }

    /// Entries written so far (including implied parent directories).
    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let name = clean_name(name)?;
        if self.dirs.contains(&name) {
            return Ok(());
        }
        self.parents(&name)?;
        self.entry(&name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])?;
        self.dirs.insert(name);
        Ok(())
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let name = clean_name(name)?;
        self.parents(&name)?;
        self.entry(&name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let name = clean_name(name)?;
        self.parents(&name)?;
        self.entry(&name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let name = clean_name(name)?;
        self.parents(&name)?;
        self.entry(&name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Write the trailer and hand back the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw_entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, name: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(pos) = name[end..].find('/') {
            let parent = &name[..end + pos];
            if !self.dirs.contains(parent) {
                self.entry(parent, S_IFDIR | 0o755, 2, (0, 0), &[])?;
                self.dirs.insert(parent.to_string());
            }
            end += pos + 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entries += 1;
        self.raw_entry(name, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let too_big = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry {name} is larger than 4 GiB"),
            )
        };
        let filesize = u32::try_from(data.len()).map_err(|_| too_big())?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big())?;
        let fields = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime: fixed, so builds are reproducible
            filesize, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, namesize, 0, // check
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_padded(&header)?;
        self.write_padded(data)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len();
        let pad = (4 - self.offset % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.offset += pad;
        Ok(())
    }
}

/// Strip a leading `/` and reject names the kernel would mis-handle.
fn clean_name(name: &str) -> io::Result<String> {
    let trimmed = name.trim_start_matches('/').trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed == TRAILER
        || trimmed.contains('\0')
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid cpio entry name {name:?}"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Bounds-checked slice `bytes[start..start + len]`.
fn take<'a>(
    bytes: &'a [u8],
    start: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], CpioError> {
    let available = bytes.len().saturating_sub(start);
    let truncated = CpioError::Truncated {
        offset: start,
        what,
        needed: len,
        available,
    };
    let end = start.checked_add(len).ok_or(truncated.clone())?;
    bytes.get(start..end).ok_or(truncated)
}

fn hex_field(
    header: &[u8],
    index: usize,
    field: &'static str,
    offset: usize,
) -> Result<u32, CpioError> {
    let bad = CpioError::BadField { offset, field };
    let start = 6 + index * 8;
    let digits = header.get(start..start + 8).ok_or(bad.clone())?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad);
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad.clone())?;
    u32::from_str_radix(text, 16).map_err(|_| bad)
}

/// List the entries of a newc archive up to its trailer. Anything after the
/// trailer (padding, a second concatenated archive) is ignored. Never panics:
/// every length is checked against the input.
pub fn read_newc(bytes: &[u8]) -> Result<Vec<CpioEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        if pos >= bytes.len() {
            return Err(CpioError::MissingTrailer { offset: pos });
        }
        let header = take(bytes, pos, HEADER_LEN, "an entry header")?;
        if &header[..6] != MAGIC && &header[..6] != MAGIC_CRC {
            return Err(CpioError::BadMagic { offset: pos });
        }
        let mode = hex_field(header, 1, "mode", pos)?;
        let filesize = hex_field(header, 6, "filesize", pos)? as usize;
        let rdev_major = hex_field(header, 9, "rdevmajor", pos)?;
        let rdev_minor = hex_field(header, 10, "rdevminor", pos)?;
        let namesize = hex_field(header, 11, "namesize", pos)? as usize;
        // The other fields must be well-formed too, even if unused here.
        for (i, field) in [
            (0, "ino"),
            (2, "uid"),
            (3, "gid"),
            (4, "nlink"),
            (5, "mtime"),
            (7, "devmajor"),
            (8, "devminor"),
            (12, "check"),
        ] {
            hex_field(header, i, field, pos)?;
        }
        if namesize == 0 {
            return Err(CpioError::BadName {
                offset: pos,
                problem: "zero length",
            });
        }
        let name_start = pos + HEADER_LEN;
        let name_bytes = take(bytes, name_start, namesize, "an entry name")?;
        let (last, name_bytes) = name_bytes.split_last().ok_or(CpioError::BadName {
            offset: pos,
            problem: "zero length",
        })?;
        if *last != 0 || name_bytes.contains(&0) {
            return Err(CpioError::BadName {
                offset: pos,
                problem: "not NUL-terminated",
            });
        }
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| CpioError::BadName {
                offset: pos,
                problem: "not UTF-8",
            })?
            .to_string();
        let overflow = CpioError::Truncated {
            offset: pos,
            what: "an entry",
            needed: usize::MAX,
            available: bytes.len().saturating_sub(pos),
        };
        let data_start = name_start
            .checked_add(namesize)
            .and_then(align4)
            .ok_or(overflow.clone())?;
        if name == TRAILER {
            // The trailer's name is padded like any other.
            take(bytes, pos, data_start - pos, "the trailer")?;
            return Ok(entries);
        }
        let data = take(bytes, data_start, filesize, "entry data")?.to_vec();
        pos = data_start
            .checked_add(filesize)
            .and_then(align4)
            .ok_or(overflow)?;
        entries.push(CpioEntry {
            name,
            mode,
            rdev_major,
            rdev_minor,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.file("/bin/busybox", 0o755, b"\x7fELF fake busybox")
            .unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("/lib/modules/virtio.ko", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
        let entries = read_newc(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        // Parent directories are emitted before their children.
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/busybox",
                "bin/sh",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/virtio.ko"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("dev").file_type(), S_IFDIR);
        let console = get("dev/console");
        assert_eq!(
            (console.file_type(), console.rdev_major, console.rdev_minor),
            (S_IFCHR, 5, 1)
        );
        assert_eq!(get("bin/busybox").data, b"\x7fELF fake busybox");
        assert_eq!(get("bin/sh").file_type(), S_IFLNK);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("init").permissions(), 0o755);
        assert_eq!(get("init").file_type(), S_IFREG);
        assert!(get("lib/modules/virtio.ko").data.is_empty());
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        let header = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        // magic, ino 1, mode 0100644, uid, gid, nlink 1, mtime, filesize 3 ...
        let expected: String = [
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000003",
        ]
        .concat();
        assert!(header.starts_with(&expected), "{header}");
        // namesize 2 ("a\0") is field 11.
        assert_eq!(&header[6 + 11 * 8..6 + 12 * 8], "00000002");
        // 110 + 2 = 112 is aligned already; the data follows directly.
        assert_eq!(&bytes[112..115], b"xyz");
        assert_eq!(bytes[115], 0);
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a/../b", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let result = read_newc(&bytes[..len]);
            assert!(result.is_err(), "truncated to {len} bytes was accepted");
        }
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        let bytes = sample();
        // Flip each byte of the first few entries to a few nasty values.
        for i in 0..bytes.len().min(800) {
            for v in [0u8, b'f', b'g', 0xff, b'0'] {
                let mut copy = bytes.clone();
                copy[i] = v;
                let _ = read_newc(&copy);
            }
        }
    }

    #[test]
    fn corrupt_inputs_are_named() {
        let mut bytes = sample();
        bytes[0] = b'1';
        assert_eq!(read_newc(&bytes), Err(CpioError::BadMagic { offset: 0 }));

        let mut bytes = sample();
        bytes[6 + 6 * 8] = b'z'; // filesize
        assert!(matches!(
            read_newc(&bytes),
            Err(CpioError::BadField {
                field: "filesize",
                ..
            })
        ));

        // A huge filesize must be caught by the bounds check.
        let mut bytes = sample();
        bytes[6 + 6 * 8..6 + 7 * 8].copy_from_slice(b"ffffffff");
        assert!(matches!(
            read_newc(&bytes),
            Err(CpioError::Truncated { .. })
        ));

        // A huge namesize too.
        let mut bytes = sample();
        bytes[6 + 11 * 8..6 + 12 * 8].copy_from_slice(b"ffffffff");
        assert!(matches!(
            read_newc(&bytes),
            Err(CpioError::Truncated { .. })
        ));

        // Name not NUL-terminated: "dev\0" -> "devX".
        let mut bytes = sample();
        bytes[HEADER_LEN + 3] = b'X';
        assert!(matches!(read_newc(&bytes), Err(CpioError::BadName { .. })));

        assert_eq!(read_newc(&[]), Err(CpioError::MissingTrailer { offset: 0 }));

        // An archive cut exactly after an entry has no trailer.
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let full = w.finish().unwrap();
        assert_eq!(
            read_newc(&full[..116]),
            Err(CpioError::MissingTrailer { offset: 116 })
        );
    }

    #[test]
    fn trailing_data_after_trailer_is_ignored() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0u8; 512]);
        assert_eq!(read_newc(&bytes).unwrap().len(), 9);
    }
}
