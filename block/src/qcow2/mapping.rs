//! Where guest clusters are: the L1 table, the L2 tables (cached in
//! memory) and what each entry says.

use super::{be64, Qcow2, Table};
use crate::error::{Error, Result};

/// L1/L2 "copied" flag: the cluster's refcount is exactly 1.
pub(super) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 flag: the cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 flag (version 3): the cluster reads as zeros.
pub(super) const OFLAG_ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset in L1 and standard L2 entries.
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cluster {
    /// Not in this image: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64, copied: bool },
    /// Stored at `host`.
    Normal { host: u64, copied: bool },
    /// Deflate-compressed: `len` bytes at `host` (any alignment).
    Compressed { host: u64, len: u64 },
}

impl Qcow2 {
    pub(super) fn load_l1(&mut self) -> Result<()> {
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

    // ---- L2 entries ----

    /// Checks one L2 entry and says what it maps.
    pub(super) fn classify(&self, e: u64, file_len: u64) -> std::result::Result<Cluster, String> {
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
    pub(super) fn read_l2(&self, off: u64) -> Result<Vec<u8>> {
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

    pub(super) fn l2_get(&self, l2: u64, idx: u64) -> u64 {
        self.l2_cache
            .get(&l2)
            .map(|t| be64(&t.data[idx as usize * 8..]))
            .unwrap_or(0)
    }

    pub(super) fn l2_set(&mut self, l2: u64, idx: u64, e: u64) {
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

    pub(super) fn cluster_at(&mut self, guest: u64) -> Result<(Cluster, u64)> {
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
    pub(super) fn lookup_for_write(&mut self, guest: u64) -> Result<(u64, u64)> {
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

    /// Counts the guest bytes this image stores itself (allocated and
    /// compressed clusters, zero clusters not counted).
    pub(super) fn allocated_bytes(&mut self) -> Result<u64> {
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
}
