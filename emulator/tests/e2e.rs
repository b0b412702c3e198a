//! End-to-end tests: small 64-bit programs in guest memory, run on the
//! emulator until they perform I/O, fault or halt.

mod common;

use iced_x86::code_asm::*;
use vireo_emulator::cpu::state::SegReg;
use vireo_emulator::{EmuVcpu, Exit};
use vireo_hypervisor::{Vcpu, VcpuExit};

use common::{assemble, Guest, HANDLERS, IDT, IST_TOP, PML4};

const CODE: u64 = 0x10_0000;

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
    // pxor mm0, mm1 (MMX is not emulated), then a VEX instruction.
    // Also: UD2, and LOCK on a register destination (#UD architecturally).
    let cases: [&[u8]; 4] = [
        &[0x0f, 0xef, 0xc1],
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
    assert_ne!(f_edx & (1 << 0), 0, "x87");
    assert_ne!(f_edx & (1 << 24), 0, "FXSR");
    assert_ne!(f_edx & (1 << 25), 0, "SSE");
    assert_ne!(f_edx & (1 << 26), 0, "SSE2");
    assert_eq!(f_edx & (1 << 23), 0, "no MMX");
    assert_eq!(f_edx & (1 << 9), 0, "no APIC");
    assert_eq!(f_ecx & (1 << 26), 0, "no XSAVE");
    assert_ne!(f_edx & (1 << 4), 0, "TSC");
}

