//! cgroup limits for a VM process, on cgroup v2 or — where the unified
//! hierarchy has no controllers and cpu, memory and pids are mounted as v1
//! hierarchies — on v1, as Firecracker's jailer supports both.
//!
//! A VM's cgroup is `vireo/NAME` beneath the cgroup the starting process is
//! in (per hierarchy), so a limit already put on the daemon (a systemd
//! service, a container) still covers its VMs; a process in the root cgroup
//! gets `/sys/fs/cgroup[/CTRL]/vireo/NAME`.

use std::path::{Path, PathBuf};

/// The controllers a VM's limits need.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The directory (beneath the starting process's cgroup) holding VMs' cgroups.
pub const PARENT: &str = "vireo";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("cgroup name {0:?}: use letters, digits, '-', '_' and '.' (not starting with '.'), at most 128")]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A VM's cgroup name: one path component, so it cannot climb out of
/// `vireo/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupName(String);

impl CgroupName {
    pub fn new(name: &str) -> Result<CgroupName, CgroupError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(CgroupName(name.to_string()))
        } else {
            Err(CgroupError::BadName(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A CPU bandwidth limit: `quota_us` of CPU time every `period_us`
/// (200_000 / 100_000 is two CPUs' worth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuQuota {
    /// `cpus` whole CPUs over the kernel's default period (100 ms).
    pub fn cpus(cpus: u32) -> CpuQuota {
        CpuQuota {
            quota_us: u64::from(cpus.max(1)) * 100_000,
            period_us: 100_000,
        }
    }
}

/// What a VM's cgroup limits; `None` leaves that limit unset ("max").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu: Option<CpuQuota>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Which cgroup layout the host has, with the directory each VM cgroup's
/// parent (`.../vireo`) lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy with cpu, memory and pids: one directory.
    V2 { base: PathBuf },
    /// One v1 hierarchy per controller (the same path twice when two
    /// controllers share a mount, e.g. `cpu,cpuacct`).
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
}

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

impl Layout {
    pub fn version(&self) -> u8 {
        match self {
            Layout::V2 { .. } => 2,
            Layout::V1 { .. } => 1,
        }
    }

    /// The `vireo` directories (one per distinct hierarchy).
    pub fn parents(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = match self {
            Layout::V2 { base } => vec![base.join(PARENT)],
            Layout::V1 { cpu, memory, pids } => [cpu, memory, pids]
                .into_iter()
                .map(|d| d.join(PARENT))
                .collect(),
        };
        out.dedup();
        out
    }

    /// A VM's cgroup directories (one per distinct hierarchy).
    pub fn dirs(&self, name: &CgroupName) -> Vec<PathBuf> {
        self.parents()
            .into_iter()
            .map(|p| p.join(&name.0))
            .collect()
    }

    /// The files to write, in order, to set `limits` on `name`'s cgroup.
    pub fn limit_writes(&self, name: &CgroupName, limits: &Limits) -> Vec<(PathBuf, String)> {
        let mut w = Vec::new();
        match self {
            Layout::V2 { base } => {
                let dir = base.join(PARENT).join(&name.0);
                if let Some(q) = limits.cpu {
                    w.push((
                        dir.join("cpu.max"),
                        format!("{} {}", q.quota_us, q.period_us),
                    ));
                }
                if let Some(m) = limits.memory_bytes {
                    w.push((dir.join("memory.max"), m.to_string()));
                }
                if let Some(p) = limits.pids {
                    w.push((dir.join("pids.max"), p.to_string()));
                }
            }
            Layout::V1 { cpu, memory, pids } => {
                if let Some(q) = limits.cpu {
                    let dir = cpu.join(PARENT).join(&name.0);
                    // The period first: a quota above the old period's
                    // bounds is refused otherwise.
                    w.push((dir.join("cpu.cfs_period_us"), q.period_us.to_string()));
                    w.push((dir.join("cpu.cfs_quota_us"), q.quota_us.to_string()));
                }
                if let Some(m) = limits.memory_bytes {
                    let dir = memory.join(PARENT).join(&name.0);
                    w.push((dir.join("memory.limit_in_bytes"), m.to_string()));
                }
                if let Some(p) = limits.pids {
                    let dir = pids.join(PARENT).join(&name.0);
                    w.push((dir.join("pids.max"), p.to_string()));
                }
            }
        }
        w
    }

    /// Create `name`'s cgroup with `limits`. An empty leftover of the same
    /// name is reused (its limits rewritten).
    pub fn create(&self, name: &CgroupName, limits: &Limits) -> Result<Cgroup, CgroupError> {
        if let Layout::V2 { base } = self {
            // Controllers reach a child only through its parent's
            // subtree_control, at every level below `base`.
            let parent = base.join(PARENT);
            std::fs::create_dir_all(&parent).map_err(io(&parent))?;
            for dir in [base.as_path(), parent.as_path()] {
                let file = dir.join("cgroup.subtree_control");
                let current = std::fs::read_to_string(&file).unwrap_or_default();
                for c in CONTROLLERS {
                    if !current.split_whitespace().any(|x| x == c) {
                        std::fs::write(&file, format!("+{c}")).map_err(|e| {
                            CgroupError::NoHierarchy(format!(
                                "cannot enable the {c} controller in {}: {e} (a cgroup v2 directory with processes \
                                 cannot delegate controllers; start vireo in a leaf cgroup of its own, e.g. systemd's Delegate=yes)",
                                file.display()
                            ))
                        })?;
                    }
                }
            }
        }
        let dirs = self.dirs(name);
        for d in &dirs {
            match std::fs::create_dir_all(d) {
                Ok(()) => {}
                Err(e) => return Err(io(d)(e)),
            }
        }
        for (file, value) in self.limit_writes(name, limits) {
            std::fs::write(&file, &value).map_err(io(&file))?;
        }
        Ok(Cgroup { dirs })
    }

    /// Remove `name`'s cgroup (after its processes ended). A missing one is
    /// fine; one still holding processes is left (EBUSY) and reported.
    pub fn remove(&self, name: &CgroupName) -> Result<(), CgroupError> {
        for d in self.dirs(name) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&d)(e)),
            }
        }
        Ok(())
    }
}

/// A VM's cgroup, created.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Move process `pid` (0: this one) into the cgroup, every hierarchy.
    pub fn join(&self, pid: u32) -> Result<(), CgroupError> {
        let pid = if pid == 0 { std::process::id() } else { pid };
        for d in &self.dirs {
            let procs = d.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(io(&procs))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn names_cannot_climb_out() {
        for bad in ["", "..", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(CgroupName::new(bad).is_err(), "{bad:?}");
        }
        assert!(CgroupName::new("vm_1.test-2").is_ok());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let mi = "41 31 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        let m = cgroup_mounts(mi);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
    }
}
