//! virtio-vsock (virtio 1.2 §5.10) with the host side on Unix sockets.
//!
//! `--vsock cid=3,socket=/run/vm.vsock`:
//! * the guest connects to CID 2 port N → the device connects to the Unix
//!   socket `/run/vm.vsock_N` (RST to the guest if nobody listens there);
//! * a host program connects to `/run/vm.vsock` and writes `CONNECT N\n` →
//!   the device opens a connection to guest port N and answers
//!   `OK <local port>\n` once the guest accepts (the socket is closed if
//!   it refuses); from then on the stream is transparent.
//!
//! Queues: rx (0, device → driver), tx (1, driver → device), event (2, held
//! but unused: no transport reset is ever announced). Only stream sockets.
//! Every tx packet is validated ([`packet::validate_tx`]); a bad one is
//! dropped, or answered with RST when its addressing is sound, with one log
//! line. Flow control is credit based both ways ([`connection`]); the host
//! side lives in [`unix::Muxer`].

pub mod connection;
pub mod packet;
pub mod unix;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use vireo_sandbox::seccomp::Device;

use virtio_queue::{Reader, Writer};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::packet::{validate_tx, Header, PacketError, HDR_LEN, MAX_PKT_PAYLOAD};
use self::unix::Muxer;
use super::worker::{EpollCtl, EventHandler, Worker};
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, Interrupt, InterruptKind,
    Queue, QueueT, VirtioDevice,
};
use vireo_api::devices::vsock::{check_socket_path_len, VsockConfig};
use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use virtio_queue::QueueOwnedT;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_LISTENER: u64 = 3;

/// Stop taking tx packets while this many control packets (RST, RESPONSE,
/// credit updates) wait for rx buffers: a guest that never gives rx
/// buffers cannot make us queue without bound.
const MAX_CONTROL_BACKLOG: usize = 1024;
/// Bad-packet warnings logged per activation before going quiet.
const MAX_WARNINGS: u32 = 32;

/// A vsock device that cannot start.
#[derive(Debug, thiserror::Error)]
#[error("--vsock: {0}")]
pub struct VsockError(String);

/// What a snapshot of the device would hold. Connections are not part of
/// it: on restore they are gone and the guest would be told with a
/// TRANSPORT_RESET event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub acked_features: u64,
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// (dev, inode) of the socket file we bound, to remove only our own.
    socket_id: Option<(u64, u64)>,
    acked_features: u64,
    worker: Option<Worker>,
    /// Restored from a snapshot: tell the driver its connections are gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) when the device starts.
    reset_event: bool,
}

