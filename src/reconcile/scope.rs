//! Narrowing a pass: to a few kernels (a watch event or a mount-table change
//! named them, so the work is O(those kernels), not O(node)), and to repairs
//! and additions only while the desired state is not known to be current
//! (fail static: a restart while etcd is unreachable takes nothing away).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use crate::reconcile::plan::{Action, Actual, Want};
use crate::reconcile::report::{KernelState, Summary};
use crate::state::desired::Desired;
use crate::state::ledger::Owner;

/// Drops every action that removes something (unmount, forget, rmdir) and
/// any setup action on a target whose unmount was dropped (it would stack a
/// second mount). Used while desired state is not known to be current (a
/// restart while etcd is unreachable): repair and add, never take away.
pub fn without_teardown(actions: Vec<Action>) -> Vec<Action> {
    let blocked: BTreeSet<PathBuf> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Unmount { target, .. } => Some(target.clone()),
            _ => None,
        })
        .collect();
    actions
        .into_iter()
        .filter(|a| match a {
            Action::Unmount { .. } | Action::Forget { .. } | Action::RemoveDir { .. } => false,
            Action::Detach { .. } | Action::WriteToken { .. } => true,
            Action::RemoveToken { .. } => false,
            Action::Bind { bind } | Action::Remount { bind } => !blocked.contains(&bind.target),
            Action::MountVolume { volume } | Action::Reconfigure { volume } => {
                !blocked.contains(&volume.target)
            }
            Action::MakeDir { path, .. } => !blocked.contains(path),
            Action::ShareHome { home, .. } => !blocked.contains(home),
        })
        .collect()
}

/// What a pass over a few kernels looks at: those kernels' part of `want`
/// (every volume and vfolder directory stays in, so setup still works).
/// Used when a watch event or a mount-table change names the kernels that
/// changed: the work is O(those kernels), not O(node).
pub fn want_of_kernels(want: &Want, kernels: &BTreeSet<String>) -> Want {
    let mine = |k: &String| kernels.contains(k);
    Want {
        volumes: want.volumes.clone(),
        vfolder_dirs: want.vfolder_dirs.clone(),
        clones: want.clones.clone(),
        quotas: want.quotas.clone(),
        binds: kernels
            .iter()
            .filter_map(|k| want.kernels.get(k))
            .flat_map(|k| k.binds.iter())
            .filter_map(|t| want.binds.get_key_value(t))
            .map(|(t, b)| (t.clone(), b.clone()))
            .collect(),
        kernels: kernels
            .iter()
            .filter_map(|k| want.kernels.get_key_value(k))
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect(),
        users: want.users.clone(),
        held_kernels: want
            .held_kernels
            .iter()
            .filter(|k| mine(k))
            .cloned()
            .collect(),
        held_volumes: want.held_volumes.clone(),
        refused_volumes: want.refused_volumes.clone(),
        tokens: want
            .tokens
            .iter()
            .filter(|(_, t)| mine(&t.kernel))
            .map(|(p, t)| (p.clone(), t.clone()))
            .collect(),
        homes: BTreeMap::new(),
    }
}

/// The part of `actual`'s ownership records a pass over `kernels` may act
/// on: their binds, directories and tokens, and every volume's records.
/// (`mounts` is shared; `dirs` is left for the caller to observe.)
pub fn actual_of_kernels(actual: &Actual, kernels: &BTreeSet<String>) -> Actual {
    let mine = |k: &Option<String>| k.as_ref().is_none_or(|k| kernels.contains(k));
    Actual {
        mounts: actual.mounts.clone(),
        owned_mounts: std::sync::Arc::new(
            actual
                .owned_mounts
                .iter()
                .filter(|(_, m)| mine(&m.kernel))
                .map(|(t, m)| (t.clone(), m.clone()))
                .collect(),
        ),
        owned_dirs: std::sync::Arc::new(
            actual
                .owned_dirs
                .iter()
                .filter(|(_, d)| match &d.owner {
                    Owner::Kernel(k) => kernels.contains(k),
                    Owner::Volume(_) => true,
                })
                .map(|(p, d)| (p.clone(), d.clone()))
                .collect(),
        ),
        dirs: HashSet::new(),
        stale: actual.stale.clone(),
        capacity: actual.capacity.clone(),
        renew: actual.renew.clone(),
        owned_tokens: std::sync::Arc::new(
            actual
                .owned_tokens
                .iter()
                .filter(|(_, t)| kernels.contains(&t.kernel))
                .map(|(p, t)| (p.clone(), t.clone()))
                .collect(),
        ),
        token_renew: actual.token_renew.clone(),
        hung_volumes: actual.hung_volumes.clone(),
    }
}

