//! The blocking HTTP/1.1 client of the daemon's REST API (one request per
//! connection), over its Unix socket (as admin, no token) or over TLS to a
//! `tcp:` listener with a token and the CA to trust. `vireo vm`, `vireo
//! token`, the console client and the daemon tests use it; the CLI's flags
//! (`--socket`, `--url`, `--token-file`, `--ca-cert`) and the exit status
//! of each error are the binary's.
//!
//! [`Client::connect`] and [`Client::auth_header`] give other protocols (the
//! console's WebSocket) the same transport.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use crate::model::ErrorBody;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to the daemon failed. [`ClientError::is_user_error`]
/// tells what the user can fix (a bad URL, a refused request) from what
/// failed on the daemon's side or on the way.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("{}: {why}", path.display())]
    CaCert { path: PathBuf, why: String },
    #[error("TLS set-up: {0}")]
    TlsSetup(String),
    #[error("cannot reach the vireo daemon at {daemon} — start it with `vireo serve`")]
    NotRunning { daemon: String },
    #[error(
        "cannot reach the vireo daemon at {daemon}: permission denied (the socket is for its \
         owner and the `vireo` group)"
    )]
    PermissionDenied { daemon: String },
    #[error("cannot reach the vireo daemon at {daemon}: {why}")]
    Unreachable { daemon: String, why: String },
    #[error("the certificate of the vireo daemon at {url} is not trusted (it is not signed by a CA this client knows)")]
    UntrustedCertificate { url: String },
    #[error(
        "the certificate of the vireo daemon at {url} is not for {host}: connect with a name \
         the certificate lists, or give the daemon a certificate for {host}"
    )]
    CertificateNotForHost { url: String, host: String },
    #[error(
        "the certificate of the vireo daemon at {url} is a CA certificate (basicConstraints \
         CA:TRUE), which TLS clients refuse as a server's"
    )]
    CaAsServerCertificate { url: String },
    #[error("the certificate of the vireo daemon at {url} is not accepted ({why})")]
    BadCertificate { url: String, why: String },
    #[error("TLS with the vireo daemon at {url} failed: {why}")]
    Tls { url: String, why: String },
    #[error("talking to the vireo daemon at {daemon}: {source}")]
    Io {
        daemon: String,
        source: std::io::Error,
    },
    #[error("the vireo daemon at {daemon} sent a malformed HTTP reply")]
    MalformedReply { daemon: String },
    #[error("the daemon sent a reply this vireo cannot read: {0}")]
    Decode(serde_json::Error),
    /// The daemon answered with an error status; `message` is its
    /// `error.message` (or the raw body).
    #[error("{}", api_error_text(daemon, *status, *token_sent, message))]
    Api {
        daemon: String,
        status: u16,
        message: String,
        token_sent: bool,
    },
}

fn api_error_text(daemon: &str, status: u16, token_sent: bool, message: &str) -> String {
    match status {
        401 if token_sent => {
            format!("{daemon} refused the token (unknown, revoked or mistyped): {message}")
        }
        401 => format!("{daemon} needs a token: {message}"),
        403 => format!("{daemon} refused: {message}"),
        _ => message.to_string(),
    }
}

impl ClientError {
    /// Whether the user can fix it (a 4xx reply, a bad URL or CA file, an
    /// untrusted certificate, a socket they may not open) rather than the
    /// daemon or the network having failed.
    pub fn is_user_error(&self) -> bool {
        match self {
            ClientError::BadUrl { .. }
            | ClientError::CaCert { .. }
            | ClientError::PermissionDenied { .. }
            | ClientError::UntrustedCertificate { .. }
            | ClientError::CertificateNotForHost { .. }
            | ClientError::CaAsServerCertificate { .. }
            | ClientError::BadCertificate { .. } => true,
            ClientError::Api { status, .. } => (400..500).contains(status),
            _ => false,
        }
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(ClientError::Decode)
}

/// A connection to the daemon: a Unix socket or TLS over TCP.
pub trait Stream: Read + Write + Send {
    /// Set the read and write timeouts of the socket underneath (after a
    /// TLS handshake done with the longer connect timeout).
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(timeout))?;
        self.sock.set_write_timeout(Some(timeout))
    }
}

