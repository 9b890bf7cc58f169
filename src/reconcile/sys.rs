//! The narrow kernel interface the executor uses: one method per syscall (or
//! per external helper), so tests can swap in [`RecordingMounter`].

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use wait_timeout::ChildExt;

use crate::names::redact;
use crate::reconcile::newmount::{BindAttrs, IdMap, MountIds};
use crate::secret::Secret;

/// A request to run the system's `mount -t FSTYPE` helper (cifs, nfs, FUSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperRequest {
    /// fstype for `-t`.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Mount point.
    pub target: PathBuf,
    /// `-o` options. Never carries a secret: secrets travel in files.
    pub options: String,
    /// Kill the helper after this long.
    pub timeout: Duration,
}

/// A request to start a FUSE server (`rclone mount`) that serves `target`
/// for as long as the mount lives. It runs in the foreground as our child in
/// its own process group, not `--daemon`: a daemonizing server re-executes
/// itself in a new session that no kill of ours reaches, and its pid is
/// unknown, so a timed-out or retried start leaked a server holding a SAS.
/// Secrets travel only in `env`, never in `args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRequest {
    /// The program.
    pub program: PathBuf,
    /// Its arguments (no secrets: argv is world-readable in /proc).
    pub args: Vec<String>,
    /// Environment variables; values may be secrets.
    pub env: Vec<(String, Secret)>,
    /// The mount point it serves.
    pub target: PathBuf,
    /// Its stdout and stderr are appended here (a root-only file): a pipe
    /// to vfolderd would break when vfolderd restarts, and a Go program
    /// writing to a broken stderr dies of SIGPIPE.
    pub log: PathBuf,
    /// Kill it if its mount has not appeared after this long.
    pub timeout: Duration,
}

/// Why a helper failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelperError {
    /// It could not be started (no `mount` binary).
    #[error("cannot start mount helper: {0}")]
    Spawn(String),
    /// It ran longer than its timeout and was killed.
    #[error("mount helper timeout after {0:?}")]
    Timeout(Duration),
    /// An earlier, timed-out helper for this target has not exited yet.
    #[error("an earlier mount helper for this target is still running")]
    StillRunning,
    /// It exited non-zero; `stderr` is redacted.
    #[error("mount helper exited with {code}: {stderr}")]
    Failed {
        /// Exit code (-1 when killed by a signal).
        code: i32,
        /// Its error output, trimmed and redacted.
        stderr: String,
    },
}

/// Kernel mount operations, shaped like `nix::mount`.
pub trait Mounter: Send + Sync {
    /// mount(2).
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    /// umount2(2).
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    /// Runs `mount -t FSTYPE -o OPTIONS SOURCE TARGET`.
    fn run_helper(&self, req: &HelperRequest) -> Result<(), HelperError>;

    /// [`Mounter::run_helper`], telling `spawned` the helper's pid as soon as
    /// it runs (the caller records it, so a restart knows it is still running).
    fn run_helper_recorded(
        &self,
        req: &HelperRequest,
        spawned: &mut dyn FnMut(u32),
    ) -> Result<(), HelperError> {
        let _ = spawned;
        self.run_helper(req)
    }
    /// Binds directory `source` onto directory `target` (`O_PATH`
    /// descriptors) with nosuid, nodev and `attrs` set before the bind is
    /// attached ([`crate::reconcile::newmount::bind`]). `ENOSYS` where the
    /// kernel (or a double) lacks the new mount API: the caller then binds
    /// and remounts the old way. Returns the new mount's ids (read before
    /// the bind is attached).
    fn bind_atomic(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attrs: BindAttrs,
    ) -> Result<MountIds, Errno> {
        let _ = (source, target, attrs);
        Err(Errno::ENOSYS)
    }

