//! One reconcile pass, as a pipeline: resolve → observe → scope → plan →
//! execute → remember → report. The [`Reconciler`] carries what one pass
//! leaves for the next (caches, failures, backoffs, linger); the loop that
//! decides when to run a pass is [`crate::daemon`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use crate::keys::Keys;
use crate::lifecycle::{LifeStatus, LifecycleBoard};
use crate::reconcile::bookkeeping::{renewal_deadline, Linger, Retries};
use crate::reconcile::execute::{status_message, ExecError, Executor, Outcome};
use crate::reconcile::explain::{self, PlanSource, PlanView};
use crate::reconcile::observe::{attribute, MountChanges, ObserveError, Observer};
use crate::reconcile::plan::{
    plan, resolve, Action, ActionKind, Actual, NodeView, Want, WantKernel,
};
use crate::reconcile::probe::VolumeTargets;
use crate::reconcile::report::{
    report, Failure, KernelState, Report, ReportInputs, Summary, Usage,
};
use crate::reconcile::scope;
use crate::reconcile::usagescan::UsageBoard;
use crate::state::desired::Desired;
use crate::state::election::{Elections, Led, Scope};
use crate::state::events::EventLog;
use crate::state::ledger::{Ledger, MountKind, Owner};
use crate::state::status::{StatusBatch, StatusEntries};
use crate::state::watch::Changes;

/// Errors of one pass (transient: the loop retries with backoff).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The node could not be observed.
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] crate::state::ledger::LedgerError),
    /// The pass panicked (a bug): the loop logs it and retries with backoff.
    #[error("{0}")]
    Panicked(String),
}

/// The wall clock in unix seconds (what SAS and token expiries are written in).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One executed action's kind and whether it succeeded (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionResult {
    /// What it did.
    pub kind: ActionKind,
    /// Whether it succeeded.
    pub ok: bool,
    /// How long it ran.
    pub elapsed: std::time::Duration,
    /// A mount's or an unmount's fstype (a metric label).
    pub fstype: Option<&'static str>,
    /// A mount helper that ran out of time.
    pub helper_timeout: bool,
    /// Whether it ran (not skipped because one it depends on failed).
    pub attempted: bool,
}

/// What one pass did.
#[derive(Clone)]
pub struct PassOutcome {
    /// Whether what this pass looked at is as wanted (a pass over a few
    /// kernels: those kernels).
    pub scoped_converged: bool,
    /// The kernels a pass over a few kernels looked at (those named by
    /// events, and those whose mounts changed); `None` for a whole pass.
    pub scope: Option<BTreeSet<String>>,
    /// Changes another program made while this pass acted (seen in the read
    /// after acting, whose event that read absorbed): for the next pass.
    pub followup: Changes,
    /// Node-wide counts for metrics (its statuses went to the writer).
    pub summary: Summary,
    /// Every action attempted.
    pub actions: Vec<ActionResult>,
    /// Owned mounts by kind, for the gauge.
    pub owned: BTreeMap<&'static str, i64>,
    /// When a lingering volume's time runs out.
    pub linger_deadline: Option<Instant>,
    /// When the earliest object backoff ends.
    pub retry_deadline: Option<Instant>,
    /// When the mount table should be read again though nothing signals
    /// (a change that may have been a remount, read at most once a
    /// second): a look at the table, not a whole pass.
    pub reread_at: Option<Instant>,
    /// Blob volumes' SAS expiry (unix seconds), for the metric.
    pub sas_expiry: Vec<(String, u64)>,
    /// When the next SAS or token file enters its renewal window.
    pub renew_deadline: Option<Instant>,
    /// vfolders a kernel's bind found no directory for: an agent asks
    /// whether their storage node refuses them ([`crate::state::verdict`]).
    pub missing_vfolders: BTreeSet<Uuid>,
}

impl PassOutcome {
    /// The same state, with nothing done (a pass that found nothing to look at).
    fn unchanged(&self) -> PassOutcome {
        PassOutcome {
            actions: Vec::new(),
            followup: Changes::default(),
            missing_vfolders: BTreeSet::new(),
            ..self.clone()
        }
    }

    /// Whether at least one action succeeded (the pass made progress).
    pub fn progressed(&self) -> bool {
        self.actions.iter().any(|a| a.ok)
    }
}

/// What a pass is asked to do.
pub struct PassInput<'a> {
    /// The desired state (limits applied).
    pub desired: &'a Desired,
    /// Its generation (a new one invalidates the resolution cache).
    pub generation: u64,
    /// `Some(kernels)`: look only at these kernels; `None`: the whole node.
    pub scope: Option<BTreeSet<String>>,
    /// The desired state is from a live etcd list: teardown is allowed.
    /// Without it (the last good state from the store) nothing is taken away.
    pub live: bool,
}

