//! The sled store of what vfolderd itself made: its mounts and directories.
//!
//! Ownership lives here (invariant 1): a target absent from the ledger is
//! never unmounted. A record is written and flushed *before* the mount it
//! describes, so a crash between the two leaves an owned record whose mount
//! is missing (the next pass mounts it) rather than an unowned mount.
//! Removals are not flushed on their own: a removal lost in a crash leaves a
//! record whose mount or directory is gone, which the next pass forgets.
//!
//! The records also live in memory (read once at open, then written
//! through), so a pass reads the ledger as a shared snapshot instead of
//! decoding every record from sled (kubelet's actual state of world).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// sled could not open, read or write (fatal at start, retried later otherwise).
    #[error("state store {op} failed")]
    Sled {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// Another process (a running vfolderd, an operator command) holds the
    /// store: not corrupt, so never moved aside.
    #[error("state store {path} is locked by another process (a running vfolderd or an operator command)")]
    Locked {
        /// The store's directory.
        path: PathBuf,
    },
    /// Opening the store panicked inside sled (a damaged file it cannot parse).
    #[error("state store could not be read: {0}")]
    Unreadable(String),
    /// A record did not decode: the store is from an incompatible version or corrupt.
    #[error("state store record {key:?} is corrupt")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Who a mount or directory exists for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// A volume mount point and mount.
    Volume(String),
    /// A kernel's home, targets and binds.
    Kernel(String),
}

/// Kind of an owned mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A volume mounted under the volumes root.
    Volume,
    /// A bind into a kernel home.
    Bind,
    /// A kernel home bound onto itself and made shared, so a container that
    /// binds it `rslave` sees every later bind into it.
    Home,
}

impl MountKind {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MountKind::Volume => "volume",
            MountKind::Bind => "bind",
            MountKind::Home => "home",
        }
    }
}

/// A mount vfolderd made (or is about to make).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedMount {
    /// Mount point.
    pub target: PathBuf,
    /// Volume or bind.
    pub kind: MountKind,
    /// Mount source (a device string, or a bind's source directory).
    pub source: String,
    /// fstype asked for (`bind` for binds).
    pub fstype: String,
    /// The volume it mounts or binds from.
    pub volume: String,
    /// For binds: the kernel it serves.
    #[serde(default)]
    pub kernel: Option<String>,
    /// For binds: read-only.
    #[serde(default)]
    pub readonly: bool,
    /// For blob volumes: when the SAS the mount uses expires (unix seconds).
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Identity of the credentials file the mount was made with (inode,
    /// size, mtime; never its content): a rotated file changes it.
    #[serde(default)]
    pub credentials_stamp: Option<String>,
    /// The mount helper making this mount, while it runs: a restarted
    /// vfolderd waits for it instead of starting a second one (which would
    /// stack a second mount), and keeps the record until it exits.
    #[serde(default)]
    pub helper: Option<HelperProcess>,
    /// The FUSE server (rclone) serving this mount for as long as it
    /// lives: stopped when the mount goes, killed before a retry, so no
    /// server (holding a SAS) outlives its mount or stacks a second one.
    #[serde(default)]
    pub server: Option<HelperProcess>,
    /// For volumes: the options it was mounted with (inline secrets
    /// included: the store is root-only), so a changed spec is noticed.
    /// `None` in records older than this field: no change is assumed.
    #[serde(default)]
    pub options: Option<Vec<String>>,
    /// Which mount this record is about: the kernel's unique id of the
    /// mount vfolderd made, in the boot it was made in. A target can carry
    /// someone else's mount on top of ours, or in place of ours; only the
    /// mount with this id is ours to unmount. `None` in records older than
    /// this field, adopted without unique ids, or whose id was lost in a
    /// crash: such a record is judged by its path, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_id: Option<MountStamp>,
}

