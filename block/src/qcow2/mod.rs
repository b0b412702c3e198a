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

mod header;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use flate2::{Decompress, FlushDecompress};

use crate::error::{Error, Result};
use crate::file::{DiskFile, HostFile, MemFile};
use crate::{check_range, DiskImage, LayerInfo};
use vireo_api::devices::block::Format;

pub use header::{Header, MAGIC};
use header::{NewHeader, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};

/// L1/L2 "copied" flag: the cluster's refcount is exactly 1.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 flag: the cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 flag (version 3): the cluster reads as zeros.
const OFLAG_ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset in L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (0-8).
const REFTABLE_RESERVED: u64 = 0x1ff;

/// Metadata kept in memory beyond this is written back and dropped.
const CACHE_LIMIT_BYTES: usize = 32 << 20;

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Not in this image: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64, copied: bool },
    /// Stored at `host`.
    Normal { host: u64, copied: bool },
    /// Deflate-compressed: `len` bytes at `host` (any alignment).
    Compressed { host: u64, len: u64 },
}

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

    fn load_l1(&mut self) -> Result<()> {
        let n = self.header.l1_size as usize;
        let mut raw = vec![0u8; n * 8];
        self.file.read_at(&mut raw, self.header.l1_table_offset)?;
        let file_len = self.file_len_at_open;
        let mut l1 = Vec::with_capacity(n);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            let e = u64::from_be_bytes(a);
            let off = e & OFFSET_MASK;
            let what = || format!("L1 entry {i} (0x{e:016x})");
            if e & L1_RESERVED != 0 {
                return Err(self.corrupt(format!("{} has reserved bits set", what())));
            }
            if off != 0 {
                if off % self.cs != 0 {
                    return Err(self.corrupt(format!(
                        "{} points to an L2 table at 0x{off:x}, not aligned to the {}-byte cluster size",
                        what(),
                        self.cs
                    )));
                }
                if off + self.cs > file_len {
                    return Err(self.corrupt(format!(
                        "{} points to an L2 table at 0x{off:x}, past the end of the {file_len}-byte file",
                        what()
                    )));
                }
                if self.in_fixed_metadata(off, self.cs) {
                    return Err(self.corrupt(format!(
                        "{} points to an L2 table at 0x{off:x}, inside the header, L1 or refcount table",
                        what()
                    )));
                }
                self.metadata.insert(off);
            }
            l1.push(e);
        }
        self.l1 = l1;
        Ok(())
    }

    fn load_reftable(&mut self) -> Result<()> {
        let n = (self.reftable_clusters << self.cluster_bits) / 8;
        let mut raw = vec![0u8; n as usize * 8];
        self.file.read_at(&mut raw, self.reftable_offset)?;
        let file_len = self.file_len_at_open;
        let mut table = Vec::with_capacity(n as usize);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            let e = u64::from_be_bytes(a);
            if e != 0 {
                let what = || format!("refcount table entry {i} (0x{e:016x})");
                if e & REFTABLE_RESERVED != 0 || e % self.cs != 0 {
                    return Err(self.corrupt(format!("{} is not a cluster-aligned offset", what())));
                }
                if e.checked_add(self.cs).is_none_or(|end| end > file_len) {
                    return Err(self.corrupt(format!(
                        "{} points past the end of the {file_len}-byte file",
                        what()
                    )));
                }
                if self.in_fixed_metadata(e, self.cs) {
                    return Err(self.corrupt(format!(
                        "{} points inside the header, L1 or refcount table",
                        what()
                    )));
                }
                if !self.metadata.insert(e) {
                    return Err(self.corrupt(format!(
                        "{} points to a cluster also used as an L2 table or another refcount block",
                        what()
                    )));
                }
            }
            table.push(e);
        }
        self.reftable = table;
        Ok(())
    }

    /// The first host offset past every cluster with a non-zero refcount
    /// and past the end of the file.
    fn find_end_of_allocations(&mut self) -> Result<u64> {
        let mut end = self.file_len_at_open.div_ceil(self.cs) * self.cs;
        if let Some(ti) = self.reftable.iter().rposition(|&e| e != 0) {
            let block = self.reftable[ti];
            self.load_refblock(block)?;
            for bi in (0..self.rb_entries).rev() {
                if self.refblock_get(block, bi) != 0 {
                    let cluster = ti as u64 * self.rb_entries + bi;
                    end = end.max((cluster + 1) << self.cluster_bits);
                    break;
                }
            }
        }
        Ok(end)
    }

    // ---- L2 entries ----

    /// Checks one L2 entry and says what it maps.
    fn classify(&self, e: u64, file_len: u64) -> std::result::Result<Cluster, String> {
        if e & OFLAG_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            if e & OFLAG_COPIED != 0 {
                return Err("is compressed and has the copied flag set".into());
            }
            if host >> 56 != 0 {
                return Err("is compressed with an offset above bit 55".into());
            }
            if host == 0 || host >= file_len {
                return Err(format!(
                    "points to compressed data at 0x{host:x}, outside the {file_len}-byte file"
                ));
            }
            if host < self.cs {
                return Err(format!(
                    "points to compressed data at 0x{host:x}, inside the header"
                ));
            }
            let len = sectors * 512 - (host & 511);
            return Ok(Cluster::Compressed { host, len });
        }
        if e & L2_RESERVED != 0 {
            return Err("has reserved bits set".into());
        }
        let host = e & OFFSET_MASK;
        let copied = e & OFLAG_COPIED != 0;
        if e & OFLAG_ZERO != 0 && self.header.version < 3 {
            return Err("has the zero flag, which version 2 images cannot have".into());
        }
        if host != 0 {
            if host % self.cs != 0 {
                return Err(format!(
                    "points to data at 0x{host:x}, not aligned to the {}-byte cluster size",
                    self.cs
                ));
            }
            if host >= file_len {
                return Err(format!(
                    "points to data at 0x{host:x}, past the end of the {file_len}-byte file"
                ));
            }
            if self.in_fixed_metadata(host, self.cs) || self.metadata.contains(&host) {
                return Err(format!(
                    "points to data at 0x{host:x}, which holds image metadata"
                ));
            }
        }
        Ok(if e & OFLAG_ZERO != 0 {
            Cluster::Zero { host, copied }
        } else if host == 0 {
            Cluster::Unallocated
        } else {
            Cluster::Normal { host, copied }
        })
    }

    /// Reads and checks the L2 table at `off` without caching it.
    fn read_l2(&self, off: u64) -> Result<Vec<u8>> {
        let mut data = vec![0u8; self.cs as usize];
        self.file.read_at(&mut data, off)?;
        let file_len = self.file_len()?;
        for (i, chunk) in data.chunks_exact(8).enumerate() {
            let e = be64(chunk);
            if e != 0 {
                if let Err(why) = self.classify(e, file_len) {
                    return Err(self.corrupt(format!(
                        "entry {i} (0x{e:016x}) of the L2 table at 0x{off:x} {why}"
                    )));
                }
            }
        }
        Ok(data)
    }

    fn load_l2(&mut self, off: u64) -> Result<()> {
        if !self.l2_cache.contains_key(&off) {
            let data = self.read_l2(off)?;
            self.l2_cache.insert(off, Table { data, dirty: false });
        }
        Ok(())
    }

    fn l2_get(&self, l2: u64, idx: u64) -> u64 {
        self.l2_cache
            .get(&l2)
            .map(|t| be64(&t.data[idx as usize * 8..]))
            .unwrap_or(0)
    }

    fn l2_set(&mut self, l2: u64, idx: u64, e: u64) {
        if let Some(t) = self.l2_cache.get_mut(&l2) {
            t.data[idx as usize * 8..idx as usize * 8 + 8].copy_from_slice(&e.to_be_bytes());
            t.dirty = true;
        }
    }

    /// The L2 table and index of a guest offset, without allocating.
    fn lookup(&mut self, guest: u64) -> Result<(Option<u64>, u64)> {
        let per_l2 = self.l2_entries();
        let l1_idx = (guest >> self.cluster_bits) / per_l2;
        let l2_idx = (guest >> self.cluster_bits) % per_l2;
        let l2 = self.l1.get(l1_idx as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if l2 == 0 {
            return Ok((None, l2_idx));
        }
        self.load_l2(l2)?;
        Ok((Some(l2), l2_idx))
    }

    fn cluster_at(&mut self, guest: u64) -> Result<(Cluster, u64)> {
        let (l2, idx) = self.lookup(guest)?;
        let Some(l2) = l2 else {
            return Ok((Cluster::Unallocated, 0));
        };
        let e = self.l2_get(l2, idx);
        let file_len = self.file_len()?;
        let c = self.classify(e, file_len).map_err(|why| {
            self.corrupt(format!(
                "entry {idx} (0x{e:016x}) of the L2 table at 0x{l2:x} {why}"
            ))
        })?;
        Ok((c, e))
    }

    /// The L2 table and index for writing a guest offset, allocating the
    /// table if it does not exist.
    fn lookup_for_write(&mut self, guest: u64) -> Result<(u64, u64)> {
        let per_l2 = self.l2_entries();
        let l1_idx = ((guest >> self.cluster_bits) / per_l2) as usize;
        let l2_idx = (guest >> self.cluster_bits) % per_l2;
        let Some(&l1e) = self.l1.get(l1_idx) else {
            return Err(self.corrupt(format!("guest offset 0x{guest:x} is beyond the L1 table")));
        };
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            let new = self.alloc_cluster()?;
            self.metadata.insert(new);
            self.l2_cache.insert(
                new,
                Table {
                    data: vec![0u8; self.cs as usize],
                    dirty: true,
                },
            );
            self.l1[l1_idx] = new | OFLAG_COPIED;
            self.l1_dirty = true;
            return Ok((new, l2_idx));
        }
        if l1e & OFLAG_COPIED == 0 {
            if self.refcount(l2)? != 1 {
                return Err(Error::unsupported(
                    self.path(),
                    format!("writing through the L2 table at 0x{l2:x}, which is shared (internal snapshot)"),
                    "open the image read-only",
                ));
            }
            self.l1[l1_idx] = l1e | OFLAG_COPIED;
            self.l1_dirty = true;
        }
        self.load_l2(l2)?;
        Ok((l2, l2_idx))
    }

    // ---- refcounts ----

    fn load_refblock(&mut self, off: u64) -> Result<()> {
        if !self.rb_cache.contains_key(&off) {
            let mut data = vec![0u8; self.cs as usize];
            self.file.read_at(&mut data, off)?;
            self.rb_cache.insert(off, Table { data, dirty: false });
        }
        Ok(())
    }

    fn refblock_get(&self, block: u64, idx: u64) -> u64 {
        let Some(t) = self.rb_cache.get(&block) else {
            return 0;
        };
        refcount_get(&t.data, self.refcount_bits, idx)
    }

    /// The refcount of the host cluster holding `host`.
    fn refcount(&mut self, host: u64) -> Result<u64> {
        let ci = host >> self.cluster_bits;
        let ti = ci / self.rb_entries;
        let Some(&block) = self.reftable.get(ti as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        self.load_refblock(block)?;
        Ok(self.refblock_get(block, ci % self.rb_entries))
    }

    /// Adds `delta` to the refcount of the host cluster holding `host`,
    /// creating refcount blocks and growing the refcount table as needed.
    fn adjust_refcount(&mut self, host: u64, delta: i64) -> Result<u64> {
        let ci = host >> self.cluster_bits;
        let ti = ci / self.rb_entries;
        self.ensure_reftable(ti)?;
        if self.reftable[ti as usize] == 0 {
            if delta < 0 {
                return Err(self.corrupt(format!(
                    "cluster 0x{host:x} is in use but has no refcount block"
                )));
            }
            let block = self.next_free;
            self.next_free += self.cs;
            self.rb_cache.insert(
                block,
                Table {
                    data: vec![0u8; self.cs as usize],
                    dirty: true,
                },
            );
            self.metadata.insert(block);
            self.reftable[ti as usize] = block;
            self.reftable_dirty = true;
            // The block's own refcount: in itself or in a further new block.
            self.adjust_refcount(block, 1)?;
        }
        let block = self.reftable[ti as usize];
        self.load_refblock(block)?;
        let idx = ci % self.rb_entries;
        let old = self.refblock_get(block, idx);
        let max = if self.refcount_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits) - 1
        };
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&n| n <= max)
                .ok_or_else(|| {
                    Error::unsupported(
                        self.path(),
                        format!("a refcount above {max} (cluster 0x{host:x})"),
                        "convert the image with `qemu-img convert -O qcow2 -o refcount_bits=16`",
                    )
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                self.corrupt(format!(
                    "the refcount of cluster 0x{host:x} would drop below 0"
                ))
            })?
        };
        if let Some(t) = self.rb_cache.get_mut(&block) {
            refcount_set(&mut t.data, self.refcount_bits, idx, new);
            t.dirty = true;
        }
        Ok(new)
    }

    /// Makes the refcount table long enough for index `ti`, moving it to
    /// new clusters at the end of the file when it must grow.
    fn ensure_reftable(&mut self, ti: u64) -> Result<()> {
        if (ti as usize) < self.reftable.len() {
            return Ok(());
        }
        let per_cluster = self.cs / 8;
        let want = (ti + 1).max(self.reftable.len() as u64 * 2);
        let clusters = want.div_ceil(per_cluster);
        if clusters << self.cluster_bits > header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                self.path(),
                "growing the refcount table beyond 8 MiB",
                "use a larger cluster size (vireo image convert --cluster-size)",
            ));
        }
        let old = (
            self.reftable_offset,
            self.reftable_clusters << self.cluster_bits,
        );
        let new_offset = self.next_free;
        self.next_free += clusters << self.cluster_bits;
        self.reftable.resize((clusters * per_cluster) as usize, 0);
        self.reftable_offset = new_offset;
        self.reftable_clusters = clusters;
        self.reftable_dirty = true;
        self.reftable_moved = true;
        tracing::debug!(
            "{}: refcount table grows to {clusters} clusters at 0x{new_offset:x}",
            self.path().display()
        );
        for c in 0..clusters {
            self.adjust_refcount(new_offset + (c << self.cluster_bits), 1)?;
        }
        // The old table is freed once the header points to the new one.
        self.pending_frees.push(old);
        Ok(())
    }

    /// Takes a new host cluster (refcount 1) from the end of the file.
    fn alloc_cluster(&mut self) -> Result<u64> {
        let off = self.next_free;
        self.next_free += self.cs;
        self.adjust_refcount(off, 1)?;
        Ok(off)
    }

    /// The host byte range whose refcounts an L2 entry holds.
    fn host_range(&self, c: Cluster) -> Option<(u64, u64)> {
        match c {
            Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                Some((host, self.cs))
            }
            Cluster::Compressed { host, len } => {
                let start = host & !511;
                Some((start, (host + len) - start))
            }
            _ => None,
        }
    }

    // ---- data ----

    fn read_backing(&mut self, buf: &mut [u8], guest: u64) -> Result<()> {
        let Some(backing) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.size();
        let n = if guest >= bsize {
            0
        } else {
            (bsize - guest).min(buf.len() as u64) as usize
        };
        if n > 0 {
            backing.read_at(&mut buf[..n], guest)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn decompress(&mut self, entry: u64, host: u64, len: u64) -> Result<&[u8]> {
        if self
            .last_compressed
            .as_ref()
            .is_none_or(|(e, _)| *e != entry)
        {
            let mut input = vec![0u8; len as usize];
            self.file.read_at(&mut input, host)?;
            let mut out = vec![0u8; self.cs as usize];
            let mut d = Decompress::new(false);
            let status = d.decompress(&input, &mut out, FlushDecompress::Finish);
            if let Err(e) = status {
                return Err(self.corrupt(format!(
                    "the compressed cluster at 0x{host:x} ({len} bytes) does not inflate: {e}"
                )));
            }
            if d.total_out() != self.cs {
                return Err(self.corrupt(format!(
                    "the compressed cluster at 0x{host:x} inflates to {} bytes, not {}",
                    d.total_out(),
                    self.cs
                )));
            }
            self.last_compressed = Some((entry, out));
        }
        Ok(self
            .last_compressed
            .as_ref()
            .map(|(_, b)| b.as_slice())
            .unwrap_or(&[]))
    }

    /// Reads within one guest cluster.
    fn read_chunk(&mut self, buf: &mut [u8], guest: u64) -> Result<()> {
        let inner = guest & (self.cs - 1);
        let (c, e) = self.cluster_at(guest)?;
        match c {
            Cluster::Unallocated => self.read_backing(buf, guest),
            Cluster::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Cluster::Normal { host, .. } => self.file.read_at(buf, host + inner),
            Cluster::Compressed { host, len } => {
                let n = buf.len();
                let data = self.decompress(e, host, len)?;
                buf.copy_from_slice(&data[inner as usize..inner as usize + n]);
                Ok(())
            }
        }
    }

    /// The current contents of the guest cluster at `guest_cluster`.
    fn cluster_contents(&mut self, guest_cluster: u64, c: Cluster, e: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cs as usize];
        match c {
            Cluster::Unallocated => self.read_backing(&mut buf, guest_cluster)?,
            Cluster::Zero { .. } => {}
            Cluster::Normal { host, .. } => self.file.read_at(&mut buf, host)?,
            Cluster::Compressed { host, len } => {
                buf.copy_from_slice(self.decompress(e, host, len)?)
            }
        }
        Ok(buf)
    }

    /// Writes within one guest cluster.
    fn write_chunk(&mut self, data: &[u8], guest: u64) -> Result<()> {
        let inner = (guest & (self.cs - 1)) as usize;
        let guest_cluster = guest & !(self.cs - 1);
        let (l2, idx) = self.lookup_for_write(guest)?;
        let e = self.l2_get(l2, idx);
        let file_len = self.file_len()?.max(self.next_free);
        let c = self.classify(e, file_len).map_err(|why| {
            self.corrupt(format!(
                "entry {idx} (0x{e:016x}) of the L2 table at 0x{l2:x} {why}"
            ))
        })?;

        // In place: a cluster of our own (refcount 1).
        let own = match c {
            Cluster::Normal { host, copied } | Cluster::Zero { host, copied } if host != 0 => {
                copied || self.refcount(host)? == 1
            }
            _ => false,
        };
        if own {
            let host = e & OFFSET_MASK;
            if let Cluster::Zero { .. } = c {
                let mut buf = vec![0u8; self.cs as usize];
                buf[inner..inner + data.len()].copy_from_slice(data);
                self.file.write_at(&buf, host)?;
            } else {
                self.file.write_at(data, host + inner as u64)?;
            }
            if e != host | OFLAG_COPIED {
                self.l2_set(l2, idx, host | OFLAG_COPIED);
            }
            return Ok(());
        }

        // Copy on write into a new cluster.
        let buf = if data.len() as u64 == self.cs {
            data.to_vec()
        } else {
            let mut buf = self.cluster_contents(guest_cluster, c, e)?;
            buf[inner..inner + data.len()].copy_from_slice(data);
            buf
        };
        let host = self.alloc_cluster()?;
        self.file.write_at(&buf, host)?;
        self.l2_set(l2, idx, host | OFLAG_COPIED);
        if let Some(range) = self.host_range(c) {
            self.pending_frees.push(range);
        }
        if self
            .last_compressed
            .as_ref()
            .is_some_and(|(le, _)| *le == e)
        {
            self.last_compressed = None;
        }
        Ok(())
    }

    /// Makes whole guest clusters read as zeros (or, for a discard, read
    /// as zeros or the backing file's data) and drops their host clusters.
    fn zero_clusters(&mut self, mut guest: u64, end: u64, for_discard: bool) -> Result<()> {
        let has_backing = self.backing.is_some();
        let v3 = self.header.version >= 3;
        while guest < end {
            let (c, e) = self.cluster_at(guest)?;
            let new = match (has_backing, v3, for_discard) {
                (false, _, _) => 0,
                (true, true, _) => OFLAG_ZERO,
                (true, false, true) => 0,
                (true, false, false) => {
                    // Version 2 has no zero flag: write zero bytes.
                    let zeros = vec![0u8; (end - guest).min(self.cs) as usize];
                    self.write_chunk(&zeros, guest)?;
                    guest += self.cs;
                    continue;
                }
            };
            let done = match c {
                Cluster::Unallocated => new == 0,
                Cluster::Zero { host: 0, .. } => new == OFLAG_ZERO,
                _ => false,
            };
            if !done {
                let (l2, idx) = self.lookup_for_write(guest)?;
                self.l2_set(l2, idx, new);
                if let Some(range) = self.host_range(c) {
                    self.pending_frees.push(range);
                }
                if self
                    .last_compressed
                    .as_ref()
                    .is_some_and(|(le, _)| *le == e)
                {
                    self.last_compressed = None;
                }
            }
            guest += self.cs;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path().into(),
            });
        }
        Ok(())
    }

    /// Drops cached metadata when there is too much of it, writing back
    /// what is dirty first.
    fn trim_cache(&mut self) -> Result<()> {
        let bytes = (self.l2_cache.len() + self.rb_cache.len()) * self.cs as usize;
        if bytes > CACHE_LIMIT_BYTES {
            self.write_back()?;
            self.l2_cache.clear();
            self.rb_cache.clear();
        }
        Ok(())
    }

    fn is_dirty(&self) -> bool {
        self.l1_dirty
            || self.reftable_dirty
            || !self.pending_frees.is_empty()
            || self.l2_cache.values().any(|t| t.dirty)
            || self.rb_cache.values().any(|t| t.dirty)
    }

    fn write_dirty_refblocks(&mut self) -> Result<bool> {
        let mut wrote = false;
        let mut offs: Vec<u64> = self
            .rb_cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        offs.sort_unstable();
        for off in offs {
            if let Some(t) = self.rb_cache.get(&off) {
                self.file.write_at(&t.data, off)?;
            }
            if let Some(t) = self.rb_cache.get_mut(&off) {
                t.dirty = false;
            }
            wrote = true;
        }
        Ok(wrote)
    }

    /// Writes all metadata back in crash-safe order, each step synced.
    fn write_back(&mut self) -> Result<()> {
        if self.read_only || !self.is_dirty() {
            return Ok(());
        }
        // 1. Data clusters (already written) are durable before anything
        //    points to them.
        self.file.sync()?;
        // 2. Refcounts before any pointer that uses them.
        if self.write_dirty_refblocks()? {
            self.file.sync()?;
        }
        // 3. The refcount table, then the header that points to a moved one.
        if self.reftable_dirty {
            let mut raw = vec![0u8; (self.reftable_clusters << self.cluster_bits) as usize];
            for (i, e) in self.reftable.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.file.write_at(&raw, self.reftable_offset)?;
            self.file.sync()?;
            if self.reftable_moved {
                let mut h = [0u8; 12];
                h[..8].copy_from_slice(&self.reftable_offset.to_be_bytes());
                h[8..].copy_from_slice(&(self.reftable_clusters as u32).to_be_bytes());
                self.file.write_at(&h, header::OFF_REFTABLE_OFFSET)?;
                self.file.sync()?;
                self.header.refcount_table_offset = self.reftable_offset;
                self.header.refcount_table_clusters = self.reftable_clusters as u32;
                self.reftable_moved = false;
            }
            self.reftable_dirty = false;
        }
        // 4. L2 tables before the L1 entries that point to them.
        let mut offs: Vec<u64> = self
            .l2_cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        if !offs.is_empty() {
            offs.sort_unstable();
            for off in offs {
                if let Some(t) = self.l2_cache.get(&off) {
                    self.file.write_at(&t.data, off)?;
                }
                if let Some(t) = self.l2_cache.get_mut(&off) {
                    t.dirty = false;
                }
            }
            self.file.sync()?;
        }
        // 5. L1.
        if self.l1_dirty {
            let mut raw = vec![0u8; self.l1.len() * 8];
            for (i, e) in self.l1.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.file.write_at(&raw, self.header.l1_table_offset)?;
            self.file.sync()?;
            self.l1_dirty = false;
        }
        // 6. Only now drop the refcounts of clusters nothing points to.
        if !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            let mut holes = Vec::new();
            for (start, len) in frees {
                let mut c = start & !(self.cs - 1);
                while c < start + len {
                    if self.adjust_refcount(c, -1)? == 0 {
                        holes.push(c);
                    }
                    c += self.cs;
                }
            }
            if !self.pending_frees.is_empty() {
                // Freeing never allocates; anything here is a bug, keep it for
                // the next flush rather than lose it.
                tracing::warn!(
                    "{}: refcount frees queued while freeing",
                    self.path().display()
                );
            }
            self.write_dirty_refblocks()?;
            self.file.sync()?;
            for c in holes {
                if !self.metadata.contains(&c) {
                    // Best effort: the space goes back to the host.
                    let _ = self.file.punch_hole(c, self.cs);
                }
            }
        }
        Ok(())
    }

    /// Counts the guest bytes this image stores itself (allocated and
    /// compressed clusters, zero clusters not counted).
    fn allocated_bytes(&mut self) -> Result<u64> {
        let mut clusters = 0u64;
        let file_len = self.file_len()?;
        let l1: Vec<u64> = self.l1.clone();
        for l1e in l1 {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let data = match self.l2_cache.get(&l2) {
                Some(t) => t.data.clone(),
                None => self.read_l2(l2)?,
            };
            for chunk in data.chunks_exact(8) {
                match self.classify(be64(chunk), file_len) {
                    Ok(Cluster::Normal { .. }) | Ok(Cluster::Compressed { .. }) => clusters += 1,
                    _ => {}
                }
            }
        }
        Ok(clusters * self.cs)
    }

    /// Reads every mapped cluster (at most `budget` bytes of them), checking all
    /// metadata on the way. Used by the fuzz target.
    fn check_all(&mut self, mut budget: u64) -> Result<()> {
        let l1: Vec<u64> = self.l1.clone();
        let per_l2 = self.l2_entries();
        let mut buf = vec![0u8; self.cs as usize];
        for (i, l1e) in l1.into_iter().enumerate() {
            if l1e & OFFSET_MASK == 0 {
                continue;
            }
            for j in 0..per_l2 {
                let guest = (i as u64 * per_l2 + j) << self.cluster_bits;
                let n = (self.header.size.saturating_sub(guest)).min(self.cs) as usize;
                if n == 0 || budget < n as u64 {
                    return Ok(());
                }
                budget -= n as u64;
                self.read_chunk(&mut buf[..n], guest)?;
            }
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

/// Reads refcount entry `idx` of a refcount block with `bits`-bit entries
/// (big-endian for 8 bits and more, packed from the low bit for fewer).
fn refcount_get(block: &[u8], bits: u32, idx: u64) -> u64 {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = idx * u64::from(bits);
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1u64 << bits) - 1)
    }
}

