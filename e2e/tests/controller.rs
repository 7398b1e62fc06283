//! carve-controller against a real API server: one test per behaviour a user
//! relies on (one NNC per node, restarts, replicas, node deletion, exhaustion
//! and growth, bad objects, kubenet adoption, operations).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use carve_crds::{NodeNetworkConfig, PodCidr};
use carve_e2e::ControlPlane;
use carve_e2e::testkit::{events_for, metrics_addr, nnc_where, node, start_controller, wait_for, wait_for_passes};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn cluster() -> (ControlPlane, Client) {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let client = cp.client().await.unwrap();
    (cp, client)
}

/// Who holds the controller's Lease.
async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases.get("carve-controller").await.unwrap().spec.unwrap().holder_identity
}

fn apply_pool(cp: &ControlPlane, name: &str, spec: &str) {
    let yaml = format!("apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: {name}\nspec:\n{spec}");
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn create_node(client: &Client, name: &str, ip: &str) -> Node {
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node(name, ip)).await.unwrap()
}

fn ready(nnc: &NodeNetworkConfig) -> Option<(String, String)> {
    let c = nnc.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

fn blocks(nnc: &NodeNetworkConfig) -> Vec<String> {
    nnc.status.as_ref().map(|s| s.blocks.iter().map(|b| b.cidr.clone()).collect()).unwrap_or_default()
}

async fn nnc_ready(client: &Client, name: &str) -> NodeNetworkConfig {
    nnc_where(client, name, "Ready=True", WAIT, |n| ready(n).is_some_and(|(s, _)| s == "True")).await
}

/// Every block of every NNC: asserts none is held twice.
async fn all_blocks_distinct(client: &Client) -> BTreeMap<String, Vec<String>> {
    let nncs = Api::<NodeNetworkConfig>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut by_node = BTreeMap::new();
    for nnc in nncs.items {
        for b in blocks(&nnc) {
            if let Some(other) = seen.insert(b.clone(), nnc.name_any()) {
                panic!("block {b} is held by both {other} and {}", nnc.name_any());
            }
        }
        by_node.insert(nnc.name_any(), blocks(&nnc));
    }
    by_node
}

#[tokio::test]
async fn each_node_gets_one_nnc_with_blocks_gateway_ip_and_pod_cidr() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    apply_pool(
        &cp,
        "dual",
        "  mode: Overlay\n  cidrs: [10.250.0.0/16, fd12:3456:789a::/64]\n  blockSize: {ipv4: 24, ipv6: 80}\n  nodeSelector:\n    matchLabels: {carve.dev/pool: dual}\n",
    );
    let _c = start_controller(&cp, "ctrl", &[]).unwrap();
    let a = create_node(&client, "node-a", "192.168.10.1").await;
    let mut dual = node("node-d", "192.168.10.4");
    dual.metadata.labels = Some([("carve.dev/pool".to_string(), "dual".to_string())].into());
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &dual).await.unwrap();

    let nnc = nnc_ready(&client, "node-a").await;
    let owner = &nnc.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Node", a.uid().unwrap().as_str(), Some(true))
    );
    let status = nnc.status.clone().unwrap();
    assert_eq!(status.pool.as_deref(), Some("overlay"));
    assert_eq!(blocks(&nnc), ["10.244.0.0/24"]);
    assert_eq!(status.gateway.as_deref(), Some("10.244.0.1"));
    assert_eq!(status.node_ip.as_deref(), Some("192.168.10.1"));
    assert_eq!(status.observed_generation, nnc.metadata.generation);

    let d = nnc_ready(&client, "node-d").await;
    assert_eq!(d.status.as_ref().unwrap().pool.as_deref(), Some("dual"), "the more specific selector wins");
    assert_eq!(blocks(&d), ["10.250.0.0/24", "fd12:3456:789a::/80"]);
    assert_eq!(d.status.as_ref().unwrap().blocks[1].gateway.as_deref(), Some("fd12:3456:789a::1"));

    // kubenet compatibility: the Node's podCIDR(s) carry the same blocks.
    let nodes = Api::<Node>::all(client.clone());
    let spec = wait_for("node-d podCIDRs", WAIT, || async {
        let n = nodes.get("node-d").await.map_err(|e| e.to_string())?;
        n.spec.clone().filter(|s| s.pod_cidrs.is_some()).ok_or(format!("{:?}", n.spec))
    })
    .await;
    assert_eq!(spec.pod_cidr.as_deref(), Some("10.250.0.0/24"));
    assert_eq!(spec.pod_cidrs.unwrap(), ["10.250.0.0/24", "fd12:3456:789a::/80"]);

    // A node IP change shows in the NNC; the blocks stay.
    nodes
        .patch_status(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.99"}]}})),
        )
        .await
        .unwrap();
    let moved = nnc_where(&client, "node-a", "nodeIP 192.168.10.99", WAIT, |n| {
        n.status.as_ref().and_then(|s| s.node_ip.as_deref()) == Some("192.168.10.99")
    })
    .await;
    assert_eq!(blocks(&moved), ["10.244.0.0/24"]);

    // `kubectl get nnc` answers "which node has which block".
    let table = cp.kubectl_ok(&["get", "nnc"]).unwrap();
    assert!(table.contains("10.250.0.0/24,fd12:3456:789a::/80"), "{table}");
}

