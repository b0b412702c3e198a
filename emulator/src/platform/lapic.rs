//! Local APIC in xAPIC mode: the register page KVM's in-kernel LAPIC
//! presents at `APIC_BASE` (0xFEE00000), with TPR/PPR priority, EOI, the
//! ISR/IRR/TMR bitmaps, ICR (the IPIs themselves are sent by
//! [`super::Platform`]), LVTs and the timer (one-shot, periodic and
//! TSC-deadline) running on host time.
//!
//! Registers are kept in a 1 KiB page laid out as `LapicState` so that
//! `get/set_lapic` round-trip. Every guest write is masked to the bits the
//! register has; nothing a guest writes can panic the host.

use std::time::{Duration, Instant};

pub const ID: usize = 0x20;
pub const VERSION: usize = 0x30;
pub const TPR: usize = 0x80;
pub const APR: usize = 0x90;
pub const PPR: usize = 0xa0;
pub const EOI: usize = 0xb0;
pub const LDR: usize = 0xd0;
pub const DFR: usize = 0xe0;
pub const SVR: usize = 0xf0;
pub const ISR: usize = 0x100;
pub const TMR: usize = 0x180;
pub const IRR: usize = 0x200;
pub const ESR: usize = 0x280;
pub const LVT_CMCI: usize = 0x2f0;
pub const ICR_LO: usize = 0x300;
pub const ICR_HI: usize = 0x310;
pub const LVT_TIMER: usize = 0x320;
pub const LVT_THERMAL: usize = 0x330;
pub const LVT_PERF: usize = 0x340;
pub const LVT_LINT0: usize = 0x350;
pub const LVT_LINT1: usize = 0x360;
pub const LVT_ERROR: usize = 0x370;
pub const TIMER_INIT: usize = 0x380;
pub const TIMER_CUR: usize = 0x390;
pub const TIMER_DIV: usize = 0x3e0;

/// LVT mask bit.
pub const MASKED: u32 = 1 << 16;
/// Version 0x14 (integrated APIC), 7 LVT entries (max LVT index 6).
const VERSION_VALUE: u32 = 0x14 | (6 << 16);
const SVR_ENABLE: u32 = 1 << 8;
/// ESR "received illegal vector".
const ESR_RECV_ILLEGAL: u32 = 1 << 6;
/// ESR "send illegal vector".
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
/// Shortest periodic timer period (as KVM's `min_timer_period_us`).
const MIN_PERIOD: Duration = Duration::from_micros(100);

/// Timer modes in LVT timer bits 17-18.
const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

/// Delivery modes (ICR, LVT, IOAPIC redirection entries).
pub mod mode {
    pub const FIXED: u32 = 0;
    pub const LOWEST: u32 = 1;
    pub const SMI: u32 = 2;
    pub const NMI: u32 = 4;
    pub const INIT: u32 = 5;
    pub const STARTUP: u32 = 6;
    pub const EXTINT: u32 = 7;
}

/// Something a register write asks the platform to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// EOI of a level-triggered vector: broadcast to the IOAPIC.
    LevelEoi(u8),
    /// Send the IPI in ICR (low, high).
    Ipi(u32, u32),
}

/// The state of one local APIC.
pub struct Lapic {
    regs: [u32; 64],
    /// Host time when the one-shot/periodic timer next fires.
    deadline: Option<Instant>,
    /// Start of the current count, for the current-count register.
    period: Duration,
    /// TSC-deadline MSR value (0 = disarmed) and its host-time deadline.
    tsc_deadline: u64,
    tsc_deadline_at: Option<Instant>,
    /// APIC_BASE bit 11: the APIC is globally enabled.
    pub hw_enabled: bool,
    pub nmi_pending: bool,
    pub init_pending: bool,
    pub sipi_pending: Option<u8>,
    esr_pending: u32,
}

fn idx(off: usize) -> usize {
    (off >> 4) & 63
}

impl Lapic {
    /// The state after reset for APIC id `id`.
    pub fn new(id: u32) -> Self {
        let mut l = Lapic {
            regs: [0; 64],
            deadline: None,
            period: Duration::ZERO,
            tsc_deadline: 0,
            tsc_deadline_at: None,
            hw_enabled: true,
            nmi_pending: false,
            init_pending: false,
            sipi_pending: None,
            esr_pending: 0,
        };
        l.reset(id);
        l
    }

