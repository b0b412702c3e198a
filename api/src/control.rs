//! The control socket of a VM process (`vireo run --control-socket`): the
//! commands a supervisor (the daemon) sends and the replies it reads back,
//! as types with one encoding each side uses.
//!
//! The wire format: one command line (`pause`, `resume`, `power-button`,
//! `reset`, `status`, `balloon [MIB]`, `stats`, `snapshot [--paused]
//! [--diff] DIR`, `migrate-to ADDR [options]`), then one JSON line back:
//! `{"ok":true,"state":"paused",...}` or `{"ok":false,"error":"..."}`, with
//! the command's own member (`stats`, `balloon`, `snapshot`, `migration`).
//! Paths travel as words: they may not hold whitespace.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::devices::rate::parse_rate;
use crate::model::{BalloonStatus, SnapshotDisk};

/// The longest pause a live migration aims for unless told otherwise.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// A command to a VM process.
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
    /// `snapshot [--paused] [--diff] DIR`: pause, write a snapshot to DIR,
    /// resume (unless `--paused` or the VM was paused already).
    Snapshot {
        dir: PathBuf,
        stay_paused: bool,
        /// `--diff`: only the pages written since this process's last
        /// snapshot, with that one recorded as the parent.
        diff: bool,
    },
    /// `migrate-to ADDR [...]`: live migration to a `vireo run
    /// --migrate-from` target.
    MigrateTo(MigrateTo),
}

/// Where and how to migrate: `ADDR [--ca CA.pem] [--secret-file FILE]
/// [--cert C.pem --key K.pem] [--downtime-ms N] [--postcopy
/// [--postcopy-bandwidth RATE]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateTo {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub uri: String,
    /// CA certificate (PEM) to verify the target's TLS certificate:
    /// required for `tcp:` (always TLS), refused for `unix:`.
    pub ca: Option<PathBuf>,
    /// The one-time secret the target expects (a file: never on a
    /// command line).
    pub secret_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for a target that checks them
    /// (`--migrate-client-ca`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub downtime_ms: u64,
    /// Switch to post-copy after the first full copy.
    pub postcopy: bool,
    /// Post-copy: the most bytes per second the background push may take
    /// (pages the target asks for are never held back).
    pub postcopy_bandwidth: Option<u64>,
}

impl MigrateTo {
    /// A migration to `uri` with the defaults.
    pub fn new(uri: &str) -> MigrateTo {
        MigrateTo {
            uri: uri.to_string(),
            ca: None,
            secret_file: None,
            cert: None,
            key: None,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            postcopy: false,
            postcopy_bandwidth: None,
        }
    }

    /// The words after `migrate-to` (RATE in bytes per second with an
    /// optional K/M/G suffix).
    pub fn parse(args: &str) -> Option<MigrateTo> {
        let mut words = args.split_whitespace();
        let mut m = MigrateTo::new(words.next()?);
        while let Some(w) = words.next() {
            match w {
                "--postcopy" => m.postcopy = true,
                "--postcopy-bandwidth" => {
                    m.postcopy_bandwidth = Some(parse_rate(words.next()?).ok()?)
                }
                "--ca" => m.ca = Some(words.next()?.into()),
                "--secret-file" => m.secret_file = Some(words.next()?.into()),
                "--cert" => m.cert = Some(words.next()?.into()),
                "--key" => m.key = Some(words.next()?.into()),
                "--downtime-ms" => m.downtime_ms = words.next()?.parse().ok()?,
                _ => return None,
            }
        }
        Some(m)
    }
}

impl fmt::Display for MigrateTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)?;
        for (flag, path) in [
            ("--ca", &self.ca),
            ("--secret-file", &self.secret_file),
            ("--cert", &self.cert),
            ("--key", &self.key),
        ] {
            if let Some(p) = path {
                write!(f, " {flag} {}", p.display())?;
            }
        }
        if self.downtime_ms != DEFAULT_DOWNTIME_MS {
            write!(f, " --downtime-ms {}", self.downtime_ms)?;
        }
        if self.postcopy {
            f.write_str(" --postcopy")?;
        }
        if let Some(bw) = self.postcopy_bandwidth {
            write!(f, " --postcopy-bandwidth {bw}")?;
        }
        Ok(())
    }
}

