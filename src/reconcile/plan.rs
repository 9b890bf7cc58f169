//! The planner: desired × actual → ordered actions. A pure function: no I/O,
//! no clock, no logging, so it can be tested on tables and with proptest.
//!
//! Two steps. [`resolve`] turns the desired objects into the concrete mounts,
//! binds and directories this node should have ([`Want`]); [`plan`] compares
//! that with the observed [`Actual`] state and emits [`Action`]s in a fixed
//! order: teardown first (binds deep→shallow, then volumes no bind still uses,
//! then directories deep→shallow), then setup (volume mount points and
//! mounts, vfolder directories, kernel homes, bind targets and binds).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::reconcile::actual::MountTable;
use crate::spec::{vfolder_relpath, Fstype, HealPolicy, KernelMount, MountAt, Permission};
use crate::state::desired::Desired;
use crate::state::ledger::{MountKind, OwnedDirs, OwnedMounts, OwnedTokens, Owner};

/// The node facts the planner needs.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Has the agent role (kernels, startup volumes).
    pub agent: bool,
    /// Has the storage role (every volume, vfolder directories).
    pub storage: bool,
    /// Volume `<v>` is mounted at `<volumes_root>/<v>`.
    pub volumes_root: PathBuf,
    /// Kernel homes lie inside this.
    pub kernels_root: PathBuf,
    /// The policy in force (forced options, limits, rw owners).
    pub policy: std::sync::Arc<crate::policy::Policy>,
    /// Who kernels run as, and who owns volume files, unless their values say.
    pub identity: Identity,
    /// The volumes whose directory work this storage node was elected to do
    /// ([`crate::state::election`]); `None`: no election, every volume.
    pub led: Option<std::sync::Arc<crate::state::election::Led>>,
    /// Leading, but its lease was renewed too long ago: no directory is made.
    pub fenced: bool,
}

impl NodeView {
    /// Whether this node does `volume`'s directory work and vfolder statuses.
    pub fn leads(&self, volume: &str) -> bool {
        self.led.as_ref().is_none_or(|l| l.volume(volume))
    }
}

/// A uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl Default for Identity {
    /// Backend.AI's `work` user.
    fn default() -> Self {
        Self {
            uid: 1000,
            gid: 1000,
        }
    }
}

/// Observed state.
#[derive(Debug, Clone, Default)]
pub struct Actual {
    /// The kernel's mount table.
    pub mounts: std::sync::Arc<MountTable>,
    /// The ledger's mounts.
    pub owned_mounts: OwnedMounts,
    /// The ledger's directories.
    pub owned_dirs: OwnedDirs,
    /// Which of [`Want::paths_to_observe`] exist as directories.
    pub dirs: HashSet<PathBuf>,
    /// Volume mount points the prober found stale, with the reason.
    pub stale: BTreeMap<PathBuf, String>,
    /// Volume mount points with their capacity, as the prober last saw them.
    pub capacity: BTreeMap<PathBuf, crate::reconcile::probe::Capacity>,
    /// Blob volume mount points whose SAS is in its last third: remounted
    /// with a fresh one as soon as no kernel uses them.
    pub renew: BTreeSet<PathBuf>,
    /// The ledger's token files.
    pub owned_tokens: OwnedTokens,
    /// Token files to write again (in their last third, or gone from disk).
    pub token_renew: BTreeSet<PathBuf>,
    /// Volumes that do not answer (a stat below them timed out, or the
    /// prober found them stale): nothing below them is touched this pass.
    pub hung_volumes: BTreeSet<String>,
}

/// What is visible at a target the ledger has a record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible {
    /// Nothing is mounted there.
    Nothing,
    /// The mount the record names (for a record without an id: whatever is
    /// mounted there, judged by its path as before mount ids).
    Ours,
    /// Someone else's mount sits on ours, or on a directory of its path:
    /// ours cannot be reached by its path, and theirs is not ours to touch.
    Covered,
    /// Ours is gone (unmounted, or made in an earlier boot) and someone
    /// else's mount is there.
    Replaced,
}

impl Actual {
    /// Which mount is visible at the target of `record`, by the unique id
    /// it names where the table's ids are comparable with it.
    pub fn visible(&self, record: &crate::state::ledger::OwnedMount) -> Visible {
        let Some(top) = self.mounts.top(&record.target) else {
            return Visible::Nothing;
        };
        let Some(stamp) = record.mount_id else {
            return Visible::Ours;
        };
        let scope = self.mounts.id_scope();
        if scope.boot.is_some_and(|b| b != stamp.boot) {
            // No mount outlives a reboot.
            return Visible::Replaced;
        }
        // Compared with the table's kind of id (a mountinfo id is reused once
        // its mount goes: a mount in place of ours may then pass for ours).
        let Some(id) = (if scope.unique { stamp.id } else { stamp.short }) else {
            return Visible::Ours;
        };
        if top.id == id && self.reachable(top) {
            Visible::Ours
        } else if top.id == id || self.mounts.stack(&record.target).iter().any(|m| m.id == id) {
            Visible::Covered
        } else {
            Visible::Replaced
        }
    }

    /// Whether `m`'s path leads to it: every mount on a directory of its
    /// path is the one it sits in (its parent, theirs, ...), up to the
    /// first that vfolderd did not make (a root it mounts under). A mount
    /// someone put on the home a bind sits in hides the bind: unmounting it
    /// by its path would reach theirs.
    fn reachable(&self, m: &crate::reconcile::actual::MountEntry) -> bool {
        let mut expect = m.parent;
        for dir in m.mount_point.ancestors().skip(1) {
            let Some(top) = self.mounts.top(dir) else {
                continue;
            };
            if top.id != expect {
                return false;
            }
            if !self.owned_mounts.contains_key(dir) {
                return true;
            }
            expect = top.parent;
        }
        true
    }

    /// Whether the mount visible at `t` is one vfolderd owns.
    pub fn ours(&self, t: &Path) -> bool {
        self.owned_mounts
            .get(t)
            .is_some_and(|m| self.visible(m) == Visible::Ours)
    }
}

/// A volume this node should have mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantVolume {
    /// Volume name.
    pub name: String,
    /// `<volumes_root>/<name>`.
    pub target: PathBuf,
    /// fstype.
    pub fstype: Fstype,
    /// Source.
    pub source: String,
    /// Options as given (secrets included: the executor moves them to a file).
    pub options: Vec<String>,
    /// Node-local credentials file name.
    pub credentials: Option<String>,
    /// startup | requested.
    pub at: MountAt,
    /// Whether a stale mount is healed under running kernels too.
    pub heal: HealPolicy,
    /// Mount it read-only (a startup dataset with `access: ro`).
    pub readonly: bool,
    /// Create its blob container if missing (storage role, `create: true`).
    pub create: bool,
    /// Who owns its vfolder directories and files.
    pub owner: Identity,
    /// For bind volumes: the directory the policy allows binds beneath. The
    /// source is opened from it component by component without following
    /// symlinks, so a symlink swapped in below it cannot lead out.
    pub anchor: PathBuf,
}

/// A bind into a kernel home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantBind {
    /// `<home>/<name>`.
    pub target: PathBuf,
    /// The kernel it serves.
    pub kernel: String,
    /// The volume the source lies on.
    pub volume: String,
    /// The source directory (a vfolder directory or a volume root).
    pub source: PathBuf,
    /// Bind read-only.
    pub readonly: bool,
    /// What it is, for status: `vfolder:<uuid>` or `volume:<name>`.
    pub label: String,
    /// For a kernel whose uid/gid differ from the volume owner's: the ids
    /// the bind shows differently (an idmapped bind).
    pub idmap: Option<crate::reconcile::newmount::IdMap>,
    /// A vfolder the kernel asked for (its failure fails the kernel), or a
    /// startup volume bound into every home (best effort: a broken shared
    /// dataset must not stop every kernel on the node; its volume status and
    /// the kernel's mount list show it).
    pub required: bool,
}

/// How a kernel's desired attachments resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Everything it names exists; its binds are planned.
    Resolved,
    /// It waits for something (a vfolder record, a volume spec).
    Pending(String),
    /// Its spec is invalid.
    Rejected(String),
    /// Its binds are planned, but part of it cannot be served.
    Failed(String),
}

/// A kernel's resolved attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantKernel {
    /// mod revision of its key.
    pub revision: i64,
    /// Home directory.
    pub home: Option<PathBuf>,
    /// Owner of created directories.
    pub uid: Option<u32>,
    /// Group of created directories.
    pub gid: Option<u32>,
    /// Outcome of resolution.
    pub resolution: Resolution,
    /// Targets of its binds (keys of [`Want::binds`]).
    pub binds: Vec<PathBuf>,
}

/// A vfolder directory's quota, for filesystems that enforce one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaAsk {
    /// The limit (`None`: none, but still a subvolume, so one can be set later).
    pub bytes: Option<u64>,
}

/// What this node should look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// Volumes to mount.
    pub volumes: BTreeMap<String, WantVolume>,
    /// vfolder directories to create (storage role): uuid → (volume, path).
    pub vfolder_dirs: BTreeMap<Uuid, (String, PathBuf)>,
    /// Of those, the clones: their directories are made whole by the
    /// lifecycle worker, never empty by a pass.
    pub clones: BTreeSet<Uuid>,
    /// Of those, the quotas (`quota_bytes`).
    pub quotas: BTreeMap<Uuid, u64>,
    /// Binds by target.
    pub binds: HashMap<PathBuf, WantBind>,
    /// Kernels.
    pub kernels: BTreeMap<String, WantKernel>,
    /// volume → kernels whose binds use it.
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Kernels whose owned binds must stay although none are planned (their
    /// spec is rejected or waits): an error never unmounts.
    pub held_kernels: BTreeSet<String>,
    /// Volumes whose spec is rejected: an owned mount of theirs stays.
    pub held_volumes: BTreeSet<String>,
    /// Volumes the policy refuses: mounted only while kernels still use them.
    pub refused_volumes: BTreeSet<String>,
    /// Per-user SAS token files, by path.
    pub tokens: BTreeMap<PathBuf, WantToken>,
    /// Kernel homes → kernel (for the overlap check of kernels added later).
    pub homes: BTreeMap<PathBuf, String>,
}

/// A per-user SAS token file in a kernel home (`<home>/.vfolderd/sas/<volume>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantToken {
    /// The file.
    pub path: PathBuf,
    /// The kernel.
    pub kernel: String,
    /// The blob volume.
    pub volume: String,
    /// Its container URL.
    pub source: String,
    /// Its account-key credential name.
    pub credentials: Option<String>,
    /// Write access (else read + list).
    pub write: bool,
    /// Owner of the file.
    pub uid: Option<u32>,
    /// Group of the file.
    pub gid: Option<u32>,
}

