//! Traffic figures between network namespaces: iperf3 throughput, sockperf
//! ping-pong latency and the machine's CPU time per Gbit, for
//! `carve-bench-datapath`. The tools are Debian's, run inside a node's or a
//! pod's network namespace with `nsenter`.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where a tool runs: a node (its network and mount namespaces, through the
/// node's holder process) or a pod (only its network namespace: the tools are
/// the host's).
#[derive(Debug, Clone, Copy)]
pub enum Place {
    Node { holder: u32 },
    Pod { pid: u32 },
}

impl Place {
    pub fn command(self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        match self {
            Place::Node { holder } => cmd.arg("-t").arg(holder.to_string()).args(["-m", "-n"]),
            Place::Pod { pid } => cmd.arg("-t").arg(pid.to_string()).arg("-n"),
        };
        cmd.arg("--").arg(program);
        cmd
    }

    /// iperf3 and sockperf servers listening on every address of the place.
    pub fn serve(self) -> Result<Servers> {
        let spawn = |mut cmd: Command| cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let iperf = spawn({
            let mut c = self.command("iperf3");
            c.args(["-s", "-p", &IPERF_PORT.to_string()]);
            c
        })
        .context("iperf3 -s (install Debian's iperf3: make prereqs)")?;
        let sockperf = spawn({
            let mut c = self.command("sockperf");
            c.args(["sr", "--tcp", "-i", "0.0.0.0", "-p", &SOCKPERF_PORT.to_string()]);
            c
        })
        .context("sockperf sr (install Debian's sockperf: make prereqs)")?;
        Ok(Servers { children: vec![iperf, sockperf] })
    }

    /// TCP throughput to `server` with `streams` parallel streams for
    /// `seconds`: (bits per second received, machine CPU seconds per Gbit).
    pub fn throughput(self, server: &str, streams: usize, seconds: u32) -> Result<(f64, f64)> {
        let busy_before = cpu_busy_seconds()?;
        let out = self
            .command("iperf3")
            .args(["-c", server, "-p", &IPERF_PORT.to_string(), "-J", "-P", &streams.to_string()])
            .args(["-t", &seconds.to_string(), "--connect-timeout", "3000"])
            .output()
            .context("iperf3 -c")?;
        let busy = cpu_busy_seconds()? - busy_before;
        let (bps, secs) = parse_iperf3(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("iperf3 to {server}: {}", String::from_utf8_lossy(&out.stderr)))?;
        let gbit = bps * secs / 1e9;
        Ok((bps, if gbit > 0.0 { busy / gbit } else { f64::NAN }))
    }

    /// Request/response latency to `server`: sockperf ping-pong over TCP for
    /// `seconds`, (p50, p99) of the half round trip in µs.
    pub fn latency(self, server: &str, seconds: u32) -> Result<(f64, f64)> {
        let out = self
            .command("sockperf")
            .args(["pp", "--tcp", "-i", server, "-p", &SOCKPERF_PORT.to_string(), "-t", &seconds.to_string()])
            .output()
            .context("sockperf pp")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        parse_sockperf(&text).with_context(|| format!("sockperf to {server}: {text}"))
    }
}

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;

/// Server processes, killed when dropped.
pub struct Servers {
    children: Vec<Child>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// iperf3's JSON report: (bits per second the receiver saw, seconds).
pub fn parse_iperf3(json: &str) -> Result<(f64, f64)> {
    let v: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["seconds"].as_f64()) {
        (Some(bps), Some(secs)) => Ok((bps, secs)),
        _ => bail!("iperf3 JSON without end.sum_received"),
    }
}

/// sockperf ping-pong's summary: (p50, p99) in µs.
pub fn parse_sockperf(text: &str) -> Result<(f64, f64)> {
    let percentile = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (percentile("50.000"), percentile("99.000")) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("no percentiles in sockperf's output"),
    }
}

/// CPU seconds the whole machine has been busy (not idle, not waiting on I/O).
pub fn cpu_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // /proc/stat counts in USER_HZ, 100 on every Linux architecture carve builds for.
    busy_seconds(&stat, 100.0)
}

fn busy_seconds(stat: &str, ticks_per_second: f64) -> Result<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat without a cpu line")?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    if ticks.len() < 5 {
        bail!("short cpu line in /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = ticks.iter().sum::<f64>() - ticks[3] - ticks[4];
    Ok(busy / ticks_per_second)
}

/// The pid of a process of the pod with `uid`, found by its cgroup
/// (kubelet names the pod's cgroup `pod<uid>`, with `_` for `-` under systemd).
pub fn pod_pid(uid: &str) -> Result<u32> {
    let (dashed, underscored) = (format!("pod{uid}"), format!("pod{}", uid.replace('-', "_")));
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if cgroup.contains(&dashed) || cgroup.contains(&underscored) {
            return Ok(pid);
        }
    }
    bail!("no process in the cgroup of pod {uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_reports_what_the_receiver_saw() {
        let json = r#"{"end": {"sum_sent": {"bits_per_second": 2e10, "seconds": 5.0},
                               "sum_received": {"bits_per_second": 1.5e10, "seconds": 5.01}}}"#;
        assert_eq!(parse_iperf3(json).unwrap(), (1.5e10, 5.01));
        let refused = r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert!(parse_iperf3(refused).unwrap_err().to_string().contains("Connection refused"));
    }

    #[test]
    fn sockperf_percentiles_are_read_from_its_summary() {
        let text = "sockperf: ---> percentile 99.900 =   92.057\nsockperf: ---> percentile 99.000 =   36.634\n\
                    sockperf: ---> percentile 90.000 =   25.833\nsockperf: ---> percentile 50.000 =   20.195\n";
        assert_eq!(parse_sockperf(text).unwrap(), (20.195, 36.634));
        assert!(parse_sockperf("sockperf: Test ended").is_err());
    }

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 0 50 1000 20 5 5 0 0 0\ncpu0 50 0 25 500 10 2 3 0 0 0\n";
        assert_eq!(busy_seconds(stat, 100.0).unwrap(), 1.6);
    }
}
