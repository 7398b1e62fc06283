//! The dataplane's requests: what the kernel holds of carve's VXLAN device,
//! VTEP addresses, routes, neighbours and FDB entries, and the changes
//! [`crate::dataplane`] applies to reach its
//! [`Desired`](crate::dataplane::plan::Desired), typed by the plan's types.
//! More methods of the one socket of [`super`]; no `ip`.
//!
//! The socket belongs to the network namespace it was opened in, so the
//! namespace is fixed for the socket's life whichever thread uses it.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{
    RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{
    EEXIST, ENODEV, ENOENT, ESRCH, Netlink, NetlinkError, neighbour_address, neighbour_ip, route_address, route_parts,
};
use crate::dataplane::plan::{FdbEntry, Mac, Neighbour, ROUTE_PROTOCOL, Route, VxlanDevice};

const RT_TABLE_MAIN: u32 = 254;

/// NUD_PERMANENT is a bit: `bridge fdb add … permanent` reports it with NUD_NOARP (0xc0).
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

/// What a VXLAN link reports about itself.
#[derive(Debug, Default)]
struct VxlanInfo {
    is_vxlan: bool,
    vni: Option<u32>,
    port: Option<u16>,
    local: Option<IpAddr>,
    learning: Option<bool>,
    mac: Option<Mac>,
    mtu: Option<u32>,
    up: bool,
}

fn vxlan_info(link: &LinkMessage) -> VxlanInfo {
    let mut info = VxlanInfo { up: link.header.flags.contains(LinkFlags::Up), ..Default::default() };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(a) => info.mac = Mac::from_bytes(a),
            LinkAttribute::Mtu(m) => info.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => info.is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(v) => info.vni = Some(*v),
                                    InfoVxlan::Port(p) => info.port = Some(*p),
                                    InfoVxlan::Local(a) => info.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => info.local = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Learning(l) => info.learning = Some(*l),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// The VXLAN device `dev` as an RTM_NEWLINK: up, learning off, its MAC and MTU.
fn vxlan_link(dev: &VxlanDevice) -> LinkMessage {
    let mut data = vec![InfoVxlan::Id(dev.vni), InfoVxlan::Port(dev.port), InfoVxlan::Learning(false)];
    data.push(match dev.local {
        IpAddr::V4(v4) => InfoVxlan::Local(v4),
        IpAddr::V6(v6) => InfoVxlan::Local6(v6),
    });
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::IfName(dev.name.clone()));
    msg.attributes.push(LinkAttribute::Mtu(dev.mtu));
    msg.attributes.push(LinkAttribute::Address(dev.mac.0.to_vec()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Vxlan), LinkInfo::Data(InfoData::Vxlan(data))]));
    msg
}

/// A carve route (protocol [`ROUTE_PROTOCOL`]) as an RTM_NEWROUTE.
fn route_message(route: &Route, vxlan_index: Option<u32>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let dst = route.destination;
    msg.header.address_family = if dst.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Destination(route_address(dst.network())));
    msg.attributes.push(RouteAttribute::Gateway(route_address(route.gateway)));
    if let Some(index) = vxlan_index {
        msg.attributes.push(RouteAttribute::Oif(index));
        msg.header.flags.insert(RouteFlags::Onlink);
    }
    msg
}

impl Netlink {
    /// The link holding address `ip` (the underlay), if any link does.
    fn link_of_address(&mut self, ip: IpAddr) -> Result<Option<LinkMessage>, NetlinkError> {
        let Some(index) = self.address_messages()?.into_iter().find_map(|a| {
            a.attributes
                .iter()
                .any(|at| matches!(at, AddressAttribute::Address(x) if *x == ip))
                .then_some(a.header.index)
        }) else {
            return Ok(None);
        };
        self.link_by_index(index)
    }

    /// MTU of the link holding address `ip` (the underlay), if any link does.
    pub fn mtu_of_address(&mut self, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link_of_address(ip)?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }

