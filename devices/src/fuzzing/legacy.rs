//! The legacy PC devices on an I/O bus laid out as a vireo machine lays
//! them out (16550 UART at 0x3F8, i8042 at 0x60, CMOS RTC at 0x70, ACPI PM
//! registers at 0x600, PCI configuration ports with the reset register at
//! 0xCF8), driven by fuzz-chosen port I/O sequences, host-side events
//! (serial input, the power button) between them, and at the end each
//! device's snapshot restored into a fresh one: it must fit.

use std::sync::{Arc, Mutex};

use vireo_vmcore::bus::{Bus, SharedDevice};
use vireo_vmcore::layout::ports;
use vireo_vmcore::snapshot::device::DynSnapshottable;
use vireo_vmcore::VmControl;

use super::pci::Line;
use super::Input;
use crate::legacy::{acpi_pm, AcpiPm, Cmos, ResetControl, Serial, I8042};
use crate::pci::{HostBridge, PciBus, PciConfigIo};

const MAX_OPS: usize = 2048;

/// A port, mostly one of the devices'.
fn port(input: &mut Input) -> u16 {
    let sel = input.u8();
    let off = u16::from(input.u8());
    match sel % 7 {
        0 => ports::COM1 + off % 9,
        1 => ports::I8042 + off % 6,
        2 => ports::CMOS + off % 3,
        3 => ports::PM1A_EVT + off % (acpi_pm::LEN + 1),
        4 => ports::PCI_CONFIG + off % 9,
        5 => 0x64 + off % 2,
        _ => input.u16(),
    }
}

pub mod ops {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const SERIAL_INPUT: u8 = 2;
    pub const POWER_BUTTON: u8 = 3;
    pub const COUNT: u8 = 4;
}

fn size(input: &mut Input) -> usize {
    [1, 1, 2, 4, 3, 8][usize::from(input.u8() % 6)]
}

