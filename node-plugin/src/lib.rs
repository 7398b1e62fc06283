//! The node side of carve. The agent and the CNI/IPAM plugins land with the node-plugin issue.
#![forbid(unsafe_code)]
