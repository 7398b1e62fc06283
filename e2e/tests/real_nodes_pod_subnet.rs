//! Pod Subnet blocks on real nodes: a dynamic VNet pool on the nodes' own
//! subnet (10.224.0.0/24 underlay, Azure's layout: the gateway at .1, nodes
//! from .4) with /28 blocks. A node grows to the blocks 60 pods need, gives
//! the empty ones back when 50 go, and no pod ever gets a node's address or
//! one of Azure's reserved ones; a host on the subnet that is not a node
//! reaches a pod directly. Needs root (CI has it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use carve_e2e::cluster::{CONTROL_PLANE_IP, Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};
use ipnet::IpNet;
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{
    EXTERNAL_IP, Pod, deploy_carve, example, external_host, kubectl_json, running_pods, store_ips, workload_on,
};

/// The dynamic example with a short quarantine, so the test sees a block go back to the pool.
fn dynamic_pool() -> String {
    example("pod-subnet-dynamic.yaml").replace("releaseQuarantineSeconds: 30", "releaseQuarantineSeconds: 5")
}

/// A node's NNC as the test reads it: blocks by allocation ID, reservedIPs, quarantined CIDRs.
type NncView = (BTreeMap<String, IpNet>, BTreeSet<IpAddr>, Vec<String>);

