//! Block allocation for one pool: a bitmap per pool CIDR indexed by block
//! number, as kube-controller-manager's cidrset does. No Kubernetes types.
//!
//! ```text
//!   PoolBlocks (one PodCIDR)
//!     IPv4: [CidrBlocks 10.244.0.0/16 /24] [CidrBlocks 10.245.0.0/16 /24] ...
//!     IPv6: [CidrBlocks fd12:3456:789a::/64 /80]
//!   CidrBlocks: used bitmap + reserved bitmap + hint of the lowest maybe-free word
//! ```
//!
//! Allocation takes the lowest free block. The hint makes sequential
//! allocation O(1) amortised; a release moves the hint back.
//!
//! VNet reserved addresses (Azure's first four and last of every subnet) and
//! Node addresses are not the allocator's business: blocks holding them are
//! handed out like any other, and the index withholds those addresses from
//! pods (`reservedIPs` in NNC status), so a /24 yields 251 pod addresses as on
//! Azure instead of losing two whole blocks.

use std::collections::BTreeMap;

use carve_crds::net::{IpFamily, from_u128, overlaps, to_u128};
use ipnet::IpNet;

/// Blocks beyond this many per CIDR are not used: 4M blocks is more nodes than
/// any cluster has, and keeps a bitmap for a huge IPv6 CIDR at 512 KiB.
pub const MAX_BLOCKS_PER_CIDR: u64 = 1 << 22;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OccupyError {
    #[error("{block} is not a /{want} block of {cidr}")]
    WrongSize { block: IpNet, cidr: IpNet, want: u8 },
    #[error("{block} lies outside every CIDR of the pool")]
    OutsidePool { block: IpNet },
    #[error("{block} is already allocated")]
    AlreadyAllocated { block: IpNet },
    #[error("{block} is reserved (it overlaps spec.exclusions)")]
    Reserved { block: IpNet },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap { words: vec![0; bits.div_ceil(64) as usize] }
    }
    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64) {
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }
}

/// The blocks of one CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrBlocks {
    cidr: IpNet,
    block_prefix: u8,
    count: u64,
    /// Allocated or reserved: a set bit is never handed out.
    taken: Bitmap,
    reserved: Bitmap,
    reserved_count: u64,
    allocated: u64,
    /// No word below this one has a free bit.
    hint: usize,
    /// False for a CIDR removed from the spec that still holds blocks: it keeps
    /// them but hands out no new one.
    accepting: bool,
}

