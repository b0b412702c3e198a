//! virtio-blk requests (virtio 1.2 §5.2.6): turning a descriptor chain into
//! a checked [`Request`], and carrying it out against a disk image.
//!
//! A request is a 16-byte header the driver wrote (type, reserved, sector),
//! then the data (device-readable for writes, device-writable for reads),
//! then one device-writable status byte, the last byte of the chain.
//!
//! [`parse`] checks everything the guest chose (directions, lengths, guest
//! addresses, the sector range, the request size) before any disk I/O, so
//! a bad request changes nothing on the disk. It never panics: a chain it
//! cannot serve becomes a [`Rejected`] that says which status to write
//! (if there is a usable status byte at all) and why.

use vireo_block::DiskImage;
use vireo_vmcore::memory::GuestMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The virtio-blk sector: every offset and capacity is in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request offered in `seg_max` (the queue size less the
/// header and status descriptors).
pub const SEG_MAX: u32 = 254;
/// The largest data segment offered in `size_max`.
pub const SIZE_MAX: u32 = 1 << 20;
/// Descriptors a request may have: data segments, header and status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The most data one read or write may move (`seg_max` × `size_max`): a
/// bigger one is refused rather than tying up the device thread.
pub const MAX_DATA_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Sectors one discard request may cover, all its segments together
/// (`max_discard_sectors`; Linux treats it as the per-request limit): 1 GiB.
/// A discard only punches holes, but each request is charged its length
/// against `bw=`.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments one discard request may carry (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors one write-zeroes request may cover, all its segments together
/// (`max_write_zeroes_sectors`): 64 MiB, since a raw image on a host that
/// cannot punch holes writes the zeros, on the device thread.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
/// Segments one write-zeroes request may carry (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;

/// The request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u64 = 16;
/// One discard/write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
const SEGMENT_LEN: u64 = 16;
/// Disk bytes moved through the bounce buffer at a time.
const CHUNK: usize = 1 << 20;
/// The serial number's length on the wire (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// A range of guest memory a descriptor names, checked to lie in guest
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// One discard or write-zeroes range, checked against the disk and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// The header's sector (IN and OUT).
    pub sector: u64,
    /// The data buffers: device-writable for IN and GET_ID, device-readable
    /// for OUT; empty for the others.
    pub data: Vec<Region>,
    /// The total length of `data`.
    pub data_len: u64,
    /// DISCARD and WRITE_ZEROES ranges.
    pub segments: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// The bytes a rate limiter charges: the data moved, or for DISCARD
    /// and WRITE_ZEROES the disk range they touch (they move no data, yet
    /// a write-zeroes can write that much to the host).
    pub fn charged_bytes(&self) -> u64 {
        match self.kind {
            RequestKind::Discard | RequestKind::WriteZeroes => self
                .segments
                .iter()
                .map(|s| u64::from(s.num_sectors) * SECTOR_SIZE)
                .sum(),
            _ => self.data_len,
        }
    }
}

/// A chain that is answered without doing what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where to write `status`; `None` when the chain has no usable status
    /// byte (it is then returned with a used length of 0).
    pub status_addr: Option<GuestAddress>,
    /// The status to report (IOERR or UNSUPP).
    pub status: u8,
    /// Why, for the log line.
    pub reason: String,
    /// Whether this is worth a warning (an unknown request type is not: a
    /// driver may probe for optional commands).
    pub warn: bool,
}

impl Rejected {
    fn ioerr(status_addr: GuestAddress, reason: String) -> Rejected {
        Rejected {
            status_addr: Some(status_addr),
            status: VIRTIO_BLK_S_IOERR as u8,
            reason,
            warn: true,
        }
    }
}

/// What a request is checked against.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// The disk size in bytes, a whole number of sectors.
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// The GET_ID answer: the serial, zero-padded to 20 bytes.
    pub serial: [u8; ID_BYTES],
}

/// The descriptors of one chain, as the device sees them.
#[derive(Debug, Default)]
struct Walk {
    readable: Vec<Region>,
    writable: Vec<Region>,
    /// The chain's last descriptor (the status one, if the chain is good).
    last: Option<Descriptor>,
    count: usize,
    /// The first problem found, if any.
    problem: Option<String>,
}

