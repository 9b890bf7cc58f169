//! The vfolder lifecycle (storage role): trash, restore and purge, off the
//! reconcile loop.
//!
//! A worker of its own looks at each served volume's trash and at the
//! vfolders whose records ask for a move, decides ([`decide`], pure) and
//! acts. Nothing moves and nothing is deleted while any kernel on any node
//! wants the vfolder (the in-use guard reads every node's desired kernels),
//! and nothing at all while the desired state is not live or the safety
//! brake holds (a wiped etcd looks like every record deleted). A purge runs
//! in batches and asks the guard again before each one.

pub mod clone;
pub mod trashfs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::spec::vfolder_relpath;
use crate::state::desired::Desired;
use crate::state::election::Elections;
use crate::state::watch::DesiredCache;
use trashfs::{Entry, Info};

/// Entries a purge removes between two looks at who wants the vfolder.
const PURGE_BATCH: usize = 1000;
/// How long one round may purge before it looks at everything else again.
const PURGE_SLICE: Duration = Duration::from_millis(500);
/// A round with nothing due still runs this often (a kernel on another node
/// let go, a retention passed without any event).
const IDLE_ROUND: Duration = Duration::from_secs(30);

/// Where a vfolder is in its lifecycle, as its status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeState {
    /// In the trash (`trash: true`, or its record deleted and its retention running).
    Trashed,
    /// A requested move or purge waits for the kernels that want it.
    InUse,
    /// Being purged.
    Purging,
    /// Being filled from the vfolder its record's `clone_of` names.
    Cloning,
    /// A move that failed (the error says why); tried again.
    Pending,
}

/// The lifecycle part of a vfolder's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifeStatus {
    /// The state.
    pub state: LifeState,
    /// The volume it lies on.
    pub volume: String,
    /// Where its directory is now.
    pub path: PathBuf,
    /// The kernels (`<node>/<kernel>`) that hold it (`InUse`).
    pub kernels: Vec<String>,
    /// When it went to the trash (unix seconds).
    pub trashed_at: Option<u64>,
    /// When its record was deleted (unix seconds).
    pub deleted_at: Option<u64>,
    /// When its purge may start (unix seconds).
    pub purge_at: Option<u64>,
    /// Files still to remove (`Purging`).
    pub files_left: Option<u64>,
    /// The last move or purge step that failed.
    pub error: Option<String>,
}

/// What to do to one vfolder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Move its directory to the trash.
    Trash {
        /// The vfolder.
        id: Uuid,
        /// Its record was deleted then (a purge follows the retention).
        deleted_at: Option<u64>,
    },
    /// Move it back from the trash.
    Restore {
        /// The vfolder.
        id: Uuid,
    },
    /// Write down when its record was deleted (its info says otherwise).
    Note {
        /// The vfolder.
        id: Uuid,
        /// What to write.
        info: Info,
    },
    /// Its retention passed: start the purge.
    StartPurge {
        /// The vfolder.
        id: Uuid,
    },
    /// Carry on with its purge.
    Purge {
        /// The vfolder.
        id: Uuid,
    },
    /// Fill it from `source` (or see how far its clone is).
    Clone {
        /// The vfolder.
        id: Uuid,
        /// The vfolder it is a clone of.
        source: Uuid,
    },
}

/// One volume as a round sees it.
#[derive(Debug, Clone, Default)]
pub struct VolumeLook {
    /// Its name.
    pub name: String,
    /// Its mount point.
    pub target: PathBuf,
    /// Its trash.
    pub trash: BTreeMap<Uuid, Entry>,
    /// Which of the vfolders a move may concern have a live directory.
    pub live: BTreeSet<Uuid>,
    /// Live directories without a record found by the sweep at start
    /// (records deleted while no storage node watched), and when.
    pub orphans: BTreeMap<Uuid, u64>,
}

/// The live directory of `id` on the volume mounted at `target`.
pub fn live_path(target: &Path, id: &Uuid) -> PathBuf {
    target.join(vfolder_relpath(id))
}

/// Where the trash keeps the vfolder whose live directory is `live`
/// (`<volume>/<xx>/<yy>/<hex>` → `<volume>/.trash/<hex>`).
pub fn trash_of(live: &Path) -> Option<PathBuf> {
    let volume = live.parent()?.parent()?.parent()?;
    Some(volume.join(trashfs::TRASH).join(live.file_name()?))
}

