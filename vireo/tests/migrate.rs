//! Live migration between two `vireo run` processes on loopback: a tiny
//! guest counts, writes each count into one of 64 pages and prints the
//! count with the sum of those pages; after `migrate-to` the target must
//! continue the sequence with sums that match (a page lost by the dirty
//! tracking shows up as a wrong sum). Failures: a target that dies
//! mid-stream leaves the source running, and a corrupt stream or one of
//! another version is refused by the target before any guest runs.
//! Security: a source must authenticate (a one-time secret; over TCP also
//! TLS, optionally with client certificates), the target runs only the
//! machine of its own flags, and a forged configuration allocates nothing.
//!
//! Like the other guest tests they run on KVM, or on the emulator with
//! `VIREO_TEST_ACCEL=emu`.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
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

/// The target's own definition of the source's machine (the counting
/// guest runs with the defaults: 1 vCPU, 256 MiB, no devices).
const OWN: [&str; 4] = ["--cpus", "1", "--memory", "256"];

/// A target listening on `addr` with its own definition and `extra`.
fn target(addr: &str, extra: &[&str]) -> LiveVm {
    let mut args = vec!["run".to_string(), "--migrate-from".into(), addr.into()];
    args.extend(OWN.iter().chain(extra).map(|s| s.to_string()));
    LiveVm::start(&[], &args, RUN_TIMEOUT)
}

/// A random-enough one-time secret in a file.
fn secret(dir: &TempDir, name: &str) -> PathBuf {
    let s: String = (0..32)
        .map(|i| {
            format!(
                "{:02x}",
                (std::process::id() as usize * 31 + i * 97 + name.len()) % 251
            )
        })
        .collect();
    dir.write(name, s.as_bytes())
}

/// A CA, a server certificate for localhost and a client certificate
/// (both issued by the CA), as PEM files: (ca, server cert, server key,
/// client cert, client key).
fn certificates(dir: &TempDir) -> [PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(vec!["source".into()], ExtendedKeyUsagePurpose::ClientAuth);
    [
        dir.write("ca.pem", ca.pem().as_bytes()),
        dir.write("server.pem", server.as_bytes()),
        dir.write("server.key", server_key.as_bytes()),
        dir.write("client.pem", client.as_bytes()),
        dir.write("client.key", client_key.as_bytes()),
    ]
}

fn migrate_and_continue(tls: bool, postcopy: bool) {
    let dir = TempDir::new(match (tls, postcopy) {
        (true, true) => "migtlspc",
        (true, false) => "migtls",
        (false, true) => "migpc",
        (false, false) => "mig",
    });
    let (mut src, socket) = source(&dir);
    let secret = secret(&dir, "secret");
    let secret_arg = secret.display().to_string();
    let (mut dst, addr, auth) = if tls {
        // TLS with both ways to know the source: a client certificate
        // issued by the target's CA and the one-time secret.
        let [ca, cert, key, client, client_key] = certificates(&dir);
        let port = free_port();
        let files: Vec<String> = [&cert, &key, &ca]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let dst = target(
            &format!("tcp:127.0.0.1:{port}"),
            &[
                "--migrate-tls-cert",
                &files[0],
                "--migrate-tls-key",
                &files[1],
                "--migrate-client-ca",
                &files[2],
                "--migrate-secret-file",
                &secret_arg,
            ],
        );
        // A peer speaking plain TCP gets a TLS alert (record type 21) or
        // nothing, never the stream; the target keeps waiting.
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut plain = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("the target never listened: {e}"),
            }
        };
        plain
            .write_all(&[auth(b"0123456789abcdef0123"), header(FORMAT)].concat())
            .expect("send");
        plain.set_read_timeout(Some(RUN_TIMEOUT)).expect("timeout");
        let mut back = Vec::new();
        let _ = plain.read_to_end(&mut back);
        assert!(
            back.is_empty() || back[0] == 21,
            "a plain TCP peer got an answer that is not a TLS alert: {back:?}"
        );
        // A source without a client certificate does not get past TLS
        // (and keeps running); the target keeps waiting.
        let addr = format!("tcp:localhost:{port}");
        let reply = migrate(
            &socket,
            &format!("{addr} --ca {} --secret-file {secret_arg}", ca.display()),
        );
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(control(&socket, "status")["state"], "running");
        let auth = format!(
            " --ca {} --secret-file {secret_arg} --cert {} --key {}",
            ca.display(),
            client.display(),
            client_key.display()
        );
        (dst, addr, auth)
    } else {
        let path = dir.path().join("mig.sock");
        let addr = format!("unix:{}", path.display());
        let dst = target(&addr, &["--migrate-secret-file", &secret_arg]);
        (dst, addr, format!(" --secret-file {secret_arg}"))
    };
    // Pre-copy with no downtime allowed: it goes on until a round finds
    // nothing dirty (or the rounds run out), exercising the dirty log
    // round after round. Post-copy with the background push held to 8
    // pages a second, so the pages the guest touches come on demand.
    let mode = match (postcopy, tls) {
        (true, _) => " --postcopy --postcopy-bandwidth 32K",
        (false, false) => " --downtime-ms 0",
        (false, true) => "",
    };
    let reply = migrate(&socket, &format!("{addr}{auth}{mode}"));
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
    if postcopy {
        // The pages the guest dirtied during the first copy came after
        // the switch; those it touched at once, on demand.
        eprintln!("post-copy migration: {m}");
        let pc = &m["postcopy"];
        assert!(
            pc["pages_requested"].as_u64() >= Some(3),
            "the guest asked for fewer pages than it touches at once: {reply}"
        );
        assert!(pc["postcopy_ms"].is_u64(), "{reply}");
    } else {
        assert!(m.get("postcopy").is_none(), "{reply}");
    }
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
    migrate_and_continue(false, false);
}

