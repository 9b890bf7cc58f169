//! The safety brake: a node that finds etcd wiped, replaced or restored from
//! an old backup tears nothing down. Any successful list is otherwise
//! authoritative, and an empty etcd would unmount every kernel's data on
//! every node at once.
//!
//! The node remembers which cluster it belongs to (`P/cluster`'s id) and the
//! newest revision it has seen, in a small file beside the sled store (so
//! both survive a rebuild of the store, and `vfolderd accept-reset` can
//! rewrite it while the daemon runs). A list whose cluster id differs, is
//! missing, or whose revision is behind the remembered one holds the node.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Errors reading or writing the cluster file.
#[derive(Debug, thiserror::Error)]
pub enum BrakeError {
    /// The file could not be read or written.
    #[error("cluster identity file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse (hand-edited or damaged).
    #[error("cluster identity file {path} is damaged: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What a node remembers of its cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// `P/cluster`'s id, once known.
    pub id: Option<Uuid>,
    /// The newest etcd revision this node has applied.
    pub revision: i64,
    /// When an operator last ran `vfolderd accept-reset` here (RFC 3339): a
    /// new value releases a held brake; nothing else does (not a revision
    /// update, not a file that cannot be read).
    #[serde(default)]
    pub accepted: Option<String>,
}

/// `P/cluster`: written once by a storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The cluster's id.
    pub id: Uuid,
    /// When it was created (RFC 3339).
    pub created: String,
}

impl ClusterFile {
    /// Where it lives: beside the store, in the state directory.
    pub fn path(state: &Path) -> PathBuf {
        state.join("cluster.json")
    }

    /// The remembered identity; `None` on a node's first start.
    pub fn load(path: &Path) -> Result<Option<Self>, BrakeError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| BrakeError::Damaged {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BrakeError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes it atomically (a temporary file renamed into place), 0600.
    pub fn save(&self, path: &Path) -> Result<(), BrakeError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| BrakeError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A temporary name of its own per write: the daemon's writers and an
        // operator's accept-reset never share one.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("json.tmp.{}.{seq}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&serde_json::to_vec(self).expect("plain struct"))
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// What a list means for the brake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The list is this cluster's, at or past what the node has seen;
    /// `adopt`: the cluster id to remember (a node's first start).
    Proceed {
        /// An id the node did not know yet.
        adopt: Option<Uuid>,
    },
    /// etcd has no cluster id and neither has the node: a new cluster. A
    /// storage node writes `P/cluster`; the list proceeds.
    NewCluster,
    /// Tear nothing down and do no directory work, for this reason, until
    /// an operator runs `vfolderd accept-reset`.
    Held(String),
}

/// Judges a list against the cluster file at `path`; a damaged file holds.
pub fn evaluate(path: &Path, etcd_id: Option<Uuid>, revision: i64) -> Verdict {
    match ClusterFile::load(path) {
        Ok(stored) => judge(stored.as_ref(), etcd_id, revision),
        Err(e) => Verdict::Held(crate::error::error_chain(&e)),
    }
}

/// The operator's acceptance in the file at `path`, if it can be read.
pub fn accepted(path: &Path) -> Option<Option<String>> {
    ClusterFile::load(path)
        .ok()
        .map(|f| f.and_then(|f| f.accepted))
}

/// Remembers `id` (when given) and that revision `revision` was applied
/// (the file keeps the newest), read-modify-write so an operator's
/// `accept-reset` in between is kept.
pub fn remember(path: &Path, id: Option<Uuid>, revision: i64) -> Result<(), BrakeError> {
    let mut f = ClusterFile::load(path)?.unwrap_or_default();
    let before = f.clone();
    if id.is_some() {
        f.id = id;
    }
    f.revision = f.revision.max(revision);
    if f != before {
        f.save(path)?;
    }
    Ok(())
}

/// Judges a list of etcd at `revision` whose `P/cluster` says `etcd_id`,
/// against what the node remembers.
pub fn judge(stored: Option<&ClusterFile>, etcd_id: Option<Uuid>, revision: i64) -> Verdict {
    let remembered = stored.cloned().unwrap_or_default();
    match (remembered.id, etcd_id) {
        (Some(mine), None) => {
            return Verdict::Held(format!(
                "etcd has no cluster id (P/cluster) but this node belongs to cluster {mine}: \
                 etcd was wiped or replaced"
            ))
        }
        (Some(mine), Some(theirs)) if mine != theirs => {
            return Verdict::Held(format!(
                "etcd belongs to cluster {theirs} but this node to cluster {mine}: \
                 etcd was replaced or the prefix points elsewhere"
            ))
        }
        _ => {}
    }
    if remembered.revision > revision {
        return Verdict::Held(format!(
            "etcd is at revision {revision}, behind revision {} this node has seen: \
             etcd was wiped or restored from an older backup",
            remembered.revision
        ));
    }
    match (remembered.id, etcd_id) {
        (None, Some(id)) => Verdict::Proceed { adopt: Some(id) },
        (None, None) => Verdict::NewCluster,
        _ => Verdict::Proceed { adopt: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: Option<u128>, revision: i64) -> ClusterFile {
        ClusterFile {
            id: id.map(Uuid::from_u128),
            revision,
            accepted: None,
        }
    }

    #[test]
    fn a_first_start_adopts_etcds_id_or_starts_a_new_cluster() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            judge(None, Some(id), 5),
            Verdict::Proceed { adopt: Some(id) }
        );
        assert_eq!(judge(None, None, 5), Verdict::NewCluster);
    }

    #[test]
    fn the_same_cluster_at_or_past_the_seen_revision_proceeds() {
        let f = file(Some(7), 100);
        let id = Some(Uuid::from_u128(7));
        assert_eq!(judge(Some(&f), id, 100), Verdict::Proceed { adopt: None });
        assert_eq!(judge(Some(&f), id, 250), Verdict::Proceed { adopt: None });
    }

    #[test]
    fn a_wiped_replaced_or_restored_etcd_holds_the_node() {
        let f = file(Some(7), 100);
        let held = |v: Verdict, what: &str| match v {
            Verdict::Held(r) => assert!(r.contains(what), "{r}"),
            v => panic!("not held: {v:?}"),
        };
        held(judge(Some(&f), None, 1), "no cluster id");
        held(
            judge(Some(&f), Some(Uuid::from_u128(8)), 500),
            "belongs to cluster",
        );
        held(
            judge(Some(&f), Some(Uuid::from_u128(7)), 40),
            "behind revision 100",
        );
        // A node that knew a revision but no id yet: a wiped etcd is behind it.
        held(
            judge(Some(&file(None, 100)), None, 1),
            "behind revision 100",
        );
    }

    #[test]
    fn the_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = ClusterFile::path(dir.path());
        assert_eq!(ClusterFile::load(&p).unwrap(), None);
        let f = file(Some(9), 42);
        f.save(&p).unwrap();
        assert_eq!(ClusterFile::load(&p).unwrap(), Some(f));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(ClusterFile::load(&p).is_err());
    }
}
