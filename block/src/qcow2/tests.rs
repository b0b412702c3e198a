//! Unit tests of the qcow2 layer on in-memory images.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::create::new_image_bytes;
use super::mapping::{Cluster, OFFSET_MASK};
use super::refcount::{refcount_get, refcount_set};
use super::*;
use crate::raw::Raw;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn new_bytes(size: u64, cs: u64) -> Vec<u8> {
    new_image_bytes(Path::new("<memory>"), size, cs, None).expect("new image")
}

fn open_mem(file: &MemFile, read_only: bool) -> Result<Qcow2> {
    Qcow2::open(Box::new(file.clone()), read_only, &mut |_, _| Ok(None))
}

fn open_with_backing(file: &MemFile, backing: &MemFile) -> Result<Qcow2> {
    let b = backing.clone();
    Qcow2::open(Box::new(file.clone()), false, &mut move |_, _| {
        Ok(Some(
            Box::new(Raw::open(Box::new(b.clone()), true)?) as Box<dyn DiskImage>
        ))
    })
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], off: u64) -> u64 {
    be64(&b[off as usize..])
}

/// A tiny xorshift generator: deterministic test data without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// What `qemu-img check` would say about refcounts, in short: clusters
/// in use whose refcount is too low (errors) and clusters whose refcount is
/// too high (leaks).
#[derive(Debug, Default)]
struct Check {
    errors: Vec<String>,
    leaks: usize,
}

fn check(bytes: &[u8]) -> Check {
    let mut img = Qcow2::open_bytes(bytes).expect("image opens for checking");
    let cs = img.cs;
    let mut want: HashMap<u64, u64> = HashMap::new();
    let mut add = |start: u64, len: u64| {
        let mut c = start & !(cs - 1);
        while c < start + len {
            *want.entry(c).or_default() += 1;
            c += cs;
        }
    };
    add(0, cs);
    add(
        img.header.l1_table_offset,
        u64::from(img.header.l1_size) * 8,
    );
    add(img.reftable_offset, img.reftable_clusters * cs);
    for &b in img.reftable.iter().filter(|&&b| b != 0) {
        add(b, cs);
    }
    let file_len = bytes.len() as u64;
    for l1e in img.l1.clone() {
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        add(l2, cs);
        let table = img.read_l2(l2).expect("L2 table reads");
        for chunk in table.chunks_exact(8) {
            match img.classify(be64(chunk), file_len).expect("valid L2 entry") {
                Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                    add(host, cs)
                }
                Cluster::Compressed { host, len } => add(host & !511, len + (host & 511)),
                _ => {}
            }
        }
    }
    let mut result = Check::default();
    let last = file_len
        .div_ceil(cs)
        .max(want.keys().max().map_or(0, |m| m / cs + 1));
    for c in 0..last {
        let host = c * cs;
        let have = img.refcount(host).expect("refcount reads");
        let need = want.get(&host).copied().unwrap_or(0);
        if have < need {
            result.errors.push(format!(
                "cluster 0x{host:x}: refcount {have}, {need} references"
            ));
        } else if have > need {
            result.leaks += 1;
        }
    }
    result
}

