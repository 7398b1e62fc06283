//! Leader election on a coordination.k8s.io Lease, the way client-go's
//! leaderelection does it: the holder renews every `retry`; a candidate takes
//! over only after `duration` passes without a renewal. Updates carry the
//! Lease's resourceVersion, so two candidates cannot both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{debug, info};

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
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        LeaderElector { api: Api::namespaced(client, &cfg.namespace), cfg }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return;
                }
                Ok(false) => debug!("lease held by another replica"),
                Err(e) => debug!(error = %e, "lease update failed"),
            }
            tokio::time::sleep(self.cfg.retry).await;
        }
    }

    /// Renews until a renewal fails for longer than the renew deadline; then returns.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) => debug!(error = %e, "lease renewal failed"),
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
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(secs)) => *renewed + SignedDuration::from_secs(secs as i64) < now,
            _ => true,
        };
        if !held_by_me && !expired && spec.holder_identity.is_some() {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if held_by_me { 0 } else { 1 };
        let mut next = mine(transitions);
        if held_by_me {
            next.acquire_time = spec.acquire_time.clone();
        }
        lease.spec = Some(next);
        // replace carries metadata.resourceVersion: a concurrent writer makes this fail with 409.
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
