//! Who may do what: API tokens, the three roles, the one middleware that
//! checks every request against [`RULES`], and the audit log.
//!
//! - Unix-socket clients are trusted by the socket's file permissions and act
//!   as `admin` (whoever may connect to the socket, its group included, is
//!   an admin); the audit log names their uid (SO_PEERCRED). TCP (TLS)
//!   clients send `Authorization: Bearer TOKEN`; `?access_token=TOKEN` only
//!   on the two GET streams a browser cannot set headers for (the console
//!   WebSocket and the event stream), so tokens stay out of other URLs.
//! - A TLS client address that presents [`MAX_AUTH_FAILURES`] invalid tokens
//!   within [`AUTH_FAILURE_WINDOW`] gets 429 (with `Retry-After`) for
//!   [`AUTH_BLOCK`], whatever it sends; the block is audited.
//! - A token is `vireo_<id>_<secret>`: `id` is 16 hex digits (public, the
//!   database key), `secret` 64 hex digits (256 random bits). The database
//!   keeps only SHA-256(secret); a request's token is found by its id and its
//!   secret's hash compared in constant time.
//! - Roles: `viewer` reads everything; `operator` also starts, stops, kills,
//!   pauses, resumes, reboots and sets balloons; `admin` also creates,
//!   changes and deletes VMs and manages tokens. The middleware decides from
//!   the method and path alone ([`required_role`]); a changing request that
//!   no rule names needs `admin` (closed by default).
//! - Every non-GET request and every denied one is a JSON line in
//!   `STATE_DIR/audit.log`; denials are also logged with tracing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::clock::{now_secs, rfc3339};
use crate::db::Db;
use crate::error::ApiError;
use vireo_api::model::{CreateToken, NewToken, Role, TokenInfo, TokenList};

/// Who sent a request, for handlers (an axum request extension, set by the
/// middleware on every authenticated request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The token's id; None for Unix-socket clients.
    pub token_id: Option<String>,
}

/// The connection a request came on (a request extension the server sets
/// for every connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The Unix socket; the caller's uid when the kernel told it.
    Unix {
        uid: Option<u32>,
    },
    Tls(SocketAddr),
}

