//! The thread a virtio device works on once activated: an epoll loop over
//! the device's queue-notify eventfds and whatever host fds it serves (a
//! TAP, a socket), stopped through its own eventfd when the driver resets
//! the device or the VM ends.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vireo_sandbox::seccomp::{self, Device, ThreadKind};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The token the worker keeps for its stop eventfd; device tokens must
/// differ from it.
pub const STOP_TOKEN: u64 = u64::MAX;

/// Chains a device serves from one queue per wakeup before it goes back
/// to its epoll loop, having kicked itself ([`rekick`]) to serve the rest
/// on the next wakeup: a driver that keeps a ring full, or lays its used
/// ring over the avail ring so it never empties, cannot keep the thread
/// from a pause or stop request or from its other queues. (virtio-blk and
/// virtio-net have their own budgets.)
pub const CHAINS_PER_WAKEUP: usize = 64;

/// Kick a queue's own notify eventfd after a wakeup spent its budget, so
/// the worker comes back to the rest. False (the device stops until a
/// reset) when the kick fails: the rest would otherwise wait forever.
pub fn rekick(notify: &EventFd, name: &str) -> bool {
    match notify.write(1) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{name}: cannot requeue the rest of the work: {e}");
            false
        }
    }
}

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

/// What a worker thread hands back when it is stopped: its epoll set
/// (with every fd the handler added) and the handler, so it can be started
/// again exactly where it was ([`Worker::pause`] / [`Worker::resume`]).
struct Parked {
    epoll: Epoll,
    handler: Box<dyn EventHandler>,
    /// The handler ended the loop itself (the device needs a reset): a
    /// resume leaves it stopped.
    failed: bool,
}

/// A running device thread. Dropping it stops and joins the thread.
pub struct Worker {
    name: String,
    /// Which seccomp filter the thread runs under.
    device: Device,
    stop: EventFd,
    thread: Option<JoinHandle<Parked>>,
    parked: Option<Parked>,
}

impl Worker {
    /// Start thread `name` (under `device`'s seccomp filter) watching `fds`
    /// (fd, events, token) and calling `handler` for each ready one.
    pub fn spawn<H: EventHandler>(
        name: &str,
        device: Device,
        fds: &[(RawFd, EventSet, u64)],
        handler: H,
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
        let mut w = Worker {
            name: name.to_string(),
            device,
            stop,
            thread: None,
            parked: Some(Parked {
                epoll,
                handler: Box::new(handler),
                failed: false,
            }),
        };
        w.start()?;
        Ok(w)
    }

    fn start(&mut self) -> std::io::Result<()> {
        let Some(parked) = self.parked.take() else {
            return Ok(());
        };
        if parked.failed {
            self.parked = Some(parked);
            return Ok(());
        }
        if INLINE.with(|i| i.get()) {
            self.parked = Some(run_until_idle(parked));
            return Ok(());
        }
        // A stop request left over from the last pause would end the new
        // thread at once.
        let _ = self.stop.read();
        let thread_name = self.name.clone();
        let Parked {
            epoll, mut handler, ..
        } = parked;
        // The thread owns the epoll set and the handler while it runs and
        // hands them back when stopped (if it cannot start, they are lost
        // and the device stays stopped until the driver resets it).
        let spawned = seccomp::spawn(
            ThreadKind::Device(self.device),
            std::thread::Builder::new().name(self.name.chars().take(15).collect()),
            move || {
                let mut events = vec![EpollEvent::default(); 32];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(
                                "{thread_name}: epoll_wait failed: {e}; device stopped"
                            );
                            return Parked {
                                epoll,
                                handler,
                                failed: true,
                            };
                        }
                    };
                    for ev in &events[..n] {
                        if ev.data() == STOP_TOKEN {
                            // Other ready fds of this batch stay ready
                            // (level-triggered) for the next start.
                            return Parked {
                                epoll,
                                handler,
                                failed: false,
                            };
                        }
                        let ctl = EpollCtl { epoll: &epoll };
                        if !handler.handle(ev.data(), ev.event_set(), &ctl) {
                            tracing::warn!(
                                "{thread_name}: device stopped until the driver resets it"
                            );
                            return Parked {
                                epoll,
                                handler,
                                failed: true,
                            };
                        }
                    }
                }
            },
        );
        self.thread = Some(spawned?);
        Ok(())
    }

    /// Stop the thread and wait for it to end; the handler is kept for
    /// [`Worker::resume`]. When this returns, the device touches neither
    /// guest memory nor its queues: every request the handler took from
    /// a queue was completed (handlers serve a wake-up whole), and
    /// buffers it holds (receive buffers waiting for data) stay popped
    /// but unused.
    pub fn pause(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            match t.join() {
                Ok(parked) => self.parked = Some(parked),
                Err(_) => tracing::error!("{}: the device thread panicked", self.name),
            }
        }
    }

    /// Start the thread again after [`Worker::pause`] with the same handler
    /// and fds (a no-op when running, or when the handler had stopped the
    /// device).
    pub fn resume(&mut self) -> std::io::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        self.start()
    }

    /// Stop the thread and wait for it to end, dropping the handler.
    pub fn stop(&mut self) {
        self.pause();
        self.parked = None;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

thread_local! {
    /// Set by [`inline_workers`]: workers started on this thread run on it,
    /// until idle, instead of on their own thread.
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The most events one inline run handles: a device that keeps itself
/// busy (re-arming its own eventfd past its budget) still returns.
const INLINE_MAX_EVENTS: usize = 4096;

/// Handle what is ready now, on the calling thread, until nothing is
/// ready (epoll with no wait) or the handler stops the device.
fn run_until_idle(mut parked: Parked) -> Parked {
    let mut events = vec![EpollEvent::default(); 32];
    let mut handled = 0;
    while handled < INLINE_MAX_EVENTS {
        let n = match parked.epoll.wait(0, &mut events) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                parked.failed = true;
                break;
            }
        };
        for ev in &events[..n] {
            handled += 1;
            if ev.data() == STOP_TOKEN {
                continue;
            }
            let ctl = EpollCtl {
                epoll: &parked.epoll,
            };
            if !parked.handler.handle(ev.data(), ev.event_set(), &ctl) {
                parked.failed = true;
                return parked;
            }
        }
    }
    parked
}

