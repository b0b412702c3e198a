//! Creating qcow2 images (version 3, any cluster size, optionally over a
//! backing file).

use std::path::Path;

use super::header::{self, NewHeader};
use crate::error::{Error, Result};
use crate::file::{DiskFile, HostFile};
use crate::Format;

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
pub(super) fn new_image_bytes(
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
