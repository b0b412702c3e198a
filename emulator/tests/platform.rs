//! The emulator as a complete backend: tiny guests booted through the
//! `Hypervisor`/`Vm`/`Vcpu` traits by a small VMM loop (one thread per
//! vCPU, COM1 output into a buffer, ACPI S5 on port 0x604 as power-off),
//! exercising the LAPIC timer, the PIT through the IOAPIC, interrupt lines,
//! the PIC, INIT-SIPI-SIPI with real-mode trampolines (one switching to
//! long mode), kicks, and random writes to every platform register.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vireo_emulator::{EmuHypervisor, EmuVm};
use vireo_hypervisor::{
    CpuidEntry, Hypervisor, InterruptLine, LapicState, Regs, Segment, TableRegister, Vcpu,
    VcpuExit, Vm,
};

const MEM: usize = 16 << 20;
const GDT: u64 = 0x500;
const IDT: u64 = 0x1000;
const PML4: u64 = 0x9000;
const COUNTER: u64 = 0x6000;
const SCRATCH: u64 = 0x6010;
const CODE: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x8_0000;
const READY_PORT: u16 = 0x500;
const CODE32: u64 = 0x00cf_9b00_0000_ffff;
const CODE64: u64 = 0x00af_9b00_0000_ffff;
const DATA: u64 = 0x00cf_9300_0000_ffff;

/// Anonymous host memory for the guest.
struct Ram {
    ptr: *mut u8,
}

// SAFETY: plain anonymous memory shared with the vCPU threads, as a VMM's.
unsafe impl Send for Ram {}
// SAFETY: see above.
unsafe impl Sync for Ram {}

impl Ram {
    fn new() -> Ram {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Ram { ptr: p.cast() }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= MEM);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        }
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: in bounds of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; every vCPU is gone by now.
        unsafe { libc::munmap(self.ptr.cast(), MEM) };
    }
}

/// A guest program: code at CODE and the IDT gates to install.
struct Program {
    code: Vec<u8>,
    gates: Vec<(u8, u64)>,
}

fn program(
    f: impl FnOnce(&mut CodeAssembler) -> Result<Vec<(u8, CodeLabel)>, IcedError>,
) -> Program {
    let mut a = CodeAssembler::new(64).unwrap();
    let gates = f(&mut a).unwrap();
    let r = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let gates = gates
        .into_iter()
        .map(|(v, l)| (v, r.label_ip(&l).unwrap()))
        .collect();
    Program {
        code: r.inner.code_buffer,
        gates,
    }
}

fn print(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, 0x3f8u32)?;
    for b in s.bytes() {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Print AL's low nibble as a hex digit (DX must be 0x3f8).
fn print_nibble(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut dec = a.create_label();
    a.and(al, 0xf)?;
    a.cmp(al, 10)?;
    a.jb(dec)?;
    a.add(al, 39)?;
    a.set_label(&mut dec)?;
    a.add(al, 48)?;
    a.out(dx, al)
}

fn power_off(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, 0x604u32)?;
    a.mov(ax, 0x3400u32)?;
    a.out(dx, ax)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(l)
}

/// An interrupt handler: count in COUNTER, EOI the local APIC (and the
/// PICs when `pic`), IRETQ.
fn handler(a: &mut CodeAssembler, pic: bool) -> Result<CodeLabel, IcedError> {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.push(rax)?;
    a.push(rdi)?;
    a.mov(eax, COUNTER as u32)?;
    a.lock().inc(dword_ptr(rax))?;
    a.mov(edi, 0xfee0_0000u32)?;
    a.mov(dword_ptr(rdi + 0xb0), 0u32)?;
    if pic {
        a.mov(al, 0x20u32)?;
        a.out(0xa0u32, al)?;
        a.out(0x20u32, al)?;
    }
    a.pop(rdi)?;
    a.pop(rax)?;
    a.iretq()?;
    Ok(l)
}

