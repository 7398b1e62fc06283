//! The pod's network plumbing, through netlink (rtnetlink): a veth pair, the
//! pod address as /32 (IPv6 /128), a default route via a link-local gateway
//! and the host route back.
//!
//! ```text
//!   pod netns                              host (node) netns
//!   eth0 10.244.1.5/32  ◀──── veth ────▶  carve1a2b3c4d5e
//!   default via 169.254.1.1 dev eth0          10.244.1.5/32 dev carve1a2b3c4d5e
//!   169.254.1.1 lladdr <host veth MAC>        10.244.1.5 lladdr <eth0 MAC> (static)
//!   (IPv6: default via fe80::1, same idea)
//! ```
//!
//! The gateway 169.254.1.1 exists nowhere: a permanent neighbour entry in the
//! pod maps it to the host veth's MAC, so every packet the pod routes lands
//! on the host, which routes it on (Calico's and Azure transparent mode's
//! scheme). Forwarding between interfaces is the agent's business.
//!
//! Namespaces: everything inside the pod happens on a dedicated OS thread
//! that `setns`es into the pod netns and never goes back (it ends); the
//! calling thread stays in the host netns. No tokio worker ever switches.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The pod's IPv4 next hop, answered by the host veth.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop, answered by the host veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("{action}: {source}")]
    Netlink { action: String, source: rtnetlink::Error },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Check(String),
}

impl PodNetError {
    /// True when the netlink error is `errno`.
    pub fn is_errno(&self, errno: i32) -> bool {
        matches!(self, PodNetError::Netlink { source, .. } if nl_errno(source) == Some(errno))
    }
}

fn nl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

const ENODEV: i32 = nix::libc::ENODEV;
const EEXIST: i32 = nix::libc::EEXIST;
const ENOENT: i32 = nix::libc::ENOENT;

fn nl(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetError {
    let action = action.into();
    move |source| PodNetError::Netlink { action, source }
}

/// The host-side veth name: "carve" + 10 hex digits of a hash of container id + ifname (15 chars).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: stable across releases and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("carve{:010x}", h & 0xff_ffff_ffff)
}

/// What the pod gets.
#[derive(Clone, Debug)]
pub struct PodNetSpec {
    pub netns: PathBuf,
    pub ifname: String,
    pub host_ifname: String,
    pub ips: Vec<IpAddr>,
    pub mtu: u32,
}

/// What was built, for the CNI result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetInfo {
    pub host_mac: String,
    pub pod_mac: String,
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Runs `f` with a netlink handle on a fresh current-thread runtime, in the
/// calling thread's netns.
fn with_handle<T, F, Fut>(f: F) -> Result<T, PodNetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, PodNetError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| PodNetError::Io(format!("starting the netlink runtime: {e}")))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| PodNetError::Io(format!("opening a netlink socket: {e}")))?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

fn open_netns(path: &Path) -> Result<File, PodNetError> {
    File::open(path).map_err(|source| PodNetError::Netns { path: path.to_path_buf(), source })
}

/// Runs `f` (with a netlink handle) inside the netns at `path`, on a dedicated
/// OS thread that enters it and ends afterwards.
fn in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T, PodNetError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, PodNetError>>,
{
    let ns = open_netns(path)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| PodNetError::Netns { path: path.to_path_buf(), source: std::io::Error::from(e) })?;
            with_handle(f)
        })
        .join()
        .unwrap_or_else(|_| Err(PodNetError::Io(format!("netns thread for {} panicked", path.display()))))
    })
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, PodNetError> {
    match h.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if nl_errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up link {name}"))(e)),
    }
}

fn mac_of(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| if let LinkAttribute::Address(m) = a { Some(m.clone()) } else { None })
        .unwrap_or_default()
}

fn host_route(ip: IpAddr, index: u32) -> RouteMessage {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, len)
        .expect("address family matches")
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

fn default_route(gw: IpAddr, index: u32) -> RouteMessage {
    let any: IpAddr = if gw.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .expect("address family matches")
        .gateway(gw)
        .expect("address family matches")
        .output_interface(index)
        .build()
}

async fn add_route(h: &Handle, msg: RouteMessage, what: String) -> Result<(), PodNetError> {
    match h.route().add(msg).execute().await {
        Err(e) if nl_errno(&e) == Some(EEXIST) => Ok(()),
        r => r.map_err(nl(what)),
    }
}

