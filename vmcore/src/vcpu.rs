//! vCPU threads: each vCPU runs on its own thread, dispatching port and MMIO
//! exits to the buses until the VM exits.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use vireo_hypervisor::{Vcpu, VcpuExit};
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

pub fn spawn(
    mut vcpu: Box<dyn Vcpu>,
    buses: Buses,
    control: Arc<VmControl>,
    stats: Arc<VcpuStats>,
) -> std::io::Result<VcpuThread> {
    let id = vcpu.id();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run_loop(vcpu.as_mut(), &buses, &control, &stats))?;
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

fn run_loop(vcpu: &mut dyn Vcpu, buses: &Buses, control: &VmControl, stats: &VcpuStats) {
    let id = vcpu.id();
    let mut unknown = UnknownAccessLog::default();
    while control.checkpoint() {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                control.request_exit(ExitReason::Failed(format!("vCPU {id}: {e}")));
                break;
            }
        };
        stats.count_exit(id);
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
            VcpuExit::Shutdown => {
                let rip = vcpu.regs().ok().map(|r| r.rip);
                control.request_exit(ExitReason::TripleFault { vcpu: id, rip });
            }
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
    }
    tracing::debug!("vCPU {id} thread done");
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
