//! Directory operations that never follow a symlink below a configured root
//! (invariant 4): a path is opened in one `openat2` beneath the root with
//! `RESOLVE_NO_SYMLINKS` (Linux 5.6+), or component by component with
//! `O_NOFOLLOW` relative to its parent's descriptor, the way runc and youki
//! resolve mount targets (to create, to name the component at fault, and
//! where `openat2` is missing).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, unlinkat, Gid, Uid, UnlinkatFlags};

/// Errors of safe path operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// The path does not lie inside its root (or has `.`/`..`).
    #[error("{path} is not inside {root}")]
    OutsideRoot {
        /// The path.
        path: PathBuf,
        /// The root.
        root: PathBuf,
    },
    /// A component is a symlink or not a directory: refused, never followed.
    #[error("{path} is a symlink or not a directory; refusing to follow it")]
    NotADirectory {
        /// The offending component's full path.
        path: PathBuf,
    },
    /// A component does not exist.
    #[error("{path} does not exist")]
    Missing {
        /// The missing component's full path.
        path: PathBuf,
    },
    /// Recording a directory before creating it failed; it was not created.
    #[error("cannot record {path} before creating it: {message}")]
    Record {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Another syscall failed.
    #[error("{op} {path}: {errno}")]
    Sys {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The errno.
        errno: Errno,
    },
}

/// What to do with missing components.
#[derive(Debug, Clone, Copy)]
pub struct Create {
    /// Mode of created directories.
    pub mode: u32,
    /// chown created directories to this uid.
    pub uid: Option<u32>,
    /// chown created directories to this gid.
    pub gid: Option<u32>,
}

const WALK: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

fn rel_components<'a>(root: &Path, path: &'a Path) -> Result<Vec<&'a std::ffi::OsStr>, FsError> {
    let outside = || FsError::OutsideRoot {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
    };
    let rel = path.strip_prefix(root).map_err(|_| outside())?;
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(outside()),
        })
        .collect()
}

