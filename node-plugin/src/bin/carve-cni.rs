//! carve-cni: the CNI plugin wiring a pod (veth, /32 address, routes) with an
//! address from the IPAM plugin named in the config (normally carve-ipam).
fn main() {
    std::process::exit(carve_node_plugin::cni::run(&carve_node_plugin::cni::carve_cni::CarveCni));
}
