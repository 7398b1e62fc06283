//! carve-cni (with carve-ipam) driven by cnitool, the reference CNI client, in
//! network namespaces the test creates: a "node" namespace plays the host
//! (cnitool runs inside it), a "pod" namespace is wired by carve-cni. Needs
//! root (CI runs as root); traffic only between those namespaces.

mod cni_support;

use std::path::Path;

use carve_node_plugin::agent::cni::{self as agent_cni, VersionReason};
use cni_support::node::{NODE_IP, Node};
use cni_support::*;
use serde_json::{Value, json};

const CNI: &str = env!("CARGO_BIN_EXE_carve-cni");
const IPAM: &str = env!("CARGO_BIN_EXE_carve-ipam");
const AGENT: &str = env!("CARGO_BIN_EXE_carve-agent");

/// carve-agent's side of a [`Node`]: its install step and conflist.
impl Node {
    /// The node as carve-agent sets it up: `carve-agent install-cni` (the image's
    /// portmap, containernetworking-plugins', replaces the node's Debian one when
    /// that cannot speak the conflist's highest version), then the conflist
    /// written by the agent's own code, `pin` being `--cni-version`.
    fn with_agent_conflist(cidr: &str, gateway: &str, pin: Option<&str>) -> Self {
        let node = Self::bare(cidr, gateway, agent_cni::NETWORK_NAME.into());
        let mut install = std::process::Command::new(AGENT);
        install
            .arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(node.dirs.bin())
            .arg("--cni-source-dir")
            .arg(Path::new(CNI).parent().unwrap())
            .arg("--portmap-source")
            .arg(control_plane_bin_dir().join("cni-plugins/portmap"))
            .env_remove("CARVE_CNI_VERSION");
        if let Some(pin) = pin {
            install.args(["--cni-version", pin]);
        }
        let out = install.output().unwrap();
        assert!(out.status.success(), "carve-agent install-cni: {}", String::from_utf8_lossy(&out.stderr));
        node.agent_writes_conflist(pin);
        node
    }

    /// The last step of carve-agent's reconcile: (re)write its conflist.
    fn agent_writes_conflist(&self, pin: Option<&str>) -> agent_cni::ConflistWrite {
        let conf = self.dirs.conf();
        agent_cni::write_conflist(&conf, agent_cni::DEFAULT_CONFLIST, &self.state, Some(&self.data), pin).unwrap()
    }

    fn agent_conflist(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dirs.conf().join(agent_cni::DEFAULT_CONFLIST)).unwrap()).unwrap()
    }

    /// ADD through `tool`, asserting it succeeds; the result.
    fn add_with(&self, tool: &Path, pod: &Netns) -> Value {
        let (ok, out, err) = self.cnitool_with(tool, "add", pod);
        assert!(ok, "{} add failed: {out} {err}\nconflist: {}", tool.display(), self.agent_conflist());
        serde_json::from_str(&out).unwrap()
    }

    /// CHECK and DEL through `tool`, asserting both succeed and leave nothing behind.
    fn check_and_del_with(&self, tool: &Path, pod: &Netns) {
        for cmd in ["check", "del"] {
            let (ok, out, err) = self.cnitool_with(tool, cmd, pod);
            assert!(ok, "{} {cmd} failed: {out} {err}\nconflist: {}", tool.display(), self.agent_conflist());
        }
        assert!(stored(&self.data).is_empty(), "address left: {:?}", stored(&self.data));
        assert!(pod.exec("ip", &["link", "show", "eth0"]).is_err(), "eth0 still in the pod");
    }
}

fn default_routes(pod: &Netns) -> Vec<Value> {
    pod.ip_json(&["route", "show", "default"]).unwrap().as_array().cloned().unwrap_or_default()
}