/// Fixed parts of a [`Reconciler`].
pub struct ReconcilerParts {
    /// The node's view for the planner.
    pub node: NodeView,
    /// Key layout.
    pub keys: Keys,
    /// Carries out actions.
    pub exec: Executor,
    /// Ownership records.
    pub ledger: Ledger,
    /// Reads the node.
    pub observer: Observer,
    /// How long unused volumes stay mounted.
    pub linger: Linger,
    /// Where statuses go (the background writer).
    pub status_tx: tokio::sync::watch::Sender<StatusBatch>,
    /// Owned volume mount points, published for the prober.
    pub volume_targets: VolumeTargets,
    /// Where vfolder directories are published for the usage scanner.
    pub usage: Arc<UsageBoard>,
    /// Where served volumes are published for the lifecycle worker.
    pub lifecycle: Arc<LifecycleBoard>,
    /// Per-volume leadership among storage nodes (storage role).
    pub elections: Option<Arc<Elections>>,
    /// Where status changes that are events go.
    pub events: Arc<EventLog>,
}

/// State carried from pass to pass (moved onto a blocking thread for each pass).
pub struct Reconciler {
    /// The node's view for the planner (its policy is swapped before a pass).
    pub node: NodeView,
    keys: Keys,
    exec: Executor,
    ledger: Ledger,
    observer: Observer,
    linger: Linger,
    retries: Retries,
    failures: BTreeMap<Owner, Failure>,
    dir_failures: BTreeMap<PathBuf, String>,
    /// vfolder directories this process made: empty when made, so their
    /// usage is known (0) before the first scan; any other is unknown.
    made_dirs: HashSet<PathBuf>,
    /// vfolder usage, measured off the loop ([`crate::reconcile::usagescan`]).
    usage: Arc<UsageBoard>,
    /// The measurements the current report uses.
    usage_now: Arc<BTreeMap<Uuid, Usage>>,
    /// Trash and purge, off the loop ([`crate::lifecycle`]).
    lifecycle: Arc<LifecycleBoard>,
    /// The lifecycle statuses the current report uses.
    lifecycle_now: Arc<BTreeMap<Uuid, LifeStatus>>,
    /// Which volumes this node leads (storage role), read at each pass.
    elections: Option<Arc<Elections>>,
    /// What this pass reports and writes statuses under: the terms held, for
    /// the volumes the lifecycle worker has looked at.
    report_led: Option<Arc<Led>>,
    status_tx: tokio::sync::watch::Sender<StatusBatch>,
    volume_targets: VolumeTargets,
    /// The statuses last handed to the writer.
    entries: StatusEntries,
    /// Every kernel's last state (a pass over a few kernels counts from it).
    kernel_states: BTreeMap<String, KernelState>,
    /// What the last pass found (a pass over a few kernels starts from it).
    prev: Option<PassOutcome>,
    /// What the desired state resolved to, keyed by the desired state's
    /// generation, the policy it was resolved under and what the node led.
    want_cache: Option<(u64, (usize, u64), Arc<Want>)>,
    /// The store was rebuilt: the first whole live pass adopts what sits at
    /// the targets vfolderd would mount.
    adopt: bool,
    /// vfolders whose bind found no directory in this pass.
    missing_vfolders: BTreeSet<Uuid>,
    /// Where status changes that are events go.
    events: Arc<EventLog>,
    /// The statuses of the last report after acting (events compare with
    /// these: the `Pending` said before acting is not news).
    settled: StatusEntries,
}

/// What the executor did, folded into per-object results.
struct Executed {
    actions: Vec<ActionResult>,
    /// Mount points the actions changed (their events are ours).
    own_targets: HashSet<PathBuf>,
}

impl Reconciler {
    /// A reconciler that has run no pass yet.
    pub fn new(p: ReconcilerParts) -> Self {
        Self {
            node: p.node,
            keys: p.keys,
            exec: p.exec,
            ledger: p.ledger,
            observer: p.observer,
            linger: p.linger,
            retries: Retries::default(),
            failures: BTreeMap::new(),
            dir_failures: BTreeMap::new(),
            made_dirs: HashSet::new(),
            usage: p.usage,
            usage_now: Arc::default(),
            lifecycle: p.lifecycle,
            lifecycle_now: Arc::default(),
            report_led: p.elections.as_ref().map(|_| Arc::default()),
            elections: p.elections,
            status_tx: p.status_tx,
            volume_targets: p.volume_targets,
            entries: StatusEntries::default(),
            kernel_states: BTreeMap::new(),
            prev: None,
            want_cache: None,
            adopt: false,
            missing_vfolders: BTreeSet::new(),
            events: p.events,
            settled: StatusEntries::default(),
        }
    }

    /// The ownership records were lost (a damaged store moved aside): the
    /// first whole pass over a live desired state records as vfolderd's the
    /// mounts that sit exactly where it would mount (its own volume targets
    /// and kernel binds, inside its roots), instead of reporting every
    /// running kernel as occupied by a stranger's mount.
    pub fn adopt_after_rebuild(&mut self) {
        self.adopt = true;
    }

