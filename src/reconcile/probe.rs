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
pub fn classify(result: Result<(), Errno>) -> Health {
    match result {
        Err(e) if STALE_ERRNOS.contains(&e) => Health::Stale(format!("stale mount: {e}")),
        _ => Health::Ok,
    }
}

/// The owned volume mount points, published by each pass (so probing never
/// has to read the whole ledger).
pub type VolumeTargets = Arc<Mutex<Vec<(PathBuf, u32)>>>;

/// Volume mount points currently seen stale, with the reason.
pub type StaleMap = Arc<Mutex<BTreeMap<PathBuf, (u32, String)>>>;

/// Probes every owned volume mount each `interval`, updating `stale` and
/// calling `on_change` whenever the set changes.
pub async fn run_prober(
    targets: VolumeTargets,
    interval: Duration,
    timeout: Duration,
    stale: StaleMap,
    on_change: impl Fn(),
) {
    let in_flight: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
    loop {
        tokio::time::sleep(interval).await;
        let targets: Vec<(PathBuf, u32)> = targets.lock().expect("targets lock").clone();
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
        let mut map = stale.lock().expect("stale lock");
        let before = map.clone();
        map.retain(|t, _| results.iter().any(|(r, _, _)| r == t));
        for (t, id, h) in results {
            match h {
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
                tracing::warn!(target = %t.display(), reason = %why, "stale volume mount");
            }
            drop(map);
            on_change();
        }
    }
}

/// One probe of `target`: `statfs` on a thread, waited for at most `timeout`.
/// `None` when an earlier probe of it is still stuck.
pub fn probe(
    target: &Path,
    timeout: Duration,
    in_flight: &Arc<Mutex<BTreeSet<PathBuf>>>,
) -> Option<Health> {
    if !in_flight.lock().expect("lock").insert(target.to_path_buf()) {
        return None;
    }
    let (tx, rx) = mpsc::channel();
    let (t, flight) = (target.to_path_buf(), in_flight.clone());
    std::thread::spawn(move || {
        let r = nix::sys::statfs::statfs(&t).map(drop);
        flight.lock().expect("lock").remove(&t);
        let _ = tx.send(r);
    });
    Some(match rx.recv_timeout(timeout) {
        Ok(r) => classify(r),
        Err(_) => Health::Stale(format!(
            "stale mount: no answer to statfs within {timeout:?}"
        )),
    })
}

/// The verdicts that are about the mounts in `table` now: a verdict about a
/// mount that has since been replaced (healed, remounted) is dropped.
pub fn current_stale(
    verdicts: &BTreeMap<PathBuf, (u32, String)>,
    table: &crate::reconcile::actual::MountTable,
) -> BTreeMap<PathBuf, String> {
    verdicts
        .iter()
        .filter(|(t, (id, _))| table.top(t).is_some_and(|m| m.id == *id))
        .map(|(t, (_, why))| (t.clone(), why.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_mount_errnos_are_stale_others_are_not() {
        for e in STALE_ERRNOS {
            assert!(matches!(classify(Err(e)), Health::Stale(_)), "{e}");
        }
        assert_eq!(classify(Err(Errno::ENOENT)), Health::Ok);
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
        assert_eq!(current_stale(&verdicts, &old).len(), 1, "about this mount");
        let healed = MountTable::from_text(line(41)).unwrap();
        assert!(
            current_stale(&verdicts, &healed).is_empty(),
            "about the old mount"
        );
        assert!(current_stale(&verdicts, &MountTable::default()).is_empty());
    }

    #[test]
    fn probe_of_a_live_directory_is_ok() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            probe(t.path(), Duration::from_secs(5), &Arc::default()),
            Some(Health::Ok)
        );
    }
}