/// Run `f` with the device workers it starts (activation, resume) working
/// on the calling thread: each start handles every ready event until none
/// is left and returns, so a fuzz target or test drives a device
/// deterministically: post buffers, notify, `resume`. Not for a VM.
#[doc(hidden)]
pub fn inline_workers<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            let old = self.0;
            INLINE.with(|i| i.set(old));
        }
    }
    let _reset = Reset(INLINE.with(|i| i.replace(true)));
    f()
}

/// Hold a device's thread still, if it has one (see [`Worker::pause`]).
pub fn pause(worker: &mut Option<Worker>) {
    if let Some(w) = worker {
        w.pause();
    }
}

/// Let a device's thread carry on after [`pause`]; `name` names the
/// device in the log line if it cannot.
pub fn resume(worker: &mut Option<Worker>, name: &str) {
    if let Some(w) = worker {
        if let Err(e) = w.resume() {
            tracing::error!("{name}: cannot restart the device thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

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
            Device::Rng,
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

    /// Handles on the thread that started it, re-arming its eventfd
    /// `rearm` times (a device that stops at its budget and kicks itself).
    struct Inline {
        seen: Arc<AtomicUsize>,
        thread: std::thread::ThreadId,
        evt: EventFd,
        rearm: usize,
    }
    impl EventHandler for Inline {
        fn handle(&mut self, _: u64, _: EventSet, _: &EpollCtl) -> bool {
            assert_eq!(std::thread::current().id(), self.thread);
            let _ = self.evt.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
            if self.rearm > 0 {
                self.rearm -= 1;
                let _ = self.evt.write(1);
            }
            true
        }
    }

    #[test]
    fn inline_workers_run_on_the_caller_until_idle_and_bounded() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let handler = |rearm| Inline {
            seen: seen.clone(),
            thread: std::thread::current().id(),
            evt: evt.try_clone().unwrap(),
            rearm,
        };
        inline_workers(|| {
            evt.write(1).unwrap();
            let mut w = Worker::spawn(
                "inline",
                Device::Rng,
                &[(evt.as_raw_fd(), EventSet::IN, 1)],
                handler(3),
            )
            .unwrap();
            // Handled before spawn returned: the event and three re-arms.
            assert_eq!(seen.load(Ordering::SeqCst), 4);
            evt.write(1).unwrap();
            w.pause();
            w.resume().unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), 5);
            w.stop();
            // One that never goes idle still returns.
            seen.store(0, Ordering::SeqCst);
            evt.write(1).unwrap();
            let _w = Worker::spawn(
                "busy",
                Device::Rng,
                &[(evt.as_raw_fd(), EventSet::IN, 1)],
                handler(usize::MAX),
            )
            .unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), INLINE_MAX_EVENTS);
        });
        // Outside, workers have their own thread again.
        let _ = evt.read();
        assert!(!INLINE.with(|i| i.get()));
    }

    struct Counter(Arc<AtomicUsize>, EventFd);
    impl EventHandler for Counter {
        fn handle(&mut self, _: u64, _: EventSet, _: &EpollCtl) -> bool {
            let _ = self.1.read();
            self.0.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    #[test]
    fn pause_keeps_the_handler_and_resume_sees_what_came_meanwhile() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let mut w = Worker::spawn(
            "test-pause",
            Device::Rng,
            &[(evt.as_raw_fd(), EventSet::IN, 1)],
            Counter(seen.clone(), evt.try_clone().unwrap()),
        )
        .unwrap();
        let wait_for = |n: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while seen.load(Ordering::SeqCst) < n {
                assert!(std::time::Instant::now() < deadline, "handler never ran");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        evt.write(1).unwrap();
        wait_for(1);
        w.pause();
        w.pause(); // idempotent
        evt.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "a paused worker runs nothing"
        );
        w.resume().unwrap();
        wait_for(2);
        w.resume().unwrap(); // no-op while running
        evt.write(1).unwrap();
        wait_for(3);
    }
}
