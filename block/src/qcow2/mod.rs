//! qcow2 images, versions 2 and 3 (QEMU's docs/interop/qcow2.txt).
//!
//! What works: reading and writing; backing files of any format (read
//! through [`crate::open`]'s chain); zero clusters; reading compressed
//! (deflate) clusters and writing into them; discard and write-zeroes;
//! cluster allocation with refcounts (any refcount width), new refcount
//! blocks and a growing refcount table; creating version 3 images.
//!
//! What is refused, with the reason: encryption, external data files,
//! extended L2 entries, zstd compression, unknown incompatible features;
//! opening for writing an image that has internal snapshots or the dirty
//! or corrupt bit set (read-only opens work).
//!
//! Consistency: data clusters are written straight to the file; metadata
//! (refcount blocks, the refcount table, L2 tables, the L1 table) is kept in
//! memory and written back by [`DiskImage::flush`] in an order that leaves
//! a crashed image with at most leaked clusters: data, then refcounts,
//! then the refcount table and header, then L2 tables, then L1, each step
//! synced before the next; refcounts of clusters that lost their last
//! pointer are lowered only after that. New clusters are always appended at
//! the end of the file, so a cluster freed in memory is never reused before
//! the pointers to it are gone on disk.
//!
//! Here: the image and opening it, and the `DiskImage` operations. The
//! header's format is `header`; where guest clusters are (L1, L2 tables
//! and their cache), `mapping`; refcounts and allocation, `refcount`; guest
//! data reads, writes and zeroing, `data`; the crash-safe write-back of
//! cached metadata, `writeback`; new images, `create`.

mod create;
mod data;
mod header;
mod mapping;
mod refcount;
#[cfg(test)]
mod tests;
mod writeback;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::{Error, Result};
use crate::file::{HostFile, MemFile};
use crate::{check_range, DiskImage, LayerInfo};
use vireo_api::devices::block::Format;

pub use create::{create_qcow2, DEFAULT_CLUSTER_SIZE};
pub use header::{Header, MAGIC};
use header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};

/// Metadata table cached in memory.
struct Table {
    data: Vec<u8>,
    dirty: bool,
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Box<dyn HostFile>,
    read_only: bool,
    header: Header,
    cluster_bits: u32,
    cs: u64,
    file_len_at_open: u64,
    l1: Vec<u64>,
    l1_dirty: bool,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: bool,
    reftable_moved: bool,
    refcount_bits: u32,
    /// Refcount entries per refcount block.
    rb_entries: u64,
    l2_cache: HashMap<u64, Table>,
    rb_cache: HashMap<u64, Table>,
    /// Host offsets of the L2 tables and refcount blocks.
    metadata: HashSet<u64>,
    /// The next host cluster to allocate; everything from here on has
    /// refcount 0.
    next_free: u64,
    /// Host byte ranges whose refcounts drop once the pointers to them are
    /// gone on disk.
    pending_frees: Vec<(u64, u64)>,
    backing: Option<Box<dyn DiskImage>>,
    /// The last decompressed cluster: (L2 entry, bytes).
    last_compressed: Option<(u64, Vec<u8>)>,
}

/// Opens the backing file named in an image: (name as stored, format if
/// stored) -> the image, or None to read unallocated clusters as zeros.
pub(crate) type BackingOpener<'a> =
    dyn FnMut(&str, Option<Format>) -> Result<Option<Box<dyn DiskImage>>> + 'a;

