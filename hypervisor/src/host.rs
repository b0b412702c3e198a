//! Facts about the host that decide how fast a backend can run a guest.

use std::path::Path;

/// What the host offers for hardware-assisted virtualization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirt {
    /// The CPU advertises VT-x (`vmx`) or AMD-V (`svm`).
    pub hardware_virt: bool,
    /// `/dev/kvm` is provided by the PVM module (`kvm_pvm`).
    pub kvm_pvm: bool,
}

impl HostVirt {
    pub fn detect() -> Self {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_sources(&flags, Path::new("/sys/module/kvm_pvm").exists())
    }

    pub fn from_sources(cpuinfo: &str, kvm_pvm_module: bool) -> Self {
        let hardware_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .any(|f| f == "vmx" || f == "svm");
        HostVirt {
            hardware_virt,
            kvm_pvm: kvm_pvm_module,
        }
    }

    /// KVM here can only run PVM-aware guest kernels at native speed; any
    /// other guest is emulated instruction by instruction by the host kernel.
    pub fn kvm_is_pvm_only(&self) -> bool {
        self.kvm_pvm && !self.hardware_virt
    }
}

/// Memory the host can give a guest: physical RAM plus swap, in bytes.
pub fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(
        parse_meminfo_kib(&meminfo, "MemTotal:")? * 1024
            + parse_meminfo_kib(&meminfo, "SwapTotal:").unwrap_or(0) * 1024,
    )
}

fn parse_meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_without_hardware_virt() {
        let h = HostVirt::from_sources("flags\t\t: fpu vme sse2 hypervisor\n", true);
        assert!(h.kvm_is_pvm_only());
        let h = HostVirt::from_sources("flags\t\t: fpu vmx sse2\n", true);
        assert!(!h.kvm_is_pvm_only());
        let h = HostVirt::from_sources("flags\t\t: fpu svm\n", false);
        assert!(h.hardware_virt && !h.kvm_is_pvm_only());
    }

    #[test]
    fn parses_meminfo() {
        let m = "MemTotal:       24576000 kB\nSwapTotal:  1024 kB\n";
        assert_eq!(parse_meminfo_kib(m, "MemTotal:"), Some(24_576_000));
        assert_eq!(parse_meminfo_kib(m, "SwapTotal:"), Some(1024));
        assert_eq!(parse_meminfo_kib(m, "Nope:"), None);
    }
}