/// Mask both 8259s (as firmware leaves them for an APIC guest), then
/// software-enable the local APIC (RDI = its base afterwards).
fn apic_on(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(al, 0xffu32)?;
    a.out(0x21u32, al)?;
    a.out(0xa1u32, al)?;
    a.mov(edi, 0xfee0_0000u32)?;
    a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32)
}

/// `sti; hlt` until COUNTER reaches `n`.
fn wait_count(a: &mut CodeAssembler, n: u32) -> Result<(), IcedError> {
    let mut l = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l)?;
    a.mov(eax, COUNTER as u32)?;
    a.cmp(dword_ptr(rax), n as i32)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.jmp(l)?;
    a.set_label(&mut done)
}

struct Machine {
    vm: Arc<dyn Vm>,
    ram: Arc<Ram>,
    vcpus: Vec<Box<dyn Vcpu>>,
}

fn seg(sel: u16, desc: u64) -> Segment {
    Segment::from_descriptor(sel, desc)
}

/// A VM with `n` vCPUs set up as vireo's VM core does: BSP in long mode at
/// CODE, APs waiting for SIPI, LINT0 ExtINT / LINT1 NMI.
fn machine(n: u32, p: &Program) -> Machine {
    let hv = EmuHypervisor::new();
    assert_eq!(hv.name(), "emu");
    let vm = hv.create_vm().unwrap();
    let ram = Arc::new(Ram::new());
    // SAFETY: `ram` outlives the VM (Machine drops vCPUs and VM first).
    unsafe { vm.map_memory(0, 0, MEM as u64, ram.ptr as u64) }.unwrap();
    for (i, d) in [0, CODE32, CODE64, DATA].iter().enumerate() {
        ram.write(GDT + 8 * i as u64, &d.to_le_bytes());
    }
    ram.write(PML4, &(0xa000u64 | 3).to_le_bytes());
    for g in 0..4u64 {
        let pd = 0xb000 + g * 0x1000;
        ram.write(0xa000 + g * 8, &(pd | 3).to_le_bytes());
        for j in 0..512u64 {
            ram.write(pd + j * 8, &(((g << 30) | (j << 21)) | 0x83).to_le_bytes());
        }
    }
    for &(v, at) in &p.gates {
        let lo = (at & 0xffff) | (0x10 << 16) | (0x8e << 40) | ((at >> 16) & 0xffff) << 48;
        ram.write(IDT + u64::from(v) * 16, &lo.to_le_bytes());
        ram.write(IDT + u64::from(v) * 16 + 8, &(at >> 32).to_le_bytes());
    }
    ram.write(CODE, &p.code);
    let cpuid = hv.supported_cpuid().unwrap();
    assert!(cpuid
        .iter()
        .any(|e| e.function == 1 && e.edx & (1 << 9) != 0));
    let mut vcpus = Vec::new();
    for id in 0..n {
        let v = vm.create_vcpu(id).unwrap();
        let mine: Vec<CpuidEntry> = cpuid
            .iter()
            .map(|e| {
                let mut e = *e;
                if e.function == 1 {
                    e.ebx = (e.ebx & 0xffff) | (id << 24) | (n << 16);
                }
                if e.function == 0xb {
                    e.edx = id;
                }
                e
            })
            .collect();
        v.set_cpuid(&mine).unwrap();
        let mut l: LapicState = v.lapic().unwrap();
        assert_eq!(l.reg(0x20) >> 24, id, "APIC id");
        l.set_reg(0x350, (l.reg(0x350) & !0x700) | 0x700);
        l.set_reg(0x360, (l.reg(0x360) & !0x700) | 0x400);
        v.set_lapic(&l).unwrap();
        assert_eq!(
            v.lapic().unwrap().reg(0x350) & 0x700,
            0x700,
            "set_lapic round-trips"
        );
        if id == 0 {
            let mut s = v.special_regs().unwrap();
            s.cs = seg(0x10, CODE64);
            for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
                *d = seg(0x18, DATA);
            }
            s.gdt = TableRegister {
                base: GDT,
                limit: 31,
            };
            s.idt = TableRegister {
                base: IDT,
                limit: 0xfff,
            };
            s.cr0 = 0x8000_0011;
            s.cr3 = PML4;
            s.cr4 = 0x20;
            s.efer = 0x500;
            v.set_special_regs(&s).unwrap();
            v.set_regs(&Regs {
                rip: CODE,
                rsp: STACK_TOP,
                rflags: 2,
                ..Regs::default()
            })
            .unwrap();
        }
        vcpus.push(v);
    }
    Machine { vm, ram, vcpus }
}

