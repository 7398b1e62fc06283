//! The install path a user takes — `kubectl apply -f crds/`, `-f manifests/`,
//! a pool from `examples/` — on the real API server. The controller and the
//! agent run with the manifests' own flags as their ServiceAccounts
//! (impersonated, with the node name a DaemonSet pod's token carries), so the
//! RBAC and the admission policy are shown to be enough, and the writes they
//! must refuse are refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use carve_crds::{NodeNetworkConfig, PodCidr};
use carve_e2e::netns::Netns;
use carve_e2e::testkit::{node, node_agent, wait_for, workspace_bin};
use carve_e2e::{ControlPlane, Options, repo_root};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const CONTROLLER_SA: &str = "system:serviceaccount:carve-system:carve-controller";
const AGENT_SA: &str = "system:serviceaccount:carve-system:carve-agent";

/// Every YAML document of every file in `dir`, with the file it came from.
fn documents(dir: &str) -> Vec<(PathBuf, serde_yaml::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            if !v.is_null() {
                docs.push((file.clone(), v));
            }
        }
    }
    docs
}

/// The one object of `kind` named `name` in manifests/.
fn manifest<T: DeserializeOwned>(kind: &str, name: &str) -> T {
    let doc = documents("manifests")
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("manifests/ has no {kind} {name}"));
    serde_yaml::from_value(doc).unwrap()
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

/// The container's args without the flags named in `drop` (ports and host
/// paths that only make sense inside a pod).
fn args_without(c: &Container, drop: &[&str]) -> Vec<String> {
    c.args.clone().unwrap_or_default().into_iter().filter(|a| !drop.iter().any(|d| a.starts_with(d))).collect()
}

/// A kubeconfig for `cp` that acts as `user` (a ServiceAccount), with the
/// groups every ServiceAccount has and, for DaemonSet pods, the node their
/// token is bound to.
fn impersonating(cp: &ControlPlane, file: &str, user: &str, node_name: Option<&str>) -> PathBuf {
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    let namespace = user.split(':').nth(2).unwrap();
    let auth = &mut cfg["users"][0]["user"];
    auth["as"] = user.into();
    auth["as-groups"] = serde_yaml::to_value([
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_string(),
    ])
    .unwrap();
    if let Some(n) = node_name {
        auth["as-user-extra"] = serde_yaml::to_value(
            [("authentication.kubernetes.io/node-name".to_string(), vec![n.to_string()])]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap();
    }
    let path = cp.dir().join(file);
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    path
}

async fn client_for(path: &Path) -> Client {
    carve_e2e::controlplane::client_from_kubeconfig(path).await.unwrap()
}

/// Asserts the API server refused a write with 403 and a message containing `says`.
fn refused<T: std::fmt::Debug>(what: &str, r: kube::Result<T>, says: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(says) => {}
        other => panic!("{what}: expected 403 saying {says:?}, got {other:?}"),
    }
}