fn nnc(cluster: &Cluster, node: &str) -> NncView {
    let n = kubectl_json(cluster, &["get", "nnc", node]);
    let s = &n["status"];
    let blocks = s["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| (b["allocationID"].as_str().unwrap().to_string(), b["cidr"].as_str().unwrap().parse().unwrap()))
        .collect();
    let reserved = s["reservedIPs"].as_array().into_iter().flatten().map(|i| i.as_str().unwrap().parse().unwrap());
    let quarantined = s["quarantined"].as_array().into_iter().flatten().map(|q| q["cidr"].as_str().unwrap().into());
    (blocks, reserved.collect(), quarantined.collect())
}

async fn scale_to(cluster: &Cluster, name: &str, replicas: usize) -> Vec<Pod> {
    let cp = cluster.cp();
    cp.kubectl_ok(&["scale", &format!("deployment/{name}"), &format!("--replicas={replicas}")]).unwrap();
    wait_for(&format!("{replicas} {name} pods Running"), Duration::from_secs(300), || async {
        let pods = running_pods(cluster, &format!("app={name}"));
        let all = kubectl_json(cluster, &["get", "pods", "-l", &format!("app={name}")]);
        let total = all["items"].as_array().map_or(0, |a| a.len());
        if pods.len() == replicas && total == replicas {
            Ok(pods)
        } else {
            let events = cp.kubectl_ok(&["get", "events", "--field-selector", "type=Warning"]).unwrap_or_default();
            Err(format!(
                "{} running of {total}\n{}",
                pods.len(),
                events.lines().rev().take(8).collect::<Vec<_>>().join("\n")
            ))
        }
    })
    .await
}

/// Every pod address inside its node's blocks, none reserved, none a node's, none twice.
fn assert_addresses(cluster: &Cluster, pods: &[Pod]) {
    let node_ips: BTreeSet<IpAddr> = cluster.nodes().iter().map(|n| n.ip.parse().unwrap()).collect();
    let subnet: IpNet = "10.224.0.0/16".parse().unwrap();
    let azure: BTreeSet<IpAddr> = carve_crds::net::azure_reserved(&subnet).into_iter().collect();
    let mut seen = BTreeSet::new();
    let mut by_node: BTreeMap<String, NncView> = BTreeMap::new();
    for p in pods {
        let (blocks, reserved, _) = by_node.entry(p.node.clone()).or_insert_with(|| nnc(cluster, &p.node));
        assert!(blocks.values().any(|b| b.contains(&p.ip)), "{p:?} outside {}'s blocks {blocks:?}", p.node);
        assert!(!reserved.contains(&p.ip), "{p:?} got a reserved address");
        assert!(!node_ips.contains(&p.ip), "{p:?} got a node's address");
        assert!(!azure.contains(&p.ip), "{p:?} got one of Azure's reserved addresses");
        assert_ne!(p.ip.to_string(), CONTROL_PLANE_IP, "{p:?} got the gateway's address");
        assert!(seen.insert(p.ip), "{} handed out twice", p.ip);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_pod_subnet_node_grows_to_its_pods_and_gives_empty_blocks_back() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    deploy_carve(&cluster, &dynamic_pool()).await;
    let (start, reserved, _) = nnc(&cluster, "node-1");
    assert_eq!(start.len(), 1, "one block to start: {start:?}");
    for n in cluster.nodes() {
        let ip: IpAddr = n.ip.parse().unwrap();
        let holder = ["node-1", "node-2"].into_iter().find(|h| nnc(&cluster, h).0.values().any(|b| b.contains(&ip)));
        if let Some(h) = holder {
            assert!(nnc(&cluster, h).1.contains(&ip), "{}'s address {ip} is withheld on {h}", n.name);
        }
    }
    eprintln!("node-1 starts with {start:?}, reserved {reserved:?}");

    // Growth: 60 pods on node-1 need 60 + 8 (half a block free) addresses: at least 5 blocks of /28.
    cluster.cp().kubectl_stdin(&["apply", "-f", "-"], &workload_on("burst", "node-1", 60)).unwrap();
    let pods = scale_to(&cluster, "burst", 60).await;
    assert_addresses(&cluster, &pods);
    let (grown, _, _) = nnc(&cluster, "node-1");
    assert!(grown.len() >= 5, "60 pods on /28 blocks: {grown:?}");
    for (id, block) in &start {
        assert_eq!(grown.get(id), Some(block), "the first grant stays, under its ID");
    }
    let store = store_ips(cluster.node("node-1"));
    assert!(pods.iter().all(|p| store.contains(&p.ip)), "every pod address in node-1's IPAM store");
    // Peers route every grown block via node-1.
    let routes = cluster.node("node-2").netns().ip(&["route", "show", "proto", "202"]).unwrap();
    for block in grown.values() {
        assert!(routes.contains(&format!("{block} via {}", cluster.node("node-1").ip)), "{block} in {routes}");
    }
    eprintln!("60 pods: node-1 holds {} blocks", grown.len());

    // A host on the subnet that is not a node reaches a pod directly (proxy ARP on node-1).
    let external = external_host(&cluster);
    let target = pods[pods.len() - 1].ip.to_string();
    assert!(external.ping(&target, 3), "{EXTERNAL_IP} -> pod {target}: no answer (proxy ARP on node-1?)");
    drop(external);

    // Shrink: 50 pods go; the node gives back the blocks that empty, keeping
    // more than half a block free, and no remaining pod changes its address.
    let kept = scale_to(&cluster, "burst", 10).await;
    let before: BTreeMap<String, IpAddr> = pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
    for p in &kept {
        assert_eq!(before.get(&p.name), Some(&p.ip), "{p:?} kept its address");
    }
    let shrunk = wait_for("node-1 gives blocks back", Duration::from_secs(120), || async {
        let (blocks, _, quarantined) = nnc(&cluster, "node-1");
        if blocks.len() < grown.len() { Ok((blocks, quarantined)) } else { Err(format!("{blocks:?}")) }
    })
    .await;
    eprintln!("10 pods: node-1 holds {} blocks, quarantined {:?}", shrunk.0.len(), shrunk.1);
    for p in &kept {
        assert!(shrunk.0.values().any(|b| b.contains(&p.ip)), "{p:?}'s block stays with node-1: {:?}", shrunk.0);
    }
    let spec = kubectl_json(&cluster, &["get", "nnc", "node-1"])["spec"].clone();
    let requested = spec["requestedIPs"]["ipv4"].as_i64().unwrap_or_default();
    assert!((10..=10 + 16).contains(&requested), "requestedIPs follows demand: {spec}");
    // It gives back one block per pass as the 30 s demand peak ages out:
    // wait until nothing has changed for 10 s, then nothing flaps for 10 s more.
    let mut last = (shrunk.0.clone(), Instant::now());
    let settled = wait_for("node-1's blocks to settle", Duration::from_secs(90), || {
        let now = nnc(&cluster, "node-1").0;
        if now != last.0 {
            last = (now, Instant::now());
        }
        let stable_for = last.1.elapsed();
        let blocks = last.0.clone();
        async move { if stable_for >= Duration::from_secs(10) { Ok(blocks) } else { Err(format!("{blocks:?}")) } }
    })
    .await;
    let holding: BTreeSet<IpNet> =
        settled.values().filter(|b| kept.iter().any(|p| b.contains(&p.ip))).copied().collect();
    assert!(settled.len() <= holding.len() + 1, "empty blocks given back: {settled:?}, pods in {holding:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (after, _, quarantined) = nnc(&cluster, "node-1");
    assert_eq!(after, settled, "the node's blocks stay put under a steady pod count");
    assert!(quarantined.is_empty(), "quarantine over after 5 s: {quarantined:?}");
    eprintln!("settled: node-1 holds {} blocks", settled.len());
    assert_addresses(&cluster, &running_pods(&cluster, "app=burst"));
    let pool = kubectl_json(&cluster, &["get", "pcidr", "pod-subnet-dynamic"]);
    assert_eq!(pool["status"]["unmetRequests"], Value::from(0), "{}", pool["status"]);

    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