fn assert_clean(bytes: &[u8]) {
    let c = check(bytes);
    assert!(c.errors.is_empty(), "refcount errors: {:?}", c.errors);
    assert_eq!(c.leaks, 0, "leaked clusters");
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

// ---- header validation ----

/// Opens `bytes` (a fresh 1-MiB, 64-KiB-cluster image with one field
/// changed by `patch`) and returns the error text.
fn open_patched(patch: impl FnOnce(&mut Vec<u8>), read_only: bool) -> Result<Qcow2> {
    let mut bytes = new_bytes(MIB, 64 * KIB);
    patch(&mut bytes);
    open_mem(&MemFile::new(bytes), read_only)
}

#[test]
fn fresh_image_opens_and_is_clean() {
    let bytes = new_bytes(10 * MIB, 64 * KIB);
    assert_clean(&bytes);
    let img = open_mem(&MemFile::new(bytes), false).expect("opens");
    assert_eq!(img.size(), 10 * MIB);
    assert_eq!(img.header.version, 3);
}

#[test]
fn each_corrupt_header_field_is_refused_by_name() {
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, &str)> = vec![
        ("magic", Box::new(|b| b[3] = 0), "no QFI"),
        (
            "version 1",
            Box::new(|b| put32(b, 4, 1)),
            "qcow version 1 is not supported",
        ),
        ("version 4", Box::new(|b| put32(b, 4, 4)), "qcow2 version 4"),
        (
            "cluster_bits 8",
            Box::new(|b| put32(b, 20, 8)),
            "cluster_bits is 8",
        ),
        (
            "cluster_bits 22",
            Box::new(|b| put32(b, 20, 22)),
            "cluster_bits is 22",
        ),
        (
            "size vs L1",
            Box::new(|b| put64(b, 24, 1 << 40)),
            "too few for the",
        ),
        (
            "L1 unaligned",
            Box::new(|b| put64(b, 40, 64 * KIB + 8)),
            "L1 table offset 0x10008 is not aligned",
        ),
        (
            "L1 past end",
            Box::new(|b| put64(b, 40, 64 * MIB)),
            "L1 table (8 bytes at offset 0x4000000) reaches past the end",
        ),
        (
            "L1 at 0",
            Box::new(|b| put64(b, 40, 0)),
            "L1 table offset is 0",
        ),
        (
            "L1 huge",
            Box::new(|b| put32(b, 36, u32::MAX)),
            "more than the 4194304 QEMU allows",
        ),
        (
            "reftable unaligned",
            Box::new(|b| put64(b, 48, 0x20200)),
            "refcount table offset 0x20200 is not aligned",
        ),
        (
            "reftable past end",
            Box::new(|b| put64(b, 48, 0x100000)),
            "refcount table (65536 bytes at offset 0x100000) reaches past",
        ),
        (
            "reftable 0 clusters",
            Box::new(|b| put32(b, 56, 0)),
            "refcount table has 0 clusters",
        ),
        (
            "reftable huge",
            Box::new(|b| put32(b, 56, 1000)),
            "more than the 8388608 bytes",
        ),
        (
            "crypt_method",
            Box::new(|b| put32(b, 32, 2)),
            "encryption (crypt_method 2 = LUKS) is not supported",
        ),
        (
            "external data file",
            Box::new(|b| put64(b, 72, 1 << 2)),
            "\"external data file\" (incompatible feature bit 2)",
        ),
        (
            "extended L2",
            Box::new(|b| put64(b, 72, 1 << 4)),
            "\"extended L2 entries\" (incompatible feature bit 4)",
        ),
        (
            "unknown feature",
            Box::new(|b| put64(b, 72, 1 << 40)),
            "unknown incompatible feature bit 40",
        ),
        (
            "zstd",
            Box::new(|b| {
                put64(b, 72, 1 << 3);
                b[104] = 1;
            }),
            "compression type 1 (zstd",
        ),
        (
            "refcount_order",
            Box::new(|b| put32(b, 96, 7)),
            "refcount_order is 7",
        ),
        (
            "header_length small",
            Box::new(|b| put32(b, 100, 96)),
            "header_length is 96",
        ),
        (
            "header_length odd",
            Box::new(|b| put32(b, 100, 108)),
            "header_length is 108",
        ),
        (
            "backing name long",
            Box::new(|b| {
                put64(b, 8, 512);
                put32(b, 16, 2000);
            }),
            "backing file name is 2000 bytes long",
        ),
        (
            "backing name outside",
            Box::new(|b| {
                put64(b, 8, 65530);
                put32(b, 16, 100);
            }),
            "not inside the first cluster",
        ),
        (
            "extension overflow",
            Box::new(|b| {
                put32(b, 112, 0x1234_5678);
                put32(b, 116, 70000);
            }),
            "header extension 0x12345678 at offset 112 (70000 bytes) runs past",
        ),
        (
            "feature table length",
            Box::new(|b| {
                put32(b, 112, header::EXT_FEATURE_TABLE);
                put32(b, 116, 47);
            }),
            "feature name table is 47 bytes",
        ),
        (
            "snapshot table",
            Box::new(|b| {
                put32(b, 60, 1);
                put64(b, 64, 0x1234);
            }),
            "snapshot table offset 0x1234 is not aligned",
        ),
        (
            "truncated",
            Box::new(|b| b.truncate(50)),
            "shorter than a qcow2 header",
        ),
        (
            "truncated tables",
            Box::new(|b| b.truncate(64 * 1024 + 100)),
            "reaches past the end",
        ),
    ];
    for (name, patch, want) in cases {
        let text = err_text(open_patched(|b| patch(b), true));
        assert!(
            text.contains(want),
            "{name}: {text:?} does not contain {want:?}"
        );
        assert!(
            text.starts_with("<memory>: "),
            "{name}: message names the file: {text}"
        );
    }
}

