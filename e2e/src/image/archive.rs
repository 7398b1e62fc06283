//! Reading an archive back ([`OciArchive`]), every digest checked, for tests
//! and tools.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde_json::Value;

use super::*;

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