impl Want {
    /// The directories the planner asks about: observe these into [`Actual::dirs`].
    /// The paths whose existence a pass needs that lie outside any volume
    /// (vfolder directories, which lie inside one, are observed per volume
    /// with a timeout: see [`crate::reconcile::observe`]).
    pub fn paths_to_observe(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.volumes.values().map(|v| v.target.clone()).collect();
        out.extend(self.kernels.values().filter_map(|k| k.home.clone()));
        out.extend(self.binds.keys().cloned());
        out
    }
}

/// Resolves desired objects into concrete mounts for this node.
pub fn resolve(node: &NodeView, d: &Desired) -> Want {
    let mut w = Want::default();
    resolve_volumes(node, d, &mut w);
    if node.storage {
        for (id, e) in &d.vfolders {
            if let Ok(vf) = &e.spec {
                // A vfolder in the trash has no live directory to make.
                if w.volumes.contains_key(&vf.volume) && !vf.trash && node.leads(&vf.volume) {
                    let path = node.volumes_root.join(&vf.volume).join(vfolder_relpath(id));
                    w.vfolder_dirs.insert(*id, (vf.volume.clone(), path));
                    if vf.clone_of.is_some() {
                        w.clones.insert(*id);
                    }
                    if let Some(q) = vf.quota_bytes {
                        w.quotas.insert(*id, q);
                    }
                }
            }
        }
    }
    let startup = startup_volumes(d);
    let mut homes: BTreeMap<PathBuf, String> = BTreeMap::new();
    // Oldest first: of two kernels whose homes overlap, the one created
    // first (a running kernel) keeps its home; a newcomer is refused.
    let mut kernels: Vec<_> = d.kernels.iter().collect();
    kernels.sort_by_key(|(id, e)| (e.created, *id));
    for (id, e) in kernels {
        resolve_kernel(node, d, &startup, &mut homes, &mut w, id, e);
    }
    w.homes = homes;
    w
}

/// Adds volume `name` to what this node mounts (once), if its spec is valid.
fn want_volume(node: &NodeView, d: &Desired, w: &mut Want, name: &str) {
    if w.volumes.contains_key(name) {
        return;
    }
    let Some(Ok(spec)) = d.volumes.get(name).map(|e| &e.spec) else {
        return;
    };
    let options = node
        .policy
        .check_volume(
            spec.mount.fstype.as_str(),
            &spec.mount.path,
            &spec.option_list(),
        )
        // Validated at parse time; the forced options come from the policy.
        .unwrap_or_else(|_| spec.option_list());
    w.volumes.insert(
        name.to_string(),
        WantVolume {
            name: name.to_string(),
            target: node.volumes_root.join(name),
            fstype: spec.mount.fstype.clone(),
            source: spec.mount.path.clone(),
            options,
            credentials: spec.mount.credentials.clone(),
            at: spec.mount.at,
            heal: spec.heal,
            readonly: spec.access == Permission::Ro && spec.mount.at == MountAt::Startup,
            create: spec.create && node.storage,
            anchor: node.policy.bind_anchor(&spec.mount.path),
            owner: Identity {
                uid: spec.uid.unwrap_or(node.identity.uid),
                gid: spec.gid.unwrap_or(node.identity.gid),
            },
        },
    );
}

/// The volumes the node mounts whatever kernels want (storage: all; agent:
/// startup ones), and those held in place because their value is malformed.
fn resolve_volumes(node: &NodeView, d: &Desired, w: &mut Want) {
    for (name, e) in &d.volumes {
        match &e.spec {
            // A malformed value never unmounts anything; a policy refusal
            // only keeps the mount while kernels use it (see `plan`).
            Err(r) if !r.is_policy() => {
                w.held_volumes.insert(name.clone());
            }
            Err(_) => {
                w.refused_volumes.insert(name.clone());
            }
            Ok(spec) => {
                if node.storage || (node.agent && spec.mount.at == MountAt::Startup) {
                    want_volume(node, d, w, name);
                }
            }
        }
    }
}

/// Startup volumes (bound into every kernel's home), each with whether it is read-only.
fn startup_volumes(d: &Desired) -> Vec<(&String, bool)> {
    d.volumes
        .iter()
        .filter_map(|(n, e)| e.spec.as_ref().ok().map(|s| (n, s)))
        .filter(|(_, s)| s.mount.at == MountAt::Startup)
        .map(|(n, s)| (n, s.access != Permission::Rw))
        .collect()
}

/// Resolves one kernel into `w`: its binds and tokens, or why it is held.
fn resolve_kernel(
    node: &NodeView,
    d: &Desired,
    startup: &[(&String, bool)],
    homes: &mut BTreeMap<PathBuf, String>,
    w: &mut Want,
    id: &str,
    e: &crate::state::desired::Entry<crate::spec::KernelSpec>,
) {
    let mut k = WantKernel {
        revision: e.revision,
        home: None,
        uid: None,
        gid: None,
        resolution: Resolution::Resolved,
        binds: vec![],
    };
    let hold = |w: &mut Want, mut k: WantKernel, why: Resolution| {
        k.resolution = why;
        w.held_kernels.insert(id.to_string());
        w.kernels.insert(id.to_string(), k);
    };
    let spec = match (&e.spec, node.agent) {
        (Err(reason), _) => return hold(w, k, Resolution::Rejected(reason.to_string())),
        (Ok(_), false) => {
            return hold(
                w,
                k,
                Resolution::Rejected("this node has no agent role".into()),
            )
        }
        (Ok(spec), true) => spec,
    };
    if let Some(other) = overlapping_home(homes, &spec.home) {
        let why = format!(
            "home {} overlaps the home of kernel {other}",
            spec.home.display()
        );
        return hold(w, k, Resolution::Rejected(why));
    }
    homes.insert(spec.home.clone(), id.to_string());
    k.home = Some(spec.home.clone());
    k.uid = Some(spec.uid.unwrap_or(node.identity.uid));
    k.gid = Some(spec.gid.unwrap_or(node.identity.gid));
    // A bug while resolving one kernel's mounts fails that kernel, not the node.
    let mounts = crate::error::guarded(&format!("kernel {id}"), || {
        kernel_mounts(node, d, startup, id, spec)
    });
    let (binds, tokens) = match mounts {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => return hold(w, k, why),
        Err(bug) => return hold(w, k, Resolution::Failed(bug)),
    };
    for b in binds {
        want_volume(node, d, w, &b.volume);
        w.users
            .entry(b.volume.clone())
            .or_default()
            .insert(id.to_string());
        k.binds.push(b.target.clone());
        w.binds.insert(b.target.clone(), b);
    }
    for t in tokens {
        w.tokens.insert(t.path.clone(), t);
    }
    w.kernels.insert(id.to_string(), k);
}

/// What one kernel mount resolves to.
enum MountResolution {
    Bind(WantBind),
    Token(WantToken),
    /// Waiting for a record or volume (the first reason is kept).
    Pending(String),
    /// Refused; `stop` ends the look at the kernel's other mounts.
    Rejected {
        why: String,
        stop: bool,
    },
    /// Valid, but this node cannot serve it.
    Failed(String),
}