#[test]
fn unknown_feature_is_named_from_the_image_feature_table() {
    let text = err_text(open_patched(
        |b| {
            put64(b, 72, 1 << 9);
            put32(b, 112, header::EXT_FEATURE_TABLE);
            put32(b, 116, 48);
            b[120] = 0;
            b[121] = 9;
            b[122..122 + 11].copy_from_slice(b"time travel");
        },
        true,
    ));
    assert!(
        text.contains("\"time travel\" (incompatible feature bit 9)"),
        "{text}"
    );
    assert!(text.contains("qemu-img convert"), "{text}");
}

#[test]
fn dirty_and_corrupt_bits_refuse_writing_but_not_reading() {
    for (bit, name) in [(0, "dirty bit"), (1, "corrupt bit")] {
        let set = |b: &mut Vec<u8>| put64(b, 72, 1 << bit);
        assert!(
            open_patched(set, true).is_ok(),
            "{name}: read-only open works"
        );
        let text = err_text(open_patched(set, false));
        assert!(text.contains(name), "{text}");
        assert!(text.contains("qemu-img check -r all <memory>"), "{text}");
    }
}

#[test]
fn snapshots_refuse_writing() {
    let mut bytes = new_bytes(MIB, 64 * KIB);
    let len = bytes.len() as u64;
    put32(&mut bytes, 60, 1);
    put64(&mut bytes, 64, len);
    bytes.resize(bytes.len() + 64 * 1024, 0);
    let file = MemFile::new(bytes);
    assert!(open_mem(&file, true).is_ok());
    let text = err_text(open_mem(&file, false));
    assert!(text.contains("internal snapshots"), "{text}");
}

#[test]
fn autoclear_bits_are_cleared_when_opened_writable() {
    let mut bytes = new_bytes(MIB, 64 * KIB);
    put64(&mut bytes, 88, 1);
    let file = MemFile::new(bytes);
    drop(open_mem(&file, true).expect("opens"));
    assert_eq!(
        get64(&file.bytes(), 88),
        1,
        "read-only open changes nothing"
    );
    drop(open_mem(&file, false).expect("opens"));
    assert_eq!(get64(&file.bytes(), 88), 0);
}

#[test]
fn creation_limits() {
    let p = Path::new("x");
    assert!(new_image_bytes(p, MIB, 1000, None).is_err());
    assert!(new_image_bytes(p, MIB, 256, None).is_err());
    assert!(new_image_bytes(p, MIB, 4 * MIB, None).is_err());
    let text = err_text(new_image_bytes(p, 1 << 50, 512, None));
    assert!(text.contains("larger cluster size"), "{text}");
    let long = "b".repeat(600);
    let text = err_text(new_image_bytes(p, MIB, 512, Some((&long, Format::Raw))));
    assert!(
        text.contains("do not fit in one 512-byte cluster"),
        "{text}"
    );
    // Sizes round up to sectors, like qemu-img.
    let img = Qcow2::open_bytes(&new_bytes(1000, 512)).expect("opens");
    assert_eq!(img.size(), 1024);
    // A big image with small clusters needs several refcount blocks and a
    // multi-cluster refcount table from the start.
    let bytes = new_bytes(20 << 30, 512);
    assert_clean(&bytes);
}

// ---- L1 / L2 validation ----

/// An image with one cluster written at guest offset 0, flushed.
fn image_with_one_cluster(cs: u64) -> (MemFile, u64, u64) {
    let file = MemFile::new(new_bytes(MIB, cs));
    let mut img = open_mem(&file, false).expect("opens");
    img.write_at(&vec![0xab; cs as usize], 0).expect("writes");
    img.flush().expect("flushes");
    let l2 = img.l1[0] & OFFSET_MASK;
    let data = img.l2_get(l2, 0) & OFFSET_MASK;
    drop(img);
    (file, l2, data)
}

