//! Figures for the node plugins. No assertions: it prints figures next to the targets.
//!
//! ```text
//!   1. CNI ADD and DEL, carve-cni + carve-ipam vs the reference bridge + host-local
//!      one "node" netns, one "pod" netns reused; every plugin run directly (CNI_* env vars,
//!      config on stdin, no cnitool) from a thread that entered the node netns; per iteration
//!      a fresh container id, ADD then DEL, each timed and the pair; contenders interleaved;
//!      both data dirs in the same temp dir (one filesystem)
//!   2. execve and fsync per ADD and per DEL (strace -f, a few calls each)
//!   3. 200 concurrent IPAM ADDs (then DELs) on one store: carve-ipam vs host-local, wall time
//!   4. the plugin binaries' sizes
//!   5. carve-agent peak RSS (VmHWM) once it has programmed a node with N Overlay peers
//!      (local control plane, NodeNetworkConfigs written by the bench, agent with --netns)
//! ```
//!
//! Ends with `cni round trip: carve <median> ms, bridge+host-local <median> ms, ratio <r>`.
//! `carve-bench-cni [--iterations 200] [--peers 50] [--reference-dir /usr/lib/cni]`.
//! Needs root and `cargo build --release -p carve-node-plugin` first (`make bench-cni` does it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use carve_crds::{NodeNetworkConfig, NodeNetworkConfigSpec};
use carve_e2e::ControlPlane;
use carve_e2e::bench::{ms, percentile, proc_status_mib};
use carve_e2e::netns::{Netns, NetnsExt};
use carve_e2e::testkit::{node, node_agent};
use clap::Parser;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "carve-bench-cni")]
struct Args {
    /// ADD + DEL round trips per contender.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Peers of the node whose agent's RSS is measured.
    #[arg(long, default_value_t = 50)]
    peers: usize,
    /// Where the reference bridge and host-local plugins are (Debian's containernetworking-plugins).
    #[arg(long, default_value = "/usr/lib/cni")]
    reference_dir: PathBuf,
    /// Where carve-cni, carve-ipam and carve-agent are (default: this binary's directory).
    #[arg(long)]
    carve_dir: Option<PathBuf>,
    /// Skip the agent RSS figure (no control plane).
    #[arg(long)]
    skip_agent: bool,
}

struct Contender {
    label: String,
    plugin: PathBuf,
    cni_path: PathBuf,
    conf: Value,
    add: Vec<Duration>,
    del: Vec<Duration>,
    both: Vec<Duration>,
}

/// Runs one plugin invocation; fails with its output when it fails.
fn invoke(c: &Contender, command: &str, container: &str, netns: &Path) -> Result<()> {
    invoke_with(c, &c.plugin, None, command, container, netns)
}

