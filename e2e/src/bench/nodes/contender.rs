//! Starting each contender on a fresh control plane, and reading carve-controller's own figures.

use super::*;

pub(super) fn strip_ansi(s: &str) -> String {
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

pub(super) fn read_log(cp: &ControlPlane, name: &str) -> String {
    strip_ansi(&std::fs::read_to_string(cp.dir().join(format!("{name}.log"))).unwrap_or_default())
}

/// Waits until the log of `name` contains one of `needles`.
pub(super) async fn wait_log(cp: &ControlPlane, name: &str, needles: &[&str]) -> Result<()> {
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
pub(super) async fn wait_pool_ready(cp: &ControlPlane, client: &Client) -> Result<()> {
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
pub(super) async fn warm_nnc_writes(client: &Client) -> Result<Duration> {
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
pub(super) async fn check_allocations(client: &Client, n: usize, with_nnc: bool) -> Result<String> {
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

pub(super) fn carve_binary() -> PathBuf {
    crate::repo_root().join("target/release/carve-controller")
}

/// Samples the process's open file descriptors (mostly API connections) every 50 ms; keeps the maximum.
pub(super) async fn sample_fds(pid: u32, peak: Arc<AtomicUsize>) {
    loop {
        if let Some(n) = process::fd_count(pid) {
            peak.fetch_max(n, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reconciles (and a note with them, the reconcile errors and WARN lines) from carve-controller's /metrics.
pub(super) async fn carve_metrics(cp: &ControlPlane) -> Result<(f64, String)> {
    let log = read_log(cp, "carve-controller");
    let addr = log
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .context("no metrics address in carve-controller's log")?
        .to_string();
    let all = metrics::parse(&metrics::http_get(&addr, "/metrics").await?)?;
    let reconciles: f64 = metrics::samples(&all, "carve_reconciles_total").iter().map(|(_, v)| v).sum();
    let errors: Vec<String> = metrics::samples(&all, "carve_reconcile_errors_total")
        .iter()
        .map(|(s, v)| format!("{}={v}", s.labels.get("reason").unwrap_or("?")))
        .collect();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    let note = format!(
        "carve reconciles {reconciles}, reconcile errors [{}], WARN log lines {warnings}",
        if errors.is_empty() { "none".to_string() } else { errors.join(", ") }
    );
    Ok((reconciles, note))
}

pub(super) async fn start_contender(
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
                format!("--service-cluster-ip-range={}", crate::controlplane::SERVICE_CIDR),
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
