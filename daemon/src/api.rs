//! The REST API: JSON over HTTP/1.1, versioned under `/v1`, described by
//! an OpenAPI document generated from the handlers' `#[utoipa::path]`
//! annotations and the types' `ToSchema` derives ([`crate::openapi`]).
//!
//! Every error is `{ "error": { "code": ..., "message": ... } }` with a 4xx
//! status for anything the client can fix (malformed JSON, unknown fields,
//! out-of-range values, duplicate names, missing files, illegal state
//! transitions); 5xx only for the daemon's own failures.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::vms::Daemon;
use vireo_api::model::{
    BalloonStatus, CloneVm, CreateSnapshot, CreateVm, ErrorBody, ErrorDetail, Migrate,
    MigrateInReady, Migrated, SetBalloon, Snapshot, SnapshotList, StopVm, UpdateVm, Vm, VmList,
};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        json(self.status, &body)
    }
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::internal(format!("encoding the response: {e}")).into_response(),
    }
}

/// Parse a JSON body, naming the offending field in the error. An empty
/// body is `empty` when given (for requests whose body is optional).
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8], empty: Option<T>) -> Result<T, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body over {MAX_BODY} bytes"),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        if let Some(v) = empty {
            return Ok(v);
        }
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = match inner.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "malformed_json",
        };
        let message = if code == "malformed_json" || path == "." || path.is_empty() {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        ApiError::bad_request(code, message)
    })
}

fn vm_name(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(n)| n)
        .map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))
}

type Shared = State<Arc<Daemon>>;
type Name = Result<Path<String>, PathRejection>;
type NameTag = Result<Path<(String, String)>, PathRejection>;

