//! Kubernetes objects → the index's plain views, and back to NNC status.

use std::collections::BTreeMap;

use std::net::IpAddr;

use carve_crds::net::IpFamily;
use carve_crds::{NodeBlock, NodeNetworkConfig, PodCidr, PoolMode, QuarantinedBlock};
use k8s_openapi::api::core::v1::{Node, NodeAddress};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;

use crate::index::{Grant, NodeView, PoolView, Quarantine, Request};
use crate::selector::Selector;

pub(crate) fn pool_view(pool: &PodCidr) -> PoolView {
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
        allocation: pool.spec.allocation.clone().unwrap_or_default(),
    }
}

/// A Node as carve's cache holds it: the fields carve reads, no others. The
/// decoder skips the rest (images, conditions, nodeInfo, daemon endpoints), so
/// a cached Node costs a third of a full `Node` and 5,000 of them fit the
/// controller's memory budget.
#[derive(kube::Resource, Deserialize, Clone, Debug, Default)]
#[resource(inherit = Node)]
pub struct PartialNode {
    pub metadata: ObjectMeta,
    pub spec: Option<PartialNodeSpec>,
    pub status: Option<PartialNodeStatus>,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct PartialNodeSpec {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
    /// Their keys only: carvectl shows carve-agent's no-pod-addresses taint.
    pub taints: Option<Vec<TaintKey>>,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct TaintKey {
    pub key: String,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct PartialNodeStatus {
    pub addresses: Option<Vec<NodeAddress>>,
    pub capacity: Option<PodCapacity>,
}

/// `status.capacity`, of which carve reads only `pods`.
#[derive(Deserialize, Clone, Debug, Default)]
pub struct PodCapacity {
    pub pods: Option<Quantity>,
}

/// The node as `carvectl check` compares it: name, podCIDRs, InternalIPs.
pub fn node_info(node: &PartialNode) -> crate::check::NodeInfo {
    let view = node_view(node);
    let ips = view.internal_ips.iter().map(|ip| ip.to_string()).collect();
    crate::check::NodeInfo { name: view.name, pod_cidrs: view.pod_cidrs, ips }
}

pub(crate) fn node_view(node: &PartialNode) -> NodeView {
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        pod_cidrs.push(c);
    }
    NodeView {
        name: node.name_any(),
        uid: node.uid().unwrap_or_default(),
        labels: node.labels().clone(),
        pod_cidrs,
        internal_ips: internal_ips(node).filter_map(|a| a.parse().ok()).collect(),
        max_pods: max_pods(node),
    }
}

fn internal_ips(node: &PartialNode) -> impl Iterator<Item = &str> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

/// `status.capacity.pods`: how many pods kubelet runs here (static pools size by it).
pub(crate) fn max_pods(node: &PartialNode) -> Option<u32> {
    node.status.as_ref()?.capacity.as_ref()?.pods.as_ref()?.0.parse().ok()
}

/// A digest of the Node fields carve reads: name, uid, labels, InternalIP
/// addresses, podCIDR(s), capacity.pods and whether it is being deleted. The controller's
/// Node trigger drops updates that change none of them (kubelet's status
/// reports, carve-agent's own condition writes).
pub(crate) fn node_fields(node: &PartialNode) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let view = node_view(node);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&view.name, &view.uid, &view.labels, &view.pod_cidrs, view.max_pods).hash(&mut h);
    internal_ips(node).for_each(|ip| ip.hash(&mut h));
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// The node's InternalIP (the first one; IPv4 sorts before IPv6 in practice).
pub fn internal_ip(node: &PartialNode) -> Option<String> {
    internal_ips(node).next().map(str::to_string)
}

/// UID of the Node that controls this NNC, if any.
pub(crate) fn owner_uid(nnc: &NodeNetworkConfig) -> Option<String> {
    nnc.owner_references().iter().find(|o| o.kind == "Node" && o.controller == Some(true)).map(|o| o.uid.clone())
}

/// The blocks NNC status records: (cidr, allocation ID, quarantined until).
pub fn recorded_blocks(nnc: &NodeNetworkConfig) -> Vec<(String, Option<String>, Option<i64>)> {
    let Some(status) = &nnc.status else { return Vec::new() };
    let granted = status.blocks.iter().map(|b| (b.cidr.clone(), b.allocation_id.clone(), None));
    let quarantined = status.quarantined.iter().map(|q| {
        // An unreadable time ends the quarantine now: the block is still held until then.
        let until = q.until.parse::<Timestamp>().map(|t| t.as_second()).unwrap_or(0);
        (q.cidr.clone(), Some(q.allocation_id.clone()), Some(until))
    });
    granted.chain(quarantined).collect()
}

/// What the node asks for in its NNC spec.
pub(crate) fn request(nnc: Option<&NodeNetworkConfig>) -> Request {
    let Some(spec) = nnc.map(|n| &n.spec) else { return Request::default() };
    let mut ips = std::collections::BTreeMap::new();
    if let Some(r) = &spec.requested_ips {
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            ips.insert(family, r.get(family).max(0) as u64);
        }
    }
    Request { ips, releases: spec.releases.iter().map(|r| (r.cidr.clone(), r.allocation_id.clone())).collect() }
}