    /// Records wanted volume and bind targets that are mounted but unowned.
    fn adopt_wanted_mounts(&mut self, want: &Want, actual: &Actual) -> Result<usize, PassError> {
        use crate::reconcile::execute::{bind_record, home_record, volume_record};
        let unowned =
            |t: &Path| actual.mounts.top(t).is_some() && !actual.owned_mounts.contains_key(t);
        // A home is ours if it is a shared bind of itself, as vfolderd
        // leaves every home (its mount root is the tail of its path).
        let home = |(id, k): (&String, &WantKernel)| {
            let h = k.home.as_ref()?;
            let own = actual.mounts.top(h).is_some_and(|m| {
                let rel = m.root.strip_prefix("/").unwrap_or(&m.root);
                m.shared && !rel.as_os_str().is_empty() && h.ends_with(rel)
            });
            (unowned(h) && own).then(|| home_record(h, id))
        };
        let mut records: Vec<_> = want
            .volumes
            .values()
            .filter(|v| unowned(&v.target))
            .map(volume_record)
            .chain(
                want.binds
                    .values()
                    .filter(|b| unowned(&b.target))
                    .map(bind_record),
            )
            .chain(want.kernels.iter().filter_map(home))
            .collect();
        let scope = actual.mounts.id_scope();
        for r in records.iter_mut() {
            // Named by the id of the mount adopted, of the table's kind.
            let top = actual.mounts.top(&r.target).map(|m| m.id);
            if let (Some(boot), Some(id)) = (scope.boot, top) {
                r.mount_id = Some(crate::state::ledger::MountStamp {
                    boot,
                    id: scope.unique.then_some(id),
                    short: (!scope.unique).then_some(id),
                });
            }
            self.ledger.put_mount(r)?;
        }
        Ok(records.len())
    }

    /// The resync: a remount made along with other mount changes (which
    /// nothing names) is looked for in this pass's table read.
    pub fn suspect_remounts(&self) {
        self.observer.suspect_attrs();
    }

    /// Whether the mount table read last is still current (a mount-table
    /// wake-up caused by vfolderd's own mounts then needs no pass).
    pub fn mount_table_current(&self) -> bool {
        self.observer.mount_table_current()
    }

    /// One pass; a panic inside it (a bug) is an error of this pass, not
    /// the end of the daemon.
    pub fn guarded_pass(&mut self, input: PassInput<'_>) -> Result<PassOutcome, PassError> {
        crate::error::guarded("a reconcile pass", || self.pass(input))
            .map_err(PassError::Panicked)?
    }

    /// One pass.
    pub fn pass(&mut self, input: PassInput<'_>) -> Result<PassOutcome, PassError> {
        let t_start = std::time::Instant::now();
        if let Some(e) = &self.elections {
            self.node.led = Some(e.led());
            self.node.fenced = e.fenced();
        }
        let whole = self.resolve(input.desired, input.generation, input.scope.as_ref());
        let (mounts, changed) = self.observer.mount_table(None)?;
        let scope = self.widen_scope(&whole, input.scope, changed, input.live)?;
        if scope.is_none() {
            self.refresh_report_led();
        }
        if let (Some(kernels), Some(prev)) = (&scope, &self.prev) {
            if kernels.is_empty() {
                // Nothing of ours changed (another program's mount elsewhere).
                let mut o = prev.unchanged();
                o.scope = scope;
                o.scoped_converged = true;
                o.reread_at = self.observer.reread_at();
                return Ok(o);
            }
        }
        let want = match &scope {
            Some(kernels) => Arc::new(scope::want_of_kernels(&whole, kernels)),
            None => whole.clone(),
        };
        let mut actual = self
            .observer
            .observe(&self.ledger, &want, mounts, scope.as_ref())?;
        if self.adopt && scope.is_none() && input.live {
            let n = self.adopt_wanted_mounts(&want, &actual)?;
            tracing::warn!(
                adopted = n,
                "state store rebuilt: adopted the mounts at vfolderd's own targets"
            );
            self.adopt = false;
            let mounts = actual.mounts.clone();
            actual = self.observer.observe(&self.ledger, &want, mounts, None)?;
        }
        let t_observed = t_start.elapsed();
        let now = Instant::now();
        let report_desired = scope
            .as_ref()
            .map(|k| scope::desired_of_kernels(input.desired, k));
        let report_desired = report_desired.as_ref().unwrap_or(input.desired);

        let actions = self.plan(&want, &actual, scope.as_ref(), input.live, now);
        // What is about to change is reported first: at once before a
        // volume mount (seconds, maybe), otherwise held back by the writer
        // unless the work outlasts its grace (a kernel that is Ready a few
        // milliseconds later is reported once, as Ready).
        let mounts_volume = actions
            .iter()
            .any(|a| matches!(a, Action::MountVolume { .. }));
        // Kernels in their backoff are skipped by the executor: not attaching.
        let resting: BTreeSet<&str> = self
            .retries
            .waiting(now)
            .filter_map(|o| match o {
                Owner::Kernel(k) => Some(k.as_str()),
                _ => None,
            })
            .collect();
        let attaching: Vec<String> = scope::kernels_acted_on(&actions)
            .into_iter()
            .filter(|k| !resting.contains(k))
            .map(str::to_string)
            .collect();
        if mounts_volume || !attaching.is_empty() {
            self.pre_report(
                report_desired,
                &want,
                &actual,
                &attaching,
                scope.as_ref(),
                mounts_volume,
            );
        }
        let t_planned = t_start.elapsed();
        let n_actions = actions.len();
        let (actual, executed, followup) = if actions.is_empty() {
            (actual, Vec::new(), Changes::default())
        } else {
            let paused = self.observer.acting();
            let executed = self.execute(actions, &actual, now);
            drop(paused);
            drop(actual);
            let (actual, followup) = self.reobserve(&whole, &want, scope.as_ref(), &executed)?;
            (actual, executed.actions, followup)
        };
        let t_reobserved = t_start.elapsed();
        self.remember(input.desired, &want, &actual, scope.is_none());
        let outcome = self.report(
            report_desired,
            &want,
            &actual,
            scope,
            followup,
            executed,
            now,
        )?;
        tracing::debug!(
            actions = n_actions,
            scoped = outcome.scope.as_ref().map(BTreeSet::len),
            ?t_observed,
            ?t_planned,
            ?t_reobserved,
            total = ?t_start.elapsed(),
            "pass phases"
        );
        self.prev = Some(outcome.unchanged());
        Ok(outcome)
    }

