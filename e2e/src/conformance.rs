//! Kubernetes' own sig-network e2e suites on carve, on the real-node cluster.
//!
//! ```text
//!   Cluster (3 real nodes) ── deploy_carve(overlay pool) ── prepare():
//!       CoreDNS (e2e/conformance/coredns.yaml) + routes to the pod blocks
//!       from the control plane's namespace
//!   run(): ginkgo -p e2e-network.test (focus, skips) ──▶ report.json ──▶ Report
//! ```
//!
//! The binaries come from `control-plane-bins.sh --conformance`, the images
//! from [`crate::image::build_conformance`] (every node imports them). What
//! is skipped, and why, is [`SKIPS`]: a feature this cluster lacks or a
//! choice carve made, never an unexplained failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::wait::poll;

/// The tests the issue names, each a ginkgo focus regex.
pub const NAMED: [&str; 8] = [
    r"\[sig-network\] Networking Granular Checks: Pods should function for intra-pod communication: http",
    r"\[sig-network\] Networking Granular Checks: Pods should function for intra-pod communication: udp",
    r"\[sig-network\] Networking Granular Checks: Pods should function for node-pod communication: http",
    r"\[sig-network\] Networking Granular Checks: Pods should function for node-pod communication: udp",
    r"\[sig-network\] Services should serve a basic endpoint from pods",
    r"\[sig-network\] Services should serve multiport endpoints from pods",
    r"\[sig-network\] HostPort",
    r"\[sig-network\] DNS should provide DNS for the cluster",
];

/// `make conformance`: the named tests and every other sig-network
/// conformance test.
pub const CONFORMANCE_FOCUS: &str = r"\[sig-network\].*\[Conformance\]";

/// `make test`'s share: the pod Granular Checks and one Service test.
pub const CI_FOCUS: [&str; 5] = [NAMED[0], NAMED[1], NAMED[2], NAMED[3], NAMED[4]];

/// The upstream NetworkPolicy suite (every spec but the two API ones is
/// tagged `[Feature:NetworkPolicy]`): run when a policy engine is installed.
pub const NETPOL_FOCUS: &str = r"\[sig-network\] Netpol";

/// `make test`'s share of [`NETPOL_FOCUS`] with an engine: ingress, egress,
/// a namespaceSelector, an ipBlock with except, ports, named ports, UDP, an
/// updated policy, stacked policies and the API spec with endPort.
pub const NETPOL_CI_FOCUS: [&str; 10] = [
    r"Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy",
    r"Netpol NetworkPolicy between server and client should deny egress from pods based on PodSelector",
    r"Netpol NetworkPolicy between server and client should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
    r"Netpol NetworkPolicy between server and client should enforce except clause while egress access to server in CIDR block",
    r"Netpol NetworkPolicy between server and client should enforce policy based on Ports",
    r"Netpol NetworkPolicy between server and client should allow ingress access on one named port",
    r"Netpol \[LinuxOnly\] NetworkPolicy between server and client using UDP should support a 'default-deny-ingress' policy",
    r"Netpol NetworkPolicy between server and client should enforce updated policy",
    r"Netpol NetworkPolicy between server and client should enforce multiple, stacked policies with overlapping podSelectors",
    r"Netpol API should support creating NetworkPolicy API with endport field",
];

/// Upstream tests left out on carve alone, as (regex on the full name, reason).
pub const SKIPS: [(&str, &str); 5] = [
    (
        r"NetworkPolicy|\[sig-network\] Netpol",
        "carve enforces no NetworkPolicy: policy is delegated to a policy engine (README, NetworkPolicy)",
    ),
    (r"LoadBalancer", "the local cluster has no cloud load balancer"),
    (r"\[Serial\]|\[Disruptive\]", "needs the whole cluster to itself or breaks nodes; not part of a parallel run"),
    (r"\[Feature:|\[FeatureGate:|\[Alpha\]|\[Beta\]", "an optional or gated feature, not conformance"),
    (r"\[Slow\]", "left out for time: each takes minutes"),
];

/// Upstream tests left out with a policy engine: [`SKIPS`] without the
/// NetworkPolicy one, and of the features only `[Feature:NetworkPolicy]`
/// kept (the focus, conformance plus [`NETPOL_FOCUS`], selects no other).
pub const POLICY_SKIPS: [(&str, &str); 5] = [
    (r"LoadBalancer", SKIPS[1].1),
    (r"\[Serial\]|\[Disruptive\]", SKIPS[2].1),
    (r"\[Feature:SCTPConnectivity\]", "SCTP: this kernel has no sctp protocol and loads no modules"),
    (r"\[FeatureGate:|\[Alpha\]|\[Beta\]", SKIPS[3].1),
    (r"\[Slow\]", SKIPS[4].1),
];

