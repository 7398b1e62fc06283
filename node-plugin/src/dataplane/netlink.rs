//! The netlink edge: reads what the kernel holds and applies the difference to
//! [`Desired`](super::plan::Desired). Typed rtnetlink requests only; no `ip`.
//!
//! The socket is opened once, in the network namespace of the thread that
//! calls [`Netlink::open`]; every later request goes through it, so the
//! namespace is fixed for the socket's life whichever thread polls it.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol};
use nix::errno::Errno;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::DataplaneError;
use super::plan::{FdbEntry, Mac, Neighbour, ROUTE_PROTOCOL, Route, VxlanDevice};

const RT_TABLE_MAIN: u32 = 254;

/// A netlink socket bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(Errno::from_raw(-m.raw_code())),
        _ => None,
    }
}

fn failed(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let action = action.into();
    move |source| DataplaneError::Netlink { action, source }
}

/// NUD_PERMANENT is a bit: `bridge fdb add … permanent` reports it with NUD_NOARP (0xc0).
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

fn ip_of_neigh(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        // FDB dumps (AF_BRIDGE) carry the remote's address as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn ip_of_route(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
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
            LinkAttribute::Address(a) => info.mac = mac_of(a),
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

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace. Call
    /// it inside a tokio runtime (the connection task is spawned on it).
    pub fn open() -> Result<Self, DataplaneError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, DataplaneError> {
        match self.handle.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(failed(format!("looking up link {name}"))(e)),
        }
    }

    /// MTU of the link holding address `ip` (the underlay), if any link does.
    pub async fn mtu_of_address(&self, ip: IpAddr) -> Result<Option<u32>, DataplaneError> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(ip)
            .execute()
            .try_collect()
            .await
            .map_err(failed(format!("looking up the link holding {ip}")))?;
        let Some(index) = addrs.first().map(|a| a.header.index) else { return Ok(None) };
        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(failed(format!("reading link {index} (holds {ip})")))?;
        Ok(link.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }

    /// Deletes the VXLAN device `name` when it exists (VNet mode, or a device
    /// that cannot be changed in place). Only VXLAN links are touched.
    pub async fn remove_vxlan(&self, name: &str) -> Result<bool, DataplaneError> {
        let Some(link) = self.link(name).await? else { return Ok(false) };
        if !vxlan_info(&link).is_vxlan {
            return Ok(false);
        }
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(false),
            Err(e) => Err(failed(format!("deleting VXLAN device {name}"))(e)),
        }
    }

    /// Makes the VXLAN device match `dev` (recreating it when VNI, port or local
    /// address differ, which the kernel cannot change in place) and returns its index.
    pub async fn ensure_vxlan(&self, dev: &VxlanDevice) -> Result<u32, DataplaneError> {
        let name = &dev.name;
        if let Some(link) = self.link(name).await? {
            let info = vxlan_info(&link);
            let index = link.header.index;
            if !info.is_vxlan {
                return Err(DataplaneError::Conflict(format!(
                    "link {name} exists and is not a VXLAN device; carve will not replace it"
                )));
            }
            if info.vni == Some(dev.vni)
                && info.port == Some(dev.port)
                && info.local == Some(dev.local)
                && info.learning == Some(false)
            {
                if info.mac != Some(dev.mac) || info.mtu != Some(dev.mtu) || !info.up {
                    let msg = LinkUnspec::new_with_index(index).address(dev.mac.0.to_vec()).mtu(dev.mtu).up().build();
                    self.handle
                        .link()
                        .set(msg)
                        .execute()
                        .await
                        .map_err(failed(format!("setting MAC {}, MTU {} and up on {name}", dev.mac, dev.mtu)))?;
                }
                return Ok(index);
            }
            tracing::info!(device = %name, "VXLAN device settings changed; recreating it");
            self.remove_vxlan(name).await?;
        }
        let builder = LinkVxlan::new(name, dev.vni).port(dev.port).learning(false);
        let builder = match dev.local {
            IpAddr::V4(v4) => builder.local(v4),
            IpAddr::V6(v6) => builder.local6(v6),
        };
        let msg = builder.mtu(dev.mtu).address(dev.mac.0.to_vec()).up().build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(Errno::EEXIST) => {}
            Err(e) => {
                return Err(failed(format!(
                    "creating VXLAN device {name} (VNI {}, port {}, local {})",
                    dev.vni, dev.port, dev.local
                ))(e));
            }
        }
        let link = self.link(name).await?.ok_or_else(|| {
            DataplaneError::Conflict(format!("VXLAN device {name} vanished right after it was created"))
        })?;
        Ok(link.header.index)
    }

    /// Makes the global addresses of link `index` exactly `want` (the VTEP
    /// addresses); link-local ones are left alone.
    pub async fn ensure_addresses(&self, dev: &VxlanDevice, index: u32) -> Result<(), DataplaneError> {
        let have: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(failed(format!("listing addresses of {}", dev.name)))?;
        let mut present = Vec::new();
        for msg in have {
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
            if net.is_some_and(|n| dev.addresses.contains(&n)) {
                present.push(net.unwrap_or_else(|| ipnet::IpNet::from(ip)));
            } else {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(failed(format!("removing stale address {ip} from {}", dev.name)))?;
            }
        }
        for net in dev.addresses.iter().filter(|n| !present.contains(n)) {
            match self.handle.address().add(index, net.addr(), net.prefix_len()).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::EEXIST) => {}
                Err(e) => return Err(failed(format!("adding address {net} to {}", dev.name))(e)),
            }
        }
        Ok(())
    }

    /// Routes in the main table carrying carve's protocol number, with the
    /// message to delete each (`None`: a shape carve never installs, so stale).
    /// `vxlan` names the device whose routes are onlink.
    pub async fn carve_routes(
        &self,
        vxlan: Option<(&str, u32)>,
    ) -> Result<Vec<(Option<Route>, RouteMessage)>, DataplaneError> {
        let mut out = Vec::new();
        let filters = [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ];
        for filter in filters {
            let msgs: Vec<RouteMessage> =
                self.handle.route().get(filter).execute().try_collect().await.map_err(failed("listing routes"))?;
            for msg in msgs {
                if u8::from(msg.header.protocol) != ROUTE_PROTOCOL {
                    continue;
                }
                let mut table = u32::from(msg.header.table);
                let (mut dest, mut gateway, mut oif) = (None, None, None);
                for attr in &msg.attributes {
                    match attr {
                        RouteAttribute::Destination(a) => dest = ip_of_route(a),
                        RouteAttribute::Gateway(a) => gateway = ip_of_route(a),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                if table != RT_TABLE_MAIN {
                    continue;
                }
                let (Some(dest), Some(gateway)) = (dest, gateway) else {
                    // Not a shape carve makes (no destination or gateway): stale.
                    out.push((None, msg));
                    continue;
                };
                let Ok(destination) = ipnet::IpNet::new(dest, msg.header.destination_prefix_length) else {
                    out.push((None, msg));
                    continue;
                };
                let onlink = msg.header.flags.contains(RouteFlags::Onlink);
                let onlink_device = match vxlan {
                    Some((name, index)) if oif == Some(index) && onlink => Some(name.to_string()),
                    Some(_) if onlink => Some(format!("if{}", oif.unwrap_or_default())),
                    _ => None,
                };
                out.push((Some(Route { destination, gateway, onlink_device }), msg));
            }
        }
        Ok(out)
    }

    pub async fn delete_route(&self, route: &Route, msg: RouteMessage) -> Result<(), DataplaneError> {
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(Errno::ESRCH | Errno::ENOENT)) => Ok(()),
            Err(e) => Err(failed(format!("removing route {route}"))(e)),
        }
    }

    pub async fn add_route(&self, route: &Route, vxlan_index: Option<u32>) -> Result<(), DataplaneError> {
        let what = || format!("adding route {route}");
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.destination.network(), route.destination.prefix_len())
            .map_err(|e| DataplaneError::Conflict(format!("{}: {e}", what())))?
            .gateway(route.gateway)
            .map_err(|e| DataplaneError::Conflict(format!("{}: {e}", what())))?
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
        if route.onlink_device.is_some() {
            let Some(index) = vxlan_index else {
                return Err(DataplaneError::Conflict(format!("{}: the VXLAN device is missing", what())));
            };
            builder = builder.output_interface(index).onlink();
        }
        match self.handle.route().add(builder.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(Errno::EEXIST) => {
                tracing::warn!(route = %route, "a route to this destination that carve does not own exists; left alone");
                Ok(())
            }
            Err(e) => Err(failed(what())(e)),
        }
    }

    async fn neighbours_of(
        &self,
        family: AddressFamily,
        index: u32,
        what: &str,
    ) -> Result<Vec<NeighbourMessage>, DataplaneError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(failed(format!("listing {what}")))?;
        Ok(msgs.into_iter().filter(|m| m.header.ifindex == index && is_permanent(m.header.state)).collect())
    }

    /// Permanent neighbour entries on link `index`.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<(Neighbour, NeighbourMessage)>, DataplaneError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            for msg in self.neighbours_of(family, index, "neighbour entries").await? {
                let ip = msg.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(d) => ip_of_neigh(d),
                    _ => None,
                });
                let mac = msg.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => mac_of(l),
                    _ => None,
                });
                if let (Some(ip), Some(mac)) = (ip, mac) {
                    out.push((Neighbour { ip, mac }, msg));
                }
            }
        }
        Ok(out)
    }

    /// Permanent FDB entries with a remote destination on link `index`.
    pub async fn fdb(&self, index: u32) -> Result<Vec<(FdbEntry, NeighbourMessage)>, DataplaneError> {
        let mut out = Vec::new();
        for msg in self.neighbours_of(AddressFamily::Bridge, index, "FDB entries").await? {
            let destination = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => ip_of_neigh(d),
                _ => None,
            });
            let mac = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => mac_of(l),
                _ => None,
            });
            if let (Some(destination), Some(mac)) = (destination, mac) {
                out.push((FdbEntry { mac, destination }, msg));
            }
        }
        Ok(out)
    }

    pub async fn add_neighbour(&self, dev: &str, index: u32, n: &Neighbour) -> Result<(), DataplaneError> {
        self.handle
            .neighbours()
            .add(index, n.ip)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(failed(format!("adding neighbour {} lladdr {} on {dev}", n.ip, n.mac)))
    }

    pub async fn add_fdb(&self, dev: &str, index: u32, f: &FdbEntry) -> Result<(), DataplaneError> {
        self.handle
            .neighbours()
            .add_bridge(index, &f.mac.0)
            .destination(f.destination)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(failed(format!("adding FDB entry {} dst {} on {dev}", f.mac, f.destination)))
    }

    /// Deletes a neighbour or FDB entry; already gone is fine.
    pub async fn delete_neighbour(&self, what: String, msg: NeighbourMessage) -> Result<(), DataplaneError> {
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(Errno::ENOENT) => Ok(()),
            Err(e) => Err(failed(format!("removing {what}"))(e)),
        }
    }
}
