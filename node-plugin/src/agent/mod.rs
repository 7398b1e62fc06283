//! carve-agent: turns this node's NodeNetworkConfig into everything a pod
//! needs on the node, in order, and says so on the Node.
//!
//! ```text
//!   NNC (own) ──┐
//!   NNC (all) ──┼─▶ Agent::reconcile ─▶ state file ─▶ CNI binaries ─▶ dataplane ─▶ conflist
//!   PodCIDRs  ──┘          │                                            (worker thread)
//!                          └─▶ Readiness ─▶ Node condition NetworkUnavailable (False only when all are in place)
//! ```
//!
//! The pure parts ([`peers`], [`node_state`], [`condition`], [`scaler`],
//! [`blocks::plan`]) take the watched objects and decide; [`Agent`] writes
//! files and drives the dataplane worker; the API server writes are
//! [`set_network_unavailable`] and, in dynamic pools, the NNC spec
//! ([`Agent::scale`]: requested IPs and the fenced release handshake).

pub mod blocks;
pub mod capacity;
pub mod cni;
pub mod cni_calls;
pub mod leaks;
pub mod metrics;
pub mod role;
mod run;
pub mod scaler;

pub use run::run;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use carve_crds::{IpFamily, NodeNetworkConfig, NodeNetworkConfigSpec, PodCidr, PoolMode};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

use crate::dataplane::plan::{self, OverlayConfig, Peer, VXLAN_OVERHEAD};
use crate::dataplane::worker::Worker;
use crate::ipam::store::{PodIpStore, StoreError};
use crate::ipam::waiting;
use crate::state::{self, NodeState, StateError};
use metrics::stage;

/// Node condition the agent owns.
pub const CONDITION: &str = "NetworkUnavailable";
/// Reason of `NetworkUnavailable=False`.
pub const READY_REASON: &str = "CarveReady";
/// MTU assumed when no link holds the node IP.
pub const FALLBACK_UNDERLAY_MTU: u32 = 1500;

/// Where the agent puts things and how it builds the dataplane.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub state_file: PathBuf,
    /// carve-ipam's allocation store (`ipam.dataDir` in the conflist); `None`: the plugin's default.
    pub ipam_data_dir: Option<PathBuf>,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Where carve-cni and carve-ipam come from (the agent image).
    pub cni_source_dir: PathBuf,
    pub conflist_name: String,
    /// `--cni-version`: the conflist's only CNI version; `None`: [`cni::DEFAULT_CNI_VERSION`]
    /// with [`cni::DEFAULT_CNI_VERSIONS`], never raised under live pods.
    pub cni_version: Option<String>,
    pub non_masquerade_cidrs: Vec<String>,
    pub vxlan_device: String,
    pub vni: u32,
    pub vxlan_port: u16,
    /// Pod (and VXLAN) MTU; `None`: underlay MTU, less [`VXLAN_OVERHEAD`] in Overlay.
    pub mtu: Option<u32>,
    /// Taint the Node while no pod address is free and none can be had ([`capacity`]).
    pub no_address_taint: bool,
    /// carve's own dataplane, or blocks only under another one ([`role`]).
    pub role: role::Role,
}

impl Settings {
    /// carve-ipam's store for the conflist's network (`ipam_data_dir`, else carve-ipam's default).
    pub fn ipam_store_dir(&self) -> PathBuf {
        cni::ipam_store_dir(self.ipam_data_dir.as_deref())
    }
}

/// The agent's verdict for the Node condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady { reason: &'static str, message: String },
}

impl Readiness {
    fn not(reason: &'static str, message: impl Into<String>) -> Self {
        Readiness::NotReady { reason, message: message.into() }
    }
}

