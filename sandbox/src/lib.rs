//! What contains a vireo VM process, so that a guest which owns its vCPU
//! and device threads owns nothing else on the host: per-thread seccomp
//! filters ([`seccomp`]: the thread kinds, the reviewed tables, their
//! compilation and installation), the jail ([`jail`], one concept a file:
//! namespaces, the supervisor, a private root, an unprivileged uid/gid,
//! no capabilities, rlimits, Landlock) and cgroup limits ([`cgroup`], v2
//! and v1).
//!
//! It is a leaf crate: it depends on no other vireo crate, so every layer
//! (the VM core's vCPU threads, the device workers, the binary) can put its
//! threads under a filter.

pub mod cgroup;
pub mod jail;
pub mod seccomp;
