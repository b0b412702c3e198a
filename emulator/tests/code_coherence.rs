//! Coherence of the decoded-code cache with writes the executing vCPU does
//! not make: a device (or the VMM) writing guest RAM through its own
//! mapping, and another vCPU writing code this one has decoded.

mod common;

use std::time::Duration;

use iced_x86::code_asm::*;
use vireo_emulator::{Cpu, Exit, GuestMemory};

use common::{assemble, Guest};

/// The loop: `call FUNC; out 0x80, eax; jmp loop`.
const LOOP: u64 = 0x10_0000;
/// The function the loop calls, on its own page: `mov eax, imm; ret`.
const FUNC: u64 = 0x11_0000;
/// Code another vCPU runs.
const WRITER: u64 = 0x12_0000;
const STACK: u64 = 0x18_0000;

/// `mov eax, value; ret`.
fn func(value: u32) -> Vec<u8> {
    assemble(
        |a| {
            a.mov(eax, value)?;
            a.ret()
        },
        FUNC,
    )
}

/// A guest with the loop and `func(0x11)` in memory.
fn guest() -> Guest {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.call(FUNC)?;
            a.out(0x80, eax)?;
            a.jmp(top)
        },
        LOOP,
    );
    g.write(LOOP, &code);
    g.write(FUNC, &func(0x11));
    g
}

fn looping_cpu(g: &Guest) -> Cpu {
    let mut cpu = g.cpu();
    cpu.state.rip = LOOP;
    cpu.state.gpr[4] = STACK;
    cpu
}

/// Run until the loop's `out`, and return the value written.
fn next_out(cpu: &mut Cpu) -> u32 {
    let exit = cpu.run(1000);
    assert_eq!(
        exit,
        Exit::IoOut {
            port: 0x80,
            size: 4
        }
    );
    u32::from_le_bytes(cpu.io_data()[..4].try_into().unwrap())
}

/// Write `data` at guest physical `gpa` the way a device thread does:
/// straight through the host mapping, not through the emulator.
fn device_write(g: &Guest, gpa: u64, data: &[u8]) {
    let p = g.mem.host_ptr(gpa, data.len()).unwrap();
    // SAFETY: `host_ptr` vouches for `data.len()` bytes of guest RAM at
    // `p`, which lives as long as `g.mem`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
}

#[test]
fn code_rewritten_by_a_device_is_redecoded() {
    let g = guest();
    let mut cpu = looping_cpu(&g);
    // Several rounds so the blocks are cached (and in the first level).
    for _ in 0..3 {
        assert_eq!(next_out(&mut cpu), 0x11);
    }
    // Same length, only the immediate differs.
    device_write(&g, FUNC, &func(0x22));
    assert_eq!(next_out(&mut cpu), 0x22, "stale decoded code ran");
    assert_eq!(next_out(&mut cpu), 0x22);
    // Different instructions: `xor eax, eax; inc eax; ret` with the rest
    // of the old bytes left behind it.
    let other = assemble(
        |a| {
            a.xor(eax, eax)?;
            a.inc(eax)?;
            a.ret()
        },
        FUNC,
    );
    device_write(&g, FUNC, &other);
    assert_eq!(next_out(&mut cpu), 1, "stale decoded code ran");
    // Back to the first bytes: a block decoded before must not come back.
    device_write(&g, FUNC, &func(0x11));
    assert_eq!(next_out(&mut cpu), 0x11, "stale decoded code ran");
}

#[test]
fn one_byte_change_in_the_middle_of_a_long_block_is_seen() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    // A long block of `add eax, 1` with the one to patch in the middle.
    let code = assemble(
        |a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.xor(eax, eax)?;
            for _ in 0..20 {
                a.add(eax, 1)?;
            }
            a.out(0x80, eax)?;
            a.jmp(top)
        },
        LOOP,
    );
    g.write(LOOP, &code);
    let mut cpu = looping_cpu(&g);
    assert_eq!(next_out(&mut cpu), 20);
    assert_eq!(next_out(&mut cpu), 20);
    // The immediate of the 11th `add eax, 1` becomes 5.
    let one = assemble(|a| a.add(eax, 1), 0);
    let imm = one.iter().rposition(|&b| b == 1).unwrap() as u64;
    let at = LOOP + 2 + 10 * one.len() as u64 + imm;
    assert_eq!(g.read(at, 1), [1]);
    device_write(&g, at, &[5]);
    assert_eq!(next_out(&mut cpu), 24, "stale decoded code ran");
}

#[test]
fn code_rewritten_by_another_vcpu_is_redecoded() {
    let g = guest();
    let mut reader = looping_cpu(&g);
    for _ in 0..3 {
        assert_eq!(next_out(&mut reader), 0x11);
    }
    // A second vCPU on the same memory patches the immediate of FUNC's
    // `mov eax, 0x11` with an ordinary store.
    let writer_code = assemble(
        |a| {
            a.mov(rdx, FUNC)?;
            a.mov(byte_ptr(rdx + 1), 0x33u32)?;
            a.out(0x81, al)
        },
        WRITER,
    );
    g.write(WRITER, &writer_code);
    let mut writer = g.cpu();
    writer.state.rip = WRITER;
    writer.state.gpr[4] = STACK - 0x1000;
    assert_eq!(
        writer.run(1000),
        Exit::IoOut {
            port: 0x81,
            size: 1
        }
    );
    assert_eq!(g.read(FUNC + 1, 1), [0x33]);
    assert_eq!(next_out(&mut reader), 0x33, "stale decoded code ran");
}

