//! The device driven like a guest driver would: descriptor chains written
//! into test memory, the queue's notify eventfd kicked, the used ring
//! polled with a timeout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};

const MEM_SIZE: usize = 32 << 20;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("vireo-virtio-blk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn join(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An image wrapper that counts flushes.
struct Counting {
    inner: Box<dyn DiskImage>,
    flushes: Arc<AtomicUsize>,
}

impl DiskImage for Counting {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> vireo_block::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> vireo_block::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> vireo_block::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> vireo_block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> vireo_block::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn layer_info(&mut self) -> vireo_block::Result<vireo_block::LayerInfo> {
        self.inner.layer_info()
    }
    fn backing(&mut self) -> Option<&mut dyn DiskImage> {
        self.inner.backing()
    }
}

/// One device on the shared test driver, with a bump allocator for the
/// requests' buffers.
struct Harness {
    drv: TestDriver,
    dev: Block,
    heap: u64,
}

/// A descriptor as the tests write it: (address, length, R/W/IND flags).
fn desc((addr, len, flags): (u64, u32, u16)) -> Desc {
    Desc {
        addr,
        len,
        write: flags & W != 0,
        indirect: flags & IND != 0,
    }
}

/// A `--disk` for `path`: raw unless `extra` gives the format or makes
/// the disk read-only (a writable disk needs its format given).
fn cfg(path: &Path, extra: &str) -> BlockConfig {
    let format = if extra.contains("format=") || extra.contains("readonly=on") {
        ""
    } else {
        ",format=raw"
    };
    BlockConfig::from_options(&format!("path={}{extra}{format}", path.display())).unwrap()
}

impl Harness {
    fn new(dev: Block) -> Harness {
        let features = dev.features();
        Harness::with_features(dev, features)
    }

    fn with_features(dev: Block, features: u64) -> Harness {
        let mut h = Harness {
            drv: TestDriver::new(MEM_SIZE, &[QUEUE_SIZE]),
            dev,
            heap: DATA_START,
        };
        h.activate(features);
        h
    }

    /// Set the ring up afresh (as a driver does after a reset) and activate.
    fn activate(&mut self, features: u64) {
        let activation = self.drv.activation(features);
        self.dev.activate(activation).unwrap();
    }

    /// Guest memory for a buffer, filled with `fill`.
    fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let a = self.heap;
        self.heap = (self.heap + len as u64 + 15) & !15;
        assert!(self.heap < MEM_SIZE as u64, "test heap exhausted");
        self.drv
            .mem
            .write_slice(&vec![fill; len], GuestAddress(a))
            .unwrap();
        a
    }

    /// Write descriptor `i` of an indirect table (or of the queue's own).
    fn write_desc(&self, table: u64, i: u16, d: (u64, u32, u16), next: Option<u16>) {
        self.drv.write_desc(table, i, desc(d), next);
    }

    /// Post a chain and make it available (without kicking). Returns its
    /// head.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let descs: Vec<Desc> = descs.iter().copied().map(desc).collect();
        self.drv.add_chain(0, &descs)
    }

    fn kick(&self) {
        self.drv.kick(0);
    }

    /// Wait for the next used element: (id, len).
    fn wait_used(&mut self) -> (u32, u32) {
        let (head, len) = self.drv.used(0);
        (u32::from(head), len)
    }

    fn header(&mut self, ty: u32, sector: u64) -> u64 {
        let a = self.alloc(16, 0);
        self.drv.mem.write_obj(ty, GuestAddress(a)).unwrap();
        self.drv.mem.write_obj(sector, GuestAddress(a + 8)).unwrap();
        a
    }

    fn status_byte(&self, a: u64) -> u8 {
        self.drv.mem.read_obj(GuestAddress(a)).unwrap()
    }

    /// Submit a chain, kick, wait: (status byte, used length).
    fn run(&mut self, descs: &[(u64, u32, u16)], status: u64) -> (u8, u32) {
        let head = self.submit(descs);
        self.kick();
        let (id, len) = self.wait_used();
        assert_eq!(id, u32::from(head));
        (self.status_byte(status), len)
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, u32, Vec<u8>) {
        let h = self.header(VIRTIO_BLK_T_IN, sector);
        let d = self.alloc(len, 0xee);
        let s = self.alloc(1, 0xff);
        let (st, used) = self.run(&[(h, 16, R), (d, len as u32, W), (s, 1, W)], s);
        let mut buf = vec![0u8; len];
        self.drv.mem.read_slice(&mut buf, GuestAddress(d)).unwrap();
        (st, used, buf)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        let h = self.header(VIRTIO_BLK_T_OUT, sector);
        let d = self.alloc(data.len(), 0);
        self.drv.mem.write_slice(data, GuestAddress(d)).unwrap();
        let s = self.alloc(1, 0xff);
        self.run(&[(h, 16, R), (d, data.len() as u32, R), (s, 1, W)], s)
    }

    fn simple(&mut self, ty: u32) -> (u8, u32) {
        let h = self.header(ty, 0);
        let s = self.alloc(1, 0xff);
        self.run(&[(h, 16, R), (s, 1, W)], s)
    }

    /// DISCARD/WRITE_ZEROES with (sector, sectors, flags) segments.
    fn ranges(&mut self, ty: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
        let h = self.header(ty, 0);
        let d = self.alloc(16 * segs.len().max(1), 0);
        for (i, &(sector, n, flags)) in segs.iter().enumerate() {
            let a = d + 16 * i as u64;
            self.drv.mem.write_obj(sector, GuestAddress(a)).unwrap();
            self.drv.mem.write_obj(n, GuestAddress(a + 8)).unwrap();
            self.drv.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        }
        let s = self.alloc(1, 0xff);
        self.run(&[(h, 16, R), (d, 16 * segs.len() as u32, R), (s, 1, W)], s)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn raw_disk(dir: &TempDir, size: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    vireo_block::create_raw(&p, size).unwrap();
    p
}

#[test]
fn open_errors_name_the_file_and_the_fix() {
    let Err(e) = Block::new(cfg(Path::new("/nonexistent/vireo/disk.img"), ",id=d0")) else {
        panic!("opened a missing file");
    };
    let e = e.to_string();
    assert!(
        e.contains("/nonexistent/vireo/disk.img") && e.contains("id=d0"),
        "{e}"
    );
    assert!(e.contains("Check path="), "{e}");
}

#[test]
fn a_writable_disk_needs_its_format_given() {
    let dir = TempDir::new("noformat");
    let p = dir.join("vda.raw");
    // The guest wrote a qcow2 header naming a host file onto its raw disk.
    let q = dir.join("scratch.qcow2");
    vireo_block::create_qcow2(&q, 1 << 20, 64 << 10, Some(("/etc/hostname", Format::Raw))).unwrap();
    let mut bytes = std::fs::read(&q).unwrap();
    bytes.resize(1 << 20, 0);
    std::fs::write(&p, &bytes).unwrap();

    let no_format = BlockConfig::from_options(&format!("path={}", p.display())).unwrap();
    let Err(e) = Block::new(no_format) else {
        panic!("a writable disk opened without format=");
    };
    let e = e.to_string();
    assert!(
        e.contains(&format!("--disk path={}", p.display()))
            && e.contains("give format=raw or format=qcow2")
            && e.contains("never guesses"),
        "{e}"
    );
    // Read-only without format=: the probe finds qcow2, and a guessed
    // image may not reach a backing file.
    let Err(e) = Block::new(cfg(&p, ",readonly=on")) else {
        panic!("a probed qcow2 opened its backing file");
    };
    assert!(e.to_string().contains("give format=qcow2"), "{e}");
    // format=raw: the guest reads back exactly the bytes it wrote.
    let mut h = Harness::new(Block::new(cfg(&p, ",format=raw")).unwrap());
    assert_eq!(h.dev.format(), Format::Raw);
    assert_eq!(h.read(0, 4096).2, &bytes[..4096]);
}

#[test]
fn features_and_config_space() {
    let dir = TempDir::new("config");
    let p = raw_disk(&dir, 1 << 20);
    let dev = Block::new(cfg(&p, "")).unwrap();
    assert_eq!(dev.device_type(), device_type::BLOCK);
    assert_eq!(dev.queue_max_sizes(), vec![256]);
    let f = dev.features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & features::VERSION_1, 0);
    assert_ne!(f & features::RING_EVENT_IDX, 0);
    assert_ne!(f & features::RING_INDIRECT_DESC, 0);

    let le32 = |off: usize| {
        let mut b = [0u8; 4];
        dev.read_config(off as u64, &mut b);
        u32::from_le_bytes(b)
    };
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(le32(offset_of!(virtio_blk_config, blk_size)), 512);
    assert_eq!(
        le32(offset_of!(virtio_blk_config, seg_max)),
        request::SEG_MAX
    );
    assert_eq!(
        le32(offset_of!(virtio_blk_config, max_discard_sectors)),
        request::MAX_DISCARD_SECTORS
    );
    assert_eq!(le32(offset_of!(virtio_blk_config, max_discard_seg)), 32);
    assert_eq!(
        le32(offset_of!(virtio_blk_config, discard_sector_alignment)),
        8
    );
    assert_eq!(
        le32(offset_of!(virtio_blk_config, max_write_zeroes_seg)),
        32
    );
    let mut b = [0u8; 1];
    dev.read_config(
        offset_of!(virtio_blk_config, write_zeroes_may_unmap) as u64,
        &mut b,
    );
    assert_eq!(b[0], 1);

    let ro = Block::new(cfg(&p, ",readonly=on")).unwrap();
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert!(ro.state().read_only);
}

