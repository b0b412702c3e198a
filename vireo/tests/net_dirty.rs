//! Frames virtio-net writes into guest memory are in diff snapshots: the
//! device reads frames from the TAP straight into the guest's receive
//! buffers (readv), past vm-memory, so it marks those bytes dirty itself.
//! A tiny guest posts four receive buffers and keeps checking what landed
//! in them; a full snapshot is taken while they are empty, four frames
//! arrive, and a diff snapshot restored later must hold them (without the
//! marks the restored buffers are the full snapshot's zeros while the used
//! ring says they are filled).
//!
//! The TAP lives in a network namespace the test creates; on KVM, or on
//! the emulator with `VIREO_TEST_ACCEL=emu`.

mod support;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

use support::checksum::{control, wait_for_socket};
use support::guest::{assemble64, Guest64};
use support::netns::NetNs;
use support::{KernelKind, LiveVm, TempDir, RUN_TIMEOUT};

// Guest memory the tiny driver uses (identity mapped, above the kernel).
const RX_DESC: u64 = 0x40_0000;
const RX_AVAIL: u64 = 0x40_1000;
const RX_USED: u64 = 0x40_2000;
const TX_DESC: u64 = 0x41_0000;
const TX_AVAIL: u64 = 0x41_1000;
const TX_USED: u64 = 0x41_2000;
/// Receive chain `k`: its header at `HDR_BUF + k * 0x1000`, its frame at
/// `RX_BUF + k * 0x1000`.
const HDR_BUF: u64 = 0x48_0000;
const RX_BUF: u64 = 0x50_0000;
const BUFFERS: u64 = 4;
/// Past the Ethernet header.
const PAYLOAD_AT: u64 = 14;
const PAYLOAD: usize = 1000;
const TAP: &str = "tap0";
const DELAY_TICKS: u32 = 20_000_000;

/// Configuration mechanism #1 address of `slot`, register `reg`.
fn cfg_addr(slot: u32, reg: u32) -> u32 {
    0x8000_0000 | (slot << 11) | reg
}

/// Select queue `q` and give it 8 entries at `rings`, enabled.
fn setup_queue(a: &mut CodeAssembler, q: u32, (desc, avail, used): (u64, u64, u64)) -> AsmResult {
    a.mov(word_ptr(r15 + 0x16), q)?;
    a.mov(word_ptr(r15 + 0x18), 8)?;
    a.mov(dword_ptr(r15 + 0x20), desc as u32)?;
    a.mov(dword_ptr(r15 + 0x24), 0)?;
    a.mov(dword_ptr(r15 + 0x28), avail as u32)?;
    a.mov(dword_ptr(r15 + 0x2c), 0)?;
    a.mov(dword_ptr(r15 + 0x30), used as u32)?;
    a.mov(dword_ptr(r15 + 0x34), 0)?;
    a.mov(word_ptr(r15 + 0x1c), 1)
}

type AsmResult = Result<(), iced_x86::IcedError>;

fn net_guest(g: &mut Guest64) -> AsmResult {
    let mut fail = g.a.create_label();
    let a = &mut g.a;
    // Slot 1: virtio-net (1af4:1041); BAR 0 into R15.
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(1, 0))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.cmp(eax, 0x1041_1af4)?;
    a.jne(fail)?;
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(1, 0x10))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.and(eax, 0xffff_fff0u32 as i32)?;
    a.mov(r15d, eax)?;
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, cfg_addr(1, 0x04))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.mov(ax, 6u32)?;
    a.out(dx, ax)?;
    // Reset, ACKNOWLEDGE | DRIVER, VERSION_1 only, FEATURES_OK.
    a.mov(byte_ptr(r15 + 0x14), 0)?;
    a.mov(byte_ptr(r15 + 0x14), 3)?;
    a.mov(dword_ptr(r15 + 0x08), 0)?;
    a.mov(dword_ptr(r15 + 0x0c), 0)?;
    a.mov(dword_ptr(r15 + 0x08), 1)?;
    a.mov(dword_ptr(r15 + 0x0c), 1)?;
    a.mov(byte_ptr(r15 + 0x14), 0xb)?;
    a.mov(al, byte_ptr(r15 + 0x14))?;
    a.test(al, 8)?;
    a.jz(fail)?;
    setup_queue(a, 0, (RX_DESC, RX_AVAIL, RX_USED))?;
    setup_queue(a, 1, (TX_DESC, TX_AVAIL, TX_USED))?;
    a.mov(byte_ptr(r15 + 0x14), 0xf)?;
    a.mov(al, byte_ptr(r15 + 0x14))?;
    a.test(al, 0x40)?; // NEEDS_RESET
    a.jnz(fail)?;
    // Four receive chains, then notify: the 12-byte header on a page of
    // its own (the device writes num_buffers there through vm-memory), the
    // frame on another page that only readv writes.
    for k in 0..BUFFERS {
        let d = RX_DESC + 32 * k;
        a.mov(rax, HDR_BUF + k * 0x1000)?;
        a.mov(qword_ptr(d), rax)?;
        a.mov(dword_ptr(d + 8), 12)?;
        a.mov(word_ptr(d + 12), 3)?; // NEXT | WRITE
        a.mov(word_ptr(d + 14), (2 * k + 1) as u32)?;
        a.mov(rax, RX_BUF + k * 0x1000)?;
        a.mov(qword_ptr(d + 16), rax)?;
        a.mov(dword_ptr(d + 24), 2048)?;
        a.mov(word_ptr(d + 28), 2)?; // WRITE
        a.mov(word_ptr(d + 30), 0)?;
        a.mov(word_ptr(RX_AVAIL + 4 + 2 * k), (2 * k) as u32)?;
    }
    a.mfence()?;
    a.mov(word_ptr(RX_AVAIL + 2), BUFFERS as u32)?;
    a.mfence()?;
    a.mov(word_ptr(r15 + 0x3000), 0)?;
    g.print("posted\n")?;
    let a = &mut g.a;
    // Wait for the four frames.
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.pause()?;
    a.cmp(word_ptr(RX_USED + 2), BUFFERS as i32)?;
    a.jne(poll)?;
    // Then, over and over: frame k's payload is PAYLOAD bytes of k + 1.
    let mut top = a.create_label();
    let mut bad = a.create_label();
    let mut next = a.create_label();
    a.set_label(&mut top)?;
    for k in 0..BUFFERS {
        let at = RX_BUF + k * 0x1000 + PAYLOAD_AT;
        for off in [0, PAYLOAD as u64 / 2, PAYLOAD as u64 - 1] {
            a.cmp(byte_ptr(at + off), (k + 1) as i32)?;
            a.jne(bad)?;
        }
    }
    g.print("rx=ok\n")?;
    g.a.jmp(next)?;
    g.a.set_label(&mut bad)?;
    g.print("rx=bad\n")?;
    let a = &mut g.a;
    a.set_label(&mut next)?;
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
    a.set_label(&mut fail)?;
    g.print("virtio-failed\n")?;
    g.halt_forever()
}

