//! carve-ipam as a user runs it: the real binary, CNI env vars, a node state
//! file written by the test. The bridge test needs root and the Debian
//! containernetworking-plugins package (/usr/lib/cni/bridge).

mod cni_support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use cni_support::*;
use serde_json::{Value, json};

const IPAM: &str = env!("CARGO_BIN_EXE_carve-ipam");

struct Net {
    dir: TempDir,
}

impl Net {
    fn new(cidr: &str, gateway: &str) -> Self {
        let dir = temp_dir("ipam");
        write_state(&dir.path().join("state/node-state.json"), cidr, gateway, 1450);
        Net { dir }
    }
    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }
    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "cnit-ipam",
            "type": "carve-ipam",
            "ipam": {
                "type": "carve-ipam",
                "stateFile": self.dir.path().join("state/node-state.json"),
                "dataDir": self.data(),
            }
        })
    }
    fn add(&self, container: &str) -> (i32, Value) {
        run_plugin(IPAM, "ADD", container, "eth0", "/var/run/netns/none", &self.conf("1.1.0"))
    }
    fn del(&self, container: &str) -> (i32, Value) {
        run_plugin(IPAM, "DEL", container, "eth0", "", &self.conf("1.1.0"))
    }
}

fn address(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}")).to_owned()
}

#[test]
fn add_skips_network_and_gateway_repeats_and_del_frees() {
    let net = Net::new("10.77.0.0/24", "10.77.0.1");
    let (code, first) = net.add("c1");
    assert_eq!(code, 0, "{first}");
    assert_eq!(address(&first), "10.77.0.2/24");
    assert_eq!(first["ips"][0]["gateway"], "10.77.0.1");
    assert_eq!(first["cniVersion"], "1.1.0");
    // Same container + ifname: same address.
    assert_eq!(address(&net.add("c1").1), "10.77.0.2/24");
    assert_eq!(address(&net.add("c2").1), "10.77.0.3/24");
    // DEL frees, twice is fine, and the address comes back.
    assert_eq!(net.del("c1"), (0, Value::Null));
    assert_eq!(net.del("c1"), (0, Value::Null));
    assert_eq!(address(&net.add("c3").1), "10.77.0.2/24");
    let held: Vec<_> = stored(&net.data()).into_iter().map(|(ip, c, _)| (ip, c)).collect();
    assert_eq!(held, vec![("10.77.0.2".into(), "c3".into()), ("10.77.0.3".into(), "c2".into())]);
}

#[test]
fn answers_in_the_requested_version() {
    let net = Net::new("10.77.1.0/24", "10.77.1.1");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let (code, out) = run_plugin(IPAM, "ADD", &format!("v{i}"), "eth0", "/x", &net.conf(v));
        assert_eq!(code, 0, "{out}");
        assert_eq!(out["cniVersion"], *v);
        assert_eq!(out["ips"][0].get("version").is_some(), v.starts_with('0'), "{v}: {out}");
    }
    let (code, out) = run_plugin(IPAM, "ADD", "old", "eth0", "/x", &net.conf("0.2.0"));
    assert_eq!((code, out["code"].as_u64()), (1, Some(1)), "{out}");
}

#[test]
fn block_exhaustion_is_an_error_naming_the_block() {
    let net = Net::new("10.77.2.0/30", "10.77.2.1");
    assert_eq!(address(&net.add("a").1), "10.77.2.2/30");
    let (code, out) = net.add("b");
    assert_eq!(code, 1);
    assert!(out["msg"].as_str().unwrap().contains("10.77.2.0/30"), "{out}");
    assert_eq!(stored(&net.data()).len(), 1);
}