/// A kernel's binds (its vfolders, then every startup volume) and token
/// files, or why it cannot have them now.
fn kernel_mounts(
    node: &NodeView,
    d: &Desired,
    startup: &[(&String, bool)],
    id: &str,
    spec: &crate::spec::KernelSpec,
) -> Result<(Vec<WantBind>, Vec<WantToken>), Resolution> {
    let mut binds: Vec<WantBind> = Vec::new();
    let mut tokens: Vec<WantToken> = Vec::new();
    let mut problem: Option<Resolution> = None;
    for m in &spec.mounts {
        let r = match m {
            KernelMount::Token { volume, kind } => token_mount(node, d, id, spec, volume, *kind),
            KernelMount::Vfolder {
                id: vid,
                alias,
                permission,
            } => vfolder_bind(node, d, id, spec, vid, alias.as_deref(), *permission),
        };
        match r {
            MountResolution::Bind(b) => binds.push(b),
            MountResolution::Token(t) => tokens.push(t),
            MountResolution::Pending(why) => {
                problem.get_or_insert(Resolution::Pending(why));
            }
            MountResolution::Rejected { why, stop } => {
                problem = Some(Resolution::Rejected(why));
                if stop {
                    break;
                }
            }
            MountResolution::Failed(why) => {
                if !matches!(problem, Some(Resolution::Rejected(_))) {
                    problem = Some(Resolution::Failed(why));
                }
            }
        }
    }
    for (vol, readonly) in startup {
        binds.push(WantBind {
            target: spec.home.join(vol.as_str()),
            kernel: id.to_string(),
            volume: (*vol).clone(),
            source: node.volumes_root.join(vol),
            readonly: *readonly,
            label: format!("volume:{vol}"),
            required: false,
            idmap: None,
        });
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = binds.iter().find(|b| !seen.insert(b.target.clone())) {
        problem = Some(Resolution::Rejected(format!(
            "two mounts would appear at {} in the home",
            dup.target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )));
    }
    match problem {
        Some(p) => Err(p),
        None => Ok((binds, tokens)),
    }
}

/// A per-user SAS token file for blob volume `volume`. A write token can
/// create, overwrite and delete every blob in the container, other users'
/// included: it needs an `access: rw` volume the policy lists in
/// `tokens.write`.
fn token_mount(
    node: &NodeView,
    d: &Desired,
    id: &str,
    spec: &crate::spec::KernelSpec,
    volume: &String,
    kind: crate::spec::TokenKind,
) -> MountResolution {
    let write = kind == crate::spec::TokenKind::Write;
    let refuse = |why: String| MountResolution::Rejected { why, stop: false };
    match d.volumes.get(volume).map(|e| &e.spec) {
        None => MountResolution::Pending(format!("token volume {volume} does not exist")),
        Some(Err(_)) => MountResolution::Pending(format!("token volume {volume} is rejected")),
        Some(Ok(v)) if v.mount.fstype != Fstype::AzureBlob => {
            refuse(format!("token: volume {volume} is not an azureblob volume"))
        }
        Some(Ok(v)) if write && v.access != Permission::Rw => refuse(format!(
            "token: write needs an access: rw volume; {volume} is access: ro"
        )),
        Some(Ok(_)) if write && !node.policy.tokens.write.iter().any(|w| w == volume) => refuse(
            format!("policy tokens.write: write tokens for volume {volume} are not allowed"),
        ),
        Some(Ok(v)) => MountResolution::Token(WantToken {
            path: spec.home.join(".vfolderd").join("sas").join(volume),
            kernel: id.to_string(),
            volume: volume.clone(),
            source: v.mount.path.clone(),
            credentials: v.mount.credentials.clone(),
            write,
            uid: Some(spec.uid.unwrap_or(node.identity.uid)),
            gid: Some(spec.gid.unwrap_or(node.identity.gid)),
        }),
    }
}

/// The bind of vfolder `vid` into the kernel's home.
fn vfolder_bind(
    node: &NodeView,
    d: &Desired,
    id: &str,
    spec: &crate::spec::KernelSpec,
    vid: &Uuid,
    alias: Option<&str>,
    permission: Option<Permission>,
) -> MountResolution {
    let vf = match d.vfolders.get(vid).map(|e| &e.spec) {
        None => return MountResolution::Pending(format!("vfolder {vid} has no record")),
        Some(Err(why)) => {
            return MountResolution::Pending(format!("vfolder {vid} is refused: {why}"))
        }
        Some(Ok(vf)) if vf.trash => {
            // A running kernel keeps its bind (its kernel is held); a new one waits.
            let why = format!("vfolder {vid} is in the trash (its record says trash: true)");
            return MountResolution::Pending(why);
        }
        Some(Ok(vf)) => vf,
    };
    let volume = match d.volumes.get(&vf.volume).map(|e| &e.spec) {
        None => {
            let why = format!("volume {} of vfolder {vid} does not exist", vf.volume);
            return MountResolution::Pending(why);
        }
        Some(Err(_)) => {
            let why = format!("volume {} of vfolder {vid} is rejected", vf.volume);
            return MountResolution::Pending(why);
        }
        Some(Ok(v)) => v,
    };
    let idmap = match idmap_for(node, spec, volume, &vf.volume) {
        Ok(m) => m,
        Err(why) => return MountResolution::Failed(why),
    };
    let perm = permission.unwrap_or(vf.permission);
    if perm == Permission::Rw && vf.permission == Permission::Ro {
        let why = format!("vfolder {vid} is read-only; rw cannot be granted");
        return MountResolution::Rejected { why, stop: true };
    }
    if perm == Permission::Rw && !node.policy.may_mount_rw(&vf.volume, &vf.owner) {
        let why = format!(
            "policy rw_owners.{}: owner {} may not mount vfolder {vid} read-write",
            vf.volume, vf.owner
        );
        return MountResolution::Rejected { why, stop: true };
    }
    let name = alias.unwrap_or(&vf.name);
    MountResolution::Bind(WantBind {
        target: spec.home.join(name),
        kernel: id.to_string(),
        volume: vf.volume.clone(),
        source: node
            .volumes_root
            .join(&vf.volume)
            .join(vfolder_relpath(vid)),
        readonly: perm == Permission::Ro,
        label: format!("vfolder:{vid}"),
        required: true,
        idmap,
    })
}

/// The idmapping a kernel needs to use its folders on `volume` as its own:
/// none when it runs as the volume's owner. cifs, nfs and FUSE servers that
/// do not opt in (rclone 1.60) cannot be idmapped: the kernel fails, naming
/// the fstype, rather than seeing files it cannot write.
fn idmap_for(
    node: &NodeView,
    kernel: &crate::spec::KernelSpec,
    volume: &crate::spec::VolumeSpec,
    name: &str,
) -> Result<Option<crate::reconcile::newmount::IdMap>, String> {
    let owner = (
        volume.uid.unwrap_or(node.identity.uid),
        volume.gid.unwrap_or(node.identity.gid),
    );
    let runs_as = (
        kernel.uid.unwrap_or(node.identity.uid),
        kernel.gid.unwrap_or(node.identity.gid),
    );
    if owner == runs_as {
        return Ok(None);
    }
    match &volume.mount.fstype {
        Fstype::Cifs | Fstype::Nfs | Fstype::AzureBlob => Err(format!(
            "kernel runs as {}:{} but volume {name} belongs to {}:{}, and {} volumes cannot be idmapped",
            runs_as.0, runs_as.1, owner.0, owner.1, volume.mount.fstype
        )),
        Fstype::Other(f) if f.starts_with("nfs") || f.starts_with("fuse") => Err(format!(
            "kernel runs as {}:{} but volume {name} belongs to {}:{}, and {f} volumes cannot be idmapped",
            runs_as.0, runs_as.1, owner.0, owner.1
        )),
        _ => Ok(Some(crate::reconcile::newmount::IdMap {
            uid: (owner.0, runs_as.0),
            gid: (owner.1, runs_as.1),
        })),
    }
}

/// The kernel whose home equals, contains or lies inside `home`, if any.
/// O(depth · log n): `Path` orders component-wise, so the homes inside
/// `home` sort right after it.
fn overlapping_home<'a>(homes: &'a BTreeMap<PathBuf, String>, home: &Path) -> Option<&'a String> {
    if let Some(k) = home.ancestors().find_map(|a| homes.get(a)) {
        return Some(k);
    }
    homes
        .range(home.to_path_buf()..)
        .next()
        .filter(|(h, _)| h.starts_with(home))
        .map(|(_, k)| k)
}

/// How a mounted volume's spec differs from what it was mounted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecChange {
    /// Only options the filesystem changes on a live mount (tmpfs `size`,
    /// `nr_inodes`, `nr_blocks`; cifs cache and size options): reconfigured
    /// at once, under running kernels.
    InPlace,
    /// Needs a new mount: made once no kernel uses the volume.
    Remount,
    /// Cannot be applied without losing the data (a tmpfs's type, name or
    /// other options): left alone, the status says why.
    Kept(String),
}

/// Options tmpfs applies on a live mount (`mode`, `uid`, `gid` it ignores
/// on remount: mm/shmem.c `shmem_reconfigure`).
const TMPFS_LIVE_OPTIONS: [&str; 3] = ["size", "nr_inodes", "nr_blocks"];

/// cifs options a remount applies to the live mount: `smb3_reconfigure`
/// (fs/smb/client/fs_context.c, Linux 5.11+) takes the new context whole
/// but refuses another user, password, domain, share or `sec`, and the
/// connection keeps what it negotiated at mount (`vers`, `echo_interval`);
/// `cache=ro` and `cache=singleclient` are read only at mount time.
const CIFS_LIVE_OPTIONS: [&str; 7] = [
    "actimeo",
    "acregmax",
    "acdirmax",
    "closetimeo",
    "rsize",
    "wsize",
    "cache",
];

/// Whether every changed option of an `fstype` mount can be applied to it
/// live (`both`: the options before and after); else the first that cannot. NFS has none: `nfs_reconfigure`
/// (fs/nfs/super.c) refuses any change of its options with `EINVAL`.
fn live_change(
    fstype: &Fstype,
    changed: &BTreeSet<String>,
    both: &[&String],
) -> Result<(), String> {
    let live: &[&str] = match fstype {
        Fstype::Tmpfs => &TMPFS_LIVE_OPTIONS,
        Fstype::Cifs => &CIFS_LIVE_OPTIONS,
        _ => &[],
    };
    let cache_at_mount = both
        .iter()
        .any(|o| matches!(o.as_str(), "cache=ro" | "cache=singleclient"));
    match changed.iter().find(|k| !live.contains(&k.as_str())) {
        Some(k) => Err(k.clone()),
        None if *fstype == Fstype::Cifs && changed.contains("cache") && cache_at_mount => {
            Err("cache".into())
        }
        None => Ok(()),
    }
}

/// What changed between the mount `m` (its ownership record) and volume
/// `v` as now wanted; `None` when nothing did, or when the record predates
/// recording options.
pub fn spec_change(m: &crate::state::ledger::OwnedMount, v: &WantVolume) -> Option<SpecChange> {
    let was = m.options.as_ref()?;
    let tmpfs = v.fstype == Fstype::Tmpfs;
    if m.source != v.source || m.fstype != v.fstype.as_str() || m.readonly != v.readonly {
        return Some(if tmpfs {
            SpecChange::Kept(
                "not applied: a tmpfs volume cannot change its path, fstype or access without losing its data".into(),
            )
        } else {
            SpecChange::Remount
        });
    }
    if *was == v.options {
        return None;
    }
    let key = |o: &String| o.split('=').next().unwrap_or_default().to_string();
    let differ: BTreeSet<String> = was
        .iter()
        .filter(|o| !v.options.contains(o))
        .chain(v.options.iter().filter(|o| !was.contains(o)))
        .map(key)
        .collect();
    if differ.is_empty() {
        return None; // the same options in another order
    }
    let both: Vec<&String> = was.iter().chain(&v.options).collect();
    match live_change(&v.fstype, &differ, &both) {
        Ok(()) => Some(SpecChange::InPlace),
        Err(_) if !tmpfs => Some(SpecChange::Remount),
        Err(k) => Some(SpecChange::Kept(format!(
            "not applied: tmpfs option {k:?} cannot change on a live mount, and a new mount would lose the data"
        ))),
    }
}

/// One step the executor takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Unmount an owned mount, then forget it.
    Unmount {
        /// Mount point.
        target: PathBuf,
        /// Volume or bind.
        kind: MountKind,
    },
    /// Lazily detach an owned mount that is stale (`MNT_DETACH`), keeping
    /// ownership: it is mounted again right after.
    Detach {
        /// Mount point.
        target: PathBuf,
    },
    /// Forget an owned record whose mount is already gone.
    Forget {
        /// Mount point.
        target: PathBuf,
    },
    /// Remove an owned directory if it is empty (never user data), then forget it.
    RemoveDir {
        /// The directory.
        path: PathBuf,
    },
    /// Create `path` and missing parents below `root`, never following a symlink.
    MakeDir {
        /// The directory.
        path: PathBuf,
        /// The configured root it must stay inside.
        root: PathBuf,
        /// chown to this uid.
        uid: Option<u32>,
        /// chown to this gid.
        gid: Option<u32>,
        /// Recorded in the ledger for cleanup, if any.
        owner: Option<Owner>,
        /// A vfolder's directory: on a btrfs volume whose filesystem has
        /// quotas enabled it is made a subvolume with this limit.
        quota: Option<QuotaAsk>,
    },
    /// Mount a volume at its mount point.
    MountVolume {
        /// The volume.
        volume: WantVolume,
    },
    /// Bind a directory into a kernel home (`MS_BIND`, then a remount with
    /// `nosuid,nodev` and `ro` when asked).
    Bind {
        /// The bind.
        bind: WantBind,
    },
    /// Fix the flags of an owned bind.
    Remount {
        /// The bind as it should be.
        bind: WantBind,
    },
    /// Bind a kernel home onto itself and make it shared, in a peer group
    /// of its own: a container that binds it `rbind,rslave` sees every later
    /// bind, detach and heal inside it.
    ShareHome {
        /// The home.
        home: PathBuf,
        /// Its kernel.
        kernel: String,
        /// Bind it first (else it is ours already and only needs sharing):
        /// decided here, so the executor never re-reads the mount table.
        bind: bool,
    },
    /// Apply a volume's changed options to its mount in place (tmpfs
    /// `size`, `nr_inodes`): same mount, same binds, data kept.
    Reconfigure {
        /// The volume as it should be.
        volume: WantVolume,
    },
    /// Mint a SAS and (re)write a kernel's token file, 0600, its uid/gid.
    WriteToken {
        /// The token file.
        token: WantToken,
    },
    /// Remove a token file vfolderd wrote.
    RemoveToken {
        /// The file.
        path: PathBuf,
    },
}

