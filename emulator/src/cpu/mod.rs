//! The emulated CPU: state, the run loop and the exits the VMM sees.

pub mod flags;
pub mod state;

mod access;
mod events;

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use vireo_hypervisor::CpuidEntry;

use crate::decode::{Block, DecodeCache};
use crate::memory::GuestMemory;
use crate::mmu::Tlb;
use state::{rflags, CpuState};

/// Most instructions a vCPU runs before it checks decoded blocks against
/// guest memory again (see [`crate::decode`]).
pub const CODE_SYNC_INSTRS: u64 = 1 << 14;

/// Largest data buffer of one I/O or MMIO exit (an SSE access is 16 bytes).
pub const MAX_IO_LEN: usize = 16;

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `IN`: fill [`Cpu::io_data_mut`]`[..size]` with the value read from
    /// `port`, then run again to complete the instruction.
    IoIn { port: u16, size: u8 },
    /// `OUT`: [`Cpu::io_data`]`[..size]` was written to `port`. The
    /// instruction has completed.
    IoOut { port: u16, size: u8 },
    /// A read of guest physical `gpa` that is not RAM: fill
    /// [`Cpu::io_data_mut`]`[..len]` and run again to complete the
    /// instruction.
    MmioRead { gpa: u64, len: u8 },
    /// A write of [`Cpu::io_data`]`[..len]` to guest physical `gpa` that is
    /// not RAM.
    MmioWrite { gpa: u64, len: u8 },
    /// HLT with no interrupt to wake the CPU.
    Halt,
    /// Triple fault.
    Shutdown,
    /// The instruction budget of this `run` is spent; the caller may check
    /// for pause/stop and run again.
    BudgetExhausted,
    /// The emulator cannot go on (e.g. code fetched from MMIO or a CPU mode
    /// that is not implemented). The state is left at the instruction.
    InternalError(String),
}

/// Why an instruction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trap {
    /// An architectural exception to deliver through the IDT.
    Exception { vector: u8, error: Option<u32> },
    /// The instruction needs data from the VMM (MMIO read, `IN`). Nothing
    /// was committed; the instruction restarts on the next `run`. Boxed,
    /// like [`Trap::Internal`]'s message, so that a [`Flow`] (every
    /// handler's result) is two machine words, not four.
    NeedInput(Box<Exit>),
    /// Stop with [`Exit::InternalError`].
    Internal(Msg),
    /// A LOCKed read-modify-write lost a race with another vCPU: nothing
    /// was written; run the instruction again.
    Retry,
}

/// The memory operand of the LOCKed instruction being executed: its first
/// read is remembered so the write can be a compare-and-swap.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AtomicOp {
    pub la: Option<u64>,
    pub len: usize,
    pub old: u64,
}

pub(crate) type Flow<T = ()> = std::result::Result<T, Trap>;

/// The message of [`Trap::Internal`], one pointer wide (see
/// [`Trap::NeedInput`]).
#[derive(Debug, Clone, PartialEq, Eq)]
// One pointer: a `String` or `Box<str>` would make `Trap` 24 or 32 bytes.
#[allow(clippy::box_collection)]
pub(crate) struct Msg(Box<String>);

impl From<&str> for Msg {
    fn from(s: &str) -> Self {
        Msg(Box::new(s.to_string()))
    }
}

impl From<String> for Msg {
    fn from(s: String) -> Self {
        Msg(Box::new(s))
    }
}

impl From<Msg> for String {
    fn from(m: Msg) -> Self {
        *m.0
    }
}

// Every handler returns a `Flow`: keep it small.
const _: () = assert!(std::mem::size_of::<Flow>() <= 16);

