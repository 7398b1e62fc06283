//! Property tests for the block allocator.

use carve_controller::allocator::{PoolBlocks, PoolLayout};
use carve_crds::net::{IpFamily, overlaps};
use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;

/// A random IPv4 pool: a /16../24 CIDR somewhere in 10.0.0.0/8, blocks 0..8 bits longer.
fn pool_layout() -> impl Strategy<Value = PoolLayout> {
    (16u8..=24, 0u8..=8, any::<u32>(), proptest::option::of(0u8..=6)).prop_map(|(prefix, extra, seed, exclusion)| {
        let cidr = Ipv4Net::new((0x0a00_0000 | (seed & 0x00ff_ffff)).into(), prefix).unwrap().trunc();
        let block = (prefix + extra).min(30);
        let exclusions = exclusion
            .map(|e| vec![IpNet::V4(Ipv4Net::new(cidr.network(), (prefix + e).min(32)).unwrap())])
            .unwrap_or_default();
        PoolLayout { cidrs: vec![IpNet::V4(cidr)], block_prefix_v4: block, block_prefix_v6: 80, exclusions }
    })
}

fn drain(pool: &mut PoolBlocks) -> Vec<IpNet> {
    std::iter::from_fn(|| pool.allocate(IpFamily::IPv4)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn blocks_are_disjoint_inside_the_pool_and_avoid_exclusions(layout in pool_layout()) {
        let mut pool = PoolBlocks::new(layout.clone());
        let blocks = drain(&mut pool);
        let cidr = layout.cidrs[0];
        let mut sorted = blocks.clone();
        sorted.sort();
        for pair in sorted.windows(2) {
            prop_assert!(!overlaps(&pair[0], &pair[1]), "{} overlaps {}", pair[0], pair[1]);
        }
        for b in &blocks {
            prop_assert!(cidr.contains(b), "{b} outside {cidr}");
            prop_assert_eq!(b.prefix_len(), layout.block_prefix_v4);
            for e in &layout.exclusions {
                prop_assert!(!overlaps(b, e), "{b} overlaps exclusion {e}");
            }
        }
    }

    #[test]
    fn exhaustion_comes_at_exactly_the_capacity(layout in pool_layout()) {
        let mut pool = PoolBlocks::new(layout.clone());
        let cidr = layout.cidrs[0];
        let total = 1u64 << (layout.block_prefix_v4 - cidr.prefix_len());
        // Blocks lost to reservations, counted independently of the allocator.
        let lost = (0..total)
            .filter(|i| {
                let base = match cidr { IpNet::V4(n) => u32::from(n.network()), _ => unreachable!() };
                let block = IpNet::V4(Ipv4Net::new((base + ((*i as u32) << (32 - layout.block_prefix_v4))).into(), layout.block_prefix_v4).unwrap());
                layout.exclusions.iter().any(|e| overlaps(&block, e))
            })
            .count() as u64;
        let capacity = pool.usage(IpFamily::IPv4).capacity;
        prop_assert_eq!(capacity, total - lost);
        prop_assert_eq!(drain(&mut pool).len() as u64, capacity);
        prop_assert_eq!(pool.allocate(IpFamily::IPv4), None);
        prop_assert_eq!(pool.usage(IpFamily::IPv4).free, 0);
    }

    #[test]
    fn rebuilding_from_recorded_blocks_equals_the_incremental_state(
        layout in pool_layout(),
        releases in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        more in 0usize..20,
    ) {
        let mut live = PoolBlocks::new(layout.clone());
        let mut blocks = drain(&mut live);
        for r in releases {
            if blocks.is_empty() { break; }
            let b = blocks.remove(r.index(blocks.len()));
            prop_assert!(live.release(&b));
        }
        for _ in 0..more {
            if let Some(b) = live.allocate(IpFamily::IPv4) { blocks.push(b); }
        }
        let mut rebuilt = PoolBlocks::new(layout);
        for b in &blocks {
            prop_assert!(rebuilt.occupy(b).is_ok(), "{b} could not be occupied");
        }
        prop_assert_eq!(rebuilt.allocated_blocks(), live.allocated_blocks());
        prop_assert_eq!(rebuilt.usage(IpFamily::IPv4), live.usage(IpFamily::IPv4));
        // Both hand out the same blocks from here on.
        prop_assert_eq!(drain(&mut rebuilt), drain(&mut live));
    }
}
