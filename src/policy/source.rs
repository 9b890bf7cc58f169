//! Mount sources as policy patterns see them. A source is split into the
//! parts that mean something to the mount it makes — cifs `//HOST/PATH`,
//! nfs `HOST:/PATH`, an azureblob URL's scheme, host[:port] and container
//! path, a bind's clean absolute path — and each pattern in a policy file is
//! split the same way, so a glob for one part can never match across into
//! another. Globs never let `*`, `?` or `[...]` cross `/`; `**` is the only
//! way across. Matching whole strings let `//evil.example/x.file.core.windows.net/y`
//! pass `//*.file.core.windows.net/*`, and `/srv/vfolderd/../../` pass
//! `/srv/vfolderd/**`.

use globset::{GlobBuilder, GlobMatcher};

/// Why a source (or a policy pattern) does not have the shape its fstype needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// A leading `-` would be read as an option by the mount helper.
    #[error("source must not start with '-'")]
    Dash,
    /// The shape is wrong; the message says what was expected.
    #[error("{0}")]
    Shape(String),
}

/// How an fstype's sources are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `//host/share[/path]` (cifs).
    Unc,
    /// `host:/export[/path]` (nfs).
    HostPath,
    /// `scheme://host[:port]/path` (azureblob).
    Url,
    /// A clean absolute path (bind, and block devices of other fstypes).
    Path,
    /// Anything else, e.g. `tmpfs`: matched whole.
    Name,
}

impl Form {
    /// The form of `text` (a source or a pattern) for `fstype`.
    pub fn of(fstype: &str, text: &str) -> Form {
        match fstype {
            "cifs" | "smb3" => Form::Unc,
            "nfs" | "nfs4" => Form::HostPath,
            "azureblob" => Form::Url,
            "bind" => Form::Path,
            _ if text.starts_with('/') => Form::Path,
            _ => Form::Name,
        }
    }
}

/// A source (or pattern) split into the parts matched separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// Its form.
    pub form: Form,
    /// URL scheme (lowercase), for [`Form::Url`].
    pub scheme: Option<String>,
    /// Host (with `:port` for URLs), lowercase, for the remote forms.
    pub host: Option<String>,
    /// The path part: the share path (no leading `/`), the export path (with
    /// it), the URL path (without it), the absolute path, or the name.
    pub path: String,
}

fn shape(s: impl Into<String>) -> SourceError {
    SourceError::Shape(s.into())
}

/// Splits and validates a mount source of `fstype`.
pub fn split_source(fstype: &str, source: &str) -> Result<Parts, SourceError> {
    if source.starts_with('-') {
        return Err(SourceError::Dash);
    }
    let parts = match Form::of(fstype, source) {
        Form::Url => return split_url_source(source),
        form => split(form, source)?,
    };
    if let Some(host) = &parts.host {
        check_host(host)?;
    }
    match parts.form {
        Form::Unc => {
            check_clean(&parts.path, "share path")?;
            check_no_option_chars(&parts.path, "share path")?;
        }
        Form::HostPath => {
            check_clean(parts.path.strip_prefix('/').unwrap_or(&parts.path), "path")?;
            check_no_option_chars(&parts.path, "export path")?;
        }
        Form::Path => check_clean(parts.path.strip_prefix('/').unwrap_or(&parts.path), "path")?,
        Form::Url | Form::Name => {}
    }
    Ok(parts)
}

/// Splits by form, tolerating glob characters (patterns go through here too).
fn split(form: Form, text: &str) -> Result<Parts, SourceError> {
    let remote = |host: &str, path: &str| Parts {
        form,
        scheme: None,
        host: Some(host.to_ascii_lowercase()),
        path: path.to_string(),
    };
    match form {
        Form::Unc => {
            let rest = text
                .strip_prefix("//")
                .filter(|r| !r.contains('\\'))
                .ok_or_else(|| shape("a cifs source must look like //host/share"))?;
            match rest.split_once('/') {
                Some((host, path)) if !host.is_empty() && !path.is_empty() => {
                    Ok(remote(host, path))
                }
                _ => Err(shape("a cifs source must look like //host/share")),
            }
        }
        Form::HostPath => {
            let (host, path) = if text.starts_with('[') {
                let end = text.find(']').ok_or_else(|| shape("unclosed [ in host"))?;
                (
                    &text[..=end],
                    text[end + 1..].strip_prefix(':').unwrap_or("x"),
                )
            } else {
                text.split_once(':').unwrap_or(("", "x"))
            };
            if host.is_empty() || !path.starts_with('/') {
                return Err(shape("an nfs source must look like host:/export"));
            }
            Ok(remote(host, path))
        }
        Form::Url => {
            let bad = || shape("an azureblob source must look like https://host/container");
            let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
            let (host, path) = rest.split_once('/').ok_or_else(bad)?;
            Ok(Parts {
                scheme: Some(scheme.to_ascii_lowercase()),
                ..remote(host, path)
            })
        }
        Form::Path if text.starts_with('/') => Ok(Parts {
            form,
            scheme: None,
            host: None,
            path: text.to_string(),
        }),
        Form::Path => Err(shape("must be an absolute path")),
        Form::Name => Ok(Parts {
            form,
            scheme: None,
            host: None,
            path: text.to_string(),
        }),
    }
}