fn patch_and_read(file: &MemFile, at: u64, value: u64) -> String {
    let mut bytes = file.bytes();
    put64(&mut bytes, at as usize, value);
    let r = open_mem(&MemFile::new(bytes), true).and_then(|mut img| {
        let mut buf = [0u8; 512];
        img.read_at(&mut buf, 0)
    });
    err_text(r)
}

#[test]
fn corrupt_l1_entries_are_refused() {
    let (file, l2, _) = image_with_one_cluster(512);
    let l1_off = get64(&file.bytes(), 40);
    let cases = [
        (l2 | 1, "has reserved bits set"),
        (l2 | (1 << 60), "has reserved bits set"),
        (l2 + 0x200 * 3 + (1 << 63), "past the end"),
        ((1 << 40) | (1 << 63), "past the end"),
        (
            l1_off | (1 << 63),
            "inside the header, L1 or refcount table",
        ),
    ];
    for (entry, want) in cases {
        let text = patch_and_read(&file, l1_off, entry);
        assert!(text.contains("L1 entry 0"), "{text}");
        assert!(text.contains(want), "0x{entry:x}: {text}");
    }
    let (file, l2, _) = image_with_one_cluster(4096);
    let text = patch_and_read(&file, get64(&file.bytes(), 40), (l2 + 512) | (1 << 63));
    assert!(text.contains("not aligned"), "{text}");
}

#[test]
fn corrupt_l2_entries_are_refused() {
    let (file, l2, data) = image_with_one_cluster(4096);
    let l1_off = get64(&file.bytes(), 40);
    let cases = [
        (data | (1 << 63) | 2, "has reserved bits set"),
        (data | (1 << 63) | (1 << 57), "has reserved bits set"),
        (
            (data + 512) | (1 << 63),
            "not aligned to the 4096-byte cluster size",
        ),
        ((1u64 << 45) | (1 << 63), "past the end"),
        (l1_off | (1 << 63), "which holds image metadata"),
        (l2 | (1 << 63), "which holds image metadata"),
        (
            (1 << 62) | (1 << 63) | data,
            "compressed and has the copied flag set",
        ),
        ((1 << 62) | (1u64 << 40), "outside the"),
        ((1 << 62) | 100, "inside the header"),
    ];
    for (entry, want) in cases {
        let text = patch_and_read(&file, l2, entry);
        assert!(text.contains("entry 0 ("), "{text}");
        assert!(text.contains(&format!("L2 table at 0x{l2:x}")), "{text}");
        assert!(text.contains(want), "0x{entry:x}: {text}");
        assert!(text.contains("qemu-img check -r all"), "{text}");
    }
}

#[test]
fn version_2_images_cannot_have_zero_clusters() {
    let (file, l2, data) = image_with_one_cluster(4096);
    let mut bytes = file.bytes();
    put32(&mut bytes, 4, 2);
    put64(&mut bytes, l2 as usize, data | 1);
    let text = err_text(open_mem(&MemFile::new(bytes), true).and_then(|mut img| {
        let mut buf = [0u8; 16];
        img.read_at(&mut buf, 0)
    }));
    assert!(text.contains("version 2 images cannot have"), "{text}");
}

// ---- refcounts ----

#[test]
fn refcount_entries_of_every_width_round_trip() {
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let mut block = vec![0u8; 512];
        let n = 512 * 8 / u64::from(bits);
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        for i in 0..n {
            refcount_set(&mut block, bits, i, (i * 7 + 1) & max);
        }
        for i in 0..n {
            assert_eq!(
                refcount_get(&block, bits, i),
                (i * 7 + 1) & max,
                "bits {bits} index {i}"
            );
        }
    }
    // 16-bit entries are big-endian; 1-bit entries pack from the low bit.
    let mut block = vec![0u8; 8];
    refcount_set(&mut block, 16, 1, 0x0102);
    assert_eq!(&block[2..4], &[1, 2]);
    let mut block = vec![0u8; 1];
    refcount_set(&mut block, 1, 2, 1);
    assert_eq!(block[0], 0b100);
}

