//! SIGTERM, SIGINT and SIGHUP stop the VM cleanly: the vCPUs are stopped,
//! the terminal restored, and vireo exits 0 (a supervisor such as the daemon
//! uses SIGTERM to stop a VM).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use vireo_sandbox::seccomp::{self, ThreadKind};
use vireo_vmcore::{ExitReason, VmControl};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

/// The eventfd the handler writes to (-1 until installed).
static STOP_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 and
        // the eventfd stays open for the life of the process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Stop the VM when the process gets SIGTERM, SIGINT or SIGHUP.
pub fn stop_vm_on_signals(control: Arc<VmControl>) -> std::io::Result<()> {
    let event = EventFd::new(0)?;
    STOP_EVENT_FD.store(event.as_raw_fd(), Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        register_signal_handler(signal, on_stop_signal).map_err(std::io::Error::from)?;
    }
    seccomp::spawn(
        ThreadKind::Console,
        std::thread::Builder::new().name("signals".into()),
        move || loop {
            match event.read() {
                Ok(_) => {
                    tracing::info!("stop signal received: stopping the VM");
                    control.request_exit(ExitReason::Stopped);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("signal watcher failed: {e}");
                    return;
                }
            }
        },
    )?;
    Ok(())
}