#[test]
fn two_hundred_concurrent_adds_get_distinct_addresses_and_concurrent_dels_free_them() {
    let net = Net::new("10.77.3.0/24", "10.77.3.1");
    let conf = net.conf("1.1.0");
    // Waiters block on the store's flock (woken in turn), none polls.
    let children: Vec<_> =
        (0..200).map(|i| spawn_plugin(IPAM, "ADD", &format!("par-{i}"), "eth0", "/x", &conf)).collect();
    let mut ips = BTreeSet::new();
    for child in children {
        let (code, out) = parse_output(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{out}");
        let ip: Ipv4Addr = address(&out).split('/').next().unwrap().parse().unwrap();
        assert!(ip.octets()[3] >= 2 && ip.octets()[3] < 255, "{ip} is reserved");
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 200);
    let on_disk: BTreeSet<Ipv4Addr> = stored(&net.data()).iter().map(|(ip, _, _)| ip.parse().unwrap()).collect();
    assert_eq!(on_disk, ips);
    let children: Vec<_> =
        (0..200).map(|i| spawn_plugin(IPAM, "DEL", &format!("par-{i}"), "eth0", "/x", &conf)).collect();
    for child in children {
        let (code, out) = parse_output(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{out}");
    }
    assert!(stored(&net.data()).is_empty(), "{:?}", stored(&net.data()));
}

#[test]
fn an_address_held_in_a_previous_boot_is_free_again() {
    let net = Net::new("10.77.6.0/24", "10.77.6.1");
    let (code, first) = net.add("before-reboot");
    assert_eq!(code, 0, "{first}");
    let file = net.data().join("allocations.json");
    let mut store: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(store["version"], 2);
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(store["allocations"][0]["bootId"], this_boot.trim(), "entries name the boot they were made in");
    // The same store as a reboot would leave it: the entry names another boot.
    store["allocations"][0]["bootId"] = "00000000-0000-0000-0000-000000000000".into();
    std::fs::write(&file, store.to_string()).unwrap();
    let (code, second) = net.add("after-reboot");
    assert_eq!(code, 0, "{second}");
    assert_eq!(address(&second), address(&first), "the stale address is the lowest free one again");
    let held: Vec<String> = stored(&net.data()).into_iter().map(|(_, c, _)| c).collect();
    assert_eq!(held, ["after-reboot"], "the previous boot's entry is gone, not kept next to the new one");
}

#[test]
fn sigkill_mid_add_leaves_a_parsable_store_without_duplicates() {
    let net = Net::new("10.77.4.0/24", "10.77.4.1");
    let conf = net.conf("1.1.0");
    let mut ok = BTreeSet::new();
    for round in 0..5 {
        let children: Vec<_> =
            (0..20).map(|i| spawn_plugin(IPAM, "ADD", &format!("k{round}-{i}"), "eth0", "/x", &conf)).collect();
        // Kill every other one at staggered moments while the rest run.
        let mut survivors = Vec::new();
        for (i, mut child) in children.into_iter().enumerate() {
            if i % 2 == 0 {
                std::thread::sleep(Duration::from_micros(300 * (i as u64)));
                let _ = child.kill();
                let _ = child.wait();
            } else {
                survivors.push((format!("k{round}-{i}"), child));
            }
        }
        for (id, child) in survivors {
            let (code, out) = parse_output(&child.wait_with_output().unwrap());
            assert_eq!(code, 0, "{out}");
            ok.insert((address(&out).split('/').next().unwrap().to_owned(), id));
        }
        let entries = stored(&net.data());
        let ips: BTreeSet<&String> = entries.iter().map(|(ip, _, _)| ip).collect();
        assert_eq!(ips.len(), entries.len(), "an address stored twice: {entries:?}");
        let owners: BTreeSet<&String> = entries.iter().map(|(_, c, _)| c).collect();
        assert_eq!(owners.len(), entries.len(), "an owner stored twice");
        for (ip, id) in &ok {
            assert!(entries.iter().any(|(i, c, _)| i == ip && c == id), "{id} lost {ip}");
        }
    }
    // The store still works after all that.
    assert_eq!(net.add("after").0, 0);
}

#[test]
fn gc_frees_what_is_not_a_valid_attachment() {
    let net = Net::new("10.77.5.0/24", "10.77.5.1");
    net.add("keep");
    net.add("leaked");
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let mut conf = net.conf("1.1.0");
        conf[key] = json!([{ "containerID": "keep", "ifname": "eth0" }]);
        let (code, out) = run_plugin(IPAM, "GC", "", "", "", &conf);
        assert_eq!(code, 0, "{out}");
        let held: Vec<String> = stored(&net.data()).into_iter().map(|(_, c, _)| c).collect();
        assert_eq!(held, vec!["keep".to_owned()]);
        net.add("leaked");
    }
}

#[test]
fn status_is_50_without_state_file_and_ok_with_it() {
    let net = Net::new("10.77.6.0/24", "10.77.6.1");
    let (code, out) = run_plugin(IPAM, "STATUS", "", "", "", &net.conf("1.1.0"));
    assert_eq!((code, out.clone()), (0, Value::Null), "{out}");
    std::fs::remove_file(net.dir.path().join("state/node-state.json")).unwrap();
    let (code, out) = run_plugin(IPAM, "STATUS", "", "", "", &net.conf("1.1.0"));
    assert_eq!(code, 1);
    assert_eq!(out["code"], 50);
    assert!(out["msg"].as_str().unwrap().contains("node-state.json"), "{out}");
    // ADD without state: try again later, naming the file.
    let (code, out) = net.add("c");
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
}

#[test]
fn version_flag_and_command() {
    let out = std::process::Command::new(IPAM).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("carve-ipam "));
    let out = std::process::Command::new(IPAM).env("CNI_COMMAND", "VERSION").output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
}

