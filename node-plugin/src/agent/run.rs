//! carve-agent's loop: one watch per kind it reads (NodeNetworkConfigs,
//! PodCIDRs), and on every change (or the resync tick) one `Agent::scale`
//! (then the no-pod-addresses taint, [`super::capacity`]) and one
//! `Agent::reconcile` and, when readiness changed or once a minute, the
//! Node's NetworkUnavailable condition. Between changes, a light pass every
//! [`DEMAND_POLL`] looks at the IPAM store and the waiting ADDs and runs only
//! the scaler and the taint when they changed (pods come and go without an
//! API event). Beside it, the leak reconciler ([`super::leaks`]) on its own
//! period. Each pass counts in `carve_agent_reconciles_total`, its failed
//! steps in `carve_agent_reconcile_errors_total{stage}`, and sets
//! `carve_agent_ready`. The binary parses flags; tests can run this in-process.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use carve_crds::{NodeNetworkConfig, PodCidr};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::metrics::stage;
use super::role::Role;
use super::{Agent, Readiness, set_network_unavailable};

/// How often the agent re-reads its Node's NetworkUnavailable condition
/// when its readiness has not changed (someone else may have overwritten it).
const CONDITION_RECHECK: Duration = Duration::from_secs(60);
/// How often the light pass looks at the IPAM store for demand changes (two stats).
const DEMAND_POLL: Duration = Duration::from_millis(500);

/// A cache of every `K`, and a stream that yields on each change.
fn cache<K>(client: &Client) -> (Store<K>, impl Stream<Item = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let changes = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects()
        .map(|r| {
            if let Err(e) = r {
                warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
            }
        });
    (store, changes)
}

/// A Warning Event on the Node: what keeps carve's dataplane from being its
/// network ([`super::role::foreign`]), once per change.
async fn warn_node(nodes: &Api<Node>, recorder: &Recorder, agent: &Agent, reason: &str, message: &str) {
    let uid = nodes.get(&agent.settings.node).await.ok().and_then(|n| n.metadata.uid);
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(message.into()),
        action: "CheckDataplane".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &agent.node_reference(uid)).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Runs until SIGTERM / Ctrl-C. What the agent set up stays in place, so
/// running pods keep working while it is away.
pub async fn run(client: Client, agent: Agent, resync: Duration) -> Result<()> {
    let node = agent.settings.node.clone();
    let (nncs, nnc_changes) = cache::<NodeNetworkConfig>(&client);
    let (pools, pool_changes) = cache::<PodCidr>(&client);
    let ticks = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(resync).await;
        Some(((), ()))
    });
    let mut triggers = futures::stream::select_all([nnc_changes.boxed(), pool_changes.boxed(), ticks.boxed()]);
    let nodes = Api::<Node>::all(client.clone());
    let reporter = Reporter { controller: "carve-agent".into(), instance: Some(node.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let reclaim = super::leaks::run(&agent, client.clone(), recorder.clone());
    let nnc_api = Api::<NodeNetworkConfig>::all(client.clone());
    // `full`: part of a reconcile pass, whose failures carve_agent_reconcile_errors_total counts.
    let scale = |own: Option<std::sync::Arc<NodeNetworkConfig>>, full: bool| {
        let (agent, nnc_api, nodes, recorder) = (&agent, &nnc_api, &nodes, &recorder);
        async move {
            if let Err(e) = agent.scale(nnc_api, own.as_deref()).await {
                warn!(error = %e, "scaler pass failed; retrying on the next change");
                if full {
                    agent.metrics.reconcile_error(stage::SCALER);
                }
            }
            if let Err(e) = agent.enforce_capacity(nodes, recorder, own.as_deref()).await {
                warn!(error = %e, "writing the no-pod-addresses taint failed; retrying on the next change");
                if full {
                    agent.metrics.reconcile_error(stage::TAINT);
                }
            }
        }
    };
    let own_ref = ObjectRef::<NodeNetworkConfig>::new(&node);
    let work = async {
        // Drive the watches until both caches hold a full list.
        let ready = async {
            let _ = nncs.wait_until_ready().await;
            let _ = pools.wait_until_ready().await;
        };
        tokio::pin!(ready);
        loop {
            tokio::select! {
                _ = &mut ready => break,
                _ = triggers.next() => {}
            }
        }
        info!("caches ready");
        let mut last: Option<Readiness> = None;
        let mut checked = Instant::now();
        loop {
            let own = nncs.get(&own_ref);
            agent.metrics.reconciles.inc();
            scale(own.clone(), true).await;
            let readiness = agent.reconcile(own.as_deref(), &nncs.state(), &pools.state()).await;
            if last.as_ref() != Some(&readiness) {
                match &readiness {
                    Readiness::Ready => info!("node network ready"),
                    Readiness::NotReady { reason, message } => {
                        warn!(%reason, %message, "node network not ready");
                        if reason.starts_with("Foreign") {
                            warn_node(&nodes, &recorder, &agent, reason, message).await;
                        }
                    }
                }
            }
            if agent.settings.role == Role::IpamOnly {
                // The other dataplane owns the Node's NetworkUnavailable condition.
                last = Some(readiness);
            } else if last.as_ref() != Some(&readiness) || checked.elapsed() >= CONDITION_RECHECK {
                // Peer NNC events come often and rarely change this node's
                // readiness: read and write the Node only on a change.
                checked = Instant::now();
                match set_network_unavailable(&nodes, &node, &readiness).await {
                    Ok(_) => last = Some(readiness),
                    Err(e) => {
                        warn!(error = %e, node = %node, "writing the NetworkUnavailable condition failed; retrying");
                        agent.metrics.reconcile_error(stage::STATUS);
                        last = None;
                    }
                }
            }
            // `last` is this pass's readiness once the Node says so too (what the scheduler goes by).
            agent.metrics.ready.set(i64::from(last == Some(Readiness::Ready)));
            // Wait for a change (or the resync tick), then take every change
            // already queued; meanwhile follow the demand.
            let mut demand = agent.demand_signature();
            let more = loop {
                tokio::select! {
                    t = triggers.next() => break t.is_some(),
                    _ = tokio::time::sleep(DEMAND_POLL) => {
                        let now = agent.demand_signature();
                        if now != demand || now.waiting || agent.release_held() {
                            scale(nncs.get(&own_ref), false).await;
                            demand = agent.demand_signature();
                        }
                    }
                }
            };
            if !more {
                break;
            }
            while let Some(Some(())) = triggers.next().now_or_never() {}
        }
    };
    tokio::select! {
        _ = work => bail!("the watches ended"),
        _ = reclaim => bail!("the leak reconciler ended"),
        _ = shutdown() => {
            info!("shutting down; the dataplane, state file and conflist stay so running pods keep working");
            Ok(())
        }
    }
}