#[test]
fn migration_over_tls() {
    require_kvm!();
    migrate_and_continue(true, false);
}

/// Post-copy: the guest runs on the target before the pages it dirtied
/// during the first copy have arrived; the ones it touches are fetched on
/// demand (userfaultfd), the rest pushed, and its sums stay right.
#[test]
fn postcopy_migration_fetches_what_the_guest_touches() {
    require_kvm!();
    migrate_and_continue(false, true);
}

#[test]
fn postcopy_migration_over_tls() {
    require_kvm!();
    migrate_and_continue(true, true);
}

/// A target that dies mid-stream (here: the test reads part of the stream
/// and drops the connection), or is not there at all, leaves the source
/// running: it answers an error and keeps counting.
#[test]
fn the_source_keeps_running_when_the_target_fails() {
    require_kvm!();
    let dir = TempDir::new("migfail");
    let (mut src, socket) = source(&dir);

    let path = dir.path().join("fake.sock");
    let fake = UnixListener::bind(&path).expect("bind");
    let dies = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().expect("accept");
        let mut buf = vec![0u8; 16 << 10];
        s.read_exact(&mut buf).expect("part of the stream");
        // Dropping both ends the connection mid-stream.
    });
    let reply = control(&socket, &format!("migrate-to unix:{}", path.display()));
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
        &format!(
            "migrate-to unix:{}",
            dir.path().join("nobody.sock").display()
        ),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot connect"),
        "{reply}"
    );
    // Plain TCP: the source will not send a VM unencrypted.
    let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = plain.local_addr().expect("addr").port();
    let reply = control(&socket, &format!("migrate-to tcp:127.0.0.1:{port}"));
    assert_eq!(reply["ok"], false, "{reply}");
    let e = reply["error"].as_str().unwrap_or_default();
    assert!(e.contains("always TLS") && e.contains("--ca"), "{reply}");
    plain.set_nonblocking(true).expect("nonblocking");
    assert!(
        plain.accept().is_err(),
        "the source connected to a plain TCP target"
    );
    // Still answering and running.
    let status = control(&socket, "status");
    assert_eq!(status["state"], "running", "{status}");
    check_sums("source", &lines(&src.output()));
}

