//! carvectl: plan a pool before creating it, see how full the pools are, and
//! check that NodeNetworkConfigs, Nodes and pools agree.
//!
//! Exit status, as grep and diff do it: 0 fits / no problems, 1 does not fit /
//! problems found, 2 bad input or the cluster could not be read. The numbers
//! and findings come from the library (`plan`, `check`); this file reads the
//! API and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use carve_controller::check::{self, Finding, NncInfo, NodeInfo, PoolInfo};
use carve_controller::connectivity;
use carve_controller::plan::{self, DEFAULT_SURGE, FamilyPlan, MAX_PODS_PER_NODE, Plan, PlanInput};
use carve_controller::views::{self, PartialNode};
use carve_crds::net::{IpFamily, parse_cidr};
use carve_crds::{LEAKED_ADDRESS_FREED, NO_POD_ADDRESSES_TAINT, NodeNetworkConfig, PodCidr, PoolMode};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

/// Plan, inspect and check carve's pod address pools.
#[derive(Parser, Debug)]
#[command(name = "carvectl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Capacity planning without a cluster: does a pool hold N nodes? Exit 0 when it fits, 1 when it
    /// does not, 2 on bad input.
    Plan(PlanArgs),
    /// Usage of every pool per family, and each node's blocks, from a live cluster.
    Status(ClusterArgs),
    /// Read-only consistency report from a live cluster: duplicate or overlapping blocks, NodeNetworkConfigs
    /// without a Node, blocks outside every pool, Node podCIDRs that disagree with their blocks. Exit 1 when
    /// something is wrong.
    Check(ClusterArgs),
    /// Probe pods on every node check pod -> pod (same node and across nodes), pod -> node, pod ->
    /// ClusterIP Service and optionally egress; a table, exit 1 when a path fails. Cleans up after
    /// itself, also on Ctrl-C.
    Connectivity(ConnectivityArgs),
}

#[derive(Args, Debug)]
struct ConnectivityArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Image of the probe pods: busybox's sh, nc and timeout.
    #[arg(long, default_value = "busybox:1.36")]
    image: String,
    /// Probe only the Nodes with these labels (a label selector); default every Node.
    #[arg(long, default_value = "")]
    node_selector: String,
    /// Also check a TCP connect from every probe to this address (IP:PORT) outside the cluster.
    #[arg(long)]
    egress: Option<std::net::SocketAddr>,
    /// How long the probe pods may take to start, and to finish.
    #[arg(long, default_value = "120s", value_parser = carve_cli::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    #[value(name = "Overlay")]
    Overlay,
    #[value(name = "VNet")]
    VNet,
}

impl From<Mode> for PoolMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Overlay => PoolMode::Overlay,
            Mode::VNet => PoolMode::VNet,
        }
    }
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Networking model: Overlay (one block per node from a private range) or VNet (flat, routable).
    #[arg(long, value_enum, ignore_case = true)]
    mode: Mode,
    /// A CIDR of the pool, IPv4 or IPv6; repeat for more (one of each family = dual-stack).
    #[arg(long = "cidr", value_name = "CIDR", required = true, value_parser = cidr_arg)]
    cidrs: Vec<IpNet>,
    /// IPv4 block prefix, e.g. 24 or /24 [default: Overlay 24, VNet 28].
    #[arg(long, value_name = "PREFIX", value_parser = prefix_arg)]
    block_size: Option<u8>,
    /// IPv6 block prefix [default: Overlay 80, VNet 124].
    #[arg(long, value_name = "PREFIX", value_parser = prefix_arg)]
    block_size_v6: Option<u8>,
    /// Nodes the cluster should run.
    #[arg(long, value_name = "N", value_parser = nodes_arg)]
    nodes: u64,
    /// Extra nodes during an upgrade (AKS's default max surge is one node).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SURGE)]
    surge: u64,
    /// Pods per node, at most 250 (AKS's limit) [default: Overlay 250, VNet 30 (Azure CNI's default)].
    #[arg(long, value_name = "N", value_parser = max_pods_arg)]
    max_pods: Option<u32>,
    /// The cluster's Service CIDR, to warn about overlaps [default: none, nothing checked].
    #[arg(long, value_name = "CIDR", value_parser = cidr_arg)]
    service_cidr: Option<IpNet>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// kubeconfig to use [default: $KUBECONFIG, ~/.kube/config, then in-cluster].
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

