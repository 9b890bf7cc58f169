//! The reconcile loop: waits for the first complete list (the readiness
//! gate), then runs one node-wide pass at a time on every desired-state
//! change, on a periodic resync, on a linger deadline and on failure
//! backoff. A pass is observe → resolve → plan → execute → report; errors
//! become status, never an exit.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde_json::json;
use tokio::time::{sleep_until, Instant};
use uuid::Uuid;

use crate::config::{NodeConfig, Role};
use crate::keys::Keys;
use crate::metrics::{Health, Metrics};
use crate::policy::Policy;
use crate::reconcile::actual::{MountInfoError, MountInfoSource, MountTable, ProcMountInfo};
use crate::reconcile::execute::{observe_dirs, status_message, ExecConfig, ExecError, Executor};
use crate::reconcile::plan::{plan, resolve, without_teardown, Action, Actual, NodeView, Want};
use crate::reconcile::probe::{run_prober, StaleMap, VolumeTargets};
use crate::reconcile::report::{report, Failure, Report, ReportInputs, Usage};
use crate::reconcile::sys::{LinuxMounter, Mounter};
use crate::state::desired::PolicyHandle;
use crate::state::desired::{Desired, DesiredParser};
use crate::state::ledger::{Ledger, LedgerError, MountKind, Owner};
use crate::state::policywatch::{run_dir_watcher, run_policy_watcher};
use crate::state::status::{
    chrono_now, run_liveness, run_status_writer, StatusEntries, StatusWriter,
};
use crate::state::watch::{parse_listing, run_watcher, Changes, DesiredCache};

