//! The seeds' recommended cluster on real nodes: Cilium's eBPF dataplane
//! (VXLAN tunnel, kube-proxy replacement, `ipam: kubernetes`) on the blocks
//! carve's controller hands out, carve-agent `ipam-only`, no kube-proxy on
//! any node; a Cilium and a carve-agent restart under running pods. Needs
//! root (CI has it) and builds Cilium (minutes, cold).

use std::collections::BTreeSet;
use std::time::Duration;

use carve_e2e::cilium::Dataplane;
use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};

mod real_nodes_support;
use real_nodes_support::{
    HOSTNAME_PORT, Pod, carve_on, example, exec, kubectl_json, node_blocks, run_workload, workload_on,
};

/// Whether `from` gets `to`'s hostname from `ip`:[`HOSTNAME_PORT`].
fn reaches(cluster: &Cluster, from: &Pod, ip: &str, to: &Pod) -> Result<(), String> {
    let out = exec(cluster, &from.name, &["sh", "-c", &format!("nc -w 2 {ip} {HOSTNAME_PORT} </dev/null")])?;
    if out.trim() == to.name { Ok(()) } else { Err(format!("{} -> {ip}: {out:?}", from.name)) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_wires_pods_on_carves_blocks_and_serves_services_without_kube_proxy() {
    let images = node_images().expect("build the node images");
    let opts = ClusterOptions { nodes: 2, images, dataplane: Dataplane::Cilium, ..Default::default() };
    let cluster = Cluster::start(opts).await.unwrap();
    cluster.deploy_carve_under_cilium(&example("overlay.yaml")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let cp = cluster.cp();

    // What the seed's checks print: an agent Running per node, no kube-proxy.
    let agents = kubectl_json(&cluster, &["-n", "kube-system", "get", "pods", "-l", "k8s-app=cilium"]);
    let running: BTreeSet<&str> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(running.len(), cluster.nodes().len(), "a Cilium agent Running on every node: {running:?}");
    for node in cluster.nodes() {
        assert!(node.run("pgrep", &["-x", "kube-proxy"]).is_err(), "no kube-proxy on {}", node.name);
        let left: Vec<_> = carve_on(node).into_iter().filter(|(_, on)| *on).collect();
        assert!(left.is_empty(), "carve programs nothing on {} under Cilium: {left:?}", node.name);
    }

    // Pods on both nodes, each address inside its node's carve block.
    let pods = run_workload(&cluster, "web", 4).await;
    let blocks = node_blocks(&cluster);
    let node_ips: BTreeSet<String> = cluster.nodes().iter().map(|n| n.ip.clone()).collect();
    let ips: BTreeSet<_> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), pods.len(), "no duplicate pod addresses: {pods:?}");
    for p in &pods {
        assert!(blocks[&p.node].iter().any(|b| b.contains(&p.ip)), "{} {} outside {:?}", p.name, p.ip, blocks[&p.node]);
        assert!(!node_ips.contains(&p.ip.to_string()), "{} has a node's address", p.name);
    }

    // Same node and across nodes (Cilium's VXLAN), TCP.
    let a = &pods[0];
    let same = pods.iter().find(|p| p.node == a.node && p.name != a.name);
    let other = pods.iter().find(|p| p.node != a.node).expect("a pod on the other node");
    for to in same.into_iter().chain([other]) {
        wait_for(&format!("{} reaches {}", a.name, to.name), Duration::from_secs(60), || async {
            reaches(&cluster, a, &to.ip.to_string(), to)
        })
        .await;
    }

    // A ClusterIP Service, served by Cilium's kube-proxy replacement.
    cp.kubectl_stdin(&["apply", "-f", "-"], &workload_on("solo", &other.node, 1)).unwrap();
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: solo, namespace: default}}\n\
         spec: {{selector: {{app: solo}}, ports: [{{port: 80, targetPort: {HOSTNAME_PORT}, protocol: TCP}}]}}\n"
    );
    assert!(cp.kubectl_stdin(&["apply", "-f", "-"], &service).unwrap().status.success());
    let cluster_ip = cp.kubectl_ok(&["get", "service", "solo", "-o", "jsonpath={.spec.clusterIP}"]).unwrap();
    wait_for("a pod reaches the solo Service's ClusterIP", Duration::from_secs(90), || async {
        let solo = real_nodes_support::running_pods(&cluster, "app=solo");
        let solo = solo.first().ok_or("no solo pod yet")?;
        let out = exec(&cluster, &a.name, &["sh", "-c", &format!("nc -w 2 {cluster_ip} 80 </dev/null")])?;
        if out.trim() == solo.name { Ok(()) } else { Err(format!("{cluster_ip}:80 answered {out:?}")) }
    })
    .await;

    // A Cilium agent restart, then a carve-agent restart: the running pods
    // keep their addresses and stay connected across nodes.
    for (namespace, workload, selector) in [
        ("kube-system", "daemonset/cilium", "k8s-app=cilium"),
        ("carve-system", "daemonset/carve-agent", "app.kubernetes.io/name=carve-agent"),
    ] {
        cp.kubectl_ok(&["-n", namespace, "delete", "pods", "-l", selector, "--wait=false"]).unwrap();
        cp.kubectl_ok(&["-n", namespace, "rollout", "status", workload, "--timeout=180s"]).unwrap();
        wait_for(
            &format!("{} reaches {} after {workload} restarted", a.name, other.name),
            Duration::from_secs(60),
            || async { reaches(&cluster, a, &other.ip.to_string(), other) },
        )
        .await;
        let now = real_nodes_support::running_pods(&cluster, "app=web");
        let now_ips: BTreeSet<_> = now.iter().map(|p| p.ip).collect();
        assert_eq!(now_ips, ips, "the web pods kept their addresses across the {workload} restart");
    }
    for node in cluster.nodes() {
        let left: Vec<_> = carve_on(node).into_iter().filter(|(_, on)| *on).collect();
        assert!(left.is_empty(), "still nothing of carve's on {} after its agent restarted: {left:?}", node.name);
    }
}
