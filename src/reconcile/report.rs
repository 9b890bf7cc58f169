//! Status values computed from desired, resolved and observed state (pure).
//!
//! Values are JSON (which is YAML) mappings with a top-level `state`. The
//! status writer adds `since`; `scanned_at` comes from the usage scan.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::keys::Keys;
use crate::lifecycle::{LifeState, LifeStatus};
use crate::reconcile::plan::{Actual, Resolution, Want};
use crate::spec::Permission;
use crate::state::desired::Desired;
use crate::state::election::Led;
use crate::state::ledger::{MountKind, Owner};

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
    /// Its quota is enforced by the filesystem (a btrfs qgroup), and
    /// `bytes` is what the qgroup counts.
    pub enforced: bool,
}

/// A volume's state on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VolumeState {
    /// Mounted by vfolderd and healthy.
    Mounted,
    /// Not mounted (not needed here, or not yet).
    Unmounted,
    /// The last mount attempt failed, or its mount point is taken.
    Failed,
    /// Mounted, but the prober found it stale.
    Stale,
    /// The spec is malformed or the policy refuses it.
    Rejected,
}

/// A kernel's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum KernelState {
    /// Waiting for something (a vfolder record, a volume, its binds).
    Pending,
    /// Every required mount is in place: the container may start.
    Ready,
    /// Something it needs failed (the reason says what).
    Failed,
    /// Its spec is malformed or refused.
    Rejected,
}

impl KernelState {
    /// Every state, for the `vfolderd_kernels{state}` gauge.
    pub const ALL: [KernelState; 4] = [
        KernelState::Pending,
        KernelState::Ready,
        KernelState::Failed,
        KernelState::Rejected,
    ];

    /// The state's name, as in the status value.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelState::Pending => "Pending",
            KernelState::Ready => "Ready",
            KernelState::Failed => "Failed",
            KernelState::Rejected => "Rejected",
        }
    }

    /// Whether a kernel in this state needs nothing more from this node.
    pub fn is_settled(self) -> bool {
        matches!(self, KernelState::Ready | KernelState::Rejected)
    }
}

/// A vfolder's state (storage role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VfolderState {
    /// Its directory exists on its volume.
    Ready,
    /// Ready, but its last scan found more bytes than its `quota_bytes`
    /// (not enforced: writes still succeed).
    OverQuota,
    /// Its directory is being created, or its volume is not mounted here.
    Pending,
    /// Its directory could not be created.
    Failed,
    /// Its record is malformed or refused.
    Rejected,
    /// In its volume's trash (`trash: true`, or its record deleted and
    /// its retention running).
    Trashed,
    /// A move to the trash or a purge waits for the kernels that want it.
    InUse,
    /// Being purged.
    Purging,
    /// Being filled from the vfolder its record's `clone_of` names.
    Cloning,
}

impl VfolderState {
    /// The state's name, as in the status value.
    pub fn as_str(self) -> &'static str {
        match self {
            VfolderState::Ready => "Ready",
            VfolderState::OverQuota => "OverQuota",
            VfolderState::Pending => "Pending",
            VfolderState::Failed => "Failed",
            VfolderState::Rejected => "Rejected",
            VfolderState::Trashed => "Trashed",
            VfolderState::InUse => "InUse",
            VfolderState::Purging => "Purging",
            VfolderState::Cloning => "Cloning",
        }
    }
}

/// `P/status/nodes/<node>/volumes/<volume>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeStatus {
    /// The state.
    pub state: VolumeState,
    /// How many desired kernels on this node use it.
    pub users: usize,
    /// Why it is not mounted, stale or rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A refused volume still mounted because kernels use it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<&'static str>,
    /// A renewal (fresh SAS, rotated credentials) waiting for its kernels to go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal: Option<&'static str>,
    /// A changed spec not yet applied to the mount: pending until no kernel
    /// uses it, or not applied (a tmpfs change that would lose the data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// Size of a mounted volume's filesystem (`statfs`, by the prober, off
    /// the loop: as of its last probe before this pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// What an unprivileged user can still write there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
}

