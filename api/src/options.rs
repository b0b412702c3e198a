//! `key=value,key=value` device options, parsed once for every device flag
//! (`--disk path=disk.qcow2,readonly=on`, `--net tap=tap0,mac=…`).
//!
//! A device's config takes the keys it knows; [`Options::finish`] then
//! refuses whatever is left, so a typo is an error that names the key and
//! the flag instead of a setting silently ignored.

use std::collections::BTreeMap;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct OptionsError {
    pub flag: String,
    pub message: String,
}

/// The options of one device flag.
#[derive(Debug)]
pub struct Options {
    flag: String,
    values: BTreeMap<String, String>,
}

impl Options {
    /// Parse `s` for flag `--flag`. A bare word (`--rng` with `s` empty, or
    /// `--disk disk.img`) is accepted only as the value of `bare_key` when
    /// one is given.
    pub fn parse(flag: &str, s: &str, bare_key: Option<&str>) -> Result<Options, OptionsError> {
        let mut values = BTreeMap::new();
        let err = |message: String| OptionsError {
            flag: flag.to_string(),
            message,
        };
        for (i, part) in s.split(',').enumerate() {
            if part.is_empty() {
                if s.is_empty() {
                    break;
                }
                return Err(err(format!("empty option in {s:?}")));
            }
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v),
                None => match bare_key {
                    Some(b) if i == 0 => (b, part),
                    _ => return Err(err(format!("{part:?} is not key=value"))),
                },
            };
            if k.is_empty() {
                return Err(err(format!("{part:?} has no key")));
            }
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(err(format!("{k} is given twice")));
            }
        }
        Ok(Options {
            flag: flag.to_string(),
            values,
        })
    }

    fn error(&self, message: String) -> OptionsError {
        OptionsError {
            flag: self.flag.clone(),
            message,
        }
    }

    /// Take a string value.
    pub fn string(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Take a required string value.
    pub fn required(&mut self, key: &str) -> Result<String, OptionsError> {
        self.values
            .remove(key)
            .ok_or_else(|| self.error(format!("{key}= is required")))
    }

    /// Take a value parsed with `FromStr`.
    pub fn parsed<T: FromStr>(&mut self, key: &str) -> Result<Option<T>, OptionsError>
    where
        T::Err: std::fmt::Display,
    {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| self.error(format!("{key}={v}: {e}"))),
        }
    }

    /// Take an on/off value (`on`, `off`, `true`, `false`, `yes`, `no`).
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, OptionsError> {
        match self.values.remove(key).as_deref() {
            None => Ok(None),
            Some("on" | "true" | "yes" | "1") => Ok(Some(true)),
            Some("off" | "false" | "no" | "0") => Ok(Some(false)),
            Some(v) => Err(self.error(format!("{key}={v}: use on or off"))),
        }
    }

    /// Take a value parsed by `f`, whose error message is shown as is.
    pub fn with<T>(
        &mut self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, OptionsError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => f(&v)
                .map(Some)
                .map_err(|e| self.error(format!("{key}={v}: {e}"))),
        }
    }

    /// Refuse any key no one took.
    pub fn finish(self) -> Result<(), OptionsError> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(self.error(format!("unknown option {k:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_known_keys_and_refuses_the_rest() {
        let mut o = Options::parse("disk", "path=a.img,readonly=on,id=root", Some("path")).unwrap();
        assert_eq!(o.required("path").unwrap(), "a.img");
        assert_eq!(o.bool("readonly").unwrap(), Some(true));
        assert_eq!(o.string("id").as_deref(), Some("root"));
        o.finish().unwrap();

        let mut o = Options::parse("disk", "path=a,raedonly=on", None).unwrap();
        o.required("path").unwrap();
        let e = o.finish().unwrap_err();
        assert_eq!(e.to_string(), "--disk: unknown option \"raedonly\"");
    }

    #[test]
    fn bare_word_duplicates_and_bad_values() {
        let mut o = Options::parse("disk", "x.img", Some("path")).unwrap();
        assert_eq!(o.required("path").unwrap(), "x.img");
        assert!(Options::parse("disk", "x.img", None).is_err());
        assert!(Options::parse("disk", "a=1,a=2", None).is_err());
        assert!(Options::parse("disk", "a=1,,b=2", None).is_err());
        let mut o = Options::parse("net", "queues=many", None).unwrap();
        assert!(o.parsed::<u16>("queues").is_err());
        let mut o = Options::parse("disk", "readonly=maybe", None).unwrap();
        assert!(o.bool("readonly").is_err());
        let o = Options::parse("rng", "", None).unwrap();
        o.finish().unwrap();
        let mut o = Options::parse("disk", "", None).unwrap();
        assert_eq!(
            o.required("path").unwrap_err().to_string(),
            "--disk: path= is required"
        );
    }
}
