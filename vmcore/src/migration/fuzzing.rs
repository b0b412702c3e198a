//! The body of the `migration_stream` fuzz target (`vmcore/fuzz/`): a
//! migration stream as a target receives it from its peer, through the
//! module's own decoders, against a small guest memory. Every input must
//! give messages or an error, never a panic, a hang or an allocation
//! beyond what the stream carries.
#![doc(hidden)]

use vm_memory::GuestAddress;

use super::{
    apply_pages, decode_bitmaps, decode_config, decode_pages, decode_request, frame, read_header,
    Kind, MessageBuffer,
};
use crate::memory::{GuestMemory, GuestMemoryBackend};

const MAX_MESSAGES: usize = 256;

/// Input: a mode byte, then either the raw stream (mode bit 0 clear:
/// header and framed messages exactly as on the wire, checksums and all)
/// or (bit 0 set) messages as kind u8, length u16, payload, which are
/// framed here with good checksums so the payload decoders see them.
/// Returns the messages decoded.
pub fn migration_stream(data: &[u8]) -> usize {
    // The authentication message, the bounded reader and each decoder
    // alone, as the hardened receive path runs them.
    super::fuzz_decode(data);
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let Ok(mem) = GuestMemory::from_ranges(&[
        (GuestAddress(0), 64 << 10),
        (GuestAddress(1 << 20), 16 << 10),
    ]) else {
        return 0;
    };
    let mut stream = Vec::new();
    let mut r: &[u8] = if mode & 1 == 0 {
        rest
    } else {
        stream.extend_from_slice(&super::header());
        let mut p = rest;
        while p.len() >= 3 {
            let kind = p[0];
            let len = usize::from(u16::from_le_bytes([p[1], p[2]])).min(p.len() - 3);
            let mut f = frame(Kind::Config, &p[3..3 + len]);
            // The kind byte as the input says (unknown kinds too); its
            // checksum covers it, so frame again with it in place.
            f[0] = kind;
            let crc = crc_of(&f);
            f[5..9].copy_from_slice(&crc.to_le_bytes());
            stream.extend_from_slice(&f);
            p = &p[3 + len..];
        }
        &stream
    };
    if read_header(&mut r).is_err() {
        return 0;
    }
    let mut buf = MessageBuffer::default();
    // Fed in pieces, as a socket delivers them.
    // (Not too small: each fill reads through a fresh 64 KiB buffer.)
    let piece = 1024 + usize::from(mode >> 1) * 97;
    let mut n = 0;
    'feed: while n < MAX_MESSAGES {
        let take = piece.min(r.len());
        let (chunk, tail) = r.split_at(take);
        r = tail;
        let mut c = chunk;
        if buf.fill(&mut c).is_err() && take == 0 {
            break;
        }
        loop {
            match buf.next_message() {
                Ok(Some((kind, payload))) => {
                    n += 1;
                    decode(kind, &payload, &mem);
                    if n >= MAX_MESSAGES {
                        break 'feed;
                    }
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        if take == 0 {
            break;
        }
    }
    n
}

/// The checksum of a frame (kind and length, then payload).
fn crc_of(f: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&f[..5]);
    h.update(&f[9..]);
    h.finalize()
}

fn decode(kind: Kind, payload: &[u8], mem: &GuestMemory) {
    match kind {
        Kind::Config => {
            let _ = decode_config(payload);
        }
        Kind::Pages => {
            if let Ok((region, pages, data)) = decode_pages(payload) {
                let _ = apply_pages(mem, region, &pages, data);
            }
        }
        Kind::State => {
            let _ = crate::snapshot::decode_state(payload);
        }
        Kind::Postcopy => {
            if let Ok(b) = decode_bitmaps(payload, mem) {
                assert_eq!(b.len(), mem.num_regions());
            }
        }
        Kind::PageRequest => {
            let _ = decode_request(payload);
        }
        Kind::Ack | Kind::Error | Kind::Complete | Kind::Auth => {
            let _ = String::from_utf8_lossy(payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::fuzzing::tests::XorShift;
    use crate::snapshot::MachineConfig;

    /// A stream a source sends: config, pages, a post-copy bitmap, ack.
    fn valid_stream(mem: &GuestMemory) -> Vec<u8> {
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
        let bitmaps: Vec<Vec<u64>> = mem
            .iter()
            .map(|r| vec![5u64; r.len().div_ceil(PAGE_SIZE).div_ceil(64) as usize])
            .collect();
        write_message(&mut out, Kind::Postcopy, &encode_bitmaps(&bitmaps)).unwrap();
        write_message(&mut out, Kind::PageRequest, &encode_request(1, 2)).unwrap();
        write_message(&mut out, Kind::Ack, &[]).unwrap();
        out
    }

    /// The same messages in the structured mode (framed by the body).
    fn structured(stream: &[u8]) -> Vec<u8> {
        let mut r = stream;
        read_header(&mut r).unwrap();
        let mut out = vec![1u8];
        while let Ok((k, p)) = read_message(&mut r) {
            out.push(k as u8);
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(&p);
        }
        out
    }

    #[test]
    fn migration_stream_survives_random_and_mutated_streams() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 16 << 10),
        ])
        .unwrap();
        let stream = valid_stream(&mem);
        let mut raw = vec![0u8];
        raw.extend_from_slice(&stream);
        let mut big_pieces = vec![0x40u8];
        big_pieces.extend_from_slice(&stream);
        let st = structured(&stream);
        for v in [&raw, &big_pieces, &st] {
            assert_eq!(migration_stream(v), 5);
        }
        let valid = [raw, big_pieces, st];
        crate::fuzzing::save_seeds("migration_stream", &[&valid[0], &valid[1], &valid[2]]);
        let mut rng = XorShift(0x5eed_0401);
        for i in 0..3000 {
            migration_stream(&rng.mutate(&valid[i % 3]));
        }
        for _ in 0..1000 {
            let len = (rng.next_u64() % 400) as usize;
            migration_stream(&rng.bytes(len));
        }
    }
}
