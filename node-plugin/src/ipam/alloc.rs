//! Pod address allocation: pure, no I/O.
//!
//! ```text
//!  NodeState.blocks ──NodePool::from_state──▶ NodePool (blocks + reserved addresses)
//!  PodIpStore (allocations on disk) ──load──▶ Allocations ──assign/release/gc──▶ saved back
//! ```
//!
//! An owner (container id + ifname) holds at most one address per family; a
//! repeated ADD returns what it already holds. A new address is the lowest one
//! of the node's blocks, taken in block order (grant order: oldest first, so
//! the newest blocks drain and can be given back), that is neither reserved,
//! taken, nor in a block the node is giving back ([`Allocations::releasing`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use carve_crds::net::{self, azure_reserved};
use carve_crds::{IpFamily, PoolMode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::state::NodeState;

/// Who holds an address: the CNI attachment key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Owner { container_id: container_id.into(), ifname: ifname.into() }
    }
}

/// One block of the node, with the addresses in it that are never handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub net: IpNet,
    /// Overlay: the block's gateway (kept for the node). VNet: none, pods
    /// route through a link-local next hop.
    pub gateway: Option<IpAddr>,
    pub reserved: BTreeSet<IpAddr>,
}

impl Block {
    /// Addresses of the block a pod may get (saturating at `u64::MAX`).
    pub fn usable(&self) -> u64 {
        let size = u64::try_from(net::size(&self.net)).unwrap_or(u64::MAX);
        size.saturating_sub(self.reserved.len() as u64)
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.net)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("node state lists block {cidr:?} that does not parse: {reason}")]
    BadBlock { cidr: String, reason: String },
    #[error("node state lists gateway {gateway:?} for block {cidr} that is not an address inside it")]
    BadGateway { cidr: String, gateway: String },
    #[error("node state lists reserved address {0:?} that is not an IP address")]
    BadReserved(String),
    #[error("node state lists no blocks: this node has no pod addresses yet")]
    NoBlocks,
    #[error("no free {family} address left in the node's blocks ({blocks})")]
    Exhausted { family: IpFamily, blocks: String },
}

/// The node's blocks, ready to allocate from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePool {
    pub blocks: Vec<Block>,
}

impl NodePool {
    /// The pool from the node state, blocks in the state's order.
    ///
    /// Overlay: per block its network address, gateway (the state's, else the
    /// first address after the network) and, for IPv4, broadcast are reserved.
    /// VNet: pods are /32-routed, so those are ordinary addresses; reserved are
    /// the state's `reservedIPs` and, as a second guard should the controller
    /// miss them, Azure's five per pool CIDR. `extra_reserved` (the IPAM
    /// config's `reserved`) on top in both.
    pub fn from_state(state: &NodeState, extra_reserved: &[IpAddr]) -> Result<Self, AllocError> {
        let vnet = state.mode == PoolMode::VNet;
        let mut withheld: Vec<IpAddr> = extra_reserved.to_vec();
        if vnet {
            withheld.extend(
                state.cluster_pod_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()).flat_map(|n| azure_reserved(&n)),
            );
            for r in &state.reserved_ips {
                withheld.push(r.trim().parse().map_err(|_| AllocError::BadReserved(r.clone()))?);
            }
        }
        let mut blocks = Vec::new();
        for b in &state.blocks {
            let net: IpNet = b.cidr.parse().map_err(|e: ipnet::AddrParseError| AllocError::BadBlock {
                cidr: b.cidr.clone(),
                reason: e.to_string(),
            })?;
            if net.trunc() != net {
                return Err(AllocError::BadBlock { cidr: b.cidr.clone(), reason: "host bits set".into() });
            }
            let mut reserved = BTreeSet::new();
            let gateway = if vnet {
                None
            } else {
                let gateway = match &b.gateway {
                    Some(g) => g
                        .parse::<IpAddr>()
                        .ok()
                        .filter(|ip| net.contains(ip))
                        .ok_or_else(|| AllocError::BadGateway { cidr: b.cidr.clone(), gateway: g.clone() })?,
                    None => net::nth(&net, 1),
                };
                reserved.extend([net.network(), gateway]);
                if net.addr().is_ipv4() {
                    reserved.insert(net.broadcast());
                }
                Some(gateway)
            };
            reserved.extend(withheld.iter().filter(|ip| net.contains(*ip)).copied());
            blocks.push(Block { net, gateway, reserved });
        }
        if blocks.is_empty() {
            return Err(AllocError::NoBlocks);
        }
        Ok(NodePool { blocks })
    }

    /// Families the node has blocks for, IPv4 first.
    pub fn families(&self) -> Vec<IpFamily> {
        let set: BTreeSet<IpFamily> = self.blocks.iter().map(Block::family).collect();
        set.into_iter().collect()
    }

    /// The block holding `ip`, if `ip` is one the pool may hand out.
    pub fn block_of(&self, ip: &IpAddr) -> Option<&Block> {
        self.blocks.iter().find(|b| b.net.contains(ip) && !b.reserved.contains(ip))
    }

    fn blocks_of(&self, family: IpFamily) -> impl Iterator<Item = &Block> {
        self.blocks.iter().filter(move |b| b.family() == family)
    }

    /// The lowest address of `family`, block by block in order, that is
    /// neither reserved nor in `taken`, skipping the blocks in `skip`.
    pub fn lowest_free(&self, family: IpFamily, taken: &BTreeSet<IpAddr>, skip: &BTreeSet<IpNet>) -> Option<IpAddr> {
        for b in self.blocks_of(family).filter(|b| !skip.contains(&b.net)) {
            let start = net::to_u128(b.net.network());
            let len = net::size(&b.net);
            // Every address skipped is reserved or taken, so this loop runs at
            // most |reserved| + |taken| + 1 times before it finds one.
            let mut i: u128 = 0;
            while i < len {
                let ip = net::from_u128(family, start + i);
                if !b.reserved.contains(&ip) && !taken.contains(&ip) {
                    return Some(ip);
                }
                i += 1;
            }
        }
        None
    }
}

