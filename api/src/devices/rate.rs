//! Rate limits as the device options give them (`bw=10M`, `ops=1000`).

/// A `bw=`/`ops=` value that is not a rate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("{value:?}: unknown suffix {suffix:?} (use K, M or G)")]
    Suffix { value: String, suffix: char },
    #[error("{0:?}: not a number (examples: 5000, 10M)")]
    NotANumber(String),
    #[error("{0:?}: must be between 1 and 2^64-1")]
    OutOfRange(String),
}

/// Parse a `bw=`/`ops=` value: a number with an optional K/M/G suffix
/// (powers of 1024 for bytes, 1000 for ops is not worth the confusion:
/// both use 1024), e.g. `10M` or `5000`.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(RateError::Suffix {
                        value: s.to_string(),
                        suffix: c,
                    })
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| RateError::NotANumber(s.to_string()))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| RateError::OutOfRange(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("5000"), Ok(5000));
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert_eq!(parse_rate("1k"), Ok(1024));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("x").is_err());
        assert!(parse_rate("3T").is_err());
        assert!(parse_rate("99999999999G").is_err());
    }
}
