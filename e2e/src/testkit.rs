//! The helpers every crate's tests share (node-plugin's too, as a
//! dev-dependency): temp dirs, the workspace's own binaries, polling, and
//! small object builders; network namespaces are in [`crate::netns`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use kube::api::ObjectMeta;

use crate::ControlPlane;

/// Waits up to `timeout` until NodeNetworkConfig `name` satisfies `ok`, and returns it.
pub async fn nnc_where(
    client: &kube::Client,
    name: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&carve_crds::NodeNetworkConfig) -> bool,
) -> carve_crds::NodeNetworkConfig {
    let api = kube::Api::<carve_crds::NodeNetworkConfig>::all(client.clone());
    wait_for(&format!("nnc/{name}: {what}"), timeout, || async {
        match api.get_opt(name).await {
            Ok(Some(n)) if ok(&n) => Ok(n),
            Ok(Some(n)) => Err(format!("{:?}", n.status)),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Every Event (events.k8s.io) about the object `kind`/`name`: (reason, note).
pub async fn events_for(client: &kube::Client, kind: &str, name: &str) -> Vec<(String, String)> {
    let api = kube::Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    let events = api.list(&Default::default()).await.expect("list Events");
    events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

pub use carve_testkit::temp_dir;

pub use crate::wait::{poll, wait_for};

/// Newest modification time of the files under `dir` (recursively).
fn newest_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() { newest_mtime(&path) } else { entry.metadata().and_then(|m| m.modified()).ok() };
        newest = newest.max(t);
    }
    newest
}

/// Drops the variables cargo sets for a running test (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, …) from `cmd`. A cargo started with them set sees
/// build scripts that watch them (ring's, through `rerun-if-env-changed`) as
/// dirty and rebuilds everything above them, here and on the next plain build.
pub fn without_test_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"]
                .contains(&k.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// A binary of this workspace (e.g. `carve-controller`) in the same target
/// folder as the running test. `cargo test --workspace` builds it already;
/// when it is missing or older than its package's sources (a test run on its
/// own after an edit), it is built here, so a test never runs a stale binary.
pub fn workspace_bin(package: &str, name: &str) -> Result<PathBuf> {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> (a
    // benchmark binary) → target/<profile>/<name>
    let mut profile_dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join(name);
    let mut built = BUILT.lock().expect("build lock");
    let package_dir = crate::repo_root().join(package.trim_start_matches("carve-"));
    let built_at = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let stale = match (built_at, newest_mtime(&package_dir), newest_mtime(&crate::repo_root().join("crds/src"))) {
        (Some(b), src, crds) => src.max(crds).is_some_and(|s| s > b),
        (None, _, _) => true,
    };
    if stale && !built.contains(name) {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        without_test_env(&mut cmd);
        cmd.args(["build", "-q", "-p", package, "--bin", name]).current_dir(crate::repo_root());
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            bail!("cargo build -p {package} --bin {name} failed");
        }
        built.insert(name.to_string());
    }
    Ok(bin)
}

/// A VNet pool on a subnet of its own (the real nodes are on 10.224.0.0/24),
/// in /26 blocks: pods routed natively, no overlay.
pub const VNET_POD_POOL: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: vnet-pods}
spec:
  mode: VNet
  cidrs: [10.10.0.0/16]
  blockSize: {ipv4: 26}
";

/// The sum of `metric`'s samples on the /metrics page a carve process serves at `addr`.
pub async fn metric_sum(addr: &str, metric: &str) -> Result<f64> {
    let all = crate::bench::metrics::parse(&crate::bench::metrics::http_get(addr, "/metrics").await?)?;
    Ok(crate::bench::metrics::samples(&all, metric).iter().map(|(_, v)| v).sum())
}

/// Waits until the counter `metric` at `addr` has grown by `passes` from now:
/// that many more passes of the loop it counts ran. What a "nothing changed"
/// assertion waits on instead of a sleep.
pub async fn wait_for_passes(what: &str, addr: &str, metric: &str, passes: f64) {
    let from = metric_sum(addr, metric).await.unwrap_or_else(|e| panic!("{metric} at {addr}: {e:#}"));
    wait_for(what, Duration::from_secs(60), || async {
        let now = metric_sum(addr, metric).await.map_err(|e| format!("{e:#}"))?;
        if now >= from + passes { Ok(()) } else { Err(format!("{metric} {from} -> {now}")) }
    })
    .await
}

/// A Node object as a kubelet would register it, with an InternalIP.
pub fn node(name: &str, internal_ip: &str) -> Node {
    Node {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: internal_ip.into() }]),
            ..Default::default()
        }),
    }
}

