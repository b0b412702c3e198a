//! Snapshot and restore through `vireo run`: a tiny guest counts in memory
//! and prints the counter on COM1; a snapshot taken over the control
//! socket and restored with `vireo run --restore` must go on counting from
//! where it was (full and lazy restore, two clones of one snapshot side by
//! side), and damaged snapshots must be refused before anything runs.
//!
//! Like the other guest tests they run on KVM, or on the emulator with
//! `VIREO_TEST_ACCEL=emu`; without /dev/kvm they print `skipping: ...`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;

use support::guest::{self, assemble64, Guest64};
use support::{run_vireo_args, KernelKind, LiveVm, TempDir, RUN_TIMEOUT};

/// TSC ticks between two prints: ~20 ms on a GHz TSC (KVM), 50 ms on
/// the emulator's nanosecond TSC.
const DELAY_TICKS: u32 = 50_000_000;

/// The counting guest: forever { counter += 1 (in memory); print
/// `count=XXXXXXXX`; wait DELAY_TICKS of the TSC }.
fn counting_guest(g: &mut Guest64) -> guest::AsmResult {
    let counter = g.data(&[0u8; 8]);
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    g.a.lea(rdi, ptr(counter))?;
    g.a.inc(qword_ptr(rdi))?;
    g.a.mov(rbx, qword_ptr(rdi))?;
    g.print("count=")?;
    g.print_hex(rbx, 8)?;
    g.print("\n")?;
    let a = &mut g.a;
    // deadline (R8) = TSC + DELAY_TICKS; spin until the TSC passes it.
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.lea(r8, qword_ptr(rax + DELAY_TICKS as i32))?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.pause()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r8)?;
    a.jb(wait)?;
    a.jmp(top)
}

fn kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), counting_guest);
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

/// Every whole `count=XXXXXXXX` line's value, in order.
fn counts(output: &str) -> Vec<u64> {
    output
        .split('\n')
        .filter_map(|line| {
            let hex = line.trim_end_matches('\r').strip_prefix("count=")?;
            (hex.len() == 8)
                .then(|| u64::from_str_radix(hex, 16).ok())
                .flatten()
        })
        .collect()
}

/// Send one control-socket command, return the JSON reply.
fn control(socket: &Path, command: &str) -> serde_json::Value {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    writeln!(s, "{command}").expect("send command");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

fn wait_for_socket(socket: &Path) {
    for _ in 0..2000 {
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("{} never accepted connections", socket.display());
}

/// Boot the counting guest, let it count to at least 3, snapshot it into
/// `snap` (it keeps running), and return the last count it printed before
/// the snapshot's reply, with the original VM still running.
fn take_snapshot(dir: &TempDir, snap: &Path) -> (LiveVm, u64) {
    let kernel = kernel(dir);
    let socket = dir.path().join("ctl.sock");
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &["--control-socket", socket.to_str().expect("utf-8 path")],
    );
    assert!(
        vm.read_until("count=00000003\n"),
        "the guest never counted to 3:\n{}",
        vm.output()
    );
    wait_for_socket(&socket);
    let reply = control(&socket, &format!("snapshot {}", snap.display()));
    assert_eq!(reply["ok"], true, "snapshot failed: {reply}");
    assert_eq!(
        reply["state"], "running",
        "the VM resumes after a snapshot: {reply}"
    );
    assert!(
        reply["snapshot"]["memory_bytes"].as_u64().unwrap_or(0) >= 32 << 20,
        "{reply}"
    );
    // Everything the guest printed before the pause is in the pipe by now,
    // but maybe not read yet: read what is there (on a loaded host the
    // test's reader lags by a few counts), so the bound below holds.
    for _ in 0..10 {
        if vm.read_chunk(std::time::Duration::from_millis(20)) != Some(true) {
            break;
        }
    }
    let at_reply = *counts(&vm.output())
        .last()
        .expect("counts before the snapshot");
    // The original keeps counting after its snapshot.
    let next = format!("count={:08x}\n", at_reply + 2);
    assert!(
        vm.read_until(&next),
        "the original stopped counting after the snapshot:\n{}",
        vm.output()
    );
    (vm, at_reply)
}

fn restore(snap: &Path, extra: &[&str]) -> LiveVm {
    let mut args = vec![
        "run".to_string(),
        "--restore".into(),
        snap.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    LiveVm::start(&[], &args, RUN_TIMEOUT)
}

/// Wait until the VM's output holds `n` complete count lines (or it
/// ends, or the timeout passes); the counts seen.
fn wait_counts(vm: &mut LiveVm, n: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    loop {
        let c = counts(&vm.output());
        if c.len() >= n || std::time::Instant::now() > deadline {
            return c;
        }
        if vm.read_chunk(std::time::Duration::from_secs(1)).is_none() {
            return counts(&vm.output());
        }
    }
}

#[test]
fn a_restored_guest_counts_on_from_the_snapshot_full_and_lazy_clones() {
    require_kvm!();
    let dir = TempDir::new("snap");
    let snap = dir.path().join("snap1");
    let (original, at_reply) = take_snapshot(&dir, &snap);
    drop(original);
    assert!(snap.join("state.vsnap").is_file() && snap.join("memory.raw").is_file());

    // Two clones of one snapshot at the same time: one reads the memory
    // file, one maps it copy-on-write. Each continues on its own.
    let mut full = restore(&snap, &[]);
    let mut lazy = restore(&snap, &["--restore-lazy"]);
    let a = wait_counts(&mut full, 4);
    let b = wait_counts(&mut lazy, 4);
    assert!(
        a.len() >= 4,
        "full restore printed {a:?}:\n{}",
        full.output()
    );
    assert!(
        b.len() >= 4,
        "lazy restore printed {b:?}:\n{}",
        lazy.output()
    );
    for (what, c) in [("full", &a), ("lazy", &b)] {
        // The snapshot may fall in the middle of a line: the restored
        // guest then finishes "count=...N\n" (not a whole line in its own
        // output) and its first whole count is N + 1.
        assert!(
            (3..=at_reply + 2).contains(&c[0]),
            "{what}: restored guest started at {}, the snapshot was taken between 3 and {} (a line cut in two allows one more)",
            c[0],
            at_reply + 1
        );
        for pair in c.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "{what}: counts skip: {c:?}");
        }
    }
    // Both clones start from the same saved counter.
    assert_eq!(a[0], b[0], "the clones did not start from the same state");
    // The lazy clone's writes stayed private: the snapshot is unchanged,
    // so a third restore starts from the same counter again.
    drop(lazy);
    let mut again = restore(&snap, &[]);
    let c = wait_counts(&mut again, 2);
    assert_eq!(
        c.first(),
        a.first(),
        "a later restore saw a clone's writes: {c:?}"
    );
}