/// The vfolders of volume `vol` whose live directory a round must look at:
/// records asking for the trash, deleted records, and trashed vfolders whose
/// record wants them back.
pub fn candidates(
    d: &Desired,
    vol: &str,
    trash: &BTreeMap<Uuid, Entry>,
    orphans: &BTreeMap<Uuid, u64>,
) -> BTreeSet<Uuid> {
    // O(records that ask for something), not O(records).
    let mut out: BTreeSet<Uuid> = d
        .flagged
        .iter()
        .filter(|id| {
            d.vfolders.get(id).is_some_and(|e| {
                e.spec
                    .as_ref()
                    .is_ok_and(|v| v.volume == vol && (v.trash || v.clone_of.is_some()))
            })
        })
        .copied()
        .collect();
    out.extend(
        d.tombstones
            .iter()
            .filter(|(id, t)| t.volume == vol && !d.vfolders.contains_key(id))
            .map(|(id, _)| *id),
    );
    out.extend(trash.keys().copied());
    out.extend(orphans.keys().filter(|id| !d.vfolders.contains_key(id)));
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The times a decision uses (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Now.
    pub now: u64,
    /// `trash_retention`.
    pub retention: Duration,
    /// Since when the worker may act (the first live list, or the safety
    /// brake's release): a deletion seen earlier counts from here, so a
    /// wiped etcd accepted late does not purge at once.
    pub acting_since: u64,
}

/// What to do on one volume, and the lifecycle statuses it leaves (pure).
pub fn decide(
    d: &Desired,
    v: &VolumeLook,
    clock: &Clock,
) -> (Vec<Step>, BTreeMap<Uuid, LifeStatus>) {
    let (now, retention) = (clock.now, clock.retention);
    // When this node saw the record go (a tombstone, or the sweep), never
    // earlier than it could act on it.
    let seen_deleted = |id: &Uuid| {
        d.tombstones
            .get(id)
            .map(|t| unix(t.deleted_at))
            .or_else(|| v.orphans.get(id).copied())
            .map(|t| t.max(clock.acting_since))
    };
    let mut steps = Vec::new();
    let mut out = BTreeMap::new();
    let trash_dir = v.target.join(trashfs::TRASH);
    for id in candidates(d, &v.name, &v.trash, &v.orphans) {
        let record = d
            .vfolders
            .get(&id)
            .and_then(|e| e.spec.as_ref().ok())
            .filter(|vf| vf.volume == v.name);
        let entry = v.trash.get(&id).cloned().unwrap_or_default();
        let users = d.in_use.users(&id);
        let live = v.live.contains(&id);
        let status = |state, path: PathBuf| LifeStatus {
            state,
            volume: v.name.clone(),
            path,
            kernels: Vec::new(),
            trashed_at: entry.info.map(|i| i.trashed_at),
            deleted_at: entry.info.and_then(|i| i.deleted_at),
            purge_at: None,
            files_left: None,
            error: None,
        };
        let in_use = |path| LifeStatus {
            kernels: users.clone(),
            ..status(LifeState::InUse, path)
        };
        if entry.purging {
            let path = trashfs::purging_path(&v.target, &id);
            // A record made again has a status of its own (a fresh directory).
            let shown = !d.vfolders.contains_key(&id);
            if users.is_empty() {
                steps.push(Step::Purge { id });
                if shown {
                    out.insert(id, status(LifeState::Purging, path));
                }
            } else if shown {
                out.insert(id, in_use(path));
            }
            // A record made again after the purge started gets a fresh
            // directory (the pass makes it); its status is the record's.
            if shown && !entry.trashed {
                continue;
            }
        }
        let in_trash = trash_dir.join(trashfs::hex(&id));
        if let Some(source) = record
            .filter(|vf| !vf.trash && !live && !entry.trashed)
            .and_then(|vf| vf.clone_of)
        {
            // Its directory appears, whole, when the clone is done.
            steps.push(Step::Clone { id, source });
            out.insert(id, status(LifeState::Cloning, live_path(&v.target, &id)));
            continue;
        }
        match record {
            // Wanted back. A fresh directory made meanwhile (after a purge
            // started) wins: the trashed one then waits for its deletion.
            Some(vf) if !vf.trash && entry.trashed && !live => steps.push(Step::Restore { id }),
            Some(vf) if !vf.trash => {}
            Some(_) if live => {
                if users.is_empty() {
                    steps.push(Step::Trash {
                        id,
                        deleted_at: None,
                    });
                    let mut s = status(LifeState::Trashed, in_trash);
                    s.trashed_at = Some(now);
                    out.insert(id, s);
                } else {
                    out.insert(id, in_use(live_path(&v.target, &id)));
                }
            }
            Some(_) => {
                // Trashed by its record: an old deletion time (a record made
                // again) no longer counts.
                if entry.trashed && entry.info.is_none_or(|i| i.deleted_at.is_some()) {
                    let info = Info {
                        trashed_at: entry.info.map_or(now, |i| i.trashed_at),
                        deleted_at: None,
                    };
                    steps.push(Step::Note { id, info });
                }
                let mut s = status(LifeState::Trashed, in_trash);
                s.deleted_at = None;
                out.insert(id, s);
            }
            // A record that moved to another volume, or that is malformed
            // now, is not a deletion.
            None if d.vfolders.contains_key(&id) => {}
            None if live => {
                let deleted_at = seen_deleted(&id).unwrap_or(now);
                if users.is_empty() {
                    steps.push(Step::Trash {
                        id,
                        deleted_at: Some(deleted_at),
                    });
                    let mut s = status(LifeState::Trashed, in_trash);
                    s.trashed_at = Some(now);
                    s.deleted_at = Some(deleted_at);
                    s.purge_at = Some(deleted_at.saturating_add(retention.as_secs()));
                    out.insert(id, s);
                } else {
                    out.insert(id, in_use(live_path(&v.target, &id)));
                }
            }
            None if entry.trashed => {
                let known = entry.info.and_then(|i| i.deleted_at);
                let deleted_at = known.or_else(|| seen_deleted(&id)).unwrap_or(now);
                if known.is_none() {
                    let info = Info {
                        trashed_at: entry.info.map_or(now, |i| i.trashed_at),
                        deleted_at: Some(deleted_at),
                    };
                    steps.push(Step::Note { id, info });
                }
                let purge_at = deleted_at.saturating_add(retention.as_secs());
                let mut s = status(LifeState::Trashed, in_trash.clone());
                s.deleted_at = Some(deleted_at);
                s.purge_at = Some(purge_at);
                if now < purge_at {
                    out.insert(id, s);
                } else if users.is_empty() {
                    steps.push(Step::StartPurge { id });
                    steps.push(Step::Purge { id });
                    let path = trashfs::purging_path(&v.target, &id);
                    out.insert(id, status(LifeState::Purging, path));
                } else {
                    out.insert(id, in_use(in_trash));
                }
            }
            None => {}
        }
    }
    (steps, out)
}

/// A volume this storage node serves, as the pass publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Its mount point.
    pub target: PathBuf,
    /// Who owns its vfolders' files.
    pub owner: clone::Owner,
}

/// What the pass tells the worker, and what the worker tells the pass.
#[derive(Default)]
pub struct LifecycleBoard {
    /// Volume → mount point, for the volumes this node serves that are
    /// mounted and answer (published by whole passes).
    volumes: Mutex<BTreeMap<String, Served>>,
    /// The lifecycle statuses, by vfolder.
    statuses: Mutex<Arc<BTreeMap<Uuid, LifeStatus>>>,
    wake: Notify,
    /// Set once by the daemon of a storage node.
    elections: Mutex<Option<Arc<Elections>>>,
    /// The volumes the last round looked at (their statuses are complete).
    covered: Mutex<Arc<BTreeSet<String>>>,
}

