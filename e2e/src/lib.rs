//! carve's test harness.
//!
//! - [`controlplane`]: a real etcd + kube-apiserver on loopback, built from Go
//!   modules at pinned versions, for tests and for `make cluster-up`.
//! - [`process`]: child processes that die with the harness, whatever ends it.
//! - [`pki`]: the throwaway certificates the control plane needs.
//! - [`testkit`]: polling, builders and the workspace's binaries for tests.

pub mod controlplane;
pub mod netns;
pub mod pki;
pub mod process;
pub mod testkit;

pub use controlplane::{ControlPlane, Options, control_plane_bins, repo_root};
