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
use std::process::Command;
use std::time::Duration;

use iced_x86::code_asm::*;
use serde_json::{json, Value};

use support::daemon::DaemonEnv as Env;
use support::guest::{self, Guest64};
use support::{run_vireo_args, TempDir};

const HELLO: &str = "hello from the daemon's guest";
const WAIT: Duration = Duration::from_secs(15);

impl Env {
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
        "path_not_allowed",
        "kernel: /nonexistent/vmlinux is not beneath a storage directory",
    );
    // Relative paths are taken in the (first) storage directory.
    check(
        "POST",
        "/v1/vms",
        &json!({"name": "b", "kernel": "nope/vmlinux"}).to_string(),
        400,
        "missing_file",
        "nope/vmlinux",
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
        "path_not_allowed",
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

/// `GET /v1/version` names the same build `vireo --version` prints: the
/// package version, the git commit and the API version.
#[test]
fn version_endpoint_matches_the_cli() {
    let env = Env::new("daemon-version");
    let (status, v) = env.json("GET", "/v1/version", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["api_version"], "1", "{v}");
    let commit = v["commit"].as_str().unwrap_or_default();
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{v}"
    );
    assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{v}");
    let out = run_vireo_args(&["--version".to_string()], WAIT);
    out.assert_status(0);
    assert_eq!(
        out.stdout.trim(),
        format!(
            "vireo {} (commit {commit}, API v1)",
            env!("CARGO_PKG_VERSION")
        ),
        "{out}"
    );
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
        "create", "update", "list", "show", "start", "stop", "kill", "delete", "console", "balloon",
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

/// The error code and message of a 4xx reply, after checking its status.
fn error_of(reply: (u16, Value), status: u16) -> (String, String) {
    let (got, v) = reply;
    assert_eq!(got, status, "{v}");
    (
        v["error"]["code"].as_str().unwrap_or("?").to_string(),
        v["error"]["message"].as_str().unwrap_or("?").to_string(),
    )
}

/// Device option strings are checked by the devices' parsers when a VM is
/// defined or changed, stored, shown, and handed to `vireo run` as flags.
#[test]
fn devices_are_checked_stored_and_passed_to_the_vm() {
    let env = Env::new("daemon-dev");
    let kernel = env.kernel("vmlinux", hello_halt);
    let disk = env
        .dir
        .write("root.raw", &[0u8; 4096])
        .display()
        .to_string();
    let data = env
        .dir
        .write("data.raw", &[0u8; 4096])
        .display()
        .to_string();
    // In a directory of its own: the jail binds the socket's directory,
    // which must not hold the daemon's state.
    let vsock_dir = env.dir.path().join("vsock");
    std::fs::create_dir(&vsock_dir).unwrap();
    let vsock = vsock_dir.join("v.sock").display().to_string();

    // Bad definitions: 400, the field path and the parser's words; nothing stored.
    let bad = |extra: Value, code: &str, needle: &str| {
        let mut body = json!({"name": "bad", "kernel": kernel, "memory_mib": 32, "accel": "emu"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (got_code, msg) = error_of(env.json("POST", "/v1/vms", Some(body.clone())), 400);
        assert_eq!(got_code, code, "{body}: {msg}");
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    };
    bad(
        json!({"nets": ["tap=tap0,mac=zz"]}),
        "invalid_value",
        "nets[0]: mac=zz",
    );
    bad(
        json!({"disks": [disk, "readonly=on"]}),
        "invalid_value",
        "disks[1]: path= is required",
    );
    bad(
        json!({"disks": [format!("{disk},speed=9")]}),
        "invalid_value",
        "disks[0]: unknown option \"speed\"",
    );
    let missing = env
        .dir
        .path()
        .join("nonexistent.qcow2")
        .display()
        .to_string();
    bad(
        json!({"disks": [missing]}),
        "missing_file",
        &format!("disks[0]: path={missing}: no such file"),
    );
    bad(
        json!({"disks": ["/nonexistent/d.qcow2"]}),
        "path_not_allowed",
        "disks[0]: /nonexistent/d.qcow2 is not beneath a storage directory",
    );
    bad(
        json!({"nets": ["tap0", "tap=tap0"]}),
        "invalid_value",
        "nets[1]: tap=tap0 is already nets[0]",
    );
    bad(
        json!({"vsock": "cid=1,socket=/tmp/x"}),
        "invalid_value",
        "vsock: cid=1",
    );
    bad(
        json!({"rng": "colour=red"}),
        "invalid_value",
        "rng: unknown option \"colour\"",
    );
    bad(
        json!({"balloon": "target=32"}),
        "invalid_value",
        "balloon: target=32 must be less than memory_mib",
    );
    bad(json!({"disks": "/x"}), "invalid_request", "disks");
    let (_, v) = env.json("GET", "/v1/vms", None);
    assert_eq!(v["vms"], json!([]), "a bad definition was stored");

    // Through the CLI: every device flag.
    let out = env.cli(&[
        "create",
        "full",
        "--kernel",
        &kernel,
        "--memory",
        "32",
        "--accel",
        "emu",
        "--disk",
        &format!("path={disk},id=root,serial=S1,bw=10M,ops=1000"),
        "--disk",
        &format!("{data},readonly=on"),
        "--net",
        "tap=tap0,mtu=1400",
        "--net",
        "tap=tap1,mac=52:54:00:12:34:56",
        "--vsock",
        &format!("cid=3,socket={vsock}"),
        "--rng",
        "--balloon=target=8",
    ]);
    out.assert_status(0);
    assert!(
        out.stdout.contains("2 disks, 2 nets, vsock, rng, balloon"),
        "{out}"
    );
    // Stored with their paths as found and their formats fixed (probed
    // now, once, since none was given).
    let v = env.vm("full");
    assert_eq!(
        v["disks"],
        json!([
            format!("path={disk},id=root,serial=S1,bw=10M,ops=1000,format=raw"),
            format!("path={data},readonly=on,format=raw")
        ])
    );
    let net0 = v["nets"][0].as_str().unwrap().to_string();
    let mac = net0
        .strip_prefix("tap=tap0,mtu=1400,mac=")
        .unwrap_or_else(|| panic!("no MAC pinned: {v}"));
    assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    assert_eq!(v["nets"][1], "tap=tap1,mac=52:54:00:12:34:56");
    assert_eq!(v["vsock"], format!("cid=3,socket={vsock}"));
    assert_eq!(
        (v["rng"].as_str(), v["balloon"].as_str()),
        (Some(""), Some("target=8"))
    );
    let out = env.cli(&["show", "full"]);
    out.assert_status(0);
    for line in [
        format!("disk:         path={disk},id=root"),
        format!("disk:         path={data},readonly=on,format=raw"),
        format!("net:          {net0}"),
        format!("vsock:        cid=3,socket={vsock}"),
        "rng:          (defaults)".to_string(),
        "balloon:      target=8".to_string(),
    ] {
        assert!(out.stdout.contains(&line), "{line:?} not in\n{out}");
    }

    // A change keeps what it does not name (the pinned MAC too); a bad
    // change is refused and changes nothing.
    let (status, v) = env.json("PATCH", "/v1/vms/full", Some(json!({"vcpus": 2})));
    assert_eq!(
        (status, v["nets"][0].as_str()),
        (200, Some(net0.as_str())),
        "{v}"
    );
    let (code, msg) = error_of(
        env.json(
            "PATCH",
            "/v1/vms/full",
            Some(json!({"nets": ["tap0", "tap=tap2,mtu=9"]})),
        ),
        400,
    );
    assert_eq!(code, "invalid_value");
    assert!(msg.starts_with("nets[1]: mtu=9"), "{msg}");
    assert_eq!(env.vm("full")["nets"][0].as_str(), Some(net0.as_str()));
    let out = env.cli(&[
        "update",
        "full",
        "--no-disks",
        "--no-nets",
        "--no-vsock",
        "--rng=bw=1M",
        "--no-balloon",
    ]);
    out.assert_status(0);
    let v = env.vm("full");
    assert_eq!(
        (
            &v["disks"],
            &v["nets"],
            &v["vsock"],
            &v["rng"],
            &v["balloon"]
        ),
        (
            &json!([]),
            &json!([]),
            &Value::Null,
            &json!("bw=1M"),
            &Value::Null
        ),
        "{v}"
    );
    let out = env.cli(&["update", "full", "--balloon=target=99"]);
    out.assert_status(2);
    assert!(out.stderr.contains("balloon: target=99"), "{out}");

    // A VM with an rng, a balloon and a vsock device starts, and its
    // `vireo run` gets them as flags.
    let (status, v) = env.json(
        "POST",
        "/v1/vms",
        Some(
            json!({"name": "dev", "kernel": kernel, "memory_mib": 32, "accel": "emu",
                    "rng": "", "balloon": "", "vsock": format!("cid=3,socket={vsock}")}),
        ),
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = env.json("POST", "/v1/vms/dev/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let pid = v["pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(args.get(1).map(String::as_str), Some("run"), "{args:?}");
    for flag in [
        "--rng".to_string(),
        "--balloon".into(),
        format!("--vsock=cid=3,socket={vsock}"),
    ] {
        assert!(args.contains(&flag), "{flag} not in {args:?}");
    }
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--disk") || a.starts_with("--net")),
        "{args:?}"
    );
    env.wait_for("the guest's line", || env.console("dev").contains(HELLO));
    assert_eq!(state(&env.vm("dev")), "running");

    // The balloon, through the VM's control socket.
    let (status, b) = env.json("GET", "/v1/vms/dev/balloon", None);
    assert_eq!(status, 200, "{b}");
    assert_eq!(
        (b["target_mib"].as_u64(), b["actual_mib"].as_u64()),
        (Some(0), Some(0)),
        "{b}"
    );
    let (status, b) = env.json("PUT", "/v1/vms/dev/balloon", Some(json!({"target_mib": 8})));
    assert_eq!((status, b["target_mib"].as_u64()), (200, Some(8)), "{b}");
    let out = env.cli(&["balloon", "dev"]);
    out.assert_status(0);
    assert!(
        out.stdout
            .contains("dev: balloon target 8 MiB, actual 0 MiB"),
        "{out}"
    );
    let out = env.cli(&["balloon", "dev", "--target", "4", "--json"]);
    out.assert_status(0);
    let b: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(b["target_mib"].as_u64(), Some(4), "{out}");
    let (code, msg) = error_of(
        env.json(
            "PUT",
            "/v1/vms/dev/balloon",
            Some(json!({"target_mib": 32})),
        ),
        400,
    );
    assert_eq!(code, "invalid_value");
    assert!(msg.starts_with("target_mib: 32 MiB"), "{msg}");
    let (code, msg) = error_of(
        env.json("PUT", "/v1/vms/dev/balloon", Some(json!({"target": 4}))),
        400,
    );
    assert_eq!(code, "invalid_request");
    assert!(msg.contains("unknown field `target`"), "{msg}");

    // No balloon, or not running: a clear 409.
    let (code, msg) = error_of(env.json("GET", "/v1/vms/full/balloon", None), 409);
    assert_eq!(code, "invalid_state", "{msg}");
    env.create("plain", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/plain/start", None);
    assert_eq!(status, 200, "{v}");
    let (code, msg) = error_of(env.json("GET", "/v1/vms/plain/balloon", None), 409);
    assert_eq!(code, "no_balloon");
    assert!(msg.contains("VM plain has no balloon device"), "{msg}");
    let out = env.cli(&["balloon", "plain", "--target", "4"]);
    out.assert_status(2);
    assert!(out.stderr.contains("no balloon device"), "{out}");
    let (code, _) = error_of(env.json("GET", "/v1/vms/nope/balloon", None), 404);
    assert_eq!(code, "not_found");
    for vm in ["dev", "plain"] {
        let (status, v) = env.json("POST", &format!("/v1/vms/{vm}/kill"), None);
        assert_eq!(status, 200, "{v}");
    }
}

/// A state database written by a vireo without device support (schema 1)
/// is migrated when the daemon opens it: its VMs keep their definitions,
/// have no devices, and can be given some.
#[test]
fn an_old_state_database_is_migrated() {
    let mut env = Env::without_daemon("daemon-migrate");
    let kernel = env.kernel("vmlinux", hello_halt);
    std::fs::create_dir_all(env.state()).unwrap();
    let db = env.state().join("state.db");
    // Schema 1, verbatim, with one VM in it.
    let sql = format!(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL);
         INSERT INTO schema_migrations VALUES (1, 1700000000);
         CREATE TABLE vm_definitions (
            name TEXT PRIMARY KEY NOT NULL, vcpus INTEGER NOT NULL CHECK (vcpus > 0),
            memory_mib INTEGER NOT NULL CHECK (memory_mib > 0), kernel TEXT, initrd TEXT,
            cmdline TEXT, image TEXT, accel TEXT NOT NULL, created_at INTEGER NOT NULL) STRICT;
         CREATE TABLE vm_runtime (
            name TEXT PRIMARY KEY NOT NULL REFERENCES vm_definitions(name) ON DELETE CASCADE,
            state TEXT NOT NULL, pid INTEGER, pid_start_time INTEGER, started_at INTEGER,
            last_exit TEXT, last_exit_at INTEGER) STRICT;
         INSERT INTO vm_definitions VALUES ('old', 1, 32, '{kernel}', NULL, 'quiet', NULL, 'emu', 1700000000);
         INSERT INTO vm_runtime (name, state, last_exit) VALUES ('old', 'stopped', 'powered off');"
    );
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(&sql)
        .output()
        .expect("this test needs the sqlite3 command to write an old database");
    assert!(
        out.status.success(),
        "sqlite3: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    env.start_daemon();
    assert!(
        env.daemon_log().contains("applied schema migration 2"),
        "{}",
        env.daemon_log()
    );
    let v = env.vm("old");
    assert_eq!(
        (
            v["kernel"].as_str(),
            v["cmdline"].as_str(),
            v["last_exit"].as_str()
        ),
        (Some(kernel.as_str()), Some("quiet"), Some("powered off")),
        "{v}"
    );
    assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
    assert_eq!(
        (
            &v["disks"],
            &v["nets"],
            &v["vsock"],
            &v["rng"],
            &v["balloon"]
        ),
        (
            &json!([]),
            &json!([]),
            &Value::Null,
            &Value::Null,
            &Value::Null
        ),
        "{v}"
    );
    let (status, v) = env.json("PATCH", "/v1/vms/old", Some(json!({"rng": "bw=1M"})));
    assert_eq!((status, v["rng"].as_str()), (200, Some("bw=1M")), "{v}");
    let (status, v) = env.json("POST", "/v1/vms/old/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    env.wait_for("the migrated VM's guest", || {
        env.console("old").contains(HELLO)
    });
}

// ---- snapshots, restore, clones ---------------------------------------------

/// TSC ticks between two counts: 50 ms on the emulator's nanosecond TSC.
const COUNT_DELAY_TICKS: u32 = 50_000_000;

/// Forever { counter += 1 (in guest memory); print `count=XXXXXXXX`; wait }:
/// a restored guest goes on from the counter the snapshot saved.
fn counting(g: &mut Guest64) -> guest::AsmResult {
    let counter = g.data(&[0u8; 8]);
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    g.a.lea(rdi, ptr(counter))?;
    g.a.inc(qword_ptr(rdi))?;
    g.a.mov(rbx, qword_ptr(rdi))?;
    g.print("count=")?;
    g.print_hex(rbx, 8)?;
    g.print("\n")?;
    let a = &mut g.a;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.lea(r8, qword_ptr(rax + COUNT_DELAY_TICKS as i32))?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.pause()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r8)?;
    a.jb(wait)?;
    a.jmp(top)
}

/// Every whole `count=XXXXXXXX` line's value, in order.
fn counts(output: &str) -> Vec<u64> {
    output
        .split('\n')
        .filter_map(|line| {
            let hex = line.trim_end_matches('\r').strip_prefix("count=")?;
            (hex.len() == 8)
                .then(|| u64::from_str_radix(hex, 16).ok())
                .flatten()
        })
        .collect()
}

impl Env {
    /// The VM's counts so far.
    fn counts(&self, name: &str) -> Vec<u64> {
        counts(&self.console(name))
    }

    /// Wait until the VM has printed a count of at least `n`.
    fn wait_count(&self, name: &str, n: u64) -> u64 {
        let mut last = 0;
        self.wait_for(&format!("{name} to count to {n}"), || {
            last = self.counts(name).last().copied().unwrap_or(0);
            last >= n
        });
        last
    }

    /// Wait until a VM whose console holds an older run's counts shows the
    /// restored guest: after a drop in the counts (the old run counted on,
    /// the restored one starts over from the snapshot's counter), `n` more
    /// counts. Returns the restored run's counts.
    fn restored_counts(&self, name: &str, n: usize) -> Vec<u64> {
        let mut after = Vec::new();
        self.wait_for(&format!("{name}'s restored guest to count"), || {
            let c = self.counts(name);
            after = match c.windows(2).rposition(|w| w[1] <= w[0]) {
                Some(i) => c[i + 1..].to_vec(),
                None => Vec::new(),
            };
            after.len() >= n
        });
        after
    }
}

/// The range the saved counter lies in: what the guest had printed before
/// the request, to what it printed once the reply had come and two more
/// counts had passed.
fn snapshot_window(env: &Env, name: &str, take: impl FnOnce() -> Value) -> (Value, u64, u64) {
    let before = env.counts(name).last().copied().unwrap_or(0);
    let snap = take();
    let after = env.counts(name).last().copied().unwrap_or(0);
    let upper = env.wait_count(name, after + 2);
    (snap, before, upper)
}

fn assert_counts_on(what: &str, c: &[u64], lo: u64, hi: u64) {
    assert!(
        !c.is_empty() && (lo..=hi).contains(&c[0]),
        "{what}: restored guest started at {c:?}, the snapshot was taken between {lo} and {hi}"
    );
    for pair in c.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: counts skip: {c:?}");
    }
}

/// Snapshots through the API and the CLI: taken from a running VM, listed,
/// restored into the running VM (console kept) and into a stopped one,
/// cloned into a second VM that runs beside the first, and deleted once
/// nothing depends on them. Errors are 4xx naming the problem.
#[test]
fn snapshots_restore_clone_and_delete() {
    let env = Env::new("daemon-snap");
    let kernel = env.kernel("vmlinux", counting);
    env.create("s", &kernel);

    // A stopped VM cannot be snapshotted.
    let (code, msg) = error_of(
        env.json("POST", "/v1/vms/s/snapshots", Some(json!({"tag": "x"}))),
        409,
    );
    assert_eq!(code, "invalid_state", "{msg}");
    assert!(msg.contains("start it first"), "{msg}");
    let (status, v) = env.json("POST", "/v1/vms/s/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_count("s", 3);

    let (snap, lo, hi) = snapshot_window(&env, "s", || {
        let (status, v) = env.json("POST", "/v1/vms/s/snapshots", Some(json!({"tag": "one"})));
        assert_eq!(status, 201, "{v}");
        v
    });
    assert_eq!(
        (
            snap["vm"].as_str(),
            snap["tag"].as_str(),
            snap["vm_state"].as_str(),
            snap["memory_bytes"].as_u64(),
            &snap["parent"],
            &snap["clones"],
            &snap["disks"]
        ),
        (
            Some("s"),
            Some("one"),
            Some("running"),
            Some(32 << 20),
            &Value::Null,
            &json!([]),
            &json!([])
        ),
        "{snap}"
    );
    let dir = PathBuf::from(snap["dir"].as_str().unwrap());
    assert_eq!(dir, env.state().join("vms/s/snapshots/one"));
    assert!(dir.join("state.vsnap").is_file(), "{}", dir.display());
    assert!(snap["size_bytes"].as_u64().unwrap() > 0, "{snap}");
    // The VM runs on.
    assert_eq!(state(&env.vm("s")), "running");

    // Refusals: the tag is taken, a bad tag, no such VM, unknown field, a
    // diff with nothing to diff against (this daemon's process has "one",
    // so first restore to get a process without a snapshot).
    let (code, _) = error_of(
        env.json("POST", "/v1/vms/s/snapshots", Some(json!({"tag": "one"}))),
        409,
    );
    assert_eq!(code, "already_exists");
    let (code, msg) = error_of(
        env.json("POST", "/v1/vms/s/snapshots", Some(json!({"tag": "a/b"}))),
        400,
    );
    assert!(
        code == "invalid_value" && msg.starts_with("tag: "),
        "{code} {msg}"
    );
    let (code, msg) = error_of(
        env.json("POST", "/v1/vms/s/snapshots", Some(json!({"name": "x"}))),
        400,
    );
    assert!(msg.contains("unknown field `name`"), "{code} {msg}");
    let (code, _) = error_of(env.json("POST", "/v1/vms/nope/snapshots", None), 404);
    assert_eq!(code, "not_found");
    let (code, msg) = error_of(env.json("GET", "/v1/vms/s/snapshots/nope", None), 404);
    assert!(msg.contains("no snapshot \"nope\""), "{code} {msg}");
    let (code, _) = error_of(
        env.json("POST", "/v1/vms/s/snapshots/nope/restore", None),
        404,
    );
    assert_eq!(code, "not_found");

    // The CLI: a snapshot with the default tag (the UTC time), the list.
    let out = env.cli(&["snapshot", "s"]);
    out.assert_status(0);
    assert!(out.stdout.contains("s: snapshot 20"), "{out}");
    let out = env.cli(&["snapshots", "s"]);
    out.assert_status(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("TAG"), "{out}");
    assert!(lines[1].starts_with("one "), "{out}");
    assert!(lines[2].starts_with("20"), "{out}");
    let (status, list) = env.json("GET", "/v1/vms/s/snapshots", None);
    assert_eq!(status, 200, "{list}");
    let auto = list["snapshots"][1]["tag"].as_str().unwrap().to_string();
    assert_eq!(auto.len(), "YYYYmmdd-HHMMSS".len(), "{auto}");

    // Restore into the running VM: a new process, the console kept, the
    // guest counting on from the saved counter.
    let old_pid = env.vm("s")["pid"].as_i64().unwrap();
    env.wait_count("s", hi + 3);
    let out = env.cli(&["restore", "s", "--tag", "one"]);
    out.assert_status(0);
    assert!(out.stdout.contains("restored s from snapshot one"), "{out}");
    let v = env.vm("s");
    assert_eq!(state(&v), "running", "{v}");
    assert_ne!(v["pid"].as_i64(), Some(old_pid), "{v}");
    let c = env.restored_counts("s", 3);
    assert_counts_on("restore of a running VM", &c, lo, hi);
    assert!(
        env.console("s").starts_with("count=00000001"),
        "the console's scrollback was not kept"
    );
    // This process took no snapshot yet: no diff.
    let (code, msg) = error_of(
        env.json("POST", "/v1/vms/s/snapshots", Some(json!({"diff": true}))),
        409,
    );
    assert!(
        code == "no_parent" && msg.contains("take a full snapshot first"),
        "{code} {msg}"
    );

    // Restore into a stopped VM.
    let (status, v) = env.json("POST", "/v1/vms/s/kill", None);
    assert_eq!((status, state(&v)), (200, "stopped"), "{v}");
    let (status, v) = env.json("POST", "/v1/vms/s/snapshots/one/restore", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    env.wait_for("the restored stopped VM to count", || {
        env.counts("s").len() >= 3
    });
    assert_counts_on("restore of a stopped VM", &env.counts("s"), lo, hi);

    // A clone runs beside its origin, from the same saved state.
    let out = env.cli(&["clone", "s", "c", "--from-snapshot", "one"]);
    out.assert_status(0);
    assert!(out.stdout.contains("cloned c from s@one"), "{out}");
    let v = env.vm("c");
    assert_eq!(state(&v), "running", "{v}");
    env.wait_for("the clone to count", || env.counts("c").len() >= 3);
    assert_counts_on("clone", &env.counts("c"), lo, hi);
    assert_eq!(
        env.counts("c")[0],
        env.counts("s")[0],
        "the clone and the restored origin started from different states"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", v["pid"])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("--restore-lazy") && cmdline.contains(&dir.display().to_string()),
        "{cmdline}"
    );
    assert_eq!(state(&env.vm("s")), "running");
    let (status, v) = env.json("GET", "/v1/vms/s/snapshots/one", None);
    assert_eq!((status, &v["clones"]), (200, &json!(["c"])), "{v}");
    let (code, _) = error_of(
        env.json(
            "POST",
            "/v1/vms/s/clone",
            Some(json!({"name": "c", "from_snapshot": "one"})),
        ),
        409,
    );
    assert_eq!(code, "already_exists");
    let (code, _) = error_of(
        env.json(
            "POST",
            "/v1/vms/s/clone",
            Some(json!({"name": "d", "from_snapshot": "nope"})),
        ),
        404,
    );
    assert_eq!(code, "not_found");

    // What depends on a snapshot keeps it.
    let (code, msg) = error_of(env.json("DELETE", "/v1/vms/s/snapshots/one", None), 409);
    assert!(
        code == "in_use" && msg.contains("clone(s) c"),
        "{code} {msg}"
    );
    let (status, v) = env.json("POST", "/v1/vms/s/kill", None);
    assert_eq!(status, 200, "{v}");
    let (code, msg) = error_of(env.json("DELETE", "/v1/vms/s", None), 409);
    assert!(code == "in_use" && msg.contains("(c)"), "{code} {msg}");
    let (status, v) = env.json("POST", "/v1/vms/c/kill", None);
    assert_eq!(status, 200, "{v}");
    let (status, _) = env.http("DELETE", "/v1/vms/c", None);
    assert_eq!(status, 204);
    assert!(!env.state().join("vms/c").exists());

    let out = env.cli(&["snapshot-delete", "s", "--tag", "one"]);
    out.assert_status(0);
    assert!(!dir.exists(), "{} is still there", dir.display());
    let (code, _) = error_of(env.json("DELETE", "/v1/vms/s/snapshots/one", None), 404);
    assert_eq!(code, "not_found");
    let (status, list) = env.json("GET", "/v1/vms/s/snapshots", None);
    assert_eq!(
        (status, list["snapshots"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{list}"
    );
    // Deleting the VM takes its snapshots with it.
    let (status, _) = env.http("DELETE", "/v1/vms/s", None);
    assert_eq!(status, 204);
    assert!(!env.state().join("vms/s").exists());
}

/// A VM with a disk: the snapshot lists its disk copy, a clone gets its
/// own copy of the (raw) disk in its own directory with the snapshot's
/// content and size, and both run.
#[test]
fn snapshots_of_a_vm_with_a_disk_give_clones_their_own_disks() {
    let env = Env::new("daemon-snap-disk");
    let kernel = env.kernel("vmlinux", counting);
    let disk = env.dir.write("data.raw", &[7u8; 64 * 1024]);
    let (status, v) = env.json(
        "POST",
        "/v1/vms",
        Some(
            json!({"name": "d", "kernel": kernel, "memory_mib": 32, "accel": "emu",
                    "disks": [format!("path={},id=data,format=raw", disk.display())]}),
        ),
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = env.json("POST", "/v1/vms/d/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_count("d", 2);
    let (status, snap) = env.json("POST", "/v1/vms/d/snapshots", Some(json!({"tag": "t"})));
    assert_eq!(status, 201, "{snap}");
    let disks = snap["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{snap}");
    assert_eq!(disks[0]["id"], "data", "{snap}");
    let copy = PathBuf::from(disks[0]["path"].as_str().unwrap());
    let copy = if copy.is_relative() {
        env.state().join("vms/d/snapshots/t").join(copy)
    } else {
        copy
    };
    assert_eq!(std::fs::read(&copy).unwrap(), vec![7u8; 64 * 1024]);

    let (status, v) = env.json(
        "POST",
        "/v1/vms/d/clone",
        Some(json!({"name": "dc", "from_snapshot": "t"})),
    );
    assert_eq!((status, state(&v)), (201, "running"), "{v}");
    let own = env.state().join("vms/dc/disks/data.raw");
    assert_eq!(
        v["disks"],
        json!([format!("path={},id=data,format=raw", own.display())]),
        "{v}"
    );
    assert_eq!(std::fs::read(&own).unwrap(), vec![7u8; 64 * 1024]);
    env.wait_for("the clone to count", || env.counts("dc").len() >= 2);
    let (status, v) = env.json("POST", "/v1/vms/d/snapshots/t/restore", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    for vm in ["d", "dc"] {
        let (status, v) = env.json("POST", &format!("/v1/vms/{vm}/kill"), None);
        assert_eq!(status, 200, "{v}");
    }
    // The clone boots its own definition too: its disk, which the daemon
    // made in the state directory, is allowed for it (and only for it).
    let (status, v) = env.json("POST", "/v1/vms/dc/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let (status, v) = env.json("POST", "/v1/vms/dc/kill", None);
    assert_eq!(status, 200, "{v}");
    let (code, msg) = error_of(
        env.json(
            "PATCH",
            "/v1/vms/d",
            Some(json!({"disks": [format!("path={},id=data", own.display())]})),
        ),
        400,
    );
    assert_eq!(code, "path_not_allowed", "{msg}");
}

// ---- live migration between two daemons ------------------------------------

impl Env {
    /// Start this Env's daemon with a TLS listener on 127.0.0.1 too (a
    /// self-signed certificate for 127.0.0.1 in cert.pem/key.pem); returns
    /// its port.
    /// A daemon on TLS whose storage directories are its own and
    /// `shared` (the source's, as shared storage mounted at the same path).
    fn start_daemon_tls(&mut self, shared: &Path) -> u16 {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])
            .expect("a self-signed certificate");
        let cert = self.dir.write("cert.pem", ck.cert.pem().as_bytes());
        let key = self
            .dir
            .write("key.pem", ck.signing_key.serialize_pem().as_bytes());
        self.start_daemon_with(&[
            "--storage".into(),
            shared.display().to_string(),
            "--listen".into(),
            "tcp:127.0.0.1:0".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
        self.port()
    }
}

/// `vireo vm migrate` moves a running VM from one daemon to another over
/// the target's TLS API and a TLS migration stream: the guest counts on
/// there from where it was, the source forgets it. A target that refuses
/// (the name is taken) leaves the VM running on the source. The VM's files
/// are on storage both daemons have (the source's directory); a target
/// without it refuses the VM by path.
#[test]
fn a_vm_migrates_live_between_two_daemons() {
    let src = Env::new("daemon-mig-src");
    let mut dst = Env::without_daemon("daemon-mig-dst");
    let port = dst.start_daemon_tls(src.dir.path());
    let to = format!("https://127.0.0.1:{port}");
    let out = run_vireo_args(
        &[
            "token".into(),
            "create".into(),
            "--role".into(),
            "admin".into(),
            "--name".into(),
            "mig".into(),
            "--socket".into(),
            dst.socket().display().to_string(),
        ],
        WAIT,
    );
    out.assert_status(0);
    let token = out.stdout.trim().lines().last().unwrap().trim().to_string();
    let token_file = src.dir.write("dst.token", token.as_bytes());
    let ca = dst.dir.path().join("cert.pem");

    let kernel = src.kernel("vmlinux", counting);
    src.create("m", &kernel);
    let (status, v) = src.json("POST", "/v1/vms/m/start", None);
    assert_eq!(status, 200, "{v}");
    src.wait_count("m", 3);

    // Refusals: a bad URL; the target already has a VM of that name.
    let (code, msg) = error_of(
        src.json(
            "POST",
            "/v1/vms/m/migrate",
            Some(json!({"to": "http://x:1"})),
        ),
        400,
    );
    assert!(
        code == "invalid_value" && msg.starts_with("to: "),
        "{code} {msg}"
    );
    // (Each daemon takes host files only from its own storage directory.)
    let dst_kernel = dst
        .dir
        .write("vmlinux", &std::fs::read(&kernel).unwrap())
        .display()
        .to_string();
    dst.create("m", &dst_kernel);
    let out = src.cli(&[
        "migrate",
        "m",
        "--to",
        &to,
        "--target-token-file",
        &token_file.display().to_string(),
        "--target-ca-cert",
        &ca.display().to_string(),
    ]);
    out.assert_status(2);
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("refused"),
        "{out}"
    );
    let (status, _) = dst.http("DELETE", "/v1/vms/m", None);
    assert_eq!(status, 204);
    assert_eq!(state(&src.vm("m")), "running");
    // A wrong token: the target says 401, the VM stays.
    let (code, msg) = error_of(
        src.json(
            "POST",
            "/v1/vms/m/migrate",
            Some(json!({"to": to, "token": "vireo_0000000000000000_nope",
                        "ca_cert": std::fs::read_to_string(&ca).unwrap()})),
        ),
        409,
    );
    assert!(
        code == "migration_refused" && msg.contains("401"),
        "{code} {msg}"
    );
    assert_eq!(state(&src.vm("m")), "running");

    let before = src.wait_count("m", 5);
    let out = src.cli(&[
        "migrate",
        "m",
        "--to",
        &to,
        "--target-token-file",
        &token_file.display().to_string(),
        "--target-ca-cert",
        &ca.display().to_string(),
    ]);
    out.assert_status(0);
    assert!(out.stdout.contains(&format!("migrated m to {to}")), "{out}");
    // Gone here, running there, counting on from where it was.
    let (status, _) = src.json("GET", "/v1/vms/m", None);
    assert_eq!(status, 404, "the source still has the VM");
    assert!(!src.state().join("vms/m").exists());
    let v = dst.vm("m");
    assert_eq!(state(&v), "running", "{v}");
    dst.wait_for("the migrated guest to count", || dst.counts("m").len() >= 3);
    let c = dst.counts("m");
    assert!(
        c[0] >= before,
        "the migrated guest started over: {c:?} (it had counted to {before})"
    );
    for pair in c.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "counts skip: {c:?}");
    }
    let (status, v) = dst.json("POST", "/v1/vms/m/kill", None);
    assert_eq!(status, 200, "{v}");

    // migrate-in hands the source a one-time secret (and keeps no copy on
    // disk once its process has read it); a peer that reaches the
    // receiving process through TLS but without the secret is refused.
    let (status, ready) = dst.json(
        "POST",
        "/v1/vms/x/migrate-in",
        Some(json!({"name": "x", "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
    );
    assert_eq!(status, 201, "{ready}");
    let secret = ready["secret"].as_str().unwrap_or_default();
    assert!(
        secret.len() == 64 && secret.chars().all(|c| c.is_ascii_hexdigit()),
        "{ready}"
    );
    assert!(!dst.state().join("vms/x/migrate-secret").exists());
    let port = ready["port"].as_u64().expect("port") as u16;
    let answer = tls_knock(&ca, port, &[b'0'; 64]);
    assert!(answer.contains("wrong migration secret"), "{answer:?}");
    let (status, v) = dst.json("POST", "/v1/vms/x/kill", None);
    assert_eq!(status, 200, "{v}");

    // Post-copy: the guest runs on the target before the pages it dirtied
    // during the first copy have arrived, and counts on there.
    src.create("p", &kernel);
    let (status, v) = src.json("POST", "/v1/vms/p/start", None);
    assert_eq!(status, 200, "{v}");
    let before = src.wait_count("p", 3);
    let out = src.cli(&[
        "migrate",
        "p",
        "--to",
        &to,
        "--postcopy",
        "--target-token-file",
        &token_file.display().to_string(),
        "--target-ca-cert",
        &ca.display().to_string(),
    ]);
    out.assert_status(0);
    assert!(
        out.stdout.contains(&format!("migrated p to {to}")) && out.stdout.contains("post-copy:"),
        "{out}"
    );
    let (status, _) = src.json("GET", "/v1/vms/p", None);
    assert_eq!(status, 404, "the source still has the VM");
    dst.wait_for("the post-copy guest to count", || {
        dst.counts("p").len() >= 3
    });
    let c = dst.counts("p");
    assert!(c[0] >= before, "the migrated guest started over: {c:?}");
    for pair in c.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "counts skip: {c:?}");
    }
    let (status, v) = dst.json("POST", "/v1/vms/p/kill", None);
    assert_eq!(status, 200, "{v}");
}

/// Reach a migration target on `port` over TLS (its certificate checked
/// against `ca`), send an `Auth` message with `secret` and return what it
/// answers before closing.
fn tls_knock(ca: &Path, port: u16, secret: &[u8]) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(c.expect("a certificate")).expect("a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // kind 9 (Auth) | length | CRC-32 of both and the payload | payload
    let mut head = vec![9u8];
    head.extend_from_slice(&(secret.len() as u32).to_le_bytes());
    let mut crc = !0u32;
    for &b in head.iter().chain(secret) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    head.extend_from_slice(&(!crc).to_le_bytes());
    tls.write_all(&head).expect("send");
    tls.write_all(secret).expect("send");
    tls.flush().expect("flush");
    let mut back = Vec::new();
    let _ = tls.read_to_end(&mut back);
    String::from_utf8_lossy(&back).into_owned()
}

/// A diff snapshot records its parent (the last snapshot of this run),
/// keeps it from being deleted, and restores through the chain.
#[test]
fn diff_snapshots_chain_to_their_parent() {
    let env = Env::new("daemon-snap-diff");
    let kernel = env.kernel("vmlinux", counting);
    env.create("d", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/d/start", None);
    assert_eq!(status, 200, "{v}");
    env.wait_count("d", 3);
    let (status, v) = env.json("POST", "/v1/vms/d/snapshots", Some(json!({"tag": "full"})));
    assert_eq!(status, 201, "{v}");
    env.wait_count("d", 6);
    let (diff, lo, hi) = snapshot_window(&env, "d", || {
        let out = env.cli(&["snapshot", "d", "--tag", "delta", "--diff", "--json"]);
        out.assert_status(0);
        serde_json::from_str(&out.stdout).unwrap()
    });
    assert_eq!(diff["parent"], "full", "{diff}");
    let full_size = env.json("GET", "/v1/vms/d/snapshots/full", None).1["size_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        diff["size_bytes"].as_u64().unwrap() < full_size,
        "the diff ({diff}) is not smaller than the full snapshot ({full_size} bytes)"
    );
    let (code, msg) = error_of(env.json("DELETE", "/v1/vms/d/snapshots/full", None), 409);
    assert!(
        code == "in_use" && msg.contains("diff snapshot(s) delta"),
        "{code} {msg}"
    );
    env.wait_count("d", hi + 3);
    let (status, v) = env.json("POST", "/v1/vms/d/snapshots/delta/restore", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let c = env.restored_counts("d", 3);
    assert_counts_on("restore of a diff snapshot", &c, lo, hi);
    let (status, v) = env.json("POST", "/v1/vms/d/kill", None);
    assert_eq!(status, 200, "{v}");
    for tag in ["delta", "full"] {
        let (status, _) = env.http("DELETE", &format!("/v1/vms/d/snapshots/{tag}"), None);
        assert_eq!(status, 204, "{tag}");
    }
}

/// A clone's disk made from a snapshot's
/// qcow2 copy is a qcow2 overlay backed by that copy (so the snapshot
/// stays untouched and the clone shares its blocks), of the same size.
#[test]
fn a_clone_disk_from_a_qcow2_copy_is_an_overlay_of_it() {
    let dir = TempDir::new("clone-overlay");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(snap.join("disks")).unwrap();
    std::fs::create_dir_all(dir.path().join("clone")).unwrap();
    let base = snap.join("disks/root.qcow2");
    let out = run_vireo_args(
        &[
            "image".into(),
            "create".into(),
            base.display().to_string(),
            "--size".into(),
            "8M".into(),
        ],
        WAIT,
    );
    out.assert_status(0);
    let copy = vireo_api::model::SnapshotDisk {
        id: "root".into(),
        path: "disks/root.qcow2".into(),
        format: "qcow2".into(),
        bytes: std::fs::metadata(&base).unwrap().len(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (overlay, format) = rt
        .block_on(vireo_daemon::vms::clone_disk(
            Path::new(support::vireo_bin()),
            &copy,
            &snap,
            &dir.path().join("clone"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (overlay.clone(), format),
        (dir.path().join("clone/root.qcow2"), "qcow2")
    );
    let out = run_vireo_args(
        &[
            "image".into(),
            "info".into(),
            overlay.display().to_string(),
            "--json".into(),
            // The clone's overlay is backed by the snapshot's copy, in
            // another directory.
            "--backing-dir".into(),
            snap.display().to_string(),
        ],
        WAIT,
    );
    out.assert_status(0);
    let info: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (
            info["format"].as_str(),
            info["backing_file"].as_str(),
            info["virtual_size"].as_u64()
        ),
        (Some("qcow2"), Some(base.to_str().unwrap()), Some(8 << 20)),
        "{info}"
    );
}

// ---- host paths and disk formats ---------------------------------------------

/// Host files named through the API must lie beneath a storage directory
/// (the test's directory here): other paths, symlinks, device nodes and the
/// daemon's own files are refused with `path_not_allowed`, naming the fix;
/// a symlink swapped in after the VM was defined is refused at its start.
#[test]
fn host_paths_must_be_beneath_a_storage_directory() {
    let env = Env::new("daemon-paths");
    let kernel = env.kernel("vmlinux", hello_halt);
    let storage = env.dir.path().display().to_string();
    let create = |body: Value| env.json("POST", "/v1/vms", Some(body));
    let refused = |body: Value, needle: &str| {
        let (code, msg) = error_of(create(body.clone()), 400);
        assert_eq!(code, "path_not_allowed", "{body}: {msg}");
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
        assert!(
            msg.contains(&storage) && msg.contains("--storage DIR"),
            "{msg:?} should name the storage directory and the fix"
        );
    };
    let vm = |extra: Value| {
        let mut body = json!({"name": "p", "kernel": kernel, "memory_mib": 32, "accel": "emu"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // What the review was shown: /etc/shadow and a block device as disks.
    refused(
        vm(json!({"disks": ["/etc/shadow"]})),
        "disks[0]: /etc/shadow",
    );
    refused(vm(json!({"disks": ["/dev/loop0"]})), "disks[0]: /dev/loop0");
    refused(vm(json!({"initrd": "/etc/passwd"})), "initrd: /etc/passwd");
    refused(
        json!({"name": "p", "kernel": "/etc/passwd", "memory_mib": 32}),
        "kernel: /etc/passwd",
    );
    // Ways out of the storage directory from inside it.
    std::os::unix::fs::symlink("/etc/passwd", env.dir.path().join("link.raw")).unwrap();
    refused(vm(json!({"disks": ["link.raw"]})), "symlink");
    refused(
        vm(json!({"disks": [format!("{storage}/../../etc/passwd")]})),
        "..",
    );
    // The daemon's own files, though beneath the storage directory here.
    refused(vm(json!({"disks": ["state/state.db"]})), "state files");
    let (_, v) = env.json("GET", "/v1/vms", None);
    assert_eq!(v["vms"], json!([]), "a refused definition was stored");

    // Relative paths are taken in the storage directory and stored whole.
    let second = env.kernel("k2", hello_halt);
    let (status, v) =
        create(json!({"name": "p", "kernel": "k2", "memory_mib": 32, "accel": "emu"}));
    assert_eq!(
        (status, v["kernel"].as_str()),
        (201, Some(second.as_str())),
        "{v}"
    );
    // k2 swapped for a symlink (to a file in storage, even) after the
    // definition: the start refuses it and starts nothing.
    std::fs::remove_file(&second).unwrap();
    std::os::unix::fs::symlink(&kernel, &second).unwrap();
    let (code, msg) = error_of(env.json("POST", "/v1/vms/p/start", None), 400);
    assert_eq!(code, "path_not_allowed", "{msg}");
    assert!(msg.contains("symlink"), "{msg}");
    assert_eq!(state(&env.vm("p")), "stopped");
}

/// A disk's format is fixed when it is defined (probed then, once, when
/// not given) and `vireo run` always gets it: a guest that writes a qcow2
/// header onto its raw disk does not make the next run read it as qcow2.
/// A record from before formats were recorded gets one at daemon start.
#[test]
fn disk_formats_are_fixed_when_defined() {
    let mut env = Env::new("daemon-formats");
    let kernel = env.kernel("vmlinux", hello_halt);
    let disk = env.dir.write("root.raw", &[0u8; 64 * 1024]);
    let (status, v) = env.json(
        "POST",
        "/v1/vms",
        Some(
            json!({"name": "f", "kernel": kernel, "memory_mib": 32, "accel": "emu",
                    "disks": [format!("{},id=root", disk.display())]}),
        ),
    );
    assert_eq!(status, 201, "{v}");
    let pinned = format!("path={},id=root,format=raw", disk.display());
    assert_eq!(v["disks"], json!([pinned]), "{v}");

    // What a guest could write onto its raw disk: a qcow2 header (naming a
    // host file as its backing file).
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all(&header).unwrap();
    drop(f);

    let (status, v) = env.json("POST", "/v1/vms/f/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let pid = v["pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let flag = format!("--disk={pinned}");
    assert!(args.contains(&flag), "{flag} not in {args:?}");
    assert_eq!(env.vm("f")["disks"], json!([pinned]));
    let (status, v) = env.json("POST", "/v1/vms/f/kill", None);
    assert_eq!(status, 200, "{v}");

    // An old record without a format: probed once when the daemon starts
    // (the file holds the qcow2 header now, so that is what it records),
    // and logged.
    env.kill_daemon();
    let bare = format!("[\"{},id=root\"]", disk.display());
    let out = Command::new("sqlite3")
        .arg(env.state().join("state.db"))
        .arg(format!(
            "UPDATE vm_definitions SET disks = '{bare}' WHERE name = 'f';"
        ))
        .output()
        .expect("this test needs the sqlite3 command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.start_daemon();
    assert_eq!(
        env.vm("f")["disks"],
        json!([format!("path={},id=root,format=qcow2", disk.display())])
    );
    assert!(
        env.daemon_log().contains("recorded disk formats once"),
        "{}",
        env.daemon_log()
    );
}

/// The control socket of a VM the daemon runs is mode 0600, and its
/// `snapshot DIR` writes only beneath the VM's snapshots directory.
#[test]
fn a_vm_control_socket_is_private_and_snapshots_stay_in_the_vm_directory() {
    let env = Env::new("daemon-ctl");
    let kernel = env.kernel("vmlinux", hello_halt);
    env.create("c", &kernel);
    let (status, v) = env.json("POST", "/v1/vms/c/start", None);
    assert_eq!((status, state(&v)), (200, "running"), "{v}");
    let socket = env.state().join("vms/c/control.sock");
    env.wait_for("the control socket", || socket.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let ask = |line: &str| {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let elsewhere = env.dir.path().join("elsewhere");
    let reply = ask(&format!("snapshot {}", elsewhere.display()));
    assert!(
        reply.contains("\"ok\":false") && reply.contains("--snapshot-dir-root"),
        "{reply}"
    );
    assert!(!elsewhere.exists());
    let reply = ask("snapshot /etc/vireo-snap");
    assert!(reply.contains("\"ok\":false"), "{reply}");
    // The daemon's own snapshots still work.
    let (status, snap) = env.json("POST", "/v1/vms/c/snapshots", Some(json!({"tag": "t"})));
    assert_eq!(status, 201, "{snap}");
    let (status, v) = env.json("POST", "/v1/vms/c/kill", None);
    assert_eq!(status, 200, "{v}");
}