#[test]
fn raw_read_write_roundtrip_reaches_the_file() {
    let dir = TempDir::new("raw");
    let p = raw_disk(&dir, 4 << 20);
    let mut h = Harness::new(Block::new(cfg(&p, "")).unwrap());
    // A write split over two data descriptors.
    let data = pattern(1536, 7);
    let hd = h.header(VIRTIO_BLK_T_OUT, 3);
    let d1 = h.alloc(512, 0);
    let d2 = h.alloc(1024, 0);
    h.drv
        .mem
        .write_slice(&data[..512], GuestAddress(d1))
        .unwrap();
    h.drv
        .mem
        .write_slice(&data[512..], GuestAddress(d2))
        .unwrap();
    let s = h.alloc(1, 0xff);
    let (st, used) = h.run(&[(hd, 16, R), (d1, 512, R), (d2, 1024, R), (s, 1, W)], s);
    assert_eq!((st, used), (OK, 1));

    let (st, used, back) = h.read(3, 1536);
    assert_eq!((st, used), (OK, 1537));
    assert_eq!(back, data);
    // Unwritten sectors read as zeros.
    assert_eq!(h.read(0, 1024).2, vec![0u8; 1024]);
    // The bytes are in the file.
    let file = std::fs::read(&p).unwrap();
    assert_eq!(&file[3 * 512..3 * 512 + 1536], &data[..]);

    // A read bigger than the bounce chunk, in one descriptor.
    let big = pattern(1536 << 10, 3);
    assert_eq!(h.write(100, &big).0, OK);
    let (st, used, back) = h.read(100, big.len());
    assert_eq!((st, used as usize), (OK, big.len() + 1));
    assert!(back == big);
    assert_eq!(h.drv.interrupt.count(InterruptKind::Config), 0);
}

