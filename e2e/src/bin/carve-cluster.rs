//! `carve-cluster`: the local control plane from the shell.
//!
//! `up` starts `run` in the background and returns once /readyz answers
//! (and, with `--nodes N`, once N real nodes have registered); `down` stops
//! it. `run` stays in the foreground until SIGINT or SIGTERM, then stops
//! everything and removes its data. `--nodes 0` (the default) is etcd +
//! kube-apiserver on loopback; `--nodes N` adds kube-controller-manager,
//! kube-scheduler and N kubelet + kube-proxy + containerd nodes on an
//! isolated underlay (see `carve_e2e::cluster`), importing the OCI archives
//! in `--images` (what `make image` writes) into every node. `--runtimes`
//! picks each node's containerd (Debian's 1.6 by default, or 2); `--policy
//! npm` installs a NetworkPolicy engine (see `carve_e2e::policy`);
//! `--dataplane cilium` runs the nodes without kube-proxy and brings them up
//! with carve (ipam-only, `examples/overlay.yaml`) under Cilium (see
//! `carve_e2e::cilium`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use carve_e2e::ControlPlane;
use carve_e2e::cilium::Dataplane;
use carve_e2e::cluster::{Cluster, ClusterOptions, Runtime};
use carve_e2e::policy::PolicyEngine;
use clap::{Parser, Subcommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "Local etcd + kube-apiserver for carve development")]
struct Cli {
    /// Where the admin kubeconfig is written once the API server is ready.
    #[arg(long, global = true, default_value = "target/e2e/kubeconfig")]
    kubeconfig: PathBuf,
    /// Real nodes (kubelet, kube-proxy, containerd); 0 = API server only.
    #[arg(long, global = true, default_value_t = 0)]
    nodes: usize,
    /// Folder of OCI image archives every node imports (`make image`).
    #[arg(long, global = true, default_value = "target/images")]
    images: PathBuf,
    /// Container runtime of each node in order, comma-separated:
    /// `containerd1.6` (Debian's, for nodes past the list) or `containerd2`.
    #[arg(long, global = true, value_delimiter = ',')]
    runtimes: Vec<Runtime>,
    /// A NetworkPolicy engine on the nodes: `npm` (Azure Network Policy Manager).
    #[arg(long, global = true)]
    policy: Option<PolicyEngine>,
    /// The nodes' dataplane: `carve` (with kube-proxy) or `cilium` (on carve's podCIDRs, no kube-proxy).
    #[arg(long, global = true, default_value = "carve")]
    dataplane: Dataplane,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start in the background; return when ready.
    Up,
    /// Stop what `up` started.
    Down,
    /// Run in the foreground until Ctrl-C.
    Run,
}

/// What the nodes run, as `up` passes it on to `run`.
#[derive(Clone, Debug, Default)]
struct NodeSpec {
    runtimes: Vec<Runtime>,
    policy: Option<PolicyEngine>,
    dataplane: Dataplane,
}

impl NodeSpec {
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if !self.runtimes.is_empty() {
            let names: Vec<String> = self.runtimes.iter().map(Runtime::to_string).collect();
            args.extend(["--runtimes".into(), names.join(",")]);
        }
        if let Some(engine) = self.policy {
            args.extend(["--policy".into(), engine.to_string()]);
        }
        args.extend(["--dataplane".into(), self.dataplane.to_string()]);
        args
    }
}

fn pid_file(kubeconfig: &Path) -> PathBuf {
    kubeconfig.with_file_name("cluster.pid")
}

fn log_file(kubeconfig: &Path) -> PathBuf {
    kubeconfig.with_file_name("cluster.log")
}

fn running_pid(kubeconfig: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(kubeconfig)).ok()?.trim().parse().ok()?;
    kill(Pid::from_raw(pid), None).is_ok().then_some(pid)
}

/// What `run` keeps alive: a bare control plane or a cluster with nodes.
enum Running {
    ControlPlane(ControlPlane),
    Cluster(Cluster),
}

impl Running {
    fn cp(&self) -> &ControlPlane {
        match self {
            Running::ControlPlane(cp) => cp,
            Running::Cluster(c) => c.cp(),
        }
    }
}

