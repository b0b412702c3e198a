//! End-to-end tests: boot tiny guests, assembled here with iced-x86, through
//! the `vireo` binary, and check what they print on COM1 and how vireo exits.
//! Also checks that bad command lines are refused with exit 2.
//!
//! They run on vireo's default backend (KVM), and on the emulator with
//! `VIREO_TEST_ACCEL=emu` (the README's test command does both). The guests
//! start in the Linux boot protocol's 64-bit entry (long mode, first 4 GiB
//! identity mapped, interrupts off, RSI = zero page). Where the backend is
//! unavailable (no /dev/kvm) the tests print `skipping: ...` and return.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use iced_x86::code_asm::*;

use support::guest::{self, assemble64, Guest64};
use support::{run_vireo, KernelKind, LiveVm, Outcome, TempDir, RUN_TIMEOUT};

/// Build the kernel file for `kind` from a guest body and write it to `dir`.
fn kernel_file(
    dir: &TempDir,
    kind: KernelKind,
    body: impl FnOnce(&mut Guest64) -> guest::AsmResult,
) -> std::path::PathBuf {
    let code = assemble64(kind.entry(), body);
    dir.write(kind.file_name(), &kind.wrap(&code))
}

/// Boot an ELF guest built from `body` with extra vireo arguments.
fn boot(tag: &str, args: &[&str], body: impl FnOnce(&mut Guest64) -> guest::AsmResult) -> Outcome {
    let dir = TempDir::new(tag);
    let kernel = kernel_file(&dir, KernelKind::Elf, body);
    run_vireo(&kernel, args, RUN_TIMEOUT)
}

/// A guest that does nothing but power off through ACPI S5.
fn just_power_off(g: &mut Guest64) -> guest::AsmResult {
    g.power_off()
}

const HELLO: &str = "hello from vireo guest\n";

#[test]
fn serial_output_reaches_stdout_elf() {
    require_kvm!();
    serial_output_reaches_stdout(KernelKind::Elf);
}

#[test]
fn serial_output_reaches_stdout_bzimage() {
    require_kvm!();
    serial_output_reaches_stdout(KernelKind::BzImage);
}

fn serial_output_reaches_stdout(kind: KernelKind) {
    let dir = TempDir::new("hello");
    let kernel = kernel_file(&dir, kind, |g| {
        g.print(HELLO)?;
        g.power_off()
    });
    let out = run_vireo(&kernel, &[], RUN_TIMEOUT);
    out.assert_status(0);
    assert!(
        out.stdout.contains(HELLO),
        "{kind:?}: expected {HELLO:?} on stdout\n{out}"
    );
}

#[test]
fn acpi_s5_poweroff_exits_zero() {
    require_kvm!();
    let out = boot("s5", &[], just_power_off);
    out.assert_status(0);
    assert!(
        !out.stdout.contains("still running after the ACPI S5"),
        "the guest kept running after the S5 request\n{out}"
    );
}

#[test]
fn i8042_reset_exits_zero() {
    require_kvm!();
    let out = boot("i8042", &[], |g| {
        g.print("guest: resetting through the i8042\n")?;
        g.a.mov(al, u32::from(guest::I8042_RESET_CPU))?;
        g.a.out(i32::from(guest::I8042_CMD), al)?;
        g.print("guest: still running after the i8042 reset\n")?;
        g.halt_forever()
    });
    out.assert_status(0);
    assert!(
        out.stdout.contains("guest: resetting through the i8042"),
        "expected the guest's marker on stdout\n{out}"
    );
    assert!(
        !out.stdout.contains("still running after the i8042 reset"),
        "the guest kept running after the reset request\n{out}"
    );
}

#[test]
fn unknown_port_reads_all_ones() {
    require_kvm!();
    let out = boot("ports", &[], |g| {
        let a = &mut g.a;
        a.xor(eax, eax)?;
        a.mov(dx, 0x3e0u32)?;
        a.in_(al, dx)?;
        a.mov(rbx, rax)?;
        g.print("in8(0x3e0)=")?;
        g.print_hex(rbx, 2)?;
        g.print("\n")?;
        let a = &mut g.a;
        a.xor(eax, eax)?;
        a.mov(dx, 0x3e4u32)?;
        a.in_(ax, dx)?;
        a.mov(rbx, rax)?;
        g.print("in16(0x3e4)=")?;
        g.print_hex(rbx, 4)?;
        g.print("\n")?;
        g.power_off()
    });
    out.assert_status(0);
    for want in ["in8(0x3e0)=ff\n", "in16(0x3e4)=ffff\n"] {
        assert!(
            out.stdout.contains(want),
            "expected {want:?} on stdout (unmodelled ports read as all ones)\n{out}"
        );
    }
}

