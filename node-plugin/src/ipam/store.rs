//! The on-disk allocation store: the edge around [`Allocations`].
//!
//! `<dataDir>/allocations.json` holds every address handed out on one network
//! of this node. Every change happens under an exclusive flock on
//! `<dataDir>/lock` and is written atomically (temp file + fsync + rename +
//! fsync of the directory), so a process killed at any point leaves either the
//! old or the new file, never a torn one, and the kernel drops its lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::alloc::{Allocations, Owner};

const FILE: &str = "allocations.json";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IPAM store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("IPAM store {path} is not valid JSON: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
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
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    ip: IpAddr,
    container_id: String,
    ifname: String,
}

/// The allocations of one network on this node, kept in a directory.
pub struct PodIpStore {
    dir: PathBuf,
}

/// The store opened under its exclusive lock; dropped = unlocked.
pub struct Locked<'a> {
    store: &'a PodIpStore,
    _lock: Flock<File>,
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

    pub fn lock_within(&self, timeout: Duration) -> Result<Locked<'_>, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let path = self.dir.join(LOCK);
        let mut file =
            OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(self.io(&path))?;
        let start = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Locked { store: self, _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if start.elapsed() >= timeout {
                        return Err(StoreError::Busy { path, waited: timeout });
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((_, e)) => return Err((self.io(&path))(e.into())),
            }
        }
    }
}

impl Locked<'_> {
    /// The allocations on disk; empty when nothing was ever written.
    pub fn load(&self) -> Result<Allocations, StoreError> {
        let path = self.store.file();
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Allocations::default()),
            Err(e) => return Err((self.store.io(&path))(e)),
        };
        let wire: Wire =
            serde_json::from_slice(&body).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        let mut out = Allocations::default();
        for e in wire.allocations {
            out.by_ip.insert(e.ip, Owner { container_id: e.container_id, ifname: e.ifname });
        }
        Ok(out)
    }

    /// Replaces the allocations on disk atomically.
    pub fn save(&self, allocations: &Allocations) -> Result<(), StoreError> {
        let path = self.store.file();
        let tmp = self.store.dir.join(format!("{FILE}.tmp"));
        let wire = Wire {
            version: 1,
            allocations: allocations
                .by_ip
                .iter()
                .map(|(ip, o)| WireEntry { ip: *ip, container_id: o.container_id.clone(), ifname: o.ifname.clone() })
                .collect(),
        };
        let body =
            serde_json::to_vec_pretty(&wire).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        let io = self.store.io(&tmp);
        let mut file = File::create(&tmp).map_err(&io)?;
        file.write_all(&body).map_err(&io)?;
        file.sync_all().map_err(&io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(self.store.io(&path))?;
        File::open(&self.store.dir).and_then(|d| d.sync_all()).map_err(self.store.io(&self.store.dir))?;
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
        assert!(!dir.join("allocations.json.tmp").exists());
        drop(locked);
        let held = store.lock().unwrap();
        assert!(matches!(store.lock_within(Duration::from_millis(20)), Err(StoreError::Busy { .. })));
        drop(held);
        std::fs::write(store.file(), b"{").unwrap();
        assert!(matches!(store.lock().unwrap().load(), Err(StoreError::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
