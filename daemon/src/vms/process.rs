//! Starting a VM's `vireo run` process (see the parent module for the
//! design): its arguments, the console and input pipes it inherits, and
//! re-adopting the processes an earlier daemon started (their pipes
//! through /proc).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use vireo_api::vm::Accel;

use super::exit::{exit_change, outcome, read_log_tail, Exit};
use super::{lock, snapshots, Boot, Daemon, Proc, ADOPTED_POLL, CONTROL_SOCKET, VM_LOG};
use crate::console::Console;
use crate::db::VmRecord;
use crate::error::ApiError;
use crate::observe::ConsoleTap;
use crate::procfs;

/// Pipe buffer for the console while no daemon reads it.
const CONSOLE_PIPE_SIZE: libc::c_int = 1 << 20;

/// Wait (bounded) for the console pump to read what the VM wrote last.
pub(super) async fn drain(pump: Option<tokio::task::JoinHandle<()>>) {
    if let Some(p) = pump {
        let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
    }
}

pub(super) fn spawn_pump(
    mut rx: tokio::net::unix::pipe::Receiver,
    console: Arc<Console>,
    mut tap: ConsoleTap,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    console.push(&buf[..n]);
                    tap.output(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("console: {e}");
                    break;
                }
            }
        }
        tap.finish();
    })
}

/// Open the console pipe of an adopted VM through /proc/PID/fd/1.
fn reattach_console(pid: i32) -> Option<tokio::net::unix::pipe::Receiver> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/1"));
    if !procfs::is_pipe(&path) {
        tracing::warn!("VM pid {pid}: its stdout is not a pipe; no console");
        return None;
    }
    let opened = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(false)
        .open_receiver(&path);
    match opened {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!("VM pid {pid}: cannot re-attach to its console: {e}");
            None
        }
    }
}

/// Open the console input pipe of an adopted VM through /proc/PID/fd/0.
fn reattach_input(pid: i32) -> Option<tokio::net::unix::pipe::Sender> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/0"));
    if !procfs::is_pipe(&path) {
        tracing::info!(
            "VM pid {pid}: its stdin is not a pipe (started by an older daemon?); no console input"
        );
        return None;
    }
    match tokio::net::unix::pipe::OpenOptions::new().open_sender(&path) {
        Ok(tx) => Some(tx),
        Err(e) => {
            tracing::warn!("VM pid {pid}: cannot re-open its console input: {e}");
            None
        }
    }
}

