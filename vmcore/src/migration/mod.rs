//! The live migration stream: how a running VM's memory and state travel
//! from one vireo process to another (over a Unix socket, or TCP with
//! TLS; the transport is the caller's — this module reads and writes any
//! `Read`/`Write`).
//!
//! All integers little endian.
//!
//! ```text
//! auth     one `Auth` message (framed as below): the one-time secret the
//!          target expects (empty when it expects none), sent first so
//!          the target reads nothing else from an unauthenticated peer
//! header   magic "VIREOMIG" | format version u32 | vireo version (32 bytes,
//!          NUL padded) | CRC-32 of the bytes before it u32
//! message  kind u8 | payload length u32 | CRC-32 of kind, length and
//!          payload u32 | payload                          (repeated)
//! ```
//!
//! Source → target: the header, one `Config` (the [`MachineConfig`] as
//! JSON: the target checks it can build that machine and allocates its
//! memory), any number of `Pages` (pre-copy rounds while the guest runs,
//! then the last dirty pages with the guest paused), then one `State`
//! (vCPUs, platform and devices in the snapshot state-file encoding of
//! [`crate::snapshot::encode_state`]). Target → source: `Ack` once the
//! machine is built from the state (the source then exits and the target
//! runs the guest), or `Error` with the reason (the source resumes).
//!
//! Every message is checked (length bound, checksum, payload shape)
//! before it is acted on, and the target builds nothing but guest memory
//! before the whole state has arrived and decoded, so a corrupt stream or
//! one of another format version is refused before any guest runs.

use std::io::{Read, Write};

use crate::memory::{GuestMemory, GuestMemoryBackend};
use crate::snapshot::MachineConfig;
use vm_memory::GuestMemoryRegion;

#[doc(hidden)]
pub mod fuzzing;

pub const MAGIC: &[u8; 8] = b"VIREOMIG";
/// Bumped on every incompatible change; a peer of another version is
/// refused at the header.
/// Version 2: the `Auth` message comes before the header.
/// Version 3: the state is snapshot format 2 (versioned device states).
pub const FORMAT_VERSION: u32 = 3;
pub const PAGE_SIZE: u64 = 4096;
/// Pages per `Pages` message (1 MiB of data).
pub const PAGES_PER_MESSAGE: usize = 256;
const VERSION_FIELD: usize = 32;
pub const HEADER_LEN: usize = 8 + 4 + VERSION_FIELD + 4;
const FRAME_LEN: usize = 1 + 4 + 4;
/// No message is bigger (a full `Pages` is ~1 MiB; the state of a VM with
/// many devices a few MiB at most).
pub const MAX_PAYLOAD: usize = 64 << 20;
/// The largest `Pages` payload (a full message of [`PAGES_PER_MESSAGE`]
/// pages): the bound of what post-copy reads, where nothing bigger comes.
pub const MAX_PAGES_PAYLOAD: usize =
    8 + PAGES_PER_MESSAGE * 8 + PAGES_PER_MESSAGE * PAGE_SIZE as usize;
/// The longest one-time secret an `Auth` message may carry.
pub const MAX_SECRET: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the migration stream")]
    Closed,
    #[error("not a vireo migration stream (bad magic number)")]
    BadMagic,
    #[error("the migration stream is format version {found} (from vireo {writer}), this vireo speaks only version {FORMAT_VERSION}: migrate between matching vireo versions")]
    WrongVersion { found: u32, writer: String },
    #[error("corrupt migration stream: {0}")]
    Corrupt(String),
    #[error("the target refused the migration: {0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, MigrationError>;

/// The kinds of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Config = 1,
    Pages = 2,
    State = 3,
    Ack = 4,
    Error = 5,
    /// Source → target, post-copy only, before `State`: the pages (a
    /// bitmap per region) the target must fetch on demand; every other
    /// page it holds is current.
    Postcopy = 6,
    /// Target → source, post-copy: send this page now (the guest waits
    /// for it).
    PageRequest = 7,
    /// Target → source, post-copy: every page is in; the source may exit.
    Complete = 8,
    /// Source → target, first of all: the one-time secret.
    Auth = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Config,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Ack,
            5 => Kind::Error,
            6 => Kind::Postcopy,
            7 => Kind::PageRequest,
            8 => Kind::Complete,
            9 => Kind::Auth,
            _ => return None,
        })
    }
}

