//! Stale-mount detection. A dead network or FUSE mount answers `ENOTCONN`,
//! `ESTALE`, `EIO` or `EHOSTDOWN`, or never answers at all (a hard NFS
//! mount blocks `statfs` forever). Each owned volume mount is probed off the
//! reconcile loop, on its own thread, with a timeout; a probe still stuck
//! from an earlier round is not repeated (k8s mount-utils `IsCorruptedMnt`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;

/// Errnos that mean "mounted, but the filesystem behind it is gone".
pub const STALE_ERRNOS: [Errno; 4] = [Errno::ENOTCONN, Errno::ESTALE, Errno::EIO, Errno::EHOSTDOWN];

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It answered (or failed in a way that is not staleness, e.g. unmounted).
    Ok,
    /// It is stale; the reason is for status.
    Stale(String),
}

/// Classifies a `statfs` result.
pub fn classify<T>(result: Result<T, Errno>) -> Health {
    match result {
        Err(e) if STALE_ERRNOS.contains(&e) => Health::Stale(format!("stale mount: {e}")),
        _ => Health::Ok,
    }
}

/// The owned volume mount points, published by each pass (so probing never
/// has to read the whole ledger).
pub type VolumeTargets = Arc<Mutex<Vec<(PathBuf, u64)>>>;

/// Volume mount points currently seen stale, with the reason.
pub type StaleMap = Arc<Mutex<BTreeMap<PathBuf, (u64, String)>>>;

/// What a volume holds and has left, as its last probe's `statfs` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Size of the filesystem.
    pub capacity_bytes: u64,
    /// What an unprivileged user can still write (`f_bavail`).
    pub free_bytes: u64,
}

/// Volume mount points with their capacity, keyed by the mount probed.
pub type CapacityMap = Arc<Mutex<BTreeMap<PathBuf, (u64, Capacity)>>>;