impl Transport {
    fn peer(&self) -> String {
        match self {
            Transport::Unix { uid: Some(uid) } => format!("unix:uid={uid}"),
            Transport::Unix { uid: None } => "unix:uid=unknown".into(),
            Transport::Tls(a) => a.to_string(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Transport::Unix { .. } => "unix",
            Transport::Tls(_) => "tls",
        }
    }
}

/// Invalid tokens from one address within [`AUTH_FAILURE_WINDOW`] before it
/// is refused for [`AUTH_BLOCK`].
pub const MAX_AUTH_FAILURES: u32 = 10;
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
pub const AUTH_BLOCK: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond, stale entries are dropped first.
const MAX_TRACKED: usize = 4096;

/// Failed authentications of one client address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// Per-address counts of invalid tokens, and the blocks they earn.
#[derive(Debug, Default)]
struct Limiter {
    by_ip: HashMap<IpAddr, Failures>,
}

impl Limiter {
    /// How long `ip` is still refused, if it is.
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let f = self.by_ip.get_mut(&ip)?;
        match f.blocked_until {
            Some(t) if t > now => Some(t - now),
            Some(_) => {
                self.by_ip.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Count a failure; true when it starts a block.
    fn failed(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.by_ip.len() >= MAX_TRACKED && !self.by_ip.contains_key(&ip) {
            self.by_ip.retain(|_, f| match f.blocked_until {
                Some(t) => t > now,
                None => now.duration_since(f.since) < AUTH_FAILURE_WINDOW,
            });
            if self.by_ip.len() >= MAX_TRACKED {
                // Still full of live entries: forget the oldest window.
                if let Some(oldest) = self
                    .by_ip
                    .iter()
                    .filter(|(_, f)| f.blocked_until.is_none())
                    .min_by_key(|(_, f)| f.since)
                    .map(|(ip, _)| *ip)
                {
                    self.by_ip.remove(&oldest);
                }
            }
        }
        let f = self.by_ip.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            blocked_until: None,
        });
        if now.duration_since(f.since) >= AUTH_FAILURE_WINDOW {
            *f = Failures {
                since: now,
                count: 0,
                blocked_until: None,
            };
        }
        f.count += 1;
        if f.count >= MAX_AUTH_FAILURES && f.blocked_until.is_none() {
            f.blocked_until = Some(now + AUTH_BLOCK);
            return true;
        }
        false
    }
}

/// The role each changing request needs: (method, path pattern, role);
/// `*` in a pattern is one path segment. Reads (GET, HEAD) of anything under
/// /v1 and /metrics need `viewer` unless listed here; any other method on a
/// path not listed needs `admin`.
pub const RULES: &[(&str, &str, Role)] = &[
    ("POST", "/v1/vms", Role::Admin),
    ("PATCH", "/v1/vms/*", Role::Admin),
    ("DELETE", "/v1/vms/*", Role::Admin),
    ("POST", "/v1/vms/*/start", Role::Operator),
    ("POST", "/v1/vms/*/stop", Role::Operator),
    ("POST", "/v1/vms/*/kill", Role::Operator),
    ("POST", "/v1/vms/*/pause", Role::Operator),
    ("POST", "/v1/vms/*/resume", Role::Operator),
    ("POST", "/v1/vms/*/reboot", Role::Operator),
    ("PUT", "/v1/vms/*/balloon", Role::Operator),
    ("POST", "/v1/vms/*/snapshots", Role::Operator),
    ("POST", "/v1/vms/*/snapshots/*/restore", Role::Operator),
    ("DELETE", "/v1/vms/*/snapshots/*", Role::Admin),
    ("POST", "/v1/vms/*/clone", Role::Admin),
    ("POST", "/v1/vms/*/migrate", Role::Admin),
    ("POST", "/v1/vms/*/migrate-in", Role::Admin),
    ("GET", "/v1/tokens", Role::Admin),
    ("POST", "/v1/tokens", Role::Admin),
    ("DELETE", "/v1/tokens/*", Role::Admin),
];

fn pattern_matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The role `method path` needs; None when it is public (the web UI's files
/// and `GET /v1/openapi.json`).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let protected = path == "/v1" || path.starts_with("/v1/") || path == "/metrics";
    let read = method == Method::GET || method == Method::HEAD;
    if !protected || (read && path == "/v1/openapi.json") {
        return None;
    }
    let m = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    if let Some((_, _, role)) = RULES
        .iter()
        .find(|(rm, pat, _)| *rm == m && pattern_matches(pat, path))
    {
        return Some(*role);
    }
    Some(if read { Role::Viewer } else { Role::Admin })
}

// ---- tokens -------------------------------------------------------------

const TOKEN_PREFIX: &str = "vireo_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Longest token name.
pub const MAX_NAME: usize = 64;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// SHA-256 of a token's secret part: what the database keeps.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compare two hashes without an early exit (no timing hint of how much of
/// a guessed secret was right).
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Split a token into (id, secret); None if it is not a vireo token.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (is_lower_hex(id, 2 * ID_BYTES) && is_lower_hex(secret, 2 * SECRET_BYTES))
        .then_some((id, secret))
}

/// A new token: (id, the whole token to hand out once, the secret's hash).
fn new_token() -> Result<(String, String, [u8; 32]), ApiError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id)
        .and_then(|_| rng.fill(&mut secret))
        .map_err(|_| ApiError::internal("the system's random number generator failed"))?;
    let (id, secret) = (hex(&id), hex(&secret));
    let hash = hash_secret(&secret);
    Ok((id.clone(), format!("{TOKEN_PREFIX}{id}_{secret}"), hash))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenRef {
    pub id: String,
    pub name: String,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub role: Role,
    /// The token used; null on the Unix socket.
    #[schema(required = true)]
    pub token: Option<TokenRef>,
    /// `unix` or `tls`.
    #[schema(schema_with = transport_schema)]
    pub transport: String,
}

/// [`WhoAmI::transport`]: the names [`Transport::name`] gives.
fn transport_schema() -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["unix", "tls"]))
}

