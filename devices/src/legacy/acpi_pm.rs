//! ACPI fixed hardware at the ports the FADT names: the PM1a event block
//! (status/enable), the PM1a control block (where the OS writes
//! `SLP_TYP | SLP_EN` to sleep or power off) and the 3.579545 MHz PM timer.
//!
//! Layout relative to the device base (0x600): 0..2 PM1_STS, 2..4 PM1_EN,
//! 4..6 PM1_CNT, 8..12 PM_TMR.

use std::sync::Arc;
use std::time::Instant;

use vireo_hypervisor::InterruptLine;
use vireo_vmcore::boot::acpi::SLP_TYP_S5;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vireo_vmcore::{BusDevice, ExitReason, VmControl};

pub const LEN: u16 = 12;

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const PM_TMR: u64 = 8;

const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;
const CNT_SLP_TYP_SHIFT: u16 = 10;
const CNT_SLP_TYP_MASK: u16 = 0x7 << CNT_SLP_TYP_SHIFT;

const PM_TIMER_HZ: u128 = 3_579_545;

/// PM1 status/enable bit of the power button.
const PWRBTN: u16 = 1 << 8;

pub struct AcpiPm {
    control: Arc<VmControl>,
    /// The SCI, level triggered: asserted while an enabled status bit is set.
    sci: Option<Arc<dyn InterruptLine>>,
    status: u16,
    enable: u16,
    cnt: u16,
    start: Instant,
}

impl AcpiPm {
    pub fn new(control: Arc<VmControl>, sci: Option<Arc<dyn InterruptLine>>) -> Self {
        AcpiPm {
            control,
            sci,
            status: 0,
            enable: 0,
            // There is no SMI handshake: the platform starts in ACPI mode.
            cnt: CNT_SCI_EN,
            start: Instant::now(),
        }
    }

