//! The MC146818 CMOS RTC at ports 0x70/0x71: the wall-clock time (UTC) in
//! BCD, 24-hour mode, plus the memory-size bytes PC firmware leaves there.
//! A guest that sets the clock moves an offset; the host clock is untouched.

use std::time::{SystemTime, UNIX_EPOCH};

use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vireo_vmcore::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_B_24H: u8 = 1 << 1;
const REG_B_BINARY: u8 = 1 << 2;
const REG_B_SET: u8 = 1 << 7;
const REG_D_VALID: u8 = 1 << 7;

/// A civil UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// Convert seconds since the Unix epoch (Howard Hinnant's civil-from-days).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (5 when Sunday is 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }

    /// Seconds since the Unix epoch (days-from-civil).
    pub fn to_unix(&self) -> i64 {
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn host_unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

pub struct Cmos {
    index: u8,
    data: [u8; 128],
    /// Guest clock minus host clock, in seconds.
    offset: i64,
    clock: fn() -> i64,
}

impl Cmos {
    /// `mem_below_4g` and `mem_above_4g` are the guest RAM sizes in bytes.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, host_unix_time)
    }

    fn with_clock(mem_below_4g: u64, mem_above_4g: u64, clock: fn() -> i64) -> Self {
        let mut data = [0u8; 128];
        data[REG_A as usize] = 0x26;
        data[REG_B as usize] = REG_B_24H;
        data[REG_D as usize] = REG_D_VALID;
        // Base memory in KiB (640), extended memory above 1 MiB in KiB
        // (capped), memory above 16 MiB and above 4 GiB in 64 KiB units.
        data[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        let ext_kib = (mem_below_4g.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        data[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        data[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        let above_16m = (mem_below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        data[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        let above_4g = (mem_above_4g >> 16).min(0xff_ffff) as u32;
        data[0x5b..0x5e].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        Cmos {
            index: 0,
            data,
            offset: 0,
            clock,
        }
    }

    fn binary_mode(&self) -> bool {
        self.data[REG_B as usize] & REG_B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary_mode() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary_mode() {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)() + self.offset)
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year.rem_euclid(100)) as u32),
            REG_CENTURY => self.encode((t.year.div_euclid(100)).clamp(0, 99) as u32),
            // Update-in-progress is never set: reads are always consistent.
            REG_A => self.data[REG_A as usize] & 0x7f,
            REG_C => std::mem::take(&mut self.data[REG_C as usize]),
            r => self.data[usize::from(r & 0x7f)],
        }
    }

    fn write_reg(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => {
                let mut t = self.now();
                let v = self.decode(value);
                match reg {
                    REG_SECONDS => t.second = v.min(59),
                    REG_MINUTES => t.minute = v.min(59),
                    REG_HOURS => t.hour = v.min(23),
                    REG_DAY => t.day = v.clamp(1, 31),
                    REG_MONTH => t.month = v.clamp(1, 12),
                    REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(v.min(99)),
                    _ => t.year = i64::from(v.min(99)) * 100 + t.year.rem_euclid(100),
                }
                self.offset = t.to_unix() - (self.clock)();
            }
            // Register C and D are read-only.
            REG_C | REG_D => {}
            REG_B => self.data[REG_B as usize] = (value & !REG_B_SET) | REG_B_24H,
            r => self.data[usize::from(r & 0x7f)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.read_reg(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask.
            0 => self.index = value & 0x7f,
            1 => self.write_reg(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrips_through_a_snapshot() {
        use vireo_vmcore::snapshot::device::{DynSnapshottable, SavedState};
        let mut c = Cmos::with_clock(64 << 20, 0, || FIXED);
        c.write(0, &[0x40]);
        c.write(1, &[0x99]); // a byte of CMOS RAM
        c.offset = 3600;
        let saved = c.save().unwrap();
        let mut fresh = Cmos::with_clock(64 << 20, 0, || FIXED);
        fresh.restore(saved).unwrap();
        assert_eq!(read(&mut fresh, 0x40), 0x99);
        assert_eq!(fresh.offset, 3600, "the guest's clock offset is kept");
        assert!(fresh
            .restore_dyn(SavedState {
                version: 1,
                state: serde_json::json!({"index": 0, "data": [1, 2], "offset": 0}),
            })
            .is_err());
    }

    // 2026-11-23 13:45:07 UTC, a Monday.
    const FIXED: i64 = 1_795_441_507;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_conversion_roundtrips() {
        for t in [0, 951_782_400, 1_709_208_000, FIXED, 4_102_444_800] {
            assert_eq!(DateTime::from_unix(t).to_unix(), t);
        }
        let d = DateTime::from_unix(FIXED);
        assert_eq!((d.year, d.month, d.day), (2026, 11, 23));
        assert_eq!((d.hour, d.minute, d.second), (13, 45, 7));
        assert_eq!(d.weekday, 2, "Monday");
        // 2000-02-29 exists.
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn reads_time_in_bcd() {
        let mut c = Cmos::with_clock(128 << 20, 0, || FIXED);
        assert_eq!(read(&mut c, REG_HOURS), 0x13);
        assert_eq!(read(&mut c, REG_MINUTES), 0x45);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_D), REG_D_VALID);
    }

    #[test]
    fn binary_mode_and_guest_writes_move_an_offset() {
        let mut c = Cmos::with_clock(128 << 20, 0, || FIXED);
        c.write(0, &[REG_B]);
        c.write(1, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(read(&mut c, REG_HOURS), 13);
        c.write(0, &[REG_HOURS]);
        c.write(1, &[20]);
        assert_eq!(read(&mut c, REG_HOURS), 20);
        assert_eq!(c.offset, 7 * 3600);
        // Garbage values are clamped, never panic.
        c.write(0, &[REG_MONTH]);
        c.write(1, &[0xff]);
        assert_eq!(read(&mut c, REG_MONTH), 12);
    }

    #[test]
    fn memory_size_bytes() {
        let c = Cmos::with_clock(256 << 20, 1 << 30, || FIXED);
        assert_eq!(
            u16::from_le_bytes([c.data[0x34], c.data[0x35]]),
            ((256 - 16) << 20 >> 16) as u16
        );
        assert_eq!(c.data[0x5c], 0x40, "1 GiB above 4G = 0x4000 units of 64K");
    }
}

/// The CMOS index register, RAM and the guest's clock offset.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    index: u8,
    data: Vec<u8>,
    offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CmosStateError {
    #[error("saved CMOS RAM is {0} bytes, not 128")]
    RamSize(usize),
}

impl Pausable for Cmos {}

/// The RTC keeps its offset from the host clock, so a restored guest's
/// wall clock is the host's plus the offset it had set (time the snapshot
/// spent on disk passes for the guest too, as after a suspend).
impl Snapshottable for Cmos {
    type State = CmosState;
    type Error = CmosStateError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<CmosState, CmosStateError> {
        Ok(CmosState {
            index: self.index,
            data: self.data.to_vec(),
            offset: self.offset,
        })
    }

    fn restore(&mut self, s: CmosState) -> Result<(), CmosStateError> {
        let len = s.data.len();
        self.data = s
            .data
            .try_into()
            .map_err(|_| CmosStateError::RamSize(len))?;
        self.index = s.index & 0x7f;
        self.offset = s.offset;
        Ok(())
    }
}
