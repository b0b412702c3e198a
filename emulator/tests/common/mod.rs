//! Guest setup shared by the integration tests: RAM, page tables, GDT,
//! IDT with one `hlt` stub per vector, and a CPU in 64-bit long mode as
//! vireo's VM core leaves the BSP at kernel entry.

#![allow(dead_code)]

use std::sync::Arc;

use iced_x86::code_asm::CodeAssembler;

use vireo_emulator::{Cpu, GuestMemory, PhysMemory};

pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x1000;
pub const TSS: u64 = 0x2000;
/// `hlt` stubs: the handler of vector v is at HANDLERS + v.
pub const HANDLERS: u64 = 0x3000;
/// Top of the IST1 stack every gate uses.
pub const IST_TOP: u64 = 0x8000;
pub const PML4: u64 = 0x9000;
/// Page-table pages are allocated from here.
const PT_POOL: u64 = 0x40000;
pub const RAM_SIZE: u64 = 0x40_0000;

pub const CODE64: u64 = 0x00af_9b00_0000_ffff;
pub const DATA: u64 = 0x00cf_9300_0000_ffff;

pub struct Guest {
    pub mem: Arc<PhysMemory>,
    next_pt: u64,
}

impl Guest {
    pub fn new() -> Guest {
        let mut m = PhysMemory::new();
        m.add_owned(0, RAM_SIZE).unwrap();
        let g = Guest {
            mem: Arc::new(m),
            next_pt: PT_POOL,
        };
        g.write(GDT, &0u64.to_le_bytes());
        g.write(GDT + 0x10, &CODE64.to_le_bytes());
        g.write(GDT + 0x18, &DATA.to_le_bytes());
        // TSS: IST1.
        g.write(TSS + 0x24, &IST_TOP.to_le_bytes());
        for v in 0..256u64 {
            g.write(HANDLERS + v, &[0xf4]);
            let off = HANDLERS + v;
            let lo = (off & 0xffff)
                | (0x10 << 16)
                | (1 << 32)
                | (0x8e << 40)
                | ((off >> 16) & 0xffff) << 48;
            let hi = off >> 32;
            g.write(IDT + v * 16, &lo.to_le_bytes());
            g.write(IDT + v * 16 + 8, &hi.to_le_bytes());
        }
        g
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(self.mem.write(gpa, data));
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        assert!(self.mem.read(gpa, &mut v));
        v
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_u64(gpa).unwrap()
    }

    fn alloc_table(&mut self) -> u64 {
        let t = self.next_pt;
        self.next_pt += 0x1000;
        assert!(self.next_pt <= 0x100000, "page-table pool exhausted");
        self.write(t, &[0u8; 4096]);
        t
    }

    /// The table entry pointing to the next level, created if missing.
    fn next_level(&mut self, table: u64, idx: u64) -> u64 {
        let e = self.read_u64(table + idx * 8);
        if e & 1 != 0 {
            return e & 0x000f_ffff_ffff_f000;
        }
        let t = self.alloc_table();
        self.write(table + idx * 8, &(t | 0x7).to_le_bytes());
        t
    }

    /// Map one 4 KiB page with leaf flags `flags` (P/W/U/NX bits).
    pub fn map_4k(&mut self, va: u64, gpa: u64, flags: u64) {
        let mut t = PML4;
        for level in [39, 30, 21] {
            t = self.next_level(t, (va >> level) & 0x1ff);
        }
        self.write(t + ((va >> 12) & 0x1ff) * 8, &(gpa | flags).to_le_bytes());
    }

    /// Remove the 4 KiB mapping of `va` (it must exist).
    pub fn unmap_4k(&mut self, va: u64) {
        let mut t = PML4;
        for level in [39, 30, 21] {
            t = self.read_u64(t + ((va >> level) & 0x1ff) * 8) & 0x000f_ffff_ffff_f000;
        }
        self.write(t + ((va >> 12) & 0x1ff) * 8, &0u64.to_le_bytes());
    }

    /// Identity-map `[0, len)` with 4 KiB writable pages.
    pub fn identity(&mut self, len: u64) {
        for pa in (0..len).step_by(4096) {
            self.map_4k(pa, pa, 0x3);
        }
    }

    /// A CPU in 64-bit mode at CPL 0 with this guest's GDT, IDT and TSS.
    pub fn cpu(&self) -> Cpu {
        let mut cpu = Cpu::new(self.mem.clone());
        // The layout (PML4, GDT, IDT, TSS) is the fuzz guest's too.
        vireo_emulator::fuzzing::long_mode_cpl0(&mut cpu.state);
        cpu.flush_tlb();
        cpu
    }
}

/// 64-bit code assembled at `ip`.
pub fn assemble(
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ip: u64,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}
