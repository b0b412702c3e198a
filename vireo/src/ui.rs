//! `vireo ui`: the web UI of a daemon that listens only on its Unix socket.
//! It opens a port on 127.0.0.1 and forwards HTTP/1.1 to the socket
//! (WebSocket upgrades and event streams included). The API paths (`/v1/*`,
//! `/metrics`) need a random session token, printed in the URL
//! (`http://127.0.0.1:PORT/#token=...`), which the UI sends as a Bearer
//! header (or `?access_token=` for WebSocket/EventSource); the proxy strips
//! it before forwarding, and the daemon sees a Unix-socket (admin) caller.
//! The UI's static files are public, as on the daemon's own TCP listener.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use clap::Args;
use hyper_util::rt::TokioIo;
use vireo_api::model::{ErrorBody, ErrorDetail};
use vireo_daemon::paths;

use crate::Failure;

pub const UI_EXAMPLES: &str = "\
Examples:
  vireo ui                          # a free port; opens the browser
  vireo ui --port 8080 --no-open    # prints the URL to open
  vireo ui --socket /run/vireo.sock

The URL carries a session token after '#' (the browser keeps it; it is not
sent in requests for the page). Anyone with the URL acts as an admin of the
daemon until `vireo ui` stops (Ctrl-C). Only 127.0.0.1 is listened on; from
another machine, use an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host) or the
daemon's own TLS listener (vireo serve --listen tcp:...).";

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Port on 127.0.0.1 [default: a free port].
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub port: u16,

    /// The daemon's Unix socket [default: $VIREO_SOCKET, else the default socket].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print the URL but do not start a browser.
    #[arg(long)]
    pub no_open: bool,
}

struct Proxy {
    socket: PathBuf,
    token: String,
}

/// A new session token: 32 random bytes, hex.
fn new_token() -> Result<String, Failure> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Failure::Vm(format!("cannot read /dev/urandom for a session token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compare without an early exit, so timing tells nothing about the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The `access_token` query parameter, and the query without it.
fn split_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("access_token", v)) => token = Some(percent_decode(v)),
            _ if pair == "access_token" => token = Some(String::new()),
            _ => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
        },
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut res = (status, json).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn unauthorized() -> Response {
    let mut res = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this `vireo ui` session needs its token: open the URL it printed (http://127.0.0.1:PORT/#token=...)".into(),
    );
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// Check the session token on API paths and take it off the request.
/// `Err` is the 401 to send back.
fn admit(req: &mut Request, token: &str) -> Result<(), Box<Response>> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    let (query_token, rest) = split_token(req.uri().query().unwrap_or(""));
    let needs_token = vireo_daemon::web::is_api_path(req.uri().path());
    if needs_token {
        let ok = [bearer.as_deref(), query_token.as_deref()]
            .into_iter()
            .flatten()
            .any(|t| same(t, token));
        if !ok {
            return Err(Box::new(unauthorized()));
        }
    }
    req.headers_mut().remove(header::AUTHORIZATION);
    let path_and_query = if rest.is_empty() {
        req.uri().path().to_string()
    } else {
        format!("{}?{rest}", req.uri().path())
    };
    *req.uri_mut() = Uri::try_from(path_and_query).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("bad request target: {e}"),
        ))
    })?;
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("localhost"));
    Ok(())
}

async fn forward(State(p): State<Arc<Proxy>>, mut req: Request) -> Response {
    if let Err(res) = admit(&mut req, &p.token) {
        return *res;
    }
    let unreachable = |e: &dyn std::fmt::Display| {
        error(
            StatusCode::BAD_GATEWAY,
            "daemon_unreachable",
            format!(
                "cannot reach the vireo daemon at {}: {e}",
                p.socket.display()
            ),
        )
    };
    let stream = match tokio::net::UnixStream::connect(&p.socket).await {
        Ok(s) => s,
        Err(e) => return unreachable(&e),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return unreachable(&e),
        };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("ui proxy: daemon connection: {e}");
        }
    });
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let client_side = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut res = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return unreachable(&e),
    };
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let daemon_side = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                match tokio::try_join!(client_side, daemon_side) {
                    Ok((c, d)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(d),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!("ui proxy: upgrade failed: {e}"),
                }
            });
        }
        return res.map(|_| Body::empty());
    }
    res.map(Body::new)
}

/// Serve the proxy on `listener` until it fails.
async fn run_proxy(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) -> std::io::Result<()> {
    let app = Router::new().fallback(forward).with_state(proxy);
    axum::serve(listener, app).await
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handler: run until killed.
        std::future::pending::<()>().await;
    }
}

/// Start a browser on `url` (xdg-open), without waiting for it.
fn open_browser(url: &str) {
    let spawned = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if spawned.is_err() {
        eprintln!("vireo: could not start a browser (xdg-open); open the URL above yourself");
    }
}

fn check_daemon(socket: &Path) -> Result<(), Failure> {
    std::os::unix::net::UnixStream::connect(socket).map(drop).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Failure::Vm(format!(
            "cannot reach the vireo daemon at {} — start it with `vireo serve` (or pass --socket PATH)",
            socket.display()
        )),
        std::io::ErrorKind::PermissionDenied => Failure::Usage(format!(
            "cannot reach the vireo daemon at {}: permission denied (the socket is for its owner and the `vireo` group)",
            socket.display()
        )),
        _ => Failure::Vm(format!("cannot reach the vireo daemon at {}: {e}", socket.display())),
    })
}

