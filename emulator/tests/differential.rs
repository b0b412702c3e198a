//! Differential tests: the same instruction bytes run natively on the host
//! CPU (inside this process) and on the emulator; registers, the defined
//! RFLAGS bits, XMM registers and a scratch buffer must agree.
//!
//! `VIREO_DIFF_SEED=<n>` replays a run, `VIREO_DIFF_CASES=<n>` changes the
//! number of random cases per group (default in `DEFAULT_CASES`).

mod common;

use std::collections::BTreeMap;

use iced_x86::code_asm::*;
use iced_x86::{
    Code, Encoder, EncodingKind, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind as K,
    OpKind, Register, RepPrefixKind,
};
use vireo_emulator::cpu::state::rflags::{AF, ARITH, CF, DF, OF, PF, SF, ZF};
use vireo_emulator::{Cpu, Exit};

use common::{Guest, HANDLERS};

const DEFAULT_CASES: usize = 12_000;
const PAGE: usize = 4096;
const SCRATCH_LEN: usize = 2 * PAGE;
const CODE_GPA: u64 = 0x10_0000;
const SCRATCH_GPA: u64 = 0x10_2000;

// ---------------------------------------------------------------- PRNG

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// A register value biased towards edge cases.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << self.below(64),
            3 => self.below(256),
            4 => (1u64 << self.below(64)).wrapping_sub(1),
            5 => 0x8000_0000_0000_0000 | self.below(16),
            _ => self.next(),
        }
    }
}

fn seed() -> u64 {
    std::env::var("VIREO_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            t | 1
        })
}

fn cases() -> usize {
    std::env::var("VIREO_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

// ------------------------------------------------------ native execution

/// Register file exchanged with the native stub. Offsets are used by the
/// generated prologue/epilogue.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ctx {
    gpr: [u64; 16],
    rflags: u64,
    host_rsp: u64,
    xmm: [u128; 16],
    /// FXSAVE image: x87 registers, FCW/FSW/FTW and MXCSR (loaded before
    /// the XMM registers, saved after them).
    fx: [u8; 512],
}
const RFLAGS_OFF: i32 = 128;
const XMM_OFF: i32 = 144;
const FX_OFF: i32 = 400;

impl Default for Ctx {
    fn default() -> Ctx {
        let mut fx = [0u8; 512];
        fx[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Ctx {
            gpr: [0; 16],
            rflags: 0,
            host_rsp: 0,
            xmm: [0; 16],
            fx,
        }
    }
}

struct Native {
    code: *mut u8,
    scratch: *mut u8,
    prologue: Vec<u8>,
    epilogue: Vec<u8>,
    /// Context pointer and a spill slot for the native stub.
    _ctrl: Box<[u64; 2]>,
}

fn gpr64(n: usize) -> AsmRegister64 {
    [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ][n]
}

fn xmmr(n: usize) -> AsmRegisterXmm {
    [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ][n]
}

const HOST_RSP_OFF: i32 = 136;

fn moffs(code: Code, addr: u64) -> Instruction {
    let m = MemoryOperand::with_displ(addr, 8);
    if code == Code::Mov_RAX_moffs64 {
        Instruction::with2(code, Register::RAX, m).unwrap()
    } else {
        Instruction::with2(code, m, Register::RAX).unwrap()
    }
}

/// Saves the callee-saved registers and the host RSP, remembers the context
/// pointer at `ctrl`, then loads RFLAGS, XMM0-15 and all GPRs (RSP too)
/// from the context.
fn build_prologue(ctrl: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r).unwrap();
    }
    a.mov(qword_ptr(rdi + HOST_RSP_OFF), rsp).unwrap();
    a.mov(rax, rdi).unwrap();
    a.add_instruction(moffs(Code::Mov_moffs64_RAX, ctrl))
        .unwrap();
    a.push(qword_ptr(rdi + RFLAGS_OFF)).unwrap();
    a.popfq().unwrap();
    a.fxrstor64(ptr(rdi + FX_OFF)).unwrap();
    for k in 0..16 {
        a.movdqu(xmmr(k), xmmword_ptr(rdi + XMM_OFF + 16 * k as i32))
            .unwrap();
    }
    for k in 0..16 {
        if k != 7 {
            a.mov(gpr64(k), qword_ptr(rdi + 8 * k as i32)).unwrap();
        }
    }
    a.mov(rdi, qword_ptr(rdi + 56)).unwrap();
    a.assemble(0).unwrap()
}

/// Stores every register back into the context (without touching the
/// guest stack), restores the host stack and returns.
fn build_epilogue(ctrl: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.add_instruction(moffs(Code::Mov_moffs64_RAX, ctrl + 8))
        .unwrap();
    a.add_instruction(moffs(Code::Mov_RAX_moffs64, ctrl))
        .unwrap();
    for k in 1..16 {
        a.mov(qword_ptr(rax + 8 * k as i32), gpr64(k)).unwrap();
    }
    a.mov(rsp, qword_ptr(rax + HOST_RSP_OFF)).unwrap();
    a.pushfq().unwrap();
    a.pop(rcx).unwrap();
    a.mov(qword_ptr(rax + RFLAGS_OFF), rcx).unwrap();
    a.mov(rcx, rax).unwrap();
    a.add_instruction(moffs(Code::Mov_RAX_moffs64, ctrl + 8))
        .unwrap();
    a.mov(qword_ptr(rcx), rax).unwrap();
    for k in 0..16 {
        a.movdqu(xmmword_ptr(rcx + XMM_OFF + 16 * k as i32), xmmr(k))
            .unwrap();
    }
    a.fxsave64(ptr(rcx + FX_OFF)).unwrap();
    // Leave the host FPU and MXCSR as the ABI expects them (a directed
    // rounding mode left behind would change the emulator's own host
    // arithmetic).
    a.fninit().unwrap();
    a.mov(dword_ptr(rsp - 8), 0x1f80u32).unwrap();
    a.ldmxcsr(dword_ptr(rsp - 8)).unwrap();
    a.cld().unwrap();
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r).unwrap();
    }
    a.ret().unwrap();
    a.assemble(0).unwrap()
}

