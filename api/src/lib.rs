//! The vocabulary every vireo layer shares, and the contract between its
//! processes: units ([`units`]), and (as the architecture step lands) the VM
//! definition with its one validation, the REST API's types, the
//! control-socket commands and replies, and the API client.
//!
//! It is a leaf crate: it depends on no other vireo crate and on no
//! hypervisor crate (no KVM bindings, no guest memory), so the daemon, the
//! CLI and the tests can speak to VMs without linking a VMM, and the VM core
//! can take its sizes in the same types the front ends parsed.

pub mod units;
