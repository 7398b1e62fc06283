//! A real local Kubernetes control plane: etcd + kube-apiserver on loopback
//! (the fast tiers), or — with [`Options::netns`] — inside the real-node
//! cluster's underlay namespace, adding kube-controller-manager and
//! kube-scheduler and reached from the host through a loopback forwarder
//! (see [`crate::cluster`]).
//!
//! ```text
//!   ControlPlane::start()
//!     ├─ control-plane-bins.sh  → etcd, kube-apiserver, kubectl, kube-controller-manager (cached)
//!     ├─ Pki::generate()        → CA, serving cert, admin client cert, SA key
//!     ├─ etcd            127.0.0.1:<free>   data in a fresh temp dir
//!     ├─ kube-apiserver  127.0.0.1:<free>   RBAC, client-cert auth
//!     └─ poll /readyz    → kubeconfig for kubectl and kube-rs
//!   drop(ControlPlane)   → SIGTERM/SIGKILL children, remove the temp dir
//! ```
//!
//! Flags follow controller-runtime's envtest; on the host nothing listens
//! beyond 127.0.0.1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::pki::Pki;
use crate::process::ProcessKeeper;
use crate::scratch::{scratch_root, sweep_stale_dirs};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Service range of the local cluster; pod pools in tests stay clear of it.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

pub use carve_testkit::{cilium_bins, conformance_bins, control_plane_bins, policy_bins, repo_root};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Extra knobs for a control plane.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Appended to kube-apiserver's flags (later flags win).
    pub apiserver_args: Vec<String>,
    /// Run every control-plane process inside this network namespace (the
    /// real-node cluster's underlay) instead of on the host's loopback. The
    /// host then reaches the API server through a loopback forwarder.
    pub netns: Option<PathBuf>,
    /// The address kube-apiserver advertises (the `kubernetes` Service's
    /// endpoint) and nodes dial; it listens on all of the namespace's
    /// addresses on [`NETNS_API_PORT`]. Needs `netns`.
    pub advertise_address: Option<String>,
    /// Also run kube-controller-manager (every controller but node IPAM: carve
    /// owns pod CIDRs) and kube-scheduler, as a cluster with nodes needs.
    pub components: bool,
}

/// kube-apiserver's port inside a control-plane network namespace.
pub const NETNS_API_PORT: u16 = 6443;
/// The `kubernetes` Service's cluster IP (first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// A running etcd + kube-apiserver; see the module docs.
pub struct ControlPlane {
    keeper: ProcessKeeper,
    netns: Option<PathBuf>,
    pki: Option<Pki>,
    forwarder: Option<crate::netns::TcpForwarder>,
    dir: PathBuf,
    bins: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    etcd: String,
    ready_after: Duration,
}

