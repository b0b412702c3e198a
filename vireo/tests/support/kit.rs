//! The guest kit (Debian's stock kernel + vireo's busybox initramfs) for
//! the tests that boot a whole Linux guest, and when they can run here.

use std::path::PathBuf;
use std::time::Duration;

use vireo_hypervisor::host::HostVirt;

/// Why a stock-kernel guest cannot boot on the test backend here, or None.
/// On the emulator it always can; on KVM not where /dev/kvm is missing or
/// is PVM without VT-x/AMD-V (the host would emulate every instruction).
pub fn skip_reason() -> Option<String> {
    if super::test_accel().as_deref() == Some("emu") {
        return None;
    }
    if let Some(why) = super::kvm_unavailable_reason() {
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
pub fn guest_kit() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIREO_TEST_KIT") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-kit");
    if !dir.join("vireo-kit.conf").exists() {
        let out = super::run_vireo_args(
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
