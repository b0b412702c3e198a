//! virtio-balloon (virtio 1.2 §5.5): the host asks the guest for memory
//! back, the guest reports its free pages, and the guest's memory
//! statistics come to the host.
//!
//! * inflateq (0): the guest lists 4 KiB page frame numbers it gives up;
//!   the host discards them (`madvise(MADV_DONTNEED)` on the private
//!   anonymous guest mapping, so they read back as zeros and no longer use
//!   host memory).
//! * deflateq (1): pages the guest takes back; nothing to do on the host
//!   (they fault back in on first touch), only bookkeeping.
//! * statsq (with VIRTIO_BALLOON_F_STATS_VQ): the guest's statistics. The
//!   device keeps the buffer and hands it back when the host wants fresh
//!   numbers ([`BalloonHandle::request_stats`]); the guest then posts it
//!   again, filled in.
//! * reporting_vq (with VIRTIO_BALLOON_F_REPORTING): ranges of free guest
//!   memory, discarded like inflated pages and returned.
//!
//! Queue numbering follows the Linux driver (and QEMU): the optional
//! queues take the next indices in feature order, skipping those whose
//! feature was not negotiated. With both features the reporting queue is 3,
//! without STATS_VQ it is 2. (The spec's table lists fixed indices, with
//! reporting_vq at 4 after free_page_vq; no common driver or device uses
//! that layout.) FREE_PAGE_HINT is not offered.
//!
//! Every page frame and range comes from the guest: each must lie whole in
//! one guest RAM region, or it is ignored with a warning; nothing outside
//! guest RAM is ever touched.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use vireo_sandbox::seccomp::Device;

use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{rekick, EpollCtl, EventHandler, Worker, CHAINS_PER_WAKEUP};
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, ActiveQueue, Interrupt,
    InterruptKind, Queue, VirtioDevice,
};
use vireo_api::devices::balloon::{target_pages, BalloonConfig, BalloonError, PAGES_PER_MIB};

/// Feature bits (§5.5.3).
pub mod balloon_features {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    pub const PAGE_POISON: u64 = 1 << 4;
    /// Free page reporting (VIRTIO_BALLOON_F_REPORTING).
    pub const REPORTING: u64 = 1 << 5;
}

/// Statistic tags (§5.5.6.3, plus the ones Linux added after 1.2).
pub mod stat_tags {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size: page frame numbers are in 4 KiB units
/// (VIRTIO_BALLOON_PFN_SHIFT) whatever the guest's page size.
pub const BALLOON_PAGE_SIZE: u64 = 1 << 12;
/// One statistic: le16 tag, le64 value, packed.
const STAT_SIZE: usize = 10;
/// The most statistics bytes read from one buffer (Linux sends 16 × 10).
const MAX_STATS_BYTES: usize = 4096;
/// The most page frame numbers taken from one page list (Linux sends at
/// most 256): one chain may not keep the device thread for long (one
/// madvise per run of pages).
pub const MAX_PAGES_PER_LIST: usize = 4096;

/// Queue indices that never move.
const INFLATEQ: u16 = 0;
const DEFLATEQ: u16 = 1;

/// The guest's memory statistics as last reported; `None` for the ones
/// the guest did not send. Sizes are in bytes, the rest are counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
    /// Tags this device does not know, as (tag, value).
    pub other: Vec<(u16, u64)>,
    /// Counts the reports received since the device was created: a caller
    /// that asked for fresh statistics waits for it to change.
    pub generation: u64,
}

