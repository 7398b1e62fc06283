//! What the controller writes, as pure functions of what it knows: a node's
//! NodeNetworkConfig status, a pool's PodCIDR status, and the Events that go
//! with a change. `reconcile` does the I/O around them.
//!
//! ```text
//!   Assignment + problems + previous status ──nnc_status──▶ NNC status
//!                                            ──nnc_notices─▶ Events (NNC, Node, pool)
//!   PoolReport + pool + previous status ─────pool_status──▶ PodCIDR status
//!   previous + desired pool status ──────────pool_notices─▶ Events (pool)
//! ```
//!
//! Conditions keep their transition time while status, reason and message stay
//! the same, so an unchanged status compares equal and is not rewritten.

use carve_crds::net::IpFamily;
use carve_crds::{
    AddressConflict, AllocationStrategy, FamilyUsage, NodeNetworkConfigStatus, PodCidr, PodCidrStatus, Scaler,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::index::{AssignProblem, Assignment, BlockProblem, PoolReport};
use crate::views;

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subject {
    Node,
    Nnc,
    Pool(String),
}

/// A Warning Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    pub(crate) subject: Subject,
    pub(crate) reason: String,
    pub(crate) note: String,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps the previous transition time of every condition that did not change.
fn settle(mut conditions: Vec<Condition>, previous: &[Condition]) -> Vec<Condition> {
    for c in &mut conditions {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_)
            && p.status == c.status
            && p.reason == c.reason
            && p.message == c.message
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    conditions
}

/// A podCIDR the node came with that carve could not adopt (reported apart
/// from problems with the NNC's own recorded blocks).
fn is_pod_cidr_problem(p: &BlockProblem) -> bool {
    matches!(p, BlockProblem::PodCidrConflict { .. } | BlockProblem::PodCidrUnfit { .. })
}

/// The NNC status for a node's assignment. `problems` are what this
/// reconcile found wrong with recorded blocks or the node's podCIDRs; the
/// BlocksValid and PodCIDRAdopted conditions keep the last problem seen until
/// one recurs or the NNC is recreated.
pub(crate) fn nnc_status(
    assignment: &Assignment,
    problems: &[BlockProblem],
    node_ip: Option<String>,
    generation: Option<i64>,
    previous: &NodeNetworkConfigStatus,
    now: &Time,
) -> NodeNetworkConfigStatus {
    let mut conditions = vec![match &assignment.problem {
        None => condition(
            "Ready",
            true,
            "BlocksCarved",
            format!(
                "{} carved from pool {}",
                assignment.blocks().iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
                assignment.pool.clone().unwrap_or_default()
            ),
            generation,
            now,
        ),
        Some(p) => condition("Ready", false, p.reason(), p.to_string(), generation, now),
    }];
    for (type_, reason, pod_cidr) in
        [("BlocksValid", "InvalidStatus", false), ("PodCIDRAdopted", "PodCIDRConflict", true)]
    {
        let found: Vec<String> =
            problems.iter().filter(|p| is_pod_cidr_problem(p) == pod_cidr).map(|p| p.to_string()).collect();
        if !found.is_empty() {
            conditions.push(condition(type_, false, reason, found.join("; "), generation, now));
        } else if let Some(prev) = previous.conditions.iter().find(|c| c.type_ == type_) {
            conditions.push(prev.clone());
        }
    }
    let strategy = assignment.allocation.as_ref().map(|a| a.strategy);
    if matches!(strategy, Some(AllocationStrategy::Static | AllocationStrategy::Dynamic)) {
        let mut unmet: Vec<(String, &str)> = assignment.unmet.iter().map(|u| (u.to_string(), u.reason())).collect();
        unmet.extend(assignment.release_problems.iter().map(|p| (p.to_string(), "ReleaseRefused")));
        conditions.push(match unmet.first() {
            None => condition(
                "RequestsMet",
                true,
                "Covered",
                "the node's blocks cover what it needs".into(),
                generation,
                now,
            ),
            Some((_, reason)) => {
                let message = unmet.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join("; ");
                condition("RequestsMet", false, reason, message, generation, now)
            }
        });
    }
    let address_conflicts = address_conflicts(assignment, previous);
    if !address_conflicts.is_empty() || previous.conditions.iter().any(|c| c.type_ == "AddressConflict") {
        conditions.push(if address_conflicts.is_empty() {
            condition(
                "AddressConflict",
                false,
                "NoConflict",
                "no Node address lies in this node's blocks".into(),
                generation,
                now,
            )
        } else {
            condition(
                "AddressConflict",
                true,
                "NodeAddressInBlock",
                conflict_message(&address_conflicts),
                generation,
                now,
            )
        });
    }
    let blocks = views::node_blocks(&assignment.grants, assignment.mode);
    let scaler = assignment.allocation.as_ref().filter(|a| a.strategy == AllocationStrategy::Dynamic).map(|a| Scaler {
        request_threshold_percent: a.request_threshold_percent() as i32,
        release_threshold_percent: a.release_threshold_percent() as i32,
        max_blocks_per_node: a.max_blocks_per_node() as i32,
    });
    NodeNetworkConfigStatus {
        pool: assignment.pool.clone(),
        mode: assignment.mode,
        strategy,
        block_cidrs: (!blocks.is_empty()).then(|| blocks.iter().map(|b| b.cidr.as_str()).collect::<Vec<_>>().join(",")),
        gateway: blocks.first().and_then(|b| b.gateway.clone()),
        blocks,
        reserved_ips: views::addresses(&assignment.reserved),
        quarantined: views::quarantined_blocks(&assignment.quarantined),
        address_conflicts,
        scaler,
        node_ip,
        conditions: settle(conditions, &previous.conditions),
        observed_generation: generation,
    }
}

/// Other Nodes' addresses inside the node's blocks that were not withheld
/// when the block was granted (the Node joined later), or were conflicts
/// already. Addresses known at grant time are simply withheld.
fn address_conflicts(assignment: &Assignment, previous: &NodeNetworkConfigStatus) -> Vec<AddressConflict> {
    assignment
        .foreign
        .iter()
        .filter(|f| {
            let ip = f.ip.to_string();
            let known = previous.address_conflicts.iter().any(|c| c.ip == ip);
            let block_was_held = assignment.grants.iter().any(|g| {
                g.block.contains(&f.ip)
                    && previous.blocks.iter().any(|b| b.allocation_id.as_deref() == Some(g.id.as_str()))
            });
            known || (block_was_held && !previous.reserved_ips.contains(&ip))
        })
        .map(|f| AddressConflict { ip: f.ip.to_string(), node: f.node.clone() })
        .collect()
}

fn conflict_message(conflicts: &[AddressConflict]) -> String {
    let list = conflicts.iter().map(|c| format!("{} (Node {})", c.ip, c.node)).collect::<Vec<_>>().join(", ");
    format!(
        "{list} lie in this node's blocks: withheld from new pods; a pod that already has one keeps it and is \
         reported by Event (carve does not evict it: move the pod or the Node)"
    )
}

/// Conflicts in `desired` that `previous` did not list: each is announced once.
pub(crate) fn new_conflicts(
    previous: &NodeNetworkConfigStatus,
    desired: &NodeNetworkConfigStatus,
) -> Vec<AddressConflict> {
    desired.address_conflicts.iter().filter(|c| !previous.address_conflicts.contains(c)).cloned().collect()
}

/// The Events for node `name`'s reconcile: one per problem found on the NNC;
/// on the Node, why it gets no blocks, once when that reason appears; on the
/// pool, that the node waits for a block, once when the pool runs out for it.
pub(crate) fn nnc_notices(
    name: &str,
    assignment: &Assignment,
    problems: &[BlockProblem],
    previous: &NodeNetworkConfigStatus,
) -> Vec<Notice> {
    let mut notices: Vec<Notice> = problems
        .iter()
        .map(|p| Notice {
            subject: Subject::Nnc,
            reason: if is_pod_cidr_problem(p) { "PodCIDRConflict" } else { "InvalidStatus" }.into(),
            note: p.to_string(),
        })
        .collect();
    let was_ready_for = |reason: &str| previous.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == reason);
    if let Some(p) = &assignment.problem
        && !was_ready_for(p.reason())
    {
        notices.push(Notice { subject: Subject::Node, reason: p.reason().into(), note: p.to_string() });
        if let AssignProblem::Exhausted { pool, .. } = p {
            notices.push(Notice {
                subject: Subject::Pool(pool.clone()),
                reason: "PoolExhausted".into(),
                note: format!("node {name} is waiting: {p}"),
            });
        }
    }
    // A node short of addresses, or a refused release: once per new message.
    let said =
        |message: &str| previous.conditions.iter().any(|c| c.type_ == "RequestsMet" && c.message.contains(message));
    for u in assignment.unmet.iter().filter(|u| !said(&u.to_string())) {
        notices.push(Notice { subject: Subject::Nnc, reason: u.reason().into(), note: u.to_string() });
        if let crate::index::Unmet::Exhausted { pool, .. } = u {
            notices.push(Notice {
                subject: Subject::Pool(pool.clone()),
                reason: "PoolExhausted".into(),
                note: format!("node {name} needs more addresses: {u}"),
            });
        }
    }
    for p in assignment.release_problems.iter().filter(|p| !said(&p.to_string())) {
        notices.push(Notice { subject: Subject::Nnc, reason: "ReleaseRefused".into(), note: p.to_string() });
    }
    notices
}

