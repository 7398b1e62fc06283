//! The node side of carve: carve-agent, carve-cni and carve-ipam.
//!
//! ```text
//!   NodeNetworkConfig ──carve-agent──▶ node state file ──▶ carve-ipam (pod IPs)
//!                          │                               carve-cni (veth, routes)
//!                          └─▶ VXLAN / routes / nftables SNAT, CNI conflist
//! ```
// Unsafe only where netlink.rs forks and sends (each block says why).
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

pub mod agent;
pub(crate) mod atomic;
pub mod cni;
pub mod dataplane;
pub mod ipam;
pub mod mac;
pub mod netlink;
pub mod podnet;
pub mod state;
