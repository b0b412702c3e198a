//! The daemon end to end: a real `vireo serve` on a temporary state
//! directory and socket, driven through the `vireo vm` CLI and raw HTTP over
//! the Unix socket. VMs are tiny guests assembled here and run on the
//! emulator (`--accel emu`), so these tests need no /dev/kvm.
//!
//! Every test's processes (daemon and VMs) carry its temporary directory in
//! their command line; the guard kills them all by pid when the test ends.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::{json, Value};

use support::guest::{self, assemble64, Guest64};
use support::{run_vireo_args, KernelKind, Outcome, TempDir};

const HELLO: &str = "hello from the daemon's guest";
const WAIT: Duration = Duration::from_secs(15);

/// One daemon with its state directory and socket, and everything it starts.
struct Env {
    dir: TempDir,
    daemon: Option<Child>,
}

impl Env {
    fn new(tag: &str) -> Env {
        let mut env = Env {
            dir: TempDir::new(tag),
            daemon: None,
        };
        env.start_daemon();
        env
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn serve_args(&self, socket: &Path) -> Vec<String> {
        vec![
            "serve".into(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--listen".into(),
            format!("unix:{}", socket.display()),
        ]
    }

    fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(support::vireo_bin())
            .args(self.serve_args(&self.socket()))
            .env("VIREO_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting vireo serve");
        self.daemon = Some(child);
        let start = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited with {status}:\n{}", self.daemon_log());
            }
            assert!(start.elapsed() < WAIT, "the daemon did not listen in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// kill -9 the daemon (VMs keep running).
    fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill().unwrap();
            d.wait().unwrap();
        }
    }

