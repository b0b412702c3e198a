//! String instructions: MOVS/STOS/LODS/SCAS/CMPS/INS/OUTS with REP,
//! REPE and REPNE prefixes, DF=0/1 and 64- or 32-bit address size.
//!
//! A REP instruction runs up to [`BATCH`] iterations per step. Each
//! iteration commits its registers, so when iteration k > 0 faults or
//! needs VMM input the step ends at iteration k with RIP still on the
//! instruction; it restarts there and the fault is then delivered with the
//! registers of that iteration, as on hardware.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use crate::cpu::flags::{self, mask};
use crate::cpu::state::gpr::{RAX, RCX, RDI, RDX, RSI};
use crate::cpu::state::rflags::{ARITH, DF, ZF};
use crate::cpu::{Cpu, Flow};

/// Iterations of one REP instruction per step.
const BATCH: u64 = 1024;

pub(crate) fn string(cpu: &mut Cpu, i: &Instruction) -> Flow {
    let bytes: u64 = match i.mnemonic() {
        M::Movsb | M::Stosb | M::Lodsb | M::Scasb | M::Cmpsb | M::Insb | M::Outsb => 1,
        M::Movsw | M::Stosw | M::Lodsw | M::Scasw | M::Cmpsw | M::Insw | M::Outsw => 2,
        M::Movsd | M::Stosd | M::Lodsd | M::Scasd | M::Cmpsd | M::Insd | M::Outsd => 4,
        _ => 8,
    };
    let has = |k: &[OpKind]| (0..i.op_count()).any(|n| k.contains(&i.op_kind(n)));
    let asize = if has(&[OpKind::MemorySegSI, OpKind::MemoryESDI]) {
        16
    } else if has(&[OpKind::MemorySegESI, OpKind::MemoryESEDI]) {
        32
    } else {
        64
    };
    let amask = mask(asize);
    let conditional = matches!(
        i.mnemonic(),
        M::Scasb | M::Scasw | M::Scasd | M::Scasq | M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq
    );
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let src_base = cpu.seg_base(i.memory_segment());
    let io = matches!(
        i.mnemonic(),
        M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
    );
    if io {
        cpu.check_io(cpu.state.gpr[RDX] as u16, bytes as usize)?;
    }
    let mut done = 0u64;
    // REP MOVS/STOS forward in 64-bit code: after each iteration (which
    // fills the fast tables for its pages), the rest of the pages at once.
    let fast = rep
        && !io
        && !conditional
        && asize == 64
        && cpu.state.long_mode_64()
        && !cpu.state.flag(DF)
        && matches!(
            i.mnemonic(),
            M::Movsb | M::Movsw | M::Movsd | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq
        );
    loop {
        if rep && cpu.state.gpr[RCX] & amask == 0 {
            return Ok(());
        }
        let before = cpu.state.gpr;
        let before_flags = cpu.state.rflags;
        match iteration(cpu, i, bytes, amask, src_base) {
            Ok(()) => {}
            Err(e) if done == 0 => return Err(e),
            Err(_) => {
                // Restart at this iteration; it will trap again from there.
                cpu.state.gpr = before;
                cpu.state.rflags = before_flags;
                cpu.next_rip = i.ip();
                return Ok(());
            }
        }
        done += 1;
        if !rep {
            return Ok(());
        }
        let c = cpu.state.gpr[RCX].wrapping_sub(1) & amask;
        set_idx(cpu, RCX, c, asize);
        if c == 0 {
            return Ok(());
        }
        if conditional {
            let zf = cpu.state.flag(ZF);
            if (i.has_repe_prefix() && !zf) || (i.has_repne_prefix() && zf) {
                return Ok(());
            }
        }
        if done >= BATCH || io || cpu.exit_after.is_some() || !cpu.mmio_writes.is_empty() {
            cpu.next_rip = i.ip();
            return Ok(());
        }
        if fast {
            rep_fast(cpu, i, bytes, src_base, &mut done);
        }
    }
}

