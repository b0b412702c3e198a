//! The VMM library (being moved here from the `vireo` binary).

pub mod control_socket;
pub mod devices;
pub mod machine;
pub mod migrate;
pub mod postcopy;
pub mod run;
pub mod snapshot_devices;
