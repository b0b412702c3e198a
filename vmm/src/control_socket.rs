//! The control socket of a running VM (`vireo run --control-socket PATH`):
//! how a supervisor such as the daemon pauses, resumes and queries a VM
//! that runs in another process.
//!
//! Protocol: a client connects, writes one command line (`pause`, `resume`,
//! `power-button`, `reset`, `status`, `balloon [MIB]` or `stats`) and reads
//! one JSON line back: `{"ok":true,"state":"paused"}` or
//! `{"ok":false,"error":"..."}`. `stats` adds the VM's counters:
//! `"stats":{"vcpus":[{"exits":N}],
//! "disks":[{"id","read_bytes","write_bytes","read_ops","write_ops"}],
//! "nets":[{"id","rx_bytes","tx_bytes","rx_packets","tx_packets"}]}`.
//! `snapshot [--paused] DIR` pauses the VM, writes a snapshot to DIR
//! (see `vireo run --restore`) and resumes it unless `--paused` is given
//! or it was paused before; it answers
//! `"snapshot":{"dir","memory_bytes","pause_ms"}` (plus `"diff":true,
//! "parent","pages"` for `snapshot --diff DIR`, which writes only the pages
//! written since this process's previous snapshot and records it as the
//! parent; `vireo run --restore` follows the chain).
//! `migrate-to unix:PATH|tcp:HOST:PORT [--ca CA.pem] [--secret-file FILE] [--cert C.pem --key K.pem] [--downtime-ms N] [--postcopy [--postcopy-bandwidth RATE]]` live-migrates
//! the VM to a `vireo run --migrate-from` target (pre-copy, then a short
//! pause; `tcp:` is always TLS and needs `--ca`; `--secret-file` sends the
//! target's one-time secret, `--cert`/`--key` a client certificate); on success it answers `"state":"migrated","migration":{"total_ms",
//! "downtime_ms","bytes_sent","rounds","pages_sent"}` and this process
//! exits 0; on failure the VM keeps running here and the reply is an error.
//! Commands are carried out on the thread that owns the running VM (`stats`
//! only reads the counters' atomics: it never stops a vCPU or a device).
//!
//! The socket is created mode 0600 (its inode's mode is set before bind, so
//! there is no moment when others may connect): whoever connects may
//! snapshot the guest's memory. `snapshot DIR` writes only to a new
//! directory whose parent is a real directory (not reached through a
//! symlink), outside the system's directories ([`FORBIDDEN_ROOTS`]), and
//! beneath `--snapshot-dir-root` when given (the daemon passes its VM's
//! snapshots directory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use vireo_api::control::{Command, Reply};
use vireo_sandbox::seccomp::{self, ThreadKind};

/// A command waiting for the VM's thread, with where to send the reply.
pub struct Pending {
    pub command: Command,
    pub reply: Sender<String>,
}

/// Where `snapshot DIR` never writes, whatever the root.
pub const FORBIDDEN_ROOTS: &[&str] = &["/proc", "/sys", "/dev", "/etc", "/boot", "/usr"];

/// Check the directory `snapshot DIR` is to create: it must not exist; its
/// parent must exist and be a directory reached through no symlink; not
/// under [`FORBIDDEN_ROOTS`]; beneath `root` when given. Returns it absolute.
pub fn check_snapshot_dir(dir: &Path, root: Option<&Path>) -> Result<PathBuf, String> {
    use std::path::Component;
    let shown = dir.display();
    let abs = std::path::absolute(dir).map_err(|e| format!("snapshot to {shown}: {e}"))?;
    if abs
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "snapshot to {shown}: give a path without '.' or '..'"
        ));
    }
    let (Some(parent), Some(_)) = (abs.parent(), abs.file_name()) else {
        return Err(format!("snapshot to {shown}: give a new directory, not /"));
    };
    match std::fs::symlink_metadata(&abs) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(_) => {
            return Err(format!(
                "snapshot to {shown}: it already exists; give a new directory (snapshots are not written into existing ones)"
            ))
        }
        Err(e) => return Err(format!("snapshot to {shown}: {e}")),
    }
    let real = std::fs::canonicalize(parent).map_err(|e| {
        format!(
            "snapshot to {shown}: its parent {} must be an existing directory: {e}",
            parent.display()
        )
    })?;
    if real != parent || !real.is_dir() {
        return Err(format!(
            "snapshot to {shown}: its parent {} must be a real directory, not reached through a symlink (it is {})",
            parent.display(),
            real.display()
        ));
    }
    if real == Path::new("/") {
        return Err(format!("snapshot to {shown}: not directly under /"));
    }
    if let Some(bad) = FORBIDDEN_ROOTS.iter().find(|r| real.starts_with(r)) {
        return Err(format!(
            "snapshot to {shown}: not under {bad}; snapshots go to a data directory"
        ));
    }
    if let Some(root) = root {
        let root_real = std::fs::canonicalize(root).map_err(|e| {
            format!(
                "snapshot to {shown}: --snapshot-dir-root {}: {e}",
                root.display()
            )
        })?;
        if !real.starts_with(&root_real) {
            return Err(format!(
                "snapshot to {shown}: must be beneath --snapshot-dir-root {}",
                root.display()
            ));
        }
    }
    Ok(abs)
}