#[derive(Default)]
struct Outcome {
    serial: String,
    powered_off: bool,
    failure: Option<String>,
    elapsed: Duration,
}

/// Run every vCPU on its own thread until S5, a failure or `timeout`.
/// When the guest writes READY_PORT, `line` (if any) is triggered from
/// this thread.
fn run(m: Machine, timeout: Duration, line: Option<Arc<dyn InterruptLine>>) -> (Outcome, Arc<Ram>) {
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Outcome::default()));
    let start = Instant::now();
    let mut threads = Vec::new();
    for mut v in m.vcpus {
        let (done, ready, out) = (done.clone(), ready.clone(), out.clone());
        threads.push(std::thread::spawn(move || {
            let id = v.id();
            let mut last = Instant::now();
            while !done.load(Ordering::SeqCst) {
                let exit = v.run().unwrap();
                let gap = last.elapsed();
                last = Instant::now();
                if gap > Duration::from_millis(200) {
                    out.lock().unwrap().failure =
                        Some(format!("vCPU {id}: run() took {gap:?} to return"));
                }
                match exit {
                    VcpuExit::IoOut(0x3f8, d) => {
                        out.lock().unwrap().serial.push(d[0] as char);
                    }
                    VcpuExit::IoOut(0x604, d) => {
                        if d.len() == 2 && u16::from_le_bytes([d[0], d[1]]) & 0x2000 != 0 {
                            out.lock().unwrap().powered_off = true;
                            done.store(true, Ordering::SeqCst);
                        }
                    }
                    VcpuExit::IoOut(READY_PORT, _) => ready.store(true, Ordering::SeqCst),
                    VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::Interrupted => {}
                    VcpuExit::IoIn(_, d) | VcpuExit::MmioRead(_, d) => d.fill(0xff),
                    other => {
                        out.lock().unwrap().failure = Some(format!("vCPU {id}: {other:?}"));
                        done.store(true, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    while !done.load(Ordering::SeqCst) && start.elapsed() < timeout {
        if ready.swap(false, Ordering::SeqCst) {
            if let Some(l) = &line {
                l.trigger().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    drop(m.vm);
    let mut o = std::mem::take(&mut *out.lock().unwrap());
    o.elapsed = start.elapsed();
    (o, m.ram)
}

fn assert_ok(o: &Outcome, want: &str) {
    assert!(o.failure.is_none(), "{:?}\nserial: {}", o.failure, o.serial);
    assert!(o.powered_off, "no power-off; serial: {:?}", o.serial);
    assert!(o.serial.contains(want), "serial: {:?}", o.serial);
}

#[test]
fn lapic_periodic_timer_wakes_hlt() {
    let p = program(|a| {
        apic_on(a)?;
        a.mov(dword_ptr(rdi + 0x3e0), 0xbu32)?; // divide by 1
        a.mov(dword_ptr(rdi + 0x320), 0x2_0040u32)?; // periodic, vector 0x40
        a.mov(dword_ptr(rdi + 0x380), 1_000_000u32)?; // 1 ms at 1 GHz
        wait_count(a, 10)?;
        a.mov(dword_ptr(rdi + 0x320), 0x1_0000u32)?;
        print(a, "lapic timer ok\n")?;
        power_off(a)?;
        let h = handler(a, false)?;
        Ok(vec![(0x40, h)])
    });
    let (o, ram) = run(machine(1, &p), Duration::from_secs(10), None);
    assert_ok(&o, "lapic timer ok");
    assert_eq!(ram.read_u64(COUNTER) as u32, 10);
    assert!(o.elapsed >= Duration::from_millis(9), "{:?}", o.elapsed);
}

#[test]
fn pit_channel0_through_ioapic_and_channel2_calibration() {
    let p = program(|a| {
        apic_on(a)?;
        // IOAPIC pin 0 -> vector 0x41, edge, fixed, physical APIC 0.
        a.mov(esi, 0xfec0_0000u32)?;
        a.mov(dword_ptr(rsi), 0x10u32)?;
        a.mov(dword_ptr(rsi + 0x10), 0x41u32)?;
        a.mov(dword_ptr(rsi), 0x11u32)?;
        a.mov(dword_ptr(rsi + 0x10), 0u32)?;
        // Channel 2, mode 0, 11932 ticks (10 ms), gate on: time it with RDTSC
        // as Linux's TSC calibration does.
        a.mov(al, 0x01u32)?;
        a.out(0x61u32, al)?;
        a.mov(al, 0xb0u32)?;
        a.out(0x43u32, al)?;
        a.mov(al, 0x9cu32)?;
        a.out(0x42u32, al)?;
        a.mov(al, 0x2eu32)?;
        a.out(0x42u32, al)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r8, rax)?;
        let mut poll = a.create_label();
        a.set_label(&mut poll)?;
        a.in_(al, 0x61u32)?;
        a.test(al, 0x20)?;
        a.jz(poll)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.sub(rax, r8)?;
        a.mov(ecx, SCRATCH as u32)?;
        a.mov(qword_ptr(rcx), rax)?;
        // Channel 0, mode 2, 1193 ticks (1 ms).
        a.mov(al, 0x34u32)?;
        a.out(0x43u32, al)?;
        a.mov(al, 0xa9u32)?;
        a.out(0x40u32, al)?;
        a.mov(al, 0x04u32)?;
        a.out(0x40u32, al)?;
        wait_count(a, 5)?;
        print(a, "pit ok\n")?;
        power_off(a)?;
        let h = handler(a, false)?;
        Ok(vec![(0x41, h)])
    });
    let (o, ram) = run(machine(1, &p), Duration::from_secs(10), None);
    assert_ok(&o, "pit ok");
    let tsc = ram.read_u64(SCRATCH);
    assert!(
        (9_000_000..200_000_000).contains(&tsc),
        "10 ms of PIT channel 2 took {tsc} TSC cycles (1 GHz)"
    );
}

#[test]
fn interrupt_line_4_reaches_the_guest_through_ioapic() {
    let p = program(|a| {
        apic_on(a)?;
        a.mov(esi, 0xfec0_0000u32)?;
        a.mov(dword_ptr(rsi), 0x18u32)?; // pin 4 low
        a.mov(dword_ptr(rsi + 0x10), 0x44u32)?;
        a.mov(dword_ptr(rsi), 0x19u32)?;
        a.mov(dword_ptr(rsi + 0x10), 0u32)?;
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        wait_count(a, 1)?;
        print(a, "irq4 ok\n")?;
        power_off(a)?;
        let h = handler(a, false)?;
        Ok(vec![(0x44, h)])
    });
    let m = machine(1, &p);
    let line = m.vm.interrupt_line(4).unwrap();
    let (o, _) = run(m, Duration::from_secs(10), Some(line));
    assert_ok(&o, "irq4 ok");
}

#[test]
fn interrupt_line_4_reaches_the_guest_through_the_pic() {
    let p = program(|a| {
        // ICW1-4 for both PICs: vectors 0x20/0x28, cascade on IRQ 2.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xef), // only IRQ 4
            (0xa1, 0xff),
        ] {
            a.mov(al, v as u32)?;
            a.out(port as u32, al)?;
        }
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        wait_count(a, 1)?;
        print(a, "pic irq4 ok\n")?;
        power_off(a)?;
        let h = handler(a, true)?;
        Ok(vec![(0x24, h)])
    });
    let m = machine(1, &p);
    let line = m.vm.interrupt_line(4).unwrap();
    let (o, _) = run(m, Duration::from_secs(10), Some(line));
    assert_ok(&o, "pic irq4 ok");
}

const TRAMPOLINE: u64 = 0x1_0000;
const AP_LOCK: u64 = 0x1_3000;
const AP_COUNT: u64 = AP_LOCK + 4;

/// The BSP of the SMP tests: INIT-SIPI-SIPI to all but self, wait for
/// `cpus - 1` check-ins, report.
fn smp_bsp(cpus: u32) -> Program {
    program(|a| {
        apic_on(a)?;
        let ipi = |a: &mut CodeAssembler, icr: u32| -> Result<(), IcedError> {
            a.mov(dword_ptr(rdi + 0x300), icr)?;
            let mut busy = a.create_label();
            a.set_label(&mut busy)?;
            a.test(dword_ptr(rdi + 0x300), 1u32 << 12)?;
            a.jnz(busy)?;
            let mut spin = a.create_label();
            a.mov(ecx, 2000u32)?;
            a.set_label(&mut spin)?;
            a.dec(ecx)?;
            a.jnz(spin)
        };
        let sipi = 0x000c_4600 | (TRAMPOLINE >> 12) as u32;
        ipi(a, 0x000c_4500)?;
        ipi(a, sipi)?;
        ipi(a, sipi)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r8, rax)?;
        let mut wait = a.create_label();
        let mut report = a.create_label();
        a.mov(esi, AP_COUNT as u32)?;
        a.set_label(&mut wait)?;
        a.cmp(dword_ptr(rsi), (cpus - 1) as i32)?;
        a.jae(report)?;
        a.pause()?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.sub(rax, r8)?;
        a.mov(r9, 8_000_000_000u64)?;
        a.cmp(rax, r9)?;
        a.jb(wait)?;
        print(a, "timeout\n")?;
        // Take the AP lock so no AP prints while we do.
        a.set_label(&mut report)?;
        a.mov(ecx, AP_LOCK as u32)?;
        a.mov(al, 1u32)?;
        a.xchg(byte_ptr(rcx), al)?;
        a.test(al, al)?;
        a.jnz(report)?;
        print(a, "aps checked in: ")?;
        a.mov(eax, dword_ptr(rsi))?;
        a.add(al, 48)?;
        a.out(dx, al)?;
        print(a, "\n")?;
        power_off(a)?;
        Ok(vec![])
    })
}

/// Real-mode AP code (vireo's test trampoline): lock, print the APIC id
/// from CPUID, count, unlock, `cli; hlt`.
fn real_mode_trampoline() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    let f = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        let lock = (AP_LOCK - TRAMPOLINE) as u32;
        a.cli()?;
        a.mov(ax, cs)?;
        a.mov(ds, ax)?;
        let mut retry = a.create_label();
        let mut got = a.create_label();
        a.set_label(&mut retry)?;
        a.mov(al, 1u32)?;
        a.xchg(byte_ptr(lock), al)?;
        a.test(al, al)?;
        a.jz(got)?;
        a.pause()?;
        a.jmp(retry)?;
        a.set_label(&mut got)?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24)?;
        print(a, "ap apic id ")?;
        a.mov(al, bl)?;
        a.shr(al, 4)?;
        print_nibble(a)?;
        a.mov(al, bl)?;
        print_nibble(a)?;
        print(a, "\n")?;
        a.lock().inc(dword_ptr(lock + 4))?;
        a.mov(byte_ptr(lock), 0u32)?;
        let mut h = a.create_label();
        a.set_label(&mut h)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(h)
    };
    f(&mut a).unwrap();
    a.assemble(0).unwrap()
}

/// AP code that goes real mode -> protected mode -> long mode, then
/// prints its APIC id from 64-bit code. Returns (address, bytes) pieces.
fn long_mode_trampoline() -> Vec<(u64, Vec<u8>)> {
    const PM32: u64 = 0x1_1000;
    const LM64: u64 = 0x1_2000;
    const GDTR: u64 = 0x1_0f00;
    let mut out = Vec::new();
    // 16-bit: load the GDT, set CR0.PE, far jump to 32-bit code.
    let mut a = CodeAssembler::new(16).unwrap();
    (|| -> Result<(), IcedError> {
        a.cli()?;
        a.mov(ax, cs)?;
        a.mov(ds, ax)?;
        a.lgdt(dword_ptr((GDTR - TRAMPOLINE) as u32))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        Ok(())
    })()
    .unwrap();
    let mut code = a.assemble(0).unwrap();
    // jmp dword 0x08:PM32 (o32 EA ptr16:32)
    code.extend_from_slice(&[0x66, 0xea]);
    code.extend_from_slice(&(PM32 as u32).to_le_bytes());
    code.extend_from_slice(&0x08u16.to_le_bytes());
    out.push((TRAMPOLINE, code));
    let mut gdtr = 31u16.to_le_bytes().to_vec();
    gdtr.extend_from_slice(&(GDT as u32).to_le_bytes());
    out.push((GDTR, gdtr));
    // 32-bit: data segments, PAE, CR3, EFER.LME, CR0.PG, far jump to 64-bit.
    let mut a = CodeAssembler::new(32).unwrap();
    (|| -> Result<(), IcedError> {
        a.mov(ax, 0x18u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x7_0000u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PML4 as u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        a.jmp_far(0x10, LM64 as u32)
    })()
    .unwrap();
    out.push((PM32, a.assemble(PM32).unwrap()));
    // 64-bit: lock, print, count, unlock, halt.
    let mut a = CodeAssembler::new(64).unwrap();
    (|| -> Result<(), IcedError> {
        let mut retry = a.create_label();
        let mut got = a.create_label();
        a.mov(ecx, AP_LOCK as u32)?;
        a.set_label(&mut retry)?;
        a.mov(al, 1u32)?;
        a.xchg(byte_ptr(rcx), al)?;
        a.test(al, al)?;
        a.jz(got)?;
        a.pause()?;
        a.jmp(retry)?;
        a.set_label(&mut got)?;
        a.push(rcx)?; // the stack works in long mode too
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24)?;
        print(&mut a, "ap64 apic id ")?;
        a.mov(al, bl)?;
        a.shr(al, 4)?;
        print_nibble(&mut a)?;
        a.mov(al, bl)?;
        print_nibble(&mut a)?;
        print(&mut a, "\n")?;
        a.pop(rcx)?;
        a.lock().inc(dword_ptr(rcx + 4))?;
        a.mov(byte_ptr(rcx), 0u32)?;
        let mut h = a.create_label();
        a.set_label(&mut h)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(h)
    })()
    .unwrap();
    out.push((LM64, a.assemble(LM64).unwrap()));
    out
}

fn check_aps(o: &Outcome, cpus: u32, prefix: &str) {
    assert_ok(o, &format!("aps checked in: {}\n", cpus - 1));
    let mut ids: Vec<u32> = o
        .serial
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|s| u32::from_str_radix(s, 16).unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..cpus).collect::<Vec<_>>(), "serial: {}", o.serial);
}

#[test]
fn smp_real_mode_trampoline_reports_apic_ids() {
    for cpus in [2, 4] {
        let m = machine(cpus, &smp_bsp(cpus));
        m.ram.write(TRAMPOLINE, &real_mode_trampoline());
        let (o, _) = run(m, Duration::from_secs(20), None);
        check_aps(&o, cpus, "ap apic id ");
    }
}

#[test]
fn smp_trampoline_to_long_mode() {
    let cpus = 4;
    let m = machine(cpus, &smp_bsp(cpus));
    for (at, bytes) in long_mode_trampoline() {
        m.ram.write(at, &bytes);
    }
    let (o, _) = run(m, Duration::from_secs(20), None);
    check_aps(&o, cpus, "ap64 apic id ");
}

#[test]
fn kick_and_halt_return_interrupted_promptly() {
    // A spinning vCPU with an unlimited budget, kicked from another thread.
    let vm = EmuVm::new();
    let ram = Ram::new();
    // SAFETY: `ram` outlives `vm` and the vCPU (dropped first below).
    unsafe { vm.map_memory(0, 0, MEM as u64, ram.ptr as u64) }.unwrap();
    let p = program(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)?;
        Ok(vec![])
    });
    for (i, d) in [0, CODE32, CODE64, DATA].iter().enumerate() {
        ram.write(GDT + 8 * i as u64, &d.to_le_bytes());
    }
    ram.write(CODE, &p.code);
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.set_budget(u64::MAX);
    let mut s = v.special_regs().unwrap();
    s.cs = seg(0x10, CODE64);
    s.ss = seg(0x18, DATA);
    s.cr0 = 0x11;
    s.efer = 0x500;
    v.set_special_regs(&s).unwrap();
    v.set_regs(&Regs {
        rip: CODE,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    let kicker = v.kicker().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        let mut n = 0u32;
        while !stop2.load(Ordering::SeqCst) {
            let t0 = Instant::now();
            let exit = v.run().unwrap();
            assert!(matches!(exit, VcpuExit::Interrupted), "{exit:?}");
            worst = worst.max(t0.elapsed());
            n += 1;
        }
        (worst, n)
    });
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(2));
        kicker.kick();
    }
    stop.store(true, Ordering::SeqCst);
    kicker.kick();
    let (worst, n) = t.join().unwrap();
    assert!(n >= 20, "only {n} returns");
    assert!(worst < Duration::from_millis(50), "run() took {worst:?}");

    // `cli; hlt` is a stopped CPU: Interrupted every ~1 ms, never Halt.
    let p = program(|a| {
        a.cli()?;
        a.hlt()?;
        Ok(vec![])
    });
    let m = machine(1, &p);
    let mut v = m.vcpus.into_iter().next().unwrap();
    let t0 = Instant::now();
    for _ in 0..20 {
        assert!(matches!(v.run().unwrap(), VcpuExit::Interrupted));
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "20 halted runs took {took:?}"
    );
    drop(v);
    drop(m.vm);
}

