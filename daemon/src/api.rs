//! The REST API: JSON over HTTP/1.1, versioned under `/v1`, described by
//! `daemon/openapi.json` (served at `/v1/openapi.json`).
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
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::vms::Daemon;
use vireo_api::model::{
    CloneVm, CreateSnapshot, CreateVm, ErrorBody, ErrorDetail, SetBalloon, SnapshotList, StopVm,
    UpdateVm, VmList,
};

/// The OpenAPI 3 document the daemon serves; the repository keeps it.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route, as OpenAPI paths (checked against [`OPENAPI`] in a test).
pub const ROUTES: &[&str] = &[
    "/v1/openapi.json",
    "/v1/version",
    "/v1/vms",
    "/v1/vms/{name}",
    "/v1/vms/{name}/start",
    "/v1/vms/{name}/stop",
    "/v1/vms/{name}/kill",
    "/v1/vms/{name}/pause",
    "/v1/vms/{name}/resume",
    "/v1/vms/{name}/console",
    "/v1/vms/{name}/balloon",
    "/v1/vms/{name}/reboot",
    "/v1/vms/{name}/console/ws",
    "/v1/vms/{name}/snapshots",
    "/v1/vms/{name}/snapshots/{tag}",
    "/v1/vms/{name}/snapshots/{tag}/restore",
    "/v1/vms/{name}/clone",
    "/v1/vms/{name}/migrate",
    "/v1/vms/{name}/migrate-in",
    "/v1/stats",
    "/v1/events",
    "/metrics",
    "/v1/whoami",
    "/v1/tokens",
    "/v1/tokens/{id}",
];

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

async fn list_snapshots(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let snapshots = d.list_snapshots(&vm_name(name)?)?;
    Ok(json(StatusCode::OK, &SnapshotList { snapshots }))
}

async fn create_snapshot(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CreateSnapshot = parse(&body, Some(CreateSnapshot::default()))?;
    Ok(json(StatusCode::CREATED, &d.snapshot(&name, &req).await?))
}

async fn show_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    Ok(json(StatusCode::OK, &d.get_snapshot(&name, &tag)?))
}

async fn delete_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    d.delete_snapshot(&name, &tag)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restore_snapshot(State(d): Shared, p: NameTag) -> Result<Response, ApiError> {
    let (name, tag) = vm_and_tag(p)?;
    Ok(json(
        StatusCode::OK,
        &d.restore(&name, &tag).await?.to_api(),
    ))
}

async fn migrate_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: vireo_api::model::Migrate = parse(&body, None)?;
    Ok(json(StatusCode::OK, &d.migrate(&name, &req).await?))
}

async fn migrate_in(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CreateVm = parse(&body, None)?;
    Ok(json(StatusCode::CREATED, &d.migrate_in(&name, &req).await?))
}

async fn clone_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: CloneVm = parse(&body, None)?;
    Ok(json(
        StatusCode::CREATED,
        &d.clone_vm(&name, &req).await?.to_api(),
    ))
}

async fn list_vms(State(d): Shared) -> Result<Response, ApiError> {
    let vms = d.list()?.iter().map(|r| r.to_api()).collect();
    Ok(json(StatusCode::OK, &VmList { vms }))
}

async fn create_vm(State(d): Shared, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateVm = parse(&body, None)?;
    let rec = d.create(&req)?;
    Ok(json(StatusCode::CREATED, &rec.to_api()))
}

async fn show_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &d.get(&vm_name(name)?)?.to_api()))
}

async fn update_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: UpdateVm = parse(&body, None)?;
    Ok(json(StatusCode::OK, &d.update(&name, &req)?.to_api()))
}

async fn delete_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    d.delete(&vm_name(name)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.start(&vm_name(name)?).await?.to_api(),
    ))
}

async fn stop_vm(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: StopVm = parse(&body, Some(StopVm::default()))?;
    Ok(json(StatusCode::OK, &d.stop(&name, &req).await?.to_api()))
}

async fn kill_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.kill(&vm_name(name)?).await?.to_api(),
    ))
}

async fn pause_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let rec = d.set_paused(&vm_name(name)?, true).await?;
    Ok(json(StatusCode::OK, &rec.to_api()))
}

async fn resume_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let rec = d.set_paused(&vm_name(name)?, false).await?;
    Ok(json(StatusCode::OK, &rec.to_api()))
}

async fn reboot_vm(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.reboot(&vm_name(name)?).await?.to_api(),
    ))
}

async fn console(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    let bytes = d.console(&vm_name(name)?)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

async fn get_balloon(State(d): Shared, name: Name) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &d.balloon(&vm_name(name)?, None).await?,
    ))
}

async fn set_balloon(State(d): Shared, name: Name, body: Bytes) -> Result<Response, ApiError> {
    let name = vm_name(name)?;
    let req: SetBalloon = parse(&body, None)?;
    Ok(json(
        StatusCode::OK,
        &d.balloon(&name, Some(req.target_mib)).await?,
    ))
}

async fn stats(State(d): Shared) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &crate::observe::sample(&d).await?))
}

/// The Prometheus text exposition format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(d): Shared) -> Result<Response, ApiError> {
    let stats = crate::observe::sample(&d).await?;
    let text = crate::observe::render_prometheus(&stats, &d.observe.requests());
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        text,
    )
        .into_response())
}

/// How often an idle event stream carries a `: keepalive` comment.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

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
    d.observe.count_request(&method, resp.status().as_u16());
    resp
}

/// `GET /v1/version`: this build's version, git commit and API version.
async fn version() -> Response {
    json(StatusCode::OK, &crate::version::info())
}

async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
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

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/version", get(version))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route(
            "/v1/vms/{name}",
            get(show_vm).patch(update_vm).delete(delete_vm),
        )
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/kill", post(kill_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/balloon", get(get_balloon).put(set_balloon))
        .route("/v1/vms/{name}/reboot", post(reboot_vm))
        .route(
            "/v1/vms/{name}/console/ws",
            get(crate::console_ws::console_ws),
        )
        .route(
            "/v1/vms/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{tag}",
            get(show_snapshot).delete(delete_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{tag}/restore",
            post(restore_snapshot),
        )
        .route("/v1/vms/{name}/clone", post(clone_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/vms/{name}/migrate-in", post(migrate_in))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
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

    #[test]
    fn openapi_document_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths: std::collections::BTreeSet<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let routes: std::collections::BTreeSet<&str> = ROUTES.iter().copied().collect();
        assert_eq!(paths, routes);
    }

    /// The schema's property names.
    fn properties(schema: &str) -> std::collections::BTreeSet<String> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
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
