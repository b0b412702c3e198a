//! What the daemon reads from /proc about VM processes: whether a pid is
//! still the process it started (pid plus start time, so a reused pid is
//! never mistaken for a VM), and its CPU time and resident memory for the
//! stats.

use std::path::Path;

/// The start time of process `pid` in clock ticks since boot (field 22 of
/// /proc/PID/stat), or None when there is no such process (or it is a zombie
/// that already exited).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 (`starttime`) of a /proc/PID/stat line; None for zombies.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: the fields after it start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state).
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// True while `pid` is the process that started at `start` (same start time).
pub fn is_same_process(pid: i32, start: u64) -> bool {
    pid > 0 && start_time(pid) == Some(start)
}

/// The process that runs the VM of process `pid`: a jailed VM's
/// `vireo run` is a supervisor whose one child is the VMM (PID 1 of the
/// jail's PID namespace); an unjailed one has no child and is the VMM.
pub fn vmm_pid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// True if `path` is a FIFO or pipe we may open (used to re-attach to an
/// adopted VM's console through /proc/PID/fd/1).
pub fn is_pipe(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

/// What /proc tells about a VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// CPU time (utime + stime, fields 14 and 15 of /proc/PID/stat) in clock
/// ticks.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3; utime is field 14.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of /proc/PID/status, in bytes.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_ascii_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// CPU time and RSS of process `pid`, if it is still there.
pub fn process_stats(pid: i32) -> Option<ProcessStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(ProcessStats {
        cpu_seconds: parse_cpu_ticks(&stat)? as f64 / hz,
        rss_bytes: parse_rss_bytes(&status).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(line), Some(987654));
        let zombie = "1234 (x) Z 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_start_time(zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn this_process_is_itself() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(is_same_process(me, start));
        assert!(!is_same_process(me, start + 1));
        assert!(!is_same_process(0, start));
    }

    #[test]
    fn the_vmm_is_the_only_child_or_the_process_itself() {
        // A shell waiting for its one child, as a supervisor does.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .unwrap();
        let pid = sh.id() as i32;
        let start = std::time::Instant::now();
        while vmm_pid(pid) == pid && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let child = vmm_pid(pid);
        assert_ne!(child, pid);
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap();
        let ppid: i32 = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, pid);
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child, libc::SIGKILL) };
        sh.wait().unwrap();
        // A process without children is its own VMM.
        assert_eq!(vmm_pid(child), child);
    }

    #[test]
    fn proc_fields_parse() {
        // utime 5, stime 6 (fields 14 and 15).
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_cpu_ticks(line), Some(11));
        assert_eq!(parse_cpu_ticks("nonsense"), None);
        let status = "Name:\tvireo\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(parse_rss_bytes(status), Some(2048 * 1024));
        assert_eq!(parse_rss_bytes("Name: x\n"), None);
        let me = process_stats(std::process::id() as i32).expect("own stats");
        assert!(me.rss_bytes > 0);
    }
}