impl ControlPlane {
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Result<ControlPlane> {
        let bins = control_plane_bins()?;
        sweep_stale_dirs();
        let root = scratch_root();
        std::fs::create_dir_all(&root)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let dir = root.join(format!("cp-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;

        let started = Instant::now();
        let mut cp = ControlPlane {
            keeper: ProcessKeeper::new(),
            netns: opts.netns.clone(),
            pki: None,
            forwarder: None,
            kubeconfig: dir.join("kubeconfig"),
            dir,
            bins,
            server: String::new(),
            etcd: String::new(),
            ready_after: Duration::ZERO,
        };
        cp.launch(&opts).await?;
        cp.ready_after = started.elapsed();
        Ok(cp)
    }

    /// A command for `program` that runs in the control plane's network
    /// namespace when it has one.
    fn command(&self, program: PathBuf) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.display())).arg("--").arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    async fn launch(&mut self, opts: &Options) -> Result<()> {
        let mut sans = Vec::new();
        if let Some(addr) = &opts.advertise_address {
            sans.push(addr.clone());
            sans.push(KUBERNETES_SERVICE_IP.to_string());
        }
        let pki = Pki::generate(&sans)?;
        let pki_dir = self.dir.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let kubelet_client = pki.client_cert("kube-apiserver-kubelet-client", Some("system:masters"))?;
        for (name, body) in [
            ("ca.crt", &pki.ca_pem),
            ("apiserver.crt", &pki.serving_cert_pem),
            ("apiserver.key", &pki.serving_key_pem),
            ("sa.key", &pki.sa_key_pem),
            ("sa.pub", &pki.sa_pub_pem),
            ("kubelet-client.crt", &kubelet_client.cert_pem),
            ("kubelet-client.key", &kubelet_client.key_pem),
        ] {
            std::fs::write(pki_dir.join(name), body)?;
        }

        // In its own namespace the control plane has the fixed ports to itself.
        let in_netns = self.netns.is_some();
        let (etcd_port, peer_port, api_port) =
            if in_netns { (2379, 2380, NETNS_API_PORT) } else { (free_port()?, free_port()?, free_port()?) };
        self.etcd = format!("http://127.0.0.1:{etcd_port}");
        self.server = format!("https://127.0.0.1:{api_port}");

        let mut etcd = self.command(self.bins.join("etcd"));
        etcd.args([
            "--name=carve-e2e".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={}", self.etcd),
            format!("--advertise-client-urls={}", self.etcd),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=carve-e2e=http://127.0.0.1:{peer_port}"),
            // A throwaway cluster: durability buys nothing and costs seconds.
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ]);
        self.keeper.spawn("etcd", etcd, self.dir.join("etcd.log"))?;

        let pki_path = |f: &str| pki_dir.join(f).display().to_string();
        let mut api = self.command(self.bins.join("kube-apiserver"));
        let (bind, advertise) = match &opts.advertise_address {
            Some(addr) => ("0.0.0.0".to_string(), addr.clone()),
            None => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
        };
        api.args([
            format!("--etcd-servers={}", self.etcd),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki_path("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_path("apiserver.key")),
            format!("--client-ca-file={}", pki_path("ca.crt")),
            format!("--service-account-key-file={}", pki_path("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_path("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--kubelet-client-certificate={}", pki_path("kubelet-client.crt")),
            format!("--kubelet-client-key={}", pki_path("kubelet-client.key")),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
            "--v=1".to_string(),
        ]);
        if opts.components {
            // Node authorizer + NodeRestriction: kubelets really are limited
            // to their own Node and pods.
            api.args(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction"]);
        } else {
            api.arg("--authorization-mode=RBAC");
        }
        api.args(&opts.apiserver_args);
        self.keeper.spawn("kube-apiserver", api, self.dir.join("kube-apiserver.log"))?;

        if let Some(ns) = &self.netns {
            let target = format!("127.0.0.1:{api_port}").parse()?;
            let fwd = crate::netns::TcpForwarder::start(ns, target)?;
            self.server = format!("https://{}", fwd.local_addr());
            self.forwarder = Some(fwd);
        }
        std::fs::write(&self.kubeconfig, self.kubeconfig_yaml(&pki))?;
        self.pki = Some(pki);
        self.wait_ready().await?;
        if opts.components {
            self.start_components(&pki_dir, api_port)?;
        }
        Ok(())
    }

    /// kube-controller-manager and kube-scheduler, each as its own user.
    fn start_components(&self, pki_dir: &Path, api_port: u16) -> Result<()> {
        let server = format!("https://127.0.0.1:{api_port}");
        let pki_path = |f: &str| pki_dir.join(f).display().to_string();
        let kcm_kubeconfig =
            self.write_kubeconfig("kube-controller-manager", &server, "system:kube-controller-manager", None)?;
        let mut kcm = self.command(self.bins.join("kube-controller-manager"));
        kcm.args([
            format!("--kubeconfig={}", kcm_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
            // carve owns pod CIDRs: no node IPAM, no allocate-node-cidrs.
            "--controllers=*,-node-ipam-controller".to_string(),
            "--allocate-node-cidrs=false".to_string(),
            format!("--service-account-private-key-file={}", pki_path("sa.key")),
            format!("--root-ca-file={}", pki_path("ca.crt")),
            "--use-service-account-credentials=true".to_string(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            // Pods on a node that stops answering move within seconds.
            "--node-monitor-grace-period=20s".to_string(),
            "--v=1".to_string(),
        ]);
        self.keeper.spawn("kube-controller-manager", kcm, self.dir.join("kube-controller-manager.log"))?;

        let sched_kubeconfig = self.write_kubeconfig("kube-scheduler", &server, "system:kube-scheduler", None)?;
        let mut sched = self.command(self.bins.join("kube-scheduler"));
        sched.args([
            format!("--kubeconfig={}", sched_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", sched_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", sched_kubeconfig.display()),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            "--v=1".to_string(),
        ]);
        self.keeper.spawn("kube-scheduler", sched, self.dir.join("kube-scheduler.log"))?;
        Ok(())
    }

    /// Writes `<dir>/<name>.kubeconfig` for user `user` (group `group`) with
    /// a fresh client certificate, pointing at `server`.
    pub fn write_kubeconfig(&self, name: &str, server: &str, user: &str, group: Option<&str>) -> Result<PathBuf> {
        let pki = self.pki.as_ref().context("control plane has no PKI yet")?;
        let cert = pki.client_cert(user, group)?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig_yaml(server, &pki.ca_pem, &cert.cert_pem, &cert.key_pem))?;
        Ok(path)
    }

    /// The CA certificate file (kubelets verify clients with it).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    fn kubeconfig_yaml(&self, pki: &Pki) -> String {
        kubeconfig_yaml(&self.server, &pki.ca_pem, &pki.admin_cert_pem, &pki.admin_key_pem)
    }

    async fn wait_ready(&self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err;
        loop {
            for name in ["etcd", "kube-apiserver"] {
                if let Some(status) = self.keeper.exited(name) {
                    bail!("{name} exited early ({status}); last log lines:\n{}", self.log_tail(name, 30));
                }
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last_err = body,
                Err(e) => last_err = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}: {last_err}\nlast log lines:\n{}",
                    self.log_tail("kube-apiserver", 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An admin client (system:masters).
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Time from `start` until `/readyz` answered `ok`.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The run directory (data, certs, logs); removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// A kubectl command pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig).current_dir(repo_root());
        cmd
    }

    /// Runs kubectl and returns its stdout, failing with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output().context("run kubectl")?;
        check(&out, &format!("kubectl {}", args.join(" ")))
    }

    /// Runs kubectl with `stdin` piped in (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<Output> {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// `kubectl apply -f crds/` and wait until both CRDs are served.
    pub fn install_crds(&self) -> Result<()> {
        self.kubectl_ok(&["apply", "-f", "crds/"])?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/podcidrs.carve.dev",
            "crd/nodenetworkconfigs.carve.dev",
        ])?;
        Ok(())
    }

    /// Runs `cmd` as a supervised child with its log in the run directory.
    pub fn spawn(&self, name: &str, cmd: Command) -> Result<u32> {
        self.keeper.spawn(name, cmd, self.dir.join(format!("{name}.log")))
    }

    /// Stops a child started with `spawn` (or etcd / kube-apiserver).
    pub fn stop_process(&self, name: &str) -> Option<std::process::ExitStatus> {
        self.keeper.stop(name)
    }

    /// The exit status of a child started with `spawn` that has exited, without waiting.
    pub fn exited(&self, name: &str) -> Option<std::process::ExitStatus> {
        self.keeper.exited(name)
    }

    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.keeper.stop_all();
        if std::env::var_os("CARVE_E2E_KEEP").is_some() {
            eprintln!("carve-e2e: keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A kubeconfig with one cluster, one client-certificate user, one context.
fn kubeconfig_yaml(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: carve-local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: carve-user\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: carve-local\n  context:\n    cluster: carve-local\n    user: carve-user\ncurrent-context: carve-local\n",
        ca = B64.encode(ca_pem),
        cert = B64.encode(cert_pem),
        key = B64.encode(key_pem),
    )
}

pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    carve_cli::kube_client(Some(path)).await
}

fn check(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
