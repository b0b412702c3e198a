//! `vireo-vmm`: the virtual machine monitor as a library. It holds what
//! runs one VM in this process: the standard machine (the VM core with
//! the legacy devices and the PCI host bridge, [`machine`]), its virtio
//! devices ([`devices`]), the backend factory ([`backend`]), the start
//! sequence ([`start`]: boot, or a restore through [`restore`], or an
//! incoming migration through [`incoming`]), the control-socket server and
//! the commands it carries out (`control_socket`, `run`), the virtio
//! devices in snapshots ([`snapshot_devices`]), live migration, pre-copy
//! and post-copy ([`migrate`]), and the host's network from inside a jail
//! ([`host_net`]).
//!
//! A front end describes the VM with a typed [`VmSpec`] and drives it
//! with [`Vmm`]; errors are enums per module that name the thing (the
//! disk, the snapshot, the peer, the file, the vCPU count), and the front
//! end says which flag or field it came from. Layering: vmm -> devices,
//! block, vmcore, hypervisor, emulator, sandbox, api. It must never depend on a
//! front end: no clap, no daemon, no HTTP, nothing of the `vireo` binary.

pub mod backend;
mod control_socket;
pub mod devices;
pub mod host_net;
pub mod incoming;
pub mod machine;
pub mod migrate;
pub mod restore;
mod run;
pub mod snapshot_devices;
pub mod start;
mod stdout;

pub use start::{Error, Frontend, GuestConsole, Start, VmSpec, Vmm};