impl CidrBlocks {
    /// `block_prefix` must be valid for `cidr` (see `carve_crds::net::check_block_size`).
    pub fn new(cidr: IpNet, block_prefix: u8) -> Self {
        assert!(block_prefix >= cidr.prefix_len() && block_prefix <= IpFamily::of(&cidr).bits());
        let span = block_prefix - cidr.prefix_len();
        let count = if span >= 22 { MAX_BLOCKS_PER_CIDR } else { (1u64 << span).min(MAX_BLOCKS_PER_CIDR) };
        CidrBlocks {
            cidr,
            block_prefix,
            count,
            taken: Bitmap::new(count),
            reserved: Bitmap::new(count),
            reserved_count: 0,
            allocated: 0,
            hint: 0,
            accepting: true,
        }
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.cidr)
    }

    fn shift(&self) -> u8 {
        self.family().bits() - self.block_prefix
    }

    fn block_at(&self, index: u64) -> IpNet {
        let base = to_u128(self.cidr.network());
        let addr = from_u128(self.family(), base + ((index as u128) << self.shift()));
        IpNet::new(addr, self.block_prefix).expect("prefix is valid for the family")
    }

    /// The block index of `block`, if it is one of this CIDR's usable blocks.
    fn index_of(&self, block: &IpNet) -> Option<u64> {
        if IpFamily::of(block) != self.family() || !self.cidr.contains(&block.network()) {
            return None;
        }
        let offset = (to_u128(block.network()) - to_u128(self.cidr.network())) >> self.shift();
        (offset < self.count as u128).then_some(offset as u64)
    }

    /// Marks every block overlapping `range` as reserved (never handed out).
    pub fn reserve_overlapping(&mut self, range: &IpNet) {
        if IpFamily::of(range) != self.family() || !overlaps(range, &self.cidr) {
            return;
        }
        // Clamp the range to the CIDR, then walk the blocks it touches.
        let lo = to_u128(range.network()).max(to_u128(self.cidr.network()));
        let hi = to_u128(range.broadcast()).min(to_u128(self.cidr.broadcast()));
        let base = to_u128(self.cidr.network());
        let first = (lo - base) >> self.shift();
        let last = ((hi - base) >> self.shift()).min(self.count as u128 - 1);
        for i in first..=last {
            self.reserve_index(i as u64);
        }
    }

    fn reserve_index(&mut self, i: u64) {
        if self.reserved.get(i) {
            return;
        }
        if self.taken.get(i) {
            // Already allocated: it stays with its owner, but is not handed out again after release.
            self.allocated -= 1;
        }
        self.reserved.set(i);
        self.taken.set(i);
        self.reserved_count += 1;
    }

    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting
    }

    /// Hands out the lowest free block.
    pub fn allocate(&mut self) -> Option<IpNet> {
        if !self.accepting {
            return None;
        }
        while self.hint < self.taken.words.len() {
            let word = self.taken.words[self.hint];
            if word != u64::MAX {
                let i = self.hint as u64 * 64 + (!word).trailing_zeros() as u64;
                if i >= self.count {
                    break;
                }
                self.taken.set(i);
                self.allocated += 1;
                return Some(self.block_at(i));
            }
            self.hint += 1;
        }
        None
    }

    /// Records `block` as allocated (rebuilding from what the API recorded).
    pub fn occupy(&mut self, block: &IpNet) -> Result<(), OccupyError> {
        if block.prefix_len() != self.block_prefix || block.network() != block.addr() {
            return Err(OccupyError::WrongSize { block: *block, cidr: self.cidr, want: self.block_prefix });
        }
        let i = self.index_of(block).ok_or(OccupyError::OutsidePool { block: *block })?;
        if self.reserved.get(i) {
            return Err(OccupyError::Reserved { block: *block });
        }
        if self.taken.get(i) {
            return Err(OccupyError::AlreadyAllocated { block: *block });
        }
        self.taken.set(i);
        self.allocated += 1;
        Ok(())
    }

    /// Returns `block` to the free set; false if it was not allocated here.
    pub fn release(&mut self, block: &IpNet) -> bool {
        let Some(i) = self.index_of(block) else { return false };
        if block.prefix_len() != self.block_prefix || self.reserved.get(i) || !self.taken.get(i) {
            return false;
        }
        self.taken.clear(i);
        self.allocated -= 1;
        self.hint = self.hint.min((i / 64) as usize);
        true
    }

    /// Whether `block` is one of this CIDR's blocks (allocated or not).
    pub fn holds(&self, block: &IpNet) -> bool {
        block.prefix_len() == self.block_prefix && self.index_of(block).is_some()
    }

    pub fn capacity(&self) -> u64 {
        self.count - self.reserved_count
    }

    /// Allocated blocks, lowest first.
    pub fn allocated_blocks(&self) -> impl Iterator<Item = IpNet> + '_ {
        (0..self.count).filter(|&i| self.taken.get(i) && !self.reserved.get(i)).map(|i| self.block_at(i))
    }

    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    pub fn free(&self) -> u64 {
        if self.accepting { self.capacity() - self.allocated } else { 0 }
    }
}

/// Blocks counts of one family of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub capacity: u64,
    pub allocated: u64,
    pub free: u64,
}

/// Everything a pool needs to build its allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    pub cidrs: Vec<IpNet>,
    pub block_prefix_v4: u8,
    pub block_prefix_v6: u8,
    pub exclusions: Vec<IpNet>,
}

impl PoolLayout {
    pub fn block_prefix(&self, family: IpFamily) -> u8 {
        match family {
            IpFamily::IPv4 => self.block_prefix_v4,
            IpFamily::IPv6 => self.block_prefix_v6,
        }
    }
}

/// All CIDRs of one pool, per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolBlocks {
    layout: PoolLayout,
    families: BTreeMap<IpFamily, Vec<CidrBlocks>>,
}

