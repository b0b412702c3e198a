//! End-to-end tests: small 64-bit programs in guest memory, run on the
//! emulator until they perform I/O, fault or halt.

mod common;

use iced_x86::code_asm::*;
use vireo_emulator::cpu::state::SegReg;
use vireo_emulator::{EmuVcpu, Exit};
use vireo_hypervisor::{Vcpu, VcpuExit};

use common::{Guest, HANDLERS, IDT, IST_TOP, PML4};

const CODE: u64 = 0x10_0000;

fn assemble(
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ip: u64,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// Identity map of the low 4 GiB with 2 MiB pages, laid out as vireo's VM
/// core does it: PML4 at 0x9000, PDPT at 0xa000, page directories at
/// 0xb000-0xefff.
fn vmcore_page_tables(g: &Guest) {
    g.write(PML4, &[0; 4096]);
    g.write(PML4, &(0xa000u64 | 3).to_le_bytes());
    for i in 0..4u64 {
        let pd = 0xb000 + i * 0x1000;
        g.write(0xa000 + i * 8, &(pd | 3).to_le_bytes());
        for j in 0..512u64 {
            let pa = (i * 512 + j) << 21;
            g.write(pd + j * 8, &(pa | 0x83).to_le_bytes());
        }
    }
}

/// Point IDT vector `v` at `handler`.
fn set_gate(g: &Guest, v: u64, handler: u64) {
    let lo = (handler & 0xffff)
        | (0x10 << 16)
        | (1 << 32)
        | (0x8e << 40)
        | ((handler >> 16) & 0xffff) << 48;
    g.write(IDT + v * 16, &lo.to_le_bytes());
    g.write(IDT + v * 16 + 8, &(handler >> 32).to_le_bytes());
}

#[test]
fn serial_output_then_hlt() {
    let g = Guest::new();
    vmcore_page_tables(&g);
    let msg = b"vireo\n";
    let code = assemble(
        |a| {
            let mut msg_label = a.create_label();
            let mut next = a.create_label();
            a.mov(dx, 0x3f8)?;
            a.lea(rsi, ptr(msg_label))?;
            a.mov(ecx, msg.len() as u32)?;
            a.set_label(&mut next)?;
            a.lodsb()?;
            a.out(dx, al)?;
            a.dec(ecx)?;
            a.jnz(next)?;
            // One more byte from a REP OUTSB, one with OUT imm8.
            a.lea(rsi, ptr(msg_label))?;
            a.mov(ecx, 2)?;
            a.rep().outsb()?;
            a.mov(al, b'!' as u32)?;
            a.out(0xe9u32, al)?;
            a.hlt()?;
            a.set_label(&mut msg_label)?;
            a.db(msg)?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = 0x80000;
    let mut vcpu = EmuVcpu::new(0, cpu);
    let mut out = Vec::new();
    let mut ports = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                ports.push(port);
                out.extend_from_slice(data);
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Halt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(out, b"vireo\nvi!");
    assert_eq!(ports[..8], [0x3f8; 8]);
    assert_eq!(ports[8], 0xe9);
    let regs = vcpu.regs().unwrap();
    // RIP is past the HLT.
    assert_eq!(g.read(regs.rip - 1, 1), [0xf4]);
}

#[test]
fn port_and_mmio_reads_complete_with_vmm_data() {
    let g = Guest::new();
    vmcore_page_tables(&g);
    let code = assemble(
        |a| {
            a.mov(dx, 0x3fd)?;
            a.in_(al, dx)?;
            a.movzx(ebx, al)?;
            a.mov(eax, dword_ptr(0xd000_0000u64))?;
            a.add(eax, 1)?;
            a.mov(dword_ptr(0xd000_0004u64), eax)?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(
        cpu.run(100),
        Exit::IoIn {
            port: 0x3fd,
            size: 1
        }
    );
    cpu.io_data_mut()[0] = 0x60;
    assert_eq!(
        cpu.run(100),
        Exit::MmioRead {
            gpa: 0xd000_0000,
            len: 4
        }
    );
    cpu.io_data_mut()[..4].copy_from_slice(&0x1234_5677u32.to_le_bytes());
    assert_eq!(
        cpu.run(100),
        Exit::MmioWrite {
            gpa: 0xd000_0004,
            len: 4
        }
    );
    assert_eq!(cpu.io_data()[..4], 0x1234_5678u32.to_le_bytes());
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(cpu.state.gpr[3], 0x60);
}

/// A #PF handler that loads CR2 into RAX, the error code into RBX and the
/// faulting RIP into RCX, then halts.
fn pf_setup() -> Guest {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let handler = 0x4000;
    let h = assemble(
        |a| {
            a.mov(rax, cr2)?;
            a.mov(rbx, qword_ptr(rsp))?;
            a.mov(rcx, qword_ptr(rsp + 8))?;
            a.hlt()?;
            Ok(())
        },
        handler,
    );
    g.write(handler, &h);
    set_gate(&g, 14, handler);
    g
}

fn run_to_pf(g: &Guest, code: &[u8]) -> (u64, u64, u64) {
    g.write(CODE, code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = 0x1f_0000;
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(
        cpu.state.gpr[4],
        IST_TOP - 48,
        "frame of 6 qwords on the IST stack"
    );
    (cpu.state.gpr[0], cpu.state.gpr[1], cpu.state.gpr[3])
}

#[test]
fn page_fault_on_unmapped_page_reaches_guest_handler() {
    let g = pf_setup();
    let code = assemble(
        |a| {
            a.mov(rdx, 0x5000_0123u64)?;
            a.mov(rsi, qword_ptr(rdx))?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    let (fault_addr, rip, err) = run_to_pf(&g, &code);
    assert_eq!(fault_addr, 0x5000_0123);
    assert_eq!(err, 0, "read of a not-present page");
    assert_eq!(rip, CODE + 10, "RIP of the faulting MOV");
}

#[test]
fn page_fault_error_codes_for_write_and_fetch() {
    let mut g = pf_setup();
    // A read-only page and a no-execute page.
    g.map_4k(0x60_0000, 0x30_0000, 0x1);
    g.map_4k(0x60_1000, 0x30_1000, 0x3 | (1 << 63));
    let write = assemble(
        |a| {
            a.mov(rdx, 0x60_0010u64)?;
            a.mov(qword_ptr(rdx), rdx)?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    let (fault_addr, _, err) = run_to_pf(&g, &write);
    assert_eq!((fault_addr, err), (0x60_0010, 0b11), "present + write");

    let fetch = assemble(
        |a| {
            a.mov(rdx, 0x60_1000u64)?;
            a.jmp(rdx)?;
            Ok(())
        },
        CODE,
    );
    let (fault_addr, rip, err) = run_to_pf(&g, &fetch);
    assert_eq!(
        (fault_addr, rip, err),
        (0x60_1000, 0x60_1000, 0b1_0001),
        "present + instruction fetch"
    );

    // A read of the read-only page and a write to the NX page succeed and
    // set the accessed and dirty bits.
    let ok = assemble(
        |a| {
            a.mov(rdx, 0x60_0010u64)?;
            a.mov(rax, qword_ptr(rdx))?;
            a.mov(rdx, 0x60_1008u64)?;
            a.mov(qword_ptr(rdx), rdx)?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &ok);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(cpu.state.rip, CODE + ok.len() as u64);
    let pte = |va: u64| {
        let mut t = PML4;
        for level in [39, 30, 21] {
            t = g.read_u64(t + ((va >> level) & 0x1ff) * 8) & 0x000f_ffff_ffff_f000;
        }
        g.read_u64(t + ((va >> 12) & 0x1ff) * 8)
    };
    assert_eq!(pte(0x60_0000) & 0x60, 0x20, "accessed, not dirty");
    assert_eq!(pte(0x60_1000) & 0x60, 0x60, "accessed and dirty");
    assert_eq!(g.read_u64(0x30_1008), 0x60_1008);
}

#[test]
fn triple_fault_is_a_shutdown_exit() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    g.write(CODE, &[0xcc]); // int3
    let mut cpu = g.cpu();
    cpu.state.idt.limit = 0;
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(10), Exit::Shutdown);
}

#[test]
fn unimplemented_instruction_raises_ud_in_the_guest() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    // fninit (x87 is not emulated yet), then a VEX instruction.
    // Also: UD2, and LOCK on a register destination (#UD architecturally).
    let cases: [&[u8]; 4] = [
        &[0xdb, 0xe3],
        &[0xc5, 0xf9, 0x6f, 0xc1],
        &[0x0f, 0x0b],
        &[0xf0, 0x01, 0xd8],
    ];
    for bytes in cases {
        g.write(CODE, bytes);
        let mut cpu = g.cpu();
        cpu.state.rip = CODE;
        assert_eq!(cpu.run(10), Exit::Halt);
        assert_eq!(
            cpu.state.rip,
            HANDLERS + 6 + 1,
            "#UD handler for {bytes:02x?}"
        );
        // The frame's RIP is the instruction that faulted.
        assert_eq!(g.read_u64(IST_TOP - 40), CODE);
    }
}

#[test]
fn divide_error_and_general_protection_frames() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.xor(ecx, ecx)?;
            a.div(ecx)?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(10), Exit::Halt);
    assert_eq!(cpu.state.rip, HANDLERS + 1);
    assert_eq!(
        g.read_u64(IST_TOP - 40),
        CODE + 2,
        "#DE pushes the DIV's RIP, no error code"
    );

    // A non-canonical access raises #GP(0).
    let code = assemble(
        |a| {
            a.mov(rax, 0x8000_0000_0000_0000u64)?;
            a.mov(rax, qword_ptr(rax))?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(10), Exit::Halt);
    assert_eq!(cpu.state.rip, HANDLERS + 13 + 1);
    assert_eq!(g.read_u64(IST_TOP - 48), 0, "error code 0");
    assert_eq!(g.read_u64(IST_TOP - 40), CODE + 10);
}

#[test]
fn syscall_sysret_and_iretq_round_trip() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    // GDT: 0x10 kernel code, 0x18 kernel data, 0x20/0x28 TSS, 0x30 user
    // data, 0x38 user code (STAR layout as Linux uses: user base 0x28).
    g.write(common::GDT + 0x30, &0x00cf_f300_0000_ffffu64.to_le_bytes());
    g.write(common::GDT + 0x38, &0x00af_fb00_0000_ffffu64.to_le_bytes());
    let kernel = 0x5000;
    let k = assemble(
        |a| {
            // Kernel entry: count the syscall and return.
            a.inc(r12)?;
            a.sysretq()?;
            Ok(())
        },
        kernel,
    );
    g.write(kernel, &k);
    // User page: user-accessible mapping of the code.
    g.map_4k(0x40_0000, 0x30_0000, 0x7);
    let user = assemble(
        |a| {
            a.syscall()?;
            a.syscall()?;
            a.int3()?;
            Ok(())
        },
        0x40_0000,
    );
    g.write(0x30_0000, &user);
    // Kernel: IRETQ into user mode.
    let start = assemble(
        |a| {
            a.push(0x33)?; // SS = user data | 3
            a.push(0x7f_f000)?; // user RSP
            a.push(0x202)?; // RFLAGS
            a.push(0x3b)?; // CS = user code | 3
            a.push(0x40_0000)?; // RIP
            a.iretq()?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &start);
    let mut cpu = g.cpu();
    cpu.state.gdt.limit = 0x3f;
    cpu.state.msr.star = (0x28u64 << 48) | (0x10u64 << 32);
    cpu.state.msr.lstar = kernel;
    cpu.state.msr.sfmask = 0x200;
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = 0x1f_0000;
    // int3 from CPL 3 needs a DPL-3 gate: the default gates are DPL 0, so
    // it raises #GP(vector 3 * 8 + 2) instead, delivered at CPL 0.
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(cpu.state.gpr[12], 2, "two system calls");
    assert_eq!(cpu.state.rip, HANDLERS + 13 + 1);
    assert_eq!(cpu.state.cpl(), 0);
    assert_eq!(g.read_u64(IST_TOP - 48), 3 * 8 + 2);
    // Frame: user CS and SS with RPL 3.
    assert_eq!(g.read_u64(IST_TOP - 32), 0x3b);
    assert_eq!(g.read_u64(IST_TOP - 8), 0x33);
    assert_eq!(cpu.state.seg(SegReg::Cs).selector, 0x10);
}

#[test]
fn self_modifying_code_is_redecoded() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    // Loop twice over an instruction that the first pass patches from
    // `mov eax, 1` to `mov eax, 2`.
    let code = assemble(
        |a| {
            let mut target = a.create_label();
            a.xor(ebx, ebx)?;
            a.set_label(&mut target)?;
            a.mov(eax, 1u32)?;
            a.add(ebx, eax)?;
            a.lea(rdx, ptr(target))?;
            a.mov(byte_ptr(rdx + 1), 2u32)?;
            a.cmp(ebx, 3)?;
            a.jb(target)?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(
        cpu.state.gpr[3], 3,
        "1 from the original, 2 from the patched instruction"
    );
}

#[test]
fn injected_interrupt_wakes_hlt_when_if_is_set() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.cli()?;
            a.hlt()?;
            a.sti()?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = 0x1f_0000;
    assert_eq!(cpu.run(10), Exit::Halt);
    // IF is clear: the interrupt stays pending and the CPU stays halted.
    assert!(cpu.inject_interrupt(0x20));
    assert_eq!(cpu.run(10), Exit::Halt);
    assert_eq!(cpu.state.rip, CODE + 2);
    // A VMM would only wake it with an NMI/INIT; skip the first HLT here.
    let mut cpu2 = g.cpu();
    cpu2.state.rip = CODE + 2;
    cpu2.state.gpr[4] = 0x1f_0000;
    assert_eq!(cpu2.run(10), Exit::Halt);
    assert!(cpu2.inject_interrupt(0x20));
    assert_eq!(cpu2.run(10), Exit::Halt);
    assert_eq!(
        cpu2.state.rip,
        HANDLERS + 0x20 + 1,
        "vector 0x20 handler ran"
    );
    // The frame returns to the instruction after the HLT.
    assert_eq!(g.read_u64(IST_TOP - 40), CODE + 4);
}

#[test]
fn vcpu_register_round_trip() {
    let g = Guest::new();
    let vcpu = EmuVcpu::new(3, g.cpu());
    let mut regs = vcpu.regs().unwrap();
    regs.rax = 0x1122;
    regs.r15 = 0x3344;
    regs.rip = 0x10_0000;
    vcpu.set_regs(&regs).unwrap();
    assert_eq!(vcpu.regs().unwrap(), regs);
    let mut sregs = vcpu.special_regs().unwrap();
    sregs.cr2 = 0xdead_b000;
    vcpu.set_special_regs(&sregs).unwrap();
    assert_eq!(vcpu.special_regs().unwrap(), sregs);
    assert_eq!(vcpu.id(), 3);
    let msrs = [vireo_hypervisor::MsrEntry {
        index: 0xc000_0082,
        value: 0xffff_ffff_8100_0000,
    }];
    vcpu.set_msrs(&msrs).unwrap();
    assert_eq!(vcpu.msrs(&[0xc000_0082, 0x1234]).unwrap(), msrs);
    // Non-canonical LSTAR is refused.
    let bad = [vireo_hypervisor::MsrEntry {
        index: 0xc000_0082,
        value: 0x8000_0000_0000_0000,
    }];
    assert!(vcpu.set_msrs(&bad).is_err());
}

#[test]
fn cpuid_advertises_only_implemented_features() {
    let mut g = Guest::new();
    let code = assemble(
        |a| {
            a.mov(eax, 1u32)?;
            a.cpuid()?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.identity(0x20_0000);
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    // A VMM passing the host's table gets unimplemented features removed.
    let mut host = vireo_emulator::supported_cpuid();
    for e in host.iter_mut().filter(|e| e.function == 1) {
        e.ecx = u32::MAX;
        e.edx = u32::MAX;
    }
    cpu.set_cpuid(&host);
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(10), Exit::Halt);
    let (f_edx, f_ecx) = (cpu.state.gpr[2] as u32, cpu.state.gpr[1] as u32);
    assert_eq!(f_edx & (1 << 0), 0, "no x87");
    assert_eq!(f_edx & (1 << 25), 0, "no SSE");
    assert_eq!(f_edx & (1 << 9), 0, "no APIC");
    assert_eq!(f_ecx & (1 << 26), 0, "no XSAVE");
    assert_ne!(f_edx & (1 << 4), 0, "TSC");
}
