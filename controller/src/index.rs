//! Which node holds which block: the controller's in-memory view, rebuilt from
//! the API and mutated synchronously under one lock (no awaits inside).
//!
//! ```text
//!   PoolView ──set_pools──▶ pools: name → PoolBlocks (or why it is invalid)
//!   NNC status ──observe──▶ holdings: node → (uid, pool, blocks)   ◀── the API is the truth
//!   Node podCIDRs ─adopt──▶ holdings                                (kubenet migration)
//!   NodeView ────assign───▶ blocks for every family of the node's pool
//!   node gone ───release──▶ blocks back to their pool
//! ```
//!
//! Every block appears in at most one holding (`owners`), and a pool's bitmap
//! marks exactly the blocks held from it. Nothing here talks to Kubernetes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use carve_crds::PoolMode;
use carve_crds::net::{self, IpFamily};
use ipnet::IpNet;

use crate::allocator::{OccupyError, PoolBlocks, PoolLayout, Usage};
use crate::selector::Selector;

/// A PodCIDR as the index needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    /// Creation time (RFC 3339): when two pools overlap, the later one is invalid.
    pub created: String,
    pub mode: PoolMode,
    pub cidrs: Vec<String>,
    pub block_v4: Option<i32>,
    pub block_v6: Option<i32>,
    pub exclusions: Vec<String>,
    pub disabled: bool,
    pub selector: Result<Selector, String>,
}

/// A Node as the index needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), as written by whoever set them.
    pub pod_cidrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// UID of the Node incarnation the blocks belong to.
    pub uid: String,
    pub pool: String,
    pub blocks: Vec<IpNet>,
}

struct Pool {
    view: PoolView,
    /// None when the pool is invalid.
    blocks: Option<PoolBlocks>,
    invalid: Option<String>,
    /// CIDRs removed from the spec that still hold blocks.
    retired: Vec<IpNet>,
    exhausted: BTreeSet<IpFamily>,
}

/// Something wrong with a recorded block or a podCIDR; it is reported, never used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockProblem {
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
}

/// Why a node has fewer blocks than its pool's families.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignProblem {
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
    pub fn reason(&self) -> &'static str {
        match self {
            AssignProblem::NoMatchingPool => "NoMatchingPool",
            AssignProblem::AmbiguousPool(_) => "AmbiguousPool",
            AssignProblem::PoolInvalid { .. } => "PoolInvalid",
            AssignProblem::PoolDisabled(_) => "PoolDisabled",
            AssignProblem::Exhausted { .. } => "PoolExhausted",
        }
    }
}

/// The outcome of `assign` for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub pool: Option<String>,
    pub mode: Option<PoolMode>,
    /// Every block the node holds, IPv4 first.
    pub blocks: Vec<IpNet>,
    /// The blocks carved by this call.
    pub carved: Vec<IpNet>,
    pub problem: Option<AssignProblem>,
}

/// A pool's health and usage for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    pub usage: Vec<(IpFamily, u8, Usage)>,
    pub invalid: Option<String>,
    pub exhausted: Vec<IpFamily>,
    pub retired: Vec<IpNet>,
}

#[derive(Default)]
pub struct Index {
    pools: BTreeMap<String, Pool>,
    holdings: BTreeMap<String, Holding>,
    owners: HashMap<IpNet, String>,
}

