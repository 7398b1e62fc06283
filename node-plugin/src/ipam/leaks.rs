//! Leaked pod addresses: allocations whose sandbox is gone without a DEL
//! (a runtime killed between ADD and recording the sandbox, its state lost
//! on a restart, a pod force-deleted during an outage). containerd 1.6 and
//! 1.7 never send CNI GC, so nothing else would ever free them.
//!
//! Pure: the agent observes which allocations are still live (see
//! `agent::leaks`) and hands each observation to [`Suspects::observe`]. An
//! allocation is due for release only when it was not live at an
//! observation at least `grace` before and is still not live now, held by
//! the same attachment all along: an ADD in flight, a sandbox the kubelet
//! has not reported yet, or one that comes back between two observations
//! is never due.
//!
//! ```text
//!   observation ─▶ not live? ─no─▶ forgotten
//!                      │yes
//!                      ▼
//!       suspect since t0 (same owner) ──(now - t0 ≥ grace)──▶ due ─▶ freed under the store lock, fenced by owner
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::alloc::{Allocations, Owner};

/// Allocations seen not live, and since when.
#[derive(Debug, Default)]
pub struct Suspects {
    since: BTreeMap<IpAddr, (Owner, Instant)>,
}

impl Suspects {
    /// Records one observation of `allocations` at `now`, `live` telling which
    /// are in use; returns those due for release.
    pub fn observe(
        &mut self,
        allocations: &Allocations,
        live: impl Fn(&IpAddr, &Owner) -> bool,
        now: Instant,
        grace: Duration,
    ) -> Vec<(IpAddr, Owner)> {
        let mut due = Vec::new();
        let mut next = BTreeMap::new();
        for (ip, owner) in &allocations.by_ip {
            if live(ip, owner) {
                continue;
            }
            let since = match self.since.get(ip) {
                Some((o, t)) if o == owner => *t,
                _ => now,
            };
            if now.duration_since(since) >= grace && since != now {
                due.push((*ip, owner.clone()));
            }
            next.insert(*ip, (owner.clone(), since));
        }
        self.since = next;
        due
    }

    /// Forgets `freed` (they left the store).
    pub fn forget(&mut self, freed: &[(IpAddr, Owner)]) {
        for (ip, _) in freed {
            self.since.remove(ip);
        }
    }

    /// How many allocations are suspected right now.
    pub fn len(&self) -> usize {
        self.since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

/// Frees `due` from `allocations`, each only while the same attachment
/// still holds it; returns what was freed.
pub fn release(allocations: &mut Allocations, due: &[(IpAddr, Owner)]) -> Vec<(IpAddr, Owner)> {
    due.iter().filter(|(ip, owner)| !allocations.release_only(owner, &[*ip]).is_empty()).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocations(entries: &[(&str, &str)]) -> Allocations {
        let mut a = Allocations::default();
        for (ip, c) in entries {
            a.by_ip.insert(ip.parse().unwrap(), Owner::new(*c, "eth0"));
        }
        a
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn an_allocation_is_due_only_after_two_observations_a_grace_apart() {
        let t0 = Instant::now();
        let a = allocations(&[("10.0.0.2", "live"), ("10.0.0.3", "gone")]);
        let live = |_: &IpAddr, o: &Owner| o.container_id == "live";
        let mut s = Suspects::default();
        assert!(s.observe(&a, live, t0, GRACE).is_empty(), "one observation frees nothing");
        assert!(s.observe(&a, live, t0 + GRACE / 2, GRACE).is_empty(), "within the grace, nothing");
        assert_eq!(s.len(), 1);
        let due = s.observe(&a, live, t0 + GRACE, GRACE);
        assert_eq!(due, [("10.0.0.3".parse().unwrap(), Owner::new("gone", "eth0"))]);
    }

    #[test]
    fn a_zero_grace_still_needs_two_observations() {
        let t0 = Instant::now();
        let a = allocations(&[("10.0.0.3", "gone")]);
        let mut s = Suspects::default();
        assert!(s.observe(&a, |_, _| false, t0, Duration::ZERO).is_empty());
        assert_eq!(s.observe(&a, |_, _| false, t0 + Duration::from_millis(1), Duration::ZERO).len(), 1);
    }

    #[test]
    fn seen_live_once_or_taken_by_another_attachment_starts_the_clock_again() {
        let t0 = Instant::now();
        let mut s = Suspects::default();
        let a = allocations(&[("10.0.0.3", "slow")]);
        s.observe(&a, |_, _| false, t0, GRACE);
        // The kubelet reported the pod's IP: live, forgotten.
        s.observe(&a, |_, _| true, t0 + GRACE / 2, GRACE);
        assert!(s.observe(&a, |_, _| false, t0 + GRACE, GRACE).is_empty(), "the clock started again");
        // The address changed hands (DEL, then another pod's ADD): a new suspect, not a due one.
        let b = allocations(&[("10.0.0.3", "next")]);
        assert!(s.observe(&b, |_, _| false, t0 + 3 * GRACE, GRACE).is_empty());
        assert_eq!(s.observe(&b, |_, _| false, t0 + 4 * GRACE, GRACE).len(), 1);
    }

    #[test]
    fn release_is_fenced_by_the_attachment() {
        let mut a = allocations(&[("10.0.0.3", "next"), ("10.0.0.4", "gone")]);
        let due = [
            ("10.0.0.3".parse().unwrap(), Owner::new("gone-earlier", "eth0")),
            ("10.0.0.4".parse().unwrap(), Owner::new("gone", "eth0")),
        ];
        assert_eq!(release(&mut a, &due), due[1..]);
        assert_eq!(a, allocations(&[("10.0.0.3", "next")]));
    }
}
