//! `reconcile` against a mock API server: each test lists the requests one
//! Node's reconcile must send, in order, checks what they carry and answers
//! them as the API server would (the "ApiServerVerifier" of kube-rs's
//! controller-rs example). No network, no sleeps: every wait is for the next
//! request, with a timeout, so a missing request fails by name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use carve_crds::{NodeNetworkConfig, PodCidr};
use futures::channel::mpsc;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_test::mock::{self, Handle, SendResponse};

use super::{Config, Ctx, Error, FIELD_MANAGER, Stores, error_policy, reconcile};
use crate::metrics::{Metrics, ReasonLabels};
use crate::views::PartialNode;

/// Longest wait for a request or for the reconcile to end.
const WAIT: Duration = Duration::from_secs(5);
const NNCS: &str = "/apis/carve.dev/v1alpha1/nodenetworkconfigs";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// The API server's side of the mock client.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request the reconciler sent, waiting for its answer.
struct Call {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    content_type: String,
    body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    fn respond(self, code: u16, body: &Value) {
        let response = Response::builder()
            .status(code)
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("response JSON")))
            .expect("response");
        self.send.send_response(response);
    }

    fn ok(self, body: &Value) {
        self.respond(200, body);
    }

    /// A `Status` failure, as the API server answers a refused request.
    fn fail(self, code: u16, reason: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("mock API server: {reason}"), "reason": reason, "code": code,
        });
        self.respond(code, &status);
    }

    /// The request body answered back as stored, with the fields the API
    /// server adds.
    fn stored(self, uid: &str, resource_version: &str) {
        let mut object = self.body.clone();
        object["metadata"]["uid"] = json!(uid);
        object["metadata"]["resourceVersion"] = json!(resource_version);
        object["metadata"]["generation"] = json!(1);
        self.ok(&object);
    }

    /// Answered with what was sent.
    fn echo(self) {
        let object = self.body.clone();
        self.ok(&object);
    }

    /// An apply answered with the object it made: the applied fields, and an
    /// (empty) spec where a status apply carries none.
    fn applied(self) {
        let mut object = self.body.clone();
        if object.get("spec").is_none() {
            object["spec"] = json!({});
        }
        self.ok(&object);
    }
}

impl ApiServer {
    /// The next request, which must be `method path`.
    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let next = timeout(WAIT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("expected {method} {path}: nothing sent within {WAIT:?}"));
        let (request, send) = next.expect("the client is gone");
        let (parts, body) = request.into_parts();
        let query = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        let bytes = body.collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
        let call = Call {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query,
            content_type: parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().into(),
            body,
            send,
        };
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "expected {method} {path}, got {} {} with {}",
            call.method,
            call.path,
            call.body
        );
        call
    }

    /// The next request, which must be a forced server-side apply to `path`
    /// under carve-controller's field manager.
    async fn expect_apply(&mut self, path: &str) -> Call {
        let call = self.expect(Method::PATCH, path).await;
        assert_eq!(call.content_type, "application/apply-patch+yaml", "{path}");
        assert_eq!(call.query.get("fieldManager").map(String::as_str), Some(FIELD_MANAGER), "{path}");
        assert_eq!(call.query.get("force").map(String::as_str), Some("true"), "{path}");
        call
    }

    /// The reconcile's result, once it ends; any request it sends meanwhile
    /// was not in the script and fails the test.
    async fn finish(&mut self, run: JoinHandle<Result<Action, Error>>) -> Result<Action, Error> {
        tokio::select! {
            done = timeout(WAIT, run) => done.expect("the reconcile did not end").expect("the reconcile panicked"),
            Some((request, _)) = self.handle.next_request() => {
                panic!("unexpected request: {} {}", request.method(), request.uri())
            }
        }
    }
}

/// A controller context over the mock API server and hand-filled caches.
struct Harness {
    ctx: Arc<Ctx>,
    api: ApiServer,
    nncs: Writer<NodeNetworkConfig>,
    nudges: mpsc::UnboundedReceiver<ObjectRef<PartialNode>>,
    _pools: Writer<PodCidr>,
    _nodes: Writer<PartialNode>,
}