#[tokio::test]
async fn controller_killed_midway_through_200_nodes_never_duplicates_or_moves_a_block() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    let ctrl = start_controller(&cp, "ctrl", &[]).unwrap();
    let nodes = Api::<Node>::all(client.clone());
    futures::stream::iter(0..200)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                nodes
                    .create(
                        &PostParams::default(),
                        &node(&format!("n{i:03}"), &format!("192.168.{}.{}", i / 200, i % 200 + 1)),
                    )
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    // Kill it (SIGKILL, no cleanup) once some but not all nodes are done.
    let before = wait_for("some NNCs with blocks", WAIT, || async {
        let done: BTreeMap<String, Vec<String>> = nncs
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .filter(|n| !blocks(n).is_empty())
            .map(|n| (n.name_any(), blocks(n)))
            .collect();
        if done.len() >= 20 { Ok(done) } else { Err(format!("{} done", done.len())) }
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(ctrl.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    cp.stop_process("ctrl");
    eprintln!("killed the controller with {} of 200 nodes done", before.len());
    start_controller(&cp, "ctrl-2", &[]).unwrap();
    let after = wait_for("all 200 nodes with exactly one block", Duration::from_secs(120), || async {
        let by_node = all_blocks_distinct(&client).await;
        let done = by_node.values().filter(|b| b.len() == 1).count();
        if done == 200 { Ok(by_node) } else { Err(format!("{done} of 200")) }
    })
    .await;
    for (node, b) in &before {
        assert_eq!(&after[node], b, "{node}'s block changed across the restart");
    }
    // Node podCIDRs agree with the NNCs.
    for n in nodes.list(&ListParams::default()).await.unwrap().items {
        if let Some(pod_cidr) = n.spec.as_ref().and_then(|s| s.pod_cidr.clone()) {
            assert_eq!(vec![pod_cidr], after[&n.name_any()]);
        }
    }
}

#[tokio::test]
async fn two_replicas_never_duplicate_and_the_standby_takes_over() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    let lease_args = ["--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "500ms"];
    start_controller(&cp, "replica-a", &lease_args).unwrap();
    start_controller(&cp, "replica-b", &lease_args).unwrap();
    let nodes = Api::<Node>::all(client.clone());
    for i in 0..40 {
        nodes.create(&PostParams::default(), &node(&format!("r{i:02}"), "192.168.20.1")).await.unwrap();
    }
    wait_for("40 nodes with a block", WAIT, || async {
        let by_node = all_blocks_distinct(&client).await;
        let done = by_node.values().filter(|b| b.len() == 1).count();
        if done == 40 { Ok(()) } else { Err(format!("{done} of 40")) }
    })
    .await;
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    let holder = lease_holder(&leases).await.unwrap();
    let standby = if holder == "replica-a" { "replica-b" } else { "replica-a" };
    assert!(cp.log_tail(standby, 100).contains("waiting for leadership"));
    assert!(!cp.log_tail(standby, 100).contains("became leader"), "only one replica leads");

    let killed_at = Instant::now();
    cp.stop_process(&holder);
    nodes.create(&PostParams::default(), &node("after-failover", "192.168.20.2")).await.unwrap();
    nnc_ready(&client, "after-failover").await;
    let took = killed_at.elapsed();
    let new_holder = lease_holder(&leases).await.unwrap();
    assert_eq!(new_holder, standby);
    // SIGTERM released the Lease (a rollout does not wait out its duration).
    assert!(cp.log_tail(&holder, 20).contains("released the leader Lease"), "{}", cp.log_tail(&holder, 20));
    assert!(took < Duration::from_secs(15), "standby took over after {took:?}");
    all_blocks_distinct(&client).await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_before_the_standby_takes_over() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    // The standby waits out 6 s without a renewal; the leader gives up after 2 s of failed renewals.
    let lease_args = ["--lease-duration", "6s", "--renew-deadline", "2s", "--retry-period", "250ms"];
    start_controller(&cp, "replica-a", &lease_args).unwrap();
    create_node(&client, "before", "192.168.21.1").await;
    nnc_ready(&client, "before").await;
    start_controller(&cp, "replica-b", &lease_args).unwrap();
    stands_by(&cp).await;
    // From now on the API server refuses every Lease write that keeps replica-a the holder.
    let policy = r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: refuse-replica-a-renewals}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {apiGroups: [coordination.k8s.io], apiVersions: [v1], operations: [UPDATE], resources: [leases]}
  validations:
  - {expression: "object.spec.holderIdentity != 'replica-a'", message: "renewals by replica-a are refused"}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: refuse-replica-a-renewals}
spec: {policyName: refuse-replica-a-renewals, validationActions: [Deny]}
"#;
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], policy).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    standby_takes_over_after_the_leader_stopped(&cp, &client, "lost the leader Lease", "192.168.21.2").await;
}

