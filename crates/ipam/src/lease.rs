//! Leader election on a `coordination.k8s.io/v1` Lease: a pure [`evaluate`] and a thin loop.
//!
//! The controller asks a [`Leadership`] whether it leads; tests plug in [`ManualLeadership`],
//! production the [`LeaseElector`]. A leader that cannot renew within the lease duration steps
//! down on its own, before another replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::outage::Outage;

/// Errors of the elector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("lease {name}: {}", crate::outage::describe(.source))]
    Api {
        /// The Lease name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// Whether this replica leads.
pub trait Leadership {
    /// `true` while leading; changes are published.
    fn subscribe(&self) -> watch::Receiver<bool>;
}

/// Leadership switched by hand (tests, single-replica setups).
#[derive(Debug)]
pub struct ManualLeadership(watch::Sender<bool>);

impl ManualLeadership {
    /// Starts leading or not.
    pub fn new(leading: bool) -> Self {
        Self(watch::Sender::new(leading))
    }

    /// Changes leadership.
    pub fn set(&self, leading: bool) {
        self.0.send_replace(leading);
    }
}

impl Leadership for ManualLeadership {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and it is live.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// Decides from a Lease's spec (pure).
pub fn evaluate(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(h) => {
            let duration =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
            match &spec.renew_time {
                Some(t) if t.0 + duration > now => Decision::Follow {
                    holder: h.to_string(),
                },
                _ => Decision::Acquire,
            }
        }
    }
}

/// Timing of the elector (client-go's defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease stays valid after a renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What this replica last knew of the election, for its log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Role {
    /// Not decided yet (start, or the API could not be reached).
    #[default]
    Unknown,
    /// Holds the Lease.
    Leading,
    /// Another replica holds it.
    StandingBy {
        /// The holder.
        holder: String,
    },
}

/// The log line for a change of role, if any: one line when a replica starts standing by (and
/// when the holder it follows changes), one when it becomes leader, one when it stops leading;
/// nothing while the role stays the same.
pub fn role_message(before: &Role, after: &Role) -> Option<String> {
    if before == after {
        return None;
    }
    match (before, after) {
        (_, Role::Leading) => {
            Some("leading: acquired the Lease; this replica allocates now".into())
        }
        (_, Role::StandingBy { holder }) => Some(format!(
            "standing by: the Lease is held by {holder}; this replica takes over when it is released or expires"
        )),
        (Role::Leading, Role::Unknown) => {
            Some("stopped leading: the Lease could not be renewed".into())
        }
        (_, Role::Unknown) => None,
    }
}

/// Runs the election loop on one Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    leading: watch::Sender<bool>,
    last_renew: Option<tokio::time::Instant>,
    role: Role,
    reached: watch::Sender<bool>,
}