#[test]
fn allocation_crosses_refcount_blocks_and_grows_the_refcount_table() {
    // 512-byte clusters with 16-bit refcounts: 256 clusters per refcount
    // block and 64 blocks per refcount table cluster, so 8 MiB of
    // allocations need new blocks many times and a second table cluster.
    let size = 12 * MIB;
    let file = MemFile::new(new_bytes(size, 512));
    let mut img = open_mem(&file, false).expect("opens");
    let reftable_before = img.reftable_offset;
    let mut rng = Rng(7);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data);
    for (i, chunk) in data.chunks(64 * 1024).enumerate() {
        img.write_at(chunk, i as u64 * 64 * 1024).expect("writes");
    }
    assert_ne!(
        img.reftable_offset, reftable_before,
        "the refcount table moved"
    );
    assert!(img.reftable_clusters >= 2);
    img.flush().expect("flushes");
    drop(img);
    assert_clean(&file.bytes());
    let mut img = open_mem(&file, true).expect("reopens");
    let mut back = vec![0u8; size as usize];
    img.read_at(&mut back, 0).expect("reads");
    assert!(back == data, "data survives the reopen");
    assert_eq!(img.header.refcount_table_offset, img.reftable_offset);
}

#[test]
fn allocation_works_with_one_bit_refcounts() {
    // Patch a fresh image to 1-bit refcounts: rewrite its refcount blocks.
    let cs = 512u64;
    let mut bytes = new_bytes(4 * MIB, cs);
    let img = Qcow2::open_bytes(&bytes).expect("opens");
    let blocks: Vec<u64> = img.reftable.iter().copied().filter(|&b| b != 0).collect();
    let clusters = bytes.len() as u64 / cs;
    drop(img);
    put32(&mut bytes, 96, 0);
    for &b in &blocks {
        bytes[b as usize..(b + cs) as usize].fill(0);
    }
    // 4096 one-bit entries per block: the first block covers everything.
    for c in 0..clusters {
        let b = blocks[0] as usize;
        bytes[b + (c / 8) as usize] |= 1 << (c % 8);
    }
    assert_clean(&bytes);
    let file = MemFile::new(bytes);
    let mut img = open_mem(&file, false).expect("opens");
    let mut rng = Rng(99);
    let mut buf = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut buf);
    img.write_at(&buf, 100).expect("writes");
    img.flush().expect("flushes");
    drop(img);
    assert_clean(&file.bytes());
}

// ---- backing files, zero and compressed clusters ----

