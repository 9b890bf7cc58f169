//! `vfolderd plan`: the actions this node would take now, in order, each
//! with the object it serves and why — terraform's plan for mounts. Built
//! from the planner's own output (never a second opinion of it), and shown
//! without any value that could carry a secret: paths, names and kinds only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::reconcile::execute::owner_of;
use crate::reconcile::plan::{Action, Actual, Want};
use crate::state::ledger::{MountKind, OwnedMount, Owner};

/// One planned action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// 1, 2, …: the order the executor takes them in.
    pub order: usize,
    /// The action kind (the `kind` label of `vfolderd_actions_total`).
    pub action: String,
    /// The mount point, directory or file it changes.
    pub target: String,
    /// `kernel/<id>` or `volume/<name>`: the object it serves (whose status
    /// says Failed if it fails), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Why the planner wants it.
    pub why: String,
    /// The object is in its backoff after a failure: the action waits until
    /// then (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits_until: Option<u64>,
}

/// An object whose last action failed, waiting out its backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// `kernel/<id>` or `volume/<name>`.
    pub object: String,
    /// Failures in a row.
    pub attempts: u32,
    /// Its actions run again at (unix seconds).
    pub until: u64,
    /// The last error (redacted, as in its status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the plan was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanSource {
    /// By the running daemon, from its own state (backoffs included).
    Daemon,
    /// By the CLI with the daemon stopped, from etcd's desired state.
    Etcd,
    /// By the CLI with the daemon stopped and etcd unreachable, from the
    /// last good desired state in the node's store.
    Stored,
}

/// What `GET /plan` answers and `vfolderd plan` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// The node.
    pub node: String,
    /// Who made it.
    pub source: PlanSource,
    /// The etcd revision of the desired state it was made from.
    pub revision: i64,
    /// Whether teardown is allowed (a desired state from a live list).
    pub live: bool,
    /// The actions, in order.
    pub steps: Vec<Step>,
    /// Objects in backoff (only the daemon knows them).
    pub backoffs: Vec<Backoff>,
}

impl PlanView {
    /// Only the steps that name `part` in their target or reason (a
    /// vfolder's uuid is in its directory's path and its binds' reasons),
    /// and the backoffs of the objects those serve.
    pub fn touching(mut self, part: &str) -> PlanView {
        self.steps
            .retain(|s| s.target.contains(part) || s.why.contains(part));
        let objects: std::collections::BTreeSet<String> =
            self.steps.iter().filter_map(|s| s.object.clone()).collect();
        self.backoffs.retain(|b| objects.contains(&b.object));
        self
    }

    /// Only what serves `object` (`kernel/<id>` or `volume/<name>`).
    pub fn only(mut self, object: &str) -> PlanView {
        self.steps.retain(|s| s.object.as_deref() == Some(object));
        self.backoffs.retain(|b| b.object == object);
        self
    }
}

/// `kernel/<id>` or `volume/<name>`.
pub fn object_name(o: &Owner) -> String {
    match o {
        Owner::Kernel(k) => format!("kernel/{k}"),
        Owner::Volume(v) => format!("volume/{v}"),
    }
}

/// The steps for `actions`; `waits` says until when an object's backoff runs.
pub fn steps(
    actions: &[Action],
    want: &Want,
    actual: &Actual,
    waits: impl Fn(&Owner) -> Option<u64>,
) -> Vec<Step> {
    actions
        .iter()
        .enumerate()
        .map(|(i, a)| {
            // The backoff is the owner's (as the executor skips by it);
            // the object shown is its kernel for a best-effort bind too.
            let owner = owner_of(a, &actual.owned_mounts);
            let object = owner.clone().or_else(|| kernel_of(a));
            Step {
                order: i + 1,
                action: a.kind().as_str().to_string(),
                target: action_target(a).display().to_string(),
                waits_until: owner.as_ref().and_then(&waits),
                object: object.as_ref().map(object_name),
                why: why(a, want, &actual.owned_mounts),
            }
        })
        .collect()
}

/// The kernel a best-effort bind serves (it has no owner: its failure
/// fails no one, but it is still that kernel's).
fn kernel_of(a: &Action) -> Option<Owner> {
    match a {
        Action::Bind { bind } | Action::Remount { bind } => {
            Some(Owner::Kernel(bind.kernel.clone()))
        }
        _ => None,
    }
}

/// The mount point, directory or file `a` changes.
pub fn action_target(a: &Action) -> PathBuf {
    match a {
        Action::Unmount { target, .. } | Action::Detach { target } | Action::Forget { target } => {
            target.clone()
        }
        Action::RemoveDir { path } | Action::MakeDir { path, .. } => path.clone(),
        Action::MountVolume { volume } | Action::Reconfigure { volume } => volume.target.clone(),
        Action::Bind { bind } | Action::Remount { bind } => bind.target.clone(),
        Action::ShareHome { home, .. } => home.clone(),
        Action::WriteToken { token } => token.path.clone(),
        Action::RemoveToken { path } => path.clone(),
    }
}