impl Vsock {
    /// Bind the host socket `config.socket` (replacing a stale one nobody
    /// listens on). Host programs may connect at once; they are served
    /// once the guest driver is up.
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        check_socket_path_len(&config.socket).map_err(|e| VsockError(e.to_string()))?;
        let listener = unix::bind_listener(&config.socket).map_err(VsockError)?;
        let socket_id = unix::file_identity(&config.socket);
        Ok(Vsock {
            config,
            listener,
            socket_id,
            acked_features: 0,
            worker: None,
            reset_event: false,
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.config.cid,
            acked_features: self.acked_features,
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        if self.socket_id.is_some() && unix::file_identity(&self.config.socket) == self.socket_id {
            let _ = std::fs::remove_file(&self.config.socket);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn name(&self) -> String {
        format!("virtio-vsock cid {}", self.config.cid)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            features,
        } = activation;
        let got = queues.len();
        let event_idx = features & features::RING_EVENT_IDX != 0;
        let (mut rx, mut tx, mut event) = (None, None, None);
        for mut q in queues {
            q.queue.set_event_idx(event_idx);
            match q.index {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                EVENT_QUEUE => event = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            // The event queue is optional; rx and tx are not.
            return Err(ActivateError::MissingQueues { need: 2, got });
        };
        let listener = self
            .listener
            .try_clone()
            .map_err(|source| ActivateError::Socket {
                path: self.config.socket.clone(),
                source,
            })?;
        let name = self.name();
        let muxer = Muxer::new(
            name.clone(),
            self.config.cid,
            self.config.socket.clone(),
            listener,
        );
        let mut fds = vec![
            (rx.notify.as_raw_fd(), EventSet::IN, TOKEN_RX),
            (tx.notify.as_raw_fd(), EventSet::IN, TOKEN_TX),
            (muxer.listener_fd(), EventSet::IN, TOKEN_LISTENER),
        ];
        if let Some(e) = &event {
            fds.push((e.notify.as_raw_fd(), EventSet::IN, TOKEN_EVENT));
        }
        if std::mem::take(&mut self.reset_event) {
            match event.as_mut() {
                Some(e) => transport_reset(&name, &memory, &mut e.queue, interrupt.as_ref()),
                None => tracing::warn!("{name}: restored without an event queue; the guest is not told its connections were reset"),
            }
        }
        // Look at the queues once at start: buffers may be there already.
        let _ = rx.notify.write(1);
        let _ = tx.notify.write(1);
        let handler = VsockHandler {
            name: name.clone(),
            guest_cid: self.config.cid,
            mem: memory,
            rx: rx.queue,
            rx_notify: rx.notify,
            tx: tx.queue,
            tx_notify: tx.notify,
            event: event.map(|e| (e.queue, e.notify)),
            interrupt,
            muxer,
            rx_buf: vec![0; MAX_PKT_PAYLOAD],
            tx_buf: vec![0; MAX_PKT_PAYLOAD],
            tx_pending: true,
            warnings: 0,
        };
        let worker =
            Worker::spawn(&name, Device::Vsock, &fds, handler).map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        self.acked_features = features;
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping the worker drops its muxer: every host socket closes.
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
    }
}

impl Pausable for Vsock {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

/// Why a saved vsock state does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum VsockStateError {
    #[error("the snapshot's guest cid is {saved}, this one is {here}; keep cid={saved}")]
    Cid { saved: u64, here: u64 },
}

// Live connections are not saved (their host sockets belong to this
// process): a restored device starts with none and tells the driver
// with a TRANSPORT_RESET event, as Firecracker does.
impl Snapshottable for Vsock {
    type State = VsockState;
    type Error = VsockStateError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<VsockState, VsockStateError> {
        Ok(self.state())
    }

    fn restore(&mut self, saved: VsockState) -> Result<(), VsockStateError> {
        if saved.guest_cid != self.config.cid {
            return Err(VsockStateError::Cid {
                saved: saved.guest_cid,
                here: self.config.cid,
            });
        }
        self.reset_event = true;
        Ok(())
    }
}

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6.5).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Put a TRANSPORT_RESET event in the driver's first event buffer.
fn transport_reset(name: &str, mem: &GuestMemory, queue: &mut Queue, interrupt: &dyn Interrupt) {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        tracing::warn!("{name}: no event buffer; the guest is not told its connections were reset");
        return;
    };
    let head = chain.head_index();
    let written = match chain.writer(mem) {
        Ok(mut w) => w
            .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
            .map(|()| 4u32)
            .unwrap_or(0),
        Err(_) => 0,
    };
    if written == 0 {
        tracing::warn!("{name}: the event buffer is not writable; connection reset not signalled");
    }
    if let Err(e) = queue.add_used(mem, head, written) {
        tracing::warn!("{name}: event queue: {e}");
        return;
    }
    if let Err(e) = interrupt.signal(InterruptKind::Queue(EVENT_QUEUE)) {
        tracing::warn!("{name}: event interrupt: {e}");
    }
}

/// The device thread's state.
struct VsockHandler {
    name: String,
    guest_cid: u64,
    mem: GuestMemory,
    rx: Queue,
    rx_notify: EventFd,
    tx: Queue,
    tx_notify: EventFd,
    /// The event queue: held, never used.
    event: Option<(Queue, EventFd)>,
    interrupt: Arc<dyn Interrupt>,
    muxer: Muxer,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The tx queue may hold packets we have not taken.
    tx_pending: bool,
    warnings: u32,
}

impl EventHandler for VsockHandler {
    fn handle(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) -> bool {
        match token {
            TOKEN_RX => {
                let _ = self.rx_notify.read();
            }
            TOKEN_TX => {
                let _ = self.tx_notify.read();
                self.tx_pending = true;
            }
            TOKEN_EVENT => {
                if let Some((_, e)) = &self.event {
                    let _ = e.read();
                }
            }
            TOKEN_LISTENER => self.muxer.accept(ctl),
            t => self.muxer.host_event(t, events, ctl),
        }
        match self.run(ctl) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{}: queue error: {e}", self.name);
                false
            }
        }
    }
}

impl VsockHandler {
    fn warn(&mut self, what: std::fmt::Arguments) {
        self.warnings = self.warnings.saturating_add(1);
        if self.warnings <= MAX_WARNINGS {
            tracing::warn!("{}: {what}", self.name);
        }
        if self.warnings == MAX_WARNINGS {
            tracing::warn!("{}: further bad packets are not logged", self.name);
        }
    }

    fn signal(&self, queue: u16) {
        if let Err(e) = self.interrupt.signal(InterruptKind::Queue(queue)) {
            tracing::debug!("{}: interrupt for queue {queue}: {e}", self.name);
        }
    }

