//! The allocator alone: carve every /24 of a /8, and occupy them again (a rebuild).

use super::*;

// ---------------------------------------------------------------------------
// Allocator micro-benchmark

pub(super) fn micro_benchmark() -> Result<()> {
    let layout = PoolLayout {
        cidrs: vec![CLUSTER_CIDR.parse()?],
        block_prefix_v4: BLOCK_PREFIX,
        block_prefix_v6: 80,
        exclusions: vec![],
    };
    let mut best_alloc = Duration::MAX;
    let mut best_occupy = Duration::MAX;
    let mut count = 0;
    for _ in 0..MICRO_RUNS {
        let started = Instant::now();
        let mut pool = PoolBlocks::new(layout.clone());
        let mut blocks = Vec::with_capacity(1 << 16);
        while let Some(b) = pool.allocate(IpFamily::IPv4) {
            blocks.push(b);
        }
        std::hint::black_box(&pool);
        best_alloc = best_alloc.min(started.elapsed());
        count = blocks.len();

        let started = Instant::now();
        let mut rebuilt = PoolBlocks::new(layout.clone());
        for b in &blocks {
            rebuilt.occupy(b).map_err(|e| anyhow!("occupy {b}: {e}"))?;
        }
        std::hint::black_box(&rebuilt);
        best_occupy = best_occupy.min(started.elapsed());
        if rebuilt.allocate(IpFamily::IPv4).is_some() {
            bail!("the rebuilt pool still had a free block after occupying all {count}");
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mark = |d: Duration| if ms(d) < 50.0 { "ok" } else { "MISSED" };
    println!("allocator micro-benchmark: PoolBlocks over {CLUSTER_CIDR}, /{BLOCK_PREFIX} blocks, best of {MICRO_RUNS}");
    println!(
        "  allocate all {count:>6} blocks (new + allocate until None)  {:>8.2} ms   target < 50 ms  {}",
        ms(best_alloc),
        mark(best_alloc)
    );
    println!(
        "  rebuild: occupy all {count:>6} blocks into a fresh pool    {:>8.2} ms   target < 50 ms  {}",
        ms(best_occupy),
        mark(best_occupy)
    );
    if count != 1 << 16 {
        println!("  NOTE: expected 65536 blocks, got {count}");
    }
    println!();
    Ok(())
}
