//! A node out of pod addresses says so to the scheduler: carve-agent taints
//! its Node `carve.dev/no-pod-addresses:NoSchedule` while no address is free
//! and none can be had, so new pods go to other nodes instead of looping in
//! ContainerCreating on CNI errors (pods that tolerate every taint, such as
//! DaemonSets, are unaffected, as with the kubelet's own pressure taints).
//!
//! "None can be had": the node's blocks are all it will get (Single and
//! Static pools), or a Dynamic node's request was refused by the controller
//! (NNC condition `RequestsMet=False`, reason `AboveMaximum` or
//! `PoolExhausted`). A Dynamic node whose request is still open is not
//! tainted: its ADDs wait for the block on the way.
//!
//! [`verdict`] is pure; [`Agent::enforce_capacity`] writes the taint and an
//! Event when the verdict changes.

use std::collections::BTreeMap;

use carve_crds::{
    AllocationStrategy, IpFamily, NO_POD_ADDRESSES_TAINT, NodeNetworkConfig, NodeNetworkConfigSpec,
    NodeNetworkConfigStatus,
};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::metrics::AddressCount;
use super::{Agent, blocks, cni};
use crate::ipam::alloc::Allocations;
use crate::ipam::store::PodIpStore;

/// One family's active (not releasing) blocks and how many of their addresses are in use.
struct FamilyUse {
    cidrs: Vec<ipnet::IpNet>,
    usable: u64,
    used: u64,
}

/// [`FamilyUse`] of each family status has blocks of (all releasing: none usable).
fn family_use(
    status: &NodeNetworkConfigStatus,
    spec: &NodeNetworkConfigSpec,
    store: &Allocations,
) -> BTreeMap<IpFamily, FamilyUse> {
    let releasing = blocks::releasing(status, spec, &store.releasing);
    let mut out = BTreeMap::new();
    for (net, usable) in blocks::usable(status) {
        let family = out.entry(IpFamily::of(&net)).or_insert(FamilyUse { cidrs: vec![], usable: 0, used: 0 });
        if !releasing.contains(&net) {
            family.cidrs.push(net);
            family.usable += usable;
            family.used += store.count_in(&net) as u64;
        }
    }
    out
}

/// Pod addresses per family: allocated in the store (anywhere), free in the active blocks.
pub fn address_counts(
    status: &NodeNetworkConfigStatus,
    spec: &NodeNetworkConfigSpec,
    store: &Allocations,
) -> BTreeMap<IpFamily, AddressCount> {
    let mut out = allocated(store)
        .into_iter()
        .map(|(f, allocated)| (f, AddressCount { allocated, free: 0 }))
        .collect::<BTreeMap<_, _>>();
    for (family, u) in family_use(status, spec, store) {
        out.entry(family).or_default().free = u.usable.saturating_sub(u.used);
    }
    out
}

/// Allocations in the store per family.
pub fn allocated(store: &Allocations) -> BTreeMap<IpFamily, u64> {
    let mut out = BTreeMap::new();
    for ip in store.by_ip.keys() {
        *out.entry(IpFamily::of_addr(ip)).or_insert(0) += 1;
    }
    out
}

/// Blocks in status per family.
pub fn block_counts(status: &NodeNetworkConfigStatus) -> BTreeMap<IpFamily, u64> {
    let mut out = BTreeMap::new();
    for b in &status.blocks {
        *out.entry(b.family).or_insert(0) += 1;
    }
    out
}