#[test]
fn reads_and_writes_are_counted() {
    let dir = TempDir::new("counters");
    let p = raw_disk(&dir, 4 << 20);
    let dev = Block::new(cfg(&p, "")).unwrap();
    let counters = dev.counters();
    let mut h = Harness::new(dev);
    assert_eq!(counters.snapshot(), BlockStats::default());
    assert_eq!(h.write(8, &pattern(4096, 1)).0, OK);
    assert_eq!(h.write(0, &pattern(512, 2)).0, OK);
    assert_eq!(h.read(0, 1024).0, OK);
    // Neither a flush nor a request refused by the checks moves data.
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH).0, OK);
    assert_eq!(h.read(1 << 20, 512).0, IOERR);
    assert_eq!(
        counters.snapshot(),
        BlockStats {
            read_bytes: 1024,
            write_bytes: 4096 + 512,
            read_ops: 1,
            write_ops: 2,
        }
    );
}

#[test]
fn qcow2_roundtrip_flush_and_reuse_after_reset() {
    let dir = TempDir::new("qcow2");
    let p = dir.join("disk.qcow2");
    vireo_block::create_qcow2(&p, 8 << 20, 64 << 10, None).unwrap();
    let mut h = Harness::new(Block::new(cfg(&p, ",format=qcow2")).unwrap());
    let data = pattern(4096, 42);
    assert_eq!(h.write(200, &data), (OK, 1));
    assert_eq!(h.read(200, 4096).2, data);
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH), (OK, 1));
    // After the flush another reader of the file sees the data.
    let mut other = vireo_block::open_as(&p, Format::Qcow2, OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 4096];
    other.read_at(&mut buf, 200 * 512).unwrap();
    assert_eq!(buf, data);

    // The driver resets the device and sets it up again: same image.
    h.dev.reset();
    let f = h.dev.features();
    h.activate(f);
    assert_eq!(h.read(200, 4096).2, data);
    assert_eq!(h.write(0, &data[..512]), (OK, 1));
    assert_eq!(h.read(0, 512).2, &data[..512]);
}

