//! The CLI's side of the daemon's API client (`vireo_api::client`): the
//! flags every client verb shares, the environment variables behind them,
//! and what each client error tells the user (which flag to fix, which
//! exit status: 2 for what the user can fix, 1 for the daemon's failures).

use std::path::PathBuf;

use clap::Args;
use vireo_api::client::{Client, ClientError};
use vireo_daemon::paths;

use crate::Failure;

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

/// The client the flags and the environment choose: --socket, else --url,
/// else $VIREO_URL, else $VIREO_SOCKET / the default socket.
pub fn client(a: ConnArgs) -> Result<Client, Failure> {
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
    let ca = a
        .ca_cert
        .or_else(|| env("VIREO_CA_CERT").map(PathBuf::from));
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
    Ok(Client::tls(&url, ca.as_deref(), token)?)
}

/// A client error in the CLI's words: the flag that fixes it, and exit 2
/// for what the user can fix, 1 for the daemon's or the network's failures.
impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let user = e.is_user_error();
        let message = match &e {
            ClientError::BadUrl { .. } => format!("--url {e}"),
            ClientError::CaCert { .. } => format!("--ca-cert {e}"),
            ClientError::UntrustedCertificate { .. } => format!(
                "{e}: pass --ca-cert FILE (or set VIREO_CA_CERT) with the CA certificate, e.g. \
                 the daemon's --tls-cert when it is self-signed"
            ),
            ClientError::CaAsServerCertificate { .. } => format!(
                "{e}: give the daemon a server certificate (with openssl: add -addext \
                 basicConstraints=critical,CA:FALSE) and pass its CA (or the self-signed \
                 certificate itself) with --ca-cert"
            ),
            ClientError::BadCertificate { .. } => {
                format!("{e}: pass --ca-cert FILE with the CA that signed it, or renew it")
            }
            ClientError::Api {
                status: 401,
                token_sent: true,
                ..
            } => format!("{e}; set VIREO_TOKEN (or --token-file) to a valid token"),
            ClientError::Api {
                status: 401,
                daemon,
                ..
            } => format!(
                "{daemon} needs a token: set VIREO_TOKEN (or pass --token-file FILE) to a token \
                 from `vireo token create` run on the daemon's host"
            ),
            _ => e.to_string(),
        };
        if user {
            Failure::Usage(message)
        } else {
            Failure::Vm(message)
        }
    }
}