#[test]
fn add_wires_the_pod_check_del_and_readd() {
    let node = Node::new("10.79.0.0/24", "10.79.0.1", "1.1.0", false);
    let pod = Netns::unique("pod").unwrap();
    let result = node.add(&pod);
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["address"], "10.79.0.2/32", "{result}");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.path().to_str().unwrap());
    let host_veth = result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(host_veth.starts_with("carve") && host_veth.len() == 15, "{host_veth}");

    // What a user sees in the pod: the address, a default route, the MTU of the state file.
    assert_eq!(addrs(&pod, "eth0"), vec!["10.79.0.2/32".to_owned()]);
    let routes = default_routes(&pod);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["gateway"], "169.254.1.1");
    assert_eq!(routes[0]["dev"], "eth0");
    assert_eq!(pod.ip_json(&["link", "show", "eth0"]).unwrap()[0]["mtu"], 1400);
    // On the node: the host veth is up with a /32 route to the pod.
    let host_routes = node.ns.ip_json(&["route", "show", "10.79.0.2/32"]).unwrap();
    assert_eq!(host_routes[0]["dev"], host_veth.as_str(), "{host_routes}");
    // Traffic both ways.
    assert!(node.ns.ping("10.79.0.2", 3), "node cannot ping the pod");
    assert!(pod.ping(NODE_IP, 3), "pod cannot ping the node");

    // CHECK passes, then fails once the pod's address is gone.
    let (ok, _, err) = node.cnitool("check", &pod);
    assert!(ok, "CHECK after ADD: {err}\nlog: {}", node.log());
    pod.exec("ip", &["addr", "del", "10.79.0.2/32", "dev", "eth0"]).unwrap();
    let (ok, _, err) = node.cnitool("check", &pod);
    assert!(!ok, "CHECK passed without the pod address");
    assert!(err.contains("10.79.0.2"), "CHECK error does not name the address: {err}");

    // DEL: veth and address gone, twice is fine, the address is reused.
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL: {err}");
    assert!(pod.exec("ip", &["link", "show", "eth0"]).is_err(), "eth0 still in the pod");
    assert!(node.ns.exec("ip", &["link", "show", &host_veth]).is_err(), "host veth still there");
    assert!(stored(&node.data).is_empty());
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "second DEL: {err}");
    let again = node.add(&pod);
    assert_eq!(again["ips"][0]["address"], "10.79.0.2/32");
    assert!(node.ns.ping("10.79.0.2", 3));

    // DEL after the pod's netns is gone still succeeds and frees the address.
    let path = pod.path().to_str().unwrap().to_string();
    drop(pod);
    let (code, out) = node.direct("DEL", &stored(&node.data)[0].1, &path, &node.plugin_conf("1.1.0"));
    assert_eq!((code, out), (0, Value::Null));
    assert!(stored(&node.data).is_empty());
    assert!(node.ns.exec("ip", &["link", "show", &host_veth]).is_err());
}

#[test]
fn dual_stack_pod_gets_a_128_and_a_fe80_1_default_route() {
    let node = Node::new("10.79.6.0/24", "10.79.6.1", "1.1.0", false);
    write_state_dual(&node.state, ("10.79.6.0/24", "10.79.6.1"), ("fd79:6::/120", "fd79:6::1"), 1400);
    node.ns.exec("ip", &["addr", "add", "fd79:ffff::1/128", "dev", "lo"]).unwrap();
    let pod = Netns::unique("pod").unwrap();
    let result = node.add(&pod);
    assert_eq!(result["ips"][0]["address"], "10.79.6.2/32", "{result}");
    assert_eq!(result["ips"][1]["address"], "fd79:6::2/128", "{result}");
    assert_eq!(result["ips"][1]["gateway"], "fe80::1");
    assert_eq!(addrs(&pod, "eth0"), vec!["10.79.6.2/32".to_owned(), "fd79:6::2/128".to_owned()]);
    let v6 = pod.ip_json(&["-6", "route", "show", "default"]).unwrap();
    assert_eq!(v6[0]["gateway"], "fe80::1", "{v6}");
    assert!(node.ns.ping("fd79:6::2", 3), "node cannot ping the pod over IPv6");
    assert!(pod.ping("fd79:ffff::1", 3), "pod cannot ping the node over IPv6");
    assert!(pod.ping(NODE_IP, 3), "pod cannot ping the node over IPv4");
    assert!(node.cnitool("check", &pod).0, "CHECK of a dual-stack pod");
    assert!(node.cnitool("del", &pod).0);
    assert!(stored(&node.data).is_empty());
}