#[test]
fn copy_on_write_over_a_backing_file() {
    let cs = 4096u64;
    let mut base = vec![0u8; 64 * 1024];
    Rng(3).fill(&mut base);
    let backing = MemFile::new(base.clone());
    // The overlay is bigger than its backing file: the rest reads zeros.
    let file = MemFile::new(
        new_image_bytes(
            Path::new("o"),
            128 * 1024,
            cs,
            Some(("base.raw", Format::Raw)),
        )
        .expect("new"),
    );
    let mut img = open_with_backing(&file, &backing).expect("opens");
    assert_eq!(img.header.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(img.header.backing_format.as_deref(), Some("raw"));

    let mut model = base.clone();
    model.resize(128 * 1024, 0);
    let mut all = vec![0u8; model.len()];
    img.read_at(&mut all, 0).expect("reads");
    assert!(
        all == model,
        "unallocated clusters read from the backing file"
    );

    // A partial write copies the rest of the cluster from the backing file.
    img.write_at(&[1, 2, 3], 4096 + 100).expect("writes");
    model[4196..4199].copy_from_slice(&[1, 2, 3]);
    // Across a cluster boundary and past the backing file's end.
    img.write_at(&[9; 300], 64 * 1024 - 100).expect("writes");
    model[64 * 1024 - 100..64 * 1024 + 200].fill(9);
    // Zeroes over backing data need the zero flag; discard too.
    img.write_zeroes(8192, 8192 + 10).expect("zeroes");
    model[8192..16384 + 10].fill(0);
    img.read_at(&mut all, 0).expect("reads");
    assert!(all == model, "reads see writes over the backing data");
    img.flush().expect("flushes");
    drop(img);
    assert_eq!(backing.bytes(), base, "the backing file is never written");
    assert_clean(&file.bytes());
    let mut img = open_with_backing(&file, &backing).expect("reopens");
    img.read_at(&mut all, 0).expect("reads");
    assert!(all == model, "after reopening");
    let (c, _) = img.cluster_at(8192).expect("entry");
    assert_eq!(
        c,
        Cluster::Zero {
            host: 0,
            copied: false
        }
    );
}

/// An image whose guest cluster 0 is compressed (deflate of `content`),
/// stored at the start of a host cluster with refcount 1.
fn image_with_compressed_cluster(content: &[u8], at_inner: u64) -> (MemFile, u64) {
    let cs = content.len() as u64;
    let (file, l2, data) = image_with_one_cluster(cs);
    let mut c = flate2::Compress::new(flate2::Compression::best(), false);
    let mut out = vec![0u8; cs as usize * 2];
    c.compress(content, &mut out, flate2::FlushCompress::Finish)
        .expect("compresses");
    let n = c.total_out();
    assert!(n + at_inner < cs, "compressible test content");
    let host = data + at_inner;
    let mut bytes = file.bytes();
    bytes[host as usize..(host + n) as usize].copy_from_slice(&out[..n as usize]);
    let cluster_bits = cs.trailing_zeros();
    let x = 62 - (cluster_bits - 8);
    let sectors = (host + n).div_ceil(512) - host / 512;
    put64(
        &mut bytes,
        l2 as usize,
        (1 << 62) | ((sectors - 1) << x) | host,
    );
    (MemFile::new(bytes), host)
}

#[test]
fn compressed_clusters_read_and_are_rewritten_on_write() {
    let cs = 4096usize;
    let content: Vec<u8> = (0..cs).map(|i| (i / 100) as u8).collect();
    let (file, host) = image_with_compressed_cluster(&content, 100);
    assert_clean(&file.bytes());
    let mut img = open_mem(&file, false).expect("opens");
    assert!(matches!(
        img.cluster_at(0).expect("entry").0,
        Cluster::Compressed { .. }
    ));
    let mut buf = vec![0u8; cs];
    img.read_at(&mut buf, 0).expect("reads");
    assert!(buf == content, "inflates");
    let mut part = [0u8; 10];
    img.read_at(&mut part, 1000).expect("reads");
    assert_eq!(&part[..], &content[1000..1010]);

    // A write goes to a new cluster holding the decompressed data; the
    // compressed cluster's refcount drops.
    img.write_at(&[0xee; 5], 2000).expect("writes");
    let mut model = content.clone();
    model[2000..2005].fill(0xee);
    img.read_at(&mut buf, 0).expect("reads");
    assert!(buf == model);
    assert!(matches!(
        img.cluster_at(0).expect("entry").0,
        Cluster::Normal { .. }
    ));
    img.flush().expect("flushes");
    assert_eq!(img.refcount(host).expect("refcount"), 0);
    drop(img);
    assert_clean(&file.bytes());
}

#[test]
fn broken_compressed_data_is_an_error() {
    let cs = 4096usize;
    let content: Vec<u8> = (0..cs).map(|i| (i / 100) as u8).collect();
    let (file, host) = image_with_compressed_cluster(&content, 0);
    let mut bytes = file.bytes();
    bytes[host as usize..host as usize + 16].fill(0xff);
    let mut img = open_mem(&MemFile::new(bytes), true).expect("opens");
    let mut buf = vec![0u8; cs];
    let text = err_text(img.read_at(&mut buf, 0));
    assert!(
        text.contains("does not inflate") || text.contains("inflates to"),
        "{text}"
    );
}

#[test]
fn discard_and_write_zeroes_free_clusters() {
    let file = MemFile::new(new_bytes(MIB, 4096));
    let mut img = open_mem(&file, false).expect("opens");
    img.write_at(&vec![7u8; 64 * 1024], 0).expect("writes");
    img.flush().expect("flushes");
    let host = img.l2_get(img.l1[0] & OFFSET_MASK, 2) & OFFSET_MASK;
    img.discard(8192 - 1, 4096 * 3).expect("discards");
    img.write_zeroes(40000, 10000).expect("zeroes");
    let mut buf = vec![0u8; 64 * 1024];
    img.read_at(&mut buf, 0).expect("reads");
    let mut model = vec![7u8; 64 * 1024];
    // Discard drops whole clusters only (2 and 3); without a backing file
    // they read zeros.
    model[8192..16384].fill(0);
    model[40000..50000].fill(0);
    assert!(buf == model);
    img.flush().expect("flushes");
    assert_eq!(img.refcount(host).expect("refcount"), 0);
    drop(img);
    assert_clean(&file.bytes());
}

// ---- ordering under crashes ----

/// A host file that silently drops every write after the first `budget`
/// (the process died there).
struct Crashing {
    inner: MemFile,
    budget: Arc<AtomicUsize>,
}

impl HostFile for Crashing {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(Error::invalid(self.inner.path(), "crashed"));
        }
        self.budget.store(left - 1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        self.inner.punch_hole(offset, len)
    }
}

