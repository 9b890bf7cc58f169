//! vfolder usage, measured off the reconcile loop. A scan walks a whole
//! directory tree on a remote volume: seconds for a million files, forever on
//! a hard NFS mount whose server is gone. Inside a pass it held every kernel
//! of the node back; here it runs on its own thread, one directory at a time,
//! and a scan that hangs only leaves that vfolder's numbers old.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use crate::reconcile::report::Usage;
use crate::state::status::chrono_now;

/// What the pass asks to be measured, and what was measured.
#[derive(Default)]
pub struct UsageBoard {
    /// vfolder → its directory and quota (published by whole passes, storage role).
    targets: Mutex<BTreeMap<Uuid, ScanTarget>>,
    /// vfolders whose quota changed: measured (and limited) again at once.
    dirty: Mutex<BTreeSet<Uuid>>,
    /// The latest measurements (shared with passes without copying).
    measured: Mutex<Arc<BTreeMap<Uuid, Usage>>>,
    /// Woken when a directory appears that was never measured.
    wake: Notify,
    /// Where each scan's time goes (`vfolderd_usage_scan_duration_seconds`).
    scan_time: Option<prometheus::Histogram>,
}

impl UsageBoard {
    /// A board that records each scan's time in `h`.
    pub fn with_histogram(h: prometheus::Histogram) -> Self {
        Self {
            scan_time: Some(h),
            ..Self::default()
        }
    }

    /// Sets the directories to measure; wakes the scanner if one is new
    /// or its quota changed (an enforced limit follows at once).
    pub fn publish(&self, targets: BTreeMap<Uuid, ScanTarget>) {
        let measured = self.measured();
        let mut new = targets.keys().any(|id| !measured.contains_key(id));
        let mut cur = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<Uuid> = targets
            .iter()
            .filter(|(id, t)| cur.get(id).is_some_and(|c| c.quota != t.quota))
            .map(|(id, _)| *id)
            .collect();
        *cur = targets;
        drop(cur);
        if !changed.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(changed);
            new = true;
        }
        if new {
            self.wake.notify_one();
        }
    }

    /// The latest measurements.
    pub fn measured(&self) -> Arc<BTreeMap<Uuid, Usage>> {
        self.measured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn targets(&self) -> BTreeMap<Uuid, ScanTarget> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn store(&self, f: impl FnOnce(&mut BTreeMap<Uuid, Usage>)) {
        let mut m = self.measured.lock().unwrap_or_else(|p| p.into_inner());
        f(Arc::make_mut(&mut m));
    }
}

/// Runs forever: measures every published directory each `period`, and the
/// ones never measured as soon as they appear; `on_change` after a round
/// that changed a number (the next pass reports them). A scan that takes
/// longer than `timeout` is abandoned (its thread may be stuck in the
/// kernel) and that directory is not scanned again until it returns.
pub async fn run_usage_scanner(
    board: Arc<UsageBoard>,
    period: Duration,
    timeout: Duration,
    on_change: impl Fn(),
) {
    let stuck: Arc<Mutex<BTreeSet<Uuid>>> = Arc::default();
    let mut full_round_at = tokio::time::Instant::now();
    loop {
        let full = tokio::time::Instant::now() >= full_round_at;
        if full {
            full_round_at = tokio::time::Instant::now() + period;
        }
        let measured = board.measured();
        let dirty = std::mem::take(&mut *board.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let due: Vec<(Uuid, ScanTarget)> = board
            .targets()
            .into_iter()
            .filter(|(id, _)| full || !measured.contains_key(id) || dirty.contains(id))
            .collect();
        let mut changed = false;
        for (id, target) in due {
            let started = std::time::Instant::now();
            let Some(usage) = scan_with_timeout(id, target, timeout, &stuck).await else {
                continue;
            };
            if let Some(h) = &board.scan_time {
                h.observe(started.elapsed().as_secs_f64());
            }
            let differs = measured.get(&id).is_none_or(|u| {
                (u.files, u.bytes, u.enforced) != (usage.files, usage.bytes, usage.enforced)
            });
            changed |= differs;
            board.store(|m| {
                m.insert(id, usage);
            });
        }
        let targets = board.targets();
        board.store(|m| m.retain(|id, _| targets.contains_key(id)));
        if changed {
            on_change();
        }
        tokio::select! {
            _ = board.wake.notified() => {}
            _ = tokio::time::sleep_until(full_round_at) => {}
        }
    }
}

/// A directory to measure and its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanTarget {
    /// The vfolder's directory.
    pub path: PathBuf,
    /// Its record's `quota_bytes`.
    pub quota: Option<u64>,
}