    /// A raw HTTP/1.1 request; the status and the body.
    fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).expect("connecting to the daemon");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "the test client reads only content-length bodies:\n{head}"
        );
        (status, body.to_string())
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (status, body) = self.http(method, path, text.as_deref());
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
        };
        (status, v)
    }

    fn vm(&self, name: &str) -> Value {
        let (status, v) = self.json("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// `vireo vm ARGS... --socket SOCKET`.
    fn cli(&self, args: &[&str]) -> Outcome {
        let mut full: Vec<String> = vec!["vm".into()];
        full.extend(args.iter().map(|s| s.to_string()));
        full.push("--socket".into());
        full.push(self.socket().display().to_string());
        run_vireo_args(&full, WAIT)
    }

    fn kernel(&self, file: &str, body: impl FnOnce(&mut Guest64) -> guest::AsmResult) -> String {
        let code = assemble64(KernelKind::Elf.entry(), body);
        self.dir
            .write(file, &KernelKind::Elf.wrap(&code))
            .display()
            .to_string()
    }

    /// Define an emulator VM with `kernel`.
    fn create(&self, name: &str, kernel: &str) {
        let (status, v) = self.json(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
        );
        assert_eq!(status, 201, "{v}");
    }

    fn console(&self, name: &str) -> String {
        let (status, text) = self.http("GET", &format!("/v1/vms/{name}/console"), None);
        assert_eq!(status, 200, "{text}");
        text
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}\n--- daemon log ---\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
        // The VMs: every process whose command line names our directory.
        let me = std::process::id() as i32;
        let tag = self.dir.path().display().to_string();
        for pid in processes_mentioning(&tag) {
            if pid != me {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn processes_mentioning(text: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(text))
                .unwrap_or(false)
        })
        .collect()
}

fn alive(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Not gone, and not a zombie.
    stat.rsplit_once(')')
        .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Prints [`HELLO`], then "tick" now and then, forever.
fn ticking(g: &mut Guest64) -> guest::AsmResult {
    g.print(HELLO)?;
    g.print("\n")?;
    let mut again = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.set_label(&mut again)?;
    g.a.mov(ecx, 2_000_000u32)?;
    g.a.set_label(&mut delay)?;
    g.a.dec(ecx)?;
    g.a.jnz(delay)?;
    g.print("tick\n")?;
    g.a.jmp(again)
}

/// Prints [`HELLO`] and halts (no CPU burnt while it waits).
fn hello_halt(g: &mut Guest64) -> guest::AsmResult {
    g.print(HELLO)?;
    g.print("\n")?;
    g.halt_forever()
}

/// Prints [`HELLO`] and powers off through ACPI S5.
fn hello_power_off(g: &mut Guest64) -> guest::AsmResult {
    g.print(HELLO)?;
    g.print("\n")?;
    g.power_off()
}

fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("?")
}

#[test]
fn lifecycle_through_the_cli() {
    let env = Env::new("daemon-life");
    let kernel = env.kernel("vmlinux", hello_halt);
    let out = env.cli(&[
        "create", "web", "--kernel", &kernel, "--memory", "32", "--accel", "emu",
    ]);
    out.assert_status(0);
    assert!(out.stdout.contains("created web"), "{out}");

    let out = env.cli(&["list"]);
    out.assert_status(0);
    assert!(out.stdout.starts_with("NAME"), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("web") && l.contains("stopped")),
        "{out}"
    );

    let out = env.cli(&["show", "web", "--json"]);
    out.assert_status(0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["vcpus"].as_u64(), v["memory_mib"].as_u64()),
        (Some(1), Some(32))
    );
    assert_eq!(v["kernel"].as_str(), Some(kernel.as_str()));

    let out = env.cli(&["start", "web"]);
    out.assert_status(0);
    assert!(out.stdout.contains("started web (pid "), "{out}");
    let pid = env.vm("web")["pid"].as_i64().expect("a pid while running");
    assert!(alive(pid));

    env.wait_for("the guest's line in the console", || {
        env.console("web").contains(HELLO)
    });
    let out = env.cli(&["console", "web"]);
    out.assert_status(0);
    assert!(out.stdout.contains(HELLO), "{out}");

    // Starting a running VM is the user's mistake: exit 2, one line.
    let out = env.cli(&["start", "web"]);
    out.assert_status(2);
    assert!(out.stderr.contains("already running"), "{out}");

    let out = env.cli(&["show", "web"]);
    out.assert_status(0);
    assert!(out.stdout.contains("state:        running"), "{out}");

    // Deleting a running VM is refused.
    env.cli(&["delete", "web"]).assert_status(2);

    // This guest ignores the ACPI power button: without --force the stop
    // times out, with it the VM process is stopped.
    let out = env.cli(&["stop", "web", "--timeout", "1"]);
    out.assert_status(2);
    assert!(out.stderr.contains("power button"), "{out}");
    let out = env.cli(&["stop", "web", "--force", "--timeout", "1"]);
    out.assert_status(0);
    assert!(
        out.stdout.contains("web: stopped (stopped on request"),
        "{out}"
    );
    assert!(!alive(pid), "the VM process is still there after stop");
    let v = env.vm("web");
    assert_eq!(state(&v), "stopped");
    assert!(v["pid"].is_null());

    // The scrollback of the last run stays readable after it ends.
    assert!(env.console("web").contains(HELLO));

    env.cli(&["stop", "web"]).assert_status(2);
    env.cli(&["delete", "web"]).assert_status(0);
    let out = env.cli(&["list", "--json"]);
    out.assert_status(0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["vms"], json!([]));
    let out = env.cli(&["show", "web"]);
    out.assert_status(2);
    assert!(out.stderr.contains("no VM named \"web\""), "{out}");
}