impl BalloonStats {
    fn set(&mut self, tag: u16, val: u64) {
        use stat_tags::*;
        let slot = match tag {
            SWAP_IN => &mut self.swap_in,
            SWAP_OUT => &mut self.swap_out,
            MAJFLT => &mut self.major_faults,
            MINFLT => &mut self.minor_faults,
            MEMFREE => &mut self.free_memory,
            MEMTOT => &mut self.total_memory,
            AVAIL => &mut self.available_memory,
            CACHES => &mut self.disk_caches,
            HTLB_PGALLOC => &mut self.hugetlb_allocations,
            HTLB_PGFAIL => &mut self.hugetlb_failures,
            OOM_KILL => &mut self.oom_kills,
            ALLOC_STALL => &mut self.alloc_stalls,
            ASYNC_SCAN => &mut self.async_scans,
            DIRECT_SCAN => &mut self.direct_scans,
            ASYNC_RECLAIM => &mut self.async_reclaims,
            DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => {
                match self.other.iter_mut().find(|(t, _)| *t == tag) {
                    Some(e) => e.1 = val,
                    None => self.other.push((tag, val)),
                }
                return;
            }
        };
        *slot = Some(val);
    }
}

/// The host-side state of the balloon (what a snapshot would save). The
/// target survives device resets; `actual` is the driver's and starts over.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// The host's target, in 4 KiB pages.
    pub num_pages: u32,
    /// The pages the driver says the balloon holds.
    pub actual: u32,
    pub stats: Option<BalloonStats>,
    /// 4 KiB pages discarded through the inflate queue.
    pub inflated_pages: u64,
    /// 4 KiB pages the guest took back.
    pub deflated_pages: u64,
    /// Bytes discarded through free page reporting.
    pub reported_bytes: u64,
}

struct Shared {
    state: Mutex<BalloonState>,
    /// Signalled by [`BalloonHandle::request_stats`].
    stats_request: EventFd,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, BalloonState> {
        // The state is plain data; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn interrupt(&self) -> MutexGuard<'_, Option<Arc<dyn Interrupt>>> {
        self.interrupt.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's control of the balloon. Clonable; works whether or not the
/// driver is active.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Ask the guest to hand `mib` MiB to the balloon (0 gives everything
    /// back) and tell an active driver.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        let pages = target_pages(mib)?;
        self.shared.state().num_pages = pages;
        let irq = self.shared.interrupt().clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.signal(InterruptKind::Config) {
                tracing::warn!("virtio-balloon: cannot tell the guest the new target: {e}");
            }
        }
        Ok(())
    }

    /// The host's target in MiB.
    pub fn target_mib(&self) -> u64 {
        u64::from(self.shared.state().num_pages) / PAGES_PER_MIB
    }

    /// How much the guest says the balloon holds, in MiB.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.shared.state().actual) / PAGES_PER_MIB
    }

    /// The statistics the guest last sent, if any.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.shared.state().stats.clone()
    }

    /// Ask the guest for fresh statistics; they arrive asynchronously (watch
    /// [`BalloonStats::generation`]). Does nothing unless the driver
    /// negotiated the statistics queue.
    pub fn request_stats(&self) {
        if let Err(e) = self.shared.stats_request.write(1) {
            tracing::warn!("virtio-balloon: cannot wake the device thread: {e}");
        }
    }

    /// A copy of the host-side state.
    pub fn state(&self) -> BalloonState {
        self.shared.state().clone()
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    config: BalloonConfig,
    shared: Arc<Shared>,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon with the target of `config`. Fails only when no eventfd
    /// can be created.
    pub fn new(config: BalloonConfig) -> std::io::Result<Balloon> {
        // Checked by from_options; a config built by hand is clamped.
        let num_pages = target_pages(config.target_mib).unwrap_or(u32::MAX);
        Ok(Balloon {
            config,
            shared: Arc::new(Shared {
                state: Mutex::new(BalloonState {
                    num_pages,
                    ..BalloonState::default()
                }),
                stats_request: EventFd::new(EFD_NONBLOCK)?,
                interrupt: Mutex::new(None),
            }),
            worker: None,
        })
    }

    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stop the worker; the driver's `actual` stays.
    fn stop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        *self.shared.interrupt() = None;
    }

    fn config_bytes(&self) -> [u8; 8] {
        let st = self.shared.state();
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&st.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&st.actual.to_le_bytes());
        c
    }
}

