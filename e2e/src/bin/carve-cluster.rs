//! `carve-cluster`: the local control plane from the shell.
//!
//! `up` starts `run` in the background and returns once /readyz answers;
//! `down` stops it. `run` stays in the foreground until SIGINT or SIGTERM,
//! then stops etcd and kube-apiserver and removes their data.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use carve_e2e::ControlPlane;
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

async fn run(kubeconfig: &Path) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cp = tokio::select! {
        cp = ControlPlane::start() => cp?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    if let Some(parent) = kubeconfig.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = kubeconfig.with_extension("tmp");
    std::fs::copy(cp.kubeconfig(), &tmp)?;
    std::fs::rename(&tmp, kubeconfig)?;
    println!("control plane ready in {:.1}s at {}", cp.ready_after().as_secs_f64(), cp.server());
    println!("data in {}", cp.dir().display());
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    println!("stopping");
    let _ = std::fs::remove_file(kubeconfig);
    drop(cp);
    Ok(())
}

fn up(kubeconfig: &Path) -> Result<()> {
    if let Some(pid) = running_pid(kubeconfig) {
        println!("already running (pid {pid}); kubeconfig at {}", kubeconfig.display());
        return Ok(());
    }
    let dir = kubeconfig.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(kubeconfig);
    // Build (or find) the binaries in the foreground so their progress is visible.
    carve_e2e::control_plane_bins()?;
    let log = std::fs::File::create(log_file(kubeconfig))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
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
    let deadline = Instant::now() + Duration::from_secs(240);
    while !kubeconfig.exists() {
        if kill(Pid::from_raw(pid), None).is_err() || Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let log = std::fs::read_to_string(log_file(kubeconfig)).unwrap_or_default();
            bail!("control plane did not come up; {}:\n{log}", log_file(kubeconfig).display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let abs = std::fs::canonicalize(kubeconfig)?;
    println!("control plane up (pid {pid}).");
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
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(pid_file(kubeconfig));
    let _ = std::fs::remove_file(kubeconfig);
    println!("control plane stopped");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up => up(&cli.kubeconfig),
        Cmd::Down => down(&cli.kubeconfig),
        Cmd::Run => tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(&cli.kubeconfig)),
    }
}
