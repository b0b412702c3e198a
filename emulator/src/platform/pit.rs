//! The 8254 PIT at ports 0x40-0x43 (1.193182 MHz, host time), with the
//! channel 2 gate and output on port 0x61 as PC speaker logic exposes them.
//! Channel 0 raises IRQ 0 in modes 0 (one-shot), 2 and 3 (periodic).
//! Counting follows QEMU's i8254: counts are derived from the time since
//! the count was loaded.

use std::time::{Duration, Instant};

pub const FREQ_HZ: u64 = 1_193_182;
/// Shortest period channel 0 interrupts at (guards against count 1).
const MIN_IRQ_PERIOD: Duration = Duration::from_micros(50);

const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

#[derive(Clone)]
struct Channel {
    count: u32,
    load: Instant,
    latched_count: u16,
    count_latched: u8,
    status_latched: bool,
    status: u8,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    rw_mode: u8,
    mode: u8,
    bcd: bool,
    gate: bool,
    /// Channel 0: when the next IRQ 0 is due.
    next_irq: Option<Instant>,
}

impl Channel {
    fn new(now: Instant, gate: bool) -> Self {
        Channel {
            count: 0x10000,
            load: now,
            latched_count: 0,
            count_latched: 0,
            status_latched: false,
            status: 0,
            read_state: RW_WORD0,
            write_state: RW_WORD0,
            write_latch: 0,
            rw_mode: RW_WORD0,
            mode: 0,
            bcd: false,
            gate,
            next_irq: None,
        }
    }

