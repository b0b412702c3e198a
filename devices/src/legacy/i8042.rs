//! The i8042 keyboard controller: enough of it for Linux to find the
//! controller and a keyboard quickly, and to reset the machine with command
//! 0xFE (what `reboot=k` does).
//!
//! Ports: data at offset 0 (0x60), status/command at offset 4 (0x64).

use std::collections::VecDeque;
use std::sync::Arc;

use vireo_hypervisor::InterruptLine;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vireo_vmcore::{BusDevice, ExitReason, VmControl};

const STATUS_OBF: u8 = 1 << 0;
const STATUS_SYS: u8 = 1 << 2;
const STATUS_CMD: u8 = 1 << 3;
const STATUS_UNLOCKED: u8 = 1 << 4;
const STATUS_AUX_OBF: u8 = 1 << 5;

const CTR_KBD_INT: u8 = 1 << 0;
const CTR_AUX_INT: u8 = 1 << 1;
const CTR_SYS: u8 = 1 << 2;
const CTR_KBD_DISABLE: u8 = 1 << 4;
const CTR_AUX_DISABLE: u8 = 1 << 5;
const CTR_XLATE: u8 = 1 << 6;

const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// What a controller answers for a device that is not there.
const NO_DEVICE: u8 = 0xfe;

/// Bound on queued output so a guest spamming commands cannot grow memory.
const QUEUE_LIMIT: usize = 16;

/// What the next write to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Pending {
    None,
    WriteCtr,
    WriteOutputPort,
    AuxLoopback,
    AuxWrite,
    KbdArgument,
}

pub struct I8042 {
    control: Arc<VmControl>,
    kbd_irq: Arc<dyn InterruptLine>,
    ctr: u8,
    status: u8,
    pending: Pending,
    output_port: u8,
    /// (byte, from the aux port)
    queue: VecDeque<(u8, bool)>,
}

