//! One-layer OCI image archives, built without a container engine, for nodes
//! whose containerd imports them (`ctr -n k8s.io images import <archive>`).
//!
//! ```text
//!   Layer  (path in the image → host file | bytes | symlink | directory)
//!     │  write_archive(): tar, sorted, uid/gid 0, mtime 0   [gzip]
//!     ▼
//!   <out>.tar
//!     ├─ oci-layout
//!     ├─ index.json          io.containerd.image.name + org.opencontainers.image.ref.name
//!     └─ blobs/sha256/…      manifest → config (Entrypoint, Env, User, rootfs.diff_ids) + the layer
//! ```
//!
//! The same inputs give the same bytes, so the same digest. [`build_all`]
//! makes the three images the local nodes need ([`carve_image`],
//! [`pause_image`], [`busybox_image`]); [`OciArchive`] reads one back,
//! checking every digest, for tests and tools.
//!
//! There is no musl target: dynamic executables go in with the shared
//! libraries `ldd` names ([`shared_libraries`]), at the paths the loader will
//! look for them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use anyhow::{Context, Result, bail, ensure};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, Config, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder,
};
use ring::digest::SHA256;
use serde::Serialize;
use serde_json::Value;

/// The annotation containerd's importer names an image by.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// Repository of carve's image (the manifests' `image:`).
pub const CARVE_REPOSITORY: &str = "ghcr.io/carve-dev/carve";
/// The pods' sandbox image on the local nodes.
pub const PAUSE_IMAGE: &str = "carve.local/pause:v1";
/// A small image with a shell and network tools, for test pods.
pub const BUSYBOX_IMAGE: &str = "carve.local/busybox:v1";
/// carve's binaries, in [`CARVE_BIN_DIR`] of the image (as the Dockerfile's `COPY`).
pub const CARVE_BINARIES: [&str; 5] = ["carve-controller", "carvectl", "carve-agent", "carve-cni", "carve-ipam"];
pub const CARVE_BIN_DIR: &str = "/usr/local/bin";
/// Where carve's image holds the reference portmap plugin (carve-agent's
/// `install-cni --portmap-source` default).
pub const PORTMAP_PATH: &str = "/usr/local/lib/carve/cni/portmap";
/// nft, from Debian's nftables, for carve-agent's SNAT table.
pub const NFT_PATH: &str = "/usr/sbin/nft";
/// Debian's static busybox (package busybox-static).
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// Applets the tests' pods use; building the busybox image fails without one.
pub const BUSYBOX_APPLETS: [&str; 20] = [
    "sh", "ping", "wget", "nc", "ip", "sleep", "cat", "ls", "hostname", "ifconfig", "route", "echo", "true", "httpd",
    "mkdir", "ps", "kill", "grep", "sed", "netstat",
];
/// The PATH of every image (Debian's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Uid and gid of the `nonroot` user (the Dockerfile's, the controller's `runAsUser`).
pub const NONROOT_ID: u32 = 65532;

/// carve's image tag for this source tree: `v` + the workspace version.
pub fn default_tag() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

/// `ghcr.io/carve-dev/carve:<tag>`.
pub fn carve_image_name(tag: &str) -> String {
    format!("{CARVE_REPOSITORY}:{tag}")
}

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
fn layer_key(path: &str) -> Result<String> {
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
    fn write_tar<W: Write>(&self, out: W) -> Result<W> {
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

/// A shared object an executable loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLibrary {
    /// Where the loader looks for it, e.g. `/lib/x86_64-linux-gnu/libc.so.6`
    /// or the interpreter `/lib64/ld-linux-x86-64.so.2`.
    pub image_path: String,
    /// The file itself on the host, symlinks resolved.
    pub host_file: PathBuf,
}

/// Directories glibc's loader searches without an `ld.so.cache`, which these
/// images do not have: `/lib`, `/usr/lib`, `/lib64`, `/usr/lib64` and their
/// multiarch subdirectories.
fn in_default_lib_dir(path: &Path) -> bool {
    const DIRS: [&str; 4] = ["/lib", "/usr/lib", "/lib64", "/usr/lib64"];
    let Some(dir) = path.parent() else { return false };
    DIRS.iter().any(|d| dir == Path::new(d) || dir.parent() == Some(Path::new(d)))
}

/// The shared objects `ldd` lists for `elf` (its whole closure, the loader
/// included); empty for a static executable. Fails when one is not found.
pub fn shared_libraries(elf: &Path) -> Result<Vec<SharedLibrary>> {
    let mut magic = [0u8; 4];
    File::open(elf).and_then(|mut f| f.read_exact(&mut magic)).with_context(|| format!("reading {}", elf.display()))?;
    if &magic != b"\x7fELF" {
        return Ok(vec![]);
    }
    let out = Command::new("ldd")
        .arg(elf)
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running ldd {}", elf.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
        return Ok(vec![]);
    }
    ensure!(out.status.success(), "ldd {} failed ({}): {}", elf.display(), out.status, stderr.trim());
    let libs = parse_ldd(&stdout).with_context(|| format!("ldd {}", elf.display()))?;
    libs.into_iter()
        .map(|(image_path, host)| {
            let host_file =
                std::fs::canonicalize(&host).with_context(|| format!("resolving {} (ldd {})", host, elf.display()))?;
            Ok(SharedLibrary { image_path, host_file })
        })
        .collect()
}

