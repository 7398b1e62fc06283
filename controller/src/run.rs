//! carve-controller's wiring: CRD check, leader election, one watch per
//! kind, the Node controller and the housekeeping timer. The binary parses
//! flags and serves /metrics; tests can run this in-process.
//!
//! ```text
//!   PodCIDR watch ─▶ pool cache ─(spec changes)───────▶ reconcile every Node
//!   NNC watch ────▶ NNC cache ──(any change, deletes)─▶ reconcile its Node
//!   Node watch ───▶ Node cache ─(fields carve reads)──▶ reconcile that Node
//!   timer ────────▶ sweep (Nodes really gone), pool status
//! ```
//!
//! The watches start only once this replica leads: a standby holds no cache.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use carve_crds::{NodeNetworkConfig, PodCidr};
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::leader::{LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{self, Ctx, Stores};
use crate::views::{self, PartialNode};

/// What the controller runs with (the binary's flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name on the Lease and on its Events.
    pub identity: String,
    /// Leader election; `None` runs as the only writer.
    pub lease: Option<LeaseConfig>,
    pub reconcile: reconcile::Config,
    /// Nodes reconciled at once.
    pub concurrency: u16,
    /// How often to look for Nodes that are gone and for pool status changes.
    pub sweep_interval: Duration,
}

/// Fails with a clear message when the CRDs are not installed.
async fn check_crds(client: &Client) -> Result<()> {
    let lp = ListParams::default().limit(1);
    for (name, result) in [
        ("podcidrs.carve.dev", Api::<PodCidr>::all(client.clone()).list_metadata(&lp).await.map(|_| ())),
        (
            "nodenetworkconfigs.carve.dev",
            Api::<NodeNetworkConfig>::all(client.clone()).list_metadata(&lp).await.map(|_| ()),
        ),
    ] {
        match result {
            Ok(()) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                bail!(
                    "the API server does not serve {name}: carve's CRDs are not installed; run `kubectl apply -f crds/`"
                )
            }
            Err(e) => return Err(e).with_context(|| format!("listing {name}")),
        }
    }
    Ok(())
}

/// Keeps only what reaches the cache and turns `interest` (on the changed
/// objects) into reconcile triggers: the cache task runs on its own, so the
/// cache is complete before the first reconcile reads it.
fn cache<K, T>(
    api: Api<K>,
    mut interest: impl FnMut(Arc<K>) -> Option<T> + Send + 'static,
) -> (reflector::Store<K>, impl Stream<Item = T> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    T: Send + 'static,
{
    let (store, writer) = reflector::store();
    let (tx, rx) = mpsc::unbounded();
    let kind = K::kind(&());
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects();
    tokio::spawn(events.for_each(move |r| {
        match r {
            Ok(o) => {
                if let Some(t) = interest(Arc::new(o)) {
                    let _ = tx.unbounded_send(t);
                }
            }
            Err(e) => warn!(error = %e, %kind, "watch failed; retrying"),
        }
        futures::future::ready(())
    }));
    (store, rx)
}

/// The Node cache, as `PartialNode`s without managed fields or annotations
/// (real nodes carry many; carve reads none), and the Nodes to reconcile:
/// only changes to what carve reads, not kubelet's status reports.
fn node_cache(
    client: &Client,
) -> (reflector::Store<PartialNode>, impl Stream<Item = Result<PartialNode, watcher::Error>> + Send + 'static) {
    let (store, writer) = reflector::store();
    let changes = watcher(Api::<PartialNode>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|n: &mut PartialNode| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(views::node_fields, Default::default());
    (store, changes)
}

/// Runs the controller until SIGTERM / Ctrl-C or until it loses the Lease
/// (an error: a fresh start rebuilds from the API).
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Result<()> {
    check_crds(&client).await?;
    let elector = settings.lease.clone().map(|cfg| LeaderElector::new(client.clone(), cfg));
    // A standby is ready: nothing to sync until it leads.
    metrics.ready.store(true, Ordering::Relaxed);
    if let Some(e) = &elector {
        info!(identity = %settings.identity, "waiting for leadership");
        e.acquire().await?;
    }
    metrics.leader.set(1);
    let result = match &elector {
        Some(e) => tokio::select! {
            r = lead(client, &settings, metrics.clone()) => r,
            _ = e.hold() => Err(anyhow::anyhow!("lost the leader Lease; exiting so a fresh start rebuilds from the API")),
        },
        None => lead(client, &settings, metrics.clone()).await,
    };
    metrics.leader.set(0);
    if let Some(e) = &elector
        && result.is_ok()
    {
        e.release().await;
    }
    result
}

/// The leader's work: caches, rebuild, the Node controller and housekeeping.
/// Returns on SIGTERM / Ctrl-C.
async fn lead(client: Client, settings: &Settings, metrics: Arc<Metrics>) -> Result<()> {
    // A pool's spec change reconciles every Node (status writes do not).
    let mut generations = std::collections::HashMap::new();
    let (pools, pool_changes) = cache(Api::<PodCidr>::all(client.clone()), move |p: Arc<PodCidr>| {
        let changed = generations.insert(p.name_any(), p.metadata.generation) != Some(p.metadata.generation);
        changed.then_some(())
    });
    // Any NNC change, its deletion included, reconciles the Node of its
    // name: the one that owns it, or one whose NNC someone else made (the
    // reconcile replaces it, and its deletion must bring the Node's back).
    let (nncs, nnc_owners) = cache(Api::<NodeNetworkConfig>::all(client.clone()), |n: Arc<NodeNetworkConfig>| {
        Some(ObjectRef::<PartialNode>::new(&n.name_any()))
    });
    let (nodes, node_changes) = node_cache(&client);

    // Reconciles one reconcile asks for another Node (see `Ctx::nudge`).
    let (nudge, nudges) = mpsc::unbounded();
    let reporter = Reporter { controller: "carve-controller".into(), instance: Some(settings.identity.clone()) };
    let stores = Stores { pools: pools.clone(), nncs: nncs.clone(), nodes: nodes.clone() };
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        settings.reconcile.clone(),
        stores,
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
        nudge,
    ));
    pools.wait_until_ready().await?;
    nncs.wait_until_ready().await?;
    reconcile::rebuild(&ctx).await.context("rebuilding allocations from the API")?;

    let controller = Controller::for_stream(node_changes, nodes.clone())
        .reconcile_on(futures::stream::select(nnc_owners, nudges))
        .reconcile_all_on(pool_changes)
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let housekeeping = async {
        let _ = nodes.wait_until_ready().await;
        loop {
            if let Err(e) = reconcile::sweep(&ctx).await {
                warn!(error = %e, "sweep for deleted nodes failed");
            }
            if let Err(e) = reconcile::pool_status(&ctx).await {
                warn!(error = %e, "writing pool status failed");
            }
            metrics.sweeps.inc();
            tokio::time::sleep(settings.sweep_interval).await;
        }
    };
    tokio::select! {
        // The controller ends on SIGTERM / Ctrl-C (shutdown_on_signal).
        _ = controller => Ok(()),
        _ = housekeeping => Ok(()),
    }
}