fn vm_and_tag(p: NameTag) -> Result<(String, String), ApiError> {
    p.map(|Path(nt)| nt)
        .map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/snapshots",
    operation_id = "listSnapshots",
    summary = "The VM's snapshots, oldest first.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The snapshots.", body = SnapshotList),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
    )
)]
async fn list_snapshots(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let snapshots = d.list_snapshots(&vm_name(name)?)?;
    Ok(json(StatusCode::OK, &SnapshotList { snapshots }))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/snapshots",
    operation_id = "createSnapshot",
    summary = "Take a snapshot of a running or paused VM.",
    description = "The daemon sends `snapshot DIR` to the VM's process: the VM pauses while its vCPUs, devices, memory and disks are written to `STATE_DIR/vms/NAME/snapshots/TAG/`, then runs on (a paused VM stays paused). With `diff`, only the memory changed since this run's last snapshot is written (that snapshot becomes its parent). Returns when the snapshot is written. Needs operator.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = Option<CreateSnapshot>,
    responses(
        (status = 201, description = "The snapshot taken.", body = Snapshot),
        (status = 400, description = "Bad request: malformed JSON, unknown field, bad tag (the message names the field).", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is not running or paused (invalid_state), the tag is taken (already_exists), a diff snapshot without an earlier snapshot of this run (no_parent), another snapshot operation is under way (busy), or the VM refused (snapshot_failed, with its reason).", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
    )
)]
async fn create_snapshot(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CreateSnapshot = parse(&body, Some(CreateSnapshot::default()))?;
    Ok(json(StatusCode::CREATED, &d.snapshot(&name, &req).await?))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/snapshots/{tag}",
    operation_id = "showSnapshot",
    summary = "One snapshot.",
    params(("name" = String, Path, description = "The VM's name."), ("tag" = String, Path, description = "The snapshot's tag.")),
    responses(
        (status = 200, description = "The snapshot.", body = Snapshot),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot.", body = ErrorBody),
    )
)]
async fn show_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    Ok(json(StatusCode::OK, &d.get_snapshot(&name, &tag)?))
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}/snapshots/{tag}",
    operation_id = "deleteSnapshot",
    summary = "Delete a snapshot and its files.",
    description = "Refused while a clone was made from it or a diff snapshot has it as parent. Needs admin.",
    params(("name" = String, Path, description = "The VM's name."), ("tag" = String, Path, description = "The snapshot's tag.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot.", body = ErrorBody),
        (status = 409, description = "A clone or a diff snapshot depends on it (in_use), or a snapshot operation is under way (busy).", body = ErrorBody),
    )
)]
async fn delete_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    d.delete_snapshot(&name, &tag)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/snapshots/{tag}/restore",
    operation_id = "restoreSnapshot",
    summary = "Start the VM from one of its snapshots.",
    description = "A running or paused VM's process ends first (its console's scrollback and WebSocket clients stay, as on reboot); the daemon then starts `vireo run --restore DIR` under the same name, which rolls the VM's disks back to the snapshot's copies. A stopped VM is started from the snapshot. Returns once the restored process runs. A later reboot boots the VM's definition. Needs operator.",
    params(("name" = String, Path, description = "The VM's name."), ("tag" = String, Path, description = "The snapshot's tag.")),
    responses(
        (status = 200, description = "The VM, running from the snapshot (new pid).", body = Vm),
        (status = 400, description = "Bad request (bad tag).", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot.", body = ErrorBody),
        (status = 409, description = "The snapshot's files are gone (snapshot_missing), a snapshot operation is under way (busy), or the restored VM failed at once (restore_failed, with the reason).", body = ErrorBody),
    )
)]
async fn restore_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    Ok(json(
        StatusCode::OK,
        &d.restore(&name, &tag).await?.to_api(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/migrate",
    operation_id = "migrateVm",
    summary = "Live-migrate a running VM to another daemon.",
    description = "This daemon asks the target daemon (`to`, its TLS API, with `token`, an admin token there, checked against `ca_cert`) to receive the VM (`POST /v1/vms/{name}/migrate-in`), then tells the VM's process to send itself there: memory is copied while the guest runs, then the guest pauses for the last pages and the device state. On success the VM runs on the target and this daemon forgets it. On failure it keeps running here. Disks must be on storage both hosts see at the same paths. A VM with snapshots is refused (they cannot move). Needs admin.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = Migrate,
    responses(
        (status = 200, description = "Migrated: the VM runs on the target.", body = Migrated),
        (status = 400, description = "Bad request: malformed JSON, unknown field, bad `to`, `token` or `ca_cert` (the message names the field).", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is not running or paused (invalid_state), has snapshots (has_snapshots), is busy (busy), the target refused it (migration_refused, with the target's reason), or the migration failed and the VM stays here (migration_failed).", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 502, description = "The target daemon cannot be reached (target_unreachable).", body = ErrorBody),
    )
)]
async fn migrate_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: vireo_api::model::Migrate = parse(&body, None)?;
    Ok(json(StatusCode::OK, &d.migrate(&name, &req).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/migrate-in",
    operation_id = "migrateInVm",
    summary = "Receive a live-migrating VM (called by the source daemon).",
    description = "Records the VM (the body is its definition, as for `POST /v1/vms`; its name must be the path's), starts `vireo run --migrate-from` on a free port of this daemon's TLS listener address with this daemon's certificate, a one-time secret and the VM's own definition (the incoming machine must match its vCPUs, memory and devices), and answers the port and the secret. If no migration arrives, or it fails, the VM's record goes again. Needs admin.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = CreateVm,
    responses(
        (status = 201, description = "Waiting for the migration on this port.", body = MigrateInReady),
        (status = 400, description = "Bad request (the message names the field).", body = ErrorBody),
        (status = 409, description = "A VM of that name exists here (already_exists), this daemon has no TLS listener (no_tls), or the receiving process failed (migrate_in_failed).", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
    )
)]
async fn migrate_in(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CreateVm = parse(&body, None)?;
    Ok(json(StatusCode::CREATED, &d.migrate_in(&name, &req).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/clone",
    operation_id = "cloneVm",
    summary = "Make a new VM from a snapshot of this one and start it.",
    description = "The clone gets the origin's definition with its own disks (qcow2 overlays backed by the snapshot's qcow2 disk copies; raw copies are copied), its own TAP names, vsock socket and MAC for later boots, and starts from the snapshot with `--restore-lazy` (memory mapped copy-on-write from the snapshot's memory file, so the snapshot cannot be deleted while the clone exists). Needs admin.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = CloneVm,
    responses(
        (status = 201, description = "The new VM, running.", body = Vm),
        (status = 400, description = "Bad request: malformed JSON, unknown field, bad name or tag (the message names the field).", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot.", body = ErrorBody),
        (status = 409, description = "The name is taken (already_exists), the snapshot's files are gone (snapshot_missing) or lack a disk (invalid_origin), a snapshot operation is under way (busy), or the clone failed at once (clone_failed).", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
    )
)]
async fn clone_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CloneVm = parse(&body, None)?;
    Ok(json(
        StatusCode::CREATED,
        &d.clone_vm(&name, &req).await?.to_api(),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    operation_id = "listVms",
    summary = "List the VMs, by name.",
    responses(
        (status = 200, description = "All VMs.", body = VmList),
    )
)]
async fn list_vms(State(d): Shared) -> Result<Response, ApiError> {
    let vms = d.list()?.iter().map(|r| r.to_api()).collect();
    Ok(json(StatusCode::OK, &VmList { vms }))
}

#[utoipa::path(
    post,
    path = "/v1/vms",
    operation_id = "createVm",
    summary = "Define a VM (it starts stopped).",
    request_body = CreateVm,
    responses(
        (status = 201, description = "The new VM.", body = Vm),
        (status = 400, description = "Malformed JSON, unknown field, out-of-range value, missing file; the message names the field.", body = ErrorBody),
        (status = 409, description = "A VM with that name exists (code already_exists).", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB.", body = ErrorBody),
    )
)]
async fn create_vm(State(d): Shared, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateVm = parse(&body, None)?;
    let rec = d.create(&req)?;
    Ok(json(StatusCode::CREATED, &rec.to_api()))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}",
    operation_id = "getVm",
    summary = "One VM's definition and state.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM.", body = Vm),
        (status = 404, description = "No such VM.", body = ErrorBody),
    )
)]
async fn show_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &d.get(&vm_name(name)?)?.to_api()))
}