#[test]
fn two_pods_get_distinct_addresses_and_answer_in_old_versions() {
    let node = Node::new("10.79.1.0/24", "10.79.1.1", "0.4.0", false);
    let a = Netns::unique("poda").unwrap();
    let b = Netns::unique("podb").unwrap();
    let ra = node.add(&a);
    let rb = node.add(&b);
    assert_eq!(ra["cniVersion"], "0.4.0");
    assert_eq!(ra["ips"][0]["version"], "4", "0.4.0 results carry the IP version: {ra}");
    assert_eq!(ra["ips"][0]["address"], "10.79.1.2/32");
    assert_eq!(rb["ips"][0]["address"], "10.79.1.3/32");
    assert!(a.ping(NODE_IP, 3) && b.ping(NODE_IP, 3));
    assert!(node.ns.ping("10.79.1.2", 3) && node.ns.ping("10.79.1.3", 3));
    for p in [&a, &b] {
        assert!(node.cnitool("del", p).0);
    }
}

#[test]
fn chained_with_the_reference_portmap_plugin() {
    // Debian bookworm's portmap speaks CNI up to 1.0.0.
    let node = Node::new("10.79.2.0/24", "10.79.2.1", "1.0.0", true);
    let pod = Netns::unique("pod").unwrap();
    let result = node.add(&pod);
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["ips"][0]["address"], "10.79.2.2/32");
    assert!(node.ns.ping("10.79.2.2", 3));
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL through the chain: {err}");
    assert!(stored(&node.data).is_empty());
}

#[test]
fn gc_frees_a_leaked_allocation_and_keeps_valid_ones() {
    let node = Node::new("10.79.3.0/24", "10.79.3.1", "1.1.0", false);
    let pod = Netns::unique("pod").unwrap();
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
    assert!(node.ns.ping("10.79.3.2", 3), "GC touched a valid pod");
    assert!(node.cnitool("del", &pod).0);
}

#[test]
fn status_is_50_until_the_state_file_exists() {
    let node = Node::new("10.79.4.0/24", "10.79.4.1", "1.1.0", false);
    let pod = Netns::unique("pod").unwrap();
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
    assert!(pod.exec("ip", &["link", "show", "eth0"]).is_err());
}

