//! Cloning a vfolder: its tree copied from descriptors into a staging
//! directory (`<volume>/.clone/<hex>`, root 0700), then moved to its place
//! with one rename, so a kernel never sees half a clone and a vfolder
//! directory that exists is a finished one. Files are reflinked
//! (`FICLONE`) where source and target share a filesystem that can, and
//! copied otherwise (`copy_file_range`, falling back as `std::io::copy`
//! does), across volumes too. Modes (without set-id bits), mtimes and
//! symlinks are kept; a symlink is recreated, never followed. Files are
//! owned by the target volume's owner. A clone stopped half way (a crash)
//! resumes in the same staging directory: a file already there with the
//! source's size and mtime is not copied again.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    fchmod, fchown, futimens, ioctl_ficlone, mkdirat, openat, readlinkat, statat, symlinkat,
    unlinkat, utimensat, AtFlags, Dir, FileType, Mode, OFlags, Timestamps,
};
use rustix::io::Errno;
use uuid::Uuid;

use crate::lifecycle::trashfs::hex;
use crate::reconcile::fsops::{open_dir, Create};

/// The staging directory's parent in a volume.
pub const STAGING: &str = ".clone";
/// Deeper trees are refused (each level holds two descriptors; clones run
/// at most two at a time).
const DEPTH_MAX: usize = 128;