/// replica-b stands by (waits for leadership).
async fn stands_by(cp: &ControlPlane) {
    wait_for("replica-b to stand by", WAIT, || async {
        let log = cp.log_tail("replica-b", 50);
        if log.contains("waiting for leadership") { Ok(()) } else { Err(log) }
    })
    .await;
}

/// Once replica-b holds the Lease, replica-a has already exited with
/// `why` in its log; then a new Node at `ip` gets its block from replica-b.
async fn standby_takes_over_after_the_leader_stopped(cp: &ControlPlane, client: &Client, why: &str, ip: &str) {
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    wait_for("replica-b to take the Lease", WAIT, || async {
        let holder = lease_holder(&leases).await;
        if holder.as_deref() == Some("replica-b") { Ok(()) } else { Err(format!("{holder:?}")) }
    })
    .await;
    let exit = cp.exited("replica-a");
    assert!(exit.is_some_and(|s| !s.success()), "replica-a still runs while replica-b leads: {exit:?}");
    // The whole log: with RUST_BACKTRACE set, a backtrace follows the error.
    let log = cp.log_tail("replica-a", 1000);
    assert!(log.contains(why), "{log}");
    create_node(client, "after", ip).await;
    nnc_ready(client, "after").await;
    all_blocks_distinct(client).await;
}

