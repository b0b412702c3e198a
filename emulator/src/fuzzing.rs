//! The bodies of the fuzz targets in `emulator/fuzz/` (cargo-fuzz,
//! nightly): fuzzed bytes run as guest code in a small sandboxed guest
//! (64-bit long mode with paging, or real mode) for at most 1024
//! instructions, by the interpreter alone ([`emulate`]) and by the
//! interpreter against the translator of hot blocks ([`jit_differential`],
//! x86-64 hosts), whose architectural state, exits and memory must agree.
//! Plain functions, so stable unit tests also run them over seeded
//! pseudo-random and mutated valid inputs. Guest code must never panic
//! the host.
#![doc(hidden)]

use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use vireo_hypervisor::{Segment, TableRegister};

use crate::cpu::state::{cr0, cr4, efer, rflags, SegReg};
use crate::memory::GuestMemory;
use crate::{Cpu, Exit, PhysMemory};

const GDT: u64 = 0x500;
const IDT: u64 = 0x1000;
const TSS: u64 = 0x2000;
/// `hlt` stubs: the handler of vector v is at HANDLERS + v.
const HANDLERS: u64 = 0x3000;
const IST_TOP: u64 = 0x8000;
const PML4: u64 = 0x9000;
/// Page tables for the identity map: 0xA000 (PDPT), 0xB000 (PD), 0xC000
/// (PT of the first 2 MiB).
const RAM: u64 = 0x20_0000;
pub const CODE: u64 = 0x10_0000;
const STACK: u64 = 0x18_0000;
const CODE64: u64 = 0x00af_9b00_0000_ffff;
const DATA64: u64 = 0x00cf_9300_0000_ffff;
/// Instructions one input may run, in slices of [`SLICE`].
const MAX_INSTRUCTIONS: u64 = 1024;
const SLICE: u64 = 256;
const MAX_CODE: usize = 4096;