impl LifecycleBoard {
    /// Sets the volumes to look after; wakes the worker if they changed.
    pub fn publish(&self, volumes: BTreeMap<String, Served>) {
        let mut cur = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != volumes {
            *cur = volumes;
            self.wake.notify_one();
        }
    }

    /// Works only on the volumes `e` says this node leads.
    pub fn led_by(&self, e: Arc<Elections>) {
        *self.elections.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn elections(&self) -> Option<Arc<Elections>> {
        self.elections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The latest lifecycle statuses.
    pub fn statuses(&self) -> Arc<BTreeMap<Uuid, LifeStatus>> {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn volumes(&self) -> BTreeMap<String, Served> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The volumes whose lifecycle statuses are known: a pass must not
    /// report a volume's vfolders before the worker has looked at it once,
    /// or the statuses of the vfolders in its trash would be deleted.
    pub fn covered(&self) -> Arc<BTreeSet<String>> {
        self.covered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn cover(&self, volumes: BTreeSet<String>) {
        let mut cur = self.covered.lock().unwrap_or_else(|p| p.into_inner());
        if **cur != volumes {
            *cur = Arc::new(volumes);
        }
    }

    /// Stores `s`; true if it differs from what was there.
    fn store(&self, s: BTreeMap<Uuid, LifeStatus>) -> bool {
        let mut cur = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if **cur == s {
            return false;
        }
        *cur = Arc::new(s);
        true
    }
}

/// Progress alone (`files_left`) reaches the status at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Whether two sets of statuses differ in nothing but progress.
fn same_but_progress(a: &BTreeMap<Uuid, LifeStatus>, b: &BTreeMap<Uuid, LifeStatus>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
            ka == kb
                && LifeStatus {
                    files_left: None,
                    ..va.clone()
                } == LifeStatus {
                    files_left: None,
                    ..vb.clone()
                }
        })
}

/// What a round carries to the next: files left per purge (counted once),
/// per volume swept since start the orphans still to trash, the clones
/// running on threads of their own, and the last failure of each clone.
#[derive(Default)]
struct Progress {
    files_left: HashMap<Uuid, u64>,
    swept: BTreeMap<String, (std::time::Instant, BTreeMap<Uuid, u64>)>,
    /// Since when the worker may act (unix seconds); `None` while it may not.
    acting_since: Option<u64>,
    clones: HashMap<Uuid, CloneJob>,
    clone_failed: HashMap<Uuid, (std::time::Instant, String)>,
    /// Which volumes this node leads among storage nodes (`None`: all).
    elections: Option<Arc<Elections>>,
    /// Set when the worker gave up waiting for this round (stuck in a
    /// volume): once the kernel lets the thread go, it does nothing more,
    /// the rounds after it having carried on without it.
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    /// Whether a directory operation on the volume mounted at `target` may
    /// start now: led, and not fenced ([`Elections::may_act`]).
    fn may_act(&self, target: &Path) -> bool {
        if self.abandoned.load(Ordering::Relaxed) {
            return false;
        }
        let Some(e) = &self.elections else {
            return true;
        };
        target
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| e.may_act(n))
    }
}

/// A clone under way.
struct CloneJob {
    progress: Arc<clone::Progress>,
    thread: std::thread::JoinHandle<Result<(), String>>,
    /// The vfolder it copies from.
    source: Uuid,
    /// The mount point of the volume it writes.
    target: PathBuf,
}

/// How long a failed clone waits before it is tried again.
const CLONE_RETRY: Duration = Duration::from_secs(30);

/// Starts the clone of `source` into `id`, or reports how far it is (files
/// left), or how it ended.
fn clone_step(
    d: &Desired,
    volumes: &BTreeMap<String, Served>,
    served: &Served,
    id: Uuid,
    source: Uuid,
    progress: &mut Progress,
) -> Result<Option<u64>, String> {
    if let Some(job) = progress.clones.get(&id) {
        let left = |p: &clone::Progress| {
            let total = p.total.load(Ordering::Relaxed);
            Some(total.saturating_sub(p.done.load(Ordering::Relaxed)))
        };
        if !job.thread.is_finished() {
            return Ok(left(&job.progress));
        }
        return reap(progress, id).map(|()| Some(0));
    }
    if let Some((at, e)) = progress.clone_failed.get(&id) {
        if at.elapsed() < CLONE_RETRY {
            return Err(e.clone());
        }
    }
    if progress.clones.len() >= CLONES_AT_ONCE {
        return Ok(None); // waits for a running one to end
    }
    let fail = |progress: &mut Progress, e: String| {
        let now = std::time::Instant::now();
        progress.clone_failed.insert(id, (now, e.clone()));
        e
    };
    let src = clone_source(d, volumes, id, source).map_err(|e| fail(progress, e))?;
    let quota = d
        .vfolders
        .get(&id)
        .and_then(|e| e.spec.as_ref().ok())
        .and_then(|v| v.quota_bytes);
    let live = live_path(&served.target, &id);
    let (target, owner) = (served.target.clone(), served.owner);
    let gate: Option<clone::Gate> = progress.elections.clone().and_then(|e| {
        let volume = target.file_name()?.to_str()?.to_string();
        Some(Box::new(move || e.may_act(&volume)) as clone::Gate)
    });
    let p = Arc::new(clone::Progress {
        gate,
        ..Default::default()
    });
    let job_progress = p.clone();
    let thread = std::thread::Builder::new()
        .name("vfolderd-clone".into())
        .spawn(move || {
            clone::clone_tree(&src, &target, &live, &id, owner, quota, &job_progress)
                .map_err(|e| crate::error::error_chain(&e))
        })
        .map_err(|e| format!("cannot start the clone: {e}"))?;
    tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), %source, "clone started");
    let job = CloneJob {
        progress: p,
        thread,
        source,
        target: served.target.clone(),
    };
    progress.clones.insert(id, job);
    Ok(None)
}

