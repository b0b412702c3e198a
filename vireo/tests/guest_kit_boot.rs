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

use std::time::Duration;

#[test]
fn guest_kit_boots_runs_a_command_and_powers_off() {
    if let Some(why) = support::kit::skip_reason() {
        eprintln!("skipping the guest kit boot: {why}");
        return;
    }
    let kit = support::kit::guest_kit();
    // Two vCPUs on either backend: the emulator runs SMP Linux too (one
    // host thread per vCPU).
    let emu = support::test_accel().as_deref() == Some("emu");
    let cpus = 2;
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
        Duration::from_secs(if emu { 20 * 60 } else { 600 }),
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