    /// The desired state resolved for this node; recomputed only when the
    /// desired state or the policy changed since the last pass.
    /// (`added`: the kernels the desired state gained since the last call,
    /// if that is all that changed; they are resolved alone and merged.)
    fn resolve(
        &mut self,
        desired: &Desired,
        generation: u64,
        added: Option<&BTreeSet<String>>,
    ) -> Arc<Want> {
        // What the node leads changes what it resolves, as a new policy does.
        let led = self.node.led.as_ref().map_or(0, |l| l.version);
        let policy = (Arc::as_ptr(&self.node.policy) as usize, led);
        match self.want_cache.take() {
            Some((g, p, w)) if g == generation && p == policy => {
                self.want_cache = Some((g, p, w.clone()));
                return w;
            }
            Some((_, p, mut w)) if p == policy => {
                if let Some(added) = added {
                    let merged = crate::reconcile::plan::resolve_added(
                        &self.node,
                        desired,
                        Arc::make_mut(&mut w),
                        added,
                    );
                    if merged {
                        self.want_cache = Some((generation, policy, w.clone()));
                        return w;
                    }
                }
            }
            _ => {}
        }
        let w = Arc::new(resolve(&self.node, desired));
        self.want_cache = Some((generation, policy, w.clone()));
        w
    }

    /// A pass over a few kernels also covers the kernels whose mounts
    /// changed; a change it cannot attribute (or a table read from scratch,
    /// or a desired state not yet live) makes it a whole pass (`None`).
    fn widen_scope(
        &self,
        whole: &Want,
        scope: Option<BTreeSet<String>>,
        changed: MountChanges,
        live: bool,
    ) -> Result<Option<BTreeSet<String>>, PassError> {
        Ok(match (scope, changed) {
            (Some(mut kernels), Some(changed)) if live => {
                let found = attribute(&self.node, whole, &self.ledger.mounts()?, changed);
                kernels.extend(found.kernels);
                (!found.all).then_some(kernels)
            }
            _ => None,
        })
    }

    /// The actions to take: the planner's, minus what a pass over a few
    /// kernels or a desired state that is not live may not do.
    fn plan(
        &mut self,
        want: &Want,
        actual: &Actual,
        kernels: Option<&BTreeSet<String>>,
        live: bool,
        now: Instant,
    ) -> Vec<Action> {
        // Linger (whole passes only): an owned volume nothing wants stays
        // mounted for `linger`.
        let keep = if kernels.is_some() {
            BTreeSet::new()
        } else {
            let owned = actual
                .owned_mounts
                .values()
                .filter(|m| m.kind == MountKind::Volume)
                .map(|m| &m.volume);
            self.linger
                .update(owned, |v| want.volumes.contains_key(v), now)
        };
        let mut actions = plan(&self.node, want, actual, &keep);
        if kernels.is_some() {
            actions = scope::kernel_scoped(actions, actual);
        }
        if !live {
            actions = scope::without_teardown(actions);
        }
        self.spare_hung_volumes(actions, want, actual)
    }

