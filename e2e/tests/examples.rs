//! Each file in examples/ applied as a user would (`kubectl apply -f`), with
//! carve-controller and three Nodes, and the NodeNetworkConfigs it leads to.

use std::collections::BTreeSet;
use std::time::Duration;

use carve_crds::NodeNetworkConfig;
use carve_e2e::ControlPlane;
use carve_e2e::testkit::{node, start_controller, wait_for};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;

const WAIT: Duration = Duration::from_secs(60);

/// What one node ended up with: pool, mode, blocks and its Node's podCIDRs (sorted).
#[derive(Debug, PartialEq, Eq)]
struct Carved {
    pool: String,
    mode: String,
    blocks: Vec<String>,
    pod_cidrs: Vec<String>,
    reserved: Vec<String>,
}

/// Applies `example`, registers `nodes` (name, agent-pool label) and returns
/// each node's NNC once all of them are Ready.
async fn run_example(example: &str, nodes: &[(&str, Option<&str>)]) -> Vec<(String, Carved)> {
    run_example_at(example, nodes, "192.168.72").await
}

/// `run_example` with the nodes' InternalIPs at `<subnet>.10`, `.11`, ...
async fn run_example_at(example: &str, nodes: &[(&str, Option<&str>)], subnet: &str) -> Vec<(String, Carved)> {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let client = cp.client().await.unwrap();
    cp.kubectl_ok(&["apply", "-f", example]).unwrap();
    start_controller(&cp, "controller", &[]).unwrap();
    let node_api = Api::<Node>::all(client.clone());
    for (i, (name, pool)) in nodes.iter().enumerate() {
        let mut n = node(name, &format!("{subnet}.{}", 10 + i));
        if let Some(p) = pool {
            n.metadata.labels = Some([("kubernetes.azure.com/agentpool".to_string(), p.to_string())].into());
        }
        node_api.create(&PostParams::default(), &n).await.unwrap();
    }
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    let mut out = Vec::new();
    for (name, _) in nodes {
        // The controller writes the NNC status first and the Node's podCIDRs
        // (Overlay) right after: wait for both.
        let (nnc, node) =
            wait_for(&format!("nnc/{name} Ready (and, in Overlay, node/{name} podCIDRs)"), WAIT, || async {
                let nnc = nncs.get_opt(name).await.map_err(|e| e.to_string())?.ok_or("no NNC yet")?;
                let node = node_api.get(name).await.map_err(|e| e.to_string())?;
                let s = nnc.status.clone().unwrap_or_default();
                let ready = s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
                let overlay = s.mode == Some(carve_crds::PoolMode::Overlay);
                let has_pod_cidrs =
                    node.spec.as_ref().and_then(|s| s.pod_cidrs.as_ref()).is_some_and(|c| !c.is_empty());
                if ready && (!overlay || has_pod_cidrs) { Ok((nnc, node)) } else { Err(format!("{s:?}")) }
            })
            .await;
        let s = nnc.status.unwrap();
        let mut blocks: Vec<String> = s.blocks.iter().map(|b| b.cidr.clone()).collect();
        blocks.sort();
        let mut pod_cidrs = node.spec.and_then(|s| s.pod_cidrs).unwrap_or_default();
        pod_cidrs.sort();
        let mode = s.mode.map(|m| format!("{m:?}")).unwrap_or_default();
        let reserved = s.reserved_ips.clone();
        out.push((name.to_string(), Carved { pool: s.pool.unwrap_or_default(), mode, blocks, pod_cidrs, reserved }));
    }
    out
}

