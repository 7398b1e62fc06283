//! Whole-file replacement that a reader never sees half done (invariant 6, README "Invariants"):
//! write a temporary file beside the target, then rename it over.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What must survive once `write` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The new content, even through a crash of the machine: the file and
    /// the directory are synced (state files, the conflist).
    Synced,
    /// Only atomic replacement: a crash of the machine may bring back the old
    /// content (the IPAM store, whose entries die with the boot anyway).
    RenameOnly,
}

/// The temporary file `write` uses for `path`: `.<name>.tmp` beside it.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `body` (permissions `mode` when given), creating its directory.
pub(crate) fn write(path: &Path, body: &[u8], mode: Option<u32>, durability: Durability) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = temp_path(path);
    let mut file = File::create(&tmp)?;
    file.write_all(body)?;
    if let Some(mode) = mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    if durability == Durability::Synced {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, path)?;
    if durability == Durability::Synced {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write(&path, b"a much longer first version", Some(0o600), Durability::Synced).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        write(&path, b"short", None, Durability::RenameOnly).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short");
        assert!(!temp_path(&path).exists());
    }
}
