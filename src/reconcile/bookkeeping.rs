//! What a pass remembers for the next one, decided without a clock: per-object
//! retry backoff (the error policy), the linger of unused volumes, renewal
//! windows of SASes and token files, and when the loop must wake next.
//!
//! Every function takes `now` as an argument, so each rule is unit-tested with
//! plain instants, with no root, no etcd and no waiting (kube-runtime keeps its
//! `error_policy` and scheduler the same way).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::reconcile::execute::ExecError;
use crate::state::ledger::Owner;

/// First per-object retry delay after a failed action.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest per-object retry delay: a share that is down for hours is still
/// tried every two minutes, so it comes back without an operator.
pub const RETRY_MAX: Duration = Duration::from_secs(120);
/// First delay after a whole pass failed (the mount table or ledger unreadable).
pub const PASS_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest delay after whole passes keep failing.
pub const PASS_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What to do about an object after one of its actions failed
/// (kube-runtime's `error_policy` → `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// The action ran and failed: try again after this long. Permanent
    /// failures back off too: what fixes them (a planted symlink removed, a
    /// share back online) is not an etcd event the loop would wake on.
    After(Duration),
    /// The action never ran (an action it depends on failed, or its object
    /// waits out an earlier backoff): no new backoff; it runs with the next
    /// pass that finds its dependency in place.
    Unchanged,
}

/// The error policy: how long an object waits after its `attempts`-th failure.
pub fn error_policy(e: &ExecError, attempts: u32) -> Requeue {
    if e.was_attempted() {
        Requeue::After(retry_delay(attempts))
    } else {
        Requeue::Unchanged
    }
}

/// Per-object retry delay: 0.5 s doubling to 2 min, so one bad object never
/// slows the others and a flapping mount is not hammered.
pub fn retry_delay(attempts: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// Delay before the next try after a whole pass failed, doubling from the last.
pub fn pass_backoff(last: Duration) -> Duration {
    (last * 2).clamp(PASS_BACKOFF_MIN, PASS_BACKOFF_MAX)
}

/// Backoff state of one object whose last action failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    attempts: u32,
    not_before: Instant,
}

/// Objects waiting out a backoff after failed actions.
#[derive(Debug, Default)]
pub struct Retries {
    by_owner: BTreeMap<Owner, Retry>,
}

impl Retries {
    /// Records a failure of `owner`'s action at `now`, as the error policy says.
    pub fn failed(&mut self, owner: &Owner, e: &ExecError, now: Instant) {
        let attempts = self.by_owner.get(owner).map_or(0, |r| r.attempts) + 1;
        if let Requeue::After(delay) = error_policy(e, attempts) {
            self.by_owner.insert(
                owner.clone(),
                Retry {
                    attempts,
                    not_before: now + delay,
                },
            );
        }
    }

    /// `owner`'s actions all succeeded: it starts from scratch next time.
    pub fn succeeded(&mut self, owner: &Owner) {
        self.by_owner.remove(owner);
    }

    /// Objects still inside their backoff at `now` (their actions are not run).
    pub fn waiting(&self, now: Instant) -> impl Iterator<Item = &Owner> {
        self.by_owner
            .iter()
            .filter(move |(_, r)| now < r.not_before)
            .map(|(o, _)| o)
    }

    /// Objects still inside their backoff at `now`: failures in a row, and
    /// when their actions run again.
    pub fn pending(&self, now: Instant) -> impl Iterator<Item = (&Owner, u32, Instant)> {
        self.by_owner
            .iter()
            .filter(move |(_, r)| now < r.not_before)
            .map(|(o, r)| (o, r.attempts, r.not_before))
    }

    /// Forgets objects `keep` says no longer exist.
    pub fn retain(&mut self, mut keep: impl FnMut(&Owner) -> bool) {
        self.by_owner.retain(|o, _| keep(o));
    }

    /// When the earliest backoff after `now` ends.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.by_owner
            .values()
            .map(|r| r.not_before)
            .filter(|t| *t > now)
            .min()
    }
}

/// Owned volumes that nothing wants any more, and since when: each stays
/// mounted for the linger period, so a kernel restarting a minute later does
/// not pay for a fresh CIFS mount.
#[derive(Debug)]
pub struct Linger {
    period: Duration,
    idle_since: BTreeMap<String, Instant>,
}

