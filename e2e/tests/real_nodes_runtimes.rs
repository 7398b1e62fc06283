//! One conflist, two runtimes: a cluster whose node-1 runs Debian's containerd
//! 1.6 (libcni 1.1.2, CNI results up to 1.0.0) and node-2 containerd 2
//! (libcni 1.2+: picks 1.1.0 from the conflist's `cniVersions`, and asks the
//! plugin's STATUS for node readiness). carve deployed from its manifests
//! networks a pod on each, at the version each runtime chose, and tears both
//! down. Needs root (CI has it).

use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions, Runtime};
use carve_e2e::testkit::{node_images, wait_for};
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{
    cached_results, deploy_carve, example, exec, node_blocks, running_pods, store_ips, wait_released,
};

fn pod_on(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: runtimes}}}}
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
    - name: busybox
      image: carve.local/busybox:v1
      imagePullPolicy: Never
      command: ["sleep", "3600"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conflist_serves_containerd_1_6_at_cni_1_0_and_containerd_2_at_1_1() {
    let images = node_images().expect("build the node images");
    let opts = ClusterOptions {
        nodes: 2,
        images,
        runtimes: vec![Runtime::Containerd16, Runtime::Containerd2],
        ..Default::default()
    };
    let cluster = Cluster::start(opts).await.expect("cluster with a containerd 1.6 and a containerd 2 node");
    let cp = cluster.cp();
    assert_eq!(cluster.node("node-1").runtime, Runtime::Containerd16);
    assert_eq!(cluster.node("node-2").runtime, Runtime::Containerd2);
    let runtime_version = |node: &str| {
        cp.kubectl_ok(&["get", "node", node, "-o", "jsonpath={.status.nodeInfo.containerRuntimeVersion}"]).unwrap()
    };
    let (v1, v2) = (runtime_version("node-1"), runtime_version("node-2"));
    assert!(v1.starts_with("containerd://1.6."), "node-1 runs Debian's containerd 1.6: {v1}");
    assert!(v2.starts_with("containerd://2"), "node-2 runs containerd 2: {v2}");
    eprintln!("node-1: {v1}, node-2: {v2}");

    // Deploy as users do.
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    let conflist = std::fs::read_to_string(cluster.node("node-2").host_path("/etc/cni/net.d/10-carve.conflist"))
        .expect("the agent's conflist on node-2");
    let conflist: Value = serde_json::from_str(&conflist).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0", "{conflist}");
    assert!(conflist["cniVersions"].as_array().unwrap().iter().any(|v| v == "1.1.0"), "{conflist}");
    // containerd 2 asks the plugin's STATUS (its log carries carve-cni's
    // stderr); 1.6's libcni has no such verb.
    let asked_status = |node: &str| cluster.node(node).log_tail("containerd", usize::MAX).contains(r#""STATUS""#);
    assert!(asked_status("node-2"), "containerd 2 called carve-cni STATUS");
    assert!(!asked_status("node-1"), "containerd 1.6 never calls STATUS");

    // A pod on each node, each IP inside its node's block and in its store.
    for (name, node) in [("rt-1", "node-1"), ("rt-2", "node-2")] {
        cp.kubectl_stdin(&["apply", "-f", "-"], &pod_on(name, node)).unwrap();
    }
    let pods = wait_for("a pod Running on each node", Duration::from_secs(120), || async {
        let running = running_pods(&cluster, "app=runtimes");
        if running.len() == 2 {
            Ok(running)
        } else {
            let events = cp.kubectl_ok(&["get", "events", "--field-selector", "type=Warning"]).unwrap_or_default();
            Err(format!("{}\n{events}", cp.kubectl_ok(&["get", "pods", "-o", "wide"]).unwrap_or_default()))
        }
    })
    .await;
    let blocks = node_blocks(&cluster);
    for p in &pods {
        assert_eq!(p.node, if p.name == "rt-1" { "node-1" } else { "node-2" }, "{p:?}");
        let block = &blocks[&p.node];
        assert!(block.iter().any(|b| b.contains(&p.ip)), "{p:?} outside {}'s blocks {block:?}", p.node);
        assert!(store_ips(cluster.node(&p.node)).contains(&p.ip), "{p:?} not in its node's IPAM store");
    }
    assert_ne!(pods[0].ip, pods[1].ip);

    // Across the nodes, both ways (each exec served by that node's runtime).
    for (from, to) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
        let ping = exec(&cluster, &from.name, &["ping", "-c", "2", "-W", "2", &to.ip.to_string()]);
        assert!(ping.is_ok(), "ping {} ({}) -> {} ({}): {ping:?}", from.name, from.node, to.name, to.node);
    }

    // The version each runtime asked for, as its libcni cached the ADD result.
    for p in &pods {
        let want = if p.node == "node-1" { "1.0.0" } else { "1.1.0" };
        let cached = cached_results(cluster.node(&p.node), p.ip);
        assert_eq!(cached.len(), 1, "{p:?}: one cached result holds its IP: {cached:?}");
        assert_eq!(cached[0].1, want, "{p:?}: {:?} cached {cached:?}", cluster.node(&p.node).runtime);
        eprintln!("{} on {}: cached result {} at cniVersion {}", p.name, p.node, cached[0].0, cached[0].1);
    }

    // Deleting the pods runs DEL on both runtimes: gone (not stuck
    // Terminating), results uncached, addresses back in the stores.
    cp.kubectl_ok(&["delete", "pod", "rt-1", "rt-2", "--wait=true", "--timeout=60s"]).unwrap();
    wait_released(&cluster, "app=runtimes", &pods, Duration::from_secs(60)).await;

    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
