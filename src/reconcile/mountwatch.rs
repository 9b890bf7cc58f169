//! Wakes the loop on every change of the mount table, so a mount removed
//! from outside is restored in milliseconds, not at the next resync.
//!
//! inotify cannot watch /proc; instead the kernel signals `POLLPRI` on an
//! open `/proc/self/mountinfo` after every mount and unmount in the
//! namespace (proc(5), "/proc/pid/mountinfo"). The kernel re-arms the event
//! in its poll handler (`mounts_poll` stores the namespace's event counter),
//! so nothing is read here: reading the table costs as much as generating
//! every line of it, which at 10,000 mounts is tens of milliseconds.
//!
//! While a pass makes its own mounts the watch is closed ([`WatchGate`]):
//! every mount wakes each poller of the namespace (`__wake_up` in
//! `attach_recursive_mnt`), and a runtime thread woken on another CPU for
//! each of a burst's mounts cost half of each bind (perf). The pass reads
//! the table again after acting, and opens the watch anew before that read,
//! so a change made by anyone else meanwhile is in the read or signals.

use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

/// What a pass tells the watch.
#[derive(Debug)]
enum GateMsg {
    /// Close the watch: the pass is about to mount.
    Pause,
    /// Watch again from this file, opened before the pass's next read of the
    /// table (`None`: it could not be opened; the watcher opens its own).
    Resume(Option<std::fs::File>),
}

/// The pass's handle on the watch (cheap to clone).
#[derive(Debug, Clone)]
pub struct WatchGate {
    tx: mpsc::UnboundedSender<GateMsg>,
    path: PathBuf,
}

/// The watcher's end of a [`WatchGate`].
#[derive(Debug)]
pub struct GateReceiver(mpsc::UnboundedReceiver<GateMsg>);

impl WatchGate {
    /// A gate for the watch of `path`.
    pub fn new(path: &Path) -> (Self, GateReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Self {
            tx,
            path: path.to_path_buf(),
        };
        (gate, GateReceiver(rx))
    }

    /// Closes the watch (asynchronously: a few events may still wake it).
    pub fn pause(&self) {
        let _ = self.tx.send(GateMsg::Pause);
    }

    /// Opens the watch again; call before reading the table, so that a
    /// change after the read always signals.
    pub fn resume(&self) {
        let _ = self
            .tx
            .send(GateMsg::Resume(std::fs::File::open(&self.path).ok()));
    }
}

/// Runs until an I/O error or until the gate is dropped; calls `on_change`
/// after each mount-table change seen while not paused.
pub async fn watch_mountinfo(
    path: &Path,
    mut gate: Option<GateReceiver>,
    on_change: impl Fn(),
) -> std::io::Result<()> {
    // Opening records the current event counter: only later changes signal.
    let mut file = std::fs::File::open(path)?;
    loop {
        // SAFETY: the `File` owns its descriptor and moves into the
        // `AsyncFd`, which owns it until dropped (deregistering it then);
        // nothing else closes or replaces it.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
            .map_err(std::io::Error::from)?;
        let next = loop {
            let msg = async {
                match gate.as_mut() {
                    Some(g) => g.0.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = fd.ready(Interest::PRIORITY) => {
                    ready?.clear_ready();
                    on_change();
                }
                msg = msg => match msg {
                    None => return Ok(()),
                    Some(GateMsg::Resume(f)) => break f,
                    Some(GateMsg::Pause) => {
                        drop(fd);
                        match paused(gate.as_mut().expect("a message came")).await {
                            Some(f) => break f,
                            None => return Ok(()),
                        }
                    }
                },
            }
        };
        file = match next {
            Some(f) => f,
            None => std::fs::File::open(path)?,
        };
    }
}

/// Waits, watching nothing, until the pass resumes the watch (`Some`, with
/// the file it opened if it could); `None` once the reconciler is gone.
async fn paused(gate: &mut GateReceiver) -> Option<Option<std::fs::File>> {
    loop {
        match gate.0.recv().await? {
            GateMsg::Resume(f) => return Some(f),
            GateMsg::Pause => continue,
        }
    }
}
