//! carve-agent's dataplane on a real kernel: each test makes its own network
//! namespaces (`carve_testkit::netns::Netns::unique`, deleted on drop even on panic), runs the
//! planning + netlink/nft apply on a thread that entered the namespace, and
//! asserts with `ip -j`, `bridge -j` and `nft -j` inside it. Needs root, `ip`,
//! `bridge`, `nft` and `ping`.

use std::net::IpAddr;

use carve_crds::{IpFamily, NodeBlock, PoolMode};
use carve_node_plugin::dataplane::plan::{self, OverlayConfig, Peer, vtep_mac};
use carve_node_plugin::dataplane::{self, Applied, DataplaneError};
use carve_node_plugin::netlink::Netlink;
use carve_node_plugin::netlink::in_netns;
use carve_node_plugin::state::NodeState;
use carve_testkit::netns::Netns;

/// Plans and applies the dataplane inside `ns`.
fn apply(ns: &Netns, state: &NodeState, peers: &[Peer], overlay: &OverlayConfig) -> Result<Applied, DataplaneError> {
    let desired = plan::plan(state, peers, overlay).unwrap();
    let fd = std::fs::File::open(ns.path()).unwrap();
    in_netns(&fd, || {
        let mut nl = Netlink::open()?;
        dataplane::apply(&mut nl, &desired, &overlay.device, std::path::Path::new("/proc/sys"))
    })
    .unwrap()
}

fn node_state(mode: PoolMode, node: &str, node_ip: &str, blocks: &[&str], cluster: &[&str]) -> NodeState {
    NodeState {
        node: node.into(),
        mode,
        blocks: blocks
            .iter()
            .map(|c| NodeBlock { cidr: c.to_string(), family: IpFamily::IPv4, gateway: None, allocation_id: None })
            .collect(),
        strategy: Default::default(),
        reserved_ips: vec![],
        cluster_pod_cidrs: cluster.iter().map(|c| c.to_string()).collect(),
        non_masquerade_cidrs: vec!["172.16.0.0/12".into()],
        mtu: 1400,
        node_ip: node_ip.into(),
    }
}

fn peer(node: &str, ip: &str, blocks: &[&str]) -> Peer {
    Peer {
        node: node.into(),
        node_ip: ip.parse().unwrap(),
        blocks: blocks.iter().map(|b| b.parse().unwrap()).collect(),
    }
}

fn overlay_config() -> OverlayConfig {
    OverlayConfig { device: "carve.vxlan".into(), vni: 4242, port: 4789, mtu: 1400 }
}

/// `(dst, gateway, dev, onlink)` of every route with carve's protocol.
fn carve_routes(ns: &Netns) -> Vec<(String, String, String, bool)> {
    let mut routes: Vec<_> = ns
        .exec_json("ip", &["-j", "route", "show", "proto", "202"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap().to_string(),
                r["gateway"].as_str().unwrap_or_default().to_string(),
                r["dev"].as_str().unwrap().to_string(),
                r["flags"].as_array().is_some_and(|f| f.iter().any(|f| f == "onlink")),
            )
        })
        .collect();
    routes.sort();
    routes
}

fn neighbours(ns: &Netns, dev: &str) -> Vec<(String, String)> {
    let mut n: Vec<_> = ns
        .exec_json("ip", &["-j", "neigh", "show", "dev", dev, "nud", "permanent"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["dst"].as_str().unwrap().to_string(), n["lladdr"].as_str().unwrap().to_string()))
        .collect();
    n.sort();
    n
}

fn fdb(ns: &Netns, dev: &str) -> Vec<(String, String)> {
    let mut f: Vec<_> = ns
        .exec_json("bridge", &["-j", "fdb", "show", "dev", dev])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["dst"].is_string())
        .map(|e| (e["mac"].as_str().unwrap().to_string(), e["dst"].as_str().unwrap().to_string()))
        .collect();
    f.sort();
    f
}