    fn ticks(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.load).as_nanos();
        (ns * u128::from(FREQ_HZ) / 1_000_000_000) as u64
    }

    fn period(&self) -> Duration {
        Duration::from_nanos(u64::from(self.count) * 1_000_000_000 / FREQ_HZ).max(MIN_IRQ_PERIOD)
    }

    fn get_count(&self, now: Instant) -> u16 {
        let d = self.ticks(now);
        let c = u64::from(self.count);
        (match self.mode {
            0 | 1 | 4 | 5 => c.wrapping_sub(d) & 0xffff,
            3 => c - ((2 * d) % c),
            _ => c - (d % c),
        }) as u16
    }

    fn out(&self, now: Instant) -> bool {
        let d = self.ticks(now);
        let c = u64::from(self.count);
        match self.mode {
            0 => d >= c,
            1 => d < c,
            2 => d % c != c - 1,
            3 => d % c < c.div_ceil(2),
            _ => d == c,
        }
    }

    fn load_count(&mut self, v: u32, now: Instant, irq: bool) {
        self.count = if v == 0 { 0x10000 } else { v };
        self.load = now;
        self.next_irq = if irq && matches!(self.mode, 0 | 2 | 3) {
            Some(now + self.period())
        } else {
            None
        };
    }

    fn latch(&mut self, now: Instant) {
        if self.count_latched == 0 {
            self.latched_count = self.get_count(now);
            self.count_latched = self.rw_mode;
        }
    }

    fn read(&mut self, now: Instant) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.count_latched != 0 {
            let c = self.latched_count;
            return match self.count_latched {
                RW_LSB => {
                    self.count_latched = 0;
                    c as u8
                }
                RW_MSB => {
                    self.count_latched = 0;
                    (c >> 8) as u8
                }
                _ => {
                    self.count_latched = RW_MSB;
                    c as u8
                }
            };
        }
        let c = self.get_count(now);
        match self.read_state {
            RW_LSB => c as u8,
            RW_MSB => (c >> 8) as u8,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                c as u8
            }
            _ => {
                self.read_state = RW_WORD0;
                (c >> 8) as u8
            }
        }
    }

    fn write(&mut self, v: u8, now: Instant, irq: bool) {
        match self.write_state {
            RW_LSB => self.load_count(u32::from(v), now, irq),
            RW_MSB => self.load_count(u32::from(v) << 8, now, irq),
            RW_WORD0 => {
                self.write_latch = v;
                self.write_state = RW_WORD1;
            }
            _ => {
                self.load_count(u32::from(self.write_latch) | (u32::from(v) << 8), now, irq);
                self.write_state = RW_WORD0;
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now: Instant) {
        if gate && !self.gate && matches!(self.mode, 1 | 2 | 3 | 5) {
            self.load = now;
        }
        self.gate = gate;
    }
}

pub struct Pit {
    ch: [Channel; 3],
    speaker_data: bool,
    epoch: Instant,
}

impl Pit {
    pub fn new(now: Instant) -> Self {
        Pit {
            ch: [
                Channel::new(now, true),
                Channel::new(now, true),
                Channel::new(now, false),
            ],
            speaker_data: false,
            epoch: now,
        }
    }

    /// The channels' state; the time a count was loaded is not kept (a
    /// restored counter starts from its count again, as on KVM).
    pub fn save(&self) -> vireo_hypervisor::state::PitState {
        vireo_hypervisor::state::PitState {
            channels: self
                .ch
                .clone()
                .map(|c| vireo_hypervisor::state::PitChannelState {
                    count: c.count,
                    latched_count: c.latched_count,
                    count_latched: c.count_latched,
                    status_latched: c.status_latched.into(),
                    status: c.status,
                    read_state: c.read_state,
                    write_state: c.write_state,
                    write_latch: c.write_latch,
                    rw_mode: c.rw_mode,
                    mode: c.mode,
                    bcd: c.bcd.into(),
                    gate: c.gate.into(),
                }),
            // KVM_PIT_FLAGS_SPEAKER_DATA_ON
            flags: if self.speaker_data { 2 } else { 0 },
        }
    }

    /// Load saved channels; channel 0 in a periodic mode (2, 3) interrupts
    /// again one period from `now`.
    pub fn restore(&mut self, s: &vireo_hypervisor::state::PitState, now: Instant) {
        for (i, (c, saved)) in self.ch.iter_mut().zip(&s.channels).enumerate() {
            c.count = saved.count.clamp(1, 0x10000);
            c.load = now;
            c.latched_count = saved.latched_count;
            c.count_latched = saved.count_latched;
            c.status_latched = saved.status_latched != 0;
            c.status = saved.status;
            c.read_state = saved.read_state;
            c.write_state = saved.write_state;
            c.write_latch = saved.write_latch;
            c.rw_mode = saved.rw_mode;
            c.mode = saved.mode & 7;
            c.bcd = saved.bcd != 0;
            c.gate = saved.gate != 0;
            c.next_irq = (i == 0 && matches!(c.mode, 2 | 3)).then(|| now + c.period());
        }
        self.speaker_data = s.flags & 2 != 0;
    }

    pub fn owns(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    pub fn read(&mut self, port: u16, now: Instant) -> u8 {
        match port {
            0x40..=0x42 => self.ch[usize::from(port - 0x40)].read(now),
            0x61 => {
                // Bit 4 toggles every 15 µs (DRAM refresh), bit 5 is OUT2.
                let refresh = (now.saturating_duration_since(self.epoch).as_nanos() / 15_085) & 1;
                let c2 = &self.ch[2];
                (u8::from(c2.out(now)) << 5)
                    | ((refresh as u8) << 4)
                    | (u8::from(self.speaker_data) << 1)
                    | u8::from(c2.gate)
            }
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port: u16, v: u8, now: Instant) {
        match port {
            0x40..=0x42 => {
                let n = usize::from(port - 0x40);
                self.ch[n].write(v, now, n == 0);
            }
            0x43 => {
                let sel = v >> 6;
                if sel == 3 {
                    // Read-back.
                    for n in 0..3 {
                        if v & (2 << n) == 0 {
                            continue;
                        }
                        let c = &mut self.ch[n];
                        if v & 0x20 == 0 {
                            c.latch(now);
                        }
                        if v & 0x10 == 0 && !c.status_latched {
                            c.status = (u8::from(c.out(now)) << 7)
                                | (c.rw_mode << 4)
                                | (c.mode << 1)
                                | u8::from(c.bcd);
                            c.status_latched = true;
                        }
                    }
                    return;
                }
                let c = &mut self.ch[usize::from(sel)];
                let access = (v >> 4) & 3;
                if access == 0 {
                    c.latch(now);
                } else {
                    c.rw_mode = access;
                    c.read_state = access;
                    c.write_state = access;
                    let mode = (v >> 1) & 7;
                    c.mode = if mode >= 6 { mode & 3 } else { mode };
                    c.bcd = v & 1 != 0;
                    c.next_irq = None;
                }
            }
            0x61 => {
                self.ch[2].set_gate(v & 1 != 0, now);
                self.speaker_data = v & 2 != 0;
            }
            _ => {}
        }
    }

    /// When channel 0 next raises IRQ 0.
    pub fn next_irq(&self) -> Option<Instant> {
        self.ch[0].next_irq
    }

    /// True if channel 0 raised IRQ 0 by `now` (missed periods collapse
    /// into one).
    pub fn poll(&mut self, now: Instant) -> bool {
        let c = &mut self.ch[0];
        let Some(at) = c.next_irq else {
            return false;
        };
        if at > now {
            return false;
        }
        c.next_irq = if c.mode == 0 {
            None
        } else {
            let p = c.period();
            let next = at + p;
            Some(if next <= now { now + p } else { next })
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel2_mode0_output_goes_high_after_count() {
        let t0 = Instant::now();
        let mut p = Pit::new(t0);
        p.write(0x61, 1, t0);
        p.write(0x43, 0xb0, t0);
        p.write(0x42, 0x9c, t0); // 11932 ticks = 10 ms
        p.write(0x42, 0x2e, t0);
        assert_eq!(p.read(0x61, t0) & 0x20, 0);
        let later = t0 + Duration::from_millis(5);
        p.write(0x43, 0x80, later); // latch channel 2
        let lo = p.read(0x42, later);
        let hi = p.read(0x42, later);
        let c = u16::from(lo) | (u16::from(hi) << 8);
        assert!((5900..6100).contains(&c), "count {c}");
        assert_ne!(p.read(0x61, t0 + Duration::from_millis(11)) & 0x20, 0);
    }

    #[test]
    fn channel0_periodic_irq() {
        let t0 = Instant::now();
        let mut p = Pit::new(t0);
        p.write(0x43, 0x34, t0);
        p.write(0x40, 0xa9, t0); // 1193 ticks = 1 ms
        p.write(0x40, 0x04, t0);
        assert!(!p.poll(t0));
        assert!(p.poll(t0 + Duration::from_micros(1100)));
        assert!(!p.poll(t0 + Duration::from_micros(1500)));
        assert!(p.poll(t0 + Duration::from_micros(2100)));
    }
}