/// Offset of `actual` in the configuration space; `num_pages` before it
/// is the device's.
const CONFIG_ACTUAL: u64 = 4;

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn name(&self) -> String {
        "virtio-balloon".to_string()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut q = vec![QUEUE_SIZE; 3];
        if self.config.free_page_reporting {
            q.push(QUEUE_SIZE);
        }
        q
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1 | features::RING_INDIRECT_DESC | balloon_features::STATS_VQ;
        if self.config.deflate_on_oom {
            f |= balloon_features::DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= balloon_features::REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.config_bytes();
        let mut ignored = false;
        for (i, b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(at @ CONFIG_ACTUAL..8) => bytes[at as usize] = *b,
                _ => ignored = true,
            }
        }
        if ignored {
            tracing::debug!(
                "virtio-balloon: ignored a write outside `actual` (offset {offset:#x}, {} bytes)",
                data.len()
            );
        }
        let actual = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        self.shared.state().actual = actual;
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop();
        let Activation {
            memory,
            queues,
            interrupt,
            features: negotiated,
        } = activation;
        let got = queues.len();
        // Roles by index: inflate, deflate, then the optional queues in
        // feature order, each taking the next index only if negotiated.
        let mut next = DEFLATEQ + 1;
        let mut role_index = |feature: u64| {
            (negotiated & feature != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats_index = role_index(balloon_features::STATS_VQ);
        let reporting_index = role_index(balloon_features::REPORTING);
        let mut slots: [Option<ActiveQueue>; 4] = Default::default();
        for q in queues {
            let slot = match Some(q.index) {
                Some(INFLATEQ) => 0,
                Some(DEFLATEQ) => 1,
                i if i == stats_index => 2,
                i if i == reporting_index => 3,
                _ => {
                    tracing::warn!(
                        "virtio-balloon: the driver enabled queue {} which has no role with \
                         the negotiated features; ignored",
                        q.index
                    );
                    continue;
                }
            };
            slots[slot] = Some(q);
        }
        let [inflate, deflate, stats, reporting] = slots;
        let (Some(inflate), Some(deflate)) = (inflate, deflate) else {
            return Err(ActivateError::MissingQueues { need: 2, got });
        };
        let stats_request = self
            .shared
            .stats_request
            .try_clone()
            .map_err(ActivateError::Thread)?;
        // A request made before activation has nothing to act on.
        let _ = stats_request.read();

        let to_role = |q: ActiveQueue| Role {
            index: q.index,
            queue: q.queue,
            notify: q.notify,
        };
        let mut fds = vec![
            (inflate.notify.as_raw_fd(), EventSet::IN, TOKEN_INFLATE),
            (deflate.notify.as_raw_fd(), EventSet::IN, TOKEN_DEFLATE),
            (stats_request.as_raw_fd(), EventSet::IN, TOKEN_STATS_REQUEST),
        ];
        if let Some(q) = &stats {
            fds.push((q.notify.as_raw_fd(), EventSet::IN, TOKEN_STATS));
        }
        if let Some(q) = &reporting {
            fds.push((q.notify.as_raw_fd(), EventSet::IN, TOKEN_REPORTING));
        }
        let handler = BalloonWorker {
            memory,
            inflate: to_role(inflate),
            deflate: to_role(deflate),
            stats: stats.map(to_role),
            reporting: reporting.map(to_role),
            stats_request,
            held_stats: None,
            interrupt: interrupt.clone(),
            shared: self.shared.clone(),
            warned: Warned::default(),
        };
        *self.shared.interrupt() = Some(interrupt);
        match Worker::spawn("virtio-balloon", Device::Balloon, &fds, handler) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                *self.shared.interrupt() = None;
                Err(ActivateError::Thread(e))
            }
        }
    }

    fn reset(&mut self) {
        self.stop();
        // A new driver starts with an empty balloon and inflates it to the
        // target again.
        self.shared.state().actual = 0;
    }

    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }

    fn save_state(&self) -> serde_json::Value {
        super::encode_state(&*self.shared.state())
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        let saved: BalloonState = super::decode_state(state)?;
        *self.shared.state() = saved;
        Ok(())
    }
}

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

