//! What the tests of every vireo crate share: scratch directories removed
//! on drop ([`TempDir`]) and kernel images built around a blob of machine
//! code ([`kernel`]: ELF vmlinux, bzImage).
//!
//! A dev-dependency only (`publish = false`): no library or binary of the
//! workspace may depend on it, and it depends on no vireo crate, so any
//! crate's tests can use it without a cycle.

pub mod kernel;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch directory, unique to this process and call, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh, empty directory named after `tag` under the system's
    /// temporary directory.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vireo-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `bytes` to a file named `name` in the directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_temp_dir_is_fresh_and_goes_on_drop() {
        let (a, b) = (TempDir::new("kit"), TempDir::new("kit"));
        assert_ne!(a.path(), b.path());
        let f = a.write("f", b"x");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }
}
