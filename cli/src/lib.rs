//! Small command-line helpers shared by carve's binaries (kept out of the CR
//! types crate, which stays free of CLI plumbing): durations, log
//! set-up and the API client.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Parses a flag duration with humantime (`15s`, `500ms`, `2m`, `1m30s`);
/// a bare number is seconds, as the flags have always taken it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a duration like 15s or 500ms"));
    }
    humantime::parse_duration(t).map_err(|e| format!("{s:?} is not a duration like 15s or 500ms: {e}"))
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `level` (an EnvFilter such as `info` or
/// `carve_controller=debug`), as text (coloured on a terminal) or JSON lines.
pub fn init_tracing(level: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .with_context(|| format!("--log-level {level:?} is not a valid filter"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// The client configuration from `kubeconfig`, or else as kubectl finds it
/// (`$KUBECONFIG`, `~/.kube/config`, in-cluster).
pub async fn kube_config(kubeconfig: Option<&Path>) -> Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Ok(kube::Config::from_custom_kubeconfig(file, &Default::default()).await?)
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig given, and neither $KUBECONFIG, ~/.kube/config nor in-cluster config works"),
    }
}

/// A client for [`kube_config`].
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    Ok(kube::Client::try_from(kube_config(kubeconfig).await?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
