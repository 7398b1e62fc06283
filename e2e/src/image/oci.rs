//! The OCI writer: an [`ImageSpec`] (a name, a layer, the config) to an
//! archive `ctr images import` takes, byte-for-byte reproducible.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, Config, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder,
};
use ring::digest::SHA256;
use serde::Serialize;
use serde_json::Value;

use super::*;

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
pub(super) struct Hashing<W> {
    inner: W,
    hasher: ring::digest::Context,
    len: u64,
}

impl<W: Write> Hashing<W> {
    pub(super) fn new(inner: W) -> Self {
        Hashing { inner, hasher: ring::digest::Context::new(&SHA256), len: 0 }
    }

    /// (`sha256:<hex>`, bytes, the writer).
    pub(super) fn finish(self) -> (String, u64, W) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tag_comes_after_the_last_colon_of_the_last_part() {
        let spec = |n: &str| ImageSpec::new(n, Layer::new());
        assert_eq!(spec("ghcr.io/carve-dev/carve:v0.1.0").tag().unwrap(), "v0.1.0");
        assert_eq!(spec("localhost:5000/x:1").tag().unwrap(), "1");
        assert!(spec("localhost:5000/x").tag().is_err());
    }
}