#[utoipa::path(
    patch,
    path = "/v1/vms/{name}",
    operation_id = "updateVm",
    summary = "Change a stopped VM's definition; null clears an optional field.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = UpdateVm,
    responses(
        (status = 200, description = "The changed VM.", body = Vm),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is running (code invalid_state).", body = ErrorBody),
    )
)]
async fn update_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: UpdateVm = parse(&body, None)?;
    Ok(json(StatusCode::OK, &d.update(&name, &req)?.to_api()))
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}",
    operation_id = "deleteVm",
    summary = "Delete a VM that is not running.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is running (code invalid_state).", body = ErrorBody),
    )
)]
async fn delete_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    d.delete(&vm_name(name)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/start",
    operation_id = "startVm",
    summary = "Start the VM as its own `vireo run` process.",
    description = "Answers after the process started; a VM that fails at once (bad kernel, no /dev/kvm) gets 400 start_failed with the reason.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM after the action.", body = Vm),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "Already running (code invalid_state).", body = ErrorBody),
    )
)]
async fn start_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.start(&vm_name(name)?).await?.to_api(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/stop",
    operation_id = "stopVm",
    summary = "Stop the VM: press its ACPI power button and wait for the guest to shut down; with force, stop the VM process (SIGTERM, then SIGKILL) after the timeout.",
    description = "Waits until the process has exited.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = Option<StopVm>,
    responses(
        (status = 200, description = "The VM after the action.", body = Vm),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "Not running (invalid_state), or the guest did not shut down within the timeout and force was not given (stop_timeout).", body = ErrorBody),
    )
)]
async fn stop_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: StopVm = parse(&body, Some(StopVm::default()))?;
    Ok(json(StatusCode::OK, &d.stop(&name, &req).await?.to_api()))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/kill",
    operation_id = "killVm",
    summary = "Kill the VM at once (SIGKILL).",
    description = "Waits until the process has exited.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM after the action.", body = Vm),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "Not running (code invalid_state).", body = ErrorBody),
    )
)]
async fn kill_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.kill(&vm_name(name)?).await?.to_api(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/pause",
    operation_id = "pauseVm",
    summary = "Pause the VM's vCPUs.",
    description = "Through the control socket of the VM's `vireo run` process; the VM keeps its memory and devices.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM after the action.", body = Vm),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "Not running, already in that state (code invalid_state).", body = ErrorBody),
        (status = 500, description = "The VM process could not be reached.", body = ErrorBody),
    )
)]
async fn pause_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let rec = d.set_paused(&vm_name(name)?, true).await?;
    Ok(json(StatusCode::OK, &rec.to_api()))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/resume",
    operation_id = "resumeVm",
    summary = "Resume a paused VM.",
    description = "Through the control socket of the VM's `vireo run` process; the VM keeps its memory and devices.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM after the action.", body = Vm),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "Not running, already in that state (code invalid_state).", body = ErrorBody),
        (status = 500, description = "The VM process could not be reached.", body = ErrorBody),
    )
)]
async fn resume_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let rec = d.set_paused(&vm_name(name)?, false).await?;
    Ok(json(StatusCode::OK, &rec.to_api()))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/reboot",
    operation_id = "rebootVm",
    summary = "Reset the VM and start it again (a hard reset, like the reset button).",
    description = "The VM's process ends with \"reset\" and the daemon starts the same definition as a new process (new pid), keeping the console's scrollback and its WebSocket clients. Returns once the new process runs. A reset the guest asks for (`reboot` inside) restarts the VM the same way; more than 5 guest resets within 60 s leave the VM stopped (a boot loop).",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM after the reboot (running, new pid).", body = Vm),
        (status = 400, description = "Bad request.", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is neither running nor paused (code invalid_state): start it instead.", body = ErrorBody),
    )
)]
async fn reboot_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.reboot(&vm_name(name)?).await?.to_api(),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console",
    operation_id = "getConsole",
    summary = "The serial console scrollback (last 256 KiB) of the VM's current or last run under this daemon.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "Console output, lossily decoded as UTF-8.", body = String, content_type = "text/plain"),
        (status = 404, description = "No such VM.", body = ErrorBody),
    )
)]
async fn console(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let bytes = d.console(&vm_name(name)?)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/balloon",
    operation_id = "getBalloon",
    summary = "Report the running VM's balloon.",
    description = "Through the control socket of the VM's `vireo run` process; also asks the guest for fresh statistics.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The balloon.", body = BalloonStatus),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is not running (code invalid_state), has no balloon device (code no_balloon), or its balloon refused (code balloon_failed, with the VM's reason).", body = ErrorBody),
        (status = 500, description = "The VM process could not be reached.", body = ErrorBody),
    )
)]
async fn get_balloon(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.balloon(&vm_name(name)?, None).await?,
    ))
}

