//! The Kubernetes edge: keeps one NodeNetworkConfig per Node with the blocks
//! the index carved, and each PodCIDR's status.
//!
//! ```text
//!   Node ─reconcile─▶ current_nnc ─▶ assign (index: releases, grants) ─▶ create_nnc ─▶ status::nnc_status
//!                     ─▶ write_nnc_status (conditioned on the resourceVersion when it honours a release)
//!                     ─▶ index.commit (quarantine) ─▶ Events (status::nnc_notices, address conflicts)
//!                     ─▶ write_pod_cidrs (kubenet) ─▶ nudge the nodes whose blocks hold this node's address
//!   PodCIDR change ─▶ index.set_pools ─▶ every Node re-reconciled
//!   sweep (timer) ──▶ NNCs/holdings whose Node is really gone ─▶ delete NNC, release blocks
//!   pool_status (timer) ─▶ status::pool_status ─▶ PodCIDR status, Events on transitions
//! ```
//!
//! Only the Lease holder runs any of this. Before the first reconcile,
//! `rebuild` occupies every block the API records (invariant 1, README "Invariants"). Every
//! write is a server-side apply under one field manager, `carve-controller`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use carve_crds::{NodeNetworkConfig, NodeNetworkConfigSpec, NodeNetworkConfigStatus, PodCidr, PoolMode};
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::index::{Assignment, BlockProblem, Index, PoolView, Request};
use crate::metrics::{Metrics, PoolLabels, ReasonLabels};
use crate::status::{self, Notice, Subject};
use crate::views::{self, PartialNode};
use carve_crds::AddressConflict;
use k8s_openapi::api::core::v1::Pod;

pub const FIELD_MANAGER: &str = "carve-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Short label for the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Write Node `.spec.podCIDR(s)` (when empty) for Overlay pools.
    pub set_node_pod_cidrs: bool,
}

/// What the reconcilers change, behind one lock that is never held across an
/// await.
#[derive(Default)]
struct State {
    index: Index,
    /// The pools the index was last given, to skip unchanged ones.
    pool_views: Vec<PoolView>,
    /// Problems found while rebuilding, reported on each node's first reconcile.
    stash: HashMap<String, Vec<BlockProblem>>,
    /// Our last status write per NNC: the resourceVersion the cache showed
    /// before it, and what was written. While the cache still shows that
    /// version, what was written is what the API server has.
    written_status: HashMap<String, (Option<String>, NodeNetworkConfigStatus)>,
    written_pod_cidrs: HashMap<String, Option<String>>,
    /// NNCs this replica created that the cache may not show yet: creating
    /// again would only earn a 409 and a GET.
    created: HashMap<String, Arc<NodeNetworkConfig>>,
    /// Failed reconciles in a row per Node, for the retry backoff.
    failures: HashMap<String, u32>,
}

impl State {
    fn set_pools(&mut self, mut views: Vec<PoolView>) {
        views.sort_by(|a, b| a.name.cmp(&b.name));
        if self.pool_views != views {
            for problem in self.index.set_pools(views.clone()) {
                warn!(%problem, "pool spec change");
                if let BlockProblem::HeldBlockRefused { node, .. } = &problem {
                    // Reported on the node's next reconcile, as a rebuild's problems are.
                    self.stash.entry(node.clone()).or_default().push(problem);
                }
            }
            self.pool_views = views;
        }
    }
}

pub struct Ctx {
    client: Client,
    cfg: Config,
    state: Mutex<State>,
    pools: Store<PodCidr>,
    nncs: Store<NodeNetworkConfig>,
    nodes: Store<PartialNode>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Reconciles another Node (one whose blocks hold a new node's address).
    nudge: UnboundedSender<ObjectRef<PartialNode>>,
}

/// The caches the controller reads.
pub struct Stores {
    pub pools: Store<PodCidr>,
    pub nncs: Store<NodeNetworkConfig>,
    pub nodes: Store<PartialNode>,
}

impl Ctx {
    pub fn new(
        client: Client,
        cfg: Config,
        stores: Stores,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        nudge: UnboundedSender<ObjectRef<PartialNode>>,
    ) -> Self {
        let Stores { pools, nncs, nodes } = stores;
        Ctx { client, cfg, state: Mutex::default(), pools, nncs, nodes, recorder, metrics, nudge }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("controller state lock")
    }

