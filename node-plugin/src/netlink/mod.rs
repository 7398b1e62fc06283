//! One synchronous rtnetlink layer: a socket per network namespace, opened
//! once, typed requests built from netlink-packet-route messages, and the one
//! "run in this namespace" helper ([`in_netns`]).
//!
//! A netlink socket belongs to the namespace it was created in, so a plugin
//! opens one in the host namespace and one inside the pod's ([`Netlink::open_in`]
//! enters it only for the `socket()` call) and talks to both from one thread,
//! without a runtime or a thread per namespace (netavark's shape).
//!
//! Every `impl Netlink` is here: links, addresses, routes and neighbours in
//! this file, the dataplane's VXLAN device, carve routes and FDB in
//! [`dataplane`]; one error type, [`NetlinkError`].

mod dataplane;

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::CloneFlags;

pub use crate::mac::Mac;

pub const ENODEV: i32 = nix::libc::ENODEV;
pub const EEXIST: i32 = nix::libc::EEXIST;
pub const ENOENT: i32 = nix::libc::ENOENT;
pub const ESRCH: i32 = nix::libc::ESRCH;

/// The one error of every netlink request carve makes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A failed exchange, named by what it was for.
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    /// The kernel holds something carve will not take over or change
    /// (a non-VXLAN link under carve's device name, a device gone missing).
    #[error("{0}")]
    Conflict(String),
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Io { source, .. } => source.raw_os_error(),
            NetlinkError::Conflict(_) => None,
        }
    }
}

fn failed(action: impl Into<String>) -> impl FnOnce(io::Error) -> NetlinkError {
    let action = action.into();
    move |source| NetlinkError::Io { action, source }
}

/// Runs `f` with the calling thread in the network namespace `ns`, then puts
/// the thread back where it was. A thread that cannot go back is not left
/// running in the wrong namespace: that aborts.
pub fn in_netns<T>(ns: &impl AsFd, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let out = f();
    if let Err(e) = nix::sched::setns(&home, CloneFlags::CLONE_NEWNET) {
        eprintln!("fatal: cannot return to the original network namespace: {e}");
        std::process::abort();
    }
    Ok(out)
}

