//! The host side of an image: a file on disk, or bytes in memory (for the
//! fuzz target and unit tests). Positional I/O only; no shared cursor.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Positional access to the bytes that hold an image.
pub(crate) trait HostFile: Send {
    /// The name used in messages.
    fn path(&self) -> &Path;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset` (extending the file if needed: callers
    /// check bounds first).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes written data durable.
    fn sync(&self) -> Result<()>;
    /// Deallocates a range so it reads as zeros, keeping the size. Returns
    /// false when the host cannot do that (the caller then writes zeros).
    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool>;
}

/// An image file on the host.
pub(crate) struct DiskFile {
    file: File,
    path: PathBuf,
}

impl DiskFile {
    pub(crate) fn new(file: File, path: &Path) -> Self {
        DiskFile {
            file,
            path: path.to_path_buf(),
        }
    }
}

impl HostFile for DiskFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, "stat", e))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // End of file: the rest reads as zeros.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("reading {} bytes at offset {offset}", buf.len()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("writing {} bytes at offset {offset}", buf.len()),
                e,
            )
        })
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: fallocate only acts on the descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
            _ => Err(Error::io(&self.path, "punching a hole (fallocate)", err)),
        }
    }
}

/// An image held in memory. Clones share the bytes, so a test can look at
/// what an image wrote after dropping it.
#[derive(Clone)]
pub(crate) struct MemFile {
    bytes: Arc<Mutex<Vec<u8>>>,
    path: PathBuf,
}

impl MemFile {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        MemFile {
            bytes: Arc::new(Mutex::new(bytes)),
            path: PathBuf::from("<memory>"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked; the bytes are fine.
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl HostFile for MemFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bytes = self.lock();
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < bytes.len() {
                let n = buf.len().min(bytes.len() - start);
                buf[..n].copy_from_slice(&bytes[start..start + n]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut bytes = self.lock();
        let start =
            usize::try_from(offset).map_err(|_| Error::invalid(&self.path, "offset too large"))?;
        let end = start + buf.len();
        if end > bytes.len() {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        let mut bytes = self.lock();
        let size = bytes.len() as u64;
        let start = offset.min(size) as usize;
        let end = offset.saturating_add(len).min(size) as usize;
        bytes[start..end].fill(0);
        Ok(true)
    }
}