/// A mount named by the kernel's ids for it; the boot id says which boot
/// they are from (after a reboot every recorded mount is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStamp {
    /// `/proc/sys/kernel/random/boot_id` when the mount was made.
    pub boot: uuid::Uuid,
    /// Its unique 64-bit id (`STATX_MNT_ID_UNIQUE`, Linux 6.8+), never
    /// handed out twice in a boot: compared with `statmount`'s ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Its 32-bit mountinfo id (`STATX_MNT_ID`), compared with a table read
    /// from mountinfo: unique among the mounts that exist, so a mount put
    /// over ours is told apart, but reused once ours goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short: Option<u64>,
}

/// A process, named by pid and start time (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22).
    pub started: u64,
}

impl HelperProcess {
    /// The running process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<Self> {
        crate::reconcile::sys::running_since(pid).map(|started| Self { pid, started })
    }

    /// Whether that very process still runs (not exited, not a zombie of
    /// it, not another process that got its pid). Its process group is not
    /// asked: a killed group's orphans can linger as zombies where pid 1 does
    /// not reap (containers), which would read as "running" forever.
    pub fn alive(&self) -> bool {
        crate::reconcile::sys::running_since(self.pid) == Some(self.started)
    }
}

/// A directory vfolderd created, removed again (only if empty) when its owner goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedDir {
    /// The directory.
    pub path: PathBuf,
    /// Who it was made for.
    pub owner: Owner,
}

/// Owned mounts by target (a shared snapshot).
pub type OwnedMounts = Arc<HashMap<PathBuf, OwnedMount>>;
/// Owned directories by path (a shared snapshot).
pub type OwnedDirs = Arc<HashMap<PathBuf, OwnedDir>>;
/// Owned token files by path (a shared snapshot).
pub type OwnedTokens = Arc<BTreeMap<PathBuf, OwnedToken>>;

/// The in-memory copy of the three ownership trees. Snapshots handed out
/// are `Arc`s; a write copies a map only while a snapshot of it is alive.
#[derive(Default)]
struct Mirror {
    mounts: OwnedMounts,
    dirs: OwnedDirs,
    tokens: OwnedTokens,
}

/// The persistent store. Cheap to clone (sled trees are reference counted).
#[derive(Clone)]
pub struct Ledger {
    /// What the ownership trees hold, in memory.
    mirror: Arc<Mutex<Mirror>>,
    db: sled::Db,
    mounts: sled::Tree,
    dirs: sled::Tree,
    /// The last good desired state: raw etcd key → value (fail static across restarts).
    desired: sled::Tree,
    /// Small facts: the revision of `desired`.
    meta: sled::Tree,
    /// Per-user SAS token files written into kernel homes.
    tokens: sled::Tree,
    /// Told of every write not flushed at once: [`Ledger::flush_behind`]
    /// flushes it 500 ms later (sled's own flusher thread, which woke every
    /// 500 ms whether or not anything was written, is off: it was most of an
    /// idle node's CPU).
    unflushed: Arc<tokio::sync::Notify>,
}

/// A SAS token file vfolderd wrote into a kernel home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedToken {
    /// The file.
    pub path: PathBuf,
    /// The kernel it serves.
    pub kernel: String,
    /// The blob volume it grants access to.
    pub volume: String,
    /// When the SAS in it expires (unix seconds).
    pub expires_at: u64,
}

/// Raw desired key/value pairs, as listed from etcd.
pub type RawListing = Vec<(String, Vec<u8>)>;

/// Key in `meta` of the revision the stored desired state reflects.
const DESIRED_REVISION: &[u8] = b"desired_revision";

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> LedgerError {
    move |source| LedgerError::Sled { op, source }
}

fn key_of(p: &Path) -> Vec<u8> {
    p.as_os_str().as_encoded_bytes().to_vec()
}

/// Whether a sled error says the store's file lock is held elsewhere.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