    /// Drops the actions that would touch a volume that does not answer;
    /// their kernels wait, `Pending` with the reason.
    fn spare_hung_volumes(
        &mut self,
        actions: Vec<Action>,
        want: &Want,
        actual: &Actual,
    ) -> Vec<Action> {
        let (kept, waiting) = without_hung_volumes(actions, want, actual);
        for (kernel, volume) in waiting {
            let message = format!("volume {volume} does not answer; its binds wait until it does");
            let failure = Failure {
                message,
                pending: true,
            };
            self.failures.insert(Owner::Kernel(kernel), failure);
        }
        kept
    }

    /// The actions this node would take now, and why, acting on nothing:
    /// the whole desired state resolved afresh, the mount table read whole
    /// (what the next pass reads as changed is left as it is), linger and
    /// backoffs as this process keeps them.
    pub fn plan_now(&mut self, desired: &Desired, live: bool) -> Result<PlanView, PassError> {
        if let Some(e) = &self.elections {
            self.node.led = Some(e.led());
            self.node.fenced = e.fenced();
        }
        let now = Instant::now();
        let linger = &self.linger;
        let (want, actual, actions) = plan_once(
            &self.node,
            &self.observer,
            &self.ledger,
            desired,
            live,
            |owned, wanted| linger.kept(owned, wanted, now),
        )?;
        // Rounded up: a time shown is never before the backoff ends.
        let wall = std::time::SystemTime::now();
        let unix = |t: Instant| {
            let at = wall + t.saturating_duration_since(now);
            at.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        };
        let pending: BTreeMap<&Owner, (u32, Instant)> = self
            .retries
            .pending(now)
            .map(|(o, n, t)| (o, (n, t)))
            .collect();
        let steps = explain::steps(&actions, &want, &actual, |o| {
            pending.get(o).map(|(_, t)| unix(*t))
        });
        let backoffs = pending
            .iter()
            .map(|(o, (attempts, t))| explain::Backoff {
                object: explain::object_name(o),
                attempts: *attempts,
                until: unix(*t),
                error: self.failures.get(*o).map(|f| f.message.clone()),
            })
            .collect();
        Ok(PlanView {
            node: self.keys.node.clone(),
            source: PlanSource::Daemon,
            revision: desired.revision,
            live,
            steps,
            backoffs,
        })
    }

    /// Says `Pending` for what is about to change before a possibly slow
    /// volume mount (binds take microseconds: their outcome is reported at once).
    fn pre_report(
        &mut self,
        desired: &Desired,
        want: &Want,
        actual: &Actual,
        attaching: &[String],
        kernels: Option<&BTreeSet<String>>,
        prompt: bool,
    ) {
        let mut pre = report(&self.report_inputs(), desired, want, actual);
        // A kernel with actions still to run is not Ready yet, even if
        // everything it has so far is optional (best-effort startup binds).
        for k in attaching {
            pre.mark_attaching(&self.keys, k);
        }
        let entries = self.merged_entries(pre, kernels, false);
        self.send(entries, prompt);
    }

    /// Runs `actions` (objects inside their backoff are skipped) and folds the
    /// outcomes into failures and backoffs per object.
    fn execute(&mut self, actions: Vec<Action>, actual: &Actual, now: Instant) -> Executed {
        let deferred: BTreeMap<Owner, String> = self
            .retries
            .waiting(now)
            .filter_map(|o| self.failures.get(o).map(|f| (o.clone(), f.message.clone())))
            .collect();
        let outcomes = self.exec.execute(actions, &actual.owned_mounts, &deferred);
        let own_targets = outcomes
            .iter()
            .filter(|o| o.result.as_ref().err().is_none_or(ExecError::was_attempted))
            .filter_map(|o| o.action.target())
            .map(Path::to_path_buf)
            .collect();
        let actions = self.fold_outcomes(&outcomes, now);
        Executed {
            actions,
            own_targets,
        }
    }

