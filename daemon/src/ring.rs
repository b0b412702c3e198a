//! A VM's serial console scrollback: the last [`CONSOLE_SCROLLBACK`] bytes.

use std::collections::VecDeque;

/// Bytes of console output kept per VM.
pub const CONSOLE_SCROLLBACK: usize = 256 * 1024;

pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes ever pushed (so a reader can tell how much it missed).
    total: u64,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            buf: VecDeque::with_capacity(cap.min(16 * 1024)),
            cap,
            total: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    pub fn contents(&self) -> Vec<u8> {
        let (a, b) = self.buf.as_slices();
        [a, b].concat()
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The bytes from offset `from` of everything ever pushed to the end,
    /// as far as the ring still holds them, and how many of them it no
    /// longer holds.
    pub fn since(&self, from: u64) -> (u64, Vec<u8>) {
        let start = self.total - self.buf.len() as u64;
        let lost = start.saturating_sub(from);
        let skip = from.saturating_sub(start).min(self.buf.len() as u64) as usize;
        (lost, self.buf.range(skip..).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_cap_bytes() {
        let mut r = Ring::new(8);
        r.push(b"hello");
        assert_eq!(r.contents(), b"hello");
        r.push(b" world");
        assert_eq!(r.contents(), b"lo world");
        r.push(b"0123456789abc");
        assert_eq!(r.contents(), b"56789abc");
        assert_eq!(r.total(), 24);
        assert_eq!(r.since(20), (0, b"9abc".to_vec()));
        assert_eq!(r.since(10), (6, b"56789abc".to_vec()));
        assert_eq!(r.since(24), (0, Vec::new()));
    }
}
