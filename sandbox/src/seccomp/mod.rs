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

pub mod tables;

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use tables::{Allow, Args};

/// The virtio device a worker thread serves (their syscalls differ: a
/// disk reads and writes its image, a vsock device makes Unix sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Block,
    Net,
    Vsock,
    Balloon,
    Rng,
    Console,
}

/// What a thread of a `vireo run` process does, which decides its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A KVM vCPU.
    Vcpu,
    /// A vCPU of vireo's emulator (its translator maps executable code).
    EmulatorVcpu,
    /// A virtio device's worker thread.
    Device(Device),
    /// The control socket's accept/read/reply thread.
    Control,
    /// Post-copy migration target threads (userfaultfd, the link).
    Migration,
    /// The stdin pump and the stop-signal watcher.
    Console,
    /// The main thread once set-up is done (control commands: snapshots,
    /// migration source; exit).
    Main,
    /// The thread that starts threads once their parent is filtered.
    Launcher,
    /// The jail's supervisor process (the VMM's parent outside its PID
    /// namespace): it forwards signals and reaps the VMM.
    Supervisor,
}

impl ThreadKind {
    /// Every kind, for compiling and checking them all.
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Vcpu,
        ThreadKind::EmulatorVcpu,
        ThreadKind::Device(Device::Block),
        ThreadKind::Device(Device::Net),
        ThreadKind::Device(Device::Vsock),
        ThreadKind::Device(Device::Balloon),
        ThreadKind::Device(Device::Rng),
        ThreadKind::Device(Device::Console),
        ThreadKind::Control,
        ThreadKind::Migration,
        ThreadKind::Console,
        ThreadKind::Main,
        ThreadKind::Launcher,
        ThreadKind::Supervisor,
    ];

    /// A short name (logs, `VIREO_TEST_FORBIDDEN_SYSCALL`).
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EmulatorVcpu => "emulator-vcpu",
            ThreadKind::Device(Device::Block) => "block",
            ThreadKind::Device(Device::Net) => "net",
            ThreadKind::Device(Device::Vsock) => "vsock",
            ThreadKind::Device(Device::Balloon) => "balloon",
            ThreadKind::Device(Device::Rng) => "rng",
            ThreadKind::Device(Device::Console) => "virtio-console",
            ThreadKind::Control => "control",
            ThreadKind::Migration => "migration",
            ThreadKind::Console => "console",
            ThreadKind::Main => "main",
            ThreadKind::Launcher => "launcher",
            ThreadKind::Supervisor => "supervisor",
        }
    }

    /// Kinds the launcher may start (threads that begin after their parent
    /// is filtered: device threads activated by a vCPU or restarted by the
    /// main thread, the stdin pump).
    pub fn launchable(self) -> bool {
        matches!(self, ThreadKind::Device(_) | ThreadKind::Console)
    }

    /// This kind's allowed syscalls: the common ones and its own table.
    pub fn allowed(self) -> Vec<Allow> {
        let mut v: Vec<Allow> = tables::COMMON.to_vec();
        match self {
            ThreadKind::Vcpu => v.extend_from_slice(tables::VCPU),
            ThreadKind::EmulatorVcpu => {
                v.extend_from_slice(tables::VCPU);
                v.extend_from_slice(tables::EMULATOR_VCPU_EXTRA);
            }
            ThreadKind::Device(d) => {
                v.extend_from_slice(tables::DEVICE_COMMON);
                v.extend_from_slice(match d {
                    Device::Block => tables::BLOCK,
                    Device::Net => tables::NET,
                    Device::Vsock => tables::VSOCK,
                    Device::Balloon => tables::BALLOON,
                    Device::Rng => tables::RNG,
                    Device::Console => tables::VIRTIO_CONSOLE,
                });
            }
            ThreadKind::Control => v.extend_from_slice(tables::CONTROL),
            ThreadKind::Migration => v.extend_from_slice(tables::MIGRATION),
            ThreadKind::Console => v.extend_from_slice(tables::CONSOLE),
            ThreadKind::Main => v.extend_from_slice(tables::MAIN),
            ThreadKind::Supervisor => v.extend_from_slice(tables::SUPERVISOR),
            ThreadKind::Launcher => {
                for k in ThreadKind::ALL.into_iter().filter(|k| k.launchable()) {
                    v.extend(k.allowed());
                }
                v.extend_from_slice(tables::LAUNCHER_EXTRA);
            }
        }
        v
    }

    /// The distinct syscalls this kind may make.
    pub fn syscall_count(self) -> usize {
        let mut nrs: Vec<_> = self.allowed().iter().map(|a| a.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

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

/// A boxed thread start, run on the launcher.
type Launch = Box<dyn FnOnce() + Send>;

struct Enabled {
    policy: Policy,
    programs: BTreeMap<ThreadKind, BpfProgram>,
    launcher: Mutex<Sender<Launch>>,
    /// The launcher's end of the channel until [`start_launcher`] starts it.
    launcher_rx: Mutex<Option<mpsc::Receiver<Launch>>>,
    /// `VIREO_TEST_FORBIDDEN_SYSCALL`: the kind that misbehaves on purpose.
    forbidden_test: Option<String>,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

thread_local! {
    /// Whether this thread has installed its filter.
    static FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether [`enable`] was called in this process.
pub fn is_enabled() -> bool {
    ENABLED.get().is_some()
}

/// Compile every kind's filter: from now on [`apply`] installs filters.
/// Call once, early, from the thread that starts the others, before it
/// starts any; then [`start_launcher`] before the first filtered thread
/// may start another.
pub fn enable(policy: Policy) -> Result<(), SeccompError> {
    if let Some(e) = ENABLED.get() {
        return if e.policy == policy {
            Ok(())
        } else {
            Err(SeccompError::AlreadyEnabled)
        };
    }
    let started = std::time::Instant::now();
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, compile_with(kind, &policy)?);
    }
    tracing::debug!(
        "seccomp: {} filters compiled in {} µs",
        programs.len(),
        started.elapsed().as_micros()
    );
    fix_malloc_arena_limit();
    let (tx, rx) = mpsc::channel::<Launch>();
    let forbidden_test = std::env::var("VIREO_TEST_FORBIDDEN_SYSCALL").ok();
    if ENABLED
        .set(Enabled {
            policy,
            programs,
            launcher: Mutex::new(tx),
            launcher_rx: Mutex::new(Some(rx)),
            forbidden_test,
        })
        .is_err()
    {
        return Err(SeccompError::AlreadyEnabled);
    }
    if policy.on_violation == OnViolation::Log {
        tracing::warn!("seccomp: violations are only logged (VIREO_SECCOMP_LOG); see dmesg");
    }
    Ok(())
}

/// Start the launcher thread (once; later calls do nothing). Until then
/// the process may stay single-threaded (the jail needs that for
/// Landlock, whose ruleset reaches only the thread that makes it); it must
/// run before any filtered thread starts another (the vCPUs: a guest
/// activates a device from one).
pub fn start_launcher() -> Result<(), SeccompError> {
    let Some(e) = ENABLED.get() else {
        return Ok(());
    };
    let rx = match e.launcher_rx.lock() {
        Ok(mut g) => g.take(),
        Err(p) => p.into_inner().take(),
    };
    let Some(rx) = rx else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            apply_or_die(ThreadKind::Launcher);
            for launch in rx {
                launch();
            }
        })
        .map_err(SeccompError::Launcher)?;
    Ok(())
}