/// Opens the network namespace file at `path` (`/run/netns/x`, `/proc/<pid>/ns/net`).
pub fn open_netns(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// An rtnetlink socket in one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Largest datagram the kernel sends on a dump (it sizes them to a page or 32 KiB).
const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(failed("opening an rtnetlink socket"))?;
        socket.bind_auto().map_err(failed("binding the rtnetlink socket"))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(failed("connecting the rtnetlink socket"))?;
        // Extended ACKs: the kernel names the attribute it refused.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink { socket, seq: 0, buf: Vec::with_capacity(RECV_BUF) })
    }

    /// A socket in the network namespace `ns` (the calling thread enters it
    /// only to create the socket).
    pub fn open_in(ns: &impl AsFd) -> Result<Self, NetlinkError> {
        in_netns(ns, Netlink::open).map_err(failed("entering the network namespace"))?
    }

    fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// A serialized request with the next sequence number.
    fn encode(&mut self, msg: RouteNetlinkMessage, flags: u16) -> (u32, Vec<u8>) {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut bytes = vec![0; nl.buffer_len()];
        nl.serialize(&mut bytes);
        (self.seq, bytes)
    }

    /// Sends `msg` (with `NLM_F_REQUEST` and `flags`) and collects the
    /// replies: until the ACK, the end of a dump, or the one answer of a plain GET.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        action: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let (seq, bytes) = self.encode(msg, flags);
        self.socket.send(&bytes, 0).map_err(|e| failed(action())(e))?;
        // A plain GET is answered by one message (or an error), with no ACK or DONE after it.
        let single = flags & (NLM_F_DUMP | NLM_F_ACK) == 0;
        let mut out = Vec::new();
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0).map_err(|e| failed(action())(e))?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n]).map_err(|e| {
                    failed(action())(io::Error::new(io::ErrorKind::InvalidData, format!("undecodable reply: {e}")))
                })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) if single => return Ok(vec![m]),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(failed(action())(io::Error::from_raw_os_error(-code.get()))),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `msg` asking for an ACK; Ok once the kernel has done it.
    pub fn ack(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        action: impl Fn() -> String,
    ) -> Result<(), NetlinkError> {
        self.request(msg, NLM_F_ACK | flags, action).map(drop)
    }

    /// Like [`Netlink::ack`], but "already there" is success.
    fn create(&mut self, msg: RouteNetlinkMessage, action: impl Fn() -> String) -> Result<(), NetlinkError> {
        match self.ack(msg, NLM_F_CREATE | NLM_F_EXCL, action) {
            Err(e) if e.errno() == Some(EEXIST) => Ok(()),
            r => r,
        }
    }

    /// The link named `name`; None when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, name)
    }

    /// The link with `index`; None when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg, &index.to_string())
    }

    /// The names of every link in the namespace (one dump).
    pub fn link_names(&mut self) -> Result<Vec<String>, NetlinkError> {
        let links = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, || {
            "listing links".to_string()
        })?;
        Ok(links
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                }),
                _ => None,
            })
            .collect())
    }

    fn get_link(&mut self, msg: LinkMessage, what: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        match self.request(RouteNetlinkMessage::GetLink(msg), 0, || format!("looking up link {what}")) {
            Ok(mut links) => Ok(links.pop().and_then(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.errno() == Some(ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link (`msg` from [`veth_pair`] and the like); EEXIST is an error here.
    pub fn add_link(&mut self, msg: LinkMessage, what: &str) -> Result<(), NetlinkError> {
        self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL, || format!("creating {what}"))
    }

    /// Changes a link's settings (`msg.header.index` names it).
    pub fn set_link(&mut self, msg: LinkMessage, what: &str) -> Result<(), NetlinkError> {
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, || what.to_string())
    }

    /// Sets link `index` up.
    pub fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.set_link(msg, &format!("setting {name} up"))
    }

    /// Deletes link `index` and waits for the kernel to finish; Ok when it is already gone.
    pub fn del_link(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        match self.ack(RouteNetlinkMessage::DelLink(del_link(index)), 0, || format!("deleting link {name}")) {
            Err(e) if matches!(e.errno(), Some(ENODEV) | Some(ENOENT)) => Ok(()),
            r => r,
        }
    }

    /// Adds `ip/len` to link `index` (IPv6 without duplicate address detection).
    pub fn add_address(&mut self, index: u32, ip: IpAddr, len: u8) -> Result<(), NetlinkError> {
        self.create(RouteNetlinkMessage::NewAddress(address(index, ip, len)), || format!("adding {ip}/{len}"))
    }

    /// Every address of link `index` (all families), with its prefix length.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let msg = AddressMessage::default();
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP, || "listing addresses".into())?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some((*ip, a.header.prefix_len)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a route; an identical route already there is success.
    pub fn add_route(&mut self, route: RouteMessage, what: &str) -> Result<(), NetlinkError> {
        self.create(RouteNetlinkMessage::NewRoute(route), || format!("adding route {what}"))
    }

    /// The main-table routes of one family.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v4 { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP, || "listing routes".into())?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.table == RouteHeader::RT_TABLE_MAIN => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Sets a permanent neighbour entry `ip` → `mac` on link `index` (replacing one there).
    pub fn set_neighbour(&mut self, index: u32, ip: IpAddr, mac: Mac) -> Result<(), NetlinkError> {
        let msg = neighbour(index, ip, mac);
        self.ack(RouteNetlinkMessage::NewNeighbour(msg), NLM_F_CREATE | NLM_F_REPLACE, || {
            format!("adding neighbour {ip}")
        })
    }

    /// The neighbour entries on link `index`, both families.
    pub fn neighbours(&mut self, index: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        let msg = NeighbourMessage::default();
        let replies =
            self.request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP, || "listing neighbours".into())?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index => {
                    n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(d) => neighbour_ip(d),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }
}

/// Sends `msg` from a forked child, on a socket of its own, and returns the
/// child at once: the caller does not wait while the kernel finishes the
/// request in the child's `sendmsg` (see `podnet` for why). The child closes
/// every inherited descriptor first (a runtime's stdout pipe, a store lock)
/// and exits after the send. None when this process has more than one
/// thread: forking is then unsafe, and the caller sends the request itself.
#[allow(unsafe_code)]
pub fn send_from_child(msg: RouteNetlinkMessage) -> Result<Option<nix::unistd::Pid>, NetlinkError> {
    if !single_threaded() {
        return Ok(None);
    }
    let mut nl = Netlink::open()?;
    let fd = nl.raw_fd();
    let (_, request) = nl.encode(msg, 0);
    // SAFETY: this process has one thread, and the child only makes raw
    // syscalls on a buffer prepared before the fork, then _exits.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            nix::libc::syscall(nix::libc::SYS_close_range, 0u32, (fd - 1) as u32, 0u32);
            nix::libc::syscall(nix::libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
            let sent = nix::libc::send(fd, request.as_ptr().cast(), request.len(), 0);
            nix::libc::_exit(if sent == request.len() as isize { 0 } else { 1 })
        },
        Ok(nix::unistd::ForkResult::Parent { child }) => Ok(Some(child)),
        Err(e) => Err(failed("forking the request's sender")(e.into())),
    }
}

/// Whether this process runs one thread.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim() == "1")))
        .unwrap_or(false)
}

/// An IP address out of a route attribute.
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(x) => Some(IpAddr::V4(*x)),
        RouteAddress::Inet6(x) => Some(IpAddr::V6(*x)),
        _ => None,
    }
}

