//! Restoring a snapshot: check it whole, open the backend it ran on,
//! load (or map) its memory, build the machine in the saved state and
//! rebuild its virtio devices from the snapshot's record (disks rolled
//! back, or the caller's overrides).

use std::path::Path;

use vireo_hypervisor::Hypervisor;
use vireo_vmcore::snapshot::SnapshotError;
use vireo_vmcore::VmError;

use crate::backend::{self, Accel, BackendError};
use crate::devices::{self, Attached, DeviceError};
use crate::machine;
use crate::snapshot_devices::{self, RestoreDevicesError, RestoreOverrides};
use crate::stdout::StdoutWriter;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Load(SnapshotError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Build(VmError),
    #[error(transparent)]
    Devices(#[from] RestoreDevicesError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A saved state does not fit the rebuilt devices.
    #[error(transparent)]
    State(VmError),
}

impl RestoreError {
    pub(crate) fn is_user_error(&self) -> bool {
        match self {
            RestoreError::Load(_) | RestoreError::Backend(_) | RestoreError::State(_) => true,
            RestoreError::Devices(e) => e.is_user_error(),
            RestoreError::Device(e) => e.is_user_error(),
            RestoreError::Build(_) => false,
        }
    }
}

/// A restore: check the snapshot in `dir` whole, open its backend, load
/// its memory (or map it, `lazy`) and build the machine in the saved
/// state, its virtio devices included (see [`restore_virtio`]).
pub(crate) fn restore_machine(
    dir: &Path,
    lazy: bool,
    overrides: &RestoreOverrides,
    accel: Accel,
) -> Result<(Box<dyn Hypervisor>, machine::Machine, Attached), RestoreError> {
    let loaded = vireo_vmcore::snapshot::load(dir).map_err(RestoreError::Load)?;
    let backend = loaded.snapshot.config.backend;
    let hv = backend::for_saved(backend, accel)?;
    let started = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        if total >= 1 << 30 && done % (256 << 20) == 0 {
            tracing::info!("restore: {} of {} MiB read", done >> 20, total >> 20);
        }
    };
    let memory = loaded
        .memory(lazy, &mut progress)
        .map_err(RestoreError::Load)?;
    let mut machine = machine::restore(hv.as_ref(), &loaded, memory, Box::new(StdoutWriter))
        .map_err(RestoreError::Build)?;
    let attached = restore_virtio(&mut machine, &loaded.snapshot, overrides, dir)?;
    tracing::info!(
        "restored {} ({} vCPU(s), {} on {}) in {} ms{}",
        dir.display(),
        loaded.snapshot.config.vcpus,
        loaded.snapshot.config.memory,
        backend,
        started.elapsed().as_millis(),
        if lazy { ", memory mapped lazily" } else { "" }
    );
    Ok((hv, machine, attached))
}

/// Rebuild the virtio devices a snapshot records (disks rolled back, or
/// the `overrides`) and load every device's saved state.
fn restore_virtio(
    machine: &mut machine::Machine,
    snap: &vireo_vmcore::snapshot::VmSnapshot,
    overrides: &RestoreOverrides,
    dir: &Path,
) -> Result<Attached, RestoreError> {
    let configs = snapshot_devices::restore_configs(dir, &snap.config.frontend, overrides)?;
    let attached = devices::open(machine, configs)?;
    // A saved state that does not fit the rebuilt devices (a damaged
    // snapshot, an override of another size) is the caller's to fix.
    machine::restore_devices(machine, snap).map_err(RestoreError::State)?;
    Ok(attached)
}