#[utoipa::path(
    put,
    path = "/v1/vms/{name}/balloon",
    operation_id = "setBalloon",
    summary = "Set the running VM's balloon target.",
    description = "The guest inflates or deflates the balloon towards the target at its own pace; actual_mib shows how far it got. The definition's `balloon` option is not changed.",
    params(("name" = String, Path, description = "The VM's name.")),
    request_body = SetBalloon,
    responses(
        (status = 200, description = "The balloon after setting the target.", body = BalloonStatus),
        (status = 400, description = "Malformed body, or target_mib not less than the VM's memory (code invalid_value).", body = ErrorBody),
        (status = 404, description = "No such VM.", body = ErrorBody),
        (status = 409, description = "The VM is not running (code invalid_state), has no balloon device (code no_balloon), or its balloon refused (code balloon_failed, with the VM's reason).", body = ErrorBody),
        (status = 500, description = "The VM process could not be reached.", body = ErrorBody),
    )
)]
async fn set_balloon(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: SetBalloon = parse(&body, None)?;
    Ok(json(
        StatusCode::OK,
        &d.balloon(&name, Some(req.target_mib)).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/stats",
    operation_id = "getStats",
    summary = "A sample of every VM's CPU time, memory, disk and network I/O and vCPU exits.",
    responses(
        (status = 200, description = "One entry per defined VM.", body = crate::observe::StatsList),
    )
)]
async fn stats(State(d): Shared) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &crate::observe::sample(&d).await?))
}

/// The Prometheus text exposition format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "getMetrics",
    summary = "Prometheus metrics (text format 0.0.4): vireo_vms{state}, vireo_api_requests_total{method,code}, and per VM (label vm; disk or net for devices) vireo_vm_up, vireo_vm_cpu_seconds_total, vireo_vm_memory_rss_bytes, vireo_vm_memory_bytes, vireo_vm_exits_total, vireo_vm_disk_{read,write}_{bytes,ops}_total, vireo_vm_net_{rx,tx}_{bytes,packets}_total.",
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "text/plain"),
    )
)]
async fn metrics(State(d): Shared) -> Result<Response, ApiError> {
    let stats = crate::observe::sample(&d).await?;
    let text =
        crate::observe::render_prometheus(&stats, &d.observe.requests.by_method_and_status());
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        text,
    )
        .into_response())
}