struct BalloonWorker {
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
enum DiscardError {
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
fn ram_region(memory: &GuestMemory, gpa: u64, len: u64) -> Option<(u64, u64)> {
    let region = memory.find_region(GuestAddress(gpa))?;
    let start = region.start_addr().0;
    let end = gpa.checked_add(len)?;
    (end <= start.checked_add(region.len())?).then_some((start, region.len()))
}

/// Give the host memory behind guest-physical `[gpa, gpa + len)` back to
/// the host: the range must lie in one RAM region and be host-page
/// aligned. Private memory reads back as zeros afterwards, shared memory
/// (memfd, hugetlbfs) has its backing punched out.
fn discard(memory: &GuestMemory, gpa: u64, len: u64) -> Result<(), DiscardError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};
    use std::time::{Duration, Instant};
    use vm_memory::Bytes;

    const MEM: usize = 64 << 20;
    const PAGE: u64 = BALLOON_PAGE_SIZE;
    const ALL: u64 = features::VERSION_1
        | balloon_features::STATS_VQ
        | balloon_features::DEFLATE_ON_OOM
        | balloon_features::REPORTING;
    /// The page lists and other driver buffers live here; the memory the
    /// tests give back lies above.
    const LIST: u64 = DATA_START;
    const TOUCHED: u64 = 4 << 20;

    /// A balloon on 64 MiB of guest memory whose every page from
    /// `TOUCHED` up is allocated and filled with 0xab.
    fn started(config: BalloonConfig, features: u64, enabled: &[u16]) -> (Balloon, TestDriver) {
        let mut b = Balloon::new(config).unwrap();
        let mut drv = TestDriver::new(MEM, &vec![QUEUE_SIZE; b.queue_max_sizes().len()]);
        let fill = vec![0xabu8; 1 << 20];
        let mut at = TOUCHED;
        while at < MEM as u64 {
            drv.mem.write_slice(&fill, GuestAddress(at)).unwrap();
            at += fill.len() as u64;
        }
        b.activate(drv.activation_of(features, enabled)).unwrap();
        (b, drv)
    }

    fn started_all() -> (Balloon, TestDriver) {
        started(BalloonConfig::default(), ALL, &[0, 1, 2, 3])
    }

    /// Is each 4 KiB page of `[gpa, gpa + len)` resident in host memory?
    fn resident(drv: &TestDriver, gpa: u64, len: u64) -> Vec<bool> {
        let host = drv.mem.get_host_address(GuestAddress(gpa)).unwrap();
        let n = len.div_ceil(PAGE) as usize;
        let mut v = vec![0u8; n];
        // SAFETY: the range lies inside the test's guest mapping and `v`
        // has one byte per page.
        let r = unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().map(|b| b & 1 != 0).collect()
    }

