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
#[derive(Debug, Clone, Copy, Default)]
pub struct BindAttrs<'a> {
    /// Read-only.
    pub readonly: bool,
    /// A user namespace whose mapping the bind applies (an idmapped bind).
    pub idmap: Option<BorrowedFd<'a>>,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, attr)`: sets `set` and clears
/// `clear` on the mount `fd` refers to (not recursively).
pub fn mount_setattr(
    fd: BorrowedFd<'_>,
    set: u64,
    clear: u64,
    userns: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
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

/// Binds the directory `source` onto the directory `target` (both `O_PATH`
/// descriptors), nosuid, nodev and as `attrs` say from its first moment.
/// `ENOSYS` where the kernel lacks the calls.
pub fn bind(
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attrs: BindAttrs<'_>,
) -> Result<(), Errno> {
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
    if attrs.idmap.is_some() {
        set |= libc::MOUNT_ATTR_IDMAP;
    }
    use std::os::fd::AsFd;
    mount_setattr(tree.as_fd(), set, 0, attrs.idmap)?;
    move_mount(
        tree.as_fd(),
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)
}
