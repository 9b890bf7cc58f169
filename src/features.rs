//! The kernel features this node runs on, as an operator upgrading kernels
//! or vfolderd needs to know them: which mount-table source (statmount with
//! fanotify mount events, statmount alone, or the mountinfo fallback),
//! whether the new mount API is there (`open_tree`, `move_mount`,
//! `mount_setattr`: atomic binds), and whether idmapped mounts work on each
//! filesystem type a volume is mounted with (a kernel whose uid differs
//! from the volume owner's needs one). Reported in `/readyz` and as
//! `vfolderd_kernel_feature` and `vfolderd_idmap_supported`.
//!
//! The idmap verdict is a real try, never a guess from the version: a
//! detached copy of an owned volume's mount (`open_tree(OPEN_TREE_CLONE)`,
//! never attached anywhere) is given an idmap, once per filesystem type.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the mount table is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountTableSource {
    /// `listmount`/`statmount`, kept by fanotify mount events (Linux 6.15+).
    StatmountEvents,
    /// `listmount`/`statmount`, kept by listing ids (Linux 6.8–6.14).
    Statmount,
    /// `/proc/self/mountinfo` (older kernels, or `mount_table: mountinfo`).
    Mountinfo,
}

impl MountTableSource {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MountTableSource::StatmountEvents => "statmount+fanotify",
            MountTableSource::Statmount => "statmount",
            MountTableSource::Mountinfo => "mountinfo",
        }
    }
}

/// What this node's kernel offers vfolderd.
#[derive(Debug)]
pub struct Features {
    /// The mount table's source.
    pub mount_table: MountTableSource,
    /// `open_tree` and `mount_setattr` work (binds are made whole before
    /// they are attached).
    pub new_mount_api: bool,
    /// fstype → whether an idmapped mount of it works (or why not).
    idmap: Mutex<BTreeMap<String, Result<(), String>>>,
}

impl Features {
    /// Probes the mount API now; idmap verdicts come with volumes.
    pub fn probe(mount_table: MountTableSource) -> Self {
        Self {
            mount_table,
            new_mount_api: new_mount_api(),
            idmap: Mutex::default(),
        }
    }

    /// The fstypes already judged.
    pub fn idmap(&self) -> BTreeMap<String, Result<(), String>> {
        self.idmap.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `fstype` still needs a try.
    pub fn idmap_unknown(&self, fstype: &str) -> bool {
        !self
            .idmap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(fstype)
    }

    /// Records a try's verdict.
    pub fn set_idmap(&self, fstype: &str, verdict: Result<(), String>) {
        self.idmap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fstype.to_string(), verdict);
    }

    /// The lines `/readyz` adds.
    pub fn report(&self) -> String {
        let mut out = format!(
            "mount table: {}\nnew mount API (open_tree, mount_setattr): {}\n",
            self.mount_table.as_str(),
            if self.new_mount_api { "yes" } else { "no" }
        );
        for (fstype, v) in self.idmap() {
            match v {
                Ok(()) => out.push_str(&format!("idmapped mounts on {fstype}: yes\n")),
                Err(why) => out.push_str(&format!("idmapped mounts on {fstype}: no ({why})\n")),
            }
        }
        out
    }
}

/// Whether `open_tree` and `mount_setattr` are there: a detached copy of
/// `/` is opened and given no attribute change at all.
fn new_mount_api() -> bool {
    use rustix::mount::{open_tree, OpenTreeFlags};
    let Ok(fd) = open_tree(
        rustix::fs::CWD,
        "/",
        OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::OPEN_TREE_CLONE,
    ) else {
        return false;
    };
    crate::reconcile::newmount::mount_setattr(std::os::fd::AsFd::as_fd(&fd), 0, 0, 0, None).is_ok()
}

/// Tries an idmap on a detached copy of the mount at `dir` (nothing is
/// attached; the copy goes when its descriptor closes).
pub fn try_idmap(dir: &Path) -> Result<(), String> {
    use rustix::mount::{open_tree, OpenTreeFlags};
    let copy = open_tree(
        rustix::fs::CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::OPEN_TREE_CLONE,
    )
    .map_err(|e| format!("open_tree: {e}"))?;
    let ns = crate::reconcile::newmount::userns_for(crate::reconcile::newmount::IdMap {
        uid: (1000, 1001),
        gid: (1000, 1001),
    })
    .map_err(|e| format!("user namespace: {e}"))?;
    use std::os::fd::AsFd;
    crate::reconcile::newmount::mount_setattr(
        copy.as_fd(),
        libc::MOUNT_ATTR_IDMAP,
        0,
        0,
        Some(ns.as_fd()),
    )
    .map_err(|e| format!("mount_setattr: {e}"))
}

/// When the owned volume mounts change, tries idmaps on those of a
/// filesystem type not judged yet (stale ones aside), on one blocking
/// thread at a time: a try stuck in a hung volume holds that thread only,
/// and nothing is tried again until it returns. Publishes the verdicts as
/// metrics. Costs nothing while the volume mounts stay as they are.
pub async fn run_feature_probe(
    features: Arc<Features>,
    targets: crate::reconcile::probe::VolumeTargets,
    stale: crate::reconcile::probe::StaleMap,
    mountinfo: Arc<dyn crate::reconcile::actual::MountInfoSource>,
    metrics: Arc<crate::metrics::Metrics>,
    every: Duration,
) {
    let busy = Arc::new(AtomicBool::new(false));
    let mut last: Vec<(PathBuf, u64)> = Vec::new();
    loop {
        let now = targets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if now != last && !busy.swap(true, Ordering::AcqRel) {
            last = now.clone();
            let (features, stale, mountinfo) = (features.clone(), stale.clone(), mountinfo.clone());
            let (metrics, busy) = (metrics.clone(), busy.clone());
            tokio::task::spawn_blocking(move || {
                try_each_fstype(&features, &now, &stale, mountinfo.as_ref(), &metrics);
                busy.store(false, Ordering::Release);
            });
        }
        tokio::time::sleep(every).await;
    }
}

fn try_each_fstype(
    features: &Features,
    targets: &[(PathBuf, u64)],
    stale: &crate::reconcile::probe::StaleMap,
    mountinfo: &dyn crate::reconcile::actual::MountInfoSource,
    metrics: &crate::metrics::Metrics,
) {
    let Ok(table) = mountinfo.read() else {
        return;
    };
    for (t, _) in targets {
        if stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(t)
        {
            continue;
        }
        let Some(fstype) = table.top(t).map(|m| m.fstype.clone()) else {
            continue;
        };
        if features.idmap_unknown(&fstype) {
            let v = try_idmap(t);
            metrics.set_idmap(&fstype, v.is_ok());
            features.set_idmap(&fstype, v);
        }
    }
}
