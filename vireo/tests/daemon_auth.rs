//! Who may do what, end to end: a real `vireo serve` with a Unix socket AND
//! a TLS listener on 127.0.0.1 (a self-signed certificate made here), tokens
//! of each role created with `vireo token create` over the socket, then raw
//! HTTPS and the CLI (`--url`, `VIREO_TOKEN`, `--ca-cert`) with each of them;
//! the audit log, and that the state directory holds no token in clear.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::daemon::DaemonEnv as Env;
use support::guest::{self, assemble64, Guest64};
use support::{KernelKind, Outcome, TempDir};

const WAIT: Duration = Duration::from_secs(15);

fn spin(g: &mut Guest64) -> guest::AsmResult {
    g.print("auth test guest\n")?;
    g.halt_forever()
}

impl Env {
    /// `vireo ARGS...` with `envs` (and no VIREO_* from the test's own
    /// environment).
    fn vireo(&self, args: &[&str], envs: &[(&str, &str)]) -> Outcome {
        let start = Instant::now();
        let mut cmd = Command::new(support::vireo_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for v in ["VIREO_URL", "VIREO_TOKEN", "VIREO_CA_CERT", "VIREO_SOCKET"] {
            cmd.env_remove(v);
        }
        cmd.envs(envs.iter().copied());
        let mut child = cmd.spawn().expect("running vireo");
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        Outcome {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: start.elapsed() > WAIT,
            command: format!("vireo {}", args.join(" ")),
            elapsed: start.elapsed(),
        }
    }

    /// `vireo ARGS... --socket SOCKET` (admin, no token).
    fn local(&self, args: &[&str]) -> Outcome {
        let sock = self.socket().display().to_string();
        let mut full = args.to_vec();
        full.extend(["--socket", &sock]);
        self.vireo(&full, &[])
    }

    /// `vireo ARGS... --url URL --ca-cert CERT` with VIREO_TOKEN=token.
    fn remote(&self, token: &str, args: &[&str]) -> Outcome {
        let url = self.url();
        let ca = self.path("cert.pem").display().to_string();
        let mut full = args.to_vec();
        full.extend(["--url", &url, "--ca-cert", &ca]);
        self.vireo(&full, &[("VIREO_TOKEN", token)])
    }

    /// One HTTPS request through the api crate's client: status, head
    /// (the headers, lower case) and body.
    fn https(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String, String) {
        let body = body.map(|b| b.to_string());
        let r = self
            .https_client(token)
            .send(method, path, body.as_deref().map(str::as_bytes), WAIT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let head = r
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_ascii_lowercase()))
            .collect::<Vec<_>>()
            .join("\r\n");
        (
            r.status,
            head,
            String::from_utf8_lossy(&r.body).into_owned(),
        )
    }

