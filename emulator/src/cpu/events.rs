//! The CPU's side of the platform: interrupt, NMI, INIT and SIPI
//! acceptance at instruction boundaries, HLT and wait-for-SIPI sleeps,
//! timer polling, the local APIC page and the TSC on host time.

use std::sync::atomic::Ordering;
use std::time::Instant;

use vireo_hypervisor::Segment;

use super::state::{rflags, CpuState, SegReg};
use super::{Cpu, Exit};
use crate::exceptions::EventKind;
use crate::platform::{read_bytes, CpuLink};

/// APIC_BASE bit 11: the local APIC is enabled.
const APIC_BASE_ENABLE: u64 = 1 << 11;
const NMI_VECTOR: u8 = 2;

impl Cpu {
    /// Attach the CPU to a VM's platform.
    pub(crate) fn attach(&mut self, link: CpuLink, wait_sipi: bool) {
        self.tsc_offset = 0u64.wrapping_sub(link.platform.now_ns());
        self.link = Some(link);
        self.wait_sipi = wait_sipi;
    }

    /// The time stamp counter: 1 GHz host time with a platform, retired
    /// instructions without one.
    pub(crate) fn tsc(&self) -> u64 {
        match &self.link {
            Some(l) => l.platform.now_ns().wrapping_add(self.tsc_offset),
            None => self.state.tsc,
        }
    }

    pub(crate) fn set_tsc(&mut self, v: u64) {
        match &self.link {
            Some(l) => self.tsc_offset = v.wrapping_sub(l.platform.now_ns()),
            None => self.state.tsc = v,
        }
    }

    /// IA32_TSC_DEADLINE; `None` without a local APIC.
    pub(crate) fn tsc_deadline(&self) -> Option<u64> {
        Some(self.link.as_ref()?.lapic.lock().tsc_deadline())
    }

    pub(crate) fn set_tsc_deadline(&mut self, v: u64) -> bool {
        let Some(l) = &self.link else {
            return false;
        };
        let ns = v.wrapping_sub(self.tsc_offset);
        let now = l.platform.now_ns();
        // A deadline in the past fires at once.
        let at = if (ns.wrapping_sub(now) as i64) < 0 {
            l.platform.instant_at(now)
        } else {
            l.platform.instant_at(ns)
        };
        l.lapic.post(|s| s.set_tsc_deadline(v, Some(at)));
        true
    }

    /// APIC_BASE was written.
    pub(crate) fn apic_base_changed(&mut self) {
        if let Some(l) = &self.link {
            let on = self.state.msr.apic_base & APIC_BASE_ENABLE != 0;
            l.lapic.post(|s| s.hw_enabled = on);
        }
    }

    /// TPR through CR8.
    pub(crate) fn cr8_changed(&mut self) {
        if let Some(l) = &self.link {
            let tpr = (self.state.cr8 as u32 & 0xf) << 4;
            l.lapic.post(|s| s.set_tpr(tpr));
        }
    }

    pub(crate) fn read_cr8(&self) -> u64 {
        match &self.link {
            Some(l) => u64::from(l.lapic.lock().reg(crate::platform::lapic::TPR) >> 4),
            None => self.state.cr8,
        }
    }

    fn lapic_page(&self, pa: u64) -> Option<usize> {
        let base = self.state.msr.apic_base;
        (self.link.is_some()
            && base & APIC_BASE_ENABLE != 0
            && pa & !0xfff == base & 0x000f_ffff_ffff_f000)
            .then_some((pa & 0xfff) as usize)
    }

    /// A physical read the platform answers (LAPIC page, IOAPIC).
    pub(crate) fn platform_mmio_read(&mut self, pa: u64, buf: &mut [u8]) -> bool {
        let Some(link) = &self.link else {
            return false;
        };
        if let Some(off) = self.lapic_page(pa) {
            let v = if off < 0x400 {
                link.lapic.lock().read(off & !0xf, Instant::now())
            } else {
                0
            };
            read_bytes(v, off & 0xf, buf);
            return true;
        }
        link.platform.ioapic_read(pa, buf)
    }

    /// A physical write the platform takes; false if it is not the
    /// platform's. Partial and unaligned LAPIC writes are ignored.
    pub(crate) fn platform_mmio_write(&mut self, pa: u64, data: &[u8]) -> bool {
        let Some(link) = self.link.clone() else {
            return false;
        };
        if let Some(off) = self.lapic_page(pa) {
            if off < 0x400 && off & 0xf == 0 && data.len() >= 4 {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let action = {
                    let mut l = link.lapic.lock();
                    let a = l.write(off, v, Instant::now());
                    link.lapic.refresh(&l);
                    a
                };
                link.platform.lapic_action(link.lapic.id, action);
            }
            return true;
        }
        link.platform.ioapic_write(pa, data)
    }

    /// An `IN` the platform answers.
    pub(crate) fn platform_port_in(&mut self, port: u16, size: usize) -> Option<u64> {
        let link = self.link.as_ref()?;
        crate::platform::Platform::owns_port(port).then(|| link.platform.port_read(port, size))
    }

