//! What a definition is checked against on this host, read from /proc
//! without any hypervisor code (the daemon checks definitions without
//! linking one).

use crate::units::MemorySize;

/// Memory the host can give a guest: physical RAM plus swap, in whole MiB,
/// if /proc/meminfo says.
pub fn memory() -> Option<MemorySize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    memory_from_meminfo(&meminfo)
}

fn memory_from_meminfo(meminfo: &str) -> Option<MemorySize> {
    let kib = meminfo_kib(meminfo, "MemTotal:")? + meminfo_kib(meminfo, "SwapTotal:").unwrap_or(0);
    MemorySize::from_mib(kib >> 10).ok()
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
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
    fn ram_plus_swap() {
        let m = "MemTotal:        2097152 kB\nMemFree: 1 kB\nSwapTotal:       1048576 kB\n";
        assert_eq!(memory_from_meminfo(m).map(MemorySize::mib), Some(3072));
        assert_eq!(
            memory_from_meminfo("MemTotal: 1048576 kB\n").map(MemorySize::mib),
            Some(1024)
        );
        assert_eq!(memory_from_meminfo("SwapTotal: 1 kB\n"), None);
        let m = "MemTotal:       24576000 kB\nSwapTotal:  1024 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal:"), Some(24_576_000));
        assert_eq!(meminfo_kib(m, "SwapTotal:"), Some(1024));
        assert_eq!(meminfo_kib(m, "Nope:"), None);
        assert!(memory().is_some(), "this host has a /proc/meminfo");
    }
}
