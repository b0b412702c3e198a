//! Software x86-64 CPU for vireo: the emulator backend behind
//! `vireo-hypervisor`'s traits (QEMU TCG's role). It depends only on
//! `vireo-hypervisor`; never on the VM core, devices or front ends.
//!
//! # Layout
//! - [`cpu`]: architectural state ([`cpu::state`]), flag computation
//!   ([`cpu::flags`]) and the run loop ([`Cpu::run`]) with its [`Exit`]s.
//! - [`memory`]: guest physical memory ([`GuestMemory`], [`PhysMemory`]);
//!   anything that is not RAM becomes an MMIO exit.
//! - [`mmu`]: 4-level paging, permission checks, A/D bits, software TLB.
//! - [`decode`]: iced-x86 decoding and the per-physical-page decode cache.
//! - [`exec`]: instruction semantics, one file per group.
//! - [`exceptions`]: delivery through the 64-bit IDT, #DF and triple fault.
//! - [`vcpu`]: [`vireo_hypervisor::Vcpu`] for an emulated CPU.
//!
//! # State of the backend
//! Implemented: 64-bit long mode (the mode vireo's boot protocol enters),
//! the integer instruction set a kernel needs, system instructions, paging,
//! exceptions, port I/O and MMIO exits, an SSE2 integer/logic subset.
//! CPUID advertises only what is implemented (no x87/MMX/FXSR/SSE/SSE2,
//! XSAVE, APIC, SEP yet), so a stock kernel does not boot yet.
//!
//! **Not yet here** (next sessions): `Hypervisor` and `Vm` implementations.
//! They need the interrupt controllers (LAPIC, IOAPIC, PIC) and the PIT in
//! software, which do not exist yet; until then [`vcpu::EmuVcpu`] gives the
//! CPU side of the `Vcpu` trait and [`Cpu::inject_interrupt`] is the hook an
//! interrupt controller will use. Also missing: real mode, compatibility
//! mode and legacy/PAE paging, x87, the rest of SSE, TF/debug breakpoints,
//! the TSS I/O permission bitmap, and SMP atomicity of LOCKed instructions.
//!
//! # Testing
//! `tests/differential.rs` runs the same instruction bytes natively on the
//! host CPU and on the emulator and compares GPRs, defined RFLAGS bits, XMM
//! registers and memory (`VIREO_DIFF_SEED` replays a run,
//! `VIREO_DIFF_CASES` scales it); `tests/e2e.rs` runs small guest programs
//! (serial output, MMIO, #PF/#GP/#DE/#UD frames, triple fault, SYSCALL,
//! self-modifying code); `tests/robustness.rs` runs random bytes
//! (`VIREO_FUZZ_RUNS`).
//!
//! Guest input is hostile: nothing derived from guest state may panic the
//! host. Unimplemented instructions raise #UD in the guest and are logged
//! once per (RIP, opcode).

pub mod cpu;
pub mod decode;
pub mod exceptions;
pub mod exec;
pub mod memory;
pub mod mmu;
pub mod vcpu;

pub use cpu::state::CpuState;
pub use cpu::{Cpu, Exit, MAX_IO_LEN};
pub use exec::system::{filter_cpuid, supported_cpuid};
pub use memory::{GuestMemory, MemoryError, PhysMemory};
pub use vcpu::EmuVcpu;