/// A TCP relay to the API server that can stop relaying: every request
/// through it then hangs, as behind a dead link or a wedged server.
struct Relay {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn to(upstream: String) -> Relay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let relay = Relay { addr: listener.local_addr().unwrap(), frozen: frozen.clone() };
        // Bytes read while frozen are dropped and that direction stops for good.
        async fn pipe(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
        ) {
            let mut buf = vec![0; 16 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                if frozen.load(Ordering::SeqCst) {
                    return std::future::pending().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (frozen, upstream) = (frozen.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let ((ri, wi), (ro, wo)) = (inbound.into_split(), outbound.into_split());
                    tokio::join!(pipe(ri, wo, frozen.clone()), pipe(ro, wi, frozen));
                });
            }
        });
        relay
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_leader_whose_api_server_stops_answering_stops_before_the_standby_takes_over() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    // replica-a reaches the API server only through the relay.
    let kubeconfig = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    let server = kubeconfig.lines().find_map(|l| l.trim().strip_prefix("server: https://")).unwrap().to_string();
    let relay = Relay::to(server.clone()).await;
    let relayed = cp.kubeconfig().with_file_name("relayed.kubeconfig");
    std::fs::write(&relayed, kubeconfig.replace(&server, &relay.addr.to_string())).unwrap();
    let lease_args = ["--lease-duration", "6s", "--renew-deadline", "2s", "--retry-period", "250ms"];
    let mut a_args = lease_args.to_vec();
    a_args.extend(["--kubeconfig", relayed.to_str().unwrap()]);
    start_controller(&cp, "replica-a", &a_args).unwrap();
    create_node(&client, "before", "192.168.22.1").await;
    nnc_ready(&client, "before").await;
    start_controller(&cp, "replica-b", &lease_args).unwrap();
    stands_by(&cp).await;

    // From now on replica-a's requests hang: no error ever comes back.
    relay.freeze();
    let why = "no lease renewal answered within the renew deadline";
    standby_takes_over_after_the_leader_stopped(&cp, &client, why, "192.168.22.2").await;
}

#[tokio::test]
async fn a_missing_lease_namespace_stops_the_controller_with_the_fix() {
    let (cp, _client) = cluster().await;
    start_controller(&cp, "ctrl", &["--leader-election-namespace", "carve-nowhere"]).unwrap();
    let exit =
        wait_for("the controller to exit", WAIT, || async { cp.exited("ctrl").ok_or_else(|| cp.log_tail("ctrl", 20)) })
            .await;
    assert!(!exit.success());
    // The whole log: with RUST_BACKTRACE set, a backtrace follows the error.
    let log = cp.log_tail("ctrl", 1000);
    assert!(
        log.contains("carve-nowhere")
            && log.contains("create the namespace")
            && log.contains("--leader-election-namespace"),
        "{log}"
    );
}