    /// Hands the index the cached pools when a pool's spec changed.
    fn refresh_pools(&self) {
        let views = self.pools.state().iter().map(|p| views::pool_view(p)).collect();
        self.state().set_pools(views);
    }

    async fn publish(&self, notice: Notice, node: &PartialNode, nnc: Option<&NodeNetworkConfig>) {
        let reference = match &notice.subject {
            Subject::Node => Some(node.object_ref(&())),
            Subject::Nnc => nnc.map(|n| n.object_ref(&())),
            Subject::Pool(pool) => self.pools.get(&ObjectRef::new(pool)).map(|p| p.object_ref(&())),
        };
        if let Some(reference) = reference {
            self.publish_to(reference, notice).await;
        }
    }

    /// A Node that joined with an address inside `holder`'s blocks: Events on
    /// both Nodes, and on any pod already using the address (found by
    /// `status.podIP`; carve does not evict it).
    async fn announce_conflict(&self, holder: &PartialNode, nnc: &NodeNetworkConfig, conflict: &AddressConflict) {
        let note = format!(
            "Node {} has address {}, inside a block of node {}: withheld from new pods there",
            conflict.node,
            conflict.ip,
            holder.name_any()
        );
        let notice = |note: String| Notice { subject: Subject::Nnc, reason: "NodeAddressInBlock".into(), note };
        self.publish_to(nnc.object_ref(&()), notice(note.clone())).await;
        self.publish_to(holder.object_ref(&()), notice(note.clone())).await;
        if let Some(other) = self.nodes.get(&ObjectRef::new(&conflict.node)) {
            self.publish_to(other.object_ref(&()), notice(note.clone())).await;
        }
        let by_ip = ListParams::default().fields(&format!("status.podIP={}", conflict.ip));
        match Api::<Pod>::all(self.client.clone()).list(&by_ip).await {
            Ok(pods) => {
                for pod in pods.items.iter().filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true)) {
                    let note = format!(
                        "pod {}/{} uses {}, the address of Node {}: traffic to one of them goes astray; move the pod \
                         (carve withholds the address from new pods)",
                        pod.namespace().unwrap_or_default(),
                        pod.name_any(),
                        conflict.ip,
                        conflict.node
                    );
                    self.publish_to(pod.object_ref(&()), notice(note.clone())).await;
                    self.publish_to(holder.object_ref(&()), notice(note.clone())).await;
                    if let Some(other) = self.nodes.get(&ObjectRef::new(&conflict.node)) {
                        self.publish_to(other.object_ref(&()), notice(note)).await;
                    }
                }
            }
            Err(e) => warn!(error = %e, ip = %conflict.ip, "could not look for a pod using a Node's address"),
        }
    }

    async fn publish_to(&self, reference: ObjectReference, notice: Notice) {
        let event = Event {
            type_: EventType::Warning,
            reason: notice.reason.clone(),
            note: Some(notice.note),
            action: "Allocate".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = %notice.reason, "could not publish event");
        }
    }
}

/// Occupies every block recorded in NNC status and every adoptable Node
/// podCIDR, from fresh LISTs, before anything new is carved.
pub async fn rebuild(ctx: &Ctx) -> Result<(), Error> {
    let started = Instant::now();
    let pools = Api::<PodCidr>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let nncs = Api::<NodeNetworkConfig>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let nodes = Api::<PartialNode>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let mut state = ctx.state();
    let state = &mut *state;
    state.set_pools(pools.items.iter().map(views::pool_view).collect());
    let mut blocks = 0;
    for nnc in &nncs.items {
        let Some(uid) = views::owner_uid(nnc) else { continue };
        let recorded = views::recorded_blocks(nnc);
        blocks += recorded.len();
        let pool = nnc.status.as_ref().and_then(|s| s.pool.as_deref());
        let problems = state.index.observe(&nnc.name_any(), &uid, pool, &recorded);
        if !problems.is_empty() {
            state.stash.entry(nnc.name_any()).or_default().extend(problems);
        }
    }
    for node in &nodes.items {
        let view = views::node_view(node);
        state.index.set_node_ips(&view.name, &view.internal_ips);
    }
    for node in &nodes.items {
        let problems = state.index.adopt(&views::node_view(node));
        if !problems.is_empty() {
            state.stash.entry(node.name_any()).or_default().extend(problems);
        }
    }
    info!(
        pools = pools.items.len(),
        nncs = nncs.items.len(),
        nodes = nodes.items.len(),
        blocks,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "rebuilt allocations from the API"
    );
    Ok(())
}