/// Clones running at once (each holds up to two descriptors per level of
/// its source tree).
const CLONES_AT_ONCE: usize = 2;

/// Joins the finished clone of `id`: its outcome (a failure waits
/// [`CLONE_RETRY`] before the next try).
fn reap(progress: &mut Progress, id: Uuid) -> Result<(), String> {
    let Some(job) = progress.clones.remove(&id) else {
        return Ok(());
    };
    let outcome = job
        .thread
        .join()
        .unwrap_or_else(|_| Err("the clone panicked (a bug)".into()));
    match outcome {
        Ok(()) => {
            let reflinked = job.progress.reflinked.load(Ordering::Relaxed);
            tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), source = %job.source, reflinked, "cloned");
            progress.clone_failed.remove(&id);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), source = %job.source, error = %e, "clone failed");
            progress
                .clone_failed
                .insert(id, (std::time::Instant::now(), e.clone()));
            Err(e)
        }
    }
}

/// Joins every clone that ended without a round asking after it (its
/// record went, or its directory is in place), and forgets failures of
/// records that are gone.
fn reap_finished(progress: &mut Progress, d: &Desired) {
    let done: Vec<Uuid> = progress
        .clones
        .iter()
        .filter(|(_, j)| j.thread.is_finished())
        .map(|(id, _)| *id)
        .collect();
    for id in done {
        let _ = reap(progress, id);
    }
    progress.clone_failed.retain(|id, _| d.flagged.contains(id));
}

/// Whether a running clone reads from `id` (its source is not purged
/// under it).
fn cloning_from(progress: &Progress, id: &Uuid) -> bool {
    progress
        .clones
        .values()
        .any(|j| &j.source == id && !j.thread.is_finished())
}

/// The directory a clone copies from, or why there is none to copy now.
fn clone_source(
    d: &Desired,
    volumes: &BTreeMap<String, Served>,
    id: Uuid,
    source: Uuid,
) -> Result<PathBuf, String> {
    if source == id {
        return Err("clone_of names the vfolder itself".into());
    }
    let Some(Ok(src)) = d.vfolders.get(&source).map(|e| &e.spec) else {
        return Err(format!("clone_of {source}: no valid record"));
    };
    if src.trash {
        return Err(format!("clone_of {source}: it is in the trash"));
    }
    let Some(from) = volumes.get(&src.volume) else {
        return Err(format!(
            "clone_of {source}: its volume {} is not mounted on this storage node",
            src.volume
        ));
    };
    let path = live_path(&from.target, &source);
    if !crate::reconcile::fsops::is_dir_nofollow(&path) {
        return Err(format!(
            "clone_of {source}: its directory does not exist yet"
        ));
    }
    Ok(path)
}

