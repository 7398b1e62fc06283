//! The CNI files carve-agent puts on the node: the carve-cni and carve-ipam
//! executables in the CNI bin dir, and the conflist in the CNI conf dir.
//! Every write is atomic (temp file in the same directory, fsync, rename) and
//! happens only when the content differs, so a runtime never sees half a file
//! and a resync touches nothing.
//!
//! Which CNI versions the conflist declares is decided by [`choose_versions`]
//! (pure); [`write_conflist`] reads what it needs for that from the node (the
//! conflist already there, carve-ipam's store) and writes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::atomic::{self, Durability};
use crate::cni::{SUPPORTED_VERSIONS, version_index};
use crate::ipam::DEFAULT_DATA_ROOT;
use crate::ipam::store::{PodIpStore, StoreError};

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

/// The conflist's `cniVersion` by default: the newest a libcni before 1.2 knows
/// (containerd 1.6 and 1.7 vendor libcni 1.1.2: results up to 1.0.0, and they
/// ignore `cniVersions`).
pub const DEFAULT_CNI_VERSION: &str = "1.0.0";
/// The conflist's `cniVersions` by default: a libcni >= 1.2 (containerd >= 2.0,
/// CRI-O) reads this list instead and takes the highest version it knows.
pub const DEFAULT_CNI_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// The oldest version `--cni-version` accepts.
const OLDEST_PIN: &str = "0.3.1";

/// The versions an operator may pin with `--cni-version`: carve-cni's, from 0.3.1 up.
pub fn pinnable_versions() -> &'static [&'static str] {
    &SUPPORTED_VERSIONS[version_index(OLDEST_PIN).expect("carve-cni supports 0.3.1")..]
}

/// Parses a `--cni-version` value (clap `value_parser`): one of [`pinnable_versions`].
pub fn parse_cni_version(s: &str) -> Result<String, String> {
    match pinnable_versions().iter().find(|v| **v == s.trim()) {
        Some(v) => Ok(v.to_string()),
        None => Err(format!(
            "--cni-version (CARVE_CNI_VERSION) must be one of {} (the CNI versions carve-cni speaks)",
            pinnable_versions().join(", ")
        )),
    }
}

/// The versions a conflist declares: `cniVersion` for every runtime, and the
/// `cniVersions` list a libcni >= 1.2 prefers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflistVersions {
    pub cni_version: String,
    pub cni_versions: Vec<String>,
}

impl ConflistVersions {
    /// What the agent writes when nothing on the node holds it back: the pin
    /// alone, else [`DEFAULT_CNI_VERSION`] with [`DEFAULT_CNI_VERSIONS`].
    pub fn wanted(pin: Option<&str>) -> Self {
        match pin {
            Some(v) => ConflistVersions { cni_version: v.to_string(), cni_versions: vec![v.to_string()] },
            None => ConflistVersions {
                cni_version: DEFAULT_CNI_VERSION.to_string(),
                cni_versions: DEFAULT_CNI_VERSIONS.map(String::from).to_vec(),
            },
        }
    }

    /// The newest version a runtime may pick from this conflist, so the one
    /// every chained plugin (portmap) must speak.
    pub fn highest(&self) -> &str {
        self.cni_versions
            .iter()
            .chain([&self.cni_version])
            .max_by_key(|v| version_index(v))
            .map(String::as_str)
            .unwrap_or(&self.cni_version)
    }
}

/// Why [`choose_versions`] chose what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionReason {
    /// The defaults: no conflist, no live pods, or the version does not go up.
    Default,
    /// The operator's `--cni-version`.
    Pinned,
    /// The existing conflist's lower `cniVersion` stays: pods created under it
    /// still run, and on their DEL a runtime converts their cached results to
    /// the conflist's version; libcni < 1.2 fails where it has no converter
    /// (1.0.0 to 1.1.0), so those pods would stay Terminating.
    KeptForLivePods { existing: String, wanted: String },
    /// The pin raises `cniVersion` although pods created under the existing
    /// version still run: on containerd < 2.0 they may fail to delete.
    PinRaisesUnderLivePods { existing: String, pinned: String },
}