fn refcount_set(block: &mut [u8], bits: u32, idx: u64, value: u64) {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        for (k, b) in block[start..start + n].iter_mut().enumerate() {
            *b = (value >> (8 * (n - 1 - k))) as u8;
        }
    } else {
        let bit = idx * u64::from(bits);
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        let byte = &mut block[(bit / 8) as usize];
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
    }
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

/// Default cluster size of new images (as QEMU's).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// Creates a version 3 qcow2 image of `size` bytes (rounded up to a
/// multiple of 512, like qemu-img) with `cluster_size`-byte clusters
/// (a power of two from 512 to 2 MiB) and 16-bit refcounts. `backing` is
/// the backing file name as it is to be stored (relative names are
/// relative to the new image's directory) and its format. Refuses to
/// overwrite an existing file.
pub fn create_qcow2(
    path: &Path,
    size: u64,
    cluster_size: u64,
    backing: Option<(&str, Format)>,
) -> Result<()> {
    let bytes = new_image_bytes(path, size, cluster_size, backing)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, "creating", e))?;
    let host = DiskFile::new(file, path);
    host.write_at(&bytes, 0)?;
    host.sync()
}

/// The bytes of a new, empty qcow2 image (see [`create_qcow2`]).
pub(crate) fn new_image_bytes(
    path: &Path,
    size: u64,
    cluster_size: u64,
    backing: Option<(&str, Format)>,
) -> Result<Vec<u8>> {
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(Error::invalid(
            path,
            format!("cluster size {cluster_size} is not a power of two from 512 to 2M"),
        ));
    }
    let size = size
        .div_ceil(512)
        .checked_mul(512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| Error::invalid(path, format!("the virtual size {size} is too large")))?;
    let cluster_bits = cluster_size.trailing_zeros();
    let cs = cluster_size;
    let l1_size = u128::from(size).div_ceil(u128::from(cs) * u128::from(cs / 8));
    if l1_size * 8 > u128::from(header::MAX_L1_BYTES) {
        return Err(Error::invalid(
            path,
            format!(
                "a {size}-byte disk needs too large an L1 table with {cs}-byte clusters; use a \
                 larger cluster size"
            ),
        ));
    }
    let l1_size = l1_size as u64;
    if let Some((name, _)) = backing {
        if name.len() > header::MAX_BACKING_NAME as usize {
            return Err(Error::invalid(
                path,
                format!(
                    "the backing file name is {} bytes long, more than 1023",
                    name.len()
                ),
            ));
        }
    }
    // Layout: header, L1, refcount table, refcount blocks; every one of
    // these clusters has refcount 1.
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rb_entries = cs * 8 / 16;
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + l1_clusters + rt_clusters + rb_count;
        let rb = total.div_ceil(rb_entries);
        let rt = (rb * 8).div_ceil(cs);
        if rb == rb_count && rt == rt_clusters {
            break;
        }
        rb_count = rb;
        rt_clusters = rt;
    }
    let total = 1 + l1_clusters + rt_clusters + rb_count;
    if (rt_clusters << cluster_bits) > header::MAX_REFTABLE_BYTES {
        return Err(Error::invalid(
            path,
            "the image needs too large a refcount table; use a larger cluster size",
        ));
    }
    let l1_off = cs;
    let rt_off = l1_off + l1_clusters * cs;
    let rb_off = rt_off + rt_clusters * cs;
    let backing_strs = backing.map(|(n, f)| (n, f.name()));
    let hdr = NewHeader {
        cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        backing: backing_strs,
    }
    .to_bytes()
    .ok_or_else(|| {
        Error::invalid(
            path,
            format!("the header and the backing file name do not fit in one {cs}-byte cluster; use a larger cluster size"),
        )
    })?;
    let mut image = vec![0u8; (total * cs) as usize];
    image[..hdr.len()].copy_from_slice(&hdr);
    for b in 0..rb_count {
        let at = (rt_off + b * 8) as usize;
        image[at..at + 8].copy_from_slice(&(rb_off + b * cs).to_be_bytes());
    }
    for c in 0..total {
        let at = (rb_off + c * 2) as usize;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(image)
}