/// A pipe with both ends close-on-exec: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these fds; each is owned once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Start `vireo run` for `rec` in its own session; returns the child, the
/// read end of its console pipe and the write end of its stdin pipe.
pub(super) fn spawn_vm(
    vmm: &Path,
    dir: &Path,
    rec: &VmRecord,
    boot: &Boot,
    jail_args: &[std::ffi::OsString],
) -> std::io::Result<(
    tokio::process::Child,
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join(VM_LOG))?;
    let (read, write) = pipe()?;
    // SAFETY: fcntl on a valid fd; failure (e.g. above pipe-max-size) is harmless.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CONSOLE_PIPE_SIZE) };
    let (stdin_read, stdin_write) = pipe()?;
    // SAFETY: as above; a bigger buffer lets a paste wait for the guest.
    unsafe {
        libc::fcntl(
            stdin_write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            CONSOLE_PIPE_SIZE,
        )
    };

    let mut cmd = tokio::process::Command::new(vmm);
    cmd.arg("run")
        .args(run_args(dir, rec, boot))
        .args(jail_args);
    cmd
        // The exit reason ("the guest powered off") is logged at info level.
        .env("VIREO_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::from(stdin_read))
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(log))
        .kill_on_drop(false);
    let keep = read.as_raw_fd();
    let keep_in = stdin_write.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setsid() < 0 {
                return fail();
            }
            // Move the stdin pipe's write end out of fd 3's way first.
            let mut keep_in = keep_in;
            if keep_in == 3 {
                keep_in = libc::fcntl(3, libc::F_DUPFD_CLOEXEC, 5);
                if keep_in < 0 {
                    return fail();
                }
            }
            // The console pipe's read end as fd 3 and the stdin pipe's
            // write end as fd 4, open across exec.
            for (fd, target) in [(keep, 3), (keep_in, 4)] {
                if fd == target {
                    if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                        return fail();
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return fail();
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let tx = tokio::net::unix::pipe::Sender::from_owned_fd(stdin_write)?;
    Ok((child, rx, tx))
}

/// `vireo run`'s arguments for `rec` started as `boot`, its control
/// socket in `dir`.
pub(super) fn run_args(dir: &Path, rec: &VmRecord, boot: &Boot) -> Vec<std::ffi::OsString> {
    let c = &rec.config;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut arg = |a: &str, v: &std::ffi::OsStr| {
        args.push(a.into());
        args.push(v.to_owned());
    };
    match boot {
        Boot::Definition => {
            if let Some(image) = &c.image {
                arg("--image", image.as_ref());
            }
            if let Some(kernel) = &c.kernel {
                arg("--kernel", kernel.as_ref());
            }
            if let Some(initrd) = &c.initrd {
                arg("--initrd", initrd.as_ref());
            }
            if let Some(cmdline) = &c.cmdline {
                arg("--cmdline", cmdline.as_ref());
            }
            arg("--cpus", c.vcpus.to_string().as_ref());
            arg("--memory", c.memory_mib.mib().to_string().as_ref());
        }
        // The machine (vCPUs, memory, devices) is the snapshot's.
        Boot::Restore { dir: snap, .. } => arg("--restore", snap.as_os_str()),
        // The VM's own definition, which the source's machine must match.
        Boot::MigrateFrom {
            listen,
            cert,
            key,
            secret_file,
        } => {
            arg("--migrate-from", listen.as_ref());
            arg("--migrate-tls-cert", cert.as_os_str());
            arg("--migrate-tls-key", key.as_os_str());
            arg("--migrate-secret-file", secret_file.as_os_str());
            arg("--cpus", c.vcpus.to_string().as_ref());
            arg("--memory", c.memory_mib.mib().to_string().as_ref());
        }
    }
    arg("--control-socket", dir.join(CONTROL_SOCKET).as_os_str());
    // Its snapshots go only to the VM's own snapshots directory.
    arg(
        "--snapshot-dir-root",
        dir.join(snapshots::SNAPSHOTS).as_os_str(),
    );
    // A clone's qcow2 disk is backed by a snapshot's copy in another VM's
    // directory; backing files may come from the daemon's VM directories
    // (the headers naming them are the daemon's, never a guest's).
    if let Some(vms) = dir.parent() {
        arg("--backing-dir", vms.as_os_str());
    }
    arg(
        "--accel",
        match c.accel {
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
            Accel::Emu => "emu",
        }
        .as_ref(),
    );
    match boot {
        Boot::Definition | Boot::MigrateFrom { .. } => {
            args.extend(c.devices.run_args().into_iter().map(Into::into))
        }
        Boot::Restore {
            lazy, overrides, ..
        } => {
            if *lazy {
                args.push("--restore-lazy".into());
            }
            args.extend(overrides.iter().map(Into::into));
        }
    }
    args
}

impl Daemon {
    /// After a (re)start: adopt VM processes that still run, and mark the
    /// others stopped with the reason. Must run inside the tokio runtime.
    pub fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        let mut inner = lock(&self.inner);
        for rec in inner.db.list()? {
            if !rec.state.is_active() {
                continue;
            }
            match rec.process {
                Some(p) if procfs::is_same_process(p.pid, p.start_time) => {
                    tracing::info!("re-adopting VM {} (pid {})", rec.name, p.pid);
                    let console = Console::new();
                    inner
                        .consoles
                        .insert(rec.name.clone(), Arc::clone(&console));
                    inner.procs.insert(rec.name.clone(), Proc::new(p));
                    if let Some(tx) = reattach_input(p.pid) {
                        console.attach_input(tx);
                    }
                    let console = reattach_console(p.pid)
                        .map(|rx| spawn_pump(rx, console, self.observe.console_tap(&rec.name)));
                    let me = Arc::clone(self);
                    let name = rec.name.clone();
                    tokio::spawn(async move {
                        while procfs::is_same_process(p.pid, p.start_time) {
                            tokio::time::sleep(ADOPTED_POLL).await;
                        }
                        drain(console).await;
                        me.on_exit(&name, p, Exit::Unknown);
                    });
                }
                _ => {
                    let log = read_log_tail(&self.vm_dir(&rec.name));
                    let mut o = outcome(Exit::Unknown, None, &log);
                    o.reason = format!("{} (found gone when the daemon restarted)", o.reason);
                    tracing::info!("VM {}: {}", rec.name, o.reason);
                    inner.db.set_exited(&rec.name, o.state, &o.reason)?;
                    self.observe
                        .vm(&rec.name, exit_change(o.state), Some(o.state), &o.reason);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_api::model::VmState;

    /// The target of a migration runs the VM's own definition: vCPUs,
    /// memory and every device flag (as a boot does), plus the secret;
    /// no kernel (it is in the source's memory).
    #[test]
    fn a_migration_target_gets_the_vms_own_definition_and_the_secret() {
        let rec = VmRecord {
            name: "m".into(),
            config: vireo_api::model::VmConfig {
                vcpus: 2,
                memory_mib: vireo_api::units::MemorySize::mib_const(512),
                kernel: Some("/k".into()),
                initrd: None,
                cmdline: None,
                image: None,
                accel: Accel::Emu,
                devices: vireo_api::model::Devices {
                    disks: vec!["path=/srv/m.raw,format=raw".into()],
                    nets: vec!["tap=t0,mac=52:54:00:00:00:01".into()],
                    vsock: None,
                    rng: Some(String::new()),
                    balloon: None,
                },
            },
            created_at: 0,
            state: VmState::Stopped,
            process: None,
            started_at: None,
            last_exit: None,
            last_exit_at: None,
        };
        let boot = Boot::MigrateFrom {
            listen: "tcp:10.0.0.1:0".into(),
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            secret_file: "/vms/m/migrate-secret".into(),
        };
        let args: Vec<String> = run_args(Path::new("/vms/m"), &rec, &boot)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for want in [
            "--migrate-from tcp:10.0.0.1:0",
            "--migrate-secret-file /vms/m/migrate-secret",
            "--cpus 2",
            "--memory 512",
            "--disk=path=/srv/m.raw,format=raw",
            "--net=tap=t0,mac=52:54:00:00:00:01",
            "--rng",
        ] {
            assert!(line.contains(want), "{want:?} missing: {line}");
        }
        assert!(!line.contains("--kernel"), "{line}");
    }
}