/// Runs forever: one round whenever the pass publishes other volumes, the
/// desired state changes, a purge has more to do, or a retention is due;
/// `on_change` after a round that changed a status.
pub async fn run_lifecycle(
    board: Arc<LifecycleBoard>,
    cache: Arc<DesiredCache>,
    retention: Duration,
    on_change: impl Fn(),
) {
    let mut progress = Progress::default();
    let mut told = std::time::Instant::now();
    let mut stuck = Stuck::default();
    loop {
        stuck.release_answered();
        let mut volumes = board.volumes();
        // A stuck volume counts as looked at only if it was before it stuck.
        let was = board.covered();
        let names: BTreeSet<String> = volumes
            .keys()
            .filter(|n| !stuck.0.contains_key(*n) || was.contains(*n))
            .cloned()
            .collect();
        volumes.retain(|name, _| !stuck.0.contains_key(name));
        progress.elections = board.elections();
        for job in progress.clones.values() {
            if !progress.may_act(&job.target) {
                job.progress.stop.store(true, Ordering::Relaxed);
            }
        }
        let (c, before) = (cache.clone(), board.statuses());
        let at: Arc<Mutex<Option<InVolume>>> = Arc::default();
        let in_volume = at.clone();
        let abandoned = progress.abandoned.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let r = round(&c, &volumes, retention, &before, &mut progress, &in_volume);
            (r, progress)
        });
        let round = loop {
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), &mut task).await {
                break Some(r);
            }
            // Blocked in the kernel (a hard NFS mount whose server is gone,
            // a frozen FUSE daemon): that volume waits until the thread
            // comes back; the others carry on without it.
            let now_in = at.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some((name, target, _)) = now_in.filter(|a| a.2.elapsed() >= ROUND_LIMIT) {
                tracing::warn!(volume = %name, key = %crate::keys::volume_log_key(&name), limit = ?ROUND_LIMIT, "the lifecycle is stuck in this volume: it is left out until it answers");
                abandoned.store(true, Ordering::Relaxed);
                stuck.0.insert(name, (target, task));
                break None;
            }
        };
        let Some(round) = round else {
            // What the abandoned round carried is lost with it: clones it
            // watched run on unwatched (their staging is locked), the next
            // sweep and retention clock start afresh (later, never sooner).
            progress = Progress::default();
            continue;
        };
        let Ok(((mut statuses, more, due), p)) = round else {
            tracing::error!("a lifecycle round panicked (a bug); trying again shortly");
            progress = Progress::default();
            tokio::time::sleep(IDLE_ROUND).await;
            continue;
        };
        progress = p;
        // A stuck volume's statuses stay as they were.
        let before = board.statuses();
        for (target, _) in stuck.0.values() {
            let kept = before.iter().filter(|(_, s)| s.path.starts_with(target));
            statuses.extend(kept.map(|(k, v)| (*k, v.clone())));
        }
        // A pass writes the statuses: at once for a new state, at most every
        // PROGRESS_EVERY for progress alone (files_left of a long purge).
        let before = board.statuses();
        let moved = !same_but_progress(&before, &statuses);
        let newly_covered = *board.covered() != names;
        board.cover(names);
        let changed = board.store(statuses);
        if newly_covered || (changed && (moved || told.elapsed() >= PROGRESS_EVERY)) {
            told = std::time::Instant::now();
            on_change();
        }
        if more {
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = due.map_or(IDLE_ROUND, |s| s.min(IDLE_ROUND));
        tokio::select! {
            _ = board.wake.notified() => {}
            _ = cache.lifecycle.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// How long a round may take before the volume it is in counts as stuck.
/// Generous: a sweep walks every vfolder directory of a volume.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// The volume a round is in, its mount point, and since when.
type InVolume = (String, PathBuf, std::time::Instant);

/// Volumes a round got stuck in, with the stuck round's thread.
#[derive(Default)]
struct Stuck(BTreeMap<String, (PathBuf, tokio::task::JoinHandle<RoundResult>)>);

type RoundResult = (
    (BTreeMap<Uuid, LifeStatus>, bool, Option<Duration>),
    Progress,
);

impl Stuck {
    /// Takes back the volumes whose stuck round came back.
    fn release_answered(&mut self) {
        self.0.retain(|name, (_, task)| {
            let still = !task.is_finished();
            if !still {
                tracing::info!(volume = %name, key = %crate::keys::volume_log_key(name), "the volume answers again: back in the lifecycle");
            }
            still
        });
    }
}

/// The desired state as it is now, if the worker may act on it: listed
/// live, etcd answering, the safety brake not holding. `live` is read
/// before the state (a first list landing in between must not pair the
/// store's state with "live"), the brake after it (it is set before a
/// relist replaces the state, so a wiped state never pairs with "not held").
fn fresh(cache: &DesiredCache) -> Option<Arc<Desired>> {
    let live = cache.live.load(Ordering::Acquire);
    let d = cache.peek();
    let ok = live && cache.connected.load(Ordering::Relaxed) && cache.brake().held.is_none();
    ok.then_some(d)
}

/// How often each volume is swept again for directories without a record
/// (records deleted while malformed leave no tombstone).
const SWEEP_PERIOD: Duration = Duration::from_secs(3600);

/// One round over every volume: the statuses, whether a purge has more to
/// do, and how long until the next retention ends. `before` are the last
/// statuses: a volume whose trash cannot be read keeps its own.
fn round(
    cache: &DesiredCache,
    volumes: &BTreeMap<String, Served>,
    retention: Duration,
    before: &BTreeMap<Uuid, LifeStatus>,
    progress: &mut Progress,
    at: &Mutex<Option<InVolume>>,
) -> (BTreeMap<Uuid, LifeStatus>, bool, Option<Duration>) {
    let mut all = BTreeMap::new();
    let (mut more, mut due) = (false, None::<u64>);
    let now = unix(SystemTime::now());
    let acting = fresh(cache).is_some();
    match (acting, progress.acting_since) {
        (true, None) => progress.acting_since = Some(now),
        (false, Some(_)) => progress.acting_since = None,
        _ => {}
    }
    let clock = Clock {
        now,
        retention,
        acting_since: progress.acting_since.unwrap_or(now),
    };
    for (name, served) in volumes {
        if progress.abandoned.load(Ordering::Relaxed) {
            break;
        }
        let entered = (
            name.clone(),
            served.target.clone(),
            std::time::Instant::now(),
        );
        *at.lock().unwrap_or_else(|p| p.into_inner()) = Some(entered);
        // Another storage node's volume is looked at, not acted on: its
        // statuses are ready the moment this node takes it over.
        let acting = acting && progress.may_act(&served.target);
        let d = cache.peek();
        if acting {
            sweep_if_due(&d, name, &served.target, progress);
        }
        let orphans = progress
            .swept
            .get(name)
            .map(|s| s.1.clone())
            .unwrap_or_default();
        let look = match look(&d, name, &served.target, orphans) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(volume = %name, key = %crate::keys::volume_log_key(name), error = %crate::error::error_chain(&e), "cannot read the volume's trash");
                all.extend(
                    before
                        .iter()
                        .filter(|(_, s)| s.path.starts_with(&served.target))
                        .map(|(k, v)| (*k, v.clone())),
                );
                continue;
            }
        };
        let (steps, mut statuses) = decide(&d, &look, &clock);
        forget_tombstones(cache, &d, &look);
        // Acting re-reads the state per step: a round can take long.
        drop(d);
        for s in statuses.values() {
            if let Some(at) = s.purge_at.filter(|at| *at > now) {
                due = Some(due.map_or(at - now, |d| d.min(at - now)));
            }
        }
        if acting {
            let (m, clones) = act_all(cache, volumes, served, steps, &mut statuses, progress);
            more |= m;
            if clones {
                due = Some(due.map_or(1, |d| d.min(1)));
            }
        }
        for (id, s) in statuses.iter_mut() {
            if s.state == LifeState::Purging {
                s.files_left = progress.files_left.get(id).copied();
            }
        }
        all.append(&mut statuses);
    }
    progress
        .files_left
        .retain(|id, _| all.get(id).is_some_and(|s| s.state == LifeState::Purging));
    reap_finished(progress, &cache.peek());
    (all, more, due.map(Duration::from_secs))
}

/// Sweeps a volume at the first round that may act on it, and again every
/// [`SWEEP_PERIOD`].
fn sweep_if_due(d: &Desired, name: &str, target: &Path, progress: &mut Progress) {
    let due = progress
        .swept
        .get(name)
        .is_none_or(|(at, _)| at.elapsed() >= SWEEP_PERIOD);
    if !due {
        return;
    }
    purge_leftover_staging(d, target, progress);
    let found = sweep(d, target);
    if !found.is_empty() {
        tracing::warn!(volume = %name, key = %crate::keys::volume_log_key(name), orphans = found.len(), "vfolder directories without a record (deleted while no storage node watched, or while malformed): to the trash, purged after the retention");
    }
    progress
        .swept
        .insert(name.to_string(), (std::time::Instant::now(), found));
}