    /// INIT/reset: everything but the ID back to its power-on value.
    pub fn reset(&mut self, id: u32) {
        self.regs = [0; 64];
        self.regs[idx(ID)] = id << 24;
        self.regs[idx(VERSION)] = VERSION_VALUE;
        self.regs[idx(DFR)] = 0xffff_ffff;
        self.regs[idx(SVR)] = 0xff;
        for r in [
            LVT_TIMER,
            LVT_THERMAL,
            LVT_PERF,
            LVT_LINT0,
            LVT_LINT1,
            LVT_ERROR,
            LVT_CMCI,
        ] {
            self.regs[idx(r)] = MASKED;
        }
        if id == 0 {
            // As KVM: the BSP's LINT0 starts as unmasked ExtINT (virtual
            // wire), so the 8259 reaches it before the guest sets up the
            // APIC.
            self.regs[idx(LVT_LINT0)] = mode::EXTINT << 8;
        }
        self.deadline = None;
        self.tsc_deadline = 0;
        self.tsc_deadline_at = None;
        self.esr_pending = 0;
        self.nmi_pending = false;
        self.sipi_pending = None;
    }

    pub fn reg(&self, off: usize) -> u32 {
        self.regs[idx(off)]
    }

    pub fn id(&self) -> u32 {
        self.regs[idx(ID)] >> 24
    }

    pub fn sw_enabled(&self) -> bool {
        self.regs[idx(SVR)] & SVR_ENABLE != 0
    }

