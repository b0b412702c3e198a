//! What the daemon reads from /proc about VM processes: whether a pid is
//! still the process it started (pid plus start time, so a reused pid is
//! never mistaken for a VM) and the host's memory size.

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

/// The host's RAM in MiB (MemTotal), if /proc/meminfo says.
pub fn host_memory_mib() -> Option<u64> {
    vireo_hypervisor::host::host_memory_bytes().map(|b| b >> 20)
}

/// True if `path` is a FIFO or pipe we may open (used to re-attach to an
/// adopted VM's console through /proc/PID/fd/1).
pub fn is_pipe(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
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
}
