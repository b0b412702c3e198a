//! `--console`: the virtio console's options.

use crate::options::{Options, OptionsError};

/// How the console is set up: options `cols=`/`rows=` give the initial
/// terminal size (both or neither; 0×0 means unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub cols: u16,
    pub rows: u16,
}

impl ConsoleConfig {
    pub fn from_options(s: &str) -> Result<ConsoleConfig, OptionsError> {
        let mut o = Options::parse("console", s, None)?;
        let cols = o.parsed::<u16>("cols")?;
        let rows = o.parsed::<u16>("rows")?;
        o.finish()?;
        match (cols, rows) {
            (Some(cols), Some(rows)) => Ok(ConsoleConfig { cols, rows }),
            (None, None) => Ok(ConsoleConfig::default()),
            _ => Err(OptionsError::new(
                "console",
                "give both cols= and rows=, or neither",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(
            ConsoleConfig::from_options("").unwrap(),
            ConsoleConfig::default()
        );
        let cfg = ConsoleConfig::from_options("cols=132,rows=43").unwrap();
        assert_eq!((cfg.cols, cfg.rows), (132, 43));
        assert!(ConsoleConfig::from_options("cols=80").is_err());
        assert!(ConsoleConfig::from_options("cols=80,rows=x").is_err());
        assert!(ConsoleConfig::from_options("multiport=on").is_err());
    }
}
