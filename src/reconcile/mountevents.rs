//! Which mounts came and went, from the kernel: fanotify's mount events
//! (Linux 6.15+, `FAN_REPORT_MNT` with a `FAN_MARK_MNTNS` mark on the
//! namespace). Each attach or detach of a mount in vfolderd's namespace
//! queues one event carrying its unique mount id (a move is both), so the
//! table is kept with one `statmount` per change instead of listing every
//! mount. A queue that overflowed (16,384 events unread) says so, and the
//! table is then listed again.
//!
//! Neither libc nor rustix names these flags yet: the values are from
//! include/uapi/linux/fanotify.h (checked on this machine: one attach and
//! one detach event per tmpfs mounted and unmounted).

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const FAN_REPORT_MNT: libc::c_uint = 0x0000_4000;
const FAN_MARK_MNTNS: libc::c_uint = 0x0000_0110;
const FAN_MNT_ATTACH: u64 = 0x0100_0000;
const FAN_MNT_DETACH: u64 = 0x0200_0000;
const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
const FAN_EVENT_INFO_TYPE_MNT: u8 = 7;
/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8,
/// metadata_len u16, mask u64, fd i32, pid i32.
const METADATA_LEN: usize = 24;
/// `FANOTIFY_METADATA_VERSION`.
const METADATA_VERSION: u8 = 3;

/// What was read from the queue.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drained {
    /// Mounts attached (or moved), in order.
    pub attached: Vec<u64>,
    /// Mounts detached (or moved away), in order.
    pub detached: Vec<u64>,
    /// Events were lost: list the table again.
    pub overflow: bool,
}

/// A fanotify group watching vfolderd's mount namespace.
#[derive(Debug)]
pub struct MountEvents {
    fd: OwnedFd,
}

impl MountEvents {
    /// Watches the calling thread's mount namespace; fails on kernels
    /// before 6.15 (`EINVAL`) and without `CAP_SYS_ADMIN` (`EPERM`).
    pub fn open() -> Result<Self, Errno> {
        let flags = libc::FAN_CLASS_NOTIF | FAN_REPORT_MNT | libc::FAN_NONBLOCK | libc::FAN_CLOEXEC;
        // SAFETY: plain system call; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as libc::c_uint) };
        let fd = unsafe { OwnedFd::from_raw_fd(Errno::result(fd)?) };
        let ns = std::fs::File::open("/proc/self/ns/mnt")
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        // SAFETY: both descriptors are open for the call; the path is null
        // (the mark is on the namespace of `ns`).
        let r = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | FAN_MARK_MNTNS,
                FAN_MNT_ATTACH | FAN_MNT_DETACH,
                ns.as_raw_fd(),
                std::ptr::null(),
            )
        };
        Errno::result(r)?;
        Ok(Self { fd })
    }

    /// Reads every queued event without waiting.
    pub fn drain(&self) -> Result<Drained, Errno> {
        let mut out = Drained::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = nix::unistd::read(&self.fd, &mut buf);
            match n {
                Ok(0) | Err(Errno::EAGAIN) => return Ok(out),
                Ok(n) => parse(&buf[..n], &mut out),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Adds the events in `buf` (whole events, as `read` returns them) to `out`.
fn parse(buf: &[u8], out: &mut Drained) {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]) as usize;
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
    let mut at = 0;
    while buf.len() - at >= METADATA_LEN {
        let ev = &buf[at..];
        let (len, meta) = (u32_at(ev, 0), u16_at(ev, 6));
        if ev[4] != METADATA_VERSION
            || len < METADATA_LEN
            || len > ev.len()
            || meta < METADATA_LEN
            || meta > len
        {
            out.overflow = true; // not what the kernel writes: trust nothing
            return;
        }
        let mask = u64_at(ev, 8);
        if mask & FAN_Q_OVERFLOW != 0 {
            out.overflow = true;
        }
        let named = out.attached.len() + out.detached.len();
        let mut info = meta;
        while len - info >= 16 {
            let (kind, ilen) = (ev[info], u16_at(ev, info + 2));
            if ilen < 4 || info + ilen > len {
                break;
            }
            if kind == FAN_EVENT_INFO_TYPE_MNT && ilen >= 16 {
                let id = u64_at(ev, info + 8);
                if mask & FAN_MNT_DETACH != 0 {
                    out.detached.push(id);
                }
                if mask & FAN_MNT_ATTACH != 0 {
                    out.attached.push(id);
                }
            }
            info += ilen;
        }
        if mask & (FAN_MNT_ATTACH | FAN_MNT_DETACH) != 0
            && out.attached.len() + out.detached.len() == named
        {
            out.overflow = true; // a mount event naming no mount
        }
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel writes it (see the module doc).
    fn event(mask: u64, id: u64) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&40u32.to_ne_bytes());
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(&24u16.to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&1i32.to_ne_bytes());
        e.extend_from_slice(&[FAN_EVENT_INFO_TYPE_MNT, 0]);
        e.extend_from_slice(&16u16.to_ne_bytes());
        e.extend_from_slice(&[0; 4]);
        e.extend_from_slice(&id.to_ne_bytes());
        e
    }

    #[test]
    fn events_parse_into_attached_and_detached_ids_and_a_move_is_both() {
        let mut buf = event(FAN_MNT_ATTACH, 7);
        buf.extend(event(FAN_MNT_DETACH, 8));
        buf.extend(event(FAN_MNT_ATTACH | FAN_MNT_DETACH, 9));
        let mut out = Drained::default();
        parse(&buf, &mut out);
        assert_eq!(out.attached, [7, 9]);
        assert_eq!(out.detached, [8, 9]);
        assert!(!out.overflow);
        // A truncated or lying event spoils the read: list again.
        let mut out = Drained::default();
        let mut bad = event(FAN_MNT_ATTACH, 7);
        bad[0] = 200;
        parse(&bad, &mut out);
        assert!(out.overflow);
    }

    /// The real kernel: a tmpfs mounted and unmounted in this namespace is
    /// one attach and one detach of the id `statmount` gives it.
    #[test]
    fn a_mount_and_its_unmount_are_one_attach_and_one_detach() {
        let events = MountEvents::open().expect("fanotify mount events (Linux 6.15+, root)");
        let dir = tempfile::tempdir().unwrap();
        let none = None::<&str>;
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            none,
        )
        .expect("mount (root, in a private mount namespace)");
        let table = crate::reconcile::actual::MountInfoSource::read(
            &crate::reconcile::mountapi::StatmountTable::default(),
        )
        .unwrap();
        let id = table.top(dir.path()).unwrap().id;
        nix::mount::umount2(dir.path(), nix::mount::MntFlags::empty()).unwrap();
        let got = events.drain().unwrap();
        let once = |ids: &[u64]| ids.iter().filter(|i| **i == id).count() == 1;
        assert!(once(&got.attached), "{got:?}: not one attach of {id}");
        assert!(once(&got.detached), "{got:?}: not one detach of {id}");
    }
}