impl Ledger {
    /// Opens the store in `dir`; a store that is damaged (not merely locked
    /// by another process) is moved aside to `<dir>.corrupt-<unix time>` and a
    /// fresh one opened, so a bad disk block costs a rebuild (from etcd, the
    /// mount table and the roots), not the node. Returns where the damaged
    /// store went, if it was moved.
    pub fn open_or_rebuild(dir: &Path) -> Result<(Self, Option<PathBuf>), LedgerError> {
        let err = match Self::open_guarded(dir) {
            Ok(l) => return Ok((l, None)),
            Err(e @ LedgerError::Locked { .. }) => return Err(e),
            Err(e) => e,
        };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut aside = dir.as_os_str().to_owned();
        aside.push(format!(".corrupt-{unix}"));
        let aside = PathBuf::from(aside);
        tracing::error!(
            store = %dir.display(),
            moved_to = %aside.display(),
            error = %crate::error::error_chain(&err),
            "state store is damaged; moved aside, rebuilding from etcd, the mount table and the roots"
        );
        std::fs::rename(dir, &aside).map_err(|e| {
            LedgerError::Unreadable(format!("cannot move the damaged store aside: {e}"))
        })?;
        Ok((Self::open_guarded(dir)?, Some(aside)))
    }

    /// [`Ledger::open`], with sled's panics on damaged files caught and a
    /// held lock told apart from damage.
    pub fn open_guarded(dir: &Path) -> Result<Self, LedgerError> {
        match std::panic::catch_unwind(|| Self::open(dir)) {
            Ok(Err(LedgerError::Sled { source, .. })) if is_lock_error(&source) => {
                Err(LedgerError::Locked {
                    path: dir.to_path_buf(),
                })
            }
            Ok(r) => r,
            Err(_) => Err(LedgerError::Unreadable(
                "sled panicked while opening it".into(),
            )),
        }
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        // sled caches 1 GiB by default; 16 MiB keeps the load at start fast (a
        // 4 MiB cache made a restart over 10,000 mounts 0.4 s slower).
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(sled_err("open"))?;
        let mounts = db.open_tree("mounts").map_err(sled_err("open tree"))?;
        let dirs = db.open_tree("dirs").map_err(sled_err("open tree"))?;
        let desired = db.open_tree("desired").map_err(sled_err("open tree"))?;
        let meta = db.open_tree("meta").map_err(sled_err("open tree"))?;
        let tokens = db.open_tree("tokens").map_err(sled_err("open tree"))?;
        let mirror = Mirror {
            mounts: Arc::new(load(&mounts, |m: &OwnedMount| m.target.clone())?),
            dirs: Arc::new(load(&dirs, |d: &OwnedDir| d.path.clone())?),
            tokens: Arc::new(load(&tokens, |t: &OwnedToken| t.path.clone())?),
        };
        Ok(Self {
            mirror: Arc::new(Mutex::new(mirror)),
            db,
            mounts,
            dirs,
            desired,
            meta,
            tokens,
            unflushed: Arc::default(),
        })
    }

