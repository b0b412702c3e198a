//! Writing cached metadata back in the crash-safe order the crate doc
//! describes, and bounding the cache.

use super::{header, Qcow2};
use crate::error::Result;

/// Metadata kept in memory beyond this is written back and dropped.
const CACHE_LIMIT_BYTES: usize = 32 << 20;

impl Qcow2 {
    /// Drops cached metadata when there is too much of it, writing back
    /// what is dirty first.
    pub(super) fn trim_cache(&mut self) -> Result<()> {
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
    pub(super) fn write_back(&mut self) -> Result<()> {
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
}