/// One mount (or token file) of a kernel, as its status lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MountStatus {
    /// Where it appears on the host.
    pub target: PathBuf,
    /// What it is (`vfolder:<uuid>`, `volume:<name>`, `token:<volume>`).
    pub source: String,
    /// How the kernel sees it.
    pub permission: Permission,
    /// Whether it is in place as wanted.
    pub mounted: bool,
}

/// `P/status/nodes/<node>/kernels/<kernel>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelStatus {
    /// The state.
    pub state: KernelState,
    /// The mod revision of the kernel's value this status is about.
    pub revision: i64,
    /// Its mounts and token files.
    pub mounts: Vec<MountStatus>,
    /// Why it is not Ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `P/status/vfolders/<uuid>` (storage role).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VfolderStatus {
    /// The state.
    pub state: VfolderState,
    /// The volume it lies on (absent for a record too malformed to say).
    /// Its leader writes this status ([`crate::state::election`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Its directory (recorded so the layout can change later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Files in it, as last scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Bytes in it, as last scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Its record's quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// When it was scanned (`null` for a Ready vfolder not scanned yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scanned_at: Option<Option<String>>,
    /// `enforced`: the filesystem refuses writes past `quota_bytes` (a
    /// btrfs qgroup), and `bytes` is the qgroup's count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<&'static str>,
    /// The kernels (`<node>/<kernel>`) that want it (`InUse`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<Vec<String>>,
    /// When it went to the trash (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trashed_at: Option<String>,
    /// When its record was deleted (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    /// When its purge may start (RFC 3339): `deleted_at` plus the retention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purge_at: Option<String>,
    /// Files still to remove while `Purging`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_left: Option<u64>,
    /// Why it is not Ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The storage node that wrote it.
    pub node: String,
}

impl VfolderStatus {
    /// A status in `state` saying nothing else.
    fn empty(state: VfolderState, node: &str) -> Self {
        Self {
            state,
            volume: None,
            path: None,
            files: None,
            bytes: None,
            quota_bytes: None,
            scanned_at: None,
            quota: None,
            kernels: None,
            trashed_at: None,
            deleted_at: None,
            purge_at: None,
            files_left: None,
            error: None,
            node: node.to_string(),
        }
    }
}

/// `P/status/nodes/<node>/rejected/<escaped key>`: a key that is itself invalid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectedKeyStatus {
    /// Always `Rejected`.
    pub state: KernelState,
    /// The key as written.
    pub key: String,
    /// Why it is refused.
    pub error: String,
}

/// Any status value; serialised (to JSON, which is YAML) only by the writer's edge.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Status {
    /// A volume's.
    Volume(VolumeStatus),
    /// A kernel's.
    Kernel(KernelStatus),
    /// A vfolder's.
    Vfolder(VfolderStatus),
    /// An invalid key's.
    RejectedKey(RejectedKeyStatus),
}

impl Status {
    /// The JSON value written to etcd.
    pub fn to_value(&self) -> Value {
        // Plain structs with string keys: serialising cannot fail.
        serde_json::to_value(self).expect("status types serialise to JSON")
    }
}

/// The node-wide counts of a report, for metrics and readiness.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Kernels by state, for the `vfolderd_kernels` gauge.
    pub kernels_by_state: BTreeMap<KernelState, usize>,
    /// Whether every kernel is Ready and every wanted volume Mounted.
    pub converged: bool,
    /// Wanted volumes whose mount is stale.
    pub stale_volumes: usize,
    /// Policy-refused volumes still mounted for kernels.
    pub policy_conflicts: usize,
    /// Per volume: its size and what its vfolders hold (bounded labels: no
    /// per-vfolder series).
    pub volumes: BTreeMap<String, VolumeFigures>,
}

/// One volume's figures for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeFigures {
    /// Size of its filesystem (mounted here).
    pub capacity_bytes: Option<u64>,
    /// What is left there.
    pub free_bytes: Option<u64>,
    /// Sum of its vfolders' scanned bytes (storage role).
    pub used_bytes: u64,
    /// Its vfolders by state (storage role).
    pub vfolders: BTreeMap<&'static str, usize>,
}

