//! Emission: the host code of a block's plans (the frame, register
//! caching, flags between host and guest, the fast-table lookup of each
//! memory access, the exits back to the interpreter).

use std::mem::offset_of;

use super::asm::{Asm, Label, Mem, R12, R13, R14, R15, RAX, RBP, RBX, RCX, RDX, RSP as HOST_RSP};
use super::plan::{Access, Plan, Target};
use super::{DYNAMIC, FINISHED, SITE_SHIFT, SLOT_BEFORE, SLOT_BLOCK, SLOT_OUT};
use crate::cpu::state::CpuState;
use crate::mmu::{FastEntry, FAST_SIZE};

/// The guest's arithmetic flags (OF SF ZF AF CF PF) in RFLAGS.
const GUEST_ARITH: i32 = 0x8d5;

/// The lookup registers of the stack templates (no guest register is held
/// in a host register there): page in RAX, offset in RCX, value in RDX.
const STACK_A: u8 = RAX;
const STACK_B: u8 = RCX;
const RSP: u8 = 4;

fn stack_access(write: bool) -> Access {
    Access {
        base: None,
        index: None,
        scale: 1,
        displ: 0,
        absolute: None,
        seg: None,
        len: 8,
        write,
        a: STACK_A,
        b: STACK_B,
    }
}

/// Offsets into [`CpuState`] (R12 points to it).
fn off_gpr(g: usize) -> i32 {
    (offset_of!(CpuState, gpr) + 8 * g) as i32
}
fn off_rflags() -> i32 {
    offset_of!(CpuState, rflags) as i32
}
fn off_rip() -> i32 {
    offset_of!(CpuState, rip) as i32
}
fn off_seg_base(seg: usize) -> i32 {
    (offset_of!(CpuState, seg)
        + seg * std::mem::size_of::<vireo_hypervisor::Segment>()
        + offset_of!(vireo_hypervisor::Segment, base)) as i32
}

// The lookup below indexes the fast tables as 24-byte entries with the tag
// first and the host page address second.
const _: () = assert!(std::mem::size_of::<FastEntry>() == 24);
const _: () = assert!(offset_of!(FastEntry, tag) == 0);
const _: () = assert!(offset_of!(FastEntry, host) == 8);
const _: () = assert!(FAST_SIZE.is_power_of_two());

