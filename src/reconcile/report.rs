//! Status values computed from desired, resolved and observed state (pure).
//!
//! Values are JSON (which is YAML) mappings with a top-level `state`. The
//! status writer adds `since`; `scanned_at` comes from the usage scan.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::keys::Keys;
use crate::reconcile::plan::{Actual, Resolution, Want};
use crate::state::desired::Desired;
use crate::state::ledger::Owner;

/// Why an object's last action failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message (redacted).
    pub message: String,
    /// Report `Pending` rather than `Failed` (waiting on something outside).
    pub pending: bool,
}

/// A vfolder's measured usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Regular files and other non-directories.
    pub files: u64,
    /// Sum of their apparent sizes.
    pub bytes: u64,
    /// When it was measured (RFC 3339).
    pub scanned_at: String,
}

/// Everything the status writer should hold, plus counters for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Status key → value.
    /// (Values are shared: a pass over a few kernels copies the map, not every value.)
    pub entries: BTreeMap<String, std::sync::Arc<Value>>,
    /// Kernels by state, for the `vfolderd_kernels` gauge.
    pub kernels_by_state: BTreeMap<&'static str, usize>,
    /// Whether every kernel is Ready and every wanted volume Mounted.
    pub converged: bool,
    /// Wanted volumes whose mount is stale.
    pub stale_volumes: usize,
    /// Policy-refused volumes still mounted for kernels.
    pub policy_conflicts: usize,
}

/// Inputs of [`report`] besides the state.
pub struct ReportInputs<'a> {
    /// Key layout.
    pub keys: &'a Keys,
    /// Has the storage role (writes vfolder statuses).
    pub storage: bool,
    /// Failures by object.
    pub failures: &'a BTreeMap<Owner, Failure>,
    /// Failures of vfolder directory creation, by path.
    pub dir_failures: &'a BTreeMap<PathBuf, String>,
    /// Usage by vfolder.
    pub usage: &'a BTreeMap<Uuid, Usage>,
}

