//! The Kubernetes edge: keeps one NodeNetworkConfig per Node with the blocks
//! the index carved, and each PodCIDR's status.
//!
//! ```text
//!   Node ──reconcile──▶ index.assign ──▶ NNC (create, status) ──▶ Node podCIDRs (kubenet)
//!   PodCIDR ─────────▶ index.set_pools (on spec change) ──▶ every Node re-reconciled
//!   sweep (timer)    ─▶ NNCs/holdings whose Node is really gone ──▶ delete NNC, release blocks
//!   pool_status (timer) ▶ PodCIDR status: usage per family, Ready/Exhausted/Invalid
//! ```
//!
//! Only the Lease holder runs any of this. Before the first reconcile,
//! `rebuild` occupies every block the API records (invariant 1).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carve_crds::net::IpFamily;
use carve_crds::{
    FamilyUsage, NodeNetworkConfig, NodeNetworkConfigSpec, NodeNetworkConfigStatus, PodCidr, PodCidrStatus, PoolMode,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::index::{AssignProblem, BlockProblem, Index, NodeView, PoolView};
use crate::metrics::Metrics;
use crate::views;

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

pub struct Ctx {
    pub client: Client,
    pub cfg: Config,
    pub index: Mutex<Index>,
    pool_views: Mutex<Vec<PoolView>>,
    pub pools: Store<PodCidr>,
    pub nncs: Store<NodeNetworkConfig>,
    pub nodes: Store<Node>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Problems found while rebuilding, reported on each node's first reconcile.
    stash: Mutex<HashMap<String, Vec<BlockProblem>>>,
    /// Our last write per object, keyed by name: the resourceVersion the cache
    /// showed before it, and what was written. While the cache still shows that
    /// version it has not caught up with our write, so writing again is pointless.
    written_status: Mutex<HashMap<String, (Option<String>, NodeNetworkConfigStatus)>>,
    written_pod_cidrs: Mutex<HashMap<String, Option<String>>>,
    /// NNCs this replica created that the cache may not show yet: creating
    /// again would only earn a 409 and a GET.
    created: Mutex<HashMap<String, Arc<NodeNetworkConfig>>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        cfg: Config,
        stores: (Store<PodCidr>, Store<NodeNetworkConfig>, Store<Node>),
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Ctx {
            client,
            cfg,
            index: Mutex::new(Index::new()),
            pool_views: Mutex::new(Vec::new()),
            pools: stores.0,
            nncs: stores.1,
            nodes: stores.2,
            recorder,
            metrics,
            stash: Mutex::new(HashMap::new()),
            written_status: Mutex::new(HashMap::new()),
            written_pod_cidrs: Mutex::new(HashMap::new()),
            created: Mutex::new(HashMap::new()),
        }
    }

    /// Rebuilds the index from the pool store when a pool's spec changed.
    fn refresh_pools(&self) {
        let mut views: Vec<PoolView> = self.pools.state().iter().map(|p| views::pool_view(p)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let mut last = self.pool_views.lock().expect("pool views lock");
        if *last != views {
            self.index.lock().expect("index lock").set_pools(views.clone());
            *last = views;
        }
    }
}

/// Occupies every block recorded in NNC status and every adoptable Node
/// podCIDR, from fresh LISTs, before anything new is carved.
pub async fn rebuild(ctx: &Ctx) -> Result<(), Error> {
    let started = Instant::now();
    let pools = Api::<PodCidr>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let nncs = Api::<NodeNetworkConfig>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let nodes = Api::<Node>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let mut views: Vec<PoolView> = pools.items.iter().map(views::pool_view).collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    let mut index = ctx.index.lock().expect("index lock");
    index.set_pools(views.clone());
    *ctx.pool_views.lock().expect("pool views lock") = views;
    let mut stash = ctx.stash.lock().expect("stash lock");
    let mut blocks = 0;
    for nnc in &nncs.items {
        let Some(uid) = views::owner_uid(nnc) else { continue };
        let recorded = views::recorded_blocks(nnc);
        blocks += recorded.len();
        let pool = nnc.status.as_ref().and_then(|s| s.pool.as_deref());
        let problems = index.observe(&nnc.name_any(), &uid, pool, &recorded);
        if !problems.is_empty() {
            stash.entry(nnc.name_any()).or_default().extend(problems);
        }
    }
    for node in &nodes.items {
        let problems = index.adopt(&views::node_view(node));
        if !problems.is_empty() {
            stash.entry(node.name_any()).or_default().extend(problems);
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

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Keeps the previous transition time when a condition did not change, so an
/// unchanged status compares equal and is not rewritten.
fn settle(mut conditions: Vec<Condition>, previous: &[Condition]) -> Vec<Condition> {
    for c in &mut conditions {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_)
            && p.status == c.status
            && p.reason == c.reason
            && p.message == c.message
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    conditions
}

async fn publish(
    ctx: &Ctx,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Allocate".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

pub async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let name = node.name_any();
    let uid = node.uid().unwrap_or_default();
    if node.metadata.deletion_timestamp.is_some() {
        // Held by a finalizer: the node may still run pods, so its blocks stay.
        return Ok(Action::await_change());
    }
    ctx.refresh_pools();
    let nnc_api = Api::<NodeNetworkConfig>::all(ctx.client.clone());
    let mut existing = match ctx.nncs.get(&ObjectRef::new(&name)) {
        Some(cached) => {
            ctx.created.lock().expect("created lock").remove(&name);
            Some(cached)
        }
        None => ctx.created.lock().expect("created lock").get(&name).cloned(),
    };

    if let Some(stale) = existing.as_ref().filter(|n| views::owner_uid(n).as_deref() != Some(uid.as_str())) {
        // Left by an earlier Node of the same name: never reused blindly.
        let dp = DeleteParams {
            preconditions: stale.uid().map(|u| Preconditions { uid: Some(u), resource_version: None }),
            ..Default::default()
        };
        match nnc_api.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        info!(node = %name, "replaced a NodeNetworkConfig left by an earlier node of the same name");
        existing = None;
    }

    let view: NodeView = views::node_view(&node);
    let started = Instant::now();
    let (assignment, problems) = {
        let mut index = ctx.index.lock().expect("index lock");
        if index.holding(&name).is_some_and(|h| h.uid != uid) {
            let released = index.release(&name);
            info!(node = %name, ?released, "released the blocks of an earlier node of the same name");
        }
        let mut problems = ctx.stash.lock().expect("stash lock").remove(&name).unwrap_or_default();
        if let Some(nnc) = &existing {
            let pool = nnc.status.as_ref().and_then(|s| s.pool.as_deref());
            problems.extend(index.observe(&name, &uid, pool, &views::recorded_blocks(nnc)));
        }
        let (assignment, adopt_problems) = index.assign(&view);
        problems.extend(adopt_problems);
        (assignment, problems)
    };
    if !assignment.carved.is_empty() {
        ctx.metrics.allocation_seconds.observe(started.elapsed().as_secs_f64());
    }

    let nnc = match existing {
        Some(n) => n,
        None => {
            let created = Arc::new(create_nnc(&nnc_api, &node).await?);
            ctx.created.lock().expect("created lock").insert(name.clone(), created.clone());
            created
        }
    };

    let previous = nnc.status.clone().unwrap_or_default();
    let generation = nnc.metadata.generation;
    let mut conditions = Vec::new();
    match &assignment.problem {
        None => conditions.push(condition(
            "Ready",
            true,
            "BlocksCarved",
            format!(
                "{} carved from pool {}",
                assignment.blocks.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
                assignment.pool.clone().unwrap_or_default()
            ),
            generation,
        )),
        Some(p) => conditions.push(condition("Ready", false, p.reason(), p.to_string(), generation)),
    }
    let status_problems: Vec<String> = problems
        .iter()
        .filter(|p| !matches!(p, BlockProblem::PodCidrConflict { .. } | BlockProblem::PodCidrUnfit { .. }))
        .map(|p| p.to_string())
        .collect();
    let pod_cidr_problems: Vec<String> = problems
        .iter()
        .filter(|p| matches!(p, BlockProblem::PodCidrConflict { .. } | BlockProblem::PodCidrUnfit { .. }))
        .map(|p| p.to_string())
        .collect();
    // These two record the last problem seen; they stay until one recurs or the NNC is recreated.
    for (type_, reason, found) in
        [("BlocksValid", "InvalidStatus", &status_problems), ("PodCIDRAdopted", "PodCIDRConflict", &pod_cidr_problems)]
    {
        if !found.is_empty() {
            conditions.push(condition(type_, false, reason, found.join("; "), generation));
        } else if let Some(prev) = previous.conditions.iter().find(|c| c.type_ == type_) {
            conditions.push(prev.clone());
        }
    }
    let blocks = views::node_blocks(&assignment.blocks);
    let desired = NodeNetworkConfigStatus {
        pool: assignment.pool.clone(),
        mode: assignment.mode,
        block_cidrs: (!blocks.is_empty()).then(|| blocks.iter().map(|b| b.cidr.as_str()).collect::<Vec<_>>().join(",")),
        gateway: blocks.first().and_then(|b| b.gateway.clone()),
        blocks,
        node_ip: views::internal_ip(&node),
        conditions: settle(conditions, &previous.conditions),
        observed_generation: generation,
    };
    let cache_behind = ctx
        .written_status
        .lock()
        .expect("written lock")
        .get(&name)
        .is_some_and(|(rv, status)| *rv == nnc.resource_version() && *status == desired);
    if desired != previous && !cache_behind {
        nnc_api
            .patch_status(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(json!({ "status": desired })))
            .await?;
        ctx.written_status.lock().expect("written lock").insert(name.clone(), (nnc.resource_version(), desired));
    }

    for p in &problems {
        let reason = if pod_cidr_problems.contains(&p.to_string()) { "PodCIDRConflict" } else { "InvalidStatus" };
        publish(&ctx, nnc.object_ref(&()), EventType::Warning, reason, p.to_string()).await;
    }
    // Why a node gets no blocks shows up once in `kubectl describe node`, when it starts.
    if let Some(p) = &assignment.problem
        && !previous.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == p.reason())
    {
        publish(&ctx, node.object_ref(&()), EventType::Warning, p.reason(), p.to_string()).await;
    }
    let was_exhausted = previous.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "PoolExhausted");
    if let Some(p @ AssignProblem::Exhausted { pool, .. }) = &assignment.problem
        && !was_exhausted
        && let Some(pool) = ctx.pools.get(&ObjectRef::new(pool))
    {
        let note = format!("node {name} is waiting: {p}");
        publish(&ctx, pool.object_ref(&()), EventType::Warning, "PoolExhausted", note).await;
    }

    if ctx.cfg.set_node_pod_cidrs
        && assignment.mode == Some(PoolMode::Overlay)
        && view.pod_cidrs.is_empty()
        && !assignment.blocks.is_empty()
        && assignment.problem.is_none()
    {
        let seen = node.resource_version();
        let cache_behind = ctx.written_pod_cidrs.lock().expect("written lock").get(&name) == Some(&seen);
        if !cache_behind {
            let cidrs: Vec<String> = assignment.blocks.iter().map(|b| b.to_string()).collect();
            let patch = json!({ "spec": { "podCIDR": cidrs[0], "podCIDRs": cidrs } });
            Api::<Node>::all(ctx.client.clone()).patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await?;
            ctx.written_pod_cidrs.lock().expect("written lock").insert(name.clone(), seen);
        }
    }

    Ok(match assignment.problem {
        Some(_) => Action::requeue(Duration::from_secs(60)),
        None => Action::await_change(),
    })
}

async fn create_nnc(api: &Api<NodeNetworkConfig>, node: &Node) -> Result<NodeNetworkConfig, Error> {
    let mut nnc = NodeNetworkConfig::new(&node.name_any(), NodeNetworkConfigSpec::default());
    nnc.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name_any(),
        uid: node.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    match api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &nnc).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(&node.name_any()).await?),
        Err(e) => Err(e.into()),
    }
}

