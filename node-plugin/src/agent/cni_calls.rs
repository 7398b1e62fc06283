//! The agent's end of [`crate::cni::report`]: a unix datagram socket beside
//! the node state file, each valid report counted in [`AgentMetrics`]
//! (`carve_cni_*`), anything else dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixDatagram;

use super::metrics::AgentMetrics;
use crate::cni::report::{MAX_DATAGRAM, Report};

/// The bound socket; [`CniCallSink::run`] reads it.
pub struct CniCallSink {
    socket: UnixDatagram,
    path: PathBuf,
}

impl CniCallSink {
    /// Binds `path` (its directory made if needed, a previous agent's socket
    /// replaced). Needs a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let context =
            |action: &str, e: io::Error| io::Error::new(e.kind(), format!("{action} {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| context("creating the directory of", e))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context("removing the old", e)),
        }
        let socket = UnixDatagram::bind(path).map_err(|e| context("binding", e))?;
        Ok(CniCallSink { socket, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts reports until the socket fails (it does not, short of the process ending).
    pub async fn run(self, metrics: Arc<AgentMetrics>) {
        // One byte more than a report may have: a longer datagram shows as too long, not as a cut report.
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            match self.socket.recv(&mut buf).await {
                Ok(n) => match Report::parse(&buf[..n]) {
                    Some(r) => metrics.observe_cni(&r),
                    None => tracing::debug!(bytes = n, "dropped a datagram that is not a CNI call report"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, socket = %self.path.display(), "reading CNI call reports failed; no more carve_cni metrics");
                    return;
                }
            }
        }
    }
}

/// Binds `path` and counts reports in the background; a bind failure is
/// logged, not fatal: the node works without these metrics.
pub fn listen(path: &Path, metrics: Arc<AgentMetrics>) {
    match CniCallSink::bind(path) {
        Ok(sink) => {
            tracing::info!(socket = %path.display(), "counting CNI calls");
            tokio::spawn(sink.run(metrics));
        }
        Err(e) => tracing::warn!(error = %e, "no carve_cni metrics: cannot listen for CNI call reports"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cni::Command;
    use crate::cni::report::{self, PluginName};

    #[tokio::test]
    async fn reports_are_counted_and_garbage_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/carve").join(report::SOCKET_NAME);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let sink = CniCallSink::bind(&path).unwrap();
        let metrics = Arc::new(AgentMetrics::new());
        tokio::spawn(sink.run(metrics.clone()));

        let sender = std::os::unix::net::UnixDatagram::unbound().unwrap();
        for garbage in [&b"hello"[..], b"v1 carve-cni ADD success 5 6", &[b'x'; 4096]] {
            sender.send_to(garbage, &path).unwrap();
        }
        let add = report::Report {
            plugin: PluginName::CarveCni,
            command: Command::Add,
            success: true,
            duration: Duration::from_millis(2),
        };
        report::send(&path, &add);
        let want = r#"carve_cni_requests_total{plugin="carve-cni",command="ADD",result="success"} 1"#;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !metrics.encode().lines().any(|l| l == want) {
            assert!(tokio::time::Instant::now() < deadline, "not counted:\n{}", metrics.encode());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Datagrams arrive in order: the garbage sent first was read and dropped.
        let calls: Vec<String> = metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("carve_cni_requests_total{") && !l.ends_with("} 0"))
            .map(str::to_owned)
            .collect();
        assert_eq!(calls, [want]);
    }
}