/// The stream header for this vireo.
pub fn header() -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let mut version = [0u8; VERSION_FIELD];
    let v = env!("CARGO_PKG_VERSION").as_bytes();
    let n = v.len().min(VERSION_FIELD);
    version[..n].copy_from_slice(&v[..n]);
    out.extend_from_slice(&version);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Read and check a header; the peer's vireo version.
pub fn read_header(r: &mut dyn Read) -> Result<String> {
    let mut h = [0u8; HEADER_LEN];
    read_exact(r, &mut h)?;
    if &h[..8] != MAGIC {
        return Err(MigrationError::BadMagic);
    }
    let crc = u32::from_le_bytes([
        h[HEADER_LEN - 4],
        h[HEADER_LEN - 3],
        h[HEADER_LEN - 2],
        h[HEADER_LEN - 1],
    ]);
    if crc32fast::hash(&h[..HEADER_LEN - 4]) != crc {
        return Err(MigrationError::Corrupt("header checksum mismatch".into()));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let writer = String::from_utf8_lossy(&h[12..12 + VERSION_FIELD])
        .trim_end_matches('\0')
        .to_string();
    if version != FORMAT_VERSION {
        return Err(MigrationError::WrongVersion {
            found: version,
            writer,
        });
    }
    Ok(writer)
}

fn read_exact(r: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            MigrationError::Closed
        } else {
            MigrationError::Io(e)
        }
    })
}

/// One framed message.
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + payload.len());
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..5]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Write one message; the bytes written.
pub fn write_message(w: &mut dyn Write, kind: Kind, payload: &[u8]) -> Result<u64> {
    let f = frame(kind, payload);
    w.write_all(&f)?;
    Ok(f.len() as u64)
}

/// Messages from a peer that is read a little at a time (post-copy: each
/// side reads only what has arrived, so it can also send): bytes are
/// buffered until a whole message is there, then checked as
/// [`read_message`] checks them.
///
/// The buffer never holds more than one largest message (its frame and
/// `max_payload` bytes) plus one read chunk: a peer that streams without
/// end, or announces a message above the bound, gets an error, not a
/// host that buffers without limit.
pub struct MessageBuffer {
    buf: Vec<u8>,
    max_payload: usize,
}

impl Default for MessageBuffer {
    fn default() -> Self {
        MessageBuffer::new(MAX_PAYLOAD)
    }
}

/// Bytes a [`MessageBuffer::fill`] reads at a time.
const FILL_CHUNK: usize = 64 << 10;

impl MessageBuffer {
    /// A buffer for messages of at most `max_payload` bytes (at most
    /// [`MAX_PAYLOAD`]).
    pub fn new(max_payload: usize) -> MessageBuffer {
        MessageBuffer {
            buf: Vec::new(),
            max_payload: max_payload.min(MAX_PAYLOAD),
        }
    }

    /// Bytes buffered (whole messages not taken yet and a partial one).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The frame header at the front claims more than the bound.
    fn check_front(&self) -> Result<()> {
        if self.buf.len() >= FRAME_LEN {
            let len =
                u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            if len > self.max_payload {
                return Err(MigrationError::Corrupt(format!(
                    "a message claims {len} bytes (at most {} here)",
                    self.max_payload
                )));
            }
        }
        Ok(())
    }

