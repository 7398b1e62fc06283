//! A dynamic pool's blocks on the node: demand, the [`scaler`](super::scaler)
//! and the release handshake with the controller.
//!
//! ```text
//!   IPAM store (allocations, marks) + waiting ADDs + NNC ──plan()──▶ marks, spec
//!   give back:  store lock ▸ block empty? ▸ mark (fsync) ▸ unlock ▸ state file without it ▸ spec.releases
//!   take back:  spec without it (conditioned on the resourceVersion that showed it in status)
//!               ▸ 200: unmark, state file with it   ▸ 409: the controller moved first, the mark stays
//! ```
//!
//! A block is *releasing* while it is marked in the store or named in
//! spec.releases with the allocation ID it holds in status: carve-ipam never
//! allocates from it and the state file leaves it out. A mark goes when its
//! block leaves status. Every spec write is a server-side apply under
//! [`FIELD_MANAGER`](super::FIELD_MANAGER) carrying the resourceVersion the
//! agent decided from: it never creates the NodeNetworkConfig, and a decision
//! made on an outdated view is refused (409) and made again on the next pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use carve_crds::{
    AllocationStrategy, BlockRelease, FamilyCounts, IpFamily, NodeBlock, NodeNetworkConfigSpec, NodeNetworkConfigStatus,
};
use ipnet::IpNet;

use super::scaler::{self, BlockUse, FamilyPlan, FamilyUse, Params};
use crate::ipam::alloc::{Allocations, NodePool};
use crate::state::NodeState;

/// The blocks in status the node is giving back: marked in the store, or
/// named in spec.releases with the allocation ID they hold now.
pub fn releasing(
    status: &NodeNetworkConfigStatus,
    spec: &NodeNetworkConfigSpec,
    marks: &BTreeSet<IpNet>,
) -> BTreeSet<IpNet> {
    status
        .blocks
        .iter()
        .filter(|b| {
            let Ok(net) = b.cidr.parse::<IpNet>() else { return false };
            marks.contains(&net)
                || spec
                    .releases
                    .iter()
                    .any(|r| r.cidr == b.cidr && b.allocation_id.as_deref() == Some(&r.allocation_id))
        })
        .filter_map(|b| b.cidr.parse().ok())
        .collect()
}

/// status.blocks less the releasing ones, in grant order: the state file's blocks.
pub fn active_blocks(status: &NodeNetworkConfigStatus, releasing: &BTreeSet<IpNet>) -> Vec<NodeBlock> {
    status.blocks.iter().filter(|b| b.cidr.parse::<IpNet>().is_ok_and(|n| !releasing.contains(&n))).cloned().collect()
}

/// What one pass decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// The store's marks after the pass (before any take-back).
    pub marks: BTreeSet<IpNet>,
    /// The spec to apply (requests and the releases still wanted).
    pub spec: NodeNetworkConfigSpec,
    /// Releasing blocks to take back once `spec` (which no longer names them) is written.
    pub take_back: BTreeSet<IpNet>,
    /// Demand per family this pass saw (allocated + waiting), for the release window.
    pub demand: BTreeMap<IpFamily, u64>,
}

/// Usable addresses per block of `status` (size less status.reservedIPs in it), in order.
pub(crate) fn usable(status: &NodeNetworkConfigStatus) -> Vec<(IpNet, u64)> {
    let state = NodeState {
        node: String::new(),
        mode: status.mode.unwrap_or(carve_crds::PoolMode::VNet),
        strategy: AllocationStrategy::Dynamic,
        blocks: status.blocks.clone(),
        reserved_ips: status.reserved_ips.clone(),
        cluster_pod_cidrs: vec![],
        non_masquerade_cidrs: vec![],
        mtu: 0,
        node_ip: String::new(),
    };
    match NodePool::from_state(&state, &[]) {
        Ok(pool) => pool.blocks.iter().map(|b| (b.net, b.usable())).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot size this node's blocks; the scaler waits for a valid status");
            vec![]
        }
    }
}

