//! Capacity planning for a pool before it exists: `carvectl plan`. No cluster,
//! no I/O — numbers from the mode, the CIDRs and the node count.
//!
//! ```text
//!   PlanInput ──plan()──▶ Plan
//!     per family: Azure's formula (VNet), carve's block view (both modes),
//!                 what the CIDRs hold, the smallest CIDR that would do
//!     warnings:   forbidden ranges, overlapping CIDRs, overlap with Services
//! ```
//!
//! Two views, because they answer different questions. Azure's formulas say
//! what AKS would need: Overlay takes one block per node (nodes + surge
//! blocks), flat VNet takes `(nodes + surge) × (maxPods + 1)` addresses plus 5
//! reserved per subnet. carve's view counts what carve really hands out: whole
//! blocks (the allocator's own capacity) and per block the addresses
//! carve-ipam may give pods. Overlay: all but the network address, the gateway
//! and (IPv4) broadcast. VNet: pods are /32-routed, so every address of a
//! block is a pod's but Azure's five per subnet and the Nodes' own addresses,
//! which the controller withholds address by address (as Azure's "+1" per
//! node does); a node in a static or dynamic pool holds as many blocks as its
//! pods need.

use carve_crds::PoolMode;
use carve_crds::net::{IpFamily, NetError, check_block_size, forbidden_overlap, overlaps};
use ipnet::IpNet;
use serde::Serialize;

use crate::allocator::{MAX_BLOCKS_PER_CIDR, PoolBlocks, PoolLayout};

/// AKS's ceiling on pods per node, in every mode; a /24 overlay block holds 250 pods.
pub const MAX_PODS_PER_NODE: u32 = 250;
/// AKS's default max surge during upgrades: one extra node.
pub const DEFAULT_SURGE: u64 = 1;
/// Addresses Azure reserves in every subnet: network, gateway, two DNS, broadcast.
pub const AZURE_RESERVED_PER_SUBNET: u64 = 5;

/// Default pods per node: AKS Overlay's maximum, or Azure CNI (flat)'s default.
pub fn default_max_pods(mode: PoolMode) -> u32 {
    match mode {
        PoolMode::Overlay => 250,
        PoolMode::VNet => 30,
    }
}

/// What `carvectl plan` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    pub mode: PoolMode,
    pub cidrs: Vec<IpNet>,
    /// Block prefix per family; `None` takes the mode's default.
    pub block_v4: Option<u8>,
    pub block_v6: Option<u8>,
    pub nodes: u64,
    pub surge: u64,
    pub max_pods: u32,
    pub service_cidr: Option<IpNet>,
}

/// Input the plan cannot work with; the message names the flag and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--cidr is missing: give the pool's CIDR, e.g. --cidr 10.244.0.0/16")]
    NoCidr,
    #[error("{flag} {block}: {source}")]
    BlockSize { flag: &'static str, block: u8, source: NetError },
    #[error("{flag} {block} is given but no {family} --cidr is; add an {family} --cidr or drop {flag}")]
    NoCidrForBlockSize { flag: &'static str, block: u8, family: IpFamily },
}

/// The plan: per family and overall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub mode: PoolMode,
    pub nodes: u64,
    pub surge: u64,
    pub max_pods: u32,
    pub service_cidr: Option<IpNet>,
    /// Every family fits.
    pub fits: bool,
    /// What the smallest family holds (each node needs a block of every family).
    pub capacity: Capacity,
    pub families: Vec<FamilyPlan>,
    /// Worth knowing, not fatal: forbidden ranges, overlaps, carve limits.
    pub warnings: Vec<String>,
}

/// Nodes (beyond the surge) and pods the CIDRs hold at `maxPods` per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub nodes: u64,
    pub pods: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub cidrs: Vec<IpNet>,
    pub block_size: u8,
    /// Addresses of one block carve-ipam hands to pods.
    pub pod_addresses_per_block: u64,
    /// Pods a node can run: Overlay one block (at most 250), VNet `maxPods`.
    pub pods_per_node: u64,
    pub blocks_per_node: u64,
    pub blocks_needed: u64,
    /// Blocks carve can hand out from the CIDRs (the allocator's capacity).
    pub blocks_available: u64,
    /// Azure's flat formula (VNet only).
    pub azure_flat: Option<AzureFlat>,
    pub capacity: Capacity,
    /// Prefix length of the smallest single CIDR that fits the plan; `None`
    /// when no CIDR of this family can (carve uses at most 2^22 blocks of one).
    pub smallest_prefix: Option<u8>,
    pub fits: bool,
    /// Why it does not fit; empty when it does.
    pub shortfalls: Vec<String>,
}