/// A stored token: what the API shows and the secret's hash.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    pub secret_sha256: [u8; 32],
}

impl StoredToken {
    fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role,
            created_at: rfc3339(self.created_at),
        }
    }
}

/// Tokens (kept in the state database, cached in memory: every TCP request
/// looks its token up) and the audit log.
pub struct Auth {
    db: Mutex<Db>,
    tokens: RwLock<HashMap<String, StoredToken>>,
    audit: Option<Mutex<File>>,
    limiter: Mutex<Limiter>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The audit log's name in the state directory.
pub const AUDIT_LOG: &str = "audit.log";

impl Auth {
    /// Tokens from `db`; audit lines appended to `audit_log` (None: none).
    pub fn new(db: Db, audit_log: Option<&Path>) -> Result<Arc<Auth>, String> {
        let tokens = db
            .list_tokens()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let audit = match audit_log {
            Some(p) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(p)
                    .map_err(|e| format!("cannot open the audit log {}: {e}", p.display()))?,
            )),
            None => None,
        };
        Ok(Arc::new(Auth {
            db: Mutex::new(db),
            tokens: RwLock::new(tokens),
            audit,
            limiter: Mutex::new(Limiter::default()),
        }))
    }

    /// The token a request presents, if valid.
    pub fn check(&self, token: &str) -> Option<Caller> {
        let (id, secret) = parse_token(token)?;
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let t = tokens.get(id)?;
        same_hash(&hash_secret(secret), &t.secret_sha256).then(|| Caller {
            role: t.role,
            token_id: Some(t.id.clone()),
        })
    }

    pub fn list(&self) -> Vec<TokenInfo> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<&StoredToken> = tokens.values().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v.into_iter().map(StoredToken::info).collect()
    }

    pub fn create(&self, req: &CreateToken) -> Result<NewToken, ApiError> {
        if req.name.chars().count() > MAX_NAME || req.name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("name: at most {MAX_NAME} characters, no control characters"),
            ));
        }
        let (id, token, hash) = new_token()?;
        let stored = StoredToken {
            id,
            name: req.name.clone(),
            role: req.role,
            created_at: now_secs(),
            secret_sha256: hash,
        };
        lock(&self.db).create_token(&stored)?;
        let info = stored.info();
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stored.id.clone(), stored);
        tracing::info!("created {} token {}", info.role.as_str(), info.id);
        Ok(NewToken {
            id: info.id,
            name: info.name,
            role: info.role,
            created_at: info.created_at,
            token,
        })
    }

    /// Revoke (delete) a token. False if there is none with that id.
    pub fn revoke(&self, id: &str) -> Result<bool, ApiError> {
        let gone = lock(&self.db).delete_token(id)?;
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if gone {
            tracing::info!("revoked token {id}");
        }
        Ok(gone)
    }

    fn name_of(&self, id: &str) -> Option<String> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens.get(id).map(|t| t.name.clone())
    }

    fn audit(&self, line: &AuditLine<'_>) {
        let Some(f) = &self.audit else { return };
        let Ok(mut text) = serde_json::to_vec(line) else {
            return;
        };
        text.push(b'\n');
        if let Err(e) = lock(f).write_all(&text) {
            tracing::warn!("cannot write the audit log: {e}");
        }
    }
}

#[derive(Serialize)]
struct AuditLine<'a> {
    time: String,
    peer: String,
    token_id: Option<&'a str>,
    role: Option<Role>,
    method: &'a str,
    path: &'a str,
    status: u16,
    decision: &'static str,
}

/// `path?query` without any `access_token` parameter.
fn audit_path(path: &str, query: Option<&str>) -> String {
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && *p != "access_token" && !p.starts_with("access_token="))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The GET streams that take `?access_token=` (browsers cannot set headers
/// on a WebSocket or an EventSource); everywhere else it is ignored.
const QUERY_TOKEN_ROUTES: &[&str] = &["/v1/vms/*/console/ws", "/v1/events"];

/// Whether `?access_token=` counts for `method path`.
pub fn query_token_allowed(method: &Method, path: &str) -> bool {
    method == Method::GET && QUERY_TOKEN_ROUTES.iter().any(|p| pattern_matches(p, path))
}

/// The token a request presents: the Bearer header, else `access_token` on
/// the routes that take it.
fn presented_token(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_string());
    }
    if !query_token_allowed(req.method(), req.uri().path()) {
        return None;
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|p| p.strip_prefix("access_token="))
        .map(str::to_string)
}