/// Probes every owned volume mount each `interval`, updating `stale` and
/// calling `on_change` whenever the set changes.
pub async fn run_prober(
    targets: VolumeTargets,
    interval: Duration,
    timeout: Duration,
    (stale, capacity): (StaleMap, CapacityMap),
    on_change: impl Fn(),
) {
    let in_flight: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
    loop {
        tokio::time::sleep(interval).await;
        let targets: Vec<(PathBuf, u64)> = targets.lock().expect("targets lock").clone();
        let results = {
            let in_flight = in_flight.clone();
            tokio::task::spawn_blocking(move || {
                targets
                    .into_iter()
                    .map(|(t, id)| (t.clone(), id, probe(&t, timeout, &in_flight)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        store_capacity(&capacity, &results);
        let mut map = stale.lock().expect("stale lock");
        let before = map.clone();
        map.retain(|t, _| results.iter().any(|(r, _, _)| r == t));
        for (t, id, p) in results {
            match p.map(|(h, _)| h) {
                // Keyed by the mount probed: a verdict that returns after a
                // heal is about the old mount and never marks the new one.
                Some(Health::Stale(why)) => {
                    map.insert(t, (id, why));
                }
                Some(Health::Ok) => {
                    map.remove(&t);
                }
                None => {} // still stuck from before: keep what we know
            }
        }
        if *map != before {
            for (t, (_, why)) in map.iter().filter(|(t, _)| !before.contains_key(*t)) {
                let volume = t
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                tracing::warn!(
                    object = %format!("volume/{volume}"),
                    key = %crate::keys::volume_log_key(&volume),
                    mount_point = %t.display(),
                    reason = %why,
                    "stale volume mount"
                );
            }
            drop(map);
            on_change();
        }
    }
}

/// Keeps each probed mount's capacity (a stuck probe keeps the last).
fn store_capacity(capacity: &CapacityMap, results: &[(PathBuf, u64, Option<Probed>)]) {
    let mut map = capacity.lock().unwrap_or_else(|p| p.into_inner());
    map.retain(|t, _| results.iter().any(|(r, _, _)| r == t));
    for (t, id, p) in results {
        match p {
            Some((_, Some(c))) => {
                map.insert(t.clone(), (*id, *c));
            }
            Some((_, None)) => {
                map.remove(t);
            }
            None => {}
        }
    }
}

/// A probe's verdict, and the capacity if `statfs` answered.
pub type Probed = (Health, Option<Capacity>);

/// One probe of `target`: `statfs` on a thread, waited for at most `timeout`.
/// `None` when an earlier probe of it is still stuck.
pub fn probe(
    target: &Path,
    timeout: Duration,
    in_flight: &Arc<Mutex<BTreeSet<PathBuf>>>,
) -> Option<Probed> {
    if !in_flight.lock().expect("lock").insert(target.to_path_buf()) {
        return None;
    }
    let (tx, rx) = mpsc::channel();
    let (t, flight) = (target.to_path_buf(), in_flight.clone());
    std::thread::spawn(move || {
        // fsblkcnt_t is 32 bits on some targets: the casts are not idle there.
        #[allow(clippy::unnecessary_cast)]
        let r = nix::sys::statfs::statfs(&t).map(|st| {
            let size = st.block_size() as u64;
            Capacity {
                capacity_bytes: st.blocks() as u64 * size,
                free_bytes: st.blocks_available() as u64 * size,
            }
        });
        flight.lock().expect("lock").remove(&t);
        let _ = tx.send(r);
    });
    Some(match rx.recv_timeout(timeout) {
        Ok(r) => (classify(r), r.ok()),
        Err(_) => (
            Health::Stale(format!(
                "stale mount: no answer to statfs within {timeout:?}"
            )),
            None,
        ),
    })
}

/// The findings (stale verdicts, capacities) that are about the mounts in
/// `table` now: one about a mount that has since been replaced (healed,
/// remounted) is dropped.
pub fn current<T: Clone>(
    found: &BTreeMap<PathBuf, (u64, T)>,
    table: &crate::reconcile::actual::MountTable,
) -> BTreeMap<PathBuf, T> {
    found
        .iter()
        .filter(|(t, (id, _))| table.top(t).is_some_and(|m| m.id == *id))
        .map(|(t, (_, v))| (t.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_mount_errnos_are_stale_others_are_not() {
        for e in STALE_ERRNOS {
            assert!(matches!(classify::<()>(Err(e)), Health::Stale(_)), "{e}");
        }
        assert_eq!(classify::<()>(Err(Errno::ENOENT)), Health::Ok);
        assert_eq!(classify(Ok(())), Health::Ok);
    }

    /// Issue 11 item 7: a probe of the old mount that returned after a heal
    /// marked the new mount stale (a second heal; under `heal: always` it
    /// detached binds under running kernels).
    #[test]
    fn a_verdict_about_a_replaced_mount_is_not_about_the_new_one() {
        use crate::reconcile::actual::MountTable;
        let line =
            |id: u32| format!("{id} 1 0:50 / /v/data rw,nosuid,nodev - fuse.rclone data: rw\n");
        let verdicts = BTreeMap::from([(
            PathBuf::from("/v/data"),
            (40, "stale mount: ENOTCONN".to_string()),
        )]);
        let old = MountTable::from_text(line(40)).unwrap();
        assert_eq!(current(&verdicts, &old).len(), 1, "about this mount");
        let healed = MountTable::from_text(line(41)).unwrap();
        assert!(
            current(&verdicts, &healed).is_empty(),
            "about the old mount"
        );
        assert!(current(&verdicts, &MountTable::default()).is_empty());
    }

    #[test]
    fn probe_of_a_live_directory_is_ok() {
        let t = tempfile::tempdir().unwrap();
        let (health, capacity) = probe(t.path(), Duration::from_secs(5), &Arc::default()).unwrap();
        assert_eq!(health, Health::Ok);
        let c = capacity.expect("statfs answered");
        assert!(
            c.capacity_bytes > 0 && c.free_bytes <= c.capacity_bytes,
            "{c:?}"
        );
    }
}
