//! Talking to a VM process over its control socket: one typed command
//! (`vireo_api::control`), one reply, within a time limit; the API verbs
//! that are such a command (pause, resume, balloon).

use std::path::Path;
use std::time::Duration;

use vireo_api::control::{Command, Reply, ReplyError};
use vireo_api::model::{BalloonStatus, VmState};

use super::{lock, Daemon, CONTROL_SOCKET};
use crate::db::VmRecord;
use crate::error::ApiError;
use crate::observe::Change;

/// How long a pause or resume may take before the API gives up.
pub(super) const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl Daemon {
    /// Pause (`paused = true`) or resume the VM's vCPUs through its control
    /// socket.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<VmRecord, ApiError> {
        let (socket, state) = {
            let inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            if !rec.state.is_active() {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!("VM {name} is not running (it is {})", rec.state.as_str()),
                ));
            }
            (self.vm_dir(name).join(CONTROL_SOCKET), rec.state)
        };
        let want = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        if state == want {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("VM {name} is already {}", want.as_str()),
            ));
        }
        let command = if paused {
            Command::Pause
        } else {
            Command::Resume
        };
        let reply = self.control(name, &socket, &command).await?;
        if let Err(why) = reply.into_result() {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("VM {name}: {why}"),
            ));
        }
        lock(&self.inner).db.set_live_state(name, want)?;
        tracing::info!("VM {name} {}", want.as_str());
        let change = if want == VmState::Paused {
            Change::Paused
        } else {
            Change::Resumed
        };
        self.observe.vm(name, change, Some(want), change.as_str());
        self.get(name)
    }

    /// Report the VM's balloon, after setting its target to `target_mib`
    /// when given, through the VM process's control socket.
    pub async fn balloon(
        &self,
        name: &str,
        target_mib: Option<u64>,
    ) -> Result<BalloonStatus, ApiError> {
        let socket = {
            let inner = lock(&self.inner);
            let rec = inner.db.get(name)?.ok_or_else(|| ApiError::no_vm(name))?;
            if !rec.state.is_active() {
                return Err(ApiError::conflict(
                    "invalid_state",
                    format!("VM {name} is not running (it is {})", rec.state.as_str()),
                ));
            }
            if rec.config.devices.balloon.is_none() {
                return Err(ApiError::conflict(
                    "no_balloon",
                    format!(
                        "VM {name} has no balloon device; stop it, add one (`vireo vm update {name} \
                         --balloon`, or PATCH {{\"balloon\": \"\"}}) and start it again"
                    ),
                ));
            }
            if let Some(t) = target_mib {
                if t >= rec.config.memory_mib.mib() {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        format!(
                            "target_mib: {t} MiB is not less than the VM's memory ({} MiB)",
                            rec.config.memory_mib.mib()
                        ),
                    ));
                }
            }
            self.vm_dir(name).join(CONTROL_SOCKET)
        };
        let command = Command::Balloon(target_mib);
        let reply = self
            .control(name, &socket, &command)
            .await?
            .into_result()
            .map_err(|why| ApiError::conflict("balloon_failed", format!("VM {name}: {why}")))?;
        reply.balloon.ok_or_else(|| {
            ApiError::internal(format!(
                "VM {name} answered `{command}` without a balloon report"
            ))
        })
    }

    /// One control-socket request to the VM's process, its reply parsed.
    pub(super) async fn control(
        &self,
        name: &str,
        socket: &Path,
        command: &Command,
    ) -> Result<Reply, ApiError> {
        self.control_within(name, socket, command, CONTROL_TIMEOUT)
            .await
    }

    /// [`Daemon::control`] with its own time limit (snapshots take longer).
    pub(super) async fn control_within(
        &self,
        name: &str,
        socket: &Path,
        command: &Command,
        limit: Duration,
    ) -> Result<Reply, ApiError> {
        // A VM started a moment ago may not listen yet (`vireo run` binds
        // its control socket once the machine is built): retry until it
        // does, within the same time limit.
        let ask = async {
            loop {
                match control_request(socket, command).await {
                    Err(ControlError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) && self.live_process(name).is_ok() =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        };
        tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| {
                ApiError::internal(format!("VM {name} did not answer `{command}` in time"))
            })?
            .map_err(|e| match e {
                ControlError::Io(e) => ApiError::internal(format!(
                    "cannot reach VM {name}'s control socket {}: {e}",
                    socket.display()
                )),
                ControlError::Reply(e) => {
                    ApiError::internal(format!("VM {name} answered `{command}` with garbage: {e}"))
                }
            })
    }
}

/// A control-socket request that got no reply to read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

/// Send one command to a `vireo run` control socket and read its reply.
pub(crate) async fn control_request(
    socket: &Path,
    command: &Command,
) -> Result<Reply, ControlError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(64 * 1024)
        .read_line(&mut line)
        .await?;
    Ok(Reply::parse(&line)?)
}
