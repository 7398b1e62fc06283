//! Which node holds which block: the controller's in-memory view, rebuilt from
//! the API and mutated synchronously under one lock (no awaits inside).
//!
//! ```text
//!   PoolView ──set_pools──▶ pools: name → PoolBlocks (or why it is invalid)
//!   NNC status ──observe──▶ holdings: node → (uid, pool, grants, quarantine)  ◀── the API is the truth
//!   Node podCIDRs ─adopt──▶ holdings                                        (kubenet migration)
//!   NodeView + Request ─assign─▶ Assignment: grants to keep and carve, releases to quarantine
//!   status written ─commit─▶ released grants quarantined, expired quarantine back to the pool
//!   node gone ───release──▶ every block back to its pool
//! ```
//!
//! Every block appears in at most one holding (`owners`, quarantined blocks
//! included), and a pool's bitmap marks exactly the blocks held from it. A
//! block leaves a node only through a release naming its allocation ID (and
//! then a quarantine) or when the node is gone. Nothing here talks to
//! Kubernetes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use carve_crds::net::{self, IpFamily};
use carve_crds::{AllocationStrategy, BlockAllocation, PoolMode};
use ipnet::IpNet;

use crate::allocator::{OccupyError, PoolBlocks, PoolLayout, Usage};
use crate::selector::Selector;

/// A PodCIDR as the index needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolView {
    pub(crate) name: String,
    /// Creation time (RFC 3339): when two pools overlap, the later one is invalid.
    pub(crate) created: String,
    pub(crate) mode: PoolMode,
    pub(crate) cidrs: Vec<String>,
    pub(crate) block_v4: Option<i32>,
    pub(crate) block_v6: Option<i32>,
    pub(crate) exclusions: Vec<String>,
    pub(crate) disabled: bool,
    pub(crate) selector: Result<Selector, String>,
    pub(crate) allocation: BlockAllocation,
}

/// A Node as the index needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NodeView {
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), as written by whoever set them.
    pub(crate) pod_cidrs: Vec<String>,
    /// InternalIP addresses: never a pod's.
    pub(crate) internal_ips: Vec<IpAddr>,
    /// `status.capacity.pods`.
    pub(crate) max_pods: Option<u32>,
}

/// A block granted to a node, with the ID of that grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) block: IpNet,
    pub(crate) id: String,
}

/// A block given back, held until `until` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quarantine {
    pub(crate) block: IpNet,
    pub(crate) id: String,
    pub(crate) until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holding {
    /// UID of the Node incarnation the blocks belong to.
    pub(crate) uid: String,
    pub(crate) pool: String,
    /// Per family in grant order (oldest first), IPv4 first.
    pub(crate) grants: Vec<Grant>,
    pub(crate) quarantined: Vec<Quarantine>,
}

#[cfg(test)]
impl Holding {
    pub(crate) fn blocks(&self) -> Vec<IpNet> {
        self.grants.iter().map(|g| g.block).collect()
    }
}

/// What a node asks for in its NNC spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Request {
    /// `spec.requestedIPs` per family (dynamic pools).
    pub(crate) ips: BTreeMap<IpFamily, u64>,
    /// `spec.releases`: (CIDR, allocation ID).
    pub(crate) releases: Vec<(String, String)>,
}

struct Pool {
    view: PoolView,
    /// None when the pool is invalid.
    blocks: Option<PoolBlocks>,
    invalid: Option<String>,
    /// CIDRs removed from the spec that still hold blocks.
    retired: Vec<IpNet>,
    exhausted: BTreeSet<IpFamily>,
    /// Nodes whose blocks do not cover what they need.
    unmet: BTreeSet<String>,
}

/// Something wrong with a recorded block or a podCIDR; it is reported, never used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BlockProblem {
    #[error("block {0:?} is not a CIDR; it was dropped")]
    Malformed(String),
    #[error("block {0} lies in no pool; it was dropped")]
    OutsidePools(IpNet),
    #[error("block {block} is held by node {other}; it was dropped")]
    HeldByOther { block: IpNet, other: String },
    #[error("block {block} is unusable in pool {pool}: {reason}")]
    Unusable { block: IpNet, pool: String, reason: OccupyError },
    #[error("podCIDR {cidr} is held by node {other}; not adopted")]
    PodCidrConflict { cidr: IpNet, other: String },
    #[error("podCIDR {cidr} does not fit pool {pool}: {reason}; not adopted")]
    PodCidrUnfit { cidr: IpNet, pool: String, reason: OccupyError },
    /// After a pool's spec changed: the node keeps the block (its pods use
    /// it), the pool's bitmap does not count it.
    #[error("node {node} keeps block {block}, which pool {pool} no longer offers: {reason}")]
    HeldBlockRefused { node: String, block: IpNet, pool: String, reason: OccupyError },
}

/// Why a node has fewer blocks than its pool's families.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AssignProblem {
    #[error("no enabled PodCIDR selects this node; create one or adjust spec.nodeSelector")]
    NoMatchingPool,
    #[error("PodCIDRs {0:?} select this node equally specifically; make one nodeSelector more specific")]
    AmbiguousPool(Vec<String>),
    #[error("pool {pool} is invalid: {reason}")]
    PoolInvalid { pool: String, reason: String },
    #[error("pool {0} is disabled; no new blocks are carved from it")]
    PoolDisabled(String),
    #[error("pool {pool} has no free {} block; append a CIDR to spec.cidrs", families.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(" or "))]
    Exhausted { pool: String, families: Vec<IpFamily> },
}

impl AssignProblem {
    /// The condition reason a user sees on the NodeNetworkConfig.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AssignProblem::NoMatchingPool => "NoMatchingPool",
            AssignProblem::AmbiguousPool(_) => "AmbiguousPool",
            AssignProblem::PoolInvalid { .. } => "PoolInvalid",
            AssignProblem::PoolDisabled(_) => "PoolDisabled",
            AssignProblem::Exhausted { .. } => "PoolExhausted",
        }
    }
}

/// Why a node holding blocks still has fewer addresses than it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unmet {
    #[error(
        "{field} asks for {wanted} {family} addresses but pool {pool} allows at most {max} blocks per node \
         ({usable} usable addresses); raise spec.allocation.maxBlocksPerNode of PodCIDR {pool} or run fewer pods here"
    )]
    AboveMaximum { field: String, family: IpFamily, wanted: u64, usable: u64, max: u32, pool: String },
    #[error(
        "{field} needs {wanted} {family} addresses, the node has {usable}, and pool {pool} has no free block; \
         append a CIDR to spec.cidrs of PodCIDR {pool}"
    )]
    Exhausted { field: String, family: IpFamily, wanted: u64, usable: u64, pool: String },
}