/// One Node: its NNC, its blocks, the NNC's status, the Events, and (kubenet
/// compatibility) its podCIDRs.
pub async fn reconcile(node: Arc<PartialNode>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let started = std::time::Instant::now();
    let name = node.name_any();
    let result = reconcile_node(node, &ctx).await;
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.state().failures.remove(&name);
    }
    result
}

async fn reconcile_node(node: Arc<PartialNode>, ctx: &Arc<Ctx>) -> Result<Action, Error> {
    if node.metadata.deletion_timestamp.is_some() {
        // Held by a finalizer: the node may still run pods, so its blocks stay.
        return Ok(Action::await_change());
    }
    ctx.refresh_pools();
    let existing = current_nnc(ctx, &node).await?;
    let request = views::request(existing.as_deref());
    let now = Time(Timestamp::now());
    let (assignment, problems) = assign(ctx, &node, existing.as_deref(), &request, now.0.as_second());
    let nnc = match existing {
        Some(n) => n,
        None => create_nnc(ctx, &node).await?,
    };
    let previous = known_status(ctx, &nnc);
    let desired =
        status::nnc_status(&assignment, &problems, views::internal_ip(&node), nnc.metadata.generation, &previous, &now);
    let conflicts = status::new_conflicts(&previous, &desired);
    if desired != previous {
        // A release is honoured only against the spec that carried it.
        let fence = (!assignment.released.is_empty()).then(|| nnc.resource_version()).flatten();
        write_nnc_status(ctx, &nnc, desired, fence).await?;
    }
    ctx.state().index.commit(&node.name_any(), &assignment);
    ctx.metrics.releases.inc_by(assignment.released.len() as u64);
    for notice in status::nnc_notices(&node.name_any(), &assignment, &problems, &previous) {
        ctx.publish(notice, &node, Some(&nnc)).await;
    }
    for conflict in &conflicts {
        ctx.announce_conflict(&node, &nnc, conflict).await;
    }
    write_pod_cidrs(ctx, &node, &assignment).await?;
    for holder in &assignment.holders_of_my_ips {
        let _ = ctx.nudge.unbounded_send(ObjectRef::new(holder));
    }
    let quarantine_ends = assignment.quarantined.iter().map(|q| q.until).min();
    Ok(match (quarantine_ends, &assignment.problem) {
        (Some(until), _) => Action::requeue(Duration::from_secs((until - now.0.as_second()).clamp(1, 3600) as u64)),
        (None, Some(_)) => Action::requeue(Duration::from_secs(60)),
        (None, None) if !assignment.unmet.is_empty() => Action::requeue(Duration::from_secs(60)),
        (None, None) => Action::await_change(),
    })
}

/// The node's NNC as the cache (or our own create) shows it; one left by an
/// earlier Node of the same name is deleted, never reused blindly.
async fn current_nnc(ctx: &Ctx, node: &PartialNode) -> Result<Option<Arc<NodeNetworkConfig>>, Error> {
    let name = node.name_any();
    let existing = match ctx.nncs.get(&ObjectRef::new(&name)) {
        Some(cached) => {
            ctx.state().created.remove(&name);
            Some(cached)
        }
        None => ctx.state().created.get(&name).cloned(),
    };
    let Some(stale) = existing.as_ref().filter(|n| views::owner_uid(n) != node.uid()) else { return Ok(existing) };
    delete_nnc(ctx, stale).await?;
    ctx.state().created.remove(&name);
    info!(node = %name, "replaced a NodeNetworkConfig left by an earlier node of the same name");
    Ok(None)
}

/// The node's blocks: what its NNC records is occupied first (the API is the
/// truth), then whatever its pool still owes it is carved.
fn assign(
    ctx: &Ctx,
    node: &PartialNode,
    nnc: Option<&NodeNetworkConfig>,
    request: &Request,
    now: i64,
) -> (Assignment, Vec<BlockProblem>) {
    let name = node.name_any();
    let uid = node.uid().unwrap_or_default();
    let started = Instant::now();
    let mut state = ctx.state();
    let state = &mut *state;
    if state.index.holding(&name).is_some_and(|h| h.uid != uid) {
        let released = state.index.release(&name);
        info!(node = %name, ?released, "released the blocks of an earlier node of the same name");
    }
    let mut problems = state.stash.remove(&name).unwrap_or_default();
    if let Some(nnc) = nnc {
        let pool = nnc.status.as_ref().and_then(|s| s.pool.as_deref());
        problems.extend(state.index.observe(&name, &uid, pool, &views::recorded_blocks(nnc)));
    }
    let (assignment, adopt_problems) = state.index.assign(&views::node_view(node), request, now);
    problems.extend(adopt_problems);
    if !assignment.carved.is_empty() {
        ctx.metrics.allocation_seconds.observe(started.elapsed().as_secs_f64());
    }
    (assignment, problems)
}

