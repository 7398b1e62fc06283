//! Kubernetes' own sig-network e2e tests on carve (the share of
//! `make conformance` that `make test` runs), and carve under kube-proxy's
//! Services: the pod source kept through a ClusterIP, hairpin, and NodePort
//! from a host outside the cluster. Real nodes; needs root (CI has it).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::conformance::{self, CI_FOCUS, Run, State};
use carve_e2e::controlplane::conformance_bins;
use carve_e2e::testkit::conformance_images;

mod real_nodes_support;
use real_nodes_support::{
    EXTERNAL_IP, PEER_PORT, Pod, arrives_from, deploy_carve, example, exec, external_host, kubectl_json, run_workload,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_granular_checks_and_a_service_test_pass_on_carve() {
    let bins = conformance_bins().expect("build e2e-network.test, ginkgo, agnhost and coredns");
    let images = conformance_images().expect("build the node and conformance images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    conformance::prepare(&cluster).await.unwrap();

    let out_dir = cluster.dir().join("conformance");
    let run = Run {
        focus: CI_FOCUS.iter().map(|f| f.to_string()).collect(),
        procs: 2,
        out_dir,
        timeout: Duration::from_secs(900),
        policy: false,
    };
    let report = conformance::run(&cluster, &bins, &run).unwrap();
    println!("{}\n{}", report.table(), report.summary());
    assert!(report.failures().is_empty(), "upstream tests failed on carve:\n{}", report.table());
    assert_eq!(report.count(State::Passed), CI_FOCUS.len(), "every focused test ran and passed:\n{}", report.table());
}

/// A Service selecting only `pod` (labelled `target=<pod>`), on both of the
/// workload's ports; `spec` adds to its spec (type, traffic policy).
fn service_for(cluster: &Cluster, name: &str, pod: &Pod, spec: &str) -> serde_json::Value {
    let cp = cluster.cp();
    cp.kubectl_ok(&["label", "pod", &pod.name, &format!("target={}", pod.name), "--overwrite"]).unwrap();
    let yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{target: {pod}}}
  ports:
    - {{name: hostname, port: 8080, protocol: TCP}}
    - {{name: peer, port: {PEER_PORT}, protocol: TCP}}
{spec}"#,
        pod = pod.name
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl_json(cluster, &["get", "service", name])
}

/// The node port of a Service's `peer` port.
fn peer_node_port(svc: &serde_json::Value) -> u16 {
    let ports = svc["spec"]["ports"].as_array().unwrap();
    ports.iter().find(|p| p["name"] == "peer").and_then(|p| p["nodePort"].as_u64()).expect("a node port") as u16
}

/// The source address a TCP connection from the external host to
/// `ip:port` arrives from, as the pod behind it sees it (its `netstat -tn`);
/// retried until kube-proxy has programmed the port.
async fn external_arrives_from(external: &carve_e2e::netns::Netns, ip: &str, port: u16) -> IpAddr {
    let what = format!("{EXTERNAL_IP} -> {ip}:{port} answering");
    carve_e2e::testkit::wait_for(&what, Duration::from_secs(30), || async {
        let out = external
            .exec("/bin/busybox", &["sh", "-c", &format!("/bin/busybox nc -w 3 {ip} {port} </dev/null")])
            .map_err(|e| format!("{e:#}"))?;
        real_nodes_support::peer_of(&out, PEER_PORT).ok_or_else(|| format!("no connection in {out:?}"))
    })
    .await
}

/// Every address of a node's namespace (eth0's, carve's devices').
fn node_addresses(cluster: &Cluster, node: &str) -> BTreeSet<IpAddr> {
    let addrs = cluster.node(node).netns().ip_json(&["addr", "show"]).unwrap();
    addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_services_on_carve_keep_pod_sources_hairpin_and_snat_node_ports() {
    let images = carve_e2e::testkit::node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    let pods = run_workload(&cluster, "svc", 2).await;
    let (client, server) = (&pods[0], &pods[1]);
    assert_ne!(client.node, server.node, "{pods:?}");

    // Pod -> ClusterIP -> pod on another node: no masquerade inside the cluster.
    let svc = service_for(&cluster, "server", server, "");
    let cluster_ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let seen = carve_e2e::testkit::wait_for("the ClusterIP answering", Duration::from_secs(30), || async {
        arrives_from(&cluster, client, cluster_ip)
    })
    .await;
    assert_eq!(
        seen, client.ip,
        "{} -> {cluster_ip} ({}) arrives from the client pod's own address",
        client.name, server.name
    );

    // Hairpin: the server reaches itself through its own Service.
    let hairpin = exec(&cluster, &server.name, &["sh", "-c", &format!("nc -w 3 {cluster_ip} 8080 </dev/null")]);
    assert_eq!(hairpin.as_deref().map(str::trim), Ok(server.name.as_str()), "hairpin through {cluster_ip}");

    // NodePort from a host outside the cluster, through the node the server
    // is not on: kube-proxy masquerades it, so it arrives from that node.
    let external = external_host(&cluster);
    let node_port = peer_node_port(&service_for(&cluster, "server-np", server, "  type: NodePort\n"));
    let entry = cluster.node(&client.node);
    let seen = external_arrives_from(&external, &entry.ip, node_port).await;
    let entry_addrs = node_addresses(&cluster, &entry.name);
    assert!(
        entry_addrs.contains(&seen),
        "{EXTERNAL_IP} -> {}:{node_port} arrived from {seen}, not an address of {} ({entry_addrs:?})",
        entry.ip,
        entry.name
    );

    // externalTrafficPolicy Local keeps the client's address.
    let local = service_for(&cluster, "server-local", server, "  type: NodePort\n  externalTrafficPolicy: Local\n");
    let seen = external_arrives_from(&external, &cluster.node(&server.node).ip, peer_node_port(&local)).await;
    assert_eq!(seen, EXTERNAL_IP.parse::<IpAddr>().unwrap(), "externalTrafficPolicy: Local keeps the source");
}
