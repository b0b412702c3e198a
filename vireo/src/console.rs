//! The guest console on the terminal: stdin to the guest (its output goes
//! to stdout from the VMM). On a terminal, stdin goes to raw mode (restored on exit) and
//! Ctrl-A x quits; on a pipe, bytes pass through untouched.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use vireo_sandbox::seccomp::{self, ThreadKind};

use vireo_vmcore::{ExitReason, VmControl};
use vireo_vmm::GuestConsole;

pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts the terminal in raw mode and restores it when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    pub fn enable() -> std::io::Result<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still get \r\n.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid fd and pointer to an initialised termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enable` on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

const CTRL_A: u8 = 0x01;

/// Decodes the Ctrl-A escape on a terminal: Ctrl-A x quits, Ctrl-A Ctrl-A
/// sends one Ctrl-A, anything else after Ctrl-A is passed on.
#[derive(Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    Bytes(Vec<u8>),
    Quit(Vec<u8>),
}

impl EscapeFilter {
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return Filtered::Quit(out),
                    CTRL_A => out.push(CTRL_A),
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        Filtered::Bytes(out)
    }
}

/// Forward stdin to the guest on a background thread until EOF or the VM ends.
pub fn spawn_stdin_pump(input: GuestConsole, control: Arc<VmControl>, escape: bool) {
    let spawned = seccomp::spawn(
        ThreadKind::Console,
        std::thread::Builder::new().name("stdin".into()),
        move || {
            let mut stdin = std::io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("console: reading stdin failed: {e}");
                        return;
                    }
                };
                let bytes = if escape {
                    match filter.feed(&buf[..n]) {
                        Filtered::Bytes(b) => b,
                        Filtered::Quit(b) => {
                            deliver(&input, &control, &b);
                            control.request_exit(ExitReason::Stopped);
                            return;
                        }
                    }
                } else {
                    buf[..n].to_vec()
                };
                if !deliver(&input, &control, &bytes) {
                    return;
                }
            }
        },
    );
    if let Err(e) = spawned {
        tracing::warn!("console: no input thread ({e}); the guest gets no keyboard input");
    }
}

/// Bytes of virtio-console input allowed to wait for the guest before the
/// pump stops reading stdin (the device keeps at most 64 KiB).
const VIRTIO_CONSOLE_BACKLOG: usize = 16 << 10;

/// Push bytes into the UART as its FIFO drains (or into virtio-console as
/// the guest takes them); false once the VM is gone.
fn deliver(input: &GuestConsole, control: &VmControl, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        if control.exit_reason().is_some() {
            return false;
        }
        let n = match input {
            GuestConsole::Serial(s) => s.enqueue(bytes),
            GuestConsole::Virtio(v) if v.pending() < VIRTIO_CONSOLE_BACKLOG => {
                v.send(bytes);
                bytes.len()
            }
            GuestConsole::Virtio(_) => 0,
        };
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_is_literal() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r"), Filtered::Bytes(b"ls\r".to_vec()));
        assert_eq!(
            f.feed(&[CTRL_A, CTRL_A, b'a']),
            Filtered::Bytes(vec![CTRL_A, b'a'])
        );
        assert_eq!(f.feed(&[b'q', CTRL_A]), Filtered::Bytes(b"q".to_vec()));
        assert_eq!(f.feed(b"x"), Filtered::Quit(vec![]));
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(&[CTRL_A, b'c']), Filtered::Bytes(vec![CTRL_A, b'c']));
    }
}
