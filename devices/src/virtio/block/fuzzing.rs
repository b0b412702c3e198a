//! The bodies of the fuzz targets in `devices/fuzz/` (cargo-fuzz, nightly),
//! kept here as plain functions so a stable unit test also runs them over
//! thousands of pseudo-random inputs. Every input must return, never panic
//! or hang.
#![doc(hidden)]

use std::path::PathBuf;

use vireo_api::devices::block::Format;
use vireo_block::{DiskImage, DisplayPath, Error, LayerInfo};
use vireo_vmcore::memory::GuestMemory;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::{self, DiskInfo, ID_BYTES, SECTOR_SIZE};

/// Guest memory of the fuzz targets: 64 KiB at 0 and 4 KiB at 1 MiB, so
/// addresses can fall in a hole between regions.
const LOW: u64 = 0x1_0000;
const HIGH: (u64, u64) = (0x10_0000, 0x1000);

fn memory() -> Option<GuestMemory> {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH.0), HIGH.1 as usize),
    ])
    .ok()
}

/// Reads little-endian numbers from the input, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// An address: mostly inside low memory, sometimes anywhere.
    fn addr(&mut self) -> u64 {
        let sel = self.u8();
        let raw = self.u64();
        match sel % 4 {
            0 => raw,
            1 => HIGH.0 + raw % (HIGH.1 + 64),
            _ => raw % (LOW + 64),
        }
    }
}

/// Fills memory from `data` (from `start` on), wrapping within low memory.
fn fill(mem: &GuestMemory, start: u64, data: &[u8]) {
    if start >= LOW {
        return;
    }
    let room = (LOW - start) as usize;
    let n = data.len().min(room);
    let _ = mem.write_slice(&data[..n], GuestAddress(start));
    if data.len() > n {
        let m = (data.len() - n).min(HIGH.1 as usize);
        let _ = mem.write_slice(&data[n..n + m], GuestAddress(HIGH.0));
    }
}

/// A queue with fuzz-chosen size and addresses over memory filled from the
/// input: pop chains and walk them the ways the devices do (descriptor by
/// descriptor, readable/writable halves, `Reader`/`Writer`), return them,
/// and run the notification logic.
pub fn virtio_queue_chain(data: &[u8]) {
    let Some(mem) = memory() else { return };
    let mut input = Input(data);
    let size = input.u16();
    let desc = input.addr();
    let avail = input.addr();
    let used = input.addr();
    let flags = input.u8();
    fill(&mem, 0, input.0);

    let Ok(mut q) = Queue::new(256) else { return };
    // The setters refuse bad values (logging); `is_valid` is the
    // transport's check before a device ever sees the queue.
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_event_idx(flags & 1 != 0);
    q.set_next_avail(u16::from(flags >> 1));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    for round in 0..4 {
        let _ = q.disable_notification(&mem);
        let mut popped = 0;
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            popped += 1;
            if popped > 600 {
                // The used ring may overlap the avail ring and keep feeding
                // it; devices bound their work per wake-up the same way.
                return;
            }
            let head = chain.head_index();
            let mut count = 0usize;
            let mut bytes = 0u64;
            for d in chain.clone() {
                count += 1;
                bytes += u64::from(d.len());
                // A chain ends at the queue or indirect table size.
                assert!(count <= usize::from(u16::MAX) + 1);
            }
            assert!(bytes <= u64::from(u32::MAX));
            let readable = chain.clone().readable().count();
            let writable = chain.clone().writable().count();
            assert!(readable + writable <= count);
            let mut written = 0u32;
            if let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(&mem), chain.writer(&mem)) {
                let mut buf = [0u8; 64];
                // At most 4 KiB of a chain (which may name up to 4 GiB).
                for _ in 0..512 {
                    if r.available_bytes() == 0 {
                        break;
                    }
                    let before = r.available_bytes();
                    if r.read_obj::<[u8; 8]>().is_err() {
                        let _ = std::io::Read::read(&mut r, &mut buf);
                    }
                    if r.available_bytes() == before {
                        break;
                    }
                }
                if w.available_bytes() > 0 {
                    let n = w.available_bytes().min(buf.len());
                    if std::io::Write::write_all(&mut w, &buf[..n]).is_ok() {
                        written = n as u32;
                    }
                }
            }
            if q.add_used(&mem, head, written).is_err() {
                return;
            }
        }
        let _ = q.needs_notification(&mem);
        match q.enable_notification(&mem) {
            Ok(true) if popped > 0 && round < 3 => continue,
            _ => break,
        }
    }
}

