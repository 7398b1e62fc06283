//! Data path figures on real nodes: TCP throughput (1 and 4 streams), request/
//! response latency and CPU per Gbit for every path a pod's traffic takes,
//! against node-to-node (the limit) in the same run. No assertions: it prints
//! figures.
//!
//! ```text
//!   per pool (Overlay: VXLAN; VNet: routed, no encapsulation), a fresh cluster of 3 real nodes:
//!     pods srv + near on node-2, far on node-1 (busybox, pinned), Service srv (ClusterIP)
//!     iperf3 -s / sockperf sr in node-2's and srv's network namespaces
//!     per round, every path in turn (interleaved), median of the rounds:
//!       node-1 → node-2            the underlay: the limit
//!       near → srv                 pod to pod, same node
//!       far → srv                  pod to pod across nodes
//!       node-1 → srv               node to pod
//!       far → ClusterIP → srv      kube-proxy (nftables) DNAT
//!   the same paths on Flannel's VXLAN (flanneld + its CNI plugin, built from the
//!   Go module proxy by control-plane-bins.sh --flannel) on a third cluster,
//!   on the Node podCIDRs carve's controller writes (carve as IPAM only)
//!   Overlay only: far → srv again with 50 peers programmed (fake Nodes whose
//!   routes point at unreachable underlay addresses): the per-packet cost must
//!   not grow with the peers
//! ```
//!
//! `carve-bench-datapath [--seconds 5] [--rounds 3] [--peers 50]`. Needs root;
//! `make bench-datapath` runs it, `make bench` too.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use carve_e2e::bench::datapath::{IPERF_PORT, Place, SOCKPERF_PORT, pod_pid};
use carve_e2e::bench::median;
use carve_e2e::cluster::{CONTROL_PLANE_IP, Cluster, ClusterOptions};
use carve_e2e::testkit::{VNET_POD_POOL, node, node_images, wait_for};
use carve_e2e::{control_plane_bins, repo_root};
use clap::Parser;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "carve-bench-datapath")]
struct Args {
    /// Seconds per iperf3 and sockperf run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Rounds; every figure is the median over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Peers programmed for the scaling figure (Overlay); 0 skips it.
    #[arg(long, default_value_t = 50)]
    peers: usize,
    /// Only Flannel's cluster (to check the peer's set-up alone).
    #[arg(long)]
    flannel_only: bool,
}

/// One path's medians.
#[derive(Debug, Default, Clone)]
struct Figures {
    gbps_1: f64,
    gbps_4: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s_per_gbit: f64,
}

#[derive(Default)]
struct Samples {
    gbps_1: Vec<f64>,
    gbps_4: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    cpu: Vec<f64>,
}

impl Samples {
    fn measure(&mut self, from: Place, to: &str, seconds: u32) -> Result<()> {
        let (bps, cpu) = from.throughput(to, 1, seconds)?;
        self.gbps_1.push(bps / 1e9);
        self.cpu.push(cpu);
        self.gbps_4.push(from.throughput(to, 4, seconds)?.0 / 1e9);
        let (p50, p99) = from.latency(to, seconds)?;
        self.p50_us.push(p50);
        self.p99_us.push(p99);
        Ok(())
    }

    fn medians(&self) -> Figures {
        let m = |v: &[f64]| median(v).unwrap_or(f64::NAN);
        Figures {
            gbps_1: m(&self.gbps_1),
            gbps_4: m(&self.gbps_4),
            p50_us: m(&self.p50_us),
            p99_us: m(&self.p99_us),
            cpu_s_per_gbit: m(&self.cpu),
        }
    }
}

fn bench_pod(name: &str, node: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": "carve.local/busybox:v1", "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]
        }
    }))
    .expect("pod literal")
}

