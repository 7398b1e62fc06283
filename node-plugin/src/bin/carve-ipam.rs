//! carve-ipam: the CNI IPAM plugin handing out pod addresses from this node's blocks.
fn main() {
    std::process::exit(carve_node_plugin::cni::run(&carve_node_plugin::ipam::CarveIpam));
}