/// The other nodes with a node IP and blocks in their NNC status. An NNC
/// whose node IP or blocks do not parse is logged and skipped (one bad
/// object never stops the agent).
pub fn peers(nncs: &[Arc<NodeNetworkConfig>], me: &str) -> Vec<Peer> {
    let mut out = Vec::new();
    for nnc in nncs {
        let name = nnc.name_any();
        if name == me {
            continue;
        }
        let Some(status) = &nnc.status else { continue };
        let Some(ip) = &status.node_ip else { continue };
        let Ok(node_ip) = ip.parse::<IpAddr>() else {
            warn!(nnc = %name, node_ip = %ip, "skipping peer: status.nodeIP is not an IP address");
            continue;
        };
        let blocks: Result<Vec<IpNet>, _> = status.blocks.iter().map(|b| b.cidr.parse::<IpNet>()).collect();
        match blocks {
            Ok(blocks) if !blocks.is_empty() => out.push(Peer { node: name, node_ip, blocks }),
            Ok(_) => {}
            Err(_) => warn!(nnc = %name, "skipping peer: a block in status.blocks is not a CIDR"),
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// This node's state file content from its NNC, or why it cannot be built yet.
/// Cluster pod CIDRs are the CIDRs of every pool of the node's mode (and the
/// node's own blocks when no pool is visible). The blocks are status.blocks
/// less `releasing` (see [`blocks::releasing`]).
pub fn node_state(
    settings: &Settings,
    own: Option<&NodeNetworkConfig>,
    pools: &[Arc<PodCidr>],
    underlay_mtu: u32,
    releasing: &BTreeSet<IpNet>,
) -> Result<NodeState, Readiness> {
    let Some(own) = own else {
        return Err(Readiness::not("NoNodeNetworkConfig", format!("no NodeNetworkConfig {} yet", settings.node)));
    };
    let status = own.status.clone().unwrap_or_default();
    let waiting = |what: &str| {
        Readiness::not("WaitingForBlocks", format!("NodeNetworkConfig {} has no {what} in status yet", settings.node))
    };
    if status.blocks.is_empty() {
        return Err(waiting("blocks"));
    }
    let Some(mode) = status.mode else { return Err(waiting("mode")) };
    let Some(node_ip) = status.node_ip.clone() else { return Err(waiting("nodeIP")) };
    for b in &status.blocks {
        if b.cidr.parse::<IpNet>().is_err() {
            return Err(Readiness::not(
                "InvalidNodeNetworkConfig",
                format!("NodeNetworkConfig {}: block {:?} is not a CIDR", settings.node, b.cidr),
            ));
        }
    }
    let mut cluster: BTreeSet<String> = pools
        .iter()
        .filter(|p| p.spec.mode == mode)
        .flat_map(|p| p.spec.cidrs.iter().map(|c| c.as_str().to_string()))
        .collect();
    if cluster.is_empty() {
        cluster.extend(status.blocks.iter().map(|b| b.cidr.clone()));
    }
    let mtu = settings.mtu.unwrap_or(match mode {
        PoolMode::Overlay => underlay_mtu.saturating_sub(VXLAN_OVERHEAD),
        PoolMode::VNet => underlay_mtu,
    });
    let blocks = blocks::active_blocks(&status, releasing);
    if blocks.is_empty() {
        return Err(waiting("blocks that are not being given back"));
    }
    Ok(NodeState {
        node: settings.node.clone(),
        mode,
        strategy: status.strategy.unwrap_or_default(),
        blocks,
        reserved_ips: status.reserved_ips.clone(),
        cluster_pod_cidrs: cluster.into_iter().collect(),
        non_masquerade_cidrs: settings.non_masquerade_cidrs.clone(),
        mtu,
        node_ip,
    })
}

/// The `NetworkUnavailable` condition for `readiness`; keeps `previous`'s
/// transition time when the status did not change.
pub fn condition(readiness: &Readiness, previous: Option<&NodeCondition>, now: Time) -> NodeCondition {
    let (status, reason, message) = match readiness {
        Readiness::Ready => {
            ("False", READY_REASON, "carve: node state file, CNI conflist and dataplane are in place".to_string())
        }
        Readiness::NotReady { reason, message } => ("True", *reason, format!("carve: {message}")),
    };
    let transition = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone().unwrap_or(now.clone()),
        _ => now.clone(),
    };
    NodeCondition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(transition),
        last_heartbeat_time: Some(now),
    }
}

/// The field manager of every carve-agent write.
pub const FIELD_MANAGER: &str = "carve-agent";

/// Writes `NetworkUnavailable` on the Node when its status, reason or message changed.
pub async fn set_network_unavailable(nodes: &Api<Node>, node: &str, readiness: &Readiness) -> kube::Result<bool> {
    let current = nodes.get_status(node).await?;
    let previous = current
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CONDITION).cloned());
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = condition(readiness, previous.as_ref(), now);
    if previous
        .as_ref()
        .is_some_and(|p| p.status == cond.status && p.reason == cond.reason && p.message == cond.message)
    {
        return Ok(false);
    }
    // Server-side apply: carve-agent owns this one condition (Node conditions
    // are a map keyed by type), kubelet keeps the rest.
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node },
        "status": { "conditions": [cond] },
    });
    nodes.patch_status(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(true)
}