#[tokio::test]
async fn blocks_return_only_when_the_node_is_really_gone() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "small", "  mode: Overlay\n  cidrs: [10.244.0.0/23]\n");
    start_controller(&cp, "ctrl", &[]).unwrap();
    let nodes = Api::<Node>::all(client.clone());
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());

    // A node held by a finalizer keeps its block while it drains.
    let mut held = node("held", "192.168.30.1");
    held.metadata.finalizers = Some(vec!["example.com/drain".into()]);
    nodes.create(&PostParams::default(), &held).await.unwrap();
    let held_block = blocks(&nnc_ready(&client, "held").await);
    nodes.delete("held", &DeleteParams::default()).await.unwrap();
    let addr = metrics_addr(&cp, "ctrl").await;
    wait_for_passes("three sweeps after the delete", &addr, "carve_sweeps_total", 3.0).await;
    assert_eq!(blocks(&nncs.get("held").await.unwrap()), held_block, "a terminating node keeps its block");
    create_node(&client, "other", "192.168.30.2").await;
    let other = blocks(&nnc_ready(&client, "other").await);
    assert_ne!(other, held_block);

    // Finalizer removed: the node is gone, its NNC too, and the block is free again.
    nodes
        .patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    wait_for("nnc/held deleted", WAIT, || async {
        match nncs.get_opt("held").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    create_node(&client, "third", "192.168.30.3").await;
    assert_eq!(blocks(&nnc_ready(&client, "third").await), held_block, "the released block is handed out again");

    // Same name, new Node (new uid): a clean NNC, no block shared.
    let first_uid = nodes.get("other").await.unwrap().uid().unwrap();
    let first_nnc_uid = nncs.get("other").await.unwrap().uid().unwrap();
    nodes.delete("other", &DeleteParams::default()).await.unwrap();
    let again = create_node(&client, "other", "192.168.30.9").await;
    assert_ne!(again.uid().unwrap(), first_uid);
    let fresh = nnc_where(&client, "other", "owned by the new node and Ready", WAIT, |n| {
        n.owner_references().first().map(|o| o.uid.clone()) == again.uid() && ready(n).is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_ne!(fresh.uid().unwrap(), first_nnc_uid, "the stale NNC was replaced, not reused");
    assert_eq!(fresh.status.unwrap().node_ip.as_deref(), Some("192.168.30.9"));
    all_blocks_distinct(&client).await;
}

#[tokio::test]
async fn exhaustion_is_reported_and_growth_serves_waiting_nodes() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "tiny", "  mode: Overlay\n  cidrs: [10.244.0.0/23]\n");
    start_controller(&cp, "ctrl", &[]).unwrap();
    for (i, n) in ["x1", "x2", "x3"].iter().enumerate() {
        create_node(&client, n, &format!("192.168.40.{}", i + 1)).await;
    }
    // Two nodes get the two blocks (in whatever order they are reconciled); one waits.
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    let waiting = wait_for("two Ready nodes and one PoolExhausted", WAIT, || async {
        let items = nncs.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let ready_count = items.iter().filter(|n| ready(n).is_some_and(|(s, _)| s == "True")).count();
        let waiting: Vec<_> =
            items.iter().filter(|n| ready(n).is_some_and(|(s, r)| s == "False" && r == "PoolExhausted")).collect();
        match (ready_count, waiting.as_slice()) {
            (2, [w]) => Ok(w.name_any()),
            _ => Err(format!("{:?}", items.iter().map(|n| (n.name_any(), ready(n))).collect::<Vec<_>>())),
        }
    })
    .await;
    assert!(blocks(&nncs.get(&waiting).await.unwrap()).is_empty());
    let served: Vec<String> = ["x1", "x2", "x3"].iter().filter(|n| **n != waiting).map(|n| n.to_string()).collect();
    let pools = Api::<PodCidr>::all(client.clone());
    let pool = wait_for("pool Exhausted=True", WAIT, || async {
        let p = pools.get("tiny").await.map_err(|e| e.to_string())?;
        let exhausted = p
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Exhausted" && c.status == "True"));
        if exhausted { Ok(p) } else { Err(format!("{:?}", p.status)) }
    })
    .await;
    let s = pool.status.unwrap();
    assert_eq!((s.allocated, s.free), (2, 0));
    assert_eq!((s.families[0].capacity, s.families[0].allocated, s.families[0].free), (2, 2, 0));
    wait_for("PoolExhausted events on the Node and the PodCIDR", WAIT, || async {
        let on_node = events_for(&client, "Node", &waiting).await;
        let on_pool = events_for(&client, "PodCIDR", "tiny").await;
        if on_node.iter().any(|(r, _)| r == "PoolExhausted")
            && on_pool.iter().any(|(r, _)| r == "PoolExhausted" || r == "NoFreeBlock")
        {
            Ok(())
        } else {
            Err(format!("node: {on_node:?} pool: {on_pool:?}"))
        }
    })
    .await;

    // Growth: append a CIDR; the waiting node is served without a restart.
    apply_pool(&cp, "tiny", "  mode: Overlay\n  cidrs: [10.244.0.0/23, 10.245.0.0/24]\n");
    assert_eq!(blocks(&nnc_ready(&client, &waiting).await), ["10.245.0.0/24"]);

    // Removing a CIDR that still holds blocks is refused: a condition, the block stays.
    apply_pool(&cp, "tiny", "  mode: Overlay\n  cidrs: [10.244.0.0/23]\n");
    wait_for("RemovalRefused condition", WAIT, || async {
        let p = pools.get("tiny").await.map_err(|e| e.to_string())?;
        let c = p.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "RemovalRefused").cloned());
        match c {
            Some(c) if c.status == "True" && c.message.contains("10.245.0.0/24") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_for_passes("two sweeps after the refusal", &metrics_addr(&cp, "ctrl").await, "carve_sweeps_total", 2.0).await;
    assert_eq!(blocks(&nncs.get(&waiting).await.unwrap()), ["10.245.0.0/24"]);

    // disabled: existing blocks stay, a new node gets none.
    apply_pool(
        &cp,
        "tiny",
        "  mode: Overlay\n  cidrs: [10.244.0.0/23, 10.245.0.0/24, 10.246.0.0/24]\n  disabled: true\n",
    );
    create_node(&client, "x4", "192.168.40.4").await;
    let x4 = nnc_where(&client, "x4", "Ready=False", WAIT, |n| ready(n).is_some_and(|(s, _)| s == "False")).await;
    assert_eq!(ready(&x4).unwrap().1, "PoolDisabled");
    assert_eq!(blocks(&nncs.get(&served[0]).await.unwrap()).len(), 1);
}

#[tokio::test]
async fn bad_objects_become_conditions_and_events_not_crashes() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "first", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    // creationTimestamp has 1 s resolution: the second pool must be younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    apply_pool(
        &cp,
        "second",
        "  mode: Overlay\n  cidrs: [10.244.128.0/17]\n  nodeSelector:\n    matchLabels: {pool: second}\n",
    );
    start_controller(&cp, "ctrl", &[]).unwrap();
    let pools = Api::<PodCidr>::all(client.clone());
    let invalid = wait_for("second pool Invalid", WAIT, || async {
        let p = pools.get("second").await.map_err(|e| e.to_string())?;
        let c = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Invalid" && c.status == "True").cloned());
        c.ok_or(format!("{:?}", p.status))
    })
    .await;
    assert!(invalid.message.contains("first"), "{}", invalid.message);
    let mut n = node("picky", "192.168.50.1");
    n.metadata.labels = Some([("pool".to_string(), "second".to_string())].into());
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &n).await.unwrap();
    let picky = nnc_where(&client, "picky", "Ready=False", WAIT, |n| ready(n).is_some_and(|(s, _)| s == "False")).await;
    assert_eq!(ready(&picky).unwrap().1, "PoolInvalid", "nothing is carved from an invalid pool");

    // A hand-edited, malformed NNC status: a condition + Event, the real block comes back.
    create_node(&client, "edited", "192.168.50.2").await;
    let good = blocks(&nnc_ready(&client, "edited").await);
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    nncs.patch_status(
        "edited",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"blocks": [{"cidr": "10.244.999.0/24", "family": "IPv4"}, {"cidr": "10.9.0.0/24", "family": "IPv4"}]}})),
    )
    .await
    .unwrap();
    let repaired = nnc_where(&client, "edited", "blocks repaired and BlocksValid=False", WAIT, |n| {
        blocks(n) == good
            && n.status.as_ref().unwrap().conditions.iter().any(|c| c.type_ == "BlocksValid" && c.status == "False")
    })
    .await;
    let c = repaired.status.unwrap().conditions.into_iter().find(|c| c.type_ == "BlocksValid").unwrap();
    assert!(c.message.contains("10.244.999.0/24") && c.message.contains("10.9.0.0/24"), "{}", c.message);
    wait_for("InvalidStatus event", WAIT, || async {
        let ev = events_for(&client, "NodeNetworkConfig", "edited").await;
        if ev.iter().any(|(r, _)| r == "InvalidStatus") { Ok(()) } else { Err(format!("{ev:?}")) }
    })
    .await;
    // Still alive and still serving.
    create_node(&client, "after", "192.168.50.3").await;
    nnc_ready(&client, "after").await;
    assert!(cp.log_tail("ctrl", 200).lines().all(|l| !l.contains("panicked")));
}