/// PCI configuration mechanism #1: the host bridge answers at 00:00.0 and
/// an empty slot reads as all ones; a byte write of 0xCF9 still resets.
#[test]
fn pci_config_ports_find_the_host_bridge() {
    require_kvm!();
    let out = boot("pci", &[], |g| {
        for (slot, reg) in [(0u32, 0u32), (0, 8), (7, 0)] {
            let a = &mut g.a;
            a.mov(eax, 0x8000_0000u32 | slot << 11 | reg)?;
            a.mov(dx, 0xcf8u32)?;
            a.out(dx, eax)?;
            a.mov(dx, 0xcfcu32)?;
            a.in_(eax, dx)?;
            a.mov(ebx, eax)?;
            g.print(&format!("pci {slot:02x}:{reg:02x}="))?;
            g.print_hex(rbx, 8)?;
            g.print("\n")?;
        }
        g.power_off()
    });
    out.assert_status(0);
    for want in [
        "pci 00:00=00081b36\n",
        "pci 00:08=06000000\n",
        "pci 07:00=ffffffff\n",
    ] {
        assert!(out.stdout.contains(want), "expected {want:?}\n{out}");
    }
}

/// The BSP guest for the SMP test: print its APIC id, wake the APs with
/// INIT-SIPI-SIPI into [`guest::ap_trampoline`], wait (bounded by the TSC)
/// until `cpus - 1` of them checked in, report the count and power off.
fn smp_guest(g: &mut Guest64, cpus: u32) -> guest::AsmResult {
    let trampoline = guest::ap_trampoline();
    let tramp = g.data(&trampoline);
    let a = &mut g.a;

    // Clear the AP lock and counter, copy the trampoline to 0x10000.
    a.mov(edi, guest::AP_LOCK_ADDR as u32)?;
    a.mov(dword_ptr(rdi), 0u32)?;
    a.mov(dword_ptr(rdi + 4), 0u32)?;
    a.lea(rsi, ptr(tramp))?;
    a.mov(edi, guest::TRAMPOLINE_ADDR as u32)?;
    a.mov(ecx, trampoline.len() as u32)?;
    a.rep().movsb()?;

    // The BSP's own id (CPUID leaf 1, EBX[31:24]).
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.shr(ebx, 24)?;
    g.print("bsp apic id ")?;
    g.print_hex(rbx, 2)?;
    g.print("\n")?;

    let a = &mut g.a;
    // Software-enable the local APIC (SVR bit 8, spurious vector 0xff).
    a.mov(rdi, guest::LAPIC_BASE)?;
    a.mov(dword_ptr(rdi + guest::LAPIC_SVR), 0x1ffu32)?;

    // Send one IPI through the ICR, then wait for delivery (bounded) and a
    // short busy delay.
    let send_ipi = |a: &mut CodeAssembler, icr: u32, delay: u32| -> guest::AsmResult {
        a.mov(dword_ptr(rdi + guest::LAPIC_ICR_LOW), icr)?;
        let mut pending = a.create_label();
        let mut sent = a.create_label();
        a.mov(ecx, 100_000u32)?;
        a.set_label(&mut pending)?;
        a.test(dword_ptr(rdi + guest::LAPIC_ICR_LOW), 1u32 << 12)?; // delivery status
        a.jz(sent)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(pending)?;
        a.set_label(&mut sent)?;
        let mut spin = a.create_label();
        a.mov(ecx, delay)?;
        a.set_label(&mut spin)?;
        a.dec(ecx)?;
        a.jnz(spin)?;
        Ok(())
    };
    send_ipi(a, guest::ICR_INIT_ALL_BUT_SELF, 10_000)?;
    send_ipi(a, guest::ICR_SIPI_ALL_BUT_SELF, 1_000)?;
    send_ipi(a, guest::ICR_SIPI_ALL_BUT_SELF, 1_000)?;

    // Wait until cpus - 1 APs incremented the counter, at most ~1e10 TSC
    // cycles (a few seconds).
    let mut wait = a.create_label();
    let mut report = a.create_label();
    a.mov(rdi, guest::AP_LOCK_ADDR)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r8, rax)?;
    a.mov(r9, 10_000_000_000u64)?;
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(rdi + 4), (cpus - 1) as i32)?;
    a.jae(report)?;
    a.pause()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r8)?;
    a.cmp(rax, r9)?;
    a.jb(wait)?;
    g.print("timeout waiting for the APs\n")?;
    // Take the AP lock so a late AP cannot interleave with the report.
    let mut locked = g.a.create_label();
    g.a.set_label(&mut report)?;
    g.a.mov(al, 1u32)?;
    g.a.xchg(byte_ptr(rdi), al)?;
    g.a.test(al, al)?;
    g.a.jz(locked)?;
    g.a.pause()?;
    g.a.jmp(report)?;
    g.a.set_label(&mut locked)?;
    g.a.mov(ebx, dword_ptr(rdi + 4))?;
    g.print("aps checked in: ")?;
    g.print_hex(rbx, 2)?;
    g.print("\n")?;
    g.power_off()
}