/// The no-masquerade set's elements and the masquerade rules' source prefixes of `table <family> carve`.
fn snat(ns: &Netns, family: &str) -> Option<(Vec<String>, Vec<String>)> {
    if ns.exec("nft", &["list", "table", family, "carve"]).is_err() {
        return None;
    }
    let doc = ns.exec_json("nft", &["-j", "list", "table", family, "carve"]).unwrap();
    let mut elements = Vec::new();
    let mut sources = Vec::new();
    for obj in doc["nftables"].as_array().unwrap() {
        if let Some(set) = obj.get("set") {
            for e in set["elem"].as_array().into_iter().flatten() {
                elements.push(format!("{}/{}", e["prefix"]["addr"].as_str().unwrap(), e["prefix"]["len"]));
            }
        }
        if let Some(rule) = obj.get("rule") {
            let expr = rule["expr"].as_array().unwrap();
            assert!(expr.iter().any(|e| e.get("masquerade").is_some()), "carve rule without masquerade: {rule}");
            assert!(expr.iter().any(|e| e["match"]["op"] == "!=" && e["match"]["right"] == "@no-masquerade"));
            let p = &expr[0]["match"]["right"]["prefix"];
            sources.push(format!("{}/{}", p["addr"].as_str().unwrap(), p["len"]));
        }
    }
    Some((elements, sources))
}

fn mac(ip: &str) -> String {
    vtep_mac(ip.parse::<IpAddr>().unwrap()).to_string()
}

/// A node namespace with an underlay interface `eth0` (one end of a veth pair) holding `cidr`.
fn node_with_underlay(tag: &str, cidr: &str) -> Netns {
    let ns = Netns::unique(tag).unwrap();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    ns.ip(&["addr", "add", cidr, "dev", "eth0"]).unwrap();
    ns.ip(&["link", "set", "eth0p", "up"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns
}

#[test]
fn overlay_programs_vxlan_routes_neighbours_fdb_and_snat() {
    let ns = node_with_underlay("ovl", "192.168.50.10/24");
    let me = node_state(PoolMode::Overlay, "node-a", "192.168.50.10", &["10.244.1.0/24"], &["10.244.0.0/16"]);
    let peers =
        [peer("node-b", "192.168.50.11", &["10.244.2.0/24"]), peer("node-c", "192.168.50.12", &["10.244.3.0/24"])];
    let applied = apply(&ns, &me, &peers, &overlay_config()).unwrap();
    assert_eq!(applied.routes.add.len(), 2);

    let link = &ns.exec_json("ip", &["-d", "-j", "link", "show", "carve.vxlan"]).unwrap()[0];
    let data = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(data["id"], 4242);
    assert_eq!(data["port"], 4789);
    assert_eq!(data["local"], "192.168.50.10");
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], mac("192.168.50.10"));
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{link}");
    let addrs = ns.exec_json("ip", &["-j", "-4", "addr", "show", "dev", "carve.vxlan"]).unwrap();
    assert_eq!(addrs[0]["addr_info"][0]["local"], "10.244.1.0");
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);

    let onlink = |dst: &str, gw: &str| (dst.to_string(), gw.to_string(), "carve.vxlan".to_string(), true);
    assert_eq!(carve_routes(&ns), vec![onlink("10.244.2.0/24", "10.244.2.0"), onlink("10.244.3.0/24", "10.244.3.0")]);
    assert_eq!(
        neighbours(&ns, "carve.vxlan"),
        vec![("10.244.2.0".to_string(), mac("192.168.50.11")), ("10.244.3.0".to_string(), mac("192.168.50.12"))]
    );
    assert_eq!(
        fdb(&ns, "carve.vxlan"),
        vec![(mac("192.168.50.11"), "192.168.50.11".to_string()), (mac("192.168.50.12"), "192.168.50.12".to_string())]
    );
    let (elements, sources) = snat(&ns, "ip").expect("table ip carve");
    assert_eq!(elements, ["10.244.0.0/16", "172.16.0.0/12"]);
    assert_eq!(sources, ["10.244.1.0/24"]);
    assert!(snat(&ns, "ip6").is_none(), "no IPv6 blocks, no ip6 table");

    // Applying again changes nothing, and the nft table still holds one rule.
    let again = apply(&ns, &me, &peers, &overlay_config()).unwrap();
    assert!(again.is_noop(), "second apply changed {again:?}");
    assert_eq!(snat(&ns, "ip").unwrap().1.len(), 1);

    // node-c leaves: its route, neighbour and FDB entry go; node-b's stay.
    let gone = apply(&ns, &me, &peers[..1], &overlay_config()).unwrap();
    assert_eq!(gone.routes.remove.len(), 1);
    assert_eq!(carve_routes(&ns), vec![onlink("10.244.2.0/24", "10.244.2.0")]);
    assert_eq!(neighbours(&ns, "carve.vxlan"), vec![("10.244.2.0".to_string(), mac("192.168.50.11"))]);
    assert_eq!(fdb(&ns, "carve.vxlan"), vec![(mac("192.168.50.11"), "192.168.50.11".to_string())]);
}

