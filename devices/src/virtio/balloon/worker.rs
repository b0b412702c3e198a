//! The balloon's device thread: inflate and deflate page lists, the
//! statistics buffer and free page reports, each checked against guest RAM
//! before any page is discarded.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};

use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    BalloonStats, Shared, BALLOON_PAGE_SIZE, MAX_PAGES_PER_LIST, MAX_STATS_BYTES, STAT_SIZE,
};
use crate::virtio::worker::{rekick, EpollCtl, EventHandler, CHAINS_PER_WAKEUP};
use crate::virtio::{ActiveQueue, Interrupt, InterruptKind, Queue};

const TOKEN_INFLATE: u64 = 0;
const TOKEN_DEFLATE: u64 = 1;
const TOKEN_STATS: u64 = 2;
const TOKEN_REPORTING: u64 = 3;
const TOKEN_STATS_REQUEST: u64 = 4;

struct Role {
    index: u16,
    queue: Queue,
    notify: EventFd,
}

/// Complaints logged once per activation.
#[derive(Default)]
struct Warned {
    direction: bool,
    odd_length: bool,
    outside_ram: bool,
    madvise: bool,
    long_list: bool,
}

pub(super) struct BalloonWorker {
    memory: GuestMemory,
    inflate: Role,
    deflate: Role,
    stats: Option<Role>,
    reporting: Option<Role>,
    stats_request: EventFd,
    /// The statistics buffer the device holds until it wants new numbers.
    held_stats: Option<u16>,
    interrupt: Arc<dyn Interrupt>,
    shared: Arc<Shared>,
    warned: Warned,
}

/// The queues the driver enabled, by role.
pub(super) struct BalloonQueues {
    pub(super) inflate: ActiveQueue,
    pub(super) deflate: ActiveQueue,
    pub(super) stats: Option<ActiveQueue>,
    pub(super) reporting: Option<ActiveQueue>,
}

fn role(q: ActiveQueue) -> Role {
    Role {
        index: q.index,
        queue: q.queue,
        notify: q.notify,
    }
}

impl BalloonWorker {
    /// The thread's state: the queues, the host's statistics requests and
    /// the state it shares with the device.
    pub(super) fn new(
        memory: GuestMemory,
        queues: BalloonQueues,
        stats_request: EventFd,
        interrupt: Arc<dyn Interrupt>,
        shared: Arc<Shared>,
    ) -> BalloonWorker {
        BalloonWorker {
            memory,
            inflate: role(queues.inflate),
            deflate: role(queues.deflate),
            stats: queues.stats.map(role),
            reporting: queues.reporting.map(role),
            stats_request,
            held_stats: None,
            interrupt,
            shared,
            warned: Warned::default(),
        }
    }

    /// What the thread waits on, with the tokens its handler expects.
    pub(super) fn fds(&self) -> Vec<(RawFd, EventSet, u64)> {
        let mut fds = vec![
            (self.inflate.notify.as_raw_fd(), EventSet::IN, TOKEN_INFLATE),
            (self.deflate.notify.as_raw_fd(), EventSet::IN, TOKEN_DEFLATE),
            (
                self.stats_request.as_raw_fd(),
                EventSet::IN,
                TOKEN_STATS_REQUEST,
            ),
        ];
        if let Some(q) = &self.stats {
            fds.push((q.notify.as_raw_fd(), EventSet::IN, TOKEN_STATS));
        }
        if let Some(q) = &self.reporting {
            fds.push((q.notify.as_raw_fd(), EventSet::IN, TOKEN_REPORTING));
        }
        fds
    }
}

