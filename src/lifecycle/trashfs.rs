//! The trash on a volume, as directories: `<volume>/.trash/<hex>` is a
//! trashed vfolder (moved there by one rename), `<hex>.info` says when it was
//! trashed and when its record was deleted, and `<hex>.purging` is a purge
//! under way. The trash is the journal: a purge empties `<hex>.purging`
//! bottom-up, so whoever finds it (this node after a crash, or another
//! storage node) carries on where it stopped.
//!
//! Every operation works from descriptors and never follows a symlink: the
//! files are the user's, and a user can make any of them a link.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::reconcile::fsops::{open_dir, FsError};

/// The trash directory's name in a volume.
pub const TRASH: &str = ".trash";
const PURGING: &str = ".purging";
const INFO: &str = ".info";
/// Deeper than this, a purge moves a directory up to the purge's top level
/// instead of descending (each level holds a descriptor; a user can nest
/// directories far deeper than the descriptor limit).
const PURGE_DEPTH: usize = 64;

/// Errors of trash operations.
#[derive(Debug, thiserror::Error)]
pub enum TrashError {
    /// Opening a path below the volume failed.
    #[error(transparent)]
    Path(#[from] FsError),
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
    /// The place to move to is taken (a directory was made there meanwhile).
    #[error("{0} already exists; not moved")]
    Taken(String),
}

fn sys(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(Errno) -> TrashError {
    let what = what.to_string();
    move |errno| TrashError::Sys { op, what, errno }
}

/// When a trashed vfolder went to the trash, and when its record was deleted
/// (unix seconds). Kept beside it, so the retention survives a restart and
/// another storage node reads the same clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Moved to the trash.
    pub trashed_at: u64,
    /// Its record was deleted (the retention counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<u64>,
}

/// One vfolder's entries in the trash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// `<hex>`: trashed.
    pub trashed: bool,
    /// `<hex>.purging`: a purge is under way.
    pub purging: bool,
    /// `<hex>.info`, if it reads.
    pub info: Option<Info>,
}

/// `<hex>` of a vfolder (its trash name).
pub fn hex(id: &Uuid) -> String {
    id.simple().to_string()
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens (with `create`, makes: root, 0700) the volume's trash directory.
pub fn open_trash(volume: &Path, create: bool) -> Result<Option<OwnedFd>, TrashError> {
    let (vol, _) = open_dir(volume, volume, None)?;
    if create {
        match mkdirat(vol.as_fd(), TRASH, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(sys("mkdir", volume.join(TRASH).display())(e)),
        }
    }
    match openat(vol.as_fd(), TRASH, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) if !create => Ok(None),
        Err(e) => Err(sys("open", volume.join(TRASH).display())(e)),
    }
}

/// What the trash of `volume` holds, by vfolder (one `getdents` pass).
pub fn list(volume: &Path) -> Result<BTreeMap<Uuid, Entry>, TrashError> {
    let mut out: BTreeMap<Uuid, Entry> = BTreeMap::new();
    let Some(fd) = open_trash(volume, false)? else {
        return Ok(out);
    };
    let mut dir = Dir::from_fd(fd).map_err(sys("read", volume.join(TRASH).display()))?;
    let mut infos = Vec::new();
    for e in dir.iter().flatten() {
        let Ok(name) = e.file_name().to_str() else {
            continue;
        };
        let (stem, kind) = match name.split_once('.') {
            Some((stem, rest)) => (stem, Some(rest)),
            None => (name, None),
        };
        let Ok(id) = Uuid::try_parse(stem) else {
            continue;
        };
        let entry = out.entry(id).or_default();
        match kind {
            None => entry.trashed = true,
            Some("purging") => entry.purging = true,
            Some("info") => infos.push(id),
            Some(_) => {}
        }
    }
    let fd = dir.as_fd();
    for id in infos {
        if let Some(e) = out.get_mut(&id) {
            e.info = read_info(fd, &id);
        }
    }
    Ok(out)
}

