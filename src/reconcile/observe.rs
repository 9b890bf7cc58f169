//! Observing the node: the mount table (re-read only when the kernel says it
//! changed, and then only its new lines), attribution of changed mount points
//! to kernels, and the observed state a pass plans against (ownership records,
//! existing directories, what is due for renewal).

use std::cell::Cell;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::reconcile::actual::{MountInfoError, MountInfoSource, MountTable};
use crate::reconcile::bookkeeping::renewal_due;
use crate::reconcile::execute::observe_dirs;
use crate::reconcile::plan::{Actual, NodeView, Want};
use crate::reconcile::probe::StaleMap;
use crate::state::ledger::{Ledger, LedgerError, OwnedMount, OwnedMounts};
use crate::state::watch::Changes;

/// Why the node could not be observed (transient: the pass is retried).
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The mount table could not be read.
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
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
    changed: Cell<bool>,
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

/// The mount points that changed since the last read (`None`: unknown, the
/// table was read from scratch).
pub type MountChanges = Option<HashSet<PathBuf>>;

/// What a changed mount point means for the next pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOf {
    /// One kernel's bind.
    Kernel(String),
    /// A volume or something else under the roots: a whole pass.
    Everything,
    /// Not ours (another program's mount elsewhere).
    Nothing,
}

/// Which kernel a changed mount point belongs to: a wanted bind, an owned
/// bind, or else anything inside the roots means everything.
pub fn kernel_of_target(node: &NodeView, want: &Want, owned: &OwnedMounts, t: &Path) -> TargetOf {
    if let Some(b) = want.binds.get(t) {
        return TargetOf::Kernel(b.kernel.clone());
    }
    if let Some(k) = owned.get(t).and_then(|m| m.kernel.clone()) {
        return TargetOf::Kernel(k);
    }
    if t.starts_with(&node.volumes_root) || t.starts_with(&node.kernels_root) {
        return TargetOf::Everything;
    }
    TargetOf::Nothing
}

/// Sorts changed mount points into kernels to look at, or everything.
pub fn attribute(
    node: &NodeView,
    want: &Want,
    owned: &OwnedMounts,
    changed: impl IntoIterator<Item = PathBuf>,
) -> Changes {
    let mut out = Changes::default();
    for t in changed {
        match kernel_of_target(node, want, owned, &t) {
            TargetOf::Kernel(k) => {
                out.kernels.insert(k);
            }
            TargetOf::Everything => out.all = true,
            TargetOf::Nothing => {}
        }
    }
    out
}

/// A mount: its mount point and the id of the mount there (none: not mounted).
type MountKey = (PathBuf, Option<u64>);

/// Reads the node's actual state for a pass.
pub struct Observer {
    mountinfo: Arc<dyn MountInfoSource>,
    /// The file mount-table changes are signalled on (only `/proc` signals).
    mountinfo_path: PathBuf,
    /// The mount table as last read, with its sentinel.
    cache: Option<MountCache>,
    /// Stale volume mounts, as the prober last saw them.
    stale: StaleMap,
    /// Volume capacities, as the prober last saw them.
    capacity: crate::reconcile::probe::CapacityMap,
    /// Node-local secrets (a rotated file makes its mounts due for renewal).
    credentials_dir: PathBuf,
    /// Lifetime of blob mount SASes (renewed in their last third).
    sas_lifetime: Duration,
    /// Lifetime of per-user token files (renewed in their last third).
    token_lifetime: Duration,
    /// How long a look below a volume's mount point may take.
    stat_timeout: Duration,
    /// Volume mounts (target, mount id) with a look still stuck in the
    /// kernel (a hung volume).
    stuck: Arc<std::sync::Mutex<HashSet<MountKey>>>,
    /// The mount-table watch, closed while a pass mounts.
    watch: Option<crate::reconcile::mountwatch::WatchGate>,
}