/// `(path in the image, path on the host)` for each object of an ldd listing:
///
/// ```text
/// linux-vdso.so.1 (0x…)                                  the kernel's: skipped
/// libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)     found by the loader's search
/// /lib64/ld-linux-x86-64.so.2 (0x…)                      the interpreter, by its path
/// /lib64/ld-linux-x86-64.so.2 => /usr/lib64/ld-… (0x…)   the same, as some ldd print it
/// libfoo.so.1 => not found                               an error
/// ```
fn parse_ldd(listing: &str) -> Result<Vec<(String, String)>> {
    let mut libs = Vec::new();
    let mut missing = Vec::new();
    for line in listing.lines().map(str::trim) {
        if line.is_empty() || line == "statically linked" {
            continue;
        }
        let strip_addr = |s: &str| s.split(" (0x").next().unwrap_or_default().trim().to_string();
        let (image_path, host) = match line.split_once("=>") {
            Some((name, found)) => {
                let (name, found) = (name.trim(), found.trim());
                if found.starts_with("not found") {
                    missing.push(name.to_string());
                    continue;
                }
                let found = strip_addr(found);
                if found.is_empty() {
                    continue; // `linux-vdso.so.1 =>  (0x…)`, older ldd
                }
                let image_path = if name.starts_with('/') { name.to_string() } else { found.clone() };
                if !name.starts_with('/') && !in_default_lib_dir(Path::new(&found)) {
                    bail!(
                        "{name} resolves to {found}, outside the loader's default directories; \
                         the image has no ld.so.cache to find it there"
                    );
                }
                (image_path, found)
            }
            None => {
                let path = strip_addr(line);
                if !path.starts_with('/') {
                    continue; // linux-vdso.so.1
                }
                (path.clone(), path)
            }
        };
        libs.push((image_path, host));
    }
    ensure!(missing.is_empty(), "shared libraries not found: {}", missing.join(", "));
    Ok(libs)
}

/// How the layer blob is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar: fastest to write and to import locally.
    #[default]
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
}