/// (pod IP, uid) once `name` runs.
async fn running(pods: &Api<Pod>, name: &str) -> (String, String) {
    wait_for(&format!("pod {name} Running"), Duration::from_secs(180), || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let status = p.status.clone().unwrap_or_default();
        match (status.phase.as_deref(), status.pod_ip, p.metadata.uid) {
            (Some("Running"), Some(ip), Some(uid)) => Ok((ip, uid)),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// The dataplane under test.
enum Dataplane<'a> {
    /// carve from its manifests, with this pool.
    Carve(&'a str),
    /// Flannel's VXLAN backend on the Node podCIDRs carve's controller
    /// writes for an Overlay pool (carve as the IPAM only, no carve-agent).
    Flannel(&'a str),
}

/// flanneld on every node (spawned into the node's namespaces, supervised
/// with the control plane) and the flannel CNI plugin as the node's network.
async fn deploy_flannel(cluster: &Cluster, pool: &str) -> Result<()> {
    let cp = cluster.cp();
    cp.install_crds()?;
    for file in ["00-namespace.yaml", "10-controller-rbac.yaml", "20-controller.yaml"] {
        cp.kubectl_ok(&["apply", "-f", &format!("manifests/{file}")])?;
    }
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], pool)?;
    anyhow::ensure!(out.status.success(), "the pool: {}", String::from_utf8_lossy(&out.stderr));
    let client = cp.client().await?;
    let nodes = Api::<Node>::all(client);
    wait_for("every Node's podCIDR from carve-controller", Duration::from_secs(120), || async {
        let list = nodes.list(&Default::default()).await.map_err(|e| e.to_string())?;
        let missing: Vec<_> = list
            .items
            .iter()
            .filter(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        if missing.is_empty() { Ok(()) } else { Err(format!("without podCIDR: {missing:?}")) }
    })
    .await;
    let flannel = control_plane_bins()?.join("flannel");
    let kubeconfig =
        cp.write_kubeconfig("flannel", &format!("https://{CONTROL_PLANE_IP}:6443"), "flannel", Some("system:masters"))?;
    // /tmp is shared with the nodes' mount namespaces; /run/flannel is each node's own.
    let net_conf = cluster.dir().join("flannel-net-conf.json");
    std::fs::write(
        &net_conf,
        json!({"Network": "10.244.0.0/16", "EnableNFTables": true, "Backend": {"Type": "vxlan"}}).to_string(),
    )?;
    let conflist = json!({
        "name": "cbr0", "cniVersion": "0.3.1",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    for node in cluster.nodes() {
        std::fs::copy(flannel.join("flannel"), node.host_path("/opt/cni/bin/flannel")).context("flannel CNI plugin")?;
        let mut cmd = node.command(flannel.join("flanneld").to_str().unwrap());
        cmd.args(["--kube-subnet-mgr", "--iface=eth0"])
            .arg(format!("--kubeconfig-file={}", kubeconfig.display()))
            .arg(format!("--net-config-path={}", net_conf.display()))
            .env("NODE_NAME", &node.name);
        cp.spawn(&format!("flanneld-{}", node.name), cmd)?;
        // Through the node's own /etc (an overlay): copied in, then renamed, as containerd watches.
        let tmp = node.dir().join("flannel.conflist");
        std::fs::write(&tmp, conflist.to_string())?;
        node.run("mkdir", &["-p", "/etc/cni/net.d"])?;
        node.run("cp", &[&tmp.display().to_string(), "/etc/cni/net.d/.flannel.tmp"])?;
        node.run("mv", &["/etc/cni/net.d/.flannel.tmp", "/etc/cni/net.d/10-flannel.conflist"])?;
    }
    cluster.wait_network_ready().await
}

/// The paths of one cluster, measured `rounds` times interleaved.
async fn measure_cluster(
    dataplane: Dataplane<'_>,
    label: &str,
    args: &Args,
) -> Result<(Vec<(String, Figures)>, Option<Figures>)> {
    let images = node_images()?;
    let cluster = Cluster::start(ClusterOptions { nodes: 3, images, ..Default::default() }).await?;
    match dataplane {
        Dataplane::Carve(pool) => cluster.deploy_carve(pool).await?,
        Dataplane::Flannel(pool) => deploy_flannel(&cluster, pool).await?,
    }
    let client = cluster.cp().client().await?;
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let (n1, n2) = (&cluster.nodes()[0], &cluster.nodes()[1]);
    for (name, node, app) in [("srv", &n2.name, "bench-srv"), ("near", &n2.name, "bench"), ("far", &n1.name, "bench")] {
        pods.create(&PostParams::default(), &bench_pod(name, node, app)).await?;
    }
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "srv"},
        "spec": {"selector": {"app": "bench-srv"}, "ports": [
            {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
            {"name": "sockperf", "port": SOCKPERF_PORT, "protocol": "TCP"}
        ]}
    }))?;
    let service =
        Api::<Service>::namespaced(client.clone(), "default").create(&PostParams::default(), &service).await?;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).context("the Service got no cluster IP")?;
    let (srv_ip, srv_uid) = running(&pods, "srv").await;
    let (_, near_uid) = running(&pods, "near").await;
    let (_, far_uid) = running(&pods, "far").await;
    let (srv, near, far) = (
        Place::Pod { pid: pod_pid(&srv_uid)? },
        Place::Pod { pid: pod_pid(&near_uid)? },
        Place::Pod { pid: pod_pid(&far_uid)? },
    );
    let (node1, node2) = (Place::Node { holder: n1.holder() }, Place::Node { holder: n2.holder() });
    let _servers = (node2.serve()?, srv.serve()?);

    let paths: Vec<(&str, Place, String)> = vec![
        ("node -> node (underlay)", node1, n2.ip.clone()),
        ("pod -> pod, same node", near, srv_ip.clone()),
        ("pod -> pod, across nodes", far, srv_ip.clone()),
        ("node -> pod, across nodes", node1, srv_ip.clone()),
        ("pod -> ClusterIP -> pod", far, cluster_ip.clone()),
    ];
    // kube-proxy programs the Service a moment after it exists.
    wait_for("the ClusterIP answering", Duration::from_secs(60), || async {
        far.latency(&cluster_ip, 1).map(|_| ()).map_err(|e| format!("{e:#}"))
    })
    .await;
    let mut samples: BTreeMap<&str, Samples> = BTreeMap::new();
    for round in 1..=args.rounds {
        eprintln!("datapath {label}: round {round}/{}", args.rounds);
        for (name, from, to) in &paths {
            samples.entry(name).or_default().measure(*from, to, args.seconds)?;
        }
    }
    let figures = paths.iter().map(|(name, ..)| (name.to_string(), samples[name].medians())).collect();

    // Scaling: the same across-nodes path with `peers` more nodes programmed.
    let mut scaled = None;
    if args.peers > 0 && label == "overlay" {
        let nodes = Api::<Node>::all(client.clone());
        for i in 0..args.peers {
            // 10.224.1.0/24: on no link; the peers' routes and FDB entries lead nowhere.
            let ip = format!("10.224.1.{}", 10 + i);
            nodes.create(&PostParams::default(), &node(&format!("peer-{i}"), &ip)).await?;
        }
        let want = 3 + args.peers;
        wait_for(&format!("{want} nodes' routes on node-1"), Duration::from_secs(120), || async {
            let routes = n1.netns().ip(&["-4", "route", "show", "proto", "202"]).map_err(|e| format!("{e:#}"))?;
            let n = routes.lines().count();
            if n > args.peers { Ok(()) } else { Err(format!("{n} routes")) }
        })
        .await;
        let mut s = Samples::default();
        for _ in 0..args.rounds {
            s.measure(far, &srv_ip, args.seconds)?;
        }
        scaled = Some(s.medians());
    }
    let _ = cluster.shutdown();
    Ok((figures, scaled))
}

fn print_table(label: &str, figures: &[(String, Figures)]) -> f64 {
    let base = figures[0].1.clone();
    println!("\n{label} pool: median of the rounds; ratios to node -> node");
    println!(
        "{:<28} {:>16} {:>16} {:>22} {:>12}",
        "path", "1 stream Gbit/s", "4 streams Gbit/s", "latency p50 / p99 µs", "CPU s/Gbit"
    );
    for (name, f) in figures {
        println!(
            "{:<28} {:>8.2} ({:.2}x) {:>8.2} ({:.2}x) {:>8.1} / {:>5.1} ({:.2}x) {:>12.3}",
            name,
            f.gbps_1,
            f.gbps_1 / base.gbps_1,
            f.gbps_4,
            f.gbps_4 / base.gbps_4,
            f.p50_us,
            f.p99_us,
            f.p50_us / base.p50_us,
            f.cpu_s_per_gbit
        );
    }
    figures
        .iter()
        .find(|(n, _)| n == "pod -> pod, across nodes")
        .map(|(_, f)| f.gbps_1 / base.gbps_1)
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let overlay_pool = std::fs::read_to_string(repo_root().join("examples/overlay.yaml"))?;
    if args.flannel_only {
        let (flannel, _) = measure_cluster(Dataplane::Flannel(&overlay_pool), "flannel", &args).await?;
        print_table("Flannel VXLAN (peer)", &flannel);
        return Ok(());
    }
    let (overlay, scaled) = measure_cluster(Dataplane::Carve(&overlay_pool), "overlay", &args).await?;
    let (vnet, _) = measure_cluster(Dataplane::Carve(VNET_POD_POOL), "vnet", &args).await?;
    let (flannel, _) = measure_cluster(Dataplane::Flannel(&overlay_pool), "flannel", &args).await?;
    let r_overlay = print_table("Overlay (VXLAN)", &overlay);
    if let Some(s) = scaled {
        let three = &overlay.iter().find(|(n, _)| n == "pod -> pod, across nodes").unwrap().1;
        println!(
            "pod -> pod across nodes with {} more peers programmed: 1 stream {:.2} Gbit/s ({:.2}x the 3-node figure), p50 {:.1} µs",
            args.peers,
            s.gbps_1,
            s.gbps_1 / three.gbps_1,
            s.p50_us
        );
    }
    let r_vnet = print_table("VNet (routed)", &vnet);
    let r_flannel = print_table("Flannel VXLAN (peer)", &flannel);
    println!(
        "\ncarve Overlay against Flannel's VXLAN, same paths (carve / Flannel, each against its own cluster's node -> node)"
    );
    for ((name, c), (_, f)) in overlay.iter().zip(&flannel).skip(1) {
        let (cb, fb) = (&overlay[0].1, &flannel[0].1);
        println!(
            "{:<28} 1 stream {:.2}x / {:.2}x   4 streams {:.2}x / {:.2}x   p50 {:.2}x / {:.2}x",
            name,
            c.gbps_1 / cb.gbps_1,
            f.gbps_1 / fb.gbps_1,
            c.gbps_4 / cb.gbps_4,
            f.gbps_4 / fb.gbps_4,
            c.p50_us / cb.p50_us,
            f.p50_us / fb.p50_us
        );
    }
    println!(
        "datapath: overlay {r_overlay:.2}x, vnet {r_vnet:.2}x of node-to-node (1 stream); flannel vxlan {r_flannel:.2}x"
    );
    Ok(())
}