/// A URL source is split by the same parser that later builds the SAS
/// endpoint from it, so what is matched is what is used.
fn split_url_source(source: &str) -> Result<Parts, SourceError> {
    let u = url::Url::parse(source).map_err(|e| shape(format!("not a URL: {e}")))?;
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err(shape(
            "an azureblob source must carry no user, query or fragment",
        ));
    }
    let host = u.host_str().ok_or_else(|| shape("the URL has no host"))?;
    let host = match u.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let path = u.path().trim_start_matches('/').to_string();
    check_clean(&path, "URL path")?;
    Ok(Parts {
        form: Form::Url,
        scheme: Some(u.scheme().to_string()),
        host: Some(host.to_ascii_lowercase()),
        path,
    })
}

/// Host names, IPv4 and bracketed IPv6 addresses, and `host:port`.
fn check_host(host: &str) -> Result<(), SourceError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']');
    if host.is_empty() || host.starts_with('-') || !host.chars().all(ok) {
        return Err(shape(format!(
            "host {host:?} may hold only letters, digits, '.', '-', '_' (or an [IPv6] address)"
        )));
    }
    Ok(())
}

/// No `.`, `..` or empty component: what is matched is where it leads.
fn check_clean(path: &str, what: &str) -> Result<(), SourceError> {
    if path.is_empty() {
        return Ok(());
    }
    match path
        .split('/')
        .find(|c| c.is_empty() || *c == "." || *c == "..")
    {
        Some(c) => Err(shape(format!(
            "{what} {path:?} has a {:?} component; write it without '.', '..' or '//'",
            c
        ))),
        None => Ok(()),
    }
}

/// No comma, whitespace or control character: mount.cifs and mount.nfs put
/// the share or export path into the kernel's comma-separated option string
/// unescaped, so `//acct.file.core.windows.net/share,ip=203.0.113.7` would
/// mount (and send credentials to) another server.
fn check_no_option_chars(path: &str, what: &str) -> Result<(), SourceError> {
    match path
        .chars()
        .find(|c| *c == ',' || c.is_whitespace() || c.is_control())
    {
        Some(c) => Err(shape(format!("{what} must not contain {c:?}"))),
        None => Ok(()),
    }
}

/// One `sources:` entry of a policy file, split like the sources it judges.
#[derive(Debug, Clone)]
pub struct SourcePattern {
    form: Form,
    scheme: Option<String>,
    host: Option<GlobMatcher>,
    path: GlobMatcher,
    anchor: std::path::PathBuf,
}

fn glob(pattern: &str, case_insensitive: bool) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .case_insensitive(case_insensitive)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.to_string())
}

impl SourcePattern {
    /// Compiles `pattern` for `fstype`.
    pub fn compile(fstype: &str, pattern: &str) -> Result<Self, String> {
        let parts = split(Form::of(fstype, pattern), pattern).map_err(|e| e.to_string())?;
        Ok(Self {
            form: parts.form,
            scheme: parts.scheme,
            host: parts.host.as_deref().map(|h| glob(h, true)).transpose()?,
            path: glob(&parts.path, false)?,
            anchor: literal_prefix(&parts.path),
        })
    }

    /// For a path pattern: its leading directories without glob characters
    /// (`/srv/vfolderd` for `/srv/vfolderd/**`), the operator's trusted
    /// directory a bind source is opened beneath.
    pub fn anchor(&self) -> &std::path::Path {
        &self.anchor
    }

    /// Whether `source` (split by [`split_source`]) matches, part by part.
    pub fn matches(&self, source: &Parts) -> bool {
        let host_ok = match (&self.host, &source.host) {
            (Some(g), Some(h)) => g.is_match(h),
            (None, None) => true,
            _ => false,
        };
        self.form == source.form
            && self.scheme == source.scheme
            && host_ok
            && self.path.is_match(&source.path)
    }
}