impl Linger {
    /// Unused volumes stay mounted for `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            idle_since: BTreeMap::new(),
        }
    }

    /// Notes, at `now`, which `owned` volumes are `wanted`; returns the unused
    /// ones still inside their linger (to keep mounted).
    pub fn update<'a>(
        &mut self,
        owned: impl IntoIterator<Item = &'a String>,
        wanted: impl Fn(&str) -> bool,
        now: Instant,
    ) -> BTreeSet<String> {
        let unused: BTreeSet<&String> = owned.into_iter().filter(|v| !wanted(v)).collect();
        self.idle_since.retain(|v, _| unused.contains(v));
        for v in unused {
            self.idle_since.entry(v.clone()).or_insert(now);
        }
        self.idle_since
            .iter()
            .filter(|(_, since)| now < **since + self.period)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// What [`Linger::update`] would return at `now`, changing nothing (a
    /// volume not yet idle would start its linger now: kept).
    pub fn kept<'a>(
        &self,
        owned: impl IntoIterator<Item = &'a String>,
        wanted: impl Fn(&str) -> bool,
        now: Instant,
    ) -> BTreeSet<String> {
        owned
            .into_iter()
            .filter(|v| !wanted(v))
            .filter(|v| match self.idle_since.get(*v) {
                Some(since) => now < *since + self.period,
                None => !self.period.is_zero(),
            })
            .cloned()
            .collect()
    }

    /// When the next lingering volume's time runs out.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.idle_since
            .values()
            .map(|s| *s + self.period)
            .filter(|d| *d > now)
            .min()
    }
}

/// Whether a credential expiring at `expires_at` (unix seconds) is due for
/// renewal at `now_unix`: in the last third of its `lifetime`, early enough
/// that a remount waiting for its kernels to go has time before it expires.
pub fn renewal_due(expires_at: u64, lifetime: Duration, now_unix: u64) -> bool {
    expires_at.saturating_sub(now_unix) <= lifetime.as_secs() / 3
}

/// When the first of `expiries` (unix seconds, each with its lifetime) enters
/// its renewal window after `now_unix`, as an instant on the loop's clock.
pub fn renewal_deadline(
    expiries: impl IntoIterator<Item = (u64, Duration)>,
    now_unix: u64,
    now: Instant,
) -> Option<Instant> {
    expiries
        .into_iter()
        .map(|(expires_at, lifetime)| expires_at.saturating_sub(lifetime.as_secs() / 3))
        .filter(|d| *d > now_unix)
        .min()
        .map(|d| now + Duration::from_secs(d - now_unix))
}

