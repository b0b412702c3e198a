//! Guest code run through the translator of hot blocks (x86-64 hosts):
//! loops whose blocks are chained to each other on their page, results as
//! the interpreter's, and a device rewriting a chained function.

mod common;

use iced_x86::code_asm::*;
use vireo_emulator::{Cpu, Exit, GuestMemory};

use common::{assemble, Guest};

const CODE: u64 = 0x10_0000;
/// A function on the same page as the loop that calls it.
const FUNC: u64 = 0x10_0800;
const DATA: u64 = 0x14_0000;
const STACK: u64 = 0x18_0000;

fn cpu(g: &Guest, hot: Option<u32>) -> Cpu {
    let mut cpu = g.cpu();
    cpu.set_jit(hot);
    cpu.state.rip = CODE;
    cpu.state.gpr[4] = STACK;
    cpu
}

/// Sums, a memory array walk and calls, in loops; ends with `out 0x80`.
fn busy_guest() -> Guest {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            let mut outer = a.create_label();
            let mut inner = a.create_label();
            let mut fill = a.create_label();
            // Fill 512 qwords at DATA with i * 3.
            a.xor(ecx, ecx)?;
            a.set_label(&mut fill)?;
            a.lea(rax, qword_ptr(rcx + rcx * 2))?;
            a.mov(qword_ptr(rcx * 8 + DATA as i32), rax)?;
            a.inc(ecx)?;
            a.cmp(ecx, 512)?;
            a.jb(fill)?;
            // 200 rounds: sum the array (with a call per element) into r12.
            a.xor(r12d, r12d)?;
            a.mov(r13d, 200)?;
            a.set_label(&mut outer)?;
            a.xor(ecx, ecx)?;
            a.set_label(&mut inner)?;
            a.mov(rdi, qword_ptr(rcx * 8 + DATA as i32))?;
            a.call(FUNC)?;
            a.add(r12, rax)?;
            a.adc(r14, 0)?;
            a.inc(ecx)?;
            a.cmp(ecx, 512)?;
            a.jne(inner)?;
            a.dec(r13d)?;
            a.jnz(outer)?;
            a.mov(rax, r12)?;
            a.out(0x80, eax)?;
            a.hlt()
        },
        CODE,
    );
    g.write(CODE, &code);
    g.write(FUNC, &func(1));
    g
}

/// `lea rax, [rdi + k]; push rax; pop rax; ret`.
fn func(k: i32) -> Vec<u8> {
    assemble(
        |a| {
            a.lea(rax, qword_ptr(rdi + k))?;
            a.push(rax)?;
            a.pop(rax)?;
            a.ret()
        },
        FUNC,
    )
}

fn run_to_out(cpu: &mut Cpu) -> (u32, [u64; 16]) {
    for _ in 0..100_000 {
        match cpu.run(256) {
            Exit::BudgetExhausted => {}
            Exit::IoOut { port: 0x80, .. } => {
                return (
                    u32::from_le_bytes(cpu.io_data()[..4].try_into().unwrap()),
                    cpu.state.gpr,
                )
            }
            other => panic!("unexpected exit {other:?} at {:#x}", cpu.state.rip),
        }
    }
    panic!("the guest never reached its out");
}

#[test]
fn translated_loops_compute_what_the_interpreter_does() {
    let g = busy_guest();
    let mut interpreted = cpu(&g, None);
    let (want, want_regs) = run_to_out(&mut interpreted);
    let expected: u64 = 200 * (0..512u64).map(|i| i * 3 + 1).sum::<u64>();
    assert_eq!(u64::from(want), expected & 0xffff_ffff);
    assert_eq!(interpreted.translated_instructions(), 0);

    let g = busy_guest();
    let mut translated = cpu(&g, Some(0));
    let (got, regs) = run_to_out(&mut translated);
    assert_eq!(got, want);
    assert_eq!(regs, want_regs);
    // Everything but the OUT, HLT and the very first runs was translated.
    #[cfg(target_arch = "x86_64")]
    assert!(
        translated.translated_instructions() > 500_000,
        "only {} instructions ran translated",
        translated.translated_instructions()
    );
}

/// A loop calling a function on its page (the call and the return chained
/// once translated) sees the function rewritten by a device.
#[test]
fn a_chained_function_rewritten_by_a_device_is_seen() {
    let mut g = Guest::new();
    g.identity(0x20_0000);
    let code = assemble(
        |a| {
            let mut top = a.create_label();
            let mut inner = a.create_label();
            a.set_label(&mut top)?;
            a.xor(edi, edi)?;
            a.mov(ecx, 50)?;
            a.set_label(&mut inner)?;
            a.call(FUNC)?;
            a.mov(rdi, rax)?;
            a.dec(ecx)?;
            a.jnz(inner)?;
            a.out(0x80, eax)?;
            a.jmp(top)
        },
        CODE,
    );
    g.write(CODE, &code);
    g.write(FUNC, &func(1));
    let mut cpu = cpu(&g, Some(0));
    for _ in 0..3 {
        assert_eq!(run_to_out(&mut cpu).0, 50);
    }
    let new = func(2);
    let p = g.mem.host_ptr(FUNC, new.len()).unwrap();
    // SAFETY: `host_ptr` vouches for `new.len()` bytes of guest RAM at `p`,
    // which lives as long as `g.mem`.
    unsafe { std::ptr::copy_nonoverlapping(new.as_ptr(), p.as_ptr(), new.len()) };
    assert_eq!(run_to_out(&mut cpu).0, 100, "stale translated code ran");
    assert_eq!(run_to_out(&mut cpu).0, 100);
}