/// Walk a chain (the queue code already stops on loops and at the queue or
/// indirect table size), keeping at most `MAX_DESCRIPTORS` descriptors.
fn walk(mem: &GuestMemory, chain: impl Iterator<Item = Descriptor>) -> Walk {
    let mut w = Walk::default();
    for desc in chain {
        w.count += 1;
        if let Some(prev) = w.last.replace(desc) {
            if w.count > MAX_DESCRIPTORS + 1 {
                continue;
            }
            // Every descriptor but the last one (the status byte) is a
            // header or data buffer.
            if w.problem.is_some() {
                continue;
            }
            let region = Region {
                addr: prev.addr(),
                len: prev.len(),
            };
            if region.len == 0 {
                continue;
            }
            if !mem.check_range(region.addr, region.len as usize) {
                w.problem = Some(format!(
                    "descriptor {:#x}+{:#x} is outside guest memory",
                    region.addr.0, region.len
                ));
            } else if prev.is_write_only() {
                w.writable.push(region);
            } else if !w.writable.is_empty() {
                w.problem = Some("a device-readable descriptor follows a writable one".into());
            } else {
                w.readable.push(region);
            }
        }
    }
    if w.count > MAX_DESCRIPTORS && w.problem.is_none() {
        w.problem = Some(format!(
            "{} descriptors, more than the {MAX_DESCRIPTORS} allowed",
            w.count
        ));
    }
    w
}

fn total(regions: &[Region]) -> u64 {
    regions.iter().map(|r| u64::from(r.len)).sum()
}

/// The regions after the first `skip` bytes.
fn skip_bytes(regions: &[Region], mut skip: u64) -> Vec<Region> {
    let mut out = Vec::new();
    for r in regions {
        let len = u64::from(r.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, and the region is in guest memory, so
        // neither the new address nor length can overflow.
        out.push(Region {
            addr: GuestAddress(r.addr.0 + skip),
            len: r.len - skip as u32,
        });
        skip = 0;
    }
    out
}

/// Read `buf.len()` bytes from the start of `regions`.
fn gather(mem: &GuestMemory, regions: &[Region], buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    for r in regions {
        if done == buf.len() {
            break;
        }
        let n = (r.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], r.addr)
            .map_err(|e| format!("reading the request at {:#x}: {e}", r.addr.0))?;
        done += n;
    }
    if done < buf.len() {
        return Err(format!("request is shorter than {} bytes", buf.len()));
    }
    Ok(())
}

/// Check that `sector` plus `bytes` lies within the disk.
fn check_range(disk: &DiskInfo, sector: u64, bytes: u64) -> Result<(), String> {
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(bytes));
    match end {
        Some(end) if end <= disk.capacity_bytes => Ok(()),
        _ => Err(format!(
            "sector {sector} + {bytes} bytes is beyond the {}-sector disk",
            disk.capacity_bytes / SECTOR_SIZE
        )),
    }
}

