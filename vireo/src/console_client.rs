//! `vireo vm console NAME`: a live attach to a VM's serial console through
//! the daemon's WebSocket (`GET /v1/vms/{name}/console/ws`), like
//! `virsh console`: the terminal goes to raw mode, keystrokes go to the
//! guest, Ctrl-] detaches.
//!
//! The WebSocket client is tungstenite's blocking one, over any `Read +
//! Write` stream the API client connects (the Unix socket today). One thread
//! owns the socket: it reads with a short timeout and, between reads, sends
//! what the stdin thread has read.

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::{ClientRequestBuilder, Message, WebSocket};
use vireo_api::model::ErrorBody;

use crate::console::{stdin_is_tty, RawTerminal};
use crate::Failure;

/// Ctrl-]: detaches, as in virsh and telnet.
pub const DETACH: u8 = 0x1d;
/// How long one read of the socket waits before input is forwarded.
pub const POLL: Duration = Duration::from_millis(20);
/// How long the WebSocket handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the stdin thread hands to the socket thread.
enum Input {
    Bytes(Vec<u8>),
    /// Ctrl-] on the terminal.
    Detach,
    /// End of (piped) stdin.
    Eof,
}

/// Split terminal input at Ctrl-]: the bytes before it, and whether it came.
pub fn split_detach(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == DETACH) {
        Some(i) => (&input[..i], true),
        None => (input, false),
    }
}

/// Open the console WebSocket at `path` over `stream` (whose reads should
/// time out after a short while: the session polls). `auth` is a header
/// (name, value) to send, if any.
pub fn open<S: Read + Write>(
    stream: S,
    path: &str,
    auth: Option<(&str, String)>,
) -> Result<WebSocket<S>, Failure> {
    let uri = format!("ws://localhost{path}")
        .parse()
        .map_err(|e| Failure::Usage(format!("bad console path {path}: {e}")))?;
    let mut builder = ClientRequestBuilder::new(uri);
    if let Some((header, value)) = auth {
        builder = builder.with_header(header, value);
    }
    let request = builder
        .into_client_request()
        .map_err(|e| Failure::Usage(format!("cannot build the console request: {e}")))?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut result = tungstenite::client::client(request, stream);
    loop {
        match result {
            Ok((ws, _)) => return Ok(ws),
            Err(HandshakeError::Interrupted(mid)) => {
                if Instant::now() > deadline {
                    return Err(Failure::Vm(
                        "the daemon did not answer the console request in time".into(),
                    ));
                }
                result = mid.handshake();
            }
            Err(HandshakeError::Failure(e)) => return Err(handshake_failure(e)),
        }
    }
}

/// An HTTP error reply to the upgrade is the API's JSON error.
fn handshake_failure(e: tungstenite::Error) -> Failure {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            let message = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => e.error.message,
                Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
            };
            if (400..500).contains(&status) {
                Failure::Usage(message)
            } else {
                Failure::Vm(message)
            }
        }
        other => Failure::Vm(format!("opening the console WebSocket: {other}")),
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Ctrl-] on the terminal.
    Detached,
    /// The VM stopped, with the daemon's reason.
    Stopped(String),
}

/// A server text frame, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    Stopped(String),
    Error(String),
    Lagged(u64),
    Other(String),
}

pub fn notice(text: &str) -> Notice {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return Notice::Other(text.to_string()),
    };
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
    match v.get("event").and_then(|e| e.as_str()) {
        Some("stopped") => Notice::Stopped(s("/reason").unwrap_or_default()),
        Some("lagged") => Notice::Lagged(v["lost_bytes"].as_u64().unwrap_or(0)),
        _ => match s("/error/message") {
            Some(m) => Notice::Error(m),
            None => Notice::Other(text.to_string()),
        },
    }
}