impl Qcow2 {
    /// Opens a qcow2 image on a host file, checking the header, the L1 and
    /// the refcount table.
    pub(crate) fn open(
        file: Box<dyn HostFile>,
        read_only: bool,
        open_backing: &mut BackingOpener<'_>,
    ) -> Result<Qcow2> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        let mut first = vec![0u8; (header::V3_HEADER_LEN as u64).min(file_len) as usize];
        file.read_at(&mut first, 0)?;
        let cluster_bits = header::cluster_bits_of(&first).unwrap_or(0);
        let cluster0_len =
            if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
                (1u64 << cluster_bits).min(file_len)
            } else {
                first.len() as u64
            };
        let mut cluster0 = vec![0u8; cluster0_len as usize];
        file.read_at(&mut cluster0, 0)?;
        let header = Header::parse(&path, &cluster0, file_len)?;
        let cs = header.cluster_size();

        if !read_only {
            let refuse = |bit: u8, hint: &str| {
                Error::unsupported(
                    &path,
                    format!(
                        "opening for writing an image with the {}",
                        header.incompatible_name(bit)
                    ),
                    hint.replace("FILE", &path.display().to_string()),
                )
            };
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(refuse(
                    0,
                    "it was not closed cleanly and its refcounts may be stale: repair it with \
                     `qemu-img check -r all FILE` first (read-only opens work)",
                ));
            }
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(refuse(
                    1,
                    "QEMU found it corrupt: repair it with `qemu-img check -r all FILE` first \
                     (read-only opens work)",
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    &path,
                    format!(
                        "writing to an image with {} internal snapshots",
                        header.nb_snapshots
                    ),
                    "open it read-only, or delete the snapshots with `qemu-img snapshot -d`",
                ));
            }
        } else if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            tracing::warn!(
                "{}: QEMU marked this image corrupt; reading it anyway",
                path.display()
            );
        }

        let refcount_bits = 1u32 << header.refcount_order;
        let mut img = Qcow2 {
            read_only,
            cluster_bits: header.cluster_bits,
            cs,
            file_len_at_open: file_len,
            l1: Vec::new(),
            l1_dirty: false,
            reftable: Vec::new(),
            reftable_offset: header.refcount_table_offset,
            reftable_clusters: u64::from(header.refcount_table_clusters),
            reftable_dirty: false,
            reftable_moved: false,
            refcount_bits,
            rb_entries: cs * 8 / u64::from(refcount_bits),
            l2_cache: HashMap::new(),
            rb_cache: HashMap::new(),
            metadata: HashSet::new(),
            next_free: 0,
            pending_frees: Vec::new(),
            backing: None,
            last_compressed: None,
            header,
            file,
        };
        img.load_l1()?;
        img.load_reftable()?;
        if !read_only {
            img.next_free = img.find_end_of_allocations()?;
            if img.header.autoclear_features != 0 {
                // Bitmaps and other autoclear features would go stale as
                // vireo writes: clear their bits as the spec asks.
                img.file
                    .write_at(&0u64.to_be_bytes(), header::OFF_AUTOCLEAR)?;
                img.file.sync()?;
                img.header.autoclear_features = 0;
            }
        }
        if let Some(name) = img.header.backing_file.clone() {
            let format = match img.header.backing_format.as_deref() {
                None => None,
                Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                    Error::unsupported(
                        &path,
                        format!("the backing file format \"{f}\" of {name}"),
                        "vireo reads raw and qcow2 backing files; convert the backing file and \
                         `qemu-img rebase -u -F FORMAT` the overlay",
                    )
                })?),
            };
            img.backing = open_backing(&name, format)?;
        }
        Ok(img)
    }

    /// Opens an image held in memory, read-only, with no backing file.
    pub fn open_bytes(bytes: &[u8]) -> Result<Qcow2> {
        let file = MemFile::new(bytes.to_vec());
        Qcow2::open(Box::new(file), true, &mut |_, _| Ok(None))
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::corrupt(self.file.path(), detail)
    }

    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    fn file_len(&self) -> Result<u64> {
        self.file.len()
    }

    /// True when `host` lies in the header cluster, the L1 table or the
    /// refcount table (metadata at fixed places).
    fn in_fixed_metadata(&self, host: u64, len: u64) -> bool {
        let overlaps = |start: u64, size: u64| {
            host < start.saturating_add(size) && start < host.saturating_add(len)
        };
        overlaps(0, self.cs)
            || (self.header.l1_size > 0
                && overlaps(
                    self.header.l1_table_offset,
                    u64::from(self.header.l1_size) * 8,
                ))
            || overlaps(
                self.reftable_offset,
                self.reftable_clusters << self.cluster_bits,
            )
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path().into(),
            });
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.write_back().and_then(|()| self.file.sync()) {
            tracing::error!("{e}");
        }
    }
}

impl DiskImage for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.header.size, offset, buf.len() as u64)?;
        self.trim_cache()?;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let room = (self.cs - (guest & (self.cs - 1))) as usize;
            let n = room.min(buf.len() - done);
            self.read_chunk(&mut buf[done..done + n], guest)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.header.size, offset, buf.len() as u64)?;
        self.trim_cache()?;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let room = (self.cs - (guest & (self.cs - 1))) as usize;
            let n = room.min(buf.len() - done);
            self.write_chunk(&buf[done..done + n], guest)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_back()?;
        self.file.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.header.size, offset, len)?;
        self.trim_cache()?;
        // Only whole clusters can be dropped; partial ones keep their data.
        let start = offset.div_ceil(self.cs) * self.cs;
        let end = (offset + len) & !(self.cs - 1);
        let end = if offset + len == self.header.size {
            offset + len
        } else {
            end
        };
        if start < end {
            self.zero_clusters(start, end, true)?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.header.size, offset, len)?;
        self.trim_cache()?;
        let end = offset + len;
        let first_full = offset.div_ceil(self.cs) * self.cs;
        let mut last_full = end & !(self.cs - 1);
        if end == self.header.size && end > last_full {
            // The last, partial, guest cluster of the disk counts as whole.
            last_full = end;
        }
        if first_full >= last_full {
            return self.write_zero_bytes(offset, len);
        }
        self.write_zero_bytes(offset, first_full - offset)?;
        self.zero_clusters(first_full, last_full, false)?;
        self.write_zero_bytes(last_full, end - last_full)
    }

    fn layer_info(&mut self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            path: self.path().to_path_buf(),
            format: Format::Qcow2,
            virtual_size: self.header.size,
            cluster_size: Some(self.cs),
            allocated_bytes: self.allocated_bytes()?,
            file_size: self.file_len()?,
            version: Some(self.header.version),
            backing_file: self.header.backing_file.clone(),
            backing_format: self.header.backing_format.clone(),
        })
    }

    fn backing(&mut self) -> Option<&mut dyn DiskImage> {
        match self.backing.as_mut() {
            Some(b) => Some(b.as_mut()),
            None => None,
        }
    }
}

impl Qcow2 {
    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        DiskImage::write_at(self, &zeros, offset)
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Opens `bytes` as a qcow2 image (read-only, backing file ignored) and
/// reads every mapped cluster, so any metadata the image has is parsed and
/// checked. The fuzz target's entry point: it must return an error, never
/// panic, allocate without bound or loop forever, whatever the bytes are.
pub fn check_image_bytes(bytes: &[u8]) -> Result<()> {
    let mut img = Qcow2::open_bytes(bytes)?;
    img.check_all(16 << 20)?;
    img.layer_info().map(|_| ())
}
