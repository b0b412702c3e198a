//! virtio-console (virtio 1.2 §5.3): the guest's `hvc0`, one port, no
//! MULTIPORT.
//!
//! Queues: receiveq (0) carries host→guest bytes in device-writable
//! buffers, transmitq (1) guest→host bytes in device-readable ones. What the
//! guest writes goes to the `Write` given at construction (stdout, a log).
//! The host sends input through a [`ConsoleInput`] handle; bytes wait in a
//! bounded buffer ([`INPUT_BUFFER`], oldest dropped first) until the driver
//! posts receive buffers, and that buffer survives a device reset.
//!
//! With VIRTIO_CONSOLE_F_SIZE the configuration space reports the terminal
//! size; [`ConsoleInput::resize`] changes it and tells the driver.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use vireo_sandbox::seccomp::Device;

use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{rekick, EpollCtl, EventHandler, Worker, CHAINS_PER_WAKEUP};
use super::{
    device_type, features, read_config_bytes, take_queues, ActivateError, Activation, Interrupt,
    InterruptKind, Queue, VirtioDevice,
};
use vireo_api::devices::console::ConsoleConfig;

/// Feature bits (§5.3.3).
pub mod console_features {
    /// Configuration `cols` and `rows` are valid.
    pub const SIZE: u64 = 1 << 0;
}

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Host input kept while the guest has no receive buffers.
pub const INPUT_BUFFER: usize = 64 << 10;

const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;

/// The host-side state of the console, kept across resets (and what a
/// snapshot would save).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Input not yet delivered to the guest, oldest first.
    pub pending_input: VecDeque<u8>,
    /// Bytes dropped because the guest did not read them in time.
    pub dropped_input: u64,
    pub cols: u16,
    pub rows: u16,
}

