//! Leader election on a coordination.k8s.io Lease, the way client-go's
//! leaderelection does it: the holder renews every `retry`; a candidate takes
//! over only after `duration` passes without the record changing **as this
//! replica observed it** (its own monotonic clock, never the holder's
//! `renewTime`: with clocks skewed between replicas, comparing timestamps lets
//! a standby take a live Lease). Updates carry the Lease's resourceVersion, so
//! two candidates cannot both win a round. On shutdown the leader releases
//! the Lease (empty holder), so a rollout's new replica takes over at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The Lease record as last seen, and when (this replica's clock) it last changed.
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

/// Whether `me` may write the Lease whose record is `spec`, unchanged for
/// `unchanged_for` as this replica observed it: it holds it, nobody does, or
/// the holder has not renewed within its lease duration.
pub fn may_take(spec: &LeaseSpec, me: &str, unchanged_for: Duration) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == me => true,
        Some(_) => {
            let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            unchanged_for > duration
        }
    }
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        LeaderElector { api: Api::namespaced(client, &cfg.namespace), cfg, observed: Mutex::new(None) }
    }

    /// Waits until this replica holds the Lease. A missing Lease namespace is
    /// an error at once (nothing would ever fix it by waiting); any other
    /// failing request is logged at warn each time its error changes.
    pub async fn acquire(&self) -> anyhow::Result<()> {
        let mut last_error = String::new();
        let lease = format!("{}/{}", self.cfg.namespace, self.cfg.name);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => debug!("lease held by another replica"),
                Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
                    "cannot create the leader Lease {lease}: {}; create the namespace or name another with \
                     --leader-election-namespace (env POD_NAMESPACE)",
                    s.message
                ),
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        warn!(%lease, error = %text, "cannot take part in leader election; retrying");
                        last_error = text;
                    }
                }
            }
            tokio::time::sleep(self.cfg.retry).await;
        }
    }

    /// Gives the Lease up when this replica holds it (empty holder, so any
    /// candidate may take it at once); best effort, on shutdown.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now.clone());
        spec.acquire_time = Some(now);
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => info!(lease = %self.cfg.name, "released the leader Lease"),
            Err(e) => warn!(error = %e, "releasing the leader Lease failed; the others wait out its duration"),
        }
    }

    /// How long the record in `spec` has been unchanged as this replica saw it; notes `spec`.
    fn unchanged_for(&self, spec: &LeaseSpec) -> Duration {
        let mut observed = self.observed.lock().expect("observed lease lock");
        match observed.as_ref() {
            Some((seen, at)) if seen == spec => at.elapsed(),
            _ => {
                *observed = Some((spec.clone(), Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Renews until no renewal has succeeded for the renew deadline; then
    /// returns. Each attempt is bounded by that deadline too: the client has
    /// no read timeout, and a request that hangs (an API server that accepts
    /// and never answers) must not keep this replica leading past the moment
    /// a standby may take over.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry).await;
            let deadline = last_renewal + self.cfg.renew_deadline;
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => return,
                Ok(Err(e)) => debug!(error = %e, "lease renewal failed"),
                Err(_) => {
                    warn!(deadline = ?self.cfg.renew_deadline, "no lease renewal answered within the renew deadline");
                    return;
                }
            }
            if last_renewal.elapsed() > self.cfg.renew_deadline {
                return;
            }
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let mine = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(mine(0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str());
        if !may_take(&spec, &self.cfg.identity, self.unchanged_for(&spec)) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if held_by_me { 0 } else { 1 };
        let mut next = mine(transitions);
        if held_by_me {
            next.acquire_time = spec.acquire_time.clone();
        }
        lease.spec = Some(next.clone());
        // replace carries metadata.resourceVersion: a concurrent writer makes this fail with 409.
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                *self.observed.lock().expect("observed lease lock") = Some((next, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, secs: i32, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_is_never_taken_whatever_its_timestamps_say() {
        // The holder's clock is an hour behind: its renewTime looks long expired.
        let skewed = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3600);
        let spec = held_by(Some("a"), 15, skewed);
        assert!(!may_take(&spec, "b", Duration::from_secs(3)), "renewed 3 s ago as b saw it");
        assert!(may_take(&spec, "b", Duration::from_secs(16)), "unchanged for longer than its duration");
        assert!(may_take(&spec, "a", Duration::ZERO), "the holder renews");
    }

    #[test]
    fn a_released_or_unheld_lease_is_free_at_once() {
        let now = Timestamp::now();
        assert!(may_take(&held_by(None, 1, now), "b", Duration::ZERO));
        assert!(may_take(&held_by(Some(""), 1, now), "b", Duration::ZERO));
    }
}
