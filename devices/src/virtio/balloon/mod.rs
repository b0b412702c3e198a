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

use std::sync::{Arc, Mutex, MutexGuard};
use vireo_sandbox::seccomp::Device;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Worker;
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, ActiveQueue, Interrupt,
    InterruptKind, VirtioDevice,
};
use vireo_api::devices::balloon::{target_pages, BalloonConfig, BalloonError, PAGES_PER_MIB};
use worker::{BalloonQueues, BalloonWorker};

mod persist;
mod stats;
mod worker;

pub use stats::{stat_tags, BalloonStats};

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

        let handler = BalloonWorker::new(
            memory,
            BalloonQueues {
                inflate,
                deflate,
                stats,
                reporting,
            },
            stats_request,
            interrupt.clone(),
            self.shared.clone(),
        );
        let fds = handler.fds();
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
}

#[cfg(test)]
mod tests;
