//! What desired state may make a root daemon do: allowed fstypes, per-fstype
//! option rules and source patterns, inline credentials, limits, and who may
//! mount which volumes read-write. Loaded from `policies/*.yaml` (merged in
//! file-name order) and hot-reloaded; with no policy file, the built-in
//! default of DESIGN.md applies. Every refusal starts with `policy <rule>:`,
//! naming the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod source;

use source::{split_source, SourcePattern};

/// Errors loading policy files (the last good policy stays in force).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file could not be read.
    #[error("cannot read policy {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A policy file is malformed, has an unknown field or a bad pattern.
    #[error("invalid policy {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (serde names the field).
        message: String,
    },
}

/// Rules for one fstype, as written in a policy file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FsRuleSpec {
    /// If set, only these option keys are allowed.
    #[serde(default)]
    pub allowed_options: Option<Vec<String>>,
    /// Added to every mount of this fstype (e.g. `noexec`).
    #[serde(default)]
    pub forced_options: Vec<String>,
    /// Refused option keys.
    #[serde(default)]
    pub refused_options: Vec<String>,
    /// If set, the mount source must match one of these patterns, each
    /// split like the source (see [`source`]).
    #[serde(default)]
    pub sources: Option<Vec<String>>,
    /// Whether `password=` may appear in `options` (else `credentials:` only).
    #[serde(default = "yes")]
    pub inline_credentials: bool,
}

fn yes() -> bool {
    true
}

/// Limits.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Kernels per node; the newest beyond it are refused.
    #[serde(default)]
    pub kernels_per_node: Option<usize>,
    /// Mount entries per kernel.
    #[serde(default)]
    pub mounts_per_kernel: Option<usize>,
    /// vfolderd's own mounts on a node; the newest kernels beyond it are refused.
    #[serde(default)]
    pub mounts_per_node: Option<usize>,
    /// vfolder records per owner; the newest beyond it are refused.
    #[serde(default)]
    pub vfolders_per_owner: Option<usize>,
}

impl Limits {
    /// What applies where no policy file sets a limit: one 64 KiB kernel
    /// value could otherwise ask for ~1,300 binds, and a few such kernels
    /// exhaust the kernel's `fs.mount-max` (100,000) for the whole node.
    pub fn builtin() -> Self {
        Self {
            kernels_per_node: None,
            mounts_per_kernel: Some(64),
            mounts_per_node: Some(20_000),
            vfolders_per_owner: None,
        }
    }
}

/// Which kernels may hold which per-user SAS tokens.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenPolicy {
    /// Volumes whose kernels may ask for `token: write` (create, write,
    /// delete every blob in the container). Default: none, read tokens only.
    #[serde(default)]
    pub write: Vec<String>,
}

/// One policy file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Allowed fstypes and their rules.
    #[serde(default)]
    pub fstypes: BTreeMap<String, FsRuleSpec>,
    /// Added to every mount.
    #[serde(default)]
    pub forced_options: Vec<String>,
    /// Refused on every mount.
    #[serde(default)]
    pub refused_options: Vec<String>,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// volume → owners whose vfolders on it may be mounted read-write
    /// (a volume not listed: every owner).
    #[serde(default)]
    pub rw_owners: BTreeMap<String, Vec<String>>,
    /// Token rules.
    #[serde(default)]
    pub tokens: TokenPolicy,
}

/// A compiled fstype rule.
#[derive(Debug, Clone)]
pub struct FsRule {
    /// As written.
    pub spec: FsRuleSpec,
    sources: Option<Vec<SourcePattern>>,
}

/// The policy in force.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Allowed fstypes.
    pub fstypes: BTreeMap<String, FsRule>,
    /// Added to every mount.
    pub forced_options: Vec<String>,
    /// Refused on every mount.
    pub refused_options: Vec<String>,
    /// Limits.
    pub limits: Limits,
    /// Read-write owners per volume.
    pub rw_owners: BTreeMap<String, Vec<String>>,
    /// Token rules.
    pub tokens: TokenPolicy,
    /// Where it came from (files, or "built-in default").
    pub origin: String,
}

impl Default for Policy {
    /// DESIGN.md: fstypes cifs, nfs, nfs4, tmpfs, bind, azureblob; `suid` and `dev` refused;
    /// `nosuid,nodev` on every mount.
    fn default() -> Self {
        let fstypes = ["cifs", "nfs", "nfs4", "tmpfs", "bind", "azureblob"]
            .into_iter()
            .map(|f| {
                (
                    f.to_string(),
                    FsRule {
                        spec: FsRuleSpec {
                            inline_credentials: true,
                            ..Default::default()
                        },
                        sources: None,
                    },
                )
            })
            .collect();
        Self {
            fstypes,
            forced_options: vec!["nosuid".into(), "nodev".into()],
            refused_options: vec!["suid".into(), "dev".into()],
            limits: Limits::builtin(),
            rw_owners: BTreeMap::new(),
            tokens: TokenPolicy::default(),
            origin: "built-in default".into(),
        }
    }
}

