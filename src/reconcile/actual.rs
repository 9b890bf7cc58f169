//! Actual state: the kernel's mount table (`/proc/self/mountinfo`), parsed by hand
//! because `procfs` does not decode the octal escapes (`\040`) mountinfo uses.
//! It is read as bytes: any user's FUSE mount may carry a path that is not
//! UTF-8, and one such line must not stop every pass; paths stay `OsString`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// A mountinfo line that does not have the documented shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// One line of mountinfo (see proc_pid_mountinfo(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id: the 64-bit unique id where the table came from
    /// `statmount(2)` (never reused while the machine is up; such ids start
    /// at 2^31), else mountinfo's 32-bit id, which the kernel reuses at once
    /// (the lowest free one: a remount often gets the id of the mount it
    /// replaced).
    pub id: u64,
    /// The parent mount's id, of the same kind.
    pub parent: u64,
    /// `major:minor` of the filesystem: binds share their source's.
    pub dev: String,
    /// Path inside the filesystem that forms this mount's root (a bind's source subdirectory).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `nodev`, `noexec`, atime flags.
    pub mount_options: Vec<String>,
    /// Filesystem type (`tmpfs`, `fuse.rclone`, `cifs`).
    pub fstype: String,
    /// Mount source as the filesystem reports it.
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
    /// In a shared peer group (an optional field `shared:N`): mounts made
    /// below it propagate to its peers and slaves.
    pub shared: bool,
}

impl MountEntry {
    /// Whether a per-mount option is set.
    pub fn has_option(&self, opt: &str) -> bool {
        self.mount_options.iter().any(|o| o == opt)
    }
    /// Whether the mount is read-only.
    pub fn is_readonly(&self) -> bool {
        self.has_option("ro")
    }
}

/// Decodes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(field.as_bytes())).into_owned()
}

/// [`unescape`] over raw bytes (paths need not be UTF-8).
pub fn unescape_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A path field: its exact bytes.
fn path_field(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape_bytes(b)))
}

/// A text field (fstype, source, options): lossy where it is not UTF-8.
fn text_field(b: &[u8]) -> String {
    String::from_utf8_lossy(&unescape_bytes(b)).into_owned()
}

/// The non-empty lines of a mountinfo text, numbered from 1.
fn lines(text: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    text.split(|c| *c == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
}

/// Parses the whole text of a mountinfo file (bytes: paths need not be UTF-8).
pub fn parse_mountinfo(text: impl AsRef<[u8]>) -> Result<Vec<MountEntry>, ParseError> {
    lines(text.as_ref())
        .map(|(line, l)| parse_line(l).map_err(|reason| ParseError { line, reason }))
        .collect()
}

fn parse_line(line: &[u8]) -> Result<MountEntry, String> {
    let fields: Vec<&[u8]> = line.split(|c| *c == b' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == b"-")
        .ok_or("no ' - ' separator")?;
    if sep < 6 || fields.len() < sep + 3 {
        return Err(format!(
            "expected at least 6 fields before '-' and 2 after, got {} and {}",
            sep,
            fields.len() - sep - 1
        ));
    }
    let num = |s: &[u8], what: &str| {
        let s = String::from_utf8_lossy(s);
        s.parse::<u32>()
            .map(u64::from)
            .map_err(|_| format!("bad {what} {s:?}"))
    };
    let list = |s: &[u8]| text_field(s).split(',').map(String::from).collect();
    Ok(MountEntry {
        id: num(fields[0], "mount id")?,
        parent: num(fields[1], "parent id")?,
        dev: text_field(fields[2]),
        root: path_field(fields[3]),
        mount_point: path_field(fields[4]),
        mount_options: list(fields[5]),
        fstype: text_field(fields[sep + 1]),
        source: text_field(fields[sep + 2]),
        super_options: fields.get(sep + 3).map(|s| list(s)).unwrap_or_default(),
        shared: fields[6..sep].iter().any(|f| f.starts_with(b"shared:")),
    })
}

/// The mount table indexed by mount point; several entries on one point are
/// kept in mountinfo order, so the last one is the visible (top) mount.
/// Iteration order is unspecified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    // A hash map: `Path`'s ordering parses components on every comparison,
    // which dominated a pass at 10,000 mounts (perf); nothing needs the order.
    by_target: HashMap<PathBuf, Vec<MountEntry>>,
    /// Each entry's mountinfo line (when built from text), with its mount
    /// id: a re-read parses only the lines that are new, and names the
    /// mount points that changed.
    lines: HashMap<Box<[u8]>, u64>,
    /// Where each mount id is mounted (a mount that goes is found by id).
    ids: HashMap<u64, PathBuf>,
    /// What its ids name.
    scope: IdScope,
}

/// What a table's mount ids name, so a recorded id is compared only with
/// ids of its kind and boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdScope {
    /// The boot the table was read in; `None` when unknown (a table built
    /// by hand).
    pub boot: Option<uuid::Uuid>,
    /// The ids are the kernel's unique 64-bit ones (`statmount`), never
    /// reused in a boot, not mountinfo's 32-bit ones, which are.
    pub unique: bool,
}