/// The skips of a run: [`POLICY_SKIPS`] with a policy engine, else [`SKIPS`].
pub fn skips(policy: bool) -> &'static [(&'static str, &'static str)] {
    if policy { &POLICY_SKIPS } else { &SKIPS }
}

/// The specs a report names when skipped: conformance, and the NetworkPolicy
/// suite when an engine enforces it.
fn reported(policy: bool) -> String {
    if policy { format!("{CONFORMANCE_FOCUS}|{NETPOL_FOCUS}") } else { CONFORMANCE_FOCUS.to_string() }
}

/// Applies CoreDNS and waits until it answers, then routes the pod blocks
/// from the control plane ([`Cluster::route_pod_blocks`]).
pub async fn prepare(cluster: &Cluster) -> Result<()> {
    let cp = cluster.cp();
    cp.kubectl_ok(&["apply", "-f", "e2e/conformance/coredns.yaml"])?;
    poll("CoreDNS Available", Duration::from_secs(180), || async {
        match cp.kubectl_ok(&["-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=5s"]) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "{e:#}\n{}",
                cp.kubectl_ok(&["-n", "kube-system", "get", "pods", "-o", "wide"]).unwrap_or_default()
            )),
        }
    })
    .await?;
    let routes = cluster.route_pod_blocks()?;
    eprintln!("conformance: the control plane routes {routes:?} (pod block, via node)");
    Ok(())
}

/// How to run the suite.
#[derive(Clone, Debug)]
pub struct Run {
    /// Ginkgo focus regexes (any matches).
    pub focus: Vec<String>,
    /// Parallel ginkgo processes.
    pub procs: usize,
    /// Where the JSON report and ginkgo's output go.
    pub out_dir: PathBuf,
    /// Ginkgo's whole-suite timeout.
    pub timeout: Duration,
    /// A policy engine runs: [`POLICY_SKIPS`] instead of [`SKIPS`].
    pub policy: bool,
}

/// Runs e2e-network.test under ginkgo against `cluster` and reads its
/// report. The suite failing is a [`Report`] with failures, not an error;
/// an error is a run that produced no report.
pub fn run(cluster: &Cluster, bins: &Path, run: &Run) -> Result<Report> {
    std::fs::create_dir_all(&run.out_dir)?;
    let report = run.out_dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let skip = skips(run.policy).iter().map(|(re, _)| *re).collect::<Vec<_>>().join("|");
    let mut cmd = Command::new(bins.join("ginkgo"));
    cmd.arg(format!("--procs={}", run.procs))
        .arg(format!("--focus={}", run.focus.join("|")))
        .arg(format!("--skip={skip}"))
        .arg(format!("--timeout={}s", run.timeout.as_secs()))
        .arg("--no-color")
        .arg(format!("--json-report={}", report.display()))
        .arg(bins.join("e2e-network.test"))
        .arg("--")
        .arg(format!("--kubeconfig={}", cluster.cp().kubeconfig().display()))
        .arg("--provider=skeleton")
        .arg(format!("--kubectl-path={}", bins.join("kubectl").display()))
        .arg(format!("--e2e-output-dir={}", run.out_dir.display()))
        // CoreDNS and carve's own pods are what must run before tests start.
        .arg("--minStartupPods=2")
        .current_dir(&run.out_dir);
    let status = cmd.status().with_context(|| format!("running {}", bins.join("ginkgo").display()))?;
    let body =
        std::fs::read(&report).with_context(|| format!("ginkgo exited {status} and wrote no {}", report.display()))?;
    Report::parse(&body, run.policy)
}

/// One spec's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecResult {
    pub name: String,
    pub state: State,
    pub seconds: f64,
    /// The failure, or why it was skipped.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Passed,
    Failed,
    Skipped,
}

/// The specs of a run, with the sig-network conformance specs that were
/// skipped by [`SKIPS`] named with their reason.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub specs: Vec<SpecResult>,
    /// Specs outside the conformance set that were not run: how many per
    /// [`SKIPS`] reason, and under "" those the focus left out.
    pub not_run: BTreeMap<&'static str, usize>,
}