    /// Flushes what was written without a flush, 500 ms after it was
    /// written (as sled's flusher did), and sleeps while nothing is: runs for
    /// as long as the daemon does. A crash loses at most the last 500 ms of
    /// such writes: removals (the next pass forgets their records) and
    /// desired-state events (the next start lists etcd again).
    pub async fn flush_behind(&self) {
        loop {
            self.unflushed.notified().await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let db = self.db.clone();
            let failed = match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            // Tried again after the next wait (a full disk may clear).
            tracing::warn!(error = %failed, "cannot flush the store");
            self.unflushed.notify_one();
        }
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        // A panic while holding the lock cannot leave a map half-written
        // (each update is one insert or remove), so a poisoned lock is fine.
        self.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every owned mount, by target.
    pub fn mounts(&self) -> Result<OwnedMounts, LedgerError> {
        Ok(self.mirror().mounts.clone())
    }

    /// Every owned directory, by path.
    pub fn dirs(&self) -> Result<OwnedDirs, LedgerError> {
        Ok(self.mirror().dirs.clone())
    }

    /// Every token file written, by path.
    pub fn tokens(&self) -> Result<OwnedTokens, LedgerError> {
        Ok(self.mirror().tokens.clone())
    }

    /// Records a mount and flushes (called before mounting).
    pub fn put_mount(&self, m: &OwnedMount) -> Result<(), LedgerError> {
        self.stage_mount(m)?;
        self.flush()
    }

    /// Records a mount without flushing: the caller calls [`Ledger::sync`]
    /// before the mount it describes (group commit of a batch of records).
    pub fn stage_mount(&self, m: &OwnedMount) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(m).expect("owned mount serialises");
        self.mounts
            .insert(key_of(&m.target), v)
            .map_err(sled_err("insert"))?;
        Arc::make_mut(&mut self.mirror().mounts).insert(m.target.clone(), m.clone());
        Ok(())
    }

    /// Forgets a mount (called after unmounting; not flushed, see the module doc).
    pub fn remove_mount(&self, target: &Path) -> Result<(), LedgerError> {
        self.mounts
            .remove(key_of(target))
            .map_err(sled_err("remove"))?;
        Arc::make_mut(&mut self.mirror().mounts).remove(target);
        self.unflushed.notify_one();
        Ok(())
    }

    /// Names the mount a record is about, once it is made (not flushed: a
    /// crash that loses it leaves a record judged by its path, as records
    /// made before mount ids were).
    pub fn stamp_mount(&self, target: &Path, stamp: MountStamp) -> Result<(), LedgerError> {
        let Some(mut m) = self.mirror().mounts.get(target).cloned() else {
            return Ok(());
        };
        m.mount_id = Some(stamp);
        let v = serde_json::to_vec(&m).expect("owned mount serialises");
        self.mounts
            .insert(key_of(target), v)
            .map_err(sled_err("insert"))?;
        Arc::make_mut(&mut self.mirror().mounts).insert(target.to_path_buf(), m);
        self.unflushed.notify_one();
        Ok(())
    }

