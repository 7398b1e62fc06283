//! carve-agent's dataplane: the core decides ([`plan`]), the edges act
//! ([`netlink`] for links, addresses, routes, neighbours and FDB entries;
//! [`nft`] for SNAT).
//!
//! ```text
//!   NodeState + peers ──plan::plan()──▶ Desired ──apply()──▶ diff against the kernel ──▶ netlink + nft
//! ```
//!
//! [`apply`] is a reconcile: it reads what the kernel holds, removes what is
//! carve's and not wanted, adds what is missing, and leaves the rest alone.
//! Running it twice changes nothing; running it after a restart removes stale
//! entries and duplicates nothing, and pods' own veths and /32 routes (not
//! carve's route protocol) are never touched.

pub mod nft;
pub mod plan;
pub mod worker;

use std::collections::BTreeSet;

use crate::netlink::Netlink;
use plan::{Changes, Desired, Family, FdbEntry, Neighbour, Route};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("{0}")]
    Conflict(String),
    #[error("entering network namespace {}: {source}", path.display())]
    Netns {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error("enabling IP forwarding ({}): {source}", path.display())]
    Forwarding {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enabling proxy ARP on the underlay ({}): {source}", path.display())]
    ProxyArp {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} dataplane step(s) failed: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Partial(Vec<DataplaneError>),
}

/// What one [`apply`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub routes: Changes<Route>,
    pub neighbours: Changes<Neighbour>,
    pub fdb: Changes<FdbEntry>,
    /// The VXLAN device was deleted (VNet mode after Overlay, or settings the kernel cannot change).
    pub vxlan_removed: bool,
}

impl Applied {
    /// Nothing was added or removed (the SNAT tables are replaced atomically every time and not counted).
    pub fn is_noop(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty() && !self.vxlan_removed
    }
}

/// `proc_sys` is /proc/sys, or a writable bind of the host's (containers get /proc/sys read-only).
fn ensure_forwarding(desired: &Desired, proc_sys: &std::path::Path) -> Result<(), DataplaneError> {
    for s in &desired.snat {
        let path = proc_sys.join(match s.family {
            Family::V4 => "net/ipv4/ip_forward",
            Family::V6 => "net/ipv6/conf/all/forwarding",
        });
        let on = std::fs::read_to_string(&path).map(|v| v.trim() == "1").unwrap_or(false);
        if !on {
            std::fs::write(&path, "1").map_err(|source| DataplaneError::Forwarding { path, source })?;
        }
    }
    Ok(())
}

/// VNet: `net.ipv4.conf.<link>.proxy_arp = 1` on the link holding `node_ip`
/// (written only when it is not set already); no link holds it: nothing to do.
fn ensure_proxy_arp(
    nl: &mut Netlink,
    node_ip: std::net::IpAddr,
    proc_sys: &std::path::Path,
) -> Result<(), DataplaneError> {
    let Some(link) = nl.link_name_of_address(node_ip)? else { return Ok(()) };
    let path = proc_sys.join("net/ipv4/conf").join(&link).join("proxy_arp");
    let on = std::fs::read_to_string(&path).map(|v| v.trim() == "1").unwrap_or(false);
    if !on {
        std::fs::write(&path, "1").map_err(|source| DataplaneError::ProxyArp { path, source })?;
        tracing::info!(%link, "proxy ARP on: hosts on the underlay reach this node's pods");
    }
    Ok(())
}

/// Reconciles the kernel (the namespace of `nl`'s socket, and of the calling
/// thread for `nft` and the forwarding sysctls) with `desired`. Keeps going
/// after a failed step and reports every failure; the next call retries.
/// `vxlan_device` is the overlay device name, removed when `desired` has none;
/// the forwarding sysctls are found under `proc_sys`.
pub fn apply(
    nl: &mut Netlink,
    desired: &Desired,
    vxlan_device: &str,
    proc_sys: &std::path::Path,
) -> Result<Applied, DataplaneError> {
    let mut errors = Vec::new();
    ensure_forwarding(desired, proc_sys)?;
    if let Some(ip) = desired.proxy_arp
        && let Err(e) = ensure_proxy_arp(nl, ip, proc_sys)
    {
        errors.push(e);
    }

    let mut vxlan_removed = false;
    let vxlan = match &desired.vxlan {
        Some(dev) => {
            let index = nl.ensure_vxlan(dev)?;
            nl.ensure_addresses(dev, index)?;
            Some((dev.name.as_str(), index))
        }
        None => {
            vxlan_removed = nl.remove_vxlan(vxlan_device)?;
            None
        }
    };

    // Routes: drop stale ones first, add the missing ones last (after their neighbours exist).
    let observed = nl.carve_routes(vxlan)?;
    let want: BTreeSet<&Route> = desired.routes.iter().collect();
    let have: BTreeSet<&Route> = observed.iter().filter_map(|(r, _)| r.as_ref()).collect();
    let mut routes = Changes {
        add: desired.routes.iter().filter(|r| !have.contains(r)).cloned().collect::<Vec<_>>(),
        remove: Vec::new(),
    };
    for (route, msg) in observed {
        if route.as_ref().is_some_and(|r| want.contains(r)) {
            continue;
        }
        let shown = route.clone().unwrap_or_else(|| Route {
            destination: Default::default(),
            gateway: std::net::Ipv4Addr::UNSPECIFIED.into(),
            onlink_device: Some("(unrecognised carve route)".into()),
        });
        match nl.delete_carve_route(&shown, msg) {
            Ok(()) => routes.remove.push(shown),
            Err(e) => errors.push(e.into()),
        }
    }

    let mut neighbours = Changes { add: vec![], remove: vec![] };
    let mut fdb = Changes { add: vec![], remove: vec![] };
    if let Some((name, index)) = vxlan {
        let have_fdb = nl.fdb(index)?;
        let keys: Vec<FdbEntry> = have_fdb.iter().map(|(k, _)| k.clone()).collect();
        fdb = plan::diff(&desired.fdb, &keys);
        for (key, msg) in have_fdb.into_iter().filter(|(k, _)| fdb.remove.contains(k)) {
            if let Err(e) = nl.delete_neighbour(format!("FDB entry {} dst {} on {name}", key.mac, key.destination), msg)
            {
                errors.push(e.into());
            }
        }
        for entry in &fdb.add {
            if let Err(e) = nl.add_fdb(name, index, entry) {
                errors.push(e.into());
            }
        }

        let have_neigh = nl.neighbour_entries(index)?;
        let keys: Vec<Neighbour> = have_neigh.iter().map(|(k, _)| k.clone()).collect();
        neighbours = plan::diff(&desired.neighbours, &keys);
        for (key, msg) in have_neigh.into_iter().filter(|(k, _)| neighbours.remove.contains(k)) {
            if let Err(e) = nl.delete_neighbour(format!("neighbour {} lladdr {} on {name}", key.ip, key.mac), msg) {
                errors.push(e.into());
            }
        }
        for n in &neighbours.add {
            if let Err(e) = nl.add_neighbour(name, index, n) {
                errors.push(e.into());
            }
        }
    }

    for route in &routes.add {
        if let Err(e) = nl.add_carve_route(route, vxlan.map(|(_, i)| i)) {
            errors.push(e.into());
        }
    }

    if let Err(e) = nft::apply(&desired.snat) {
        errors.push(e.into());
    }

    if errors.is_empty() {
        Ok(Applied { routes, neighbours, fdb, vxlan_removed })
    } else {
        Err(DataplaneError::Partial(errors))
    }
}
