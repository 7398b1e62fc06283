//! carve-agent: one per node (DaemonSet, hostNetwork). Flags, the
//! install-cni init step and the dataplane thread; `carve_node_plugin::agent::run`
//! does the rest.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use carve_cli::{LogFormat, init_tracing, kube_client, parse_duration};
use carve_node_plugin::agent::role::Role;
use carve_node_plugin::agent::{self, Agent, Settings, cni, leaks, metrics};
use carve_node_plugin::cni::report::socket_path;
use carve_node_plugin::dataplane::plan::{DEFAULT_VNI, DEFAULT_VXLAN_DEVICE, DEFAULT_VXLAN_PORT};
use carve_node_plugin::dataplane::worker::Worker;
use carve_node_plugin::state::DEFAULT_STATE_FILE;
use clap::Parser;
use ipnet::IpNet;
use tracing::info;

/// Turns this node's NodeNetworkConfig into the node state file, the CNI
/// plugins and conflist, routes / VXLAN / SNAT, and the Node's NetworkUnavailable condition.
#[derive(Parser, Debug)]
#[command(name = "carve-agent", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// This node's name (the NodeNetworkConfig and Node it serves); set NODE_NAME
    /// from spec.nodeName with the downward API.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// kubeconfig to use; in-cluster config when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Node state file read by carve-cni and carve-ipam.
    #[arg(long, env = "CARVE_STATE_FILE", default_value = DEFAULT_STATE_FILE)]
    state_file: PathBuf,
    /// carve-ipam's allocation store, written into the conflist as ipam.dataDir
    /// (default: carve-ipam's own, /var/lib/carve/ipam/<network>).
    #[arg(long, env = "CARVE_IPAM_DATA_DIR")]
    ipam_data_dir: Option<PathBuf>,
    /// Directory the container runtime finds CNI plugins in.
    #[arg(long, global = true, env = "CARVE_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// Directory the container runtime reads CNI network configs from.
    #[arg(long, env = "CARVE_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where carve-cni and carve-ipam are copied from (default: the agent's own directory).
    #[arg(long, global = true, env = "CARVE_CNI_SOURCE_DIR")]
    cni_source_dir: Option<PathBuf>,
    /// File name of the conflist in --cni-conf-dir.
    #[arg(long, env = "CARVE_CNI_CONFLIST", default_value = cni::DEFAULT_CONFLIST)]
    conflist_name: String,
    /// Pin the conflist to this one CNI version (0.3.1, 0.4.0, 1.0.0 or 1.1.0),
    /// also when pods created under another still run. Default: cniVersion 1.0.0
    /// (containerd 1.6/1.7) with cniVersions [1.0.0, 1.1.0] (libcni >= 1.2), never
    /// raised above an existing conflist's while pods live.
    #[arg(
        long,
        global = true,
        env = "CARVE_CNI_VERSION",
        value_name = "VERSION",
        value_parser = cni::parse_cni_version
    )]
    cni_version: Option<String>,
    /// Destinations pods reach with their own address (no SNAT), besides the
    /// cluster's pod CIDRs; comma-separated CIDRs.
    #[arg(long, env = "CARVE_NON_MASQUERADE_CIDRS", value_delimiter = ',')]
    non_masquerade_cidrs: Vec<IpNet>,
    /// VXLAN device name (Overlay).
    #[arg(long, env = "CARVE_VXLAN_DEVICE", default_value = DEFAULT_VXLAN_DEVICE)]
    vxlan_device: String,
    /// VXLAN network identifier (Overlay), 1..=16777215.
    #[arg(long, env = "CARVE_VXLAN_VNI", default_value_t = DEFAULT_VNI)]
    vxlan_vni: u32,
    /// VXLAN UDP port (Overlay).
    #[arg(long, env = "CARVE_VXLAN_PORT", default_value_t = DEFAULT_VXLAN_PORT)]
    vxlan_port: u16,
    /// Pod and VXLAN MTU; default: the MTU of the link holding the node IP, less 50 in Overlay.
    #[arg(long, env = "CARVE_MTU")]
    mtu: Option<u32>,
    /// Program the dataplane of this network namespace (e.g. /run/netns/node-a)
    /// instead of the agent's own; the API server is still reached from the
    /// agent's namespace. For simulated nodes and tests.
    #[arg(long, env = "CARVE_NETNS")]
    netns: Option<PathBuf>,
    /// Where the IP forwarding sysctls are written: /proc/sys, or in a
    /// container (where /proc/sys is read-only) a bind of the host's /proc/sys/net
    /// below this directory, e.g. /host/proc/sys.
    #[arg(long, env = "CARVE_PROC_SYS_DIR", default_value = "/proc/sys")]
    proc_sys_dir: PathBuf,
    /// Reconcile at least this often even without changes (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resync_interval: Duration,
    /// Serve Prometheus metrics on this address (/metrics); unset: no server.
    #[arg(long, env = "CARVE_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Time between leak reconciler passes over the IPAM store; 0 turns it off.
    #[arg(long, env = "CARVE_LEAK_CHECK_PERIOD", default_value = "60s", value_parser = parse_duration)]
    leak_check_period: Duration,
    /// How long an allocation must have no pod and no host interface, across
    /// two passes, before it is freed (at least 5s).
    #[arg(long, env = "CARVE_LEAK_GRACE", default_value = "120s", value_parser = parse_duration)]
    leak_grace: Duration,
    /// Taint the Node carve.dev/no-pod-addresses:NoSchedule while no pod
    /// address is free and none can be had; false: never (and remove it).
    #[arg(long, env = "CARVE_NO_ADDRESS_TAINT", default_value_t = true, action = clap::ArgAction::Set)]
    no_address_taint: bool,
    /// `dataplane`: carve wires the pods (carve-cni, VXLAN or routes, SNAT).
    /// `ipam-only`: another dataplane (Cilium with `ipam: kubernetes`, …) wires
    /// them on carve's podCIDRs; the agent programs nothing and removes what
    /// carve programmed.
    #[arg(long, global = true, env = "CARVE_ROLE", default_value = "dataplane")]
    role: Role,
    #[arg(long, env = "CARVE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// tracing filter, e.g. info or carve_node_plugin=debug.
    #[arg(long, env = "CARVE_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Install carve-cni, carve-ipam and (when the node has none that speaks
    /// the conflist's highest CNI version: 1.1.0, or --cni-version) portmap into
    /// --cni-bin-dir, then exit: the DaemonSet's init step.
    InstallCni {
        /// The portmap shipped in the image.
        #[arg(long, default_value = "/usr/local/lib/carve/cni/portmap")]
        portmap_source: PathBuf,
    },
}