impl MountTable {
    /// Parses a whole mountinfo text.
    pub fn from_text(text: impl AsRef<[u8]>) -> Result<Self, ParseError> {
        let mut t = Self::default();
        t.update(text.as_ref())?;
        Ok(t)
    }

    /// Brings a table built by [`MountTable::from_text`] up to `text`, the
    /// file read again: unchanged lines are only looked up (mountinfo lines
    /// carry the mount id, so a remount or a new mount is a new line).
    /// Returns the mount points whose mounts changed. On error the table is
    /// half-updated: the caller drops it and parses from scratch.
    pub fn update(&mut self, text: &[u8]) -> Result<HashSet<PathBuf>, ParseError> {
        let mut changed = HashSet::new();
        let mut seen: HashSet<&[u8]> = HashSet::with_capacity(self.lines.len());
        let mut added = Vec::new();
        for (i, line) in lines(text) {
            if self.lines.contains_key(line) {
                seen.insert(line);
            } else {
                added.push((i, line));
            }
        }
        let gone: Vec<Box<[u8]>> = self
            .lines
            .keys()
            .filter(|l| !seen.contains(&***l))
            .cloned()
            .collect();
        for line in gone {
            if let Some(id) = self.lines.remove(&line) {
                changed.extend(self.remove_id(id));
            }
        }
        for (i, line) in added {
            let e = parse_line(line).map_err(|reason| ParseError { line: i, reason })?;
            changed.insert(e.mount_point.clone());
            self.lines.insert(line.into(), e.id);
            self.add(e);
        }
        Ok(changed)
    }

    /// Indexes parsed entries (a table that [`MountTable::update`] cannot refresh).
    pub fn new(entries: Vec<MountEntry>) -> Self {
        let mut t = Self::default();
        t.by_target.reserve(entries.len());
        t.ids.reserve(entries.len());
        entries.into_iter().for_each(|e| t.add(e));
        t
    }

    /// Adds a mount. Stacked on others at the same point, it goes below the
    /// one mounted on it (whose parent it is), else on top: a mount is
    /// attached after the mount it sits on, but its id may be older (a
    /// detached copy from `open_tree` gets its id before `move_mount`).
    pub(crate) fn add(&mut self, e: MountEntry) {
        // Read again where it was: it keeps its place in the stack.
        if self.ids.get(&e.id) == Some(&e.mount_point) {
            if let Some(stack) = self.by_target.get_mut(&e.mount_point) {
                if let Some(slot) = stack.iter_mut().find(|s| s.id == e.id) {
                    *slot = e;
                    order_stack(stack);
                    return;
                }
            }
        }
        // One entry per id, even from a torn read of a table whose ids are
        // reused (mountinfo, read in several calls).
        self.remove_id(e.id);
        self.ids.insert(e.id, e.mount_point.clone());
        let stack = self.by_target.entry(e.mount_point.clone()).or_default();
        match stack.iter().position(|s| s.parent == e.id) {
            Some(i) => stack.insert(i, e),
            None => stack.push(e),
        }
    }

    /// Removes the mount with this id; returns where it was mounted.
    pub(crate) fn remove_id(&mut self, id: u64) -> Option<PathBuf> {
        let target = self.ids.remove(&id)?;
        if let Some(v) = self.by_target.get_mut(&target) {
            v.retain(|e| e.id != id);
            if v.is_empty() {
                self.by_target.remove(&target);
            }
        }
        Some(target)
    }

    /// What this table's ids name.
    pub fn id_scope(&self) -> IdScope {
        self.scope
    }

    /// Says what this table's ids name (its source, once read).
    pub fn with_id_scope(mut self, scope: IdScope) -> Self {
        self.scope = scope;
        self
    }

    /// The mount with this id.
    pub fn by_id(&self, id: u64) -> Option<&MountEntry> {
        let target = self.ids.get(&id)?;
        self.by_target.get(target)?.iter().find(|e| e.id == id)
    }