/// Every status this node should hold, and its counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Status key → value.
    pub statuses: BTreeMap<String, Status>,
    /// The kernels' states, by kernel id.
    pub kernel_states: BTreeMap<String, KernelState>,
    /// Counts.
    pub summary: Summary,
}

impl Report {
    /// Marks kernel `k` `Pending` (`attaching`) if it says `Ready`: it
    /// still has actions to run in this pass.
    pub fn mark_attaching(&mut self, keys: &Keys, k: &str) {
        if let Some(Status::Kernel(s)) = self.statuses.get_mut(&keys.kernel_status(k)) {
            if s.state == KernelState::Ready {
                s.state = KernelState::Pending;
                s.error = Some("attaching".to_string());
                self.kernel_states
                    .insert(k.to_string(), KernelState::Pending);
            }
        }
    }

    /// The values for the writer (serialised once, here).
    pub fn into_values(self) -> BTreeMap<String, std::sync::Arc<Value>> {
        self.statuses
            .into_iter()
            .map(|(k, s)| (k, std::sync::Arc::new(s.to_value())))
            .collect()
    }
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
    /// Trash and purge states by vfolder ([`crate::lifecycle`]).
    pub lifecycle: &'a BTreeMap<Uuid, LifeStatus>,
    /// What this storage node leads (`None`: no election, everything).
    pub led: Option<&'a Led>,
    /// The vfolder directories this process made (empty when made).
    pub made_dirs: &'a std::collections::HashSet<PathBuf>,
}

impl ReportInputs<'_> {
    /// Whether this node writes the status of a vfolder record: its
    /// volume's leader does, and the cluster leader for a record that names
    /// no volume (one vfolder status key, one writer).
    fn writes(&self, e: &crate::state::desired::Entry<crate::spec::VfolderSpec>) -> bool {
        match (&e.spec, self.led) {
            (_, None) => true,
            (Ok(vf), Some(l)) => l.volume(&vf.volume),
            (Err(_), Some(l)) => l.cluster(),
        }
    }
}

/// Computes every status value.
pub fn report(inp: &ReportInputs<'_>, d: &Desired, want: &Want, actual: &Actual) -> Report {
    let mut r = Report {
        summary: Summary {
            converged: true,
            ..Summary::default()
        },
        ..Report::default()
    };
    for (name, e) in &d.volumes {
        let status = volume_status(inp, name, e, want, actual, &mut r.summary);
        let figures = r.summary.volumes.entry(name.clone()).or_default();
        figures.capacity_bytes = status.capacity_bytes;
        figures.free_bytes = status.free_bytes;
        r.statuses
            .insert(inp.keys.volume_status(name), Status::Volume(status));
    }
    for (id, k) in &want.kernels {
        let status = kernel_status(inp, id, k, want, actual);
        if !status.state.is_settled() {
            r.summary.converged = false;
        }
        *r.summary.kernels_by_state.entry(status.state).or_default() += 1;
        r.kernel_states.insert(id.clone(), status.state);
        r.statuses
            .insert(inp.keys.kernel_status(id), Status::Kernel(status));
    }
    if inp.storage {
        for (id, e) in d.vfolders.iter().filter(|(_, e)| inp.writes(e)) {
            let status = vfolder_status(inp, id, e, want, actual);
            // A directory still to make (or that failed) is not converged; a
            // volume not mounted here is another node's business.
            let settled = !matches!(status.state, VfolderState::Pending | VfolderState::Failed);
            if !settled && status.path.is_some() {
                r.summary.converged = false;
            }
            if let Ok(vf) = &e.spec {
                let figures = r.summary.volumes.entry(vf.volume.clone()).or_default();
                figures.used_bytes += status.bytes.unwrap_or(0);
                *figures.vfolders.entry(status.state.as_str()).or_default() += 1;
            }
            r.statuses
                .insert(inp.keys.vfolder_status(id), Status::Vfolder(status));
        }
        // Deleted records whose directories are still in the trash.
        for (id, l) in inp.lifecycle {
            let led = inp.led.is_none_or(|led| led.volume(&l.volume));
            if led && !d.vfolders.contains_key(id) {
                let status = life_status(inp, l);
                r.statuses
                    .insert(inp.keys.vfolder_status(id), Status::Vfolder(status));
            }
        }
        // Deleted records the lifecycle worker has not looked at yet: the
        // status says so rather than vanishing and coming back `Trashed`.
        for (id, t) in &d.tombstones {
            let led = inp.led.is_none_or(|led| led.volume(&t.volume));
            if led && !d.vfolders.contains_key(id) && !inp.lifecycle.contains_key(id) {
                let status = VfolderStatus {
                    volume: Some(t.volume.clone()),
                    error: Some("record deleted: moving to the trash".into()),
                    ..VfolderStatus::empty(VfolderState::Pending, &inp.keys.node)
                };
                r.statuses
                    .insert(inp.keys.vfolder_status(id), Status::Vfolder(status));
            }
        }
    }
    for (key, reason) in &d.invalid_keys {
        let status = RejectedKeyStatus {
            state: KernelState::Rejected,
            key: key.clone(),
            error: reason.clone(),
        };
        r.statuses
            .insert(inp.keys.rejected_status(key), Status::RejectedKey(status));
    }
    r
}