fn read_info(trash: BorrowedFd<'_>, id: &Uuid) -> Option<Info> {
    let name = format!("{}{INFO}", hex(id));
    let fd = openat(
        trash,
        name.as_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `<hex>.info` (0600, whole or not at all: a temporary file renamed).
pub fn write_info(volume: &Path, id: &Uuid, info: Info) -> Result<(), TrashError> {
    let trash = open_trash(volume, true)?.expect("created");
    let (tmp, name) = (
        format!("{}{INFO}.tmp", hex(id)),
        format!("{}{INFO}", hex(id)),
    );
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        trash.as_fd(),
        tmp.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(sys("create", &tmp))?;
    let body = serde_json::to_vec(&info).expect("plain struct");
    let mut f = std::fs::File::from(fd);
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(|e| sys("write", &tmp)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    nix::fcntl::renameat(trash.as_fd(), tmp.as_str(), trash.as_fd(), name.as_str())
        .map_err(sys("rename", &name))
}

fn rename_noreplace(
    from: BorrowedFd<'_>,
    from_name: &str,
    to: BorrowedFd<'_>,
    to_name: &str,
    what: &Path,
) -> Result<(), TrashError> {
    use rustix::fs::{renameat_with, RenameFlags};
    match renameat_with(from, from_name, to, to_name, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(TrashError::Taken(what.display().to_string())),
        Err(e) => Err(sys("rename", what.display())(Errno::from_raw(
            e.raw_os_error(),
        ))),
    }
}

fn parent_and_name(volume: &Path, live: &Path) -> Result<(OwnedFd, String), TrashError> {
    let parent = live.parent().unwrap_or(volume);
    let name = live
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| TrashError::Taken(live.display().to_string()))?;
    let (fd, _) = open_dir(volume, parent, None)?;
    Ok((fd, name.to_string()))
}

/// Moves the vfolder at `live` into the trash (one rename), then records
/// `info` beside it.
pub fn move_to_trash(volume: &Path, live: &Path, id: &Uuid, info: Info) -> Result<(), TrashError> {
    let trash = open_trash(volume, true)?.expect("created");
    let (parent, name) = parent_and_name(volume, live)?;
    let to = volume.join(TRASH).join(hex(id));
    // An info left from before (a crash) must not date this trashing.
    remove_info(trash.as_fd(), id);
    rename_noreplace(parent.as_fd(), &name, trash.as_fd(), &hex(id), &to)?;
    write_info(volume, id, info)
}

/// Moves a trashed vfolder back to `live` (one rename) and drops its info.
pub fn restore(volume: &Path, live: &Path, id: &Uuid) -> Result<(), TrashError> {
    let Some(trash) = open_trash(volume, false)? else {
        return Ok(());
    };
    let (parent, name) = parent_and_name(volume, live)?;
    // Info first: one left behind would date a later trashing.
    remove_info(trash.as_fd(), id);
    rename_noreplace(trash.as_fd(), &hex(id), parent.as_fd(), &name, live)?;
    Ok(())
}

fn remove_info(trash: BorrowedFd<'_>, id: &Uuid) {
    let name = format!("{}{INFO}", hex(id));
    let _ = unlinkat(trash.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir);
}

/// Starts a purge: `<hex>` becomes `<hex>.purging` (from here on it only
/// empties; a record made again gets a fresh directory).
pub fn start_purge(volume: &Path, id: &Uuid) -> Result<(), TrashError> {
    let trash = open_trash(volume, false)?.ok_or_else(|| TrashError::Taken(TRASH.into()))?;
    let to = format!("{}{PURGING}", hex(id));
    rename_noreplace(
        trash.as_fd(),
        &hex(id),
        trash.as_fd(),
        &to,
        &volume.join(TRASH).join(&to),
    )
}

/// Hands a clone's leftover staging directory (`<volume>/<staging>/<hex>`,
/// a partial copy: its clone's record went, or the vfolder got its
/// directory another way) to the purge, as `<hex>.purging`. Not a user's
/// data, so no retention: the next round empties it. Nothing happens if a
/// purge of that vfolder is under way already.
pub fn purge_staged(volume: &Path, staging: &str, id: &Uuid) -> Result<(), TrashError> {
    let trash = open_trash(volume, true)?.ok_or_else(|| TrashError::Taken(TRASH.into()))?;
    let (from, _) = open_dir(volume, &volume.join(staging), None)?;
    let to = format!("{}{PURGING}", hex(id));
    rename_noreplace(
        from.as_fd(),
        &hex(id),
        trash.as_fd(),
        &to,
        &volume.join(TRASH).join(&to),
    )
}

/// The purge directory of `id`, for counting what is left.
pub fn purging_path(volume: &Path, id: &Uuid) -> PathBuf {
    volume.join(TRASH).join(format!("{}{PURGING}", hex(id)))
}

/// Removes up to `budget` entries of `<hex>.purging`, deepest first; once it
/// is empty, removes it and the info. Returns how many files (entries that
/// are not directories) went and whether the purge is finished.
pub fn purge_some(volume: &Path, id: &Uuid, budget: usize) -> Result<(u64, bool), TrashError> {
    let Some(trash) = open_trash(volume, false)? else {
        return Ok((0, true));
    };
    let name = format!("{}{PURGING}", hex(id));
    let root = match openat(trash.as_fd(), name.as_str(), DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok((0, true)),
        Err(e) => return Err(sys("open", &name)(e)),
    };
    let mut left = Budget {
        entries: budget,
        files: 0,
    };
    let empty = empty_some(root.as_fd(), root.as_fd(), 0, &mut left)
        .map_err(sys("purge", volume.join(TRASH).join(&name).display()))?;
    let removed = left.files;
    if !empty {
        return Ok((removed, false));
    }
    // The info is the purge's only while no newer `<hex>` is trashed beside it.
    let newer = nix::sys::stat::fstatat(
        trash.as_fd(),
        hex(id).as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_ok();
    if !newer {
        remove_info(trash.as_fd(), id);
    }
    match unlinkat(trash.as_fd(), name.as_str(), UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(sys("rmdir", &name)(e)),
    }
    Ok((removed, true))
}

/// What one purge step may still remove, and the files it removed.
struct Budget {
    entries: usize,
    files: u64,
}

/// Removes entries below `dir` until `left` runs out; true if `dir` is
/// empty. Directories deeper than [`PURGE_DEPTH`] are moved up to `top`
/// (same filesystem, one rename) rather than descended into.
fn empty_some(
    top: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    depth: usize,
    left: &mut Budget,
) -> Result<bool, Errno> {
    let fd = openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    let mut d = Dir::from_fd(fd)?;
    // At most what the budget can remove: a flat directory of millions
    // is read a budget at a time, not whole on every call.
    let names: Vec<(std::ffi::CString, Option<Type>)> = d
        .iter()
        .flatten()
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .take(left.entries)
        .map(|e| (e.file_name().to_owned(), e.file_type()))
        .collect();
    for (name, kind) in names {
        if left.entries == 0 {
            return Ok(false);
        }
        let is_dir = match kind {
            Some(t) => t == Type::Directory,
            None => nix::sys::stat::fstatat(
                dir,
                name.as_c_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| {
                let fmt = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode);
                fmt & nix::sys::stat::SFlag::S_IFMT == nix::sys::stat::SFlag::S_IFDIR
            }),
        };
        if !is_dir {
            match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {
                    left.entries -= 1;
                    left.files += 1;
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        if depth + 1 >= PURGE_DEPTH {
            let up = format!("deep-{}", Uuid::new_v4().simple());
            nix::fcntl::renameat(dir, name.as_c_str(), top, up.as_str())?;
            left.entries -= 1;
            continue;
        }
        let child = match openat(dir, name.as_c_str(), DIR_FLAGS, Mode::empty()) {
            Ok(c) => c,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        if !empty_some(top, child.as_fd(), depth + 1, left)? {
            return Ok(false);
        }
        match unlinkat(dir, name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => left.entries = left.entries.saturating_sub(1),
            Err(e) => return Err(e),
        }
    }
    // Whatever is left (entries moved up from deeper levels) is seen on the next call.
    let mut again = Dir::openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    let empty = again
        .iter()
        .flatten()
        .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
    Ok(empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Uuid {
        Uuid::parse_str("0123abcd-0000-4000-8000-000000000000").unwrap()
    }

    #[test]
    fn trash_restore_and_purge_work_from_the_directories_alone() {
        let vol = tempfile::tempdir().unwrap();
        let live = vol.path().join("01/23").join(hex(&id()));
        std::fs::create_dir_all(live.join("a/b")).unwrap();
        std::fs::write(live.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", live.join("link")).unwrap();
        let info = Info {
            trashed_at: 5,
            deleted_at: None,
        };
        move_to_trash(vol.path(), &live, &id(), info).unwrap();
        assert!(!live.exists());
        let listed = list(vol.path()).unwrap();
        assert_eq!(
            listed[&id()],
            Entry {
                trashed: true,
                purging: false,
                info: Some(info)
            }
        );
        restore(vol.path(), &live, &id()).unwrap();
        assert!(live.join("a/b/f").exists());
        assert!(list(vol.path()).unwrap().is_empty());

        move_to_trash(vol.path(), &live, &id(), info).unwrap();
        start_purge(vol.path(), &id()).unwrap();
        let (n, done) = purge_some(vol.path(), &id(), 1).unwrap();
        assert_eq!((n, done), (1, false));
        while !purge_some(vol.path(), &id(), 1).unwrap().1 {}
        assert!(list(vol.path()).unwrap().is_empty());
        assert!(std::path::Path::new("/etc/passwd").exists());
    }

    #[test]
    fn a_purge_of_a_tree_deeper_than_the_descriptor_budget_finishes() {
        let vol = tempfile::tempdir().unwrap();
        let live = vol.path().join("01/23").join(hex(&id()));
        let mut p = live.clone();
        for _ in 0..(PURGE_DEPTH * 3) {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("f"), b"x").unwrap();
        move_to_trash(vol.path(), &live, &id(), Info::default()).unwrap();
        start_purge(vol.path(), &id()).unwrap();
        let mut rounds = 0;
        while !purge_some(vol.path(), &id(), 1000).unwrap().1 {
            rounds += 1;
            assert!(rounds < 100, "purge does not finish");
        }
        assert!(!purging_path(vol.path(), &id()).exists());
    }
}