/// The request to write: the scaler's `wanted`, or the `written` one while
/// the controller would do nothing about either (the active blocks' `usable`
/// addresses cover both) and they differ by less than `margin` (half a block
/// by default). So a node does not rewrite its NNC, and the controller not
/// reconcile it, for every pod that comes or goes; Azure's CNS writes its
/// request in batches for the same reason. A release rewrites it anyway.
fn settled_request(wanted: u64, written: Option<i64>, usable: u64, margin: u64) -> i64 {
    let wanted_i = i64::try_from(wanted).unwrap_or(i64::MAX);
    match written.and_then(|w| u64::try_from(w).ok()) {
        Some(w) if w <= usable && wanted <= usable && w.abs_diff(wanted) < margin => w as i64,
        _ => wanted_i,
    }
}

/// The pass, pure: from status, spec, the store's allocations and marks,
/// waiting ADDs and the recent demand peak per family. Marks of blocks gone
/// from status are dropped, marks missing for blocks spec names are added
/// back (an older carve-ipam may have saved over them); outside dynamic pools
/// every releasing block is taken back and nothing is requested.
pub fn plan(
    status: &NodeNetworkConfigStatus,
    spec: &NodeNetworkConfigSpec,
    store: &Allocations,
    waiting: &BTreeMap<IpFamily, u64>,
    recent_peaks: &BTreeMap<IpFamily, u64>,
) -> Decision {
    let mut releasing = releasing(status, spec, &store.releasing);
    let in_use = |net: &IpNet| store.count_in(net) > 0;
    // A block named in spec that holds a pod must come back, whatever demand says.
    let mut take_back: BTreeSet<IpNet> = releasing.iter().filter(|n| in_use(n)).copied().collect();
    let dynamic = status.strategy == Some(AllocationStrategy::Dynamic);
    let mut requested = FamilyCounts::default();
    let mut demands = BTreeMap::new();
    if !dynamic {
        take_back.extend(releasing.iter().copied());
    } else {
        let params = Params::from_status(status.scaler.as_ref());
        let sizes = usable(status);
        let ids: BTreeMap<IpNet, bool> =
            status.blocks.iter().filter_map(|b| Some((b.cidr.parse().ok()?, b.allocation_id.is_some()))).collect();
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            let blocks: Vec<&(IpNet, u64)> = sizes.iter().filter(|(n, _)| IpFamily::of(n) == family).collect();
            let Some((first, _)) = blocks.first() else { continue };
            let use_of = |(net, usable): &(IpNet, u64)| BlockUse {
                cidr: *net,
                usable: *usable,
                allocated: store.count_in(net) as u64,
            };
            let demand = store.by_ip.keys().filter(|ip| family_of(ip) == family).count() as u64
                + waiting.get(&family).copied().unwrap_or(0);
            let f = FamilyUse {
                family,
                block_size: u64::try_from(carve_crds::net::size(first)).unwrap_or(u64::MAX),
                active: blocks.iter().filter(|(n, _)| !releasing.contains(n)).map(|b| use_of(b)).collect(),
                releasing: blocks.iter().filter(|(n, _)| releasing.contains(n)).map(|b| use_of(b)).collect(),
                demand,
                recent_peak: recent_peaks.get(&family).copied().unwrap_or(0),
            };
            demands.insert(family, demand);
            let FamilyPlan { requested: n, release, take_back: back, .. } = scaler::plan(&params, &f);
            let written = spec.requested_ips.as_ref().map(|r| r.get(family));
            let n = Some(settled_request(n, written, f.usable(), params.request_margin(f.block_size)));
            match family {
                IpFamily::IPv4 => requested.ipv4 = n,
                IpFamily::IPv6 => requested.ipv6 = n,
            }
            take_back.extend(back);
            // Only a grant the controller can recognise (an allocation ID) is given back.
            if let Some(net) = release.filter(|n| ids.get(n) == Some(&true) && !in_use(n)) {
                releasing.insert(net);
            }
        }
    }
    let releases = status
        .blocks
        .iter()
        .filter_map(|b| {
            let net: IpNet = b.cidr.parse().ok()?;
            let id = b.allocation_id.clone()?;
            (releasing.contains(&net) && !take_back.contains(&net))
                .then(|| BlockRelease { cidr: b.cidr.clone(), allocation_id: id })
        })
        .collect();
    Decision {
        // A mark is only added for a block proven empty; one in use is left unmarked.
        marks: releasing.iter().filter(|n| !in_use(n) || store.releasing.contains(n)).copied().collect(),
        spec: NodeNetworkConfigSpec { requested_ips: dynamic.then_some(requested), releases },
        take_back,
        demand: demands,
    }
}

