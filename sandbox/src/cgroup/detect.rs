//! Which cgroup layout the host has, read from /proc/self/mountinfo (the
//! cgroup mounts) and /proc/self/cgroup (where this process sits in each
//! hierarchy).

use std::path::{Path, PathBuf};

use super::{io, CgroupError, Layout, CONTROLLERS};

/// One mount of a cgroup file system from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    mount_point: PathBuf,
    v2: bool,
    /// v1: the controllers in the super options (`rw,cpu,cpuacct`).
    controllers: Vec<String>,
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let mount_point = PathBuf::from(unescape_mountinfo(left[4]));
        match right[0] {
            "cgroup2" => mounts.push(CgroupMount {
                mount_point,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => mounts.push(CgroupMount {
                mount_point,
                v2: false,
                controllers: right[2]
                    .split(',')
                    .filter(|o| CONTROLLERS.contains(o) || *o == "cpuacct" || *o == "cpuset")
                    .map(str::to_string)
                    .collect(),
            }),
            _ => {}
        }
    }
    mounts
}

/// The process's cgroup path per hierarchy, from /proc/self/cgroup:
/// `("", path)` for v2, `(controllers, path)` for v1.
fn own_cgroups(proc_cgroup: &str) -> Vec<(Vec<String>, String)> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            Some((
                ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

fn join_rel(base: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

/// Work out the layout from /proc/self/mountinfo, /proc/self/cgroup and a
/// reader of a v2 hierarchy's `cgroup.controllers`.
pub fn detect_from(
    mountinfo: &str,
    proc_cgroup: &str,
    read_controllers: &dyn Fn(&Path) -> Option<String>,
) -> Result<Layout, CgroupError> {
    let mounts = cgroup_mounts(mountinfo);
    let own = own_cgroups(proc_cgroup);
    if let Some(v2) = mounts.iter().find(|m| m.v2) {
        let rel = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        let base = join_rel(&v2.mount_point, rel);
        let available = read_controllers(&base)
            .or_else(|| read_controllers(&v2.mount_point))
            .unwrap_or_default();
        let have: Vec<&str> = available.split_whitespace().collect();
        if CONTROLLERS.iter().all(|c| have.contains(c)) {
            return Ok(Layout::V2 { base });
        }
    }
    let v1_dir = |ctrl: &str| -> Option<PathBuf> {
        let m = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))?;
        let rel = own
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == ctrl))
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        Some(join_rel(&m.mount_point, rel))
    };
    match (v1_dir("cpu"), v1_dir("memory"), v1_dir("pids")) {
        (Some(cpu), Some(memory), Some(pids)) => Ok(Layout::V1 { cpu, memory, pids }),
        (cpu, memory, pids) => {
            let missing: Vec<&str> = [("cpu", cpu), ("memory", memory), ("pids", pids)]
                .into_iter()
                .filter(|(_, d)| d.is_none())
                .map(|(c, _)| c)
                .collect();
            Err(CgroupError::NoHierarchy(format!(
                "the cgroup v2 hierarchy {} and no v1 hierarchy has the {} controller(s) — \
                 enable cpu, memory and pids for cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount them as v1",
                match mounts.iter().find(|m| m.v2) {
                    Some(m) => format!("at {} lacks cpu, memory or pids", m.mount_point.display()),
                    None => "is not mounted".to_string(),
                },
                missing.join(", ")
            )))
        }
    }
}

/// The host's layout, for this process.
pub fn detect() -> Result<Layout, CgroupError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io(Path::new("/proc/self/mountinfo")))?;
    let cgroup =
        std::fs::read_to_string("/proc/self/cgroup").map_err(io(Path::new("/proc/self/cgroup")))?;
    detect_from(&mountinfo, &cgroup, &|dir| {
        std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CgroupName, CpuQuota, Limits};

    /// This machine's layout: an empty unified hierarchy, and cpu, memory,
    /// pids as v1 mounts.
    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:7 - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
8:pids:/
4:memory:/process_api/de34
1:cpu,cpuacct:/
0::/
";
    const MOUNTINFO_V2: &str = "\
25 23 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    fn controllers(list: &'static str) -> impl Fn(&Path) -> Option<String> {
        move |_| Some(list.to_string())
    }

    fn name() -> CgroupName {
        CgroupName::new("web-1").unwrap()
    }

    #[test]
    fn v1_when_the_unified_hierarchy_has_no_controllers() {
        let layout = detect_from(MOUNTINFO_V1, CGROUP_V1, &controllers("")).unwrap();
        assert_eq!(
            layout,
            Layout::V1 {
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                memory: "/sys/fs/cgroup/memory/process_api/de34".into(),
                pids: "/sys/fs/cgroup/pids".into(),
            }
        );
        assert_eq!(
            layout.dirs(&name()),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/vireo/web-1"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api/de34/vireo/web-1"),
                PathBuf::from("/sys/fs/cgroup/pids/vireo/web-1"),
            ]
        );
        let limits = Limits {
            cpu: Some(CpuQuota::cpus(2)),
            memory_bytes: Some(300 << 20),
            pids: Some(64),
        };
        assert_eq!(
            layout.limit_writes(&name(), &limits),
            vec![
                (
                    "/sys/fs/cgroup/cpu,cpuacct/vireo/web-1/cpu.cfs_period_us".into(),
                    "100000".to_string()
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct/vireo/web-1/cpu.cfs_quota_us".into(),
                    "200000".to_string()
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/de34/vireo/web-1/memory.limit_in_bytes"
                        .into(),
                    (300u64 << 20).to_string()
                ),
                (
                    "/sys/fs/cgroup/pids/vireo/web-1/pids.max".into(),
                    "64".to_string()
                ),
            ]
        );
    }

    #[test]
    fn v2_when_it_has_the_controllers() {
        let cg = "0::/system.slice/vireo.service/daemon\n";
        let layout =
            detect_from(MOUNTINFO_V2, cg, &controllers("cpuset cpu io memory pids")).unwrap();
        assert_eq!(
            layout,
            Layout::V2 {
                base: "/sys/fs/cgroup/system.slice/vireo.service/daemon".into()
            }
        );
        let limits = Limits {
            cpu: Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000,
            }),
            memory_bytes: Some(1 << 30),
            pids: None,
        };
        let d = PathBuf::from("/sys/fs/cgroup/system.slice/vireo.service/daemon/vireo/web-1");
        assert_eq!(
            layout.limit_writes(&name(), &limits),
            vec![
                (d.join("cpu.max"), "50000 100000".to_string()),
                (d.join("memory.max"), (1u64 << 30).to_string()),
            ]
        );
        assert_eq!(layout.dirs(&name()), vec![d]);
    }

    #[test]
    fn v2_without_memory_and_no_v1_is_a_clear_error() {
        let err = detect_from(MOUNTINFO_V2, "0::/\n", &controllers("cpu pids")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("memory"), "{msg}");
        assert!(msg.contains("/sys/fs/cgroup"), "{msg}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let mi = "41 31 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        let m = cgroup_mounts(mi);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
    }
}