/// A pool's status: usage per family and the Invalid, Ready, Exhausted and
/// (while a removed CIDR still holds blocks) RemovalRefused conditions.
pub(crate) fn pool_status(pool: &PodCidr, report: &PoolReport, now: &Time) -> PodCidrStatus {
    let generation = pool.metadata.generation;
    let previous = pool.status.clone().unwrap_or_default();
    let families: Vec<FamilyUsage> = report
        .usage
        .iter()
        .map(|(family, block, u)| FamilyUsage {
            family: *family,
            block_size: *block as i32,
            capacity: u.capacity.min(i64::MAX as u64) as i64,
            allocated: u.allocated as i64,
            free: u.free.min(i64::MAX as u64) as i64,
            quarantined: report.quarantined.get(family).copied().unwrap_or(0) as i64,
        })
        .collect();
    let mut conditions = vec![];
    match &report.invalid {
        Some(reason) => {
            conditions.push(condition("Invalid", true, "InvalidSpec", reason.clone(), generation, now));
            conditions.push(condition("Ready", false, "InvalidSpec", reason.clone(), generation, now));
        }
        None => {
            conditions.push(condition("Invalid", false, "Valid", "spec is usable".into(), generation, now));
            let (reason, message) = if pool.spec.disabled {
                ("Disabled", "disabled: existing blocks stay, no new ones are carved")
            } else {
                ("Serving", "carving blocks")
            };
            conditions.push(condition("Ready", !pool.spec.disabled, reason, message.into(), generation, now));
        }
    }
    let exhausted = !report.exhausted.is_empty();
    let families_txt = report.exhausted.iter().map(IpFamily::to_string).collect::<Vec<_>>().join(" and ");
    conditions.push(if exhausted {
        let message = format!("no free {families_txt} block; append a CIDR to spec.cidrs");
        condition("Exhausted", true, "NoFreeBlock", message, generation, now)
    } else {
        condition("Exhausted", false, "FreeBlocks", "free blocks remain".into(), generation, now)
    });
    if !report.retired.is_empty() {
        let cidrs = report.retired.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
        let message = format!(
            "{cidrs} left spec.cidrs but still holds blocks; it serves no new node. Drain those nodes, or add it back"
        );
        conditions.push(condition("RemovalRefused", true, "CIDRInUse", message, generation, now));
    }
    PodCidrStatus {
        allocated: families.iter().map(|f| f.allocated).sum(),
        free: families.iter().map(|f| f.free).fold(0i64, |a, b| a.saturating_add(b)),
        unmet_requests: report.unmet as i64,
        families,
        conditions: settle(conditions, &previous.conditions),
        observed_generation: generation,
    }
}