/// Bind a Unix socket at `path` whose file is mode 0600 from the start:
/// the socket inode's mode is set (fchmod) before bind, which gives the
/// file that mode (less the umask); a chmod after bind makes it exact.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is too long for a Unix socket path (at most {} bytes)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: fchmod on our own socket fd.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// The listening socket; removes its file when dropped.
pub struct ControlSocket {
    path: PathBuf,
    pub commands: Receiver<Pending>,
    /// Commands taken but not yet answered on their connection.
    in_flight: Arc<AtomicUsize>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // A command that ended the VM (power-button) is answered by the
        // socket thread; give it a moment to write before the process exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.in_flight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Bind `path` (replacing a stale socket file), mode 0600, and serve
/// clients on a background thread; `snapshot DIR` must lie beneath
/// `snapshot_root` when given.
pub fn listen(path: &Path, snapshot_root: Option<&Path>) -> std::io::Result<ControlSocket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = bind_private(path)?;
    let snapshot_root = snapshot_root.map(Path::to_path_buf);
    let (tx, rx) = mpsc::channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counter = in_flight.clone();
    seccomp::spawn(
        ThreadKind::Control,
        std::thread::Builder::new().name("control".into()),
        move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => serve(s, &tx, &counter, snapshot_root.as_deref()),
                    Err(e) => tracing::warn!("control socket: accept failed: {e}"),
                }
            }
        },
    )?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
        commands: rx,
        in_flight,
    })
}

/// The longest command line: `migrate-to` names up to four files (CA,
/// secret, client certificate and key), each a path.
const MAX_LINE: u64 = 4096;