/// Why no new pod can get an address here, or `None` when one can (or the
/// node has no blocks yet: NetworkUnavailable covers that).
pub fn verdict(status: &NodeNetworkConfigStatus, spec: &NodeNetworkConfigSpec, store: &Allocations) -> Option<String> {
    if status.blocks.is_empty() {
        return None;
    }
    let full: Vec<String> = family_use(status, spec, store)
        .into_iter()
        .filter(|(_, u)| u.used >= u.usable)
        .map(|(family, u)| {
            let cidrs: Vec<String> = u.cidrs.iter().map(|n| n.to_string()).collect();
            format!("no free {family} address ({} of {} in use in {})", u.used, u.usable, cidrs.join(", "))
        })
        .collect();
    if full.is_empty() {
        return None;
    }
    let no_more = match status.strategy.unwrap_or_default() {
        AllocationStrategy::Dynamic => {
            let refused = status.conditions.iter().find(|c| {
                c.type_ == "RequestsMet"
                    && c.status == "False"
                    && (c.reason == "AboveMaximum" || c.reason == "PoolExhausted")
            });
            match refused {
                Some(c) => format!("the pool grants no more blocks ({}: {})", c.reason, c.message),
                None => return None,
            }
        }
        AllocationStrategy::Static => "the pool's Static blocks are all this node gets".to_string(),
        AllocationStrategy::Single => "the pool gives this node one block".to_string(),
    };
    Some(format!("{}; {no_more}", full.join("; ")))
}

/// `taints` with carve's taint added (`on`) or removed; `None` when already so.
pub fn with_taint(taints: &[Taint], on: bool) -> Option<Vec<Taint>> {
    let has = taints.iter().any(|t| t.key == NO_POD_ADDRESSES_TAINT);
    if has == on {
        return None;
    }
    let mut out: Vec<Taint> = taints.iter().filter(|t| t.key != NO_POD_ADDRESSES_TAINT).cloned().collect();
    if on {
        out.push(Taint { key: NO_POD_ADDRESSES_TAINT.into(), effect: "NoSchedule".into(), ..Default::default() });
    }
    Some(out)
}

impl Agent {
    /// `carve_agent_blocks` and `carve_agent_pod_addresses` from a look at the
    /// store (no status: no blocks, nothing free).
    pub(crate) fn observe_addresses(
        &self,
        status: Option<&NodeNetworkConfigStatus>,
        spec: &NodeNetworkConfigSpec,
        store: &Allocations,
    ) {
        let empty = NodeNetworkConfigStatus::default();
        let status = status.unwrap_or(&empty);
        self.metrics.set_node(&block_counts(status), &address_counts(status, spec, store));
    }