/// Pod side, run inside the pod netns: veth (host end moved out), address, routes, neighbour.
async fn pod_side(h: Handle, spec: &PodNetSpec, host_ns: &File) -> Result<PodNetInfo, PodNetError> {
    let ifname = &spec.ifname;
    if link_by_name(&h, ifname).await?.is_some() {
        return Err(PodNetError::Check(format!("interface {ifname} already exists in {}", spec.netns.display())));
    }
    h.link()
        .add(LinkVeth::new(ifname, &spec.host_ifname).mtu(spec.mtu).build())
        .execute()
        .await
        .map_err(nl(format!("creating veth {ifname} <-> {}", spec.host_ifname)))?;
    let result = async {
        let host = link_by_name(&h, &spec.host_ifname)
            .await?
            .ok_or_else(|| PodNetError::Check(format!("veth peer {} vanished", spec.host_ifname)))?;
        let host_mac = mac_of(&host);
        h.link()
            .set(LinkUnspec::new_with_index(host.header.index).mtu(spec.mtu).build())
            .execute()
            .await
            .map_err(nl(format!("setting MTU {} on {}", spec.mtu, spec.host_ifname)))?;
        h.link()
            .set(LinkUnspec::new_with_index(host.header.index).setns_by_fd(host_ns.as_raw_fd()).build())
            .execute()
            .await
            .map_err(nl(format!("moving {} to the host netns", spec.host_ifname)))?;
        let pod =
            link_by_name(&h, ifname).await?.ok_or_else(|| PodNetError::Check(format!("veth {ifname} vanished")))?;
        let index = pod.header.index;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {ifname} up")))?;
        for ip in &spec.ips {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            let mut req = h.address().add(index, *ip, len);
            if ip.is_ipv6() {
                req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute().await.map_err(nl(format!("adding {ip}/{len} to {ifname}")))?;
        }
        let mut families_done = Vec::new();
        for ip in &spec.ips {
            let gw: IpAddr = if ip.is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() };
            if families_done.contains(&gw) {
                continue;
            }
            families_done.push(gw);
            if gw.is_ipv4() {
                add_route(&h, host_route(gw, index), format!("adding route {gw}/32 dev {ifname}")).await?;
            }
            match h
                .neighbours()
                .add(index, gw)
                .link_layer_address(&host_mac)
                .state(NeighbourState::Permanent)
                .execute()
                .await
            {
                Err(e) if nl_errno(&e) == Some(EEXIST) => {}
                r => r.map_err(nl(format!("adding neighbour {gw} on {ifname}")))?,
            }
            add_route(&h, default_route(gw, index), format!("adding default route via {gw} dev {ifname}")).await?;
        }
        Ok(PodNetInfo { host_mac: format_mac(&host_mac), pod_mac: format_mac(&mac_of(&pod)) })
    }
    .await;
    if result.is_err() {
        // Roll back: deleting either end removes both (the host end may have moved already).
        if let Ok(Some(l)) = link_by_name(&h, ifname).await {
            let _ = h.link().del(l.header.index).execute().await;
        }
    }
    result
}

/// Host side, in the calling thread's netns: host veth up, route and neighbour per pod IP.
async fn host_side(h: Handle, spec: &PodNetSpec, pod_mac: &[u8]) -> Result<(), PodNetError> {
    let name = &spec.host_ifname;
    let link = link_by_name(&h, name)
        .await?
        .ok_or_else(|| PodNetError::Check(format!("host veth {name} not found after the move")))?;
    let index = link.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("setting {name} up")))?;
    for ip in &spec.ips {
        add_route(&h, host_route(*ip, index), format!("adding host route {ip} dev {name}")).await?;
        match h
            .neighbours()
            .add(index, *ip)
            .link_layer_address(pod_mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
        {
            Err(e) if nl_errno(&e) == Some(EEXIST) => {}
            r => r.map_err(nl(format!("adding neighbour {ip} on {name}")))?,
        }
    }
    Ok(())
}

fn parse_mac(s: &str) -> Vec<u8> {
    s.split(':').filter_map(|p| u8::from_str_radix(p, 16).ok()).collect()
}

