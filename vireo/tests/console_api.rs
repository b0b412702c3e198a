//! Live consoles, reboot and `vm edit` end to end: a real `vireo serve` on
//! a temporary state directory, tiny guests on the emulator, WebSocket
//! clients (tungstenite) on the daemon's Unix socket, and the `vireo vm`
//! CLI.
//!
//! The echo guest uppercases what it reads from COM1 and writes it back,
//! so a test can tell the guest's answer from its own typing.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use support::daemon::DaemonEnv as Env;
use support::guest::{self, assemble64, Guest64};
use support::{KernelKind, Outcome, TempDir};

const WAIT: Duration = Duration::from_secs(20);
use support::guest::{echo_upper, ECHO_READY as READY};

impl Env {
    /// Stop the daemon with `signal` (VMs keep running) and start another.
    fn restart_daemon(&mut self, signal: i32) {
        self.stop_daemon(signal);
        self.start_daemon();
    }

    fn console(&self, name: &str) -> String {
        self.http("GET", &format!("/v1/vms/{name}/console"), None).1
    }

    /// Define and start an emulator VM running `body`.
    fn start(&self, name: &str, body: impl FnOnce(&mut Guest64) -> guest::AsmResult) -> i64 {
        let kernel = self.kernel(&format!("{name}.elf"), body);
        let (status, v) = self.json(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
        );
        assert_eq!(status, 201, "{v}");
        let (status, v) = self.json("POST", &format!("/v1/vms/{name}/start"), None);
        assert_eq!(status, 200, "{v}");
        v["pid"].as_i64().expect("a pid")
    }

    /// A WebSocket on the VM's console.
    fn ws(&self, name: &str) -> WebSocket<UnixStream> {
        let stream = UnixStream::connect(self.socket()).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let url = format!("ws://localhost/v1/vms/{name}/console/ws");
        let (ws, resp) = tungstenite::client::client(url, stream).expect("the WebSocket handshake");
        assert_eq!(resp.status().as_u16(), 101);
        ws
    }
}

/// What a WebSocket client has seen: output bytes and text frames.
#[derive(Default)]
struct Seen {
    output: Vec<u8>,
    texts: Vec<Value>,
    closed: bool,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// Read frames until `done` says so (panics after [`WAIT`]).
fn read_until(
    ws: &mut WebSocket<UnixStream>,
    seen: &mut Seen,
    mut done: impl FnMut(&Seen) -> bool,
) {
    let start = Instant::now();
    while !done(seen) {
        assert!(
            start.elapsed() < WAIT && !seen.closed,
            "gave up; output so far: {:?}, texts: {:?}",
            seen.text(),
            seen.texts
        );
        match ws.read() {
            Ok(Message::Binary(b)) => seen.output.extend_from_slice(&b),
            Ok(Message::Text(t)) => seen.texts.push(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(_)) => seen.closed = true,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => seen.closed = true,
            Err(e) => panic!("reading the console WebSocket: {e}"),
        }
    }
}

fn has_text(seen: &Seen, needle: &str) -> bool {
    seen.text().contains(needle)
}

#[test]
fn websocket_clients_share_the_console_and_type_into_it() {
    let env = Env::new("console-ws");
    env.start("echo", echo_upper);
    env.wait_for("the guest's banner", || env.console("echo").contains(READY));

    let mut a = env.ws("echo");
    let mut sa = Seen::default();
    // The first frame is the scrollback from before the attach.
    match a.read().unwrap() {
        Message::Binary(b) => assert!(String::from_utf8_lossy(&b).contains(READY)),
        other => panic!("the first frame is not the scrollback: {other:?}"),
    }
    let mut b = env.ws("echo");
    let mut sb = Seen::default();
    read_until(&mut b, &mut sb, |s| has_text(s, READY));

    a.send(Message::text("hello from a")).unwrap();
    read_until(&mut a, &mut sa, |s| has_text(s, "HELLO FROM A"));
    read_until(&mut b, &mut sb, |s| has_text(s, "HELLO FROM A"));
    b.send(Message::binary(b"and b".to_vec())).unwrap();
    read_until(&mut a, &mut sa, |s| has_text(s, "AND B"));
    read_until(&mut b, &mut sb, |s| has_text(s, "AND B"));
    assert!(
        !sa.text().contains("hello"),
        "the guest echoes uppercase only"
    );

    // An oversize frame is refused with an error frame; the socket stays.
    a.send(Message::binary(vec![b'x'; 65 * 1024])).unwrap();
    read_until(&mut a, &mut sa, |s| !s.texts.is_empty());
    assert_eq!(
        sa.texts[0]["error"]["code"], "frame_too_large",
        "{:?}",
        sa.texts
    );
    a.send(Message::text("still here")).unwrap();
    read_until(&mut a, &mut sa, |s| has_text(s, "STILL HERE"));

    // The VM stops: both get the stopped event, then the close.
    let (status, v) = env.json("POST", "/v1/vms/echo/kill", None);
    assert_eq!(status, 200, "{v}");
    for (ws, seen) in [(&mut a, &mut sa), (&mut b, &mut sb)] {
        read_until(ws, seen, |s| {
            s.texts.iter().any(|t| t["event"] == "stopped")
        });
        let stop = seen.texts.iter().find(|t| t["event"] == "stopped").unwrap();
        assert_eq!(stop["reason"], "killed on request (SIGKILL)", "{stop}");
        read_until(ws, seen, |s| s.closed);
    }

    // A plain GET is not an upgrade; an unknown VM is a 404.
    let (status, v) = env.json("GET", "/v1/vms/echo/console/ws", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("websocket_required")),
        "{v}"
    );
    let (status, _) = env.json("GET", "/v1/vms/nope/console/ws", None);
    assert_eq!(status, 404);
    // Attaching to the stopped VM: its last scrollback, then the stop.
    let mut c = env.ws("echo");
    let mut sc = Seen::default();
    read_until(&mut c, &mut sc, |s| s.closed);
    assert!(sc.text().contains("STILL HERE"), "{}", sc.text());
    assert_eq!(sc.texts.last().unwrap()["event"], "stopped");
}