/// Two files glibc's malloc reads lazily, from whichever thread gets
/// there first, which its filter must refuse; both reads are avoided here.
///
/// It works out how many arenas it may make the first time a
/// thread needs a new one past the 8th, by reading
/// /sys/devices/system/cpu/online: an `openat` from whichever thread that
/// is (a vCPU, a device thread), which its filter must refuse. Setting the
/// limit now, to the value glibc would compute (8 per CPU), means it never
/// looks.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: sysconf reads the online CPU count (glibc's get_nprocs,
        // the file above); mallopt only sets a malloc parameter. Both run
        // before any filter exists.
        let set = unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16) as libc::c_int;
            libc::mallopt(libc::M_ARENA_MAX, cpus.saturating_mul(8))
        };
        if set != 1 {
            tracing::warn!("seccomp: cannot fix malloc's arena limit; a thread may be killed for reading the CPU count");
        }
        // glibc also reads /proc/sys/vm/overcommit_memory the first time
        // it would give the top of a thread's arena back to the kernel
        // (shrink_heap): a restored guest on the emulator made a vCPU do
        // that. A trim threshold no heap reaches means it never shrinks
        // one (the memory stays with the arena for the next allocation;
        // big blocks are mmap'ed and unmapped as before).
        // SAFETY: mallopt only sets a malloc parameter.
        if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
            tracing::warn!("seccomp: cannot set malloc's trim threshold; a thread may be killed for reading overcommit_memory");
        }
    }
}