fn key_of(opt: &str) -> &str {
    opt.split('=').next().unwrap_or_default()
}

impl Policy {
    /// Compiles policy files, merged in order: later files override an
    /// fstype's rule, a limit, or a volume's rw owners; option lists add up.
    pub fn from_files(files: &[(PathBuf, String)]) -> Result<Self, PolicyError> {
        let mut p = Policy {
            fstypes: BTreeMap::new(),
            origin: String::new(),
            ..Policy::default()
        };
        p.forced_options = vec!["nosuid".into(), "nodev".into()];
        p.refused_options = vec!["suid".into(), "dev".into()];
        let mut origins = Vec::new();
        for (path, text) in files {
            let invalid = |message: String| PolicyError::Invalid {
                path: path.clone(),
                message,
            };
            let f: PolicyFile = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
            for (fstype, spec) in f.fstypes {
                let sources = spec
                    .sources
                    .as_ref()
                    .map(|pats| {
                        pats.iter()
                            .map(|pat| {
                                SourcePattern::compile(&fstype, pat).map_err(|e| {
                                    invalid(format!("fstypes.{fstype}.sources: {pat:?}: {e}"))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?;
                p.fstypes.insert(fstype, FsRule { spec, sources });
            }
            p.forced_options.extend(f.forced_options);
            p.refused_options.extend(f.refused_options);
            for (a, b) in [
                (&mut p.limits.kernels_per_node, f.limits.kernels_per_node),
                (&mut p.limits.mounts_per_kernel, f.limits.mounts_per_kernel),
                (&mut p.limits.mounts_per_node, f.limits.mounts_per_node),
                (
                    &mut p.limits.vfolders_per_owner,
                    f.limits.vfolders_per_owner,
                ),
            ] {
                if b.is_some() {
                    *a = b;
                }
            }
            p.rw_owners.extend(f.rw_owners);
            p.tokens.write.extend(f.tokens.write);
            origins.push(path.display().to_string());
        }
        for (f, rule) in &p.fstypes {
            if let Some(bad) = rule
                .spec
                .forced_options
                .iter()
                .chain(&p.forced_options)
                .find(|o| {
                    p.refused_options.contains(&key_of(o).to_string())
                        || rule.spec.refused_options.iter().any(|r| r == key_of(o))
                })
            {
                let path = files.last().map(|(p, _)| p.clone()).unwrap_or_default();
                return Err(PolicyError::Invalid {
                    path,
                    message: format!("fstypes.{f}: option {bad:?} is both forced and refused"),
                });
            }
        }
        p.origin = origins.join(", ");
        Ok(p)
    }

    /// Loads every `*.yaml` in `dir` (file-name order). `Ok(None)` when there
    /// is none: the built-in default applies.
    pub fn load_dir(dir: &Path) -> Result<Option<Self>, PolicyError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PolicyError::Read {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Ok(None);
        }
        let mut files = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|source| PolicyError::Read {
                path: p.clone(),
                source,
            })?;
            files.push((p, text));
        }
        Self::from_files(&files).map(Some)
    }

    /// Checks a volume; the error names the rule. Returns the options to
    /// mount with: the spec's, plus the forced ones not already there.
    pub fn check_volume(
        &self,
        fstype: &str,
        source: &str,
        options: &[String],
    ) -> Result<Vec<String>, String> {
        let Some(rule) = self.fstypes.get(fstype) else {
            let allowed: Vec<&str> = self.fstypes.keys().map(String::as_str).collect();
            return Err(format!(
                "policy fstypes: fstype {fstype:?} is not allowed (allowed: {})",
                allowed.join(", ")
            ));
        };
        let parts = split_source(fstype, source).map_err(|e| format!("source: {e}"))?;
        for opt in options {
            if opt.starts_with('-') {
                return Err(format!(
                    "mount option {:?} must not start with '-'",
                    key_of(opt)
                ));
            }
            let key = key_of(opt);
            if self.refused_options.iter().any(|r| r == key) {
                return Err(format!(
                    "policy refused_options: mount option {key:?} is not allowed"
                ));
            }
            if rule.spec.refused_options.iter().any(|r| r == key) {
                return Err(format!(
                    "policy fstypes.{fstype}.refused_options: mount option {key:?} is not allowed"
                ));
            }
            if let Some(allowed) = &rule.spec.allowed_options {
                if !allowed.iter().any(|a| a == key)
                    && !self.forced_options.iter().any(|f| key_of(f) == key)
                {
                    return Err(format!("policy fstypes.{fstype}.allowed_options: mount option {key:?} is not allowed"));
                }
            }
            if !rule.spec.inline_credentials
                && matches!(key.to_ascii_lowercase().as_str(), "password" | "pass")
            {
                return Err(format!("policy fstypes.{fstype}.inline_credentials: inline passwords are refused; use credentials:"));
            }
        }
        if let Some(pats) = &rule.sources {
            if !pats.iter().any(|p| p.matches(&parts)) {
                let pats = rule.spec.sources.as_deref().unwrap_or_default().join(", ");
                return Err(format!(
                    "policy fstypes.{fstype}.sources: source {source:?} matches none of [{pats}]"
                ));
            }
        }
        let mut out = options.to_vec();
        for f in self.forced_options.iter().chain(&rule.spec.forced_options) {
            if !out.iter().any(|o| key_of(o) == key_of(f)) {
                out.push(f.clone());
            }
        }
        Ok(out)
    }

    /// The directory a bind volume's source is opened beneath, without
    /// following symlinks below it: the literal directories of the first
    /// `fstypes.bind.sources` pattern that allows it (`/` without one).
    pub fn bind_anchor(&self, source: &str) -> PathBuf {
        let pats = self.fstypes.get("bind").and_then(|r| r.sources.as_ref());
        let parts = split_source("bind", source).ok();
        pats.and_then(|pats| {
            pats.iter()
                .find(|p| parts.as_ref().is_some_and(|s| p.matches(s)))
        })
        .map_or_else(|| PathBuf::from("/"), |p| p.anchor().to_path_buf())
    }

    /// Whether vfolders of `owner` on `volume` may be mounted read-write.
    pub fn may_mount_rw(&self, volume: &str, owner: &str) -> bool {
        self.rw_owners
            .get(volume)
            .is_none_or(|owners| owners.iter().any(|o| o == owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_files(&[("p.yaml".into(), text.into())]).unwrap()
    }

    #[test]
    fn shipped_default_policy_file_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let p = Policy::load_dir(&dir)
            .unwrap()
            .expect("policies/default.yaml");
        assert!(p.fstypes.contains_key("cifs") && !p.fstypes.contains_key("ext4"));
        assert!(p
            .check_volume("cifs", "//acct.file.core.windows.net/share", &[])
            .is_ok());
        assert!(p
            .check_volume("cifs", "//evil.example.com/share", &[])
            .unwrap_err()
            .starts_with("policy fstypes.cifs.sources"));
    }

    #[test]
    fn refusals_name_the_rule() {
        let p = policy(
            "fstypes:\n  cifs:\n    allowed_options: [vers, sec, password]\n    sources: ['//*.file.core.windows.net/*']\n    inline_credentials: false\n  tmpfs:\n    forced_options: [noexec]\nrefused_options: [exec]\n",
        );
        let e = |f: &str, s: &str, o: &[&str]| {
            p.check_volume(f, s, &o.iter().map(|x| x.to_string()).collect::<Vec<_>>())
                .unwrap_err()
        };
        assert!(e("nfs", "h:/x", &[]).starts_with("policy fstypes:"));
        assert!(e("tmpfs", "t", &["suid"]).starts_with("policy refused_options:"));
        assert!(e("tmpfs", "t", &["exec"]).starts_with("policy refused_options:"));
        assert!(e("cifs", "//a.file.core.windows.net/s", &["uid=0"])
            .starts_with("policy fstypes.cifs.allowed_options:"));
        assert!(e("cifs", "//a.file.core.windows.net/s", &["password=x"])
            .contains("inline_credentials"));
        assert!(e("cifs", "//x.example/s", &[]).starts_with("policy fstypes.cifs.sources:"));
        let ok = p.check_volume("tmpfs", "t", &["size=1m".into()]).unwrap();
        assert_eq!(ok, ["size=1m", "nosuid", "nodev", "noexec"]);
    }

    #[test]
    fn a_bad_policy_file_is_refused_naming_the_file() {
        let err =
            Policy::from_files(&[("bad.yaml".into(), "fstypes: {tmpfs: {colour: red}}".into())])
                .unwrap_err();
        assert!(
            err.to_string().contains("bad.yaml") && err.to_string().contains("colour"),
            "{err}"
        );
        let err = Policy::from_files(&[(
            "b.yaml".into(),
            "fstypes: {tmpfs: {forced_options: [suid]}}".into(),
        )])
        .unwrap_err();
        assert!(err.to_string().contains("forced and refused"), "{err}");
    }

    #[test]
    fn rw_owners_restrict_only_listed_volumes() {
        let p = policy("fstypes: {tmpfs: {}}\nrw_owners: {datasets: [admin]}\n");
        assert!(p.may_mount_rw("datasets", "admin") && !p.may_mount_rw("datasets", "alice"));
        assert!(p.may_mount_rw("scratch", "alice"));
    }
}
