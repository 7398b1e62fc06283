//! Helpers the real-node tests share: kubectl as JSON, `kubectl exec`, a
//! node's blocks and its IPAM store.

// Each test binary uses a subset of them.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use carve_e2e::cluster::{Cluster, RealNode};
use ipnet::IpNet;
use serde_json::Value;

pub fn kubectl_json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cluster.cp().kubectl_ok(&all).unwrap_or_else(|e| panic!("kubectl {}: {e:#}", args.join(" ")));
    serde_json::from_str(&out).unwrap()
}

pub fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

/// `kubectl exec POD -- cmd...`: stdout, or the error with stderr.
pub fn exec(cluster: &Cluster, pod: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    cluster.cp().kubectl_ok(&args).map_err(|e| format!("{e:#}"))
}

/// The addresses carve-ipam holds in a node's store (`allocations.json`).
pub fn store_ips(node: &RealNode) -> BTreeSet<IpAddr> {
    let path = node.host_path("/var/lib/carve/ipam/carve/allocations.json");
    let Ok(body) = std::fs::read(&path) else { return BTreeSet::new() };
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    v["allocations"].as_array().into_iter().flatten().filter_map(|a| a["ip"].as_str()?.parse().ok()).collect()
}

pub fn node_blocks(cluster: &Cluster) -> BTreeMap<String, Vec<IpNet>> {
    let nncs = kubectl_json(cluster, &["get", "nnc"]);
    nncs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let blocks = n["status"]["blocks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["cidr"].as_str()?.parse().ok())
                .collect();
            (n["metadata"]["name"].as_str().unwrap().to_string(), blocks)
        })
        .collect()
}
