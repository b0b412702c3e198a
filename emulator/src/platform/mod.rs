//! The software PC platform a VM's vCPUs share: one local APIC per vCPU
//! ([`lapic`]), the I/O APIC ([`ioapic`]), the 8259 pair ([`pic`]) and the
//! 8254 PIT ([`pit`]), with the routing between them.
//!
//! There are no platform threads: timers are polled by the vCPU threads
//! (every run slice and while halted), and a vCPU waiting in HLT sleeps on
//! its local APIC's condition variable, which every interrupt, IPI and kick
//! signals.

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ioapic::{IoApic, Message};
use lapic::{mode, Action, Lapic};
use pic::Pic;
use pit::Pit;

/// Guest physical address of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Default guest physical address of the local APIC page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One vCPU's local APIC, shared between its own thread and every thread
/// that sends it interrupts.
pub struct LocalApic {
    pub id: u32,
    state: Mutex<Lapic>,
    cv: Condvar,
    /// The IRR may hold a deliverable interrupt.
    pub(crate) irq_hint: AtomicBool,
    /// NMI, INIT or SIPI pending.
    pub(crate) event_hint: AtomicBool,
    /// The VMM asked `run` to return.
    pub(crate) kick: AtomicBool,
}

impl LocalApic {
    fn new(id: u32) -> Self {
        LocalApic {
            id,
            state: Mutex::new(Lapic::new(id)),
            cv: Condvar::new(),
            irq_hint: AtomicBool::new(false),
            event_hint: AtomicBool::new(false),
            kick: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Lapic> {
        lock(&self.state)
    }

    /// Recompute the hints after changing the state under the lock.
    pub(crate) fn refresh(&self, l: &Lapic) {
        self.irq_hint.store(l.has_deliverable(), Ordering::Release);
        self.event_hint.store(
            l.nmi_pending || l.init_pending || l.sipi_pending.is_some(),
            Ordering::Release,
        );
    }

    /// Change the state and wake the vCPU if it sleeps in HLT.
    pub fn post(&self, f: impl FnOnce(&mut Lapic)) {
        let mut g = self.lock();
        f(&mut g);
        self.refresh(&g);
        drop(g);
        self.cv.notify_all();
    }

    /// Wake the vCPU without changing anything (e.g. the PIC output rose).
    pub fn notify(&self) {
        drop(self.lock());
        self.cv.notify_all();
    }

    /// Make the vCPU's `run` return `Interrupted` soon.
    pub fn kick(&self) {
        self.kick.store(true, Ordering::Release);
        self.notify();
    }

    /// Sleep until `wake` (checked under the lock) holds or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration, wake: impl Fn(&Lapic) -> bool) {
        let g = self.lock();
        if wake(&g) || self.kick.load(Ordering::Acquire) {
            return;
        }
        let _ = self.cv.wait_timeout(g, timeout);
    }
}

/// The interrupt controllers and timer of one VM.
pub struct Platform {
    epoch: Instant,
    pic: Mutex<Pic>,
    pub(crate) pic_output: AtomicBool,
    ioapic: Mutex<IoApic>,
    pit: Mutex<Pit>,
    /// Nanoseconds since `epoch` of the next PIT interrupt (u64::MAX: none).
    pit_next_ns: AtomicU64,
    lapics: RwLock<Vec<Arc<LocalApic>>>,
    /// `lapics.len()`, read without the lock (at every IRET and CPUID).
    cpu_count: std::sync::atomic::AtomicUsize,
}

impl Platform {
    pub fn new() -> Arc<Self> {
        let epoch = Instant::now();
        Arc::new(Platform {
            epoch,
            pic: Mutex::new(Pic::new()),
            pic_output: AtomicBool::new(false),
            ioapic: Mutex::new(IoApic::new()),
            pit: Mutex::new(Pit::new(epoch)),
            pit_next_ns: AtomicU64::new(u64::MAX),
            lapics: RwLock::new(Vec::new()),
            cpu_count: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Nanoseconds since the platform was created (the TSC runs at 1 GHz).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The host time at which `ns` (since the epoch) is reached.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    /// Create the local APIC of vCPU `id` (its APIC id is `id`).
    pub fn add_lapic(&self, id: u32) -> Arc<LocalApic> {
        let l = Arc::new(LocalApic::new(id));
        let mut lapics = self.lapics.write().unwrap_or_else(PoisonError::into_inner);
        lapics.push(l.clone());
        self.cpu_count
            .store(lapics.len(), std::sync::atomic::Ordering::Release);
        l
    }

    /// How many vCPUs (local APICs) the platform has.
    pub fn cpu_count(&self) -> usize {
        self.cpu_count.load(std::sync::atomic::Ordering::Acquire)
    }

    fn lapics(&self) -> Vec<Arc<LocalApic>> {
        self.lapics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn bsp(&self) -> Option<Arc<LocalApic>> {
        self.lapics().into_iter().find(|l| l.id == 0)
    }

    /// Pulse global system interrupt `gsi`: the IOAPIC pin and, for ISA
    /// IRQs 0-15, the PIC line.
    pub fn pulse_gsi(&self, gsi: u32) {
        let msg = lock(&self.ioapic).pulse(gsi);
        if let Some(m) = msg {
            self.deliver(m);
        }
        if gsi < 16 {
            lock(&self.pic).pulse(gsi);
            self.update_pic_output();
        }
    }

    /// Set the level of `gsi` (level-triggered sources).
    pub fn set_gsi_level(&self, gsi: u32, high: bool) {
        let msg = lock(&self.ioapic).set_level(gsi, high);
        if let Some(m) = msg {
            self.deliver(m);
        }
        if gsi < 16 {
            lock(&self.pic).set_irq(gsi, high);
            self.update_pic_output();
        }
    }

    fn update_pic_output(&self) {
        let out = lock(&self.pic).output();
        let was = self.pic_output.swap(out, Ordering::AcqRel);
        if out && !was {
            if let Some(bsp) = self.bsp() {
                bsp.notify();
            }
        }
    }

    /// INTA from the BSP for an ExtINT.
    pub(crate) fn ack_pic(&self) -> u8 {
        let v = lock(&self.pic).ack();
        self.update_pic_output();
        v
    }

    /// The local APICs a destination selects.
    fn targets(&self, logical: bool, dest: u8) -> Vec<Arc<LocalApic>> {
        self.lapics()
            .into_iter()
            .filter(|l| {
                if dest == 0xff {
                    return true;
                }
                let s = l.lock();
                if logical {
                    s.matches_logical(dest)
                } else {
                    s.id() == u32::from(dest)
                }
            })
            .collect()
    }

    fn deliver_to(l: &LocalApic, mode_: u32, vector: u8, level: bool) {
        match mode_ {
            mode::FIXED | mode::LOWEST => l.post(|s| s.accept(vector, level)),
            mode::NMI => l.post(|s| s.nmi_pending = true),
            mode::INIT => l.post(|s| s.init_pending = true),
            mode::STARTUP => l.post(|s| s.sipi_pending = Some(vector)),
            _ => {} // SMI and ExtINT messages are not modelled
        }
    }

    /// Deliver an IOAPIC message.
    fn deliver(&self, m: Message) {
        let mut t = self.targets(m.logical, m.dest);
        if m.mode == mode::LOWEST {
            t.truncate(1);
        }
        for l in t {
            Self::deliver_to(&l, m.mode, m.vector, m.level);
        }
    }

    /// Deliver a message-signalled interrupt written by a device: the
    /// address (0xFEEx_xxxx) carries the destination APIC id (bits 19:12)
    /// and destination mode (bit 2); the data the vector, delivery mode and
    /// trigger mode. Messages outside the APIC window are dropped.
    pub fn deliver_msi(&self, address: u64, data: u32) {
        if address >> 20 != 0xfee {
            tracing::warn!("MSI to {address:#x} is outside the APIC window; dropped");
            return;
        }
        self.deliver(Message {
            vector: data as u8,
            mode: (data >> 8) & 7,
            logical: address & (1 << 2) != 0,
            level: false,
            dest: (address >> 12) as u8,
        });
    }

    /// Send the IPI a write of ICR low (`lo`, with ICR high `hi`) asks for.
    pub(crate) fn send_ipi(&self, src: u32, lo: u32, hi: u32) {
        let vector = lo as u8;
        let mode_ = (lo >> 8) & 7;
        let logical = lo & (1 << 11) != 0;
        let assert = lo & (1 << 14) != 0;
        let level_trig = lo & (1 << 15) != 0;
        if mode_ == mode::INIT && !assert && level_trig {
            return; // INIT level de-assert
        }
        let dest = (hi >> 24) as u8;
        let mut t: Vec<Arc<LocalApic>> = match (lo >> 18) & 3 {
            0 => self.targets(logical, dest),
            1 => self.lapics().into_iter().filter(|l| l.id == src).collect(),
            2 => self.lapics(),
            _ => self.lapics().into_iter().filter(|l| l.id != src).collect(),
        };
        if mode_ == mode::LOWEST {
            t.truncate(1);
        }
        for l in t {
            Self::deliver_to(&l, mode_, vector, false);
        }
    }

    /// Carry out what a local APIC register write asked for.
    pub(crate) fn lapic_action(&self, src: u32, a: Action) {
        match a {
            Action::None => {}
            Action::LevelEoi(v) => {
                let again = lock(&self.ioapic).eoi(v);
                for m in again {
                    self.deliver(m);
                }
            }
            Action::Ipi(lo, hi) => self.send_ipi(src, lo, hi),
        }
    }

    /// An MMIO read of the IOAPIC page; false if `pa` is not the IOAPIC's.
    pub(crate) fn ioapic_read(&self, pa: u64, buf: &mut [u8]) -> bool {
        if pa & !0xfff != IOAPIC_BASE {
            return false;
        }
        let off = pa & 0xfff;
        let v = lock(&self.ioapic).read(off & !0xf);
        read_bytes(v, (off & 0xf) as usize, buf);
        true
    }

    pub(crate) fn ioapic_write(&self, pa: u64, data: &[u8]) -> bool {
        if pa & !0xfff != IOAPIC_BASE {
            return false;
        }
        let off = pa & 0xfff;
        if off & 3 == 0 && data.len() >= 4 && off & 0xf == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            let msgs = lock(&self.ioapic).write(off, v);
            for m in msgs {
                self.deliver(m);
            }
        } else if off == 0 && !data.is_empty() {
            // A byte write of IOREGSEL.
            lock(&self.ioapic).write(0, u32::from(data[0]));
        }
        true
    }

    /// Does the platform own I/O port `port`?
    pub fn owns_port(port: u16) -> bool {
        Pic::owns(port) || Pit::owns(port)
    }

    /// An `IN` from one of the platform's ports (bytes beyond the device's
    /// ports read as all ones).
    pub(crate) fn port_read(&self, port: u16, size: usize) -> u64 {
        let now = Instant::now();
        let mut v = 0u64;
        for k in 0..size.min(8) {
            let p = port.wrapping_add(k as u16);
            let b = if Pic::owns(p) {
                let b = lock(&self.pic).read(p);
                self.update_pic_output();
                b
            } else if Pit::owns(p) {
                lock(&self.pit).read(p, now)
            } else {
                0xff
            };
            v |= u64::from(b) << (8 * k);
        }
        v
    }

    pub(crate) fn port_write(&self, port: u16, size: usize, v: u64) {
        let now = Instant::now();
        for k in 0..size.min(8) {
            let p = port.wrapping_add(k as u16);
            let b = (v >> (8 * k)) as u8;
            if Pic::owns(p) {
                lock(&self.pic).write(p, b);
                self.update_pic_output();
            } else if Pit::owns(p) {
                let mut pit = lock(&self.pit);
                pit.write(p, b, now);
                self.store_pit_next(&pit);
            }
        }
    }

    fn store_pit_next(&self, pit: &Pit) {
        let ns = pit.next_irq().map_or(u64::MAX, |t| {
            t.saturating_duration_since(self.epoch).as_nanos() as u64
        });
        self.pit_next_ns.store(ns, Ordering::Release);
    }

    /// Fire the PIT's IRQ 0 if it is due.
    pub(crate) fn poll_pit(&self, now: Instant) {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        if now_ns < self.pit_next_ns.load(Ordering::Acquire) {
            return;
        }
        let fired = {
            let mut pit = lock(&self.pit);
            let f = pit.poll(now);
            self.store_pit_next(&pit);
            f
        };
        if fired {
            self.pulse_gsi(0);
        }
    }

    /// The PICs, IOAPIC and PIT (the local APICs are saved with their vCPUs).
    pub fn save_state(&self) -> vireo_hypervisor::PlatformState {
        vireo_hypervisor::PlatformState {
            pic: lock(&self.pic).save(),
            ioapic: lock(&self.ioapic).save(),
            pit: lock(&self.pit).save(),
            clock_ns: None,
        }
    }

    pub fn restore_state(&self, s: &vireo_hypervisor::PlatformState) -> Result<(), String> {
        lock(&self.pic).restore(&s.pic);
        self.update_pic_output();
        lock(&self.ioapic).restore(&s.ioapic)?;
        let mut pit = lock(&self.pit);
        pit.restore(&s.pit, Instant::now());
        self.store_pit_next(&pit);
        Ok(())
    }

    /// When the PIT next interrupts.
    pub(crate) fn pit_next(&self) -> Option<Instant> {
        match self.pit_next_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.instant_at(ns)),
        }
    }
}

/// Copy the bytes of a 32-bit register read at byte `at` into `buf`
/// (bytes past the register read as zero).
pub(crate) fn read_bytes(v: u32, at: usize, buf: &mut [u8]) {
    let bytes = v.to_le_bytes();
    for (k, b) in buf.iter_mut().enumerate() {
        *b = bytes.get(at + k).copied().unwrap_or(0);
    }
}

/// What a vCPU holds of its platform.
#[derive(Clone)]
pub struct CpuLink {
    pub platform: Arc<Platform>,
    pub lapic: Arc<LocalApic>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programmed PICs, IOAPIC and PIT survive save + restore into a new
    /// platform, and behave the same afterwards.
    #[test]
    fn platform_state_roundtrips() {
        let p = Platform::new();
        // PIC pair: ICW1-4 (edge, cascade, vectors 0x20/0x28, 8086 mode), masks.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfa),
            (0xa1, 0xbf),
        ] {
            p.port_write(port, 1, v);
        }
        // PIT channel 0: mode 2, count 1193 (1 kHz).
        p.port_write(0x43, 1, 0x34);
        p.port_write(0x40, 1, 1193 & 0xff);
        p.port_write(0x40, 1, 1193 >> 8);
        // IOAPIC pin 4: vector 0x34, unmasked, destination 1.
        p.ioapic_write(IOAPIC_BASE, &0x18u32.to_le_bytes());
        p.ioapic_write(IOAPIC_BASE + 0x10, &0x34u32.to_le_bytes());
        p.ioapic_write(IOAPIC_BASE, &0x19u32.to_le_bytes());
        p.ioapic_write(IOAPIC_BASE + 0x10, &0x0100_0000u32.to_le_bytes());