#[test]
fn flush_reaches_the_image() {
    let dir = TempDir::new("flush");
    let p = raw_disk(&dir, 1 << 20);
    let flushes = Arc::new(AtomicUsize::new(0));
    let image = Box::new(Counting {
        inner: vireo_block::open_as(&p, Format::Raw, OpenOptions::writable()).unwrap(),
        flushes: flushes.clone(),
    });
    let mut h = Harness::new(Block::from_image(cfg(&p, ""), image));
    assert_eq!(flushes.load(Ordering::SeqCst), 0);
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH), (OK, 1));
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
    // A flush with a data buffer is malformed and flushes nothing.
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let d = h.alloc(512, 0);
    let s = h.alloc(1, 0xff);
    assert_eq!(h.run(&[(hd, 16, R), (d, 512, R), (s, 1, W)], s), (IOERR, 1));
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn get_id_returns_the_serial() {
    let dir = TempDir::new("getid");
    let p = raw_disk(&dir, 1 << 20);
    let mut h = Harness::new(Block::new(cfg(&p, ",serial=VIREO-SN-1")).unwrap());
    let hd = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let d = h.alloc(20, 0xaa);
    let s = h.alloc(1, 0xff);
    assert_eq!(h.run(&[(hd, 16, R), (d, 20, W), (s, 1, W)], s), (OK, 21));
    let mut id = [0u8; 20];
    h.drv.mem.read_slice(&mut id, GuestAddress(d)).unwrap();
    assert_eq!(&id[..10], b"VIREO-SN-1");
    assert_eq!(&id[10..], &[0u8; 10]);
    // A shorter buffer gets the start of it; the status may share the
    // last descriptor.
    let hd = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let d = h.alloc(6, 0xaa);
    assert_eq!(h.run(&[(hd, 16, R), (d, 6, W)], d + 5), (OK, 6));
    let mut id = [0u8; 5];
    h.drv.mem.read_slice(&mut id, GuestAddress(d)).unwrap();
    assert_eq!(&id, b"VIREO");
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let dir = TempDir::new("zeroes");
    let p = raw_disk(&dir, 1 << 20);
    let mut h = Harness::new(Block::new(cfg(&p, "")).unwrap());
    let data = pattern(16 * 512, 9);
    assert_eq!(h.write(0, &data).0, OK);
    assert_eq!(
        h.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 3, 0), (8, 1, 1)]),
        (OK, 1)
    );
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[(12, 2, 0)]), (OK, 1));
    let back = h.read(0, data.len()).2;
    for sector in 0..16 {
        let got = &back[sector * 512..(sector + 1) * 512];
        if (2..5).contains(&sector) || sector == 8 || (12..14).contains(&sector) {
            assert_eq!(got, &[0u8; 512][..], "sector {sector}");
        } else {
            assert_eq!(
                got,
                &data[sector * 512..(sector + 1) * 512],
                "sector {sector}"
            );
        }
    }
    // Flags: unmap on a discard and unknown flags are UNSUPP; no segment,
    // a partial segment, too many sectors or a range past the end IOERR.
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]).0, UNSUPP);
    assert_eq!(h.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]).0, UNSUPP);
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[]).0, IOERR);
    assert_eq!(
        h.ranges(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, request::MAX_WRITE_ZEROES_SECTORS + 1, 0)]
        )
        .0,
        IOERR
    );
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[(2047, 2, 0)]).0, IOERR);
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]).0, IOERR);
    let segs = vec![(0, 1, 0); 33];
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &segs).0, IOERR);

    let hd = h.header(VIRTIO_BLK_T_DISCARD, 0);
    let d = h.alloc(20, 0);
    let s = h.alloc(1, 0xff);
    assert_eq!(h.run(&[(hd, 16, R), (d, 20, R), (s, 1, W)], s).0, IOERR);
    // Nothing above changed sector 0.
    assert_eq!(h.read(0, 512).2, &data[..512]);
}

