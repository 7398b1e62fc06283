//! carve-agent's leak reconciler at a full node's worth of allocations. No
//! assertions: it prints figures.
//!
//! ```text
//!   etcd + kube-apiserver; one simulated node (a network namespace) whose
//!   IPAM store holds N allocations, each live twice over: a Pod bound to the
//!   node with that IP in status.podIPs, and a link named as carve-cni names
//!   the attachment's host veth. carve-agent --leak-check-period 1s --leak-grace 5s.
//!   per pass: the agent's CPU, the API server's pod LISTs and watches (its own metrics)
//!   then 3 times: a sandbox disappears (its link and its Pod deleted) → its address
//!   is free in the store (polled every 50 ms)
//! ```
//!
//! `carve-bench-leaks [--allocations 250] [--passes 20]`. Needs root; `make bench` runs it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use carve_e2e::ControlPlane;
use carve_e2e::bench::metrics::{http_get, parse, samples};
use carve_e2e::bench::{median, ms};
use carve_e2e::netns::Netns;
use carve_e2e::testkit::{node_agent, temp_dir, workspace_bin};
use carve_node_plugin::ipam::alloc::{Allocations, Owner};
use carve_node_plugin::ipam::store::PodIpStore;
use carve_node_plugin::podnet::host_veth_name;
use clap::Parser;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "carve-bench-leaks")]
struct Args {
    /// Allocations in the node's store (each with a Pod and a host link).
    #[arg(long, default_value_t = 250)]
    allocations: usize,
    /// Passes the per-pass figures are taken over.
    #[arg(long, default_value_t = 20)]
    passes: u64,
}

const NODE: &str = "node-leaks";
const PERIOD: &str = "1s";
const GRACE: Duration = Duration::from_secs(5);

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250 + 2) as u8))
}

fn container(i: usize) -> String {
    format!("sandbox-{i:04}")
}

/// The agent's leak counters: passes and addresses freed.
async fn agent_counters(addr: &str) -> Result<(f64, f64)> {
    let all = parse(&http_get(addr, "/metrics").await?)?;
    let sum = |m: &str| samples(&all, m).iter().map(|(_, v)| v).sum::<f64>();
    Ok((sum("carve_ipam_leak_passes_total"), sum("carve_ipam_leaks_reclaimed_total")))
}

/// The API server's requests on pods so far: (LIST, WATCH).
async fn pod_reads(client: &kube::Client) -> Result<(f64, f64)> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let all = parse(&text)?;
    let count = |verb: &str| {
        samples(&all, "apiserver_request_total")
            .iter()
            .filter(|(s, _)| s.labels.get("resource") == Some("pods") && s.labels.get("verb") == Some(verb))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    Ok((count("LIST"), count("WATCH")))
}

async fn wait_passes(addr: &str, at_least: f64) -> Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(c) = agent_counters(addr).await
            && c.0 >= at_least
        {
            return Ok(c);
        }
        ensure!(Instant::now() < deadline, "the agent ran fewer than {at_least} leak passes in 300 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.allocations <= 250 * 200, "--allocations above 50,000 leaves 10.244.0.0/16");
    let tmp = temp_dir("bench-leaks");
    let cp = ControlPlane::start().await.context("control plane")?;
    cp.install_crds()?;
    let client = cp.client().await?;
    let ns = Netns::unique("leaks")?;

    // The store, the links and the Pods: every allocation in use.
    let store_dir = tmp.path().join("ipam");
    let store = PodIpStore::new(&store_dir);
    let mut allocations = Allocations::default();
    for i in 0..args.allocations {
        allocations.by_ip.insert(pod_ip(i), Owner::new(container(i), "eth0"));
        // veth: this kernel has no dummy links.
        ns.ip(&[
            "link",
            "add",
            &host_veth_name(&container(i), "eth0"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("pod{i}"),
        ])?;
    }
    store.lock()?.save(&allocations)?;
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    // No kube-controller-manager here to make it; the API server's admission looks it up.
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": "default" } }))?;
    Api::<ServiceAccount>::namespaced(client.clone(), "default").create(&PostParams::default(), &sa).await?;
    for i in 0..args.allocations {
        let name = container(i);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "nodeName": NODE, "containers": [{ "name": "c", "image": "carve.local/busybox:v1" }] },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let ip = pod_ip(i).to_string();
        let status = json!({ "status": { "podIP": ip, "podIPs": [{ "ip": ip }] } });
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let agent = workspace_bin("carve-node-plugin", "carve-agent")?;
    let cni = workspace_bin("carve-node-plugin", "carve-cni")?;
    let mut cmd = node_agent(&agent, cp.kubeconfig(), NODE, &ns.path(), tmp.path(), cni.parent().unwrap());
    cmd.arg("--ipam-data-dir").arg(&store_dir).args(["--leak-check-period", PERIOD]);
    cmd.args(["--leak-grace", &format!("{}s", GRACE.as_secs()), "--metrics-addr", &addr]);
    let pid = cp.spawn("agent", cmd)?;
    let process = procfs::process::Process::new(pid as i32)?;

    // Per pass, after the first few (start-up is not a pass's cost).
    let (start, _) = wait_passes(&addr, 3.0).await?;
    let (cpu0, reads0) = (carve_e2e::bench::process::cpu_secs(&process), pod_reads(&client).await?);
    let (end, freed) = wait_passes(&addr, start + args.passes as f64).await?;
    let (cpu1, reads1) = (carve_e2e::bench::process::cpu_secs(&process), pod_reads(&client).await?);
    ensure!(freed == 0.0, "the reconciler freed {freed} live addresses");
    let passes = end - start;
    let cpu = cpu1.zip(cpu0).map(|(b, a)| (b - a) / passes * 1000.0).unwrap_or(f64::NAN);
    println!("leak reconciler, {} allocations on one node, {passes} passes:", args.allocations);
    println!("  agent CPU per pass: {cpu:.2} ms (user + system; includes its idle watches)");
    println!(
        "  API server per pass: {:.2} pod LISTs, {:.2} pod WATCHes; CRI calls: 0 (the runtime is not asked)",
        (reads1.0 - reads0.0) / passes,
        (reads1.1 - reads0.1) / passes
    );

    // A sandbox disappears: its link and its Pod go; time until its address is free.
    let mut times = Vec::new();
    for i in 0..3.min(args.allocations) {
        let ip = pod_ip(i);
        let t0 = Instant::now();
        ns.ip(&["link", "del", &host_veth_name(&container(i), "eth0")])?;
        pods.delete(&container(i), &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
        loop {
            let held = store.lock()?.load()?.by_ip.contains_key(&ip);
            if !held {
                break;
            }
            ensure!(t0.elapsed() < Duration::from_secs(120), "{ip} still held after 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        times.push(ms(t0.elapsed()));
    }
    let (_, freed) = agent_counters(&addr).await?;
    println!(
        "  sandbox gone -> address free: median {:.0} ms of {times:.0?} (period {PERIOD}, grace {GRACE:?}: \
         bounded by grace + 2 periods); freed {freed}",
        median(&times).unwrap_or(f64::NAN)
    );
    Ok(())
}
