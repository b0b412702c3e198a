//! The qcow2 header: parsing with every check done at open time, and the
//! header of a new image.
//!
//! Layout (all numbers big-endian), from QEMU's docs/interop/qcow2.txt:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0-3 | magic `QFI\xfb` |
//! | 4-7 | version (2 or 3) |
//! | 8-15, 16-19 | backing file name offset, length |
//! | 20-23 | cluster_bits |
//! | 24-31 | virtual size |
//! | 32-35 | crypt_method |
//! | 36-39, 40-47 | L1 entries, L1 table offset |
//! | 48-55, 56-59 | refcount table offset, its length in clusters |
//! | 60-63, 64-71 | number of snapshots, snapshot table offset |
//! | 72-79 | incompatible features (v3) |
//! | 80-87 | compatible features (v3) |
//! | 88-95 | autoclear features (v3) |
//! | 96-99 | refcount_order (v3; v2 is always 4) |
//! | 100-103 | header_length (v3; v2 is 72) |
//! | 104 | compression type (if header_length > 104) |
//!
//! Header extensions follow the header (type u32, length u32, data padded
//! to 8 bytes) until type 0.

use std::path::Path;

use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

pub const V2_HEADER_LEN: usize = 72;
pub const V3_MIN_HEADER_LEN: usize = 104;
/// The header length vireo writes: with the compression type byte, like QEMU.
pub const V3_HEADER_LEN: usize = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU's limits, so a corrupt header cannot make vireo allocate gigabytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_BACKING_NAME: u32 = 1023;
pub const MAX_SNAPSHOTS: u32 = 65536;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of header fields vireo rewrites in place.
pub const OFF_REFTABLE_OFFSET: u64 = 48;
pub const OFF_AUTOCLEAR: u64 = 88;

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// What the header's first bytes must be read for: the cluster size.
pub fn cluster_bits_of(first: &[u8]) -> Option<u32> {
    (first.len() >= 24).then(|| be32(first, 20))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The name of an incompatible feature bit, from the image's own
    /// feature name table or the spec.
    pub fn incompatible_name(&self, bit: u8) -> String {
        if let Some(f) = self
            .feature_names
            .iter()
            .find(|f| f.kind == 0 && f.bit == bit)
        {
            return format!("\"{}\" (incompatible feature bit {bit})", f.name);
        }
        let known = match bit {
            0 => "dirty bit",
            1 => "corrupt bit",
            2 => "external data file",
            3 => "compression type",
            4 => "extended L2 entries",
            _ => return format!("unknown incompatible feature bit {bit}"),
        };
        format!("\"{known}\" (incompatible feature bit {bit})")
    }

    /// Parses and checks the header in `cluster0` (the image's first
    /// cluster, or as much of it as the file has) of a file `file_len`
    /// bytes long. Everything that can be checked without reading further
    /// metadata is checked here.
    pub fn parse(path: &Path, cluster0: &[u8], file_len: u64) -> Result<Header> {
        let corrupt = |d: String| Error::corrupt(path, d);
        if cluster0.len() < V2_HEADER_LEN {
            return Err(corrupt(format!(
                "the file is {} bytes, shorter than a qcow2 header ({V2_HEADER_LEN} bytes)",
                cluster0.len()
            )));
        }
        if cluster0[..4] != MAGIC {
            return Err(corrupt("no QFI\\xfb magic at offset 0".into()));
        }
        let version = be32(cluster0, 4);
        if version == 1 {
            return Err(Error::unsupported(
                path,
                "qcow version 1",
                "convert it with `qemu-img convert -O qcow2 OLD NEW`",
            ));
        }
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                path,
                format!("qcow2 version {version} (vireo reads versions 2 and 3)"),
                "convert it with `qemu-img convert -O qcow2 -o compat=1.1 OLD NEW`",
            ));
        }
        let cluster_bits = be32(cluster0, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits is {cluster_bits}; it must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS} \
                 (512-byte to 2-MiB clusters)"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(cluster0, 8),
            backing_file_size: be32(cluster0, 16),
            cluster_bits,
            size: be64(cluster0, 24),
            crypt_method: be32(cluster0, 32),
            l1_size: be32(cluster0, 36),
            l1_table_offset: be64(cluster0, 40),
            refcount_table_offset: be64(cluster0, 48),
            refcount_table_clusters: be32(cluster0, 56),
            nb_snapshots: be32(cluster0, 60),
            snapshots_offset: be64(cluster0, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
        };
        if version >= 3 {
            if cluster0.len() < V3_MIN_HEADER_LEN {
                return Err(corrupt(format!(
                    "the file is {} bytes, shorter than a version 3 header ({V3_MIN_HEADER_LEN} bytes)",
                    cluster0.len()
                )));
            }
            h.incompatible_features = be64(cluster0, 72);
            h.compatible_features = be64(cluster0, 80);
            h.autoclear_features = be64(cluster0, 88);
            h.refcount_order = be32(cluster0, 96);
            h.header_length = be32(cluster0, 100);
            let hl = u64::from(h.header_length);
            if hl < V3_MIN_HEADER_LEN as u64 || hl % 8 != 0 || hl > cs || hl > cluster0.len() as u64
            {
                return Err(corrupt(format!(
                    "header_length is {hl}; it must be a multiple of 8 from {V3_MIN_HEADER_LEN} to the \
                     cluster size ({cs}) and inside the file"
                )));
            }
            if hl > 104 {
                h.compression_type = cluster0[104];
            }
        }
        // Extensions come before the checks that name features, so the
        // image's own feature names can be used.
        h.parse_extensions(path, cluster0, cs)?;

        if h.crypt_method != 0 {
            let kind = match h.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(
                path,
                format!("encryption (crypt_method {} = {kind})", h.crypt_method),
                "decrypt it with `qemu-img convert --object secret,... -O qcow2 OLD NEW`",
            ));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order is {}; it must be 0 to 6 (1- to 64-bit refcounts)",
                h.refcount_order
            )));
        }
        // Incompatible features: the dirty and corrupt bits are decided by
        // the caller (they only forbid writing); all others are refused here.
        let known_ok = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        let refused = h.incompatible_features & !known_ok;
        if refused != 0 {
            let bit = refused.trailing_zeros() as u8;
            return Err(Error::unsupported(
                path,
                format!("the image's {}", h.incompatible_name(bit)),
                "convert it to a plain qcow2 image with `qemu-img convert -O qcow2 OLD NEW`",
            ));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 && h.compression_type != 0 {
            let name = if h.compression_type == 1 {
                "zstd"
            } else {
                "an unknown method"
            };
            return Err(Error::unsupported(
                path,
                format!(
                    "compression type {} ({name}; vireo reads deflate only)",
                    h.compression_type
                ),
                "recompress it with `qemu-img convert -O qcow2 -c -o compression_type=zlib OLD NEW`",
            ));
        }

        // Sizes and table positions.
        let l2_entries = cs / 8;
        let bytes_per_l1 = u128::from(cs) * u128::from(l2_entries);
        let l1_needed = u128::from(h.size).div_ceil(bytes_per_l1);
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "the L1 table has {} entries, more than the {} QEMU allows",
                h.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if u128::from(h.l1_size) < l1_needed {
            return Err(corrupt(format!(
                "the L1 table has {} entries, too few for the {}-byte virtual size (it needs {l1_needed})",
                h.l1_size, h.size
            )));
        }
        if h.size > i64::MAX as u64 {
            return Err(corrupt(format!("the virtual size {} is too large", h.size)));
        }
        if h.l1_size > 0 {
            check_table(
                path,
                "L1 table",
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
                cs,
                file_len,
            )?;
        }
        if h.refcount_table_clusters == 0 {
            return Err(corrupt("the refcount table has 0 clusters".into()));
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) << cluster_bits;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "the refcount table is {} clusters ({reftable_bytes} bytes), more than the {} bytes \
                 QEMU allows",
                h.refcount_table_clusters, MAX_REFTABLE_BYTES
            )));
        }
        check_table(
            path,
            "refcount table",
            h.refcount_table_offset,
            reftable_bytes,
            cs,
            file_len,
        )?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "it claims {} internal snapshots, more than the {MAX_SNAPSHOTS} allowed",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 {
            check_table(path, "snapshot table", h.snapshots_offset, 1, cs, file_len)?;
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, cluster0: &[u8], cs: u64) -> Result<()> {
        let corrupt = |d: String| Error::corrupt(path, d);
        // The backing file name lives in the first cluster.
        if self.backing_file_offset != 0 {
            let end = self
                .backing_file_offset
                .checked_add(u64::from(self.backing_file_size));
            if self.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "the backing file name is {} bytes long, more than {MAX_BACKING_NAME}",
                    self.backing_file_size
                )));
            }
            match end {
                Some(end) if end <= cs && end <= cluster0.len() as u64 => {
                    let bytes = &cluster0[self.backing_file_offset as usize..end as usize];
                    let name = std::str::from_utf8(bytes).map_err(|_| {
                        Error::unsupported(
                            path,
                            "a backing file name that is not UTF-8",
                            "rename the backing file and point the image at it with `qemu-img rebase -u -b NEW`",
                        )
                    })?;
                    if !name.is_empty() {
                        self.backing_file = Some(name.to_string());
                    }
                }
                _ => {
                    return Err(corrupt(format!(
                    "the backing file name ({} bytes at offset {}) is not inside the first cluster",
                    self.backing_file_size, self.backing_file_offset
                )))
                }
            }
        }
        let mut off = self.header_length as usize;
        let limit = (cs as usize).min(cluster0.len());
        loop {
            if off + 8 > limit {
                // Version 2 images may end right after the header; a missing
                // end marker at the end of the cluster is tolerated like QEMU does.
                if self.version == 2 || off >= limit {
                    return Ok(());
                }
                return Err(corrupt(format!(
                    "header extension at offset {off} runs past the first cluster"
                )));
            }
            let kind = be32(cluster0, off);
            let len = be32(cluster0, off + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start.checked_add(len).filter(|&e| e <= limit).ok_or_else(|| {
                corrupt(format!(
                    "header extension 0x{kind:08x} at offset {off} ({len} bytes) runs past the first cluster"
                ))
            })?;
            let data = &cluster0[data_start..data_end];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| corrupt("the backing format name is not UTF-8".into()))?;
                    let name = name.trim_end_matches('\0');
                    self.backing_format = Some(name.to_string());
                }
                EXT_FEATURE_TABLE => {
                    if len % 48 != 0 {
                        return Err(corrupt(format!(
                            "the feature name table is {len} bytes, not a multiple of 48"
                        )));
                    }
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..];
                        let end = name_bytes
                            .iter()
                            .position(|&b| b == 0)
                            .unwrap_or(name_bytes.len());
                        self.feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
                        });
                    }
                }
                // Known and not needed to read or write the image: bitmaps are
                // invalidated through the autoclear bit when writing; crypto and
                // external data files are refused through their header fields.
                EXT_BITMAPS | EXT_CRYPTO | EXT_DATA_FILE => {}
                _ => {
                    tracing::debug!(
                        "{}: ignoring unknown header extension 0x{kind:08x}",
                        path.display()
                    );
                }
            }
            off = data_start + len.div_ceil(8) * 8;
        }
    }
}

