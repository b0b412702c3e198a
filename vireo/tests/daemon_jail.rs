//! The daemon's VMs are jailed by default: a VM started through the API
//! shows on the host, for its VMM process, a per-VM uid, no capabilities,
//! no_new_privs, its own mount/PID/IPC/UTS namespaces, a root that is not
//! the host's and its definition's cgroup limits; the daemon still talks
//! to it after a restart (re-adoption: console, control socket, stats)
//! and removes its cgroup when it ends. `vireo serve --no-jail` runs VMs
//! unjailed and says so in the audit log. Needs root; guests run on the
//! emulator, so no /dev/kvm is needed.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::guest::{self, assemble64};
use support::{KernelKind, TempDir};

#[path = "support/jail.rs"]
mod jail_support;
use jail_support::*;

const WAIT: Duration = Duration::from_secs(20);
/// The daemon's first jail uid (daemon/src/vms/jail.rs).
const UID_BASE: u32 = 10_000_000;

struct Daemon {
    dir: TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Daemon {
    fn start(tag: &str, extra: &[&str]) -> Daemon {
        let mut d = Daemon {
            dir: TempDir::new(tag),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.restart();
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(support::vireo_bin())
            .arg("serve")
            .arg("--state-dir")
            .arg(self.state())
            .arg("--listen")
            .arg(format!("unix:{}", self.socket().display()))
            // The test's kernels are in its directory.
            .arg("--storage")
            .arg(self.dir.path())
            .args(&self.extra)
            .env("VIREO_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            assert!(
                start.elapsed() < WAIT,
                "the daemon did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (
            head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            body.to_string(),
        )
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, body) = self.http(method, path, body);
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Define `name` with a guest that waits for the power button, start it.
    fn start_vm(&self, name: &str, vcpus: u32, memory_mib: u64) -> u32 {
        let code = assemble64(KernelKind::Elf.entry(), guest::wait_for_power_button);
        let kernel = self.dir.write("vmlinux", &KernelKind::Elf.wrap(&code));
        let (status, v) = self.json(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "kernel": kernel, "vcpus": vcpus,
                        "memory_mib": memory_mib, "accel": "emu"})),
        );
        assert_eq!(status, 201, "{v}");
        let (status, v) = self.json("POST", &format!("/v1/vms/{name}/start"), None);
        assert_eq!(status, 200, "{v}\n{}", self.log());
        self.wait_for("the guest's first words", || {
            self.http("GET", &format!("/v1/vms/{name}/console"), None)
                .1
                .contains("waiting for the power button")
        });
        v["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let tag = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&tag) && pid != std::process::id() as i32
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn daemon_vms_are_jailed_and_still_managed_after_a_daemon_restart() {
    if !is_root() {
        eprintln!("skipping: the daemon's jail needs root");
        return;
    }
    let mut d = Daemon::start("daemon-jail", &[]);
    let supervisor = d.start_vm("jailed", 1, 32);
    let vmm = wait_for_child(supervisor);
    let uid: u32 = status_field(vmm, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((UID_BASE..UID_BASE + 65_536).contains(&uid), "uid {uid}");
    assert_jailed(vmm, supervisor, uid);
    // A network namespace of its own (an outgoing migration uses sockets
    // kept from the host's; daemon_api's migration test runs through them).
    assert_ne!(ns(vmm, "net"), ns(std::process::id(), "net"));
    // The VM's directory is the VM's: its control socket lives there.
    let vm_dir = d.state().join("vms/jailed");
    assert_eq!(std::fs::metadata(&vm_dir).unwrap().uid(), uid);
    assert_eq!(
        std::fs::metadata(vm_dir.join("control.sock"))
            .unwrap()
            .uid(),
        uid
    );
    // Its root holds the VM directory at the same path and not the
    // daemon's database next to it.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&vm_dir.join("control.sock")).exists());
    assert!(!inside(&d.state().join("vireo.db")).exists());
    // The definition's limits: vCPUs + 1 CPUs, memory + 256 MiB, 256 pids.
    let (quota, period, memory, pids) = cgroup_limits(vmm);
    assert_eq!((quota.as_str(), period.as_str()), ("200000", "100000"));
    assert_eq!(memory, ((32u64 + 256) << 20).to_string());
    assert_eq!(pids, "256");
    let cgroup = cgroup_dir(vmm, "pids");
    // Landlock where the kernel has it: on, as the VM's log says.
    let log = std::fs::read_to_string(vm_dir.join("vireo.log")).unwrap();
    let jailed = log
        .lines()
        .find(|l| l.contains("jailed: uid"))
        .unwrap_or_else(|| panic!("no jail line in the VM's log:\n{log}"));
    assert!(
        jailed.contains("Landlock enforced") || jailed.contains("Landlock skipped: not available"),
        "{jailed}"
    );

    // Stats are the VMM's (the supervisor's RSS is a few MiB at most).
    let (status, stats) = d.json("GET", "/v1/stats", None);
    assert_eq!(status, 200, "{stats}");
    let rss = stats["vms"][0]["memory_rss_bytes"].as_u64().unwrap();
    let vmm_rss: u64 = status_field(vmm, "VmRSS")
        .trim_end_matches(" kB")
        .parse::<u64>()
        .unwrap()
        * 1024;
    let sup_rss: u64 = status_field(supervisor, "VmRSS")
        .trim_end_matches(" kB")
        .parse::<u64>()
        .unwrap()
        * 1024;
    assert!(vmm_rss > sup_rss, "VMM {vmm_rss} vs supervisor {sup_rss}");
    assert!(
        rss > sup_rss,
        "stats report {rss}, the supervisor's RSS is {sup_rss}"
    );

    // kill -9 the daemon; a new one re-adopts the jailed VM through its
    // supervisor: the console (stdout pipe), the control socket (power
    // button), then its end and the cgroup's removal.
    d.kill();
    d.restart();
    let (status, v) = d.json("GET", "/v1/vms/jailed", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(u64::from(supervisor)), "{v}");
    let (status, v) = d.json(
        "POST",
        "/v1/vms/jailed/stop",
        Some(json!({"timeout_secs": 10})),
    );
    assert_eq!(status, 200, "{v}\n{}", d.log());
    d.wait_for("the console after re-adoption", || {
        d.http("GET", "/v1/vms/jailed/console", None)
            .1
            .contains("power button pressed")
    });
    d.wait_for("the VM to stop", || {
        d.json("GET", "/v1/vms/jailed", None).1["state"] == "stopped"
    });
    d.wait_for("the cgroup's removal", || !cgroup.exists());
}

#[test]
fn a_daemon_started_with_no_jail_runs_vms_as_root_and_audits_it() {
    if !is_root() {
        eprintln!("skipping: needs root to tell root from the jail's uid");
        return;
    }
    let d = Daemon::start("daemon-nojail", &["--no-jail"]);
    let pid = d.start_vm("open", 1, 32);
    assert!(children(pid).is_empty(), "an unjailed VM has no supervisor");
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_ne!(status_field(pid, "CapEff"), "0000000000000000");
    let audit = std::fs::read_to_string(d.state().join("audit.log")).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains("vm_started_without_jail"))
        .unwrap_or_else(|| panic!("no audit line:\n{audit}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["vm"], "open");
    assert_eq!(v["pid"].as_u64(), Some(u64::from(pid)));
    assert!(d.log().contains("runs without the jail"), "{}", d.log());
}
