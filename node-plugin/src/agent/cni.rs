//! The CNI files carve-agent puts on the node: the carve-cni and carve-ipam
//! executables in the CNI bin dir, and the conflist in the CNI conf dir.
//! Every write is atomic (temp file in the same directory, fsync, rename) and
//! happens only when the content differs, so a runtime never sees half a file
//! and a resync touches nothing.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Executables installed from the source dir into the CNI bin dir.
pub const CNI_BINARIES: [&str; 2] = ["carve-cni", "carve-ipam"];
/// File name of carve's conflist (sorts before most others, as runtimes pick the first).
pub const DEFAULT_CONFLIST: &str = "10-carve.conflist";
/// Network name in the conflist.
pub const NETWORK_NAME: &str = "carve";

#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError { action, path, source }
}

/// carve-cni with carve-ipam, chained with the reference `portmap` plugin
/// for hostPort (as azure-vnet's conflist chains portmap).
pub fn conflist(state_file: &Path, ipam_data_dir: Option<&Path>) -> Value {
    let mut ipam = json!({ "type": "carve-ipam", "stateFile": state_file });
    if let Some(dir) = ipam_data_dir {
        ipam["dataDir"] = json!(dir);
    }
    json!({
        "cniVersion": "1.1.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "carve-cni",
                "stateFile": state_file,
                "ipam": ipam,
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
            },
        ],
    })
}

