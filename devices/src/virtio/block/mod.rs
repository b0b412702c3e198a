//! virtio-blk (virtio 1.2 §5.2): a disk image (raw or qcow2, through
//! `vireo-block`) as a guest block device.
//!
//! One request queue served on the device's own thread. Requests are
//! checked by [`request::parse`] before any I/O; FLUSH fsyncs the image so a
//! guest `sync` survives a host crash. Optional bandwidth and operation
//! limits leave requests on the queue until the rate limiter's timer says
//! they may go.
//!
//! The flag: `--disk path=disk.qcow2,format=raw|qcow2[,readonly=on][,id=root]
//! [,serial=ABC][,bw=10M][,ops=1000]` (a bare first word is the path);
//! `format=` may be left out only with `readonly=on`.

pub mod fuzzing;
pub mod request;

use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vireo_sandbox::seccomp::Device;

use vireo_api::devices::block::{BlockConfig, Format};
use vireo_block::{DiskImage, OpenOptions};
use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limiter::{Limit, RateLimiter};
use crate::virtio::worker::{EpollCtl, EventHandler, Worker};
use crate::virtio::{
    device_type, features, read_config_bytes, take_queues, ActivateError, Activation, Interrupt,
    InterruptKind, VirtioDevice,
};
use request::{DiskInfo, ID_BYTES, SECTOR_SIZE};

/// The size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Chains served per wake-up before the thread goes back to its epoll loop
/// (kicking itself), so a driver that keeps the ring full, or a used ring
/// laid over the avail ring, cannot keep it from seeing a reset.
const MAX_CHAINS_PER_WAKEUP: usize = 2 * QUEUE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(
        "--disk id={id}: cannot open the disk image: {source}. Check path= (and format=), \
         or add readonly=on for an image you may not write"
    )]
    Open {
        id: String,
        #[source]
        source: vireo_block::Error,
    },
    #[error(
        "--disk path={path}: give format=raw or format=qcow2 — vireo never guesses the format \
         of a writable disk, since a guest could write a qcow2 header onto a raw disk (or add \
         readonly=on)"
    )]
    NoFormat { path: String },
}

/// Refuses a writable disk without `format=`: checked when the flags are
/// parsed and again when the image is opened.
pub fn check_format_given(config: &BlockConfig) -> Result<(), BlockError> {
    if config.format.is_none() && !config.read_only {
        return Err(BlockError::NoFormat {
            path: config.path.display().to_string(),
        });
    }
    Ok(())
}

/// What could be saved and restored of the device (the queue's state is
/// the transport's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The features the driver accepted at the last activation.
    pub acked_features: u64,
    /// The disk size in sectors the guest was told.
    pub capacity_sectors: u64,
    pub read_only: bool,
}

/// I/O counters, shared with whoever reports them: the device thread adds
/// to them with relaxed atomics after each request it carries out. Reads
/// and writes count the requests that passed the checks (an I/O error
/// included, as /proc/diskstats counts completions); flushes, discards and
/// the like are not reads or writes.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
}

/// A copy of [`BlockCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

