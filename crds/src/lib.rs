//! carve's custom resources, group `carve.dev`, version `v1alpha1`.
//!
//! ```text
//!   PodCIDR (pool) ──carved by the controller──▶ NodeNetworkConfig (one per Node)
//!     spec: mode, cidrs, blockSize               spec:   written by the node
//!     status: usage per family, conditions       status: written by the controller
//! ```
//!
//! The YAML under `crds/` is generated from these types by `crdgen`; a test
//! fails when the committed files differ from what the types produce.

#![forbid(unsafe_code)]

pub mod net;
mod schema;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::crd::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub use net::IpFamily;
pub use schema::{Cidr, PoolCidr};

pub const GROUP: &str = "carve.dev";
pub const VERSION: &str = "v1alpha1";

/// How pods on the node's block reach the rest of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PoolMode {
    /// Private pod CIDR, one block per node, VXLAN between nodes and SNAT to the
    /// node IP for egress.
    Overlay,
    /// Blocks carved from a routable subnet shared with the nodes; routed
    /// natively, no SNAT inside the VNet. Azure's five reserved addresses per
    /// subnet are never handed to pods.
    VNet,
}

impl PoolMode {
    /// Block prefix used when `spec.blockSize` leaves a family unset.
    pub fn default_block_size(self, family: IpFamily) -> u8 {
        match (self, family) {
            (PoolMode::Overlay, IpFamily::IPv4) => 24,
            (PoolMode::Overlay, IpFamily::IPv6) => 80,
            (PoolMode::VNet, IpFamily::IPv4) => 28,
            (PoolMode::VNet, IpFamily::IPv6) => 124,
        }
    }
}

/// A pool of pod addresses that carve cuts into per-node blocks.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "carve.dev",
    version = "v1alpha1",
    kind = "PodCIDR",
    root = "PodCidr",
    plural = "podcidrs",
    singular = "podcidr",
    shortname = "pcidr",
    category = "carve",
    status = "PodCidrStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"CIDRs","type":"string","jsonPath":".spec.cidrs"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","description":"Blocks handed to nodes, all families","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Free","type":"integer","description":"Blocks still free, all families","jsonPath":".status.free"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = schema::rule_block_v4_not_shorter_than_pool())]
#[x_kube(validation = schema::rule_block_v6_not_shorter_than_pool())]
#[x_kube(validation = schema::rule_blocks_per_node_only_in_vnet())]
#[serde(rename_all = "camelCase")]
pub struct PodCidrSpec {
    /// Networking model of the pool: Overlay (private pod CIDR, VXLAN, SNAT for
    /// egress) or VNet (routable addresses from the nodes' network, no
    /// encapsulation). Immutable: create a new pool to change it.
    #[x_kube(validation = schema::rule_immutable("spec.mode", "create a new PodCIDR for another mode"))]
    pub mode: PoolMode,

    /// CIDRs the pool carves blocks from, IPv4 and/or IPv6 (one of each makes
    /// the pool dual-stack). Append a CIDR to grow the pool; CIDRs must not
    /// overlap each other or 169.254.0.0/16, 172.30.0.0/16, 172.31.0.0/16,
    /// 192.0.2.0/24.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = schema::rule_cidrs_disjoint())]
    pub cidrs: Vec<PoolCidr>,

    /// Prefix length of the blocks handed to nodes, per family. Defaults:
    /// Overlay /24 (IPv4) and /80 (IPv6); VNet /28 and /124. Immutable.
    #[serde(default)]
    #[x_kube(validation = schema::rule_immutable("spec.blockSize", "blocks already carved would no longer line up; create a new PodCIDR"))]
    pub block_size: BlockSize,

    /// Nodes this pool serves. Empty or absent selects every node; when several
    /// pools select a node, the most specific selector wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Stop carving new blocks from this pool; blocks already handed out stay.
    /// Use it to drain a pool during a migration.
    #[serde(default)]
    pub disabled: bool,

    /// CIDRs inside the pool that are never carved into blocks (addresses used
    /// by something else on the network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub exclusions: Vec<Cidr>,

    /// How many blocks each node gets, and when. Absent: one block per family
    /// (Overlay's only strategy; kubenet podCIDRs need it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<BlockAllocation>,
}

/// How a node's blocks are sized (the Pod Subnet strategies of Azure CNI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum AllocationStrategy {
    /// One block per family per node, carved when the node joins.
    #[default]
    Single,
    /// Up front, the blocks the node's max pods need (Azure's static block
    /// allocation): `maxPods`, else the Node's `status.capacity.pods`.
    Static,
    /// One block to start; the node asks for more through its NNC spec as its
    /// pods grow and gives back empty blocks (Azure's dynamic IP allocation).
    Dynamic,
}

