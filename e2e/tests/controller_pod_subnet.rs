//! Pod Subnet blocks against a real API server: a dynamic pool grows a node
//! to its `spec.requestedIPs`, says when it cannot, takes a block back only
//! through a release naming its allocation ID (then quarantines it), refuses
//! stale and foreign releases; a static pool grants max pods' worth at once;
//! a Node joining with an address inside another node's block is withheld
//! there and reported, on both Nodes and on the pod already using it.

use std::time::Duration;

use carve_crds::NodeNetworkConfig;
use carve_e2e::ControlPlane;
use carve_e2e::testkit::{events_for, metrics_addr, nnc_where, node, start_controller, wait_for, wait_for_passes};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn cluster() -> (ControlPlane, Client) {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let client = cp.client().await.unwrap();
    (cp, client)
}

fn apply(cp: &ControlPlane, yaml: &str) {
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], yaml).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn create_node(client: &Client, name: &str, ip: &str, pods: Option<&str>) {
    let mut n = node(name, ip);
    if let Some(p) = pods {
        n.status.get_or_insert_default().capacity = Some([("pods".to_string(), Quantity(p.into()))].into());
    }
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &n).await.unwrap();
}

fn grants(nnc: &NodeNetworkConfig) -> Vec<(IpNet, String)> {
    let status = nnc.status.clone().unwrap_or_default();
    status.blocks.iter().map(|b| (b.cidr.parse().unwrap(), b.allocation_id.clone().unwrap_or_default())).collect()
}

fn condition(nnc: &NodeNetworkConfig, type_: &str) -> Option<(String, String, String)> {
    let c = nnc.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn usable(nnc: &NodeNetworkConfig) -> usize {
    let s = nnc.status.clone().unwrap_or_default();
    let size: usize = grants(nnc).iter().map(|(b, _)| 1usize << (32 - b.prefix_len())).sum();
    let reserved = s
        .reserved_ips
        .iter()
        .filter(|ip| grants(nnc).iter().any(|(b, _)| b.contains(&ip.parse::<std::net::IpAddr>().unwrap())))
        .count();
    size - reserved
}

/// Writes `node`'s NNC spec as carve-agent does: server-side apply under its field manager.
async fn agent_spec(client: &Client, node: &str, spec: serde_json::Value) {
    let body = json!({ "apiVersion": "carve.dev/v1alpha1", "kind": "NodeNetworkConfig", "metadata": { "name": node }, "spec": spec });
    Api::<NodeNetworkConfig>::all(client.clone())
        .patch(node, &PatchParams::apply("carve-agent").force(), &Patch::Apply(body))
        .await
        .unwrap();
}

const DYNAMIC: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: dyn}
spec:
  mode: VNet
  cidrs: [10.224.0.0/26]
  blockSize: {ipv4: 28}
  allocation: {strategy: Dynamic, maxBlocksPerNode: 3, releaseQuarantineSeconds: 3}
";

