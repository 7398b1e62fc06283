//! A local cluster with real nodes: the control plane on an isolated underlay,
//! and per node a kubelet, kube-proxy and containerd + runc.
//!
//! ```text
//!   host netns          127.0.0.1:<free> ──forwarder──┐   (tests, kubectl, make demo)
//!   ─────────────────────────────────────────────────┼─────────────────────────────
//!   underlay netns  ul0 10.224.0.1/24   etcd, kube-apiserver :6443, kube-controller-manager,
//!   (no route out,    │                 kube-scheduler         (ControlPlane in its netns)
//!    no forwarding)   ├── veth ── node-1 netns  eth0 10.224.0.4  ┐ own mount ns (/etc overlay,
//!                     ├── veth ── node-2 netns  eth0 10.224.0.5  │ /opt, /run, /var/lib, /var/log),
//!                     └── veth ── node-3 netns  eth0 10.224.0.6  ┘ cgroup /carve-<id>-<node>,
//!                                                                  containerd, kubelet, kube-proxy
//! ```
//!
//! Each node runs Debian's containerd 1.6 (libcni 1.1.2: CNI results up to
//! 1.0.0) unless [`ClusterOptions::runtimes`] gives it containerd 2
//! ([`Runtime::Containerd2`], built by `control-plane-bins.sh`; libcni 1.2+:
//! CNI 1.1.0 and the STATUS verb), so one cluster can mix both.
//!
//! Node IPs follow AKS (the first four addresses of a subnet are Azure's).
//! Every kubelet authenticates as `system:node:<name>` with its own client
//! certificate, so the Node authorizer and NodeRestriction apply; kube-proxy
//! (nftables mode) makes the `kubernetes` Service reach the API server.
//!
//! Teardown (drop, or [`crate::scratch::sweep_stale_clusters`] after the harness was killed)
//! kills every process in each node's cgroups — containerd shims re-parent and
//! would outlive their node otherwise — removes the cgroups and the network
//! namespaces; mounts die with the mount namespaces. The host keeps nothing:
//! no address, route, bridge, mount or sysctl of the cluster is on it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cilium::Dataplane;
use crate::controlplane::{self, ControlPlane, NETNS_API_PORT, Options};
use crate::netns::Netns;
use crate::policy::PolicyEngine;
use crate::process::ProcessKeeper;
use crate::scratch::{Record, make_cgroup, reap_cgroup, scratch_root, sweep_stale_clusters};
use crate::wait::poll;

/// The underlay subnet; the control plane holds its `.1`.
pub const UNDERLAY_CIDR: &str = "10.224.0.0/24";
pub const CONTROL_PLANE_IP: &str = "10.224.0.1";
/// Cluster DNS address kubelets hand to pods (CoreDNS, when deployed).
pub const CLUSTER_DNS_IP: &str = "10.96.0.10";
/// The pause image containerd runs as every pod's sandbox.
pub use crate::image::PAUSE_IMAGE;

/// Node `i` (0-based) gets 10.224.0.(4+i), as AKS numbers its nodes.
pub fn node_ip(i: usize) -> String {
    format!("10.224.0.{}", 4 + i)
}

#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// How many nodes; 0 is the API-server-only cluster of the fast tiers.
    pub nodes: usize,
    /// OCI image archives every node's containerd imports before its kubelet starts.
    pub images: Vec<PathBuf>,
    /// The container runtime of node `i` (0-based) at `runtimes[i]`; nodes
    /// past the end of the list (all of them, by default) run Debian's
    /// containerd 1.6.
    pub runtimes: Vec<Runtime>,
    /// A NetworkPolicy engine installed once the nodes have registered (its
    /// image is built and imported with the others).
    pub policy: Option<PolicyEngine>,
    /// Which dataplane wires the pods: carve's (and kube-proxy), or Cilium on
    /// carve's podCIDRs with no kube-proxy ([`Cluster::deploy_carve_under_cilium`]).
    pub dataplane: Dataplane,
}