/// How often an idle event stream carries a `: keepalive` comment.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "getEvents",
    summary = "Server-sent events: `event: vm` with data {\"name\",\"event\",\"state\",\"reason\",\"time\"} on every state change (event created, started, paused, resumed, stopped, crashed, deleted); `event: panic` with data {\"name\",\"line\",\"time\"} when a VM's console shows `Kernel panic`; with console=1 also `event: console` with data {\"name\",\"data\"}. A `: keepalive` comment every 15 s. The stream does not end while the daemon runs.",
    params(("vm" = Option<String>, Query, description = "Only this VM's events."), ("console" = Option<String>, Query, description = "1 to receive the VMs' console output as `console` events.")),
    responses(
        (status = 200, description = "The event stream (text/event-stream).", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A bad query parameter; the message names it.", body = ErrorBody),
    )
)]
async fn events(State(d): Shared, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let filter = crate::observe::EventFilter::from_query(query.as_deref())
        .map_err(|m| ApiError::bad_request("invalid_value", m))?;
    let rx = d.observe.subscribe();
    let closing = Box::pin(d.observe.closing());
    let state = (rx, filter, closing);
    let stream = futures_util::stream::unfold(state, |(mut rx, filter, mut closing)| async move {
        loop {
            let received = tokio::select! {
                r = rx.recv() => r,
                _ = &mut closing => return None,
            };
            match received {
                Ok(e) if filter.matches(&e) => {
                    let sse = SseEvent::default().event(e.kind()).data(e.data());
                    let sse = Ok::<_, std::convert::Infallible>(sse);
                    return Some((sse, (rx, filter, closing)));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    let sse = SseEvent::default().comment(format!("missed {n} events"));
                    return Some((Ok(sse), (rx, filter, closing)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    // Proxies (nginx) must not buffer the stream.
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-accel-buffering"),
        header::HeaderValue::from_static("no"),
    );
    Ok(resp)
}

/// Count every answered request for `vireo_api_requests_total`.
async fn count_requests(
    State(d): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let resp = next.run(req).await;
    d.observe.requests.count(&method, resp.status().as_u16());
    resp
}

/// `GET /v1/version`: this build's version, git commit and API version.
#[utoipa::path(
    get,
    path = "/v1/version",
    operation_id = "getVersion",
    summary = "This daemon's version, the git commit it was built from and the version of this API.",
    responses(
        (status = 200, description = "The build.", body = crate::version::VersionInfo),
    )
)]
async fn version() -> Response {
    json(StatusCode::OK, &crate::version::info())
}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "getOpenApi",
    summary = "This document.",
    responses(
        (status = 200, description = "The OpenAPI document.", body = Object),
    )
)]
async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::openapi_json(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (the API is under /v1; see /v1/openapi.json)",
    )
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see /v1/openapi.json)",
    )
}

