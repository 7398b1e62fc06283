//! The pod's network plumbing, through netlink ([`crate::netlink`]): a veth
//! pair, the pod address as /32 (IPv6 /128), a default route via a
//! link-local gateway and the host route back.
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
//! Cost, and why it is shaped so (kernel 6.x, measured by `make bench-cni`):
//! - ADD creates the veth in the host namespace with its peer placed in the
//!   pod's, in one RTM_NEWLINK: moving a link between
//!   namespaces afterwards costs an RCU grace period and barrier (12–20 ms).
//! - DEL: RTM_DELLINK unlists the link and flushes its routes and neighbours
//!   in well under a millisecond, then blocks its caller in the kernel's
//!   `rcu_barrier` (16–24 ms) before returning. [`delete_host_veth`] lets a
//!   forked child wait that out: it returns once the link, its routes and its
//!   neighbour entries are gone from the host's tables — all a runtime can
//!   observe of a finished delete — and a new ADD of the same attachment
//!   (same veth name) succeeds at once. If they are not gone within
//!   [`DETACHED_DELETE_WAIT`], it waits for the child, as a synchronous delete would.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkFlags;
use nix::sys::wait::{WaitPidFlag, waitpid};

use crate::netlink::{self, Netlink, NetlinkError, mac_of, route, route_parts};

/// The pod's IPv4 next hop, answered by the host veth.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop, answered by the host veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// How long a detached delete may take to unlist the link before DEL waits for it.
pub const DETACHED_DELETE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Check(String),
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

fn open_netns(path: &Path) -> Result<File, PodNetError> {
    netlink::open_netns(path).map_err(|source| PodNetError::Netns { path: path.to_path_buf(), source })
}

fn gateway(ip: &IpAddr) -> IpAddr {
    if ip.is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() }
}

fn host_len(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() }
}

/// Builds the pod's interface, addresses and routes and the host side. On
/// failure, whatever was created is removed again.
pub fn setup(spec: &PodNetSpec) -> Result<PodNetInfo, PodNetError> {
    let pod_ns = open_netns(&spec.netns)?;
    let mut host = Netlink::open()?;
    let mut pod = Netlink::open_in(&pod_ns)?;
    let (ifname, host_ifname) = (&spec.ifname, &spec.host_ifname);
    if pod.link_by_name(ifname)?.is_some() {
        return Err(PodNetError::Check(format!("interface {ifname} already exists in {}", spec.netns.display())));
    }
    // A leftover host veth of this same attachment (same hashed name) goes first.
    if let Some(old) = host.link_by_name(host_ifname)? {
        host.del_link(old.header.index, host_ifname)?;
    }
    host.add_link(
        netlink::veth_pair(host_ifname, ifname, &pod_ns, spec.mtu),
        &format!("veth {host_ifname} <-> {ifname} in {}", spec.netns.display()),
    )?;
    let result = configure(&mut host, &mut pod, spec);
    if result.is_err() {
        // Deleting the host end removes both.
        if let Ok(Some(l)) = host.link_by_name(host_ifname) {
            let _ = host.del_link(l.header.index, host_ifname);
        }
    }
    result
}

fn configure(host: &mut Netlink, pod: &mut Netlink, spec: &PodNetSpec) -> Result<PodNetInfo, PodNetError> {
    let (ifname, host_ifname) = (&spec.ifname, &spec.host_ifname);
    let host_link =
        host.link_by_name(host_ifname)?.ok_or_else(|| PodNetError::Check(format!("veth {host_ifname} vanished")))?;
    let pod_link = pod.link_by_name(ifname)?.ok_or_else(|| PodNetError::Check(format!("veth {ifname} vanished")))?;
    let no_mac = |name: &str| PodNetError::Check(format!("veth {name} reports no MAC address"));
    let (host_index, host_mac) = (host_link.header.index, mac_of(&host_link).ok_or_else(|| no_mac(host_ifname))?);
    let (pod_index, pod_mac) = (pod_link.header.index, mac_of(&pod_link).ok_or_else(|| no_mac(ifname))?);
    pod.set_up(pod_index, ifname)?;
    for ip in &spec.ips {
        pod.add_address(pod_index, *ip, host_len(ip))?;
    }
    let mut families_done = Vec::new();
    for ip in &spec.ips {
        let gw = gateway(ip);
        if families_done.contains(&gw) {
            continue;
        }
        families_done.push(gw);
        if gw.is_ipv4() {
            pod.add_route(route(gw, 32, None, pod_index), &format!("{gw}/32 dev {ifname}"))?;
        }
        pod.set_neighbour(pod_index, gw, host_mac)?;
        pod.add_route(route(unspecified(gw.is_ipv4()), 0, Some(gw), pod_index), &format!("default via {gw}"))?;
    }
    for ip in &spec.ips {
        let len = host_len(ip);
        host.add_route(route(*ip, len, None, host_index), &format!("{ip}/{len} dev {host_ifname}"))?;
        host.set_neighbour(host_index, *ip, pod_mac)?;
    }
    Ok(PodNetInfo { host_mac: host_mac.to_string(), pod_mac: pod_mac.to_string() })
}