fn unauthorized(message: &str, invalid: bool) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    let challenge = if invalid {
        "Bearer realm=\"vireo\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"vireo\""
    };
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    r
}

/// The middleware in front of every route: authenticate, authorize by
/// [`required_role`], hand handlers the [`Caller`], audit.
pub async fn middleware(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    // A request without a transport did not come through the server's
    // listeners: treat it like an unauthenticated network client.
    let transport = req.extensions().get::<Transport>().copied();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let shown_path = audit_path(&path, req.uri().query());
    let required = required_role(&method, &path);

    let peer = transport
        .map(|t| t.peer())
        .unwrap_or_else(|| "unknown".into());
    let ip = match transport {
        Some(Transport::Tls(a)) => Some(a.ip()),
        _ => None,
    };
    let now = Instant::now();
    if let Some(left) = ip.and_then(|ip| lock(&auth.limiter).blocked(ip, now)) {
        let secs = left.as_secs().max(1);
        tracing::warn!(
            "API request refused (429): {method} {shown_path} from {peer}: too many invalid tokens, blocked for {secs} s more"
        );
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            format!(
                "too many invalid tokens from {}; try again in {secs} s",
                ip.map(|i| i.to_string()).unwrap_or_default()
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        auth.audit(&AuditLine {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            peer,
            token_id: None,
            role: None,
            method: method.as_str(),
            path: &shown_path,
            status: 429,
            decision: "rate_limited",
        });
        return r;
    }
    let presented = presented_token(&req);
    let caller = match transport {
        Some(Transport::Unix { .. }) => Some(Caller {
            role: Role::Admin,
            token_id: None,
        }),
        _ => presented.as_deref().and_then(|t| auth.check(t)),
    };
    if let (Some(ip), Some(_), None) = (ip, &presented, &caller) {
        if lock(&auth.limiter).failed(ip, now) {
            tracing::warn!(
                "{MAX_AUTH_FAILURES} invalid tokens from {ip} within {} s: refusing it for {} s",
                AUTH_FAILURE_WINDOW.as_secs(),
                AUTH_BLOCK.as_secs()
            );
            auth.audit(&AuditLine {
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                peer: peer.clone(),
                token_id: None,
                role: None,
                method: method.as_str(),
                path: &shown_path,
                status: 429,
                decision: "blocked",
            });
        }
    }
    let denial = match (required, &caller) {
        (None, _) => None,
        (Some(need), Some(c)) if c.role >= need => None,
        (Some(need), Some(c)) => Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this token's role is {}; {} is needed for {method} {path}",
                    c.role.as_str(),
                    need.as_str()
                ),
            )
            .into_response(),
        ),
        (Some(_), None) if presented.is_some() => Some(unauthorized(
            "the token is not valid (malformed, unknown or revoked); create one with `vireo token create`",
            true,
        )),
        (Some(_), None) => Some(unauthorized(
            "this API needs a token on TCP connections: send `Authorization: Bearer TOKEN` (create one with `vireo token create --role viewer`)",
            false,
        )),
    };
    let response = match denial {
        Some(r) => {
            tracing::warn!(
                "API request denied ({}): {method} {shown_path} from {peer} (token {}, role {})",
                r.status().as_u16(),
                caller
                    .as_ref()
                    .and_then(|c| c.token_id.as_deref())
                    .unwrap_or("-"),
                caller.as_ref().map(|c| c.role.as_str()).unwrap_or("-"),
            );
            r
        }
        None => {
            if let Some(c) = &caller {
                req.extensions_mut().insert(c.clone());
            }
            next.run(req).await
        }
    };
    let denied =
        response.status() == StatusCode::UNAUTHORIZED || response.status() == StatusCode::FORBIDDEN;
    if denied || (method != Method::GET && method != Method::HEAD) {
        auth.audit(&AuditLine {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            peer,
            token_id: caller.as_ref().and_then(|c| c.token_id.as_deref()),
            role: caller.as_ref().map(|c| c.role),
            method: method.as_str(),
            path: &shown_path,
            status: response.status().as_u16(),
            decision: if denied { "denied" } else { "allowed" },
        });
    }
    response
}

