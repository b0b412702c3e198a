//! `GET /v1/vms/{name}/console/ws`: the live serial console over a
//! WebSocket.
//!
//! The server sends the scrollback as one binary frame, then every output
//! chunk as a binary frame. Binary or text frames from the client are the
//! guest's console input (callers who may not type get a `forbidden` error
//! frame and their input is dropped). Several clients share one console;
//! their input interleaves frame by frame. Text frames from the server are
//! JSON: `{"error":{"code","message"}}` for refused input,
//! `{"event":"lagged","lost_bytes":N}` when this client fell more than the
//! scrollback behind, and `{"event":"stopped","reason":...}` as the last
//! frame when the VM stops (then the server closes, 1000). A daemon that
//! shuts down closes with 1001 (going away); the VM keeps running.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{Extensions, StatusCode};
use axum::response::Response;

use crate::console::{Console, InputError, Next};
use crate::error::ApiError;
use crate::vms::Daemon;

/// Largest input frame written to a console; larger ones are refused with
/// an error frame (the connection stays open).
pub const MAX_INPUT_FRAME: usize = 64 * 1024;
/// Largest message the WebSocket layer accepts at all; beyond it the
/// connection is closed (1009, message too big).
const MAX_MESSAGE: usize = 1024 * 1024;

/// Whether the caller may type into consoles (operator or admin).
///
/// The auth middleware puts a `crate::auth::Caller` into the request's
/// extensions; without one (the Unix socket, trusted by file permissions)
/// the caller is an admin.
pub fn may_type(ext: &Extensions) -> bool {
    ext.get::<crate::auth::Caller>()
        .is_none_or(|c| c.role >= vireo_api::model::Role::Operator)
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console/ws",
    operation_id = "consoleWebSocket",
    summary = "The live serial console over a WebSocket (RFC 6455).",
    description = "Send a GET with `Upgrade: websocket` (browsers: `new WebSocket(url)`; over TCP pass the token as `?access_token=` since browsers cannot set headers). After the 101 the server sends the scrollback (last 256 KiB) as one binary frame, then every console output chunk as a binary frame. Binary or text frames from the client are written to the guest's console input (COM1, or hvc0 when the VM has a virtio console); several clients share the console and their input interleaves frame by frame. Input frames over 65536 bytes are refused; messages over 1 MiB close the connection (1009). Server text frames are JSON: `{\"error\":{\"code\",\"message\"}}` when input is refused (`forbidden` for viewer tokens, `frame_too_large`, `not_connected`, `input_overflow`) and dropped; `{\"event\":\"lagged\",\"lost_bytes\":N}` when this client fell more than the scrollback behind and N bytes were skipped; `{\"event\":\"stopped\",\"reason\":...}` when the VM stops, after which the server closes (1000). When the daemon shuts down it closes with 1001 (the VM keeps running). A reboot keeps the connection: the new run's output follows. Connecting to a VM that is not running gives its last scrollback, then the stopped event.",
    params(("name" = String, Path, description = "The VM's name.")),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket is open."),
        (status = 400, description = "Not a WebSocket upgrade request (code websocket_required), or a bad VM name.", body = vireo_api::model::ErrorBody),
        (status = 404, description = "No such VM.", body = vireo_api::model::ErrorBody),
        (status = 426, description = "The connection cannot be upgraded (code upgrade_required).", body = vireo_api::model::ErrorBody),
    )
)]
pub async fn console_ws(
    State(d): State<Arc<Daemon>>,
    name: Result<Path<String>, PathRejection>,
    ext: Extensions,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let name = name
        .map(|Path(n)| n)
        .map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let console = d.live_console(&name)?;
    let ws = ws.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::UPGRADE_REQUIRED {
            "upgrade_required"
        } else {
            "websocket_required"
        };
        ApiError::new(
            status,
            code,
            format!(
                "this endpoint is a WebSocket (send a GET with Upgrade: websocket): {}",
                e.body_text()
            ),
        )
    })?;
    let typing = may_type(&ext);
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(Axum(socket), console, typing)))
}

