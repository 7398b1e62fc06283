//! One datagram per CNI call, from carve-cni or carve-ipam to carve-agent,
//! so the agent's /metrics can count calls made by processes that live for
//! one call each.
//!
//! ```text
//!  carve-cni / carve-ipam ──"v1 carve-cni ADD success 1834\n"──▶ <state file dir>/cni-metrics.sock ──▶ carve-agent
//! ```
//!
//! The socket sits beside the node state file, which both sides already
//! agree on (`--state-file` / `CARVE_STATE_FILE` for the agent, the
//! conflist's `stateFile` or `CARVE_STATE_FILE` for the plugins). Sending
//! never blocks and never fails a call: no agent, a full socket buffer or any
//! other error drops the report.
//!
//! Wire format, one line of ASCII: `v1 <plugin> <command> <result> <microseconds>`.
//! [`Report::parse`] accepts nothing else: unknown versions, plugins,
//! commands or results are dropped, so label values stay bounded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Command;

/// File name of the agent's socket, in the node state file's directory.
pub const SOCKET_NAME: &str = "cni-metrics.sock";
/// The one wire format version spoken.
const VERSION: &str = "v1";
/// Longer datagrams are not reports (the longest valid one is about 50 bytes).
pub const MAX_DATAGRAM: usize = 128;

/// The agent's socket for the node state file `state_file`.
pub fn socket_path(state_file: &Path) -> PathBuf {
    state_file.parent().unwrap_or(Path::new("/")).join(SOCKET_NAME)
}

/// The plugins that report; anything else is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PluginName {
    CarveCni,
    CarveIpam,
}

impl PluginName {
    pub const ALL: [PluginName; 2] = [PluginName::CarveCni, PluginName::CarveIpam];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "carve-cni" => Some(PluginName::CarveCni),
            "carve-ipam" => Some(PluginName::CarveIpam),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PluginName::CarveCni => "carve-cni",
            PluginName::CarveIpam => "carve-ipam",
        }
    }
}

/// What one call reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub plugin: PluginName,
    pub command: Command,
    pub success: bool,
    pub duration: Duration,
}

impl Report {
    pub fn result(&self) -> &'static str {
        if self.success { "success" } else { "error" }
    }

    pub fn encode(&self) -> String {
        format!(
            "{VERSION} {} {} {} {}\n",
            self.plugin.as_str(),
            self.command.as_str(),
            self.result(),
            self.duration.as_micros()
        )
    }

    /// A datagram back into a report; `None` for anything that is not exactly one.
    pub fn parse(datagram: &[u8]) -> Option<Self> {
        if datagram.len() > MAX_DATAGRAM {
            return None;
        }
        let line = std::str::from_utf8(datagram).ok()?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let mut fields = line.split(' ');
        let (Some(version), Some(plugin), Some(command), Some(result), Some(micros), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        if version != VERSION {
            return None;
        }
        let success = match result {
            "success" => true,
            "error" => false,
            _ => return None,
        };
        // u64::from_str takes a leading '+'; only digits are the format.
        if micros.is_empty() || !micros.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Report {
            plugin: PluginName::parse(plugin)?,
            command: Command::parse(command)?,
            success,
            duration: Duration::from_micros(micros.parse().ok()?),
        })
    }
}

/// Sends `report` to the agent's socket at `socket`: non-blocking, every error ignored.
pub fn send(socket: &Path, report: &Report) {
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    if sock.set_nonblocking(true).is_err() {
        return;
    }
    let _ = sock.send_to(report.encode().as_bytes(), socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(success: bool, micros: u64) -> Report {
        Report { plugin: PluginName::CarveCni, command: Command::Add, success, duration: Duration::from_micros(micros) }
    }

    #[test]
    fn a_report_survives_the_wire() {
        let r = add(true, 1834);
        assert_eq!(r.encode(), "v1 carve-cni ADD success 1834\n");
        assert_eq!(Report::parse(r.encode().as_bytes()), Some(r));
        let r =
            Report { plugin: PluginName::CarveIpam, command: Command::Gc, success: false, duration: Duration::ZERO };
        assert_eq!(Report::parse(r.encode().as_bytes()), Some(r));
        assert_eq!(
            Report::parse(b"v1 carve-ipam DEL error 7"),
            Some(Report { command: Command::Del, plugin: PluginName::CarveIpam, ..add(false, 7) }),
            "no newline is fine"
        );
    }

    #[test]
    fn garbage_and_unknown_label_values_are_dropped() {
        for bad in [
            &b""[..],
            b"\n",
            b"v2 carve-cni ADD success 10\n",
            b"v1 bridge ADD success 10\n",
            b"v1 carve-cni add success 10\n",
            b"v1 carve-cni FOO success 10\n",
            b"v1 carve-cni ADD ok 10\n",
            b"v1 carve-cni ADD success\n",
            b"v1 carve-cni ADD success 10 extra\n",
            b"v1  carve-cni ADD success 10\n",
            b"v1 carve-cni ADD success -10\n",
            b"v1 carve-cni ADD success +10\n",
            b"v1 carve-cni ADD success 1.5\n",
            b"v1 carve-cni ADD success 99999999999999999999999\n",
            b"v1 carve-cni ADD success 10\n\n",
            b"v1 carve-cni ADD success \xff\n",
        ] {
            assert_eq!(Report::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let long = format!("v1 carve-cni ADD success {}\n", "0".repeat(MAX_DATAGRAM));
        assert_eq!(Report::parse(long.as_bytes()), None, "longer than any report");
    }

    #[test]
    fn the_socket_sits_beside_the_state_file() {
        assert_eq!(
            socket_path(Path::new(crate::state::DEFAULT_STATE_FILE)),
            Path::new("/var/run/carve/cni-metrics.sock")
        );
        assert_eq!(socket_path(Path::new("node-state.json")), Path::new("cni-metrics.sock"));
    }

    #[test]
    fn sending_to_no_agent_returns_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        send(&dir.path().join(SOCKET_NAME), &add(true, 1));
        // A plain file where the socket should be: refused, not blocked.
        std::fs::write(dir.path().join("file.sock"), b"").unwrap();
        send(&dir.path().join("file.sock"), &add(true, 1));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_full_socket_drops_reports_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        // Nobody reads: the receive queue fills within a few hundred datagrams.
        for _ in 0..5000 {
            send(&path, &add(true, 1));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "sending blocked: {:?}", started.elapsed());
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(Report::parse(&buf[..n]), Some(add(true, 1)));
    }
}
