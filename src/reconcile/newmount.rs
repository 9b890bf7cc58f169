//! Binds made whole before they are attached, with the new mount API
//! (Linux 5.12+ for `mount_setattr`; `open_tree` and `move_mount` are 5.2+):
//! `open_tree(OPEN_TREE_CLONE)` makes a detached copy of the source,
//! `mount_setattr` sets read-only, nosuid and nodev on it, `move_mount`
//! attaches it. The old way (`MS_BIND`, then `MS_REMOUNT|MS_BIND` for the
//! flags) leaves a read-only bind writable, and without nosuid, between the
//! two calls.
//!
//! rustix 1.1 wraps `open_tree` and `move_mount` but not `mount_setattr`,
//! nor does nix 0.32; libc has its number (`SYS_mount_setattr`, 442 on every
//! architecture but alpha) and `struct mount_attr` (include/uapi/linux/mount.h,
//! Linux 5.12). That one call is the only unsafe code in vfolderd.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

/// What a new bind is before anyone can see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindAttrs {
    /// Read-only.
    pub readonly: bool,
    /// Ids to show differently through this bind (an idmapped bind).
    pub idmap: Option<IdMap>,
    /// In a peer group of its own (`MS_SHARED`) from its first moment: a
    /// kernel home, whose later binds reach the containers that bind it.
    pub shared: bool,
}

/// One uid and one gid seen through a bind as another: files the volume's
/// owner owns appear as the kernel's, and what the kernel writes lands as
/// the volume owner's. No file is chowned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdMap {
    /// (on disk, as the kernel sees it).
    pub uid: (u32, u32),
    /// (on disk, as the kernel sees it).
    pub gid: (u32, u32),
}