/// The two halves of a WebSocket the session needs (a trait so tests can
/// drive a session without a network).
pub trait Socket: Send {
    /// The next message; None when the client is gone.
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Message>> + Send;
    /// Send one message; false when the client is gone.
    fn send(&mut self, m: Message) -> impl std::future::Future<Output = bool> + Send;
}

struct Axum(WebSocket);

impl Socket for Axum {
    async fn recv(&mut self) -> Option<Message> {
        match self.0.recv().await {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                tracing::debug!("console WebSocket: {e}");
                None
            }
            None => None,
        }
    }

    async fn send(&mut self, m: Message) -> bool {
        self.0.send(m).await.is_ok()
    }
}

/// Console sessions running now (the server waits for them at shutdown).
static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct SessionGuard;

impl SessionGuard {
    fn new() -> SessionGuard {
        SESSIONS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        SessionGuard
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// At shutdown: tell every console client the daemon is going away (close
/// 1001) and give the sessions up to `grace` to say so.
pub async fn close_all(daemon: &Daemon, grace: std::time::Duration) {
    daemon.close_consoles();
    let deadline = tokio::time::Instant::now() + grace;
    while SESSIONS.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn json_text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error_frame(code: &str, message: &str) -> Message {
    json_text(serde_json::json!({"error": {"code": code, "message": message}}))
}

/// Serve one client until the VM stops or the client leaves.
pub async fn session<S: Socket>(mut ws: S, console: Arc<Console>, may_type: bool) {
    let _live = SessionGuard::new();
    let mut sub = console.subscribe();
    if !ws.send(Message::Binary(sub.scrollback().into())).await {
        return;
    }
    loop {
        tokio::select! {
            next = sub.next() => match next {
                Next::Output { lost, data } => {
                    if lost > 0
                        && !ws
                            .send(json_text(serde_json::json!({"event": "lagged", "lost_bytes": lost})))
                            .await
                    {
                        return;
                    }
                    if !ws.send(Message::Binary(data)).await {
                        return;
                    }
                }
                Next::Closing => {
                    ws.send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: "the vireo daemon is shutting down".into(),
                    })))
                    .await;
                    return;
                }
                Next::Stopped(reason) => {
                    ws.send(json_text(serde_json::json!({"event": "stopped", "reason": reason})))
                        .await;
                    ws.send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: "the VM stopped".into(),
                    })))
                    .await;
                    return;
                }
            },
            msg = ws.recv() => {
                let input: Bytes = match msg {
                    None | Some(Message::Close(_)) => return,
                    Some(Message::Binary(b)) => b,
                    Some(Message::Text(t)) => t.into(),
                    Some(Message::Ping(_) | Message::Pong(_)) => continue,
                };
                if let Some(reply) = take_input(&console, input, may_type) {
                    if !ws.send(reply).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Write one client frame to the console; the error frame to answer with
/// when it is refused.
fn take_input(console: &Console, input: Bytes, may_type: bool) -> Option<Message> {
    if input.is_empty() {
        return None;
    }
    if !may_type {
        return Some(error_frame(
            "forbidden",
            "viewer tokens cannot type into consoles",
        ));
    }
    if input.len() > MAX_INPUT_FRAME {
        return Some(error_frame(
            "frame_too_large",
            &format!(
                "console input frames are limited to {MAX_INPUT_FRAME} bytes (got {}); input dropped",
                input.len()
            ),
        ));
    }
    match console.write_input(input) {
        Ok(()) => None,
        Err(e @ (InputError::NotConnected | InputError::Full)) => {
            Some(error_frame(e.code(), e.message()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A socket made of two channels: what the "client" sends, what the
    /// server sent.
    struct Fake {
        from_client: mpsc::UnboundedReceiver<Message>,
        to_client: mpsc::UnboundedSender<Message>,
    }

    impl Socket for Fake {
        async fn recv(&mut self) -> Option<Message> {
            self.from_client.recv().await
        }
        async fn send(&mut self, m: Message) -> bool {
            self.to_client.send(m).is_ok()
        }
    }

    struct Client {
        tx: mpsc::UnboundedSender<Message>,
        rx: mpsc::UnboundedReceiver<Message>,
    }

    fn connect(console: &Arc<Console>, may_type: bool) -> (Client, tokio::task::JoinHandle<()>) {
        let (ctx, from_client) = mpsc::unbounded_channel();
        let (to_client, crx) = mpsc::unbounded_channel();
        let task = tokio::spawn(session(
            Fake {
                from_client,
                to_client,
            },
            Arc::clone(console),
            may_type,
        ));
        (Client { tx: ctx, rx: crx }, task)
    }

    async fn next_text(c: &mut Client) -> serde_json::Value {
        match c.rx.recv().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn next_binary(c: &mut Client) -> Vec<u8> {
        match c.rx.recv().await {
            Some(Message::Binary(b)) => b.to_vec(),
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn scrollback_first_then_output_then_the_stop() {
        let console = Console::new();
        console.push(b"boot log\n");
        let (mut a, ta) = connect(&console, true);
        assert_eq!(next_binary(&mut a).await, b"boot log\n");
        console.push(b"more");
        assert_eq!(next_binary(&mut a).await, b"more");
        console.end("powered off");
        assert_eq!(
            next_text(&mut a).await,
            serde_json::json!({"event": "stopped", "reason": "powered off"})
        );
        assert!(matches!(a.rx.recv().await, Some(Message::Close(_))));
        ta.await.unwrap();
    }

    #[tokio::test]
    async fn input_reaches_the_pipe_and_is_refused_for_viewers_and_oversize() {
        let console = Console::new();
        let (pipe_tx, mut pipe_rx) = tokio::net::unix::pipe::pipe().unwrap();
        console.attach_input(pipe_tx);
        let (mut op, _t1) = connect(&console, true);
        let (mut viewer, _t2) = connect(&console, false);
        assert_eq!(next_binary(&mut op).await, b"");
        assert_eq!(next_binary(&mut viewer).await, b"");

        viewer.tx.send(Message::Text("rm -rf /".into())).unwrap();
        let v = next_text(&mut viewer).await;
        assert_eq!(v["error"]["code"], "forbidden", "{v}");

        let big = vec![b'x'; MAX_INPUT_FRAME + 1];
        op.tx.send(Message::Binary(big.into())).unwrap();
        let v = next_text(&mut op).await;
        assert_eq!(v["error"]["code"], "frame_too_large", "{v}");

        op.tx.send(Message::Text("ls\r".into())).unwrap();
        op.tx
            .send(Message::Binary(vec![b'x'; MAX_INPUT_FRAME].into()))
            .unwrap();
        let mut got = vec![0u8; 3 + MAX_INPUT_FRAME];
        tokio::io::AsyncReadExt::read_exact(&mut pipe_rx, &mut got)
            .await
            .unwrap();
        assert_eq!(&got[..3], b"ls\r", "only the operator's input arrives");
        assert!(got[3..].iter().all(|&b| b == b'x'));

        // Both see the same output.
        console.push(b"shared");
        assert_eq!(next_binary(&mut op).await, b"shared");
        assert_eq!(next_binary(&mut viewer).await, b"shared");
    }

    #[tokio::test]
    async fn input_to_a_stopped_console_is_refused() {
        let console = Console::new();
        let (mut c, _t) = connect(&console, true);
        assert_eq!(next_binary(&mut c).await, b"");
        c.tx.send(Message::Text("x".into())).unwrap();
        let v = next_text(&mut c).await;
        assert_eq!(v["error"]["code"], "not_connected", "{v}");
    }
}