impl Harness {
    fn new(pools: &[PodCidr], nncs: &[NodeNetworkConfig]) -> Self {
        let (mock_service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock_service, "default");
        let (pool_store, mut pool_writer) = reflector::store();
        for pool in pools {
            pool_writer.apply_watcher_event(&watcher::Event::Apply(pool.clone()));
        }
        let (nnc_store, nnc_writer) = reflector::store();
        let (node_store, node_writer) = reflector::store();
        let (nudge, nudges) = mpsc::unbounded();
        let reporter = Reporter { controller: "carve-controller".into(), instance: Some("test".into()) };
        let ctx = Ctx::new(
            client.clone(),
            Config { set_node_pod_cidrs: true },
            Stores { pools: pool_store, nncs: nnc_store, nodes: node_store },
            Recorder::new(client, reporter),
            Arc::new(Metrics::new()),
            nudge,
        );
        let mut harness = Harness {
            ctx: Arc::new(ctx),
            api: ApiServer { handle },
            nncs: nnc_writer,
            nudges,
            _pools: pool_writer,
            _nodes: node_writer,
        };
        for nnc in nncs {
            harness.cache_nnc(nnc.clone());
        }
        harness
    }

    /// The NNC watch delivers `nnc`.
    fn cache_nnc(&mut self, nnc: NodeNetworkConfig) {
        self.nncs.apply_watcher_event(&watcher::Event::Apply(nnc));
    }

    /// Starts one reconcile of `node`; the test answers its requests.
    fn start(&self, node: &PartialNode) -> JoinHandle<Result<Action, Error>> {
        tokio::spawn(reconcile(Arc::new(node.clone()), self.ctx.clone()))
    }

    fn error_policy(&self, node: &PartialNode, error: &Error) -> Action {
        error_policy(Arc::new(node.clone()), error, self.ctx.clone())
    }

    fn errors_counted(&self, reason: &'static str) -> u64 {
        self.ctx.metrics.reconcile_errors.get_or_create(&ReasonLabels { reason }).get()
    }
}

fn overlay_pool(cidr: &str) -> PodCidr {
    serde_json::from_value(json!({
        "apiVersion": "carve.dev/v1alpha1", "kind": "PodCIDR",
        "metadata": {"name": "overlay", "uid": "pool-uid", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"mode": "Overlay", "cidrs": [cidr], "blockSize": {"ipv4": 24}},
    }))
    .expect("PodCIDR")
}

/// A VNet pool whose nodes ask for addresses and give back blocks.
fn dynamic_vnet_pool() -> PodCidr {
    serde_json::from_value(json!({
        "apiVersion": "carve.dev/v1alpha1", "kind": "PodCIDR",
        "metadata": {"name": "vnet", "uid": "vnet-uid", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"mode": "VNet", "cidrs": ["10.240.0.0/24"], "blockSize": {"ipv4": 28},
                 "allocation": {"strategy": "Dynamic"}},
    }))
    .expect("PodCIDR")
}

/// A Node as the Node cache holds it: InternalIP, no podCIDR.
fn node(name: &str, uid: &str, ip: &str) -> PartialNode {
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": uid, "resourceVersion": "100"},
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]},
    }))
    .expect("Node")
}

/// An NNC named after `node`, owned by the Node with `owner_uid`.
fn nnc(node: &str, owner_uid: &str, uid: &str, resource_version: &str, rest: Value) -> NodeNetworkConfig {
    let mut object = json!({
        "apiVersion": "carve.dev/v1alpha1", "kind": "NodeNetworkConfig",
        "metadata": {
            "name": node, "uid": uid, "resourceVersion": resource_version, "generation": 1,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": owner_uid, "controller": true}],
        },
        "spec": {},
    });
    if let (Some(object), Value::Object(rest)) = (object.as_object_mut(), rest) {
        object.extend(rest);
    }
    serde_json::from_value(object).expect("NodeNetworkConfig")
}

fn owner_of(body: &Value) -> (&str, &str, &str, bool) {
    let owner = &body["metadata"]["ownerReferences"][0];
    (
        owner["kind"].as_str().unwrap_or_default(),
        owner["name"].as_str().unwrap_or_default(),
        owner["uid"].as_str().unwrap_or_default(),
        owner["controller"].as_bool().unwrap_or_default(),
    )
}

