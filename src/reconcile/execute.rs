//! The executor: carries out planned actions through a [`Mounter`], records
//! ownership in the ledger around each mount, and reports each outcome.
//!
//! It is synchronous (mount(2) blocks); the pass runs on a blocking
//! thread. A failed action never stops the others: only the actions that
//! depend on it (same kernel, same volume) are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::names::redact;
use crate::reconcile::actual::MountInfoSource;
use crate::reconcile::fsops::{
    self, fd_path, make_dir, open_dir, open_dir_below, remove_dir_if_empty, Create, FsError,
};
use crate::reconcile::newmount::MountIds;
use crate::reconcile::plan::{Action, WantBind, WantToken, WantVolume};
use crate::reconcile::sys::{
    signal_process, split_flags, HelperError, HelperRequest, Mounter, ServerRequest,
};
use crate::spec::Fstype;
use crate::state::ledger::{
    HelperProcess, Ledger, LedgerError, MountKind, OwnedDir, OwnedMount, OwnedToken, Owner,
};

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A directory could not be opened or made safely (e.g. a planted symlink).
    #[error(transparent)]
    Fs(#[from] FsError),
    /// mount(2) failed.
    #[error("mount {target} failed: {errno}")]
    MountFailed {
        /// The mount point.
        target: PathBuf,
        /// The errno.
        errno: Errno,
    },
    /// The mount at the target is not the one its record names (someone
    /// mounted over it since the plan was made): left alone.
    #[error("{target} now carries a mount vfolderd did not make; it is left alone")]
    NotOurs {
        /// The mount point.
        target: PathBuf,
    },
    /// umount2(2) failed (EBUSY is transient).
    #[error("unmount {target} failed: {errno}")]
    UnmountFailed {
        /// The mount point.
        target: PathBuf,
        /// The errno.
        errno: Errno,
    },
    /// The mount helper failed or timed out. The cause is the `source`, not
    /// part of this message: an error chain prints it once.
    #[error("mount {target}")]
    Helper {
        /// The mount point.
        target: PathBuf,
        /// What the helper did.
        #[source]
        source: HelperError,
    },
    /// The ledger could not be written; the mount was not attempted.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A credentials file could not be read or written.
    #[error("credentials {name}: {message}")]
    Credentials {
        /// The credential's name.
        name: String,
        /// What went wrong (never the secret).
        message: String,
    },
    /// A feature that needs something this process lacks (the daemon's runtime).
    #[error("{0} is not available here")]
    Unsupported(String),
    /// A vfolder's directory is not on its volume (yet): the kernel waits.
    #[error("source directory {0} does not exist on its volume yet")]
    SourceMissing(PathBuf),
    /// A blob container could not be prepared (key, container, SAS).
    #[error(transparent)]
    Azure(#[from] crate::azure::AzureError),
    /// Skipped because an action it depends on failed.
    #[error("skipped: {0}")]
    Skipped(String),
    /// Not attempted: its object waits out a retry backoff after `0`.
    #[error("{0}")]
    Deferred(String),
}

impl ExecError {
    /// Whether the object should be reported `Pending` rather than `Failed`.
    pub fn is_pending(&self) -> bool {
        matches!(self, ExecError::SourceMissing(_))
    }

    /// Whether the action was actually attempted (and so counts toward backoff).
    pub fn was_attempted(&self) -> bool {
        !matches!(self, ExecError::Skipped(_) | ExecError::Deferred(_))
    }
}

/// The fstype a mount or an unmount is of, as a metric label.
fn fstype_of(action: &Action, owned: &HashMap<PathBuf, OwnedMount>) -> Option<&'static str> {
    match action {
        Action::MountVolume { volume } => Some(volume.fstype.label()),
        Action::Bind { .. } => Some(Fstype::Bind.label()),
        Action::Unmount { target, kind } => Some(match kind {
            MountKind::Bind => Fstype::Bind.label(),
            _ => owned
                .get(target)
                .map_or("other", |m| Fstype::from(m.fstype.clone()).label()),
        }),
        _ => None,
    }
}

/// The outcome of one action.
#[derive(Debug)]
pub struct Outcome {
    /// The action.
    pub action: Action,
    /// How long it ran (zero when not attempted).
    pub elapsed: Duration,
    /// For a mount or an unmount: the fstype it was of, as a metric label.
    pub fstype: Option<&'static str>,
    /// Which object it was for.
    pub owner: Option<Owner>,
    /// Its result.
    pub result: Result<(), ExecError>,
}

/// Settings the executor needs.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Volumes root.
    pub volumes_root: PathBuf,
    /// Kernels root.
    pub kernels_root: PathBuf,
    /// Node-local secrets.
    pub credentials_dir: PathBuf,
    /// Private directory for transient credential files (0700).
    pub run_dir: PathBuf,
    /// Mount helper timeout.
    pub mount_timeout: Duration,
    /// Lifetime of a blob volume's mount SAS.
    pub sas_lifetime: Duration,
    /// Lifetime of a per-user token file's SAS.
    pub token_lifetime: Duration,
    /// The rclone binary.
    pub rclone: PathBuf,
}

impl ExecConfig {
    /// The executor's settings from the node config.
    pub fn from_node(cfg: &crate::config::NodeConfig) -> Self {
        Self {
            volumes_root: cfg.roots.volumes.clone(),
            kernels_root: cfg.roots.kernels.clone(),
            credentials_dir: cfg.credentials.clone(),
            run_dir: cfg.state.join("run"),
            mount_timeout: cfg.mount_timeout,
            sas_lifetime: cfg.sas_lifetime,
            token_lifetime: cfg.token_lifetime,
            rclone: cfg.rclone.clone(),
        }
    }
}

/// Carries out actions.
pub struct Executor {
    mounter: Arc<dyn Mounter>,
    ledger: Ledger,
    cfg: ExecConfig,
    /// Where to watch for a helper's mount to appear (FUSE daemons may return
    /// before their mount is visible); `None` with a recording double.
    mountinfo: Option<Arc<dyn MountInfoSource>>,
    /// A detached copy of the kernels root's mount, that homes are bound
    /// from (see [`crate::reconcile::newmount::detached_copy`]); made at
    /// the first home, again after a failure that may pass.
    kernels_copy: std::sync::Mutex<Option<OwnedFd>>,
    /// No copy can be made here (the kernel lacks the calls or refuses a
    /// copy from a detached mount): homes are bound from the live path.
    no_kernels_copy: std::sync::atomic::AtomicBool,
    /// Asked, with the volume's mount point, right before a vfolder
    /// directory is made: false leaves it to the next pass (this storage
    /// node does not lead the volume now, or is fenced).
    dir_gate: Option<DirGate>,
}

/// See [`Executor::with_dir_gate`].
pub type DirGate = Arc<dyn Fn(&Path) -> bool + Send + Sync>;

/// The ownership record of a bind (what the executor writes before binding).
pub fn bind_record(b: &WantBind) -> OwnedMount {
    OwnedMount {
        target: b.target.clone(),
        kind: MountKind::Bind,
        source: b.source.to_string_lossy().into_owned(),
        fstype: "bind".into(),
        volume: b.volume.clone(),
        kernel: Some(b.kernel.clone()),
        readonly: b.readonly,
        expires_at: None,
        credentials_stamp: None,
        helper: None,
        server: None,
        options: None,
        mount_id: None,
    }
}

/// The ownership record of a volume mount (without credential stamps).
pub fn volume_record(v: &WantVolume) -> OwnedMount {
    OwnedMount {
        target: v.target.clone(),
        kind: MountKind::Volume,
        source: v.source.clone(),
        fstype: v.fstype.to_string(),
        volume: v.name.clone(),
        kernel: None,
        readonly: v.readonly,
        expires_at: None,
        credentials_stamp: None,
        helper: None,
        server: None,
        options: Some(v.options.clone()),
        mount_id: None,
    }
}

/// The ownership record of a kernel's home mount.
pub fn home_record(home: &Path, kernel: &str) -> OwnedMount {
    OwnedMount {
        target: home.to_path_buf(),
        kind: MountKind::Home,
        source: home.to_string_lossy().into_owned(),
        fstype: "bind".into(),
        volume: String::new(),
        kernel: Some(kernel.to_string()),
        readonly: false,
        expires_at: None,
        credentials_stamp: None,
        helper: None,
        server: None,
        options: None,
        mount_id: None,
    }
}

/// The object an action serves, for status and dependency skipping.
pub fn owner_of(a: &Action, owned: &HashMap<PathBuf, OwnedMount>) -> Option<Owner> {
    match a {
        Action::MountVolume { volume } | Action::Reconfigure { volume } => {
            Some(Owner::Volume(volume.name.clone()))
        }
        // Best-effort binds (startup volumes) never fail or block their kernel.
        Action::Bind { bind } | Action::Remount { bind } => {
            bind.required.then(|| Owner::Kernel(bind.kernel.clone()))
        }
        Action::MakeDir { owner, .. } => owner.clone(),
        Action::ShareHome { kernel, .. } => Some(Owner::Kernel(kernel.clone())),
        Action::Unmount { target, .. } | Action::Forget { target } | Action::Detach { target } => {
            owned.get(target).map(|m| match &m.kernel {
                Some(k) => Owner::Kernel(k.clone()),
                None => Owner::Volume(m.volume.clone()),
            })
        }
        Action::WriteToken { token } => Some(Owner::Kernel(token.kernel.clone())),
        Action::RemoveDir { .. } | Action::RemoveToken { .. } => None,
    }
}