async fn start(nodes: usize, images: &Path, spec: &NodeSpec) -> Result<Running> {
    if nodes == 0 {
        return Ok(Running::ControlPlane(ControlPlane::start().await?));
    }
    let images = carve_e2e::image::archives_in(images)?;
    let opts = ClusterOptions {
        nodes,
        images,
        runtimes: spec.runtimes.clone(),
        policy: spec.policy,
        dataplane: spec.dataplane,
    };
    let cluster = Cluster::start(opts).await?;
    if spec.dataplane == Dataplane::Cilium {
        let pool = std::fs::read_to_string(carve_e2e::repo_root().join("examples/overlay.yaml"))?;
        cluster.deploy_carve_under_cilium(&pool).await?;
    }
    Ok(Running::Cluster(cluster))
}

async fn run(kubeconfig: &Path, nodes: usize, images: &Path, spec: &NodeSpec) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = tokio::select! {
        r = start(nodes, images, spec) => r?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let cp = running.cp();
    if let Some(parent) = kubeconfig.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = kubeconfig.with_extension("tmp");
    std::fs::copy(cp.kubeconfig(), &tmp)?;
    std::fs::rename(&tmp, kubeconfig)?;
    println!("control plane ready in {:.1}s at {}", cp.ready_after().as_secs_f64(), cp.server());
    println!("data in {}", cp.dir().display());
    if let Running::Cluster(c) = &running {
        for n in c.nodes() {
            println!("node {} at {} on {:?} (files in {})", n.name, n.ip, n.runtime, n.dir().display());
        }
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    println!("stopping");
    let _ = std::fs::remove_file(kubeconfig);
    drop(running);
    Ok(())
}

fn up(kubeconfig: &Path, nodes: usize, images: &Path, spec: &NodeSpec) -> Result<()> {
    if let Some(pid) = running_pid(kubeconfig) {
        println!("already running (pid {pid}); kubeconfig at {}", kubeconfig.display());
        return Ok(());
    }
    let dir = kubeconfig.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(kubeconfig);
    // Build (or find) the binaries in the foreground so their progress is visible.
    carve_e2e::control_plane_bins()?;
    if spec.policy.is_some() {
        carve_e2e::controlplane::policy_bins()?;
    }
    if spec.dataplane == Dataplane::Cilium {
        carve_e2e::controlplane::cilium_bins()?;
    }
    let log = std::fs::File::create(log_file(kubeconfig))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--nodes")
        .arg(nodes.to_string())
        .arg("--images")
        .arg(images)
        .args(spec.args())
        .arg("run")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C in this terminal later must not stop it.
        .process_group(0)
        .spawn()
        .context("start carve-cluster run")?;
    let pid = child.id() as i32;
    std::fs::write(pid_file(kubeconfig), pid.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !kubeconfig.exists() {
        if kill(Pid::from_raw(pid), None).is_err() || Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let log = std::fs::read_to_string(log_file(kubeconfig)).unwrap_or_default();
            bail!("control plane did not come up; {}:\n{log}", log_file(kubeconfig).display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let abs = std::fs::canonicalize(kubeconfig)?;
    if nodes == 0 {
        println!("control plane up (pid {pid}).");
    } else {
        println!("cluster with {nodes} nodes up (pid {pid}; log in {}).", log_file(kubeconfig).display());
    }
    println!("  export KUBECONFIG={}", abs.display());
    println!("  stop it with: make cluster-down");
    Ok(())
}

fn down(kubeconfig: &Path) -> Result<()> {
    let Some(pid) = running_pid(kubeconfig) else {
        println!("not running");
        let _ = std::fs::remove_file(pid_file(kubeconfig));
        return Ok(());
    };
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kill(Pid::from_raw(pid), None).is_ok() {
        if Instant::now() > deadline {
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            std::thread::sleep(Duration::from_millis(200));
            // Its nodes' processes, cgroups and namespaces.
            carve_e2e::scratch::sweep_stale_clusters();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(pid_file(kubeconfig));
    let _ = std::fs::remove_file(kubeconfig);
    println!("stopped");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let spec = NodeSpec { runtimes: cli.runtimes, policy: cli.policy, dataplane: cli.dataplane };
    match cli.cmd {
        Cmd::Up => up(&cli.kubeconfig, cli.nodes, &cli.images, &spec),
        Cmd::Down => down(&cli.kubeconfig),
        Cmd::Run => tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(
            &cli.kubeconfig,
            cli.nodes,
            &cli.images,
            &spec,
        )),
    }
}