impl Command {
    /// Parse one command line (without its newline).
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
                    return MigrateTo::parse(rest).map(Command::MigrateTo);
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

/// The command line (without its newline) that [`Command::parse`] reads.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Pause => f.write_str("pause"),
            Command::Resume => f.write_str("resume"),
            Command::PowerButton => f.write_str("power-button"),
            Command::Reset => f.write_str("reset"),
            Command::Status => f.write_str("status"),
            Command::Balloon(None) => f.write_str("balloon"),
            Command::Balloon(Some(mib)) => write!(f, "balloon {mib}"),
            Command::Stats => f.write_str("stats"),
            Command::Snapshot {
                dir,
                stay_paused,
                diff,
            } => {
                f.write_str("snapshot ")?;
                if *stay_paused {
                    f.write_str("--paused ")?;
                }
                if *diff {
                    f.write_str("--diff ")?;
                }
                write!(f, "{}", dir.display())
            }
            Command::MigrateTo(m) => write!(f, "migrate-to {m}"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub exits: u64,
}

/// One disk's counters since the VM process started, as `vireo run`'s
/// `stats` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskStats {
    /// The disk's id= (default: the image file's stem).
    pub id: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// One network device's counters since the VM process started (frame
/// bytes, without the virtio header).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetStats {
    /// The device's id=, else its TAP name.
    pub id: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// The `stats` member of a `vireo run` control socket reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    #[serde(default)]
    pub vcpus: Vec<VcpuStats>,
    #[serde(default)]
    pub disks: Vec<DiskStats>,
    #[serde(default)]
    pub nets: Vec<NetStats>,
}

/// What `migrate-to` measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct MigrationStats {
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub bytes_sent: u64,
    pub rounds: u64,
    pub pages_sent: u64,
    /// The post-copy phase, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub postcopy: Option<PostcopyStats>,
}

/// What the post-copy phase of a migration measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct PostcopyStats {
    /// Pages the guest touched on the target before they arrived.
    pub pages_requested: u64,
    /// Pages sent in the background.
    pub pages_pushed: u64,
    /// From the target taking over to its last page.
    pub postcopy_ms: u64,
}

/// What `snapshot DIR` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct SnapshotReport {
    pub dir: String,
    pub memory_bytes: u64,
    pub pause_ms: u64,
    #[serde(default)]
    pub disks: Vec<SnapshotDisk>,
    /// A diff snapshot: its parent and the pages it holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diff: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
}

/// A reply line. `state` is the VM's run state after the command
/// (`running`, `paused`, `created`, `exited`, or `migrated`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<DeviceStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStats>,
}

