//! `--net` / the API's `nets[i]`: a TAP-backed network device's options.

use super::rate::parse_rate;
use crate::options::{Options, OptionsError};

pub use super::mac::Mac;

/// The longest interface name, NUL included (the kernel's IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Whether `name` can name a network interface: 1 to 15 bytes, not `.`
/// or `..`, without `/`, `:`, NUL or whitespace.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// The options of a network device:
/// `tap=NAME[,mac=MAC][,id=ID][,mtu=N][,bw=RATE][,ops=RATE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP interface.
    pub tap: String,
    /// The guest's address (random 52:54:00:xx:xx:xx when not given).
    pub mac: Mac,
    /// A name for logs and the control plane.
    pub id: Option<String>,
    /// The MTU advertised to the guest (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
    /// Bytes per second, applied to receive and to transmit separately.
    pub bandwidth: Option<u64>,
    /// Frames per second, applied to receive and to transmit separately.
    pub ops: Option<u64>,
}

impl NetConfig {
    /// A config for TAP `tap` with a random MAC and no limits.
    pub fn new(tap: &str) -> NetConfig {
        NetConfig {
            tap: tap.to_string(),
            mac: Mac::random(),
            id: None,
            mtu: None,
            bandwidth: None,
            ops: None,
        }
    }

    /// Parse a network device's option string, e.g.
    /// `tap=tap0,mac=52:54:00:12:34:56,id=net0,bw=100M,ops=20000` (a bare
    /// first word is the TAP name).
    pub fn from_options(s: &str) -> Result<NetConfig, OptionsError> {
        let mut o = Options::parse("net", s, Some("tap"))?;
        let tap = o.with("tap", |v| {
            if valid_tap_name(v) {
                Ok(v.to_string())
            } else {
                Err("not a valid interface name: use 1 to 15 characters without '/', ':' or whitespace")
            }
        })?;
        let tap = match tap {
            Some(t) => t,
            None => o.required("tap")?,
        };
        let mac = o.with("mac", |v| v.parse::<Mac>())?;
        let id = o.string("id");
        let mtu = o.with("mtu", |v| match v.parse::<u16>() {
            Ok(m) if m >= 68 => Ok(m),
            _ => Err("use a number from 68 to 65535"),
        })?;
        let bandwidth = o.with("bw", parse_rate)?;
        let ops = o.with("ops", parse_rate)?;
        o.finish()?;
        Ok(NetConfig {
            tap,
            mac: mac.unwrap_or_else(Mac::random),
            id,
            mtu,
            bandwidth,
            ops,
        })
    }

    /// Whether the option string `s` gives a `mac=` (an unparsable string
    /// counts as giving one: there is nothing to add to it).
    pub fn options_give_mac(s: &str) -> bool {
        Options::parse("net", s, Some("tap"))
            .map(|mut o| o.string("mac").is_some())
            .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_options() {
        let c = NetConfig::from_options(
            "tap=tap0,mac=52:54:00:12:34:56,id=net0,bw=100M,ops=20000,mtu=9000",
        )
        .unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(c.id.as_deref(), Some("net0"));
        assert_eq!(c.bandwidth, Some(100 << 20));
        assert_eq!(c.ops, Some(20000));
        assert_eq!(c.mtu, Some(9000));

        let c = NetConfig::from_options("tap1").unwrap();
        assert_eq!(c.tap, "tap1");
        assert!(c.mac.is_local() && c.mac.bytes()[0] & 1 == 0);
        assert_eq!((c.bandwidth, c.ops, c.mtu, c.id), (None, None, None, None));

        for (s, needle) in [
            ("mac=52:54:00:12:34:56", "tap= is required"),
            ("tap=tap0,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=tap0,mac=zz", "not a MAC address"),
            ("tap=tap0,speed=10G", "unknown option \"speed\""),
            ("tap=tap0,bw=fast", "bw=fast"),
            ("tap=tap0,mtu=20", "68 to 65535"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=averyveryverylongname", "not a valid interface name"),
        ] {
            let e = NetConfig::from_options(s).unwrap_err();
            assert_eq!(e.device, "net", "{s}: {e}");
            assert!(e.message.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn tap_names() {
        for bad in ["", "a/b", "tap 0", "0123456789abcdef", "..", "a:b"] {
            assert!(!valid_tap_name(bad), "{bad}");
        }
        assert!(valid_tap_name("tap0"));
        assert!(valid_tap_name("0123456789abcde"));
    }

    #[test]
    fn mac_given_or_not() {
        assert!(NetConfig::options_give_mac("tap0,mac=52:54:00:00:00:01"));
        assert!(!NetConfig::options_give_mac("tap=tap0,id=n"));
    }
}