enum Target {
    Unix(PathBuf),
    Tls {
        url: String,
        host: String,
        port: u16,
        server_name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

/// A blocking HTTP/1.1 client of the daemon, one request per connection.
pub struct Client {
    target: Target,
    token: Option<String>,
}

/// `https://HOST[:PORT][/]` -> (host, port); IPv6 hosts in brackets.
fn parse_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = |why: &str| ClientError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = match url.split_once("://") {
        Some(("https", rest)) => rest,
        Some(("http", _)) => {
            return Err(bad(
                "the daemon serves TCP clients only over TLS; use https://",
            ))
        }
        _ => return Err(bad("expected https://HOST:PORT")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('@') || authority.is_empty() {
        return Err(bad("expected https://HOST:PORT (no path or user)"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| bad(&format!("{p:?} is not a port number")))?,
        None => 443,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port))
}

fn load_roots(ca_cert: Option<&Path>) -> Result<rustls::RootCertStore, ClientError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let bad = |why: String| ClientError::CaCert {
                path: path.to_path_buf(),
                why,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| bad(format!("cannot read a PEM certificate from it: {e:?}")))?;
            if certs.is_empty() {
                return Err(bad(
                    "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
                ));
            }
            // A bundle (the daemon passes the system's when a migration
            // names no CA) may hold certificates rustls cannot use; the
            // others still count.
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad("no usable CA certificate in it".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(roots)
}

impl Client {
    /// A client of the daemon on a Unix socket.
    pub fn unix(socket: PathBuf) -> Client {
        Client {
            target: Target::Unix(socket),
            token: None,
        }
    }

    /// A client of the daemon's TLS listener at `url` (`https://HOST[:PORT]`),
    /// trusting the CA certificates in `ca_cert` (else the system's), sending
    /// `token` with each request.
    pub fn tls(
        url: &str,
        ca_cert: Option<&Path>,
        token: Option<String>,
    ) -> Result<Client, ClientError> {
        let (host, port) = parse_url(url)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|e| ClientError::BadUrl {
            url: url.to_string(),
            why: format!("bad host name: {e}"),
        })?;
        let roots = load_roots(ca_cert)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::TlsSetup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Client {
            target: Target::Tls {
                url: format!(
                    "https://{}",
                    if host.contains(':') {
                        format!("[{host}]:{port}")
                    } else {
                        format!("{host}:{port}")
                    }
                ),
                host,
                port,
                server_name,
                config: Arc::new(config),
            },
            token,
        })
    }

    /// Whether requests carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The daemon, for messages: `unix:PATH` or `https://HOST:PORT`.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Unix(p) => format!("unix:{}", p.display()),
            Target::Tls { url, .. } => url.clone(),
        }
    }

    /// The `Host` header value to send.
    pub fn host(&self) -> String {
        match &self.target {
            Target::Unix(_) => "localhost".into(),
            Target::Tls { host, port, .. } if host.contains(':') => format!("[{host}]:{port}"),
            Target::Tls { host, port, .. } => format!("{host}:{port}"),
        }
    }

    /// The header that authenticates requests, `("Authorization", "Bearer
    /// TOKEN")`; None on a Unix socket (its clients are trusted) or without
    /// a token.
    pub fn auth_header(&self) -> Option<(&'static str, String)> {
        match (&self.target, &self.token) {
            (Target::Tls { .. }, Some(t)) => Some(("Authorization", format!("Bearer {t}"))),
            _ => None,
        }
    }

    /// Open a connection to the daemon (TLS handshake done), with `timeout`
    /// for reads and writes.
    pub fn connect_with_timeout(&self, timeout: Duration) -> Result<Box<dyn Stream>, ClientError> {
        match &self.target {
            Target::Unix(socket) => {
                let daemon = socket.display().to_string();
                let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        ClientError::NotRunning { daemon }
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        ClientError::PermissionDenied { daemon }
                    }
                    _ => ClientError::Unreachable {
                        daemon,
                        why: e.to_string(),
                    },
                })?;
                let _ = stream.set_read_timeout(Some(timeout));
                let _ = stream.set_write_timeout(Some(timeout));
                Ok(Box::new(stream))
            }
            Target::Tls {
                url,
                host,
                port,
                server_name,
                config,
            } => {
                let unreachable = |why: String| {
                    ClientError::Unreachable {
                    daemon: url.clone(),
                    why: format!(
                        "{why} (is `vireo serve --listen tcp:...` running there, and the port open?)"
                    ),
                }
                };
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
                    .collect();
                let mut last = None;
                let mut tcp = None;
                for addr in &addrs {
                    match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            tcp = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let mut tcp = tcp.ok_or_else(|| {
                    unreachable(
                        last.map(|e| e.to_string())
                            .unwrap_or_else(|| "no address".into()),
                    )
                })?;
                let _ = tcp.set_read_timeout(Some(timeout));
                let _ = tcp.set_write_timeout(Some(timeout));
                let _ = tcp.set_nodelay(true);
                let mut conn =
                    rustls::ClientConnection::new(Arc::clone(config), server_name.clone())
                        .map_err(|e| ClientError::TlsSetup(format!("{url}: {e}")))?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut tcp)
                        .map_err(|e| tls_failure(url, host, e))?;
                }
                Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        }
    }

    /// [`Client::connect_with_timeout`] with the default timeout. The
    /// console's WebSocket client speaks over this stream.
    pub fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        self.connect_with_timeout(DEFAULT_TIMEOUT)
    }

    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        self.call_with_timeout(method, path, body, DEFAULT_TIMEOUT)
    }

    pub fn call_with_timeout<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        decode(&self.request(method, path, body, timeout)?)
    }

    /// Send a request; a 2xx reply's body, or the API error.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let Response { status, body, .. } = self.send(method, path, body, timeout)?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.message,
            Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
        };
        Err(ClientError::Api {
            daemon: self.describe(),
            status,
            message,
            token_sent: self.token.is_some(),
        })
    }

    /// Send a request and return the reply whatever its status (for
    /// callers that look at error replies themselves, such as tests).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let daemon = self.describe();
        let mut stream = self.connect_with_timeout(timeout)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            self.host(),
            body.len()
        );
        if let Some((name, value)) = self.auth_header() {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let io_err = |source: std::io::Error| ClientError::Io {
            daemon: daemon.clone(),
            source,
        };
        stream.write_all(req.as_bytes()).map_err(io_err)?;
        stream.write_all(body).map_err(io_err)?;
        stream.flush().map_err(io_err)?;
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            // A TLS peer that closes without close_notify after a complete
            // reply: the reply is still whole (Content-Length is checked
            // by the parser below).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(io_err(e)),
        }
        parse_response(&raw).ok_or(ClientError::MalformedReply { daemon })
    }
}

