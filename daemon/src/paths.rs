//! Where the daemon keeps its state and listens, when no flag says.
//!
//! | who | state directory | socket |
//! | --- | --- | --- |
//! | root | `/var/lib/vireo` | `/run/vireo.sock` |
//! | a user | `$XDG_STATE_HOME/vireo`, else `~/.local/state/vireo` | `$XDG_RUNTIME_DIR/vireo.sock`, else `vireo.sock` in the state directory |
//!
//! The `vireo vm` client computes the same socket path, so both sides agree
//! without flags; `--socket` / `VIREO_SOCKET` override it. A user with no
//! daemon of their own talks to the system daemon's `/run/vireo.sock` when
//! it exists (the packaged vireo.service; the `vireo` group may use it).

use std::path::{Path, PathBuf};

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

/// The system daemon's socket (root's default; vireo.service listens there).
pub const SYSTEM_SOCKET: &str = "/run/vireo.sock";

/// The socket the client uses: `explicit` (from `--socket`), else
/// `VIREO_SOCKET`, else [`default_socket`] — or, when nothing is there and
/// the system daemon's socket exists, that one.
pub fn client_socket(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| {
            std::env::var_os("VIREO_SOCKET")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| own_or_system(default_socket(), Path::new(SYSTEM_SOCKET)))
}

/// `own` (a user's own daemon's socket) when it exists or `system` does not.
fn own_or_system(own: PathBuf, system: &Path) -> PathBuf {
    if !own.exists() && system.exists() {
        system.to_path_buf()
    } else {
        own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user of the packaged daemon (no daemon of their own) reaches
    /// /run/vireo.sock without --socket; their own daemon wins when it runs.
    #[test]
    fn a_user_without_a_daemon_of_their_own_reaches_the_system_one() {
        let dir = std::env::temp_dir().join(format!("vireo-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let own = dir.join("own.sock");
        let system = dir.join("system.sock");
        // Neither: the user's own path (the error then names it).
        assert_eq!(own_or_system(own.clone(), &system), own);
        std::fs::write(&system, b"").unwrap();
        assert_eq!(own_or_system(own.clone(), &system), system);
        std::fs::write(&own, b"").unwrap();
        assert_eq!(own_or_system(own.clone(), &system), own);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
