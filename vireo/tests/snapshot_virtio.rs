//! Snapshots of a VM with a virtio-blk disk and a virtio-rng: a tiny guest
//! drives both through the virtio PCI transport itself (polling, no
//! interrupts) — each round it writes sector `i % 64` full of the round
//! number `i`, reads it back, compares, takes 16 random bytes from the rng,
//! and prints `blk=i`. A snapshot taken over the
//! control socket while it runs copies the disk into the snapshot; a
//! restore rolls the disk back and the guest goes on from the saved round
//! through the restored queue (no re-negotiation: the guest never sets the
//! device up again). A clone restored with `--disk id=...,path=...` runs
//! on its own copy; state that does not fit is refused before the guest
//! runs.
//!
//! On KVM, or on the emulator with `VIREO_TEST_ACCEL=emu`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;

use support::guest::{assemble64, Guest64};
use support::{run_vireo_args, KernelKind, LiveVm, TempDir, RUN_TIMEOUT};

const DELAY_TICKS: u32 = 20_000_000;
const SECTOR: usize = 512;
/// Sector the host fills before boot; the guest never writes it.
const HOST_SECTOR: usize = 64;
const DISK_BYTES: usize = 128 * SECTOR;

// Guest memory the tiny driver uses (identity mapped, above the kernel).
const DESC: u64 = 0x40_0000;
const AVAIL: u64 = 0x40_1000;
const USED: u64 = 0x40_2000;
const HEADER: u64 = 0x40_3000;
const WBUF: u64 = 0x40_4000;
const STATUS: u64 = 0x40_5000;
const RBUF: u64 = 0x40_6000;
const RNG_DESC: u64 = 0x41_0000;
const RNG_AVAIL: u64 = 0x41_1000;
const RNG_USED: u64 = 0x41_2000;
const RNG_BUF: u64 = 0x41_3000;

/// Configuration mechanism #1 address of `slot`, register `reg`.
fn cfg_addr(slot: u32, reg: u32) -> u32 {
    0x8000_0000 | (slot << 11) | reg
}

/// Set up the virtio function in `slot` (checking its vendor/device id):
/// BAR 0 into `bar`, VERSION_1 only, queue 0 with 8 entries at
/// `rings` (desc, avail, used), DRIVER_OK; anything unexpected jumps to
/// `fail`.
fn setup_device(
    a: &mut CodeAssembler,
    slot: u32,
    id: u32,
    (bar, bar32): (AsmRegister64, AsmRegister32),
    rings: (u64, u64, u64),
    fail: CodeLabel,
) -> Result<(), iced_x86::IcedError> {
    let (desc, avail, used) = rings;
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(slot, 0))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.cmp(eax, id as i32)?;
    a.jne(fail)?;
    // BAR 0; memory decoding + bus mastering on.
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(slot, 0x10))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.and(eax, 0xffff_fff0u32 as i32)?;
    a.mov(bar32, eax)?;
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(slot, 0x04))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.mov(ax, 6u32)?;
    a.out(dx, ax)?;
    // Common configuration: reset, ACKNOWLEDGE | DRIVER.
    a.mov(byte_ptr(bar + 0x14), 0)?;
    a.mov(byte_ptr(bar + 0x14), 3)?;
    // Features: VERSION_1 only (bit 32).
    a.mov(dword_ptr(bar + 0x08), 0)?;
    a.mov(dword_ptr(bar + 0x0c), 0)?;
    a.mov(dword_ptr(bar + 0x08), 1)?;
    a.mov(dword_ptr(bar + 0x0c), 1)?;
    a.mov(byte_ptr(bar + 0x14), 0xb)?;
    a.mov(al, byte_ptr(bar + 0x14))?;
    a.test(al, 8)?;
    a.jz(fail)?;
    a.mov(word_ptr(bar + 0x16), 0)?;
    a.mov(word_ptr(bar + 0x18), 8)?;
    a.mov(dword_ptr(bar + 0x20), desc as u32)?;
    a.mov(dword_ptr(bar + 0x24), 0)?;
    a.mov(dword_ptr(bar + 0x28), avail as u32)?;
    a.mov(dword_ptr(bar + 0x2c), 0)?;
    a.mov(dword_ptr(bar + 0x30), used as u32)?;
    a.mov(dword_ptr(bar + 0x34), 0)?;
    a.mov(word_ptr(bar + 0x1c), 1)?;
    a.mov(byte_ptr(bar + 0x14), 0xf)?;
    a.mov(al, byte_ptr(bar + 0x14))?;
    a.test(al, 0x40)?; // NEEDS_RESET
    a.jnz(fail)
}