/// The mount-table watch closed while a pass acts; opened again on drop.
#[must_use = "the watch opens again when this is dropped"]
pub struct WatchPaused(Option<crate::reconcile::mountwatch::WatchGate>);

impl Drop for WatchPaused {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.resume();
        }
    }
}

/// Where the [`Observer`] looks.
pub struct ObserverConfig {
    /// The mount table.
    pub mountinfo: Arc<dyn MountInfoSource>,
    /// The file polled for mount-table changes.
    pub mountinfo_path: PathBuf,
    /// The prober's findings.
    pub stale: StaleMap,
    /// The prober's capacity readings.
    pub capacity: crate::reconcile::probe::CapacityMap,
    /// Node-local secrets.
    pub credentials_dir: PathBuf,
    /// Lifetime of blob mount SASes.
    pub sas_lifetime: Duration,
    /// Lifetime of per-user token files.
    pub token_lifetime: Duration,
    /// How long a look below a volume's mount point may take (the prober's timeout).
    pub stat_timeout: Duration,
}

impl Observer {
    /// An observer that has read nothing yet.
    pub fn new(c: ObserverConfig) -> Self {
        Self {
            mountinfo: c.mountinfo,
            mountinfo_path: c.mountinfo_path,
            cache: None,
            stale: c.stale,
            capacity: c.capacity,
            credentials_dir: c.credentials_dir,
            sas_lifetime: c.sas_lifetime,
            token_lifetime: c.token_lifetime,
            stat_timeout: c.stat_timeout,
            stuck: Arc::default(),
            watch: None,
        }
    }

    /// Closes `gate`'s watch while a pass acts ([`Observer::acting`]).
    pub fn with_watch_gate(mut self, gate: crate::reconcile::mountwatch::WatchGate) -> Self {
        self.watch = Some(gate);
        self
    }

    /// A pass is about to act: its own mounts need not wake anyone. The
    /// watch opens again when the guard is dropped (also if the pass
    /// panics): drop it before reading the table back.
    pub fn acting(&self) -> WatchPaused {
        if let Some(w) = &self.watch {
            w.pause();
        }
        WatchPaused(self.watch.clone())
    }

    /// The lifetimes credentials are renewed against (SAS, token files).
    pub fn lifetimes(&self) -> (Duration, Duration) {
        (self.sas_lifetime, self.token_lifetime)
    }

    /// The prober's findings (a fresh mount is no longer stale).
    pub fn stale(&self) -> &StaleMap {
        &self.stale
    }

    /// The mount table: re-read only when it changed, and then only its
    /// changed lines or new mounts. After a pass acted, `touched` names the
    /// mount points it changed: they are read again whatever signals (a
    /// propagation change raises no event; a remount keeps every id).
    pub fn mount_table(
        &mut self,
        touched: Option<&HashSet<PathBuf>>,
    ) -> Result<(Arc<MountTable>, MountChanges), ObserveError> {
        let fresh = touched.is_some_and(|t| !t.is_empty());
        let signalled = self.cache.as_ref().is_none_or(MountCache::stale);
        if let Some(c) = self
            .cache
            .as_ref()
            .filter(|_| !fresh && !signalled && !self.mountinfo.behind())
        {
            return Ok((c.table.clone(), Some(HashSet::new())));
        }
        // Opened before the read: a change racing the read marks it stale.
        // Only /proc signals changes; any other file (a test double) is read every time.
        let sentinel = std::fs::File::open(&self.mountinfo_path)
            .ok()
            .filter(|_| self.mountinfo_path.starts_with("/proc"));
        let (table, changed) = match self.cache.take() {
            // Parse only the lines that changed (copying the table only if a
            // pass still holds it).
            Some(c) => {
                let mut table = c.table;
                let t = Arc::make_mut(&mut table);
                let mut changed = self.mountinfo.refresh(t, signalled)?;
                // Mount points the refresh read anew need no second look.
                let again: HashSet<PathBuf> = touched
                    .into_iter()
                    .flatten()
                    .filter(|p| !changed.as_ref().is_some_and(|c| c.contains(*p)))
                    .cloned()
                    .collect();
                let restated = self.mountinfo.restat(t, &again)?;
                if let Some(c) = changed.as_mut() {
                    c.extend(restated);
                }
                (table, changed)
            }
            None => (Arc::new(self.mountinfo.read()?), None),
        };
        self.cache = sentinel.map(|sentinel| MountCache {
            sentinel,
            table: table.clone(),
            changed: Cell::new(false),
        });
        Ok((table, changed))
    }