/// IA32_ARCH_CAPABILITIES says "not affected" for the speculation bugs an
/// interpreter cannot have (so Linux skips page-table isolation), and
/// IA32_TSC_ADJUST follows writes to the TSC; both are enumerated in CPUID
/// leaf 7 and #GP once the VMM hides them.
#[test]
fn arch_capabilities_and_tsc_adjust() {
    let mut g = Guest::new();
    let code = assemble(
        |a| {
            a.mov(eax, 7u32)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            a.mov(r8d, ebx)?;
            a.mov(r9d, edx)?;
            a.mov(ecx, 0x10au32)?;
            a.rdmsr()?;
            a.mov(r10d, eax)?;
            // TSC := 1<<40, so TSC_ADJUST moves by about that much.
            a.mov(ecx, 0x10u32)?;
            a.xor(eax, eax)?;
            a.mov(edx, 0x100u32)?;
            a.wrmsr()?;
            a.mov(ecx, 0x3bu32)?;
            a.rdmsr()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.mov(r11, rax)?;
            // TSC_ADJUST := 0 takes the TSC back down by the same amount.
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.mov(r12, rax)?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    g.identity(0x20_0000);
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(100), Exit::Halt);
    let r = |i: usize| cpu.state.gpr[i];
    assert_ne!(r(8) & (1 << 1), 0, "CPUID.7:EBX TSC_ADJUST");
    assert_ne!(r(9) & (1 << 29), 0, "CPUID.7:EDX ARCH_CAPABILITIES");
    assert_eq!(r(10), vireo_emulator::ARCH_CAPABILITIES & 0xffff_ffff);
    assert_ne!(r(10) & 1, 0, "RDCL_NO");
    assert_ne!(r(10) & (1 << 5), 0, "MDS_NO");
    // Without a platform the TSC counts instructions: a handful passed
    // between reading it for the write and now.
    assert!(r(11) > (1 << 40) - 100 && r(11) <= 1 << 40, "{:#x}", r(11));
    assert!(r(12) < 100, "TSC back near 0: {:#x}", r(12));

    // A VMM that hides leaf 7 hides the MSRs too.
    let mut hidden = vireo_emulator::supported_cpuid();
    hidden.retain(|e| e.function != 7);
    for msr in [0x10au32, 0x3b] {
        let code = assemble(
            |a| {
                a.mov(ecx, msr)?;
                a.rdmsr()?;
                a.hlt()?;
                Ok(())
            },
            CODE,
        );
        let (vector, _) = run_fpu(&g, &code, |cpu| cpu.set_cpuid(&hidden));
        assert_eq!(vector, Some(13), "rdmsr {msr:#x} hidden by CPUID must #GP");
    }
}

/// Run `code` at CODE until HLT; returns the vector if it faulted into a
/// handler stub (None for the final `hlt` of the program).
fn run_fpu(
    g: &Guest,
    code: &[u8],
    setup: impl FnOnce(&mut vireo_emulator::Cpu),
) -> (Option<u64>, vireo_emulator::Cpu) {
    g.write(CODE, code);
    let mut cpu = g.cpu();
    setup(&mut cpu);
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = 0x7_0000;
    assert_eq!(cpu.run(10_000), Exit::Halt);
    let rip = cpu.state.rip;
    let v = (HANDLERS + 1..=HANDLERS + 256)
        .contains(&rip)
        .then(|| rip - HANDLERS - 1);
    (v, cpu)
}

#[test]
fn fxsave_fxrstor_round_trip_x87_and_sse_state() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.fninit()?;
            a.fld1()?;
            a.fldz()?;
            a.fldpi()?;
            a.mov(eax, 0x1f80 | (1 << 13))?;
            a.mov(dword_ptr(0x18_0000), eax)?;
            a.ldmxcsr(dword_ptr(0x18_0000))?;
            a.mov(rax, 0x1122_3344_5566_7788u64)?;
            a.movq(xmm3, rax)?;
            a.fxsave64(ptr(0x18_1000))?;
            // Clobber, then restore.
            a.fninit()?;
            a.pxor(xmm3, xmm3)?;
            a.fxrstor64(ptr(0x18_1000))?;
            a.fnstsw(ax)?;
            a.fstp(tword_ptr(0x18_2000))?; // pi
            a.fstp(qword_ptr(0x18_2010))?; // 0
            a.fistp(dword_ptr(0x18_2020))?; // 1
            a.stmxcsr(dword_ptr(0x18_2030))?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    let (fault, cpu) = run_fpu(&g, &code, |_| {});
    assert_eq!(fault, None);
    let img = g.read(0x18_1000, 512);
    assert_eq!(u16::from_le_bytes([img[0], img[1]]), 0x37f, "FCW");
    assert_eq!(u16::from_le_bytes([img[2], img[3]]) >> 11 & 7, 5, "TOP");
    assert_eq!(img[4], 0b1110_0000, "abridged tags");
    assert_eq!(u32::from_le_bytes(img[24..28].try_into().unwrap()), 0x3f80);
    assert_eq!(u32::from_le_bytes(img[28..32].try_into().unwrap()), 0xffff);
    // ST0 = pi, ST1 = 0, ST2 = 1.
    assert_eq!(&img[32 + 8..32 + 10], &[0x00, 0x40]);
    assert_eq!(&img[48..58], &[0; 10]);
    assert_eq!(&img[64 + 8..64 + 10], &[0xff, 0x3f]);
    assert_eq!(
        u64::from_le_bytes(img[160 + 48..160 + 56].try_into().unwrap()),
        0x1122_3344_5566_7788
    );
    assert_eq!(cpu.state.xmm[3], 0x1122_3344_5566_7788);
    assert_eq!(cpu.state.gpr[0] as u16 >> 11 & 7, 5);
    assert_eq!(g.read(0x18_2000 + 8, 2), [0x00, 0x40]);
    assert_eq!(g.read_u64(0x18_2010), 0);
    assert_eq!(g.read(0x18_2020, 4), 1u32.to_le_bytes());
    assert_eq!(g.read(0x18_2030, 4), 0x3f80u32.to_le_bytes());
    assert_eq!(cpu.state.ftw, 0, "all popped");
}

#[test]
fn fnstenv_fldenv_and_fnsave_frstor() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.fninit()?;
            a.fld1()?;
            a.fldz()?;
            a.fnstenv(ptr(0x18_0000))?;
            a.fnsave(ptr(0x18_1000))?;
            a.fnstsw(ax)?;
            a.mov(ebx, eax)?; // after FNSAVE's implicit FNINIT
            a.frstor(ptr(0x18_1000))?;
            a.fnstsw(ax)?;
            a.fstp(st0)?;
            a.fldenv(ptr(0x18_0000))?;
            a.fnstcw(word_ptr(0x18_2000))?;
            a.hlt()?;
            Ok(())
        },
        CODE,
    );
    let (fault, cpu) = run_fpu(&g, &code, |_| {});
    assert_eq!(fault, None);
    let env = g.read(0x18_0000, 28);
    assert_eq!(u16::from_le_bytes([env[0], env[1]]), 0x37f);
    assert_eq!(u16::from_le_bytes([env[4], env[5]]) >> 11 & 7, 6);
    // R7 = 1 (valid), R6 = 0 (zero), the rest empty.
    assert_eq!(u16::from_le_bytes([env[8], env[9]]), 0x1fff);
    let save = g.read(0x18_1000, 108);
    assert_eq!(&save[28..38], &[0; 10], "ST0 = 0");
    assert_eq!(&save[38 + 8..38 + 10], &[0xff, 0x3f], "ST1 = 1");
    assert_eq!(cpu.state.gpr[3] as u16, 0, "FNSAVE reinitialises");
    assert_eq!(cpu.state.gpr[0] as u16 >> 11 & 7, 6, "FRSTOR restores TOP");
    // FNSTENV masked all exceptions after storing; FLDENV restored 0x37f.
    assert_eq!(g.read(0x18_2000, 2), [0x7f, 0x03]);
    assert_eq!(cpu.state.ftw, 0b1100_0000);
}

