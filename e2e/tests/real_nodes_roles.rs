//! carve-agent's roles on real nodes: with its own dataplane it refuses to be
//! one of two (another network config sorting first, another dataplane's
//! device) and says so on the Node; switched to `ipam-only` it hands the
//! node over to another dataplane — nothing of carve's left on the node, the
//! blocks and podCIDRs kept — and switched back it wires pods again. Needs
//! root (CI has it).

use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};

mod real_nodes_support;
use real_nodes_support::{HOSTNAME_PORT, carve_on, condition, deploy_carve, example, exec, kubectl_json, run_workload};

const WAIT: Duration = Duration::from_secs(90);

/// The Node's NetworkUnavailable condition as (status, reason, message).
fn network_unavailable(cluster: &Cluster, node: &str) -> (String, String, String) {
    let node = kubectl_json(cluster, &["get", "node", node]);
    let c = condition(&node, "NetworkUnavailable").cloned().unwrap_or_default();
    let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (field("status"), field("reason"), field("message"))
}

/// An agent pass now (a watched NNC changed) rather than at the next resync.
fn nudge(cluster: &Cluster, node: &str, n: usize) {
    cluster.cp().kubectl_ok(&["annotate", "nnc", node, &format!("carve.dev/test-nudge={n}"), "--overwrite"]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_names_another_dataplane_in_its_way_and_hands_the_node_over_in_ipam_only() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    let cp = cluster.cp();
    let node1 = cluster.node("node-1");

    // Another network config that the runtime would pick before carve's.
    node1.run("sh", &["-c", "echo '{\"cniVersion\":\"1.0.0\",\"name\":\"other\",\"plugins\":[]}' > /etc/cni/net.d/05-other.conflist"]).unwrap();
    nudge(&cluster, "node-1", 1);
    wait_for("node-1 NetworkUnavailable, ForeignCNIConfig", WAIT, || async {
        let (status, reason, message) = network_unavailable(&cluster, "node-1");
        let named =
            message.contains("/etc/cni/net.d/05-other.conflist sorts before carve's /etc/cni/net.d/10-carve.conflist");
        if status == "True" && reason == "ForeignCNIConfig" && named {
            Ok(())
        } else {
            Err(format!("{status} {reason}: {message}"))
        }
    })
    .await;
    let events = cp
        .kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=Node,involvedObject.name=node-1,reason=ForeignCNIConfig",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(!events.trim().is_empty(), "a Warning Event on node-1 names the foreign config");
    assert_eq!(network_unavailable(&cluster, "node-2").0, "False", "node-2 is not disturbed");
    node1.run("rm", &["/etc/cni/net.d/05-other.conflist"]).unwrap();
    nudge(&cluster, "node-1", 2);
    wait_for("node-1's network available again", WAIT, || async {
        let c = network_unavailable(&cluster, "node-1");
        if c.0 == "False" { Ok(()) } else { Err(format!("{c:?}")) }
    })
    .await;

    // Another dataplane's device on the node (Cilium's cilium_host).
    // As Cilium makes it: the cilium_host / cilium_net veth pair.
    node1.run("ip", &["link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net"]).unwrap();
    nudge(&cluster, "node-1", 3);
    wait_for("node-1 NetworkUnavailable, ForeignDataplane", WAIT, || async {
        let (status, reason, message) = network_unavailable(&cluster, "node-1");
        if status == "True" && reason == "ForeignDataplane" && message.contains("Cilium's dataplane runs on this node")
        {
            Ok(())
        } else {
            Err(format!("{status} {reason}: {message}"))
        }
    })
    .await;
    node1.run("ip", &["link", "del", "cilium_host"]).unwrap();
    nudge(&cluster, "node-1", 4);
    cluster.wait_network_ready().await.unwrap();

    // ipam-only: the node handed over, the blocks and podCIDRs kept.
    let blocks =
        |c: &Cluster| c.cp().kubectl_ok(&["get", "nnc", "-o", "jsonpath={.items[*].status.blockCIDRs}"]).unwrap();
    let blocks_before = blocks(&cluster);
    let cidrs = |c: &Cluster| c.cp().kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"]).unwrap();
    let cidrs_before = cidrs(&cluster);
    for node in cluster.nodes() {
        assert!(
            carve_on(node).iter().all(|(_, on)| *on),
            "{}: carve's dataplane before: {:?}",
            node.name,
            carve_on(node)
        );
    }
    cp.kubectl_ok(&[
        "-n",
        "carve-system",
        "set",
        "env",
        "daemonset/carve-agent",
        "-c",
        "agent",
        "CARVE_ROLE=ipam-only",
    ])
    .unwrap();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"]).unwrap();
    for node in cluster.nodes() {
        wait_for(&format!("nothing of carve's on {}", node.name), WAIT, || async {
            let left: Vec<_> = carve_on(node).into_iter().filter(|(_, on)| *on).collect();
            if left.is_empty() { Ok(()) } else { Err(format!("still there: {left:?}")) }
        })
        .await;
    }
    assert_eq!(blocks(&cluster), blocks_before, "the blocks stay with their nodes");
    assert_eq!(cidrs(&cluster), cidrs_before, "the podCIDRs another dataplane reads stay");

    // And back: carve wires pods again.
    cp.kubectl_ok(&["-n", "carve-system", "set", "env", "daemonset/carve-agent", "-c", "agent", "CARVE_ROLE-"])
        .unwrap();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"]).unwrap();
    cluster.wait_network_ready().await.unwrap();
    let pods = run_workload(&cluster, "back", 2).await;
    let (a, b) = (&pods[0], pods.iter().find(|p| p.node != pods[0].node).expect("a pod on each node"));
    let cmd = format!("nc -w 2 {} {HOSTNAME_PORT} </dev/null", b.ip);
    wait_for("pods connect across nodes again", WAIT, || async {
        match exec(&cluster, &a.name, &["sh", "-c", &cmd]) {
            Ok(out) if out.trim() == b.name => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
