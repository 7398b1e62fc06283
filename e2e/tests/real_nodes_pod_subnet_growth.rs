//! Pod Subnet blocks under load and under failure, at CNI level on real
//! nodes: three nodes share a dynamic VNet pool on their own /24
//! (10.224.0.0/24, nodes at .4–.6) with /28 blocks. carve-ipam is called the
//! way a container runtime calls it — the binary and conflist carve-agent
//! installed, run in the node's namespaces, ADD again after "try again later"
//! (code 11) — so one node can take 200 concurrent ADDs (above kubelet's 110
//! max pods) while its blocks grow. carve-agent and the leading
//! carve-controller are killed with SIGKILL during growth and during release;
//! after their restarts no block is in two nodes' status, every address a
//! node's store holds lies in that node's blocks, and the pool yields exactly
//! Azure's 251 addresses less the three node IPs. Needs root (CI has it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};
use ipnet::IpNet;
use serde_json::{Value, json};

mod real_nodes_support;
use real_nodes_support::{NodeIpam, deploy_carve_with, kubectl_json, node_blocks, store_ips};

const SUBNET: &str = "10.224.0.0/24";
const POOL: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: node-subnet}
spec:
  mode: VNet
  cidrs: [10.224.0.0/24]
  blockSize: {ipv4: 28}
  allocation: {strategy: Dynamic, maxBlocksPerNode: 16, releaseQuarantineSeconds: 5}
";

/// SIGKILLs the container process running `binary` in pod `namespace/pod`
/// (found by the pod's UID in its cgroup), as an OOM kill or a crash would.
fn kill_9(cluster: &Cluster, namespace: &str, pod: &str, binary: &str) {
    let uid =
        kubectl_json(cluster, &["-n", namespace, "get", "pod", pod])["metadata"]["uid"].as_str().unwrap().to_string();
    let mut killed = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cgroup.contains(&format!("pod{uid}")) && String::from_utf8_lossy(&cmdline).contains(binary) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed.push(pid);
        }
    }
    assert!(!killed.is_empty(), "no {binary} process of pod {namespace}/{pod} (uid {uid})");
    eprintln!("SIGKILL {binary} of {pod}: {killed:?}");
}