#[test]
fn restart_removes_stale_carve_entries_and_keeps_foreign_ones() {
    let ns = node_with_underlay("stale", "192.168.51.10/24");
    let me = node_state(PoolMode::Overlay, "node-a", "192.168.51.10", &["10.244.1.0/24"], &["10.244.0.0/16"]);
    let peers = [peer("node-b", "192.168.51.11", &["10.244.2.0/24"])];
    apply(&ns, &me, &peers, &overlay_config()).unwrap();

    // What a previous run (or an admin) left behind.
    ns.ip(&["route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", "carve.vxlan", "onlink", "proto", "202"])
        .unwrap();
    ns.ip(&["neigh", "add", "10.244.9.0", "lladdr", "0e:ca:01:02:03:04", "dev", "carve.vxlan", "nud", "permanent"])
        .unwrap();
    run_bridge(
        &ns,
        &["fdb", "add", "0e:ca:01:02:03:04", "dev", "carve.vxlan", "dst", "192.168.51.99", "self", "permanent"],
    );
    ns.ip(&["route", "add", "10.99.0.0/24", "via", "192.168.51.1"]).unwrap(); // not carve's: kept
    ns.exec("nft", &["add", "rule", "ip", "carve", "postrouting", "masquerade"]).unwrap(); // stray rule in carve's table
    // A pod's host route (what carve-cni installs): not carve's protocol, kept.
    ns.ip(&["route", "add", "10.244.1.5/32", "dev", "eth0", "scope", "link"]).unwrap();
    let applied = apply(&ns, &me, &peers, &overlay_config()).unwrap();
    assert_eq!(applied.routes.remove.len(), 1, "{applied:?}");
    assert_eq!(applied.neighbours.remove.len(), 1);
    assert_eq!(applied.fdb.remove.len(), 1);
    assert_eq!(carve_routes(&ns), vec![("10.244.2.0/24".into(), "10.244.2.0".into(), "carve.vxlan".into(), true)]);
    assert_eq!(neighbours(&ns, "carve.vxlan").len(), 1);
    assert_eq!(fdb(&ns, "carve.vxlan").len(), 1);
    let all = ns.exec_json("ip", &["-j", "route", "show"]).unwrap();
    let dsts: Vec<&str> = all.as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap()).collect();
    assert!(dsts.contains(&"10.99.0.0/24") && dsts.contains(&"10.244.1.5"), "{dsts:?}");
    assert_eq!(snat(&ns, "ip").unwrap().1, ["10.244.1.0/24"], "the stray rule is gone");

    // A device whose VNI changed is recreated with the new settings.
    let mut cfg = overlay_config();
    cfg.vni = 4343;
    let applied = apply(&ns, &me, &peers, &cfg).unwrap();
    assert_eq!(
        ns.exec_json("ip", &["-d", "-j", "link", "show", "carve.vxlan"]).unwrap()[0]["linkinfo"]["info_data"]["id"],
        4343
    );
    assert_eq!(applied.routes.add.len(), 1);
    assert_eq!(carve_routes(&ns).len(), 1);
}

fn run_bridge(ns: &Netns, args: &[&str]) {
    ns.exec("bridge", args).unwrap();
}