/// How [`delete_host_veth`] deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delete {
    /// RTM_DELLINK from this process, returning when the kernel does.
    Synchronous,
    /// RTM_DELLINK from a forked child; returns once the link, its routes and
    /// neighbours are gone (falls back to waiting for the child). Only a
    /// single-threaded process forks; others delete synchronously.
    Detached,
}

/// Deletes the host veth `name` in the calling thread's netns (the pod's end
/// goes with it); Ok when it is already gone.
pub fn delete_host_veth(name: &str, how: Delete) -> Result<(), PodNetError> {
    let mut nl = Netlink::open()?;
    let Some(link) = nl.link_by_name(name)? else { return Ok(()) };
    let index = link.header.index;
    if how == Delete::Synchronous {
        return Ok(nl.del_link(index, name)?);
    }
    let Some(child) = netlink::send_from_child(RouteNetlinkMessage::DelLink(netlink::del_link(index)))? else {
        return Ok(nl.del_link(index, name)?);
    };
    tracing::debug!(link = name, child = child.as_raw(), "deleting the host veth from a child (detached)");
    let deadline = Instant::now() + DETACHED_DELETE_WAIT;
    loop {
        if gone(&mut nl, index)? {
            // Reaped now if it is done already; else re-parented when this process exits.
            let _ = waitpid(child, Some(WaitPidFlag::WNOHANG));
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = waitpid(child, None);
            if gone(&mut nl, index)? {
                return Ok(());
            }
            return Err(PodNetError::Check(format!("host veth {name} still present after its delete")));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Whether link `index` is gone with every route and neighbour entry on it.
fn gone(nl: &mut Netlink, index: u32) -> Result<bool, PodNetError> {
    if nl.link_by_index(index)?.is_some() {
        return Ok(false);
    }
    for v4 in [true, false] {
        if nl.routes(v4)?.iter().any(|r| route_parts(r).oif == Some(index)) {
            return Ok(false);
        }
    }
    Ok(nl.neighbours(index)?.is_empty())
}

/// CHECK: the pod interface has every address and the default route(s); the
/// host veth exists, is up and routes every pod address.
pub fn check(spec: &PodNetSpec) -> Result<(), PodNetError> {
    let pod_ns = open_netns(&spec.netns)?;
    let mut pod = Netlink::open_in(&pod_ns)?;
    let ifname = &spec.ifname;
    let link = pod
        .link_by_name(ifname)?
        .ok_or_else(|| PodNetError::Check(format!("interface {ifname} missing in {}", spec.netns.display())))?;
    let index = link.header.index;
    let have = pod.addresses(index)?;
    for ip in &spec.ips {
        let len = host_len(ip);
        if !have.contains(&(*ip, len)) {
            return Err(PodNetError::Check(format!("address {ip}/{len} missing on {ifname}")));
        }
        let gw = gateway(ip);
        let default = |r: &_| {
            let r = route_parts(r);
            r.destination.is_none_or(|d| d.is_unspecified())
                && r.prefix_len == 0
                && r.gateway == Some(gw)
                && r.oif == Some(index)
        };
        if !pod.routes(ip.is_ipv4())?.iter().any(default) {
            return Err(PodNetError::Check(format!("default route via {gw} dev {ifname} missing")));
        }
    }
    let mut host = Netlink::open()?;
    let name = &spec.host_ifname;
    let link = host.link_by_name(name)?.ok_or_else(|| PodNetError::Check(format!("host veth {name} missing")))?;
    if !link.header.flags.contains(LinkFlags::Up) {
        return Err(PodNetError::Check(format!("host veth {name} is down")));
    }
    for ip in &spec.ips {
        let len = host_len(ip);
        let host_route = |r: &_| {
            let r = route_parts(r);
            (r.destination, r.prefix_len, r.gateway, r.oif) == (Some(*ip), len, None, Some(link.header.index))
        };
        if !host.routes(ip.is_ipv4())?.iter().any(host_route) {
            return Err(PodNetError::Check(format!("host route {ip}/{len} dev {name} missing")));
        }
    }
    Ok(())
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
}
