//! Software x86-64 CPU for vireo: the emulator backend behind
//! `vireo-hypervisor`'s traits (QEMU TCG's role). It depends only on
//! `vireo-hypervisor`; never on the VM core, devices or front ends.
//!
//! # Layout
//! - [`hv`]: [`EmuHypervisor`] → [`EmuVm`] → [`EmuVcpu`], the complete
//!   backend (`Hypervisor`/`Vm`/`Vcpu`): shared guest RAM registered by
//!   `map_memory`, `create_vcpu`, `interrupt_line(gsi)`.
//! - [`platform`]: the software PC platform of a VM: local APIC per vCPU
//!   ([`platform::lapic`]), I/O APIC ([`platform::ioapic`]), 8259 pair
//!   ([`platform::pic`]), 8254 PIT ([`platform::pit`]) and their routing.
//! - [`cpu`]: architectural state ([`cpu::state`]), flag computation
//!   ([`cpu::flags`]) and the run loop ([`Cpu::run`]) with its [`Exit`]s;
//!   `cpu/events.rs` is the CPU's side of the platform (interrupt, NMI,
//!   INIT/SIPI acceptance, HLT sleeps, the TSC on host time).
//! - [`memory`]: guest physical memory ([`GuestMemory`], [`PhysMemory`]);
//!   anything that is not RAM (or the platform's) becomes an MMIO exit.
//! - [`mmu`]: 4-level paging, permission checks, A/D bits, software TLB
//!   and its fast tables of host page addresses per access kind.
//! - [`decode`]: iced-x86 decoding (16/32/64-bit) into blocks (runs of
//!   instructions up to a control transfer, each with its handler chosen
//!   once) and their per-physical-page cache, kept coherent with code
//!   written by devices, the VMM and other vCPUs by checking each block's
//!   bytes against guest memory once per code epoch (no VMM hook needed).
//! - [`exec`]: instruction semantics, one file per group.
//! - `jit` (x86-64 hosts): hot blocks translated to host code, the
//!   guest's integer instructions re-encoded to run natively with glue for
//!   registers, the software TLB and flags; the interpreter runs the rest.
//! - [`exceptions`]: delivery through the real-mode IVT, the 32-bit IDT and
//!   the 64-bit IDT, #DF and triple fault.
//! - [`vcpu`]: [`vireo_hypervisor::Vcpu`] for an emulated CPU.
//!
//! # Using it as a backend
//! `EmuHypervisor::new()` is a `Hypervisor` (name `"emu"`, 64 vCPUs).
//! Its VMs handle the LAPIC page (APIC_BASE, default 0xFEE00000), the
//! IOAPIC page (0xFEC00000) and ports 0x20/0x21, 0xA0/0xA1, 0x4D0/0x4D1,
//! 0x40-0x43 and 0x61 themselves; they never reach the VMM. vCPU i has
//! APIC id i; vCPU 0 starts runnable, the others wait for INIT/SIPI.
//! `Vcpu::run` executes in slices of 2048 instructions and returns
//! `VcpuExit::Interrupted` at least every millisecond
//! ([`vcpu::RUN_SLICE_TIME`]) — also while halted or waiting for SIPI, and
//! at once after [`Kicker::kick`] (from [`EmuVcpu::kicker`]) — so a VMM's
//! pause/stop works without signals. HLT sleeps on the LAPIC until an
//! interrupt, a timer or the end of the slice; `cli; hlt` is a stopped CPU
//! and never reports `VcpuExit::Halt`. Timers are polled by the vCPU
//! threads (no platform thread): ~1 ms granularity while halted.
//! `InterruptLine::trigger` pulses IOAPIC pin `gsi` and, for gsi < 16,
//! the PIC line; `InterruptLine::eventfd` is not supported.
//!
//! # State of the backend
//! Implemented: real mode (segment arithmetic, IVT delivery, far
//! JMP/CALL/RET/IRET), 16- and 32-bit protected mode without paging
//! (descriptor loads, 32-bit IDT gates at the same privilege), compatibility
//! mode and 64-bit long mode with 4-level paging, so an AP trampoline can go
//! real → protected → long mode (CR0.PE, LGDT/LIDT, far jumps, CR4.PAE,
//! EFER.LME, CR0.PG); the integer instruction set a kernel needs, system
//! instructions, exceptions, port I/O and MMIO exits. LOCKed
//! read-modify-writes (and XCHG with memory) are host compare-and-swaps on
//! aligned RAM, so spinlocks work across vCPU threads. The local APIC: ID,
//! version, TPR/PPR, EOI (with the level EOI broadcast to the IOAPIC),
//! LDR/DFR (flat and cluster), SVR, ISR/IRR/TMR, ESR, ICR (fixed, lowest
//! priority, NMI, INIT, STARTUP; physical, logical, shorthands), LVT timer
//! (one-shot, periodic, TSC-deadline) on host time at a 1 GHz bus clock,
//! LINT0 ExtINT (BSP only, as KVM), LVT error; CR8 is the TPR. The TSC runs
//! at 1 GHz of host time.
//!
//! Floating point and SIMD ([`exec::x87`], [`exec::sse`], [`exec::float`]):
//! - **x87**: the register stack with TOP and tags, FCW/FSW (exception
//!   flags, SF, C0-C3, ES/B), FNINIT/FINIT, FLDCW/FNSTCW, FNSTSW (AX and
//!   m16), FNCLEX, FNSTENV/FLDENV and FNSAVE/FRSTOR (16- and 32-bit
//!   layouts, full tag word), FWAIT, FLD/FST/FSTP (m32, m64, m80, ST(i)),
//!   FILD/FIST/FISTP/FISTTP (m16/m32/m64), FLD1/FLDZ/FLDPI/FLDL2E/FLDL2T/
//!   FLDLG2/FLDLN2, FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR (all memory, register
//!   and popping forms, and the FI* integer forms), FCOM/FCOMP/FCOMPP/
//!   FUCOM*/FICOM*/FTST/FXAM, FCOMI/FCOMIP/FUCOMI/FUCOMIP, FCMOVcc, FXCH,
//!   FABS, FCHS, FFREE(P), FINCSTP/FDECSTP, FSQRT, FRNDINT. Values are
//!   80-bit; loads, stores (rounded per FCW.RC), integer conversions,
//!   moves, comparisons and FADD/FSUB/FMUL/FDIV (one rounding to FCW.PC
//!   and FCW.RC) are exact; FSQRT goes through f64 (exact at PC = 53
//!   bits for double-range values); denormal *results* are truncated
//!   rather than re-rounded. Stack overflow/underflow give the masked
//!   response (indefinite, SF, C1). Unmasked exceptions set ES and raise
//!   #MF (with CR0.NE) at the next waiting x87 instruction; the destination
//!   still gets the masked response. FIP/FDP/FOP are not tracked (saved as
//!   zero); C1 is not set on rounding up. Transcendentals (FSIN, FPTAN,
//!   F2XM1, FYL2X, ...), FPREM, FSCALE and FXTRACT are not implemented (#UD).
//! - **FXSAVE/FXRSTOR** (64-bit and legacy layouts, #GP when misaligned or
//!   on reserved MXCSR bits), LDMXCSR/STMXCSR (MXCSR_MASK 0xFFFF), EMMS.
//!   CR0.EM/TS/MP and CR4.OSFXSR/OSXMMEXCPT: x87 raises #NM with EM or TS,
//!   WAIT with TS and MP; SSE raises #UD with EM or without OSFXSR and #NM
//!   with TS; unmasked SIMD exceptions raise #XM (#UD without OSXMMEXCPT).
//! - **SSE/SSE2**: 128-bit, scalar and half moves (MOVAPS/UPS/APD/UPD,
//!   MOVDQA/DQU, MOVNTDQ/NTPS/NTPD/NTI, MOVSS/MOVSD, MOVLPS/HPS/LPD/HPD,
//!   MOVHLPS/LHPS, MOVD/MOVQ, MOVMSKPS/PD, PMOVMSKB); integer PADD*/PSUB*
//!   (wrapping and saturating), PCMPEQ*/PCMPGT*, PMIN/PMAX (UB, SW),
//!   PAVGB/W, PMULLW/PMULHW/PMULHUW/PMULUDQ/PMADDWD, PSADBW, logic, all
//!   PSLL/PSRL/PSRA forms, PSLLDQ/PSRLDQ, PSHUFD/PSHUFLW/PSHUFHW,
//!   PUNPCK*, PACKSSWB/PACKSSDW/PACKUSWB, PEXTRW (register), PINSRW;
//!   float ADD/SUB/MUL/DIV/SQRT/MIN/MAX/CMP (SS/SD/PS/PD), UCOMIS*/COMIS*,
//!   all CVT* between int32/int64/single/double, SHUFPS/SHUFPD,
//!   UNPCKLPS/HPS/LPD/HPD, ANDPS/PD, ANDNPS/PD, ORPS/PD, XORPS/PD;
//!   PREFETCH*, the fences, CLFLUSH.
//!   Results and MXCSR flags (IE, DE, ZE, OE, UE, PE) are exact (integer
//!   significand arithmetic or FMA/TwoSum residuals), under every rounding
//!   mode and with DAZ/FTZ, and compared against the host with random
//!   MXCSR settings. MMX register forms, MASKMOVDQU,
//!   RCPPS/RSQRTPS/RCPSS/RSQRTSS and SSE3+ are not implemented (#UD).
//!
//! CPUID advertises only what is implemented: FPU, FXSR, SSE, SSE2 (no
//! MMX), APIC and TSC-deadline for VM CPUs; no XSAVE, x2APIC, SEP, SSE3+,
//! BMI1 or LZCNT (so F3-prefixed BSF/BSR, decoded as TZCNT/LZCNT, run as
//! BSF/BSR, as Linux's `rep; bsf` expects). VERR/VERW/LAR/LSL are
//! implemented (Linux runs VERW on every return to user space as its MDS
//! mitigation on a CPU it does not know).
//!
//! **Linux**: Debian 12's stock 6.1 kernel boots to user space on one
//! vCPU: `vireo run --accel emu --image <kit> --append 'vireo.run=uname
//! -a'` boots the vmlinux the VMM unpacked from the bzImage (FPU "will
//! use FXSAVE"), runs the busybox initramfs, loads its 18 modules, prints
//! `uname -a` and powers off through ACPI S5, in about 7 s of host CPU in
//! a release build (`emulator/PERFORMANCE.md`).
//!
//! **Not yet here**: legacy (32-bit and PAE) paging, 32-bit
//! protected-mode interrupts to another privilege level, task switches,
//! call gates, virtual-8086 mode, segment limit checks, MMX, XSAVE/XRSTOR
//! (Linux falls back to FXSAVE), SSE3 and later, x2APIC, TF/debug
//! breakpoints, the TSS I/O permission bitmap, atomicity of LOCKed
//! accesses that are misaligned or cross pages (plain writes) and of
//! CMPXCHG16B, eventfd-backed interrupt lines, SMIs, the PIT's other
//! modes' interrupts (only channel 0 modes 0, 2 and 3 interrupt) and the PC
//! speaker. Speed: about 50 million instructions per second of host CPU
//! interpreted (release build), several times that for translated blocks
//! on x86-64 hosts (see `emulator/PERFORMANCE.md` for how it was measured
//! and what is next).
//! `VIREO_LOG=vireo_emulator=debug` logs each vCPU's RIP once a second.
//!
//! # Testing
//! `tests/platform.rs` boots tiny guests through the backend traits with a
//! small VMM loop (LAPIC periodic timer waking HLT, PIT channel 0 through
//! the IOAPIC and channel 2 TSC calibration, `interrupt_line(4)` through
//! the IOAPIC and through the PIC, INIT-SIPI-SIPI with a real-mode
//! trampoline on 2 and 4 vCPUs and one that switches to long mode, kicks and
//! halted runs returning `Interrupted` promptly, and seeded random writes to
//! every platform register, `VIREO_PLATFORM_FUZZ_SEED`).
//! `tests/differential.rs` runs the same instruction bytes natively on the
//! host CPU and on the emulator and compares GPRs, defined RFLAGS bits, XMM
//! registers, the x87 state and MXCSR (through FXSAVE images) and memory
//! for integer, SSE/SSE2 and x87 instructions, with random x87
//! precision/rounding control, TOP and tags and random MXCSR rounding,
//! DAZ and FTZ (`VIREO_DIFF_SEED` replays a run,
//! `VIREO_DIFF_CASES` scales it); `tests/e2e.rs` runs small guest programs
//! (serial output, MMIO, #PF/#GP/#DE/#UD frames, triple fault, SYSCALL,
//! self-modifying code, FXSAVE/FXRSTOR, FNSTENV/FNSAVE/FRSTOR, #NM/#UD/
//! #GP/#XM/#MF semantics of the FPU and SSE); `tests/robustness.rs` runs
//! random bytes (`VIREO_FUZZ_RUNS`); `tests/code_coherence.rs` rewrites cached code from
//! outside the executing vCPU (as a device, another vCPU, a thread during a
//! long run) and checks the new code runs.
//!
//! Guest input is hostile: nothing derived from guest state may panic the
//! host. Unimplemented instructions raise #UD in the guest and are logged
//! once per (RIP, opcode).

pub mod cpu;
pub mod decode;
pub mod exceptions;
pub mod exec;
#[doc(hidden)]
pub mod fuzzing;
pub mod hv;
#[cfg(target_arch = "x86_64")]
pub(crate) mod jit;
pub mod memory;
pub mod mmu;
pub mod platform;
pub mod vcpu;

pub use cpu::state::CpuState;
pub use cpu::{Cpu, Exit, MAX_IO_LEN};
pub use exec::system::{filter_cpuid, supported_cpuid, ARCH_CAPABILITIES};
pub use hv::{EmuHypervisor, EmuVm};
pub use memory::{GuestMemory, MemoryError, PhysMemory};
pub use vcpu::{EmuVcpu, Kicker};