/// Block allocation settings of a pool. Static and Dynamic need `mode: VNet`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = schema::rule_release_above_request())]
pub struct BlockAllocation {
    /// Single (default), Static or Dynamic.
    #[serde(default)]
    pub strategy: AllocationStrategy,
    /// Most blocks of one family a node may hold (Static and Dynamic). Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_blocks_per_node: Option<i32>,
    /// Static: the pods each node must fit. Default: the Node's
    /// `status.capacity.pods`, else 110 (kubelet's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_pods: Option<i32>,
    /// Dynamic: a node asks for another block when its free addresses fall
    /// below this percentage of a block. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub request_threshold_percent: Option<i32>,
    /// Dynamic: a node gives back an empty block only while its free addresses
    /// exceed this percentage of a block; at least 100 above the request
    /// threshold, so a steady pod count never flaps. Default 150.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 101, max = 1000))]
    pub release_threshold_percent: Option<i32>,
    /// Seconds a given-back block waits before any node can get it, so routes
    /// and conntrack entries elsewhere drain. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub release_quarantine_seconds: Option<i32>,
}

impl BlockAllocation {
    pub const DEFAULT_MAX_BLOCKS_PER_NODE: u32 = 16;
    pub const DEFAULT_MAX_PODS: u32 = 110;
    pub const DEFAULT_REQUEST_THRESHOLD_PERCENT: u32 = 50;
    pub const DEFAULT_RELEASE_THRESHOLD_PERCENT: u32 = 150;
    pub const DEFAULT_RELEASE_QUARANTINE_SECONDS: u32 = 30;

    pub fn max_blocks_per_node(&self) -> u32 {
        positive(self.max_blocks_per_node).unwrap_or(Self::DEFAULT_MAX_BLOCKS_PER_NODE)
    }
    pub fn request_threshold_percent(&self) -> u32 {
        positive(self.request_threshold_percent).unwrap_or(Self::DEFAULT_REQUEST_THRESHOLD_PERCENT)
    }
    pub fn release_threshold_percent(&self) -> u32 {
        // The schema refuses less; a hand-built value still never flaps.
        positive(self.release_threshold_percent)
            .unwrap_or(Self::DEFAULT_RELEASE_THRESHOLD_PERCENT)
            .max(self.request_threshold_percent() + 100)
    }
    pub fn release_quarantine_seconds(&self) -> u32 {
        self.release_quarantine_seconds.map(|s| s.max(0) as u32).unwrap_or(Self::DEFAULT_RELEASE_QUARANTINE_SECONDS)
    }
}

fn positive(v: Option<i32>) -> Option<u32> {
    v.filter(|v| *v > 0).map(|v| v as u32)
}

/// Block prefix lengths per IP family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct BlockSize {
    /// IPv4 block prefix length, e.g. 24 for a /24 per node. At most 30 and at
    /// least the prefix of every IPv4 CIDR in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = schema::rule_max_prefix("spec.blockSize.ipv4", 30))]
    pub ipv4: Option<i32>,
    /// IPv6 block prefix length, e.g. 80. At most 126 and at least the prefix
    /// of every IPv6 CIDR in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = schema::rule_max_prefix("spec.blockSize.ipv6", 126))]
    pub ipv6: Option<i32>,
}

/// What the controller last saw of the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodCidrStatus {
    /// Block usage per IP family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<FamilyUsage>,
    /// Blocks handed to nodes, summed over families.
    #[serde(default)]
    pub allocated: i64,
    /// Blocks still free, summed over families (saturates at 2^63-1).
    #[serde(default)]
    pub free: i64,
    /// Nodes whose blocks do not cover what they need (their NNC's
    /// RequestsMet condition says why).
    #[serde(default)]
    pub unmet_requests: i64,
    /// Ready: the pool serves nodes. Exhausted: no free block is left.
    /// Invalid: the spec is unusable (the message says why); nothing is carved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Block counts of one IP family of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    /// IPv4 or IPv6.
    pub family: IpFamily,
    /// Prefix length of this family's blocks.
    pub block_size: i32,
    /// Blocks the family's CIDRs hold, less exclusions (saturates at 2^63-1).
    pub capacity: i64,
    /// Blocks handed to nodes.
    pub allocated: i64,
    /// Blocks still free.
    pub free: i64,
    /// Blocks given back and waiting out their quarantine (counted in allocated).
    #[serde(default)]
    pub quarantined: i64,
}

/// The network configuration of one node: the contract between the carve
/// controller (status) and the node's agent (spec). Named after its Node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "carve.dev",
    version = "v1alpha1",
    kind = "NodeNetworkConfig",
    plural = "nodenetworkconfigs",
    singular = "nodenetworkconfig",
    shortname = "nnc",
    category = "carve",
    status = "NodeNetworkConfigStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".status.pool"}"#,
    printcolumn = r#"{"name":"Blocks","type":"string","jsonPath":".status.blockCIDRs"}"#,
    printcolumn = r#"{"name":"Node IP","type":"string","jsonPath":".status.nodeIP"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkConfigSpec {
    /// Dynamic pools: pod IPs the node needs, per family, as an absolute
    /// count (never a delta); the controller grants whole blocks until the
    /// node's usable addresses cover it. Unset outside dynamic pools.
    #[serde(default, rename = "requestedIPs", skip_serializing_if = "Option::is_none")]
    pub requested_ips: Option<FamilyCounts>,
    /// Blocks the node gives back, each named by the allocation ID it was
    /// granted with in status.blocks; a release whose ID no longer matches
    /// (the block was granted again since) is refused, never applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["allocationID"]))]
    pub releases: Vec<BlockRelease>,
}

