//! The desired dataplane: a pure function from this node's [`NodeState`] and its
//! peers to the links, routes, neighbours, FDB entries and SNAT rules the node
//! should have, plus the diff against what the kernel reports. No I/O here.
//!
//! ```text
//!   NodeState + [Peer] ──plan()──▶ Desired ──diff(observed)──▶ Changes ──▶ netlink / nft edge
//! ```
//!
//! Overlay follows Flannel's VXLAN scheme. Each node's VTEP address is the
//! network address of each of its blocks (10.244.3.0 for 10.244.3.0/24), put
//! on its VXLAN device as a /32. For every peer:
//!
//! - route `peer-block via peer-vtep dev carve.vxlan onlink proto 202`
//! - neighbour `peer-vtep lladdr peer-mac dev carve.vxlan nud permanent`
//! - FDB `peer-mac dev carve.vxlan dst peer-node-ip self permanent`
//!
//! The VXLAN MAC of a node is derived from its node IP ([`vtep_mac`]), so
//! nodes need no extra exchange (no annotation as Flannel uses): every agent
//! computes its peers' MACs from the NodeNetworkConfig status it already
//! watches, and sets its own device's MAC the same way.
//!
//! VNet: no device; route `peer-block via peer-node-ip proto 202`.
//!
//! Routes carve owns carry route protocol [`ROUTE_PROTOCOL`] so a restarted
//! agent recognises them (and removes the stale ones) without a local record.
//! Neighbour and FDB entries live on carve's own VXLAN device, so every
//! permanent entry there is carve's.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use carve_crds::PoolMode;
use ipnet::IpNet;

pub use crate::mac::Mac;

use crate::state::NodeState;

/// Route protocol number marking routes carve installed (`ip route show proto 202`).
pub const ROUTE_PROTOCOL: u8 = 202;
/// Name of the VXLAN device in Overlay mode.
pub const DEFAULT_VXLAN_DEVICE: &str = "carve.vxlan";
/// VXLAN network identifier used unless configured.
pub const DEFAULT_VNI: u32 = 4097;
/// IANA VXLAN port (Flannel and Cilium use 8472; a different port lets both run during a migration).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// VXLAN over IPv4 adds 50 bytes (outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;
/// nftables table (family `ip` and, with IPv6 blocks, `ip6`) holding carve's SNAT rules.
pub const NFT_TABLE: &str = "carve";

/// Overlay device settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayConfig {
    pub device: String,
    pub vni: u32,
    pub port: u16,
    /// MTU of the VXLAN device (underlay MTU − [`VXLAN_OVERHEAD`] unless configured).
    pub mtu: u32,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self { device: DEFAULT_VXLAN_DEVICE.into(), vni: DEFAULT_VNI, port: DEFAULT_VXLAN_PORT, mtu: 1450 }
    }
}

/// Another node, as its NodeNetworkConfig status describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub node_ip: IpAddr,
    pub blocks: Vec<IpNet>,
}

/// The VXLAN MAC of the node with `node_ip`: locally administered unicast,
/// `0e:ca:` + the four IPv4 bytes, or `0e:` + the last five bytes of an IPv6
/// node IP (two IPv6 nodes whose addresses share their last 40 bits would
/// collide; node IPs in one subnet do not).
pub fn vtep_mac(node_ip: IpAddr) -> Mac {
    match node_ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Mac([0x0e, 0xca, o[0], o[1], o[2], o[3]])
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            Mac([0x0e, o[11], o[12], o[13], o[14], o[15]])
        }
    }
}

/// The VXLAN device Overlay mode needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    /// Source of the encapsulated packets: the node IP.
    pub local: IpAddr,
    pub mac: Mac,
    /// This node's VTEP addresses (network address of each own block, host prefix).
    pub addresses: Vec<IpNet>,
}

/// A route carve owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: IpAddr,
    /// `Some(device)`: out of that device, `onlink` (Overlay). `None`: wherever the gateway is (VNet).
    pub onlink_device: Option<String>,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.destination, self.gateway)?;
        match &self.onlink_device {
            Some(dev) => write!(f, " dev {dev} onlink"),
            None => Ok(()),
        }
    }
}

/// A permanent neighbour (ARP/NDP) entry on the VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// A permanent FDB entry on the VXLAN device: frames for `mac` go to `destination`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub mac: Mac,
    pub destination: IpAddr,
}