    /// Every mount id in the table.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.keys().copied()
    }

    /// The visible mount at `target`, if any.
    pub fn top(&self, target: &Path) -> Option<&MountEntry> {
        self.by_target.get(target).and_then(|v| v.last())
    }

    /// The mounts stacked at `target`, bottom first.
    pub fn stack(&self, target: &Path) -> &[MountEntry] {
        self.by_target.get(target).map_or(&[], Vec::as_slice)
    }

    /// How many mounts are stacked at `target`.
    pub fn count(&self, target: &Path) -> usize {
        self.by_target.get(target).map_or(0, Vec::len)
    }

    /// Every entry, by mount point.
    pub fn iter(&self) -> impl Iterator<Item = &MountEntry> {
        self.by_target.values().flatten()
    }

    /// Test and model helper: records a mount at `target`.
    pub fn insert(&mut self, entry: MountEntry) {
        self.add(entry);
    }

    /// Test and model helper: removes the top mount at `target`.
    pub fn remove_top(&mut self, target: &Path) {
        if let Some(id) = self.top(target).map(|e| e.id) {
            self.remove_id(id);
        }
    }
}

/// Puts a stack of mounts at one point in order, bottom first, by who is
/// mounted on whom (a mount's parent is the mount it covers); what the
/// links do not place keeps its order, on top.
fn order_stack(stack: &mut Vec<MountEntry>) {
    if stack.len() < 2 {
        return;
    }
    let ids: HashSet<u64> = stack.iter().map(|e| e.id).collect();
    let mut rest = std::mem::take(stack);
    let mut next = rest.iter().position(|e| !ids.contains(&e.parent));
    while let Some(i) = next {
        let e = rest.remove(i);
        next = rest.iter().position(|c| c.parent == e.id);
        stack.push(e);
    }
    stack.extend(rest);
}

/// Where the mount table comes from: the real file, or a fixture in tests.
pub trait MountInfoSource: Send + Sync {
    /// Reads and parses the current table.
    fn read(&self) -> Result<MountTable, MountInfoError>;

    /// Whether the last refresh left a change unread (to be read at the
    /// next one, even if nothing signals).
    fn behind(&self) -> bool {
        false
    }

    /// Says that attributes may have changed unseen (a remount made along
    /// with other changes shows no event or id of its own): a source that
    /// cannot see them reads every mount again soon.
    fn suspect(&self) {}

    /// Reads the mounts at `targets` again (a source whose refresh sees
    /// only new and gone mounts); returns those whose records changed.
    fn restat(
        &self,
        _table: &mut MountTable,
        _targets: &HashSet<PathBuf>,
    ) -> Result<HashSet<PathBuf>, MountInfoError> {
        Ok(HashSet::new())
    }

    /// Brings `table` (from an earlier read) up to date; returns the mount
    /// points that changed, or `None` when it cannot tell (read afresh).
    /// `signalled`: the kernel said the table changed (else the caller only
    /// wants what it did itself, or what was left unread, brought in).
    fn refresh(
        &self,
        table: &mut MountTable,
        _signalled: bool,
    ) -> Result<Option<HashSet<PathBuf>>, MountInfoError> {
        *table = self.read()?;
        Ok(None)
    }
}

