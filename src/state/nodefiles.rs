//! The node's own directories, kept closed to other local users. The state
//! directory holds raw etcd values (inline cifs passwords included), rclone
//! logs and temporary credentials; the volumes root holds every user's
//! vfolders, reachable there without any bind. Each is created with its mode
//! and, at start, repaired with a log line if someone loosened it. sled
//! creates its files with the process umask; the umask is left alone (every
//! mkdir of vfolderd relies on it) and the files are tightened after opening.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a node directory could not be made safe.
#[derive(Debug, thiserror::Error)]
pub enum NodeFilesError {
    /// Creating or changing the mode of `path` failed.
    #[error("cannot secure {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// State directory: root only.
pub const STATE_MODE: u32 = 0o700;
/// Files in it: root only.
pub const FILE_MODE: u32 = 0o600;
/// Volumes root: root only (kernels see their folders through binds).
pub const VOLUMES_MODE: u32 = 0o700;
/// Kernels root: others may pass through to a home (a container runtime
/// running as another user), never list the kernels.
pub const KERNELS_MODE: u32 = 0o711;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeFilesError + '_ {
    move |source| NodeFilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` with `mode` if missing; tightens it to `mode` if it grants
/// more. Returns the mode it had when it was changed.
pub fn secure_dir(dir: &Path, mode: u32) -> Result<Option<u32>, NodeFilesError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io(dir))?;
    tighten(dir, mode)
}

/// Takes from `path` (not followed if a symlink) the group and other bits
/// `mode` does not grant; returns the old mode when changed.
fn tighten(path: &Path, mode: u32) -> Result<Option<u32>, NodeFilesError> {
    let md = std::fs::symlink_metadata(path).map_err(io(path))?;
    if md.file_type().is_symlink() {
        return Ok(None);
    }
    let old = md.permissions().mode() & 0o7777;
    // Only what others get counts: the owner's own bits are root's business.
    let extra = old & !mode & 0o077;
    if extra == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(old & !extra))
        .map_err(io(path))?;
    Ok(Some(old))
}

/// The state directory and what lies in it (sled's store, the cluster
/// file, the run directory and its top-level files): directories 0700,
/// files 0600. rclone's cache below the run directory is not walked (it may
/// be large); its parent's 0700 closes it.
pub fn secure_state(state: &Path) -> Result<Vec<(PathBuf, u32)>, NodeFilesError> {
    let mut changed = Vec::new();
    if let Some(old) = secure_dir(state, STATE_MODE)? {
        changed.push((state.to_path_buf(), old));
    }
    let mut stack = vec![(state.to_path_buf(), true)];
    while let Some((dir, deep)) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let path = e.path();
            let Ok(kind) = e.file_type() else { continue };
            let mode = if kind.is_dir() { STATE_MODE } else { FILE_MODE };
            if let Some(old) = tighten(&path, mode)? {
                changed.push((path.clone(), old));
            }
            // Below `db` everything is sled's; below `run` only its top level.
            if kind.is_dir() && deep {
                let name = e.file_name();
                stack.push((path, name != "run" && dir != state.join("run")));
            }
        }
    }
    Ok(changed)
}

/// Removes what a killed vfolderd may have left in the run directory:
/// temporary credentials files (they exist only while a helper runs).
pub fn clean_run_dir(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("credentials-") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(path = %e.path().display(), "removed a leftover temporary credentials file")
                }
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a leftover temporary credentials file")
                }
            }
        }
    }
}

/// Everything above, at start: each repair is logged.
pub fn secure_node(state: &Path, volumes: &Path, kernels: &Path) -> Result<(), NodeFilesError> {
    let mut changed = secure_state(state)?;
    for (dir, mode) in [(volumes, VOLUMES_MODE), (kernels, KERNELS_MODE)] {
        if let Some(old) = secure_dir(dir, mode)? {
            changed.push((dir.to_path_buf(), old));
        }
    }
    for (path, old) in changed {
        tracing::warn!(path = %path.display(), was = format!("{old:o}"), "tightened a node file other users could use");
    }
    clean_run_dir(&state.join("run"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn loosened_state_and_roots_are_tightened_and_leftover_credentials_go() {
        let t = tempfile::tempdir().unwrap();
        let (state, vols, kerns) = (t.path().join("s"), t.path().join("v"), t.path().join("k"));
        std::fs::create_dir_all(state.join("db/blobs")).unwrap();
        std::fs::create_dir_all(state.join("run/rclone-cache-x/vfs")).unwrap();
        std::fs::write(state.join("db/db"), "raw etcd values").unwrap();
        std::fs::write(state.join("run/credentials-share"), "password=x").unwrap();
        std::fs::write(state.join("run/rclone-x.log"), "log").unwrap();
        for p in ["", "db", "db/blobs", "db/db", "run", "run/rclone-x.log"] {
            std::fs::set_permissions(state.join(p), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        std::fs::create_dir_all(&vols).unwrap();
        std::fs::set_permissions(&vols, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_node(&state, &vols, &kerns).unwrap();
        for p in ["", "db", "db/blobs", "run"] {
            assert_eq!(mode(&state.join(p)), 0o700, "{p}");
        }
        assert_eq!(
            mode(&state.join("db/db")) & 0o077,
            0,
            "no group or other bits"
        );
        assert_eq!(mode(&state.join("run/rclone-x.log")) & 0o077, 0);
        assert_eq!((mode(&vols), mode(&kerns)), (0o700, 0o711));
        assert!(!state.join("run/credentials-share").exists());
    }
}