/// IP family of an SNAT table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// Masquerade traffic from `sources` to anything outside `exclude` (one table per family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snat {
    pub family: Family,
    pub sources: Vec<IpNet>,
    /// Aggregated (no overlaps, as an nftables interval set requires).
    pub exclude: Vec<IpNet>,
}

/// Everything the node's dataplane should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// `None`: no VXLAN device; an existing one of [`OverlayConfig::device`]'s name is removed.
    pub vxlan: Option<VxlanDevice>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    /// One per family with own blocks; families absent here have no carve table.
    pub snat: Vec<Snat>,
    /// VNet: the node IP whose link answers ARP for this node's pods (proxy
    /// ARP), so hosts on the subnet that are not nodes reach pods directly.
    /// IPv4 only: IPv6 would need proxy NDP entries per pod address (not done).
    pub proxy_arp: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("node state: node IP {0:?} is not an IP address")]
    NodeIp(String),
    #[error("node state: {what} {value:?} is not a CIDR")]
    Cidr { what: &'static str, value: String },
}

fn cidr(what: &'static str, value: &str) -> Result<IpNet, PlanError> {
    value.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| PlanError::Cidr { what, value: value.to_string() })
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Plans this node's dataplane. Peers named like this node, without blocks,
/// or with this node's IP are ignored; in VNet mode a block whose family differs
/// from the peer's node IP cannot be routed via it and is skipped.
pub fn plan(state: &NodeState, peers: &[Peer], overlay: &OverlayConfig) -> Result<Desired, PlanError> {
    let node_ip: IpAddr = state.node_ip.parse().map_err(|_| PlanError::NodeIp(state.node_ip.clone()))?;
    let own_blocks = state.blocks.iter().map(|b| cidr("block", &b.cidr)).collect::<Result<BTreeSet<IpNet>, _>>()?;
    let mut exclude = Vec::new();
    for c in &state.cluster_pod_cidrs {
        exclude.push(cidr("cluster pod CIDR", c)?);
    }
    for c in &state.non_masquerade_cidrs {
        exclude.push(cidr("nonMasquerade CIDR", c)?);
    }

    let mut peers: Vec<&Peer> =
        peers.iter().filter(|p| p.node != state.node && p.node_ip != node_ip && !p.blocks.is_empty()).collect();
    peers.sort_by(|a, b| a.node.cmp(&b.node));

    let mut desired = Desired::default();
    match state.mode {
        PoolMode::Overlay => {
            let device = overlay.device.clone();
            desired.vxlan = Some(VxlanDevice {
                name: device.clone(),
                vni: overlay.vni,
                port: overlay.port,
                mtu: overlay.mtu,
                local: node_ip,
                mac: vtep_mac(node_ip),
                addresses: own_blocks.iter().map(|b| host(b.network())).collect(),
            });
            let mut routes = BTreeSet::new();
            let mut neighbours = BTreeSet::new();
            let mut fdb = BTreeSet::new();
            for peer in peers {
                let mac = vtep_mac(peer.node_ip);
                fdb.insert(FdbEntry { mac, destination: peer.node_ip });
                for block in &peer.blocks {
                    let block = block.trunc();
                    if own_blocks.contains(&block) {
                        continue;
                    }
                    let vtep = block.network();
                    neighbours.insert(Neighbour { ip: vtep, mac });
                    routes.insert(Route { destination: block, gateway: vtep, onlink_device: Some(device.clone()) });
                }
            }
            desired.routes = routes.into_iter().collect();
            desired.neighbours = neighbours.into_iter().collect();
            desired.fdb = fdb.into_iter().collect();
        }
        PoolMode::VNet => {
            let mut routes = BTreeSet::new();
            for peer in peers {
                for block in &peer.blocks {
                    let block = block.trunc();
                    let same_family =
                        matches!((block, peer.node_ip), (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_)));
                    if same_family && !own_blocks.contains(&block) {
                        routes.insert(Route { destination: block, gateway: peer.node_ip, onlink_device: None });
                    }
                }
            }
            desired.routes = routes.into_iter().collect();
            // The kernel answers only for addresses routed out another link
            // (pods' /32s on their veths), never for peers' blocks routed back out the underlay.
            desired.proxy_arp = node_ip.is_ipv4().then_some(node_ip);
        }
    }

    for family in [Family::V4, Family::V6] {
        let sources: Vec<IpNet> = own_blocks.iter().filter(|b| Family::of(b) == family).copied().collect();
        if sources.is_empty() {
            continue;
        }
        let exclude = IpNet::aggregate(&exclude.iter().filter(|c| Family::of(c) == family).copied().collect());
        desired.snat.push(Snat { family, sources, exclude });
    }
    Ok(desired)
}

