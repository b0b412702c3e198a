//! The CPUID a vCPU sees: what the backend supports, with this vCPU's
//! identity and the VM's topology written in, and the hypervisor bit set.
//!
//! The topology is one socket of `count` single-thread cores; vCPU `i` has
//! APIC id `i`.

use vireo_hypervisor::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaves 0xB/0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

fn is_amd(entries: &[CpuidEntry]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// Bits needed to hold `count` distinct ids.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// CPUID for vCPU `vcpu_id` of a VM with `count` vCPUs.
pub fn guest_cpuid(supported: &[CpuidEntry], vcpu_id: u32, count: u32) -> Vec<CpuidEntry> {
    let amd = is_amd(supported);
    let shift = id_bits(count);
    let mut out = Vec::with_capacity(supported.len());
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (vcpu_id << 24) | (count.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: addressable core ids in the package, minus one.
                // EAX[25:14]: threads sharing this cache, minus one (no SMT).
                e.eax = (e.eax & 0x3fff) | ((count.min(64) - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = vcpu_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZE if amd => {
                // ECX[15:12] APIC id size, ECX[7:0] cores in the package minus one.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1).min(255);
            }
            LEAF_AMD_TOPOLOGY if amd => {
                e.eax = vcpu_id;
                e.ebx = vcpu_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0000_0000,
            edx: 0x0000_0000,
        }
    }

    fn find(entries: &[CpuidEntry], f: u32, i: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let sup = vec![leaf(0, 0), leaf(1, 0)];
        let c = guest_cpuid(&sup, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0xffff, "low bits kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = find(&guest_cpuid(&sup, 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_reports_x2apic_id_and_core_count() {
        let sup = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        let c = guest_cpuid(&sup, 5, 6);
        assert_eq!(find(&c, 0xb, 0).edx, 5);
        assert_eq!(find(&c, 0xb, 0).ebx, 1);
        assert_eq!(find(&c, 0xb, 1).ebx, 6);
        assert_eq!(find(&c, 0xb, 1).eax, 3, "6 cores need 3 id bits");
        assert_eq!(find(&c, 0xb, 1).ecx >> 8, LEVEL_CORE);
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0, "invalid level terminates");
    }

    #[test]
    fn amd_leaves_only_touched_on_amd() {
        let mut vendor = leaf(0, 0);
        (vendor.ebx, vendor.edx, vendor.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        let amd = guest_cpuid(&[vendor, leaf(0x8000_0008, 0)], 0, 4);
        assert_eq!(find(&amd, 0x8000_0008, 0).ecx & 0xff, 3);
        let intel = guest_cpuid(&[leaf(0, 0), leaf(0x8000_0008, 0)], 0, 4);
        assert_eq!(find(&intel, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
