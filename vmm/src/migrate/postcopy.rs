//! Post-copy live migration (`migrate-to ... --postcopy`): for guests that
//! dirty memory faster than the link can carry it, pre-copy never
//! converges. With post-copy the source copies memory once while the guest
//! runs, then stops it and sends only the vCPU/device state and the list
//! of pages dirtied since; the target runs the guest at once, those pages
//! missing (userfaultfd, [`vireo_vmcore::demand`]). A page the guest (or a
//! device, or the kernel) touches is requested from the source and waited
//! for; the source pushes all the others behind, requested ones first.
//!
//! The price, as with every post-copy: once the target has acknowledged
//! the state and runs the guest, the guest's memory is split between two
//! hosts until the last page has arrived. If the link breaks then, the
//! target stops the VM (its memory is incomplete) and the source keeps its
//! copy paused — it is NOT resumed, as the target may have run the guest
//! on; the operator decides. Before the acknowledgement, a failure leaves
//! the guest running on the source as with pre-copy.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hypervisor::dirty;
use vireo_sandbox::seccomp::{self, ThreadKind};
use vireo_vmcore::demand::DemandMemory;
use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend, GuestMemoryRegion};
use vireo_vmcore::migration::{self as stream, Kind, MessageBuffer, MigrationError};
use vireo_vmcore::{ExitReason, VmControl};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::transport::{Conn, Sock};

/// How long a side waits for a read before going back to sending.
const POLL: Duration = Duration::from_millis(2);
/// Pages per pushed message: small, so a request is never queued behind
/// much.
const PUSH_BATCH: usize = 64;
/// No word from the peer for this long: it is gone.
const SILENCE: Duration = Duration::from_secs(60);

/// What the source's post-copy phase reports.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PostcopyStats {
    /// Pages the target asked for (the guest was waiting on them).
    pub pages_requested: u64,
    /// Pages pushed in the background.
    pub pages_pushed: u64,
    /// From the target's acknowledgement to its last page.
    pub postcopy_ms: u64,
}

/// Which side of the link a post-copy error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Source,
    Target,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Source => "the source",
            Peer::Target => "the target",
        })
    }
}

