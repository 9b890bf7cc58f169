//! Desired state: the typed cache of what etcd asks for, fed by the watcher.

use std::collections::BTreeMap;
use std::path::PathBuf;

use uuid::Uuid;

use crate::error::guarded;
use crate::keys::{Classified, Keys, ObjectKey};
use crate::policy::Policy;
use crate::spec::{
    parse_kernel, parse_vfolder, parse_volume, KernelSpec, Rejection, VfolderSpec, VolumeSpec,
};
use crate::state::inuse::{InUse, Wanted};

/// One desired object: its etcd mod revision and the parsed spec, or why it was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// `mod_revision` of the key.
    pub revision: i64,
    /// `create_revision` of the key: who came first (an older kernel keeps a
    /// contested home). The mod revision where it is not known (a state
    /// loaded from the store).
    pub created: i64,
    /// The spec, or the `Rejected` reason.
    pub spec: Result<T, Rejection>,
}

/// The objects the policy's limits refuse, with the reason: one object's
/// change can move another's verdict, and only then does more than that
/// object need a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitVerdicts {
    /// Kernels refused by a limit.
    pub kernels: BTreeMap<String, String>,
    /// vfolders refused by a limit.
    pub vfolders: BTreeMap<Uuid, String>,
}

/// Everything this node is asked to do, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// `P/volumes/*`.
    pub volumes: BTreeMap<String, Entry<VolumeSpec>>,
    /// `P/vfolders/*`.
    pub vfolders: BTreeMap<Uuid, Entry<VfolderSpec>>,
    /// `P/nodes/<node>/kernels/*`.
    pub kernels: BTreeMap<String, Entry<KernelSpec>>,
    /// Keys whose own name is invalid: key → reason.
    pub invalid_keys: BTreeMap<String, String>,
    /// The etcd revision this state reflects.
    pub revision: i64,
    /// The raw values, so a policy change can re-evaluate every object.
    pub raw: BTreeMap<String, (Vec<u8>, i64)>,
    /// Who wants each vfolder: this node's kernels, and on a storage node
    /// every node's (the in-use guard of trash and purge).
    pub in_use: InUse,
    /// vfolder records deleted while this node watched: their directories
    /// go to the trash, and are purged `trash_retention` after this.
    pub tombstones: BTreeMap<Uuid, Tombstone>,
    /// Records that ask the lifecycle worker for something (`trash`,
    /// `clone_of`): its rounds look at these, not at every record.
    pub flagged: std::collections::BTreeSet<Uuid>,
}

/// A deleted vfolder record, remembered until its directory is in the trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// The volume it lived on.
    pub volume: String,
    /// When this node saw it deleted (the retention counts from here).
    pub deleted_at: std::time::SystemTime,
}

/// `<node>/<kernel>` from a kernel key `P/nodes/<node>/kernels/<kernel>`.
fn kernel_ref(key: &str) -> String {
    let after = key.rsplit_once("/nodes/").map_or(key, |(_, r)| r);
    match after.split_once("/kernels/") {
        Some((node, id)) => format!("{node}/{id}"),
        None => after.to_string(),
    }
}

/// The policy in force, swapped whole on a reload.
pub type PolicyHandle = std::sync::Arc<std::sync::RwLock<std::sync::Arc<Policy>>>;

/// Turns raw key/value pairs into typed entries. It holds what parsing needs
/// (key layout, policy, kernels root) so applying an event is O(1) work.
#[derive(Debug, Clone)]
pub struct DesiredParser {
    /// Key layout.
    pub keys: Keys,
    /// The policy in force (hot-reloaded).
    pub policy: PolicyHandle,
    /// Where kernel homes must lie.
    pub kernels_root: PathBuf,
}

/// One put, parsed (outside any lock) and ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `P/volumes/<name>`.
    Volume(String, Entry<VolumeSpec>),
    /// `P/vfolders/<uuid>`.
    Vfolder(Uuid, Entry<VfolderSpec>),
    /// `P/nodes/<node>/kernels/<id>`.
    Kernel(String, Entry<KernelSpec>),
    /// Another node's kernel (storage role): what it mounts, for the in-use guard.
    ForeignKernel(String, Wanted),
    /// A key under the desired prefixes whose name itself is invalid.
    InvalidKey(String),
    /// Not a desired key (another node's kernel, a status key).
    Ignored,
}

