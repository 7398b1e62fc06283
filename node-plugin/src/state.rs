//! The node state file: the agent's record of this node's allocation, and the
//! only thing carve-cni and carve-ipam read on the pod start path (no API
//! server call when a pod starts).
//!
//! Written atomically (temp file + fsync + rename) under an exclusive flock on
//! a sibling lock file, read under a shared one.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use carve_crds::{AllocationStrategy, NodeBlock, PoolMode};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::atomic::{self, Durability};

/// Where the agent writes the state file unless told otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/run/carve/node-state.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Node name (NODE_NAME of the agent).
    pub node: String,
    pub mode: PoolMode,
    /// How the pool sizes the node's blocks; Dynamic: carve-ipam waits briefly
    /// for a new block when every block is full (absent in older files: Single).
    #[serde(default)]
    pub strategy: AllocationStrategy,
    /// The node's blocks, from its NodeNetworkConfig status, in grant order
    /// (oldest first), less those the node is giving back; pods get addresses from these.
    pub blocks: Vec<NodeBlock>,
    /// Addresses inside `blocks` that pods must never get (status.reservedIPs:
    /// Azure's reserved ones and every Node's own address, VNet).
    #[serde(default, rename = "reservedIPs")]
    pub reserved_ips: Vec<String>,
    /// Every pool CIDR of the cluster's mode: pod-to-pod traffic is never SNAT'd.
    pub cluster_pod_cidrs: Vec<String>,
    /// Extra destinations that are not SNAT'd (VNet CIDRs, on-prem ranges).
    #[serde(default)]
    pub non_masquerade_cidrs: Vec<String>,
    /// MTU for pod interfaces (underlay MTU less the VXLAN overhead in Overlay).
    pub mtu: u32,
    #[serde(rename = "nodeIP")]
    pub node_ip: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("node state file {path} does not exist yet (carve-agent has not written it)")]
    Missing { path: PathBuf },
    #[error("node state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("node state file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

fn lock(path: &Path, arg: FlockArg) -> Result<Flock<File>, StateError> {
    let io = |source| StateError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(path)).map_err(io)?;
    Flock::lock(file, arg).map_err(|(_, e)| io(e.into()))
}

/// Writes `state` to `path` atomically.
pub fn write(path: &Path, state: &NodeState) -> Result<(), StateError> {
    let io = |source| StateError::Io { path: path.to_path_buf(), source };
    let _guard = lock(path, FlockArg::LockExclusive)?;
    let body =
        serde_json::to_vec_pretty(state).map_err(|source| StateError::Parse { path: path.to_path_buf(), source })?;
    atomic::write(path, &body, None, Durability::Synced).map_err(io)?;
    Ok(())
}

/// Reads the state file; `Missing` when the agent has not written it yet.
pub fn read(path: &Path) -> Result<NodeState, StateError> {
    if !path.exists() {
        return Err(StateError::Missing { path: path.to_path_buf() });
    }
    let _guard = lock(path, FlockArg::LockShared)?;
    let body = std::fs::read(path).map_err(|source| StateError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&body).map_err(|source| StateError::Parse { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use carve_crds::IpFamily;

    fn sample() -> NodeState {
        NodeState {
            node: "node-a".into(),
            mode: PoolMode::Overlay,
            blocks: vec![NodeBlock {
                cidr: "10.244.1.0/24".into(),
                family: IpFamily::IPv4,
                gateway: Some("10.244.1.1".into()),
                allocation_id: Some("a1".into()),
            }],
            strategy: AllocationStrategy::Single,
            reserved_ips: vec![],
            cluster_pod_cidrs: vec!["10.244.0.0/16".into()],
            non_masquerade_cidrs: vec![],
            mtu: 1450,
            node_ip: "192.168.1.10".into(),
        }
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = std::env::temp_dir().join(format!("carve-state-{}", std::process::id()));
        let path = dir.join("node-state.json");
        assert!(matches!(read(&path), Err(StateError::Missing { .. })));
        write(&path, &sample()).unwrap();
        assert_eq!(read(&path).unwrap(), sample());
        assert!(!crate::atomic::temp_path(&path).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_from_before_the_pod_subnet_fields_reads_as_single_without_reservations() {
        let mut old = serde_json::to_value(sample()).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("strategy");
        obj.remove("reservedIPs");
        let read: NodeState = serde_json::from_value(old).unwrap();
        assert_eq!(read, sample());
    }
}
