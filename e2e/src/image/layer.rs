//! A layer: paths in the image and what each holds (a host file, bytes, a
//! symlink, a directory), parents added, conflicts refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::*;

/// What a path in the image holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A regular file read from `source` on the host (symlinks followed) when
    /// the layer is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    /// A regular file with these contents.
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    /// A symbolic link to `target` (kept as given, relative or absolute).
    Symlink {
        target: String,
    },
    Directory {
        mode: u32,
    },
}

impl Entry {
    fn describe(&self) -> String {
        match self {
            Entry::File { source, mode } => format!("the file {} (mode {mode:o})", source.display()),
            Entry::Bytes { data, mode } => format!("a {} byte file (mode {mode:o})", data.len()),
            Entry::Symlink { target } => format!("a symlink to {target}"),
            Entry::Directory { mode } => format!("a directory (mode {mode:o})"),
        }
    }
}

/// The files of a one-layer image, by absolute path. Parent directories are
/// added as 0755 unless given explicitly.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    /// Keyed by the path without its leading `/`, so the tar is sorted.
    entries: BTreeMap<String, Entry>,
    /// Directories added only as parents; an explicit one replaces them.
    implicit: BTreeSet<String>,
}

/// `/usr/bin/x` → `usr/bin/x`; refuses relative paths, `.` and `..`.
pub(super) fn layer_key(path: &str) -> Result<String> {
    ensure!(path.starts_with('/'), "image path {path:?} is not absolute");
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    ensure!(!parts.is_empty(), "image path {path:?} names the root");
    ensure!(!parts.iter().any(|p| *p == "." || *p == ".."), "image path {path:?} has . or .. in it");
    Ok(parts.join("/"))
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `entry` at the absolute `path`. The same entry twice is fine (two
    /// binaries needing one library); a different one at a taken path fails.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<&mut Self> {
        let key = layer_key(path)?;
        for (slash, _) in key.match_indices('/') {
            self.insert(key[..slash].to_string(), Entry::Directory { mode: 0o755 }, true)?;
        }
        self.insert(key, entry, false)?;
        Ok(self)
    }

    fn insert(&mut self, key: String, entry: Entry, implicit: bool) -> Result<()> {
        match self.entries.get(&key) {
            None => {
                if implicit {
                    self.implicit.insert(key.clone());
                }
                self.entries.insert(key, entry);
            }
            Some(old) if *old == entry => {
                if !implicit {
                    self.implicit.remove(&key);
                }
            }
            Some(Entry::Directory { .. }) if implicit => {}
            Some(Entry::Directory { .. }) if matches!(entry, Entry::Directory { .. }) && self.implicit.remove(&key) => {
                self.entries.insert(key, entry);
            }
            Some(old) => {
                bail!("/{key} is already {} in the image; it cannot also be {}", old.describe(), entry.describe())
            }
        }
        Ok(())
    }

    /// The host file `source` at `path` with `mode`.
    pub fn file(&mut self, source: impl Into<PathBuf>, path: &str, mode: u32) -> Result<&mut Self> {
        self.add(path, Entry::File { source: source.into(), mode })
    }

    /// A file with `data` at `path`.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<&mut Self> {
        self.add(path, Entry::Bytes { data: data.into(), mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        self.add(path, Entry::Symlink { target: target.into() })
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        self.add(path, Entry::Directory { mode })
    }

    /// The executable `source` at `path` (0755) with its shared-library
    /// closure ([`shared_libraries`]); a static one comes alone.
    pub fn executable(&mut self, source: &Path, path: &str) -> Result<&mut Self> {
        ensure!(source.is_file(), "{} does not exist (or is not a file)", source.display());
        self.file(source, path, 0o755)?;
        for lib in shared_libraries(source)? {
            let mode = std::fs::metadata(&lib.host_file)?.permissions().mode() & 0o777;
            self.file(&lib.host_file, &lib.image_path, mode)
                .with_context(|| format!("adding {} (needed by {})", lib.image_path, source.display()))?;
        }
        Ok(self)
    }

    /// Every entry, sorted by path (absolute).
    pub fn entries(&self) -> impl Iterator<Item = (String, &Entry)> {
        self.entries.iter().map(|(k, e)| (format!("/{k}"), e))
    }

    /// The layer as a tar stream: sorted, uid/gid 0, mtime 0.
    pub(super) fn write_tar<W: Write>(&self, out: W) -> Result<W> {
        let mut tar = tar::Builder::new(out);
        for (key, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(0);
            match entry {
                Entry::Directory { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    tar.append_data(&mut header, format!("{key}/"), io::empty())?;
                }
                Entry::File { source, mode } => {
                    let file = File::open(source).with_context(|| format!("opening {}", source.display()))?;
                    let meta = file.metadata()?;
                    ensure!(meta.is_file(), "{} (for /{key}) is not a regular file", source.display());
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(meta.len());
                    tar.append_data(&mut header, key, BufReader::new(file).take(meta.len()))
                        .with_context(|| format!("adding {} as /{key}", source.display()))?;
                }
                Entry::Bytes { data, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, key, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    tar.append_link(&mut header, key, target)?;
                }
            }
        }
        Ok(tar.into_inner()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_adds_parents_and_refuses_conflicts() {
        let mut layer = Layer::new();
        layer.bytes("/usr/local/bin/a", "a", 0o755).unwrap();
        layer.bytes("/usr/local/bin/a", "a", 0o755).unwrap(); // the same again is fine
        layer.dir("/usr/local", 0o700).unwrap(); // explicit beats implicit
        let paths: Vec<(String, Entry)> = layer.entries().map(|(p, e)| (p, e.clone())).collect();
        assert_eq!(
            paths,
            vec![
                ("/usr".into(), Entry::Directory { mode: 0o755 }),
                ("/usr/local".into(), Entry::Directory { mode: 0o700 }),
                ("/usr/local/bin".into(), Entry::Directory { mode: 0o755 }),
                ("/usr/local/bin/a".into(), Entry::Bytes { data: b"a".to_vec(), mode: 0o755 }),
            ]
        );
        assert!(layer.bytes("/usr/local/bin/a", "b", 0o755).is_err());
        assert!(layer.dir("/usr/local", 0o755).is_err());
        assert!(layer.bytes("/usr/local/bin/a/x", "x", 0o644).is_err());
        assert!(layer.symlink("relative", "x").is_err());
        assert!(layer.symlink("/a/../b", "x").is_err());
    }
}
