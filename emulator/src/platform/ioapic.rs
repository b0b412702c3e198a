//! I/O APIC at 0xFEC00000: 24 pins, the redirection table behind
//! IOREGSEL/IOWIN, edge and level triggering with remote IRR, and the EOI
//! broadcast from the local APICs.

/// Pins (GSIs 0-23).
pub const PINS: usize = 24;
/// IOAPIC version 0x20 has the direct EOI register at 0x40.
const VERSION: u32 = 0x20 | (((PINS as u32) - 1) << 16);

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Bits software may write (vector, mode, dest mode, polarity, trigger,
/// mask, destination).
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt message for the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    pub mode: u32,
    pub logical: bool,
    pub level: bool,
    pub dest: u8,
}

pub struct IoApic {
    id: u32,
    sel: u32,
    redir: [u64; PINS],
    /// Current line level of each pin (for level-triggered pins).
    line: [bool; PINS],
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    pub fn new() -> Self {
        IoApic {
            id: 0,
            sel: 0,
            redir: [MASKED; PINS],
            line: [false; PINS],
        }
    }

    pub fn save(&self) -> vireo_hypervisor::state::IoapicState {
        vireo_hypervisor::state::IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: self.sel,
            id: self.id,
            irr: self
                .line
                .iter()
                .enumerate()
                .fold(0, |acc, (i, &l)| acc | (u32::from(l) << i)),
            redirtbl: self.redir.to_vec(),
        }
    }

    pub fn restore(&mut self, s: &vireo_hypervisor::state::IoapicState) -> Result<(), String> {
        if s.redirtbl.len() != PINS {
            return Err(format!(
                "IOAPIC with {} pins saved, the emulator's has {PINS}",
                s.redirtbl.len()
            ));
        }
        self.id = s.id;
        self.sel = s.ioregsel;
        self.redir.copy_from_slice(&s.redirtbl);
        for (i, l) in self.line.iter_mut().enumerate() {
            *l = s.irr & (1 << i) != 0;
        }
        Ok(())
    }

    fn message(&self, pin: usize) -> Message {
        let e = self.redir[pin];
        Message {
            vector: e as u8,
            mode: ((e >> 8) & 7) as u32,
            logical: e & (1 << 11) != 0,
            level: e & LEVEL != 0,
            dest: (e >> 56) as u8,
        }
    }

    /// Deliver pin `pin` if it is unmasked and not waiting for an EOI.
    fn fire(&mut self, pin: usize) -> Option<Message> {
        let e = self.redir[pin];
        if e & MASKED != 0 {
            return None;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return None;
            }
            self.redir[pin] |= REMOTE_IRR;
        }
        Some(self.message(pin))
    }

    /// An edge on `pin` (the pulse of an `InterruptLine`): assert, deliver,
    /// deassert.
    pub fn pulse(&mut self, pin: u32) -> Option<Message> {
        let pin = pin as usize;
        if pin >= PINS {
            return None;
        }
        let m = self.fire(pin);
        self.line[pin] = false;
        m
    }

    /// Set the level of `pin`; a rising edge (or a held level on a
    /// level-triggered pin) delivers.
    pub fn set_level(&mut self, pin: u32, high: bool) -> Option<Message> {
        let pin = pin as usize;
        if pin >= PINS {
            return None;
        }
        let rising = high && !self.line[pin];
        self.line[pin] = high;
        if rising || (high && self.redir[pin] & LEVEL != 0) {
            self.fire(pin)
        } else {
            None
        }
    }

    /// A local APIC's EOI of a level-triggered `vector`: clear remote IRR;
    /// a line still high fires again.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e & REMOTE_IRR != 0 && e as u8 == vector {
                self.redir[pin] &= !REMOTE_IRR;
                if self.line[pin] {
                    out.extend(self.fire(pin));
                }
            }
        }
        out
    }

    /// MMIO read at `off` within the IOAPIC page (32-bit registers).
    pub fn read(&self, off: u64) -> u32 {
        match off {
            0x00 => self.sel,
            0x10 => match self.sel {
                0 => self.id << 24,
                1 => VERSION,
                2 => self.id << 24,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let e = self.redir[pin] & !DELIVERY_STATUS;
                    if r & 1 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0xffff_ffff,
            },
            _ => 0,
        }
    }

    /// MMIO write; may deliver a held level-triggered line when unmasked.
    pub fn write(&mut self, off: u64, v: u32) -> Vec<Message> {
        match off {
            0x00 => self.sel = v & 0xff,
            0x10 => match self.sel {
                0 => self.id = (v >> 24) & 0xf,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let old = self.redir[pin];
                    let new = if r & 1 == 0 {
                        (old & !0xffff_ffff) | u64::from(v)
                    } else {
                        (old & 0xffff_ffff) | (u64::from(v) << 32)
                    };
                    self.redir[pin] = (new & WRITABLE) | (old & REMOTE_IRR);
                    if self.redir[pin] & LEVEL == 0 {
                        self.redir[pin] &= !REMOTE_IRR;
                    }
                    if self.line[pin] && self.redir[pin] & (MASKED | LEVEL) == LEVEL {
                        return self.fire(pin).into_iter().collect();
                    }
                }
                _ => {}
            },
            0x40 => return self.eoi(v as u8),
            _ => {}
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_pin_waits_for_eoi() {
        let mut io = IoApic::new();
        io.write(0, 0x10 + 2 * 5);
        io.write(0x10, 0x8000 | 0x41); // level, vector 0x41, unmasked
        assert_eq!(io.set_level(5, true).map(|m| m.vector), Some(0x41));
        assert_eq!(io.set_level(5, true), None, "remote IRR blocks");
        let again = io.eoi(0x41);
        assert_eq!(again.len(), 1, "still high: fires again");
        io.set_level(5, false);
        assert!(io.eoi(0x41).is_empty());
        assert!(io.pulse(5).is_some());
    }
}