    fn bit(&self, base: usize, v: u8) -> bool {
        self.regs[idx(base) + usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    fn set_bit(&mut self, base: usize, v: u8, on: bool) {
        let r = &mut self.regs[idx(base) + usize::from(v >> 5)];
        if on {
            *r |= 1 << (v & 31);
        } else {
            *r &= !(1 << (v & 31));
        }
    }

    fn highest(&self, base: usize) -> Option<u8> {
        (0..8).rev().find_map(|k| {
            let r = self.regs[idx(base) + k];
            (r != 0).then(|| (k as u32 * 32 + 31 - r.leading_zeros()) as u8)
        })
    }

    fn update_ppr(&mut self) {
        let tpr = self.regs[idx(TPR)] & 0xff;
        let isrv = u32::from(self.highest(ISR).unwrap_or(0));
        self.regs[idx(PPR)] = if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xf0
        };
    }

    /// Accept a fixed interrupt into the IRR (`level`: set its TMR bit).
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.error(ESR_RECV_ILLEGAL);
            return;
        }
        self.set_bit(IRR, vector, true);
        self.set_bit(TMR, vector, level);
    }

    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.regs[idx(LVT_ERROR)];
        if lvt & MASKED == 0 && (lvt & 0xff) >= 16 {
            self.set_bit(IRR, (lvt & 0xff) as u8, true);
        }
    }

    /// A fixed interrupt is in the IRR above the processor priority.
    pub fn has_deliverable(&self) -> bool {
        self.highest(IRR)
            .is_some_and(|v| u32::from(v) >> 4 > self.regs[idx(PPR)] >> 4)
    }

    /// INTA: move the highest deliverable IRR vector to the ISR.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.highest(IRR)?;
        if u32::from(v) >> 4 <= self.regs[idx(PPR)] >> 4 {
            return None;
        }
        self.set_bit(IRR, v, false);
        self.set_bit(ISR, v, true);
        self.update_ppr();
        Some(v)
    }

    /// LINT0 accepts the 8259's ExtINT (or the APIC is globally disabled,
    /// when the PIC output goes straight to the CPU).
    pub fn accepts_pic(&self) -> bool {
        let lint0 = self.regs[idx(LVT_LINT0)];
        !self.hw_enabled || (lint0 & MASKED == 0 && (lint0 >> 8) & 7 == mode::EXTINT)
    }

    /// TPR as CR8 sees it.
    pub fn set_tpr(&mut self, tpr: u32) {
        self.regs[idx(TPR)] = tpr & 0xff;
        self.update_ppr();
    }

    fn divisor(&self) -> u32 {
        let v = self.regs[idx(TIMER_DIV)];
        let v = (v & 3) | ((v & 8) >> 1);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.regs[idx(LVT_TIMER)] >> 17) & 3
    }

    /// (Re)start the count-down timer from the initial count (1 GHz bus).
    fn start_timer(&mut self, now: Instant) {
        let count = u64::from(self.regs[idx(TIMER_INIT)]);
        if count == 0 || self.timer_mode() == TIMER_TSC_DEADLINE {
            self.deadline = None;
            return;
        }
        let mut period = Duration::from_nanos(count * u64::from(self.divisor()));
        if self.timer_mode() == TIMER_PERIODIC {
            period = period.max(MIN_PERIOD);
        }
        self.period = period;
        self.deadline = Some(now + period);
    }

    /// Read the register at `off` (16-byte aligned).
    pub fn read(&self, off: usize, now: Instant) -> u32 {
        match off {
            EOI => 0,
            TIMER_CUR => match self.deadline {
                Some(d) if self.timer_mode() != TIMER_TSC_DEADLINE => {
                    let left = d.saturating_duration_since(now).as_nanos() as u64;
                    let count = left / u64::from(self.divisor());
                    count.min(u64::from(u32::MAX)) as u32
                }
                _ => 0,
            },
            _ if off < 0x400 => self.regs[idx(off)],
            _ => 0,
        }
    }

    /// Write the register at `off` (16-byte aligned).
    pub fn write(&mut self, off: usize, v: u32, now: Instant) -> Action {
        let sw_off = !self.sw_enabled();
        let lvt = |v: u32, mask: u32| {
            if sw_off {
                (v & mask) | MASKED
            } else {
                v & mask
            }
        };
        match off {
            ID => self.regs[idx(ID)] = v & 0xff00_0000,
            TPR => self.set_tpr(v),
            EOI => {
                if let Some(vec) = self.highest(ISR) {
                    self.set_bit(ISR, vec, false);
                    self.update_ppr();
                    if self.bit(TMR, vec) {
                        return Action::LevelEoi(vec);
                    }
                }
            }
            LDR => self.regs[idx(LDR)] = v & 0xff00_0000,
            DFR => self.regs[idx(DFR)] = (v & 0xf000_0000) | 0x0fff_ffff,
            SVR => {
                self.regs[idx(SVR)] = v & 0x13ff;
                if v & SVR_ENABLE == 0 {
                    for r in [
                        LVT_TIMER,
                        LVT_THERMAL,
                        LVT_PERF,
                        LVT_LINT0,
                        LVT_LINT1,
                        LVT_ERROR,
                        LVT_CMCI,
                    ] {
                        self.regs[idx(r)] |= MASKED;
                    }
                }
            }
            ESR => {
                self.regs[idx(ESR)] = self.esr_pending;
                self.esr_pending = 0;
            }
            ICR_LO => {
                let v = v & 0x000c_cfff;
                self.regs[idx(ICR_LO)] = v;
                let mode = (v >> 8) & 7;
                if matches!(mode, mode::FIXED | mode::LOWEST) && v & 0xff < 16 {
                    self.error(ESR_SEND_ILLEGAL);
                    return Action::None;
                }
                return Action::Ipi(v, self.regs[idx(ICR_HI)]);
            }
            ICR_HI => self.regs[idx(ICR_HI)] = v & 0xff00_0000,
            LVT_TIMER => {
                let old_mode = self.timer_mode();
                self.regs[idx(LVT_TIMER)] = lvt(v, 0x0007_00ff);
                if self.timer_mode() != old_mode {
                    self.deadline = None;
                    self.tsc_deadline = 0;
                    self.tsc_deadline_at = None;
                }
            }
            LVT_THERMAL | LVT_PERF | LVT_CMCI => self.regs[idx(off)] = lvt(v, 0x0001_07ff),
            LVT_LINT0 | LVT_LINT1 => self.regs[idx(off)] = lvt(v, 0x0001_a7ff),
            LVT_ERROR => self.regs[idx(off)] = lvt(v, 0x0001_00ff),
            TIMER_INIT => {
                self.regs[idx(TIMER_INIT)] = v;
                self.start_timer(now);
            }
            TIMER_DIV => self.regs[idx(TIMER_DIV)] = v & 0xb,
            _ => {} // read-only or reserved
        }
        Action::None
    }

    /// IA32_TSC_DEADLINE: `at` is the host time the TSC reaches `value`.
    pub fn set_tsc_deadline(&mut self, value: u64, at: Option<Instant>) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.tsc_deadline = value;
        self.tsc_deadline_at = if value == 0 { None } else { at };
    }

    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// When the timer next fires.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.tsc_deadline_at
        } else {
            self.deadline
        }
    }

    /// Fire the timer if its time has come; true if the IRR changed.
    pub fn poll_timer(&mut self, now: Instant) -> bool {
        let Some(at) = self.next_deadline() else {
            return false;
        };
        if at > now {
            return false;
        }
        match self.timer_mode() {
            TIMER_PERIODIC => {
                let mut next = at + self.period;
                if next <= now {
                    // Missed periods are dropped, not replayed.
                    next = now + self.period;
                }
                self.deadline = Some(next);
            }
            TIMER_TSC_DEADLINE => {
                self.tsc_deadline = 0;
                self.tsc_deadline_at = None;
            }
            _ => self.deadline = None,
        }
        let lvt = self.regs[idx(LVT_TIMER)];
        if lvt & MASKED == 0 {
            self.accept((lvt & 0xff) as u8, false);
            return true;
        }
        false
    }

    /// LINT1 (or LINT0) configured for NMI delivery.
    pub fn lint_is_nmi(&self, lint: usize) -> bool {
        let v = self.regs[idx(lint)];
        v & MASKED == 0 && (v >> 8) & 7 == mode::NMI
    }

    /// The 1 KiB register page (`LapicState`), with the current count.
    pub fn to_page(&self, now: Instant) -> [u8; 1024] {
        let mut page = [0u8; 1024];
        for (k, r) in self.regs.iter().enumerate() {
            let v = if k == idx(TIMER_CUR) {
                self.read(TIMER_CUR, now)
            } else {
                *r
            };
            page[k * 16..k * 16 + 4].copy_from_slice(&v.to_le_bytes());
        }
        page
    }

    /// Load a register page. The count-down timer goes on from the page's
    /// current count: a one-shot timer that had fired (count 0) stays
    /// quiet, one half-way through fires after the rest of its count, and
    /// a periodic one finishes its current period and then runs at its
    /// initial count.
    pub fn load_page(&mut self, page: &[u8; 1024], now: Instant) {
        for (k, r) in self.regs.iter_mut().enumerate() {
            let b = &page[k * 16..k * 16 + 4];
            *r = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        self.regs[idx(VERSION)] = VERSION_VALUE;
        self.regs[idx(TIMER_DIV)] &= 0xb;
        self.update_ppr();
        let current = u64::from(self.regs[idx(TIMER_CUR)]);
        self.start_timer(now);
        if self.deadline.is_some() {
            let left = Duration::from_nanos(current * u64::from(self.divisor()));
            if current != 0 {
                self.deadline = Some(now + left);
            } else if self.timer_mode() != TIMER_PERIODIC {
                self.deadline = None;
            }
        }
    }

    /// Logical destination match (flat or cluster model).
    pub fn matches_logical(&self, dest: u8) -> bool {
        let ldr = (self.regs[idx(LDR)] >> 24) as u8;
        if self.regs[idx(DFR)] >> 28 == 0 {
            // Cluster model: high nibble cluster, low nibble members.
            ldr >> 4 == dest >> 4 && ldr & dest & 0xf != 0
        } else {
            ldr & dest != 0
        }
    }

    /// Processor priority (for lowest-priority arbitration).
    pub fn ppr(&self) -> u32 {
        self.regs[idx(PPR)]
    }

    /// APR is not modelled separately.
    pub fn apr(&self) -> u32 {
        self.regs[idx(APR)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_eoi_and_page_roundtrip() {
        let now = Instant::now();
        let mut l = Lapic::new(3);
        assert_eq!(l.read(ID, now) >> 24, 3);
        l.write(SVR, 0x1ff, now);
        l.accept(0x31, false);
        l.accept(0x52, true);
        l.write(TPR, 0x40, now);
        assert_eq!(l.ack(), Some(0x52));
        assert_eq!(l.ack(), None, "0x31 is below the PPR now");
        assert_eq!(l.write(EOI, 0, now), Action::LevelEoi(0x52));
        l.write(TPR, 0, now);
        assert_eq!(l.ack(), Some(0x31));
        let page = l.to_page(now);
        let mut m = Lapic::new(0);
        m.load_page(&page, now);
        assert_eq!(m.to_page(now), page);
    }

    /// A restored count-down timer resumes mid-count: a one-shot that
    /// fired stays quiet, one half-way fires after what was left, and a
    /// periodic one finishes its period, then runs at the full period.
    #[test]
    fn restored_timer_resumes_from_the_current_count() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for (mode, elapsed, want_left) in [
            (0u32, 4u64, Some(6u64)), // one-shot, 10 ms, 4 ms in: 6 left
            (0, 12, None),            // one-shot that already fired
            (TIMER_PERIODIC, 4, Some(6)),
        ] {
            let mut l = Lapic::new(0);
            l.write(SVR, 0x1ff, t0);
            l.write(TIMER_DIV, 0xb, t0); // divide by 1: 1 ns per count
            l.write(LVT_TIMER, (mode << 17) | 0x40, t0);
            l.write(TIMER_INIT, 10_000_000, t0);
            let at = t0 + ms(elapsed);
            if elapsed > 10 {
                assert!(l.poll_timer(at), "the one-shot fires");
            }
            let page = l.to_page(at);
            // Restored much later in another process.
            let later = t0 + Duration::from_secs(100);
            let mut m = Lapic::new(0);
            m.load_page(&page, later);
            assert_eq!(
                m.next_deadline(),
                want_left.map(|left| later + ms(left)),
                "mode {mode}, {elapsed} ms in"
            );
            if mode == TIMER_PERIODIC {
                assert!(m.poll_timer(later + ms(6)));
                assert_eq!(m.next_deadline(), Some(later + ms(16)));
            }
        }
    }
}