impl BlockCounters {
    pub fn snapshot(&self) -> BlockStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            read_ops: l(&self.read_ops),
            write_ops: l(&self.write_ops),
        }
    }

    fn record(&self, kind: request::RequestKind, bytes: u64) {
        let (ops, total) = match kind {
            request::RequestKind::In => (&self.read_ops, &self.read_bytes),
            request::RequestKind::Out => (&self.write_ops, &self.write_bytes),
            _ => return,
        };
        ops.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The image, shared with the device thread while it runs.
type SharedImage = Arc<Mutex<Box<dyn DiskImage>>>;

fn lock(image: &SharedImage) -> MutexGuard<'_, Box<dyn DiskImage>> {
    // A panic elsewhere while holding the lock leaves the image usable.
    image.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio-blk device.
pub struct Block {
    cfg: BlockConfig,
    image: SharedImage,
    info: DiskInfo,
    config_space: Vec<u8>,
    avail_features: u64,
    acked_features: u64,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

impl Block {
    /// Open the image `cfg` names; backing files only beside their overlay.
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        Block::open(cfg, &[])
    }

    /// Open the image `cfg` names; its backing files may also live in
    /// `backing_dirs` (a daemon's storage directories). A writable disk
    /// must have its format given.
    pub fn open(cfg: BlockConfig, backing_dirs: &[PathBuf]) -> Result<Block, BlockError> {
        check_format_given(&cfg)?;
        let options = OpenOptions {
            read_only: cfg.read_only,
            backing_dirs,
        };
        let opened = match cfg.format {
            Some(f) => vireo_block::open_as(&cfg.path, f, options),
            None => vireo_block::open_probed(&cfg.path, options),
        };
        let image = opened.map_err(|source| BlockError::Open {
            id: cfg.id.clone(),
            source,
        })?;
        Ok(Block::from_image(cfg, image))
    }

    /// A device over an image opened elsewhere (`cfg.path` and
    /// `cfg.format` are then only descriptive).
    pub fn from_image(cfg: BlockConfig, mut image: Box<dyn DiskImage>) -> Block {
        let read_only = cfg.read_only || image.read_only();
        let capacity_sectors = image.size() / SECTOR_SIZE;
        if image.size() % SECTOR_SIZE != 0 {
            tracing::warn!(
                "--disk id={}: the image is {} bytes, not a whole number of 512-byte sectors; \
                 the guest sees {capacity_sectors} sectors",
                cfg.id,
                image.size()
            );
        }
        // Discards are best aligned to the qcow2 cluster (or a 4 KiB host
        // block for raw images).
        let alignment = image
            .layer_info()
            .ok()
            .and_then(|l| l.cluster_size)
            .unwrap_or(4096)
            / SECTOR_SIZE;
        let mut serial = [0u8; ID_BYTES];
        let n = cfg.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);

        let mut avail_features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let mut c = vec![0u8; size_of::<virtio_blk_config>()];
        put(
            &mut c,
            offset_of!(virtio_blk_config, capacity),
            &capacity_sectors.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, size_max),
            &request::SIZE_MAX.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, seg_max),
            &request::SEG_MAX.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        for (off, v) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                request::MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                request::MAX_DISCARD_SEG,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                u32::try_from(alignment).unwrap_or(8),
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                request::MAX_WRITE_ZEROES_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                request::MAX_WRITE_ZEROES_SEG,
            ),
        ] {
            put(&mut c, off, &v.to_le_bytes());
        }
        c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)] = 1;

        Block {
            info: DiskInfo {
                capacity_bytes: capacity_sectors * SECTOR_SIZE,
                read_only,
                serial,
            },
            cfg,
            image: Arc::new(Mutex::new(image)),
            config_space: c,
            avail_features,
            acked_features: 0,
            counters: Arc::new(BlockCounters::default()),
            worker: None,
        }
    }

    /// The live I/O counters (they keep counting across resets).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The configuration the device was made from.
    pub fn config(&self) -> &BlockConfig {
        &self.cfg
    }

    /// The format of the opened image (detected when not given).
    pub fn format(&self) -> Format {
        lock(&self.image).format()
    }

    /// The state to save.
    pub fn state(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            capacity_sectors: self.info.capacity_bytes / SECTOR_SIZE,
            read_only: self.info.read_only,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn name(&self) -> String {
        format!("virtio-blk {}", self.cfg.id)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            features: acked,
        } = activation;
        let [active] = take_queues(queues, [0])?;
        let limiter = match (self.cfg.bandwidth, self.cfg.ops) {
            (None, None) => None,
            (bw, ops) => Some(
                RateLimiter::new(bw.map(Limit::per_second), ops.map(Limit::per_second))
                    .map_err(ActivateError::RateTimer)?,
            ),
        };
        let mut queue = active.queue;
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        queue.set_event_idx(event_idx);
        let mut fds = vec![(active.notify.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)];
        if let Some(l) = &limiter {
            fds.push((l.timer_fd(), EventSet::IN, TIMER_TOKEN));
        }
        let handler = BlockWorker {
            name: self.name(),
            mem: memory,
            queue,
            queue_index: active.index,
            notify: active.notify,
            interrupt,
            image: self.image.clone(),
            info: self.info.clone(),
            limiter,
            bounce: Vec::new(),
            counters: self.counters.clone(),
        };
        let worker = Worker::spawn(
            &format!("blk-{}", self.cfg.id),
            Device::Block,
            &fds,
            handler,
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        self.acked_features = acked;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
    }
}

impl Pausable for Block {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
        // What the guest wrote reaches the file (qcow2 metadata included)
        // before a snapshot copies it.
        if let Err(e) = lock(&self.image).flush() {
            tracing::warn!("{}: flush before the snapshot: {e}", self.name());
        }
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

/// Why a saved disk state does not fit this disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("disk {id}: {path} is {bytes} bytes, the snapshot's disk was {saved_bytes} bytes; give a disk of the saved size")]
    Size {
        id: String,
        path: PathBuf,
        bytes: u64,
        saved_bytes: u64,
    },
    #[error("disk {id}: the snapshot's disk was {}, this one is {}", access(*.saved_read_only), access(*.read_only))]
    ReadOnly {
        id: String,
        saved_read_only: bool,
        read_only: bool,
    },
}

