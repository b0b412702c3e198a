//! What a jailed VM process looks like from the host, for the jail tests
//! (`vireo run --jail` and the daemon's VMs).
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One field of /proc/PID/status.
pub fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

/// The children of `pid` (its main thread's).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn wait_for_child(pid: u32) -> u32 {
    let start = Instant::now();
    loop {
        if let Some(c) = children(pid).first() {
            return *c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no VMM child of {pid}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn ns(pid: u32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The path of `pid`'s cgroup in the v1 hierarchy holding `controller`, or
/// the v2 one.
pub fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let v2 = ctrls.is_empty();
        if !v2 && !ctrls.split(',').any(|c| c == controller) {
            continue;
        }
        for m in mountinfo.lines() {
            let (left, right) = m.split_once(" - ").unwrap();
            let mount_point = left.split(' ').nth(4).unwrap();
            let mut r = right.split(' ');
            let fstype = r.next().unwrap();
            let opts = r.nth(1).unwrap_or("");
            let hit = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && opts.split(',').any(|o| o == controller)
            };
            if hit {
                let dir = Path::new(mount_point).join(path.trim_start_matches('/'));
                if v2 && !dir.join("cpu.max").exists() {
                    continue;
                }
                return dir;
            }
        }
    }
    panic!("no cgroup of {pid} has {controller}:\n{cg}");
}

/// What every jailed VMM shows on the host (shared with the daemon test).
pub fn assert_jailed(vmm: u32, supervisor: u32, uid: u32) {
    let me = std::process::id();
    assert_eq!(
        status_field(vmm, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec![uid.to_string(); 4],
        "uid"
    );
    assert_eq!(
        status_field(vmm, "Gid").split_whitespace().next(),
        Some(uid.to_string().as_str())
    );
    assert_eq!(status_field(vmm, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(vmm, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    // Every thread of both processes: filtered, and dropped to the jail's
    // ids (Linux keeps ids and capabilities per thread: a thread that kept
    // root would undo the jail).
    for pid in [vmm, supervisor] {
        crate::support::assert_every_thread_filtered(pid, &[]);
        for t in crate::support::threads_of(pid) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", t.tid))
                .unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                    .unwrap_or_default()
            };
            if status.is_empty() {
                continue; // the thread ended meanwhile
            }
            let u = uid.to_string();
            assert_eq!(
                field("Uid:"),
                [u.as_str(); 4].join(" "),
                "thread {} ({}) uid",
                t.tid,
                t.name
            );
            assert_eq!(
                field("CapEff:"),
                "0000000000000000",
                "thread {} ({}) CapEff",
                t.tid,
                t.name
            );
        }
    }
    // Its own PID namespace, where it is PID 1.
    assert_ne!(ns(vmm, "pid"), ns(me, "pid"));
    assert_eq!(
        status_field(vmm, "NSpid").split_whitespace().last(),
        Some("1")
    );
    for kind in ["mnt", "ipc", "uts"] {
        assert_ne!(ns(vmm, kind), ns(me, kind), "{kind} namespace");
    }
    // Its root is not the host's: the host's /etc is not there.
    assert!(Path::new("/etc/passwd").exists());
    assert!(
        !Path::new(&format!("/proc/{vmm}/root/etc/passwd")).exists(),
        "the VMM sees the host's /etc"
    );
    // The supervisor's root and working directory are the jail's root
    // (a working directory left on the host's tree would keep it reachable).
    let id = |p: String| {
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
        (m.dev(), m.ino())
    };
    let jail_root = id(format!("/proc/{vmm}/root"));
    assert_eq!(
        id(format!("/proc/{supervisor}/root")),
        jail_root,
        "supervisor root"
    );
    assert_eq!(
        id(format!("/proc/{supervisor}/cwd")),
        jail_root,
        "supervisor cwd"
    );
    assert_eq!(id(format!("/proc/{vmm}/cwd")), jail_root, "VMM cwd");
    // The supervisor dropped its privileges too.
    assert_eq!(status_field(supervisor, "CapEff"), "0000000000000000");
    assert_eq!(
        status_field(supervisor, "Uid").split_whitespace().next(),
        Some(uid.to_string().as_str())
    );
    // Not dumpable: /proc/PID/ files belong to root, not the jail uid.
    let meta = std::fs::metadata(format!("/proc/{vmm}/mem")).unwrap();
    assert_eq!(meta.uid(), 0, "the VMM is dumpable");
}

/// The cgroup limits of `vmm`: (cpu quota, period, memory bytes, pids).
pub fn cgroup_limits(vmm: u32) -> (String, String, String, String) {
    let cpu = cgroup_dir(vmm, "cpu");
    let mem = cgroup_dir(vmm, "memory");
    let pids = cgroup_dir(vmm, "pids");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    for d in [&cpu, &mem, &pids] {
        assert!(
            d.parent().and_then(|p| p.file_name()) == Some("vireo".as_ref()),
            "{} is not a vireo/NAME cgroup",
            d.display()
        );
    }
    if cpu.join("cpu.max").exists() {
        let max = read(cpu.join("cpu.max"));
        let (q, p) = max.split_once(' ').unwrap();
        (
            q.to_string(),
            p.to_string(),
            read(mem.join("memory.max")),
            read(pids.join("pids.max")),
        )
    } else {
        (
            read(cpu.join("cpu.cfs_quota_us")),
            read(cpu.join("cpu.cfs_period_us")),
            read(mem.join("memory.limit_in_bytes")),
            read(pids.join("pids.max")),
        )
    }
}

/// Where `vireo/NAME` of this process's `controller` hierarchy is.
pub fn cgroup_dir_of_name(controller: &str, name: &str) -> PathBuf {
    cgroup_dir(std::process::id(), controller)
        .join("vireo")
        .join(name)
}

/// The test's cgroups (a direct run leaves its empty cgroup; the next
/// direct run removes empty `run-*` ones, the daemon its VMs').
pub fn remove_cgroups(names: &[String]) {
    for n in names {
        for c in ["cpu", "memory", "pids"] {
            let _ = std::fs::remove_dir(cgroup_dir_of_name(c, n));
        }
    }
}