impl EventHandler for BalloonWorker {
    fn handle(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl) -> bool {
        // Reading an eventfd clears it; EAGAIN is only a spurious wakeup.
        match token {
            TOKEN_INFLATE => {
                let _ = self.inflate.notify.read();
                self.process_pfns(true)
            }
            TOKEN_DEFLATE => {
                let _ = self.deflate.notify.read();
                self.process_pfns(false)
            }
            TOKEN_STATS => {
                if let Some(r) = &self.stats {
                    let _ = r.notify.read();
                }
                self.receive_stats()
            }
            TOKEN_STATS_REQUEST => {
                let _ = self.stats_request.read();
                self.return_stats_buffer()
            }
            TOKEN_REPORTING => {
                if let Some(r) = &self.reporting {
                    let _ = r.notify.read();
                }
                self.process_reports()
            }
            _ => true,
        }
    }
}

/// Why a range was not discarded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DiscardError {
    OutsideRam,
    Unaligned,
    Madvise(i32),
}

/// The host page size (4 KiB on x86-64).
fn host_page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
    })
}

/// The RAM region holding all of `[gpa, gpa + len)`, as (its guest start,
/// its length).
pub(super) fn ram_region(memory: &GuestMemory, gpa: u64, len: u64) -> Option<(u64, u64)> {
    let region = memory.find_region(GuestAddress(gpa))?;
    let start = region.start_addr().0;
    let end = gpa.checked_add(len)?;
    (end <= start.checked_add(region.len())?).then_some((start, region.len()))
}