fn access(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// A disk saves what the guest was told about it, to check the disk it is
/// restored onto; its data is the image's.
impl Snapshottable for Block {
    type State = BlockState;
    type Error = BlockStateError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        Ok(self.state())
    }

    fn restore(&mut self, saved: BlockState) -> Result<(), BlockStateError> {
        let now = self.state();
        if saved.capacity_sectors != now.capacity_sectors {
            return Err(BlockStateError::Size {
                id: self.cfg.id.clone(),
                path: self.cfg.path.clone(),
                bytes: now.capacity_sectors * SECTOR_SIZE,
                saved_bytes: saved.capacity_sectors * SECTOR_SIZE,
            });
        }
        if saved.read_only != now.read_only {
            return Err(BlockStateError::ReadOnly {
                id: self.cfg.id.clone(),
                saved_read_only: saved.read_only,
                read_only: now.read_only,
            });
        }
        Ok(())
    }
}

const QUEUE_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;

/// The device thread's state.
struct BlockWorker {
    name: String,
    mem: GuestMemory,
    queue: Queue,
    queue_index: u16,
    notify: EventFd,
    interrupt: Arc<dyn Interrupt>,
    image: SharedImage,
    info: DiskInfo,
    limiter: Option<RateLimiter>,
    bounce: Vec<u8>,
    counters: Arc<BlockCounters>,
}

impl BlockWorker {
    /// Serve what the queue holds. Returns false when the queue is broken
    /// (the device then waits for a reset).
    fn process(&mut self) -> bool {
        let mut used_any = false;
        let mut served = 0usize;
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                tracing::warn!("{}: queue is unusable: {e}", self.name);
                return false;
            }
            let mut popped = 0usize;
            let mut blocked = false;
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                if served == MAX_CHAINS_PER_WAKEUP {
                    // Come back after a look at the stop eventfd.
                    self.queue.go_to_previous_position();
                    if let Err(e) = self.notify.write(1) {
                        tracing::warn!("{}: cannot requeue the work: {e}", self.name);
                        return false;
                    }
                    blocked = true;
                    break;
                }
                served += 1;
                let head = chain.head_index();
                let parsed = request::parse(&self.mem, chain, &self.info);
                if let Some(l) = self.limiter.as_mut() {
                    let bytes = parsed.as_ref().map_or(0, |r| r.charged_bytes());
                    if !l.consume(bytes) {
                        // Leave it on the queue until the timer fires.
                        self.queue.go_to_previous_position();
                        blocked = true;
                        break;
                    }
                }
                popped += 1;
                let io = parsed.as_ref().ok().map(|r| (r.kind, r.data_len));
                let len = {
                    let mut image = lock(&self.image);
                    request::serve(
                        &self.name,
                        &self.mem,
                        parsed,
                        image.as_mut(),
                        &self.info,
                        &mut self.bounce,
                    )
                };
                if let Some((kind, bytes)) = io {
                    self.counters.record(kind, bytes);
                }
                if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                    tracing::warn!("{}: cannot return a request: {e}", self.name);
                    return false;
                }
                used_any = true;
            }
            if blocked {
                break;
            }
            match self.queue.enable_notification(&self.mem) {
                // More arrived meanwhile. If nothing could be popped this
                // round the avail ring is broken (an index too far ahead):
                // stop rather than spin.
                Ok(true) if popped > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("{}: queue is unusable: {e}", self.name);
                    return false;
                }
            }
        }
        if used_any {
            match self.queue.needs_notification(&self.mem) {
                Ok(true) => {
                    if let Err(e) = self
                        .interrupt
                        .signal(InterruptKind::Queue(self.queue_index))
                    {
                        tracing::warn!("{}: interrupt failed: {e}", self.name);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("{}: queue is unusable: {e}", self.name);
                    return false;
                }
            }
        }
        true
    }
}

impl EventHandler for BlockWorker {
    fn handle(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl) -> bool {
        match token {
            QUEUE_TOKEN => {
                // Drain the counter; a failure only means it was already 0.
                let _ = self.notify.read();
                if self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
                    return true;
                }
            }
            TIMER_TOKEN => match self.limiter.as_mut() {
                Some(l) => l.on_timer(),
                None => return true,
            },
            _ => return true,
        }
        self.process()
    }
}

#[cfg(test)]
mod tests;
