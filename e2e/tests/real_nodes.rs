//! carve as users run it: three real nodes (kubelet, kube-proxy, containerd +
//! runc), carve deployed from its own image with `kubectl apply -f crds/ -f
//! manifests/`, the agent DaemonSet and the controller Deployment running as
//! pods with real ServiceAccount tokens, and pods whose network carve-cni sets
//! up when containerd asks. Needs root (CI has it).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use carve_crds::NodeNetworkConfig;
use carve_e2e::cluster::{Cluster, ClusterOptions, RealNode};
use carve_e2e::netns::NetnsExt;
use carve_e2e::testkit::{node_images, wait_for};
use ipnet::IpNet;

mod real_nodes_support;
use real_nodes_support::{
    EXTERNAL_IP, HOSTNAME_PORT, arrives_from, condition, deploy_carve, example, exec, external_host, kubectl_json,
    node_blocks, run_workload, store_ips,
};

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carve_deployed_from_its_manifests_networks_pods_on_real_nodes() {
    let images = node_images().expect("build the node images");
    let mut cluster = Cluster::start(ClusterOptions { nodes: 3, images, ..Default::default() })
        .await
        .expect("cluster with 3 real nodes");

    let cp = cluster.cp();
    // Before carve: the runtime has no network, so kubelet keeps the Node NotReady.
    let before = wait_for("nodes NotReady for want of a CNI network", Duration::from_secs(60), || async {
        let nodes = kubectl_json(&cluster, &["get", "nodes"]);
        let items = nodes["items"].as_array().cloned().unwrap_or_default();
        let ok = items.len() == 3
            && items.iter().all(|n| {
                condition(n, "Ready").is_some_and(|c| {
                    c["status"] == "False" && c["message"].as_str().unwrap_or("").contains("cni plugin not initialized")
                })
            });
        if ok { Ok(items) } else { Err(format!("{nodes}")) }
    })
    .await;
    for n in &before {
        assert!(
            condition(n, "NetworkUnavailable").is_none(),
            "kubelet without a cloud provider sets no NetworkUnavailable: {n}"
        );
    }
    for node in cluster.nodes() {
        assert!(
            !node.host_path("/etc/cni/net.d/10-carve.conflist").exists(),
            "{}: no conflist before the agent",
            node.name
        );
    }

    // Deploy as users do.
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    let system = kubectl_json(&cluster, &["-n", "carve-system", "get", "pods"]);
    for pod in system["items"].as_array().unwrap() {
        assert_eq!(pod["spec"]["hostNetwork"], true, "{}", pod["metadata"]["name"]);
    }

    // Pods on every node, each IP inside its node's block.
    let pods = run_workload(&cluster, "web", 6).await;
    let blocks = node_blocks(&cluster);
    let node_ips: BTreeSet<IpAddr> = cluster.nodes().iter().map(|n| n.ip.parse().unwrap()).collect();
    let mut seen = BTreeSet::new();
    for p in &pods {
        let block = &blocks[&p.node];
        assert!(block.iter().any(|b| b.contains(&p.ip)), "{p:?} outside {}'s blocks {block:?}", p.node);
        assert!(IpNet::from(p.ip).addr() != IpAddr::from([0, 0, 0, 0]) && !node_ips.contains(&p.ip), "{p:?}");
        assert!(seen.insert(p.ip), "{} handed out twice", p.ip);
        assert!(store_ips(cluster.node(&p.node)).contains(&p.ip), "{p:?} not in its node's IPAM store");
    }

    // Pod to pod on the same node and across nodes, ICMP and TCP.
    let a = &pods[0];
    let same = pods.iter().find(|p| p.node == a.node && p.name != a.name).expect("two pods on one node");
    let other = pods.iter().find(|p| p.node != a.node).unwrap();
    for to in [same, other] {
        let ip = to.ip.to_string();
        let ping = exec(&cluster, &a.name, &["ping", "-c", "2", "-W", "2", &ip]);
        assert!(ping.is_ok(), "ping {} ({}) -> {} ({}): {ping:?}", a.name, a.node, to.name, to.node);
        let tcp = exec(&cluster, &a.name, &["sh", "-c", &format!("nc -w 3 {ip} {HOSTNAME_PORT} </dev/null")]);
        assert_eq!(tcp.as_deref().map(str::trim), Ok(to.name.as_str()), "TCP {} -> {}", a.name, to.name);
        // Pod to pod is never SNAT'd, across the overlay either.
        assert_eq!(
            arrives_from(&cluster, a, to.ip),
            Ok(a.ip),
            "{} -> {} arrives from the pod's own IP",
            a.name,
            to.name
        );
    }
    // Pod to another node's own address.
    let other_node = cluster.node(&other.node);
    let ping = exec(&cluster, &a.name, &["ping", "-c", "2", "-W", "2", &other_node.ip]);
    assert!(ping.is_ok(), "pod {} -> node {}: {ping:?}", a.name, other_node.ip);

    // Egress leaves SNAT'd to the node's address.
    let external = external_host(&cluster);
    let listener = external.tcp_echo_peer(SocketAddr::new(EXTERNAL_IP.parse().unwrap(), 9000)).unwrap();
    let answer = exec(&cluster, &a.name, &["sh", "-c", &format!("echo hi | nc -w 3 {EXTERNAL_IP} 9000")]);
    let peer = listener.join().unwrap().unwrap();
    let a_node = cluster.node(&a.node);
    assert_eq!(peer.ip().to_string(), a_node.ip, "egress from {} arrives as its node's address ({answer:?})", a.name);

    // The agent's own token is bound to its pod and node: it may not write
    // another node's NodeNetworkConfig.
    let agents =
        kubectl_json(&cluster, &["-n", "carve-system", "get", "pods", "-l", "app.kubernetes.io/name=carve-agent"]);
    let agent = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["spec"]["nodeName"] == "node-1")
        .expect("agent on node-1");
    let uid = agent["metadata"]["uid"].as_str().unwrap();
    let token = agent_token(cluster.node("node-1"), uid);
    // Only the token (a kubeconfig's client certificate would win over it),
    // and a bare PATCH as the agent sends it (kubectl patch would GET first,
    // a verb the agent's RBAC does not grant).
    let kubeconfig = cluster.dir().join("agent-token.kubeconfig");
    let ca = std::fs::read_to_string(cp.ca_file()).unwrap();
    let yaml = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "agent",
        "clusters": [{"name": "local", "cluster": {"server": cp.server(), "certificate-authority-data": base64(&ca)}}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "local", "user": "agent"}}],
    });
    std::fs::write(&kubeconfig, serde_json::to_vec(&yaml).unwrap()).unwrap();
    let as_agent = carve_e2e::controlplane::client_from_kubeconfig(&kubeconfig).await.unwrap();
    let nncs: kube::Api<NodeNetworkConfig> = kube::Api::all(as_agent.clone());
    // The value node-1's NNC has already: a write that changes nothing but
    // still passes authorization and admission.
    let current = kubectl_json(&cluster, &["get", "nnc", "node-1"])["spec"]["releases"].clone();
    let patch = kube::api::Patch::Merge(serde_json::json!({"spec": {"releases": current}}));
    let pp = kube::api::PatchParams::default();
    let own = nncs.patch("node-1", &pp, &patch).await;
    assert!(own.is_ok(), "the agent may patch its own NNC: {own:?}");
    let for_node_2 = nncs.patch("node-2", &pp, &patch).await;
    let message = match for_node_2 {
        Err(kube::Error::Api(status)) if status.code == 403 => status.message,
        other => panic!("agent of node-1 patching node-2's NNC: {other:?}"),
    };
    assert!(message.contains("carve-agent on node node-1 may not write NodeNetworkConfig node-2"), "{message}");
    eprintln!("agent of node-1 patching node-2's NNC: 403 {message}");
    // Nor another node's condition (the agent's RBAC allows nodes/status patch).
    let node_api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(as_agent);
    let condition = kube::api::Patch::Strategic(serde_json::json!({"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "True", "reason": "Forged", "message": "written by node-1's agent"
    }]}}));
    let message = match node_api.patch_status("node-2", &pp, &condition).await {
        Err(kube::Error::Api(status)) if status.code == 403 => status.message,
        other => panic!("agent of node-1 writing node-2's condition: {other:?}"),
    };
    assert!(message.contains("carve-agent on node node-1 may not write Node node-2"), "{message}");

    // A kubelet restart and a rolled agent DaemonSet leave running pods
    // connected (checked from a pod on another node, whose kubelet serves the exec).
    let connected = |what: &str| {
        let ping = exec(&cluster, &other.name, &["ping", "-c", "2", "-W", "2", &a.ip.to_string()]);
        assert!(ping.is_ok(), "{what}: {} ({}) -> {} ({}): {ping:?}", other.name, other.node, a.name, a.node);
    };
    let node_a = cluster.node(&a.node);
    node_a.stop_kubelet();
    connected("while the kubelet is down");
    node_a.start_kubelet(&carve_e2e::control_plane_bins().unwrap()).unwrap();
    cp.kubectl_ok(&["wait", "--for=condition=Ready", &format!("node/{}", a.node), "--timeout=60s"]).unwrap();
    connected("after a kubelet restart");
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "restart", "daemonset/carve-agent"]).unwrap();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"]).unwrap();
    connected("after the agent DaemonSet rolled");

    // Deleted pods free their addresses in the node's store.
    cp.kubectl_ok(&["delete", "deployment", "web", "--wait=true"]).unwrap();
    wait_for("deleted pods' IPs released", Duration::from_secs(90), || async {
        let held: Vec<_> = pods.iter().filter(|p| store_ips(cluster.node(&p.node)).contains(&p.ip)).collect();
        if held.is_empty() { Ok(()) } else { Err(format!("still held: {held:?}")) }
    })
    .await;

    // The controller pod holding the Lease is killed: the other replica takes
    // over (and handles the node removal below).
    let holder = |cp: &carve_e2e::ControlPlane| {
        cp.kubectl_ok(&[
            "-n",
            "carve-system",
            "get",
            "lease",
            "carve-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap_or_default()
    };
    let leader = holder(cp);
    assert!(leader.starts_with("carve-controller-"), "the Lease names a controller pod: {leader:?}");
    let controllers =
        kubectl_json(&cluster, &["-n", "carve-system", "get", "pods", "-l", "app.kubernetes.io/name=carve-controller"]);
    let standby: Vec<String> = controllers["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .filter(|n| *n != leader)
        .collect();
    assert_eq!(standby.len(), 1, "two replicas, one standby: {standby:?}");
    // Deleted as a drain does: SIGTERM, and the leader releases the Lease.
    cp.kubectl_ok(&["-n", "carve-system", "delete", "pod", &leader, "--wait=false"]).unwrap();
    // The standby, or the replacement the ReplicaSet starts, whichever asks first.
    wait_for("another controller replica to take the Lease", Duration::from_secs(90), || async {
        let now = holder(cluster.cp());
        let running = cluster
            .cp()
            .kubectl_ok(&[
                "-n",
                "carve-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=carve-controller",
                "-o",
                "name",
            ])
            .unwrap_or_default();
        if !now.is_empty() && now != leader && running.contains(&format!("pod/{now}")) {
            Ok(())
        } else {
            let pods =
                cluster.cp().kubectl_ok(&["-n", "carve-system", "get", "pods", "-o", "wide"]).unwrap_or_default();
            Err(format!("holder {now:?}, killed {leader}, standby {standby:?}\n{pods}"))
        }
    })
    .await;

    // A node that is gone (kubelet stopped, namespace gone, Node deleted)
    // gives its block back, and the others drop their route to it.
    let gone_block = blocks["node-3"][0].to_string();
    let has_route =
        |node: &RealNode| node.netns().ip(&["route", "show", "proto", "202"]).unwrap_or_default().contains(&gone_block);
    assert!(has_route(cluster.node("node-1")), "node-1 routes node-3's block {gone_block} before");
    let problems = cluster.remove_node("node-3");
    assert!(problems.is_empty(), "removing node-3: {problems:?}");
    cluster.cp().kubectl_ok(&["delete", "node", "node-3"]).unwrap();
    wait_for("node-3's block released and its routes gone", Duration::from_secs(60), || async {
        let nnc_gone =
            cluster.cp().kubectl_ok(&["get", "nnc", "node-3", "--ignore-not-found", "-o", "name"]).unwrap_or_default();
        let routed: Vec<_> = cluster.nodes().iter().filter(|n| has_route(n)).map(|n| n.name.clone()).collect();
        if nnc_gone.trim().is_empty() && routed.is_empty() {
            Ok(())
        } else {
            Err(format!("nnc: {nnc_gone:?}, still routed on {routed:?}"))
        }
    })
    .await;

    let problems = cluster.shutdown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// The projected ServiceAccount token kubelet mounted into pod `uid` on
/// `node` (a tmpfs in the node's mount namespace, so read from inside it).
fn agent_token(node: &RealNode, uid: &str) -> String {
    let glob = format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected/*/token");
    let token = node.run("sh", &["-c", &format!("cat {glob}")]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!token.trim().is_empty(), "empty token at {glob}");
    token.trim().to_string()
}

/// What a cluster could leave on the host, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
struct HostTrace {
    links: BTreeSet<String>,
    netns: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    sysctls: Vec<String>,
    mounts: usize,
}

fn host_trace(id: &str) -> HostTrace {
    let names = |out: String| -> BTreeSet<String> {
        out.lines().map(|l| l.split_whitespace().next().unwrap_or("").to_string()).collect()
    };
    let links = names(carve_e2e::netns::run("ip", &["-o", "link", "show"]).unwrap())
        .into_iter()
        .filter(|l| l.contains(id) || l.contains("ul0"))
        .collect();
    let netns = names(carve_e2e::netns::run("ip", &["netns", "list"]).unwrap())
        .into_iter()
        .filter(|n| n.contains(id))
        .collect();
    let cgroups = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains(&format!("carve-{id}-")))
        .collect();
    let sysctls = [
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/forwarding",
        "net/netfilter/nf_conntrack_max",
        "net/bridge/bridge-nf-call-iptables",
    ]
    .iter()
    .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
    .collect();
    // Only this cluster's: another test's cluster may be starting meanwhile.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("cv{id}")) || l.contains(&format!("cl-{id}")))
        .count();
    HostTrace { links, netns, cgroups, sysctls, mounts }
}

/// Processes whose command line or cgroup mentions the cluster `id`.
fn cluster_processes(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let cg = std::fs::read_to_string(p.join("cgroup")).unwrap_or_default();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cg.contains(&format!("carve-{id}-")) || cmd.contains(&format!("cl-{id}")) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// Run by the cleanup test below in a child test process; does nothing alone.
#[tokio::test]
#[ignore = "helper for the cleanup tests; needs CARVE_E2E_HELPER"]
async fn helper_cluster_then_die() {
    let Ok(how) = std::env::var("CARVE_E2E_HELPER") else { return };
    let images = node_images().unwrap();
    let cluster = Cluster::start(ClusterOptions { nodes: 1, images, ..Default::default() }).await.unwrap();
    // A hostNetwork pod runs without CNI: its shim and container re-parent
    // away from containerd, as every pod's do.
    let applied = cluster
        .cp()
        .kubectl_stdin(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: sleeper, namespace: default}\nspec:\n  hostNetwork: true\n  tolerations: [{operator: Exists}]\n  containers:\n  - {name: c, image: carve.local/busybox:v1, imagePullPolicy: Never, command: [sleep, '3600']}\n",
        )
        .unwrap();
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    cluster.cp().kubectl_ok(&["wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s"]).unwrap();
    println!("CLUSTER_ID={}", cluster.id());
    match how.as_str() {
        "panic" => panic!("deliberate panic with a cluster running"),
        _ => loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    }
}

/// The helper test in a child process; its stderr goes to `log`, so a
/// helper that fails to start its cluster says why in this test's failure.
fn helper(how: &str, log: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_cluster_then_die", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CARVE_E2E_HELPER", how)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// The `CLUSTER_ID=` line a helper printed, or a panic with its stderr.
fn cluster_id(line: Option<String>, log: &std::path::Path) -> String {
    line.unwrap_or_else(|| {
        let stderr = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        panic!(
            "the helper printed no CLUSTER_ID; its stderr ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

fn wait_clean(id: &str, before: &HostTrace) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (procs, trace) = (cluster_processes(id), host_trace(id));
        if procs.is_empty() && &trace == before {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "left behind: {procs:?}\n{trace:?}\nbefore: {before:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_killed_or_panicking_cluster_leaves_nothing_on_the_host() {
    use std::io::BufRead;
    // Before any cluster: nothing of an unused id, and the host's sysctls.
    let before = host_trace("nothing-yet");
    let logs = carve_e2e::testkit::temp_dir("helper");
    // A panic: the fixture's drop tears down.
    let log = logs.path().join("panic.stderr");
    let out = helper("panic", &log).output().unwrap();
    assert!(!out.status.success(), "the helper test should fail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id =
        cluster_id(stdout.lines().find_map(|l| l.split_once("CLUSTER_ID=").map(|(_, v)| v.trim().to_string())), &log);
    wait_clean(&id, &before);

    // SIGKILL: nothing runs in the harness; the shims and the pod outlive it
    // until the next harness start sweeps the cluster.
    let log = logs.path().join("hang.stderr");
    let mut child = helper("hang", &log).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let id = cluster_id(lines.find_map(|l| l.ok()?.split_once("CLUSTER_ID=").map(|(_, v)| v.trim().to_string())), &log);
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let survivors = cluster_processes(&id);
    assert!(
        survivors.iter().any(|p| p.contains("containerd-shim")),
        "a pod's shim outlives a killed harness: {survivors:?}"
    );
    carve_e2e::scratch::sweep_stale_clusters();
    wait_clean(&id, &before);
}
