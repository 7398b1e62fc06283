//! Figures for carving pod CIDR blocks for many Nodes, on the local control
//! plane. No assertions: it prints figures next to the targets.
//!
//! ```text
//!   allocator micro-benchmark: all 65,536 /24 of 10.0.0.0/8, allocate and occupy (best of 5)
//!   per N, per contender, on a FRESH ControlPlane (new etcd):
//!     contender up ─▶ watch Nodes (+ NNCs) ─▶ timer start ─▶ create N Nodes (64 concurrent)
//!                  ─▶ last Node seen done by the watch ─▶ timer stop ─▶ drop ControlPlane
//!   contenders: carve-controller (release build)
//!               kube-controller-manager node IPAM, default client QPS (20/30)
//!               kube-controller-manager node IPAM, --kube-api-qps=1000 --kube-api-burst=2000
//!               raw: a plain client doing carve's 3 writes per Node, no allocation logic
//! ```
//!
//! Next to each time it prints what explains it: the API writes the server counted (by
//! resource, verb and code), the CPU seconds of every process in the window (and of processes
//! outside the benchmark, flagged when they disturb the figure), the contender's peak RSS and
//! open file descriptors, carve's reconcile count, and a check that the blocks are distinct and
//! each NNC matches its Node.
//!
//! `carve-bench-nodes [1000,5000]`, or `--nodes 200` (env `CARVE_BENCH_NODES`) for a quick run.
//! Needs `cargo build --release -p carve-controller` first (`make bench` does it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use carve_controller::allocator::{PoolBlocks, PoolLayout};
use carve_crds::net::IpFamily;
use carve_crds::{NodeBlock, NodeNetworkConfig, NodeNetworkConfigSpec, NodeNetworkConfigStatus, PodCidr, PoolMode};
use carve_e2e::{ControlPlane, Options};
use clap::Parser;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::oneshot;

const NODE_PREFIX: &str = "bench-node-";
const LABEL_KEY: &str = "carve.dev/bench";
const LABEL_VALUE: &str = "nodes";
const POOL: &str = "bench";
const CLUSTER_CIDR: &str = "10.0.0.0/8";
const BLOCK_PREFIX: u8 = 24;
const RAW_MANAGER: &str = "carve-bench-raw";
const MICRO_RUNS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Time from creating N Nodes until every one has its pod CIDR block.
#[derive(Parser, Debug)]
#[command(name = "carve-bench-nodes")]
struct Args {
    /// Node counts, comma-separated.
    #[arg(default_value = "1000,5000")]
    sizes: String,
    /// Node counts; overrides the positional list (e.g. --nodes 200 for a quick run).
    #[arg(long, env = "CARVE_BENCH_NODES")]
    nodes: Option<String>,
    /// Contenders, comma-separated, from: carve, kcm, kcm-qps, raw.
    #[arg(long, default_value = "carve,kcm,kcm-qps,raw")]
    contenders: String,
    /// Time limit of one (contender, N) run, in seconds; the cell then reads "timeout".
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Time budget of the whole run, in seconds: a run estimated (from the smaller N) to overrun
    /// what is left is skipped, and the output says so.
    #[arg(long, default_value_t = 2700)]
    budget: u64,
    /// Concurrent Node creates, and concurrent Nodes in the raw contender.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Extra kube-apiserver flag, the same for every run (repeatable).
    #[arg(long = "apiserver-arg", allow_hyphen_values = true)]
    apiserver_args: Vec<String>,
    /// Only the allocator micro-benchmark.
    #[arg(long)]
    micro_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Contender {
    Carve,
    Kcm,
    KcmQps,
    Raw,
}

impl Contender {
    const ALL: [Contender; 4] = [Contender::Carve, Contender::Kcm, Contender::KcmQps, Contender::Raw];

    fn key(self) -> &'static str {
        match self {
            Contender::Carve => "carve",
            Contender::Kcm => "kcm",
            Contender::KcmQps => "kcm-qps",
            Contender::Raw => "raw",
        }
    }

    fn describe(self, concurrency: usize) -> String {
        match self {
            Contender::Carve => "carve-controller (release), Overlay pool 10.0.0.0/8, blockSize ipv4 24".into(),
            Contender::Kcm => "kube-controller-manager node-ipam-controller, default client QPS 20 / burst 30".into(),
            Contender::KcmQps => {
                "kube-controller-manager node-ipam-controller, --kube-api-qps=1000 --kube-api-burst=2000".into()
            }
            Contender::Raw => format!(
                "raw write limit: plain kube-rs client, carve's 3 writes per Node (create NNC, patch NNC status, \
                 patch Node podCIDR), precomputed blocks, {concurrency} Nodes in flight (buffer_unordered), \
                 like carve-controller's default --concurrency 64"
            ),
        }
    }

    /// Whether "done" also needs the Node's NodeNetworkConfig with blocks in status.
    fn writes_nnc(self) -> bool {
        matches!(self, Contender::Carve | Contender::Raw)
    }
}