/// A reply of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A failed TLS handshake, naming the certificate problem when that is it.
fn tls_failure(url: &str, host: &str, e: std::io::Error) -> ClientError {
    use rustls::{CertificateError, Error as TlsError};
    let url = url.to_string();
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>());
    match tls {
        Some(TlsError::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(TlsError::InvalidCertificate(CertificateError::BadSignature)) => {
            ClientError::UntrustedCertificate { url }
        }
        Some(TlsError::InvalidCertificate(CertificateError::NotValidForName))
        | Some(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            ClientError::CertificateNotForHost {
                url,
                host: host.to_string(),
            }
        }
        // webpki's CaUsedAsEndEntity (wrapped as Other): `openssl req -x509`
        // marks its certificate CA:TRUE unless told otherwise.
        Some(TlsError::InvalidCertificate(c)) if format!("{c:?}").contains("CaUsedAsEndEntity") => {
            ClientError::CaAsServerCertificate { url }
        }
        Some(TlsError::InvalidCertificate(c)) => ClientError::BadCertificate {
            url,
            why: format!("{c:?}"),
        },
        Some(other) => ClientError::Tls {
            url,
            why: other.to_string(),
        },
        None => ClientError::Unreachable {
            daemon: url,
            why: format!("the TLS handshake failed: {e} (is it a vireo TLS listener?)"),
        },
    }
}

/// Split an HTTP/1.1 response into its status, headers and (de-chunked)
/// body.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let mut body = &raw[end + 4..];
    let response = |body: Vec<u8>| Response {
        status,
        headers: headers.clone(),
        body,
    };
    if !chunked {
        return Some(response(body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some(response(out));
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
        let plain =
            b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nContent-Type: application/json\r\n\r\n{}";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, &r.body[..]), (201, &b"{}"[..]));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("content-length"), Some("2"));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = parse_response(chunked).unwrap();
        assert_eq!((r.status, r.body), (200, b"abcde".to_vec()));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn urls_parse() {
        let ok = |u: &str| parse_url(u).ok();
        assert_eq!(ok("https://h:8443"), Some(("h".into(), 8443)));
        assert_eq!(ok("https://h:8443/"), Some(("h".into(), 8443)));
        assert_eq!(ok("https://10.0.0.1"), Some(("10.0.0.1".into(), 443)));
        assert_eq!(ok("https://[::1]:9"), Some(("::1".into(), 9)));
        assert!(parse_url("http://h:80")
            .unwrap_err()
            .to_string()
            .contains("https://"));
        for bad in [
            "h:80",
            "https://",
            "https://h:x",
            "https://h:80/v1",
            "https://[::1:9",
            "https://u@h:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