async fn create_nnc(ctx: &Ctx, node: &PartialNode) -> Result<Arc<NodeNetworkConfig>, Error> {
    let api = Api::<NodeNetworkConfig>::all(ctx.client.clone());
    let name = node.name_any();
    let mut nnc = NodeNetworkConfig::new(&name, NodeNetworkConfigSpec::default());
    nnc.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: name.clone(),
        uid: node.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let created = match api.create(&post, &nnc).await {
        Ok(created) => created,
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let found = api.get(&name).await?;
            if views::owner_uid(&found) == node.uid() {
                found
            } else {
                // Left by an earlier Node of the same name that the cache has
                // not shown yet: the same replacement as current_nnc's.
                delete_nnc(ctx, &found).await?;
                info!(node = %name, "replaced a NodeNetworkConfig left by an earlier node of the same name");
                api.create(&post, &nnc).await?
            }
        }
        Err(e) => return Err(e.into()),
    };
    let created = Arc::new(created);
    ctx.state().created.insert(name, created.clone());
    Ok(created)
}

/// Deletes `nnc`, only that incarnation of it (UID precondition).
async fn delete_nnc(ctx: &Ctx, nnc: &NodeNetworkConfig) -> Result<(), Error> {
    let dp = DeleteParams {
        preconditions: nnc.uid().map(|u| Preconditions { uid: Some(u), resource_version: None }),
        ..Default::default()
    };
    match Api::<NodeNetworkConfig>::all(ctx.client.clone()).delete(&nnc.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side apply under carve-controller's field manager, forced: these
/// fields are the controller's alone.
fn apply() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The apply body for `K`'s status (or spec): apiVersion, kind, name and `fields`.
fn apply_body<K: Resource<DynamicType = ()>>(name: &str, fields: serde_json::Value) -> Patch<serde_json::Value> {
    let mut body = json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "metadata": { "name": name } });
    if let (Some(body), serde_json::Value::Object(fields)) = (body.as_object_mut(), fields) {
        body.extend(fields);
    }
    Patch::Apply(body)
}

/// The NNC's status as the API server has it: our last write while the
/// cache still shows the version before it, else the cached one.
fn known_status(ctx: &Ctx, nnc: &NodeNetworkConfig) -> NodeNetworkConfigStatus {
    let mut state = ctx.state();
    let name = nnc.name_any();
    match state.written_status.get(&name) {
        Some((rv, written)) if *rv == nnc.resource_version() => return written.clone(),
        // The cache caught up: the memo is no longer needed.
        Some(_) => {
            state.written_status.remove(&name);
        }
        None => {}
    }
    nnc.status.clone().unwrap_or_default()
}

/// Applies `desired` as the NNC's status and remembers it against the
/// version the cache showed. With `fence`, only if the NNC is still at that
/// resourceVersion (a 409 otherwise: the agent changed its spec meanwhile).
async fn write_nnc_status(
    ctx: &Ctx,
    nnc: &NodeNetworkConfig,
    desired: NodeNetworkConfigStatus,
    fence: Option<String>,
) -> Result<(), Error> {
    let name = nnc.name_any();
    let mut body = json!({ "status": desired });
    if let Some(rv) = fence {
        body["metadata"] = json!({ "name": name, "resourceVersion": rv });
    }
    let body = apply_body::<NodeNetworkConfig>(&name, body);
    Api::<NodeNetworkConfig>::all(ctx.client.clone()).patch_status(&name, &apply(), &body).await?;
    ctx.state().written_status.insert(name, (nnc.resource_version(), desired));
    Ok(())
}

