//! Ethernet MAC addresses as the user writes them (`52:54:00:12:34:56`).

use std::fmt;
use std::str::FromStr;

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac([u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("{0:?} is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)")]
    Syntax(String),
    #[error(
        "{0} is a multicast address (the first byte is odd); \
         use a unicast one such as 52:54:00:12:34:56"
    )]
    Multicast(Mac),
    #[error("00:00:00:00:00:00 is not a valid address; leave mac= out for a random one")]
    Zero,
}

impl Mac {
    /// The address from its bytes; refuses multicast and all-zero addresses
    /// (a NIC cannot own them).
    pub fn new(bytes: [u8; 6]) -> Result<Mac, MacError> {
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast(Mac(bytes)));
        }
        if bytes == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(Mac(bytes))
    }

    /// A random locally administered unicast address, 52:54:00:xx:xx:xx.
    pub fn random() -> Mac {
        let mut tail = [0u8; 3];
        // SAFETY: getrandom writes at most tail.len() bytes into tail.
        let n = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
        if n != tail.len() as isize {
            // No getrandom (very old kernel): std's randomly seeded hasher
            // is good enough for a MAC.
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            tail.copy_from_slice(&h.finish().to_le_bytes()[..3]);
        }
        // 0x52: locally administered (bit 1 set), unicast (bit 0 clear).
        Mac([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
    }

    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the address is locally administered rather than a vendor's.
    pub fn is_local(&self) -> bool {
        self.0[0] & 2 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError::Syntax(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in bytes.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Mac::new(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.bytes(), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert!(m.is_local());
        let v: Mac = "0:1b:21:1:2:3".parse().unwrap();
        assert_eq!(v.bytes(), [0, 0x1b, 0x21, 1, 2, 3]);
        assert!(!v.is_local());
    }

    #[test]
    fn refuses_malformed_multicast_and_zero() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "52:54::12:34:56",
        ] {
            let e = bad.parse::<Mac>().unwrap_err();
            assert!(matches!(e, MacError::Syntax(_)), "{bad}: {e}");
            assert!(e.to_string().contains("not a MAC address"), "{bad}: {e}");
        }
        let e = "01:00:5e:00:00:01".parse::<Mac>().unwrap_err();
        assert!(e.to_string().contains("multicast"), "{e}");
        assert!("ff:ff:ff:ff:ff:ff".parse::<Mac>().is_err());
        let e = "00:00:00:00:00:00".parse::<Mac>().unwrap_err();
        assert!(e.to_string().contains("random"), "{e}");
    }

    #[test]
    fn random_addresses_are_local_unicast_and_vary() {
        let macs: Vec<Mac> = (0..8).map(|_| Mac::random()).collect();
        for m in &macs {
            let b = m.bytes();
            assert_eq!(b[0] & 1, 0, "{m} is multicast");
            assert!(m.is_local(), "{m}");
            assert_eq!(&b[..3], &[0x52, 0x54, 0x00]);
            assert_eq!(Mac::new(b).unwrap(), *m);
        }
        // 8 draws of 24 random bits: all equal only if the generator is broken.
        assert!(macs.iter().any(|m| *m != macs[0]));
    }
}