impl LeaseElector {
    /// An elector for Lease `name` in the namespace of `api`.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        timing: Timing,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            leading: watch::Sender::new(false),
            last_renew: None,
            role: Role::Unknown,
            reached: watch::Sender::new(false),
        }
    }

    /// `true` once an attempt has reached the API server (the controller's readiness: a
    /// standby is ready too, it has a Lease to follow).
    pub fn reached(&self) -> watch::Receiver<bool> {
        self.reached.subscribe()
    }

    /// What this replica last knew of the election.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// One attempt: read the Lease, decide, write. Returns whether we lead afterwards.
    pub async fn step(&mut self, now: Timestamp) -> Result<bool, Error> {
        let result = self.try_step(now).await;
        if result.is_ok() {
            self.reached
                .send_if_modified(|r| !std::mem::replace(r, true));
        }
        let leading = match &result {
            Ok(l) => *l,
            // Could not reach the API: keep leading only until the renew deadline.
            Err(_) => self
                .last_renew
                .is_some_and(|t| t.elapsed() < self.timing.renew_deadline),
        };
        if leading && result.as_ref().is_ok_and(|l| *l) {
            self.last_renew = Some(tokio::time::Instant::now());
        }
        if !leading {
            self.last_renew = None;
            if self.role == Role::Leading {
                self.role = Role::Unknown;
            }
        }
        self.leading
            .send_if_modified(|l| std::mem::replace(l, leading) != leading);
        result
    }

    async fn try_step(&mut self, now: Timestamp) -> Result<bool, Error> {
        let err = |source| Error::Api {
            name: self.name.clone(),
            source,
        };
        let current = self.api.get_opt(&self.name).await.map_err(err)?;
        let decision = evaluate(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let (mut lease, transitions) = match (&decision, current) {
            (Decision::Follow { holder }, _) => {
                self.role = Role::StandingBy {
                    holder: holder.clone(),
                };
                return Ok(false);
            }
            (_, None) => (
                Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                },
                0,
            ),
            (_, Some(l)) => {
                let t = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0);
                (l, t)
            }
        };
        let old = lease.spec.take().unwrap_or_default();
        let acquiring = decision == Decision::Acquire;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: if acquiring {
                Some(MicroTime(now))
            } else {
                old.acquire_time
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if acquiring && old.holder_identity.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..old
        });
        let written = if lease.metadata.resource_version.is_none() {
            self.api.create(&PostParams::default(), &lease).await
        } else {
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
        };
        match written {
            Ok(_) => {
                self.role = Role::Leading;
                Ok(true)
            }
            // Another replica wrote first (409) or created it first (409 AlreadyExists).
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Gives the Lease up at once, as client-go's `ReleaseOnCancel`: when we hold it, clear
    /// `holderIdentity` and set `leaseDurationSeconds: 1`, so a standby takes over at its next
    /// attempt instead of waiting for the Lease to expire. Guarded by the version read.
    pub async fn release(&mut self, now: Timestamp) -> Result<bool, Error> {
        self.leading.send_replace(false);
        self.last_renew = None;
        let err = |source| Error::Api {
            name: self.name.clone(),
            source,
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(err)? else {
            return Ok(false);
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(now));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.role = Role::Unknown;
                Ok(true)
            }
            // Someone else took it meanwhile: nothing of ours to release.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Runs until `shutdown`, then releases the Lease ([`LeaseElector::release`]) so a standby
    /// takes over at once. Logs a change of role once, and an outage of the API once when it
    /// starts and once when it ends.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut outage = Outage::default();
        let mut logged = Role::Unknown;
        loop {
            match self.step(Timestamp::now()).await {
                Ok(_) => {
                    if let Some(failures) = outage.recovered() {
                        tracing::info!(failures, "leader election reaches the API server again");
                    }
                }
                Err(e) => {
                    if outage.failed() {
                        tracing::warn!(error = %e, "leader election cannot reach the API server; retrying every {:?} (logged once per outage)", self.timing.retry_period);
                    }
                }
            }
            if let Some(msg) = role_message(&logged, &self.role) {
                tracing::info!(identity = %self.identity, "{msg}");
            }
            if self.role != Role::Unknown || logged == Role::Leading {
                logged = self.role.clone();
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.timing.retry_period) => {}
            }
        }
        if self.role != Role::Leading && !*self.leading.borrow() {
            // Never led (or already stepped down): nothing to give up.
            self.leading.send_replace(false);
            return;
        }
        match self.release(Timestamp::now()).await {
            Ok(true) => {
                tracing::info!(identity = %self.identity, "released the Lease: a standby takes over now")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the Lease; a standby takes over when it expires")
            }
        }
    }
}

