//! The bodies of the fuzz targets in `vmcore/fuzz/` (cargo-fuzz, nightly)
//! for what a file or a peer controls: a snapshot's state file and a
//! kernel image (the migration stream's body is in
//! `migration::fuzzing`). Plain functions, so stable unit tests also run
//! them over seeded pseudo-random and mutated valid inputs. Every input
//! must give a value or an error, never a panic, a hang or an allocation
//! the input does not pay for.
#![doc(hidden)]

use vm_memory::GuestAddress;

use crate::boot::kernel;
use crate::memory::GuestMemory;
use crate::snapshot::{self, format::StateFile};

/// A snapshot's state file (`state.vsnap`, also the final message of a
/// live migration): decoded, checked and, when it is good, encoded again,
/// which must decode to the same encoding (nothing is lost or invented).
/// Returns whether it decoded.
pub fn snapshot_state(data: &[u8]) -> bool {
    // The raw container (sections, checksums) on its own too: a file
    // whose sections are not a VM snapshot still goes through it.
    if let Ok(file) = StateFile::decode(data) {
        let again = StateFile::decode(&file.encode());
        assert!(again.is_ok(), "a decoded state file does not decode again");
    }
    let Ok(snap) = snapshot::decode_state(data) else {
        return false;
    };
    let Ok(encoded) = snapshot::encode_state(&snap) else {
        return true;
    };
    let again = match snapshot::decode_state(&encoded) {
        Ok(s) => s,
        Err(e) => panic!("a decoded snapshot, encoded again, does not decode: {e}"),
    };
    let twice = snapshot::encode_state(&again).ok();
    assert_eq!(
        twice.as_deref(),
        Some(&encoded[..]),
        "a snapshot changes across decode/encode"
    );
    true
}

/// Guest memory of the kernel target: 4 MiB at 0 (the kernel goes at
/// 1 MiB) and 64 KiB at 16 MiB, so segments may fall in the hole.
fn kernel_memory() -> Option<GuestMemory> {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), 4 << 20),
        (GuestAddress(16 << 20), 64 << 10),
    ])
    .ok()
}

/// The most a fuzzed bzImage payload may unpack to.
pub const MAX_FUZZ_UNPACKED: u64 = 1 << 20;

/// A kernel image (ELF vmlinux or bzImage) loaded into a small guest
/// memory, and a bzImage's payload decompressed on the host (gzip, xz,
/// zstd; at most [`MAX_FUZZ_UNPACKED`] bytes). Returns whether it loaded.
pub fn kernel_image(data: &[u8]) -> bool {
    let Some(mem) = kernel_memory() else {
        return false;
    };
    let loaded = kernel::load_kernel(&mem, "fuzz", data, false);
    if let Some(hdr) = kernel::read_setup_header(data) {
        if let Ok(Some(vmlinux)) = kernel::unpack_bzimage_limited(data, &hdr, MAX_FUZZ_UNPACKED) {
            assert!(vmlinux.len() as u64 <= MAX_FUZZ_UNPACKED);
            // What the host unpacked is loaded as an ELF in turn.
            let _ = kernel::load_kernel(&mem, "fuzz (unpacked)", &vmlinux, false);
        }
    }
    let _ = kernel::mentions_pvm_guest(data);
    match loaded {
        Ok(k) => {
            assert!(k.end >= k.entry.min(k.end), "kernel end before its start");
            true
        }
        Err(_) => false,
    }
}