/// Emit the function for `plans` (the first instructions of a block) into
/// `a`; `all` if they are the whole block, whose next instruction is then
/// at `next`; otherwise the interpreter resumes at instruction
/// `plans.len()`. `false` if it could not be assembled.
pub(super) fn emit(a: &mut Asm, plans: &[Plan], user: bool, all: bool, next: u64) -> bool {
    a.clear();
    let out = a.label();
    // Exits jumped to from the body: (label, result, new RIP, flags in
    // host, guest registers to write back).
    let mut stubs: Vec<(Label, u64, Option<u64>, bool, u16)> = Vec::new();
    prologue(a);
    let mut in_host = false;
    let mut c = Cache::default();
    for (k, plan) in plans.iter().enumerate() {
        let k = k as u64;
        match plan {
            Plan::Nothing => {}
            Plan::Jmp { target } => {
                spill(a, &mut in_host);
                c.write_back(a);
                exit_to(a, *target, k + 1, out);
            }
            Plan::Jcc { cc, target } => {
                if !in_host {
                    fill(a);
                    in_host = true;
                }
                let taken = a.label();
                a.jcc(*cc, taken);
                stubs.push((taken, FINISHED | (k + 1), Some(*target), true, c.dirty));
            }
            Plan::Push(g) => {
                spill(a, &mut in_host);
                c.flush_all_of(a, &[STACK_A, STACK_B, RDX, *g]);
                a.load(R15, gpr(RSP));
                a.alu_imm(true, SUB, R15, 8);
                let miss = a.label();
                lookup(a, &stack_access(true), user, miss);
                stubs.push((miss, k, None, false, c.dirty));
                a.load(RDX, gpr(*g));
                a.store(Mem::Sib(STACK_A, STACK_B, 1, 0), RDX);
                a.store(gpr(RSP), R15);
            }
            Plan::Pop(g) => {
                spill(a, &mut in_host);
                c.flush_all_of(a, &[STACK_A, STACK_B, RDX]);
                a.load(R15, gpr(RSP));
                let miss = a.label();
                lookup(a, &stack_access(false), user, miss);
                stubs.push((miss, k, None, false, c.dirty));
                a.load(RDX, Mem::Sib(STACK_A, STACK_B, 1, 0));
                a.alu_imm(true, ADD, R15, 8);
                // RSP first: POP RSP loads the popped value.
                a.store(gpr(RSP), R15);
                a.store(gpr(*g), RDX);
                c.forget(*g);
            }
            Plan::Call { target, ret } => {
                spill(a, &mut in_host);
                c.write_back(a);
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                if let Target::Reg(g) = target {
                    a.load(RBP, gpr(*g));
                    canonical_or(a, RBP, miss);
                }
                a.load(R15, gpr(RSP));
                a.alu_imm(true, SUB, R15, 8);
                lookup(a, &stack_access(true), user, miss);
                a.mov_imm(RDX, *ret);
                a.store(Mem::Sib(STACK_A, STACK_B, 1, 0), RDX);
                a.store(gpr(RSP), R15);
                match target {
                    Target::Direct(t) => exit_to(a, *t, k + 1, out),
                    Target::Reg(_) => exit_to_rbp(a, k + 1, out),
                }
            }
            Plan::JmpReg(g) => {
                spill(a, &mut in_host);
                c.write_back(a);
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                a.load(RBP, gpr(*g));
                canonical_or(a, RBP, miss);
                exit_to_rbp(a, k + 1, out);
            }
            Plan::Ret => {
                spill(a, &mut in_host);
                c.write_back(a);
                a.load(R15, gpr(RSP));
                let miss = a.label();
                stubs.push((miss, k, None, false, 0));
                lookup(a, &stack_access(false), user, miss);
                a.load(RBP, Mem::Sib(STACK_A, STACK_B, 1, 0));
                canonical_or(a, RBP, miss);
                a.alu_imm(true, ADD, R15, 8);
                a.store(gpr(RSP), R15);
                exit_to_rbp(a, k + 1, out);
            }
            Plan::Native(op) => {
                // Host registers this instruction takes for something else
                // than their own guest register give up what they cache.
                for &(g, h) in &op.load[..op.loads as usize] {
                    if g != h {
                        c.flush(a, h);
                    }
                }
                if let Some(m) = &op.access {
                    c.flush(a, m.a);
                    c.flush(a, m.b);
                }
                for &(g, h) in &op.load[..op.loads as usize] {
                    if g != h {
                        a.load(h, gpr(g));
                    } else if !c.has(g) {
                        a.load(h, gpr(g));
                        c.valid |= 1 << g;
                    }
                }
                if let Some(m) = &op.access {
                    // The lookup clobbers the host flags.
                    spill(a, &mut in_host);
                    effective_address(a, m);
                    let miss = a.label();
                    lookup(a, m, user, miss);
                    stubs.push((miss, k, None, false, c.dirty));
                }
                if op.needs_flags && !in_host {
                    fill(a);
                }
                a.bytes(&op.code[..op.len as usize]);
                if op.sets_flags || op.needs_flags {
                    in_host = true;
                }
                for &(g, h) in &op.store[..op.stores as usize] {
                    if g != h {
                        a.store(gpr(g), h);
                    } else {
                        c.dirty |= 1 << g;
                    }
                }
            }
        }
    }
    if !plans.last().is_some_and(Plan::ends) {
        spill(a, &mut in_host);
        c.write_back(a);
        if all {
            exit_to(a, next, plans.len() as u64, out);
        } else {
            a.mov_imm(RAX, plans.len() as u64);
            a.jmp(out);
        }
    }
    for (label, result, rip, flags_in_host, dirty) in stubs {
        a.bind(label);
        let mut f = flags_in_host;
        spill(a, &mut f);
        Cache {
            valid: dirty,
            dirty,
        }
        .write_back(a);
        match rip {
            Some(rip) => exit_to(a, rip, result & !FINISHED, out),
            None => {
                a.mov_imm(RAX, result);
                a.jmp(out);
            }
        }
    }
    a.bind(out);
    epilogue(a);
    a.finish()
}