    /// The whole mount table read now, leaving what the next pass reads as
    /// changed untouched (for a plan asked between passes).
    pub fn fresh_table(&self) -> Result<Arc<MountTable>, ObserveError> {
        Ok(Arc::new(self.mountinfo.read()?))
    }

    /// The resync: a remount the table could not tell from the mounts made
    /// with it is looked for (at most once a second).
    pub fn suspect_attrs(&self) {
        self.mountinfo.suspect();
    }

    /// When a pass should read the table again though nothing signals: the
    /// source left a change unread (a remount, read at most once a second).
    pub fn reread_at(&self) -> Option<tokio::time::Instant> {
        self.mountinfo
            .behind()
            .then(|| tokio::time::Instant::now() + Duration::from_secs(1))
    }

    /// Whether the mount table read last is still the kernel's: then a
    /// mount-table wake-up (vfolderd's own mounts) needs no pass.
    pub fn mount_table_current(&self) -> bool {
        // A table left behind is looked at when `reread_at` comes.
        self.cache.as_ref().is_some_and(|c| !c.stale())
    }

    /// The observed state for `want`: the ledger's records (only those of
    /// `scope`'s kernels and of volumes, for a pass over a few kernels), which
    /// wanted directories exist, and which credentials are due for renewal.
    pub fn observe(
        &self,
        ledger: &Ledger,
        want: &Want,
        mounts: Arc<MountTable>,
        scope: Option<&BTreeSet<String>>,
    ) -> Result<Actual, ObserveError> {
        let stale = crate::reconcile::probe::current(
            &self.stale.lock().unwrap_or_else(|p| p.into_inner()),
            &mounts,
        );
        let capacity = crate::reconcile::probe::current(
            &self.capacity.lock().unwrap_or_else(|p| p.into_inner()),
            &mounts,
        );
        let whole = Actual {
            capacity,
            mounts,
            owned_mounts: ledger.mounts()?,
            owned_dirs: ledger.dirs()?,
            stale,
            owned_tokens: ledger.tokens()?,
            ..Actual::default()
        };
        let mut actual = match scope {
            Some(kernels) => crate::reconcile::scope::actual_of_kernels(&whole, kernels),
            None => whole,
        };
        actual.dirs = observe_dirs(&want.paths_to_observe(), &actual.mounts);
        let (dirs, hung) = self.observe_volume_dirs(want, &actual);
        actual.dirs.extend(dirs);
        actual.hung_volumes = hung;
        let now = crate::reconcile::pass::unix_now();
        actual.token_renew = actual
            .owned_tokens
            .values()
            .filter(|t| renewal_due(t.expires_at, self.token_lifetime, now) || !t.path.is_file())
            .map(|t| t.path.clone())
            .collect();
        actual.renew = actual
            .owned_mounts
            .values()
            .filter(|m| {
                m.expires_at
                    .is_some_and(|e| renewal_due(e, self.sas_lifetime, now))
                    || self.credentials_rotated(want, m)
            })
            .map(|m| m.target.clone())
            .collect();
        Ok(actual)
    }

