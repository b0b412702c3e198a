//! Per-thread seccomp filters for a `vireo run` process.
//!
//! Every thread of the VM process runs under a filter made for its kind
//! ([`ThreadKind`]): a vCPU may run KVM but not open files, a disk's
//! thread may read and write its image but not make sockets, and so on.
//! The allowed syscalls and their argument conditions are data, in one
//! reviewed place ([`tables`]); they are compiled to BPF once, by
//! [`enable`]. A syscall outside a thread's filter kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): a VM whose thread misbehaves dies, it never
//! limps on with one thread gone.
//!
//! How it is used:
//! - the binary calls [`enable`] early, before it starts any thread;
//! - each thread calls [`apply`] with its kind as its first action, or is
//!   started by [`spawn`], which does that (and, once the calling thread is
//!   filtered, starts the thread from the launcher: see below);
//! - the main thread calls [`apply`]`(ThreadKind::Main)` last, once set-up
//!   is done.
//!
//! [`apply`] and [`spawn`] do nothing special until [`enable`] is called,
//! so library users and in-process unit tests run unfiltered.
//!
//! Why a launcher: the kernel copies a thread's filter into the threads it
//! creates, and filters stack (a syscall must pass every one). A virtio
//! device thread started from a vCPU (the guest's driver activates the
//! device with an MMIO write) would run under the vCPU's filter *and* its
//! own: it could do only what both allow. So threads started after their
//! parent is filtered are created by one launcher thread, whose filter is
//! exactly the union of the kinds it may start plus thread creation, and
//! which runs nothing but that.
//!
//! Filters are installed per thread (no TSYNC), after
//! `PR_SET_NO_NEW_PRIVS`. Development aid: `VIREO_SECCOMP_LOG=1` makes
//! violations logged by the kernel (`dmesg | grep type=1326`) instead of
//! fatal. Tests: `VIREO_TEST_FORBIDDEN_SYSCALL=KIND` (a
//! [`ThreadKind::label`]) makes the first thread of that kind issue a
//! syscall no filter allows right after installing its filter.
//!
//! The files: the thread kinds (`kinds.rs`), the tables (`tables.rs`),
//! their compilation to BPF (`compile.rs`) and the filters' installation
//! in the running process with the launcher (`install.rs`); this file
//! keeps the policy and the errors they share.

use std::io;

mod compile;
mod install;
mod kinds;
pub mod tables;

pub use compile::{compile, compile_supervisor, compile_with};
pub use install::{apply, apply_or_die, enable, is_enabled, spawn, start_launcher};
pub use kinds::{Device, ThreadKind};

/// What a violation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// Kill the whole process with SIGSYS (the default).
    KillProcess,
    /// Let the call through and have the kernel log it (development: finding
    /// what a new feature needs).
    Log,
}

/// The process-wide choice [`enable`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub on_violation: OnViolation,
    /// The jail's unprivileged ids, when the process drops to them after
    /// its threads are filtered: glibc makes every thread repeat
    /// `setgroups`/`setresgid`/`setresuid` (POSIX: ids are per process,
    /// Linux keeps them per thread), so each filter allows exactly these
    /// calls: no supplementary groups, and all three ids set to these.
    /// Nothing else: a thread can only drop to where the process goes.
    pub drop_to: Option<DropTo>,
}

/// The uid and gid [`Policy::drop_to`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropTo {
    pub uid: u32,
    pub gid: u32,
}

impl Policy {
    /// Kill on violation, or log with `VIREO_SECCOMP_LOG=1` (development).
    pub fn from_env() -> Policy {
        let log = std::env::var_os("VIREO_SECCOMP_LOG").is_some_and(|v| v != "0" && !v.is_empty());
        Policy {
            on_violation: if log {
                OnViolation::Log
            } else {
                OnViolation::KillProcess
            },
            drop_to: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for {kind} threads does not compile: {why}")]
    Compile { kind: ThreadKind, why: String },
    #[error("cannot install the seccomp filter of a {kind} thread: {why}")]
    Install { kind: ThreadKind, why: String },
    #[error("seccomp filters were already enabled with another policy")]
    AlreadyEnabled,
    #[error("a {kind} thread cannot be started once its parent is filtered (the launcher does not cover it)")]
    NotLaunchable { kind: ThreadKind },
    #[error("the seccomp launcher thread is gone")]
    LauncherGone,
    #[error("cannot start the seccomp launcher thread: {0}")]
    Launcher(io::Error),
}

#[cfg(test)]
mod tests;