struct Shared {
    state: Mutex<ConsoleState>,
    /// Signalled when input arrives.
    input_evt: EventFd,
    /// The driver's interrupt while the device is active.
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, ConsoleState> {
        // A panic elsewhere while holding the lock leaves plain data behind;
        // keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of the console: queue input for the guest, change the
/// terminal size. Clonable; works whether or not the driver is active.
#[derive(Clone)]
pub struct ConsoleInput {
    shared: Arc<Shared>,
}

impl ConsoleInput {
    /// Queue `bytes` for the guest. Beyond [`INPUT_BUFFER`] undelivered
    /// bytes the oldest are dropped (with a warning).
    pub fn send(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        {
            let mut st = self.shared.state();
            st.pending_input.extend(bytes);
            let excess = st.pending_input.len().saturating_sub(INPUT_BUFFER);
            if excess > 0 {
                st.pending_input.drain(..excess);
                if st.dropped_input == 0 {
                    tracing::warn!(
                        "virtio-console: the guest is not reading its console; dropping the \
                         oldest input beyond {} KiB",
                        INPUT_BUFFER >> 10
                    );
                }
                st.dropped_input += excess as u64;
            }
        }
        if let Err(e) = self.shared.input_evt.write(1) {
            tracing::warn!("virtio-console: cannot wake the device thread: {e}");
        }
    }

    /// Set the terminal size the guest sees and tell an active driver.
    pub fn resize(&self, cols: u16, rows: u16) {
        {
            let mut st = self.shared.state();
            if (st.cols, st.rows) == (cols, rows) {
                return;
            }
            st.cols = cols;
            st.rows = rows;
        }
        let irq = self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.signal(InterruptKind::Config) {
                tracing::warn!("virtio-console: cannot signal the new size: {e}");
            }
        }
    }

    /// Bytes waiting for the guest to read them.
    pub fn pending(&self) -> usize {
        self.shared.state().pending_input.len()
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// The virtio-console device.
pub struct Console {
    shared: Arc<Shared>,
    output: Output,
    worker: Option<Worker>,
}

impl Console {
    /// A console writing the guest's output to `output`. Fails only when
    /// no eventfd can be created.
    pub fn new(config: ConsoleConfig, output: Box<dyn Write + Send>) -> std::io::Result<Console> {
        let shared = Arc::new(Shared {
            state: Mutex::new(ConsoleState {
                cols: config.cols,
                rows: config.rows,
                ..ConsoleState::default()
            }),
            input_evt: EventFd::new(EFD_NONBLOCK)?,
            interrupt: Mutex::new(None),
        });
        Ok(Console {
            shared,
            output: Arc::new(Mutex::new(output)),
            worker: None,
        })
    }

    /// The handle through which the host sends input and resizes.
    pub fn input(&self) -> ConsoleInput {
        ConsoleInput {
            shared: self.shared.clone(),
        }
    }

    /// A copy of the host-side state.
    pub fn state(&self) -> ConsoleState {
        self.shared.state().clone()
    }

    fn config_bytes(&self) -> [u8; 12] {
        let st = self.shared.state();
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&st.cols.to_le_bytes());
        c[2..4].copy_from_slice(&st.rows.to_le_bytes());
        // max_nr_ports (valid with MULTIPORT only) and emerg_wr stay 0.
        c
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn name(&self) -> String {
        "virtio-console".to_string()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | console_features::SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            ..
        } = activation;
        let [rx, tx] = take_queues(queues, [RECEIVEQ, TRANSMITQ])?;
        let input_evt = self
            .shared
            .input_evt
            .try_clone()
            .map_err(ActivateError::Thread)?;
        let fds = [
            (rx.notify.as_raw_fd(), EventSet::IN, TOKEN_RX),
            (tx.notify.as_raw_fd(), EventSet::IN, TOKEN_TX),
            (input_evt.as_raw_fd(), EventSet::IN, TOKEN_INPUT),
        ];
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(interrupt.clone());
        let handler = ConsoleWorker {
            memory,
            rx: rx.queue,
            rx_notify: rx.notify,
            tx: tx.queue,
            tx_notify: tx.notify,
            input_evt,
            interrupt,
            shared: self.shared.clone(),
            output: self.output.clone(),
            warned: Warned::default(),
            buf: vec![0; 4096],
        };
        let worker =
            Worker::spawn("virtio-console", Device::Console, &fds, handler).map_err(|e| {
                *self
                    .shared
                    .interrupt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                ActivateError::Thread(e)
            })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Pausable for Console {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

impl Snapshottable for Console {
    type State = ConsoleState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<ConsoleState, Self::Error> {
        Ok(self.shared.state().clone())
    }

    fn restore(&mut self, saved: ConsoleState) -> Result<(), Self::Error> {
        let pending = !saved.pending_input.is_empty();
        *self.shared.state() = saved;
        if pending {
            // The worker looks at the input once it starts.
            let _ = self.shared.input_evt.write(1);
        }
        Ok(())
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_INPUT: u64 = 2;

/// Complaints logged once per activation.
#[derive(Default)]
struct Warned {
    tx_direction: bool,
    rx_direction: bool,
    range: bool,
    output: bool,
}

struct ConsoleWorker {
    memory: GuestMemory,
    rx: Queue,
    rx_notify: EventFd,
    tx: Queue,
    tx_notify: EventFd,
    input_evt: EventFd,
    interrupt: Arc<dyn Interrupt>,
    shared: Arc<Shared>,
    output: Output,
    warned: Warned,
    buf: Vec<u8>,
}

impl EventHandler for ConsoleWorker {
    fn handle(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl) -> bool {
        // Reading an eventfd clears it; EAGAIN is only a spurious wakeup.
        match token {
            TOKEN_RX => {
                let _ = self.rx_notify.read();
                self.deliver_input()
            }
            TOKEN_INPUT => {
                let _ = self.input_evt.read();
                self.deliver_input()
            }
            TOKEN_TX => {
                let _ = self.tx_notify.read();
                self.transmit()
            }
            _ => true,
        }
    }
}

impl ConsoleWorker {
    /// Copy pending input into the receive buffers the driver has posted.
    /// False when the queue is broken.
    fn deliver_input(&mut self) -> bool {
        let mut used_any = false;
        let shared = self.shared.clone();
        let mut st = shared.state();
        let mut served = 0usize;
        while !st.pending_input.is_empty() {
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                if !rekick(&self.rx_notify, "virtio-console") {
                    return false;
                }
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.memory) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            if !self.warned.rx_direction && chain.clone().readable().next().is_some() {
                self.warned.rx_direction = true;
                tracing::warn!(
                    "virtio-console: device-readable buffers on the receive queue are skipped \
                     (logged once)"
                );
            }
            let len = match chain.writer(&self.memory) {
                Ok(mut w) => {
                    let mut written = 0;
                    while w.available_bytes() > 0 {
                        let (a, b) = st.pending_input.as_slices();
                        let part = if a.is_empty() { b } else { a };
                        if part.is_empty() {
                            break;
                        }
                        let n = w.write(part).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        st.pending_input.drain(..n);
                        written += n;
                    }
                    written
                }
                Err(e) => {
                    if !self.warned.range {
                        self.warned.range = true;
                        tracing::warn!(
                            "virtio-console: receive chain {head} has a buffer outside guest \
                             memory ({e}); returned empty (logged once)"
                        );
                    }
                    0
                }
            };
            if !self.put_used(RECEIVEQ, head, len as u32) {
                return false;
            }
            used_any = true;
        }
        drop(st);
        !used_any || self.notify(RECEIVEQ)
    }

    /// Send whatever the driver transmitted to the output.
    fn transmit(&mut self) -> bool {
        let mut used_any = false;
        let output = self.output.clone();
        let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
        let mut served = 0usize;
        loop {
            if served == CHAINS_PER_WAKEUP {
                // The rest on the next wakeup, after the other fds.
                if !rekick(&self.tx_notify, "virtio-console") {
                    return false;
                }
                break;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(&self.memory) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            if !self.warned.tx_direction && chain.clone().writable().next().is_some() {
                self.warned.tx_direction = true;
                tracing::warn!(
                    "virtio-console: device-writable buffers on the transmit queue are skipped \
                     (logged once)"
                );
            }
            match chain.reader(&self.memory) {
                Ok(mut r) => loop {
                    let n = match r.read(&mut self.buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Err(e) = out.write_all(&self.buf[..n]) {
                        if !self.warned.output {
                            self.warned.output = true;
                            tracing::warn!(
                                "virtio-console: cannot write the guest's console output: {e}; \
                                 output dropped (logged once)"
                            );
                        }
                    }
                },
                Err(e) => {
                    if !self.warned.range {
                        self.warned.range = true;
                        tracing::warn!(
                            "virtio-console: transmit chain {head} has a buffer outside guest \
                             memory ({e}); ignored (logged once)"
                        );
                    }
                }
            }
            // Nothing is written to transmit buffers (§5.3.6.1: used length 0).
            if !self.put_used(TRANSMITQ, head, 0) {
                return false;
            }
            used_any = true;
        }
        if used_any {
            let _ = out.flush();
        }
        drop(out);
        !used_any || self.notify(TRANSMITQ)
    }

    fn put_used(&mut self, q: u16, head: u16, len: u32) -> bool {
        let queue = if q == RECEIVEQ {
            &mut self.rx
        } else {
            &mut self.tx
        };
        match queue.add_used(&self.memory, head, len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("virtio-console: cannot return chain {head} on queue {q}: {e}");
                false
            }
        }
    }

    fn notify(&mut self, q: u16) -> bool {
        let queue = if q == RECEIVEQ {
            &mut self.rx
        } else {
            &mut self.tx
        };
        match queue.needs_notification(&self.memory) {
            Ok(true) => {
                if let Err(e) = self.interrupt.signal(InterruptKind::Queue(q)) {
                    tracing::warn!("virtio-console: cannot interrupt the guest: {e}");
                }
                true
            }
            Ok(false) => true,
            Err(e) => {
                tracing::warn!("virtio-console: cannot read the used event index: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 4 << 20;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Captured {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn console(config: ConsoleConfig) -> (Console, Captured, TestDriver) {
        let out = Captured::default();
        let c = Console::new(config, Box::new(out.clone())).unwrap();
        (c, out, TestDriver::new(MEM, &[QUEUE_SIZE, QUEUE_SIZE]))
    }

    fn write(drv: &TestDriver, addr: u64, bytes: &[u8]) {
        drv.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn read(drv: &TestDriver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        drv.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn options_and_config_space() {
        let cfg = ConsoleConfig {
            cols: 132,
            rows: 43,
        };
        let (c, _, _) = console(cfg);
        assert_ne!(c.features() & console_features::SIZE, 0);
        assert_ne!(c.features() & features::VERSION_1, 0);
        let mut d = [0xffu8; 12];
        c.read_config(0, &mut d);
        assert_eq!(d, [132, 0, 43, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut d = [0xffu8; 2];
        c.read_config(2, &mut d);
        assert_eq!(u16::from_le_bytes(d), 43);
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut c, out, mut drv) = console(ConsoleConfig::default());
        c.activate(drv.activation(c.features())).unwrap();
        write(&drv, DATA_START, b"hello, ");
        write(&drv, DATA_START + 0x1000, b"world\n");
        let h = drv.add_chain(
            TRANSMITQ,
            &[
                Desc::readable(DATA_START, 7),
                Desc::readable(DATA_START + 0x1000, 6),
            ],
        );
        drv.kick(TRANSMITQ);
        assert_eq!(drv.used(TRANSMITQ), (h, 0));
        assert_eq!(out.take(), b"hello, world\n");
        assert!(drv.interrupt.raised(InterruptKind::Queue(TRANSMITQ), 1));
    }

    #[test]
    fn input_waits_for_buffers_and_is_split_across_them() {
        let (mut c, _, mut drv) = console(ConsoleConfig::default());
        let input = c.input();
        // Sent before the driver is even there.
        input.send(b"abc");
        c.activate(drv.activation(c.features())).unwrap();
        let h1 = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START, 2)]);
        let h2 = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START + 0x1000, 10)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.used(RECEIVEQ), (h1, 2));
        assert_eq!(drv.used(RECEIVEQ), (h2, 1));
        assert_eq!(read(&drv, DATA_START, 2), b"ab");
        assert_eq!(read(&drv, DATA_START + 0x1000, 2), b"c\0");
        assert_eq!(input.pending(), 0);

        // A buffer posted with nothing to say stays with the device until
        // input comes.
        let h3 = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START + 0x2000, 64)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.wait_used(RECEIVEQ, Duration::from_millis(100)), None);
        input.send(b"ls -l\n");
        assert_eq!(drv.used(RECEIVEQ), (h3, 6));
        assert_eq!(read(&drv, DATA_START + 0x2000, 6), b"ls -l\n");
    }

    #[test]
    fn unread_input_and_the_size_survive_a_snapshot() {
        use vireo_vmcore::snapshot::device::{DynSnapshottable, SavedState};
        let (mut a, _, mut drv) = console(ConsoleConfig {
            cols: 100,
            rows: 40,
        });
        a.activate(drv.activation(a.features())).unwrap();
        a.pause();
        // Typed while the device is quiesced: kept for the restored one.
        a.input().send(b"typed");
        a.input().resize(120, 50);
        let saved = a.save_dyn().unwrap();
        a.resume();
        drop(a);

        let (mut b, _, _) = console(ConsoleConfig {
            cols: 100,
            rows: 40,
        });
        assert!(b
            .restore_dyn(SavedState {
                version: 1,
                state: serde_json::json!({"cols": "wide"}),
            })
            .is_err());
        b.restore_dyn(saved).unwrap();
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(d, [120, 0, 50, 0]);
        b.activate(drv.activation(b.features())).unwrap();
        let h = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START, 16)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.used(RECEIVEQ), (h, 5));
        assert_eq!(read(&drv, DATA_START, 5), b"typed");
    }

    #[test]
    fn input_beyond_the_buffer_drops_the_oldest() {
        let (mut c, _, mut drv) = console(ConsoleConfig::default());
        let input = c.input();
        let data: Vec<u8> = (0..INPUT_BUFFER + 1000).map(|i| (i % 251) as u8).collect();
        input.send(&data[..5000]);
        input.send(&data[5000..]);
        assert_eq!(input.pending(), INPUT_BUFFER);
        assert_eq!(c.state().dropped_input, 1000);
        c.activate(drv.activation(c.features())).unwrap();
        let h = drv.add_chain(
            RECEIVEQ,
            &[Desc::writable(DATA_START, INPUT_BUFFER as u32 + 100)],
        );
        drv.kick(RECEIVEQ);
        assert_eq!(drv.used(RECEIVEQ), (h, INPUT_BUFFER as u32));
        assert_eq!(read(&drv, DATA_START, INPUT_BUFFER), data[1000..].to_vec());
    }

    #[test]
    fn chains_beyond_the_budget_are_served_on_later_wakeups() {
        let (mut c, out, mut drv) = console(ConsoleConfig::default());
        let input = c.input();
        // No EVENT_IDX: each wakeup that used chains interrupts.
        c.activate(drv.activation(features::VERSION_1)).unwrap();
        // 200 one-byte transmit buffers: the output in order, each once.
        let text: Vec<u8> = (0..200u16).map(|i| b'a' + (i % 26) as u8).collect();
        write(&drv, DATA_START, &text);
        drv.served_over_wakeups(
            TRANSMITQ,
            200,
            CHAINS_PER_WAKEUP,
            |i| Desc::readable(DATA_START + u64::from(i), 1),
            |_| 0,
        );
        assert_eq!(out.take(), text);
        // 200 bytes of input into 200 one-byte receive buffers.
        input.send(&text);
        drv.served_over_wakeups(
            RECEIVEQ,
            200,
            CHAINS_PER_WAKEUP,
            |i| Desc::writable(DATA_START + 0x1000 + u64::from(i), 1),
            |_| 1,
        );
        assert_eq!(read(&drv, DATA_START + 0x1000, 200), text);
    }

    #[test]
    fn hostile_chains_lose_nothing_and_touch_nothing() {
        let (mut c, out, mut drv) = console(ConsoleConfig::default());
        let input = c.input();
        c.activate(drv.activation(c.features())).unwrap();
        // Transmit: a writable buffer (skipped), one past the end of
        // memory, one straddling it; then a good one.
        write(&drv, DATA_START, b"secret");
        write(&drv, DATA_START + 0x1000, b"ok");
        let t1 = drv.add_chain(TRANSMITQ, &[Desc::writable(DATA_START, 6)]);
        let t2 = drv.add_chain(TRANSMITQ, &[Desc::readable(MEM as u64, 16)]);
        let t3 = drv.add_chain(TRANSMITQ, &[Desc::readable(MEM as u64 - 4, 16)]);
        let t4 = drv.add_chain(TRANSMITQ, &[Desc::readable(DATA_START + 0x1000, 2)]);
        drv.kick(TRANSMITQ);
        for h in [t1, t2, t3, t4] {
            assert_eq!(drv.used(TRANSMITQ), (h, 0));
        }
        assert_eq!(out.take(), b"ok");
        assert_eq!(read(&drv, DATA_START, 6), b"secret");

        // Receive: readable-only and out-of-range buffers get nothing and
        // the input is still there for a good buffer.
        input.send(b"xyz");
        let r1 = drv.add_chain(RECEIVEQ, &[Desc::readable(DATA_START + 0x2000, 8)]);
        let r2 = drv.add_chain(RECEIVEQ, &[Desc::writable(MEM as u64 - 2, 8)]);
        let r3 = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START + 0x3000, 8)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.used(RECEIVEQ), (r1, 0));
        assert_eq!(drv.used(RECEIVEQ), (r2, 0));
        assert_eq!(drv.used(RECEIVEQ), (r3, 3));
        assert_eq!(read(&drv, DATA_START + 0x2000, 3), [0, 0, 0]);
        assert_eq!(read(&drv, MEM as u64 - 2, 2), [0, 0]);
        assert_eq!(read(&drv, DATA_START + 0x3000, 3), b"xyz");
    }

    #[test]
    fn reset_keeps_pending_input_and_resize_signals_the_driver() {
        let (mut c, _, mut drv) = console(ConsoleConfig::default());
        let input = c.input();
        // Not active: stored, no interrupt.
        input.resize(80, 25);
        assert_eq!(drv.interrupt.count(InterruptKind::Config), 0);
        c.activate(drv.activation(c.features())).unwrap();
        input.resize(100, 30);
        assert_eq!(drv.interrupt.count(InterruptKind::Config), 1);
        let mut d = [0u8; 4];
        c.read_config(0, &mut d);
        assert_eq!(d, [100, 0, 30, 0]);

        c.reset();
        input.send(b"after reset");
        let h = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START, 64)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.wait_used(RECEIVEQ, Duration::from_millis(100)), None);
        input.resize(120, 40);
        assert_eq!(drv.interrupt.count(InterruptKind::Config), 1);
        let _ = h;

        c.activate(drv.activation(c.features())).unwrap();
        let h = drv.add_chain(RECEIVEQ, &[Desc::writable(DATA_START + 0x1000, 64)]);
        drv.kick(RECEIVEQ);
        assert_eq!(drv.used(RECEIVEQ), (h, 11));
        assert_eq!(read(&drv, DATA_START + 0x1000, 11), b"after reset");
    }

    #[test]
    fn missing_queue_is_an_activation_error() {
        let (mut c, _, mut drv) = console(ConsoleConfig::default());
        let a = drv.activation_of(features::VERSION_1, &[RECEIVEQ]);
        assert!(matches!(
            c.activate(a),
            Err(ActivateError::MissingQueues { need: 2, got: 1 })
        ));
    }
}
