//! The other pool shapes on real nodes: a VNet pool on a CIDR outside the
//! node subnet (routed natively, no VXLAN device, pod addresses kept as
//! source), and a dual-stack Overlay pool (IPv6 over the VXLAN overlay), on
//! which carve is then upgraded under live pods. Needs root (CI has it).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::image::{CARVE_REPOSITORY, carve_image_name, default_tag};
use carve_e2e::netns::NetnsExt;
use carve_e2e::testkit::{VNET_POD_POOL, node_images, wait_for};
use ipnet::IpNet;
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{
    EXTERNAL_IP, HOSTNAME_PORT, Pod, arrives_from, cached_results, deploy_carve, example, exec, external_host,
    kubectl_json, node_blocks, run_workload, running_pods, store_ips, wait_released,
};

/// Every pod address inside its node's blocks, in its node's store, none a
/// node's address, none twice.
fn assert_addresses(cluster: &Cluster, pods: &[Pod], families: usize) {
    let blocks = node_blocks(cluster);
    let node_ips: BTreeSet<IpAddr> = cluster.nodes().iter().map(|n| n.ip.parse().unwrap()).collect();
    let mut seen = BTreeSet::new();
    for p in pods {
        assert_eq!(p.ips.len(), families, "{p:?}: one address per family");
        let store = store_ips(cluster.node(&p.node));
        for ip in &p.ips {
            let block = &blocks[&p.node];
            assert!(block.iter().any(|b| b.contains(ip)), "{p:?}: {ip} outside {}'s blocks {block:?}", p.node);
            assert!(!node_ips.contains(ip), "{p:?} got a node's address");
            assert!(seen.insert(*ip), "{ip} handed out twice");
            assert!(store.contains(ip), "{p:?}: {ip} not in its node's IPAM store");
        }
    }
}

fn ping(cluster: &Cluster, from: &Pod, to: IpAddr) -> Result<String, String> {
    exec(cluster, &from.name, &["ping", "-c", "2", "-W", "2", &to.to_string()])
}

