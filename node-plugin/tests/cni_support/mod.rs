//! Shared helpers for the carve-ipam / carve-cni tests: temp dirs, a node
//! state file, network namespaces that are always deleted, plugin runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use carve_crds::{IpFamily, NodeBlock, PoolMode};
use carve_node_plugin::state::{self, NodeState};
use carve_testkit::cni::{Cnitool, PluginCall};
pub use carve_testkit::netns::Netns;
use serde_json::Value;

pub mod node;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique suffix for this process and call.
pub fn unique() -> String {
    format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst))
}

pub use carve_testkit::temp_dir;
pub use tempfile::TempDir;

/// Writes a node state file with one IPv4 block (and its gateway, the first address).
pub fn write_state(path: &Path, cidr: &str, gateway: &str, mtu: u32) {
    let st = NodeState {
        node: "node-test".into(),
        mode: PoolMode::Overlay,
        blocks: vec![NodeBlock {
            cidr: cidr.into(),
            family: IpFamily::IPv4,
            gateway: Some(gateway.into()),
            allocation_id: None,
        }],
        strategy: Default::default(),
        reserved_ips: vec![],
        cluster_pod_cidrs: vec![cidr.into()],
        non_masquerade_cidrs: vec![],
        mtu,
        node_ip: "192.0.0.1".into(),
    };
    state::write(path, &st).unwrap();
}

/// Writes a dual-stack node state file: one IPv4 and one IPv6 block.
pub fn write_state_dual(path: &Path, v4: (&str, &str), v6: (&str, &str), mtu: u32) {
    let block = |(cidr, gw): (&str, &str), family| NodeBlock {
        cidr: cidr.into(),
        family,
        gateway: Some(gw.into()),
        allocation_id: None,
    };
    let st = NodeState {
        node: "node-test".into(),
        mode: PoolMode::Overlay,
        blocks: vec![block(v4, IpFamily::IPv4), block(v6, IpFamily::IPv6)],
        strategy: Default::default(),
        reserved_ips: vec![],
        cluster_pod_cidrs: vec![v4.0.into(), v6.0.into()],
        non_masquerade_cidrs: vec![],
        mtu,
        node_ip: "192.0.0.1".into(),
    };
    state::write(path, &st).unwrap();
}

/// Runs a plugin binary once with CNI env vars; returns status and stdout JSON (Null when empty).
pub fn run_plugin(bin: &str, command: &str, container: &str, ifname: &str, netns: &str, conf: &Value) -> (i32, Value) {
    let out = spawn_plugin(bin, command, container, ifname, netns, conf).wait_with_output().unwrap();
    parse_output(&out)
}

pub fn spawn_plugin(
    bin: &str,
    command: &str,
    container: &str,
    ifname: &str,
    netns: &str,
    conf: &Value,
) -> std::process::Child {
    PluginCall::new(Path::new(bin), command).attachment(container, ifname, netns).spawn(conf)
}

pub fn parse_output(out: &Output) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"))
    };
    (out.status.code().unwrap_or(-1), v)
}