/// A user namespace holding `map` (an `O_RDONLY` descriptor of its
/// `/proc/<pid>/ns/user`), for `MOUNT_ATTR_IDMAP`. `unshare(CLONE_NEWUSER)`
/// fails in a threaded process, so a child is cloned into a new user
/// namespace; it only waits while its maps are written and its namespace is
/// opened, then it is killed. The mapping line is "on-disk id, kernel id, 1":
/// an idmapped mount reads on-disk ids as ids inside the namespace and shows
/// them as the ids outside (Documentation/filesystems/idmappings.rst).
pub fn userns_for(map: IdMap) -> Result<std::os::fd::OwnedFd, Errno> {
    use nix::sched::CloneFlags;
    use nix::sys::signal::{kill, Signal};
    let mut stack = vec![0u8; 64 * 1024];
    let parent = nix::unistd::getpid();
    // SAFETY: the child runs only `prctl`, `getppid` and `pause`
    // (async-signal-safe system calls) until it is killed or returns,
    // touching nothing the parent's other threads may hold.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| {
                // Never outlives vfolderd: killed with it if it dies before
                // it kills the child (or gone already if it died before).
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                if nix::unistd::getppid() != parent {
                    return 0;
                }
                loop {
                    nix::unistd::pause();
                }
            }),
            &mut stack,
            CloneFlags::CLONE_NEWUSER,
            Some(libc::SIGCHLD),
        )
    }?;
    let io = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let opened = (|| {
        let (u, g) = (map.uid, map.gid);
        std::fs::write(
            format!("/proc/{pid}/uid_map"),
            format!("{} {} 1\n", u.0, u.1),
        )
        .map_err(io)?;
        std::fs::write(
            format!("/proc/{pid}/gid_map"),
            format!("{} {} 1\n", g.0, g.1),
        )
        .map_err(io)?;
        std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .map(std::os::fd::OwnedFd::from)
            .map_err(io)
    })();
    let _ = kill(pid, Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
    opened
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, attr)`: sets `set` and clears
/// `clear` on the mount `fd` refers to (not recursively), and its
/// propagation type when `propagation` is one (`MS_SHARED`; 0 keeps it).
pub fn mount_setattr(
    fd: BorrowedFd<'_>,
    set: u64,
    clear: u64,
    propagation: u64,
    userns: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clear,
        propagation,
        userns_fd: userns.map_or(0, |u| u.as_raw_fd() as u64),
    };
    // SAFETY: the path is a NUL-terminated empty string, `attr` lives across
    // the call and its size is passed; the kernel only reads from both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// A detached copy of the mount at `dir` (`open_tree(OPEN_TREE_CLONE)`),
/// without the mounts below it. Binding a directory from it costs no walk
/// over the original's submounts: `open_tree` of a subdirectory looks at
/// every mount below the source mount (`has_locked_children`, fs/namespace.c),
/// and below the kernels root sits every kernel's home.
///
/// `EINVAL` where the kernel cannot copy from a detached mount (before
/// Linux 6.15 `open_tree` clones only from the caller's own namespace):
/// tried once here, so a copy returned is one binds can be made from.
pub fn detached_copy(dir: &std::path::Path) -> Result<std::os::fd::OwnedFd, Errno> {
    let errno = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    let copy = open_tree(
        rustix::fs::CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(errno)?;
    use std::os::fd::AsFd;
    open_tree(
        copy.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(errno)?;
    Ok(copy)
}

/// `STATX_MNT_ID_UNIQUE` (include/uapi/linux/stat.h, Linux 6.8): rustix 1.1
/// names only the reused 32-bit `STATX_MNT_ID`.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// The two ids the kernel gives a mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountIds {
    /// The 64-bit one `statmount` and fanotify name it by, never reused
    /// until reboot (Linux 6.8+).
    pub unique: Option<u64>,
    /// The 32-bit one mountinfo shows, handed out lowest-free first, so
    /// reused as soon as the mount goes (Linux 5.8+).
    pub short: Option<u64>,
}

/// The ids of the mount `path` (relative to `dir`; empty for `dir` itself)
/// is on, symlinks not followed; each `None` where the kernel lacks it.
pub fn mount_ids(dir: BorrowedFd<'_>, path: &std::path::Path) -> MountIds {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let mut flags = AtFlags::SYMLINK_NOFOLLOW;
    if path.as_os_str().is_empty() {
        flags |= AtFlags::EMPTY_PATH;
    }
    let ask = |mask: u32| {
        let st = statx(dir, path, flags, StatxFlags::from_bits_retain(mask)).ok()?;
        (st.stx_mask & mask != 0).then_some(st.stx_mnt_id)
    };
    MountIds {
        unique: ask(STATX_MNT_ID_UNIQUE),
        short: ask(StatxFlags::MNT_ID.bits()),
    }
}

/// Binds the directory `source` onto the directory `target` (both `O_PATH`
/// descriptors), nosuid, nodev, and read-only and shared if asked, from its
/// first moment; `userns` carries the mapping of an idmapped bind. Returns
/// the new mount's ids, read from the detached copy before it is attached
/// (so they name this mount, not one someone stacks on it after). `ENOSYS`
/// where the kernel lacks the calls.
pub fn bind(
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attrs: &BindAttrs,
    userns: Option<BorrowedFd<'_>>,
) -> Result<MountIds, Errno> {
    let errno = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    // Not AT_RECURSIVE: like MS_BIND without MS_REC, mounts below the
    // source stay out of the kernel's view.
    let tree = open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(errno)?;
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if attrs.readonly {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    if userns.is_some() {
        set |= libc::MOUNT_ATTR_IDMAP;
    }
    // A fresh peer group, made on the detached copy: one call fewer per
    // home than a mount(MS_SHARED) after the attach, and no moment unshared.
    let propagation = if attrs.shared { libc::MS_SHARED } else { 0 };
    use std::os::fd::AsFd;
    mount_setattr(tree.as_fd(), set, 0, propagation, userns)?;
    let id = mount_ids(tree.as_fd(), std::path::Path::new(""));
    move_mount(
        tree.as_fd(),
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)?;
    Ok(id)
}