/// REP MOVS / REP STOS with DF clear in 64-bit code: runs of iterations
/// that stay inside one source and one destination page are done at once
/// through the fast tables' host pointers (the same checks as one
/// iteration's [`Cpu::read_mem`] / [`Cpu::write_mem`] fast path: RAM,
/// translated for this privilege, no decoded code on the destination).
/// Stops (leaving the rest to the per-iteration loop) at a page that is
/// not in the fast tables, a run of overlapping MOVS, or [`BATCH`]
/// iterations; each run commits RSI/RDI/RCX, counted in `done`.
fn rep_fast(cpu: &mut Cpu, i: &Instruction, bytes: u64, src_base: u64, done: &mut u64) {
    use crate::memory::PAGE_SIZE;
    let movs = matches!(i.mnemonic(), M::Movsb | M::Movsw | M::Movsd | M::Movsq);
    while *done < BATCH {
        let rcx = cpu.state.gpr[RCX];
        let rdi = cpu.state.gpr[RDI];
        let src = src_base.wrapping_add(cpu.state.gpr[RSI]);
        let mut k = rcx
            .min((PAGE_SIZE - (rdi & (PAGE_SIZE - 1))) / bytes)
            .min(BATCH - *done);
        if movs {
            k = k.min((PAGE_SIZE - (src & (PAGE_SIZE - 1))) / bytes);
        }
        if k == 0 {
            return;
        }
        let len = (k * bytes) as usize;
        let Some(d) = cpu.fast_span(rdi, len, true) else {
            return;
        };
        if movs {
            let Some(s) = cpu.fast_span(src, len, false) else {
                return;
            };
            if d < s + len && s < d + len {
                // Overlapping: element by element, as the loop does.
                return;
            }
            // SAFETY: `len` bytes at `s` and at `d` lie in RAM pages the
            // fast tables vouch for (valid while `cpu.mem` lives), and the
            // two ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, len) };
            cpu.state.gpr[RSI] = cpu.state.gpr[RSI].wrapping_add(len as u64);
        } else {
            let v = cpu.state.gpr[RAX];
            let p = d as *mut u8;
            // SAFETY: `len` bytes at `d` lie in a RAM page the fast write
            // table vouches for.
            unsafe {
                match bytes {
                    1 => std::ptr::write_bytes(p, v as u8, len),
                    2 => (0..k as usize)
                        .for_each(|n| (p.add(2 * n) as *mut u16).write_unaligned(v as u16)),
                    4 => (0..k as usize)
                        .for_each(|n| (p.add(4 * n) as *mut u32).write_unaligned(v as u32)),
                    _ => {
                        (0..k as usize).for_each(|n| (p.add(8 * n) as *mut u64).write_unaligned(v))
                    }
                }
            }
        }
        cpu.state.gpr[RDI] = rdi.wrapping_add(len as u64);
        cpu.state.gpr[RCX] = rcx - k;
        *done += k;
    }
}

fn set_idx(cpu: &mut Cpu, r: usize, v: u64, asize: u32) {
    let old = cpu.state.gpr[r];
    cpu.state.gpr[r] = match asize {
        16 => (old & !0xffff) | (v & 0xffff),
        32 => v & 0xffff_ffff,
        _ => v,
    };
}

fn iteration(cpu: &mut Cpu, i: &Instruction, bytes: u64, amask: u64, src_base: u64) -> Flow {
    let n = bytes as usize;
    let step = if cpu.state.flag(DF) {
        bytes.wrapping_neg()
    } else {
        bytes
    };
    let rsi = cpu.state.gpr[RSI] & amask;
    let di = cpu.state.gpr[RDI] & amask;
    let long = cpu.state.long_mode_64();
    let lin = |base: u64, off: u64| {
        let la = base.wrapping_add(off);
        if long {
            la
        } else {
            la & 0xffff_ffff
        }
    };
    let src = lin(src_base, rsi);
    let rdi = lin(cpu.seg_base(iced_x86::Register::ES), di);
    let bits = (bytes * 8) as u32;
    let addr32 = match amask {
        0xffff => 16,
        0xffff_ffff => 32,
        _ => 64,
    };
    let adv = |v: u64| v.wrapping_add(step) & amask;
    match i.mnemonic() {
        M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
            let v = cpu.read_mem(src, n)?;
            cpu.write_mem(rdi, n, v)?;
            set_idx(cpu, RSI, adv(rsi), addr32);
            set_idx(cpu, RDI, adv(di), addr32);
        }
        M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
            cpu.write_mem(rdi, n, cpu.state.gpr[RAX])?;
            set_idx(cpu, RDI, adv(di), addr32);
        }
        M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
            let v = cpu.read_mem(src, n)?;
            cpu.set_reg(acc(bytes), v);
            set_idx(cpu, RSI, adv(rsi), addr32);
        }
        M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
            let v = cpu.read_mem(rdi, n)?;
            let (_, f) = flags::sub(bits, cpu.state.gpr[RAX] & mask(bits), v, false);
            cpu.state.set_arith(ARITH, f);
            set_idx(cpu, RDI, adv(di), addr32);
        }
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
            let a = cpu.read_mem(src, n)?;
            let b = cpu.read_mem(rdi, n)?;
            let (_, f) = flags::sub(bits, a, b, false);
            cpu.state.set_arith(ARITH, f);
            set_idx(cpu, RSI, adv(rsi), addr32);
            set_idx(cpu, RDI, adv(di), addr32);
        }
        M::Insb | M::Insw | M::Insd => {
            let port = cpu.state.gpr[RDX] as u16;
            cpu.probe_write(rdi, n)?;
            let v = cpu.port_in(port, n)?;
            cpu.write_mem(rdi, n, v)?;
            set_idx(cpu, RDI, adv(di), addr32);
        }
        _ => {
            // OUTS
            let port = cpu.state.gpr[RDX] as u16;
            let v = cpu.read_mem(src, n)?;
            cpu.port_out(port, n, v);
            set_idx(cpu, RSI, adv(rsi), addr32);
        }
    }
    Ok(())
}

fn acc(bytes: u64) -> iced_x86::Register {
    use iced_x86::Register as R;
    match bytes {
        1 => R::AL,
        2 => R::AX,
        4 => R::EAX,
        _ => R::RAX,
    }
}
