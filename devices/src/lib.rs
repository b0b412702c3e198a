//! Device models for vireo guests: the legacy PC platform devices (16550
//! UART, i8042, CMOS RTC, ACPI PM registers, reset control), the PCI host
//! bridge, and virtio devices over their PCI transport.
//!
//! Devices plug into the VM core's buses (`vireo_vmcore::BusDevice`) and
//! treat everything the guest writes as hostile. Their configurations (and
//! the `key=value` options they are parsed from) are `vireo_api::devices`,
//! shared with the front ends. Every device with state
//! takes part in snapshots and migration through the VM core's lifecycle
//! seam (`vireo_vmcore::snapshot::device`): `Pausable` and `Snapshottable`
//! with its own typed, versioned state; a virtio device adds only its own
//! state, the transport saves the common virtio state around it.
//!
//! This crate depends on the VM core, the hypervisor seam, the image
//! formats (`vireo-block`), the sandbox and `vireo-api`; never on a front
//! end or the VMM that wires the devices into a machine.

#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;