/// A count per IP family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FamilyCounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1048576))]
    pub ipv4: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1048576))]
    pub ipv6: Option<i64>,
}

impl FamilyCounts {
    pub fn get(&self, family: IpFamily) -> i64 {
        match family {
            IpFamily::IPv4 => self.ipv4,
            IpFamily::IPv6 => self.ipv6,
        }
        .unwrap_or(0)
    }
}

/// A block the node gives back: the node has proven it empty and carve-ipam
/// no longer allocates from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockRelease {
    /// The block, as in status.blocks[].cidr.
    pub cidr: String,
    /// status.blocks[].allocationID of the grant being given back.
    #[serde(rename = "allocationID")]
    pub allocation_id: String,
}

/// What the controller carved for the node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkConfigStatus {
    /// Name of the PodCIDR the blocks come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Mode of that pool: Overlay or VNet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PoolMode>,
    /// How the pool sizes this node's blocks: Single, Static or Dynamic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<AllocationStrategy>,
    /// Blocks carved for this node; pods get addresses from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<NodeBlock>,
    /// Addresses inside `blocks` that pods must not get: in VNet, Azure's five
    /// reserved addresses of the subnet and every Node's own address.
    #[serde(default, rename = "reservedIPs", skip_serializing_if = "Vec::is_empty")]
    pub reserved_ips: Vec<String>,
    /// Blocks this node gave back, held here until `until` so routes and
    /// conntrack entries elsewhere drain before another node gets them. Pods
    /// never get addresses from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<QuarantinedBlock>,
    /// Other Nodes' addresses that lie inside this node's blocks because those
    /// Nodes joined after the block was granted: withheld from new pods (they
    /// are in reservedIPs); a pod that already has one is reported by Event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_conflicts: Vec<AddressConflict>,
    /// Dynamic pools: the thresholds the node's agent follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<Scaler>,
    /// The CIDRs of `blocks` joined by commas, for `kubectl get nnc` (printer
    /// columns show only the first match of a list); `blocks` is authoritative.
    #[serde(default, rename = "blockCIDRs", skip_serializing_if = "Option::is_none")]
    pub block_cidrs: Option<String>,
    /// Gateway of the first block (the pods' next hop on this node); each
    /// block carries its own in blocks[].gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The node's InternalIP: peers send this node's pod traffic there.
    #[serde(default, rename = "nodeIP", skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    /// Ready: blocks are carved and usable. Reasons for False include
    /// PoolExhausted, NoMatchingPool, AmbiguousPool and InvalidStatus.
    /// RequestsMet (dynamic and static pools): False while the node's blocks
    /// do not cover what it needs (AboveMaximum, PoolExhausted) or a release
    /// was refused (UnknownRelease). AddressConflict: True while a Node's own
    /// address lies inside this node's blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One block of pod addresses owned by a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBlock {
    /// The block, e.g. 10.244.3.0/24.
    pub cidr: String,
    /// IPv4 or IPv6.
    pub family: IpFamily,
    /// Overlay: the block's first address, kept for the node (never a pod's).
    /// Unset in VNet, where pods route through a link-local next hop and the
    /// block's every address but `reservedIPs` is a pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Opaque, new on every grant: a release names it, so a stale release can
    /// never remove a CIDR granted again later.
    #[serde(default, rename = "allocationID", skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
}

/// A Node address inside another node's block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressConflict {
    pub ip: String,
    /// The Node whose InternalIP it is.
    pub node: String,
}

/// A block given back, waiting out its quarantine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedBlock {
    pub cidr: String,
    pub family: IpFamily,
    #[serde(rename = "allocationID")]
    pub allocation_id: String,
    /// When the block returns to the pool (RFC 3339).
    pub until: String,
}

/// The dynamic scaler's parameters, from the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scaler {
    /// Ask for another block when free addresses fall below this percentage of a block.
    pub request_threshold_percent: i32,
    /// Give back an empty block only while free addresses exceed this percentage of a block.
    pub release_threshold_percent: i32,
    /// Most blocks of one family the node may hold.
    pub max_blocks_per_node: i32,
}

/// The taint carve-agent puts on its Node while no pod address is free
/// there and none can be had (NoSchedule).
pub const NO_POD_ADDRESSES_TAINT: &str = "carve.dev/no-pod-addresses";

/// The reason of the Event carve-agent records on its Node for each leaked
/// pod address it frees.
pub const LEAKED_ADDRESS_FREED: &str = "LeakedAddressFreed";

/// Both CRDs, in the order `kubectl apply -f crds/` should see them.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    vec![PodCidr::crd(), NodeNetworkConfig::crd()]
}

/// File names under `crds/` and their YAML, as `crdgen` writes them.
pub fn crd_files() -> anyhow::Result<Vec<(String, String)>> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            let body = format!(
                "# Generated by `cargo run -p carve-crds --bin crdgen` from crds/src/lib.rs; do not edit.\n{}",
                serde_yaml::to_string(&crd)?
            );
            Ok((name, body))
        })
        .collect()
}
