//! carve's cluster controller, and carvectl's commands.
//!
//! - Pure, no Kubernetes: `allocator` (a bitmap per pool CIDR), `index` (who
//!   holds which block), `selector` (pool node selectors), `plan` (capacity
//!   planning for `carvectl plan`), `check` (what is inconsistent between
//!   pools, NNCs and Nodes: `carvectl check`), `status` (pool and NNC status
//!   and their Events).
//! - `views`: the slices of Nodes, pools and NNCs the pure parts read.
//! - The edge: `reconcile` (the API I/O of one Node, the sweep, pool status),
//!   `run` (watches, caches and the loop), `leader` (the Lease), `metrics`
//!   (/metrics, /healthz, /readyz).
//! - `connectivity`: `carvectl connectivity`'s probe pods on every node.
//! - Tests only: `release_model` (a model of the release handshake).
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod allocator;
pub mod check;
pub mod connectivity;
pub(crate) mod index;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
#[cfg(test)]
mod release_model;
pub mod run;
mod selector;
mod status;
pub mod views;
