//! Guest data: reading clusters (through the backing file, decompressing
//! compressed ones), writing them (copy-on-write into new clusters), and
//! zeroing or discarding ranges.

use flate2::{Decompress, FlushDecompress};

use super::mapping::{Cluster, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2;
use crate::error::Result;

impl Qcow2 {
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
    pub(super) fn read_chunk(&mut self, buf: &mut [u8], guest: u64) -> Result<()> {
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
    pub(super) fn write_chunk(&mut self, data: &[u8], guest: u64) -> Result<()> {
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
    pub(super) fn zero_clusters(
        &mut self,
        mut guest: u64,
        end: u64,
        for_discard: bool,
    ) -> Result<()> {
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

    /// Reads every mapped cluster (at most `budget` bytes of them), checking all
    /// metadata on the way. Used by the fuzz target.
    pub(super) fn check_all(&mut self, mut budget: u64) -> Result<()> {
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
