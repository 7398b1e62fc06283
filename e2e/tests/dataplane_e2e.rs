//! The node plugin end to end: a local control plane + carve-controller, three
//! simulated nodes (network namespaces on one underlay bridge, itself in a
//! namespace), each with a carve-agent programming its namespace (`--netns`),
//! and "pods" (namespaces) wired by carve-cni through cnitool with the conflist
//! and plugins the agent installed. An "external" host sits on the underlay.
//! Needs root, `ip`, `bridge`, `ping` and `nft`; everything it creates is
//! named `e2e-<pid>-…` and deleted at the end, also on panic.
//!
//! Each simulated node's carve-ipam store sits in that node's temp dir
//! (`--ipam-data-dir`), as it would on separate machines.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use carve_crds::NodeNetworkConfig;
use carve_e2e::ControlPlane;
use carve_e2e::netns::{Netns, NetnsExt};
use carve_e2e::testkit::{metrics_addr, node, node_agent, start_controller, wait_for, wait_for_passes, workspace_bin};
use carve_testkit::cni::{Cnitool, PluginCall};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const NODES: usize = 3;

fn node_ip(i: usize) -> String {
    format!("192.168.77.{}", 10 + i)
}
const EXTERNAL_IP: &str = "192.168.77.100";

struct SimNode {
    name: String,
    ns: Netns,
    dir: PathBuf,
}

impl SimNode {
    fn state_file(&self) -> PathBuf {
        self.dir.join("node-state.json")
    }
    fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }
    fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// Destinations of the routes the agent owns (proto 202).
    fn carve_routes(&self) -> Vec<Value> {
        let v = self.ns.ip_json(&["route", "show", "proto", "202"]).unwrap();
        v.as_array().unwrap().clone()
    }
    fn carve_route_dsts(&self) -> Vec<String> {
        let mut d: Vec<String> =
            self.carve_routes().iter().map(|r| r["dst"].as_str().unwrap_or_default().to_string()).collect();
        d.sort();
        d
    }
    /// FDB destinations on the VXLAN device.
    fn fdb_dsts(&self) -> Vec<String> {
        let out = self.ns.exec("bridge", &["-j", "fdb", "show", "dev", "carve.vxlan"]).unwrap();
        let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
        let mut d: Vec<String> =
            v.as_array().unwrap().iter().filter_map(|e| e["dst"].as_str().map(str::to_string)).collect();
        d.sort();
        d
    }
    fn vxlan_tx_packets(&self) -> u64 {
        let v = self.ns.ip_json(&["-s", "link", "show", "carve.vxlan"]).unwrap();
        v[0]["stats64"]["tx"]["packets"].as_u64().expect("tx packets")
    }
}

struct Pod {
    ns: Netns,
    node: usize,
    ip: IpAddr,
}

/// One simulated cluster. Field order is drop order: the control plane stops
/// the agents first, then the namespaces go, then the temp dir.
struct Cluster {
    cp: ControlPlane,
    client: Client,
    pods: Vec<Pod>,
    nodes: Vec<SimNode>,
    external: Netns,
    _underlay: Netns,
    cnitool: PathBuf,
    cni_plugins: PathBuf,
    agent: PathBuf,
    source: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Free the addresses in the shared IPAM store even when a test failed.
        for i in 0..self.pods.len() {
            let _ = self.cnitool("del", i);
        }
    }
}