fn cidr_arg(s: &str) -> Result<IpNet, String> {
    parse_cidr(s).map_err(|e| e.to_string())
}

fn nodes_arg(s: &str) -> Result<u64, String> {
    match s.parse() {
        Ok(0) => Err("a cluster needs at least one node; use 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a node count; use a whole number such as 50")),
    }
}

fn max_pods_arg(s: &str) -> Result<u32, String> {
    match s.parse() {
        Ok(n @ 1..=MAX_PODS_PER_NODE) => Ok(n),
        Ok(n) => Err(format!("{n} pods per node is outside 1 to {MAX_PODS_PER_NODE} (AKS's limit); use 1 to 250")),
        Err(_) => Err(format!("{s:?} is not a pod count; use a whole number from 1 to 250")),
    }
}

fn prefix_arg(s: &str) -> Result<u8, String> {
    s.trim_start_matches('/').parse().map_err(|_| format!("{s:?} is not a prefix length; write it as 26 or /26"))
}

/// Joins rows into columns two spaces apart, as kubectl prints tables.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.iter().map(Vec::len).max().unwrap_or(0))
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

// ---- plan ----------------------------------------------------------------

fn prefix(p: Option<u8>) -> String {
    p.map_or_else(|| "none (more than one CIDR needed)".to_string(), |p| format!("/{p}"))
}

fn render_family(plan: &Plan, f: &FamilyPlan) -> String {
    let cidrs: Vec<String> = f.cidrs.iter().map(ToString::to_string).collect();
    let mut rows = Vec::new();
    if let Some(a) = &f.azure_flat {
        rows.push(vec![
            "Azure flat".into(),
            format!(
                "({} + {}) × ({} + 1) = {} addresses + {} reserved per subnet; the CIDRs hold {} after reserved; smallest {}",
                plan.nodes,
                plan.surge,
                plan.max_pods,
                a.addresses_needed,
                a.reserved_per_subnet,
                a.addresses_available,
                prefix(a.smallest_prefix)
            ),
        ]);
    }
    let per_node = match plan.mode {
        PoolMode::Overlay => {
            let cap = if f.pods_per_node < f.pod_addresses_per_block { " (AKS's most per node)" } else { "" };
            format!(
                "1 block of /{}: {} pod addresses, room for {} pods{cap}",
                f.block_size, f.pod_addresses_per_block, f.pods_per_node
            )
        }
        PoolMode::VNet => format!(
            "{} block{} of /{} ({} pod addresses each) for {} pods",
            f.blocks_per_node,
            if f.blocks_per_node == 1 { "" } else { "s" },
            f.block_size,
            f.pod_addresses_per_block,
            plan.max_pods
        ),
    };
    rows.push(vec!["per node".into(), per_node]);
    let skipped = if plan.mode == PoolMode::VNet { " (blocks holding Azure's reserved addresses skipped)" } else { "" };
    rows.push(vec![
        "blocks".into(),
        format!("{} needed, {} in the CIDRs{skipped}", f.blocks_needed, f.blocks_available),
    ]);
    rows.push(vec![
        "holds".into(),
        format!("{} nodes + {} surge, {} pods", f.capacity.nodes, plan.surge, f.capacity.pods),
    ]);
    rows.push(vec!["smallest CIDR".into(), prefix(f.smallest_prefix)]);
    let fits = if f.fits { "yes".to_string() } else { format!("no: {}", f.shortfalls.join("; ")) };
    rows.push(vec!["fits".into(), fits]);
    let body: String = columns(&rows).lines().map(|l| format!("  {l}\n")).collect();
    format!("{}  {}, /{} blocks\n{body}", f.family, cidrs.join(", "), f.block_size)
}

fn render_plan(plan: &Plan) -> String {
    let mut out = format!(
        "{:?} pool for {} nodes + {} surge, {} pods per node\n\n",
        plan.mode, plan.nodes, plan.surge, plan.max_pods
    );
    for f in &plan.families {
        out.push_str(&render_family(plan, f));
        out.push('\n');
    }
    for w in &plan.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if plan.fits {
        out.push_str(&format!(
            "FITS: room for {} nodes + {} surge, {} pods\n",
            plan.capacity.nodes, plan.surge, plan.capacity.pods
        ));
    } else {
        out.push_str("DOES NOT FIT\n");
        for f in plan.families.iter().filter(|f| !f.fits) {
            out.push_str(&format!("  {}: {}\n", f.family, f.shortfalls.join("; ")));
        }
    }
    out
}

