//! virtio-rng (virtio 1.2 §5.4): the guest's entropy source, filled from
//! the host kernel's `getrandom(2)`.
//!
//! One queue (requestq). Every chain the driver posts is a set of
//! device-writable buffers; the device fills them with random bytes (at
//! most [`MAX_REQUEST`] per chain) and returns the count as the used
//! length. Device-readable descriptors have no meaning here and are
//! skipped. An optional bandwidth limit (`--rng bw=1M`) keeps a guest from
//! draining the host's entropy pool or burning a core on it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vireo_sandbox::seccomp::Device;

use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{rekick, EpollCtl, EventHandler, Worker, CHAINS_PER_WAKEUP};
use super::{
    device_type, features, take_queues, ActivateError, Activation, Interrupt, InterruptKind, Queue,
    VirtioDevice,
};
use crate::rate_limiter::{Limit, RateLimiter};
use vireo_api::devices::rng::RngConfig;

/// Size of the one queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most random bytes handed out for one chain; the driver asks again.
pub const MAX_REQUEST: usize = 64 << 10;

/// The virtio-rng device.
pub struct Rng {
    config: RngConfig,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(config: RngConfig) -> Rng {
        Rng {
            config,
            worker: None,
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn name(&self) -> String {
        "virtio-rng".to_string()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space (§5.4.4).
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            ..
        } = activation;
        let [q] = take_queues(queues, [0])?;
        let limiter = match self.config.bandwidth {
            Some(bw) => Some(
                RateLimiter::new(Some(Limit::per_second(bw)), None)
                    .map_err(ActivateError::RateTimer)?,
            ),
            None => None,
        };
        let mut fds = vec![(q.notify.as_raw_fd(), EventSet::IN, TOKEN_QUEUE)];
        if let Some(l) = &limiter {
            fds.push((l.timer_fd(), EventSet::IN, TOKEN_TIMER));
        }
        let handler = RngWorker {
            memory,
            queue: q.queue,
            notify: q.notify,
            interrupt,
            limiter,
            warned_readable: false,
            warned_range: false,
            buf: vec![0; MAX_REQUEST],
        };
        let worker = Worker::spawn("virtio-rng", Device::Rng, &fds, handler)
            .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Pausable for Rng {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

/// An rng has nothing of its own to save: its queue is the transport's.
impl Snapshottable for Rng {
    type State = ();
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn restore(&mut self, (): ()) -> Result<(), Self::Error> {
        Ok(())
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_TIMER: u64 = 1;

struct RngWorker {
    memory: GuestMemory,
    queue: Queue,
    notify: EventFd,
    interrupt: Arc<dyn Interrupt>,
    limiter: Option<RateLimiter>,
    warned_readable: bool,
    warned_range: bool,
    buf: Vec<u8>,
}

impl EventHandler for RngWorker {
    fn handle(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl) -> bool {
        match token {
            TOKEN_QUEUE => {
                // Reading clears the counter; EAGAIN only means a spurious wakeup.
                let _ = self.notify.read();
            }
            TOKEN_TIMER => {
                if let Some(l) = self.limiter.as_mut() {
                    l.on_timer();
                }
            }
            _ => return true,
        }
        self.process()
    }
}

impl RngWorker {
    /// Serve every available chain (until the rate limit says wait).
    /// False when the queue itself is broken.
    fn process(&mut self) -> bool {
        if self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
            return true;
        }
        let mut used_any = false;
        let mut served = 0usize;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.memory) {
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                self.queue.go_to_previous_position();
                if !rekick(&self.notify, "virtio-rng") {
                    return false;
                }
                break;
            }
            served += 1;
            let head = chain.head_index();
            if !self.warned_readable && chain.clone().readable().next().is_some() {
                self.warned_readable = true;
                tracing::warn!(
                    "virtio-rng: the driver posted device-readable buffers; they are skipped \
                     (logged once)"
                );
            }
            let len = match chain.writer(&self.memory) {
                Ok(mut writer) => {
                    let want = writer.available_bytes().min(MAX_REQUEST);
                    if let Some(l) = self.limiter.as_mut() {
                        if want > 0 && !l.consume(want as u64) {
                            // Leave the chain for when the timer fires.
                            self.queue.go_to_previous_position();
                            break;
                        }
                    }
                    let got = fill_random(&mut self.buf[..want]);
                    writer.write(&self.buf[..got]).unwrap_or(0)
                }
                Err(e) => {
                    if !self.warned_range {
                        self.warned_range = true;
                        tracing::warn!(
                            "virtio-rng: chain {head} has a buffer outside guest memory ({e}); \
                             returned empty (logged once)"
                        );
                    }
                    0
                }
            };
            if let Err(e) = self.queue.add_used(&self.memory, head, len as u32) {
                tracing::warn!("virtio-rng: cannot return chain {head} to the driver: {e}");
                return false;
            }
            used_any = true;
        }
        if used_any {
            match self.queue.needs_notification(&self.memory) {
                Ok(true) => {
                    if let Err(e) = self.interrupt.signal(InterruptKind::Queue(0)) {
                        tracing::warn!("virtio-rng: cannot interrupt the guest: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("virtio-rng: cannot read the used event index: {e}");
                    return false;
                }
            }
        }
        true
    }
}

/// Fill `buf` from the host kernel's random pool; returns how many bytes
/// are random (all of them unless getrandom fails, which it does not on
/// any kernel vireo runs on).
fn fill_random(buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which we own mutably.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!("virtio-rng: getrandom failed: {e}");
            break;
        }
        done += n as usize;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 4 << 20;

    fn started(config: RngConfig) -> (Rng, TestDriver) {
        let mut drv = TestDriver::new(MEM, &[QUEUE_SIZE]);
        let mut rng = Rng::new(config);
        assert_eq!(rng.features() & features::VERSION_1, features::VERSION_1);
        rng.activate(drv.activation(rng.features())).unwrap();
        (rng, drv)
    }

    fn read(drv: &TestDriver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        drv.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (_rng, mut drv) = started(RngConfig::default());
        // Two descriptors of odd sizes, the memory behind them zeroed.
        let head = drv.add_chain(
            0,
            &[
                Desc::writable(DATA_START, 333),
                Desc::writable(DATA_START + 0x1000, 4097),
            ],
        );
        drv.kick(0);
        assert_eq!(drv.used(0), (head, 333 + 4097));
        let a = read(&drv, DATA_START, 333);
        let b = read(&drv, DATA_START + 0x1000, 4097);
        // 4430 random bytes are not all zero, and the bytes just past the
        // buffers are untouched.
        assert!(a.iter().chain(b.iter()).filter(|x| **x != 0).count() > 4000);
        assert_eq!(read(&drv, DATA_START + 333, 16), vec![0; 16]);
        assert_eq!(read(&drv, DATA_START + 0x1000 + 4097, 16), vec![0; 16]);
        assert!(drv.interrupt.raised(InterruptKind::Queue(0), 1));

        // A second request gets different bytes.
        let head = drv.add_chain(0, &[Desc::writable(DATA_START + 0x4000, 64)]);
        drv.kick(0);
        assert_eq!(drv.used(0), (head, 64));
        assert_ne!(read(&drv, DATA_START + 0x4000, 64), a[..64].to_vec());
    }

    #[test]
    fn large_requests_are_capped() {
        let (_rng, mut drv) = started(RngConfig::default());
        let head = drv.add_chain(0, &[Desc::writable(DATA_START, 1 << 20)]);
        drv.kick(0);
        assert_eq!(drv.used(0), (head, MAX_REQUEST as u32));
        assert_eq!(read(&drv, DATA_START + MAX_REQUEST as u64, 64), vec![0; 64]);
    }

    #[test]
    fn chains_beyond_the_budget_are_served_on_later_wakeups() {
        let mut drv = TestDriver::new(MEM, &[QUEUE_SIZE]);
        let mut rng = Rng::new(RngConfig::default());
        rng.activate(drv.activation(features::VERSION_1)).unwrap();
        // Every other chain outside guest memory: each returned once.
        drv.served_over_wakeups(
            0,
            200,
            CHAINS_PER_WAKEUP,
            |i| {
                if i % 2 == 0 {
                    Desc::writable(DATA_START + u64::from(i) * 64, 16)
                } else {
                    Desc::writable(MEM as u64 + 0x1000, 16)
                }
            },
            |i| if i % 2 == 0 { 16 } else { 0 },
        );
    }

    #[test]
    fn hostile_chains_are_returned_without_harm() {
        let (_rng, mut drv) = started(RngConfig::default());
        // Device-readable only: nothing written, the buffer untouched.
        let h1 = drv.add_chain(0, &[Desc::readable(DATA_START, 128)]);
        // Readable then writable: only the writable part is filled.
        let h2 = drv.add_chain(
            0,
            &[
                Desc::readable(DATA_START + 0x1000, 128),
                Desc::writable(DATA_START + 0x2000, 100),
            ],
        );
        // Past the end of guest memory, and straddling it.
        let h3 = drv.add_chain(0, &[Desc::writable(MEM as u64 + 0x1000, 64)]);
        let h4 = drv.add_chain(0, &[Desc::writable(MEM as u64 - 8, 64)]);
        // Zero length.
        let h5 = drv.add_chain(0, &[Desc::writable(DATA_START, 0)]);
        // A head index beyond the queue.
        drv.publish(0, QUEUE_SIZE + 7);
        // And a good one after all that.
        let h6 = drv.add_chain(0, &[Desc::writable(DATA_START + 0x3000, 32)]);
        drv.kick(0);
        assert_eq!(drv.used(0), (h1, 0));
        assert_eq!(read(&drv, DATA_START, 128), vec![0; 128]);
        assert_eq!(drv.used(0), (h2, 100));
        assert_eq!(read(&drv, DATA_START + 0x1000, 128), vec![0; 128]);
        assert_eq!(drv.used(0), (h3, 0));
        assert_eq!(drv.used(0), (h4, 0));
        assert_eq!(read(&drv, MEM as u64 - 8, 8), vec![0; 8]);
        assert_eq!(drv.used(0), (h5, 0));
        // The bad head ends the device (it cannot be returned); the good
        // chain behind it is not served, and nothing panicked.
        assert_eq!(drv.wait_used(0, Duration::from_millis(300)), None);
        let _ = h6;
    }

    #[test]
    fn bandwidth_limit_delays_requests_and_reset_stops_the_worker() {
        let (mut rng, mut drv) = started(RngConfig::from_options("bw=4K").unwrap());
        let start = Instant::now();
        let h1 = drv.add_chain(0, &[Desc::writable(DATA_START, 4096)]);
        let h2 = drv.add_chain(0, &[Desc::writable(DATA_START + 0x1000, 4096)]);
        drv.kick(0);
        assert_eq!(drv.used(0), (h1, 4096));
        // The burst is spent: the second needs another second's tokens.
        assert_eq!(drv.used(0), (h2, 4096));
        assert!(
            start.elapsed() >= Duration::from_millis(700),
            "second request served after {:?}",
            start.elapsed()
        );

        rng.reset();
        let _ = drv.add_chain(0, &[Desc::writable(DATA_START + 0x2000, 16)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, Duration::from_millis(200)), None);
        // Activating again serves the fresh queue.
        rng.activate(drv.activation(rng.features())).unwrap();
        let h = drv.add_chain(0, &[Desc::writable(DATA_START + 0x3000, 16)]);
        drv.kick(0);
        assert_eq!(drv.used(0), (h, 16));
    }

    #[test]
    fn missing_queue_is_an_activation_error() {
        let mut drv = TestDriver::new(MEM, &[QUEUE_SIZE]);
        let mut rng = Rng::new(RngConfig::default());
        let a = drv.activation_of(features::VERSION_1, &[]);
        assert!(matches!(
            rng.activate(a),
            Err(ActivateError::MissingQueues { need: 1, got: 0 })
        ));
    }
}