/// Keeps the actions a pass over a few kernels may take: it cannot see the
/// other kernels' binds, so it never takes a volume or a volume's directory
/// away (nor sets up anything on a target whose teardown it dropped); the
/// next whole pass does that.
pub fn kernel_scoped(actions: Vec<Action>, actual: &Actual) -> Vec<Action> {
    let volume_target = |t: &PathBuf| {
        actual
            .owned_mounts
            .get(t)
            .is_none_or(|m| m.kernel.is_none())
    };
    let blocked: BTreeSet<PathBuf> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Unmount { target, .. } | Action::Detach { target } if volume_target(target) => {
                Some(target.clone())
            }
            _ => None,
        })
        .collect();
    actions
        .into_iter()
        .filter(|a| match a {
            Action::Unmount { target, .. }
            | Action::Detach { target }
            | Action::Forget { target } => !volume_target(target),
            Action::RemoveDir { path } => actual
                .owned_dirs
                .get(path)
                .is_some_and(|d| matches!(d.owner, Owner::Kernel(_))),
            Action::Bind { bind } | Action::Remount { bind } => !blocked.contains(&bind.target),
            Action::MountVolume { volume } | Action::Reconfigure { volume } => {
                !blocked.contains(&volume.target)
            }
            Action::MakeDir { path, .. } => !blocked.contains(path),
            Action::ShareHome { home, .. } => !blocked.contains(home),
            Action::WriteToken { .. } | Action::RemoveToken { .. } => true,
        })
        .collect()
}

/// The desired state a pass over `kernels` reports on: every volume, and
/// just those kernels.
pub fn desired_of_kernels(desired: &Desired, kernels: &BTreeSet<String>) -> Desired {
    Desired {
        volumes: desired.volumes.clone(),
        kernels: kernels
            .iter()
            .filter_map(|k| desired.kernels.get_key_value(k))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect(),
        revision: desired.revision,
        ..Desired::default()
    }
}

/// The kernels that `actions` still set something up for (binds, token
/// files, directories in their homes).
pub fn kernels_acted_on(actions: &[Action]) -> BTreeSet<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Bind { bind } | Action::Remount { bind } => Some(bind.kernel.as_str()),
            Action::WriteToken { token } => Some(token.kernel.as_str()),
            Action::MakeDir {
                owner: Some(Owner::Kernel(k)),
                ..
            } => Some(k.as_str()),
            _ => None,
        })
        .collect()
}

/// What to hold after a pass: a whole pass's results as they are; a pass
/// over a few kernels replaces just the keys `scoped` names in the last ones
/// (values are shared, so this copies no status).
pub fn merge_scoped<V: Clone>(
    last: &BTreeMap<String, V>,
    fresh: BTreeMap<String, V>,
    scoped: Option<impl IntoIterator<Item = String>>,
) -> BTreeMap<String, V> {
    let Some(scoped) = scoped else {
        return fresh;
    };
    let mut merged = last.clone();
    for key in scoped {
        match fresh.get(&key) {
            Some(v) => merged.insert(key, v.clone()),
            None => merged.remove(&key),
        };
    }
    merged
}

/// A pass over a few kernels reported only on them: its node-wide counts
/// (kernels by state, converged) come from every kernel's last state, and
/// the volume counts from the last whole pass.
pub fn node_wide_summary(
    scoped_converged: bool,
    last_whole: &Summary,
    kernel_states: &BTreeMap<String, KernelState>,
) -> Summary {
    let mut by_state: BTreeMap<KernelState, usize> = BTreeMap::new();
    for state in kernel_states.values() {
        *by_state.entry(*state).or_default() += 1;
    }
    Summary {
        converged: scoped_converged
            && last_whole.stale_volumes == 0
            && by_state.keys().all(|s| s.is_settled()),
        kernels_by_state: by_state,
        stale_volumes: last_whole.stale_volumes,
        policy_conflicts: last_whole.policy_conflicts,
        volumes: last_whole.volumes.clone(),
    }
}