#[derive(Debug, Clone)]
struct Figures {
    secs: f64,
    create_secs: f64,
    startup_secs: f64,
    rss_mib: Option<f64>,
    writes: BTreeMap<String, u64>,
    notes: Vec<String>,
}

#[derive(Debug, Clone)]
enum Cell {
    Done(Figures),
    Timeout { done: usize, limit: Duration },
    Failed(String),
    Skipped(String),
}

impl Cell {
    fn secs(&self) -> Option<f64> {
        match self {
            Cell::Done(f) => Some(f.secs),
            _ => None,
        }
    }

    fn short(&self) -> String {
        match self {
            Cell::Done(f) => format!("{:.1}", f.secs),
            Cell::Timeout { .. } => "timeout".into(),
            Cell::Failed(_) => "failed".into(),
            Cell::Skipped(_) => "skipped".into(),
        }
    }
}

/// Aborts the tasks it holds when dropped (a timed-out run drops its future).
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(fut));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn parse_sizes(list: &str) -> Result<Vec<usize>> {
    let mut sizes: Vec<usize> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().with_context(|| format!("{s:?} is not a node count")))
        .collect::<Result<_>>()?;
    if sizes.is_empty() || sizes.iter().any(|&n| n == 0 || n > 65_536) {
        bail!("node counts must be 1..=65536 (10.0.0.0/8 holds 65,536 /24 blocks)");
    }
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

fn parse_contenders(list: &str) -> Result<Vec<Contender>> {
    let mut out = Vec::new();
    for key in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let c = Contender::ALL
            .into_iter()
            .find(|c| c.key() == key)
            .ok_or_else(|| anyhow!("unknown contender {key:?}; use carve, kcm, kcm-qps or raw"))?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------
// Allocator micro-benchmark

fn micro_benchmark() -> Result<()> {
    let layout = PoolLayout {
        azure_reserved: false,
        cidrs: vec![CLUSTER_CIDR.parse()?],
        block_prefix_v4: BLOCK_PREFIX,
        block_prefix_v6: 80,
        exclusions: vec![],
    };
    let mut best_alloc = Duration::MAX;
    let mut best_occupy = Duration::MAX;
    let mut count = 0;
    for _ in 0..MICRO_RUNS {
        let started = Instant::now();
        let mut pool = PoolBlocks::new(layout.clone());
        let mut blocks = Vec::with_capacity(1 << 16);
        while let Some(b) = pool.allocate(IpFamily::IPv4) {
            blocks.push(b);
        }
        std::hint::black_box(&pool);
        best_alloc = best_alloc.min(started.elapsed());
        count = blocks.len();

        let started = Instant::now();
        let mut rebuilt = PoolBlocks::new(layout.clone());
        for b in &blocks {
            rebuilt.occupy(b).map_err(|e| anyhow!("occupy {b}: {e}"))?;
        }
        std::hint::black_box(&rebuilt);
        best_occupy = best_occupy.min(started.elapsed());
        if rebuilt.allocate(IpFamily::IPv4).is_some() {
            bail!("the rebuilt pool still had a free block after occupying all {count}");
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mark = |d: Duration| if ms(d) < 50.0 { "ok" } else { "MISSED" };
    println!("allocator micro-benchmark: PoolBlocks over {CLUSTER_CIDR}, /{BLOCK_PREFIX} blocks, best of {MICRO_RUNS}");
    println!(
        "  allocate all {count:>6} blocks (new + allocate until None)  {:>8.2} ms   target < 50 ms  {}",
        ms(best_alloc),
        mark(best_alloc)
    );
    println!(
        "  rebuild: occupy all {count:>6} blocks into a fresh pool    {:>8.2} ms   target < 50 ms  {}",
        ms(best_occupy),
        mark(best_occupy)
    );
    if count != 1 << 16 {
        println!("  NOTE: expected 65536 blocks, got {count}");
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------
// Cluster runs

/// Runs `f` until it succeeds, retrying transport errors and 429/5xx a few times.
async fn retry<T, F, Fut>(what: impl Fn() -> String, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 6 && retriable(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            Err(e) => return Err(e).with_context(what),
        }
    }
}

fn retriable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

fn node_name(i: usize) -> String {
    format!("{NODE_PREFIX}{i}")
}

async fn create_nodes(client: &Client, n: usize, concurrency: usize) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let node: Node = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": { "name": node_name(i), "labels": { LABEL_KEY: LABEL_VALUE } },
                }))?;
                let (api, node) = (&api, &node);
                retry(
                    || format!("create Node {}", node.name_any()),
                    || async move {
                        match api.create(&PostParams::default(), node).await {
                            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                            r => r.map(|_| ()),
                        }
                    },
                )
                .await
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|()| futures::future::ready(Ok(())))
        .await
}

fn has_pod_cidr(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).is_some_and(|c| !c.is_empty())
}