/// Whether the mount visible at `t` is one vfolderd owns.
fn owned_mounted(actual: &Actual, t: &std::path::Path) -> bool {
    actual.ours(t)
}

/// Whether the mount visible at `t` is one vfolderd did not make (on a
/// target it never mounted, over its mount, or in place of it).
fn occupied(actual: &Actual, t: &std::path::Path) -> bool {
    actual.mounts.top(t).is_some() && !actual.ours(t)
}

fn occupied_message(t: &std::path::Path) -> String {
    format!(
        "{} is occupied by a mount vfolderd did not make",
        t.display()
    )
}

fn volume_status(
    inp: &ReportInputs<'_>,
    name: &String,
    e: &crate::state::desired::Entry<crate::spec::VolumeSpec>,
    want: &Want,
    actual: &Actual,
    summary: &mut Summary,
) -> VolumeStatus {
    let mut s = volume_state(inp, name, e, want, actual, summary);
    let target = want.volumes.get(name).map(|v| &v.target);
    if s.state == VolumeState::Mounted {
        if let Some(c) = target.and_then(|t| actual.capacity.get(t)) {
            s.capacity_bytes = Some(c.capacity_bytes);
            s.free_bytes = Some(c.free_bytes);
        }
    }
    s
}

fn volume_state(
    inp: &ReportInputs<'_>,
    name: &String,
    e: &crate::state::desired::Entry<crate::spec::VolumeSpec>,
    want: &Want,
    actual: &Actual,
    summary: &mut Summary,
) -> VolumeStatus {
    let users = want.users.get(name).map_or(0, |u| u.len());
    let status = |state, error: Option<String>| VolumeStatus {
        state,
        users,
        error,
        kept: None,
        renewal: None,
        change: None,
        capacity_bytes: None,
        free_bytes: None,
    };
    let owned_volume = || {
        actual
            .owned_mounts
            .values()
            .find(|m| m.kind == MountKind::Volume && &m.volume == name)
    };
    let target = want.volumes.get(name).map(|v| v.target.clone());
    match (&e.spec, target) {
        (Err(reason), _) => {
            let still = actual.owned_mounts.values().any(|m| {
                m.kind == MountKind::Volume && &m.volume == name && actual.ours(&m.target)
            });
            let mut s = status(VolumeState::Rejected, Some(reason.to_string()));
            if still && reason.is_policy() {
                summary.policy_conflicts += 1;
                s.kept = Some("still mounted while kernels use it");
            }
            s
        }
        (Ok(_), Some(t)) if owned_mounted(actual, &t) && actual.stale.contains_key(&t) => {
            summary.stale_volumes += 1;
            status(VolumeState::Stale, Some(actual.stale[&t].clone()))
        }
        (Ok(_), Some(t)) if owned_mounted(actual, &t) && actual.renew.contains(&t) && users > 0 => {
            let mut s = status(VolumeState::Mounted, None);
            s.renewal =
                Some("pending: remounted with a fresh SAS or rotated credentials once unused");
            s
        }
        (Ok(_), Some(t)) if owned_mounted(actual, &t) => {
            let mut s = status(VolumeState::Mounted, None);
            let change = want
                .volumes
                .get(name)
                .and_then(|v| crate::reconcile::plan::spec_change(&actual.owned_mounts[&t], v));
            s.change = match change {
                Some(crate::reconcile::plan::SpecChange::Remount) if users > 0 => Some(
                    "pending: mounted anew with the changed spec once no kernel uses it".into(),
                ),
                Some(crate::reconcile::plan::SpecChange::Kept(why)) => Some(why),
                // The mount stays as it was; the remount is retried.
                Some(crate::reconcile::plan::SpecChange::InPlace) => inp
                    .failures
                    .get(&Owner::Volume(name.clone()))
                    .map(|f| format!("not applied yet: {}", f.message)),
                _ => None,
            };
            s
        }
        (Ok(_), Some(t)) if occupied(actual, &t) => {
            summary.converged = false;
            status(VolumeState::Failed, Some(occupied_message(&t)))
        }
        (Ok(_), Some(_)) => {
            summary.converged = false;
            match inp.failures.get(&Owner::Volume(name.clone())) {
                Some(f) => status(VolumeState::Failed, Some(f.message.clone())),
                None => status(VolumeState::Unmounted, None),
            }
        }
        (Ok(_), None) => match owned_volume() {
            Some(m) if actual.ours(&m.target) => status(VolumeState::Mounted, None),
            _ => status(VolumeState::Unmounted, None),
        },
    }
}