    /// Which vfolder directories exist, volume by volume, each volume's
    /// looks on a thread of their own with a timeout: a hard NFS mount or a
    /// frozen FUSE daemon must not put the pass (and every kernel) to sleep.
    /// A volume that does not answer, or that the prober found stale, is
    /// hung: its directories count as present (nothing is made in it) and
    /// nothing below it is touched this pass.
    fn observe_volume_dirs(
        &self,
        want: &Want,
        actual: &Actual,
    ) -> (HashSet<PathBuf>, std::collections::BTreeSet<String>) {
        let mut by_volume: std::collections::BTreeMap<&String, Vec<PathBuf>> = Default::default();
        for (vol, path) in want.vfolder_dirs.values() {
            by_volume.entry(vol).or_default().push(path.clone());
        }
        let (mut dirs, mut hung) = (HashSet::new(), std::collections::BTreeSet::new());
        // Every wanted volume (agents bind from startup volumes and vfolders
        // without looking at directories): stale, or a look still stuck in
        // the mount that is there now, means hung.
        for (vol, v) in &want.volumes {
            if actual.stale.contains_key(&v.target) || self.is_stuck(&v.target, actual) {
                hung.insert(vol.clone());
            }
        }
        for (vol, paths) in by_volume {
            let Some(target) = want.volumes.get(vol).map(|v| v.target.clone()) else {
                continue;
            };
            if hung.contains(vol) {
                dirs.extend(paths);
                continue;
            }
            let mount = actual.mounts.top(&target).map(|m| m.id);
            match self.look_below((target, mount), paths.clone()) {
                Some(found) => dirs.extend(found),
                None => {
                    tracing::warn!(volume = %vol, key = %crate::keys::volume_log_key(vol), timeout = ?self.stat_timeout, "volume does not answer; nothing below it is touched until it does");
                    hung.insert(vol.clone());
                    dirs.extend(paths);
                }
            }
        }
        (dirs, hung)
    }

    /// Whether a look below the mount now at `target` is still stuck (a
    /// look stuck in a mount that has since been replaced does not count).
    fn is_stuck(&self, target: &Path, actual: &Actual) -> bool {
        let key = (
            target.to_path_buf(),
            actual.mounts.top(target).map(|m| m.id),
        );
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
    }

    /// The `paths` below `target` that are directories, or `None` if the
    /// look did not finish within the timeout (the thread stays marked as
    /// stuck until the kernel lets it go).
    fn look_below(&self, key: MountKey, paths: Vec<PathBuf>) -> Option<Vec<PathBuf>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stuck = self.stuck.clone();
        stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        std::thread::spawn(move || {
            // A vfolder directory that is missing may be in the trash
            // (then it is moved back, not made anew).
            let found: Vec<PathBuf> = paths
                .into_iter()
                .filter_map(|p| {
                    if crate::reconcile::fsops::is_dir_nofollow(&p) {
                        return Some(p);
                    }
                    crate::lifecycle::trash_of(&p)
                        .filter(|t| crate::reconcile::fsops::is_dir_nofollow(t))
                })
                .collect();
            stuck.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            let _ = tx.send(found);
        });
        rx.recv_timeout(self.stat_timeout).ok()
    }

    /// Whether the credentials file `m` was mounted with has changed since.
    fn credentials_rotated(&self, want: &Want, m: &OwnedMount) -> bool {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::actual::ProcMountInfo;

    #[test]
    fn a_cached_mount_table_turns_stale_on_a_mount_and_stays_stale() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounts a tmpfs: run as root in a private mount namespace (scripts/test.sh)"
        );
        let dir = tempfile::tempdir().unwrap();
        // Other tests mount meanwhile: start from a moment with no change.
        let cache = (0..100)
            .map(|_| MountCache {
                sentinel: std::fs::File::open("/proc/self/mountinfo").unwrap(),
                table: Arc::new(ProcMountInfo::default().read().unwrap()),
                changed: Cell::new(false),
            })
            .find(|c| !c.stale())
            .expect("nothing changed yet");
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
}
