//! A VM's serial console in the daemon: the scrollback ring, the live
//! broadcast of its output to subscribers (WebSocket clients), and the pipe
//! into the VM process's stdin that carries their typing to the guest.
//!
//! One [`Console`] lives per VM from `start` until the next `start` (a
//! reboot keeps it, so the scrollback and the subscribers carry over to the
//! new process). Output chunks are numbered by their byte offset in the
//! console's whole output; pushing into the ring and broadcasting happen
//! under one lock, and so does taking the scrollback with a subscription,
//! so a subscriber sees every byte once, in order, with no gap.
//!
//! A slow subscriber never holds anything up: the broadcast channel is
//! bounded and drops its oldest chunks for a receiver that falls behind.
//! Such a receiver catches up from the ring (which holds the last 256 KiB)
//! and is told how many bytes it lost if it fell further behind than that.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc};

use crate::ring::{Ring, CONSOLE_SCROLLBACK};

/// Output chunks a subscriber may fall behind before it has to catch up
/// from the ring (each chunk is one read from the console pipe, <= 16 KiB).
const BROADCAST_CHUNKS: usize = 256;
/// Input messages (one per WebSocket frame) queued for the VM's stdin.
const INPUT_QUEUE: usize = 256;

/// What the broadcast carries.
#[derive(Debug, Clone)]
enum Event {
    /// `data` starts at byte `offset` of the console's whole output.
    Output { offset: u64, data: Bytes },
    /// The VM stopped (for good: not a reboot), with the recorded reason.
    Stopped(String),
    /// The daemon is shutting down (the VM keeps running).
    Closing,
}

struct Shared {
    ring: Ring,
    /// Set when the VM stopped; a new start makes a new console.
    ended: Option<String>,
}

pub struct Console {
    shared: Mutex<Shared>,
    tx: broadcast::Sender<Event>,
    /// The queue into the current VM process's stdin, if there is one.
    input: Mutex<Option<mpsc::Sender<Bytes>>>,
}

/// Why typed input did not reach the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputError {
    /// No VM process takes input (stopped, restarting, or started by a
    /// daemon that gave it no stdin pipe).
    NotConnected,
    /// The guest is not reading its console and the queue is full.
    Full,
}

impl InputError {
    pub fn code(self) -> &'static str {
        match self {
            InputError::NotConnected => "not_connected",
            InputError::Full => "input_overflow",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            InputError::NotConnected => {
                "the VM's console takes no input right now (it is not running, or it was started by an older daemon); input dropped"
            }
            InputError::Full => "the guest is not reading its console fast enough; input dropped",
        }
    }
}

/// What a subscriber gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Console output; `lost` bytes before it were lost because this
    /// subscriber fell more than the scrollback behind (usually 0).
    Output { lost: u64, data: Bytes },
    /// The VM stopped; nothing more will come.
    Stopped(String),
    /// The daemon is shutting down; the VM goes on without this subscriber.
    Closing,
}

/// A live view of a console: the scrollback at the moment of subscribing,
/// then every later chunk through [`Subscription::next`].
pub struct Subscription {
    console: Arc<Console>,
    rx: broadcast::Receiver<Event>,
    /// The offset of the next byte this subscriber should see.
    next: u64,
    /// The VM had stopped when this subscriber (re)synchronised.
    ended: Option<String>,
    /// The scrollback when subscribing (taken by [`Subscription::scrollback`]).
    scrollback: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    pub fn new() -> Arc<Console> {
        Console::with_capacity(CONSOLE_SCROLLBACK, BROADCAST_CHUNKS)
    }

    fn with_capacity(scrollback: usize, chunks: usize) -> Arc<Console> {
        let (tx, _) = broadcast::channel(chunks);
        Arc::new(Console {
            shared: Mutex::new(Shared {
                ring: Ring::new(scrollback),
                ended: None,
            }),
            tx,
            input: Mutex::new(None),
        })
    }

    /// Output from the VM: into the ring and to every subscriber.
    pub fn push(&self, data: &[u8]) {
        let mut s = lock(&self.shared);
        let offset = s.ring.total();
        s.ring.push(data);
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Event::Output {
            offset,
            data: Bytes::copy_from_slice(data),
        });
    }

    /// The scrollback.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.shared).ring.contents()
    }

    /// The scrollback and every later byte, atomically.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let s = lock(&self.shared);
        Subscription {
            console: Arc::clone(self),
            rx: self.tx.subscribe(),
            next: s.ring.total(),
            ended: s.ended.clone(),
            scrollback: s.ring.contents(),
        }
    }

    /// The VM stopped for good: tell the subscribers, drop the input.
    pub fn end(&self, reason: &str) {
        self.detach_input();
        let mut s = lock(&self.shared);
        if s.ended.is_none() {
            s.ended = Some(reason.to_string());
            let _ = self.tx.send(Event::Stopped(reason.to_string()));
        }
    }

    /// The daemon is shutting down: let go of the subscribers.
    pub fn close(&self) {
        let _ = self.tx.send(Event::Closing);
    }

    /// Whether the VM behind this console has stopped.
    pub fn ended(&self) -> Option<String> {
        lock(&self.shared).ended.clone()
    }

    /// Carry input to a VM process's stdin pipe from now on (a writer task
    /// owns the pipe; it ends when the input is detached or the pipe breaks).
    pub fn attach_input(&self, mut pipe: tokio::net::unix::pipe::Sender) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(INPUT_QUEUE);
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if let Err(e) = pipe.write_all(&bytes).await {
                    tracing::warn!("console input: {e}");
                    return;
                }
            }
        });
        *lock(&self.input) = Some(tx);
    }

    pub fn detach_input(&self) {
        *lock(&self.input) = None;
    }

    /// Queue `bytes` for the guest; one call's bytes are never interleaved
    /// with another's.
    pub fn write_input(&self, bytes: Bytes) -> Result<(), InputError> {
        let guard = lock(&self.input);
        let tx = guard.as_ref().ok_or(InputError::NotConnected)?;
        tx.try_send(bytes).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InputError::Full,
            mpsc::error::TrySendError::Closed(_) => InputError::NotConnected,
        })
    }
}

