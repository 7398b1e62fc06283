//! Pods created at once on chosen nodes and the time each takes from the
//! create call to Running as a watch sees it; the pod-start benchmarks share it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::testkit::wait_for;

/// A busybox pod pinned to `node` (no scheduler in the way), labelled `bench=pods`.
pub fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench": "pods"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": "carve.local/busybox:v1", "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]
        }
    }))
    .expect("pod literal")
}

/// Creates every pod at once and returns each one's create → Running time.
pub async fn start_pods(pods: &Api<Pod>, nodes: &[String], per_node: usize, tag: &str) -> Result<Vec<Duration>> {
    let names: Vec<(String, String)> =
        nodes.iter().flat_map(|n| (0..per_node).map(move |i| (format!("{tag}-{n}-{i}"), n.clone()))).collect();
    let mut created: BTreeMap<String, Instant> = BTreeMap::new();
    let mut running: BTreeMap<String, Instant> = BTreeMap::new();
    let mut events = watcher(pods.clone(), watcher::Config::default().labels("bench=pods")).boxed();
    // The watch is open before the first create, so no transition is missed.
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(_))) => {}
        other => bail!("pod watch did not start: {other:?}"),
    }
    let creates = names.iter().map(|(name, node)| {
        let pods = pods.clone();
        let p = pod(name, node);
        async move {
            let t0 = Instant::now();
            pods.create(&PostParams::default(), &p).await.map(|_| (p.metadata.name.unwrap_or_default(), t0))
        }
    });
    for r in futures::future::join_all(creates).await {
        let (name, t0) = r.context("create pod")?;
        created.insert(name, t0);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while running.len() < names.len() {
        let ev = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .with_context(|| format!("{} of {} pods Running after 600 s", running.len(), names.len()))?;
        let Some(ev) = ev else { bail!("pod watch ended") };
        let now = Instant::now();
        let pods_seen = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
            _ => continue,
        };
        for p in pods_seen {
            let name = p.metadata.name.clone().unwrap_or_default();
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && name.starts_with(tag) {
                running.entry(name).or_insert(now);
            }
        }
    }
    let mut times: Vec<Duration> = running.iter().map(|(n, t)| t.saturating_duration_since(created[n])).collect();
    times.sort();
    Ok(times)
}

/// Deletes every `bench=pods` pod and waits until they are gone.
pub async fn delete_all(pods: &Api<Pod>) -> Result<()> {
    pods.delete_collection(&DeleteParams::default().grace_period(0), &ListParams::default().labels("bench=pods"))
        .await?;
    wait_for("bench pods gone", Duration::from_secs(300), || async {
        let left = pods.list(&ListParams::default().labels("bench=pods")).await.map_err(|e| e.to_string())?;
        if left.items.is_empty() { Ok(()) } else { Err(format!("{} left", left.items.len())) }
    })
    .await;
    Ok(())
}