fn block_cidrs(status: &Value) -> Vec<&str> {
    status["blocks"].as_array().into_iter().flatten().filter_map(|b| b["cidr"].as_str()).collect()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// A new Node's whole first reconcile in an Overlay pool: the requests, in
/// order, and the status written (to answer later reconciles against).
async fn first_reconcile(h: &mut Harness, node: &PartialNode) -> Value {
    let run = h.start(node);
    let name = node.metadata.name.clone().unwrap_or_default();
    h.api.expect(Method::POST, NNCS).await.stored("nnc-uid", "1");
    let apply = h.api.expect_apply(&format!("{NNCS}/{name}/status")).await;
    let status = apply.body["status"].clone();
    apply.applied();
    let node_apply = h.api.expect_apply(&format!("/api/v1/nodes/{name}")).await;
    node_apply.applied();
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
    status
}

#[tokio::test]
async fn a_new_node_in_an_overlay_pool_gets_an_nnc_it_owns_then_a_block_then_that_block_as_its_pod_cidr() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let run = h.start(&node);

    let create = h.api.expect(Method::POST, NNCS).await;
    assert_eq!(create.query.get("fieldManager").map(String::as_str), Some(FIELD_MANAGER));
    assert_eq!(create.body["metadata"]["name"], "node-1");
    assert_eq!(owner_of(&create.body), ("Node", "node-1", "node-uid-1", true));
    assert!(create.body.get("status").is_none_or(Value::is_null), "status is applied apart: {}", create.body);
    create.stored("nnc-uid-1", "1");

    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    let body = apply.body.clone();
    assert_eq!((&body["apiVersion"], &body["kind"]), (&json!("carve.dev/v1alpha1"), &json!("NodeNetworkConfig")));
    assert_eq!(body["metadata"], json!({"name": "node-1"}), "no release: the apply is not fenced");
    let status = &body["status"];
    assert_eq!((&status["pool"], &status["mode"]), (&json!("overlay"), &json!("Overlay")));
    let blocks = block_cidrs(status);
    assert_eq!(blocks.len(), 1, "{status}");
    let block: ipnet::IpNet = blocks[0].parse().expect("a CIDR");
    assert!("10.244.0.0/16".parse::<ipnet::IpNet>().unwrap().contains(&block) && block.prefix_len() == 24, "{block}");
    assert_eq!(status["blocks"][0]["gateway"], json!(block.hosts().next().unwrap().to_string()));
    assert!(status["blocks"][0]["allocationID"].as_str().is_some_and(|id| !id.is_empty()), "{status}");
    assert_eq!(status["nodeIP"], "10.224.0.4");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        (&condition(status, "Ready")["status"], &condition(status, "Ready")["reason"]),
        (&json!("True"), &json!("BlocksCarved"))
    );
    apply.applied();

    let node_apply = h.api.expect_apply("/api/v1/nodes/node-1").await;
    assert_eq!((&node_apply.body["apiVersion"], &node_apply.body["kind"]), (&json!("v1"), &json!("Node")));
    assert_eq!(node_apply.body["spec"], json!({"podCIDR": block.to_string(), "podCIDRs": [block.to_string()]}));
    node_apply.applied();

    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
    assert!(h.nudges.try_recv().is_err(), "no other node holds this node's address");
}

#[tokio::test]
async fn an_nnc_that_already_exists_when_created_is_fetched_and_used() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let run = h.start(&node);

    h.api.expect(Method::POST, NNCS).await.fail(409, "AlreadyExists");
    let existing = serde_json::to_value(nnc("node-1", "node-uid-1", "nnc-uid-1", "7", json!({}))).unwrap();
    h.api.expect(Method::GET, &format!("{NNCS}/node-1")).await.ok(&existing);
    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    assert_eq!(block_cidrs(&apply.body["status"]).len(), 1);
    apply.applied();
    let node_apply = h.api.expect_apply("/api/v1/nodes/node-1").await;
    node_apply.applied();

    assert_eq!(h.api.finish(run).await.expect("a 409 on create is no error"), Action::await_change());
}

#[tokio::test]
async fn an_nnc_left_by_an_earlier_node_of_the_same_name_is_deleted_by_its_uid_then_made_anew() {
    // The DELETE's answers that all mean "that incarnation is gone".
    for (code, reason) in [(200, "Success"), (404, "NotFound"), (409, "Conflict")] {
        let stale = nnc("node-1", "earlier-node-uid", "stale-nnc-uid", "3", json!({}));
        let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], std::slice::from_ref(&stale));
        let node = node("node-1", "node-uid-1", "10.224.0.4");
        let run = h.start(&node);

        let delete = h.api.expect(Method::DELETE, &format!("{NNCS}/node-1")).await;
        assert_eq!(delete.body["preconditions"]["uid"], "stale-nnc-uid", "{reason}: {}", delete.body);
        match code {
            200 => {
                let gone = serde_json::to_value(&stale).unwrap();
                delete.ok(&gone);
            }
            _ => delete.fail(code, reason),
        }
        let create = h.api.expect(Method::POST, NNCS).await;
        assert_eq!(owner_of(&create.body), ("Node", "node-1", "node-uid-1", true), "{reason}");
        create.stored("nnc-uid-2", "4");
        let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
        apply.applied();
        let node_apply = h.api.expect_apply("/api/v1/nodes/node-1").await;
        node_apply.applied();

        let done = h.api.finish(run).await;
        assert_eq!(done.unwrap_or_else(|e| panic!("{reason} on the DELETE: {e}")), Action::await_change());
    }
}