/// Port I/O sequences over the legacy devices. Input: ops ([`ops`]) until
/// it ends; READ: port, size; WRITE: port, size, 8 value bytes;
/// SERIAL_INPUT: a u8 count of bytes. Returns the accesses a device
/// claimed.
pub fn legacy_io(data: &[u8]) -> usize {
    let control = Arc::new(VmControl::default());
    let (serial, serial_in) =
        Serial::new(Arc::new(Line::default()), Box::new(std::io::sink())).into_shared();
    let i8042 = Arc::new(Mutex::new(I8042::new(
        control.clone(),
        Arc::new(Line::default()),
    )));
    let cmos = Arc::new(Mutex::new(Cmos::new(256 << 20, 0)));
    let pm = Arc::new(Mutex::new(AcpiPm::new(
        control.clone(),
        Some(Arc::new(Line::default())),
    )));
    let reset = Arc::new(Mutex::new(ResetControl::new(control.clone())));
    let pci = Arc::new(Mutex::new(PciBus::new(0xc000_0000, 0x1000_0000)));
    if let Ok(mut p) = pci.lock() {
        let _ = p.insert(0, Arc::new(Mutex::new(HostBridge::new())));
    }
    let cfg = Arc::new(Mutex::new(PciConfigIo::new(pci, Some(reset))));

    let mut bus = Bus::new();
    let devices: [(u16, u16, SharedDevice); 5] = [
        (ports::COM1, 8, serial.clone()),
        (ports::I8042, 5, i8042.clone()),
        (ports::CMOS, 2, cmos.clone()),
        (ports::PM1A_EVT, acpi_pm::LEN, pm.clone()),
        (ports::PCI_CONFIG, ports::PCI_CONFIG_LEN, cfg),
    ];
    for (base, len, dev) in devices {
        if bus.insert(u64::from(base), u64::from(len), dev).is_err() {
            return 0;
        }
    }

    let mut input = Input(data);
    let mut claimed = 0;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % ops::COUNT {
            ops::READ => {
                let p = port(&mut input);
                let mut buf = [0u8; 8];
                let n = size(&mut input);
                claimed += usize::from(bus.read(u64::from(p), &mut buf[..n]));
            }
            ops::WRITE => {
                let p = port(&mut input);
                let n = size(&mut input);
                let buf: [u8; 8] = input.bytes();
                claimed += usize::from(bus.write(u64::from(p), &buf[..n]));
            }
            ops::SERIAL_INPUT => {
                let n = usize::from(input.u8());
                let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
                serial_in.enqueue(&bytes);
            }
            _ => pm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button(),
        }
    }

    // What a device saves, a fresh device of its kind restores.
    fn round_trip(name: &str, from: &Mutex<dyn DynSnapshottable>, to: &mut dyn DynSnapshottable) {
        let saved = from.lock().unwrap_or_else(|p| p.into_inner()).save_dyn();
        let saved = match saved {
            Ok(s) => s,
            Err(e) => panic!("{name}: save failed: {e}"),
        };
        if let Err(e) = to.restore_dyn(saved) {
            panic!("{name}: its own saved state does not restore: {e}");
        }
    }
    let control2 = Arc::new(VmControl::default());
    round_trip(
        "serial",
        &*serial,
        &mut Serial::new(Arc::new(Line::default()), Box::new(std::io::sink())),
    );
    round_trip(
        "i8042",
        &*i8042,
        &mut I8042::new(control2.clone(), Arc::new(Line::default())),
    );
    round_trip("cmos", &*cmos, &mut Cmos::new(256 << 20, 0));
    round_trip("acpi_pm", &*pm, &mut AcpiPm::new(control2, None));
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{mutate, Enc, XorShift};

    /// What a guest does at boot: probe the UART (scratch, LCR/DLAB, IER,
    /// output), the keyboard controller (self test, command byte, pulse
    /// reset), the RTC (every register, BCD/binary, NMI bit), the ACPI PM
    /// block (enable, status, timer, S5), PCI config probing.
    fn valid_inputs() -> Vec<Vec<u8>> {
        let mut e = Enc::default();
        let w = |e: &mut Enc, sel: u8, off: u8, v: u64, sz: u8| {
            e.u8(ops::WRITE).u8(sel).u8(off).u8(sz).u64(v);
        };
        let r = |e: &mut Enc, sel: u8, off: u8, sz: u8| {
            e.u8(ops::READ).u8(sel).u8(off).u8(sz);
        };
        w(&mut e, 0, 7, 0x5a, 0);
        r(&mut e, 0, 7, 0);
        w(&mut e, 0, 3, 0x80, 0);
        w(&mut e, 0, 0, 1, 0);
        w(&mut e, 0, 3, 3, 0);
        w(&mut e, 0, 1, 0xf, 0);
        w(&mut e, 0, 0, u64::from(b'x'), 0);
        e.u8(ops::SERIAL_INPUT).u8(20);
        r(&mut e, 0, 2, 0);
        r(&mut e, 0, 0, 0);
        r(&mut e, 0, 5, 0);
        w(&mut e, 5, 0, 0xaa, 0);
        r(&mut e, 1, 0, 0);
        w(&mut e, 5, 0, 0x60, 0);
        w(&mut e, 1, 0, 0x47, 0);
        w(&mut e, 5, 0, 0x20, 0);
        r(&mut e, 1, 0, 0);
        w(&mut e, 1, 0, 0xf4, 0);
        for reg in [
            0u64, 2, 4, 6, 7, 8, 9, 0x0a, 0x0b, 0x0c, 0x0d, 0x32, 0x8f, 0x34, 0x35,
        ] {
            w(&mut e, 2, 0, reg, 0);
            r(&mut e, 2, 1, 0);
        }
        w(&mut e, 2, 0, 0x0b, 0);
        w(&mut e, 2, 1, 0x06, 0);
        w(&mut e, 3, 2, 0x0100, 2);
        e.u8(ops::POWER_BUTTON);
        r(&mut e, 3, 0, 2);
        w(&mut e, 3, 0, 0x0100, 2);
        r(&mut e, 3, 8, 3);
        w(&mut e, 4, 0, 0x8000_0000, 3);
        r(&mut e, 4, 4, 3);
        w(&mut e, 3, 4, 0x3c00, 2);
        vec![e.0]
    }

    #[test]
    fn legacy_io_survives_random_and_mutated_port_io() {
        let valid = valid_inputs();
        crate::fuzzing::save_seeds("legacy_io", &valid);
        assert!(legacy_io(&valid[0]) > 40);
        let mut rng = XorShift(0x5eed_0201);
        for _ in 0..3000 {
            let len = (rng.next_u64() % 600) as usize;
            legacy_io(&rng.bytes(len));
        }
        for _ in 0..3000 {
            legacy_io(&mutate(&mut rng, &valid[0]));
        }
    }
}