/// [`invoke`] of `plugin` (the contender's, or its IPAM alone), under `wrapper` (e.g. strace) if given.
fn invoke_with(
    c: &Contender,
    plugin: &Path,
    wrapper: Option<&[&str]>,
    command: &str,
    container: &str,
    netns: &Path,
) -> Result<()> {
    let mut cmd = match wrapper {
        Some(w) => {
            let mut cmd = Command::new(w[0]);
            cmd.args(&w[1..]).arg(plugin);
            cmd
        }
        None => Command::new(plugin),
    };
    let mut child = cmd
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns)
        .env("CNI_PATH", &c.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", c.plugin.display()))?;
    // A delegated IPAM plugin gets the same network config on stdin.
    child.stdin.take().context("stdin")?.write_all(c.conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {command} failed ({}): {}{}",
            c.label,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The IPAM plugin of a contender.
fn ipam_plugin(c: &Contender) -> PathBuf {
    c.cni_path.join(c.conf["ipam"]["type"].as_str().unwrap_or_default())
}

fn row(label: &str, times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let (median, p99) = (ms(percentile(times, 0.5)), ms(percentile(times, 0.99)));
    println!("  {label:<58} {median:>10.2} {p99:>10.2}");
    (median, p99)
}

/// execve and fsync-family calls per invocation of `command`, from `strace -f` over `n` calls.
fn syscall_counts(c: &Contender, command_pairs: usize, pod: &Path, tmp: &Path) -> Result<[(f64, f64); 2]> {
    let mut out = [(0.0, 0.0); 2];
    for (slot, command) in ["ADD", "DEL"].iter().enumerate() {
        let mut execs = 0;
        let mut syncs = 0;
        for i in 0..command_pairs {
            let id = format!("strace-{i}");
            let log = tmp.join(format!("strace-{command}-{i}.txt"));
            let log_arg = log.display().to_string();
            let wrapper = ["strace", "-f", "-qq", "-e", "trace=execve,fsync,fdatasync,syncfs", "-o", &log_arg];
            let (trace_add, trace_del) =
                if *command == "ADD" { (Some(&wrapper[..]), None) } else { (None, Some(&wrapper[..])) };
            invoke_with(c, &c.plugin, trace_add, "ADD", &id, pod)?;
            invoke_with(c, &c.plugin, trace_del, "DEL", &id, pod)?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            execs += text.lines().filter(|l| l.contains("execve(") && !l.contains("strace")).count();
            syncs += text
                .lines()
                .filter(|l| l.contains("sync(") || l.contains("fsync(") || l.contains("fdatasync("))
                .count();
        }
        out[slot] = (execs as f64 / command_pairs as f64, syncs as f64 / command_pairs as f64);
    }
    Ok(out)
}

/// Wall time for `n` concurrent IPAM ADDs on one store, then as many DELs.
fn concurrent_ipam(c: &Contender, n: usize, pod: &Path) -> Result<(Duration, Duration)> {
    let plugin = ipam_plugin(c);
    let mut times = [Duration::ZERO; 2];
    for (slot, command) in ["ADD", "DEL"].iter().enumerate() {
        let start = Instant::now();
        let children: Vec<std::thread::JoinHandle<Result<()>>> = (0..n)
            .map(|i| {
                let (c, plugin, pod, command) =
                    (c.clone_light(), plugin.clone(), pod.to_path_buf(), command.to_string());
                std::thread::spawn(move || invoke_with(&c, &plugin, None, &command, &format!("many-{i}"), &pod))
            })
            .collect();
        for child in children {
            child.join().map_err(|_| anyhow::anyhow!("IPAM thread panicked"))??;
        }
        times[slot] = start.elapsed();
    }
    Ok((times[0], times[1]))
}

impl Contender {
    /// The contender without its figures (for the concurrent runs' threads).
    fn clone_light(&self) -> Contender {
        Contender {
            label: self.label.clone(),
            plugin: self.plugin.clone(),
            cni_path: self.cni_path.clone(),
            conf: self.conf.clone(),
            add: Vec::new(),
            del: Vec::new(),
            both: Vec::new(),
        }
    }
}

/// Runs the CNI figures; returns the summary line printed last.
fn cni_round_trips(args: &Args, carve_dir: &Path, tmp: &Path) -> Result<String> {
    let prefix = format!("bench-{}", std::process::id());
    let node_ns = Netns::new(&format!("{prefix}-node"))?;
    let pod_ns = Netns::new(&format!("{prefix}-pod"))?;
    node_ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
    node_ns.ip(&["link", "set", "eth0p", "up"])?;
    node_ns.ip(&["addr", "add", "192.168.88.10/24", "dev", "eth0"])?;
    node_ns.ip(&["link", "set", "eth0", "up"])?;

    let state = tmp.join("node-state.json");
    std::fs::write(
        &state,
        serde_json::to_vec(&json!({
            "node": "bench-node", "mode": "Overlay",
            "blocks": [{ "cidr": "10.98.0.0/24", "family": "IPv4", "gateway": "10.98.0.1" }],
            "clusterPodCidrs": ["10.98.0.0/16"], "nonMasqueradeCidrs": [], "mtu": 1450, "nodeIP": "192.168.88.10",
        }))?,
    )?;
    // Both at 1.0.0: the highest version Debian's reference plugins speak.
    let version = "1.0.0";
    let carve = Contender {
        label: "carve-cni + carve-ipam".into(),
        plugin: carve_dir.join("carve-cni"),
        cni_path: carve_dir.to_path_buf(),
        conf: json!({
            "cniVersion": version, "name": "carvebench", "type": "carve-cni", "stateFile": state,
            "ipam": { "type": "carve-ipam", "stateFile": state, "dataDir": tmp.join("carve-ipam") },
        }),
        add: Vec::new(),
        del: Vec::new(),
        both: Vec::new(),
    };
    let reference = Contender {
        label: format!("bridge + host-local ({})", args.reference_dir.display()),
        plugin: args.reference_dir.join("bridge"),
        cni_path: args.reference_dir.clone(),
        conf: json!({
            "cniVersion": version, "name": "refbench", "type": "bridge", "bridge": "cnibench0",
            "isGateway": true, "ipMasq": false,
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.97.0.0/24" }]],
                      "dataDir": tmp.join("host-local") },
        }),
        add: Vec::new(),
        del: Vec::new(),
        both: Vec::new(),
    };
    let version_of = |p: &Path| {
        Command::new(p)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    println!("  reference VERSION: {}", version_of(&reference.plugin));
    println!("  carve VERSION:     {}", version_of(&carve.plugin));

    let iterations = args.iterations;
    let pod_path = pod_ns.path();
    let tmp_dir = tmp.to_path_buf();
    let strace = Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success());
    let (mut contenders, counts, concurrent) = node_ns.run_in(move || -> Result<_> {
        let mut cs = vec![carve, reference];
        // Warm-up (page cache, first bridge creation), not timed.
        for c in &cs {
            for i in 0..5 {
                let id = format!("warm-{i}");
                invoke(c, "ADD", &id, &pod_path)?;
                invoke(c, "DEL", &id, &pod_path)?;
            }
        }
        for i in 0..iterations {
            for c in cs.iter_mut() {
                let id = format!("bench-{i:06}");
                let t = Instant::now();
                invoke(c, "ADD", &id, &pod_path)?;
                let added = t.elapsed();
                invoke(c, "DEL", &id, &pod_path)?;
                let both = t.elapsed();
                c.add.push(added);
                c.del.push(both - added);
                c.both.push(both);
            }
        }
        let mut counts = Vec::new();
        if strace {
            for c in &cs {
                counts.push(syscall_counts(c, 3, &pod_path, &tmp_dir)?);
            }
        }
        let mut concurrent = Vec::new();
        for c in &cs {
            concurrent.push(concurrent_ipam(c, 200, &pod_path)?);
        }
        Ok((cs, counts, concurrent))
    })??;

    println!(
        "\nCNI ADD and DEL, {iterations} iterations each, interleaved, cniVersion {version}, plugins run directly"
    );
    println!("  {:<58} {:>10} {:>10}", "contender", "median ms", "p99 ms");
    let mut figures = Vec::new();
    for c in contenders.iter_mut() {
        let label = c.label.clone();
        let add = row(&format!("{label}: ADD"), &mut c.add);
        let del = row(&format!("{label}: DEL"), &mut c.del);
        let both = row(&format!("{label}: ADD + DEL"), &mut c.both);
        figures.push([add, del, both]);
    }
    let (carve_f, ref_f) = (figures[0], figures[1]);
    for (i, what) in ["ADD", "DEL", "ADD + DEL"].iter().enumerate() {
        println!(
            "  ratio carve/reference {what:<9}: median {:.2}x, p99 {:.2}x",
            carve_f[i].0 / ref_f[i].0,
            carve_f[i].1 / ref_f[i].1
        );
    }
    let (ratio_median, ratio_p99) = (carve_f[2].0 / ref_f[2].0, carve_f[2].1 / ref_f[2].1);
    println!(
        "  target ADD + DEL median <= 0.3x: {}, p99 <= 0.5x: {}",
        if ratio_median <= 0.3 { "met" } else { "MISSED" },
        if ratio_p99 <= 0.5 { "met" } else { "MISSED" }
    );

    if counts.is_empty() {
        println!("\nexecve / fsync per call: strace is not installed (apt-get install strace); skipped");
    } else {
        println!("\nexecve / fsync per call (strace -f, 3 calls each; the plugin's own execve included)");
        for (c, [add, del]) in contenders.iter().zip(&counts) {
            println!(
                "  {:<58} ADD {:.0} execve {:.0} fsync   DEL {:.0} execve {:.0} fsync",
                c.label, add.0, add.1, del.0, del.1
            );
        }
    }

    println!("\n200 concurrent IPAM ADDs on one store, then 200 concurrent DELs (wall time)");
    for (c, (add, del)) in contenders.iter().zip(&concurrent) {
        println!("  {:<58} ADD {:>8.1} ms   DEL {:>8.1} ms", ipam_plugin(c).display(), ms(*add), ms(*del));
    }
    let (ca, ra) = (concurrent[0].0.as_secs_f64(), concurrent[1].0.as_secs_f64());
    println!("  ratio carve-ipam/host-local ADD {:.2}x", ca / ra);

    println!("\nplugin binaries");
    for c in &contenders {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1048576.0).unwrap_or(0.0);
        println!(
            "  {:<58} {} {:.1} MiB, {} {:.1} MiB",
            c.label,
            c.plugin.file_name().unwrap().to_string_lossy(),
            size(&c.plugin),
            ipam_plugin(c).file_name().unwrap().to_string_lossy(),
            size(&ipam_plugin(c))
        );
    }
    Ok(format!(
        "cni round trip: carve {:.2} ms, bridge+host-local {:.2} ms, ratio {ratio_median:.2}",
        carve_f[2].0, ref_f[2].0
    ))
}