/// When the loop must run a pass without being told: the earliest of the
/// resync and every deadline a pass left.
pub fn next_wake(resync: Instant, deadlines: impl IntoIterator<Item = Option<Instant>>) -> Instant {
    deadlines.into_iter().flatten().fold(resync, Instant::min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::sys::HelperError;
    use std::path::PathBuf;

    fn mount_failed() -> ExecError {
        ExecError::MountFailed {
            target: PathBuf::from("/v/x"),
            errno: nix::errno::Errno::EBUSY,
        }
    }

    /// A plan's linger verdict is the one the next pass reaches.
    #[test]
    fn kept_says_what_update_would_without_changing_anything() {
        let now = Instant::now();
        let owned = ["a".to_string(), "b".to_string()];
        for period in [Duration::ZERO, Duration::from_secs(60)] {
            let mut l = Linger::new(period);
            let wanted = |v: &str| v == "a";
            let kept = l.kept(owned.iter(), wanted, now);
            assert_eq!(kept, l.update(owned.iter(), wanted, now), "{period:?}");
            let later = now + Duration::from_secs(61);
            assert_eq!(
                l.kept(owned.iter(), wanted, later),
                l.update(owned.iter(), wanted, later),
                "{period:?}"
            );
        }
    }

    #[test]
    fn retry_delay_doubles_from_half_a_second_to_two_minutes() {
        let d: Vec<u64> = (1..=10)
            .map(|a| retry_delay(a).as_millis() as u64)
            .collect();
        assert_eq!(
            d,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 120000, 120000]
        );
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn a_failed_action_backs_off_and_one_that_never_ran_does_not() {
        let ran = error_policy(&mount_failed(), 3);
        assert_eq!(ran, Requeue::After(Duration::from_secs(2)));
        let helper = ExecError::Helper {
            target: PathBuf::from("/v/x"),
            source: HelperError::Timeout(Duration::from_secs(30)),
        };
        assert_eq!(error_policy(&helper, 1), Requeue::After(RETRY_MIN));
        assert_eq!(
            error_policy(&ExecError::Skipped("volume x failed".into()), 5),
            Requeue::Unchanged
        );
        assert_eq!(
            error_policy(&ExecError::Deferred("earlier".into()), 5),
            Requeue::Unchanged
        );
    }

    #[test]
    fn an_object_waits_out_its_backoff_then_is_tried_and_a_success_resets_it() {
        let t0 = Instant::now();
        let k = Owner::Kernel("k".into());
        let mut r = Retries::default();
        r.failed(&k, &mount_failed(), t0);
        assert_eq!(r.waiting(t0).collect::<Vec<_>>(), [&k]);
        assert_eq!(r.deadline(t0), Some(t0 + RETRY_MIN));
        assert_eq!(r.waiting(t0 + RETRY_MIN).count(), 0, "due again");
        // The second failure doubles the wait.
        r.failed(&k, &mount_failed(), t0 + RETRY_MIN);
        assert_eq!(r.deadline(t0 + RETRY_MIN), Some(t0 + RETRY_MIN * 3));
        // A skipped action neither extends nor resets the backoff.
        r.failed(&k, &ExecError::Skipped("dep".into()), t0 + RETRY_MIN);
        assert_eq!(r.deadline(t0 + RETRY_MIN), Some(t0 + RETRY_MIN * 3));
        r.succeeded(&k);
        assert_eq!(r.deadline(t0), None);
        r.failed(&k, &mount_failed(), t0);
        assert_eq!(r.deadline(t0), Some(t0 + RETRY_MIN), "starts from scratch");
        r.retain(|_| false);
        assert_eq!(r.waiting(t0).count(), 0);
    }

    #[test]
    fn an_unused_volume_lingers_for_its_period_then_goes() {
        let t0 = Instant::now();
        let period = Duration::from_secs(30);
        let mut l = Linger::new(period);
        let owned = ["a".to_string(), "b".to_string()];
        // Both in use: nothing lingers.
        assert!(l.update(&owned, |_| true, t0).is_empty());
        assert_eq!(l.deadline(t0), None);
        // `a` loses its last kernel at t0: kept until t0 + 30 s.
        let wanted_b = |v: &str| v == "b";
        assert_eq!(l.update(&owned, wanted_b, t0), BTreeSet::from(["a".into()]));
        assert_eq!(l.deadline(t0), Some(t0 + period));
        let t1 = t0 + Duration::from_secs(29);
        assert_eq!(l.update(&owned, wanted_b, t1), BTreeSet::from(["a".into()]));
        // The idle time counts from when it became unused, not from each pass.
        assert!(l.update(&owned, wanted_b, t0 + period).is_empty());
        assert_eq!(l.deadline(t0 + period), None);
    }

    #[test]
    fn a_volume_used_again_while_lingering_starts_a_fresh_linger_later() {
        let t0 = Instant::now();
        let period = Duration::from_secs(30);
        let mut l = Linger::new(period);
        let owned = ["a".to_string()];
        l.update(&owned, |_| false, t0);
        l.update(&owned, |_| true, t0 + Duration::from_secs(20));
        let t2 = t0 + Duration::from_secs(40);
        assert_eq!(
            l.update(&owned, |_| false, t2),
            BTreeSet::from(["a".into()])
        );
        assert_eq!(l.deadline(t2), Some(t2 + period));
        // An unmounted (no longer owned) volume is forgotten.
        assert!(l.update(&[], |_| false, t2).is_empty());
        assert_eq!(l.deadline(t2), None);
    }

    #[test]
    fn renewal_is_due_in_the_last_third_of_a_lifetime() {
        let day = Duration::from_secs(24 * 3600);
        let now = 1_000_000;
        assert!(!renewal_due(now + 8 * 3600 + 1, day, now));
        assert!(renewal_due(now + 8 * 3600, day, now));
        assert!(renewal_due(now - 5, day, now), "expired");
    }

    #[test]
    fn the_renewal_deadline_is_the_earliest_window_still_ahead() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000;
        let sas = (now + 3 * 3600, 3 * hour); // window opens in 2 h
        let token = (now + 1800 + 600, Duration::from_secs(1800)); // opens in 30 min
        let due = (now + 60, 3 * hour); // already inside its window: no deadline
        let d = renewal_deadline([sas, token, due], now, t0);
        assert_eq!(d, Some(t0 + Duration::from_secs(1800)));
        assert_eq!(renewal_deadline([], now, t0), None);
    }

    #[test]
    fn the_loop_wakes_at_the_earliest_deadline_or_the_resync() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(next_wake(t0 + 30 * s, [None, None]), t0 + 30 * s);
        assert_eq!(
            next_wake(t0 + 30 * s, [Some(t0 + 5 * s), None, Some(t0 + 2 * s)]),
            t0 + 2 * s
        );
        assert_eq!(pass_backoff(Duration::ZERO), PASS_BACKOFF_MIN);
        assert_eq!(pass_backoff(Duration::from_secs(20)), PASS_BACKOFF_MAX);
    }
}
