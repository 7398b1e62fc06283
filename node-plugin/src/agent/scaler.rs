//! The dynamic pool's scaler: pure, no kube, no files. Per family, from the
//! node's blocks and its demand, it decides what to ask the controller for and
//! which block (at most one) to give back.
//!
//! With `B` addresses per block, `demand` = addresses allocated in the IPAM
//! store plus ADDs waiting for a block, `usable` = the addresses pods may get
//! in the blocks the node is not giving back, `free = usable − demand`:
//!
//! - **request**: `requestedIPs = demand + ⌈B × request%⌉`; the controller
//!   grants while the node's usable addresses are below it, i.e. while
//!   `free < ⌈B × request%⌉`;
//! - **release**: an empty block (no allocation in it), newest first, never the
//!   family's last, and only while `free > B × release%` and, after it goes,
//!   `free` still covers the request margin. As `release% ≥ request% + 100`,
//!   a release never causes a request and a grant never a release: a steady
//!   demand does not flap. Releases count `free` against the highest demand
//!   of the last [`RELEASE_STABILIZATION`] (as the HorizontalPodAutoscaler's
//!   scale-down window does): in a burst, ADDs told to try again later leave
//!   no marker until the runtime retries, and that dip gives nothing back;
//! - **take back**: a block being given back that the node needs again (the
//!   others no longer cover the request margin), newest first, instead of
//!   asking for a new one.

use std::time::Duration;

use carve_crds::{BlockAllocation, IpFamily, Scaler};
use ipnet::IpNet;

/// How long a demand peak holds releases back (see the module docs).
pub const RELEASE_STABILIZATION: Duration = Duration::from_secs(30);

/// The thresholds the node follows (status.scaler, else the pool defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub request_threshold_percent: u32,
    pub release_threshold_percent: u32,
}

impl Params {
    pub fn from_status(scaler: Option<&Scaler>) -> Self {
        let allocation = BlockAllocation {
            request_threshold_percent: scaler.map(|s| s.request_threshold_percent),
            release_threshold_percent: scaler.map(|s| s.release_threshold_percent),
            ..Default::default()
        };
        // The same defaults and floor (release ≥ request + 100) as the controller's.
        Params {
            request_threshold_percent: allocation.request_threshold_percent(),
            release_threshold_percent: allocation.release_threshold_percent(),
        }
    }

    /// Free addresses below which the node asks for more: `⌈B × request%⌉`.
    pub fn request_margin(&self, block_size: u64) -> u64 {
        (u128::from(block_size) * u128::from(self.request_threshold_percent))
            .div_ceil(100)
            .try_into()
            .unwrap_or(u64::MAX)
    }

    /// Whether `free` addresses are more than `release%` of a block.
    fn above_release(&self, free: u64, block_size: u64) -> bool {
        u128::from(free) * 100 > u128::from(block_size) * u128::from(self.release_threshold_percent)
    }
}

/// One block of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockUse {
    pub cidr: IpNet,
    /// Addresses a pod may get in it (its size less the reserved ones).
    pub usable: u64,
    /// Addresses allocated in it.
    pub allocated: u64,
}

/// One family of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyUse {
    pub family: IpFamily,
    /// Addresses per block (`B`).
    pub block_size: u64,
    /// Blocks pods get addresses from, in grant order (oldest first).
    pub active: Vec<BlockUse>,
    /// Blocks being given back, still in status, in grant order.
    pub releasing: Vec<BlockUse>,
    /// Allocated addresses plus waiting ADDs.
    pub demand: u64,
    /// The highest demand of the last [`RELEASE_STABILIZATION`] before this one.
    pub recent_peak: u64,
}

impl FamilyUse {
    pub fn usable(&self) -> u64 {
        self.active.iter().map(|b| b.usable).sum()
    }

    pub fn free(&self) -> u64 {
        self.usable().saturating_sub(self.demand)
    }
}

/// What one family needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: IpFamily,
    /// spec.requestedIPs of the family.
    pub requested: u64,
    /// A block to give back.
    pub release: Option<IpNet>,
    /// A block being given back the node needs again.
    pub take_back: Option<IpNet>,
}