impl DesiredParser {
    /// Parses a put of `key` = `value` at `revision`. Pure with respect to
    /// the desired state: callers parse before taking the state's lock.
    pub fn parse(&self, key: &str, value: &[u8], revision: i64, created: i64) -> Parsed {
        match self.keys.classify(key) {
            Classified::Object(ObjectKey::Volume(name)) => {
                let policy = self
                    .policy
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let spec = guarded(key, || parse_volume(&name, value, &policy))
                    .unwrap_or_else(|e| Err(Rejection::Invalid(e)));
                Parsed::Volume(
                    name,
                    Entry {
                        revision,
                        created,
                        spec: log_rejected(key, spec),
                    },
                )
            }
            Classified::Object(ObjectKey::Vfolder(id)) => {
                let spec = guarded(key, || parse_vfolder(value)).and_then(|r| r);
                Parsed::Vfolder(
                    id,
                    Entry {
                        revision,
                        created,
                        spec: spec.map_err(Rejection::Invalid),
                    },
                )
            }
            Classified::Object(ObjectKey::Kernel(id)) => {
                let spec = guarded(key, || parse_kernel(&id, value, &self.kernels_root))
                    .and_then(|r| r)
                    .map_err(Rejection::Invalid);
                Parsed::Kernel(
                    id,
                    Entry {
                        revision,
                        created,
                        spec: log_rejected(key, spec),
                    },
                )
            }
            Classified::Object(ObjectKey::ForeignKernel(nk)) => {
                let wanted = guarded(key, || crate::state::inuse::wanted_by_value(value))
                    .unwrap_or_else(|_| Wanted {
                        ids: crate::state::inuse::uuids_in(value),
                        exact: false,
                    });
                Parsed::ForeignKernel(nk.clone(), wanted)
            }
            Classified::Invalid { reason } => {
                tracing::warn!(key, reason = %reason, "rejected desired key");
                Parsed::InvalidKey(reason)
            }
            Classified::Ignored => Parsed::Ignored,
        }
    }

    /// Applies a put of `key` = `value` at `revision` (parse, then apply).
    pub fn apply_put(&self, d: &mut Desired, key: &str, value: &[u8], revision: i64) {
        let parsed = self.parse(key, value, revision, revision);
        d.apply_parsed(key, value, revision, parsed);
    }

    /// Applies a delete of `key` at `revision`.
    pub fn apply_delete(&self, d: &mut Desired, key: &str, revision: i64) {
        d.raw.remove(key);
        match self.keys.classify(key) {
            Classified::Object(ObjectKey::Volume(name)) => {
                d.volumes.remove(&name);
            }
            Classified::Object(ObjectKey::Vfolder(id)) => {
                d.flagged.remove(&id);
                let gone = d.vfolders.remove(&id).map(|e| e.spec);
                // Only a storage node trashes what a deleted record leaves.
                if let (Some(Ok(vf)), true) = (gone, self.keys.all_kernels) {
                    d.tombstones.insert(id, Tombstone::now(vf.volume));
                }
            }
            Classified::Object(ObjectKey::Kernel(id)) => {
                d.kernels.remove(&id);
                d.in_use.remove(&kernel_ref(key));
            }
            Classified::Object(ObjectKey::ForeignKernel(nk)) => d.in_use.remove(&nk),
            Classified::Invalid { .. } => {
                d.invalid_keys.remove(key);
            }
            Classified::Ignored => {}
        }
        d.revision = d.revision.max(revision);
    }

    /// Builds a whole state from a listing at `revision` (used by tests and the initial list).
    pub fn from_list<'a>(
        &self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>,
        revision: i64,
    ) -> Desired {
        self.from_listing(kvs.into_iter().map(|(k, v, r)| (k, v, r, r)), revision)
    }

    /// Builds a whole state from a listing at `revision` whose keys carry
    /// (mod, create) revisions.
    pub fn from_listing<'a>(
        &self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8], i64, i64)>,
        revision: i64,
    ) -> Desired {
        let mut d = Desired::default();
        for (k, v, rev, created) in kvs {
            let parsed = self.parse(k, v, rev, created);
            d.apply_parsed(k, v, rev, parsed);
        }
        d.revision = revision;
        d
    }
}

