//! Hot reload of `policies/*.yaml`: a change is loaded and, if valid, swapped
//! in and every desired object re-evaluated; an invalid file is refused with
//! a clear error and the last good policy stays in force (never an open
//! policy by accident, nor the built-in default because files vanished).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::policy::Policy;
use crate::state::desired::{DesiredParser, PolicyHandle};
use crate::state::watch::DesiredCache;

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
            if res.is_ok_and(|e| e.paths.iter().any(|p| p.starts_with(&ours))) {
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
        if res.is_ok_and(|e| e.paths.iter().any(|p| p.starts_with(&ours))) {
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
    while rx.recv().await.is_some() {
        if !watching_dir {
            watching_dir = watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        on_change();
    }
}