/// An in-memory disk for [`blk_request`].
pub struct MemDisk {
    pub bytes: Vec<u8>,
    pub read_only: bool,
    pub flushes: usize,
}

impl MemDisk {
    fn check(&self, offset: u64, len: u64) -> vireo_block::Result<(usize, usize)> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes.len() as u64 => Ok((offset as usize, end as usize)),
            _ => Err(Error::OutOfBounds {
                path: DisplayPath(PathBuf::from("memdisk")),
                offset,
                len,
                size: self.bytes.len() as u64,
            }),
        }
    }

    fn writable(&self) -> vireo_block::Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: DisplayPath(PathBuf::from("memdisk")),
            });
        }
        Ok(())
    }
}

impl DiskImage for MemDisk {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> vireo_block::Result<()> {
        let (s, e) = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes[s..e]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> vireo_block::Result<()> {
        self.writable()?;
        let (s, e) = self.check(offset, buf.len() as u64)?;
        self.bytes[s..e].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> vireo_block::Result<()> {
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> vireo_block::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> vireo_block::Result<()> {
        self.writable()?;
        let (s, e) = self.check(offset, len)?;
        self.bytes[s..e].fill(0);
        Ok(())
    }
    fn layer_info(&mut self) -> vireo_block::Result<LayerInfo> {
        Ok(LayerInfo {
            path: PathBuf::from("memdisk"),
            format: Format::Raw,
            virtual_size: self.size(),
            cluster_size: None,
            allocated_bytes: self.size(),
            file_size: self.size(),
            version: None,
            backing_file: None,
            backing_format: None,
        })
    }
    fn backing(&mut self) -> Option<&mut dyn DiskImage> {
        None
    }
}

/// The queue layout of [`blk_request`]: a valid 16-entry queue at fixed
/// addresses, so the fuzzer's effort goes into the chains.
const Q_SIZE: u16 = 16;
const Q_DESC: u64 = 0;
const Q_AVAIL: u64 = 0x100;
const Q_USED: u64 = 0x200;
const DATA: u64 = 0x1000;
const DISK_SECTORS: u64 = 128;

/// The virtio-blk request path over fuzz-chosen descriptor chains: parse,
/// carry out against an in-memory disk, write the status, return the chain.
/// Input: a flags byte, a chain count, 16 descriptors (addr, len, flags,
/// next), the avail ring heads, then guest memory contents from 0x1000.
/// Returns how many chains were served and how many of those passed the
/// checks (for the tests; the fuzz target ignores it).
pub fn blk_request(data: &[u8]) -> (usize, usize) {
    let Some(mem) = memory() else {
        return (0, 0);
    };
    let mut input = Input(data);
    let mode = input.u8();
    let chains = input.u8() % 8;
    for i in 0..Q_SIZE {
        let addr = input.addr();
        let len = match input.u8() % 4 {
            0 => input.u32(),
            _ => u32::from(input.u16()),
        };
        let d = Descriptor::new(addr, len, input.u16() & 0x7, input.u16() % (Q_SIZE + 2));
        let _ = mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(Q_DESC + u64::from(i) * 16),
        );
    }
    for i in 0..u64::from(chains) {
        let _ = mem.write_obj(
            input.u16() % (Q_SIZE + 1),
            GuestAddress(Q_AVAIL + 4 + i * 2),
        );
    }
    let _ = mem.write_obj(u16::from(chains), GuestAddress(Q_AVAIL + 2));
    fill(&mem, DATA, input.0);

    let Ok(mut q) = Queue::new(Q_SIZE) else {
        return (0, 0);
    };
    q.set_size(Q_SIZE);
    q.set_desc_table_address(Some(Q_DESC as u32), Some(0));
    q.set_avail_ring_address(Some(Q_AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(Q_USED as u32), Some(0));
    q.set_event_idx(mode & 2 != 0);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return (0, 0);
    }

    let read_only = mode & 1 != 0;
    let mut disk = MemDisk {
        bytes: vec![0xa5; (DISK_SECTORS * SECTOR_SIZE) as usize],
        read_only,
        flushes: 0,
    };
    let original = disk.bytes.clone();
    let mut serial = [0u8; ID_BYTES];
    serial[..6].copy_from_slice(b"fuzzed");
    let info = DiskInfo {
        capacity_bytes: DISK_SECTORS * SECTOR_SIZE,
        read_only,
        serial,
    };
    let mut bounce = Vec::new();
    let mut served = 0;
    let mut passed = 0;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        served += 1;
        assert!(
            served <= usize::from(chains),
            "popped more than was made available"
        );
        let head = chain.head_index();
        let parsed = request::parse(&mem, chain, &info);
        if let Ok(req) = &parsed {
            assert!(req.data_len <= request::MAX_DATA_BYTES);
            passed += 1;
        }
        let len = request::serve("fuzz", &mem, parsed, &mut disk, &info, &mut bounce);
        if q.add_used(&mem, head, len).is_err() {
            break;
        }
    }
    if read_only {
        assert!(disk.bytes == original, "a read-only disk was changed");
    }
    assert_eq!(disk.bytes.len() as u64, DISK_SECTORS * SECTOR_SIZE);
    let _ = q.needs_notification(&mem);
    (served, passed)
}

/// A xorshift generator for the stable-Rust runs of the targets.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `len` pseudo-random bytes, biased towards small values (which make
    /// valid lengths, flags and indexes more often).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let v = self.next_u64();
                match v % 4 {
                    0 => 0,
                    1 => (v >> 8) as u8 % 4,
                    _ => (v >> 16) as u8,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs each target body over seeded pseudo-random inputs (the
    /// stable-Rust stand-in for `cargo fuzz run`).
    #[test]
    fn fuzz_bodies_survive_pseudo_random_inputs() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let len = (rng.next_u64() % 600) as usize;
            let data = rng.bytes(len);
            virtio_queue_chain(&data);
            blk_request(&data);
        }
    }