fn smp_each_vcpu_reports_apic_id(cpus: u32) {
    let n = cpus.to_string();
    let out = boot(&format!("smp{cpus}"), &["--cpus", &n], |g| {
        smp_guest(g, cpus)
    });
    out.assert_status(0);

    let mut bsp = Vec::new();
    let mut aps = Vec::new();
    for line in out.stdout.lines() {
        let parse = |s: &str| {
            u32::from_str_radix(s.trim(), 16)
                .unwrap_or_else(|e| panic!("bad APIC id in {line:?}: {e}\n{out}"))
        };
        if let Some(id) = line.strip_prefix("bsp apic id ") {
            bsp.push(parse(id));
        } else if let Some(id) = line.strip_prefix("ap apic id ") {
            aps.push(parse(id));
        }
    }
    assert_eq!(bsp, vec![0], "the BSP should report APIC id 0 once\n{out}");
    let ap_set: BTreeSet<u32> = aps.iter().copied().collect();
    let want: BTreeSet<u32> = (1..cpus).collect();
    assert!(
        ap_set == want && aps.len() == want.len(),
        "expected each AP to report once with APIC ids {want:?}, saw {aps:?}\n{out}"
    );
    let checked_in = format!("aps checked in: {:02x}\n", cpus - 1);
    assert!(
        out.stdout.contains(&checked_in),
        "expected {checked_in:?} (the BSP saw every AP's counter increment)\n{out}"
    );
    assert!(!out.stdout.contains("timeout"), "{out}");
}

#[test]
fn smp_each_vcpu_reports_apic_id_2() {
    require_kvm!();
    smp_each_vcpu_reports_apic_id(2);
}

#[test]
fn smp_each_vcpu_reports_apic_id_4() {
    require_kvm!();
    smp_each_vcpu_reports_apic_id(4);
}

#[test]
fn triple_fault_is_reported() {
    require_kvm!();
    let out = boot("triple", &[], |g| {
        // An IDT of limit 0: any exception faults again until the CPU shuts down.
        let idtr = g.data(&[0u8; 10]);
        g.print("guest: about to triple fault\n")?;
        g.a.lidt(ptr(idtr))?;
        // ud2 rather than int3: under PVM without VT-x the host emulates the
        // guest with KVM's instruction emulator, which cannot emulate INT n
        // in long mode (an "emulation failure", not a triple fault).
        g.a.ud2()?;
        g.print("guest: survived ud2 with an empty IDT\n")?;
        g.power_off()
    });
    assert!(!out.timed_out, "vireo hung on a triple fault\n{out}");
    assert_eq!(
        out.status,
        Some(1),
        "expected exit status 1 on a triple fault\n{out}"
    );
    assert!(
        out.stderr.to_lowercase().contains("triple fault"),
        "expected \"triple fault\" in stderr\n{out}"
    );
    assert!(
        out.stdout.contains("guest: about to triple fault"),
        "expected the guest's marker before the fault\n{out}"
    );
}

