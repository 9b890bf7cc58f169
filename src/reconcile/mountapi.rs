//! The mount table read with `listmount(2)` and `statmount(2)` (Linux 6.8;
//! the source and subtype fields 6.13): the namespace's mount ids, then one
//! binary record per mount, instead of the kernel generating, and vfolderd
//! parsing, a line of text per mount. A re-read lists the ids (8 bytes per
//! mount) and asks only about the new ones.
//!
//! Its ids are the 64-bit unique mount ids, never reused while the machine
//! is up; mountinfo's 32-bit ids are reused at once, so a verdict about a
//! mount (the prober's) could land on the mount that replaced it.
//!
//! Neither call is wrapped by libc, nix or rustix yet: the numbers and the
//! structures are from include/uapi/linux/mount.h (457 and 458 on every
//! architecture but alpha and mips). These are the only raw system calls
//! here besides `mount_setattr` and the btrfs ioctls.

#![allow(unsafe_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;

use crate::reconcile::actual::{
    unescape_bytes, MountEntry, MountInfoError, MountInfoSource, MountTable,
};

const SYS_STATMOUNT: libc::c_long = 457;
const SYS_LISTMOUNT: libc::c_long = 458;

/// `listmount`'s id for "the root of the caller's namespace": every mount.
const LSMT_ROOT: u64 = u64::MAX;
/// The first published size of `struct mnt_id_req` (6.8 accepts no other).
const MNT_ID_REQ_SIZE_VER0: u32 = 24;

const STATMOUNT_SB_BASIC: u64 = 0x1;
const STATMOUNT_MNT_BASIC: u64 = 0x2;
const STATMOUNT_MNT_ROOT: u64 = 0x8;
const STATMOUNT_MNT_POINT: u64 = 0x10;
const STATMOUNT_FS_TYPE: u64 = 0x20;
const STATMOUNT_MNT_OPTS: u64 = 0x80;
const STATMOUNT_FS_SUBTYPE: u64 = 0x100;
const STATMOUNT_SB_SOURCE: u64 = 0x200;
/// Everything a [`MountEntry`] holds.
const WANT: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_MNT_OPTS
    | STATMOUNT_FS_SUBTYPE
    | STATMOUNT_SB_SOURCE;

/// `MOUNT_ATTR_*` bits of `mnt_attr` with mountinfo's names, in its order
/// (`show_mnt_opts`). Relatime and strictatime are not told apart
/// (`MOUNT_ATTR_RELATIME` is 0): neither is named.
const ATTRS: [(u64, &str); 7] = [
    (0x2, "nosuid"),
    (0x4, "nodev"),
    (0x8, "noexec"),
    (0x10, "noatime"),
    (0x80, "nodiratime"),
    (0x20_0000, "nosymfollow"),
    (0x10_0000, "idmapped"),
];
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const SB_RDONLY: u32 = 0x1;
/// `mnt_propagation` of a mount in a peer group.
const MS_SHARED: u64 = 1 << 20;

#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// `struct statmount` up to the fields read here; the strings follow the
/// whole 512-byte structure.
#[repr(C)]
#[derive(Clone, Copy)]
struct Statmount {
    size: u32,
    mnt_opts: u32,
    mask: u64,
    sb_dev_major: u32,
    sb_dev_minor: u32,
    sb_magic: u64,
    sb_flags: u32,
    fs_type: u32,
    mnt_id: u64,
    mnt_parent_id: u64,
    mnt_id_old: u32,
    mnt_parent_id_old: u32,
    mnt_attr: u64,
    mnt_propagation: u64,
    mnt_peer_group: u64,
    mnt_master: u64,
    propagate_from: u64,
    mnt_root: u32,
    mnt_point: u32,
    mnt_ns_id: u64,
    fs_subtype: u32,
    sb_source: u32,
}
const STATMOUNT_SIZE: usize = 512;