fn refused(snap: &Path, extra: &[&str], want: &str) {
    let mut args = vec![
        "run".to_string(),
        "--restore".into(),
        snap.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_vireo_args(&args, RUN_TIMEOUT);
    out.assert_status(2);
    assert!(
        out.stderr.to_lowercase().contains(want),
        "expected {want:?} in the error\n{out}"
    );
    assert!(!out.stdout.contains("count="), "the guest ran:\n{out}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn damaged_snapshots_are_refused_before_the_guest_runs() {
    require_kvm!();
    let dir = TempDir::new("snapbad");
    let snap = dir.path().join("good");
    let (original, _) = take_snapshot(&dir, &snap);
    drop(original);

    // A flipped byte in the state file.
    let flipped = dir.path().join("flipped");
    copy_dir(&snap, &flipped);
    let state = flipped.join("state.vsnap");
    let mut bytes = std::fs::read(&state).expect("read state");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&state, &bytes).expect("write state");
    refused(&flipped, &[], "corrupt");

    // A truncated state file.
    let cut = dir.path().join("cut");
    copy_dir(&snap, &cut);
    let state = cut.join("state.vsnap");
    let bytes = std::fs::read(&state).expect("read state");
    std::fs::write(&state, &bytes[..bytes.len() - 100]).expect("write state");
    refused(&cut, &[], "truncated");

    // Another format version (with a header checksum that matches it, as
    // its writer would have made).
    let newer = dir.path().join("newer");
    copy_dir(&snap, &newer);
    let state = newer.join("state.vsnap");
    let mut bytes = std::fs::read(&state).expect("read state");
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    let header = 8 + 4 + 4 + 32 + 4;
    let crc = crc32(&bytes[..header]);
    bytes[header..header + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&state, &bytes).expect("write state");
    refused(&newer, &[], "version 99");

    // A flipped byte in guest memory: caught by the full restore's check.
    let mem = dir.path().join("mem");
    copy_dir(&snap, &mem);
    let raw = mem.join("memory.raw");
    let mut bytes = std::fs::read(&raw).expect("read memory");
    bytes[0x10_0000] ^= 1;
    std::fs::write(&raw, &bytes).expect("write memory");
    refused(&mem, &[], "checksum");

    // A truncated memory file: refused even by a lazy restore.
    let short = dir.path().join("short");
    copy_dir(&snap, &short);
    let raw = short.join("memory.raw");
    let bytes = std::fs::read(&raw).expect("read memory");
    std::fs::write(&raw, &bytes[..bytes.len() / 2]).expect("write memory");
    refused(&short, &["--restore-lazy"], "truncated");

    // No snapshot at all.
    refused(&dir.path().join("nothing"), &[], "holds no snapshot");
}

/// A VM with virtio devices its guest never sets up (rng, balloon,
/// virtio-console, vsock) snapshots like any other, and `--restore`
/// rebuilds the devices from the snapshot alone and goes on counting.
#[test]
fn a_vm_with_idle_virtio_devices_snapshots_and_restores() {
    require_kvm!();
    let dir = TempDir::new("snapvirtio");
    let kernel = kernel(&dir);
    let socket = dir.path().join("ctl.sock");
    let vsock = dir.path().join("v.sock");
    let vsock_opt = format!("cid=7,socket={}", vsock.display());
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &[
            "--rng",
            "--balloon",
            "target=0",
            "--virtio-console",
            "cols=80,rows=25",
            "--vsock",
            &vsock_opt,
            "--control-socket",
            socket.to_str().expect("utf-8 path"),
        ],
    );
    assert!(vm.read_until("count=00000002\n"), "{}", vm.output());
    wait_for_socket(&socket);
    let snap = dir.path().join("snap");
    let reply = control(&socket, &format!("snapshot {}", snap.display()));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["snapshot"]["disks"], serde_json::json!([]), "{reply}");
    assert!(snap.join("state.vsnap").exists());
    assert!(
        vm.read_until("count=00000004\n"),
        "the VM stopped: {}",
        vm.output()
    );
    drop(vm);
    // No device flags: the snapshot says which devices to rebuild.
    let mut restored = restore(&snap, &[]);
    let c = wait_counts(&mut restored, 3);
    assert!(
        c.len() >= 3,
        "restored VM printed {c:?}:\n{}",
        restored.output()
    );
    for pair in c.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "counts skip: {c:?}");
    }
    drop(restored);
    // A device flag the snapshot cannot take is refused before the guest runs.
    refused(
        &snap,
        &["--rng"],
        "--restore takes the machine from the snapshot",
    );
}

/// CRC-32 (IEEE), bitwise: the test's own, independent of the code under test.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