/// ICMP and TCP from `from` to `to` at `to_ip`, and the connection arrives
/// from `from`'s address of the same family.
fn assert_connected(cluster: &Cluster, from: &Pod, to: &Pod, to_ip: IpAddr) {
    let what = format!("{} ({}) -> {} ({}) at {to_ip}", from.name, from.node, to.name, to.node);
    assert!(ping(cluster, from, to_ip).is_ok(), "ping {what}: {:?}", ping(cluster, from, to_ip));
    let tcp = exec(cluster, &from.name, &["sh", "-c", &format!("nc -w 3 {to_ip} {HOSTNAME_PORT} </dev/null")]);
    assert_eq!(tcp.as_deref().map(str::trim), Ok(to.name.as_str()), "TCP {what}");
    let own = from.ips.iter().find(|ip| ip.is_ipv4() == to_ip.is_ipv4()).copied().unwrap();
    assert_eq!(arrives_from(cluster, from, to_ip), Ok(own), "{what} arrives from the pod's own address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnet_pool_routes_pods_natively_without_an_overlay() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    deploy_carve(&cluster, VNET_POD_POOL).await;

    let pods = run_workload(&cluster, "flat", 4).await;
    assert_addresses(&cluster, &pods, 1);
    let pool: IpNet = "10.10.0.0/16".parse().unwrap();
    assert!(pods.iter().all(|p| pool.contains(&p.ip)), "{pods:?}");

    // No encapsulation: no VXLAN device, and each peer block routed via the peer's node IP.
    let blocks = node_blocks(&cluster);
    for node in cluster.nodes() {
        let vxlan = node.netns().ip(&["-o", "link", "show", "type", "vxlan"]).unwrap();
        assert!(vxlan.trim().is_empty(), "{}: no VXLAN device in VNet mode: {vxlan}", node.name);
        let routes = node.netns().ip(&["route", "show", "proto", "202"]).unwrap();
        for peer in cluster.nodes().iter().filter(|p| p.name != node.name) {
            for block in &blocks[&peer.name] {
                let want = format!("{block} via {} dev eth0", peer.ip);
                assert!(routes.contains(&want), "{}: {want:?} in {routes}", node.name);
            }
        }
    }

    let a = &pods[0];
    let same = pods.iter().find(|p| p.node == a.node && p.name != a.name).expect("two pods on one node");
    let other = pods.iter().find(|p| p.node != a.node).unwrap();
    for to in [same, other] {
        assert_connected(&cluster, a, to, to.ip);
    }
    let other_node = cluster.node(&other.node);
    assert!(ping(&cluster, a, other_node.ip.parse().unwrap()).is_ok(), "pod {} -> node {}", a.name, other_node.ip);

    // Outside the VNet CIDRs, egress is SNAT'd to the node's address.
    let external = external_host(&cluster);
    let listener = external.tcp_echo_peer(SocketAddr::new(EXTERNAL_IP.parse().unwrap(), 9000)).unwrap();
    let answer = exec(&cluster, &a.name, &["sh", "-c", &format!("echo hi | nc -w 3 {EXTERNAL_IP} 9000")]);
    let peer = listener.join().unwrap().unwrap();
    assert_eq!(peer.ip().to_string(), cluster.node(&a.node).ip, "egress from {} ({answer:?})", a.name);

    drop(external);
    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// The CNI version in `node`'s conflist.
fn conflist_version(cluster: &Cluster, node: &str) -> String {
    let path = cluster.node(node).host_path("/etc/cni/net.d/10-carve.conflist");
    let body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default();
    body["cniVersion"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_pool_carries_ipv6_across_nodes_and_survives_a_carve_upgrade() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await.unwrap();
    let cp = cluster.cp();
    deploy_carve(&cluster, &example("dual-stack.yaml")).await;

    let pods = run_workload(&cluster, "dual", 4).await;
    assert_addresses(&cluster, &pods, 2);
    let v6 = |p: &Pod| p.ips.iter().copied().find(IpAddr::is_ipv6).unwrap();
    let v4 = |p: &Pod| p.ips.iter().copied().find(IpAddr::is_ipv4).unwrap();

    // IPv6 rides the IPv4 overlay: each node's VXLAN device holds its IPv6
    // VTEP address and routes the peer's IPv6 block.
    let blocks = node_blocks(&cluster);
    for node in cluster.nodes() {
        let addrs = node.netns().ip(&["-6", "-o", "addr", "show", "dev", "carve.vxlan"]).unwrap();
        let own_v6 = blocks[&node.name].iter().find(|b| b.addr().is_ipv6()).expect("an IPv6 block");
        assert!(addrs.contains(&format!("{}/128", own_v6.network())), "{}: VTEP {own_v6} in {addrs}", node.name);
        let routes = node.netns().ip(&["-6", "route", "show", "proto", "202"]).unwrap();
        for peer in cluster.nodes().iter().filter(|p| p.name != node.name) {
            let peer_v6 = blocks[&peer.name].iter().find(|b| b.addr().is_ipv6()).unwrap();
            assert!(routes.contains(&format!("{peer_v6} via {} dev carve.vxlan", peer_v6.network())), "{routes}");
        }
    }
    let a = &pods[0];
    let same = pods.iter().find(|p| p.node == a.node && p.name != a.name).expect("two pods on one node");
    let other = pods.iter().find(|p| p.node != a.node).unwrap();
    for to in [same, other] {
        assert_connected(&cluster, a, to, v6(to));
        assert_connected(&cluster, a, to, v4(to));
    }

    // Upgrade carve under live pods: the DaemonSet rolled to a new image tag,
    // whose agent writes a different conflist (CNI 0.4.0 pinned; lowering the
    // version is safe under live pods, libcni converts their cached 1.0.0
    // results down). The tag is added to the node's image store, as a pull would.
    let (old_image, new_image) = (carve_image_name(&default_tag()), format!("{CARVE_REPOSITORY}:v9.9.9-upgrade"));
    for node in cluster.nodes() {
        node.ctr(&["-n", "k8s.io", "images", "tag", &old_image, &new_image]).unwrap();
        assert_eq!(conflist_version(&cluster, &node.name), "1.0.0");
    }
    let patch = serde_json::json!({"spec": {"template": {"spec": {
        "initContainers": [{"name": "install-cni", "image": new_image}],
        "containers": [{"name": "agent", "image": new_image, "env": [{"name": "CARVE_CNI_VERSION", "value": "0.4.0"}]}],
    }}}});
    cp.kubectl_ok(&["-n", "carve-system", "patch", "daemonset", "carve-agent", "-p", &patch.to_string()]).unwrap();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"]).unwrap();
    let agents =
        kubectl_json(&cluster, &["-n", "carve-system", "get", "pods", "-l", "app.kubernetes.io/name=carve-agent"]);
    for agent in agents["items"].as_array().unwrap() {
        assert_eq!(agent["spec"]["containers"][0]["image"], new_image.as_str(), "{}", agent["metadata"]["name"]);
    }
    wait_for("every node's conflist at the new version", Duration::from_secs(60), || async {
        let versions: Vec<String> = cluster.nodes().iter().map(|n| conflist_version(&cluster, &n.name)).collect();
        if versions.iter().all(|v| v == "0.4.0") { Ok(()) } else { Err(format!("{versions:?}")) }
    })
    .await;
    // The pods from before are still connected, both families, across nodes.
    assert_connected(&cluster, other, a, v6(a));
    assert_connected(&cluster, other, a, v4(a));

    // New pods come up under the new conflist, next to the old ones.
    cp.kubectl_ok(&["scale", "deployment", "dual", "--replicas=6"]).unwrap();
    let all = wait_for("6 dual pods Running", Duration::from_secs(120), || async {
        let now = running_pods(&cluster, "app=dual");
        if now.len() == 6 { Ok(now) } else { Err(cp.kubectl_ok(&["get", "pods", "-o", "wide"]).unwrap_or_default()) }
    })
    .await;
    assert_addresses(&cluster, &all, 2);
    let old: BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let new: Vec<&Pod> = all.iter().filter(|p| !old.contains(p.name.as_str())).collect();
    assert_eq!(new.len(), 2, "{all:?}");
    for p in &new {
        let cached = cached_results(cluster.node(&p.node), p.ip);
        assert!(cached.iter().all(|(_, v)| v == "0.4.0") && !cached.is_empty(), "{p:?}: {cached:?}");
        let peer = all.iter().find(|q| q.node != p.node && old.contains(q.name.as_str())).unwrap();
        assert_connected(&cluster, p, peer, v6(peer));
    }
    let from_before = cached_results(cluster.node(&a.node), a.ip);
    assert!(from_before.iter().all(|(_, v)| v == "1.0.0") && !from_before.is_empty(), "{from_before:?}");

    // Old and new pods are deletable: gone, results uncached, addresses free.
    cp.kubectl_ok(&["delete", "deployment", "dual", "--wait=true", "--timeout=90s"]).unwrap();
    wait_released(&cluster, "app=dual", &all, Duration::from_secs(90)).await;

    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