fn kubectl_apply(cp: &ControlPlane, args: &[&str]) {
    let out = cp.kubectl().args(args).output().unwrap();
    assert!(out.status.success(), "kubectl {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Metadata of every request; the test reads who asked for what.
const AUDIT_POLICY: &str =
    "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n";

/// (user, API group, resource[/subresource], verb)
type Permission = (String, String, String, String);

/// Granted by the manifests but out of this test's reach, and why.
const NOT_REACHED: &[(&str, &str, &str, &str, &str)] = &[
    (CONTROLLER_SA, "carve.dev", "nodenetworkconfigs", "get", "re-reads an NNC whose create conflicted (409)"),
    (CONTROLLER_SA, "events.k8s.io", "events", "patch", "a repeated Event becomes a series"),
    (AGENT_SA, "carve.dev", "nodenetworkconfigs", "patch", "the node's side of its NNC: dynamic mode"),
    (AGENT_SA, "", "nodes", "patch", "the no-pod-addresses taint: a node out of addresses"),
    (AGENT_SA, "events.k8s.io", "events", "create", "a leaked address freed"),
    (AGENT_SA, "events.k8s.io", "events", "patch", "a repeated Event becomes a series"),
];

/// Every (ServiceAccount, group, resource, verb) the manifests' bindings grant.
fn granted() -> BTreeSet<Permission> {
    let docs: Vec<serde_yaml::Value> = documents("manifests").into_iter().map(|(_, d)| d).collect();
    let mut out = BTreeSet::new();
    for binding in docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") {
        let role = docs
            .iter()
            .find(|d| d["kind"] == binding["roleRef"]["kind"] && d["metadata"]["name"] == binding["roleRef"]["name"])
            .unwrap_or_else(|| panic!("no role for {:?}", binding["metadata"]["name"]));
        for subject in binding["subjects"].as_sequence().unwrap() {
            let user = format!(
                "system:serviceaccount:{}:{}",
                subject["namespace"].as_str().unwrap(),
                subject["name"].as_str().unwrap()
            );
            let strings = |v: &serde_yaml::Value| -> Vec<String> {
                v.as_sequence().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
            };
            for rule in role["rules"].as_sequence().unwrap() {
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        for verb in strings(&rule["verbs"]) {
                            out.insert((user.clone(), group.clone(), resource.clone(), verb));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What impersonated users were allowed, and what they were refused, per the audit log.
fn audited(log: &Path) -> (BTreeSet<Permission>, Vec<String>) {
    let (mut used, mut refused) = (BTreeSet::new(), Vec::new());
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else { continue };
        let Some(user) = e["impersonatedUser"]["username"].as_str() else { continue };
        let o = &e["objectRef"];
        let mut resource = o["resource"].as_str().unwrap_or_default().to_string();
        if let Some(sub) = o["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let p = (
            user.to_string(),
            o["apiGroup"].as_str().unwrap_or_default().to_string(),
            resource,
            e["verb"].as_str().unwrap_or_default().to_string(),
        );
        if e["responseStatus"]["code"] == 403 {
            refused.push(format!("{p:?} {}", e["responseStatus"]["message"]));
        } else {
            used.insert(p);
        }
    }
    (used, refused)
}

#[tokio::test]
async fn every_manifest_and_example_passes_server_side_dry_run() {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().expect("CRDs");
    // The namespace must exist for its objects to be checked; a dry run creates nothing.
    kubectl_apply(&cp, &["apply", "--dry-run=server", "-f", "manifests/00-namespace.yaml"]);
    kubectl_apply(&cp, &["apply", "-f", "manifests/00-namespace.yaml"]);
    let mut files: Vec<String> = documents("manifests")
        .into_iter()
        .chain(documents("examples"))
        .map(|(f, _)| f.strip_prefix(repo_root()).unwrap().display().to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    files.sort();
    assert!(files.len() >= 10, "manifests and examples: {files:?}");
    for file in &files {
        kubectl_apply(&cp, &["apply", "--dry-run=server", "--validate=strict", "-f", file]);
    }
    let created = cp.kubectl_ok(&["get", "podcidrs,deployments,daemonsets", "-A", "-o", "name"]).unwrap();
    assert_eq!(created.trim(), "", "a dry run creates nothing");

    // Every example says in its first line when to use it.
    for (file, _) in documents("examples") {
        let first = std::fs::read_to_string(&file).unwrap().lines().next().unwrap_or_default().to_string();
        assert!(first.starts_with("# ") && first.contains("use it when"), "{}: {first:?}", file.display());
    }

    // No wildcard anywhere in the RBAC.
    for (file, doc) in documents("manifests") {
        if doc["kind"] != "ClusterRole" && doc["kind"] != "Role" {
            continue;
        }
        let rules = doc["rules"].as_sequence().unwrap();
        for rule in rules {
            for key in ["apiGroups", "resources", "verbs"] {
                let items = rule[key].as_sequence().unwrap();
                assert!(items.iter().all(|v| v.as_str() != Some("*")), "{} has a wildcard in {key}", file.display());
            }
        }
    }

    // The flags and subcommands the workloads pass exist in the binaries.
    let deploy: Deployment = manifest("Deployment", "carve-controller");
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    let controller_help =
        Command::new(workspace_bin("carve-controller", "carve-controller").unwrap()).arg("--help").output().unwrap();
    let ds: DaemonSet = manifest("DaemonSet", "carve-agent");
    let ds_pod = ds.spec.unwrap().template.spec.unwrap();
    let agent = workspace_bin("carve-node-plugin", "carve-agent").unwrap();
    let agent_help = Command::new(&agent).arg("--help").output().unwrap();
    for (c, help) in [
        (container(&pod.containers, "controller"), &controller_help.stdout),
        (container(&ds_pod.containers, "agent"), &agent_help.stdout),
    ] {
        let help = String::from_utf8_lossy(help);
        for arg in c.args.clone().unwrap_or_default() {
            let flag = arg.split('=').next().unwrap();
            assert!(help.contains(&format!("{flag} ")), "{}: {flag} is not a flag of the binary", c.name);
        }
    }
    let init = container(ds_pod.init_containers.as_deref().unwrap(), "install-cni");
    let sub = init.command.clone().unwrap();
    assert_eq!(sub[0], "/usr/local/bin/carve-agent");
    let out = Command::new(&agent).args(&sub[1..]).arg("--help").output().unwrap();
    assert!(out.status.success(), "carve-agent {} --help: {out:?}", sub[1..].join(" "));
}

fn nnc_blocks(nnc: &NodeNetworkConfig) -> (String, Vec<String>) {
    let s = nnc.status.clone().unwrap_or_default();
    (s.pool.unwrap_or_default(), s.blocks.into_iter().map(|b| b.cidr).collect())
}

async fn wait_nnc(client: &Client, name: &str, pool: &str, blocks: &[&str]) {
    let api = Api::<NodeNetworkConfig>::all(client.clone());
    let want = (pool.to_string(), blocks.iter().map(|b| b.to_string()).collect::<Vec<_>>());
    wait_for(&format!("nnc/{name} = {want:?}"), WAIT, || async {
        match api.get_opt(name).await {
            Ok(Some(n)) if nnc_blocks(&n) == want => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.map(|n| nnc_blocks(&n))))),
        }
    })
    .await
}

async fn network_unavailable(client: &Client, node: &str) -> Option<(String, String)> {
    let n = Api::<Node>::all(client.clone()).get_status(node).await.ok()?;
    let c = n.status?.conditions?.into_iter().find(|c| c.type_ == "NetworkUnavailable")?;
    Some((c.status, c.reason.unwrap_or_default()))
}

fn condition_patch(type_: &str, status: &str, reason: &str) -> Patch<Value> {
    Patch::Strategic(json!({ "status": { "conditions": [{
        "type": type_, "status": status, "reason": reason, "message": "written by a test",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
    }] } }))
}

#[tokio::test]
async fn controller_and_agent_run_with_exactly_the_manifests_rbac() {
    let tmp = std::env::temp_dir().join(format!("carve-manifests-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // Every request is audited, so the test sees what the binaries really asked for.
    let (policy, audit_log) = (tmp.join("audit-policy.yaml"), tmp.join("audit.log"));
    std::fs::write(&policy, AUDIT_POLICY).unwrap();
    let cp = ControlPlane::start_with(Options {
        apiserver_args: vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", audit_log.display()),
        ],
        ..Default::default()
    })
    .await
    .expect("control plane");
    cp.install_crds().expect("CRDs");
    kubectl_apply(&cp, &["apply", "-f", "manifests/"]);
    kubectl_apply(&cp, &["apply", "-f", "examples/two-pools.yaml"]);
    let admin = cp.client().await.unwrap();

    // Three nodes: one per agent pool of the example, one in neither.
    let nodes = Api::<Node>::all(admin.clone());
    for (name, ip, pool) in [
        ("node-a", "192.168.71.10", Some("system")),
        ("node-b", "192.168.71.11", Some("user")),
        ("node-c", "192.168.71.12", None),
    ] {
        let mut n = node(name, ip);
        if let Some(p) = pool {
            n.metadata.labels = Some([("kubernetes.azure.com/agentpool".to_string(), p.to_string())].into());
        }
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }

    // carve-controller as its ServiceAccount, with the Deployment's flags.
    let deploy: Deployment = manifest("Deployment", "carve-controller");
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    let c = container(&pod.containers, "controller");
    let controller_cfg = impersonating(&cp, "controller.kubeconfig", CONTROLLER_SA, None);
    let mut cmd = Command::new(workspace_bin("carve-controller", "carve-controller").unwrap());
    cmd.args(args_without(c, &["--metrics-addr"]))
        .arg("--kubeconfig")
        .arg(&controller_cfg)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("POD_NAME", "carve-controller-0")
        .env("POD_NAMESPACE", "carve-system")
        .env("CARVE_LOG_LEVEL", "info,kube_runtime=warn");
    cp.spawn("controller", cmd).unwrap();

    wait_nnc(&admin, "node-a", "system", &["10.244.0.0/24"]).await;
    wait_nnc(&admin, "node-b", "user", &["10.245.0.0/24"]).await;
    let nncs = Api::<NodeNetworkConfig>::all(admin.clone());
    wait_for("nnc/node-c NoMatchingPool", WAIT, || async {
        let n = nncs.get_opt("node-c").await.map_err(|e| e.to_string())?.ok_or("no nnc/node-c")?;
        let s = n.status.unwrap_or_default();
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.reason == "NoMatchingPool")
            .map(|_| ())
            .ok_or(format!("{s:?}"))
    })
    .await;
    wait_for("Node podCIDRs", WAIT, || async {
        let a = nodes.get("node-a").await.map_err(|e| e.to_string())?;
        let b = nodes.get("node-b").await.map_err(|e| e.to_string())?;
        let cidr = |n: &Node| n.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
        (cidr(&a) == "10.244.0.0/24" && cidr(&b) == "10.245.0.0/24").then_some(()).ok_or(format!(
            "{} {}",
            cidr(&a),
            cidr(&b)
        ))
    })
    .await;
    let pools = Api::<PodCidr>::all(admin.clone());
    wait_for("pool status written", WAIT, || async {
        let p = pools.get_status("system").await.map_err(|e| e.to_string())?;
        (p.status.as_ref().map(|s| s.allocated) == Some(1)).then_some(()).ok_or(format!("{:?}", p.status))
    })
    .await;
    let lease = Api::<Lease>::namespaced(admin.clone(), "carve-system").get("carve-controller").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("carve-controller-0"));
    wait_for("an Event from carve-controller about node-c", WAIT, || async {
        let events = Api::<Event>::namespaced(admin.clone(), "default").list(&ListParams::default()).await.unwrap();
        events
            .items
            .iter()
            .find(|e| {
                e.reporting_controller.as_deref() == Some("carve-controller")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-c")
            })
            .map(|_| ())
            .ok_or(format!("{} events", events.items.len()))
    })
    .await;

    // carve-agent for node-a as its ServiceAccount, with the DaemonSet's flags
    // (less the host /proc bind, which only a pod has), programming a namespace.
    let ns = Netns::new(&format!("mfa-{}", std::process::id())).unwrap();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns.ip(&["link", "set", "eth0p", "up"]).unwrap();
    ns.ip(&["addr", "add", "192.168.71.10/24", "dev", "eth0"]).unwrap();
    let ds: DaemonSet = manifest("DaemonSet", "carve-agent");
    let ds_pod = ds.spec.unwrap().template.spec.unwrap();
    let a = container(&ds_pod.containers, "agent");
    let agent_cfg = impersonating(&cp, "agent-a.kubeconfig", AGENT_SA, Some("node-a"));
    let cni = workspace_bin("carve-node-plugin", "carve-cni").unwrap();
    workspace_bin("carve-node-plugin", "carve-ipam").unwrap();
    let agent = workspace_bin("carve-node-plugin", "carve-agent").unwrap();
    let mut cmd = node_agent(&agent, &agent_cfg, "node-a", &ns.path(), &tmp, cni.parent().unwrap());
    cmd.args(args_without(a, &["--proc-sys-dir", "--metrics-addr"]));
    cp.spawn("agent-a", cmd).unwrap();
    wait_for("node-a NetworkUnavailable=False (CarveReady)", WAIT, || async {
        match network_unavailable(&admin, "node-a").await {
            Some((s, r)) if s == "False" && r == "CarveReady" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(tmp.join("net.d/10-carve.conflist").exists());
    // A Node that goes away: the controller confirms with a GET and deletes its NNC.
    nodes.delete("node-c", &DeleteParams::default()).await.unwrap();
    wait_for("nnc/node-c deleted after its Node", WAIT, || async {
        match nncs.get_opt("node-c").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.is_some()))),
        }
    })
    .await;

    // Enough: nothing the two binaries asked for was refused. Minimal: every
    // permission the manifests grant was used, but for the few this flow cannot reach.
    let granted = granted();
    let unused = wait_for("every granted permission used by the binaries", WAIT, || async {
        let (used, refused) = audited(&audit_log);
        assert!(refused.is_empty(), "the API server refused the binaries: {refused:#?}");
        let unused: BTreeSet<&Permission> = granted.iter().filter(|p| !used.contains(*p)).collect();
        let unexplained: Vec<_> = unused
            .iter()
            .filter(|p| !NOT_REACHED.iter().any(|n| n.0 == p.0 && n.1 == p.1 && n.2 == p.2 && n.3 == p.3))
            .collect();
        if unexplained.is_empty() { Ok(unused.len()) } else { Err(format!("granted but unused: {unexplained:?}")) }
    })
    .await;
    eprintln!("granted: {}, not reached by this flow: {unused}", granted.len());
    for name in ["controller", "agent-a"] {
        let log = cp.log_tail(name, 400);
        assert!(!log.contains("forbidden") && !log.contains("Forbidden"), "{name} was refused something:\n{log}");
    }

    // What the agent of node-a may not do.
    let agent_a = client_for(&agent_cfg).await;
    let a_nodes = Api::<Node>::all(agent_a.clone());
    let a_nncs = Api::<NodeNetworkConfig>::all(agent_a.clone());
    let pp = PatchParams::default();
    refused(
        "agent of node-a writing node-b's condition",
        a_nodes.patch_status("node-b", &pp, &condition_patch("NetworkUnavailable", "True", "Hijacked")).await,
        "carve-agent on node node-a may not write Node node-b",
    );
    refused(
        "agent writing its Node's Ready condition",
        a_nodes.patch_status("node-a", &pp, &condition_patch("Ready", "False", "Hijacked")).await,
        "only the NetworkUnavailable condition",
    );
    a_nodes
        .patch_status("node-a", &pp, &condition_patch("NetworkUnavailable", "False", "CarveReady"))
        .await
        .expect("its own NetworkUnavailable condition");
    // The whole list, as the agent writes it: the API server's own taints stay.
    let existing = nodes.get("node-a").await.unwrap().spec.and_then(|s| s.taints).unwrap_or_default();
    let taint = |key: &str| {
        let mut taints = serde_json::to_value(&existing).unwrap();
        taints.as_array_mut().unwrap().push(json!({ "key": key, "effect": "NoSchedule" }));
        Patch::Merge(json!({ "spec": { "taints": taints } }))
    };
    a_nodes.patch("node-a", &pp, &taint("carve.dev/no-pod-addresses")).await.expect("its own no-pod-addresses taint");
    refused(
        "agent tainting node-b",
        a_nodes.patch("node-b", &pp, &taint("carve.dev/no-pod-addresses")).await,
        "carve-agent on node node-a may not write Node node-b",
    );
    refused(
        "agent adding another taint",
        a_nodes.patch("node-a", &pp, &taint("dedicated")).await,
        "only the carve.dev/no-pod-addresses taint",
    );
    refused(
        "agent labelling its Node",
        a_nodes.patch("node-a", &pp, &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } }))).await,
        "only the carve.dev/no-pod-addresses taint",
    );
    refused(
        "agent cordoning its Node",
        a_nodes.patch("node-a", &pp, &Patch::Merge(json!({ "spec": { "unschedulable": true } }))).await,
        "only the carve.dev/no-pod-addresses taint",
    );
    let spec = Patch::Merge(json!({ "spec": { "requestedIPs": { "ipv4": 16 } } }));
    a_nncs.patch("node-a", &pp, &spec).await.expect("its own NNC spec");
    refused(
        "agent writing node-b's NNC spec",
        a_nncs.patch("node-b", &pp, &spec).await,
        "may not write NodeNetworkConfig node-b",
    );
    refused(
        "agent labelling its NNC",
        a_nncs.patch("node-a", &pp, &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } }))).await,
        "only the spec",
    );
    let status = Patch::Merge(json!({ "status": { "blocks": [] } }));
    refused("agent writing NNC status", a_nncs.patch_status("node-a", &pp, &status).await, "forbidden");
    refused("agent writing another NNC's status", a_nncs.patch_status("node-b", &pp, &status).await, "forbidden");
    refused("agent deleting its NNC", a_nncs.delete("node-a", &DeleteParams::default()).await, "forbidden");
    // The controller creates every NNC (with its owner reference); an agent only updates its own.
    let own_new = NodeNetworkConfig::new("node-c", Default::default());
    refused("agent creating an NNC", a_nncs.create(&PostParams::default(), &own_new).await, "forbidden");
    let apply = Patch::Apply(json!({
        "apiVersion": "carve.dev/v1alpha1", "kind": "NodeNetworkConfig",
        "metadata": { "name": "node-c" }, "spec": { "requestedIPs": { "ipv4": 16 } },
    }));
    refused(
        "agent creating an NNC by server-side apply",
        a_nncs.patch("node-c", &PatchParams::apply("carve-agent"), &apply).await,
        "forbidden",
    );
    let a_pools = Api::<PodCidr>::all(agent_a.clone());
    let grow = Patch::Merge(json!({ "spec": { "cidrs": ["10.244.0.0/16", "10.246.0.0/16"] } }));
    refused("agent growing a pool", a_pools.patch("system", &pp, &grow).await, "forbidden");
    refused("agent writing pool status", a_pools.patch_status("system", &pp, &status).await, "forbidden");
    refused("agent listing Nodes", a_nodes.list(&ListParams::default()).await, "forbidden");
    refused(
        "agent reading Secrets",
        Api::<Secret>::namespaced(agent_a.clone(), "carve-system").list(&ListParams::default()).await,
        "forbidden",
    );
    // Credentials that name no node (not a DaemonSet pod's token) write nothing.
    let no_node = client_for(&impersonating(&cp, "agent-anon.kubeconfig", AGENT_SA, None)).await;
    refused(
        "agent credentials without a node",
        Api::<Node>::all(no_node)
            .patch_status("node-a", &pp, &condition_patch("NetworkUnavailable", "False", "CarveReady"))
            .await,
        "name no node",
    );

    // What the controller may not do.
    let ctl = client_for(&controller_cfg).await;
    refused(
        "controller writing Node status",
        Api::<Node>::all(ctl.clone())
            .patch_status("node-a", &pp, &condition_patch("NetworkUnavailable", "True", "Hijacked"))
            .await,
        "forbidden",
    );
    refused(
        "controller writing the node's NNC spec",
        Api::<NodeNetworkConfig>::all(ctl.clone()).patch("node-a", &pp, &spec).await,
        "forbidden",
    );
    refused(
        "controller changing a pool",
        Api::<PodCidr>::all(ctl.clone()).patch("system", &pp, &grow).await,
        "forbidden",
    );
    refused(
        "controller deleting a pool",
        Api::<PodCidr>::all(ctl.clone()).delete("user", &DeleteParams::default()).await,
        "forbidden",
    );
    refused(
        "controller deleting a Node",
        Api::<Node>::all(ctl.clone()).delete("node-c", &DeleteParams::default()).await,
        "forbidden",
    );
    refused(
        "controller taking another Lease",
        Api::<Lease>::namespaced(ctl.clone(), "kube-system").list(&ListParams::default()).await,
        "forbidden",
    );
    refused(
        "controller reading Secrets",
        Api::<Secret>::namespaced(ctl.clone(), "carve-system").list(&ListParams::default()).await,
        "forbidden",
    );

    drop(cp);
    let _ = std::fs::remove_dir_all(&tmp);
}
