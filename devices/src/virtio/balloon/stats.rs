//! The guest's memory statistics (statsq, §5.5.6.3) as the host sees them.

/// Statistic tags (§5.5.6.3, plus the ones Linux added after 1.2).
pub mod stat_tags {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// The guest's memory statistics as last reported; `None` for the ones
/// the guest did not send. Sizes are in bytes, the rest are counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
    /// Tags this device does not know, as (tag, value).
    pub other: Vec<(u16, u64)>,
    /// Counts the reports received since the device was created: a caller
    /// that asked for fresh statistics waits for it to change.
    pub generation: u64,
}

impl BalloonStats {
    pub(super) fn set(&mut self, tag: u16, val: u64) {
        use stat_tags::*;
        let slot = match tag {
            SWAP_IN => &mut self.swap_in,
            SWAP_OUT => &mut self.swap_out,
            MAJFLT => &mut self.major_faults,
            MINFLT => &mut self.minor_faults,
            MEMFREE => &mut self.free_memory,
            MEMTOT => &mut self.total_memory,
            AVAIL => &mut self.available_memory,
            CACHES => &mut self.disk_caches,
            HTLB_PGALLOC => &mut self.hugetlb_allocations,
            HTLB_PGFAIL => &mut self.hugetlb_failures,
            OOM_KILL => &mut self.oom_kills,
            ALLOC_STALL => &mut self.alloc_stalls,
            ASYNC_SCAN => &mut self.async_scans,
            DIRECT_SCAN => &mut self.direct_scans,
            ASYNC_RECLAIM => &mut self.async_reclaims,
            DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => {
                match self.other.iter_mut().find(|(t, _)| *t == tag) {
                    Some(e) => e.1 = val,
                    None => self.other.push((tag, val)),
                }
                return;
            }
        };
        *slot = Some(val);
    }
}