/// What the light scaler pass watches: a change means the demand may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemandSignature {
    store: Option<(SystemTime, u64)>,
    waiting_dir: Option<SystemTime>,
    /// ADDs are waiting: worth a pass on every tick (their markers age).
    pub waiting: bool,
}

/// carve-ipam's store in `dir` (empty when it was never written).
fn store_allocations(dir: &std::path::Path) -> Result<crate::ipam::alloc::Allocations, StoreError> {
    let store = PodIpStore::new(dir);
    if !store.file().exists() {
        return Ok(Default::default());
    }
    store.lock_within(cni::STORE_LOCK_TIMEOUT)?.load()
}

/// The node side state machine: files and dataplane, in order.
pub struct Agent {
    settings: Settings,
    worker: Worker,
    /// The conflist's last version choice, so each one is logged once.
    versions: std::sync::Mutex<Option<cni::VersionChoice>>,
    /// The last spec written and the resourceVersion it was decided from:
    /// skips writing it again while the cache has not caught up.
    written: std::sync::Mutex<Option<(String, NodeNetworkConfigSpec)>>,
    /// Demand per family of the scaler passes within [`scaler::RELEASE_STABILIZATION`].
    demand_history: std::sync::Mutex<DemandHistory>,
    leak_settings: leaks::LeakSettings,
    /// The leak reconciler's allocations without a pod or interface (see [`leaks`]).
    leak_suspects: std::sync::Mutex<crate::ipam::leaks::Suspects>,
    pub metrics: Arc<metrics::AgentMetrics>,
    /// The capacity verdict last written to the Node (see [`capacity`]).
    taint_written: std::sync::Mutex<Option<Option<String>>>,
}

/// Recent demand per family, oldest first, for the release window.
#[derive(Default)]
struct DemandHistory(std::collections::VecDeque<(std::time::Instant, BTreeMap<IpFamily, u64>)>);

impl DemandHistory {
    /// The highest demand per family within the window before `now` (older entries go).
    fn peaks(&mut self, now: std::time::Instant) -> BTreeMap<IpFamily, u64> {
        while self.0.front().is_some_and(|(at, _)| now.duration_since(*at) > scaler::RELEASE_STABILIZATION) {
            self.0.pop_front();
        }
        let mut peaks = BTreeMap::new();
        for (family, d) in self.0.iter().flat_map(|(_, m)| m) {
            let peak = peaks.entry(*family).or_insert(0);
            *peak = (*d).max(*peak);
        }
        peaks
    }

    /// Whether a peak in the window is above the latest demand: a release may
    /// become due without any change the agent would see.
    fn holds_release(&self) -> bool {
        let Some((_, last)) = self.0.back() else { return false };
        self.0.iter().any(|(_, m)| m.iter().any(|(f, d)| d > last.get(f).unwrap_or(&0)))
    }
}

impl Agent {
    pub fn new(settings: Settings, worker: Worker, leak_settings: leaks::LeakSettings) -> Self {
        Self {
            settings,
            worker,
            versions: Default::default(),
            written: Default::default(),
            demand_history: Default::default(),
            leak_settings,
            leak_suspects: Default::default(),
            metrics: Default::default(),
            taint_written: Default::default(),
        }
    }

