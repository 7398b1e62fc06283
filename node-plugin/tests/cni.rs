//! carve-cni (with carve-ipam) driven by cnitool, the reference CNI client, in
//! network namespaces the test creates: a "node" namespace plays the host
//! (cnitool runs inside it), a "pod" namespace is wired by carve-cni. Needs
//! root (CI runs as root); traffic only between those namespaces.

mod cni_support;

use cni_support::*;
use serde_json::{Value, json};

const CNI: &str = env!("CARGO_BIN_EXE_carve-cni");
const IPAM: &str = env!("CARGO_BIN_EXE_carve-ipam");

/// A node namespace with a CNI setup: state file, bin and conf dirs, a conflist.
struct Node {
    dirs: CniDirs,
    ns: NetNs,
    net: String,
    state: std::path::PathBuf,
    data: std::path::PathBuf,
}

/// The node's own address (on lo of the node namespace).
const NODE_IP: &str = "192.168.251.1";

impl Node {
    fn new(cidr: &str, gateway: &str, version: &str, with_portmap: bool) -> Self {
        assert!(is_root(), "carve-cni tests need root (network namespaces)");
        let dirs = CniDirs::new();
        let state = dirs.root.path().join("run/node-state.json");
        let data = dirs.root.path().join("ipam");
        write_state(&state, cidr, gateway, 1400);
        let net = format!("cnit-cni-{}", unique());
        let mut plugins = vec![json!({
            "type": "carve-cni",
            "logLevel": "debug",
            "logFile": dirs.root.path().join("carve-cni.log"),
            "stateFile": state,
            "ipam": { "type": "carve-ipam", "stateFile": state, "dataDir": data },
        })];
        if with_portmap {
            plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
        }
        dirs.write_conflist(&net, version, Value::Array(plugins));
        let ns = NetNs::new("node");
        ns.exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
        Node { dirs, ns, net, state, data }
    }

    fn cnitool(&self, cmd: &str, pod: &NetNs) -> (bool, String, String) {
        self.dirs.cnitool(&self.ns, cmd, &self.net, &pod.path(), "eth0")
    }

    fn add(&self, pod: &NetNs) -> Value {
        let (ok, out, err) = self.cnitool("add", pod);
        assert!(ok, "cnitool add failed: {out} {err}\nlog: {}", self.log());
        serde_json::from_str(&out).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dirs.root.path().join("carve-cni.log")).unwrap_or_default()
    }

    /// Runs carve-cni directly (in the node namespace) with `conf` as the single plugin config.
    fn direct(&self, command: &str, container: &str, netns: &str, conf: &Value) -> (i32, Value) {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns.name, CNI])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", netns)
            .env("CNI_PATH", self.dirs.bin())
            .env_remove("CARVE_STATE_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        parse_output(&child.wait_with_output().unwrap())
    }

    fn plugin_conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": self.net, "type": "carve-cni", "stateFile": self.state,
            "ipam": { "type": "carve-ipam", "stateFile": self.state, "dataDir": self.data },
        })
    }
}

fn default_routes(pod: &NetNs) -> Vec<Value> {
    pod.ip_json(&["route", "show", "default"]).as_array().cloned().unwrap_or_default()
}

