//! cgroup limits for a VM process, on cgroup v2 or — where the unified
//! hierarchy has no controllers and cpu, memory and pids are mounted as v1
//! hierarchies — on v1, as Firecracker's jailer supports both.
//!
//! A VM's cgroup is `vireo/NAME` beneath the cgroup the starting process is
//! in (per hierarchy), so a limit already put on the daemon (a systemd
//! service, a container) still covers its VMs; a process in the root cgroup
//! gets `/sys/fs/cgroup[/CTRL]/vireo/NAME`.
//!
//! Which layout the host has is read in `detect.rs`; this file holds a
//! VM's cgroup on that layout: its name, its limits, creating, joining and
//! removing it.

use std::path::{Path, PathBuf};

mod detect;

pub use detect::{detect, detect_from};

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

    #[test]
    fn names_cannot_climb_out() {
        for bad in ["", "..", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(CgroupName::new(bad).is_err(), "{bad:?}");
        }
        assert!(CgroupName::new("vm_1.test-2").is_ok());
    }
}