/// Why post-copy failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("{0}: {1}")]
    Receive(Peer, #[source] MigrationError),
    #[error("sending to {0}: {1}")]
    Send(Peer, #[source] MigrationError),
    /// The peer said why it stopped.
    #[error(transparent)]
    Refused(MigrationError),
    /// A message that does not parse.
    #[error(transparent)]
    Decode(MigrationError),
    #[error("{0} sent {1:?} during post-copy")]
    Unexpected(Peer, Kind),
    #[error("the target finished before acknowledging the state")]
    CompleteBeforeAck,
    #[error("the target asked for a page of region {0}, which does not exist")]
    RequestedRegion(u32),
    #[error("the target asked for page {page} outside region {region}")]
    RequestedPage { region: u32, page: u64 },
    #[error("the source sent pages of region {0}, which does not exist")]
    SentRegion(u32),
    #[error("the source sent page {page} outside region {region}")]
    SentPage { region: u32, page: u64 },
    #[error("a fault at {0:#x}, outside guest RAM")]
    FaultOutside(u64),
    #[error("no word from {peer} for {} s", .silence.as_secs())]
    Silence { peer: Peer, silence: Duration },
    /// Guest memory's missing pages (userfaultfd).
    #[error("{0}")]
    Demand(#[source] vireo_vmcore::demand::DemandError),
    #[error("post-copy eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the post-copy {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

/// How the source's serve loop ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Before the target acknowledged the state: the guest never ran
    /// there, the source may resume it.
    #[error("{0}; the VM keeps running here")]
    BeforeAck(PostcopyError),
    /// After: the guest's memory is split; the source must stay paused.
    #[error("post-copy failed after the target took over: {0}; the VM is paused here with its memory intact (the target stops its copy): resume it here with `resume` only if the target's copy is gone")]
    AfterAck(PostcopyError),
}

/// The source after the switch: answer the target's requests first and,
/// once the target runs the guest, push every other page of `pending`
/// behind them (at most `push_bytes_per_sec`, leaving the link to the
/// requests), until the target says it has them all. `ack_seen` is called
/// when the target acknowledges the state (the downtime ends there).
#[allow(clippy::too_many_arguments)]
pub fn serve(
    conn: &mut dyn Conn,
    tcp: &Sock,
    mem: &GuestMemory,
    mut pending: Vec<Vec<u64>>,
    push_bytes_per_sec: Option<u64>,
    stats: &mut PostcopyStats,
    bytes_sent: &mut u64,
    ack_seen: &mut dyn FnMut(),
) -> Result<(), ServeError> {
    let _ = tcp.set_read_timeout(Some(POLL));
    let mut buf = MessageBuffer::new(stream::MAX_PAGES_PAYLOAD);
    let mut requests: VecDeque<(u32, u64)> = VecDeque::new();
    let mut acked_at: Option<Instant> = None;
    let mut heard = Instant::now();
    let regions: Vec<_> = mem.iter().collect();
    let fail = |acked: bool, msg: PostcopyError| {
        if acked {
            ServeError::AfterAck(msg)
        } else {
            ServeError::BeforeAck(msg)
        }
    };
    // Background order: region by region, low pages first.
    let mut cursor: (usize, u64) = (0, 0);
    let mut idle = false;
    loop {
        // Everything the target said (waiting for it only when there is
        // nothing to push).
        let wait = if idle {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        if readable([tcp.as_raw_fd()], wait)[0] {
            buf.fill(conn)
                .map_err(|e| fail(acked_at.is_some(), PostcopyError::Receive(Peer::Target, e)))?;
        }
        loop {
            let msg = match buf.next_message() {
                Ok(m) => m,
                Err(e) => {
                    return Err(fail(
                        acked_at.is_some(),
                        PostcopyError::Receive(Peer::Target, e),
                    ))
                }
            };
            let Some((kind, payload)) = msg else { break };
            heard = Instant::now();
            match kind {
                Kind::PageRequest => match stream::decode_request(&payload) {
                    Ok(r) => requests.push_back(r),
                    Err(e) => return Err(fail(acked_at.is_some(), PostcopyError::Decode(e))),
                },
                Kind::Ack => {
                    acked_at = Some(Instant::now());
                    ack_seen();
                }
                Kind::Error => {
                    let why = String::from_utf8_lossy(&payload).to_string();
                    return Err(fail(
                        acked_at.is_some(),
                        PostcopyError::Refused(MigrationError::Refused(why)),
                    ));
                }
                Kind::Complete => {
                    if acked_at.is_none() {
                        return Err(ServeError::BeforeAck(PostcopyError::CompleteBeforeAck));
                    }
                    stats.postcopy_ms = acked_at.map_or(0, |t| t.elapsed().as_millis() as u64);
                    return Ok(());
                }
                other => {
                    return Err(fail(
                        acked_at.is_some(),
                        PostcopyError::Unexpected(Peer::Target, other),
                    ))
                }
            }
        }
        // Requested pages first (one message each: the guest waits).
        let mut sent_any = false;
        while let Some((region, page)) = requests.pop_front() {
            let Some(r) = regions.get(region as usize) else {
                return Err(fail(
                    acked_at.is_some(),
                    PostcopyError::RequestedRegion(region),
                ));
            };
            if stream::page_offset(r.len(), page).is_none() {
                return Err(fail(
                    acked_at.is_some(),
                    PostcopyError::RequestedPage { region, page },
                ));
            }
            clear(&mut pending[region as usize], page);
            let data = stream::page_bytes(r, page);
            let msg = stream::encode_pages(region, &[page], data);
            *bytes_sent +=
                write(conn, Kind::Pages, &msg).map_err(|e| fail(acked_at.is_some(), e))?;
            stats.pages_requested += 1;
            sent_any = true;
        }
        // Then a batch of the rest, once the guest runs there, within the
        // push rate.
        let batch = match (acked_at, push_bytes_per_sec) {
            (None, _) => 0,
            (Some(_), None) => PUSH_BATCH,
            (Some(t), Some(rate)) => {
                let allowed = t.elapsed().as_micros() as u64 * rate / 1_000_000;
                let pushed = stats.pages_pushed * stream::PAGE_SIZE;
                (allowed.saturating_sub(pushed) / stream::PAGE_SIZE).min(PUSH_BATCH as u64) as usize
            }
        };
        let mut pages = Vec::with_capacity(PUSH_BATCH);
        let mut data = Vec::with_capacity(PUSH_BATCH * stream::PAGE_SIZE as usize);
        while cursor.0 < regions.len() && pages.len() < batch {
            let (ri, from) = cursor;
            let r = regions[ri];
            let region_pages = r.len() / stream::PAGE_SIZE;
            match next_set(&pending[ri], from, region_pages) {
                Some(p) => {
                    clear(&mut pending[ri], p);
                    pages.push(p);
                    data.extend_from_slice(stream::page_bytes(r, p));
                    cursor = (ri, p + 1);
                }
                None => {
                    if !pages.is_empty() {
                        break;
                    }
                    cursor = (ri + 1, 0);
                }
            }
        }
        if !pages.is_empty() {
            let msg = stream::encode_pages(cursor.0 as u32, &pages, &data);
            *bytes_sent +=
                write(conn, Kind::Pages, &msg).map_err(|e| fail(acked_at.is_some(), e))?;
            stats.pages_pushed += pages.len() as u64;
            sent_any = true;
        }
        // Nothing to push right now (all sent, not acknowledged yet, or
        // held back by the push rate): wait for the target instead.
        idle = !sent_any && (cursor.0 >= regions.len() || acked_at.is_none());
        if push_bytes_per_sec.is_some() && !sent_any && cursor.0 < regions.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if sent_any {
            heard = Instant::now();
        } else if heard.elapsed() > SILENCE {
            return Err(fail(
                acked_at.is_some(),
                PostcopyError::Silence {
                    peer: Peer::Target,
                    silence: SILENCE,
                },
            ));
        }
    }
}

/// Wait up to `timeout` for any of `fds` to be readable; which are.
fn readable<const N: usize>(fds: [RawFd; N], timeout: Duration) -> [bool; N] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is N valid pollfds for the duration of the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n <= 0 {
        return [false; N];
    }
    p.map(|q| q.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

fn write(conn: &mut dyn Conn, kind: Kind, payload: &[u8]) -> Result<u64, PostcopyError> {
    let n = stream::write_message(conn, kind, payload)
        .map_err(|e| PostcopyError::Send(Peer::Target, e))?;
    conn.flush()
        .map_err(|e| PostcopyError::Send(Peer::Target, MigrationError::Io(e)))?;
    Ok(n)
}

fn clear(bits: &mut [u64], page: u64) {
    if let Some(w) = bits.get_mut((page / 64) as usize) {
        *w &= !(1 << (page % 64));
    }
}

/// The first set page at or after `from` (below `limit`).
fn next_set(bits: &[u64], from: u64, limit: u64) -> Option<u64> {
    let mut w = (from / 64) as usize;
    let mut word = bits.get(w)? & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            let p = w as u64 * 64 + u64::from(word.trailing_zeros());
            return (p < limit).then_some(p);
        }
        w += 1;
        word = *bits.get(w)?;
    }
}

/// What the target's post-copy thread is told by the main thread.
enum Command {
    Ack(Arc<VmControl>),
    Refuse(String),
}

/// The target's side: guest memory armed for the missing pages, a thread
/// that takes the faults and one that talks to the source.
pub struct Target {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    done: Arc<AtomicBool>,
}

impl Target {
    /// Arm `memory` (the pages set in `missing` are fetched on demand) and
    /// start serving faults; call before anything touches guest memory.
    pub(crate) fn start(
        memory: &GuestMemory,
        missing: &[Vec<u64>],
        conn: Box<dyn Conn>,
        tcp: Sock,
    ) -> Result<Target, PostcopyError> {
        let demand = Arc::new(
            DemandMemory::register_missing(memory, missing).map_err(PostcopyError::Demand)?,
        );
        let total = demand.missing();
        tracing::info!(
            "post-copy: {total} pages ({} MiB) to fetch while the guest runs",
            (total as u64 * stream::PAGE_SIZE) >> 20
        );
        let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let done = Arc::new(AtomicBool::new(false));
        let (faults_tx, faults) = channel::<u64>();
        let (commands, commands_rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(PostcopyError::EventFd)?);
        {
            let demand = demand.clone();
            let done = done.clone();
            let wake = wake.clone();
            seccomp::spawn(
                ThreadKind::Migration,
                std::thread::Builder::new().name("postcopy-faults".into()),
                move || {
                    while !done.load(Ordering::Acquire) {
                        match demand.next_fault(Duration::from_millis(50)) {
                            Ok(Some(gpa)) => {
                                if faults_tx.send(gpa).is_err() {
                                    return;
                                }
                                let _ = wake.write(1);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::error!("post-copy: reading page faults: {e}");
                                return;
                            }
                        }
                    }
                },
            )
            .map_err(|source| PostcopyError::Thread {
                name: "fault",
                source,
            })?;
        }
        {
            let done = done.clone();
            let wake = wake.clone();
            seccomp::spawn(
                ThreadKind::Migration,
                std::thread::Builder::new().name("postcopy-link".into()),
                move || {
                    let mut link = Link {
                        conn,
                        wake,
                        tcp,
                        demand,
                        regions,
                        faults,
                        commands: commands_rx,
                        control: None,
                        requested: HashSet::new(),
                        fetched: 0,
                        started: Instant::now(),
                    };
                    let result = link.run();
                    done.store(true, Ordering::Release);
                    if let Err(e) = result {
                        tracing::error!("post-copy: {e}");
                        if let Some(c) = &link.control {
                            c.request_exit(ExitReason::Failed(format!(
                                "post-copy migration failed with guest memory incomplete: {e}"
                            )));
                        }
                    }
                },
            )
            .map_err(|source| PostcopyError::Thread {
                name: "link",
                source,
            })?;
        }
        Ok(Target {
            commands,
            wake,
            done,
        })
    }

    /// The machine is built: tell the source, which from now on only sends
    /// pages. If the link fails before every page is in, `control` stops
    /// the VM.
    pub fn ack(&self, control: Arc<VmControl>) {
        let _ = self.commands.send(Command::Ack(control));
        let _ = self.wake.write(1);
    }

    /// The machine could not be built: tell the source (which resumes).
    pub fn refuse(&self, why: &str) {
        let _ = self.commands.send(Command::Refuse(why.to_string()));
        let _ = self.wake.write(1);
        // Let the link thread say it before the process exits.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.done.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Link {
    conn: Box<dyn Conn>,
    /// Signalled with each fault and command, so they are answered at
    /// once rather than after the next read.
    wake: Arc<EventFd>,
    tcp: Sock,
    demand: Arc<DemandMemory>,
    regions: Vec<(u64, u64)>,
    faults: Receiver<u64>,
    commands: Receiver<Command>,
    control: Option<Arc<VmControl>>,
    requested: HashSet<u64>,
    fetched: u64,
    started: Instant,
}

impl Link {
    fn run(&mut self) -> Result<(), PostcopyError> {
        let _ = self.tcp.set_read_timeout(Some(POLL));
        let mut buf = MessageBuffer::new(stream::MAX_PAGES_PAYLOAD);
        let mut heard = Instant::now();
        loop {
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    Command::Ack(control) => {
                        self.control = Some(control);
                        self.send(Kind::Ack, &[])?;
                    }
                    Command::Refuse(why) => {
                        self.send(Kind::Error, why.as_bytes())?;
                        return Ok(());
                    }
                }
            }
            while let Ok(gpa) = self.faults.try_recv() {
                if self.demand.is_present(gpa) || !self.requested.insert(gpa) {
                    continue;
                }
                let (region, page) = self.locate(gpa)?;
                self.send(Kind::PageRequest, &stream::encode_request(region, page))?;
            }
            if self.demand.missing() == 0 && self.control.is_some() {
                self.send(Kind::Complete, &[])?;
                tracing::info!(
                    "post-copy: every page in after {} ms ({} fetched on demand)",
                    self.started.elapsed().as_millis(),
                    self.fetched
                );
                return Ok(());
            }
            let [sock, woken] = readable(
                [self.tcp.as_raw_fd(), self.wake.as_raw_fd()],
                Duration::from_millis(100),
            );
            if woken {
                let _ = self.wake.read();
            }
            if sock {
                buf.fill(self.conn.as_mut())
                    .map_err(|e| PostcopyError::Receive(Peer::Source, e))?;
            } else if heard.elapsed() > SILENCE {
                return Err(PostcopyError::Silence {
                    peer: Peer::Source,
                    silence: SILENCE,
                });
            }
            while let Some((kind, payload)) = buf
                .next_message()
                .map_err(|e| PostcopyError::Receive(Peer::Source, e))?
            {
                self.handle(kind, &payload)?;
                heard = Instant::now();
            }
        }
    }

    /// A message from the source.
    fn handle(&mut self, kind: Kind, payload: &[u8]) -> Result<(), PostcopyError> {
        match kind {
            Kind::Pages => {
                let (region, pages, data) =
                    stream::decode_pages(payload).map_err(PostcopyError::Decode)?;
                let &(base, len) = self
                    .regions
                    .get(region as usize)
                    .ok_or(PostcopyError::SentRegion(region))?;
                for (page, bytes) in pages
                    .iter()
                    .zip(data.chunks_exact(stream::PAGE_SIZE as usize))
                {
                    // A page number from the peer: checked, no overflow.
                    let gpa = stream::page_offset(len, *page)
                        .and_then(|off| base.checked_add(off as u64))
                        .ok_or(PostcopyError::SentPage {
                            region,
                            page: *page,
                        })?;
                    if self.requested.remove(&gpa) {
                        self.fetched += 1;
                    }
                    self.demand
                        .install(gpa, bytes)
                        .map_err(PostcopyError::Demand)?;
                }
                Ok(())
            }
            Kind::Error => Err(PostcopyError::Refused(MigrationError::Refused(
                String::from_utf8_lossy(payload).into(),
            ))),
            other => Err(PostcopyError::Unexpected(Peer::Source, other)),
        }
    }

    fn locate(&self, gpa: u64) -> Result<(u32, u64), PostcopyError> {
        self.regions
            .iter()
            .position(|&(base, len)| gpa >= base && gpa - base < len)
            .map(|i| (i as u32, (gpa - self.regions[i].0) / stream::PAGE_SIZE))
            .ok_or(PostcopyError::FaultOutside(gpa))
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), PostcopyError> {
        stream::write_message(self.conn.as_mut(), kind, payload)
            .and_then(|_| self.conn.flush().map_err(MigrationError::Io))
            .map_err(|e| PostcopyError::Send(Peer::Source, e))
    }
}

/// Pages set in any of `bitmaps`.
pub(super) fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps.iter().map(|b| dirty::count(b)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_walks_the_bitmap() {
        let bits = vec![0b1010u64, 0, 1 << 63, 1];
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(p) = next_set(&bits, from, 200) {
            found.push(p);
            from = p + 1;
        }
        assert_eq!(found, vec![1, 3, 191, 192]);
        assert_eq!(next_set(&bits, 0, 2), Some(1));
        assert_eq!(next_set(&bits, 4, 150), None);
        let mut b = bits.clone();
        clear(&mut b, 191);
        assert_eq!(next_set(&b, 4, 200), Some(192));
    }
}