impl I8042 {
    pub fn new(control: Arc<VmControl>, kbd_irq: Arc<dyn InterruptLine>) -> Self {
        I8042 {
            control,
            kbd_irq,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            status: STATUS_SYS | STATUS_UNLOCKED,
            pending: Pending::None,
            output_port: 0x01,
            queue: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.queue.len() >= QUEUE_LIMIT {
            return;
        }
        self.queue.push_back((byte, aux));
        self.update_status();
        let enabled = if aux { CTR_AUX_INT } else { CTR_KBD_INT };
        // The keyboard interrupt is the only line wired; aux data is polled.
        if !aux && self.ctr & enabled != 0 {
            if let Err(e) = self.kbd_irq.trigger() {
                tracing::debug!("i8042: raising IRQ 1 failed: {e}");
            }
        }
    }

    fn update_status(&mut self) {
        self.status &= !(STATUS_OBF | STATUS_AUX_OBF);
        if let Some(&(_, aux)) = self.queue.front() {
            self.status |= STATUS_OBF;
            if aux {
                self.status |= STATUS_AUX_OBF;
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_CMD;
        match cmd {
            0x20 => self.push(self.ctr, false),
            0x60 => self.pending = Pending::WriteCtr,
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            0xa9 => self.push(0x00, false),
            0xaa => {
                self.status |= STATUS_SYS;
                self.push(0x55, false);
            }
            0xab => self.push(0x00, false),
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xc0 => self.push(0x00, false),
            0xd0 => self.push(self.output_port, false),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd3 => self.pending = Pending::AuxLoopback,
            0xd4 => self.pending = Pending::AuxWrite,
            0xfe => {
                tracing::info!("i8042: guest pulsed the CPU reset line");
                self.control.request_exit(ExitReason::Reset);
            }
            other => tracing::debug!("i8042: ignoring controller command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_CMD;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => {
                self.ctr = value;
                self.status = (self.status & !STATUS_SYS) | (value & CTR_SYS);
            }
            Pending::WriteOutputPort => {
                self.output_port = value;
                // Bit 0 low holds the CPU in reset.
                if value & 1 == 0 {
                    self.control.request_exit(ExitReason::Reset);
                }
            }
            Pending::AuxLoopback => self.push(value, true),
            // No mouse is attached.
            Pending::AuxWrite => self.push(NO_DEVICE, true),
            Pending::KbdArgument => self.push(KBD_ACK, false),
            Pending::None => self.keyboard_command(value),
        }
    }

    /// Commands sent to the keyboard itself through the data port.
    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            0xff => {
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            0xf2 => {
                self.push(KBD_ACK, false);
                self.push(0xab, false);
                self.push(0x83, false);
            }
            // Commands that take one argument byte: LEDs, scan code set, typematic.
            0xed | 0xf0 | 0xf3 => {
                self.push(KBD_ACK, false);
                self.pending = Pending::KbdArgument;
            }
            0xee => self.push(0xee, false),
            _ => self.push(KBD_ACK, false),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => {
                let v = self.queue.pop_front().map(|(b, _)| b).unwrap_or(0);
                self.update_status();
                v
            }
            4 => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.data(value),
            4 => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrips_through_a_snapshot() {
        let (mut a, _c) = dev();
        a.ctr = 0x47;
        a.push(0xfa, false);
        a.push(0x12, true);
        let saved = a.save().unwrap();
        let (mut b, _d) = dev();
        b.restore(saved).unwrap();
        assert_eq!(b.ctr, 0x47);
        assert_eq!(b.queue, a.queue);
    }
    use vireo_hypervisor::EventFd;

    struct NoLine;
    impl InterruptLine for NoLine {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn eventfd(&self) -> std::io::Result<EventFd> {
            EventFd::new(0)
        }
    }

    fn dev() -> (I8042, Arc<VmControl>) {
        let c = Arc::new(VmControl::default());
        (I8042::new(c.clone(), Arc::new(NoLine)), c)
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_the_vm_with_reset() {
        let (mut d, c) = dev();
        d.write(4, &[0xfe]);
        assert_eq!(c.exit_reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn self_test_and_ctr_roundtrip() {
        let (mut d, _) = dev();
        d.write(4, &[0xaa]);
        assert_eq!(read(&mut d, 4) & STATUS_OBF, STATUS_OBF);
        assert_eq!(read(&mut d, 0), 0x55);
        assert_eq!(read(&mut d, 4) & STATUS_OBF, 0);
        d.write(4, &[0x60]);
        d.write(0, &[0x65]);
        d.write(4, &[0x20]);
        assert_eq!(read(&mut d, 0), 0x65);
    }

    #[test]
    fn keyboard_reset_acks_and_passes_self_test() {
        let (mut d, _) = dev();
        d.write(0, &[0xff]);
        assert_eq!(read(&mut d, 0), KBD_ACK);
        assert_eq!(read(&mut d, 0), KBD_SELF_TEST_OK);
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut d, _) = dev();
        for _ in 0..1000 {
            d.write(4, &[0x20]);
        }
        assert_eq!(d.queue.len(), QUEUE_LIMIT);
    }
}

/// The controller's registers and its output queue.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    ctr: u8,
    status: u8,
    pending: Pending,
    output_port: u8,
    queue: Vec<(u8, bool)>,
}

impl Pausable for I8042 {}

impl Snapshottable for I8042 {
    type State = I8042State;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {
            ctr: self.ctr,
            status: self.status,
            pending: self.pending,
            output_port: self.output_port,
            queue: self.queue.iter().copied().collect(),
        })
    }

    fn restore(&mut self, s: I8042State) -> Result<(), Self::Error> {
        self.ctr = s.ctr;
        self.status = s.status;
        self.pending = s.pending;
        self.output_port = s.output_port;
        self.queue = s.queue.into_iter().take(QUEUE_LIMIT).collect();
        Ok(())
    }
}
