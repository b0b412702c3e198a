//! The driver side of a virtio device, for unit tests: guest memory with
//! split queues laid out by `virtio_queue::mock::MockSplitQueue`, a way to
//! post descriptor chains and notify a queue, an [`Interrupt`] that records
//! what the device raised, and waiting (with a timeout) for used buffers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_vmcore::memory::GuestMemory;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, ActiveQueue, Interrupt, InterruptKind, Queue};
use virtio_queue::QueueT;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Where each queue's rings live: queue `i` at `i * QUEUE_STRIDE`, data
/// buffers are expected from [`DATA_START`] on.
const QUEUE_STRIDE: u64 = 0x1_0000;
pub const DATA_START: u64 = 0x10_0000;
/// Where each queue's used ring is, from the queue's base: past a
/// 256-entry descriptor table (4 KiB) and avail ring.
const USED_OFFSET: u64 = 0x2000;

/// One descriptor as the test driver posts it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// Points at an indirect descriptor table of `len` bytes.
    pub indirect: bool,
}

impl Desc {
    pub fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
            indirect: false,
        }
    }
    pub fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            write: true,
            ..Desc::readable(addr, len)
        }
    }
    fn flags(&self) -> u16 {
        let mut f = 0;
        if self.write {
            f |= VIRTQ_DESC_F_WRITE;
        }
        if self.indirect {
            f |= VIRTQ_DESC_F_INDIRECT;
        }
        f
    }
}

/// Records every interrupt the device raises.
#[derive(Default)]
pub struct TestInterrupt {
    seen: Mutex<Vec<InterruptKind>>,
}

impl Interrupt for TestInterrupt {
    fn signal(&self, kind: InterruptKind) -> std::io::Result<()> {
        if let Ok(mut s) = self.seen.lock() {
            s.push(kind);
        }
        Ok(())
    }
}

impl TestInterrupt {
    /// Forget what was raised so far.
    pub fn clear(&self) {
        if let Ok(mut s) = self.seen.lock() {
            s.clear();
        }
    }

    /// How many times `kind` was raised so far.
    pub fn count(&self, kind: InterruptKind) -> usize {
        self.seen
            .lock()
            .map(|s| s.iter().filter(|k| **k == kind).count())
            .unwrap_or(0)
    }

