//! The daemon's observability end to end: a real `vireo serve`, its event
//! stream (`GET /v1/events`, server-sent events read over the Unix socket),
//! `GET /v1/stats` and `GET /metrics` while tiny guests run on the emulator
//! (`--accel emu`, no /dev/kvm needed), and the `stats` command of the VMs'
//! control sockets behind them.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::{json, Value};

use support::daemon::DaemonEnv as Env;
use support::guest::{self, Guest64};

const WAIT: Duration = Duration::from_secs(20);

impl Env {
    fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, v) = self.json(method, path, body);
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }

    /// Subscribe to `GET /v1/events?QUERY`; events arrive on the channel
    /// as (event, data) once the response head has been read.
    fn events(&self, query: &str) -> mpsc::Receiver<(String, Value)> {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        write!(
            s,
            "GET /v1/events{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "no response head");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut body = Vec::new();
            // The chunked body: size line, data, CRLF.
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                    return;
                };
                if n == 0 {
                    return;
                }
                let mut chunk = vec![0u8; n + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                body.extend_from_slice(&chunk[..n]);
                // Complete events end with a blank line.
                while let Some(end) = find(&body, b"\n\n") {
                    let text = String::from_utf8_lossy(&body[..end]).into_owned();
                    body.drain(..end + 2);
                    let mut event = String::new();
                    let mut data = String::new();
                    for line in text.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        }
                    }
                    if event.is_empty() {
                        continue; // a comment (keepalive)
                    }
                    let data = serde_json::from_str(&data).expect("event data is JSON");
                    if tx.send((event, data)).is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The next event on `rx` that satisfies `want`, skipping others.
fn next_event(
    rx: &mpsc::Receiver<(String, Value)>,
    what: &str,
    mut want: impl FnMut(&str, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((event, data)) if want(&event, &data) => return data,
            Ok(_) => {}
            Err(e) => panic!("no {what} event: {e}"),
        }
    }
}

/// The `vm` events of VM `name`, in order, until one has event `last`.
fn vm_events_until(rx: &mpsc::Receiver<(String, Value)>, name: &str, last: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(rx, &format!("vm {name} {last}"), |kind, d| {
            kind == "vm" && d["name"] == name
        });
        let done = e["event"] == last;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// Prints now and then forever, burning CPU in between.
fn ticking(g: &mut Guest64) -> guest::AsmResult {
    let mut again = g.a.create_label();
    let mut delay = g.a.create_label();
    g.a.set_label(&mut again)?;
    g.a.mov(ecx, 200_000u32)?;
    g.a.set_label(&mut delay)?;
    g.a.dec(ecx)?;
    g.a.jnz(delay)?;
    g.print("tick\n")?;
    g.a.jmp(again)
}

const PANIC_LINE: &str = "Kernel panic - not syncing: VFS: Unable to mount root fs";

fn panicking(g: &mut Guest64) -> guest::AsmResult {
    g.print("[    0.5] booting\n")?;
    g.print(&format!("[    1.0] {PANIC_LINE}\n"))?;
    g.halt_forever()
}

/// Every line is a comment or `name{labels} value`.
fn check_exposition(text: &str) {
    assert!(!text.is_empty());
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
    }
}

/// The value of the series `series` (name with labels) in `text`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn vm_stats(env: &Env, name: &str) -> Value {
    let v = env.ok("GET", "/v1/stats", None, 200);
    assert!(v["time"].as_f64().unwrap() > 1.0e9, "{v}");
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

