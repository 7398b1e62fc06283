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
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::bench::{metrics, process};
use crate::{ControlPlane, Options};
use anyhow::{Context, Result, anyhow, bail};
use carve_controller::allocator::{PoolBlocks, PoolLayout};
use carve_crds::net::IpFamily;
use carve_crds::{NodeBlock, NodeNetworkConfig, NodeNetworkConfigSpec, NodeNetworkConfigStatus, PodCidr, PoolMode};
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

mod contender;
mod micro;
mod raw;
mod report;
mod workload;

use contender::*;
use micro::*;
use raw::*;
use report::*;
use workload::*;

pub(super) const NODE_PREFIX: &str = "bench-node-";
pub(super) const LABEL_KEY: &str = "carve.dev/bench";
pub(super) const LABEL_VALUE: &str = "nodes";
pub(super) const POOL: &str = "bench";
pub(super) const CLUSTER_CIDR: &str = "10.0.0.0/8";
pub(super) const BLOCK_PREFIX: u8 = 24;
pub(super) const RAW_MANAGER: &str = "carve-bench-raw";
pub(super) const MICRO_RUNS: usize = 5;
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Time from creating N Nodes until every one has its pod CIDR block.
#[derive(clap::Parser, Debug)]
#[command(name = "carve-bench-nodes")]
pub struct Args {
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
    #[arg(long, default_value_t = 3600)]
    budget: u64,
    /// Runs of carve and raw per N, interleaved; the summary shows medians. KCM runs once
    /// (its gap to carve is far outside the run-to-run noise).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
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
                "raw write limit: plain kube-rs client, carve's 3 writes per Node (create NNC, apply NNC status, \
                 apply Node podCIDR), precomputed blocks, {concurrency} Nodes in flight (buffer_unordered), \
                 carve-controller reconciles 16 Nodes at once by default (--concurrency)"
            ),
        }
    }

    fn is_kcm(self) -> bool {
        matches!(self, Contender::Kcm | Contender::KcmQps)
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
    /// kube-apiserver's CPU seconds in the timed window.
    apiserver_cpu: Option<f64>,
    /// carve-controller's reconciles (from its /metrics).
    reconciles: Option<f64>,
    notes: Vec<String>,
}

impl Figures {
    /// NNC status writes the API server served.
    fn status_writes(&self) -> u64 {
        self.writes.iter().filter(|(k, _)| k.starts_with("nnc/status ")).map(|(_, v)| v).sum()
    }
}

#[derive(Debug, Clone)]
enum Cell {
    Done(Figures),
    Timeout { done: usize, limit: Duration },
    Failed(String),
    Skipped(String),
}

impl Cell {
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
    let idle_rss = pid.and_then(|p| crate::bench::proc_status_mib(p, "VmRSS:"));
    let peak_fds = Arc::new(AtomicUsize::new(0));
    if let Some(pid) = pid {
        tasks.spawn(sample_fds(pid, peak_fds.clone()));
    }

    let (ready_tx, ready_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    tasks.spawn(watch_done(client.clone(), n, c.writes_nnc(), progress, ready_tx, done_tx));
    tokio::time::timeout(READY_TIMEOUT, ready_rx).await.context("the completion watch did not start")??;

    let before = metrics::write_tally(&client).await.unwrap_or_default();
    let cpu_before = process::cpu_snapshot();
    let busy_before = process::machine_busy_secs();
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
    let busy = process::machine_busy_secs() - busy_before;
    let used: Vec<(String, f64)> = process::cpu_snapshot()
        .into_iter()
        .map(|(name, secs)| {
            let d = secs - cpu_before.get(&name).copied().unwrap_or_default();
            (name, d)
        })
        .collect();
    let ours: f64 = used.iter().map(|(_, d)| d).sum();
    let apiserver_cpu = used.iter().find(|(name, _)| name == "kube-apiserver").map(|(_, d)| *d);
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

    let rss_mib = pid.and_then(|p| crate::bench::proc_status_mib(p, "VmHWM:"));
    let mut writes = metrics::write_tally(&client).await.unwrap_or_default();
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
    let mut reconciles = None;
    if c == Contender::Carve {
        match carve_metrics(&cp).await {
            Ok((count, note)) => {
                reconciles = Some(count);
                notes.push(note);
            }
            Err(e) => notes.push(format!("carve metrics unavailable: {e:#}")),
        }
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
    Ok(Figures { secs, create_secs, startup_secs, rss_mib, writes, apiserver_cpu, reconciles, notes })
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

/// The whole benchmark, as `carve-bench-nodes` runs it.
pub async fn main(args: Args) -> Result<()> {
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

    let mut results: BTreeMap<(usize, Contender), Vec<Cell>> = BTreeMap::new();
    let repeat = args.repeat.max(1);
    for &n in &sizes {
        for round in 1..=repeat {
            for &c in contenders.iter().filter(|c| round == 1 || !c.is_kcm()) {
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
                let runs = if c.is_kcm() { 1 } else { repeat };
                print_cell(c, n, &format!("run {round}/{runs}"), &cell);
                results.entry((n, c)).or_default().push(cell);
            }
        }
    }
    print_table(&sizes, &results);
    println!("\ntotal wall time {:.0} s", begun.elapsed().as_secs_f64());
    Ok(())
}