// ---- handlers -----------------------------------------------------------

type Shared = State<Arc<Auth>>;

#[utoipa::path(
    get,
    path = "/v1/whoami",
    operation_id = "whoAmI",
    summary = "The caller's role, token and transport.",
    responses((status = 200, description = "Who is asking.", body = WhoAmI))
)]
async fn whoami(
    State(auth): Shared,
    caller: Option<Extension<Caller>>,
    transport: Option<Extension<Transport>>,
) -> Result<Response, ApiError> {
    let Some(Extension(caller)) = caller else {
        return Ok(unauthorized("no caller", false));
    };
    let token = caller.token_id.as_ref().map(|id| TokenRef {
        id: id.clone(),
        name: auth.name_of(id).unwrap_or_default(),
    });
    let transport = transport.map(|Extension(t)| t.name()).unwrap_or("tls");
    Ok(crate::api::json(
        StatusCode::OK,
        &WhoAmI {
            role: caller.role,
            token,
            transport: transport.into(),
        },
    ))
}

#[utoipa::path(
    get,
    path = "/v1/tokens",
    operation_id = "listTokens",
    summary = "List the API tokens (admin; never their secrets).",
    responses((status = 200, description = "All tokens, oldest first.", body = TokenList))
)]
async fn list_tokens(State(auth): Shared) -> Response {
    crate::api::json(
        StatusCode::OK,
        &TokenList {
            tokens: auth.list(),
        },
    )
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    operation_id = "createToken",
    summary = "Create an API token (admin). The answer is the only place its secret appears.",
    request_body = CreateToken,
    responses(
        (status = 201, description = "The new token, with its secret.", body = NewToken),
        (status = 400, description = "Malformed JSON, unknown field, bad role or name; the message names the field.", body = vireo_api::model::ErrorBody),
        (status = 413, description = "Body over 64 KiB.", body = vireo_api::model::ErrorBody),
    )
)]
async fn create_token(State(auth): Shared, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateToken = crate::api::parse(&body, None)?;
    Ok(crate::api::json(StatusCode::CREATED, &auth.create(&req)?))
}

#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    operation_id = "revokeToken",
    summary = "Revoke (delete) a token (admin); requests with it get 401 from now on.",
    params(("id" = String, Path, description = "The token's id.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 404, description = "No token with that id.", body = vireo_api::model::ErrorBody),
    )
)]
async fn revoke_token(
    State(auth): Shared,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let UrlPath(id) = id.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    if !auth.revoke(&id)? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no token with id {id:?} (see `vireo token list`)"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The token API and whoami, each with its part of the OpenAPI document.
fn routes() -> OpenApiRouter<Arc<Auth>> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
}