    /// The ids of the mount `at` (an `O_PATH` descriptor of its root,
    /// opened without following symlinks) is on, asked right after vfolderd
    /// mounted it by a path (a helper's mount, the old way's bind); none in
    /// doubles.
    fn mount_ids(&self, at: BorrowedFd<'_>) -> MountIds {
        let _ = at;
        MountIds::default()
    }

    /// A detached copy of the mount at `dir`, without the mounts below it
    /// ([`crate::reconcile::newmount::detached_copy`]); `ENOSYS` where the
    /// kernel (or a double) lacks the new mount API.
    fn detached_copy(&self, dir: &Path) -> Result<OwnedFd, Errno> {
        let _ = dir;
        Err(Errno::ENOSYS)
    }

    /// Starts a FUSE server that outlives vfolderd (its own process group),
    /// telling `spawned` its pid as soon as it runs, and returns once
    /// `mounted` says its mount is there. A server that exits first fails
    /// with the tail of its log; one still not mounted after the timeout is
    /// killed.
    fn start_server(
        &self,
        req: &ServerRequest,
        spawned: &mut dyn FnMut(u32),
        mounted: &dyn Fn() -> bool,
    ) -> Result<(), HelperError>;
}

/// The real thing: passes each call to the kernel.
#[derive(Debug, Clone)]
pub struct LinuxMounter {
    /// The mount(8)-compatible helper program.
    pub helper: PathBuf,
    /// Targets whose timed-out helper has not exited yet (a helper stuck in
    /// the kernel cannot die at once): no second mount is started on them,
    /// so a late-finishing mount is never stacked under a new one.
    pending: Arc<Mutex<BTreeSet<PathBuf>>>,
    /// User namespaces for idmapped binds, by mapping.
    userns: Arc<Mutex<std::collections::HashMap<IdMap, Arc<std::os::fd::OwnedFd>>>>,
}

impl LinuxMounter {
    /// A mounter running `helper` for cifs, nfs and FUSE.
    pub fn new(helper: impl Into<PathBuf>) -> Self {
        Self {
            helper: helper.into(),
            pending: Arc::default(),
            userns: Arc::default(),
        }
    }

    /// The user namespace for `map`, made once and kept (few distinct
    /// mappings exist on a node: one per kernel uid and volume owner).
    fn userns(&self, map: IdMap) -> Result<Arc<std::os::fd::OwnedFd>, Errno> {
        let mut cache = self.userns.lock().expect("userns lock");
        if let Some(fd) = cache.get(&map) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(crate::reconcile::newmount::userns_for(map)?);
        cache.insert(map, fd.clone());
        Ok(fd)
    }
}

impl Default for LinuxMounter {
    fn default() -> Self {
        Self::new("mount")
    }
}