pub fn error_policy(_node: Arc<Node>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&vec![("reason".to_string(), error.metric_label().to_string())]).inc();
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Releases blocks only when the Node is really gone: absent from the cache
/// *and* from a fresh GET (or present with another UID). A Node held by a
/// finalizer still exists, so it keeps its blocks.
pub async fn sweep(ctx: &Ctx) -> Result<(), Error> {
    let nodes_api = Api::<Node>::all(ctx.client.clone());
    let nnc_api = Api::<NodeNetworkConfig>::all(ctx.client.clone());
    let mut suspects: BTreeMap<String, Option<String>> = BTreeMap::new();
    for nnc in ctx.nncs.state() {
        let owner = views::owner_uid(&nnc);
        let cached = ctx.nodes.get(&ObjectRef::new(&nnc.name_any()));
        if cached.as_ref().and_then(|n| n.uid()) != owner {
            suspects.insert(nnc.name_any(), owner);
        }
    }
    let held: Vec<(String, String)> = {
        let index = ctx.index.lock().expect("index lock");
        index.holdings().map(|(n, h)| (n.clone(), h.uid.clone())).collect()
    };
    for (name, uid) in held {
        if ctx.nodes.get(&ObjectRef::new(&name)).and_then(|n| n.uid()) != Some(uid.clone()) {
            suspects.entry(name).or_insert(Some(uid));
        }
    }
    for (name, owner) in suspects {
        let live = nodes_api.get_opt(&name).await?;
        let live_uid = live.as_ref().and_then(|n| n.uid());
        if live_uid.is_some() && live_uid == owner {
            continue; // the cache was behind
        }
        if let Some(nnc) = ctx.nncs.get(&ObjectRef::new(&name))
            && views::owner_uid(&nnc) == owner
        {
            let dp = DeleteParams {
                preconditions: nnc.uid().map(|u| Preconditions { uid: Some(u), resource_version: None }),
                ..Default::default()
            };
            match nnc_api.delete(&name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut index = ctx.index.lock().expect("index lock");
        if index.holding(&name).is_some_and(|h| Some(h.uid.clone()) == owner && Some(h.uid.clone()) != live_uid) {
            let released = index.release(&name);
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
        let Some(report) = ctx.index.lock().expect("index lock").report(&name) else { continue };
        let generation = pool.metadata.generation;
        let previous = pool.status.clone().unwrap_or_default();
        let families: Vec<FamilyUsage> = report
            .usage
            .iter()
            .map(|(family, block, u)| FamilyUsage {
                family: *family,
                block_size: *block as i32,
                capacity: u.capacity.min(i64::MAX as u64) as i64,
                allocated: u.allocated as i64,
                free: u.free.min(i64::MAX as u64) as i64,
            })
            .collect();
        for f in &families {
            ctx.metrics.set_blocks(&name, f.family, f.allocated, f.free);
        }
        let mut conditions = vec![];
        match &report.invalid {
            Some(reason) => {
                conditions.push(condition("Invalid", true, "InvalidSpec", reason.clone(), generation));
                conditions.push(condition("Ready", false, "InvalidSpec", reason.clone(), generation));
            }
            None => {
                conditions.push(condition("Invalid", false, "Valid", "spec is usable".into(), generation));
                let ready_msg = if pool.spec.disabled {
                    "disabled: existing blocks stay, no new ones are carved"
                } else {
                    "carving blocks"
                };
                conditions.push(condition(
                    "Ready",
                    !pool.spec.disabled,
                    if pool.spec.disabled { "Disabled" } else { "Serving" },
                    ready_msg.into(),
                    generation,
                ));
            }
        }
        let exhausted = !report.exhausted.is_empty();
        let families_txt = report.exhausted.iter().map(IpFamily::to_string).collect::<Vec<_>>().join(" and ");
        conditions.push(condition(
            "Exhausted",
            exhausted,
            if exhausted { "NoFreeBlock" } else { "FreeBlocks" },
            if exhausted {
                format!("no free {families_txt} block; append a CIDR to spec.cidrs")
            } else {
                "free blocks remain".into()
            },
            generation,
        ));
        if !report.retired.is_empty() {
            let cidrs = report.retired.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
            conditions.push(condition(
                "RemovalRefused",
                true,
                "CIDRInUse",
                format!("{cidrs} left spec.cidrs but still holds blocks; it serves no new node. Drain those nodes, or add it back"),
                generation,
            ));
        }
        let desired = PodCidrStatus {
            allocated: families.iter().map(|f| f.allocated).sum(),
            free: families.iter().map(|f| f.free).fold(0i64, |a, b| a.saturating_add(b)),
            families,
            conditions: settle(conditions, &previous.conditions),
            observed_generation: generation,
        };
        if desired != previous {
            let was = |t: &str| previous.conditions.iter().any(|c| c.type_ == t && c.status == "True");
            for c in desired.conditions.iter().filter(|c| {
                c.status == "True" && (c.type_ == "Invalid" || c.type_ == "RemovalRefused" || c.type_ == "Exhausted")
            }) {
                if !was(&c.type_) {
                    publish(ctx, pool.object_ref(&()), EventType::Warning, &c.reason, c.message.clone()).await;
                }
            }
            api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(json!({ "status": desired })))
                .await?;
        }
    }
    Ok(())
}