/// The token routes' part of the API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// `app` plus the token routes, every request through [`middleware`].
pub fn protect(app: Router, auth: Arc<Auth>) -> Router {
    let (tokens, _) = routes().split_for_parts();
    let tokens = tokens
        .method_not_allowed_fallback(crate::api::method_not_allowed)
        .with_state(Arc::clone(&auth));
    app.merge(tokens)
        .layer(axum::middleware::from_fn_with_state(auth, middleware))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_table() {
        let need = |m: &str, p: &str| required_role(&Method::from_bytes(m.as_bytes()).unwrap(), p);
        use Role::*;
        // Public: the web UI and the API document.
        assert_eq!(need("GET", "/"), None);
        assert_eq!(need("GET", "/assets/app.js"), None);
        assert_eq!(need("GET", "/v1/openapi.json"), None);
        // Reads.
        for p in [
            "/v1/vms",
            "/v1/vms/web",
            "/v1/vms/web/console",
            "/v1/vms/web/console/ws",
            "/v1/vms/web/balloon",
            "/v1/events",
            "/v1/stats",
            "/v1/whoami",
            "/metrics",
            "/v1/nope",
        ] {
            assert_eq!(need("GET", p), Some(Viewer), "{p}");
            assert_eq!(need("HEAD", p), Some(Viewer), "{p}");
        }
        // Operations.
        for a in ["start", "stop", "kill", "pause", "resume", "reboot"] {
            assert_eq!(need("POST", &format!("/v1/vms/web/{a}")), Some(Operator));
        }
        assert_eq!(need("PUT", "/v1/vms/web/balloon"), Some(Operator));
        // Administration.
        assert_eq!(need("POST", "/v1/vms"), Some(Admin));
        assert_eq!(need("PATCH", "/v1/vms/web"), Some(Admin));
        assert_eq!(need("DELETE", "/v1/vms/web"), Some(Admin));
        assert_eq!(need("GET", "/v1/tokens"), Some(Admin));
        assert_eq!(need("POST", "/v1/tokens"), Some(Admin));
        assert_eq!(need("DELETE", "/v1/tokens/0123"), Some(Admin));
        // Closed by default: a change no rule names, an empty segment, a
        // changing method on the public document.
        assert_eq!(need("POST", "/v1/vms/web/frobnicate"), Some(Admin));
        assert_eq!(need("POST", "/v1/vms//start"), Some(Admin));
        assert_eq!(need("POST", "/v1/vms/web/start/x"), Some(Admin));
        assert_eq!(need("POST", "/v1/openapi.json"), Some(Admin));
        assert_eq!(need("DELETE", "/metrics"), Some(Admin));
    }

    #[test]
    fn tokens_parse_and_hash() {
        let (id, token, hash) = new_token().unwrap();
        let (pid, secret) = parse_token(&token).unwrap();
        assert_eq!(pid, id);
        assert_eq!(id.len(), 16);
        assert_eq!(secret.len(), 64);
        assert_eq!(hash_secret(secret), hash);
        assert!(!token.contains(&hex(&hash)));
        // SHA-256("abc"), the FIPS 180-2 example.
        assert_eq!(
            hex(&hash_secret("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (_, other, _) = new_token().unwrap();
        assert_ne!(token, other);
        for bad in [
            "",
            "vireo_",
            "vireo_0123456789abcdef",
            "vireo_0123456789abcdef_",
            "vireo_0123456789ABCDEF_0000000000000000000000000000000000000000000000000000000000000000",
            "other_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            "vireo_0123456789abcde_00000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
        assert!(same_hash(&hash, &hash));
        let mut h2 = hash;
        h2[31] ^= 1;
        assert!(!same_hash(&hash, &h2));
    }

    #[test]
    fn tokens_are_stored_hashed_and_checked() {
        let auth = Auth::new(Db::open_in_memory().unwrap(), None).unwrap();
        let t = auth
            .create(&CreateToken {
                name: "ci".into(),
                role: Role::Operator,
            })
            .unwrap();
        assert_eq!(
            auth.check(&t.token),
            Some(Caller {
                role: Role::Operator,
                token_id: Some(t.id.clone())
            })
        );
        // A wrong secret with the right id.
        let (id, secret) = parse_token(&t.token).unwrap();
        let flipped: String = secret
            .chars()
            .map(|c| if c == '0' { '1' } else { '0' })
            .collect();
        assert_eq!(auth.check(&format!("vireo_{id}_{flipped}")), None);
        // The database holds the hash, not the secret.
        let stored = lock(&auth.db).list_tokens().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].secret_sha256, hash_secret(secret));
        assert_eq!(auth.list()[0].name, "ci");
        assert!(auth.revoke(&t.id).unwrap());
        assert!(!auth.revoke(&t.id).unwrap());
        assert_eq!(auth.check(&t.token), None);
        let long = CreateToken {
            name: "x".repeat(MAX_NAME + 1),
            role: Role::Viewer,
        };
        assert_eq!(auth.create(&long).unwrap_err().status, 400);
    }

    #[test]
    fn openapi_schemas_match_the_token_types() {
        let doc: serde_json::Value = serde_json::from_str(crate::openapi::openapi_json()).unwrap();
        let props = |schema: &str| -> Vec<String> {
            let mut v: Vec<String> = doc["components"]["schemas"][schema]["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("schema {schema}"))
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        let keys = |v: serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let info = TokenInfo {
            id: "0123456789abcdef".into(),
            name: String::new(),
            role: Role::Viewer,
            created_at: rfc3339(0),
        };
        assert_eq!(
            keys(serde_json::to_value(&info).unwrap()),
            props("TokenInfo")
        );
        let new = NewToken {
            id: info.id.clone(),
            name: info.name.clone(),
            role: info.role,
            created_at: info.created_at.clone(),
            token: String::new(),
        };
        assert_eq!(keys(serde_json::to_value(&new).unwrap()), props("NewToken"));
        let create = CreateToken {
            name: String::new(),
            role: Role::Admin,
        };
        assert_eq!(
            keys(serde_json::to_value(&create).unwrap()),
            props("CreateToken")
        );
        let who = WhoAmI {
            role: Role::Admin,
            token: None,
            transport: "unix".into(),
        };
        assert_eq!(keys(serde_json::to_value(&who).unwrap()), props("WhoAmI"));
        let roles: Vec<Role> =
            serde_json::from_value(doc["components"]["schemas"]["Role"]["enum"].clone()).unwrap();
        assert_eq!(roles, [Role::Viewer, Role::Operator, Role::Admin]);
        // Every protected operation documents 401 and 403.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if !["get", "put", "post", "patch", "delete"].contains(&method.as_str()) {
                    continue;
                }
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                if required_role(&m, path).is_some() {
                    for code in ["401", "403"] {
                        assert!(
                            op["responses"].get(code).is_some(),
                            "{method} {path} does not document {code}: add \"{code}\": {{\"$ref\": \"#/components/responses/{}\"}}",
                            if code == "401" { "Unauthorized" } else { "Forbidden" }
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn query_tokens_count_only_on_the_browser_streams() {
        let get = Method::GET;
        assert!(query_token_allowed(&get, "/v1/vms/web/console/ws"));
        assert!(query_token_allowed(&get, "/v1/events"));
        for p in [
            "/v1/vms",
            "/v1/whoami",
            "/v1/tokens",
            "/metrics",
            "/v1/vms/web/console",
        ] {
            assert!(!query_token_allowed(&get, p), "{p}");
        }
        assert!(!query_token_allowed(&Method::POST, "/v1/events"));
    }

    #[test]
    fn invalid_tokens_block_an_address_for_a_while() {
        let mut l = Limiter::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        for i in 1..MAX_AUTH_FAILURES {
            assert!(!l.failed(ip, t0), "failure {i}");
            assert_eq!(l.blocked(ip, t0), None);
        }
        assert!(l.failed(ip, t0), "the limit starts a block");
        assert_eq!(l.blocked(ip, t0), Some(AUTH_BLOCK));
        assert_eq!(l.blocked(other, t0), None, "only that address");
        assert_eq!(l.blocked(ip, t0 + AUTH_BLOCK), None, "the block ends");
        // Failures spread over more than the window never add up to a block.
        let mut l = Limiter::default();
        for i in 0..3 * MAX_AUTH_FAILURES {
            let t = t0 + AUTH_FAILURE_WINDOW / MAX_AUTH_FAILURES * (i + 1) * 2;
            assert!(!l.failed(ip, t), "failure {i}");
        }
        // The table stays bounded.
        let mut l = Limiter::default();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.failed(IpAddr::from((i + 1).to_be_bytes()), t0);
        }
        assert!(l.by_ip.len() <= MAX_TRACKED);
    }

    #[test]
    fn audit_paths_drop_the_token() {
        assert_eq!(audit_path("/v1/events", None), "/v1/events");
        assert_eq!(
            audit_path("/v1/events", Some("access_token=vireo_x&vm=a")),
            "/v1/events?vm=a"
        );
        assert_eq!(audit_path("/v1/x", Some("access_token=s")), "/v1/x");
    }
}
