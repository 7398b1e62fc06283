//! Figures for the local control plane: how long getting the binaries takes
//! (warm cache) and how long etcd + kube-apiserver take to answer /readyz.

use std::time::{Duration, Instant};

use carve_e2e::ControlPlane;

const STARTS: usize = 5;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let status = std::process::Command::new("bash")
        .arg(carve_e2e::repo_root().join("e2e/scripts/control-plane-bins.sh"))
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "control-plane-bins.sh failed");
    let bins = started.elapsed();

    let mut ready: Vec<Duration> = Vec::new();
    for _ in 0..STARTS {
        let cp = ControlPlane::start().await?;
        ready.push(cp.ready_after());
    }
    ready.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("control plane (Kubernetes v1.35.4, etcd v3.6.16)");
    println!("  binaries, warm cache            {:>8.1} ms", ms(bins));
    println!(
        "  start to /readyz, {STARTS} starts      min {:>7.0} ms  median {:>7.0} ms  max {:>7.0} ms",
        ms(ready[0]),
        ms(ready[STARTS / 2]),
        ms(ready[STARTS - 1])
    );
    Ok(())
}