#[test]
fn events_stats_and_metrics_follow_a_vm() {
    let env = Env::new("observe");
    let kernel = env.kernel("vmlinux", ticking);
    let disk = env.dir.write("data.raw", &vec![0u8; 1 << 20]);
    let events = env.events("");

    env.ok(
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "obs", "kernel": kernel, "memory_mib": 32, "accel": "emu",
            "disks": [format!("path={},id=data,format=raw", disk.display())],
        })),
        201,
    );
    // A stopped VM: in the stats with zeros, no uptime.
    let s = vm_stats(&env, "obs");
    assert_eq!(s["state"], "stopped");
    assert!(s["uptime_secs"].is_null());
    assert_eq!(s["exits"], 0);
    assert_eq!(s["memory_bytes"], 32u64 << 20);

    let vm = env.ok("POST", "/v1/vms/obs/start", None, 200);
    assert!(vm["started_at"].is_string(), "{vm}");
    assert!(vm["uptime_secs"].is_u64(), "{vm}");
    env.wait_for("CPU time and exits in /v1/stats", || {
        let s = vm_stats(&env, "obs");
        s["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.0 && s["exits"].as_u64().unwrap_or(0) > 0
    });
    let s = vm_stats(&env, "obs");
    assert_eq!(s["state"], "running");
    assert!(s["memory_rss_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["uptime_secs"].is_u64(), "{s}");
    // The disk is reported by its id, from the VM's control socket.
    assert_eq!(s["disks"][0]["id"], "data", "{s}");
    assert!(s["disk_read_bytes"].is_u64(), "{s}");
    assert_eq!(s["nets"], json!([]));

    let metrics = env.send("GET", "/metrics", None);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(metrics.status, 200, "{text}");
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{text}"
    );
    check_exposition(&text);
    assert_eq!(
        metric(&text, "vireo_vm_up{vm=\"obs\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vireo_vms{state=\"running\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "vireo_vm_cpu_seconds_total{vm=\"obs\"}").unwrap() > 0.0);
    assert!(metric(&text, "vireo_vm_exits_total{vm=\"obs\"}").unwrap() > 0.0);
    assert_eq!(
        metric(&text, "vireo_vm_memory_bytes{vm=\"obs\"}"),
        Some((32u64 << 20) as f64)
    );
    assert!(metric(
        &text,
        "vireo_vm_disk_read_bytes_total{vm=\"obs\",disk=\"data\"}"
    )
    .is_some());
    assert!(
        metric(
            &text,
            "vireo_api_requests_total{method=\"GET\",code=\"200\"}"
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );

    env.ok("POST", "/v1/vms/obs/pause", None, 200);
    env.ok("POST", "/v1/vms/obs/resume", None, 200);
    env.ok("POST", "/v1/vms/obs/kill", None, 200);
    let s = vm_stats(&env, "obs");
    assert_eq!(s["state"], "stopped");
    assert!(s["uptime_secs"].is_null());
    env.ok("DELETE", "/v1/vms/obs", None, 204);

    let seen = vm_events_until(&events, "obs", "deleted");
    let changes: Vec<&str> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        changes,
        ["created", "started", "paused", "resumed", "stopped", "deleted"],
        "{seen:?}"
    );
    let states: Vec<&str> = seen.iter().map(|e| e["state"].as_str().unwrap()).collect();
    assert_eq!(
        states,
        ["stopped", "running", "paused", "running", "stopped", "deleted"]
    );
    assert!(seen[4]["reason"].as_str().unwrap().contains("SIGKILL"));
    assert!(seen
        .iter()
        .all(|e| e["time"].as_str().unwrap().ends_with('Z')));
}

#[test]
fn a_kernel_panic_on_the_console_is_an_event() {
    let env = Env::new("observe-panic");
    let ticks = env.kernel("ticking", ticking);
    let kernel = env.kernel("vmlinux", panicking);
    // Only VM "p", console included.
    let events = env.events("?vm=p&console=1");
    let (status, v) = env.json("GET", "/v1/events?console=maybe", None);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_value");

    for (name, k) in [("other", &ticks), ("p", &kernel)] {
        env.ok(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "kernel": k, "memory_mib": 32, "accel": "emu"})),
            201,
        );
        env.ok("POST", &format!("/v1/vms/{name}/start"), None, 200);
    }
    let mut console = String::new();
    let mut names = Vec::new();
    let panic = next_event(&events, "panic", |kind, d| {
        names.push(d["name"].as_str().unwrap_or("?").to_string());
        if kind == "console" {
            console.push_str(d["data"].as_str().unwrap());
        }
        kind == "panic"
    });
    assert_eq!(panic["name"], "p");
    assert_eq!(panic["line"], format!("[    1.0] {PANIC_LINE}"));
    assert!(console.contains("booting"), "{console:?}");
    assert!(names.iter().all(|n| n == "p"), "{names:?}");
    env.ok("POST", "/v1/vms/p/kill", None, 200);
    env.ok("POST", "/v1/vms/other/kill", None, 200);
    // The filter held: the next event is p's stop, not other's.
    let e = next_event(&events, "vm", |kind, _| kind == "vm");
    assert_eq!((&e["name"], &e["event"]), (&json!("p"), &json!("stopped")));
}

#[test]
fn the_daemon_stops_with_streams_open_and_a_restarted_one_keeps_uptime_and_stats() {
    let mut env = Env::new("observe-restart");
    let kernel = env.kernel("vmlinux", ticking);
    env.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "keep", "kernel": kernel, "memory_mib": 32, "accel": "emu"})),
        201,
    );
    let started_at = env.ok("POST", "/v1/vms/keep/start", None, 200)["started_at"].clone();
    assert!(started_at.is_string());
    let events = env.events("?console=1");
    next_event(&events, "console", |kind, _| kind == "console");

    // SIGTERM: the open event stream ends and the daemon exits.
    env.stop_daemon(libc::SIGTERM);
    loop {
        match events.recv_timeout(WAIT) {
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("the event stream did not end: {e}"),
        }
    }

    // The next daemon re-adopts the VM: same start time, stats still flow.
    env.start_daemon();
    let vm = env.ok("GET", "/v1/vms/keep", None, 200);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["started_at"], started_at);
    assert!(vm["uptime_secs"].is_u64(), "{vm}");
    let s = vm_stats(&env, "keep");
    assert!(s["exits"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cpu_seconds"].as_f64().unwrap() > 0.0, "{s}");
    // The re-attached console feeds the event stream.
    let events = env.events("?vm=keep&console=1");
    let mut console = String::new();
    next_event(&events, "console with a tick", |kind, d| {
        if kind == "console" {
            console.push_str(d["data"].as_str().unwrap());
        }
        console.contains("tick")
    });
}
