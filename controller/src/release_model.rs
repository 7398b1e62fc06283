//! A model test of the release handshake: the index (as the controller uses
//! it) and a model agent (as carve-agent and carve-ipam follow the protocol)
//! over a model API object with a resourceVersion. For any interleaving of
//! pod starts and stops, agent syncs, releases, take-backs, controller reads
//! and writes (each write fenced by the resourceVersion when it honours a
//! release), controller restarts and the clock, no pod address comes from a
//! block outside the node's status, and no block is in two nodes' status.

use std::collections::{BTreeMap, BTreeSet};

use carve_crds::net::IpFamily;
use carve_crds::{AllocationStrategy, BlockAllocation, PoolMode};
use ipnet::IpNet;
use proptest::prelude::*;

use crate::index::{Assignment, Index, NodeView, PoolView, Request};
use crate::selector::Selector;

const NODES: usize = 2;
/// Addresses per /28 block the model's pods use (no reserved ones: not under test here).
const BLOCK_ADDRESSES: u32 = 16;

#[derive(Debug, Clone, Default)]
struct Nnc {
    rv: u64,
    requested: u64,
    releases: Vec<(String, String)>,
    grants: Vec<(IpNet, String)>,
    quarantined: Vec<(IpNet, String, i64)>,
}

#[derive(Debug, Clone, Default)]
struct Agent {
    /// The status blocks as the agent last read them, and at which resourceVersion.
    view: Vec<(IpNet, String)>,
    seen_rv: u64,
    pods: BTreeMap<IpNet, u32>,
    releasing: BTreeSet<IpNet>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// A pod on the node, in the `k`-th block with room (carve-ipam prefers the oldest; any order must be safe).
    PodStart(usize, usize),
    PodStop(usize),
    AgentSync(usize),
    Release(usize),
    TakeBack(usize),
    ControllerRead(usize),
    ControllerWrite(usize),
    Restart,
    Tick,
}