    pub(crate) fn platform_port_out(&mut self, port: u16, size: usize, v: u64) -> bool {
        let Some(link) = &self.link else {
            return false;
        };
        if !crate::platform::Platform::owns_port(port) {
            return false;
        }
        link.platform.port_write(port, size, v);
        true
    }

    /// Fire due timers (this vCPU's LAPIC timer, the PIT).
    pub(crate) fn poll_timers(&mut self, now: Instant) {
        let Some(link) = &self.link else {
            return;
        };
        {
            let mut l = link.lapic.lock();
            if l.poll_timer(now) {
                link.lapic.refresh(&l);
            }
        }
        link.platform.poll_pit(now);
    }

    /// Sleep until an event could wake this CPU or `until`.
    pub(crate) fn wait_for_event(&mut self, until: Instant) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let now = Instant::now();
        let mut t = until;
        if let Some(d) = link.lapic.lock().next_deadline() {
            t = t.min(d);
        }
        if let Some(p) = link.platform.pit_next() {
            t = t.min(p);
        }
        if t <= now {
            return;
        }
        let if_ = self.state.flag(rflags::IF) && !self.wait_sipi;
        let bsp = link.lapic.id == 0;
        let nmi = self.nmi_pending && !self.nmi_blocked && !self.wait_sipi;
        let pic = &link.platform.pic_output;
        link.lapic.wait(t - now, |l| {
            nmi || l.init_pending
                || l.sipi_pending.is_some()
                || l.nmi_pending
                || (if_
                    && (l.has_deliverable()
                        || (bsp && pic.load(Ordering::Acquire) && l.accepts_pic())))
        });
    }

    /// INIT: back to the reset state, waiting for a STARTUP IPI. MSRs and
    /// the TSC are kept.
    fn do_init(&mut self) {
        let msr = self.state.msr;
        self.state = CpuState::default();
        self.state.msr = msr;
        self.halted = false;
        self.wait_sipi = true;
        self.int_shadow = false;
        self.nmi_pending = false;
        self.nmi_blocked = false;
        self.exit_after = None;
        self.mmio_writes.clear();
        self.flush_tlb();
    }

    /// STARTUP: real mode at vector * 0x1000.
    fn do_sipi(&mut self, vector: u8) {
        let sel = u16::from(vector) << 8;
        self.state.seg[SegReg::Cs as usize] = Segment {
            base: u64::from(vector) << 12,
            limit: 0xffff,
            selector: sel,
            type_: 0xb,
            s: 1,
            present: 1,
            ..Segment::default()
        };
        self.state.rip = 0;
        self.wait_sipi = false;
        self.halted = false;
        self.flush_tlb();
    }

    /// Accept what the platform has for this CPU at an instruction
    /// boundary. Returns an exit (halt while waiting for SIPI, or the
    /// shutdown of a failed delivery).
    pub(crate) fn platform_events(&mut self) -> Option<Exit> {
        {
            // The common case, without cloning the link (two atomic
            // reference counts per instruction).
            let l = self.link.as_ref()?;
            let lapic = &l.lapic;
            let quiet = !lapic.event_hint.load(Ordering::Acquire)
                && !self.wait_sipi
                && !self.nmi_pending
                && (!self.state.flag(rflags::IF)
                    || self.int_shadow
                    || !(lapic.irq_hint.load(Ordering::Acquire)
                        || lapic.id == 0 && l.platform.pic_output.load(Ordering::Acquire)));
            if quiet {
                return None;
            }
        }
        let link = self.link.clone()?;
        let lapic = &link.lapic;
        if lapic.event_hint.load(Ordering::Acquire) {
            let (init, sipi, nmi) = {
                let mut l = lapic.lock();
                let init = std::mem::take(&mut l.init_pending);
                let sipi = l.sipi_pending.take();
                let nmi = std::mem::take(&mut l.nmi_pending);
                if init {
                    let id = l.id();
                    let hw = l.hw_enabled;
                    l.reset(id);
                    l.hw_enabled = hw;
                }
                lapic.refresh(&l);
                (init, sipi, nmi)
            };
            if init {
                self.do_init();
            }
            if let Some(v) = sipi {
                if self.wait_sipi {
                    self.do_sipi(v);
                }
            }
            if nmi && !self.wait_sipi {
                self.nmi_pending = true;
            }
        }
        if self.wait_sipi {
            return Some(Exit::Halt);
        }
        let rip = self.state.rip;
        if self.nmi_pending && !self.nmi_blocked && !self.int_shadow {
            self.nmi_pending = false;
            self.nmi_blocked = true;
            self.halted = false;
            return self.deliver_or_shutdown(NMI_VECTOR, None, rip, EventKind::External);
        }
        if !self.state.flag(rflags::IF) || self.int_shadow {
            return None;
        }
        let mut vector = None;
        if lapic.irq_hint.load(Ordering::Acquire) {
            let mut l = lapic.lock();
            vector = l.ack();
            lapic.refresh(&l);
        }
        if vector.is_none()
            && lapic.id == 0
            && link.platform.pic_output.load(Ordering::Acquire)
            && lapic.lock().accepts_pic()
        {
            vector = Some(link.platform.ack_pic());
        }
        let v = vector?;
        self.halted = false;
        self.deliver_or_shutdown(v, None, rip, EventKind::External)
    }
}