/// An IP address out of a neighbour or FDB attribute (FDB dumps carry it as raw bytes).
pub fn neighbour_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// The MAC address a link reports (none for a link without a six-byte one).
pub fn mac_of(link: &LinkMessage) -> Option<Mac> {
    link.attributes.iter().find_map(|a| if let LinkAttribute::Address(m) = a { Mac::from_bytes(m) } else { None })
}

/// A veth pair `name` ↔ `peer` with `mtu`, `name` up, the peer created
/// directly in the namespace `peer_ns` (no move afterwards: moving a link
/// costs the kernel an RCU grace period and a barrier). The peer cannot be
/// created up (veth refuses to open an end before both exist: ENOTCONN).
pub fn veth_pair(name: &str, peer: &str, peer_ns: &impl AsRawFd, mtu: u32) -> LinkMessage {
    let mut peer_msg = LinkMessage::default();
    peer_msg.attributes.push(LinkAttribute::IfName(peer.to_string()));
    peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
    peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
    ]));
    msg
}

/// RTM_DELLINK for link `index`.
pub fn del_link(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// `ip` as a route attribute's address.
pub fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// `ip/len` on link `index`; IPv6 without DAD (the pod's address is unique by allocation).
pub fn address(index: u32, ip: IpAddr, len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(ip);
    msg.header.prefix_len = len;
    msg.header.index = index;
    if ip.is_ipv4() {
        msg.attributes.push(AddressAttribute::Local(ip));
    } else {
        msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg.attributes.push(AddressAttribute::Address(ip));
    msg
}

/// `dst/len [via gw] dev index` in the main table, link scope without a gateway.
pub fn route(dst: IpAddr, len: u8, gw: Option<IpAddr>, index: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst);
    msg.header.destination_prefix_length = len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = if gw.is_some() { RouteScope::Universe } else { RouteScope::Link };
    msg.header.kind = RouteType::Unicast;
    if len > 0 {
        msg.attributes.push(RouteAttribute::Destination(route_address(dst)));
    }
    if let Some(gw) = gw {
        msg.attributes.push(RouteAttribute::Gateway(route_address(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// What a route says, read once for every caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteParts {
    /// `None` for a default route.
    pub destination: Option<IpAddr>,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// The output link.
    pub oif: Option<u32>,
    /// The table attribute when present (tables above 255), else the header's.
    pub table: u32,
    pub onlink: bool,
}

pub fn route_parts(r: &RouteMessage) -> RouteParts {
    let mut parts = RouteParts {
        destination: None,
        prefix_len: r.header.destination_prefix_length,
        gateway: None,
        oif: None,
        table: u32::from(r.header.table),
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => parts.destination = route_ip(d),
            RouteAttribute::Gateway(g) => parts.gateway = route_ip(g),
            RouteAttribute::Oif(i) => parts.oif = Some(*i),
            RouteAttribute::Table(t) => parts.table = *t,
            _ => {}
        }
    }
    parts
}

/// `ip` as a neighbour or FDB attribute's address.
pub fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// A permanent neighbour entry `ip` → `mac` on link `index`.
pub fn neighbour(index: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(ip);
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    #[test]
    fn veth_pair_creates_the_host_end_up_and_the_peer_in_its_namespace() {
        let ns = File::open("/proc/self/ns/net").unwrap();
        let msg = veth_pair("carve0123456789", "eth0", &ns, 1450);
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        let back = LinkMessage::parse(bytes.as_slice()).unwrap();
        assert!(back.header.flags.contains(LinkFlags::Up) && back.header.change_mask.contains(LinkFlags::Up));
        let info = back.attributes.iter().find_map(|a| if let LinkAttribute::LinkInfo(i) = a { Some(i) } else { None });
        let peer = info
            .unwrap()
            .iter()
            .find_map(|i| if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = i { Some(p) } else { None })
            .expect("peer");
        assert!(peer.attributes.contains(&LinkAttribute::IfName("eth0".into())));
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(ns.as_raw_fd())));
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1450)));
    }

    #[test]
    fn routes_read_back_as_built() {
        let r = route("10.0.0.5".parse().unwrap(), 32, None, 7);
        let parts = route_parts(&r);
        assert_eq!(
            (parts.destination, parts.prefix_len, parts.gateway, parts.oif),
            (Some("10.0.0.5".parse().unwrap()), 32, None, Some(7))
        );
        assert_eq!((parts.table, parts.onlink), (254, false));
        assert_eq!(r.header.scope, RouteScope::Link);
        let d = route_parts(&route("::".parse().unwrap(), 0, Some("fe80::1".parse().unwrap()), 3));
        assert_eq!(
            (d.destination, d.prefix_len, d.gateway, d.oif),
            (None, 0, Some("fe80::1".parse().unwrap()), Some(3))
        );
    }
}
