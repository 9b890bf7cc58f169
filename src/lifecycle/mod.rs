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
}

/// The lifecycle part of a vfolder's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifeStatus {
    /// The state.
    pub state: LifeState,
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
    let mut out: BTreeSet<Uuid> = d
        .vfolders
        .iter()
        .filter(|(_, e)| {
            e.spec
                .as_ref()
                .is_ok_and(|v| v.volume == vol && (v.trash || v.clone_of.is_some()))
        })
        .map(|(id, _)| *id)
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

/// What to do on one volume, and the lifecycle statuses it leaves (pure).
pub fn decide(
    d: &Desired,
    v: &VolumeLook,
    now: u64,
    retention: Duration,
) -> (Vec<Step>, BTreeMap<Uuid, LifeStatus>) {
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
            let shown = record.is_none();
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
            if record.is_none() && !entry.trashed {
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
                if entry.trashed && entry.info.is_none() {
                    let info = Info {
                        trashed_at: now,
                        deleted_at: None,
                    };
                    steps.push(Step::Note { id, info });
                }
                out.insert(id, status(LifeState::Trashed, in_trash));
            }
            None if live => {
                let deleted_at = d
                    .tombstones
                    .get(&id)
                    .map(|t| unix(t.deleted_at))
                    .or_else(|| v.orphans.get(&id).copied())
                    .unwrap_or(now);
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
            // A record that moved to another volume is not a deletion.
            None if d.vfolders.contains_key(&id) => {}
            None if entry.trashed => {
                let known = entry.info.and_then(|i| i.deleted_at);
                let deleted_at = known
                    .or_else(|| d.tombstones.get(&id).map(|t| unix(t.deleted_at)))
                    .unwrap_or(now);
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

/// What a round carries to the next: files left per purge (counted once),
/// per volume swept since start the orphans still to trash, the clones
/// running on threads of their own, and the last failure of each clone.
#[derive(Default)]
struct Progress {
    files_left: HashMap<Uuid, u64>,
    swept: BTreeMap<String, BTreeMap<Uuid, u64>>,
    clones: HashMap<Uuid, CloneJob>,
    clone_failed: HashMap<Uuid, (std::time::Instant, String)>,
}

/// A clone under way.
struct CloneJob {
    progress: Arc<clone::Progress>,
    thread: std::thread::JoinHandle<Result<(), String>>,
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
        let job = progress.clones.remove(&id).expect("present");
        let outcome = job
            .thread
            .join()
            .unwrap_or_else(|_| Err("the clone panicked (a bug)".into()));
        return match outcome {
            Ok(()) => {
                let reflinked = job.progress.reflinked.load(Ordering::Relaxed);
                tracing::info!(vfolder = %id, %source, reflinked, "cloned");
                Ok(Some(0))
            }
            Err(e) => {
                progress
                    .clone_failed
                    .insert(id, (std::time::Instant::now(), e.clone()));
                Err(e)
            }
        };
    }
    if let Some((at, e)) = progress.clone_failed.get(&id) {
        if at.elapsed() < CLONE_RETRY {
            return Err(e.clone());
        }
    }
    let src = clone_source(d, volumes, id, source)?;
    let live = live_path(&served.target, &id);
    let (target, owner) = (served.target.clone(), served.owner);
    let p = Arc::new(clone::Progress::default());
    let job_progress = p.clone();
    let thread = std::thread::Builder::new()
        .name("vfolderd-clone".into())
        .spawn(move || {
            clone::clone_tree(&src, &target, &live, &id, owner, &job_progress)
                .map_err(|e| crate::error::error_chain(&e))
        })
        .map_err(|e| format!("cannot start the clone: {e}"))?;
    tracing::info!(vfolder = %id, %source, "clone started");
    progress.clones.insert(
        id,
        CloneJob {
            progress: p,
            thread,
        },
    );
    Ok(None)
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
    loop {
        let volumes = board.volumes();
        let c = cache.clone();
        let round = tokio::task::spawn_blocking(move || {
            let r = round(&c, &volumes, retention, &mut progress);
            (r, progress)
        })
        .await;
        let Ok(((statuses, more, due), p)) = round else {
            tracing::error!("a lifecycle round panicked (a bug); trying again shortly");
            progress = Progress::default();
            tokio::time::sleep(IDLE_ROUND).await;
            continue;
        };
        progress = p;
        if board.store(statuses) {
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

/// One round over every volume: the statuses, whether a purge has more to
/// do, and how long until the next retention ends.
fn round(
    cache: &DesiredCache,
    volumes: &BTreeMap<String, Served>,
    retention: Duration,
    progress: &mut Progress,
) -> (BTreeMap<Uuid, LifeStatus>, bool, Option<Duration>) {
    let mut all = BTreeMap::new();
    let (mut more, mut due) = (false, None::<u64>);
    let mut purging = BTreeSet::new();
    for (name, served) in volumes {
        let target = &served.target;
        let d = cache.peek();
        // Read after the state: the brake is set before a relist replaces
        // the state, so a wiped state is never paired with "not held".
        let may_act = cache.live.load(Ordering::Acquire) && cache.brake().held.is_none();
        if may_act && !progress.swept.contains_key(name) {
            let found = sweep(&d, target);
            if !found.is_empty() {
                tracing::warn!(volume = %name, orphans = found.len(), "vfolder directories without a record (deleted while no storage node watched): to the trash, purged after the retention");
            }
            progress.swept.insert(name.clone(), found);
        }
        let orphans = progress.swept.get(name).cloned().unwrap_or_default();
        let look = match look(&d, name, target, orphans) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(volume = %name, error = %crate::error::error_chain(&e), "cannot read the volume's trash");
                continue;
            }
        };
        let now = unix(SystemTime::now());
        let (steps, mut statuses) = decide(&d, &look, now, retention);
        for s in statuses.values() {
            if let Some(at) = s.purge_at.filter(|at| *at > now) {
                due = Some(due.map_or(at - now, |d| d.min(at - now)));
            }
        }
        if may_act {
            for step in steps {
                let id = step_id(&step);
                if let Step::Clone { id, source } = step {
                    let s = statuses.get_mut(&id).expect("a clone step has a status");
                    match clone_step(&d, volumes, served, id, source, progress) {
                        Ok(left) => s.files_left = left,
                        Err(e) => s.error = Some(e),
                    }
                    due = Some(due.map_or(1, |d| d.min(1)));
                    continue;
                }
                match act(cache, &look.target, &step, progress) {
                    Ok(unfinished) => more |= unfinished,
                    Err(e) => {
                        let e = crate::error::error_chain(&e);
                        tracing::warn!(volume = %name, vfolder = %id, error = %e, "lifecycle step failed");
                        if let Some(s) = statuses.get_mut(&id) {
                            s.error = Some(e);
                        }
                    }
                }
            }
        }
        for (id, s) in statuses.iter_mut() {
            if s.state == LifeState::Purging {
                purging.insert(*id);
                s.files_left = progress.files_left.get(id).copied();
            }
        }
        all.append(&mut statuses);
    }
    progress.files_left.retain(|id, _| purging.contains(id));
    (all, more, due.map(Duration::from_secs))
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
    match step {
        Step::Trash { id, deleted_at } => {
            let info = Info {
                trashed_at: now,
                deleted_at: *deleted_at,
            };
            trashfs::move_to_trash(target, &live_path(target, id), id, info)?;
            tracing::info!(vfolder = %id, "moved to the trash");
        }
        Step::Restore { id } => {
            trashfs::restore(target, &live_path(target, id), id)?;
            tracing::info!(vfolder = %id, "restored from the trash");
            cache.touch();
        }
        Step::Note { id, info } => trashfs::write_info(target, id, *info)?,
        Step::StartPurge { id } => {
            trashfs::start_purge(target, id)?;
            tracing::info!(vfolder = %id, "purge started");
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
        let users = cache.peek().in_use.users(id);
        if cache.brake().held.is_some() {
            return Ok(false);
        }
        if !users.is_empty() {
            tracing::warn!(vfolder = %id, kernels = ?users, "purge paused: a kernel wants this vfolder");
            return Ok(false);
        }
        let (files, done) = trashfs::purge_some(target, id, PURGE_BATCH)?;
        let left = progress.files_left.entry(*id).or_default();
        *left = left.saturating_sub(files);
        if done {
            progress.files_left.remove(id);
            tracing::info!(vfolder = %id, "purged");
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
        d.vfolders.insert(id(), e);
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
        let (steps, st) = decide(&d, &look(None, true), 100, HOUR);
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(st[&id()].state, LifeState::InUse);
        assert_eq!(st[&id()].kernels, vec!["n2/k9"]);
        d.in_use.remove("n2/k9");
        let (steps, st) = decide(&d, &look(None, true), 100, HOUR);
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
        let (steps, st) = decide(&d, &look(Some(trashed(Some(100))), false), 100 + 3599, HOUR);
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(st[&id()].purge_at, Some(100 + 3600));
        let (steps, st) = decide(&d, &look(Some(trashed(Some(100))), false), 100 + 3600, HOUR);
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
            500,
            HOUR,
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
        let mut d = Desired::default();
        let at = UNIX_EPOCH + Duration::from_secs(42);
        d.tombstones.insert(
            id(),
            Tombstone {
                volume: "v".into(),
                deleted_at: at,
            },
        );
        let (steps, _) = decide(&d, &look(None, true), 100, HOUR);
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
        let (steps, _) = decide(&Desired::default(), &v, 100, HOUR);
        assert_eq!(
            steps,
            vec![Step::Trash {
                id: id(),
                deleted_at: Some(77)
            }]
        );
        let (steps, _) = decide(&with_record(false, "v"), &v, 100, HOUR);
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
    fn a_record_back_restores_and_one_elsewhere_is_never_purged() {
        let d = with_record(false, "v");
        let (steps, st) = decide(&d, &look(Some(trashed(Some(1))), false), 1 << 40, HOUR);
        assert_eq!(steps, vec![Step::Restore { id: id() }]);
        assert!(st.is_empty());
        let d = with_record(false, "other");
        let (steps, _) = decide(&d, &look(Some(trashed(Some(1))), false), 1 << 40, HOUR);
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
        let (steps, st) = decide(&d, &look(Some(purging.clone()), true), 1, HOUR);
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
        let (steps, st) = decide(&d, &look(Some(purging), false), 1, HOUR);
        assert!(steps.is_empty());
        assert_eq!(st[&id()].state, LifeState::InUse);
    }
}