/// Clone staging directories no clone will finish: the record went, or the
/// vfolder has its directory (its `clone_of` was dropped and it was made
/// empty). They go to the purge; a clone running here keeps its own.
fn purge_leftover_staging(d: &Desired, target: &Path, progress: &Progress) {
    for id in clone::staged(target) {
        let done = crate::reconcile::fsops::is_dir_nofollow(&live_path(target, &id));
        if progress.clones.contains_key(&id) || (d.vfolders.contains_key(&id) && !done) {
            continue;
        }
        match trashfs::purge_staged(target, clone::STAGING, &id) {
            Ok(()) => {
                tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), "a clone's leftover staging directory goes to the purge")
            }
            Err(e) => {
                tracing::warn!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), error = %crate::error::error_chain(&e), "cannot purge a clone's leftover staging directory")
            }
        }
    }
}

/// Tombstones of this volume whose directory is no longer live: the trash
/// (and its info) remembers them now, or there is nothing left to do.
fn forget_tombstones(cache: &DesiredCache, d: &Desired, look: &VolumeLook) {
    let done: Vec<Uuid> = d
        .tombstones
        .iter()
        .filter(|(id, t)| t.volume == look.name && !look.live.contains(id))
        .filter(|(id, _)| {
            look.trash
                .get(id)
                .is_none_or(|e| e.info.is_some_and(|i| i.deleted_at.is_some()))
        })
        .map(|(id, _)| *id)
        .collect();
    if !done.is_empty() {
        cache.forget_tombstones(&done);
    }
}

/// Does a volume's steps; whether a round should follow at once, and
/// whether a clone is running.
fn act_all(
    cache: &DesiredCache,
    volumes: &BTreeMap<String, Served>,
    served: &Served,
    steps: Vec<Step>,
    statuses: &mut BTreeMap<Uuid, LifeStatus>,
    progress: &mut Progress,
) -> (bool, bool) {
    let (mut more, mut clones) = (false, false);
    for step in steps {
        let id = step_id(&step);
        if let Step::Clone { id, source } = step {
            let Some(d) = fresh(cache).filter(|_| progress.may_act(&served.target)) else {
                break;
            };
            let s = statuses.get_mut(&id).expect("a clone step has a status");
            match clone_step(&d, volumes, served, id, source, progress) {
                Ok(left) => s.files_left = left,
                Err(e) => s.error = Some(e),
            }
            // Polled while it runs; a failure waits for its retry.
            clones |= progress.clones.contains_key(&id);
            continue;
        }
        match act(cache, &served.target, &step, progress) {
            Ok(again) => more |= again,
            Err(e) => {
                let e = crate::error::error_chain(&e);
                tracing::warn!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), error = %e, "lifecycle step failed");
                if let Some(s) = statuses.get_mut(&id) {
                    if matches!(step, Step::Trash { .. }) {
                        // Still where it was: not in the trash.
                        s.state = LifeState::Pending;
                        s.path = live_path(&served.target, &id);
                        s.trashed_at = None;
                    }
                    s.error = Some(e);
                }
            }
        }
    }
    (more, clones)
}

/// Whether `step` still holds against the state as it is now (a round
/// decided it on a state that may be old by the time it acts).
fn still_holds(d: &Desired, step: &Step) -> bool {
    let id = step_id(step);
    let record = d.vfolders.get(&id).map(|e| e.spec.as_ref().ok());
    let unwanted = d.in_use.users(&id).is_empty();
    match step {
        // Its record asks for the trash, or is gone; and nobody wants it.
        Step::Trash { deleted_at, .. } => {
            let asked = match record {
                Some(Some(vf)) => vf.trash && deleted_at.is_none(),
                Some(None) => false,
                None => deleted_at.is_some(),
            };
            asked && unwanted
        }
        Step::StartPurge { .. } => record.is_none() && unwanted,
        Step::Restore { .. } => matches!(record, Some(Some(vf)) if !vf.trash),
        Step::Note { .. } | Step::Purge { .. } | Step::Clone { .. } => true,
    }
}

fn step_id(s: &Step) -> Uuid {
    match s {
        Step::Trash { id, .. }
        | Step::Restore { id }
        | Step::Note { id, .. }
        | Step::StartPurge { id }
        | Step::Purge { id }
        | Step::Clone { id, .. } => *id,
    }
}

/// Reads a volume's trash and the live directories a move may concern.
fn look(
    d: &Desired,
    name: &str,
    target: &Path,
    mut orphans: BTreeMap<Uuid, u64>,
) -> Result<VolumeLook, trashfs::TrashError> {
    let trash = trashfs::list(target)?;
    let live: BTreeSet<Uuid> = candidates(d, name, &trash, &orphans)
        .into_iter()
        .filter(|id| crate::reconcile::fsops::is_dir_nofollow(&live_path(target, id)))
        .collect();
    orphans.retain(|id, _| live.contains(id) && !d.vfolders.contains_key(id));
    Ok(VolumeLook {
        name: name.to_string(),
        target: target.to_path_buf(),
        trash,
        live,
        orphans,
    })
}

/// Every vfolder directory on the volume (`<xx>/<yy>/<hex>`) that has no
/// record: its record was deleted while no storage node watched (or before
/// the store kept it). Once per volume per start, off the loop; a directory
/// found here goes to the trash and waits out the whole retention.
fn sweep(d: &Desired, target: &Path) -> BTreeMap<Uuid, u64> {
    let now = unix(SystemTime::now());
    let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let hex2 = |n: &str| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = BTreeMap::new();
    for (a, pa) in dirs(target).into_iter().filter(|(n, _)| hex2(n)) {
        for (b, pb) in dirs(&pa).into_iter().filter(|(n, _)| hex2(n)) {
            for (name, _) in dirs(&pb) {
                let Ok(id) = Uuid::try_parse(&name) else {
                    continue;
                };
                if name.len() == 32
                    && name.starts_with(&format!("{a}{b}"))
                    && !d.vfolders.contains_key(&id)
                {
                    out.insert(id, now);
                }
            }
        }
    }
    out
}

