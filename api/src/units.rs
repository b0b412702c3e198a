//! Units that cross a boundary (CLI → API → daemon → VM process → VM core →
//! backend) as one type, so no layer re-derives bytes from a bare number.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const MIB_SHIFT: u32 = 20;

/// A guest RAM size in whole MiB, the granularity of the CLI, the API, the
/// snapshot format and the migration stream. Every value converts to bytes
/// without overflow: the constructor refuses sizes whose byte count would
/// not fit a `u64`.
///
/// On the wire (JSON, SQLite, argv) it is the number of MiB, as the
/// `memory_mib` fields and the `--memory` flag have always been.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct MemorySize(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemorySizeError {
    #[error("{0} MiB is more memory than a 64-bit address space holds")]
    TooLarge(u64),
    #[error("{0:?} is not a memory size: give a number of MiB, or a number with M, MiB, G or GiB")]
    Syntax(String),
}

impl MemorySize {
    /// The largest size whose byte count fits a `u64`.
    pub const MAX_MIB: u64 = u64::MAX >> MIB_SHIFT;

    pub const fn from_mib(mib: u64) -> Result<MemorySize, MemorySizeError> {
        if mib > Self::MAX_MIB {
            return Err(MemorySizeError::TooLarge(mib));
        }
        Ok(MemorySize(mib))
    }

    /// For constants known to be in range at compile time.
    pub const fn mib_const(mib: u64) -> MemorySize {
        assert!(mib <= Self::MAX_MIB);
        MemorySize(mib)
    }

    pub const fn mib(self) -> u64 {
        self.0
    }

    pub const fn bytes(self) -> u64 {
        self.0 << MIB_SHIFT
    }
}

impl TryFrom<u64> for MemorySize {
    type Error = MemorySizeError;

    fn try_from(mib: u64) -> Result<Self, Self::Error> {
        MemorySize::from_mib(mib)
    }
}

impl From<MemorySize> for u64 {
    fn from(m: MemorySize) -> u64 {
        m.0
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

/// `512`, `512M`, `512MiB`, `2G`, `2GiB` (a bare number is MiB, as
/// `--memory` has always read it).
impl FromStr for MemorySize {
    type Err = MemorySizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let syntax = || MemorySizeError::Syntax(s.to_string());
        let n: u64 = digits.parse().map_err(|_| syntax())?;
        let mib = match unit.trim() {
            "" | "M" | "MiB" => n,
            "G" | "GiB" => n.checked_mul(1024).ok_or(MemorySizeError::TooLarge(n))?,
            _ => return Err(syntax()),
        };
        MemorySize::from_mib(mib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_the_cli_accepts() {
        for (text, mib) in [
            ("512", 512),
            ("512M", 512),
            ("512MiB", 512),
            ("2G", 2048),
            ("1GiB", 1024),
        ] {
            assert_eq!(text.parse::<MemorySize>().unwrap().mib(), mib, "{text}");
        }
        for bad in ["", "M", "-1", "1.5G", "12T", "0x100"] {
            assert!(
                matches!(bad.parse::<MemorySize>(), Err(MemorySizeError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_sizes_whose_bytes_overflow() {
        assert_eq!(
            MemorySize::from_mib(MemorySize::MAX_MIB).unwrap().bytes(),
            !0xF_FFFF
        );
        assert_eq!(
            MemorySize::from_mib(MemorySize::MAX_MIB + 1),
            Err(MemorySizeError::TooLarge(MemorySize::MAX_MIB + 1))
        );
        assert!(matches!(
            format!("{}G", u64::MAX / 1024 + 1).parse::<MemorySize>(),
            Err(MemorySizeError::TooLarge(_))
        ));
    }

    #[test]
    fn is_a_number_of_mib_on_the_wire() {
        let m: MemorySize = serde_json::from_str("256").unwrap();
        assert_eq!(m.bytes(), 256 << 20);
        assert_eq!(serde_json::to_string(&m).unwrap(), "256");
        assert!(
            serde_json::from_str::<MemorySize>(&(MemorySize::MAX_MIB + 1).to_string()).is_err()
        );
    }
}
