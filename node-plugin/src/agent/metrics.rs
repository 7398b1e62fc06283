//! carve-agent's Prometheus metrics, served on `--metrics-addr` (/metrics).
//!
//! ```text
//!   carve_ipam_*   leak reconciler            (agent::leaks)
//!   carve_agent_*  readiness, reconciles, blocks and pod addresses (agent::run, the store readers)
//!   carve_cni_*    every CNI call on the node (datagrams from carve-cni / carve-ipam, agent::cni_calls)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use carve_crds::IpFamily;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::cni::Command;
use crate::cni::report::{PluginName, Report};

/// CNI call durations from 100 µs (a STATUS) to 10 s (an ADD waiting for a block).
const CNI_DURATION_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    pub family: &'static str,
    /// `allocated` (in carve-ipam's store) or `free` (in the node's active blocks).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniCallLabels {
    pub plugin: &'static str,
    pub command: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniCommandLabels {
    pub plugin: &'static str,
    pub command: &'static str,
}

/// The label value of `family`.
pub fn family_label(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => "ipv4",
        IpFamily::IPv6 => "ipv6",
    }
}

/// Pod addresses of one family: allocated in the store, free in the node's active blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressCount {
    pub allocated: u64,
    pub free: u64,
}

/// Steps of the agent's loop a failure is counted under (`carve_agent_reconcile_errors_total{stage}`).
pub mod stage {
    /// Reading carve-ipam's store.
    pub const IPAM_STORE: &str = "ipam_store";
    /// The NodeNetworkConfig does not make a valid node state or dataplane plan.
    pub const NNC: &str = "nnc";
    /// Writing the node state file.
    pub const STATE_FILE: &str = "state_file";
    /// Installing carve-cni and carve-ipam into the CNI bin dir.
    pub const CNI_BINARIES: &str = "cni_binaries";
    /// Programming routes, VXLAN, neighbours, SNAT.
    pub const DATAPLANE: &str = "dataplane";
    /// Writing the CNI conflist.
    pub const CONFLIST: &str = "conflist";
    /// Writing the Node's NetworkUnavailable condition.
    pub const STATUS: &str = "status";
    /// The scaler's pass (store marks, NodeNetworkConfig spec).
    pub const SCALER: &str = "scaler";
    /// Writing the no-pod-addresses taint.
    pub const TAINT: &str = "taint";

    pub const ALL: [&str; 9] = [IPAM_STORE, NNC, STATE_FILE, CNI_BINARIES, DATAPLANE, CONFLIST, STATUS, SCALER, TAINT];
}

pub struct AgentMetrics {
    registry: Registry,
    /// Leak reconciler passes that observed the store (a failed LIST is not one).
    pub leak_passes: Counter,
    /// Addresses freed because no sandbox held them.
    pub leaks_reclaimed: Counter,
    /// Allocations seen unused at the last pass, not yet past their grace.
    pub leak_suspects: Gauge,
    /// 1 while the dataplane is programmed and NetworkUnavailable=False is written.
    pub ready: Gauge,
    pub blocks: Family<FamilyLabels, Gauge>,
    pub pod_addresses: Family<AddressLabels, Gauge>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<StageLabels, Counter>,
    pub cni_requests: Family<CniCallLabels, Counter>,
    pub cni_request_duration: Family<CniCommandLabels, Histogram>,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let leak_passes = Counter::default();
        let leaks_reclaimed = Counter::default();
        let leak_suspects = Gauge::default();
        let ipam = registry.sub_registry_with_prefix("carve_ipam");
        ipam.register("leak_passes", "Leak reconciler passes over the IPAM store", leak_passes.clone());
        ipam.register(
            "leaks_reclaimed",
            "Pod addresses freed because neither the API server nor the node knew their sandbox",
            leaks_reclaimed.clone(),
        );
        ipam.register(
            "leak_suspects",
            "Allocations without a pod or host interface at the last pass, within their grace period",
            leak_suspects.clone(),
        );

        let ready = Gauge::default();
        let blocks = Family::<FamilyLabels, Gauge>::default();
        let pod_addresses = Family::<AddressLabels, Gauge>::default();
        let reconciles = Counter::default();
        let reconcile_errors = Family::<StageLabels, Counter>::default();
        let agent = registry.sub_registry_with_prefix("carve_agent");
        agent.register(
            "ready",
            "1 while this node's dataplane is programmed from its NodeNetworkConfig and NetworkUnavailable=False is written",
            ready.clone(),
        );
        agent.register("blocks", "Pod blocks this node holds (NodeNetworkConfig status)", blocks.clone());
        agent.register(
            "pod_addresses",
            "Pod addresses allocated in carve-ipam's store, and free in this node's blocks",
            pod_addresses.clone(),
        );
        agent.register("reconciles", "Passes of the agent's reconcile loop", reconciles.clone());
        agent.register(
            "reconcile_errors",
            "Failed steps of the agent's reconcile loop, by step",
            reconcile_errors.clone(),
        );