#[test]
fn add_wires_the_pod_check_del_and_readd() {
    let node = Node::new("10.79.0.0/24", "10.79.0.1", "1.1.0", false);
    let pod = NetNs::new("pod");
    let result = node.add(&pod);
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["address"], "10.79.0.2/32", "{result}");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.path());
    let host_veth = result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(host_veth.starts_with("carve") && host_veth.len() == 15, "{host_veth}");

    // What a user sees in the pod: the address, a default route, the MTU of the state file.
    assert_eq!(addrs(&pod, "eth0"), vec!["10.79.0.2/32".to_owned()]);
    let routes = default_routes(&pod);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["gateway"], "169.254.1.1");
    assert_eq!(routes[0]["dev"], "eth0");
    assert_eq!(pod.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1400);
    // On the node: the host veth is up with a /32 route to the pod.
    let host_routes = node.ns.ip_json(&["route", "show", "10.79.0.2/32"]);
    assert_eq!(host_routes[0]["dev"], host_veth.as_str(), "{host_routes}");
    // Traffic both ways.
    assert!(node.ns.ping("10.79.0.2"), "node cannot ping the pod");
    assert!(pod.ping(NODE_IP), "pod cannot ping the node");

    // CHECK passes, then fails once the pod's address is gone.
    let (ok, _, err) = node.cnitool("check", &pod);
    assert!(ok, "CHECK after ADD: {err}\nlog: {}", node.log());
    pod.exec(&["ip", "addr", "del", "10.79.0.2/32", "dev", "eth0"]);
    let (ok, _, err) = node.cnitool("check", &pod);
    assert!(!ok, "CHECK passed without the pod address");
    assert!(err.contains("10.79.0.2"), "CHECK error does not name the address: {err}");

    // DEL: veth and address gone, twice is fine, the address is reused.
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL: {err}");
    assert!(!pod.try_exec(&["ip", "link", "show", "eth0"]), "eth0 still in the pod");
    assert!(!node.ns.try_exec(&["ip", "link", "show", &host_veth]), "host veth still there");
    assert!(stored(&node.data).is_empty());
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "second DEL: {err}");
    let again = node.add(&pod);
    assert_eq!(again["ips"][0]["address"], "10.79.0.2/32");
    assert!(node.ns.ping("10.79.0.2"));

    // DEL after the pod's netns is gone still succeeds and frees the address.
    let path = pod.path();
    pod.delete();
    let (code, out) = node.direct("DEL", &stored(&node.data)[0].1, &path, &node.plugin_conf("1.1.0"));
    assert_eq!((code, out), (0, Value::Null));
    assert!(stored(&node.data).is_empty());
    assert!(!node.ns.try_exec(&["ip", "link", "show", &host_veth]));
}

#[test]
fn dual_stack_pod_gets_a_128_and_a_fe80_1_default_route() {
    let node = Node::new("10.79.6.0/24", "10.79.6.1", "1.1.0", false);
    write_state_dual(&node.state, ("10.79.6.0/24", "10.79.6.1"), ("fd79:6::/120", "fd79:6::1"), 1400);
    node.ns.exec(&["ip", "addr", "add", "fd79:ffff::1/128", "dev", "lo"]);
    let pod = NetNs::new("pod");
    let result = node.add(&pod);
    assert_eq!(result["ips"][0]["address"], "10.79.6.2/32", "{result}");
    assert_eq!(result["ips"][1]["address"], "fd79:6::2/128", "{result}");
    assert_eq!(result["ips"][1]["gateway"], "fe80::1");
    assert_eq!(addrs(&pod, "eth0"), vec!["10.79.6.2/32".to_owned(), "fd79:6::2/128".to_owned()]);
    let v6 = pod.ip_json(&["-6", "route", "show", "default"]);
    assert_eq!(v6[0]["gateway"], "fe80::1", "{v6}");
    assert!(node.ns.ping("fd79:6::2"), "node cannot ping the pod over IPv6");
    assert!(pod.ping("fd79:ffff::1"), "pod cannot ping the node over IPv6");
    assert!(pod.ping(NODE_IP), "pod cannot ping the node over IPv4");
    assert!(node.cnitool("check", &pod).0, "CHECK of a dual-stack pod");
    assert!(node.cnitool("del", &pod).0);
    assert!(stored(&node.data).is_empty());
}

#[test]
fn two_pods_get_distinct_addresses_and_answer_in_old_versions() {
    let node = Node::new("10.79.1.0/24", "10.79.1.1", "0.4.0", false);
    let a = NetNs::new("poda");
    let b = NetNs::new("podb");
    let ra = node.add(&a);
    let rb = node.add(&b);
    assert_eq!(ra["cniVersion"], "0.4.0");
    assert_eq!(ra["ips"][0]["version"], "4", "0.4.0 results carry the IP version: {ra}");
    assert_eq!(ra["ips"][0]["address"], "10.79.1.2/32");
    assert_eq!(rb["ips"][0]["address"], "10.79.1.3/32");
    assert!(a.ping(NODE_IP) && b.ping(NODE_IP));
    assert!(node.ns.ping("10.79.1.2") && node.ns.ping("10.79.1.3"));
    for p in [&a, &b] {
        assert!(node.cnitool("del", p).0);
    }
}

#[test]
fn chained_with_the_reference_portmap_plugin() {
    // Debian bookworm's portmap speaks CNI up to 1.0.0.
    let node = Node::new("10.79.2.0/24", "10.79.2.1", "1.0.0", true);
    let pod = NetNs::new("pod");
    let result = node.add(&pod);
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["ips"][0]["address"], "10.79.2.2/32");
    assert!(node.ns.ping("10.79.2.2"));
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL through the chain: {err}");
    assert!(stored(&node.data).is_empty());
}