/// A tiny deterministic generator (xorshift64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_platform_register_writes_never_break_the_host() {
    let seed = std::env::var("VIREO_PLATFORM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001u64);
    eprintln!("VIREO_PLATFORM_FUZZ_SEED={seed}");
    let mut r = Rng(seed | 1);
    let p = program(|a| {
        a.mov(edi, 0xfee0_0000u32)?;
        a.mov(esi, 0xfec0_0000u32)?;
        for k in 0..3000 {
            let v = r.next() as u32;
            match r.below(10) {
                0..=2 => {
                    let mut off = (r.below(0x40) * 16) as i32;
                    let mut v = v;
                    if off == 0x300 {
                        // No INIT/SIPI to ourselves: that would stop the guest.
                        let mode = [0u32, 1, 2, 4, 7][r.below(5) as usize];
                        v = (v & !0x700) | (mode << 8);
                    }
                    if r.below(8) == 0 {
                        off = r.below(0x1000) as i32 & !3;
                    }
                    a.mov(dword_ptr(rdi + off), v)?;
                }
                3 => {
                    let off = r.below(0x1000) as i32 & !3;
                    a.mov(eax, dword_ptr(rdi + off))?;
                }
                4 | 5 => {
                    let sel = r.below(0x48) as u32;
                    a.mov(dword_ptr(rsi), sel)?;
                    let v = if sel >= 0x10 && sel % 2 == 0 {
                        let mode = [0u32, 1, 2, 4, 7][r.below(5) as usize];
                        (v & !0x700) | (mode << 8)
                    } else {
                        v
                    };
                    let reg = [0x10, 0x10, 0x40, 0x20][r.below(4) as usize];
                    a.mov(dword_ptr(rsi + reg), v)?;
                    a.mov(eax, dword_ptr(rsi + 0x10))?;
                }
                6 | 7 => {
                    let port = [0x20u32, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61]
                        [r.below(9) as usize];
                    a.mov(al, v & 0xff)?;
                    a.out(port, al)?;
                }
                8 => {
                    let port = [0x4d0u32, 0x4d1][r.below(2) as usize];
                    a.mov(dx, port)?;
                    a.mov(al, v & 0xff)?;
                    a.out(dx, al)?;
                    a.in_(al, dx)?;
                }
                _ => {
                    let port =
                        [0x20u32, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x61][r.below(8) as usize];
                    a.in_(al, port)?;
                }
            }
            if k % 16 == 15 {
                a.sti()?;
                a.nop()?;
                a.nop()?;
                a.cli()?;
            }
        }
        print(a, "fuzz done\n")?;
        power_off(a)?;
        let h = handler(a, true)?;
        Ok((0..=255u8).map(|v| (v, h)).collect())
    });
    let m = machine(1, &p);
    let line = m.vm.interrupt_line(4).unwrap();
    let (o, _) = run(m, Duration::from_secs(30), Some(line));
    assert_ok(&o, "fuzz done");
}