fn all_blocks(carved: &[(String, Carved)]) -> BTreeSet<String> {
    carved.iter().flat_map(|(_, c)| c.blocks.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn overlay_example_gives_each_node_a_24_and_its_pod_cidr() {
    let carved = run_example("examples/overlay.yaml", &[("node-1", None), ("node-2", None), ("node-3", None)]).await;
    assert_eq!(all_blocks(&carved), set(&["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]));
    for (name, c) in &carved {
        assert_eq!((c.pool.as_str(), c.mode.as_str(), c.blocks.len()), ("overlay", "Overlay", 1), "{name}: {c:?}");
        assert_eq!(c.pod_cidrs, c.blocks, "{name}: Node podCIDRs follow the NNC (kubenet compatibility)");
    }
}

#[tokio::test]
async fn vnet_example_carves_26_blocks_and_withholds_azure_reserved_addresses() {
    let carved = run_example("examples/vnet.yaml", &[("node-1", None), ("node-2", None), ("node-3", None)]).await;
    // 10.224.0.0/26 holds the subnet's network, gateway and two DNS addresses
    // (10.224.0.0–3), which Azure reserves: the block is handed out, those
    // four addresses withheld from its pods.
    assert_eq!(all_blocks(&carved), set(&["10.224.0.0/26", "10.224.0.64/26", "10.224.0.128/26"]));
    let first = carved.iter().find(|(_, c)| c.blocks == ["10.224.0.0/26"]).expect("someone holds the first block");
    assert_eq!(first.1.reserved, ["10.224.0.0", "10.224.0.1", "10.224.0.2", "10.224.0.3"], "{first:?}");
    for (name, c) in &carved {
        assert_eq!((c.pool.as_str(), c.mode.as_str(), c.blocks.len()), ("vnet", "VNet", 1), "{name}: {c:?}");
        assert!(c.pod_cidrs.is_empty(), "{name}: VNet blocks are not written as Node podCIDRs: {c:?}");
    }
}

#[tokio::test]
async fn pod_subnet_static_example_grants_each_node_its_max_pods_worth_of_28s_on_the_node_subnet() {
    let nodes = [("node-1", None), ("node-2", None), ("node-3", None)];
    let carved = run_example_at("examples/pod-subnet-static.yaml", &nodes, "10.224.0").await;
    // maxPods 30: ceil(30 / 16) = 2 blocks of /28 per node, at once.
    assert_eq!(all_blocks(&carved).len(), 6, "{carved:?}");
    for (name, c) in &carved {
        assert_eq!(
            (c.pool.as_str(), c.mode.as_str(), c.blocks.len()),
            ("pod-subnet-static", "VNet", 2),
            "{name}: {c:?}"
        );
    }
    // The nodes live at 10.224.0.10-12, inside the first block: whoever holds it withholds
    // Azure's four and the three node addresses from its pods.
    let first = carved.iter().find(|(_, c)| c.blocks.contains(&"10.224.0.0/28".to_string())).expect("first block");
    assert_eq!(
        first.1.reserved,
        ["10.224.0.0", "10.224.0.1", "10.224.0.2", "10.224.0.3", "10.224.0.10", "10.224.0.11", "10.224.0.12"],
        "{first:?}"
    );
}

#[tokio::test]
async fn pod_subnet_dynamic_example_starts_each_node_with_one_28() {
    let nodes = [("node-1", None), ("node-2", None)];
    let carved = run_example_at("examples/pod-subnet-dynamic.yaml", &nodes, "10.224.0").await;
    for (name, c) in &carved {
        assert_eq!(
            (c.pool.as_str(), c.mode.as_str(), c.blocks.len()),
            ("pod-subnet-dynamic", "VNet", 1),
            "{name}: {c:?}"
        );
    }
    assert_eq!(all_blocks(&carved), set(&["10.224.0.0/28", "10.224.0.16/28"]));
}

#[tokio::test]
async fn dual_stack_example_gives_each_node_a_24_and_an_80() {
    let carved = run_example("examples/dual-stack.yaml", &[("node-1", None), ("node-2", None), ("node-3", None)]).await;
    assert_eq!(
        all_blocks(&carved),
        set(&[
            "10.244.0.0/24",
            "10.244.1.0/24",
            "10.244.2.0/24",
            "fd12:3456:789a::/80",
            "fd12:3456:789a:0:1::/80",
            "fd12:3456:789a:0:2::/80",
        ])
    );
    for (name, c) in &carved {
        assert_eq!(c.blocks.len(), 2, "{name}: one block per family: {c:?}");
        assert!(c.blocks.iter().any(|b| b.starts_with("10.244.")) && c.blocks.iter().any(|b| b.starts_with("fd12:")));
        assert_eq!(c.pod_cidrs, c.blocks, "{name}: both families in Node podCIDRs");
    }
}

#[tokio::test]
async fn two_pools_example_serves_each_agent_pool_from_its_own_range() {
    let carved = run_example(
        "examples/two-pools.yaml",
        &[("sys-1", Some("system")), ("user-1", Some("user")), ("sys-2", Some("system"))],
    )
    .await;
    let by_node: Vec<(&str, &str, BTreeSet<String>)> =
        carved.iter().map(|(n, c)| (n.as_str(), c.pool.as_str(), c.blocks.iter().cloned().collect())).collect();
    let system: BTreeSet<String> =
        by_node.iter().filter(|(_, p, _)| *p == "system").flat_map(|(_, _, b)| b.clone()).collect();
    assert_eq!(system, set(&["10.244.0.0/24", "10.244.1.0/24"]), "{carved:?}");
    assert!(by_node.iter().any(|(n, p, b)| *n == "user-1" && *p == "user" && *b == set(&["10.245.0.0/24"])));
    assert!(by_node.iter().filter(|(n, _, _)| n.starts_with("sys-")).all(|(_, p, _)| *p == "system"), "{carved:?}");
}
