//! What a VM may be given, whoever defines it (`vireo run`'s flags, the
//! daemon's API): the limits, the defaults, the backend choice, and the one
//! check of a definition's vCPUs, memory and balloon against them. The VM
//! core checks the same way before it allocates anything; the front ends
//! say which flag or field a refused value came from.

use serde::{Deserialize, Serialize};

use crate::units::MemorySize;

/// Fewest vCPUs a VM may have.
pub const MIN_VCPUS: u32 = 1;
/// Most vCPUs a VM may have: they are described by 8-bit xAPIC ids in the
/// MADT. A backend may allow fewer.
pub const MAX_VCPUS: u32 = 254;
/// The vCPUs of a VM that does not say.
pub const DEFAULT_VCPUS: u32 = 1;
/// The smallest guest vireo will create: room for the boot structures, a
/// small kernel and its page tables.
pub const MIN_MEMORY: MemorySize = MemorySize::mib_const(16);
/// The memory of a VM that does not say.
pub const DEFAULT_MEMORY: MemorySize = MemorySize::mib_const(256);
/// The Linux boot protocol's command line limit (without the NUL).
pub const MAX_CMDLINE: usize = 2047;

/// Which backend runs the VM, as `vireo run --accel`: KVM, the fastest
/// available, or vireo's software emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware-assisted virtualization through /dev/kvm.
    Kvm,
    /// The fastest backend that can run this guest here: KVM with VT-x or
    /// AMD-V; on a PVM-only KVM host, KVM only for a PVM-aware kernel and
    /// the emulator otherwise; the emulator when /dev/kvm is unusable.
    #[default]
    Auto,
    /// vireo's own software x86-64 emulator: no /dev/kvm needed. It boots
    /// stock Linux kernels, but slowly (minutes) until it gets a JIT.
    Emu,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
            Accel::Emu => "emu",
        }
    }

    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "auto" => Some(Accel::Auto),
            "emu" => Some(Accel::Emu),
            _ => None,
        }
    }
}

/// A quantity of a definition outside what vireo, the backend or the host
/// allows. Each variant carries the numbers, so a front end can name its
/// own flag or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{requested} vCPUs: must be between {MIN_VCPUS} and {max}")]
    VcpuCount { requested: u32, max: u32 },
    #[error("{requested} of memory: must be at least {MIN_MEMORY}")]
    MemoryTooSmall { requested: MemorySize },
    #[error("{requested} of memory is more than this host's {host} of RAM")]
    MemoryTooLarge {
        requested: MemorySize,
        host: MemorySize,
    },
    #[error(
        "a balloon target of {target_mib} MiB must be less than the {memory} of memory: \
         the balloon takes that much from the guest"
    )]
    BalloonTooLarge { target_mib: u64, memory: MemorySize },
}

/// What this host and backend allow on top of vireo's own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// The most vCPUs the backend runs (capped at [`MAX_VCPUS`]).
    pub max_vcpus: u32,
    /// The host's RAM (and swap), when known.
    pub memory: Option<MemorySize>,
}

impl HostLimits {
    /// vireo's own limits, on a host of `memory`.
    pub fn new(max_vcpus: u32, memory: Option<MemorySize>) -> HostLimits {
        HostLimits {
            max_vcpus: max_vcpus.min(MAX_VCPUS),
            memory,
        }
    }
}

/// Check a definition's vCPU count and memory size.
pub fn check_resources(
    vcpus: u32,
    memory: MemorySize,
    limits: HostLimits,
) -> Result<(), LimitError> {
    let max = limits.max_vcpus.min(MAX_VCPUS);
    if !(MIN_VCPUS..=max).contains(&vcpus) {
        return Err(LimitError::VcpuCount {
            requested: vcpus,
            max,
        });
    }
    if memory < MIN_MEMORY {
        return Err(LimitError::MemoryTooSmall { requested: memory });
    }
    if let Some(host) = limits.memory {
        if memory > host {
            return Err(LimitError::MemoryTooLarge {
                requested: memory,
                host,
            });
        }
    }
    Ok(())
}

/// Check that a balloon of `target_mib` leaves the guest some memory.
pub fn check_balloon(target_mib: u64, memory: MemorySize) -> Result<(), LimitError> {
    if target_mib >= memory.mib() {
        return Err(LimitError::BalloonTooLarge { target_mib, memory });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> MemorySize {
        MemorySize::from_mib(n).unwrap()
    }

    #[test]
    fn resources_within_vireo_backend_and_host() {
        let limits = HostLimits::new(1024, Some(mib(1024)));
        assert_eq!(limits.max_vcpus, MAX_VCPUS);
        assert_eq!(check_resources(1, MIN_MEMORY, limits), Ok(()));
        assert_eq!(check_resources(MAX_VCPUS, mib(1024), limits), Ok(()));
        assert_eq!(
            check_resources(0, mib(64), limits),
            Err(LimitError::VcpuCount {
                requested: 0,
                max: MAX_VCPUS
            })
        );
        assert!(matches!(
            check_resources(3, mib(64), HostLimits::new(2, None)),
            Err(LimitError::VcpuCount { max: 2, .. })
        ));
        assert!(matches!(
            check_resources(1, mib(15), limits),
            Err(LimitError::MemoryTooSmall { .. })
        ));
        let e = check_resources(1, mib(2048), limits).unwrap_err();
        assert!(e.to_string().contains("more than this host"), "{e}");
        assert_eq!(
            check_resources(1, mib(1 << 30), HostLimits::new(1, None)),
            Ok(())
        );
    }

    #[test]
    fn balloon_leaves_memory() {
        assert_eq!(check_balloon(255, DEFAULT_MEMORY), Ok(()));
        assert!(check_balloon(256, DEFAULT_MEMORY).is_err());
    }

    #[test]
    fn accel_names() {
        for a in [Accel::Kvm, Accel::Auto, Accel::Emu] {
            assert_eq!(Accel::parse(a.as_str()), Some(a));
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!("\"{}\"", a.as_str())
            );
        }
        assert_eq!(Accel::default(), Accel::Auto);
    }
}
