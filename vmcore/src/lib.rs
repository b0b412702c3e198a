//! The vireo VM core: guest memory, Linux boot, vCPU threads, the I/O buses
//! and the run loop, over any backend of `vireo-hypervisor`; snapshots, and
//! the device lifecycle seam every device implements
//! ([`snapshot::device`]: `Pausable`, `Snapshottable` with a typed,
//! versioned state, and the machine's ordered `DeviceList`).
//!
//! It depends on the hypervisor layer (and the sandbox's thread filters)
//! and on `vireo-api` for what it shares with every layer: the units
//! ([`vireo_api::units::MemorySize`]), the limits and the one check of a
//! VM definition, the host's memory. Device models, the VMM, the CLI and
//! the control plane build on it, never the other way round. Where guest
//! RAM is, is [`memory::RamLayout`]: read it, do not re-derive it.

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