impl PoolBlocks {
    pub fn new(layout: PoolLayout) -> Self {
        let mut families: BTreeMap<IpFamily, Vec<CidrBlocks>> = BTreeMap::new();
        for cidr in &layout.cidrs {
            let family = IpFamily::of(cidr);
            let blocks = Self::cidr_blocks(&layout, *cidr);
            families.entry(family).or_default().push(blocks);
        }
        PoolBlocks { layout, families }
    }

    fn cidr_blocks(layout: &PoolLayout, cidr: IpNet) -> CidrBlocks {
        let mut blocks = CidrBlocks::new(cidr, layout.block_prefix(IpFamily::of(&cidr)));
        for excluded in &layout.exclusions {
            blocks.reserve_overlapping(excluded);
        }
        blocks
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    /// Keeps a CIDR that left the spec but still holds `blocks`: they stay
    /// allocated, no new block comes from it. Returns the blocks it cannot
    /// count (now reserved, or of another block size), and why.
    pub fn retain_retired(&mut self, cidr: IpNet, blocks: &[IpNet]) -> Vec<(IpNet, OccupyError)> {
        let mut retired = Self::cidr_blocks(&self.layout, cidr);
        retired.set_accepting(false);
        let refused = blocks.iter().filter_map(|b| retired.occupy(b).err().map(|e| (*b, e))).collect();
        self.families.entry(IpFamily::of(&cidr)).or_default().push(retired);
        refused
    }

    /// Families served, IPv4 first.
    pub fn families(&self) -> Vec<IpFamily> {
        self.families.iter().filter(|(_, c)| c.iter().any(|b| b.is_accepting())).map(|(f, _)| *f).collect()
    }

    pub fn allocate(&mut self, family: IpFamily) -> Option<IpNet> {
        self.families.get_mut(&family)?.iter_mut().find_map(|c| c.allocate())
    }

    pub fn occupy(&mut self, block: &IpNet) -> Result<(), OccupyError> {
        let cidrs = self.families.get_mut(&IpFamily::of(block)).ok_or(OccupyError::OutsidePool { block: *block })?;
        let owner = cidrs.iter_mut().find(|c| c.cidr().contains(&block.network()));
        owner.ok_or(OccupyError::OutsidePool { block: *block })?.occupy(block)
    }

    pub fn release(&mut self, block: &IpNet) -> bool {
        self.families.get_mut(&IpFamily::of(block)).is_some_and(|cidrs| cidrs.iter_mut().any(|c| c.release(block)))
    }

    /// Whether `block` is a block of one of the pool's CIDRs.
    pub fn holds(&self, block: &IpNet) -> bool {
        self.families.get(&IpFamily::of(block)).is_some_and(|cidrs| cidrs.iter().any(|c| c.holds(block)))
    }

    /// Whether any CIDR of the pool overlaps `net` (for adoption and overlap checks).
    pub fn covers(&self, net: &IpNet) -> bool {
        self.families.get(&IpFamily::of(net)).is_some_and(|cidrs| cidrs.iter().any(|c| overlaps(&c.cidr(), net)))
    }

    /// Allocated blocks of every CIDR, IPv4 first.
    pub fn allocated_blocks(&self) -> Vec<IpNet> {
        self.families.values().flatten().flat_map(|c| c.allocated_blocks()).collect()
    }

    pub fn usage(&self, family: IpFamily) -> Usage {
        let mut u = Usage::default();
        for c in self.families.get(&family).into_iter().flatten() {
            u.capacity += if c.is_accepting() { c.capacity() } else { c.allocated() };
            u.allocated += c.allocated();
            u.free += c.free();
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn overlay(cidrs: &[&str]) -> PoolLayout {
        PoolLayout {
            cidrs: cidrs.iter().map(|c| net(c)).collect(),
            block_prefix_v4: 24,
            block_prefix_v6: 80,
            exclusions: vec![],
        }
    }

    #[test]
    fn overlay_hands_out_blocks_in_order() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/16"]));
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.244.0.0/24")));
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.244.1.0/24")));
        assert_eq!(pool.usage(IpFamily::IPv4), Usage { capacity: 256, allocated: 2, free: 254 });
        assert_eq!(pool.allocate(IpFamily::IPv6), None);
    }

    #[test]
    fn released_block_is_reused_first() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/16"]));
        let blocks: Vec<_> = (0..5).map(|_| pool.allocate(IpFamily::IPv4).unwrap()).collect();
        assert!(pool.release(&blocks[1]));
        assert!(!pool.release(&blocks[1]), "double release is refused");
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(blocks[1]));
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.244.5.0/24")));
    }

