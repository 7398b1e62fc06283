//! Named network namespaces for the tests and benchmarks: created with `ip
//! netns add`, deleted on drop (also on panic). Entering one from Rust code
//! (sockets) needs `setns`, which is the node plugin's job
//! (`carve_node_plugin::netlink::in_netns`; carve-e2e's `NetnsExt` wraps it).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A named network namespace, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` (deleting a leftover of the same name first) with `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace named `t<pid>-<n>-<tag>`: unique to this call, so tests
    /// running at once never share one.
    pub fn unique(tag: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self::new(&format!("t{}-{n}-{tag}", std::process::id()))
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <name> <args>`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n <name> -j <args>`, parsed (an empty answer is `[]`).
    pub fn ip_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        parse_json(&self.ip(&all)?, "ip", &all)
    }

    /// `ip netns exec <name> <program> <args>`, its JSON output parsed (an empty answer is `[]`).
    pub fn exec_json(&self, program: &str, args: &[&str]) -> Result<Value> {
        parse_json(&self.exec(program, args)?, program, args)
    }

    /// `ip netns exec <name> <program> <args>`; fails with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// One `ping -c1 -W1`, retried up to `tries` times.
    pub fn ping(&self, dst: &str, tries: usize) -> bool {
        (0..tries).any(|_| self.exec("ping", &["-c", "1", "-W", "1", dst]).is_ok())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A tool's JSON answer (an empty one is `[]`).
fn parse_json(out: &str, program: &str, args: &[&str]) -> Result<Value> {
    if out.trim().is_empty() {
        return Ok(Value::Array(vec![]));
    }
    serde_json::from_str(out).with_context(|| format!("{program} {} output {out:?}", args.join(" ")))
}

/// Runs `program args`, returning stdout; fails with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
