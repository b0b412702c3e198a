//! Fuzz bodies for the lines one process feeds another through a VM's
//! control socket: a command line the VM process parses
//! ([`Command::parse`]) and a reply line the daemon parses
//! ([`Reply::parse`]); a VM process that a guest took over may send the
//! daemon anything. Shared by the cargo-fuzz target (`api/fuzz`) and a
//! stable unit test. Any input must return, never panic.

use crate::control::{Command, Reply};

/// One line, as a command and as a reply.
pub fn control_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    if let Some(command) = Command::parse(&line) {
        // What parses must print again (the daemon sends what it built).
        let _ = command.to_string();
    }
    if let Ok(reply) = Reply::parse(&line) {
        let _ = reply.encode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Valid lines, cut and with bytes flipped, through the fuzz body.
    #[test]
    fn control_lines_never_panic() {
        let seeds: [&[u8]; 6] = [
            b"pause",
            b"snapshot --paused --diff /srv/snap",
            b"migrate-to tcp:h:1 --ca /c.pem --postcopy --postcopy-bandwidth 8M",
            b"balloon 128",
            br#"{"ok":true,"state":"running","stats":{"vcpus":[{"exits":5}],"disks":[],"nets":[]}}"#,
            br#"{"ok":false,"error":"no","balloon":{"target_mib":1,"actual_mib":0}}"#,
        ];
        let mut x: u32 = 0x9e37_79b9;
        for seed in seeds {
            for cut in 0..=seed.len() {
                control_line(&seed[..cut]);
            }
            for _ in 0..200 {
                let mut v = seed.to_vec();
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % v.len();
                v[i] = (x >> 8) as u8;
                control_line(&v);
            }
        }
        control_line(&[b'['; 100_000]);
    }
}
