//! TLS for migrations over TCP: the PEM files each side reads and the
//! client and server configurations built from them (rustls, ring).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Which PEM file an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemFile {
    /// The source's CA for the target's certificate.
    Ca,
    /// The source's client certificate and its key.
    ClientCert,
    ClientKey,
    /// The target's certificate and its key.
    ServerCert,
    ServerKey,
    /// The target's CA for client certificates.
    ClientCa,
}

impl std::fmt::Display for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PemFile::Ca => "CA certificate",
            PemFile::ClientCert => "client certificate",
            PemFile::ClientKey => "client key",
            PemFile::ServerCert => "TLS certificate",
            PemFile::ServerKey => "TLS key",
            PemFile::ClientCa => "client CA",
        })
    }
}

/// Why a TLS configuration could not be built (each names the file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file} {}: cannot read a PEM certificate: {source:?}", .path.display())]
    ReadCertificate {
        file: PemFile,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{file} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)", .path.display())]
    NoCertificate { file: PemFile, path: PathBuf },
    #[error("{file} {}: cannot read a PEM private key: {source:?}", .path.display())]
    ReadKey {
        file: PemFile,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{file} {}: not a usable CA certificate: {source}", .path.display())]
    UnusableCa {
        file: PemFile,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA {}: {source}", .path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and the key do not make an identity.
    #[error("{cert_file} {} / {key_file} {}: {source}", .cert.display(), .key.display())]
    Identity {
        cert_file: PemFile,
        cert: PathBuf,
        key_file: PemFile,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{host}: not a host name TLS can verify: {source}")]
    ServerName {
        host: String,
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS set-up: {0}")]
    Setup(#[source] rustls::Error),
}

impl TlsError {
    /// The PEM file at fault, when one is.
    pub fn file(&self) -> Option<PemFile> {
        match self {
            TlsError::ReadCertificate { file, .. }
            | TlsError::NoCertificate { file, .. }
            | TlsError::ReadKey { file, .. }
            | TlsError::UnusableCa { file, .. } => Some(*file),
            TlsError::ClientVerifier { .. } => Some(PemFile::ClientCa),
            TlsError::Identity { cert_file, .. } => Some(*cert_file),
            TlsError::ServerName { .. } | TlsError::Setup(_) => None,
        }
    }
}

/// The source's TLS client: the target's certificate checked against
/// `ca`, with the client certificate and key when given.
pub(super) fn client_connection(
    host: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConnection, TlsError> {
    let roots = load_roots(PemFile::Ca, ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let (certs, key_der) =
                load_identity(PemFile::ClientCert, cert, PemFile::ClientKey, key)?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|source| TlsError::Identity {
                    cert_file: PemFile::ClientCert,
                    cert: cert.to_path_buf(),
                    key_file: PemFile::ClientKey,
                    key: key.to_path_buf(),
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|source| {
        TlsError::ServerName {
            host: host.to_string(),
            source,
        }
    })?;
    rustls::ClientConnection::new(Arc::new(config), name).map_err(TlsError::Setup)
}

/// The target's TLS server: its certificate and key, and the CA that
/// client certificates must be issued by, when it checks them.
pub(super) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, TlsError> {
    let (certs, key_der) = load_identity(PemFile::ServerCert, cert, PemFile::ServerKey, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = load_roots(PemFile::ClientCa, ca)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|source| TlsError::ClientVerifier {
                path: ca.to_path_buf(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key_der)
        .map_err(|source| TlsError::Identity {
            cert_file: PemFile::ServerCert,
            cert: cert.to_path_buf(),
            key_file: PemFile::ServerKey,
            key: key.to_path_buf(),
            source,
        })
}

/// A certificate chain and its private key (PEM files).
fn load_identity(
    cert_file: PemFile,
    cert: &Path,
    key_file: PemFile,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = load_certificates(cert_file, cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        file: key_file,
        path: key.to_path_buf(),
        source,
    })?;
    Ok((certs, key_der))
}

fn load_roots(file: PemFile, ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certificates(file, ca)? {
        roots.add(c).map_err(|source| TlsError::UnusableCa {
            file,
            path: ca.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// The certificates of a PEM file: at least one.
fn load_certificates(file: PemFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsError::ReadCertificate {
            file,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            file,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}
