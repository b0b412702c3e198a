//! Live migration between two `vireo run` processes on loopback: a tiny
//! guest counts, writes each count into one of 64 pages and prints the
//! count with the sum of those pages; after `migrate-to` the target must
//! continue the sequence with sums that match (a page lost by the dirty
//! tracking shows up as a wrong sum). Failures: a target that dies
//! mid-stream leaves the source running, and a corrupt stream or one of
//! another version is refused by the target before any guest runs.
//!
//! Like the other guest tests they run on KVM, or on the emulator with
//! `VIREO_TEST_ACCEL=emu`.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{test_accel, vireo_bin, LiveVm, TempDir, RUN_TIMEOUT};

use support::checksum::*;

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A counting source VM with a control socket, past count 3.
fn source(dir: &TempDir) -> (LiveVm, PathBuf) {
    let kernel = kernel(dir);
    let socket = dir.path().join("ctl.sock");
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &["--control-socket", socket.to_str().expect("utf-8 path")],
    );
    assert!(
        vm.read_until("count=00000003 "),
        "the guest never counted to 3:\n{}",
        vm.output()
    );
    wait_for_socket(&socket);
    (vm, socket)
}

/// `migrate-to`, retried while the target is not listening yet.
fn migrate(socket: &Path, args: &str) -> serde_json::Value {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let reply = control(socket, &format!("migrate-to {args}"));
        let refused = reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect"));
        if !refused || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for `n` lines after the first `skip` of the VM's output.
fn wait_lines(vm: &mut LiveVm, n: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let l = lines(&vm.output());
        if l.len() >= n || Instant::now() > deadline {
            return l;
        }
        if vm.read_chunk(Duration::from_secs(1)).is_none() {
            return lines(&vm.output());
        }
    }
}

fn target(port: u16, extra: &[&str]) -> LiveVm {
    let mut args = vec![
        "run".to_string(),
        "--migrate-from".into(),
        format!("tcp:127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    LiveVm::start(&[], &args, RUN_TIMEOUT)
}

fn migrate_and_continue(tls: bool) {
    let dir = TempDir::new(if tls { "migtls" } else { "mig" });
    let (mut src, socket) = source(&dir);
    let port = free_port();
    let mut extra = Vec::new();
    let mut ca = String::new();
    if tls {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("a self-signed certificate");
        let cert = dir.write("cert.pem", ck.cert.pem().as_bytes());
        let key = dir.write("key.pem", ck.signing_key.serialize_pem().as_bytes());
        extra = vec![
            "--migrate-tls-cert".to_string(),
            cert.display().to_string(),
            "--migrate-tls-key".into(),
            key.display().to_string(),
        ];
        ca = format!(" --ca {}", cert.display());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut dst = target(port, &extra);
    let host = if tls { "localhost" } else { "127.0.0.1" };
    // Over TCP with no downtime allowed: pre-copy goes on until a round
    // finds nothing dirty (or the rounds run out), exercising the dirty
    // log round after round.
    let downtime = if tls { "" } else { " --downtime-ms 0" };
    let reply = migrate(&socket, &format!("tcp:{host}:{port}{ca}{downtime}"));
    assert_eq!(reply["ok"], true, "migration failed: {reply}");
    assert_eq!(reply["state"], "migrated", "{reply}");
    let m = &reply["migration"];
    for field in [
        "total_ms",
        "downtime_ms",
        "bytes_sent",
        "rounds",
        "pages_sent",
    ] {
        assert!(m[field].is_u64(), "{field} missing: {reply}");
    }
    assert!(m["rounds"].as_u64() >= Some(1), "{reply}");
    // The guest's code, data and counting pages at least.
    assert!(m["pages_sent"].as_u64() >= Some(3), "{reply}");
    assert!(
        m["bytes_sent"].as_u64() >= m["pages_sent"].as_u64().map(|p| p * 4096),
        "{reply}"
    );

    // The source exits 0 once the target has the VM.
    let status = src.wait("the source to exit after migrating");
    assert_eq!(status.code(), Some(0), "source: {}", src.output());
    let before = lines(&src.output());
    assert!(!before.is_empty());
    check_sums("source", &before);
    let last = before.last().expect("source lines").0;

    let after = wait_lines(&mut dst, 5);
    assert!(
        after.len() >= 5,
        "the target printed {after:?}:\n{}",
        dst.output()
    );
    check_sums("target", &after);
    assert!(
        (last + 1..=last + 2).contains(&after[0].0),
        "the target went on from {} but the source stopped at {last}",
        after[0].0
    );
    for pair in after.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "counts skip: {after:?}");
    }
}

#[test]
fn a_migrated_guest_continues_on_the_target() {
    require_kvm!();
    migrate_and_continue(false);
}

#[test]
fn migration_over_tls() {
    require_kvm!();
    migrate_and_continue(true);
}

/// A target that dies mid-stream (here: the test reads part of the stream
/// and drops the connection), or is not there at all, leaves the source
/// running: it answers an error and keeps counting.
#[test]
fn the_source_keeps_running_when_the_target_fails() {
    require_kvm!();
    let dir = TempDir::new("migfail");
    let (mut src, socket) = source(&dir);

    let fake = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = fake.local_addr().expect("addr").port();
    let dies = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().expect("accept");
        let mut buf = vec![0u8; 16 << 10];
        s.read_exact(&mut buf).expect("part of the stream");
        // Dropping both ends the connection mid-stream.
    });
    let reply = control(&socket, &format!("migrate-to tcp:127.0.0.1:{port}"));
    dies.join().expect("fake target");
    assert_eq!(reply["ok"], false, "{reply}");
    let n = lines(&src.output()).len();
    assert!(
        src.read_until(&format!("count={:08x} ", n as u64 + 3)),
        "the source stopped after a failed migration: {reply}\n{}",
        src.output()
    );

    // Nobody listening.
    let reply = control(
        &socket,
        &format!("migrate-to tcp:127.0.0.1:{}", free_port()),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot connect"),
        "{reply}"
    );
    // Still answering and running.
    let status = control(&socket, "status");
    assert_eq!(status["state"], "running", "{status}");
    check_sums("source", &lines(&src.output()));
}

