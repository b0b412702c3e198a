//! The vireo VM core: guest memory, Linux boot, vCPU threads, the I/O buses
//! and the run loop, over any backend of `vireo-hypervisor`.
//!
//! It depends only on the hypervisor layer and on `vireo-api` (the limits
//! and the one check of a VM definition, the host's memory); device models,
//! the CLI and the control plane build on it, never the other way round.

pub mod boot;
pub mod bus;
pub mod control;
pub mod demand;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod snapshot;
pub mod uffd;
pub mod vcpu;
pub mod vm;

pub use bus::{BusDevice, SharedDevice};
pub use control::{ExitReason, RunState, VmControl};
pub use vm::{RunningVm, Vm, VmConfig, VmError};