/// `vireo vm console` with piped stdin: the bytes reach the guest, its
/// answer is printed, and the command ends when the VM stops.
#[test]
fn vm_console_forwards_piped_stdin_and_ends_when_the_vm_stops() {
    let env = Env::new("console-cli");
    env.start("echo", echo_upper);
    env.wait_for("the guest's banner", || env.console("echo").contains(READY));

    let mut child = Command::new(support::vireo_bin())
        .args(["vm", "console", "echo", "--socket"])
        .arg(env.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&out);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed through the cli\n").unwrap();
    // EOF on stdin: the command keeps printing until the VM stops.
    drop(stdin);
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    env.wait_for("the guest's answer on stdout", || {
        text().contains("TYPED THROUGH THE CLI")
    });
    assert!(
        text().starts_with(READY),
        "the scrollback comes first: {}",
        text()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "it quit at stdin's EOF"
    );

    let (status, _) = env.json("POST", "/v1/vms/echo/kill", None);
    assert_eq!(status, 200);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < WAIT, "vm console did not end with the VM");
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("stopped: killed on request"), "{err}");

    // --scrollback (and stdin /dev/null with piped stdout) print and exit.
    for args in [
        &["console", "echo", "--scrollback"][..],
        &["console", "echo"],
    ] {
        let out = env.cli(args);
        out.assert_status(0);
        assert!(out.stdout.contains("TYPED THROUGH THE CLI"), "{out}");
    }
    let out = env.cli(&["console", "nope", "--scrollback"]);
    out.assert_status(2);
    // Attaching to a stopped VM is refused with what to do instead.
    let args: Vec<String> = ["vm", "console", "echo", "--socket"]
        .iter()
        .map(|s| s.to_string())
        .chain([env.socket().display().to_string()])
        .collect();
    let out = support::run_vireo_with_input(&args, Some(b"x"), WAIT);
    out.assert_status(2);
    assert!(out.stderr.contains("vireo vm start echo"), "{out}");
    for verb in ["console", "reboot", "edit"] {
        let out = env.cli(&[verb, "--help"]);
        out.assert_status(0);
        assert!(out.stdout.contains("Example"), "{out}");
    }
}

