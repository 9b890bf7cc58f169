//! Wakes the loop on every change of the mount table, so a mount removed
//! from outside is restored in milliseconds, not at the next resync.
//!
//! inotify cannot watch /proc; instead the kernel signals `POLLPRI` on an
//! open `/proc/self/mountinfo` after every mount and unmount in the
//! namespace (proc(5), "/proc/pid/mountinfo"). The kernel re-arms the event
//! in its poll handler (`mounts_poll` stores the namespace's event counter),
//! so nothing is read here: reading the table costs as much as generating
//! every line of it, which at 10,000 mounts is tens of milliseconds.

use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Runs until an I/O error; calls `on_change` after each mount-table change.
pub async fn watch_mountinfo(path: &Path, on_change: impl Fn()) -> std::io::Result<()> {
    // Opening records the current event counter: only later changes signal.
    let file = std::fs::File::open(path)?;
    // SAFETY: the `File` owns its descriptor and moves into the `AsyncFd`,
    // which owns it until dropped; nothing else closes or replaces it.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.ready(Interest::PRIORITY).await?;
        guard.clear_ready();
        on_change();
    }
}