/// The API's routes, each with its part of the document.
pub(crate) fn routes() -> OpenApiRouter<Arc<Daemon>> {
    OpenApiRouter::new()
        .routes(routes!(openapi))
        .routes(routes!(version))
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(show_vm, update_vm, delete_vm))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(kill_vm))
        .routes(routes!(pause_vm))
        .routes(routes!(resume_vm))
        .routes(routes!(reboot_vm))
        .routes(routes!(console))
        .routes(routes!(crate::console_ws::console_ws))
        .routes(routes!(list_snapshots, create_snapshot))
        .routes(routes!(show_snapshot, delete_snapshot))
        .routes(routes!(restore_snapshot))
        .routes(routes!(clone_vm))
        .routes(routes!(migrate_vm))
        .routes(routes!(migrate_in))
        .routes(routes!(get_balloon, set_balloon))
        .routes(routes!(stats))
        .routes(routes!(events))
        .routes(routes!(metrics))
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        // The web UI for every other GET (index.html for its own routes);
        // the JSON 404 for unknown API paths.
        .fallback(crate::web::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            count_requests,
        ))
        .with_state(daemon)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema's property names.
    fn properties(schema: &str) -> std::collections::BTreeSet<String> {
        let doc: serde_json::Value = serde_json::from_str(crate::openapi::openapi_json()).unwrap();
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {schema} has no properties"))
            .keys()
            .cloned()
            .collect()
    }

    fn keys(v: impl Serialize) -> std::collections::BTreeSet<String> {
        serde_json::to_value(v)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn openapi_schemas_match_the_types() {
        let create: CreateVm = serde_json::from_value(serde_json::json!({
            "name": "a", "kernel": "/k", "initrd": "/i", "cmdline": "c", "image": "/d",
            "disks": ["/x"], "nets": ["tap0"], "vsock": "cid=3,socket=/s", "rng": "",
            "balloon": "",
        }))
        .unwrap();
        assert_eq!(keys(&create), properties("CreateVm"));
        let mut db = crate::db::Db::open_in_memory().unwrap();
        db.create("a", &create.config()).unwrap();
        let vm = db.get("a").unwrap().unwrap().to_api();
        assert_eq!(keys(&vm), properties("Vm"));
        // Every UpdateVm property is a field UpdateVm takes.
        for p in properties("UpdateVm") {
            let body = serde_json::json!({ p.clone(): null }).to_string();
            assert!(
                parse::<UpdateVm>(body.as_bytes(), None).is_ok(),
                "UpdateVm does not take {p}"
            );
        }
        assert_eq!(keys(SetBalloon { target_mib: 1 }), properties("SetBalloon"));
        let b = vireo_api::model::BalloonStatus {
            target_mib: 1,
            actual_mib: 0,
            free_mib: None,
            available_mib: None,
            total_mib: None,
        };
        assert_eq!(keys(b), properties("Balloon"));
        let dev = vireo_api::control::DeviceStats {
            vcpus: vec![],
            disks: vec![Default::default()],
            nets: vec![Default::default()],
        };
        let st = crate::observe::VmStats::new(
            "a",
            vireo_api::model::VmState::Running,
            Some(1),
            vireo_api::units::MemorySize::mib_const(32),
            None,
            Some(dev.clone()),
        );
        assert_eq!(keys(&st), properties("VmStats"));
        assert_eq!(keys(&st.disks[0]), properties("DiskStats"));
        assert_eq!(keys(&st.nets[0]), properties("NetStats"));
        let list = crate::observe::StatsList {
            time: 0.0,
            vms: vec![],
        };
        assert_eq!(keys(&list), properties("StatsList"));
        let req = CreateSnapshot {
            tag: Some("t".into()),
            diff: true,
        };
        assert_eq!(keys(&req), properties("CreateSnapshot"));
        let clone = CloneVm {
            name: "b".into(),
            from_snapshot: "t".into(),
        };
        assert_eq!(keys(&clone), properties("CloneVm"));
        let disk = vireo_api::model::SnapshotDisk {
            id: "root".into(),
            path: "/s/disks/root.qcow2".into(),
            format: "qcow2".into(),
            bytes: 1,
        };
        assert_eq!(keys(&disk), properties("SnapshotDisk"));
        let snap = vireo_api::model::Snapshot {
            vm: "a".into(),
            tag: "t".into(),
            created_at: crate::clock::rfc3339(0),
            vm_state: vireo_api::model::VmState::Running,
            memory_bytes: 1,
            disks: vec![disk],
            parent: None,
            size_bytes: 1,
            dir: "/s".into(),
            clones: vec![],
        };
        assert_eq!(keys(&snap), properties("Snapshot"));
        let m = vireo_api::model::Migrate {
            to: "https://a:1".into(),
            token: Some("t".into()),
            ca_cert: Some("pem".into()),
            postcopy: true,
        };
        assert_eq!(keys(&m), properties("Migrate"));
        let postcopy = vireo_api::control::PostcopyStats::default();
        assert_eq!(keys(&postcopy), properties("PostcopyStats"));
        let stats = vireo_api::control::MigrationStats {
            postcopy: Some(postcopy),
            ..Default::default()
        };
        assert_eq!(keys(&stats), properties("MigrationStats"));
        let done = vireo_api::model::Migrated {
            vm: "a".into(),
            to: "https://a:1".into(),
            migration: stats,
        };
        assert_eq!(keys(&done), properties("Migrated"));
        assert_eq!(
            keys(vireo_api::model::MigrateInReady {
                port: 1,
                secret: "00".into()
            }),
            properties("MigrateInReady")
        );
        assert_eq!(
            keys(SnapshotList {
                snapshots: vec![snap]
            }),
            properties("SnapshotList")
        );
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse::<CreateVm>(br#"{"name": "a", "vcpus": -1}"#, None).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.starts_with("vcpus: "), "{}", e.message);
        let e = parse::<CreateVm>(br#"{"name": "a", "cpus": 2}"#, None).unwrap_err();
        assert!(e.message.contains("unknown field `cpus`"), "{}", e.message);
        let e = parse::<CreateVm>(br#"{"name": "a""#, None).unwrap_err();
        assert_eq!(e.code, "malformed_json");
        let e = parse::<CreateVm>(b"", None).unwrap_err();
        assert_eq!(e.code, "malformed_json");
        assert!(!parse::<StopVm>(b"", Some(StopVm::default())).unwrap().force);
    }
}