/// Errors that stop vfolderd from starting. Once running, nothing stops it but shutdown.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// etcd TLS or auth material is missing or too open.
    #[error(transparent)]
    EtcdSetup(#[from] crate::etcd::EtcdSetupError),
    /// A policy file is invalid at start.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The sled store could not be opened.
    #[error("cannot open the state store")]
    Ledger(#[from] LedgerError),
    /// The etcd client could not be built (bad endpoint URL).
    #[error("cannot create the etcd client")]
    Etcd(#[source] etcd_client::Error),
    /// A pass task panicked (a bug).
    #[error("reconcile pass panicked: {0}")]
    PassPanicked(String),
}

/// Errors of one pass (transient: retried on the next).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The mount table could not be read.
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What the daemon talks to; tests pass doubles.
#[derive(Clone)]
pub struct Deps {
    /// Mount syscalls.
    pub mounter: Arc<dyn Mounter>,
    /// The mount table.
    pub mountinfo: Arc<dyn MountInfoSource>,
    /// The file polled for mount-table change events.
    pub mountinfo_path: PathBuf,
}

impl Deps {
    /// The real kernel, with `helper` as the mount(8) program for cifs, nfs and FUSE.
    pub fn linux(helper: &std::path::Path) -> Self {
        Self {
            mounter: Arc::new(LinuxMounter::new(helper)),
            mountinfo: Arc::new(ProcMountInfo::default()),
            mountinfo_path: ProcMountInfo::default().path,
        }
    }
}

/// How many passes may follow each other at once while actions keep making progress.
const MAX_CHAINED_PASSES: usize = 4;
/// How long after a kernel went (or changed) the whole pass that decides
/// whether its volumes are unused runs. Kernel passes tear the kernel down
/// at once; a burst of removals shares one whole pass.
const VOLUME_PASS_DELAY: Duration = Duration::from_millis(500);
/// A pass with this many actions is a burst worth trimming the heap after.
const TRIM_AFTER_ACTIONS: usize = 1000;
/// Per-object retry delays after a failed action.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(120);
/// Retry delays after a whole pass failed (the mount table or ledger unreadable).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// TTL of the node liveness lease.
const NODE_LEASE_TTL: i64 = 15;

/// State carried from pass to pass (moved onto a blocking thread for each pass).
struct Reconciler {
    node: NodeView,
    storage: bool,
    keys: Keys,
    exec: Executor,
    ledger: Ledger,
    mountinfo: Arc<dyn MountInfoSource>,
    linger: Duration,
    idle_since: BTreeMap<String, Instant>,
    failures: BTreeMap<Owner, Failure>,
    dir_failures: BTreeMap<PathBuf, String>,
    usage: BTreeMap<Uuid, Usage>,
    /// Where reports go (the background status writer).
    status_tx: tokio::sync::watch::Sender<StatusEntries>,
    /// Per-object retry backoff after failed actions.
    retry: BTreeMap<Owner, Retry>,
    /// Stale volume mounts, as the prober last saw them.
    stale: StaleMap,
    /// Owned volume mount points, for the prober.
    volume_targets: VolumeTargets,
    /// Lifetime of blob mount SASes (renewed in their last third).
    sas_lifetime: Duration,
    /// Lifetime of per-user token files (renewed in their last third).
    token_lifetime: Duration,
    /// Node-local secrets (watched for rotation).
    credentials_dir: PathBuf,
    /// The file mount-table changes are signalled on.
    mountinfo_path: PathBuf,
    /// The statuses last handed to the writer.
    entries: StatusEntries,
    /// What the last pass found (a pass over a few kernels starts from it).
    prev: Option<PassOutcome>,
    /// The mount table as last read, with a descriptor of the signalling
    /// file opened just before the read (see [`MountCache`]).
    mount_cache: Option<MountCache>,
    /// What the desired state resolved to, keyed by the desired state's
    /// generation and the policy it was resolved under.
    want_cache: Option<(u64, usize, Arc<Want>)>,
}

/// A mount table and the proof that it is current. The kernel signals
/// `POLLPRI` on an open `/proc/self/mountinfo` once the table changed after
/// the descriptor was opened (or last polled); a descriptor opened before
/// the read therefore says, with a zero-timeout poll, whether the table read
/// is still the table. So a pass woken by etcd does not regenerate 10,000
/// lines of mountinfo that did not change, and a wake-up caused by
/// vfolderd's own mounts, already seen by the read after executing, runs no
/// pass at all.
struct MountCache {
    sentinel: std::fs::File,
    table: Arc<MountTable>,
    /// The kernel reports a change to one poll only: remember it.
    changed: std::cell::Cell<bool>,
}

impl MountCache {
    /// Whether the table changed since the sentinel was opened.
    fn stale(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        if self.changed.get() {
            return true;
        }
        let mut fds = [PollFd::new(self.sentinel.as_fd(), PollFlags::POLLPRI)];
        let changed = match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_none_or(|r| r.intersects(PollFlags::POLLPRI | PollFlags::POLLERR)),
            Err(_) => true,
        };
        self.changed.set(changed);
        changed
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The mount points that changed since the last read (`None`: unknown, the
/// table was read from scratch).
type MountChanges = Option<HashSet<PathBuf>>;

/// What a changed mount point means for the next pass.
enum TargetOf {
    /// One kernel's bind.
    Kernel(String),
    /// A volume or something else under the roots: a whole pass.
    Everything,
    /// Not ours (another program's mount elsewhere).
    Nothing,
}

/// Backoff state of one object whose last action failed.
#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    not_before: Instant,
}

/// Per-object retry delay: 0.5 s doubling to 2 min, so one bad object never
/// slows the others and a flapping mount is not hammered.
fn retry_delay(attempts: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// What one pass did.
#[derive(Clone)]
struct PassOutcome {
    /// Whether what this pass looked at is as wanted (a pass over a few
    /// kernels: those kernels).
    scoped_converged: bool,
    /// The kernels a pass over a few kernels looked at (those named by
    /// events, and those whose mounts changed); `None` for a whole pass.
    scope: Option<BTreeSet<String>>,
    /// Changes another program made while this pass acted (seen in the read
    /// after acting, whose event that read absorbed): for the next pass.
    followup: Changes,
    report: Report,
    /// (action kind, succeeded) per executed action.
    actions: Vec<(&'static str, bool)>,
    owned: BTreeMap<&'static str, i64>,
    /// When a lingering volume's time runs out.
    linger_deadline: Option<Instant>,
    /// When the earliest object backoff ends.
    retry_deadline: Option<Instant>,
    /// Blob volumes' SAS expiry (unix seconds), for the metric.
    sas_expiry: Vec<(String, u64)>,
    /// When the next SAS enters its renewal window.
    renew_deadline: Option<Instant>,
}

impl PassOutcome {
    /// The same state, with nothing done (a pass that found nothing to look at).
    fn unchanged(&self) -> PassOutcome {
        PassOutcome {
            actions: Vec::new(),
            followup: Changes::default(),
            report: Report {
                entries: BTreeMap::new(),
                ..self.report.clone()
            },
            ..self.clone()
        }
    }
}

impl Reconciler {
    fn report_inputs(&self) -> ReportInputs<'_> {
        ReportInputs {
            keys: &self.keys,
            storage: self.storage,
            failures: &self.failures,
            dir_failures: &self.dir_failures,
            usage: &self.usage,
        }
    }

    /// The desired state resolved for this node; recomputed only when the
    /// desired state or the policy changed since the last pass.
    /// (`added`: the kernels the desired state gained since the last call,
    /// if that is all that changed; they are resolved alone and merged.)
    fn want(
        &mut self,
        desired: &Desired,
        generation: u64,
        added: Option<&BTreeSet<String>>,
    ) -> Arc<Want> {
        let policy = Arc::as_ptr(&self.node.policy) as usize;
        match self.want_cache.take() {
            Some((g, p, w)) if g == generation && p == policy => {
                self.want_cache = Some((g, p, w.clone()));
                return w;
            }
            Some((_, p, mut w)) if p == policy && added.is_some() => {
                let added = added.expect("checked");
                if crate::reconcile::plan::resolve_added(
                    &self.node,
                    desired,
                    Arc::make_mut(&mut w),
                    added,
                ) {
                    self.want_cache = Some((generation, policy, w.clone()));
                    return w;
                }
            }
            _ => {}
        }
        let w = Arc::new(resolve(&self.node, desired));
        self.want_cache = Some((generation, policy, w.clone()));
        w
    }

    /// The mount table: re-read only when it changed (or when `fresh`).
    fn mount_table(&mut self, fresh: bool) -> Result<(Arc<MountTable>, MountChanges), PassError> {
        if let Some(c) = self.mount_cache.as_ref().filter(|c| !fresh && !c.stale()) {
            return Ok((c.table.clone(), Some(HashSet::new())));
        }
        // Opened before the read: a change racing the read marks it stale.
        // Only /proc signals changes; any other file (a test double) is read every time.
        let sentinel = std::fs::File::open(&self.mountinfo_path)
            .ok()
            .filter(|_| self.mountinfo_path.starts_with("/proc"));
        let (table, changed) = match self.mount_cache.take() {
            // Parse only the lines that changed (copying the table only if a
            // pass still holds it).
            Some(c) => {
                let mut table = c.table;
                let changed = self.mountinfo.refresh(Arc::make_mut(&mut table))?;
                (table, changed)
            }
            None => (Arc::new(self.mountinfo.read()?), None),
        };
        self.mount_cache = sentinel.map(|sentinel| MountCache {
            sentinel,
            table: table.clone(),
            changed: std::cell::Cell::new(false),
        });
        Ok((table, changed))
    }

    /// Sorts changed mount points into kernels to look at, or everything.
    fn attribute(
        &self,
        want: &Want,
        changed: impl IntoIterator<Item = PathBuf>,
    ) -> Result<Changes, PassError> {
        let owned = self.ledger.mounts()?;
        let mut out = Changes::default();
        for t in changed {
            match self.kernel_of_target(want, &owned, &t) {
                TargetOf::Kernel(k) => {
                    out.kernels.insert(k);
                }
                TargetOf::Everything => out.all = true,
                TargetOf::Nothing => {}
            }
        }
        Ok(out)
    }

    /// Whether the mount table read last is still the kernel's: then a
    /// mount-table wake-up (vfolderd's own mounts) needs no pass.
    fn mount_table_current(&self) -> bool {
        self.mount_cache.as_ref().is_some_and(|c| !c.stale())
    }

    /// The observed state for `want`: the ledger's records (only those of
    /// `scope`'s kernels and of volumes, for a pass over a few kernels) and
    /// which wanted directories exist.
    fn observe(
        &self,
        want: &Want,
        mounts: Arc<MountTable>,
        scope: Option<&BTreeSet<String>>,
    ) -> Result<Actual, PassError> {
        let whole = Actual {
            mounts,
            owned_mounts: self.ledger.mounts()?,
            owned_dirs: self.ledger.dirs()?,
            stale: self.stale.lock().expect("stale lock").clone(),
            owned_tokens: self.ledger.tokens()?,
            ..Actual::default()
        };
        let mut actual = match scope {
            Some(kernels) => crate::reconcile::plan::actual_of_kernels(&whole, kernels),
            None => whole,
        };
        actual.dirs = observe_dirs(&want.paths_to_observe(), &actual.mounts);
        let now = unix_now();
        let margin = self.sas_lifetime.as_secs() / 3;
        let token_margin = self.token_lifetime.as_secs() / 3;
        actual.token_renew = actual
            .owned_tokens
            .values()
            .filter(|t| t.expires_at.saturating_sub(now) <= token_margin || !t.path.is_file())
            .map(|t| t.path.clone())
            .collect();
        let rotated = |m: &crate::state::ledger::OwnedMount| {
            let Some(stamp) = &m.credentials_stamp else {
                return false;
            };
            let name = want
                .volumes
                .get(&m.volume)
                .and_then(|v| v.credentials.as_ref());
            name.is_some_and(|n| {
                crate::secret::file_stamp(&self.credentials_dir.join(n)).as_ref() != Some(stamp)
            })
        };
        actual.renew = actual
            .owned_mounts
            .values()
            .filter(|m| {
                m.expires_at
                    .is_some_and(|e| e.saturating_sub(now) <= margin)
                    || rotated(m)
            })
            .map(|m| m.target.clone())
            .collect();
        Ok(actual)
    }

    /// Which kernel a changed mount point belongs to.
    fn kernel_of_target(
        &self,
        want: &Want,
        owned: &crate::state::ledger::OwnedMounts,
        t: &Path,
    ) -> TargetOf {
        if let Some(b) = want.binds.get(t) {
            return TargetOf::Kernel(b.kernel.clone());
        }
        if let Some(k) = owned.get(t).and_then(|m| m.kernel.clone()) {
            return TargetOf::Kernel(k);
        }
        if t.starts_with(&self.node.volumes_root) || t.starts_with(&self.node.kernels_root) {
            // A volume, or something else inside our roots: look at everything.
            return TargetOf::Everything;
        }
        TargetOf::Nothing
    }

    /// One pass. Without `live` (desired state from the store, etcd not yet
    /// listed) nothing is taken away: only repairs and additions run.
    fn pass(
        &mut self,
        desired: &Desired,
        generation: u64,
        scope: Option<BTreeSet<String>>,
        rescan: bool,
        live: bool,
    ) -> Result<PassOutcome, PassError> {
        let t_start = std::time::Instant::now();
        let whole = self.want(desired, generation, scope.as_ref());
        let (mounts, changed) = self.mount_table(false)?;
        let t_read = t_start.elapsed();
        // A pass over a few kernels also covers the kernels whose mounts
        // changed; a change it cannot attribute makes it a whole pass.
        let scope = match (scope, changed) {
            (Some(mut kernels), Some(changed)) if live => {
                let found = self.attribute(&whole, changed)?;
                kernels.extend(found.kernels);
                (!found.all).then_some(kernels)
            }
            _ => None,
        };
        if let (Some(kernels), Some(prev)) = (&scope, &self.prev) {
            if kernels.is_empty() {
                // Nothing of ours changed (another program's mount elsewhere).
                let mut o = prev.unchanged();
                o.scope = scope;
                o.scoped_converged = true;
                return Ok(o);
            }
        }
        let t_scoped = t_start.elapsed();
        let want = match &scope {
            Some(kernels) => Arc::new(crate::reconcile::plan::want_of_kernels(&whole, kernels)),
            None => whole.clone(),
        };
        let whole_want = whole;
        let mut followup = Changes::default();
        let actual = self.observe(&want, mounts, scope.as_ref())?;
        let t_observed = t_start.elapsed();
        let now = Instant::now();

        // Linger (whole passes only): an owned volume nothing wants stays
        // mounted for `linger`.
        let keep: BTreeSet<String> = if scope.is_some() {
            BTreeSet::new()
        } else {
            let owned_volumes: BTreeSet<&String> = actual
                .owned_mounts
                .values()
                .filter(|m| m.kind == MountKind::Volume)
                .map(|m| &m.volume)
                .collect();
            self.idle_since
                .retain(|v, _| owned_volumes.contains(v) && !want.volumes.contains_key(v));
            for v in owned_volumes
                .iter()
                .filter(|v| !want.volumes.contains_key(v.as_str()))
            {
                self.idle_since.entry((*v).clone()).or_insert(now);
            }
            self.idle_since
                .iter()
                .filter(|(_, since)| now < **since + self.linger)
                .map(|(v, _)| v.clone())
                .collect()
        };
        let linger_deadline = self
            .idle_since
            .values()
            .map(|s| *s + self.linger)
            .filter(|d| *d > now)
            .min();
        // What the status and the report of a pass over a few kernels are about.
        let scoped_desired = scope.as_ref().map(|kernels| Desired {
            volumes: desired.volumes.clone(),
            kernels: kernels
                .iter()
                .filter_map(|k| desired.kernels.get_key_value(k))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            revision: desired.revision,
            ..Desired::default()
        });
        let report_desired = scoped_desired.as_ref().unwrap_or(desired);

        let mut actions = plan(&self.node, &want, &actual, &keep);
        if scope.is_some() {
            actions = crate::reconcile::plan::kernel_scoped(actions, &actual);
        }
        if !live {
            actions = without_teardown(actions);
        }
        if actions
            .iter()
            .any(|a| matches!(a, Action::MountVolume { .. }))
        {
            // Say `Pending` for what is about to change before a possibly slow
            // mount (binds take microseconds: their outcome is reported at once).
            let mut pre = report(&self.report_inputs(), report_desired, &want, &actual);
            // A kernel with actions still to run is not Ready yet, even if
            // everything it has so far is optional (best-effort startup binds).
            let attaching: BTreeSet<&str> = actions
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
                .collect();
            for k in attaching {
                if let Some(v) = pre.entries.get_mut(&self.keys.kernel_status(k)) {
                    if v["state"] == "Ready" {
                        let mut pending = serde_json::Value::clone(v);
                        pending["state"] = json!("Pending");
                        pending["error"] = json!("attaching");
                        *v = Arc::new(pending);
                    }
                }
            }
            let entries = self.merged_entries(pre.entries, scope.as_ref());
            self.status_tx.send_replace(entries);
        }
        let t_planned = t_start.elapsed();
        let n_actions = actions.len();
        let mut summary = Vec::with_capacity(actions.len());
        let (want, actual) = if actions.is_empty() {
            (want, actual)
        } else {
            let deferred: BTreeMap<Owner, String> = self
                .retry
                .iter()
                .filter(|(_, r)| now < r.not_before)
                .filter_map(|(o, _)| self.failures.get(o).map(|f| (o.clone(), f.message.clone())))
                .collect();
            let outcomes = self.exec.execute(actions, &actual.owned_mounts, &deferred);
            // Per object: the first error of this pass, if any, and whether it was attempted.
            let mut touched: BTreeMap<Owner, Option<(Failure, bool)>> = BTreeMap::new();
            for o in &outcomes {
                if let (Action::MountVolume { volume }, Ok(())) = (&o.action, &o.result) {
                    // Freshly mounted: no longer stale (until a probe says otherwise).
                    self.stale
                        .lock()
                        .expect("stale lock")
                        .remove(&volume.target);
                }
                if matches!(&o.result, Err(ExecError::Deferred(_))) {
                    continue; // not attempted: no metric, no log, no change
                }
                summary.push((o.action.kind(), o.result.is_ok()));
                if let Err(e) = &o.result {
                    tracing::warn!(action = o.action.kind(), owner = ?o.owner, error = %status_message(e), "action failed");
                }
                if let (
                    Action::MakeDir {
                        path, owner: None, ..
                    },
                    r,
                ) = (&o.action, &o.result)
                {
                    match r {
                        Ok(()) => self.dir_failures.remove(path),
                        Err(e) => self.dir_failures.insert(path.clone(), status_message(e)),
                    };
                }
                let Some(owner) = &o.owner else { continue };
                let slot = touched.entry(owner.clone()).or_insert(None);
                if let (None, Err(e)) = (&slot, &o.result) {
                    let f = Failure {
                        message: status_message(e),
                        pending: e.is_pending(),
                    };
                    *slot = Some((f, e.was_attempted()));
                }
            }
            for (owner, f) in touched {
                match f {
                    Some((f, attempted)) => {
                        if attempted {
                            let r = self.retry.entry(owner.clone()).or_insert(Retry {
                                attempts: 0,
                                not_before: now,
                            });
                            r.attempts += 1;
                            r.not_before = now + retry_delay(r.attempts);
                        }
                        self.failures.insert(owner, f);
                    }
                    None => {
                        self.retry.remove(&owner);
                        self.failures.remove(&owner);
                    }
                }
            }
            // Our own mounts changed the table: read it again, whatever the events say.
            drop(actual);
            let (mounts, changed) = self.mount_table(true)?;
            // What changed besides our own actions (another program, during
            // them) is looked at by the next pass: this read absorbs its event.
            let own: HashSet<&Path> = outcomes.iter().filter_map(|o| o.action.target()).collect();
            followup = match changed {
                Some(changed) => self.attribute(
                    &whole_want,
                    changed.into_iter().filter(|t| !own.contains(t.as_path())),
                )?,
                None => Changes::all(),
            };
            (want.clone(), self.observe(&want, mounts, scope.as_ref())?)
        };
        let t_reobserved = t_start.elapsed();
        // Forget failures and backoffs of objects that no longer exist.
        let exists = |o: &Owner| match o {
            Owner::Volume(v) => desired.volumes.contains_key(v),
            Owner::Kernel(k) => desired.kernels.contains_key(k),
        };
        self.failures.retain(|o, _| exists(o));
        self.retry.retain(|o, _| exists(o));
        let retry_deadline = self
            .retry
            .values()
            .map(|r| r.not_before)
            .filter(|t| *t > now)
            .min();

        if self.storage && scope.is_none() {
            self.usage
                .retain(|id, _| want.vfolder_dirs.contains_key(id));
            for (id, (_, path)) in &want.vfolder_dirs {
                if actual.dirs.contains(path) && (rescan || !self.usage.contains_key(id)) {
                    if let Ok((files, bytes)) = crate::usage::scan(path) {
                        self.usage.insert(
                            *id,
                            Usage {
                                files,
                                bytes,
                                scanned_at: chrono_now(),
                            },
                        );
                    }
                }
            }
        }

        let sas_expiry: Vec<(String, u64)> = actual
            .owned_mounts
            .values()
            .filter_map(|m| m.expires_at.map(|e| (m.volume.clone(), e)))
            .collect();
        let margin = self.sas_lifetime.as_secs() / 3;
        let unix = unix_now();
        let token_margin = self.token_lifetime.as_secs() / 3;
        let renew_deadline = sas_expiry
            .iter()
            .map(|(_, e)| e.saturating_sub(margin))
            .chain(
                actual
                    .owned_tokens
                    .values()
                    .map(|t| t.expires_at.saturating_sub(token_margin)),
            )
            .filter(|d| *d > unix)
            .min()
            .map(|d| now + Duration::from_secs(d - unix));
        // A pass over a few kernels saw only their tokens: keep the other deadlines.
        let renew_deadline = match (&scope, &self.prev) {
            (Some(_), Some(prev)) => renew_deadline.into_iter().chain(prev.renew_deadline).min(),
            _ => renew_deadline,
        };
        let mut report = report(&self.report_inputs(), report_desired, &want, &actual);
        let scoped_converged = report.converged;
        let entries = self.merged_entries(std::mem::take(&mut report.entries), scope.as_ref());
        if let (Some(_), Some(prev)) = (&scope, &self.prev) {
            // Counts over the whole node, from the merged statuses.
            let prefix = self.keys.kernel_status("");
            let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
            for (k, v) in entries.range(prefix.clone()..) {
                if !k.starts_with(&prefix) {
                    break;
                }
                let state = match v.get("state").and_then(serde_json::Value::as_str) {
                    Some("Ready") => "Ready",
                    Some("Failed") => "Failed",
                    Some("Rejected") => "Rejected",
                    _ => "Pending",
                };
                *by_state.entry(state).or_default() += 1;
            }
            report.converged = scoped_converged
                && prev.report.stale_volumes == 0
                && by_state.keys().all(|s| *s == "Ready" || *s == "Rejected");
            report.kernels_by_state = by_state;
            report.stale_volumes = prev.report.stale_volumes;
            report.policy_conflicts = prev.report.policy_conflicts;
        }
        self.status_tx.send_replace(entries);
        tracing::debug!(
            actions = n_actions,
            scoped = scope.as_ref().map(BTreeSet::len),
            ?t_read,
            ?t_scoped,
            ?t_observed,
            ?t_planned,
            ?t_reobserved,
            total = ?t_start.elapsed(),
            "pass phases"
        );
        if scope.is_none() {
            *self.volume_targets.lock().expect("targets lock") = actual
                .owned_mounts
                .values()
                .filter(|m| m.kind == MountKind::Volume)
                .map(|m| m.target.clone())
                .collect();
        }
        let mut owned: BTreeMap<&'static str, i64> = BTreeMap::from([("volume", 0), ("bind", 0)]);
        for m in self.ledger.mounts()?.values() {
            *owned.entry(m.kind.as_str()).or_default() += 1;
        }
        let outcome = PassOutcome {
            report,
            actions: summary,
            owned,
            linger_deadline,
            retry_deadline,
            sas_expiry,
            renew_deadline,
            scoped_converged,
            scope: scope.clone(),
            followup,
        };
        self.prev = Some(outcome.unchanged());
        Ok(outcome)
    }

    /// The statuses to hold after this pass: a whole pass's report as it is;
    /// a pass over a few kernels replaces just those kernels' statuses in
    /// the last ones (the values are shared, so this copies no status).
    fn merged_entries(
        &mut self,
        fresh: BTreeMap<String, Arc<serde_json::Value>>,
        scope: Option<&BTreeSet<String>>,
    ) -> StatusEntries {
        let merged = match scope {
            None => fresh,
            Some(kernels) => {
                let mut m = BTreeMap::clone(&self.entries);
                for k in kernels {
                    let key = self.keys.kernel_status(k);
                    match fresh.get(&key) {
                        Some(v) => m.insert(key, v.clone()),
                        None => m.remove(&key),
                    };
                }
                m
            }
        };
        self.entries = Arc::new(merged);
        self.entries.clone()
    }
}

/// Runs the daemon until `shutdown` resolves. Mounts are left in place on shutdown.
pub async fn run(
    cfg: NodeConfig,
    deps: Deps,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DriverError> {
    tokio::pin!(shutdown);
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let ledger = {
        let dir = cfg.state.join("db");
        tokio::task::spawn_blocking(move || Ledger::open(&dir))
            .await
            .map_err(|e| DriverError::PassPanicked(e.to_string()))??
    };
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // Without HTTP/2 keep-alive a watch hangs forever on a frozen etcd;
        // below 5 s the server answers "too_many_pings" (DESIGN.md).
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum must not feed a stale watch silently.
        .with_require_leader(true);
    let options = crate::etcd::connect_options(&cfg.etcd, options)?;
    // Without auth the client connects lazily; with a user it authenticates
    // at once, which fails while etcd is down: retry rather than exit.
    let client = loop {
        match Client::connect(&cfg.etcd.endpoints, Some(options.clone())).await {
            Ok(c) => break c,
            Err(e @ etcd_client::Error::InvalidArgs(_))
            | Err(e @ etcd_client::Error::InvalidUri(_)) => return Err(DriverError::Etcd(e)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to etcd yet; retrying in 2 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    };

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let (m, h, mut rx) = (metrics.clone(), health.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(listener, m, h, stop).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        })
    };

    let cache = Arc::new(DesiredCache::default());
    // An invalid policy at start is fatal: never run with an open policy by accident.
    let policy = Policy::load_dir(&cfg.policies)?.unwrap_or_default();
    tracing::info!(origin = %policy.origin, "policy in force");
    let policy: PolicyHandle = Arc::new(std::sync::RwLock::new(Arc::new(policy)));
    let parser = DesiredParser {
        keys: keys.clone(),
        policy: policy.clone(),
        kernels_root: cfg.roots.kernels.clone(),
    };
    let credentials_watch = {
        let (dir, cache) = (cfg.credentials.clone(), cache.clone());
        AbortOnDrop(tokio::spawn(async move {
            run_dir_watcher(dir, move || cache.touch()).await
        }))
    };
    let policy_watch = {
        let (dir, handle, parser, cache, m) = (
            cfg.policies.clone(),
            policy.clone(),
            parser.clone(),
            cache.clone(),
            metrics.clone(),
        );
        AbortOnDrop(tokio::spawn(async move {
            run_policy_watcher(dir, handle, parser, cache, move |ok| {
                m.policy_reloads
                    .with_label_values(&[if ok { "ok" } else { "refused" }])
                    .inc();
            })
            .await;
        }))
    };
    // Fail static across restarts: until etcd answers, serve the last good
    // desired state from the store, and never unmount on its behalf.
    match ledger.load_desired() {
        Ok(Some((kvs, rev))) => {
            tracing::info!(
                revision = rev,
                keys = kvs.len(),
                "loaded the last good desired state from the store"
            );
            cache.seed_from_store(parse_listing(&parser, &kvs, rev));
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot load the stored desired state")
        }
    }
    let watcher = AbortOnDrop(tokio::spawn(run_watcher(
        client.clone(),
        parser,
        cache.clone(),
        ledger.clone(),
    )));
    // Mount-table events wake the loop through their own channel: one that
    // only reports vfolderd's own mounts (already read) runs no pass.
    let mounts_changed = Arc::new(tokio::sync::Notify::new());
    let mount_watch = {
        let (path, changed) = (deps.mountinfo_path.clone(), mounts_changed.clone());
        AbortOnDrop(tokio::spawn(async move {
            let wake = || changed.notify_one();
            if let Err(e) = crate::reconcile::mountwatch::watch_mountinfo(&path, wake).await {
                tracing::warn!(error = %e, "mount table events unavailable; relying on resync");
            }
        }))
    };
    let stale: StaleMap = Arc::default();
    let volume_targets: VolumeTargets = Arc::default();
    let prober = {
        let (cache, targets, stale) = (cache.clone(), volume_targets.clone(), stale.clone());
        let (interval, timeout) = (cfg.probe_interval, cfg.probe_timeout);
        AbortOnDrop(tokio::spawn(async move {
            run_prober(targets, interval, timeout, stale, || cache.touch()).await;
        }))
    };
    let liveness = {
        let (cache, health, keys2) = (cache.clone(), health.clone(), keys.clone());
        let roles = cfg.roles.clone();
        let started = chrono_now();
        AbortOnDrop(tokio::spawn(run_liveness(
            client.clone(),
            keys2,
            NODE_LEASE_TTL,
            move || {
                json!({
                    "state": "Running",
                    "version": env!("CARGO_PKG_VERSION"),
                    "revision": cache.revision.load(Ordering::Relaxed),
                    "ready": health.ready.load(Ordering::Relaxed),
                    "roles": roles,
                    "started_at": started,
                })
            },
        )))
    };

    let (status_tx, status_rx) = tokio::sync::watch::channel(StatusEntries::default());
    let status_task = {
        let m = metrics.clone();
        let writer = StatusWriter::new(client.clone(), keys.clone());
        tokio::spawn(run_status_writer(writer, status_rx, move |n| {
            m.status_writes.inc_by(n as u64)
        }))
    };
    let exec_cfg = ExecConfig::from_node(&cfg);
    for root in [&cfg.roots.volumes, &cfg.roots.kernels] {
        if let Err(e) = std::fs::create_dir_all(root) {
            tracing::error!(root = %root.display(), error = %e, "cannot create root");
        }
    }
    let mut rec = Some(Reconciler {
        node: NodeView {
            agent: cfg.has_role(Role::Agent),
            storage: cfg.has_role(Role::Storage),
            volumes_root: cfg.roots.volumes.clone(),
            kernels_root: cfg.roots.kernels.clone(),
            policy: policy.read().expect("policy lock").clone(),
        },
        storage: cfg.has_role(Role::Storage),
        keys: keys.clone(),
        exec: Executor::new(deps.mounter.clone(), ledger.clone(), exec_cfg)
            .with_mount_wait(deps.mountinfo.clone()),
        ledger,
        mountinfo: deps.mountinfo.clone(),
        linger: cfg.linger,
        idle_since: BTreeMap::new(),
        failures: BTreeMap::new(),
        dir_failures: BTreeMap::new(),
        usage: BTreeMap::new(),
        status_tx,
        retry: BTreeMap::new(),
        stale: stale.clone(),
        volume_targets: volume_targets.clone(),
        sas_lifetime: cfg.sas_lifetime,
        token_lifetime: cfg.token_lifetime,
        credentials_dir: cfg.credentials.clone(),
        mountinfo_path: deps.mountinfo_path.clone(),
        entries: StatusEntries::default(),
        prev: None,
        mount_cache: None,
        want_cache: None,
    });

    health.alive.store(true, Ordering::Relaxed);
    tracing::info!(node = %cfg.node, roles = ?cfg.roles, "waiting for the first complete list of etcd");
    // Readiness gate (invariant 2): nothing is planned before the first list
    // (or, after a restart, before the stored last good state is loaded; then
    // nothing is unmounted until a live list arrives).
    while !cache.synced.load(Ordering::Acquire) {
        metrics
            .etcd_connected
            .set(i64::from(cache.connected.load(Ordering::Relaxed)));
        tokio::select! {
            _ = cache.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut shutdown => return finish(stop_tx, server, &health).await,
        }
    }

    let mut next_resync = Instant::now() + cfg.resync;
    let mut backoff = BACKOFF_MIN;
    let mut converged_once = false;
    // What changed and is not yet handled; the first pass looks at everything.
    let mut pending = Changes::all();
    // When the whole pass that kernel removals call for is due.
    let mut volume_pass_at: Option<Instant> = None;
    'passes: loop {
        let live = cache.live.load(Ordering::Acquire);
        let (mut desired, generation, changes) = cache.take();
        pending.merge(changes);
        let current_policy = policy.read().expect("policy lock").clone();
        if current_policy.limits.any() {
            // Limits count across kernels: one kernel's change can move another.
            pending.all = true;
            Arc::make_mut(&mut desired).enforce_limits(&current_policy);
        }
        let rescan = Instant::now() >= next_resync;
        if rescan {
            next_resync = Instant::now() + cfg.resync;
            pending.all = true;
        }
        // Watch events that name only kernels make a pass over those kernels
        // (plus any whose mounts changed); anything else is a whole pass.
        let taken = std::mem::take(&mut pending);
        if taken.all {
            volume_pass_at = None;
        } else if taken.volumes {
            volume_pass_at.get_or_insert(Instant::now() + VOLUME_PASS_DELAY);
        }
        let scope = (!taken.all).then_some(taken.kernels);
        let started = std::time::Instant::now();
        let span = tracing::info_span!("reconcile", revision = desired.revision);
        let mut last: Option<PassOutcome> = None;
        for round in 0..MAX_CHAINED_PASSES {
            let mut r = rec.take().expect("reconciler present");
            r.node.policy = current_policy.clone();
            let d = desired.clone();
            let span = span.clone();
            // A chained pass looks again at what the last one looked at
            // (including kernels it found through mount-table changes).
            let scope = match &last {
                Some(o) => o.scope.clone(),
                None => scope.clone(),
            };
            let (r, result) = tokio::task::spawn_blocking(move || {
                let _e = span.enter();
                let res = r.pass(&d, generation, scope, rescan && round == 0, live);
                (r, res)
            })
            .await
            .map_err(|e| DriverError::PassPanicked(e.to_string()))?;
            rec = Some(r);
            match result {
                Ok(o) => {
                    if o.scope.is_some() {
                        metrics.kernel_passes.inc();
                    }
                    for (kind, ok) in &o.actions {
                        metrics
                            .actions
                            .with_label_values(&[*kind, if *ok { "ok" } else { "error" }])
                            .inc();
                    }
                    // Another pass only while actions succeed and the state
                    // read after them still is not what is wanted.
                    let again = o.actions.iter().any(|(_, ok)| *ok) && !o.scoped_converged;
                    last = Some(o);
                    if !again {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "reconcile pass failed; retrying");
                    // The retry looks at everything.
                    pending.all = true;
                    break;
                }
            }
        }
        metrics
            .pass_duration
            .observe(started.elapsed().as_secs_f64());
        let done: usize = last.as_ref().map_or(0, |o| o.actions.len());
        if done >= TRIM_AFTER_ACTIONS {
            // A burst freed a lot: give it back instead of keeping it resident.
            crate::memory::release_free_memory();
        }
        let mut wake = next_resync;
        if let Some(at) = volume_pass_at {
            wake = wake.min(at);
        }
        if let Some(o) = &last {
            if o.followup.all || !o.followup.kernels.is_empty() {
                pending.merge(o.followup.clone());
                wake = Instant::now();
            }
        }
        if let Some(o) = last.as_ref().filter(|o| !o.scoped_converged) {
            // Not done with these kernels: the next pass looks at them again,
            // at once if this one was still making progress.
            if let Some(kernels) = &o.scope {
                pending.kernels.extend(kernels.iter().cloned());
            }
            if o.actions.iter().any(|(_, ok)| *ok) {
                wake = Instant::now();
            }
        }
        if let Some(o) = &last {
            metrics
                .passes
                .with_label_values(&[if o.report.converged {
                    "converged"
                } else {
                    "pending"
                }])
                .inc();
            for state in ["Pending", "Ready", "Failed", "Rejected"] {
                metrics
                    .kernels
                    .with_label_values(&[state])
                    .set(*o.report.kernels_by_state.get(state).unwrap_or(&0) as i64);
            }
            metrics.stale_volumes.set(o.report.stale_volumes as i64);
            metrics
                .policy_conflicts
                .set(o.report.policy_conflicts as i64);
            for (kind, n) in &o.owned {
                metrics.owned_mounts.with_label_values(&[kind]).set(*n);
            }
            for (kind, n) in desired.rejected_counts() {
                metrics.rejected.with_label_values(&[kind]).set(n as i64);
            }
            converged_once = true;
            backoff = BACKOFF_MIN;
            metrics.sas_expiry.reset();
            for (volume, at) in &o.sas_expiry {
                metrics
                    .sas_expiry
                    .with_label_values(&[volume])
                    .set(*at as i64);
            }
            for d in [o.linger_deadline, o.retry_deadline, o.renew_deadline]
                .into_iter()
                .flatten()
            {
                wake = wake.min(d);
            }
        } else {
            wake = wake.min(Instant::now() + backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let connected = cache.connected.load(Ordering::Relaxed);
        metrics.etcd_connected.set(i64::from(connected));
        metrics
            .watch_revision
            .set(cache.revision.load(Ordering::Relaxed));
        let ready = converged_once && connected && live;
        health.ready.store(ready, Ordering::Relaxed);
        health.serving.store(converged_once, Ordering::Relaxed);
        metrics.ready.set(i64::from(ready));

        // Leading edge: the first change runs a pass at once; changes that
        // arrive during a pass are coalesced into the next one.
        loop {
            tokio::select! {
                _ = cache.changed.notified() => break,
                _ = mounts_changed.notified() => {
                    if !rec.as_ref().is_some_and(Reconciler::mount_table_current) {
                        break;
                    }
                    tracing::trace!("mount-table event already seen");
                }
                _ = sleep_until(wake) => {
                    // A deadline (resync, linger, retry, renewal): a whole pass.
                    pending.all = true;
                    break;
                }
                _ = &mut shutdown => break 'passes,
            }
        }
    }
    drop(watcher);
    drop(mount_watch);
    drop(policy_watch);
    drop(credentials_watch);
    drop(prober);
    drop(liveness);
    // Let the last report reach etcd (briefly: etcd may be gone).
    drop(rec);
    let _ = tokio::time::timeout(Duration::from_secs(2), status_task).await;
    finish(stop_tx, server, &health).await
}

async fn finish(
    stop_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    health: &Health,
) -> Result<(), DriverError> {
    health.alive.store(false, Ordering::Relaxed);
    tracing::info!("shutting down; every mount is left in place for running kernels");
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

/// Aborts a background task when dropped (mini-redis `DbDropGuard`).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_mount_table_turns_stale_on_a_mount_and_stays_stale() {
        // Needs root in a private mount namespace (the test command runs so).
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = MountCache {
            sentinel: std::fs::File::open("/proc/self/mountinfo").unwrap(),
            table: Arc::new(ProcMountInfo::default().read().unwrap()),
            changed: std::cell::Cell::new(false),
        };
        assert!(!cache.stale(), "nothing changed yet");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let stale = cache.stale();
        // The kernel reports the change to one poll only; the cache must not forget it.
        let still = cache.stale();
        nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(stale && still);
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
}