fn blk_guest(g: &mut Guest64) -> Result<(), iced_x86::IcedError> {
    let mut request = g.a.create_label();
    let mut rng_request = g.a.create_label();
    let mut fail = g.a.create_label();
    let mut bad = g.a.create_label();
    let mut top = g.a.create_label();
    // Slot 1: virtio-blk (1af4:1042), BAR in R15; slot 2: virtio-rng
    // (1af4:1044), BAR in R14.
    setup_device(
        &mut g.a,
        1,
        0x1042_1af4,
        (r15, r15d),
        (DESC, AVAIL, USED),
        fail,
    )?;
    setup_device(
        &mut g.a,
        2,
        0x1044_1af4,
        (r14, r14d),
        (RNG_DESC, RNG_AVAIL, RNG_USED),
        fail,
    )?;
    let a = &mut g.a;

    // The host's sector reaches the guest.
    a.mov(ebx, 0)?;
    a.mov(esi, HOST_SECTOR as u32)?;
    a.mov(edi, RBUF as u32)?;
    a.call(request)?;
    a.mov(rax, RBUF)?;
    g.print("host-sector=")?;
    g.print_str_at(rax)?;
    g.print("\n")?;

    let a = &mut g.a;
    a.xor(r12d, r12d)?;
    a.set_label(&mut top)?;
    a.inc(r12)?;
    // Write sector (i % 64) full of i.
    a.mov(edi, WBUF as u32)?;
    a.mov(rax, r12)?;
    a.mov(ecx, (SECTOR / 8) as u32)?;
    a.rep().stosq()?;
    a.mov(ebx, 1)?;
    a.mov(rsi, r12)?;
    a.and(esi, 63)?;
    a.mov(edi, WBUF as u32)?;
    a.call(request)?;
    // Read it back into a cleared buffer and compare.
    a.mov(edi, RBUF as u32)?;
    a.xor(eax, eax)?;
    a.mov(ecx, (SECTOR / 8) as u32)?;
    a.rep().stosq()?;
    a.mov(ebx, 0)?;
    a.mov(rsi, r12)?;
    a.and(esi, 63)?;
    a.mov(edi, RBUF as u32)?;
    a.call(request)?;
    a.mov(esi, WBUF as u32)?;
    a.mov(edi, RBUF as u32)?;
    a.mov(ecx, (SECTOR / 8) as u32)?;
    a.repe().cmpsq()?;
    a.jne(bad)?;
    a.call(rng_request)?;
    g.print("blk=")?;
    g.print_hex(r12, 8)?;
    g.print("\n")?;
    let a = &mut g.a;
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
    a.jmp(top)?;

    a.set_label(&mut bad)?;
    g.print("blk-mismatch=")?;
    g.print_hex(r12, 8)?;
    g.print("\n")?;
    g.halt_forever()?;
    g.a.set_label(&mut fail)?;
    g.print("virtio-failed\n")?;
    g.halt_forever()?;

    // rng_request: 16 random bytes into RNG_BUF (cleared first); a used
    // length other than 16 or bytes still all zero end in `fail`.
    let a = &mut g.a;
    a.set_label(&mut rng_request)?;
    a.mov(qword_ptr(RNG_BUF), 0)?;
    a.mov(qword_ptr(RNG_BUF + 8), 0)?;
    a.mov(rax, RNG_BUF)?;
    a.mov(qword_ptr(RNG_DESC), rax)?;
    a.mov(dword_ptr(RNG_DESC + 8), 16)?;
    a.mov(word_ptr(RNG_DESC + 12), 2)?; // WRITE
    a.mov(word_ptr(RNG_DESC + 14), 0)?;
    a.movzx(eax, word_ptr(RNG_AVAIL + 2))?;
    a.mov(ecx, eax)?;
    a.and(ecx, 7)?;
    a.mov(word_ptr(rcx * 2 + (RNG_AVAIL + 4)), 0)?;
    a.inc(eax)?;
    a.mfence()?;
    a.mov(word_ptr(RNG_AVAIL + 2), ax)?;
    a.mfence()?;
    a.mov(word_ptr(r14 + 0x3000), 0)?;
    let mut rng_poll = a.create_label();
    a.set_label(&mut rng_poll)?;
    a.pause()?;
    a.cmp(word_ptr(RNG_USED + 2), ax)?;
    a.jne(rng_poll)?;
    // used.ring[(idx - 1) % 8].len
    a.dec(eax)?;
    a.and(eax, 7)?;
    a.cmp(dword_ptr(rax * 8 + (RNG_USED + 8)), 16)?;
    a.jne(fail)?;
    a.mov(rax, qword_ptr(RNG_BUF))?;
    a.or(rax, qword_ptr(RNG_BUF + 8))?;
    a.jz(fail)?;
    a.ret()?;

    // request: EBX = type (0 read, 1 write), RSI = sector, RDI = buffer.
    // One three-descriptor chain (header, data, status), notify, poll the
    // used index; a non-zero status ends in `fail`.
    let a = &mut g.a;
    a.set_label(&mut request)?;
    a.mov(dword_ptr(HEADER), ebx)?;
    a.mov(dword_ptr(HEADER + 4), 0)?;
    a.mov(qword_ptr(HEADER + 8), rsi)?;
    a.mov(byte_ptr(STATUS), 0xff)?;
    // desc 0: header, NEXT -> 1
    a.mov(rax, HEADER)?;
    a.mov(qword_ptr(DESC), rax)?;
    a.mov(dword_ptr(DESC + 8), 16)?;
    a.mov(word_ptr(DESC + 12), 1)?;
    a.mov(word_ptr(DESC + 14), 1)?;
    // desc 1: data, NEXT (| WRITE for a read) -> 2
    a.mov(qword_ptr(DESC + 16), rdi)?;
    a.mov(dword_ptr(DESC + 24), SECTOR as u32)?;
    a.mov(eax, 3)?; // NEXT | WRITE
    a.mov(ecx, 1)?; // NEXT
    a.test(ebx, ebx)?;
    a.cmovnz(eax, ecx)?;
    a.mov(word_ptr(DESC + 28), ax)?;
    a.mov(word_ptr(DESC + 30), 2)?;
    // desc 2: status, WRITE
    a.mov(rax, STATUS)?;
    a.mov(qword_ptr(DESC + 32), rax)?;
    a.mov(dword_ptr(DESC + 40), 1)?;
    a.mov(word_ptr(DESC + 44), 2)?;
    a.mov(word_ptr(DESC + 46), 0)?;
    // avail.ring[idx % 8] = 0; idx += 1
    a.movzx(eax, word_ptr(AVAIL + 2))?;
    a.mov(ecx, eax)?;
    a.and(ecx, 7)?;
    a.mov(word_ptr(rcx * 2 + (AVAIL + 4)), 0)?;
    a.inc(eax)?;
    a.mfence()?;
    a.mov(word_ptr(AVAIL + 2), ax)?;
    a.mfence()?;
    // notify queue 0
    a.mov(word_ptr(r15 + 0x3000), 0)?;
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.pause()?;
    a.cmp(word_ptr(USED + 2), ax)?;
    a.jne(poll)?;
    a.cmp(byte_ptr(STATUS), 0)?;
    a.jne(fail)?;
    a.ret()
}

