//! Boots the guest kit (Debian's stock kernel + vireo's busybox initramfs)
//! under KVM where KVM can run it in useful time, and checks that the init
//! runs a command given on the kernel command line, sees every vCPU, loads
//! the virtio modules and powers off.
//!
//! With `VIREO_TEST_ACCEL=emu` it boots on vireo's emulator (the README's
//! test command does this in a release build). On KVM it is skipped, with the
//! reason printed, where /dev/kvm is missing or is PVM on a CPU without
//! VT-x/AMD-V: there a stock kernel is emulated instruction by instruction by
//! the host and takes far too long to boot.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use vireo_hypervisor::host::HostVirt;

fn skip_reason() -> Option<String> {
    if support::test_accel().as_deref() == Some("emu") {
        return None;
    }
    if let Some(why) = support::kvm_unavailable_reason() {
        return Some(why);
    }
    if HostVirt::detect().kvm_is_pvm_only() {
        return Some(
            "/dev/kvm here is PVM (kvm_pvm) without VT-x/AMD-V, and the kit's stock Debian kernel \
             is not PVM-aware: it would be emulated by the host at ~1 µs per instruction. \
             The README's test command boots the kit on the emulator instead (VIREO_TEST_ACCEL=emu)."
                .into(),
        );
    }
    None
}

/// The kit to boot: $VIREO_TEST_KIT if set, else one built (once) under the
/// test target directory.
fn guest_kit() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIREO_TEST_KIT") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-kit");
    if !dir.join("vireo-kit.conf").exists() {
        let out = support::run_vireo_args(
            &[
                "image".into(),
                "build".into(),
                "--out".into(),
                dir.display().to_string(),
            ],
            Duration::from_secs(900),
        );
        out.assert_status(0);
    }
    dir
}

#[test]
fn guest_kit_boots_runs_a_command_and_powers_off() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the guest kit boot: {why}");
        return;
    }
    let kit = guest_kit();
    // The emulator boots a stock kernel in minutes, not seconds: one vCPU
    // there, two on KVM.
    let emu = support::test_accel().as_deref() == Some("emu");
    let cpus = if emu { 1 } else { 2 };
    let out = support::run_vireo_args(
        &[
            "run".into(),
            "--image".into(),
            kit.display().to_string(),
            "--cpus".into(),
            cpus.to_string(),
            "--memory".into(),
            "512".into(),
            "--append".into(),
            "vireo.run=echo kit-says-hello; grep -c ^processor /proc/cpuinfo; echo data-roundtrip > /tmp/f; cat /tmp/f; ls /sys/module | grep -c virtio".into(),
        ],
        Duration::from_secs(if emu { 40 * 60 } else { 600 }),
    );
    out.assert_status(0);
    // Whole lines only: the kernel also echoes its command line.
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    for expected in ["vireo-init: ready", "kit-says-hello", "data-roundtrip"] {
        assert!(
            lines.contains(&expected),
            "missing the line {expected:?}\n{out}"
        );
    }
    let hello = lines.iter().position(|l| *l == "kit-says-hello");
    assert_eq!(
        hello.and_then(|i| lines.get(i + 1)).copied(),
        Some(cpus.to_string().as_str()),
        "the guest should see {cpus} processor(s)\n{out}"
    );
}