/// A restore loads the saved TSC, IA32_TSC_ADJUST and armed TSC deadline
/// as they were: the adjustment a guest WRMSR would apply must not take
/// the restored TSC back (a Linux guest restored with a TSC seconds behind
/// its clock stalled its timekeeping), and the deadline must not be lost
/// (a restored Linux guest then waited for a timer interrupt that never
/// came, and its shell never ran the next command).
#[test]
fn restored_tsc_and_tsc_adjust_are_the_saved_ones() {
    const TSC: u32 = 0x10;
    const TSC_ADJUST: u32 = 0x3b;
    let hv = EmuHypervisor::new();
    let msrs = hv.supported_msrs().unwrap();
    assert!(msrs.contains(&TSC) && msrs.contains(&TSC_ADJUST));
    const TSC_DEADLINE: u32 = 0x6e0;
    let vm = hv.create_vm().unwrap();
    vm.create_platform().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // The guest enabled its APIC with the timer in TSC-deadline mode,
    // moved its TSC 50 s ahead (TSC_ADJUST follows) and armed a deadline
    // 10 s later; then the VMM saved the vCPU.
    let mut lapic = vcpu.lapic().unwrap();
    lapic.regs[0xf0..0xf4].copy_from_slice(&0x1ffu32.to_le_bytes());
    lapic.regs[0x320..0x324].copy_from_slice(&((2u32 << 17) | 0xec).to_le_bytes());
    vcpu.set_lapic(&lapic).unwrap();
    let ahead = 50_000_000_000u64;
    let deadline = ahead + 10_000_000_000;
    vcpu.set_msrs(&[
        vireo_hypervisor::MsrEntry {
            index: TSC,
            value: ahead,
        },
        vireo_hypervisor::MsrEntry {
            index: TSC_DEADLINE,
            value: deadline,
        },
    ])
    .unwrap();
    let mut saved = vcpu.save_state(&msrs).unwrap();
    let msr = |s: &vireo_hypervisor::VcpuState, i: u32| {
        s.msrs
            .iter()
            .find(|m| m.index == i)
            .map(|m| m.value)
            .unwrap()
    };
    // A guest-visible adjustment that differs from the TSC's own offset.
    for m in saved.msrs.iter_mut().filter(|m| m.index == TSC_ADJUST) {
        m.value = 7;
    }
    let saved_tsc = msr(&saved, TSC);
    assert!(saved_tsc >= ahead);

    let vm2 = hv.create_vm().unwrap();
    vm2.create_platform().unwrap();
    let restored = vm2.create_vcpu(0).unwrap();
    restored.restore_state(&saved).unwrap();
    let now = restored.save_state(&msrs).unwrap();
    let tsc = msr(&now, TSC);
    assert!(
        tsc >= saved_tsc && tsc - saved_tsc < 5_000_000_000,
        "restored TSC {tsc} is not the saved {saved_tsc} (plus the few ms since)"
    );
    assert_eq!(msr(&now, TSC_ADJUST), 7);
    assert_eq!(msr(&saved, TSC_DEADLINE), deadline);
    assert_eq!(
        msr(&now, TSC_DEADLINE),
        deadline,
        "the armed TSC deadline survives the restore"
    );
}
