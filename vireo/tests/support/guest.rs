//! Tiny guests assembled with iced-x86's `CodeAssembler`.
//!
//! [`Guest64`] wraps a 64-bit assembler with a preamble (interrupts off, own
//! stack), COM1 print helpers and an ACPI S5 power-off, and appends its
//! subroutines and string data when finished. [`ap_trampoline`] is the 16-bit
//! real-mode code an application processor runs after a STARTUP IPI.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

pub type AsmResult<T = ()> = Result<T, IcedError>;

/// COM1 transmit holding register.
pub const COM1: u16 = 0x3f8;
/// ACPI PM1a control block.
pub const PM1A_CNT: u16 = 0x604;
/// SLP_TYP = 5 (S5) in bits 10-12 with SLP_EN (bit 13).
pub const PM1_S5_SLEEP: u16 = (5 << 10) | (1 << 13);
/// i8042 command port; writing 0xfe pulses the CPU reset line.
pub const I8042_CMD: u16 = 0x64;
pub const I8042_RESET_CPU: u8 = 0xfe;

/// The guest's own stack, at the top of the free low memory 0x10000-0x1ffff.
pub const STACK_TOP: u32 = 0x1_fff0;
/// Where the AP trampoline is copied; the SIPI vector is its page number.
pub const TRAMPOLINE_ADDR: u64 = 0x1_0000;
pub const SIPI_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;
/// The AP spinlock byte and the "APs done" counter (dword), above the
/// trampoline in the same free low memory.
pub const AP_LOCK_ADDR: u64 = 0x1_1000;
pub const AP_COUNT_ADDR: u64 = AP_LOCK_ADDR + 4;

pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_SVR: i32 = 0xf0;
pub const LAPIC_ICR_LOW: i32 = 0x300;
/// INIT, level assert, to all excluding self.
pub const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
/// STARTUP with the trampoline's vector, to all excluding self.
pub const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600 | SIPI_VECTOR;

/// A 64-bit guest program being assembled.
pub struct Guest64 {
    pub a: CodeAssembler,
    print_str: CodeLabel,
    print_hex: CodeLabel,
    power_off: CodeLabel,
    data: Vec<(CodeLabel, Vec<u8>)>,
}

impl Guest64 {
    /// Start a program: interrupts off, direction flag clear, own stack.
    pub fn new() -> AsmResult<Guest64> {
        let mut a = CodeAssembler::new(64)?;
        let print_str = a.create_label();
        let print_hex = a.create_label();
        let power_off = a.create_label();
        a.cli()?;
        a.cld()?;
        a.mov(esp, STACK_TOP)?; // zero-extends into RSP
        Ok(Guest64 {
            a,
            print_str,
            print_hex,
            power_off,
            data: Vec::new(),
        })
    }

    /// Place `bytes` in the program's data (after the code); returns its label
    /// for RIP-relative addressing (`ptr(label)`).
    pub fn data(&mut self, bytes: &[u8]) -> CodeLabel {
        let label = self.a.create_label();
        self.data.push((label, bytes.to_vec()));
        label
    }

    /// Print `s` on COM1. Preserves all registers.
    pub fn print(&mut self, s: &str) -> AsmResult {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        let label = self.data(&bytes);
        self.a.push(rsi)?;
        self.a.lea(rsi, ptr(label))?;
        self.a.call(self.print_str)?;
        self.a.pop(rsi)?;
        Ok(())
    }

    /// Print the NUL-terminated string `reg` points to. Preserves all registers.
    pub fn print_str_at(&mut self, reg: AsmRegister64) -> AsmResult {
        self.a.push(rsi)?;
        self.a.mov(rsi, reg)?;
        self.a.call(self.print_str)?;
        self.a.pop(rsi)?;
        Ok(())
    }

    /// Print the low `digits` hex digits (lower case, no prefix) of `reg`.
    /// Preserves all registers.
    pub fn print_hex(&mut self, reg: AsmRegister64, digits: u32) -> AsmResult {
        assert!((1..=16).contains(&digits));
        self.a.push(rax)?;
        self.a.push(rcx)?;
        self.a.mov(rax, reg)?;
        self.a.mov(ecx, digits)?;
        self.a.call(self.print_hex)?;
        self.a.pop(rcx)?;
        self.a.pop(rax)?;
        Ok(())
    }

    /// Power off through ACPI S5 (does not return).
    pub fn power_off(&mut self) -> AsmResult {
        self.a.jmp(self.power_off)
    }

    /// Halt forever with interrupts off.
    pub fn halt_forever(&mut self) -> AsmResult {
        let mut l = self.a.create_label();
        self.a.set_label(&mut l)?;
        self.a.cli()?;
        self.a.hlt()?;
        self.a.jmp(l)
    }

    /// Append the subroutines and data and assemble for address `base`.
    pub fn finish(mut self, base: u64) -> AsmResult<Vec<u8>> {
        self.emit_routines()?;
        for (mut label, bytes) in std::mem::take(&mut self.data) {
            self.a.set_label(&mut label)?;
            self.a.db(&bytes)?;
        }
        self.a.assemble(base)
    }