#[test]
fn bad_input_gets_4xx_naming_the_field() {
    let env = Env::new("daemon-bad");
    let kernel = env.kernel("vmlinux", hello_halt);
    env.create("a", &kernel);

    let check = |method: &str, path: &str, body: &str, status: u16, code: &str, needle: &str| {
        let (got, text) = env.http(method, path, Some(body));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{method} {path} {body}: error body is not JSON ({e}): {text}")
        });
        assert_eq!(got, status, "{method} {path} {body}: {text}");
        assert_eq!(v["error"]["code"], code, "{method} {path} {body}: {text}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{method} {path} {body}: {msg:?} lacks {needle:?}"
        );
    };
    let k = &kernel;
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "a", "kernel": k}).to_string(),
        409,
        "already_exists",
        "\"a\" already exists",
    );
    check(
        "POST",
        "/v1/vms",
        r#"{"name": "b", "#,
        400,
        "malformed_json",
        "EOF",
    );
    check("POST", "/v1/vms", "", 400, "malformed_json", "EOF");
    check("POST", "/v1/vms", "[1]", 400, "invalid_request", "");
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "cpus": 2}).to_string(),
        400,
        "invalid_request",
        "unknown field `cpus`",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "vcpus": 0}).to_string(),
        400,
        "invalid_value",
        "vcpus",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "vcpus": -3}).to_string(),
        400,
        "invalid_request",
        "vcpus",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "vcpus": 255}).to_string(),
        400,
        "invalid_value",
        "vcpus",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "memory_mib": 1u64 << 40}).to_string(),
        400,
        "invalid_value",
        "memory_mib",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "memory_mib": "lots"}).to_string(),
        400,
        "invalid_request",
        "memory_mib",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": "/nonexistent/vmlinux"}).to_string(),
        400,
        "missing_file",
        "kernel",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": "vmlinux"}).to_string(),
        400,
        "invalid_value",
        "absolute",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b"}).to_string(),
        400,
        "invalid_value",
        "kernel",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "image": "/"}).to_string(),
        400,
        "invalid_value",
        "image",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b/c", "kernel": k}).to_string(),
        400,
        "invalid_value",
        "name",
    );
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": k, "accel": "xen"}).to_string(),
        400,
        "invalid_request",
        "accel",
    );
    check(
        "PATCH",
        "/v1/vms/a",
        &json!({"vcpus": 0}).to_string(),
        400,
        "invalid_value",
        "vcpus",
    );
    check(
        "PATCH",
        "/v1/vms/a",
        &json!({"name": "z"}).to_string(),
        400,
        "invalid_request",
        "unknown field `name`",
    );
    check(
        "PATCH",
        "/v1/vms/nope",
        &json!({"vcpus": 2}).to_string(),
        404,
        "not_found",
        "nope",
    );
    check("GET", "/v1/vms/nope", "", 404, "not_found", "nope");
    check("DELETE", "/v1/vms/nope", "", 404, "not_found", "nope");
    check("POST", "/v1/vms/nope/start", "", 404, "not_found", "nope");
    check(
        "POST",
        "/v1/vms/a/stop",
        "",
        409,
        "invalid_state",
        "not running",
    );
    check(
        "POST",
        "/v1/vms/a/stop",
        r#"{"forse": true}"#,
        400,
        "invalid_request",
        "forse",
    );
    check(
        "POST",
        "/v1/vms/a/kill",
        "",
        409,
        "invalid_state",
        "not running",
    );
    check(
        "POST",
        "/v1/vms/a/pause",
        "",
        409,
        "invalid_state",
        "not running",
    );
    check(
        "POST",
        "/v1/vms/a/resume",
        "",
        409,
        "invalid_state",
        "not running",
    );
    check("GET", "/v2/vms", "", 404, "not_found", "/v1");
    check("PUT", "/v1/vms", "{}", 405, "method_not_allowed", "");
    check(
        "POST",
        "/v1/vms",
        &format!("{{\"name\": \"{}\"}}", "x".repeat(70_000)),
        413,
        "body_too_large",
        "",
    );

    // Nothing half-created by any of that.
    let (_, v) = env.json("GET", "/v1/vms", None);
    let names: Vec<&str> = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"]);

    // PATCH changes a stopped VM; null clears a field.
    let (status, v) = env.json(
        "PATCH",
        "/v1/vms/a",
        Some(json!({"vcpus": 2, "cmdline": "x=1"})),
    );
    assert_eq!(
        (status, v["vcpus"].as_u64(), v["cmdline"].as_str()),
        (200, Some(2), Some("x=1")),
        "{v}"
    );
    let (status, v) = env.json("PATCH", "/v1/vms/a", Some(json!({"cmdline": null})));
    assert_eq!((status, v["cmdline"].clone()), (200, Value::Null), "{v}");

    // A kernel vireo run refuses: start fails with its reason, the VM is crashed.
    let junk = env.dir.write("junk", b"not a kernel").display().to_string();
    env.create("junk", &junk);
    check(
        "POST",
        "/v1/vms/junk/start",
        "",
        400,
        "start_failed",
        "neither a 64-bit ELF",
    );
    assert_eq!(state(&env.vm("junk")), "crashed");

    // The served OpenAPI document is the repository's.
    let (status, served) = env.http("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let kept = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemon/openapi.json"
    ))
    .unwrap();
    assert_eq!(served, kept);
}

