//! The on-disk allocation store: the edge around [`Allocations`].
//!
//! `<dataDir>/allocations.json` holds every address handed out on one network
//! of this node. Every change happens under an exclusive flock on
//! `<dataDir>/lock` (waiters block in the kernel, woken when it is released)
//! and is written as a temp file renamed over the old one.
//!
//! What survives what, without an fsync on the hot path:
//! - **A process killed at any point** (`kill -9`, OOM): the rename is atomic
//!   and the page cache outlives the process, so the store is the old or the
//!   new file, never a torn one, and the kernel drops the lock.
//! - **A reboot or power loss**: the last writes may be lost or the file
//!   torn, but no pod network namespace survives a reboot either. Every entry
//!   carries the boot ID it was written under (`/proc/sys/kernel/random/boot_id`);
//!   an entry from another boot is stale and its address free again, and a
//!   store that does not parse and was last written before this boot is
//!   read as empty. Entries without a boot ID (written by a carve-ipam that
//!   predates format 2) are kept as they are: never reclaimed by boot, freed by
//!   DEL or GC.
//!
//!
//! Release marks (`releasing`): the blocks carve-agent is giving back, put
//! there under this lock once it saw no allocation in them; carve-ipam never
//! allocates from a marked block. A mark is not a pod's entry: it names no
//! boot and is never dropped as stale (a block given back stays given back
//! through a reboot); only the agent removes it, when the block has left the
//! node's status or after it took the release back. The agent writes marks
//! with an fsync ([`Locked::save_synced`]): a mark lost to a power cut after
//! the release was named in the NodeNetworkConfig would let a pod into a
//! block the controller takes away.
//!
//! Format: `{"version": 2, "allocations": [{"ip", "containerId", "ifname", "bootId"}], "releasing": [cidr]}`.
//! Version 1 had no `bootId` and no `releasing`; a format-1 reader ignores
//! both (serde skips unknown fields), so old and new binaries can share a
//! store while install-cni swaps them (an old carve-ipam does not see marks,
//! but the agent also drops a marked block from the node state file, so it
//! never allocates from one either; a mark it saves over is written again by
//! the agent's next pass). A version newer than [`FORMAT_VERSION`] is refused,
//! not guessed at.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::alloc::{Allocations, Owner};
use crate::atomic::{self, Durability};

const FILE: &str = "allocations.json";
const LOCK: &str = "lock";
/// The store format this carve-ipam writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 2;
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IPAM store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("IPAM store {path} is not valid JSON: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error(
        "IPAM store {path} has format version {found}, newer than this carve-ipam reads ({FORMAT_VERSION}): \
         run the carve-ipam that wrote it (finish the upgrade)"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("IPAM store lock {path} still held by another process after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

/// How long an invocation waits for the store lock before giving up (CNI code 11).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    version: u32,
    allocations: Vec<WireEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    releasing: Vec<IpNet>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    ip: IpAddr,
    container_id: String,
    ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
}

/// The allocations of one network on this node, kept in a directory.
pub struct PodIpStore {
    dir: PathBuf,
}

/// The store opened under its exclusive lock; dropped = unlocked.
pub struct Locked<'a> {
    store: &'a PodIpStore,
    _lock: Flock<File>,
    boot_id: String,
    /// Entries loaded without a boot ID: saved back without one.
    legacy: RefCell<BTreeSet<(IpAddr, Owner)>>,
}

/// This boot's ID (empty if the kernel does not say: then every entry is trusted).
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// When this boot started (`btime` in /proc/stat).
fn boot_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

impl PodIpStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PodIpStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path: path.clone(), source }
    }

    /// Takes the exclusive lock, creating the directory if needed; waits at
    /// most [`LOCK_TIMEOUT`].
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        self.lock_within(LOCK_TIMEOUT)
    }

    /// Takes the exclusive lock, waiting at most `timeout`: uncontended, one
    /// non-blocking flock; contended, a blocking flock on a helper thread (the
    /// kernel wakes it when the holder lets go, nothing polls), abandoned on
    /// timeout (it then unlocks whatever it gets).
    pub fn lock_within(&self, timeout: Duration) -> Result<Locked<'_>, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(self.io(&path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                std::thread::spawn(move || {
                    let _ = tx.send(Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e));
                });
                match rx.recv_timeout(timeout) {
                    Ok(Ok(lock)) => lock,
                    Ok(Err(e)) => return Err((self.io(&path))(e.into())),
                    Err(_) => return Err(StoreError::Busy { path, waited: timeout }),
                }
            }
            Err((_, e)) => return Err((self.io(&path))(e.into())),
        };
        Ok(Locked { store: self, _lock: lock, boot_id: boot_id(), legacy: RefCell::default() })
    }
}