/// Deletes the host veth `name` in the calling thread's netns; Ok when it is already gone.
pub fn delete_host_veth(name: &str) -> Result<(), PodNetError> {
    with_handle(|h| async move {
        let Some(link) = link_by_name(&h, name).await? else { return Ok(()) };
        match h.link().del(link.header.index).execute().await {
            Err(e) if matches!(nl_errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(()),
            r => r.map_err(nl(format!("deleting host veth {name}"))),
        }
    })
}

/// Builds the pod's interface, addresses and routes and the host side. On
/// failure, whatever was created is removed again.
pub fn setup(spec: &PodNetSpec) -> Result<PodNetInfo, PodNetError> {
    // Validate before mutating: both namespaces open, a leftover host veth of
    // this same attachment (same hashed name) is removed first.
    let host_ns = File::open("/proc/self/ns/net")
        .map_err(|source| PodNetError::Netns { path: "/proc/self/ns/net".into(), source })?;
    open_netns(&spec.netns)?;
    delete_host_veth(&spec.host_ifname)?;
    let info = in_netns(&spec.netns, |h| async { pod_side(h, spec, &host_ns).await })?;
    let pod_mac = parse_mac(&info.pod_mac);
    if let Err(e) = with_handle(|h| async { host_side(h, spec, &pod_mac).await }) {
        let _ = delete_host_veth(&spec.host_ifname);
        return Err(e);
    }
    Ok(info)
}

fn route_matches(r: &RouteMessage, dst: IpAddr, len: u8, gw: Option<IpAddr>, oif: u32) -> bool {
    let mut d = None;
    let mut g = None;
    let mut o = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(x)) => d = Some(IpAddr::V4(*x)),
            RouteAttribute::Destination(RouteAddress::Inet6(x)) => d = Some(IpAddr::V6(*x)),
            RouteAttribute::Gateway(RouteAddress::Inet(x)) => g = Some(IpAddr::V4(*x)),
            RouteAttribute::Gateway(RouteAddress::Inet6(x)) => g = Some(IpAddr::V6(*x)),
            RouteAttribute::Oif(i) => o = Some(*i),
            _ => {}
        }
    }
    let d = d.unwrap_or(if dst.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() });
    r.header.destination_prefix_length == len && d == dst && g == gw && o == Some(oif)
}

async fn routes(h: &Handle, v4: bool) -> Result<Vec<RouteMessage>, PodNetError> {
    let msg = if v4 {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    };
    h.route().get(msg).execute().try_collect().await.map_err(nl("listing routes"))
}

/// CHECK: the pod interface has every address and the default route(s); the
/// host veth exists, is up and routes every pod address.
pub fn check(spec: &PodNetSpec) -> Result<(), PodNetError> {
    in_netns(&spec.netns, |h| async move {
        let ifname = &spec.ifname;
        let link = link_by_name(&h, ifname)
            .await?
            .ok_or_else(|| PodNetError::Check(format!("interface {ifname} missing in {}", spec.netns.display())))?;
        let index = link.header.index;
        let have: Vec<(IpAddr, u8)> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl(format!("listing addresses of {ifname}")))?
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect();
        for ip in &spec.ips {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            if !have.contains(&(*ip, len)) {
                return Err(PodNetError::Check(format!("address {ip}/{len} missing on {ifname}")));
            }
            let gw: IpAddr = if ip.is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() };
            let any: IpAddr = if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            if !routes(&h, ip.is_ipv4()).await?.iter().any(|r| route_matches(r, any, 0, Some(gw), index)) {
                return Err(PodNetError::Check(format!("default route via {gw} dev {ifname} missing")));
            }
        }
        Ok(())
    })?;
    with_handle(|h| async move {
        let name = &spec.host_ifname;
        let link =
            link_by_name(&h, name).await?.ok_or_else(|| PodNetError::Check(format!("host veth {name} missing")))?;
        if !link.header.flags.contains(LinkFlags::Up) {
            return Err(PodNetError::Check(format!("host veth {name} is down")));
        }
        for ip in &spec.ips {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            if !routes(&h, ip.is_ipv4()).await?.iter().any(|r| route_matches(r, *ip, len, None, link.header.index)) {
                return Err(PodNetError::Check(format!("host route {ip}/{len} dev {name} missing")));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_is_stable_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("carve"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(parse_mac(&format_mac(&[0xee, 1, 2, 3, 4, 0xff])), vec![0xee, 1, 2, 3, 4, 0xff]);
    }
}
