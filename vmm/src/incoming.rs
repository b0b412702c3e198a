//! The migration-target path: check this target's own definition
//! against the host, receive the machine a source offers (refused unless
//! it is that definition), build it from the target's own devices and
//! acknowledge; with post-copy, guest memory is armed before anything
//! touches it.

use vireo_api::units::MemorySize;
use vireo_api::vm::{check_resources, HostLimits, LimitError, MAX_VCPUS};
use vireo_hypervisor::Hypervisor;
use vireo_vmcore::VmError;

use crate::backend::{self, Accel, BackendError};
use crate::devices::{self, Attached, DeviceConfigs, DeviceError};
use crate::machine;
use crate::snapshot_devices;
use crate::start::{Error, Frontend};
use crate::stdout::StdoutWriter;

/// Build a migrated machine from its state and memory: the vCPUs and
/// platform, then the virtio devices of this target's own definition
/// (checked against the source's record again: the state's record is
/// the one the configuration carried), then every device's state.
fn build_migrated(
    hv: &dyn Hypervisor,
    loaded: &vireo_vmcore::snapshot::LoadedSnapshot,
    memory: vireo_vmcore::memory::GuestMemory,
    own: &DeviceConfigs,
    mac_given: &[bool],
) -> Result<(machine::Machine, Attached), MigrateInError> {
    let configs = snapshot_devices::migrated_configs(
        &loaded.snapshot.config.frontend,
        own.clone(),
        mac_given,
    )
    .map_err(MigrateInError::Devices)?;
    let mut machine = machine::restore(hv, loaded, memory, Box::new(StdoutWriter))
        .map_err(MigrateInError::Build)?;
    let attached = devices::open(&mut machine, configs)?;
    machine::restore_devices(&machine, &loaded.snapshot).map_err(MigrateInError::State)?;
    Ok((machine, attached))
}