/// Checks that a table of `len` bytes at `offset` is cluster aligned, not in
/// the header cluster and inside the file.
fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if offset % cs != 0 {
        return Err(Error::corrupt(
            path,
            format!("the {what} offset 0x{offset:x} is not aligned to the {cs}-byte cluster size"),
        ));
    }
    if offset == 0 {
        return Err(Error::corrupt(
            path,
            format!("the {what} offset is 0 (the header's cluster)"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            path,
            format!(
                "the {what} ({len} bytes at offset 0x{offset:x}) reaches past the end of the \
                 {file_len}-byte file (truncated image?)"
            ),
        )),
    }
}

/// The header of a new version 3 image: refcount_order 4, no features.
pub struct NewHeader<'a> {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub backing: Option<(&'a str, &'a str)>,
}

impl NewHeader<'_> {
    /// The header, the backing format extension, the end marker and the
    /// backing file name; None when they do not fit in one cluster.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; V3_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
        if let Some((name, format)) = self.backing {
            let f = format.as_bytes();
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(f.len() as u32).to_be_bytes());
            b.extend_from_slice(f);
            b.resize(b.len().div_ceil(8) * 8, 0);
            b.extend_from_slice(&[0u8; 8]); // end of extensions
            let offset = b.len() as u64;
            b[8..16].copy_from_slice(&offset.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        } else {
            b.extend_from_slice(&[0u8; 8]);
        }
        (b.len() as u64 <= 1u64 << self.cluster_bits).then_some(b)
    }
}
