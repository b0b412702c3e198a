//! The legacy PC devices every vireo x86 machine has.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod reset;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use i8042::I8042;
pub use reset::ResetControl;
pub use serial::{Serial, SerialInput};
