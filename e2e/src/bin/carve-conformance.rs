//! `carve-conformance` (`make conformance`): Kubernetes' sig-network
//! conformance suites on carve. Starts a cluster of real nodes importing
//! carve's images (`--images`, what `make image` writes) and the suites'
//! images, deploys carve with `examples/overlay.yaml`, CoreDNS and the
//! control plane's routes to the pods, runs e2e-network.test under ginkgo,
//! then prints a table (result, seconds, test) and
//! `conformance: <n> passed, <n> failed, <n> skipped`. Exits 1 on a failure.
//!
//! `--policy npm` (`make conformance POLICY=npm`) installs a NetworkPolicy
//! engine and adds the upstream NetworkPolicy suite to the default focus.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use carve_e2e::cluster::{Cluster, ClusterOptions};
use carve_e2e::conformance::{self, CONFORMANCE_FOCUS, NETPOL_FOCUS, Run, State};
use carve_e2e::controlplane::conformance_bins;
use carve_e2e::image;
use carve_e2e::policy::PolicyEngine;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Kubernetes' sig-network conformance suites on carve, on local real nodes")]
struct Cli {
    /// Real nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Parallel ginkgo processes.
    #[arg(long, default_value_t = 3)]
    procs: usize,
    /// Ginkgo focus regex; the default is every sig-network conformance test.
    #[arg(long, default_value = CONFORMANCE_FOCUS)]
    focus: Vec<String>,
    /// carve's images (`make image`).
    #[arg(long, default_value = "target/images")]
    images: PathBuf,
    /// The suites' images, the JSON report and the tests' output.
    #[arg(long, default_value = "target/conformance")]
    out_dir: PathBuf,
    /// The pool carve runs.
    #[arg(long, default_value = "examples/overlay.yaml")]
    pool: PathBuf,
    /// A NetworkPolicy engine beside carve (`npm`); the NetworkPolicy suite runs too.
    #[arg(long)]
    policy: Option<PolicyEngine>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut cli = Cli::parse();
    if cli.policy.is_some() && cli.focus == [CONFORMANCE_FOCUS] {
        cli.focus.push(NETPOL_FOCUS.into());
    }
    let started = Instant::now();
    let bins = conformance_bins()?;
    let out_dir = std::path::absolute(&cli.out_dir)?;
    let mut images = image::archives_in(&cli.images)?;
    images.extend(image::build_conformance(&out_dir.join("images"), &bins)?.into_iter().map(|b| b.archive));
    let pool = std::fs::read_to_string(&cli.pool).with_context(|| format!("reading {}", cli.pool.display()))?;

    let cluster =
        Cluster::start(ClusterOptions { nodes: cli.nodes, images, policy: cli.policy, ..Default::default() }).await?;
    cluster.deploy_carve(&pool).await?;
    conformance::prepare(&cluster).await?;
    eprintln!("conformance: cluster ready after {:.0?}; running the suites", started.elapsed());

    let run = Run {
        focus: cli.focus,
        procs: cli.procs,
        out_dir: out_dir.join("run"),
        timeout: Duration::from_secs(3600),
        policy: cli.policy.is_some(),
    };
    let report = conformance::run(&cluster, &bins, &run)?;
    println!("\n{}", report.table());
    println!("{}", report.summary());
    eprintln!("conformance: {:.0?} in all", started.elapsed());
    drop(cluster);
    if report.count(State::Failed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}
