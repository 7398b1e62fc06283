//! NetworkPolicy on carve, enforced by Azure Network Policy Manager (the
//! engine AKS runs beside Azure CNI), on real nodes: the upstream
//! NetworkPolicy specs on an Overlay pool, a deny-all policy on a routed VNet
//! pool, and an engine restart. Needs root (CI has it).

use std::cell::Cell;
use std::time::{Duration, Instant};

use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::conformance::{self, CI_FOCUS, NETPOL_CI_FOCUS, Run, State};
use carve_e2e::controlplane::conformance_bins;
use carve_e2e::policy::PolicyEngine;
use carve_e2e::testkit::{VNET_POD_POOL, conformance_images, node_images, wait_for};

mod real_nodes_support;
use real_nodes_support::{HOSTNAME_PORT, Pod, deploy_carve, example, exec, run_workload};

const NPM: PolicyEngine = PolicyEngine::AzureNpm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_networkpolicy_specs_pass_on_an_overlay_pool_with_azure_npm() {
    let bins = conformance_bins().expect("build e2e-network.test, ginkgo, agnhost and coredns");
    let images = conformance_images().expect("build the node and conformance images");
    let opts = ClusterOptions { nodes: 2, images, policy: Some(NPM), ..Default::default() };
    let cluster = Cluster::start(opts).await.unwrap();
    deploy_carve(&cluster, &example("overlay.yaml")).await;
    conformance::prepare(&cluster).await.unwrap();

    // The NetworkPolicy share, and the pod Granular Checks with the engine in the path.
    let focus: Vec<String> = NETPOL_CI_FOCUS.iter().chain(&CI_FOCUS[..4]).map(|f| f.to_string()).collect();
    let run = Run {
        focus: focus.clone(),
        procs: 2,
        out_dir: cluster.dir().join("netpol"),
        timeout: Duration::from_secs(1500),
        policy: true,
    };
    let started = Instant::now();
    let report = conformance::run(&cluster, &bins, &run).unwrap();
    println!("{}\n{} (azure-npm, overlay, {:.0?})", report.table(), report.summary(), started.elapsed());
    assert!(
        report.failures().is_empty(),
        "upstream NetworkPolicy specs failed on carve + Azure NPM:\n{}",
        report.table()
    );
    assert_eq!(report.count(State::Passed), focus.len(), "every focused spec ran and passed:\n{}", report.table());
}

/// Whether `from` gets `to`'s hostname from its [`HOSTNAME_PORT`] within 2 s.
fn reaches(cluster: &Cluster, from: &Pod, to: &Pod) -> bool {
    let cmd = format!("nc -w 2 {} {HOSTNAME_PORT} </dev/null", to.ip);
    exec(cluster, &from.name, &["sh", "-c", &cmd]).is_ok_and(|out| out.trim() == to.name)
}

/// The one pod of `pods` on `node`, and one on another node.
fn across_nodes(pods: &[Pod]) -> (Pod, Pod) {
    let a = pods[0].clone();
    let b = pods.iter().find(|p| p.node != a.node).expect("a pod on each node").clone();
    (a, b)
}

const DENY_ALL: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-web, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_all_policy_blocks_routed_vnet_pods_across_nodes_and_holds_through_an_npm_restart() {
    let images = node_images().expect("build the node images");
    let opts = ClusterOptions { nodes: 2, images, policy: Some(NPM), ..Default::default() };
    let cluster = Cluster::start(opts).await.unwrap();
    deploy_carve(&cluster, VNET_POD_POOL).await;
    let cp = cluster.cp();
    let (web_a, web_b) = across_nodes(&run_workload(&cluster, "web", 2).await);
    let (open_a, open_b) = across_nodes(&run_workload(&cluster, "open", 2).await);
    assert!(reaches(&cluster, &web_a, &web_b), "web pods connect across nodes before any policy");

    cp.kubectl_stdin(&["apply", "-f", "-"], DENY_ALL).unwrap();
    wait_for("deny-all enforced between web pods on two nodes", Duration::from_secs(60), || async {
        if reaches(&cluster, &web_a, &web_b) { Err("web-a still reaches web-b".to_string()) } else { Ok(()) }
    })
    .await;
    assert!(!reaches(&cluster, &web_b, &web_a), "blocked the other way too");
    assert!(reaches(&cluster, &open_a, &open_b), "pods the policy does not select still connect");

    // Restart the engine on every node while an unselected pod pings across nodes.
    let ping = {
        let cmd = format!("ping -c 150 -i 0.2 -W 1 {}", open_b.ip);
        let kubectl = cp.kubectl();
        let name = open_a.name.clone();
        std::thread::spawn(move || {
            let mut kubectl = kubectl;
            kubectl.args(["exec", &name, "--", "sh", "-c", &cmd]).output().expect("kubectl exec ping")
        })
    };
    let npm_pods = |cluster: &Cluster| -> Vec<String> {
        let list = cluster.kubectl_json(&["-n", "kube-system", "get", "pods", "-l", NPM.selector()]).unwrap();
        list["items"].as_array().unwrap().iter().map(|p| p["metadata"]["uid"].as_str().unwrap().to_string()).collect()
    };
    let before = npm_pods(&cluster);
    cp.kubectl_ok(&["-n", "kube-system", "delete", "pods", "-l", NPM.selector(), "--wait=false"]).unwrap();
    let (leaked, probes) = (Cell::new(0), Cell::new(0));
    wait_for("new NPM pods Ready", Duration::from_secs(180), || async {
        probes.set(probes.get() + 1);
        if reaches(&cluster, &web_a, &web_b) {
            leaked.set(leaked.get() + 1);
        }
        let now = npm_pods(&cluster);
        if now.iter().any(|uid| before.contains(uid)) {
            return Err(format!("old NPM pods still there: {now:?}"));
        }
        NPM.wait_ready(cp).map_err(|e| format!("{e:#}"))
    })
    .await;
    println!("during the NPM restart {} of {} probes of the denied path got through", leaked.get(), probes.get());
    assert!(!reaches(&cluster, &web_a, &web_b), "deny-all still enforced once NPM is back");
    assert!(!reaches(&cluster, &web_b, &web_a), "in both directions");

    let out = ping.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.lines().rev().take(2).collect::<Vec<_>>().join("\n"));
    assert!(
        text.contains("150 packets transmitted, 150 packets received"),
        "pings lost across the NPM restart:\n{text}"
    );

    cp.kubectl_ok(&["delete", "networkpolicy", "deny-all-web"]).unwrap();
    wait_for("traffic back once the policy is deleted", Duration::from_secs(60), || async {
        if reaches(&cluster, &web_a, &web_b) { Ok(()) } else { Err("web-a does not reach web-b".to_string()) }
    })
    .await;
}
