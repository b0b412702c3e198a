//! The paravirtual devices' configurations, as a VM definition gives them:
//! each is parsed from the option string of one device (`vireo run --disk
//! …`, the API's `disks[i]`), so the CLI and the daemon accept and refuse
//! exactly the same things. The device models (`vireo-devices`) take these
//! types; nothing here opens a file or a socket.

pub mod balloon;
pub mod block;
pub mod console;
pub mod mac;
pub mod net;
pub mod rate;
pub mod rng;
pub mod vsock;
