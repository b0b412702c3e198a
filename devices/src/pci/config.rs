//! A type 0 PCI configuration space: the 256-byte header with per-bit
//! write masks, memory BARs the guest can size and move, and a capability
//! list.

use std::fmt;

pub const CONFIG_SPACE_SIZE: usize = 256;
const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_PROG: usize = 0x09;
const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
const FIRST_CAPABILITY: usize = 0x40;
pub const BAR_COUNT: usize = 6;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Class code, subclass and programming interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCode {
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
}

/// The identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub class: ClassCode,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already used")]
    BadBar(usize),
    #[error("BAR size {0:#x} must be a power of two of at least 16 bytes")]
    BadBarSize(u64),
    #[error("capability of {0} bytes does not fit in the configuration space")]
    NoRoomForCapability(usize),
    #[error("saved configuration space is {0} bytes, not {CONFIG_SPACE_SIZE}")]
    SavedSize(usize),
    #[error("saved configuration space differs from this device's at read-only offset {offset:#x} (vendor {vendor:#06x}, device {device:#06x} here)")]
    SavedReadOnly {
        offset: usize,
        vendor: u16,
        device: u16,
    },
}

/// One 32-bit memory BAR.
#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u32,
}

pub struct PciConfig {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits the guest may change.
    wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; BAR_COUNT],
    /// Offset of the last capability added (to link the next one).
    last_capability: Option<usize>,
    next_capability: usize,
}

impl fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.word(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.word(DEVICE_ID)))
            .finish()
    }
}

impl PciConfig {
    /// A header for a function that may use INTx pin A.
    pub fn new(id: PciIdentity) -> PciConfig {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_word(VENDOR_ID, id.vendor);
        c.set_word(DEVICE_ID, id.device);
        c.bytes[REVISION] = id.revision;
        c.bytes[CLASS_PROG] = id.class.prog_if;
        c.bytes[CLASS_PROG + 1] = id.class.subclass;
        c.bytes[CLASS_PROG + 2] = id.class.class;
        c.bytes[HEADER_TYPE] = 0;
        c.set_word(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.set_word(SUBSYSTEM_ID, id.subsystem);
        let cmd_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Route INTx pin A (`pin` 1) of this function; 0 means no INTx.
    pub fn set_interrupt_pin(&mut self, pin: u8, line: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
        self.bytes[INTERRUPT_LINE] = line;
    }

    fn word(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn set_word(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn dword(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }

    pub fn command(&self) -> u16 {
        self.word(COMMAND)
    }

    /// Declare 32-bit memory BAR `index` of `size` bytes at `addr`.
    pub fn add_memory_bar(
        &mut self,
        index: usize,
        size: u64,
        addr: u32,
    ) -> Result<(), ConfigError> {
        if index >= BAR_COUNT || self.bars[index].is_some() {
            return Err(ConfigError::BadBar(index));
        }
        if !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return Err(ConfigError::BadBarSize(size));
        }
        let size = size as u32;
        self.bars[index] = Some(Bar { size });
        let off = BAR0 + 4 * index;
        // Bits 3:0: memory space, 32-bit, not prefetchable — read-only zeros.
        self.bytes[off..off + 4].copy_from_slice(&(addr & !(size - 1)).to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&(!(size - 1)).to_le_bytes());
        Ok(())
    }

    /// The guest address and size of BAR `index`, when memory decoding is
    /// on and the BAR exists.
    pub fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).copied().flatten()?;
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let addr = u64::from(self.dword(BAR0 + 4 * index) & !0xf);
        Some((addr, u64::from(bar.size)))
    }

    /// Append a capability (`body` starts with its id byte; the next-pointer
    /// byte is filled in) whose bytes in `writable` the guest may change.
    /// Returns its offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len().max(2);
        let off = self.next_capability;
        if off + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoomForCapability(body.len()));
        }
        self.bytes[off..off + body.len()].copy_from_slice(body);
        self.bytes[off + 1] = 0;
        for (i, m) in writable.iter().enumerate().take(body.len()) {
            self.wmask[off + i] = *m;
        }
        self.wmask[off + 1] = 0;
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = off as u8;
                let status = self.word(STATUS) | STATUS_CAPABILITIES;
                self.set_word(STATUS, status);
            }
        }
        self.last_capability = Some(off);
        // Capabilities start on dword boundaries.
        self.next_capability = (off + len + 3) & !3;
        Ok(off)
    }

    /// Raw bytes of the space (for a transport that keeps state in a
    /// capability).
    pub fn bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// Set bytes regardless of the write mask (device-side updates).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Load a space saved with [`PciConfig::bytes`] into this one, built
    /// the same way. The bits the guest cannot change (ids, class, BAR
    /// types, capabilities) must match: otherwise the saved space belongs
    /// to another device and nothing is changed.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigError> {
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigError::SavedSize(saved.len()));
        }
        if let Some(offset) =
            (0..CONFIG_SPACE_SIZE).find(|&o| (saved[o] ^ self.bytes[o]) & !self.wmask[o] != 0)
        {
            return Err(ConfigError::SavedReadOnly {
                offset,
                vendor: self.word(VENDOR_ID),
                device: self.word(DEVICE_ID),
            });
        }
        self.bytes.copy_from_slice(saved);
        Ok(())
    }

    /// A guest read; out-of-range bytes read as all ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest write, through the write masks.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < CONFIG_SPACE_SIZE)
            else {
                return;
            };
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        PciConfig::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: ClassCode {
                class: 1,
                subclass: 0x80,
                prog_if: 0,
            },
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    fn read32(c: &PciConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_and_class_read_back_and_are_read_only() {
        let mut c = config();
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x01_80_00);
        // Beyond the space: all ones.
        assert_eq!(
            read32(&c, 254),
            0xffff_0000 | u32::from(c.bytes[254]) | u32::from(c.bytes[255]) << 8
        );
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = config();
        c.add_memory_bar(0, 0x8000, 0xc000_0000).unwrap();
        assert!(c.bar_range(0).is_none(), "memory decoding is off");
        c.write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_range(0), Some((0xc000_0000, 0x8000)));
        c.write(BAR0 as u64, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0 as u64), 0xffff_8000, "size probe");
        c.write(BAR0 as u64, &0xd000_1234u32.to_le_bytes());
        assert_eq!(c.bar_range(0), Some((0xd000_0000, 0x8000)));
        // Unused BARs read zero whatever is written.
        c.write(BAR0 as u64 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0 as u64 + 4), 0);
        assert_eq!(c.add_memory_bar(0, 0x1000, 0), Err(ConfigError::BadBar(0)));
        assert_eq!(
            c.add_memory_bar(1, 0x1001, 0),
            Err(ConfigError::BadBarSize(0x1001))
        );
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = config();
        let a = c
            .add_capability(&[0x11, 0xee, 1, 2], &[0, 0, 0xff, 0])
            .unwrap();
        let b = c.add_capability(&[0x09, 0, 3], &[]).unwrap();
        assert_eq!(c.bytes()[0x34] as usize, a);
        assert_eq!(c.bytes()[a + 1] as usize, b);
        assert_eq!(c.bytes()[b + 1], 0);
        assert_ne!(c.bytes()[6] & 0x10, 0);
        c.write(a as u64 + 2, &[0x55, 0x66]);
        assert_eq!(&c.bytes()[a + 2..a + 4], &[0x55, 2]);
        let big = [0u8; 250];
        assert!(c.add_capability(&big, &[]).is_err());
    }
}