    fn emit_routines(&mut self) -> AsmResult {
        let a = &mut self.a;

        // print_str: RSI -> NUL-terminated string, written to COM1.
        a.set_label(&mut self.print_str)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.push(rsi)?;
        a.mov(dx, u32::from(COM1))?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.out(dx, al)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(rsi)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.ret()?;

        // print_hex: RAX = value, ECX = number of digits (1-16).
        a.set_label(&mut self.print_hex)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(rbx, rax)?;
        a.mov(dx, u32::from(COM1))?;
        a.shl(ecx, 2)?; // bit position just above the first digit
        let mut digit = a.create_label();
        let mut decimal = a.create_label();
        a.set_label(&mut digit)?;
        a.sub(ecx, 4)?;
        a.mov(rax, rbx)?;
        a.shr(rax, cl)?;
        a.and(eax, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(decimal)?;
        a.add(al, i32::from(b'a' - b'0' - 10))?;
        a.set_label(&mut decimal)?;
        a.add(al, i32::from(b'0'))?;
        a.out(dx, al)?;
        a.test(ecx, ecx)?;
        a.jnz(digit)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.ret()?;

        // power_off: ACPI S5 through PM1a_CNT; report if it returns.
        a.set_label(&mut self.power_off)?;
        a.mov(dx, u32::from(PM1A_CNT))?;
        a.mov(ax, u32::from(PM1_S5_SLEEP))?;
        a.out(dx, ax)?;
        self.print("guest: still running after the ACPI S5 request\n")?;
        self.halt_forever()
    }
}

/// Assemble a whole 64-bit guest for `base` from a body-building closure.
pub fn assemble64(base: u64, body: impl FnOnce(&mut Guest64) -> AsmResult) -> Vec<u8> {
    let mut g = Guest64::new().expect("creating the assembler");
    body(&mut g).expect("assembling the guest body");
    g.finish(base).expect("assembling the guest")
}

/// Emit 16-bit code printing the literal `s` on COM1 (clobbers AL and DX).
fn print16_literal(a: &mut CodeAssembler, s: &str) -> AsmResult {
    a.mov(dx, u32::from(COM1))?;
    for b in s.bytes() {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Emit 16-bit code printing the low nibble of AL as a hex digit on COM1
/// (clobbers AL; DX must hold COM1).
fn print16_nibble(a: &mut CodeAssembler) -> AsmResult {
    let mut decimal = a.create_label();
    a.and(al, 0xf)?;
    a.cmp(al, 10)?;
    a.jb(decimal)?;
    a.add(al, i32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut decimal)?;
    a.add(al, i32::from(b'0'))?;
    a.out(dx, al)
}

/// The real-mode code an AP runs at CS:IP = 0x1000:0 after the STARTUP IPI:
/// take the spinlock at [`AP_LOCK_ADDR`], print `ap apic id XX\n` (the id
/// from CPUID leaf 1, EBX[31:24], two hex digits), increment the counter at
/// [`AP_COUNT_ADDR`], release the lock and halt forever.
pub fn ap_trampoline() -> Vec<u8> {
    fn build() -> AsmResult<Vec<u8>> {
        let seg_base = TRAMPOLINE_ADDR;
        let lock = (AP_LOCK_ADDR - seg_base) as u32;
        let count = (AP_COUNT_ADDR - seg_base) as u32;
        let mut a = CodeAssembler::new(16)?;
        a.cli()?;
        a.cld()?;
        a.mov(ax, cs)?; // 0x1000
        a.mov(ds, ax)?;

        // Spin until the lock byte was 0 (xchg with memory is locked).
        let mut retry = a.create_label();
        let mut got_it = a.create_label();
        a.set_label(&mut retry)?;
        a.mov(al, 1u32)?;
        a.xchg(byte_ptr(lock), al)?;
        a.test(al, al)?;
        a.jz(got_it)?;
        a.pause()?;
        a.jmp(retry)?;
        a.set_label(&mut got_it)?;

        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24)?;
        print16_literal(&mut a, "ap apic id ")?;
        a.mov(al, bl)?;
        a.shr(al, 4)?;
        print16_nibble(&mut a)?;
        a.mov(al, bl)?;
        print16_nibble(&mut a)?;
        print16_literal(&mut a, "\n")?;

        a.lock().inc(dword_ptr(count))?;
        a.mov(byte_ptr(lock), 0u32)?; // release
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt)?;
        // IP starts at 0 in the segment the SIPI vector selects.
        a.assemble(0)
    }
    build().expect("assembling the AP trampoline")
}

/// A guest that enables the ACPI power button event, routes the SCI (IRQ 9)
/// through the IOAPIC (level triggered, active high, as the MADT's override
/// says) to a handler, prints `waiting for the power button`, halts, and on
/// the interrupt prints `power button pressed` and powers off.
pub fn wait_for_power_button(g: &mut Guest64) -> AsmResult {
    const IDT: u32 = 0x1_2000;
    const VECTOR: u32 = 0x40;
    const IOAPIC: u32 = 0xfec0_0000;
    let mut handler = g.a.create_label();
    let mut idle = g.a.create_label();
    // Enable the local APIC; mask both 8259s so IRQ 9 only comes
    // through the IOAPIC.
    g.a.mov(eax, 0xfee0_00f0u32)?;
    g.a.mov(ecx, 0x1ffu32)?;
    g.a.mov(dword_ptr(rax), ecx)?;
    g.a.mov(eax, 0xffu32)?;
    g.a.mov(edx, 0x21u32)?;
    g.a.out(dx, al)?;
    g.a.mov(edx, 0xa1u32)?;
    g.a.out(dx, al)?;
    // A 64-bit interrupt gate for VECTOR pointing at the handler.
    g.a.lea(rax, ptr(handler))?;
    g.a.mov(edi, IDT + VECTOR * 16)?;
    g.a.mov(word_ptr(rdi), ax)?;
    g.a.mov(ecx, 0x10u32)?;
    g.a.mov(word_ptr(rdi + 2), cx)?;
    g.a.mov(ecx, 0x8e00u32)?;
    g.a.mov(word_ptr(rdi + 4), cx)?;
    g.a.shr(rax, 16)?;
    g.a.mov(word_ptr(rdi + 6), ax)?;
    g.a.shr(rax, 16)?;
    g.a.mov(dword_ptr(rdi + 8), eax)?;
    g.a.xor(ecx, ecx)?;
    g.a.mov(dword_ptr(rdi + 12), ecx)?;
    g.a.mov(edi, IDT + 0x800)?;
    g.a.mov(ecx, (VECTOR + 1) * 16 - 1)?;
    g.a.mov(word_ptr(rdi), cx)?;
    g.a.mov(ecx, IDT)?;
    g.a.mov(qword_ptr(rdi + 2), rcx)?;
    g.a.lidt(ptr(rdi))?;
    // IOAPIC pin 9: VECTOR, level triggered, active high, to APIC 0.
    g.a.mov(eax, IOAPIC)?;
    g.a.mov(ecx, 0x10u32 + 2 * 9)?;
    g.a.mov(dword_ptr(rax), ecx)?;
    g.a.mov(ecx, VECTOR | (1 << 15))?;
    g.a.mov(dword_ptr(rax + 0x10), ecx)?;
    g.a.mov(ecx, 0x10u32 + 2 * 9 + 1)?;
    g.a.mov(dword_ptr(rax), ecx)?;
    g.a.xor(ecx, ecx)?;
    g.a.mov(dword_ptr(rax + 0x10), ecx)?;
    // PM1_EN.PWRBTN_EN
    g.a.mov(edx, 0x602u32)?;
    g.a.mov(eax, 0x100u32)?;
    g.a.out(dx, ax)?;
    g.print("waiting for the power button\n")?;
    g.a.sti()?;
    g.a.set_label(&mut idle)?;
    g.a.hlt()?;
    g.a.jmp(idle)?;
    g.a.set_label(&mut handler)?;
    g.print("power button pressed\n")?;
    g.power_off()
}

/// The first line [`echo_upper`] prints.
pub const ECHO_READY: &str = "echo-ready";

/// Prints [`ECHO_READY`], then echoes what it reads from COM1 with a-z
/// uppercased, forever.
pub fn echo_upper(g: &mut Guest64) -> AsmResult {
    g.print(ECHO_READY)?;
    g.print("\n")?;
    let mut poll = g.a.create_label();
    let mut send = g.a.create_label();
    g.a.set_label(&mut poll)?;
    g.a.mov(edx, u32::from(COM1) + 5)?; // line status register
    g.a.in_(al, dx)?;
    g.a.test(al, 1)?; // data ready
    g.a.jz(poll)?;
    g.a.mov(edx, u32::from(COM1))?;
    g.a.in_(al, dx)?;
    g.a.cmp(al, b'a' as i32)?;
    g.a.jb(send)?;
    g.a.cmp(al, b'z' as i32)?;
    g.a.ja(send)?;
    g.a.sub(al, 0x20)?;
    g.a.set_label(&mut send)?;
    g.a.out(dx, al)?;
    g.a.jmp(poll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_routines_assemble() {
        let code = assemble64(0x10_0000, |g| {
            g.print("x\n")?;
            g.print_hex(rbx, 4)?;
            g.power_off()
        });
        assert!(code.len() > 20 && code.len() < 4096, "{} bytes", code.len());
        // The preamble: cli; cld.
        assert_eq!(&code[..2], &[0xfa, 0xfc]);
        assert!(code.windows(3).any(|w| w == b"x\n\0"));
    }

    #[test]
    fn trampoline_fits_below_the_lock() {
        let t = ap_trampoline();
        assert!(t.len() < (AP_LOCK_ADDR - TRAMPOLINE_ADDR) as usize);
        assert_eq!(t[0], 0xfa, "starts with cli");
    }
}