/// Attach the terminal (or pipes) to an open console WebSocket until the
/// VM stops or the user detaches.
pub fn attach<S: Read + Write>(mut ws: WebSocket<S>, name: &str) -> Result<End, Failure> {
    let tty = stdin_is_tty();
    let raw = if tty {
        match RawTerminal::enable() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("vireo: cannot put the terminal in raw mode ({e}); line mode it is");
                None
            }
        }
    } else {
        None
    };
    if tty {
        eprint!("Connected to {name} (Ctrl-] to detach)\r\n");
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_stdin(tx, tty))
        .map_err(|e| Failure::Vm(format!("cannot start the input thread: {e}")))?;
    let end = pump(&mut ws, &rx);
    drop(raw);
    match &end {
        Ok(End::Detached) => {
            let _ = ws.close(None);
            let _ = ws.flush();
            eprintln!("\nDetached from {name}");
        }
        Ok(End::Stopped(reason)) => eprintln!("\nvireo: VM {name} stopped: {reason}"),
        Err(_) => {}
    }
    end
}

fn read_stdin(tx: mpsc::Sender<Input>, tty: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Input::Eof);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = tx.send(Input::Eof);
                return;
            }
        };
        let (bytes, detach) = if tty {
            split_detach(&buf[..n])
        } else {
            (&buf[..n], false)
        };
        if !bytes.is_empty() && tx.send(Input::Bytes(bytes.to_vec())).is_err() {
            return;
        }
        if detach {
            let _ = tx.send(Input::Detach);
            return;
        }
    }
}

/// A read or write that timed out: the session polls, so not an error (a
/// frame whose write timed out stays queued and goes with the next flush).
fn timed_out(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

fn pump<S: Read + Write>(
    ws: &mut WebSocket<S>,
    input: &mpsc::Receiver<Input>,
) -> Result<End, Failure> {
    let lost = |e: tungstenite::Error| Failure::Vm(format!("the console connection broke: {e}"));
    let mut out = std::io::stdout();
    let mut stdin_open = true;
    loop {
        while stdin_open {
            match input.try_recv() {
                Ok(Input::Bytes(b)) => match ws.send(Message::binary(b)) {
                    Err(e) if !timed_out(&e) => return Err(lost(e)),
                    _ => {}
                },
                Ok(Input::Detach) => return Ok(End::Detached),
                Ok(Input::Eof) | Err(mpsc::TryRecvError::Disconnected) => stdin_open = false,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        let msg = match ws.read() {
            Ok(m) => m,
            Err(e) if timed_out(&e) => continue,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Err(Failure::Vm(
                    "the daemon closed the console connection".into(),
                ))
            }
            Err(e) => return Err(lost(e)),
        };
        match msg {
            Message::Binary(b) => {
                out.write_all(&b)
                    .and_then(|_| out.flush())
                    .map_err(|e| Failure::Vm(format!("writing the console to stdout: {e}")))?;
            }
            Message::Text(t) => match notice(t.as_str()) {
                Notice::Stopped(reason) => return Ok(End::Stopped(reason)),
                Notice::Error(m) => eprint!("vireo: {m}\r\n"),
                Notice::Lagged(n) => eprint!("\r\nvireo: {n} bytes of console output skipped (this terminal fell behind)\r\n"),
                Notice::Other(t) => eprint!("vireo: the daemon said: {t}\r\n"),
            },
            Message::Close(frame) => {
                let why = frame
                    .map(|f| format!(" ({})", f.reason))
                    .filter(|w| w != " ()")
                    .unwrap_or_default();
                return Err(Failure::Vm(format!(
                    "the daemon closed the console connection{why}; the VM goes on"
                )));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_close_bracket_detaches() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1d"), (&b""[..], true));
    }

    #[test]
    fn server_notices_decode() {
        assert_eq!(
            notice(r#"{"event":"stopped","reason":"powered off"}"#),
            Notice::Stopped("powered off".into())
        );
        assert_eq!(
            notice(r#"{"error":{"code":"forbidden","message":"no typing"}}"#),
            Notice::Error("no typing".into())
        );
        assert_eq!(
            notice(r#"{"event":"lagged","lost_bytes":7}"#),
            Notice::Lagged(7)
        );
        assert_eq!(notice("hi"), Notice::Other("hi".into()));
    }
}