#[test]
fn vnet_routes_via_node_ips_without_vxlan() {
    let ns = node_with_underlay("vnet", "10.1.0.4/16");
    // Left over from an Overlay configuration: VNet removes it.
    ns.ip(&["link", "add", "carve.vxlan", "type", "vxlan", "id", "4242", "dstport", "4789", "local", "10.1.0.4"])
        .unwrap();
    let me = node_state(PoolMode::VNet, "node-a", "10.1.0.4", &["10.1.1.0/28", "10.1.1.16/28"], &["10.1.0.0/16"]);
    let peers =
        [peer("node-b", "10.1.0.5", &["10.1.1.32/28"]), peer("node-c", "10.1.0.6", &["10.1.1.48/28", "10.1.1.64/28"])];
    let applied = apply(&ns, &me, &peers, &overlay_config()).unwrap();
    assert!(applied.vxlan_removed);
    assert!(ns.exec("ip", &["link", "show", "carve.vxlan"]).is_err(), "no VXLAN device in VNet mode");
    let plain = |dst: &str, gw: &str| (dst.to_string(), gw.to_string(), "eth0".to_string(), false);
    assert_eq!(
        carve_routes(&ns),
        vec![plain("10.1.1.32/28", "10.1.0.5"), plain("10.1.1.48/28", "10.1.0.6"), plain("10.1.1.64/28", "10.1.0.6")]
    );
    let (elements, sources) = snat(&ns, "ip").unwrap();
    assert_eq!(elements, ["10.1.0.0/16", "172.16.0.0/12"], "no SNAT inside the VNet");
    assert_eq!(sources, ["10.1.1.0/28", "10.1.1.16/28"]);
    assert!(apply(&ns, &me, &peers, &overlay_config()).unwrap().is_noop());
    apply(&ns, &me, &peers[1..], &overlay_config()).unwrap();
    assert_eq!(carve_routes(&ns).len(), 2);
}

