//! carve-agent counts the CNI calls made on its node: the real carve-cni and
//! carve-ipam binaries, driven by cnitool (or run directly) in network
//! namespaces the test creates, report to the agent's socket beside the node
//! state file, and /metrics' text shows them. Needs root (CI runs as root).

mod cni_support;

use std::sync::Arc;
use std::time::Duration;

use carve_node_plugin::agent::{cni_calls, metrics::AgentMetrics};
use carve_node_plugin::cni::report::socket_path;
use cni_support::node::Node;
use cni_support::*;
use serde_json::json;

const IPAM: &str = env!("CARGO_BIN_EXE_carve-ipam");

/// The agent's CNI call listener and metrics, as carve-agent starts them for `state_file`.
struct Agent {
    rt: tokio::runtime::Runtime,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    fn listening_beside(state_file: &std::path::Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let metrics = Arc::new(AgentMetrics::new());
        let socket = socket_path(state_file);
        {
            let _rt = rt.enter();
            cni_calls::listen(&socket, metrics.clone());
        }
        assert!(socket.exists(), "the agent did not bind {}", socket.display());
        Agent { rt, metrics }
    }

    /// Waits until /metrics has the sample line `line`; the text.
    fn scrape_until(&self, line: &str) -> String {
        let metrics = self.metrics.clone();
        let wait = async {
            loop {
                let text = metrics.encode();
                if text.lines().any(|l| l == line) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), wait).await })
            .unwrap_or_else(|_| panic!("no {line:?} in /metrics:\n{}", self.metrics.encode()))
    }
}

/// The value of the sample `name{labels}` in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn every_cni_call_on_the_node_is_counted_and_timed_by_the_agent() {
    let node = Node::new("10.81.0.0/24", "10.81.0.1", "1.1.0", false);
    let agent = Agent::listening_beside(&node.state);
    let pod = Netns::unique("pod").unwrap();

    let result = node.add(&pod);
    assert_eq!(result["ips"][0]["address"], "10.81.0.2/32", "{result}");
    let text = agent.scrape_until(r#"carve_cni_requests_total{plugin="carve-cni",command="ADD",result="success"} 1"#);
    let add = r#"{plugin="carve-cni",command="ADD"}"#;
    assert_eq!(sample(&text, &format!("carve_cni_request_duration_seconds_count{add}")), 1.0);
    let took = sample(&text, &format!("carve_cni_request_duration_seconds_sum{add}"));
    assert!(took > 0.0 && took < 10.0, "ADD took {took} s");
    // carve-ipam ran inside carve-cni: one call, one report.
    assert_eq!(sample(&text, r#"carve_cni_requests_total{plugin="carve-ipam",command="ADD",result="success"}"#), 0.0);

    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL: {err}");
    let text = agent.scrape_until(r#"carve_cni_requests_total{plugin="carve-cni",command="DEL",result="success"} 1"#);
    assert_eq!(sample(&text, r#"carve_cni_request_duration_seconds_count{plugin="carve-cni",command="DEL"}"#), 1.0);
    assert_eq!(sample(&text, &format!("carve_cni_request_duration_seconds_count{add}")), 1.0, "still one ADD");

    // carve-ipam exec'd on its own (delegated IPAM) reports as itself; a failed call as an error.
    let conf = json!({
        "cniVersion": "1.1.0", "name": node.net, "type": "carve-ipam",
        "ipam": { "type": "carve-ipam", "stateFile": node.state, "dataDir": node.data },
    });
    let netns = pod.path();
    let netns = netns.to_str().unwrap();
    let (code, out) = run_plugin(IPAM, "ADD", "ctr-ipam", "eth0", netns, &conf);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_plugin(IPAM, "CHECK", "ctr-unknown", "eth0", netns, &conf);
    assert_eq!(code, 1, "CHECK of an attachment without an address: {out}");
    agent.scrape_until(r#"carve_cni_requests_total{plugin="carve-ipam",command="ADD",result="success"} 1"#);
    let text = agent.scrape_until(r#"carve_cni_requests_total{plugin="carve-ipam",command="CHECK",result="error"} 1"#);
    assert_eq!(sample(&text, r#"carve_cni_request_duration_seconds_count{plugin="carve-ipam",command="CHECK"}"#), 1.0);
    let (code, _) = run_plugin(IPAM, "DEL", "ctr-ipam", "eth0", netns, &conf);
    assert_eq!(code, 0);
}

#[test]
fn a_cni_call_succeeds_with_no_agent_listening() {
    let node = Node::new("10.82.0.0/24", "10.82.0.1", "1.1.0", false);
    let socket = socket_path(&node.state);
    assert!(!socket.exists());
    let pod = Netns::unique("pod").unwrap();
    let result = node.add(&pod);
    assert_eq!(result["ips"][0]["address"], "10.82.0.2/32", "{result}");

    // An agent that went away leaves its socket file: nobody reads it, the call still succeeds.
    drop(std::os::unix::net::UnixDatagram::bind(&socket).unwrap());
    assert!(socket.exists());
    let (ok, _, err) = node.cnitool("del", &pod);
    assert!(ok, "DEL with a dead socket: {err}");
    let second = Netns::unique("pod").unwrap();
    assert_eq!(node.add(&second)["ips"][0]["address"], "10.82.0.2/32", "the address came back");
    let (ok, _, err) = node.cnitool("del", &second);
    assert!(ok, "DEL: {err}");
}
