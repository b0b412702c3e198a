//! The virtio-pci transport and PCI configuration space at fuzz-chosen
//! offsets and sizes, the way a guest reaches them: configuration
//! mechanism #1 on ports 0xCF8-0xCFF (with the reset register at 0xCF9),
//! the MMIO window routed by the BARs the guest programs, and BAR 0 itself
//! (common config, ISR, device config, notify, MSI-X table and PBA). The
//! device behind the transport is a real one (rng, console or balloon),
//! whose worker runs inline when the input says so. And the restore of a
//! transport's saved state from fuzz-chosen JSON.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vireo_hypervisor::InterruptLine;
use vireo_vmcore::bus::BusDevice;
use vireo_vmcore::control::VmControl;
use vireo_vmcore::memory::GuestMemory;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{Enc, Input};
use crate::legacy::ResetControl;
use crate::pci::msix::MsiSender;
use crate::pci::{HostBridge, PciBus, PciConfigIo, PciDevice, PciMmioWindow};
use crate::virtio::pci::{TransportState, VirtioPciDevice, BAR_SIZE};
use crate::virtio::worker::inline_workers;
use crate::virtio::VirtioDevice;

/// The PCI MMIO window of the rig.
pub const WINDOW: (u64, u64) = (0xc000_0000, 0x10_0000);
const MAX_OPS: usize = 1024;

#[derive(Default)]
struct Msi(AtomicUsize);
impl MsiSender for Msi {
    fn send_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct Line(pub AtomicUsize);
impl InterruptLine for Line {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn eventfd(&self) -> std::io::Result<EventFd> {
        Err(std::io::Error::other("no eventfd behind this line"))
    }
}

fn memory() -> Option<GuestMemory> {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).ok()
}

fn device(kind: u8) -> Option<Box<dyn VirtioDevice>> {
    use crate::virtio::{balloon, console, rng};
    Some(match kind % 3 {
        0 => Box::new(rng::Rng::new(vireo_api::devices::rng::RngConfig::default())),
        1 => Box::new(
            console::Console::new(
                vireo_api::devices::console::ConsoleConfig::default(),
                Box::new(std::io::sink()),
            )
            .ok()?,
        ),
        _ => Box::new(
            balloon::Balloon::new(vireo_api::devices::balloon::BalloonConfig::default()).ok()?,
        ),
    })
}

fn transport(kind: u8, mem: GuestMemory, bar: u32) -> Option<VirtioPciDevice> {
    VirtioPciDevice::new(
        device(kind)?,
        mem,
        bar,
        Arc::new(Msi::default()),
        Some((Arc::new(Line::default()), 16)),
    )
    .ok()
}

/// An offset in BAR 0, mostly inside one of its regions.
fn bar_offset(input: &mut Input) -> u64 {
    let sel = input.u8();
    let raw = u64::from(input.u16());
    match sel % 8 {
        0 => raw % 0x40,                         // common configuration
        1 => 0x1000 + raw % 4,                   // ISR
        2 => 0x2000 + raw % 0x20,                // device configuration
        3 => 0x3000 + raw % 0x20,                // notify
        4 => 0x4000 + raw % 0x80,                // MSI-X table
        5 => 0x6000 + raw % 0x10,                // PBA
        6 => raw % BAR_SIZE,                     // anywhere in the BAR
        _ => u64::from(input.u32()) << 16 | raw, // anywhere at all
    }
}

fn size(input: &mut Input) -> usize {
    [1, 2, 4, 8, 3, 0][usize::from(input.u8() % 6)]
}

/// Ops, until the input ends: `kind` (u8) then its operands.
pub mod ops {
    pub const CF8_WRITE: u8 = 0;
    pub const CFC_READ: u8 = 1;
    pub const CFC_WRITE: u8 = 2;
    pub const BAR_READ: u8 = 3;
    pub const BAR_WRITE: u8 = 4;
    pub const WINDOW_READ: u8 = 5;
    pub const WINDOW_WRITE: u8 = 6;
    pub const CONFIG_READ: u8 = 7;
    pub const CONFIG_WRITE: u8 = 8;
    pub const RUN_DEVICE: u8 = 9;
    pub const RESET_REG: u8 = 10;
    pub const SAVE_RESTORE: u8 = 11;
    pub const COUNT: u8 = 12;
}

