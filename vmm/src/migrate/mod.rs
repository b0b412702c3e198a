//! Live migration between two `vireo run` processes: the source's
//! control-socket command `migrate-to ADDR` and the target's `vireo run
//! --migrate-from ADDR`. The stream format is in
//! [`vireo_vmcore::migration`]; this folder is the rest, by concern:
//! - `transport`: the addresses, the byte stream and its socket;
//! - `tls`: the certificates and the TLS configurations;
//! - `auth`: the one-time secret and the target's authentication of a
//!   connecting source;
//! - `source`: `migrate-to`, the pre-copy loop and the switch to
//!   post-copy;
//! - `target`: listening, receiving the machine, acknowledging;
//! - `postcopy`: the pages that follow a running guest.
//!
//! Transport: `unix:PATH` (a socket on this host, created 0600) or
//! `tcp:HOST:PORT`, which is always TLS (rustls) and always authenticates
//! the source: by a one-time secret (a file on each side, sent first in
//! an `Auth` message and compared in constant time) and/or by a client
//! certificate checked against the target's client CA. A peer that fails
//! is logged with its address and dropped; the target keeps listening for
//! the real source, up to [`MAX_AUTH_FAILURES`] failures with
//! [`AUTH_RETRY_DELAY`] between them.

use std::time::Duration;

mod auth;
mod postcopy;
mod source;
mod target;
mod tls;
mod transport;

pub use auth::{read_secret, SecretError, AUTH_RETRY_DELAY, MAX_AUTH_FAILURES};
pub use postcopy::{PostcopyError, PostcopyStats, ServeError};
pub use source::{migrate_to, MigrateTo, SourceError, Stats, MAX_ROUNDS};
pub use target::{
    check_listen, receive, Incoming, Listen, ListenError, ReceiveError, Refusal, TargetError,
};
pub use tls::{PemFile, TlsError};
pub use transport::{parse_addr, parse_uri, Addr, AddrError};

/// How long either side waits for the other before calling it gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