/// Writes `body` to `path` atomically with `mode` unless it already holds exactly that.
/// Returns whether the file changed.
pub fn write_if_changed(path: &Path, body: &[u8], mode: u32) -> Result<bool, FileError> {
    if fs::read(path).is_ok_and(|have| have == body) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err("creating directory", dir))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".carve-tmp");
    let tmp = dir.join(tmp_name);
    let mut file = File::create(&tmp).map_err(err("creating", &tmp))?;
    file.write_all(body).map_err(err("writing", &tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(err("setting permissions on", &tmp))?;
    file.sync_all().map_err(err("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(err("renaming into place", path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err("syncing directory", dir))?;
    Ok(true)
}

/// Copies carve-cni and carve-ipam from `source_dir` into `bin_dir` when they
/// differ (a new agent image brings new plugins; an unchanged one writes
/// nothing). Returns the names it (re)installed.
pub fn install_binaries(source_dir: &Path, bin_dir: &Path) -> Result<Vec<&'static str>, FileError> {
    let mut installed = Vec::new();
    for name in CNI_BINARIES {
        let src = source_dir.join(name);
        let body = fs::read(&src).map_err(err("reading CNI plugin", &src))?;
        if write_if_changed(&bin_dir.join(name), &body, 0o755)? {
            installed.push(name);
        }
    }
    Ok(installed)
}

/// The CNI version carve's conflist is written in; a chained plugin must speak it.
pub const CONFLIST_CNI_VERSION: &str = "1.1.0";

/// What `ensure_portmap` did with the node's `portmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortmapInstall {
    /// The node's own portmap speaks the conflist's version; left alone.
    Kept,
    /// Copied from the image because the node had none, or one that cannot
    /// run the conflist (`why` says which).
    Installed { why: String },
}

/// CNI versions an executable plugin answers to `VERSION` (as libcni asks).
pub fn plugin_versions(plugin: &Path) -> Result<Vec<String>, String> {
    let mut child = std::process::Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, r#"{{"cniVersion":"{CONFLIST_CNI_VERSION}"}}"#);
    }
    let out = child.wait_with_output().map_err(|e| format!("running {}: {e}", plugin.display()))?;
    let reply: Value =
        serde_json::from_slice(&out.stdout).map_err(|_| format!("{} gave no CNI VERSION answer", plugin.display()))?;
    Ok(reply["supportedVersions"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

/// Makes sure `bin_dir/portmap` exists and speaks [`CONFLIST_CNI_VERSION`]:
/// a node's own portmap is kept when it does (the node owner may have newer
/// plugins), otherwise the image's copy at `source` replaces it. Debian
/// bookworm's portmap, for one, stops at CNI 1.0.0.
pub fn ensure_portmap(source: &Path, bin_dir: &Path) -> Result<PortmapInstall, FileError> {
    let target = bin_dir.join("portmap");
    let why = if target.exists() {
        match plugin_versions(&target) {
            Ok(v) if v.iter().any(|v| v == CONFLIST_CNI_VERSION) => return Ok(PortmapInstall::Kept),
            Ok(v) => format!("the node's portmap speaks only CNI {}", v.join(", ")),
            Err(e) => e,
        }
    } else {
        format!("{} has no portmap", bin_dir.display())
    };
    let body = fs::read(source).map_err(err("reading portmap", source))?;
    write_if_changed(&target, &body, 0o755)?;
    Ok(PortmapInstall::Installed { why })
}

/// Writes the conflist into `conf_dir/file_name`; returns whether it changed.
pub fn write_conflist(
    conf_dir: &Path,
    file_name: &str,
    state_file: &Path,
    ipam_data_dir: Option<&Path>,
) -> Result<bool, FileError> {
    let mut body = serde_json::to_vec_pretty(&conflist(state_file, ipam_data_dir)).unwrap_or_default();
    body.push(b'\n');
    write_if_changed(&conf_dir.join(file_name), &body, 0o644)
}

/// Removes the conflist (the node has no blocks any more); gone already is fine.
pub fn remove_conflist(conf_dir: &Path, file_name: &str) -> Result<bool, FileError> {
    let path = conf_dir.join(file_name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err("removing conflist", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("carve-agent-cni-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn conflist_chains_carve_cni_with_portmap() {
        let c = conflist(Path::new("/run/carve/node-state.json"), Some(Path::new("/var/lib/carve/ipam/node-a")));
        assert_eq!(c["plugins"][0]["ipam"]["dataDir"], "/var/lib/carve/ipam/node-a");
        assert_eq!(c["plugins"][0]["type"], "carve-cni");
        assert_eq!(c["plugins"][0]["ipam"]["type"], "carve-ipam");
        assert_eq!(c["plugins"][0]["ipam"]["stateFile"], "/run/carve/node-state.json");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn binaries_are_installed_only_when_changed() {
        let d = tmpdir("bins");
        let (src, bin) = (d.join("src"), d.join("bin"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("carve-cni"), b"cni v1").unwrap();
        fs::write(src.join("carve-ipam"), b"ipam v1").unwrap();
        assert_eq!(install_binaries(&src, &bin).unwrap(), ["carve-cni", "carve-ipam"]);
        assert_eq!(fs::metadata(bin.join("carve-cni")).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(install_binaries(&src, &bin).unwrap().is_empty());
        fs::write(src.join("carve-ipam"), b"ipam v2").unwrap();
        assert_eq!(install_binaries(&src, &bin).unwrap(), ["carve-ipam"]);
        assert_eq!(fs::read(bin.join("carve-ipam")).unwrap(), b"ipam v2");
        assert!(fs::read_dir(&bin).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with("carve-tmp")));
        let missing = install_binaries(&d.join("nowhere"), &bin).unwrap_err().to_string();
        assert!(missing.contains("reading CNI plugin") && missing.contains("nowhere/carve-cni"), "{missing}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn conflist_write_is_idempotent_and_removable() {
        let d = tmpdir("conf");
        let state = Path::new("/run/carve/node-state.json");
        assert!(write_conflist(&d, DEFAULT_CONFLIST, state, None).unwrap());
        assert!(!write_conflist(&d, DEFAULT_CONFLIST, state, None).unwrap());
        let parsed: Value = serde_json::from_slice(&fs::read(d.join(DEFAULT_CONFLIST)).unwrap()).unwrap();
        assert_eq!(parsed, conflist(state, None));
        assert!(remove_conflist(&d, DEFAULT_CONFLIST).unwrap());
        assert!(!remove_conflist(&d, DEFAULT_CONFLIST).unwrap());
        fs::remove_dir_all(d).unwrap();
    }

    fn fake_plugin(path: &Path, versions: &str) {
        let script = format!(
            "#!/bin/sh\ncat >/dev/null\necho '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[{versions}]}}'\n"
        );
        fs::write(path, script).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn portmap_is_installed_when_missing_or_too_old_and_kept_when_current() {
        let d = tmpdir("portmap");
        let (image, bin) = (d.join("image-portmap"), d.join("bin"));
        fake_plugin(&image, r#""0.4.0","1.0.0","1.1.0""#);
        fs::create_dir_all(&bin).unwrap();

        let missing = ensure_portmap(&image, &bin).unwrap();
        assert!(matches!(&missing, PortmapInstall::Installed { why } if why.contains("has no portmap")), "{missing:?}");
        assert_eq!(fs::read(bin.join("portmap")).unwrap(), fs::read(&image).unwrap());

        fake_plugin(&bin.join("portmap"), r#""0.4.0","1.0.0""#);
        let old = ensure_portmap(&image, &bin).unwrap();
        assert!(matches!(&old, PortmapInstall::Installed { why } if why.contains("only CNI 0.4.0, 1.0.0")), "{old:?}");
        assert_eq!(plugin_versions(&bin.join("portmap")).unwrap(), ["0.4.0", "1.0.0", "1.1.0"]);

        let node_own = r#""1.0.0","1.1.0""#;
        fake_plugin(&bin.join("portmap"), node_own);
        assert_eq!(ensure_portmap(&image, &bin).unwrap(), PortmapInstall::Kept);
        assert_eq!(plugin_versions(&bin.join("portmap")).unwrap(), ["1.0.0", "1.1.0"]);

        fs::remove_file(bin.join("portmap")).unwrap();
        let no_source = ensure_portmap(&d.join("nowhere"), &bin).unwrap_err().to_string();
        assert!(no_source.contains("reading portmap"), "{no_source}");
        fs::remove_dir_all(d).unwrap();
    }
}
