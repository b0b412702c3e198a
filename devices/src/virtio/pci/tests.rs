use super::*;
use crate::pci::config::{BAR0, COMMAND_MEMORY};
use crate::virtio::{ActivateError, QueueT};
use std::sync::Mutex;
use vireo_vmcore::snapshot::device::{Pausable, SavedState, Snapshottable};
use vm_memory::GuestAddress;

#[derive(Default)]
struct Seen {
    activations: Vec<(Vec<u16>, u64)>,
    resets: usize,
    pauses: usize,
    interrupt: Option<Arc<dyn Interrupt>>,
    notifies: Vec<EventFd>,
}

/// A device that records what the transport does to it.
struct Probe(Arc<Mutex<Seen>>);

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        super::super::device_type::RNG
    }
    fn name(&self) -> String {
        "probe".into()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 16]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&[0xaa, 0xbb, 0xcc, 0xdd], offset, data)
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut s = self.0.lock().unwrap();
        s.activations
            .push((a.queues.iter().map(|q| q.index).collect(), a.features));
        s.interrupt = Some(a.interrupt.clone());
        s.notifies = a.queues.into_iter().map(|q| q.notify).collect();
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

/// The probe takes part in snapshots like any virtio device: the two
/// lifecycle traits and nothing else. Its own state is how often it was
/// reset; the transport saves the queues and features around it.
impl Pausable for Probe {
    fn pause(&mut self) {
        self.0.lock().unwrap().pauses += 1;
    }
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct ProbeState {
    resets: usize,
}

impl Snapshottable for Probe {
    type State = ProbeState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;
    fn save(&self) -> Result<ProbeState, Self::Error> {
        Ok(ProbeState {
            resets: self.0.lock().unwrap().resets,
        })
    }
    fn restore(&mut self, state: ProbeState) -> Result<(), Self::Error> {
        self.0.lock().unwrap().resets = state.resets;
        Ok(())
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, u32)>>);
impl MsiSender for Recorder {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().push((address, data));
        Ok(())
    }
}

struct Level(Mutex<Vec<bool>>);
impl InterruptLine for Level {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.0.lock().unwrap().push(asserted);
        Ok(())
    }
    fn eventfd(&self) -> std::io::Result<EventFd> {
        Err(std::io::Error::other("none"))
    }
}

struct Rig {
    dev: VirtioPciDevice,
    seen: Arc<Mutex<Seen>>,
    msi: Arc<Recorder>,
    intx: Arc<Level>,
}

fn rig() -> Rig {
    let mem =
        vireo_vmcore::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let msi = Arc::new(Recorder::default());
    let intx = Arc::new(Level(Mutex::new(Vec::new())));
    let dev = VirtioPciDevice::new(
        Box::new(Probe(seen.clone())),
        mem,
        0xc000_0000,
        msi.clone(),
        Some((intx.clone(), 16)),
    )
    .unwrap();
    Rig {
        dev,
        seen,
        msi,
        intx,
    }
}

impl Rig {
    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }
    /// Driver setup up to FEATURES_OK with `features` accepted.
    fn negotiate(&mut self, features: u64) {
        self.w(0x14, 0, 1);
        self.w(0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
    }
    /// Set queue `q` up at rings in the first MiB and enable it.
    fn setup_queue(&mut self, q: u16, desc: u64) {
        self.w(0x16, u64::from(q), 2);
        self.w(0x18, 8, 2);
        self.w(0x20, desc, 8);
        self.w(0x28, desc + 0x1000, 8);
        self.w(0x30, desc + 0x2000, 8);
        self.w(0x1c, 1, 2);
    }
    fn driver_ok(&mut self) {
        let s = self.status() | status::DRIVER_OK;
        self.w(0x14, u64::from(s), 1);
    }
}