fn has_blocks(nnc: &NodeNetworkConfig) -> bool {
    nnc.status.as_ref().is_some_and(|s| !s.blocks.is_empty())
}

enum Seen {
    NodeDone(String),
    NncDone(String),
    InitDone,
    Other,
}

/// Watches the bench Nodes (and NNCs); `ready` fires once the watches are
/// established, `done` with the instant the last of `n` Nodes was seen done.
async fn watch_done(
    client: Client,
    n: usize,
    with_nnc: bool,
    progress: Arc<AtomicUsize>,
    ready: oneshot::Sender<()>,
    done: oneshot::Sender<[Instant; 3]>,
) {
    let nodes: BoxStream<Seen> = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}")),
    )
    .default_backoff()
    .map(|ev| match ev {
        Ok(Event::Apply(n) | Event::InitApply(n)) if has_pod_cidr(&n) => Seen::NodeDone(n.name_any()),
        Ok(Event::InitDone) => Seen::InitDone,
        _ => Seen::Other,
    })
    .boxed();
    let nncs: BoxStream<Seen> = if with_nnc {
        watch(Api::<NodeNetworkConfig>::all(client), watcher::Config::default())
            .default_backoff()
            .map(|ev| match ev {
                Ok(Event::Apply(n) | Event::InitApply(n)) if has_blocks(&n) => Seen::NncDone(n.name_any()),
                Ok(Event::InitDone) => Seen::InitDone,
                _ => Seen::Other,
            })
            .boxed()
    } else {
        futures::stream::empty().boxed()
    };
    let full: u8 = if with_nnc { 3 } else { 1 };
    let mut inits_left = if with_nnc { 2 } else { 1 };
    let mut ready = Some(ready);
    let mut state: HashMap<String, u8> = HashMap::with_capacity(n);
    let mut count = 0;
    let (mut half, mut ninety) = (None, None);
    let mut events = futures::stream::select(nodes, nncs);
    while let Some(seen) = events.next().await {
        let (name, bit) = match seen {
            Seen::NodeDone(name) => (name, 1),
            Seen::NncDone(name) => (name, 2),
            Seen::InitDone => {
                inits_left -= 1;
                if inits_left == 0
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(());
                }
                continue;
            }
            Seen::Other => continue,
        };
        let flags = state.entry(name).or_default();
        if *flags & bit == 0 {
            *flags |= bit;
            if *flags == full {
                count += 1;
                progress.store(count, Ordering::Relaxed);
                if count == n.div_ceil(2) {
                    half = Some(Instant::now());
                }
                if count == (n * 9).div_ceil(10) {
                    ninety = Some(Instant::now());
                }
                if count == n {
                    let now = Instant::now();
                    let _ = done.send([half.unwrap_or(now), ninety.unwrap_or(now), now]);
                    return;
                }
            }
        }
    }
}

fn raw_block(name: &str) -> Result<(String, String)> {
    let i: u32 = name.strip_prefix(NODE_PREFIX).and_then(|s| s.parse().ok()).context("not a bench node")?;
    let (b, c) = ((i >> 8) & 0xff, i & 0xff);
    Ok((format!("10.{b}.{c}.0/{BLOCK_PREFIX}"), format!("10.{b}.{c}.1")))
}

/// carve's writes for one Node, without allocation logic: create its NNC,
/// patch the NNC status, patch the Node's podCIDR.
async fn raw_writes(client: Client, name: String, uid: String) -> Result<()> {
    let (cidr, gateway) = raw_block(&name)?;
    let nnc_api: Api<NodeNetworkConfig> = Api::all(client.clone());
    let node_api: Api<Node> = Api::all(client);
    let mut nnc = NodeNetworkConfig::new(&name, NodeNetworkConfigSpec::default());
    nnc.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: name.clone(),
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let (nnc_api, node_api, nnc, name) = (&nnc_api, &node_api, &nnc, name.as_str());
    let created = retry(
        || format!("create NNC {name}"),
        || async move {
            let pp = PostParams { field_manager: Some(RAW_MANAGER.into()), ..Default::default() };
            match nnc_api.create(&pp, nnc).await {
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                r => r.map(Some),
            }
        },
    )
    .await?;
    let generation = created.and_then(|c| c.metadata.generation);
    let status = NodeNetworkConfigStatus {
        pool: Some(POOL.into()),
        mode: Some(PoolMode::Overlay),
        blocks: vec![NodeBlock { cidr: cidr.clone(), family: IpFamily::IPv4, gateway: Some(gateway.clone()) }],
        block_cidrs: Some(cidr.clone()),
        gateway: Some(gateway),
        node_ip: None,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "BlocksCarved".into(),
            message: format!("{cidr} carved from pool {POOL}"),
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }],
        observed_generation: generation,
    };
    let status_patch = Patch::Merge(json!({ "status": status }));
    let status_patch = &status_patch;
    retry(
        || format!("patch NNC status {name}"),
        || async move { nnc_api.patch_status(name, &PatchParams::apply(RAW_MANAGER), status_patch).await.map(|_| ()) },
    )
    .await?;
    let node_patch = Patch::Merge(json!({ "spec": { "podCIDR": cidr, "podCIDRs": [cidr] } }));
    let node_patch = &node_patch;
    retry(
        || format!("patch Node {name}"),
        || async move { node_api.patch(name, &PatchParams::default(), node_patch).await.map(|_| ()) },
    )
    .await
}