/// The ids of every mount in the caller's namespace.
pub fn list_ids() -> Result<Vec<u64>, Errno> {
    let mut ids: Vec<u64> = Vec::with_capacity(1024);
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER0,
            spare: 0,
            mnt_id: LSMT_ROOT,
            param: ids.last().copied().unwrap_or(0),
        };
        let room = ids.capacity() - ids.len();
        // SAFETY: the kernel writes at most `room` u64s into the spare
        // capacity past `len`, and returns how many it wrote.
        let n = unsafe {
            libc::syscall(
                SYS_LISTMOUNT,
                &req as *const MntIdReq,
                ids.as_mut_ptr().add(ids.len()),
                room,
                0u32,
            )
        };
        let n = usize::try_from(n).map_err(|_| Errno::last())?;
        // SAFETY: the kernel initialised `n` ≤ `room` more elements.
        unsafe { ids.set_len(ids.len() + n.min(room)) };
        if n < room {
            return Ok(ids);
        }
        ids.reserve(ids.len());
    }
}

/// One mount, by id; `ENOENT` once it is gone.
pub fn stat_mount(id: u64) -> Result<MountEntry, Errno> {
    let (sm, buf) = stat_raw(id)?;
    // SAFETY: viewing initialised u64s as bytes.
    let raw: &[u8] =
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 8) };
    Ok(entry(&sm, &raw[..(sm.size as usize).min(raw.len())]))
}

/// The record of one mount, and the buffer holding its strings.
fn stat_raw(id: u64) -> Result<(Statmount, Vec<u64>), Errno> {
    let mut buf = vec![0u64; 512];
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER0,
            spare: 0,
            mnt_id: id,
            param: WANT,
        };
        let bytes = buf.len() * 8;
        // SAFETY: the kernel writes at most `bytes` bytes into `buf`.
        let r = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &req as *const MntIdReq,
                buf.as_mut_ptr(),
                bytes,
                0u32,
            )
        };
        match Errno::result(r) {
            Ok(_) => break,
            Err(Errno::EOVERFLOW) if bytes < 1 << 24 => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
    // SAFETY: `buf` is 8-aligned and longer than `Statmount`, a plain-data
    // struct the kernel filled (unrequested fields stay zero).
    let sm: Statmount = unsafe { std::ptr::read(buf.as_ptr().cast::<Statmount>()) };
    Ok((sm, buf))
}

/// The NUL-terminated string at `off` in the string area, if `bit` was answered.
fn text<'a>(sm: &Statmount, raw: &'a [u8], bit: u64, off: u32) -> Option<&'a [u8]> {
    if sm.mask & bit == 0 {
        return None;
    }
    let s = raw.get(STATMOUNT_SIZE + off as usize..)?;
    Some(&s[..s.iter().position(|c| *c == 0).unwrap_or(s.len())])
}

/// A record as mountinfo would have shown it (option names, `fuse.sub`),
/// with the unique ids.
fn entry(sm: &Statmount, raw: &[u8]) -> MountEntry {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let path = |b: Option<&[u8]>| PathBuf::from(OsStr::from_bytes(b.unwrap_or(b"/")));
    let mut fstype = lossy(text(sm, raw, STATMOUNT_FS_TYPE, sm.fs_type).unwrap_or_default());
    if let Some(sub) = text(sm, raw, STATMOUNT_FS_SUBTYPE, sm.fs_subtype).filter(|s| !s.is_empty())
    {
        fstype = format!("{fstype}.{}", lossy(sub));
    }
    let ro = |yes: bool| if yes { "ro" } else { "rw" }.to_string();
    let attrs = sm.mnt_attr;
    let mut mount_options = vec![ro(sm.mnt_attr & MOUNT_ATTR_RDONLY != 0)];
    mount_options.extend(
        ATTRS
            .iter()
            .filter(|(bit, _)| attrs & bit != 0)
            .map(|(_, name)| name.to_string()),
    );
    let mut super_options = vec![ro(sm.sb_flags & SB_RDONLY != 0)];
    if let Some(o) = text(sm, raw, STATMOUNT_MNT_OPTS, sm.mnt_opts).filter(|o| !o.is_empty()) {
        // Escaped like mountinfo's.
        super_options.extend(lossy(&unescape_bytes(o)).split(',').map(String::from));
    }
    MountEntry {
        id: sm.mnt_id,
        parent: sm.mnt_parent_id,
        dev: format!("{}:{}", sm.sb_dev_major, sm.sb_dev_minor),
        root: path(text(sm, raw, STATMOUNT_MNT_ROOT, sm.mnt_root)),
        mount_point: path(text(sm, raw, STATMOUNT_MNT_POINT, sm.mnt_point)),
        mount_options,
        source: text(sm, raw, STATMOUNT_SB_SOURCE, sm.sb_source)
            .map_or_else(|| "none".into(), lossy),
        fstype,
        super_options,
        shared: sm.mnt_propagation & MS_SHARED != 0,
    }
}