/// Why an incoming migration failed after its listener was checked.
#[derive(Debug, thiserror::Error)]
pub enum MigrateInError {
    #[error(transparent)]
    Target(#[from] crate::migrate::TargetError),
    #[error(transparent)]
    Postcopy(#[from] crate::migrate::PostcopyError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// This target's devices do not match the source's record.
    #[error(transparent)]
    Devices(#[from] snapshot_devices::PeerDevicesError),
    #[error("cannot build the migrated VM: {0}")]
    Build(#[source] VmError),
    #[error(transparent)]
    Open(#[from] DeviceError),
    #[error("the migrated device state does not fit: {0}")]
    State(#[source] VmError),
}

/// How a machine differs from this target's definition or does not fit
/// this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineMismatch {
    #[error("the source's VM has {source_vcpus} vCPU(s), this target's definition {own}")]
    Vcpus { source_vcpus: u32, own: u32 },
    #[error("the source's VM has {source_memory} of memory, this target's definition {own}")]
    Memory {
        source_memory: MemorySize,
        own: MemorySize,
    },
    /// The definition is outside vireo's, the backend's or the host's
    /// limits (the one check every VM definition passes).
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// The machine a source offers, checked against this target's own
/// definition (its vCPUs and memory) and the host before any memory is
/// allocated: equal vCPUs and memory, within the backend's vCPU limit and
/// the host's memory (RAM plus swap).
fn check_offered_machine(
    config: &vireo_vmcore::snapshot::MachineConfig,
    cpus: u32,
    memory: MemorySize,
    max_vcpus: u32,
    host_memory: Option<MemorySize>,
) -> Result<(), MachineMismatch> {
    if config.vcpus != cpus {
        return Err(MachineMismatch::Vcpus {
            source_vcpus: config.vcpus,
            own: cpus,
        });
    }
    if config.memory != memory {
        return Err(MachineMismatch::Memory {
            source_memory: config.memory,
            own: memory,
        });
    }
    check_fits_host(cpus, memory, max_vcpus, host_memory)
}

/// vCPUs within the backend's limit, memory within the host's.
fn check_fits_host(
    cpus: u32,
    memory: MemorySize,
    max_vcpus: u32,
    host_memory: Option<MemorySize>,
) -> Result<(), MachineMismatch> {
    check_resources(cpus, memory, HostLimits::new(max_vcpus, host_memory))?;
    Ok(())
}

/// An incoming migration: check this target's own definition, receive
/// the machine from a source (refused unless it is that machine), build
/// it from the target's own devices, acknowledge.
pub(crate) fn migrate_in(
    frontend: &mut dyn Frontend,
    listen: &crate::migrate::Listen,
    own: DeviceConfigs,
    mac_given: &[bool],
    cpus: u32,
    memory: MemorySize,
    accel: Accel,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), Error> {
    let uri = listen.uri.as_str();
    let own_set = snapshot_devices::DeviceSet::from_configs(&own);
    let host_memory = vireo_api::host::memory();
    check_fits_host(cpus, memory, MAX_VCPUS, host_memory)?;
    crate::migrate::check_listen(listen)?;
    let check =
        |config: &vireo_vmcore::snapshot::MachineConfig| -> Result<(), crate::migrate::Refusal> {
            let hv = backend::for_saved(config.backend, accel)?;
            let max = (hv.max_vcpus() as u32).min(MAX_VCPUS);
            check_offered_machine(config, cpus, memory, max, host_memory)?;
            snapshot_devices::check_peer_record(&config.frontend, &own_set, mac_given)?;
            Ok(())
        };
    let refused = |source: MigrateInError| Error::MigrateIn {
        uri: uri.to_string(),
        source: Box::new(source),
    };
    let started = std::time::Instant::now();
    let incoming = crate::migrate::receive(listen, &check, &mut |addr| {
        frontend.migration_listening(addr)
    })
    .map_err(|e| refused(e.into()))?;
    let config = incoming.loaded.snapshot.config.clone();
    let hv = match backend::for_saved(config.backend, accel) {
        Ok(hv) => hv,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(refused(e.into()));
        }
    };
    if incoming.postcopy.is_some() {
        // Post-copy: guest memory is armed before anything (the device
        // restore included) touches a page that is still at the source.
        let loaded = vireo_vmcore::snapshot::LoadedSnapshot::without_memory(
            incoming.loaded.snapshot.clone(),
        );
        let memory = incoming.memory.clone();
        let target = incoming.start_postcopy().map_err(|e| refused(e.into()))?;
        let (machine, attached) =
            match build_migrated(hv.as_ref(), &loaded, memory, &own, mac_given) {
                Ok(m) => m,
                Err(e) => {
                    target.refuse(&e.to_string());
                    return Err(refused(e));
                }
            };
        target.ack(machine.vm.control());
        tracing::info!(
            "migrated in (post-copy): {} vCPU(s), {} on {} ({} ms after listening); \
             the rest of memory follows while the guest runs",
            config.vcpus,
            config.memory,
            config.backend,
            started.elapsed().as_millis()
        );
        return Ok((hv, machine, attached));
    }
    let (machine, attached) = match build_migrated(
        hv.as_ref(),
        &incoming.loaded,
        incoming.memory.clone(),
        &own,
        mac_given,
    ) {
        Ok(m) => m,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(refused(e));
        }
    };
    incoming.ack().map_err(|e| refused(e.into()))?;
    tracing::info!(
        "migrated in: {} vCPU(s), {} on {} ({} ms after listening)",
        config.vcpus,
        config.memory,
        config.backend,
        started.elapsed().as_millis()
    );
    Ok((hv, machine, attached))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_hypervisor::BackendKind;

    fn mib(n: u64) -> MemorySize {
        MemorySize::from_mib(n).unwrap()
    }

    fn offered(vcpus: u32, memory_mib: u64) -> vireo_vmcore::snapshot::MachineConfig {
        vireo_vmcore::snapshot::MachineConfig {
            backend: BackendKind::Emu,
            vcpus,
            memory: mib(memory_mib),
            frontend: serde_json::Value::Null,
        }
    }

    /// A forged configuration of 4 TiB (or other vCPUs) is refused by the
    /// check that runs before guest memory is allocated.
    #[test]
    fn the_offered_machine_must_be_the_targets_own_and_fit_the_host() {
        let four_tib = 4 << 20;
        let e = check_offered_machine(&offered(1, four_tib), 1, mib(64), 64, Some(mib(8192)))
            .unwrap_err();
        assert_eq!(
            e,
            MachineMismatch::Memory {
                source_memory: mib(four_tib),
                own: mib(64)
            }
        );
        assert!(e.to_string().contains("4194304 MiB"), "{e}");
        let e =
            check_offered_machine(&offered(4, 64), 1, mib(64), 64, Some(mib(8192))).unwrap_err();
        assert!(e.to_string().contains("4 vCPU(s)"), "{e}");
        // Even a target defined that big is refused by the host check.
        let e = check_offered_machine(&offered(1, four_tib), 1, mib(four_tib), 64, Some(mib(8192)))
            .unwrap_err();
        assert!(e.to_string().contains("more than this host"), "{e}");
        let e = check_offered_machine(&offered(300, 64), 300, mib(64), 254, Some(mib(8192)))
            .unwrap_err();
        assert!(e.to_string().contains("between 1 and 254"), "{e}");
        assert!(check_offered_machine(&offered(2, 64), 2, mib(64), 64, Some(mib(8192))).is_ok());
    }
}
