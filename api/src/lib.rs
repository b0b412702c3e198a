//! The vocabulary every vireo layer shares, and the contract between its
//! processes: units ([`units`]), the device option parser ([`options`]) and
//! the device configurations it fills ([`devices`]), and the limits and
//! checks of a VM definition ([`vm`]) that `vireo run`, the VM core and the
//! daemon all apply; the REST API's types ([`model`]), the control-socket
//! commands and replies between the daemon and a VM process ([`control`]),
//! and (with the `client` feature) the API client the CLI, the daemon and
//! the tests share.
//!
//! It is a leaf crate: it depends on no other vireo crate and on no
//! hypervisor crate (no KVM bindings, no guest memory), so the daemon, the
//! CLI and the tests can speak to VMs without linking a VMM, and the VM core
//! can take its sizes in the same types the front ends parsed.

#[cfg(feature = "client")]
pub mod client;
pub mod control;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod model;
pub mod options;
pub mod units;
pub mod vm;
