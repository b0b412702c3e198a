//! The VM's run state, shared by the vCPU threads, the devices and whoever
//! drives the VM: running ⇄ paused, and the one reason the VM ends.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 (or a backend power-off event).
    PowerOff,
    /// The guest reset the machine (i8042, reset control register, ACPI reset).
    Reset,
    /// A vCPU hit a triple fault (shutdown); the guest is unrecoverable.
    TripleFault { vcpu: u32, rip: Option<u64> },
    /// The VMM stopped the VM on request.
    Stopped,
    /// The backend failed to run a vCPU.
    Failed(String),
}

impl ExitReason {
    /// Power-off and reset are the guest's own clean ends.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("the guest powered off"),
            ExitReason::Reset => f.write_str("the guest reset the machine"),
            ExitReason::TripleFault { vcpu, rip: Some(rip) } => write!(
                f,
                "vCPU {vcpu} hit a triple fault at RIP {rip:#x}: the guest crashed beyond recovery (try the kernel with `earlyprintk=serial` to see why)"
            ),
            ExitReason::TripleFault { vcpu, rip: None } => {
                write!(f, "vCPU {vcpu} hit a triple fault: the guest crashed beyond recovery")
            }
            ExitReason::Stopped => f.write_str("the VM was stopped"),
            ExitReason::Failed(why) => write!(f, "the VM failed: {why}"),
        }
    }
}

/// Explicit run states; illegal transitions are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Exited,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} a VM that is {state:?}")]
pub struct StateError {
    pub action: &'static str,
    pub state: RunState,
}

struct Inner {
    state: RunState,
    exit: Option<ExitReason>,
    /// vCPU threads currently parked in `checkpoint` while paused.
    parked: usize,
}

pub struct VmControl {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Default for VmControl {
    fn default() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Created,
                exit: None,
                parked: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VmControl {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> RunState {
        self.lock().state
    }

    pub(crate) fn mark_running(&self) -> Result<(), StateError> {
        let mut g = self.lock();
        if g.state != RunState::Created {
            return Err(StateError {
                action: "start",
                state: g.state,
            });
        }
        g.state = RunState::Running;
        Ok(())
    }

    /// End the VM. The first reason wins; later ones are logged and dropped.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut g = self.lock();
        match &g.exit {
            None => {
                tracing::debug!("VM exit requested: {reason}");
                g.exit = Some(reason);
                g.state = RunState::Exited;
            }
            Some(first) => tracing::debug!("VM already exiting ({first}); ignoring: {reason}"),
        }
        self.changed.notify_all();
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Block until the VM has an exit reason.
    pub fn wait_exit(&self) -> ExitReason {
        let mut g = self.lock();
        loop {
            if let Some(r) = &g.exit {
                return r.clone();
            }
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait up to `timeout` for the VM to have an exit reason.
    pub fn wait_exit_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |g| g.exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.exit.clone()
    }

    /// Called by a vCPU thread before each entry into the guest: parks while
    /// the VM is paused; returns false once the VM is exiting.
    pub fn checkpoint(&self) -> bool {
        self.checkpoint_with(&mut || {})
    }

    /// [`VmControl::checkpoint`] that first calls `before_park` (without the
    /// lock held) when the VM is paused, so a vCPU can bring its state to a
    /// point where it can be saved before it parks.
    pub fn checkpoint_with(&self, before_park: &mut dyn FnMut()) -> bool {
        let mut g = self.lock();
        if g.state == RunState::Paused {
            drop(g);
            before_park();
            g = self.lock();
        }
        if g.state == RunState::Paused {
            g.parked += 1;
            self.changed.notify_all();
            while g.state == RunState::Paused {
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.parked -= 1;
        }
        g.exit.is_none()
    }

    /// Pause: mark the VM paused, then `kick` the vCPU threads out of the
    /// guest until all `vcpus` are parked.
    pub fn pause(&self, vcpus: usize, kick: &dyn Fn()) -> Result<(), StateError> {
        let mut g = self.lock();
        if g.state != RunState::Running {
            return Err(StateError {
                action: "pause",
                state: g.state,
            });
        }
        g.state = RunState::Paused;
        while g.parked < vcpus && g.exit.is_none() {
            drop(g);
            // A kick can land just before a thread re-enters the guest and be
            // lost, so keep kicking until every thread has parked.
            kick();
            g = self.lock();
            if g.parked < vcpus && g.exit.is_none() {
                g = self
                    .changed
                    .wait_timeout(g, Duration::from_millis(2))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), StateError> {
        let mut g = self.lock();
        if g.state != RunState::Paused {
            return Err(StateError {
                action: "resume",
                state: g.state,
            });
        }
        g.state = RunState::Running;
        self.changed.notify_all();
        Ok(())
    }

    /// Number of vCPU threads parked right now (for tests and status).
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn wait_with_timeout_sees_a_later_exit() {
        let c = Arc::new(VmControl::default());
        assert_eq!(c.wait_exit_timeout(Duration::from_millis(5)), None);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            c2.request_exit(ExitReason::Reset);
        });
        assert_eq!(
            c.wait_exit_timeout(Duration::from_secs(10)),
            Some(ExitReason::Reset)
        );
        t.join().unwrap();
    }

    #[test]
    fn first_exit_reason_wins() {
        let c = VmControl::default();
        c.request_exit(ExitReason::PowerOff);
        c.request_exit(ExitReason::Failed("later".into()));
        assert_eq!(c.wait_exit(), ExitReason::PowerOff);
        assert!(!c.checkpoint());
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let c = Arc::new(VmControl::default());
        c.mark_running().unwrap();
        let entries = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (c, entries) = (c.clone(), entries.clone());
                std::thread::spawn(move || {
                    while c.checkpoint() {
                        entries.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        c.pause(3, &|| {}).unwrap();
        assert_eq!(c.parked(), 3);
        let frozen = entries.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            entries.load(Ordering::SeqCst),
            frozen,
            "no vCPU ran while paused"
        );
        assert!(c.pause(3, &|| {}).is_err(), "pausing twice is illegal");
        c.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(entries.load(Ordering::SeqCst) > frozen);
        c.request_exit(ExitReason::Stopped);
        for t in threads {
            t.join().unwrap();
        }
        assert!(c.resume().is_err());
    }
}
