//! The fork into the jail's PID namespace and the supervisor the parent
//! becomes: it drops its privileges, forwards signals and exits as the
//! child did; the child dies with it.

use super::capabilities::{drop_bounding_set, set_no_new_privs};
use super::ids::{set_ids, JailIds};
use super::{check, sys, JailError};

/// Fork into the jail's PID namespace (entered by the caller, which is
/// single-threaded). Returns in the child only, which dies with its
/// parent; the parent becomes the supervisor and never returns.
pub(super) fn fork_supervised(ids: JailIds) -> Result<(), JailError> {
    // Signals the supervisor forwards are blocked across the fork, so none
    // is lost before it waits for them; the child unblocks them.
    let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in forwarded {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
    }
    // SAFETY: the process is single-threaded, so the child owns a
    // consistent copy of every lock and allocation.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(sys("fork into the jail's PID namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    if child == 0 {
        // SAFETY: restores the mask saved above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        die_with_parent()?;
        return Ok(());
    }
    supervise(child, &set, ids)
}

/// The supervisor: drop privileges, forward signals, exit as the child.
fn supervise(child: libc::pid_t, set: &libc::sigset_t, ids: JailIds) -> ! {
    // Its root and working directory move into the jail with the child's
    // pivot_root only if they are the old root: a working directory left
    // elsewhere would keep the host's tree reachable.
    // SAFETY: chdir with a valid C string.
    unsafe { libc::chdir(c"/".as_ptr()) };
    if let Err(e) = drop_bounding_set()
        .and_then(|()| set_ids(ids))
        .and_then(|()| set_no_new_privs())
    {
        eprintln!("vireo: error: jail supervisor: {e}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child, libc::SIGKILL) };
        std::process::exit(1);
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Its own filter: it only waits, forwards signals and reaps.
    let filter = crate::seccomp::compile_supervisor(child);
    if let Err(e) = filter.and_then(|f| {
        seccompiler::apply_filter(&f).map_err(|e| crate::seccomp::SeccompError::Compile {
            kind: crate::seccomp::ThreadKind::Supervisor,
            why: e.to_string(),
        })
    }) {
        eprintln!("vireo: error: jail supervisor: seccomp: {e}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child, libc::SIGKILL) };
        std::process::exit(1);
    }
    loop {
        // SAFETY: siginfo_t is plain data that sigwaitinfo fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to the blocked set and the siginfo.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            // SAFETY: as above.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let s = libc::WTERMSIG(status);
            // The daemon reads "killed by SIGKILL/SIGSYS" from the status:
            // end the same way; 128+signal if the signal does not kill.
            // SAFETY: plain signal calls on this single-threaded process.
            unsafe {
                libc::signal(s, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, s);
                libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(s);
            }
            std::process::exit(128 + s);
        }
    }
}

pub(super) fn die_with_parent() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )
}
