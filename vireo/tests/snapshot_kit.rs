//! A whole Linux guest across a snapshot: boot the guest kit (Debian's
//! stock kernel, busybox initramfs) to its shell, leave a file in its
//! tmpfs, snapshot it, then restore the snapshot in a new process and run
//! commands in the same shell: the file is there, and the kernel's timers,
//! interrupts and console work on.
//!
//! Like guest_kit_boot it runs on KVM where KVM can run a stock kernel
//! (skipped on PVM-only hosts) and on the emulator with
//! `VIREO_TEST_ACCEL=emu` (scripts/test runs it in a release build).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// A `vireo run` with piped stdin and stdout.
struct Vm {
    child: Child,
    out: Receiver<Vec<u8>>,
    seen: String,
}

impl Vm {
    fn start(args: &[String]) -> Vm {
        let mut args = args.to_vec();
        args.push("--accel".into());
        args.push(support::test_accel().unwrap_or_else(|| "kvm".into()));
        let mut child = Command::new(support::vireo_bin())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vireo");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, out) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Vm {
            child,
            out,
            seen: String::new(),
        }
    }

    /// Wait for a whole output line equal to `line` after byte `from`.
    fn wait_line(&mut self, from: usize, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen[from.min(self.seen.len())..]
                .lines()
                .any(|l| l.trim() == line)
            {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => return false,
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the guest console");
        stdin.flush().expect("flush");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control(socket: &Path, command: &str) -> serde_json::Value {
    for _ in 0..2000 {
        if let Ok(mut s) = UnixStream::connect(socket) {
            writeln!(s, "{command}").expect("send");
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).expect("reply");
            return serde_json::from_str(&line).expect("JSON reply");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{} never accepted connections", socket.display());
}

#[test]
fn a_restored_linux_guest_keeps_its_shell_and_files() {
    if let Some(why) = support::kit::skip_reason() {
        eprintln!("skipping the guest kit snapshot: {why}");
        return;
    }
    let emu = support::test_accel().as_deref() == Some("emu");
    let boot_timeout = Duration::from_secs(if emu { 20 * 60 } else { 600 });
    let kit = support::kit::guest_kit();
    let dir = support::TempDir::new("snapkit");
    let socket = dir.path().join("ctl.sock");
    let snap = dir.path().join("snap");

    let mut vm = Vm::start(&[
        "run".into(),
        "--image".into(),
        kit.display().to_string(),
        "--memory".into(),
        "256".into(),
        "--control-socket".into(),
        socket.display().to_string(),
    ]);
    assert!(
        vm.wait_line(0, "vireo-init: ready", boot_timeout),
        "the kit did not boot:\n{}",
        vm.seen
    );
    // A file in the guest's tmpfs, then a marker that the shell ran it.
    // The shell starts just after the init's "ready" line and may drop
    // what was typed before it opened the console: type until it answers.
    let mark = vm.seen.len();
    let mut answered = false;
    for _ in 0..12 {
        vm.type_line("echo before-$((6*7)) > /tmp/f; echo wrote-$((2+3))");
        if vm.wait_line(mark, "wrote-5", Duration::from_secs(10)) {
            answered = true;
            break;
        }
    }
    assert!(answered, "the shell did not answer:\n{}", vm.seen);
    let reply = control(&socket, &format!("snapshot --paused {}", snap.display()));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "paused", "{reply}");
    drop(vm);

    for lazy in [false, true] {
        let mut args = vec![
            "run".to_string(),
            "--restore".into(),
            snap.display().to_string(),
        ];
        if lazy {
            args.push("--restore-lazy".into());
        }
        let mut vm = Vm::start(&args);
        // The shell goes on: the file is there, and sleep (timer
        // interrupts) returns.
        vm.type_line("cat /tmp/f; sleep 1; echo after-$((7*8))");
        assert!(
            vm.wait_line(0, "before-42", Duration::from_secs(120)),
            "lazy={lazy}: the file written before the snapshot is gone:\n{}",
            vm.seen
        );
        assert!(
            vm.wait_line(0, "after-56", Duration::from_secs(120)),
            "lazy={lazy}: the restored shell did not run on:\n{}",
            vm.seen
        );
    }
}