/// Errors of a clone.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Opening a path below a volume failed.
    #[error(transparent)]
    Path(#[from] crate::reconcile::fsops::FsError),
    /// A syscall failed.
    #[error("{op} {what}: {errno}")]
    Sys {
        /// The operation.
        op: &'static str,
        /// What it was done to.
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// The source tree is deeper than [`DEPTH_MAX`].
    #[error("the source is nested deeper than {DEPTH_MAX} directories")]
    TooDeep,
    /// Copied, it would not fit: past the record's quota or the target's free space.
    #[error("the copy would take more than the {0} bytes it may use (quota or free space)")]
    TooBig(u64),
    /// Another clone of the same vfolder holds the staging directory.
    #[error("another clone of this vfolder is running")]
    Busy,
    /// The source's directory went (purged, trashed) while it was copied.
    #[error("the source went away while it was copied")]
    SourceGone,
    /// This node stopped leading the target volume; its new leader resumes.
    #[error("stopped: this node no longer leads the target volume")]
    Stopped,
}

/// What a clone may still write (bytes): a hostile source (a huge sparse
/// file, many hardlinks of one) must not fill the target volume.
struct Budget(std::sync::atomic::AtomicU64);

impl Budget {
    fn take(&self, n: u64) -> Result<(), CloneError> {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .map(drop)
            .map_err(CloneError::TooBig)
    }
}

fn sys(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(Errno) -> CloneError {
    let what = what.to_string();
    move |errno| CloneError::Sys { op, what, errno }
}

/// Who owns the clone's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

/// Whether the clone may go on writing its target volume.
pub type Gate = Box<dyn Fn() -> bool + Send + Sync>;

/// A clone's progress, readable while it runs.
#[derive(Default)]
pub struct Progress {
    /// Files (non-directories) done so far.
    pub done: AtomicU64,
    /// Files in the source when it started.
    pub total: AtomicU64,
    /// Files reflinked rather than copied.
    pub reflinked: AtomicU64,
    /// Set when this node may no longer write the target volume (it lost
    /// its leadership): the copy stops at the next file, staged and resumable.
    pub stop: std::sync::atomic::AtomicBool,
    /// Asked before each file and each [`COPY_CHUNK`] copied: false stops
    /// the copy as `stop` does (a fenced leader, see [`crate::state::election`]).
    pub gate: Option<Gate>,
}

impl Progress {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.gate.as_ref().is_some_and(|g| !g())
    }
}

/// Bytes copied between two looks at [`Progress::gate`] (a large file must
/// not run on past the fence).
const COPY_CHUNK: u64 = 64 << 20;

const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Copies the tree at `source` into vfolder `id`'s place `live` on the
/// volume mounted at `target` (through staging, then one rename).
pub fn clone_tree(
    source: &Path,
    target: &Path,
    live: &Path,
    id: &Uuid,
    owner: Owner,
    quota: Option<u64>,
    progress: &Progress,
) -> Result<(), CloneError> {
    let total = crate::usage::scan(source).map_or(0, |(f, _)| f);
    progress.total.store(total, Ordering::Relaxed);
    let src =
        rustix::fs::open(source, DIR, Mode::empty()).map_err(sys("open", source.display()))?;
    let staging = staging_dir(target, true)?;
    let name = hex(id);
    let what = target.join(STAGING).join(&name);
    // On btrfs with quotas the clone is a subvolume with the record's limit
    // from the start (a rename keeps it one).
    match crate::reconcile::btrfs::make_limited(
        staging.as_fd(),
        &name,
        (owner.uid, owner.gid),
        quota,
    ) {
        Ok(_) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => {
            return Err(sys("create subvolume", what.display())(
                Errno::from_raw_os_error(e as i32),
            ))
        }
    }
    let dst = open_or_make_dir(staging.as_fd(), &cstr(&name), &what)?;
    // One clone per staging directory, whatever restarts meanwhile.
    rustix::fs::flock(&dst, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| CloneError::Busy)?;
    let free = rustix::fs::fstatvfs(&dst)
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
        .unwrap_or(u64::MAX);
    let budget = Budget(free.min(quota.unwrap_or(u64::MAX)).into());
    copy_dir(src.as_fd(), dst.as_fd(), owner, progress, &budget, 0)?;
    finish_dir(src.as_fd(), dst.as_fd(), owner)?;
    if !crate::reconcile::fsops::is_dir_nofollow(source) {
        return Err(CloneError::SourceGone);
    }
    let parent = live.parent().unwrap_or(target);
    let create = Create {
        mode: 0o755,
        uid: None,
        gid: None,
    };
    let (pfd, _) = open_dir(target, parent, Some(create))?;
    let leaf = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    rustix::fs::renameat_with(
        staging.as_fd(),
        name.as_str(),
        pfd.as_fd(),
        leaf.as_str(),
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(sys("rename into place", live.display()))
}

/// The vfolders with a staging directory in the volume at `target` (clones
/// under way, or left behind by one whose record went).
pub fn staged(target: &Path) -> Vec<Uuid> {
    let Ok(fd) = staging_dir(target, false) else {
        return Vec::new();
    };
    let Ok(dir) = Dir::new(fd) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| Uuid::try_parse(e.file_name().to_str().ok()?).ok())
        .collect()
}

/// The staging directory of a clone of `id` in the volume at `target`.
pub fn staging_path(target: &Path, id: &Uuid) -> PathBuf {
    target.join(STAGING).join(hex(id))
}

fn staging_dir(target: &Path, create: bool) -> Result<OwnedFd, CloneError> {
    let (vol, _) = open_dir(target, target, None)?;
    if create {
        match mkdirat(vol.as_fd(), STAGING, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(sys("mkdir", target.join(STAGING).display())(e)),
        }
    }
    openat(vol.as_fd(), STAGING, DIR, Mode::empty())
        .map_err(sys("open", target.join(STAGING).display()))
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn open_or_make_dir(at: BorrowedFd<'_>, name: &CStr, what: &Path) -> Result<OwnedFd, CloneError> {
    match mkdirat(at, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(sys("mkdir", what.display())(e)),
    }
    openat(at, name, DIR, Mode::empty()).map_err(sys("open", what.display()))
}

fn copy_dir(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    owner: Owner,
    progress: &Progress,
    budget: &Budget,
    depth: usize,
) -> Result<(), CloneError> {
    if depth >= DEPTH_MAX {
        return Err(CloneError::TooDeep);
    }
    let listing =
        openat(src, c".", DIR, Mode::empty()).map_err(sys("open", "a source directory"))?;
    let entries: Vec<(CString, FileType)> = Dir::new(listing)
        .map_err(sys("read", "a source directory"))?
        .filter_map(Result::ok)
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .map(|e| (e.file_name().to_owned(), e.file_type()))
        .collect();
    for (name, kind) in entries {
        if progress.stopped() {
            return Err(CloneError::Stopped);
        }
        let kind = match kind {
            FileType::Unknown => match statat(src, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => FileType::from_raw_mode(st.st_mode),
                Err(_) => continue,
            },
            k => k,
        };
        let what = || name.to_string_lossy().into_owned();
        match kind {
            FileType::Directory => {
                let s = match openat(src, name.as_c_str(), DIR, Mode::empty()) {
                    Ok(s) => s,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(sys("open", what())(e)),
                };
                let d = open_or_make_dir(dst, name.as_c_str(), Path::new(&what()))?;
                copy_dir(s.as_fd(), d.as_fd(), owner, progress, budget, depth + 1)?;
                finish_dir(s.as_fd(), d.as_fd(), owner)?;
            }
            FileType::RegularFile => {
                copy_file(src, dst, name.as_c_str(), owner, progress, budget)?;
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            FileType::Symlink => {
                copy_link(src, dst, name.as_c_str(), owner)?;
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            // Devices, fifos and sockets are not data (and volumes are nodev).
            _ => {}
        }
    }
    Ok(())
}

fn times_of(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Mode (without set-id bits), owner and times of a copied directory, set
/// after its entries (writing them moved its mtime).
fn finish_dir(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, owner: Owner) -> Result<(), CloneError> {
    let st = rustix::fs::fstat(src).map_err(sys("stat", "a source directory"))?;
    fchown(dst, Some(uid(owner.uid)), Some(gid(owner.gid))).map_err(sys("chown", "a directory"))?;
    fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o1777)).map_err(sys("chmod", "a directory"))?;
    futimens(dst, &times_of(&st)).map_err(sys("utimens", "a directory"))
}

fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}
fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}

fn copy_file(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    owner: Owner,
    progress: &Progress,
    budget: &Budget,
) -> Result<(), CloneError> {
    let what = || name.to_string_lossy().into_owned();
    // NONBLOCK: a fifo swapped in after the listing must not hang the open;
    // only a regular file (checked on the descriptor) is copied.
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let s = match openat(src, name, flags, Mode::empty()) {
        Ok(s) => s,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(sys("open", what())(e)),
    };
    let st = rustix::fs::fstat(&s).map_err(sys("stat", what()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(());
    }
    if let Ok(have) = statat(dst, name, AtFlags::SYMLINK_NOFOLLOW) {
        let same = FileType::from_raw_mode(have.st_mode) == FileType::RegularFile
            && have.st_size == st.st_size
            && (have.st_mtime, have.st_mtime_nsec) == (st.st_mtime, st.st_mtime_nsec);
        if same {
            return Ok(());
        }
        unlinkat(dst, name, AtFlags::empty()).map_err(sys("unlink", what()))?;
    }
    // Written out whole where it cannot be reflinked (holes as zeros).
    budget.take(u64::try_from(st.st_size).unwrap_or(0))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let d = openat(dst, name, flags, Mode::from_raw_mode(0o600)).map_err(sys("create", what()))?;
    if ioctl_ficlone(&d, &s).is_ok() {
        progress.reflinked.fetch_add(1, Ordering::Relaxed);
    } else {
        let (from, mut to) = (std::fs::File::from(s), std::fs::File::from(d));
        loop {
            // copy_file_range underneath, a chunk at a time.
            use std::io::Read;
            let copied = std::io::copy(&mut (&from).take(COPY_CHUNK), &mut to)
                .map_err(|e| sys("copy", what())(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
            if copied == 0 {
                break;
            }
            if progress.stopped() {
                return Err(CloneError::Stopped);
            }
        }
        return set_file_meta(to.as_fd(), &st, owner, name);
    }
    set_file_meta(d.as_fd(), &st, owner, name)
}

fn set_file_meta(
    d: BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    owner: Owner,
    name: &CStr,
) -> Result<(), CloneError> {
    let what = || name.to_string_lossy().into_owned();
    fchown(d, Some(uid(owner.uid)), Some(gid(owner.gid))).map_err(sys("chown", what()))?;
    fchmod(d, Mode::from_raw_mode(st.st_mode & 0o1777)).map_err(sys("chmod", what()))?;
    futimens(d, &times_of(st)).map_err(sys("utimens", what()))
}

fn copy_link(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    owner: Owner,
) -> Result<(), CloneError> {
    let what = || name.to_string_lossy().into_owned();
    let st = statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(sys("stat", what()))?;
    let to = readlinkat(src, name, Vec::new()).map_err(sys("readlink", what()))?;
    match unlinkat(dst, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(sys("unlink", what())(e)),
    }
    symlinkat(to.as_c_str(), dst, name).map_err(sys("symlink", what()))?;
    rustix::fs::chownat(
        dst,
        name,
        Some(uid(owner.uid)),
        Some(gid(owner.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys("chown", what()))?;
    utimensat(dst, name, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW).map_err(sys("utimens", what()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_clone_keeps_modes_mtimes_and_links_and_lands_whole() {
        let vol = tempfile::tempdir().unwrap();
        let src = vol.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a"), b"hello").unwrap();
        std::fs::set_permissions(src.join("sub/a"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("evil")).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(src.join("sub/a"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let id = Uuid::from_bytes([3; 16]);
        let live = vol.path().join("03/03").join(hex(&id));
        let p = Progress::default();
        clone_tree(
            &src,
            vol.path(),
            &live,
            &id,
            Owner {
                uid: 1234,
                gid: 1234,
            },
            None,
            &p,
        )
        .unwrap();
        assert_eq!(std::fs::read(live.join("sub/a")).unwrap(), b"hello");
        let m = std::fs::metadata(live.join("sub/a")).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.mtime()),
            (0o640, 1234, 1_000_000)
        );
        assert_eq!(
            std::fs::read_link(live.join("evil")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert_eq!(
            std::fs::symlink_metadata(live.join("evil")).unwrap().uid(),
            1234
        );
        assert_eq!(p.done.load(Ordering::Relaxed), 2);
        assert!(!staging_path(vol.path(), &id).exists());
    }

    #[test]
    fn a_fifo_is_skipped_and_a_sparse_giant_stops_at_the_quota() {
        let vol = tempfile::tempdir().unwrap();
        let src = vol.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a"), b"x").unwrap();
        nix::unistd::mkfifo(
            &src.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let owner = Owner { uid: 0, gid: 0 };
        let id = Uuid::from_bytes([5; 16]);
        let live = vol.path().join("05/05").join(hex(&id));
        let p = Progress::default();
        clone_tree(&src, vol.path(), &live, &id, owner, None, &p).unwrap();
        assert!(live.join("a").exists() && !live.join("pipe").exists());

        std::fs::File::create(src.join("sparse"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let id = Uuid::from_bytes([6; 16]);
        let live = vol.path().join("06/06").join(hex(&id));
        let err = clone_tree(&src, vol.path(), &live, &id, owner, Some(1 << 20), &p).unwrap_err();
        assert!(matches!(err, CloneError::TooBig(_)), "{err}");
        assert!(!live.exists());
    }
}
