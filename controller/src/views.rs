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
    match block {
        IpNet::V4(n) => std::net::Ipv4Addr::from(u32::from(n.network()) + 1).to_string(),
        IpNet::V6(n) => std::net::Ipv6Addr::from(u128::from(n.network()) + 1).to_string(),
    }
}

pub fn node_blocks(blocks: &[IpNet]) -> Vec<NodeBlock> {
    blocks
        .iter()
        .map(|b| NodeBlock { cidr: b.to_string(), family: IpFamily::of(b), gateway: Some(gateway(b)) })
        .collect()
}
