//! The blocking HTTP/1.1 client `vireo vm` and `vireo token` use to reach
//! the daemon's public REST API (one request per connection): over its Unix
//! socket (as admin, no token), or over TLS to a `tcp:` listener with
//! `--url https://HOST:PORT`, a token (`VIREO_TOKEN` or `--token-file`) and
//! the CA to trust (`--ca-cert`, else the system's). API errors become
//! [`Failure`]s: 4xx are the user's to fix (exit 2), 5xx and transport
//! problems are the daemon's (exit 1).
//!
//! [`Client::connect`] and [`Client::auth_header`] give other protocols (the
//! console's WebSocket) the same transport.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rustls::pki_types::{CertificateDer, ServerName};
use vireo_api::model::ErrorBody;
use vireo_daemon::paths;

use crate::Failure;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::Vm(format!(
            "the daemon sent a reply this vireo cannot read: {e}"
        ))
    })
}

/// Where the daemon is and how to authenticate: the flags every client verb
/// shares.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnArgs {
    /// The daemon's Unix socket [default: $VIREO_SOCKET, else the default socket].
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    /// A remote daemon's TLS listener, https://HOST:PORT [default: $VIREO_URL].
    /// Needs a token: $VIREO_TOKEN or --token-file.
    #[arg(long, value_name = "URL", global = true)]
    pub url: Option<String>,

    /// A file holding the API token for --url [default: $VIREO_TOKEN].
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,

    /// The CA certificate (PEM) that signed the daemon's TLS certificate
    /// [default: $VIREO_CA_CERT, else the system's trusted CAs].
    #[arg(long, value_name = "PEM", global = true)]
    pub ca_cert: Option<PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
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
fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some(("https", rest)) => rest,
        Some(("http", _)) => {
            return Err(format!(
                "--url {url}: the daemon serves TCP clients only over TLS; use https://"
            ))
        }
        _ => return Err(format!("--url {url}: expected https://HOST:PORT")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('@') || authority.is_empty() {
        return Err(format!(
            "--url {url}: expected https://HOST:PORT (no path or user)"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("--url {url}: unclosed [ in the host"))?;
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
            .map_err(|_| format!("--url {url}: {p:?} is not a port number"))?,
        None => 443,
    };
    if host.is_empty() {
        return Err(format!("--url {url}: no host"));
    }
    Ok((host.to_string(), port))
}

fn load_roots(ca_cert: Option<&Path>) -> Result<rustls::RootCertStore, Failure> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    Failure::Usage(format!(
                        "--ca-cert {}: cannot read a PEM certificate from it: {e:?}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Failure::Usage(format!(
                    "--ca-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                    path.display()
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    Failure::Usage(format!(
                        "--ca-cert {}: not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
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

    /// From the flags and the environment: --socket, else --url, else
    /// $VIREO_URL, else $VIREO_SOCKET / the default socket.
    pub fn from_args(a: ConnArgs) -> Result<Client, Failure> {
        if a.socket.is_some() && a.url.is_some() {
            return Err(Failure::Usage(
                "--socket and --url both given: pick one daemon".into(),
            ));
        }
        let url = match (&a.socket, a.url) {
            (Some(_), _) => None,
            (None, Some(u)) => Some(u),
            (None, None) => env("VIREO_URL"),
        };
        let Some(url) = url else {
            return Ok(Client::unix(paths::client_socket(a.socket)));
        };
        let (host, port) = parse_url(&url).map_err(Failure::Usage)?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| Failure::Usage(format!("--url {url}: bad host name: {e}")))?;
        let ca = a
            .ca_cert
            .or_else(|| env("VIREO_CA_CERT").map(PathBuf::from));
        let roots = load_roots(ca.as_deref())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Failure::Vm(format!("TLS set-up: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = match a.token_file {
            Some(f) => {
                let t = std::fs::read_to_string(&f)
                    .map_err(|e| Failure::Usage(format!("--token-file {}: {e}", f.display())))?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(Failure::Usage(format!(
                        "--token-file {}: the file is empty",
                        f.display()
                    )));
                }
                Some(t)
            }
            None => env("VIREO_TOKEN").map(|t| t.trim().to_string()),
        };
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
    pub fn connect_with_timeout(&self, timeout: Duration) -> Result<Box<dyn Stream>, Failure> {
        match &self.target {
            Target::Unix(socket) => {
                let sock = socket.display();
                let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Failure::Vm(format!(
                        "cannot reach the vireo daemon at {sock} — start it with `vireo serve`"
                    )),
                    std::io::ErrorKind::PermissionDenied => Failure::Usage(format!(
                        "cannot reach the vireo daemon at {sock}: permission denied (the socket is for its owner and the `vireo` group)"
                    )),
                    _ => Failure::Vm(format!("cannot reach the vireo daemon at {sock}: {e}")),
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
                    Failure::Vm(format!(
                        "cannot reach the vireo daemon at {url}: {why} (is `vireo serve --listen tcp:...` running there, and the port open?)"
                    ))
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
                        .map_err(|e| Failure::Vm(format!("TLS set-up for {url}: {e}")))?;
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
    pub fn connect(&self) -> Result<Box<dyn Stream>, Failure> {
        self.connect_with_timeout(DEFAULT_TIMEOUT)
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
        let io_err = |e: std::io::Error| {
            Failure::Vm(format!("talking to the vireo daemon at {daemon}: {e}"))
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
        let (status, body) = parse_response(&raw).ok_or_else(|| {
            Failure::Vm(format!(
                "the vireo daemon at {daemon} sent a malformed HTTP reply"
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.message,
            Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
        };
        Err(match status {
            401 if self.token.is_some() => Failure::Usage(format!(
                "{daemon} refused the token (unknown, revoked or mistyped): {message}; set VIREO_TOKEN (or --token-file) to a valid token"
            )),
            401 => Failure::Usage(format!(
                "{daemon} needs a token: set VIREO_TOKEN (or pass --token-file FILE) to a token from `vireo token create` run on the daemon's host"
            )),
            403 => Failure::Usage(format!("{daemon} refused: {message}")),
            400..=499 => Failure::Usage(message),
            _ => Failure::Vm(message),
        })
    }
}

/// A failed TLS handshake, with the fix when the certificate is the problem.
fn tls_failure(url: &str, host: &str, e: std::io::Error) -> Failure {
    use rustls::{CertificateError, Error as TlsError};
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>());
    match tls {
        Some(TlsError::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(TlsError::InvalidCertificate(CertificateError::BadSignature)) => Failure::Usage(format!(
            "the certificate of the vireo daemon at {url} is not trusted (it is not signed by a CA this vireo knows): pass --ca-cert FILE (or set VIREO_CA_CERT) with the CA certificate, e.g. the daemon's --tls-cert when it is self-signed"
        )),
        Some(TlsError::InvalidCertificate(CertificateError::NotValidForName))
        | Some(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => Failure::Usage(format!(
            "the certificate of the vireo daemon at {url} is not for {host}: connect with a name the certificate lists, or give the daemon a certificate for {host}"
        )),
        // webpki's CaUsedAsEndEntity (wrapped as Other): `openssl req -x509`
        // marks its certificate CA:TRUE unless told otherwise.
        Some(TlsError::InvalidCertificate(c)) if format!("{c:?}").contains("CaUsedAsEndEntity") => Failure::Usage(format!(
            "the certificate of the vireo daemon at {url} is a CA certificate (basicConstraints CA:TRUE), which TLS clients refuse as a server's: give the daemon a server certificate (with openssl: add -addext basicConstraints=critical,CA:FALSE) and pass its CA (or the self-signed certificate itself) with --ca-cert"
        )),
        Some(TlsError::InvalidCertificate(c)) => Failure::Usage(format!(
            "the certificate of the vireo daemon at {url} is not accepted ({c:?}): pass --ca-cert FILE with the CA that signed it, or renew it"
        )),
        Some(other) => Failure::Vm(format!("TLS with the vireo daemon at {url} failed: {other}")),
        None => Failure::Vm(format!(
            "cannot reach the vireo daemon at {url}: the TLS handshake failed: {e} (is it a vireo TLS listener?)"
        )),
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

    #[test]
    fn urls_parse() {
        assert_eq!(parse_url("https://h:8443"), Ok(("h".into(), 8443)));
        assert_eq!(parse_url("https://h:8443/"), Ok(("h".into(), 8443)));
        assert_eq!(parse_url("https://10.0.0.1"), Ok(("10.0.0.1".into(), 443)));
        assert_eq!(parse_url("https://[::1]:9"), Ok(("::1".into(), 9)));
        assert!(parse_url("http://h:80").unwrap_err().contains("https://"));
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