/// The raw contender: a Node watch feeding `concurrency` Nodes' writes at a time.
async fn raw_writer(client: Client, concurrency: usize, ready: oneshot::Sender<()>, errors: Arc<AtomicUsize>) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<(String, String)>();
    let feed_client = client.clone();
    let feeder = async move {
        let mut ready = Some(ready);
        let mut seen: HashSet<String> = HashSet::new();
        let cfg = watcher::Config::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}"));
        let mut nodes = watch(Api::<Node>::all(feed_client), cfg).default_backoff().boxed();
        while let Some(ev) = nodes.next().await {
            match ev {
                Ok(Event::Apply(node) | Event::InitApply(node))
                    if !has_pod_cidr(&node) && seen.insert(node.name_any()) =>
                {
                    let _ = tx.unbounded_send((node.name_any(), node.uid().unwrap_or_default()));
                }
                Ok(Event::InitDone) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                _ => {}
            }
        }
    };
    let writer =
        rx.map(|(name, uid)| raw_writes(client.clone(), name, uid)).buffer_unordered(concurrency).for_each(|r| {
            if let Err(e) = r
                && errors.fetch_add(1, Ordering::Relaxed) < 5
            {
                eprintln!("raw writer: {e:#}");
            }
            futures::future::ready(())
        });
    futures::join!(feeder, writer);
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_log(cp: &ControlPlane, name: &str) -> String {
    strip_ansi(&std::fs::read_to_string(cp.dir().join(format!("{name}.log"))).unwrap_or_default())
}

