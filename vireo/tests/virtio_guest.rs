//! The virtio devices seen from a stock Linux guest: the guest kit's Debian
//! kernel finds them on the PCI bus with its own drivers (virtio-pci, MSI-X)
//! and uses them.
//!
//! One boot checks every device: disks (raw, a qcow2 overlay over a base,
//! read-only with a serial number), the network (ping and a TCP transfer
//! with a TAP in a network namespace this test creates), rng, vsock (the
//! kit's `vsock-send` reaches a Unix socket on the host and reads its answer), the
//! balloon (the host's memory use drops when the guest frees memory) and
//! virtio-console. A second boot reads back what the first wrote.
//!
//! The guest's script comes on a read-only raw disk (`sh /dev/vda`), so it
//! is not limited by the kernel command line. Runs on the emulator
//! (`VIREO_TEST_ACCEL=emu`, the README's test command) and on KVM where a
//! stock kernel is fast (see `support::kit::skip_reason`).

mod support;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use support::netns::NetNs;
use support::{LiveVm, TempDir};

/// Bytes the guest writes to the data disk (and reads back).
const PATTERN_BYTES: usize = 4 << 20;

fn md5_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A raw image holding `script` followed by newlines: the guest runs it with
/// `sh /dev/vda`.
fn script_disk(dir: &TempDir, script: &str) -> String {
    let mut bytes = script.as_bytes().to_vec();
    bytes.push(b'\n');
    bytes.extend(b"exit 0\n");
    bytes.resize(bytes.len().next_multiple_of(1 << 16), b'\n');
    dir.write("script.img", &bytes).display().to_string()
}