/// Errors reading the mount table.
#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    /// The file could not be read (transient: retried next pass).
    #[error("cannot read {path}")]
    Read {
        /// Usually `/proc/self/mountinfo`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line did not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// `listmount(2)` or `statmount(2)` failed.
    #[error("{call} failed")]
    Syscall {
        /// Which call.
        call: &'static str,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

/// Reads `/proc/self/mountinfo` (or another path).
#[derive(Debug, Clone)]
pub struct ProcMountInfo {
    /// The file to read.
    pub path: PathBuf,
}

impl Default for ProcMountInfo {
    fn default() -> Self {
        Self {
            path: "/proc/self/mountinfo".into(),
        }
    }
}

impl MountInfoSource for ProcMountInfo {
    fn read(&self) -> Result<MountTable, MountInfoError> {
        let text = std::fs::read(&self.path).map_err(|source| MountInfoError::Read {
            path: self.path.clone(),
            source,
        })?;
        let scope = IdScope {
            boot: crate::reconcile::mountapi::boot_id(),
            unique: false,
        };
        Ok(MountTable::from_text(&text)?.with_id_scope(scope))
    }

    fn refresh(
        &self,
        table: &mut MountTable,
        _signalled: bool,
    ) -> Result<Option<HashSet<PathBuf>>, MountInfoError> {
        if table.lines.is_empty() {
            *table = self.read()?;
            return Ok(None);
        }
        let text = std::fs::read(&self.path).map_err(|source| MountInfoError::Read {
            path: self.path.clone(),
            source,
        })?;
        match table.update(&text) {
            Ok(changed) => Ok(Some(changed)),
            Err(e) => {
                *table = MountTable::default();
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/mountinfo-basic.txt");

    #[test]
    fn mountinfo_parses_fixture_with_escapes_and_optional_fields() {
        let entries = parse_mountinfo(FIXTURE).unwrap();
        assert_eq!(entries.len(), 6);
        let spaced = entries
            .iter()
            .find(|e| e.fstype == "tmpfs" && e.mount_point.to_str().unwrap().contains(' '))
            .unwrap();
        assert_eq!(
            spaced.mount_point,
            PathBuf::from("/var/lib/vfolderd/kernels/k 1/work/my data")
        );
        assert!(spaced.has_option("nosuid") && spaced.has_option("nodev") && spaced.is_readonly());
        let shared = entries
            .iter()
            .find(|e| e.mount_point == Path::new("/"))
            .unwrap();
        assert_eq!(shared.fstype, "ext4");
        assert_eq!(shared.source, "/dev/vda");
        let bind = entries.iter().find(|e| e.root != Path::new("/")).unwrap();
        assert_eq!(bind.root, PathBuf::from("/ab/cd/abcd"));
    }

    #[test]
    fn an_updated_table_equals_a_fresh_parse_and_names_what_changed() {
        let mut t = MountTable::from_text(FIXTURE).unwrap();
        let lines: Vec<&str> = FIXTURE.lines().collect();
        // Drop the second line, add a new mount stacked on the first one's point.
        let first = parse_line(lines[0].as_bytes()).unwrap();
        let stacked = format!(
            "999 1 0:99 / {} rw,nosuid - tmpfs t rw",
            first.mount_point.display()
        );
        let mut next: Vec<&str> = lines.clone();
        let removed = parse_line(next.remove(1).as_bytes()).unwrap();
        next.push(&stacked);
        let text = next.join("\n");
        let changed = t.update(text.as_bytes()).unwrap();
        assert_eq!(
            changed,
            HashSet::from([removed.mount_point.clone(), first.mount_point.clone()])
        );
        assert_eq!(t, MountTable::from_text(&text).unwrap());
        assert_eq!(
            t.top(&first.mount_point).unwrap().id,
            999,
            "the newest is on top"
        );
        assert!(
            t.update(text.as_bytes()).unwrap().is_empty(),
            "nothing changed"
        );
    }

    #[test]
    fn mountinfo_rejects_lines_without_separator() {
        let err = parse_mountinfo("1 2 0:1 / / rw shared:1\n").unwrap_err();
        assert_eq!(err.line, 1);
    }

    #[test]
    fn unescape_decodes_octal_and_keeps_other_backslashes() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("a\\x"), "a\\x");
    }

    #[test]
    fn table_top_is_last_stacked_mount() {
        let mut entries = parse_mountinfo(FIXTURE).unwrap();
        let mut again = entries[1].clone();
        again.id = 999;
        entries.push(again.clone());
        let t = MountTable::new(entries);
        assert_eq!(t.count(&again.mount_point), 2);
        assert_eq!(t.top(&again.mount_point).unwrap().id, 999);
    }

    /// A mount slid beneath the top one (`MOVE_MOUNT_BENEATH`, or a
    /// propagated mount) is announced alone; the top one is reparented
    /// unannounced. Read again, it stays the top.
    #[test]
    fn a_mount_slid_beneath_the_top_one_leaves_the_top_on_top() {
        let at = |id: u64, parent: u64| MountEntry {
            id,
            parent,
            ..parse_line(b"1 0 0:1 / /k/home rw - tmpfs t rw").unwrap()
        };
        let mut t = MountTable::new(vec![at(10, 1), at(30, 10)]);
        t.add(at(20, 10)); // beneath 30: its parent is 10; 30 not yet read again
        t.add(at(30, 20)); // read again: now on 20
                           // (without the reorder the stack was [10, 30, 20] and 20 the top)
        let order: Vec<u64> = t.stack(Path::new("/k/home")).iter().map(|e| e.id).collect();
        assert_eq!(order, [10, 20, 30]);
        assert_eq!(t.top(Path::new("/k/home")).unwrap().id, 30);
        assert_eq!(t.iter().count(), 3, "one entry per id");
    }

    /// Issue 11 item 9: one line with a non-UTF-8 path made every read fail.
    #[test]
    fn a_path_that_is_not_utf8_is_kept_byte_for_byte_and_spoils_no_other_line() {
        let mut text = FIXTURE.as_bytes().to_vec();
        text.extend_from_slice(b"999 1 0:77 / /mnt/caf");
        text.push(0xe9); // Latin-1 'é', as the kernel writes it: raw
        text.extend_from_slice(b"\\040x rw,nosuid - fuse.sshfs u@h:/ rw\n");
        let t = MountTable::from_text(&text).unwrap();
        let odd = PathBuf::from(OsString::from_vec(b"/mnt/caf\xe9 x".to_vec()));
        assert_eq!(t.top(&odd).map(|e| e.fstype.as_str()), Some("fuse.sshfs"));
        assert_eq!(
            t.iter().count(),
            parse_mountinfo(FIXTURE).unwrap().len() + 1
        );
    }
}