fn kernel_status(
    inp: &ReportInputs<'_>,
    id: &String,
    k: &crate::reconcile::plan::WantKernel,
    want: &Want,
    actual: &Actual,
) -> KernelStatus {
    let mut mounts = Vec::new();
    let mut all_ok = true;
    let mut conflict = None;
    for t in &k.binds {
        let b = &want.binds[t];
        let ok = owned_mounted(actual, t)
            && actual.mounts.top(t).is_some_and(|m| {
                m.is_readonly() == b.readonly && m.has_option("nosuid") && m.has_option("nodev")
            });
        if occupied(actual, t) {
            conflict = Some(occupied_message(t));
        }
        all_ok &= ok || !b.required;
        mounts.push(MountStatus {
            target: t.clone(),
            source: b.label.clone(),
            permission: if b.readonly {
                Permission::Ro
            } else {
                Permission::Rw
            },
            mounted: ok,
        });
    }
    for t in want.tokens.values().filter(|t| &t.kernel == id) {
        // Recorded, and not missing or due (the record is written before the file).
        let ok = actual.owned_tokens.contains_key(&t.path) && !actual.token_renew.contains(&t.path);
        all_ok &= ok;
        mounts.push(MountStatus {
            target: t.path.clone(),
            source: format!("token:{}", t.volume),
            permission: if t.write {
                Permission::Rw
            } else {
                Permission::Ro
            },
            mounted: ok,
        });
    }
    let failure = inp.failures.get(&Owner::Kernel(id.clone()));
    let (state, error) = match &k.resolution {
        Resolution::Rejected(r) => (KernelState::Rejected, Some(r.clone())),
        Resolution::Pending(r) => (KernelState::Pending, Some(r.clone())),
        _ if conflict.is_some() => (KernelState::Failed, conflict),
        Resolution::Failed(r) if all_ok => (KernelState::Failed, Some(r.clone())),
        Resolution::Resolved if all_ok => (KernelState::Ready, None),
        _ => match failure {
            Some(f) if f.pending => (KernelState::Pending, Some(f.message.clone())),
            Some(f) => (KernelState::Failed, Some(f.message.clone())),
            None => (KernelState::Pending, Some("attaching".to_string())),
        },
    };
    KernelStatus {
        state,
        revision: k.revision,
        mounts,
        error,
    }
}