#[test]
fn identity_and_capabilities_describe_a_modern_device() {
    let r = rig();
    let c = r.dev.config().bytes();
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0x1af4);
    assert_eq!(u16::from_le_bytes([c[2], c[3]]), 0x1044, "0x1040 + rng");
    assert_eq!(c[8], 1, "revision 1: modern");
    // Walk the capability list: MSI-X, then the virtio structures.
    let mut types = Vec::new();
    let mut p = c[0x34] as usize;
    while p != 0 {
        if c[p] == CAP_VENDOR {
            types.push(c[p + 3]);
        } else {
            types.push(0x80 | c[p]);
        }
        p = c[p + 1] as usize;
    }
    assert_eq!(types, vec![0x80 | 0x11, 1, 2, 3, 4, 5]);
    assert_eq!(c[0x3d], 1, "INTx pin A");
    assert_eq!(c[0x3c], 16);
}

#[test]
fn features_beyond_the_offer_or_without_version_1_are_refused() {
    let mut r = rig();
    assert_eq!(r.r(0x04, 4), 1 | features::RING_EVENT_IDX & 0xffff_ffff);
    r.w(0x00, 1, 4);
    assert_eq!(r.r(0x04, 4), 1, "VERSION_1 is bit 32");
    r.negotiate(features::VERSION_1 | 1 << 3);
    assert_eq!(r.status() & status::FEATURES_OK, 0);
    r.negotiate(1);
    assert_eq!(
        r.status() & status::FEATURES_OK,
        0,
        "legacy drivers refused"
    );
    r.negotiate(features::VERSION_1 | 1);
    assert_ne!(r.status() & status::FEATURES_OK, 0);
    // Feature writes after FEATURES_OK are ignored.
    r.w(0x08, 0, 4);
    r.w(0x0c, 0, 4);
    assert_eq!(r.r(0x0c, 4), 1);
}

#[test]
fn driver_ok_activates_the_enabled_queues_and_reset_stops_them() {
    let mut r = rig();
    assert_eq!(r.r(0x12, 2), 2, "num_queues");
    r.negotiate(features::VERSION_1 | features::RING_EVENT_IDX);
    r.setup_queue(1, 0x10000);
    assert_eq!(r.r(0x18, 2), 8);
    assert_eq!(r.r(0x20, 8), 0x10000);
    r.driver_ok();
    assert_eq!(r.status() & status::NEEDS_RESET, 0);
    {
        let s = r.seen.lock().unwrap();
        assert_eq!(
            s.activations,
            vec![(vec![1], features::VERSION_1 | features::RING_EVENT_IDX)]
        );
    }
    // Queue setup is frozen after DRIVER_OK.
    r.w(0x16, 1, 2);
    r.w(0x20, 0x20000, 8);
    assert_eq!(r.r(0x20, 8), 0x10000);
    // Notify queue 1 → the device's eventfd.
    r.w(NOTIFY_OFFSET + 4, 1, 2);
    assert_eq!(r.seen.lock().unwrap().notifies[0].read().unwrap(), 1);
    // Reset.
    r.w(0x14, 0, 1);
    assert_eq!(r.status(), 0);
    assert_eq!(r.seen.lock().unwrap().resets, 1);
    r.w(0x16, 1, 2);
    assert_eq!(r.r(0x1c, 2), 0, "queue disabled after reset");
}

#[test]
fn a_queue_outside_guest_memory_needs_reset_instead_of_starting() {
    let mut r = rig();
    r.negotiate(features::VERSION_1);
    r.setup_queue(0, 0xfff_f000); // past the 1 MiB of guest memory
    r.driver_ok();
    assert_ne!(r.status() & status::NEEDS_RESET, 0);
    assert!(r.seen.lock().unwrap().activations.is_empty());
    // Odd queue sizes are refused at the register.
    r.w(0x14, 0, 1);
    r.w(0x16, 0, 2);
    r.w(0x18, 7, 2);
    assert_eq!(r.r(0x18, 2), 16, "max size kept");
}