/// A guest: RAM with GDT, IDT (every vector a `hlt`), TSS and an identity
/// map of its 2 MiB; `code` at [`CODE`].
fn guest(code: &[u8]) -> Option<Arc<PhysMemory>> {
    let mut m = PhysMemory::new();
    m.add_owned(0, RAM).ok()?;
    // The first 52 KiB (tables) built here and written at once.
    let mut low = vec![0u8; 0xd000];
    let mut put = |at: u64, v: u64| {
        let at = at as usize;
        low[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(GDT + 0x10, CODE64);
    put(GDT + 0x18, DATA64);
    put(TSS + 0x24, IST_TOP);
    for v in 0..256u64 {
        let off = HANDLERS + v;
        let lo = (off & 0xffff)
            | (0x10 << 16)
            | (1 << 32)
            | (0x8e << 40)
            | (((off >> 16) & 0xffff) << 48);
        put(IDT + v * 16, lo);
        put(IDT + v * 16 + 8, off >> 32);
    }
    put(PML4, 0xa000 | 7);
    put(0xa000, 0xb000 | 7);
    put(0xb000, 0xc000 | 7);
    for p in 0..512u64 {
        put(0xc000 + p * 8, (p << 12) | 3);
    }
    low[HANDLERS as usize..HANDLERS as usize + 256].fill(0xf4);
    let ok = m.write(0, &low) && m.write(CODE, &code[..code.len().min(MAX_CODE)]);
    ok.then_some(Arc::new(m))
}

/// A CPU in 64-bit mode at CPL 0 (or, with `real`, in real mode at
/// 0x1000:0 with [`CODE`] reachable), registers from `regs`.
fn cpu(mem: Arc<PhysMemory>, real: bool, regs: &[u64; 16]) -> Cpu {
    let mut cpu = Cpu::new(mem);
    if real {
        // The reset state is real mode; the code (copied to 0xF0000) runs
        // from 0xF000:0.
        cpu.state.gpr = *regs;
        cpu.state.gpr[4] &= 0xfff0;
        let cs = &mut cpu.state.seg[SegReg::Cs as usize];
        cs.base = 0xf_0000;
        cs.selector = 0xf000;
        cpu.state.rip = 0;
        cpu.flush_tlb();
        return cpu;
    }
    long_mode_cpl0(&mut cpu.state);
    let s = &mut cpu.state;
    s.gpr = *regs;
    s.gpr[4] = STACK;
    s.rip = CODE;
    cpu.flush_tlb();
    cpu
}

/// What the input says: mode, registers, code.
struct Setup<'a> {
    real: bool,
    regs: [u64; 16],
    code: &'a [u8],
}

fn setup(data: &[u8]) -> Setup<'_> {
    let (&mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let (regs_bytes, code) = rest.split_at(rest.len().min(16));
    let mut regs = [0u64; 16];
    // One byte per register: small values, addresses in RAM (the code,
    // the stack, data) or beyond it (MMIO exits).
    for (i, r) in regs.iter_mut().enumerate() {
        let b = u64::from(regs_bytes.get(i).copied().unwrap_or(0));
        *r = match b >> 6 {
            0 => b & 0x3f,
            1 => CODE + (b & 0x3f) * 64,
            2 => 0x14_0000 + (b & 0x3f) * 0x100,
            _ => 0xfee0_0000 + (b & 0x3f) * 0x10,
        };
    }
    Setup {
        real: mode & 1 != 0,
        regs,
        code,
    }
}

/// Run `cpu` for up to `max` instructions, answering reads from devices
/// with a fixed pattern; the exits seen, in order.
fn run(cpu: &mut Cpu, max: u64) -> Vec<String> {
    let mut exits = Vec::new();
    let mut left = max;
    while left > 0 {
        let budget = left.min(SLICE);
        left -= budget;
        let exit = cpu.run(budget);
        let stop = matches!(exit, Exit::Halt | Exit::Shutdown | Exit::InternalError(_));
        if let Exit::IoIn { .. } | Exit::MmioRead { .. } = exit {
            let n = exits.len() as u8;
            for (i, b) in cpu.io_data_mut().iter_mut().enumerate() {
                *b = n.wrapping_mul(31).wrapping_add(i as u8);
            }
        }
        exits.push(format!("{exit:?}"));
        if stop {
            break;
        }
    }
    exits
}

/// Decode and execute the input as guest code (the interpreter alone).
/// Input: a mode byte (bit 0: real mode), 16 register bytes, the code.
/// Returns the exits.
pub fn emulate(data: &[u8]) -> Vec<String> {
    emulate_up_to(data, MAX_INSTRUCTIONS)
}

/// [`emulate`] for at most `max` instructions (the debug-build tests run
/// fewer per input, and more inputs).
pub fn emulate_up_to(data: &[u8], max: u64) -> Vec<String> {
    let s = setup(data);
    let Some(mem) = guest(s.code) else {
        return Vec::new();
    };
    if s.real {
        // Real-mode code runs at 0xF0000 (CS=0xF000).
        let _ = mem.write(0xf_0000, &s.code[..s.code.len().min(MAX_CODE)]);
    }
    let mut c = cpu(mem, s.real, &s.regs);
    c.set_jit(None);
    run(&mut c, max)
}

/// The instructions the interpreter runs from the input's start, one at a
/// time: true if one of them leaves flags undefined or reads something
/// that differs between two runs (the time stamp counter), which explains
/// a difference between the interpreter and the translator.
fn explained(data: &[u8], max: u64) -> bool {
    let s = setup(data);
    let Some(mem) = guest(s.code) else {
        return true;
    };
    let mut c = cpu(mem.clone(), false, &s.regs);
    c.set_jit(None);
    for _ in 0..max {
        let mut bytes = [0u8; 15];
        let rip = c.state.rip;
        if mem.read(rip, &mut bytes) {
            let mut d = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE);
            let i = d.decode();
            if i.rflags_undefined() != 0
                || matches!(
                    i.mnemonic(),
                    Mnemonic::Rdtsc
                        | Mnemonic::Rdtscp
                        | Mnemonic::Rdrand
                        | Mnemonic::Rdseed
                        | Mnemonic::Rdpmc
                )
            {
                return true;
            }
        }
        match c.run(1) {
            Exit::Halt | Exit::Shutdown | Exit::InternalError(_) => return false,
            Exit::IoIn { .. } | Exit::MmioRead { .. } => c.io_data_mut().fill(0),
            _ => {}
        }
    }
    false
}