/// carve-agent for a simulated node: its dataplane in the network namespace
/// `netns`, its state file (`dir/node-state.json`) and CNI dirs (`dir/bin`,
/// `dir/net.d`) under `dir`, carve-cni and carve-ipam copied from `source`.
/// Callers add flags; a later `.env` overrides the log level.
pub fn node_agent(agent: &Path, kubeconfig: &Path, node: &str, netns: &Path, dir: &Path, source: &Path) -> Command {
    let mut cmd = Command::new(agent);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .env("NODE_NAME", node)
        .env_remove("CARVE_STATE_FILE")
        .arg("--netns")
        .arg(netns)
        .arg("--state-file")
        .arg(dir.join("node-state.json"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-source-dir")
        .arg(source)
        .env("CARVE_LOG_LEVEL", "info,kube_runtime=warn");
    cmd
}

/// A carve-controller process against `cp`, supervised by the harness under `name`.
pub struct ControllerProcess {
    pub name: String,
    pub pid: u32,
}

/// Starts carve-controller with `extra` flags; leader election uses the
/// `default` namespace unless `extra` says otherwise.
pub fn start_controller(cp: &ControlPlane, name: &str, extra: &[&str]) -> Result<ControllerProcess> {
    let mut cmd = Command::new(workspace_bin("carve-controller", "carve-controller")?);
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--metrics-addr", "127.0.0.1:0", "--leader-election-namespace", "default", "--identity", name])
        .args(["--sweep-interval", "500ms"])
        .args(extra)
        .env("CARVE_LOG_LEVEL", "info,kube_runtime=warn");
    let pid = cp.spawn(name, cmd)?;
    Ok(ControllerProcess { name: name.into(), pid })
}

/// The metrics address a controller logged, once it is serving.
pub async fn metrics_addr(cp: &ControlPlane, name: &str) -> String {
    wait_for("the controller's metrics address", Duration::from_secs(30), || async {
        let log = cp.log_tail(name, 200);
        log.lines()
            .find(|l| l.contains("serving /metrics"))
            .and_then(|l| {
                // text: `addr=127.0.0.1:1234`; json: `"addr":"127.0.0.1:1234"`
                let rest = l.split("addr=").nth(1).or_else(|| l.split("\"addr\":\"").nth(1))?;
                rest.split(|c: char| c.is_whitespace() || c == '"').next().map(str::to_string)
            })
            .ok_or(log)
    })
    .await
}

/// The images real nodes import (carve's, pause, busybox), built from this
/// test profile's binaries with their debug info stripped (the archive stays
/// small), into `target/<profile>/carve-images/`. Built once per test process.
pub fn node_images() -> Result<Vec<PathBuf>> {
    static IMAGES: std::sync::OnceLock<std::result::Result<Vec<PathBuf>, String>> = std::sync::OnceLock::new();
    IMAGES.get_or_init(|| build_node_images().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow::anyhow!(e))
}

/// [`node_images`] and the upstream suites' images
/// ([`crate::image::build_conformance`], from [`crate::controlplane::conformance_bins`]),
/// next to them in `carve-images/conformance/`.
pub fn conformance_images() -> Result<Vec<PathBuf>> {
    let mut images = node_images()?;
    let out = images[0].parent().expect("an archive has a folder").join("conformance");
    let built = crate::image::build_conformance(&out, &crate::controlplane::conformance_bins()?)?;
    images.extend(built.into_iter().map(|b| b.archive));
    Ok(images)
}

fn build_node_images() -> Result<Vec<PathBuf>> {
    use crate::image::{self, CARVE_BINARIES};
    let mut profile_dir = None;
    for bin in CARVE_BINARIES {
        let package =
            if bin == "carve-controller" || bin == "carvectl" { "carve-controller" } else { "carve-node-plugin" };
        let path = workspace_bin(package, bin)?;
        profile_dir = path.parent().map(Path::to_path_buf);
    }
    let profile_dir = profile_dir.expect("carve has binaries");
    let out = profile_dir.join("carve-images");
    let stripped = out.join("bin");
    std::fs::create_dir_all(&stripped)?;
    // Test processes build at once (a test and the helper process it runs):
    // one at a time, or one reads a binary the other is rewriting.
    let lock = std::fs::File::create(out.join(".lock"))?;
    lock.lock()?;
    for bin in CARVE_BINARIES {
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(stripped.join(bin))
            .arg(profile_dir.join(bin))
            .status()?;
        if !status.success() {
            bail!("strip {bin} failed");
        }
    }
    let mut inputs = image::Inputs::release(&image::default_tag())?;
    inputs.bin_dir = stripped;
    let built = image::build_all(&out, &inputs)?;
    Ok(built.all().iter().map(|b| b.archive.clone()).collect())
}