/// Runs the crash workload on a copy of `base` whose host file accepts
/// only `budget` writes; returns the bytes left behind, whether the
/// workload finished, and the write count after each step.
fn crash_run(base: &[u8], budget: usize, payload: &[u8]) -> (Vec<u8>, bool, Vec<usize>) {
    let mem = MemFile::new(base.to_vec());
    let left = Arc::new(AtomicUsize::new(budget));
    let host = Crashing {
        inner: mem.clone(),
        budget: left.clone(),
    };
    let mut marks = Vec::new();
    let used = |left: &Arc<AtomicUsize>| budget - left.load(Ordering::SeqCst);
    let result = Qcow2::open(Box::new(host), false, &mut |_, _| Ok(None)).and_then(|mut img| {
        // New data: new L2 tables, refcount blocks and a bigger refcount table.
        img.write_at(payload, CRASH_BASE_DATA)?;
        marks.push(used(&left));
        // Drop flushed clusters, then overwrite flushed data in place.
        img.discard(0, 64 * 1024)?;
        marks.push(used(&left));
        img.flush()?;
        marks.push(used(&left));
        img.write_at(&[5u8; 700], 100 * 1024 + 100)?;
        img.write_zeroes(200 * 1024, 3000)?;
        marks.push(used(&left));
        img.flush()?;
        marks.push(used(&left));
        Ok(())
    });
    (mem.bytes(), result.is_ok(), marks)
}

/// Guest bytes of flushed data in the crash test's base image.
const CRASH_BASE_DATA: u64 = 7680 * 1024;

#[test]
fn a_crash_at_any_write_leaves_only_leaks() {
    // Base: 512-byte clusters, flushed data filling the host file to just
    // below the 8 MiB that one refcount table cluster covers.
    let cs = 512u64;
    let base_file = MemFile::new(new_bytes(16 * MIB, cs));
    let mut base_data = vec![0u8; CRASH_BASE_DATA as usize];
    Rng(11).fill(&mut base_data);
    {
        let mut img = open_mem(&base_file, false).expect("opens");
        img.write_at(&base_data, 0).expect("writes");
        img.flush().expect("flushes");
        assert_eq!(img.reftable_clusters, 1);
    }
    let base = base_file.bytes();
    let mut payload = vec![0u8; 400 * 1024];
    Rng(12).fill(&mut payload);

    let (done, finished, marks) = crash_run(&base, usize::MAX / 2, &payload);
    assert!(finished);
    assert_clean(&done);
    assert!(
        Qcow2::open_bytes(&done).expect("opens").reftable_clusters > 1,
        "the refcount table grew"
    );
    let total = marks[4];
    // Every write of the metadata phases, and a sample of the data writes.
    let mut points: Vec<usize> = (0..total)
        .filter(|&i| i < marks[0] && i % 150 == 0)
        .collect();
    points.extend(marks[0]..=total);
    let intact = |bytes: &[u8], budget: usize| {
        let mut img = open_mem(&MemFile::new(bytes.to_vec()), true).expect("reopens");
        let mut buf = vec![0u8; CRASH_BASE_DATA as usize];
        img.read_at(&mut buf, 0).expect("reads");
        // Discarded: old data or zeros. Rewritten: old or new.
        // Cluster by cluster: a crash may land between two clusters' updates.
        let either = |range: std::ops::Range<usize>, new: u8| {
            let mut at = range.start;
            while at < range.end {
                let end = ((at / 512 + 1) * 512).min(range.end);
                if buf[at..end] != base_data[at..end] && buf[at..end].iter().any(|&b| b != new) {
                    return false;
                }
                at = end;
            }
            true
        };
        let rewritten = 100 * 1024 + 100..100 * 1024 + 800;
        let zeroed = 200 * 1024..200 * 1024 + 3000;
        assert!(
            either(0..64 * 1024, 0)
                && buf[64 * 1024..rewritten.start] == base_data[64 * 1024..rewritten.start]
                && either(rewritten.clone(), 5)
                && buf[rewritten.end..zeroed.start] == base_data[rewritten.end..zeroed.start]
                && either(zeroed.clone(), 0)
                && buf[zeroed.end..] == base_data[zeroed.end..],
            "crash after {budget} writes: flushed data is damaged"
        );
    };
    eprintln!("{} crash points of {total} writes", points.len());
    for budget in points {
        let (bytes, finished, _) = crash_run(&base, budget, &payload);
        assert_eq!(finished, budget >= total);
        let c = check(&bytes);
        assert!(
            c.errors.is_empty(),
            "crash after {budget} of {total} writes: {:?}",
            c.errors
        );
        intact(&bytes, budget);
    }
}