/// The input run by the interpreter alone and by the interpreter with
/// every block translated at once (64-bit mode): the exits, every
/// register and guest RAM must agree, unless the code ran an instruction
/// whose result the architecture leaves open (undefined flags, the TSC).
/// Returns whether the two agreed.
pub fn jit_differential(data: &[u8]) -> bool {
    jit_differential_up_to(data, MAX_INSTRUCTIONS)
}

/// [`jit_differential`] for at most `max` instructions.
pub fn jit_differential_up_to(data: &[u8], max: u64) -> bool {
    let s = setup(data);
    let (Some(mem_a), Some(mem_b)) = (guest(s.code), guest(s.code)) else {
        return true;
    };
    let mut a = cpu(mem_a.clone(), false, &s.regs);
    a.set_jit(None);
    let mut b = cpu(mem_b.clone(), false, &s.regs);
    b.set_jit(Some(0));
    let exits_a = run(&mut a, max);
    let exits_b = run(&mut b, max);
    let mut ram_a = vec![0u8; RAM as usize];
    let mut ram_b = vec![0u8; RAM as usize];
    let same_ram = mem_a.read(0, &mut ram_a) && mem_b.read(0, &mut ram_b) && ram_a == ram_b;
    let mut sa = a.state.clone();
    let mut sb = b.state.clone();
    // The TSC advances with host time between runs.
    sa.tsc = 0;
    sb.tsc = 0;
    if exits_a == exits_b && sa == sb && same_ram {
        return true;
    }
    if explained(data, max) {
        return false;
    }
    let first = ram_a.iter().zip(&ram_b).position(|(x, y)| x != y);
    panic!(
        "interpreter and translator disagree\nexits: {exits_a:?}\n   vs: {exits_b:?}\n\
         interpreter: {sa:x?}\n translator: {sb:x?}\nfirst RAM difference at {first:x?}"
    );
}

/// With `VIREO_FUZZ_SEEDS=DIR` set, the tests write their valid inputs to
/// `DIR/<target>/seed-N`: a starting corpus for `cargo fuzz run <target>
/// DIR/<target>`.
pub fn save_seeds(target: &str, inputs: &[&[u8]]) {
    let Some(dir) = std::env::var_os("VIREO_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    if std::fs::create_dir_all(&dir).is_ok() {
        for (i, input) in inputs.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("seed-{i}")), input);
        }
    }
}

