//! Figures for carving pod CIDR blocks for many Nodes on the local control
//! plane, against kube-controller-manager and a raw writer; see
//! `carve_e2e::bench::nodes`. `carve-bench-nodes --help` lists the knobs.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    carve_e2e::bench::nodes::main(carve_e2e::bench::nodes::Args::parse()).await
}