/// A node's container runtime; runc (Debian's) under either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// Debian's containerd 1.6 and its runc shim, from PATH (config schema 2).
    #[default]
    Containerd16,
    /// containerd 2 with its own runc shim and ctr, from the control plane's
    /// bin dir (`containerd2/`, pinned by `CONTAINERD2_VERSION` in
    /// `control-plane-bins.sh`; config schema 3).
    Containerd2,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runtime::Containerd16 => "containerd1.6",
            Runtime::Containerd2 => "containerd2",
        })
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    /// `containerd1.6` or `containerd2` (as `carve-cluster --runtimes` takes them).
    fn from_str(s: &str) -> Result<Self, String> {
        [Runtime::Containerd16, Runtime::Containerd2]
            .into_iter()
            .find(|r| r.to_string() == s.trim())
            .ok_or_else(|| format!("unknown runtime {s:?}: use containerd1.6 (Debian's) or containerd2"))
    }
}

impl Runtime {
    /// The containerd (and `ctr`) binaries, given the control plane's bin dir.
    fn binary(self, bins: &Path, name: &str) -> PathBuf {
        match self {
            Runtime::Containerd16 => PathBuf::from(name),
            Runtime::Containerd2 => bins.join("containerd2").join(name),
        }
    }

    /// The CRI config file for this runtime.
    fn config(self, bins: &Path) -> String {
        match self {
            Runtime::Containerd16 => CONTAINERD_CONFIG.replace("@PAUSE_IMAGE@", PAUSE_IMAGE),
            Runtime::Containerd2 => containerd2_config(&bins.join("containerd2/containerd-shim-runc-v2")),
        }
    }
}

/// One real node; see the module docs.
pub struct RealNode {
    pub name: String,
    pub ip: String,
    pub runtime: Runtime,
    /// Whether kube-proxy runs here (not under Cilium's kube-proxy replacement).
    pub kube_proxy: bool,
    /// The `ctr` that matches the node's containerd.
    ctr: PathBuf,
    dir: PathBuf,
    cgroup: String,
    netns: Option<Netns>,
    keeper: ProcessKeeper,
    holder: u32,
}

impl RealNode {
    /// The pid whose namespaces are the node's (`nsenter -t <holder> -m -n`).
    pub fn holder(&self) -> u32 {
        self.holder
    }

    /// The node's network namespace (`/run/netns/<name>`), e.g. for `ip -n`.
    pub fn netns(&self) -> &Netns {
        self.netns.as_ref().expect("node netns lives as long as the node")
    }

    /// A command that runs `program` in the node's network and mount namespaces.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.holder.to_string()).args(["-m", "-n", "--"]).arg(program);
        cmd
    }

    /// Runs `program args` on the node, returning stdout; fails with stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out =
            self.command(program).args(args).output().with_context(|| format!("run {program} on {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {} on {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's own directory (its /etc overlay, /opt, /var/lib, logs, configs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A host path for `path` as the node sees it, for the bind-mounted trees.
    pub fn host_path(&self, path: &str) -> PathBuf {
        for (prefix, sub) in [("/opt/", "opt"), ("/var/lib/", "var-lib"), ("/var/log/", "var-log")] {
            if let Some(rest) = path.strip_prefix(prefix) {
                return self.dir.join(sub).join(rest);
            }
        }
        if let Some(rest) = path.strip_prefix("/etc/") {
            return self.dir.join("etc-upper").join(rest);
        }
        self.dir.join("root").join(path.trim_start_matches('/'))
    }

    /// Runs `ctr args` (the client that matches the node's containerd) on the node.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.run(&self.ctr.display().to_string(), args)
    }

    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("logs/{daemon}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the kubelet (its pods keep running, as on a real node).
    pub fn stop_kubelet(&self) -> Option<std::process::ExitStatus> {
        self.keeper.stop("kubelet")
    }

    /// Starts (or restarts) the kubelet with the node's config.
    pub fn start_kubelet(&self, bins: &Path) -> Result<()> {
        let mut kubelet = self.daemon(&bins.join("kubelet"));
        kubelet.args([
            format!("--config={}", self.dir.join("kubelet-config.yaml").display()),
            format!("--kubeconfig={}", self.dir.join("kubelet.kubeconfig").display()),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ip),
            "--v=1".to_string(),
        ]);
        self.keeper.spawn("kubelet", kubelet, self.dir.join("logs/kubelet.log"))?;
        Ok(())
    }

    fn daemon(&self, program: &Path) -> Command {
        let mut cmd = self.command("bash");
        cmd.arg(controlplane::repo_root().join("e2e/scripts/node.sh")).arg("exec").arg(&self.cgroup).arg(program);
        cmd
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        self.keeper.stop_all();
        if let Err(e) = reap_cgroup(&self.cgroup) {
            errors.push(format!("{}: {e:#}", self.name));
        }
        self.netns.take();
        errors
    }
}