/// One client, one command. Bounded line length and a read timeout, so a
/// client that sends nothing or too much cannot wedge the socket.
fn serve(
    stream: UnixStream,
    commands: &Sender<Pending>,
    in_flight: &AtomicUsize,
    snapshot_root: Option<&Path>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    let read = BufReader::new(stream).take_line(&mut line, MAX_LINE);
    let mut counted = false;
    let mut command = read.ok().and_then(|_| Command::parse(&line));
    // Where a snapshot may go is checked here, before the VM pauses.
    let mut refused: Option<String> = None;
    if let Some(Command::Snapshot { dir, .. }) = &mut command {
        match check_snapshot_dir(dir, snapshot_root) {
            Ok(abs) => *dir = abs,
            Err(e) => {
                tracing::warn!("control socket: refused: {e}");
                refused = Some(Reply::error(e).encode());
            }
        }
    }
    let reply = match (refused, command) {
        (Some(r), _) => r,
        (None, None) => Reply::error(
            "unknown command; send one of: pause, resume, power-button, reset, status, balloon [MIB], stats, snapshot [--paused] [--diff] DIR, migrate-to unix:PATH|tcp:HOST:PORT [--ca CA.pem] [--secret-file FILE] [--cert C.pem --key K.pem] [--downtime-ms N] [--postcopy [--postcopy-bandwidth RATE]]",
        )
        .encode(),
        (None, Some(command)) => {
            // Writing a snapshot of a big guest takes a while.
            let wait = if matches!(command, Command::Snapshot { .. } | Command::MigrateTo(_)) {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(10)
            };
            let (reply_tx, reply_rx) = mpsc::channel();
            in_flight.fetch_add(1, Ordering::AcqRel);
            counted = true;
            if commands
                .send(Pending {
                    command,
                    reply: reply_tx,
                })
                .is_err()
            {
                Reply::error("the VM has exited").encode()
            } else {
                reply_rx
                    .recv_timeout(wait)
                    .unwrap_or_else(|_| Reply::error("the VM did not answer in time").encode())
            }
        }
    };
    let _ = writeln!(writer, "{reply}");
    if counted {
        in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

trait TakeLine {
    fn take_line(self, line: &mut String, max: u64) -> std::io::Result<usize>;
}

impl<R: std::io::Read> TakeLine for BufReader<R> {
    fn take_line(self, line: &mut String, max: u64) -> std::io::Result<usize> {
        std::io::Read::take(self, max).read_line(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn try_ask(path: &Path, line: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(path)?;
        s.write_all(line.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    fn ask(path: &Path, line: &str) -> String {
        try_ask(path, line).unwrap()
    }

    #[test]
    fn commands_reach_the_owner_and_replies_come_back() {
        let path = std::env::temp_dir().join(format!("vireo-ctl-test-{}.sock", std::process::id()));
        let sock = listen(&path, None).unwrap();
        let owner = std::thread::spawn(move || {
            for _ in 0..2 {
                let p = sock.commands.recv().unwrap();
                let reply = match p.command {
                    Command::Pause => Reply::ok("paused").encode(),
                    other => Reply::error(format!("no {other:?}")).encode(),
                };
                p.reply.send(reply).unwrap();
            }
            sock
        });
        assert_eq!(
            ask(&path, "pause\n"),
            "{\"ok\":true,\"state\":\"paused\"}\n"
        );
        assert!(ask(&path, "status\n").contains("\"ok\":false"));
        assert!(ask(&path, "reboot now\n").contains("unknown command"));
        assert!(ask(&path, "balloon lots\n").contains("unknown command"));
        // An oversize line is refused; the server may close before reading
        // it all (the client then sees a reset), but it keeps serving.
        if let Ok(reply) = try_ask(&path, &"x".repeat(10_000)) {
            assert!(reply.contains("unknown command"), "{reply}");
        }
        assert!(ask(&path, "what\n").contains("unknown command"));
        drop(owner.join().unwrap());
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn the_socket_is_private_whatever_the_umask() {
        let path = std::env::temp_dir().join(format!("vireo-ctl-mode-{}.sock", std::process::id()));
        // SAFETY: umask only sets the process's mask; restored below.
        let old = unsafe { libc::umask(0) };
        let sock = listen(&path, None);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let sock = sock.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        drop(sock);
    }

    #[test]
    fn snapshot_dirs_outside_allowed_places_are_refused() {
        let base = std::env::temp_dir().join(format!("vireo-ctl-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("root/vm")).unwrap();
        std::fs::create_dir_all(base.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(base.join("root"), base.join("link")).unwrap();
        let ok = base.join("root/vm/snap1");
        assert_eq!(check_snapshot_dir(&ok, None), Ok(ok.clone()));
        assert_eq!(
            check_snapshot_dir(&ok, Some(&base.join("root"))),
            Ok(ok.clone())
        );
        let refused = |dir: &Path, root: Option<&Path>, needle: &str| {
            let e = check_snapshot_dir(dir, root).unwrap_err();
            assert!(
                e.contains(needle),
                "{}: {e:?} lacks {needle:?}",
                dir.display()
            );
        };
        refused(&base.join("root/vm"), None, "already exists");
        refused(
            &base.join("nope/snap"),
            None,
            "must be an existing directory",
        );
        refused(&base.join("link/snap"), None, "symlink");
        refused(&base.join("root/../elsewhere/s"), None, "'..'");
        refused(
            &base.join("elsewhere/s"),
            Some(&base.join("root")),
            "--snapshot-dir-root",
        );
        refused(Path::new("/etc/vireo-snap"), None, "/etc");
        refused(Path::new("/proc/self/snap"), None, "/proc");
        refused(Path::new("/usr/lib/vireo-snap"), None, "/usr");
        refused(Path::new("/snap-at-root"), None, "/");
        // Through the socket: refused before the VM is asked.
        let path = base.join("ctl.sock");
        let sock = listen(&path, Some(&base.join("root"))).unwrap();
        let reply = ask(
            &path,
            &format!("snapshot {}\n", base.join("elsewhere/s").display()),
        );
        assert!(reply.contains("--snapshot-dir-root"), "{reply}");
        assert!(sock.commands.try_recv().is_err(), "the VM was asked");
        drop(sock);
        let _ = std::fs::remove_dir_all(&base);
    }
}
