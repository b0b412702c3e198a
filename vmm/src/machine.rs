//! The standard vireo PC: a VM from the core with the legacy devices wired
//! to their ports and interrupt lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vireo_devices::legacy::{acpi_pm, AcpiPm, Cmos, ResetControl, Serial, SerialInput, I8042};
use vireo_devices::pci::bus::SharedPciBus;
use vireo_devices::pci::{
    HostBridge, HypervisorLink, PciBus, PciConfigIo, PciDevice, PciMmioWindow,
};
use vireo_devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use vireo_devices::virtio::VirtioDevice;
use vireo_hypervisor::Hypervisor;
use vireo_vmcore::layout::{self, ports};
use vireo_vmcore::snapshot::{
    LoadedSnapshot, SharedSnapshottable, SnapshotError, Snapshottable, VmSnapshot,
};
use vireo_vmcore::{Vm, VmConfig, VmError};

/// A built machine and the handles the front end drives it with.
pub struct Machine {
    pub vm: Vm,
    /// Feeds the guest's COM1.
    pub input: SerialInput,
    pub power_button: PowerButton,
    pci: SharedPciBus,
    /// The devices a snapshot saves, by stable id, in machine order.
    pub snapshot_devices: Vec<(String, SharedSnapshottable)>,
    /// The virtio functions, to quiesce around a snapshot.
    pub virtio: VirtioFunctions,
}

/// The machine's virtio PCI functions.
#[derive(Clone, Default)]
pub struct VirtioFunctions(Vec<Arc<Mutex<VirtioPciDevice>>>);

impl VirtioFunctions {
    /// Stop every device thread (requests in flight completed, disks
    /// flushed) until the guard is dropped: while it lives no device
    /// touches guest memory, its queues or its disk.
    pub fn quiesce(&self) -> Quiesced<'_> {
        for d in &self.0 {
            d.lock().unwrap_or_else(|p| p.into_inner()).pause();
        }
        Quiesced(self)
    }
}

/// Devices held still by [`VirtioFunctions::quiesce`]; they carry on when
/// this is dropped.
pub struct Quiesced<'a>(&'a VirtioFunctions);

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for d in &self.0 .0 {
            d.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }
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
        self.snapshot_devices.push((snapshot_id, dev.clone()));
        self.virtio.0.push(dev);
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
    let ids: Vec<&str> = machine
        .snapshot_devices
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    let saved: Vec<&str> = snap.devices.iter().map(|(id, _)| id.as_str()).collect();
    if ids != saved {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot holds devices {saved:?}, this vireo builds {ids:?}"
        ))
        .into());
    }
    for ((id, dev), (_, state)) in machine.snapshot_devices.iter().zip(&snap.devices) {
        dev.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(state.clone())
            .map_err(|e| match e {
                SnapshotError::Device { .. } => e,
                other => SnapshotError::Device {
                    id: id.clone(),
                    reason: other.to_string(),
                },
            })?;
    }
    Ok(())
}

/// The PCI host side a snapshot saves as `pci`: the configuration
/// address register and the host bridge's configuration space (the
/// virtio functions save their own).
struct PciState {
    io: Arc<Mutex<PciConfigIo>>,
    host_bridge: Arc<Mutex<HostBridge>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedPci {
    config_address: u32,
    host_bridge: Vec<u8>,
}

impl Snapshottable for PciState {
    fn save(&mut self) -> Result<serde_json::Value, SnapshotError> {
        let saved = SavedPci {
            config_address: self.io.lock().unwrap_or_else(|p| p.into_inner()).address(),
            host_bridge: self
                .host_bridge
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config()
                .bytes()
                .to_vec(),
        };
        vireo_vmcore::snapshot::to_state("pci", &saved)
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), SnapshotError> {
        let saved: SavedPci = vireo_vmcore::snapshot::device_state("pci", state)?;
        self.host_bridge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config_mut()
            .restore(&saved.host_bridge)
            .map_err(|reason| SnapshotError::Device {
                id: "pci".into(),
                reason,
            })?;
        self.io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_address(saved.config_address);
        Ok(())
    }
}

fn assemble(mut vm: Vm, serial_out: Box<dyn Write + Send>) -> Result<Machine, VmError> {
    let control = vm.control();
    let mut snapshot_devices: Vec<(String, SharedSnapshottable)> = Vec::new();

    let (serial, input) =
        Serial::new(vm.interrupt_line(ports::COM1_IRQ)?, serial_out).into_shared();
    vm.add_io_device(ports::COM1, 8, serial.clone())?;
    snapshot_devices.push(("serial0".into(), serial));

    let i8042 = Arc::new(Mutex::new(I8042::new(
        control.clone(),
        vm.interrupt_line(ports::I8042_IRQ)?,
    )));
    vm.add_io_device(ports::I8042, 5, i8042.clone())?;
    snapshot_devices.push(("i8042".into(), i8042));

    let ram = vm.ram_layout();
    let cmos = Arc::new(Mutex::new(Cmos::new(ram.below_hole(), ram.above_4g())));
    vm.add_io_device(ports::CMOS, 2, cmos.clone())?;
    snapshot_devices.push(("cmos".into(), cmos));

    let sci = vm.level_interrupt_line(ports::ACPI_SCI_IRQ)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(control.clone(), Some(sci))));
    vm.add_io_device(ports::PM1A_EVT, acpi_pm::LEN, pm.clone())?;
    snapshot_devices.push(("acpi_pm".into(), pm.clone()));
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
    snapshot_devices.push((
        "pci".into(),
        Arc::new(Mutex::new(PciState {
            io: config_io,
            host_bridge,
        })),
    ));
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
        snapshot_devices,
        virtio: VirtioFunctions::default(),
    })
}
