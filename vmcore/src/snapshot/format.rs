//! The on-disk snapshot format: a state file of typed, checksummed sections
//! and a raw memory file.
//!
//! State file (`state.vsnap`), all integers little endian:
//!
//! ```text
//! header   magic "VIREOSNP" | format version u32 | flags u32 |
//!          vireo version (32 bytes, NUL padded) | section count u32 |
//!          CRC-32 of the header bytes before it u32
//! section  name length u16 | name (UTF-8) | payload length u64 |
//!          CRC-32 of the payload u32 | payload        (repeated)
//! trailer  magic "VSNPEND\0" | CRC-32 of every byte before it u32
//! ```
//!
//! Memory file (`memory.raw`): each guest RAM region's raw bytes at a
//! page-aligned offset, so a restore can map it MAP_PRIVATE straight into
//! the guest. The offsets, sizes and per-region CRC-32s live in the state
//! file's `memory` section.
//!
//! Why CRC-32 (crc32fast): the checksums are there to catch accidents —
//! a truncated copy, a flipped bit on disk, a file from somewhere else —
//! before any guest state is built from them. CRC-32 catches all burst
//! errors up to 32 bits and runs at several GB/s with the CPU's carry-less
//! multiply, so checking a 1 GiB memory file costs a fraction of a second;
//! crc32fast is already in the build (flate2 uses it). It is not a defence
//! against deliberate tampering: whoever can write a snapshot can run code
//! in its guest anyway; a signature would be the tool for that.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"VIREOSNP";
pub const TRAILER_MAGIC: &[u8; 8] = b"VSNPEND\0";
/// Bumped on every incompatible change; other versions are refused.
/// Version 2: each device's state carries its own version
/// ([`super::device::SavedState`]).
pub const FORMAT_VERSION: u32 = 2;
/// The snapshot is a diff: its memory file holds only the pages written
/// since its parent (sections `parent` and `memory_pages`). A vireo that
/// does not know the flag refuses the file rather than restoring a diff
/// as if it were whole.
pub const FLAG_DIFF: u32 = 1;
/// A file with other flags is refused.
pub const KNOWN_FLAGS: u32 = FLAG_DIFF;
pub const STATE_FILE: &str = "state.vsnap";
pub const MEMORY_FILE: &str = "memory.raw";
pub const PAGE_SIZE: u64 = 4096;

const VERSION_FIELD: usize = 32;
const HEADER_LEN: usize = 8 + 4 + 4 + VERSION_FIELD + 4 + 4;
const TRAILER_LEN: usize = 8 + 4;
/// No section name is longer; a bigger length means a corrupt file.
const MAX_NAME: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a vireo snapshot (bad magic number)")]
    BadMagic,
    #[error("snapshot format version {found}, but this vireo reads only version {FORMAT_VERSION} (it was written by vireo {writer}); restore it with that vireo")]
    WrongVersion { found: u32, writer: String },
    #[error("snapshot uses flags {0:#x} this vireo does not know")]
    UnknownFlags(u32),
    #[error("snapshot is truncated ({0}): copy it again")]
    Truncated(String),
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot has no section {0:?}")]
    MissingSection(String),
    #[error("snapshot section {name:?} cannot be decoded: {reason}")]
    BadSection { name: String, reason: String },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The sections of a state file, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateFile {
    pub flags: u32,
    /// The vireo version that wrote the file (informational).
    pub vireo_version: String,
    sections: Vec<(String, Vec<u8>)>,
}

