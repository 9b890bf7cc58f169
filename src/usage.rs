//! Usage of a vfolder directory: file count and apparent bytes. A plain
//! recursive walk that never follows symlinks; a fast parallel one is issue 4.

use std::path::Path;

/// Counts non-directory entries and sums their apparent sizes under `dir`.
/// Unreadable subdirectories are skipped (a user may chmod 000 their own).
pub fn scan(dir: &Path) -> std::io::Result<(u64, u64)> {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if first => return Err(e),
            Err(_) => continue,
        };
        first = false;
        for entry in rd.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else {
                files += 1;
                if let Ok(md) = entry.metadata() {
                    bytes += md.len();
                }
            }
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn scan_counts_files_and_bytes_recursively() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("x"), b"12345").unwrap();
        std::fs::write(t.path().join("a/b/y"), b"123").unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        assert_eq!(super::scan(t.path()).unwrap(), (3, 8 + "/etc".len() as u64));
    }
}