    /// Read what `r` has: reads until one returns less than a full chunk
    /// (a timeout is not an error) or a whole largest message is
    /// buffered. Call it when the socket is readable.
    pub fn fill(&mut self, r: &mut dyn Read) -> Result<()> {
        loop {
            self.check_front()?;
            if self.buf.len() >= FRAME_LEN + self.max_payload {
                // At least one whole message is here: let the caller
                // take it before reading more.
                return Ok(());
            }
            // Read into the buffer's own tail (its capacity is kept from
            // call to call: no allocation per read).
            let len = self.buf.len();
            self.buf.resize(len + FILL_CHUNK, 0);
            let read = r.read(&mut self.buf[len..]);
            self.buf.truncate(len + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err(MigrationError::Closed),
                Ok(n) => {
                    if n < FILL_CHUNK {
                        return self.check_front();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(MigrationError::Io(e)),
            }
        }
    }

    /// The next whole message in the buffer.
    pub fn next_message(&mut self) -> Result<Option<(Kind, Vec<u8>)>> {
        if self.buf.len() < FRAME_LEN {
            return Ok(None);
        }
        self.check_front()?;
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < FRAME_LEN + len {
            return Ok(None);
        }
        let rest = self.buf.split_off(FRAME_LEN + len);
        let whole = std::mem::replace(&mut self.buf, rest);
        read_message_limited(&mut whole.as_slice(), self.max_payload).map(Some)
    }
}

/// A `Postcopy` payload: per region, its bitmap length in words u32 and
/// the words (u64).
pub fn encode_bitmaps(bitmaps: &[Vec<u64>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(bitmaps.len() as u32).to_le_bytes());
    for b in bitmaps {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        for w in b {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

/// Decode a `Postcopy` payload, checking it against the regions of `mem`
/// (one bitmap per region, of the region's size).
pub fn decode_bitmaps(payload: &[u8], mem: &GuestMemory) -> Result<Vec<Vec<u64>>> {
    let bad = |what: &str| MigrationError::Corrupt(format!("post-copy page list: {what}"));
    let mut at = 0usize;
    let u32_at = |p: &[u8], at: &mut usize| -> Result<u32> {
        let b = p
            .get(*at..at.saturating_add(4))
            .ok_or_else(|| bad("truncated"))?;
        *at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let regions = u32_at(payload, &mut at)? as usize;
    if regions != mem.num_regions() {
        return Err(bad(&format!(
            "{regions} regions, the machine has {}",
            mem.num_regions()
        )));
    }
    let mut out = Vec::with_capacity(regions);
    for r in mem.iter() {
        let words = u32_at(payload, &mut at)? as usize;
        if words != r.len().div_ceil(PAGE_SIZE).div_ceil(64) as usize {
            return Err(bad("a bitmap does not fit its region"));
        }
        let end = words
            .checked_mul(8)
            .and_then(|n| n.checked_add(at))
            .ok_or_else(|| bad("a bitmap length overflows"))?;
        let bytes = payload.get(at..end).ok_or_else(|| bad("truncated"))?;
        at = end;
        out.push(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_le_bytes(a)
                })
                .collect(),
        );
    }
    if at != payload.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// A `PageRequest` payload: region u32 | page u64.
pub fn encode_request(region: u32, page: u64) -> Vec<u8> {
    let mut out = region.to_le_bytes().to_vec();
    out.extend_from_slice(&page.to_le_bytes());
    out
}

pub fn decode_request(payload: &[u8]) -> Result<(u32, u64)> {
    if payload.len() != 12 {
        return Err(MigrationError::Corrupt(format!(
            "page request of {} bytes",
            payload.len()
        )));
    }
    let mut p = [0u8; 8];
    p.copy_from_slice(&payload[4..]);
    Ok((
        u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]),
        u64::from_le_bytes(p),
    ))
}

/// Read one message and check its length and checksum.
pub fn read_message(r: &mut dyn Read) -> Result<(Kind, Vec<u8>)> {
    read_message_limited(r, MAX_PAYLOAD)
}

/// [`read_message`] refusing payloads above `max` bytes. The payload
/// buffer grows with what arrives, not with what the length claims.
pub fn read_message_limited(r: &mut dyn Read, max: usize) -> Result<(Kind, Vec<u8>)> {
    let mut h = [0u8; FRAME_LEN];
    read_exact(r, &mut h)?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let crc = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
    let max = max.min(MAX_PAYLOAD);
    if len > max {
        return Err(MigrationError::Corrupt(format!(
            "a message claims {len} bytes (at most {max})"
        )));
    }
    let mut payload = Vec::with_capacity(len.min(1 << 20));
    r.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() != len {
        return Err(MigrationError::Closed);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[..5]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Err(MigrationError::Corrupt("message checksum mismatch".into()));
    }
    let kind = Kind::from_u8(h[0])
        .ok_or_else(|| MigrationError::Corrupt(format!("unknown message kind {}", h[0])))?;
    Ok((kind, payload))
}

pub fn encode_config(config: &MachineConfig) -> Vec<u8> {
    // A struct of strings, numbers and a JSON value: serializing it
    // cannot fail.
    serde_json::to_vec(config).unwrap_or_default()
}

pub fn decode_config(payload: &[u8]) -> Result<MachineConfig> {
    serde_json::from_slice(payload)
        .map_err(|e| MigrationError::Corrupt(format!("machine configuration: {e}")))
}

/// A `Pages` payload: region index u32 | count u32 | count page indices
/// (u64, within the region) | count × 4096 bytes.
pub fn encode_pages(region: u32, pages: &[u64], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + pages.len() * 8 + data.len());
    out.extend_from_slice(&region.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Decoded `Pages`: (region, page indices, their bytes).
pub fn decode_pages(payload: &[u8]) -> Result<(u32, Vec<u64>, &[u8])> {
    let bad = |what: String| MigrationError::Corrupt(format!("page message: {what}"));
    if payload.len() < 8 {
        return Err(bad(format!("{} bytes", payload.len())));
    }
    let region = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let count = u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]) as usize;
    if count > PAGES_PER_MESSAGE {
        return Err(bad(format!("{count} pages (at most {PAGES_PER_MESSAGE})")));
    }
    // count <= PAGES_PER_MESSAGE, so this cannot overflow.
    let want = 8 + count * (8 + PAGE_SIZE as usize);
    if payload.len() != want {
        return Err(bad(format!(
            "{} bytes for {count} pages, expected {want}",
            payload.len()
        )));
    }
    let pages = payload[8..8 + count * 8]
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect();
    Ok((region, pages, &payload[8 + count * 8..]))
}

/// Copy received pages into guest memory that no vCPU runs on yet,
/// refusing pages outside the region.
pub fn apply_pages(mem: &GuestMemory, region: u32, pages: &[u64], data: &[u8]) -> Result<()> {
    let r = mem.iter().nth(region as usize).ok_or_else(|| {
        MigrationError::Corrupt(format!(
            "pages for memory region {region}, which does not exist"
        ))
    })?;
    if data.len() != pages.len().saturating_mul(PAGE_SIZE as usize) {
        return Err(MigrationError::Corrupt(format!(
            "{} bytes for {} pages",
            data.len(),
            pages.len()
        )));
    }
    for (page, bytes) in pages.iter().zip(data.chunks_exact(PAGE_SIZE as usize)) {
        let offset = page_offset(r.len(), *page).ok_or_else(|| {
            MigrationError::Corrupt(format!(
                "page {page} is outside memory region {region} ({} pages)",
                r.len() / PAGE_SIZE
            ))
        })?;
        // SAFETY: `page_offset` checked that the 4 KiB at `offset` lie
        // inside the region's live mapping owned by `mem`; no vCPU runs
        // on this memory yet and `bytes` is a separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                r.as_ptr().add(offset),
                PAGE_SIZE as usize,
            )
        };
    }
    Ok(())
}

