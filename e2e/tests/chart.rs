//! charts/carve with a real helm (built at a pinned release by
//! control-plane-bins.sh): it lints, manifests/ is exactly the chart rendered
//! with its defaults, values reach the objects they name, bad values are
//! refused naming the field, and every object the chart can render — the
//! monitoring ones too — is accepted by a real API server. The chart on real
//! nodes (install, upgrade, rollback, uninstall) is real_nodes_helm.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use carve_e2e::{ControlPlane, control_plane_bins, repo_root};
use serde::Deserialize;
use serde_yaml::Value;

fn helm() -> PathBuf {
    control_plane_bins().expect("control-plane binaries (e2e/scripts/control-plane-bins.sh)").join("helm")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// `helm template` of the chart with `args`; Err(stderr) when helm refuses.
fn template(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = run(Command::new(helm())
        .current_dir(repo_root())
        .args(["template", "carve", "charts/carve", "--namespace", "carve-system"])
        .args(args));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect())
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_sequence()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

fn agent_container(objects: &[Value]) -> &Value {
    &object(objects, "DaemonSet", "carve-agent")["spec"]["template"]["spec"]["containers"][0]
}

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

#[test]
fn manifests_are_the_chart_rendered_with_its_default_values() {
    let scratch = carve_testkit::temp_dir("carve-render");
    let out = scratch.path();
    let status = run(Command::new(repo_root().join("e2e/scripts/render-manifests.sh")).arg(helm()).arg(out));
    assert!(status.status.success(), "render-manifests.sh: {}", String::from_utf8_lossy(&status.stderr));
    let committed = repo_root().join("manifests");
    assert_eq!(yaml_files(out), yaml_files(&committed), "manifests/ has other files than the chart renders");
    for name in yaml_files(out) {
        let want = std::fs::read_to_string(out.join(&name)).unwrap();
        let got = std::fs::read_to_string(committed.join(&name)).unwrap();
        assert!(
            got == want,
            "manifests/{name} is not what charts/carve renders: edit the chart and run `make manifests`"
        );
    }
}

#[test]
fn the_chart_lints_and_carries_the_workspace_version() {
    let out = run(Command::new(helm()).current_dir(repo_root()).args(["lint", "--strict", "charts/carve"]));
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join("charts/carve/Chart.yaml")).unwrap()).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"].as_str(), Some(version), "Chart.yaml version");
    assert_eq!(chart["appVersion"].as_str(), Some(version), "Chart.yaml appVersion");
    // The default image is the one `make image` tags.
    let objects = template(&[]).unwrap();
    assert_eq!(
        agent_container(&objects)["image"].as_str(),
        Some(format!("ghcr.io/carve-dev/carve:v{version}").as_str())
    );
}

