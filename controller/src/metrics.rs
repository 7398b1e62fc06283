//! Prometheus metrics, served on /metrics next to /healthz and /readyz.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use carve_crds::net::IpFamily;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `carve_reconcile_errors_total`'s label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// `carve_unmet_requests`' label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

/// `carve_blocks`' labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockLabels {
    pub pool: String,
    pub family: String,
    pub state: &'static str,
}

/// Every `reason` of `carve_reconcile_errors_total`
/// (`reconcile::Error::metric_label`): each series exists from the start at 0,
/// so a dashboard's rate shows 0 rather than no data.
pub const RECONCILE_ERROR_REASONS: [&str; 4] = ["conflict", "not_found", "api", "transport"];

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub allocation_seconds: Histogram,
    /// One Node's whole reconcile, API round trips included.
    pub reconcile_seconds: Histogram,
    pub blocks: Family<BlockLabels, Gauge>,
    pub leader: Gauge,
    /// Blocks nodes gave back (released into quarantine).
    pub releases: Counter,
    /// Nodes per pool whose blocks do not cover what they need.
    pub unmet: Family<PoolLabels, Gauge>,
    /// Housekeeping passes done (deleted Nodes swept, pool status written).
    pub sweeps: Counter,
    /// The CRDs are served: a standby is ready to take over, a leader serves.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("carve");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        for reason in RECONCILE_ERROR_REASONS {
            let _ = reconcile_errors.get_or_create(&ReasonLabels { reason });
        }
        let allocation_seconds = Histogram::new(exponential_buckets(0.000_001, 4.0, 12));
        // 1 ms .. ~16 s: a reconcile is a few API calls.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let blocks = Family::<BlockLabels, Gauge>::default();
        let leader = Gauge::default();
        let releases = Counter::default();
        let unmet = Family::<PoolLabels, Gauge>::default();
        let sweeps = Counter::default();
        registry.register("reconciles", "Node reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles by reason", reconcile_errors.clone());
        registry.register(
            "block_allocation_seconds",
            "Time to carve a node's blocks in memory",
            allocation_seconds.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one Node's reconcile took, API calls included",
            reconcile_seconds.clone(),
        );
        registry.register("blocks", "Blocks per pool, family and state (allocated, free, quarantined)", blocks.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        registry.register("block_releases", "Blocks nodes gave back (into quarantine)", releases.clone());
        registry.register("unmet_requests", "Nodes per pool whose blocks do not cover what they need", unmet.clone());
        registry.register("sweeps", "Housekeeping passes: deleted Nodes swept, pool status written", sweeps.clone());
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            allocation_seconds,
            reconcile_seconds,
            blocks,
            leader,
            releases,
            unmet,
            sweeps,
            ready: AtomicBool::new(false),
        }
    }

    pub fn set_blocks(&self, pool: &str, family: IpFamily, allocated: i64, free: i64, quarantined: i64) {
        for (state, v) in [("allocated", allocated), ("free", free), ("quarantined", quarantined)] {
            let labels = BlockLabels { pool: pool.to_string(), family: family.to_string(), state };
            self.blocks.get_or_create(&labels).set(v);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(|State(m): State<Arc<Metrics>>| async move { m.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                }
            }),
        )
        .with_state(metrics)
}