impl Subscription {
    /// The scrollback at the moment of subscribing (once; empty after).
    pub fn scrollback(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.scrollback)
    }

    /// The next output chunk, or the stop. Cancel-safe (it only awaits the
    /// broadcast receiver).
    pub async fn next(&mut self) -> Next {
        loop {
            if let Some(reason) = self.ended.take() {
                return Next::Stopped(reason);
            }
            match self.rx.recv().await {
                Ok(Event::Output { offset, data }) => {
                    let end = offset + data.len() as u64;
                    if end <= self.next {
                        continue; // already seen
                    }
                    if offset > self.next {
                        // A gap cannot happen (push and subscribe share a
                        // lock), but if it did: fill it from the ring.
                        if let Some(n) = self.catch_up() {
                            return n;
                        }
                        continue;
                    }
                    let skip = (self.next - offset) as usize;
                    self.next = end;
                    return Next::Output {
                        lost: 0,
                        data: data.slice(skip..),
                    };
                }
                Ok(Event::Stopped(reason)) => return Next::Stopped(reason),
                Ok(Event::Closing) => return Next::Closing,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(n) = self.catch_up() {
                        return n;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Next::Stopped("the console closed".into())
                }
            }
        }
    }

    /// Fell behind the broadcast: take what was missed from the ring and
    /// subscribe afresh, under the console's lock. None when nothing was
    /// missed after all.
    fn catch_up(&mut self) -> Option<Next> {
        let console = Arc::clone(&self.console);
        let s = lock(&console.shared);
        let (lost, data) = s.ring.since(self.next);
        self.next = s.ring.total();
        self.rx = console.tx.subscribe();
        self.ended = s.ended.clone();
        if lost == 0 && data.is_empty() {
            return None;
        }
        Some(Next::Output {
            lost,
            data: Bytes::from(data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(data: &[u8]) -> Next {
        Next::Output {
            lost: 0,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[tokio::test]
    async fn subscribers_get_the_scrollback_then_every_chunk_once() {
        let c = Console::new();
        c.push(b"before ");
        let mut a = c.subscribe();
        c.push(b"after");
        let mut b = c.subscribe();
        assert_eq!(a.scrollback(), b"before ");
        assert_eq!(b.scrollback(), b"before after");
        assert_eq!(a.next().await, out(b"after"));
        c.push(b"!");
        assert_eq!(a.next().await, out(b"!"));
        assert_eq!(b.next().await, out(b"!"), "no duplicate of `after`");
        c.end("powered off");
        assert_eq!(a.next().await, Next::Stopped("powered off".into()));
        assert_eq!(b.next().await, Next::Stopped("powered off".into()));
        let mut c2 = Console::new().subscribe();
        c2.console.close();
        assert_eq!(c2.next().await, Next::Closing);
        // Subscribing to a stopped console: its scrollback, then the stop.
        let mut late = c.subscribe();
        assert_eq!(late.scrollback(), b"before after!");
        assert_eq!(late.next().await, Next::Stopped("powered off".into()));
    }

    #[tokio::test]
    async fn a_slow_subscriber_catches_up_from_the_ring_and_never_blocks_others() {
        // Two chunks of broadcast, 8 bytes of scrollback.
        let c = Console::with_capacity(8, 2);
        let mut slow = c.subscribe();
        let mut fast = c.subscribe();
        for chunk in [b"ab", b"cd", b"ef"] {
            c.push(chunk);
            assert_eq!(fast.next().await, out(chunk));
        }
        // `slow` missed chunks but the ring still has them: nothing lost.
        let mut got = Vec::new();
        while got.len() < 6 {
            match slow.next().await {
                Next::Output { lost, data } => {
                    assert_eq!(lost, 0);
                    got.extend_from_slice(&data);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, b"abcdef");
        // Falling further behind than the ring: told how much was lost.
        for chunk in [b"0123", b"4567", b"89ab", b"cdef"] {
            c.push(chunk);
        }
        match slow.next().await {
            Next::Output { lost, data } => {
                assert_eq!((lost, &data[..]), (8, &b"89abcdef"[..]));
            }
            other => panic!("{other:?}"),
        }
        c.push(b"z");
        assert_eq!(slow.next().await, out(b"z"));
    }

    #[tokio::test]
    async fn input_goes_through_the_pipe_in_whole_frames() {
        let c = Console::new();
        assert_eq!(
            c.write_input(Bytes::from_static(b"x")),
            Err(InputError::NotConnected)
        );
        let (tx, mut rx) = tokio::net::unix::pipe::pipe().unwrap();
        c.attach_input(tx);
        c.write_input(Bytes::from_static(b"hello ")).unwrap();
        c.write_input(Bytes::from_static(b"world")).unwrap();
        let mut got = vec![0u8; 11];
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"hello world");
        c.end("stopped");
        assert_eq!(
            c.write_input(Bytes::from_static(b"x")),
            Err(InputError::NotConnected)
        );
    }
}