    /// Per object: the first error of this pass decides its failure and
    /// backoff; an object whose actions all succeeded is cleared.
    fn fold_outcomes(&mut self, outcomes: &[Outcome], now: Instant) -> Vec<ActionResult> {
        let mut results = Vec::with_capacity(outcomes.len());
        let mut touched: BTreeMap<&Owner, Option<&crate::reconcile::execute::ExecError>> =
            BTreeMap::new();
        for o in outcomes {
            if let (Action::MountVolume { volume }, Ok(())) = (&o.action, &o.result) {
                // Freshly mounted: no longer stale (until a probe says otherwise).
                let stale = self.observer.stale();
                stale.lock().expect("stale lock").remove(&volume.target);
            }
            if matches!(
                &o.result,
                Err(crate::reconcile::execute::ExecError::Deferred(_))
            ) {
                continue; // not attempted: no metric, no log, no change
            }
            results.push(ActionResult {
                kind: o.action.kind(),
                ok: o.result.is_ok(),
                elapsed: o.elapsed,
                fstype: o.fstype,
                attempted: o.result.as_ref().err().is_none_or(ExecError::was_attempted),
                helper_timeout: matches!(
                    &o.result,
                    Err(ExecError::Helper {
                        source: crate::reconcile::sys::HelperError::Timeout(_),
                        ..
                    })
                ),
            });
            if let Err(e) = &o.result {
                // A best-effort bind serves no owner, but still its kernel.
                let about = o.owner.clone().or_else(|| match &o.action {
                    Action::Bind { bind } | Action::Remount { bind } => {
                        Some(Owner::Kernel(bind.kernel.clone()))
                    }
                    _ => None,
                });
                let key = about.as_ref().map(|w| self.keys.object_key(&owner_key(w)));
                let object = about.as_ref().map(explain::object_name);
                tracing::warn!(
                    action = %o.action.kind(),
                    object = object.as_deref(),
                    key = key.as_deref(),
                    path = %crate::reconcile::explain::action_target(&o.action).display(),
                    error = %status_message(e),
                    "action failed"
                );
            }
            if let (Action::Bind { bind }, Err(ExecError::SourceMissing(_))) =
                (&o.action, &o.result)
            {
                let vfolder = bind.label.strip_prefix("vfolder:").map(Uuid::parse_str);
                if let Some(Ok(id)) = vfolder {
                    self.missing_vfolders.insert(id);
                }
            }
            if let Action::MakeDir {
                path,
                owner: None,
                quota,
                ..
            } = &o.action
            {
                match &o.result {
                    Ok(()) => self.dir_failures.remove(path),
                    Err(e) => self.dir_failures.insert(path.clone(), status_message(e)),
                };
                if quota.is_some() && o.result.is_ok() {
                    self.made_dirs.insert(path.clone());
                }
            }
            let Some(owner) = &o.owner else { continue };
            let slot = touched.entry(owner).or_insert(None);
            if let (None, Err(e)) = (&slot, &o.result) {
                *slot = Some(e);
            }
        }
        for (owner, first_error) in touched {
            match first_error {
                Some(e) => {
                    self.retries.failed(owner, e, now);
                    let f = Failure {
                        message: status_message(e),
                        pending: e.is_pending(),
                    };
                    self.failures.insert(owner.clone(), f);
                }
                None => {
                    self.retries.succeeded(owner);
                    self.failures.remove(owner);
                }
            }
        }
        results
    }

    /// Reads the table again after acting if it changed (our own mounts
    /// changed it; a pass that mounted nothing reads nothing). What changed
    /// besides our own actions (another program, during them) is for the
    /// next pass: this read absorbs its event.
    fn reobserve(
        &mut self,
        whole: &Want,
        want: &Want,
        kernels: Option<&BTreeSet<String>>,
        executed: &Executed,
    ) -> Result<(Actual, Changes), PassError> {
        let (mounts, changed) = self.observer.mount_table(Some(&executed.own_targets))?;
        let followup = match changed {
            Some(changed) => attribute(
                &self.node,
                whole,
                &self.ledger.mounts()?,
                changed
                    .into_iter()
                    .filter(|t| !executed.own_targets.contains(t)),
            ),
            None => Changes::all(),
        };
        let actual = self.observer.observe(&self.ledger, want, mounts, kernels)?;
        Ok((actual, followup))
    }

    /// What the next pass needs to know: failures of objects that still
    /// exist, and (storage role, whole passes) vfolder usage.
    fn remember(&mut self, desired: &Desired, want: &Want, actual: &Actual, whole: bool) {
        let exists = |o: &Owner| match o {
            Owner::Volume(v) => desired.volumes.contains_key(v),
            Owner::Kernel(k) => desired.kernels.contains_key(k),
        };
        self.failures.retain(|o, _| exists(o));
        self.retries.retain(exists);
        if self.node.storage && whole {
            // Measured by the usage scanner, never here: a scan of a hung
            // volume would hold every kernel of the node back.
            let dirs = want
                .vfolder_dirs
                .iter()
                .filter(|(_, (_, path))| actual.dirs.contains(path))
                .map(|(id, (_, path))| {
                    let target = crate::reconcile::usagescan::ScanTarget {
                        path: path.clone(),
                        quota: want.quotas.get(id).copied(),
                    };
                    (*id, target)
                })
                .collect();
            if !self.made_dirs.is_empty() {
                let wanted: HashSet<&Path> = want
                    .vfolder_dirs
                    .values()
                    .map(|(_, p)| p.as_path())
                    .collect();
                self.made_dirs.retain(|p| wanted.contains(p.as_path()));
            }
            self.usage.publish(dirs);
            // Mounted and answering: a hung volume is not looked into.
            let served: BTreeMap<String, crate::lifecycle::Served> = want
                .volumes
                .iter()
                .filter(|(name, v)| !actual.hung_volumes.contains(*name) && actual.ours(&v.target))
                .map(|(name, v)| {
                    let owner = crate::lifecycle::clone::Owner {
                        uid: v.owner.uid,
                        gid: v.owner.gid,
                    };
                    let target = v.target.clone();
                    (name.clone(), crate::lifecycle::Served { target, owner })
                })
                .collect();
            if let Some(e) = &self.elections {
                e.want(served.keys().cloned());
            }
            self.lifecycle.publish(served);
        }
        if whole {
            // With the id of the mount there now, so a verdict is about it.
            *self.volume_targets.lock().expect("targets lock") = actual
                .owned_mounts
                .values()
                .filter(|m| m.kind == MountKind::Volume && actual.ours(&m.target))
                .filter_map(|m| Some((m.target.clone(), actual.mounts.top(&m.target)?.id)))
                .collect();
        }
    }

