//! `carvectl connectivity` (`kubectl carve connectivity`): short-lived probe
//! pods on every node (or those a label selector picks) check the paths a
//! pod network must carry, as `cilium connectivity test` does.
//!
//! ```text
//!   namespace carve-connectivity-<id>
//!     server-<node>  (pinned to each node)  answers "ok" on TCP 8080
//!     Service echo   ClusterIP → every server, port 8080
//!     client-<node>  (pinned to each node)  one shell script: for each path,
//!                    up to 3 tries, prints `RESULT <i> ok|fail`, exits
//!   paths per client: pod → pod on its node, pod → pod on every other node,
//!     pod → its node (kubelet's port), pod → the Service, pod → --egress
//!   the namespace is deleted at the end, also on an error or Ctrl-C
//! ```
//!
//! [`Path`], [`probe_script`] and [`results`] are pure; [`run`] talks to the API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::views::{self, PartialNode};

/// The port the server pods answer on.
pub const ECHO_PORT: u16 = 8080;
/// The kubelet's port: what pod → node connects to.
pub const KUBELET_PORT: u16 = 10250;

/// One kind of path a client checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PathKind {
    /// To the server pod on the client's own node.
    PodSameNode,
    /// To the server pod on another node.
    PodOtherNode,
    /// To the client's own node (a TCP connect to the kubelet).
    PodToNode,
    /// To the ClusterIP Service in front of every server.
    PodToService,
    /// To `--egress`: a TCP connect.
    Egress,
}

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::PodSameNode => "pod -> pod (same node)",
            PathKind::PodOtherNode => "pod -> pod (other node)",
            PathKind::PodToNode => "pod -> node",
            PathKind::PodToService => "pod -> ClusterIP Service",
            PathKind::Egress => "pod -> egress",
        }
    }

    /// Whether an answer ("ok") is expected, not only a connection.
    fn echoes(self) -> bool {
        matches!(self, PathKind::PodSameNode | PathKind::PodOtherNode | PathKind::PodToService)
    }
}

/// One path from a client's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Path {
    pub kind: PathKind,
    /// What is reached: a node name, the Service, or the egress address.
    pub to: String,
    pub addr: SocketAddr,
}

/// The client's script: each path up to 3 times, one `RESULT <i> ok|fail` line each.
pub fn probe_script(paths: &[Path]) -> String {
    let mut s = String::from("set +e\n");
    for (i, p) in paths.iter().enumerate() {
        let (ip, port) = (p.addr.ip(), p.addr.port());
        let attempt = if p.kind.echoes() {
            format!("[ \"$(echo x | timeout 4 nc -w 2 {ip} {port} 2>/dev/null)\" = ok ]")
        } else {
            // A refused or unreachable connect fails within -w; an open one returns at once.
            format!("timeout 4 nc -w 2 {ip} {port} </dev/null >/dev/null 2>&1; r=$?; [ $r = 0 ] || [ $r = 143 ]")
        };
        s.push_str(&format!(
            "r{i}=fail; for t in 1 2 3; do if {attempt}; then r{i}=ok; break; fi; sleep 1; done; echo \"RESULT {i} $r{i}\"\n"
        ));
    }
    s
}

/// The outcome of each of `n` paths from a client's log (`None`: no line for it).
pub fn results(log: &str, n: usize) -> Vec<Option<bool>> {
    let mut out = vec![None; n];
    for line in log.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("RESULT") {
            continue;
        }
        let (Some(i), Some(r)) = (words.next().and_then(|i| i.parse::<usize>().ok()), words.next()) else { continue };
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(r == "ok");
        }
    }
    out
}

/// One checked path.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub from: String,
    #[serde(flatten)]
    pub path: Path,
    pub ok: bool,
}

/// The whole check.
#[derive(Debug, Serialize)]
pub struct Report {
    pub namespace: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn ok(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }

    /// Nodes with a failing path, from or to them, most failures first.
    pub fn failing_nodes(&self) -> Vec<(String, usize)> {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.rows.iter().filter(|r| !r.ok) {
            *count.entry(&r.from).or_default() += 1;
            if matches!(r.path.kind, PathKind::PodOtherNode) {
                *count.entry(&r.path.to).or_default() += 1;
            }
        }
        let mut out: Vec<(String, usize)> = count.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    pub fn table(&self) -> String {
        let mut rows = vec![["FROM", "PATH", "TO", "ADDRESS", "RESULT"].map(String::from).to_vec()];
        for r in &self.rows {
            rows.push(vec![
                r.from.clone(),
                r.path.kind.label().into(),
                r.path.to.clone(),
                r.path.addr.to_string(),
                if r.ok { "ok" } else { "FAIL" }.into(),
            ]);
        }
        let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for r in rows {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        let failed = self.rows.iter().filter(|r| !r.ok).count();
        out.push_str(&format!("connectivity: {} passed, {failed} failed\n", self.rows.len() - failed));
        for (node, n) in self.failing_nodes() {
            out.push_str(&format!("  node {node}: {n} failing path(s) from or to it\n"));
        }
        out
    }
}

/// What to check and with which image.
#[derive(Clone, Debug)]
pub struct Options {
    /// An image with busybox's sh, nc and timeout.
    pub image: String,
    /// Label selector for the Nodes to probe; empty: every Node.
    pub node_selector: String,
    pub egress: Option<SocketAddr>,
    /// How long the pods may take to start and to finish.
    pub timeout: Duration,
}

fn pinned_pod(name: &str, node: &str, image: &str, labels: serde_json::Value, script: &str, restart: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": node,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "probe", "image": image, "imagePullPolicy": "IfNotPresent",
                             "command": ["sh", "-c", script] }],
        },
    }))
    .expect("a valid Pod")
}

async fn wait_pods<T>(
    pods: &Api<Pod>,
    selector: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Pod]) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        if let Some(v) = done(&list.items) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let states: Vec<String> = list
                .items
                .iter()
                .map(|p| {
                    format!("{} {}", p.name_any(), p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default())
                })
                .collect();
            bail!("{what} within {timeout:?}: {}", states.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the check in `namespace` (created here, deleted by the caller with [`clean_up`]).
pub async fn run(client: &Client, namespace: &str, opts: &Options) -> Result<Report> {
    let nodes = Api::<PartialNode>::all(client.clone())
        .list(&ListParams::default().labels(&opts.node_selector))
        .await
        .context("listing Nodes")?;
    let nodes: Vec<(String, std::net::IpAddr)> =
        nodes.items.iter().filter_map(|n| Some((n.name_any(), views::internal_ip(n)?.parse().ok()?))).collect();
    if nodes.is_empty() {
        bail!("no Node with an InternalIP matches --node-selector {:?}", opts.node_selector);
    }
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "name": namespace, "labels": { "app.kubernetes.io/part-of": "carve", "app.kubernetes.io/name": "carve-connectivity" } },
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .context("creating the namespace")?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pp = PostParams::default();
    let server = format!("nc -ll -p {ECHO_PORT} -e echo ok");
    for (i, (node, _)) in nodes.iter().enumerate() {
        let labels = json!({ "carve-connectivity": "server", "node-index": i.to_string() });
        pods.create(&pp, &pinned_pod(&format!("server-{i}"), node, &opts.image, labels, &server, "Always")).await?;
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "echo" },
        "spec": { "selector": { "carve-connectivity": "server" }, "ports": [{ "port": ECHO_PORT, "targetPort": ECHO_PORT }] },
    }))?;
    let svc = Api::<Service>::namespaced(client.clone(), namespace).create(&pp, &svc).await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).context("the Service got no ClusterIP")?;
    let n = nodes.len();
    let servers = wait_pods(&pods, "carve-connectivity=server", opts.timeout, "server pods Running", |items| {
        let ips: BTreeMap<usize, String> = items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| {
                let i = p.labels().get("node-index")?.parse().ok()?;
                Some((i, p.status.as_ref()?.pod_ip.clone()?))
            })
            .collect();
        (ips.len() == n).then_some(ips)
    })
    .await?;

    let mut plans: Vec<(String, Vec<Path>)> = Vec::new();
    for (i, (node, node_ip)) in nodes.iter().enumerate() {
        let mut paths = Vec::new();
        for (j, (other, _)) in nodes.iter().enumerate() {
            let kind = if i == j { PathKind::PodSameNode } else { PathKind::PodOtherNode };
            let addr = SocketAddr::new(servers[&j].parse()?, ECHO_PORT);
            paths.push(Path { kind, to: other.clone(), addr });
        }
        paths.sort_by_key(|p| p.kind);
        paths.push(Path { kind: PathKind::PodToNode, to: node.clone(), addr: SocketAddr::new(*node_ip, KUBELET_PORT) });
        paths.push(Path {
            kind: PathKind::PodToService,
            to: "echo".into(),
            addr: SocketAddr::new(cluster_ip.parse()?, ECHO_PORT),
        });
        if let Some(egress) = opts.egress {
            paths.push(Path { kind: PathKind::Egress, to: egress.to_string(), addr: egress });
        }
        let labels = json!({ "carve-connectivity": "client" });
        let script = probe_script(&paths);
        pods.create(&pp, &pinned_pod(&format!("client-{i}"), node, &opts.image, labels, &script, "Never")).await?;
        plans.push((node.clone(), paths));
    }
    wait_pods(&pods, "carve-connectivity=client", opts.timeout, "client pods finished", |items| {
        let done = items
            .iter()
            .filter(|p| matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
            .count();
        (done == n).then_some(())
    })
    .await?;
    let mut rows = Vec::new();
    for (i, (node, paths)) in plans.into_iter().enumerate() {
        let log = pods
            .logs(&format!("client-{i}"), &LogParams::default())
            .await
            .with_context(|| format!("reading the log of probe client-{i} on {node}"))?;
        let outcomes = results(&log, paths.len());
        for (path, ok) in paths.into_iter().zip(outcomes) {
            rows.push(Row { from: node.clone(), path, ok: ok == Some(true) });
        }
    }
    Ok(Report { namespace: namespace.to_string(), rows })
}