#[test]
fn msix_vectors_route_queue_and_config_interrupts() {
    let mut r = rig();
    // Enable MSI-X in the capability (message control bit 15).
    let cap = r.dev.msix_cap_offset as u64;
    r.dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    // Vector 1: address/data, unmasked.
    r.w(MSIX_TABLE_OFFSET + 16, 0xfee0_0000, 8);
    r.w(MSIX_TABLE_OFFSET + 24, 0x31, 4);
    r.w(MSIX_TABLE_OFFSET + 28, 0, 4);
    r.negotiate(features::VERSION_1);
    r.w(0x16, 0, 2);
    r.w(0x1a, 1, 2);
    assert_eq!(r.r(0x1a, 2), 1);
    r.w(0x1a, 99, 2);
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR), "no such vector");
    r.w(0x1a, 1, 2);
    r.setup_queue(0, 0x10000);
    r.driver_ok();
    let irq = r.seen.lock().unwrap().interrupt.clone().unwrap();
    irq.signal(InterruptKind::Queue(0)).unwrap();
    assert_eq!(*r.msi.0.lock().unwrap(), vec![(0xfee0_0000, 0x31)]);
    // Config vector unassigned: nothing sent, no INTx either.
    irq.signal(InterruptKind::Config).unwrap();
    assert_eq!(r.msi.0.lock().unwrap().len(), 1);
    assert!(r.intx.0.lock().unwrap().is_empty());
}

#[test]
fn without_msix_interrupts_use_intx_and_the_isr() {
    let mut r = rig();
    r.negotiate(features::VERSION_1);
    r.setup_queue(0, 0x10000);
    r.driver_ok();
    let irq = r.seen.lock().unwrap().interrupt.clone().unwrap();
    irq.signal(InterruptKind::Queue(0)).unwrap();
    irq.signal(InterruptKind::Config).unwrap();
    assert_eq!(r.r(ISR_OFFSET, 1), 3);
    assert_eq!(r.r(ISR_OFFSET, 1), 0, "reading clears");
    assert_eq!(*r.intx.0.lock().unwrap(), vec![true, true, false]);
}

#[test]
fn device_config_and_the_pci_cfg_window() {
    let mut r = rig();
    assert_eq!(r.r(DEVICE_CFG_OFFSET + 1, 2), 0xccbb);
    assert_eq!(r.r(DEVICE_CFG_OFFSET + 4, 4), 0);
    // Reach the device config through VIRTIO_PCI_CAP_PCI_CFG.
    let cap = r.dev.pci_cfg_cap_offset as u64;
    r.dev.config_write(cap + 4, &[0]);
    r.dev
        .config_write(cap + 8, &(DEVICE_CFG_OFFSET as u32).to_le_bytes());
    r.dev.config_write(cap + 12, &4u32.to_le_bytes());
    let mut d = [0u8; 4];
    r.dev.config_read(cap + 16, &mut d);
    assert_eq!(d, [0xaa, 0xbb, 0xcc, 0xdd]);
}

#[test]
fn bar_moves_with_the_guest_and_hostile_accesses_are_harmless() {
    let mut r = rig();
    r.dev
        .config_write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
    r.dev
        .config_write(BAR0 as u64, &0xd000_0000u32.to_le_bytes());
    assert_eq!(r.dev.config().bar_range(0), Some((0xd000_0000, BAR_SIZE)));
    // Odd sizes and offsets anywhere in the BAR.
    for off in (0..BAR_SIZE).step_by(0x3ff) {
        for len in [1usize, 2, 3, 4, 8, 16, 32] {
            let mut b = vec![0u8; len];
            r.dev.bar_read(0, off, &mut b);
            r.dev.bar_write(0, off, &b);
        }
    }
    r.dev.bar_read(3, 0, &mut [0u8; 4]);
    r.dev.config_write(250, &[0xff; 8]);
    // Queue select past the end reads zeros and ignores writes.
    r.w(0x16, 77, 2);
    assert_eq!(r.r(0x18, 2), 0);
    r.w(0x20, 0x1234, 8);
    let _ = r.dev.queues[0].queue.size();
}

#[derive(Default)]
struct Registrations(Mutex<Vec<(bool, u64)>>);
impl crate::pci::IoEventRegistrar for Registrations {
    fn register(&self, addr: u64, _: &EventFd) -> std::io::Result<bool> {
        self.0.lock().unwrap().push((true, addr));
        Ok(true)
    }
    fn unregister(&self, addr: u64, _: &EventFd) -> std::io::Result<()> {
        self.0.lock().unwrap().push((false, addr));
        Ok(())
    }
}

