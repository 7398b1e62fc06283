//! A "node" network namespace with carve-cni and carve-ipam set up: state
//! file, CNI dirs, a conflist, and the ways the tests run a CNI call on it.

use std::path::Path;

use serde_json::{Value, json};

use super::*;

/// A node namespace with a CNI setup: state file, bin and conf dirs, a conflist.
pub struct Node {
    pub dirs: CniDirs,
    pub ns: Netns,
    pub net: String,
    pub state: std::path::PathBuf,
    pub data: std::path::PathBuf,
}

/// The node's own address (on lo of the node namespace).
pub const NODE_IP: &str = "192.168.251.1";

impl Node {
    /// The node namespace, state file and CNI dirs; no conflist yet.
    pub fn bare(cidr: &str, gateway: &str, net: String) -> Self {
        assert!(is_root(), "carve-cni tests need root (network namespaces)");
        let dirs = CniDirs::new();
        let state = dirs.root.path().join("run/node-state.json");
        let data = dirs.root.path().join("ipam");
        write_state(&state, cidr, gateway, 1400);
        let ns = Netns::unique("node").unwrap();
        ns.exec("ip", &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]).unwrap();
        Node { dirs, ns, net, state, data }
    }

    pub fn new(cidr: &str, gateway: &str, version: &str, with_portmap: bool) -> Self {
        let node = Self::bare(cidr, gateway, format!("cnit-cni-{}", unique()));
        let mut plugins = vec![json!({
            "type": "carve-cni",
            "logLevel": "debug",
            "logFile": node.dirs.root.path().join("carve-cni.log"),
            "stateFile": node.state,
            "ipam": { "type": "carve-ipam", "stateFile": node.state, "dataDir": node.data },
        })];
        if with_portmap {
            plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
        }
        node.dirs.write_conflist(&node.net, version, Value::Array(plugins));
        node
    }

    pub fn cnitool(&self, cmd: &str, pod: &Netns) -> (bool, String, String) {
        self.cnitool_with(&cnitool(), cmd, pod)
    }

    pub fn cnitool_with(&self, tool: &Path, cmd: &str, pod: &Netns) -> (bool, String, String) {
        self.dirs.run_cnitool(tool, &self.ns, cmd, &self.net, pod.path().to_str().unwrap(), "eth0")
    }

    pub fn add(&self, pod: &Netns) -> Value {
        let (ok, out, err) = self.cnitool("add", pod);
        assert!(ok, "cnitool add failed: {out} {err}\nlog: {}", self.log());
        serde_json::from_str(&out).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dirs.root.path().join("carve-cni.log")).unwrap_or_default()
    }

    /// Runs carve-cni directly (in the node namespace) with `conf` as the single plugin config.
    pub fn direct(&self, command: &str, container: &str, netns: &str, conf: &Value) -> (i32, Value) {
        let plugin = Path::new(env!("CARGO_BIN_EXE_carve-cni"));
        let call = PluginCall::in_netns(&self.ns.name, plugin, command).attachment(container, "eth0", netns);
        parse_output(&call.env("CNI_PATH", self.dirs.bin()).output(conf))
    }

    pub fn plugin_conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": self.net, "type": "carve-cni", "stateFile": self.state,
            "ipam": { "type": "carve-ipam", "stateFile": self.state, "dataDir": self.data },
        })
    }
}