/// Computes every status value.
pub fn report(inp: &ReportInputs<'_>, d: &Desired, want: &Want, actual: &Actual) -> Report {
    let mut r = Report {
        converged: true,
        ..Report::default()
    };
    let owned_mounted =
        |t: &PathBuf| actual.owned_mounts.contains_key(t) && actual.mounts.top(t).is_some();
    let occupied =
        |t: &PathBuf| !actual.owned_mounts.contains_key(t) && actual.mounts.top(t).is_some();

    for (name, e) in &d.volumes {
        let users = want.users.get(name).map_or(0, |u| u.len());
        let target = want.volumes.get(name).map(|v| v.target.clone());
        let failure = inp.failures.get(&Owner::Volume(name.clone()));
        let owned_target = actual
            .owned_mounts
            .values()
            .find(|m| m.kind == crate::state::ledger::MountKind::Volume && &m.volume == name);
        let v = match (&e.spec, target) {
            (Err(reason), _) => {
                let still = actual.owned_mounts.values().any(|m| {
                    m.kind == crate::state::ledger::MountKind::Volume
                        && &m.volume == name
                        && actual.mounts.top(&m.target).is_some()
                });
                if still && reason.starts_with("policy ") {
                    r.policy_conflicts += 1;
                    json!({"state": "Rejected", "users": users, "error": reason, "kept": "still mounted while kernels use it"})
                } else {
                    json!({"state": "Rejected", "users": users, "error": reason})
                }
            }
            (Ok(_), Some(t)) if owned_mounted(&t) && actual.stale.contains_key(&t) => {
                r.stale_volumes += 1;
                json!({"state": "Stale", "users": users, "error": actual.stale[&t]})
            }
            (Ok(_), Some(t)) if owned_mounted(&t) && actual.renew.contains(&t) && users > 0 => {
                json!({"state": "Mounted", "users": users, "renewal": "pending: remounted with a fresh SAS or rotated credentials once unused"})
            }
            (Ok(_), Some(t)) if owned_mounted(&t) => json!({"state": "Mounted", "users": users}),
            (Ok(_), Some(t)) if occupied(&t) => {
                r.converged = false;
                json!({"state": "Failed", "users": users, "error": format!("{} is occupied by a mount vfolderd did not make", t.display())})
            }
            (Ok(_), Some(_)) => {
                r.converged = false;
                match failure {
                    Some(f) => json!({"state": "Failed", "users": users, "error": f.message}),
                    None => json!({"state": "Unmounted", "users": users}),
                }
            }
            (Ok(_), None) => match owned_target {
                Some(m) if actual.mounts.top(&m.target).is_some() => {
                    json!({"state": "Mounted", "users": users})
                }
                _ => json!({"state": "Unmounted", "users": users}),
            },
        };
        r.entries.insert(inp.keys.volume_status(name), v.into());
    }

    for (id, k) in &want.kernels {
        let mut mounts = Vec::new();
        let mut all_ok = true;
        let mut conflict = None;
        for t in &k.binds {
            let b = &want.binds[t];
            let top = actual.mounts.top(t);
            let ok = owned_mounted(t)
                && top.is_some_and(|m| {
                    m.is_readonly() == b.readonly && m.has_option("nosuid") && m.has_option("nodev")
                });
            if occupied(t) {
                conflict = Some(format!(
                    "{} is occupied by a mount vfolderd did not make",
                    t.display()
                ));
            }
            all_ok &= ok || !b.required;
            mounts.push(json!({
                "target": t,
                "source": b.label,
                "permission": if b.readonly { "ro" } else { "rw" },
                "mounted": ok,
            }));
        }
        for t in want.tokens.values().filter(|t| &t.kernel == id) {
            // Recorded, and not missing or due (the record is written before the file).
            let ok =
                actual.owned_tokens.contains_key(&t.path) && !actual.token_renew.contains(&t.path);
            all_ok &= ok;
            mounts.push(json!({
                "target": t.path,
                "source": format!("token:{}", t.volume),
                "permission": if t.write { "rw" } else { "ro" },
                "mounted": ok,
            }));
        }
        let failure = inp.failures.get(&Owner::Kernel(id.clone()));
        let (state, error) = match &k.resolution {
            Resolution::Rejected(r) => ("Rejected", Some(r.clone())),
            Resolution::Pending(r) => ("Pending", Some(r.clone())),
            _ if conflict.is_some() => ("Failed", conflict),
            Resolution::Failed(r) if all_ok => ("Failed", Some(r.clone())),
            Resolution::Resolved if all_ok => ("Ready", None),
            _ => match failure {
                Some(f) if f.pending => ("Pending", Some(f.message.clone())),
                Some(f) => ("Failed", Some(f.message.clone())),
                None => ("Pending", Some("attaching".to_string())),
            },
        };
        if state != "Ready" && state != "Rejected" {
            r.converged = false;
        }
        *r.kernels_by_state.entry(state).or_default() += 1;
        let mut v = json!({"state": state, "revision": k.revision, "mounts": mounts});
        if let Some(e) = error {
            v["error"] = json!(e);
        }
        r.entries.insert(inp.keys.kernel_status(id), v.into());
    }

    if inp.storage {
        for (id, e) in &d.vfolders {
            let v = match &e.spec {
                Err(reason) => json!({"state": "Rejected", "error": reason, "node": inp.keys.node}),
                Ok(vf) => match want.vfolder_dirs.get(id) {
                    Some((_, path)) if actual.dirs.contains(path) => {
                        let u = inp.usage.get(id);
                        json!({
                            "state": "Ready",
                            "path": path,
                            "files": u.map_or(0, |u| u.files),
                            "bytes": u.map_or(0, |u| u.bytes),
                            "scanned_at": u.map(|u| u.scanned_at.clone()),
                            "node": inp.keys.node,
                        })
                    }
                    Some((_, path)) => {
                        r.converged = false;
                        match inp.dir_failures.get(path) {
                            Some(err) => {
                                json!({"state": "Failed", "path": path, "error": err, "node": inp.keys.node})
                            }
                            None => {
                                json!({"state": "Pending", "path": path, "error": "creating directory", "node": inp.keys.node})
                            }
                        }
                    }
                    None => json!({
                        "state": "Pending",
                        "error": format!("volume {} is not mounted on this node", vf.volume),
                        "node": inp.keys.node,
                    }),
                },
            };
            r.entries.insert(inp.keys.vfolder_status(id), v.into());
        }
    }

    for (key, reason) in &d.invalid_keys {
        r.entries.insert(
            inp.keys.rejected_status(key),
            json!({"state": "Rejected", "key": key, "error": reason}).into(),
        );
    }
    r
}