#[test]
fn notify_ioeventfds_follow_bar_0() {
    let mut r = rig();
    let reg = Arc::new(Registrations::default());
    r.dev.set_ioevent_registrar(reg.clone());
    assert!(
        reg.0.lock().unwrap().is_empty(),
        "decoding off: nothing yet"
    );
    r.dev
        .config_write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(
        *reg.0.lock().unwrap(),
        vec![(true, 0xc000_3000), (true, 0xc000_3004)]
    );
    r.dev
        .config_write(BAR0 as u64, &0xd000_0000u32.to_le_bytes());
    assert_eq!(
        reg.0.lock().unwrap()[2..],
        [
            (false, 0xc000_3000),
            (false, 0xc000_3004),
            (true, 0xd000_3000),
            (true, 0xd000_3004)
        ]
    );
    // Sizing the BAR moves it to 0xffff8000 for a moment: registrations follow.
    r.dev.config_write(COMMAND as u64, &0u16.to_le_bytes());
    assert_eq!(reg.0.lock().unwrap().len(), 8, "decoding off: unregistered");
}

/// A virtio-rng behind the transport with MSI-X on, queue 0 (8 entries)
/// at 0x10000/0x11000/0x12000 and DRIVER_OK: what a guest driver leaves.
fn running_rng(mem: &GuestMemory, msi: Arc<Recorder>) -> VirtioPciDevice {
    let rng = crate::virtio::rng::Rng::new(Default::default());
    let dev = VirtioPciDevice::new(Box::new(rng), mem.clone(), 0xc000_0000, msi, None).unwrap();
    let mut r = Rig {
        dev,
        seen: Arc::default(),
        msi: Arc::default(),
        intx: Arc::new(Level(Mutex::new(Vec::new()))),
    };
    r.dev
        .config_write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
    let cap = r.dev.msix_cap_offset as u64;
    r.dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    r.w(MSIX_TABLE_OFFSET, 0xfee0_0000, 8);
    r.w(MSIX_TABLE_OFFSET + 8, 0x41, 4);
    r.w(MSIX_TABLE_OFFSET + 12, 0, 4);
    r.negotiate(features::VERSION_1);
    r.w(0x16, 0, 2);
    r.w(0x1a, 0, 2);
    r.setup_queue(0, 0x10000);
    r.driver_ok();
    assert_eq!(r.status() & status::NEEDS_RESET, 0);
    r.dev
}

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;