/// Install the filter of `kind` on the calling thread (a no-op unless
/// [`enable`] was called, or when this thread is filtered already).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    if FILTERED.with(|f| f.get()) {
        return Ok(());
    }
    let program = enabled
        .programs
        .get(&kind)
        .ok_or_else(|| SeccompError::Install {
            kind,
            why: "no compiled filter".into(),
        })?;
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        kind,
        why: e.to_string(),
    })?;
    FILTERED.with(|f| f.set(true));
    tracing::debug!("seccomp: {kind} filter installed");
    if enabled.forbidden_test.as_deref() == Some(kind.label()) {
        forbidden_syscall();
    }
    Ok(())
}

/// [`apply`] at a thread's start: a thread that cannot be filtered must not
/// run at all (it would be the hole in the sandbox), so the process ends.
pub fn apply_or_die(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        tracing::error!("{e}; stopping the VM process");
        eprintln!("vireo: error: {e}; stopping the VM process");
        std::process::abort();
    }
}

/// The test hook's misbehaviour: `execve` of a path that does not exist
/// (no thread may exec; harmless if a broken filter let it through).
fn forbidden_syscall() {
    tracing::warn!("seccomp: VIREO_TEST_FORBIDDEN_SYSCALL: this thread now calls execve");
    // SAFETY: execve of a NUL-terminated path with empty argv/envp; it
    // fails with ENOENT if it runs at all.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            c"/nonexistent/vireo-seccomp-test".as_ptr(),
            std::ptr::null::<*const libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
        );
    }
}

/// Start a thread of `kind` that installs its filter before running `f`.
/// Once the calling thread is filtered the launcher starts it (see the
/// module documentation); without [`enable`] this is `builder.spawn(f)`.
pub fn spawn<F, T>(
    kind: ThreadKind,
    builder: std::thread::Builder,
    f: F,
) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(enabled) = ENABLED.get() else {
        return builder.spawn(f);
    };
    let body = move || {
        apply_or_die(kind);
        f()
    };
    if !FILTERED.with(|c| c.get()) {
        return builder.spawn(body);
    }
    if !kind.launchable() {
        return Err(io::Error::other(SeccompError::NotLaunchable { kind }));
    }
    let (tx, rx) = mpsc::channel();
    let launch: Launch = Box::new(move || {
        let _ = tx.send(builder.spawn(body));
    });
    let sent = enabled
        .launcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(launch);
    if sent.is_err() {
        return Err(io::Error::other(SeccompError::LauncherGone));
    }
    rx.recv()
        .map_err(|_| io::Error::other(SeccompError::LauncherGone))?
}

/// Compile `kind`'s table to BPF.
pub fn compile(kind: ThreadKind, on_violation: OnViolation) -> Result<BpfProgram, SeccompError> {
    compile_with(
        kind,
        &Policy {
            on_violation,
            drop_to: None,
        },
    )
}