    #[test]
    fn exhaustion_then_growth() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/23"]));
        assert!(pool.allocate(IpFamily::IPv4).is_some());
        assert!(pool.allocate(IpFamily::IPv4).is_some());
        assert_eq!(pool.allocate(IpFamily::IPv4), None);
        let mut grown = PoolBlocks::new(overlay(&["10.244.0.0/23", "10.250.0.0/24"]));
        grown.occupy(&net("10.244.0.0/24")).unwrap();
        grown.occupy(&net("10.244.1.0/24")).unwrap();
        assert_eq!(grown.allocate(IpFamily::IPv4), Some(net("10.250.0.0/24")));
    }

    #[test]
    fn blocks_holding_azure_reserved_addresses_are_handed_out() {
        // The index withholds the addresses; every /28 of a /24 is a block.
        let layout = PoolLayout { block_prefix_v4: 28, ..overlay(&["10.224.0.0/24"]) };
        let mut pool = PoolBlocks::new(layout);
        assert_eq!(pool.usage(IpFamily::IPv4).capacity, 16);
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.224.0.0/28")));
    }

    #[test]
    fn exclusions_are_never_handed_out() {
        let layout = PoolLayout { exclusions: vec![net("10.244.0.0/23")], ..overlay(&["10.244.0.0/22"]) };
        let mut pool = PoolBlocks::new(layout);
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.244.2.0/24")));
        assert_eq!(pool.usage(IpFamily::IPv4).capacity, 2);
    }

    #[test]
    fn occupy_checks_size_range_and_duplicates() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/16"]));
        assert!(matches!(pool.occupy(&net("10.244.3.0/25")), Err(OccupyError::WrongSize { .. })));
        assert!(matches!(pool.occupy(&net("10.9.3.0/24")), Err(OccupyError::OutsidePool { .. })));
        pool.occupy(&net("10.244.3.0/24")).unwrap();
        assert!(matches!(pool.occupy(&net("10.244.3.0/24")), Err(OccupyError::AlreadyAllocated { .. })));
        assert_eq!(pool.allocate(IpFamily::IPv4), Some(net("10.244.0.0/24")));
    }

    #[test]
    fn dual_stack_pool_serves_both_families() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/16", "fd12:3456:789a::/64"]));
        assert_eq!(pool.families(), [IpFamily::IPv4, IpFamily::IPv6]);
        assert_eq!(pool.allocate(IpFamily::IPv6), Some(net("fd12:3456:789a::/80")));
        assert_eq!(pool.allocate(IpFamily::IPv6), Some(net("fd12:3456:789a:0:1::/80")));
        assert_eq!(pool.usage(IpFamily::IPv6).capacity, 65536);
    }

    #[test]
    fn huge_ipv6_cidr_is_capped() {
        let pool = PoolBlocks::new(overlay(&["fd00::/48"]));
        assert_eq!(pool.usage(IpFamily::IPv6).capacity, MAX_BLOCKS_PER_CIDR);
    }

    #[test]
    fn retired_cidr_keeps_its_blocks_but_serves_no_new_one() {
        let mut pool = PoolBlocks::new(overlay(&["10.244.0.0/23"]));
        pool.retain_retired(net("10.250.0.0/24"), &[net("10.250.0.0/24")]);
        assert!(pool.holds(&net("10.250.0.0/24")));
        pool.allocate(IpFamily::IPv4).unwrap();
        pool.allocate(IpFamily::IPv4).unwrap();
        assert_eq!(pool.allocate(IpFamily::IPv4), None);
        assert_eq!(pool.usage(IpFamily::IPv4), Usage { capacity: 3, allocated: 3, free: 0 });
    }
}