#[tokio::test]
async fn a_dynamic_node_grows_to_its_request_and_gives_back_only_what_it_names() {
    let (cp, client) = cluster().await;
    apply(&cp, DYNAMIC);
    start_controller(&cp, "ctrl", &[]).unwrap();
    create_node(&client, "a", "10.224.0.4", None).await;
    let a = nnc_where(&client, "a", "one block", WAIT, |n| grants(n).len() == 1).await;
    let first = grants(&a)[0].clone();
    assert_eq!(a.status.as_ref().unwrap().scaler.as_ref().map(|s| s.max_blocks_per_node), Some(3));
    assert!(a.status.as_ref().unwrap().reserved_ips.contains(&"10.224.0.4".to_string()), "its own address withheld");

    // Growth to the request, the first grant kept under its ID.
    agent_spec(&client, "a", json!({ "requestedIPs": { "ipv4": 30 } })).await;
    let grown = nnc_where(&client, "a", "usable >= 30", WAIT, |n| usable(n) >= 30).await;
    assert_eq!(grants(&grown)[0], first);
    assert_eq!(condition(&grown, "RequestsMet").map(|c| c.0), Some("True".into()));

    // Above the pool's maximum: a condition naming the field and the fix, the blocks stay.
    agent_spec(&client, "a", json!({ "requestedIPs": { "ipv4": 100 } })).await;
    let capped = nnc_where(&client, "a", "RequestsMet=False", WAIT, |n| {
        condition(n, "RequestsMet").is_some_and(|c| c.0 == "False" && c.1 == "AboveMaximum")
    })
    .await;
    let (_, _, message) = condition(&capped, "RequestsMet").unwrap();
    assert!(message.contains("spec.requestedIPs.ipv4") && message.contains("maxBlocksPerNode"), "{message}");
    assert_eq!(grants(&capped).len(), 3);
    wait_for("AboveMaximum Event on the NNC", WAIT, || async {
        let e = events_for(&client, "NodeNetworkConfig", "a").await;
        if e.iter().any(|(r, _)| r == "AboveMaximum") { Ok(()) } else { Err(format!("{e:?}")) }
    })
    .await;

    // A release with a stale ID and one of a block the node does not hold: refused, nothing lost.
    let (tail, tail_id) = grants(&capped)[2].clone();
    agent_spec(
        &client,
        "a",
        json!({ "requestedIPs": { "ipv4": 0 }, "releases": [
            { "cidr": tail.to_string(), "allocationID": "0000000000000000" },
            { "cidr": "10.224.0.48/28", "allocationID": "feedfacefeedface" },
        ] }),
    )
    .await;
    let refused = nnc_where(&client, "a", "ReleaseRefused", WAIT, |n| {
        condition(n, "RequestsMet").is_some_and(|c| c.1 == "ReleaseRefused")
    })
    .await;
    let (_, _, message) = condition(&refused, "RequestsMet").unwrap();
    assert!(message.contains("allocationID 0000000000000000") && message.contains("does not hold"), "{message}");
    assert_eq!(grants(&refused).len(), 3, "a refused release removes nothing");

    // The real release: out of blocks into quarantine, then back to the pool.
    agent_spec(
        &client,
        "a",
        json!({ "requestedIPs": { "ipv4": 0 }, "releases": [{ "cidr": tail.to_string(), "allocationID": tail_id }] }),
    )
    .await;
    let released = nnc_where(&client, "a", "tail quarantined", WAIT, |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.quarantined.iter().any(|q| q.cidr == tail.to_string() && q.allocation_id == tail_id))
    })
    .await;
    assert!(grants(&released).iter().all(|(b, _)| *b != tail));
    nnc_where(&client, "a", "quarantine over", WAIT, |n| n.status.as_ref().is_some_and(|s| s.quarantined.is_empty()))
        .await;
    // Another node gets the block again, under a new ID; a's stale release of it changes nothing.
    create_node(&client, "b", "10.224.0.5", None).await;
    agent_spec(&client, "b", json!({ "requestedIPs": { "ipv4": 1 } })).await;
    let b =
        nnc_where(&client, "b", "holds the released block", WAIT, |n| grants(n).iter().any(|(g, _)| *g == tail)).await;
    let regrant = grants(&b).into_iter().find(|(g, _)| *g == tail).unwrap();
    assert_ne!(regrant.1, tail_id, "a new grant, a new allocation ID");
    // Any change to a's NNC reconciles a, which reads its stale release again.
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    let addr = metrics_addr(&cp, "ctrl").await;
    let touch = json!({ "metadata": { "labels": { "carve.test/touched": "1" } } });
    nncs.patch("a", &PatchParams::default(), &Patch::Merge(touch)).await.unwrap();
    wait_for_passes("a reconciled after the touch", &addr, "carve_reconciles_total", 1.0).await;
    let b_now = nncs.get("b").await.unwrap();
    assert!(grants(&b_now).contains(&regrant), "a's old release cannot touch b's grant");
}

#[tokio::test]
async fn a_static_node_gets_its_max_pods_worth_of_blocks_at_once() {
    let (cp, client) = cluster().await;
    apply(
        &cp,
        "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata: {name: static}\nspec:\n  mode: VNet\n  cidrs: [10.30.0.0/24]\n  allocation: {strategy: Static}\n",
    );
    start_controller(&cp, "ctrl", &[]).unwrap();
    create_node(&client, "s1", "192.168.9.1", Some("30")).await;
    let s1 = nnc_where(&client, "s1", "Ready", WAIT, |n| condition(n, "Ready").is_some_and(|c| c.0 == "True")).await;
    // Azure's static block: ceil(maxPods / 16) /28 blocks (16 addresses each in VNet).
    assert_eq!(grants(&s1).len(), 2, "{:?}", s1.status);
    assert!(s1.status.as_ref().unwrap().blocks.iter().all(|b| b.gateway.is_none()), "VNet blocks name no gateway");
}

