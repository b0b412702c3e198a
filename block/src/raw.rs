//! Raw images: the file is the disk, byte for byte.

use crate::error::{Error, Result};
use crate::file::HostFile;
use crate::{check_range, DiskImage, LayerInfo};
use vireo_api::devices::block::Format;

/// A raw image. Its size is the file's size when opened; accesses past it
/// are errors and never extend the file.
pub struct Raw {
    file: Box<dyn HostFile>,
    size: u64,
    read_only: bool,
}

impl Raw {
    pub(crate) fn open(file: Box<dyn HostFile>, read_only: bool) -> Result<Self> {
        let size = file.len()?;
        Ok(Raw {
            file,
            size,
            read_only,
        })
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.file.path().into(),
            });
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.file.write_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl DiskImage for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), self.size, offset, buf.len() as u64)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.file.path(), self.size, offset, buf.len() as u64)?;
        self.file.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.file.path(), self.size, offset, len)?;
        if !self.file.punch_hole(offset, len)? {
            self.write_zero_bytes(offset, len)?;
        }
        Ok(())
    }

    fn layer_info(&mut self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            path: self.file.path().to_path_buf(),
            format: Format::Raw,
            virtual_size: self.size,
            cluster_size: None,
            allocated_bytes: crate::host_allocated_bytes(self.file.path())
                .unwrap_or(self.size)
                .min(self.size),
            file_size: self.file.len()?,
            version: None,
            backing_file: None,
            backing_format: None,
        })
    }

    fn backing(&mut self) -> Option<&mut dyn DiskImage> {
        None
    }
}
