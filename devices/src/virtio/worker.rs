//! The thread a virtio device works on once activated: an epoll loop over
//! the device's queue-notify eventfds and whatever host fds it serves (a
//! TAP, a socket), stopped through its own eventfd when the driver resets
//! the device or the VM ends.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The token the worker keeps for its stop eventfd; device tokens must
/// differ from it.
pub const STOP_TOKEN: u64 = u64::MAX;

/// Lets a handler add and remove fds while it runs (a vsock connection
/// that opens or closes).
pub struct EpollCtl<'a> {
    epoll: &'a Epoll,
}

impl EpollCtl<'_> {
    /// Watch `fd` for `events`; the handler sees `token` when it fires.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Change what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stop watching `fd`.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a device does when one of its fds is ready.
pub trait EventHandler: Send + 'static {
    /// Handle readiness `events` of the fd registered with `token`. Return
    /// false to end the worker (the device then needs a reset).
    fn handle(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) -> bool;
}

/// A running device thread. Dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start thread `name` watching `fds` (fd, events, token) and calling
    /// `handler` for each ready one.
    pub fn spawn<H: EventHandler>(
        name: &str,
        fds: &[(RawFd, EventSet, u64)],
        mut handler: H,
    ) -> std::io::Result<Worker> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for &(fd, events, token) in fds {
            debug_assert_ne!(token, STOP_TOKEN);
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); 32];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(
                                "{thread_name}: epoll_wait failed: {e}; device stopped"
                            );
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        if ev.data() == STOP_TOKEN {
                            return;
                        }
                        let ctl = EpollCtl { epoll: &epoll };
                        if !handler.handle(ev.data(), ev.event_set(), &ctl) {
                            tracing::warn!(
                                "{thread_name}: device stopped until the driver resets it"
                            );
                            return;
                        }
                    }
                }
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it to end.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            if t.join().is_err() {
                tracing::error!("a virtio device thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo(mpsc::Sender<u64>, EventFd);
    impl EventHandler for Echo {
        fn handle(&mut self, token: u64, _: EventSet, _: &EpollCtl) -> bool {
            let _ = self.1.read();
            self.0.send(token).is_ok()
        }
    }

    #[test]
    fn handler_sees_its_tokens_and_stop_joins() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Worker::spawn(
            "test-worker",
            &[(evt.as_raw_fd(), EventSet::IN, 7)],
            Echo(tx, evt.try_clone().unwrap()),
        )
        .unwrap();
        evt.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            7
        );
        w.stop();
        w.stop(); // idempotent
    }
}