    /// Whether `kind` is raised at least `n` times within 10 s (the device
    /// publishes used buffers before it interrupts).
    pub fn raised(&self, kind: InterruptKind, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count(kind) < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

struct QueueLayout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// Guest memory, the queues of one device and their notify eventfds.
pub struct TestDriver {
    pub mem: GuestMemory,
    queues: Vec<QueueLayout>,
    notify: Vec<EventFd>,
    pub interrupt: Arc<TestInterrupt>,
}

impl TestDriver {
    /// `mem_size` bytes of guest RAM at 0 with one queue per entry of
    /// `queue_sizes`.
    pub fn new(mem_size: usize, queue_sizes: &[u16]) -> TestDriver {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        let queues = queue_sizes
            .iter()
            .map(|&size| QueueLayout {
                size,
                desc: 0,
                avail: 0,
                used: 0,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            })
            .collect();
        let notify = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        TestDriver {
            mem,
            queues,
            notify,
            interrupt: Arc::new(TestInterrupt::default()),
        }
    }

    /// Set up (again) the queues listed in `enabled` with empty rings and
    /// build the activation the transport would hand the device.
    pub fn activation_of(&mut self, features: u64, enabled: &[u16]) -> Activation {
        let mut queues = Vec::new();
        for &i in enabled {
            let q = &mut self.queues[usize::from(i)];
            let mock = MockSplitQueue::create(
                &self.mem,
                GuestAddress(u64::from(i) * QUEUE_STRIDE),
                q.size,
            );
            q.desc = mock.desc_table_addr().0;
            q.avail = mock.avail_addr().0;
            // The mock lays its used ring inside the second half of a
            // 256-entry avail ring (it counts the avail ring in entries,
            // not bytes): put it past both, empty.
            q.used = u64::from(i) * QUEUE_STRIDE + USED_OFFSET;
            self.mem
                .write_slice(
                    &vec![0u8; 6 + 8 * usize::from(q.size)],
                    GuestAddress(q.used),
                )
                .unwrap();
            q.next_desc = 0;
            q.avail_idx = 0;
            q.used_seen = 0;
            let mut queue: Queue = mock.create_queue().unwrap();
            queue.set_used_ring_address(Some(q.used as u32), Some((q.used >> 32) as u32));
            queues.push(ActiveQueue {
                index: i,
                queue,
                notify: self.notify[usize::from(i)].try_clone().unwrap(),
            });
        }
        Activation {
            memory: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features,
        }
    }

    /// All queues enabled.
    pub fn activation(&mut self, features: u64) -> Activation {
        let all: Vec<u16> = (0..self.queues.len() as u16).collect();
        self.activation_of(features, &all)
    }

    /// Post a chain on queue `q` (without notifying); returns its head.
    pub fn add_chain(&mut self, q: u16, descs: &[Desc]) -> u16 {
        let n = descs.len() as u16;
        let head = self.reserve(q, n);
        let (table, size) = {
            let l = &self.queues[usize::from(q)];
            (l.desc, l.size)
        };
        for (k, d) in descs.iter().enumerate() {
            let idx = (head + k as u16) % size;
            let next = (k + 1 < descs.len()).then_some((idx + 1) % size);
            self.write_desc(table, idx, *d, next);
        }
        self.publish(q, head);
        head
    }

    /// Take the next `n` entries of queue `q`'s descriptor table for the
    /// caller to fill with [`TestDriver::write_desc`]; returns the first.
    pub fn reserve(&mut self, q: u16, n: u16) -> u16 {
        let l = &mut self.queues[usize::from(q)];
        let first = l.next_desc;
        l.next_desc = (first + n) % l.size;
        first
    }

    /// Write descriptor `i` of the table at `table` (a queue's, or an
    /// indirect one in guest memory), chained to `next` if given. Any
    /// values: a hostile driver may loop or point anywhere.
    pub fn write_desc(&self, table: u64, i: u16, d: Desc, next: Option<u16>) {
        let flags = d.flags() | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 };
        let at = table + u64::from(i) * 16;
        let mem = &self.mem;
        mem.write_obj(d.addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(d.len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.unwrap_or(0).to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Where queue `q`'s descriptor table, avail ring and used ring are.
    pub fn rings(&self, q: u16) -> (u64, u64, u64) {
        let l = &self.queues[usize::from(q)];
        (l.desc, l.avail, l.used)
    }

    /// How many buffers the device has used on queue `q` so far (the used
    /// ring's index), without taking any.
    pub fn used_idx(&self, q: u16) -> u16 {
        let l = &self.queues[usize::from(q)];
        u16::from_le(self.mem.read_obj(GuestAddress(l.used + 2)).unwrap())
    }

    /// Used element `i` of queue `q` as (head, len), read in place (for
    /// tests that look at the ring out of order).
    pub fn used_elem(&self, q: u16, i: u16) -> (u16, u32) {
        let l = &self.queues[usize::from(q)];
        let at = l.used + 4 + u64::from(i % l.size) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id) as u16, u32::from_le(len))
    }

    /// The avail index the driver last published on queue `q`.
    pub fn avail_idx(&self, q: u16) -> u16 {
        self.queues[usize::from(q)].avail_idx
    }

    /// Put `head` on the available ring of queue `q`, whatever it is (a
    /// hostile driver may post any index).
    pub fn publish(&mut self, q: u16, head: u16) {
        let l = &mut self.queues[usize::from(q)];
        let slot = l.avail + 4 + u64::from(l.avail_idx % l.size) * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        l.avail_idx = l.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(l.avail_idx.to_le(), GuestAddress(l.avail + 2))
            .unwrap();
    }

    /// Notify queue `q`.
    pub fn kick(&self, q: u16) {
        self.notify[usize::from(q)].write(1).unwrap();
    }

    /// The next used element (head, len) of queue `q`, waiting up to
    /// `timeout` for it.
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let l = &mut self.queues[usize::from(q)];
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(l.used + 2)).unwrap();
            if u16::from_le(idx) != l.used_seen {
                let at = l.used + 4 + u64::from(l.used_seen % l.size) * 8;
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                l.used_seen = l.used_seen.wrapping_add(1);
                return Some((u32::from_le(id) as u16, u32::from_le(len)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Like [`TestDriver::wait_used`] with a timeout generous enough for a
    /// loaded machine; panics when nothing comes.
    pub fn used(&mut self, q: u16) -> (u16, u32) {
        self.wait_used(q, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("queue {q}: the device used no buffer within 10 s"))
    }

    /// Post `n` one-descriptor chains `desc(i)` on queue `q`, kick once,
    /// and check the device returns each exactly once, in order, with
    /// used length `len(i)`, and nothing more; and that it did so over at
    /// least `n / budget` wakeups (one interrupt each: the activation must
    /// not have negotiated EVENT_IDX).
    pub fn served_over_wakeups(
        &mut self,
        q: u16,
        n: u16,
        budget: usize,
        desc: impl Fn(u16) -> Desc,
        len: impl Fn(u16) -> u32,
    ) {
        // Counted from before the chains are posted: a device with other
        // wakeups (console input) may serve some of them early.
        let before = self.interrupt.count(InterruptKind::Queue(q));
        let heads: Vec<u16> = (0..n).map(|i| self.add_chain(q, &[desc(i)])).collect();
        self.kick(q);
        for (i, h) in heads.iter().enumerate() {
            assert_eq!(self.used(q), (*h, len(i as u16)), "chain {i}");
        }
        assert_eq!(
            self.wait_used(q, Duration::from_millis(100)),
            None,
            "a chain was returned twice"
        );
        let wakeups = usize::from(n).div_ceil(budget);
        assert!(
            self.interrupt
                .raised(InterruptKind::Queue(q), before + wakeups),
            "{n} chains in {} interrupts, not spread over {wakeups} wakeups",
            self.interrupt.count(InterruptKind::Queue(q)) - before
        );
    }
}