/// Guest accesses to a virtio-pci device on a PCI bus. Input: the device
/// kind (u8), then ops ([`ops`]). Returns the ops run.
pub fn pci_transport(data: &[u8]) -> usize {
    let mut input = Input(data);
    let kind = input.u8();
    let Some(mem) = memory() else { return 0 };
    let bus = Arc::new(Mutex::new(PciBus::new(WINDOW.0, WINDOW.1)));
    let Ok(bar) = bus
        .lock()
        .map_err(|_| ())
        .and_then(|mut b| b.allocate_bar(BAR_SIZE).map_err(|_| ()))
    else {
        return 0;
    };
    let Some(dev) = transport(kind, mem.clone(), bar) else {
        return 0;
    };
    let dev = Arc::new(Mutex::new(dev));
    {
        let Ok(mut b) = bus.lock() else { return 0 };
        if b.insert(0, Arc::new(Mutex::new(HostBridge::new())))
            .is_err()
            || b.insert(1, dev.clone()).is_err()
        {
            return 0;
        }
    }
    let control = Arc::new(VmControl::default());
    let reset = Arc::new(Mutex::new(ResetControl::new(control)));
    let mut cfg_io = PciConfigIo::new(bus.clone(), Some(reset));
    let mut window = PciMmioWindow::new(bus);
    // A panic is what the fuzzer looks for; a poisoned lock after one is
    // not interesting.
    fn lock(d: &Mutex<VirtioPciDevice>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
        d.lock().unwrap_or_else(|p| p.into_inner())
    }
    let mut n = 0;
    inline_workers(|| {
        while !input.is_empty() && n < MAX_OPS {
            n += 1;
            let mut buf = [0u8; 8];
            match input.u8() % ops::COUNT {
                ops::CF8_WRITE => {
                    // Mostly enabled, bus 0, slot 0 or 1, function 0.
                    let v = input.u32();
                    let v = if v & 1 == 0 {
                        0x8000_0000 | (v & 0x08fc)
                    } else {
                        v
                    };
                    cfg_io.write(0, &v.to_le_bytes());
                }
                ops::CFC_READ => {
                    let off = u64::from(input.u8() % 8);
                    let len = size(&mut input).min(8 - off as usize);
                    cfg_io.read(off, &mut buf[..len]);
                }
                ops::CFC_WRITE => {
                    let off = 4 + u64::from(input.u8() % 4);
                    let len = size(&mut input).min(8 - off as usize);
                    buf = input.bytes();
                    cfg_io.write(off, &buf[..len]);
                }
                ops::BAR_READ => {
                    let off = bar_offset(&mut input);
                    let len = size(&mut input);
                    lock(&dev).bar_read(usize::from(input.u8() % 8), off, &mut buf[..len]);
                }
                ops::BAR_WRITE => {
                    let off = bar_offset(&mut input);
                    let len = size(&mut input);
                    let which = usize::from(input.u8() % 8);
                    buf = input.bytes();
                    lock(&dev).bar_write(which, off, &buf[..len]);
                }
                ops::WINDOW_READ => {
                    let off = u64::from(bar) - WINDOW.0 + bar_offset(&mut input);
                    let len = size(&mut input);
                    window.read(off, &mut buf[..len]);
                }
                ops::WINDOW_WRITE => {
                    let off = u64::from(bar) - WINDOW.0 + bar_offset(&mut input);
                    let len = size(&mut input);
                    buf = input.bytes();
                    window.write(off, &buf[..len]);
                }
                ops::CONFIG_READ => {
                    let off = u64::from(input.u16() % 0x120);
                    let len = size(&mut input);
                    lock(&dev).config_read(off, &mut buf[..len]);
                }
                ops::CONFIG_WRITE => {
                    let off = u64::from(input.u16() % 0x120);
                    let len = size(&mut input);
                    buf = input.bytes();
                    lock(&dev).config_write(off, &buf[..len]);
                }
                ops::RUN_DEVICE => {
                    let mut d = lock(&dev);
                    d.pause();
                    d.resume();
                }
                ops::RESET_REG => {
                    let v = input.u8();
                    cfg_io.write(1, &[v]);
                    cfg_io.read(1, &mut buf[..1]);
                }
                _ => {
                    // A snapshot of the transport restores into a fresh one.
                    let mut d = lock(&dev);
                    d.pause();
                    let saved = d.save();
                    d.resume();
                    if let Ok(saved) = saved {
                        if let Some(mut fresh) = transport(kind, mem.clone(), bar) {
                            let _ = fresh.restore(saved);
                        }
                    }
                }
            }
        }
        // Dropping an active transport resets its device: inline too.
        drop(window);
        drop(cfg_io);
        drop(dev);
    });
    n
}

/// A transport's saved state decoded from the input (JSON, as snapshots
/// and migration streams carry it) and restored into a fresh transport of
/// the device kind the first byte picks, which then runs (inline) if the
/// state says the driver had it going.
pub fn device_state(data: &[u8]) -> bool {
    let Some((&kind, json)) = data.split_first() else {
        return false;
    };
    let Ok(state) = serde_json::from_slice::<TransportState>(json) else {
        return false;
    };
    let Some(mem) = memory() else { return false };
    inline_workers(|| {
        let Some(mut dev) = transport(kind, mem, WINDOW.0 as u32) else {
            return false;
        };
        let ok = dev.restore(state).is_ok();
        if ok {
            dev.pause();
            dev.resume();
        }
        ok
    })
}