async fn agent_rss(args: &Args, carve_dir: &Path, tmp: &Path) -> Result<()> {
    let peers = args.peers;
    let ns = Netns::new(&format!("bench-{}-agent", std::process::id()))?;
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
    ns.ip(&["link", "set", "eth0p", "up"])?;
    ns.ip(&["link", "set", "eth0", "mtu", "1500", "up"])?;
    ns.ip(&["addr", "add", "192.168.0.10/16", "dev", "eth0"])?;

    let cp = ControlPlane::start().await.context("control plane")?;
    cp.install_crds()?;
    let client = cp.client().await?;
    let pool = "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: overlay\nspec:\n  mode: Overlay\n  cidrs: [10.244.0.0/16]\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], pool)?;
    if !out.status.success() {
        bail!("creating the pool: {}", String::from_utf8_lossy(&out.stderr));
    }
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node("node-0", "192.168.0.10")).await?;
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    for i in 0..=peers {
        let name = format!("node-{i}");
        nncs.create(&PostParams::default(), &NodeNetworkConfig::new(&name, NodeNetworkConfigSpec::default())).await?;
        let cidr = format!("10.244.{i}.0/24");
        let status = json!({ "status": {
            "pool": "overlay", "mode": "Overlay", "nodeIP": format!("192.168.{}.{}", i / 200, 10 + i % 200),
            "gateway": format!("10.244.{i}.1"),
            "blocks": [{ "cidr": cidr, "family": "IPv4", "gateway": format!("10.244.{i}.1") }] } });
        nncs.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
    }

    let agent = carve_dir.join("carve-agent");
    let mut cmd = node_agent(&agent, cp.kubeconfig(), "node-0", &ns.path(), &tmp.join("agent"), carve_dir);
    cmd.args(["--resync-interval", "1s"]).env("CARVE_LOG_LEVEL", "warn");
    let started = Instant::now();
    let pid = cp.spawn("agent", cmd)?;
    let deadline = started + Duration::from_secs(60);
    let routes = loop {
        let out = ns.ip(&["route", "show", "proto", "202"])?;
        let n = out.lines().count();
        if n >= peers {
            break n;
        }
        if Instant::now() > deadline {
            bail!("the agent programmed {n} of {peers} peer routes in 60s: {}", cp.log_tail("agent", 20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let programmed = started.elapsed();
    let fdb = ns.exec("bridge", &["fdb", "show", "dev", "carve.vxlan"])?.lines().count();
    // A few resyncs after programming, so steady-state allocations count too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hwm = proc_status_mib(pid, "VmHWM:").context("reading VmHWM")?;
    let rss = proc_status_mib(pid, "VmRSS:").unwrap_or(0.0);
    println!("\ncarve-agent (release) on a node with {peers} Overlay peers, dataplane in a netns");
    println!("  programmed {routes} routes and {fdb} FDB entries {programmed:.2?} after start");
    println!(
        "  peak RSS (VmHWM) {:.1} MiB, RSS now {:.1} MiB (target < 24 MiB: {})",
        hwm,
        rss,
        if hwm < 24.0 { "met" } else { "MISSED" }
    );
    cp.stop_process("agent");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let carve_dir = match &args.carve_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("own directory")?.to_path_buf(),
    };
    for b in ["carve-cni", "carve-ipam", "carve-agent"] {
        if !carve_dir.join(b).exists() {
            bail!("{} not found: run cargo build --release -p carve-node-plugin", carve_dir.join(b).display());
        }
    }
    for b in ["bridge", "host-local"] {
        if !args.reference_dir.join(b).exists() {
            bail!("reference plugin {} not found", args.reference_dir.join(b).display());
        }
    }
    let tmp = tempfile::Builder::new().prefix("carve-bench-cni-").tempdir()?;
    println!("carve-bench-cni: carve plugins from {}", carve_dir.display());
    let summary = cni_round_trips(&args, &carve_dir, tmp.path())?;
    if !args.skip_agent {
        agent_rss(&args, &carve_dir, tmp.path()).await?;
    }
    println!("\n{summary}");
    Ok(())
}