/// The reason, in the planner's terms.
fn why(a: &Action, want: &Want, owned: &HashMap<PathBuf, OwnedMount>) -> String {
    match a {
        Action::MountVolume { volume } => {
            let users = users_of(want, &volume.name);
            if users.is_empty() {
                format!(
                    "volume {} is not mounted; this node mounts it (a startup volume, or the storage role)",
                    volume.name
                )
            } else {
                format!(
                    "volume {} is not mounted; wanted by {}",
                    volume.name,
                    users.join(", ")
                )
            }
        }
        Action::Reconfigure { volume } => format!(
            "volume {}'s options changed; applied to the mount in place (data kept)",
            volume.name
        ),
        Action::Bind { bind } => format!(
            "kernel {} wants {} here ({}) and it is not bound",
            bind.kernel,
            bind.label,
            if bind.readonly { "ro" } else { "rw" }
        ),
        Action::Remount { bind } => format!(
            "kernel {}'s bind of {} has other flags than wanted ({})",
            bind.kernel,
            bind.label,
            if bind.readonly { "ro" } else { "rw" }
        ),
        Action::ShareHome { kernel, bind, .. } => {
            if *bind {
                format!("kernel {kernel}'s home is not yet a shared mount of its own")
            } else {
                format!("kernel {kernel}'s home is ours but not shared")
            }
        }
        Action::MakeDir { path, .. } => format!("{} does not exist yet", describe_dir(path, want)),
        Action::RemoveDir { path } => {
            format!(
                "nothing wants {} any more (removed only if empty)",
                path.display()
            )
        }
        Action::Unmount { target, kind } => unmount_why(target, *kind, owned),
        Action::Detach { target } => format!(
            "the mount at {} is stale (does not answer); detached and mounted again",
            target.display()
        ),
        Action::Forget { target } => format!(
            "the mount at {} is gone; its record is forgotten",
            target.display()
        ),
        Action::WriteToken { token } => format!(
            "kernel {}'s token file for volume {} is missing or due for renewal",
            token.kernel, token.volume
        ),
        Action::RemoveToken { .. } => "no kernel wants this token file any more".to_string(),
    }
}

fn unmount_why(target: &Path, kind: MountKind, owned: &HashMap<PathBuf, OwnedMount>) -> String {
    let m = owned.get(target);
    match (kind, m.and_then(|m| m.kernel.as_deref())) {
        (MountKind::Volume, _) => format!(
            "no kernel on this node uses volume {} and its linger is over",
            m.map_or("?", |m| m.volume.as_str())
        ),
        (_, Some(k)) => format!("kernel {k} no longer wants this mount (or is gone)"),
        (_, None) => "nothing wants this mount any more".to_string(),
    }
}

fn users_of(want: &Want, volume: &str) -> Vec<String> {
    want.users
        .get(volume)
        .into_iter()
        .flatten()
        .map(|k| format!("kernel {k}"))
        .collect()
}

fn describe_dir(path: &Path, want: &Want) -> String {
    if want
        .kernels
        .values()
        .any(|k| k.home.as_deref() == Some(path))
    {
        format!("the kernel home {}", path.display())
    } else {
        format!("the directory {}", path.display())
    }
}

/// The plan as an aligned table (`-o table`).
pub fn table(view: &PlanView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Node {} (plan made by {}, desired state at revision {}{})",
        view.node,
        match view.source {
            PlanSource::Daemon => "the running daemon",
            PlanSource::Etcd => "the CLI from etcd; the daemon is stopped",
            PlanSource::Stored => "the CLI from the stored desired state; etcd is unreachable",
        },
        view.revision,
        if view.live {
            ""
        } else {
            "; nothing would be torn down"
        }
    );
    if view.steps.is_empty() {
        out.push_str("No changes: the node is as wanted.\n");
    } else {
        let mut rows = vec![["#", "ACTION", "OBJECT", "TARGET", "WHY"]
            .map(String::from)
            .to_vec()];
        for s in &view.steps {
            let why = match s.waits_until {
                Some(t) => format!("{} (in backoff until {})", s.why, unix_time(t)),
                None => s.why.clone(),
            };
            rows.push(vec![
                s.order.to_string(),
                s.action.clone(),
                s.object.clone().unwrap_or_else(|| "-".into()),
                s.target.clone(),
                why,
            ]);
        }
        out.push_str(&crate::inspect::table(&rows));
    }
    for b in &view.backoffs {
        let _ = writeln!(
            out,
            "{} failed {} time(s); next try at {}{}",
            b.object,
            b.attempts,
            unix_time(b.until),
            b.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    out
}

/// RFC 3339 UTC.
pub fn unix_time(t: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    humantime::format_rfc3339_seconds(at).to_string()
}