    /// Inputs close to good requests, so the parser's later checks run and
    /// some requests pass: a header at 0x1000, data at 0x2000, status at
    /// 0x3000, with pseudo-random type, sector, data length and direction.
    #[test]
    fn blk_request_body_survives_near_valid_chains() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let (mut served, mut passed) = (0, 0);
        for _ in 0..2000 {
            let mut d = vec![rng.next_u64() as u8 & 3, 1];
            let descs: [(u64, u16, u16); 3] = [
                (DATA, 16, 1),
                (
                    0x2000,
                    ((rng.next_u64() % 4) * 512) as u16,
                    1 | (rng.next_u64() as u16 & 2),
                ),
                (0x3000, 1, 2),
            ];
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                d.push(2); // an address inside low memory
                d.extend_from_slice(&addr.to_le_bytes());
                d.push(1); // a 16-bit length
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&flags.to_le_bytes());
                d.extend_from_slice(&(i as u16 + 1).to_le_bytes());
            }
            for _ in descs.len()..usize::from(Q_SIZE) {
                d.extend_from_slice(&[0u8; 18]);
            }
            d.extend_from_slice(&0u16.to_le_bytes()); // avail ring: head 0
                                                      // Memory from 0x1000: the header.
            let ty = [0u32, 1, 4, 8, 11, 13, 99][(rng.next_u64() % 7) as usize];
            d.extend_from_slice(&ty.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            d.extend_from_slice(&(rng.next_u64() % 140).to_le_bytes());
            virtio_queue_chain(&d);
            let (s, p) = blk_request(&d);
            served += s;
            passed += p;
        }
        assert_eq!(served, 2000, "every near-valid chain is popped and served");
        assert!(passed > 100, "only {passed} requests passed the checks");
        assert!(passed < served, "no request was rejected");
    }
}
