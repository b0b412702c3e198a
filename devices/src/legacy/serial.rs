//! COM1: a 16550A UART from the rust-vmm `vm-superio` crate, with its
//! interrupt on an edge-triggered ISA line and its output to any writer.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vireo_hypervisor::InterruptLine;
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vireo_vmcore::BusDevice;
use vm_superio::{serial::NoEvents, Trigger};

/// Raises the UART's ISA interrupt line.
pub struct IrqTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The UART as a bus device.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Wrap for the bus, and return the handle that feeds guest input.
    pub fn into_shared(self) -> (Arc<Mutex<Serial>>, SerialInput) {
        let shared = Arc::new(Mutex::new(self));
        let input = SerialInput {
            serial: shared.clone(),
        };
        (shared, input)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if off < 8 {
                if let Err(e) = self.uart.write(off, *value) {
                    tracing::debug!("serial: write to offset {off} failed: {e:?}");
                }
            }
        }
    }
}

/// Feeds host input into the UART's receive FIFO.
#[derive(Clone)]
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
}

impl SerialInput {
    /// Queue as many of `bytes` as the FIFO has room for; returns how many
    /// were taken (the caller retries the rest later).
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = s.uart.fifo_capacity();
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        match s.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(taken) => taken,
            Err(e) => {
                tracing::debug!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers and the receive FIFO survive save + restore into a new
    /// UART, which keeps writing to its own writer.
    #[test]
    fn state_roundtrips_through_a_snapshot() {
        use vireo_vmcore::snapshot::device::{DynSnapshottable, SavedState};
        let line = Arc::new(CountingLine(AtomicUsize::new(0)));
        let (dev, input) = Serial::new(line.clone(), Box::new(Sink::default())).into_shared();
        dev.lock().unwrap().write(3, &[0x03]); // LCR: 8N1
        dev.lock().unwrap().write(7, &[0x5a]); // scratch
        assert_eq!(input.enqueue(b"hi"), 2);
        let saved = dev.lock().unwrap().save().unwrap();

        let out = Sink::default();
        let mut fresh = Serial::new(line, Box::new(out.clone()));
        fresh.restore(saved).unwrap();
        let mut b = [0u8];
        fresh.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        fresh.read(3, &mut b);
        assert_eq!(b[0], 0x03);
        fresh.read(0, &mut b);
        assert_eq!(b[0], b'h', "the FIFO's bytes come back in order");
        fresh.read(0, &mut b);
        assert_eq!(b[0], b'i');
        fresh.write(0, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
        assert!(fresh
            .restore_dyn(SavedState {
                version: 1,
                state: serde_json::json!({"scratch": "not a number"}),
            })
            .is_err());
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vireo_hypervisor::EventFd;

    struct CountingLine(AtomicUsize);
    impl InterruptLine for CountingLine {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn eventfd(&self) -> std::io::Result<EventFd> {
            EventFd::new(0)
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_goes_to_the_writer_and_receive_raises_irq() {
        let line = Arc::new(CountingLine(AtomicUsize::new(0)));
        let sink = Sink::default();
        let (dev, input) = Serial::new(line.clone(), Box::new(sink.clone())).into_shared();
        let mut d = dev.lock().unwrap();
        for b in b"hi" {
            d.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        d.write(1, &[0x01]);
        drop(d);
        assert_eq!(input.enqueue(b"x"), 1);
        assert!(line.0.load(Ordering::SeqCst) >= 1);
        let mut b = [0u8];
        dev.lock().unwrap().read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn odd_sized_and_out_of_range_accesses_are_ignored() {
        let line = Arc::new(CountingLine(AtomicUsize::new(0)));
        let (dev, _) = Serial::new(line, Box::new(Sink::default())).into_shared();
        let mut d = dev.lock().unwrap();
        let mut w = [0u8; 2];
        d.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        d.write(0, &[1, 2, 3]);
        d.write(9, &[1]);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_left_for_later() {
        let line = Arc::new(CountingLine(AtomicUsize::new(0)));
        let (_dev, input) = Serial::new(line, Box::new(Sink::default())).into_shared();
        let big = vec![b'a'; 1000];
        let taken = input.enqueue(&big);
        assert!(taken > 0 && taken < 1000, "took {taken}");
        assert_eq!(input.enqueue(&big), 0, "full FIFO takes nothing");
    }
}

/// COM1's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Why a saved UART state does not load.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("the saved UART state does not load: {0}")]
    Uart(#[source] vm_superio::serial::Error<std::io::Error>),
}

impl Pausable for Serial {}

impl Snapshottable for Serial {
    type State = SerialState;
    type Error = SerialStateError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<SerialState, SerialStateError> {
        let s = self.uart.state();
        Ok(SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, s: SerialState) -> Result<(), SerialStateError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        // vm-superio builds a UART from a state with its trigger and
        // writer: take both from the current one.
        let irq = self.uart.interrupt_evt().0.clone();
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let old = std::mem::replace(
            &mut self.uart,
            vm_superio::Serial::new(IrqTrigger(irq.clone()), placeholder),
        );
        let out = old.into_writer();
        self.uart = vm_superio::Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(SerialStateError::Uart)?;
        Ok(())
    }
}
