//! Helpers the real-node tests share: kubectl as JSON, `kubectl exec`,
//! deploying carve and a workload, a node's blocks and its IPAM store, a host
//! outside the cluster, and where a connection arrives from.

// Each test binary uses a subset of them.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use carve_e2e::cluster::{CONTROL_PLANE_IP, Cluster, RealNode};
use carve_e2e::netns::Netns;
use carve_e2e::testkit::wait_for;
use ipnet::IpNet;
use serde_json::{Value, json};

#[allow(unused_imports)]
pub use carve_e2e::cluster::condition;

pub fn kubectl_json(cluster: &Cluster, args: &[&str]) -> Value {
    cluster.kubectl_json(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `kubectl exec POD -- cmd...`: stdout, or the error with stderr.
pub fn exec(cluster: &Cluster, pod: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    cluster.cp().kubectl_ok(&args).map_err(|e| format!("{e:#}"))
}

/// The addresses carve-ipam holds in a node's store (`allocations.json`).
pub fn store_ips(node: &RealNode) -> BTreeSet<IpAddr> {
    let path = node.host_path("/var/lib/carve/ipam/carve/allocations.json");
    let Ok(body) = std::fs::read(&path) else { return BTreeSet::new() };
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    v["allocations"].as_array().into_iter().flatten().filter_map(|a| a["ip"].as_str()?.parse().ok()).collect()
}

pub fn node_blocks(cluster: &Cluster) -> BTreeMap<String, Vec<IpNet>> {
    let nncs = kubectl_json(cluster, &["get", "nnc"]);
    nncs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let blocks = n["status"]["blocks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["cidr"].as_str()?.parse().ok())
                .collect();
            (n["metadata"]["name"].as_str().unwrap().to_string(), blocks)
        })
        .collect()
}

/// A running pod: its node and addresses (`podIPs`, the primary first).
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: IpAddr,
    pub ips: Vec<IpAddr>,
}

/// The Running pods (not being deleted) matching `selector`.
pub fn running_pods(cluster: &Cluster, selector: &str) -> Vec<Pod> {
    let pods = kubectl_json(cluster, &["get", "pods", "-l", selector]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running"
                && p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["podIP"].is_string()
        })
        .map(|p| Pod {
            name: p["metadata"]["name"].as_str().unwrap().into(),
            node: p["spec"]["nodeName"].as_str().unwrap().into(),
            ip: p["status"]["podIP"].as_str().unwrap().parse().unwrap(),
            ips: p["status"]["podIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str()?.parse().ok())
                .collect(),
        })
        .collect()
}

/// TCP port where a [`workload`] pod answers with its hostname.
pub const HOSTNAME_PORT: u16 = 8080;
/// TCP port where a [`workload`] pod answers with its `netstat -tn`: the
/// connection as the pod sees it, so the client's address as it arrived.
pub const PEER_PORT: u16 = 8081;

/// A Deployment of busybox pods spread over the nodes, serving [`HOSTNAME_PORT`]
/// and [`PEER_PORT`].
pub fn workload(name: &str, replicas: usize) -> String {
    let spread = format!(
        "topologySpreadConstraints:\n        - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: {name}}}}}}}"
    );
    deployment(name, replicas, &spread)
}

/// The same Deployment with every replica on `node`.
pub fn workload_on(name: &str, node: &str, replicas: usize) -> String {
    deployment(name, replicas, &format!("nodeSelector: {{kubernetes.io/hostname: {node}}}"))
}

fn deployment(name: &str, replicas: usize, placement: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      {placement}
      containers:
        - name: busybox
          image: carve.local/busybox:v1
          imagePullPolicy: Never
          command: ["sh", "-c", "nc -ll -p {PEER_PORT} -e netstat -tn & while true; do hostname | nc -l -p {HOSTNAME_PORT}; done"]
"#
    )
}

