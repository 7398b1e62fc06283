//! `carvectl` as a user runs it: `plan` on its own, `status` and `check`
//! against a real API server with carve-controller carving a pool.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use carve_crds::{NodeNetworkConfig, NodeNetworkConfigSpec, PodCidr};
use carve_e2e::ControlPlane;
use carve_e2e::testkit::{node, start_controller, wait_for, workspace_bin};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Runs carvectl with `args`; returns (exit code, stdout, stderr).
fn carvectl(args: &[&str], kubeconfig_env: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(workspace_bin("carve-controller", "carvectl").unwrap());
    cmd.args(args).env_remove("KUBECONFIG");
    if let Some(path) = kubeconfig_env {
        cmd.env("KUBECONFIG", path);
    }
    let Output { status, stdout, stderr } = cmd.output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (status.code().expect("exited, not killed"), text(stdout), text(stderr))
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The line of `table` whose whitespace-separated cells start with `first`.
fn row<'a>(table: &'a str, first: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.starts_with(first))
        .unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{table}"))
}

#[test]
fn plan_says_whether_a_pool_fits_and_exits_accordingly() {
    // AKS's overlay default: a /16 of /24 blocks holds 256 nodes, one kept for the surge.
    let (code, out, err) = carvectl(&["plan", "--mode", "Overlay", "--cidr", "10.244.0.0/16", "--nodes", "50"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("FITS: room for 255 nodes + 1 surge, 63750 pods"), "{out}");
    assert_eq!(row(&out, &["smallest", "CIDR"]), ["smallest", "CIDR", "/18"], "51 blocks need 64 = a /18");

    // Azure's flat example: 50 nodes, surge 1, 30 pods -> 1581 addresses + 5 = a /21; carve's /28 blocks
    // (16 pod addresses each, /32-routed) take ceil(30/16) = 2 per node, 102 of the /21's 128.
    let args = ["plan", "--mode", "VNet", "--cidr", "10.224.0.0/21", "--nodes", "50", "-o", "json"];
    let (code, out, err) = carvectl(&args, None);
    assert_eq!(code, 0, "fits: {out}{err}");
    let plan = json_of(&out);
    assert_eq!(plan["fits"], true);
    let v4 = &plan["families"][0];
    assert_eq!(v4["azureFlat"]["addressesNeeded"], 1581);
    assert_eq!(v4["azureFlat"]["smallestPrefix"], 21);
    assert_eq!((v4["blocksNeeded"].as_u64(), v4["blocksAvailable"].as_u64()), (Some(102), Some(128)));
    assert_eq!(v4["blocksPerNode"], 2);
    assert!(plan["warnings"].as_array().unwrap().is_empty(), "no one-block-per-node warning: {out}");
    let (code, out, _) = carvectl(&["plan", "--mode", "VNet", "--cidr", "10.224.0.0/22", "--nodes", "50"], None);
    assert_eq!(code, 1);
    assert!(out.contains("DOES NOT FIT\n  IPv4: 102 blocks needed, the CIDRs hold 64"), "{out}");
    assert!(out.contains("a /21 CIDR or larger fits"), "{out}");

    // A /20 fits; a forbidden range and the Service CIDR overlap are warnings, not failures.
    let args = [
        "plan",
        "--mode",
        "vnet",
        "--cidr",
        "10.224.0.0/20",
        "--cidr",
        "172.16.0.0/12",
        "--nodes",
        "50",
        "--service-cidr",
        "10.224.0.0/24",
    ];
    let (code, out, err) = carvectl(&args, None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("warning: --cidr 172.16.0.0/12 overlaps 172.30.0.0/16"), "{out}");
    assert!(out.contains("warning: --cidr 10.224.0.0/20 overlaps --service-cidr 10.224.0.0/24"), "{out}");

    // Bad input: exit 2, the flag and the fix named on stderr, nothing on stdout.
    for (args, flag, fix) in [
        (vec!["--cidr", "10.244.1.0/16"], "--cidr", "use the network address 10.244.0.0/16"),
        (vec!["--cidr", "10.244.0.0/16", "--block-size", "31"], "--block-size 31", "use /30 or shorter"),
        (vec!["--cidr", "10.244.0.0/16", "--block-size-v6", "80"], "--block-size-v6 80", "add an IPv6 --cidr"),
        (vec!["--cidr", "10.244.0.0/16", "--max-pods", "300"], "--max-pods", "use 1 to 250"),
    ] {
        let mut all = vec!["plan", "--mode", "Overlay", "--nodes", "3"];
        all.extend(args);
        let (code, out, err) = carvectl(&all, None);
        assert_eq!((code, out.as_str()), (2, ""), "{all:?}: {err}");
        assert!(err.contains(flag) && err.contains(fix), "{all:?}: {err}");
    }
}

fn apply_pool(cp: &ControlPlane) {
    let yaml = "apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: overlay\nspec:\n  mode: Overlay\n  cidrs: [10.244.0.0/16]\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], yaml).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Three Nodes carved by a running controller, one at a time so blocks are
/// 10.244.0-2.0/24 in name order, with their podCIDRs written.
async fn three_carved_nodes(cp: &ControlPlane, client: &Client) {
    start_controller(cp, "ctrl", &[]).unwrap();
    let nodes = Api::<Node>::all(client.clone());
    for (i, name) in ["node-a", "node-b", "node-c"].into_iter().enumerate() {
        nodes.create(&PostParams::default(), &node(name, &format!("192.168.10.{}", i + 1))).await.unwrap();
        wait_for(&format!("{name}'s podCIDR"), WAIT, || async {
            let n = nodes.get(name).await.map_err(|e| e.to_string())?;
            n.spec.and_then(|s| s.pod_cidr).ok_or_else(|| "no podCIDR yet".to_string())
        })
        .await;
    }
    let pools = Api::<PodCidr>::all(client.clone());
    wait_for("pool status with 3 allocated blocks", WAIT, || async {
        let p = pools.get("overlay").await.map_err(|e| e.to_string())?;
        p.status.filter(|s| s.allocated == 3).map(|_| ()).ok_or_else(|| "not yet".to_string())
    })
    .await;
}

#[tokio::test]
async fn status_shows_pool_usage_and_each_nodes_block() {
    let cp = ControlPlane::start().await.expect("control plane");
    let kubeconfig = cp.kubeconfig().to_str().unwrap().to_string();

    let (code, _, err) = carvectl(&["status", "--kubeconfig", &kubeconfig], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("carve's CRDs are not installed; run `kubectl apply -f crds/`"), "{err}");

    cp.install_crds().unwrap();
    apply_pool(&cp);
    let (code, out, err) = carvectl(&["status", "--kubeconfig", &kubeconfig], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(no usage yet: is carve-controller running?)"), "{out}");

    let client = cp.client().await.unwrap();
    three_carved_nodes(&cp, &client).await;
    let (code, out, err) = carvectl(&["status", "--kubeconfig", &kubeconfig], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        row(&out, &["overlay"]),
        ["overlay", "Overlay", "IPv4", "10.244.0.0/16", "[#...................]", "3/256", "blocks", "1.2%", "Ready"],
        "{out}"
    );
    for (i, name) in ["node-a", "node-b", "node-c"].into_iter().enumerate() {
        let block = format!("10.244.{i}.0/24");
        let ip = format!("192.168.10.{}", i + 1);
        assert_eq!(row(&out, &[name]), [name, "overlay", &block, &ip, "True", "available", "0"], "{out}");
    }

    // What carve-agent leaves for it: the no-pod-addresses taint on node-b, an
    // address freed twice on node-c (an Event and its repeat).
    let taint = json!({ "spec": { "taints": [{ "key": "carve.dev/no-pod-addresses", "effect": "NoSchedule" }] } });
    Api::<Node>::all(client.clone()).patch("node-b", &PatchParams::default(), &Patch::Merge(taint)).await.unwrap();
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": { "name": "node-c.leak", "namespace": "default" },
        "involvedObject": { "apiVersion": "v1", "kind": "Node", "name": "node-c" },
        "reason": "LeakedAddressFreed", "message": "freed 10.244.2.9 (sandbox gone, eth0)", "type": "Normal",
        "count": 2, "firstTimestamp": "2026-12-06T00:00:00Z", "lastTimestamp": "2026-12-06T00:01:00Z",
        "source": { "component": "carve-agent" },
    }))
    .unwrap();
    Api::<CoreEvent>::namespaced(client.clone(), "default").create(&PostParams::default(), &event).await.unwrap();
    let (code, out, err) = carvectl(&["status", "--kubeconfig", &kubeconfig], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(row(&out, &["node-a"])[5..], ["available", "0"], "{out}");
    assert_eq!(row(&out, &["node-b"])[5..], ["none", "free", "(tainted)", "0"], "{out}");
    assert_eq!(row(&out, &["node-c"])[5..], ["available", "2"], "{out}");

    // The same from $KUBECONFIG, as JSON.
    let (code, out, err) = carvectl(&["status", "-o", "json"], Some(cp.kubeconfig()));
    assert_eq!(code, 0, "{err}");
    let status = json_of(&out);
    let family = &status["pools"][0]["families"][0];
    assert_eq!((family["allocated"].as_i64(), family["capacity"].as_i64()), (Some(3), Some(256)), "{out}");
    assert_eq!(
        status["nodes"][2],
        json!({"node": "node-c", "pool": "overlay", "blocks": ["10.244.2.0/24"],
        "nodeIP": "192.168.10.3", "ready": "True", "reason": null, "noPodAddresses": false, "leaksFreed": 2})
    );
}

async fn nnc_with_blocks(client: &Client, name: &str, blocks: &[&str]) {
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    if nncs.get_opt(name).await.unwrap().is_none() {
        let nnc = NodeNetworkConfig::new(name, NodeNetworkConfigSpec::default());
        nncs.create(&PostParams::default(), &nnc).await.unwrap();
    }
    let blocks: Vec<Value> = blocks.iter().map(|b| json!({"cidr": b, "family": "IPv4"})).collect();
    let patch = json!({"status": {"pool": "overlay", "mode": "Overlay", "blocks": blocks}});
    nncs.patch_status(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
}

#[tokio::test]
async fn check_passes_a_clean_cluster_and_names_every_inconsistency() {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().unwrap();
    apply_pool(&cp);
    let client = cp.client().await.unwrap();
    three_carved_nodes(&cp, &client).await;

    let (code, out, err) = carvectl(&["check"], Some(cp.kubeconfig()));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "no problems found in 1 PodCIDRs, 3 NodeNetworkConfigs, 3 Nodes\n");

    // With the controller stopped nothing repairs what an admin writes by hand.
    cp.stop_process("ctrl");
    let nodes = Api::<Node>::all(client.clone());
    for name in ["node-d", "node-e"] {
        nodes.create(&PostParams::default(), &node(name, "192.168.10.9")).await.unwrap();
    }
    nnc_with_blocks(&client, "ghost", &["10.244.60.0/24"]).await; // no such Node
    nnc_with_blocks(&client, "node-d", &["10.244.0.0/24"]).await; // node-a's block
    nnc_with_blocks(&client, "node-e", &["10.99.0.0/24"]).await; // in no pool
    nnc_with_blocks(&client, "node-c", &["10.244.3.0/24"]).await; // node-c's podCIDR is 10.244.2.0/24

    let (code, out, err) = carvectl(&["check"], Some(cp.kubeconfig()));
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "duplicate block: 10.244.0.0/24 is in nnc/node-a and nnc/node-d",
        "block outside every pool: 10.99.0.0/24 of nnc/node-e is in no PodCIDR's spec.cidrs",
        "NodeNetworkConfig without a Node: nnc/ghost has no node/ghost",
        "podCIDR mismatch: node/node-c has spec.podCIDRs 10.244.2.0/24 but nnc/node-c has blocks 10.244.3.0/24",
    ];
    for (line, want) in lines.iter().zip(expected) {
        assert!(line.starts_with(want), "want {want:?}, got:\n{out}");
    }
    assert_eq!(lines[4..], ["", "4 problem(s) found in 1 PodCIDRs, 6 NodeNetworkConfigs, 5 Nodes"], "{out}");
    assert!(lines[0].contains("nnc/node-a should keep it; stop carve-controller, delete nnc/node-d"), "{out}");

    let (code, out, _) = carvectl(&["check", "-o", "json"], Some(cp.kubeconfig()));
    assert_eq!(code, 1);
    let report = json_of(&out);
    let kinds: Vec<&str> = report["findings"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["duplicateBlock", "blockOutsidePools", "nncWithoutNode", "podCidrMismatch"]);
    assert_eq!(report["findings"][0]["nncs"], json!(["node-a", "node-d"]));
    assert_eq!(report["findings"][0]["keep"], "node-a");
    assert_eq!(report["ok"], false);

    // Following the advice (controller still stopped) makes the cluster consistent again.
    let nncs = Api::<NodeNetworkConfig>::all(client.clone());
    for name in ["ghost", "node-d", "node-e", "node-c"] {
        nncs.delete(name, &Default::default()).await.unwrap();
    }
    start_controller(&cp, "ctrl-again", &[]).unwrap();
    wait_for("five Ready NNCs and podCIDRs on node-d and node-e", WAIT, || async {
        let ready = nncs
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .filter(|n| {
                n.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        let mut with_pod_cidr = 0;
        for name in ["node-d", "node-e"] {
            let n = nodes.get(name).await.map_err(|e| e.to_string())?;
            with_pod_cidr += usize::from(n.spec.is_some_and(|s| s.pod_cidr.is_some()));
        }
        if (ready, with_pod_cidr) == (5, 2) { Ok(()) } else { Err(format!("{ready} ready, {with_pod_cidr} podCIDRs")) }
    })
    .await;
    let (code, out, err) = carvectl(&["check"], Some(cp.kubeconfig()));
    assert_eq!((code, out.as_str()), (0, "no problems found in 1 PodCIDRs, 5 NodeNetworkConfigs, 5 Nodes\n"), "{err}");
    let c = nncs.get("node-c").await.unwrap();
    assert_eq!(
        c.status.as_ref().map(|s| s.blocks.iter().map(|b| b.cidr.clone()).collect::<Vec<_>>()).unwrap_or_default(),
        ["10.244.2.0/24"],
        "node-c's podCIDR adopted back"
    );
}