/// If `target` is a subvolume on btrfs with quotas enabled: its limit set
/// to the quota (when it differs) and the bytes its qgroup counts.
fn enforce(target: &ScanTarget) -> Option<u64> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(&target.path, flags, nix::sys::stat::Mode::empty()).ok()?;
    let fs = crate::reconcile::btrfs::quota_fs(std::os::fd::AsFd::as_fd(&fd))?;
    let id = crate::reconcile::btrfs::subvolume_id(std::os::fd::AsFd::as_fd(&fd))?;
    let q = fs.qgroup(id)?;
    if q.limit != target.quota {
        match crate::reconcile::btrfs::set_limit(std::os::fd::AsFd::as_fd(&fd), target.quota) {
            Ok(()) => {
                tracing::info!(path = %target.path.display(), limit = ?target.quota, "quota limit set")
            }
            Err(e) => {
                tracing::warn!(path = %target.path.display(), error = %e, "cannot set the quota limit")
            }
        }
    }
    Some(q.referenced)
}

/// Scans `path` on a thread of its own; `None` if it failed, or did not
/// finish within `timeout` (then it is skipped until that thread returns).
async fn scan_with_timeout(
    id: Uuid,
    target: ScanTarget,
    timeout: Duration,
    stuck: &Arc<Mutex<BTreeSet<Uuid>>>,
) -> Option<Usage> {
    if !stuck.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
        return None; // an earlier scan of it is still stuck
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let flight = stuck.clone();
    std::thread::spawn(move || {
        let enforced = enforce(&target);
        let r = crate::usage::scan(&target.path);
        flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let _ = tx.send(r.map(|u| (u, enforced)));
    });
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(((files, bytes), enforced)))) => Some(Usage {
            files,
            // The larger of the scan and the qgroup: the qgroup is exact
            // for the subvolume, but a user can nest a subvolume of their
            // own, whose bytes only the scan sees.
            bytes: enforced.map_or(bytes, |q| q.max(bytes)),
            scanned_at: chrono_now(),
            enforced: enforced.is_some(),
        }),
        Ok(_) => None,
        Err(_) => {
            tracing::warn!(vfolder = %id, key = %crate::keys::vfolder_log_key(&id), ?timeout, "usage scan did not finish; its volume may be hung");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_directory_is_measured_at_once_and_the_pass_is_told() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"12345").unwrap();
        let board = Arc::new(UsageBoard::default());
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        let task = tokio::spawn(run_usage_scanner(
            board.clone(),
            Duration::from_secs(3600),
            Duration::from_secs(10),
            move || {
                c.fetch_add(1, Ordering::SeqCst);
            },
        ));
        let id = Uuid::from_u128(1);
        let target = ScanTarget {
            path: dir.path().to_path_buf(),
            quota: None,
        };
        board.publish(BTreeMap::from([(id, target)]));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !board.measured().contains_key(&id) {
            assert!(std::time::Instant::now() < deadline, "never measured");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            (board.measured()[&id].files, board.measured()[&id].bytes),
            (1, 5)
        );
        assert!(changes.load(Ordering::SeqCst) >= 1);
        // Gone from the targets: forgotten at the next round.
        board.publish(BTreeMap::new());
        task.abort();
    }
}
