//! The few host instruction forms the translator's glue needs, encoded
//! directly (iced's general assembler cost ~60 µs per block, more than
//! many blocks ever save), with rel32 labels patched at the end.
//!
//! Registers are host register numbers 0-15 (RAX..R15).

/// A memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mem {
    /// `[base + disp]`
    Base(u8, i32),
    /// `[base + index * scale + disp]` (index is not RSP)
    Sib(u8, u8, u8, i32),
    /// `[index * scale + disp]` (no base)
    Index(u8, u8, i32),
}

/// A forward or backward jump target.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Label(usize);

#[derive(Default)]
pub(crate) struct Asm {
    pub buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (offset of a rel32 field, its label)
    fixups: Vec<(usize, usize)>,
}

pub(crate) const RAX: u8 = 0;
pub(crate) const RCX: u8 = 1;
pub(crate) const RDX: u8 = 2;
pub(crate) const RBX: u8 = 3;
pub(crate) const RSP: u8 = 4;
pub(crate) const RBP: u8 = 5;
pub(crate) const R12: u8 = 12;
pub(crate) const R13: u8 = 13;
pub(crate) const R14: u8 = 14;
pub(crate) const R15: u8 = 15;

fn scale_bits(s: u8) -> u8 {
    match s {
        2 => 1,
        4 => 2,
        8 => 3,
        _ => 0,
    }
}