fn kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), blk_guest);
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

fn blks(output: &str) -> Vec<u64> {
    output
        .split('\n')
        .filter_map(|l| {
            let hex = l.trim_end_matches('\r').strip_prefix("blk=")?;
            (hex.len() == 8)
                .then(|| u64::from_str_radix(hex, 16).ok())
                .flatten()
        })
        .collect()
}

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

/// Wait for `n` blk lines (or EOF / timeout); the values seen.
fn wait_blks(vm: &mut LiveVm, n: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    loop {
        let c = blks(&vm.output());
        if c.len() >= n || std::time::Instant::now() > deadline {
            return c;
        }
        if vm.read_chunk(std::time::Duration::from_secs(1)).is_none() {
            return blks(&vm.output());
        }
    }
}

/// The round number sector `s` of a disk image holds (its first u64).
fn sector_value(disk: &[u8], s: usize) -> u64 {
    let b = &disk[s * SECTOR..s * SECTOR + 8];
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Stop `vm` and return the last round it printed, the output read to
/// the end: the guest may have finished rounds after `seen` before the
/// kill reached it (on a loaded host, more than one).
fn stop_and_last(vm: &mut LiveVm, seen: u64) -> u64 {
    vm.kill_and_drain();
    blks(&vm.output()).last().copied().unwrap_or(seen).max(seen)
}

/// The disk holds exactly what rounds 1..=last wrote (the latest round
/// of each sector), up to a round `last + 1` cut short by the kill.
fn assert_disk_after(disk: &[u8], last: u64, what: &str) {
    for s in 0..64usize {
        let v = sector_value(disk, s);
        assert!(
            v <= last + 1,
            "{what}: sector {s} holds round {v}, after the guest's last round {last}: the disk was not rolled back"
        );
    }
    for i in last.saturating_sub(62).max(1)..=last {
        let v = sector_value(disk, (i % 64) as usize);
        assert!(
            v == i || v == i + 64,
            "{what}: sector {} holds round {v}, want {i}",
            i % 64
        );
    }
    assert!(disk[HOST_SECTOR * SECTOR..].starts_with(b"hostdata\0"));
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

/// A restored guest goes on from the snapshot's round (the last round
/// the disk copy holds, printed or not yet), in order, and its disk reads
/// give back what it wrote.
fn check_continues(vm: &mut LiveVm, snap_round: u64, what: &str) -> u64 {
    let c = wait_blks(vm, 5);
    assert!(c.len() >= 5, "{what}: printed {c:?}:\n{}", vm.output());
    assert!(
        c[0] == snap_round || c[0] == snap_round + 1,
        "{what}: started at round {}, the snapshot was taken in round {snap_round}",
        c[0]
    );
    for p in c.windows(2) {
        assert_eq!(p[1], p[0] + 1, "{what}: rounds skip: {c:?}");
    }
    let out = vm.output();
    assert!(
        !out.contains("blk-mismatch") && !out.contains("virtio-failed"),
        "{what}:\n{out}"
    );
    assert!(
        !out.contains("host-sector="),
        "{what}: the guest set the device up again:\n{out}"
    );
    *c.last().expect("rounds")
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
        out.stderr.contains(want),
        "expected {want:?} in the error\n{out}"
    );
    assert!(!out.stdout.contains("blk="), "the guest ran:\n{out}");
}

#[test]
fn a_guest_writing_its_virtio_disk_is_snapshotted_restored_and_cloned() {
    require_kvm!();
    let dir = TempDir::new("snapblk");
    let mut image = vec![0u8; DISK_BYTES];
    image[HOST_SECTOR * SECTOR..HOST_SECTOR * SECTOR + 9].copy_from_slice(b"hostdata\0");
    let disk = dir.write("data.raw", &image);
    let socket = dir.path().join("ctl.sock");
    let snap = dir.path().join("snap");
    let kernel = kernel(&dir);
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &[
            "--disk",
            &format!("path={},id=data,format=raw", disk.display()),
            "--rng",
            "--control-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    assert!(
        vm.read_until("blk=00000003\n"),
        "the guest never did 3 rounds:\n{}",
        vm.output()
    );
    assert!(
        vm.output().contains("host-sector=hostdata"),
        "{}",
        vm.output()
    );
    wait_for_socket(&socket);
    // The sandbox: the device threads the guest's driver started from a
    // vCPU are filtered like every other thread.
    support::assert_every_thread_filtered(
        vm.pid(),
        &["vcpu0", "blk-data", "virtio-rng", "control", "launcher"],
    );
    let reply = control(&socket, &format!("snapshot {}", snap.display()));
    assert_eq!(reply["ok"], true, "snapshot failed: {reply}");
    assert_eq!(reply["state"], "running", "{reply}");
    let disks = reply["snapshot"]["disks"]
        .as_array()
        .expect("disks in the reply");
    assert_eq!(disks.len(), 1, "{reply}");
    assert_eq!(disks[0]["id"], "data");
    assert_eq!(disks[0]["format"], "raw");
    assert_eq!(disks[0]["bytes"], DISK_BYTES as u64);
    let copy = snap.join("disks/data.raw");
    assert_eq!(
        Path::new(disks[0]["path"].as_str().expect("path")),
        copy.canonicalize().expect("copy exists")
    );
    // The copy holds rounds 1..=snap_round: the round the snapshot was
    // taken in (its write was completed or not started, never torn).
    let copied = std::fs::read(&copy).expect("read copy");
    let snap_round = (0..64).map(|s| sector_value(&copied, s)).max().unwrap_or(0);
    assert!(snap_round >= 3, "the copy holds rounds up to {snap_round}");
    for i in snap_round.saturating_sub(63).max(1)..=snap_round {
        assert_eq!(
            sector_value(&copied, (i % 64) as usize),
            i,
            "the copy's sector {}",
            i % 64
        );
    }
    // The original keeps going (its device restarted after the capture)
    // and overwrites every sector with later rounds.
    let later = format!("blk={:08x}\n", snap_round + 70);
    assert!(
        vm.read_until(&later),
        "the original stopped after the snapshot:\n{}",
        vm.output()
    );
    drop(vm);
    let after = std::fs::read(&disk).expect("read disk");
    assert!((0..64).any(|s| sector_value(&after, s) > snap_round + 64));

    // Restore: the disk is rolled back, the guest goes on.
    let mut restored = restore(&snap, &[]);
    let seen = check_continues(&mut restored, snap_round, "restore");
    let last = stop_and_last(&mut restored, seen);
    assert_disk_after(&std::fs::read(&disk).expect("read disk"), last, "restore");

    // A clone on its own copy of the disk; the original disk stays as is.
    let before = std::fs::read(&disk).expect("read disk");
    let clone_disk = dir.path().join("clone.raw");
    std::fs::copy(&copy, &clone_disk).expect("copy");
    let mut clone = restore(
        &snap,
        &[
            "--disk",
            &format!("id=data,path={},format=raw", clone_disk.display()),
            "--restore-lazy",
        ],
    );
    let seen = check_continues(&mut clone, snap_round, "clone");
    let last = stop_and_last(&mut clone, seen);
    assert_disk_after(
        &std::fs::read(&clone_disk).expect("read clone"),
        last,
        "clone",
    );
    assert_eq!(
        std::fs::read(&disk).expect("read disk"),
        before,
        "the clone wrote the original disk"
    );

    // Refused before the guest runs: a disk of another size, an unknown
    // disk id, other device flags, a changed disk copy.
    let small = dir.write("small.raw", &vec![0u8; DISK_BYTES / 2]);
    refused(
        &snap,
        &[
            "--disk",
            &format!("id=data,path={},format=raw", small.display()),
        ],
        "saved size",
    );
    refused(
        &snap,
        &["--disk", "id=other,path=/nonexistent"],
        "no disk with id=other",
    );
    refused(
        &snap,
        &["--balloon"],
        "--restore takes the machine from the snapshot",
    );
    let mut tampered = copied.clone();
    tampered.push(0);
    std::fs::write(&copy, &tampered).expect("write copy");
    refused(&snap, &[], "was changed");
}

/// `migrate-to`, retried while the target is not listening yet.
fn migrate_to(socket: &Path, args: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    loop {
        let reply = control(socket, &format!("migrate-to {args}"));
        let refused = reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect"));
        if !refused || std::time::Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Live migration of the disk-writing guest to another process (disk on
/// shared storage), pre-copy and post-copy: the target builds the virtio
/// devices from its OWN flags (a target whose devices differ from the
/// source's is refused first, and the source keeps running), and the
/// guest goes on through its queues without setting them up again; the
/// disk holds every round.
fn migrate_disk_guest(postcopy: bool) {
    let dir = TempDir::new(if postcopy { "migblkpc" } else { "migblk" });
    let mut image = vec![0u8; DISK_BYTES];
    image[HOST_SECTOR * SECTOR..HOST_SECTOR * SECTOR + 9].copy_from_slice(b"hostdata\0");
    let disk = dir.write("data.raw", &image);
    let socket = dir.path().join("ctl.sock");
    let kernel = kernel(&dir);
    let mut src = LiveVm::start_kernel(
        &kernel,
        &[
            "--disk",
            &format!("path={},id=data,format=raw", disk.display()),
            "--rng",
            "--control-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    assert!(
        src.read_until("blk=00000003\n"),
        "the guest never did 3 rounds:\n{}",
        src.output()
    );
    wait_for_socket(&socket);
    let mode = if postcopy { " --postcopy" } else { "" };
    let own_disk = format!("path={},id=data,format=raw", disk.display());
    // Targets whose own definition differs: no disk (the old target
    // opened the source's disk path from its record), another disk id, a
    // read-only disk. Each is refused before it allocates anything, names
    // the difference, and the source keeps running.
    for (i, (devices, says)) in [
        (vec!["--rng"], "1 disk(s) (data), this target 0"),
        (
            vec!["--disk", "path=/dev/null,id=other,format=raw", "--rng"],
            "id=other",
        ),
        (
            vec!["--disk", &format!("{own_disk},readonly=on"), "--rng"],
            "writable at the source, read-only here",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("refuse{i}.sock"));
        let mut args = vec![
            "run".to_string(),
            "--migrate-from".into(),
            format!("unix:{}", path.display()),
            "--cpus".into(),
            "1".into(),
            "--memory".into(),
            "256".into(),
        ];
        args.extend(devices.iter().map(|s| s.to_string()));
        let mut refusing = LiveVm::start(&[], &args, RUN_TIMEOUT);
        let reply = migrate_to(&socket, &format!("unix:{}{mode}", path.display()));
        assert_eq!(reply["ok"], false, "{reply}");
        let e = reply["error"].as_str().unwrap_or_default();
        assert!(
            e.contains(says) && e.contains("differ from this target's definition"),
            "expected {says:?}: {reply}"
        );
        let status = refusing.wait("the refusing target to exit");
        assert_eq!(status.code(), Some(2));
        assert!(
            refusing.output().is_empty(),
            "the guest ran on the refusing target"
        );
        assert_eq!(control(&socket, "status")["state"], "running");
    }
    let path = dir.path().join("mig.sock");
    let mut dst = LiveVm::start(
        &[],
        &[
            "run".to_string(),
            "--migrate-from".into(),
            format!("unix:{}", path.display()),
            "--cpus".into(),
            "1".into(),
            "--memory".into(),
            "256".into(),
            "--disk".into(),
            own_disk.clone(),
            "--rng".into(),
        ],
        RUN_TIMEOUT,
    );
    let reply = migrate_to(&socket, &format!("unix:{}{mode}", path.display()));
    assert_eq!(reply["ok"], true, "migration failed: {reply}");
    let status = src.wait("the source to exit after migrating");
    assert_eq!(status.code(), Some(0), "source: {}", src.output());
    let last_src = *blks(&src.output()).last().expect("source rounds");
    let c = wait_blks(&mut dst, 5);
    assert!(c.len() >= 5, "the target printed {c:?}:\n{}", dst.output());
    assert!(
        c[0] == last_src + 1 || c[0] == last_src + 2,
        "the target started at round {}, the source stopped at {last_src}",
        c[0]
    );
    for p in c.windows(2) {
        assert_eq!(p[1], p[0] + 1, "rounds skip: {c:?}");
    }
    let out = dst.output();
    assert!(
        !out.contains("blk-mismatch") && !out.contains("virtio-failed"),
        "{out}"
    );
    assert!(
        !out.contains("host-sector="),
        "the migrated guest set the device up again:\n{out}"
    );
    let last = stop_and_last(&mut dst, *c.last().expect("rounds"));
    assert_disk_after(&std::fs::read(&disk).expect("read disk"), last, "migrated");
}

#[test]
fn a_guest_writing_its_virtio_disk_migrates_live() {
    require_kvm!();
    migrate_disk_guest(false);
}

#[test]
fn a_guest_writing_its_virtio_disk_migrates_post_copy() {
    require_kvm!();
    migrate_disk_guest(true);
}

/// A device thread (started from the vCPU when the guest's driver sets the
/// device up, so through the seccomp launcher) that makes a syscall outside
/// its filter kills the whole VM process
/// (`VIREO_TEST_FORBIDDEN_SYSCALL`, see tests/seccomp.rs).
#[test]
fn a_forbidden_syscall_on_a_device_thread_kills_the_vm() {
    require_kvm!();
    use std::os::unix::process::ExitStatusExt;
    for kind in ["block", "rng"] {
        let dir = TempDir::new("seccomp-dev");
        let disk = dir.write("data.raw", &vec![0u8; DISK_BYTES]);
        let kernel = kernel(&dir);
        let args: Vec<String> = [
            "run",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--disk",
            &format!("path={},id=data,format=raw", disk.display()),
            "--rng",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut vm = LiveVm::start_env(
            &[],
            &args,
            &[("VIREO_TEST_FORBIDDEN_SYSCALL", kind)],
            RUN_TIMEOUT,
        );
        let status = vm.wait(&format!(
            "the {kind} thread's forbidden syscall to kill vireo"
        ));
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{kind}: status {status:?}, output {}",
            vm.output()
        );
        assert!(
            blks(&vm.output()).is_empty(),
            "{kind}: no round completes without the device: {}",
            vm.output()
        );
    }
}
