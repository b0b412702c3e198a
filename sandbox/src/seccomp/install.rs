//! Installing the filters in the running process: [`enable`] compiles
//! them once, each thread installs its own ([`apply`]), and threads that
//! start after their parent is filtered come from the launcher thread
//! ([`spawn`]; see the module documentation of [`crate::seccomp`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

use super::compile::compile_with;
use super::{OnViolation, Policy, SeccompError, ThreadKind};

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
pub(super) fn forbidden_syscall() {
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
