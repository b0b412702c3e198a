//! `key=value,key=value` device options, parsed once for every device
//! (`path=disk.qcow2,readonly=on` for a disk, `tap=tap0,mac=…` for a NIC),
//! whether they came from a `vireo run` flag or a field of the REST API.
//!
//! A device's config takes the keys it knows; [`Options::finish`] then
//! refuses whatever is left, so a typo is an error that names the key and
//! the device instead of a setting silently ignored. The error names the
//! device, not where its options came from: the CLI adds the flag
//! (`--disk: …`), the API the field (`disks[1]: …`).

use std::collections::BTreeMap;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device} options: {message}")]
pub struct OptionsError {
    /// The kind of device the options were for (`disk`, `net`, …).
    pub device: &'static str,
    pub message: String,
}

impl OptionsError {
    pub fn new(device: &'static str, message: impl Into<String>) -> OptionsError {
        OptionsError {
            device,
            message: message.into(),
        }
    }
}

/// The options of one device.
#[derive(Debug)]
pub struct Options {
    device: &'static str,
    values: BTreeMap<String, String>,
}

impl Options {
    /// Parse `s`, the options of a `device` (`disk`, `net`, …). A bare word
    /// (empty `s`, or `disk.img` alone) is accepted only as the value of
    /// `bare_key` when one is given.
    pub fn parse(
        device: &'static str,
        s: &str,
        bare_key: Option<&str>,
    ) -> Result<Options, OptionsError> {
        let mut values = BTreeMap::new();
        let err = |message: String| OptionsError::new(device, message);
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
        Ok(Options { device, values })
    }

    fn error(&self, message: String) -> OptionsError {
        OptionsError::new(self.device, message)
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

    /// Take a value parsed by `f`, whose error is shown as is.
    pub fn with<T, E: std::fmt::Display>(
        &mut self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, E>,
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
        assert_eq!(e.device, "disk");
        assert_eq!(e.message, "unknown option \"raedonly\"");
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
            "disk options: path= is required"
        );
    }
}
