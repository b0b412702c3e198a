//! vCPU threads: each vCPU runs on its own thread, dispatching port and MMIO
//! exits to the buses until the VM exits.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;

use vireo_hypervisor::{Vcpu, VcpuExit};
use vireo_sandbox::seccomp::{self, ThreadKind};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::control::{ExitReason, VmControl};

/// The signal that kicks a vCPU thread out of the guest.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone interrupts KVM_RUN with EINTR.
}

/// Install the kick handler once per process (the default action of a
/// real-time signal would kill the process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from);
    });
    result
}

/// The buses a vCPU dispatches to.
#[derive(Clone)]
pub struct Buses {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// Per-vCPU exit counters, written by the vCPU threads with relaxed atomic
/// adds (one per exit, no lock) and read by whoever reports them.
#[derive(Debug)]
pub struct VcpuStats {
    exits: Box<[AtomicU64]>,
}

impl VcpuStats {
    pub fn new(vcpus: usize) -> VcpuStats {
        VcpuStats {
            exits: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Count one exit of vCPU `id` (ids past the end are ignored).
    pub fn count_exit(&self, id: u32) {
        if let Some(c) = self.exits.get(id as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exits of each vCPU so far, in vCPU order.
    pub fn exits(&self) -> Vec<u64> {
        self.exits
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    pub id: u32,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    pub fn kick(&self) {
        // A thread that already exited cannot be signalled; that is fine.
        let _ = self.handle.kill(kick_signal());
    }

    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("vCPU {} thread panicked", self.id);
        }
    }
}

/// A vCPU shared by its thread (which holds the lock while it runs the
/// guest and handles an exit) and whoever saves its state while the VM is
/// paused (the thread then waits in [`VmControl::checkpoint_with`] without
/// the lock).
pub type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

pub fn lock_vcpu(vcpu: &SharedVcpu) -> MutexGuard<'_, Box<dyn Vcpu>> {
    vcpu.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn spawn(
    vcpu: SharedVcpu,
    buses: Buses,
    control: Arc<VmControl>,
    stats: Arc<VcpuStats>,
) -> std::io::Result<VcpuThread> {
    let (id, kind) = {
        let v = lock_vcpu(&vcpu);
        let kind = if v.generates_host_code() {
            ThreadKind::EmulatorVcpu
        } else {
            ThreadKind::Vcpu
        };
        (v.id(), kind)
    };
    // The filter is installed before the thread's first guest instruction.
    let handle = seccomp::spawn(
        kind,
        std::thread::Builder::new().name(format!("vcpu{id}")),
        move || run_loop(&vcpu, &buses, &control, &stats),
    )?;
    Ok(VcpuThread { id, handle })
}

/// Log each unknown port or MMIO address once, not on every access.
#[derive(Default)]
struct UnknownAccessLog {
    seen: HashSet<(bool, u64)>,
}

impl UnknownAccessLog {
    fn note(&mut self, vcpu: u32, mmio: bool, addr: u64, write: bool) {
        if self.seen.len() < 1024 && self.seen.insert((mmio, addr)) {
            let what = if mmio { "MMIO address" } else { "I/O port" };
            let dir = if write { "write to" } else { "read from" };
            tracing::info!("vCPU {vcpu}: {dir} unhandled {what} {addr:#x} (reads return all ones)");
        }
    }
}

fn run_loop(vcpu: &SharedVcpu, buses: &Buses, control: &VmControl, stats: &VcpuStats) {
    let id = lock_vcpu(vcpu).id();
    let mut unknown = UnknownAccessLog::default();
    loop {
        // Before parking for a pause, finish an instruction that waits on
        // data we already handed over, so a snapshot sees a whole state.
        let mut quiesce = || {
            let mut v = lock_vcpu(vcpu);
            for _ in 0..64 {
                match v.complete_pending_io() {
                    Ok(None) => return,
                    Ok(Some(exit)) => {
                        if dispatch(id, exit, buses, control, &mut unknown) {
                            let rip = v.regs().ok().map(|r| r.rip);
                            control.request_exit(ExitReason::TripleFault { vcpu: id, rip });
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("vCPU {id}: completing pending I/O before a pause: {e}");
                        return;
                    }
                }
            }
        };
        if !control.checkpoint_with(&mut quiesce) {
            break;
        }
        let mut guard = lock_vcpu(vcpu);
        let exit = match guard.run() {
            Ok(exit) => exit,
            Err(e) => {
                control.request_exit(ExitReason::Failed(format!("vCPU {id}: {e}")));
                break;
            }
        };
        stats.count_exit(id);
        if dispatch(id, exit, buses, control, &mut unknown) {
            let rip = guard.regs().ok().map(|r| r.rip);
            control.request_exit(ExitReason::TripleFault { vcpu: id, rip });
        }
    }
    tracing::debug!("vCPU {id} thread done");
}

/// Carry out one exit; true for a shutdown (triple fault), which the
/// caller reports with the vCPU's RIP.
fn dispatch(
    id: u32,
    exit: VcpuExit<'_>,
    buses: &Buses,
    control: &VmControl,
    unknown: &mut UnknownAccessLog,
) -> bool {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.io.read(u64::from(port), data) {
                data.fill(0xff);
                unknown.note(id, false, u64::from(port), false);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.io.write(u64::from(port), data) {
                unknown.note(id, false, u64::from(port), true);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                unknown.note(id, true, addr, false);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                unknown.note(id, true, addr, true);
            }
        }
        VcpuExit::Interrupted => {}
        VcpuExit::Shutdown => return true,
        VcpuExit::Reset => control.request_exit(ExitReason::Reset),
        VcpuExit::PowerOff => control.request_exit(ExitReason::PowerOff),
        VcpuExit::Halt => {
            // Only backends without an interrupt controller report HLT;
            // with nothing to wake the vCPU it would stop forever.
            control.request_exit(ExitReason::Failed(format!(
                "vCPU {id} halted with interrupts it can never receive"
            )));
        }
        VcpuExit::InternalError(why) => {
            control.request_exit(ExitReason::Failed(format!("vCPU {id}: {why}")));
        }
        VcpuExit::Unknown(what) => {
            tracing::warn!("vCPU {id}: ignoring unexpected exit {what}");
        }
    }
    false
}

impl VcpuThread {
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_per_vcpu() {
        let s = VcpuStats::new(2);
        s.count_exit(1);
        s.count_exit(1);
        s.count_exit(0);
        s.count_exit(7);
        assert_eq!(s.exits(), vec![1, 2]);
    }
}