/// Checks every setting before anything is touched.
fn settings(args: &Args) -> Result<Settings> {
    let node = match args.node_name.as_deref().map(str::trim) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => bail!(
            "NODE_NAME is not set: carve-agent needs the name of its Node (set the NODE_NAME environment variable \
             from spec.nodeName with the downward API, or pass --node-name)"
        ),
    };
    if args.vxlan_device.is_empty() || args.vxlan_device.len() > 15 || args.vxlan_device.contains(['/', ' ']) {
        bail!(
            "--vxlan-device {:?} is not a valid interface name (1 to 15 characters, no '/' or space)",
            args.vxlan_device
        );
    }
    if args.vxlan_vni == 0 || args.vxlan_vni > 0xff_ffff {
        bail!("--vxlan-vni {} is out of range: a VNI is 1 to 16777215", args.vxlan_vni);
    }
    if let Some(mtu) = args.mtu
        && !(576..=65535).contains(&mtu)
    {
        bail!("--mtu {mtu} is out of range (576 to 65535)");
    }
    if args.leak_grace < leaks::MIN_GRACE {
        bail!(
            "--leak-grace {:?} is shorter than {:?}: a pod's IP reaches the API server seconds after its ADD, \
             and a shorter grace could free a live pod's address",
            args.leak_grace,
            leaks::MIN_GRACE
        );
    }
    let cni_source_dir = cni_source_dir(args)?;
    Ok(Settings {
        node,
        state_file: args.state_file.clone(),
        ipam_data_dir: args.ipam_data_dir.clone(),
        cni_bin_dir: args.cni_bin_dir.clone(),
        cni_conf_dir: args.cni_conf_dir.clone(),
        cni_source_dir,
        conflist_name: args.conflist_name.clone(),
        cni_version: args.cni_version.clone(),
        non_masquerade_cidrs: args.non_masquerade_cidrs.iter().map(|c| c.trunc().to_string()).collect(),
        vxlan_device: args.vxlan_device.clone(),
        vni: args.vxlan_vni,
        vxlan_port: args.vxlan_port,
        mtu: args.mtu,
        no_address_taint: args.no_address_taint,
        role: args.role,
    })
}

fn cni_source_dir(args: &Args) -> Result<PathBuf> {
    match &args.cni_source_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_exe()
            .context("finding the agent's own directory for --cni-source-dir")?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default()),
    }
}

/// The init step: the runtime must find every plugin of the conflist before
/// the agent writes it.
fn install_cni(args: &Args, portmap_source: &std::path::Path) -> Result<()> {
    if args.role == Role::IpamOnly {
        info!("ipam-only: the node's dataplane brings its own plugins; nothing to install");
        return Ok(());
    }
    let source = cni_source_dir(args)?;
    let installed = cni::install_binaries(&source, &args.cni_bin_dir)
        .with_context(|| format!("installing carve-cni and carve-ipam into {}", args.cni_bin_dir.display()))?;
    info!(?installed, dir = %args.cni_bin_dir.display(), "carve-cni and carve-ipam in place");
    // The version a libcni >= 1.2 picks from the conflist's cniVersions.
    let versions = cni::ConflistVersions::wanted(args.cni_version.as_deref());
    let version = versions.highest();
    match cni::ensure_portmap(portmap_source, &args.cni_bin_dir, version)
        .with_context(|| format!("installing portmap into {}", args.cni_bin_dir.display()))?
    {
        cni::PortmapInstall::Kept => info!("the node's portmap speaks CNI {version}; kept"),
        cni::PortmapInstall::Installed { why } => info!(%why, "installed carve's portmap"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_level, args.log_format)?;
    if let Some(Command::InstallCni { portmap_source }) = &args.command {
        return install_cni(&args, portmap_source);
    }
    let settings = settings(&args)?;
    let worker =
        Worker::spawn(args.netns.clone(), args.proc_sys_dir.clone()).context("starting the dataplane thread")?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    info!(node = %settings.node, netns = ?args.netns, "carve-agent starting");
    let leak_settings = leaks::LeakSettings { period: args.leak_check_period, grace: args.leak_grace };
    let agent = Agent::new(settings, worker, leak_settings);
    if let Some(addr) = args.metrics_addr {
        metrics::serve(addr, agent.metrics.clone()).await?;
        // carve-cni and carve-ipam report each call beside the state file they read.
        agent::cni_calls::listen(&socket_path(&args.state_file), agent.metrics.clone());
    }
    agent::run(client, agent, args.resync_interval).await
}