/// Post a 16-byte writable buffer at `buf` as descriptor `n` (and avail
/// entry `n`).
fn post(mem: &GuestMemory, n: u16, buf: u64) {
    use vm_memory::Bytes;
    let d = DESC + u64::from(n % 8) * 16;
    mem.write_obj(buf, GuestAddress(d)).unwrap();
    mem.write_obj(16u32, GuestAddress(d + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // WRITE
    mem.write_obj(n % 8, GuestAddress(AVAIL + 4 + u64::from(n % 8) * 2))
        .unwrap();
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
}

fn used_idx(mem: &GuestMemory) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn wait_used(mem: &GuestMemory, n: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used_idx(mem) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "used index stuck at {} (want {n})",
            used_idx(mem)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn save_and_restore_carry_a_running_device_over_without_renegotiation() {
    use vm_memory::Bytes;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let msi = Arc::new(Recorder::default());
    let mut a = running_rng(&mem, msi.clone());
    post(&mem, 0, 0x20000);
    a.bar_write(0, NOTIFY_OFFSET, &[0, 0]);
    wait_used(&mem, 1);
    assert!(!msi.0.lock().unwrap().is_empty(), "MSI-X vector 0 fired");

    // Quiesced: a request posted now is not served, and stays in the
    // avail ring for the restored device.
    a.pause();
    post(&mem, 1, 0x20100);
    a.bar_write(0, NOTIFY_OFFSET, &[0, 0]);
    let saved = a.save().unwrap();
    assert_eq!(used_idx(&mem), 1, "a paused device served a request");
    assert!(saved.active);
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(saved.queues[0].vector, 0);
    assert_eq!(saved.msix.entries[0], [0xfee0_0000, 0x41, 0]);
    // Through JSON, as in the state file.
    let json = serde_json::to_value(&saved).unwrap();
    drop(a);

    let msi_b = Arc::new(Recorder::default());
    let rng = crate::virtio::rng::Rng::new(Default::default());
    let mut b =
        VirtioPciDevice::new(Box::new(rng), mem.clone(), 0xc000_0000, msi_b.clone(), None).unwrap();
    b.restore(serde_json::from_value(json).unwrap()).unwrap();
    // The driver's view is unchanged: status, features, queue registers.
    let mut rb = |off: u64, len: usize| {
        let mut d = [0u8; 8];
        b.bar_read(0, off, &mut d[..len]);
        u64::from_le_bytes(d)
    };
    assert_eq!(rb(0x14, 1) as u8 & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(rb(0x20, 8), DESC);
    assert_eq!(rb(0x1c, 2), 1);
    assert_eq!(rb(0x1a, 2), 0);
    // The request posted while paused is served by the restored device,
    // which raises the same MSI-X message.
    wait_used(&mem, 2);
    assert_eq!(msi_b.0.lock().unwrap()[0], (0xfee0_0000, 0x41));
    // And it keeps working.
    post(&mem, 2, 0x20200);
    b.bar_write(0, NOTIFY_OFFSET, &[0, 0]);
    wait_used(&mem, 3);
    let head: u32 = mem.read_obj(GuestAddress(USED + 4 + 2 * 8)).unwrap();
    assert_eq!(head, 2);
    // A second snapshot of the restored device saves the same layout.
    b.pause();
    let again = b.save().unwrap();
    assert_eq!(again.pci_config, saved.pci_config);
    assert_eq!(again.queues[0].next_used, 3);
    b.resume();
}

#[test]
fn restore_refuses_state_of_another_device_or_a_corrupt_one() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut a = running_rng(&mem, Arc::default());
    // A running device is saved only once paused.
    let e = a.save().unwrap_err();
    assert!(e.to_string().contains("pause it first"), "{e}");
    a.pause();
    let saved = a.save().unwrap();
    a.resume();
    drop(a);
    let fresh = || {
        let rng = crate::virtio::rng::Rng::new(Default::default());
        VirtioPciDevice::new(
            Box::new(rng),
            mem.clone(),
            0xc000_0000,
            Arc::new(Recorder::default()),
            None,
        )
        .unwrap()
    };
    // Another device kind (the probe has other features).
    let mut r = rig();
    let e = r.dev.restore(saved.clone()).unwrap_err().to_string();
    assert!(e.contains("features"), "{e}");
    // A changed vendor id in configuration space.
    let mut bad = saved.clone();
    bad.pci_config[0] ^= 1;
    let e = fresh().restore(bad).unwrap_err().to_string();
    assert!(e.contains("read-only offset 0x0"), "{e}");
    // A ring outside guest memory.
    let mut bad = saved.clone();
    bad.queues[0].used_ring = 0x7fff_0000;
    let e = fresh().restore(bad).unwrap_err().to_string();
    assert!(e.contains("not valid in guest memory"), "{e}");
    // A vector beyond the table.
    let mut bad = saved.clone();
    bad.queues[0].vector = 77;
    assert!(fresh().restore(bad).is_err());
    // The device's own state of another version, or garbage.
    let mut bad = saved.clone();
    bad.device.version = 2;
    let e = fresh().restore(bad).unwrap_err().to_string();
    assert!(e.contains("version 2"), "{e}");
    let mut bad = saved.clone();
    bad.device = SavedState {
        version: 1,
        state: serde_json::json!({"status": "x"}),
    };
    assert!(fresh().restore(bad).is_err());
    // The good state still loads.
    fresh().restore(saved).unwrap();
}

/// Queue `q` of a test device: 8 entries at 0x20000 + q * 0x10000
/// (desc), + 0x1000 (avail), + 0x2000 (used).
fn ring(q: u16) -> (u64, u64, u64) {
    let base = 0x2_0000 + u64::from(q) * 0x1_0000;
    (base, base + 0x1000, base + 0x2000)
}

#[test]
fn a_buffer_the_device_held_unused_is_offered_again_after_restore() {
    use crate::virtio::balloon::{balloon_features as bf, Balloon};
    use vireo_api::devices::balloon::BalloonConfig;
    use vm_memory::Bytes;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let balloon = |mem: &GuestMemory| {
        let b = Balloon::new(BalloonConfig::default()).unwrap();
        let h = b.handle();
        let dev = VirtioPciDevice::new(
            Box::new(b),
            mem.clone(),
            0xc000_0000,
            Arc::new(Recorder::default()),
            None,
        )
        .unwrap();
        (dev, h)
    };
    let (dev, h) = balloon(&mem);
    let mut r = Rig {
        dev,
        seen: Arc::default(),
        msi: Arc::default(),
        intx: Arc::new(Level(Mutex::new(Vec::new()))),
    };
    r.negotiate(features::VERSION_1 | bf::STATS_VQ);
    for q in 0..3u16 {
        let (d, a, u) = ring(q);
        r.w(0x16, u64::from(q), 2);
        r.w(0x18, 8, 2);
        r.w(0x20, d, 8);
        r.w(0x28, a, 8);
        r.w(0x30, u, 8);
        r.w(0x1c, 1, 2);
    }
    r.driver_ok();
    assert_eq!(r.status() & status::NEEDS_RESET, 0);
    // The driver posts its statistics buffer (free memory = 0x1234) on the
    // stats queue; the device reads it and keeps the buffer.
    let (d, a, u) = ring(2);
    let stats = 0x9_0000u64;
    mem.write_obj(4u16, GuestAddress(stats)).unwrap(); // VIRTIO_BALLOON_S_MEMFREE
    mem.write_obj(0x1234u64, GuestAddress(stats + 2)).unwrap();
    mem.write_obj(stats, GuestAddress(d)).unwrap();
    mem.write_obj(10u32, GuestAddress(d + 8)).unwrap();
    mem.write_obj(0u16, GuestAddress(d + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(a + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(a + 2)).unwrap();
    r.w(NOTIFY_OFFSET + 8, 0, 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.stats().and_then(|s| s.free_memory) != Some(0x1234) {
        assert!(std::time::Instant::now() < deadline, "stats never read");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let used = |mem: &GuestMemory| mem.read_obj::<u16>(GuestAddress(u + 2)).unwrap();
    assert_eq!(used(&mem), 0, "the buffer is held, not used");
    r.dev.pause();
    let saved = r.dev.save().unwrap();
    assert_eq!(
        (saved.queues[2].next_avail, saved.queues[2].next_used),
        (0, 0),
        "the held buffer is left in the avail ring"
    );
    drop(r);

    // The restored balloon takes the buffer again: asking for statistics
    // hands it back to the driver.
    let (mut b, h2) = balloon(&mem);
    b.restore(saved).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used(&mem) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored device never returned the buffer"
        );
        h2.request_stats();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(used(&mem), 1);
    assert_eq!(h2.stats().and_then(|s| s.free_memory), Some(0x1234));
}

#[test]
fn a_device_joins_snapshots_through_its_two_lifecycle_traits() {
    let mut a = rig();
    a.negotiate(features::VERSION_1);
    a.setup_queue(0, 0x20000);
    a.driver_ok();
    a.w(0x14, 0, 1); // reset by the driver
    a.negotiate(features::VERSION_1);
    a.setup_queue(0, 0x20000);
    a.driver_ok();
    a.dev.pause();
    assert_eq!(a.seen.lock().unwrap().pauses, 1);
    let saved = a.dev.save().unwrap();
    assert_eq!(saved.device.version, 1);
    assert_eq!(saved.device.state, serde_json::json!({"resets": 1}));

    let mut b = rig();
    b.dev.restore(saved).unwrap();
    let seen = b.seen.lock().unwrap();
    assert_eq!(seen.resets, 1, "the probe's own state came back");
    assert_eq!(seen.activations.len(), 1, "and it runs again");
}