/// Waits until the log of `name` contains one of `needles`.
async fn wait_log(cp: &ControlPlane, name: &str, needles: &[&str]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let log = read_log(cp, name);
        if needles.iter().any(|n| log.contains(n)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not log any of {needles:?} in {READY_TIMEOUT:?}; last lines:\n{}", cp.log_tail(name, 30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The carve controller is running its loops once it has written the pool's Ready condition.
async fn wait_pool_ready(cp: &ControlPlane, client: &Client) -> Result<()> {
    let api: Api<PodCidr> = Api::all(client.clone());
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let pool = api.get(POOL).await?;
        let ready =
            pool.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "carve-controller did not mark pool {POOL} Ready in {READY_TIMEOUT:?}; last log lines:\n{}",
                cp.log_tail("carve-controller", 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first write of a freshly installed CRD takes about 2 s on this API server (a one-off
/// cold path); one throwaway NNC written and deleted before the timer keeps it out of the figures.
async fn warm_nnc_writes(client: &Client) -> Result<Duration> {
    let started = Instant::now();
    let api: Api<NodeNetworkConfig> = Api::all(client.clone());
    let name = "bench-warm-up";
    api.create(&PostParams::default(), &NodeNetworkConfig::new(name, NodeNetworkConfigSpec::default()))
        .await
        .context("create the warm-up NNC")?;
    let status = json!({ "status": { "pool": POOL, "blocks": [{ "cidr": "192.168.0.0/24", "family": "IPv4" }] } });
    api.patch_status(name, &PatchParams::apply(RAW_MANAGER), &Patch::Merge(status))
        .await
        .context("patch the warm-up NNC's status")?;
    api.delete(name, &Default::default()).await.context("delete the warm-up NNC")?;
    Ok(started.elapsed())
}

/// After a run: every Node's podCIDR is distinct and, where NNCs are written, equals its NNC's block.
async fn check_allocations(client: &Client, n: usize, with_nnc: bool) -> Result<String> {
    let lp = ListParams::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}"));
    let nodes = Api::<Node>::all(client.clone()).list(&lp).await?;
    let mut by_node: HashMap<String, String> = HashMap::new();
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut problems: Vec<String> = Vec::new();
    for node in &nodes.items {
        let cidrs = node.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
        if cidrs.len() != 1 || cidrs[0] != cidr {
            problems.push(format!("{}: podCIDR {cidr:?} podCIDRs {cidrs:?}", node.name_any()));
        }
        if let Some(other) = owners.insert(cidr.clone(), node.name_any()) {
            problems.push(format!("{cidr} given to both {other} and {}", node.name_any()));
        }
        by_node.insert(node.name_any(), cidr);
    }
    let mut nncs_seen = 0;
    if with_nnc {
        for nnc in Api::<NodeNetworkConfig>::all(client.clone()).list(&ListParams::default()).await?.items {
            nncs_seen += 1;
            let blocks: Vec<&str> =
                nnc.status.as_ref().map(|s| s.blocks.iter().map(|b| b.cidr.as_str()).collect()).unwrap_or_default();
            match by_node.get(&nnc.name_any()) {
                Some(cidr) if blocks == [cidr.as_str()] => {}
                Some(cidr) => {
                    problems.push(format!("NNC {} blocks {blocks:?} but Node podCIDR {cidr}", nnc.name_any()))
                }
                None => problems.push(format!("NNC {} has no bench Node", nnc.name_any())),
            }
        }
    }
    if nodes.items.len() != n || (with_nnc && nncs_seen != n) {
        problems.push(format!("{} Nodes and {nncs_seen} NNCs listed, {n} expected", nodes.items.len()));
    }
    Ok(match problems.len() {
        0 => format!(
            "allocation check: {} distinct blocks{}",
            owners.len(),
            if with_nnc { ", each NNC matches its Node" } else { "" }
        ),
        k => format!(
            "allocation check FAILED ({k} problems): {}",
            problems.into_iter().take(5).collect::<Vec<_>>().join("; ")
        ),
    })
}

fn carve_binary() -> PathBuf {
    carve_e2e::repo_root().join("target/release/carve-controller")
}

/// CPU seconds (user + system) a process has used; /proc counts in USER_HZ = 100 ticks a second.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds the whole machine spent busy (all cores), from /proc/stat.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / 100.0
}

/// CPU seconds of this process and of each child (etcd, kube-apiserver, the contender), by name.
fn cpu_snapshot() -> BTreeMap<String, f64> {
    let me = std::process::id().to_string();
    let mut out = BTreeMap::new();
    out.insert("bench".to_string(), cpu_secs("self").unwrap_or_default());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(')')) else { continue };
        let ppid = rest.split_whitespace().nth(1).unwrap_or_default();
        if ppid == me {
            let name = match &head[open + 1..] {
                "carve-controlle" => "carve-controller".to_string(),
                "kube-controller" => "kube-controller-manager".to_string(),
                other => other.to_string(),
            };
            *out.entry(name).or_default() += cpu_secs(&pid).unwrap_or_default();
        }
    }
    out
}

/// Samples the process's open file descriptors (mostly API connections) every 50 ms; keeps the maximum.
async fn sample_fds(pid: u32, peak: Arc<AtomicUsize>) {
    loop {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            peak.fetch_max(dir.count(), Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses `name{k="v",...} value` lines of a Prometheus text page.
fn prom_samples<'a>(text: &'a str, metric: &str) -> Vec<(BTreeMap<&'a str, &'a str>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else { continue };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest.trim()),
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.trim_start_matches(','), v.trim_end_matches('"'));
            }
        }
        out.push((map, value));
    }
    out
}

/// Writes the API server served so far on Nodes, NNCs and Events, by resource, verb and code.
async fn write_tally(client: &Client) -> Result<BTreeMap<String, u64>> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let mut tally = BTreeMap::new();
    for (labels, value) in prom_samples(&text, "apiserver_request_total") {
        let verb = labels.get("verb").copied().unwrap_or_default();
        let resource = labels.get("resource").copied().unwrap_or_default();
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY")
            || !matches!(resource, "nodes" | "nodenetworkconfigs" | "events")
        {
            continue;
        }
        let sub = labels.get("subresource").copied().unwrap_or_default();
        let resource = if resource == "nodenetworkconfigs" { "nnc" } else { resource };
        let key = if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") };
        let code = labels.get("code").copied().unwrap_or_default();
        *tally.entry(format!("{key} {verb} {code}")).or_insert(0) += value as u64;
    }
    Ok(tally)
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// Reconciles and reconcile errors from carve-controller's /metrics.
fn carve_metrics(cp: &ControlPlane) -> Result<String> {
    let log = read_log(cp, "carve-controller");
    let addr = log
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .context("no metrics address in carve-controller's log")?
        .to_string();
    let text = http_get(&addr, "/metrics")?;
    let reconciles: f64 = prom_samples(&text, "carve_reconciles_total").iter().map(|(_, v)| v).sum();
    let errors: Vec<String> = prom_samples(&text, "carve_reconcile_errors_total")
        .iter()
        .map(|(l, v)| format!("{}={v}", l.get("reason").copied().unwrap_or("?")))
        .collect();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    Ok(format!(
        "carve reconciles {reconciles}, reconcile errors [{}], WARN log lines {warnings}",
        if errors.is_empty() { "none".to_string() } else { errors.join(", ") }
    ))
}

