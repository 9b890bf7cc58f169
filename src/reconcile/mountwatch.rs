//! Wakes the loop on every change of the mount table, so a mount removed
//! from outside is restored in milliseconds, not at the next resync.
//!
//! inotify cannot watch /proc; instead the kernel signals `POLLPRI` on an
//! open `/proc/self/mountinfo` after every mount and unmount in the
//! namespace (proc(5), "/proc/pid/mountinfo").

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Runs until an I/O error; calls `on_change` after each mount-table change.
pub async fn watch_mountinfo(path: &Path, on_change: impl Fn()) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    // Read once so the poll event counter starts at the current table.
    let mut sink = Vec::new();
    file.read_to_end(&mut sink)?;
    // SAFETY: the `File` owns its descriptor and moves into the `AsyncFd`,
    // which owns it until dropped; nothing else closes or replaces it.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.ready(Interest::PRIORITY).await?;
        // Re-read from offset 0, as the seq_file interface expects, then re-arm.
        drain(guard.get_inner(), &mut sink);
        guard.clear_ready();
        on_change();
    }
}

fn drain(file: &std::fs::File, buf: &mut Vec<u8>) {
    buf.resize(64 * 1024, 0);
    let mut off = 0u64;
    while let Ok(n) = file.read_at(buf, off) {
        if n == 0 {
            break;
        }
        off += n as u64;
    }
}