/// The allocations file of a carve-ipam data dir, as (ip, containerId, ifname).
pub fn stored(data_dir: &Path) -> Vec<(String, String, String)> {
    let body = match std::fs::read(data_dir.join("allocations.json")) {
        Ok(b) => b,
        Err(_) => return vec![],
    };
    let v: Value = serde_json::from_slice(&body).expect("store parses");
    v["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["ip"].as_str().unwrap().to_owned(),
                e["containerId"].as_str().unwrap().to_owned(),
                e["ifname"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// True when running as root (netns tests need it; CI runs as root).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Global addresses (as "ip/prefix") on `dev` in `ns` (link-local ones left out).
pub fn addrs(ns: &Netns, dev: &str) -> Vec<String> {
    ns.ip_json(&["addr", "show", "dev", dev])
        .unwrap()
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The control plane bin dir (cnitool, cnitool-v1.1.2, cni-plugins/), built once and cached.
pub fn control_plane_bin_dir() -> PathBuf {
    carve_testkit::control_plane_bins().expect("the control plane binaries")
}

/// The current cnitool (libcni >= 1.2: reads a conflist's `cniVersions`, knows CNI 1.1.0).
pub fn cnitool() -> PathBuf {
    control_plane_bin_dir().join("cnitool")
}

/// cnitool built from libcni v1.1.2, the one containerd 1.6 and 1.7 embed:
/// results up to CNI 1.0.0, `cniVersions` ignored.
pub fn cnitool_v1_1_2() -> PathBuf {
    control_plane_bin_dir().join("cnitool-v1.1.2")
}

/// Where libcni caches a result of `cnitool` for `net`, the pod netns `netns` and `ifname`:
/// cnitool's container id is `cnitool-` and the first 10 bytes of SHA-512(netns), in hex.
fn cached_result(net: &str, netns: &str, ifname: &str) -> Option<PathBuf> {
    use std::io::Write;
    let mut sum = Command::new("sha512sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().ok()?;
    sum.stdin.take()?.write_all(netns.as_bytes()).ok()?;
    let out = String::from_utf8(sum.wait_with_output().ok()?.stdout).ok()?;
    Some(Path::new("/var/lib/cni/results").join(format!("{net}-cnitool-{}-{ifname}", out.get(..20)?)))
}

/// A CNI bin dir (carve-cni, carve-ipam and the reference plugins) and a conf dir.
pub struct CniDirs {
    pub root: TempDir,
    networks: std::sync::Mutex<Vec<String>>,
    /// (network, pod netns, ifname) cnitool ran for, on networks other tests may share.
    attachments: std::sync::Mutex<Vec<(String, String, String)>>,
}

impl Drop for CniDirs {
    /// Removes what cnitool's libcni cached under /var/lib/cni for our networks and attachments.
    fn drop(&mut self) {
        let attachments = self.attachments.lock().map(|a| a.clone()).unwrap_or_default();
        for (net, netns, ifname) in attachments {
            if let Some(path) = cached_result(&net, &netns, &ifname) {
                let _ = std::fs::remove_file(path);
            }
        }
        let nets = self.networks.lock().map(|n| n.clone()).unwrap_or_default();
        let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if nets.iter().any(|n| name.starts_with(&format!("{n}-"))) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl CniDirs {
    pub fn new() -> Self {
        let root = temp_dir("cnidirs");
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.path().join("conf")).unwrap();
        for (name, src) in
            [("carve-cni", env!("CARGO_BIN_EXE_carve-cni")), ("carve-ipam", env!("CARGO_BIN_EXE_carve-ipam"))]
        {
            std::os::unix::fs::symlink(src, bin.join(name)).unwrap();
        }
        for name in ["bridge", "portmap", "host-local", "loopback"] {
            let src = Path::new("/usr/lib/cni").join(name);
            if src.exists() {
                std::os::unix::fs::symlink(&src, bin.join(name)).unwrap();
            }
        }
        CniDirs { root, networks: Default::default(), attachments: Default::default() }
    }
    pub fn bin(&self) -> PathBuf {
        self.root.path().join("bin")
    }
    pub fn conf(&self) -> PathBuf {
        self.root.path().join("conf")
    }

    /// Writes `<name>.conflist` with `plugins`.
    pub fn write_conflist(&self, name: &str, version: &str, plugins: Value) {
        self.networks.lock().unwrap().push(name.to_owned());
        let v = serde_json::json!({ "cniVersion": version, "name": name, "plugins": plugins });
        std::fs::write(self.conf().join(format!("{name}.conflist")), v.to_string()).unwrap();
    }

    /// `cnitool <cmd> <net> <netns>`, run inside `host` (the "node" namespace);
    /// returns success, stdout and stderr.
    pub fn cnitool(&self, host: &Netns, cmd: &str, net: &str, netns: &str, ifname: &str) -> (bool, String, String) {
        self.run_cnitool(&cnitool(), host, cmd, net, netns, ifname)
    }

    /// [`CniDirs::cnitool`] with another cnitool binary (e.g. [`cnitool_v1_1_2`]).
    pub fn run_cnitool(
        &self,
        tool: &Path,
        host: &Netns,
        cmd: &str,
        net: &str,
        netns: &str,
        ifname: &str,
    ) -> (bool, String, String) {
        let attachment = (net.to_owned(), netns.to_owned(), ifname.to_owned());
        let mut attachments = self.attachments.lock().unwrap();
        if !attachments.contains(&attachment) {
            attachments.push(attachment);
        }
        drop(attachments);
        let (conf, bin) = (self.conf(), self.bin());
        let tool = Cnitool { ns: &host.name, tool, conf_dir: &conf, cni_path: bin.as_os_str() };
        let out = tool.run(cmd, net, Path::new(netns), Some(ifname)).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
