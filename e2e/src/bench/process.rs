//! CPU, memory and descriptor figures of processes, read through `procfs`.

use std::collections::BTreeMap;

use procfs::process::Process;
use procfs::{CurrentSI, KernelStats};

fn secs(ticks: u64) -> f64 {
    ticks as f64 / procfs::ticks_per_second() as f64
}

/// A `/proc/<pid>/status` memory field in MiB: `VmHWM:` (peak RSS) or `VmRSS:` (now).
pub fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = Process::new(pid as i32).ok()?.status().ok()?;
    let kib = match field {
        "VmHWM:" => status.vmhwm,
        "VmRSS:" => status.vmrss,
        _ => None,
    }?;
    Some(kib as f64 / 1024.0)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_secs(process: &Process) -> Option<f64> {
    let stat = process.stat().ok()?;
    Some(secs(stat.utime + stat.stime))
}

/// CPU seconds the whole machine spent busy (all cores): everything but idle and iowait.
pub fn machine_busy_secs() -> f64 {
    let Ok(stats) = KernelStats::current() else { return 0.0 };
    let t = stats.total;
    let busy = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
    secs(busy)
}

/// CPU seconds of this process ("bench") and of each of its children (etcd,
/// kube-apiserver, the contender), by name.
pub fn cpu_snapshot() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let me = Process::myself().ok();
    out.insert("bench".to_string(), me.as_ref().and_then(cpu_secs).unwrap_or_default());
    let me = std::process::id() as i32;
    for process in procfs::process::all_processes().into_iter().flatten().flatten() {
        let Ok(stat) = process.stat() else { continue };
        if stat.ppid != me {
            continue;
        }
        // comm is cut at 15 characters.
        let name = match stat.comm.as_str() {
            "carve-controlle" => "carve-controller".to_string(),
            "kube-controller" => "kube-controller-manager".to_string(),
            other => other.to_string(),
        };
        *out.entry(name).or_default() += secs(stat.utime + stat.stime);
    }
    out
}

/// Open file descriptors of `pid` (mostly API connections for a controller).
pub fn fd_count(pid: u32) -> Option<usize> {
    Process::new(pid as i32).ok()?.fd_count().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_cpu_and_descriptors() {
        let pid = std::process::id();
        let busy: u64 = (0..2_000_000u64).fold(0, |a, b| a.wrapping_add(b * b));
        assert!(busy > 0);
        assert!(proc_status_mib(pid, "VmHWM:").is_some_and(|m| m > 0.0));
        assert!(proc_status_mib(pid, "VmRSS:").is_some_and(|m| m > 0.0));
        assert!(fd_count(pid).is_some_and(|n| n >= 3), "stdin, stdout, stderr");
        assert!(cpu_snapshot()["bench"] >= 0.0);
        assert!(machine_busy_secs() > 0.0);
    }
}