/// Reboot ends the VM process and starts it again: a new pid, the banner a
/// second time in the same scrollback, and WebSocket clients stay attached.
#[test]
fn reboot_starts_a_new_process_and_keeps_the_console() {
    let env = Env::new("console-reboot");
    let pid = env.start("r", echo_upper);
    env.wait_for("the guest's banner", || env.console("r").contains(READY));
    let mut ws = env.ws("r");
    let mut seen = Seen::default();
    read_until(&mut ws, &mut seen, |s| has_text(s, READY));

    let (status, v) = env.json("POST", "/v1/vms/r/reboot", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    let new_pid = v["pid"].as_i64().unwrap();
    assert_ne!(new_pid, pid, "{v}");
    env.wait_for("the second banner", || {
        env.console("r").matches(READY).count() == 2
    });
    read_until(&mut ws, &mut seen, |s| s.text().matches(READY).count() == 2);
    // Input reaches the new process.
    ws.send(Message::text("after reboot")).unwrap();
    read_until(&mut ws, &mut seen, |s| has_text(s, "AFTER REBOOT"));

    let out = env.cli(&["reboot", "r"]);
    out.assert_status(0);
    assert!(out.stdout.contains("rebooted r (pid "), "{out}");
    env.wait_for("the third banner", || {
        env.console("r").matches(READY).count() == 3
    });
    assert!(seen.texts.is_empty(), "{:?}", seen.texts);

    // A paused VM reboots into a running one.
    let (status, _) = env.json("POST", "/v1/vms/r/pause", None);
    assert_eq!(status, 200);
    let (status, v) = env.json("POST", "/v1/vms/r/reboot", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    env.wait_for("the fourth banner", || {
        env.console("r").matches(READY).count() == 4
    });

    let (status, _) = env.json("POST", "/v1/vms/r/kill", None);
    assert_eq!(status, 200);
    let (status, v) = env.json("POST", "/v1/vms/r/reboot", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let out = env.cli(&["reboot", "r"]);
    out.assert_status(2);
}

/// A guest that resets the machine is started again, until it has reset
/// more than 5 times within a minute (a boot loop): then it stays stopped.
#[test]
fn a_guest_reset_restarts_the_vm_until_the_boot_loop_guard() {
    let env = Env::new("console-reset");
    env.start("loop", |g| {
        g.print("booted\n")?;
        g.a.mov(al, u32::from(guest::I8042_RESET_CPU))?;
        g.a.out(i32::from(guest::I8042_CMD), al)?;
        g.halt_forever()
    });
    env.wait_for("the boot-loop guard", || {
        env.vm("loop")["state"] == "stopped"
    });
    let v = env.vm("loop");
    assert!(
        v["last_exit"].as_str().unwrap().contains("boot loop"),
        "{v}"
    );
    assert_eq!(
        env.console("loop").matches("booted").count(),
        6,
        "{}",
        env.console("loop")
    );
    // A fresh start is allowed again.
    let (status, v) = env.json("POST", "/v1/vms/loop/start", None);
    assert_eq!(status, 200, "{v}");
}

/// `vireo vm edit` with a scripted editor: a change is sent, no change is
/// "no changes", a refused change fails on a non-terminal with the message.
#[test]
fn vm_edit_sends_what_the_editor_changed() {
    let env = Env::new("console-edit");
    let code = assemble64(KernelKind::Elf.entry(), echo_upper);
    let kernel = env.dir.write("k.elf", &KernelKind::Elf.wrap(&code));
    let (status, _) = env.json(
        "POST",
        "/v1/vms",
        Some(json!({"name": "e", "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
    );
    assert_eq!(status, 201);
    let edit = |editor: &str| -> Outcome {
        let out = Command::new(support::vireo_bin())
            .args(["vm", "edit", "e", "--socket"])
            .arg(env.socket())
            .env("EDITOR", editor)
            .env_remove("VISUAL")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Outcome {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: false,
            command: format!("EDITOR={editor} vireo vm edit e"),
            elapsed: Duration::ZERO,
        }
    };
    let out = edit(
        r#"sed -i -e 's/"memory_mib": 32/"memory_mib": 48/' -e 's/"cmdline": null/"cmdline": "console=ttyS0 quiet"/'"#,
    );
    out.assert_status(0);
    assert!(
        out.stdout.contains("updated e (cmdline, memory_mib)"),
        "{out}"
    );
    let v = env.vm("e");
    assert_eq!(
        (v["memory_mib"].as_u64(), v["cmdline"].as_str()),
        (Some(48), Some("console=ttyS0 quiet"))
    );

    let out = edit("true");
    out.assert_status(0);
    assert_eq!(out.stdout.trim(), "no changes", "{out}");

    let out = edit(r#"sed -i 's/"vcpus": 1/"vcpus": 0/'"#);
    out.assert_status(2);
    assert!(out.stderr.contains("vcpus"), "{out}");
    assert_eq!(env.vm("e")["vcpus"], 1);

    let out = edit(r#"sh -c 'echo "{" > "$1"' sh"#);
    out.assert_status(2);
    assert!(out.stderr.contains("not valid JSON"), "{out}");

    let out = edit("false");
    out.assert_status(2);

    // A running VM is not edited.
    let (status, _) = env.json("POST", "/v1/vms/e/start", None);
    assert_eq!(status, 200);
    let out = edit("true");
    out.assert_status(2);
    assert!(out.stderr.contains("stop it"), "{out}");
}

/// A daemon that re-adopts a running VM re-opens its stdin (/proc/PID/fd/0):
/// typing still reaches the guest, which kept running (its stdin never saw
/// EOF while no daemon held the pipe).
#[test]
fn console_input_works_after_the_daemon_is_restarted() {
    let mut env = Env::new("console-readopt");
    let pid = env.start("echo", echo_upper);
    env.wait_for("the guest's banner", || env.console("echo").contains(READY));
    // An attached console does not hold up a graceful shutdown.
    let mut before = env.ws("echo");
    let mut seen = Seen::default();
    read_until(&mut before, &mut seen, |s| has_text(s, READY));
    env.restart_daemon(libc::SIGTERM);
    match before.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001, "{f:?}"),
        other => panic!("expected a close (going away), got {other:?}"),
    }
    env.restart_daemon(libc::SIGKILL);
    assert_eq!(env.vm("echo")["pid"].as_i64(), Some(pid));
    let mut ws = env.ws("echo");
    let mut seen = Seen::default();
    ws.send(Message::text("still typing")).unwrap();
    read_until(&mut ws, &mut seen, |s| has_text(s, "STILL TYPING"));
    let (status, _) = env.json("POST", "/v1/vms/echo/kill", None);
    assert_eq!(status, 200);
}

/// On a terminal (a pty from `script`): the greeting, keystrokes reach the
/// guest, Ctrl-] detaches with a message and leaves the VM running.
#[test]
fn vm_console_on_a_terminal_detaches_on_ctrl_close_bracket() {
    if Command::new("script").arg("--version").output().is_err() {
        return eprintln!("skipping: no `script` (util-linux) to make a terminal");
    }
    let env = Env::new("console-tty");
    env.start("echo", echo_upper);
    env.wait_for("the guest's banner", || env.console("echo").contains(READY));
    let command = format!(
        "{} vm console echo --socket {}",
        support::vireo_bin(),
        env.socket().display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    env.wait_for("the greeting", || {
        text().contains("Connected to echo (Ctrl-] to detach)")
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"on a tty").unwrap();
    env.wait_for("the guest's answer", || text().contains("ON A TTY"));
    stdin.write_all(&[0x1d]).unwrap();
    env.wait_for("the detach", || text().contains("Detached from echo"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < WAIT,
            "vm console did not exit after Ctrl-]"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", text());
    assert_eq!(env.vm("echo")["state"], "running");
}

/// `vireo run` with stdin a pipe (as the daemon runs VMs): the bytes reach
/// the guest's UART, and the end of the pipe does not end the VM.
#[test]
fn vireo_run_takes_piped_stdin_and_outlives_its_eof() {
    let dir = TempDir::new("console-eof");
    let code = assemble64(KernelKind::Elf.entry(), |g| {
        g.print(READY)?;
        g.print("\n")?;
        // Echo three bytes uppercased.
        g.a.mov(ebx, 3u32)?;
        let mut poll = g.a.create_label();
        g.a.set_label(&mut poll)?;
        g.a.mov(edx, u32::from(guest::COM1) + 5)?;
        g.a.in_(al, dx)?;
        g.a.test(al, 1)?;
        g.a.jz(poll)?;
        g.a.mov(edx, u32::from(guest::COM1))?;
        g.a.in_(al, dx)?;
        g.a.sub(al, 0x20)?;
        g.a.out(dx, al)?;
        g.a.dec(ebx)?;
        g.a.jnz(poll)?;
        // Keep running a while after stdin has ended, then power off.
        let mut delay = g.a.create_label();
        g.a.mov(ecx, 3_000_000u32)?;
        g.a.set_label(&mut delay)?;
        g.a.dec(ecx)?;
        g.a.jnz(delay)?;
        g.print("\nstill running after EOF\n")?;
        g.power_off()
    });
    let kernel = dir.write("eof.elf", &KernelKind::Elf.wrap(&code));
    let args: Vec<String> = ["run", "--accel", "emu", "--memory", "32", "--kernel"]
        .iter()
        .map(|s| s.to_string())
        .chain([kernel.display().to_string()])
        .collect();
    let out = support::run_vireo_with_input(&args, Some(b"abc"), Duration::from_secs(60));
    out.assert_status(0);
    assert!(out.stdout.contains("ABC\nstill running after EOF"), "{out}");
}

/// On a terminal, a refused edit is shown and the editor re-opens on the
/// edited text (answering the prompt through a pty from `script`).
#[test]
fn vm_edit_on_a_terminal_reopens_after_a_refused_change() {
    if Command::new("script").arg("--version").output().is_err() {
        return eprintln!("skipping: no `script` (util-linux) to make a terminal");
    }
    let env = Env::new("console-edit-tty");
    let code = assemble64(KernelKind::Elf.entry(), echo_upper);
    let kernel = env.dir.write("k.elf", &KernelKind::Elf.wrap(&code));
    let (status, _) = env.json(
        "POST",
        "/v1/vms",
        Some(json!({"name": "e", "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
    );
    assert_eq!(status, 201);
    // First run: a bad value; second run: fix it in the same text.
    let count = env.dir.path().join("count");
    let editor = env.dir.write(
        "editor.sh",
        format!(
            "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
             if [ $n = 1 ]; then sed -i 's/\"vcpus\": 1/\"vcpus\": 0/' \"$1\"; \
             else sed -i 's/\"vcpus\": 0/\"vcpus\": 2/' \"$1\"; fi\n",
            c = count.display()
        )
        .as_bytes(),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
    let command = format!(
        "{} vm edit e --socket {}",
        support::vireo_bin(),
        env.socket().display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("EDITOR", &editor)
        .env_remove("VISUAL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    env.wait_for("the prompt", || text().contains("Edit again? [Y/n]"));
    assert!(text().contains("vcpus"), "{}", text());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"y\n").unwrap();
    env.wait_for("the update", || text().contains("updated e (vcpus)"));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < WAIT, "vm edit did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(env.vm("e")["vcpus"], 2);
}

/// A client that stops reading never holds up the guest or the others: it
/// falls behind, and when it reads again it is told how much it lost.
#[test]
fn a_stalled_client_lags_without_blocking_the_others() {
    let env = Env::new("console-slow");
    env.start("flood", |g| {
        let mut again = g.a.create_label();
        g.a.set_label(&mut again)?;
        g.print("0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")?;
        g.a.jmp(again)
    });
    let mut stalled = env.ws("flood");
    let mut reader = env.ws("flood");
    let mut total = 0usize;
    let start = Instant::now();
    // More than the scrollback (256 KiB) and the socket's buffer (about
    // 200 KiB) hold for the stalled client.
    while total < 640 << 10 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the reading client got only {total} bytes"
        );
        if let Message::Binary(b) = reader.read().unwrap() {
            total += b.len();
        }
    }
    let mut lagged = Seen::default();
    read_until(&mut stalled, &mut lagged, |s| {
        s.texts.iter().any(|t| t["event"] == "lagged")
    });
    let t = lagged
        .texts
        .iter()
        .find(|t| t["event"] == "lagged")
        .unwrap();
    assert!(t["lost_bytes"].as_u64().unwrap() > 0, "{t}");
    let (status, _) = env.json("POST", "/v1/vms/flood/kill", None);
    assert_eq!(status, 200);
}
