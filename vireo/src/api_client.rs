//! The blocking HTTP/1.1 client `vireo vm` uses to reach the daemon's
//! public REST API over its Unix socket (one request per connection). API
//! errors become [`Failure`]s: 4xx are the user's to fix (exit 2), 5xx and
//! transport problems are the daemon's (exit 1).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vireo_daemon::model::ErrorBody;

use crate::Failure;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::Vm(format!(
            "the daemon sent a reply this vireo cannot read: {e}"
        ))
    })
}

/// A blocking HTTP/1.1 client over the daemon's Unix socket, one request per
/// connection.
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    /// The `Authorization` header to send on connections from [`connect`]
    /// (none on the Unix socket, whose clients are trusted by its mode).
    ///
    /// [`connect`]: Client::connect_with_timeout
    pub fn auth_header(&self) -> Option<(&'static str, String)> {
        None
    }

    /// A connection to the daemon, for protocols beyond one request (the
    /// console WebSocket), with `timeout` for reads and writes.
    pub fn connect_with_timeout(&self, timeout: Duration) -> Result<UnixStream, Failure> {
        let stream = self.connect()?;
        let _ = stream.set_read_timeout(Some(timeout));
        let _ = stream.set_write_timeout(Some(timeout));
        Ok(stream)
    }

    fn connect(&self) -> Result<UnixStream, Failure> {
        let sock = self.socket.display();
        UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Failure::Vm(format!(
                "cannot reach the vireo daemon at {sock} — start it with `vireo serve`"
            )),
            std::io::ErrorKind::PermissionDenied => Failure::Usage(format!(
                "cannot reach the vireo daemon at {sock}: permission denied (the socket is for its owner and the `vireo` group)"
            )),
            _ => Failure::Vm(format!("cannot reach the vireo daemon at {sock}: {e}")),
        })
    }

    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, Failure> {
        self.call_with_timeout(method, path, body, DEFAULT_TIMEOUT)
    }

    pub fn call_with_timeout<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<T, Failure> {
        decode(&self.request(method, path, body, timeout)?)
    }

    /// Send a request; a 2xx reply's body, or the API error as a Failure
    /// (4xx: the user's to fix, exit 2; 5xx: the daemon failed, exit 1).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let sock = self.socket.display();
        let mut stream = self.connect()?;
        let _ = stream.set_read_timeout(Some(timeout));
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let io_err =
            |e: std::io::Error| Failure::Vm(format!("talking to the vireo daemon at {sock}: {e}"));
        stream.write_all(req.as_bytes()).map_err(io_err)?;
        stream.write_all(body).map_err(io_err)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io_err)?;
        let (status, body) = parse_response(&raw).ok_or_else(|| {
            Failure::Vm(format!(
                "the vireo daemon at {sock} sent a malformed HTTP reply"
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.message,
            Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
        };
        Err(if (400..500).contains(&status) {
            Failure::Usage(message)
        } else {
            Failure::Vm(message)
        })
    }
}

/// Split an HTTP/1.1 response into its status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = &raw[end + 4..];
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((201, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((200, b"abcde".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }
}