/// The versions to write and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionChoice {
    pub versions: ConflistVersions,
    pub reason: VersionReason,
}

/// True when going from `existing` (a conflist's `cniVersion`) to `to` raises
/// it. A version carve-cni does not speak never held a pod, so leaving it is
/// never a raise.
pub fn raises(existing: Option<&str>, to: &str) -> bool {
    match (existing.and_then(version_index), version_index(to)) {
        (Some(from), Some(to)) => from < to,
        _ => false,
    }
}

/// The conflist's versions, from the `cniVersion` of the conflist already on
/// the node (`existing`), whether pods allocated by carve-ipam are alive, and
/// the operator's pin. The version an older runtime reads (`cniVersion`)
/// never goes up under live pods unless pinned; going down is always fine.
/// When held back, `cniVersions` still lists the newer defaults: a libcni
/// >= 1.2 converts cached results to any newer version.
pub fn choose_versions(existing: Option<&str>, pods_live: bool, pin: Option<&str>) -> VersionChoice {
    let wanted = ConflistVersions::wanted(pin);
    let Some(existing) = existing.filter(|e| pods_live && raises(Some(e), &wanted.cni_version)) else {
        let reason = if pin.is_some() { VersionReason::Pinned } else { VersionReason::Default };
        return VersionChoice { versions: wanted, reason };
    };
    let (existing, wanted_version) = (existing.to_string(), wanted.cni_version.clone());
    match pin {
        Some(pinned) => VersionChoice {
            versions: wanted,
            reason: VersionReason::PinRaisesUnderLivePods { existing, pinned: pinned.to_string() },
        },
        None => {
            let newer = wanted.cni_versions.into_iter().filter(|v| raises(Some(&existing), v));
            VersionChoice {
                versions: ConflistVersions {
                    cni_version: existing.clone(),
                    cni_versions: std::iter::once(existing.clone()).chain(newer).collect(),
                },
                reason: VersionReason::KeptForLivePods { existing, wanted: wanted_version },
            }
        }
    }
}

/// carve-ipam's store for carve's network: `--ipam-data-dir`, else carve-ipam's default.
pub fn ipam_store_dir(configured: Option<&Path>) -> PathBuf {
    configured.map(PathBuf::from).unwrap_or_else(|| Path::new(DEFAULT_DATA_ROOT).join(NETWORK_NAME))
}

/// How long the agent waits for carve-ipam's store lock (a CNI call holds it for milliseconds).
pub(crate) const STORE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether carve-ipam's store in `data_dir` holds any allocation, read the way
/// carve-ipam reads it (under its lock). A store never written means no pods
/// (and nothing is created for it).
pub fn pods_live(data_dir: &Path) -> Result<bool, StoreError> {
    let store = PodIpStore::new(data_dir);
    let file = store.file();
    match file.try_exists() {
        Ok(false) => return Ok(false),
        Ok(true) => {}
        Err(source) => return Err(StoreError::Io { path: file, source }),
    }
    let locked = store.lock_within(STORE_LOCK_TIMEOUT)?;
    Ok(!locked.load()?.by_ip.is_empty())
}