// ---- random workload against a model ----

#[test]
fn random_io_matches_a_model() {
    let cs = 512u64;
    let size = 3 * MIB + 1536;
    let mut base = vec![0u8; (2 * MIB) as usize];
    Rng(5).fill(&mut base);
    let backing = MemFile::new(base.clone());
    let file = MemFile::new(
        new_image_bytes(Path::new("o"), size, cs, Some(("b", Format::Raw))).expect("new"),
    );
    let mut model = base.clone();
    model.resize(size as usize, 0);
    let mut rng = Rng(0x5eed);
    let mut img = open_with_backing(&file, &backing).expect("opens");
    for round in 0..600 {
        let max = if rng.below(4) == 0 { 20000 } else { 1500 };
        let len = 1 + rng.below(max);
        let off = rng.below(size - len + 1);
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0..=4 => {
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                img.write_at(&buf, off).expect("writes");
                model[o..o + l].copy_from_slice(&buf);
            }
            5 => {
                img.write_zeroes(off, len).expect("zeroes");
                model[o..o + l].fill(0);
            }
            6 => {
                // Discarded ranges read unspecified data: zero them in both.
                img.discard(off, len).expect("discards");
                img.write_zeroes(off, len).expect("zeroes");
                model[o..o + l].fill(0);
            }
            7 if round % 50 == 7 => {
                img.flush().expect("flushes");
                drop(img);
                assert!(check(&file.bytes()).errors.is_empty());
                img = open_with_backing(&file, &backing).expect("reopens");
            }
            _ => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off).expect("reads");
                assert!(
                    buf[..] == model[o..o + l],
                    "round {round}: read of {len} at {off}"
                );
            }
        }
    }
    img.flush().expect("flushes");
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).expect("reads");
    assert!(all == model);
    drop(img);
    assert_clean(&file.bytes());
}

#[test]
fn out_of_bounds_and_read_only_are_errors() {
    let file = MemFile::new(new_bytes(MIB, 4096));
    let len_before = file.bytes().len();
    let mut img = open_mem(&file, false).expect("opens");
    let text = err_text(img.write_at(&[1; 10], MIB - 5));
    assert!(
        text.contains("past the end of the 1048576-byte disk"),
        "{text}"
    );
    assert!(img.read_at(&mut [0; 1], MIB).is_err());
    assert!(img.write_at(&[1], u64::MAX).is_err());
    assert!(img.discard(MIB, 1).is_err());
    drop(img);
    assert_eq!(file.bytes().len(), len_before, "nothing written");
    let mut img = open_mem(&file, true).expect("opens");
    assert!(err_text(img.write_at(&[1], 0)).contains("read-only"));
}

#[test]
fn fuzz_entry_point_survives_mangled_images() {
    // A quick, deterministic stand-in for the fuzzer: random byte flips in
    // an image with data, an L2 table and a compressed cluster.
    let content: Vec<u8> = (0..4096).map(|i| (i % 7) as u8).collect();
    let (file, _) = image_with_compressed_cluster(&content, 0);
    let good = file.bytes();
    check_image_bytes(&good).expect("the unmangled image checks");
    let mut rng = Rng(1234);
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the metadata clusters (header, L1, reftable, L2).
            let i = rng.below(bytes.len().min(32 * 1024) as u64) as usize;
            bytes[i] = rng.next() as u8;
        }
        if rng.below(10) == 0 {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        }
        let _ = check_image_bytes(&bytes);
    }
}