/// Applies `workload(name, replicas)` and waits until that many pods run, on every node.
pub async fn run_workload(cluster: &Cluster, name: &str, replicas: usize) -> Vec<Pod> {
    let cp = cluster.cp();
    cp.kubectl_stdin(&["apply", "-f", "-"], &workload(name, replicas)).unwrap();
    let nodes = cluster.nodes().len();
    wait_for(&format!("{replicas} {name} pods Running on {nodes} nodes"), Duration::from_secs(180), || async {
        let pods = running_pods(cluster, &format!("app={name}"));
        let on: BTreeSet<_> = pods.iter().map(|p| p.node.clone()).collect();
        if pods.len() == replicas && on.len() == nodes {
            Ok(pods)
        } else {
            let events = cp.kubectl_ok(&["get", "events", "--field-selector", "type=Warning"]).unwrap_or_default();
            Err(format!("{}\n{events}", cp.kubectl_ok(&["get", "pods", "-o", "wide"]).unwrap_or_default()))
        }
    })
    .await
}

/// Deploys carve as users do and waits until every node is Ready on it
/// ([`Cluster::deploy_carve`]).
pub async fn deploy_carve(cluster: &Cluster, pool: &str) {
    cluster.deploy_carve(pool).await.unwrap_or_else(|e| panic!("deploying carve: {e:#}"))
}

/// [`deploy_carve`] with `NAME=value` settings on the agent's DaemonSet.
pub async fn deploy_carve_with(cluster: &Cluster, pool: &str, agent_env: &[&str]) {
    cluster.deploy_carve_with(pool, agent_env).await.unwrap_or_else(|e| panic!("deploying carve: {e:#}"))
}

/// A host outside every cluster CIDR, on the underlay, for egress checks.
pub const EXTERNAL_IP: &str = "10.224.0.200";

/// A network namespace holding [`EXTERNAL_IP`] on the cluster's underlay
/// (its default route is the control plane, which forwards nothing).
pub fn external_host(cluster: &Cluster) -> Netns {
    let external = Netns::new(&format!("cv{}-ext", cluster.id())).unwrap();
    let veth = format!("cv{}x", cluster.id());
    cluster
        .underlay()
        .ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &external.name])
        .unwrap();
    cluster.underlay().ip(&["link", "set", &veth, "master", "ul0", "up"]).unwrap();
    external.ip(&["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"]).unwrap();
    external.ip(&["link", "set", "eth0", "up"]).unwrap();
    external.ip(&["route", "add", "default", "via", CONTROL_PLANE_IP]).unwrap();
    external
}

/// The address a TCP connection from pod `from` to `to` arrives from, as
/// `to`'s pod sees it (its [`PEER_PORT`] answers with `netstat -tn`).
pub fn arrives_from(cluster: &Cluster, from: &Pod, to: IpAddr) -> Result<IpAddr, String> {
    let target = match to {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string(),
    };
    let out = exec(cluster, &from.name, &["sh", "-c", &format!("nc -w 3 {target} {PEER_PORT} </dev/null")])?;
    peer_of(&out, PEER_PORT).ok_or_else(|| format!("no connection to port {PEER_PORT} in {out:?}"))
}

/// In `netstat -tn` output, the foreign address of the established
/// connection to local `port`.
pub fn peer_of(netstat: &str, port: u16) -> Option<IpAddr> {
    let strip = |addr: &str| -> Option<IpAddr> {
        let (ip, _) = addr.rsplit_once(':')?;
        let ip: IpAddr = ip.parse().ok()?;
        Some(match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        })
    };
    netstat.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let (local, foreign) = (cols.get(3)?, cols.get(4)?);
        // The connection being served is ESTABLISHED, or CLOSE_WAIT once the
        // client (stdin at EOF) has shut its side; earlier ones linger in TIME_WAIT.
        let live = l.contains("ESTABLISHED") || l.contains("CLOSE_WAIT");
        if local.ends_with(&format!(":{port}")) && live { strip(foreign) } else { None }
    })
}

/// The YAML of `examples/<name>`.
pub fn example(name: &str) -> String {
    let path = carve_e2e::controlplane::repo_root().join("examples").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The results libcni cached on `node` (`/var/lib/cni/results/<network>-<container>-<if>`)
/// whose interfaces hold `ip`: (file name, the result's cniVersion).
pub fn cached_results(node: &RealNode, ip: IpAddr) -> Vec<(String, String)> {
    let dir = node.host_path("/var/lib/cni/results");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Ok(body) = std::fs::read(e.path()) else { continue };
        let Ok(cache) = serde_json::from_slice::<Value>(&body) else { continue };
        let result = &cache["result"];
        let holds =
            result["ips"].as_array().into_iter().flatten().any(|i| {
                i["address"].as_str().and_then(|a| a.parse::<IpNet>().ok()).is_some_and(|net| net.addr() == ip)
            });
        if holds {
            let version = result["cniVersion"].as_str().unwrap_or("").to_string();
            found.push((e.file_name().to_string_lossy().into_owned(), version));
        }
    }
    found
}