impl Asm {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.labels.clear();
        self.fixups.clear();
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.buf.len());
    }

    /// Patch every rel32; `false` if a label was never bound.
    pub fn finish(&mut self) -> bool {
        for &(at, l) in &self.fixups {
            let Some(target) = self.labels[l] else {
                return false;
            };
            let rel = target as i64 - (at as i64 + 4);
            self.buf[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        true
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn rex(&mut self, w: bool, r: u8, x: u8, b: u8, force: bool) {
        let v = 0x40 | (u8::from(w) << 3) | ((r >> 3) << 2) | ((x >> 3) << 1) | (b >> 3);
        if v != 0x40 || force {
            self.buf.push(v);
        }
    }

    /// `opcode /reg` with a memory operand (REX.W if `w`).
    pub fn op_mem(&mut self, w: bool, opcode: &[u8], reg: u8, m: Mem) {
        let (x, b) = match m {
            Mem::Base(b, _) => (0, b),
            Mem::Sib(b, i, _, _) => (i, b),
            Mem::Index(i, _, _) => (i, 0),
        };
        self.rex(w, reg, x, b, false);
        self.bytes(opcode);
        let r = (reg & 7) << 3;
        match m {
            Mem::Base(b, d) => {
                self.buf.push(0x80 | r | (b & 7));
                if b & 7 == 4 {
                    self.buf.push(0x24);
                }
                self.bytes(&d.to_le_bytes());
            }
            Mem::Sib(b, i, s, d) => {
                self.buf.push(0x80 | r | 4);
                self.buf
                    .push((scale_bits(s) << 6) | ((i & 7) << 3) | (b & 7));
                self.bytes(&d.to_le_bytes());
            }
            Mem::Index(i, s, d) => {
                self.buf.push(r | 4);
                self.buf.push((scale_bits(s) << 6) | ((i & 7) << 3) | 5);
                self.bytes(&d.to_le_bytes());
            }
        }
    }

    /// `opcode /reg` with a register operand (REX.W if `w`).
    fn op_reg(&mut self, w: bool, opcode: &[u8], reg: u8, rm: u8) {
        self.rex(w, reg, 0, rm, false);
        self.bytes(opcode);
        self.buf.push(0xc0 | ((reg & 7) << 3) | (rm & 7));
    }

    /// `mov r64, [m]`
    pub fn load(&mut self, r: u8, m: Mem) {
        self.op_mem(true, &[0x8b], r, m);
    }
    /// `mov [m], r64`
    pub fn store(&mut self, m: Mem, r: u8) {
        self.op_mem(true, &[0x89], r, m);
    }
    /// `lea r64, [m]`
    pub fn lea(&mut self, r: u8, m: Mem) {
        self.op_mem(true, &[0x8d], r, m);
    }
    /// `add r64, [m]`
    pub fn add_load(&mut self, r: u8, m: Mem) {
        self.op_mem(true, &[0x03], r, m);
    }
    /// `cmp [m], r64`
    pub fn cmp_mem(&mut self, m: Mem, r: u8) {
        self.op_mem(true, &[0x39], r, m);
    }
    /// `or [m], r64`
    pub fn or_mem(&mut self, m: Mem, r: u8) {
        self.op_mem(true, &[0x09], r, m);
    }
    /// `and qword [m], imm32`
    pub fn and_mem_imm(&mut self, m: Mem, imm: i32) {
        self.op_mem(true, &[0x81], 4, m);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov r64, r64`
    pub fn mov(&mut self, dst: u8, src: u8) {
        self.op_reg(true, &[0x89], src, dst);
    }
    /// `mov r64, imm64` (shorter forms when the value allows)
    pub fn mov_imm(&mut self, r: u8, v: u64) {
        if v <= u64::from(u32::MAX) {
            // mov r32, imm32 zero-extends.
            self.rex(false, 0, 0, r, false);
            self.buf.push(0xb8 | (r & 7));
            self.bytes(&(v as u32).to_le_bytes());
        } else if i32::try_from(v as i64).is_ok() {
            self.op_reg(true, &[0xc7], 0, r);
            self.bytes(&(v as i32).to_le_bytes());
        } else {
            self.rex(true, 0, 0, r, false);
            self.buf.push(0xb8 | (r & 7));
            self.bytes(&v.to_le_bytes());
        }
    }
    /// `mov r64, imm64` in its 10-byte form (when the length must be known
    /// before the value).
    pub fn mov_imm64(&mut self, r: u8, v: u64) {
        self.rex(true, 0, 0, r, false);
        self.buf.push(0xb8 | (r & 7));
        self.bytes(&v.to_le_bytes());
    }
    /// Group-1 operation (`/ext`) of a qword in memory with a 32-bit
    /// immediate (always that long).
    pub fn alu_mem_imm32(&mut self, ext: u8, m: Mem, imm: i32) {
        self.op_mem(true, &[0x81], ext, m);
        self.bytes(&imm.to_le_bytes());
    }
    /// `cmp a, b` (64-bit registers)
    pub fn cmp_reg(&mut self, a: u8, b: u8) {
        self.op_reg(true, &[0x39], b, a);
    }
    /// `push 0`
    pub fn push_zero(&mut self) {
        self.bytes(&[0x6a, 0]);
    }
    /// `jmp rel32` to the absolute address `to`, the code being placed at
    /// `base`.
    pub fn jmp_abs(&mut self, base: usize, to: usize) {
        self.buf.push(0xe9);
        let from = base + self.buf.len() + 4;
        self.bytes(&((to as i64 - from as i64) as i32).to_le_bytes());
    }
    /// Group-1 operation (`/ext`: 0 add, 1 or, 4 and, 5 sub, 7 cmp) of a
    /// register with an immediate; 64-bit if `w`.
    pub fn alu_imm(&mut self, w: bool, ext: u8, r: u8, imm: i32) {
        if let Ok(b) = i8::try_from(imm) {
            self.op_reg(w, &[0x83], ext, r);
            self.buf.push(b as u8);
        } else {
            self.op_reg(w, &[0x81], ext, r);
            self.bytes(&imm.to_le_bytes());
        }
    }
    /// Shift group (`/ext`: 5 shr, 7 sar) of a 64-bit register by `n`.
    pub fn shift_imm(&mut self, ext: u8, r: u8, n: u8) {
        self.op_reg(true, &[0xc1], ext, r);
        self.buf.push(n);
    }
    pub fn push(&mut self, r: u8) {
        self.rex(false, 0, 0, r, false);
        self.buf.push(0x50 | (r & 7));
    }
    pub fn pop(&mut self, r: u8) {
        self.rex(false, 0, 0, r, false);
        self.buf.push(0x58 | (r & 7));
    }
    pub fn pushfq(&mut self) {
        self.buf.push(0x9c);
    }
    pub fn popfq(&mut self) {
        self.buf.push(0x9d);
    }
    pub fn ret(&mut self) {
        self.buf.push(0xc3);
    }
    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.buf.len(), l.0));
        self.bytes(&[0; 4]);
    }
    pub fn jmp(&mut self, l: Label) {
        self.buf.push(0xe9);
        self.rel32(l);
    }
    /// `jcc` with the condition's encoding number (0 o .. 15 g).
    pub fn jcc(&mut self, cc: u8, l: Label) {
        self.bytes(&[0x0f, 0x80 | (cc & 15)]);
        self.rel32(l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    fn text(a: &Asm) -> Vec<String> {
        let mut d = Decoder::with_ip(64, &a.buf, 0, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut out = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn forms_decode_as_meant() {
        let mut a = Asm::default();
        a.load(RAX, Mem::Base(R12, 0x80));
        a.store(Mem::Base(R12, 8), R15);
        a.lea(R15, Mem::Sib(RBX, 9, 8, -16));
        a.lea(R15, Mem::Index(RCX, 4, 0x40));
        a.lea(R15, Mem::Base(R13, 0));
        a.cmp_mem(Mem::Sib(R14, RCX, 8, 0), RAX);
        a.and_mem_imm(Mem::Base(R12, 0x88), !0x8d5);
        a.or_mem(Mem::Base(R12, 0x88), RBP);
        a.mov(R15, RSP);
        a.mov_imm(RDX, 0xffff_ffff_8100_0000);
        a.mov_imm(RAX, 0x1_0000_0003);
        a.mov_imm(8, 7);
        a.alu_imm(false, 4, RBP, 0x8d5);
        a.alu_imm(true, 5, R15, 8);
        a.shift_imm(5, 9, 12);
        a.push(R12);
        a.pop(RBX);
        a.add_load(R15, Mem::Base(R12, 0x100));
        assert_eq!(
            text(&a),
            [
                "mov rax,[r12+80h]",
                "mov [r12+8],r15",
                "lea r15,[rbx+r9*8-10h]",
                "lea r15,[rcx*4+40h]",
                "lea r15,[r13]",
                "cmp [r14+rcx*8],rax",
                "and qword [r12+88h],0FFFFFFFFFFFFF72Ah",
                "or [r12+88h],rbp",
                "mov r15,rsp",
                "mov rdx,0FFFFFFFF81000000h",
                "mov rax,100000003h",
                "mov r8d,7",
                "and ebp,8D5h",
                "sub r15,8",
                "shr r9,0Ch",
                "push r12",
                "pop rbx",
                "add r15,[r12+100h]",
            ]
        );
    }

    #[test]
    fn labels_patch_both_ways() {
        let mut a = Asm::default();
        let back = a.label();
        a.bind(back);
        let fwd = a.label();
        a.jcc(5, fwd);
        a.jmp(back);
        a.bind(fwd);
        a.ret();
        assert!(a.finish());
        assert_eq!(text(&a), ["jne near 000000000000000Bh", "jmp 0", "ret"]);
        let mut b = Asm::default();
        let l = b.label();
        b.jmp(l);
        assert!(!b.finish());
    }
}