    /// Reports the statuses, hands them to the writer and builds the outcome.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &mut self,
        desired: &Desired,
        want: &Want,
        actual: &Actual,
        kernels: Option<BTreeSet<String>>,
        followup: Changes,
        actions: Vec<ActionResult>,
        now: Instant,
    ) -> Result<PassOutcome, PassError> {
        let report = report(&self.report_inputs(), desired, want, actual);
        let scoped_converged = report.summary.converged;
        let mut summary = report.summary.clone();
        let entries = self.merged_entries(report, kernels.as_ref(), true);
        if let (Some(_), Some(prev)) = (&kernels, &self.prev) {
            summary =
                scope::node_wide_summary(scoped_converged, &prev.summary, &self.kernel_states);
        }
        self.send(entries, false);
        let sas_expiry: Vec<(String, u64)> = actual
            .owned_mounts
            .values()
            .filter_map(|m| m.expires_at.map(|e| (m.volume.clone(), e)))
            .collect();
        let mut renew_deadline = self.renew_deadline(&sas_expiry, actual, now);
        if let (Some(_), Some(prev)) = (&kernels, &self.prev) {
            // A pass over a few kernels saw only their tokens: keep the other deadlines.
            renew_deadline = renew_deadline.into_iter().chain(prev.renew_deadline).min();
        }
        let mut owned: BTreeMap<&'static str, i64> = BTreeMap::from([("volume", 0), ("bind", 0)]);
        for m in self.ledger.mounts()?.values() {
            *owned.entry(m.kind.as_str()).or_default() += 1;
        }
        Ok(PassOutcome {
            summary,
            actions,
            owned,
            linger_deadline: self.linger.deadline(now),
            retry_deadline: self.retries.deadline(now),
            reread_at: self.observer.reread_at(),
            sas_expiry,
            renew_deadline,
            scoped_converged,
            scope: kernels,
            followup,
            missing_vfolders: std::mem::take(&mut self.missing_vfolders),
        })
    }

    /// When the next blob-mount SAS or token file enters its renewal window.
    fn renew_deadline(
        &self,
        sas_expiry: &[(String, u64)],
        actual: &Actual,
        now: Instant,
    ) -> Option<Instant> {
        let (sas_lifetime, token_lifetime) = self.observer.lifetimes();
        let expiries = sas_expiry.iter().map(|(_, e)| (*e, sas_lifetime)).chain(
            actual
                .owned_tokens
                .values()
                .map(|t| (t.expires_at, token_lifetime)),
        );
        renewal_deadline(expiries, unix_now(), now)
    }

    /// What whole passes report and write vfolder statuses under: the terms
    /// held, for the volumes the lifecycle worker has looked at. Changed by
    /// whole passes only: a pass over a few kernels keeps the vfolder
    /// statuses of the last whole one, which must go with its terms.
    fn refresh_report_led(&mut self) {
        let Some(led) = self.node.led.clone() else {
            return;
        };
        if self.node.led.as_ref().map(|l| l.version) != self.report_led.as_ref().map(|l| l.version)
        {
            // Leadership moved: a directory made before may have been
            // filled under another leader since.
            self.made_dirs.clear();
        }
        let covered = self.lifecycle.covered();
        let all_covered = led.terms().all(|(s, _)| match s {
            Scope::Volume(v) => covered.contains(v),
            Scope::Cluster => true,
        });
        self.report_led = Some(if all_covered {
            led
        } else {
            Arc::new(led.only(|v| covered.contains(v)))
        });
    }

    /// Hands `entries` to the writer, with the terms to write them under.
    /// Hands `entries` to the writer (`prompt`: a `Pending` in them is
    /// written at once, see [`StatusBatch::prompt`]).
    fn send(&self, entries: StatusEntries, prompt: bool) {
        let led = self.report_led.clone();
        self.status_tx.send_replace(StatusBatch {
            entries,
            led,
            prompt,
        });
    }

    fn report_inputs(&mut self) -> ReportInputs<'_> {
        self.usage_now = self.usage.measured();
        self.lifecycle_now = self.lifecycle.statuses();
        ReportInputs {
            keys: &self.keys,
            storage: self.node.storage,
            failures: &self.failures,
            dir_failures: &self.dir_failures,
            made_dirs: &self.made_dirs,
            usage: &self.usage_now,
            lifecycle: &self.lifecycle_now,
            led: self.report_led.as_deref(),
        }
    }

    /// The statuses to hold after this pass, serialised for the writer
    /// (see [`scope::merge_scoped`]).
    /// `settled`: the report after acting, whose changes of state are
    /// events ([`crate::state::events`]).
    fn merged_entries(
        &mut self,
        report: Report,
        kernels: Option<&BTreeSet<String>>,
        settled: bool,
    ) -> StatusEntries {
        let status_keys = kernels.map(|ks| {
            ks.iter()
                .map(|k| self.keys.kernel_status(k))
                .collect::<Vec<_>>()
        });
        let ids = kernels.map(|ks| ks.iter().cloned().collect::<Vec<_>>());
        self.kernel_states =
            scope::merge_scoped(&self.kernel_states, report.kernel_states.clone(), ids);
        let values = report.into_values();
        let merged = Arc::new(scope::merge_scoped(
            &self.entries,
            values,
            status_keys.clone(),
        ));
        if settled {
            self.record_events(&merged, status_keys.as_deref());
            self.settled = merged.clone();
        }
        self.entries = merged;
        self.entries.clone()
    }

    /// The events of a report after acting: what changed since the last one
    /// among the keys it holds (`scoped`: only those), and the objects whose
    /// status went (their events go too).
    fn record_events(&self, merged: &StatusEntries, scoped: Option<&[String]>) {
        use crate::state::events::of_change;
        let mut look = |k: &String| match (self.settled.get(k), merged.get(k)) {
            (old, Some(v)) => {
                if let Some(e) = of_change(&self.keys, k, old.map(|o| o.as_ref()), v) {
                    self.events.record(e);
                }
            }
            (Some(_), None) => self.events.forget(&self.keys, k),
            (None, None) => {}
        };
        match scoped {
            Some(keys) => keys.iter().for_each(&mut look),
            None => {
                merged.keys().for_each(&mut look);
                self.settled
                    .keys()
                    .filter(|k| !merged.contains_key(*k))
                    .for_each(&mut look);
            }
        }
    }
}

