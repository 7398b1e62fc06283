//! carve's cluster controller.
//!
//! Pure parts (`allocator`, `index`, `selector`) know nothing of Kubernetes;
//! `views` translates objects, `reconcile` does the API I/O, `leader` holds
//! the Lease and `metrics` serves /metrics.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod allocator;
pub mod check;
pub mod connectivity;
pub mod index;
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