/// Two nodes on a bridge, each with a "pod" address in its block on a veth
/// link: pod-to-pod crosses the VXLAN with pod addresses; pod-to-external
/// leaves with the node IP (the external host has no route to pod CIDRs, so
/// the ping only comes back when SNAT happened).
#[test]
fn two_overlay_nodes_reach_each_other_over_vxlan_and_snat_to_the_outside() {
    let lan = Netns::unique("lan").unwrap();
    lan.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    lan.ip(&["link", "set", "br0", "up"]).unwrap();
    let a = Netns::unique("a").unwrap();
    let b = Netns::unique("b").unwrap();
    let ext = Netns::unique("ext").unwrap();
    for (i, (ns, addr)) in
        [(&a, "192.168.60.1/24"), (&b, "192.168.60.2/24"), (&ext, "192.168.60.3/24")].into_iter().enumerate()
    {
        let port = format!("p{i}");
        lan.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]).unwrap();
        lan.ip(&["link", "set", &port, "master", "br0", "up"]).unwrap();
        ns.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    let cluster = ["10.244.0.0/16"];
    let sa = node_state(PoolMode::Overlay, "node-a", "192.168.60.1", &["10.244.1.0/24"], &cluster);
    let sb = node_state(PoolMode::Overlay, "node-b", "192.168.60.2", &["10.244.2.0/24"], &cluster);
    let peers =
        [peer("node-a", "192.168.60.1", &["10.244.1.0/24"]), peer("node-b", "192.168.60.2", &["10.244.2.0/24"])];
    apply(&a, &sa, &peers, &overlay_config()).unwrap();
    apply(&b, &sb, &peers, &overlay_config()).unwrap();
    for (ns, pod) in [(&a, "10.244.1.10/32"), (&b, "10.244.2.10/32")] {
        ns.ip(&["link", "add", "pod0", "type", "veth", "peer", "name", "pod0p"]).unwrap();
        ns.ip(&["addr", "add", pod, "dev", "pod0"]).unwrap();
        ns.ip(&["link", "set", "pod0p", "up"]).unwrap();
        ns.ip(&["link", "set", "pod0", "up"]).unwrap();
    }

    let tx_before =
        a.exec_json("ip", &["-s", "-j", "link", "show", "carve.vxlan"]).unwrap()[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .unwrap();
    a.exec("ping", &["-c", "2", "-W", "2", "-I", "10.244.1.10", "10.244.2.10"]).unwrap();
    let tx_after =
        a.exec_json("ip", &["-s", "-j", "link", "show", "carve.vxlan"]).unwrap()[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .unwrap();
    assert!(tx_after >= tx_before + 2, "the pings did not cross carve.vxlan ({tx_before} → {tx_after})");
    b.exec("ping", &["-c", "1", "-W", "2", "-I", "10.244.2.10", "10.244.1.10"]).unwrap();

    // External host: reachable from a pod address only through SNAT.
    a.exec("ping", &["-c", "1", "-W", "2", "-I", "10.244.1.10", "192.168.60.3"]).unwrap();
    ext.exec("nft", &["add", "table", "ip", "probe"]).unwrap();
    ext.exec("nft", &["add", "chain", "ip", "probe", "in", "{ type filter hook input priority 0; }"]).unwrap();
    ext.exec("nft", &["add", "rule", "ip", "probe", "in", "ip", "saddr", "10.244.0.0/16", "counter", "drop"]).unwrap();
    b.exec("ping", &["-c", "1", "-W", "2", "-I", "10.244.2.10", "192.168.60.3"]).unwrap();
    let rules = ext.exec("nft", &["list", "chain", "ip", "probe", "in"]).unwrap();
    assert!(rules.contains("packets 0 "), "a pod address reached the external host: {rules}");
}

/// VNet: a host on the underlay that is not a node pings a pod directly; the
/// node answers ARP for the pod's /32 (routed out its veth) only once the
/// agent's apply turned proxy ARP on the underlay link.
#[test]
fn vnet_underlay_hosts_reach_pods_through_proxy_arp() {
    let lan = Netns::unique("plan").unwrap();
    lan.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    lan.ip(&["link", "set", "br0", "up"]).unwrap();
    let node = Netns::unique("pnode").unwrap();
    let host = Netns::unique("phost").unwrap();
    for (i, (ns, addr)) in [(&node, "10.2.0.4/24"), (&host, "10.2.0.9/24")].into_iter().enumerate() {
        let port = format!("p{i}");
        lan.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]).unwrap();
        lan.ip(&["link", "set", &port, "master", "br0", "up"]).unwrap();
        ns.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    // A pod as carve-cni wires it: a /32 behind a veth, its next hop a link-local address.
    let pod = Netns::unique("ppod").unwrap();
    node.ip(&["link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod.name]).unwrap();
    node.ip(&["link", "set", "vpod", "up"]).unwrap();
    node.ip(&["route", "add", "10.2.0.20/32", "dev", "vpod", "scope", "link"]).unwrap();
    let host_mac =
        node.exec_json("ip", &["-j", "link", "show", "vpod"]).unwrap()[0]["address"].as_str().unwrap().to_string();
    pod.ip(&["addr", "add", "10.2.0.20/32", "dev", "eth0"]).unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]).unwrap();
    pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]).unwrap();
    pod.ip(&["neigh", "add", "169.254.1.1", "lladdr", &host_mac, "dev", "eth0", "nud", "permanent"]).unwrap();

    assert!(!host.ping("10.2.0.20", 1), "reachable before proxy ARP: the test proves nothing");
    host.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    let me = node_state(PoolMode::VNet, "node-a", "10.2.0.4", &["10.2.0.16/28"], &["10.2.0.0/24"]);
    apply(&node, &me, &[], &overlay_config()).unwrap();
    assert_eq!(node.exec("cat", &["/proc/sys/net/ipv4/conf/eth0/proxy_arp"]).unwrap().trim(), "1");
    assert!(host.ping("10.2.0.20", 3), "the underlay host cannot reach the pod");
    assert!(apply(&node, &me, &[], &overlay_config()).unwrap().is_noop(), "idempotent");
}
