//! Enforced quotas on btrfs: a vfolder on a btrfs volume whose filesystem
//! has quotas enabled (`btrfs quota enable`, the operator's choice) is a
//! subvolume with a qgroup limit, so a write past `quota_bytes` fails with
//! `EDQUOT`, and its bytes are read from the qgroup in O(1)
//! (`/sys/fs/btrfs/<fsid>/qgroups/0_<subvolume id>/referenced`) instead of
//! a scan. Only ioctls here (`BTRFS_IOC_FS_INFO`, `BTRFS_IOC_SUBVOL_CREATE`,
//! `BTRFS_IOC_INO_LOOKUP`, `BTRFS_IOC_QGROUP_LIMIT`); btrfs-progs only in
//! tests. Figures settle at transaction commit (seconds).
//!
//! ext4 and xfs project quotas would be the same extension point (a project
//! id per vfolder directory and a limit); this machine's kernel has neither.
//!
//! Neither nix nor rustix wraps the btrfs ioctls: each call below passes a
//! `#[repr(C)]` struct of the size and layout of the kernel's
//! (include/uapi/linux/btrfs.h), the only unsafe code besides `mount_setattr`.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// Object id of a subvolume's root directory inode.
const FIRST_FREE_OBJECTID: u64 = 256;
/// `BTRFS_QGROUP_LIMIT_MAX_RFER`.
const LIMIT_MAX_RFER: u64 = 1;

#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// The ioctl wrappers (`_IOR`/`_IOW`/`_IOWR` numbers from btrfs.h).
mod ioc {
    #![allow(missing_docs)]
    use super::{FsInfoArgs, InoLookupArgs, QgroupLimitArgs, VolArgs};
    nix::ioctl_read!(fs_info, 0x94, 31, FsInfoArgs);
    nix::ioctl_write_ptr!(subvol_create, 0x94, 14, VolArgs);
    nix::ioctl_readwrite!(ino_lookup, 0x94, 18, InoLookupArgs);
    nix::ioctl_read!(qgroup_limit, 0x94, 43, QgroupLimitArgs);
}

/// A btrfs filesystem with quotas enabled, by its sysfs directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaFs {
    qgroups: PathBuf,
}

/// The filesystem of `dir`, if it is btrfs with quotas enabled.
pub fn quota_fs(dir: BorrowedFd<'_>) -> Option<QuotaFs> {
    let st = nix::sys::statfs::fstatfs(dir).ok()?;
    if st.filesystem_type().0 as i64 != BTRFS_SUPER_MAGIC {
        return None;
    }
    let mut args = FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 1024 - 32],
    };
    // SAFETY: the struct has the kernel's layout and size (1024 bytes).
    unsafe { ioc::fs_info(dir.as_raw_fd(), &mut args) }.ok()?;
    let fsid = uuid::Uuid::from_bytes(args.fsid).hyphenated().to_string();
    let qgroups = Path::new("/sys/fs/btrfs").join(fsid).join("qgroups");
    let enabled = std::fs::read_to_string(qgroups.join("enabled")).ok()?;
    (enabled.trim() == "1").then_some(QuotaFs { qgroups })
}

/// Makes `name` in `parent` a new subvolume.
pub fn create_subvolume(parent: BorrowedFd<'_>, name: &str) -> Result<(), Errno> {
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    if name.len() >= args.name.len() || name.contains('/') {
        return Err(Errno::EINVAL);
    }
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the struct has the kernel's layout and size (4096 bytes).
    unsafe { ioc::subvol_create(parent.as_raw_fd(), &args) }.map(drop)
}

/// The subvolume id of `dir` if it is a subvolume's root directory.
pub fn subvolume_id(dir: BorrowedFd<'_>) -> Option<u64> {
    let st = nix::sys::stat::fstat(dir).ok()?;
    if st.st_ino != FIRST_FREE_OBJECTID {
        return None;
    }
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; 4080],
    };
    // SAFETY: the struct has the kernel's layout and size (4096 bytes).
    unsafe { ioc::ino_lookup(dir.as_raw_fd(), &mut args) }.ok()?;
    Some(args.treeid)
}

/// Sets the referenced-bytes limit of the subvolume at `dir` (`None`: no limit).
pub fn set_limit(dir: BorrowedFd<'_>, bytes: Option<u64>) -> Result<(), Errno> {
    let mut args = QgroupLimitArgs {
        qgroupid: 0, // the subvolume `dir` is in
        flags: LIMIT_MAX_RFER,
        max_rfer: bytes.unwrap_or(u64::MAX),
        max_excl: 0,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    // SAFETY: the struct has the kernel's layout and size (48 bytes).
    unsafe { ioc::qgroup_limit(dir.as_raw_fd(), &mut args) }.map(drop)
}

/// A subvolume's qgroup figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qgroup {
    /// Bytes referenced (as of the last commit).
    pub referenced: u64,
    /// Its limit (`None`: none).
    pub limit: Option<u64>,
}

impl QuotaFs {
    /// The figures of subvolume `id`.
    pub fn qgroup(&self, id: u64) -> Option<Qgroup> {
        let dir = self.qgroups.join(format!("0_{id}"));
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let flags = read("limit_flags").unwrap_or(0);
        let max = read("max_referenced")?;
        Some(Qgroup {
            referenced: read("referenced")?,
            limit: (flags & LIMIT_MAX_RFER != 0 && max != u64::MAX).then_some(max),
        })
    }
}

/// Makes vfolder directory `name` in `parent` a subvolume with `limit`,
/// owned by `uid:gid`, mode 0755, if `parent` is on btrfs with quotas
/// enabled. `Ok(false)`: it is not (make a plain directory). A subvolume
/// made but not finished is removed again (an empty one `rmdir`s).
pub fn make_limited(
    parent: BorrowedFd<'_>,
    name: &str,
    owner: (u32, u32),
    limit: Option<u64>,
) -> Result<bool, Errno> {
    if quota_fs(parent).is_none() {
        return Ok(false);
    }
    create_subvolume(parent, name)?;
    let finish = || -> Result<(), Errno> {
        let fd: OwnedFd = nix::fcntl::openat(
            parent,
            name,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW,
            nix::sys::stat::Mode::empty(),
        )?;
        nix::unistd::fchown(&fd, Some(owner.0.into()), Some(owner.1.into()))?;
        nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o755))?;
        set_limit(fd.as_fd(), limit)
    };
    if let Err(e) = finish() {
        let _ = nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::RemoveDir);
        return Err(e);
    }
    Ok(true)
}
