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
//! `migrate-to tcp:HOST:PORT [--ca CA.pem] [--downtime-ms N] [--postcopy [--postcopy-bandwidth RATE]]` live-migrates
//! the VM to a `vireo run --migrate-from` target (pre-copy, then a short
//! pause); on success it answers `"state":"migrated","migration":{"total_ms",
//! "downtime_ms","bytes_sent","rounds","pages_sent"}` and this process
//! exits 0; on failure the VM keeps running here and the reply is an error.
//! Commands are carried out on the thread that owns the running VM (`stats`
//! only reads the counters' atomics: it never stops a vCPU or a device).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use vireo_sandbox::seccomp::{self, ThreadKind};

/// A command from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    /// Press the ACPI power button (a graceful shutdown request).
    PowerButton,
    /// Hard reset: end the VM with "reset" (a supervisor starts it again).
    Reset,
    Status,
    /// `balloon` reports the balloon; `balloon N` sets its target to N MiB.
    Balloon(Option<u64>),
    /// The VM's counters (vCPU exits, disk and network I/O).
    Stats,
    /// `snapshot [--paused] DIR`: pause, write a snapshot to DIR, resume
    /// (unless `--paused` or the VM was paused already).
    Snapshot {
        dir: std::path::PathBuf,
        stay_paused: bool,
        /// `--diff`: only the pages written since this process's last
        /// snapshot, with that one recorded as the parent.
        diff: bool,
    },
    /// `migrate-to tcp:HOST:PORT [--ca CA.pem] [--downtime-ms N] [--postcopy [--postcopy-bandwidth RATE]]`: live
    /// migration to a `vireo run --migrate-from` (see [`crate::migrate`]).
    MigrateTo(crate::migrate::MigrateTo),
}

impl Command {
    pub fn parse(line: &str) -> Option<Command> {
        match line.trim() {
            "pause" => Some(Command::Pause),
            "resume" => Some(Command::Resume),
            "power-button" => Some(Command::PowerButton),
            "reset" => Some(Command::Reset),
            "status" => Some(Command::Status),
            "balloon" => Some(Command::Balloon(None)),
            "stats" => Some(Command::Stats),
            other => {
                if let Some(rest) = other.strip_prefix("migrate-to ") {
                    return crate::migrate::MigrateTo::parse(rest).map(Command::MigrateTo);
                }
                if let Some(rest) = other.strip_prefix("snapshot ") {
                    let mut rest = rest.trim();
                    let (mut stay_paused, mut diff) = (false, false);
                    loop {
                        if let Some(r) = rest.strip_prefix("--paused ") {
                            stay_paused = true;
                            rest = r.trim_start();
                        } else if let Some(r) = rest.strip_prefix("--diff ") {
                            diff = true;
                            rest = r.trim_start();
                        } else {
                            break;
                        }
                    }
                    if rest.is_empty() || rest.starts_with("--") {
                        return None;
                    }
                    return Some(Command::Snapshot {
                        dir: rest.into(),
                        stay_paused,
                        diff,
                    });
                }
                let mib = other.strip_prefix("balloon ")?.trim().parse().ok()?;
                Some(Command::Balloon(Some(mib)))
            }
        }
    }
}

/// A command waiting for the VM's thread, with where to send the reply.
pub struct Pending {
    pub command: Command,
    pub reply: Sender<String>,
}

pub fn ok_reply(state: &str) -> String {
    format!(
        "{{\"ok\":true,\"state\":{}}}",
        serde_json::Value::from(state)
    )
}

/// An ok reply with more fields (a JSON object's members) beside the state.
pub fn ok_reply_with(state: &str, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({"ok": true, "state": state});
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v.to_string()
}