#[tokio::test]
async fn a_node_joining_inside_a_granted_block_is_withheld_and_reported_with_the_pod_using_it() {
    let (cp, client) = cluster().await;
    apply(
        &cp,
        "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata: {name: subnet}\nspec:\n  mode: VNet\n  cidrs: [10.224.0.0/24]\n",
    );
    start_controller(&cp, "ctrl", &[]).unwrap();
    create_node(&client, "n1", "10.224.0.4", None).await;
    let n1 = nnc_where(&client, "n1", "one block", WAIT, |n| grants(n).len() == 1).await;
    assert_eq!(grants(&n1)[0].0.to_string(), "10.224.0.0/28");
    assert!(n1.status.as_ref().unwrap().address_conflicts.is_empty(), "its own address is simply withheld");

    // A pod on n1 already has .9 (as carve-ipam could have given it before the Node existed).
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    // No controller-manager here to create the namespace's default ServiceAccount.
    let sa = serde_json::from_value(json!({ "metadata": { "name": "default" } })).unwrap();
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "early" },
        "spec": { "nodeName": "n1", "containers": [{ "name": "c", "image": "none" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({ "status": { "podIP": "10.224.0.9", "podIPs": [{ "ip": "10.224.0.9" }] } });
    pods.patch_status("early", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();

    create_node(&client, "late", "10.224.0.9", None).await;
    let n1 = nnc_where(&client, "n1", "AddressConflict=True", WAIT, |n| {
        condition(n, "AddressConflict").is_some_and(|c| c.0 == "True")
    })
    .await;
    let s = n1.status.unwrap();
    assert!(s.reserved_ips.contains(&"10.224.0.9".to_string()), "withdrawn from new pods: {:?}", s.reserved_ips);
    assert_eq!(s.address_conflicts.len(), 1);
    assert_eq!((s.address_conflicts[0].ip.as_str(), s.address_conflicts[0].node.as_str()), ("10.224.0.9", "late"));
    wait_for("NodeAddressInBlock Events on both Nodes and the pod", WAIT, || async {
        let on_n1 = events_for(&client, "Node", "n1").await;
        let on_late = events_for(&client, "Node", "late").await;
        let on_pod = events_for(&client, "Pod", "early").await;
        let has = |e: &[(String, String)]| e.iter().any(|(r, _)| r == "NodeAddressInBlock");
        if has(&on_n1)
            && has(&on_late)
            && on_pod.iter().any(|(r, n)| r == "NodeAddressInBlock" && n.contains("move the pod"))
        {
            Ok(())
        } else {
            Err(format!("n1 {on_n1:?} late {on_late:?} pod {on_pod:?}"))
        }
    })
    .await;
    // carve does not evict: the pod stays.
    assert!(pods.get_opt("early").await.unwrap().is_some());
}

#[tokio::test]
async fn an_nnc_someone_else_made_at_the_nodes_creation_is_replaced_by_the_controllers_own() {
    let (cp, client) = cluster().await;
    apply(&cp, DYNAMIC);
    start_controller(&cp, "ctrl", &[]).unwrap();
    for (name, ip) in [("early-1", "10.224.0.6"), ("early-2", "10.224.0.7"), ("early-3", "10.224.0.8")] {
        // A spec applied as the Node appears, before the controller made the
        // NNC, creates one with no owner: the controller must end up with its own.
        create_node(&client, name, ip, None).await;
        agent_spec(&client, name, json!({ "requestedIPs": { "ipv4": 1 } })).await;
        let nnc = nnc_where(&client, name, "owned by its Node, with a block", WAIT, |n| {
            n.metadata.owner_references.as_ref().is_some_and(|o| o.iter().any(|r| r.kind == "Node" && r.name == name))
                && grants(n).len() == 1
        })
        .await;
        assert!(nnc.status.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")));
    }
}
