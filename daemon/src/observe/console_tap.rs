//! The console tap: each chunk of a VM's console output goes to
//! `?console=1` subscribers, and the first line showing a kernel panic
//! becomes a `panic` event.

use tokio::sync::broadcast;

use super::events::{now_rfc3339, ConsoleEvent, Event, PanicEvent};

/// Longest console line kept while looking for a kernel panic.
const MAX_LINE: usize = 1024;
/// What marks a guest kernel's panic on its console.
pub const PANIC_MARKER: &str = "Kernel panic";

/// Watches one VM run's console output: publishes it to `?console=1`
/// subscribers and the first kernel panic line as a `panic` event.
pub struct ConsoleTap {
    name: String,
    events: broadcast::Sender<Event>,
    /// The current, unfinished line (cut at [`MAX_LINE`] bytes).
    line: Vec<u8>,
    /// One panic event per run (the panic banner repeats the marker).
    panicked: bool,
}

impl ConsoleTap {
    /// A tap for VM `name` publishing on `events`.
    pub(super) fn new(name: &str, events: broadcast::Sender<Event>) -> ConsoleTap {
        ConsoleTap {
            name: name.to_string(),
            events,
            line: Vec::new(),
            panicked: false,
        }
    }

    /// A chunk of console output arrived.
    pub fn output(&mut self, chunk: &[u8]) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Event::Console(ConsoleEvent {
                name: self.name.clone(),
                data: String::from_utf8_lossy(chunk).into_owned(),
            }));
        }
        if self.panicked {
            return;
        }
        for &b in chunk {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    /// The console closed: a last line without a newline still counts.
    pub fn finish(&mut self) {
        if !self.panicked {
            self.end_line();
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if line.contains(PANIC_MARKER) {
            self.panicked = true;
            let _ = self.events.send(Event::Panic(PanicEvent {
                name: self.name.clone(),
                line: line.trim().to_string(),
                time: now_rfc3339(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::observe::Observe;

    use super::*;

    #[test]
    fn a_kernel_panic_line_becomes_one_panic_event() {
        let o = Observe::default();
        let mut rx = o.subscribe();
        let mut tap = o.console_tap("web");
        tap.output(b"booting\r\n[    1.0] Kernel pa");
        tap.output(b"nic - not syncing: VFS: Unable to mount root fs\r\n");
        tap.output(b"---[ end Kernel panic - not syncing: VFS ]---\n");
        tap.finish();
        let mut panics = Vec::new();
        let mut console = String::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Panic(p) => panics.push(p),
                Event::Console(c) => console.push_str(&c.data),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(panics.len(), 1, "{panics:?}");
        assert_eq!(panics[0].name, "web");
        assert_eq!(
            panics[0].line,
            "[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs"
        );
        assert!(console.starts_with("booting\r\n") && console.ends_with("]---\n"));

        // A panic line without a newline counts when the console closes.
        let mut tap = o.console_tap("db");
        tap.output(b"Kernel panic - not syncing: Attempted to kill init!");
        assert!(!matches!(rx.try_recv(), Ok(Event::Panic(_))));
        tap.finish();
        let mut got = None;
        while let Ok(e) = rx.try_recv() {
            if let Event::Panic(p) = e {
                got = Some(p);
            }
        }
        assert_eq!(got.expect("a panic event").name, "db");
    }
}