/// `(nodes + surge) × (maxPods + 1)` addresses plus 5 reserved per subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AzureFlat {
    /// `(nodes + surge) × (maxPods + 1)`, before the reserved ones.
    pub addresses_needed: u64,
    pub reserved_per_subnet: u64,
    /// The CIDRs' addresses less 5 reserved in each.
    pub addresses_available: u64,
    /// Smallest single subnet holding `addressesNeeded + 5`.
    pub smallest_prefix: Option<u8>,
}

/// 2^bits, saturating at u64::MAX.
fn pow2(bits: u32) -> u64 {
    1u64.checked_shl(bits).unwrap_or(u64::MAX)
}

/// Addresses in `net`, saturating at u64::MAX.
fn addresses(net: &IpNet) -> u64 {
    pow2(u32::from(net.max_prefix_len() - net.prefix_len()))
}

/// Bits needed to count `n` things: ceil(log2(n)), 0 for n <= 1.
fn ceil_log2(n: u64) -> u32 {
    if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() }
}

/// Pod addresses of a block as carve-ipam counts them (node-plugin's
/// `NodePool::from_state`). Overlay: network and gateway reserved, and the
/// broadcast in IPv4. VNet: every address (the subnet's reserved ones and the
/// Nodes' are withheld per pool, not per block).
pub fn pod_addresses_per_block(mode: PoolMode, family: IpFamily, block: u8) -> u64 {
    let size = pow2(u32::from(family.bits() - block));
    let reserved = match (mode, family) {
        (PoolMode::VNet, _) => 0,
        (PoolMode::Overlay, IpFamily::IPv4) => 3,
        (PoolMode::Overlay, IpFamily::IPv6) => 2,
    };
    size.saturating_sub(reserved)
}

/// Longest block prefix whose pod addresses reach `pods`: the block size to
/// suggest when a node's pods do not fit one block.
pub fn block_for_pods(mode: PoolMode, family: IpFamily, pods: u64) -> u8 {
    (1..=family.max_block_prefix()).rev().find(|&b| pod_addresses_per_block(mode, family, b) >= pods).unwrap_or(1)
}

/// The `carvectl plan` flag that sets `family`'s block size.
pub fn block_flag(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => "--block-size",
        IpFamily::IPv6 => "--block-size-v6",
    }
}

/// Blocks carve's allocator would hand out from `cidrs` (all of one family).
fn carve_capacity(cidrs: &[IpNet], block: u8) -> u64 {
    let family = IpFamily::of(&cidrs[0]);
    let layout =
        PoolLayout { cidrs: cidrs.to_vec(), block_prefix_v4: block, block_prefix_v6: block, exclusions: Vec::new() };
    PoolBlocks::new(layout).usage(family).capacity
}

/// Smallest single CIDR (as a prefix length) from which carve carves `blocks` blocks.
fn smallest_carve_prefix(like: &IpNet, block: u8, blocks: u64) -> Option<u8> {
    (0..=block).rev().find(|&p| {
        let candidate = IpNet::new(like.network(), p).expect("prefix within the family").trunc();
        carve_capacity(&[candidate], block) >= blocks
    })
}

