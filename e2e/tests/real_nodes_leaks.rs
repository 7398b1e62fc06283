//! Leaked pod addresses on real nodes: an address recorded for a sandbox the
//! runtime never had (what a runtime killed between ADD and recording its
//! sandbox leaves) is freed by carve-agent's leak reconciler on containerd
//! 1.6 (which never sends CNI GC) and on containerd 2, once, and is then
//! handed to a new pod; and under waves of pods, a kubelet restart and an
//! agent restart, no live pod's address is ever freed. The reconciler runs
//! with a 2 s period and its minimum grace (5 s). Needs root (CI has it).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use carve_e2e::cluster::{Cluster, ClusterOptions, RealNode, Runtime};
use carve_e2e::testkit::{node_images, wait_for, workspace_bin};
use serde_json::{Value, json};

mod real_nodes_support;
use real_nodes_support::{NodeIpam, deploy_carve_with, example, kubectl_json, running_pods, store_ips, workload_on};

const AGENT_ENV: &[&str] = &["CARVE_LEAK_CHECK_PERIOD=2s", "CARVE_LEAK_GRACE=5s"];
const WAIT: Duration = Duration::from_secs(120);

/// carve-ipam's leak counters on `node`, read from its agent's /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    passes: u64,
    reclaimed: u64,
}

fn counters(node: &RealNode) -> Result<Counters, String> {
    let text = node.run("curl", &["-sf", "http://127.0.0.1:9967/metrics"]).map_err(|e| format!("{e:#}"))?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .map(|v| v as u64)
            .ok_or(format!("no {name} in:\n{text}"))
    };
    Ok(Counters {
        passes: value("carve_ipam_leak_passes_total")?,
        reclaimed: value("carve_ipam_leaks_reclaimed_total")?,
    })
}

/// Waits until `node`'s agent ran `n` more leak passes than at `from`; the counters then.
async fn passes_after(node: &RealNode, from: Counters, n: u64) -> Counters {
    wait_for(&format!("{n} leak passes on {}", node.name), WAIT, || async {
        let now = counters(node)?;
        if now.passes >= from.passes + n { Ok(now) } else { Err(format!("{now:?}")) }
    })
    .await
}

async fn cluster(runtimes: Vec<Runtime>) -> Cluster {
    let images = node_images().expect("build the node images");
    let cluster = Cluster::start(ClusterOptions { nodes: runtimes.len(), images, runtimes, ..Default::default() })
        .await
        .expect("real-node cluster");
    deploy_carve_with(&cluster, &example("overlay.yaml"), AGENT_ENV).await;
    cluster
}

#[tokio::test]
async fn an_address_whose_sandbox_never_existed_is_freed_once_and_handed_to_the_next_pod_on_either_runtime() {
    let cluster = cluster(vec![Runtime::Containerd16, Runtime::Containerd2]).await;
    for node in cluster.nodes() {
        let ipam = NodeIpam::on(node);
        let before = wait_for("the agent's metrics", WAIT, || async { counters(node) }).await;
        // The node's first address, recorded for a sandbox no runtime has.
        let (code, answer) = ipam.call("ADD", &format!("never-ran-on-{}", node.name));
        assert_eq!(code, 0, "{answer}");
        let leaked: IpAddr = answer["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
        assert!(store_ips(node).contains(&leaked));
        let freed = wait_for(&format!("{leaked} freed on {}", node.name), WAIT, || async {
            let now = counters(node)?;
            if now.reclaimed == before.reclaimed + 1 && !store_ips(node).contains(&leaked) {
                Ok(now)
            } else {
                Err(format!("{now:?}, store {:?}", store_ips(node)))
            }
        })
        .await;
        let events = kubectl_json(&cluster, &["get", "events", "-A", "--field-selector", "reason=LeakedAddressFreed"]);
        let on_node: Vec<&Value> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == node.name.as_str())
            .collect();
        assert_eq!(on_node.len(), 1, "one LeakedAddressFreed Event on {}: {events}", node.name);
        assert!(on_node[0]["message"].as_str().unwrap_or_default().contains(&leaked.to_string()), "{events}");
        // carvectl status counts it for the node.
        let carvectl = workspace_bin("carve-controller", "carvectl").unwrap();
        let out = std::process::Command::new(carvectl)
            .args(["status", "-o", "json", "--kubeconfig"])
            .arg(cluster.cp().kubeconfig())
            .output()
            .unwrap();
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let row = status["nodes"].as_array().into_iter().flatten().find(|n| n["node"] == node.name.as_str());
        assert_eq!(row.map(|r| r["leaksFreed"].clone()), Some(json!(1)), "carvectl status: {status}");

        // The address is free again: the next pod on the node gets it, and keeps it.
        let name = format!("after-leak-{}", node.name);
        cluster.cp().kubectl_stdin(&["apply", "-f", "-"], &workload_on(&name, &node.name, 1)).unwrap();
        let pod = wait_for(&format!("{name} Running"), WAIT, || async {
            running_pods(&cluster, &format!("app={name}")).pop().ok_or("not yet".to_string())
        })
        .await;
        assert_eq!(pod.ip, leaked, "the freed address is the node's lowest free one");
        let later = passes_after(node, freed, 6).await;
        assert_eq!(later.reclaimed, freed.reclaimed, "a live pod's address was freed on {}", node.name);
        assert!(store_ips(node).contains(&leaked), "{} lost {leaked}", pod.name);
    }
}