impl Mounter for LinuxMounter {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        nix::mount::umount2(target, flags)
    }

    fn bind_atomic(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attrs: BindAttrs,
    ) -> Result<MountIds, Errno> {
        use std::os::fd::AsFd;
        let userns = match attrs.idmap {
            None => None,
            Some(map) => Some(self.userns(map)?),
        };
        let userns = userns.as_ref().map(|u| u.as_fd());
        crate::reconcile::newmount::bind(source, target, &attrs, userns)
    }

    fn detached_copy(&self, dir: &Path) -> Result<OwnedFd, Errno> {
        crate::reconcile::newmount::detached_copy(dir)
    }

    fn mount_ids(&self, at: BorrowedFd<'_>) -> MountIds {
        crate::reconcile::newmount::mount_ids(at, Path::new(""))
    }

    fn run_helper(&self, req: &HelperRequest) -> Result<(), HelperError> {
        self.run_helper_recorded(req, &mut |_| {})
    }

    fn run_helper_recorded(
        &self,
        req: &HelperRequest,
        spawned: &mut dyn FnMut(u32),
    ) -> Result<(), HelperError> {
        let mut cmd = Command::new(&self.helper);
        cmd.arg("-t").arg(&req.fstype);
        if !req.options.is_empty() {
            cmd.arg("-o").arg(&req.options);
        }
        // `--`: a source can never be read as an option.
        cmd.arg("--")
            .arg(&req.source)
            .arg(&req.target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.pending.lock().expect("lock").contains(&req.target) {
            return Err(HelperError::StillRunning);
        }
        // Its own process group, so a timeout kills the helper and its children.
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| HelperError::Spawn(e.to_string()))?;
        spawned(child.id());
        match wait_helper(child, req.timeout) {
            Waited::Exited(r) => r,
            Waited::TimedOut(mut child) => {
                // Reap off-thread: a helper in uninterruptible sleep would block us;
                // until it is gone, no second mount is started on its target.
                let pending = self.pending.clone();
                let target = req.target.clone();
                pending.lock().expect("lock").insert(target.clone());
                std::thread::spawn(move || {
                    let _ = child.wait();
                    pending.lock().expect("lock").remove(&target);
                });
                Err(HelperError::Timeout(req.timeout))
            }
        }
    }

    fn start_server(
        &self,
        req: &ServerRequest,
        spawned: &mut dyn FnMut(u32),
        mounted: &dyn Fn() -> bool,
    ) -> Result<(), HelperError> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&req.log)
            .map_err(|e| HelperError::Spawn(format!("{}: {e}", req.log.display())))?;
        let err_log = log
            .try_clone()
            .map_err(|e| HelperError::Spawn(e.to_string()))?;
        let start = log.metadata().map_or(0, |m| m.len());
        let mut cmd = Command::new(&req.program);
        cmd.args(&req.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        for (k, v) in &req.env {
            cmd.env(k, v.expose());
        }
        // Its own process group: vfolderd's signals and exit do not reach it,
        // so the mount survives a vfolderd restart and is adopted.
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|e| HelperError::Spawn(e.to_string()))?;
        spawned(child.id());
        let deadline = std::time::Instant::now() + req.timeout;
        let outcome = loop {
            if mounted() {
                break Ok(());
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(HelperError::Failed {
                        code: status.code().unwrap_or(-1),
                        stderr: log_tail(&req.log, start),
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                    break Err(HelperError::Spawn(e.to_string()));
                }
            }
            if std::time::Instant::now() >= deadline {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                break Err(HelperError::Timeout(req.timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Reaped whenever it exits (unmounted, killed), so no zombie stays.
        std::thread::spawn(move || child.wait());
        outcome
    }
}

/// What a server wrote to its log since byte `start`: its last 400
/// characters, whitespace collapsed and secrets redacted (it goes into a
/// status).
fn log_tail(log: &Path, start: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
    // Redact first: a cut could split `sig=` from its value.
    let words = redact(&text.split_whitespace().collect::<Vec<_>>().join(" "));
    let from = words.char_indices().rev().nth(399).map_or(0, |(i, _)| i);
    words[from..].to_string()
}

/// Sends `signal` to process `p` if that very process still runs: the
/// pidfd pins it, so a pid reused after the check is never signalled.
pub fn signal_process(p: &crate::state::ledger::HelperProcess, signal: rustix::process::Signal) {
    let Some(pid) = rustix::process::Pid::from_raw(p.pid as i32) else {
        return;
    };
    let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    if p.alive() {
        let _ = rustix::process::pidfd_send_signal(&fd, signal);
    }
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat`
/// field 22), if it runs (a zombie does not): with the pid, it names one
/// process, whatever reuses the pid.
pub fn running_since(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis (field 3 is the state).
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// How a helper run ended.
enum Waited {
    /// It exited: success, or its failure with redacted stderr.
    Exited(Result<(), HelperError>),
    /// It outlived its timeout; its process group has been sent SIGKILL and
    /// the child is still to be reaped.
    TimedOut(std::process::Child),
}

/// Waits for a helper started in its own process group (`process_group(0)`).
fn wait_helper(mut child: std::process::Child, timeout: Duration) -> Waited {
    let status = match child.wait_timeout(timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            return Waited::TimedOut(child);
        }
        Err(e) => return Waited::Exited(Err(HelperError::Spawn(e.to_string()))),
    };
    if status.success() {
        return Waited::Exited(Ok(()));
    }
    let mut stderr = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
    Waited::Exited(Err(HelperError::Failed {
        code: status.code().unwrap_or(-1),
        stderr: redact(&stderr.split_whitespace().collect::<Vec<_>>().join(" ")),
    }))
}

/// One recorded call of [`RecordingMounter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A mount(2).
    Mount {
        /// Source.
        source: Option<PathBuf>,
        /// Target.
        target: PathBuf,
        /// fstype.
        fstype: Option<String>,
        /// Flags.
        flags: MsFlags,
        /// Data.
        data: Option<String>,
    },
    /// An umount2(2).
    Umount2 {
        /// Target.
        target: PathBuf,
        /// Flags.
        flags: MntFlags,
    },
    /// A helper run.
    Helper(HelperRequest),
    /// A bind made whole before it is attached (new mount API).
    AtomicBind {
        /// Read-only from its first moment.
        readonly: bool,
        /// Idmapped.
        idmap: bool,
        /// In a peer group of its own.
        shared: bool,
    },
    /// A FUSE server start (env recorded by name only).
    Server {
        /// Program.
        program: PathBuf,
        /// Arguments.
        args: Vec<String>,
        /// Names of the environment variables passed.
        env_keys: Vec<String>,
    },
}

/// Which call a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// mount(2).
    Mount,
    /// umount2(2).
    Umount2,
    /// The helper.
    Helper,
}

/// A test double: records every call and can fail the next N calls of a kind.
/// It changes nothing in the kernel.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    calls: Mutex<Vec<Call>>,
    /// Whether it has the new mount API (else `bind_atomic` is `ENOSYS`,
    /// as on a kernel before 5.12).
    atomic_binds: std::sync::atomic::AtomicBool,
    /// Scripted results per call kind: `None` lets a call succeed, `Some` fails it.
    script: Mutex<VecDeque<(CallKind, Option<Errno>)>>,
    /// How many atomic binds it made: their mount ids are 1, 2, ...
    binds_made: std::sync::atomic::AtomicU64,
    /// What [`Mounter::mount_ids`] answers (none by default).
    ids_at: Mutex<MountIds>,
}

impl RecordingMounter {
    /// A double with the new mount API.
    pub fn with_atomic_binds() -> Self {
        let m = Self::default();
        m.atomic_binds
            .store(true, std::sync::atomic::Ordering::Relaxed);
        m
    }

    /// Makes [`Mounter::mount_ids`] answer `ids` (the mount someone else
    /// put at every path asked about).
    pub fn answer_mount_ids(&self, ids: MountIds) {
        *self.ids_at.lock().expect("lock") = ids;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }
    /// Fail the next `times` calls of `kind` with `errno`.
    pub fn fail_next(&self, kind: CallKind, errno: Errno, times: usize) {
        self.fail_after(kind, 0, errno, times);
    }
    /// Let the next `skip` calls of `kind` succeed, then fail `times` with `errno`.
    pub fn fail_after(&self, kind: CallKind, skip: usize, errno: Errno, times: usize) {
        let mut q = self.script.lock().expect("lock");
        q.extend(std::iter::repeat_n((kind, None), skip));
        q.extend(std::iter::repeat_n((kind, Some(errno)), times));
    }
    fn scripted(&self, kind: CallKind) -> Option<Errno> {
        let mut q = self.script.lock().expect("lock");
        let pos = q.iter().position(|(k, _)| *k == kind)?;
        q.remove(pos).and_then(|(_, e)| e)
    }
}

impl Mounter for RecordingMounter {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        self.calls.lock().expect("lock").push(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(String::from),
            flags,
            data: data.map(String::from),
        });
        self.scripted(CallKind::Mount).map_or(Ok(()), Err)
    }

    fn bind_atomic(
        &self,
        _source: BorrowedFd<'_>,
        _target: BorrowedFd<'_>,
        attrs: BindAttrs,
    ) -> Result<MountIds, Errno> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.atomic_binds.load(Relaxed) {
            return Err(Errno::ENOSYS);
        }
        self.calls.lock().expect("lock").push(Call::AtomicBind {
            readonly: attrs.readonly,
            idmap: attrs.idmap.is_some(),
            shared: attrs.shared,
        });
        match self.scripted(CallKind::Mount) {
            Some(errno) => Err(errno),
            None => {
                let n = self.binds_made.fetch_add(1, Relaxed) + 1;
                Ok(MountIds {
                    unique: Some(1 << 31 | n),
                    short: Some(n),
                })
            }
        }
    }

    fn mount_ids(&self, _at: BorrowedFd<'_>) -> MountIds {
        *self.ids_at.lock().expect("lock")
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        self.calls.lock().expect("lock").push(Call::Umount2 {
            target: target.to_path_buf(),
            flags,
        });
        self.scripted(CallKind::Umount2).map_or(Ok(()), Err)
    }

    fn run_helper(&self, req: &HelperRequest) -> Result<(), HelperError> {
        self.calls
            .lock()
            .expect("lock")
            .push(Call::Helper(req.clone()));
        match self.scripted(CallKind::Helper) {
            None => Ok(()),
            Some(e) => Err(HelperError::Failed {
                code: 32,
                stderr: e.desc().to_string(),
            }),
        }
    }

    fn start_server(
        &self,
        req: &ServerRequest,
        _spawned: &mut dyn FnMut(u32),
        _mounted: &dyn Fn() -> bool,
    ) -> Result<(), HelperError> {
        self.calls.lock().expect("lock").push(Call::Server {
            program: req.program.clone(),
            args: req.args.clone(),
            env_keys: req.env.iter().map(|(k, _)| k.clone()).collect(),
        });
        match self.scripted(CallKind::Helper) {
            None => Ok(()),
            Some(e) => Err(HelperError::Failed {
                code: 1,
                stderr: e.desc().to_string(),
            }),
        }
    }
}