    /// Press the power button: the guest sees PWRBTN_STS and, if it enabled
    /// the event, an SCI (Linux then shuts down in an orderly way).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        if let Some(sci) = &self.sci {
            let asserted = self.status & self.enable & PWRBTN != 0;
            if let Err(e) = sci.set_level(asserted) {
                tracing::warn!("ACPI: cannot drive the SCI: {e}");
            }
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn write_cnt(&mut self, value: u16) {
        // SLP_EN is write-only; SCI_EN stays set.
        self.cnt = (value & !CNT_SLP_EN) | CNT_SCI_EN;
        if value & CNT_SLP_EN == 0 {
            return;
        }
        let slp_typ = ((value & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT) as u8;
        if slp_typ == SLP_TYP_S5 {
            tracing::info!("ACPI: guest entered S5 (soft off)");
            self.control.request_exit(ExitReason::PowerOff);
        } else {
            tracing::info!(
                "ACPI: guest asked for sleep type {slp_typ}, which vireo does not offer; ignored"
            );
        }
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let pair = |lo: u16, hi: u16| u32::from(lo) | u32::from(hi) << 16;
        match offset {
            PM1_STS => pair(self.status, self.enable),
            PM1_EN => u32::from(self.enable),
            PM1_CNT => u32::from(self.cnt),
            PM_TMR => self.timer(),
            _ => 0xffff_ffff,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Accesses are naturally aligned registers; unaligned offsets read
        // the bytes of the register they fall in.
        let base = offset & !1;
        let base = if offset >= PM_TMR { PM_TMR } else { base };
        let value = self.read_u32(base).to_le_bytes();
        let skip = (offset - base) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.get(skip + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let lo = u16::from_le_bytes([bytes[0], bytes[1]]);
        let hi = u16::from_le_bytes([bytes[2], bytes[3]]);
        match offset {
            PM1_STS => {
                // Write one to clear.
                self.status &= !lo;
                if n == 4 {
                    self.enable = hi;
                }
                self.update_sci();
            }
            PM1_EN => {
                self.enable = lo;
                self.update_sci();
            }
            PM1_CNT => self.write_cnt(lo),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrips_and_the_pm_timer_does_not_go_back() {
        let (mut pm, _) = dev();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        pm.start -= std::time::Duration::from_secs(5);
        let before = pm.timer();
        let saved = pm.save().unwrap();
        let (mut fresh, _) = dev();
        fresh.restore(saved).unwrap();
        assert_eq!(fresh.enable, PWRBTN);
        assert!(fresh.timer() >= before, "PM timer went back");
    }

    fn dev() -> (AcpiPm, Arc<VmControl>) {
        let c = Arc::new(VmControl::default());
        (AcpiPm::new(c.clone(), None), c)
    }

    /// Records the level the device drives.
    struct Level(std::sync::Mutex<Vec<bool>>);
    impl InterruptLine for Level {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_level(&self, asserted: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().push(asserted);
            Ok(())
        }
        fn eventfd(&self) -> std::io::Result<vireo_hypervisor::EventFd> {
            vireo_hypervisor::EventFd::new(0)
        }
    }

    #[test]
    fn power_button_raises_the_sci_only_when_enabled_until_cleared() {
        let line = Arc::new(Level(std::sync::Mutex::new(Vec::new())));
        let mut d = AcpiPm::new(Arc::new(VmControl::default()), Some(line.clone()));
        d.press_power_button();
        assert_eq!(
            line.0.lock().unwrap().last(),
            Some(&false),
            "not enabled yet"
        );
        d.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert_eq!(
            line.0.lock().unwrap().last(),
            Some(&true),
            "pending event fires on enable"
        );
        let mut sts = [0u8; 2];
        d.read(PM1_STS, &mut sts);
        assert_eq!(u16::from_le_bytes(sts) & PWRBTN, PWRBTN);
        d.write(PM1_STS, &PWRBTN.to_le_bytes());
        assert_eq!(
            line.0.lock().unwrap().last(),
            Some(&false),
            "cleared by the guest"
        );
        d.read(PM1_STS, &mut sts);
        assert_eq!(u16::from_le_bytes(sts) & PWRBTN, 0);
    }

    #[test]
    fn s5_powers_off() {
        let (mut d, c) = dev();
        d.write(PM1_CNT, &((5u16 << 10) | (1 << 13)).to_le_bytes());
        assert_eq!(c.exit_reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_states_and_typ_without_en_do_nothing() {
        let (mut d, c) = dev();
        d.write(PM1_CNT, &(5u16 << 10).to_le_bytes());
        d.write(PM1_CNT, &((3u16 << 10) | (1 << 13)).to_le_bytes());
        assert_eq!(c.exit_reason(), None);
        let mut b = [0u8; 2];
        d.read(PM1_CNT, &mut b);
        assert_eq!(u16::from_le_bytes(b) & CNT_SCI_EN, CNT_SCI_EN);
        assert_eq!(u16::from_le_bytes(b) & CNT_SLP_EN, 0);
    }

    #[test]
    fn pm_timer_counts_up() {
        let (mut d, _) = dev();
        let mut a = [0u8; 4];
        d.read(PM_TMR, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut b = [0u8; 4];
        d.read(PM_TMR, &mut b);
        let (a, b) = (u32::from_le_bytes(a), u32::from_le_bytes(b));
        assert!(
            b.wrapping_sub(a) >= 17_000,
            "5 ms is ~17900 ticks: {a} -> {b}"
        );
    }

    #[test]
    fn enable_register_roundtrips_and_odd_accesses_are_safe() {
        let (mut d, _) = dev();
        d.write(PM1_EN, &0x0100u16.to_le_bytes());
        let mut b = [0u8; 2];
        d.read(PM1_EN, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0100);
        let mut big = [0u8; 8];
        d.read(11, &mut big);
        d.write(3, &[]);
        d.write(100, &[1, 2, 3, 4, 5]);
    }
}

/// The PM1 registers and the PM timer's position.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    status: u16,
    enable: u16,
    cnt: u16,
    /// PM timer position, as nanoseconds since it started.
    timer_ns: u64,
}

impl Pausable for AcpiPm {}

impl Snapshottable for AcpiPm {
    type State = AcpiPmState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<AcpiPmState, Self::Error> {
        Ok(AcpiPmState {
            status: self.status,
            enable: self.enable,
            cnt: self.cnt,
            timer_ns: self.start.elapsed().as_nanos() as u64,
        })
    }

    fn restore(&mut self, s: AcpiPmState) -> Result<(), Self::Error> {
        self.status = s.status;
        self.enable = s.enable;
        self.cnt = s.cnt | CNT_SCI_EN;
        // The PM timer goes on from where it was (it must not jump back).
        let now = Instant::now();
        self.start = now
            .checked_sub(std::time::Duration::from_nanos(s.timer_ns))
            .unwrap_or(now);
        self.update_sci();
        Ok(())
    }
}
