//! Where the daemon keeps its state and listens, when no flag says.
//!
//! | who | state directory | socket |
//! | --- | --- | --- |
//! | root | `/var/lib/vireo` | `/run/vireo.sock` |
//! | a user | `$XDG_STATE_HOME/vireo`, else `~/.local/state/vireo` | `$XDG_RUNTIME_DIR/vireo.sock`, else `vireo.sock` in the state directory |
//!
//! The `vireo vm` client computes the same socket path, so both sides agree
//! without flags; `--socket` / `VIREO_SOCKET` override it.

use std::path::PathBuf;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The default state directory (see the module documentation).
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/vireo");
    }
    if let Some(dir) = env_dir("XDG_STATE_HOME") {
        return dir.join("vireo");
    }
    match env_dir("HOME") {
        Some(home) => home.join(".local/state/vireo"),
        None => PathBuf::from("/tmp/vireo-state"),
    }
}

/// The default Unix socket path (see the module documentation).
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/vireo.sock");
    }
    match env_dir("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("vireo.sock"),
        None => default_state_dir().join("vireo.sock"),
    }
}

/// The socket the client uses: `explicit` (from `--socket`), else
/// `VIREO_SOCKET`, else [`default_socket`].
pub fn client_socket(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| {
            std::env::var_os("VIREO_SOCKET")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(default_socket)
}