/// Does one step; true if a round should follow at once (something moved,
/// or a purge has more to do).
fn act(
    cache: &DesiredCache,
    target: &Path,
    step: &Step,
    progress: &mut Progress,
) -> Result<bool, trashfs::TrashError> {
    let now = unix(SystemTime::now());
    // A clone reading from it keeps it from being purged.
    let read_by_clone =
        matches!(step, Step::StartPurge { id } | Step::Purge { id } if cloning_from(progress, id));
    let holds = !read_by_clone
        && progress.may_act(target)
        && fresh(cache).is_some_and(|d| still_holds(&d, step));
    if !holds {
        tracing::debug!(?step, "lifecycle step no longer holds; looking again");
        return Ok(true);
    }
    match step {
        Step::Trash { id, deleted_at } => {
            let info = Info {
                trashed_at: now,
                deleted_at: *deleted_at,
            };
            trashfs::move_to_trash(target, &live_path(target, id), id, info)?;
            tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(id), "moved to the trash");
        }
        Step::Restore { id } => {
            trashfs::restore(target, &live_path(target, id), id)?;
            tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(id), "restored from the trash");
            cache.touch();
        }
        Step::Note { id, info } => trashfs::write_info(target, id, *info)?,
        Step::StartPurge { id } => {
            trashfs::start_purge(target, id)?;
            tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(id), "purge started");
        }
        Step::Purge { id } => return purge(cache, target, id, progress),
        Step::Clone { .. } => unreachable!("clones run on threads of their own"),
    }
    // Moved: the next round looks again at once (a purge may be due).
    Ok(true)
}