/// The waves' pods on `node`: Running ones' addresses, and the store's.
fn pods_and_store(cluster: &Cluster, node: &RealNode) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
    let pods = running_pods(cluster, "app=waves");
    let running: BTreeSet<IpAddr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(running.len(), pods.len(), "two running pods share an address: {pods:?}");
    (running, store_ips(node))
}

/// Every Running pod's address is in the store (checked each time the caller asks).
fn assert_no_live_address_lost(cluster: &Cluster, node: &RealNode) {
    let (running, store) = pods_and_store(cluster, node);
    let lost: Vec<_> = running.difference(&store).collect();
    assert!(lost.is_empty(), "running pods' addresses missing from the store: {lost:?} (store {store:?})");
}

#[tokio::test]
async fn waves_of_pods_with_a_kubelet_and_an_agent_restart_never_lose_a_live_address() {
    let cluster = cluster(vec![Runtime::Containerd16]).await;
    let node = &cluster.nodes()[0];
    let cp = cluster.cp();
    let start = wait_for("the agent's metrics", WAIT, || async { counters(node) }).await;
    cp.kubectl_stdin(&["apply", "-f", "-"], &workload_on("waves", &node.name, 0)).unwrap();
    for (wave, replicas) in [30usize, 8, 40, 0, 25].into_iter().enumerate() {
        cp.kubectl_ok(&["scale", "deployment/waves", &format!("--replicas={replicas}")]).unwrap();
        // While the wave settles, every leak pass must find each Running pod's address in place.
        // The counters when the wave was last seen unsettled.
        let seen = std::cell::Cell::new(wait_for("the agent's metrics", WAIT, || async { counters(node) }).await);
        wait_for(&format!("wave {wave}: {replicas} pods Running, the store holding exactly them"), WAIT, || async {
            assert_no_live_address_lost(&cluster, node);
            let now = counters(node)?;
            assert_eq!(now.reclaimed, start.reclaimed, "wave {wave}: the reconciler freed an address");
            let (running, store) = pods_and_store(&cluster, node);
            let all = kubectl_json(&cluster, &["get", "pods", "-l", "app=waves"]);
            let settled = running.len() == replicas && all["items"].as_array().unwrap().len() == replicas;
            // Settled, and two more passes have looked at it.
            if settled && running == store && now.passes >= seen.get().passes + 2 {
                Ok(())
            } else {
                if !settled {
                    seen.set(now);
                }
                Err(format!("{} running, store {}, {now:?}", running.len(), store.len()))
            }
        })
        .await;
        match wave {
            0 => {
                // The kubelet goes away and comes back with 30 pods on the node.
                node.stop_kubelet();
                passes_after(node, counters(node).unwrap(), 4).await;
                // Four passes, over the grace: the pods' interfaces kept them.
                assert_no_live_address_lost(&cluster, node);
                node.start_kubelet(&carve_e2e::control_plane_bins().unwrap()).unwrap();
            }
            2 => {
                // The agent restarts: its suspects are forgotten, nothing else.
                let agent = kubectl_json(
                    &cluster,
                    &["-n", "carve-system", "get", "pods", "-l", "app.kubernetes.io/name=carve-agent"],
                );
                let name = agent["items"][0]["metadata"]["name"].as_str().unwrap().to_string();
                cp.kubectl_ok(&["-n", "carve-system", "delete", "pod", &name, "--grace-period=0", "--force"]).unwrap();
                cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "daemonset/carve-agent", "--timeout=120s"])
                    .unwrap();
            }
            _ => {}
        }
    }
    let end = counters(node).unwrap();
    assert_eq!(end.reclaimed, 0, "the agent restarted in wave 2: its counter starts again, and stays at 0");
}
