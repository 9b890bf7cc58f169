//! A secret string that cannot be printed by accident: `Debug` and
//! `Display` redact it, so it never reaches logs, status, metrics or errors.

use std::fmt;

/// A password, account key or SAS URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that must use it (an HMAC key,
    /// a child's environment, a 0600 file). Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Checks a node-local secret file `<dir>/<name>`: it exists, is a regular
/// file, is not readable by group or others, and (when we are root) is
/// owned by root. Returns its path. The message never includes its content.
pub fn secret_file(dir: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(name);
    let md = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            md.mode() & 0o777
        ));
    }
    if md.uid() != 0 && nix::unistd::geteuid().is_root() {
        return Err(format!("{} must be owned by root", path.display()));
    }
    Ok(path)
}

/// The identity of a secret file (inode, size, mtime), to notice rotation
/// without keeping anything derived from its content.
pub fn file_stamp(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}.{}",
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec()
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_do_not_print() {
        let s = super::Secret::new("hunter2");
        assert_eq!(
            format!("{s} {s:?} {:?}", Some(&s)),
            "*** Secret(***) Some(Secret(***))"
        );
        assert_eq!(s.expose(), "hunter2");
    }
}
