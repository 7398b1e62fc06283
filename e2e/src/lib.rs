//! carve's test harness.
//!
//! - [`controlplane`]: a real etcd + kube-apiserver on loopback, built from Go
//!   modules at pinned versions, for tests and for `make cluster-up`.
//! - [`cluster`]: real nodes (kubelet, kube-proxy, containerd + runc) on an
//!   isolated underlay, around that control plane.
//! - [`process`]: child processes that die with the harness, whatever ends it.
//! - [`scratch`]: the per-run directories, and cleaning up after a harness
//!   that died (its cgroups and namespaces).
//! - [`wait`]: polling an observable state until it holds.
//! - [`pki`]: the throwaway certificates the control plane needs.
//! - [`testkit`]: polling, builders and the workspace's binaries for tests.
//! - [`netns`]: entering a network namespace from Rust (sockets, a TCP forwarder).
//! - [`image`]: the nodes' images as OCI archives, built from files.
//! - [`conformance`]: the upstream sig-network suites on real nodes.
//! - [`policy`]: NetworkPolicy engines beside carve (Azure NPM).
//! - [`cilium`]: Cilium as the nodes' dataplane on carve's podCIDRs.
//! - [`bench`]: what the benchmark binaries share (figures from /proc and
//!   /metrics, pod starts, the Node benchmark, data path tools).

pub mod bench;
pub mod cilium;
pub mod cluster;
pub mod conformance;
pub mod controlplane;
pub mod image;
pub mod netns;
pub mod pki;
pub mod policy;
pub mod process;
pub mod scratch;
pub mod testkit;
pub mod wait;

pub use controlplane::{ControlPlane, Options, control_plane_bins, repo_root};