fn vfolder_status(
    inp: &ReportInputs<'_>,
    id: &Uuid,
    e: &crate::state::desired::Entry<crate::spec::VfolderSpec>,
    want: &Want,
    actual: &Actual,
) -> VfolderStatus {
    let volume = e.spec.as_ref().ok().map(|vf| vf.volume.clone());
    let status = |state, path: Option<&PathBuf>, error: Option<String>| VfolderStatus {
        volume: volume.clone(),
        path: path.cloned(),
        error,
        ..VfolderStatus::empty(state, &inp.keys.node)
    };
    let vf = match &e.spec {
        Err(reason) => return status(VfolderState::Rejected, None, Some(reason.to_string())),
        Ok(vf) => vf,
    };
    if let Some(l) = inp.lifecycle.get(id) {
        return VfolderStatus {
            quota_bytes: vf.quota_bytes,
            ..life_status(inp, l)
        };
    }
    if vf.trash {
        let why = "moving to the trash".to_string();
        return status(VfolderState::Pending, None, Some(why));
    }
    match want.vfolder_dirs.get(id) {
        Some((_, path)) if actual.dirs.contains(path) => {
            let u = inp.usage.get(id);
            let bytes = u.map_or(0, |u| u.bytes);
            let (state, error) = match vf.quota_bytes {
                Some(q) if bytes > q => (
                    VfolderState::OverQuota,
                    Some(format!("{bytes} bytes, over its quota of {q}")),
                ),
                _ => (VfolderState::Ready, None),
            };
            // Not scanned yet: a vfolder made since this node leads its
            // volume is empty; an older one (a takeover, a restart) is
            // unknown until scanned, not "0 bytes".
            let known = u.is_some() || made_here(inp, path);
            VfolderStatus {
                files: known.then(|| u.map_or(0, |u| u.files)),
                bytes: known.then_some(bytes),
                quota_bytes: vf.quota_bytes,
                quota: u.filter(|u| u.enforced).map(|_| "enforced"),
                scanned_at: Some(u.map(|u| u.scanned_at.clone())),
                ..status(state, Some(path), error)
            }
        }
        Some((_, path))
            if crate::lifecycle::trash_of(path).is_some_and(|t| actual.dirs.contains(&t)) =>
        {
            let why = "restoring from the trash".to_string();
            status(VfolderState::Pending, Some(path), Some(why))
        }
        Some((_, path)) => match inp.dir_failures.get(path) {
            Some(err) => status(VfolderState::Failed, Some(path), Some(err.clone())),
            None => status(
                VfolderState::Pending,
                Some(path),
                Some("creating directory".into()),
            ),
        },
        None => {
            let error = format!("volume {} is not mounted on this node", vf.volume);
            status(VfolderState::Pending, None, Some(error))
        }
    }
}

/// Whether this process made the vfolder's directory (so it was empty
/// then); always, with no election (a node alone).
fn made_here(inp: &ReportInputs<'_>, path: &std::path::Path) -> bool {
    inp.led.is_none() || inp.made_dirs.contains(path)
}

/// The status of a vfolder in the trash, waiting for kernels, or being purged.
fn life_status(inp: &ReportInputs<'_>, l: &LifeStatus) -> VfolderStatus {
    let at = |t: Option<u64>| t.map(rfc3339);
    let (state, error) = match l.state {
        LifeState::Trashed => (VfolderState::Trashed, None),
        LifeState::Purging => (VfolderState::Purging, None),
        LifeState::Cloning => (VfolderState::Cloning, None),
        LifeState::Pending => (VfolderState::Pending, None),
        LifeState::InUse => (
            VfolderState::InUse,
            Some(format!(
                "wanted by {}: nothing moves until they let go",
                l.kernels.join(", ")
            )),
        ),
    };
    VfolderStatus {
        volume: Some(l.volume.clone()),
        path: Some(l.path.clone()),
        kernels: (!l.kernels.is_empty()).then(|| l.kernels.clone()),
        trashed_at: at(l.trashed_at),
        deleted_at: at(l.deleted_at),
        purge_at: at(l.purge_at),
        files_left: l.files_left,
        error: l.error.clone().or(error),
        ..VfolderStatus::empty(state, &inp.keys.node)
    }
}

/// Unix seconds as RFC 3339; past year 9999 (a retention of "forever",
/// a hostile info file) as the plain number, never a panic.
fn rfc3339(secs: u64) -> String {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if secs > MAX {
        return secs.to_string();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}