/// Every address handed out on this network of the node, by address, and the
/// blocks the node is giving back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    pub by_ip: BTreeMap<IpAddr, Owner>,
    /// Blocks carve-agent proved empty and is giving back: never allocated
    /// from, whatever the state file says.
    #[serde(default)]
    pub releasing: BTreeSet<IpNet>,
}

impl Allocations {
    /// Addresses `owner` holds, lowest first.
    pub fn held_by(&self, owner: &Owner) -> Vec<IpAddr> {
        self.by_ip.iter().filter(|(_, o)| *o == owner).map(|(ip, _)| *ip).collect()
    }

    /// How many addresses are handed out inside `block`.
    pub fn count_in(&self, block: &IpNet) -> usize {
        self.by_ip.range(block.network()..=block.broadcast()).count()
    }

    /// One address per family of `pool` for `owner`: those it already holds
    /// (repeated ADD), else the lowest free ones outside releasing blocks.
    /// All or nothing: on exhaustion nothing is recorded.
    pub fn assign(&mut self, pool: &NodePool, owner: &Owner) -> Result<Vec<IpAddr>, AllocError> {
        let held = self.held_by(owner);
        let taken: BTreeSet<IpAddr> = self.by_ip.keys().copied().collect();
        let mut out = Vec::new();
        for family in pool.families() {
            let mine = held.iter().find(|ip| pool.block_of(ip).is_some_and(|b| b.family() == family));
            let ip = match mine {
                Some(ip) => *ip,
                None => pool.lowest_free(family, &taken, &self.releasing).ok_or_else(|| AllocError::Exhausted {
                    family,
                    blocks: pool
                        .blocks_of(family)
                        .map(|b| {
                            let giving_back = if self.releasing.contains(&b.net) { " (being given back)" } else { "" };
                            format!("{}{giving_back}", b.net)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
            };
            out.push(ip);
        }
        for ip in &out {
            self.by_ip.insert(*ip, owner.clone());
        }
        Ok(out)
    }

    /// Frees everything `owner` holds; returns what was freed (empty is fine: DEL is idempotent).
    pub fn release(&mut self, owner: &Owner) -> Vec<IpAddr> {
        let freed = self.held_by(owner);
        for ip in &freed {
            self.by_ip.remove(ip);
        }
        freed
    }

    /// Frees those of `ips` that `owner` still holds (a rollback's release:
    /// an address the same attachment held before the failed ADD stays).
    pub fn release_only(&mut self, owner: &Owner, ips: &[IpAddr]) -> Vec<IpAddr> {
        let freed: Vec<IpAddr> = ips.iter().filter(|ip| self.by_ip.get(ip) == Some(owner)).copied().collect();
        for ip in &freed {
            self.by_ip.remove(ip);
        }
        freed
    }

    /// Frees every address whose owner is not in `valid`; returns what was freed.
    pub fn gc(&mut self, valid: &BTreeSet<Owner>) -> Vec<(IpAddr, Owner)> {
        let stale: Vec<(IpAddr, Owner)> =
            self.by_ip.iter().filter(|(_, o)| !valid.contains(*o)).map(|(ip, o)| (*ip, o.clone())).collect();
        for (ip, _) in &stale {
            self.by_ip.remove(ip);
        }
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carve_crds::NodeBlock;
    use proptest::prelude::*;

    fn state(mode: PoolMode, blocks: &[(&str, Option<&str>)], pools: &[&str]) -> NodeState {
        NodeState {
            node: "n".into(),
            mode,
            blocks: blocks
                .iter()
                .map(|(c, g)| NodeBlock {
                    cidr: c.to_string(),
                    family: IpFamily::of(&c.parse().unwrap()),
                    gateway: g.map(str::to_owned),
                    allocation_id: None,
                })
                .collect(),
            strategy: Default::default(),
            reserved_ips: vec![],
            cluster_pod_cidrs: pools.iter().map(|s| s.to_string()).collect(),
            non_masquerade_cidrs: vec![],
            mtu: 1450,
            node_ip: "192.168.0.1".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let pool =
            NodePool::from_state(&state(PoolMode::Overlay, &[("10.0.0.0/30", Some("10.0.0.1"))], &[]), &[]).unwrap();
        let mut a = Allocations::default();
        assert_eq!(a.assign(&pool, &Owner::new("c1", "eth0")).unwrap(), vec![ip("10.0.0.2")]);
        let err = a.assign(&pool, &Owner::new("c2", "eth0")).unwrap_err();
        assert!(matches!(err, AllocError::Exhausted { family: IpFamily::IPv4, .. }), "{err}");
        assert_eq!(a.by_ip.len(), 1);
    }

    #[test]
    fn gateway_defaults_to_first_address_and_extra_reserved_is_skipped() {
        let pool =
            NodePool::from_state(&state(PoolMode::Overlay, &[("10.0.0.0/24", None)], &[]), &[ip("10.0.0.2")]).unwrap();
        assert_eq!(pool.blocks[0].gateway, Some(ip("10.0.0.1")));
        let mut a = Allocations::default();
        assert_eq!(a.assign(&pool, &Owner::new("c1", "eth0")).unwrap(), vec![ip("10.0.0.3")]);
    }

    #[test]
    fn vnet_mode_skips_azure_reserved_of_the_pool() {
        let st = state(PoolMode::VNet, &[("10.1.0.0/28", Some("10.1.0.1"))], &["10.1.0.0/24"]);
        let pool = NodePool::from_state(&st, &[]).unwrap();
        let mut a = Allocations::default();
        // .0 network, .1 gateway, .2 and .3 Azure DNS.
        assert_eq!(a.assign(&pool, &Owner::new("c1", "eth0")).unwrap(), vec![ip("10.1.0.4")]);
    }

    #[test]
    fn vnet_network_gateway_and_broadcast_are_pod_addresses_and_reserved_ips_are_not() {
        // A block in the middle of the pool: no Azure address in it.
        let mut st = state(PoolMode::VNet, &[("10.1.0.16/30", Some("10.1.0.17"))], &["10.1.0.0/24"]);
        st.reserved_ips = vec!["10.1.0.17".into(), "10.1.0.99".into()];
        let pool = NodePool::from_state(&st, &[]).unwrap();
        assert_eq!(pool.blocks[0].gateway, None, "VNet pods route through a link-local next hop");
        assert_eq!(pool.blocks[0].usable(), 3);
        let mut a = Allocations::default();
        let got: Vec<IpAddr> =
            ["a", "b", "c"].iter().map(|c| a.assign(&pool, &Owner::new(*c, "eth0")).unwrap()[0]).collect();
        assert_eq!(got, [ip("10.1.0.16"), ip("10.1.0.18"), ip("10.1.0.19")], "network and broadcast included");
        assert!(matches!(a.assign(&pool, &Owner::new("d", "eth0")), Err(AllocError::Exhausted { .. })));
        st.reserved_ips = vec!["not-an-ip".into()];
        assert_eq!(NodePool::from_state(&st, &[]), Err(AllocError::BadReserved("not-an-ip".into())));
    }

    #[test]
    fn a_vnet_slash_24_yields_251_less_the_node_ips() {
        let blocks: Vec<String> = (0..16).map(|i| format!("10.224.0.{}/28", i * 16)).collect();
        let refs: Vec<(&str, Option<&str>)> = blocks.iter().map(|b| (b.as_str(), None)).collect();
        let mut st = state(PoolMode::VNet, &refs, &["10.224.0.0/24"]);
        // Three nodes on the subnet; the controller lists their IPs and Azure's five.
        st.reserved_ips =
            ["10.224.0.4", "10.224.0.5", "10.224.0.6", "10.224.0.0", "10.224.0.255"].map(String::from).to_vec();
        let pool = NodePool::from_state(&st, &[]).unwrap();
        assert_eq!(pool.blocks.iter().map(Block::usable).sum::<u64>(), 251 - 3);
    }

    #[test]
    fn blocks_are_filled_in_state_order_and_releasing_ones_never() {
        // Grant order, not address order: the later, lower block is used last.
        let st = state(PoolMode::VNet, &[("10.1.0.32/30", None), ("10.1.0.0/30", None), ("10.1.0.16/30", None)], &[]);
        let pool = NodePool::from_state(&st, &[]).unwrap();
        let mut a = Allocations { releasing: ["10.1.0.0/30".parse().unwrap()].into(), ..Default::default() };
        let got: Vec<IpAddr> =
            (0..8).map(|i| a.assign(&pool, &Owner::new(format!("c{i}"), "eth0")).unwrap()[0]).collect();
        assert_eq!(got[..4], [ip("10.1.0.32"), ip("10.1.0.33"), ip("10.1.0.34"), ip("10.1.0.35")]);
        assert_eq!(got[4..], [ip("10.1.0.16"), ip("10.1.0.17"), ip("10.1.0.18"), ip("10.1.0.19")]);
        let err = a.assign(&pool, &Owner::new("full", "eth0")).unwrap_err();
        assert!(err.to_string().contains("10.1.0.0/30 (being given back)"), "{err}");
        assert_eq!(a.count_in(&"10.1.0.0/30".parse().unwrap()), 0);
        assert_eq!(a.count_in(&"10.1.0.16/28".parse().unwrap()), 4);
    }

    #[test]
    fn repeated_add_returns_the_same_ip_and_release_frees_it() {
        let pool =
            NodePool::from_state(&state(PoolMode::Overlay, &[("10.0.0.0/24", Some("10.0.0.1"))], &[]), &[]).unwrap();
        let mut a = Allocations::default();
        let o1 = Owner::new("c1", "eth0");
        let first = a.assign(&pool, &o1).unwrap();
        assert_eq!(a.assign(&pool, &o1).unwrap(), first);
        assert_eq!(a.assign(&pool, &Owner::new("c1", "net1")).unwrap(), vec![ip("10.0.0.3")]);
        assert_eq!(a.release(&o1), first);
        assert!(a.release(&o1).is_empty());
        assert_eq!(a.assign(&pool, &Owner::new("c2", "eth0")).unwrap(), first, "the freed address is reused");
    }

    #[test]
    fn a_rollback_frees_only_the_addresses_it_names_and_only_from_their_owner() {
        let st = state(PoolMode::Overlay, &[("10.0.0.0/24", Some("10.0.0.1")), ("fd00::/120", Some("fd00::1"))], &[]);
        let pool = NodePool::from_state(&st, &[]).unwrap();
        let mut a = Allocations::default();
        let pod = Owner::new("c1", "eth0");
        let v4 = a.assign(&pool, &pod).unwrap()[0];
        a.by_ip.retain(|ip, _| ip.is_ipv4());
        // A later ADD of the same attachment added only the IPv6 address; its rollback keeps the IPv4 one.
        let again = a.assign(&pool, &pod).unwrap();
        let v6 = again[1];
        assert_eq!(a.release_only(&pod, &[v6]), [v6]);
        assert_eq!(a.held_by(&pod), [v4]);
        // An address that moved to another attachment meanwhile is not this rollback's.
        a.by_ip.insert(v6, Owner::new("c2", "eth0"));
        assert!(a.release_only(&pod, &[v6]).is_empty());
        assert_eq!(a.by_ip.len(), 2);
    }

    #[test]
    fn dual_stack_gives_one_per_family_and_v6_has_no_broadcast() {
        let st = state(PoolMode::Overlay, &[("10.0.0.0/24", Some("10.0.0.1")), ("fd00::/126", Some("fd00::1"))], &[]);
        let pool = NodePool::from_state(&st, &[]).unwrap();
        let mut a = Allocations::default();
        assert_eq!(a.assign(&pool, &Owner::new("c", "eth0")).unwrap(), vec![ip("10.0.0.2"), ip("fd00::2")]);
        assert_eq!(a.assign(&pool, &Owner::new("d", "eth0")).unwrap(), vec![ip("10.0.0.3"), ip("fd00::3")]);
    }

    #[test]
    fn second_block_used_when_first_is_full() {
        let st =
            state(PoolMode::Overlay, &[("10.1.0.0/30", Some("10.1.0.1")), ("10.1.0.16/30", Some("10.1.0.17"))], &[]);
        let pool = NodePool::from_state(&st, &[]).unwrap();
        let mut a = Allocations::default();
        assert_eq!(a.assign(&pool, &Owner::new("a", "eth0")).unwrap(), vec![ip("10.1.0.2")]);
        assert_eq!(a.assign(&pool, &Owner::new("b", "eth0")).unwrap(), vec![ip("10.1.0.18")]);
    }

    #[test]
    fn gc_frees_only_unlisted_owners() {
        let pool = NodePool::from_state(&state(PoolMode::Overlay, &[("10.0.0.0/24", None)], &[]), &[]).unwrap();
        let mut a = Allocations::default();
        a.assign(&pool, &Owner::new("keep", "eth0")).unwrap();
        let leaked = a.assign(&pool, &Owner::new("leak", "eth0")).unwrap();
        let freed = a.gc(&[Owner::new("keep", "eth0")].into_iter().collect());
        assert_eq!(freed, vec![(leaked[0], Owner::new("leak", "eth0"))]);
        assert_eq!(a.by_ip.len(), 1);
    }

    #[test]
    fn bad_state_is_refused() {
        assert_eq!(NodePool::from_state(&state(PoolMode::Overlay, &[], &[]), &[]), Err(AllocError::NoBlocks));
        assert!(matches!(
            NodePool::from_state(&state(PoolMode::Overlay, &[("10.0.0.0/24", Some("10.9.0.1"))], &[]), &[]),
            Err(AllocError::BadGateway { .. })
        ));
    }

    proptest! {
        /// Any sequence of ADDs and DELs: no address twice, never a reserved
        /// one, every address inside a block, repeated ADD stable, and each
        /// new address is the lowest free one; never one in a releasing block.
        #[test]
        fn never_duplicates_never_reserved(
            ops in proptest::collection::vec((0u8..40, any::<bool>()), 1..200),
            giving_back in proptest::option::of(0usize..3),
        ) {
            let mut st = state(PoolMode::VNet, &[("10.1.0.0/28", None), ("10.1.0.32/29", None), ("10.1.0.64/29", None)], &["10.1.0.0/24"]);
            st.reserved_ips = vec!["10.1.0.33".into()];
            let pool = NodePool::from_state(&st, &[]).unwrap();
            let mut a = Allocations::default();
            a.releasing.extend(giving_back.map(|i| pool.blocks[i].net));
            for (who, add) in ops {
                let owner = Owner::new(format!("c{who}"), "eth0");
                if add {
                    let before = a.clone();
                    let taken: BTreeSet<IpAddr> = before.by_ip.keys().copied().collect();
                    match a.assign(&pool, &owner) {
                        Ok(ips) => {
                            prop_assert_eq!(ips.len(), 1);
                            let held = before.held_by(&owner);
                            if held.is_empty() {
                                prop_assert_eq!(Some(ips[0]), pool.lowest_free(IpFamily::IPv4, &taken, &a.releasing));
                            } else {
                                prop_assert_eq!(&held, &ips);
                            }
                        }
                        Err(AllocError::Exhausted { .. }) => {
                            prop_assert_eq!(&a, &before);
                            prop_assert!(pool.lowest_free(IpFamily::IPv4, &taken, &a.releasing).is_none());
                        }
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                } else {
                    a.release(&owner);
                    prop_assert!(a.held_by(&owner).is_empty());
                }
                for ip in a.by_ip.keys() {
                    let block = pool.block_of(ip);
                    prop_assert!(block.is_some(), "{} outside the blocks or reserved", ip);
                    prop_assert!(!a.releasing.iter().any(|r| r.contains(ip)), "{} in a block being given back", ip);
                }
                let owners: BTreeSet<&Owner> = a.by_ip.values().collect();
                prop_assert_eq!(owners.len(), a.by_ip.len(), "an owner holds two IPv4 addresses");
            }
        }
    }
}
