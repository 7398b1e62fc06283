//! Pod start latency on real nodes, carve vs bridge + host-local, and the RSS
//! of carve's pods. No assertions: it prints figures.
//!
//! ```text
//!   3 real nodes (kubelet, containerd 1.6 + runc), carve from its image and manifests, overlay pool
//!   per round, per contender: 30 pods per node created at once (spec.nodeName, no scheduler),
//!     create call → the pod seen Running by a watch; then all deleted and gone
//!   contenders interleaved: carve-cni + carve-ipam + portmap (the agent's conflist) and
//!     bridge + host-local + portmap (a 00-bridge.conflist that sorts first, written on every node)
//!   then VmHWM / VmRSS of the carve-agent and carve-controller containers
//! ```
//!
//! `carve-bench-pods [--pods-per-node 30] [--rounds 3]`. Needs root; `make bench` runs it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use carve_e2e::bench::pods::{delete_all, start_pods};
use carve_e2e::bench::{ms, percentile, proc_status_mib};
use carve_e2e::cluster::{Cluster, ClusterOptions, RealNode};
use carve_e2e::testkit::node_images;
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "carve-bench-pods")]
struct Args {
    #[arg(long, default_value_t = 30)]
    pods_per_node: usize,
    /// Rounds per contender; the figures are the medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const BRIDGE_CONFLIST: &str = "00-bridge.conflist";

/// bridge + host-local + portmap, the reference plugins' usual chain, with
/// node `i`'s own /24 (pods only need to start; nothing routes between nodes).
fn bridge_conflist(i: usize) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "bench-bridge",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.85.{i}.0/24")}]], "routes": [{"dst": "0.0.0.0/0"}]}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

/// Puts (or removes) the bridge conflist through the node's own /etc (a rename
/// inside the conf dir, which containerd watches).
fn set_bridge(node: &RealNode, i: usize, on: bool) -> Result<()> {
    let dir = "/etc/cni/net.d";
    if on {
        let tmp = node.dir().join("bridge.conflist");
        std::fs::write(&tmp, bridge_conflist(i))?;
        node.run("cp", &[&tmp.display().to_string(), &format!("{dir}/.bridge.tmp")])?;
        node.run("mv", &[&format!("{dir}/.bridge.tmp"), &format!("{dir}/{BRIDGE_CONFLIST}")])?;
    } else {
        node.run("rm", &["-f", &format!("{dir}/{BRIDGE_CONFLIST}")])?;
    }
    Ok(())
}

/// Peak and current RSS of the processes (in this cluster's node cgroups)
/// whose command line starts with `program`.
fn rss_of(cluster: &Cluster, program: &str) -> Vec<(u32, f64, f64)> {
    let marker = format!("carve-{}-", cluster.id());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cmd.starts_with(program.as_bytes()) && cg.contains(&marker) {
            let hwm = proc_status_mib(pid, "VmHWM:").unwrap_or(0.0);
            let rss = proc_status_mib(pid, "VmRSS:").unwrap_or(0.0);
            found.push((pid, hwm, rss));
        }
    }
    found
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let images = node_images()?;
    let cluster = Cluster::start(ClusterOptions { nodes: 3, images, ..Default::default() }).await?;
    let cp = cluster.cp();
    cp.install_crds()?;
    cp.kubectl_ok(&["apply", "-f", "manifests/"])?;
    cp.kubectl_ok(&["apply", "-f", "examples/overlay.yaml"])?;
    cp.kubectl_ok(&["wait", "--for=condition=Ready", "node", "--all", "--timeout=180s"])?;
    cp.kubectl_ok(&["-n", "carve-system", "rollout", "status", "deployment/carve-controller", "--timeout=180s"])?;
    let client = cp.client().await?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let total = nodes.len() * args.pods_per_node;

    let mut results: BTreeMap<&str, Vec<(Duration, Duration)>> = BTreeMap::new();
    for round in 0..args.rounds {
        for contender in ["carve", "bridge"] {
            let bridge = contender == "bridge";
            for (i, n) in cluster.nodes().iter().enumerate() {
                set_bridge(n, i, bridge)?;
            }
            // containerd reloads its CNI config asynchronously after the rename.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let times = start_pods(&pods, &nodes, args.pods_per_node, &format!("{contender}{round}")).await?;
            // Every pod really got its address from the contender under test.
            let want = if bridge { "10.85." } else { "10.244." };
            let list = pods.list(&ListParams::default().labels("bench=pods")).await?;
            let strays: Vec<String> = list
                .items
                .iter()
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .filter(|ip| !ip.starts_with(want))
                .collect();
            if !strays.is_empty() {
                bail!("{contender} round: pods outside {want}x: {strays:?}");
            }
            let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
            println!(
                "round {} {contender:>6}: {total} pods create → Running  median {:.0} ms  p99 {:.0} ms",
                round + 1,
                ms(p50),
                ms(p99)
            );
            results.entry(contender).or_default().push((p50, p99));
            delete_all(&pods).await?;
        }
    }
    for (i, n) in cluster.nodes().iter().enumerate() {
        set_bridge(n, i, false)?;
    }

    println!(
        "\nPod start latency, {total} pods ({} per node on 3 real nodes) created at once, median of {} rounds:",
        args.pods_per_node, args.rounds
    );
    let fig = |c: &str| {
        let r = &results[c];
        (median(r.iter().map(|x| x.0).collect()), median(r.iter().map(|x| x.1).collect()))
    };
    let (carve, bridge) = (fig("carve"), fig("bridge"));
    println!("  carve-cni + carve-ipam     median {:>6.0} ms  p99 {:>6.0} ms", ms(carve.0), ms(carve.1));
    println!("  bridge + host-local        median {:>6.0} ms  p99 {:>6.0} ms", ms(bridge.0), ms(bridge.1));
    println!(
        "  ratio carve / bridge       median {:.2}×  p99 {:.2}×",
        carve.0.as_secs_f64() / bridge.0.as_secs_f64(),
        carve.1.as_secs_f64() / bridge.1.as_secs_f64()
    );

    println!("\ncarve's pods after the runs (VmHWM = peak RSS):");
    for program in ["/usr/local/bin/carve-agent", "/usr/local/bin/carve-controller"] {
        for (pid, hwm, rss) in rss_of(&cluster, program) {
            println!(
                "  {:<17} pid {pid:>7}  peak {hwm:>5.1} MiB  now {rss:>5.1} MiB",
                program.rsplit('/').next().unwrap_or(program)
            );
        }
    }
    let problems = cluster.shutdown();
    if !problems.is_empty() {
        bail!("teardown: {problems:?}");
    }
    Ok(())
}