#[test]
fn qcow2_write_zeroes_reads_back_zeros() {
    let dir = TempDir::new("qzeroes");
    let p = dir.join("disk.qcow2");
    vireo_block::create_qcow2(&p, 4 << 20, 64 << 10, None).unwrap();
    let mut h = Harness::new(Block::new(cfg(&p, ",format=qcow2")).unwrap());
    let data = pattern(256 * 512, 1);
    assert_eq!(h.write(0, &data).0, OK);
    assert_eq!(h.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 128, 1)]), (OK, 1));
    let back = h.read(0, data.len()).2;
    assert!(back[..128 * 512].iter().all(|&b| b == 0));
    assert_eq!(&back[128 * 512..], &data[128 * 512..]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = TempDir::new("ro");
    let p = raw_disk(&dir, 1 << 20);
    std::fs::write(&p, pattern(1 << 20, 5)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut h = Harness::new(Block::new(cfg(&p, ",readonly=on")).unwrap());
    assert_eq!(h.write(0, &[1u8; 512]), (IOERR, 1));
    assert_eq!(h.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).0, IOERR);
    assert_eq!(h.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).0, IOERR);
    let (st, _, back) = h.read(0, 512);
    assert_eq!((st, &back[..]), (OK, &before[..512]));
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH).0, OK);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn out_of_range_overflowing_and_odd_sizes_are_io_errors() {
    let dir = TempDir::new("range");
    let p = raw_disk(&dir, 1 << 20); // 2048 sectors
    let mut h = Harness::new(Block::new(cfg(&p, "")).unwrap());
    assert_eq!(h.read(2047, 512).0, OK);
    let (st, used, back) = h.read(2047, 1024);
    assert_eq!((st, used), (IOERR, 1));
    assert_eq!(back, vec![0xee; 1024], "guest buffer touched on error");
    assert_eq!(h.read(2048, 512).0, IOERR);
    assert_eq!(h.write(2048, &[1; 512]).0, IOERR);
    // sector * 512 overflows, and sector * 512 + len overflows.
    assert_eq!(h.read(u64::MAX, 512).0, IOERR);
    assert_eq!(h.read(u64::MAX / 512, 512).0, IOERR);
    assert_eq!(h.write(1 << 55, &[1; 512]).0, IOERR);
    // Not a whole number of sectors.
    assert_eq!(h.read(0, 100).0, IOERR);
    assert_eq!(h.write(0, &[1; 513]).0, IOERR);
    // An unknown type is UNSUPP.
    assert_eq!(h.simple(0x7777), (UNSUPP, 1));
    // Too big: larger than seg_max * size_max, though the disk fits it
    // (the descriptor lengths are all the device looks at before refusing).
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let s = h.alloc(1, 0xff);
    let len = (request::MAX_DATA_BYTES / 2 + 512) as u32;
    let d = h.alloc(4096, 0);
    // The buffers are outside memory too: either check refuses it.
    assert_eq!(
        h.run(&[(hd, 16, R), (d, len, W), (d, len, W), (s, 1, W)], s)
            .0,
        IOERR
    );
    assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 1 << 20]);
}