    /// This agent's Node, as its Events name it (`uid` when the caller read the Node).
    pub(crate) fn node_reference(&self, uid: Option<String>) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.settings.node.clone()),
            uid,
            ..Default::default()
        }
    }

    /// A scaler pass is due although nothing changed: a recent demand peak
    /// holds back a release that may be allowed once the peak leaves the window.
    pub fn release_held(&self) -> bool {
        self.demand_history.lock().unwrap_or_else(|e| e.into_inner()).holds_release()
    }

    /// The IPAM store's and waiting markers' modification times.
    pub fn demand_signature(&self) -> DemandSignature {
        let dir = self.settings.ipam_store_dir();
        let store =
            std::fs::metadata(PodIpStore::new(&dir).file()).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        let wdir = waiting::dir(&dir);
        let waiting_dir = std::fs::metadata(&wdir).and_then(|m| m.modified()).ok();
        let waiting = std::fs::read_dir(&wdir).is_ok_and(|mut d| d.next().is_some());
        DemandSignature { store, waiting_dir, waiting }
    }

    /// Rewrites the state file's blocks (status.blocks less `releasing`)
    /// when it exists; the full reconcile writes everything else.
    fn refresh_state_blocks(&self, status: &carve_crds::NodeNetworkConfigStatus, releasing: &BTreeSet<IpNet>) {
        let path = &self.settings.state_file;
        let blocks = blocks::active_blocks(status, releasing);
        match state::read(path) {
            Ok(mut st) if st.blocks != blocks && !blocks.is_empty() => {
                st.blocks = blocks;
                match state::write(path, &st) {
                    Ok(()) => {
                        info!(blocks = ?st.blocks.iter().map(|b| &b.cidr).collect::<Vec<_>>(), "rewrote the node state file's blocks")
                    }
                    Err(e) => warn!(error = %e, "rewriting the node state file failed"),
                }
            }
            Ok(_) | Err(StateError::Missing { .. }) => {}
            Err(e) => warn!(error = %e, "reading the node state file failed"),
        }
    }

    /// One scaler pass (dynamic pools; elsewhere it only takes back what a
    /// dynamic pool left marked): demand from the IPAM store and waiting ADDs,
    /// release marks, the state file's blocks, and the NNC spec (see
    /// [`blocks`] for the handshake). Nothing is written without an NNC.
    pub async fn scale(&self, nnc_api: &Api<NodeNetworkConfig>, own: Option<&NodeNetworkConfig>) -> anyhow::Result<()> {
        let Some(own) = own else { return Ok(()) };
        let Some(status) = own.status.as_ref().filter(|s| !s.blocks.is_empty()) else { return Ok(()) };
        let Some(rv) = own.resource_version() else { return Ok(()) };
        let dynamic = status.strategy == Some(carve_crds::AllocationStrategy::Dynamic);
        let dir = self.settings.ipam_store_dir();
        let store = PodIpStore::new(&dir);
        if !dynamic && !store.file().exists() && own.spec == NodeNetworkConfigSpec::default() {
            return Ok(());
        }
        let waiting = waiting::count(&dir, SystemTime::now());
        let decision = {
            let locked = store.lock_within(cni::STORE_LOCK_TIMEOUT)?;
            let mut allocations = locked.load()?;
            let now = std::time::Instant::now();
            self.observe_addresses(Some(status), &own.spec, &allocations);
            let mut history = self.demand_history.lock().unwrap_or_else(|e| e.into_inner());
            let d = blocks::plan(status, &own.spec, &allocations, &waiting, &history.peaks(now));
            history.0.push_back((now, d.demand.clone()));
            drop(history);
            if d.marks != allocations.releasing {
                for added in d.marks.difference(&allocations.releasing) {
                    info!(block = %added, "marked releasing in the IPAM store: carve-ipam no longer allocates from it");
                }
                allocations.releasing = d.marks.clone();
                // Durable before spec names it (module docs of ipam::store).
                locked.save_synced(&allocations)?;
            }
            d
        };
        // Old carve-ipam binaries do not read marks: the state file leaves the block out first.
        self.refresh_state_blocks(status, &blocks::releasing(status, &own.spec, &decision.marks));

        let unchanged = decision.spec == own.spec
            || self.written.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                == Some(&(rv.clone(), decision.spec.clone()));
        if unchanged && decision.take_back.is_empty() {
            return Ok(());
        }
        // resourceVersion: never creates the NNC, and a take-back only lands
        // if the controller has not removed the block since this view.
        let mut body = NodeNetworkConfig::new(&own.name_any(), decision.spec.clone());
        body.metadata.resource_version = Some(rv.clone());
        match nnc_api.patch(&own.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await {
            Ok(_) => {
                info!(requested = ?decision.spec.requested_ips, releases = ?decision.spec.releases.iter().map(|r| &r.cidr).collect::<Vec<_>>(), taken_back = ?decision.take_back, "wrote the NodeNetworkConfig spec");
                *self.written.lock().unwrap_or_else(|e| e.into_inner()) = Some((rv, decision.spec.clone()));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!("NodeNetworkConfig changed since this pass read it; deciding again on the next");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        if decision.take_back.is_empty() {
            return Ok(());
        }
        let locked = store.lock_within(cni::STORE_LOCK_TIMEOUT)?;
        let mut allocations = locked.load()?;
        for net in &decision.take_back {
            allocations.releasing.remove(net);
        }
        locked.save_synced(&allocations)?;
        drop(locked);
        info!(blocks = ?decision.take_back, "took the release back: the blocks are the node's again");
        self.refresh_state_blocks(status, &blocks::releasing(status, &decision.spec, &allocations.releasing));
        Ok(())
    }

    /// Logs why the conflist's version is held back or raised under live pods, once per change.
    fn log_version_choice(&self, choice: &cni::VersionChoice) {
        let mut last = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(choice) {
            return;
        }
        let v = &choice.versions;
        match &choice.reason {
            cni::VersionReason::KeptForLivePods { existing, wanted } => info!(
                cni_version = %existing,
                cni_versions = ?v.cni_versions,
                "keeping the conflist's cniVersion {existing} instead of {wanted}: pods created under it still \
                 run on this node, and containerd < 2.0 (libcni < 1.2) converts their cached results to the \
                 conflist's version on deletion, failing where it has no converter; {wanted} once they are gone"
            ),
            cni::VersionReason::PinRaisesUnderLivePods { existing, pinned } => warn!(
                cni_version = %pinned,
                "--cni-version {pinned} raises the conflist's cniVersion from {existing} while pods created under \
                 {existing} still run on this node: on containerd < 2.0 they may fail to delete (stay Terminating)"
            ),
            cni::VersionReason::Default | cni::VersionReason::Pinned => {
                debug!(cni_version = %v.cni_version, cni_versions = ?v.cni_versions, reason = ?choice.reason, "conflist versions")
            }
        }
        *last = Some(choice.clone());
    }

    fn overlay(&self, mtu: u32) -> OverlayConfig {
        OverlayConfig {
            device: self.settings.vxlan_device.clone(),
            vni: self.settings.vni,
            port: self.settings.vxlan_port,
            mtu,
        }
    }

    async fn underlay_mtu(&self, own: Option<&NodeNetworkConfig>) -> u32 {
        let ip = own.and_then(|n| n.status.as_ref()).and_then(|s| s.node_ip.as_ref()).and_then(|i| i.parse().ok());
        let Some(ip) = ip else { return FALLBACK_UNDERLAY_MTU };
        match self.worker.underlay_mtu(ip).await {
            Ok(Some(mtu)) => mtu,
            Ok(None) => {
                debug!(node_ip = %ip, "no link holds the node IP; assuming MTU {FALLBACK_UNDERLAY_MTU}");
                FALLBACK_UNDERLAY_MTU
            }
            Err(e) => {
                warn!(error = %e, "reading the underlay MTU failed; assuming {FALLBACK_UNDERLAY_MTU}");
                FALLBACK_UNDERLAY_MTU
            }
        }
    }

    /// One pass: state file, CNI binaries, dataplane, conflist. Every step is
    /// idempotent; the first failure stops the pass and becomes the reason.
    /// With no blocks the conflist is removed, so the runtime reports the
    /// node's network as not ready instead of starting pods that cannot get
    /// an address.
    pub async fn reconcile(
        &self,
        own: Option<&NodeNetworkConfig>,
        nncs: &[Arc<NodeNetworkConfig>],
        pools: &[Arc<PodCidr>],
    ) -> Readiness {
        let s = &self.settings;
        // Counted under `stage` (metrics::stage), then the Node condition's reason.
        let failed = |stage: &'static str, reason: &'static str, e: &dyn std::fmt::Display| {
            self.metrics.reconcile_error(stage);
            Readiness::not(reason, e.to_string())
        };
        if s.role == role::Role::IpamOnly {
            return self.reconcile_ipam_only(own).await;
        }
        let underlay = self.underlay_mtu(own).await;
        let status = own.and_then(|o| o.status.as_ref());
        let spec = own.map(|o| o.spec.clone()).unwrap_or_default();
        let releasing = match store_allocations(&s.ipam_store_dir()) {
            Ok(allocations) => {
                self.observe_addresses(status, &spec, &allocations);
                status.map(|st| blocks::releasing(st, &spec, &allocations.releasing)).unwrap_or_default()
            }
            // Without a status there is nothing to serve yet; the store matters once there is.
            Err(e) if status.is_some() => return failed(stage::IPAM_STORE, "IPAMStoreFailed", &e),
            Err(_) => BTreeSet::new(),
        };
        let node_state = match node_state(s, own, pools, underlay, &releasing) {
            Ok(n) => n,
            Err(not_ready) => {
                if matches!(not_ready, Readiness::NotReady { reason: "InvalidNodeNetworkConfig", .. }) {
                    self.metrics.reconcile_error(stage::NNC);
                }
                match cni::remove_conflist(&s.cni_conf_dir, &s.conflist_name) {
                    Ok(true) => info!(conflist = %s.conflist_name, "removed the CNI conflist: no blocks"),
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "removing the CNI conflist failed"),
                }
                return not_ready;
            }
        };

        if state::read(&s.state_file).ok().as_ref() != Some(&node_state) {
            if let Err(e) = state::write(&s.state_file, &node_state) {
                return failed(stage::STATE_FILE, "StateFileFailed", &e);
            }
            info!(path = %s.state_file.display(), blocks = ?node_state.blocks.iter().map(|b| &b.cidr).collect::<Vec<_>>(), "wrote the node state file");
        }

        match cni::install_binaries(&s.cni_source_dir, &s.cni_bin_dir) {
            Ok(installed) if !installed.is_empty() => {
                info!(?installed, dir = %s.cni_bin_dir.display(), "installed CNI plugins")
            }
            Ok(_) => {}
            Err(e) => return failed(stage::CNI_BINARIES, "CNIInstallFailed", &e),
        }

        let peers = peers(nncs, &s.node);
        let desired = match plan::plan(&node_state, &peers, &self.overlay(node_state.mtu)) {
            Ok(d) => d,
            Err(e) => return failed(stage::NNC, "InvalidNodeNetworkConfig", &e),
        };
        match self.worker.apply(desired, &s.vxlan_device).await {
            Ok(applied) if !applied.is_noop() => info!(
                routes_added = applied.routes.add.len(),
                routes_removed = applied.routes.remove.len(),
                neighbours_added = applied.neighbours.add.len(),
                neighbours_removed = applied.neighbours.remove.len(),
                fdb_added = applied.fdb.add.len(),
                fdb_removed = applied.fdb.remove.len(),
                vxlan_removed = applied.vxlan_removed,
                peers = peers.len(),
                "dataplane updated"
            ),
            Ok(_) => debug!(peers = peers.len(), "dataplane unchanged"),
            Err(e) => return failed(stage::DATAPLANE, "DataplaneFailed", &e),
        }

        let written = cni::write_conflist(
            &s.cni_conf_dir,
            &s.conflist_name,
            &s.state_file,
            s.ipam_data_dir.as_deref(),
            s.cni_version.as_deref(),
        );
        match written {
            Ok(w) => {
                self.log_version_choice(&w.choice);
                if w.changed {
                    info!(
                        dir = %s.cni_conf_dir.display(),
                        file = %s.conflist_name,
                        cni_version = %w.choice.versions.cni_version,
                        cni_versions = ?w.choice.versions.cni_versions,
                        "wrote the CNI conflist"
                    )
                }
            }
            Err(e) => return failed(stage::CONFLIST, "CNIInstallFailed", &e),
        }
        match self.foreign().await {
            Ok(Some(f)) => return failed(stage::CONFLIST, f.reason, &f.message),
            Ok(None) => {}
            Err(e) => return failed(stage::DATAPLANE, "DataplaneFailed", &e),
        }
        Readiness::Ready
    }

    /// Another dataplane's device, or a network config the runtime picks
    /// before carve's ([`role::foreign`]).
    async fn foreign(&self) -> anyhow::Result<Option<role::Foreign>> {
        let s = &self.settings;
        let files = cni::config_files(&s.cni_conf_dir)?;
        let links = self.worker.link_names().await?;
        Ok(role::foreign(&s.cni_conf_dir.display().to_string(), &files, &s.conflist_name, &links))
    }

    /// [`role::Role::IpamOnly`]: nothing of carve's on the node (its conflist,
    /// VXLAN device, routes and SNAT tables go, as after a switch from its own
    /// dataplane); ready once the NNC has blocks for the other dataplane.
    async fn reconcile_ipam_only(&self, own: Option<&NodeNetworkConfig>) -> Readiness {
        let s = &self.settings;
        match cni::remove_conflist(&s.cni_conf_dir, &s.conflist_name) {
            Ok(true) => info!(conflist = %s.conflist_name, "removed carve's CNI conflist: ipam-only"),
            Ok(false) => {}
            Err(e) => {
                self.metrics.reconcile_error(stage::CONFLIST);
                return Readiness::not("CNIInstallFailed", e.to_string());
            }
        }
        match self.worker.apply(plan::Desired::default(), &s.vxlan_device).await {
            Ok(applied) if !applied.is_noop() => info!(
                routes_removed = applied.routes.remove.len(),
                vxlan_removed = applied.vxlan_removed,
                "removed carve's dataplane: ipam-only"
            ),
            Ok(_) => {}
            Err(e) => {
                self.metrics.reconcile_error(stage::DATAPLANE);
                return Readiness::not("DataplaneFailed", e.to_string());
            }
        }
        match own.and_then(|o| o.status.as_ref()) {
            Some(status) if !status.blocks.is_empty() => Readiness::Ready,
            Some(_) => Readiness::not("WaitingForBlocks", format!("NodeNetworkConfig {} has no blocks yet", s.node)),
            None => Readiness::not("NoNodeNetworkConfig", format!("no NodeNetworkConfig {} yet", s.node)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carve_crds::{NodeBlock, NodeNetworkConfigSpec, NodeNetworkConfigStatus, PodCidrSpec, PoolCidr};

    #[test]
    fn a_demand_peak_holds_releases_for_the_window_then_goes() {
        let t0 = std::time::Instant::now();
        let mut h = DemandHistory::default();
        h.0.push_back((t0, [(IpFamily::IPv4, 40)].into()));
        h.0.push_back((t0 + std::time::Duration::from_secs(1), [(IpFamily::IPv4, 2)].into()));
        assert!(h.holds_release(), "40 a second ago, 2 now");
        assert_eq!(h.peaks(t0 + std::time::Duration::from_secs(2)), [(IpFamily::IPv4, 40)].into());
        let later = t0 + scaler::RELEASE_STABILIZATION + std::time::Duration::from_millis(1);
        assert_eq!(h.peaks(later), [(IpFamily::IPv4, 2)].into(), "the peak left the window");
        assert!(!h.holds_release());
    }

    fn settings() -> Settings {
        Settings {
            node: "node-a".into(),
            state_file: "/run/carve/node-state.json".into(),
            ipam_data_dir: None,
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_source_dir: "/usr/local/bin".into(),
            conflist_name: cni::DEFAULT_CONFLIST.into(),
            cni_version: None,
            non_masquerade_cidrs: vec!["192.168.0.0/16".into()],
            vxlan_device: "carve.vxlan".into(),
            vni: 4097,
            vxlan_port: 4789,
            mtu: None,
            no_address_taint: true,
            role: role::Role::Dataplane,
        }
    }

    fn nnc(name: &str, mode: PoolMode, ip: Option<&str>, blocks: &[&str]) -> NodeNetworkConfig {
        let mut n = NodeNetworkConfig::new(name, NodeNetworkConfigSpec::default());
        n.status = Some(NodeNetworkConfigStatus {
            mode: Some(mode),
            node_ip: ip.map(String::from),
            blocks: blocks
                .iter()
                .map(|c| NodeBlock { cidr: c.to_string(), family: IpFamily::IPv4, gateway: None, allocation_id: None })
                .collect(),
            ..Default::default()
        });
        n
    }

    fn pool(name: &str, mode: PoolMode, cidrs: &[&str]) -> Arc<PodCidr> {
        Arc::new(PodCidr::new(
            name,
            PodCidrSpec {
                mode,
                cidrs: cidrs.iter().map(|c| PoolCidr(c.to_string())).collect(),
                block_size: Default::default(),
                node_selector: None,
                disabled: false,
                exclusions: vec![],
                allocation: None,
            },
        ))
    }

    #[test]
    fn peers_skip_self_bad_and_blockless_nodes() {
        let nncs = [
            nnc("node-a", PoolMode::Overlay, Some("10.0.0.1"), &["10.244.1.0/24"]),
            nnc("node-c", PoolMode::Overlay, Some("10.0.0.3"), &["10.244.3.0/24"]),
            nnc("node-b", PoolMode::Overlay, Some("10.0.0.2"), &["10.244.2.0/24"]),
            nnc("node-d", PoolMode::Overlay, Some("not-an-ip"), &["10.244.4.0/24"]),
            nnc("node-e", PoolMode::Overlay, Some("10.0.0.5"), &[]),
            nnc("node-f", PoolMode::Overlay, None, &["10.244.6.0/24"]),
            nnc("node-g", PoolMode::Overlay, Some("10.0.0.7"), &["10.244.7.0"]),
        ]
        .map(Arc::new);
        let names: Vec<String> = peers(&nncs, "node-a").into_iter().map(|p| p.node).collect();
        assert_eq!(names, ["node-b", "node-c"]);
    }

    #[test]
    fn node_state_waits_for_blocks_and_collects_cluster_cidrs() {
        let s = settings();
        let pools = [
            pool("ovl", PoolMode::Overlay, &["10.244.0.0/16"]),
            pool("more", PoolMode::Overlay, &["10.245.0.0/16"]),
            pool("flat", PoolMode::VNet, &["10.1.0.0/16"]),
        ];
        assert!(matches!(
            node_state(&s, None, &pools, 1500, &none()),
            Err(Readiness::NotReady { reason: "NoNodeNetworkConfig", .. })
        ));
        let empty = nnc("node-a", PoolMode::Overlay, Some("10.0.0.1"), &[]);
        assert!(matches!(
            node_state(&s, Some(&empty), &pools, 1500, &none()),
            Err(Readiness::NotReady { reason: "WaitingForBlocks", .. })
        ));
        let own = nnc("node-a", PoolMode::Overlay, Some("10.0.0.1"), &["10.244.1.0/24"]);
        let st = node_state(&s, Some(&own), &pools, 9000, &none()).unwrap();
        assert_eq!(st.cluster_pod_cidrs, ["10.244.0.0/16", "10.245.0.0/16"]);
        assert_eq!(st.non_masquerade_cidrs, ["192.168.0.0/16"]);
        assert_eq!(st.mtu, 8950, "Overlay: underlay - 50");
        assert_eq!(st.node_ip, "10.0.0.1");

        let flat = nnc("node-a", PoolMode::VNet, Some("10.1.0.4"), &["10.1.1.0/28"]);
        let st = node_state(&s, Some(&flat), &pools, 1500, &none()).unwrap();
        assert_eq!((st.mtu, st.cluster_pod_cidrs.clone()), (1500, vec!["10.1.0.0/16".to_string()]));
        let st = node_state(&Settings { mtu: Some(1300), ..s.clone() }, Some(&flat), &[], 1500, &none()).unwrap();
        assert_eq!((st.mtu, st.cluster_pod_cidrs), (1300, vec!["10.1.1.0/28".to_string()]));
    }

    fn none() -> BTreeSet<IpNet> {
        BTreeSet::new()
    }

    #[test]
    fn node_state_leaves_out_releasing_blocks_and_carries_reservations_and_strategy() {
        let mut own = nnc("node-a", PoolMode::VNet, Some("10.1.0.4"), &["10.1.1.0/28", "10.1.1.16/28"]);
        let status = own.status.as_mut().unwrap();
        status.strategy = Some(carve_crds::AllocationStrategy::Dynamic);
        status.reserved_ips = vec!["10.1.1.5".into()];
        let releasing: BTreeSet<IpNet> = ["10.1.1.16/28".parse().unwrap()].into();
        let st = node_state(&settings(), Some(&own), &[], 1500, &releasing).unwrap();
        assert_eq!(st.blocks.iter().map(|b| b.cidr.as_str()).collect::<Vec<_>>(), ["10.1.1.0/28"]);
        assert_eq!(
            (st.strategy, st.reserved_ips),
            (carve_crds::AllocationStrategy::Dynamic, vec!["10.1.1.5".to_string()])
        );
        let all: BTreeSet<IpNet> = ["10.1.1.0/28".parse().unwrap(), "10.1.1.16/28".parse().unwrap()].into();
        assert!(matches!(
            node_state(&settings(), Some(&own), &[], 1500, &all),
            Err(Readiness::NotReady { reason: "WaitingForBlocks", .. })
        ));
    }

    #[test]
    fn condition_is_false_only_when_ready_and_keeps_transition_time() {
        let t0 = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let t1 = Time("2026-01-01T00:01:00Z".parse().unwrap());
        let waiting = Readiness::not("WaitingForBlocks", "no blocks");
        let c0 = condition(&waiting, None, t0.clone());
        assert_eq!((c0.status.as_str(), c0.reason.as_deref()), ("True", Some("WaitingForBlocks")));
        let c1 = condition(&Readiness::not("DataplaneFailed", "x"), Some(&c0), t1.clone());
        assert_eq!(c1.last_transition_time, Some(t0), "still True: transition time kept");
        let c2 = condition(&Readiness::Ready, Some(&c1), t1.clone());
        assert_eq!((c2.status.as_str(), c2.reason.as_deref()), ("False", Some(READY_REASON)));
        assert_eq!(c2.last_transition_time, Some(t1));
    }
}