fn family_of(ip: &IpAddr) -> IpFamily {
    if ip.is_ipv4() { IpFamily::IPv4 } else { IpFamily::IPv6 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::alloc::Owner;
    use carve_crds::{PoolMode, Scaler};

    fn status(blocks: &[(&str, &str)]) -> NodeNetworkConfigStatus {
        NodeNetworkConfigStatus {
            mode: Some(PoolMode::VNet),
            strategy: Some(AllocationStrategy::Dynamic),
            blocks: blocks
                .iter()
                .map(|(c, id)| NodeBlock {
                    cidr: c.to_string(),
                    family: IpFamily::IPv4,
                    gateway: None,
                    allocation_id: Some(id.to_string()),
                })
                .collect(),
            scaler: Some(Scaler {
                request_threshold_percent: 50,
                release_threshold_percent: 150,
                max_blocks_per_node: 8,
            }),
            ..Default::default()
        }
    }

    fn store(ips: &[&str], marks: &[&str]) -> Allocations {
        let mut a = Allocations::default();
        for (i, ip) in ips.iter().enumerate() {
            a.by_ip.insert(ip.parse().unwrap(), Owner::new(format!("c{i}"), "eth0"));
        }
        a.releasing = marks.iter().map(|m| m.parse().unwrap()).collect();
        a
    }

    fn nets(s: &[&str]) -> BTreeSet<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn release(cidr: &str, id: &str) -> BlockRelease {
        BlockRelease { cidr: cidr.into(), allocation_id: id.into() }
    }

    const THREE: [(&str, &str); 3] = [("10.1.0.0/28", "a"), ("10.1.0.16/28", "b"), ("10.1.0.32/28", "c")];

    #[test]
    fn requests_demand_plus_margin_including_waiting_adds() {
        let st = status(&THREE[..1]);
        let d = plan(
            &st,
            &Default::default(),
            &store(&["10.1.0.1", "10.1.0.2"], &[]),
            &[(IpFamily::IPv4, 3)].into(),
            &BTreeMap::new(),
        );
        assert_eq!(d.spec.requested_ips, Some(FamilyCounts { ipv4: Some(5 + 8), ipv6: None }));
        assert!(d.spec.releases.is_empty() && d.marks.is_empty() && d.take_back.is_empty());
    }

    #[test]
    fn a_covered_request_is_rewritten_only_when_it_moves_half_a_block() {
        // Three /28s, 47 usable (10.1.0.0 is reserved); `written` in spec, `n` pods.
        let request = |written: i64, n: usize| {
            let spec = NodeNetworkConfigSpec {
                requested_ips: Some(FamilyCounts { ipv4: Some(written), ipv6: None }),
                ..Default::default()
            };
            let ips: Vec<String> = (1..=n).map(|i| format!("10.1.0.{i}")).collect();
            let d = plan(
                &status(&THREE),
                &spec,
                &store(&ips.iter().map(String::as_str).collect::<Vec<_>>(), &[]),
                &BTreeMap::new(),
                &[(IpFamily::IPv4, 40)].into(),
            );
            d.spec.requested_ips.and_then(|r| r.ipv4)
        };
        assert_eq!(request(13, 9), Some(13), "9 pods want 17: covered, less than half a block more");
        assert_eq!(request(13, 13), Some(21), "13 pods want 21: half a block more than written");
        assert_eq!(request(21, 14), Some(21), "14 pods want 22: covered, close to what is written");
        assert_eq!(request(21, 5), Some(13), "5 pods want 13: half a block less than written");
        assert_eq!(settled_request(50, Some(13), 47, 8), 50, "beyond the blocks: the controller must see it");
        assert_eq!(settled_request(10, Some(50), 47, 8), 10, "an unmet request written before is replaced");
    }

    #[test]
    fn gives_back_the_newest_empty_block_fenced_by_its_allocation_id() {
        let d =
            plan(&status(&THREE), &Default::default(), &store(&["10.1.0.1"], &[]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(d.marks, nets(&["10.1.0.32/28"]));
        assert_eq!(d.spec.releases, [release("10.1.0.32/28", "c")]);
        // The block is out of the state file from now on.
        let active: Vec<String> = active_blocks(&status(&THREE), &d.marks).into_iter().map(|b| b.cidr).collect();
        assert_eq!(active, ["10.1.0.0/28", "10.1.0.16/28"]);
    }

    #[test]
    fn takes_back_when_demand_returns_and_drops_marks_of_blocks_gone() {
        let spec = NodeNetworkConfigSpec { releases: vec![release("10.1.0.32/28", "c")], ..Default::default() };
        let busy: Vec<String> = (1..=12).map(|i| format!("10.1.0.{i}")).collect();
        let busy: Vec<&str> = busy.iter().map(String::as_str).collect();
        let st = status(&THREE[..2]).clone();
        let mut st3 = status(&THREE);
        // 12 pods, 16+16 active, block c releasing: free = 20 ≥ 8, it stays released.
        let d = plan(&st3, &spec, &store(&busy, &["10.1.0.32/28"]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            (d.take_back.clone(), d.spec.releases.clone()),
            (BTreeSet::new(), vec![release("10.1.0.32/28", "c")])
        );
        // 12 pods and 14 waiting: free < 8 without c; c comes back (spec without it).
        let d = plan(&st3, &spec, &store(&busy, &["10.1.0.32/28"]), &[(IpFamily::IPv4, 14)].into(), &BTreeMap::new());
        assert_eq!(d.take_back, nets(&["10.1.0.32/28"]));
        assert!(d.spec.releases.is_empty());
        // The controller took it: the mark goes, spec forgets it.
        let d = plan(&st, &spec, &store(&busy, &["10.1.0.32/28"]), &BTreeMap::new(), &BTreeMap::new());
        assert!(d.marks.is_empty() && d.spec.releases.is_empty() && d.take_back.is_empty(), "{d:?}");
        // Granted again under a new ID: the old release does not fence it;
        // given back again (free = 36 > 24), the release names the new ID.
        st3.blocks[2].allocation_id = Some("c2".into());
        let d = plan(&st3, &spec, &store(&busy, &[]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(d.spec.releases, [release("10.1.0.32/28", "c2")], "{d:?}");
    }

    #[test]
    fn a_release_in_spec_without_its_mark_is_marked_again_unless_in_use() {
        let spec = NodeNetworkConfigSpec { releases: vec![release("10.1.0.32/28", "c")], ..Default::default() };
        // 12 pods: free = 20 without the released block, nothing more to give back.
        let mut busy: Vec<String> = (1..=12).map(|i| format!("10.1.0.{i}")).collect();
        let d = plan(
            &status(&THREE),
            &spec,
            &store(&busy.iter().map(String::as_str).collect::<Vec<_>>(), &[]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(d.marks, nets(&["10.1.0.32/28"]));
        // A pod in it (hand-written release, or an old carve-ipam): taken back, never marked.
        busy.push("10.1.0.33".into());
        let d = plan(
            &status(&THREE),
            &spec,
            &store(&busy.iter().map(String::as_str).collect::<Vec<_>>(), &[]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!((d.marks.clone(), d.take_back.clone()), (BTreeSet::new(), nets(&["10.1.0.32/28"])));
        assert!(d.spec.releases.is_empty());
    }

    #[test]
    fn outside_dynamic_pools_nothing_is_requested_and_marks_are_taken_back() {
        let mut st = status(&THREE);
        st.strategy = Some(AllocationStrategy::Static);
        let d = plan(&st, &Default::default(), &store(&[], &["10.1.0.32/28"]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(d.spec, NodeNetworkConfigSpec::default());
        assert_eq!(d.take_back, nets(&["10.1.0.32/28"]));
    }

    #[test]
    fn reserved_ips_shrink_a_block() {
        let mut st = status(&THREE[..1]);
        st.reserved_ips = vec!["10.1.0.4".into(), "10.1.0.5".into()];
        assert_eq!(usable(&st), [("10.1.0.0/28".parse().unwrap(), 14)]);
    }
}
