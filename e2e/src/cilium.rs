//! Cilium as the nodes' dataplane on carve's blocks (`DATAPLANE=cilium`):
//! Cilium's own IPAM mode `kubernetes` reads the Node podCIDRs carve's
//! controller writes, its VXLAN tunnel joins the nodes, its eBPF kube-proxy
//! replacement serves Services (the nodes run no kube-proxy), and
//! carve-agent runs `ipam-only`.
//!
//! ```text
//!   control-plane-bins.sh --cilium ─▶ agent, cni, dbg, operator, bpf/, chart ─▶ cilium{,-operator}.tar
//!   Cluster::start(Dataplane::Cilium)   nodes with a bpffs and a cgroup2 subtree each, no kube-proxy
//!   deploy_carve_under_cilium(pool)     carve (ipam-only, the API server named directly), the pool,
//!                                       every Node's podCIDR, then `helm template` Cilium's chart
//!                                       with [`helm_values`] ─▶ kubectl apply ─▶ nodes Ready
//! ```
//!
//! Nothing imports [`crate::cluster`] here: the cluster calls in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::controlplane::ControlPlane;

/// Which dataplane wires the pods of a real-node cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dataplane {
    /// carve-cni and carve-agent's VXLAN, routes and SNAT; kube-proxy.
    #[default]
    Carve,
    /// Cilium on carve's podCIDRs, no kube-proxy (module docs).
    Cilium,
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dataplane::Carve => "carve",
            Dataplane::Cilium => "cilium",
        })
    }
}

impl std::str::FromStr for Dataplane {
    type Err = String;

    /// `carve` or `cilium` (as `make cluster-up DATAPLANE=` takes it).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "carve" => Ok(Dataplane::Carve),
            "cilium" => Ok(Dataplane::Cilium),
            other => Err(format!("unknown dataplane {other:?}: use carve or cilium")),
        }
    }
}

/// Cilium's chart values for this cluster, each with why. Every feature
/// turned off here is in the README (Cilium) with its reason.
pub fn helm_values(api_host: &str, api_port: u16) -> Vec<String> {
    let mut values: Vec<String> = [
        // No kube-proxy: Cilium serves Services and reaches the API server itself.
        "kubeProxyReplacement=true",
        // Cilium's own IPAM on the Node podCIDRs carve's controller writes.
        "ipam.mode=kubernetes",
        "routingMode=tunnel",
        // VXLAN: this kernel has no GENEVE.
        "tunnelProtocol=vxlan",
        // Every node shares this machine's cgroup2 hierarchy: socket LB would
        // attach to a root shared by all nodes (AKS runs without it too).
        "socketLB.enabled=false",
        // Each node's own cgroup2 subtree (e2e/scripts/node.sh) and bpffs.
        "cgroup.autoMount.enabled=false",
        "cgroup.hostRoot=/run/cilium/cgroupv2",
        "bpf.autoMount.enabled=false",
        // The sysctls are set by the agent on node-private files; no init step.
        "sysctlfix.enabled=false",
        // No L7 proxy (Envoy is not built here), no Hubble (not built here).
        "l7Proxy=false",
        "envoy.enabled=false",
        "hubble.enabled=false",
        "operator.replicas=1",
        // The images are imported into each node's containerd, never pulled.
        "image.useDigest=false",
        "image.pullPolicy=Never",
        "operator.image.useDigest=false",
        "operator.image.pullPolicy=Never",
        // The chart's capability lists include CAP_SYS_RESOURCE, which this
        // machine does not grant; privileged containers get what it has.
        "securityContext.privileged=true",
        // Health probes between nodes need cilium-health-responder (not imaged).
        "healthChecking=false",
        "endpointHealthChecking.enabled=false",
    ]
    .iter()
    .map(|v| v.to_string())
    .collect();
    values.push(format!("k8sServiceHost={api_host}"));
    values.push(format!("k8sServicePort={api_port}"));
    values
}

/// Builds Cilium (`control-plane-bins.sh --cilium`) and its two image archives into `out_dir`.
pub fn images(out_dir: &Path) -> Result<Vec<PathBuf>> {
    let bins = crate::controlplane::cilium_bins()?;
    let built = crate::image::build_cilium(out_dir, &bins)?;
    Ok(built.into_iter().map(|b| b.archive).collect())
}

/// Cilium's chart at the pinned version rendered with [`helm_values`], as
/// `helm template` does for users who apply the YAML.
pub fn render(api_host: &str, api_port: u16) -> Result<String> {
    let bins = crate::controlplane::cilium_bins()?;
    let mut cmd = Command::new(bins.join("helm"));
    cmd.args(["template", "cilium"]).arg(bins.join("cilium/chart"));
    cmd.args(["--namespace", "kube-system", "--kube-version", "1.35.4"]);
    for v in helm_values(api_host, api_port) {
        cmd.args(["--set", &v]);
    }
    let out = cmd.output().context("running helm template for Cilium's chart")?;
    ensure!(out.status.success(), "helm template cilium: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// Applies the rendered chart and waits until Cilium's agents run on every node.
pub fn install(cp: &ControlPlane, api_host: &str, api_port: u16) -> Result<()> {
    let yaml = render(api_host, api_port)?;
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml)?;
    ensure!(out.status.success(), "kubectl apply of Cilium: {}", String::from_utf8_lossy(&out.stderr));
    cp.kubectl_ok(&["-n", "kube-system", "rollout", "status", "daemonset/cilium", "--timeout=240s"]).with_context(
        || {
            let pods = cp.kubectl_ok(&["-n", "kube-system", "get", "pods", "-o", "wide"]).unwrap_or_default();
            let logs = cp
                .kubectl_ok(&[
                    "-n",
                    "kube-system",
                    "logs",
                    "-l",
                    "k8s-app=cilium",
                    "--all-containers",
                    "--tail=15",
                    "--prefix",
                ])
                .unwrap_or_else(|e| format!("{e:#}"));
            let events = cp
                .kubectl_ok(&["-n", "kube-system", "get", "events", "--field-selector", "type=Warning"])
                .unwrap_or_default();
            format!("Cilium's agents did not become Ready:\n{pods}\n{logs}\n{events}")
        },
    )?;
    Ok(())
}