#[test]
fn running_state_and_conflicts_over_http() {
    let env = Env::new("daemon-http");
    let kernel = env.kernel("vmlinux", hello_halt);
    env.create("a", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/a/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let (status, v) = env.json("POST", "/v1/vms/a/start", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (status, v) = env.json("PATCH", "/v1/vms/a", Some(json!({"vcpus": 2})));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (status, v) = env.json("DELETE", "/v1/vms/a", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (status, v) = env.json("POST", "/v1/vms/a/kill", None);
    assert_eq!(
        (status, state(&v), v["last_exit"].as_str()),
        (200, "stopped", Some("killed on request (SIGKILL)")),
        "{v}"
    );
    let (status, _) = env.json("DELETE", "/v1/vms/a", None);
    assert_eq!(status, 204);
}

#[test]
fn guest_power_off_is_recorded() {
    let env = Env::new("daemon-s5");
    let kernel = env.kernel("vmlinux", hello_power_off);
    env.create("s5", &kernel);
    let (status, _) = env.json("POST", "/v1/vms/s5/start", None);
    assert_eq!(status, 200);
    env.wait_for("the VM to power off", || state(&env.vm("s5")) == "stopped");
    let v = env.vm("s5");
    assert_eq!(v["last_exit"].as_str(), Some("powered off"), "{v}");
    assert!(v["last_exit_at"].is_string());
    assert!(env.console("s5").contains(HELLO));
    // A powered-off VM starts again.
    let (status, v) = env.json("POST", "/v1/vms/s5/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_for("the second power-off", || {
        let v = env.vm("s5");
        state(&v) == "stopped" && v["started_at"] != Value::Null
    });
}

#[test]
fn kill_9_of_the_daemon_loses_nothing_and_running_vms_are_readopted() {
    let mut env = Env::new("daemon-kill9");
    let kernel = env.kernel("vmlinux", ticking);
    env.create("keep", &kernel);
    env.create("gone", &kernel);
    env.create("idle", &kernel);
    for name in ["keep", "gone"] {
        let (status, v) = env.json("POST", &format!("/v1/vms/{name}/start"), None);
        assert_eq!(status, 200, "{v}");
    }
    env.wait_for("the guest's line", || env.console("keep").contains(HELLO));
    let keep_pid = env.vm("keep")["pid"].as_i64().unwrap();
    let gone_pid = env.vm("gone")["pid"].as_i64().unwrap();

    env.kill_daemon();
    assert!(alive(keep_pid), "the VM died with its daemon");
    // One VM ends while no daemon watches it.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(gone_pid as i32, libc::SIGKILL) };
    env.wait_for("the VM to die", || !alive(gone_pid));

    env.start_daemon();
    let (_, v) = env.json("GET", "/v1/vms", None);
    let names: Vec<&str> = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gone", "idle", "keep"], "{v}");

    let keep = env.vm("keep");
    assert_eq!(
        (state(&keep), keep["pid"].as_i64()),
        ("running", Some(keep_pid)),
        "{keep}"
    );
    let gone = env.vm("gone");
    assert_eq!(state(&gone), "stopped", "{gone}");
    assert!(
        gone["last_exit"]
            .as_str()
            .unwrap()
            .contains("daemon restarted"),
        "{gone}"
    );
    assert_eq!(state(&env.vm("idle")), "stopped");

    // The console of the re-adopted VM is read again.
    env.wait_for("console output after re-adoption", || {
        env.console("keep").contains("tick")
    });

    let (status, v) = env.json(
        "POST",
        "/v1/vms/keep/stop",
        Some(json!({"force": true, "timeout_secs": 1})),
    );
    assert_eq!((status, state(&v)), (200, "stopped"), "{v}");
    assert!(!alive(keep_pid), "the re-adopted VM still runs after stop");
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let env = Env::new("daemon-twice");
    let other = env.dir.path().join("other.sock");
    let out = run_vireo_args(&env.serve_args(&other), WAIT);
    out.assert_status(2);
    assert!(
        out.stderr.contains("already using the state directory"),
        "{out}"
    );
    // The first one is unharmed.
    let (status, _) = env.json("GET", "/v1/vms", None);
    assert_eq!(status, 200);
}

#[test]
fn the_cli_says_how_to_start_a_missing_daemon() {
    let dir = TempDir::new("daemon-none");
    let sock = dir.path().join("nothing.sock").display().to_string();
    let out = run_vireo_args(
        &["vm".into(), "list".into(), "--socket".into(), sock.clone()],
        WAIT,
    );
    out.assert_status(1);
    assert!(
        out.stderr
            .contains(&format!("cannot reach the vireo daemon at {sock}"))
            && out.stderr.contains("vireo serve"),
        "{out}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    for verb in [
        "create", "list", "show", "start", "stop", "kill", "delete", "console",
    ] {
        let out = run_vireo_args(&["vm".into(), verb.into(), "--help".into()], WAIT);
        out.assert_status(0);
        assert!(
            out.stdout.contains("Example"),
            "vm {verb} --help has no example\n{out}"
        );
    }
    let out = run_vireo_args(
        &["serve".into(), "--listen".into(), "tcp:127.0.0.1:1".into()],
        WAIT,
    );
    out.assert_status(2);
}

/// Pause freezes the guest (its console stops growing) and resume lets it
/// go on, through the VM process's control socket.
#[test]
fn pause_and_resume_freeze_and_continue_the_guest() {
    let env = Env::new("daemon-pause");
    let kernel = env.kernel("vmlinux", ticking);
    env.create("p", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/p/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_for("the first tick", || env.console("p").contains("tick"));

    let (status, v) = env.json("POST", "/v1/vms/p/pause", None);
    assert_eq!((status, state(&v)), (200, "paused"), "{v}");
    let (status, v) = env.json("POST", "/v1/vms/p/pause", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "pausing twice: {v}"
    );
    // Output already on its way settles, then nothing new comes.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let frozen = env.console("p").len();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(env.console("p").len(), frozen, "the guest ran while paused");

    let (status, v) = env.json("POST", "/v1/vms/p/resume", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    env.wait_for("a tick after resume", || env.console("p").len() > frozen);
    let (status, v) = env.json("POST", "/v1/vms/p/kill", None);
    assert_eq!(status, 200, "{v}");
}

/// `vm stop` presses the ACPI power button: a guest that handles it shuts
/// down by itself and the VM ends "powered off", no signal needed.
#[test]
fn stop_presses_the_power_button_and_the_guest_shuts_down() {
    let env = Env::new("daemon-pwrbtn");
    let kernel = env.kernel("vmlinux", guest::wait_for_power_button);
    env.create("g", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/g/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_for("the guest to arm its power button", || {
        env.console("g").contains("waiting for the power button")
    });
    let out = env.cli(&["stop", "g"]);
    out.assert_status(0);
    let v = env.vm("g");
    assert_eq!(
        (state(&v), v["last_exit"].as_str()),
        ("stopped", Some("powered off")),
        "{v}"
    );
    assert!(env.console("g").contains("power button pressed"));
}