/// Check a chain and turn it into a request.
pub fn parse(
    mem: &GuestMemory,
    chain: impl Iterator<Item = Descriptor>,
    disk: &DiskInfo,
) -> Result<Request, Rejected> {
    let w = walk(mem, chain);

    // The status byte: the last byte of the last descriptor, which must be
    // device-writable and in guest memory.
    let no_status = |reason: String| Rejected {
        status_addr: None,
        status: VIRTIO_BLK_S_IOERR as u8,
        reason,
        warn: true,
    };
    let Some(last) = w.last else {
        return Err(no_status("empty descriptor chain".into()));
    };
    if !last.is_write_only() {
        return Err(no_status(
            "the last descriptor (the status byte) is not device-writable".into(),
        ));
    }
    if last.len() == 0 {
        return Err(no_status("the status descriptor is empty".into()));
    }
    let status = match last.addr().0.checked_add(u64::from(last.len()) - 1) {
        Some(a) if mem.check_range(GuestAddress(a), 1) => GuestAddress(a),
        _ => {
            return Err(no_status(format!(
                "the status descriptor {:#x}+{:#x} is outside guest memory",
                last.addr().0,
                last.len()
            )))
        }
    };
    let ioerr = |reason: String| Err(Rejected::ioerr(status, reason));
    if let Some(p) = w.problem {
        return ioerr(p);
    }
    let mut writable = w.writable;
    // The status descriptor's bytes before the status byte are data.
    if last.len() > 1 {
        if !mem.check_range(last.addr(), last.len() as usize) {
            return ioerr(format!(
                "descriptor {:#x}+{:#x} is outside guest memory",
                last.addr().0,
                last.len()
            ));
        }
        writable.push(Region {
            addr: last.addr(),
            len: last.len() - 1,
        });
    }
    let readable = w.readable;

    let mut header = [0u8; HEADER_LEN as usize];
    if let Err(e) = gather(mem, &readable, &mut header) {
        return ioerr(format!("no request header: {e}"));
    }
    let mut t = [0u8; 4];
    t.copy_from_slice(&header[0..4]);
    let ty = u32::from_le_bytes(t);
    let mut s = [0u8; 8];
    s.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(s);

    let read_len = total(&readable) - HEADER_LEN;
    let write_len = total(&writable);
    let mut req = Request {
        kind: RequestKind::Flush,
        sector,
        data: Vec::new(),
        data_len: 0,
        segments: Vec::new(),
        status,
    };
    let check_size = |len: u64| -> Result<(), String> {
        if len % SECTOR_SIZE != 0 {
            return Err(format!("{len} data bytes is not a whole number of sectors"));
        }
        if len > MAX_DATA_BYTES {
            return Err(format!(
                "{len} data bytes is more than the {MAX_DATA_BYTES} a request may move"
            ));
        }
        check_range(disk, sector, len)
    };
    match ty {
        VIRTIO_BLK_T_IN => {
            if read_len != 0 {
                return ioerr(format!(
                    "read request with {read_len} device-readable data bytes"
                ));
            }
            if let Err(e) = check_size(write_len) {
                return ioerr(format!("read: {e}"));
            }
            req.kind = RequestKind::In;
            req.data = writable;
            req.data_len = write_len;
        }
        VIRTIO_BLK_T_OUT => {
            if write_len != 0 {
                return ioerr(format!(
                    "write request with {write_len} device-writable data bytes"
                ));
            }
            if disk.read_only {
                return ioerr("write to a read-only disk".into());
            }
            if let Err(e) = check_size(read_len) {
                return ioerr(format!("write: {e}"));
            }
            req.kind = RequestKind::Out;
            req.data = skip_bytes(&readable, HEADER_LEN);
            req.data_len = read_len;
        }
        VIRTIO_BLK_T_FLUSH => {
            if read_len != 0 || write_len != 0 {
                return ioerr(format!(
                    "flush request with {read_len} readable and {write_len} writable data bytes"
                ));
            }
            req.kind = RequestKind::Flush;
        }
        VIRTIO_BLK_T_GET_ID => {
            if read_len != 0 || write_len == 0 {
                return ioerr(format!(
                    "get-id request with {read_len} readable and {write_len} writable data bytes"
                ));
            }
            req.kind = RequestKind::GetId;
            req.data_len = write_len.min(ID_BYTES as u64);
            req.data = writable;
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            let (what, max_seg, max_sectors) = if discard {
                ("discard", MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
            } else {
                (
                    "write-zeroes",
                    MAX_WRITE_ZEROES_SEG,
                    MAX_WRITE_ZEROES_SECTORS,
                )
            };
            if write_len != 0 {
                return ioerr(format!(
                    "{what} request with {write_len} writable data bytes"
                ));
            }
            if disk.read_only {
                return ioerr(format!("{what} on a read-only disk"));
            }
            if read_len == 0 || read_len % SEGMENT_LEN != 0 {
                return ioerr(format!(
                    "{what} request with {read_len} data bytes, not a whole number of 16-byte segments"
                ));
            }
            let count = read_len / SEGMENT_LEN;
            if count > u64::from(max_seg) {
                return ioerr(format!(
                    "{what} request with {count} segments, more than the {max_seg} allowed"
                ));
            }
            let data = skip_bytes(&readable, HEADER_LEN);
            let mut raw = vec![0u8; read_len as usize];
            if let Err(e) = gather(mem, &data, &mut raw) {
                return ioerr(format!("{what}: {e}"));
            }
            let mut total_sectors = 0u64;
            let known_flags = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
                let mut s8 = [0u8; 8];
                s8.copy_from_slice(&seg[0..8]);
                let mut n4 = [0u8; 4];
                n4.copy_from_slice(&seg[8..12]);
                let mut f4 = [0u8; 4];
                f4.copy_from_slice(&seg[12..16]);
                let seg = Segment {
                    sector: u64::from_le_bytes(s8),
                    num_sectors: u32::from_le_bytes(n4),
                    flags: u32::from_le_bytes(f4),
                };
                // virtio 1.2 §5.2.6.2: unknown flags (and unmap on a
                // discard) are UNSUPP, too many sectors IOERR.
                if seg.flags & !known_flags != 0 {
                    return Err(Rejected {
                        status_addr: Some(status),
                        status: VIRTIO_BLK_S_UNSUPP as u8,
                        reason: format!("{what} segment with unsupported flags {:#x}", seg.flags),
                        warn: true,
                    });
                }
                total_sectors += u64::from(seg.num_sectors);
                if total_sectors > u64::from(max_sectors) {
                    return ioerr(format!(
                        "{what} of {total_sectors} sectors in one request, more than the \
                         {max_sectors} allowed"
                    ));
                }
                if let Err(e) =
                    check_range(disk, seg.sector, u64::from(seg.num_sectors) * SECTOR_SIZE)
                {
                    return ioerr(format!("{what}: {e}"));
                }
                req.segments.push(seg);
            }
            req.kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            };
        }
        other => {
            return Err(Rejected {
                status_addr: Some(status),
                status: VIRTIO_BLK_S_UNSUPP as u8,
                reason: format!("request type {other} is not supported"),
                warn: false,
            })
        }
    }
    Ok(req)
}