/// Send `bytes` to a fresh target as its source and return its exit
/// status and stderr, plus what it sent back.
fn feed_target(bytes: &[u8]) -> (Option<i32>, String, Vec<u8>) {
    let dir = TempDir::new("migfeed");
    let path = dir.path().join("t.sock");
    let mut child = Command::new(vireo_bin())
        .args([
            "run",
            "--migrate-from",
            &format!("unix:{}", path.display()),
            "--cpus",
            "1",
            "--memory",
            "32",
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
        match UnixStream::connect(&path) {
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

/// The stream's format version.
const FORMAT: u32 = 3;

/// An `Auth` message (kind 9) with `secret`: what comes first.
fn auth(secret: &[u8]) -> Vec<u8> {
    message(9, secret)
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
    let (code, err, back) = feed_target(&[auth(b""), header(99)].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("version 99"), "{err}");
    assert!(
        String::from_utf8_lossy(&back).contains("version 99"),
        "the source is not told why: {back:?}"
    );

    // Not a migration stream at all.
    let (code, err, _) = feed_target(&[auth(b""), vec![b'x'; 100]].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a vireo migration stream"), "{err}");

    // A flipped bit in a message.
    let mut bad = message(1, config.as_bytes());
    let last = bad.len() - 3;
    bad[last] ^= 0x04;
    let (code, err, _) = feed_target(&[auth(b""), header(FORMAT), bad].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("corrupt"), "{err}");

    // Pages outside guest memory.
    let mut pages = 0u32.to_le_bytes().to_vec();
    pages.extend_from_slice(&1u32.to_le_bytes());
    pages.extend_from_slice(&(1u64 << 30).to_le_bytes());
    pages.extend_from_slice(&[0u8; 4096]);
    let stream = [
        auth(b""),
        header(FORMAT),
        message(1, config.as_bytes()),
        message(2, &pages),
    ]
    .concat();
    let (code, err, _) = feed_target(&stream);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("outside memory region"), "{err}");

    // The source goes away before the state arrived.
    let stream = [auth(b""), header(FORMAT), message(1, config.as_bytes())].concat();
    let (code, err, _) = feed_target(&stream);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("closed"), "{err}");
}

/// A forged configuration of 4 TiB (and one of other vCPUs) is refused
/// against the target's own --cpus/--memory before any guest memory is
/// allocated (the old target mapped the 4 TiB and waited for pages).
#[test]
fn a_forged_4_tib_machine_is_refused_before_allocating() {
    require_kvm!();
    let accel = test_accel().unwrap_or_else(|| "kvm".into());
    for (vcpus, memory_mib, says) in [
        (
            1u32,
            4u64 << 20,
            "4194304 MiB of memory, this target's definition 32 MiB",
        ),
        (8, 32, "8 vCPU(s), this target's definition 1"),
    ] {
        let config = serde_json::json!({
            "backend": accel, "vcpus": vcpus, "memory_mib": memory_mib,
            "frontend": {"devices": []}
        })
        .to_string();
        let (code, err, back) =
            feed_target(&[auth(b""), header(FORMAT), message(1, config.as_bytes())].concat());
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(
            String::from_utf8_lossy(&back).contains(says),
            "the source is not told why: {back:?}"
        );
    }
    // A target whose own definition does not fit the host refuses to
    // start at all.
    let (code, err) = target_exits(&["--memory", "4194304"], "unix:/nonexistent/m.sock");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("more than this host"), "{err}");
}

/// Run a target on `addr` that must exit by itself, with `--cpus 1
/// --memory 32` unless `extra` gives them (or `"--bare"`: neither);
/// (exit code, stderr).
fn target_exits(extra: &[&str], addr: &str) -> (Option<i32>, String) {
    let mut args = vec!["run", "--migrate-from", addr, "--accel", "emu"];
    let bare = extra.contains(&"--bare");
    if !bare && !extra.contains(&"--memory") {
        args.extend(["--memory", "32"]);
    }
    if !bare && !extra.contains(&"--cpus") {
        args.extend(["--cpus", "1"]);
    }
    args.extend(extra.iter().filter(|a| **a != "--bare"));
    let mut child = Command::new(vireo_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vireo");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err);
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the target {args:?} did not exit (it listens?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The target refuses to listen on plain TCP, or on TLS without a way to
/// know its source, and refuses to start without its own definition.
#[test]
fn plain_tcp_and_a_target_without_its_own_definition_are_refused() {
    let dir = TempDir::new("migflags");
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let secret = secret(&dir, "secret");
    let (code, err) = target_exits(
        &["--migrate-secret-file", secret.to_str().expect("utf-8")],
        &addr,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("must be encrypted") && err.contains("--migrate-tls-cert"),
        "{err}"
    );
    let [_, cert, key, ..] = certificates(&dir);
    let (code, err) = target_exits(
        &[
            "--migrate-tls-cert",
            cert.to_str().expect("utf-8"),
            "--migrate-tls-key",
            key.to_str().expect("utf-8"),
        ],
        &addr,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must know its source"), "{err}");
    let sock = format!("unix:{}", dir.path().join("m.sock").display());
    let (code, err) = target_exits(&["--bare"], &sock);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs its own definition"), "{err}");
    let short = dir.write("short", b"tooshort");
    let (code, err) = target_exits(
        &["--migrate-secret-file", short.to_str().expect("utf-8")],
        &sock,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

/// Connect to a listening target as a would-be source and send `first`;
/// what the target answers before it closes the connection.
fn knock(path: &Path, first: &[u8]) -> String {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the target never listened: {e}"),
        }
    };
    conn.write_all(first).expect("send");
    // Whatever follows would be the stream: a refused peer gets no
    // further (the target closes after its answer).
    let _ = conn.write_all(&header(FORMAT));
    conn.set_read_timeout(Some(RUN_TIMEOUT)).expect("timeout");
    let mut back = Vec::new();
    let _ = conn.read_to_end(&mut back);
    String::from_utf8_lossy(&back).into_owned()
}

/// A would-be source without the secret (a wrong one, none, or a stream
/// with no authentication at all) is refused and logged; the target keeps
/// waiting and the real source, with the secret, migrates. A target that
/// only sees failures gives up after five, with a message.
#[test]
fn a_source_without_the_secret_is_refused_and_the_target_keeps_waiting() {
    require_kvm!();
    let dir = TempDir::new("migsecret");
    let (mut src, socket) = source(&dir);
    let secret = secret(&dir, "secret");
    let path = dir.path().join("mig.sock");
    let addr = format!("unix:{}", path.display());
    let mut dst = target(
        &addr,
        &["--migrate-secret-file", secret.to_str().expect("utf-8")],
    );
    let back = knock(&path, &auth(b"0000000000000000000000000000000000000000"));
    assert!(back.contains("wrong migration secret"), "{back:?}");
    let back = knock(&path, &auth(b""));
    assert!(back.contains("no migration secret"), "{back:?}");
    let back = knock(&path, &header(FORMAT));
    assert!(back.contains("no authentication"), "{back:?}");
    // The real source, with another secret: refused, keeps running.
    let wrong = dir.write("wrong", b"ffffffffffffffffffffffffffffffff");
    let reply = migrate(
        &socket,
        &format!("{addr} --secret-file {}", wrong.display()),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong migration secret"),
        "{reply}"
    );
    assert_eq!(control(&socket, "status")["state"], "running");
    // ... and with the secret: the guest goes on there.
    let reply = migrate(
        &socket,
        &format!("{addr} --secret-file {}", secret.display()),
    );
    assert_eq!(reply["ok"], true, "migration failed: {reply}");
    let status = src.wait("the source to exit after migrating");
    assert_eq!(status.code(), Some(0), "source: {}", src.output());
    let after = wait_lines(&mut dst, 3);
    assert!(after.len() >= 3, "the target printed {after:?}");
    check_sums("target", &after);

    // Only failures: the target gives up after five, saying why.
    let path = dir.path().join("giveup.sock");
    let addr = format!("unix:{}", path.display());
    let knocker = std::thread::spawn(move || {
        for _ in 0..5 {
            knock(&path, &auth(b"guessguessguessguess"));
        }
    });
    let (code, err) = target_exits(
        &["--migrate-secret-file", secret.to_str().expect("utf-8")],
        &addr,
    );
    knocker.join().expect("knocker");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("gave up after 5 sources failed to authenticate"),
        "{err}"
    );
    assert_eq!(
        err.matches("migration: refused a source from pid").count(),
        5,
        "each failure is logged with its peer: {err}"
    );
}

/// A peer that trickles its authentication a byte at a time (each read
/// well within a socket timeout) is cut off at the deadline for the whole
/// authentication, so it cannot hold the target's only listener.
#[test]
fn a_peer_that_trickles_is_cut_off_at_the_auth_deadline() {
    let dir = TempDir::new("migtrickle");
    let secret = secret(&dir, "secret");
    let path = dir.path().join("t.sock");
    let mut child = Command::new(vireo_bin())
        .args([
            "run",
            "--migrate-from",
            &format!("unix:{}", path.display()),
            "--migrate-secret-file",
            secret.to_str().expect("utf-8"),
            "--cpus",
            "1",
            "--memory",
            "32",
            "--accel",
            "emu",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vireo");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut conn = loop {
        match UnixStream::connect(&path) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the target never listened: {e}"),
        }
    };
    let started = Instant::now();
    let first = auth(&[b'a'; 32]);
    let mut cut = None;
    for b in first.iter().cycle().take(40) {
        if conn.write_all(&[*b]).is_err() {
            cut = Some(started.elapsed());
            break;
        }
        conn.set_read_timeout(Some(Duration::from_millis(900)))
            .expect("timeout");
        let mut one = [0u8; 1];
        if let Ok(0) = conn.read(&mut one) {
            cut = Some(started.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let cut = cut.expect("the trickling peer was never cut off (30 s)");
    assert!(
        cut >= Duration::from_secs(9) && cut <= Duration::from_secs(13),
        "cut off after {cut:?}, the deadline is 10 s"
    );
}