/// The guest reads the boot parameters the zero page (RSI) points to and
/// prints the command line and the start of the initrd.
#[test]
fn boot_params_carry_cmdline_and_initrd() {
    require_kvm!();
    let dir = TempDir::new("params");
    let initrd_text = b"VIREO-INITRD-0123456789\0trailing bytes";
    let initrd = dir.write("initrd", initrd_text);
    let kernel = kernel_file(&dir, KernelKind::BzImage, |g| {
        g.a.mov(rbx, rsi)?;
        g.print("rsi=")?;
        g.print_hex(rbx, 8)?;
        g.print("\ncmdline=[")?;
        g.a.mov(r12d, dword_ptr(rbx + 0x228))?; // hdr.cmd_line_ptr
        g.print_str_at(r12)?;
        g.print("]\ninitrd_size=")?;
        g.a.mov(r12d, dword_ptr(rbx + 0x21c))?; // hdr.ramdisk_size
        g.print_hex(r12, 8)?;
        g.print("\ninitrd=[")?;
        g.a.mov(r12d, dword_ptr(rbx + 0x218))?; // hdr.ramdisk_image
        g.print_str_at(r12)?;
        g.print("]\n")?;
        g.power_off()
    });
    let out = run_vireo(
        &kernel,
        &[
            "--cmdline",
            "console=ttyS0 vireo.test=1",
            "--initrd",
            initrd.to_str().expect("utf-8 temp path"),
        ],
        RUN_TIMEOUT,
    );
    out.assert_status(0);
    let want = [
        "rsi=00007000\n".to_string(),
        "cmdline=[console=ttyS0 vireo.test=1]\n".to_string(),
        format!("initrd_size={:08x}\n", initrd_text.len()),
        "initrd=[VIREO-INITRD-0123456789]\n".to_string(),
    ];
    for w in &want {
        assert!(
            out.stdout.contains(w.as_str()),
            "expected {w:?} on stdout\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------
// Bad input: exit 2 with a short message naming the problem.

/// A valid kernel to pair with otherwise bad arguments.
fn good_kernel(dir: &TempDir) -> std::path::PathBuf {
    kernel_file(dir, KernelKind::Elf, just_power_off)
}

fn assert_bad_input(out: &Outcome, keywords: &[&str]) {
    out.assert_status(2);
    let err = out.stderr.trim();
    assert!(
        !err.is_empty(),
        "expected an error message on stderr\n{out}"
    );
    assert!(
        !err.contains("panicked"),
        "vireo panicked instead of reporting bad input\n{out}"
    );
    assert!(
        err.len() < 2000,
        "expected a short error message, saw {} bytes\n{out}",
        err.len()
    );
    let lower = err.to_lowercase();
    for k in keywords {
        assert!(
            lower.contains(&k.to_lowercase()),
            "expected stderr to mention {k:?}\n{out}"
        );
    }
}

#[test]
fn bad_input_kernel_of_random_bytes() {
    require_kvm!();
    let dir = TempDir::new("junk");
    // Deterministic pseudo-random bytes (xorshift), not starting with an ELF
    // magic and without "HdrS" at 0x202.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut junk: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    junk[0] = 0x42;
    junk[0x202] = 0;
    let path = dir.write("junk.bin", &junk);
    let out = run_vireo(&path, &[], RUN_TIMEOUT);
    assert_bad_input(&out, &["kernel", "junk.bin", "elf", "bzimage"]);
    assert!(
        out.stderr.to_lowercase().contains("neither") || out.stderr.to_lowercase().contains("not"),
        "expected stderr to say the file is neither ELF nor bzImage\n{out}"
    );
}

#[test]
fn bad_input_nonexistent_kernel() {
    require_kvm!();
    let out = run_vireo(Path::new("/nonexistent"), &[], RUN_TIMEOUT);
    assert_bad_input(&out, &["kernel", "/nonexistent"]);
}

#[test]
fn bad_input_zero_cpus() {
    let dir = TempDir::new("cpus0");
    let out = run_vireo(&good_kernel(&dir), &["--cpus", "0"], RUN_TIMEOUT);
    assert_bad_input(&out, &["cpus"]);
}

#[test]
fn bad_input_one_mib_of_memory() {
    require_kvm!();
    let dir = TempDir::new("mem1");
    let out = run_vireo(&good_kernel(&dir), &["--memory", "1"], RUN_TIMEOUT);
    assert_bad_input(&out, &["memory"]);
}

#[test]
fn bad_input_unknown_flag() {
    let dir = TempDir::new("flag");
    let out = run_vireo(&good_kernel(&dir), &["--no-such-flag"], RUN_TIMEOUT);
    assert_bad_input(&out, &["--no-such-flag"]);
}

#[test]
fn initrd_too_large() {
    require_kvm!();
    let dir = TempDir::new("bigrd");
    let initrd = dir.path().join("initrd.img");
    let f = std::fs::File::create(&initrd).expect("creating the initrd");
    f.set_len(80 << 20).expect("making a sparse 80 MiB initrd");
    drop(f);
    let out = run_vireo(
        &good_kernel(&dir),
        &[
            "--memory",
            "64",
            "--initrd",
            initrd.to_str().expect("utf-8 temp path"),
        ],
        RUN_TIMEOUT,
    );
    assert_bad_input(&out, &["initrd"]);
}

/// Stdin reaches the guest's UART when it is a pipe: the guest echoes what
/// it receives until it reads `q`, then powers off.
#[test]
fn piped_stdin_reaches_the_guest() {
    require_kvm!();
    let dir = TempDir::new("echo");
    let kernel = kernel_file(&dir, KernelKind::Elf, |g| {
        g.print("echo-ready\n")?;
        let mut poll = g.a.create_label();
        let mut done = g.a.create_label();
        g.a.set_label(&mut poll)?;
        g.a.mov(edx, u32::from(guest::COM1) + 5)?; // line status register
        g.a.in_(al, dx)?;
        g.a.test(al, 1)?; // data ready
        g.a.jz(poll)?;
        g.a.mov(edx, u32::from(guest::COM1))?;
        g.a.in_(al, dx)?;
        g.a.cmp(al, b'q' as i32)?;
        g.a.je(done)?;
        g.a.out(dx, al)?;
        g.a.jmp(poll)?;
        g.a.set_label(&mut done)?;
        g.print("\necho-done\n")?;
        g.power_off()
    });
    let args: Vec<String> = ["run", "--kernel", &kernel.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // More than the UART's 64-byte FIFO, so vireo must wait for the guest
    // to drain it.
    let text = "typed into the console ".repeat(8);
    let input = format!("{text}q");
    let out = support::run_vireo_with_input(&args, Some(input.as_bytes()), RUN_TIMEOUT);
    out.assert_status(0);
    assert!(
        out.stdout
            .contains(&format!("echo-ready\n{text}\necho-done")),
        "{out}"
    );
}

/// A user who may not open /dev/kvm gets one line naming it and the fix.
/// Runs vireo as `nobody` through setpriv, so it needs root and a /dev/kvm
/// that others cannot open (as Debian ships it: root:kvm 0660).
#[test]
fn kvm_permission_denied_names_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata("/dev/kvm") {
        Ok(m) => m.permissions().mode(),
        Err(e) => return eprintln!("skipping: /dev/kvm: {e}"),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || mode & 0o006 != 0 {
        return eprintln!("skipping: needs root and a /dev/kvm closed to others (mode {mode:o})");
    }
    let dir = TempDir::new("noperm");
    let kernel = good_kernel(&dir);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(support::vireo_bin())
        .args(["run", "--accel", "kvm", "--kernel"])
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return eprintln!("skipping: setpriv is not available ({e})"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("/dev/kvm") && stderr.contains("kvm group"),
        "stderr should name /dev/kvm and the fix: {stderr}"
    );
}

/// SIGTERM stops a running VM cleanly: vireo exits 0 promptly, also when the
/// guest never exits by itself.
#[test]
fn sigterm_stops_the_vm_cleanly() {
    require_kvm!();
    let dir = TempDir::new("sigterm");
    let kernel = kernel_file(&dir, KernelKind::Elf, |g| {
        g.print("spinning\n")?;
        let mut spin = g.a.create_label();
        g.a.set_label(&mut spin)?;
        g.a.jmp(spin)
    });
    let mut vm = LiveVm::start_kernel(&kernel, &[]);
    assert!(vm.read_until("spinning"), "guest never started");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGTERM) };
    let status = vm.wait("vireo to stop on SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should stop the VM with status 0"
    );
}

/// The ACPI power button (`power-button` on the control socket) reaches a
/// guest that enabled it as an SCI on IRQ 9 through the IOAPIC, level
/// triggered and active high as the MADT's override says.
#[test]
fn acpi_power_button_reaches_the_guest_as_an_sci() {
    require_kvm!();
    use std::io::{Read, Write};
    let dir = TempDir::new("pwrbtn");
    let kernel = kernel_file(&dir, KernelKind::Elf, guest::wait_for_power_button);
    let socket = dir.path().join("control.sock");
    let socket_arg = socket.display().to_string();
    let mut vm = LiveVm::start_kernel(&kernel, &["--control-socket", &socket_arg]);
    assert!(
        vm.read_until("waiting for the power button"),
        "{}",
        vm.output()
    );
    let mut ctl = std::os::unix::net::UnixStream::connect(&socket).expect("control socket");
    ctl.write_all(b"power-button\n").expect("send");
    let mut reply = String::new();
    ctl.read_to_string(&mut reply).expect("reply");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(vm.read_until("power button pressed"), "{}", vm.output());
    let status = vm.wait("the guest to power off");
    assert_eq!(status.code(), Some(0), "{}", vm.output());
}

/// A raw disk onto which a guest wrote a qcow2 header whose backing file
/// is a host file: vireo never reads it as qcow2 for a writable disk.
#[test]
fn a_writable_disk_without_format_is_refused_and_never_probed() {
    require_kvm!();
    let dir = TempDir::new("noformat");
    let kernel = good_kernel(&dir);
    let scratch = dir.path().join("scratch.qcow2");
    vireo_block::create_qcow2(
        &scratch,
        1 << 20,
        64 << 10,
        Some(("/etc/hostname", vireo_api::devices::block::Format::Raw)),
    )
    .expect("create");
    let mut bytes = std::fs::read(&scratch).expect("read");
    bytes.resize(1 << 20, 0);
    let disk = dir.write("vda.raw", &bytes);
    let disk = disk.display().to_string();

    let out = run_vireo(&kernel, &["--disk", &format!("path={disk}")], RUN_TIMEOUT);
    assert_bad_input(
        &out,
        &[&format!("--disk path={disk}"), "format=raw", "guess"],
    );
    // Asked to read it as qcow2, the backing name outside the disk's
    // directory is refused.
    let out = run_vireo(
        &kernel,
        &["--disk", &format!("path={disk},format=qcow2,readonly=on")],
        RUN_TIMEOUT,
    );
    assert_bad_input(&out, &["/etc/hostname", "is refused", "outside"]);
    // As raw it is just the guest's bytes: the VM runs.
    let out = run_vireo(
        &kernel,
        &["--disk", &format!("path={disk},format=raw")],
        RUN_TIMEOUT,
    );
    out.assert_status(0);
}

/// A qcow2 overlay whose backing file is in another directory opens only
/// when that directory is allowed with --backing-dir.
#[test]
fn backing_files_outside_the_image_directory_need_backing_dir() {
    require_kvm!();
    let dir = TempDir::new("backing-dir");
    let kernel = good_kernel(&dir);
    let (base_dir, top_dir) = (dir.path().join("base"), dir.path().join("vm"));
    std::fs::create_dir_all(&base_dir).expect("mkdir");
    std::fs::create_dir_all(&top_dir).expect("mkdir");
    let base = base_dir.join("base.raw");
    vireo_block::create_raw(&base, 1 << 20).expect("create");
    let top = top_dir.join("top.qcow2");
    let base_name = base.display().to_string();
    vireo_block::create_qcow2(
        &top,
        1 << 20,
        64 << 10,
        Some((&base_name, vireo_api::devices::block::Format::Raw)),
    )
    .expect("create");
    let disk = format!("path={},format=qcow2", top.display());
    let out = run_vireo(&kernel, &["--disk", &disk], RUN_TIMEOUT);
    assert_bad_input(&out, &[&base_name, "is refused", "outside"]);
    let base_dir = base_dir.display().to_string();
    let out = run_vireo(
        &kernel,
        &["--disk", &disk, "--backing-dir", &base_dir],
        RUN_TIMEOUT,
    );
    out.assert_status(0);
}