fn open_root(root: &Path, create: bool) -> Result<OwnedFd, FsError> {
    if create {
        std::fs::create_dir_all(root).map_err(|e| FsError::Sys {
            op: "mkdir",
            path: root.to_path_buf(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    }
    // The configured root itself is trusted (operator-owned); below it nothing is followed.
    openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| FsError::Sys {
        op: "open",
        path: root.to_path_buf(),
        errno,
    })
}

/// Opens `path` (inside `root`) as an `O_PATH` directory descriptor without
/// following symlinks; with `create`, makes missing components and returns
/// the ones it made (shallow first).
pub fn open_dir(
    root: &Path,
    path: &Path,
    create: Option<Create>,
) -> Result<(OwnedFd, Vec<PathBuf>), FsError> {
    let mut nothing = |_: &Path| Ok(());
    walk(
        root,
        path,
        create.map(|c| (c, &mut nothing as &mut BeforeMkdir)),
    )
}

/// Opens `path` (inside `root`) below `root_fd`, a descriptor of `root`
/// (or of a detached copy of its mount), without following symlinks.
pub fn open_dir_below(
    root_fd: BorrowedFd<'_>,
    root: &Path,
    path: &Path,
) -> Result<OwnedFd, FsError> {
    let comps = rel_components(root, path)?;
    if let Some(found) = open_beneath(root_fd, &comps) {
        return Ok(found);
    }
    let mut cur = root.to_path_buf();
    let mut fd: Option<OwnedFd> = None;
    for c in comps {
        cur.push(c);
        let at = fd.as_ref().map_or(root_fd, |f| f.as_fd());
        fd = Some(openat(at, c, WALK, Mode::empty()).map_err(|e| walk_error(e, &cur))?);
    }
    match fd {
        Some(fd) => Ok(fd),
        None => root_fd.try_clone_to_owned().map_err(|e| FsError::Sys {
            op: "dup",
            path: root.to_path_buf(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        }),
    }
}

/// Called with each directory's path just before it is created; an error
/// stops the walk. The executor records ownership here *before* mkdir, so a
/// crash between the two never leaks a directory nobody owns.
pub type BeforeMkdir<'a> = dyn FnMut(&Path) -> Result<(), String> + 'a;

/// Like [`open_dir`] with `create`, calling `before` ahead of each mkdir.
pub fn make_dir(
    root: &Path,
    path: &Path,
    create: Create,
    before: &mut BeforeMkdir<'_>,
) -> Result<Vec<PathBuf>, FsError> {
    walk(root, path, Some((create, before))).map(|(_, made)| made)
}

/// The whole walk in one call (`openat2`, Linux 5.6+): beneath `at`, no
/// symlink followed anywhere on the way, as the walk component by component
/// does (which takes two calls per component). `None` where it cannot say:
/// the caller walks, which also names the component at fault on an error.
fn open_beneath(at: BorrowedFd<'_>, comps: &[&std::ffi::OsStr]) -> Option<OwnedFd> {
    use rustix::fs::{OFlags, ResolveFlags};
    if comps.is_empty() || NO_OPENAT2.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let rel: PathBuf = comps.iter().collect();
    rustix::fs::openat2(
        at,
        &rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .inspect_err(|e| {
        if *e == rustix::io::Errno::NOSYS {
            NO_OPENAT2.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .ok()
}

/// `openat2` is missing here (before Linux 5.6): not tried again.
static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn walk(
    root: &Path,
    path: &Path,
    mut create: Option<(Create, &mut BeforeMkdir<'_>)>,
) -> Result<(OwnedFd, Vec<PathBuf>), FsError> {
    let comps = rel_components(root, path)?;
    let mut fd = open_root(root, create.is_some())?;
    if create.is_none() {
        if let Some(found) = open_beneath(fd.as_fd(), &comps) {
            return Ok((found, Vec::new()));
        }
    }
    let mut cur = root.to_path_buf();
    // Making a directory whose parent exists (the usual case): the parent
    // in one call, then the walk for the last component only.
    let mut start = 0;
    if create.is_some() && comps.len() > 1 {
        let parent = &comps[..comps.len() - 1];
        if let Some(found) = open_beneath(fd.as_fd(), parent) {
            fd = found;
            cur.extend(parent);
            start = parent.len();
        }
    }
    let mut made = Vec::new();
    for c in comps.into_iter().skip(start) {
        cur.push(c);
        let next = match openat(fd.as_fd(), c, WALK, Mode::empty()) {
            Ok(f) => f,
            Err(Errno::ENOENT) if create.is_some() => {
                let (cr, before) = create.as_mut().expect("checked");
                before(&cur).map_err(|message| FsError::Record {
                    path: cur.clone(),
                    message,
                })?;
                match mkdir_owned(fd.as_fd(), c, cr) {
                    Ok(Made::AsOwner) => made.push(cur.clone()),
                    Ok(Made::AsRoot) => {
                        made.push(cur.clone());
                        fchownat(
                            fd.as_fd(),
                            c,
                            cr.uid.map(Uid::from_raw),
                            cr.gid.map(Gid::from_raw),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map_err(|errno| FsError::Sys {
                            op: "chown",
                            path: cur.clone(),
                            errno,
                        })?;
                    }
                    Err(Errno::EEXIST) => {}
                    Err(errno) => {
                        return Err(FsError::Sys {
                            op: "mkdir",
                            path: cur,
                            errno,
                        })
                    }
                }
                openat(fd.as_fd(), c, WALK, Mode::empty()).map_err(|e| walk_error(e, &cur))?
            }
            Err(e) => return Err(walk_error(e, &cur)),
        };
        fd = next;
    }
    Ok((fd, made))
}

/// How [`mkdir_owned`] made a directory.
enum Made {
    /// As its owner: nothing left to do.
    AsOwner,
    /// As root (no owner asked, or the owner may not write there): a chown follows when one was asked.
    AsRoot,
}

/// Makes directory `name` in `dir` as the owner `cr` names, with the
/// thread's filesystem uid and gid switched to them (setfsuid/setfsgid act
/// on this thread only): on NFS with root_squash and on CIFS root may not
/// chown, and there the owner's own mkdir is the only way. Where the owner
/// may not write the parent (a root-owned 0711 root), root makes it and the
/// caller chowns.
fn mkdir_owned(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, cr: &Create) -> Result<Made, Errno> {
    let mode = Mode::from_bits_truncate(cr.mode);
    let as_root = || mkdirat(dir, name, mode).map(|()| Made::AsRoot);
    if cr.uid.is_none() && cr.gid.is_none() {
        return as_root();
    }
    if !may_write(dir, cr) {
        // Mode bits do not tell ACLs, or NFS's root_squash, where only the
        // owner's own mkdir gets through: root first, then the owner.
        return match as_root() {
            Err(Errno::EACCES | Errno::EPERM) => as_owner(dir, name, mode, cr),
            r => r,
        };
    }
    match as_owner(dir, name, mode, cr) {
        Err(Errno::EACCES | Errno::EPERM) => as_root(),
        r => r,
    }
}

/// mkdir with the thread's filesystem ids switched to the owner's.
fn as_owner(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    mode: Mode,
    cr: &Create,
) -> Result<Made, Errno> {
    let mut ids = FsIds::assume(cr.uid, cr.gid);
    let made = mkdirat(dir, name, mode);
    // setfsuid reports no failure, only its effect, read back here: a
    // directory made while the ids did not take was made as root.
    let took = ids.restore();
    made.map(|()| if took { Made::AsOwner } else { Made::AsRoot })
}

/// Whether the owner `cr` names may make a directory in `dir` by its mode
/// bits: where it may not (a root-owned kernels root), trying costs six
/// system calls and a refused mkdir per directory. Unknown: try.
fn may_write(dir: BorrowedFd<'_>, cr: &Create) -> bool {
    let Ok(st) = nix::sys::stat::fstat(dir) else {
        return true;
    };
    let (uid, gid) = (cr.uid.unwrap_or(0), cr.gid.unwrap_or(0));
    st.st_uid == uid || st.st_mode & 0o002 != 0 || (st.st_gid == gid && st.st_mode & 0o020 != 0)
}

/// This thread's filesystem ids switched to an owner's, restored on drop.
struct FsIds {
    /// (the owner's, the thread's before), per id switched.
    uid: Option<(u32, Uid)>,
    gid: Option<(u32, Gid)>,
    restored: bool,
}

impl FsIds {
    fn assume(uid: Option<u32>, gid: Option<u32>) -> Self {
        // The group first: a fsuid other than 0 takes the capabilities that
        // bypass file permissions, not the one to change the fsgid, but the
        // order keeps that question away.
        let gid = gid.map(|g| (g, nix::unistd::setfsgid(Gid::from_raw(g))));
        let uid = uid.map(|u| (u, nix::unistd::setfsuid(Uid::from_raw(u))));
        Self {
            uid,
            gid,
            restored: false,
        }
    }

    /// Puts the thread's ids back; whether they were the owner's until
    /// then (each call returns the id it replaces, setfsuid(2)).
    fn restore(&mut self) -> bool {
        self.restored = true;
        let uid = self
            .uid
            .is_none_or(|(u, old)| nix::unistd::setfsuid(old).as_raw() == u);
        let gid = self
            .gid
            .is_none_or(|(g, old)| nix::unistd::setfsgid(old).as_raw() == g);
        uid && gid
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        if !self.restored {
            self.restore();
        }
    }
}

fn walk_error(errno: Errno, path: &Path) -> FsError {
    match errno {
        Errno::ENOTDIR | Errno::ELOOP => FsError::NotADirectory {
            path: path.to_path_buf(),
        },
        Errno::ENOENT => FsError::Missing {
            path: path.to_path_buf(),
        },
        errno => FsError::Sys {
            op: "open",
            path: path.to_path_buf(),
            errno,
        },
    }
}

/// Whether two descriptors name the same directory (device and inode).
pub fn same_dir(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

/// The `/proc/self/fd/N` path of a descriptor: mount(2) on it acts on the
/// very directory that was opened, closing the symlink-swap race.
pub fn fd_path(fd: impl AsFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Whether `path` exists as a real directory (not a symlink).
pub fn is_dir_nofollow(path: &Path) -> bool {
    fstatat(nix::fcntl::AT_FDCWD, path, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// Outcome of [`remove_dir_if_empty`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// It was empty and is gone.
    Removed,
    /// It was already gone.
    Absent,
    /// It holds something: left in place, never user data.
    NotEmpty,
}

/// rmdir(2) of `path` inside `root`, through its parent's descriptor.
pub fn remove_dir_if_empty(root: &Path, path: &Path) -> Result<Removed, FsError> {
    let Some(parent) = path.parent() else {
        return Err(FsError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        });
    };
    let name = path.file_name().ok_or_else(|| FsError::OutsideRoot {
        path: path.into(),
        root: root.into(),
    })?;
    let (pfd, _) = match open_dir(root, parent, None) {
        Ok(x) => x,
        Err(FsError::Missing { .. }) => return Ok(Removed::Absent),
        Err(e) => return Err(e),
    };
    match unlinkat(pfd.as_fd(), name, UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(Removed::Removed),
        Err(Errno::ENOENT) => Ok(Removed::Absent),
        Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR) => Ok(Removed::NotEmpty),
        Err(errno) => Err(FsError::Sys {
            op: "rmdir",
            path: path.to_path_buf(),
            errno,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_dir_creates_missing_components() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a/b/c");
        let (_, made) = open_dir(
            t.path(),
            &p,
            Some(Create {
                mode: 0o755,
                uid: None,
                gid: None,
            }),
        )
        .unwrap();
        assert_eq!(
            made,
            vec![t.path().join("a"), t.path().join("a/b"), p.clone()]
        );
        assert!(is_dir_nofollow(&p));
    }

    #[test]
    fn open_dir_refuses_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("home")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("home/data")).unwrap();
        let err = open_dir(
            t.path(),
            &t.path().join("home/data/x"),
            Some(Create {
                mode: 0o755,
                uid: None,
                gid: None,
            }),
        )
        .unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        assert!(
            !outside.path().join("x").exists(),
            "nothing was created through the symlink"
        );
    }

    #[test]
    fn open_dir_refuses_paths_outside_root() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_dir(t.path(), Path::new("/etc"), None),
            Err(FsError::OutsideRoot { .. })
        ));
        assert!(matches!(
            open_dir(t.path(), &t.path().join("a/../b"), None),
            Err(FsError::OutsideRoot { .. })
        ));
    }

    #[test]
    fn a_rename_and_symlink_after_the_check_cannot_redirect_the_target() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        std::fs::create_dir_all(home.join("data")).unwrap();
        let (fd, _) = open_dir(t.path(), &home.join("data"), None).unwrap();
        // The user swaps the checked directory for a symlink to somewhere else.
        std::fs::rename(home.join("data"), home.join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), home.join("data")).unwrap();
        // What a mount on the descriptor's path would act on: still the checked directory.
        assert_eq!(
            std::fs::read_link(fd_path(&fd)).unwrap(),
            home.join("moved")
        );
    }

    #[test]
    fn remove_dir_keeps_non_empty_directories() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("user-file"), b"data").unwrap();
        assert_eq!(
            remove_dir_if_empty(t.path(), &d).unwrap(),
            Removed::NotEmpty
        );
        assert!(d.join("user-file").exists());
        std::fs::remove_file(d.join("user-file")).unwrap();
        assert_eq!(remove_dir_if_empty(t.path(), &d).unwrap(), Removed::Removed);
        assert_eq!(remove_dir_if_empty(t.path(), &d).unwrap(), Removed::Absent);
    }
}