/// Guest registers of the pool held in their own host register across the
/// instructions of a block (bit n: guest register n in host register n).
#[derive(Default, Clone, Copy)]
struct Cache {
    /// The host register holds the guest register's value.
    valid: u16,
    /// ... which is newer than the guest state in memory.
    dirty: u16,
}

impl Cache {
    fn has(&self, g: u8) -> bool {
        self.valid & (1 << g) != 0
    }

    /// Host register `h` is needed for something else: write its guest
    /// register back if changed, and forget it.
    fn flush(&mut self, a: &mut Asm, h: u8) {
        if self.dirty & (1 << h) != 0 {
            a.store(gpr(h), h);
        }
        self.forget(h);
    }

    fn flush_all_of(&mut self, a: &mut Asm, hs: &[u8]) {
        for &h in hs {
            self.flush(a, h);
        }
    }

    /// The guest register changed in memory: the host copy is stale.
    fn forget(&mut self, g: u8) {
        self.valid &= !(1 << g);
        self.dirty &= !(1 << g);
    }

    /// Store every changed register (before leaving the block).
    fn write_back(&mut self, a: &mut Asm) {
        for h in 0..16u8 {
            if self.dirty & (1 << h) != 0 {
                a.store(gpr(h), h);
            }
        }
        self.dirty = 0;
    }
}

/// Save the host's callee-saved registers, build the frame (see
/// [`super::SLOT_BEFORE`]) and load R12-R14 from the arguments.
fn prologue(a: &mut Asm) {
    for r in [RBX, RBP, R12, R13, R14, R15] {
        a.push(r);
    }
    a.push(9); // R9: the ChainOut
    a.push(8); // R8: the block
    a.push(RCX); // the budget
    a.push_zero(); // retired before
    a.mov(R12, 7); // RDI: the guest state
    a.mov(R13, 6); // RSI: the fast read table
    a.mov(R14, RDX); // the fast write table
}

/// Bytes of [`prologue`]: a chained jump enters a block this far in.
pub(super) fn prologue_len() -> usize {
    let mut a = Asm::default();
    prologue(&mut a);
    a.buf.len()
}

/// Report the current block and the count before it, drop the frame and
/// return RAX.
fn epilogue(a: &mut Asm) {
    a.load(RDX, Mem::Base(HOST_RSP, SLOT_OUT));
    a.load(RCX, Mem::Base(HOST_RSP, SLOT_BLOCK));
    a.store(Mem::Base(RDX, 0), RCX);
    a.load(RCX, Mem::Base(HOST_RSP, SLOT_BEFORE));
    a.store(Mem::Base(RDX, 8), RCX);
    a.alu_imm(true, ADD, HOST_RSP, 32);
    for r in [R15, R14, R13, R12, RBP, RBX] {
        a.pop(r);
    }
    a.ret();
}

/// Leave for `rip` after `retired` instructions of the block (flags
/// spilled), through a site the dispatcher may later point at the next
/// block (see [`super::Jit::chain`]); its offset goes into the result.
pub(super) fn exit_to(a: &mut Asm, rip: u64, retired: u64, out: Label) {
    a.mov_imm(RBP, rip);
    exit_via_site(a, retired, 0, out);
}

/// Leave for the RIP in RBP (RET, indirect JMP/CALL) through a site, like
/// [`exit_to`]; a stub there also compares the RIP.
fn exit_to_rbp(a: &mut Asm, retired: u64, out: Label) {
    exit_via_site(a, retired, DYNAMIC, out);
}