/// What every answer carries on a kernel that has every field a
/// [`MountEntry`] needs: the source came with the subtype (6.13), after the
/// options (6.11); those two are answered only when a mount has them.
const ALWAYS: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_SB_SOURCE;

/// This boot's id (`/proc/sys/kernel/random/boot_id`): mount ids restart at
/// boot, so an id is only a name together with it.
pub fn boot_id() -> Option<uuid::Uuid> {
    static BOOT: std::sync::OnceLock<Option<uuid::Uuid>> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        uuid::Uuid::parse_str(text.trim()).ok()
    })
}

/// Whether this kernel answers `listmount` and `statmount` with every
/// field a [`MountEntry`] needs (6.13+).
pub fn available() -> bool {
    list_ids().is_ok_and(|ids| {
        ids.first()
            .is_some_and(|id| stat_raw(*id).is_ok_and(|(sm, _)| sm.mask & ALWAYS == ALWAYS))
    })
}

/// How often, at most, a change that made and removed no mount (a remount,
/// a propagation change: `listmount` cannot tell which mount) has every
/// mount asked again. A container runtime binds and remounts each of its
/// mounts; asking 20,000 mounts after each would make the daemon cost every
/// other mounter on the node (the presence cost).
const ATTRS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The mount table from `listmount`/`statmount`, kept by fanotify's mount
/// events where the kernel has them.
#[derive(Debug, Default)]
pub struct StatmountTable {
    /// When every mount was last asked, and whether a change of attributes
    /// is still to be read (the table is then behind).
    attrs: std::sync::Mutex<(Option<std::time::Instant>, bool)>,
    /// The namespace's mount events (Linux 6.15+): a refresh reads the
    /// mounts they name instead of listing every id.
    events: Option<crate::reconcile::mountevents::MountEvents>,
}

fn syscall_err(call: &'static str) -> impl Fn(Errno) -> MountInfoError {
    move |source| MountInfoError::Syscall { call, source }
}

impl StatmountTable {
    /// A table kept by mount events if the kernel reports them (else by
    /// listing ids); says which.
    pub fn with_events() -> (Self, bool) {
        let events = crate::reconcile::mountevents::MountEvents::open().ok();
        let has = events.is_some();
        let t = Self {
            events,
            ..Self::default()
        };
        (t, has)
    }

