//! `--balloon` / the API's `balloon`: the memory balloon's options and the
//! limit of its target.

use crate::options::{Options, OptionsError};

/// Balloon pages per MiB: the device counts 4 KiB pages whatever the
/// guest's page size (VIRTIO_BALLOON_PFN_SHIFT).
pub const PAGES_PER_MIB: u64 = (1 << 20) >> 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error(
        "balloon target {mib} MiB is too large: the device counts 4 KiB pages in 32 bits \
         (at most {max} MiB)"
    )]
    TargetTooLarge { mib: u64, max: u64 },
}

/// A target in MiB as the device's 32-bit page count.
pub fn target_pages(mib: u64) -> Result<u32, BalloonError> {
    let max = u64::from(u32::MAX) / PAGES_PER_MIB;
    mib.checked_mul(PAGES_PER_MIB)
        .and_then(|p| u32::try_from(p).ok())
        .ok_or(BalloonError::TargetTooLarge { mib, max })
}

/// How the balloon is set up: options `target=<MiB>` (how much memory to
/// take from the guest at boot, default 0), `deflate_on_oom=on|off` (let
/// the guest take pages back when it runs out of memory, default on),
/// `free_page_reporting=on|off` (default on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    pub target_mib: u64,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            target_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
        }
    }
}

impl BalloonConfig {
    pub fn from_options(s: &str) -> Result<BalloonConfig, OptionsError> {
        let mut o = Options::parse("balloon", s, None)?;
        let target_mib = o
            .with("target", |v| {
                let mib: u64 = v
                    .parse()
                    .map_err(|_| "not a number of MiB (example: target=512)".to_string())?;
                target_pages(mib).map_err(|e| e.to_string())?;
                Ok::<u64, String>(mib)
            })?
            .unwrap_or(0);
        let d = BalloonConfig::default();
        let deflate_on_oom = o.bool("deflate_on_oom")?.unwrap_or(d.deflate_on_oom);
        let free_page_reporting = o
            .bool("free_page_reporting")?
            .unwrap_or(d.free_page_reporting);
        o.finish()?;
        Ok(BalloonConfig {
            target_mib,
            deflate_on_oom,
            free_page_reporting,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(
            BalloonConfig::from_options("").unwrap(),
            BalloonConfig::default()
        );
        let c = BalloonConfig::from_options("target=512,deflate_on_oom=off").unwrap();
        assert_eq!(c.target_mib, 512);
        assert!(!c.deflate_on_oom);
        assert!(c.free_page_reporting);
        assert!(BalloonConfig::from_options("target=lots").is_err());
        let e = BalloonConfig::from_options("target=99999999").unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert!(BalloonConfig::from_options("size=5").is_err());
    }

    #[test]
    fn targets_fit_32_bits_of_pages() {
        assert_eq!(target_pages(1), Ok(256));
        assert!(target_pages(u64::from(u32::MAX) / PAGES_PER_MIB).is_ok());
        assert!(matches!(
            target_pages(u64::from(u32::MAX) / PAGES_PER_MIB + 1),
            Err(BalloonError::TargetTooLarge { .. })
        ));
    }
}