/// Deletes the check's namespace (and so every pod and the Service in it).
pub async fn clean_up(client: &Client, namespace: &str) -> Result<()> {
    match Api::<Namespace>::all(client.clone()).delete(namespace, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting namespace {namespace}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(kind: PathKind, to: &str, addr: &str) -> Path {
        Path { kind, to: to.into(), addr: addr.parse().unwrap() }
    }

    #[test]
    fn the_script_reports_every_path_and_the_log_reads_back() {
        let paths = [
            path(PathKind::PodSameNode, "node-1", "10.244.0.5:8080"),
            path(PathKind::PodToNode, "node-1", "10.224.0.4:10250"),
        ];
        let script = probe_script(&paths);
        assert!(script.contains("nc -w 2 10.244.0.5 8080") && script.contains("= ok ]"), "{script}");
        assert!(script.contains("nc -w 2 10.224.0.4 10250 </dev/null"), "{script}");
        assert_eq!(script.matches("echo \"RESULT").count(), 2);
        let log = "noise\nRESULT 1 fail\nRESULT 0 ok\nRESULT 7 ok\n";
        assert_eq!(results(log, 2), [Some(true), Some(false)]);
        assert_eq!(results("", 2), [None, None], "no line: not a pass");
    }

    #[test]
    fn a_report_names_the_node_its_failures_meet_at() {
        let row = |from: &str, kind, to: &str, ok| Row { from: from.into(), path: path(kind, to, "10.0.0.1:1"), ok };
        let report = Report {
            namespace: "x".into(),
            rows: vec![
                row("node-1", PathKind::PodOtherNode, "node-3", false),
                row("node-2", PathKind::PodOtherNode, "node-3", false),
                row("node-3", PathKind::PodOtherNode, "node-1", false),
                row("node-1", PathKind::PodSameNode, "node-1", true),
            ],
        };
        assert!(!report.ok());
        assert_eq!(report.failing_nodes()[0], ("node-3".to_string(), 3));
        let table = report.table();
        assert!(table.contains("connectivity: 1 passed, 3 failed"), "{table}");
        assert!(table.contains("node node-3: 3 failing path(s)"), "{table}");
    }
}