/// What an action does, for metrics and logs (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ActionKind {
    /// [`Action::Unmount`].
    Unmount,
    /// [`Action::Forget`].
    Forget,
    /// [`Action::Detach`].
    Detach,
    /// [`Action::RemoveDir`].
    RemoveDir,
    /// [`Action::MakeDir`].
    MakeDir,
    /// [`Action::MountVolume`].
    Mount,
    /// [`Action::Bind`].
    Bind,
    /// [`Action::Remount`].
    Remount,
    /// [`Action::Reconfigure`].
    Reconfigure,
    /// [`Action::ShareHome`].
    ShareHome,
    /// [`Action::WriteToken`].
    WriteToken,
    /// [`Action::RemoveToken`].
    RemoveToken,
}

impl ActionKind {
    /// The `kind` label of `vfolderd_actions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Unmount => "unmount",
            ActionKind::Forget => "forget",
            ActionKind::Detach => "detach",
            ActionKind::RemoveDir => "rmdir",
            ActionKind::MakeDir => "mkdir",
            ActionKind::Mount => "mount",
            ActionKind::Bind => "bind",
            ActionKind::Remount => "remount",
            ActionKind::Reconfigure => "reconfigure",
            ActionKind::ShareHome => "home",
            ActionKind::WriteToken => "token",
            ActionKind::RemoveToken => "untoken",
        }
    }
}

impl std::fmt::Display for ActionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Action {
    /// What the action does.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Unmount { .. } => ActionKind::Unmount,
            Action::Forget { .. } => ActionKind::Forget,
            Action::Detach { .. } => ActionKind::Detach,
            Action::RemoveDir { .. } => ActionKind::RemoveDir,
            Action::MakeDir { .. } => ActionKind::MakeDir,
            Action::MountVolume { .. } => ActionKind::Mount,
            Action::Bind { .. } => ActionKind::Bind,
            Action::Remount { .. } => ActionKind::Remount,
            Action::Reconfigure { .. } => ActionKind::Reconfigure,
            Action::ShareHome { .. } => ActionKind::ShareHome,
            Action::WriteToken { .. } => ActionKind::WriteToken,
            Action::RemoveToken { .. } => ActionKind::RemoveToken,
        }
    }
}

fn depth(p: &Path) -> usize {
    p.components().count()
}

/// Sorts deepest first (children before parents), ties by path for determinism.
fn deep_first(paths: &mut [PathBuf]) {
    paths.sort_by_cached_key(|p| (std::cmp::Reverse(depth(p)), std::cmp::Reverse(p.clone())));
}

/// Plans the actions that take `actual` to `want`. `keep` names volumes that
/// are unused but still lingering: they stay mounted.
pub fn plan(node: &NodeView, want: &Want, actual: &Actual, keep: &BTreeSet<String>) -> Vec<Action> {
    let mut p = Planner {
        node,
        want,
        actual,
        keep,
        heal: BTreeMap::new(),
        removed: BTreeSet::new(),
        pinned: Vec::new(),
        out: Vec::new(),
    };
    p.heal = p.volumes_to_heal();
    p.remove_unwanted_tokens();
    p.teardown_binds();
    p.teardown_homes();
    p.teardown_volumes();
    p.teardown_dirs();
    p.mount_volumes();
    p.make_vfolder_dirs();
    p.attach_kernels();
    p.write_tokens();
    p.out
}

/// One run of [`plan`]: its inputs, what it has decided to take away so
/// far, and the actions in order.
struct Planner<'a> {
    node: &'a NodeView,
    want: &'a Want,
    actual: &'a Actual,
    /// Unused volumes still inside their linger.
    keep: &'a BTreeSet<String>,
    /// Stale (or due for renewal) volume mounts to mount again, by target.
    heal: BTreeMap<&'a Path, &'a WantVolume>,
    /// Targets this plan unmounts or forgets.
    removed: BTreeSet<PathBuf>,
    /// Targets of ours to take away where someone else's mount stays (over
    /// ours, or in place of it): every mount and directory they sit in
    /// stays too (it could not go while theirs is in it).
    pinned: Vec<PathBuf>,
    out: Vec<Action>,
}

impl<'a> Planner<'a> {
    fn mounted(&self, t: &Path) -> bool {
        self.actual.mounts.top(t).is_some()
    }

    /// A wanted target mounted by someone else is a conflict: leave it alone
    /// (status reports it), and do not bind from or into it.
    fn occupied(&self, t: &Path) -> bool {
        self.mounted(t) && (!self.actual.ours(t) || self.removed.contains(t))
    }

    /// Whether a volume has users: wanted binds, and binds kept for held
    /// kernels (binds being torn down in this plan do not count).
    fn has_users(&self, v: &str) -> bool {
        let (want, actual) = (self.want, self.actual);
        want.binds.values().any(|b| b.volume == v)
            || actual.owned_mounts.values().any(|m| {
                m.kind == MountKind::Bind
                    && m.volume == v
                    && m.kernel
                        .as_ref()
                        .is_some_and(|k| want.held_kernels.contains(k))
            })
    }

    /// Step 0: stale volume mounts to heal: those no kernel uses, or all with
    /// `heal: always`; and mounts due for renewal that no kernel uses.
    fn volumes_to_heal(&self) -> BTreeMap<&'a Path, &'a WantVolume> {
        let actual = self.actual;
        self.want
            .volumes
            .values()
            .filter(|v| actual.ours(&v.target))
            .filter(|v| {
                let stale = actual.stale.contains_key(&v.target)
                    && (v.heal == HealPolicy::Always || !self.has_users(&v.name));
                let renew = actual.renew.contains(&v.target) && !self.has_users(&v.name);
                let changed = actual
                    .owned_mounts
                    .get(&v.target)
                    .and_then(|m| spec_change(m, v))
                    == Some(SpecChange::Remount);
                stale || renew || (changed && !self.has_users(&v.name))
            })
            .map(|v| (v.target.as_path(), v))
            .collect()
    }

    fn healed_volume(&self, name: &str) -> bool {
        self.heal.values().any(|v| v.name == name)
    }

    /// Step 0b: token files nobody wants (their kernel is gone or no longer asks).
    fn remove_unwanted_tokens(&mut self) {
        for (path, t) in self.actual.owned_tokens.iter() {
            if !self.want.tokens.contains_key(path) && !self.want.held_kernels.contains(&t.kernel) {
                self.out.push(Action::RemoveToken { path: path.clone() });
            }
        }
    }

    /// Unmounts `t` if our mount is visible there, else forgets its record
    /// (leaving another's mount alone). A mount of ours that someone covered
    /// stays, with its record, until theirs goes: unmounting by path would
    /// take theirs.
    fn take_away(&mut self, t: PathBuf, kind: MountKind) {
        let record = &self.actual.owned_mounts[&t];
        let action = match self.actual.visible(record) {
            Visible::Ours => Action::Unmount {
                target: t.clone(),
                kind,
            },
            Visible::Nothing => Action::Forget { target: t.clone() },
            Visible::Replaced => {
                // Forgotten, but not free: their mount stays there.
                self.out.push(Action::Forget { target: t.clone() });
                self.pinned.push(t);
                return;
            }
            Visible::Covered => {
                self.pinned.push(t);
                return;
            }
        };
        self.out.push(action);
        self.removed.insert(t);
    }

    /// Step 1: owned binds that are no longer wanted (or whose source changed), deepest first.
    fn teardown_binds(&mut self) {
        let (want, actual) = (self.want, self.actual);
        let mut binds: Vec<PathBuf> = actual
            .owned_mounts
            .values()
            .filter(|m| m.kind == MountKind::Bind)
            .map(|m| m.target.clone())
            .collect();
        deep_first(&mut binds);
        for t in binds {
            let m = &actual.owned_mounts[&t];
            // A running kernel keeps a bind whose volume's value went bad
            // (a typo in a dataset's YAML, a policy change): an error never
            // unmounts, and a refused volume goes once its kernels do.
            let volume_in_error =
                want.held_volumes.contains(&m.volume) || want.refused_volumes.contains(&m.volume);
            let held = m
                .kernel
                .as_ref()
                .is_some_and(|k| want.held_kernels.contains(k));
            let keep_it = match want.binds.get(&t) {
                // Another kernel asks for the place of a malformed kernel's
                // bind (their homes overlap): the running one keeps it.
                Some(b) if held && m.kernel.as_deref() != Some(b.kernel.as_str()) => true,
                Some(b) => b.source.as_os_str() == m.source.as_str() && b.volume == m.volume,
                None => {
                    held || (volume_in_error
                        && m.kernel
                            .as_ref()
                            .is_some_and(|k| want.kernels.contains_key(k)))
                }
            };
            if keep_it && self.healed_volume(&m.volume) && self.actual.ours(&t) {
                // Its volume is re-mounted under it: detach now, bind again below.
                self.out.push(Action::Detach { target: t.clone() });
                self.removed.insert(t);
                continue;
            }
            if !keep_it {
                self.take_away(t, MountKind::Bind);
            }
        }
    }

    /// Step 1b: home mounts of kernels that are gone (their binds went above).
    fn teardown_homes(&mut self) {
        let (want, actual) = (self.want, self.actual);
        let mut homes: Vec<PathBuf> = actual
            .owned_mounts
            .values()
            .filter(|m| m.kind == MountKind::Home)
            .filter(|m| {
                let wanted = m.kernel.as_ref().is_some_and(|k| {
                    want.held_kernels.contains(k)
                        || want
                            .kernels
                            .get(k)
                            .is_some_and(|w| w.home.as_deref() == Some(m.target.as_path()))
                });
                !wanted
            })
            .map(|m| m.target.clone())
            .collect();
        deep_first(&mut homes);
        for t in homes {
            if !self.pinned.iter().any(|c| c.starts_with(&t)) {
                self.take_away(t, MountKind::Home);
            }
        }
    }

    /// Step 2: owned volumes nothing wants or uses any more.
    fn teardown_volumes(&mut self) {
        let (want, actual) = (self.want, self.actual);
        let in_use: BTreeSet<&str> = actual
            .owned_mounts
            .values()
            .filter(|m| m.kind == MountKind::Bind && !self.removed.contains(&m.target))
            .map(|m| m.volume.as_str())
            .chain(want.binds.values().map(|b| b.volume.as_str()))
            .collect();
        let mut vols: Vec<PathBuf> = actual
            .owned_mounts
            .values()
            .filter(|m| m.kind == MountKind::Volume)
            .map(|m| m.target.clone())
            .collect();
        deep_first(&mut vols);
        for t in vols {
            let m = &actual.owned_mounts[&t];
            let wanted = want.volumes.get(&m.volume).is_some_and(|v| v.target == t);
            if wanted
                || self.keep.contains(&m.volume)
                || want.held_volumes.contains(&m.volume)
                || in_use.contains(m.volume.as_str())
            {
                continue;
            }
            self.take_away(t, MountKind::Volume);
        }
    }