impl Native {
    fn new() -> Native {
        // SAFETY: anonymous private mappings with no address hint; the
        // results are checked against MAP_FAILED below.
        let (code, scratch) = unsafe {
            (
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                libc::mmap(
                    std::ptr::null_mut(),
                    SCRATCH_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
            )
        };
        assert!(
            code != libc::MAP_FAILED && scratch != libc::MAP_FAILED,
            "mmap failed"
        );
        let ctrl = Box::new([0u64; 2]);
        let ctrl_addr = ctrl.as_ptr() as u64;
        Native {
            code: code.cast(),
            scratch: scratch.cast(),
            prologue: build_prologue(ctrl_addr),
            epilogue: build_epilogue(ctrl_addr),
            _ctrl: ctrl,
        }
    }

    fn code_va(&self) -> u64 {
        self.code as u64
    }
    fn test_va(&self) -> u64 {
        self.code as u64 + self.prologue.len() as u64
    }
    fn scratch_va(&self) -> u64 {
        self.scratch as u64
    }

    /// Run `test` natively with `ctx` and `scratch` as inputs; both are
    /// replaced by the outputs.
    fn run(&mut self, test: &[u8], ctx: &mut Ctx, scratch: &mut [u8]) {
        let total = self.prologue.len() + test.len() + self.epilogue.len();
        assert!(total <= PAGE && scratch.len() == SCRATCH_LEN);
        // SAFETY: `code` is a PAGE-sized RW mapping owned by this struct and
        // `total <= PAGE`; `scratch` is SCRATCH_LEN bytes, as is the source.
        unsafe {
            let mut p = self.code;
            for part in [&self.prologue[..], test, &self.epilogue[..]] {
                std::ptr::copy_nonoverlapping(part.as_ptr(), p, part.len());
                p = p.add(part.len());
            }
            std::ptr::copy_nonoverlapping(scratch.as_ptr(), self.scratch, SCRATCH_LEN);
            assert_eq!(
                libc::mprotect(self.code.cast(), PAGE, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
        }
        // SAFETY: the page now holds prologue + instruction under test +
        // epilogue: it saves the callee-saved registers and the host RSP,
        // loads every GPR (RSP pointing into `scratch`), RFLAGS and XMM
        // register from `*ctx`, runs the instruction, stores them back,
        // switches back to the host stack, clears DF and returns, following
        // the C ABI. The instructions under test only touch memory inside
        // `scratch` and only jump to the epilogue (the generator
        // guarantees both); `_ctrl` outlives the call.
        unsafe {
            let f: extern "C" fn(*mut Ctx) = std::mem::transmute(self.code);
            f(ctx);
            assert_eq!(
                libc::mprotect(self.code.cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            std::ptr::copy_nonoverlapping(self.scratch, scratch.as_mut_ptr(), SCRATCH_LEN);
        }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: unmapping the two mappings made in `new`, once.
        unsafe {
            libc::munmap(self.code.cast(), PAGE);
            libc::munmap(self.scratch.cast(), SCRATCH_LEN);
        }
    }
}

// ------------------------------------------------------ emulated execution

struct Emu {
    guest: Guest,
    test_va: u64,
    code_off: u64,
    scratch_va: u64,
    /// Run the case through the translator of hot blocks (translated at
    /// once, with the software TLB already holding the scratch pages, so
    /// memory operands take the translated code's own path), not one
    /// instruction at a time through the interpreter.
    translated: bool,
    /// Cases whose instruction under test ran as translated code.
    ran_translated: usize,
}

/// Where the translated mode's warm-up code sits in the code page.
const WARM_OFF: u64 = 0xf00;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Exception(u64),
    Other(Exit),
}

impl Emu {
    fn new(native: &Native) -> Emu {
        let mut guest = Guest::new();
        guest.identity(0x10000);
        guest.map_4k(native.code_va(), CODE_GPA, 0x3);
        guest.map_4k(native.scratch_va(), SCRATCH_GPA, 0x3);
        guest.map_4k(
            native.scratch_va() + PAGE as u64,
            SCRATCH_GPA + PAGE as u64,
            0x3,
        );
        Emu {
            guest,
            test_va: native.test_va(),
            code_off: native.test_va() - native.code_va(),
            scratch_va: native.scratch_va(),
            translated: false,
            ran_translated: 0,
        }
    }

    /// Read and write 8 bytes of each scratch page (rewriting what is
    /// there), so the CPU's fast tables hold both pages for reads and
    /// writes.
    fn warm_up(&mut self, cpu: &mut Cpu) {
        let code_va = self.test_va - self.code_off;
        let mut code = Vec::new();
        for page in [0, PAGE as u64] {
            let addr = self.scratch_va + page;
            for c in [Code::Mov_RAX_moffs64, Code::Mov_moffs64_RAX] {
                let va = code_va + WARM_OFF + code.len() as u64;
                code.extend(encode(&moffs(c, addr), va).unwrap());
            }
        }
        self.guest.write(CODE_GPA + WARM_OFF, &code);
        cpu.state.rip = code_va + WARM_OFF;
        let exit = cpu.run(4);
        assert!(
            matches!(exit, Exit::BudgetExhausted)
                && cpu.state.rip == code_va + WARM_OFF + code.len() as u64,
            "warm-up stopped with {exit:?} at {:#x}",
            cpu.state.rip
        );
    }

    fn run(&mut self, test: &[u8], ctx: &mut Ctx, scratch: &mut [u8]) -> Outcome {
        self.guest.write(CODE_GPA + self.code_off, test);
        self.guest.write(SCRATCH_GPA, scratch);
        let mut cpu: Cpu = self.guest.cpu();
        if self.translated {
            // HLT after the case ends its block (and the run).
            self.guest
                .write(CODE_GPA + self.code_off + test.len() as u64, &[0xf4]);
            cpu.set_jit(Some(0));
            self.warm_up(&mut cpu);
        }
        cpu.state.gpr = ctx.gpr;
        // IF is set as in the user-mode host process.
        cpu.state.rflags = (ctx.rflags & (ARITH | DF)) | 0x202;
        assert!(cpu.load_fxsave_image(&ctx.fx));
        cpu.state.xmm = ctx.xmm;
        cpu.state.rip = self.test_va;
        let end = self.test_va + test.len() as u64;
        let mut outcome = Outcome::Done;
        for _ in 0..100_000 {
            let exit = cpu.run(if self.translated { 10_000 } else { 1 });
            if !self.translated && cpu.state.rip == end {
                break;
            }
            match exit {
                Exit::Halt if self.translated && cpu.state.rip == end + 1 => break,
                Exit::BudgetExhausted => {}
                Exit::Halt if (HANDLERS + 1..=HANDLERS + 256).contains(&cpu.state.rip) => {
                    outcome = Outcome::Exception(cpu.state.rip - HANDLERS - 1);
                    break;
                }
                other => {
                    outcome = Outcome::Other(other);
                    break;
                }
            }
        }
        if cpu.translated_instructions() > 0 {
            self.ran_translated += 1;
        }
        ctx.gpr = cpu.state.gpr;
        ctx.rflags = cpu.state.rflags;
        ctx.xmm = cpu.state.xmm;
        ctx.fx = cpu.fxsave_image(true);
        scratch.copy_from_slice(&self.guest.read(SCRATCH_GPA, SCRATCH_LEN));
        outcome
    }
}

// ------------------------------------------------------ case generation

#[derive(Clone, Copy, Debug)]
enum Op {
    Reg(Register),
    Mem(MemoryOperand),
    Imm(i32),
    Imm64(u64),
}

fn make(code: Code, ops: &[Op]) -> Option<Instruction> {
    use Op::*;
    let r = match *ops {
        [] => Ok(Instruction::with(code)),
        [Reg(a)] => Instruction::with1(code, a),
        [Mem(a)] => Instruction::with1(code, a),
        [Imm(a)] => Instruction::with1(code, a),
        [Reg(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Mem(b)] => Instruction::with2(code, a, b),
        [Mem(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm64(b)] => Instruction::with2(code, a, b),
        [Mem(a), Imm(b)] => Instruction::with2(code, a, b),
        [Reg(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Mem(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        _ => return None,
    };
    r.ok()
}

fn encode(i: &Instruction, ip: u64) -> Option<Vec<u8>> {
    let mut e = Encoder::new(64);
    e.encode(i, ip).ok()?;
    Some(e.take_buffer())
}

/// Mnemonics covered by the random instruction generator.
fn covered(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Add
            | M::Adc
            | M::Sub
            | M::Sbb
            | M::Cmp
            | M::And
            | M::Or
            | M::Xor
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shld
            | M::Shrd
            | M::Mul
            | M::Imul
            | M::Div
            | M::Idiv
            | M::Bsf
            | M::Bsr
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bswap
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Xchg
            | M::Cmpxchg
            | M::Xadd
            | M::Lea
            | M::Mov
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Popcnt
            | M::Cmpxchg8b
            | M::Cmpxchg16b
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Lahf
            | M::Sahf
            | M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs
            | M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets
    )
}

fn covered_sse(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Movdqa
            | M::Movdqu
            | M::Movaps
            | M::Movups
            | M::Movapd
            | M::Movupd
            | M::Movq
            | M::Movd
            | M::Pxor
            | M::Por
            | M::Pand
            | M::Pandn
            | M::Xorps
            | M::Xorpd
            | M::Andps
            | M::Andpd
            | M::Orps
            | M::Orpd
            | M::Andnps
            | M::Andnpd
            | M::Pcmpeqb
            | M::Pcmpeqw
            | M::Pcmpeqd
            | M::Pcmpgtb
            | M::Pcmpgtw
            | M::Pcmpgtd
            | M::Pmovmskb
            | M::Paddb
            | M::Paddw
            | M::Paddd
            | M::Paddq
            | M::Psubb
            | M::Psubw
            | M::Psubd
            | M::Psubq
            | M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Pshufd
            | M::Pslldq
            | M::Psrldq
            | M::Pminub
            | M::Pmaxub
            | M::Movmskps
            | M::Movmskpd
            | M::Movss
            | M::Movsd
            | M::Movhps
            | M::Movlps
            | M::Movhpd
            | M::Movlpd
            | M::Movhlps
            | M::Movlhps
            | M::Movntdq
            | M::Movnti
            | M::Movntps
            | M::Movntpd
            | M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad
            | M::Pshuflw
            | M::Pshufhw
            | M::Packsswb
            | M::Packssdw
            | M::Packuswb
            | M::Psadbw
            | M::Pmuludq
            | M::Pmullw
            | M::Pmulhw
            | M::Pmulhuw
            | M::Pmaddwd
            | M::Pavgb
            | M::Pavgw
            | M::Paddsb
            | M::Paddsw
            | M::Paddusb
            | M::Paddusw
            | M::Psubsb
            | M::Psubsw
            | M::Psubusb
            | M::Psubusw
            | M::Pminsw
            | M::Pmaxsw
            | M::Pextrw
            | M::Pinsrw
            | M::Addss
            | M::Addsd
            | M::Addps
            | M::Addpd
            | M::Subss
            | M::Subsd
            | M::Subps
            | M::Subpd
            | M::Mulss
            | M::Mulsd
            | M::Mulps
            | M::Mulpd
            | M::Divss
            | M::Divsd
            | M::Divps
            | M::Divpd
            | M::Sqrtss
            | M::Sqrtsd
            | M::Sqrtps
            | M::Sqrtpd
            | M::Minss
            | M::Minsd
            | M::Minps
            | M::Minpd
            | M::Maxss
            | M::Maxsd
            | M::Maxps
            | M::Maxpd
            | M::Cmpss
            | M::Cmpsd
            | M::Cmpps
            | M::Cmppd
            | M::Ucomiss
            | M::Ucomisd
            | M::Comiss
            | M::Comisd
            | M::Cvtsi2ss
            | M::Cvtsi2sd
            | M::Cvtss2si
            | M::Cvtsd2si
            | M::Cvttss2si
            | M::Cvttsd2si
            | M::Cvtss2sd
            | M::Cvtsd2ss
            | M::Cvtps2pd
            | M::Cvtpd2ps
            | M::Cvtdq2ps
            | M::Cvtps2dq
            | M::Cvttps2dq
            | M::Cvtdq2pd
            | M::Cvtpd2dq
            | M::Cvttpd2dq
            | M::Shufps
            | M::Shufpd
            | M::Unpcklps
            | M::Unpckhps
            | M::Unpcklpd
            | M::Unpckhpd
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Integer,
    Sse,
    X87,
}

/// x87 instructions compared against the host. Loads of control state
/// that could unmask exceptions (FLDCW, FLDENV, FRSTOR, FXRSTOR, LDMXCSR)
/// and saves that store FIP/FDP (FNSTENV, FNSAVE, FXSAVE) are tested in
/// unit tests instead.
fn covered_x87(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Fninit
            | M::Fnstcw
            | M::Fnstsw
            | M::Fnclex
            | M::Fld
            | M::Fst
            | M::Fstp
            | M::Fild
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fld1
            | M::Fldz
            | M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Ficom
            | M::Ficomp
            | M::Ftst
            | M::Fxam
            | M::Fxch
            | M::Fabs
            | M::Fchs
            | M::Ffree
            | M::Fsqrt
            | M::Frndint
            | M::Fincstp
            | M::Fdecstp
            | M::Fnop
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
            | M::Stmxcsr
            | M::Emms
    )
}

fn kind_supported(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode
            | K::al
            | K::ax
            | K::eax
            | K::rax
            | K::cl
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
            | K::xmm_reg
            | K::xmm_rm
            | K::xmm_or_mem
            | K::mem
            | K::st0
            | K::sti_opcode
    )
}

/// All legacy 64-bit encodings of the covered mnemonics.
fn codes(group: Group) -> Vec<Code> {
    Code::values()
        .filter(|c| {
            let m = c.mnemonic();
            let oc = c.op_code();
            (match group {
                Group::Integer => covered(m),
                Group::Sse => covered_sse(m),
                Group::X87 => covered_x87(m),
            }) && c.encoding() == EncodingKind::Legacy
                && oc.mode64()
                && oc.is_instruction()
                && oc.op_kinds().iter().all(|&k| kind_supported(k))
                && *c != Code::Bswap_r16
                && !c.cpuid_features().iter().any(|f| {
                    matches!(
                        f,
                        iced_x86::CpuidFeature::SSE4_1 | iced_x86::CpuidFeature::SSE3
                    )
                })
        })
        .collect()
}

fn gpr(size: u32, n: usize) -> Register {
    let base = match size {
        8 => Register::AL,
        16 => Register::AX,
        32 => Register::EAX,
        _ => Register::RAX,
    };
    // For 8-bit registers the iced order is AL..BL, AH..BH, SPL..DIL,
    // R8L..: map n (never 4 = SP) to the REX byte registers.
    let idx = if size == 8 && n >= 4 { n + 4 } else { n };
    // SAFETY-free enum arithmetic through iced's own iterator.
    Register::values().nth(base as usize + idx).unwrap_or(base)
}

#[derive(Default)]
struct Case {
    instr: Instruction,
    /// Instructions after `instr` (e.g. one a branch jumps over).
    extra: Vec<Instruction>,
    /// A qword written into the scratch buffer before the run (address, value).
    patch: Option<(u64, u64)>,
    ctx: Ctx,
    /// RFLAGS bits the architecture leaves undefined for this case.
    undefined: u64,
    /// Expected #DE (divide cases only).
    expect_de: bool,
    text: String,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    scratch_va: u64,
}

impl Gen<'_> {
    fn random_gpr_index(&mut self) -> usize {
        loop {
            let n = self.rng.below(16) as usize;
            if n != 4 {
                return n;
            }
        }
    }

    fn random_ctx(&mut self, df: bool) -> Ctx {
        let mut c = Ctx::default();
        for g in c.gpr.iter_mut() {
            *g = self.rng.value();
        }
        for x in c.xmm.iter_mut() {
            *x = (u128::from(self.rng.value()) << 64) | u128::from(self.rng.value());
        }
        c.rflags = (self.rng.next() & ARITH) | 0x202 | if df { DF } else { 0 };
        // x87: all exceptions masked, random precision and rounding
        // control, TOP and tags.
        let pc = [0u16, 2, 3][self.rng.below(3) as usize];
        let fcw = 0x7fu16 | (pc << 8) | ((self.rng.below(4) as u16) << 10);
        let top = self.rng.below(8) as u16;
        let ftw = if self.rng.chance(4) {
            self.rng.next() as u8
        } else {
            !(1u8 << self.rng.below(8))
        };
        c.fx[0..2].copy_from_slice(&fcw.to_le_bytes());
        c.fx[2..4].copy_from_slice(&(top << 11).to_le_bytes());
        c.fx[4] = ftw;
        for k in 0..8 {
            let x = match self.rng.below(6) {
                0 => 0.0,
                1 => -((self.rng.below(2000) as f64) - 1000.0),
                2 => (self.rng.next() as i64 as f64) / 65536.0,
                3 => f64::from_bits(self.rng.value()),
                _ => (self.rng.below(1 << 20) as f64 - 524_288.0) / 1024.0,
            };
            let x = if x.is_nan() || x.is_infinite() || x.is_subnormal() {
                1.5
            } else {
                x
            };
            let mut f = vireo_emulator::exec::float::F80::from_f64(x);
            if self.rng.chance(3) && f.m != 0 {
                // A full 64-bit significand.
                f.m |= self.rng.next() >> 11;
            }
            let r = 32 + 16 * k;
            c.fx[r..r + 8].copy_from_slice(&f.m.to_le_bytes());
            c.fx[r + 8..r + 10].copy_from_slice(&f.se.to_le_bytes());
        }
        // MXCSR: all masked, random rounding, sometimes DAZ and FTZ.
        let mut mx = 0x1f80u32 | ((self.rng.below(4) as u32) << 13);
        if self.rng.chance(6) {
            mx |= 0x40;
        }
        if self.rng.chance(6) {
            mx |= 0x8000;
        }
        c.fx[24..28].copy_from_slice(&mx.to_le_bytes());
        // A valid stack inside the scratch buffer.
        c.gpr[4] = self.scratch_va + PAGE as u64 + 8 * self.rng.below(64);
        c
    }

    fn mem_operand(
        &mut self,
        ctx: &mut Ctx,
        align16: bool,
        base_taken: &mut Vec<usize>,
    ) -> MemoryOperand {
        let n = self.random_gpr_index();
        base_taken.push(n);
        let mut addr = self.scratch_va + 1024 + self.rng.below(SCRATCH_LEN as u64 - 2048);
        if self.rng.chance(4) {
            // Straddle the page boundary inside the scratch buffer.
            addr = self.scratch_va + PAGE as u64 - 1 - self.rng.below(15);
        }
        let disp = self.rng.below(256) as i64 - 128;
        if align16 {
            addr &= !15;
        }
        ctx.gpr[n] = addr.wrapping_sub(disp as u64);
        MemoryOperand::with_base_displ(gpr(64, n), disp)
    }

    fn case(&mut self, code: Code) -> Option<Case> {
        let oc = code.op_code();
        let m = code.mnemonic();
        let mut ctx = self.random_ctx(false);
        let align16 = oc.memory_size().size() == 16;
        let mut bases = Vec::new();
        let mut ops = Vec::new();
        let xmm = |rng: &mut Rng| {
            Register::values().nth(Register::XMM0 as usize + rng.below(16) as usize)
        };
        for &k in oc.op_kinds() {
            let size = match k {
                K::r8_or_mem | K::r8_reg | K::r8_opcode => 8,
                K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode => 16,
                K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode => 32,
                _ => 64,
            };
            let op = match k {
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                    if self.rng.chance(2) {
                        Op::Mem(self.mem_operand(&mut ctx, align16, &mut bases))
                    } else {
                        Op::Reg(gpr(size, self.random_gpr_index()))
                    }
                }
                K::xmm_or_mem => {
                    if self.rng.chance(2) {
                        Op::Mem(self.mem_operand(&mut ctx, align16, &mut bases))
                    } else {
                        Op::Reg(xmm(self.rng)?)
                    }
                }
                K::xmm_reg | K::xmm_rm => Op::Reg(xmm(self.rng)?),
                K::mem if m == Mnemonic::Lea => {
                    let b = gpr(64, self.random_gpr_index());
                    let x = gpr(64, self.random_gpr_index());
                    let scale = 1u32 << self.rng.below(4);
                    let disp = self.rng.next() as i32 as i64;
                    if self.rng.chance(3) {
                        Op::Mem(MemoryOperand::with_base_displ(b, disp))
                    } else {
                        Op::Mem(MemoryOperand::with_base_index_scale_displ_size(
                            b, x, scale, disp, 4,
                        ))
                    }
                }
                K::mem => Op::Mem(self.mem_operand(&mut ctx, true, &mut bases)),
                K::st0 => Op::Reg(Register::ST0),
                K::sti_opcode => Op::Reg(
                    Register::values().nth(Register::ST0 as usize + self.rng.below(8) as usize)?,
                ),
                K::al => Op::Reg(Register::AL),
                K::ax => Op::Reg(Register::AX),
                K::eax => Op::Reg(Register::EAX),
                K::rax => Op::Reg(Register::RAX),
                K::cl => Op::Reg(Register::CL),
                K::imm8_const_1 => Op::Imm(1),
                K::imm8 => Op::Imm(self.rng.below(256) as i32),
                K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                    Op::Imm(self.rng.below(256) as i32 - 128)
                }
                K::imm16 => Op::Imm(self.rng.below(0x10000) as i32),
                K::imm32 | K::imm32sex64 => Op::Imm(self.rng.next() as i32),
                K::imm64 => Op::Imm64(self.rng.value()),
                _ => Op::Reg(gpr(size, self.random_gpr_index())),
            };
            ops.push(op);
        }
        // Registers used as memory bases must not be operands too (their
        // pointer value would be clobbered by a random value below), and
        // operands must not be the base: simply re-roll such cases.
        for op in &ops {
            if let Op::Reg(r) = op {
                if let Some(n) = full_index(*r) {
                    if bases.contains(&n) && m != Mnemonic::Lea {
                        return None;
                    }
                }
            }
        }
        let is_shift = matches!(
            m,
            Mnemonic::Shl
                | Mnemonic::Sal
                | Mnemonic::Shr
                | Mnemonic::Sar
                | Mnemonic::Rol
                | Mnemonic::Ror
                | Mnemonic::Rcl
                | Mnemonic::Rcr
                | Mnemonic::Shld
                | Mnemonic::Shrd
        );
        if is_shift {
            // Interesting counts: 0, 1, the width, above it, masked.
            let c = [0u64, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255]
                [self.rng.below(16) as usize];
            let c = if self.rng.chance(2) {
                c
            } else {
                self.rng.below(70)
            };
            ctx.gpr[1] = (ctx.gpr[1] & !0xff) | c;
            if let Some(Op::Imm(v)) = ops.last_mut() {
                if !matches!(oc.op_kinds().last(), Some(K::imm8_const_1)) {
                    *v = c as i32;
                }
            }
        }
        if matches!(
            m,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) {
            if let (Some(Op::Mem(_)), Some(Op::Reg(r))) = (ops.first(), ops.get(1)) {
                // Keep bit offsets inside the scratch buffer.
                let n = full_index(*r)?;
                ctx.gpr[n] = (self.rng.below(1024) as i64 - 512) as u64;
            }
        }
        if m == Mnemonic::Fsqrt {
            // FSQRT is exact only at double precision on doubles.
            ctx.fx[0..2].copy_from_slice(&0x27fu16.to_le_bytes());
            for k in 0..8 {
                let r = 32 + 16 * k;
                let mut raw = [0u8; 16];
                raw[..10].copy_from_slice(&ctx.fx[r..r + 10]);
                let f = vireo_emulator::exec::float::F80::from_bits(u128::from_le_bytes(raw));
                let d = vireo_emulator::exec::float::F80::from_f64(f.to_f64(0).0);
                ctx.fx[r..r + 8].copy_from_slice(&d.m.to_le_bytes());
                ctx.fx[r + 8..r + 10].copy_from_slice(&d.se.to_le_bytes());
            }
        }
        let instr = make(code, &ops)?;
        let width = match ops.first() {
            Some(Op::Reg(r)) => r.size() as u32 * 8,
            Some(Op::Mem(_)) => oc.memory_size().size() as u32 * 8,
            _ => 64,
        };
        let count_mask = if width == 64 { 0x3f } else { 0x1f };
        let count = match ops.last() {
            _ if !is_shift => 0,
            Some(Op::Reg(Register::CL)) => ctx.gpr[1] & 0xff,
            Some(Op::Imm(v)) => *v as u64 & 0xff,
            _ => 1,
        } & count_mask;
        let mut undefined = 0;
        match m {
            Mnemonic::And | Mnemonic::Or | Mnemonic::Xor | Mnemonic::Test => undefined = AF,
            Mnemonic::Mul | Mnemonic::Imul => undefined = SF | ZF | AF | PF,
            Mnemonic::Div | Mnemonic::Idiv => undefined = ARITH,
            Mnemonic::Bsf | Mnemonic::Bsr => undefined = CF | OF | SF | AF | PF,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
                undefined = OF | SF | AF | PF
            }
            Mnemonic::Popcnt => {}
            _ if is_shift && count != 0 => {
                undefined = AF;
                if count != 1 {
                    undefined |= OF;
                }
                if matches!(m, Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr)
                    && count >= u64::from(width)
                {
                    undefined |= CF;
                }
                if matches!(m, Mnemonic::Shld | Mnemonic::Shrd) && count > u64::from(width) {
                    return None; // result undefined
                }
            }
            _ => {}
        }
        let expect_de = if matches!(m, Mnemonic::Div | Mnemonic::Idiv) {
            div_faults(m, width, &ctx, &ops, self.scratch_va)?
        } else {
            false
        };
        let text = format!("{code:?} {ops:?}");
        Some(Case {
            instr,
            ctx,
            undefined,
            expect_de,
            text,
            ..Case::default()
        })
    }
}

/// Differences between two FXSAVE images in what the emulator models:
/// FCW, FSW (C1 aside), the abridged tags, MXCSR and the 80-bit registers
/// (not FIP/FDP/FOP, MXCSR_MASK or the XMM area, compared separately).
fn fx_diffs(input: &[u8; 512], n: &[u8; 512], e: &[u8; 512]) -> Vec<String> {
    let w = |b: &[u8; 512], k: usize| u16::from_le_bytes([b[k], b[k + 1]]);
    let d = |b: &[u8; 512], k: usize| u32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
    let mut v = Vec::new();
    if w(n, 0) != w(e, 0) {
        v.push(format!(
            "fcw: native {:#x} emulator {:#x}",
            w(n, 0),
            w(e, 0)
        ));
    }
    let c1 = 1 << 9;
    if w(n, 2) & !c1 != w(e, 2) & !c1 {
        v.push(format!(
            "fsw: input {:#x} native {:#x} emulator {:#x}",
            w(input, 2),
            w(n, 2),
            w(e, 2)
        ));
    }
    if n[4] != e[4] {
        v.push(format!(
            "ftw: input {:#x} native {:#x} emulator {:#x}",
            input[4], n[4], e[4]
        ));
    }
    if d(n, 24) != d(e, 24) {
        v.push(format!(
            "mxcsr: input {:#x} native {:#x} emulator {:#x}",
            d(input, 24),
            d(n, 24),
            d(e, 24)
        ));
    }
    for k in 0..8 {
        let r = 32 + 16 * k;
        if n[r..r + 10] != e[r..r + 10] {
            v.push(format!(
                "st{k}: input {:02x?} native {:02x?} emulator {:02x?}",
                &input[r..r + 10],
                &n[r..r + 10],
                &e[r..r + 10]
            ));
        }
    }
    v
}

fn full_index(r: Register) -> Option<usize> {
    if !r.is_gpr() {
        return None;
    }
    let full = r.full_register();
    Some(full as usize - Register::RAX as usize)
}

/// Whether DIV/IDIV with these inputs raises #DE. `None` if the divisor
/// is in memory (not modelled here; such cases are re-rolled).
fn div_faults(m: Mnemonic, width: u32, ctx: &Ctx, ops: &[Op], _scratch: u64) -> Option<bool> {
    let Op::Reg(r) = ops.first()? else {
        return None;
    };
    let n = full_index(*r)?;
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    let d = if r.size() == 1
        && (*r as usize) >= Register::AH as usize
        && (*r as usize) <= Register::BH as usize
    {
        (ctx.gpr[n] >> 8) & 0xff
    } else {
        ctx.gpr[n] & mask
    };
    let (lo, hi) = if width == 8 {
        (ctx.gpr[0] & 0xff, (ctx.gpr[0] >> 8) & 0xff)
    } else {
        (ctx.gpr[0] & mask, ctx.gpr[2] & mask)
    };
    if d == 0 {
        return Some(true);
    }
    Some(if m == Mnemonic::Div {
        let dividend = (u128::from(hi) << width) | u128::from(lo);
        dividend / u128::from(d) > u128::from(mask)
    } else {
        let sx = |v: u64| {
            let s = 64 - width;
            ((v << s) as i64 >> s) as i128
        };
        let dividend = (sx(hi) << width) | i128::from(lo);
        match dividend.checked_div(sx(d)) {
            None => true,
            Some(q) => q < -(1i128 << (width - 1)) || q > (1i128 << (width - 1)) - 1,
        }
    })
}

// ------------------------------------------------------ comparison

struct Harness {
    native: Native,
    emu: Emu,
    scratch_init: Vec<u8>,
    stats: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Harness {
    fn new() -> Harness {
        let native = Native::new();
        let emu = Emu::new(&native);
        Harness {
            native,
            emu,
            scratch_init: vec![0; SCRATCH_LEN],
            stats: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    fn randomize_scratch(&mut self, rng: &mut Rng) {
        for b in self.scratch_init.iter_mut() {
            *b = rng.next() as u8;
        }
    }

    /// Run one case both ways and record any difference.
    fn check(&mut self, case: &Case, rng: &mut Rng) {
        self.randomize_scratch(rng);
        let mut bytes = Vec::new();
        for i in std::iter::once(&case.instr).chain(&case.extra) {
            let Some(b) = encode(i, self.native.test_va() + bytes.len() as u64) else {
                return;
            };
            bytes.extend_from_slice(&b);
        }
        if let Some((addr, value)) = case.patch {
            let off = (addr - self.native.scratch_va()) as usize;
            self.scratch_init[off..off + 8].copy_from_slice(&value.to_le_bytes());
        }
        *self
            .stats
            .entry(format!("{:?}", case.instr.mnemonic()))
            .or_default() += 1;
        let mut ectx = case.ctx;
        let mut emem = self.scratch_init.clone();
        let outcome = self.emu.run(&bytes, &mut ectx, &mut emem);
        if case.expect_de {
            if outcome != Outcome::Exception(0) {
                self.fail(
                    case,
                    &bytes,
                    format!("expected #DE, emulator gave {outcome:?}"),
                );
            }
            return;
        }
        if outcome != Outcome::Done {
            self.fail(
                case,
                &bytes,
                format!("emulator did not complete: {outcome:?}"),
            );
            return;
        }
        let mut nctx = case.ctx;
        let mut nmem = self.scratch_init.clone();
        self.native.run(&bytes, &mut nctx, &mut nmem);
        let mut diffs = Vec::new();
        for r in 0..16 {
            if nctx.gpr[r] != ectx.gpr[r] {
                diffs.push(format!(
                    "gpr{r}: input {:#x} native {:#x} emulator {:#x}",
                    case.ctx.gpr[r], nctx.gpr[r], ectx.gpr[r]
                ));
            }
        }
        let fmask = (ARITH | DF) & !case.undefined;
        if nctx.rflags & fmask != ectx.rflags & fmask {
            diffs.push(format!(
                "rflags: input {:#x} native {:#x} emulator {:#x} (compared {:#x})",
                case.ctx.rflags, nctx.rflags, ectx.rflags, fmask
            ));
        }
        for x in 0..16 {
            if nctx.xmm[x] != ectx.xmm[x] {
                diffs.push(format!(
                    "xmm{x}: input {:#x} native {:#x} emulator {:#x} (mxcsr {:#x})",
                    case.ctx.xmm[x],
                    nctx.xmm[x],
                    ectx.xmm[x],
                    u32::from_le_bytes(case.ctx.fx[24..28].try_into().unwrap_or([0; 4]))
                ));
            }
        }
        diffs.extend(fx_diffs(&case.ctx.fx, &nctx.fx, &ectx.fx));
        if let Some(off) = (0..SCRATCH_LEN).find(|&k| nmem[k] != emem[k]) {
            diffs.push(format!(
                "memory differs first at scratch+{off:#x}: native {:#x} emulator {:#x}",
                nmem[off], emem[off]
            ));
        }
        if !diffs.is_empty() {
            self.fail(case, &bytes, diffs.join("\n    "));
        }
    }

    fn fail(&mut self, case: &Case, bytes: &[u8], why: String) {
        if self.failures.len() < 40 {
            self.failures
                .push(format!("{} bytes {:02x?}\n    {}", case.text, bytes, why));
        } else {
            self.failures.push(String::new());
        }
    }

    fn finish(self, name: &str, seed: u64, min_cases: usize) {
        let total: usize = self.stats.values().sum();
        if self.emu.translated {
            eprintln!(
                "{name}: {} of {total} cases ran as translated code",
                self.emu.ran_translated
            );
            // Most integer instructions and many stack/branch ones are
            // translated (x86-64 hosts only: elsewhere all is interpreted).
            #[cfg(target_arch = "x86_64")]
            assert!(
                self.emu.ran_translated * 4 > total,
                "{name}: only {} of {total} cases ran as translated code",
                self.emu.ran_translated
            );
        }
        eprintln!(
            "{name}: {total} cases, seed {seed}, per mnemonic: {:?}",
            self.stats
        );
        if !self.failures.is_empty() {
            let n = self.failures.len();
            let shown: Vec<_> = self
                .failures
                .into_iter()
                .filter(|f| !f.is_empty())
                .collect();
            panic!(
                "{name}: {n} of {total} cases differ (replay with VIREO_DIFF_SEED={seed}):\n{}",
                shown.join("\n")
            );
        }
        assert!(total >= min_cases, "{name}: only {total} cases ran");
    }
}

fn run_random(name: &str, group: Group, n: usize, translated: bool) {
    let seed = seed();
    let mut rng = Rng(seed);
    let list = codes(group);
    assert!(!list.is_empty());
    let mut h = Harness::new();
    h.emu.translated = translated;
    let scratch_va = h.native.scratch_va();
    let mut done = 0;
    let mut attempts = 0;
    while done < n && attempts < n * 20 {
        attempts += 1;
        let code = list[rng.below(list.len() as u64) as usize];
        let case = Gen {
            rng: &mut rng,
            scratch_va,
        }
        .case(code);
        if let Some(mut case) = case {
            if translated && case.extra.is_empty() {
                // Translated blocks are runs of instructions: follow the
                // case with up to three register-only ones (they cannot
                // fault, whatever the registers hold), which then run in
                // the same translated block. None reads a flag an earlier
                // one left undefined (iced's RflagsBits): hardware and
                // emulator may leave different values there.
                let mut undefined = case.instr.rflags_undefined();
                for _ in 0..rng.below(4) {
                    let code = list[rng.below(list.len() as u64) as usize];
                    let Some(next) = (Gen {
                        rng: &mut rng,
                        scratch_va,
                    })
                    .case(code) else {
                        continue;
                    };
                    let i = next.instr;
                    let registers_only = (0..i.op_count())
                        .all(|k| !matches!(i.op_kind(k), OpKind::Memory))
                        && !matches!(i.mnemonic(), Mnemonic::Div | Mnemonic::Idiv)
                        && next.extra.is_empty()
                        && next.patch.is_none()
                        && i.rflags_read() & undefined == 0
                        // Which flags a shift by CL leaves undefined
                        // depends on CL, which `next` chose for its own
                        // registers.
                        && !(0..i.op_count()).any(|k| {
                            i.op_kind(k) == OpKind::Register && i.op_register(k) == Register::CL
                        });
                    if registers_only {
                        undefined = (undefined
                            & !(i.rflags_written() | i.rflags_cleared() | i.rflags_set()))
                            | i.rflags_undefined();
                        case.text = format!("{}; {}", case.text, next.text);
                        case.undefined |= next.undefined;
                        case.extra.push(i);
                    }
                }
            }
            h.check(&case, &mut rng);
            done += 1;
        }
    }
    h.finish(name, seed, n / 2);
}

#[test]
fn integer_instructions_match_host() {
    run_random("integer", Group::Integer, cases(), false);
}

/// The same cases through the translator of hot blocks (x86-64 hosts).
#[test]
fn translated_integer_instructions_match_host() {
    run_random("integer (translated)", Group::Integer, cases() / 2, true);
}

#[test]
fn sse_instructions_match_host() {
    run_random("sse", Group::Sse, cases() / 2, false);
}

#[test]
fn x87_instructions_match_host() {
    run_random("x87", Group::X87, cases() / 2, false);
}

#[test]
fn string_instructions_match_host() {
    let seed = seed();
    let mut rng = Rng(seed ^ 0x5555);
    let mut h = Harness::new();
    let scratch = h.native.scratch_va();
    for _ in 0..cases() / 4 {
        let df = rng.chance(2);
        let size = [1u32, 2, 4, 8][rng.below(4) as usize];
        let kind = rng.below(5);
        let rep = match (kind, rng.below(3)) {
            (_, 0) => RepPrefixKind::None,
            (3 | 4, 1) => RepPrefixKind::Repne,
            _ => RepPrefixKind::Repe,
        };
        let instr = match (kind, size) {
            (0, 1) => Instruction::with_movsb(64, Register::None, rep),
            (0, 2) => Instruction::with_movsw(64, Register::None, rep),
            (0, 4) => Instruction::with_movsd(64, Register::None, rep),
            (0, _) => Instruction::with_movsq(64, Register::None, rep),
            (1, 1) => Instruction::with_stosb(64, rep),
            (1, 2) => Instruction::with_stosw(64, rep),
            (1, 4) => Instruction::with_stosd(64, rep),
            (1, _) => Instruction::with_stosq(64, rep),
            (2, 1) => Instruction::with_lodsb(64, Register::None, rep),
            (2, 2) => Instruction::with_lodsw(64, Register::None, rep),
            (2, 4) => Instruction::with_lodsd(64, Register::None, rep),
            (2, _) => Instruction::with_lodsq(64, Register::None, rep),
            (3, 1) => Instruction::with_scasb(64, rep),
            (3, 2) => Instruction::with_scasw(64, rep),
            (3, 4) => Instruction::with_scasd(64, rep),
            (3, _) => Instruction::with_scasq(64, rep),
            (_, 1) => Instruction::with_cmpsb(64, Register::None, rep),
            (_, 2) => Instruction::with_cmpsw(64, Register::None, rep),
            (_, 4) => Instruction::with_cmpsd(64, Register::None, rep),
            (_, _) => Instruction::with_cmpsq(64, Register::None, rep),
        }
        .unwrap();
        let mut g = Gen {
            rng: &mut rng,
            scratch_va: scratch,
        };
        let mut ctx = g.random_ctx(df);
        // Mostly short; one in four long enough to cross the page in the
        // middle of the scratch area (REP MOVS/STOS copy whole runs inside
        // a page at once).
        let count = if rng.chance(4) {
            rng.below(300)
        } else {
            rng.below(24)
        };
        ctx.gpr[1] = count;
        let span = count * u64::from(size);
        let lo = scratch + 512 + if df { span } else { 0 };
        let room = SCRATCH_LEN as u64 - 1024 - span;
        ctx.gpr[6] = lo + rng.below(room);
        ctx.gpr[7] = lo + rng.below(room);
        if rng.chance(3) {
            // Make SCAS/CMPS hit equal data sometimes.
            ctx.gpr[0] &= 0xff;
        }
        let text = format!("{:?} rep={rep:?} rcx={count} df={df}", instr.code());
        let case = Case {
            instr,
            ctx,
            undefined: 0,
            expect_de: false,
            text,
            ..Case::default()
        };
        if rng.chance(2) {
            // Repetitive data so REPE/REPNE stop at different places.
            h.check(&case, &mut rng);
        } else {
            h.check(&case, &mut rng);
        }
    }
    h.finish("string", seed, cases() / 8);
}

#[test]
fn divide_errors_raise_de() {
    // Each divides by zero or overflows the quotient.
    let mut h = Harness::new();
    let mut rng = Rng(7);
    let cases = [
        (Code::Div_rm8, Register::BL, 0u64, 0x1234u64, 0u64),
        (Code::Div_rm8, Register::BL, 2, 0x2000, 0),
        (Code::Div_rm16, Register::BX, 1, 0x0, 0x1),
        (Code::Div_rm32, Register::EBX, 0, 5, 0),
        (Code::Div_rm64, Register::RBX, 1, 0, 1),
        (Code::Idiv_rm8, Register::BL, 0xff, 0x8000, 0),
        (Code::Idiv_rm16, Register::BX, 0xffff, 0x0000, 0x8000),
        (Code::Idiv_rm32, Register::EBX, 0xffff_ffff, 0, 0x8000_0000),
        (
            Code::Idiv_rm64,
            Register::RBX,
            u64::MAX,
            0,
            0x8000_0000_0000_0000,
        ),
        (Code::Idiv_rm64, Register::RBX, 0, 1, 0),
    ];
    for (code, reg, divisor, a_val, d_val) in cases {
        let mut ctx = Ctx::default();
        ctx.gpr[0] = a_val;
        ctx.gpr[2] = d_val;
        ctx.gpr[3] = divisor;
        ctx.rflags = 0x202;
        let instr = Instruction::with1(code, reg).unwrap();
        let text = format!("{code:?} {reg:?}");
        let case = Case {
            instr,
            ctx,
            undefined: ARITH,
            expect_de: true,
            text,
            ..Case::default()
        };
        h.check(&case, &mut rng);
    }
    h.finish("divide errors", 7, 10);
}

/// Length of `i` when encoded (branch displacement sizes are fixed by the
/// code, so the target does not matter).
fn len_of(i: &Instruction, ip: u64) -> u64 {
    encode(i, ip).map_or(0, |b| b.len() as u64)
}

/// Stack instructions and control transfers; every branch lands on the
/// end of the test code (the native epilogue).
fn control_case(rng: &mut Rng, scratch_va: u64, test_va: u64) -> Option<Case> {
    let mut g = Gen { rng, scratch_va };
    let mut ctx = g.random_ctx(false);
    let mut bases = Vec::new();
    let filler = Instruction::with1(Code::Inc_rm32, Register::EBX).ok()?;
    let pick = g.rng.below(16);
    let reg64 = gpr(64, g.random_gpr_index());
    let reg16 = gpr(16, g.random_gpr_index());
    let (instr, with_filler, patch_ret) = match pick {
        0 => (
            Instruction::with1(Code::Push_r64, reg64).ok()?,
            false,
            false,
        ),
        1 => (
            Instruction::with1(Code::Push_r16, reg16).ok()?,
            false,
            false,
        ),
        2 => (
            Instruction::with1(Code::Pushq_imm8, g.rng.below(256) as i32 - 128).ok()?,
            false,
            false,
        ),
        3 => (
            Instruction::with1(Code::Pushq_imm32, g.rng.next() as i32).ok()?,
            false,
            false,
        ),
        4 => {
            let m = g.mem_operand(&mut ctx, false, &mut bases);
            let code = if g.rng.chance(2) {
                Code::Push_rm64
            } else {
                Code::Push_rm16
            };
            (Instruction::with1(code, m).ok()?, false, false)
        }
        5 => (Instruction::with1(Code::Pop_r64, reg64).ok()?, false, false),
        6 => (Instruction::with1(Code::Pop_r16, reg16).ok()?, false, false),
        7 => {
            let m = g.mem_operand(&mut ctx, false, &mut bases);
            let code = if g.rng.chance(2) {
                Code::Pop_rm64
            } else {
                Code::Pop_rm16
            };
            (Instruction::with1(code, m).ok()?, false, false)
        }
        8 => (Instruction::with(Code::Pushfq), false, false),
        9 => {
            ctx.gpr[5] = scratch_va + 2048 + 8 * g.rng.below(200);
            (Instruction::with(Code::Leaveq), false, false)
        }
        10 => (
            Instruction::with2(Code::Enterq_imm16_imm8, g.rng.below(0x200) as u32, 0u32).ok()?,
            false,
            false,
        ),
        11 => {
            let code = if g.rng.chance(2) {
                Code::Retnq
            } else {
                Code::Retnq_imm16
            };
            let i = if code == Code::Retnq {
                Instruction::with(code)
            } else {
                Instruction::with1(code, g.rng.below(64) as u32 * 8).ok()?
            };
            (i, false, true)
        }
        12 => (
            Instruction::with_branch(Code::Call_rel32_64, test_va).ok()?,
            true,
            false,
        ),
        13 => {
            let codes = [
                Code::Jmp_rel8_64,
                Code::Jmp_rel32_64,
                Code::Loop_rel8_64_RCX,
                Code::Loope_rel8_64_RCX,
                Code::Loopne_rel8_64_RCX,
                Code::Jrcxz_rel8_64,
                Code::Loop_rel8_64_ECX,
                Code::Jecxz_rel8_64,
            ];
            ctx.gpr[1] = [0u64, 1, 2, 0x1_0000_0000, 0x1_0000_0001][g.rng.below(5) as usize];
            (
                Instruction::with_branch(codes[g.rng.below(codes.len() as u64) as usize], test_va)
                    .ok()?,
                true,
                false,
            )
        }
        _ => {
            // Jcc, short or near.
            let cc = g.rng.below(16) as usize;
            let short = [
                Code::Jo_rel8_64,
                Code::Jno_rel8_64,
                Code::Jb_rel8_64,
                Code::Jae_rel8_64,
                Code::Je_rel8_64,
                Code::Jne_rel8_64,
                Code::Jbe_rel8_64,
                Code::Ja_rel8_64,
                Code::Js_rel8_64,
                Code::Jns_rel8_64,
                Code::Jp_rel8_64,
                Code::Jnp_rel8_64,
                Code::Jl_rel8_64,
                Code::Jge_rel8_64,
                Code::Jle_rel8_64,
                Code::Jg_rel8_64,
            ];
            let near = [
                Code::Jo_rel32_64,
                Code::Jno_rel32_64,
                Code::Jb_rel32_64,
                Code::Jae_rel32_64,
                Code::Je_rel32_64,
                Code::Jne_rel32_64,
                Code::Jbe_rel32_64,
                Code::Ja_rel32_64,
                Code::Js_rel32_64,
                Code::Jns_rel32_64,
                Code::Jp_rel32_64,
                Code::Jnp_rel32_64,
                Code::Jl_rel32_64,
                Code::Jge_rel32_64,
                Code::Jle_rel32_64,
                Code::Jg_rel32_64,
            ];
            let code = if g.rng.chance(2) { short[cc] } else { near[cc] };
            (Instruction::with_branch(code, test_va).ok()?, true, false)
        }
    };
    if bases.contains(&full_index(reg64)?) && matches!(pick, 0 | 5) {
        return None;
    }
    let mut instr = instr;
    let mut extra = Vec::new();
    let len = len_of(&instr, test_va);
    if len == 0 {
        return None;
    }
    let mut end = test_va + len;
    if with_filler {
        end += len_of(&filler, end);
        instr = Instruction::with_branch(instr.code(), end).ok()?;
        extra.push(filler);
    }
    let patch = patch_ret.then_some((ctx.gpr[4], end));
    let text = format!(
        "{:?} rsp={:#x} rcx={:#x}",
        instr.code(),
        ctx.gpr[4],
        ctx.gpr[1]
    );
    Some(Case {
        instr,
        extra,
        patch,
        ctx,
        text,
        ..Case::default()
    })
}

#[test]
fn stack_and_branch_instructions_match_host() {
    stack_and_branch("stack/branch", false);
}

#[test]
fn translated_stack_and_branch_instructions_match_host() {
    stack_and_branch("stack/branch (translated)", true);
}

fn stack_and_branch(name: &str, translated: bool) {
    let seed = seed();
    let mut rng = Rng(seed ^ 0xc0de);
    let mut h = Harness::new();
    h.emu.translated = translated;
    let (scratch, test_va) = (h.native.scratch_va(), h.native.test_va());
    let mut done = 0;
    while done < cases() / 4 {
        if let Some(case) = control_case(&mut rng, scratch, test_va) {
            h.check(&case, &mut rng);
            done += 1;
        }
    }
    h.finish(name, seed, cases() / 8);
}
