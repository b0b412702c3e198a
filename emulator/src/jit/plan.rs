//! Planning: what each guest instruction becomes (a native instruction
//! with host registers and a rewritten memory operand, a branch, a stack
//! template) or `None` for the interpreter; the guest-to-host register
//! mapping.

use iced_x86::{Code, CodeSize, ConditionCode, Instruction, Mnemonic, OpAccess, OpKind, Register};

use super::Jit;

const ARITH: u32 = 0x3f; // iced RflagsBits: OF SF ZF AF CF PF

/// Host registers guest registers are loaded into (by host number). RSP,
/// R12 (guest state), R13/R14 (fast read/write tables), R15 (effective
/// address) and RBP (flags) are the translator's own.
const POOL: [usize; 10] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11];

fn in_pool(h: usize) -> bool {
    POOL.contains(&h)
}

/// Host (or guest) 64-bit register number `n`.
pub(super) fn r64(n: usize) -> Register {
    Register::try_from(Register::RAX as usize + (n & 15)).unwrap_or(Register::RAX)
}

/// Number (0-15) of the 64-bit register holding GPR `r`.
fn gpr_number(r: Register) -> Option<usize> {
    if !r.is_gpr() {
        return None;
    }
    Some(r.full_register() as usize - Register::RAX as usize)
}

/// `r` (a GPR of some width) moved to host register `h`, or `None` if it
/// has no such form (AH..BH live only in RAX..RBX).
fn resize(r: Register, h: usize) -> Option<Register> {
    use Register as R;
    let g = gpr_number(r)?;
    // Registers of one width are consecutive in iced's enum.
    let base =
        |first: Register, n: usize| Register::try_from(first as usize + n).unwrap_or(R::None);
    let out = if r.is_gpr64() {
        base(R::RAX, h)
    } else if r.is_gpr32() {
        base(R::EAX, h)
    } else if r.is_gpr16() {
        base(R::AX, h)
    } else if (R::AH as usize..=R::BH as usize).contains(&(r as usize)) {
        if h != g {
            return None;
        }
        r
    } else if h < 4 {
        base(R::AL, h)
    } else if h < 8 {
        base(R::SPL, h - 4)
    } else {
        base(R::R8L, h - 8)
    };
    (out != R::None).then_some(out)
}

