//! CPU time and memory of processes, from /proc.

use std::process::Command;

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, normally 100).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Pids of every process whose command name (`/proc/<pid>/comm`) is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// utime + stime of a process, in clock ticks. `pid` "self" is this process.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// Parses fields 14 (utime) and 15 (stime) of /proc/<pid>/stat. The command name (field 2) is in
/// parentheses and may contain spaces, so fields are counted after the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11, stime index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// What a process asked of the kernel, counted by it: context switches of all its live threads
/// (voluntary: it waited, for a socket or a lock or a timer; involuntary: it was preempted) and
/// read- and write-type system calls (`syscr` + `syscw` of `/proc/<pid>/io`: `read`, `readv`,
/// `write`, `writev`…, which is how tokio moves socket bytes; not `epoll_wait`, `futex` or
/// `sendmsg`). Unlike CPU seconds they hardly depend on the machine's speed (they do on the load:
/// compare them at one rate): a wake-up or a hop added to the request path shows in them on any
/// machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub switches: u64,
    pub io_calls: u64,
}

/// The [`KernelCounts`] of process `pid` ("self" is this process). Threads that ended take their
/// switches with them (tokio's blocking threads, idle for 10 s): per-request figures read over a
/// run of seconds are not affected by a few of them.
pub fn kernel_counts(pid: &str) -> Option<KernelCounts> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            switches += parse_switches(&status);
        }
    }
    Some(KernelCounts {
        switches,
        io_calls: parse_io_calls(&io)?,
    })
}

/// voluntary + nonvoluntary context switches of one thread's `status`.
pub fn parse_switches(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// `syscr` + `syscw` of a process's `io`.
pub fn parse_io_calls(io: &str) -> Option<u64> {
    let field = |name: &str| {
        io.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

/// The machine's (total, idle) CPU time from the first line of /proc/stat, in clock ticks (idle
/// includes iowait).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_ticks(stat.lines().next()?)
}

/// Parses the `cpu  user nice system idle iowait irq softirq steal …` line.
pub fn parse_machine_ticks(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((values.iter().sum(), idle))
}

/// (VmHWM, VmRSS) in kB.
pub fn memory_kb(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Machine description for the report.
pub fn machine_info() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "mem_total_mb": mem_total_kb / 1024,
        "git_commit": commit,
        "git_dirty": dirty,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn machine_ticks_are_the_sum_and_idle_plus_iowait() {
        let line = "cpu  100 5 50 1000 20 3 7 0 0 0";
        assert_eq!(parse_machine_ticks(line), Some((1185, 1020)));
        assert_eq!(parse_machine_ticks("cpu0 1 2 3 4"), None);
        assert_eq!(parse_machine_ticks("cpu  1 x 3 4"), None);
    }

    #[test]
    fn finds_this_process_by_its_command_name() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let pids = pids_named(comm.trim());
        assert!(pids.contains(&std::process::id()), "{pids:?}");
        assert!(pids_named("no-such-process-name").is_empty());
    }

    #[test]
    fn parses_utime_and_stime_after_a_name_with_spaces() {
        let stat =
            "1234 (tokio worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(290));
        assert!(cpu_ticks("self").is_some());
        assert!(memory_kb("self").is_some());
    }

    #[test]
    fn kernel_counts_sum_both_switch_kinds_and_both_call_kinds() {
        let status =
            "Name:\tgateway\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), 127);
        assert_eq!(parse_switches("Name:\tx\n"), 0);
        let io = "rchar: 6976\nwchar: 10\nsyscr: 12\nsyscw: 3\nread_bytes: 0\n";
        assert_eq!(parse_io_calls(io), Some(15));
        assert_eq!(parse_io_calls("rchar: 1\n"), None);
        // This process: reading a file is a read call (so is reading the counts themselves);
        // switches only ever add up.
        let before = kernel_counts("self").unwrap();
        let _ = std::fs::read_to_string("/proc/self/status").unwrap();
        let after = kernel_counts("self").unwrap();
        assert!(after.io_calls > before.io_calls, "{before:?} {after:?}");
        assert!(after.switches >= before.switches, "{before:?} {after:?}");
    }
}