    /// A JSON request over HTTPS with `token`: the status and the reply.
    fn json_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, _, text) = self.https(method, path, token, body);
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        (status, v)
    }

    /// An ELF kernel that prints a line and halts; its path.
    fn spin_kernel(&self) -> String {
        self.kernel("vmlinux", spin)
    }

    /// A token of `role` made with `vireo token create` over the socket.
    fn token(&self, role: &str) -> String {
        let out = self.local(&[
            "token",
            "create",
            "--role",
            role,
            "--name",
            &format!("{role}-test"),
        ]);
        out.assert_status(0);
        let token = out.stdout.trim().to_string();
        assert!(token.starts_with("vireo_"), "{out}");
        assert!(out.stderr.contains("shown only now"), "{out}");
        token
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn id_of(token: &str) -> &str {
    &token["vireo_".len().."vireo_".len() + 16]
}

#[test]
fn roles_tokens_and_the_audit_log_over_tls() {
    let env = Env::tls("daemon-auth", &[]);
    let kernel = env.spin_kernel();
    env.local(&[
        "vm", "create", "web", "--kernel", &kernel, "--memory", "32", "--accel", "emu",
    ])
    .assert_status(0);
    let viewer = env.token("viewer");
    let operator = env.token("operator");
    let admin = env.token("admin");
    let out = env.local(&["token", "list"]);
    out.assert_status(0);
    for (t, role) in [
        (&viewer, "viewer"),
        (&operator, "operator"),
        (&admin, "admin"),
    ] {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(id_of(t))
                && l.contains(role)
                && l.contains(&format!("{role}-test"))),
            "{out}"
        );
        assert!(
            !out.stdout.contains(&t[23..]),
            "a secret in the list: {out}"
        );
    }

    // No token, a bad one, a malformed one: 401 with a Bearer challenge.
    let forged = format!("{}{}", &viewer[..23], "0".repeat(64));
    for t in [None, Some(forged.as_str()), Some("nope")] {
        let (status, head, body) = env.https("GET", "/v1/vms", t, None);
        assert_eq!(status, 401, "{t:?}: {body}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "unauthorized", "{v}");
    }
    // Public without a token: the API document and the web UI's paths.
    assert_eq!(env.https("GET", "/v1/openapi.json", None, None).0, 200);
    // (The UI, or the page saying how to build it: HTML either way.)
    for path in ["/", "/index.html", "/vms/web"] {
        let (status, head, _) = env.https("GET", path, None, None);
        assert_eq!(status, 200, "{path}");
        assert!(head.contains("content-type: text/html"), "{path}: {head}");
    }

    // viewer: reads only.
    let (status, v) = env.json_as("GET", "/v1/vms", Some(&viewer), None);
    assert_eq!(
        (status, v["vms"][0]["name"].as_str()),
        (200, Some("web")),
        "{v}"
    );
    let (status, v) = env.json_as("GET", "/v1/whoami", Some(&viewer), None);
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"role": "viewer", "token": {"id": id_of(&viewer), "name": "viewer-test"}, "transport": "tls"})
    );
    let (status, v) = env.json_as("POST", "/v1/vms/web/start", Some(&viewer), None);
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this token's role is viewer; operator is needed"),
        "{v}"
    );
    let create = json!({"name": "db", "kernel": kernel, "memory_mib": 32, "accel": "emu"});
    assert_eq!(
        env.json_as("POST", "/v1/vms", Some(&viewer), Some(create.clone()))
            .0,
        403
    );
    assert_eq!(env.json_as("GET", "/v1/tokens", Some(&viewer), None).0, 403);
    // The token in the query string counts only on the console WebSocket
    // (and the event stream): browsers cannot set headers there. Anywhere
    // else it is ignored, so the request has no token.
    let (status, _, body) = env.https("GET", &format!("/v1/vms?access_token={viewer}"), None, None);
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = env.https(
        "GET",
        &format!("/v1/whoami?access_token={viewer}"),
        None,
        None,
    );
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = env.https(
        "GET",
        &format!("/v1/vms/web/console/ws?access_token={viewer}"),
        None,
        None,
    );
    // Authenticated (not 401/403); the handler then wants a WebSocket upgrade.
    assert!(
        status != 401 && status != 403 && status < 500,
        "{status} {body}"
    );

    // operator: start and stop, not create or delete.
    let (status, v) = env.json_as("POST", "/v1/vms/web/start", Some(&operator), None);
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    let (status, v) = env.json_as("POST", "/v1/vms/web/kill", Some(&operator), None);
    assert_eq!((status, v["state"].as_str()), (200, Some("stopped")), "{v}");
    assert_eq!(
        env.json_as("POST", "/v1/vms", Some(&operator), Some(create.clone()))
            .0,
        403
    );
    assert_eq!(
        env.json_as("DELETE", "/v1/vms/web", Some(&operator), None)
            .0,
        403
    );
    assert_eq!(
        env.json_as(
            "PATCH",
            "/v1/vms/web",
            Some(&operator),
            Some(json!({"vcpus": 2}))
        )
        .0,
        403
    );

    // admin: everything.
    let (status, v) = env.json_as("POST", "/v1/vms", Some(&admin), Some(create));
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        env.json_as("DELETE", "/v1/vms/db", Some(&admin), None).0,
        204
    );
    let (status, v) = env.json_as(
        "POST",
        "/v1/tokens",
        Some(&admin),
        Some(json!({"name": "spare", "role": "viewer"})),
    );
    assert_eq!(status, 201, "{v}");
    let spare = v["token"].as_str().unwrap().to_string();
    assert_eq!(env.json_as("GET", "/v1/whoami", Some(&spare), None).0, 200);
    let (status, v) = env.json_as("GET", "/v1/tokens", Some(&admin), None);
    assert_eq!(
        (status, v["tokens"].as_array().map(Vec::len)),
        (200, Some(4)),
        "{v}"
    );
    assert_eq!(
        env.json_as(
            "DELETE",
            &format!("/v1/tokens/{}", id_of(&spare)),
            Some(&admin),
            None
        )
        .0,
        204
    );
    assert_eq!(
        env.json_as("GET", "/v1/whoami", Some(&spare), None).0,
        401,
        "revoked"
    );
    assert_eq!(
        env.json_as(
            "DELETE",
            &format!("/v1/tokens/{}", id_of(&spare)),
            Some(&admin),
            None
        )
        .0,
        404
    );

    // The CLI over TLS.
    let out = env.remote(&viewer, &["vm", "list"]);
    out.assert_status(0);
    assert!(out.stdout.lines().any(|l| l.starts_with("web")), "{out}");
    let out = env.remote(&viewer, &["vm", "start", "web"]);
    out.assert_status(2);
    assert!(
        out.stderr
            .contains("this token's role is viewer; operator is needed"),
        "{out}"
    );
    let out = env.remote(&operator, &["vm", "start", "web"]);
    out.assert_status(0);
    assert!(out.stdout.contains("started web"), "{out}");
    env.remote(&operator, &["vm", "kill", "web"])
        .assert_status(0);
    let out = env.remote(&operator, &["vm", "delete", "web"]);
    out.assert_status(2);
    assert!(out.stderr.contains("operator; admin is needed"), "{out}");
    // admin from a --token-file, via VIREO_URL / VIREO_CA_CERT.
    let token_file = env
        .dir
        .write("admin.token", format!("{admin}\n").as_bytes());
    let url = env.url();
    let ca = env.path("cert.pem").display().to_string();
    let tf = token_file.display().to_string();
    let out = env.vireo(
        &[
            "vm",
            "create",
            "db2",
            "--kernel",
            &kernel,
            "--memory",
            "32",
            "--accel",
            "emu",
            "--token-file",
            &tf,
        ],
        &[("VIREO_URL", &url), ("VIREO_CA_CERT", &ca)],
    );
    out.assert_status(0);
    let out = env.vireo(
        &["token", "revoke", id_of(&viewer), "--token-file", &tf],
        &[("VIREO_URL", &url), ("VIREO_CA_CERT", &ca)],
    );
    out.assert_status(0);
    let out = env.remote(&admin, &["vm", "delete", "db2"]);
    out.assert_status(0);
    // A revoked token, no token, an untrusted certificate, nobody there.
    let out = env.remote(&viewer, &["vm", "list"]);
    out.assert_status(2);
    assert!(out.stderr.contains("refused the token"), "{out}");
    let out = env.vireo(&["vm", "list", "--url", &url, "--ca-cert", &ca], &[]);
    out.assert_status(2);
    assert!(out.stderr.contains("set VIREO_TOKEN"), "{out}");
    let out = env.vireo(&["vm", "list", "--url", &url], &[("VIREO_TOKEN", &admin)]);
    out.assert_status(2);
    assert!(
        out.stderr.contains("not trusted") && out.stderr.contains("--ca-cert"),
        "{out}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("https://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let out = env.vireo(
        &["vm", "list", "--url", &dead, "--ca-cert", &ca],
        &[("VIREO_TOKEN", &admin)],
    );
    out.assert_status(1);
    assert!(
        out.stderr.contains("cannot reach the vireo daemon at"),
        "{out}"
    );

    // The audit log: every change and every denial, never a token.
    let (status, _, _) = env.https("GET", "/v1/vms?x=1&access_token=vireo_bogus", None, None);
    assert_eq!(status, 401);
    let audit = env.audit();
    let find = |method: &str, path: &str, status: u64| {
        audit
            .iter()
            .find(|l| l["method"] == method && l["path"] == path && l["status"] == status)
            .unwrap_or_else(|| panic!("no audit line for {method} {path} {status}: {audit:#?}"))
            .clone()
    };
    let l = find("POST", "/v1/vms/web/start", 403);
    assert_eq!(
        (&l["decision"], &l["role"], &l["token_id"]),
        (&json!("denied"), &json!("viewer"), &json!(id_of(&viewer))),
        "{l}"
    );
    assert!(l["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{l}");
    assert!(l["time"].as_str().unwrap().starts_with("20"), "{l}");
    let l = find("POST", "/v1/vms/web/start", 200);
    assert_eq!(
        (&l["decision"], &l["role"]),
        (&json!("allowed"), &json!("operator")),
        "{l}"
    );
    // Unix-socket callers are named by their uid (SO_PEERCRED).
    let l = find("POST", "/v1/tokens", 201);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        (&l["peer"], &l["role"], &l["token_id"]),
        (
            &json!(format!("unix:uid={uid}")),
            &json!("admin"),
            &Value::Null
        ),
        "{l}"
    );
    let l = find("GET", "/v1/vms?x=1", 401);
    assert_eq!(
        (&l["decision"], &l["role"]),
        (&json!("denied"), &Value::Null),
        "{l}"
    );
    assert!(
        !audit
            .iter()
            .any(|l| l["method"] == "GET" && l["status"] == 200),
        "allowed reads are not audited: {audit:#?}"
    );
    let text = std::fs::read_to_string(env.state().join("audit.log")).unwrap();
    assert!(!text.contains("access_token") && !text.contains(&viewer[23..]));
    assert!(
        env.daemon_log().contains("API request denied"),
        "{}",
        env.daemon_log()
    );

    // No token in clear anywhere in the state directory (database, WAL, logs).
    for entry in walk(&env.state()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for t in [&viewer, &operator, &admin, &spare] {
            assert!(
                !text.contains(&t[23..]),
                "{} holds a token secret",
                entry.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn serve_refuses_plain_tcp_and_bad_tls_files() {
    let dir = TempDir::new("daemon-auth-flags");
    let state = dir.path().join("state").display().to_string();
    let run = |args: &[&str]| {
        let mut full = vec!["serve", "--state-dir", &state];
        full.extend(args);
        let out = Command::new(support::vireo_bin())
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--listen", "tcp:127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tls-cert") && err.contains("--tls-key"),
        "{err}"
    );
    let garbage = dir.write("garbage.pem", b"hello\n").display().to_string();
    let (code, err) = run(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-cert",
        &garbage,
        "--tls-key",
        &garbage,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("garbage.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir
        .write("cert.pem", ck.cert.pem().as_bytes())
        .display()
        .to_string();
    let (code, err) = run(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &cert,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tls-key") && err.contains("cert.pem") && err.contains("no PEM private key"),
        "{err}"
    );
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_key = dir
        .write("other.key", other.signing_key.serialize_pem().as_bytes())
        .display()
        .to_string();
    let (code, err) = run(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &other_key,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("other.key") && err.contains("does not belong to the certificate"),
        "{err}"
    );
}

/// `vireo vm console --url` over TLS: the console streams to every role,
/// but only an operator's keystrokes reach the guest; a viewer's are
/// refused with a message.
#[test]
fn consoles_over_tls_viewers_watch_operators_type() {
    use std::sync::Mutex;
    let env = Env::tls("daemon-auth-console", &[]);
    let code = assemble64(KernelKind::Elf.entry(), guest::echo_upper);
    let kernel = env.dir.write("echo", &KernelKind::Elf.wrap(&code));
    let kernel = kernel.display().to_string();
    env.local(&[
        "vm", "create", "echo", "--kernel", &kernel, "--memory", "32", "--accel", "emu",
    ])
    .assert_status(0);
    env.local(&["vm", "start", "echo"]).assert_status(0);
    let viewer = env.token("viewer");
    let operator = env.token("operator");

    // A live `vm console` with piped stdin and stdout, as `role` would run it.
    let attach = |token: &str| {
        let mut child = Command::new(support::vireo_bin())
            .args(["vm", "console", "echo", "--url", &env.url(), "--ca-cert"])
            .arg(env.path("cert.pem"))
            .env_remove("VIREO_URL")
            .env_remove("VIREO_SOCKET")
            .env("VIREO_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vireo vm console");
        let seen = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&seen);
            let mut pipe = pipe;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        (child, stdin, seen)
    };
    let wait_for = |seen: &Arc<Mutex<String>>, what: &str| {
        let start = Instant::now();
        while !seen.lock().unwrap().contains(what) {
            assert!(
                start.elapsed() < WAIT,
                "no {what:?} in: {}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let (mut watcher, mut viewer_in, viewer_seen) = attach(&viewer);
    let (mut typist, mut operator_in, operator_seen) = attach(&operator);
    // Both see the scrollback over TLS.
    wait_for(&viewer_seen, guest::ECHO_READY);
    wait_for(&operator_seen, guest::ECHO_READY);
    viewer_in.write_all(b"viewer typed\n").unwrap();
    wait_for(&viewer_seen, "viewer tokens cannot type");
    // The operator's line comes back, to both; the viewer's never did
    // (the guest answers in order, so it would have come first).
    operator_in.write_all(b"operator typed\n").unwrap();
    wait_for(&operator_seen, "OPERATOR TYPED");
    wait_for(&viewer_seen, "OPERATOR TYPED");
    for seen in [&viewer_seen, &operator_seen] {
        assert!(
            !seen.lock().unwrap().contains("VIEWER TYPED"),
            "a viewer's keystrokes reached the guest: {}",
            seen.lock().unwrap()
        );
    }
    let audit = env.audit();
    assert!(
        !audit.is_empty(),
        "the audit log has the token and VM changes"
    );
    env.local(&["vm", "kill", "echo"]).assert_status(0);
    for child in [&mut watcher, &mut typist] {
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < WAIT, "vm console did not end with the VM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Many invalid tokens from one address: 429 with Retry-After for that
/// address, whatever it sends next (a valid token too), and audit lines.
#[test]
fn repeated_invalid_tokens_get_429() {
    let env = Env::tls("daemon-auth-ratelimit", &[]);
    let admin = env.token("admin");
    assert_eq!(env.https("GET", "/v1/vms", Some(&admin), None).0, 200);
    let bogus = format!("vireo_{}_{}", "0".repeat(16), "1".repeat(64));
    for i in 0..10 {
        let (status, _, body) = env.https("GET", "/v1/vms", Some(&bogus), None);
        assert_eq!(status, 401, "attempt {i}: {body}");
    }
    let (status, head, body) = env.https("GET", "/v1/vms", Some(&bogus), None);
    assert_eq!(status, 429, "{body}");
    let retry: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no Retry-After: {head}"));
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(body.contains("too_many_failures"), "{body}");
    let (status, _, _) = env.https("GET", "/v1/vms", Some(&admin), None);
    assert_eq!(status, 429, "the address is blocked, not the token");
    // The Unix socket is not affected.
    assert!(env.local(&["vm", "list"]).status == Some(0));
    let audit = env.audit();
    assert!(
        audit.iter().any(|l| l["decision"] == "blocked"),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l["decision"] == "rate_limited" && l["status"] == 429),
        "{audit:#?}"
    );
}

/// With --max-connections 3, three idle (never handshaking) connections
/// fill the TLS listener; a fourth is closed at once, and once the idle
/// ones go a client gets in again.
#[test]
fn connections_beyond_the_cap_are_closed() {
    let env = Env::tls("daemon-auth-conncap", &["--max-connections", "3"]);
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", env.port())).unwrap())
        .collect();
    // Let the daemon accept them.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(("127.0.0.1", env.port())).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    match extra.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection over the cap was not closed: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        env.daemon_log().contains("--max-connections"),
        "{}",
        env.daemon_log()
    );
    drop(idle);
    // The daemon sees the idle ones end (their handshakes fail) and frees
    // their places.
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, _) = env.https("GET", "/v1/openapi.json", None, None);
    assert_eq!(status, 200);
}
