//! Kubernetes objects → the index's plain views, and back to NNC status.

use std::collections::BTreeMap;

use carve_crds::net::IpFamily;
use carve_crds::{NodeBlock, NodeNetworkConfig, PodCidr};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use crate::index::{NodeView, PoolView};
use crate::selector::Selector;

pub fn pool_view(pool: &PodCidr) -> PoolView {
    let selector = match &pool.spec.node_selector {
        None => Ok(Selector::default()),
        Some(sel) => {
            let labels: BTreeMap<String, String> = sel.match_labels.clone().unwrap_or_default();
            let exprs: Vec<(String, String, Vec<String>)> = sel
                .match_expressions
                .iter()
                .flatten()
                .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone().unwrap_or_default()))
                .collect();
            Selector::from_parts(&labels, &exprs).map_err(|e| e.to_string())
        }
    };
    PoolView {
        name: pool.name_any(),
        created: pool.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        mode: pool.spec.mode,
        cidrs: pool.spec.cidrs.iter().map(|c| c.as_str().to_string()).collect(),
        block_v4: pool.spec.block_size.ipv4,
        block_v6: pool.spec.block_size.ipv6,
        exclusions: pool.spec.exclusions.iter().map(|c| c.as_str().to_string()).collect(),
        disabled: pool.spec.disabled,
        selector,
    }
}

pub fn node_view(node: &Node) -> NodeView {
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        pod_cidrs.push(c);
    }
    NodeView { name: node.name_any(), uid: node.uid().unwrap_or_default(), labels: node.labels().clone(), pod_cidrs }
}

/// A digest of the Node fields carve reads: name, uid, labels, InternalIP
/// addresses, podCIDR(s) and whether it is being deleted. The controller's
/// Node trigger drops updates that change none of them (kubelet's status
/// reports, carve-agent's own condition writes).
pub fn node_fields(node: &Node) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let view = node_view(node);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&view.name, &view.uid, &view.labels, &view.pod_cidrs).hash(&mut h);
    let internal: Vec<&str> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
        .collect();
    internal.hash(&mut h);
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// The node's InternalIP (the first one; IPv4 sorts before IPv6 in practice).
pub fn internal_ip(node: &Node) -> Option<String> {
    node.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == "InternalIP").map(|a| a.address.clone())
}

/// UID of the Node that controls this NNC, if any.
pub fn owner_uid(nnc: &NodeNetworkConfig) -> Option<String> {
    nnc.owner_references().iter().find(|o| o.kind == "Node" && o.controller == Some(true)).map(|o| o.uid.clone())
}

pub fn recorded_blocks(nnc: &NodeNetworkConfig) -> Vec<String> {
    nnc.status.as_ref().map(|s| s.blocks.iter().map(|b| b.cidr.clone()).collect()).unwrap_or_default()
}

/// First usable address of a block (network + 1): the pods' gateway on the node.
pub fn gateway(block: &IpNet) -> String {
    carve_crds::net::nth(block, 1).to_string()
}

pub fn node_blocks(blocks: &[IpNet]) -> Vec<NodeBlock> {
    blocks
        .iter()
        .map(|b| NodeBlock { cidr: b.to_string(), family: IpFamily::of(b), gateway: Some(gateway(b)) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(patch: serde_json::Value) -> Node {
        let mut base = serde_json::json!({
            "metadata": {"name": "node-1", "uid": "u1", "labels": {"pool": "a"}, "resourceVersion": "1"},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.224.0.4"}, {"type": "Hostname", "address": "node-1"}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        json_merge(&mut base, patch);
        serde_json::from_value(base).unwrap()
    }

    fn json_merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    json_merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    #[test]
    fn node_updates_carve_does_not_read_leave_the_digest_alone() {
        let before = node_fields(&node(serde_json::json!({})));
        let heartbeat = serde_json::json!({
            "metadata": {"resourceVersion": "2", "annotations": {"x": "y"}},
            "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}], "capacity": {"cpu": "2"}},
        });
        assert_eq!(node_fields(&node(heartbeat)), before);
        // Hostname addresses are not read either.
        let hostname = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.224.0.4"}]}});
        assert_eq!(node_fields(&node(hostname)), before);
    }

    #[test]
    fn every_node_field_carve_reads_changes_the_digest() {
        let before = node_fields(&node(serde_json::json!({})));
        for patch in [
            serde_json::json!({"metadata": {"labels": {"pool": "b"}}}),
            serde_json::json!({"metadata": {"uid": "u2"}}),
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-02T00:00:00Z"}}),
            serde_json::json!({"spec": {"podCIDR": "10.244.1.0/24"}}),
            serde_json::json!({"spec": {"podCIDRs": ["10.244.0.0/24", "fd00::/80"]}}),
            serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.224.0.9"}]}}),
        ] {
            assert_ne!(node_fields(&node(patch.clone())), before, "{patch}");
        }
    }
}