fn layout_of(view: &PoolView) -> Result<PoolLayout, String> {
    let block =
        |family, set: Option<i32>| set.map(|b| b.clamp(0, 128) as u8).unwrap_or(view.mode.default_block_size(family));
    let (v4, v6) = (block(IpFamily::IPv4, view.block_v4), block(IpFamily::IPv6, view.block_v6));
    let errors = net::validate_pool(&view.cidrs, v4, v6);
    if !errors.is_empty() {
        return Err(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
    }
    let cidrs = view.cidrs.iter().map(|c| net::parse_cidr(c).expect("validated")).collect();
    let exclusions = view
        .exclusions
        .iter()
        .map(|c| net::parse_cidr(c).map_err(|e| format!("spec.exclusions: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PoolLayout {
        azure_reserved: view.mode == PoolMode::VNet,
        cidrs,
        block_prefix_v4: v4,
        block_prefix_v6: v6,
        exclusions,
    })
}

impl Index {
    /// Rebuilds every pool from `views`, keeping every block already held.
    pub fn set_pools(&mut self, mut views: Vec<PoolView>) {
        views.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let previous = std::mem::take(&mut self.pools);
        let mut accepted: Vec<(String, IpNet)> = Vec::new();
        for view in views {
            let mut pool = Pool {
                blocks: None,
                invalid: None,
                retired: Vec::new(),
                exhausted: BTreeSet::new(),
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
        self.reoccupy(&previous);
    }

    /// Puts every held block back into its pool's bitmap after a rebuild.
    fn reoccupy(&mut self, previous: &BTreeMap<String, Pool>) {
        let mut orphans: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        for holding in self.holdings.values() {
            let Some(pool) = self.pools.get_mut(&holding.pool) else { continue };
            let Some(blocks) = pool.blocks.as_mut() else { continue };
            for block in &holding.blocks {
                if blocks.holds(block) {
                    let _ = blocks.occupy(block);
                } else {
                    orphans.entry(holding.pool.clone()).or_default().push(*block);
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
                pool_blocks.retain_retired(cidr, &held);
                pool.retired.push(cidr);
            }
        }
    }

    pub fn holding(&self, node: &str) -> Option<&Holding> {
        self.holdings.get(node)
    }

    pub fn holdings(&self) -> impl Iterator<Item = (&String, &Holding)> {
        self.holdings.iter()
    }

    /// Records blocks the API says node `node` (incarnation `uid`) holds.
    /// Blocks that are malformed, outside every pool or held by another node
    /// are reported and not recorded.
    pub fn observe(
        &mut self,
        node: &str,
        uid: &str,
        pool_hint: Option<&str>,
        recorded: &[String],
    ) -> Vec<BlockProblem> {
        let mut problems = Vec::new();
        for raw in recorded {
            let Ok(block) = net::parse_cidr(raw) else {
                problems.push(BlockProblem::Malformed(raw.clone()));
                continue;
            };
            if let Some(problem) = self.take(node, uid, pool_hint, block) {
                problems.push(problem);
            }
        }
        problems
    }

    /// Occupies `block` for `node` in the pool that holds it.
    fn take(&mut self, node: &str, uid: &str, pool_hint: Option<&str>, block: IpNet) -> Option<BlockProblem> {
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
            blocks: Vec::new(),
        });
        holding.blocks.push(block);
        holding.blocks.sort_by_key(|b| (IpFamily::of(b), *b));
        None
    }

    /// Takes over a node's existing podCIDRs that lie in a pool (migration from
    /// kube-controller-manager or kubenet without re-IP).
    pub fn adopt(&mut self, node: &NodeView) -> Vec<BlockProblem> {
        let mut problems = Vec::new();
        for raw in &node.pod_cidrs {
            let Ok(cidr) = raw.parse::<IpNet>() else { continue };
            let cidr = cidr.trunc();
            if self
                .holdings
                .get(&node.name)
                .is_some_and(|h| h.blocks.iter().any(|b| IpFamily::of(b) == IpFamily::of(&cidr)))
            {
                continue;
            }
            let covering = self.pools.iter().find(|(_, p)| p.blocks.as_ref().is_some_and(|b| b.covers(&cidr)));
            let Some((name, _)) = covering else { continue }; // not carve's range: leave it alone
            let name = name.clone();
            match self.take(&node.name, &node.uid, Some(&name), cidr) {
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

    /// Gives `node` a block of every family its pool serves, adopting its
    /// podCIDRs first. Blocks already held never change.
    pub fn assign(&mut self, node: &NodeView) -> (Assignment, Vec<BlockProblem>) {
        let problems = self.adopt(node);
        let pool_name = match self.holdings.get(&node.name) {
            Some(h) => Ok(h.pool.clone()),
            None => self.select_pool(node),
        };
        let mut assignment =
            Assignment { pool: None, mode: None, blocks: Vec::new(), carved: Vec::new(), problem: None };
        let name = match pool_name {
            Ok(n) => n,
            Err(problem) => {
                assignment.problem = Some(problem);
                return (assignment, problems);
            }
        };
        assignment.pool = Some(name.clone());
        let held: Vec<IpNet> = self.holdings.get(&node.name).map(|h| h.blocks.clone()).unwrap_or_default();
        if let Some(pool) = self.pools.get_mut(&name) {
            assignment.mode = Some(pool.view.mode);
            match (&pool.invalid, pool.view.disabled, pool.blocks.as_mut()) {
                (Some(reason), _, _) => {
                    assignment.problem = Some(AssignProblem::PoolInvalid { pool: name.clone(), reason: reason.clone() })
                }
                (None, true, _) if held.is_empty() => {
                    assignment.problem = Some(AssignProblem::PoolDisabled(name.clone()))
                }
                (None, true, _) => {}
                (None, false, Some(blocks)) => {
                    let mut exhausted = Vec::new();
                    for family in blocks.families() {
                        if held.iter().any(|b| IpFamily::of(b) == family) {
                            continue;
                        }
                        match blocks.allocate(family) {
                            Some(b) => assignment.carved.push(b),
                            None => exhausted.push(family),
                        }
                    }
                    pool.exhausted.extend(exhausted.iter().copied());
                    if !exhausted.is_empty() {
                        assignment.problem = Some(AssignProblem::Exhausted { pool: name.clone(), families: exhausted });
                    }
                }
                (None, false, None) => {}
            }
        }
        if !assignment.carved.is_empty() {
            let holding = self.holdings.entry(node.name.clone()).or_insert_with(|| Holding {
                uid: node.uid.clone(),
                pool: name.clone(),
                blocks: Vec::new(),
            });
            for b in &assignment.carved {
                self.owners.insert(*b, node.name.clone());
                holding.blocks.push(*b);
            }
            holding.blocks.sort_by_key(|b| (IpFamily::of(b), *b));
        }
        assignment.blocks = self.holdings.get(&node.name).map(|h| h.blocks.clone()).unwrap_or_default();
        (assignment, problems)
    }

    /// Returns every block of `node` to its pool; the blocks released.
    pub fn release(&mut self, node: &str) -> Vec<IpNet> {
        let Some(holding) = self.holdings.remove(node) else { return Vec::new() };
        for block in &holding.blocks {
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
        holding.blocks
    }

    pub fn report(&self, pool: &str) -> Option<PoolReport> {
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
        // A pool is exhausted for a family only while it has no free block of it.
        let exhausted =
            p.exhausted.iter().copied().filter(|f| p.blocks.as_ref().is_some_and(|b| b.usage(*f).free == 0)).collect();
        Some(PoolReport { usage, invalid: p.invalid.clone(), exhausted, retired: p.retired.clone() })
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
        }
    }

    fn node(name: &str) -> NodeView {
        NodeView { name: name.into(), uid: format!("uid-{name}"), ..Default::default() }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn nodes_get_distinct_blocks_and_keep_them() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        let (a, _) = index.assign(&node("a"));
        let (b, _) = index.assign(&node("b"));
        assert_eq!(a.blocks, [net("10.244.0.0/24")]);
        assert_eq!(b.blocks, [net("10.244.1.0/24")]);
        let (again, _) = index.assign(&node("a"));
        assert_eq!(again.blocks, a.blocks);
        assert!(again.carved.is_empty());
    }

    #[test]
    fn recorded_blocks_are_occupied_before_new_allocations() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        assert!(index.observe("old", "u1", Some("overlay"), &["10.244.0.0/24".into()]).is_empty());
        let (fresh, _) = index.assign(&node("new"));
        assert_eq!(fresh.blocks, [net("10.244.1.0/24")]);
    }

    #[test]
    fn bad_recorded_blocks_are_reported_not_used() {
        let mut index = Index::new();
        index.set_pools(vec![pool("overlay", "1", &["10.244.0.0/16"])]);
        index.observe("a", "ua", None, &["10.244.0.0/24".into()]);
        let problems =
            index.observe("b", "ub", None, &["garbage".into(), "10.9.0.0/24".into(), "10.244.0.0/24".into()]);
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
        assert_eq!(index.assign(&n).0.pool.as_deref(), Some("gpu"));
        assert_eq!(index.assign(&node("plain")).0.pool.as_deref(), Some("all"));
        index.set_pools(vec![pool("all", "1", &["10.244.0.0/16"]), gpu, gpu2]);
        let (tie, _) = index.assign(&NodeView { name: "g2".into(), ..n });
        assert!(matches!(tie.problem, Some(AssignProblem::AmbiguousPool(_))), "{tie:?}");
    }

    #[test]
    fn exhaustion_then_growth_serves_the_waiting_node() {
        let mut index = Index::new();
        index.set_pools(vec![pool("small", "1", &["10.244.0.0/24"])]);
        index.assign(&node("a"));
        let (b, _) = index.assign(&node("b"));
        assert_eq!(b.problem.as_ref().map(|p| p.reason()), Some("PoolExhausted"));
        assert_eq!(index.report("small").unwrap().exhausted, [IpFamily::IPv4]);
        index.set_pools(vec![pool("small", "1", &["10.244.0.0/24", "10.244.1.0/24"])]);
        let (b, _) = index.assign(&node("b"));
        assert_eq!(b.blocks, [net("10.244.1.0/24")]);
        assert!(b.problem.is_none());
    }

    #[test]
    fn removed_cidr_in_use_is_retired_not_reused() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24", "10.250.0.0/24"])]);
        index.observe("a", "ua", None, &["10.250.0.0/24".into()]);
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        assert_eq!(index.report("p").unwrap().retired, [net("10.250.0.0/24")]);
        assert_eq!(index.holding("a").unwrap().blocks, [net("10.250.0.0/24")]);
        assert_eq!(index.assign(&node("b")).0.blocks, [net("10.244.0.0/24")]);
        assert!(index.assign(&node("c")).0.problem.is_some());
        index.release("a");
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        assert!(index.report("p").unwrap().retired.is_empty());
    }

    #[test]
    fn release_returns_blocks() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/24"])]);
        index.assign(&node("a"));
        assert_eq!(index.release("a"), [net("10.244.0.0/24")]);
        assert!(index.owner_of(&net("10.244.0.0/24")).is_none());
        assert_eq!(index.assign(&node("b")).0.blocks, [net("10.244.0.0/24")]);
    }

    #[test]
    fn pod_cidr_inside_a_pool_is_adopted_and_conflicts_are_reported() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/16"])]);
        let mut kcm = node("kcm");
        kcm.pod_cidrs = vec!["10.244.7.0/24".into()];
        let (a, problems) = index.assign(&kcm);
        assert!(problems.is_empty());
        assert_eq!(a.blocks, [net("10.244.7.0/24")]);
        assert!(a.carved.is_empty());
        let mut clash = node("clash");
        clash.pod_cidrs = vec!["10.244.7.0/24".into()];
        let (c, problems) = index.assign(&clash);
        assert!(matches!(problems[0], BlockProblem::PodCidrConflict { .. }), "{problems:?}");
        assert_eq!(c.blocks, [net("10.244.0.0/24")]);
    }

    #[test]
    fn dual_stack_gets_one_block_per_family() {
        let mut index = Index::new();
        index.set_pools(vec![pool("ds", "1", &["10.244.0.0/16", "fd12:3456:789a::/64"])]);
        let (a, _) = index.assign(&node("a"));
        assert_eq!(a.blocks, [net("10.244.0.0/24"), net("fd12:3456:789a::/80")]);
    }

    #[test]
    fn disabled_pool_keeps_blocks_but_carves_none() {
        let mut index = Index::new();
        index.set_pools(vec![pool("p", "1", &["10.244.0.0/16"])]);
        index.assign(&node("a"));
        let mut disabled = pool("p", "1", &["10.244.0.0/16"]);
        disabled.disabled = true;
        index.set_pools(vec![disabled]);
        assert_eq!(index.assign(&node("a")).0.blocks, [net("10.244.0.0/24")]);
        assert_eq!(index.assign(&node("b")).0.problem.map(|p| p.reason()), Some("PoolDisabled"));
    }
}