/// Ownership records staged (written, flushed together) but not yet acted on.
#[derive(Debug, Default)]
struct Staged {
    mounts: std::collections::HashSet<PathBuf>,
    dirs: std::collections::HashSet<PathBuf>,
}

impl Executor {
    /// Builds an executor over `mounter` (the real one, or a test double).
    pub fn new(mounter: Arc<dyn Mounter>, ledger: Ledger, cfg: ExecConfig) -> Self {
        Self {
            mounter,
            ledger,
            cfg,
            mountinfo: None,
            kernels_copy: std::sync::Mutex::new(None),
            no_kernels_copy: std::sync::atomic::AtomicBool::new(false),
            dir_gate: None,
        }
    }

    /// After a helper succeeds, wait (up to the mount timeout) until its mount
    /// shows in `mountinfo`, so the next pass never mounts the target twice.
    pub fn with_mount_wait(mut self, mountinfo: Arc<dyn MountInfoSource>) -> Self {
        self.mountinfo = Some(mountinfo);
        self
    }

    /// Makes a vfolder directory only while `gate(volume mount point)` says
    /// so, checked right before the mkdir (a pass may run long after it
    /// planned the directory).
    pub fn with_dir_gate(mut self, gate: DirGate) -> Self {
        self.dir_gate = Some(gate);
        self
    }

    /// Runs `actions` in order; returns one outcome per action. Actions of an
    /// object in `deferred` (waiting out a retry backoff, with its last error)
    /// are not attempted, nor are the actions that depend on them.
    pub fn execute(
        &self,
        actions: Vec<Action>,
        owned: &HashMap<PathBuf, OwnedMount>,
        deferred: &BTreeMap<Owner, String>,
    ) -> Vec<Outcome> {
        let mut failed_owners: BTreeMap<Owner, String> = BTreeMap::new();
        let mut failed_volume_targets: BTreeSet<PathBuf> = BTreeSet::new();
        let mut out = Vec::with_capacity(actions.len());
        let mut staged = self.stage_records(&actions, owned, deferred);
        for action in actions {
            let owner = owner_of(&action, owned);
            let blocked = owner
                .as_ref()
                .and_then(|o| failed_owners.get(o))
                .cloned()
                .or_else(|| match &action {
                    Action::Bind { bind } => failed_volume_targets
                        .contains(&self.cfg.volumes_root.join(&bind.volume))
                        .then(|| format!("volume {} failed to mount", bind.volume)),
                    Action::MakeDir { root, .. } => failed_volume_targets
                        .contains(root)
                        .then(|| format!("volume at {} failed", root.display())),
                    _ => None,
                });
            let started = std::time::Instant::now();
            let result = match (owner.as_ref().and_then(|o| deferred.get(o)), blocked) {
                (Some(last), _) => Err(ExecError::Deferred(last.clone())),
                (None, Some(why)) => Err(ExecError::Skipped(why)),
                (None, None) => self.run(&action, &mut staged),
            };
            let elapsed = started.elapsed();
            if result.is_err() {
                // A record staged for what did not happen goes again.
                self.unstage(&action, &mut staged);
            }
            if let Err(e) = &result {
                if let Some(o) = &owner {
                    failed_owners
                        .entry(o.clone())
                        .or_insert_with(|| e.to_string());
                }
                if let Action::MountVolume { volume } = &action {
                    failed_volume_targets.insert(volume.target.clone());
                }
                if let Action::MakeDir {
                    owner: Some(Owner::Volume(_)),
                    path,
                    ..
                } = &action
                {
                    failed_volume_targets.insert(path.clone());
                }
            }
            out.push(Outcome {
                fstype: fstype_of(&action, owned),
                elapsed,
                action,
                owner,
                result,
            });
        }
        // Removals are not flushed one by one: make the pass's removals
        // durable together (a failure here only means a record the next
        // pass forgets again).
        if let Err(e) = self.ledger.sync() {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot flush the state store");
        }
        out
    }