    /// Records a token file (before writing it) and flushes.
    pub fn put_token(&self, t: &OwnedToken) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(t).expect("owned token serialises");
        self.tokens
            .insert(key_of(&t.path), v)
            .map_err(sled_err("insert"))?;
        Arc::make_mut(&mut self.mirror().tokens).insert(t.path.clone(), t.clone());
        self.flush()
    }

    /// Forgets a token file (not flushed).
    pub fn remove_token(&self, path: &Path) -> Result<(), LedgerError> {
        self.tokens
            .remove(key_of(path))
            .map_err(sled_err("remove"))?;
        Arc::make_mut(&mut self.mirror().tokens).remove(path);
        self.unflushed.notify_one();
        Ok(())
    }

    /// Records a created directory and flushes.
    pub fn put_dir(&self, d: &OwnedDir) -> Result<(), LedgerError> {
        self.stage_dir(d)?;
        self.flush()
    }

    /// Records a directory without flushing (see [`Ledger::stage_mount`]).
    pub fn stage_dir(&self, d: &OwnedDir) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(d).expect("owned dir serialises");
        self.dirs
            .insert(key_of(&d.path), v)
            .map_err(sled_err("insert"))?;
        Arc::make_mut(&mut self.mirror().dirs).insert(d.path.clone(), d.clone());
        Ok(())
    }

    /// Forgets a directory (not flushed).
    pub fn remove_dir(&self, path: &Path) -> Result<(), LedgerError> {
        self.dirs.remove(key_of(path)).map_err(sled_err("remove"))?;
        Arc::make_mut(&mut self.mirror().dirs).remove(path);
        self.unflushed.notify_one();
        Ok(())
    }

    /// Makes every staged record durable (one fsync for the whole batch).
    pub fn sync(&self) -> Result<(), LedgerError> {
        self.flush()
    }

    /// Replaces the stored desired state under `prefixes` with a complete
    /// listing of them at `revision` (keys outside them, an agent's
    /// followed vfolder records, stay).
    pub fn store_desired(
        &self,
        kvs: &[(String, Vec<u8>)],
        prefixes: &[String],
        revision: i64,
    ) -> Result<(), LedgerError> {
        // One batch (atomic in sled): the keys gone since, then every key
        // of the listing. A crash leaves the old state or the new one; the
        // revision written after it may lag by one listing, which only labels
        // a restart's stored state older than it is.
        let mut batch = sled::Batch::default();
        let new: std::collections::HashSet<&[u8]> = kvs.iter().map(|(k, _)| k.as_bytes()).collect();
        for p in prefixes {
            for old in self.desired.scan_prefix(p.as_bytes()).keys() {
                let old = old.map_err(sled_err("read"))?;
                if !new.contains(old.as_ref()) {
                    batch.remove(old);
                }
            }
        }
        for (k, v) in kvs {
            batch.insert(k.as_bytes(), v.as_slice());
        }
        self.desired
            .apply_batch(batch)
            .map_err(sled_err("insert"))?;
        self.meta
            .insert(DESIRED_REVISION, &revision.to_be_bytes())
            .map_err(sled_err("insert"))?;
        self.flush()
    }

    /// Applies one watch event to the stored desired state. Not flushed: it
    /// is written within 500 ms ([`Ledger::flush_behind`]), and losing the
    /// newest events in a crash only means starting from a slightly older
    /// good state.
    pub fn apply_desired(
        &self,
        key: &str,
        value: Option<&[u8]>,
        revision: i64,
    ) -> Result<(), LedgerError> {
        match value {
            Some(v) => self.desired.insert(key.as_bytes(), v).map(drop),
            None => self.desired.remove(key.as_bytes()).map(drop),
        }
        .map_err(sled_err("insert"))?;
        // Only ever raised: a followed record read now may carry an older
        // mod revision than the state around it.
        self.meta
            .fetch_and_update(DESIRED_REVISION, |old| {
                let old = old.and_then(|o| o.try_into().ok()).map(i64::from_be_bytes);
                Some(old.unwrap_or(revision).max(revision).to_be_bytes().to_vec())
            })
            .map_err(sled_err("insert"))?;
        self.unflushed.notify_one();
        Ok(())
    }

    /// The stored desired state and its revision, if one was ever stored.
    pub fn load_desired(&self) -> Result<Option<(RawListing, i64)>, LedgerError> {
        let Some(rev) = self.meta.get(DESIRED_REVISION).map_err(sled_err("read"))? else {
            return Ok(None);
        };
        let rev = i64::from_be_bytes(rev.as_ref().try_into().unwrap_or([0; 8]));
        let mut kvs = Vec::new();
        for item in self.desired.iter() {
            let (k, v) = item.map_err(sled_err("read"))?;
            kvs.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(Some((kvs, rev)))
    }

    /// Ownership must survive a crash: written records are made durable now
    /// (sled's own periodic flush is off; see [`Ledger::flush_behind`]).
    fn flush(&self) -> Result<(), LedgerError> {
        self.db.flush().map(|_| ()).map_err(sled_err("flush"))
    }
}