#[test]
fn failed_add_rolls_back_the_allocation() {
    let node = Node::new("10.79.5.0/24", "10.79.5.1", "1.1.0", false);
    let pod = Netns::unique("pod").unwrap();
    // eth0 already exists in the pod: ADD must fail and release the address.
    pod.exec("ip", &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"]).unwrap();
    let (ok, _, err) = node.cnitool("add", &pod);
    assert!(!ok, "ADD over an existing eth0 succeeded");
    assert!(err.contains("eth0"), "{err}");
    assert!(stored(&node.data).is_empty(), "address leaked: {:?}", stored(&node.data));
}

/// The pod's eth0 addresses and the store's entries for `container` agree on `ip`.
fn held_and_wired(node: &Node, pod: &Netns, container: &str, ip: &str) {
    let held: Vec<String> = stored(&node.data).into_iter().filter(|e| e.1 == container).map(|e| e.0).collect();
    assert_eq!(held, [ip], "the store keeps the live pod's address: {:?}", stored(&node.data));
    assert_eq!(addrs(pod, "eth0"), [format!("{ip}/32")], "the pod still has its address");
}

fn address_of(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_owned()
}

#[test]
fn a_repeated_add_fails_without_freeing_the_live_pods_address_on_either_libcni() {
    for (i, tool) in [cnitool(), cnitool_v1_1_2()].iter().enumerate() {
        let node = Node::new(&format!("10.79.{}.0/24", 9 + i), &format!("10.79.{}.1", 9 + i), "1.0.0", false);
        let pod = Netns::unique("pod").unwrap();
        let ip = address_of(&node.add_with(tool, &pod));
        let container = stored(&node.data)[0].1.clone();
        // The runtime repeats the ADD (a timeout, a restart): it fails on the existing eth0.
        let (ok, out, err) = node.cnitool_with(tool, "add", &pod);
        assert!(!ok, "{}: the repeated ADD succeeded: {out}", tool.display());
        assert!(err.contains("eth0"), "{err}");
        held_and_wired(&node, &pod, &container, &ip);
        let (ok, _, err) = node.cnitool_with(tool, "check", &pod);
        assert!(ok, "{}: CHECK of the first pod after the repeated ADD: {err}", tool.display());
        // The next pod gets another address, and the first still answers.
        let next = Netns::unique("pod").unwrap();
        let other = address_of(&node.add_with(tool, &next));
        assert_ne!(other, ip, "two pods, one address");
        assert!(node.ns.ping(&ip, 3), "the first pod lost its connectivity");
        let (ok, _, err) = node.cnitool_with(tool, "del", &next);
        assert!(ok, "DEL of the second pod: {err}");
        node.check_and_del_with(tool, &pod);
    }
}

#[test]
fn an_add_killed_after_ipam_is_retried_onto_the_same_address_and_a_failed_retry_keeps_it_for_del() {
    let node = Node::new("10.79.11.0/24", "10.79.11.1", "1.1.0", false);
    let conf = node.plugin_conf("1.1.0");
    let pod = Netns::unique("pod").unwrap();
    let netns = pod.path().to_str().unwrap().to_owned();
    // What carve-cni killed after its in-process IPAM step leaves: the store entry, no interface.
    let (code, out) = run_plugin(IPAM, "ADD", "killed", "eth0", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    let ip = address_of(&out);
    let (code, out) = node.direct("ADD", "killed", &netns, &conf);
    assert_eq!(code, 0, "the retried ADD: {out}");
    assert_eq!(address_of(&out), ip, "the retry gets the address its first try recorded");
    held_and_wired(&node, &pod, "killed", &ip);
    let (code, out) = node.direct("DEL", "killed", &netns, &conf);
    assert_eq!(code, 0, "{out}");

    // The same, but the retry's interface step fails: the address stays until the runtime's DEL.
    let (code, out) = run_plugin(IPAM, "ADD", "killed-again", "eth0", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    pod.exec("ip", &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"]).unwrap();
    let (code, out) = node.direct("ADD", "killed-again", &netns, &conf);
    assert_ne!(code, 0, "ADD over a foreign eth0 succeeded: {out}");
    assert_eq!(stored(&node.data), [(ip.clone(), "killed-again".into(), "eth0".into())], "a retry frees nothing");
    let (code, out) = node.direct("DEL", "killed-again", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    assert!(stored(&node.data).is_empty(), "DEL frees it: {:?}", stored(&node.data));
}

/// carve-cni with carve-ipam exec'd as a delegated plugin (`carve-ipam-exec`, the same
/// binary under another type, so carve-cni does not run it in process), behind a
/// wrapper that kills carve-cni after the IPAM ADD once, when `kill_once` exists.
fn delegated_conf(node: &Node) -> (Value, std::path::PathBuf) {
    let bin = node.dirs.bin();
    let kill_once = node.dirs.root.path().join("kill-once");
    let wrapper = format!(
        "#!/bin/sh\nout=$('{IPAM}')\nstatus=$?\nif [ \"$CNI_COMMAND\" = ADD ] && rm '{}' 2>/dev/null; then kill -9 $PPID; fi\necho \"$out\"\nexit $status\n",
        kill_once.display()
    );
    std::fs::write(bin.join("carve-ipam-exec"), wrapper).unwrap();
    std::fs::set_permissions(bin.join("carve-ipam-exec"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let conf = json!({
        "cniVersion": "1.1.0", "name": node.net, "type": "carve-cni", "stateFile": node.state,
        "runDir": node.dirs.root.path().join("run"),
        "ipam": { "type": "carve-ipam-exec", "stateFile": node.state, "dataDir": node.data },
    });
    (conf, kill_once)
}

#[test]
fn a_delegated_ipam_is_rolled_back_only_by_the_add_that_claimed_the_attachment() {
    let node = Node::new("10.79.12.0/24", "10.79.12.1", "1.1.0", false);
    let (conf, kill_once) = delegated_conf(&node);
    let pod = Netns::unique("pod").unwrap();
    let netns = pod.path().to_str().unwrap().to_owned();

    // Repeated ADD: the second fails on eth0 and leaves the first one's address.
    let (code, out) = node.direct("ADD", "repeated", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    let ip = address_of(&out);
    let (code, out) = node.direct("ADD", "repeated", &netns, &conf);
    assert_ne!(code, 0, "the repeated ADD succeeded: {out}");
    held_and_wired(&node, &pod, "repeated", &ip);
    let (code, out) = node.direct("DEL", "repeated", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    assert!(stored(&node.data).is_empty());

    // Killed between the IPAM ADD and the interface: the retry is wired with the same address.
    std::fs::write(&kill_once, "").unwrap();
    let (code, out) = node.direct("ADD", "killed", &netns, &conf);
    assert_eq!((code, &out), (-1, &Value::Null), "carve-cni was killed mid-ADD");
    assert!(pod.exec("ip", &["link", "show", "eth0"]).is_err(), "killed before the interface");
    let recorded = stored(&node.data);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let (code, out) = node.direct("ADD", "killed", &netns, &conf);
    assert_eq!(code, 0, "the retried ADD: {out}");
    assert_eq!(address_of(&out), recorded[0].0);
    held_and_wired(&node, &pod, "killed", &recorded[0].0);
    // A third ADD fails on eth0; it claimed nothing, so it frees nothing.
    let (code, _) = node.direct("ADD", "killed", &netns, &conf);
    assert_ne!(code, 0);
    held_and_wired(&node, &pod, "killed", &recorded[0].0);
    let (code, out) = node.direct("DEL", "killed", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    assert!(stored(&node.data).is_empty());

    // A fresh allocation whose interface step fails is given back through the plugin's DEL.
    pod.exec("ip", &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"]).unwrap();
    let (code, out) = node.direct("ADD", "fresh", &netns, &conf);
    assert_ne!(code, 0, "ADD over a foreign eth0 succeeded: {out}");
    assert!(stored(&node.data).is_empty(), "the fresh address leaked: {:?}", stored(&node.data));
    pod.exec("ip", &["link", "del", "eth0"]).unwrap();
    let (code, out) = node.direct("ADD", "fresh", &netns, &conf);
    assert_eq!(code, 0, "after the rollback the attachment is claimed anew: {out}");
    let (code, out) = node.direct("DEL", "fresh", &netns, &conf);
    assert_eq!(code, 0, "{out}");
    assert!(stored(&node.data).is_empty());
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

#[test]
fn agent_conflist_add_check_del_with_containerd_1_6_libcni() {
    // containerd 1.6 and 1.7 vendor libcni v1.1.2: with the conflist at 1.1.0
    // every sandbox failed with `unsupported CNI result version "1.1.0"`.
    let node = Node::with_agent_conflist("10.79.7.0/24", "10.79.7.1", None);
    let old = cnitool_v1_1_2();
    let pod = Netns::unique("pod").unwrap();
    let result = node.add_with(&old, &pod);
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    assert_eq!(result["ips"][0]["address"], "10.79.7.2/32", "{result}");
    assert!(result["interfaces"][1].get("mtu").is_none(), "no 1.1.0 fields in a 1.0.0 result: {result}");
    assert_eq!(addrs(&pod, "eth0"), vec!["10.79.7.2/32".to_owned()]);
    assert!(node.ns.ping("10.79.7.2", 3), "node cannot ping the pod");
    assert!(pod.ping(NODE_IP, 3), "pod cannot ping the node");
    node.check_and_del_with(&old, &pod);
    let conflist = node.agent_conflist();
    assert_eq!((&conflist["cniVersion"], &conflist["cniVersions"]), (&json!("1.0.0"), &json!(["1.0.0", "1.1.0"])));
}

#[test]
fn agent_conflist_gives_a_libcni_1_3_runtime_a_1_1_0_result() {
    // containerd >= 2.0 and CRI-O (libcni >= 1.2) read cniVersions and take the
    // highest they know; install-cni put a portmap that speaks it in place.
    let node = Node::with_agent_conflist("10.79.9.0/24", "10.79.9.1", None);
    let tool = cnitool();
    let pod = Netns::unique("pod").unwrap();
    let result = node.add_with(&tool, &pod);
    assert_eq!(result["cniVersion"], "1.1.0", "{result}");
    assert_eq!(result["interfaces"][1]["mtu"], 1400, "1.1.0 results carry the MTU: {result}");
    assert_eq!(result["ips"][0]["address"], "10.79.9.2/32", "{result}");
    assert!(node.ns.ping("10.79.9.2", 3), "node cannot ping the pod");
    let (ok, _, err) = node.cnitool_with(&tool, "status", &pod);
    assert!(ok, "STATUS (CNI 1.1.0 only): {err}");
    node.check_and_del_with(&tool, &pod);
}

#[test]
fn agent_rewrite_keeps_a_lower_cni_version_while_pods_live() {
    // An operator had pinned 0.4.0 and a pod was created under it.
    let node = Node::with_agent_conflist("10.79.10.0/24", "10.79.10.1", Some("0.4.0"));
    let old = cnitool_v1_1_2();
    let pod = Netns::unique("pod").unwrap();
    assert_eq!(node.add_with(&old, &pod)["cniVersion"], "0.4.0");
    // The pin is dropped: cniVersion stays while the pod lives; libcni >= 1.2 still gets the list.
    let w = node.agent_writes_conflist(None);
    assert_eq!(w.choice.reason, VersionReason::KeptForLivePods { existing: "0.4.0".into(), wanted: "1.0.0".into() });
    let conflist = node.agent_conflist();
    assert_eq!(conflist["cniVersion"], "0.4.0");
    assert_eq!(conflist["cniVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    node.check_and_del_with(&old, &pod);
    // No pod left: the next pass raises it.
    assert_eq!(node.agent_writes_conflist(None).choice.reason, VersionReason::Default);
    assert_eq!(node.agent_conflist()["cniVersion"], "1.0.0");
}

#[test]
fn a_pin_raising_under_a_live_pod_strands_it_on_containerd_1_6_until_lowered() {
    let node = Node::with_agent_conflist("10.79.11.0/24", "10.79.11.1", Some("1.0.0"));
    let old = cnitool_v1_1_2();
    let pod = Netns::unique("pod").unwrap();
    assert_eq!(node.add_with(&old, &pod)["cniVersion"], "1.0.0");
    // What the agent warns about: the pin wins, and libcni v1.1.2 cannot delete the pod.
    let w = node.agent_writes_conflist(Some("1.1.0"));
    assert_eq!(
        w.choice.reason,
        VersionReason::PinRaisesUnderLivePods { existing: "1.0.0".into(), pinned: "1.1.0".into() }
    );
    let (ok, _, err) = node.cnitool_with(&old, "del", &pod);
    assert!(!ok, "libcni v1.1.2 deleted a 1.0.0 pod under a 1.1.0 conflist");
    assert!(err.contains("1.1.0"), "{err}");
    assert_eq!(stored(&node.data).len(), 1);
    // Lowering is always allowed, and lets the pod go.
    assert_eq!(node.agent_writes_conflist(None).choice.reason, VersionReason::Default);
    node.check_and_del_with(&old, &pod);
}

#[test]
fn cni_version_flag_rejects_versions_carve_cni_does_not_speak() {
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(AGENT);
        cmd.args(args).env_remove("CARVE_CNI_VERSION").env_remove("NODE_NAME");
        if let Some(v) = env {
            cmd.env("CARVE_CNI_VERSION", v);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, env) in [
        (&["--cni-version", "0.3.0"][..], None),
        (&["install-cni", "--cni-version", "1.2.0"][..], None),
        (&[][..], Some("v1.0.0")),
    ] {
        let (code, err) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains("--cni-version") && err.contains("0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{err}");
    }
    // An accepted pin gets past parsing (and stops at the missing NODE_NAME).
    let (code, err) = run(&["--cni-version", "0.3.1"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("NODE_NAME"), "{err}");
}

/// What a runtime can observe of `ip` and the host veth `host_veth` on the node
/// and in the pod: links, routes, neighbour entries, the store.
fn observable(node: &Node, pod: &Netns, host_veth: &str, ip: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let links = node.ns.exec("ip", &["-o", "link", "show"]).unwrap();
    if links.contains(host_veth) {
        seen.push(format!("link {host_veth}"));
    }
    for family in ["-4", "-6"] {
        for table in [["route", "show"], ["neigh", "show"]] {
            let out = node.ns.exec("ip", &[family, table[0], table[1]]).unwrap();
            seen.extend(out.lines().filter(|l| l.contains(ip) || l.contains(host_veth)).map(str::to_string));
        }
    }
    if pod.exec("ip", &["link", "show", "eth0"]).is_ok() {
        seen.push("eth0 in the pod".into());
    }
    seen.extend(stored(&node.data).into_iter().map(|(ip, c, _)| format!("stored {ip} for {c}")));
    seen
}

/// Live processes running `exe`.
fn processes_of(exe: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == Path::new(exe)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn del_returns_with_veth_routes_and_neighbours_gone_and_the_same_add_works_at_once() {
    let node = Node::new("10.79.9.0/24", "10.79.9.1", "1.0.0", false);
    let pod = Netns::unique("pod").unwrap();
    let log = node.dirs.root.path().join("direct.log");
    let mut after_del = Vec::new();
    // The default (the kernel's post-delete wait left to a child) and
    // syncDelete must look the same to a runtime.
    for sync in [false, true] {
        let mut conf = node.plugin_conf("1.0.0");
        conf["syncDelete"] = sync.into();
        conf["logLevel"] = "debug".into();
        conf["logFile"] = log.display().to_string().into();
        let id = format!("fast-{sync}");
        let host_veth = carve_node_plugin::podnet::host_veth_name(&id, "eth0");
        let detached = || std::fs::read_to_string(&log).unwrap_or_default().matches("(detached)").count();
        let detached_before = detached();
        for round in 0..10 {
            let (code, out) = node.direct("ADD", &id, pod.path().to_str().unwrap(), &conf);
            assert_eq!(code, 0, "ADD {round} (sync {sync}): {out}");
            let ip = out["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
            assert!(!observable(&node, &pod, &host_veth, &ip).is_empty(), "ADD wired nothing");
            let (code, out) = node.direct("DEL", &id, pod.path().to_str().unwrap(), &conf);
            assert_eq!(code, 0, "DEL {round} (sync {sync}): {out}");
            // Checked at once: DEL's return means done.
            let seen = observable(&node, &pod, &host_veth, &ip);
            assert!(seen.is_empty(), "right after DEL {round} (sync {sync}): {seen:?}");
            after_del.push((sync, seen));
        }
        let detached = detached() - detached_before;
        let want = if sync { 0 } else { 10 };
        assert_eq!(detached, want, "detached deletes with syncDelete {sync} (the default leaves the wait to a child)");
    }
    assert!(after_del.iter().all(|(_, seen)| seen.is_empty()));
    // A second later nothing lingers: no plugin process, no carve link.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(processes_of(CNI).is_empty(), "carve-cni processes still running: {:?}", processes_of(CNI));
    let links = node.ns.exec("ip", &["-o", "link", "show"]).unwrap();
    assert!(!links.contains("carve"), "{links}");
}

#[test]
fn any_other_ipam_type_is_exec_d_from_cni_path() {
    let node = Node::new("10.79.7.0/24", "10.79.7.1", "1.0.0", false);
    let pod = Netns::unique("pod").unwrap();
    let data = node.dirs.root.path().join("host-local");
    let conf = json!({
        "cniVersion": "1.0.0", "name": node.net, "type": "carve-cni", "stateFile": node.state,
        "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.79.8.0/24" }]], "dataDir": data },
    });
    let (code, out) = node.direct("ADD", "delegated", pod.path().to_str().unwrap(), &conf);
    assert_eq!(code, 0, "{out}");
    let ip = out["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    assert!(ip.starts_with("10.79.8."), "the address comes from host-local's range: {out}");
    assert_eq!(addrs(&pod, "eth0"), [format!("{ip}/32")]);
    assert!(data.join(&node.net).join(&ip).exists(), "host-local recorded {ip}");
    assert!(stored(&node.data).is_empty(), "carve-ipam's store is not involved");
    let (code, out) = node.direct("DEL", "delegated", pod.path().to_str().unwrap(), &conf);
    assert_eq!(code, 0, "{out}");
    assert!(!data.join(&node.net).join(&ip).exists(), "DEL went through host-local");
    assert!(pod.exec("ip", &["link", "show", "eth0"]).is_err());
}