    /// Applies the queued mount events: one `statmount` per mount attached.
    fn refresh_by_events(
        &self,
        events: &crate::reconcile::mountevents::MountEvents,
        table: &mut MountTable,
        signalled: bool,
    ) -> Result<Option<HashSet<PathBuf>>, MountInfoError> {
        let drained = events.drain().map_err(syscall_err("fanotify read"))?;
        if drained == Default::default() {
            // A change with no mount made or removed: a remount, or a
            // propagation change (no event says which mount).
            self.attrs().1 |= signalled;
        }
        if drained.overflow {
            tracing::warn!("mount events overflowed: listing the mount table again");
            *table = self.read()?;
            *self.attrs() = (Some(std::time::Instant::now()), false);
            return Ok(None);
        }
        // A move carries its submounts along unannounced: read everything.
        if drained
            .attached
            .iter()
            .any(|id| drained.detached.contains(id))
        {
            self.attrs().0 = None;
            self.attrs().1 = true;
        }
        let mut changed = HashSet::new();
        for id in drained.detached {
            changed.extend(table.remove_id(id));
        }
        let mut seen = HashSet::new();
        for id in drained.attached.into_iter().filter(|id| seen.insert(*id)) {
            changed.extend(table.remove_id(id));
            match stat_mount(id) {
                Ok(e) => {
                    let at = e.mount_point.clone();
                    table.add(e);
                    // A mount slid beneath others (or propagated under
                    // them) reparents them unannounced: read the stack.
                    if table.count(&at) > 1 {
                        changed.extend(self.restat(table, &HashSet::from([at.clone()]))?);
                    }
                    changed.insert(at);
                }
                Err(Errno::ENOENT) => {} // gone again: its detach is read next
                Err(e) => {
                    *table = MountTable::default();
                    return Err(syscall_err("statmount")(e));
                }
            }
        }
        changed.extend(self.reread_if_due(table)?);
        Ok(Some(changed))
    }

    fn attrs(&self) -> std::sync::MutexGuard<'_, (Option<std::time::Instant>, bool)> {
        self.attrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every mount again if attributes may have changed and the last
    /// full read is [`ATTRS_EVERY`] old; returns the mount points whose
    /// records changed.
    fn reread_if_due(&self, table: &mut MountTable) -> Result<HashSet<PathBuf>, MountInfoError> {
        let due = {
            let mut a = self.attrs();
            let due = a.1 && a.0.is_none_or(|t| t.elapsed() >= ATTRS_EVERY);
            if due {
                *a = (Some(std::time::Instant::now()), false);
            }
            due
        };
        if !due {
            return Ok(HashSet::new());
        }
        let before = std::mem::take(table);
        *table = self.read()?;
        let mut changed: HashSet<PathBuf> = before
            .iter()
            .filter(|e| table.by_id(e.id) != Some(*e))
            .map(|e| e.mount_point.clone())
            .collect();
        changed.extend(
            table
                .iter()
                .filter(|e| before.by_id(e.id).is_none())
                .map(|e| e.mount_point.clone()),
        );
        Ok(changed)
    }
}

impl MountInfoSource for StatmountTable {
    fn behind(&self) -> bool {
        self.attrs().1
    }

    fn suspect(&self) {
        self.attrs().1 = true;
    }

    fn restat(
        &self,
        table: &mut MountTable,
        targets: &HashSet<PathBuf>,
    ) -> Result<HashSet<PathBuf>, MountInfoError> {
        let mut changed = HashSet::new();
        for target in targets {
            let ids: Vec<u64> = table.stack(target).iter().map(|e| e.id).collect();
            for id in ids {
                let now = match stat_mount(id) {
                    Ok(e) => Some(e),
                    Err(Errno::ENOENT) => None,
                    Err(e) => return Err(syscall_err("statmount")(e)),
                };
                if now.as_ref() != table.by_id(id) {
                    match now {
                        Some(e) => {
                            changed.extend(table.by_id(id).map(|e| e.mount_point.clone()));
                            changed.insert(e.mount_point.clone());
                            table.add(e);
                        }
                        None => changed.extend(table.remove_id(id)),
                    }
                }
            }
        }
        Ok(changed)
    }

