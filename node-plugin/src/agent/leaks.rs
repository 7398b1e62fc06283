//! The leak reconciler's edge: every `period`, one observation of which
//! allocations in the node's IPAM store are still in use, handed to
//! [`crate::ipam::leaks::Suspects`]; what it finds due is freed under the
//! store's lock, fenced by its container ID, logged, counted and announced
//! with an Event on the Node.
//!
//! An allocation is in use when either source knows it:
//! - **the API server**: a pod bound to this node has the address in
//!   `status.podIPs` (any phase: a finished pod's sandbox may still exist);
//! - **the node's kernel**: the host side of the attachment's veth
//!   (`podnet::host_veth_name`) exists. It lives exactly as long as the
//!   sandbox's network namespace, whatever the runtime (containerd 1.6, 1.7,
//!   2.x, CRI-O) and whether or not it still has a record of the sandbox.
//!
//! A failed LIST or link dump ends the pass with nothing freed (an API
//! outage or a broken netlink socket must not look like "no pods").

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use carve_crds::LEAKED_ADDRESS_FREED;
use kube::Client;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::{info, warn};

use super::{Agent, cni};
use crate::ipam::alloc::Owner;
use crate::ipam::leaks;
use crate::ipam::store::PodIpStore;
use crate::podnet;

/// When the reconciler runs and how long an allocation must stay unused.
#[derive(Clone, Copy, Debug)]
pub struct LeakSettings {
    /// Time between passes; zero turns the reconciler off.
    pub period: Duration,
    /// How long an allocation must stay unused, across two passes, before it is freed.
    pub grace: Duration,
}

/// The shortest grace accepted: the kubelet reports a new pod's IP within seconds.
pub const MIN_GRACE: Duration = Duration::from_secs(5);

/// A pod LIST as the reconciler reads it: only the addresses are decoded
/// (metadata and spec, managedFields above all, are skipped, not allocated).
#[derive(serde::Deserialize)]
struct PodIpList {
    items: Vec<PodIps>,
}

#[derive(serde::Deserialize)]
struct PodIps {
    status: Option<PodIpsStatus>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodIpsStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIp>,
}

#[derive(serde::Deserialize)]
struct PodIp {
    ip: String,
}

/// Addresses of the pods the API server binds to `node` (one LIST, read from etcd).
async fn pod_ips(client: &Client, node: &str) -> kube::Result<BTreeSet<IpAddr>> {
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let request = kube::core::Request::new("/api/v1/pods").list(&on_node).map_err(kube::Error::BuildRequest)?;
    let list: PodIpList = client.request(request).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.pod_ips.iter().map(|i| i.ip.as_str()).chain(s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect())
}

impl Agent {
    /// One leak pass; returns what it freed. Nothing is freed on any error.
    pub async fn reclaim_leaks(&self, client: &Client, recorder: &Recorder) -> anyhow::Result<Vec<(IpAddr, Owner)>> {
        let in_api = pod_ips(client, &self.settings.node).await?;
        let links: BTreeSet<String> = self.worker.link_names().await?.into_iter().collect();
        let store = PodIpStore::new(self.settings.ipam_store_dir());
        if !store.file().exists() {
            self.metrics.leak_passes.inc();
            return Ok(Vec::new());
        }
        let freed = {
            let locked = store.lock_within(cni::STORE_LOCK_TIMEOUT)?;
            let mut allocations = locked.load()?;
            let live = |ip: &IpAddr, o: &Owner| {
                in_api.contains(ip) || links.contains(&podnet::host_veth_name(&o.container_id, &o.ifname))
            };
            let mut suspects = self.leak_suspects.lock().unwrap_or_else(|e| e.into_inner());
            let due = suspects.observe(&allocations, live, Instant::now(), self.leak_settings.grace);
            let freed = leaks::release(&mut allocations, &due);
            if !freed.is_empty() {
                locked.save(&allocations)?;
            }
            suspects.forget(&freed);
            self.metrics.leak_suspects.set(suspects.len() as i64);
            self.metrics.set_allocated(&super::capacity::allocated(&allocations));
            freed
        };
        self.metrics.leak_passes.inc();
        if freed.is_empty() {
            return Ok(freed);
        }
        self.metrics.leaks_reclaimed.inc_by(freed.len() as u64);
        let grace = self.leak_settings.grace;
        let node = self.node_reference(None);
        // One Event per address, so `carvectl status` counts addresses.
        for (ip, o) in &freed {
            info!(%ip, container = %o.container_id, ifname = %o.ifname, ?grace, "freed a leaked pod address: no pod on this node has it and its sandbox's interface is gone");
            let event = Event {
                type_: EventType::Normal,
                reason: LEAKED_ADDRESS_FREED.into(),
                note: Some(format!(
                    "freed {ip} (sandbox {}, {}): no pod on this node had it and the sandbox's interface was gone for {grace:?}",
                    o.container_id, o.ifname
                )),
                action: "ReclaimLeaks".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &node).await {
                warn!(error = %e, "could not publish the {LEAKED_ADDRESS_FREED} event");
            }
        }
        Ok(freed)
    }
}

/// Runs [`Agent::reclaim_leaks`] every `period`, the first pass at once.
pub async fn run(agent: &Agent, client: Client, recorder: Recorder) {
    let period = agent.leak_settings.period;
    if period.is_zero() {
        info!("leak reconciler off (--leak-check-period 0)");
        return futures::future::pending().await;
    }
    info!(?period, grace = ?agent.leak_settings.grace, "leak reconciler on");
    loop {
        if let Err(e) = agent.reclaim_leaks(&client, &recorder).await {
            warn!(error = %e, "leak pass failed; nothing freed");
        }
        tokio::time::sleep(period).await;
    }
}