/// The desired key an owner's record lives at.
fn owner_key(o: &Owner) -> crate::keys::ObjectKey {
    match o {
        Owner::Kernel(k) => crate::keys::ObjectKey::Kernel(k.clone()),
        Owner::Volume(v) => crate::keys::ObjectKey::Volume(v.clone()),
    }
}

/// The actions whose volume answers, and the (kernel, volume) pairs whose
/// binds wait for a volume that does not (they would put the pass to
/// sleep in the kernel).
fn without_hung_volumes(
    actions: Vec<Action>,
    want: &Want,
    actual: &Actual,
) -> (Vec<Action>, Vec<(String, String)>) {
    if actual.hung_volumes.is_empty() {
        return (actions, Vec::new());
    }
    let roots: Vec<&Path> = actual
        .hung_volumes
        .iter()
        .filter_map(|v| want.volumes.get(v).map(|w| w.target.as_path()))
        .collect();
    let mut waiting: Vec<(String, String)> = Vec::new();
    let kept = actions
        .into_iter()
        .filter(|a| match a {
            Action::Bind { bind } | Action::Remount { bind }
                if actual.hung_volumes.contains(&bind.volume) =>
            {
                waiting.push((bind.kernel.clone(), bind.volume.clone()));
                false
            }
            Action::MakeDir { path, .. } | Action::RemoveDir { path } => {
                !roots.iter().any(|r| path.starts_with(r))
            }
            _ => true,
        })
        .collect();
    (kept, waiting)
}

/// The planner over the node as it is now, acting on nothing (the daemon's
/// `GET /plan`, and `vfolderd plan` with the daemon stopped). `keep` says
/// which owned volumes nothing wants still linger.
pub fn plan_once(
    node: &NodeView,
    observer: &Observer,
    ledger: &Ledger,
    desired: &Desired,
    live: bool,
    keep: impl FnOnce(Vec<&String>, &dyn Fn(&str) -> bool) -> BTreeSet<String>,
) -> Result<(Want, Actual, Vec<Action>), PassError> {
    let want = resolve(node, desired);
    let mounts = observer.fresh_table()?;
    let actual = observer.observe(ledger, &want, mounts, None)?;
    let owned: Vec<&String> = actual
        .owned_mounts
        .values()
        .filter(|m| m.kind == MountKind::Volume)
        .map(|m| &m.volume)
        .collect();
    let keep = keep(owned, &|v: &str| want.volumes.contains_key(v));
    let mut actions = plan(node, &want, &actual, &keep);
    if !live {
        actions = scope::without_teardown(actions);
    }
    let (actions, _) = without_hung_volumes(actions, &want, &actual);
    Ok((want, actual, actions))
}
