//! Which ADD created an exec'd IPAM plugin's allocation. carve-cni cannot
//! read another plugin's store, so the first ADD of an attachment (network,
//! container ID, ifname) claims it by creating `<runDir>/<network>/<container ID>:<ifname>`
//! with O_EXCL before calling the plugin; a later ADD finds the claim and
//! leaves the allocation alone when it fails. DEL removes the claim once the
//! plugin released the address. `runDir` is on tmpfs (`/run`): claims die
//! with the boot, as the pods' network namespaces do.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::{CniError, code};

/// Where claims live unless the config's `runDir` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/carve/cni";

/// This ADD's claim on an attachment.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
}

impl Claim {
    /// Removes the claim: the allocation it stood for is gone.
    pub fn drop_claim(self) {
        remove(&self.path);
    }
}

fn path(run_dir: &Path, network: &str, container_id: &str, ifname: &str) -> Result<PathBuf, CniError> {
    // ':' is in neither a container ID nor an interface name (the spec's and the kernel's rules).
    let unsafe_part = |s: &str| s.is_empty() || s == "." || s == ".." || s.contains(['/', ':', '\0']);
    if unsafe_part(network) {
        return Err(CniError::new(code::INVALID_CONFIG, format!("network name {network:?} cannot name a directory")));
    }
    if unsafe_part(container_id) || unsafe_part(ifname) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {container_id:?} / CNI_IFNAME {ifname:?} cannot name an attachment"),
        ));
    }
    Ok(run_dir.join(network).join(format!("{container_id}:{ifname}")))
}

/// Claims the attachment: `Some` when this ADD is its first, `None` when an
/// earlier ADD holds the claim.
pub fn claim(run_dir: &Path, network: &str, container_id: &str, ifname: &str) -> Result<Option<Claim>, CniError> {
    let path = path(run_dir, network, container_id, ifname)?;
    let io = |e: std::io::Error| CniError::new(code::IO_FAILURE, format!("claiming {}: {e}", path.display()));
    std::fs::create_dir_all(path.parent().expect("joined under run_dir")).map_err(io)?;
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => Ok(Some(Claim { path })),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// DEL's half: the plugin released the attachment's address.
pub fn forget(run_dir: &Path, network: &str, container_id: &str, ifname: &str) {
    if let Ok(path) = path(run_dir, network, container_id, ifname) {
        remove(&path);
    }
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove an attachment claim"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_add_claims_a_later_one_does_not_and_del_frees_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim(dir.path(), "net", "c1", "eth0").unwrap();
        assert!(first.is_some(), "the first ADD claims");
        assert!(claim(dir.path(), "net", "c1", "eth0").unwrap().is_none(), "a repeated ADD finds the claim");
        assert!(claim(dir.path(), "net", "c1", "net1").unwrap().is_some(), "another ifname is another attachment");
        assert!(claim(dir.path(), "other", "c1", "eth0").unwrap().is_some(), "another network too");
        forget(dir.path(), "net", "c1", "eth0");
        assert!(claim(dir.path(), "net", "c1", "eth0").unwrap().is_some(), "after DEL, a new ADD claims again");
        forget(dir.path(), "net", "never-added", "eth0");
    }

    #[test]
    fn names_that_would_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(claim(dir.path(), "../x", "c", "eth0").unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(claim(dir.path(), "net", "a/b", "eth0").unwrap_err().code, code::INVALID_ENV);
        assert_eq!(claim(dir.path(), "net", "c", "..").unwrap_err().code, code::INVALID_ENV);
    }
}
