//! What every carve test tier shares and needs no carve crate for, so the
//! crates under test can depend on it without depending on each other:
//! network namespaces ([`netns`]), CNI plugin calls ([`cni`]), temp dirs,
//! the repository root, and the control plane binaries built at pinned
//! versions by `e2e/scripts/control-plane-bins.sh`.

pub mod cni;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};

/// A fresh directory `carve-<tag>-…` in the temp dir, removed when dropped (also on panic).
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("carve-{tag}-")).tempdir().expect("creating a temp dir")
}

/// The repository root (the workspace holding this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ lives in the repo root").to_path_buf()
}

/// The folder with etcd, kube-apiserver, kube-controller-manager, kubectl and
/// cnitool, built once by `e2e/scripts/control-plane-bins.sh` and cached.
/// `CARVE_CONTROL_PLANE_BIN` points at a prepared folder instead.
pub fn control_plane_bins() -> Result<PathBuf> {
    static BINS: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINS.get_or_init(|| bins_script(&[])).clone().map_err(|e| anyhow!(e))
}

/// [`control_plane_bins`] plus what the upstream sig-network suites need
/// (`control-plane-bins.sh --conformance`): e2e-network.test, ginkgo,
/// agnhost and coredns, in the same folder.
pub fn conformance_bins() -> Result<PathBuf> {
    static BINS: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINS.get_or_init(|| bins_script(&["--conformance"])).clone().map_err(|e| anyhow!(e))
}

/// [`control_plane_bins`] plus the policy engines
/// (`control-plane-bins.sh --policy`): azure-npm, linked in the same folder.
pub fn policy_bins() -> Result<PathBuf> {
    static BINS: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINS.get_or_init(|| bins_script(&["--policy"])).clone().map_err(|e| anyhow!(e))
}

/// [`control_plane_bins`] plus Cilium (`control-plane-bins.sh --cilium`):
/// its binaries, bpf/ sources and chart under `cilium/` in the same folder.
pub fn cilium_bins() -> Result<PathBuf> {
    static BINS: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINS.get_or_init(|| bins_script(&["--cilium"])).clone().map_err(|e| anyhow!(e))
}

fn bins_script(args: &[&str]) -> std::result::Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARVE_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("e2e/scripts/control-plane-bins.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({}); see its output above", script.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| format!("{} printed no bin dir", script.display()))
}

/// Checks `check` every 10 ms until it returns `Ok`, or panics after
/// `timeout` with `what` and the last state seen: the synchronous tests'
/// wait on an observable event instead of a sleep.
pub fn wait_until<T>(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}
