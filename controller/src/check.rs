//! `carvectl check`: what is inconsistent between pools, NodeNetworkConfigs
//! and Nodes, found from plain data (no Kubernetes types, no I/O).
//!
//! ```text
//!   PodCIDR spec.cidrs ─┐
//!   NNC status.blocks ──┼─ findings() ─▶ [Finding]   one per problem, naming the objects and the fix
//!   Node spec.podCIDRs ─┘
//! ```
//!
//! The controller repairs most of these itself when it runs; `check` is for
//! when it did not (stopped, older version, hand edits) or to prove it did.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use carve_crds::net::{self, IpFamily, parse_cidr};
use ipnet::IpNet;
use serde::Serialize;

/// A PodCIDR as the check needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolInfo {
    pub name: String,
    pub cidrs: Vec<String>,
}

/// A NodeNetworkConfig: its name (the node's) and the blocks in its status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NncInfo {
    pub name: String,
    pub blocks: Vec<String>,
    /// `status.reservedIPs`: addresses its pods never get.
    pub reserved: Vec<String>,
}

/// A Node: its name and `spec.podCIDRs` (or `spec.podCIDR`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub pod_cidrs: Vec<String>,
    /// InternalIP addresses.
    pub ips: Vec<String>,
}

/// One inconsistency. `Display` names the objects and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Finding {
    /// The same block in several NNCs: two nodes would give out the same pod
    /// IPs. `keep` is the holder that should keep it when the data says so:
    /// the one whose Node has it as podCIDR, else the only one with a Node.
    DuplicateBlock { block: IpNet, nncs: Vec<String>, keep: Option<String> },
    /// Two different blocks that overlap (one inside the other), in two NNCs.
    OverlappingBlocks { block: IpNet, nnc: String, other_block: IpNet, other_nnc: String },
    /// A recorded block that is not a CIDR (or has host bits set).
    MalformedBlock { nnc: String, block: String, reason: String },
    /// A block in no pool's CIDRs: nothing accounts for it.
    BlockOutsidePools { nnc: String, block: IpNet },
    /// An NNC whose Node does not exist: its blocks stay reserved for nobody.
    NncWithoutNode { nnc: String },
    /// A Node whose podCIDRs are not its NNC's blocks: kube-proxy or Flannel
    /// would route one range while carve serves another.
    PodCidrMismatch { node: String, pod_cidrs: Vec<String>, blocks: Vec<String> },
    /// A Node's own address inside a pod block that does not withhold it:
    /// carve-ipam may give it to a pod.
    NodeAddressInBlock { node: String, ip: String, nnc: String, block: IpNet },
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(",") }
}

/// How to make carve-controller carve `nncs` again: it trusts recorded blocks
/// while it runs, and rebuilds from the API when it starts.
fn recarve(nncs: &[&String]) -> String {
    let names: Vec<String> = nncs.iter().map(|n| format!("nnc/{n}")).collect();
    format!(
        "stop carve-controller, delete {} and start it again (it rebuilds from the API and carves fresh blocks)",
        names.join(" ")
    )
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::DuplicateBlock { block, nncs, keep } => {
                let names: Vec<String> = nncs.iter().map(|n| format!("nnc/{n}")).collect();
                write!(
                    f,
                    "duplicate block: {block} is in {} — two nodes would hand out the same pod IPs; ",
                    names.join(" and ")
                )?;
                match keep {
                    Some(keep) => {
                        let others: Vec<&String> = nncs.iter().filter(|n| *n != keep).collect();
                        write!(f, "nnc/{keep} should keep it; {}", recarve(&others))
                    }
                    None => write!(
                        f,
                        "decide which node keeps it, then stop carve-controller, delete the other NodeNetworkConfigs \
                         and start it again (it rebuilds from the API and carves fresh blocks)"
                    ),
                }
            }
            Finding::OverlappingBlocks { block, nnc, other_block, other_nnc } => write!(
                f,
                "overlapping blocks: {block} of nnc/{nnc} overlaps {other_block} of nnc/{other_nnc}; \
                 decide which node keeps its block, then stop carve-controller, delete the other node's \
                 NodeNetworkConfig and start it again (it rebuilds from the API and carves fresh blocks)"
            ),
            Finding::MalformedBlock { nnc, block, reason } => write!(
                f,
                "malformed block: {block:?} in nnc/{nnc} is not a block ({reason}); \
                 a running carve-controller drops it and writes the node's blocks back, or delete nnc/{nnc} if node/{nnc} is gone"
            ),
            Finding::BlockOutsidePools { nnc, block } => write!(
                f,
                "block outside every pool: {block} of nnc/{nnc} is in no PodCIDR's spec.cidrs; \
                 if pods use that range, add it to a pool's spec.cidrs, else {}",
                recarve(&[nnc])
            ),
            Finding::NncWithoutNode { nnc } => write!(
                f,
                "NodeNetworkConfig without a Node: nnc/{nnc} has no node/{nnc} and keeps its blocks reserved; \
                 if the node is gone for good, delete nnc/{nnc}"
            ),
            Finding::PodCidrMismatch { node, pod_cidrs, blocks } => write!(
                f,
                "podCIDR mismatch: node/{node} has spec.podCIDRs {} but nnc/{node} has blocks {} — \
                 kube-proxy and carve disagree on the node's pod range; spec.podCIDRs cannot change, so: {} \
                 (it adopts podCIDRs that lie free in a pool; otherwise delete and re-register node/{node})",
                list(pod_cidrs),
                list(blocks),
                recarve(&[node])
            ),
            Finding::NodeAddressInBlock { node, ip, nnc, block } => write!(
                f,
                "node address in a pod block: {ip} of node/{node} lies in {block} of nnc/{nnc}, which does not list it \
                 in status.reservedIPs, so a pod may get it; run carve-controller (VNet pools withhold every Node's \
                 address), or move the pool off the node subnet (Overlay)"
            ),
        }
    }
}