impl Leadership for LeaseElector {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{mock_client, status_error, timeout_after_1s};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn held_by(who: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_is_followed_and_an_expired_one_taken() {
        assert_eq!(evaluate(None, "me", at(0)), Decision::Acquire);
        assert_eq!(
            evaluate(Some(&held_by("me", 0)), "me", at(100)),
            Decision::Renew
        );
        assert_eq!(
            evaluate(Some(&held_by("other", 0)), "me", at(14)),
            Decision::Follow {
                holder: "other".into()
            }
        );
        assert_eq!(
            evaluate(Some(&held_by("other", 0)), "me", at(16)),
            Decision::Acquire
        );
    }

    fn lease_json(spec: &LeaseSpec) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "portico-controller", "namespace": "portico-system", "resourceVersion": "7"},
            "spec": spec,
        })
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_a_guarded_replace() {
        let (client, mut api) = mock_client();
        let path =
            "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases/portico-controller";
        let server = tokio::spawn(async move {
            api.expect("GET", path, 200, lease_json(&held_by("old", -60)))
                .await;
            let put = api
                .expect("PUT", path, 200, lease_json(&held_by("new", 0)))
                .await;
            assert_eq!(put.body["spec"]["holderIdentity"], "new");
            assert_eq!(put.body["spec"]["leaseTransitions"], 1);
            assert_eq!(
                put.body["metadata"]["resourceVersion"], "7",
                "a replace guarded by the version read"
            );
        });
        let mut e = LeaseElector::new(
            Api::namespaced(client, "portico-system"),
            "portico-controller",
            "new",
            Timing::default(),
        );
        let rx = e.subscribe();
        assert!(e.step(at(0)).await.unwrap());
        assert!(*rx.borrow());
        timeout_after_1s(server).await;
    }

    #[test]
    fn a_standby_says_so_once_and_again_only_when_its_role_changes() {
        let by = |h: &str| Role::StandingBy { holder: h.into() };
        let m = role_message(&Role::Unknown, &by("a")).unwrap();
        assert!(m.starts_with("standing by") && m.contains(" a;"), "{m}");
        assert_eq!(
            role_message(&by("a"), &by("a")),
            None,
            "once, not every 2 s"
        );
        assert!(role_message(&by("a"), &by("b")).unwrap().contains(" b;"));
        assert!(
            role_message(&by("a"), &Role::Leading)
                .unwrap()
                .starts_with("leading")
        );
        assert_eq!(role_message(&Role::Leading, &Role::Leading), None);
        assert!(
            role_message(&Role::Leading, &Role::Unknown)
                .unwrap()
                .starts_with("stopped")
        );
        assert_eq!(role_message(&by("a"), &Role::Unknown), None);
    }

    #[tokio::test]
    async fn on_shutdown_the_leader_releases_the_lease_so_a_standby_takes_over_at_once() {
        let (client, mut api) = mock_client();
        let path =
            "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases/portico-controller";
        let server = tokio::spawn(async move {
            api.expect("GET", path, 404, status_error(404, "NotFound"))
                .await;
            api.expect(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases",
                201,
                lease_json(&held_by("me", 0)),
            )
            .await;
            // Shutdown: read, then a guarded replace that clears the holder.
            api.expect("GET", path, 200, lease_json(&held_by("me", 0)))
                .await;
            let put = api
                .expect("PUT", path, 200, lease_json(&held_by("me", 0)))
                .await;
            assert!(
                put.body["spec"]["holderIdentity"].is_null(),
                "{:?}",
                put.body
            );
            assert_eq!(put.body["spec"]["leaseDurationSeconds"], 1);
            assert_eq!(put.body["metadata"]["resourceVersion"], "7");
            // What a standby reads next: it acquires without waiting for an expiry.
            let released: LeaseSpec = serde_json::from_value(put.body["spec"].clone()).unwrap();
            assert_eq!(
                evaluate(Some(&released), "standby", at(1)),
                Decision::Acquire
            );
        });
        let timing = Timing {
            retry_period: Duration::from_secs(3600),
            ..Timing::default()
        };
        let e = LeaseElector::new(
            Api::namespaced(client, "portico-system"),
            "portico-controller",
            "me",
            timing,
        );
        let mut rx = e.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(e.run(shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|l| *l))
            .await
            .expect("leads")
            .unwrap();
        shutdown.cancel();
        timeout_after_1s(server).await;
        task.await.unwrap();
        assert!(!*rx.borrow(), "no longer leading once released");
    }

    #[tokio::test]
    async fn a_replica_that_does_not_hold_the_lease_releases_nothing() {
        let (client, mut api) = mock_client();
        let path =
            "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases/portico-controller";
        let server = tokio::spawn(async move {
            api.expect("GET", path, 200, lease_json(&held_by("other", 0)))
                .await;
        });
        let mut e = LeaseElector::new(
            Api::namespaced(client, "portico-system"),
            "portico-controller",
            "me",
            Timing::default(),
        );
        assert!(!e.release(at(0)).await.unwrap());
        timeout_after_1s(server).await;
    }

    #[tokio::test]
    async fn losing_the_race_for_a_lease_leaves_us_following() {
        let (client, mut api) = mock_client();
        let path =
            "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases/portico-controller";
        let server = tokio::spawn(async move {
            api.expect("GET", path, 404, status_error(404, "NotFound"))
                .await;
            api.expect(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases",
                409,
                status_error(409, "AlreadyExists"),
            )
            .await;
            api.expect("GET", path, 200, lease_json(&held_by("other", 0)))
                .await;
        });
        let mut e = LeaseElector::new(
            Api::namespaced(client, "portico-system"),
            "portico-controller",
            "me",
            Timing::default(),
        );
        assert!(!*e.reached().borrow());
        assert!(!e.step(at(0)).await.unwrap());
        assert!(
            *e.reached().borrow(),
            "a standby that reached the API is ready"
        );
        assert!(
            !e.step(at(1)).await.unwrap(),
            "a live lease of another is followed without a write"
        );
        timeout_after_1s(server).await;
    }
}