#[test]
fn fpu_and_sse_faults() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let fld1 = assemble(
        |a| {
            a.fld1()?;
            a.hlt()
        },
        CODE,
    );
    let wait = assemble(
        |a| {
            a.wait()?;
            a.hlt()
        },
        CODE,
    );
    let addps = assemble(
        |a| {
            a.addps(xmm0, xmm1)?;
            a.hlt()
        },
        CODE,
    );
    let fxsave_misaligned = assemble(
        |a| {
            a.fxsave64(ptr(0x18_0008))?;
            a.hlt()
        },
        CODE,
    );
    let movaps_misaligned = assemble(
        |a| {
            a.movaps(xmm0, xmmword_ptr(0x18_0008))?;
            a.hlt()
        },
        CODE,
    );
    let ldmxcsr_reserved = assemble(
        |a| {
            a.mov(dword_ptr(0x18_0000), 0x1_0000)?;
            a.ldmxcsr(dword_ptr(0x18_0000))?;
            a.hlt()
        },
        CODE,
    );
    let divps_unmasked = assemble(
        |a| {
            a.mov(dword_ptr(0x18_0000), 0x1f80 & !(1 << 9))?; // ZM clear
            a.ldmxcsr(dword_ptr(0x18_0000))?;
            a.xorps(xmm1, xmm1)?;
            a.mov(eax, 0x3f80_0000)?;
            a.movd(xmm0, eax)?;
            a.divss(xmm0, xmm1)?;
            a.hlt()
        },
        CODE,
    );
    use vireo_emulator::cpu::state::{cr0, cr4};
    let ts = |c: &mut vireo_emulator::Cpu| c.state.cr0 |= cr0::TS;
    let ts_mp = |c: &mut vireo_emulator::Cpu| c.state.cr0 |= cr0::TS | cr0::MP;
    let em = |c: &mut vireo_emulator::Cpu| c.state.cr0 |= cr0::EM;
    let no_osfxsr = |c: &mut vireo_emulator::Cpu| c.state.cr4 &= !cr4::OSFXSR;
    let no_osxmmexcpt = |c: &mut vireo_emulator::Cpu| c.state.cr4 &= !cr4::OSXMMEXCPT;
    let none = |_: &mut vireo_emulator::Cpu| {};
    type Setup = fn(&mut vireo_emulator::Cpu);
    let cases: [(&str, &[u8], Setup, Option<u64>); 12] = [
        ("fld1 TS", &fld1, ts, Some(7)),
        ("fld1 EM", &fld1, em, Some(7)),
        ("fld1", &fld1, none, None),
        ("fwait TS", &wait, ts, None),
        ("fwait TS+MP", &wait, ts_mp, Some(7)),
        ("addps TS", &addps, ts, Some(7)),
        ("addps EM", &addps, em, Some(6)),
        ("addps !OSFXSR", &addps, no_osfxsr, Some(6)),
        ("fxsave misaligned", &fxsave_misaligned, none, Some(13)),
        ("movaps misaligned", &movaps_misaligned, none, Some(13)),
        ("ldmxcsr reserved", &ldmxcsr_reserved, none, Some(13)),
        ("divss unmasked #Z", &divps_unmasked, none, Some(19)),
    ];
    for (name, code, setup, want) in cases {
        let (got, _) = run_fpu(&g, code, setup);
        assert_eq!(got, want, "{name}");
    }
    let (got, cpu) = run_fpu(&g, &divps_unmasked, no_osxmmexcpt);
    assert_eq!(got, Some(6), "unmasked SIMD exception without OSXMMEXCPT");
    assert_ne!(cpu.state.mxcsr & 4, 0, "ZE recorded");
}