/// carve-ipam as the IPAM of the reference bridge plugin, driven by cnitool:
/// the pod gets an address from the node's block and reaches the bridge gateway.
#[test]
fn works_under_the_reference_bridge_plugin() {
    if !is_root() || !std::path::Path::new("/usr/lib/cni/bridge").exists() {
        panic!("needs root and /usr/lib/cni/bridge (apt-get install containernetworking-plugins)");
    }
    let dirs = CniDirs::new();
    let state = dirs.root.path().join("node-state.json");
    write_state(&state, "10.78.0.0/24", "10.78.0.1", 1500);
    let name = format!("cnit-br-{}", unique());
    let bridge = format!("cnitbr{}", std::process::id() % 100000);
    dirs.write_conflist(
        &name,
        "1.0.0",
        json!([{
            "type": "bridge", "bridge": bridge, "isGateway": true,
            "ipam": { "type": "carve-ipam", "stateFile": state, "dataDir": dirs.root.path().join("data") }
        }]),
    );
    let node = Netns::unique("node").unwrap();
    let pod = Netns::unique("pod").unwrap();
    let (ok, stdout, stderr) = dirs.cnitool(&node, "add", &name, pod.path().to_str().unwrap(), "eth0");
    assert!(ok, "cnitool add: {stdout} {stderr}");
    let result: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.78.0.2/24", "{result}");
    assert_eq!(addrs(&pod, "eth0"), vec!["10.78.0.2/24".to_owned()]);
    assert!(pod.ping("10.78.0.1", 3), "pod cannot ping the bridge gateway");
    assert!(node.ping("10.78.0.2", 3), "node cannot ping the pod");
    let (ok, _, stderr) = dirs.cnitool(&node, "del", &name, pod.path().to_str().unwrap(), "eth0");
    assert!(ok, "cnitool del: {stderr}");
    assert!(stored(&dirs.root.path().join("data")).is_empty());
}

/// A dynamic VNet pool: every address of a /30 is a pod's; a block marked
/// releasing in the store is never used; a full node waits (leaving a marker
/// the agent counts) and answers 11, or gets the block granted meanwhile.
#[test]
fn a_full_dynamic_node_waits_for_a_grant_then_answers_try_again_later() {
    use carve_crds::{AllocationStrategy, IpFamily, NodeBlock, PoolMode};
    use carve_node_plugin::state::{self, NodeState};
    let net = Net::new("10.79.0.0/24", "10.79.0.1");
    let state_file = net.dir.path().join("state/node-state.json");
    let block =
        |cidr: &str| NodeBlock { cidr: cidr.into(), family: IpFamily::IPv4, gateway: None, allocation_id: None };
    let mut st = NodeState {
        node: "node-test".into(),
        mode: PoolMode::VNet,
        strategy: AllocationStrategy::Dynamic,
        blocks: vec![block("10.79.0.16/30"), block("10.79.0.32/30")],
        reserved_ips: vec![],
        cluster_pod_cidrs: vec!["10.79.0.0/24".into()],
        non_masquerade_cidrs: vec![],
        mtu: 1500,
        node_ip: "10.79.0.4".into(),
    };
    state::write(&state_file, &st).unwrap();
    std::fs::create_dir_all(net.data()).unwrap();
    std::fs::write(
        net.data().join("allocations.json"),
        json!({"version": 2, "allocations": [], "releasing": ["10.79.0.32/30"]}).to_string(),
    )
    .unwrap();
    let got: Vec<String> = (0..4).map(|i| address(&net.add(&format!("p{i}")).1)).collect();
    assert_eq!(got, ["10.79.0.16/30", "10.79.0.17/30", "10.79.0.18/30", "10.79.0.19/30"], "VNet: all four");

    let waiting = net.data().join("waiting");
    let started = std::time::Instant::now();
    let child = spawn_plugin(IPAM, "ADD", "full", "eth0", "/x", &net.conf("1.1.0"));
    // The waiting ADD is visible to the agent.
    let markers = |want: usize| {
        let dir = waiting.clone();
        move || match std::fs::read_dir(&dir).map(|d| d.count()) {
            Ok(n) if n == want => Ok(()),
            other => Err(format!("{other:?} markers")),
        }
    };
    carve_testkit::wait_until("the full ADD's waiting marker", Duration::from_secs(2), markers(1));
    let (code, out) = parse_output(&child.wait_with_output().unwrap());
    assert!(started.elapsed() >= Duration::from_millis(2900), "answered before the bounded wait: {out}");
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains("10.79.0.16/30") && msg.contains("asked for another block"), "{msg}");
    assert_eq!(std::fs::read_dir(&waiting).unwrap().count(), 0, "the marker goes with its ADD");
    assert_eq!(stored(&net.data()).len(), 4, "nothing from the releasing block");

    // A block granted while the ADD waits: it gets an address from it.
    let child = spawn_plugin(IPAM, "ADD", "grown", "eth0", "/x", &net.conf("1.1.0"));
    carve_testkit::wait_until("the ADD waiting", Duration::from_secs(2), markers(1));
    st.blocks.push(block("10.79.0.48/30"));
    state::write(&state_file, &st).unwrap();
    let (code, out) = parse_output(&child.wait_with_output().unwrap());
    assert_eq!(code, 0, "{out}");
    assert_eq!(address(&out), "10.79.0.48/30");
}