/// The scaler's decision for one family (see the module docs).
pub fn plan(params: &Params, f: &FamilyUse) -> FamilyPlan {
    let margin = params.request_margin(f.block_size);
    let requested = f.demand.saturating_add(margin);
    let free = f.free();
    let mut out = FamilyPlan { family: f.family, requested, release: None, take_back: None };
    if free < margin {
        out.take_back = f.releasing.last().map(|b| b.cidr);
        return out;
    }
    let release_free = f.usable().saturating_sub(f.demand.max(f.recent_peak));
    if f.active.len() >= 2 && params.above_release(release_free, f.block_size) {
        out.release = f
            .active
            .iter()
            .rev()
            .find(|b| b.allocated == 0 && release_free.saturating_sub(b.usable) >= margin)
            .map(|b| b.cidr);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u64 = 16;

    fn params() -> Params {
        Params::from_status(None)
    }

    fn block(i: usize, usable: u64, allocated: u64) -> BlockUse {
        let cidr = IpNet::new(carve_crds::net::from_u128(IpFamily::IPv4, 0x0a01_0000 + 16 * i as u128), 28).unwrap();
        BlockUse { cidr, usable, allocated }
    }

    fn family(active: Vec<BlockUse>, releasing: Vec<BlockUse>, demand: u64) -> FamilyUse {
        FamilyUse { family: IpFamily::IPv4, block_size: B, active, releasing, demand, recent_peak: 0 }
    }

    #[test]
    fn defaults_follow_azure_and_the_floor_holds() {
        assert_eq!(params(), Params { request_threshold_percent: 50, release_threshold_percent: 150 });
        let s = Scaler { request_threshold_percent: 80, release_threshold_percent: 120, max_blocks_per_node: 4 };
        assert_eq!(Params::from_status(Some(&s)).release_threshold_percent, 180, "release ≥ request + 100");
        assert_eq!(params().request_margin(16), 8);
        assert_eq!(Params { request_threshold_percent: 33, ..params() }.request_margin(16), 6, "rounded up");
    }

    #[test]
    fn asks_for_demand_plus_half_a_block() {
        let p = plan(&params(), &family(vec![block(0, 16, 9)], vec![], 9));
        assert_eq!((p.requested, p.release, p.take_back), (17, None, None));
    }

    #[test]
    fn gives_back_the_newest_empty_block_only_above_the_release_threshold() {
        let blocks = || vec![block(0, 16, 2), block(1, 16, 0), block(2, 16, 0)];
        // free = 48 − 2 = 46 > 24: the newest empty block goes.
        assert_eq!(plan(&params(), &family(blocks(), vec![], 2)).release, Some(block(2, 16, 0).cidr));
        // free = 48 − 24 = 24: not above 150% of a block.
        assert_eq!(plan(&params(), &family(blocks(), vec![], 24)).release, None);
        // The newest is not empty: the next empty one.
        let mixed = vec![block(0, 16, 0), block(1, 16, 0), block(2, 16, 1)];
        assert_eq!(plan(&params(), &family(mixed, vec![], 1)).release, Some(block(1, 16, 0).cidr));
        // Never the last block, however empty.
        assert_eq!(plan(&params(), &family(vec![block(0, 16, 0)], vec![], 0)).release, None);
    }

    #[test]
    fn a_recent_demand_peak_holds_releases_back() {
        let blocks = || vec![block(0, 16, 2), block(1, 16, 0), block(2, 16, 0)];
        // 30 ADDs were waiting a moment ago (told to try again, not yet retried): keep the blocks.
        let dipped = FamilyUse { recent_peak: 32, ..family(blocks(), vec![], 2) };
        let p = plan(&params(), &dipped);
        assert_eq!((p.requested, p.release), (10, None), "requests follow the demand now, releases the peak");
        // A peak that would still leave more than 150% free after the release.
        let small_peak = FamilyUse { recent_peak: 6, ..family(blocks(), vec![], 2) };
        assert_eq!(plan(&params(), &small_peak).release, Some(block(2, 16, 0).cidr));
    }

    #[test]
    fn takes_back_a_block_being_given_back_when_demand_returns() {
        let f = family(vec![block(0, 16, 12)], vec![block(1, 16, 0), block(2, 16, 0)], 12);
        let p = plan(&params(), &f);
        assert_eq!((p.take_back, p.release), (Some(block(2, 16, 0).cidr), None));
        assert_eq!(plan(&params(), &family(vec![block(0, 16, 4)], vec![block(1, 16, 0)], 4)).take_back, None);
    }

    /// A node and its controller, in rounds: the agent plans, marks and
    /// takes back; the controller grants while the status blocks' usable
    /// addresses are below the request (up to `MAX` blocks) and removes
    /// released blocks after `lag` rounds. Pods take the lowest free address
    /// of the oldest active block, and leave from blocks chosen by `seed`.
    struct Model {
        /// Status blocks in grant order: (block, releasing since round).
        blocks: Vec<(BlockUse, Option<u32>)>,
        next: usize,
        waiting: u64,
        round: u32,
        reserved: Vec<u64>,
    }

    const MAX: usize = 16;

    #[derive(Debug, Default)]
    struct Events {
        grants: u32,
        releases: u32,
    }

    impl Model {
        fn new(reserved: Vec<u64>) -> Self {
            let mut m = Model { blocks: vec![], next: 0, waiting: 0, round: 0, reserved };
            m.grant();
            m
        }

        fn grant(&mut self) {
            let usable = B - self.reserved[self.next % self.reserved.len()];
            self.blocks.push((block(self.next, usable, 0), None));
            self.next += 1;
        }

        fn demand(&self) -> u64 {
            self.blocks.iter().map(|(b, _)| b.allocated).sum::<u64>() + self.waiting
        }

        fn view(&self) -> FamilyUse {
            let active = self.blocks.iter().filter(|(_, r)| r.is_none()).map(|(b, _)| b.clone()).collect();
            let releasing = self.blocks.iter().filter(|(_, r)| r.is_some()).map(|(b, _)| b.clone()).collect();
            family(active, releasing, self.demand())
        }

        /// Waiting ADDs get addresses where there is room (the runtime retries).
        fn place(&mut self) {
            for (b, _) in self.blocks.iter_mut().filter(|(_, r)| r.is_none()) {
                let room = (b.usable - b.allocated).min(self.waiting);
                b.allocated += room;
                self.waiting -= room;
            }
        }

        fn set_demand(&mut self, demand: u64, seed: u64) {
            let now = self.demand();
            if demand >= now {
                self.waiting += demand - now;
                self.place();
                return;
            }
            let mut drop = now - demand;
            let gone = drop.min(self.waiting);
            self.waiting -= gone;
            drop -= gone;
            let mut i = seed as usize;
            while drop > 0 {
                let n = self.blocks.len();
                let b = &mut self.blocks[i % n].0;
                if b.allocated > 0 {
                    b.allocated -= 1;
                    drop -= 1;
                }
                i = i.wrapping_add(1);
            }
        }

        /// One round; returns whether anything changed.
        fn step(&mut self, lag: u32, events: &mut Events) -> Result<bool, TestCaseError> {
            self.round += 1;
            let before = (self.blocks.clone(), self.waiting);
            let view = self.view();
            let p = plan(&params(), &view);
            prop_assert!(p.release.is_none() || p.take_back.is_none());
            if let Some(cidr) = p.release {
                let (b, mark) = self.blocks.iter_mut().find(|(b, _)| b.cidr == cidr).unwrap();
                prop_assert_eq!(b.allocated, 0, "released a block in use");
                prop_assert!(view.active.len() >= 2, "released the last block");
                *mark = Some(self.round);
                events.releases += 1;
            }
            if let Some(cidr) = p.take_back {
                self.blocks.iter_mut().find(|(b, _)| b.cidr == cidr).unwrap().1 = None;
            }
            // The controller: removals, then grants against what status then holds.
            let round = self.round;
            self.blocks.retain(|(_, r)| r.is_none_or(|since| round - since < lag));
            while self.blocks.iter().map(|(b, _)| b.usable).sum::<u64>() < p.requested && self.blocks.len() < MAX {
                self.grant();
                events.grants += 1;
            }
            self.place();
            Ok((self.blocks.clone(), self.waiting) != before)
        }
    }

    proptest! {
        /// For any demand sequence (held each for a few rounds, the
        /// controller lagging): never a non-empty or last block released;
        /// at one demand never both a grant and a release; and the last
        /// demand, held, converges to a state where nothing changes.
        #[test]
        fn converges_without_flapping(
            levels in proptest::collection::vec((0u64..220, 1u32..8, any::<u64>()), 1..25),
            reserved in proptest::collection::vec(0u64..4, 1..6),
            lag in 0u32..4,
        ) {
            let mut m = Model::new(reserved);
            for (demand, rounds, seed) in levels.iter().copied() {
                m.set_demand(demand, seed);
                let mut events = Events::default();
                for _ in 0..rounds {
                    m.step(lag, &mut events)?;
                }
                let mut settled = false;
                for _ in 0..40 {
                    let pending = m.blocks.iter().any(|(_, r)| r.is_some());
                    if !m.step(lag, &mut events)? && !pending {
                        settled = true;
                        break;
                    }
                }
                prop_assert!(settled, "demand {} did not settle: {:?}", demand, m.view());
                prop_assert!(events.grants == 0 || events.releases == 0, "demand {} flapped: {:?}", demand, events);
                // Settled: the demand is covered (up to the maximum) and no more than the release threshold is idle.
                let v = m.view();
                let p = plan(&params(), &v);
                prop_assert!(v.releasing.is_empty());
                if m.blocks.len() < MAX {
                    prop_assert!(v.usable() >= p.requested, "{:?}", v);
                }
                prop_assert!(p.release.is_none());
                prop_assert_eq!(m.waiting, v.demand.saturating_sub(v.usable()));
            }
        }
    }
}
