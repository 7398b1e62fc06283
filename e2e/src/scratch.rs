//! What the harness leaves on disk and in the kernel, and how a later
//! process cleans up after one that died (kill -9, Ctrl-C): the per-run
//! directories under [`scratch_root`], and for real-node clusters the
//! [`Record`] of their cgroups and network namespaces.
//!
//! ```text
//!   <scratch_root>/<run>/owner.pid      the harness process that owns it
//!   <scratch_root>/cl-<id>/cluster.json  cgroups + netns a cluster made (Record)
//!   sweep_stale_dirs()      every run dir whose owner is dead
//!   sweep_stale_clusters()  the cl-* ones: processes, cgroups, netns, then the dir
//! ```
//!
//! It depends on nothing else in the crate but [`crate::netns`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::netns::run;

/// Where the harness puts its per-run directories.
pub fn scratch_root() -> PathBuf {
    std::env::var_os("CARVE_E2E_TMP").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("carve-e2e"))
}

fn pid_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Removes run directories left by harness processes that died without
/// cleaning up (kill -9, Ctrl-C). Their children already died with them.
pub fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(scratch_root()) else { return };
    for entry in entries.flatten() {
        let owner =
            std::fs::read_to_string(entry.path().join("owner.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok());
        match owner {
            Some(pid) if pid_alive(pid) => {}
            // No pid file yet means another process is creating it right now,
            // unless the directory is old.
            None if entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60))
                .unwrap_or(true) => {}
            // A real-node cluster leaves processes, cgroups and namespaces too.
            _ if entry.path().join("cluster.json").exists() => reap_cluster_dir(&entry.path()),
            _ => {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// What a cluster created, for cleanup by a later process when this one is killed.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct Record {
    pub(crate) netns: Vec<String>,
    pub(crate) cgroups: Vec<String>,
}

/// The cgroup hierarchies mounted here: the v1 ones, plus the unified (v2)
/// one when `unified` (nodes join only v1, but runc also makes cgroups in
/// the unified hierarchy, which teardown must remove).
pub(crate) fn hierarchies(unified: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    let mut all: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && (unified || !p.ends_with("unified")))
        .collect();
    all.sort();
    all
}

/// `/<cgroup>/node` in every hierarchy; cpuset needs its cpus and mems set
/// before a process may join.
pub(crate) fn make_cgroup(cgroup: &str) -> Result<()> {
    for h in hierarchies(false) {
        let node = h.join(cgroup).join("node");
        std::fs::create_dir_all(&node).with_context(|| format!("create cgroup {}", node.display()))?;
        if h.ends_with("cpuset") {
            for dir in [h.join(cgroup), node] {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.join(f))?;
                    std::fs::write(dir.join(f), v.trim())?;
                }
            }
        }
    }
    Ok(())
}

/// Every pid in `dir` and its descendants.
fn cgroup_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Kills every process in `cgroup` (any hierarchy), then removes it.
pub(crate) fn reap_cgroup(cgroup: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pids = Vec::new();
        for h in hierarchies(true) {
            cgroup_pids(&h.join(cgroup), &mut pids);
        }
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} in cgroup {cgroup} survived SIGKILL for 20s");
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = Ok(());
    for h in hierarchies(true) {
        // A cgroup whose last task just died can answer EBUSY for a moment.
        for attempt in 0..50 {
            match remove_cgroup_tree(&h.join(cgroup)) {
                Ok(()) => break,
                Err(e) if attempt == 49 => {
                    last = Err(e).with_context(|| format!("remove cgroup {cgroup} in {}", h.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    last
}

/// Cleans up after clusters whose harness died without tearing down (kill -9,
/// a crashed `carve-cluster run`): their processes, cgroups and namespaces.
pub fn sweep_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(scratch_root()) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cl-")) || owner_alive(&dir) {
            continue;
        }
        reap_cluster_dir(&dir);
    }
}

/// Whether the process that made `dir` is still running.
pub(crate) fn owner_alive(dir: &Path) -> bool {
    let pid = std::fs::read_to_string(dir.join("owner.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok());
    match pid {
        Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
        // Being created right now, unless it is old.
        None => dir
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60))
            .unwrap_or(false),
    }
}

/// Everything a dead cluster recorded: cgroups (and their processes), network
/// namespaces, then its directory.
pub(crate) fn reap_cluster_dir(dir: &Path) {
    let record: Record =
        std::fs::read(dir.join("cluster.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for cg in &record.cgroups {
        if let Err(e) = reap_cgroup(cg) {
            eprintln!("carve-e2e: sweeping {}: {e:#}", dir.display());
        }
    }
    for ns in &record.netns {
        let _ = run("ip", &["netns", "del", ns]);
    }
    let _ = std::fs::remove_dir_all(dir);
}