/// The driver's usual setup of queues 0..`nq` through the common
/// configuration (virtio 1.2 §3.1.1), as [`pci_transport`] ops: for the
/// tests' valid inputs. Buffers on the queues are the input's business.
pub fn driver_setup_ops(e: &mut Enc, features_hi: u32, nq: u16) {
    let mut w = |off: u64, v: u64, len: u8| {
        let sz = match len {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        e.u8(ops::BAR_WRITE)
            .u8(0)
            .u16(off as u16)
            .u8(sz)
            .u8(0)
            .u64(v);
    };
    w(0x14, 1, 1); // ACKNOWLEDGE
    w(0x14, 3, 1); // DRIVER
    w(0x08, 1, 4); // driver_feature_select = 1
    w(0x0c, u64::from(features_hi), 4);
    w(0x14, 0xb, 1); // FEATURES_OK
    for q in 0..nq {
        let base = 0x1000 + u64::from(q) * 0x400;
        w(0x16, u64::from(q), 2); // queue_select
        w(0x18, 16, 2); // queue_size
        w(0x1a, 0, 2); // queue_msix_vector
        w(0x20, base, 8); // queue_desc
        w(0x28, base + 0x100, 8); // queue_driver (avail)
        w(0x30, base + 0x200, 8); // queue_device (used)
        w(0x1c, 1, 2); // queue_enable
    }
    w(0x14, 0xf, 1); // DRIVER_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{mutate, XorShift};

    /// The queues of rng, console, balloon (with free page reporting).
    const QUEUES: [u16; 3] = [1, 2, 4];

    fn valid_inputs() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for kind in 0..3u8 {
            let mut e = Enc::default();
            e.u8(kind);
            // Enable memory decoding and program BAR 0 through 0xCF8/0xCFC.
            e.u8(ops::CF8_WRITE).u32(0x8000_0804);
            e.u8(ops::CFC_WRITE).u8(0).u8(1).u64(0x0006);
            // MSI-X on, one vector programmed.
            e.u8(ops::BAR_WRITE)
                .u8(4)
                .u16(0)
                .u8(3)
                .u8(0)
                .u64(0xfee0_0000);
            e.u8(ops::BAR_WRITE).u8(4).u16(8).u8(2).u8(0).u64(0x41);
            driver_setup_ops(&mut e, 1, QUEUES[usize::from(kind)]);
            e.u8(ops::WINDOW_WRITE).u8(3).u16(0).u8(1).u64(0);
            e.u8(ops::RUN_DEVICE);
            e.u8(ops::BAR_READ).u8(1).u16(0).u8(0).u8(0);
            e.u8(ops::WINDOW_READ).u8(0).u16(0x14).u8(0);
            e.u8(ops::SAVE_RESTORE);
            e.u8(ops::RESET_REG).u8(0);
            e.u8(ops::CONFIG_READ).u16(0x40).u8(2);
            out.push(e.0);
        }
        out
    }

    #[test]
    fn pci_transport_survives_random_and_mutated_accesses() {
        let valid = valid_inputs();
        crate::fuzzing::save_seeds("pci_transport", &valid);
        for v in &valid {
            let nq = QUEUES[usize::from(v[0])] as usize;
            assert_eq!(pci_transport(v), 17 + 7 * nq);
        }
        let mut rng = XorShift(0x5eed_0101);
        for _ in 0..2000 {
            let len = (rng.next_u64() % 400) as usize;
            pci_transport(&rng.bytes(len));
        }
        for i in 0..2000 {
            pci_transport(&mutate(&mut rng, &valid[i % valid.len()]));
        }
    }

    /// A real saved state of a running transport, restored from its JSON,
    /// then mutated.
    #[test]
    fn device_state_survives_mutated_saved_states() {
        let mem = memory().unwrap();
        let mut valid = Vec::new();
        for kind in 0..3u8 {
            let dev = Arc::new(Mutex::new(
                transport(kind, mem.clone(), WINDOW.0 as u32).unwrap(),
            ));
            let mut e = Enc::default();
            driver_setup_ops(&mut e, 1, QUEUES[usize::from(kind)]);
            let mut input = Input(&e.0);
            inline_workers(|| {
                while !input.is_empty() {
                    input.u8();
                    let off = bar_offset(&mut input);
                    let len = size(&mut input);
                    input.u8();
                    let buf: [u8; 8] = input.bytes();
                    dev.lock().unwrap().bar_write(0, off, &buf[..len]);
                }
                dev.lock().unwrap().pause();
                let saved = dev.lock().unwrap().save().unwrap();
                assert!(saved.active);
                let mut v = vec![kind];
                v.extend_from_slice(&serde_json::to_vec(&saved).unwrap());
                valid.push(v);
                dev.lock().unwrap().resume();
            });
        }
        crate::fuzzing::save_seeds("virtio_device_state", &valid);
        for v in &valid {
            assert!(device_state(v), "a real saved state did not restore");
        }
        let mut rng = XorShift(0x5eed_0102);
        for i in 0..3000 {
            device_state(&mutate(&mut rng, &valid[i % valid.len()]));
        }
        for _ in 0..1000 {
            let len = (rng.next_u64() % 200) as usize;
            device_state(&rng.bytes(len));
        }
    }
}