/// With `VIREO_FUZZ_SEEDS=DIR` set, the tests write their valid inputs to
/// `DIR/<target>/seed-N`: a starting corpus for `cargo fuzz run <target>
/// DIR/<target>`.
pub fn save_seeds(target: &str, inputs: &[&[u8]]) {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::boot::kernel::tests::INIT_SIZE;
    use crate::snapshot::{MachineConfig, VmSnapshot};
    use vireo_hypervisor::{CpuidEntry, Hypervisor};
    use vireo_testkit::kernel::{bzimage_with, elf_vmlinux};

    pub(crate) struct XorShift(pub u64);
    impl XorShift {
        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }
        /// `valid` with a few bytes changed, inserted or cut.
        pub fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
            let mut v = valid.to_vec();
            for _ in 0..1 + self.next_u64() % 4 {
                if v.is_empty() {
                    break;
                }
                let at = (self.next_u64() % v.len() as u64) as usize;
                match self.next_u64() % 6 {
                    0 => v.truncate(at),
                    1 => v.insert(at, self.next_u64() as u8),
                    2 => v[at] ^= 1 << (self.next_u64() % 8),
                    _ => v[at] = self.next_u64() as u8,
                }
            }
            v
        }
    }

    /// A real VM state: an emulated vCPU's and platform's saved state.
    fn valid_state() -> Vec<u8> {
        let hv = vireo_emulator::EmuHypervisor::new();
        let vm = hv.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let snap = VmSnapshot {
            config: MachineConfig {
                backend: vireo_hypervisor::BackendKind::Emu,
                vcpus: 1,
                memory: vireo_api::units::MemorySize::mib_const(16),
                frontend: serde_json::json!({"devices": []}),
            },
            cpuid: vec![vec![CpuidEntry::default(); 2]],
            vcpus: vec![vcpu.save_state(&[]).unwrap()],
            platform: vm.save_platform().unwrap(),
            devices: vec![(
                "cmos".into(),
                crate::snapshot::device::SavedState {
                    version: 1,
                    state: serde_json::json!({"index": 3}),
                },
            )],
        };
        snapshot::encode_state(&snap).unwrap()
    }

    #[test]
    fn snapshot_state_survives_random_and_mutated_files() {
        let valid = valid_state();
        save_seeds("snapshot_state", &[&valid]);
        assert!(snapshot_state(&valid));
        let mut rng = XorShift(0x5eed_0301);
        let mut decoded = 0;
        for _ in 0..3000 {
            decoded += usize::from(snapshot_state(&rng.mutate(&valid)));
        }
        for _ in 0..1000 {
            let len = (rng.next_u64() % 300) as usize;
            snapshot_state(&rng.bytes(len));
        }
        // Checksums refuse nearly every mutation; those that pass (a cut
        // at the end, ...) decode.
        assert!(decoded < 3000);
    }

    #[test]
    fn kernel_image_survives_random_and_mutated_images() {
        let code = [0x90u8; 64];
        let elf = elf_vmlinux(0x10_0000, &code);
        let bz = bzimage_with(0x20f, 1, INIT_SIZE, &[0xcc; 0x400]);
        // A bzImage with a gzip payload holding an ELF (as a real build
        // lays it out).
        let packed = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&elf).unwrap();
            let mut payload = e.finish().unwrap();
            payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
            let mut pm = vec![0xccu8; 0x100];
            pm.extend_from_slice(&payload);
            let mut f = bzimage_with(0x20f, 1, INIT_SIZE, &pm);
            f[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
            f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            f
        };
        for v in [&elf, &bz, &packed] {
            assert!(kernel_image(v));
        }
        let valid = [elf, bz, packed];
        save_seeds("kernel_image", &[&valid[0], &valid[1], &valid[2]]);
        let mut rng = XorShift(0x5eed_0302);
        for i in 0..1500 {
            kernel_image(&rng.mutate(&valid[i % 3]));
        }
        for _ in 0..500 {
            let len = (rng.next_u64() % 0x800) as usize;
            let mut d = rng.bytes(len);
            // Half of them with a magic, so the parsers get past it.
            if d.len() > 0x210 && rng.next_u64() % 2 == 0 {
                d[..4].copy_from_slice(b"\x7fELF");
            } else if d.len() > 0x210 {
                d[0x202..0x206].copy_from_slice(b"HdrS");
            }
            kernel_image(&d);
        }
    }

    /// The claimed unpacked size is checked before anything is reserved
    /// or decompressed.
    #[test]
    fn an_unpacked_size_over_the_limit_is_refused_up_front() {
        let mut pm = vec![0xccu8; 0x100];
        let payload = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        pm.extend_from_slice(&payload);
        let mut f = bzimage_with(0x20f, 1, INIT_SIZE, &pm);
        f[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let hdr = kernel::read_setup_header(&f).unwrap();
        let e = kernel::unpack_bzimage_limited(&f, &hdr, MAX_FUZZ_UNPACKED).unwrap_err();
        assert!(e.contains("more than vireo accepts"), "{e}");
    }
}