/// Ginkgo's JSON report: an array of suite reports (only the fields read).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SuiteReport {
    #[serde(default)]
    spec_reports: Option<Vec<SpecReport>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SpecReport {
    /// null on suite nodes.
    #[serde(default)]
    container_hierarchy_texts: Option<Vec<String>>,
    #[serde(default)]
    leaf_node_text: String,
    #[serde(default)]
    leaf_node_type: String,
    state: String,
    /// Nanoseconds.
    #[serde(default)]
    run_time: i64,
    #[serde(default)]
    failure: Option<Failure>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Failure {
    #[serde(default)]
    message: String,
}

/// The skips of a run, compiled once per report (a report has a row for
/// each of the binary's ~900 specs).
struct SkipReasons(Vec<(regex::Regex, &'static str)>);

impl SkipReasons {
    fn new(policy: bool) -> Self {
        SkipReasons(
            skips(policy)
                .iter()
                .map(|(re, why)| (regex::Regex::new(re).expect("skips are valid regexes"), *why))
                .collect(),
        )
    }

    fn reason(&self, name: &str) -> Option<&'static str> {
        self.0.iter().find(|(re, _)| re.is_match(name)).map(|(_, why)| *why)
    }
}

/// Why `name` is skipped by [`skips`]`(policy)`, if it is.
pub fn skip_reason(name: &str, policy: bool) -> Option<&'static str> {
    SkipReasons::new(policy).reason(name)
}

impl Report {
    /// Reads ginkgo's `--json-report`. Specs filtered out by focus are left
    /// out; those filtered out by [`skips`] that the conformance focus (and
    /// the NetworkPolicy suite's, with an engine) selects are kept as
    /// skipped, with the reason.
    pub fn parse(json: &[u8], policy: bool) -> Result<Report> {
        let suites: Vec<SuiteReport> = serde_json::from_slice(json).context("ginkgo's JSON report")?;
        let focus = regex::Regex::new(&reported(policy)).expect("valid regex");
        let reasons = SkipReasons::new(policy);
        let mut specs = Vec::new();
        let mut not_run = BTreeMap::new();
        for spec in suites.into_iter().flat_map(|s| s.spec_reports.unwrap_or_default()) {
            let mut texts = spec.container_hierarchy_texts.unwrap_or_default();
            texts.push(spec.leaf_node_text);
            let name = texts.join(" ");
            let message = spec.failure.map(|f| f.message).unwrap_or_default();
            let state = match spec.state.as_str() {
                "passed" => State::Passed,
                "skipped" | "pending" => State::Skipped,
                // failed, panicked, interrupted, aborted, timedout
                _ => State::Failed,
            };
            if spec.leaf_node_type != "It" {
                // Suite set-up and tear-down nodes: they matter only when they fail.
                if state == State::Failed {
                    specs.push(SpecResult { name: format!("[{}]", spec.leaf_node_type), state, seconds: 0.0, message });
                }
                continue;
            }
            let seconds = spec.run_time as f64 / 1e9;
            match (state, message.is_empty()) {
                // Not selected: skipped by SKIPS (named when conformance), or outside the focus.
                (State::Skipped, true) => match reasons.reason(&name) {
                    Some(why) if focus.is_match(&name) => {
                        specs.push(SpecResult { name, state, seconds, message: why.into() })
                    }
                    why => *not_run.entry(why.unwrap_or_default()).or_default() += 1,
                },
                _ => specs.push(SpecResult { name, state, seconds, message }),
            }
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Report { specs, not_run })
    }

    pub fn count(&self, state: State) -> usize {
        self.specs.iter().filter(|s| s.state == state).count()
    }

    /// `conformance: <n> passed, <n> failed, <n> skipped`.
    pub fn summary(&self) -> String {
        format!(
            "conformance: {} passed, {} failed, {} skipped",
            self.count(State::Passed),
            self.count(State::Failed),
            self.count(State::Skipped)
        )
    }

    /// One row per spec: result, seconds, name, and the reason or failure's
    /// first line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<8} {:>7}  test", "result", "seconds");
        for s in &self.specs {
            let result = match s.state {
                State::Passed => "passed",
                State::Failed => "FAILED",
                State::Skipped => "skipped",
            };
            let _ = writeln!(out, "{result:<8} {:>7.1}  {}", s.seconds, s.name);
            if let Some(first) = s.message.lines().find(|l| !l.trim().is_empty()).filter(|_| s.state != State::Passed) {
                let _ = writeln!(out, "{:<17} ↳ {}", "", first.trim());
            }
        }
        for (why, n) in &self.not_run {
            let why = if why.is_empty() { "outside the sig-network conformance set" } else { why };
            let _ = writeln!(out, "not run  {n:>7}  other specs: {why}");
        }
        out
    }

    /// Failed specs by name, for assertions.
    pub fn failures(&self) -> BTreeMap<&str, &str> {
        self.specs.iter().filter(|s| s.state == State::Failed).map(|s| (s.name.as_str(), s.message.as_str())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(texts: &[&str], leaf: &str, state: &str, message: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "ContainerHierarchyTexts": texts,
            "LeafNodeText": leaf,
            "LeafNodeType": "It",
            "State": state,
            "RunTime": 2_500_000_000i64,
            "Failure": message.map(|m| serde_json::json!({"Message": m})),
        })
    }

    #[test]
    fn a_report_keeps_what_ran_and_names_why_conformance_tests_were_skipped() {
        let json = serde_json::json!([{ "SpecReports": [
            spec(&["[sig-network] Networking", "Granular Checks: Pods"], "should function for intra-pod communication: http [NodeConformance] [Conformance]", "passed", None),
            spec(&["[sig-network] Services"], "should serve a basic endpoint from pods [Conformance]", "failed", Some("timed out\nmore")),
            spec(&["[sig-network] Services"], "should be able to change the type from ExternalName to LoadBalancer [Conformance]", "skipped", None),
            spec(&["[sig-network] DNS"], "should support a feature outside the focus", "skipped", None),
            spec(&["[sig-network] Services"], "should work on ipv6 [Conformance]", "skipped", Some("Only supported for IPv6 clusters")),
            spec(&["[sig-network] Netpol"], "NetworkPolicy between server and client should enforce policy", "skipped", None),
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
        ]}]);
        let report = Report::parse(json.to_string().as_bytes(), false).unwrap();
        let names: Vec<(&str, State)> = report.specs.iter().map(|s| (s.name.as_str(), s.state)).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(report.summary(), "conformance: 1 passed, 1 failed, 2 skipped");
        let lb = report.specs.iter().find(|s| s.name.contains("LoadBalancer")).unwrap();
        assert_eq!(lb.message, "the local cluster has no cloud load balancer");
        let table = report.table();
        assert!(table.contains("FAILED       2.5  [sig-network] Services should serve a basic endpoint"), "{table}");
        assert!(table.contains("↳ timed out\n"), "{table}");
        assert!(table.contains("↳ Only supported for IPv6 clusters"), "{table}");
        assert_eq!(report.failures().len(), 1);
        assert_eq!(report.not_run.get(""), Some(&1), "{:?}", report.not_run);
        assert_eq!(report.not_run.get(SKIPS[0].1), Some(&1), "the netpol spec counted with its reason");
        assert!(table.contains("not run        1  other specs: outside the sig-network conformance set"), "{table}");
    }

    #[test]
    fn a_failed_suite_setup_counts_as_a_failure() {
        let json = r#"[{"SpecReports": [{"LeafNodeType": "SynchronizedBeforeSuite", "State": "failed", "Failure": {"Message": "nodes not schedulable"}}]}]"#;
        let report = Report::parse(json.as_bytes(), false).unwrap();
        assert_eq!(report.summary(), "conformance: 0 passed, 1 failed, 0 skipped");
        assert_eq!(report.failures().get("[SynchronizedBeforeSuite]"), Some(&"nodes not schedulable"));
    }

    #[test]
    fn every_named_test_is_conformance_or_named_on_purpose() {
        for re in SKIPS.iter().chain(&POLICY_SKIPS).map(|(re, _)| re).chain(NAMED.iter()).chain(NETPOL_CI_FOCUS.iter())
        {
            regex::Regex::new(re).unwrap();
        }
        let netpol = "[sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]";
        assert_eq!(skip_reason(netpol, false), Some(SKIPS[0].1));
        assert_eq!(
            skip_reason("[sig-network] HostPort validates that there is no conflict [Conformance]", false),
            None
        );
        assert_eq!(skip_reason(netpol, true), None, "an engine runs the NetworkPolicy suite");
        let sctp = "[sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly] NetworkPolicy between server and client using SCTP should enforce policy based on Ports [Feature:NetworkPolicy]";
        assert_eq!(skip_reason(sctp, true), Some(POLICY_SKIPS[2].1));
    }

    #[test]
    fn with_an_engine_a_report_names_why_netpol_specs_were_skipped() {
        let json = serde_json::json!([{ "SpecReports": [
            spec(&["[sig-network] Netpol", "NetworkPolicy between server and client"], "should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]", "passed", None),
            spec(&["[sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly]", "NetworkPolicy between server and client using SCTP"], "should enforce policy based on Ports [Feature:NetworkPolicy]", "skipped", None),
        ]}]);
        let report = Report::parse(json.to_string().as_bytes(), true).unwrap();
        assert_eq!(report.summary(), "conformance: 1 passed, 0 failed, 1 skipped");
        let sctp = report.specs.iter().find(|s| s.name.contains("SCTP")).unwrap();
        assert_eq!(sctp.message, POLICY_SKIPS[2].1);
    }
}