async fn start_contender(
    cp: &ControlPlane,
    client: &Client,
    c: Contender,
    tasks: &mut Tasks,
    concurrency: usize,
    raw_errors: Arc<AtomicUsize>,
    notes: &mut Vec<String>,
) -> Result<Option<u32>> {
    match c {
        Contender::Carve => {
            cp.install_crds()?;
            let warm = warm_nnc_writes(client).await?;
            notes.push(format!("first NNC writes (warm-up, before the timer): {:.2} s", warm.as_secs_f64()));
            let pool: PodCidr = serde_json::from_value(json!({
                "apiVersion": "carve.dev/v1alpha1",
                "kind": "PodCIDR",
                "metadata": { "name": POOL },
                "spec": { "mode": "Overlay", "cidrs": [CLUSTER_CIDR], "blockSize": { "ipv4": BLOCK_PREFIX } },
            }))?;
            Api::<PodCidr>::all(client.clone())
                .create(&PostParams::default(), &pool)
                .await
                .context("create PodCIDR")?;
            let bin = carve_binary();
            if !bin.exists() {
                bail!("{} is missing: run `cargo build --release -p carve-controller`", bin.display());
            }
            let mut cmd = Command::new(bin);
            cmd.arg("--kubeconfig")
                .arg(cp.kubeconfig())
                .args(["--leader-elect=false", "--metrics-addr", "127.0.0.1:0"])
                .env("NO_COLOR", "1")
                .env_remove("KUBECONFIG");
            let pid = cp.spawn("carve-controller", cmd)?;
            wait_log(cp, "carve-controller", &["serving"]).await?;
            wait_pool_ready(cp, client).await?;
            Ok(Some(pid))
        }
        Contender::Kcm | Contender::KcmQps => {
            let mut cmd = Command::new(cp.bin("kube-controller-manager"));
            cmd.args([
                format!("--kubeconfig={}", cp.kubeconfig().display()),
                "--controllers=node-ipam-controller".into(),
                "--allocate-node-cidrs=true".into(),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                format!("--node-cidr-mask-size={BLOCK_PREFIX}"),
                format!("--service-cluster-ip-range={}", carve_e2e::controlplane::SERVICE_CIDR),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=false".into(),
            ]);
            if c == Contender::KcmQps {
                cmd.args(["--kube-api-qps=1000", "--kube-api-burst=2000"]);
            }
            let pid = cp.spawn("kube-controller-manager", cmd)?;
            wait_log(cp, "kube-controller-manager", &["Starting range CIDR allocator"]).await?;
            wait_log(cp, "kube-controller-manager", &["Caches are synced"]).await?;
            Ok(Some(pid))
        }
        Contender::Raw => {
            cp.install_crds()?;
            let warm = warm_nnc_writes(client).await?;
            notes.push(format!("first NNC writes (warm-up, before the timer): {:.2} s", warm.as_secs_f64()));
            let (tx, rx) = oneshot::channel();
            tasks.spawn(raw_writer(client.clone(), concurrency, tx, raw_errors));
            tokio::time::timeout(READY_TIMEOUT, rx).await.context("raw writer's watch did not start")??;
            Ok(None)
        }
    }
}