    fn bytes(drv: &TestDriver, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        drv.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    /// Write `pfns` as a page list at `at`; returns its length in bytes.
    fn page_list(drv: &TestDriver, at: u64, pfns: &[u32]) -> u32 {
        let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        drv.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        raw.len() as u32
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn page_lists_and_reports_beyond_the_budget_are_served_on_later_wakeups() {
        // ALL has no EVENT_IDX: each wakeup that used chains interrupts.
        let (_b, mut drv) = started_all();
        // Page lists naming a frame outside guest RAM: returned, ignored.
        let outside = (MEM as u64 / PAGE) as u32 + 10;
        let len = page_list(&drv, LIST, &[outside]);
        for q in [0u16, 1] {
            drv.served_over_wakeups(
                q,
                200,
                CHAINS_PER_WAKEUP,
                |_| Desc::readable(LIST, len),
                |_| 0,
            );
        }
        // Free page reports smaller than a page: nothing to discard.
        drv.served_over_wakeups(
            3,
            200,
            CHAINS_PER_WAKEUP,
            |i| Desc::writable(TOUCHED + u64::from(i) * PAGE + 1, 16),
            |_| 0,
        );
        assert!(resident(&drv, TOUCHED, 200 * PAGE).iter().all(|r| *r));
    }

    #[test]
    fn options_features_and_queues() {
        let c = BalloonConfig::from_options("target=512,deflate_on_oom=off").unwrap();

        let b = Balloon::new(c).unwrap();
        let f = b.features();
        assert_ne!(f & features::VERSION_1, 0);
        assert_ne!(f & balloon_features::STATS_VQ, 0);
        assert_ne!(f & balloon_features::REPORTING, 0);
        assert_eq!(f & balloon_features::DEFLATE_ON_OOM, 0);
        assert_eq!(
            f & (balloon_features::FREE_PAGE_HINT | balloon_features::MUST_TELL_HOST),
            0
        );
        assert_eq!(b.queue_max_sizes().len(), 4);
        let b =
            Balloon::new(BalloonConfig::from_options("free_page_reporting=off").unwrap()).unwrap();
        assert_eq!(b.features() & balloon_features::REPORTING, 0);
        assert_eq!(b.queue_max_sizes().len(), 3);
    }

    #[test]
    fn config_space_target_and_actual() {
        let mut b = Balloon::new(BalloonConfig::from_options("target=64").unwrap()).unwrap();
        let h = b.handle();
        let mut d = [0u8; 8];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 64 * 256);
        // The driver writes actual; num_pages ignores writes.
        b.write_config(4, &(32u32 * 256).to_le_bytes());
        b.write_config(0, &7u32.to_le_bytes());
        assert_eq!(h.actual_mib(), 32);
        assert_eq!(h.target_mib(), 64);
        // Byte-wise writes land too, and reads past the end are zero.
        b.write_config(5, &[0x40]);
        assert_eq!(h.state().actual, 0x4000);
        let mut d = [0xffu8; 4];
        b.read_config(8, &mut d);
        assert_eq!(d, [0; 4]);

        // Not active: the target changes without an interrupt.
        let mut drv = TestDriver::new(1 << 20, &[QUEUE_SIZE; 4]);
        h.set_target_mib(100).unwrap();
        assert_eq!(drv.interrupt.count(InterruptKind::Config), 0);
        b.activate(drv.activation_of(ALL, &[0, 1, 2, 3])).unwrap();
        h.set_target_mib(200).unwrap();
        assert_eq!(drv.interrupt.count(InterruptKind::Config), 1);
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 200 * 256);
        assert!(matches!(
            h.set_target_mib(1 << 40),
            Err(BalloonError::TargetTooLarge { .. })
        ));
        assert_eq!(h.target_mib(), 200);
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_read_as_zeros() {
        let (_b, mut drv) = started_all();
        let h = _b.handle();
        // 4 MiB at 16 MiB in one run, and every other page of 32..33 MiB.
        let run: Vec<u32> = (0..1024).map(|i| ((16 << 20) / PAGE) as u32 + i).collect();
        let sparse: Vec<u32> = (0..128)
            .map(|i| ((32 << 20) / PAGE) as u32 + 2 * i)
            .collect();
        assert!(resident(&drv, 16 << 20, 4 << 20).iter().all(|r| *r));
        let l1 = page_list(&drv, LIST, &run);
        let l2 = page_list(&drv, LIST + 0x1000, &sparse);
        let h1 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l1)]);
        let h2 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST + 0x1000, l2)]);
        drv.kick(INFLATEQ);
        assert_eq!(drv.used(INFLATEQ), (h1, 0));
        assert_eq!(drv.used(INFLATEQ), (h2, 0));
        assert!(drv.interrupt.raised(InterruptKind::Queue(INFLATEQ), 1));

        // Host memory is released: not resident any more...
        assert!(resident(&drv, 16 << 20, 4 << 20).iter().all(|r| !*r));
        let sparse_res = resident(&drv, 32 << 20, 1 << 20);
        for (i, r) in sparse_res.iter().enumerate() {
            assert_eq!(*r, i % 2 == 1, "page {i} of 32 MiB");
        }
        // ...the neighbours are untouched...
        assert!(resident(&drv, (16 << 20) - PAGE, PAGE)[0]);
        assert!(resident(&drv, 20 << 20, PAGE)[0]);
        assert_eq!(bytes(&drv, (16 << 20) - 16, 16), vec![0xab; 16]);
        assert_eq!(bytes(&drv, 20 << 20, 16), vec![0xab; 16]);
        assert_eq!(
            bytes(&drv, (32 << 20) + PAGE, PAGE as usize),
            vec![0xab; PAGE as usize]
        );
        // ...and the guest reads zeros from the pages it gave up.
        assert!(bytes(&drv, 16 << 20, 4 << 20).iter().all(|b| *b == 0));
        assert_eq!(bytes(&drv, 32 << 20, PAGE as usize), vec![0; PAGE as usize]);
        assert_eq!(h.state().inflated_pages, 1024 + 128);

        // Deflating is bookkeeping only.
        let l3 = page_list(&drv, LIST + 0x2000, &run[..10]);
        let h3 = drv.add_chain(DEFLATEQ, &[Desc::readable(LIST + 0x2000, l3)]);
        drv.kick(DEFLATEQ);
        assert_eq!(drv.used(DEFLATEQ), (h3, 0));
        assert_eq!(h.state().deflated_pages, 10);
    }

    #[test]
    fn hostile_page_lists_touch_nothing_outside_ram_or_not_listed() {
        let (b, mut drv) = started_all();
        let h = b.handle();
        let target = ((8 << 20) / PAGE) as u32;
        let beyond = (MEM as u64 / PAGE) as u32;
        // Outside RAM (just past the end, and the largest frame number) next
        // to one good frame.
        let l = page_list(&drv, LIST, &[beyond, u32::MAX, target]);
        let h1 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
        // A device-writable buffer holding a page list: skipped.
        page_list(&drv, LIST + 0x1000, &[target + 1]);
        let h2 = drv.add_chain(INFLATEQ, &[Desc::writable(LIST + 0x1000, 4)]);
        // Odd length: two whole frame numbers and three stray bytes.
        page_list(&drv, LIST + 0x2000, &[target + 2, target + 3, target + 4]);
        let h3 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST + 0x2000, 11)]);
        // The list itself outside guest memory, or straddling its end.
        let h4 = drv.add_chain(INFLATEQ, &[Desc::readable(MEM as u64, 64)]);
        let h5 = drv.add_chain(INFLATEQ, &[Desc::readable(MEM as u64 - 4, 8)]);
        drv.kick(INFLATEQ);
        for head in [h1, h2, h3, h4, h5] {
            assert_eq!(drv.used(INFLATEQ), (head, 0));
        }
        let res = resident(&drv, u64::from(target) * PAGE, 5 * PAGE);
        assert_eq!(res, [false, true, false, false, true]);
        assert_eq!(h.state().inflated_pages, 3);
        // The last page of RAM is intact.
        assert_eq!(bytes(&drv, MEM as u64 - 16, 16), vec![0xab; 16]);
    }

    #[test]
    fn a_page_list_is_taken_up_to_its_limit() {
        let (b, mut drv) = started_all();
        let h = b.handle();
        // Twice the limit, all inside RAM: only the first half counts.
        let base = ((16 << 20) / PAGE) as u32;
        let pfns: Vec<u32> = (0..2 * MAX_PAGES_PER_LIST as u32)
            .map(|i| base + i)
            .collect();
        let l = page_list(&drv, LIST, &pfns);
        let head = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
        drv.kick(INFLATEQ);
        assert_eq!(drv.used(INFLATEQ), (head, 0));
        assert_eq!(h.state().inflated_pages, MAX_PAGES_PER_LIST as u64);
        let limit = u64::from(base) * PAGE + MAX_PAGES_PER_LIST as u64 * PAGE;
        assert!(!resident(&drv, limit - PAGE, PAGE)[0]);
        assert!(resident(&drv, limit, PAGE)[0]);
    }

    #[test]
    fn discard_refuses_holes_region_crossings_and_misalignment() {
        // Two adjacent regions and one after a hole.
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 20), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        use DiscardError::*;
        assert_eq!(discard(&mem, 0, 1 << 20), Ok(()));
        assert_eq!(discard(&mem, (1 << 20) - PAGE, 2 * PAGE), Err(OutsideRam));
        assert_eq!(discard(&mem, 2 << 20, PAGE), Err(OutsideRam));
        assert_eq!(discard(&mem, (5 << 20) - PAGE, 2 * PAGE), Err(OutsideRam));
        assert_eq!(discard(&mem, u64::MAX - PAGE + 1, PAGE), Err(OutsideRam));
        assert_eq!(discard(&mem, 4 << 20, u64::MAX), Err(OutsideRam));
        assert_eq!(discard(&mem, (4 << 20) + 512, PAGE), Err(Unaligned));
        assert_eq!(discard(&mem, 4 << 20, 100), Err(Unaligned));
        assert_eq!(discard(&mem, 4 << 20, 1 << 20), Ok(()));
        assert_eq!(ram_region(&mem, (1 << 20) - PAGE, 2 * PAGE), None);
    }

    #[test]
    fn statistics_are_kept_and_refreshed_on_request() {
        let (b, mut drv) = started_all();
        let h = b.handle();
        let statsq = 2;
        let write_stats = |drv: &TestDriver, at: u64, stats: &[(u16, u64)]| -> u32 {
            let raw: Vec<u8> = stats
                .iter()
                .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
                .collect();
            drv.mem.write_slice(&raw, GuestAddress(at)).unwrap();
            raw.len() as u32
        };
        assert_eq!(h.stats(), None);
        // Asking before there is a buffer does nothing.
        h.request_stats();
        let n = write_stats(
            &drv,
            LIST,
            &[
                (stat_tags::MEMFREE, 1 << 30),
                (stat_tags::MEMTOT, 2 << 30),
                (stat_tags::MAJFLT, 17),
                (99, 5),
            ],
        );
        // Plus 7 stray bytes that are not a whole statistic.
        let head = drv.add_chain(statsq, &[Desc::readable(LIST, n + 7)]);
        drv.kick(statsq);
        wait_for("the first statistics", || h.stats().is_some());
        let s = h.stats().unwrap();
        assert_eq!(s.free_memory, Some(1 << 30));
        assert_eq!(s.total_memory, Some(2 << 30));
        assert_eq!(s.major_faults, Some(17));
        assert_eq!(s.swap_in, None);
        assert_eq!(s.other, vec![(99, 5)]);
        assert_eq!(s.generation, 1);
        // The device holds the buffer...
        assert_eq!(drv.wait_used(statsq, Duration::from_millis(100)), None);
        // ...until the host asks for fresh numbers.
        h.request_stats();
        assert_eq!(drv.used(statsq), (head, 0));
        assert!(drv.interrupt.raised(InterruptKind::Queue(statsq), 1));
        let n = write_stats(&drv, LIST, &[(stat_tags::MEMFREE, 5 << 20)]);
        drv.add_chain(statsq, &[Desc::readable(LIST, n)]);
        drv.kick(statsq);
        wait_for("fresh statistics", || {
            h.stats().is_some_and(|s| s.generation == 2)
        });
        let s = h.stats().unwrap();
        assert_eq!(s.free_memory, Some(5 << 20));
        assert_eq!(s.total_memory, None);
        // A statistics buffer outside guest memory counts as an empty report.
        drv.add_chain(statsq, &[Desc::readable(MEM as u64, 10)]);
        drv.kick(statsq);
        wait_for("the empty report", || {
            h.stats().is_some_and(|s| s.generation == 3)
        });
        assert_eq!(h.stats().unwrap().free_memory, None);
    }

    #[test]
    fn reported_free_ranges_are_discarded_page_by_whole_page() {
        let (b, mut drv) = started_all();
        let h = b.handle();
        let reportq = 3;
        let base = 12u64 << 20;
        let h1 = drv.add_chain(
            reportq,
            &[
                // Whole 2 MiB block.
                Desc::writable(base, 2 << 20),
                // Unaligned both ends: only the 2 inner pages go.
                Desc::writable(base + (4 << 20) + 100, (3 * PAGE) as u32),
                // Empty: nothing to do.
                Desc::writable(base + (6 << 20), 0),
                // Readable: skipped.
                Desc::readable(base + (8 << 20), PAGE as u32),
                // Past the end of RAM, and straddling it.
                Desc::writable(MEM as u64, 1 << 20),
                Desc::writable(MEM as u64 - PAGE, (2 * PAGE) as u32),
            ],
        );
        drv.kick(reportq);
        assert_eq!(drv.used(reportq), (h1, 0));
        assert!(drv.interrupt.raised(InterruptKind::Queue(reportq), 1));
        assert!(resident(&drv, base, 2 << 20).iter().all(|r| !*r));
        let res = resident(&drv, base + (4 << 20), 4 * PAGE);
        assert_eq!(res, [true, false, false, true]);
        assert_eq!(bytes(&drv, base + (4 << 20) + 96, 4), vec![0xab; 4]);
        assert_eq!(
            bytes(&drv, base + (4 << 20) + 3 * PAGE, 100),
            vec![0xab; 100]
        );
        assert!(resident(&drv, base + (8 << 20), PAGE)[0]);
        assert!(resident(&drv, MEM as u64 - PAGE, PAGE)[0]);
        assert_eq!(h.state().reported_bytes, (2 << 20) + 2 * PAGE);
    }

    #[test]
    fn without_stats_the_reporting_queue_is_index_2() {
        let features = features::VERSION_1 | balloon_features::REPORTING;
        let (b, mut drv) = started(BalloonConfig::default(), features, &[0, 1, 2]);
        let h1 = drv.add_chain(2, &[Desc::writable(24 << 20, PAGE as u32)]);
        drv.kick(2);
        assert_eq!(drv.used(2), (h1, 0));
        assert!(!resident(&drv, 24 << 20, PAGE)[0]);
        assert_eq!(b.handle().state().reported_bytes, PAGE);
        // And the statistics request has no buffer to return.
        b.handle().request_stats();
        assert_eq!(drv.wait_used(2, Duration::from_millis(100)), None);
    }

    #[test]
    fn reset_keeps_the_target_and_stops_the_worker() {
        let (mut b, mut drv) = started(
            BalloonConfig::from_options("target=16").unwrap(),
            ALL,
            &[0, 1, 2, 3],
        );
        let h = b.handle();
        b.write_config(4, &(16u32 * 256).to_le_bytes());
        assert_eq!(h.actual_mib(), 16);
        b.reset();
        assert_eq!(h.target_mib(), 16);
        assert_eq!(h.actual_mib(), 0);
        let l = page_list(&drv, LIST, &[((8 << 20) / PAGE) as u32]);
        drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
        drv.kick(INFLATEQ);
        assert_eq!(drv.wait_used(INFLATEQ, Duration::from_millis(100)), None);
        assert!(resident(&drv, 8 << 20, PAGE)[0]);
        // Only the two base queues are required.
        let a = drv.activation_of(features::VERSION_1, &[0]);
        assert!(matches!(
            b.activate(a),
            Err(ActivateError::MissingQueues { need: 2, got: 1 })
        ));
        b.activate(drv.activation_of(features::VERSION_1, &[0, 1]))
            .unwrap();
        let l = page_list(&drv, LIST, &[((8 << 20) / PAGE) as u32]);
        let head = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
        drv.kick(INFLATEQ);
        assert_eq!(drv.used(INFLATEQ), (head, 0));
        assert!(!resident(&drv, 8 << 20, PAGE)[0]);
    }
}
