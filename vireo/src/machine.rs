//! The standard vireo PC: a VM from the core with the legacy devices wired
//! to their ports and interrupt lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vireo_devices::legacy::{acpi_pm, AcpiPm, Cmos, ResetControl, Serial, SerialInput, I8042};
use vireo_hypervisor::Hypervisor;
use vireo_vmcore::layout::{self, ports};
use vireo_vmcore::{Vm, VmConfig, VmError};

/// A built machine and the handles the front end drives it with.
pub struct Machine {
    pub vm: Vm,
    /// Feeds the guest's COM1.
    pub input: SerialInput,
    pub power_button: PowerButton,
}

/// The ACPI power button (what `vireo vm stop` presses for a graceful stop).
#[derive(Clone)]
pub struct PowerButton(Arc<Mutex<AcpiPm>>);

impl PowerButton {
    pub fn press(&self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_power_button();
    }
}

/// Build the VM and attach COM1 (writing to `serial_out`), the i8042, the
/// CMOS RTC, the ACPI PM registers with the SCI and the reset control register.
pub fn build(
    hv: &dyn Hypervisor,
    cfg: &VmConfig,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, VmError> {
    let mut vm = Vm::new(hv, cfg)?;
    let control = vm.control();

    let (serial, input) =
        Serial::new(vm.interrupt_line(ports::COM1_IRQ)?, serial_out).into_shared();
    vm.add_io_device(ports::COM1, 8, serial)?;

    let i8042 = I8042::new(control.clone(), vm.interrupt_line(ports::I8042_IRQ)?);
    vm.add_io_device(ports::I8042, 5, Arc::new(Mutex::new(i8042)))?;

    let ram = cfg.memory_mib << 20;
    let below_4g = ram.min(layout::MMIO_HOLE_START);
    let cmos = Cmos::new(below_4g, ram - below_4g);
    vm.add_io_device(ports::CMOS, 2, Arc::new(Mutex::new(cmos)))?;

    let sci = vm.level_interrupt_line(ports::ACPI_SCI_IRQ)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(control.clone(), Some(sci))));
    vm.add_io_device(ports::PM1A_EVT, acpi_pm::LEN, pm.clone())?;
    vm.add_io_device(
        ports::RESET_CONTROL,
        1,
        Arc::new(Mutex::new(ResetControl::new(control))),
    )?;
    Ok(Machine {
        vm,
        input,
        power_button: PowerButton(pm),
    })
}