/// Send `bytes` to a fresh target as its source and return its exit
/// status and stderr, plus what it sent back.
fn feed_target(bytes: &[u8]) -> (Option<i32>, String, Vec<u8>) {
    let port = free_port();
    let mut child = Command::new(vireo_bin())
        .args([
            "run",
            "--migrate-from",
            &format!("tcp:127.0.0.1:{port}"),
            "--accel",
            &test_accel().unwrap_or_else(|| "kvm".into()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vireo");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the target never listened: {e}"),
        }
    };
    conn.write_all(bytes).expect("send");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    conn.set_read_timeout(Some(RUN_TIMEOUT)).expect("timeout");
    let mut back = Vec::new();
    let _ = conn.read_to_end(&mut back);
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("wait");
    assert!(stdout.is_empty(), "the guest ran: {stdout}");
    (status.code(), stderr, back)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A stream header as the format documents it, of format `version`.
fn header(version: u32) -> Vec<u8> {
    let mut h = b"VIREOMIG".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&[0u8; 32]);
    let crc = crc32(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

fn message(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32(&[&m[..], payload].concat());
    m.extend_from_slice(&crc.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

#[test]
fn corrupt_or_foreign_streams_are_refused_before_anything_runs() {
    require_kvm!();
    let accel = test_accel().unwrap_or_else(|| "kvm".into());
    let config = serde_json::json!({
        "backend": accel, "vcpus": 1, "memory_mib": 32, "frontend": {"devices": []}
    })
    .to_string();

    // Another format version.
    let (code, err, back) = feed_target(&header(99));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("version 99"), "{err}");
    assert!(
        String::from_utf8_lossy(&back).contains("version 99"),
        "the source is not told why: {back:?}"
    );

    // Not a migration stream at all.
    let (code, err, _) = feed_target(&[b'x'; 100]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a vireo migration stream"), "{err}");

    // A flipped bit in a message.
    let mut bad = message(1, config.as_bytes());
    let last = bad.len() - 3;
    bad[last] ^= 0x04;
    let (code, err, _) = feed_target(&[header(1), bad].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("corrupt"), "{err}");

    // Pages outside guest memory.
    let mut pages = 0u32.to_le_bytes().to_vec();
    pages.extend_from_slice(&1u32.to_le_bytes());
    pages.extend_from_slice(&(1u64 << 30).to_le_bytes());
    pages.extend_from_slice(&[0u8; 4096]);
    let stream = [header(1), message(1, config.as_bytes()), message(2, &pages)].concat();
    let (code, err, _) = feed_target(&stream);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("outside memory region"), "{err}");

    // The source goes away before the state arrived.
    let stream = [header(1), message(1, config.as_bytes())].concat();
    let (code, err, _) = feed_target(&stream);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("closed"), "{err}");
}
