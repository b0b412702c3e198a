//! `vireo token ...`: the daemon's API tokens (for TCP clients), through the
//! token API (`/v1/tokens`, admin only; the Unix socket is admin).

use clap::{Args, Subcommand, ValueEnum};
use vireo_api::model::{CreateToken, NewToken, Role, TokenList};

use crate::api_client::{self, ConnArgs};
use crate::Failure;
use vireo_api::client::{decode, DEFAULT_TIMEOUT};

pub const TOKEN_ABOUT: &str = "\
Manage the API tokens of the daemon's TCP (TLS) clients. Unix-socket clients
need none (they act as admin); TCP clients send `Authorization: Bearer TOKEN`.
Roles: viewer reads everything; operator also starts, stops, kills, pauses,
resumes and reboots VMs and sets balloons; admin also creates, changes and
deletes VMs and manages tokens. The daemon keeps only each token's SHA-256;
the token itself is printed once, by `create`.";

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Viewer,
    Operator,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Operator => Role::Operator,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints it on stdout (once: only its hash is kept).
    #[command(after_help = "Examples:
  vireo token create --role viewer --name dashboard
  VIREO_TOKEN=$(vireo token create --role operator --name ci) \\
      vireo vm start web --url https://vm-host:8443 --ca-cert ca.pem")]
    Create(CreateArgs),
    /// List the tokens (id, name, role, creation time; never the secrets).
    #[command(after_help = "Examples:\n  vireo token list\n  vireo token list --json")]
    List(ListArgs),
    /// Revoke a token: requests with it are refused (401) from now on.
    #[command(after_help = "Example:\n  vireo token revoke 3f2a9c0d1b7e4a55")]
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the token may do.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// A name to tell tokens apart (who or what uses it).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub name: String,
    /// Print the API's JSON answer (with the token) instead.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token's id (from `vireo token list`; the part after `vireo_`).
    #[arg(value_name = "ID")]
    pub id: String,
}

pub fn token(args: TokenArgs) -> Result<(), Failure> {
    let client = api_client::client(args.conn)?;
    match args.command {
        TokenCommand::Create(a) => {
            let body = serde_json::to_vec(&CreateToken {
                name: a.name,
                role: a.role.into(),
            })
            .map_err(|e| Failure::Vm(e.to_string()))?;
            let bytes = client.request("POST", "/v1/tokens", Some(&body), DEFAULT_TIMEOUT)?;
            if a.json {
                println!("{}", String::from_utf8_lossy(&bytes));
                return Ok(());
            }
            let t: NewToken = decode(&bytes)?;
            eprintln!(
                "created {} token {}{}; it is shown only now, keep it safe:",
                t.role.as_str(),
                t.id,
                if t.name.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", t.name)
                }
            );
            println!("{}", t.token);
            Ok(())
        }
        TokenCommand::List(a) => {
            let bytes = client.request("GET", "/v1/tokens", None, DEFAULT_TIMEOUT)?;
            if a.json {
                println!("{}", String::from_utf8_lossy(&bytes));
                return Ok(());
            }
            let list: TokenList = decode(&bytes)?;
            if list.tokens.is_empty() {
                println!("no tokens yet; create one with `vireo token create --role viewer`");
                return Ok(());
            }
            let w = list
                .tokens
                .iter()
                .map(|t| t.name.chars().count())
                .max()
                .unwrap_or(0)
                .max(4);
            println!("{:<16}  {:<w$}  {:<8}  CREATED", "ID", "NAME", "ROLE");
            for t in &list.tokens {
                println!(
                    "{:<16}  {:<w$}  {:<8}  {}",
                    t.id,
                    t.name,
                    t.role.as_str(),
                    t.created_at
                );
            }
            Ok(())
        }
        TokenCommand::Revoke(a) => {
            let path = format!(
                "/v1/tokens/{}",
                a.id.strip_prefix("vireo_")
                    .and_then(|r| r.split('_').next())
                    .unwrap_or(&a.id)
            );
            if !path[11..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(Failure::Usage(format!(
                    "{:?} is not a token id (see `vireo token list`)",
                    a.id
                )));
            }
            client.request("DELETE", &path, None, DEFAULT_TIMEOUT)?;
            println!("revoked {}", &path[11..]);
            Ok(())
        }
    }
}
