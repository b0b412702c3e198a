//! The 8259A pair: master at ports 0x20/0x21, slave at 0xA0/0xA1 cascaded
//! on master IRQ 2, with ICW1-4, OCW1-3 (masks, specific/non-specific and
//! rotating EOI, read IRR/ISR, poll), auto-EOI, special mask and the ELCR
//! edge/level registers at 0x4D0/0x4D1. Modelled on QEMU's i8259.

#[derive(Default, Clone)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    last_irr: u8,
    priority_add: u8,
    irq_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    init4: bool,
    single: bool,
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Chip {
            elcr_mask,
            ..Chip::default()
        }
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << (irq & 7);
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    fn get_irq(&self, master: bool) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut mask = self.isr;
        if self.special_mask {
            mask &= !self.imr;
        }
        if self.special_fully_nested && master {
            mask &= !(1 << 2);
        }
        (p < self.priority(mask)).then_some((p + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    fn write(&mut self, addr: u16, v: u8) {
        if addr & 1 == 0 {
            if v & 0x10 != 0 {
                // ICW1
                let (elcr, elcr_mask) = (self.elcr, self.elcr_mask);
                let irr = self.irr & elcr;
                *self = Chip {
                    irr,
                    elcr,
                    elcr_mask,
                    init_state: 1,
                    init4: v & 1 != 0,
                    single: v & 2 != 0,
                    ..Chip::default()
                };
            } else if v & 0x08 != 0 {
                // OCW3
                if v & 0x04 != 0 {
                    self.poll = true;
                }
                if v & 0x02 != 0 {
                    self.read_isr = v & 1 != 0;
                }
                if v & 0x40 != 0 {
                    self.special_mask = v & 0x20 != 0;
                }
            } else {
                // OCW2
                let cmd = v >> 5;
                match cmd {
                    0 | 4 => self.rotate_on_auto_eoi = cmd == 4,
                    1 | 5 => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if cmd == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (v & 7)),
                    6 => self.priority_add = (v + 1) & 7,
                    7 => {
                        let irq = v & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {}
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = v,
                1 => {
                    self.irq_base = v & 0xf8;
                    self.init_state = match (self.single, self.init4) {
                        (true, true) => 3,
                        (true, false) => 0,
                        (false, _) => 2,
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 },
                _ => {
                    self.special_fully_nested = v & 0x10 != 0;
                    self.auto_eoi = v & 0x02 != 0;
                    self.init_state = 0;
                }
            }
        }
    }
}

/// Master and slave.
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        Pic {
            chips: [Chip::new(0xf8), Chip::new(0xde)],
        }
    }

    /// Both chips' state, master first.
    pub fn save(&self) -> [vireo_hypervisor::state::PicState; 2] {
        self.chips
            .clone()
            .map(|c| vireo_hypervisor::state::PicState {
                last_irr: c.last_irr,
                irr: c.irr,
                imr: c.imr,
                isr: c.isr,
                priority_add: c.priority_add,
                irq_base: c.irq_base,
                read_reg_select: c.read_isr.into(),
                poll: c.poll.into(),
                special_mask: c.special_mask.into(),
                init_state: c.init_state,
                auto_eoi: c.auto_eoi.into(),
                rotate_on_auto_eoi: c.rotate_on_auto_eoi.into(),
                special_fully_nested_mode: c.special_fully_nested.into(),
                init4: c.init4.into(),
                elcr: c.elcr,
                elcr_mask: c.elcr_mask,
                single: c.single.into(),
            })
    }

    pub fn restore(&mut self, saved: &[vireo_hypervisor::state::PicState; 2]) {
        for (c, s) in self.chips.iter_mut().zip(saved) {
            *c = Chip {
                irr: s.irr,
                isr: s.isr,
                imr: s.imr,
                last_irr: s.last_irr,
                priority_add: s.priority_add,
                irq_base: s.irq_base,
                read_isr: s.read_reg_select != 0,
                poll: s.poll != 0,
                special_mask: s.special_mask != 0,
                init_state: s.init_state,
                auto_eoi: s.auto_eoi != 0,
                rotate_on_auto_eoi: s.rotate_on_auto_eoi != 0,
                special_fully_nested: s.special_fully_nested_mode != 0,
                init4: s.init4 != 0,
                single: s.single != 0,
                elcr: s.elcr & s.elcr_mask,
                elcr_mask: s.elcr_mask,
            };
        }
        self.update();
    }

    /// Propagate the slave's output to master IRQ 2.
    fn update(&mut self) {
        let slave = self.chips[1].get_irq(false).is_some();
        self.chips[0].set_irq(2, slave);
    }

    /// Set the level of ISA IRQ `irq` (0-15).
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        if irq >= 16 {
            return;
        }
        self.chips[(irq >> 3) as usize].set_irq((irq & 7) as u8, level);
        self.update();
    }

    /// An edge on IRQ `irq`.
    pub fn pulse(&mut self, irq: u32) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// The master's INT output.
    pub fn output(&self) -> bool {
        self.chips[0].get_irq(true).is_some()
    }

    /// INTA cycle: the vector to deliver (spurious IRQ 7/15 if nothing).
    pub fn ack(&mut self) -> u8 {
        let [m, s] = &mut self.chips;
        let v = match m.get_irq(true) {
            Some(irq) => {
                m.intack(irq);
                if irq == 2 {
                    let irq2 = match s.get_irq(false) {
                        Some(i) => {
                            s.intack(i);
                            i
                        }
                        None => 7,
                    };
                    s.irq_base.wrapping_add(irq2)
                } else {
                    m.irq_base.wrapping_add(irq)
                }
            }
            None => m.irq_base.wrapping_add(7),
        };
        self.update();
        v
    }

    /// Is `port` one of the PIC's?
    pub fn owns(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
    }

    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            0x4d0 | 0x4d1 => self.chips[usize::from(port & 1)].elcr,
            _ => {
                let master = port < 0x80;
                let c = &mut self.chips[usize::from(!master)];
                let v = if c.poll {
                    c.poll = false;
                    match c.get_irq(master) {
                        Some(irq) => {
                            c.intack(irq);
                            irq | 0x80
                        }
                        None => 0,
                    }
                } else if port & 1 == 0 {
                    if c.read_isr {
                        c.isr
                    } else {
                        c.irr
                    }
                } else {
                    c.imr
                };
                self.update();
                v
            }
        }
    }

    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port & 1)];
                c.elcr = v & c.elcr_mask;
            }
            _ => self.chips[usize::from(port >= 0x80)].write(port, v),
        }
        self.update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pic) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            p.write(port, v);
        }
    }

    #[test]
    fn master_and_slave_vectors_and_eoi() {
        let mut p = Pic::new();
        init(&mut p);
        p.pulse(4);
        assert!(p.output());
        assert_eq!(p.ack(), 0x24);
        assert!(!p.output());
        p.pulse(5);
        assert!(!p.output(), "IRQ 4 in service blocks lower priority");
        p.write(0x20, 0x20); // EOI IRQ 4
        assert!(p.output());
        assert_eq!(p.ack(), 0x25);
        p.write(0x20, 0x20);
        p.pulse(12);
        assert_eq!(p.ack(), 0x2c);
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        assert!(!p.output());
        p.write(0x21, 0x01); // mask IRQ 0
        p.pulse(0);
        assert!(!p.output());
    }
}