/// The translator, unless `VIREO_EMU_JIT=off`; `VIREO_EMU_JIT=N` sets
/// how often a block runs before it is translated.
#[cfg(target_arch = "x86_64")]
fn jit_wanted() -> Option<Box<crate::jit::Jit>> {
    let mut jit = crate::jit::Jit::new();
    match std::env::var("VIREO_EMU_JIT").as_deref() {
        Ok("off" | "no" | "false") => return None,
        Ok(n) => {
            if let Ok(n) = n.parse() {
                jit.hot = n;
            }
        }
        Err(_) => {}
    }
    Some(Box::new(jit))
}

/// What [`Cpu::run_translated`] did.
#[cfg(target_arch = "x86_64")]
enum Translated {
    /// Nothing: interpret the block.
    NotRun,
    /// Ran to the end of this block (chained from the one asked for, or
    /// that one), RIP written.
    Done(Rc<Block>),
    /// Go on interpreting this block from this instruction.
    Resume(Rc<Block>, usize),
}

/// Registers saved before each instruction, restored when it does not
/// complete.
struct Snapshot {
    rip: u64,
    rflags: u64,
    gpr: [u64; 16],
}

/// Input the VMM supplied for an instruction that is being restarted.
#[derive(Debug, Clone)]
struct Response {
    key: Exit,
    data: [u8; MAX_IO_LEN],
}

/// One software x86-64 CPU.
pub struct Cpu {
    /// Architectural state. Writing CR0/CR3/CR4 or paging structures behind
    /// the emulator's back requires [`Cpu::flush_tlb`].
    pub state: CpuState,
    pub(crate) mem: Arc<dyn GuestMemory>,
    pub(crate) tlb: Tlb,
    pub(crate) icache: DecodeCache,
    pub(crate) cpuid: Vec<CpuidEntry>,
    /// Debug registers DR0-DR7 (stored, breakpoints are not implemented).
    pub(crate) dr: [u64; 8],
    /// RIP after the current instruction; branches overwrite it.
    pub(crate) next_rip: u64,
    /// An exit to report once the current instruction has completed.
    pub(crate) exit_after: Option<Exit>,
    /// MMIO writes not yet reported to the VMM.
    pub(crate) mmio_writes: VecDeque<(u64, [u8; MAX_IO_LEN], u8)>,
    responses: Vec<Response>,
    resp_idx: usize,
    /// The last exit asked the VMM for input (IoIn/MmioRead).
    awaiting_input: Option<Exit>,
    pub(crate) io_buf: [u8; MAX_IO_LEN],
    pub(crate) halted: bool,
    /// Interrupts are inhibited for one instruction (after STI / MOV SS).
    pub(crate) int_shadow: bool,
    pending_irq: Option<u8>,
    warned: HashSet<(u64, u32)>,
    /// The VM's interrupt controllers and timer, when the CPU is part of
    /// an [`crate::EmuVm`].
    pub(crate) link: Option<crate::platform::CpuLink>,
    /// Waiting for a STARTUP IPI (an AP after reset or INIT).
    pub(crate) wait_sipi: bool,
    pub(crate) nmi_pending: bool,
    /// An NMI handler runs: further NMIs wait for the next IRET.
    pub(crate) nmi_blocked: bool,
    /// TSC = platform nanoseconds + offset (with a platform).
    pub(crate) tsc_offset: u64,
    /// Code size of the last decoded instruction: a change flushes the
    /// decode cache.
    last_bits: u32,
    /// Decoded blocks checked against guest memory in this epoch run
    /// without another check (see [`crate::decode`]); bumped by
    /// [`Cpu::code_sync`].
    pub(crate) code_epoch: u64,
    /// Instructions run since the last [`Cpu::code_sync`].
    since_sync: u64,
    /// The last run returned an exit the VMM acts on (I/O, MMIO, ...): the
    /// next run starts a new code epoch.
    sync_on_run: bool,
    pub(crate) atomic: Option<AtomicOp>,
    /// The translator of hot blocks (`None`: interpret everything).
    #[cfg(target_arch = "x86_64")]
    pub(crate) jit: Option<Box<crate::jit::Jit>>,
}

