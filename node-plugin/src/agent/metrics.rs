//! carve-agent's Prometheus metrics, served on `--metrics-addr` (/metrics).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct AgentMetrics {
    registry: Registry,
    /// Leak reconciler passes that observed the store (a failed LIST is not one).
    pub leak_passes: Counter,
    /// Addresses freed because no sandbox held them.
    pub leaks_reclaimed: Counter,
    /// Allocations seen unused at the last pass, not yet past their grace.
    pub leak_suspects: Gauge,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("carve_ipam");
        let leak_passes = Counter::default();
        let leaks_reclaimed = Counter::default();
        let leak_suspects = Gauge::default();
        registry.register("leak_passes", "Leak reconciler passes over the IPAM store", leak_passes.clone());
        registry.register(
            "leaks_reclaimed",
            "Pod addresses freed because neither the API server nor the node knew their sandbox",
            leaks_reclaimed.clone(),
        );
        registry.register(
            "leak_suspects",
            "Allocations without a pod or host interface at the last pass, within their grace period",
            leak_suspects.clone(),
        );
        AgentMetrics { registry, leak_passes, leaks_reclaimed, leak_suspects }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves /metrics and /healthz on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<AgentMetrics>) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding --metrics-addr {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics");
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