impl Cluster {
    async fn start(tag: &str, pool_yaml: &str) -> Cluster {
        let t0 = Instant::now();
        let prefix = format!("e2e-{}-{tag}", std::process::id());
        let tmp = carve_e2e::testkit::temp_dir(&prefix);

        let underlay = Netns::new(&format!("{prefix}-ul")).unwrap();
        underlay.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        underlay.ip(&["link", "set", "br0", "up"]).unwrap();
        let attach = |ns: &Netns, port: &str, addr: &str| {
            underlay.ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]).unwrap();
            underlay.ip(&["link", "set", port, "master", "br0", "up"]).unwrap();
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]).unwrap();
            ns.ip(&["link", "set", "eth0", "mtu", "1500", "up"]).unwrap();
        };
        let external = Netns::new(&format!("{prefix}-ext")).unwrap();
        attach(&external, "vext", EXTERNAL_IP);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let ns = Netns::new(&format!("{prefix}-n{i}")).unwrap();
            attach(&ns, &format!("vn{i}"), &node_ip(i));
            let dir = tmp.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            nodes.push(SimNode { name: format!("node-{i}"), ns, dir });
        }

        let cp = ControlPlane::start().await.expect("control plane");
        cp.install_crds().expect("CRDs");
        let client = cp.client().await.unwrap();
        start_controller(&cp, "controller", &[]).expect("controller");
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], pool_yaml).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let cni = workspace_bin("carve-node-plugin", "carve-cni").unwrap();
        workspace_bin("carve-node-plugin", "carve-ipam").unwrap();
        let agent = workspace_bin("carve-node-plugin", "carve-agent").unwrap();
        let source = cni.parent().unwrap().to_path_buf();
        let cluster = Cluster {
            cnitool: cp.bin("cnitool"),
            cni_plugins: cp.bin("cni-plugins"),
            cp,
            client,
            pods: Vec::new(),
            nodes,
            external,
            _underlay: underlay,
            agent,
            source,
            _tmp: tmp,
        };

        // Before any agent has run: no state file, so STATUS is 50 (the plugin is not available).
        let (code, stdout) = cluster.cni_status(0);
        assert_ne!(code, 0, "STATUS before the agent wrote its state fails: {stdout}");
        let err: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("STATUS output {stdout:?}: {e}"));
        assert_eq!(err["code"], 50, "{err}");
        assert!(err["msg"].as_str().unwrap_or_default().contains("node-state.json"), "{err}");
        eprintln!(
            "{prefix}: control plane up after {:?} ({:?} for the API server)",
            t0.elapsed(),
            cluster.cp.ready_after()
        );

        let nodes_api = Api::<Node>::all(cluster.client.clone());
        for (i, n) in cluster.nodes.iter().enumerate() {
            nodes_api.create(&PostParams::default(), &node(&n.name, &node_ip(i))).await.unwrap();
        }
        for i in 0..NODES {
            cluster.start_agent(i, &format!("agent-{i}"));
        }
        for n in &cluster.nodes {
            wait_for(&format!("{}: conflist and routes to both peers", n.name), WAIT, || async {
                let routes = n.carve_route_dsts();
                if n.conf_dir().join("10-carve.conflist").exists() && routes.len() == NODES - 1 {
                    Ok(())
                } else {
                    Err(format!("routes {routes:?}"))
                }
            })
            .await;
        }
        eprintln!("{prefix}: agents ready after {:?}", t0.elapsed());
        cluster
    }

    fn start_agent(&self, i: usize, process: &str) {
        let n = &self.nodes[i];
        let mut cmd = node_agent(&self.agent, self.cp.kubeconfig(), &n.name, &n.ns.path(), &n.dir, &self.source);
        cmd.arg("--ipam-data-dir").arg(n.dir.join("ipam")).args(["--resync-interval", "1s"]);
        // Its pass counter is what "after a few resyncs" waits on.
        cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        self.cp.spawn(process, cmd).unwrap();
    }

    /// carve-cni STATUS run directly, with node `i`'s (future) state file.
    fn cni_status(&self, i: usize) -> (i32, String) {
        let n = &self.nodes[i];
        let conf = json!({
            "cniVersion": "1.1.0", "name": "carve", "type": "carve-cni", "stateFile": n.state_file(),
            "ipam": { "type": "carve-ipam", "stateFile": n.state_file() },
        });
        let out = PluginCall::new(&self.source.join("carve-cni"), "STATUS").output(&conf);
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip netns exec <node ns> cnitool <verb> carve /run/netns/<pod>` with that node's conf and plugins.
    fn cnitool(&self, verb: &str, pod: usize) -> anyhow::Result<String> {
        let p = &self.pods[pod];
        let n = &self.nodes[p.node];
        let cni_path = format!("{}:{}", n.bin_dir().display(), self.cni_plugins.display());
        let conf_dir = n.conf_dir();
        let tool = Cnitool { ns: &n.ns.name, tool: &self.cnitool, conf_dir: &conf_dir, cni_path: cni_path.as_ref() };
        let out = tool.run(verb, "carve", &p.ns.path(), None)?;
        if !out.status.success() {
            anyhow::bail!(
                "cnitool {verb} for {} failed: {}{}",
                p.ns.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new pod namespace on node `node`, wired with `cnitool add`; returns its index.
    fn add_pod(&mut self, node: usize, tag: &str) -> usize {
        let ns = Netns::new(&format!("e2e-{}-{tag}", std::process::id())).unwrap();
        self.pods.push(Pod { ns, node, ip: IpAddr::from([0, 0, 0, 0]) });
        let idx = self.pods.len() - 1;
        let out = self.cnitool("add", idx).unwrap();
        let result: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("cnitool output {out:?}: {e}"));
        let addr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no IP in {result}"));
        self.pods[idx].ip = addr.parse::<IpNet>().unwrap().addr();
        idx
    }

    async fn blocks(&self, node: &str) -> Vec<IpNet> {
        let nnc = Api::<NodeNetworkConfig>::all(self.client.clone()).get(node).await.unwrap();
        let status = serde_json::to_value(nnc.status.unwrap()).unwrap();
        status["blocks"].as_array().unwrap().iter().map(|b| b["cidr"].as_str().unwrap().parse().unwrap()).collect()
    }

    /// TCP from pod `from` to `listener_ns` at `addr`: returns the source address the listener saw.
    fn tcp_source(&self, from: &Netns, listener_ns: &Netns, addr: SocketAddr) -> IpAddr {
        let server = listener_ns.tcp_echo_peer(addr).unwrap();
        let answer = from.tcp_exchange(addr).unwrap_or_else(|e| panic!("TCP {} -> {addr}: {e:#}", from.name));
        let peer = server.join().unwrap().unwrap();
        assert_eq!(answer, format!("from {}", peer.ip()), "the TCP exchange went both ways");
        peer.ip()
    }

    /// Pod-to-pod connectivity across nodes: ping both ways and TCP with the pod IP kept.
    fn assert_pods_connected(&self, a: usize, b: usize) {
        let (pa, pb) = (&self.pods[a], &self.pods[b]);
        assert!(pa.ns.ping(&pb.ip.to_string(), 5), "ping {} -> {}", pa.ip, pb.ip);
        assert!(pb.ns.ping(&pa.ip.to_string(), 5), "ping {} -> {}", pb.ip, pa.ip);
        let seen = self.tcp_source(&pa.ns, &pb.ns, SocketAddr::new(pb.ip, 7070));
        assert_eq!(seen, pa.ip, "pod-to-pod TCP keeps the pod IP (no SNAT)");
    }

    /// Every address allocated in any node's carve-ipam store.
    fn ipam_store(&self) -> Vec<String> {
        let mut ips = Vec::new();
        for n in &self.nodes {
            let Ok(body) = std::fs::read(n.dir.join("ipam/allocations.json")) else { continue };
            let v: Value = serde_json::from_slice(&body).unwrap();
            ips.extend(v["allocations"].as_array().unwrap().iter().map(|e| e["ip"].as_str().unwrap().to_string()));
        }
        ips
    }

    /// Stops node `i`'s agent, starts a new one, and checks the dataplane is unchanged.
    async fn restart_agent_unchanged(&self, i: usize, old: &str, new: &str) {
        let n = &self.nodes[i];
        let before = n.ns.ip(&["-4", "-j", "route", "show", "table", "all"]).unwrap();
        self.cp.stop_process(old);
        self.start_agent(i, new);
        wait_for(&format!("{new} ready"), WAIT, || async {
            let log = self.cp.log_tail(new, 200);
            if log.contains("caches ready") { Ok(()) } else { Err(log) }
        })
        .await;
        // A few resyncs (1s) after the caches are ready.
        let addr = metrics_addr(&self.cp, new).await;
        wait_for_passes(&format!("{new}: three passes"), &addr, "carve_agent_reconciles_total", 3.0).await;
        let after = n.ns.ip(&["-4", "-j", "route", "show", "table", "all"]).unwrap();
        let parse = |s: &str| -> Value { serde_json::from_str(s).unwrap() };
        assert_eq!(parse(&before), parse(&after), "routes of {} unchanged by the agent restart", n.name);
        let log = self.cp.log_tail(new, 400);
        assert!(!log.contains("ERROR"), "agent errors after restart:\n{log}");
    }

    /// DEL of a fresh pod frees its IP in the store.
    fn assert_del_frees_ip(&mut self, node: usize, tag: &str) {
        let p = self.add_pod(node, tag);
        let ip = self.pods[p].ip.to_string();
        assert!(self.ipam_store().contains(&ip), "{ip} recorded after ADD: {:?}", self.ipam_store());
        self.cnitool("del", p).unwrap();
        assert!(!self.ipam_store().contains(&ip), "{ip} freed by DEL: {:?}", self.ipam_store());
        assert!(self.pods[p].ns.ip_json(&["addr", "show", "dev", "eth0"]).is_err(), "pod eth0 gone after DEL");
        // DEL again is fine (idempotent).
        self.cnitool("del", p).unwrap();
    }

    /// Deletes node `gone`'s Node; its routes (and FDB entries) go from the others.
    async fn remove_node(&mut self, gone: usize, pod_on_it: usize, fdb: bool) {
        let block = self.blocks(&self.nodes[gone].name).await[0].to_string();
        let gone_ip = node_ip(gone);
        for (i, n) in self.nodes.iter().enumerate().filter(|(i, _)| *i != gone) {
            assert!(n.carve_route_dsts().contains(&block), "node-{i} routes to {block} before");
            if fdb {
                assert!(n.fdb_dsts().contains(&gone_ip), "node-{i} FDB has {gone_ip} before");
            }
        }
        self.cnitool("del", pod_on_it).unwrap();
        Api::<Node>::all(self.client.clone()).delete(&self.nodes[gone].name, &DeleteParams::default()).await.unwrap();
        for n in self.nodes.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| n) {
            wait_for(&format!("{}: {block} route and {gone_ip} FDB entry gone", n.name), WAIT, || async {
                let routes = n.carve_route_dsts();
                let fdbs = if fdb { n.fdb_dsts() } else { vec![] };
                if routes.len() == NODES - 2 && !routes.contains(&block) && !fdbs.contains(&gone_ip) {
                    Ok(())
                } else {
                    Err(format!("routes {routes:?} fdb {fdbs:?}"))
                }
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_pods_talk_across_nodes_over_vxlan_with_snat_to_the_outside() {
    let t0 = Instant::now();
    let pool = "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: overlay\nspec:\n  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 24}\n";
    let mut c = Cluster::start("o", pool).await;
    for i in 0..NODES {
        c.add_pod(i, &format!("o-p{i}"));
    }

    // Each pod IP lies in its node's block.
    for p in &c.pods {
        let blocks = c.blocks(&c.nodes[p.node].name).await;
        assert!(blocks.iter().any(|b| b.contains(&p.ip)), "{} in node-{}'s blocks {blocks:?}", p.ip, p.node);
        assert!("10.244.0.0/16".parse::<IpNet>().unwrap().contains(&p.ip));
    }
    // The overlay is a VXLAN device with an FDB entry per peer.
    for (i, n) in c.nodes.iter().enumerate() {
        let peers: Vec<String> = (0..NODES).filter(|j| *j != i).map(node_ip).collect();
        assert_eq!(n.fdb_dsts(), peers, "{} FDB", n.name);
        for r in n.carve_routes() {
            assert_eq!(r["dev"], "carve.vxlan", "{} route {r}", n.name);
        }
    }

    // Pod to pod across nodes: ping and TCP, pod IPs kept, through the VXLAN device.
    let tx0 = c.nodes[0].vxlan_tx_packets();
    c.assert_pods_connected(0, 1);
    c.assert_pods_connected(0, 2);
    c.assert_pods_connected(1, 2);
    let tx1 = c.nodes[0].vxlan_tx_packets();
    assert!(tx1 >= tx0 + 4, "carve.vxlan tx on node-0 grew from {tx0} to {tx1}");

    // Pod to an external host: SNAT to the node IP.
    for p in 0..NODES {
        let port = 8080 + p as u16;
        let seen = c.tcp_source(&c.pods[p].ns, &c.external, SocketAddr::new(EXTERNAL_IP.parse().unwrap(), port));
        assert_eq!(seen.to_string(), node_ip(c.pods[p].node), "pod {} -> external SNATs to its node IP", p);
    }
    // The external host is not routed to pods (it answers to the node IP only).
    assert!(c.external.ip(&["route", "get", &c.pods[0].ip.to_string()]).is_err());

    // Agent restart: dataplane unchanged, pods still connected.
    c.restart_agent_unchanged(0, "agent-0", "agent-0b").await;
    c.assert_pods_connected(0, 1);

    // DEL frees the IP.
    c.assert_del_frees_ip(0, "o-del");

    // A node removed: its route and FDB entry go from the others.
    c.remove_node(2, 2, true).await;
    c.assert_pods_connected(0, 1);
    eprintln!("overlay test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnet_pods_talk_across_nodes_over_plain_routes_without_snat() {
    let t0 = Instant::now();
    let pool = "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: vnet\nspec:\n  mode: VNet\n  cidrs: [10.224.0.0/16]\n  blockSize: {ipv4: 28}\n";
    let mut c = Cluster::start("v", pool).await;
    for i in 0..NODES {
        c.add_pod(i, &format!("v-p{i}"));
    }
    for p in &c.pods {
        let blocks = c.blocks(&c.nodes[p.node].name).await;
        assert!(blocks.iter().any(|b| b.contains(&p.ip)), "{} in node-{}'s blocks {blocks:?}", p.ip, p.node);
        assert!(blocks.iter().all(|b| b.prefix_len() == 28), "{blocks:?}");
    }
    // Plain routes via the peers' node IPs, no VXLAN device.
    for (i, n) in c.nodes.iter().enumerate() {
        assert!(n.ns.ip(&["link", "show", "carve.vxlan"]).is_err(), "{} has no carve.vxlan", n.name);
        let mut gws: Vec<String> =
            n.carve_routes().iter().map(|r| r["gateway"].as_str().unwrap_or_default().to_string()).collect();
        gws.sort();
        let peers: Vec<String> = (0..NODES).filter(|j| *j != i).map(node_ip).collect();
        assert_eq!(gws, peers, "{} routes {:?}", n.name, n.carve_routes());
        assert!(n.carve_routes().iter().all(|r| r["dev"] == "eth0"), "{:?}", n.carve_routes());
    }
    c.assert_pods_connected(0, 1);
    c.assert_pods_connected(0, 2);
    c.assert_pods_connected(1, 2);

    c.restart_agent_unchanged(1, "agent-1", "agent-1b").await;
    c.assert_pods_connected(1, 2);
    c.assert_del_frees_ip(1, "v-del");
    c.remove_node(2, 2, false).await;
    c.assert_pods_connected(0, 1);
    eprintln!("vnet test took {:?}", t0.elapsed());
}