#[test]
fn x87_unmasked_exception_raises_mf_at_next_waiting_instruction() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.fninit()?;
            a.mov(word_ptr(0x18_0000), 0x37b)?; // ZM clear
            a.fldcw(word_ptr(0x18_0000))?;
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?; // 1/0: ZE, ES
            a.fnstsw(ax)?; // no-wait: no fault
            a.wait()?; // #MF
            a.hlt()
        },
        CODE,
    );
    let (got, cpu) = run_fpu(&g, &code, |_| {});
    assert_eq!(got, Some(16));
    let fsw = cpu.state.gpr[0] as u16;
    assert_eq!(fsw & 0x84, 0x84, "ZE and ES set: {fsw:#x}");
}

#[test]
fn rep_bsf_and_rep_bsr_run_as_bsf_and_bsr() {
    // F3 0F BC / F3 0F BD decode as TZCNT/LZCNT; without BMI1/LZCNT in
    // CPUID they are BSF/BSR (Linux's `rep; bsf`).
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = [
        0xf3, 0x0f, 0xbc, 0xc1, // tzcnt eax, ecx
        0xf3, 0x0f, 0xbd, 0xd1, // lzcnt edx, ecx
        0xf4,
    ];
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    cpu.state.gpr[1] = 0x18;
    assert_eq!(cpu.run(10), Exit::Halt);
    assert_eq!(cpu.state.gpr[0], 3);
    assert_eq!(cpu.state.gpr[2], 4);
}

#[test]
fn verr_verw_lar_lsl_check_selectors_without_faulting() {
    // Linux's MDS mitigation runs VERW on every return to user space.
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            a.mov(word_ptr(0x18_0000), 0x18)?;
            a.verw(word_ptr(0x18_0000))?; // writable data: ZF=1
            a.setz(bl)?;
            a.mov(ax, 0x10)?;
            a.verw(ax)?; // code: ZF=0
            a.setz(cl)?;
            a.verr(ax)?; // readable code: ZF=1
            a.setz(dl)?;
            a.mov(ax, 0x400)?;
            a.verw(ax)?; // beyond the GDT limit: ZF=0, no fault
            a.setz(bh)?;
            a.mov(ax, 0x18)?;
            a.lsl(esi, eax)?;
            a.lar(edi, eax)?;
            a.hlt()
        },
        CODE,
    );
    g.write(CODE, &code);
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(100), Exit::Halt);
    assert_eq!(cpu.state.rip, CODE + code.len() as u64);
    let s = &cpu.state.gpr;
    assert_eq!(s[3] & 0xffff, 0x0001, "verw data, verw beyond limit");
    assert_eq!(s[1] & 0xff, 0, "verw code");
    assert_eq!(s[2] & 0xff, 1, "verr code");
    assert_eq!(s[6], 0xffff_ffff, "lsl of a flat 4 GiB segment");
    assert_eq!(s[7], 0x00c0_9300, "lar (bits 16-19 cleared)");
}

#[test]
fn odd_sized_frame_below_a_read_only_page_is_delivered() {
    // A frame without error code is 40 bytes: it must not touch the page
    // above the stack top (Linux's read-only TSS sits right above its
    // entry stack).
    let mut g = Guest::new();
    g.identity(0x20_0000);
    g.map_4k(IST_TOP, IST_TOP, 0x1); // read-only page above the IST stack
    g.write(CODE, &[0x0f, 0x0b]); // ud2
    let mut cpu = g.cpu();
    cpu.state.rip = CODE;
    assert_eq!(cpu.run(10), Exit::Halt);
    assert_eq!(cpu.state.rip, HANDLERS + 6 + 1, "#UD delivered, not #PF");
    assert_eq!(cpu.state.gpr[4], IST_TOP - 40);
}