fn load<T: for<'de> Deserialize<'de>, M: FromIterator<(PathBuf, T)>>(
    tree: &sled::Tree,
    key: impl Fn(&T) -> PathBuf,
) -> Result<M, LedgerError> {
    tree.iter()
        .map(|item| {
            let (k, v) = item.map_err(sled_err("read"))?;
            let rec: T = serde_json::from_slice(&v).map_err(|source| LedgerError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                source,
            })?;
            Ok((key(&rec), rec))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again. The file lock may be let go a moment after the
    /// last handle is dropped (seen as EWOULDBLOCK in about 1 of 20 runs when
    /// sled's flusher thread ran): what these tests check is what survives a
    /// reopen, so they wait for the lock (a new process never meets this: the
    /// lock goes with the old process).
    fn reopen(dir: &Path) -> Ledger {
        let mut tries = 0;
        loop {
            match Ledger::open(dir) {
                Ok(l) => return l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cannot reopen the store: {e:?}"),
            }
        }
    }

    #[test]
    fn ledger_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = OwnedMount {
            target: "/v/a b".into(),
            kind: MountKind::Volume,
            source: "tmpfs".into(),
            fstype: "tmpfs".into(),
            volume: "a".into(),
            kernel: None,
            readonly: false,
            expires_at: None,
            credentials_stamp: None,
            helper: None,
            server: None,
            options: None,
            mount_id: Some(MountStamp {
                boot: uuid::Uuid::from_u128(7),
                id: Some(0x8000_0042),
                short: Some(42),
            }),
        };
        {
            let l = reopen(dir.path());
            l.put_mount(&m).unwrap();
            l.put_dir(&OwnedDir {
                path: "/v/a b".into(),
                owner: Owner::Volume("a".into()),
            })
            .unwrap();
        }
        let l = reopen(dir.path());
        assert_eq!(l.mounts().unwrap().get(Path::new("/v/a b")), Some(&m));
        let before = l.mounts().unwrap();
        l.remove_mount(Path::new("/v/a b")).unwrap();
        assert!(l.mounts().unwrap().is_empty());
        // A snapshot taken before a write does not change under its holder.
        assert_eq!(before.len(), 1);
        assert_eq!(l.dirs().unwrap().len(), 1);
        l.sync().unwrap();
        drop(l);
        // What memory said is what the store holds after a reopen.
        let l = reopen(dir.path());
        assert!(l.mounts().unwrap().is_empty());
        assert_eq!(l.dirs().unwrap().len(), 1);
    }

    #[test]
    fn stored_desired_state_survives_reopen_with_events_applied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = reopen(dir.path());
            assert!(l.load_desired().unwrap().is_none());
            l.store_desired(
                &[
                    ("/p/a".into(), b"1".to_vec()),
                    ("/p/b".into(), b"2".to_vec()),
                ],
                &["/p/".into()],
                7,
            )
            .unwrap();
            l.apply_desired("/p/a", None, 8).unwrap();
            l.apply_desired("/p/c", Some(b"3"), 9).unwrap();
            l.flush().unwrap();
        }
        let l = reopen(dir.path());
        let (kvs, rev) = l.load_desired().unwrap().unwrap();
        assert_eq!(rev, 9);
        assert_eq!(
            kvs,
            vec![
                ("/p/b".to_string(), b"2".to_vec()),
                ("/p/c".to_string(), b"3".to_vec())
            ]
        );
    }

    /// An agent's listing covers its volumes and kernels; the vfolder
    /// records it follows one by one are not in it and must stay stored.
    #[test]
    fn a_listing_replaces_only_the_ranges_it_lists() {
        let dir = tempfile::tempdir().unwrap();
        let l = reopen(dir.path());
        l.apply_desired("/p/vfolders/x", Some(b"followed"), 3)
            .unwrap();
        l.apply_desired("/p/volumes/gone", Some(b"v"), 3).unwrap();
        let listed = [
            "/p/volumes/".to_string(),
            "/p/nodes/n1/kernels/".to_string(),
        ];
        l.store_desired(&[("/p/volumes/a".into(), b"1".to_vec())], &listed, 5)
            .unwrap();
        let (kvs, _) = l.load_desired().unwrap().unwrap();
        assert_eq!(
            kvs,
            vec![
                ("/p/vfolders/x".to_string(), b"followed".to_vec()),
                ("/p/volumes/a".to_string(), b"1".to_vec()),
            ]
        );
    }
}