/// The value after `key ` on a line of the guest's output.
fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(key).map(str::trim))
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn vireo_image(args: &[&str]) {
    let mut full = vec!["image".to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    support::run_vireo_args(&full, Duration::from_secs(60)).assert_status(0);
}

fn boot_args(kit: &Path, disks: &[String], extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--image".into(),
        kit.display().to_string(),
        "--memory".into(),
        "512".into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend(extra.iter().cloned());
    args.push("--append".into());
    args.push("vireo.run=sh /dev/vda".into());
    args
}

const FIRST_BOOT: &str = r#"
echo "pci-functions $(ls /sys/bus/pci/devices | wc -l)"
for d in /sys/bus/virtio/devices/*; do
    echo "virtio-device $(cat $d/device) $(basename $(readlink $d/driver))"
done
echo "msix-vectors $(grep -c 'PCI-MSI.*virtio' /proc/interrupts)"
# The data disk: a pattern written through the guest's page cache and synced.
dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
dd if=/tmp/pattern of=/dev/vdb bs=64k 2>/dev/null
sync
echo "pattern-md5 $(md5sum < /tmp/pattern | cut -d' ' -f1)"
echo "vdb-readback-md5 $(echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=64k count=64 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "vdb-serial $(cat /sys/block/vdb/serial)"
# The qcow2 overlay: the base's bytes show through; a write stays in the overlay.
echo "vdc-base $(dd if=/dev/vdc bs=16 count=1 2>/dev/null)"
printf 'overlay-data' | dd of=/dev/vdc bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null || echo vdc-write-failed
sync
# The read-only disk refuses writes.
echo "vdd-ro $(cat /sys/block/vdd/ro)"
if printf x | dd of=/dev/vdd conv=notrunc,fsync 2>/dev/null; then echo vdd-write-ok; else echo vdd-write-refused; fi
# rng
echo "hwrng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 4096 /dev/hwrng | wc -c)"
# vsock: a connection to host port 1234 reaches the Unix socket PATH_1234
echo "vsock-dev $(ls /dev/vsock)"
echo "vsock-reply $(echo vsock-ping | vsock-send 2 1234)"
# net
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "eth0-mac $(cat /sys/class/net/eth0/address)"
echo "ping $(ping -c 3 -W 5 10.0.2.1 | grep -o '[0-9]* packets received')"
dd if=/dev/urandom of=/tmp/blob bs=64k count=32 2>/dev/null
echo "blob-md5 $(md5sum < /tmp/blob | cut -d' ' -f1)"
nc 10.0.2.1 5000 < /tmp/blob
echo tcp-sent
# virtio-console
echo "hvc0-says-hello" > /dev/hvc0
# balloon: fill memory, then free it; free page reporting hands it back.
dd if=/dev/zero of=/tmp/fill bs=1M count=192 2>/dev/null
echo balloon-filled
sleep 4
rm /tmp/fill /tmp/blob /tmp/pattern
echo balloon-freeing
sleep 12
echo balloon-freed
sleep 4
"#;

const SECOND_BOOT: &str = r#"
echo "vdb-md5 $(dd if=/dev/vdb bs=64k count=64 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "vdc-overlay $(dd if=/dev/vdc bs=512 skip=2048 count=1 2>/dev/null | head -c 12)"
"#;

#[test]
fn a_stock_linux_guest_uses_every_virtio_device() {
    if let Some(why) = support::kit::skip_reason() {
        eprintln!("skipping the virtio guest test: {why}");
        return;
    }
    if let Some(why) = support::netns::unavailable_reason() {
        eprintln!("skipping the virtio guest test: {why}");
        return;
    }
    let kit = support::kit::guest_kit();
    let dir = TempDir::new("virtio");
    let p = |n: &str| dir.path().join(n).display().to_string();

    // Disks: raw data, qcow2 overlay over a raw base with known bytes,
    // a read-only raw disk.
    vireo_image(&["create", "--format", "raw", "--size", "16M", &p("data.img")]);
    // 4 MiB: the overlay (which takes the base's size) has room for the
    // write at 1 MiB.
    let mut base = vec![0u8; 4 << 20];
    base[..16].copy_from_slice(b"base-image-bytes");
    dir.write("base.img", &base);
    vireo_image(&["create", "--backing", &p("base.img"), &p("overlay.qcow2")]);
    dir.write("ro.img", &vec![0x5a; 1 << 20]);
    let script = script_disk(&dir, FIRST_BOOT);
    let disks = vec![
        format!("path={script},readonly=on"),
        format!("path={},format=raw,serial=vireo-data-1", p("data.img")),
        format!("path={},format=qcow2", p("overlay.qcow2")),
        format!("path={},readonly=on", p("ro.img")),
    ];

    let ns = NetNs::new("virtio");
    ns.add_tap("tap0", "10.0.2.1/24");
    let listener = ns.tcp_listener("10.0.2.1:5000");
    let received = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("guest connects");
        let mut data = Vec::new();
        s.read_to_end(&mut data).expect("read");
        data
    });

    let vsock = p("vm.vsock");
    // The host end of guest port 1234: answer each line in upper case.
    let vsock_listener = std::os::unix::net::UnixListener::bind(format!("{vsock}_1234"))
        .expect("vsock host listener");
    let vsock_echo = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = vsock_listener
            .accept()
            .expect("the guest connects over vsock");
        let mut data = Vec::new();
        s.read_to_end(&mut data).expect("read");
        s.write_all(&data.to_ascii_uppercase()).expect("reply");
        data
    });
    let extra: Vec<String> = [
        "--net",
        "tap=tap0,mac=52:54:00:0a:0b:0c",
        "--rng",
        "--vsock",
        &format!("cid=7,socket={vsock}"),
        "--balloon",
        "--virtio-console",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let emu = support::test_accel().as_deref() == Some("emu");
    let timeout = Duration::from_secs(if emu { 40 * 60 } else { 600 });
    let mut vm = LiveVm::start(&ns.exec_prefix(), &boot_args(&kit, &disks, &extra), timeout);

    assert!(vm.read_until("balloon-filled"), "{}", vm.output());
    let filled = resident_kib(vm.pid());
    assert!(vm.read_until("balloon-freed"), "{}", vm.output());
    let freed = resident_kib(vm.pid());
    let status = vm.wait("the guest to power off");
    let out = vm.output();
    assert_eq!(status.code(), Some(0), "{out}");

    // Every device was found and bound by its stock driver.
    for (id, driver) in [
        ("0x0001", "virtio_net"),
        ("0x0002", "virtio_blk"),
        ("0x0003", "virtio_console"),
        ("0x0004", "virtio_rng"),
        ("0x0005", "virtio_balloon"),
        ("0x0013", "vmw_vsock_virtio_transport"),
    ] {
        assert!(
            out.contains(&format!("virtio-device {id} {driver}")),
            "device {id} not bound to {driver}\n{out}"
        );
    }
    let msix: u32 = field(&out, "msix-vectors")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(msix > 0, "the guest uses MSI-X\n{out}");

    // Block: the data reached the file, the overlay kept the base intact.
    let pattern = field(&out, "pattern-md5").expect("pattern md5").to_string();
    assert_eq!(
        field(&out, "vdb-readback-md5"),
        Some(pattern.as_str()),
        "{out}"
    );
    let data = std::fs::read(p("data.img")).expect("data.img");
    assert_eq!(
        md5_hex(&data[..PATTERN_BYTES]),
        pattern,
        "the guest's write is in data.img"
    );
    assert_eq!(field(&out, "vdb-serial"), Some("vireo-data-1"), "{out}");
    assert_eq!(field(&out, "vdc-base"), Some("base-image-bytes"), "{out}");
    assert!(!out.contains("vdc-write-failed"), "{out}");
    assert_eq!(
        std::fs::read(p("base.img")).expect("base"),
        base,
        "base untouched"
    );
    assert_eq!(field(&out, "vdd-ro"), Some("1"), "{out}");
    assert!(out.contains("vdd-write-refused"), "{out}");
    assert_eq!(std::fs::read(p("ro.img")).expect("ro"), vec![0x5a; 1 << 20]);
    if let Ok(check) = std::process::Command::new("qemu-img")
        .args(["check", &p("overlay.qcow2")])
        .output()
    {
        assert!(
            check.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    // rng, vsock, console.
    assert_eq!(field(&out, "hwrng"), Some("virtio_rng.0 4096"), "{out}");
    assert_eq!(field(&out, "vsock-dev"), Some("/dev/vsock"), "{out}");
    assert_eq!(field(&out, "vsock-reply"), Some("VSOCK-PING"), "{out}");
    assert_eq!(vsock_echo.join().expect("vsock echo"), b"vsock-ping\n");
    assert!(out.contains("hvc0-says-hello"), "{out}");

    // Net: the MAC we chose, ping, and the TCP payload intact.
    assert_eq!(field(&out, "eth0-mac"), Some("52:54:00:0a:0b:0c"), "{out}");
    assert_eq!(field(&out, "ping"), Some("3 packets received"), "{out}");
    let data = received.join().expect("listener");
    assert_eq!(data.len(), 32 * 65536, "bytes over TCP");
    assert_eq!(
        Some(md5_hex(&data).as_str()),
        field(&out, "blob-md5"),
        "{out}"
    );

    // Balloon: free page reporting gave the freed memory back.
    assert!(
        filled > freed + 100 * 1024,
        "vireo's RSS should drop by >100 MiB after the guest frees 192 MiB: {filled} KiB -> {freed} KiB\n{out}"
    );

    // Second boot: the data and the overlay's write are still there.
    let script = script_disk(&dir, SECOND_BOOT);
    let disks = vec![
        format!("path={script},readonly=on"),
        format!("path={},format=raw", p("data.img")),
        format!("path={},format=qcow2", p("overlay.qcow2")),
    ];
    let mut vm = LiveVm::start(&[], &boot_args(&kit, &disks, &[]), timeout);
    let status = vm.wait("the second boot");
    let out2 = vm.output();
    assert_eq!(status.code(), Some(0), "{out2}");
    assert_eq!(field(&out2, "vdb-md5"), Some(pattern.as_str()), "{out2}");
    assert_eq!(field(&out2, "vdc-overlay"), Some("overlay-data"), "{out2}");
}