    /// Take tx packets and fill rx buffers until neither can move.
    fn run(&mut self, ctl: &EpollCtl) -> Result<(), virtio_queue::Error> {
        loop {
            if self.tx_pending {
                self.process_tx(ctl)?;
            }
            self.process_rx(ctl)?;
            // tx stopped on a full control backlog and the rx queue took
            // some of it: go on; otherwise wait for the guest.
            if !self.tx_pending || self.muxer.control_backlog() >= MAX_CONTROL_BACKLOG {
                return Ok(());
            }
        }
    }

    fn process_tx(&mut self, ctl: &EpollCtl) -> Result<(), virtio_queue::Error> {
        // Readers borrow the memory while the handler changes.
        let mem = self.mem.clone();
        let mut used = false;
        let mut rechecked = false;
        loop {
            if self.muxer.control_backlog() >= MAX_CONTROL_BACKLOG {
                break;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(&mem) else {
                // Re-arm notifications; look once more for a packet that
                // came meanwhile.
                if self.tx.enable_notification(&mem)? && !rechecked {
                    rechecked = true;
                    continue;
                }
                self.tx_pending = false;
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            match Reader::new(&mem, chain) {
                Ok(r) => self.tx_packet(r, ctl),
                Err(e) => self.warn(format_args!("tx chain {head} refused: {e}")),
            }
            self.tx.add_used(&mem, head, 0)?;
            used = true;
        }
        if used && self.tx.needs_notification(&mem)? {
            self.signal(TX_QUEUE);
        }
        Ok(())
    }

    /// One packet from the guest.
    fn tx_packet(
        &mut self,
        mut r: Reader<'_, vm_memory::bitmap::BS<'_, vireo_vmcore::memory::AtomicBitmap>>,
        ctl: &EpollCtl,
    ) {
        let avail = r.available_bytes();
        let mut hb = [0u8; HDR_LEN];
        if avail < HDR_LEN || r.read_exact(&mut hb).is_err() {
            let e = PacketError::ShortHeader(avail);
            self.warn(format_args!("tx packet dropped: {e}"));
            return;
        }
        let h = Header::from_bytes(&hb);
        if let Err(e) = validate_tx(&h, self.guest_cid, avail - HDR_LEN) {
            let rst = e.answer_with_rst();
            self.warn(format_args!(
                "tx packet {}:{} op {} {}: {e}",
                h.src_port,
                h.dst_port,
                h.op,
                if rst { "reset" } else { "dropped" }
            ));
            if rst {
                self.muxer.reject(&h, ctl);
            }
            return;
        }
        // validate_tx bounds len by MAX_PKT_PAYLOAD = tx_buf.len().
        let len = h.len as usize;
        let Some(payload) = self.tx_buf.get_mut(..len) else {
            return;
        };
        if let Err(e) = r.read_exact(payload) {
            self.warn(format_args!("tx packet payload unreadable: {e}; reset"));
            self.muxer.reject(&h, ctl);
            return;
        }
        self.muxer.guest_packet(&h, &self.tx_buf[..len], ctl);
    }

    fn process_rx(&mut self, ctl: &EpollCtl) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        let mut used = false;
        let mut rechecked = false;
        while self.muxer.has_rx_work() {
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                // Out of rx buffers: ask to be told when more come.
                if self.rx.enable_notification(&mem)? && !rechecked {
                    rechecked = true;
                    continue;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            let mut w: Writer<'_, vm_memory::bitmap::BS<'_, vireo_vmcore::memory::AtomicBitmap>> =
                match Writer::new(&mem, chain) {
                    Ok(w) => w,
                    Err(e) => {
                        self.warn(format_args!("rx chain {head} refused: {e}"));
                        self.rx.add_used(&mem, head, 0)?;
                        used = true;
                        continue;
                    }
                };
            let room = w.available_bytes();
            if room < HDR_LEN {
                self.warn(format_args!(
                    "rx buffer {head} has {room} writable bytes, less than a header; skipped"
                ));
                self.rx.add_used(&mem, head, 0)?;
                used = true;
                continue;
            }
            let room = (room - HDR_LEN).min(MAX_PKT_PAYLOAD);
            let Some((h, n)) = self.muxer.next_rx(&mut self.rx_buf[..room], ctl) else {
                // Nothing after all (a spurious readable socket): give
                // the buffer back.
                self.rx.go_to_previous_position();
                break;
            };
            let written = w
                .write_all(&h.to_bytes())
                .and_then(|()| w.write_all(&self.rx_buf[..n]));
            if let Err(e) = written {
                // Sizes were checked; only a memory fault gets here.
                self.warn(format_args!("rx buffer {head}: {e}; packet lost"));
            }
            self.rx.add_used(&mem, head, w.bytes_written() as u32)?;
            used = true;
        }
        if used && self.rx.needs_notification(&mem)? {
            self.signal(RX_QUEUE);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