/// Give the host memory behind guest-physical `[gpa, gpa + len)` back to
/// the host: the range must lie in one RAM region and be host-page
/// aligned. Private memory reads back as zeros afterwards, shared memory
/// (memfd, hugetlbfs) has its backing punched out.
pub(super) fn discard(memory: &GuestMemory, gpa: u64, len: u64) -> Result<(), DiscardError> {
    if len == 0 {
        return Ok(());
    }
    let region = memory
        .find_region(GuestAddress(gpa))
        .ok_or(DiscardError::OutsideRam)?;
    let offset = gpa - region.start_addr().0;
    let end = offset.checked_add(len).ok_or(DiscardError::OutsideRam)?;
    if end > region.len() {
        return Err(DiscardError::OutsideRam);
    }
    let host = region.as_ptr() as u64 + offset;
    let page = host_page_size();
    if host % page != 0 || len % page != 0 {
        return Err(DiscardError::Unaligned);
    }
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: [host, host + len) lies inside this region's mapping (checked
    // above), which stays mapped while `memory` holds the region. Dropping
    // those pages only changes guest memory the guest itself gave up; the
    // device holds no Rust reference into it.
    let r = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) };
    if r != 0 {
        return Err(DiscardError::Madvise(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    Ok(())
}

/// Consecutive pages to discard together (one madvise for a run).
struct Run {
    start: u64,
    len: u64,
    region: u64,
}

impl BalloonWorker {
    fn warn_once(flag: &mut bool, msg: std::fmt::Arguments) {
        if !*flag {
            *flag = true;
            tracing::warn!("virtio-balloon: {msg} (logged once)");
        }
    }

    fn discard_logged(&mut self, gpa: u64, len: u64) -> bool {
        match discard(&self.memory, gpa, len) {
            Ok(()) => true,
            Err(DiscardError::OutsideRam) => {
                Self::warn_once(
                    &mut self.warned.outside_ram,
                    format_args!(
                        "the guest gave back {len:#x} bytes at {gpa:#x}, not within one RAM \
                         region; ignored"
                    ),
                );
                false
            }
            Err(e) => {
                Self::warn_once(
                    &mut self.warned.madvise,
                    format_args!(
                        "cannot discard {len:#x} bytes at guest {gpa:#x} ({e:?}); the memory \
                         stays allocated"
                    ),
                );
                false
            }
        }
    }

    /// Inflate (discard the listed pages) or deflate (count them).
    fn process_pfns(&mut self, inflate: bool) -> bool {
        let memory = self.memory.clone();
        let mut used_any = false;
        let mut served = 0usize;
        loop {
            let role = if inflate {
                &mut self.inflate
            } else {
                &mut self.deflate
            };
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                if !rekick(&role.notify, "virtio-balloon") {
                    return false;
                }
                break;
            }
            let Some(chain) = role.queue.pop_descriptor_chain(&memory) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            if chain.clone().writable().next().is_some() {
                Self::warn_once(
                    &mut self.warned.direction,
                    format_args!("device-writable buffers on a page list are skipped"),
                );
            }
            let mut pages = 0u64;
            match chain.reader(&memory) {
                Ok(mut reader) => {
                    if reader.available_bytes() % 4 != 0 {
                        Self::warn_once(
                            &mut self.warned.odd_length,
                            format_args!(
                                "a page list of {} bytes is not whole 32-bit page numbers; the \
                                 tail is ignored",
                                reader.available_bytes()
                            ),
                        );
                    }
                    if reader.available_bytes() > MAX_PAGES_PER_LIST * 4 {
                        Self::warn_once(
                            &mut self.warned.long_list,
                            format_args!(
                                "a page list of {} page numbers; only the first \
                                 {MAX_PAGES_PER_LIST} are taken",
                                reader.available_bytes() / 4
                            ),
                        );
                    }
                    let mut left = MAX_PAGES_PER_LIST * 4;
                    let mut run: Option<Run> = None;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = reader.available_bytes().min(buf.len()).min(left) & !3;
                        left -= n;
                        if n == 0 || reader.read_exact(&mut buf[..n]).is_err() {
                            break;
                        }
                        for pfn in buf[..n].chunks_exact(4) {
                            let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
                            let gpa = u64::from(pfn) * BALLOON_PAGE_SIZE;
                            let Some((region, _)) = ram_region(&memory, gpa, BALLOON_PAGE_SIZE)
                            else {
                                Self::warn_once(
                                    &mut self.warned.outside_ram,
                                    format_args!(
                                        "page frame {pfn:#x} is outside guest RAM; ignored"
                                    ),
                                );
                                continue;
                            };
                            pages += 1;
                            if !inflate {
                                continue;
                            }
                            match &mut run {
                                Some(r) if r.region == region && r.start + r.len == gpa => {
                                    r.len += BALLOON_PAGE_SIZE;
                                }
                                _ => {
                                    if let Some(r) = run.take() {
                                        self.discard_logged(r.start, r.len);
                                    }
                                    run = Some(Run {
                                        start: gpa,
                                        len: BALLOON_PAGE_SIZE,
                                        region,
                                    });
                                }
                            }
                        }
                    }
                    if let Some(r) = run {
                        self.discard_logged(r.start, r.len);
                    }
                }
                Err(e) => Self::warn_once(
                    &mut self.warned.outside_ram,
                    format_args!("a page list buffer is outside guest memory ({e}); ignored"),
                ),
            }
            {
                let mut st = self.shared.state();
                if inflate {
                    st.inflated_pages += pages;
                } else {
                    st.deflated_pages += pages;
                }
            }
            let role = if inflate {
                &mut self.inflate
            } else {
                &mut self.deflate
            };
            if !put_used(&memory, role, head, 0) {
                return false;
            }
            used_any = true;
        }
        let role = if inflate {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        !used_any || notify(&memory, role, &*self.interrupt)
    }

    /// Read the statistics the driver posted and keep the buffer.
    fn receive_stats(&mut self) -> bool {
        let memory = self.memory.clone();
        let Some(role) = self.stats.as_mut() else {
            return true;
        };
        let mut returned = false;
        let mut served = 0usize;
        loop {
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                if !rekick(&role.notify, "virtio-balloon") {
                    return false;
                }
                break;
            }
            let Some(chain) = role.queue.pop_descriptor_chain(&memory) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            // Each report stands alone: a statistic the guest stopped
            // sending is gone.
            let generation = self
                .shared
                .state()
                .stats
                .as_ref()
                .map_or(0, |s| s.generation);
            let mut stats = BalloonStats {
                generation: generation + 1,
                ..BalloonStats::default()
            };
            let mut bytes = vec![0u8; 0];
            match chain.reader(&memory) {
                Ok(mut r) => {
                    let n = r.available_bytes().min(MAX_STATS_BYTES);
                    bytes.resize(n, 0);
                    if r.read_exact(&mut bytes).is_err() {
                        bytes.clear();
                    }
                }
                Err(e) => Self::warn_once(
                    &mut self.warned.outside_ram,
                    format_args!("a statistics buffer is outside guest memory ({e}); ignored"),
                ),
            }
            for s in bytes.chunks_exact(STAT_SIZE) {
                let tag = u16::from_le_bytes([s[0], s[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&s[2..10]);
                stats.set(tag, u64::from_le_bytes(v));
            }
            self.shared.state().stats = Some(stats);
            // The driver keeps one buffer posted; if it posts another, the
            // older one goes back.
            if let Some(old) = self.held_stats.replace(head) {
                if !put_used(&memory, role, old, 0) {
                    return false;
                }
                returned = true;
            }
        }
        !returned || notify(&memory, role, &*self.interrupt)
    }

    /// Hand the statistics buffer back: the driver refills it and posts it
    /// again.
    fn return_stats_buffer(&mut self) -> bool {
        let (Some(role), Some(head)) = (self.stats.as_mut(), self.held_stats.take()) else {
            return true;
        };
        put_used(&self.memory, role, head, 0) && notify(&self.memory, role, &*self.interrupt)
    }

    /// Discard each reported free range and return the buffer.
    fn process_reports(&mut self) -> bool {
        let memory = self.memory.clone();
        let mut used_any = false;
        let mut served = 0usize;
        loop {
            let Some(role) = self.reporting.as_mut() else {
                return true;
            };
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                if !rekick(&role.notify, "virtio-balloon") {
                    return false;
                }
                break;
            }
            let Some(chain) = role.queue.pop_descriptor_chain(&memory) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            let mut reported = 0u64;
            for desc in chain {
                if !desc.is_write_only() {
                    Self::warn_once(
                        &mut self.warned.direction,
                        format_args!("device-readable buffers in a free page report are skipped"),
                    );
                    continue;
                }
                // Only whole pages inside the range: round the start up and
                // the end down, so no byte outside it is lost.
                let page = host_page_size().max(BALLOON_PAGE_SIZE);
                let gpa = desc.addr().0;
                let Some(end) = gpa.checked_add(u64::from(desc.len())) else {
                    continue;
                };
                // (A range at the top of the address space has no page
                // boundary to round up to.)
                let Some(start) = gpa.div_ceil(page).checked_mul(page) else {
                    continue;
                };
                let end = end / page * page;
                if end > start && self.discard_logged(start, end - start) {
                    reported += end - start;
                }
            }
            self.shared.state().reported_bytes += reported;
            let Some(role) = self.reporting.as_mut() else {
                return true;
            };
            if !put_used(&memory, role, head, 0) {
                return false;
            }
            used_any = true;
        }
        match self.reporting.as_mut() {
            Some(role) if used_any => notify(&memory, role, &*self.interrupt),
            _ => true,
        }
    }
}

fn put_used(memory: &GuestMemory, role: &mut Role, head: u16, len: u32) -> bool {
    match role.queue.add_used(memory, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "virtio-balloon: cannot return chain {head} on queue {}: {e}",
                role.index
            );
            false
        }
    }
}

fn notify(memory: &GuestMemory, role: &mut Role, interrupt: &dyn Interrupt) -> bool {
    match role.queue.needs_notification(memory) {
        Ok(true) => {
            if let Err(e) = interrupt.signal(InterruptKind::Queue(role.index)) {
                tracing::warn!("virtio-balloon: cannot interrupt the guest: {e}");
            }
            true
        }
        Ok(false) => true,
        Err(e) => {
            tracing::warn!("virtio-balloon: cannot read the used event index: {e}");
            false
        }
    }
}