#[test]
fn vcpu_that_also_ran_the_code_writes_it_and_both_see_it() {
    // Both vCPUs have FUNC decoded; one rewrites it.
    let g = guest();
    let mut a = looping_cpu(&g);
    let mut b = looping_cpu(&g);
    b.state.gpr[4] = STACK - 0x1000;
    assert_eq!(next_out(&mut a), 0x11);
    assert_eq!(next_out(&mut b), 0x11);
    let writer_code = assemble(
        |x| {
            x.mov(rdx, FUNC)?;
            x.mov(byte_ptr(rdx + 1), 0x44u32)?;
            x.jmp(LOOP)
        },
        WRITER,
    );
    g.write(WRITER, &writer_code);
    b.state.rip = WRITER;
    assert_eq!(next_out(&mut b), 0x44);
    assert_eq!(next_out(&mut a), 0x44, "stale decoded code ran");
}

#[test]
fn device_write_during_a_long_run_is_seen_by_a_polling_loop() {
    // The guest calls FUNC until it returns something else, all within
    // one `run`: no exit, no interrupt, no serializing instruction.
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.call(FUNC)?;
            a.cmp(eax, 0x11)?;
            a.je(top)?;
            a.out(0x80, eax)?;
            a.hlt()
        },
        LOOP,
    );
    g.write(LOOP, &code);
    g.write(FUNC, &func(0x11));
    let mut cpu = looping_cpu(&g);
    // Decode and cache the blocks first.
    assert_eq!(cpu.run(1000), Exit::BudgetExhausted);
    let mem = g.mem.clone();
    let device = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        let new = func(0x55);
        let p = mem.host_ptr(FUNC, new.len()).unwrap();
        // SAFETY: as in `device_write`.
        unsafe { std::ptr::copy_nonoverlapping(new.as_ptr(), p.as_ptr(), new.len()) };
    });
    // Enough instructions for several seconds: the loop must end long
    // before, once the new code is seen.
    let exit = cpu.run(1 << 34);
    device.join().unwrap();
    assert_eq!(
        exit,
        Exit::IoOut {
            port: 0x80,
            size: 4
        }
    );
    assert_eq!(
        u32::from_le_bytes(cpu.io_data()[..4].try_into().unwrap()),
        0x55
    );
}

/// Chained blocks (see `decode.rs`) follow a link to the next block only
/// while the TLB has not been flushed: after the guest remaps the page of
/// a call target and invalidates it (INVLPG, or a CR3 reload), the same
/// call site must run the new page's code, with no exit in between that
/// would start a new code epoch.
#[test]
fn chained_call_follows_a_remapped_target() {
    const FUNC_VA: u64 = 0x40_0000;
    const P1: u64 = 0x11_0000;
    const P2: u64 = 0x13_0000;
    const SUM: u64 = 0x17_0000;
    for use_cr3 in [false, true] {
        let mut g = Guest::new();
        g.identity(0x20_0000);
        g.map_4k(FUNC_VA, P1, 0x3);
        let mut t = common::PML4;
        for level in [39, 30, 21] {
            t = g.read_u64(t + ((FUNC_VA >> level) & 0x1ff) * 8) & 0x000f_ffff_ffff_f000;
        }
        let pte = t + ((FUNC_VA >> 12) & 0x1ff) * 8;
        let fva = |v: u32| {
            assemble(
                |a| {
                    a.mov(eax, v)?;
                    a.ret()
                },
                FUNC_VA,
            )
        };
        g.write(P1, &fva(0x11));
        g.write(P2, &fva(0x2200));
        let code = assemble(
            |a| {
                let mut top = a.create_label();
                let mut skip = a.create_label();
                a.mov(ecx, 6)?;
                a.set_label(&mut top)?;
                a.call(FUNC_VA)?;
                a.cmp(ecx, 4)?;
                a.jne(skip)?;
                a.mov(qword_ptr(rdx), rbx)?;
                if use_cr3 {
                    a.mov(r8, cr3)?;
                    a.mov(cr3, r8)?;
                } else {
                    a.invlpg(byte_ptr(FUNC_VA))?;
                }
                a.set_label(&mut skip)?;
                a.add(dword_ptr(rdi), eax)?;
                a.dec(ecx)?;
                a.jnz(top)?;
                a.hlt()
            },
            LOOP,
        );
        g.write(LOOP, &code);
        g.write(SUM, &[0; 4]);
        let mut cpu = g.cpu();
        cpu.state.rip = LOOP;
        cpu.state.gpr[4] = STACK;
        cpu.state.gpr[2] = pte;
        cpu.state.gpr[3] = P2 | 0x3;
        cpu.state.gpr[7] = SUM;
        assert_eq!(cpu.run(1000), Exit::Halt);
        let sum = u32::from_le_bytes(g.read(SUM, 4).try_into().unwrap());
        assert_eq!(sum, 3 * 0x11 + 3 * 0x2200, "CR3 reload: {use_cr3}");
    }
}