        let saved = p.save_state();
        assert_eq!(saved.pic[0].irq_base, 0x20);
        assert_eq!(saved.pic[1].imr, 0xbf);
        assert_eq!(saved.pit.channels[0].count, 1193);
        assert_eq!(saved.pit.channels[0].mode, 2);
        assert_eq!(saved.ioapic.redirtbl[4], 0x0100_0000_0000_0034);

        let q = Platform::new();
        q.restore_state(&saved).unwrap();
        assert_eq!(q.save_state(), saved);
        // The restored PIT is periodic: its next interrupt is due.
        assert!(q.pit_next().is_some());
        // A bad IOAPIC size is refused.
        let mut bad = saved.clone();
        bad.ioapic.redirtbl.pop();
        assert!(Platform::new().restore_state(&bad).is_err());
    }

    /// Seeded random register traffic on every device, including
    /// unaligned and partial accesses, register pages of random bytes and
    /// every IPI kind: nothing may panic.
    #[test]
    fn random_register_traffic_never_panics() {
        let p = Platform::new();
        let l0 = p.add_lapic(0);
        let l1 = p.add_lapic(1);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ports = [
            0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61,
        ];
        for _ in 0..100_000 {
            let r = next();
            let v = next();
            let now = Instant::now();
            let lapic = if r & 1 == 0 { &l0 } else { &l1 };
            match (r >> 1) % 9 {
                0 => {
                    let a = lapic
                        .lock()
                        .write(((v >> 32) as usize) & 0xff0, v as u32, now);
                    p.lapic_action(lapic.id, a);
                }
                1 => {
                    let _ = lapic.lock().read(((v >> 32) as usize) & 0xff0, now);
                }
                2 => {
                    let mut page = [0u8; 1024];
                    for b in page.iter_mut() {
                        *b = next() as u8;
                    }
                    lapic.post(|l| l.load_page(&page, now));
                    let _ = lapic.lock().to_page(now);
                }
                3 => {
                    let len = 1 + (v as usize % 16);
                    let data = next().to_le_bytes().repeat(2);
                    p.ioapic_write(IOAPIC_BASE + ((v >> 8) & 0xfff), &data[..len]);
                    let mut buf = [0u8; 16];
                    p.ioapic_read(IOAPIC_BASE + ((v >> 24) & 0xfff), &mut buf[..len]);
                }
                4 => {
                    let port = ports[(v % ports.len() as u64) as usize];
                    p.port_write(port, [1, 2, 4][((v >> 8) % 3) as usize], next());
                }
                5 => {
                    let port = ports[(v % ports.len() as u64) as usize];
                    let _ = p.port_read(port, [1, 2, 4][((v >> 8) % 3) as usize]);
                }
                6 => p.pulse_gsi((v % 40) as u32),
                7 => {
                    p.poll_pit(now);
                    let mut l = lapic.lock();
                    l.poll_timer(now);
                    let _ = l.ack();
                }
                _ => {
                    if p.pic_output.load(Ordering::Acquire) {
                        let _ = p.ack_pic();
                    }
                    p.set_gsi_level((v % 30) as u32, v & 0x100 != 0);
                }
            }
        }
    }
}