#[tokio::test]
async fn a_second_reconcile_before_the_cache_shows_the_new_nnc_sends_nothing() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let status = first_reconcile(&mut h, &node).await;

    // The watches have not delivered the NNC nor the Node's podCIDR yet:
    // no second create (a 409 and a GET), no second status or podCIDR apply.
    let run = h.start(&node);
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());

    // The NNC cache catches up with what was written: still nothing to send.
    let mut seen = nnc("node-1", "node-uid-1", "nnc-uid", "2", json!({}));
    seen.status = Some(serde_json::from_value(status).expect("status"));
    h.cache_nnc(seen);
    let run = h.start(&node);
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn a_failed_status_apply_fails_the_reconcile_and_retries_back_off_until_one_succeeds() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let mut tried = Vec::new();
    for (attempt, (code, reason)) in [(500, "InternalError"), (422, "Invalid")].into_iter().enumerate() {
        let run = h.start(&node);
        if attempt == 0 {
            h.api.expect(Method::POST, NNCS).await.stored("nnc-uid-1", "1");
        }
        // Later attempts remember the NNC they created: no second POST.
        let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
        tried.push(block_cidrs(&apply.body["status"]).join(","));
        apply.fail(code, reason);
        let error = h.api.finish(run).await.expect_err("the status apply failed");
        assert!(matches!(&error, Error::Kube(kube::Error::Api(s)) if s.code == code), "{error}");
        assert_eq!(error.metric_label(), "api");
        let retry = h.error_policy(&node, &error);
        assert_eq!(retry, Action::requeue(Duration::from_secs(1 << attempt)), "failure {}", attempt + 1);
    }
    assert_eq!(h.errors_counted("api"), 2);

    let run = h.start(&node);
    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    tried.push(block_cidrs(&apply.body["status"]).join(","));
    apply.applied();
    let node_apply = h.api.expect_apply("/api/v1/nodes/node-1").await;
    node_apply.applied();
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
    assert!(tried.iter().all(|b| *b == tried[0]) && !tried[0].is_empty(), "one block, kept across retries: {tried:?}");

    // A success starts the backoff over.
    let error =
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status::failure("mock", "InternalError").with_code(500))));
    assert_eq!(h.error_policy(&node, &error), Action::requeue(Duration::from_secs(1)));
}

/// An NNC of a dynamic VNet pool holding two blocks, whose agent gives the
/// second back in its spec.
fn nnc_releasing_a_block() -> NodeNetworkConfig {
    nnc(
        "node-1",
        "node-uid-1",
        "nnc-uid-1",
        "42",
        json!({
            "spec": {
                "requestedIPs": {"ipv4": 4},
                "releases": [{"cidr": "10.240.0.16/28", "allocationID": "grant-2"}],
            },
            "status": {
                "pool": "vnet", "mode": "VNet", "strategy": "Dynamic",
                "blocks": [
                    {"cidr": "10.240.0.0/28", "family": "IPv4", "allocationID": "grant-1"},
                    {"cidr": "10.240.0.16/28", "family": "IPv4", "allocationID": "grant-2"},
                ],
            },
        }),
    )
}