/// Splits `mount -o` style options into mount(2) flags and the data string,
/// as mount(8) does. `nosuid,nodev` are always added (DESIGN: every mount
/// vfolderd makes). See mount(2): <https://man7.org/linux/man-pages/man2/mount.2.html>.
pub fn split_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "nosuid" | "nodev" | "async" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_flags_always_adds_nosuid_nodev() {
        let (f, data) = split_flags(&["size=1m".into(), "ro".into(), "mode=0755".into()]);
        assert!(f.contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY));
        assert_eq!(data, "size=1m,mode=0755");
    }

    #[test]
    fn a_timed_out_helper_and_its_children_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("helper");
        let marker = dir.path().join("child-survived");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n(sleep 1; touch {})&\nsleep 30\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let m = LinuxMounter::new(&helper);
        let req = HelperRequest {
            fstype: "nfs".into(),
            source: "h:/x".into(),
            target: dir.path().join("t"),
            options: String::new(),
            timeout: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        assert_eq!(
            m.run_helper(&req),
            Err(HelperError::Timeout(Duration::from_millis(200)))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !marker.exists(),
            "the helper's children were killed with it"
        );
        assert!(!m.pending.lock().unwrap().contains(&req.target), "reaped");
    }

    #[test]
    fn recording_mounter_fails_next_n_calls() {
        let m = RecordingMounter::default();
        m.fail_next(CallKind::Umount2, Errno::EBUSY, 1);
        assert_eq!(
            m.umount2(Path::new("/a"), MntFlags::empty()),
            Err(Errno::EBUSY)
        );
        assert_eq!(m.umount2(Path::new("/a"), MntFlags::empty()), Ok(()));
        assert_eq!(m.calls().len(), 2);
    }
}