/// Waits until no pod matches `selector` and every address of `pods` is back
/// in its node's store, with no result of theirs left in libcni's cache.
pub async fn wait_released(cluster: &Cluster, selector: &str, pods: &[Pod], timeout: Duration) {
    let cp = cluster.cp();
    wait_for("every pod gone and its addresses released", timeout, || async {
        let left = cp.kubectl_ok(&["get", "pods", "-l", selector, "-o", "name"]).unwrap_or_default();
        let held: Vec<String> = pods
            .iter()
            .flat_map(|p| p.ips.iter().map(move |ip| (p, ip)))
            .filter(|(p, ip)| store_ips(cluster.node(&p.node)).contains(ip))
            .map(|(p, ip)| format!("{} {ip}", p.name))
            .collect();
        let cached: Vec<&str> = pods
            .iter()
            .filter(|p| !cached_results(cluster.node(&p.node), p.ip).is_empty())
            .map(|p| p.name.as_str())
            .collect();
        if left.trim().is_empty() && held.is_empty() && cached.is_empty() {
            Ok(())
        } else {
            let warnings = cp.kubectl_ok(&["get", "events", "--field-selector", "type=Warning"]).unwrap_or_default();
            Err(format!("pods {left:?}, held {held:?}, cached {cached:?}\n{warnings}"))
        }
    })
    .await;
}

/// carve-ipam on one node as its container runtime runs it: the installed
/// binary, the IPAM section of the installed conflist, the node's namespaces.
pub struct NodeIpam<'a> {
    pub node: &'a RealNode,
    conf: String,
}

impl<'a> NodeIpam<'a> {
    pub fn on(node: &'a RealNode) -> Self {
        let path = node.host_path("/etc/cni/net.d/10-carve.conflist");
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let plugin = &list["plugins"][0];
        let conf = json!({
            "cniVersion": list["cniVersion"],
            "name": list["name"],
            "type": plugin["type"],
            "ipam": plugin["ipam"],
        });
        NodeIpam { node, conf: conf.to_string() }
    }

    /// One carve-ipam call: the exit code and its JSON answer.
    pub fn call(&self, command: &str, container: &str) -> (i32, Value) {
        let mut child = self
            .node
            .command("/opt/cni/bin/carve-ipam")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", format!("/var/run/netns/{container}"))
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(self.conf.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let answer = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| json!({ "stdout": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr) }));
        (out.status.code().unwrap_or(-1), answer)
    }

    /// ADD until it gets an address, again after code 11 as kubelet would,
    /// until `deadline`; the last error answer otherwise.
    pub fn add(&self, container: &str, deadline: Instant) -> Result<IpAddr, Value> {
        loop {
            let (code, answer) = self.call("ADD", container);
            if code == 0 {
                let address = answer["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address: {answer}"));
                return Ok(address.parse::<IpNet>().unwrap().addr());
            }
            assert_eq!(answer["code"], json!(11), "only 'try again later' is expected: {answer}");
            if Instant::now() > deadline {
                return Err(answer);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn del(&self, container: &str) {
        let (code, answer) = self.call("DEL", container);
        assert_eq!(code, 0, "DEL {container} on {}: {answer}", self.node.name);
    }
}

/// What carve programs on a node: its conflist, VXLAN device, routes
/// (protocol 202) and nft table, as (what, present).
pub fn carve_on(node: &RealNode) -> Vec<(&'static str, bool)> {
    let ok = |program: &str, args: &[&str]| node.run(program, args).is_ok_and(|out| !out.trim().is_empty());
    vec![
        ("conflist", node.run("cat", &["/etc/cni/net.d/10-carve.conflist"]).is_ok()),
        ("vxlan device", node.run("ip", &["link", "show", "carve.vxlan"]).is_ok()),
        ("routes", ok("ip", &["route", "show", "proto", "202"])),
        ("nft table", node.run("nft", &["list", "table", "ip", "carve"]).is_ok()),
    ]
}
