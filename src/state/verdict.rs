//! The storage node's verdicts on the vfolders an agent's kernels wait for.
//!
//! Limits that count across every record (`limits.vfolders_per_owner`) can
//! only be judged where every record is held: the storage node serving the
//! vfolder's volume. It writes its refusal to the vfolder's status
//! (`P/status/vfolders/<uuid>`: `Rejected`, the rule in `error`). An agent
//! holds only its kernels' records, so on its own it would show such a
//! kernel waiting for a directory that never comes. It reads the verdict
//! instead of watching every status (a status changes at every scan, and a
//! watch per record is what an agent's memory at scale is made of): a
//! vfolder is looked up when a kernel's bind of it finds no directory, and a
//! refused one is looked up again every [`RECHECK`] until the refusal is
//! lifted (the owner deleted another folder), which is what ends the wait.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use uuid::Uuid;

/// How often a refused vfolder's status is read again.
pub const RECHECK: Duration = Duration::from_secs(10);

/// What the pass and the follower share.
#[derive(Debug, Default)]
pub struct Verdicts {
    /// vfolders whose directory a kernel's bind did not find (to look up).
    waiting: Mutex<BTreeSet<Uuid>>,
    /// vfolders the storage node refuses, with its reason.
    refused: Mutex<BTreeMap<Uuid, String>>,
}

impl Verdicts {
    /// Notes vfolders whose directory is missing; whether any is new.
    pub fn wait_for(&self, ids: impl IntoIterator<Item = Uuid>) -> bool {
        let refused = self.refused();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = false;
        for id in ids {
            if !refused.contains_key(&id) {
                new |= waiting.insert(id);
            }
        }
        new
    }

    /// The vfolders to look up now: those newly waited for, and (when
    /// `recheck`) those refused.
    pub fn to_check(&self, recheck: bool) -> BTreeSet<Uuid> {
        let mut ids = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        if recheck {
            ids.extend(self.refused().keys().copied());
        }
        ids
    }

    /// Whether any vfolder is refused (and so is to be looked up again).
    pub fn any_refused(&self) -> bool {
        !self.refused().is_empty()
    }

    /// Records what the statuses of `checked` said; whether a verdict changed.
    pub fn record(&self, checked: &BTreeSet<Uuid>, found: BTreeMap<Uuid, String>) -> bool {
        let mut refused = self.refused();
        let mut changed = false;
        for id in checked {
            let now = found.get(id);
            if refused.get(id) != now {
                changed = true;
                match now {
                    Some(why) => refused.insert(*id, why.clone()),
                    None => refused.remove(id),
                };
            }
        }
        changed
    }

    /// Forgets `ids` (no kernel here uses them any more).
    pub fn forget(&self, ids: &[Uuid]) {
        let mut refused = self.refused();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            refused.remove(id);
            waiting.remove(id);
        }
    }

    /// Keeps only what concerns `wanted`.
    pub fn retain(&self, wanted: &BTreeSet<Uuid>) {
        self.refused().retain(|id, _| wanted.contains(id));
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|id| wanted.contains(id));
    }

    /// The refusals in force, for the pass's limits.
    pub fn refusals(&self) -> BTreeMap<Uuid, String> {
        self.refused().clone()
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, String>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fields of a vfolder status a verdict is read from.
#[derive(serde::Deserialize)]
struct StatusView {
    state: String,
    #[serde(default)]
    error: Option<String>,
}

/// The storage node's refusal in a vfolder status value: its `error` when
/// the state is `Rejected` by a policy rule. A record refused for its form
/// is refused by the agent too; anything unreadable is no verdict.
pub fn refusal(status: &[u8]) -> Option<String> {
    let s: StatusView = serde_json::from_slice(status).ok()?;
    let why = s.error.filter(|_| s.state == "Rejected")?;
    why.starts_with("policy ")
        .then(|| format!("{why} (the verdict of its storage node)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn only_a_policy_rejection_is_a_verdict() {
        let rejected = br#"{"state":"Rejected","error":"policy limits.vfolders_per_owner: bob already has 1 vfolders","path":"x"}"#;
        assert_eq!(
            refusal(rejected).as_deref(),
            Some("policy limits.vfolders_per_owner: bob already has 1 vfolders (the verdict of its storage node)")
        );
        assert_eq!(refusal(br#"{"state":"Ready","path":"x"}"#), None);
        assert_eq!(
            refusal(br#"{"state":"Rejected","error":"name: bad"}"#),
            None
        );
        assert_eq!(refusal(b"\xff not json"), None);
    }

    #[test]
    fn a_verdict_lasts_until_a_lookup_lifts_it() {
        let v = Verdicts::default();
        assert!(v.wait_for([id(1), id(2)]));
        let checked = v.to_check(false);
        assert_eq!(checked, [id(1), id(2)].into());
        assert!(v.record(&checked, [(id(1), "policy x".to_string())].into()));
        // A refused vfolder is not waited for again; it is rechecked.
        assert!(!v.wait_for([id(1)]));
        assert!(v.to_check(false).is_empty());
        assert_eq!(v.to_check(true), [id(1)].into());
        assert!(!v.record(&[id(1)].into(), [(id(1), "policy x".to_string())].into()));
        assert!(v.record(&[id(1)].into(), BTreeMap::new()));
        assert!(!v.any_refused());
    }
}
