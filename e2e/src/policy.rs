//! NetworkPolicy engines beside carve, as AKS pairs them with Azure CNI
//! (`--network-policy azure`): built here from their releases, imaged like
//! carve ([`crate::image::build_policy`]), deployed from their manifest in
//! `e2e/policy/`.
//!
//! ```text
//!   control-plane-bins.sh --policy ──▶ azure-npm ──▶ azure-npm.tar (every node imports it)
//!   Cluster::start(policy) ──▶ kubectl apply e2e/policy/azure-npm.yaml ──▶ DaemonSet Ready
//! ```
//!
//! Nothing imports [`crate::cluster`] here: the cluster calls in.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};

use crate::controlplane::ControlPlane;

/// A policy engine the real-node cluster can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEngine {
    /// Azure Network Policy Manager (iptables + ipset, keyed on pod IPs).
    AzureNpm,
}

impl std::fmt::Display for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyEngine::AzureNpm => "npm",
        })
    }
}

impl FromStr for PolicyEngine {
    type Err = String;

    /// `npm` (as `make cluster-up POLICY=` takes it).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "npm" | "azure-npm" | "azure" => Ok(PolicyEngine::AzureNpm),
            "calico" => Err("POLICY=calico: Calico cannot be built here (README, NetworkPolicy); use npm".into()),
            other => Err(format!("unknown policy engine {other:?}: use npm (Azure Network Policy Manager)")),
        }
    }
}

impl PolicyEngine {
    /// The engine's manifest, relative to the repository.
    pub fn manifest(self) -> &'static str {
        match self {
            PolicyEngine::AzureNpm => "e2e/policy/azure-npm.yaml",
        }
    }

    /// The engine's DaemonSet in kube-system.
    pub fn daemonset(self) -> &'static str {
        match self {
            PolicyEngine::AzureNpm => "azure-npm",
        }
    }

    /// The label selector of the engine's pods.
    pub fn selector(self) -> &'static str {
        match self {
            PolicyEngine::AzureNpm => "k8s-app=azure-npm",
        }
    }

    /// Builds the engine (`control-plane-bins.sh --policy`) and its image
    /// archive into `out_dir`.
    pub fn images(self, out_dir: &Path) -> Result<Vec<PathBuf>> {
        let bins = crate::controlplane::policy_bins()?;
        let built = crate::image::build_policy(out_dir, &bins)?;
        Ok(built.into_iter().map(|b| b.archive).collect())
    }

    /// Applies the manifest and waits until the engine is Ready on every
    /// node (its pods use the host network, so they need no CNI first).
    pub fn install(self, cp: &ControlPlane) -> Result<()> {
        let manifest = crate::repo_root().join(self.manifest());
        cp.kubectl_ok(&["apply", "-f", &manifest.to_string_lossy()])?;
        self.wait_ready(cp)
    }

    /// Until the DaemonSet's rollout is complete.
    pub fn wait_ready(self, cp: &ControlPlane) -> Result<()> {
        let ds = format!("daemonset/{}", self.daemonset());
        cp.kubectl_ok(&["-n", "kube-system", "rollout", "status", &ds, "--timeout=180s"]).with_context(|| {
            let pods = cp
                .kubectl_ok(&["-n", "kube-system", "get", "pods", "-l", self.selector(), "-o", "wide"])
                .unwrap_or_default();
            format!("{self} did not become Ready:\n{pods}")
        })?;
        Ok(())
    }
}
