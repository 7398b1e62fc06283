//! The node side of carve: carve-agent, carve-cni and carve-ipam.
//!
//! ```text
//!   NodeNetworkConfig ──carve-agent──▶ node state file ──▶ carve-ipam (pod IPs)
//!                          │                               carve-cni (veth, routes)
//!                          └─▶ VXLAN / routes / nftables SNAT, CNI conflist
//! ```
#![forbid(unsafe_code)]

pub mod state;