fn plan_family(input: &PlanInput, family: IpFamily, cidrs: Vec<IpNet>, block: u8) -> FamilyPlan {
    let hosts = input.nodes + input.surge;
    let max_pods = u64::from(input.max_pods);
    let per_block = pod_addresses_per_block(input.mode, family, block);
    let blocks_available = carve_capacity(&cidrs, block);
    let mut shortfalls = Vec::new();

    let (pods_per_node, blocks_per_node) = match input.mode {
        // One block per node: its addresses bound the pods, and AKS stops at 250.
        PoolMode::Overlay => (per_block.min(u64::from(MAX_PODS_PER_NODE)), 1),
        PoolMode::VNet => (max_pods, max_pods.div_ceil(per_block)),
    };
    if pods_per_node < max_pods {
        shortfalls.push(format!(
            "a /{block} block holds {pods_per_node} pods, fewer than --max-pods {max_pods}; use {} {} or shorter",
            block_flag(family),
            block_for_pods(input.mode, family, max_pods)
        ));
    }
    let blocks_needed = hosts.saturating_mul(blocks_per_node);
    if blocks_needed > blocks_available {
        shortfalls.push(format!("{blocks_needed} blocks needed, the CIDRs hold {blocks_available}"));
    }
    let mut max_nodes = (blocks_available / blocks_per_node).saturating_sub(input.surge);
    let mut smallest_prefix = smallest_carve_prefix(&cidrs[0], block, blocks_needed);

    let azure_flat = (input.mode == PoolMode::VNet).then(|| {
        let per_node = max_pods + 1;
        let needed = hosts.saturating_mul(per_node);
        let available: u64 =
            cidrs.iter().map(|c| addresses(c).saturating_sub(AZURE_RESERVED_PER_SUBNET)).fold(0, u64::saturating_add);
        if needed > available {
            shortfalls.push(format!(
                "Azure's flat formula needs {needed} addresses + {AZURE_RESERVED_PER_SUBNET} reserved per subnet, the CIDRs hold {available}"
            ));
        }
        max_nodes = max_nodes.min((available / per_node).saturating_sub(input.surge));
        let bits = ceil_log2(needed.saturating_add(AZURE_RESERVED_PER_SUBNET));
        let azure_prefix = u8::try_from(bits).ok().and_then(|b| family.bits().checked_sub(b));
        // The CIDR must satisfy both views: the shorter prefix wins.
        smallest_prefix = smallest_prefix.zip(azure_prefix).map(|(a, b)| a.min(b));
        AzureFlat {
            addresses_needed: needed,
            reserved_per_subnet: AZURE_RESERVED_PER_SUBNET,
            addresses_available: available,
            smallest_prefix: azure_prefix,
        }
    });

    if blocks_needed > blocks_available
        || azure_flat.as_ref().is_some_and(|a| a.addresses_needed > a.addresses_available)
    {
        shortfalls.push(match smallest_prefix {
            Some(p) => format!("a /{p} CIDR or larger fits"),
            None => "no single CIDR fits; add more --cidr".to_string(),
        });
    }
    FamilyPlan {
        family,
        cidrs,
        block_size: block,
        pod_addresses_per_block: per_block,
        pods_per_node,
        blocks_per_node,
        blocks_needed,
        blocks_available,
        azure_flat,
        capacity: Capacity { nodes: max_nodes, pods: max_nodes.saturating_mul(pods_per_node.min(max_pods)) },
        smallest_prefix,
        fits: shortfalls.is_empty(),
        shortfalls,
    }
}

/// Forbidden ranges, overlaps and carve limits: reported, never fatal.
fn warnings(input: &PlanInput, families: &[FamilyPlan]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, cidr) in input.cidrs.iter().enumerate() {
        if let Some(range) = forbidden_overlap(cidr) {
            let e = NetError::Forbidden { cidr: *cidr, range };
            warnings.push(format!("--cidr {e} (PodCIDR admission rejects it)"));
        }
        for other in &input.cidrs[..i] {
            if overlaps(other, cidr) {
                warnings.push(format!("--cidr {}", NetError::Overlap { a: *other, b: *cidr }));
            }
        }
        if let Some(service) = input.service_cidr.filter(|s| overlaps(s, cidr)) {
            warnings.push(format!(
                "--cidr {cidr} overlaps --service-cidr {service}: pods and Services would share addresses; pick disjoint ranges"
            ));
        }
        let block = families.iter().find(|f| f.family == IpFamily::of(cidr)).map_or(0, |f| f.block_size);
        if u32::from(block - cidr.prefix_len()) > MAX_BLOCKS_PER_CIDR.trailing_zeros() {
            warnings.push(format!("--cidr {cidr}: carve uses only its first {MAX_BLOCKS_PER_CIDR} /{block} blocks"));
        }
    }
    if let Some(service) = input.service_cidr
        && let Some(range) = forbidden_overlap(&service)
    {
        warnings.push(format!("--service-cidr {}", NetError::Forbidden { cidr: service, range }));
    }
    warnings
}

