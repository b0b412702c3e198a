//! The standard vireo PC: a VM from the core with the legacy devices wired
//! to their ports and interrupt lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vireo_devices::legacy::{acpi_pm, AcpiPm, Cmos, ResetControl, Serial, SerialInput, I8042};
use vireo_devices::pci::bus::SharedPciBus;
use vireo_devices::pci::{HostBridge, HypervisorLink, PciBus, PciConfigIo, PciHost, PciMmioWindow};
use vireo_devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use vireo_devices::virtio::VirtioDevice;
use vireo_hypervisor::Hypervisor;
use vireo_vmcore::layout::{self, ports};
use vireo_vmcore::snapshot::device::DeviceList;
use vireo_vmcore::snapshot::{LoadedSnapshot, SnapshotError, VmSnapshot};
use vireo_vmcore::{Vm, VmConfig, VmError};

/// A built machine and the handles the front end drives it with.
pub struct Machine {
    pub vm: Vm,
    /// Feeds the guest's COM1.
    pub input: SerialInput,
    pub power_button: PowerButton,
    pci: SharedPciBus,
    /// Every device, by stable id, in machine order: what a snapshot
    /// pauses, saves and restores.
    pub devices: DeviceList,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{name}: {source}")]
    Pci {
        name: String,
        #[source]
        source: vireo_devices::pci::bus::PciBusError,
    },
    #[error(transparent)]
    Transport(#[from] vireo_devices::virtio::pci::VirtioPciError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl Machine {
    /// Put a virtio device on the PCI bus (next free slot, BAR 0 from the
    /// MMIO window, MSI-X through the hypervisor, INTx as the fallback),
    /// saved in snapshots as `snapshot_id` (`virtio/<kind>[/<id>]`).
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        snapshot_id: String,
    ) -> Result<(), AttachError> {
        let name = device.name();
        let pci_err = |source| AttachError::Pci {
            name: name.clone(),
            source,
        };
        let mut bus = self.pci.lock().unwrap_or_else(|p| p.into_inner());
        let slot = bus.free_slot().map_err(pci_err)?;
        let bar = bus.allocate_bar(BAR_SIZE).map_err(pci_err)?;
        let gsi = ports::PCI_INTX_GSI_BASE + u32::from(slot) % ports::PCI_INTX_GSIS;
        let intx = self.vm.level_interrupt_line(gsi)?;
        let link = Arc::new(HypervisorLink(self.vm.hypervisor_vm()));
        let mut dev = VirtioPciDevice::new(
            device,
            self.vm.memory().clone(),
            bar,
            link.clone(),
            Some((intx, gsi as u8)),
        )?;
        dev.set_ioevent_registrar(link);
        tracing::debug!("{name}: PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}, INTx GSI {gsi}");
        let dev = Arc::new(Mutex::new(dev));
        bus.insert(slot, dev.clone()).map_err(pci_err)?;
        self.devices.push(snapshot_id, dev);
        Ok(())
    }
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
/// CMOS RTC, the ACPI PM registers with the SCI, the reset control register
/// and the PCI host bridge (empty until [`Machine::add_virtio`]).
pub fn build(
    hv: &dyn Hypervisor,
    cfg: &VmConfig,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, VmError> {
    assemble(Vm::new(hv, cfg)?, serial_out)
}

/// Build the machine a snapshot describes: vCPUs and platform from the
/// snapshot, guest memory `memory` (from [`LoadedSnapshot::memory`]) and
/// the built-in devices. The front end then attaches the virtio devices
/// the snapshot records and calls [`restore_devices`].
pub fn restore(
    hv: &dyn Hypervisor,
    loaded: &LoadedSnapshot,
    memory: vireo_vmcore::memory::GuestMemory,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, VmError> {
    let snap = &loaded.snapshot;
    let vm = Vm::from_snapshot(hv, snap, memory)?;
    assemble(vm, serial_out)
}

/// Load each device's saved state by id (the machine must have exactly
/// the devices the snapshot holds, in the same order), before the VM runs.
pub fn restore_devices(machine: &Machine, snap: &VmSnapshot) -> Result<(), VmError> {
    machine
        .devices
        .restore(&snap.devices)
        .map_err(|e| SnapshotError::from(e).into())
}

fn assemble(mut vm: Vm, serial_out: Box<dyn Write + Send>) -> Result<Machine, VmError> {
    let control = vm.control();
    let mut devices = DeviceList::default();

    let (serial, input) =
        Serial::new(vm.interrupt_line(ports::COM1_IRQ)?, serial_out).into_shared();
    vm.add_io_device(ports::COM1, 8, serial.clone())?;
    devices.push("serial0", serial);

    let i8042 = Arc::new(Mutex::new(I8042::new(
        control.clone(),
        vm.interrupt_line(ports::I8042_IRQ)?,
    )));
    vm.add_io_device(ports::I8042, 5, i8042.clone())?;
    devices.push("i8042", i8042);

    let ram = vm.ram_layout();
    let cmos = Arc::new(Mutex::new(Cmos::new(ram.below_hole(), ram.above_4g())));
    vm.add_io_device(ports::CMOS, 2, cmos.clone())?;
    devices.push("cmos", cmos);

    let sci = vm.level_interrupt_line(ports::ACPI_SCI_IRQ)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(control.clone(), Some(sci))));
    vm.add_io_device(ports::PM1A_EVT, acpi_pm::LEN, pm.clone())?;
    devices.push("acpi_pm", pm.clone());
    // The reset control register (0xCF9) sits inside the PCI configuration
    // ports; the configuration device passes its byte accesses on.
    let reset = Arc::new(Mutex::new(ResetControl::new(control)));
    let pci = Arc::new(Mutex::new(PciBus::new(
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
    )));
    let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
    pci.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(0, host_bridge.clone())
        .map_err(|e| VmError::Device(e.to_string()))?;
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone(), Some(reset))));
    vm.add_io_device(ports::PCI_CONFIG, ports::PCI_CONFIG_LEN, config_io.clone())?;
    devices.push(
        "pci",
        Arc::new(Mutex::new(PciHost::new(config_io, host_bridge))),
    );
    vm.add_mmio_device(
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
        Arc::new(Mutex::new(PciMmioWindow::new(pci.clone()))),
    )?;
    Ok(Machine {
        vm,
        input,
        power_button: PowerButton(pm),
        pci,
        devices,
    })
}