/// The one holder of a duplicated block whose Node has it as podCIDR, else
/// the one holder that has a Node at all; `None` when the data cannot tell.
fn keeper(block: &IpNet, holders: &[String], nodes: &BTreeMap<&str, &NodeInfo>) -> Option<String> {
    let only = |pick: &dyn Fn(&NodeInfo) -> bool| {
        let mut chosen = holders.iter().filter(|h| nodes.get(h.as_str()).is_some_and(|n| pick(n)));
        match (chosen.next(), chosen.next()) {
            (Some(h), None) => Some(h.clone()),
            _ => None,
        }
    };
    only(&|n| n.pod_cidrs.iter().any(|c| c.trim().parse::<IpNet>().is_ok_and(|c| c == *block)))
        .or_else(|| only(&|_| true))
}

/// Identical blocks grouped; then overlaps between distinct blocks found by a
/// sweep in address order (sorted, so large clusters stay O(n log n)).
fn block_findings(
    nncs: &[NncInfo],
    nodes: &BTreeMap<&str, &NodeInfo>,
    findings: &mut Vec<Finding>,
) -> Vec<(String, IpNet)> {
    let mut holders: BTreeMap<(IpFamily, u128, u8), (IpNet, Vec<String>)> = BTreeMap::new();
    let mut parsed = Vec::new();
    for nnc in nncs {
        for raw in &nnc.blocks {
            match parse_cidr(raw) {
                Ok(block) => {
                    let key = (IpFamily::of(&block), net::bounds(&block).0, block.prefix_len());
                    let (_, names) = holders.entry(key).or_insert_with(|| (block, Vec::new()));
                    if !names.contains(&nnc.name) {
                        names.push(nnc.name.clone());
                    }
                    parsed.push((nnc.name.clone(), block));
                }
                Err(e) => findings.push(Finding::MalformedBlock {
                    nnc: nnc.name.clone(),
                    block: raw.clone(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    // The block reaching furthest so far, per family, and its first holder.
    let mut cover: Option<(IpFamily, IpNet, String)> = None;
    for ((family, _, _), (block, names)) in &holders {
        if names.len() > 1 {
            let keep = keeper(block, names, nodes);
            findings.push(Finding::DuplicateBlock { block: *block, nncs: names.clone(), keep });
        }
        match &cover {
            Some((f, other, other_nnc)) if f == family && net::bounds(block).0 <= net::bounds(other).1 => {
                if !names.contains(other_nnc) {
                    findings.push(Finding::OverlappingBlocks {
                        block: *block,
                        nnc: names[0].clone(),
                        other_block: *other,
                        other_nnc: other_nnc.clone(),
                    });
                }
                if net::bounds(block).1 > net::bounds(other).1 {
                    cover = Some((*family, *block, names[0].clone()));
                }
            }
            _ => cover = Some((*family, *block, names[0].clone())),
        }
    }
    parsed
}

/// Every inconsistency, blocks first, then NNCs without Nodes, then Nodes.
pub fn findings(pools: &[PoolInfo], nncs: &[NncInfo], nodes: &[NodeInfo]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let nodes_by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let blocks = block_findings(nncs, &nodes_by_name, &mut findings);

    let pool_cidrs: Vec<IpNet> =
        pools.iter().flat_map(|p| &p.cidrs).filter_map(|c| c.trim().parse::<IpNet>().ok()).collect();
    for (nnc, block) in blocks.iter().cloned() {
        if !pool_cidrs.iter().any(|c| c.contains(&block)) {
            findings.push(Finding::BlockOutsidePools { nnc, block });
        }
    }

    for nnc in nncs.iter().filter(|n| !nodes_by_name.contains_key(n.name.as_str())) {
        findings.push(Finding::NncWithoutNode { nnc: nnc.name.clone() });
    }

    let by_name: BTreeMap<&str, &NncInfo> = nncs.iter().map(|n| (n.name.as_str(), n)).collect();
    for node in nodes {
        for ip in node.ips.iter().filter_map(|i| i.parse::<std::net::IpAddr>().ok()) {
            for (nnc, block) in blocks.iter().filter(|(_, b)| b.contains(&ip)) {
                let withheld =
                    by_name.get(nnc.as_str()).is_some_and(|n| n.reserved.iter().any(|r| *r == ip.to_string()));
                if !withheld {
                    findings.push(Finding::NodeAddressInBlock {
                        node: node.name.clone(),
                        ip: ip.to_string(),
                        nnc: nnc.clone(),
                        block: *block,
                    });
                }
            }
        }
    }
    for node in nodes.iter().filter(|n| !n.pod_cidrs.is_empty()) {
        let Some(nnc) = by_name.get(node.name.as_str()) else { continue };
        let as_set = |cidrs: &[String]| -> BTreeSet<Result<IpNet, String>> {
            cidrs.iter().map(|c| c.trim().parse::<IpNet>().map_err(|_| c.clone())).collect()
        };
        if as_set(&node.pod_cidrs) != as_set(&nnc.blocks) {
            findings.push(Finding::PodCidrMismatch {
                node: node.name.clone(),
                pod_cidrs: node.pod_cidrs.clone(),
                blocks: nnc.blocks.clone(),
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, cidrs: &[&str]) -> PoolInfo {
        PoolInfo { name: name.into(), cidrs: cidrs.iter().map(|c| c.to_string()).collect() }
    }

    fn nnc(name: &str, blocks: &[&str]) -> NncInfo {
        NncInfo { name: name.into(), blocks: blocks.iter().map(|c| c.to_string()).collect(), reserved: vec![] }
    }

    fn node(name: &str, pod_cidrs: &[&str]) -> NodeInfo {
        NodeInfo { name: name.into(), pod_cidrs: pod_cidrs.iter().map(|c| c.to_string()).collect(), ips: vec![] }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn consistent_cluster_has_no_findings() {
        let pools = [pool("overlay", &["10.244.0.0/16", "fd00::/64"])];
        let nncs = [nnc("a", &["10.244.0.0/24", "fd00::/80"]), nnc("b", &["10.244.1.0/24"])];
        // b has no podCIDRs: not compared. a's are the same set in another order.
        let nodes = [node("a", &["fd00::/80", "10.244.0.0/24"]), node("b", &[])];
        assert_eq!(findings(&pools, &nncs, &nodes), []);
    }

    #[test]
    fn duplicate_and_overlapping_blocks() {
        let pools = [pool("p", &["10.244.0.0/16"])];
        let nncs = [
            nnc("a", &["10.244.0.0/24"]),
            nnc("b", &["10.244.0.0/24"]),
            nnc("c", &["10.244.0.128/25"]),
            nnc("d", &["10.244.1.0/24"]),
        ];
        let nodes = [node("a", &[]), node("b", &[]), node("c", &[]), node("d", &[])];
        let got = findings(&pools, &nncs, &nodes);
        assert_eq!(
            got,
            [
                Finding::DuplicateBlock { block: net("10.244.0.0/24"), nncs: vec!["a".into(), "b".into()], keep: None },
                Finding::OverlappingBlocks {
                    block: net("10.244.0.128/25"),
                    nnc: "c".into(),
                    other_block: net("10.244.0.0/24"),
                    other_nnc: "a".into()
                },
            ]
        );
        assert!(got[0].to_string().contains("10.244.0.0/24 is in nnc/a and nnc/b"), "{}", got[0]);
        assert!(got[0].to_string().contains("decide which node keeps it"), "{}", got[0]);
    }

    #[test]
    fn duplicate_names_the_holder_to_keep() {
        let pools = [pool("p", &["10.244.0.0/16"])];
        let nncs = [nnc("a", &["10.244.0.0/24"]), nnc("b", &["10.244.0.0/24"]), nnc("c", &["10.244.0.0/24"])];
        // b's Node has the block as podCIDR: b keeps it.
        let with_pod_cidr = findings(&pools, &nncs, &[node("a", &[]), node("b", &["10.244.0.0/24"]), node("c", &[])]);
        let Finding::DuplicateBlock { keep, .. } = &with_pod_cidr[0] else { panic!("{with_pod_cidr:?}") };
        assert_eq!(keep.as_deref(), Some("b"));
        assert!(
            with_pod_cidr[0].to_string().contains("nnc/b should keep it; stop carve-controller, delete nnc/a nnc/c")
        );
        // Only c has a Node (a and b are orphans, reported on their own): c keeps it.
        let orphans = findings(&pools, &nncs, &[node("c", &[])]);
        assert_eq!(
            orphans[0],
            Finding::DuplicateBlock {
                block: net("10.244.0.0/24"),
                nncs: vec!["a".into(), "b".into(), "c".into()],
                keep: Some("c".into())
            }
        );
    }

    #[test]
    fn a_large_block_covering_later_ones_is_caught() {
        // /22 spans .0-.3; the /24 at .3 overlaps it though a /24 at .1 sits between them.
        let nncs = [nnc("big", &["10.244.0.0/22"]), nnc("x", &["10.244.1.0/24"]), nnc("y", &["10.244.3.0/24"])];
        let got =
            findings(&[pool("p", &["10.244.0.0/16"])], &nncs, &[node("big", &[]), node("x", &[]), node("y", &[])]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|f| matches!(f, Finding::OverlappingBlocks { other_nnc, .. } if other_nnc == "big")));
    }

    #[test]
    fn same_address_in_both_families_is_no_overlap() {
        // ::a00:0/120 and 10.0.0.0/24 share the numeric start but not the family.
        let nncs = [nnc("a", &["10.0.0.0/24"]), nnc("b", &["::a00:0/120"])];
        let got = findings(&[pool("p", &["10.0.0.0/16", "::a00:0/112"])], &nncs, &[node("a", &[]), node("b", &[])]);
        assert_eq!(got, []);
    }

    #[test]
    fn orphan_nnc_outside_block_malformed_block_and_podcidr_mismatch() {
        let pools = [pool("p", &["10.244.0.0/16"])];
        let nncs = [
            nnc("gone", &["10.244.5.0/24"]),
            nnc("a", &["10.9.0.0/24", "10.244.1.0/33"]),
            nnc("b", &["10.244.2.0/24"]),
        ];
        let nodes = [node("a", &[]), node("b", &["10.244.7.0/24"])];
        let got = findings(&pools, &nncs, &nodes);
        assert_eq!(
            got,
            [
                Finding::MalformedBlock {
                    nnc: "a".into(),
                    block: "10.244.1.0/33".into(),
                    reason: parse_cidr("10.244.1.0/33").unwrap_err().to_string()
                },
                Finding::BlockOutsidePools { nnc: "a".into(), block: net("10.9.0.0/24") },
                Finding::NncWithoutNode { nnc: "gone".into() },
                Finding::PodCidrMismatch {
                    node: "b".into(),
                    pod_cidrs: vec!["10.244.7.0/24".into()],
                    blocks: vec!["10.244.2.0/24".into()]
                },
            ]
        );
        let text: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert!(text[2].contains("nnc/gone has no node/gone"), "{}", text[2]);
        assert!(text[3].contains("node/b has spec.podCIDRs 10.244.7.0/24 but nnc/b has blocks 10.244.2.0/24"));
    }

    #[test]
    fn a_node_address_in_a_pod_block_is_found_unless_withheld() {
        let pools = [pool("vnet", &["10.224.0.0/24"])];
        let nodes = [NodeInfo { ips: vec!["10.224.0.4".into()], ..node("n1", &[]) }];
        let open = nnc("n1", &["10.224.0.0/28"]);
        let found = findings(&pools, std::slice::from_ref(&open), &nodes);
        assert!(matches!(&found[..], [Finding::NodeAddressInBlock { ip, .. }] if ip == "10.224.0.4"), "{found:?}");
        assert!(found[0].to_string().contains("status.reservedIPs"), "{}", found[0]);
        let withheld = NncInfo { reserved: vec!["10.224.0.4".into()], ..open };
        assert!(findings(&pools, &[withheld], &nodes).is_empty());
    }
}