/// The specialised handlers of the common forms (see `exec/fast.rs`) run
/// without a register snapshot: a fault in any of them must still find
/// the registers, RFLAGS and memory as they were before the instruction.
#[test]
fn faulting_specialised_forms_leave_state_as_before() {
    use vireo_emulator::cpu::state::rflags::{ARITH, CF, FIXED1, ZF};
    const RO: u64 = 0x60_0000; // read-only page
    const GONE: u64 = 0x61_0000; // not mapped
    type Asm = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
    // (what, code, RDX, RSP, expected CR2, expected #PF error code)
    let cases: [(&str, Asm, u64, u64, u64, u64); 12] = [
        (
            "add [ro], reg",
            |a| a.add(qword_ptr(rdx), rbx),
            RO + 8,
            0x1f_0000,
            RO + 8,
            0b11,
        ),
        (
            "sub [ro], imm",
            |a| a.sub(dword_ptr(rdx + 4), 7),
            RO,
            0x1f_0000,
            RO + 4,
            0b11,
        ),
        (
            "xor [ro], reg8",
            |a| a.xor(byte_ptr(rdx), bl),
            RO + 1,
            0x1f_0000,
            RO + 1,
            0b11,
        ),
        (
            "cmp [gone], reg",
            |a| a.cmp(qword_ptr(rdx), rbx),
            GONE,
            0x1f_0000,
            GONE,
            0,
        ),
        (
            "movzx r32, [gone]",
            |a| a.movzx(eax, byte_ptr(rdx)),
            GONE + 3,
            0x1f_0000,
            GONE + 3,
            0,
        ),
        (
            "movsxd r64, [gone]",
            |a| a.movsxd(rax, dword_ptr(rdx)),
            GONE,
            0x1f_0000,
            GONE,
            0,
        ),
        (
            "cmovz r64, [gone]",
            |a| a.cmovz(rax, qword_ptr(rdx)),
            GONE,
            0x1f_0000,
            GONE,
            0,
        ),
        (
            "push r64 to ro",
            |a| a.push(rbx),
            0,
            RO + 0x800,
            RO + 0x7f8,
            0b11,
        ),
        (
            "pop r64 from gone",
            |a| a.pop(rbx),
            0,
            GONE + 0x10,
            GONE + 0x10,
            0,
        ),
        (
            "call to ro stack",
            |a| a.call(CODE + 0x100),
            0,
            RO + 0x100,
            RO + 0xf8,
            0b11,
        ),
        ("ret from gone", |a| a.ret(), 0, GONE + 0x20, GONE + 0x20, 0),
        (
            "ret imm16 from gone",
            |a| a.ret_1(16),
            0,
            GONE + 0x28,
            GONE + 0x28,
            0,
        ),
    ];
    let mut g = Guest::new();
    g.identity(0x20_0000);
    g.map_4k(RO, 0x30_0000, 0x1);
    for (what, asm, rdx_v, rsp_v, cr2_v, err) in cases {
        let code = assemble(
            |a| {
                asm(a)?;
                a.hlt()
            },
            CODE,
        );
        g.write(CODE, &code);
        g.write(0x30_0000, &[0x5a; 4096]);
        let mut cpu = g.cpu();
        cpu.state.rip = CODE;
        let mut gpr = [0u64; 16];
        for (n, r) in gpr.iter_mut().enumerate() {
            *r = 0x1111_1111_1111_1111u64.wrapping_mul(n as u64 + 1);
        }
        gpr[2] = rdx_v;
        gpr[4] = rsp_v;
        cpu.state.gpr = gpr;
        let flags = FIXED1 | CF | ZF;
        cpu.state.rflags = flags;
        assert_eq!(cpu.run(10), Exit::Halt, "{what}");
        assert_eq!(cpu.state.rip, HANDLERS + 14 + 1, "{what}: #PF delivered");
        assert_eq!(cpu.state.cr2, cr2_v, "{what}: CR2");
        let frame = |k: u64| g.read_u64(IST_TOP - 48 + 8 * k);
        assert_eq!(frame(0), err, "{what}: error code");
        assert_eq!(frame(1), CODE, "{what}: RIP of the faulting instruction");
        assert_eq!(frame(3) & ARITH, flags & ARITH, "{what}: RFLAGS");
        assert_eq!(frame(4), rsp_v, "{what}: RSP");
        for n in (0..16).filter(|&n| n != 4) {
            assert_eq!(cpu.state.gpr[n], gpr[n], "{what}: register {n}");
        }
        assert_eq!(g.read(0x30_0000, 4096), vec![0x5a; 4096], "{what}: memory");
    }
}