/// The `cniVersion` of the conflist at `path`, when it is there and parses.
pub fn existing_cni_version(path: &Path) -> Option<String> {
    let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// carve-cni with carve-ipam, chained with the reference `portmap` plugin
/// for hostPort (as azure-vnet's conflist chains portmap), in `versions`.
pub fn conflist(state_file: &Path, ipam_data_dir: Option<&Path>, versions: &ConflistVersions) -> Value {
    let mut ipam = json!({ "type": "carve-ipam", "stateFile": state_file });
    if let Some(dir) = ipam_data_dir {
        ipam["dataDir"] = json!(dir);
    }
    json!({
        "cniVersion": versions.cni_version,
        "cniVersions": versions.cni_versions,
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
    atomic::write(path, body, Some(mode), Durability::Synced).map_err(err("writing", path))?;
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

/// What `ensure_portmap` did with the node's `portmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortmapInstall {
    /// The node's own portmap speaks the conflist's highest version; left alone.
    Kept,
    /// Copied from the image because the node had none, or one that cannot
    /// run the conflist (`why` says which).
    Installed { why: String },
}

/// CNI versions an executable plugin answers to `VERSION` (as libcni asks, in `asked`).
pub fn plugin_versions(plugin: &Path, asked: &str) -> Result<Vec<String>, String> {
    let mut child = std::process::Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, r#"{{"cniVersion":"{asked}"}}"#);
    }
    let out = child.wait_with_output().map_err(|e| format!("running {}: {e}", plugin.display()))?;
    let reply: Value =
        serde_json::from_slice(&out.stdout).map_err(|_| format!("{} gave no CNI VERSION answer", plugin.display()))?;
    Ok(reply["supportedVersions"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

/// Makes sure `bin_dir/portmap` exists and speaks `version` (the conflist's
/// [`ConflistVersions::highest`]: the one a libcni >= 1.2 picks): a node's own
/// portmap is kept when it does (the node owner may have newer plugins),
/// otherwise the image's copy at `source` replaces it. Debian bookworm's
/// portmap, for one, stops at CNI 1.0.0.
pub fn ensure_portmap(source: &Path, bin_dir: &Path, version: &str) -> Result<PortmapInstall, FileError> {
    let target = bin_dir.join("portmap");
    let why = if target.exists() {
        match plugin_versions(&target, version) {
            Ok(v) if v.iter().any(|v| v == version) => return Ok(PortmapInstall::Kept),
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

/// What [`write_conflist`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflistWrite {
    pub changed: bool,
    pub choice: VersionChoice,
}

/// Writes the conflist into `conf_dir/file_name` in the versions
/// [`choose_versions`] picks from the conflist already there, carve-ipam's
/// store (read only when the version would go up) and `pin`. A store that
/// cannot be read counts as live pods: holding the version back is the safe side.
pub fn write_conflist(
    conf_dir: &Path,
    file_name: &str,
    state_file: &Path,
    ipam_data_dir: Option<&Path>,
    pin: Option<&str>,
) -> Result<ConflistWrite, FileError> {
    let path = conf_dir.join(file_name);
    let existing = existing_cni_version(&path);
    let live = raises(existing.as_deref(), &ConflistVersions::wanted(pin).cni_version)
        && pods_live(&ipam_store_dir(ipam_data_dir)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot tell whether pods are live; treating them as live");
            true
        });
    let choice = choose_versions(existing.as_deref(), live, pin);
    let mut body =
        serde_json::to_vec_pretty(&conflist(state_file, ipam_data_dir, &choice.versions)).unwrap_or_default();
    body.push(b'\n');
    let changed = write_if_changed(&path, &body, 0o644)?;
    Ok(ConflistWrite { changed, choice })
}

/// Removes the conflist (the node has no blocks any more); gone already is fine.
/// The file names in the CNI config dir (none when it does not exist yet).
pub fn config_files(conf_dir: &Path) -> Result<Vec<String>, FileError> {
    match fs::read_dir(conf_dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(err("listing", conf_dir)(e)),
    }
}

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
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("carve-agent-cni-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn conflist_chains_carve_cni_with_portmap() {
        let versions = ConflistVersions::wanted(None);
        let c =
            conflist(Path::new("/run/carve/node-state.json"), Some(Path::new("/var/lib/carve/ipam/node-a")), &versions);
        assert_eq!(c["cniVersion"], "1.0.0", "containerd 1.6/1.7 (libcni 1.1.2) know results up to 1.0.0");
        assert_eq!(c["cniVersions"], json!(["1.0.0", "1.1.0"]), "libcni >= 1.2 picks 1.1.0 from the list");
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
        let data = d.join("ipam");
        let write = |pin| write_conflist(&d, DEFAULT_CONFLIST, state, Some(&data), pin).unwrap();
        assert!(write(None).changed);
        assert!(!write(None).changed);
        let parsed: Value = serde_json::from_slice(&fs::read(d.join(DEFAULT_CONFLIST)).unwrap()).unwrap();
        assert_eq!(parsed, conflist(state, Some(&data), &ConflistVersions::wanted(None)));
        assert!(!data.exists(), "no version raised: the store is not even looked at");
        assert!(remove_conflist(&d, DEFAULT_CONFLIST).unwrap());
        assert!(!remove_conflist(&d, DEFAULT_CONFLIST).unwrap());
        fs::remove_dir_all(d).unwrap();
    }

    fn choice(existing: Option<&str>, live: bool, pin: Option<&str>) -> (String, Vec<String>, VersionReason) {
        let c = choose_versions(existing, live, pin);
        (c.versions.cni_version, c.versions.cni_versions, c.reason)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_serve_old_and_new_libcni() {
        let default = ("1.0.0".to_string(), strings(&["1.0.0", "1.1.0"]), VersionReason::Default);
        for (existing, live) in [
            (None, false),
            (None, true),
            (Some("0.4.0"), false),
            (Some("1.0.0"), true),
            // Lowering is always fine (the old agent's 1.1.0-only conflist).
            (Some("1.1.0"), true),
            // Never spoken by carve-cni, so no pod was created under it.
            (Some("0.2.0"), true),
            (Some("garbage"), true),
        ] {
            assert_eq!(choice(existing, live, None), default, "{existing:?} live={live}");
        }
        assert_eq!(ConflistVersions::wanted(None).highest(), "1.1.0");
    }

    #[test]
    fn a_lower_version_stays_under_live_pods() {
        let (v, list, reason) = choice(Some("0.4.0"), true, None);
        assert_eq!(v, "0.4.0", "containerd < 2.0 keeps seeing the version its live pods were created under");
        assert_eq!(list, strings(&["0.4.0", "1.0.0", "1.1.0"]), "libcni >= 1.2 converts cached results upwards");
        assert_eq!(reason, VersionReason::KeptForLivePods { existing: "0.4.0".into(), wanted: "1.0.0".into() });
        assert_eq!(choice(Some("0.3.1"), true, None).0, "0.3.1");
        assert_eq!(choose_versions(Some("0.4.0"), true, None).versions.highest(), "1.1.0");
    }

    #[test]
    fn the_pin_wins_and_warns_when_it_raises_under_live_pods() {
        for pin in pinnable_versions() {
            assert_eq!(choice(None, true, Some(pin)), (pin.to_string(), strings(&[pin]), VersionReason::Pinned));
            assert_eq!(ConflistVersions::wanted(Some(pin)).highest(), *pin);
        }
        assert_eq!(choice(Some("1.1.0"), true, Some("1.0.0")).2, VersionReason::Pinned, "lowering");
        assert_eq!(choice(Some("0.4.0"), false, Some("1.1.0")).2, VersionReason::Pinned, "no live pods");
        assert_eq!(
            choice(Some("1.0.0"), true, Some("1.1.0")),
            (
                "1.1.0".into(),
                strings(&["1.1.0"]),
                VersionReason::PinRaisesUnderLivePods { existing: "1.0.0".into(), pinned: "1.1.0".into() }
            )
        );
    }

    #[test]
    fn cni_version_flag_accepts_carve_cni_versions_from_0_3_1() {
        assert_eq!(pinnable_versions(), ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
        assert_eq!(parse_cni_version("1.0.0").unwrap(), "1.0.0");
        for bad in ["0.3.0", "0.2.0", "1.2.0", "1.0", "v1.0.0", ""] {
            let e = parse_cni_version(bad).unwrap_err();
            assert!(e.contains("--cni-version") && e.contains("0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{bad:?}: {e}");
        }
    }

    fn allocate(data: &Path) {
        let store = PodIpStore::new(data);
        let locked = store.lock().unwrap();
        let mut a = crate::ipam::alloc::Allocations::default();
        a.by_ip.insert("10.244.1.2".parse().unwrap(), crate::ipam::alloc::Owner::new("pod-a", "eth0"));
        locked.save(&a).unwrap();
    }

    #[test]
    fn rewrite_reads_the_existing_conflist_and_the_ipam_store() {
        let d = tmpdir("rewrite");
        let (state, data) = (Path::new("/run/carve/node-state.json"), d.join("ipam"));
        let path = d.join(DEFAULT_CONFLIST);
        let write = |pin| write_conflist(&d, DEFAULT_CONFLIST, state, Some(&data), pin).unwrap();
        let on_disk = || -> Value { serde_json::from_slice(&fs::read(&path).unwrap()).unwrap() };
        // An older conflist (a pin removed since) and no pod yet: raised.
        fs::write(&path, r#"{"cniVersion":"0.4.0","name":"carve","plugins":[]}"#).unwrap();
        assert!(!pods_live(&data).unwrap());
        assert_eq!(write(None).choice.reason, VersionReason::Default);
        assert_eq!(existing_cni_version(&path).as_deref(), Some("1.0.0"));
        // The same with a pod in carve-ipam's store: kept, and said why.
        fs::write(&path, r#"{"cniVersion":"0.4.0","name":"carve","plugins":[]}"#).unwrap();
        allocate(&data);
        assert!(pods_live(&data).unwrap());
        let w = write(None);
        assert!(w.changed);
        assert!(matches!(w.choice.reason, VersionReason::KeptForLivePods { .. }), "{w:?}");
        assert_eq!(on_disk()["cniVersion"], "0.4.0");
        assert_eq!(on_disk()["cniVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert!(!write(None).changed, "a resync keeps it and writes nothing");
        // The pin wins.
        let w = write(Some("1.1.0"));
        assert!(matches!(w.choice.reason, VersionReason::PinRaisesUnderLivePods { .. }), "{w:?}");
        assert_eq!(
            (on_disk()["cniVersion"].clone(), on_disk()["cniVersions"].clone()),
            (json!("1.1.0"), json!(["1.1.0"]))
        );
        // Lowered back to the defaults under the same live pod.
        assert_eq!(write(None).choice.reason, VersionReason::Default);
        assert_eq!(on_disk()["cniVersion"], "1.0.0");
        // A store that cannot be read counts as live.
        fs::write(&path, r#"{"cniVersion":"0.4.0","name":"carve","plugins":[]}"#).unwrap();
        fs::write(data.join("allocations.json"), b"{").unwrap();
        assert!(pods_live(&data).is_err());
        assert!(matches!(write(None).choice.reason, VersionReason::KeptForLivePods { .. }));
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

        let missing = ensure_portmap(&image, &bin, "1.1.0").unwrap();
        assert!(matches!(&missing, PortmapInstall::Installed { why } if why.contains("has no portmap")), "{missing:?}");
        assert_eq!(fs::read(bin.join("portmap")).unwrap(), fs::read(&image).unwrap());

        fake_plugin(&bin.join("portmap"), r#""0.4.0","1.0.0""#);
        // Pinned to 1.0.0, Debian bookworm's portmap is enough; the default list's 1.1.0 needs a newer one.
        assert_eq!(ensure_portmap(&image, &bin, "1.0.0").unwrap(), PortmapInstall::Kept);
        let old = ensure_portmap(&image, &bin, ConflistVersions::wanted(None).highest()).unwrap();
        assert!(matches!(&old, PortmapInstall::Installed { why } if why.contains("only CNI 0.4.0, 1.0.0")), "{old:?}");
        assert_eq!(plugin_versions(&bin.join("portmap"), "1.1.0").unwrap(), ["0.4.0", "1.0.0", "1.1.0"]);

        let node_own = r#""1.0.0","1.1.0""#;
        fake_plugin(&bin.join("portmap"), node_own);
        assert_eq!(ensure_portmap(&image, &bin, "1.1.0").unwrap(), PortmapInstall::Kept);
        assert_eq!(plugin_versions(&bin.join("portmap"), "1.1.0").unwrap(), ["1.0.0", "1.1.0"]);

        fs::remove_file(bin.join("portmap")).unwrap();
        let no_source = ensure_portmap(&d.join("nowhere"), &bin, "1.1.0").unwrap_err().to_string();
        assert!(no_source.contains("reading portmap"), "{no_source}");
        fs::remove_dir_all(d).unwrap();
    }
}
