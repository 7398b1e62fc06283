//! A burst of pods on one Pod Subnet node: dynamic blocks (the node starts
//! with one /28 and asks for more as its IPAM store fills) against static
//! blocks (everything its max pods need, granted up front). No assertions:
//! it prints figures.
//!
//! ```text
//!   2 real nodes, carve from its image and manifests, two VNet pools with /28 blocks:
//!     node-1 (bench=dynamic)  Dynamic, one block to start, quarantine 5 s
//!     node-2 (bench=static)   Static, maxPods 110 → 7 blocks up front
//!   per round, per contender: 100 pods created at once on its node, create → Running
//!     (a watch), meanwhile a watch on the node's NodeNetworkConfig records every write:
//!     requestedIPs raised (carve-agent) → more blocks in status (carve-controller) = one grant round trip
//!   then all deleted; the dynamic node gives its blocks back before the next round
//! ```
//!
//! `carve-bench-podsubnet [--pods 100] [--rounds 3]`. Needs root; `make bench` runs it.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use carve_crds::NodeNetworkConfig;
use carve_e2e::bench::pods::{delete_all, start_pods};
use carve_e2e::bench::{median, ms, percentile};
use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::testkit::{node_images, wait_for};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::oneshot;

#[derive(Parser, Debug)]
#[command(name = "carve-bench-podsubnet")]
struct Args {
    /// Pods per burst, all on one node (kubelet's max pods is 110).
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Rounds per contender; the figures are the medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const POOLS: &str = "apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: burst-dynamic}
spec:
  mode: VNet
  cidrs: [10.224.16.0/20]
  blockSize: {ipv4: 28}
  nodeSelector: {matchLabels: {bench: dynamic}}
  allocation: {strategy: Dynamic, maxBlocksPerNode: 16, releaseQuarantineSeconds: 5}
---
apiVersion: carve.dev/v1alpha1
kind: PodCIDR
metadata: {name: burst-static}
spec:
  mode: VNet
  cidrs: [10.224.32.0/20]
  blockSize: {ipv4: 28}
  nodeSelector: {matchLabels: {bench: static}}
  allocation: {strategy: Static, maxPods: 110}
";

/// Addresses in a /28, the pools' block size.
const BLOCK: usize = 16;

/// One write to the node's NodeNetworkConfig as a watch saw it.
struct Write {
    at: Instant,
    requested: i64,
    blocks: usize,
}

/// Watches `node`'s NodeNetworkConfig until told to stop; every new
/// resourceVersion is one write.
fn record_writes(
    nncs: Api<NodeNetworkConfig>,
    node: &str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Vec<Write>>) {
    let (stop, mut stopped) = oneshot::channel();
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let task = tokio::spawn(async move {
        let mut events = watcher(nncs, config).boxed();
        let (mut writes, mut last_rv) = (Vec::new(), None);
        loop {
            let ev = tokio::select! {
                _ = &mut stopped => break,
                ev = events.next() => ev,
            };
            let Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) = ev else { continue };
            if n.resource_version() == last_rv {
                continue;
            }
            last_rv = n.resource_version();
            let requested = n.spec.requested_ips.as_ref().and_then(|r| r.ipv4).unwrap_or(0);
            let blocks = n.status.as_ref().map_or(0, |s| s.blocks.len());
            writes.push(Write { at: Instant::now(), requested, blocks });
        }
        writes
    });
    (stop, task)
}

/// Grant round trips (the agent asking for more than its blocks hold → the
/// controller's status with more blocks), blocks granted, and writes during
/// the burst.
fn grants(writes: &[Write]) -> (Vec<Duration>, usize, usize) {
    let Some(first) = writes.first() else { return (Vec::new(), 0, 0) };
    let (mut trips, mut asked_at, mut requested, mut blocks) = (Vec::new(), None, first.requested, first.blocks);
    for w in &writes[1..] {
        // At most BLOCK addresses per block: a request above that needs a grant.
        if w.requested > requested && w.requested > (w.blocks * BLOCK) as i64 && asked_at.is_none() {
            asked_at = Some(w.at);
        }
        if w.blocks > blocks
            && let Some(t) = asked_at.take()
        {
            trips.push(w.at - t);
        }
        (requested, blocks) = (w.requested, w.blocks);
    }
    let granted = writes.iter().map(|w| w.blocks).max().unwrap_or(0).saturating_sub(first.blocks);
    (trips, granted, writes.len() - 1)
}