impl Unmet {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Unmet::AboveMaximum { .. } => "AboveMaximum",
            Unmet::Exhausted { .. } => "PoolExhausted",
        }
    }
}

/// A release in the NNC spec that is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReleaseProblem {
    #[error("spec.releases names {cidr:?}, which is not a CIDR; remove the entry")]
    Malformed { cidr: String },
    #[error("spec.releases names {cidr}, which this node does not hold; remove the entry")]
    NotHeld { cidr: IpNet },
    #[error(
        "spec.releases names {cidr} with allocationID {given}, but the node holds it under allocationID {current} \
         (granted again since); the stale release is ignored: remove it, or name {current} to give the block back"
    )]
    StaleId { cidr: IpNet, given: String, current: String },
}

/// A Node's address that lies in another node's block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForeignAddress {
    pub(crate) ip: IpAddr,
    pub(crate) node: String,
}

/// The outcome of `assign` for one node: the status to write. Nothing of
/// `released` or `expired` has changed in the index yet: `commit` does that
/// once the status is written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Assignment {
    pub(crate) pool: Option<String>,
    pub(crate) mode: Option<PoolMode>,
    pub(crate) allocation: Option<BlockAllocation>,
    /// Every grant the node keeps, IPv4 first, oldest first.
    pub(crate) grants: Vec<Grant>,
    /// The blocks carved by this call.
    pub(crate) carved: Vec<IpNet>,
    /// Grants the node gave back (spec.releases), to be quarantined.
    pub(crate) released: Vec<Grant>,
    /// The quarantine to record: still running and newly released.
    pub(crate) quarantined: Vec<Quarantine>,
    /// Quarantined blocks whose time is up: back to the pool once written.
    pub(crate) expired: Vec<IpNet>,
    /// Addresses inside the grants that pods must not get.
    pub(crate) reserved: Vec<IpAddr>,
    /// Other Nodes' addresses inside this node's grants.
    pub(crate) foreign: Vec<ForeignAddress>,
    /// Nodes whose grants hold one of this node's addresses (to reconcile).
    pub(crate) holders_of_my_ips: Vec<String>,
    pub(crate) problem: Option<AssignProblem>,
    pub(crate) unmet: Vec<Unmet>,
    pub(crate) release_problems: Vec<ReleaseProblem>,
}

impl Assignment {
    pub(crate) fn blocks(&self) -> Vec<IpNet> {
        self.grants.iter().map(|g| g.block).collect()
    }
}

/// A pool's health and usage for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolReport {
    pub(crate) usage: Vec<(IpFamily, u8, Usage)>,
    /// Quarantined blocks per family.
    pub(crate) quarantined: BTreeMap<IpFamily, u64>,
    pub(crate) invalid: Option<String>,
    pub(crate) exhausted: Vec<IpFamily>,
    pub(crate) retired: Vec<IpNet>,
    pub(crate) unmet: u64,
}

#[derive(Default)]
pub(crate) struct Index {
    pools: BTreeMap<String, Pool>,
    holdings: BTreeMap<String, Holding>,
    owners: HashMap<IpNet, String>,
    /// Every Node's InternalIPs, by address, and by node.
    node_ips: BTreeMap<IpAddr, String>,
    ips_of: HashMap<String, Vec<IpAddr>>,
}

