//! The bodies of the device fuzz targets in `devices/fuzz/` (cargo-fuzz,
//! nightly) for what a guest controls: the virtio devices' queues
//! ([`virtio`]), the virtio-pci transport and PCI configuration space
//! ([`pci`]) and the legacy port-I/O devices ([`legacy`]). Plain functions
//! taking the fuzzer's bytes, so stable unit tests also run them over
//! seeded pseudo-random and mutated valid inputs. Every input must return,
//! never panic or hang.
#![doc(hidden)]

pub mod legacy;
pub mod pci;
pub mod virtio;

pub use crate::virtio::block::fuzzing::XorShift;

/// Reads little-endian numbers from the input, zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// Up to `max` bytes, its length first (u16).
    pub fn blob(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Writes what [`Input`] reads, for the tests' valid inputs.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// `valid` with a few bytes changed, inserted or cut (the test's stand-in
/// for libFuzzer's mutations of a seed).
pub fn mutate(rng: &mut XorShift, valid: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    let edits = 1 + rng.next_u64() % 4;
    for _ in 0..edits {
        if v.is_empty() {
            break;
        }
        let at = (rng.next_u64() % v.len() as u64) as usize;
        match rng.next_u64() % 8 {
            0 => v.truncate(at),
            1 => v.insert(at, rng.next_u64() as u8),
            2 => v[at] ^= 1 << (rng.next_u64() % 8),
            3 => v[at] = [0, 1, 0x7f, 0x80, 0xff][(rng.next_u64() % 5) as usize],
            _ => v[at] = rng.next_u64() as u8,
        }
    }
    v
}

/// With `VIREO_FUZZ_SEEDS=DIR` set, the tests write their valid inputs to
/// `DIR/<target>/seed-N`: a starting corpus for `cargo fuzz run <target>
/// DIR/<target>` (e.g. DIR = devices/fuzz/corpus).
pub fn save_seeds(target: &str, inputs: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("VIREO_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    if std::fs::create_dir_all(&dir).is_ok() {
        for (i, input) in inputs.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("seed-{i}")), input);
        }
    }
}
