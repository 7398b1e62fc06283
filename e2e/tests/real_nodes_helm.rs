//! carve installed, changed, rolled back and removed with a real helm on real
//! nodes, as Cilium and Calico users manage their CNI: `helm install` networks
//! pods as `kubectl apply -f manifests/` does, `helm upgrade` with changed
//! values rolls the agents under live pods without cutting them off, `helm
//! rollback` restores the first release, `helm uninstall` leaves the CRDs (as
//! Helm does for crds/) and nothing else of the release. Needs root.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};
use carve_e2e::{control_plane_bins, repo_root};
use serde_json::Value;

mod real_nodes_support;
use real_nodes_support::{Pod, exec, kubectl_json, node_blocks, run_workload};

/// helm against the cluster, its config and cache in the test's directory.
fn helm(cluster: &Cluster, args: &[&str]) -> Result<String, String> {
    let home = cluster.dir().join("helm");
    let out = Command::new(control_plane_bins().unwrap().join("helm"))
        .current_dir(repo_root())
        .env("KUBECONFIG", cluster.cp().kubeconfig())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(args)
        .output()
        .map_err(|e| format!("helm: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("helm {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// The agent container's value of `name` in the DaemonSet's pod template.
fn agent_env(cluster: &Cluster, name: &str) -> Option<String> {
    let ds = kubectl_json(cluster, &["-n", "carve-system", "get", "daemonset", "carve-agent"]);
    ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(String::from))
}

fn controller_replicas(cluster: &Cluster) -> Value {
    kubectl_json(cluster, &["-n", "carve-system", "get", "deployment", "carve-controller"])["spec"]["replicas"].clone()
}

/// Waits until every agent pod runs the DaemonSet's current template.
async fn agents_rolled(cluster: &Cluster) {
    let cp = cluster.cp();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=180s"]).unwrap();
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "deployment/carve-controller", "--timeout=180s"])
        .unwrap();
    cluster.wait_network_ready().await.unwrap();
}

/// `ping` from `from` to `to` every 0.2 s for `seconds`, in the background.
fn ping_during(cluster: &Cluster, from: &Pod, to: &Pod, seconds: u32) -> Child {
    cluster
        .cp()
        .kubectl()
        .args(["exec", &from.name, "--", "ping", "-i", "0.2", "-w", &seconds.to_string(), &to.ip.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// (transmitted, received) from ping's summary line.
fn ping_counts(child: Child) -> (u32, u32) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("ping said {text:?}"));
    let n: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (n[0], n[1])
}

fn connected(cluster: &Cluster, pods: &[Pod]) {
    for a in pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            let ping = exec(cluster, &a.name, &["ping", "-c", "1", "-W", "2", &b.ip.to_string()]);
            assert!(ping.is_ok(), "{} ({}) -> {} ({}): {ping:?}", a.name, a.node, b.name, b.node);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_rolls_back_and_uninstalls_carve_on_real_nodes() {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() })
        .await
        .expect("cluster with 2 real nodes");
    let cp = cluster.cp();
    let chart = repo_root().join("charts/carve");
    let chart = chart.to_str().unwrap();
    let pool = "pools[0].name=overlay,pools[0].spec.mode=Overlay,pools[0].spec.cidrs={10.244.0.0/16},pools[0].spec.blockSize.ipv4=24";

    // Install, the pool with it.
    helm(
        &cluster,
        &[
            "install",
            "carve",
            chart,
            "-n",
            "carve-system",
            "--create-namespace",
            "--set",
            pool,
            "--wait",
            "--timeout",
            "5m",
        ],
    )
    .unwrap();
    cluster.wait_network_ready().await.unwrap();
    let pods = run_workload(&cluster, "web", 4).await;
    let blocks = node_blocks(&cluster);
    for p in &pods {
        assert!(blocks[&p.node].iter().any(|b| b.contains(&p.ip)), "{p:?} outside {}'s blocks {blocks:?}", p.node);
    }
    connected(&cluster, &pods);
    let a = &pods[0];
    let b = pods.iter().find(|p| p.node != a.node).unwrap();

    // Upgrade with changed values while a ping runs between two nodes' pods:
    // every agent restarts, the controller drops to one replica.
    assert_eq!(agent_env(&cluster, "CARVE_LOG_LEVEL").as_deref(), Some("info"));
    let ping = ping_during(&cluster, a, b, 40);
    helm(
        &cluster,
        &[
            "upgrade",
            "carve",
            chart,
            "-n",
            "carve-system",
            "--reuse-values",
            "--set",
            "agent.logLevel=debug,controller.replicas=1",
            "--wait",
            "--timeout",
            "5m",
        ],
    )
    .unwrap();
    agents_rolled(&cluster).await;
    let (sent, received) = ping_counts(ping);
    assert!(sent >= 100 && received == sent, "pods lost packets while the agents rolled: {received}/{sent}");
    assert_eq!(agent_env(&cluster, "CARVE_LOG_LEVEL").as_deref(), Some("debug"));
    assert_eq!(controller_replicas(&cluster), 1);
    let agents =
        kubectl_json(&cluster, &["-n", "carve-system", "get", "pods", "-l", "app.kubernetes.io/name=carve-agent"]);
    for agent in agents["items"].as_array().unwrap() {
        let env = agent["spec"]["containers"][0]["env"].to_string();
        assert!(env.contains("\"debug\""), "agent pod {} runs the old template: {env}", agent["metadata"]["name"]);
    }
    connected(&cluster, &pods);
    // New pods still get addresses from the new agents.
    cp.kubectl_ok(&["scale", "deployment/web", "--replicas=6"]).unwrap();
    let more = wait_for("6 web pods Running", Duration::from_secs(120), || async {
        let pods = real_nodes_support::running_pods(&cluster, "app=web");
        if pods.len() == 6 { Ok(pods) } else { Err(format!("{} running", pods.len())) }
    })
    .await;
    connected(&cluster, &more);

    // Rollback to the first release.
    helm(&cluster, &["rollback", "carve", "1", "-n", "carve-system", "--wait", "--timeout", "5m"]).unwrap();
    agents_rolled(&cluster).await;
    assert_eq!(agent_env(&cluster, "CARVE_LOG_LEVEL").as_deref(), Some("info"));
    assert_eq!(controller_replicas(&cluster), 2);
    let history = helm(&cluster, &["history", "carve", "-n", "carve-system", "-o", "json"]).unwrap();
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().map(Vec::len), Some(3), "install, upgrade, rollback: {history}");
    connected(&cluster, &more);

    // Uninstall: the CRDs stay, nothing else of the release does.
    helm(&cluster, &["uninstall", "carve", "-n", "carve-system", "--wait", "--timeout", "5m"]).unwrap();
    let crds = kubectl_json(&cluster, &["get", "crds"]);
    let names: Vec<&str> =
        crds["items"].as_array().unwrap().iter().filter_map(|c| c["metadata"]["name"].as_str()).collect();
    for crd in ["podcidrs.carve.dev", "nodenetworkconfigs.carve.dev"] {
        assert!(names.contains(&crd), "{crd} removed: {names:?}");
    }
    let left = wait_for("the release's objects gone", Duration::from_secs(120), || async {
        let kinds = "deployments,daemonsets,pods,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets";
        let ns = kubectl_json(&cluster, &["-n", "carve-system", "get", kinds, "-l", "app.kubernetes.io/part-of=carve"]);
        let cluster_wide = kubectl_json(
            &cluster,
            &[
                "get",
                "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings,podcidrs",
                "-l",
                "app.kubernetes.io/part-of=carve",
            ],
        );
        let events_role = kubectl_json(&cluster, &["-n", "default", "get", "roles,rolebindings", "-l", "app.kubernetes.io/part-of=carve"]);
        let left: Vec<String> = [ns, cluster_wide, events_role]
            .iter()
            .flat_map(|l| l["items"].as_array().cloned().unwrap_or_default())
            .map(|o| format!("{} {}", o["kind"], o["metadata"]["name"]))
            .collect();
        if left.is_empty() { Ok(left) } else { Err(format!("left: {left:?}")) }
    })
    .await;
    assert!(left.is_empty());
    assert!(helm(&cluster, &["status", "carve", "-n", "carve-system"]).is_err(), "the release is gone");
    let _ = cluster.shutdown();
}