/// NNC status blocks. Overlay blocks name their first address as gateway
/// (carve-ipam keeps it for the node); VNet blocks have none: pods route via
/// a link-local next hop and every address but reservedIPs is a pod's.
pub(crate) fn node_blocks(grants: &[Grant], mode: Option<PoolMode>) -> Vec<NodeBlock> {
    grants
        .iter()
        .map(|g| NodeBlock {
            cidr: g.block.to_string(),
            family: IpFamily::of(&g.block),
            gateway: (mode != Some(PoolMode::VNet)).then(|| carve_crds::net::nth(&g.block, 1).to_string()),
            allocation_id: Some(g.id.clone()),
        })
        .collect()
}

pub(crate) fn quarantined_blocks(quarantine: &[Quarantine]) -> Vec<QuarantinedBlock> {
    quarantine
        .iter()
        .map(|q| QuarantinedBlock {
            cidr: q.block.to_string(),
            family: IpFamily::of(&q.block),
            allocation_id: q.id.clone(),
            until: Timestamp::from_second(q.until).map(|t| t.to_string()).unwrap_or_default(),
        })
        .collect()
}

pub(crate) fn addresses(ips: &[IpAddr]) -> Vec<String> {
    ips.iter().map(|ip| ip.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(patch: serde_json::Value) -> PartialNode {
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
    fn a_cached_node_keeps_every_field_carve_reads_from_a_full_node() {
        let full: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-1", "uid": "u1", "labels": {"pool": "a"}},
            "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00::/80"]},
            "status": {
                "addresses": [{"type": "Hostname", "address": "node-1"}, {"type": "InternalIP", "address": "10.224.0.4"}],
                "capacity": {"cpu": "2", "pods": "30"},
                "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 1}],
                "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6", "osImage": "d",
                             "containerRuntimeVersion": "containerd://1.6", "kubeletVersion": "v1.35.4",
                             "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            },
        }))
        .unwrap();
        let cached: PartialNode = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        let view = node_view(&cached);
        assert_eq!((view.name.as_str(), view.uid.as_str()), ("node-1", "u1"));
        assert_eq!(view.labels, full.labels().clone());
        assert_eq!(view.pod_cidrs, ["10.244.0.0/24", "fd00::/80"]);
        assert_eq!(view.internal_ips, ["10.224.0.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(view.max_pods, Some(30));
        assert_eq!(internal_ip(&cached).as_deref(), Some("10.224.0.4"));
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
            serde_json::json!({"status": {"capacity": {"pods": "30"}}}),
        ] {
            assert_ne!(node_fields(&node(patch.clone())), before, "{patch}");
        }
    }
}