    /// Name of the link holding address `ip`, if any link does.
    pub fn link_name_of_address(&mut self, ip: IpAddr) -> Result<Option<String>, NetlinkError> {
        Ok(self.link_of_address(ip)?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        }))
    }

    fn address_messages(&mut self) -> Result<Vec<AddressMessage>, NetlinkError> {
        let replies = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP, || {
            "listing addresses".into()
        })?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// Deletes the VXLAN device `name` when it exists (VNet mode, or a device
    /// that cannot be changed in place). Only VXLAN links are touched.
    pub fn remove_vxlan(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link_by_name(name)? else { return Ok(false) };
        if !vxlan_info(&link).is_vxlan {
            return Ok(false);
        }
        let mut msg = LinkMessage::default();
        msg.header.index = link.header.index;
        match self.ack(RouteNetlinkMessage::DelLink(msg), 0, || format!("deleting VXLAN device {name}")) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the VXLAN device match `dev` (recreating it when VNI, port or local
    /// address differ, which the kernel cannot change in place) and returns its index.
    pub fn ensure_vxlan(&mut self, dev: &VxlanDevice) -> Result<u32, NetlinkError> {
        let name = &dev.name;
        if let Some(link) = self.link_by_name(name)? {
            let info = vxlan_info(&link);
            let index = link.header.index;
            if !info.is_vxlan {
                return Err(NetlinkError::Conflict(format!(
                    "link {name} exists and is not a VXLAN device; carve will not replace it"
                )));
            }
            if info.vni == Some(dev.vni)
                && info.port == Some(dev.port)
                && info.local == Some(dev.local)
                && info.learning == Some(false)
            {
                if info.mac != Some(dev.mac) || info.mtu != Some(dev.mtu) || !info.up {
                    let mut msg = LinkMessage::default();
                    msg.header.index = index;
                    msg.header.flags = LinkFlags::Up;
                    msg.header.change_mask = LinkFlags::Up;
                    msg.attributes.push(LinkAttribute::Address(dev.mac.0.to_vec()));
                    msg.attributes.push(LinkAttribute::Mtu(dev.mtu));
                    self.set_link(msg, &format!("setting MAC {}, MTU {} and up on {name}", dev.mac, dev.mtu))?;
                }
                return Ok(index);
            }
            tracing::info!(device = %name, "VXLAN device settings changed; recreating it");
            self.remove_vxlan(name)?;
        }
        let what = || format!("creating VXLAN device {name} (VNI {}, port {}, local {})", dev.vni, dev.port, dev.local);
        match self.ack(RouteNetlinkMessage::NewLink(vxlan_link(dev)), NLM_F_CREATE | NLM_F_EXCL, what) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(EEXIST) => {}
            Err(e) => return Err(e),
        }
        let link = self.link_by_name(name)?.ok_or_else(|| {
            NetlinkError::Conflict(format!("VXLAN device {name} vanished right after it was created"))
        })?;
        Ok(link.header.index)
    }

    /// Makes the global addresses of link `index` exactly `want` (the VTEP
    /// addresses); link-local ones are left alone.
    pub fn ensure_addresses(&mut self, dev: &VxlanDevice, index: u32) -> Result<(), NetlinkError> {
        let mut present = Vec::new();
        for msg in self.address_messages()?.into_iter().filter(|m| m.header.index == index) {
            if msg.header.scope == AddressScope::Link {
                continue;
            }
            let Some(ip) = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            let net = ipnet::IpNet::new(ip, msg.header.prefix_len).ok();
            if let Some(n) = net.filter(|n| dev.addresses.contains(n)) {
                present.push(n);
            } else {
                self.ack(RouteNetlinkMessage::DelAddress(msg), 0, || {
                    format!("removing stale address {ip} from {}", dev.name)
                })?;
            }
        }
        for net in dev.addresses.iter().filter(|n| !present.contains(n)) {
            self.add_address(index, net.addr(), net.prefix_len())?;
        }
        Ok(())
    }

    /// Routes in the main table carrying carve's protocol number, with the
    /// message to delete each (`None`: a shape carve never installs, so stale).
    /// `vxlan` names the device whose routes are onlink.
    pub fn carve_routes(
        &mut self,
        vxlan: Option<(&str, u32)>,
    ) -> Result<Vec<(Option<Route>, RouteMessage)>, NetlinkError> {
        let mut out = Vec::new();
        for v4 in [true, false] {
            for msg in self.routes(v4)? {
                if u8::from(msg.header.protocol) != ROUTE_PROTOCOL {
                    continue;
                }
                let parts = route_parts(&msg);
                if parts.table != RT_TABLE_MAIN {
                    continue;
                }
                let (Some(dest), Some(gateway)) = (parts.destination, parts.gateway) else {
                    // Not a shape carve makes (no destination or gateway): stale.
                    out.push((None, msg));
                    continue;
                };
                let Ok(destination) = ipnet::IpNet::new(dest, parts.prefix_len) else {
                    out.push((None, msg));
                    continue;
                };
                let onlink_device = match vxlan {
                    Some((name, index)) if parts.oif == Some(index) && parts.onlink => Some(name.to_string()),
                    Some(_) if parts.onlink => Some(format!("if{}", parts.oif.unwrap_or_default())),
                    _ => None,
                };
                out.push((Some(Route { destination, gateway, onlink_device }), msg));
            }
        }
        Ok(out)
    }

    pub fn delete_carve_route(&mut self, route: &Route, msg: RouteMessage) -> Result<(), NetlinkError> {
        match self.ack(RouteNetlinkMessage::DelRoute(msg), 0, || format!("removing route {route}")) {
            Err(e) if matches!(e.errno(), Some(ESRCH) | Some(ENOENT)) => Ok(()),
            r => r,
        }
    }

    pub fn add_carve_route(&mut self, route: &Route, vxlan_index: Option<u32>) -> Result<(), NetlinkError> {
        let index = match (&route.onlink_device, vxlan_index) {
            (Some(_), Some(i)) => Some(i),
            (Some(_), None) => {
                return Err(NetlinkError::Conflict(format!("adding route {route}: the VXLAN device is missing")));
            }
            (None, _) => None,
        };
        let msg = RouteNetlinkMessage::NewRoute(route_message(route, index));
        match self.ack(msg, NLM_F_CREATE | NLM_F_EXCL, || format!("adding route {route}")) {
            Err(e) if e.errno() == Some(EEXIST) => {
                tracing::warn!(route = %route, "a route to this destination that carve does not own exists; left alone");
                Ok(())
            }
            r => r,
        }
    }

    fn neighbours_of(
        &mut self,
        family: AddressFamily,
        index: u32,
        what: &str,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let mut filter = NeighbourMessage::default();
        filter.header.family = family;
        let replies =
            self.request(RouteNetlinkMessage::GetNeighbour(filter), NLM_F_DUMP, || format!("listing {what}"))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index && is_permanent(n.header.state) => {
                    Some(n)
                }
                _ => None,
            })
            .collect())
    }

    fn entries(
        &mut self,
        family: AddressFamily,
        index: u32,
        what: &str,
    ) -> Result<Vec<(IpAddr, Mac, NeighbourMessage)>, NetlinkError> {
        let mut out = Vec::new();
        for msg in self.neighbours_of(family, index, what)? {
            let ip = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => neighbour_ip(d),
                _ => None,
            });
            let mac = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => Mac::from_bytes(l),
                _ => None,
            });
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((ip, mac, msg));
            }
        }
        Ok(out)
    }

    /// Permanent neighbour entries on link `index`.
    pub fn neighbour_entries(&mut self, index: u32) -> Result<Vec<(Neighbour, NeighbourMessage)>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            for (ip, mac, msg) in self.entries(family, index, "neighbour entries")? {
                out.push((Neighbour { ip, mac }, msg));
            }
        }
        Ok(out)
    }

    /// Permanent FDB entries with a remote destination on link `index`.
    pub fn fdb(&mut self, index: u32) -> Result<Vec<(FdbEntry, NeighbourMessage)>, NetlinkError> {
        Ok(self
            .entries(AddressFamily::Bridge, index, "FDB entries")?
            .into_iter()
            .map(|(destination, mac, msg)| (FdbEntry { mac, destination }, msg))
            .collect())
    }

    pub fn add_neighbour(&mut self, dev: &str, index: u32, n: &Neighbour) -> Result<(), NetlinkError> {
        self.set_neighbour(index, n.ip, n.mac).map_err(|e| match e {
            NetlinkError::Io { source, .. } => {
                NetlinkError::Io { action: format!("adding neighbour {} lladdr {} on {dev}", n.ip, n.mac), source }
            }
            conflict => conflict,
        })
    }

    pub fn add_fdb(&mut self, dev: &str, index: u32, f: &FdbEntry) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(f.destination)));
        self.ack(RouteNetlinkMessage::NewNeighbour(msg), NLM_F_CREATE | NLM_F_REPLACE, || {
            format!("adding FDB entry {} dst {} on {dev}", f.mac, f.destination)
        })?;
        Ok(())
    }

    /// Deletes a neighbour or FDB entry; already gone is fine.
    pub fn delete_neighbour(&mut self, what: String, msg: NeighbourMessage) -> Result<(), NetlinkError> {
        match self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0, || format!("removing {what}")) {
            Err(e) if e.errno() == Some(ENOENT) => Ok(()),
            r => r,
        }
    }
}