/// 64-bit mode at CPL 0 with paging from [`PML4`] and the GDT, IDT and
/// TSS at their places in this layout (which `emulator/tests/common` shares):
/// the CPU state of the fuzz guest and of the emulator's own tests.
pub fn long_mode_cpl0(s: &mut crate::cpu::state::CpuState) {
    s.cr0 = cr0::PE | cr0::PG | cr0::ET | cr0::NE | cr0::WP;
    s.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    s.cr3 = PML4;
    s.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
    let data = Segment::from_descriptor(0x18, DATA64);
    s.seg = [data; 6];
    s.seg[SegReg::Cs as usize] = Segment::from_descriptor(0x10, CODE64);
    s.gdt = TableRegister {
        base: GDT,
        limit: 0x1f,
    };
    s.idt = TableRegister {
        base: IDT,
        limit: 0xfff,
    };
    s.tr = Segment {
        base: TSS,
        limit: 0x67,
        selector: 0x20,
        type_: 0xb,
        present: 1,
        ..Segment::default()
    };
    s.rflags = rflags::FIXED1;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instructions per input in the (debug-build) tests.
    const TEST_INSTRUCTIONS: u64 = 256;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
            let mut v = valid.to_vec();
            for _ in 0..1 + self.next() % 3 {
                let at = 17 + (self.next() as usize) % (v.len() - 17);
                v[at] = self.next() as u8;
            }
            v
        }
    }

    /// Loops over registers and memory (sums, shifts, compares, calls),
    /// ending with an `out`: what the translator turns into host code.
    fn valid_program() -> Vec<u8> {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        let build = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
            let mut top = a.create_label();
            let mut func = a.create_label();
            a.mov(ecx, 40)?;
            a.xor(eax, eax)?;
            a.set_label(&mut top)?;
            a.lea(rdx, qword_ptr(rcx + rcx * 2))?;
            a.add(rax, rdx)?;
            a.mov(qword_ptr(rcx * 8 + 0x14_0000), rax)?;
            a.sub(rdx, qword_ptr(rcx * 8 + 0x14_0000))?;
            a.rol(rax, 3)?;
            a.call(func)?;
            a.cmp(rax, rbx)?;
            a.adc(rsi, 1)?;
            a.dec(ecx)?;
            a.jnz(top)?;
            a.out(0x80, eax)?;
            a.hlt()?;
            a.set_label(&mut func)?;
            a.push(rax)?;
            a.xor(rbx, qword_ptr(rsp))?;
            a.pop(rax)?;
            a.ret()
        };
        build(&mut a).unwrap();
        let code = a.assemble(CODE).unwrap();
        let mut v = vec![0u8];
        v.extend_from_slice(&[
            0x01, 0x02, 0x41, 0x80, 0, 0x03, 0x50, 0x90, 7, 8, 9, 10, 11, 12, 13, 14,
        ]);
        v.extend_from_slice(&code);
        v
    }

    #[test]
    fn emulate_survives_random_and_mutated_code() {
        let valid = valid_program();
        save_seeds("emulate", &[&valid]);
        save_seeds("jit_differential", &[&valid]);
        let exits = emulate(&valid);
        assert!(exits.iter().any(|e| e.contains("IoOut")), "{exits:?}");
        let mut rng = XorShift(0x5eed_0501);
        for i in 0..500 {
            let data = if i % 2 == 0 {
                rng.mutate(&valid)
            } else {
                (0..17 + rng.next() % 80)
                    .map(|_| rng.next() as u8)
                    .collect()
            };
            emulate_up_to(&data, TEST_INSTRUCTIONS);
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn interpreter_and_translator_agree_on_random_and_mutated_code() {
        let valid = valid_program();
        assert!(jit_differential(&valid));
        let mut rng = XorShift(0x5eed_0502);
        let mut agreed = 0;
        for i in 0..250 {
            let data = if i % 2 == 0 {
                rng.mutate(&valid)
            } else {
                (0..17 + rng.next() % 64)
                    .map(|_| rng.next() as u8)
                    .collect()
            };
            agreed += usize::from(jit_differential_up_to(&data, TEST_INSTRUCTIONS));
        }
        assert!(agreed > 125, "only {agreed} of 250 comparable");
    }

    /// The valid program is one the translator takes on: the comparison
    /// is between two different paths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_translator_really_runs_the_valid_program() {
        let valid = valid_program();
        let s = setup(&valid);
        let mut a = cpu(guest(s.code).unwrap(), false, &s.regs);
        a.set_jit(None);
        let mut b = cpu(guest(s.code).unwrap(), false, &s.regs);
        b.set_jit(Some(0));
        run(&mut a, MAX_INSTRUCTIONS);
        run(&mut b, MAX_INSTRUCTIONS);
        assert_eq!(a.state.gpr, b.state.gpr);
        assert!(b.translated_instructions() > 0, "nothing ran translated");
    }
}
