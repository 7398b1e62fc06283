//! ADDs waiting for a block: the demand carve-agent cannot see in the store.
//!
//! An ADD that finds every block of a dynamic pool full leaves
//! `<dataDir>/waiting/<containerId>.<ifname>` while it waits for a grant (its
//! body: the families it lacks, one per line) and removes it when it ends.
//! The agent counts the markers younger than [`FRESH`] as demand; older ones
//! were left by a killed ADD (the runtime retries with a new one).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use carve_crds::IpFamily;

use super::alloc::Owner;

/// Directory of the markers, below the store's data dir.
pub const DIR: &str = "waiting";
/// A marker older than this no longer counts as demand.
pub const FRESH: Duration = Duration::from_secs(30);
/// A marker older than this is removed by [`count`]: its ADD is long gone.
const FORGOTTEN: Duration = Duration::from_secs(300);

/// The markers' directory for the store in `data_dir`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

/// One waiting ADD; dropping it removes its marker.
#[derive(Debug)]
pub struct Waiting {
    path: PathBuf,
}

/// A file name from a container ID and ifname: anything but `[A-Za-z0-9_-]` becomes `_`.
fn marker_name(owner: &Owner) -> String {
    let clean = |s: &str| {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect::<String>()
    };
    format!("{}.{}", clean(&owner.container_id), clean(&owner.ifname))
}

impl Waiting {
    /// Leaves the marker of `owner`, lacking an address of each of `families`.
    pub fn register(data_dir: &Path, owner: &Owner, families: &[IpFamily]) -> io::Result<Self> {
        let dir = dir(data_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(marker_name(owner));
        let body: String = families.iter().map(|f| format!("{f}\n")).collect();
        std::fs::write(&path, body)?;
        Ok(Waiting { path })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fresh markers per family at `now` (a marker naming no family counts for
/// both). Removes forgotten ones; a missing directory is no demand.
pub fn count(data_dir: &Path, now: SystemTime) -> BTreeMap<IpFamily, u64> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(age) =
            entry.metadata().and_then(|m| m.modified()).ok().map(|m| now.duration_since(m).unwrap_or_default())
        else {
            continue;
        };
        if age >= FORGOTTEN {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if age >= FRESH {
            continue;
        }
        let body = std::fs::read_to_string(&path).unwrap_or_default();
        let mut families: Vec<IpFamily> = body
            .lines()
            .filter_map(|l| match l.trim() {
                "IPv4" => Some(IpFamily::IPv4),
                "IPv6" => Some(IpFamily::IPv6),
                _ => None,
            })
            .collect();
        if families.is_empty() {
            families = vec![IpFamily::IPv4, IpFamily::IPv6];
        }
        for f in families {
            *out.entry(f).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_count_while_fresh_and_go_with_their_add() {
        let d = tempfile::tempdir().unwrap();
        assert!(count(d.path(), SystemTime::now()).is_empty(), "no directory, no demand");
        let a = Waiting::register(d.path(), &Owner::new("abc/../x", "eth0"), &[IpFamily::IPv4]).unwrap();
        let b = Waiting::register(d.path(), &Owner::new("def", "eth0"), &[IpFamily::IPv4, IpFamily::IPv6]).unwrap();
        assert!(dir(d.path()).join("abc____x.eth0").exists(), "the name stays inside the directory");
        let now = SystemTime::now();
        assert_eq!(count(d.path(), now), [(IpFamily::IPv4, 2), (IpFamily::IPv6, 1)].into());
        assert!(count(d.path(), now + FRESH).is_empty(), "stale markers are no demand");
        drop(a);
        assert_eq!(count(d.path(), now), [(IpFamily::IPv4, 1), (IpFamily::IPv6, 1)].into());
        count(d.path(), now + FORGOTTEN);
        assert!(!b.path.exists(), "a forgotten marker is removed");
    }
}