async fn run(c: Contender, n: usize, args: &Args, opts: &Options, progress: Arc<AtomicUsize>) -> Result<Figures> {
    let cp = ControlPlane::start_with(opts.clone()).await?;
    let client = cp.client().await?;
    let mut tasks = Tasks::default();
    let started = Instant::now();
    let raw_errors = Arc::new(AtomicUsize::new(0));
    let mut start_notes = Vec::new();
    let pid =
        start_contender(&cp, &client, c, &mut tasks, args.concurrency, raw_errors.clone(), &mut start_notes).await?;
    let startup_secs = started.elapsed().as_secs_f64();
    let idle_rss = pid.and_then(|p| carve_e2e::bench::proc_status_mib(p, "VmRSS:"));
    let peak_fds = Arc::new(AtomicUsize::new(0));
    if let Some(pid) = pid {
        tasks.spawn(sample_fds(pid, peak_fds.clone()));
    }

    let (ready_tx, ready_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    tasks.spawn(watch_done(client.clone(), n, c.writes_nnc(), progress, ready_tx, done_tx));
    tokio::time::timeout(READY_TIMEOUT, ready_rx).await.context("the completion watch did not start")??;

    let before = write_tally(&client).await.unwrap_or_default();
    let cpu_before = cpu_snapshot();
    let busy_before = machine_busy_secs();
    let t0 = Instant::now();
    create_nodes(&client, n, args.concurrency).await?;
    let create_secs = t0.elapsed().as_secs_f64();
    let [half, ninety, end] = done_rx.await.context("the completion watch ended early")?;
    let secs = end.duration_since(t0).as_secs_f64();
    let mut notes = vec![format!(
        "50% of the Nodes done at {:.2} s, 90% at {:.2} s",
        half.duration_since(t0).as_secs_f64(),
        ninety.duration_since(t0).as_secs_f64()
    )];
    let busy = machine_busy_secs() - busy_before;
    let used: Vec<(String, f64)> = cpu_snapshot()
        .into_iter()
        .map(|(name, secs)| {
            let d = secs - cpu_before.get(&name).copied().unwrap_or_default();
            (name, d)
        })
        .collect();
    let ours: f64 = used.iter().map(|(_, d)| d).sum();
    let cpu: Vec<String> = used.iter().map(|(name, d)| format!("{name} {d:.1}")).collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let others = (busy - ours).max(0.0);
    notes.push(format!(
        "CPU seconds in the timed window ({secs:.1} s x {cores} cores): {}, processes outside this benchmark {others:.1}",
        cpu.join(", "),
    ));
    if others > 0.1 * secs * cores as f64 {
        notes.push(format!(
            "WARNING: other processes took {:.0}% of the machine during this run; the figure is disturbed",
            100.0 * others / (secs * cores as f64)
        ));
    }
    notes.append(&mut start_notes);

    let rss_mib = pid.and_then(|p| carve_e2e::bench::proc_status_mib(p, "VmHWM:"));
    let mut writes = write_tally(&client).await.unwrap_or_default();
    for (k, v) in before {
        if let Some(w) = writes.get_mut(&k) {
            *w = w.saturating_sub(v);
        }
    }
    writes.retain(|_, v| *v > 0);
    if pid.is_some() {
        notes.push(format!(
            "RSS when ready, before the Nodes: {} MiB; peak open fds during the run: {}",
            fmt_opt(idle_rss, 1),
            peak_fds.load(Ordering::Relaxed)
        ));
    }
    notes.push(
        check_allocations(&client, n, c.writes_nnc())
            .await
            .unwrap_or_else(|e| format!("allocation check could not run: {e:#}")),
    );
    if c == Contender::Carve {
        notes.push(carve_metrics(&cp).unwrap_or_else(|e| format!("carve metrics unavailable: {e:#}")));
    }
    if c == Contender::Raw {
        notes.push(format!("raw writer: {} Nodes failed after retries", raw_errors.load(Ordering::Relaxed)));
    }
    if let Some(pid) = pid
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        notes.push("the contender process had exited by the end".into());
    }
    drop(tasks);
    drop(cp);
    Ok(Figures { secs, create_secs, startup_secs, rss_mib, writes, notes })
}

async fn run_cell(c: Contender, n: usize, args: &Args, opts: &Options) -> Cell {
    let progress = Arc::new(AtomicUsize::new(0));
    let limit = Duration::from_secs(args.timeout);
    match tokio::time::timeout(limit, run(c, n, args, opts, progress.clone())).await {
        Ok(Ok(f)) => Cell::Done(f),
        Ok(Err(e)) => Cell::Failed(format!("{e:#}")),
        Err(_) => Cell::Timeout { done: progress.load(Ordering::Relaxed), limit },
    }
}