fn step() -> impl Strategy<Value = Step> {
    let node = 0..NODES;
    prop_oneof![
        4 => (node.clone(), 0..4usize).prop_map(|(n, k)| Step::PodStart(n, k)),
        3 => node.clone().prop_map(Step::PodStop),
        3 => node.clone().prop_map(Step::AgentSync),
        2 => node.clone().prop_map(Step::Release),
        1 => node.clone().prop_map(Step::TakeBack),
        3 => node.clone().prop_map(Step::ControllerRead),
        3 => node.prop_map(Step::ControllerWrite),
        1 => Just(Step::Restart),
        1 => Just(Step::Tick),
    ]
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

fn pool() -> PoolView {
    PoolView {
        name: "dyn".into(),
        created: "1".into(),
        mode: PoolMode::VNet,
        cidrs: vec!["10.10.0.0/26".into()],
        block_v4: Some(28),
        block_v6: None,
        exclusions: vec![],
        disabled: false,
        selector: Ok(Selector::default()),
        allocation: BlockAllocation {
            strategy: AllocationStrategy::Dynamic,
            release_quarantine_seconds: Some(15),
            ..Default::default()
        },
    }
}

struct World {
    api: Vec<Nnc>,
    agents: Vec<Agent>,
    index: Index,
    /// A controller reconcile between its read and its write: the
    /// resourceVersion it read and what it decided.
    pending: Vec<Option<(u64, Assignment)>>,
    now: i64,
}

impl World {
    fn new() -> Self {
        let mut index = Index::default();
        index.set_pools(vec![pool()]);
        World {
            api: vec![Nnc::default(); NODES],
            agents: vec![Agent::default(); NODES],
            index,
            pending: vec![None; NODES],
            now: 0,
        }
    }

    fn node(i: usize) -> NodeView {
        NodeView { name: name(i), uid: format!("uid-{i}"), ..Default::default() }
    }

    fn demand(&self, i: usize) -> u64 {
        self.agents[i].pods.values().map(|&n| u64::from(n)).sum()
    }

    /// The agent's apply of its spec; the response shows the whole object,
    /// status included, at the new resourceVersion.
    fn write_spec(&mut self, i: usize) {
        let requested = self.demand(i) + u64::from(BLOCK_ADDRESSES / 2);
        let nnc = &mut self.api[i];
        nnc.requested = requested;
        nnc.rv += 1;
        self.agents[i].view = nnc.grants.clone();
        self.agents[i].seen_rv = nnc.rv;
    }

    fn run(&mut self, s: Step) {
        match s {
            Step::PodStart(i, k) => {
                let agent = &self.agents[i];
                let room: Vec<IpNet> = agent
                    .view
                    .iter()
                    .map(|(b, _)| *b)
                    .filter(|b| {
                        !agent.releasing.contains(b) && agent.pods.get(b).copied().unwrap_or(0) < BLOCK_ADDRESSES
                    })
                    .collect();
                let block = (!room.is_empty()).then(|| room[k % room.len()]);
                if let Some(block) = block {
                    // Invariant: an address only from a block the node's status holds.
                    assert!(
                        self.api[i].grants.iter().any(|(b, _)| *b == block),
                        "{} allocated from {block}, not in its status {:?}",
                        name(i),
                        self.api[i].grants
                    );
                    *self.agents[i].pods.entry(block).or_default() += 1;
                }
            }
            Step::PodStop(i) => {
                if let Some((&block, n)) = self.agents[i].pods.iter_mut().find(|(_, n)| **n > 0) {
                    *n -= 1;
                    let _ = block;
                }
            }
            Step::AgentSync(i) => {
                let nnc = &self.api[i];
                let agent = &mut self.agents[i];
                agent.view = nnc.grants.clone();
                agent.seen_rv = nnc.rv;
                // A block gone from status takes its mark (and spec entry) with it.
                let held: BTreeSet<IpNet> = agent.view.iter().map(|(b, _)| *b).collect();
                agent.releasing.retain(|b| held.contains(b));
                let released: Vec<(String, String)> =
                    nnc.releases.iter().filter(|(c, _)| held.contains(&c.parse::<IpNet>().unwrap())).cloned().collect();
                self.api[i].releases = released;
                self.write_spec(i);
            }
            Step::Release(i) => {
                let agent = &self.agents[i];
                let active: Vec<&(IpNet, String)> =
                    agent.view.iter().filter(|(b, _)| !agent.releasing.contains(b)).collect();
                let free = active.len() as u64 * u64::from(BLOCK_ADDRESSES) - self.demand(i);
                if active.len() < 2 || free <= u64::from(BLOCK_ADDRESSES) * 3 / 2 {
                    return;
                }
                let Some((block, id)) = active
                    .iter()
                    .rev()
                    .find(|(b, _)| agent.pods.get(b).copied().unwrap_or(0) == 0)
                    .map(|g| (**g).clone())
                else {
                    return;
                };
                // Marked under the store's lock first, then named in spec.
                self.agents[i].releasing.insert(block);
                self.api[i].releases.push((block.to_string(), id));
                self.write_spec(i);
            }
            Step::TakeBack(i) => {
                let Some(&block) = self.agents[i].releasing.iter().next() else { return };
                // Conditioned on the resourceVersion at which the agent saw the block in status.
                if self.api[i].rv != self.agents[i].seen_rv || !self.agents[i].view.iter().any(|(b, _)| *b == block) {
                    return; // 409: the controller moved first
                }
                self.api[i].releases.retain(|(c, _)| *c != block.to_string());
                self.api[i].rv += 1;
                self.agents[i].seen_rv = self.api[i].rv;
                self.agents[i].releasing.remove(&block);
            }
            Step::ControllerRead(i) => {
                let nnc = &self.api[i];
                let request = Request { ips: [(IpFamily::IPv4, nnc.requested)].into(), releases: nnc.releases.clone() };
                let (a, _) = self.index.assign(&Self::node(i), &request, self.now);
                self.pending[i] = Some((nnc.rv, a));
            }
            Step::ControllerWrite(i) => {
                let Some((rv, a)) = self.pending[i].take() else { return };
                if !a.released.is_empty() && rv != self.api[i].rv {
                    return; // the fenced write fails with 409; the next reconcile reads again
                }
                let nnc = &mut self.api[i];
                nnc.grants = a.grants.iter().map(|g| (g.block, g.id.clone())).collect();
                nnc.quarantined = a.quarantined.iter().map(|q| (q.block, q.id.clone(), q.until)).collect();
                nnc.rv += 1;
                self.index.commit(&name(i), &a);
            }
            Step::Restart => {
                let mut index = Index::default();
                index.set_pools(vec![pool()]);
                for (i, nnc) in self.api.iter().enumerate() {
                    let recorded: Vec<(String, Option<String>, Option<i64>)> = nnc
                        .grants
                        .iter()
                        .map(|(b, id)| (b.to_string(), Some(id.clone()), None))
                        .chain(
                            nnc.quarantined
                                .iter()
                                .map(|(b, id, until)| (b.to_string(), Some(id.clone()), Some(*until))),
                        )
                        .collect();
                    assert!(index.observe(&name(i), &format!("uid-{i}"), Some("dyn"), &recorded).is_empty());
                }
                self.index = index;
                self.pending = vec![None; NODES];
            }
            Step::Tick => self.now += 10,
        }
        self.check();
    }

    fn check(&self) {
        let mut owner: BTreeMap<IpNet, usize> = BTreeMap::new();
        for (i, nnc) in self.api.iter().enumerate() {
            for b in nnc.grants.iter().map(|(b, _)| *b).chain(nnc.quarantined.iter().map(|(b, _, _)| *b)) {
                if let Some(other) = owner.insert(b, i) {
                    panic!("{b} in the status of {} and {}", name(other), name(i));
                }
            }
        }
        for (i, agent) in self.agents.iter().enumerate() {
            for (block, n) in agent.pods.iter().filter(|(_, n)| **n > 0) {
                assert!(
                    self.api[i].grants.iter().any(|(b, _)| b == block),
                    "{} has {n} pods in {block}, which left its status {:?}",
                    name(i),
                    self.api[i].grants
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn no_interleaving_loses_a_pod_address_or_shares_a_block(steps in prop::collection::vec(step(), 1..200)) {
        let mut world = World::new();
        for s in steps {
            world.run(s);
        }
    }
}

#[test]
fn the_handshake_gives_a_block_back_and_a_take_back_beats_a_stale_removal() {
    let mut w = World::new();
    use Step::*;
    for s in [ControllerRead(0), ControllerWrite(0), AgentSync(0)] {
        w.run(s);
    }
    for _ in 0..14 {
        w.run(PodStart(0, 0));
    }
    // 14 pods + 8 headroom: a second block.
    for s in [AgentSync(0), ControllerRead(0), ControllerWrite(0), AgentSync(0)] {
        w.run(s);
    }
    assert_eq!(w.api[0].grants.len(), 2);
    for _ in 0..14 {
        w.run(PodStop(0));
    }
    // A third block would be needed for nothing; with 0 pods, 32 free > 24: give the newest back.
    w.run(AgentSync(0));
    w.run(Release(0));
    assert_eq!(w.api[0].releases.len(), 1);
    // The controller reads the release, the agent takes it back first: the fenced write fails.
    w.run(ControllerRead(0));
    w.run(TakeBack(0));
    w.run(ControllerWrite(0));
    assert_eq!(w.api[0].grants.len(), 2, "the take-back won");
    // Released for real this time, quarantined, then free after 15 s.
    w.run(Release(0));
    w.run(ControllerRead(0));
    w.run(ControllerWrite(0));
    assert_eq!((w.api[0].grants.len(), w.api[0].quarantined.len()), (1, 1));
    for s in [Tick, Tick, ControllerRead(0), ControllerWrite(0)] {
        w.run(s);
    }
    assert!(w.api[0].quarantined.is_empty());
}