impl StateFile {
    pub fn new() -> StateFile {
        StateFile {
            flags: 0,
            vireo_version: env!("CARGO_PKG_VERSION").to_string(),
            sections: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &str, payload: Vec<u8>) {
        self.sections.push((name.to_string(), payload));
    }

    /// Add a section holding `value` as JSON (readable with `jq` when
    /// something needs explaining; the big data is in the memory file).
    pub fn add_json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), FormatError> {
        let bytes = serde_json::to_vec(value).map_err(|e| FormatError::BadSection {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        self.add(name, bytes);
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|(n, _)| n.as_str())
    }

    pub fn get(&self, name: &str) -> Result<&[u8], FormatError> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_slice())
            .ok_or_else(|| FormatError::MissingSection(name.to_string()))
    }

    pub fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, FormatError> {
        serde_json::from_slice(self.get(name)?).map_err(|e| FormatError::BadSection {
            name: name.to_string(),
            reason: e.to_string(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        let mut version = [0u8; VERSION_FIELD];
        let v = self.vireo_version.as_bytes();
        let n = v.len().min(VERSION_FIELD);
        version[..n].copy_from_slice(&v[..n]);
        out.extend_from_slice(&version);
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        for (name, payload) in &self.sections {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            out.extend_from_slice(payload);
        }
        out.extend_from_slice(TRAILER_MAGIC);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse and check a whole state file: magic, version, flags, header
    /// checksum, every section's length and checksum, and the whole-file
    /// checksum. Nothing is returned unless everything matches.
    pub fn decode(bytes: &[u8]) -> Result<StateFile, FormatError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
                FormatError::Truncated(format!("{} bytes", bytes.len()))
            } else {
                FormatError::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Truncated(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        let mut r = Reader { bytes, pos: 8 };
        let version = r.u32()?;
        let flags = r.u32()?;
        let writer = r.take(VERSION_FIELD)?;
        let writer = String::from_utf8_lossy(writer)
            .trim_end_matches('\0')
            .to_string();
        let count = r.u32()?;
        let header_crc = r.u32()?;
        if crc32fast::hash(&bytes[..HEADER_LEN - 4]) != header_crc {
            return Err(FormatError::Corrupt("header checksum mismatch".into()));
        }
        // The version is checked after the header checksum, so that a
        // flipped bit is called corruption, not a version mismatch.
        if version != FORMAT_VERSION {
            return Err(FormatError::WrongVersion {
                found: version,
                writer,
            });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags(flags));
        }
        // The trailer covers everything: check it before parsing sections,
        // so a truncated file is reported as such.
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(FormatError::Truncated("no trailer".into()));
        }
        let trailer_at = bytes.len() - TRAILER_LEN;
        let file_crc_ok = {
            let stored = u32::from_le_bytes([
                bytes[bytes.len() - 4],
                bytes[bytes.len() - 3],
                bytes[bytes.len() - 2],
                bytes[bytes.len() - 1],
            ]);
            crc32fast::hash(&bytes[..bytes.len() - 4]) == stored
        };
        let trailer_ok = &bytes[trailer_at..trailer_at + 8] == TRAILER_MAGIC;
        if !trailer_ok {
            return Err(FormatError::Truncated(
                "the end-of-file marker is missing".into(),
            ));
        }
        let mut sections = Vec::with_capacity(count.min(1024) as usize);
        let body = &bytes[..trailer_at];
        let mut r = Reader {
            bytes: body,
            pos: HEADER_LEN,
        };
        for i in 0..count {
            let name_len = usize::from(r.u16()?);
            if name_len > MAX_NAME {
                return Err(FormatError::Corrupt(format!(
                    "section {i} has a {name_len}-byte name"
                )));
            }
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| FormatError::Corrupt(format!("section {i} name is not UTF-8")))?
                .to_string();
            let len = r.u64()?;
            let crc = r.u32()?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= body.len())
                .ok_or_else(|| {
                    FormatError::Corrupt(format!("section {name:?} claims {len} bytes"))
                })?;
            let payload = r.take(len)?;
            if crc32fast::hash(payload) != crc {
                return Err(FormatError::Corrupt(format!(
                    "section {name:?} checksum mismatch"
                )));
            }
            sections.push((name, payload.to_vec()));
        }
        if r.pos != body.len() {
            return Err(FormatError::Corrupt(format!(
                "{} stray bytes after the last section",
                body.len() - r.pos
            )));
        }
        if !file_crc_ok {
            return Err(FormatError::Corrupt("whole-file checksum mismatch".into()));
        }
        Ok(StateFile {
            flags,
            vireo_version: writer,
            sections,
        })
    }

    /// Write to `path` through a temporary file and a rename, so a crash
    /// midway never leaves a half-written state file under the real name.
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&self.encode()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }

    pub fn read(path: &Path) -> Result<StateFile, FormatError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        StateFile::decode(&bytes)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                FormatError::Truncated(format!(
                    "wanted {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Where one guest RAM region sits in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionRecord {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
    pub crc32: u32,
}

/// Write guest RAM regions `(guest address, bytes)` to `path`, each at a
/// page-aligned offset; `progress(done, total)` is called every 64 MiB.
pub fn write_memory(
    path: &Path,
    regions: &[(u64, &[u8])],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<MemoryRegionRecord>, FormatError> {
    const CHUNK: usize = 64 << 20;
    let total: u64 = regions.iter().map(|(_, b)| b.len() as u64).sum();
    let mut f = File::create(path).map_err(io_err(path))?;
    let mut records = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    let mut done = 0u64;
    for (guest_addr, bytes) in regions {
        f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
        let mut hasher = crc32fast::Hasher::new();
        for chunk in bytes.chunks(CHUNK) {
            hasher.update(chunk);
            f.write_all(chunk).map_err(io_err(path))?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        let size = bytes.len() as u64;
        records.push(MemoryRegionRecord {
            guest_addr: *guest_addr,
            size,
            file_offset: offset,
            crc32: hasher.finalize(),
        });
        offset = (offset + size).next_multiple_of(PAGE_SIZE);
    }
    f.set_len(offset).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(records)
}

/// Runs of set bits of a page bitmap: (first page, count).
pub fn bitmap_runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let b = rest.trailing_zeros() as u64;
            rest &= rest - 1;
            let page = w as u64 * 64 + b;
            if page >= pages {
                break;
            }
            match runs.last_mut() {
                Some((start, n)) if *start + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

/// Write only the pages in `runs[region]` of each region `(guest address,
/// bytes)`, at the same offsets as [`write_memory`] (the rest of the file
/// is a hole); each record's CRC-32 covers the written pages in order.
pub fn write_memory_pages(
    path: &Path,
    regions: &[(u64, &[u8])],
    runs: &[Vec<(u64, u64)>],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<MemoryRegionRecord>, FormatError> {
    use std::os::unix::fs::FileExt;
    let total: u64 = runs.iter().flatten().map(|(_, n)| n * PAGE_SIZE).sum();
    let f = File::create(path).map_err(io_err(path))?;
    let mut records = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    let mut done = 0u64;
    for ((guest_addr, bytes), runs) in regions.iter().zip(runs) {
        let mut hasher = crc32fast::Hasher::new();
        for &(start, n) in runs {
            let from = (start * PAGE_SIZE) as usize;
            let to = from + (n * PAGE_SIZE) as usize;
            let chunk = bytes.get(from..to).ok_or_else(|| {
                FormatError::Corrupt(format!("dirty pages {start}+{n} outside the region"))
            })?;
            hasher.update(chunk);
            f.write_all_at(chunk, offset + from as u64)
                .map_err(io_err(path))?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        let size = bytes.len() as u64;
        records.push(MemoryRegionRecord {
            guest_addr: *guest_addr,
            size,
            file_offset: offset,
            crc32: hasher.finalize(),
        });
        offset = (offset + size).next_multiple_of(PAGE_SIZE);
    }
    f.set_len(offset).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(records)
}

/// Read the pages in `runs[region]` of a diff's memory file into
/// `dests[region]` and check each region's checksum.
pub fn read_memory_pages(
    path: &Path,
    records: &[MemoryRegionRecord],
    runs: &[Vec<(u64, u64)>],
    dests: &mut [&mut [u8]],
) -> Result<(), FormatError> {
    use std::os::unix::fs::FileExt;
    check_memory_layout(path, records)?;
    if dests.len() != records.len() || runs.len() != records.len() {
        return Err(FormatError::Corrupt(format!(
            "{} memory regions recorded, {} page lists, the VM has {}",
            records.len(),
            runs.len(),
            dests.len()
        )));
    }
    let f = File::open(path).map_err(io_err(path))?;
    for ((r, runs), buf) in records.iter().zip(runs).zip(dests.iter_mut()) {
        let mut hasher = crc32fast::Hasher::new();
        for &(start, n) in runs {
            let from = start.checked_mul(PAGE_SIZE);
            let len = n.checked_mul(PAGE_SIZE);
            let (Some(from), Some(len)) = (from, len) else {
                return Err(FormatError::Corrupt(format!(
                    "page run {start}+{n} overflows"
                )));
            };
            if from
                .checked_add(len)
                .is_none_or(|end| end > r.size || end > buf.len() as u64)
            {
                return Err(FormatError::Corrupt(format!(
                    "page run {start}+{n} lies outside the region at {:#x}",
                    r.guest_addr
                )));
            }
            let chunk = &mut buf[from as usize..(from + len) as usize];
            f.read_exact_at(chunk, r.file_offset + from)
                .map_err(io_err(path))?;
            hasher.update(chunk);
        }
        if hasher.finalize() != r.crc32 {
            return Err(FormatError::Corrupt(format!(
                "memory region at guest {:#x} checksum mismatch in {}",
                r.guest_addr,
                path.display()
            )));
        }
    }
    Ok(())
}

/// Check that the memory file holds every region in full, at page-aligned
/// offsets (what a MAP_PRIVATE restore needs).
pub fn check_memory_layout(path: &Path, records: &[MemoryRegionRecord]) -> Result<(), FormatError> {
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    for r in records {
        if r.file_offset % PAGE_SIZE != 0
            || r.size % PAGE_SIZE != 0
            || r.guest_addr % PAGE_SIZE != 0
        {
            return Err(FormatError::Corrupt(format!(
                "memory region at {:#x} is not page aligned",
                r.guest_addr
            )));
        }
        let end = r.file_offset.checked_add(r.size).ok_or_else(|| {
            FormatError::Corrupt(format!("memory region at {:#x} overflows", r.guest_addr))
        })?;
        if end > len {
            return Err(FormatError::Truncated(format!(
                "{} has {len} bytes, the region at guest {:#x} needs {end}",
                path.display(),
                r.guest_addr
            )));
        }
    }
    Ok(())
}

/// Read each region of the memory file into `dests[region index]` and
/// check its checksum; `progress(done, total)` every 64 MiB.
pub fn read_memory(
    path: &Path,
    records: &[MemoryRegionRecord],
    dests: &mut [&mut [u8]],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), FormatError> {
    const CHUNK: usize = 64 << 20;
    check_memory_layout(path, records)?;
    let total: u64 = records.iter().map(|r| r.size).sum();
    let mut done = 0;
    let mut f = File::open(path).map_err(io_err(path))?;
    if dests.len() != records.len() {
        return Err(FormatError::Corrupt(format!(
            "{} memory regions recorded, the VM has {}",
            records.len(),
            dests.len()
        )));
    }
    for (r, buf) in records.iter().zip(dests.iter_mut()) {
        if buf.len() as u64 != r.size {
            return Err(FormatError::Corrupt(format!(
                "memory region at {:#x}: {} bytes recorded, the VM has {}",
                r.guest_addr,
                r.size,
                buf.len()
            )));
        }
        f.seek(SeekFrom::Start(r.file_offset))
            .map_err(io_err(path))?;
        let mut hasher = crc32fast::Hasher::new();
        for chunk in buf.chunks_mut(CHUNK) {
            f.read_exact(chunk).map_err(io_err(path))?;
            hasher.update(chunk);
            done += chunk.len() as u64;
            progress(done, total);
        }
        if hasher.finalize() != r.crc32 {
            return Err(FormatError::Corrupt(format!(
                "memory region at guest {:#x} checksum mismatch",
                r.guest_addr
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut s = StateFile::new();
        s.add("config", b"{\"vcpus\":1}".to_vec());
        s.add("vcpu/0", vec![7u8; 300]);
        s.add_json("empty", &Vec::<u32>::new()).unwrap();
        s.encode()
    }

    #[test]
    fn roundtrip() {
        let bytes = sample();
        let s = StateFile::decode(&bytes).unwrap();
        assert_eq!(s.names().collect::<Vec<_>>(), ["config", "vcpu/0", "empty"]);
        assert_eq!(s.get("vcpu/0").unwrap(), &[7u8; 300][..]);
        assert_eq!(s.json::<Vec<u32>>("empty").unwrap(), Vec::<u32>::new());
        assert_eq!(s.vireo_version, env!("CARGO_PKG_VERSION"));
        assert!(matches!(s.get("nope"), Err(FormatError::MissingSection(_))));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let r = StateFile::decode(&b);
                assert!(
                    r.is_err(),
                    "flipping bit {bit:#x} of byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let r = StateFile::decode(&bytes[..len]);
            assert!(r.is_err(), "a file cut to {len} bytes was accepted");
        }
        // Cut inside the sections: called truncated (or corrupt), never
        // a bad magic.
        let e = StateFile::decode(&bytes[..bytes.len() - 20]).unwrap_err();
        assert!(
            matches!(e, FormatError::Truncated(_) | FormatError::Corrupt(_)),
            "{e}"
        );
        assert!(matches!(
            StateFile::decode(&bytes[..4]).unwrap_err(),
            FormatError::Truncated(_)
        ));
    }

    /// `bytes` as a writer of format `version` makes it (its own header
    /// checksum).
    fn as_version(mut bytes: Vec<u8>, version: u32) -> Vec<u8> {
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..HEADER_LEN - 4]);
        bytes[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let bytes = as_version(sample(), FORMAT_VERSION + 1);
        let e = StateFile::decode(&bytes).unwrap_err();
        assert!(
            matches!(e, FormatError::WrongVersion { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(e.to_string().contains("version"), "{e}");
    }

    /// Version 1 files hold untyped device states: refused, by number.
    #[test]
    fn a_version_1_file_is_refused_by_name() {
        let e = StateFile::decode(&as_version(sample(), 1)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("snapshot format version 1, but this vireo reads only version 2"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_not_a_snapshot() {
        assert!(matches!(
            StateFile::decode(b"#!/bin/sh\necho hello\n").unwrap_err(),
            FormatError::BadMagic
        ));
    }

    #[test]
    fn memory_file_roundtrip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("vireo-snapfmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(MEMORY_FILE);
        let a: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let b = vec![0x5au8; 4096];
        let mut calls = 0;
        let recs = write_memory(&path, &[(0, &a), (1 << 32, &b)], &mut |_, _| calls += 1).unwrap();
        assert!(calls >= 2);
        assert_eq!(recs[1].file_offset, 8192);
        let (mut x, mut y) = (vec![0u8; 8192], vec![0u8; 4096]);
        read_memory(&path, &recs, &mut [&mut x[..], &mut y[..]], &mut |_, _| {}).unwrap();
        assert_eq!(x, a);
        assert_eq!(y, b);

        // One flipped byte in the memory file.
        let mut raw = std::fs::read(&path).unwrap();
        raw[5000] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let e =
            read_memory(&path, &recs, &mut [&mut x[..], &mut y[..]], &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, FormatError::Corrupt(_)), "{e}");

        // Truncated.
        std::fs::write(&path, &raw[..10000]).unwrap();
        let e = check_memory_layout(&path, &recs).unwrap_err();
        assert!(matches!(e, FormatError::Truncated(_)), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