    /// Step 3: owned directories nothing needs, deepest first.
    fn teardown_dirs(&mut self) {
        let (want, actual) = (self.want, self.actual);
        let mut needed: HashSet<&Path> = HashSet::new();
        let kept_targets = actual
            .owned_mounts
            .keys()
            .filter(|t| !self.removed.contains(*t))
            .map(PathBuf::as_path);
        let wanted_paths = want
            .volumes
            .values()
            .map(|v| v.target.as_path())
            .chain(want.binds.keys().map(PathBuf::as_path));
        let homes = want.kernels.values().filter_map(|k| k.home.as_deref());
        let tokens = want.tokens.keys().map(PathBuf::as_path);
        for p in kept_targets.chain(wanted_paths).chain(homes).chain(tokens) {
            needed.extend(p.ancestors());
        }
        for p in &self.pinned {
            needed.extend(p.ancestors());
        }
        let held = |o: &Owner| match o {
            Owner::Kernel(k) => want.held_kernels.contains(k),
            Owner::Volume(v) => want.held_volumes.contains(v) || self.keep.contains(v),
        };
        // A mount point that stays mounted cannot be removed (another's
        // mount on a directory of ours, whose record is gone).
        let stays_mounted = |p: &Path| self.mounted(p) && !self.removed.contains(p);
        let mut dirs: Vec<PathBuf> = actual
            .owned_dirs
            .values()
            .filter(|d| !needed.contains(d.path.as_path()) && !held(&d.owner))
            .filter(|d| !stays_mounted(&d.path))
            .map(|d| d.path.clone())
            .collect();
        deep_first(&mut dirs);
        self.out
            .extend(dirs.into_iter().map(|path| Action::RemoveDir { path }));
    }

    /// Makes `path` (under `root`) unless it exists.
    fn mkdir(
        &mut self,
        path: &Path,
        root: &Path,
        uid: Option<u32>,
        gid: Option<u32>,
        owner: Option<Owner>,
    ) {
        if !self.actual.dirs.contains(path) {
            self.out.push(Action::MakeDir {
                path: path.to_path_buf(),
                root: root.to_path_buf(),
                uid,
                gid,
                owner,
                quota: None,
            });
        }
    }

    /// Step 4: volume mounts (and stale ones re-mounted).
    fn mount_volumes(&mut self) {
        for v in self.want.volumes.values() {
            if self.heal.contains_key(v.target.as_path()) {
                self.out.push(Action::Detach {
                    target: v.target.clone(),
                });
                self.out.push(Action::MountVolume { volume: v.clone() });
                continue;
            }
            if self.occupied(&v.target) {
                continue;
            }
            if self.mounted(&v.target) {
                let m = self.actual.owned_mounts.get(&v.target);
                if m.and_then(|m| spec_change(m, v)) == Some(SpecChange::InPlace) {
                    self.out.push(Action::Reconfigure { volume: v.clone() });
                }
                continue;
            }
            let owner = Some(Owner::Volume(v.name.clone()));
            self.mkdir(&v.target, &self.node.volumes_root, None, None, owner);
            self.out.push(Action::MountVolume { volume: v.clone() });
        }
    }

    /// Step 5: vfolder directories (storage role).
    fn make_vfolder_dirs(&mut self) {
        if self.node.fenced {
            return; // another node may be about to take over
        }
        for (id, (vol, path)) in &self.want.vfolder_dirs {
            if self.want.clones.contains(id) {
                continue;
            }
            let v = &self.want.volumes[vol];
            // One in the trash is moved back (the lifecycle worker), not made anew.
            let trashed =
                crate::lifecycle::trash_of(path).is_some_and(|t| self.actual.dirs.contains(&t));
            if !self.occupied(&v.target) && !trashed && !self.actual.dirs.contains(path) {
                let o = v.owner;
                self.out.push(Action::MakeDir {
                    path: path.clone(),
                    root: v.target.clone(),
                    uid: Some(o.uid),
                    gid: Some(o.gid),
                    owner: None,
                    quota: Some(QuotaAsk {
                        bytes: self.want.quotas.get(id).copied(),
                    }),
                });
            }
        }
    }

    /// Step 6: kernel homes, targets and binds.
    fn attach_kernels(&mut self) {
        for (id, k) in &self.want.kernels {
            let Some(home) = &k.home else { continue };
            if k.binds.is_empty()
                && !matches!(k.resolution, Resolution::Resolved | Resolution::Failed(_))
            {
                continue;
            }
            let owner = || Some(Owner::Kernel(id.clone()));
            let share = |bind| Action::ShareHome {
                home: home.clone(),
                kernel: id.clone(),
                bind,
            };
            if !self.mounted(home) || self.removed.contains(home.as_path()) {
                self.mkdir(home, &self.node.kernels_root, k.uid, k.gid, owner());
                // A kernel bound before homes were shared (an upgrade) keeps
                // its plain home: a bind of it would cover its binds.
                let bound = k
                    .binds
                    .iter()
                    .any(|t| self.mounted(t) && !self.removed.contains(t));
                if !bound {
                    self.out.push(share(true));
                }
            } else if self
                .actual
                .owned_mounts
                .get(home)
                .is_some_and(|m| m.kind == MountKind::Home)
                && self.actual.ours(home)
                && !self.actual.mounts.top(home).is_some_and(|m| m.shared)
            {
                // Bound but not yet shared (a crash between the two): share it.
                self.out.push(share(false));
            }
            for t in &k.binds {
                self.attach_bind(&self.want.binds[t], k, owner());
            }
        }
    }

    /// One bind of kernel `k`: made, fixed by a remount, or left alone.
    fn attach_bind(&mut self, b: &WantBind, k: &WantKernel, owner: Option<Owner>) {
        let t = &b.target;
        if self.occupied(&self.want.volumes[&b.volume].target) {
            return;
        }
        let removed = self.removed.contains(t);
        let theirs = self
            .actual
            .owned_mounts
            .get(t)
            .is_some_and(|m| m.kernel.as_deref().is_some_and(|o| o != b.kernel));
        if self.mounted(t) && theirs && !removed {
            return; // a held kernel's bind: a conflict, reported in status
        }
        if self.actual.ours(t) && !removed {
            let top = self.actual.mounts.top(t).expect("mounted");
            if top.is_readonly() != b.readonly
                || !top.has_option("nosuid")
                || !top.has_option("nodev")
            {
                self.out.push(Action::Remount { bind: b.clone() });
            }
            return;
        }
        if self.mounted(t) && !removed {
            return; // someone else's mount: a conflict, reported in status
        }
        self.mkdir(t, &self.node.kernels_root, k.uid, k.gid, owner);
        self.out.push(Action::Bind { bind: b.clone() });
    }

    /// Step 7: token files, once their kernel's home exists (made above).
    fn write_tokens(&mut self) {
        for (path, t) in &self.want.tokens {
            if !self.actual.owned_tokens.contains_key(path)
                || self.actual.token_renew.contains(path)
            {
                self.out.push(Action::WriteToken { token: t.clone() });
            }
        }
    }
}

impl Action {
    /// The mount point a mount-table action changes, if it changes one.
    pub fn target(&self) -> Option<&Path> {
        match self {
            Action::Unmount { target, .. } | Action::Detach { target } => Some(target),
            Action::Bind { bind } | Action::Remount { bind } => Some(&bind.target),
            Action::MountVolume { volume } | Action::Reconfigure { volume } => Some(&volume.target),
            Action::ShareHome { home, .. } => Some(home),
            Action::Forget { .. }
            | Action::RemoveDir { .. }
            | Action::MakeDir { .. }
            | Action::WriteToken { .. }
            | Action::RemoveToken { .. } => None,
        }
    }
}