#[tokio::test]
async fn existing_pod_cidrs_are_adopted_and_conflicts_reported() {
    let (cp, client) = cluster().await;
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    let nodes = Api::<Node>::all(client.clone());
    // Nodes that kube-controller-manager (or an earlier install) already gave podCIDRs.
    for (name, cidr) in [("kcm-a", "10.244.0.0/24"), ("kcm-b", "10.244.7.0/24")] {
        let mut n = node(name, "192.168.60.1");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        });
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }
    start_controller(&cp, "ctrl", &[]).unwrap();
    assert_eq!(blocks(&nnc_ready(&client, "kcm-a").await), ["10.244.0.0/24"]);
    assert_eq!(blocks(&nnc_ready(&client, "kcm-b").await), ["10.244.7.0/24"]);
    // A new node does not get an adopted block.
    create_node(&client, "fresh", "192.168.60.2").await;
    assert_eq!(blocks(&nnc_ready(&client, "fresh").await), ["10.244.1.0/24"]);
    // A podCIDR that clashes with another node's block is reported, not adopted.
    let mut clash = node("clash", "192.168.60.3");
    clash.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        pod_cidr: Some("10.244.7.0/24".into()),
        pod_cidrs: Some(vec!["10.244.7.0/24".into()]),
        ..Default::default()
    });
    nodes.create(&PostParams::default(), &clash).await.unwrap();
    let c = nnc_where(&client, "clash", "PodCIDRAdopted=False", WAIT, |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "PodCIDRAdopted" && c.status == "False"))
    })
    .await;
    assert_ne!(blocks(&c), ["10.244.7.0/24"]);
    let msg = c.status.unwrap().conditions.into_iter().find(|c| c.type_ == "PodCIDRAdopted").unwrap().message;
    assert!(msg.contains("kcm-b"), "{msg}");
    all_blocks_distinct(&client).await;
}

