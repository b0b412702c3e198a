//! Device models for vireo guests: the legacy PC platform devices now
//! (16550 UART, i8042, CMOS RTC, ACPI PM registers, reset control), virtio
//! later.
//!
//! Devices plug into the VM core's buses (`vireo_vmcore::BusDevice`) and
//! treat everything the guest writes as hostile. Their configurations (and
//! the `key=value` options they are parsed from) are `vireo_api::devices`,
//! shared with the front ends. This crate never depends on a front end.

#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;