/// What to add and what to remove to go from observed to desired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes<T> {
    pub add: Vec<T>,
    pub remove: Vec<T>,
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Set difference both ways: what `desired` has and `observed` lacks is
/// added, what `observed` has and `desired` lacks is removed.
pub fn diff<T: Ord + Clone>(desired: &[T], observed: &[T]) -> Changes<T> {
    let want: BTreeSet<&T> = desired.iter().collect();
    let have: BTreeSet<&T> = observed.iter().collect();
    Changes {
        add: want.difference(&have).map(|t| (*t).clone()).collect(),
        remove: have.difference(&want).map(|t| (*t).clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carve_crds::{IpFamily, NodeBlock};

    fn state(mode: PoolMode, node_ip: &str, blocks: &[&str]) -> NodeState {
        NodeState {
            node: "node-a".into(),
            mode,
            blocks: blocks
                .iter()
                .map(|c| NodeBlock {
                    cidr: c.to_string(),
                    family: if c.contains(':') { IpFamily::IPv6 } else { IpFamily::IPv4 },
                    gateway: None,
                    allocation_id: None,
                })
                .collect(),
            strategy: Default::default(),
            reserved_ips: vec![],
            cluster_pod_cidrs: vec!["10.244.0.0/16".into()],
            non_masquerade_cidrs: vec!["192.168.0.0/16".into(), "10.244.7.0/24".into()],
            mtu: 1450,
            node_ip: node_ip.into(),
        }
    }

    fn peer(node: &str, ip: &str, blocks: &[&str]) -> Peer {
        Peer {
            node: node.into(),
            node_ip: ip.parse().unwrap(),
            blocks: blocks.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn vtep_mac_is_derived_from_node_ip() {
        assert_eq!(vtep_mac("192.168.1.10".parse().unwrap()).to_string(), "0e:ca:c0:a8:01:0a");
        assert_eq!(vtep_mac("fd00::1:2:3".parse().unwrap()).to_string(), "0e:01:00:02:00:03");
        // Locally administered, unicast.
        assert_eq!(vtep_mac("1.2.3.4".parse().unwrap()).0[0] & 0b11, 0b10);
    }

    #[test]
    fn overlay_plans_device_route_neighbour_fdb_per_peer() {
        let s = state(PoolMode::Overlay, "192.168.1.10", &["10.244.1.0/24"]);
        let peers = [
            peer("node-b", "192.168.1.11", &["10.244.2.0/24"]),
            peer("node-a", "192.168.1.10", &["10.244.1.0/24"]), // itself
            peer("node-c", "192.168.1.12", &[]),                // no blocks yet
        ];
        let d = plan(&s, &peers, &OverlayConfig::default()).unwrap();
        let vx = d.vxlan.unwrap();
        assert_eq!(
            (vx.name.as_str(), vx.vni, vx.port, vx.mtu, vx.local),
            ("carve.vxlan", 4097, 4789, 1450, "192.168.1.10".parse().unwrap())
        );
        assert_eq!(vx.mac, vtep_mac("192.168.1.10".parse().unwrap()));
        assert_eq!(vx.addresses, vec!["10.244.1.0/32".parse::<IpNet>().unwrap()]);
        assert_eq!(
            d.routes,
            vec![Route {
                destination: "10.244.2.0/24".parse().unwrap(),
                gateway: "10.244.2.0".parse().unwrap(),
                onlink_device: Some("carve.vxlan".into()),
            }]
        );
        let peer_mac = vtep_mac("192.168.1.11".parse().unwrap());
        assert_eq!(d.neighbours, vec![Neighbour { ip: "10.244.2.0".parse().unwrap(), mac: peer_mac }]);
        assert_eq!(d.fdb, vec![FdbEntry { mac: peer_mac, destination: "192.168.1.11".parse().unwrap() }]);
    }

    #[test]
    fn overlay_peer_with_two_blocks_gets_one_fdb_entry() {
        let s = state(PoolMode::Overlay, "192.168.1.10", &["10.244.1.0/24"]);
        let d = plan(&s, &[peer("b", "192.168.1.11", &["10.244.2.0/24", "10.244.9.0/24"])], &OverlayConfig::default())
            .unwrap();
        assert_eq!(d.routes.len(), 2);
        assert_eq!(d.neighbours.len(), 2);
        assert_eq!(d.fdb.len(), 1);
    }

    #[test]
    fn vnet_plans_plain_routes_via_node_ips_and_no_device() {
        let mut s = state(PoolMode::VNet, "10.1.0.4", &["10.1.1.0/28", "10.1.1.16/28"]);
        s.cluster_pod_cidrs = vec!["10.1.0.0/16".into()];
        s.non_masquerade_cidrs = vec![];
        let peers = [peer("b", "10.1.0.5", &["10.1.1.32/28", "fd00::/124"]), peer("c", "10.1.0.6", &["10.1.1.48/28"])];
        let d = plan(&s, &peers, &OverlayConfig::default()).unwrap();
        assert!(d.vxlan.is_none());
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(d.proxy_arp, Some("10.1.0.4".parse().unwrap()), "the underlay answers ARP for pods");
        let routes: Vec<String> = d.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, ["10.1.1.32/28 via 10.1.0.5", "10.1.1.48/28 via 10.1.0.6"]);
        assert_eq!(
            d.snat,
            vec![Snat {
                family: Family::V4,
                sources: vec!["10.1.1.0/28".parse().unwrap(), "10.1.1.16/28".parse().unwrap()],
                exclude: vec!["10.1.0.0/16".parse().unwrap()],
            }]
        );
    }

    #[test]
    fn snat_exclusions_are_aggregated_per_family() {
        let mut s = state(PoolMode::Overlay, "192.168.1.10", &["10.244.1.0/24", "fd00:10:244:1::/80"]);
        s.non_masquerade_cidrs.push("fd00:10:244::/48".into());
        let d = plan(&s, &[], &OverlayConfig::default()).unwrap();
        assert_eq!(d.snat.len(), 2);
        // 10.244.7.0/24 lies inside 10.244.0.0/16: one interval, as nftables needs.
        assert_eq!(d.snat[0].exclude, vec!["10.244.0.0/16".parse().unwrap(), "192.168.0.0/16".parse().unwrap()]);
        assert_eq!(d.snat[1].family, Family::V6);
        assert_eq!(d.snat[1].exclude, vec!["fd00:10:244::/48".parse().unwrap()]);
    }

    #[test]
    fn no_blocks_means_no_snat_and_bad_input_is_named() {
        let s = state(PoolMode::Overlay, "192.168.1.10", &[]);
        assert!(plan(&s, &[], &OverlayConfig::default()).unwrap().snat.is_empty());
        let s = state(PoolMode::Overlay, "not-an-ip", &[]);
        assert_eq!(plan(&s, &[], &OverlayConfig::default()), Err(PlanError::NodeIp("not-an-ip".into())));
        let s = state(PoolMode::Overlay, "192.168.1.10", &["10.244.1.0"]);
        assert!(plan(&s, &[], &OverlayConfig::default()).unwrap_err().to_string().contains("block \"10.244.1.0\""));
    }

    #[test]
    fn plan_is_deterministic_whatever_the_peer_order() {
        let s = state(PoolMode::Overlay, "192.168.1.10", &["10.244.1.0/24"]);
        let b = peer("b", "192.168.1.11", &["10.244.2.0/24"]);
        let c = peer("c", "192.168.1.12", &["10.244.3.0/24"]);
        let o = OverlayConfig::default();
        assert_eq!(plan(&s, &[b.clone(), c.clone()], &o), plan(&s, &[c, b], &o));
    }

    #[test]
    fn diff_adds_missing_and_removes_stale() {
        let d = diff(&[1, 2, 3], &[3, 4, 4]);
        assert_eq!(d, Changes { add: vec![1, 2], remove: vec![4] });
        assert!(diff(&[1, 2], &[2, 1]).is_empty());
    }
}
