//! The reset control register at port 0xCF9 (PIIX/ICH style), which the
//! FADT's RESET_REG points to: writing a value with the RST_CPU bit resets.

use std::sync::Arc;

use vireo_vmcore::{BusDevice, ExitReason, VmControl};

const RST_CPU: u8 = 1 << 2;

pub struct ResetControl {
    control: Arc<VmControl>,
    value: u8,
}

impl ResetControl {
    pub fn new(control: Arc<VmControl>) -> Self {
        ResetControl { control, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.value);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & RST_CPU != 0 {
            tracing::info!("reset control: guest requested a reset ({v:#x})");
            self.control.request_exit(ExitReason::Reset);
        } else {
            self.value = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rst_cpu_resets() {
        let c = Arc::new(VmControl::default());
        let mut d = ResetControl::new(c.clone());
        d.write(0, &[0x2]);
        assert_eq!(c.exit_reason(), None);
        d.write(0, &[0x6]);
        assert_eq!(c.exit_reason(), Some(ExitReason::Reset));
    }
}
