//! `--rng` / the API's `rng`: the entropy device's options.

use super::rate::parse_rate;
use crate::options::{Options, OptionsError};

/// How the rng is set up: no options, or `bw=1M`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// Bytes per second the guest may take (burst: one second's worth);
    /// `None` is unlimited.
    pub bandwidth: Option<u64>,
}

impl RngConfig {
    /// Parse the rng's options: `bw=<bytes/s>` with an optional K/M/G
    /// suffix, or nothing.
    pub fn from_options(s: &str) -> Result<RngConfig, OptionsError> {
        let mut o = Options::parse("rng", s, None)?;
        let bandwidth = o.with("bw", parse_rate)?;
        o.finish()?;
        Ok(RngConfig { bandwidth })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(RngConfig::from_options("").unwrap(), RngConfig::default());
        assert_eq!(
            RngConfig::from_options("bw=1M").unwrap().bandwidth,
            Some(1 << 20)
        );
        assert!(RngConfig::from_options("bw=fast").is_err());
        assert!(RngConfig::from_options("rate=1M").is_err());
    }
}