/// Send four frames out of the namespace's TAP (so the VM reads them):
/// frame k carries PAYLOAD bytes of k + 1.
fn send_frames(ns: &NetNs) {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we own.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(TAP).expect("name");
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no {TAP} in the namespace");
        // SAFETY: a plain socket call; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        for k in 0..BUFFERS as u8 {
            let mut frame = vec![0xffu8; 6];
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
            frame.extend(std::iter::repeat_n(k + 1, PAYLOAD));
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = ifindex as i32;
            to.sll_halen = 6;
            // SAFETY: the frame and address outlive the call; lengths match.
            let n = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n,
                frame.len() as isize,
                "send: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd is ours and not used after this.
        unsafe { libc::close(fd) };
    })
    .join()
    .expect("sender thread");
}

fn kernel(dir: &TempDir) -> std::path::PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), net_guest);
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

fn run_in(ns: &NetNs, args: &[String]) -> LiveVm {
    LiveVm::start(&ns.exec_prefix(), args, RUN_TIMEOUT)
}

fn wait_line(vm: &mut LiveVm, line: &str) {
    assert!(vm.read_until(line), "no {line:?}: {}", vm.output());
}

#[test]
fn received_frames_are_in_a_diff_snapshot() {
    require_kvm!();
    if let Some(why) = support::netns::unavailable_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = TempDir::new("netdirty");
    let kernel = kernel(&dir);
    let ns = NetNs::new("netdirty");
    // No IPv6: nothing but the test's frames reaches the guest.
    for key in ["all", "default"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
            .output()
            .expect("sysctl");
        assert!(out.status.success(), "{out:?}");
    }
    ns.add_tap(TAP, "10.0.2.1/24");
    let socket = dir.path().join("ctl.sock");
    let args: Vec<String> = [
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--net",
        "tap=tap0",
        "--control-socket",
        socket.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = run_in(&ns, &args);
    wait_line(&mut vm, "posted\n");
    wait_for_socket(&socket);
    let full = dir.path().join("full");
    let reply = control(&socket, &format!("snapshot {}", full.display()));
    assert_eq!(reply["ok"], true, "{reply}");
    // The buffers were empty when the full snapshot was taken.
    assert!(!vm.output().contains("rx="), "{}", vm.output());
    send_frames(&ns);
    wait_line(&mut vm, "rx=ok\n");
    assert!(!vm.output().contains("rx=bad"), "{}", vm.output());
    let diff = dir.path().join("diff");
    let reply = control(
        &socket,
        &format!("snapshot --diff --paused {}", diff.display()),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    drop(vm);

    let args = vec![
        "run".to_string(),
        "--restore".into(),
        diff.display().to_string(),
    ];
    let mut restored = run_in(&ns, &args);
    let deadline = Instant::now() + RUN_TIMEOUT;
    // A whole line: the output may stop mid-line.
    while !restored.output().contains("rx=ok\n") && !restored.output().contains("rx=bad\n") {
        assert!(
            Instant::now() < deadline,
            "the restored guest printed nothing: {}",
            restored.output()
        );
        if restored.read_chunk(Duration::from_secs(1)).is_none() {
            panic!("the restored VM exited: {}", restored.output());
        }
    }
    let out = restored.output();
    assert!(
        out.contains("rx=ok") && !out.contains("rx=bad"),
        "the restored receive buffers lost the frames: {out}"
    );
}