impl Tombstone {
    /// Deleted now, from `volume`.
    pub fn now(volume: String) -> Self {
        Self {
            volume,
            deleted_at: std::time::SystemTime::now(),
        }
    }
}

impl Desired {
    /// Carries over from `old` the vfolder records an agent follows one by
    /// one: a relist of its volumes and kernels does not bring them.
    /// `prefix` is `P/vfolders/`.
    /// For records `followed` (watched since before the listing), what is
    /// held wins, present or absent: it is as new as the listing or its
    /// watch brings it there; a listing value could be older than a change
    /// already applied (a record made read-only going back to read-write
    /// for a moment). Other records the listing read along (its kernels')
    /// are newer than the ones held; held records it does not have stay
    /// until the follower reads or forgets them. `prefix` is `P/vfolders/`.
    pub fn keep_vfolders(
        &mut self,
        old: &Desired,
        prefix: &str,
        followed: &std::collections::HashSet<Uuid>,
    ) {
        let key = |id: &Uuid| format!("{prefix}{}", id.hyphenated());
        for id in followed {
            self.vfolders.remove(id);
            self.flagged.remove(id);
            self.raw.remove(&key(id));
        }
        for (id, e) in &old.vfolders {
            if self.vfolders.contains_key(id) {
                continue;
            }
            self.vfolders.insert(*id, e.clone());
            if old.flagged.contains(id) {
                self.flagged.insert(*id);
            }
            if let Some(raw) = old.raw.get(&key(id)) {
                self.raw.insert(key(id), raw.clone());
            }
        }
    }

    /// Carries over from `old` (the state a relist replaces) what a relist
    /// cannot see: records that are gone now become tombstones, and
    /// tombstones of records not re-created stay.
    pub fn inherit_tombstones(&mut self, old: &Desired) {
        for (id, t) in &old.tombstones {
            if !self.vfolders.contains_key(id) {
                self.tombstones.entry(*id).or_insert_with(|| t.clone());
            }
        }
        for (id, e) in &old.vfolders {
            if let (Ok(vf), false) = (&e.spec, self.vfolders.contains_key(id)) {
                self.tombstones
                    .entry(*id)
                    .or_insert_with(|| Tombstone::now(vf.volume.clone()));
            }
        }
    }
}

/// Logs a rejection once, where it is found (on the put that brought it).
fn log_rejected<T>(key: &str, r: Result<T, Rejection>) -> Result<T, Rejection> {
    if let Err(reason) = &r {
        tracing::warn!(key, reason = %reason, "rejected desired object");
    }
    r
}

impl DesiredParser {
    /// Re-evaluates every object against the current policy (after a reload).
    pub fn reparse(&self, d: &Desired) -> Desired {
        let mut out = Desired::default();
        for (k, (v, rev)) in &d.raw {
            self.apply_put(&mut out, k, v, *rev);
        }
        out.revision = d.revision;
        out.tombstones = d.tombstones.clone();
        // Other nodes' kernels have no raw value here; this node's own are
        // set again above (the same values).
        let mut in_use = d.in_use.clone();
        std::mem::swap(&mut out.in_use, &mut in_use);
        for (k, wanted) in in_use.entries() {
            out.in_use.set(&k, wanted);
        }
        out
    }

    /// A parser with a fixed policy (tools, tests).
    pub fn with_policy(keys: Keys, policy: Policy, kernels_root: PathBuf) -> Self {
        Self {
            keys,
            policy: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(policy))),
            kernels_root,
        }
    }
}