/// The byte offset of page `page` in a region of `region_len` bytes, if
/// the whole page lies inside it (a page number from a peer may be
/// anything: no overflow, no page past the end).
pub fn page_offset(region_len: u64, page: u64) -> Option<usize> {
    let start = page.checked_mul(PAGE_SIZE)?;
    let end = start.checked_add(PAGE_SIZE)?;
    if end > region_len {
        return None;
    }
    usize::try_from(start).ok()
}

/// Compare a secret the peer sent with the expected one in time that
/// depends only on their lengths (not on where they first differ), so a
/// peer learns nothing from how fast it is refused.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// The `Auth` message a source sends first: its secret (empty for none).
pub fn auth_message(secret: &[u8]) -> Vec<u8> {
    frame(Kind::Auth, secret)
}

/// Read the first message of a connection, which must be `Auth`, and
/// return the secret it carries. A peer that starts with the stream
/// header instead (a vireo from before authentication) is told so.
pub fn read_auth(r: &mut dyn Read) -> Result<Vec<u8>> {
    let mut h = [0u8; FRAME_LEN];
    read_exact(r, &mut h)?;
    if h[..8] == MAGIC[..] {
        return Err(MigrationError::Corrupt(
            "the source sent no authentication (a vireo older than this one?): migrate between matching vireo versions".into(),
        ));
    }
    let mut chained = (&h[..]).chain(r);
    let (kind, payload) = read_message_limited(&mut chained, MAX_SECRET)?;
    if kind != Kind::Auth {
        return Err(MigrationError::Corrupt(format!(
            "expected the authentication first, got {kind:?}"
        )));
    }
    Ok(payload)
}