/// Mnemonics whose register and memory operands are all explicit (or
/// RAX/RCX/RDX, which keep their own host register), that cannot fault
/// except on their memory operand, and that compute the same on the host
/// as the emulator does (the differential tests check that).
fn native(m: Mnemonic) -> bool {
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
            | M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
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
            | M::Imul
            | M::Mul
            | M::Xchg
            | M::Xadd
            | M::Cmpxchg
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Bswap
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

/// Shifts and rotates leave the flags alone for a count of 0.
pub(super) fn shift(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// A guest memory access of a native instruction.
pub(super) struct Access {
    /// Effective address: base and index host registers, scale, and a
    /// displacement, or an absolute address (RIP-relative).
    pub(super) base: Option<u8>,
    pub(super) index: Option<u8>,
    pub(super) scale: u8,
    pub(super) displ: i64,
    pub(super) absolute: Option<u64>,
    /// FS or GS: add its base.
    pub(super) seg: Option<usize>,
    pub(super) len: u64,
    pub(super) write: bool,
    /// Free host registers for the lookup; the rewritten operand is
    /// `[a + b]`.
    pub(super) a: u8,
    pub(super) b: u8,
}

/// One native instruction, ready to emit.
pub(super) struct NativeOp {
    /// The guest instruction with host registers, encoded.
    pub(super) code: [u8; 15],
    pub(super) len: u8,
    /// (guest, host) registers to load before and store after.
    pub(super) load: [(u8, u8); 16],
    pub(super) loads: u8,
    pub(super) store: [(u8, u8); 16],
    pub(super) stores: u8,
    pub(super) access: Option<Access>,
    /// Needs the guest flags in the host RFLAGS before it runs.
    pub(super) needs_flags: bool,
    /// Writes some flags.
    pub(super) sets_flags: bool,
}

#[allow(clippy::large_enum_variant)] // kept in one reused Vec
pub(super) enum Plan {
    Native(NativeOp),
    /// Does nothing (NOP, ENDBR64, PAUSE).
    Nothing,
    Jcc {
        /// The condition's encoding (0 O .. 15 G).
        cc: u8,
        target: u64,
    },
    Jmp {
        target: u64,
    },
    /// PUSH/POP of a 64-bit register.
    Push(u8),
    Pop(u8),
    /// Near CALL to an address or to a register's value; `ret` is pushed.
    Call {
        target: Target,
        ret: u64,
    },
    /// JMP to a register's value.
    JmpReg(u8),
    /// Near RET without an immediate.
    Ret,
}

#[derive(Clone, Copy)]
pub(super) enum Target {
    Direct(u64),
    Reg(u8),
}

impl Plan {
    /// It writes RIP: the block ends with it.
    pub(super) fn ends(&self) -> bool {
        matches!(
            self,
            Plan::Jmp { .. } | Plan::Call { .. } | Plan::JmpReg(_) | Plan::Ret
        )
    }
}

impl Jit {
    /// Plan one instruction, or `None` if it must be interpreted.
    pub(super) fn plan(&mut self, i: &Instruction) -> Option<Plan> {
        use Mnemonic as M;
        if i.code_size() != CodeSize::Code64 {
            return None;
        }
        match i.mnemonic() {
            M::Nop | M::Endbr64 | M::Pause => return Some(Plan::Nothing),
            // A branch to a non-canonical address raises #GP at the
            // branch: the interpreter does that.
            M::Jmp
                if i.op0_kind() == OpKind::NearBranch64
                    && crate::mmu::is_canonical(i.near_branch_target()) =>
            {
                return Some(Plan::Jmp {
                    target: i.near_branch_target(),
                })
            }
            m if crate::exec::dispatch::is_jcc(m)
                && i.op0_kind() == OpKind::NearBranch64
                && i.condition_code() != ConditionCode::None
                && crate::mmu::is_canonical(i.near_branch_target()) =>
            {
                // iced numbers the conditions from 1 in encoding order.
                return Some(Plan::Jcc {
                    cc: i.condition_code() as u8 - 1,
                    target: i.near_branch_target(),
                });
            }
            M::Push if i.code() == Code::Push_r64 => {
                return Some(Plan::Push(gpr_number(i.op0_register())? as u8))
            }
            M::Pop if i.code() == Code::Pop_r64 => {
                return Some(Plan::Pop(gpr_number(i.op0_register())? as u8))
            }
            M::Call if i.code() == Code::Call_rel32_64 => {
                let target = i.near_branch_target();
                return crate::mmu::is_canonical(target).then_some(Plan::Call {
                    target: Target::Direct(target),
                    ret: i.next_ip(),
                });
            }
            M::Call if i.code() == Code::Call_rm64 && i.op0_kind() == OpKind::Register => {
                return Some(Plan::Call {
                    target: Target::Reg(gpr_number(i.op0_register())? as u8),
                    ret: i.next_ip(),
                });
            }
            M::Jmp if i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Register => {
                return Some(Plan::JmpReg(gpr_number(i.op0_register())? as u8))
            }
            M::Ret if i.code() == Code::Retnq => return Some(Plan::Ret),
            m if native(m) => {}
            _ => return None,
        }
        if i.has_rep_prefix() || i.has_repne_prefix() {
            return None;
        }
        let info = self.info.info(i);
        // Guest registers used and how.
        let mut used: [Option<OpAccess>; 16] = [None; 16];
        for u in info.used_registers() {
            let r = u.register();
            if let Some(g) = gpr_number(r) {
                used[g] = Some(match (used[g], u.access()) {
                    (None, a) => a,
                    (Some(a), b) if a == b => a,
                    _ => OpAccess::ReadWrite,
                });
            } else if !(r.is_segment_register() || r == Register::RIP) {
                return None;
            }
        }
        let mems = info.used_memory();
        let mem_access = match mems {
            [] => None,
            [m] => Some(m.access()),
            _ => return None,
        };
        let flags_read = i.rflags_read() & ARITH != 0;
        let modified = i.rflags_modified() & ARITH;
        // Explicit register operands (any guest register can be moved to
        // another host register there).
        let mut explicit = [false; 16];
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                if let Some(g) = gpr_number(i.op_register(n)) {
                    explicit[g] = true;
                }
            }
        }
        let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
        if has_mem {
            for r in [i.memory_base(), i.memory_index()] {
                if let Some(g) = gpr_number(r) {
                    explicit[g] = true;
                }
            }
            if !crate::exec::fast::addr64(i) {
                return None;
            }
        }
        // Map: identity for guest registers the pool has, else a free one.
        let mut host = [usize::MAX; 16];
        let mut taken = [false; 16];
        for g in 0..16 {
            if used[g].is_some() && in_pool(g) {
                host[g] = g;
                taken[g] = true;
            }
        }
        for g in 0..16 {
            if used[g].is_some() && host[g] == usize::MAX {
                if !explicit[g] {
                    return None;
                }
                let h = *POOL.iter().find(|&&h| !taken[h])?;
                host[g] = h;
                taken[h] = true;
            }
        }
        let mut instr = *i;
        // MOV's moffs forms address memory by an absolute address with no
        // ModRM byte, so they cannot take the host address: use the ModRM
        // forms, same operands.
        let modrm = match i.code() {
            Code::Mov_AL_moffs8 => Some(Code::Mov_r8_rm8),
            Code::Mov_AX_moffs16 => Some(Code::Mov_r16_rm16),
            Code::Mov_EAX_moffs32 => Some(Code::Mov_r32_rm32),
            Code::Mov_RAX_moffs64 => Some(Code::Mov_r64_rm64),
            Code::Mov_moffs8_AL => Some(Code::Mov_rm8_r8),
            Code::Mov_moffs16_AX => Some(Code::Mov_rm16_r16),
            Code::Mov_moffs32_EAX => Some(Code::Mov_rm32_r32),
            Code::Mov_moffs64_RAX => Some(Code::Mov_rm64_r64),
            _ => None,
        };
        if let Some(code) = modrm {
            instr.set_code(code);
        }
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                let r = i.op_register(n);
                let g = gpr_number(r)?;
                instr.set_op_register(n, resize(r, host[g])?);
            }
        }
        let mut access = None;
        if has_mem {
            let base = gpr_number(i.memory_base()).map(|g| host[g]);
            let index = gpr_number(i.memory_index()).map(|g| host[g]);
            let (base8, index8) = (base.map(|h| h as u8), index.map(|h| h as u8));
            let displ = i.memory_displacement64() as i64;
            let absolute = (i.memory_base() == Register::RIP).then(|| i.memory_displacement64());
            if absolute.is_none() && i32::try_from(displ).is_err() {
                return None;
            }
            match mem_access {
                Some(OpAccess::NoMemAccess) | None => {
                    // LEA (or a NOP-like form): registers only.
                    if i.mnemonic() != M::Lea {
                        return None;
                    }
                    let (b, d) = match absolute {
                        Some(abs) => (Register::None, i32::try_from(abs as i64).ok()? as i64),
                        None => (base.map_or(Register::None, r64), displ),
                    };
                    instr.set_memory_base(b);
                    instr.set_memory_index(index.map_or(Register::None, r64));
                    instr.set_memory_displacement64(d as u64);
                    // iced's displacement size of 64-bit addressing: 8.
                    instr.set_memory_displ_size(if d == 0 && b != Register::None { 0 } else { 8 });
                    instr.set_segment_prefix(Register::None);
                }
                Some(acc) => {
                    let len = i.memory_size().size() as u64;
                    if !matches!(len, 1 | 2 | 4 | 8) {
                        return None;
                    }
                    // A register bit offset addresses beyond the operand.
                    if matches!(i.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
                        && i.op1_kind() == OpKind::Register
                    {
                        return None;
                    }
                    let seg = match i.memory_segment() {
                        Register::FS => Some(4),
                        Register::GS => Some(5),
                        _ => None,
                    };
                    let mut free = POOL.iter().copied().filter(|&h| !taken[h]);
                    let a = free.next()?;
                    let b = free.next()?;
                    let write = !matches!(acc, OpAccess::Read | OpAccess::CondRead);
                    instr.set_memory_base(r64(a));
                    instr.set_memory_index(r64(b));
                    instr.set_memory_index_scale(1);
                    instr.set_memory_displacement64(0);
                    instr.set_memory_displ_size(0);
                    instr.set_segment_prefix(Register::None);
                    access = Some(Access {
                        base: base8,
                        index: index8,
                        scale: i.memory_index_scale() as u8,
                        displ,
                        absolute,
                        seg,
                        len,
                        write,
                        a: a as u8,
                        b: b as u8,
                    });
                }
            }
        }
        // The host must be able to encode it (AH..BH next to a REX
        // register cannot be).
        let len = self.encoder.encode(&instr, 0).ok()?;
        // What the encoder wrote must be what was meant: decode it back
        // (a form that cannot take the rewritten operands would otherwise
        // address something else on the host).
        let check = {
            let buf = self.encoder.take_buffer();
            let back =
                iced_x86::Decoder::with_ip(64, &buf, 0, iced_x86::DecoderOptions::NONE).decode();
            self.encoder.set_buffer(buf);
            back
        };
        if check.code() != instr.code()
            || check.len() != len
            || (has_mem
                && (check.memory_base() != instr.memory_base()
                    || check.memory_index() != instr.memory_index()
                    || check.memory_displacement64() != instr.memory_displacement64()))
        {
            let mut buf = self.encoder.take_buffer();
            buf.clear();
            self.encoder.set_buffer(buf);
            return None;
        }
        let mut bytes = self.encoder.take_buffer();
        let mut code = [0u8; 15];
        let copied = bytes
            .get(..len)
            .zip(code.get_mut(..len))
            .map(|(from, to)| to.copy_from_slice(from));
        bytes.clear();
        self.encoder.set_buffer(bytes);
        copied?;
        let mut op = NativeOp {
            code,
            len: len as u8,
            load: [(0, 0); 16],
            loads: 0,
            store: [(0, 0); 16],
            stores: 0,
            access,
            needs_flags: flags_read || (modified != 0 && modified != ARITH) || shift(i.mnemonic()),
            sets_flags: modified != 0,
        };
        for g in 0..16 {
            if let Some(acc) = used[g] {
                op.load[op.loads as usize] = (g as u8, host[g] as u8);
                op.loads += 1;
                if !matches!(acc, OpAccess::Read | OpAccess::CondRead | OpAccess::None) {
                    op.store[op.stores as usize] = (g as u8, host[g] as u8);
                    op.stores += 1;
                }
            }
        }
        Some(Plan::Native(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_bytes(bytes: &[u8]) -> Option<Instruction> {
        let i = iced_x86::Decoder::with_ip(64, bytes, 0x10_0000, iced_x86::DecoderOptions::NONE)
            .decode();
        match Jit::new().plan(&i)? {
            Plan::Native(op) => Some(
                iced_x86::Decoder::with_ip(
                    64,
                    &op.code[..op.len as usize],
                    0,
                    iced_x86::DecoderOptions::NONE,
                )
                .decode(),
            ),
            _ => None,
        }
    }

    #[test]
    fn memory_operands_become_host_addresses() {
        // mov [0x100000], rax (moffs: no ModRM byte) -> mov [a+b], rax
        let i = plan_bytes(&[0x48, 0xa3, 0, 0, 0x10, 0, 0, 0, 0, 0]).expect("translated");
        assert_eq!(i.code(), Code::Mov_rm64_r64);
        assert_eq!(i.op1_register(), Register::RAX);
        assert_ne!(i.memory_base(), Register::None);
        assert_eq!(i.memory_displacement64(), 0);
        // add r12d, [rsp+rbx*4+8]: R12 and RSP move to free host registers.
        let i = plan_bytes(&[0x44, 0x03, 0x64, 0x9c, 0x08]).expect("translated");
        assert_eq!(i.code(), Code::Add_r32_rm32);
        assert!(!matches!(i.op0_register(), Register::R12D | Register::ESP));
        assert_eq!(i.memory_index_scale(), 1);
        // lea rax, [rip+0x10] -> an absolute address
        let i = plan_bytes(&[0x48, 0x8d, 0x05, 0x10, 0, 0, 0]).expect("translated");
        assert_eq!(i.memory_base(), Register::None);
        assert_eq!(i.memory_displacement64(), 0x10_0017);
        // mov ah, [rbx]: AH stays in RAX, the lookup registers need no REX.
        assert!(plan_bytes(&[0x8a, 0x27]).is_some());
        // jmp to a non-canonical address (#GP at the jmp): interpreted.
        let i = iced_x86::Decoder::with_ip(
            64,
            &[0xe9, 0, 0, 0, 0],
            0x7fff_ffff_fffb,
            iced_x86::DecoderOptions::NONE,
        )
        .decode();
        assert!(Jit::new().plan(&i).is_none());
        // div rcx: may fault (#DE), interpreted.
        assert!(plan_bytes(&[0x48, 0xf7, 0xf1]).is_none());
        // mov rax, [0xffffffff_00000000] (moffs beyond 32 bits): interpreted.
        assert!(plan_bytes(&[0x48, 0xa1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn registers_move_between_widths() {
        assert_eq!(resize(Register::R12D, 1), Some(Register::ECX));
        assert_eq!(resize(Register::R13, 8), Some(Register::R8));
        assert_eq!(resize(Register::SPL, 2), Some(Register::DL));
        assert_eq!(resize(Register::BL, 9), Some(Register::R9L));
        assert_eq!(resize(Register::AL, 6), Some(Register::SIL));
        assert_eq!(resize(Register::AH, 0), Some(Register::AH));
        assert_eq!(resize(Register::BH, 6), None);
        assert_eq!(resize(Register::R15W, 3), Some(Register::BX));
    }
}