/// The components of an absolute path pattern before the first one with a
/// glob character, and never its last component (that names the source).
fn literal_prefix(pattern: &str) -> std::path::PathBuf {
    let comps: Vec<&str> = pattern.split('/').skip(1).collect();
    let mut out = std::path::PathBuf::from("/");
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        if c.is_empty() || c.contains(['*', '?', '[', '{', '\\']) {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(fstype: &str, pattern: &str, source: &str) -> bool {
        let p = SourcePattern::compile(fstype, pattern).unwrap();
        split_source(fstype, source).is_ok_and(|s| p.matches(&s))
    }

    /// Issue 12 item 1: each of these passed the shipped policy.
    #[test]
    fn the_reported_walks_around_the_shipped_patterns_are_refused() {
        let cifs = "//*.file.core.windows.net/*";
        assert!(allowed("cifs", cifs, "//acct.file.core.windows.net/share"));
        assert!(!allowed(
            "cifs",
            cifs,
            "//evil.example/x.file.core.windows.net/y"
        ));
        assert!(!allowed(
            "cifs",
            cifs,
            "//acct.file.core.windows.net/share/../other"
        ));
        // Review finding: mount.cifs and mount.nfs put the path into the option string.
        assert!(!allowed(
            "cifs",
            cifs,
            "//acct.file.core.windows.net/share,ip=203.0.113.7"
        ));
        assert!(!allowed("nfs", "*:/**", "nfs.example:/x,addr=203.0.113.7"));
        let bind = "/srv/vfolderd/**";
        assert!(allowed("bind", bind, "/srv/vfolderd/datasets/a"));
        assert!(!allowed("bind", bind, "/srv/vfolderd/../../"));
        assert!(!allowed("bind", bind, "/srv/vfolderd/../../etc"));
        assert!(!allowed("bind", bind, "/srv/vfolderd/./x"));
        assert!(!allowed("bind", bind, "/srv/vfolderd//x"));
        let blob = "https://*.blob.core.windows.net/*";
        assert!(allowed(
            "azureblob",
            blob,
            "https://acct.blob.core.windows.net/c"
        ));
        assert!(!allowed(
            "azureblob",
            blob,
            "https://acct.blob.evil/c#.blob.core.windows.net/x"
        ));
        assert!(!allowed(
            "azureblob",
            blob,
            "https://acct.blob.core.windows.net.evil/c"
        ));
        assert!(!allowed(
            "azureblob",
            blob,
            "http://acct.blob.core.windows.net/c"
        ));
        assert!(!allowed(
            "azureblob",
            blob,
            "https://x@acct.blob.core.windows.net/c"
        ));
        assert!(!allowed(
            "azureblob",
            blob,
            "https://acct.blob.core.windows.net/c?sv=1"
        ));
    }

    #[test]
    fn a_star_never_crosses_a_slash_and_two_stars_do() {
        assert!(!allowed("nfs", "*:/*", "nfs.example:/data/sub"));
        assert!(allowed("nfs", "*:/**", "nfs.example:/data/sub"));
        assert!(allowed("nfs", "*:/data", "[fe80::1]:/data"));
        assert!(!allowed("nfs", "*.example:/**", "evil:/x.example:/y"));
        assert!(!allowed("nfs", "*:/**", "nfs.example:/data/../etc"));
        assert!(!allowed("tmpfs", "tmp*", "tmp/x"));
        assert!(allowed("tmpfs", "tmp*", "tmpfs"));
    }

    #[test]
    fn a_leading_dash_or_a_bad_host_is_no_source() {
        assert_eq!(split_source("tmpfs", "-oexec"), Err(SourceError::Dash));
        assert!(split_source("cifs", "//-oexec/share").is_err());
        assert!(split_source("cifs", "//a b/share").is_err());
        assert!(split_source("cifs", "\\\\host\\share").is_err());
        assert!(split_source("nfs", "host:relative").is_err());
        assert!(split_source("bind", "relative/dir").is_err());
    }

    #[test]
    fn a_path_pattern_anchors_at_its_literal_directories() {
        let a = |p: &str| {
            SourcePattern::compile("bind", p)
                .unwrap()
                .anchor()
                .to_path_buf()
        };
        assert_eq!(a("/srv/vfolderd/**"), std::path::Path::new("/srv/vfolderd"));
        assert_eq!(a("/srv/data"), std::path::Path::new("/srv"));
        assert_eq!(a("/srv/*/x"), std::path::Path::new("/srv"));
        assert_eq!(a("/**"), std::path::Path::new("/"));
    }

    #[test]
    fn path_style_emulator_urls_keep_their_port_in_the_host() {
        let p = "http://127.0.0.1:*/devstoreaccount1/*";
        assert!(allowed(
            "azureblob",
            p,
            "http://127.0.0.1:10000/devstoreaccount1/c"
        ));
        assert!(!allowed("azureblob", p, "http://127.0.0.1:10000/other/c"));
    }
}
