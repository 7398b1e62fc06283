//! carve's monitoring against a real Prometheus (3.16, built by
//! control-plane-bins.sh: Debian's 2.42 lacks Kubernetes discovery) scraping
//! the real-node cluster the way the chart's ServiceMonitors tell the
//! Prometheus Operator to: through the metrics Services' EndpointSlices, job
//! named after the Service, each series labelled with its node and pod. With
//! the chart's rule file loaded, every dashboard panel's query returns data,
//! every recording and alerting rule evaluates without error, the figures
//! match the cluster (agents ready, blocks, pod addresses, CNI calls seen by
//! the agents), and a healthy cluster raises no alert. Needs root.

use std::time::Duration;

use carve_e2e::cluster::{CONTROL_PLANE_IP, Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};
use carve_e2e::{control_plane_bins, repo_root};
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{deploy_carve, example, run_workload};

const PROMETHEUS: &str = "127.0.0.1:9090";

fn prometheus_config(kubeconfig: &str, rules: &str) -> String {
    format!(
        r#"global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: ["{rules}"]
scrape_configs:
  - job_name: carve
    kubernetes_sd_configs:
      - role: endpointslice
        kubeconfig_file: {kubeconfig}
        namespaces: {{names: [carve-system]}}
    relabel_configs:
      - {{source_labels: [__meta_kubernetes_service_label_app_kubernetes_io_part_of], regex: carve, action: keep}}
      - {{source_labels: [__meta_kubernetes_endpointslice_port_name], regex: metrics, action: keep}}
      - {{source_labels: [__meta_kubernetes_service_name], target_label: job}}
      - {{source_labels: [__meta_kubernetes_pod_node_name], target_label: node}}
      - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
      - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
"#
    )
}

/// An instant query from inside the underlay, where Prometheus runs.
fn query(cluster: &Cluster, expr: &str) -> Result<Vec<Value>, String> {
    let out = cluster
        .underlay()
        .exec(
            "curl",
            &[
                "-sS",
                "--get",
                "--data-urlencode",
                &format!("query={expr}"),
                &format!("http://{PROMETHEUS}/api/v1/query"),
            ],
        )
        .map_err(|e| format!("{e:#}"))?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    if v["status"] != "success" {
        return Err(format!("{expr}: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// The one value of a query that sums to one series.
fn scalar(cluster: &Cluster, expr: &str) -> Result<f64, String> {
    let r = query(cluster, expr)?;
    match r.as_slice() {
        [one] => Ok(value(one)),
        other => Err(format!("{expr}: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_carve_and_every_panel_and_alert_evaluates() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() })
        .await
        .expect("cluster with 2 real nodes");
    let cp = cluster.cp();
    deploy_carve(&cluster, &example("overlay.yaml")).await;

    // Prometheus in the underlay, discovering targets through the API server.
    let kubeconfig = cp
        .write_kubeconfig(
            "prometheus",
            &format!("https://{CONTROL_PLANE_IP}:6443"),
            "carve-prometheus",
            Some("system:masters"),
        )
        .unwrap();
    let rules = repo_root().join("charts/carve/files/carve-alerts.yaml");
    let config = cluster.dir().join("prometheus.yml");
    std::fs::write(&config, prometheus_config(kubeconfig.to_str().unwrap(), rules.to_str().unwrap())).unwrap();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &cluster.underlay().name])
        .arg(control_plane_bins().unwrap().join("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", cluster.dir().join("prometheus-data").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"));
    cp.spawn("prometheus", cmd).unwrap();

    // Two agents and two controller replicas, every one scraped.
    wait_for("Prometheus scraping 2 agents and 2 controllers", Duration::from_secs(90), || async {
        let agents = query(&cluster, r#"up{job="carve-agent-metrics"} == 1"#)?;
        let controllers = query(&cluster, r#"up{job="carve-controller-metrics"} == 1"#)?;
        let nodes: Vec<&str> = agents.iter().filter_map(|s| s["metric"]["node"].as_str()).collect();
        if agents.len() == 2 && controllers.len() == 2 && nodes.len() == 2 {
            Ok(())
        } else {
            Err(format!("agents {agents:?}, controllers {controllers:?}\n{}", cp.log_tail("prometheus", 5)))
        }
    })
    .await;

    // Pods start and go while Prometheus watches: CNI ADDs and DELs.
    run_workload(&cluster, "web", 4).await;
    cp.kubectl_ok(&["scale", "deployment/web", "--replicas=2"]).unwrap();

    // The figures are the cluster's.
    wait_for("carve's figures in Prometheus", Duration::from_secs(120), || async {
        let ready = scalar(&cluster, "sum(carve_agent_ready)")?;
        let blocks = scalar(&cluster, r#"sum(carve:pool_blocks{state="allocated"})"#)?;
        let node_blocks = scalar(&cluster, "sum(carve_agent_blocks)")?;
        let adds = scalar(&cluster, r#"sum(carve_cni_requests_total{plugin="carve-cni", command="ADD", result="success"})"#)?;
        let dels = scalar(&cluster, r#"sum(carve_cni_requests_total{plugin="carve-cni", command="DEL", result="success"})"#)?;
        let allocated = scalar(&cluster, r#"sum(carve_agent_pod_addresses{state="allocated"})"#)?;
        let p99 = scalar(
            &cluster,
            r#"histogram_quantile(0.99, sum by (le) (rate(carve_cni_request_duration_seconds_bucket{plugin="carve-cni", command="ADD"}[5m])))"#,
        )?;
        let ok = ready == 2.0
            && blocks == 2.0
            && node_blocks == 2.0
            && adds >= 4.0
            && dels >= 2.0
            && allocated == 2.0
            && p99.is_finite()
            && p99 > 0.0;
        let seen = format!(
            "ready {ready}, pool blocks {blocks}, node blocks {node_blocks}, ADDs {adds}, DELs {dels}, allocated {allocated}, ADD p99 {p99}"
        );
        if ok { Ok(seen) } else { Err(seen) }
    })
    .await;

    // Every panel of the dashboard returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/carve/files/carve-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            wait_for(&format!("panel {:?}: {expr}", panel["title"]), Duration::from_secs(60), || async {
                let r = query(&cluster, expr)?;
                if r.is_empty() { Err("no data".to_string()) } else { Ok(()) }
            })
            .await;
        }
    }

    // Every rule of the chart's file evaluates without error, and a healthy
    // cluster has no alert pending or firing.
    let rules_file: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    let wanted = rules_file["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_sequence().unwrap().len())
        .sum::<usize>();
    wait_for("every rule evaluated, healthy", Duration::from_secs(60), || async {
        let out = cluster
            .underlay()
            .exec("curl", &["-sS", &format!("http://{PROMETHEUS}/api/v1/rules")])
            .map_err(|e| format!("{e:#}"))?;
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {}: {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if rules.len() == wanted && bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {wanted} rules, unhealthy: {bad:?}", rules.len()))
        }
    })
    .await;
    for group in rules_file["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            query(&cluster, expr).unwrap_or_else(|e| panic!("rule {:?}: {e}", rule["alert"]));
        }
    }
    let alerts = query(&cluster, "ALERTS").unwrap();
    assert!(alerts.is_empty(), "a healthy cluster raised alerts: {alerts:?}");
    let _ = cluster.shutdown();
}