#[tokio::test]
async fn operations_metrics_health_and_a_clear_error_without_crds() {
    let cp = ControlPlane::start().await.unwrap();
    // No CRDs: a clear start-up error naming the fix.
    let out =
        std::process::Command::new(carve_e2e::testkit::workspace_bin("carve-controller", "carve-controller").unwrap())
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(["--metrics-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CRDs are not installed") && err.contains("kubectl apply -f crds/"), "{err}");

    cp.install_crds().unwrap();
    let client = cp.client().await.unwrap();
    apply_pool(&cp, "overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n");
    start_controller(&cp, "ctrl", &["--log-format", "json"]).unwrap();
    create_node(&client, "m1", "192.168.70.1").await;
    nnc_ready(&client, "m1").await;
    let addr = metrics_addr(&cp, "ctrl").await;
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", &format!("http://{addr}{path}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get("/healthz").ends_with("200"));
    assert!(get("/readyz").ends_with("200"));
    let metrics = wait_for("pool gauges", WAIT, || async {
        let m = get("/metrics");
        if m.contains(r#"carve_blocks{pool="overlay",family="IPv4",state="allocated"} 1"#) { Ok(m) } else { Err(m) }
    })
    .await;
    for series in ["carve_block_allocation_seconds_count 1", "carve_leader 1", "carve_reconciles_total"] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    // --log-format json: every log line is a JSON object.
    let log = cp.log_tail("ctrl", 50);
    assert!(
        log.lines().filter(|l| !l.is_empty()).all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{log}"
    );
}

#[tokio::test]
async fn a_live_lease_is_not_taken_whatever_the_holders_clock_says() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let (cp, client) = cluster().await;
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    // A holder whose clock is an hour behind: every renewal it writes looks long expired.
    let skewed = || MicroTime(Timestamp::now() - SignedDuration::from_secs(3600));
    let lease = Lease {
        metadata: kube::api::ObjectMeta { name: Some("carve-controller".into()), ..Default::default() },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("elsewhere".into()),
            lease_duration_seconds: Some(2),
            renew_time: Some(skewed()),
            acquire_time: Some(skewed()),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let lease_args = ["--lease-duration", "2s", "--renew-deadline", "1500ms", "--retry-period", "250ms"];
    start_controller(&cp, "candidate", &lease_args).unwrap();
    // The holder renews (skewed) every 500 ms for 6 s, three lease durations.
    let renewing_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < renewing_until {
        let patch = json!({"spec": {"renewTime": skewed()}});
        leases.patch("carve-controller", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        let holder = lease_holder(&leases).await;
        assert_eq!(holder.as_deref(), Some("elsewhere"), "the candidate took a Lease that is being renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!cp.log_tail("candidate", 100).contains("became leader"));
    // Renewals stop: the candidate takes over once the record stays unchanged for a lease duration.
    wait_for("the candidate to take the abandoned Lease", WAIT, || async {
        let holder = lease_holder(&leases).await;
        if holder.as_deref() == Some("candidate") { Ok(()) } else { Err(format!("{holder:?}")) }
    })
    .await;
}
