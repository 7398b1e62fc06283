//! `carvectl connectivity` (`kubectl carve connectivity`) on three real nodes:
//! every path passes on a healthy cluster, Ctrl-C leaves nothing behind, and
//! once node-3's VXLAN device is deleted by hand while its agent is paused
//! (SIGSTOP, so it cannot repair it), the paths across nodes to and from
//! node-3 fail and the report names node-3. Needs root (CI has it).

use std::process::{Command, Output};
use std::time::Duration;

use carve_e2e::cluster::Cluster;
use carve_e2e::cluster::ClusterOptions;
use carve_e2e::testkit::{node_images, wait_for, workspace_bin};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{deploy_carve, example, kubectl_json};

const WAIT: Duration = Duration::from_secs(120);

fn connectivity(cluster: &Cluster) -> Command {
    let mut cmd = Command::new(workspace_bin("carve-controller", "carvectl").unwrap());
    cmd.args(["connectivity", "--image", "carve.local/busybox:v1", "--timeout", "90s", "--kubeconfig"])
        .arg(cluster.cp().kubeconfig());
    cmd
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("no JSON report: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

async fn probe_namespaces_gone(cluster: &Cluster) {
    wait_for("no carve-connectivity namespace left", WAIT, || async {
        let list = kubectl_json(cluster, &["get", "namespaces", "-l", "app.kubernetes.io/name=carve-connectivity"]);
        let left = list["items"].as_array().map_or(0, Vec::len);
        if left == 0 { Ok(()) } else { Err(format!("{left} left")) }
    })
    .await;
}

/// The carve-agent process serving `node` (its NODE_NAME).
fn agent_pid(node: &str) -> i32 {
    let want = format!("NODE_NAME={node}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).starts_with("/usr/local/bin/carve-agent")
                && env.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
        .unwrap_or_else(|| panic!("no carve-agent process for {node}"))
}

#[tokio::test]
async fn connectivity_passes_on_a_healthy_cluster_and_names_the_node_whose_vxlan_is_gone() {
    let images = node_images().expect("build the node images");
    let cluster =
        Cluster::start(ClusterOptions { nodes: 3, images, ..Default::default() }).await.expect("3 real nodes");
    deploy_carve(&cluster, &example("overlay.yaml")).await;

    // Healthy: every path passes, as a table and as JSON.
    let out = connectivity(&cluster).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
    // 3 nodes × (3 pods + node + Service).
    assert!(table.contains("connectivity: 15 passed, 0 failed"), "{table}");
    probe_namespaces_gone(&cluster).await;

    // Ctrl-C while the probes start: it stops and removes its namespace.
    let mut child = connectivity(&cluster).spawn().unwrap();
    wait_for("the probe namespace", WAIT, || async {
        let list = kubectl_json(&cluster, &["get", "namespaces", "-l", "app.kubernetes.io/name=carve-connectivity"]);
        if list["items"].as_array().map_or(0, Vec::len) == 1 { Ok(()) } else { Err("not yet".to_string()) }
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted check does not pass");
    probe_namespaces_gone(&cluster).await;

    // node-3's overlay device gone, its agent paused so it stays gone.
    let node3 = &cluster.nodes()[2];
    let agent = Pid::from_raw(agent_pid(&node3.name));
    kill(agent, Signal::SIGSTOP).unwrap();
    node3.netns().ip(&["link", "del", "carve.vxlan"]).unwrap();
    let table_run = connectivity(&cluster).output().unwrap();
    let out = connectivity(&cluster).args(["-o", "json"]).output().unwrap();
    kill(agent, Signal::SIGCONT).unwrap();
    // The table names node-3 first: the failures meet there.
    let table = String::from_utf8_lossy(&table_run.stdout).into_owned();
    assert_eq!(table_run.status.code(), Some(1), "{table}");
    let first = table.lines().find(|l| l.trim_start().starts_with("node ")).unwrap_or_default();
    assert!(first.contains(&format!("node {}:", node3.name)), "{table}");
    assert_eq!(out.status.code(), Some(1), "a broken node fails the check");
    let report = report(&out);
    let rows = report["rows"].as_array().unwrap();
    let involves_3 = |r: &Value| r["from"] == node3.name.as_str() || r["to"] == node3.name.as_str();
    for r in rows {
        let across = r["kind"] == "PodOtherNode";
        if across && involves_3(r) {
            assert_eq!(r["ok"], false, "a path across node-3's missing VXLAN passed: {r}");
        } else if r["kind"] != "PodToService" {
            // The Service's backends include node-3's pod, so its paths may go either way.
            assert_eq!(r["ok"], true, "a path that does not cross node-3's VXLAN failed: {r}");
        }
    }
    probe_namespaces_gone(&cluster).await;
}