    /// Group commit: the ownership records of this batch's binds and new
    /// directories are written together and flushed once, before any of
    /// them is made (instead of one flush each: 40 µs apiece on tmpfs, a
    /// third of a 10,000-attachment burst). A directory is staged only if
    /// it does not exist yet, so nothing someone else made becomes ours.
    fn stage_records(
        &self,
        actions: &[Action],
        owned: &HashMap<PathBuf, OwnedMount>,
        deferred: &BTreeMap<Owner, String>,
    ) -> Staged {
        let mut staged = Staged::default();
        // A record staged now for a target that an earlier action of the
        // batch unmounts or forgets would be erased by it, and the mount
        // made after would have none: those are recorded one by one.
        let released: std::collections::HashSet<&Path> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Unmount { target, .. }
                | Action::Forget { target }
                | Action::Detach { target } => Some(target.as_path()),
                Action::RemoveDir { path } => Some(path.as_path()),
                _ => None,
            })
            .collect();
        let made_again = |a: &Action| match a {
            Action::MakeDir { path, .. } => path.ancestors().any(|p| released.contains(p)),
            a => a.target().is_some_and(|t| released.contains(t)),
        };
        for a in actions {
            if owner_of(a, owned).is_some_and(|o| deferred.contains_key(&o)) || made_again(a) {
                continue;
            }
            let r = match a {
                Action::Bind { bind } => {
                    self.ledger.stage_mount(&self.bind_record(bind)).map(|()| {
                        staged.mounts.insert(bind.target.clone());
                    })
                }
                Action::ShareHome {
                    home,
                    kernel,
                    bind: true,
                } => self
                    .ledger
                    .stage_mount(&home_record(home, kernel))
                    .map(|()| {
                        staged.mounts.insert(home.clone());
                    }),
                Action::MakeDir {
                    path,
                    root,
                    owner: Some(owner),
                    ..
                } => path
                    .ancestors()
                    .take_while(|p| p.starts_with(root) && *p != root.as_path())
                    .take_while(|p| !staged.dirs.contains(*p) && !fsops::is_dir_nofollow(p))
                    .map(|p| p.to_path_buf())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .try_for_each(|p| {
                        self.ledger.stage_dir(&OwnedDir {
                            path: p.clone(),
                            owner: owner.clone(),
                        })?;
                        staged.dirs.insert(p);
                        Ok(())
                    }),
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot stage ownership records; writing them one by one");
                break;
            }
        }
        if !(staged.mounts.is_empty() && staged.dirs.is_empty()) {
            if let Err(e) = self.ledger.sync() {
                // Not durable: forget the staging, write each record before its syscall.
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot flush staged ownership records");
                staged = Staged::default();
            }
        }
        staged
    }

    /// Drops what was staged for an action that did not happen.
    fn unstage(&self, action: &Action, staged: &mut Staged) {
        let r = match action {
            Action::Bind { bind } if staged.mounts.remove(&bind.target) => {
                self.ledger.remove_mount(&bind.target)
            }
            Action::ShareHome { home, .. } if staged.mounts.remove(home) => {
                self.ledger.remove_mount(home)
            }
            Action::MakeDir { path, root, .. } => path
                .ancestors()
                .take_while(|p| *p != root.as_path())
                .filter(|p| staged.dirs.remove(*p))
                // One made before a later component failed stays ours.
                .filter(|p| !fsops::is_dir_nofollow(p))
                .try_for_each(|p| self.ledger.remove_dir(p)),
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot drop a staged ownership record");
        }
    }

    fn run(&self, action: &Action, staged: &mut Staged) -> Result<(), ExecError> {
        match action {
            Action::Unmount { target, .. } => self.unmount(target),
            // MNT_DETACH: a dead mount cannot answer a plain unmount; ownership stays.
            Action::Detach { target } => match self
                .mounter
                .umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
            {
                Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
                Err(errno) => Err(ExecError::UnmountFailed {
                    target: target.clone(),
                    errno,
                }),
            },
            Action::Forget { target } => self.forget(target),
            Action::RemoveDir { path } => {
                let root = if path.starts_with(&self.cfg.kernels_root) {
                    &self.cfg.kernels_root
                } else {
                    &self.cfg.volumes_root
                };
                remove_dir_if_empty(root, path)?;
                Ok(self.ledger.remove_dir(path)?)
            }
            Action::MakeDir {
                path,
                root,
                uid,
                gid,
                owner,
                quota,
            } => {
                if quota.is_some() && self.dir_gate.as_ref().is_some_and(|g| !g(root)) {
                    return Ok(()); // still missing: reported Pending, planned again
                }
                let create = Create {
                    mode: 0o755,
                    uid: *uid,
                    gid: *gid,
                };
                if let Some(q) = quota {
                    if make_subvolume(root, path, create, q)? {
                        return Ok(());
                    }
                }
                // Ownership first: a crash right after mkdir leaves a directory
                // we own (staged and flushed with the batch, or written now).
                let mut record = |p: &Path| match owner {
                    Some(_) if staged.dirs.contains(p) => Ok(()),
                    Some(owner) => self
                        .ledger
                        .put_dir(&OwnedDir {
                            path: p.to_path_buf(),
                            owner: owner.clone(),
                        })
                        .map_err(|e| crate::error::error_chain(&e)),
                    None => Ok(()),
                };
                let made = make_dir(root, path, create, &mut record)?;
                if quota.is_some() && made.iter().any(|m| m == path) {
                    // One line per vfolder, once: an operator (and the
                    // several-storage-nodes test) can tell who made it.
                    tracing::info!(path = %path.display(), "vfolder directory made");
                }
                // Staged components someone else made meanwhile are not ours.
                for p in path.ancestors().take_while(|p| *p != root.as_path()) {
                    if staged.dirs.remove(p) && !made.iter().any(|m| m == p) {
                        self.ledger.remove_dir(p)?;
                    }
                }
                Ok(())
            }
            Action::MountVolume { volume } => self.mount_volume(volume),
            Action::Reconfigure { volume } => self.reconfigure(volume),
            Action::ShareHome { home, kernel, bind } => {
                let recorded = staged.mounts.remove(home);
                self.share_home(home, kernel, *bind, recorded)
            }
            Action::WriteToken { token } => self.write_token(token),
            Action::RemoveToken { path } => self.remove_token(path),
            Action::Bind { bind } => {
                let recorded = staged.mounts.remove(&bind.target);
                self.bind(bind, recorded)
            }
            Action::Remount { bind } => {
                self.remount_bind(bind)?;
                let mut rec = self.bind_record(bind);
                rec.readonly = bind.readonly;
                // The same mount, remounted.
                rec.mount_id = (self.ledger.mounts()?.get(&bind.target)).and_then(|m| m.mount_id);
                Ok(self.ledger.put_mount(&rec)?)
            }
        }
    }

    /// Drops the record of a mount that is not there, unless its helper
    /// still runs (the volume was deleted or the daemon restarted during a
    /// slow mount): then the record stays until the helper exits, so a late
    /// mount is still known as ours.
    /// A FUSE server whose mount is gone serves nothing but still holds its
    /// SAS: it is asked to stop (SIGTERM lets rclone finish its uploads).
    fn forget(&self, target: &Path) -> Result<(), ExecError> {
        let record = self.ledger.mounts()?.get(target).cloned();
        if record
            .as_ref()
            .and_then(|m| m.helper)
            .is_some_and(|h| h.alive())
        {
            return Err(ExecError::Helper {
                target: target.to_path_buf(),
                source: HelperError::StillRunning,
            });
        }
        if let Some(server) = record.and_then(|m| m.server) {
            signal_process(&server, rustix::process::Signal::TERM);
        }
        Ok(self.ledger.remove_mount(target)?)
    }

    /// Whether the mount `at` (an `O_PATH` descriptor) is the one `record`
    /// names; `true` where the record or the kernel names none.
    fn is_recorded(&self, record: &OwnedMount, at: BorrowedFd<'_>) -> bool {
        let Some(stamp) = record.mount_id else {
            return true;
        };
        if crate::reconcile::mountapi::boot_id().is_some_and(|b| b != stamp.boot) {
            return false;
        }
        let ids = self.mounter.mount_ids(at);
        match (stamp.id, ids.unique, stamp.short, ids.short) {
            (Some(a), Some(b), _, _) => a == b,
            (_, _, Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// Refuses to act on `target` by its path unless the mount there is the
    /// one its record names: the plan judged the table, and someone may
    /// have mounted over it since.
    fn check_recorded(&self, target: &Path) -> Result<(), ExecError> {
        let Some(record) = self.ledger.mounts()?.get(target).cloned() else {
            return Ok(());
        };
        if record.mount_id.is_none() {
            return Ok(());
        }
        let root = match record.kind {
            MountKind::Volume => &self.cfg.volumes_root,
            MountKind::Bind | MountKind::Home => &self.cfg.kernels_root,
        };
        match open_dir(root, target, None) {
            Ok((fd, _)) if !self.is_recorded(&record, fd.as_fd()) => Err(ExecError::NotOurs {
                target: target.to_path_buf(),
            }),
            _ => Ok(()),
        }
    }

    fn unmount(&self, target: &Path) -> Result<(), ExecError> {
        self.check_recorded(target)?;
        let server = self.ledger.mounts()?.get(target).and_then(|m| m.server);
        // UMOUNT_NOFOLLOW: never unmount through a symlink someone swapped in.
        match self.mounter.umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {
                // rclone exits once unmounted; one that does not would leak.
                if let Some(server) = server {
                    signal_process(&server, rustix::process::Signal::TERM);
                }
                Ok(self.ledger.remove_mount(target)?)
            }
            Err(errno) => Err(ExecError::UnmountFailed {
                target: target.to_path_buf(),
                errno,
            }),
        }
    }

    /// Kills the FUSE server an earlier attempt started for `target`, if it
    /// still runs without its mount there (frozen, timed out, or started by
    /// a vfolderd killed mid-mount): a second one would stack a mount and
    /// leak a process holding a SAS. Should its mount appear meanwhile, it
    /// is left for the next pass to judge instead of being stacked on.
    fn stop_earlier_server(
        &self,
        earlier: Option<HelperProcess>,
        target: &Path,
    ) -> Result<(), ExecError> {
        let Some(server) = earlier.filter(HelperProcess::alive) else {
            return Ok(());
        };
        tracing::warn!(mount_point = %target.display(), pid = server.pid, "killing the FUSE server of an earlier attempt");
        signal_process(&server, rustix::process::Signal::KILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mounted = self
            .mountinfo
            .as_ref()
            .is_some_and(|mi| mi.read().is_ok_and(|t| t.top(target).is_some()));
        if server.alive() || mounted {
            return Err(ExecError::Helper {
                target: target.to_path_buf(),
                source: HelperError::StillRunning,
            });
        }
        Ok(())
    }

    /// Binds `home` onto itself (nosuid, nodev) and makes it shared, in a
    /// peer group of its own — one kernel's mounts never reach another's
    /// home or an unrelated namespace. With the new mount API the detached
    /// copy is made shared before it is attached; the old way binds from the
    /// private kernels root (a private mount) and `MS_SHARED` follows.
    fn share_home(
        &self,
        home: &Path,
        kernel: &str,
        bind: bool,
        recorded: bool,
    ) -> Result<(), ExecError> {
        // Reading the mount table here, once per home, cost a whole
        // mountinfo read per kernel (2000 attachments: 3,689/s → 71/s).
        if bind && self.bind_home(home, kernel, recorded)? {
            return Ok(());
        }
        // The path now resolves to the new mount's root.
        let (again, _) = open_dir(&self.cfg.kernels_root, home, None)?;
        let record = self.ledger.mounts()?.get(home).cloned();
        if record.is_some_and(|r| !self.is_recorded(&r, again.as_fd())) {
            return Err(ExecError::NotOurs {
                target: home.to_path_buf(),
            });
        }
        self.mounter
            .mount(
                None::<&Path>,
                &fd_path(&again),
                None,
                MsFlags::MS_SHARED,
                None,
            )
            .map_err(|errno| ExecError::MountFailed {
                target: home.to_path_buf(),
                errno,
            })
    }

    /// The bind of [`Executor::share_home`], its record written first
    /// (unless flushed with the batch, `recorded`); whether it is shared
    /// already (made whole with the new mount API).
    fn bind_home(&self, home: &Path, kernel: &str, recorded: bool) -> Result<bool, ExecError> {
        let failed = |errno| ExecError::MountFailed {
            target: home.to_path_buf(),
            errno,
        };
        let target = match open_dir(&self.cfg.kernels_root, home, None) {
            Ok((target, _)) => target,
            Err(e) => {
                if recorded {
                    self.ledger.remove_mount(home)?;
                }
                return Err(e.into());
            }
        };
        let copied = self.home_in_copy(home, target.as_fd());
        let source = copied.as_ref().map_or(target.as_fd(), |c| c.as_fd());
        if !recorded {
            self.ledger.put_mount(&home_record(home, kernel))?;
        }
        let shared = crate::reconcile::newmount::BindAttrs {
            shared: true,
            ..Default::default()
        };
        let bound = match self.mounter.bind_atomic(source, target.as_fd(), shared) {
            Ok(id) => {
                self.stamp(&self.cfg.kernels_root, home, id);
                return Ok(true);
            }
            Err(Errno::ENOSYS) => {
                match self.bind_old_way(target.as_fd(), target.as_fd(), home, MsFlags::empty()) {
                    // A bind without nosuid,nodev that could not be undone: the
                    // record stays (the mount is ours, and goes with its kernel).
                    Err((errno, true)) => return Err(failed(errno)),
                    r => r.map_err(|(errno, _)| errno),
                }
            }
            Err(errno) => Err(errno),
        };
        if let Err(errno) = bound {
            self.ledger.remove_mount(home)?;
            return Err(failed(errno));
        }
        self.stamp(&self.cfg.kernels_root, home, Default::default());
        Ok(false)
    }

    /// The home inside a detached copy of the kernels root's mount, which
    /// has no mounts below it, to bind it from (binding from the kernels
    /// root itself made each new home cost a walk over every home mounted
    /// before, see [`crate::reconcile::newmount::detached_copy`]); `None`
    /// where no copy can be made or it is not the directory at `target`
    /// (the home bound from its live path then).
    fn home_in_copy(&self, home: &Path, target: BorrowedFd<'_>) -> Option<OwnedFd> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.no_kernels_copy.load(Relaxed) {
            return None;
        }
        let mut slot = self.kernels_copy.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match self.mounter.detached_copy(&self.cfg.kernels_root) {
                Ok(copy) => *slot = Some(copy),
                Err(errno) => {
                    if matches!(errno, Errno::ENOSYS | Errno::EINVAL | Errno::EPERM) {
                        self.no_kernels_copy.store(true, Relaxed);
                    }
                    tracing::debug!(%errno, "no detached copy of the kernels root; homes are bound from their live path");
                    return None;
                }
            }
        }
        let copy = slot.as_ref()?;
        let found = open_dir_below(copy.as_fd(), &self.cfg.kernels_root, home).ok();
        match found.filter(|fd| fsops::same_dir(fd.as_fd(), target)) {
            Some(fd) => Some(fd),
            None => {
                // Another filesystem or a mount on the way: made anew next time.
                *slot = None;
                None
            }
        }
    }

    /// The bind the old way (kernels before 5.12): `MS_BIND` of `source`
    /// onto `target` (ignoring every other flag, mount(2) "Creating a bind
    /// mount"), then `MS_REMOUNT|MS_BIND` with nosuid, nodev and `extra` on
    /// `path` opened again (it now resolves to the bind's root); undone if
    /// the remount fails. The error says whether the bind is still there
    /// (the undo failed too).
    fn bind_old_way(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        path: &Path,
        extra: MsFlags,
    ) -> Result<(), (Errno, bool)> {
        self.mounter
            .mount(
                Some(&fd_path(source)),
                &fd_path(target),
                None,
                MsFlags::MS_BIND,
                None,
            )
            .map_err(|errno| (errno, false))?;
        let flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra;
        let remounted = open_dir(&self.cfg.kernels_root, path, None)
            .map_err(|_| Errno::ENOENT)
            .and_then(|(again, _)| {
                self.mounter
                    .mount(None::<&Path>, &fd_path(&again), None, flags, None)
            });
        if let Err(errno) = remounted {
            // Never leave a mount without nosuid,nodev (invariant 6).
            let undone = self.mounter.umount2(path, MntFlags::UMOUNT_NOFOLLOW);
            return Err((errno, undone.is_err()));
        }
        Ok(())
    }

    /// Applies changed options to the live mount (tmpfs: `MS_REMOUNT` with
    /// the mount's flags, as a bare remount would clear nosuid and nodev;
    /// cifs: its helper's remount); the mount, its binds and files stay.
    fn reconfigure(&self, v: &WantVolume) -> Result<(), ExecError> {
        if v.fstype == Fstype::Cifs {
            self.reconfigure_with_helper(v)?;
        } else {
            self.remount_in_place(v)?;
        }
        let mut record = self
            .ledger
            .mounts()?
            .get(&v.target)
            .cloned()
            .unwrap_or_else(|| volume_record(v));
        record.options = Some(v.options.clone());
        Ok(self.ledger.put_mount(&record)?)
    }

    /// `mount -t cifs -o remount,...` with every option of a first mount
    /// (credentials included: the kernel refuses another user or password
    /// on a live session, and takes the cache and size options).
    fn reconfigure_with_helper(&self, v: &WantVolume) -> Result<(), ExecError> {
        self.run_mount_helper(v, "remount,", &mut |_| {})
    }

    /// The tmpfs way: `MS_REMOUNT` with the mount's flags and the new data.
    fn remount_in_place(&self, v: &WantVolume) -> Result<(), ExecError> {
        let (fd, _) = open_dir(&self.cfg.volumes_root, &v.target, None)?;
        let (mut flags, data) = split_flags(&v.options);
        if v.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        self.mounter
            .mount(
                None::<&Path>,
                &fd_path(&fd),
                None,
                flags | MsFlags::MS_REMOUNT,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|errno| ExecError::MountFailed {
                target: v.target.clone(),
                errno,
            })
    }

    fn mount_volume(&self, v: &WantVolume) -> Result<(), ExecError> {
        let record = OwnedMount {
            credentials_stamp: v
                .credentials
                .as_ref()
                .and_then(|n| crate::secret::file_stamp(&self.cfg.credentials_dir.join(n))),
            ..volume_record(v)
        };
        // A helper an earlier run of vfolderd started (before a crash or
        // restart) may still be mounting: a second one would stack.
        let earlier = self.ledger.mounts()?.get(&v.target).cloned();
        if earlier
            .as_ref()
            .and_then(|m| m.helper)
            .is_some_and(|h| h.alive())
        {
            return Err(ExecError::Helper {
                target: v.target.clone(),
                source: HelperError::StillRunning,
            });
        }
        self.stop_earlier_server(earlier.and_then(|m| m.server), &v.target)?;
        // Intent first: if we crash after mounting, the mount is still ours.
        self.ledger.put_mount(&record)?;
        let result = if v.fstype == Fstype::AzureBlob {
            self.mount_blob(v, &record)
        } else {
            self.mount_volume_inner(v, &record)
        };
        match &result {
            // A timed-out helper may still finish: keep the record, so a late
            // mount is adopted as ours instead of becoming an unowned one.
            Err(ExecError::Helper {
                source: HelperError::Timeout(_) | HelperError::StillRunning,
                ..
            }) => {}
            Err(_) => self.ledger.remove_mount(&v.target)?,
            // The helper is done: its pid no longer describes the mount.
            Ok(()) if v.fstype != Fstype::AzureBlob => self.ledger.put_mount(&record)?,
            Ok(()) => {}
        }
        if result.is_ok() {
            self.stamp(&self.cfg.volumes_root, &v.target, Default::default());
        }
        result
    }

    /// Names in the ledger the mount just made at `target` by the kernel's
    /// ids for it: `ids` as read from the detached mount before it was
    /// attached, or else asked of the path (opened below `root` without
    /// following a symlink) right after mounting. Where the kernel has no
    /// ids the record is judged by its path.
    fn stamp(&self, root: &Path, target: &Path, ids: MountIds) {
        let ids = if ids == MountIds::default() {
            open_dir(root, target, None)
                .map(|(fd, _)| self.mounter.mount_ids(fd.as_fd()))
                .unwrap_or_default()
        } else {
            ids
        };
        let Some(boot) = crate::reconcile::mountapi::boot_id() else {
            return;
        };
        if ids == MountIds::default() {
            return;
        }
        let stamp = crate::state::ledger::MountStamp {
            boot,
            id: ids.unique,
            short: ids.short,
        };
        if let Err(e) = self.ledger.stamp_mount(target, stamp) {
            tracing::warn!(mount_point = %target.display(), error = %crate::error::error_chain(&e), "cannot record the id of a new mount");
        }
    }

    fn mount_volume_inner(&self, v: &WantVolume, record: &OwnedMount) -> Result<(), ExecError> {
        let (target_fd, _) = open_dir(&self.cfg.volumes_root, &v.target, None)?;
        let target = fd_path(&target_fd);
        let (flags, data) = split_flags(&v.options);
        let data = (!data.is_empty()).then_some(data);
        let mount_err = |errno| ExecError::MountFailed {
            target: v.target.clone(),
            errno,
        };
        match &v.fstype {
            Fstype::Tmpfs => self
                .mounter
                .mount(
                    Some(Path::new(&v.source)),
                    &target,
                    Some("tmpfs"),
                    flags,
                    data.as_deref(),
                )
                .map_err(mount_err),
            Fstype::Bind => {
                // Beneath the policy's directory nothing is followed: a
                // symlink someone put there cannot take the bind out of it.
                let (source, _) = open_dir(&v.anchor, Path::new(&v.source), None)?;
                self.mounter
                    .mount(
                        Some(&fd_path(&source)),
                        &target,
                        None,
                        MsFlags::MS_BIND,
                        None,
                    )
                    .map_err(mount_err)?;
                let (fd, _) = open_dir(&self.cfg.volumes_root, &v.target, None)?;
                self.mounter
                    .mount(
                        None::<&Path>,
                        &fd_path(&fd),
                        None,
                        flags | MsFlags::MS_REMOUNT | MsFlags::MS_BIND,
                        None,
                    )
                    .map_err(mount_err)
            }
            _ => self.mount_with_helper(v, record),
        }
    }

    /// cifs, nfs and friends go through `mount -t`, whose argv is visible to
    /// every user in /proc: secrets move into a 0600 file first.
    fn mount_with_helper(&self, v: &WantVolume, record: &OwnedMount) -> Result<(), ExecError> {
        // The helper's pid goes into the ownership record (flushed) as soon
        // as it runs, so a restart during a slow mount waits for it.
        let mut spawned = |pid: u32| {
            let helper = HelperProcess::of(pid);
            let with_pid = OwnedMount {
                helper,
                ..record.clone()
            };
            if let Err(e) = self.ledger.put_mount(&with_pid) {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot record the mount helper's pid");
            }
        };
        self.run_mount_helper(v, "", &mut spawned)?;
        self.wait_until_mounted(&v.target)
    }

    /// `mount -t <fstype> -o <first><options> -- source target`, its
    /// temporary credentials file removed once it is done.
    fn run_mount_helper(
        &self,
        v: &WantVolume,
        first: &str,
        spawned: &mut dyn FnMut(u32),
    ) -> Result<(), ExecError> {
        let (options, temp_file) = self.helper_options(v)?;
        let req = HelperRequest {
            fstype: v.fstype.to_string(),
            source: v.source.clone(),
            target: v.target.clone(),
            options: format!("{first}{options}"),
            timeout: self.cfg.mount_timeout,
        };
        let result = self.mounter.run_helper_recorded(&req, spawned);
        if let Some(p) = temp_file {
            let _ = std::fs::remove_file(p);
        }
        result.map_err(|source| ExecError::Helper {
            target: v.target.clone(),
            source,
        })
    }

    /// The `-o` string of a helper mount of `v` (secrets moved to a file,
    /// cifs defaults added, nosuid,nodev last), and the temporary
    /// credentials file to remove once the helper is done.
    fn helper_options(&self, v: &WantVolume) -> Result<(String, Option<PathBuf>), ExecError> {
        let mut options: Vec<String> = Vec::new();
        let mut secrets: Vec<String> = Vec::new();
        // nosuid,nodev go last, once, whatever the policy put in the options.
        for o in v
            .options
            .iter()
            .filter(|o| !matches!(o.as_str(), "nosuid" | "nodev"))
        {
            let key = o.split('=').next().unwrap_or_default().to_ascii_lowercase();
            if v.fstype == Fstype::Cifs
                && matches!(
                    key.as_str(),
                    "username" | "user" | "password" | "pass" | "password2" | "domain"
                )
            {
                let k = match key.as_str() {
                    "user" => "username",
                    "pass" => "password",
                    k => k,
                };
                secrets.push(format!("{k}={}", o.split_once('=').map_or("", |(_, v)| v)));
            } else {
                options.push(o.clone());
            }
        }
        let mut temp_file = None;
        if v.fstype == Fstype::Cifs {
            // What the Azure Files CSI driver sets when the options do not:
            // SMB 3.0, 30 s attribute cache, symlinks emulated (Azure Files has none).
            // And the volume's owner, so the kernel's user can write: files
            // appear as theirs, whoever the server says owns them.
            let (uid, gid) = (
                format!("uid={}", v.owner.uid),
                format!("gid={}", v.owner.gid),
            );
            for (key, default) in [
                ("vers", "vers=3.0"),
                ("actimeo", "actimeo=30"),
                ("mfsymlinks", "mfsymlinks"),
                ("uid", uid.as_str()),
                ("gid", gid.as_str()),
                ("forceuid", "forceuid"),
                ("forcegid", "forcegid"),
                ("dir_mode", "dir_mode=0755"),
                ("file_mode", "file_mode=0644"),
            ] {
                if !options.iter().any(|o| o.split('=').next() == Some(key)) {
                    options.push(default.to_string());
                }
            }
        }
        if let Some(name) = &v.credentials {
            let path =
                crate::secret::secret_file(&self.cfg.credentials_dir, name).map_err(|message| {
                    ExecError::Credentials {
                        name: name.clone(),
                        message,
                    }
                })?;
            options.push(format!("credentials={}", path.display()));
        } else if !secrets.is_empty() {
            let path = self.write_temp_credentials(&v.name, &secrets)?;
            options.push(format!("credentials={}", path.display()));
            temp_file = Some(path);
        }
        options.push("nosuid".into());
        options.push("nodev".into());
        // A comma inside an option goes back to mount's `,,` escape.
        let options: Vec<String> = options.iter().map(|o| o.replace(',', ",,")).collect();
        Ok((options.join(","), temp_file))
    }

    fn wait_until_mounted(&self, target: &Path) -> Result<(), ExecError> {
        let Some(mi) = &self.mountinfo else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + self.cfg.mount_timeout;
        loop {
            if mi.read().is_ok_and(|t| t.top(target).is_some()) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(ExecError::Helper {
                    target: target.to_path_buf(),
                    source: HelperError::Timeout(self.cfg.mount_timeout),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mounts a blob container with `rclone mount`: a fresh container SAS
    /// (read+list for a read-only volume) goes to rclone in its environment,
    /// never on its command line. The server's pid goes into the ownership
    /// record as soon as it runs, with the SAS's expiry once it is mounted.
    fn mount_blob(&self, v: &WantVolume, record: &OwnedMount) -> Result<(), ExecError> {
        use crate::azure::{
            container_client, container_sas, ensure_container, read_account_key, Access,
            BlobLocation,
        };
        let loc = BlobLocation::parse(&v.source)?;
        let key = read_account_key(
            &self.cfg.credentials_dir,
            v.credentials.as_deref().unwrap_or_default(),
        )?;
        let client = container_client(&loc, &key);
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ExecError::Unsupported("azureblob outside the daemon's runtime".into()))?;
        if v.create {
            rt.block_on(ensure_container(&client))?;
        }
        let access = if v.readonly {
            Access::Read
        } else {
            Access::Write
        };
        let sas = rt.block_on(container_sas(&client, access, self.cfg.sas_lifetime))?;
        let (fd, _) = open_dir(&self.cfg.volumes_root, &v.target, None)?;
        drop(fd); // the target exists and is a plain directory inside the root
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.run_dir)
            .map_err(|e| ExecError::Credentials {
                name: v.name.clone(),
                message: e.to_string(),
            })?;
        let log = self.cfg.run_dir.join(format!("rclone-{}.log", v.name));
        let mut args: Vec<String> = vec![
            "mount".into(),
            "--allow-other".into(),
            // Files appear as the volume's owner, writable by them.
            "--uid".into(),
            v.owner.uid.to_string(),
            "--gid".into(),
            v.owner.gid.to_string(),
            "--umask".into(),
            "022".into(),
            "--dir-cache-time".into(),
            "10s".into(),
            "--log-file".into(),
            log.display().to_string(),
            "--cache-dir".into(),
            self.cfg
                .run_dir
                .join(format!("rclone-cache-{}", v.name))
                .display()
                .to_string(),
        ];
        if v.readonly {
            args.push("--read-only".into());
        } else {
            args.extend(["--vfs-cache-mode".into(), "writes".into()]);
        }
        // `--`, then the positionals: none can be read as a flag. A container
        // SAS is scoped to the account's root: name the container.
        args.extend([
            "--".into(),
            format!("vfd:{}", loc.container),
            v.target.display().to_string(),
        ]);
        let req = ServerRequest {
            program: self.cfg.rclone.clone(),
            args,
            env: vec![
                (
                    "RCLONE_CONFIG_VFD_TYPE".into(),
                    crate::secret::Secret::new("azureblob"),
                ),
                ("RCLONE_CONFIG_VFD_SAS_URL".into(), sas.url),
            ],
            target: v.target.clone(),
            log,
            timeout: self.cfg.mount_timeout,
        };
        let mut server = None;
        let mut spawned = |pid: u32| {
            server = HelperProcess::of(pid);
            let with_pid = OwnedMount {
                server,
                ..record.clone()
            };
            if let Err(e) = self.ledger.put_mount(&with_pid) {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot record the FUSE server's pid");
            }
        };
        let mounted = || {
            self.mountinfo
                .as_ref()
                .is_none_or(|mi| mi.read().is_ok_and(|t| t.top(&v.target).is_some()))
        };
        self.mounter
            .start_server(&req, &mut spawned, &mounted)
            .map_err(|source| ExecError::Helper {
                target: v.target.clone(),
                source,
            })?;
        let expires_at = sas
            .expires
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        Ok(self.ledger.put_mount(&OwnedMount {
            expires_at,
            server,
            ..record.clone()
        })?)
    }

    /// Writes a per-user SAS URL to `<home>/.vfolderd/sas/<volume>`: 0600,
    /// owned by the kernel's uid/gid, created under a temporary name and
    /// renamed into place, every path component opened without following
    /// symlinks (the home belongs to the user).
    fn write_token(&self, t: &WantToken) -> Result<(), ExecError> {
        use crate::azure::{
            container_client, container_sas, read_account_key, Access, BlobLocation,
        };
        use nix::fcntl::{openat, renameat, OFlag};
        use nix::sys::stat::Mode;
        use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};
        use std::os::fd::AsFd;

        let loc = BlobLocation::parse(&t.source)?;
        let key = read_account_key(
            &self.cfg.credentials_dir,
            t.credentials.as_deref().unwrap_or_default(),
        )?;
        let client = container_client(&loc, &key);
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ExecError::Unsupported("tokens outside the daemon's runtime".into()))?;
        let access = if t.write { Access::Write } else { Access::Read };
        let sas = rt.block_on(container_sas(&client, access, self.cfg.token_lifetime))?;
        let expires_at = sas
            .expires
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (Some(dir), Some(name)) = (t.path.parent(), t.path.file_name()) else {
            return Err(ExecError::Fs(FsError::OutsideRoot {
                path: t.path.clone(),
                root: self.cfg.kernels_root.clone(),
            }));
        };
        // Ownership first: a crash after writing leaves a file we know to remove.
        self.ledger.put_token(&OwnedToken {
            path: t.path.clone(),
            kernel: t.kernel.clone(),
            volume: t.volume.clone(),
            expires_at,
        })?;
        let owner = Owner::Kernel(t.kernel.clone());
        let mut record = |p: &Path| {
            self.ledger
                .put_dir(&OwnedDir {
                    path: p.to_path_buf(),
                    owner: owner.clone(),
                })
                .map_err(|e| crate::error::error_chain(&e))
        };
        make_dir(
            &self.cfg.kernels_root,
            dir,
            Create {
                mode: 0o700,
                uid: t.uid,
                gid: t.gid,
            },
            &mut record,
        )?;
        let (dfd, _) = open_dir(&self.cfg.kernels_root, dir, None)?;
        let sys = |op: &'static str| {
            let path = t.path.clone();
            move |errno| ExecError::Fs(FsError::Sys { op, path, errno })
        };
        let tmp = format!(".{}.tmp", name.to_string_lossy());
        match unlinkat(dfd.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(sys("unlink")(e)),
        }
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            dfd.as_fd(),
            tmp.as_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(sys("create"))?;
        if t.uid.is_some() || t.gid.is_some() {
            fchown(
                fd.as_fd(),
                t.uid.map(Uid::from_raw),
                t.gid.map(Gid::from_raw),
            )
            .map_err(sys("chown"))?;
        }
        let mut file = std::fs::File::from(fd);
        file.write_all(format!("{}\n", sas.url.expose()).as_bytes())
            .map_err(|e| sys("write")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
        file.sync_all()
            .map_err(|e| sys("fsync")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
        renameat(dfd.as_fd(), tmp.as_str(), dfd.as_fd(), name).map_err(sys("rename"))?;
        Ok(())
    }

    fn remove_token(&self, path: &Path) -> Result<(), ExecError> {
        use nix::unistd::{unlinkat, UnlinkatFlags};
        use std::os::fd::AsFd;
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            match open_dir(&self.cfg.kernels_root, dir, None) {
                Ok((dfd, _)) => match unlinkat(dfd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(errno) => {
                        return Err(ExecError::Fs(FsError::Sys {
                            op: "unlink",
                            path: path.to_path_buf(),
                            errno,
                        }))
                    }
                },
                Err(FsError::Missing { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.ledger.remove_token(path)?)
    }

    fn write_temp_credentials(&self, volume: &str, lines: &[String]) -> Result<PathBuf, ExecError> {
        let err = |e: std::io::Error| ExecError::Credentials {
            name: volume.to_string(),
            message: e.to_string(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.run_dir)
            .map_err(err)?;
        let path = self.cfg.run_dir.join(format!("credentials-{volume}"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        f.write_all(format!("{}\n", lines.join("\n")).as_bytes())
            .map_err(err)?;
        Ok(path)
    }

    fn bind_record(&self, b: &WantBind) -> OwnedMount {
        bind_record(b)
    }

    /// Binds `b`; its ownership record is written first, or was staged and
    /// flushed with the batch (`recorded`), and goes again on failure.
    fn bind(&self, b: &WantBind, recorded: bool) -> Result<(), ExecError> {
        let opened = open_dir(&self.cfg.volumes_root, &b.source, None)
            .map_err(|e| match e {
                FsError::Missing { .. } => ExecError::SourceMissing(b.source.clone()),
                e => e.into(),
            })
            .and_then(|(src, _)| {
                let (tgt, _) = open_dir(&self.cfg.kernels_root, &b.target, None)?;
                Ok((src, tgt))
            });
        let (src, tgt) = match opened {
            Ok(fds) => fds,
            Err(e) => {
                if recorded {
                    self.ledger.remove_mount(&b.target)?;
                }
                return Err(e);
            }
        };
        if !recorded {
            self.ledger.put_mount(&self.bind_record(b))?;
        }
        let attrs = crate::reconcile::newmount::BindAttrs {
            readonly: b.readonly,
            idmap: b.idmap,
            shared: false,
        };
        match self.mounter.bind_atomic(
            std::os::fd::AsFd::as_fd(&src),
            std::os::fd::AsFd::as_fd(&tgt),
            attrs,
        ) {
            Ok(id) => {
                self.stamp(&self.cfg.kernels_root, &b.target, id);
                return Ok(());
            }
            Err(Errno::ENOSYS) if b.idmap.is_some() => {
                self.ledger.remove_mount(&b.target)?;
                return Err(ExecError::Unsupported(
                    "an idmapped bind (the kernel runs as another uid than the volume's owner) needs Linux 5.12+ (mount_setattr)".into(),
                ));
            }
            Err(Errno::ENOSYS) => {} // before Linux 5.12: the old way below
            Err(errno) => {
                self.ledger.remove_mount(&b.target)?;
                return Err(ExecError::MountFailed {
                    target: b.target.clone(),
                    errno,
                });
            }
        }
        let ro = if b.readonly {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        match self.bind_old_way(src.as_fd(), tgt.as_fd(), &b.target, ro) {
            Ok(()) => {
                self.stamp(&self.cfg.kernels_root, &b.target, Default::default());
                Ok(())
            }
            // Still bound (the undo failed): the record stays with it.
            Err((errno, true)) => Err(ExecError::MountFailed {
                target: b.target.clone(),
                errno,
            }),
            Err((errno, false)) => {
                self.ledger.remove_mount(&b.target)?;
                Err(ExecError::MountFailed {
                    target: b.target.clone(),
                    errno,
                })
            }
        }
    }

    fn remount_bind(&self, b: &WantBind) -> Result<(), ExecError> {
        // Re-open: the path now resolves to the bind's root, not the directory below it.
        let (tgt, _) = open_dir(&self.cfg.kernels_root, &b.target, None)?;
        // The remount acts on the mount of this very descriptor.
        let record = self.ledger.mounts()?.get(&b.target).cloned();
        if record.is_some_and(|r| !self.is_recorded(&r, tgt.as_fd())) {
            return Err(ExecError::NotOurs {
                target: b.target.clone(),
            });
        }
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if b.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        self.mounter
            .mount(None::<&Path>, &fd_path(&tgt), None, flags, None)
            .map_err(|errno| ExecError::MountFailed {
                target: b.target.clone(),
                errno,
            })
    }
}

/// Which of `paths` are directories (symlinks not followed). A mount point
/// in `mounts` and every ancestor of one exist without asking the kernel:
/// on a converged node that is nearly every path, so a pass does not stat
/// 20,000 paths to learn nothing.
pub fn observe_dirs(
    paths: &[PathBuf],
    mounts: &crate::reconcile::actual::MountTable,
) -> std::collections::HashSet<PathBuf> {
    let mut known: std::collections::HashSet<&Path> = std::collections::HashSet::new();
    for p in paths.iter().filter(|p| mounts.top(p).is_some()) {
        for a in p.ancestors() {
            if !known.insert(a) {
                break;
            }
        }
    }
    paths
        .iter()
        .filter(|p| known.contains(p.as_path()) || fsops::is_dir_nofollow(p))
        .cloned()
        .collect()
}

/// A message fit for status: secrets redacted.
pub fn status_message(e: &ExecError) -> String {
    redact(&crate::error::error_chain(e))
}

/// A vfolder directory on btrfs with quotas enabled: its parents made as
/// usual, itself a subvolume with the quota's limit. `Ok(false)` where the
/// filesystem does not enforce quotas (then a plain directory is made).
fn make_subvolume(
    root: &Path,
    path: &Path,
    create: Create,
    q: &crate::reconcile::plan::QuotaAsk,
) -> Result<bool, ExecError> {
    let (Some(parent), Some(leaf)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(false);
    };
    let made = make_dir(root, parent, create, &mut |_| Ok(()))?;
    drop(made);
    let (pfd, _) = crate::reconcile::fsops::open_dir(root, parent, None)?;
    // ioctls need a descriptor opened for real, not O_PATH.
    let flags =
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC;
    let dir = nix::fcntl::openat(pfd.as_fd(), ".", flags, nix::sys::stat::Mode::empty()).map_err(
        |errno| {
            ExecError::Fs(FsError::Sys {
                op: "open",
                path: parent.to_path_buf(),
                errno,
            })
        },
    )?;
    let owner = (create.uid.unwrap_or(0), create.gid.unwrap_or(0));
    match crate::reconcile::btrfs::make_limited(dir.as_fd(), leaf, owner, q.bytes) {
        Ok(true) => {
            tracing::info!(path = %path.display(), "vfolder directory made (a subvolume)");
            Ok(true)
        }
        Ok(false) => Ok(false),
        Err(Errno::EEXIST) => Ok(true),
        Err(errno) => Err(ExecError::Fs(FsError::Sys {
            op: "create subvolume",
            path: path.to_path_buf(),
            errno,
        })),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_helper_error_names_its_cause_once() {
        let e = ExecError::Helper {
            target: PathBuf::from("/v/a"),
            source: HelperError::Failed {
                code: 32,
                stderr: "mount error(13): Permission denied".into(),
            },
        };
        let chain = crate::error::error_chain(&e);
        assert_eq!(
            chain,
            "mount /v/a: mount helper exited with 32: mount error(13): Permission denied"
        );
        assert_eq!(status_message(&e), chain);
        assert_eq!(chain.matches("Permission denied").count(), 1);
    }

    use super::*;
    use crate::reconcile::sys::{Call, CallKind, RecordingMounter};
    use crate::spec::MountAt;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        mounter: Arc<RecordingMounter>,
        ledger: Ledger,
        exec: Executor,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mounter = Arc::new(RecordingMounter::default());
        let ledger = Ledger::open(&root.join("db")).unwrap();
        let cfg = ExecConfig {
            volumes_root: root.join("v"),
            kernels_root: root.join("k"),
            credentials_dir: root.join("creds"),
            run_dir: root.join("run"),
            mount_timeout: Duration::from_secs(5),
            sas_lifetime: Duration::from_secs(3600),
            token_lifetime: Duration::from_secs(3600),
            rclone: "rclone".into(),
        };
        std::fs::create_dir_all(&cfg.volumes_root).unwrap();
        std::fs::create_dir_all(&cfg.kernels_root).unwrap();
        let exec = Executor::new(mounter.clone(), ledger.clone(), cfg);
        Fixture {
            _dir: dir,
            root,
            mounter,
            ledger,
            exec,
        }
    }

    fn bind(f: &Fixture, readonly: bool) -> WantBind {
        std::fs::create_dir_all(f.root.join("v/vol/ab/cd/abcd")).unwrap();
        std::fs::create_dir_all(f.root.join("k/k1/work/data")).unwrap();
        WantBind {
            target: f.root.join("k/k1/work/data"),
            kernel: "k1".into(),
            volume: "vol".into(),
            source: f.root.join("v/vol/ab/cd/abcd"),
            readonly,
            label: "vfolder:x".into(),
            required: true,
            idmap: None,
        }
    }

    /// Issue 14 item 6: a storage node that may not act on a volume (not
    /// its leader, or fenced) leaves its vfolder directories to the next pass.
    #[test]
    fn a_fenced_storage_node_makes_no_vfolder_directory_until_the_gate_opens() {
        let f = fixture();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate_open = open.clone();
        let volume = f.root.join("v/vol");
        std::fs::create_dir_all(&volume).unwrap();
        let asked = Arc::new(std::sync::Mutex::new(Vec::<PathBuf>::new()));
        let seen = asked.clone();
        let exec = Executor::new(f.mounter.clone(), f.ledger.clone(), f.exec.cfg.clone())
            .with_dir_gate(Arc::new(move |root: &Path| {
                seen.lock().unwrap().push(root.to_path_buf());
                gate_open.load(std::sync::atomic::Ordering::Relaxed)
            }));
        let path = volume.join("ab/cd/abcd");
        let make = || Action::MakeDir {
            path: path.clone(),
            root: volume.clone(),
            uid: None,
            gid: None,
            owner: None,
            quota: Some(crate::reconcile::plan::QuotaAsk { bytes: None }),
        };
        let out = exec.execute(vec![make()], &HashMap::new(), &BTreeMap::new());
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        assert!(!path.exists(), "made while fenced");
        assert_eq!(
            *asked.lock().unwrap(),
            vec![volume.clone()],
            "asked with the volume's mount point"
        );
        open.store(true, std::sync::atomic::Ordering::Relaxed);
        let out = exec.execute(vec![make()], &HashMap::new(), &BTreeMap::new());
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        assert!(path.is_dir());
        // A kernel's directories (no quota ask) never ask the gate.
        let home = f.root.join("k/k1/work");
        let mkhome = Action::MakeDir {
            path: home.clone(),
            root: f.root.join("k"),
            uid: None,
            gid: None,
            owner: None,
            quota: None,
        };
        open.store(false, std::sync::atomic::Ordering::Relaxed);
        let out = exec.execute(vec![mkhome], &HashMap::new(), &BTreeMap::new());
        assert!(out[0].result.is_ok() && home.is_dir());
    }

    /// Issue 13 item 2: a read-only bind was made rw (MS_BIND) and then
    /// remounted ro: writable, and without nosuid, in between. With the new
    /// mount API it is one call that attaches a finished read-only bind.
    #[test]
    fn with_the_new_mount_api_a_read_only_bind_is_one_atomic_call() {
        let mut f = fixture();
        let mounter = Arc::new(RecordingMounter::with_atomic_binds());
        f.exec = Executor::new(mounter.clone(), f.ledger.clone(), f.exec.cfg.clone());
        let out = f.exec.execute(
            vec![Action::Bind {
                bind: bind(&f, true),
            }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        assert_eq!(
            mounter.calls(),
            vec![Call::AtomicBind {
                readonly: true,
                idmap: false,
                shared: false,
            }],
            "no MS_BIND, no remount"
        );
        let owned = f.ledger.mounts().unwrap();
        let record = &owned[&f.root.join("k/k1/work/data")];
        // Named by the ids the kernel gave the mount (the double's first).
        let stamp = record.mount_id.expect("the record names its mount");
        assert_eq!((stamp.id, stamp.short), (Some(1 << 31 | 1), Some(1)));
        assert_eq!(Some(stamp.boot), crate::reconcile::mountapi::boot_id());
    }

    /// Review finding: a batch that unmounts a target and binds it again
    /// (a bind whose source changed) staged the new record first, the
    /// unmount erased it, and the new bind was left with no record.
    #[test]
    fn a_target_unmounted_and_bound_again_in_one_batch_keeps_its_record() {
        let f = fixture();
        let b = bind(&f, false);
        let old = OwnedMount {
            source: "/elsewhere".into(),
            ..bind_record(&b)
        };
        f.ledger.put_mount(&old).unwrap();
        let owned = f.ledger.mounts().unwrap();
        let out = f.exec.execute(
            vec![
                Action::Unmount {
                    target: b.target.clone(),
                    kind: MountKind::Bind,
                },
                Action::Bind { bind: b.clone() },
            ],
            &owned,
            &BTreeMap::new(),
        );
        assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
        let now = f.ledger.mounts().unwrap();
        assert_eq!(
            now.get(&b.target),
            Some(&bind_record(&b)),
            "the new bind is recorded"
        );
    }

    /// Before Linux 5.12 (no `mount_setattr`): bind, then remount.
    #[test]
    fn bind_is_ms_bind_then_a_remount_with_nosuid_nodev_ro() {
        let f = fixture();
        let out = f.exec.execute(
            vec![Action::Bind {
                bind: bind(&f, true),
            }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        let calls = f.mounter.calls();
        assert_eq!(calls.len(), 2);
        let Call::Mount {
            flags: f1,
            source: Some(_),
            ..
        } = &calls[0]
        else {
            panic!("{calls:?}")
        };
        assert_eq!(*f1, MsFlags::MS_BIND);
        let Call::Mount {
            flags: f2,
            source: None,
            target,
            ..
        } = &calls[1]
        else {
            panic!("{calls:?}")
        };
        assert!(
            target.starts_with("/proc/self/fd/"),
            "acts on the opened directory, not a path"
        );
        assert_eq!(
            *f2,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_RDONLY
        );
        assert!(
            f.ledger
                .mounts()
                .unwrap()
                .contains_key(&f.root.join("k/k1/work/data")),
            "owned"
        );
    }

    #[test]
    fn a_bind_whose_remount_fails_is_undone_and_not_owned() {
        let f = fixture();
        let b = bind(&f, false);
        // The MS_BIND succeeds, the remount that adds nosuid,nodev fails.
        f.mounter.fail_after(CallKind::Mount, 1, Errno::EPERM, 1);
        let out = f.exec.execute(
            vec![Action::Bind { bind: b.clone() }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(
            matches!(
                out[0].result,
                Err(ExecError::MountFailed {
                    errno: Errno::EPERM,
                    ..
                })
            ),
            "{:?}",
            out[0].result
        );
        let calls = f.mounter.calls();
        assert!(
            matches!(calls.last(), Some(Call::Umount2 { target, .. }) if *target == b.target),
            "undone: {calls:?}"
        );
        assert!(
            f.ledger.mounts().unwrap().is_empty(),
            "no ownership of a mount that failed"
        );
    }

    #[test]
    fn a_missing_vfolder_directory_makes_the_kernel_wait() {
        let f = fixture();
        let mut b = bind(&f, false);
        b.source = f.root.join("v/vol/00/00/missing");
        let out = f.exec.execute(
            vec![Action::Bind { bind: b }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        let err = out[0].result.as_ref().unwrap_err();
        assert!(err.is_pending(), "{err}");
        assert!(f.mounter.calls().is_empty());
    }

    #[test]
    fn cifs_password_goes_to_a_0600_file_never_to_argv() {
        let f = fixture();
        std::fs::create_dir_all(f.root.join("v/share")).unwrap();
        let v = WantVolume {
            name: "share".into(),
            target: f.root.join("v/share"),
            fstype: "cifs".into(),
            source: "//acct.file.core.windows.net/vfolder".into(),
            options: [
                "vers=3.0",
                "username=acct",
                "password=s3cr3t",
                "dir_mode=0777",
            ]
            .map(String::from)
            .to_vec(),
            credentials: None,
            at: MountAt::Requested,
            heal: Default::default(),
            readonly: false,
            create: false,
            anchor: "/".into(),
            owner: Default::default(),
        };
        // Capture the credentials file while the "helper" runs.
        struct Peek(
            Arc<RecordingMounter>,
            std::sync::Mutex<Option<(String, u32)>>,
        );
        impl Mounter for Peek {
            fn mount(
                &self,
                s: Option<&Path>,
                t: &Path,
                f: Option<&str>,
                fl: MsFlags,
                d: Option<&str>,
            ) -> Result<(), Errno> {
                self.0.mount(s, t, f, fl, d)
            }
            fn umount2(&self, t: &Path, fl: MntFlags) -> Result<(), Errno> {
                self.0.umount2(t, fl)
            }
            fn start_server(
                &self,
                req: &ServerRequest,
                spawned: &mut dyn FnMut(u32),
                mounted: &dyn Fn() -> bool,
            ) -> Result<(), HelperError> {
                self.0.start_server(req, spawned, mounted)
            }
            fn run_helper(&self, req: &HelperRequest) -> Result<(), HelperError> {
                let path = req
                    .options
                    .split(',')
                    .find_map(|o| o.strip_prefix("credentials="))
                    .unwrap();
                let text = std::fs::read_to_string(path).unwrap();
                let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
                *self.1.lock().unwrap() = Some((text, mode));
                self.0.run_helper(req)
            }
        }
        let peek = Arc::new(Peek(f.mounter.clone(), std::sync::Mutex::new(None)));
        let exec = Executor::new(peek.clone(), f.ledger.clone(), f.exec.cfg.clone());
        let out = exec.execute(
            vec![Action::MountVolume { volume: v }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        let calls = f.mounter.calls();
        let [Call::Helper(req)] = calls.as_slice() else {
            panic!("{calls:?}")
        };
        let creds = f.root.join("run/credentials-share");
        assert_eq!(req.fstype, "cifs");
        assert_eq!(req.source, "//acct.file.core.windows.net/vfolder");
        assert_eq!(
            req.options,
            format!(
                "vers=3.0,dir_mode=0777,actimeo=30,mfsymlinks,uid=1000,gid=1000,forceuid,forcegid,file_mode=0644,credentials={},nosuid,nodev",
                creds.display()
            )
        );
        let (text, mode) = peek.1.lock().unwrap().clone().unwrap();
        assert_eq!(text, "username=acct\npassword=s3cr3t\n");
        assert_eq!(mode, 0o600);
        assert!(!creds.exists(), "removed after the mount");
    }

    #[test]
    fn a_batch_stages_its_records_and_keeps_only_what_happened() {
        let f = fixture();
        let b1 = bind(&f, false);
        let mut b2 = bind(&f, false);
        b2.target = f.root.join("k/k2/work/data");
        b2.kernel = "k2".into();
        // k2's home exists already (someone else's): never ours.
        std::fs::create_dir_all(f.root.join("k/k2")).unwrap();
        std::fs::remove_dir_all(f.root.join("k/k1")).unwrap();
        let mkdir = |path: &str, k: &str| Action::MakeDir {
            path: f.root.join(path),
            root: f.root.join("k"),
            uid: None,
            gid: None,
            owner: Some(Owner::Kernel(k.into())),
            quota: None,
        };
        // The first mount(2) (k1's bind) succeeds, k2's fails.
        f.mounter.fail_after(CallKind::Mount, 2, Errno::EPERM, 1);
        let out = f.exec.execute(
            vec![
                mkdir("k/k1/work/data", "k1"),
                mkdir("k/k2/work/data", "k2"),
                Action::Bind { bind: b1.clone() },
                Action::Bind { bind: b2.clone() },
            ],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(out[..3].iter().all(|o| o.result.is_ok()), "{out:?}");
        assert!(out[3].result.is_err());
        let mounts = f.ledger.mounts().unwrap();
        assert!(mounts.contains_key(&b1.target));
        assert!(
            !mounts.contains_key(&b2.target),
            "failed bind's record dropped"
        );
        let dirs: BTreeSet<PathBuf> = f.ledger.dirs().unwrap().keys().cloned().collect();
        let expect: BTreeSet<PathBuf> = [
            "k/k1",
            "k/k1/work",
            "k/k1/work/data",
            "k/k2/work",
            "k/k2/work/data",
        ]
        .iter()
        .map(|p| f.root.join(p))
        .collect();
        assert_eq!(dirs, expect, "exactly the directories this batch made");
        // And what memory says is what a reopened store says.
        let Fixture {
            _dir,
            root,
            ledger,
            exec,
            ..
        } = f;
        drop((exec, ledger));
        // sled's flusher thread lets go of the file lock a moment after the drop.
        let mut reopened = Ledger::open(&root.join("db"));
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            reopened = Ledger::open(&root.join("db"));
        }
        let reopened = reopened.unwrap();
        assert!(reopened.mounts().unwrap().contains_key(&b1.target));
        assert_eq!(reopened.dirs().unwrap().len(), expect.len());
    }

    #[test]
    fn a_failed_volume_mount_skips_its_binds_but_not_others() {
        let f = fixture();
        std::fs::create_dir_all(f.root.join("v/vol")).unwrap();
        let v = WantVolume {
            name: "vol".into(),
            target: f.root.join("v/vol"),
            fstype: "tmpfs".into(),
            source: "t".into(),
            options: vec![],
            credentials: None,
            at: MountAt::Requested,
            heal: Default::default(),
            readonly: false,
            create: false,
            anchor: "/".into(),
            owner: Default::default(),
        };
        f.mounter.fail_next(CallKind::Mount, Errno::ENOSPC, 1);
        let b = bind(&f, false);
        let mut other = bind(&f, false);
        other.volume = "other".into();
        other.kernel = "k2".into();
        let out = f.exec.execute(
            vec![
                Action::MountVolume { volume: v },
                Action::Bind { bind: b },
                Action::Bind { bind: other },
            ],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(matches!(
            out[0].result,
            Err(ExecError::MountFailed {
                errno: Errno::ENOSPC,
                ..
            })
        ));
        assert!(matches!(out[1].result, Err(ExecError::Skipped(_))));
        assert!(out[2].result.is_ok());
        assert!(
            !f.ledger
                .mounts()
                .unwrap()
                .contains_key(&f.root.join("v/vol")),
            "failed intent removed"
        );
    }

    /// The plan saw vfolderd's bind at the target; by the time the unmount
    /// runs someone has mounted over it. Unmounting by path would take theirs.
    #[test]
    fn an_unmount_never_takes_a_mount_made_over_ours_after_the_plan() {
        let mut f = fixture();
        let mounter = Arc::new(RecordingMounter::with_atomic_binds());
        f.exec = Executor::new(mounter.clone(), f.ledger.clone(), f.exec.cfg.clone());
        let b = bind(&f, false);
        let out = f.exec.execute(
            vec![Action::Bind { bind: b.clone() }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert!(out[0].result.is_ok());
        let owned = f.ledger.mounts().unwrap();
        let unmount = || {
            f.exec.execute(
                vec![Action::Unmount {
                    target: b.target.clone(),
                    kind: MountKind::Bind,
                }],
                &owned,
                &BTreeMap::new(),
            )
        };
        mounter.answer_mount_ids(MountIds {
            unique: Some(999),
            short: Some(9),
        });
        let out = unmount();
        assert!(
            matches!(out[0].result, Err(ExecError::NotOurs { .. })),
            "{:?}",
            out[0].result
        );
        assert!(!mounter
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Umount2 { .. })));
        assert!(f.ledger.mounts().unwrap().contains_key(&b.target));
        // Theirs gone: ours is there again, and goes.
        mounter.answer_mount_ids(MountIds {
            unique: Some(1 << 31 | 1),
            short: Some(1),
        });
        assert!(unmount()[0].result.is_ok());
        assert!(f.ledger.mounts().unwrap().is_empty());
    }

    #[test]
    fn unmount_ebusy_keeps_ownership_and_einval_forgets() {
        let f = fixture();
        let b = bind(&f, false);
        f.exec.execute(
            vec![Action::Bind { bind: b.clone() }],
            &HashMap::new(),
            &BTreeMap::new(),
        );
        f.mounter.fail_next(CallKind::Umount2, Errno::EBUSY, 1);
        let owned = f.ledger.mounts().unwrap();
        let out = f.exec.execute(
            vec![Action::Unmount {
                target: b.target.clone(),
                kind: MountKind::Bind,
            }],
            &owned,
            &BTreeMap::new(),
        );
        assert!(matches!(
            out[0].result,
            Err(ExecError::UnmountFailed {
                errno: Errno::EBUSY,
                ..
            })
        ));
        assert!(f.ledger.mounts().unwrap().contains_key(&b.target));
        f.mounter.fail_next(CallKind::Umount2, Errno::EINVAL, 1);
        let out = f.exec.execute(
            vec![Action::Unmount {
                target: b.target.clone(),
                kind: MountKind::Bind,
            }],
            &owned,
            &BTreeMap::new(),
        );
        assert!(out[0].result.is_ok());
        assert!(f.ledger.mounts().unwrap().is_empty());
        let Call::Umount2 { flags, .. } = f.mounter.calls().last().cloned().unwrap() else {
            panic!()
        };
        assert_eq!(flags, MntFlags::UMOUNT_NOFOLLOW);
    }
}