fn print_cell(c: Contender, n: usize, cell: &Cell) {
    let head = format!("  N={n:<5} {:<8}", c.key());
    match cell {
        Cell::Done(f) => {
            let rss = f.rss_mib.map(|m| format!(", peak RSS {m:.1} MiB")).unwrap_or_default();
            println!(
                "{head} {:>8.2} s to all done (Node creates returned after {:.2} s; contender start-up {:.1} s{rss})",
                f.secs, f.create_secs, f.startup_secs
            );
            let writes: u64 = f
                .writes
                .iter()
                .filter(|(k, _)| !k.starts_with("nodes POST") && !k.starts_with("events"))
                .map(|(_, v)| v)
                .sum();
            let tally: Vec<String> = f.writes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            println!(
                "{:16} API writes besides the Node creates: {writes} ({:.2} per Node) [{}]",
                "",
                writes as f64 / n as f64,
                tally.join(", ")
            );
            for note in &f.notes {
                println!("{:16} {note}", "");
            }
        }
        Cell::Timeout { done, limit } => println!("{head} timeout after {limit:?} ({done}/{n} Nodes done)"),
        Cell::Failed(e) => println!("{head} FAILED: {}", e.replace('\n', "\n                 ")),
        Cell::Skipped(why) => println!("{head} skipped: {why}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

fn print_table(sizes: &[usize], results: &BTreeMap<(usize, Contender), Cell>) {
    let get = |n: usize, c: Contender| results.get(&(n, c));
    let secs = |n: usize, c: Contender| get(n, c).and_then(Cell::secs);
    let cell = |n: usize, c: Contender| get(n, c).map(Cell::short).unwrap_or_else(|| "-".into());
    println!();
    println!("summary: seconds from the first Node create until every Node has its block");
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "nodes",
        "carve s",
        "KCM s",
        "KCM-qps s",
        "raw s",
        "carve/KCM",
        "c/KCM-qps",
        "carve/raw",
        "raw/carve",
        "RSS MiB"
    );
    for &n in sizes {
        let carve = secs(n, Contender::Carve);
        let rss = match get(n, Contender::Carve) {
            Some(Cell::Done(f)) => f.rss_mib,
            _ => None,
        };
        println!(
            "{n:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            cell(n, Contender::Carve),
            cell(n, Contender::Kcm),
            cell(n, Contender::KcmQps),
            cell(n, Contender::Raw),
            fmt_opt(ratio(carve, secs(n, Contender::Kcm)), 3),
            fmt_opt(ratio(carve, secs(n, Contender::KcmQps)), 3),
            fmt_opt(ratio(carve, secs(n, Contender::Raw)), 3),
            fmt_opt(ratio(secs(n, Contender::Raw), carve), 3),
            fmt_opt(rss, 1),
        );
    }
    println!();
    println!("targets (from the issue):");
    for &n in sizes {
        let carve = secs(n, Contender::Carve);
        let vs_kcm = ratio(carve, secs(n, Contender::Kcm));
        let of_raw = ratio(secs(n, Contender::Raw), carve);
        let rss = match get(n, Contender::Carve) {
            Some(Cell::Done(f)) => f.rss_mib,
            _ => None,
        };
        println!(
            "  N={n:<5} carve/KCM-default = {:>6} (target <= 0.5) {:<6}  carve is at {:>6} of the raw write rate (target >= 0.8) {:<6}",
            fmt_opt(vs_kcm, 3),
            verdict(vs_kcm.map(|r| r <= 0.5)),
            fmt_opt(of_raw, 3),
            verdict(of_raw.map(|r| r >= 0.8)),
        );
        if n >= 5000 {
            println!(
                "  N={n:<5} carve peak RSS = {:>6} MiB (target < 64 MiB at 5000 nodes) {}",
                fmt_opt(rss, 1),
                verdict(rss.map(|r| r < 64.0))
            );
        } else {
            println!(
                "  N={n:<5} carve peak RSS = {:>6} MiB (the < 64 MiB target is set at 5000 nodes)",
                fmt_opt(rss, 1)
            );
        }
    }
}

/// Rough duration of a run at `n`, from the same contender at a smaller N.
fn estimate(c: Contender, n: usize, results: &BTreeMap<(usize, Contender), Cell>) -> Option<Duration> {
    let (m, f) =
        results.iter().rev().filter(|((m, k), _)| *k == c && *m < n).find_map(|((m, _), cell)| match cell {
            Cell::Done(f) => Some((*m, f)),
            _ => None,
        })?;
    let scale = n as f64 / m as f64;
    Some(Duration::from_secs_f64((f.secs + f.startup_secs) * scale + 15.0))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sizes = parse_sizes(args.nodes.as_deref().unwrap_or(&args.sizes))?;
    let contenders = parse_contenders(&args.contenders)?;
    let begun = Instant::now();

    if let Err(e) = micro_benchmark() {
        println!("allocator micro-benchmark FAILED: {e:#}\n");
    }
    if args.micro_only {
        return Ok(());
    }

    let opts = Options { apiserver_args: args.apiserver_args.clone(), ..Default::default() };
    println!(
        "node CIDR allocation on the local control plane (Kubernetes v1.35.4, etcd v3.6.16), a fresh control plane per run"
    );
    println!(
        "  kube-apiserver extra flags, same for every run: {}",
        if opts.apiserver_args.is_empty() { "none".into() } else { opts.apiserver_args.join(" ") }
    );
    println!(
        "  clients use the admin certificate (system:masters: API Priority and Fairness exempt, so no server-side throttling)"
    );
    println!(
        "  Node creates: {} concurrent; done = Node .spec.podCIDR set (and, for carve and raw, its NodeNetworkConfig",
        args.concurrency
    );
    println!("  has status.blocks); completion observed with a watch on Nodes and NNCs (no polling interval)");
    println!("  time = first Node create until the last Node is seen done; per-run limit {} s", args.timeout);
    println!(
        "  machine: {} cores, load average at start {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for c in &contenders {
        println!("  {:<8} {}", c.key(), c.describe(args.concurrency));
    }
    println!();

    let mut results: BTreeMap<(usize, Contender), Cell> = BTreeMap::new();
    for &n in &sizes {
        for &c in &contenders {
            let left = Duration::from_secs(args.budget).saturating_sub(begun.elapsed());
            let cell = match estimate(c, n, &results) {
                Some(est) if est > left => Cell::Skipped(format!(
                    "estimated {:.0} s from the smaller run, only {:.0} s of the {} s budget left (raise --budget to run it)",
                    est.as_secs_f64(),
                    left.as_secs_f64(),
                    args.budget
                )),
                _ if left.is_zero() => Cell::Skipped(format!("the {} s budget is spent", args.budget)),
                _ => run_cell(c, n, &args, &opts).await,
            };
            print_cell(c, n, &cell);
            results.insert((n, c), cell);
        }
    }
    print_table(&sizes, &results);
    println!("\ntotal wall time {:.0} s", begun.elapsed().as_secs_f64());
    Ok(())
}