        let cni_requests = Family::<CniCallLabels, Counter>::default();
        let cni_request_duration =
            Family::<CniCommandLabels, Histogram>::new_with_constructor(|| Histogram::new(CNI_DURATION_BUCKETS));
        let cni = registry.sub_registry_with_prefix("carve_cni");
        cni.register("requests", "CNI calls of carve-cni and carve-ipam on this node", cni_requests.clone());
        cni.register_with_unit(
            "request_duration",
            "Duration of CNI calls of carve-cni and carve-ipam on this node",
            Unit::Seconds,
            cni_request_duration.clone(),
        );

        // Both families from the start: a dashboard sees 0, not "no data".
        let metrics = AgentMetrics {
            registry,
            leak_passes,
            leaks_reclaimed,
            leak_suspects,
            ready,
            blocks,
            pod_addresses,
            reconciles,
            reconcile_errors,
            cni_requests,
            cni_request_duration,
        };
        metrics.set_node(&BTreeMap::new(), &BTreeMap::new());
        // Counters and histograms at 0 from the start: an alert on increase()
        // sees the first error too, and a rate() over the first calls is not
        // lost to a series that appeared with them.
        for stage in stage::ALL {
            let _ = metrics.reconcile_errors.get_or_create(&StageLabels { stage });
        }
        for plugin in PluginName::ALL.map(PluginName::as_str) {
            for command in Command::ALL.map(Command::as_str) {
                let _ = metrics.cni_request_duration.get_or_create(&CniCommandLabels { plugin, command });
                for result in ["success", "error"] {
                    let _ = metrics.cni_requests.get_or_create(&CniCallLabels { plugin, command, result });
                }
            }
        }
        metrics
    }

    /// Counts one CNI call.
    pub fn observe_cni(&self, r: &Report) {
        let (plugin, command) = (r.plugin.as_str(), r.command.as_str());
        self.cni_requests.get_or_create(&CniCallLabels { plugin, command, result: r.result() }).inc();
        self.cni_request_duration
            .get_or_create(&CniCommandLabels { plugin, command })
            .observe(r.duration.as_secs_f64());
    }

    pub fn reconcile_error(&self, stage: &'static str) {
        self.reconcile_errors.get_or_create(&StageLabels { stage }).inc();
    }

    /// Blocks and pod addresses per family; a family missing from a map is 0.
    pub fn set_node(&self, blocks: &BTreeMap<IpFamily, u64>, addresses: &BTreeMap<IpFamily, AddressCount>) {
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            let label = family_label(family);
            self.blocks.get_or_create(&FamilyLabels { family: label }).set(gauge(blocks.get(&family).copied()));
            let count = addresses.get(&family).copied().unwrap_or_default();
            self.pod_addresses
                .get_or_create(&AddressLabels { family: label, state: "allocated" })
                .set(gauge(Some(count.allocated)));
            self.pod_addresses
                .get_or_create(&AddressLabels { family: label, state: "free" })
                .set(gauge(Some(count.free)));
        }
    }

    /// Allocated pod addresses per family, when the blocks are not at hand.
    pub fn set_allocated(&self, allocated: &BTreeMap<IpFamily, u64>) {
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            self.pod_addresses
                .get_or_create(&AddressLabels { family: family_label(family), state: "allocated" })
                .set(gauge(allocated.get(&family).copied()));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn gauge(v: Option<u64>) -> i64 {
    i64::try_from(v.unwrap_or(0)).unwrap_or(i64::MAX)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The sample lines starting with `prefix`, sorted (a family's order is a hash map's).
    fn lines(m: &AgentMetrics, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = m.encode().lines().filter(|l| l.starts_with(prefix)).map(str::to_owned).collect();
        out.sort();
        out
    }

    #[test]
    fn the_existing_names_keep_their_carve_ipam_prefix() {
        let m = AgentMetrics::new();
        m.leak_passes.inc();
        let text = m.encode();
        for line in
            ["carve_ipam_leak_passes_total 1", "carve_ipam_leaks_reclaimed_total 0", "carve_ipam_leak_suspects 0"]
        {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn cni_reports_count_by_plugin_command_result_and_time_each_command() {
        let m = AgentMetrics::new();
        let add = Report {
            plugin: PluginName::CarveCni,
            command: Command::Add,
            success: true,
            duration: Duration::from_millis(3),
        };
        m.observe_cni(&add);
        m.observe_cni(&add);
        m.observe_cni(&Report { success: false, duration: Duration::from_secs(20), ..add });
        m.observe_cni(&Report { plugin: PluginName::CarveIpam, command: Command::Del, ..add });
        let text = m.encode();
        for line in [
            r#"carve_cni_requests_total{plugin="carve-cni",command="ADD",result="success"} 2"#,
            r#"carve_cni_requests_total{plugin="carve-cni",command="ADD",result="error"} 1"#,
            r#"carve_cni_requests_total{plugin="carve-ipam",command="DEL",result="success"} 1"#,
            r#"carve_cni_request_duration_seconds_count{plugin="carve-cni",command="ADD"} 3"#,
            r#"carve_cni_request_duration_seconds_bucket{le="0.0025",plugin="carve-cni",command="ADD"} 0"#,
            r#"carve_cni_request_duration_seconds_bucket{le="0.005",plugin="carve-cni",command="ADD"} 2"#,
            r#"carve_cni_request_duration_seconds_bucket{le="10.0",plugin="carve-cni",command="ADD"} 2"#,
            r#"carve_cni_request_duration_seconds_bucket{le="+Inf",plugin="carve-cni",command="ADD"} 3"#,
            r#"carve_cni_request_duration_seconds_count{plugin="carve-ipam",command="DEL"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert_eq!(
            lines(&m, "carve_cni_request_duration_seconds_bucket{").len(),
            2 * 6 * 17,
            "16 buckets and +Inf for every plugin and command"
        );
    }

    #[test]
    fn node_gauges_cover_both_families_and_reset_what_is_gone() {
        let m = AgentMetrics::new();
        assert_eq!(
            lines(&m, "carve_agent_blocks{"),
            [r#"carve_agent_blocks{family="ipv4"} 0"#, r#"carve_agent_blocks{family="ipv6"} 0"#]
        );
        let v4 = AddressCount { allocated: 3, free: 250 };
        m.set_node(&[(IpFamily::IPv4, 2)].into(), &[(IpFamily::IPv4, v4)].into());
        let text = m.encode();
        for line in [
            r#"carve_agent_blocks{family="ipv4"} 2"#,
            r#"carve_agent_pod_addresses{family="ipv4",state="allocated"} 3"#,
            r#"carve_agent_pod_addresses{family="ipv4",state="free"} 250"#,
            r#"carve_agent_pod_addresses{family="ipv6",state="free"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        m.set_allocated(&[(IpFamily::IPv6, 1)].into());
        m.set_node(&BTreeMap::new(), &BTreeMap::new());
        assert!(m.encode().contains(r#"carve_agent_blocks{family="ipv4"} 0"#), "the blocks went");
    }

    #[test]
    fn reconciles_errors_and_ready_have_their_names() {
        let m = AgentMetrics::new();
        m.reconciles.inc();
        m.reconcile_error(stage::DATAPLANE);
        m.ready.set(1);
        let text = m.encode();
        for line in [
            "carve_agent_reconciles_total 1",
            r#"carve_agent_reconcile_errors_total{stage="dataplane"} 1"#,
            r#"carve_agent_reconcile_errors_total{stage="conflist"} 0"#,
            "carve_agent_ready 1",
            "# TYPE carve_agent_ready gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert_eq!(lines(&m, "carve_agent_reconcile_errors_total{").len(), stage::ALL.len());
    }

    #[test]
    fn every_cni_call_counter_and_histogram_starts_at_zero() {
        let m = AgentMetrics::new();
        let calls = lines(&m, "carve_cni_requests_total{");
        assert_eq!(calls.len(), 2 * 6 * 2, "{calls:?}");
        assert!(calls.iter().all(|l| l.ends_with("} 0")), "{calls:?}");
        assert!(calls.contains(
            &r#"carve_cni_requests_total{plugin="carve-ipam",command="VERSION",result="error"} 0"#.to_string()
        ));
        let counts = lines(&m, "carve_cni_request_duration_seconds_count{");
        assert_eq!(counts.len(), 2 * 6, "{counts:?}");
        assert!(counts.iter().all(|l| l.ends_with("} 0")), "{counts:?}");
    }
}
