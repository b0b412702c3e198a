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
}
