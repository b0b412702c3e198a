//! Why a VM process ended: its exit status (or, for a process an earlier
//! daemon started, nothing) and the last lines of its log, turned into the
//! state and reason the daemon records.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use vireo_api::model::VmState;

use super::VM_LOG;
use crate::observe::Change;

/// What `vireo run` logs when the guest resets the machine, and the reason
/// recorded for it.
pub(super) const GUEST_RESET: &str = "the guest reset the machine";
/// What `vireo run` logs when its control socket's `reset` ended the VM.
const RESET_ON_REQUEST: &str = "the VM was reset on request";

/// How a VM process ended, as far as the daemon can tell.
#[derive(Debug, Clone, Copy)]
pub(super) enum Exit {
    /// Reaped by this daemon.
    Status(ExitStatus),
    /// An adopted process vanished; its status is unknown.
    Unknown,
}

/// The state and reason recorded for an exit, and whether it was a start
/// failure (`vireo run` exit status 2: bad input).
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub(super) state: VmState,
    pub(super) reason: String,
    pub(super) start_failed: bool,
}

/// The event of a VM process's end recorded as `state`.
pub(super) fn exit_change(state: VmState) -> Change {
    if state == VmState::Crashed {
        Change::Crashed
    } else {
        Change::Stopped
    }
}

/// The last 64 KiB of a VM's log.
pub(super) fn read_log_tail(dir: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(dir.join(VM_LOG)) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// What the VM's log says about its end: `vireo run`'s error line, or the
/// clean end it logged at info level.
pub(super) fn log_verdict(log: &str) -> Option<(VmState, String)> {
    for line in log.lines().rev() {
        if let Some(i) = line.find("vireo: error: ") {
            return Some((
                VmState::Crashed,
                line[i + "vireo: error: ".len()..].trim().to_string(),
            ));
        }
        if line.contains("the guest powered off") {
            return Some((VmState::Stopped, "powered off".into()));
        }
        if line.contains(GUEST_RESET) {
            return Some((VmState::Stopped, GUEST_RESET.into()));
        }
        if line.contains(RESET_ON_REQUEST) {
            return Some((VmState::Stopped, "reset on request".into()));
        }
        if line.contains("the VM was stopped") {
            return Some((VmState::Stopped, "stopped".into()));
        }
    }
    None
}

pub(super) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Decide the state and reason to record for an exit.
pub(super) fn outcome(exit: Exit, requested: Option<&str>, log: &str) -> Outcome {
    let verdict = log_verdict(log);
    let code = match exit {
        Exit::Status(s) => s.code(),
        Exit::Unknown => None,
    };
    let (state, reason, start_failed) = match (exit, requested) {
        // The daemon signalled it: that is the reason, unless the log says
        // the guest ended on its own (or the VM failed) first.
        (_, Some(req)) => match verdict {
            Some((VmState::Stopped, why)) if why != "stopped" && code != Some(2) => {
                (VmState::Stopped, why, false)
            }
            Some((VmState::Crashed, why)) if code == Some(1) => {
                (VmState::Crashed, format!("VM failed: {why}"), false)
            }
            _ => (VmState::Stopped, req.to_string(), false),
        },
        (Exit::Status(s), _) => match (s.code(), s.signal()) {
            (Some(0), _) => match verdict {
                Some((VmState::Stopped, why)) => (VmState::Stopped, why, false),
                _ => (VmState::Stopped, "exited".into(), false),
            },
            (Some(1), _) => (
                VmState::Crashed,
                match verdict {
                    Some((VmState::Crashed, why)) => format!("VM failed: {why}"),
                    _ => "VM failed (vireo run exit status 1)".into(),
                },
                false,
            ),
            (Some(2), _) => (
                VmState::Crashed,
                match verdict {
                    Some((VmState::Crashed, why)) => format!("failed to start: {why}"),
                    _ => "failed to start (vireo run exit status 2)".into(),
                },
                true,
            ),
            (Some(code), _) => (
                VmState::Crashed,
                format!("vireo run exited with status {code}"),
                false,
            ),
            (None, Some(sig)) => (
                VmState::Crashed,
                format!("killed by signal {sig} ({})", signal_name(sig)),
                false,
            ),
            (None, None) => (VmState::Crashed, "ended (no status)".into(), false),
        },
        (Exit::Unknown, None) => match verdict {
            Some((VmState::Crashed, why)) => (VmState::Crashed, format!("VM failed: {why}"), false),
            Some((state, why)) => (state, why, false),
            None => (
                VmState::Stopped,
                "exited while not a child of this daemon (exit status unknown)".into(),
                false,
            ),
        },
    };
    Outcome {
        state,
        reason,
        start_failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(raw: i32) -> Exit {
        Exit::Status(ExitStatus::from_raw(raw))
    }

    const POWERED_OFF: &str = "2024-01-01T00:00:00Z  INFO booting ELF\n2024-01-01T00:00:01Z  INFO the guest powered off\n";

    #[test]
    fn outcomes() {
        let o = outcome(status(0), None, POWERED_OFF);
        assert_eq!(
            (o.state, o.reason.as_str()),
            (VmState::Stopped, "powered off")
        );
        let o = outcome(
            status(1 << 8),
            None,
            "vireo: error: vCPU 0 hit a triple fault\n",
        );
        assert_eq!(o.state, VmState::Crashed);
        assert_eq!(o.reason, "VM failed: vCPU 0 hit a triple fault");
        let o = outcome(
            status(2 << 8),
            None,
            "vireo: error: --kernel /x: not found\n",
        );
        assert!(o.start_failed && o.reason.contains("--kernel /x"), "{o:?}");
        let o = outcome(status(libc::SIGSEGV), None, "");
        assert_eq!(o.reason, "killed by signal 11 (SIGSEGV)");
        let o = outcome(status(libc::SIGTERM), Some("stopped (SIGTERM)"), "");
        assert_eq!(
            (o.state, o.reason.as_str()),
            (VmState::Stopped, "stopped (SIGTERM)")
        );
        let o = outcome(Exit::Unknown, None, POWERED_OFF);
        assert_eq!(o.reason, "powered off");
        let o = outcome(Exit::Unknown, None, "");
        assert_eq!(o.state, VmState::Stopped);
        assert!(o.reason.contains("unknown"));
    }
}