impl Desired {
    /// Applies a parsed put of `key` (its raw `value` is kept so a policy
    /// change can re-evaluate it).
    pub fn apply_parsed(&mut self, key: &str, value: &[u8], revision: i64, parsed: Parsed) {
        // Another node's kernel needs no re-evaluation under this node's
        // policy: only what it mounts is kept (a storage node holds every
        // node's kernels).
        if !matches!(parsed, Parsed::Ignored | Parsed::ForeignKernel(..)) {
            self.raw.insert(key.to_string(), (value.to_vec(), revision));
        }
        match parsed {
            Parsed::Volume(name, e) => {
                self.volumes.insert(name, e);
            }
            Parsed::Vfolder(id, e) => {
                self.tombstones.remove(&id);
                let flag = e
                    .spec
                    .as_ref()
                    .is_ok_and(|v| v.trash || v.clone_of.is_some());
                if flag {
                    self.flagged.insert(id);
                } else {
                    self.flagged.remove(&id);
                }
                self.vfolders.insert(id, e);
            }
            Parsed::Kernel(id, e) => {
                let wanted = Wanted::of(e.spec.as_ref().ok(), value);
                self.in_use.set(&kernel_ref(key), wanted);
                self.kernels.insert(id, e);
            }
            Parsed::ForeignKernel(nk, wanted) => self.in_use.set(&nk, wanted),
            Parsed::InvalidKey(reason) => {
                self.invalid_keys.insert(key.to_string(), reason);
            }
            Parsed::Ignored => {}
        }
        self.revision = self.revision.max(revision);
    }