/// An Event on the pool for each of Invalid, RemovalRefused and Exhausted
/// that turned true.
pub(crate) fn pool_notices(previous: &PodCidrStatus, desired: &PodCidrStatus, pool: &str) -> Vec<Notice> {
    let was = |t: &str| previous.conditions.iter().any(|c| c.type_ == t && c.status == "True");
    desired
        .conditions
        .iter()
        .filter(|c| c.status == "True" && ["Invalid", "RemovalRefused", "Exhausted"].contains(&c.type_.as_str()))
        .filter(|c| !was(&c.type_))
        .map(|c| Notice { subject: Subject::Pool(pool.into()), reason: c.reason.clone(), note: c.message.clone() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::Usage;
    use crate::index::Grant;
    use carve_crds::{PodCidrSpec, PoolMode};
    use ipnet::IpNet;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A node that got `blocks` from pool "a" (Overlay).
    fn carved(blocks: &[&str]) -> Assignment {
        Assignment {
            pool: Some("a".into()),
            mode: Some(PoolMode::Overlay),
            allocation: Some(Default::default()),
            grants: blocks.iter().enumerate().map(|(i, b)| Grant { block: net(b), id: format!("id{i}") }).collect(),
            ..Default::default()
        }
    }

    fn waiting(problem: AssignProblem) -> Assignment {
        Assignment { problem: Some(problem), ..Default::default() }
    }

    fn exhausted() -> AssignProblem {
        AssignProblem::Exhausted { pool: "a".into(), families: vec![IpFamily::IPv4] }
    }

    fn cond<'a>(status: &'a NodeNetworkConfigStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    fn malformed() -> BlockProblem {
        BlockProblem::Malformed("10.244.0/24".into())
    }

    fn pod_cidr_conflict() -> BlockProblem {
        BlockProblem::PodCidrConflict { cidr: net("10.244.3.0/24"), other: "node-b".into() }
    }

    #[test]
    fn a_carved_node_is_ready_with_its_blocks_gateway_and_node_ip() {
        let a = carved(&["10.244.1.0/24", "fd00:0:0:1::/80"]);
        let s = nnc_status(&a, &[], Some("10.224.0.4".into()), Some(1), &Default::default(), &at(10));
        let ready = cond(&s, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "BlocksCarved"));
        assert_eq!(ready.message, "10.244.1.0/24, fd00:0:0:1::/80 carved from pool a");
        assert_eq!(s.block_cidrs.as_deref(), Some("10.244.1.0/24,fd00:0:0:1::/80"));
        assert_eq!(s.gateway.as_deref(), Some("10.244.1.1"));
        assert_eq!(s.blocks[1].gateway.as_deref(), Some("fd00:0:0:1::1"));
        assert_eq!(s.node_ip.as_deref(), Some("10.224.0.4"));
        assert_eq!((s.pool.as_deref(), s.mode, s.observed_generation), (Some("a"), Some(PoolMode::Overlay), Some(1)));
        assert_eq!(s.conditions.len(), 1, "no problem conditions before a problem is seen");
    }

    #[test]
    fn a_waiting_node_is_not_ready_with_the_reason_and_no_blocks() {
        for (problem, reason) in [
            (AssignProblem::NoMatchingPool, "NoMatchingPool"),
            (AssignProblem::AmbiguousPool(vec!["a".into(), "b".into()]), "AmbiguousPool"),
            (AssignProblem::PoolInvalid { pool: "a".into(), reason: "overlaps b".into() }, "PoolInvalid"),
            (AssignProblem::PoolDisabled("a".into()), "PoolDisabled"),
            (exhausted(), "PoolExhausted"),
        ] {
            let s = nnc_status(&waiting(problem.clone()), &[], None, None, &Default::default(), &at(10));
            let ready = cond(&s, "Ready");
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reason));
            assert_eq!(ready.message, problem.to_string());
            assert!(s.blocks.is_empty() && s.block_cidrs.is_none() && s.gateway.is_none());
        }
    }

    #[test]
    fn recorded_block_problems_and_pod_cidr_problems_get_their_own_conditions() {
        let problems = [malformed(), pod_cidr_conflict()];
        let s = nnc_status(&carved(&["10.244.1.0/24"]), &problems, None, None, &Default::default(), &at(10));
        let valid = cond(&s, "BlocksValid");
        assert_eq!((valid.status.as_str(), valid.reason.as_str()), ("False", "InvalidStatus"));
        assert_eq!(valid.message, malformed().to_string());
        let adopted = cond(&s, "PodCIDRAdopted");
        assert_eq!((adopted.status.as_str(), adopted.reason.as_str()), ("False", "PodCIDRConflict"));
        assert_eq!(adopted.message, pod_cidr_conflict().to_string());
        assert_eq!(cond(&s, "Ready").status, "True", "a dropped block does not keep the node waiting");
    }

    #[test]
    fn problem_conditions_stay_until_the_nnc_is_recreated() {
        let first = nnc_status(&carved(&["10.244.1.0/24"]), &[malformed()], None, None, &Default::default(), &at(10));
        let later = nnc_status(&carved(&["10.244.1.0/24"]), &[], None, None, &first, &at(20));
        assert_eq!(cond(&later, "BlocksValid"), cond(&first, "BlocksValid"));
        assert_eq!(later, first, "an unchanged status compares equal, so it is not rewritten");
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_changes() {
        let ready = nnc_status(&carved(&["10.244.1.0/24"]), &[], None, None, &Default::default(), &at(10));
        let again = nnc_status(&carved(&["10.244.1.0/24"]), &[], None, None, &ready, &at(20));
        assert_eq!(cond(&again, "Ready").last_transition_time, at(10));
        let lost = nnc_status(&waiting(exhausted()), &[], None, None, &again, &at(30));
        assert_eq!(cond(&lost, "Ready").last_transition_time, at(30));
    }

    #[test]
    fn problems_are_events_on_the_nnc_with_their_reason() {
        let notices = nnc_notices(
            "node-a",
            &carved(&["10.244.1.0/24"]),
            &[malformed(), pod_cidr_conflict()],
            &Default::default(),
        );
        let reasons: Vec<(&Subject, &str)> = notices.iter().map(|n| (&n.subject, n.reason.as_str())).collect();
        assert_eq!(reasons, [(&Subject::Nnc, "InvalidStatus"), (&Subject::Nnc, "PodCIDRConflict")]);
        assert_eq!(notices[1].note, pod_cidr_conflict().to_string());
    }

    #[test]
    fn why_a_node_waits_is_told_once_on_the_node() {
        let a = waiting(AssignProblem::NoMatchingPool);
        let first = nnc_notices("node-a", &a, &[], &Default::default());
        assert_eq!(
            first,
            [Notice {
                subject: Subject::Node,
                reason: "NoMatchingPool".into(),
                note: AssignProblem::NoMatchingPool.to_string()
            }]
        );
        let status = nnc_status(&a, &[], None, None, &Default::default(), &at(10));
        assert!(nnc_notices("node-a", &a, &[], &status).is_empty(), "the same reason again is not repeated");
        assert!(
            nnc_notices("node-a", &carved(&["10.244.1.0/24"]), &[], &status).is_empty(),
            "getting blocks is no warning"
        );
    }

    #[test]
    fn an_exhausted_pool_hears_of_each_node_that_waits_once() {
        let a = waiting(exhausted());
        let notices = nnc_notices("node-a", &a, &[], &Default::default());
        assert_eq!(notices.len(), 2);
        assert_eq!(notices[0].subject, Subject::Node);
        assert_eq!(notices[1].subject, Subject::Pool("a".into()));
        assert_eq!(notices[1].reason, "PoolExhausted");
        assert_eq!(notices[1].note, format!("node node-a is waiting: {}", exhausted()));
        let status = nnc_status(&a, &[], None, None, &Default::default(), &at(10));
        assert!(nnc_notices("node-a", &a, &[], &status).is_empty());
    }

    fn pool(disabled: bool, previous: Option<PodCidrStatus>) -> PodCidr {
        let spec = PodCidrSpec {
            mode: PoolMode::Overlay,
            cidrs: vec![],
            block_size: Default::default(),
            node_selector: None,
            disabled,
            exclusions: vec![],
            allocation: None,
        };
        let mut p = PodCidr::new("a", spec);
        p.metadata.generation = Some(3);
        p.status = previous;
        p
    }

    fn report(allocated: u64, free: u64) -> PoolReport {
        PoolReport {
            usage: vec![(IpFamily::IPv4, 24, Usage { capacity: allocated + free, allocated, free })],
            invalid: None,
            exhausted: if free == 0 { vec![IpFamily::IPv4] } else { vec![] },
            retired: vec![],
            quarantined: Default::default(),
            unmet: 0,
        }
    }

    fn pool_cond<'a>(s: &'a PodCidrStatus, type_: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_}"));
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_serving_pool_reports_usage_per_family() {
        let s = pool_status(&pool(false, None), &report(3, 253), &at(10));
        assert_eq!((s.allocated, s.free, s.observed_generation), (3, 253, Some(3)));
        assert_eq!((s.families[0].block_size, s.families[0].capacity), (24, 256));
        assert_eq!(pool_cond(&s, "Ready"), ("True", "Serving"));
        assert_eq!(pool_cond(&s, "Invalid"), ("False", "Valid"));
        assert_eq!(pool_cond(&s, "Exhausted"), ("False", "FreeBlocks"));
        assert!(!s.conditions.iter().any(|c| c.type_ == "RemovalRefused"));
        assert!(pool_notices(&Default::default(), &s, "a").is_empty());
    }

    #[test]
    fn a_disabled_pool_is_not_ready() {
        let s = pool_status(&pool(true, None), &report(3, 253), &at(10));
        assert_eq!(pool_cond(&s, "Ready"), ("False", "Disabled"));
    }

    #[test]
    fn an_invalid_pool_says_why_once() {
        let mut r = report(0, 256);
        r.invalid = Some("overlaps pool b (10.244.0.0/16)".into());
        let s = pool_status(&pool(false, None), &r, &at(10));
        assert_eq!(pool_cond(&s, "Invalid"), ("True", "InvalidSpec"));
        assert_eq!(pool_cond(&s, "Ready"), ("False", "InvalidSpec"));
        let notices = pool_notices(&Default::default(), &s, "a");
        assert_eq!(notices.len(), 1);
        assert_eq!(
            (notices[0].reason.as_str(), notices[0].note.as_str()),
            ("InvalidSpec", "overlaps pool b (10.244.0.0/16)")
        );
        assert!(pool_notices(&s, &s, "a").is_empty());
    }

    #[test]
    fn exhaustion_and_a_refused_removal_are_events_when_they_start() {
        let mut r = report(256, 0);
        r.retired = vec![net("10.245.0.0/24")];
        let s = pool_status(&pool(false, None), &r, &at(10));
        assert_eq!(pool_cond(&s, "Exhausted"), ("True", "NoFreeBlock"));
        assert_eq!(pool_cond(&s, "RemovalRefused"), ("True", "CIDRInUse"));
        let reasons: Vec<String> = pool_notices(&Default::default(), &s, "a").into_iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["NoFreeBlock", "CIDRInUse"]);
        let again = pool_status(&pool(false, Some(s.clone())), &r, &at(20));
        assert_eq!(again, s, "an unchanged pool status compares equal");
        assert!(pool_notices(&s, &again, "a").is_empty());
    }

    fn dynamic(blocks: &[&str]) -> Assignment {
        Assignment {
            mode: Some(PoolMode::VNet),
            allocation: Some(carve_crds::BlockAllocation {
                strategy: AllocationStrategy::Dynamic,
                ..Default::default()
            }),
            ..carved(blocks)
        }
    }

    #[test]
    fn dynamic_status_names_unmet_requests_refused_releases_and_the_scaler() {
        let mut a = dynamic(&["10.10.0.0/28"]);
        let ok = nnc_status(&a, &[], None, None, &Default::default(), &at(1));
        assert_eq!(cond(&ok, "RequestsMet").status, "True");
        assert_eq!(
            ok.scaler.as_ref().map(|s| (s.request_threshold_percent, s.release_threshold_percent)),
            Some((50, 150))
        );
        assert_eq!(ok.blocks[0].gateway, None, "VNet blocks have no gateway address");
        assert_eq!(ok.blocks[0].allocation_id.as_deref(), Some("id0"));
        a.unmet.push(crate::index::Unmet::AboveMaximum {
            field: "spec.requestedIPs.ipv4".into(),
            family: IpFamily::IPv4,
            wanted: 300,
            usable: 256,
            max: 16,
            pool: "a".into(),
        });
        a.release_problems.push(crate::index::ReleaseProblem::NotHeld { cidr: net("10.99.0.0/28") });
        let short = nnc_status(&a, &[], None, None, &ok, &at(2));
        let c = cond(&short, "RequestsMet");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "AboveMaximum"));
        assert!(c.message.contains("maxBlocksPerNode") && c.message.contains("spec.releases"), "{}", c.message);
        let notices = nnc_notices("node-a", &a, &[], &ok);
        assert_eq!(notices.iter().map(|n| n.reason.as_str()).collect::<Vec<_>>(), ["AboveMaximum", "ReleaseRefused"]);
        assert!(nnc_notices("node-a", &a, &[], &short).is_empty(), "said once");
    }

    #[test]
    fn a_node_address_that_appears_inside_a_held_block_is_a_conflict_once_known_at_grant_it_is_not() {
        let mut a = dynamic(&["10.224.0.0/28"]);
        a.reserved = vec!["10.224.0.4".parse().unwrap()];
        a.foreign = vec![crate::index::ForeignAddress { ip: "10.224.0.4".parse().unwrap(), node: "n2".into() }];
        let first = nnc_status(&a, &[], None, None, &Default::default(), &at(1));
        assert!(first.address_conflicts.is_empty(), "known when the block was granted: withheld only");
        let mut late = a.clone();
        late.reserved.push("10.224.0.9".parse().unwrap());
        late.foreign.push(crate::index::ForeignAddress { ip: "10.224.0.9".parse().unwrap(), node: "late".into() });
        let second = nnc_status(&late, &[], None, None, &first, &at(2));
        assert_eq!(second.address_conflicts, [AddressConflict { ip: "10.224.0.9".into(), node: "late".into() }]);
        assert_eq!(cond(&second, "AddressConflict").status, "True");
        assert_eq!(new_conflicts(&first, &second).len(), 1);
        let third = nnc_status(&late, &[], None, None, &second, &at(3));
        assert_eq!(third.address_conflicts, second.address_conflicts, "kept while it lasts");
        assert!(new_conflicts(&second, &third).is_empty());
        let gone = nnc_status(&a, &[], None, None, &third, &at(4));
        assert_eq!(cond(&gone, "AddressConflict").status, "False");
    }
}
