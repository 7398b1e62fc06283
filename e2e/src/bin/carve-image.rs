//! Writes the local nodes' images as OCI archives, no container engine needed:
//!
//! ```text
//!   <out-dir>/carve.tar     ghcr.io/carve-dev/carve:<tag>   release binaries, portmap, nft
//!   <out-dir>/pause.tar     carve.local/pause:v1            static pause (e2e/images/pause.c)
//!   <out-dir>/busybox.tar   carve.local/busybox:v1          Debian's busybox-static
//! ```
//!
//! With `--policy` it also writes `<out-dir>/policy/azure-npm.tar`
//! (Azure NPM, built by `control-plane-bins.sh --policy`).
//!
//! `carve-image --out-dir target/images [--tag v0.1.0]`; `make image` builds
//! the release binaries first. Each archive imports with
//! `ctr -n k8s.io images import <archive>`.

use std::path::PathBuf;

use anyhow::Result;
use carve_e2e::image::{BuiltImage, Compression, Inputs, build_all, build_policy, default_tag};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "carve-image")]
struct Args {
    /// Where the archives go.
    #[arg(long, default_value = "target/images")]
    out_dir: PathBuf,
    /// Tag of carve's image (default: v + the workspace version, as the manifests).
    #[arg(long)]
    tag: Option<String>,
    /// Where carve's binaries are (default: the repository's target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The portmap plugin to ship (default: the one e2e/scripts/control-plane-bins.sh builds).
    #[arg(long)]
    portmap: Option<PathBuf>,
    /// gzip the layers (smaller archives, slower to write and import).
    #[arg(long)]
    gzip: bool,
    /// Also the policy engines' images, in `<out-dir>/policy/`.
    #[arg(long)]
    policy: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tag = args.tag.unwrap_or_else(default_tag);
    let mut inputs = match (args.bin_dir, args.portmap) {
        (Some(bin_dir), Some(portmap)) => Inputs { bin_dir, portmap, tag, compression: Compression::None },
        (bin_dir, portmap) => {
            let release = Inputs::release(&tag)?;
            Inputs {
                bin_dir: bin_dir.unwrap_or(release.bin_dir),
                portmap: portmap.unwrap_or(release.portmap),
                ..release
            }
        }
    };
    if args.gzip {
        inputs.compression = Compression::Gzip;
    }
    let images = build_all(&args.out_dir, &inputs)?;
    let mut all: Vec<BuiltImage> = images.all().into_iter().cloned().collect();
    if args.policy {
        all.extend(build_policy(&args.out_dir.join("policy"), &carve_e2e::controlplane::policy_bins()?)?);
    }
    for image in &all {
        println!(
            "{:<32} {}  {:>7.1} MiB  {}",
            image.name,
            image.digest,
            image.size as f64 / (1024.0 * 1024.0),
            image.archive.display()
        );
    }
    Ok(())
}