struct Round {
    last_running: Duration,
    p50: Duration,
    trips: Vec<Duration>,
    granted: usize,
    writes: usize,
}

async fn burst(client: &kube::Client, node: &str, pods: usize, tag: &str) -> Result<Round> {
    let (stop, recorder) = record_writes(Api::all(client.clone()), node);
    // The recorder sees the NNC as it is before the first pod.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let times = start_pods(&Api::<Pod>::namespaced(client.clone(), "default"), &[node.to_string()], pods, tag).await?;
    // The last grant's status write lands before the last pod runs; give stragglers a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    let writes = recorder.await?;
    let (trips, granted, writes) = grants(&writes);
    Ok(Round { last_running: *times.last().unwrap(), p50: percentile(&times, 0.5), trips, granted, writes })
}

fn blocks_of(cluster: &Cluster, node: &str) -> Result<(usize, usize)> {
    let n = cluster.kubectl_json(&["get", "nnc", node])?;
    let count = |k: &str| n["status"][k].as_array().map_or(0, Vec::len);
    Ok((count("blocks"), count("quarantined")))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let images = node_images()?;
    let cluster = Cluster::start(ClusterOptions { nodes: 2, images, ..Default::default() }).await?;
    let cp = cluster.cp();
    cp.kubectl_ok(&["label", "node", "node-1", "bench=dynamic"])?;
    cp.kubectl_ok(&["label", "node", "node-2", "bench=static"])?;
    cluster.deploy_carve(POOLS).await?;
    let client = cp.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let mut rounds: Vec<(&str, Round)> = Vec::new();
    for round in 0..args.rounds {
        for (contender, node) in [("dynamic", "node-1"), ("static", "node-2")] {
            let (blocks, _) = blocks_of(&cluster, node)?;
            let r = burst(&client, node, args.pods, &format!("{contender}{round}")).await?;
            println!(
                "round {} {contender:>7}: {} pods from {blocks} block(s): all Running {:.1} s (median pod {:.1} s), \
                 {} blocks granted in {} round trips, {} NNC writes",
                round + 1,
                args.pods,
                r.last_running.as_secs_f64(),
                r.p50.as_secs_f64(),
                r.granted,
                r.trips.len(),
                r.writes,
            );
            rounds.push((contender, r));
            delete_all(&pods).await?;
            if contender == "dynamic" {
                // The next dynamic round starts from one block again.
                wait_for("node-1 back to one block", Duration::from_secs(180), || async {
                    match blocks_of(&cluster, node) {
                        Ok((1, 0)) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                })
                .await;
            }
        }
    }

    let fig = |c: &str, f: &dyn Fn(&Round) -> f64| {
        median(&rounds.iter().filter(|(n, _)| *n == c).map(|(_, r)| f(r)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let all = |r: &Round| r.last_running.as_secs_f64();
    let p50 = |r: &Round| r.p50.as_secs_f64();
    println!("\n{} pods at once on one Pod Subnet node (/28 blocks), median of {} rounds:", args.pods, args.rounds);
    for c in ["dynamic", "static"] {
        println!("  {c:<8} all Running {:>5.1} s   median pod {:>5.1} s", fig(c, &all), fig(c, &p50));
    }
    println!(
        "  ratio dynamic / static: all Running {:.2}×, median pod {:.2}×",
        fig("dynamic", &all) / fig("static", &all),
        fig("dynamic", &p50) / fig("static", &p50)
    );
    let dynamic: Vec<&Round> = rounds.iter().filter(|(n, _)| *n == "dynamic").map(|(_, r)| r).collect();
    let mut trips: Vec<Duration> = dynamic.iter().flat_map(|r| r.trips.iter().copied()).collect();
    trips.sort();
    if trips.is_empty() {
        bail!("no grant round trip seen in the dynamic rounds");
    }
    println!(
        "  dynamic grants: {:.0} blocks in {:.0} round trips per burst; round trip median {:.0} ms, max {:.0} ms",
        fig("dynamic", &|r| r.granted as f64),
        fig("dynamic", &|r| r.trips.len() as f64),
        ms(percentile(&trips, 0.5)),
        ms(*trips.last().unwrap())
    );
    println!(
        "  NNC writes per block granted (agent spec + controller status): {:.2}",
        fig("dynamic", &|r| r.writes as f64 / r.granted.max(1) as f64)
    );
    let problems = cluster.shutdown();
    if !problems.is_empty() {
        bail!("teardown: {problems:?}");
    }
    Ok(())
}
