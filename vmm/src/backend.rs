//! The backend factory: the one place that turns an accelerator choice
//! into a hypervisor, for a fresh boot and for a saved machine (a snapshot
//! or a migration's state), and names why a backend cannot be used.

use std::path::Path;

/// Which backend to run on (`vireo_api::vm::Accel`, the one the CLI and
/// the REST API take): KVM, the emulator, or KVM when it runs the kernel
/// at hardware speed and the emulator otherwise.
pub use vireo_api::vm::Accel;
use vireo_emulator::EmuHypervisor;
use vireo_hypervisor::host::HostVirt;
use vireo_hypervisor::kvm::KvmHypervisor;
use vireo_hypervisor::{BackendKind, Hypervisor, HypervisorError};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// KVM was asked for (or a saved machine needs it) and cannot be opened.
    #[error(transparent)]
    Kvm(#[from] HypervisorError),
    /// A saved machine's state belongs to another backend than the one asked for.
    #[error("the VM ran on the {saved} backend; it cannot run on accel {accel}", accel = .accel.as_str())]
    Mismatch { saved: BackendKind, accel: Accel },
}

/// Open the backend `accel` asks for to boot `kernel`. `Auto` takes KVM
/// when it can run this kernel at hardware speed and the emulator
/// otherwise, and says why through `notice`.
pub fn open(
    accel: Accel,
    kernel: &Path,
    notice: &mut dyn FnMut(&str),
) -> Result<Box<dyn Hypervisor>, BackendError> {
    match accel {
        Accel::Kvm => Ok(Box::new(KvmHypervisor::new()?)),
        Accel::Emu => Ok(Box::new(EmuHypervisor::new())),
        Accel::Auto => {
            let kvm = KvmHypervisor::new();
            let pvm_only = HostVirt::detect().kvm_is_pvm_only();
            let pvm_guest = pvm_only && kernel_is_pvm_guest(kernel);
            match (auto_backend(kvm.is_ok(), pvm_only, pvm_guest), kvm) {
                (BackendKind::Kvm, Ok(kvm)) => Ok(Box::new(kvm)),
                (_, Err(e)) => {
                    notice(&format!("KVM is not usable ({e}); running on the emulator (accel emu), which is much slower"));
                    Ok(Box::new(EmuHypervisor::new()))
                }
                (_, Ok(_)) => {
                    notice(
                        "/dev/kvm here is PVM (kvm_pvm) without VT-x/AMD-V and this kernel is not a PVM guest, \
                         so KVM would emulate every instruction in the host kernel; running on vireo's emulator instead \
                         (accel kvm forces KVM)",
                    );
                    Ok(Box::new(EmuHypervisor::new()))
                }
            }
        }
    }
}

/// What [`Accel::Auto`] runs a kernel on: KVM when it opens and runs the
/// kernel at hardware speed (the CPU has VT-x/AMD-V, or KVM is PVM-only
/// and the kernel a PVM guest), the emulator otherwise.
pub fn auto_backend(kvm_opens: bool, kvm_pvm_only: bool, pvm_guest: bool) -> BackendKind {
    if kvm_opens && (!kvm_pvm_only || pvm_guest) {
        BackendKind::Kvm
    } else {
        BackendKind::Emu
    }
}

/// The backend a saved machine of `saved` runs on under `accel`: its own
/// (state of one backend cannot be loaded into the other).
pub fn for_saved(saved: BackendKind, accel: Accel) -> Result<Box<dyn Hypervisor>, BackendError> {
    match (saved, accel) {
        (BackendKind::Kvm, Accel::Kvm | Accel::Auto) => Ok(Box::new(KvmHypervisor::new()?)),
        (BackendKind::Emu, Accel::Emu | Accel::Auto) => Ok(Box::new(EmuHypervisor::new())),
        (saved, accel) => Err(BackendError::Mismatch { saved, accel }),
    }
}

/// Does the kernel image say it is PVM-aware? (Only uncompressed images
/// can tell; a bzImage counts as not.)
fn kernel_is_pvm_guest(kernel: &Path) -> bool {
    std::fs::read(kernel)
        .ok()
        .and_then(|image| vireo_vmcore::boot::kernel::mentions_pvm_guest(&image))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_kvm_only_where_it_runs_the_kernel_at_hardware_speed() {
        assert_eq!(auto_backend(true, false, false), BackendKind::Kvm);
        assert_eq!(auto_backend(true, true, true), BackendKind::Kvm);
        assert_eq!(auto_backend(true, true, false), BackendKind::Emu);
        assert_eq!(auto_backend(false, false, true), BackendKind::Emu);
    }

    /// Snapshots and migration streams record the backend by its old
    /// string; they still load.
    #[test]
    fn a_saved_backend_keeps_its_short_name_on_disk() {
        let config: vireo_vmcore::snapshot::MachineConfig =
            serde_json::from_str(r#"{"backend":"kvm","vcpus":1,"memory_mib":64,"frontend":null}"#)
                .unwrap();
        assert_eq!(config.backend, BackendKind::Kvm);
        assert_eq!(
            serde_json::to_string(&BackendKind::Emu).unwrap(),
            r#""emu""#
        );
    }

    #[test]
    fn a_saved_machine_runs_only_on_its_own_backend() {
        let e = for_saved(BackendKind::Kvm, Accel::Emu)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("the VM ran on the kvm backend; it cannot run on accel emu")
        );
        assert_eq!(
            for_saved(BackendKind::Emu, Accel::Auto)
                .map(|hv| hv.kind())
                .ok(),
            Some(BackendKind::Emu)
        );
    }
}