/// The bytes of page `page` of `region` (the guest may write it while it
/// is read: a torn copy is sent again, the page being dirty).
pub fn page_bytes(
    region: &vm_memory::GuestRegionMmap<crate::memory::AtomicBitmap>,
    page: u64,
) -> &[u8] {
    // SAFETY: callers pass pages of the region's dirty bitmap, which
    // covers exactly the region's length, so the 4 KiB lie inside its
    // live mapping; guest memory is plain bytes that other threads may
    // change, which a byte copy tolerates (the page is dirty again then).
    unsafe {
        std::slice::from_raw_parts(
            region.as_ptr().add((page * PAGE_SIZE) as usize),
            PAGE_SIZE as usize,
        )
    }
}

/// True if every byte of `page` is zero (fresh memory on the target is
/// zero, so the first round skips such pages).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting bytes as u64 words is valid for any bit
        // pattern; align_to puts misaligned bytes in head/tail.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Run every decoder of the stream over arbitrary bytes, as a fuzz
/// target does (`cargo fuzz run migration_stream`): the bytes as a whole
/// target-side stream (auth, header, messages, each payload decoded and
/// pages applied to a small guest memory), as each payload alone, as one
/// message of the kind the first byte names with a valid checksum (so the
/// payload decoders are reached past the CRC), and through a
/// [`MessageBuffer`] fed in pieces. Nothing here may panic, hang or
/// allocate much beyond the input; errors are the expected outcome.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    thread_local! {
        // Two small regions, so region indices and per-region bitmaps
        // are exercised; made once per thread (fuzzers call this often).
        static MEM: Option<GuestMemory> = GuestMemory::from_ranges(&[
            (vm_memory::GuestAddress(0), 64 << 10),
            (vm_memory::GuestAddress(1 << 20), 32 << 10),
        ])
        .ok();
    }
    MEM.with(|mem| {
        let Some(mem) = mem.as_ref() else { return };
        let payload = |kind: Kind, p: &[u8]| -> Result<()> {
            match kind {
                Kind::Config => drop(decode_config(p)?),
                Kind::Pages => {
                    let (region, pages, bytes) = decode_pages(p)?;
                    apply_pages(mem, region, &pages, bytes)?;
                }
                Kind::Postcopy => drop(decode_bitmaps(p, mem)?),
                Kind::PageRequest => drop(decode_request(p)?),
                Kind::State | Kind::Ack | Kind::Error | Kind::Complete | Kind::Auth => {}
            }
            Ok(())
        };
        // As a stream.
        let mut r = data;
        let _ = (|| -> Result<()> {
            read_auth(&mut r)?;
            read_header(&mut r)?;
            for _ in 0..64 {
                let (kind, p) = read_message_limited(&mut r, MAX_PAGES_PAYLOAD)?;
                payload(kind, &p)?;
            }
            Ok(())
        })();
        // Each payload decoder alone.
        for kind in [Kind::Config, Kind::Pages, Kind::Postcopy, Kind::PageRequest] {
            let _ = payload(kind, data);
        }
        let _ = read_header(&mut &data[..]);
        let _ = read_auth(&mut &data[..]);
        // One well-framed message of the kind the first byte names.
        if let Some((&k, rest)) = data.split_first() {
            if let Some(kind) = Kind::from_u8(k % 10) {
                let f = frame(kind, rest);
                if let Ok((kind, p)) = read_message(&mut &f[..]) {
                    let _ = payload(kind, &p);
                }
            }
        }
        // Through a message buffer, in pieces of a size the input picks.
        let piece = usize::from(data.first().copied().unwrap_or(1)).max(1);
        let mut buf = MessageBuffer::new(MAX_PAGES_PAYLOAD);
        for part in data.chunks(piece) {
            if buf.fill(&mut &part[..]).is_err() {
                break;
            }
            while let Ok(Some((kind, p))) = buf.next_message() {
                let _ = payload(kind, &p);
            }
            assert!(buf.buffered() <= FRAME_LEN + MAX_PAGES_PAYLOAD + FILL_CHUNK);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut out = header();
        let cfg = MachineConfig {
            backend: vireo_hypervisor::BackendKind::Emu,
            vcpus: 1,
            memory: vireo_api::units::MemorySize::mib_const(16),
            frontend: serde_json::json!({"devices": []}),
        };
        write_message(&mut out, Kind::Config, &encode_config(&cfg)).unwrap();
        let data = vec![0xabu8; 2 * PAGE_SIZE as usize];
        write_message(&mut out, Kind::Pages, &encode_pages(0, &[3, 9], &data)).unwrap();
        write_message(&mut out, Kind::Ack, &[]).unwrap();
        out
    }

    #[test]
    fn roundtrip() {
        let bytes = stream();
        let mut r = &bytes[..];
        assert_eq!(read_header(&mut r).unwrap(), env!("CARGO_PKG_VERSION"));
        let (k, p) = read_message(&mut r).unwrap();
        assert_eq!(k, Kind::Config);
        assert_eq!(decode_config(&p).unwrap().memory.mib(), 16);
        let (k, p) = read_message(&mut r).unwrap();
        assert_eq!(k, Kind::Pages);
        let (region, pages, data) = decode_pages(&p).unwrap();
        assert_eq!((region, pages), (0, vec![3, 9]));
        assert_eq!(data, &[0xab; 8192][..]);
        assert_eq!(read_message(&mut r).unwrap(), (Kind::Ack, vec![]));
        assert!(matches!(read_message(&mut r), Err(MigrationError::Closed)));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = stream();
        // Flip bits across the header and the first two messages.
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let mut r = &b[..];
            let result = read_header(&mut r).and_then(|_| {
                for _ in 0..3 {
                    let (k, p) = read_message(&mut r)?;
                    match k {
                        Kind::Config => drop(decode_config(&p)?),
                        Kind::Pages => drop(decode_pages(&p)?),
                        _ => {}
                    }
                }
                Ok(())
            });
            assert!(result.is_err(), "a flipped bit at byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncated_streams_are_refused() {
        let bytes = stream();
        for len in [0, 5, HEADER_LEN - 1, HEADER_LEN + 3, bytes.len() - 1] {
            let mut r = &bytes[..len];
            let result = read_header(&mut r)
                .and_then(|_| read_message(&mut r))
                .and_then(|_| read_message(&mut r))
                .and_then(|_| read_message(&mut r));
            assert!(result.is_err(), "a stream cut at {len} was accepted");
        }
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut h = header();
        h[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_LEN - 4]);
        h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        let e = read_header(&mut &h[..]).unwrap_err();
        assert!(
            matches!(e, MigrationError::WrongVersion { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(e.to_string().contains("version"), "{e}");
        assert!(matches!(
            read_header(
                &mut &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(), &[b'.'; 40]].concat()[..]
            )
            .unwrap_err(),
            MigrationError::BadMagic
        ));
    }

    #[test]
    fn oversized_and_misshapen_messages_are_refused() {
        let mut f = frame(Kind::State, b"x");
        f[1..5].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(MigrationError::Corrupt(_))
        ));
        let unknown = frame(Kind::Ack, b"");
        let mut u = unknown.clone();
        u[0] = 99;
        // Re-checksum so only the kind is wrong.
        let crc = {
            let mut h = crc32fast::Hasher::new();
            h.update(&u[..5]);
            h.finalize()
        };
        u[5..9].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            read_message(&mut &u[..]),
            Err(MigrationError::Corrupt(_))
        ));
        assert!(decode_pages(&encode_pages(0, &[1, 2], &[0u8; 4096])).is_err());
        assert!(decode_pages(&[1, 2, 3]).is_err());
        let mut too_many = encode_pages(0, &[], &[]);
        too_many[4..8].copy_from_slice(&(PAGES_PER_MESSAGE as u32 + 1).to_le_bytes());
        assert!(decode_pages(&too_many).is_err());
    }

    #[test]
    fn pages_land_in_memory_and_out_of_range_pages_are_refused() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::memory::test_memory(1);
        let data: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        apply_pages(&mem, 0, &[5], &data).unwrap();
        let mut back = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut back, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        assert_eq!(back, data);
        assert!(apply_pages(&mem, 0, &[256], &data).is_err());
        assert!(apply_pages(&mem, 1, &[0], &data).is_err());
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }

    /// A reader that hands out `left` bytes of `byte`, then would block.
    struct Flood {
        left: usize,
        reads: usize,
    }
    impl Read for Flood {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads += 1;
            if self.left == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.left);
            buf[..n].fill(0);
            // A frame header of kind 2 claiming a small payload, then
            // zeros: an endless run of (bad-checksum) messages.
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_message_buffer_stays_bounded_whatever_the_peer_sends() {
        // A peer that announces a message above the bound is refused as
        // soon as the frame header is in, before its payload is read.
        let mut f = frame(Kind::Pages, b"");
        f[1..5].copy_from_slice(&(MAX_PAGES_PAYLOAD as u32 + 1).to_le_bytes());
        let mut buf = MessageBuffer::new(MAX_PAGES_PAYLOAD);
        let e = buf.fill(&mut &f[..]).unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");
        // A peer that streams without end: each fill stops once a largest
        // message is buffered, however much more is there to read (the
        // old buffer read all 1 GiB in one call).
        let mut flood = Flood {
            left: 1 << 30,
            reads: 0,
        };
        let mut buf = MessageBuffer::new(MAX_PAGES_PAYLOAD);
        buf.fill(&mut flood).unwrap();
        assert!(
            buf.buffered() <= FRAME_LEN + MAX_PAGES_PAYLOAD + FILL_CHUNK,
            "{} bytes buffered",
            buf.buffered()
        );
        assert!(flood.left > 0);
        // Zeros are a message of kind 0: refused, not buffered on.
        assert!(buf.next_message().is_err());
        // read_message_limited refuses above its bound too.
        let big = frame(Kind::Error, &[b'x'; 2000]);
        assert!(matches!(
            read_message_limited(&mut &big[..], 1000),
            Err(MigrationError::Corrupt(_))
        ));
        assert!(read_message_limited(&mut &big[..], 2000).is_ok());
    }

    #[test]
    fn a_length_claimed_but_not_sent_allocates_nothing_big() {
        // 64 MiB claimed, 3 bytes sent: the peer closed, and the payload
        // buffer grew with the 3 bytes only (no 64 MiB zeroed up front).
        let mut f = frame(Kind::State, b"abc");
        f[1..5].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(MigrationError::Closed)
        ));
    }

    #[test]
    fn forged_page_numbers_and_regions_get_errors_not_panics() {
        let mem = crate::memory::test_memory(1);
        let page = vec![7u8; PAGE_SIZE as usize];
        for (region, p) in [
            (0u32, 256u64),            // one past the end
            (0, u64::MAX),             // page * 4096 overflows
            (0, u64::MAX / PAGE_SIZE), // start fits, end overflows
            (0, 1 << 52),              // wraps to 0 in 64 bits
            (u32::MAX, 0),             // no such region
        ] {
            let msg = encode_pages(region, &[p], &page);
            let (r, pages, data) = decode_pages(&msg).unwrap();
            assert!(
                apply_pages(&mem, r, &pages, data).is_err(),
                "region {region} page {p} was applied"
            );
        }
        assert_eq!(page_offset(1 << 20, 255), Some(255 << 12));
        assert_eq!(page_offset(1 << 20, 256), None);
        assert_eq!(page_offset(u64::MAX, u64::MAX), None);
        // Data that does not match the page list.
        assert!(apply_pages(&mem, 0, &[1, 2], &page).is_err());
        // Bitmaps: wrong region count, a word count that would overflow,
        // truncation, trailing bytes.
        let good = encode_bitmaps(&[vec![0u64; 4]]);
        assert!(decode_bitmaps(&good, &mem).is_ok());
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_bitmaps(&huge, &mem).is_err());
        assert!(decode_bitmaps(&encode_bitmaps(&[vec![0u64; 4], vec![]]), &mem).is_err());
        assert!(decode_bitmaps(&good[..good.len() - 1], &mem).is_err());
        assert!(decode_bitmaps(&[good.clone(), vec![0]].concat(), &mem).is_err());
        assert!(decode_bitmaps(&[1, 0], &mem).is_err());
        assert!(decode_request(&[0; 11]).is_err());
    }

    #[test]
    fn the_secret_comes_first_and_is_compared_whole() {
        let m = auth_message(b"s3cret");
        assert_eq!(read_auth(&mut &m[..]).unwrap(), b"s3cret");
        assert!(secrets_equal(b"s3cret", b"s3cret"));
        for other in [&b"s3creT"[..], b"s3cre", b"s3crets", b""] {
            assert!(!secrets_equal(other, b"s3cret"), "{other:?}");
        }
        // An old source starts with the header: told why.
        let e = read_auth(&mut &header()[..]).unwrap_err();
        assert!(e.to_string().contains("no authentication"), "{e}");
        // Another message first, an oversize secret, nothing at all.
        let ack = frame(Kind::Ack, b"");
        assert!(read_auth(&mut &ack[..]).is_err());
        let long = auth_message(&vec![b'a'; MAX_SECRET + 1]);
        assert!(read_auth(&mut &long[..]).is_err());
        assert!(matches!(
            read_auth(&mut &[][..]),
            Err(MigrationError::Closed)
        ));
    }

    /// A stream a real source could send, auth included.
    fn valid_stream() -> Vec<u8> {
        let mut out = auth_message(b"0123456789abcdef");
        out.extend_from_slice(&stream());
        let mut bitmaps = Vec::new();
        write_message(
            &mut bitmaps,
            Kind::Postcopy,
            &encode_bitmaps(&[vec![1u64; 1], vec![3u64; 1]]),
        )
        .unwrap();
        out.extend_from_slice(&bitmaps);
        out
    }

    /// xorshift64*: a deterministic stream of pseudo-random numbers.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.max(1);
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// The fuzz target's body over a few thousand seeded inputs: random
    /// bytes, random framed messages, and mutations of a valid stream
    /// (bit flips, truncation, spliced lengths). Any panic fails the test.
    #[test]
    fn fuzz_decode_survives_seeded_inputs() {
        let valid = valid_stream();
        let mut next = rng(0x5eed);
        fuzz_decode(&valid);
        fuzz_decode(&[]);
        for i in 0..3000u64 {
            let input: Vec<u8> = match i % 4 {
                0 => {
                    let len = (next() % 512) as usize;
                    (0..len).map(|_| next() as u8).collect()
                }
                1 => {
                    // A message of a random kind with a random payload,
                    // framed with a right checksum.
                    let kind = (next() % 10) as u8;
                    let len = (next() % 64) as usize;
                    let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    if kind == 2 && next() % 2 == 0 {
                        // A page message with a plausible shape.
                        let count = (next() % 3) as u32;
                        p = encode_pages(
                            (next() % 3) as u32,
                            &(0..count).map(|_| next() % 40).collect::<Vec<_>>(),
                            &vec![0u8; count as usize * PAGE_SIZE as usize],
                        );
                    }
                    [vec![kind], p].concat()
                }
                _ => {
                    let mut b = valid.clone();
                    for _ in 0..1 + next() % 4 {
                        let at = (next() as usize) % b.len();
                        match next() % 3 {
                            0 => b[at] ^= 1 << (next() % 8),
                            1 => b[at] = next() as u8,
                            _ => {
                                // A length field overwritten with an
                                // extreme value.
                                let v =
                                    [u32::MAX, MAX_PAYLOAD as u32 + 1, 0][(next() % 3) as usize];
                                let end = (at + 4).min(b.len());
                                let n = end - at;
                                b[at..end].copy_from_slice(&v.to_le_bytes()[..n]);
                            }
                        }
                    }
                    if next() % 4 == 0 {
                        let keep = (next() as usize) % b.len();
                        b.truncate(keep);
                    }
                    b
                }
            };
            fuzz_decode(&input);
        }
    }
}
