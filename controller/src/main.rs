//! carve-controller: wires the caches, leader election, the Node controller
//! and the HTTP endpoints. The logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use carve_controller::leader::{LeaderElector, LeaseConfig};
use carve_controller::metrics::{self, Metrics};
use carve_controller::reconcile::{self, Config, Ctx};
use carve_crds::cli::{LogFormat, init_tracing, kube_client, parse_duration};
use carve_crds::{NodeNetworkConfig, PodCidr};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{error, info, warn};

/// Carves PodCIDR pools into per-node blocks recorded in NodeNetworkConfig status.
#[derive(Parser, Debug)]
#[command(name = "carve-controller", version)]
struct Args {
    /// kubeconfig to use; in-cluster config when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CARVE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run for leadership on a Lease; only the leader writes.
    #[arg(long, env = "CARVE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, env = "POD_NAMESPACE", default_value = "carve-system")]
    leader_election_namespace: String,
    #[arg(long, env = "CARVE_LEADER_ELECTION_NAME", default_value = "carve-controller")]
    leader_election_name: String,
    /// This replica's identity on the Lease (defaults to the pod name or hostname plus pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,
    /// Write Node .spec.podCIDR(s), when empty, for nodes of Overlay pools
    /// (kubenet compatibility: kube-proxy, Flannel or Cilium's kubernetes IPAM read them).
    #[arg(long, env = "CARVE_SET_NODE_POD_CIDRS", default_value_t = true, action = clap::ArgAction::Set)]
    set_node_pod_cidrs: bool,
    /// Nodes reconciled at once; bounds open connections and memory on large clusters.
    #[arg(long, env = "CARVE_CONCURRENCY", default_value_t = 64)]
    concurrency: u16,
    /// How often to look for Nodes that are gone and for pool status changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    sweep_interval: Duration,
    #[arg(long, env = "CARVE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// tracing filter, e.g. info or carve_controller=debug.
    #[arg(long, env = "CARVE_LOG_LEVEL", default_value = "info")]
    log_level: String,
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

/// Nodes carry image lists and conditions carve never reads; drop them from the cache.
fn prune_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(status) = node.status.as_mut() {
        let addresses = status.addresses.take();
        *status = Default::default();
        status.addresses = addresses;
    }
}

async fn lead(args: &Args, client: Client, metrics: Arc<Metrics>) -> Result<()> {
    let (pools, pool_writer) = reflector::store();
    let (nncs, nnc_writer) = reflector::store();
    let (nodes, node_writer) = reflector::store();
    let pool_cache = watcher(Api::<PodCidr>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(pool_writer)
        .for_each(|_| futures::future::ready(()));
    let nnc_cache = watcher(Api::<NodeNetworkConfig>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|n: &mut NodeNetworkConfig| n.metadata.managed_fields = None)
        .reflect(nnc_writer)
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(pool_cache);
    tokio::spawn(nnc_cache);
    let node_stream = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(prune_node)
        .reflect(node_writer)
        .applied_objects()
        // Only changes to what carve reads reconcile (not kubelet's status reports).
        .predicate_filter(carve_controller::views::node_fields, Default::default());

    let reporter = Reporter { controller: "carve-controller".into(), instance: args.identity.clone() };
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        Config { set_node_pod_cidrs: args.set_node_pod_cidrs },
        (pools.clone(), nncs.clone(), nodes.clone()),
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
    ));

    let elector = args.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.leader_election_namespace.clone(),
                name: args.leader_election_name.clone(),
                identity: args.identity.clone().unwrap_or_default(),
                duration: args.lease_duration,
                renew_deadline: args.renew_deadline,
                retry: args.retry_period,
            },
        )
    });
    pools.wait_until_ready().await?;
    nncs.wait_until_ready().await?;
    metrics.ready.store(true, Ordering::Relaxed);
    if let Some(e) = &elector {
        info!(identity = %args.identity.clone().unwrap_or_default(), "waiting for leadership");
        e.acquire().await;
    }
    metrics.leader.set(1);
    reconcile::rebuild(&ctx).await.context("rebuilding allocations from the API")?;

    let node_store = nodes.clone();
    let pool_changes = watcher(Api::<PodCidr>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(node_stream, nodes.clone())
        .owns(Api::<NodeNetworkConfig>::all(client.clone()), watcher::Config::default())
        .watches_stream(pool_changes, move |_pool: PodCidr| {
            node_store.state().into_iter().map(|n| ObjectRef::new(&n.name_any())).collect::<Vec<_>>()
        })
        .with_config(kube::runtime::controller::Config::default().concurrency(args.concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let housekeeping = {
        let ctx = ctx.clone();
        let interval = args.sweep_interval;
        async move {
            let _ = ctx.nodes.wait_until_ready().await;
            loop {
                if let Err(e) = reconcile::sweep(&ctx).await {
                    warn!(error = %e, "sweep for deleted nodes failed");
                }
                if let Err(e) = reconcile::pool_status(&ctx).await {
                    warn!(error = %e, "writing pool status failed");
                }
                tokio::time::sleep(interval).await;
            }
        }
    };

    match &elector {
        Some(e) => {
            tokio::select! {
                // The controller ends on SIGTERM / Ctrl-C (shutdown_on_signal).
                _ = controller => {}
                _ = housekeeping => {}
                _ = e.hold() => {
                    metrics.leader.set(0);
                    bail!("lost the leader Lease; exiting so a fresh start rebuilds from the API")
                }
            }
            metrics.leader.set(0);
            e.release().await;
            Ok(())
        }
        None => tokio::select! {
            _ = controller => Ok(()),
            _ = housekeeping => Ok(()),
        },
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    init_tracing(&args.log_level, args.log_format)?;
    if args.identity.is_none() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        args.identity = Some(format!("{}-{}", host.trim(), std::process::id()));
    }
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    check_crds(&client).await?;

    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let server = axum::serve(listener, metrics::router(metrics.clone()));
    tokio::spawn(async move {
        if let Err(e) = server.await {
            error!(error = %e, "metrics server stopped");
        }
    });
    lead(&args, client, metrics).await
}
