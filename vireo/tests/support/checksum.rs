//! A tiny guest for tests of dirty page tracking (live migration, diff
//! snapshots): it counts, writes each count into one of 64 pages and
//! prints the count with the sum of those pages, so a page of guest
//! memory lost on the way shows up as a wrong sum.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iced_x86::code_asm::*;

use super::guest::{self, assemble64, Guest64};
use super::{KernelKind, TempDir};

const DELAY_TICKS: u32 = 50_000_000;
/// The guest's 64 pages, one count each.
const BUFFER: i32 = 0x80_0000;
const SLOTS: u64 = 64;

/// forever { count += 1; page[count % 64] = count; sum = Σ page[i];
/// print `count=XXXXXXXX sum=XXXXXXXX`; wait }.
pub fn checksum_guest(g: &mut Guest64) -> guest::AsmResult {
    let counter = g.data(&[0u8; 8]);
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    g.a.lea(rdi, ptr(counter))?;
    g.a.inc(qword_ptr(rdi))?;
    g.a.mov(rbx, qword_ptr(rdi))?;
    g.a.mov(rax, rbx)?;
    g.a.and(eax, (SLOTS - 1) as u32)?;
    g.a.shl(rax, 12)?;
    g.a.add(rax, BUFFER)?;
    g.a.mov(qword_ptr(rax), rbx)?;
    g.a.xor(ecx, ecx)?;
    g.a.mov(esi, BUFFER as u32)?;
    g.a.mov(edx, SLOTS as u32)?;
    let mut sum = g.a.create_label();
    g.a.set_label(&mut sum)?;
    g.a.add(rcx, qword_ptr(rsi))?;
    g.a.add(rsi, 4096)?;
    g.a.dec(edx)?;
    g.a.jnz(sum)?;
    g.print("count=")?;
    g.print_hex(rbx, 8)?;
    g.print(" sum=")?;
    g.print_hex(rcx, 8)?;
    g.print("\n")?;
    let a = &mut g.a;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.lea(r8, qword_ptr(rax + DELAY_TICKS as i32))?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.pause()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r8)?;
    a.jb(wait)?;
    a.jmp(top)
}

pub fn kernel(dir: &TempDir) -> PathBuf {
    let code = assemble64(KernelKind::Elf.entry(), checksum_guest);
    dir.write("vmlinux", &KernelKind::Elf.wrap(&code))
}

/// The sum the guest must print with count `n`.
pub fn expected_sum(n: u64) -> u64 {
    if n >= SLOTS {
        SLOTS * n - SLOTS * (SLOTS - 1) / 2
    } else {
        n * (n + 1) / 2
    }
}

/// Every whole `count=X sum=Y` line, in order.
pub fn lines(output: &str) -> Vec<(u64, u64)> {
    output
        .split('\n')
        .filter_map(|line| {
            let rest = line.trim_end_matches('\r').strip_prefix("count=")?;
            let (c, s) = rest.split_once(" sum=")?;
            if c.len() != 8 || s.len() != 8 {
                return None;
            }
            Some((
                u64::from_str_radix(c, 16).ok()?,
                u64::from_str_radix(s, 16).ok()?,
            ))
        })
        .collect()
}

pub fn check_sums(what: &str, seen: &[(u64, u64)]) {
    for &(c, s) in seen {
        assert_eq!(
            s,
            expected_sum(c) & 0xffff_ffff,
            "{what}: count {c} printed sum {s:#x}: a page of guest memory is stale ({seen:?})"
        );
    }
}

pub fn control(socket: &Path, command: &str) -> serde_json::Value {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    writeln!(s, "{command}").expect("send command");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

pub fn wait_for_socket(socket: &Path) {
    for _ in 0..2000 {
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{} never accepted connections", socket.display());
}
