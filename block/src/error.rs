//! Errors: each names the file, says what is wrong and what to do about it.

use std::fmt;
use std::path::{Path, PathBuf};

/// The result of every disk image operation.
pub type Result<T> = std::result::Result<T, Error>;

/// What the fix for a corrupt qcow2 image usually is.
pub(crate) const REPAIR_HINT: &str =
    "`qemu-img check FILE` shows the damage and `qemu-img check -r all FILE` may repair it";

/// A disk image error. The `Display` form is one line meant for a person.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file could not be opened, read, written or synced.
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: DisplayPath,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata is inconsistent or points outside the image.
    #[error("{path}: corrupt qcow2 image: {detail}; {}", REPAIR_HINT.replace("FILE", &path.to_string()))]
    Corrupt { path: DisplayPath, detail: String },
    /// The image uses a feature vireo does not implement.
    #[error("{path}: {what} is not supported; {hint}")]
    Unsupported {
        path: DisplayPath,
        what: String,
        hint: String,
    },
    /// A guest access reaches past the end of the virtual disk.
    #[error(
        "{path}: access of {len} bytes at offset {offset} is past the end of the {size}-byte disk"
    )]
    OutOfBounds {
        path: DisplayPath,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("{path}: the image is open read-only; open it writable to change it")]
    ReadOnly { path: DisplayPath },
    /// A backing file (or one further down the chain) could not be opened.
    #[error("{path}: its backing file {name}: {source}")]
    Backing {
        path: DisplayPath,
        name: String,
        #[source]
        source: Box<Error>,
    },
    /// Bad arguments to `create` or `open` (size, cluster size, backing file).
    #[error("{path}: {detail}")]
    Invalid { path: DisplayPath, detail: String },
}

impl Error {
    pub(crate) fn io(path: &Path, op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: DisplayPath::from(path),
            op: op.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            path: DisplayPath::from(path),
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(
        path: &Path,
        what: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            path: DisplayPath::from(path),
            what: what.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn invalid(path: &Path, detail: impl Into<String>) -> Self {
        Error::Invalid {
            path: DisplayPath::from(path),
            detail: detail.into(),
        }
    }
}

/// A path as it is shown in messages.
#[derive(Debug, Clone)]
pub struct DisplayPath(pub PathBuf);

impl From<&Path> for DisplayPath {
    fn from(p: &Path) -> Self {
        DisplayPath(p.to_path_buf())
    }
}

impl fmt::Display for DisplayPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}
