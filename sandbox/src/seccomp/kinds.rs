//! The kinds of thread a `vireo run` process has, and which tables of
//! [`super::tables`] each kind's filter allows.

use super::tables::{self, Allow};

/// The virtio device a worker thread serves (their syscalls differ: a
/// disk reads and writes its image, a vsock device makes Unix sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Block,
    Net,
    Vsock,
    Balloon,
    Rng,
    Console,
}

/// What a thread of a `vireo run` process does, which decides its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A KVM vCPU.
    Vcpu,
    /// A vCPU of vireo's emulator (its translator maps executable code).
    EmulatorVcpu,
    /// A virtio device's worker thread.
    Device(Device),
    /// The control socket's accept/read/reply thread.
    Control,
    /// Post-copy migration target threads (userfaultfd, the link).
    Migration,
    /// The stdin pump and the stop-signal watcher.
    Console,
    /// The main thread once set-up is done (control commands: snapshots,
    /// migration source; exit).
    Main,
    /// The thread that starts threads once their parent is filtered.
    Launcher,
    /// The jail's supervisor process (the VMM's parent outside its PID
    /// namespace): it forwards signals and reaps the VMM.
    Supervisor,
}

impl ThreadKind {
    /// Every kind, for compiling and checking them all.
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Vcpu,
        ThreadKind::EmulatorVcpu,
        ThreadKind::Device(Device::Block),
        ThreadKind::Device(Device::Net),
        ThreadKind::Device(Device::Vsock),
        ThreadKind::Device(Device::Balloon),
        ThreadKind::Device(Device::Rng),
        ThreadKind::Device(Device::Console),
        ThreadKind::Control,
        ThreadKind::Migration,
        ThreadKind::Console,
        ThreadKind::Main,
        ThreadKind::Launcher,
        ThreadKind::Supervisor,
    ];

    /// A short name (logs, `VIREO_TEST_FORBIDDEN_SYSCALL`).
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EmulatorVcpu => "emulator-vcpu",
            ThreadKind::Device(Device::Block) => "block",
            ThreadKind::Device(Device::Net) => "net",
            ThreadKind::Device(Device::Vsock) => "vsock",
            ThreadKind::Device(Device::Balloon) => "balloon",
            ThreadKind::Device(Device::Rng) => "rng",
            ThreadKind::Device(Device::Console) => "virtio-console",
            ThreadKind::Control => "control",
            ThreadKind::Migration => "migration",
            ThreadKind::Console => "console",
            ThreadKind::Main => "main",
            ThreadKind::Launcher => "launcher",
            ThreadKind::Supervisor => "supervisor",
        }
    }

    /// Kinds the launcher may start (threads that begin after their parent
    /// is filtered: device threads activated by a vCPU or restarted by the
    /// main thread, the stdin pump).
    pub fn launchable(self) -> bool {
        matches!(self, ThreadKind::Device(_) | ThreadKind::Console)
    }

    /// This kind's allowed syscalls: the common ones and its own table.
    pub fn allowed(self) -> Vec<Allow> {
        let mut v: Vec<Allow> = tables::COMMON.to_vec();
        match self {
            ThreadKind::Vcpu => v.extend_from_slice(tables::VCPU),
            ThreadKind::EmulatorVcpu => {
                v.extend_from_slice(tables::VCPU);
                v.extend_from_slice(tables::EMULATOR_VCPU_EXTRA);
            }
            ThreadKind::Device(d) => {
                v.extend_from_slice(tables::DEVICE_COMMON);
                v.extend_from_slice(match d {
                    Device::Block => tables::BLOCK,
                    Device::Net => tables::NET,
                    Device::Vsock => tables::VSOCK,
                    Device::Balloon => tables::BALLOON,
                    Device::Rng => tables::RNG,
                    Device::Console => tables::VIRTIO_CONSOLE,
                });
            }
            ThreadKind::Control => v.extend_from_slice(tables::CONTROL),
            ThreadKind::Migration => v.extend_from_slice(tables::MIGRATION),
            ThreadKind::Console => v.extend_from_slice(tables::CONSOLE),
            ThreadKind::Main => v.extend_from_slice(tables::MAIN),
            ThreadKind::Supervisor => v.extend_from_slice(tables::SUPERVISOR),
            ThreadKind::Launcher => {
                for k in ThreadKind::ALL.into_iter().filter(|k| k.launchable()) {
                    v.extend(k.allowed());
                }
                v.extend_from_slice(tables::LAUNCHER_EXTRA);
            }
        }
        v
    }

    /// The distinct syscalls this kind may make.
    pub fn syscall_count(self) -> usize {
        let mut nrs: Vec<_> = self.allowed().iter().map(|a| a.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