    /// The kernels not refused, oldest (by creation revision) first.
    fn kernels_oldest_first(&self, refused: &BTreeMap<String, String>) -> Vec<String> {
        let mut ok: Vec<(i64, &String)> = self
            .kernels
            .iter()
            .filter(|(id, e)| e.spec.is_ok() && !refused.contains_key(*id))
            .map(|(id, e)| (e.created, id))
            .collect();
        ok.sort();
        ok.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// Applies the policy's limits: kernels with more than
    /// `mounts_per_kernel` entries, kernels beyond `kernels_per_node` or past
    /// `mounts_per_node`, and vfolders beyond `vfolders_per_owner` become
    /// `Rejected` (the newest ones, by creation revision, so what already
    /// runs keeps running). Returns what it refused.
    pub fn enforce_limits(&mut self, policy: &Policy) -> LimitVerdicts {
        let v = self.limit_verdicts(policy);
        self.apply_limits(&v);
        v
    }

    /// What the limits refuse, without changing anything: most states break
    /// no limit, and then nothing needs a copy.
    pub fn limit_verdicts(&self, policy: &Policy) -> LimitVerdicts {
        let limits = &policy.limits;
        let mut v = LimitVerdicts::default();
        if let Some(max) = limits.mounts_per_kernel {
            for (id, e) in &self.kernels {
                if let Ok(k) = &e.spec {
                    if k.mounts.len() > max {
                        let n = k.mounts.len();
                        v.kernels.insert(
                            id.clone(),
                            format!("policy limits.mounts_per_kernel: {n} mounts, at most {max}"),
                        );
                    }
                }
            }
        }
        if let Some(max) = limits.kernels_per_node {
            for id in self.kernels_oldest_first(&v.kernels).into_iter().skip(max) {
                v.kernels.insert(
                    id,
                    format!("policy limits.kernels_per_node: this node already has {max} kernels"),
                );
            }
        }
        if let Some(max) = limits.mounts_per_node {
            self.mounts_per_node(max, &mut v.kernels);
        }
        if let Some(max) = limits.vfolders_per_owner {
            self.vfolders_per_owner(max, &mut v.vfolders);
        }
        v
    }

    /// Marks the objects `v` names `Rejected` with its reasons.
    pub fn apply_limits(&mut self, v: &LimitVerdicts) {
        for (id, why) in &v.kernels {
            if let Some(e) = self.kernels.get_mut(id) {
                e.spec = Err(Rejection::Policy(why.clone()));
            }
        }
        for (id, why) in &v.vfolders {
            if let Some(e) = self.vfolders.get_mut(id) {
                e.spec = Err(Rejection::Policy(why.clone()));
            }
        }
    }

    /// Past `max` mounts of vfolderd's own on this node (every startup
    /// volume, and per kernel its entries plus one bind per startup volume),
    /// the newest kernels are refused: each mount costs the kernel's mount
    /// table (`fs.mount-max`) and every later mount on the node.
    fn mounts_per_node(&self, max: usize, refused: &mut BTreeMap<String, String>) {
        let startup = self
            .volumes
            .values()
            .filter(|e| {
                e.spec
                    .as_ref()
                    .is_ok_and(|v| v.mount.at == crate::spec::MountAt::Startup)
            })
            .count();
        let mut used = startup;
        for id in self.kernels_oldest_first(refused) {
            let cost = self.kernels[&id]
                .spec
                .as_ref()
                .map_or(0, |k| k.mounts.len())
                + startup;
            if used + cost > max {
                refused.insert(id, format!(
                    "policy limits.mounts_per_node: this kernel needs {cost} mounts; {used} of the node's {max} are taken"
                ));
            } else {
                used += cost;
            }
        }
    }

    fn vfolders_per_owner(&self, max: usize, refused: &mut BTreeMap<Uuid, String>) {
        let mut by_owner: BTreeMap<&str, Vec<(i64, Uuid)>> = BTreeMap::new();
        for (id, e) in &self.vfolders {
            if let Ok(v) = &e.spec {
                by_owner.entry(&v.owner).or_default().push((e.created, *id));
            }
        }
        for (owner, mut ids) in by_owner {
            if ids.len() <= max {
                continue;
            }
            ids.sort();
            for (_, id) in ids.into_iter().skip(max) {
                refused.insert(
                    id,
                    format!("policy limits.vfolders_per_owner: {owner} already has {max} vfolders"),
                );
            }
        }
    }

    /// Number of objects with a `Rejected` spec or key, by kind (for the metric).
    pub fn rejected_counts(&self) -> [(&'static str, usize); 4] {
        [
            (
                "volume",
                self.volumes.values().filter(|e| e.spec.is_err()).count(),
            ),
            (
                "vfolder",
                self.vfolders.values().filter(|e| e.spec.is_err()).count(),
            ),
            (
                "kernel",
                self.kernels.values().filter(|e| e.spec.is_err()).count(),
            ),
            ("key", self.invalid_keys.len()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> DesiredParser {
        DesiredParser::with_policy(Keys::new("/v", "n1"), Policy::default(), "/k".into())
    }

    #[test]
    fn a_storage_node_keeps_who_wants_what_across_a_policy_reload_without_raw_values() {
        let p = DesiredParser::with_policy(
            Keys::new("/v", "n1").watching_all_kernels(true),
            Policy::default(),
            "/k".into(),
        );
        let id = Uuid::from_bytes([4; 16]);
        let mut d = Desired::default();
        let value = format!("mounts: [{{vfolder: {id}}}]");
        p.apply_put(&mut d, "/v/nodes/n2/kernels/k9", value.as_bytes(), 2);
        p.apply_put(&mut d, "/v/nodes/n1/kernels/k1", value.as_bytes(), 3);
        assert!(!d.raw.contains_key("/v/nodes/n2/kernels/k9"));
        let again = p.reparse(&d);
        assert_eq!(again.in_use.users(&id), vec!["n1/k1", "n2/k9"]);
        p.apply_delete(&mut d, "/v/nodes/n2/kernels/k9", 4);
        assert_eq!(d.in_use.users(&id), vec!["n1/k1"]);
    }

    #[test]
    fn bad_value_is_kept_as_rejected_and_others_parse() {
        let p = parser();
        let d = p.from_list(
            [
                (
                    "/v/volumes/good",
                    &b"mount: {at: startup, fstype: tmpfs, path: t}"[..],
                    2,
                ),
                ("/v/volumes/bad", &b"mount: [unclosed"[..], 3),
                ("/v/volumes/a b", &b"{}"[..], 4),
            ],
            4,
        );
        assert!(d.volumes["good"].spec.is_ok());
        assert!(d.volumes["bad"].spec.is_err());
        assert!(d.invalid_keys.contains_key("/v/volumes/a b"));
        assert_eq!(d.revision, 4);
    }

    #[test]
    fn limits_refuse_the_newest_objects_naming_the_rule() {
        let p = parser();
        let id = |n: u8| uuid::Uuid::from_bytes([n; 16]);
        let mut kvs: Vec<(String, Vec<u8>, i64)> = Vec::new();
        for i in 0..3u8 {
            kvs.push((
                format!("/v/nodes/n1/kernels/k{i}"),
                b"mounts: []".to_vec(),
                10 + i as i64,
            ));
            kvs.push((
                format!("/v/vfolders/{}", id(i)),
                b"{name: d, owner: alice, volume: v}".to_vec(),
                10 + i as i64,
            ));
        }
        kvs.push((
            "/v/nodes/n1/kernels/big".into(),
            format!("mounts: [{{vfolder: {0}}}, {{vfolder: {0}, as: b}}]", id(0)).into_bytes(),
            1,
        ));
        let mut d = p.from_list(
            kvs.iter().map(|(k, v, r)| (k.as_str(), v.as_slice(), *r)),
            20,
        );
        let policy = Policy::from_files(&[(
            "l.yaml".into(),
            "fstypes: {tmpfs: {}}\nlimits: {kernels_per_node: 2, mounts_per_kernel: 1, vfolders_per_owner: 2}".into(),
        )])
        .unwrap();
        d.enforce_limits(&policy);
        fn err<T>(r: &Result<T, Rejection>) -> String {
            r.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        }
        assert!(err(&d.kernels["big"].spec).starts_with("policy limits.mounts_per_kernel"));
        assert!(
            d.kernels["k0"].spec.is_ok() && d.kernels["k1"].spec.is_ok(),
            "the oldest keep running"
        );
        assert!(err(&d.kernels["k2"].spec).starts_with("policy limits.kernels_per_node"));
        assert!(d.vfolders[&id(0)].spec.is_ok() && d.vfolders[&id(1)].spec.is_ok());
        assert!(err(&d.vfolders[&id(2)].spec).starts_with("policy limits.vfolders_per_owner"));
    }

    /// Issue 12 item 6: without a policy file nothing limited a kernel's
    /// mounts: one 64 KiB value asked for ~1,300 binds.
    #[test]
    fn built_in_limits_cap_mounts_per_kernel_and_per_node() {
        let p = parser();
        let id = uuid::Uuid::from_bytes([7; 16]);
        let many: Vec<String> = (0..65)
            .map(|i| format!("{{vfolder: {id}, as: a{i}}}"))
            .collect();
        let two = format!("mounts: [{{vfolder: {id}}}, {{vfolder: {id}, as: b}}]");
        let kvs: Vec<(String, Vec<u8>, i64)> = vec![
            (
                "/v/volumes/ds".into(),
                b"mount: {at: startup, fstype: tmpfs, path: t}".to_vec(),
                1,
            ),
            (
                "/v/nodes/n1/kernels/huge".into(),
                format!("mounts: [{}]", many.join(", ")).into_bytes(),
                2,
            ),
            (
                "/v/nodes/n1/kernels/k-old".into(),
                two.clone().into_bytes(),
                3,
            ),
            ("/v/nodes/n1/kernels/k-new".into(), two.into_bytes(), 4),
        ];
        let load = || {
            p.from_list(
                kvs.iter().map(|(k, v, r)| (k.as_str(), v.as_slice(), *r)),
                4,
            )
        };
        let err = |d: &Desired, k: &str| {
            d.kernels[k]
                .spec
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        let mut d = load();
        d.enforce_limits(&Policy::default());
        assert!(
            err(&d, "huge").starts_with("policy limits.mounts_per_kernel: 65 mounts, at most 64")
        );
        assert!(d.kernels["k-old"].spec.is_ok() && d.kernels["k-new"].spec.is_ok());
        // 1 startup volume, then 2 entries + 1 startup bind per kernel: the newest does not fit in 5.
        let mut d = load();
        let policy = Policy::from_files(&[(
            "l.yaml".into(),
            "fstypes: {tmpfs: {}}\nlimits: {mounts_per_node: 5}".into(),
        )])
        .unwrap();
        d.enforce_limits(&policy);
        assert!(d.kernels["k-old"].spec.is_ok(), "the oldest keeps running");
        assert!(
            err(&d, "k-new").starts_with("policy limits.mounts_per_node"),
            "{}",
            err(&d, "k-new")
        );
    }

    #[test]
    fn delete_removes_entry() {
        let p = parser();
        let mut d = p.from_list([("/v/nodes/n1/kernels/k1", &b"mounts: []"[..], 2)], 2);
        p.apply_delete(&mut d, "/v/nodes/n1/kernels/k1", 3);
        assert!(d.kernels.is_empty());
        assert_eq!(d.revision, 3);
    }
}
