//! `vireo image build --out DIR` end to end: runs the real binary against
//! Debian's package registry, then opens what it made — the bzImage, and the
//! initramfs listed with vireo's own newc reader.
//!
//! Skipped (with the reason printed) only when apt-get is not installed or
//! the package mirror cannot be reached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use vireo_guestkit::cpio;

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-image-build-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn apt_get_available() -> bool {
    Command::new("apt-get")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn image_build_makes_a_bootable_kit() {
    if !apt_get_available() {
        eprintln!("SKIP image_build: apt-get is not installed (needs a Debian host)");
        return;
    }
    let out = temp_dir();
    let result = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["image", "build", "--out"])
        .arg(&out)
        .output()
        .expect("running the vireo binary");
    let stderr = String::from_utf8_lossy(&result.stderr);
    let stdout = String::from_utf8_lossy(&result.stdout);
    if !result.status.success() && stderr.contains("mirror could not be reached") {
        eprintln!("SKIP image_build: no network to the Debian package mirror:\n{stderr}");
        let _ = std::fs::remove_dir_all(&out);
        return;
    }
    assert!(
        result.status.success(),
        "vireo image build failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        result.status
    );

    // The manifest and the files it names.
    let manifest = String::from_utf8(read(&out.join("vireo-kit.conf"))).expect("manifest is UTF-8");
    for line in [
        "kernel=vmlinuz",
        "initrd=initrd.img",
        "cmdline=console=ttyS0 panic=-1 reboot=k",
        "kernel_version=",
    ] {
        assert!(
            manifest.contains(line),
            "manifest lacks {line:?}:\n{manifest}"
        );
    }

    // A bzImage: setup header magic "HdrS" at 0x202.
    let kernel = read(&out.join("vmlinuz"));
    assert!(
        kernel.len() > 1 << 20,
        "vmlinuz is only {} bytes",
        kernel.len()
    );
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "vmlinuz is not a bzImage");

    // The initramfs: gzip around a newc cpio.
    let gz = read(&out.join("initrd.img"));
    assert_eq!(&gz[..2], b"\x1f\x8b", "initrd.img is not gzip");
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut archive)
        .expect("gunzip initrd.img");
    let entries = cpio::read_newc(&archive).expect("initrd.img lists as newc cpio");
    let find = |name: &str| entries.iter().find(|e| e.name == name);

    let init = find("init").expect("/init exists");
    assert_eq!(init.file_type(), cpio::S_IFREG);
    assert_eq!(init.permissions() & 0o111, 0o111, "/init is not executable");
    let script = String::from_utf8_lossy(&init.data);
    assert!(script.starts_with("#!/bin/sh"));
    assert!(script.contains("vireo-init: ready"));

    let busybox = find("bin/busybox").expect("/bin/busybox exists");
    assert!(busybox.data.starts_with(b"\x7fELF"));
    assert!(busybox.permissions() & 0o111 != 0);
    let sh = find("bin/sh").expect("/bin/sh exists");
    assert_eq!(
        (sh.file_type(), &sh.data[..]),
        (cpio::S_IFLNK, &b"busybox"[..])
    );
    let console = find("dev/console").expect("/dev/console exists");
    assert_eq!(
        (console.file_type(), console.rdev_major, console.rdev_minor),
        (cpio::S_IFCHR, 5, 1)
    );

    // Debian builds these as modules; each is shipped and loaded in order.
    for module in [
        "virtio",
        "virtio_ring",
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
    ] {
        let file = format!("lib/modules/{module}.ko");
        let entry = find(&file).unwrap_or_else(|| panic!("/{file} is missing"));
        assert!(
            entry.data.starts_with(b"\x7fELF"),
            "/{file} is not an ELF module"
        );
        assert!(script.contains(&format!(" {module} ")) || script.contains(&format!(" {module};")));
    }
    // Dependencies come before their users in /init's load list.
    let list = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("for m in "))
        .expect("/init has a module list");
    let order: Vec<&str> = list.trim_end_matches("; do").split_whitespace().collect();
    let pos = |m: &str| {
        order
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("{m} not in {order:?}"))
    };
    assert!(pos("virtio") < pos("virtio_pci"));
    assert!(pos("virtio_ring") < pos("virtio_net"));
    assert!(pos("net_failover") < pos("virtio_net"));

    // The scratch directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .expect("listing the kit")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "build left {leftovers:?} behind");

    let _ = std::fs::remove_dir_all(&out);
}