    fn read(&self) -> Result<MountTable, MountInfoError> {
        // The queue is left alone: a full read by another user of this
        // source (the executor waiting for a FUSE mount) must not take the
        // events the kept table needs. An event applied again later changes
        // nothing (it names a mount; `statmount` says what it is now).
        let ids = list_ids().map_err(syscall_err("listmount"))?;
        let mut entries = Vec::with_capacity(ids.len());
        for id in ids {
            match stat_mount(id) {
                Ok(e) => entries.push(e),
                Err(Errno::ENOENT) => {} // gone since the list
                Err(e) => return Err(syscall_err("statmount")(e)),
            }
        }
        // Parents before children, as mountinfo lists them.
        entries.sort_by_key(|e| e.id);
        let scope = crate::reconcile::actual::IdScope {
            boot: boot_id(),
            unique: true,
        };
        Ok(MountTable::new(entries).with_id_scope(scope))
    }

    /// Lists the ids and asks only about new ones. A change that made and
    /// removed no mount (a remount, a propagation change) keeps every id:
    /// then every mount is asked again, at most once per [`ATTRS_EVERY`]
    /// (until then the table is [`MountInfoSource::behind`]).
    fn refresh(
        &self,
        table: &mut MountTable,
        signalled: bool,
    ) -> Result<Option<HashSet<PathBuf>>, MountInfoError> {
        if let Some(events) = &self.events {
            return self.refresh_by_events(events, table, signalled);
        }
        let listed = list_ids().map_err(syscall_err("listmount"))?;
        let listed_set: HashSet<u64> = listed.iter().copied().collect();
        let gone: Vec<u64> = table.ids().filter(|id| !listed_set.contains(id)).collect();
        let new: Vec<u64> = listed
            .into_iter()
            .filter(|id| table.by_id(*id).is_none())
            .collect();
        if gone.is_empty() && new.is_empty() {
            // A change that made and removed no mount: a remount, or a
            // propagation change (no id says which mount).
            self.attrs().1 |= signalled;
            return self.reread_if_due(table).map(Some);
        }
        let mut changed: HashSet<PathBuf> = gone
            .into_iter()
            .filter_map(|id| table.remove_id(id))
            .collect();
        for id in new {
            match stat_mount(id) {
                Ok(e) => {
                    changed.insert(e.mount_point.clone());
                    table.add(e);
                }
                Err(Errno::ENOENT) => {}
                Err(e) => {
                    *table = MountTable::default();
                    return Err(syscall_err("statmount")(e));
                }
            }
        }
        changed.extend(self.reread_if_due(table)?);
        Ok(Some(changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::actual::ProcMountInfo;

    /// The same mounts as mountinfo says, field for field but the ids.
    #[test]
    fn statmount_reads_what_mountinfo_says() {
        assert!(available(), "this suite needs Linux 6.8+ (statmount)");
        // Other tests mount meanwhile: compare two reads with no change
        // between them (the same mountinfo before and after).
        let (text, bin) = (0..50)
            .find_map(|_| {
                let before = ProcMountInfo::default().read().unwrap();
                let bin = StatmountTable::default().read().unwrap();
                // (A mount made and gone between the reads shows in `bin` only.)
                let quiet = ProcMountInfo::default().read().unwrap() == before
                    && bin.iter().count() == before.iter().count();
                quiet.then_some((before, bin))
            })
            .expect("the mount table kept changing");
        assert_eq!(text.iter().count(), bin.iter().count());
        for e in bin.iter() {
            let t = text.top(&e.mount_point).expect("in mountinfo too");
            assert!(e.id > u64::from(u32::MAX >> 1), "a unique id: {}", e.id);
            // What the planner and the status read (atime flags and
            // per-superblock flags aside: statmount does not tell them apart).
            let key = |m: &MountEntry| {
                let opts = ["ro", "nosuid", "nodev", "noexec"].map(|o| m.has_option(o));
                let fs = (m.dev.clone(), m.fstype.clone(), m.source.clone());
                (m.root.clone(), m.mount_point.clone(), fs, opts, m.shared)
            };
            if text.count(&e.mount_point) == 1 {
                assert_eq!(key(e), key(t));
            }
        }
    }
}
