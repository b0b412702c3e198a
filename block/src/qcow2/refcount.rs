//! Cluster refcounts: the refcount table, refcount blocks of any width
//! (cached in memory), and allocation at the end of the file.

use super::{header, Qcow2, Table};
use crate::error::{Error, Result};

/// Reserved bits of a refcount table entry (0-8).
const REFTABLE_RESERVED: u64 = 0x1ff;

impl Qcow2 {
    pub(super) fn load_reftable(&mut self) -> Result<()> {
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
    pub(super) fn find_end_of_allocations(&mut self) -> Result<u64> {
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
    pub(super) fn refcount(&mut self, host: u64) -> Result<u64> {
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
    pub(super) fn adjust_refcount(&mut self, host: u64, delta: i64) -> Result<u64> {
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
    pub(super) fn alloc_cluster(&mut self) -> Result<u64> {
        let off = self.next_free;
        self.next_free += self.cs;
        self.adjust_refcount(off, 1)?;
        Ok(off)
    }
}

/// Reads refcount entry `idx` of a refcount block with `bits`-bit entries
/// (big-endian for 8 bits and more, packed from the low bit for fewer).
pub(super) fn refcount_get(block: &[u8], bits: u32, idx: u64) -> u64 {
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

pub(super) fn refcount_set(block: &mut [u8], bits: u32, idx: u64, value: u64) {
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
