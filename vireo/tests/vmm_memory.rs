//! The VMM's own memory, held as a test with a margin (SPECIFICATION.md,
//! "VMM memory overhead"): a running tiny guest's VMM process has little
//! private memory beyond the guest's RAM. Private anonymous memory is what
//! each VM costs the host; the file-backed rest (the binary and its
//! libraries) is shared between VMs and depends on the build profile, so
//! `bench/boot.py` measures that on a release build instead.
//!
//! On KVM, or on the emulator with `VIREO_TEST_ACCEL=emu`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::guest::assemble64;
use support::{KernelKind, LiveVm, TempDir};

/// Guest RAM of the test VM, MiB.
const GUEST_MIB: u64 = 128;

/// The margin: private memory beyond the guest's RAM. Measured (debug
/// build, December 2026) at 2.2 MiB on KVM and 3.5 MiB on the emulator
/// (its translation caches); `bench/boot.py` measured 0.30 MiB on KVM in
/// November. Over 8 MiB is a regression: more than the promise's 5 MiB
/// total before any shared page is counted.
const MAX_PRIVATE_OVERHEAD_KIB: u64 = 8 * 1024;

fn idle_kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), |g| {
        g.print("running\n")?;
        g.halt_forever()
    });
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/PID/status:\n{status}"))
}

/// Resident KiB of the guest-RAM mapping: the anonymous mapping of exactly
/// `size_kib` (as bench/boot.py finds it).
fn guest_ram_rss_kib(smaps: &str, size_kib: u64) -> Option<u64> {
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_guest_ram =
                v.split_whitespace().next().and_then(|n| n.parse().ok()) == Some(size_kib);
        } else if let (true, Some(v)) = (in_guest_ram, line.strip_prefix("Rss:")) {
            return v.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    None
}

#[test]
fn the_vmm_has_little_private_memory_beyond_guest_ram() {
    require_kvm!();
    let dir = TempDir::new("vmm-memory");
    let kernel = idle_kernel(&dir);
    let mem = GUEST_MIB.to_string();
    let mut vm = LiveVm::start_kernel(&kernel, &["--memory", &mem, "--cpus", "1"]);
    assert!(vm.read_until("running\n"), "{}", vm.output());
    // As the benchmark does: read once the start-up is over.
    std::thread::sleep(Duration::from_millis(50));
    let pid = vm.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let anon = status_kib(&status, "RssAnon:");
    let guest = guest_ram_rss_kib(&smaps, GUEST_MIB * 1024)
        .unwrap_or_else(|| panic!("no {GUEST_MIB} MiB mapping in smaps"));
    let overhead = anon.saturating_sub(guest);
    eprintln!(
        "VmRSS {} KiB, RssAnon {anon} KiB, guest RAM resident {guest} KiB: private overhead {overhead} KiB",
        status_kib(&status, "VmRSS:")
    );
    assert!(
        overhead <= MAX_PRIVATE_OVERHEAD_KIB,
        "the VMM holds {overhead} KiB of private memory beyond its guest's RAM (limit {MAX_PRIVATE_OVERHEAD_KIB})"
    );
}

#[test]
fn finds_the_guest_ram_mapping() {
    let smaps = "7f00-7f10 rw-p 00000000 00:00 0\nSize:               8192 kB\nRss:   12 kB\n\
                 7f20-7f30 rw-p 00000000 00:00 0\nSize:             131072 kB\nRss:   44 kB\n";
    assert_eq!(guest_ram_rss_kib(smaps, 131072), Some(44));
    assert_eq!(guest_ram_rss_kib(smaps, 4096), None);
}
