//! One daemon for a test: its state directory, its socket, the `vireo
//! serve` process, and a client on the api crate's own client
//! (`vireo_api::client`). Dropping it kills the daemon and every process
//! whose command line names its directory (the VMs it started).
//!
//! Test files add their own helpers with `impl DaemonEnv` blocks.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vireo_api::client::{Client, Response};

use super::guest::{assemble64, AsmResult, Guest64};
use super::{run_vireo_args, vireo_bin, KernelKind, Outcome, TempDir};

/// How long the kit waits for the daemon, a request or a condition.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct DaemonEnv {
    pub dir: TempDir,
    daemon: Option<Child>,
    /// Flags added to `vireo serve` (listeners, TLS, limits).
    extra_args: Vec<String>,
    /// The TLS listener's port, when the daemon has one.
    port: Option<u16>,
}

impl DaemonEnv {
    /// A daemon on a Unix socket, listening.
    pub fn new(tag: &str) -> DaemonEnv {
        let mut env = DaemonEnv::without_daemon(tag);
        env.start_daemon();
        env
    }

    /// The directories, no daemon yet.
    pub fn without_daemon(tag: &str) -> DaemonEnv {
        DaemonEnv {
            dir: TempDir::new(tag),
            daemon: None,
            extra_args: Vec::new(),
            port: None,
        }
    }

    /// A daemon on its Unix socket and on TLS at 127.0.0.1 (a self-signed
    /// certificate for 127.0.0.1 and localhost in cert.pem/key.pem), with
    /// `extra` flags, listening on both.
    pub fn tls(tag: &str, extra: &[&str]) -> DaemonEnv {
        let mut env = DaemonEnv::without_daemon(tag);
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a self-signed certificate");
        let cert = env.dir.write("cert.pem", ck.cert.pem().as_bytes());
        let key = env
            .dir
            .write("key.pem", ck.signing_key.serialize_pem().as_bytes());
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "tcp:127.0.0.1:0".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        env.start_daemon_with(&args);
        env
    }

    /// The TLS listener's port (see [`DaemonEnv::tls`]).
    pub fn port(&self) -> u16 {
        self.port.expect("a daemon with a TLS listener")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port())
    }

    /// The api crate's client on the TLS listener, trusting cert.pem and
    /// sending `token`.
    pub fn https_client(&self, token: Option<&str>) -> Client {
        Client::tls(
            &self.url(),
            Some(&self.path("cert.pem")),
            token.map(str::to_string),
        )
        .expect("a TLS client")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("api.sock")
    }

    /// `vireo serve` on `socket`, with the test's directory as storage
    /// (its kernels and disks are there).
    pub fn serve_args(&self, socket: &std::path::Path) -> Vec<String> {
        let mut args = vec![
            "serve".into(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--listen".into(),
            format!("unix:{}", socket.display()),
            "--storage".into(),
            self.dir.path().display().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Start `vireo serve` (logging to `daemon.log`) and wait until it
    /// listens (on its TLS listener too, when given one).
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        let child = Command::new(vireo_bin())
            .args(self.serve_args(&self.socket()))
            .env("VIREO_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting vireo serve");
        self.daemon = Some(child);
        let tls = self.extra_args.iter().any(|a| a == "--tls-cert");
        let start = Instant::now();
        while UnixStream::connect(self.socket()).is_err() || (tls && self.tls_port().is_none()) {
            if let Some(status) = self.daemon.as_mut().and_then(|d| d.try_wait().unwrap()) {
                panic!("the daemon exited with {status}:\n{}", self.daemon_log());
            }
            assert!(
                start.elapsed() < WAIT,
                "the daemon did not listen in time:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.port = if tls { self.tls_port() } else { None };
    }

    /// The port the daemon's log says its TLS listener took.
    fn tls_port(&self) -> Option<u16> {
        self.daemon_log()
            .split("serving the API on https://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
    }

    /// Start the daemon with `extra` flags for `vireo serve` from now on.
    pub fn start_daemon_with(&mut self, extra: &[String]) {
        self.extra_args = extra.to_vec();
        self.start_daemon();
    }

    /// Stop the daemon with `signal` and wait for it to exit (VMs keep
    /// running).
    pub fn stop_daemon(&mut self, signal: i32) {
        let Some(mut d) = self.daemon.take() else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(d.id() as i32, signal) };
        let start = Instant::now();
        while d.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < WAIT,
                "the daemon did not exit on signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 the daemon (VMs keep running).
    pub fn kill_daemon(&mut self) {
        self.stop_daemon(libc::SIGKILL);
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The api crate's client on the daemon's socket.
    pub fn client(&self) -> Client {
        Client::unix(self.socket())
    }

    /// One request; the whole reply whatever its status.
    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.client()
            .send(method, path, body.map(str::as_bytes), WAIT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request; the status and the body.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let r = self.send(method, path, body);
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    }

    /// One JSON request; the status and the JSON reply (`null` when empty).
    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (status, body) = self.http(method, path, text.as_deref());
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
        };
        (status, v)
    }

    /// `GET /v1/vms/NAME`, which must succeed.
    pub fn vm(&self, name: &str) -> Value {
        let (status, v) = self.json("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// `vireo vm ARGS... --socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> Outcome {
        let mut full: Vec<String> = vec!["vm".into()];
        full.extend(args.iter().map(|s| s.to_string()));
        full.push("--socket".into());
        full.push(self.socket().display().to_string());
        run_vireo_args(&full, WAIT)
    }

    /// An ELF kernel in the test's directory running `body`; its path.
    pub fn kernel(&self, file: &str, body: impl FnOnce(&mut Guest64) -> AsmResult) -> String {
        let code = assemble64(KernelKind::Elf.entry(), body);
        self.dir
            .write(file, &KernelKind::Elf.wrap(&code))
            .display()
            .to_string()
    }

    /// Wait until `ok`, at most [`WAIT`]; the daemon's log on timeout.
    pub fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
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

impl Drop for DaemonEnv {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
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

/// The processes whose command line holds `text`.
pub fn processes_mentioning(text: &str) -> Vec<i32> {
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
