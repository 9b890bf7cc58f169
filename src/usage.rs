//! Usage of a vfolder directory: file count and apparent bytes.
//!
//! The walk is parallel (one worker per core) and costs per file one
//! `getdents64` share and one `fstatat` relative to its directory's
//! descriptor: no path is built or resolved per file, and directories are
//! opened `openat(O_NOFOLLOW)` from their parent, so a symlink swapped in by
//! the user never leads the scan outside the vfolder.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Condvar, Mutex};

use nix::dir::{Dir, Type};
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, Mode};

/// Directories kept in the shared queue at most; beyond it a worker walks a
/// subdirectory itself (so open descriptors stay bounded by the tree's depth).
const QUEUE_MAX: usize = 256;
/// Deeper directories are not descended into (each level holds a descriptor).
const DEPTH_MAX: usize = 256;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Work shared by the workers: directories to scan and how many workers are busy.
struct Queue {
    dirs: Vec<(OwnedFd, usize)>,
    busy: usize,
}

/// Counts non-directory entries and sums their apparent sizes under `dir`.
/// Unreadable subdirectories are skipped (a user may chmod 000 their own).
pub fn scan(dir: &Path) -> std::io::Result<(u64, u64)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    scan_with(dir, workers)
}

/// [`scan`] with `workers` threads.
pub fn scan_with(dir: &Path, workers: usize) -> std::io::Result<(u64, u64)> {
    let root = nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(std::io::Error::from)?;
    let workers = workers.max(1);
    let queue = Mutex::new(Queue {
        dirs: vec![(root, 0)],
        busy: 0,
    });
    let wake = Condvar::new();
    let totals = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| s.spawn(|| worker(&queue, &wake)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    Ok(totals)
}

fn worker(queue: &Mutex<Queue>, wake: &Condvar) -> (u64, u64) {
    let mut totals = (0u64, 0u64);
    loop {
        let next = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(d) = q.dirs.pop() {
                    q.busy += 1;
                    break Some(d);
                }
                if q.busy == 0 {
                    break None;
                }
                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some((fd, depth)) = next else {
            wake.notify_all();
            return totals;
        };
        // Depth first from the back; the front (the shallowest, biggest
        // subtrees) is shared with idle workers.
        let mut local = std::collections::VecDeque::from([(fd, depth)]);
        while let Some((fd, depth)) = local.pop_back() {
            scan_one(&fd, &mut totals, |sub| {
                if depth < DEPTH_MAX {
                    local.push_back((sub, depth + 1));
                }
            });
            if local.len() > 1 {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                let mut shared = false;
                while q.dirs.len() < QUEUE_MAX && local.len() > 1 {
                    match local.pop_front() {
                        Some(d) => q.dirs.push(d),
                        None => break,
                    }
                    shared = true;
                }
                drop(q);
                if shared {
                    wake.notify_all();
                }
            }
        }
        queue.lock().unwrap_or_else(|e| e.into_inner()).busy -= 1;
        wake.notify_all();
    }
}

/// Scans one directory: counts its files, hands back its subdirectories.
fn scan_one(fd: &OwnedFd, totals: &mut (u64, u64), mut subdir: impl FnMut(OwnedFd)) {
    let Ok(listing) = fd.try_clone() else { return };
    let Ok(mut listing) = Dir::from_fd(listing) else {
        return;
    };
    for entry in listing.iter().flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(Type::Directory) => true,
            Some(_) => false,
            // Filesystems without d_type: ask.
            None => fstatat(fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        };
        if is_dir {
            if let Ok(sub) = openat(fd.as_fd(), name, DIR_FLAGS, Mode::empty()) {
                subdir(sub);
            }
        } else {
            totals.0 += 1;
            if let Ok(st) = fstatat(fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                totals.1 += st.st_size as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn scan_counts_files_and_bytes_recursively() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("x"), b"12345").unwrap();
        std::fs::write(t.path().join("a/b/y"), b"123").unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        assert_eq!(super::scan(t.path()).unwrap(), (3, 8 + "/etc".len() as u64));
    }

    #[test]
    fn scan_of_a_wide_and_deep_tree_matches_a_plain_walk() {
        let t = tempfile::tempdir().unwrap();
        let (mut files, mut bytes) = (0u64, 0u64);
        // Wider than the shared queue, and deep, so both paths of the walk run.
        for i in 0..300 {
            let d = t.path().join(format!("w{i}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("f"), vec![b'x'; i]).unwrap();
            files += 1;
            bytes += i as u64;
        }
        let mut deep = t.path().to_path_buf();
        for i in 0..40 {
            deep.push(format!("d{i}"));
            std::fs::create_dir(&deep).unwrap();
            std::fs::write(deep.join("g"), b"ab").unwrap();
            files += 1;
            bytes += 2;
        }
        // Symlinks to directories are counted as entries, never followed.
        std::os::unix::fs::symlink(t.path(), t.path().join("w0/loop")).unwrap();
        files += 1;
        bytes += t.path().as_os_str().len() as u64;
        assert_eq!(super::scan(t.path()).unwrap(), (files, bytes));
    }

    #[test]
    #[ignore = "timing probe: USAGE_TREE=dir cargo test --release usage_probe -- --ignored --nocapture"]
    fn usage_probe() {
        let Some(dir) = std::env::var_os("USAGE_TREE") else {
            return;
        };
        for workers in [1, 2, 3, 4, 6] {
            let t = std::time::Instant::now();
            let r = super::scan_with(std::path::Path::new(&dir), workers).unwrap();
            eprintln!("{workers} workers: {:?} {r:?}", t.elapsed());
        }
    }

    #[test]
    fn a_missing_root_is_an_error_and_an_unreadable_subdir_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        assert!(super::scan(&t.path().join("nope")).is_err());
        std::fs::create_dir(t.path().join("locked")).unwrap();
        std::fs::write(t.path().join("locked/f"), b"123").unwrap();
        std::fs::write(t.path().join("open"), b"1").unwrap();
        std::fs::set_permissions(
            t.path().join("locked"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        let as_root = nix::unistd::geteuid().is_root();
        let got = super::scan(t.path()).unwrap();
        std::fs::set_permissions(
            t.path().join("locked"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        // Root reads through mode 000; anyone else skips the directory.
        assert_eq!(got, if as_root { (2, 4) } else { (1, 1) });
    }
}