/// A fresh allocation ID: random, so no restart or counter can repeat one.
pub(crate) fn new_allocation_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn layout_of(view: &PoolView) -> Result<PoolLayout, String> {
    let block =
        |family, set: Option<i32>| set.map(|b| b.clamp(0, 128) as u8).unwrap_or(view.mode.default_block_size(family));
    let (v4, v6) = (block(IpFamily::IPv4, view.block_v4), block(IpFamily::IPv6, view.block_v6));
    let errors = net::validate_pool(&view.cidrs, v4, v6);
    if !errors.is_empty() {
        return Err(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
    }
    if view.mode == PoolMode::Overlay && view.allocation.strategy != AllocationStrategy::Single {
        return Err(format!(
            "spec.allocation.strategy {:?} needs mode VNet (an Overlay node has one block per family); use Single",
            view.allocation.strategy
        ));
    }
    let cidrs = view.cidrs.iter().map(|c| net::parse_cidr(c).expect("validated")).collect();
    let exclusions = view
        .exclusions
        .iter()
        .map(|c| net::parse_cidr(c).map_err(|e| format!("spec.exclusions: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PoolLayout { cidrs, block_prefix_v4: v4, block_prefix_v6: v6, exclusions })
}

fn sort_grants(grants: &mut [Grant]) {
    // Stable: within a family, grant order stays.
    grants.sort_by_key(|g| IpFamily::of(&g.block));
}

impl Index {
    /// Rebuilds every pool from `views`, keeping every block already held;
    /// returns the held blocks a pool's new spec refuses (now reserved, or of
    /// another size).
    pub(crate) fn set_pools(&mut self, mut views: Vec<PoolView>) -> Vec<BlockProblem> {
        views.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let previous = std::mem::take(&mut self.pools);
        let mut accepted: Vec<(String, IpNet)> = Vec::new();
        for view in views {
            let mut pool = Pool {
                blocks: None,
                invalid: None,
                retired: Vec::new(),
                exhausted: BTreeSet::new(),
                unmet: previous.get(&view.name).map(|p| p.unmet.clone()).unwrap_or_default(),
                view: view.clone(),
            };
            let layout =
                view.selector.clone().map_err(|e| format!("spec.nodeSelector: {e}")).and_then(|_| layout_of(&view));
            match layout {
                Err(reason) => pool.invalid = Some(reason),
                Ok(layout) => {
                    let clash = layout.cidrs.iter().find_map(|c| {
                        accepted.iter().find(|(_, other)| net::overlaps(c, other)).map(|(name, other)| (c, name, other))
                    });
                    if let Some((mine, name, theirs)) = clash {
                        pool.invalid = Some(format!(
                            "{mine} overlaps {theirs} of the older PodCIDR {name}; nothing is carved from this pool until the overlap is removed"
                        ));
                    } else {
                        accepted.extend(layout.cidrs.iter().map(|c| (view.name.clone(), *c)));
                        pool.blocks = Some(PoolBlocks::new(layout));
                    }
                }
            }
            self.pools.insert(view.name.clone(), pool);
        }
        self.reoccupy(&previous)
    }

    /// Every block a holding keeps in its pool: granted and quarantined.
    fn held_blocks(holding: &Holding) -> impl Iterator<Item = IpNet> + '_ {
        holding.grants.iter().map(|g| g.block).chain(holding.quarantined.iter().map(|q| q.block))
    }

    /// Puts every held block back into its pool's bitmap after a rebuild.
    fn reoccupy(&mut self, previous: &BTreeMap<String, Pool>) -> Vec<BlockProblem> {
        let mut problems = Vec::new();
        let refused = |node: &str, block: IpNet, pool: &str, reason: OccupyError| BlockProblem::HeldBlockRefused {
            node: node.to_string(),
            block,
            pool: pool.to_string(),
            reason,
        };
        let mut orphans: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        for (node, holding) in &self.holdings {
            let Some(pool) = self.pools.get_mut(&holding.pool) else { continue };
            let Some(blocks) = pool.blocks.as_mut() else { continue };
            for block in Self::held_blocks(holding) {
                if !blocks.holds(&block) {
                    orphans.entry(holding.pool.clone()).or_default().push(block);
                } else if let Err(reason) = blocks.occupy(&block) {
                    problems.push(refused(node, block, &holding.pool, reason));
                }
            }
        }
        // Blocks of a CIDR that left the spec: keep that CIDR, retired.
        for (name, blocks) in orphans {
            let old_cidrs: Vec<IpNet> = previous
                .get(&name)
                .and_then(|p| p.blocks.as_ref())
                .map(|b| b.layout().cidrs.clone())
                .into_iter()
                .flatten()
                .chain(previous.get(&name).map(|p| p.retired.clone()).into_iter().flatten())
                .collect();
            let pool = self.pools.get_mut(&name).expect("orphans only come from existing pools");
            let mut by_cidr: BTreeMap<IpNet, Vec<IpNet>> = BTreeMap::new();
            for block in blocks {
                let cidr = old_cidrs.iter().find(|c| c.contains(&block.network())).copied().unwrap_or(block);
                by_cidr.entry(cidr).or_default().push(block);
            }
            let pool_blocks = pool.blocks.as_mut().expect("orphans only come from valid pools");
            for (cidr, held) in by_cidr {
                for (block, reason) in pool_blocks.retain_retired(cidr, &held) {
                    let node = self.owners.get(&block).map(String::as_str).unwrap_or_default();
                    problems.push(refused(node, block, &name, reason));
                }
                pool.retired.push(cidr);
            }
        }
        problems
    }

    pub(crate) fn holding(&self, node: &str) -> Option<&Holding> {
        self.holdings.get(node)
    }

    pub(crate) fn holdings(&self) -> impl Iterator<Item = (&String, &Holding)> {
        self.holdings.iter()
    }

    /// Records `node`'s InternalIPs (replacing what was known).
    pub(crate) fn set_node_ips(&mut self, node: &str, ips: &[IpAddr]) {
        if self.ips_of.get(node).map(Vec::as_slice) == Some(ips) {
            return;
        }
        for ip in self.ips_of.remove(node).unwrap_or_default() {
            if self.node_ips.get(&ip).is_some_and(|n| n == node) {
                self.node_ips.remove(&ip);
            }
        }
        for ip in ips {
            self.node_ips.insert(*ip, node.to_string());
        }
        if !ips.is_empty() {
            self.ips_of.insert(node.to_string(), ips.to_vec());
        }
    }

    /// Records blocks the API says node `node` (incarnation `uid`) holds,
    /// each `(cidr, allocation ID, quarantined until)`. A block the node
    /// already holds keeps its state here (the index is ahead of a lagging
    /// cache); one that is malformed, outside every pool or held by another
    /// node is reported and not recorded. A block without an ID gets one.
    pub(crate) fn observe(
        &mut self,
        node: &str,
        uid: &str,
        pool_hint: Option<&str>,
        recorded: &[(String, Option<String>, Option<i64>)],
    ) -> Vec<BlockProblem> {
        let mut problems = Vec::new();
        for (raw, id, until) in recorded {
            let Ok(block) = net::parse_cidr(raw) else {
                problems.push(BlockProblem::Malformed(raw.clone()));
                continue;
            };
            if let Some(problem) = self.take(node, uid, pool_hint, block, id.clone(), *until) {
                problems.push(problem);
            }
        }
        problems
    }

    /// Occupies `block` for `node` in the pool that holds it.
    fn take(
        &mut self,
        node: &str,
        uid: &str,
        pool_hint: Option<&str>,
        block: IpNet,
        id: Option<String>,
        quarantined_until: Option<i64>,
    ) -> Option<BlockProblem> {
        match self.owners.get(&block) {
            Some(owner) if owner == node => return None,
            Some(owner) => return Some(BlockProblem::HeldByOther { block, other: owner.clone() }),
            None => {}
        }
        let in_pool = |p: &Pool| p.blocks.as_ref().is_some_and(|b| b.holds(&block));
        let name = pool_hint
            .filter(|n| self.pools.get(*n).is_some_and(in_pool))
            .map(str::to_string)
            .or_else(|| self.pools.iter().find(|(_, p)| in_pool(p)).map(|(n, _)| n.clone()));
        let Some(name) = name else {
            return Some(BlockProblem::OutsidePools(block));
        };
        let pool = self.pools.get_mut(&name).expect("found above");
        if let Err(reason) = pool.blocks.as_mut().expect("valid").occupy(&block) {
            return Some(BlockProblem::Unusable { block, pool: name, reason });
        }
        self.owners.insert(block, node.to_string());
        let holding = self.holdings.entry(node.to_string()).or_insert_with(|| Holding {
            uid: uid.to_string(),
            pool: name.clone(),
            grants: Vec::new(),
            quarantined: Vec::new(),
        });
        let id = id.unwrap_or_else(new_allocation_id);
        match quarantined_until {
            Some(until) => holding.quarantined.push(Quarantine { block, id, until }),
            None => {
                holding.grants.push(Grant { block, id });
                sort_grants(&mut holding.grants);
            }
        }
        None
    }

    /// Takes over a node's existing podCIDRs that lie in a pool (migration from
    /// kube-controller-manager or kubenet without re-IP).
    pub(crate) fn adopt(&mut self, node: &NodeView) -> Vec<BlockProblem> {
        let mut problems = Vec::new();
        for raw in &node.pod_cidrs {
            let Ok(cidr) = raw.parse::<IpNet>() else { continue };
            let cidr = cidr.trunc();
            if self
                .holdings
                .get(&node.name)
                .is_some_and(|h| h.grants.iter().any(|g| IpFamily::of(&g.block) == IpFamily::of(&cidr)))
            {
                continue;
            }
            let covering = self.pools.iter().find(|(_, p)| p.blocks.as_ref().is_some_and(|b| b.covers(&cidr)));
            let Some((name, _)) = covering else { continue }; // not carve's range: leave it alone
            let name = name.clone();
            match self.take(&node.name, &node.uid, Some(&name), cidr, None, None) {
                None => {}
                Some(BlockProblem::HeldByOther { other, .. }) => {
                    problems.push(BlockProblem::PodCidrConflict { cidr, other })
                }
                Some(BlockProblem::Unusable { reason, .. }) => {
                    problems.push(BlockProblem::PodCidrUnfit { cidr, pool: name, reason })
                }
                Some(other) => problems.push(other),
            }
        }
        problems
    }

    /// The most specific enabled pool selecting `node`. An invalid pool still
    /// competes, so a node aimed at it is told why instead of silently landing
    /// in a broader pool; disabled pools step aside (migration).
    fn select_pool(&self, node: &NodeView) -> Result<String, AssignProblem> {
        let matching: Vec<(&String, &Pool, usize)> = self
            .pools
            .iter()
            .filter_map(|(n, p)| match &p.view.selector {
                Ok(s) if s.matches(&node.labels) => Some((n, p, s.specificity())),
                _ => None,
            })
            .collect();
        let enabled: Vec<_> = matching.iter().filter(|(_, p, _)| !p.view.disabled).collect();
        let Some(best) = enabled.iter().map(|(_, _, s)| *s).max() else {
            return Err(match matching.first() {
                Some((n, _, _)) => AssignProblem::PoolDisabled(n.to_string()),
                None => AssignProblem::NoMatchingPool,
            });
        };
        let top: Vec<&&(&String, &Pool, usize)> = enabled.iter().filter(|(_, _, s)| *s == best).collect();
        if top.len() > 1 {
            return Err(AssignProblem::AmbiguousPool(top.iter().map(|(n, _, _)| n.to_string()).collect()));
        }
        let (name, pool, _) = top[0];
        match &pool.invalid {
            Some(reason) => Err(AssignProblem::PoolInvalid { pool: name.to_string(), reason: reason.clone() }),
            None => Ok(name.to_string()),
        }
    }

    /// Addresses of `block` no pod may get: in VNet, Azure's five reserved
    /// addresses of the pool CIDR holding it and every Node's InternalIP.
    fn reserved_in(&self, pool: &Pool, block: &IpNet) -> Vec<IpAddr> {
        if pool.view.mode != PoolMode::VNet {
            return Vec::new();
        }
        let mut out: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(blocks) = &pool.blocks {
            let cidrs = blocks.layout().cidrs.iter().chain(pool.retired.iter());
            for cidr in cidrs.filter(|c| c.contains(&block.network())) {
                out.extend(net::azure_reserved(cidr).into_iter().filter(|ip| block.contains(ip)));
            }
        }
        out.extend(self.node_ips.range(block.network()..=block.broadcast()).map(|(ip, _)| *ip));
        out.into_iter().collect()
    }

    /// Addresses pods can get from `block`.
    fn usable(&self, pool: &Pool, block: &IpNet) -> u64 {
        let size = net::size(block).min(u64::MAX as u128) as u64;
        size.saturating_sub(self.reserved_in(pool, block).len() as u64)
    }

    /// The node's blocks for its pool, its releases honoured and its request
    /// (or static size) covered: adopts podCIDRs first, never takes a block
    /// the node did not give back. Carved blocks are the node's at once;
    /// releases and expired quarantine wait for `commit`.
    pub(crate) fn assign(&mut self, node: &NodeView, request: &Request, now: i64) -> (Assignment, Vec<BlockProblem>) {
        self.set_node_ips(&node.name, &node.internal_ips);
        let problems = self.adopt(node);
        let mut a =
            Assignment { holders_of_my_ips: self.holders_of(&node.name, &node.internal_ips), ..Default::default() };
        let name = match self.holdings.get(&node.name) {
            Some(h) => Ok(h.pool.clone()),
            None => self.select_pool(node),
        };
        let name = match name {
            Ok(n) => n,
            Err(problem) => {
                a.problem = Some(problem);
                return (a, problems);
            }
        };
        a.pool = Some(name.clone());
        self.honour_releases(&node.name, request, now, &mut a);
        if let Some(pool) = self.pools.get(&name) {
            a.mode = Some(pool.view.mode);
            a.allocation = Some(pool.view.allocation.clone());
            match (&pool.invalid, pool.view.disabled, pool.blocks.is_some()) {
                (Some(reason), _, _) => {
                    a.problem = Some(AssignProblem::PoolInvalid { pool: name.clone(), reason: reason.clone() })
                }
                (None, true, _) if a.grants.is_empty() => a.problem = Some(AssignProblem::PoolDisabled(name.clone())),
                (None, false, true) => self.grow(node, request, &name, &mut a),
                _ => {}
            }
        }
        if let Some(pool) = self.pools.get_mut(&name) {
            if a.unmet.is_empty() {
                pool.unmet.remove(&node.name);
            } else {
                pool.unmet.insert(node.name.clone());
            }
        }
        if let Some(pool) = self.pools.get(&name) {
            let mut reserved: Vec<IpAddr> = a.grants.iter().flat_map(|g| self.reserved_in(pool, &g.block)).collect();
            reserved.sort();
            reserved.dedup();
            a.foreign = reserved
                .iter()
                .filter_map(|ip| self.node_ips.get(ip).filter(|n| **n != node.name).map(|n| (ip, n)))
                .map(|(ip, n)| ForeignAddress { ip: *ip, node: n.clone() })
                .collect();
            a.reserved = reserved;
        }
        (a, problems)
    }

    /// Splits the node's holding into what it keeps, what it gives back (a
    /// release naming the grant's exact ID) and quarantine that is over.
    fn honour_releases(&self, node: &str, request: &Request, now: i64, a: &mut Assignment) {
        let Some(holding) = self.holdings.get(node) else {
            for (cidr, _) in &request.releases {
                a.release_problems.push(match net::parse_cidr(cidr) {
                    Ok(cidr) => ReleaseProblem::NotHeld { cidr },
                    Err(_) => ReleaseProblem::Malformed { cidr: cidr.clone() },
                });
            }
            return;
        };
        let quarantine = self
            .pools
            .get(&holding.pool)
            .map(|p| p.view.allocation.release_quarantine_seconds())
            .unwrap_or(BlockAllocation::DEFAULT_RELEASE_QUARANTINE_SECONDS);
        let mut keep = holding.grants.clone();
        for (raw, id) in &request.releases {
            let Ok(cidr) = net::parse_cidr(raw) else {
                a.release_problems.push(ReleaseProblem::Malformed { cidr: raw.clone() });
                continue;
            };
            match keep.iter().position(|g| g.block == cidr) {
                Some(i) if keep[i].id == *id => {
                    let grant = keep.remove(i);
                    a.quarantined.push(Quarantine {
                        block: grant.block,
                        id: grant.id.clone(),
                        until: now + i64::from(quarantine),
                    });
                    a.released.push(grant);
                }
                Some(i) => a.release_problems.push(ReleaseProblem::StaleId {
                    cidr,
                    given: id.clone(),
                    current: keep[i].id.clone(),
                }),
                // Already given back (quarantined) or never held.
                None if holding.quarantined.iter().any(|q| q.block == cidr && q.id == *id) => {}
                None => a.release_problems.push(ReleaseProblem::NotHeld { cidr }),
            }
        }
        for q in &holding.quarantined {
            if q.until <= now {
                a.expired.push(q.block);
            } else {
                a.quarantined.push(q.clone());
            }
        }
        a.grants = keep;
    }

    /// Carves blocks until every family of the pool has what the node needs.
    fn grow(&mut self, node: &NodeView, request: &Request, name: &str, a: &mut Assignment) {
        let pool = self.pools.get(name).expect("caller checked");
        let allocation = pool.view.allocation.clone();
        let families = pool.blocks.as_ref().map(|b| b.families()).unwrap_or_default();
        let max_blocks = match allocation.strategy {
            AllocationStrategy::Single => 1,
            _ => allocation.max_blocks_per_node(),
        };
        let mut exhausted = Vec::new();
        for family in families {
            let (field, wanted) = match allocation.strategy {
                AllocationStrategy::Single => (String::new(), 0),
                AllocationStrategy::Static => (
                    match allocation.max_pods {
                        Some(_) => format!("spec.allocation.maxPods of PodCIDR {name}"),
                        None => format!("status.capacity.pods of Node {}", node.name),
                    },
                    allocation
                        .max_pods
                        .map(|p| p.max(0) as u32)
                        .or(node.max_pods)
                        .unwrap_or(BlockAllocation::DEFAULT_MAX_PODS) as u64,
                ),
                AllocationStrategy::Dynamic => (
                    format!("spec.requestedIPs.{}", family.to_string().to_lowercase()),
                    request.ips.get(&family).copied().unwrap_or(0),
                ),
            };
            loop {
                let pool = self.pools.get(name).expect("caller checked");
                let mine: Vec<IpNet> = a.grants.iter().map(|g| g.block).filter(|b| IpFamily::of(b) == family).collect();
                let usable: u64 = mine.iter().map(|b| self.usable(pool, b)).sum();
                // Static follows Azure's StaticBlock count, ceil(maxPods / block size);
                // dynamic counts what pods can really get.
                let covered = match allocation.strategy {
                    AllocationStrategy::Static => mine.iter().map(|b| net::size(b).min(u64::MAX as u128) as u64).sum(),
                    _ => usable,
                };
                if !mine.is_empty() && covered >= wanted {
                    break;
                }
                if mine.len() as u32 >= max_blocks {
                    if !mine.is_empty() && allocation.strategy != AllocationStrategy::Single {
                        a.unmet.push(Unmet::AboveMaximum {
                            field: field.clone(),
                            family,
                            wanted,
                            usable,
                            max: max_blocks,
                            pool: name.to_string(),
                        });
                    }
                    break;
                }
                let pool = self.pools.get_mut(name).expect("caller checked");
                let Some(block) = pool.blocks.as_mut().and_then(|b| b.allocate(family)) else {
                    pool.exhausted.insert(family);
                    if mine.is_empty() {
                        exhausted.push(family);
                    } else {
                        a.unmet.push(Unmet::Exhausted {
                            field: field.clone(),
                            family,
                            wanted,
                            usable,
                            pool: name.to_string(),
                        });
                    }
                    break;
                };
                self.owners.insert(block, node.name.clone());
                let grant = Grant { block, id: new_allocation_id() };
                let holding = self.holdings.entry(node.name.clone()).or_insert_with(|| Holding {
                    uid: node.uid.clone(),
                    pool: name.to_string(),
                    grants: Vec::new(),
                    quarantined: Vec::new(),
                });
                holding.grants.push(grant.clone());
                sort_grants(&mut holding.grants);
                a.grants.push(grant);
                sort_grants(&mut a.grants);
                a.carved.push(block);
            }
        }
        if !exhausted.is_empty() {
            a.problem = Some(AssignProblem::Exhausted { pool: name.to_string(), families: exhausted });
        }
    }

    /// Nodes other than `me` whose grants hold one of `ips`.
    fn holders_of(&self, me: &str, ips: &[IpAddr]) -> Vec<String> {
        let mut out = BTreeSet::new();
        for ip in ips {
            for pool in self.pools.values().filter(|p| p.view.mode == PoolMode::VNet) {
                let Some(blocks) = &pool.blocks else { continue };
                let prefix = blocks.layout().block_prefix(IpFamily::of_addr(ip));
                let Ok(block) = IpNet::new(*ip, prefix).map(|b| b.trunc()) else { continue };
                if let Some(owner) = self.owners.get(&block).filter(|o| *o != me) {
                    out.insert(owner.clone());
                }
            }
        }
        out.into_iter().collect()
    }

    /// After the assignment's status was written: released grants enter
    /// quarantine, expired quarantine returns to the pool.
    pub(crate) fn commit(&mut self, node: &str, a: &Assignment) {
        let Some(holding) = self.holdings.get_mut(node) else { return };
        for grant in &a.released {
            if let Some(i) = holding.grants.iter().position(|g| g == grant) {
                holding.grants.remove(i);
            }
        }
        for q in &a.quarantined {
            if !holding.quarantined.iter().any(|h| h.block == q.block) {
                holding.quarantined.push(q.clone());
            }
        }
        let mut freed = Vec::new();
        holding.quarantined.retain(|q| {
            let expired = a.expired.contains(&q.block);
            if expired {
                freed.push(q.block);
            }
            !expired
        });
        for block in freed {
            self.free_block(&block);
        }
    }

    fn free_block(&mut self, block: &IpNet) {
        self.owners.remove(block);
        for pool in self.pools.values_mut() {
            if let Some(blocks) = pool.blocks.as_mut()
                && blocks.release(block)
            {
                pool.exhausted.remove(&IpFamily::of(block));
                break;
            }
        }
    }

    /// Returns every block of `node` to its pool; the blocks released.
    pub(crate) fn release(&mut self, node: &str) -> Vec<IpNet> {
        self.set_node_ips(node, &[]);
        for pool in self.pools.values_mut() {
            pool.unmet.remove(node);
        }
        let Some(holding) = self.holdings.remove(node) else { return Vec::new() };
        let blocks: Vec<IpNet> = Self::held_blocks(&holding).collect();
        for block in &blocks {
            self.free_block(block);
        }
        blocks
    }

    pub(crate) fn report(&self, pool: &str) -> Option<PoolReport> {
        let p = self.pools.get(pool)?;
        let usage = p
            .blocks
            .as_ref()
            .map(|b| {
                let mut families: Vec<IpFamily> =
                    b.layout().cidrs.iter().map(IpFamily::of).chain(p.retired.iter().map(IpFamily::of)).collect();
                families.sort();
                families.dedup();
                families.into_iter().map(|f| (f, b.layout().block_prefix(f), b.usage(f))).collect()
            })
            .unwrap_or_default();
        let mut quarantined = BTreeMap::new();
        for h in self.holdings.values().filter(|h| h.pool == pool) {
            for q in &h.quarantined {
                *quarantined.entry(IpFamily::of(&q.block)).or_insert(0) += 1;
            }
        }
        // A pool is exhausted for a family only while it has no free block of it.
        let exhausted =
            p.exhausted.iter().copied().filter(|f| p.blocks.as_ref().is_some_and(|b| b.usage(*f).free == 0)).collect();
        Some(PoolReport {
            usage,
            quarantined,
            invalid: p.invalid.clone(),
            exhausted,
            retired: p.retired.clone(),
            unmet: p.unmet.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Index {
        fn new() -> Self {
            Self::default()
        }

        fn owner_of(&self, block: &IpNet) -> Option<&str> {
            self.owners.get(block).map(String::as_str)
        }
    }

    fn pool(name: &str, created: &str, cidrs: &[&str]) -> PoolView {
        PoolView {
            name: name.into(),
            created: created.into(),
            mode: PoolMode::Overlay,
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            block_v4: None,
            block_v6: None,
            exclusions: vec![],
            disabled: false,
            selector: Ok(Selector::default()),
            allocation: BlockAllocation::default(),
        }
    }

    fn node(name: &str) -> NodeView {
        NodeView { name: name.into(), uid: format!("uid-{name}"), ..Default::default() }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn rec(cidrs: &[&str]) -> Vec<(String, Option<String>, Option<i64>)> {
        cidrs.iter().map(|c| (c.to_string(), None, None)).collect()
    }

    #[test]
    fn nodes_get_distinct_blocks_and_keep_them() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        let (a, _) = index.assign(&node("a"), &Request::default(), 0);
        let (b, _) = index.assign(&node("b"), &Request::default(), 0);
        assert_eq!(a.blocks(), [net("10.244.0.0/24")]);
        assert_eq!(b.blocks(), [net("10.244.1.0/24")]);
        let (again, _) = index.assign(&node("a"), &Request::default(), 0);
        assert_eq!(again.blocks(), a.blocks());
        assert!(again.carved.is_empty());
    }

    #[test]
    fn recorded_blocks_are_occupied_before_new_allocations() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        assert!(index.observe("old", "u1", Some("overlay"), &rec(&["10.244.0.0/24"])).is_empty());
        let (fresh, _) = index.assign(&node("new"), &Request::default(), 0);
        assert_eq!(fresh.blocks(), [net("10.244.1.0/24")]);
    }

    #[test]
    fn bad_recorded_blocks_are_reported_not_used() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        index.observe("a", "ua", None, &rec(&["10.244.0.0/24"]));
        let problems = index.observe("b", "ub", None, &rec(&["garbage", "10.9.0.0/24", "10.244.0.0/24"]));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(matches!(problems[2], BlockProblem::HeldByOther { .. }));
        assert!(index.holding("b").is_none());
    }

    #[test]
    fn overlapping_later_pool_is_invalid() {
        let mut index = Index::new();
        index.set_pools(vec![pool("late", "2", &["10.244.128.0/17"]), pool("early", "1", &["10.244.0.0/16"])]);
        assert!(index.report("early").unwrap().invalid.is_none());
        let reason = index.report("late").unwrap().invalid.unwrap();
        assert!(reason.contains("early"), "{reason}");
    }

    #[test]
    fn most_specific_selector_wins_and_ties_are_reported() {
        let mut index = Index::new();
        let mut gpu = pool("gpu", "2", &["10.245.0.0/16"]);
        gpu.selector = Selector::from_parts(&[("pool".into(), "gpu".into())].into(), &[]).map_err(|e| e.to_string());
        let mut gpu2 = pool("gpu2", "3", &["10.246.0.0/16"]);
        gpu2.selector = gpu.selector.clone();
        index.set_pools(vec![pool("all", "1", &["10.244.0.0/16"]), gpu.clone()]);
        let mut n = node("g");
        n.labels.insert("pool".into(), "gpu".into());
        assert_eq!(index.assign(&n, &Request::default(), 0).0.pool.as_deref(), Some("gpu"));
        assert_eq!(index.assign(&node("plain"), &Request::default(), 0).0.pool.as_deref(), Some("all"));
        index.set_pools(vec![pool("all", "1", &["10.244.0.0/16"]), gpu, gpu2]);
        let (tie, _) = index.assign(&NodeView { name: "g2".into(), ..n }, &Request::default(), 0);
        assert!(matches!(tie.problem, Some(AssignProblem::AmbiguousPool(_))), "{tie:?}");
    }

    #[test]
    fn exhaustion_then_growth_serves_the_waiting_node() {
        let mut index = Index::new();
        index.set_pools(vec![pool("small", "1", &["10.244.0.0/24"])]);
        index.assign(&node("a"), &Request::default(), 0);
        let (b, _) = index.assign(&node("b"), &Request::default(), 0);
        assert_eq!(b.problem.as_ref().map(|p| p.reason()), Some("PoolExhausted"));
        assert_eq!(index.report("small").unwrap().exhausted, [IpFamily::IPv4]);
        index.set_pools(vec![pool("small", "1", &["10.244.0.0/24", "10.244.1.0/24"])]);
        let (b, _) = index.assign(&node("b"), &Request::default(), 0);
        assert_eq!(b.blocks(), [net("10.244.1.0/24")]);
        assert!(b.problem.is_none());
    }

    #[test]
    fn removed_cidr_in_use_is_retired_not_reused() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24", "10.250.0.0/24"])]);
        index.observe("a", "ua", None, &rec(&["10.250.0.0/24"]));
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        assert_eq!(index.report("p").unwrap().retired, [net("10.250.0.0/24")]);
        assert_eq!(index.holding("a").unwrap().blocks(), [net("10.250.0.0/24")]);
        assert_eq!(index.assign(&node("b"), &Request::default(), 0).0.blocks(), [net("10.244.0.0/24")]);
        assert!(index.assign(&node("c"), &Request::default(), 0).0.problem.is_some());
        index.release("a");
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        assert!(index.report("p").unwrap().retired.is_empty());
    }

    #[test]
    fn release_returns_blocks() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        index.assign(&node("a"), &Request::default(), 0);
        assert_eq!(index.release("a"), [net("10.244.0.0/24")]);
        assert!(index.owner_of(&net("10.244.0.0/24")).is_none());
        assert_eq!(index.assign(&node("b"), &Request::default(), 0).0.blocks(), [net("10.244.0.0/24")]);
    }

    #[test]
    fn pod_cidr_inside_a_pool_is_adopted_and_conflicts_are_reported() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/16"])]);
        let mut kcm = node("kcm");
        kcm.pod_cidrs = vec!["10.244.7.0/24".into()];
        let (a, problems) = index.assign(&kcm, &Request::default(), 0);
        assert!(problems.is_empty());
        assert_eq!(a.blocks(), [net("10.244.7.0/24")]);
        assert!(a.carved.is_empty());
        let mut clash = node("clash");
        clash.pod_cidrs = vec!["10.244.7.0/24".into()];
        let (c, problems) = index.assign(&clash, &Request::default(), 0);
        assert!(matches!(problems[0], BlockProblem::PodCidrConflict { .. }), "{problems:?}");
        assert_eq!(c.blocks(), [net("10.244.0.0/24")]);
    }

    #[test]
    fn dual_stack_gets_one_block_per_family() {
        let mut index = Index::new();
        index.set_pools(vec![pool("ds", "1", &["10.244.0.0/16", "fd12:3456:789a::/64"])]);
        let (a, _) = index.assign(&node("a"), &Request::default(), 0);
        assert_eq!(a.blocks(), [net("10.244.0.0/24"), net("fd12:3456:789a::/80")]);
    }

    #[test]
    fn disabled_pool_keeps_blocks_but_carves_none() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/16"])]);
        index.assign(&node("a"), &Request::default(), 0);
        let mut disabled = pool("p", "1", &["10.244.0.0/16"]);
        disabled.disabled = true;
        index.set_pools(vec![disabled]);
        assert_eq!(index.assign(&node("a"), &Request::default(), 0).0.blocks(), [net("10.244.0.0/24")]);
        assert_eq!(
            index.assign(&node("b"), &Request::default(), 0).0.problem.map(|p| p.reason()),
            Some("PoolDisabled")
        );
    }

    fn vnet(name: &str, cidrs: &[&str], strategy: AllocationStrategy) -> PoolView {
        PoolView {
            mode: PoolMode::VNet,
            allocation: BlockAllocation { strategy, ..Default::default() },
            ..pool(name, "1", cidrs)
        }
    }

    fn at_ip(name: &str, ip: &str) -> NodeView {
        NodeView { internal_ips: vec![ip.parse().unwrap()], ..node(name) }
    }

    fn wants(v4: u64) -> Request {
        Request { ips: [(IpFamily::IPv4, v4)].into(), releases: vec![] }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn vnet_withholds_azure_and_node_addresses_instead_of_skipping_blocks() {
        let mut index = Index::new();
        index.set_pools(vec![vnet("subnet", &["10.224.0.0/24"], AllocationStrategy::Single)]);
        for (n, ip) in [("n1", "10.224.0.4"), ("n2", "10.224.0.5"), ("n3", "10.224.0.6")] {
            index.set_node_ips(n, &ips(&[ip]));
        }
        let (a, _) = index.assign(&at_ip("n1", "10.224.0.4"), &Request::default(), 0);
        assert_eq!(a.blocks(), [net("10.224.0.0/28")], "the first block is handed out");
        assert_eq!(
            a.reserved,
            ips(&["10.224.0.0", "10.224.0.1", "10.224.0.2", "10.224.0.3", "10.224.0.4", "10.224.0.5", "10.224.0.6"])
        );
        // Nodes known when the block was granted are only withheld; they are foreign to n1.
        assert_eq!(a.foreign.iter().map(|f| f.node.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
        // The whole /24 across its 16 blocks: 256 - 5 reserved - 3 node IPs = 248 pod addresses.
        let mut total = 0;
        for i in 0..16 {
            let n = if i == 0 { at_ip("n1", "10.224.0.4") } else { node(&format!("m{i}")) };
            let (a, _) = index.assign(&n, &Request::default(), 0);
            total += a.blocks().iter().map(|b| net::size(b) as usize).sum::<usize>() - a.reserved.len();
        }
        assert_eq!(total, 256 - 5 - 3);
    }

    #[test]
    fn static_pool_grants_the_blocks_max_pods_need_at_once() {
        let mut index = Index::new();
        index.set_pools(vec![vnet("static", &["10.10.0.0/24"], AllocationStrategy::Static)]);
        let n = NodeView { max_pods: Some(30), ..node("a") };
        let (a, _) = index.assign(&n, &Request::default(), 0);
        assert_eq!(a.blocks(), [net("10.10.0.0/28"), net("10.10.0.16/28")], "30 pods: ceil(30 / 16) /28 blocks");
        // Without capacity.pods or spec.allocation.maxPods: kubelet's 110, ceil(110 / 16) = 7 blocks.
        let (b, _) = index.assign(&node("b"), &Request::default(), 0);
        assert_eq!(b.grants.len(), 7, "{:?}", b.blocks());
        assert!(b.unmet.is_empty());
    }

    #[test]
    fn dynamic_pool_grows_to_the_request_and_reports_what_it_cannot_grant() {
        let mut index = Index::new();
        let mut p = vnet("dyn", &["10.10.0.0/26"], AllocationStrategy::Dynamic);
        p.allocation.max_blocks_per_node = Some(3);
        index.set_pools(vec![p]);
        let (a, _) = index.assign(&node("a"), &Request::default(), 0);
        assert_eq!(a.grants.len(), 1, "one block to start");
        let first = a.grants[0].clone();
        let (a, _) = index.assign(&node("a"), &wants(20), 0);
        assert_eq!(a.grants.len(), 2, "12 + 16 usable cover 20");
        assert_eq!(a.grants[0], first, "an existing grant keeps its ID");
        let (a, _) = index.assign(&node("a"), &wants(60), 0);
        assert_eq!(a.grants.len(), 3);
        assert!(matches!(a.unmet[..], [Unmet::AboveMaximum { max: 3, .. }]), "{:?}", a.unmet);
        assert!(a.unmet[0].to_string().contains("spec.requestedIPs.ipv4"), "{}", a.unmet[0]);
        let (b, _) = index.assign(&node("b"), &wants(40), 0);
        assert_eq!(b.grants.len(), 1, "the pool had one block left");
        assert!(matches!(b.unmet[..], [Unmet::Exhausted { .. }]), "{:?}", b.unmet);
        assert_eq!(index.report("dyn").unwrap().unmet, 2);
    }

    #[test]
    fn release_needs_the_exact_allocation_id_and_quarantines_until_committed_and_expired() {
        let mut index = Index::new();
        index.set_pools(vec![vnet("dyn", &["10.10.0.0/27"], AllocationStrategy::Dynamic)]);
        let (a, _) = index.assign(&node("a"), &wants(20), 0);
        let tail = a.grants[1].clone();
        let stale = Request { releases: vec![(tail.block.to_string(), "not-the-id".into())], ..wants(0) };
        let (r, _) = index.assign(&node("a"), &stale, 10);
        assert!(r.released.is_empty());
        assert!(matches!(r.release_problems[..], [ReleaseProblem::StaleId { .. }]), "{:?}", r.release_problems);
        let unheld = Request { releases: vec![("10.99.0.0/28".into(), "x".into())], ..wants(0) };
        assert!(matches!(
            index.assign(&node("a"), &unheld, 10).0.release_problems[..],
            [ReleaseProblem::NotHeld { .. }]
        ));

        let release = Request { releases: vec![(tail.block.to_string(), tail.id.clone())], ..wants(0) };
        let (r, _) = index.assign(&node("a"), &release, 10);
        assert_eq!(r.released, std::slice::from_ref(&tail));
        assert_eq!(r.blocks(), [a.grants[0].block]);
        assert_eq!(r.quarantined[0].until, 40, "30 s by default");
        // Not written yet: the block is still the node's alone.
        assert!(index.assign(&node("b"), &Request::default(), 10).0.problem.is_some(), "nothing free for b");
        index.commit("a", &r);
        assert_eq!(index.holding("a").unwrap().quarantined.len(), 1);
        assert!(index.assign(&node("b"), &Request::default(), 20).0.problem.is_some(), "quarantined, not free");
        // The agent still names it (the cache lags): nothing more happens.
        let (again, _) = index.assign(&node("a"), &release, 20);
        assert!(again.release_problems.is_empty() && again.released.is_empty(), "{again:?}");
        let (expired, _) = index.assign(&node("a"), &Request::default(), 40);
        assert_eq!(expired.expired, [tail.block]);
        index.commit("a", &expired);
        let (b, _) = index.assign(&node("b"), &Request::default(), 41);
        assert_eq!(b.blocks(), [tail.block]);
        assert_ne!(b.grants[0].id, tail.id, "a new grant, a new ID");
    }

    #[test]
    fn rebuild_keeps_quarantined_blocks_out_of_the_pool() {
        let mut index = Index::new();
        index.set_pools(vec![vnet("dyn", &["10.10.0.0/27"], AllocationStrategy::Dynamic)]);
        let recorded = vec![
            ("10.10.0.0/28".to_string(), Some("g1".to_string()), None),
            ("10.10.0.16/28".to_string(), Some("q1".to_string()), Some(100)),
        ];
        assert!(index.observe("a", "uid-a", Some("dyn"), &recorded).is_empty());
        let h = index.holding("a").unwrap();
        assert_eq!(h.grants, [Grant { block: net("10.10.0.0/28"), id: "g1".into() }]);
        assert_eq!(h.quarantined[0].id, "q1");
        assert!(index.assign(&node("b"), &Request::default(), 0).0.problem.is_some());
        assert_eq!(index.release("a").len(), 2, "a gone node returns its quarantined blocks too");
    }

    #[test]
    fn a_held_block_a_new_exclusion_covers_stays_with_its_node_and_is_reported() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        let (a, _) = index.assign(&node("a"), &Request::default(), 0);
        let block = a.blocks()[0];
        index.commit("a", &a);
        let mut excluded = pool("overlay", "1", &["10.244.0.0/16"]);
        excluded.exclusions = vec![block.to_string()];
        let problems = index.set_pools(vec![excluded]);
        assert_eq!(
            problems,
            [BlockProblem::HeldBlockRefused {
                node: "a".into(),
                block,
                pool: "overlay".into(),
                reason: OccupyError::Reserved { block }
            }]
        );
        assert_eq!(index.holding("a").unwrap().grants[0].block, block, "the node keeps it");
        let (b, _) = index.assign(&node("b"), &Request::default(), 0);
        assert_ne!(b.blocks()[0], block, "nobody else gets it");
    }

    #[test]
    fn a_node_joining_inside_a_granted_block_is_withheld_and_its_holder_named() {
        let mut index = Index::new();
        index.set_pools(vec![vnet("subnet", &["10.224.0.0/24"], AllocationStrategy::Single)]);
        let (a, _) = index.assign(&at_ip("n1", "10.224.0.4"), &Request::default(), 0);
        assert_eq!(a.blocks(), [net("10.224.0.0/28")]);
        let (late, _) = index.assign(&at_ip("late", "10.224.0.9"), &Request::default(), 0);
        assert_eq!(late.holders_of_my_ips, ["n1"]);
        let (a, _) = index.assign(&at_ip("n1", "10.224.0.4"), &Request::default(), 0);
        assert!(a.reserved.contains(&"10.224.0.9".parse().unwrap()));
        assert_eq!(a.foreign, [ForeignAddress { ip: "10.224.0.9".parse().unwrap(), node: "late".into() }]);
    }
}