/// An image to write: its name, its one layer and its config.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The full reference, `repository:tag`.
    pub name: String,
    pub layer: Layer,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=value`; [`ImageSpec::new`] sets [`DEFAULT_PATH`].
    pub env: Vec<String>,
    /// None: root, the runtime's default.
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub compression: Compression,
}

impl ImageSpec {
    pub fn new(name: &str, layer: Layer) -> Self {
        ImageSpec {
            name: name.into(),
            layer,
            entrypoint: None,
            cmd: None,
            env: vec![DEFAULT_PATH.into()],
            user: None,
            working_dir: None,
            labels: BTreeMap::new(),
            compression: Compression::None,
        }
    }

    /// The tag: what follows the last `:` after the last `/`.
    pub fn tag(&self) -> Result<&str> {
        let last = self.name.rsplit('/').next().unwrap_or_default();
        match last.rsplit_once(':') {
            Some((_, tag)) if !tag.is_empty() => Ok(tag),
            _ => bail!("image name {:?} has no tag (repository:tag)", self.name),
        }
    }
}

/// An archive [`write_archive`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltImage {
    pub name: String,
    pub archive: PathBuf,
    /// The manifest's digest (`sha256:…`): what `ctr images ls` shows.
    pub digest: String,
    /// The uncompressed layer's digest; for one layer also the snapshot's chain ID.
    pub diff_id: String,
    /// Size of the archive in bytes.
    pub size: u64,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: ring::digest::Context,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing { inner, hasher: ring::digest::Context::new(&SHA256), len: 0 }
    }

    /// (`sha256:<hex>`, bytes, the writer).
    fn finish(self) -> (String, u64, W) {
        (hex_digest(self.hasher.finish()), self.len, self.inner)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `sha256:<hex>`. ring's SHA-256 is assembly: fast in debug builds too,
/// where the tests hash archives of hundreds of MiB.
fn hex_digest(d: ring::digest::Digest) -> String {
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn sha256(data: &[u8]) -> String {
    hex_digest(ring::digest::digest(&SHA256, data))
}

/// The digest (`sha256:<hex>`) of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hashing = Hashing::new(io::sink());
    io::copy(&mut File::open(path).with_context(|| format!("opening {}", path.display()))?, &mut hashing)?;
    Ok(hashing.finish().0)
}

/// JSON with every object's keys sorted: oci-spec keeps annotations and
/// labels in HashMaps, whose order changes from run to run.
fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sorted(serde_json::to_value(value)?))?)
}

fn digest(s: &str) -> Result<Digest> {
    Ok(Digest::from_str(s)?)
}

fn some_if<T>(v: T, keep: bool) -> Option<T> {
    keep.then_some(v)
}

/// Writes `spec` as an OCI archive at `archive` (atomically: a temp file in
/// the same directory, renamed).
pub fn write_archive(spec: &ImageSpec, archive: &Path) -> Result<BuiltImage> {
    let tag = spec.tag()?.to_string();
    let dir = archive.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // The layer, hashed as it is written.
    let tar_file = tempfile::NamedTempFile::new_in(dir)?;
    let hashing = spec
        .layer
        .write_tar(Hashing::new(BufWriter::new(tar_file.reopen()?)))
        .with_context(|| format!("writing the layer of {}", spec.name))?;
    let (diff_id, tar_len, mut w) = hashing.finish();
    w.flush()?;
    drop(w);
    let (layer_file, layer_digest, layer_len, layer_type) = match spec.compression {
        Compression::None => (tar_file, diff_id.clone(), tar_len, MediaType::ImageLayer),
        Compression::Gzip => {
            let gz_file = tempfile::NamedTempFile::new_in(dir)?;
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .write(Hashing::new(BufWriter::new(gz_file.reopen()?)), flate2::Compression::default());
            io::copy(&mut BufReader::new(tar_file.reopen()?), &mut gz)?;
            let (digest, len, mut w) = gz.finish()?.finish();
            w.flush()?;
            (gz_file, digest, len, MediaType::ImageLayerGzip)
        }
    };

    let mut config = Config::default();
    config
        .set_entrypoint(spec.entrypoint.clone())
        .set_cmd(spec.cmd.clone())
        .set_env(some_if(spec.env.clone(), !spec.env.is_empty()))
        .set_user(spec.user.clone())
        .set_working_dir(spec.working_dir.clone())
        .set_labels(some_if(spec.labels.clone().into_iter().collect::<HashMap<_, _>>(), !spec.labels.is_empty()));
    let image_config: ImageConfiguration = ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::default())
        .config(config)
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(vec![diff_id.clone()]).build()?)
        .history(vec![HistoryBuilder::default().created_by(format!("carve-image {}", spec.name)).build()?])
        .build()?;
    let config_json = canonical_json(&image_config)?;
    let config_digest = sha256(&config_json);

    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(MediaType::ImageConfig, config_json.len() as u64, digest(&config_digest)?))
        .layers(vec![Descriptor::new(layer_type, layer_len, digest(&layer_digest)?)])
        .build()?;
    let manifest_json = canonical_json(&manifest)?;
    let manifest_digest = sha256(&manifest_json);

    let mut manifest_desc =
        Descriptor::new(MediaType::ImageManifest, manifest_json.len() as u64, digest(&manifest_digest)?);
    manifest_desc
        .set_annotations(Some(HashMap::from([
            (ANNOTATION_IMAGE_NAME.to_string(), spec.name.clone()),
            (ANNOTATION_REF_NAME.to_string(), tag),
        ])))
        .set_platform(Some(PlatformBuilder::default().architecture(Arch::default()).os(Os::default()).build()?));
    let index: ImageIndex = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let layout = OciLayoutBuilder::default().image_layout_version("1.0.0").build()?;

    // The archive: small files first, then the blobs by digest.
    let out_file = tempfile::NamedTempFile::new_in(dir)?;
    let mut tar = tar::Builder::new(BufWriter::new(out_file.reopen()?));
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let small = |tar: &mut tar::Builder<_>, path: &str, data: &[u8]| {
        tar.append_data(&mut header(tar::EntryType::Regular, 0o644, data.len() as u64), path, data)
    };
    small(&mut tar, "oci-layout", &canonical_json(&layout)?)?;
    small(&mut tar, "index.json", &canonical_json(&index)?)?;
    for d in ["blobs/", "blobs/sha256/"] {
        tar.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), d, io::empty())?;
    }
    let blob_path = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let mut blobs: Vec<(String, Option<&[u8]>)> = vec![
        (config_digest.clone(), Some(&config_json)),
        (manifest_digest.clone(), Some(&manifest_json)),
        (layer_digest.clone(), None),
    ];
    blobs.sort();
    for (d, data) in blobs {
        match data {
            Some(data) => small(&mut tar, &blob_path(&d), data)?,
            None => tar.append_data(
                &mut header(tar::EntryType::Regular, 0o644, layer_len),
                blob_path(&d),
                BufReader::new(layer_file.reopen()?).take(layer_len),
            )?,
        }
    }
    let mut w = tar.into_inner()?;
    w.flush()?;
    drop(w);
    let size = out_file.as_file().metadata()?.len();
    out_file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    out_file.persist(archive).with_context(|| format!("writing {}", archive.display()))?;
    Ok(BuiltImage { name: spec.name.clone(), archive: archive.to_path_buf(), digest: manifest_digest, diff_id, size })
}

/// What goes into [`carve_image`].
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Where carve's binaries ([`CARVE_BINARIES`]) are: `target/release` for
    /// the real image, any profile's folder for tests.
    pub bin_dir: PathBuf,
    /// The reference portmap plugin (v1.9.1, speaks CNI 1.1.0).
    pub portmap: PathBuf,
    /// carve's tag; [`default_tag`] matches the manifests.
    pub tag: String,
    pub compression: Compression,
}

impl Inputs {
    /// The release binaries in `target/release`, the portmap that
    /// `e2e/scripts/control-plane-bins.sh` builds (waiting for it on a cold
    /// cache), and `tag`.
    pub fn release(tag: &str) -> Result<Self> {
        Ok(Inputs {
            bin_dir: crate::repo_root().join("target/release"),
            portmap: crate::control_plane_bins()?.join("cni-plugins/portmap"),
            tag: tag.into(),
            compression: Compression::None,
        })
    }
}

/// /etc/passwd and /etc/group with `users` as (name, id, home, shell), each
/// its own group.
fn add_users(layer: &mut Layer, users: &[(&str, u32, &str, &str)]) -> Result<()> {
    let passwd: String =
        users.iter().map(|(name, id, home, shell)| format!("{name}:x:{id}:{id}:{name}:{home}:{shell}\n")).collect();
    let group: String = users.iter().map(|(name, id, _, _)| format!("{name}:x:{id}:\n")).collect();
    layer.bytes("/etc/passwd", passwd, 0o644)?;
    layer.bytes("/etc/group", group, 0o644)?;
    layer.bytes("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n", 0o644)?;
    Ok(())
}

/// The directories every image has: the runtime's mount points and /tmp.
fn base_layer() -> Result<Layer> {
    let mut layer = Layer::new();
    for d in ["/dev", "/proc", "/sys", "/etc"] {
        layer.dir(d, 0o755)?;
    }
    layer.dir("/tmp", 0o1777)?;
    Ok(layer)
}

/// carve's image, the same layout as the Dockerfile's: [`CARVE_BINARIES`] in
/// /usr/local/bin, portmap at [`PORTMAP_PATH`], nft at [`NFT_PATH`] (with the
/// shared libraries of all of them), users root and nonroot (65532). No
/// entrypoint and user root, as the Dockerfile: the manifests give each
/// container its command and user.
pub fn carve_image(inputs: &Inputs) -> Result<ImageSpec> {
    let missing: Vec<&str> = CARVE_BINARIES.iter().copied().filter(|b| !inputs.bin_dir.join(b).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "{} missing in {}: build the release binaries first with `make release` \
             (cargo build --release --workspace)",
            missing.join(", "),
            inputs.bin_dir.display()
        );
    }
    ensure!(
        inputs.portmap.is_file(),
        "no portmap plugin at {}: e2e/scripts/control-plane-bins.sh builds it (`make bins`)",
        inputs.portmap.display()
    );
    ensure!(Path::new(NFT_PATH).is_file(), "{NFT_PATH} is missing: install Debian's nftables");
    let mut layer = base_layer()?;
    for bin in CARVE_BINARIES {
        layer.executable(&inputs.bin_dir.join(bin), &format!("{CARVE_BIN_DIR}/{bin}"))?;
    }
    layer.executable(&inputs.portmap, PORTMAP_PATH)?;
    layer.executable(Path::new(NFT_PATH), NFT_PATH)?;
    add_users(
        &mut layer,
        &[("root", 0, "/root", "/usr/sbin/nologin"), ("nonroot", NONROOT_ID, "/nonexistent", "/usr/sbin/nologin")],
    )?;
    let mut spec = ImageSpec::new(&carve_image_name(&inputs.tag), layer);
    spec.compression = inputs.compression;
    spec.labels = BTreeMap::from(
        [
            ("org.opencontainers.image.title", "carve"),
            ("org.opencontainers.image.description", "Kubernetes IPAM and overlay networking operator"),
            ("org.opencontainers.image.source", "https://github.com/carve-dev/carve"),
            ("org.opencontainers.image.version", inputs.tag.as_str()),
            ("org.opencontainers.image.licenses", "Apache-2.0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(spec)
}

/// [`PAUSE_IMAGE`]: `e2e/images/pause.c` built with `gcc -static -O2`, as
/// /pause.
pub fn pause_image() -> Result<ImageSpec> {
    let source = crate::repo_root().join("e2e/images/pause.c");
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("pause");
    let result = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-Wall", "-Wextra", "-o"])
        .arg(&out)
        .arg(&source)
        .output()
        .context("running gcc (install gcc and libc6-dev)")?;
    ensure!(
        result.status.success(),
        "gcc -static {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&result.stderr).trim()
    );
    let mut layer = base_layer()?;
    layer.bytes("/pause", std::fs::read(&out)?, 0o755)?;
    let mut spec = ImageSpec::new(PAUSE_IMAGE, layer);
    spec.entrypoint = Some(vec!["/pause".into()]);
    Ok(spec)
}

/// [`BUSYBOX_IMAGE`]: Debian's static busybox as /bin/busybox with a symlink
/// in /bin for every applet it has; entrypoint /bin/sh.
pub fn busybox_image() -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    add_busybox(&mut layer, &BTreeSet::new())?;
    add_users(&mut layer, &[("root", 0, "/root", "/bin/sh"), ("nobody", 65534, "/nonexistent", "/bin/false")])?;
    let mut spec = ImageSpec::new(BUSYBOX_IMAGE, layer);
    spec.entrypoint = Some(vec!["/bin/sh".into()]);
    Ok(spec)
}

/// Debian's static busybox at /bin/busybox and a /bin symlink for each of its
/// applets but those in `except` (tools the image has for real). Fails when
/// an applet of [`BUSYBOX_APPLETS`] is missing.
fn add_busybox(layer: &mut Layer, except: &BTreeSet<&str>) -> Result<()> {
    let out = Command::new(HOST_BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {HOST_BUSYBOX} --list (install busybox-static)"))?;
    ensure!(out.status.success(), "{HOST_BUSYBOX} --list failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    let applets: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(String::from)
        .collect();
    let missing: Vec<&str> = BUSYBOX_APPLETS.iter().copied().filter(|a| !applets.contains(*a)).collect();
    ensure!(missing.is_empty(), "{HOST_BUSYBOX} lacks the applets {}", missing.join(", "));
    layer.executable(Path::new(HOST_BUSYBOX), "/bin/busybox")?;
    for applet in applets.iter().filter(|a| !except.contains(a.as_str())) {
        layer.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// The three images of the local nodes.
#[derive(Clone, Debug)]
pub struct Images {
    /// `ghcr.io/carve-dev/carve:<tag>` in `carve.tar`.
    pub carve: BuiltImage,
    /// [`PAUSE_IMAGE`] in `pause.tar`: containerd's `sandbox_image`.
    pub pause: BuiltImage,
    /// [`BUSYBOX_IMAGE`] in `busybox.tar`.
    pub busybox: BuiltImage,
}

impl Images {
    pub fn all(&self) -> [&BuiltImage; 3] {
        [&self.carve, &self.pause, &self.busybox]
    }
}

/// Builds carve's image from `inputs`, the pause and the busybox image, as
/// `out_dir/{carve,pause,busybox}.tar`; each imports with
/// `ctr -n k8s.io images import <archive>` under its name.
///
/// `build_all(dir, &Inputs::release(&default_tag())?)` is what
/// `make image` writes to target/images.
pub fn build_all(out_dir: &Path, inputs: &Inputs) -> Result<Images> {
    let carve = write_archive(&carve_image(inputs)?, &out_dir.join("carve.tar"))?;
    let pause = write_archive(&pause_image()?, &out_dir.join("pause.tar"))?;
    let busybox = write_archive(&busybox_image()?, &out_dir.join("busybox.tar"))?;
    Ok(Images { carve, pause, busybox })
}

/// agnhost as the pinned e2e framework names it (test/utils/image/manifest.go
/// of k8s.io/kubernetes v1.35.4).
pub const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.59";
/// The DNS suites' querier image (a shell and dig).
pub const JESSIE_DNSUTILS_IMAGE: &str = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7";
/// The e2e framework's pause and busybox: carve's own pause and busybox under those names.
pub const E2E_PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";
pub const E2E_BUSYBOX_IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1";
/// The endpoints suites run this only as "a pod serving HTTP on :80": here
/// busybox httpd does that (there is no nginx build from Go or Debian files
/// that is worth its weight for it).
pub const E2E_NGINX_IMAGE: &str = "registry.k8s.io/e2e-test-images/nginx:1.14-4";
/// CoreDNS as kubeadm v1.35 deploys it.
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.13.1";

/// Host tools the agnhost image carries (upstream's is Alpine with
/// bind-tools, curl, netcat-openbsd, iproute2 and bash): (host path, image
/// path). busybox fills in the rest of a userland.
const AGNHOST_TOOLS: [(&str, &str); 5] = [
    ("/usr/bin/curl", "/usr/bin/curl"),
    ("/usr/bin/nc.openbsd", "/usr/bin/nc"),
    ("/usr/bin/dig", "/usr/bin/dig"),
    ("/usr/bin/ip", "/sbin/ip"),
    ("/usr/bin/ss", "/usr/bin/ss"),
];

/// A layer of `tools` (host path, image path) over busybox, whose applets of
/// the same names step aside, plus bash as /bin/sh (Debian's busybox ash
/// prefers its own applets to PATH, so `sh -c 'nc -u …'` would never reach
/// the real nc) and libc's getent (the DNS probes resolve with it). Fails
/// naming the Debian package when a tool is missing.
fn tools_layer(tools: &[(&str, &str)]) -> Result<Layer> {
    let always = [("/usr/bin/bash", "/bin/bash"), ("/usr/bin/getent", "/usr/bin/getent")];
    let all: Vec<(&str, &str)> = always.iter().chain(tools).copied().collect();
    let mut names: BTreeSet<&str> = all.iter().filter_map(|(_, to)| to.rsplit('/').next()).collect();
    names.insert("sh");
    let mut layer = base_layer()?;
    add_busybox(&mut layer, &names)?;
    layer.symlink("/bin/sh", "bash")?;
    for (from, to) in all {
        ensure!(
            Path::new(from).is_file(),
            "{from} is missing: install Debian's bash, libc-bin, curl, netcat-openbsd, bind9-dnsutils and iproute2"
        );
        layer.executable(Path::new(from), to)?;
    }
    Ok(layer)
}

/// [`AGNHOST_IMAGE`]: `bins/agnhost` at /agnhost (and /agnhost-2, which the
/// entrypoint tests use), `bins/coredns` at /coredns, porter's TLS pair
/// (`bins/agnhost-porter/localhost.{crt,key}`) at /, the tools the network
/// tests exec ([`AGNHOST_TOOLS`]), /uploads for netexec, and upstream's
/// user 1000 in group 50000. Entrypoint /agnhost, command `pause`.
pub fn agnhost_image(bins: &Path) -> Result<ImageSpec> {
    let mut layer = tools_layer(&AGNHOST_TOOLS)?;
    layer.executable(&bins.join("agnhost"), "/agnhost")?;
    layer.symlink("/agnhost-2", "agnhost")?;
    layer.executable(&bins.join("coredns"), "/coredns")?;
    for file in ["localhost.crt", "localhost.key"] {
        layer.file(bins.join("agnhost-porter").join(file), &format!("/{file}"), 0o644)?;
    }
    layer.dir("/uploads", 0o755)?;
    layer.bytes(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nuser-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
        0o644,
    )?;
    layer.bytes(
        "/etc/group",
        "root:x:0:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n",
        0o644,
    )?;
    let mut spec = ImageSpec::new(AGNHOST_IMAGE, layer);
    spec.entrypoint = Some(vec!["/agnhost".into()]);
    spec.cmd = Some(vec!["pause".into()]);
    Ok(spec)
}

/// [`JESSIE_DNSUTILS_IMAGE`]: busybox with bash and dig, which its probes run.
pub fn jessie_dnsutils_image() -> Result<ImageSpec> {
    let mut layer = tools_layer(&[("/usr/bin/dig", "/usr/bin/dig")])?;
    add_users(&mut layer, &[("root", 0, "/root", "/bin/sh")])?;
    Ok(ImageSpec::new(JESSIE_DNSUTILS_IMAGE, layer))
}

/// [`COREDNS_IMAGE`]: `bins/coredns` (a minimal plugin list, built by
/// `control-plane-bins.sh --conformance`) as /coredns, run as nonroot.
pub fn coredns_image(bins: &Path) -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    layer.executable(&bins.join("coredns"), "/coredns")?;
    add_users(
        &mut layer,
        &[("root", 0, "/root", "/usr/sbin/nologin"), ("nonroot", NONROOT_ID, "/nonexistent", "/usr/sbin/nologin")],
    )?;
    let mut spec = ImageSpec::new(COREDNS_IMAGE, layer);
    spec.entrypoint = Some(vec!["/coredns".into()]);
    spec.user = Some(NONROOT_ID.to_string());
    Ok(spec)
}

/// What the upstream sig-network suites run, under the names the pinned e2e
/// framework asks for: agnhost, jessie-dnsutils, CoreDNS, and carve's pause,
/// busybox and a busybox httpd as the framework's pause, busybox and nginx.
/// `bins` holds agnhost and coredns; archives go to `out_dir`.
pub fn build_conformance(out_dir: &Path, bins: &Path) -> Result<Vec<BuiltImage>> {
    let mut pause = pause_image()?;
    pause.name = E2E_PAUSE_IMAGE.into();
    let mut busybox = busybox_image()?;
    busybox.name = E2E_BUSYBOX_IMAGE.into();
    let mut nginx = busybox_image()?;
    nginx.name = E2E_NGINX_IMAGE.into();
    nginx.layer.dir("/usr/share/nginx/html", 0o755)?;
    nginx.layer.bytes("/usr/share/nginx/html/index.html", "<p>busybox httpd standing in for nginx</p>\n", 0o644)?;
    nginx.entrypoint = Some(vec![
        "/bin/httpd".into(),
        "-f".into(),
        "-p".into(),
        "80".into(),
        "-h".into(),
        "/usr/share/nginx/html".into(),
    ]);
    let specs = [
        ("agnhost", agnhost_image(bins)?),
        ("jessie-dnsutils", jessie_dnsutils_image()?),
        ("coredns", coredns_image(bins)?),
        ("e2e-pause", pause),
        ("e2e-busybox", busybox),
        ("e2e-nginx", nginx),
    ];
    specs.iter().map(|(file, spec)| write_archive(spec, &out_dir.join(format!("{file}.tar")))).collect()
}

/// The OCI archives (`*.tar`) in `dir`, sorted; what `make image` wrote.
pub fn archives_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {} (build the images with `make image`)", dir.display()))?
        .flatten()
        .filter_map(|e| std::fs::canonicalize(e.path()).ok())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    archives.sort();
    if archives.is_empty() {
        bail!("no image archives (*.tar) in {}: run `make image` first", dir.display());
    }
    Ok(archives)
}

/// One entry of an archive's layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    pub kind: tar::EntryType,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    pub size: u64,
    /// A symlink's target.
    pub link: Option<String>,
}

/// An OCI archive read back: [`OciArchive::open`] checks the layout, every
/// blob against its digest and size, and the layer against its diff ID.
#[derive(Debug)]
pub struct OciArchive {
    path: PathBuf,
    /// `sha256:<hex>` → (offset, size) in the archive.
    blobs: BTreeMap<String, (u64, u64)>,
    /// `io.containerd.image.name`.
    pub name: String,
    /// `org.opencontainers.image.ref.name`.
    pub ref_name: String,
    /// The manifest's digest.
    pub digest: String,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
}

impl OciArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let ctx = || format!("reading the OCI archive {}", path.display());
        Self::read(path).with_context(ctx)
    }

    fn read(path: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut blobs = BTreeMap::new();
        let mut tar = tar::Archive::new(BufReader::new(File::open(path)?));
        for entry in tar.entries()? {
            let mut entry = entry?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = entry.path()?.to_string_lossy().trim_start_matches("./").to_string();
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                blobs.insert(format!("sha256:{hex}"), (entry.raw_file_position(), entry.size()));
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                files.insert(name, data);
            }
        }
        let layout: Value = serde_json::from_slice(files.get("oci-layout").context("no oci-layout file")?)?;
        ensure!(layout["imageLayoutVersion"] == "1.0.0", "oci-layout is {layout}");
        let index = ImageIndex::from_reader(files.get("index.json").context("no index.json")?.as_slice())?;
        let [desc] = index.manifests().as_slice() else {
            bail!("index.json lists {} manifests, not one", index.manifests().len())
        };
        let annotation = |key: &str| {
            desc.annotations()
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
                .with_context(|| format!("no {key} annotation"))
        };
        for (d, (_, size)) in &blobs {
            let mut hashing = Hashing::new(io::sink());
            io::copy(&mut blob_reader(path, &blobs, d)?, &mut hashing)?;
            let (actual, len, _) = hashing.finish();
            ensure!(actual == *d && len == *size, "blob {d} has digest {actual} ({len} bytes)");
        }
        // The blob a descriptor points at, after checking its size.
        let described = |desc: &Descriptor| -> Result<Vec<u8>> {
            let d = desc.digest().to_string();
            let (_, size) = *blobs.get(&d).with_context(|| format!("no blob {d} in the archive"))?;
            ensure!(size == desc.size(), "blob {d} is {size} bytes, its descriptor says {}", desc.size());
            let mut data = Vec::new();
            blob_reader(path, &blobs, &d)?.read_to_end(&mut data)?;
            Ok(data)
        };
        ensure!(desc.media_type() == &MediaType::ImageManifest, "manifest media type {}", desc.media_type());
        let manifest = ImageManifest::from_reader(described(desc)?.as_slice())?;
        let config = ImageConfiguration::from_reader(described(manifest.config())?.as_slice())?;
        let [layer] = manifest.layers().as_slice() else {
            bail!("the manifest has {} layers, not one", manifest.layers().len())
        };
        let layer = layer.clone();
        let layer_size = blobs.get(&layer.digest().to_string()).map(|b| b.1);
        ensure!(
            layer_size == Some(layer.size()),
            "layer {} is {layer_size:?} bytes, not {}",
            layer.digest(),
            layer.size()
        );
        let archive = OciArchive {
            path: path.to_path_buf(),
            name: annotation(ANNOTATION_IMAGE_NAME)?,
            ref_name: annotation(ANNOTATION_REF_NAME)?,
            digest: desc.digest().to_string(),
            config,
            manifest,
            blobs,
        };
        // An uncompressed layer's diff ID is its (checked) digest.
        let diff_id = if layer.media_type() == &MediaType::ImageLayer {
            layer.digest().to_string()
        } else {
            let mut hashing = Hashing::new(io::sink());
            io::copy(&mut archive.layer()?, &mut hashing)?;
            hashing.finish().0
        };
        let diff_ids = archive.config.rootfs().diff_ids();
        ensure!(diff_ids == &vec![diff_id.clone()], "the layer has diff ID {diff_id}, the config says {diff_ids:?}");
        Ok(archive)
    }

    /// The (uncompressed) layer tar.
    pub fn layer(&self) -> Result<Box<dyn Read>> {
        let layer = self.manifest.layers().first().context("no layer")?;
        let d = layer.digest().to_string();
        let raw = blob_reader(&self.path, &self.blobs, &d)?;
        Ok(match layer.media_type() {
            MediaType::ImageLayer => Box::new(raw),
            MediaType::ImageLayerGzip => Box::new(flate2::read::GzDecoder::new(raw)),
            other => bail!("layer media type {other} is not handled"),
        })
    }

    /// The layer's entries by absolute path.
    pub fn entries(&self) -> Result<BTreeMap<String, LayerEntry>> {
        let mut entries = BTreeMap::new();
        let mut tar = tar::Archive::new(self.layer()?);
        for entry in tar.entries()? {
            let entry = entry?;
            let path = format!("/{}", entry.path()?.to_string_lossy().trim_start_matches("./").trim_end_matches('/'));
            let header = entry.header();
            entries.insert(
                path,
                LayerEntry {
                    kind: header.entry_type(),
                    mode: header.mode()?,
                    size: header.size()?,
                    link: entry.link_name()?.map(|l| l.to_string_lossy().into_owned()),
                },
            );
        }
        Ok(entries)
    }

    /// The contents of the regular file at the absolute `path` of the layer.
    pub fn file(&self, path: &str) -> Result<Vec<u8>> {
        let key = layer_key(path)?;
        let mut tar = tar::Archive::new(self.layer()?);
        for entry in tar.entries()? {
            let mut entry = entry?;
            if entry.path()?.to_string_lossy().trim_start_matches("./") == key {
                ensure!(entry.header().entry_type() == tar::EntryType::Regular, "{path} is not a regular file");
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                return Ok(data);
            }
        }
        bail!("{path} is not in {}", self.name)
    }

    /// Extracts the layer into `dest` (modes kept), e.g. as a chroot.
    pub fn unpack(&self, dest: &Path) -> Result<()> {
        let mut tar = tar::Archive::new(self.layer()?);
        tar.set_preserve_permissions(true);
        tar.unpack(dest).with_context(|| format!("unpacking {} into {}", self.name, dest.display()))
    }
}

/// Blob `d` of the archive at `path`, from its offset.
fn blob_reader(path: &Path, blobs: &BTreeMap<String, (u64, u64)>, d: &str) -> Result<io::Take<BufReader<File>>> {
    let (offset, size) = *blobs.get(d).with_context(|| format!("no blob {d} in the archive"))?;
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    Ok(BufReader::new(f).take(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_listing_gives_the_loaders_paths() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(listing).unwrap(),
            vec![
                ("/lib/x86_64-linux-gnu/libgcc_s.so.1".into(), "/lib/x86_64-linux-gnu/libgcc_s.so.1".into()),
                ("/lib/x86_64-linux-gnu/libc.so.6".into(), "/lib/x86_64-linux-gnu/libc.so.6".into()),
                ("/lib64/ld-linux-x86-64.so.2".into(), "/lib64/ld-linux-x86-64.so.2".into()),
            ]
        );
        let arrow = "\t/lib64/ld-linux-x86-64.so.2 => /usr/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        assert_eq!(
            parse_ldd(arrow).unwrap(),
            vec![("/lib64/ld-linux-x86-64.so.2".into(), "/usr/lib64/ld-linux-x86-64.so.2".into())]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n\tlibbar.so => not found\n").unwrap_err().to_string();
        assert!(err.contains("libfoo.so.1, libbar.so"), "{err}");
        let err = parse_ldd("\tlibx.so => /opt/x/lib/libx.so (0x1)\n").unwrap_err().to_string();
        assert!(err.contains("ld.so.cache"), "{err}");
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

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

    #[test]
    fn image_tag_comes_after_the_last_colon_of_the_last_part() {
        let spec = |n: &str| ImageSpec::new(n, Layer::new());
        assert_eq!(spec("ghcr.io/carve-dev/carve:v0.1.0").tag().unwrap(), "v0.1.0");
        assert_eq!(spec("localhost:5000/x:1").tag().unwrap(), "1");
        assert!(spec("localhost:5000/x").tag().is_err());
    }
}