impl Locked<'_> {
    /// The allocations on disk, without those from another boot; empty when
    /// nothing was ever written (or only a torn file from before this boot).
    pub fn load(&self) -> Result<Allocations, StoreError> {
        let path = self.store.file();
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Allocations::default()),
            Err(e) => return Err((self.store.io(&path))(e)),
        };
        let wire: Wire = match serde_json::from_slice(&body) {
            Ok(w) => w,
            Err(source) => {
                let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                return match (written, boot_time()) {
                    (Some(w), Some(boot)) if w < boot => {
                        tracing::warn!(path = %path.display(), "IPAM store torn before this boot; every entry in it was stale");
                        Ok(Allocations::default())
                    }
                    _ => Err(StoreError::Corrupt { path: path.clone(), source }),
                };
            }
        };
        if wire.version > FORMAT_VERSION {
            return Err(StoreError::TooNew { path, found: wire.version });
        }
        let mut out = Allocations { releasing: wire.releasing.into_iter().collect(), ..Default::default() };
        let mut legacy = self.legacy.borrow_mut();
        legacy.clear();
        let mut stale = 0;
        for e in wire.allocations {
            let owner = Owner { container_id: e.container_id, ifname: e.ifname };
            match e.boot_id {
                Some(b) if !self.boot_id.is_empty() && b != self.boot_id => stale += 1,
                Some(_) => {
                    out.by_ip.insert(e.ip, owner);
                }
                None => {
                    legacy.insert((e.ip, owner.clone()));
                    out.by_ip.insert(e.ip, owner);
                }
            }
        }
        if stale > 0 {
            tracing::info!(stale, "IPAM store entries from a previous boot dropped");
        }
        Ok(out)
    }

    /// Replaces the allocations on disk atomically (rename; no fsync, see the module docs).
    pub fn save(&self, allocations: &Allocations) -> Result<(), StoreError> {
        self.write(allocations, Durability::RenameOnly)
    }

    /// As [`save`](Self::save), and durable through a machine crash once it
    /// returns: for release marks.
    pub fn save_synced(&self, allocations: &Allocations) -> Result<(), StoreError> {
        self.write(allocations, Durability::Synced)
    }

    fn write(&self, allocations: &Allocations, durability: Durability) -> Result<(), StoreError> {
        let path = self.store.file();
        let legacy = self.legacy.borrow();
        let boot = (!self.boot_id.is_empty()).then(|| self.boot_id.clone());
        let wire = Wire {
            version: FORMAT_VERSION,
            allocations: allocations
                .by_ip
                .iter()
                .map(|(ip, o)| WireEntry {
                    ip: *ip,
                    container_id: o.container_id.clone(),
                    ifname: o.ifname.clone(),
                    boot_id: if legacy.contains(&(*ip, o.clone())) { None } else { boot.clone() },
                })
                .collect(),
            releasing: allocations.releasing.iter().copied().collect(),
        };
        let body =
            serde_json::to_vec_pretty(&wire).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        atomic::write(&path, &body, None, durability).map_err(self.store.io(&path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_empty() {
        let dir = std::env::temp_dir().join(format!("carve-ipam-store-{}", std::process::id()));
        let store = PodIpStore::new(&dir);
        let locked = store.lock().unwrap();
        assert_eq!(locked.load().unwrap(), Allocations::default());
        let mut a = Allocations::default();
        a.by_ip.insert("10.0.0.2".parse().unwrap(), Owner::new("c", "eth0"));
        a.by_ip.insert("fd00::2".parse().unwrap(), Owner::new("c", "eth0"));
        locked.save(&a).unwrap();
        assert_eq!(locked.load().unwrap(), a);
        assert!(!crate::atomic::temp_path(&dir.join("allocations.json")).exists());
        drop(locked);
        let held = store.lock().unwrap();
        assert!(matches!(store.lock_within(Duration::from_millis(20)), Err(StoreError::Busy { .. })));
        drop(held);
        std::fs::write(store.file(), b"{").unwrap();
        assert!(matches!(store.lock().unwrap().load(), Err(StoreError::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("carve-ipam-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn ips(a: &Allocations) -> Vec<String> {
        a.by_ip.keys().map(|ip| ip.to_string()).collect()
    }

    #[test]
    fn entries_from_another_boot_are_free_and_legacy_ones_are_kept_as_they_were() {
        let d = dir("boot");
        let store = PodIpStore::new(&d);
        std::fs::create_dir_all(&d).unwrap();
        let now = boot_id();
        assert!(!now.is_empty(), "the kernel names this boot");
        let file = serde_json::json!({"version": 2, "allocations": [
            {"ip": "10.0.0.2", "containerId": "before-reboot", "ifname": "eth0", "bootId": "another-boot"},
            {"ip": "10.0.0.3", "containerId": "live", "ifname": "eth0", "bootId": now},
            {"ip": "10.0.0.4", "containerId": "from-format-1", "ifname": "eth0"},
        ], "releasing": ["10.0.1.0/28"]});
        std::fs::write(store.file(), file.to_string()).unwrap();
        let locked = store.lock().unwrap();
        let mut a = locked.load().unwrap();
        assert_eq!(ips(&a), ["10.0.0.3", "10.0.0.4"], "the previous boot's address is free");
        assert_eq!(a.releasing, ["10.0.1.0/28".parse().unwrap()].into(), "a release mark is never stale");
        a.by_ip.insert("10.0.0.5".parse().unwrap(), Owner::new("new", "eth0"));
        locked.save(&a).unwrap();
        let saved: Value = serde_json::from_slice(&std::fs::read(store.file()).unwrap()).unwrap();
        assert_eq!(saved["version"], FORMAT_VERSION);
        let boot_of = |ip: &str| {
            saved["allocations"].as_array().unwrap().iter().find(|e| e["ip"] == ip).unwrap()["bootId"].clone()
        };
        assert_eq!(boot_of("10.0.0.3"), now.as_str());
        assert_eq!(boot_of("10.0.0.5"), now.as_str());
        assert!(boot_of("10.0.0.4").is_null(), "a legacy entry is not re-stamped with this boot");
        assert_eq!(saved["releasing"], serde_json::json!(["10.0.1.0/28"]));
        std::fs::remove_dir_all(d).unwrap();
    }

    use serde_json::Value;

    /// The format-1 reader, as carve-ipam before format 2 declared it.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct WireV1 {
        version: u32,
        allocations: Vec<EntryV1>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct EntryV1 {
        ip: IpAddr,
        container_id: String,
        ifname: String,
    }

    #[test]
    fn format_1_and_format_2_binaries_read_each_others_stores() {
        let d = dir("skew");
        let store = PodIpStore::new(&d);
        std::fs::create_dir_all(&d).unwrap();
        // Old → new: a format-1 store, as the old carve-ipam wrote it.
        let v1 = r#"{"version": 1, "allocations": [{"ip": "10.0.0.2", "containerId": "old", "ifname": "eth0"}]}"#;
        std::fs::write(store.file(), v1).unwrap();
        let locked = store.lock().unwrap();
        let mut a = locked.load().unwrap();
        assert_eq!(a.held_by(&Owner::new("old", "eth0")), ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        a.by_ip.insert("10.0.0.3".parse().unwrap(), Owner::new("new", "eth0"));
        a.releasing.insert("10.0.1.0/28".parse().unwrap());
        locked.save_synced(&a).unwrap();
        drop(locked);
        assert_eq!(store.lock().unwrap().load().unwrap(), a, "marks round-trip");
        // New → old (marks included: the old reader skips them): the format-1 reader sees every entry of a format-2 store.
        let old: WireV1 = serde_json::from_slice(&std::fs::read(store.file()).unwrap()).unwrap();
        let seen: Vec<(String, String, String)> =
            old.allocations.into_iter().map(|e| (e.ip.to_string(), e.container_id, e.ifname)).collect();
        assert_eq!(
            seen,
            [("10.0.0.2".into(), "old".into(), "eth0".into()), ("10.0.0.3".into(), "new".into(), "eth0".into())]
        );
        // A format from the future is refused, not half-read.
        std::fs::write(store.file(), r#"{"version": 3, "allocations": []}"#).unwrap();
        let err = store.lock().unwrap().load().unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 3, .. }), "{err}");
        assert!(err.to_string().contains("finish the upgrade"), "{err}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_torn_store_is_empty_only_when_written_before_this_boot() {
        let d = dir("torn");
        let store = PodIpStore::new(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(store.file(), b"{\"version\": 2, \"allocat").unwrap();
        assert!(matches!(store.lock().unwrap().load(), Err(StoreError::Corrupt { .. })), "torn during this boot");
        let f = File::options().write(true).open(store.file()).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(1)).unwrap();
        assert_eq!(store.lock().unwrap().load().unwrap(), Allocations::default(), "torn before this boot");
        std::fs::remove_dir_all(d).unwrap();
    }
}