/// A real-node cluster; see the module docs. Dropping it tears everything down.
pub struct Cluster {
    nodes: Vec<RealNode>,
    cp: Option<ControlPlane>,
    underlay: Option<Netns>,
    dir: PathBuf,
    id: String,
    record: Record,
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        let bins = controlplane::control_plane_bins()?;
        sweep_stale_clusters();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let id = format!("{:06x}", (nanos as u64 ^ u64::from(std::process::id())) & 0xff_ffff);
        let dir = scratch_root().join(format!("cl-{id}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        let mut cluster = Cluster { nodes: Vec::new(), cp: None, underlay: None, dir, id, record: Record::default() };

        let underlay = cluster.netns(&format!("cv{}-ul", cluster.id))?;
        underlay.ip(&["link", "add", "ul0", "type", "bridge"])?;
        underlay.ip(&["addr", "add", &format!("{CONTROL_PLANE_IP}/24"), "dev", "ul0"])?;
        underlay.ip(&["link", "set", "ul0", "up"])?;
        let underlay_path = underlay.path();
        cluster.underlay = Some(underlay);
        let cp = ControlPlane::start_with(Options {
            netns: Some(underlay_path),
            advertise_address: Some(CONTROL_PLANE_IP.into()),
            components: true,
            ..Default::default()
        })
        .await?;
        cluster.cp = Some(cp);

        for i in 0..opts.nodes {
            let runtime = opts.runtimes.get(i).copied().unwrap_or_default();
            let node = cluster.create_node(i, &bins, runtime, opts.dataplane)?;
            cluster.nodes.push(node);
        }
        let mut images = opts.images.clone();
        if let Some(engine) = opts.policy {
            images.extend(engine.images(&cluster.dir.join("images"))?);
        }
        if opts.dataplane == Dataplane::Cilium {
            images.extend(crate::cilium::images(&cluster.dir.join("images"))?);
        }
        // Nodes boot in parallel: containerd and the image imports take the time.
        let images = &images;
        let booted: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = cluster.nodes.iter().map(|n| s.spawn(|| boot_node(n, &bins, images))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("node boot panicked"))))
                .collect()
        });
        for r in booted {
            r?;
        }
        cluster.wait_nodes_registered().await?;
        cluster.wait_default_service_account().await?;
        if let Some(engine) = opts.policy {
            engine.install(cluster.cp())?;
        }
        Ok(cluster)
    }

    fn netns(&mut self, name: &str) -> Result<Netns> {
        self.record.netns.push(name.to_string());
        self.save_record()?;
        Netns::new(name)
    }

    fn save_record(&self) -> Result<()> {
        std::fs::write(self.dir.join("cluster.json"), serde_json::to_vec(&self.record)?)?;
        Ok(())
    }

    /// Network, cgroups and config files of node `i`; nothing runs yet.
    fn create_node(&mut self, i: usize, bins: &Path, runtime: Runtime, dataplane: Dataplane) -> Result<RealNode> {
        let name = format!("node-{}", i + 1);
        let ip = node_ip(i);
        let dir = self.dir.join(&name);
        let cgroup = format!("carve-{}-{name}", self.id);
        self.record.cgroups.push(cgroup.clone());
        let netns = self.netns(&format!("cv{}-n{}", self.id, i + 1))?;
        let underlay = self.underlay.as_ref().expect("underlay exists before nodes");
        let host_if = format!("n{}", i + 1);
        underlay.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns.name])?;
        underlay.ip(&["link", "set", &host_if, "master", "ul0", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", CONTROL_PLANE_IP])?;
        make_cgroup(&cgroup)?;

        for sub in ["logs", "opt/cni/bin", "var-lib", "var-log", "etc-upper", "etc-work"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // A node as distributions ship it: the reference CNI plugins (loopback
        // is required by containerd) in /opt/cni/bin.
        let plugins = bins.join("cni-plugins");
        for p in ["loopback", "portmap", "bridge", "host-local"] {
            std::fs::copy(plugins.join(p), dir.join("opt/cni/bin").join(p))
                .with_context(|| format!("copy CNI plugin {p} from {}", plugins.display()))?;
        }
        let cp = self.cp.as_ref().expect("control plane before nodes");
        let server = format!("https://{CONTROL_PLANE_IP}:{NETNS_API_PORT}");
        let kubelet_kc = cp.write_kubeconfig(
            &format!("kubelet-{name}"),
            &server,
            &format!("system:node:{name}"),
            Some("system:nodes"),
        )?;
        std::fs::rename(kubelet_kc, dir.join("kubelet.kubeconfig"))?;
        let proxy_kc = cp.write_kubeconfig(&format!("kube-proxy-{name}"), &server, "system:kube-proxy", None)?;
        std::fs::rename(proxy_kc, dir.join("kube-proxy.kubeconfig"))?;
        std::fs::write(dir.join("containerd.toml"), runtime.config(bins))?;
        std::fs::write(dir.join("kubelet-config.yaml"), kubelet_config(&cgroup, &ip, &cp.ca_file()))?;
        std::fs::write(dir.join("kube-proxy.yaml"), kube_proxy_config(&name, &dir.join("kube-proxy.kubeconfig")))?;

        let keeper = ProcessKeeper::new();
        let mut holder = Command::new("unshare");
        holder
            .args(["-m", "--propagation", "private", "--", "nsenter"])
            .arg(format!("--net={}", netns.path().display()))
            .arg("--")
            .arg("bash")
            .arg(controlplane::repo_root().join("e2e/scripts/node.sh"))
            .arg("init")
            .arg(&dir)
            .arg(&cgroup);
        if dataplane == Dataplane::Cilium {
            holder.arg("cilium");
        }
        let holder = keeper.spawn("holder", holder, dir.join("logs/holder.log"))?;
        let ctr = runtime.binary(bins, "ctr");
        let kube_proxy = dataplane == Dataplane::Carve;
        Ok(RealNode { name, ip, runtime, kube_proxy, ctr, dir, cgroup, netns: Some(netns), keeper, holder })
    }

    async fn wait_nodes_registered(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.cp().kubectl_ok(&["get", "nodes", "-o", "name"]).unwrap_or_default();
            if out.lines().count() >= self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} kubelet:\n{}", n.name, n.log_tail("kubelet", 20)))
                    .collect();
                bail!("nodes did not register within 120s (have: {out:?})\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Until kube-controller-manager has made namespace default's
    /// ServiceAccount: before it, admission refuses every bare Pod there.
    async fn wait_default_service_account(&self) -> Result<()> {
        poll("the default ServiceAccount", Duration::from_secs(60), || async {
            self.cp().kubectl_ok(&["get", "serviceaccount", "default"]).map(|_| ()).map_err(|e| format!("{e:#}"))
        })
        .await
    }

    pub fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("control plane lives as long as the cluster")
    }

    pub fn nodes(&self) -> &[RealNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &RealNode {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The underlay network namespace (holds the control plane's address).
    pub fn underlay(&self) -> &Netns {
        self.underlay.as_ref().expect("underlay lives as long as the cluster")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cp().kubectl_ok(&all)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {}: not JSON", args.join(" ")))
    }

    /// Deploys carve as users do (CRDs, manifests, then `pool`, a PodCIDR's
    /// YAML) and waits until every node is Ready on carve's network.
    pub async fn deploy_carve(&self, pool: &str) -> Result<()> {
        self.deploy_carve_with(pool, &[]).await
    }

    /// [`Cluster::deploy_carve`] with `agent_env` (`NAME=value`) set on the
    /// agent's DaemonSet, as `kubectl set env` does for a user.
    pub async fn deploy_carve_with(&self, pool: &str, agent_env: &[&str]) -> Result<()> {
        let cp = self.cp();
        cp.install_crds()?;
        cp.kubectl_ok(&["apply", "-f", "manifests/"])?;
        if !agent_env.is_empty() {
            let mut args = vec!["-n", "carve-system", "set", "env", "daemonset/carve-agent", "-c", "agent"];
            args.extend_from_slice(agent_env);
            cp.kubectl_ok(&args)?;
            cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"])?;
        }
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], pool)?;
        ensure!(out.status.success(), "kubectl apply of the pool: {}", String::from_utf8_lossy(&out.stderr));
        self.wait_network_ready().await
    }

    /// The seeds' recommended shape on this cluster (started with
    /// [`Dataplane::Cilium`]): carve with its agents `ipam-only` and the API
    /// server named directly (there is no kube-proxy for the `kubernetes`
    /// Service), `pool` applied, every Node given its podCIDR by carve's
    /// controller, then Cilium from its chart ([`crate::cilium`]) until every
    /// node is Ready.
    pub async fn deploy_carve_under_cilium(&self, pool: &str) -> Result<()> {
        let cp = self.cp();
        cp.install_crds()?;
        let endpoint = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: carve-api-endpoint, namespace: carve-system}}\n\
             data: {{KUBERNETES_SERVICE_HOST: \"{CONTROL_PLANE_IP}\", KUBERNETES_SERVICE_PORT: \"{NETNS_API_PORT}\"}}\n"
        );
        cp.kubectl_ok(&["apply", "-f", "manifests/00-namespace.yaml"])?;
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], &endpoint)?;
        ensure!(out.status.success(), "the carve-api-endpoint ConfigMap: {}", String::from_utf8_lossy(&out.stderr));
        cp.kubectl_ok(&["apply", "-f", "manifests/"])?;
        cp.kubectl_ok(&["-n", "carve-system", "set", "env", "daemonset/carve-agent", "CARVE_ROLE=ipam-only"])?;
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], pool)?;
        ensure!(out.status.success(), "kubectl apply of the pool: {}", String::from_utf8_lossy(&out.stderr));
        crate::wait::poll("every Node's podCIDR from carve", Duration::from_secs(120), || async {
            let cidrs = cp.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"]).unwrap_or_default();
            if cidrs.split_whitespace().count() == self.nodes.len() {
                Ok(())
            } else {
                Err(format!("podCIDRs: {cidrs:?}"))
            }
        })
        .await?;
        crate::cilium::install(cp, CONTROL_PLANE_IP, NETNS_API_PORT)?;
        self.wait_network_ready().await
    }

    /// Waits until every node is Ready with carve's network
    /// (NetworkUnavailable=False), however carve was installed.
    pub async fn wait_network_ready(&self) -> Result<()> {
        let cp = self.cp();
        let nodes = self.nodes.len();
        poll("every node Ready with carve's network", Duration::from_secs(180), || async {
            let list = self.kubectl_json(&["get", "nodes"]).map_err(|e| format!("{e:#}"))?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            let ready = items.len() == nodes
                && items.iter().all(|n| {
                    condition(n, "Ready").is_some_and(|c| c["status"] == "True")
                        && condition(n, "NetworkUnavailable").is_some_and(|c| c["status"] == "False")
                });
            if ready {
                Ok(())
            } else {
                let agents = cp.kubectl_ok(&["-n", "carve-system", "get", "pods", "-o", "wide"]).unwrap_or_default();
                let tails: Vec<String> =
                    self.nodes.iter().map(|n| format!("--- {}:\n{}", n.name, n.log_tail("kubelet", 8))).collect();
                Err(format!("{agents}\n{}", tails.join("\n")))
            }
        })
        .await
    }

    /// Routes every node's pod blocks (its NodeNetworkConfig's
    /// `status.blocks`) via that node's IP from the control plane's
    /// namespace, so kube-apiserver reaches pod IPs (pods/proxy, services
    /// proxy), as a cloud's route table or konnectivity would give it.
    pub fn route_pod_blocks(&self) -> Result<Vec<(String, String)>> {
        let nncs = self.kubectl_json(&["get", "nodenetworkconfigs"])?;
        let mut routes = Vec::new();
        for nnc in nncs["items"].as_array().into_iter().flatten() {
            let name = nnc["metadata"]["name"].as_str().unwrap_or_default();
            let Some(node) = self.nodes.iter().find(|n| n.name == name) else { continue };
            for block in nnc["status"]["blocks"].as_array().into_iter().flatten() {
                // The underlay is IPv4 only: IPv6 blocks get no route.
                let Some(cidr) = block["cidr"].as_str().filter(|c| !c.contains(':')) else { continue };
                self.underlay().ip(&["route", "replace", cidr, "via", &node.ip])?;
                routes.push((cidr.to_string(), node.ip.clone()));
            }
        }
        ensure!(!routes.is_empty(), "no NodeNetworkConfig has blocks yet: deploy carve and a pool first");
        Ok(routes)
    }

    /// Takes a node away as a machine dies: its kubelet, runtime, pods and
    /// network namespace are gone. Its Node object stays (nothing here deletes
    /// Nodes, as in a cluster without a cloud provider); the caller deletes it.
    pub fn remove_node(&mut self, name: &str) -> Vec<String> {
        let Some(i) = self.nodes.iter().position(|n| n.name == name) else {
            return vec![format!("no node {name}")];
        };
        let mut node = self.nodes.remove(i);
        node.teardown()
    }

    /// Tears the cluster down now, returning every problem met on the way.
    pub fn shutdown(mut self) -> Vec<String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for node in &mut self.nodes {
            errors.extend(node.teardown());
        }
        self.nodes.clear();
        self.cp.take();
        self.underlay.take();
        if std::env::var_os("CARVE_E2E_KEEP").is_some() {
            eprintln!("carve-e2e: keeping {}", self.dir.display());
        } else if self.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            errors.push(format!("remove {}: {e}", self.dir.display()));
        }
        errors
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("carve-e2e: cluster teardown: {e}");
        }
    }
}