/// A reply line that is not one.
#[derive(Debug, thiserror::Error)]
#[error("not a control socket reply: {0}")]
pub struct ReplyError(#[from] serde_json::Error);

impl Reply {
    /// Success, the VM in `state`.
    pub fn ok(state: &str) -> Reply {
        Reply {
            ok: true,
            state: Some(state.to_string()),
            ..Reply::default()
        }
    }

    /// Failure, and why.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            ..Reply::default()
        }
    }

    /// The JSON line (without its newline).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Every member is plain data; should that ever change, the
            // peer still gets a well-formed failure.
            format!(
                "{{\"ok\":false,\"error\":{}}}",
                serde_json::Value::from(format!("cannot encode the reply: {e}"))
            )
        })
    }

    /// Read a reply line.
    pub fn parse(line: &str) -> Result<Reply, ReplyError> {
        Ok(serde_json::from_str(line)?)
    }

    /// The reply if it is a success, else its error message.
    pub fn into_result(self) -> Result<Reply, String> {
        if self.ok {
            Ok(self)
        } else {
            Err(self.error.unwrap_or_else(|| "no reason given".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_balloon_lines() {
        assert_eq!(Command::parse("balloon -1"), None);
        assert_eq!(Command::parse("reset\n"), Some(Command::Reset));
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
            Command::parse("snapshot --diff --paused /d"),
            Some(Command::Snapshot {
                dir: "/d".into(),
                stay_paused: true,
                diff: true
            })
        );
        assert_eq!(Command::parse("snapshot --paused --diff"), None);
        assert_eq!(Command::parse("snapshot   "), None);
    }

    #[test]
    fn commands_round_trip_through_their_line() {
        let mut m = MigrateTo::new("tcp:h:4444");
        m.ca = Some("/d/ca.pem".into());
        m.secret_file = Some("/d/secret".into());
        m.postcopy = true;
        let cmds = [
            Command::Pause,
            Command::Resume,
            Command::PowerButton,
            Command::Reset,
            Command::Status,
            Command::Balloon(None),
            Command::Balloon(Some(128)),
            Command::Stats,
            Command::Snapshot {
                dir: "/s/a".into(),
                stay_paused: false,
                diff: true,
            },
            Command::Snapshot {
                dir: "/s/b".into(),
                stay_paused: true,
                diff: false,
            },
            Command::MigrateTo(m.clone()),
            Command::MigrateTo(MigrateTo::new("unix:/m.sock")),
        ];
        for c in cmds {
            assert_eq!(Command::parse(&c.to_string()), Some(c.clone()), "{c}");
        }
        assert_eq!(
            Command::MigrateTo(m).to_string(),
            "migrate-to tcp:h:4444 --ca /d/ca.pem --secret-file /d/secret --postcopy"
        );
        assert_eq!(Command::Balloon(Some(8)).to_string(), "balloon 8");
    }

    #[test]
    fn command_lines_as_sent_today() {
        let m =
            Command::parse("migrate-to unix:/x --downtime-ms 50 --postcopy-bandwidth 1M").unwrap();
        let Command::MigrateTo(m) = m else {
            panic!("{m:?}")
        };
        assert_eq!((m.downtime_ms, m.postcopy_bandwidth), (50, Some(1 << 20)));
        for bad in [
            "",
            "snapshot",
            "snapshot --paused",
            "snapshot --diff --x",
            "balloon lots",
            "migrate-to",
            "migrate-to unix:/x --ca",
            "migrate-to unix:/x --bogus",
            "halt",
        ] {
            assert_eq!(Command::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn replies_encode_and_parse() {
        assert_eq!(
            Reply::ok("paused").encode(),
            r#"{"ok":true,"state":"paused"}"#
        );
        assert_eq!(Reply::error("no").encode(), r#"{"ok":false,"error":"no"}"#);
        let line = r#"{"ok":true,"state":"running","stats":{"vcpus":[{"exits":5},{"exits":7}],"disks":[{"id":"root","read_bytes":4096,"write_bytes":512,"read_ops":2,"write_ops":1}],"nets":[{"id":"tap0","rx_bytes":60,"tx_bytes":42,"rx_packets":1,"tx_packets":1}]}}"#;
        let r = Reply::parse(line).unwrap();
        assert_eq!(r.stats.as_ref().unwrap().vcpus[1].exits, 7);
        assert_eq!(r.encode(), line);
        assert_eq!(
            Reply::parse(r#"{"ok":false,"error":"busy"}"#)
                .unwrap()
                .into_result(),
            Err("busy".into())
        );
        assert!(Reply::parse("garbage").is_err());
    }

    #[test]
    fn command_arguments() {
        assert_eq!(
            MigrateTo::parse("tcp:h:1"),
            Some(MigrateTo {
                uri: "tcp:h:1".into(),
                ca: None,
                secret_file: None,
                cert: None,
                key: None,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                postcopy: false,
                postcopy_bandwidth: None,
            })
        );
        assert_eq!(
            MigrateTo::parse(
                "tcp:h:1 --ca /c.pem --secret-file /s --cert /cc.pem --key /k.pem --downtime-ms 50 --postcopy --postcopy-bandwidth 8M"
            ),
            Some(MigrateTo {
                uri: "tcp:h:1".into(),
                ca: Some("/c.pem".into()),
                secret_file: Some("/s".into()),
                cert: Some("/cc.pem".into()),
                key: Some("/k.pem".into()),
                downtime_ms: 50,
                postcopy: true,
                postcopy_bandwidth: Some(8 << 20),
            })
        );
        for bad in [
            "",
            "tcp:h:1 --ca",
            "tcp:h:1 --secret-file",
            "tcp:h:1 --downtime-ms x",
            "tcp:h:1 --what",
            "tcp:h:1 --postcopy --postcopy-bandwidth 0",
        ] {
            assert_eq!(MigrateTo::parse(bad), None, "{bad}");
        }
    }
}
