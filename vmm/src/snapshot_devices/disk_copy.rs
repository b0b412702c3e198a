//! The copies of its writable disks a snapshot holds
//! (`DIR/disks/<id>.<format>`): made by reflink where the filesystem
//! shares blocks, else sparse; and the copy that rolls a disk back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_api::devices::block::Format;

use super::record::absolute;

/// Where a snapshot keeps its disk copies.
pub const DISKS_DIR: &str = "disks";

/// A writable disk of the running machine (read-only disks are not
/// copied: the snapshot refers to them where they are).
#[derive(Debug, Clone)]
pub struct DiskFile {
    pub id: String,
    pub path: PathBuf,
    pub format: Format,
}

/// A disk copy in a snapshot (also the `disks` entries of the `snapshot`
/// reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    pub id: String,
    /// The copy's path (absolute at snapshot time).
    pub path: PathBuf,
    /// The copy's name inside the snapshot directory (`disks/<id>.<fmt>`),
    /// what a restore uses (the directory may have moved).
    pub file: String,
    pub format: String,
    /// The copy's length in bytes.
    pub bytes: u64,
}

/// Why a snapshot's disk copies could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CopyDisksError {
    #[error("{}: {source}", .path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Copies are named by disk id.
    #[error("two disks have the id {0}; each disk needs its own id to snapshot this VM")]
    DuplicateId(String),
    #[error("disk id {0:?} cannot name a file; a disk in a snapshot needs an id without '/' that does not start with '.'")]
    IdNotAFileName(String),
    #[error("disk {id}: copying {} to {}: {source}", .from.display(), .to.display())]
    Copy {
        id: String,
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Copy each writable disk into `dir/disks/<id>.<format>` (reflink when
/// the filesystem can, else a sparse copy). The devices must be quiesced
/// (their images flushed) and the vCPUs paused.
pub fn copy_disks(dir: &Path, disks: &[DiskFile]) -> Result<Vec<DiskCopy>, CopyDisksError> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let target = dir.join(DISKS_DIR);
    std::fs::create_dir_all(&target).map_err(|source| CopyDisksError::Dir {
        path: target.clone(),
        source,
    })?;
    let mut copies: Vec<DiskCopy> = Vec::with_capacity(disks.len());
    for d in disks {
        if copies.iter().any(|c| c.id == d.id) {
            return Err(CopyDisksError::DuplicateId(d.id.clone()));
        }
        if d.id.contains('/') || d.id.starts_with('.') {
            return Err(CopyDisksError::IdNotAFileName(d.id.clone()));
        }
        let file = format!("{DISKS_DIR}/{}.{}", d.id, d.format.name());
        let dst = dir.join(&file);
        let started = std::time::Instant::now();
        let (bytes, how) =
            copy_file(&d.path, &dst, false).map_err(|source| CopyDisksError::Copy {
                id: d.id.clone(),
                from: d.path.clone(),
                to: dst.clone(),
                source,
            })?;
        tracing::info!(
            "snapshot: disk {} ({}) copied to {} ({how}, {} MiB, {} ms)",
            d.id,
            d.path.display(),
            dst.display(),
            bytes >> 20,
            started.elapsed().as_millis()
        );
        copies.push(DiskCopy {
            id: d.id.clone(),
            path: absolute(&dst),
            file,
            format: d.format.name().to_string(),
            bytes,
        });
    }
    Ok(copies)
}

/// Copy `src` to `dst`: a reflink (FICLONE) where the filesystem shares
/// blocks, else a copy of the data extents only (SEEK_DATA/SEEK_HOLE), so
/// a sparse image stays sparse. `replace` writes a temporary file next
/// to `dst` and renames it over `dst`; otherwise `dst` must not exist.
/// Returns the length and how it was copied.
pub(super) fn copy_file(
    src: &Path,
    dst: &Path,
    replace: bool,
) -> std::io::Result<(u64, &'static str)> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let tmp = if replace {
        let mut name = dst.file_name().unwrap_or_default().to_os_string();
        name.push(".vireo-restore.tmp");
        dst.with_file_name(name)
    } else {
        dst.to_path_buf()
    };
    if replace {
        let _ = std::fs::remove_file(&tmp);
    }
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let result = (|| {
        // SAFETY: FICLONE takes the source fd as its argument; both fds
        // are open files owned by this function.
        let cloned = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0;
        if cloned {
            return Ok("reflink");
        }
        to.set_len(len)?;
        sparse_copy(&from, &to, len)?;
        Ok("sparse copy")
    })();
    let how = match result.and_then(|how| to.sync_all().map(|()| how)) {
        Ok(how) => how,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if replace {
        std::fs::rename(&tmp, dst)?;
    }
    Ok((len, how))
}

/// Copy the data extents of `from` (length `len`) to the same offsets of
/// `to` (already `len` long).
fn sparse_copy(from: &File, to: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let seek = |whence: libc::c_int, at: u64| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let r = unsafe { libc::lseek(from.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data past `at`.
                Some(libc::ENXIO) => Ok(None),
                // No SEEK_DATA here: everything is data.
                Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(at)),
                Some(libc::EINVAL) => Ok(Some(len)),
                _ => Err(e),
            };
        }
        Ok(Some(r as u64))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let Some(data) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        let mut off = data;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
        at = end.max(data + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::tempdir;
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempdir();
        let src = dir.path().join("a.raw");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let dst = dir.path().join("b.raw");
        let (len, _) = copy_file(&src, &dst, false).unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Refuses to overwrite unless replacing; replacing works.
        assert!(copy_file(&src, &dst, false).is_err());
        std::fs::write(&src, b"short").unwrap();
        copy_file(&src, &dst, true).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"short");
        assert!(!dir.path().join("b.raw.vireo-restore.tmp").exists());
    }
}
