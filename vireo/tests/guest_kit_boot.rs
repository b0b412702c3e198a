//! Boots the guest kit (Debian's stock kernel + vireo's busybox initramfs)
//! under KVM where KVM can run it in useful time, and checks that the init
//! runs a command given on the kernel command line, sees every vCPU, loads
//! the virtio modules, and powers off when its ACPI power button is pressed
//! (what `vireo vm stop` does).
//!
//! With `VIREO_TEST_ACCEL=emu` it boots on vireo's emulator (the README's
//! test command does this in a release build). On KVM it is skipped, with the
//! reason printed, where /dev/kvm is missing or is PVM on a CPU without
//! VT-x/AMD-V: there a stock kernel is emulated instruction by instruction by
//! the host and takes far too long to boot.

mod support;

use std::time::Duration;

#[test]
fn guest_kit_boots_runs_a_command_and_powers_off_on_the_power_button() {
    use std::io::{Read, Write};
    if let Some(why) = support::kit::skip_reason() {
        eprintln!("skipping the guest kit boot: {why}");
        return;
    }
    let kit = support::kit::guest_kit();
    // Two vCPUs on either backend: the emulator runs SMP Linux too (one
    // host thread per vCPU).
    let emu = support::test_accel().as_deref() == Some("emu");
    let cpus = 2;
    let dir = support::TempDir::new("kit-boot");
    let socket = dir.path().join("control.sock");
    let mut vm = support::LiveVm::start(
        &[],
        &[
            "run".into(),
            "--image".into(),
            kit.display().to_string(),
            "--cpus".into(),
            cpus.to_string(),
            "--memory".into(),
            "512".into(),
            "--control-socket".into(),
            socket.display().to_string(),
            "--append".into(),
            "vireo.run=echo kit-says-hello; grep -c ^processor /proc/cpuinfo; echo data-roundtrip > /tmp/f; cat /tmp/f; ls /sys/module | grep -c virtio; echo waiting-for-the-power-button; sleep 600".into(),
        ],
        Duration::from_secs(if emu { 20 * 60 } else { 600 }),
    );
    assert!(
        vm.read_until("\nwaiting-for-the-power-button"),
        "the command did not finish\n{}",
        vm.output()
    );
    // Whole lines only: the kernel also echoes its command line.
    let output = vm.output();
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    for expected in ["vireo-init: ready", "kit-says-hello", "data-roundtrip"] {
        assert!(
            lines.contains(&expected),
            "missing the line {expected:?}\n{output}"
        );
    }
    let hello = lines.iter().position(|l| *l == "kit-says-hello");
    assert_eq!(
        hello.and_then(|i| lines.get(i + 1)).copied(),
        Some(cpus.to_string().as_str()),
        "the guest should see {cpus} processor(s)\n{output}"
    );
    // The command sleeps; the power button ends the guest (acpid in the
    // kit's init runs poweroff), and vireo exits 0.
    let mut ctl = std::os::unix::net::UnixStream::connect(&socket).expect("control socket");
    ctl.write_all(b"power-button\n").expect("send");
    let mut reply = String::new();
    ctl.read_to_string(&mut reply).expect("reply");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let status = vm.wait("the guest to power off after the power button");
    assert!(
        vm.output().contains("vireo-init: power button pressed"),
        "{}",
        vm.output()
    );
    assert_eq!(status.code(), Some(0), "{}", vm.output());
}