/// The outcome of carrying out a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    /// Bytes written into the guest's data buffers (not the status byte).
    pub written: u32,
}

/// Carry out a checked request on `image`. `bounce` is a reusable buffer.
/// I/O errors become IOERR with a logged line naming the device.
pub fn execute(
    name: &str,
    mem: &GuestMemory,
    req: &Request,
    image: &mut dyn DiskImage,
    disk: &DiskInfo,
    bounce: &mut Vec<u8>,
) -> Outcome {
    let mut written: u64 = 0;
    let result: Result<(), String> = match req.kind {
        RequestKind::In | RequestKind::Out => {
            let mut offset = req.sector * SECTOR_SIZE;
            let mut result = Ok(());
            'regions: for r in &req.data {
                let mut done: u64 = 0;
                while done < u64::from(r.len) {
                    let n = (u64::from(r.len) - done).min(CHUNK as u64) as usize;
                    if bounce.len() < n {
                        bounce.resize(n, 0);
                    }
                    let buf = &mut bounce[..n];
                    let addr = GuestAddress(r.addr.0 + done);
                    let step = if req.kind == RequestKind::In {
                        image
                            .read_at(buf, offset)
                            .map_err(|e| format!("read failed: {e}"))
                            .and_then(|()| {
                                mem.write_slice(buf, addr).map_err(|e| {
                                    format!("writing guest memory at {:#x}: {e}", addr.0)
                                })
                            })
                            .map(|()| written += n as u64)
                    } else {
                        mem.read_slice(buf, addr)
                            .map_err(|e| format!("reading guest memory at {:#x}: {e}", addr.0))
                            .and_then(|()| {
                                image
                                    .write_at(buf, offset)
                                    .map_err(|e| format!("write failed: {e}"))
                            })
                    };
                    if let Err(e) = step {
                        result = Err(e);
                        break 'regions;
                    }
                    done += n as u64;
                    offset += n as u64;
                }
            }
            result
        }
        RequestKind::Flush => image.flush().map_err(|e| format!("flush failed: {e}")),
        RequestKind::GetId => {
            let mut left = &disk.serial[..req.data_len as usize];
            let mut result = Ok(());
            for r in &req.data {
                if left.is_empty() {
                    break;
                }
                let n = left.len().min(r.len as usize);
                if let Err(e) = mem.write_slice(&left[..n], r.addr) {
                    result = Err(format!("writing the id at {:#x}: {e}", r.addr.0));
                    break;
                }
                written += n as u64;
                left = &left[n..];
            }
            result
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            let mut result = Ok(());
            for seg in &req.segments {
                let (offset, len) = (
                    seg.sector * SECTOR_SIZE,
                    u64::from(seg.num_sectors) * SECTOR_SIZE,
                );
                let r = if req.kind == RequestKind::Discard {
                    image
                        .discard(offset, len)
                        .map_err(|e| format!("discard failed: {e}"))
                } else {
                    image
                        .write_zeroes(offset, len)
                        .map_err(|e| format!("write-zeroes failed: {e}"))
                };
                if let Err(e) = r {
                    result = Err(e);
                    break;
                }
            }
            result
        }
    };
    // `written` is at most MAX_DATA_BYTES, far below u32::MAX.
    let written = u32::try_from(written).unwrap_or(u32::MAX);
    match result {
        Ok(()) => Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        },
        Err(e) => {
            tracing::warn!("{name}: {e}; the guest gets an I/O error");
            Outcome {
                status: VIRTIO_BLK_S_IOERR as u8,
                written,
            }
        }
    }
}