pub fn error_reply(message: &str) -> String {
    format!(
        "{{\"ok\":false,\"error\":{}}}",
        serde_json::Value::from(message)
    )
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

/// Bind `path` (replacing a stale socket file) and serve clients on a
/// background thread.
pub fn listen(path: &Path) -> std::io::Result<ControlSocket> {
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
    let listener = UnixListener::bind(path)?;
    let (tx, rx) = mpsc::channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counter = in_flight.clone();
    seccomp::spawn(
        ThreadKind::Control,
        std::thread::Builder::new().name("control".into()),
        move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => serve(s, &tx, &counter),
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

/// One client, one command. Bounded line length and a read timeout, so a
/// client that sends nothing or too much cannot wedge the socket.
fn serve(stream: UnixStream, commands: &Sender<Pending>, in_flight: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    let read = BufReader::new(stream).take_line(&mut line, 256);
    let mut counted = false;
    let reply = match read.ok().and_then(|_| Command::parse(&line)) {
        None => error_reply(
            "unknown command; send one of: pause, resume, power-button, reset, status, balloon [MIB], stats, snapshot [--paused] [--diff] DIR, migrate-to tcp:HOST:PORT [--ca CA.pem] [--downtime-ms N] [--postcopy [--postcopy-bandwidth RATE]]",
        ),
        Some(command) => {
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
                error_reply("the VM has exited")
            } else {
                reply_rx
                    .recv_timeout(wait)
                    .unwrap_or_else(|_| error_reply("the VM did not answer in time"))
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
    fn balloon_commands_parse() {
        assert_eq!(Command::parse("balloon"), Some(Command::Balloon(None)));
        assert_eq!(
            Command::parse("balloon 128\n"),
            Some(Command::Balloon(Some(128)))
        );
        assert_eq!(Command::parse("balloon -1"), None);
        assert_eq!(Command::parse("reset\n"), Some(Command::Reset));
        assert_eq!(Command::parse("stats\n"), Some(Command::Stats));
        assert_eq!(Command::parse("stats now"), None);
        assert_eq!(
            Command::parse("snapshot /tmp/a b\n"),
            Some(Command::Snapshot {
                dir: "/tmp/a b".into(),
                stay_paused: false,
                diff: false
            })
        );
        assert_eq!(
            Command::parse("snapshot --paused /s"),
            Some(Command::Snapshot {
                dir: "/s".into(),
                stay_paused: true,
                diff: false
            })
        );
        assert_eq!(
            Command::parse("snapshot --diff --paused /d"),
            Some(Command::Snapshot {
                dir: "/d".into(),
                stay_paused: true,
                diff: true
            })
        );
        assert_eq!(Command::parse("snapshot --diff"), None);
        assert_eq!(Command::parse("snapshot --paused --diff"), None);
        assert_eq!(
            Command::parse("migrate-to tcp:10.0.0.2:4444 --downtime-ms 100"),
            Some(Command::MigrateTo(crate::migrate::MigrateTo {
                uri: "tcp:10.0.0.2:4444".into(),
                ca: None,
                downtime_ms: 100,
                postcopy: false,
                postcopy_bandwidth: None,
            }))
        );
        assert_eq!(
            Command::parse("migrate-to tcp:h:1 --postcopy --postcopy-bandwidth 64K"),
            Some(Command::MigrateTo(crate::migrate::MigrateTo {
                uri: "tcp:h:1".into(),
                ca: None,
                downtime_ms: crate::migrate::DEFAULT_DOWNTIME_MS,
                postcopy: true,
                postcopy_bandwidth: Some(64 << 10),
            }))
        );
        assert_eq!(Command::parse("migrate-to"), None);
        assert_eq!(Command::parse("snapshot"), None);
        assert_eq!(Command::parse("snapshot   "), None);
        let r = ok_reply_with("running", serde_json::json!({"balloon": {"actual_mib": 3}}));
        assert_eq!(
            r,
            r#"{"balloon":{"actual_mib":3},"ok":true,"state":"running"}"#
        );
    }

    #[test]
    fn commands_reach_the_owner_and_replies_come_back() {
        let path = std::env::temp_dir().join(format!("vireo-ctl-test-{}.sock", std::process::id()));
        let sock = listen(&path).unwrap();
        let owner = std::thread::spawn(move || {
            for _ in 0..2 {
                let p = sock.commands.recv().unwrap();
                let reply = match p.command {
                    Command::Pause => ok_reply("paused"),
                    other => error_reply(&format!("no {other:?}")),
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
}