fn agent_pod(cluster: &Cluster, node: &str) -> String {
    let pods = kubectl_json(
        cluster,
        &[
            "-n",
            "carve-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=carve-agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ],
    );
    pods["items"][0]["metadata"]["name"].as_str().unwrap().to_string()
}

/// The replica holding the Lease (its identity is its pod name).
fn leader_pod(cluster: &Cluster) -> String {
    let lease = kubectl_json(cluster, &["-n", "carve-system", "get", "lease", "carve-controller"]);
    lease["spec"]["holderIdentity"].as_str().unwrap().to_string()
}

fn kill_leader(cluster: &Cluster) {
    kill_9(cluster, "carve-system", &leader_pod(cluster), "carve-controller");
}

fn kill_agent(cluster: &Cluster, node: &str) {
    kill_9(cluster, "carve-system", &agent_pod(cluster, node), "carve-agent");
}

/// Waits until `node`'s NNC spec satisfies `named` (releases wait out the
/// scaler's 30 s window after a demand peak); the spec then.
fn wait_spec(cluster: &Cluster, node: &str, named: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let spec = kubectl_json(cluster, &["get", "nnc", node])["spec"].clone();
        if named(&spec) {
            return spec;
        }
        assert!(Instant::now() < deadline, "{node}'s spec never got there: {spec}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// No block in two nodes' status; every address a node's store holds lies in
/// that node's blocks and is no node's address and not one Azure reserves.
/// Returns each node's store.
fn assert_invariants(cluster: &Cluster) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let blocks = node_blocks(cluster);
    let mut owner: BTreeMap<IpNet, &str> = BTreeMap::new();
    for (node, held) in &blocks {
        for b in held {
            if let Some(other) = owner.insert(*b, node) {
                panic!("{b} in the status of both {other} and {node}");
            }
        }
    }
    let node_ips: BTreeSet<IpAddr> = cluster.nodes().iter().map(|n| n.ip.parse().unwrap()).collect();
    let azure: BTreeSet<IpAddr> = carve_crds::net::azure_reserved(&SUBNET.parse().unwrap()).into_iter().collect();
    let mut stores = BTreeMap::new();
    for n in cluster.nodes() {
        let store = store_ips(n);
        let held = &blocks[&n.name];
        for ip in &store {
            assert!(held.iter().any(|b| b.contains(ip)), "{} holds {ip} outside its blocks {held:?}", n.name);
            assert!(!node_ips.contains(ip) && !azure.contains(ip), "{} handed out {ip}", n.name);
        }
        stores.insert(n.name.clone(), store);
    }
    stores
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_adds_grow_a_node_through_kills_and_the_subnet_yields_251_less_the_node_ips() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 3, images, ..Default::default() }).await.unwrap();
    // The direct ADDs below stand for pods that do not exist: to the leak
    // reconciler they are leaks, so it is off for this test of growth.
    deploy_carve_with(&cluster, POOL, &["CARVE_LEAK_CHECK_PERIOD=0"]).await;
    let start = node_blocks(&cluster);
    assert!(start.values().all(|b| b.len() == 1), "one block each to start: {start:?}");

    // Growth: 200 concurrent ADDs on node-1, its agent and the leading
    // controller killed while its blocks grow.
    let node1 = cluster.node("node-1");
    let runtime = NodeIpam::on(node1);
    let deadline = Instant::now() + Duration::from_secs(180);
    let grown: Vec<Result<IpAddr, Value>> = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let adds: Vec<_> = (0..200)
                .map(|i| {
                    s.spawn({
                        let r = &runtime;
                        move || r.add(&format!("burst-{i}"), deadline)
                    })
                })
                .collect();
            // The leader dies as the burst starts; the agent once it has
            // asked for more, so the request waits for a controller that is
            // restarting and the grant lands on an agent that is restarting.
            kill_leader(&cluster);
            let first = start["node-1"].len() as i64 * 16;
            let spec = wait_spec(&cluster, "node-1", |s| s["requestedIPs"]["ipv4"].as_i64().unwrap_or(0) > first);
            eprintln!("growing: spec {spec}, node-1 holds {:?}", node_blocks(&cluster)["node-1"]);
            kill_agent(&cluster, "node-1");
            adds.into_iter().map(|a| a.join().unwrap()).collect()
        })
    });
    let ips: BTreeSet<IpAddr> =
        grown.iter().map(|r| *r.as_ref().unwrap_or_else(|e| panic!("an ADD failed: {e}"))).collect();
    assert_eq!(ips.len(), 200, "200 ADDs, 200 distinct addresses");
    let stores = assert_invariants(&cluster);
    assert_eq!(stores["node-1"], ips, "node-1's store holds exactly the 200 addresses");
    let held = node_blocks(&cluster)["node-1"].len();
    assert!(held >= 13, "200 addresses need at least 13 /28 blocks: {held}");
    eprintln!("200 ADDs on node-1: {held} blocks");

    // The arithmetic: fill every node; the subnet yields exactly 251 less the node IPs.
    let runtimes: Vec<NodeIpam> = cluster.nodes().iter().map(NodeIpam::on).collect();
    let fill_deadline = Instant::now() + Duration::from_secs(30);
    let filled: Vec<(String, String, Result<IpAddr, Value>)> = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let adds: Vec<_> = runtimes
                .iter()
                .flat_map(|r| (0..60).map(move |i| (r, format!("fill-{i}"))))
                .map(|(r, id)| {
                    s.spawn(move || {
                        let got = r.add(&id, fill_deadline);
                        (r.node.name.clone(), id, got)
                    })
                })
                .collect();
            adds.into_iter().map(|a| a.join().unwrap()).collect()
        })
    });
    let stores = assert_invariants(&cluster);
    let subnet: IpNet = SUBNET.parse().unwrap();
    let azure = carve_crds::net::azure_reserved(&subnet);
    let node_ips: Vec<IpAddr> = cluster.nodes().iter().map(|n| n.ip.parse().unwrap()).collect();
    let expected: BTreeSet<IpAddr> = subnet
        .hosts()
        .chain([subnet.network(), subnet.broadcast()])
        .filter(|ip| !azure.contains(ip) && !node_ips.contains(ip))
        .collect();
    let all: BTreeSet<IpAddr> = stores.values().flatten().copied().collect();
    assert_eq!(expected.len(), 251 - 3);
    assert_eq!(all.len(), stores.values().map(BTreeSet::len).sum::<usize>(), "an address on two nodes");
    assert_eq!(all, expected, "every pod address of the /24 handed out, and nothing else");
    let refused: Vec<&Value> = filled.iter().filter_map(|(_, _, r)| r.as_ref().err()).collect();
    assert_eq!(filled.len() - refused.len(), expected.len() - 200, "the fill got exactly what was left");
    assert!(refused.iter().all(|e| e["code"] == json!(11)), "a full pool answers 'try again later': {refused:?}");
    let pool = kubectl_json(&cluster, &["get", "pcidr", "node-subnet"]);
    assert!(pool["status"]["unmetRequests"].as_i64().unwrap_or(0) > 0, "the unmet requests show: {}", pool["status"]);
    eprintln!("subnet full: {} pod addresses, {} ADDs told to try again later", all.len(), refused.len());

    // Release: every fill goes and the burst but for the pods in node-1's
    // first block (it filled first: oldest block first); the agent and the
    // leader are killed meanwhile; node-1 gives its empty blocks back.
    let first_block = start["node-1"][0];
    let kept: BTreeMap<String, IpAddr> = grown
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("burst-{i}"), *r.as_ref().unwrap()))
        .filter(|(_, ip)| first_block.contains(ip))
        .collect();
    assert!(kept.len() >= 8, "node-1's first block {first_block} is full: {kept:?}");
    tokio::task::block_in_place(|| {
        // The leader dies as the pods go; the agent once it names blocks to
        // give back, before any controller can remove them.
        kill_leader(&cluster);
        std::thread::scope(|s| {
            let mut dels = Vec::new();
            for (node, id, got) in &filled {
                if got.is_ok() {
                    let r = runtimes.iter().find(|r| &r.node.name == node).unwrap();
                    dels.push(s.spawn(move || r.del(id)));
                }
            }
            for id in (0..200).map(|i| format!("burst-{i}")).filter(|id| !kept.contains_key(id)) {
                let r = &runtimes[0];
                dels.push(s.spawn(move || r.del(&id)));
            }
            for d in dels {
                d.join().unwrap();
            }
        });
        let spec = wait_spec(&cluster, "node-1", |s| s["releases"].as_array().is_some_and(|r| !r.is_empty()));
        eprintln!("releasing: spec {spec}");
        kill_agent(&cluster, "node-1");
    });
    let shrunk = wait_for("node-1 gives its empty blocks back", Duration::from_secs(180), || async {
        let blocks = node_blocks(&cluster);
        let quarantined = kubectl_json(&cluster, &["get", "nnc"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["status"]["quarantined"].as_array().cloned().unwrap_or_default())
            .count();
        if blocks["node-1"].len() <= 2 && quarantined == 0 {
            Ok(blocks)
        } else {
            Err(format!("{blocks:?}, {quarantined} quarantined"))
        }
    })
    .await;
    let stores = assert_invariants(&cluster);
    let kept_ips: BTreeSet<IpAddr> = kept.values().copied().collect();
    assert_eq!(stores["node-1"], kept_ips, "the kept addresses stay, nothing else");
    assert!(shrunk["node-1"].contains(&first_block), "the block holding them stays: {shrunk:?}");
    // Pool status follows on the controller's next housekeeping pass.
    let held = shrunk.values().map(Vec::len).sum::<usize>() as i64;
    wait_for("pool status counts the blocks nodes hold", Duration::from_secs(60), || async {
        let pool = kubectl_json(&cluster, &["get", "pcidr", "node-subnet"]);
        let family = &pool["status"]["families"][0];
        if family["allocated"] == json!(held) && family["quarantined"] == json!(0) {
            Ok(())
        } else {
            Err(format!("{held} held: {}", pool["status"]))
        }
    })
    .await;
    eprintln!("after release: {shrunk:?}");

    // The kept ADDs are still the runtime's: DEL works after all the restarts.
    for id in kept.keys() {
        runtime.del(id);
    }
    assert!(store_ips(node1).is_empty());
    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