#[tokio::test]
async fn a_release_is_applied_only_against_the_nnc_version_that_carried_it() {
    let mut h = Harness::new(&[dynamic_vnet_pool()], &[nnc_releasing_a_block()]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let run = h.start(&node);

    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    assert_eq!(apply.body["metadata"], json!({"name": "node-1", "resourceVersion": "42"}));
    let status = &apply.body["status"];
    assert_eq!(block_cidrs(status), ["10.240.0.0/28"]);
    assert_eq!(status["blocks"][0]["allocationID"], "grant-1", "the kept grant keeps its ID");
    assert_eq!(status["quarantined"][0]["cidr"], "10.240.0.16/28");
    assert_eq!(status["quarantined"][0]["allocationID"], "grant-2");
    apply.applied();

    // VNet: no podCIDR apply. Requeued when the quarantine (30 s) ends.
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_release_refused_because_the_nnc_changed_meanwhile_fails_the_reconcile_as_a_conflict() {
    let mut h = Harness::new(&[dynamic_vnet_pool()], &[nnc_releasing_a_block()]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let run = h.start(&node);
    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    assert_eq!(apply.body["metadata"]["resourceVersion"], "42");
    apply.fail(409, "Conflict");
    let error = h.api.finish(run).await.expect_err("the fenced apply was refused");
    assert_eq!(error.metric_label(), "conflict");

    // The next attempt, on the same cached NNC, honours the release again
    // under the same fence: the refused write left nothing behind.
    let run = h.start(&node);
    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    assert_eq!(apply.body["metadata"]["resourceVersion"], "42");
    assert_eq!(block_cidrs(&apply.body["status"]), ["10.240.0.0/28"]);
    apply.applied();
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_node_its_exhausted_pool_cannot_serve_is_not_ready_with_one_event_on_the_node_and_one_on_the_pool() {
    // One /24 pool: node-a takes the only block.
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/24")], &[]);
    let node_a = node("node-a", "node-uid-a", "10.224.0.4");
    first_reconcile(&mut h, &node_a).await;

    let node_b = node("node-b", "node-uid-b", "10.224.0.5");
    let run = h.start(&node_b);
    h.api.expect(Method::POST, NNCS).await.stored("nnc-uid-b", "1");
    let apply = h.api.expect_apply(&format!("{NNCS}/node-b/status")).await;
    let status = &apply.body["status"];
    assert!(block_cidrs(status).is_empty(), "{status}");
    let ready = condition(status, "Ready");
    assert_eq!((&ready["status"], &ready["reason"]), (&json!("False"), &json!("PoolExhausted")));
    apply.applied();
    for (kind, name) in [("Node", "node-b"), ("PodCIDR", "overlay")] {
        let event = h.api.expect(Method::POST, EVENTS).await;
        let e = &event.body;
        assert_eq!((&e["regarding"]["kind"], &e["regarding"]["name"]), (&json!(kind), &json!(name)), "{e}");
        assert_eq!((&e["type"], &e["reason"]), (&json!("Warning"), &json!("PoolExhausted")), "{e}");
        assert_eq!(e["reportingController"], "carve-controller");
        event.echo();
    }
    // No block, so no podCIDR apply; the node is retried in a minute.
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::requeue(Duration::from_secs(60)));

    // Still exhausted a minute later: the same status, no new Events.
    let run = h.start(&node_b);
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn a_node_that_came_with_a_pod_cidr_gets_it_as_its_block_and_no_node_apply() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let mut node = node("node-1", "node-uid-1", "10.224.0.4");
    node.spec = serde_json::from_value(json!({"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]})).unwrap();
    let run = h.start(&node);
    h.api.expect(Method::POST, NNCS).await.stored("nnc-uid-1", "1");
    let apply = h.api.expect_apply(&format!("{NNCS}/node-1/status")).await;
    assert_eq!(block_cidrs(&apply.body["status"]), ["10.244.9.0/24"]);
    apply.applied();
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
}

#[tokio::test]
async fn a_node_being_deleted_keeps_its_blocks_and_sends_nothing() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let mut node = node("node-1", "node-uid-1", "10.224.0.4");
    node.meta_mut().deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-02T00:00:00Z".parse().unwrap()));
    let run = h.start(&node);
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
}

/// An NNC left by an earlier Node of the same name that the cache has not
/// shown yet, met as a 409 on create: the GET's answer gets the same owner
/// check as a cached one (found by these tests: it used to be written into).
#[tokio::test]
async fn an_nnc_of_an_earlier_node_found_only_by_a_409_on_create_is_replaced_too() {
    let mut h = Harness::new(&[overlay_pool("10.244.0.0/16")], &[]);
    let node = node("node-1", "node-uid-1", "10.224.0.4");
    let run = h.start(&node);
    h.api.expect(Method::POST, NNCS).await.fail(409, "AlreadyExists");
    let stale = serde_json::to_value(nnc("node-1", "earlier-node-uid", "stale-nnc-uid", "3", json!({}))).unwrap();
    h.api.expect(Method::GET, &format!("{NNCS}/node-1")).await.ok(&stale);
    let delete = h.api.expect(Method::DELETE, &format!("{NNCS}/node-1")).await;
    assert_eq!(delete.body["preconditions"]["uid"], "stale-nnc-uid");
    delete.ok(&stale);
    let create = h.api.expect(Method::POST, NNCS).await;
    assert_eq!(owner_of(&create.body), ("Node", "node-1", "node-uid-1", true));
    create.stored("nnc-uid-2", "4");
    h.api.expect_apply(&format!("{NNCS}/node-1/status")).await.applied();
    h.api.expect_apply("/api/v1/nodes/node-1").await.applied();
    assert_eq!(h.api.finish(run).await.expect("reconcile"), Action::await_change());
}