#[test]
fn gc_frees_a_leaked_allocation_and_keeps_valid_ones() {
    let node = Node::new("10.79.3.0/24", "10.79.3.1", "1.1.0", false);
    let pod = NetNs::new("pod");
    node.add(&pod);
    let pod_owner = stored(&node.data)[0].1.clone();
    // A leak: an address allocated for a container that no longer exists.
    let (code, out) = run_plugin(IPAM, "ADD", "leaked-container", "eth0", "/x", &node.plugin_conf("1.1.0"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(stored(&node.data).len(), 2);
    let mut conf = node.plugin_conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{ "containerID": pod_owner, "ifname": "eth0" }]);
    let (code, out) = node.direct("GC", "", "", &conf);
    assert_eq!(code, 0, "{out}");
    let left: Vec<String> = stored(&node.data).into_iter().map(|(_, c, _)| c).collect();
    assert_eq!(left, vec![pod_owner]);
    assert!(node.ns.ping("10.79.3.2"), "GC touched a valid pod");
    assert!(node.cnitool("del", &pod).0);
}

#[test]
fn status_is_50_until_the_state_file_exists() {
    let node = Node::new("10.79.4.0/24", "10.79.4.1", "1.1.0", false);
    let pod = NetNs::new("pod");
    let (ok, _, err) = node.cnitool("status", &pod);
    assert!(ok, "STATUS with a state file: {err}");
    std::fs::remove_file(&node.state).unwrap();
    let (code, out) = node.direct("STATUS", "", "", &node.plugin_conf("1.1.0"));
    assert_eq!(code, 1);
    assert_eq!(out["code"], 50, "{out}");
    assert_eq!(out["cniVersion"], "1.1.0");
    assert!(out["msg"].as_str().unwrap().contains("node-state.json"), "{out}");
    let (ok, _, err) = node.cnitool("status", &pod);
    assert!(!ok && err.contains("node-state.json"), "cnitool status: {err}");
    // ADD before the agent wrote the state: try again later, and no address taken.
    let (ok, _, err) = node.cnitool("add", &pod);
    assert!(!ok, "ADD without state succeeded");
    assert!(err.contains("node-state.json"), "{err}");
    assert!(stored(&node.data).is_empty());
    assert!(!pod.try_exec(&["ip", "link", "show", "eth0"]));
}

#[test]
fn failed_add_rolls_back_the_allocation() {
    let node = Node::new("10.79.5.0/24", "10.79.5.1", "1.1.0", false);
    let pod = NetNs::new("pod");
    // eth0 already exists in the pod: ADD must fail and release the address.
    pod.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"]);
    let (ok, _, err) = node.cnitool("add", &pod);
    assert!(!ok, "ADD over an existing eth0 succeeded");
    assert!(err.contains("eth0"), "{err}");
    assert!(stored(&node.data).is_empty(), "address leaked: {:?}", stored(&node.data));
}

#[test]
fn version_and_protocol_errors() {
    let out = std::process::Command::new(CNI).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("carve-cni "));
    let out = std::process::Command::new(CNI).env("CNI_COMMAND", "VERSION").output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["supportedVersions"][0], "0.3.0");
    // Empty stdin: code 6 (cannot decode), as JSON on stdout.
    let out = std::process::Command::new(CNI)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_PATH", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (code, v) = parse_output(&out);
    assert_eq!(code, 1);
    assert_eq!(v["code"], 6, "empty stdin does not decode: {v}");
    // Missing CNI_NETNS on ADD: code 4 naming it.
    let (code, v) =
        run_plugin(CNI, "ADD", "x", "eth0", "", &json!({"cniVersion": "1.0.0", "name": "n", "type": "carve-cni"}));
    assert_eq!((code, v["code"].as_u64()), (1, Some(4)), "{v}");
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"));
    let (code, v) = run_plugin(
        CNI,
        "ADD",
        "x",
        "eth0",
        "/var/run/netns/none",
        &json!({"cniVersion": "1.0.0", "name": "n", "type": "carve-cni"}),
    );
    assert_eq!((code, v["code"].as_u64()), (1, Some(7)), "no ipam.type: {v}");
}