/// Kubenet compatibility: an Overlay node without podCIDRs gets its blocks
/// there, once (the API server refuses to change them later).
async fn write_pod_cidrs(ctx: &Ctx, node: &PartialNode, assignment: &Assignment) -> Result<(), Error> {
    let name = node.name_any();
    if !views::node_view(node).pod_cidrs.is_empty() {
        // Set (by us or anyone): nothing to remember.
        ctx.state().written_pod_cidrs.remove(&name);
        return Ok(());
    }
    if !ctx.cfg.set_node_pod_cidrs
        || assignment.mode != Some(PoolMode::Overlay)
        || assignment.grants.is_empty()
        || assignment.problem.is_some()
    {
        return Ok(());
    }
    let seen = node.resource_version();
    if ctx.state().written_pod_cidrs.get(&name) == Some(&seen) {
        return Ok(());
    }
    let cidrs: Vec<String> = assignment.blocks().iter().map(|b| b.to_string()).collect();
    let body = apply_body::<PartialNode>(&name, json!({ "spec": { "podCIDR": cidrs[0], "podCIDRs": cidrs } }));
    Api::<PartialNode>::all(ctx.client.clone()).patch(&name, &apply(), &body).await?;
    ctx.state().written_pod_cidrs.insert(name, seen);
    Ok(())
}

/// Retries a failed Node after 1 s, doubling with each failure in a row up
/// to a minute, so a node the API server keeps refusing does not spin.
pub fn error_policy(node: Arc<PartialNode>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabels { reason: error.metric_label() }).inc();
    let name = node.name_any();
    let failures = {
        let mut state = ctx.state();
        let n = state.failures.entry(name.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = retry_delay(failures);
    warn!(node = %name, %error, failures, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Releases blocks only when the Node is really gone: absent from the cache
/// *and* from a fresh GET (or present with another UID). A Node held by a
/// finalizer still exists, so it keeps its blocks.
pub async fn sweep(ctx: &Ctx) -> Result<(), Error> {
    let nodes_api = Api::<PartialNode>::all(ctx.client.clone());
    let cached_uid = |name: &str| ctx.nodes.get(&ObjectRef::new(name)).and_then(|n| n.uid());
    let mut suspects: BTreeMap<String, Option<String>> = BTreeMap::new();
    for nnc in ctx.nncs.state() {
        let owner = views::owner_uid(&nnc);
        if cached_uid(&nnc.name_any()) != owner {
            suspects.insert(nnc.name_any(), owner);
        }
    }
    let held: Vec<(String, String)> = ctx.state().index.holdings().map(|(n, h)| (n.clone(), h.uid.clone())).collect();
    for (name, uid) in held {
        if cached_uid(&name).as_ref() != Some(&uid) {
            suspects.entry(name).or_insert(Some(uid));
        }
    }
    for (name, owner) in suspects {
        let live_uid = nodes_api.get_opt(&name).await?.and_then(|n| n.uid());
        if live_uid.is_some() && live_uid == owner {
            continue; // the cache was behind
        }
        if let Some(nnc) = ctx.nncs.get(&ObjectRef::new(&name))
            && views::owner_uid(&nnc) == owner
        {
            delete_nnc(ctx, &nnc).await?;
        }
        let mut state = ctx.state();
        if state
            .index
            .holding(&name)
            .is_some_and(|h| Some(&h.uid) == owner.as_ref() && Some(&h.uid) != live_uid.as_ref())
        {
            let released = state.index.release(&name);
            info!(node = %name, ?released, "node is gone; blocks returned to the pool");
        }
    }
    Ok(())
}

/// Writes each PodCIDR's usage and conditions; emits events on transitions.
pub async fn pool_status(ctx: &Ctx) -> Result<(), Error> {
    ctx.refresh_pools();
    let api = Api::<PodCidr>::all(ctx.client.clone());
    for pool in ctx.pools.state() {
        let name = pool.name_any();
        let Some(report) = ctx.state().index.report(&name) else { continue };
        let desired = status::pool_status(&pool, &report, &Time(Timestamp::now()));
        for f in &desired.families {
            ctx.metrics.set_blocks(&name, f.family, f.allocated, f.free, f.quarantined);
        }
        ctx.metrics.unmet.get_or_create(&PoolLabels { pool: name.clone() }).set(desired.unmet_requests);
        let previous = pool.status.clone().unwrap_or_default();
        if desired == previous {
            continue;
        }
        for notice in status::pool_notices(&previous, &desired, &name) {
            ctx.publish_to(pool.object_ref(&()), notice).await;
        }
        api.patch_status(&name, &apply(), &apply_body::<PodCidr>(&name, json!({ "status": desired }))).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_a_second_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod mock_api;
