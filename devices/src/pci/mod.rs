//! The PCI host bridge of a vireo guest: configuration mechanism #1 on
//! ports 0xCF8/0xCFC, one bus of 32 slots, and one MMIO window in the
//! 32-bit hole that carries every device's memory BARs. BARs are assigned
//! here (vireo plays the firmware) and the guest may move them; accesses
//! are routed by the BAR values the guest last programmed.

pub mod bus;
pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};
use vmm_sys_util::eventfd::EventFd;

pub use bus::{PciBus, PciConfigIo, PciMmioWindow};
pub use config::{ClassCode, PciConfig, PciIdentity};
use msix::MsiSender;

/// Lets a device have the hypervisor signal an eventfd on guest writes to
/// an MMIO address (KVM ioeventfd), so a queue notification costs no exit
/// to the VMM.
pub trait IoEventRegistrar: Send + Sync {
    /// False when the backend has no such path (writes then arrive as
    /// MMIO accesses).
    fn register(&self, addr: u64, evt: &EventFd) -> std::io::Result<bool>;
    fn unregister(&self, addr: u64, evt: &EventFd) -> std::io::Result<()>;
}

/// The hypervisor's VM as the MSI sender and ioeventfd registrar of PCI
/// devices.
pub struct HypervisorLink(pub Arc<dyn vireo_hypervisor::Vm>);

impl MsiSender for HypervisorLink {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.0
            .signal_msi(address, data)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl IoEventRegistrar for HypervisorLink {
    fn register(&self, addr: u64, evt: &EventFd) -> std::io::Result<bool> {
        self.0
            .register_mmio_event(addr, evt)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn unregister(&self, addr: u64, evt: &EventFd) -> std::io::Result<()> {
        self.0
            .unregister_mmio_event(addr, evt)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// A PCI function.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A guest read of configuration space.
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest write of configuration space.
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// A guest read of memory BAR `bar` at `offset` from its start.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write of memory BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0. Linux's direct-access probe looks for a
/// host bridge (or VGA) class device on bus 0 before trusting mechanism #1.
pub struct HostBridge {
    config: PciConfig,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> HostBridge {
        HostBridge {
            config: PciConfig::new(PciIdentity {
                // Red Hat's id for a generic PCIe host bridge, as QEMU's
                // gpex uses; nothing in Linux keys on it.
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: ClassCode {
                    class: 0x06,
                    subclass: 0x00,
                    prog_if: 0,
                },
                subsystem_vendor: 0x1b36,
                subsystem: 0x0008,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// The PCI host side as a snapshot saves it (as `pci`): the configuration
/// address register and the host bridge's configuration space. Each
/// function behind the bridge saves its own.
pub struct PciHost {
    io: Arc<Mutex<PciConfigIo>>,
    host_bridge: Arc<Mutex<HostBridge>>,
}

impl PciHost {
    pub fn new(io: Arc<Mutex<PciConfigIo>>, host_bridge: Arc<Mutex<HostBridge>>) -> PciHost {
        PciHost { io, host_bridge }
    }
}

/// [`PciHost`]'s saved state.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct PciHostState {
    config_address: u32,
    host_bridge: Vec<u8>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pausable for PciHost {}

impl Snapshottable for PciHost {
    type State = PciHostState;
    type Error = config::ConfigError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<PciHostState, config::ConfigError> {
        Ok(PciHostState {
            config_address: lock(&self.io).address(),
            host_bridge: lock(&self.host_bridge).config().bytes().to_vec(),
        })
    }

    fn restore(&mut self, s: PciHostState) -> Result<(), config::ConfigError> {
        lock(&self.host_bridge)
            .config_mut()
            .restore(&s.host_bridge)?;
        lock(&self.io).set_address(s.config_address);
        Ok(())
    }
}