#[test]
fn values_reach_the_objects_they_name() {
    let values = r#"
image: {tag: v9.9.9}
pools:
  - name: overlay
    spec: {mode: Overlay, cidrs: ["10.244.0.0/16"], blockSize: {ipv4: 24}}
apiEndpoint: {host: 10.224.0.1, port: 6443}
controller: {replicas: 3, extraArgs: ["--sweep-interval=5s"]}
agent:
  cniVersion: "1.0.0"
  mtu: 1400
  nonMasqueradeCIDRs: ["10.0.0.0/8", "192.168.0.0/16"]
  noAddressTaint: false
  leakCheckPeriod: 30s
  logLevel: debug
  role: ipam-only
prometheus: {serviceMonitor: {enabled: true, labels: {release: kube-prometheus}}}
prometheusRule: {enabled: true}
dashboards: {enabled: true, namespace: monitoring}
"#;
    let scratch = carve_testkit::temp_dir("carve-values");
    let file = scratch.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let objects = template(&["-f", file.to_str().unwrap()]).unwrap();

    let pool = object(&objects, "PodCIDR", "overlay");
    assert_eq!(pool["spec"]["cidrs"][0], "10.244.0.0/16");
    assert_eq!(pool["spec"]["blockSize"]["ipv4"], 24);
    let endpoint = object(&objects, "ConfigMap", "carve-api-endpoint");
    assert_eq!(endpoint["data"]["KUBERNETES_SERVICE_HOST"], "10.224.0.1");
    assert_eq!(endpoint["data"]["KUBERNETES_SERVICE_PORT"], "6443");

    let controller = object(&objects, "Deployment", "carve-controller");
    assert_eq!(controller["spec"]["replicas"], 3);
    let c = &controller["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/carve-dev/carve:v9.9.9");
    assert!(c["args"].as_sequence().unwrap().iter().any(|a| a == "--sweep-interval=5s"), "{c:?}");

    let agent = agent_container(&objects);
    assert_eq!(agent["image"], "ghcr.io/carve-dev/carve:v9.9.9");
    for (name, value) in [
        ("CARVE_CNI_VERSION", "1.0.0"),
        ("CARVE_MTU", "1400"),
        ("CARVE_NON_MASQUERADE_CIDRS", "10.0.0.0/8,192.168.0.0/16"),
        ("CARVE_NO_ADDRESS_TAINT", "false"),
        ("CARVE_LEAK_CHECK_PERIOD", "30s"),
        ("CARVE_LOG_LEVEL", "debug"),
        ("CARVE_ROLE", "ipam-only"),
    ] {
        assert_eq!(env(agent, name), Some(value), "{name}");
    }
    let init = &object(&objects, "DaemonSet", "carve-agent")["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(env(init, "CARVE_CNI_VERSION"), Some("1.0.0"), "install-cni picks portmap for the pinned version");
    assert_eq!(env(init, "CARVE_ROLE"), Some("ipam-only"), "install-cni installs nothing under another dataplane");

    for component in ["carve-controller", "carve-agent"] {
        let sm = object(&objects, "ServiceMonitor", component);
        assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus");
        assert_eq!(sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], component);
    }
    // The PrometheusRule carries the rule file promtool checks, rule for rule.
    let rule = object(&objects, "PrometheusRule", "carve");
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/carve/files/carve-alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let dashboard = object(&objects, "ConfigMap", "carve-dashboard");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["carve-dashboard.json"].as_str().unwrap()).unwrap();
    assert!(json["panels"].as_array().unwrap().len() >= 10, "{json}");
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    for (set, says) in [
        ("agnet.mtu=1400", "additional properties 'agnet' not allowed"),
        ("agent.mtu=big", "/agent/mtu"),
        ("agent.cniVersion=2.0.0", "/agent/cniVersion"),
        ("controller.replicas=0", "/controller/replicas"),
        ("pools[0].name=overlay", "missing property 'spec'"),
        ("agent.nonMasqueradeCIDRs={10.0.0.0}", "/agent/nonMasqueradeCIDRs/0"),
        ("agent.leakGrace=soon", "/agent/leakGrace"),
        ("agent.role=cilium", "/agent/role"),
    ] {
        let err = template(&["--set", set]).expect_err(set);
        assert!(err.contains(says), "--set {set}: helm said {err:?}, not {says:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_the_chart_renders_passes_server_side_dry_run() {
    let cp = ControlPlane::start().await.expect("control plane");
    // Helm's crds/ first, as `helm install` does; the Prometheus Operator's
    // CRDs stand in for an installed kube-prometheus.
    cp.kubectl_ok(&["apply", "--server-side", "-f", repo_root().join("charts/carve/crds").to_str().unwrap()]).unwrap();
    // A symlink to the versioned directory: the slash makes kubectl follow it.
    let monitoring = format!("{}/", control_plane_bins().unwrap().join("monitoring-crds").display());
    cp.kubectl_ok(&["apply", "--server-side", "-f", &monitoring]).unwrap();
    cp.kubectl_ok(&["create", "namespace", "carve-system"]).unwrap();
    cp.kubectl_ok(&["wait", "--for", "condition=Established", "crd", "--all", "--timeout=60s"]).unwrap();
    let out = run(Command::new(helm()).current_dir(repo_root()).args([
        "template",
        "carve",
        "charts/carve",
        "--namespace",
        "carve-system",
        "--set",
        "prometheus.serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboards.enabled=true",
        "--set",
        "apiEndpoint.host=10.224.0.1,pools[0].name=overlay,pools[0].spec.mode=Overlay,pools[0].spec.cidrs={10.244.0.0/16},pools[0].spec.blockSize.ipv4=24",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8(out.stdout).unwrap();
    let applied = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered).unwrap();
    assert!(applied.status.success(), "server-side dry run: {}", String::from_utf8_lossy(&applied.stderr));
    let said = String::from_utf8_lossy(&applied.stdout);
    for object in [
        "servicemonitor.monitoring.coreos.com/carve-agent",
        "prometheusrule.monitoring.coreos.com/carve",
        "configmap/carve-dashboard",
        "podcidr.carve.dev/overlay",
        "daemonset.apps/carve-agent",
    ] {
        assert!(said.contains(object), "{object} not applied: {said}");
    }
}

/// promtool from Debian's prometheus package (`make prereqs` installs it).
fn promtool(args: &[&str]) -> Output {
    run(Command::new("promtool").current_dir(repo_root()).args(args))
}

#[test]
fn the_alerts_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "charts/carve/files/carve-alerts.yaml"]);
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // An exhausted pool fires CarvePoolExhausted (a standby's stale counts
    // notwithstanding), a pool under 10% free the warning, no leader its alert.
    let test = promtool(&["test", "rules", "e2e/monitoring/carve-alerts.test.yaml"]);
    assert!(
        test.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