fn run_plan(args: &PlanArgs) -> Result<ExitCode> {
    let mode = PoolMode::from(args.mode);
    let input = PlanInput {
        mode,
        cidrs: args.cidrs.clone(),
        block_v4: args.block_size,
        block_v6: args.block_size_v6,
        nodes: args.nodes,
        surge: args.surge,
        max_pods: args.max_pods.unwrap_or_else(|| plan::default_max_pods(mode)),
        service_cidr: args.service_cidr,
    };
    let plan = match plan::plan(&input) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match args.output {
        Output::Json => print_json(&plan)?,
        Output::Table => print!("{}", render_plan(&plan)),
    }
    Ok(if plan.fits { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

// ---- cluster access ------------------------------------------------------

async fn client(args: &ClusterArgs) -> Result<Client> {
    let mut config = carve_cli::kube_config(args.kubeconfig.as_deref()).await?;
    // A CLI should say the cluster is unreachable, not hang.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(config)?)
}

/// Everything status and check read: one LIST each.
struct Snapshot {
    pools: Vec<PodCidr>,
    nncs: Vec<NodeNetworkConfig>,
    nodes: Vec<PartialNode>,
}

async fn list_all<K>(client: &Client, name: &str) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = kube::core::ClusterResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match Api::<K>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            bail!("the API server does not serve {name}: carve's CRDs are not installed; run `kubectl apply -f crds/`")
        }
        Err(e) => Err(e).with_context(|| format!("listing {name}")),
    }
}

/// carve-agent's `LeakedAddressFreed` Events (one per address), counted per
/// Node; empty when Events cannot be read (they expire after an hour by default).
async fn leaks_freed(client: &Client) -> BTreeMap<String, u64> {
    let by_reason = ListParams::default().fields(&format!("reason={LEAKED_ADDRESS_FREED}"));
    let Ok(events) = Api::<CoreEvent>::all(client.clone()).list(&by_reason).await else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    for e in events.items.iter().filter(|e| e.involved_object.kind.as_deref() == Some("Node")) {
        let Some(node) = e.involved_object.name.clone() else { continue };
        let times = e.series.as_ref().and_then(|s| s.count).or(e.count).unwrap_or(1).max(1);
        *out.entry(node).or_insert(0) += times as u64;
    }
    out
}

async fn snapshot(client: &Client) -> Result<Snapshot> {
    let (pools, nncs, nodes) = tokio::try_join!(
        list_all::<PodCidr>(client, "podcidrs.carve.dev"),
        list_all::<NodeNetworkConfig>(client, "nodenetworkconfigs.carve.dev"),
        list_all::<PartialNode>(client, "nodes"),
    )?;
    Ok(Snapshot { pools, nncs, nodes })
}

// ---- status --------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PoolStatus {
    name: String,
    mode: PoolMode,
    disabled: bool,
    /// Ready, Exhausted or Invalid, from the pool's conditions; Unknown before the controller wrote any.
    state: String,
    families: Vec<FamilyStatus>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyStatus {
    family: IpFamily,
    cidrs: Vec<String>,
    block_size: i32,
    capacity: i64,
    allocated: i64,
    free: i64,
    /// allocated / capacity × 100, one decimal.
    used_percent: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    node: String,
    pool: Option<String>,
    blocks: Vec<String>,
    #[serde(rename = "nodeIP")]
    node_ip: Option<String>,
    /// The NNC's Ready condition: True, False or Unknown; None without an NNC.
    ready: Option<String>,
    reason: Option<String>,
    /// carve-agent tainted the Node: no pod address free and none to be had.
    no_pod_addresses: bool,
    /// Leaked pod addresses carve-agent freed on the node (from its Events).
    leaks_freed: u64,
}