#[test]
fn missing_or_unusable_status_gets_used_length_zero() {
    let dir = TempDir::new("status");
    let p = raw_disk(&dir, 1 << 20);
    let mut h = Harness::new(Block::new(cfg(&p, "")).unwrap());
    // Only a header.
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let head = h.submit(&[(hd, 16, R)]);
    h.kick();
    assert_eq!(h.wait_used(), (u32::from(head), 0));
    // The status descriptor is device-readable.
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let s = h.alloc(1, 0xff);
    assert_eq!(h.run(&[(hd, 16, R), (s, 1, R)], s), (0xff, 0));
    // ... empty.
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[(hd, 16, R), (s, 0, W)], s), (0xff, 0));
    // ... outside guest memory.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let d = h.alloc(512, 0xee);
    let (st, len) = h.run(&[(hd, 16, R), (d, 512, W), (1 << 40, 1, W)], s);
    assert_eq!((st, len), (0xff, 0));
    let mut buf = [0u8; 512];
    h.drv.mem.read_slice(&mut buf, GuestAddress(d)).unwrap();
    assert_eq!(buf, [0xee; 512]);
    // The device still works.
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH), (OK, 1));
}

#[test]
fn wrong_directions_and_bad_addresses_are_io_errors() {
    let dir = TempDir::new("dirs");
    let p = raw_disk(&dir, 1 << 20);
    std::fs::write(&p, pattern(1 << 20, 3)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut h = Harness::new(Block::new(cfg(&p, "")).unwrap());

    // A read whose data buffer is device-readable: never written.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let d = h.alloc(512, 0x55);
    let s = h.alloc(1, 0xff);
    assert_eq!(h.run(&[(hd, 16, R), (d, 512, R), (s, 1, W)], s), (IOERR, 1));
    let mut buf = [0u8; 512];
    h.drv.mem.read_slice(&mut buf, GuestAddress(d)).unwrap();
    assert_eq!(buf, [0x55; 512]);
    // A write whose data buffer is device-writable.
    let hd = h.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(h.run(&[(hd, 16, R), (d, 512, W), (s, 1, W)], s), (IOERR, 1));
    // Readable after writable.
    let hd = h.header(VIRTIO_BLK_T_OUT, 0);
    let d2 = h.alloc(512, 0x66);
    assert_eq!(
        h.run(&[(hd, 16, R), (d2, 512, W), (d, 512, R), (s, 1, W)], s),
        (IOERR, 1)
    );
    // A header shorter than 16 bytes, and a header split over two
    // descriptors (fine).
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[(hd, 8, R), (s, 1, W)], s), (IOERR, 1));
    let hd = h.header(VIRTIO_BLK_T_IN, 1);
    let d = h.alloc(512, 0);
    assert_eq!(
        h.run(&[(hd, 4, R), (hd + 4, 12, R), (d, 512, W), (s, 1, W)], s),
        (OK, 513)
    );
    h.drv.mem.read_slice(&mut buf, GuestAddress(d)).unwrap();
    assert_eq!(&buf[..], &before[512..1024]);
    // Data outside guest memory, straddling its end, and the header
    // outside it.
    let hd = h.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        h.run(&[(hd, 16, R), (1 << 40, 512, R), (s, 1, W)], s),
        (IOERR, 1)
    );
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let end = MEM_SIZE as u64 - 256;
    assert_eq!(
        h.run(&[(hd, 16, R), (end, 512, W), (s, 1, W)], s),
        (IOERR, 1)
    );
    assert_eq!(h.run(&[(u64::MAX - 8, 16, R), (s, 1, W)], s), (IOERR, 1));
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn indirect_tables_loops_and_long_chains_do_not_hang() {
    let dir = TempDir::new("loops");
    let p = raw_disk(&dir, 1 << 20);
    let features = Block::new(cfg(&p, "")).unwrap().features();
    let mut h = Harness::with_features(Block::new(cfg(&p, "")).unwrap(), features);

    // A good indirect request first.
    let table = h.alloc(3 * 16, 0);
    let hd = h.header(VIRTIO_BLK_T_OUT, 4);
    let d = h.alloc(512, 0x77);
    let s = h.alloc(1, 0xff);
    h.write_desc(table, 0, (hd, 16, R), Some(1));
    h.write_desc(table, 1, (d, 512, R), Some(2));
    h.write_desc(table, 2, (s, 1, W), None);
    assert_eq!(h.run(&[(table, 48, IND)], s), (OK, 1));
    assert_eq!(h.read(4, 512).2, vec![0x77; 512]);

    // An indirect table whose descriptors loop (0 -> 1 -> 0 ...).
    let table = h.alloc(2 * 16, 0);
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    h.write_desc(table, 0, (hd, 16, R), Some(1));
    h.write_desc(table, 1, (s, 1, W), Some(0));
    h.drv.mem.write_obj(0xffu8, GuestAddress(s)).unwrap();
    let head = h.submit(&[(table, 32, IND)]);
    h.kick();
    assert_eq!(h.wait_used().0, u32::from(head));

    // A loop in the main table: descriptor i points at itself.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let i = h.drv.reserve(0, 1);
    h.write_desc(h.drv.rings(0).0, i, (hd, 16, R), Some(i));
    h.drv.publish(0, i);
    h.kick();
    assert_eq!(h.wait_used(), (u32::from(i), 0));

    // An indirect descriptor inside an indirect table (forbidden).
    let inner = h.alloc(16, 0);
    let table = h.alloc(16, 0);
    h.write_desc(table, 0, (inner, 16, IND), None);
    let head = h.submit(&[(table, 16, IND)]);
    h.kick();
    assert_eq!(h.wait_used(), (u32::from(head), 0));

    // 300 descriptors (more than seg_max + 2) in an indirect table, all
    // valid: refused with IOERR, status written.
    let n = 300u16;
    let table = h.alloc(usize::from(n) * 16, 0);
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let d = h.alloc(512 * 298, 0);
    let s = h.alloc(1, 0xff);
    h.write_desc(table, 0, (hd, 16, R), Some(1));
    for k in 1..n - 1 {
        h.write_desc(table, k, (d + u64::from(k - 1) * 512, 512, W), Some(k + 1));
    }
    h.write_desc(table, n - 1, (s, 1, W), None);
    assert_eq!(h.run(&[(table, u32::from(n) * 16, IND)], s), (IOERR, 1));

    // An avail index far ahead of the ring: nothing can be popped, and the
    // device thread must not spin (reset joins it).
    h.drv
        .mem
        .write_obj(
            h.drv.avail_idx(0).wrapping_add(1000),
            GuestAddress(h.drv.rings(0).1 + 2),
        )
        .unwrap();
    h.kick();
    std::thread::sleep(Duration::from_millis(50));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut dev = h.dev;
    std::thread::spawn(move || {
        dev.reset();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("reset hung: the device thread is spinning");
}

#[test]
fn event_idx_coalesces_interrupts() {
    let dir = TempDir::new("evidx");
    let p = raw_disk(&dir, 1 << 20);
    let dev = Block::new(cfg(&p, "")).unwrap();
    let f = dev.features();
    let mut h = Harness::with_features(dev, f);
    let (_, avail, used) = h.drv.rings(0);
    let used_event = GuestAddress(avail + 4 + 2 * u64::from(QUEUE_SIZE));
    let avail_event = GuestAddress(used + 4 + 8 * u64::from(QUEUE_SIZE));
    // The driver wants an interrupt once the third buffer is used.
    h.drv.mem.write_obj(2u16, used_event).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
        let s = h.alloc(1, 0xff);
        h.submit(&[(hd, 16, R), (s, 1, W)]);
        statuses.push(s);
    }
    h.kick();
    for _ in 0..5 {
        h.wait_used();
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.drv.interrupt.count(InterruptKind::Queue(0)), 1);
    for s in statuses {
        assert_eq!(h.status_byte(s), OK);
    }
    // The device asked to be notified of the next buffer.
    let ae: u16 = h.drv.mem.read_obj(avail_event).unwrap();
    assert_eq!(ae, 5);
    // used_event far ahead: no interrupt for the next request.
    h.drv.mem.write_obj(100u16, used_event).unwrap();
    assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH).0, OK);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.drv.interrupt.count(InterruptKind::Queue(0)), 1);

    // Without EVENT_IDX every batch interrupts.
    let dev = Block::new(cfg(&p, "")).unwrap();
    let f = dev.features() & !features::RING_EVENT_IDX;
    let mut h = Harness::with_features(dev, f);
    for n in 1..=3 {
        assert_eq!(h.simple(VIRTIO_BLK_T_FLUSH).0, OK);
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.drv.interrupt.count(InterruptKind::Queue(0)) < n {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn rate_limits_slow_requests_but_complete_them() {
    let dir = TempDir::new("rate");
    let p = raw_disk(&dir, 1 << 20);
    // 50 requests/s with a burst of 50: 70 requests need about 0.4 s more.
    let mut h = Harness::new(Block::new(cfg(&p, ",ops=50")).unwrap());
    let start = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..70 {
        let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
        let s = h.alloc(1, 0xff);
        h.submit(&[(hd, 16, R), (s, 1, W)]);
        statuses.push(s);
    }
    h.kick();
    for _ in 0..70 {
        h.wait_used();
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "not limited: {took:?}");
    for s in statuses {
        assert_eq!(h.status_byte(s), OK);
    }

    // 256 KiB/s: 3 reads of 128 KiB, the last waits ~0.5 s.
    let mut h = Harness::new(Block::new(cfg(&p, ",bw=256K")).unwrap());
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(h.read(0, 128 << 10).0, OK);
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(350), "not limited: {took:?}");
}

#[test]
fn write_zeroes_and_discard_are_charged_their_length() {
    let dir = TempDir::new("rate-zeroes");
    let p = raw_disk(&dir, 1 << 20);
    // 256 KiB/s: three write-zeroes of 128 KiB each move no data, yet the
    // third waits about 0.5 s for the bucket, as three 128 KiB writes would.
    let mut h = Harness::new(Block::new(cfg(&p, ",bw=256K")).unwrap());
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(h.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 256, 0)]).0, OK);
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(350), "not limited: {took:?}");
    // Discards too: two segments of 128 KiB charge 256 KiB.
    let mut h = Harness::new(Block::new(cfg(&p, ",bw=256K")).unwrap());
    let start = Instant::now();
    for _ in 0..2 {
        assert_eq!(
            h.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 256, 0), (512, 256, 0)])
                .0,
            OK
        );
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(700), "not limited: {took:?}");
}

#[test]
fn one_request_zeroes_at_most_the_advertised_sectors() {
    let dir = TempDir::new("zero-cap");
    let max = request::MAX_WRITE_ZEROES_SECTORS;
    let p = raw_disk(&dir, 2 * u64::from(max) * 512);
    let dev = Block::new(cfg(&p, "")).unwrap();
    let mut cfgspace = [0u8; 4];
    dev.read_config(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors) as u64,
        &mut cfgspace,
    );
    assert_eq!(u32::from_le_bytes(cfgspace), max);
    let mut h = Harness::new(dev);
    // Segments that each fit but add up to more than the limit: refused.
    let half = max / 2 + 1;
    assert_eq!(
        h.ranges(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, half, 0), (u64::from(half), half, 0)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        h.ranges(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, max / 2, 0), (u64::from(max / 2), max / 2, 0)]
        )
        .0,
        OK
    );
}
