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
//!
//! One job per file: `layer` (what a path holds), `libs` (the shared-library
//! closure), `oci` (the writer), `recipes` (the images; a new image is a new
//! function there), `archive` (the reader).

mod archive;
mod layer;
mod libs;
mod oci;
mod recipes;

pub use archive::*;
pub use layer::*;
pub use libs::*;
pub use oci::*;
pub use recipes::*;

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
