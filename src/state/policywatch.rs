//! Hot reload of `policies/*.yaml`: a change is loaded and, if valid, swapped
//! in and every desired object re-evaluated; an invalid file is refused with
//! a clear error and the last good policy stays in force (never an open
//! policy by accident, nor the built-in default because files vanished).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};

use crate::policy::Policy;
use crate::state::desired::{DesiredParser, PolicyHandle};
use crate::state::watch::DesiredCache;

/// Whether an event can mean new content: a file closed after writing,
/// created, deleted, renamed, written or re-permissioned. Opens and reads are
/// not: notify reports them too, and five daemons sharing one policy
/// directory woke each other with their own reads every 200 ms.
pub fn is_content_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Data(_) | ModifyKind::Any) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => true,
        EventKind::Modify(ModifyKind::Other) | EventKind::Any | EventKind::Other => false,
    }
}

/// A digest of what the files in `dir` say (names and bytes): a reload that
/// would read the same content is skipped.
fn content_digest(dir: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in names {
        p.hash(&mut h);
        std::fs::read(&p).ok().hash(&mut h);
    }
    Some(h.finish())
}

/// A digest of the files in `dir` as the kernel describes them (name, size,
/// mode, inode, mtime): a rotated secret changes it, a read does not.
fn stamp_digest(dir: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut stamps: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| {
            let m = e.metadata().ok();
            let stamp = m.map(|m| (m.len(), m.mode(), m.ino(), m.mtime(), m.mtime_nsec()));
            (e.file_name(), stamp)
        })
        .collect();
    stamps.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    stamps.hash(&mut h);
    Some(h.finish())
}

/// Watches `dir` until dropped; `on_result(ok)` counts reloads.
pub async fn run_policy_watcher(
    dir: PathBuf,
    handle: PolicyHandle,
    parser: DesiredParser,
    cache: Arc<DesiredCache>,
    on_result: impl Fn(bool) + Send,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let ours = dir.clone();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only events about the policy directory (its parent stays
            // watched once it exists; the parent's other files do not count).
            if res.is_ok_and(|e| {
                is_content_change(&e.kind) && e.paths.iter().any(|p| p.starts_with(&ours))
            }) {
                let _ = tx.try_send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "policy hot reload unavailable");
                return;
            }
        };
    // An absent directory is watched for through its parent, so a policy
    // directory created later is picked up too.
    let mut watching_dir = watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok();
    if !watching_dir {
        let parent = dir.parent().unwrap_or(&dir).to_path_buf();
        if let Err(e) = watcher.watch(&parent, RecursiveMode::NonRecursive) {
            tracing::info!(dir = %dir.display(), error = %e, "policy directory not watched; policy is fixed until restart");
            return;
        }
    }
    let mut last = content_digest(&dir);
    while rx.recv().await.is_some() {
        if !watching_dir {
            watching_dir = watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok();
            if !watching_dir {
                continue;
            }
        }
        // Editors write in several steps: let them finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        let now = content_digest(&dir);
        if now == last {
            continue; // touched, not changed
        }
        last = now;
        match Policy::load_dir(&dir) {
            Ok(Some(p)) => {
                tracing::info!(origin = %p.origin, "policy reloaded; re-evaluating every object");
                *handle.write().expect("policy lock") = Arc::new(p);
                cache.reparse(&parser);
                on_result(true);
            }
            Ok(None) => {
                tracing::warn!(dir = %dir.display(), "no policy file left; keeping the last good policy");
                on_result(false);
            }
            Err(e) => {
                tracing::error!(error = %crate::error::error_chain(&e), "policy refused; keeping the last good policy");
                on_result(false);
            }
        }
    }
}

/// Calls `on_change` (debounced) whenever something in `dir` changes, e.g.
/// a rotated credentials file: the next pass remounts what used the old one
/// once it is unused.
pub async fn run_dir_watcher(dir: PathBuf, on_change: impl Fn() + Send) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let ours = dir.clone();
    let Ok(mut watcher) = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // While the directory does not exist its parent is watched: only
        // events about the directory itself count (a busy parent, e.g. one
        // holding a log file, must not wake the loop on every write).
        if res.is_ok_and(|e| {
            is_content_change(&e.kind) && e.paths.iter().any(|p| p.starts_with(&ours))
        }) {
            let _ = tx.try_send(());
        }
    }) else {
        return;
    };
    let mut watching_dir = watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok();
    if !watching_dir
        && watcher
            .watch(dir.parent().unwrap_or(&dir), RecursiveMode::NonRecursive)
            .is_err()
    {
        return;
    }
    let mut last = stamp_digest(&dir);
    while rx.recv().await.is_some() {
        if !watching_dir {
            watching_dir = watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        let now = stamp_digest(&dir);
        if now != last {
            last = now;
            on_change();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn parser() -> DesiredParser {
        DesiredParser {
            keys: crate::keys::Keys::new("/p", "n"),
            policy: Arc::default(),
            kernels_root: "/k".into(),
        }
    }

    /// Issue 11 item 10: reading a policy file (an operator's `cat`, another
    /// daemon's reload) re-evaluated every object; five daemons sharing a
    /// directory did so every 200 ms forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_policy_and_credentials_files_wakes_nothing_and_a_change_does() {
        let dir = tempfile::tempdir().unwrap();
        let (policies, creds) = (dir.path().join("policies"), dir.path().join("credentials"));
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::create_dir_all(&creds).unwrap();
        let file = policies.join("p.yaml");
        std::fs::write(&file, "fstypes: {tmpfs: {}}\n").unwrap();
        std::fs::write(creds.join("share"), "username=u\npassword=p\n").unwrap();
        let (reloads, wakes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, w) = (reloads.clone(), wakes.clone());
        let handle: PolicyHandle = Arc::default();
        let cache = Arc::new(DesiredCache::default());
        let p = tokio::spawn(run_policy_watcher(
            policies.clone(),
            handle,
            parser(),
            cache,
            move |_| {
                r.fetch_add(1, Ordering::SeqCst);
            },
        ));
        let c = tokio::spawn(run_dir_watcher(creds.clone(), move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..20 {
            std::fs::read(&file).unwrap();
            std::fs::read(creds.join("share")).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            0,
            "reads reloaded the policy"
        );
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            0,
            "reads looked like rotated credentials"
        );
        std::fs::write(&file, "fstypes: {tmpfs: {}, bind: {}}\n").unwrap();
        std::fs::write(creds.join("share"), "username=u\npassword=rotated\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reloads.load(Ordering::SeqCst) == 0 || wakes.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a real change was missed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.abort();
        c.abort();
    }
}
