//! A node out of pod addresses, on real nodes: two nodes on a Static VNet
//! pool whose one /28 per node holds fewer pods than the kubelet's max pods.
//! When node-1's block is full, carve-agent taints it
//! `carve.dev/no-pod-addresses:NoSchedule`, so a Deployment scaled up
//! afterwards lands on node-2 (none of its pods waits in ContainerCreating on
//! node-1); freeing one address removes the taint. Needs root (CI has it).

use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for, workspace_bin};
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{deploy_carve, kubectl_json, running_pods, store_ips, workload_on};

const POOL: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: small-static}
spec:
  mode: VNet
  cidrs: [10.225.0.0/24]
  blockSize: {ipv4: 28}
  allocation: {strategy: Static, maxPods: 12}
";
const TAINT: &str = "carve.dev/no-pod-addresses";
const WAIT: Duration = Duration::from_secs(180);

/// A Deployment with no placement rule of its own: the scheduler decides.
const EXTRA: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: extra, namespace: default}
spec:
  replicas: 4
  selector: {matchLabels: {app: extra}}
  template:
    metadata: {labels: {app: extra}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - {name: busybox, image: carve.local/busybox:v1, imagePullPolicy: Never, command: ["sleep", "3600"]}
"#;

fn tainted(cluster: &Cluster, node: &str) -> bool {
    let n = kubectl_json(cluster, &["get", "node", node]);
    n["spec"]["taints"].as_array().into_iter().flatten().any(|t| t["key"] == TAINT && t["effect"] == "NoSchedule")
}

fn event_on(cluster: &Cluster, node: &str, reason: &str) -> Option<Value> {
    let events = kubectl_json(cluster, &["get", "events", "-A", "--field-selector", &format!("reason={reason}")]);
    events["items"].as_array()?.iter().find(|e| e["involvedObject"]["name"] == node).cloned()
}

#[tokio::test]
async fn a_full_node_is_tainted_so_new_pods_go_elsewhere_and_untainted_when_an_address_frees() {
    let images = node_images().expect("build the node images");
    let cluster =
        Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.expect("2 real nodes");
    deploy_carve(&cluster, POOL).await;
    let cp = cluster.cp();
    let (node1, node2) = (&cluster.nodes()[0], &cluster.nodes()[1]);
    assert!(!tainted(&cluster, &node1.name) && !tainted(&cluster, &node2.name));

    // More pods pinned to node-1 than its block holds: the block fills, the taint appears.
    cp.kubectl_stdin(&["apply", "-f", "-"], &workload_on("fill", &node1.name, 20)).unwrap();
    wait_for(&format!("{} tainted {TAINT}", node1.name), WAIT, || async {
        let running = running_pods(&cluster, "app=fill").len();
        if tainted(&cluster, &node1.name) { Ok(()) } else { Err(format!("{running} fill pods Running")) }
    })
    .await;
    let capacity = store_ips(node1).len();
    assert!((8..20).contains(&capacity), "one /28 less reserved addresses: {capacity}");
    let event = event_on(&cluster, &node1.name, "NoPodAddresses").expect("an Event says why");
    let note = event["message"].as_str().unwrap_or_default();
    assert!(note.contains("Static") && note.contains(&format!("{capacity} of {capacity} in use")), "{event}");
    // Keep only what fits; node-1 stays full, so stays tainted.
    cp.kubectl_ok(&["scale", "deployment/fill", &format!("--replicas={capacity}")]).unwrap();
    wait_for("the fill pods that fit Running, the rest gone", WAIT, || async {
        let all = kubectl_json(&cluster, &["get", "pods", "-l", "app=fill"]);
        let running = running_pods(&cluster, "app=fill").len();
        let count = all["items"].as_array().unwrap().len();
        if running == capacity && count == capacity { Ok(()) } else { Err(format!("{running}/{count}")) }
    })
    .await;
    // Full again with the pods that fit. A running pod the scale-down replaced
    // may have freed its address for a moment, so the taint is awaited.
    wait_for(&format!("{} tainted while its block is full", node1.name), WAIT, || async {
        if tainted(&cluster, &node1.name) { Ok(()) } else { Err(format!("store {}", store_ips(node1).len())) }
    })
    .await;
    let carvectl = workspace_bin("carve-controller", "carvectl").unwrap();
    let out = std::process::Command::new(carvectl)
        .args(["status", "-o", "json", "--kubeconfig"])
        .arg(cp.kubeconfig())
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let flags: Vec<(Value, Value)> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["node"].clone(), n["noPodAddresses"].clone()))
        .collect();
    assert_eq!(
        flags,
        [(Value::from(node1.name.as_str()), Value::from(true)), (Value::from(node2.name.as_str()), Value::from(false))],
        "carvectl status: {status}"
    );

    // A Deployment scaled up now lands on node-2 only.
    cp.kubectl_stdin(&["apply", "-f", "-"], EXTRA).unwrap();
    let extra = wait_for("4 extra pods Running", WAIT, || async {
        let pods = running_pods(&cluster, "app=extra");
        if pods.len() == 4 { Ok(pods) } else { Err(format!("{} Running", pods.len())) }
    })
    .await;
    assert!(extra.iter().all(|p| p.node == node2.name), "a pod went to the full node: {extra:?}");
    let bound = kubectl_json(&cluster, &["get", "pods", "-l", "app=extra", "--field-selector", "spec.nodeName!="]);
    assert_eq!(bound["items"].as_array().unwrap().len(), 4, "every extra pod is bound");

    // One address free again: the taint goes.
    cp.kubectl_ok(&["scale", "deployment/fill", &format!("--replicas={}", capacity - 1)]).unwrap();
    wait_for(&format!("{} untainted", node1.name), WAIT, || async {
        if tainted(&cluster, &node1.name) { Err("still tainted".to_string()) } else { Ok(()) }
    })
    .await;
    assert!(event_on(&cluster, &node1.name, "PodAddressesAvailable").is_some(), "an Event says it ended");
    assert!(!tainted(&cluster, &node2.name), "node-2 has free addresses throughout");
}