/// Adds newly put kernels to a resolved `want` without resolving the whole
/// node again (at 1,000 kernels a whole resolve was most of a kernel's
/// put → Ready latency). Returns false, leaving `want` as it was, when a new
/// kernel's home overlaps another kernel's: which of them is refused is an
/// order question only a whole resolve answers.
pub fn resolve_added(
    node: &NodeView,
    d: &Desired,
    want: &mut Want,
    added: &BTreeSet<String>,
) -> bool {
    let mut part = Desired {
        volumes: d.volumes.clone(),
        revision: d.revision,
        ..Desired::default()
    };
    for id in added {
        // Gone, or not new (its old binds would linger in `want`): not an addition.
        let Some(e) = d.kernels.get(id) else {
            return false;
        };
        if want.kernels.contains_key(id) {
            return false;
        }
        if let Ok(spec) = &e.spec {
            for m in &spec.mounts {
                if let KernelMount::Vfolder { id: v, .. } = m {
                    if let Some(vf) = d.vfolders.get(v) {
                        part.vfolders.insert(*v, vf.clone());
                    }
                }
            }
        }
        part.kernels.insert(id.clone(), e.clone());
    }
    let new = resolve(node, &part);
    if new
        .homes
        .keys()
        .any(|h| overlapping_home(&want.homes, h).is_some())
    {
        return false;
    }
    want.homes.extend(new.homes);
    for (name, v) in new.volumes {
        want.volumes.entry(name).or_insert(v);
    }
    want.vfolder_dirs.extend(new.vfolder_dirs);
    want.binds.extend(new.binds);
    want.kernels.extend(new.kernels);
    for (vol, users) in new.users {
        want.users.entry(vol).or_default().extend(users);
    }
    want.held_kernels.extend(new.held_kernels);
    want.held_volumes.extend(new.held_volumes);
    want.tokens.extend(new.tokens);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::actual::MountEntry;
    use crate::reconcile::scope::without_teardown;
    use crate::spec::{KernelSpec, MountSpec, VfolderSpec, VolumeSpec};
    use crate::state::desired::Entry;
    use crate::state::ledger::{OwnedDir, OwnedMount, OwnedToken};
    use proptest::prelude::*;

    fn node(agent: bool, storage: bool) -> NodeView {
        NodeView {
            agent,
            storage,
            volumes_root: "/v".into(),
            kernels_root: "/k".into(),
            policy: Default::default(),
            identity: Default::default(),
            led: None,
            fenced: false,
        }
    }

    fn volume(at: MountAt) -> VolumeSpec {
        VolumeSpec {
            name: None,
            mount: MountSpec {
                at,
                fstype: "tmpfs".into(),
                path: "t".into(),
                options: None,
                credentials: None,
            },
            access: Permission::Ro,
            create: false,
            heal: HealPolicy::Unused,
            uid: None,
            gid: None,
        }
    }

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn vfolder(name: &str, vol: &str) -> VfolderSpec {
        VfolderSpec {
            name: name.into(),
            owner: "o".into(),
            volume: vol.into(),
            permission: Permission::Rw,
            quota_bytes: None,
            trash: false,
            clone_of: None,
        }
    }

    fn kernel(id: &str, mounts: Vec<KernelMount>) -> KernelSpec {
        KernelSpec {
            home: PathBuf::from("/k").join(id).join("work"),
            uid: None,
            gid: None,
            mounts,
        }
    }

    fn vf_mount(n: u8, ro: bool) -> KernelMount {
        KernelMount::Vfolder {
            id: uuid(n),
            alias: None,
            permission: ro.then_some(Permission::Ro),
        }
    }

    fn ok<T>(spec: T) -> Entry<T> {
        Entry {
            revision: 1,
            created: 1,
            spec: Ok(spec),
        }
    }

    /// Applies actions to an in-memory model of the node, as the executor would.
    fn apply(node: &NodeView, a: &mut Actual, actions: &[Action]) {
        let mut next_id = 1000 + a.mounts.ids().max().unwrap_or(0);
        for act in actions {
            match act {
                Action::Unmount { target, .. } => {
                    std::sync::Arc::make_mut(&mut a.mounts).remove_top(target);
                    std::sync::Arc::make_mut(&mut a.owned_mounts).remove(target);
                }
                Action::Forget { target } => {
                    std::sync::Arc::make_mut(&mut a.owned_mounts).remove(target);
                }
                Action::Detach { target } => {
                    std::sync::Arc::make_mut(&mut a.mounts).remove_top(target);
                    a.stale.remove(target);
                }
                Action::ShareHome { home, kernel, .. } => {
                    next_id += 1;
                    let mut shared = placed(a, entry(next_id, home, false));
                    shared.shared = true;
                    std::sync::Arc::make_mut(&mut a.mounts).insert(shared);
                    std::sync::Arc::make_mut(&mut a.owned_mounts).insert(
                        home.clone(),
                        crate::reconcile::execute::home_record(home, kernel),
                    );
                }
                Action::Reconfigure { volume } => {
                    if let Some(m) =
                        std::sync::Arc::make_mut(&mut a.owned_mounts).get_mut(&volume.target)
                    {
                        m.options = Some(volume.options.clone());
                    }
                }
                Action::WriteToken { token } => {
                    std::sync::Arc::make_mut(&mut a.owned_tokens).insert(
                        token.path.clone(),
                        OwnedToken {
                            path: token.path.clone(),
                            kernel: token.kernel.clone(),
                            volume: token.volume.clone(),
                            expires_at: 0,
                        },
                    );
                    a.token_renew.remove(&token.path);
                }
                Action::RemoveToken { path } => {
                    std::sync::Arc::make_mut(&mut a.owned_tokens).remove(path);
                }
                Action::RemoveDir { path } => {
                    a.dirs.remove(path);
                    std::sync::Arc::make_mut(&mut a.owned_dirs).remove(path);
                }
                Action::MakeDir {
                    path, root, owner, ..
                } => {
                    for p in path
                        .ancestors()
                        .take_while(|p| p.starts_with(root) && *p != root.as_path())
                    {
                        if a.dirs.insert(p.to_path_buf()) {
                            if let Some(o) = owner {
                                std::sync::Arc::make_mut(&mut a.owned_dirs).insert(
                                    p.to_path_buf(),
                                    OwnedDir {
                                        path: p.to_path_buf(),
                                        owner: o.clone(),
                                    },
                                );
                            }
                        }
                    }
                }
                Action::MountVolume { volume } => {
                    next_id += 1;
                    let e = placed(a, entry(next_id, &volume.target, false));
                    std::sync::Arc::make_mut(&mut a.mounts).insert(e);
                    std::sync::Arc::make_mut(&mut a.owned_mounts).insert(
                        volume.target.clone(),
                        owned(
                            &volume.target,
                            MountKind::Volume,
                            &volume.source,
                            &volume.name,
                            None,
                        ),
                    );
                }
                Action::Bind { bind } => {
                    next_id += 1;
                    let e = placed(a, entry(next_id, &bind.target, bind.readonly));
                    std::sync::Arc::make_mut(&mut a.mounts).insert(e);
                    let src = bind.source.to_string_lossy();
                    std::sync::Arc::make_mut(&mut a.owned_mounts).insert(
                        bind.target.clone(),
                        owned(
                            &bind.target,
                            MountKind::Bind,
                            &src,
                            &bind.volume,
                            Some(&bind.kernel),
                        ),
                    );
                }
                Action::Remount { bind } => {
                    next_id += 1;
                    std::sync::Arc::make_mut(&mut a.mounts).remove_top(&bind.target);
                    std::sync::Arc::make_mut(&mut a.mounts).insert(entry(
                        next_id,
                        &bind.target,
                        bind.readonly,
                    ));
                }
            }
        }
        let _ = node;
    }

    /// `e`, in the mount its mount point lies in (as the kernel sets `parent`).
    fn placed(a: &Actual, mut e: MountEntry) -> MountEntry {
        e.parent = e
            .mount_point
            .ancestors()
            .skip(1)
            .find_map(|d| a.mounts.top(d))
            .map_or(1, |m| m.id);
        e
    }

    fn entry(id: u64, target: &Path, ro: bool) -> MountEntry {
        MountEntry {
            id,
            parent: 1,
            dev: "0:1".into(),
            root: "/".into(),
            mount_point: target.to_path_buf(),
            mount_options: vec![
                if ro { "ro" } else { "rw" }.into(),
                "nosuid".into(),
                "nodev".into(),
            ],
            fstype: "tmpfs".into(),
            source: "t".into(),
            super_options: vec![],
            shared: false,
        }
    }

    fn owned(
        target: &Path,
        kind: MountKind,
        source: &str,
        volume: &str,
        kernel: Option<&str>,
    ) -> OwnedMount {
        OwnedMount {
            target: target.to_path_buf(),
            kind,
            source: source.into(),
            fstype: if kind == MountKind::Bind {
                "bind".into()
            } else {
                "tmpfs".into()
            },
            volume: volume.into(),
            kernel: kernel.map(String::from),
            readonly: false,
            expires_at: None,
            credentials_stamp: None,
            helper: None,
            server: None,
            options: None,
            mount_id: None,
        }
    }

    fn one_kernel_desired() -> Desired {
        let mut d = Desired::default();
        d.volumes
            .insert("vol".into(), ok(volume(MountAt::Requested)));
        d.vfolders.insert(uuid(1), ok(vfolder("data", "vol")));
        d.kernels
            .insert("k1".into(), ok(kernel("k1", vec![vf_mount(1, false)])));
        d
    }

    fn converge(n: &NodeView, d: &Desired, a: &mut Actual) {
        let w = resolve(n, d);
        let acts = plan(n, &w, a, &BTreeSet::new());
        apply(n, a, &acts);
    }

    /// Found by the convergence proptest: a kernel whose value went bad
    /// (held) lost its bind to a newer kernel asking for the same home, so
    /// a malformed value took a running kernel's folder away.
    #[test]
    fn a_newcomer_never_takes_the_bind_of_a_malformed_kernel_sharing_its_home() {
        let n = node(true, true);
        let mut d = one_kernel_desired();
        // Another vfolder with the same name: the same bind target.
        d.vfolders.insert(uuid(2), ok(vfolder("data", "vol")));
        let shared = |id: &str, vf: u8| KernelSpec {
            home: PathBuf::from("/k/shared/home"),
            ..kernel(id, vec![vf_mount(vf, false)])
        };
        d.kernels.insert("k1".into(), ok(shared("k1", 1)));
        let mut a = Actual::default();
        converge(&n, &d, &mut a);
        let target = PathBuf::from("/k/shared/home/data");
        assert_eq!(a.owned_mounts[&target].kernel.as_deref(), Some("k1"));
        d.kernels.insert(
            "k1".into(),
            Entry {
                revision: 2,
                created: 1,
                spec: Err(crate::spec::Rejection::Invalid("bad".into())),
            },
        );
        d.kernels.insert(
            "k2".into(),
            Entry {
                revision: 3,
                created: 3,
                spec: Ok(shared("k2", 2)),
            },
        );
        let w = resolve(&n, &d);
        let acts = plan(&n, &w, &a, &BTreeSet::new());
        assert!(
            !acts.iter().any(|x| x.target() == Some(target.as_path())),
            "the held kernel's bind is left alone: {acts:?}"
        );
    }

    #[test]
    fn plan_mounts_the_volume_before_its_binds() {
        let n = node(true, true);
        let w = resolve(&n, &one_kernel_desired());
        let kinds: Vec<&str> = plan(&n, &w, &Actual::default(), &BTreeSet::new())
            .iter()
            .map(|a| a.kind().as_str())
            .collect();
        assert_eq!(
            kinds,
            ["mkdir", "mount", "mkdir", "mkdir", "home", "mkdir", "bind"],
            "the home is its own shared mount before anything is bound into it"
        );
    }

    #[test]
    fn plan_unmounts_children_before_parents() {
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        let acts = plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new());
        let unmounts: Vec<&Action> = acts
            .iter()
            .filter(|x| matches!(x, Action::Unmount { .. }))
            .collect();
        assert_eq!(
            unmounts,
            [
                &Action::Unmount {
                    target: "/k/k1/work/data".into(),
                    kind: MountKind::Bind
                },
                &Action::Unmount {
                    target: "/k/k1/work".into(),
                    kind: MountKind::Home
                },
                &Action::Unmount {
                    target: "/v/vol".into(),
                    kind: MountKind::Volume
                },
            ]
        );
        let dirs: Vec<&Action> = acts
            .iter()
            .filter(|x| matches!(x, Action::RemoveDir { .. }))
            .collect();
        assert_eq!(
            dirs,
            [
                &Action::RemoveDir {
                    path: "/k/k1/work/data".into()
                },
                &Action::RemoveDir {
                    path: "/k/k1/work".into()
                },
                &Action::RemoveDir {
                    path: "/v/vol".into()
                },
                &Action::RemoveDir {
                    path: "/k/k1".into()
                },
            ]
        );
    }

    #[test]
    fn plan_is_empty_when_converged() {
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        assert_eq!(
            plan(
                &n,
                &resolve(&n, &one_kernel_desired()),
                &a,
                &BTreeSet::new()
            ),
            vec![]
        );
    }

    #[test]
    fn plan_never_unmounts_what_it_does_not_own() {
        let n = node(true, true);
        let mut a = Actual::default();
        std::sync::Arc::make_mut(&mut a.mounts).insert(entry(5, Path::new("/v/vol"), false));
        std::sync::Arc::make_mut(&mut a.mounts).insert(entry(
            6,
            Path::new("/k/k1/work/data"),
            false,
        ));
        assert_eq!(
            plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new()),
            vec![]
        );
        // And a wanted target occupied by someone else's mount is left alone too.
        let acts = plan(
            &n,
            &resolve(&n, &one_kernel_desired()),
            &a,
            &BTreeSet::new(),
        );
        assert!(
            acts.iter().all(|x| !matches!(
                x,
                Action::Unmount { .. } | Action::MountVolume { .. } | Action::Bind { .. }
            )),
            "{acts:?}"
        );
    }

    /// A converged node whose table has unique ids (of boot 1) and whose
    /// records name their mounts by them, as the executor leaves them.
    fn converged_with_ids() -> (NodeView, Actual) {
        use crate::reconcile::actual::IdScope;
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        let boot = Uuid::from_u128(1);
        let scope = IdScope {
            boot: Some(boot),
            unique: true,
        };
        a.mounts = std::sync::Arc::new((*a.mounts).clone().with_id_scope(scope));
        for m in std::sync::Arc::make_mut(&mut a.owned_mounts).values_mut() {
            let id = a.mounts.top(&m.target).expect("mounted").id;
            m.mount_id = Some(crate::state::ledger::MountStamp {
                boot,
                id: Some(id),
                short: None,
            });
        }
        (n, a)
    }

    fn touches(acts: &[Action], t: &Path) -> bool {
        acts.iter().any(|x| {
            x.target() == Some(t)
                || matches!(x, Action::Unmount { target, .. } if target == t)
                || matches!(x, Action::ShareHome { home, .. } if home == t)
        })
    }

    /// Someone mounts over a kernel's bind (read-only, so its flags differ
    /// from the bind's): by path, vfolderd would remount theirs while the
    /// kernel runs, and unmount theirs (then its home) when it goes.
    #[test]
    fn plan_never_touches_a_mount_someone_put_over_ours() {
        let (n, mut a) = converged_with_ids();
        let (bind, home) = (Path::new("/k/k1/work/data"), Path::new("/k/k1/work"));
        std::sync::Arc::make_mut(&mut a.mounts).insert(entry(9000, bind, true));
        let running = plan(
            &n,
            &resolve(&n, &one_kernel_desired()),
            &a,
            &BTreeSet::new(),
        );
        assert!(!touches(&running, bind), "{running:?}");
        let gone = plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new());
        assert!(!touches(&gone, bind), "{gone:?}");
        assert!(!touches(&gone, home), "{gone:?}");
        assert!(!touches(&gone, Path::new("/v/vol")), "{gone:?}");
        // The same for a mount someone put on the home the bind sits in.
        let mut over_home = a.clone();
        std::sync::Arc::make_mut(&mut over_home.mounts).remove_top(bind);
        std::sync::Arc::make_mut(&mut over_home.mounts).insert(entry(9001, home, true));
        for d in [one_kernel_desired(), Desired::default()] {
            let acts = plan(&n, &resolve(&n, &d), &over_home, &BTreeSet::new());
            assert!(!touches(&acts, bind) && !touches(&acts, home), "{acts:?}");
        }
        // Theirs gone, ours is taken away with its home.
        std::sync::Arc::make_mut(&mut a.mounts).remove_top(bind);
        let gone = plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new());
        for t in [bind, home] {
            assert!(
                gone.iter()
                    .any(|x| matches!(x, Action::Unmount { target, .. } if target == t)),
                "{t:?} not unmounted: {gone:?}"
            );
        }
    }

    /// Ours unmounted by someone who then mounted their own there, or a
    /// record from an earlier boot whose id the new boot gave another mount:
    /// the record is forgotten, their mount stays.
    #[test]
    fn plan_forgets_a_mount_of_ours_someone_replaced_and_keeps_theirs() {
        let bind = Path::new("/k/k1/work/data");
        let (n, mut replaced) = converged_with_ids();
        std::sync::Arc::make_mut(&mut replaced.mounts).remove_top(bind);
        std::sync::Arc::make_mut(&mut replaced.mounts).insert(entry(9000, bind, false));
        let (_, mut rebooted) = converged_with_ids();
        for m in std::sync::Arc::make_mut(&mut rebooted.owned_mounts).values_mut() {
            m.mount_id.as_mut().unwrap().boot = Uuid::from_u128(2);
        }
        // Its source changed meanwhile: nothing is bound on top of theirs.
        let mut moved = replaced.clone();
        std::sync::Arc::make_mut(&mut moved.owned_mounts)
            .get_mut(bind)
            .unwrap()
            .source = "/elsewhere".into();
        let acts = plan(
            &n,
            &resolve(&n, &one_kernel_desired()),
            &moved,
            &BTreeSet::new(),
        );
        assert!(
            !acts
                .iter()
                .any(|x| matches!(x, Action::Bind { bind: b } if b.target == bind)),
            "{acts:?}"
        );
        let home = Path::new("/k/k1/work");
        for a in [replaced, rebooted] {
            let gone = plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new());
            // Their mount stays in the home and in its directory.
            assert!(!touches(&gone, home), "{gone:?}");
            for p in [bind, home] {
                assert!(
                    !gone.contains(&Action::RemoveDir { path: p.into() }),
                    "{p:?} removed: {gone:?}"
                );
            }
            assert!(
                gone.contains(&Action::Forget {
                    target: bind.into()
                }),
                "{gone:?}"
            );
            assert!(
                !gone
                    .iter()
                    .any(|x| matches!(x, Action::Unmount { target, .. } if target == bind)),
                "{gone:?}"
            );
        }
    }

    #[test]
    fn plan_keeps_binds_of_a_kernel_whose_value_turned_bad() {
        let n = node(true, false);
        let mut d = one_kernel_desired();
        let mut a = Actual::default();
        converge(&n, &d, &mut a);
        d.kernels.insert(
            "k1".into(),
            Entry {
                revision: 2,
                created: 1,
                spec: Err("malformed".into()),
            },
        );
        assert_eq!(plan(&n, &resolve(&n, &d), &a, &BTreeSet::new()), vec![]);
        // Same when the vfolder record it uses disappears.
        let mut d = one_kernel_desired();
        d.vfolders.clear();
        assert_eq!(plan(&n, &resolve(&n, &d), &a, &BTreeSet::new()), vec![]);
    }

    #[test]
    fn plan_keeps_a_lingering_volume_mounted() {
        let n = node(true, false);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        let mut d = one_kernel_desired();
        d.kernels.clear();
        let keep = BTreeSet::from(["vol".to_string()]);
        let acts = plan(&n, &resolve(&n, &d), &a, &keep);
        assert!(acts.contains(&Action::Unmount {
            target: "/k/k1/work/data".into(),
            kind: MountKind::Bind
        }));
        assert!(!acts.contains(&Action::Unmount {
            target: "/v/vol".into(),
            kind: MountKind::Volume
        }));
    }

    #[test]
    fn plan_remounts_a_bind_whose_flags_drifted() {
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        let mut d = one_kernel_desired();
        d.kernels
            .insert("k1".into(), ok(kernel("k1", vec![vf_mount(1, true)])));
        let acts = plan(&n, &resolve(&n, &d), &a, &BTreeSet::new());
        assert!(
            matches!(acts.as_slice(), [Action::Remount { bind }] if bind.readonly),
            "{acts:?}"
        );
    }

    #[test]
    fn resolving_added_kernels_equals_resolving_everything() {
        let n = node(true, true);
        let mut d = Desired::default();
        d.volumes
            .insert("vol".into(), ok(volume(MountAt::Requested)));
        for i in 0..3u8 {
            d.vfolders
                .insert(uuid(i), ok(vfolder(&format!("f{i}"), "vol")));
        }
        d.kernels
            .insert("k1".into(), ok(kernel("k1", vec![vf_mount(0, false)])));
        let mut want = resolve(&n, &d);
        d.kernels.insert(
            "k2".into(),
            ok(kernel("k2", vec![vf_mount(1, true), vf_mount(2, false)])),
        );
        d.kernels
            .insert("k3".into(), ok(kernel("k3", vec![vf_mount(0, true)])));
        let added = BTreeSet::from(["k2".to_string(), "k3".to_string()]);
        assert!(resolve_added(&n, &d, &mut want, &added));
        assert_eq!(want, resolve(&n, &d));
        // An existing kernel is not "added": refused, `want` untouched.
        let before = want.clone();
        assert!(!resolve_added(
            &n,
            &d,
            &mut want,
            &BTreeSet::from(["k1".to_string()])
        ));
        assert_eq!(want, before);
    }

    #[test]
    fn without_teardown_keeps_repairs_and_drops_removals_and_stacking() {
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        // The bind is gone behind our back, and the desired state is empty.
        std::sync::Arc::make_mut(&mut a.mounts).remove_top(Path::new("/k/k1/work/data"));
        let acts = plan(&n, &resolve(&n, &Desired::default()), &a, &BTreeSet::new());
        assert!(acts.iter().any(|x| matches!(x, Action::Unmount { .. })));
        assert_eq!(without_teardown(acts), vec![]);
        // With the kernel still desired, the repair survives the filter.
        let acts = plan(
            &n,
            &resolve(&n, &one_kernel_desired()),
            &a,
            &BTreeSet::new(),
        );
        assert_eq!(without_teardown(acts.clone()), acts);
        assert!(matches!(acts.as_slice(), [Action::Bind { .. }]));
        // A source change is unmount + bind on one target: both are dropped.
        let mut d = one_kernel_desired();
        d.vfolders.insert(uuid(1), ok(vfolder("data", "vol2")));
        d.volumes
            .insert("vol2".into(), ok(volume(MountAt::Requested)));
        let mut a2 = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a2);
        let acts = without_teardown(plan(&n, &resolve(&n, &d), &a2, &BTreeSet::new()));
        assert!(acts.iter().all(|x| !matches!(x, Action::Bind { bind } if bind.target == Path::new("/k/k1/work/data"))), "{acts:?}");
    }

    #[test]
    fn a_stale_volume_is_healed_only_when_unused_unless_asked() {
        let n = node(true, true);
        let mut a = Actual::default();
        converge(&n, &one_kernel_desired(), &mut a);
        a.stale
            .insert("/v/vol".into(), "stale mount: ENOTCONN".into());
        // In use by k1: left alone (status says Stale).
        assert_eq!(
            plan(
                &n,
                &resolve(&n, &one_kernel_desired()),
                &a,
                &BTreeSet::new()
            ),
            vec![]
        );
        // Unused: lazy detach, mount again.
        let mut d = one_kernel_desired();
        d.kernels.clear();
        let acts = plan(&n, &resolve(&n, &d), &a, &BTreeSet::new());
        let kinds: Vec<&str> = acts.iter().map(|a| a.kind().as_str()).collect();
        assert_eq!(
            kinds,
            ["unmount", "unmount", "rmdir", "rmdir", "rmdir", "detach", "mount"],
            "{acts:?}"
        );
        // `heal: always`: the bind is detached and made again on the new mount.
        let mut d = one_kernel_desired();
        if let Ok(v) = &mut d.volumes.get_mut("vol").unwrap().spec {
            v.heal = HealPolicy::Always;
        }
        let acts = plan(&n, &resolve(&n, &d), &a, &BTreeSet::new());
        let kinds: Vec<&str> = acts.iter().map(|a| a.kind().as_str()).collect();
        assert_eq!(kinds, ["detach", "detach", "mount", "bind"], "{acts:?}");
        let mut after = a.clone();
        apply(&n, &mut after, &acts);
        assert_eq!(plan(&n, &resolve(&n, &d), &after, &BTreeSet::new()), vec![]);
    }

    #[test]
    fn resolve_rejects_overlapping_homes_and_rw_on_a_ro_vfolder() {
        let n = node(true, true);
        let mut d = one_kernel_desired();
        let mut k2 = kernel("k2", vec![vf_mount(1, false)]);
        k2.home = "/k/k1/work/inner".into();
        d.kernels.insert("k2".into(), ok(k2));
        let mut ro = vfolder("ro", "vol");
        ro.permission = Permission::Ro;
        d.vfolders.insert(uuid(2), ok(ro));
        d.kernels.insert(
            "k3".into(),
            ok(kernel(
                "k3",
                vec![KernelMount::Vfolder {
                    id: uuid(2),
                    alias: None,
                    permission: Some(Permission::Rw),
                }],
            )),
        );
        let w = resolve(&n, &d);
        assert_eq!(w.kernels["k1"].resolution, Resolution::Resolved);
        assert!(
            matches!(&w.kernels["k2"].resolution, Resolution::Rejected(r) if r.contains("overlaps"))
        );
        assert!(
            matches!(&w.kernels["k3"].resolution, Resolution::Rejected(r) if r.contains("read-only"))
        );
    }

    /// Issue 11 item 8: a newcomer with a smaller id took a running kernel's
    /// home (ids decided), and the running one flipped to Rejected.
    #[test]
    fn the_older_kernel_keeps_a_contested_home_whatever_the_ids() {
        let n = node(true, true);
        let mut d = one_kernel_desired();
        d.kernels.clear();
        let mut old = ok(kernel("zz-old", vec![vf_mount(1, false)]));
        old.created = 5;
        let mut newer = ok(kernel("aa-new", vec![vf_mount(1, false)]));
        newer.created = 9;
        if let Ok(k) = &mut newer.spec {
            k.home = "/k/zz-old/work".into();
        }
        d.kernels.insert("zz-old".into(), old);
        d.kernels.insert("aa-new".into(), newer);
        let w = resolve(&n, &d);
        assert_eq!(w.kernels["zz-old"].resolution, Resolution::Resolved);
        assert!(
            matches!(&w.kernels["aa-new"].resolution, Resolution::Rejected(r) if r.contains("zz-old"))
        );
    }

    #[test]
    fn resolve_refuses_rw_to_owners_the_policy_does_not_list() {
        let mut n = node(true, true);
        n.policy = std::sync::Arc::new(
            crate::policy::Policy::from_files(&[(
                "p.yaml".into(),
                "fstypes: {tmpfs: {}}\nrw_owners: {vol: [admin]}".into(),
            )])
            .unwrap(),
        );
        let w = resolve(&n, &one_kernel_desired());
        assert!(
            matches!(&w.kernels["k1"].resolution, Resolution::Rejected(r) if r.starts_with("policy rw_owners.vol"))
        );
        let mut d = one_kernel_desired();
        d.kernels
            .insert("k1".into(), ok(kernel("k1", vec![vf_mount(1, true)])));
        assert_eq!(
            resolve(&n, &d).kernels["k1"].resolution,
            Resolution::Resolved,
            "read-only is fine"
        );
    }

    #[test]
    fn resolve_waits_for_a_missing_vfolder_record() {
        let n = node(true, false);
        let mut d = one_kernel_desired();
        d.kernels
            .insert("k2".into(), ok(kernel("k2", vec![vf_mount(9, false)])));
        let w = resolve(&n, &d);
        assert!(
            matches!(&w.kernels["k2"].resolution, Resolution::Pending(r) if r.contains("no record"))
        );
        assert!(w.held_kernels.contains("k2"));
    }

    // ---- property tests over a small universe of objects ----

    fn arb_desired() -> impl Strategy<Value = Desired> {
        let vols = prop::collection::vec((any::<bool>(), any::<bool>(), 0u8..10), 3);
        let vfs = prop::collection::vec((0usize..4, 0u8..10), 4);
        let kernels = prop::collection::vec(
            (
                prop::collection::vec((0u8..5, any::<bool>()), 0..3),
                0u8..10,
                0u8..4,
            ),
            4,
        );
        (vols, vfs, kernels).prop_map(|(vols, vfs, kernels)| {
            let mut d = Desired::default();
            let names = ["va", "vb", "vc", "vmissing"];
            for (i, (startup, rw, bad)) in vols.into_iter().enumerate() {
                let spec = if bad == 0 {
                    Err("bad".into())
                } else {
                    let mut v = volume(if startup {
                        MountAt::Startup
                    } else {
                        MountAt::Requested
                    });
                    v.access = if rw { Permission::Rw } else { Permission::Ro };
                    Ok(v)
                };
                d.volumes.insert(
                    names[i].into(),
                    Entry {
                        revision: 1,
                        created: 1,
                        spec,
                    },
                );
            }
            for (i, (vol, bad)) in vfs.into_iter().enumerate() {
                let spec = if bad == 0 {
                    Err("bad".into())
                } else {
                    Ok(vfolder(&format!("f{i}"), names[vol]))
                };
                d.vfolders.insert(
                    uuid(i as u8),
                    Entry {
                        revision: 1,
                        created: 1,
                        spec,
                    },
                );
            }
            for (i, (mounts, bad, home)) in kernels.into_iter().enumerate() {
                let id = format!("k{i}");
                let spec = if bad == 0 {
                    Err("bad".into())
                } else {
                    let mut k = kernel(
                        &id,
                        mounts.into_iter().map(|(f, ro)| vf_mount(f, ro)).collect(),
                    );
                    if home == 0 {
                        k.home = "/k/shared/home".into();
                    }
                    Ok(k)
                };
                d.kernels.insert(
                    id,
                    Entry {
                        revision: 1,
                        created: 1,
                        spec,
                    },
                );
            }
            d
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// From any converged state for d1, switching to d2: one plan converges,
        /// nothing unowned is unmounted, no volume a desired kernel uses is
        /// unmounted, and binds go before their volume.
        #[test]
        fn plan_converges_in_one_step_and_keeps_the_invariants(
            d1 in arb_desired(), d2 in arb_desired(), agent in any::<bool>(), storage in any::<bool>(),
            stale in prop::collection::vec(any::<bool>(), 3),
        ) {
            let n = node(agent || !storage, storage);
            let mut a = Actual::default();
            // Someone else's mounts, which must never be touched.
            std::sync::Arc::make_mut(&mut a.mounts).insert(entry(1, Path::new("/v/foreign"), false));
            std::sync::Arc::make_mut(&mut a.mounts).insert(entry(2, Path::new("/k/k0/work/foreign"), false));
            converge(&n, &d1, &mut a);
            for (name, is_stale) in ["va", "vb", "vc"].iter().zip(stale) {
                let t = n.volumes_root.join(name);
                if is_stale && a.owned_mounts.contains_key(&t) {
                    a.stale.insert(t, "stale".into());
                }
            }
            let w2 = resolve(&n, &d2);
            let acts = plan(&n, &w2, &a, &BTreeSet::new());
            for act in &acts {
                if let Action::Detach { target } = act {
                    if let Some(m) = a.owned_mounts.get(target).filter(|m| m.kind == MountKind::Volume) {
                        prop_assert!(!w2.users.contains_key(&m.volume), "healed {} under its users", m.volume);
                    }
                }
            }

            let mut unmounted_volumes = BTreeSet::new();
            for act in &acts {
                if let Action::Unmount { target, kind } = act {
                    prop_assert!(a.owned_mounts.contains_key(target), "unmounted unowned {target:?}");
                    match kind {
                        MountKind::Volume => {
                            let vol = &a.owned_mounts[target].volume;
                            prop_assert!(!w2.users.contains_key(vol), "unmounted {vol} in use");
                            unmounted_volumes.insert(vol.clone());
                        }
                        MountKind::Bind => {
                            let vol = &a.owned_mounts[target].volume;
                            prop_assert!(!unmounted_volumes.contains(vol), "bind {target:?} after its volume");
                        }
                        MountKind::Home => {
                            let k = a.owned_mounts[target].kernel.clone().unwrap_or_default();
                            let same = w2.kernels.get(&k).and_then(|w| w.home.as_ref()) == Some(target);
                            prop_assert!(!same && !w2.held_kernels.contains(&k), "home of a wanted kernel {k} unmounted");
                        }
                    }
                }
            }
            let mut after = a.clone();
            apply(&n, &mut after, &acts);
            let again = plan(&n, &w2, &after, &BTreeSet::new());
            prop_assert!(again.is_empty(), "not converged: {again:?}");
            prop_assert!(after.mounts.top(Path::new("/v/foreign")).is_some());
            prop_assert!(after.mounts.top(Path::new("/k/k0/work/foreign")).is_some());
            for (t, m) in after.owned_mounts.iter() {
                prop_assert_eq!(after.mounts.count(t), 1, "stacked at {:?}", t);
                if m.kind == MountKind::Bind {
                    let vt = n.volumes_root.join(&m.volume);
                    prop_assert!(after.mounts.top(&vt).is_some(), "bind {:?} outlived its volume", t);
                }
            }
        }
    }

    /// What a changed option does to a mounted volume, by fstype: cifs
    /// applies its cache and size options live, nfs none (issue 13 item 4).
    #[test]
    fn cifs_cache_and_size_options_change_in_place_and_nfs_options_need_a_new_mount() {
        let want = |fstype: Fstype, opts: &str| WantVolume {
            name: "v".into(),
            target: "/v/v".into(),
            fstype,
            source: "//a.file.core.windows.net/s".into(),
            options: opts.split(',').map(String::from).collect(),
            credentials: None,
            at: MountAt::Requested,
            heal: Default::default(),
            readonly: false,
            create: false,
            owner: Identity {
                uid: 1000,
                gid: 1000,
            },
            anchor: "/".into(),
        };
        let change = |fstype: Fstype, was: &str, now: &str| {
            let m = crate::reconcile::execute::volume_record(&want(fstype.clone(), was));
            spec_change(&m, &want(fstype, now))
        };
        let cifs = |was, now| change(Fstype::Cifs, was, now);
        assert_eq!(cifs("vers=3.0,actimeo=30", "vers=3.0,actimeo=30"), None);
        assert_eq!(
            cifs(
                "vers=3.0,actimeo=30",
                "actimeo=5,vers=3.0,cache=none,rsize=65536"
            ),
            Some(SpecChange::InPlace)
        );
        assert_eq!(cifs("vers=3.0", "vers=3.1.1"), Some(SpecChange::Remount));
        assert_eq!(
            cifs("vers=3.0", "vers=3.0,sec=krb5"),
            Some(SpecChange::Remount)
        );
        assert_eq!(
            cifs("cache=strict", "cache=ro"),
            Some(SpecChange::Remount),
            "cache=ro is read at mount only"
        );
        assert_eq!(
            cifs("cache=singleclient", "cache=none"),
            Some(SpecChange::Remount)
        );
        assert_eq!(
            change(Fstype::Nfs, "vers=4.1,actimeo=30", "vers=4.1,actimeo=5"),
            Some(SpecChange::Remount)
        );
        assert_eq!(
            change(Fstype::Tmpfs, "size=1g", "size=2g"),
            Some(SpecChange::InPlace)
        );
    }
}