    /// Taints or untaints the Node when the verdict changed since the last
    /// write (or the setting is off and the taint is there).
    pub async fn enforce_capacity(
        &self,
        nodes: &Api<Node>,
        recorder: &Recorder,
        own: Option<&NodeNetworkConfig>,
    ) -> anyhow::Result<()> {
        let Some(own) = own else { return Ok(()) };
        let Some(status) = own.status.as_ref() else { return Ok(()) };
        let why = if self.settings.no_address_taint {
            let store = PodIpStore::new(self.settings.ipam_store_dir());
            if !store.file().exists() {
                None
            } else {
                let allocations = store.lock_within(cni::STORE_LOCK_TIMEOUT)?.load()?;
                self.observe_addresses(Some(status), &own.spec, &allocations);
                verdict(status, &own.spec, &allocations)
            }
        } else {
            None
        };
        let on = why.is_some();
        if self.taint_written.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(&why) {
            return Ok(());
        }
        let node = nodes.get(&self.settings.node).await?;
        let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        if let Some(taints) = with_taint(&taints, on) {
            // The whole list, conditioned on the version read: a taint someone
            // else added meanwhile is never overwritten (409: next pass).
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": node.resource_version() },
                "spec": { "taints": taints },
            });
            nodes.patch(&self.settings.node, &PatchParams::default(), &Patch::Merge(patch)).await?;
            let (type_, reason, note) = match &why {
                Some(w) => {
                    (EventType::Warning, "NoPodAddresses", format!("tainted {NO_POD_ADDRESSES_TAINT}:NoSchedule: {w}"))
                }
                None => {
                    (EventType::Normal, "PodAddressesAvailable", format!("removed the {NO_POD_ADDRESSES_TAINT} taint"))
                }
            };
            info!(taint = NO_POD_ADDRESSES_TAINT, on, why = ?why, "node taint written");
            let reference = self.node_reference(node.uid());
            let event =
                Event { type_, reason: reason.into(), note: Some(note), action: "Taint".into(), secondary: None };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(error = %e, reason, "could not publish event");
            }
        }
        *self.taint_written.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::alloc::Owner;
    use carve_crds::{NodeBlock, PoolMode};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn status(strategy: AllocationStrategy, blocks: &[&str]) -> NodeNetworkConfigStatus {
        NodeNetworkConfigStatus {
            mode: Some(PoolMode::VNet),
            strategy: Some(strategy),
            blocks: blocks
                .iter()
                .map(|c| NodeBlock {
                    cidr: c.to_string(),
                    family: IpFamily::IPv4,
                    gateway: None,
                    allocation_id: Some(format!("id-{c}")),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn filled(n: u8) -> Allocations {
        let mut a = Allocations::default();
        for i in 0..n {
            a.by_ip.insert(format!("10.1.0.{}", 16 + i).parse().unwrap(), Owner::new(format!("c{i}"), "eth0"));
        }
        a
    }

    fn refused(reason: &str) -> Condition {
        Condition {
            type_: "RequestsMet".into(),
            status: "False".into(),
            reason: reason.into(),
            message: "above maxBlocksPerNode 1".into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }
    }

    #[test]
    fn a_static_node_with_every_address_in_use_is_out_and_one_free_address_ends_it() {
        let st = status(AllocationStrategy::Static, &["10.1.0.16/29"]);
        let spec = NodeNetworkConfigSpec::default();
        let why = verdict(&st, &spec, &filled(8)).expect("8 of 8 in use");
        assert!(why.contains("8 of 8 in use in 10.1.0.16/29") && why.contains("Static"), "{why}");
        assert_eq!(verdict(&st, &spec, &filled(7)), None);
    }

    #[test]
    fn a_full_dynamic_node_is_out_only_once_the_controller_refused_its_request() {
        let mut st = status(AllocationStrategy::Dynamic, &["10.1.0.16/29"]);
        let spec = NodeNetworkConfigSpec::default();
        assert_eq!(verdict(&st, &spec, &filled(8)), None, "a block may be on its way");
        st.conditions.push(refused("AboveMaximum"));
        let why = verdict(&st, &spec, &filled(8)).expect("refused");
        assert!(why.contains("AboveMaximum"), "{why}");
    }

    #[test]
    fn a_node_without_blocks_is_left_to_network_unavailable() {
        let st = status(AllocationStrategy::Static, &[]);
        assert_eq!(verdict(&st, &NodeNetworkConfigSpec::default(), &Allocations::default()), None);
    }

    #[test]
    fn addresses_count_the_whole_store_and_free_only_in_active_blocks() {
        let mut st = status(AllocationStrategy::Dynamic, &["10.1.0.16/29", "10.1.0.24/29"]);
        st.reserved_ips = vec!["10.1.0.17".into()];
        let mut store = filled(3);
        store.by_ip.insert("fd00::5".parse().unwrap(), Owner::new("c6", "eth0"));
        let spec = NodeNetworkConfigSpec::default();
        let counts = address_counts(&st, &spec, &store);
        // 8 + 8 less one reserved, 3 in use (one on the reserved address: the store is what it is).
        assert_eq!(counts[&IpFamily::IPv4], AddressCount { allocated: 3, free: 12 });
        assert_eq!(counts[&IpFamily::IPv6], AddressCount { allocated: 1, free: 0 }, "no IPv6 block");
        store.releasing.insert("10.1.0.24/29".parse().unwrap());
        assert_eq!(address_counts(&st, &spec, &store)[&IpFamily::IPv4].free, 4, "a releasing block is not free");
        assert_eq!(block_counts(&st), [(IpFamily::IPv4, 2)].into(), "a releasing block is still held");
        assert_eq!(allocated(&store), [(IpFamily::IPv4, 3), (IpFamily::IPv6, 1)].into());
    }

    #[test]
    fn the_taint_is_added_and_removed_alone() {
        let other = Taint { key: "dedicated".into(), effect: "NoSchedule".into(), ..Default::default() };
        let on = with_taint(std::slice::from_ref(&other), true).unwrap();
        assert_eq!(on.len(), 2);
        assert_eq!(on[1].key, NO_POD_ADDRESSES_TAINT);
        assert_eq!(with_taint(&on, true), None, "already there");
        assert_eq!(with_taint(&on, false).unwrap(), std::slice::from_ref(&other));
        assert_eq!(with_taint(&[other], false), None);
    }
}
