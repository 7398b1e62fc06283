//! carve-agent against a real API server: the test writes NodeNetworkConfig
//! status itself (no controller) and runs the agent as a process whose
//! dataplane lives in a network namespace the test made (`--netns`), with the
//! state file and CNI dirs in a temp dir. Needs root, `ip` and `nft`.

use std::process::Command;
use std::time::Duration;

use carve_crds::{NodeNetworkConfig, NodeNetworkConfigSpec};
use carve_e2e::ControlPlane;
use carve_e2e::netns::Netns;
use carve_e2e::testkit::{node, node_agent, wait_for, workspace_bin};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn set_status(client: &Client, name: &str, status: Value) {
    let api = Api::<NodeNetworkConfig>::all(client.clone());
    if api.get_opt(name).await.unwrap().is_none() {
        api.create(&PostParams::default(), &NodeNetworkConfig::new(name, NodeNetworkConfigSpec::default()))
            .await
            .unwrap();
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await.unwrap();
}

async fn network_unavailable(client: &Client, node: &str) -> Option<(String, String)> {
    let n = Api::<Node>::all(client.clone()).get_status(node).await.ok()?;
    let c = n.status?.conditions?.into_iter().find(|c| c.type_ == "NetworkUnavailable")?;
    Some((c.status, c.reason.unwrap_or_default()))
}

async fn wait_condition(client: &Client, node: &str, status: &str, reason: &str) {
    wait_for(&format!("{node} NetworkUnavailable={status} ({reason})"), WAIT, || async {
        match network_unavailable(client, node).await {
            Some((s, r)) if s == status && r == reason => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

fn carve_routes(ns: &Netns) -> Vec<String> {
    let out = ns.ip(&["-j", "route", "show", "proto", "202"]).unwrap();
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
    v.as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn agent_writes_state_conflist_dataplane_then_marks_the_node_ready() {
    // Declared first so it is dropped last, after the control plane has stopped the agents.
    let tmp = carve_e2e::testkit::temp_dir("agent-e2e");
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let client = cp.client().await.unwrap();
    let yaml = "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: overlay\nspec:\n  mode: Overlay\n  cidrs: [10.244.0.0/16]\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], yaml).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node("node-a", "192.168.70.10")).await.unwrap();

    let ns = Netns::unique("agent").unwrap();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    ns.ip(&["link", "set", "eth0", "mtu", "1500", "up"]).unwrap();
    ns.ip(&["link", "set", "eth0p", "up"]).unwrap();
    ns.ip(&["addr", "add", "192.168.70.10/24", "dev", "eth0"]).unwrap();

    let (state, bin, conf) = (tmp.path().join("node-state.json"), tmp.path().join("bin"), tmp.path().join("net.d"));
    let cni = workspace_bin("carve-node-plugin", "carve-cni").unwrap();
    workspace_bin("carve-node-plugin", "carve-ipam").unwrap();
    let source = cni.parent().unwrap();

    // Without NODE_NAME the agent refuses to start and says which variable is missing.
    let agent = workspace_bin("carve-node-plugin", "carve-agent").unwrap();
    let out = Command::new(&agent).env_remove("NODE_NAME").arg("--kubeconfig").arg(cp.kubeconfig()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE_NAME is not set"), "{out:?}");

    let mut cmd = node_agent(&agent, cp.kubeconfig(), "node-a", &ns.path(), tmp.path(), source);
    cmd.args(["--non-masquerade-cidrs", "172.16.0.0/12", "--resync-interval", "1s"]);
    cp.spawn("agent-a", cmd).unwrap();

    // An NNC with no blocks yet: not ready, nothing written.
    set_status(&client, "node-a", json!({ "mode": "Overlay", "nodeIP": "192.168.70.10" })).await;
    wait_condition(&client, "node-a", "True", "WaitingForBlocks").await;
    assert!(!conf.join("10-carve.conflist").exists(), "no conflist before the node has blocks");
    assert!(!state.exists());

    // Blocks for this node and a peer: state file, CNI files, dataplane, then ready.
    let block = |cidr: &str, gw: &str| json!({ "cidr": cidr, "family": "IPv4", "gateway": gw });
    set_status(
        &client,
        "node-a",
        json!({ "pool": "overlay", "mode": "Overlay", "nodeIP": "192.168.70.10", "gateway": "10.244.1.1",
                "blocks": [block("10.244.1.0/24", "10.244.1.1")] }),
    )
    .await;
    set_status(
        &client,
        "node-b",
        json!({ "pool": "overlay", "mode": "Overlay", "nodeIP": "192.168.70.11",
                "blocks": [block("10.244.2.0/24", "10.244.2.1")] }),
    )
    .await;
    wait_condition(&client, "node-a", "False", "CarveReady").await;

    let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(st["node"], "node-a");
    assert_eq!(st["mode"], "Overlay");
    assert_eq!(st["blocks"][0]["cidr"], "10.244.1.0/24");
    assert_eq!(st["clusterPodCidrs"], json!(["10.244.0.0/16"]));
    assert_eq!(st["nonMasqueradeCidrs"], json!(["172.16.0.0/12"]));
    assert_eq!(st["mtu"], 1450, "underlay 1500 - 50");
    assert_eq!(st["nodeIP"], "192.168.70.10");
    let conflist: Value = serde_json::from_slice(&std::fs::read(conf.join("10-carve.conflist")).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "carve-cni");
    assert_eq!(conflist["plugins"][0]["ipam"]["type"], "carve-ipam");
    assert_eq!(conflist["plugins"][1]["type"], "portmap");
    for b in ["carve-cni", "carve-ipam"] {
        assert_eq!(std::fs::read(bin.join(b)).unwrap(), std::fs::read(source.join(b)).unwrap(), "{b} installed");
    }
    let link: Value = serde_json::from_str(&ns.ip(&["-d", "-j", "link", "show", "carve.vxlan"]).unwrap()).unwrap();
    assert_eq!(link[0]["mtu"], 1450);
    assert_eq!(link[0]["linkinfo"]["info_data"]["local"], "192.168.70.10");
    wait_for("a route to node-b's block", WAIT, || async {
        let r = carve_routes(&ns);
        if r == ["10.244.2.0/24"] { Ok(()) } else { Err(format!("{r:?}")) }
    })
    .await;

    // The peer goes away: its route goes too, the node stays ready.
    Api::<NodeNetworkConfig>::all(client.clone()).delete("node-b", &DeleteParams::default()).await.unwrap();
    wait_for("node-b's route removed", WAIT, || async {
        let r = carve_routes(&ns);
        if r.is_empty() { Ok(()) } else { Err(format!("{r:?}")) }
    })
    .await;
    assert_eq!(network_unavailable(&client, "node-a").await.unwrap().0, "False");

    // Restart: the dataplane is reconciled, nothing duplicated, still ready.
    cp.stop_process("agent-a");
    set_status(
        &client,
        "node-c",
        json!({ "mode": "Overlay", "nodeIP": "192.168.70.12", "blocks": [block("10.244.3.0/24", "10.244.3.1")] }),
    )
    .await;
    let mut again = node_agent(&agent, cp.kubeconfig(), "node-a", &ns.path(), tmp.path(), source);
    again.args(["--resync-interval", "1s"]);
    cp.spawn("agent-a2", again).unwrap();
    wait_for("node-c's route after the restart", WAIT, || async {
        let r = carve_routes(&ns);
        if r == ["10.244.3.0/24"] { Ok(()) } else { Err(format!("{r:?}")) }
    })
    .await;
    wait_for("nonMasquerade change in the state file", WAIT, || async {
        let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or_default();
        if st["nonMasqueradeCidrs"] == json!([]) { Ok(()) } else { Err(st.to_string()) }
    })
    .await;
    assert_eq!(network_unavailable(&client, "node-a").await.unwrap().0, "False");
    cp.stop_process("agent-a2");
}