/// Purges in batches for up to [`PURGE_SLICE`], asking before each batch
/// whether a kernel wants the vfolder now (one put while it runs stops it).
fn purge(
    cache: &DesiredCache,
    target: &Path,
    id: &Uuid,
    progress: &mut Progress,
) -> Result<bool, trashfs::TrashError> {
    if !progress.files_left.contains_key(id) {
        let files = crate::usage::scan(&trashfs::purging_path(target, id)).map_or(0, |(f, _)| f);
        progress.files_left.insert(*id, files);
    }
    let started = std::time::Instant::now();
    loop {
        let Some(d) = fresh(cache).filter(|_| progress.may_act(target)) else {
            return Ok(false);
        };
        let users = d.in_use.users(id);
        drop(d);
        if !users.is_empty() {
            tracing::warn!(vfolder = %id, key = %crate::keys::vfolder_log_key(id), kernels = ?users, "purge paused: a kernel wants this vfolder");
            return Ok(false);
        }
        let (files, done) = trashfs::purge_some(target, id, PURGE_BATCH)?;
        let left = progress.files_left.entry(*id).or_default();
        *left = left.saturating_sub(files);
        if done {
            progress.files_left.remove(id);
            tracing::info!(vfolder = %id, key = %crate::keys::vfolder_log_key(id), "purged");
            return Ok(true);
        }
        if started.elapsed() >= PURGE_SLICE {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Permission, VfolderSpec};
    use crate::state::desired::{Entry as Record, Tombstone};
    use crate::state::inuse::Wanted;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(now: u64) -> Clock {
        Clock {
            now,
            retention: HOUR,
            acting_since: 0,
        }
    }

    fn id() -> Uuid {
        Uuid::from_bytes([7; 16])
    }

    fn with_record(trash: bool, volume: &str) -> Desired {
        let mut d = Desired::default();
        let spec = VfolderSpec {
            name: "mine".into(),
            owner: "alice".into(),
            volume: volume.into(),
            permission: Permission::Rw,
            quota_bytes: None,
            trash,
            clone_of: None,
        };
        let e = Record {
            revision: 1,
            created: 1,
            spec: Ok(spec),
        };
        if trash {
            d.flagged.insert(id());
        }
        d.vfolders.insert(id(), e);
        d
    }

    /// No record; a tombstone on volume `v` from unix second 42.
    fn deleted_at_42() -> Desired {
        let mut d = Desired::default();
        let deleted_at = UNIX_EPOCH + Duration::from_secs(42);
        let volume = "v".into();
        d.tombstones.insert(id(), Tombstone { volume, deleted_at });
        d
    }

    fn look(trash: Option<Entry>, live: bool) -> VolumeLook {
        VolumeLook {
            name: "v".into(),
            target: "/vol/v".into(),
            trash: trash
                .map(|e| BTreeMap::from([(id(), e)]))
                .unwrap_or_default(),
            live: if live {
                BTreeSet::from([id()])
            } else {
                BTreeSet::new()
            },
            orphans: BTreeMap::new(),
        }
    }

    fn trashed(deleted_at: Option<u64>) -> Entry {
        Entry {
            trashed: true,
            purging: false,
            info: Some(Info {
                trashed_at: 10,
                deleted_at,
            }),
        }
    }

    #[test]
    fn trash_true_moves_only_what_no_kernel_wants() {
        let mut d = with_record(true, "v");
        d.in_use.set(
            "n2/k9",
            Wanted {
                ids: vec![id()],
                exact: true,
            },
        );
        let (steps, st) = decide(&d, &look(None, true), &at(100));
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(st[&id()].state, LifeState::InUse);
        assert_eq!(st[&id()].kernels, vec!["n2/k9"]);
        d.in_use.remove("n2/k9");
        let (steps, st) = decide(&d, &look(None, true), &at(100));
        assert_eq!(
            steps,
            vec![Step::Trash {
                id: id(),
                deleted_at: None
            }]
        );
        assert_eq!(st[&id()].state, LifeState::Trashed);
    }

    #[test]
    fn a_deleted_record_is_purged_only_after_its_retention() {
        let d = Desired::default();
        let (steps, st) = decide(&d, &look(Some(trashed(Some(100))), false), &at(100 + 3599));
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(st[&id()].purge_at, Some(100 + 3600));
        let (steps, st) = decide(&d, &look(Some(trashed(Some(100))), false), &at(100 + 3600));
        assert_eq!(
            steps,
            vec![Step::StartPurge { id: id() }, Step::Purge { id: id() }]
        );
        assert_eq!(st[&id()].state, LifeState::Purging);
    }

    #[test]
    fn a_trashed_vfolder_found_without_its_record_starts_its_retention_now() {
        let (steps, _) = decide(
            &Desired::default(),
            &look(Some(trashed(None)), false),
            &at(500),
        );
        let note = Info {
            trashed_at: 10,
            deleted_at: Some(500),
        };
        assert_eq!(
            steps,
            vec![Step::Note {
                id: id(),
                info: note
            }]
        );
    }

    #[test]
    fn a_tombstone_trashes_with_its_deletion_time() {
        let d = deleted_at_42();
        let (steps, _) = decide(&d, &look(None, true), &at(100));
        assert_eq!(
            steps,
            vec![Step::Trash {
                id: id(),
                deleted_at: Some(42)
            }]
        );
    }

    #[test]
    fn an_orphan_found_by_the_sweep_is_trashed_with_the_time_it_was_found() {
        let mut v = look(None, true);
        v.orphans.insert(id(), 77);
        let (steps, _) = decide(&Desired::default(), &v, &at(100));
        assert_eq!(
            steps,
            vec![Step::Trash {
                id: id(),
                deleted_at: Some(77)
            }]
        );
        let (steps, _) = decide(&with_record(false, "v"), &v, &at(100));
        assert!(steps.is_empty(), "a record makes it no orphan: {steps:?}");
    }

    #[test]
    fn the_sweep_finds_vfolder_directories_without_a_record_and_nothing_else() {
        let vol = tempfile::tempdir().unwrap();
        let kept = with_record(false, "v");
        let orphan = Uuid::from_bytes([9; 16]);
        for d in [live_path(vol.path(), &id()), live_path(vol.path(), &orphan)] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(vol.path().join("zz/09").join(orphan.simple().to_string()))
            .unwrap();
        std::fs::create_dir_all(vol.path().join(".trash/x")).unwrap();
        let found = sweep(&kept, vol.path());
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![orphan]);
    }

    #[test]
    fn a_deletion_seen_before_the_worker_could_act_counts_from_when_it_could() {
        let d = deleted_at_42();
        let clock = Clock {
            acting_since: 1000,
            ..at(2000)
        };
        let (steps, st) = decide(&d, &look(None, true), &clock);
        let deleted_at = Some(1000);
        assert_eq!(
            steps,
            vec![Step::Trash {
                id: id(),
                deleted_at
            }]
        );
        assert_eq!(st[&id()].purge_at, Some(1000 + 3600));
    }

    #[test]
    fn a_record_in_the_trash_again_forgets_an_old_deletion_time() {
        let (steps, st) = decide(
            &with_record(true, "v"),
            &look(Some(trashed(Some(5))), false),
            &at(100),
        );
        let info = Info {
            trashed_at: 10,
            deleted_at: None,
        };
        assert_eq!(steps, vec![Step::Note { id: id(), info }]);
        assert_eq!(st[&id()].deleted_at, None);
    }

    #[test]
    fn a_malformed_record_is_not_a_deletion() {
        let mut d = Desired::default();
        let bad = Record {
            revision: 1,
            created: 1,
            spec: Err(crate::spec::Rejection::Invalid("bad".into())),
        };
        d.vfolders.insert(id(), bad);
        let (steps, _) = decide(&d, &look(Some(trashed(Some(1))), true), &at(1 << 40));
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn a_step_decided_on_an_old_state_is_checked_against_the_new_one() {
        let purge = Step::StartPurge { id: id() };
        assert!(still_holds(&Desired::default(), &purge));
        assert!(
            !still_holds(&with_record(false, "v"), &purge),
            "record made again"
        );
        let trash = Step::Trash {
            id: id(),
            deleted_at: None,
        };
        let mut d = with_record(true, "v");
        assert!(still_holds(&d, &trash));
        d.in_use.set(
            "n2/k9",
            Wanted {
                ids: vec![id()],
                exact: true,
            },
        );
        assert!(!still_holds(&d, &trash), "a kernel came");
        assert!(
            !still_holds(&with_record(false, "v"), &trash),
            "trash taken back"
        );
    }

    #[test]
    fn a_record_back_restores_and_one_elsewhere_is_never_purged() {
        let d = with_record(false, "v");
        let (steps, st) = decide(&d, &look(Some(trashed(Some(1))), false), &at(1 << 40));
        assert_eq!(steps, vec![Step::Restore { id: id() }]);
        assert!(st.is_empty());
        let d = with_record(false, "other");
        let (steps, _) = decide(&d, &look(Some(trashed(Some(1))), false), &at(1 << 40));
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn a_purge_under_way_finishes_beside_a_fresh_directory_and_waits_for_kernels() {
        let purging = Entry {
            trashed: false,
            purging: true,
            info: None,
        };
        let d = with_record(false, "v");
        let (steps, st) = decide(&d, &look(Some(purging.clone()), true), &at(1));
        assert_eq!(steps, vec![Step::Purge { id: id() }]);
        assert!(st.is_empty(), "the record's own status stands: {st:?}");
        let mut d = Desired::default();
        d.in_use.set(
            "n1/k1",
            Wanted {
                ids: vec![id()],
                exact: true,
            },
        );
        let (steps, st) = decide(&d, &look(Some(purging), false), &at(1));
        assert!(steps.is_empty());
        assert_eq!(st[&id()].state, LifeState::InUse);
    }
}