pub fn ui(args: UiArgs) -> Result<(), Failure> {
    let socket = paths::client_socket(args.socket);
    check_daemon(&socket)?;
    let proxy = Arc::new(Proxy {
        socket,
        token: new_token()?,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Vm(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Failure::Usage(format!(
                "cannot listen on {addr}: {e} (pick another --port, or 0 for a free one)"
            ))
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| Failure::Vm(format!("the listener has no address: {e}")))?
            .port();
        let url = format!("http://127.0.0.1:{port}/#token={}", proxy.token);
        println!(
            "vireo ui: the web UI of the daemon at {}",
            proxy.socket.display()
        );
        println!("  {url}");
        println!("(Ctrl-C stops it; anyone with this URL can manage the daemon's VMs.)");
        if !args.no_open {
            open_browser(&url);
        }
        // Ctrl-C ends at once: a graceful shutdown would wait for the
        // browser's open event streams and consoles, which never end.
        tokio::select! {
            served = run_proxy(listener, proxy) => {
                served.map_err(|e| Failure::Vm(format!("serving the UI proxy: {e}")))
            }
            _ = ctrl_c() => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, auth: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn api_paths_need_the_token_and_lose_it_on_the_way() {
        let t = "abc123";
        let mut r = req("/v1/vms", Some("Bearer abc123"));
        assert!(admit(&mut r, t).is_ok());
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(r.headers()[header::HOST], "localhost");

        let mut r = req("/v1/vms/a/console/ws?x=1&access_token=abc123&y=2", None);
        assert!(admit(&mut r, t).is_ok());
        assert_eq!(r.uri().to_string(), "/v1/vms/a/console/ws?x=1&y=2");

        let mut r = req("/v1/events?access_token=abc123", None);
        assert!(admit(&mut r, t).is_ok());
        assert_eq!(r.uri().to_string(), "/v1/events");

        for (uri, auth) in [
            ("/v1/vms", None),
            ("/v1/vms", Some("Bearer wrong")),
            ("/v1/vms", Some("Basic abc123")),
            ("/metrics?access_token=abc12", None),
            ("/v1/whoami?access_token=", None),
        ] {
            let mut r = req(uri, auth);
            let res = admit(&mut r, t).expect_err(uri);
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{uri}");
            assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
        }
    }

    #[test]
    fn the_ui_files_are_public_but_never_get_a_token_through() {
        let mut r = req("/assets/index.js", None);
        assert!(admit(&mut r, "t").is_ok());
        let mut r = req("/?access_token=zzz", Some("Bearer zzz"));
        assert!(admit(&mut r, "t").is_ok());
        assert_eq!(r.uri().to_string(), "/");
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
    }

    /// A GET over a fresh connection; the whole response as text.
    async fn http_get(port: u16, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn requests_and_websockets_reach_the_socket_without_the_token() {
        use axum::extract::ws::{Message, WebSocketUpgrade};
        use axum::routing::get;
        let dir = std::env::temp_dir().join(format!("vireo-ui-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("daemon.sock");
        // A stand-in daemon: echoes what reached it, and a WebSocket echo.
        let daemon = Router::new()
            .route(
                "/v1/echo",
                get(|req: Request| async move {
                    format!(
                        "uri={} auth={:?} host={:?}",
                        req.uri(),
                        req.headers().get(header::AUTHORIZATION),
                        req.headers().get(header::HOST)
                    )
                }),
            )
            .route(
                "/v1/ws",
                get(|ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(|mut s| async move {
                        while let Some(Ok(Message::Text(t))) = s.recv().await {
                            let reply = format!("echo:{}", t.as_str());
                            if s.send(Message::Text(reply.into())).await.is_err() {
                                return;
                            }
                        }
                    })
                }),
            );
        let unix = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move { axum::serve(unix, daemon).await });
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let proxy = Arc::new(Proxy {
            socket: sock,
            token: "sesame".into(),
        });
        tokio::spawn(run_proxy(tcp, proxy));

        let res = http_get(port, "/v1/echo?a=1&access_token=sesame").await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert!(
            res.contains(r#"uri=/v1/echo?a=1 auth=None host=Some("localhost")"#),
            "{res}"
        );
        let res = http_get(port, "/v1/echo?access_token=wrong").await;
        assert!(res.starts_with("HTTP/1.1 401"), "{res}");

        let reply = tokio::task::spawn_blocking(move || {
            let url = format!("ws://127.0.0.1:{port}/v1/ws?access_token=sesame");
            let (mut ws, _) = tungstenite::connect(url).unwrap();
            ws.send(tungstenite::Message::Text("hi".into())).unwrap();
            ws.read().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), "echo:hi");
        let refused = tokio::task::spawn_blocking(move || {
            tungstenite::connect(format!("ws://127.0.0.1:{port}/v1/ws")).map(|_| ())
        })
        .await
        .unwrap();
        assert!(
            matches!(&refused, Err(tungstenite::Error::Http(r)) if r.status() == StatusCode::UNAUTHORIZED),
            "{refused:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let a = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_token().unwrap());
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &a[..63]));
        assert_eq!(percent_decode("a%2Fb+c%zz"), "a/b c%zz");
    }
}