impl Cpu {
    /// A CPU in the architectural reset state, reading and writing guest
    /// memory through `mem`, presenting [`crate::supported_cpuid`].
    pub fn new(mem: Arc<dyn GuestMemory>) -> Self {
        Cpu {
            state: CpuState::default(),
            mem,
            tlb: Tlb::new(),
            icache: DecodeCache::new(),
            cpuid: crate::exec::system::supported_cpuid(),
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            next_rip: 0,
            exit_after: None,
            mmio_writes: VecDeque::new(),
            responses: Vec::new(),
            resp_idx: 0,
            awaiting_input: None,
            io_buf: [0; MAX_IO_LEN],
            halted: false,
            int_shadow: false,
            pending_irq: None,
            warned: HashSet::new(),
            link: None,
            wait_sipi: false,
            nmi_pending: false,
            nmi_blocked: false,
            tsc_offset: 0,
            last_bits: 64,
            code_epoch: 1,
            since_sync: 0,
            sync_on_run: false,
            atomic: None,
            #[cfg(target_arch = "x86_64")]
            jit: jit_wanted(),
        }
    }

    /// Translate blocks to host code after they ran `hot` times (`None`:
    /// never, the interpreter alone). The default is on, after
    /// [`crate::jit::HOT`] runs, unless `VIREO_EMU_JIT=off`; tests use 0 to
    /// translate everything at once. Without effect on hosts other than
    /// x86-64, which always interpret.
    pub fn set_jit(&mut self, hot: Option<u32>) {
        #[cfg(target_arch = "x86_64")]
        {
            self.jit = hot.map(|n| {
                let mut j = crate::jit::Jit::new();
                j.hot = n;
                Box::new(j)
            });
            self.icache.invalidate_all();
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hot;
    }

    /// Instructions retired by translated code so far.
    pub fn translated_instructions(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            self.jit.as_ref().map_or(0, |j| j.stats.retired)
        }
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    /// The data buffer of the last I/O or MMIO exit.
    pub fn io_data(&self) -> &[u8; MAX_IO_LEN] {
        &self.io_buf
    }

    /// The last exit asked for input (IN, MMIO read) that the next `run`
    /// consumes, or MMIO writes wait to be reported: the instruction is not
    /// complete yet (see `Vcpu::complete_pending_io`).
    pub fn io_pending(&self) -> bool {
        self.awaiting_input.is_some() || !self.mmio_writes.is_empty()
    }

    /// The data buffer to fill after [`Exit::IoIn`] or [`Exit::MmioRead`].
    pub fn io_data_mut(&mut self) -> &mut [u8; MAX_IO_LEN] {
        &mut self.io_buf
    }

    /// Forget every cached translation and decoded instruction: call after
    /// changing `state` control registers or after the VMM wrote page
    /// tables directly. (Guest code written behind the emulator's back
    /// needs no call: decoded blocks are checked against guest memory, see
    /// [`crate::decode`].)
    pub fn flush_tlb(&mut self) {
        self.tlb.flush_all();
        self.icache.invalidate_all();
    }

    /// Drop the host pointers this CPU keeps for writing RAM pages, so
    /// that its next write to each page marks it dirty again (see
    /// [`crate::memory::GuestMemory::mark_dirty`]). Call it while the CPU
    /// does not run, before taking the dirty log.
    pub fn drop_fast_writes(&mut self) {
        self.tlb.fast.flush_writes();
    }

    /// Replace the CPUID table. Feature bits the emulator does not implement
    /// are cleared, whatever the caller asks for.
    pub fn set_cpuid(&mut self, entries: &[CpuidEntry]) {
        self.cpuid = crate::exec::system::filter_cpuid_with(entries, self.link.is_some());
    }

    /// Queue an external interrupt; it is delivered once RFLAGS.IF allows.
    /// Returns false if one is already pending.
    pub fn inject_interrupt(&mut self, vector: u8) -> bool {
        if self.pending_irq.is_some() {
            return false;
        }
        self.pending_irq = Some(vector);
        true
    }

    /// Start a new code epoch: every decoded block is checked against
    /// guest memory again before it next runs, so code written by devices,
    /// the VMM or other vCPUs is seen from here on.
    #[inline]
    pub(crate) fn code_sync(&mut self) {
        self.code_epoch = self.code_epoch.wrapping_add(1);
        self.since_sync = 0;
    }

    /// A serializing instruction (IRET, CPUID): code other vCPUs wrote is
    /// seen from here on (the x86 rule for cross-modifying code). A vCPU
    /// alone in its VM has no other vCPU, so nothing changes: Linux's
    /// `sync_core()` (an IRET to itself after every kernel text patch, about
    /// 100,000 times in a boot) then costs no re-check of decoded code.
    /// Writes by devices and the VMM are covered by the other epoch starts
    /// (exits, interrupts, [`CODE_SYNC_INSTRS`]). A CPU without a platform
    /// (used alone or in tests with others sharing its memory) always
    /// starts a new epoch.
    #[inline]
    pub(crate) fn serialize(&mut self) {
        if self
            .link
            .as_ref()
            .is_none_or(|l| l.platform.cpu_count() != 1)
        {
            self.code_sync();
        }
    }

    /// Run at most `budget` instructions.
    pub fn run(&mut self, budget: u64) -> Exit {
        // After an exit the VMM handled (an I/O or MMIO access, which may
        // be a device's status read), guest memory may hold code the
        // device or the VMM wrote.
        if self.sync_on_run {
            self.code_sync();
        }
        let exit = self.run_budget(budget);
        self.sync_on_run = exit != Exit::BudgetExhausted;
        exit
    }

    fn run_budget(&mut self, budget: u64) -> Exit {
        if let Some(key) = self.awaiting_input.take() {
            self.responses.push(Response {
                key,
                data: self.io_buf,
            });
        }
        let mut left = budget;
        while left > 0 {
            if let Some(exit) = self.report_mmio_write() {
                return exit;
            }
            let before = left;
            let exit = self.step(&mut left);
            // No block goes unchecked for more than CODE_SYNC_INSTRS
            // instructions (a guest polling for a device's write).
            self.since_sync += before - left;
            if self.since_sync >= CODE_SYNC_INSTRS {
                self.code_sync();
            }
            if let Some(exit) = exit {
                return exit;
            }
        }
        self.report_mmio_write().unwrap_or(Exit::BudgetExhausted)
    }

    fn report_mmio_write(&mut self) -> Option<Exit> {
        let (gpa, data, len) = self.mmio_writes.pop_front()?;
        self.io_buf = data;
        Some(Exit::MmioWrite { gpa, len })
    }

    /// Accept pending events, then execute one block of instructions (at
    /// most `*left`, counted down). Returns an exit the VMM must see.
    fn step(&mut self, left: &mut u64) -> Option<Exit> {
        if self.link.is_some() {
            if let Some(exit) = self.platform_events() {
                return Some(exit);
            }
        } else if self.state.flag(rflags::IF) && !self.int_shadow {
            if let Some(vector) = self.pending_irq.take() {
                self.halted = false;
                let rip = self.state.rip;
                if let Some(exit) = self.deliver_or_shutdown(
                    vector,
                    None,
                    rip,
                    crate::exceptions::EventKind::External,
                ) {
                    return Some(exit);
                }
            }
        }
        self.int_shadow = false;
        if self.halted || self.wait_sipi {
            return Some(Exit::Halt);
        }
        let bits = self.state.code_bits();
        if bits != self.last_bits {
            self.icache.invalidate_all();
            self.last_bits = bits;
        }
        let prev = self.icache.last.take();
        let block = match self.block_at(bits, prev.as_deref()) {
            Ok(Some(b)) => b,
            Ok(None) => {
                // An instruction across a page boundary: decoded alone.
                *left -= 1;
                let snap = self.snapshot();
                let result = self.fetch_decode().and_then(|instr| {
                    self.next_rip = instr.next_ip();
                    crate::exec::dispatch::execute(self, &instr)
                });
                return self.finish(result, snap);
            }
            Err(trap) => {
                *left -= 1;
                let snap = self.snapshot();
                return self.finish(Err(trap), snap);
            }
        };
        let generation = self.icache.generation;
        let rip_mask = if self.state.long_mode_64() {
            u64::MAX
        } else {
            0xffff_ffff
        };
        #[cfg(target_arch = "x86_64")]
        let (block, start) = match self.run_translated(&block, bits, left) {
            Translated::Done(last) => {
                self.icache.last = Some(last);
                return None;
            }
            Translated::Resume(last, k) => (last, k),
            Translated::NotRun => (block, 0),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let start = 0;
        for op in block.ops[start..].iter() {
            if *left == 0 {
                break;
            }
            *left -= 1;
            let snap = if op.save {
                Some(self.snapshot())
            } else {
                self.resp_idx = 0;
                None
            };
            let next = op.instr.next_ip();
            self.next_rip = next;
            let result = (op.run)(self, &op.instr);
            if result.is_ok() {
                self.state.rip = self.next_rip & rip_mask;
                self.state.tsc = self.state.tsc.wrapping_add(1);
                if !self.responses.is_empty() {
                    self.responses.clear();
                }
                if self.exit_after.is_some() {
                    return self.exit_after.take();
                }
                // Go on with the next instruction only while it is the
                // one decoded after this one and nothing needs a look
                // between instructions.
                if self.next_rip != next {
                    // A taken branch: the next block may be chained.
                    self.icache.last = Some(block);
                    return None;
                }
                if self.icache.generation != generation
                    || self.int_shadow
                    || self.halted
                    || !self.mmio_writes.is_empty()
                {
                    return None;
                }
            } else {
                // Without a saved copy nothing was written: the registers
                // are those before the instruction.
                let snap = snap.unwrap_or(Snapshot {
                    rip: self.state.rip,
                    rflags: self.state.rflags,
                    gpr: self.state.gpr,
                });
                return self.finish(result, snap);
            }
        }
        // The block ran to its end (or to the budget's).
        self.icache.last = Some(block);
        None
    }

    /// Run the host code of `block` (and of blocks chained to it) if it
    /// has or now gets some.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn run_translated(&mut self, block: &Rc<Block>, bits: u32, left: &mut u64) -> Translated {
        let user = self.user_access(crate::mmu::Privilege::Current);
        let Some(jit) = self.jit.as_mut() else {
            return Translated::NotRun;
        };
        let entry = if bits != 64
            || (*left as usize) < block.ops.len()
            || self.state.rflags & rflags::TF != 0
            || self.atomic.is_some()
        {
            None
        } else {
            jit.code(block, user)
        };
        let generation = self.icache.generation;
        let Some(entry) = entry else {
            jit.forget_pending();
            return Translated::NotRun;
        };
        let epochs = (generation, self.tlb.epoch);
        jit.chain(block, entry, self.state.rip, epochs);
        // Chained blocks run without the dispatcher: still come back for a
        // new code epoch every CODE_SYNC_INSTRS instructions (see
        // `crate::decode`).
        let budget = (*left).min(
            CODE_SYNC_INSTRS
                .saturating_sub(self.since_sync)
                .max(block.ops.len() as u64),
        );
        // SAFETY: `entry` is this CPU's translation of `block`, current and
        // for this privilege (`Jit::code`), run with this CPU's state and
        // fast tables; `block` is alive (held here).
        let (last, retired, resume) = unsafe {
            jit.run(
                entry,
                block,
                &mut self.state,
                [self.tlb.fast.read.as_ptr(), self.tlb.fast.write.as_ptr()],
                budget,
                epochs,
            )
        };
        *left -= retired;
        self.state.tsc = self.state.tsc.wrapping_add(retired);
        let last = if std::ptr::eq(last, Rc::as_ptr(block)) {
            block.clone()
        } else {
            // SAFETY: `last` is a block chained from `block`, on its page:
            // the decode cache holds an `Rc` of it (see `Jit::chain`); the
            // new strong count is owned by the `Rc` made here.
            unsafe {
                Rc::increment_strong_count(last);
                Rc::from_raw(last)
            }
        };
        match resume {
            None => Translated::Done(last),
            Some(k) => {
                if let Some(op) = last.ops.get(k) {
                    self.state.rip = op.instr.ip();
                }
                Translated::Resume(last, k)
            }
        }
    }

    /// The registers an instruction that does not complete restores.
    #[inline(always)]
    fn snapshot(&mut self) -> Snapshot {
        self.resp_idx = 0;
        Snapshot {
            rip: self.state.rip,
            rflags: self.state.rflags,
            gpr: self.state.gpr,
        }
    }

    /// Complete (or roll back) the instruction that started at `snap`.
    fn finish(&mut self, result: Flow, snap: Snapshot) -> Option<Exit> {
        let Snapshot {
            rip: start_rip,
            rflags: start_flags,
            gpr: start_gpr,
        } = snap;
        match result {
            Ok(()) => {
                self.state.rip = if self.state.long_mode_64() {
                    self.next_rip
                } else {
                    self.next_rip & 0xffff_ffff
                };
                self.state.tsc = self.state.tsc.wrapping_add(1);
                self.responses.clear();
                self.exit_after.take()
            }
            Err(Trap::NeedInput(exit)) => {
                self.state.rip = start_rip;
                self.state.rflags = start_flags;
                self.state.gpr = start_gpr;
                self.awaiting_input = Some((*exit).clone());
                Some(*exit)
            }
            Err(Trap::Retry) => {
                self.state.rip = start_rip;
                self.state.rflags = start_flags;
                self.state.gpr = start_gpr;
                self.responses.clear();
                self.exit_after = None;
                None
            }
            Err(Trap::Exception { vector, error }) => {
                self.responses.clear();
                self.exit_after = None;
                self.state.rip = start_rip;
                self.state.rflags = start_flags;
                self.state.gpr = start_gpr;
                self.deliver_or_shutdown(
                    vector,
                    error,
                    start_rip,
                    crate::exceptions::EventKind::Fault,
                )
            }
            Err(Trap::Internal(why)) => {
                self.state.rip = start_rip;
                Some(Exit::InternalError(why.into()))
            }
        }
    }

    /// Input for the `resp_idx`-th input request of the current instruction
    /// if the VMM already supplied it, or the trap that asks for it.
    pub(crate) fn take_input(&mut self, key: Exit, out: &mut [u8]) -> Flow {
        if let Some(r) = self.responses.get(self.resp_idx) {
            if r.key == key {
                self.resp_idx += 1;
                let n = out.len().min(MAX_IO_LEN);
                out[..n].copy_from_slice(&r.data[..n]);
                return Ok(());
            }
        }
        // A restarted instruction asked for something else: drop stale input.
        self.responses.truncate(self.resp_idx);
        Err(Trap::NeedInput(Box::new(key)))
    }

    /// Log an unimplemented instruction once per (RIP, opcode) and raise #UD.
    pub(crate) fn unimplemented(&mut self, instr: &iced_x86::Instruction) -> Flow {
        if self.warned.len() < 4096 && self.warned.insert((instr.ip(), instr.code() as u32)) {
            tracing::warn!(
                rip = format_args!("{:#x}", instr.ip()),
                opcode = ?instr.code(),
                "emulator: unimplemented instruction, raising #UD"
            );
        }
        Err(Trap::Exception {
            vector: crate::exceptions::UD,
            error: None,
        })
    }
}