/// Plans `input`: whether it fits, what the CIDRs hold, the smallest CIDR per family.
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    if input.cidrs.is_empty() {
        return Err(PlanError::NoCidr);
    }
    let mut families = Vec::new();
    for (family, given) in [(IpFamily::IPv4, input.block_v4), (IpFamily::IPv6, input.block_v6)] {
        let flag = block_flag(family);
        let cidrs: Vec<IpNet> = input.cidrs.iter().filter(|c| IpFamily::of(c) == family).copied().collect();
        if cidrs.is_empty() {
            if let Some(block) = given {
                return Err(PlanError::NoCidrForBlockSize { flag, block, family });
            }
            continue;
        }
        let block = given.unwrap_or_else(|| input.mode.default_block_size(family));
        for cidr in &cidrs {
            check_block_size(cidr, block).map_err(|source| PlanError::BlockSize { flag, block, source })?;
        }
        families.push(plan_family(input, family, cidrs, block));
    }
    let capacity = Capacity {
        nodes: families.iter().map(|f| f.capacity.nodes).min().unwrap_or(0),
        pods: families.iter().map(|f| f.capacity.pods).min().unwrap_or(0),
    };
    Ok(Plan {
        mode: input.mode,
        nodes: input.nodes,
        surge: input.surge,
        max_pods: input.max_pods,
        service_cidr: input.service_cidr,
        fits: families.iter().all(|f| f.fits),
        capacity,
        warnings: warnings(input, &families),
        families,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn input(mode: PoolMode, cidrs: &[&str], nodes: u64) -> PlanInput {
        PlanInput {
            mode,
            cidrs: cidrs.iter().map(|c| net(c)).collect(),
            block_v4: None,
            block_v6: None,
            nodes,
            surge: DEFAULT_SURGE,
            max_pods: default_max_pods(mode),
            service_cidr: None,
        }
    }

    #[test]
    fn overlay_slash16_with_slash24_blocks_holds_256_nodes() {
        // 2^(24-16) = 256 blocks, one per node; one is kept for the surge node.
        let p = plan(&input(PoolMode::Overlay, &["10.244.0.0/16"], 50)).unwrap();
        let f = &p.families[0];
        assert_eq!((f.block_size, f.blocks_available, f.blocks_needed), (24, 256, 51));
        // A /24 has 256 - 3 (network, gateway, broadcast) = 253 pod addresses; AKS caps at 250.
        assert_eq!((f.pod_addresses_per_block, f.pods_per_node), (253, 250));
        assert_eq!(p.capacity, Capacity { nodes: 255, pods: 255 * 250 });
        // 51 blocks need 6 bits: /24 - 6 = /18 (64 blocks).
        assert_eq!(f.smallest_prefix, Some(18));
        assert!(p.fits && f.azure_flat.is_none() && p.warnings.is_empty(), "{p:?}");
    }

    #[test]
    fn overlay_does_not_fit_when_nodes_exceed_blocks() {
        // 256 nodes + 1 surge = 257 blocks > 256.
        let p = plan(&input(PoolMode::Overlay, &["10.244.0.0/16"], 256)).unwrap();
        assert!(!p.fits);
        assert_eq!(p.families[0].shortfalls, ["257 blocks needed, the CIDRs hold 256", "a /15 CIDR or larger fits"]);
        // 257 blocks need 9 bits: /24 - 9 = /15.
        assert_eq!(p.families[0].smallest_prefix, Some(15));
    }

    #[test]
    fn overlay_block_too_small_for_max_pods() {
        // A /25 holds 128 - 3 = 125 pods < 250; a /24 (253) is the longest that holds 250.
        let p = plan(&PlanInput { block_v4: Some(25), ..input(PoolMode::Overlay, &["10.244.0.0/16"], 10) }).unwrap();
        assert!(!p.fits);
        assert_eq!(p.families[0].pods_per_node, 125);
        assert_eq!(
            p.families[0].shortfalls,
            ["a /25 block holds 125 pods, fewer than --max-pods 250; use --block-size 24 or shorter"]
        );
        // 2^(25-16) = 512 blocks - 1 surge = 511 nodes of 125 pods.
        assert_eq!(p.capacity, Capacity { nodes: 511, pods: 511 * 125 });
    }

    #[test]
    fn aks_flat_example_50_nodes_30_pods() {
        // Azure docs: 50 nodes, surge 1, 30 pods: (51) + (51 × 30) = 1581 addresses + 5 reserved = 1586,
        // which needs 11 bits (2048): a /21.
        let p = plan(&input(PoolMode::VNet, &["10.224.0.0/21"], 50)).unwrap();
        let f = &p.families[0];
        let azure = f.azure_flat.as_ref().unwrap();
        assert_eq!(azure.addresses_needed, 1581);
        assert_eq!(azure.addresses_available, 2048 - 5);
        assert_eq!(azure.smallest_prefix, Some(21));
        // carve: pods are /32-routed in VNet, so a /28 holds 16 pod addresses (the subnet's reserved ones
        // and the node IPs are withheld per pool, as Azure's "+1" per node); 30 pods take ceil(30/16) = 2
        // blocks per node (Azure's static block: maxPods/16), 51 × 2 = 102 of the /21's 128 blocks.
        assert_eq!((f.pod_addresses_per_block, f.blocks_per_node, f.blocks_needed), (16, 2, 102));
        assert_eq!(f.blocks_available, 128);
        assert_eq!(f.smallest_prefix, Some(21));
        assert!(f.shortfalls.is_empty(), "{:?}", f.shortfalls);
        assert!(p.fits);
        // 128 / 2 = 64 nodes - 1 surge = 63; Azure alone: 2043 / 31 = 65 - 1 = 64; the smaller wins.
        assert_eq!(p.capacity, Capacity { nodes: 63, pods: 63 * 30 });
        assert!(p.warnings.is_empty(), "a node holds several blocks: {:?}", p.warnings);
    }

    #[test]
    fn vnet_with_room_fits() {
        // /16: 2^16 - 5 = 65531 addresses, 65531 / 31 = 2113 nodes (Azure); 4096 /28 blocks, 2 per node:
        // 2048 nodes (carve); less 1 surge = 2047.
        let p = plan(&input(PoolMode::VNet, &["10.224.0.0/16"], 50)).unwrap();
        assert!(p.fits);
        assert_eq!(p.capacity, Capacity { nodes: 2047, pods: 2047 * 30 });
        assert_eq!(p.families[0].smallest_prefix, Some(21));
    }

    #[test]
    fn dual_stack_is_bounded_by_the_smaller_family() {
        // IPv4 /20 of /24 blocks: 16 blocks -> 15 nodes. IPv6 /64 of /80: 65536 blocks.
        let p = plan(&input(PoolMode::Overlay, &["10.244.0.0/20", "fd12:3456:789a::/64"], 10)).unwrap();
        assert_eq!(p.families.len(), 2);
        assert_eq!(p.families[1].blocks_available, 65536);
        assert_eq!(p.capacity.nodes, 15);
        assert!(p.fits);
    }

    #[test]
    fn warnings_for_forbidden_overlapping_and_service_ranges() {
        let p = plan(&PlanInput {
            service_cidr: Some(net("10.0.0.0/16")),
            ..input(PoolMode::Overlay, &["10.0.0.0/8", "10.244.0.0/16", "172.16.0.0/12"], 3)
        })
        .unwrap();
        let all = p.warnings.join("\n");
        assert!(all.contains("172.16.0.0/12 overlaps 172.30.0.0/16"), "{all}");
        assert!(all.contains("10.0.0.0/8 overlaps 10.244.0.0/16"), "{all}");
        assert!(all.contains("--cidr 10.0.0.0/8 overlaps --service-cidr 10.0.0.0/16"), "{all}");
        assert_eq!(p.warnings.len(), 3, "{all}");
    }

    #[test]
    fn bad_block_sizes_name_the_flag() {
        let e = plan(&PlanInput { block_v4: Some(12), ..input(PoolMode::Overlay, &["10.244.0.0/16"], 3) }).unwrap_err();
        assert!(e.to_string().starts_with("--block-size 12: "), "{e}");
        assert!(e.to_string().contains("use /16 or longer"), "{e}");
        let e = plan(&PlanInput { block_v6: Some(80), ..input(PoolMode::Overlay, &["10.244.0.0/16"], 3) }).unwrap_err();
        assert_eq!(e, PlanError::NoCidrForBlockSize { flag: "--block-size-v6", block: 80, family: IpFamily::IPv6 });
    }

    #[test]
    fn block_for_pods_picks_the_longest_block_that_holds_them() {
        // /27: 32 - 3 = 29 < 30; /26: 64 - 3 = 61.
        assert_eq!(block_for_pods(PoolMode::Overlay, IpFamily::IPv4, 30), 26);
        assert_eq!(block_for_pods(PoolMode::Overlay, IpFamily::IPv4, 250), 24);
        assert_eq!(block_for_pods(PoolMode::VNet, IpFamily::IPv4, 16), 28);
        // IPv6 /123: 32 - 2 = 30.
        assert_eq!(block_for_pods(PoolMode::Overlay, IpFamily::IPv6, 30), 123);
    }

    #[test]
    fn huge_ipv6_cidr_is_capped_like_the_allocator() {
        // /48 of /80 would be 2^32 blocks; carve uses 2^22 of them.
        let p = plan(&input(PoolMode::Overlay, &["fd00::/48"], 3)).unwrap();
        assert_eq!(p.families[0].blocks_available, MAX_BLOCKS_PER_CIDR);
        assert!(p.warnings[0].contains("only its first 4194304 /80 blocks"), "{:?}", p.warnings);
    }
}