fn exit_via_site(a: &mut Asm, retired: u64, kind: u64, out: Label) {
    a.store(Mem::Base(R12, off_rip()), RBP);
    // mov rax, imm64 (10 bytes), then the jump's opcode byte.
    let site = (a.buf.len() + 11) as u64;
    a.mov_imm64(RAX, FINISHED | kind | retired | (site << SITE_SHIFT));
    a.jmp(out);
}

pub(super) const ADD: u8 = 0;
const OR: u8 = 1;
const AND: u8 = 4;
pub(super) const SUB: u8 = 5;
pub(super) const CMP: u8 = 7;
pub(super) const SHL: u8 = 4;
pub(super) const SHR: u8 = 5;
const SAR: u8 = 7;

/// Guest register `g` in the state R12 points to.
pub(super) fn gpr(g: u8) -> Mem {
    Mem::Base(R12, off_gpr(g as usize))
}

/// Store the guest flags held in the host RFLAGS.
fn spill(a: &mut Asm, in_host: &mut bool) {
    if *in_host {
        a.pushfq();
        a.pop(RBP);
        a.alu_imm(false, AND, RBP, GUEST_ARITH);
        a.and_mem_imm(Mem::Base(R12, off_rflags()), !GUEST_ARITH);
        a.or_mem(Mem::Base(R12, off_rflags()), RBP);
        *in_host = false;
    }
}

/// Load the guest's arithmetic flags into the host RFLAGS (IF set as in
/// any user process; DF, TF, AC clear).
fn fill(a: &mut Asm) {
    a.load(RBP, Mem::Base(R12, off_rflags()));
    a.alu_imm(false, AND, RBP, GUEST_ARITH);
    a.alu_imm(false, OR, RBP, 0x202);
    a.push(RBP);
    a.popfq();
}

/// Jump to `bad` unless `r` is a canonical address (the interpreter then
/// raises the #GP). Uses RDX and the flags.
fn canonical_or(a: &mut Asm, r: u8, bad: Label) {
    a.mov(RDX, r);
    a.shift_imm(SAR, RDX, 47);
    a.alu_imm(true, ADD, RDX, 1);
    a.alu_imm(true, CMP, RDX, 1);
    a.jcc(7, bad); // ja
}

/// R15 = the guest linear address of `m`.
fn effective_address(a: &mut Asm, m: &Access) {
    match (m.absolute, m.base, m.index) {
        (Some(abs), _, _) => a.mov_imm(R15, abs),
        (None, None, None) => a.mov_imm(R15, m.displ as u64),
        (None, Some(b), None) => a.lea(R15, Mem::Base(b, m.displ as i32)),
        (None, Some(b), Some(i)) => a.lea(R15, Mem::Sib(b, i, m.scale, m.displ as i32)),
        (None, None, Some(i)) => a.lea(R15, Mem::Index(i, m.scale, m.displ as i32)),
    }
    if let Some(seg) = m.seg {
        a.add_load(R15, Mem::Base(R12, off_seg_base(seg)));
    }
}

/// Look R15 up in the fast table for `m` and leave the host page in `a`
/// and the offset in `b`; jump to `miss` when the page is not there (or
/// the access leaves it).
fn lookup(a: &mut Asm, m: &Access, user: bool, miss: Label) {
    let (ra, rb) = (m.a, m.b);
    let table = if m.write { R14 } else { R13 };
    // The tag of the access's last byte: an access that leaves the page
    // does not match the entry of its first byte.
    a.lea(ra, Mem::Base(R15, m.len as i32 - 1));
    a.shift_imm(SHR, ra, 12);
    a.lea(ra, Mem::Sib(ra, ra, 1, i32::from(user)));
    a.mov(rb, R15);
    a.shift_imm(SHR, rb, 12);
    a.alu_imm(true, AND, rb, (FAST_SIZE - 1) as i32);
    a.lea(rb, Mem::Sib(rb, rb, 2, 0));
    a.cmp_mem(Mem::Sib(table, rb, 8, 0), ra);
    a.jcc(5, miss); // jne
    a.load(ra, Mem::Sib(table, rb, 8, 8));
    a.mov(rb, R15);
    a.alu_imm(true, AND, rb, 0xfff);
}
