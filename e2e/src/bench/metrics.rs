//! Prometheus pages: carve-controller's and kube-apiserver's /metrics.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::Client;
use prometheus_parse::{Sample, Scrape, Value};

/// The samples of a Prometheus text page.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    Ok(Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?.samples)
}

/// A sample's value, for counters, gauges and untyped samples.
pub fn value(sample: &Sample) -> Option<f64> {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// The samples named `metric`, as (labels, value).
pub fn samples<'a>(all: &'a [Sample], metric: &str) -> Vec<(&'a Sample, f64)> {
    all.iter().filter(|s| s.metric == metric).filter_map(|s| Some((s, value(s)?))).collect()
}

/// GET `http://<addr><path>` (a controller's metrics endpoint).
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let response = client.get(uri).await.with_context(|| format!("GET http://{addr}{path}"))?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Writes the API server served so far on Nodes, NNCs and Events, by resource, verb and code.
pub async fn write_tally(client: &Client) -> Result<BTreeMap<String, u64>> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let all = parse(&text)?;
    let mut tally = BTreeMap::new();
    for (s, value) in samples(&all, "apiserver_request_total") {
        let label = |k: &str| s.labels.get(k).unwrap_or_default();
        let (verb, resource) = (label("verb"), label("resource"));
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY")
            || !matches!(resource, "nodes" | "nodenetworkconfigs" | "events")
        {
            continue;
        }
        let resource = if resource == "nodenetworkconfigs" { "nnc" } else { resource };
        let key = match label("subresource") {
            "" => resource.to_string(),
            sub => format!("{resource}/{sub}"),
        };
        *tally.entry(format!("{key} {verb} {}", label("code"))).or_insert(0) += value as u64;
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_with_labels_from_an_openmetrics_page() {
        let page = "# HELP carve_reconciles Node reconciles run.\n# TYPE carve_reconciles counter\n\
                    carve_reconciles_total 14626\n\
                    carve_reconcile_errors_total{reason=\"conflict\"} 3\n# EOF\n";
        let all = parse(page).unwrap();
        assert_eq!(samples(&all, "carve_reconciles_total").iter().map(|(_, v)| *v).sum::<f64>(), 14626.0);
        let errors = samples(&all, "carve_reconcile_errors_total");
        assert_eq!((errors[0].0.labels.get("reason"), errors[0].1), (Some("conflict"), 3.0));
    }
}