/// Serve one chain: check it, carry it out, write the status byte. Returns
/// the used length (bytes written to the guest plus the status byte, or 0
/// when there is no usable status byte).
pub fn serve(
    name: &str,
    mem: &GuestMemory,
    parsed: Result<Request, Rejected>,
    image: &mut dyn DiskImage,
    disk: &DiskInfo,
    bounce: &mut Vec<u8>,
) -> u32 {
    let (outcome, status_addr) = match parsed {
        Ok(req) => (execute(name, mem, &req, image, disk, bounce), req.status),
        Err(r) => {
            if r.warn {
                tracing::warn!("{name}: bad request: {}", r.reason);
            } else {
                tracing::debug!("{name}: {}", r.reason);
            }
            match r.status_addr {
                Some(a) => (
                    Outcome {
                        status: r.status,
                        written: 0,
                    },
                    a,
                ),
                None => return 0,
            }
        }
    };
    if let Err(e) = mem.write_obj(outcome.status, status_addr) {
        // Checked in `parse`; only reachable if guest memory changed.
        tracing::warn!(
            "{name}: writing the status byte at {:#x}: {e}",
            status_addr.0
        );
        return outcome.written;
    }
    outcome.written.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn disk(sectors: u64) -> DiskInfo {
        DiskInfo {
            capacity_bytes: sectors * SECTOR_SIZE,
            read_only: false,
            serial: [0; ID_BYTES],
        }
    }

    fn header(mem: &GuestMemory, at: u64, ty: u32, sector: u64) {
        mem.write_obj(ty, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn chain(descs: &[(u64, u32, u16)]) -> impl Iterator<Item = Descriptor> {
        descs
            .iter()
            .map(|&(a, l, f)| Descriptor::new(a, l, f, 0))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn requests_over_the_size_cap_are_refused_before_any_io() {
        // Anonymous memory is only reserved, never touched: 300 MiB is cheap.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 300 << 20)]).unwrap();
        header(&mem, 0, VIRTIO_BLK_T_IN, 0);
        let half = (MAX_DATA_BYTES / 2) as u32;
        let big = disk(1 << 30);
        let ok = parse(
            &mem,
            chain(&[(0, 16, 0), (4096, half, W), (4096, half, W), (0x100, 1, W)]),
            &big,
        )
        .unwrap();
        assert_eq!(ok.data_len, MAX_DATA_BYTES);
        assert_eq!(ok.status, GuestAddress(0x100));
        let e = parse(
            &mem,
            chain(&[
                (0, 16, 0),
                (4096, half, W),
                (4096, half + 512, W),
                (0x100, 1, W),
            ]),
            &big,
        )
        .unwrap_err();
        assert_eq!(e.status_addr, Some(GuestAddress(0x100)));
        assert_eq!(e.status, VIRTIO_BLK_S_IOERR as u8);
        assert!(e.reason.contains("more than"), "{}", e.reason);
    }

    #[test]
    fn data_may_share_the_status_descriptor_and_the_header_may_be_split() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        header(&mem, 0, VIRTIO_BLK_T_IN, 2);
        let r = parse(
            &mem,
            chain(&[(0, 10, 0), (10, 6, 0), (0x1000, 1025, W)]),
            &disk(8),
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::In);
        assert_eq!(r.sector, 2);
        assert_eq!(
            r.data,
            vec![Region {
                addr: GuestAddress(0x1000),
                len: 1024
            }]
        );
        assert_eq!(r.status, GuestAddress(0x1400));
        // A write's data after the header in the same descriptor.
        header(&mem, 0, VIRTIO_BLK_T_OUT, 1);
        let r = parse(&mem, chain(&[(0, 16 + 512, 0), (0x1000, 1, W)]), &disk(8)).unwrap();
        assert_eq!(r.kind, RequestKind::Out);
        assert_eq!(
            r.data,
            vec![Region {
                addr: GuestAddress(16),
                len: 512
            }]
        );
        // Empty chains and a status byte at the top of the address space.
        assert_eq!(
            parse(&mem, chain(&[]), &disk(8)).unwrap_err().status_addr,
            None
        );
        let e = parse(&mem, chain(&[(0, 16, 0), (u64::MAX, 2, W)]), &disk(8)).unwrap_err();
        assert_eq!(e.status_addr, None);
    }
}