/// The condition `kind` of an object's `status.conditions`.
pub fn condition<'a>(obj: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

/// Waits for the node's holder, starts containerd, imports the images, then
/// kubelet and kube-proxy.
fn boot_node(node: &RealNode, bins: &Path, images: &[PathBuf]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.dir.join("ready").exists() {
        if Instant::now() > deadline {
            bail!("{}: namespaces not ready: {}", node.name, node.log_tail("holder", 20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut containerd = node.daemon(&node.runtime.binary(bins, "containerd"));
    containerd.arg("--config").arg(node.dir.join("containerd.toml"));
    node.keeper.spawn("containerd", containerd, node.dir.join("logs/containerd.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.ctr(&["version"]).is_err() {
        if Instant::now() > deadline {
            bail!("{}: containerd did not start: {}", node.name, node.log_tail("containerd", 20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for image in images {
        node.ctr(&["-n", "k8s.io", "images", "import", &image.display().to_string()])
            .with_context(|| format!("import {} on {}", image.display(), node.name))?;
    }
    node.start_kubelet(bins)?;
    if node.kube_proxy {
        let mut proxy = node.daemon(&bins.join("kube-proxy"));
        proxy.arg(format!("--config={}", node.dir.join("kube-proxy.yaml").display()));
        node.keeper.spawn("kube-proxy", proxy, node.dir.join("logs/kube-proxy.log"))?;
    }
    Ok(())
}

/// containerd 1.6's CRI config (schema 2). Every path is a default, made
/// per node by the node's mounts.
const CONTAINERD_CONFIG: &str = r#"version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "@PAUSE_IMAGE@"
  # No CAP_SYS_RESOURCE here: never raise a process's OOM score adjustment.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#;

/// containerd 2's CRI config (schema 3): the same choices as 1.6's, split
/// over the images and runtime plugins; the runc runtime uses containerd 2's
/// own shim (Debian's 1.6 shim is the one on PATH).
fn containerd2_config(shim: &Path) -> String {
    format!(
        r#"version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'
[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: never raise a process's OOM score adjustment.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      runtime_path = '{shim}'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/opt/cni/bin']
    conf_dir = '/etc/cni/net.d'
"#,
        shim = shim.display()
    )
}

fn kubelet_config(cgroup: &str, ip: &str, ca: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 and no systemd on this machine; each node has its own cgroup root.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: {ip}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
volumePluginDir: /var/lib/kubelet/volume-plugins
clusterDomain: cluster.local
clusterDNS: [{CLUSTER_DNS_IP}]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
maxPods: 110
"#,
        ca = ca.display()
    )
}

fn kube_proxy_config(node: &str, kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: {node}
clientConnection: {{kubeconfig: {kubeconfig}}}
# carve's host-side veths are carve*: what is local works for every pool mode.
detectLocalMode: InterfaceNamePrefix
detectLocal: {{interfaceNamePrefix: carve}}
# Leave the host-wide conntrack settings alone.
conntrack: {{maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
"#,
        kubeconfig = kubeconfig.display()
    )
}