#[derive(Serialize)]
struct Status {
    pools: Vec<PoolStatus>,
    nodes: Vec<NodeStatus>,
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

fn pool_state(pool: &PodCidr) -> String {
    let conditions = pool.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let state = if is_true(conditions, "Invalid") {
        "Invalid"
    } else if is_true(conditions, "Exhausted") {
        "Exhausted"
    } else if is_true(conditions, "Ready") {
        "Ready"
    } else {
        "Unknown"
    };
    if pool.spec.disabled { format!("{state},Disabled") } else { state.to_string() }
}

/// `leaks_freed`: per Node, from [`leaks_freed`].
fn status_of(snap: &Snapshot, leaks: &BTreeMap<String, u64>) -> Status {
    let pools = snap
        .pools
        .iter()
        .map(|p| {
            let families = p.status.iter().flat_map(|s| &s.families).map(|u| FamilyStatus {
                family: u.family,
                cidrs: p
                    .spec
                    .cidrs
                    .iter()
                    .map(|c| c.as_str().to_string())
                    .filter(|c| c.parse::<IpNet>().is_ok_and(|n| IpFamily::of(&n) == u.family))
                    .collect(),
                block_size: u.block_size,
                capacity: u.capacity,
                allocated: u.allocated,
                free: u.free,
                used_percent: if u.capacity > 0 {
                    (u.allocated as f64 * 1000.0 / u.capacity as f64).round() / 10.0
                } else {
                    0.0
                },
            });
            PoolStatus {
                name: p.name_any(),
                mode: p.spec.mode,
                disabled: p.spec.disabled,
                state: pool_state(p),
                families: families.collect(),
            }
        })
        .collect();

    let mut names: Vec<String> =
        snap.nodes.iter().map(ResourceExt::name_any).chain(snap.nncs.iter().map(ResourceExt::name_any)).collect();
    names.sort();
    names.dedup();
    let nodes = names
        .into_iter()
        .map(|name| {
            let nnc = snap.nncs.iter().find(|n| n.name_any() == name);
            let status = nnc.and_then(|n| n.status.as_ref());
            let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            let node = snap.nodes.iter().find(|n| n.name_any() == name);
            let node_ip = status.and_then(|s| s.node_ip.clone()).or_else(|| node.and_then(views::internal_ip));
            let no_pod_addresses = node
                .and_then(|n| n.spec.as_ref()?.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == NO_POD_ADDRESSES_TAINT));
            NodeStatus {
                pool: status.and_then(|s| s.pool.clone()),
                blocks: status.map(|s| s.blocks.iter().map(|b| b.cidr.clone()).collect()).unwrap_or_default(),
                node_ip,
                ready: nnc.map(|_| ready.map_or_else(|| "Unknown".to_string(), |c| c.status.clone())),
                reason: ready.filter(|c| c.status != "True").map(|c| c.reason.clone()),
                no_pod_addresses,
                leaks_freed: leaks.get(&name).copied().unwrap_or(0),
                node: name,
            }
        })
        .collect();
    Status { pools, nodes }
}

/// `[####................]`: at least one mark when anything is used, so a big pool never looks empty.
fn bar(allocated: i64, capacity: i64) -> String {
    const WIDTH: i64 = 20;
    let filled = if capacity <= 0 {
        0
    } else {
        ((allocated as f64 / capacity as f64 * WIDTH as f64).round() as i64).clamp(i64::from(allocated > 0), WIDTH)
    };
    format!("[{}{}]", "#".repeat(filled as usize), ".".repeat((WIDTH - filled) as usize))
}

fn render_status(status: &Status) -> String {
    let mut rows =
        vec![["POOL", "MODE", "FAMILY", "CIDRS", "USAGE", "BLOCKS", "USED", "STATE"].map(String::from).to_vec()];
    for p in &status.pools {
        if p.families.is_empty() {
            rows.push(vec![
                p.name.clone(),
                format!("{:?}", p.mode),
                "-".into(),
                "-".into(),
                "(no usage yet: is carve-controller running?)".into(),
                String::new(),
                String::new(),
                p.state.clone(),
            ]);
        }
        for f in &p.families {
            rows.push(vec![
                p.name.clone(),
                format!("{:?}", p.mode),
                f.family.to_string(),
                f.cidrs.join(","),
                bar(f.allocated, f.capacity),
                format!("{}/{} blocks", f.allocated, f.capacity),
                format!("{:.1}%", f.used_percent),
                p.state.clone(),
            ]);
        }
    }
    let mut out = if status.pools.is_empty() { "No PodCIDR pools.\n".to_string() } else { columns(&rows) };
    out.push('\n');
    let mut rows =
        vec![["NODE", "POOL", "BLOCKS", "NODE IP", "READY", "POD ADDRESSES", "LEAKS FREED"].map(String::from).to_vec()];
    for n in &status.nodes {
        let dash = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".into());
        let ready = match (&n.ready, &n.reason) {
            (None, _) => "no NodeNetworkConfig".to_string(),
            (Some(r), Some(reason)) if !reason.is_empty() => format!("{r} ({reason})"),
            (Some(r), _) => r.clone(),
        };
        let blocks = if n.blocks.is_empty() { "-".to_string() } else { n.blocks.join(",") };
        let addresses = if n.no_pod_addresses { "none free (tainted)" } else { "available" };
        rows.push(vec![
            n.node.clone(),
            dash(n.pool.as_ref()),
            blocks,
            dash(n.node_ip.as_ref()),
            ready,
            addresses.to_string(),
            n.leaks_freed.to_string(),
        ]);
    }
    out.push_str(&if status.nodes.is_empty() { "No Nodes.\n".to_string() } else { columns(&rows) });
    out
}