/// The calls that drop a thread to `ids` (see [`Policy::drop_to`]).
fn drop_rules(ids: DropTo) -> Result<Vec<(i64, SeccompRule)>, seccompiler::BackendError> {
    let eq =
        |arg: u8, v: u64| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v);
    let all3 = |v: u32| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![eq(0, v.into())?, eq(1, v.into())?, eq(2, v.into())?])
    };
    Ok(vec![
        (libc::SYS_setgroups, SeccompRule::new(vec![eq(0, 0)?])?),
        (libc::SYS_setresgid, all3(ids.gid)?),
        (libc::SYS_setresuid, all3(ids.uid)?),
    ])
}

/// Compile `kind`'s table to BPF under `policy`.
pub fn compile_with(kind: ThreadKind, policy: &Policy) -> Result<BpfProgram, SeccompError> {
    compile_extra(kind, policy, Vec::new())
}

/// The jail supervisor's filter: [`ThreadKind::Supervisor`]'s table plus
/// `kill` of its one child (the VMM) and nothing else.
pub fn compile_supervisor(child: libc::pid_t) -> Result<BpfProgram, SeccompError> {
    let kind = ThreadKind::Supervisor;
    let pid = u64::try_from(child).map_err(|_| SeccompError::Compile {
        kind,
        why: format!("not a child's pid: {child}"),
    })?;
    let rule = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| SeccompError::Compile {
            kind,
            why: format!("kill: {e}"),
        })?;
    compile_extra(
        kind,
        &Policy {
            on_violation: OnViolation::KillProcess,
            drop_to: None,
        },
        vec![(libc::SYS_kill, rule)],
    )
}

fn compile_extra(
    kind: ThreadKind,
    policy: &Policy,
    extra: Vec<(i64, SeccompRule)>,
) -> Result<BpfProgram, SeccompError> {
    let on_violation = policy.on_violation;
    let err = |why: String| SeccompError::Compile { kind, why };
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, rule) in extra {
        if let Some(v) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
            v.push(rule);
        }
    }
    if let Some(ids) = policy.drop_to {
        if ids.uid == 0 || ids.gid == 0 {
            return Err(err("the jail's ids must not be root's".into()));
        }
        for (nr, rule) in drop_rules(ids).map_err(|e| err(format!("privilege drop: {e}")))? {
            if let Some(v) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
                v.push(rule);
            }
        }
    }
    for allow in kind.allowed() {
        let new = rules_for(&allow).map_err(|e| err(format!("{}: {e}", allow.name)))?;
        let entry = rules.entry(allow.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), new) {
            // Unconditional somewhere: unconditional.
            (_, None) => *entry = None,
            (None, Some(_)) => {}
            (Some(existing), Some(more)) => existing.extend(more),
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let mismatch = match on_violation {
        OnViolation::KillProcess => SeccompAction::KillProcess,
        OnViolation::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.to_string()))
}

/// The rules (OR'ed) of one table entry; `None` for "any arguments".
fn rules_for(allow: &Allow) -> Result<Option<Vec<SeccompRule>>, seccompiler::BackendError> {
    let cond = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, v: u64| {
        SeccompCondition::new(arg, len, op, v)
    };
    Ok(match allow.args {
        Args::Any => None,
        Args::Ioctl(reqs) => Some(
            reqs.iter()
                .map(|r| {
                    SeccompRule::new(vec![cond(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        r.0,
                    )?])
                })
                .collect::<Result<_, _>>()?,
        ),
        Args::OneOf { arg, values } => Some(
            values
                .iter()
                .map(|&v| {
                    SeccompRule::new(vec![cond(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        v,
                    )?])
                })
                .collect::<Result<_, _>>()?,
        ),
        Args::NoExec => Some(vec![SeccompRule::new(vec![cond(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?]),
        Args::ThreadOnly => Some(vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?]),
    })
}

#[cfg(test)]
mod tests;
