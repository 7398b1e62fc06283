//! Bad input on real nodes: a node that joins when its pool is exhausted, and
//! a conflist broken by hand. Needs root (CI has it).

use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};

mod real_nodes_support;
use real_nodes_support::{condition, kubectl_json};

/// One /24 block for two nodes: the second one waits for the pool to grow.
const SMALL_POOL: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: small}
spec:
  mode: Overlay
  cidrs: [10.244.0.0/24]
  blockSize: {ipv4: 24}
";

fn node_ready(cluster: &Cluster, name: &str) -> bool {
    let node = kubectl_json(cluster, &["get", "node", name]);
    condition(&node, "Ready").is_some_and(|c| c["status"] == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_keeps_a_node_not_ready_until_it_grows_and_a_broken_conflist_is_put_right() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    let cp = cluster.cp();
    cp.install_crds().unwrap();
    cp.kubectl_ok(&["apply", "-f", "manifests/"]).unwrap();
    cp.kubectl_stdin(&["apply", "-f", "-"], SMALL_POOL).unwrap();

    // One node gets the only block; the other says why it has none.
    let (with, without) = wait_for("one node Ready, the other PoolExhausted", Duration::from_secs(180), || async {
        let nnc = |n: &str| {
            let out =
                cluster.cp().kubectl_ok(&["get", "nnc", n, "--ignore-not-found", "-o", "json"]).unwrap_or_default();
            serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
        };
        let reason = |n: &str| condition(&nnc(n), "Ready").and_then(|c| c["reason"].as_str().map(str::to_string));
        let (r1, r2) = (reason("node-1"), reason("node-2"));
        match (node_ready(&cluster, "node-1"), node_ready(&cluster, "node-2")) {
            (true, false) if r2.as_deref() == Some("PoolExhausted") => Ok(("node-1", "node-2")),
            (false, true) if r1.as_deref() == Some("PoolExhausted") => Ok(("node-2", "node-1")),
            other => Err(format!("ready {other:?}, NNC reasons {r1:?} {r2:?}")),
        }
    })
    .await;
    let events = cp
        .kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.name={without},reason=PoolExhausted"),
        ])
        .unwrap();
    assert!(events.contains("PoolExhausted"), "the exhausted Node carries the Event: {events}");
    wait_for("the agent reports why the network is down", Duration::from_secs(60), || async {
        let node = kubectl_json(&cluster, &["get", "node", without]);
        match condition(&node, "NetworkUnavailable") {
            Some(c) if c["status"] == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        !cluster.node(without).host_path("/etc/cni/net.d/10-carve.conflist").exists(),
        "{without} has no block, so no conflist"
    );

    // Growing the pool is enough: the node turns Ready and takes a pod by itself.
    cp.kubectl_ok(&[
        "patch",
        "podcidr",
        "small",
        "--type=merge",
        "-p",
        r#"{"spec":{"cidrs":["10.244.0.0/24","10.244.1.0/24"]}}"#,
    ])
    .unwrap();
    wait_for(&format!("{without} Ready once the pool grew"), Duration::from_secs(120), || async {
        if node_ready(&cluster, without) { Ok(()) } else { Err(cluster.node(without).log_tail("kubelet", 5)) }
    })
    .await;
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: late, namespace: default}}\nspec:\n  nodeName: {without}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: carve.local/busybox:v1, imagePullPolicy: Never, command: [sleep, '3600']}}\n"
    );
    cp.kubectl_stdin(&["apply", "-f", "-"], &pod).unwrap();
    cp.kubectl_ok(&["wait", "--for=condition=Ready", "pod/late", "--timeout=120s"]).unwrap();
    let ip = cp.kubectl_ok(&["get", "pod", "late", "-o", "jsonpath={.status.podIP}"]).unwrap();
    assert!(ip.starts_with("10.244.1."), "the late node's pod is in the new block: {ip}");
    assert!(node_ready(&cluster, with), "{with} undisturbed");

    // A conflist broken by hand is put right by the agent's next resync.
    let node = cluster.node(with);
    let conflist = "/etc/cni/net.d/10-carve.conflist";
    let good = node.run("cat", &[conflist]).unwrap();
    node.run("sh", &["-c", &format!("echo '{{ not json' > {conflist}")]).unwrap();
    wait_for("the agent rewrites the broken conflist", Duration::from_secs(90), || async {
        let now = node.run("cat", &[conflist]).unwrap_or_default();
        if now == good { Ok(()) } else { Err(now) }
    })
    .await;

    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