async fn run_status(args: &ClusterArgs) -> Result<ExitCode> {
    let client = client(args).await?;
    let (snap, leaks) = tokio::join!(snapshot(&client), leaks_freed(&client));
    let snap = snap?;
    let status = status_of(&snap, &leaks);
    match args.output {
        Output::Json => print_json(&status)?,
        Output::Table => print!("{}", render_status(&status)),
    }
    Ok(ExitCode::SUCCESS)
}

// ---- check ---------------------------------------------------------------

#[derive(Serialize)]
struct Reported<'a> {
    #[serde(flatten)]
    finding: &'a Finding,
    message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CheckReport<'a> {
    ok: bool,
    pools: usize,
    node_network_configs: usize,
    nodes: usize,
    findings: Vec<Reported<'a>>,
}

async fn run_connectivity(args: &ConnectivityArgs) -> Result<ExitCode> {
    let client = client(&args.cluster).await?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let namespace = format!("carve-connectivity-{:x}", stamp % 0xff_ffff_ffff);
    let opts = connectivity::Options {
        image: args.image.clone(),
        node_selector: args.node_selector.clone(),
        egress: args.egress,
        timeout: args.timeout,
    };
    eprintln!("probing in namespace {namespace} (deleted at the end)");
    let outcome = tokio::select! {
        r = connectivity::run(&client, &namespace, &opts) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let cleaned = connectivity::clean_up(&client, &namespace).await;
    let report = outcome?;
    cleaned?;
    match args.cluster.output {
        Output::Json => print_json(&report)?,
        Output::Table => print!("{}", report.table()),
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run_check(args: &ClusterArgs) -> Result<ExitCode> {
    let snap = snapshot(&client(args).await?).await?;
    let pools: Vec<PoolInfo> = snap
        .pools
        .iter()
        .map(|p| PoolInfo { name: p.name_any(), cidrs: p.spec.cidrs.iter().map(|c| c.as_str().to_string()).collect() })
        .collect();
    let nncs: Vec<NncInfo> = snap
        .nncs
        .iter()
        .map(|n| NncInfo {
            name: n.name_any(),
            // Quarantined blocks are still held: a duplicate of one matters too.
            blocks: views::recorded_blocks(n).into_iter().map(|(c, _, _)| c).collect(),
            reserved: n.status.as_ref().map(|s| s.reserved_ips.clone()).unwrap_or_default(),
        })
        .collect();
    let nodes: Vec<NodeInfo> = snap.nodes.iter().map(views::node_info).collect();
    let findings = check::findings(&pools, &nncs, &nodes);
    let checked = format!("{} PodCIDRs, {} NodeNetworkConfigs, {} Nodes", pools.len(), nncs.len(), nodes.len());
    match args.output {
        Output::Json => print_json(&CheckReport {
            ok: findings.is_empty(),
            pools: pools.len(),
            node_network_configs: nncs.len(),
            nodes: nodes.len(),
            findings: findings.iter().map(|f| Reported { finding: f, message: f.to_string() }).collect(),
        })?,
        Output::Table if findings.is_empty() => println!("no problems found in {checked}"),
        Output::Table => {
            for f in &findings {
                println!("{f}");
            }
            println!("\n{} problem(s) found in {checked}", findings.len());
        }
    }
    Ok(if findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Plan(args) => run_plan(args),
        Command::Status(args) => run_status(args).await,
        Command::Check(args) => run_check(args).await,
        Command::Connectivity(args) => run_connectivity(args).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
