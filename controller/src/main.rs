//! carve-controller: flags and the HTTP endpoints; `carve_controller::run`
//! does the rest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use carve_cli::{LogFormat, init_tracing, kube_client, parse_duration};
use carve_controller::leader::LeaseConfig;
use carve_controller::metrics::{self, Metrics};
use carve_controller::reconcile::Config;
use carve_controller::run::Settings;
use clap::Parser;
use tracing::{error, info};

/// Carves PodCIDR pools into per-node blocks recorded in NodeNetworkConfig status.
#[derive(Parser, Debug)]
#[command(name = "carve-controller", version, args_override_self = true)]
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
    /// Nodes reconciled at once; bounds open connections and memory on large
    /// clusters (16 kept up with 5,000 new Nodes as well as 64, in less memory).
    #[arg(long, env = "CARVE_CONCURRENCY", default_value_t = 16)]
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_level, args.log_format)?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let settings = Settings {
        lease: args.leader_elect.then(|| LeaseConfig {
            namespace: args.leader_election_namespace.clone(),
            name: args.leader_election_name.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry: args.retry_period,
        }),
        identity,
        reconcile: Config { set_node_pod_cidrs: args.set_node_pod_cidrs },
        concurrency: args.concurrency,
        sweep_interval: args.sweep_interval,
    };
    let client = kube_client(args.kubeconfig.as_deref()).await?;

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
    carve_controller::run::run(client, settings, metrics).await
}
