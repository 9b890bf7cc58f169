//! Typed desired objects parsed from etcd values: volumes, vfolders, kernels.
//!
//! Parsing is strict (unknown fields are refused, naming the field) and every
//! failure is a message fit for a `Rejected` status: secrets are redacted.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::names::{check_component_name, is_valid_object_name, redact};
use crate::policy::Policy;

/// When a volume is mounted on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountAt {
    /// At vfolderd start, and bound into every kernel home.
    Startup,
    /// Only while a kernel on this node uses one of its vfolders.
    Requested,
}

/// Read-only or read-write.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read-only.
    #[default]
    Ro,
    /// Read-write.
    Rw,
}

/// A volume's filesystem type: the ones vfolderd mounts its own way, and any
/// other a mount helper handles. Written as its name in specs and the ledger.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum Fstype {
    /// Azure Files / SMB, through `mount.cifs` (secrets moved to a 0600 file).
    Cifs,
    /// NFS (v3 or v4), through `mount.nfs`.
    Nfs,
    /// A memory filesystem, mounted with mount(2).
    Tmpfs,
    /// A host directory, bound with mount(2).
    Bind,
    /// An Azure Blob container, through an rclone FUSE daemon.
    AzureBlob,
    /// Anything else with a mount helper (`nfs4`, ...).
    Other(String),
}

impl Fstype {
    /// Its name, as written in specs and passed to `mount -t`.
    pub fn as_str(&self) -> &str {
        match self {
            Fstype::Cifs => "cifs",
            Fstype::Nfs => "nfs",
            Fstype::Tmpfs => "tmpfs",
            Fstype::Bind => "bind",
            Fstype::AzureBlob => "azureblob",
            Fstype::Other(s) => s,
        }
    }

    /// Its name as a metric label: one of a fixed few (any other fstype
    /// is `other`), so a hostile record cannot grow the label set.
    pub fn label(&self) -> &'static str {
        match self {
            Fstype::Cifs => "cifs",
            Fstype::Nfs => "nfs",
            Fstype::Tmpfs => "tmpfs",
            Fstype::Bind => "bind",
            Fstype::AzureBlob => "azureblob",
            Fstype::Other(_) => "other",
        }
    }

    /// Every [`Fstype::label`].
    pub const LABELS: [&'static str; 6] = ["cifs", "nfs", "tmpfs", "bind", "azureblob", "other"];
}

impl From<String> for Fstype {
    fn from(s: String) -> Self {
        match s.as_str() {
            "cifs" => Fstype::Cifs,
            "nfs" => Fstype::Nfs,
            "tmpfs" => Fstype::Tmpfs,
            "bind" => Fstype::Bind,
            "azureblob" => Fstype::AzureBlob,
            _ => Fstype::Other(s),
        }
    }
}

impl From<&str> for Fstype {
    fn from(s: &str) -> Self {
        Fstype::from(s.to_string())
    }
}

impl From<Fstype> for String {
    fn from(f: Fstype) -> String {
        f.as_str().to_string()
    }
}

impl std::fmt::Display for Fstype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `mount:` block of a volume spec (the seed's format).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// startup | requested.
    pub at: MountAt,
    /// cifs, nfs, tmpfs, bind, azureblob, or any fstype with a mount helper.
    pub fstype: Fstype,
    /// The mount source (`//host/share`, `host:/export`, a directory for bind).
    pub path: String,
    /// Comma-separated mount options, as for `mount -o`.
    #[serde(default)]
    pub options: Option<String>,
    /// Name of a node-local secret file holding credentials.
    #[serde(default)]
    pub credentials: Option<String>,
}

/// A volume spec at `P/volumes/<volume>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Optional; must equal the key's last segment.
    #[serde(default)]
    pub name: Option<String>,
    /// How to mount it.
    pub mount: MountSpec,
    /// How kernels see a startup volume: ro (default) or rw.
    #[serde(default)]
    pub access: Permission,
    /// Storage role creates the blob container if missing (issue 5).
    #[serde(default)]
    pub create: bool,
    /// When a stale mount of this volume is healed (lazy unmount, remount).
    #[serde(default)]
    pub heal: HealPolicy,
    /// Who owns the vfolder directories and files on it (default: the
    /// node's `kernel_uid`); cifs and rclone present files as them.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Their group (default: the node's `kernel_gid`).
    #[serde(default)]
    pub gid: Option<u32>,
}

/// When vfolderd heals a stale volume mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealPolicy {
    /// Only while no kernel uses it: a remount under running kernels would
    /// cut their open files, so they keep the stale mount until they go.
    #[default]
    Unused,
    /// Also under running kernels: their binds are re-made on the new mount.
    Always,
}

impl VolumeSpec {
    /// The options as a list, empty entries dropped.
    pub fn option_list(&self) -> Vec<String> {
        split_options(self.mount.options.as_deref().unwrap_or(""))
    }
}

/// Splits `a,b=c,,d` into `["a", "b=c,d"]`: as for mount.cifs, `,,` is a
/// comma inside an option (a password may hold one), not an empty option.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut push = |cur: &mut String| {
        let o = cur.trim();
        if !o.is_empty() {
            out.push(o.to_string());
        }
        cur.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            ',' => push(&mut cur),
            c => cur.push(c),
        }
    }
    push(&mut cur);
    out
}

/// Bare cifs flags (mount.cifs(8), mount(8)): anything else without `=`
/// right after a password is most likely the password's tail, cut off at an
/// unescaped comma, and must reach neither argv nor a status.
const CIFS_FLAGS: &[&str] = &[
    "ro",
    "rw",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "relatime",
    "norelatime",
    "strictatime",
    "sync",
    "async",
    "dirsync",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "defaults",
    "setuids",
    "nosetuids",
    "perm",
    "noperm",
    "dynperm",
    "nodfs",
    "hard",
    "soft",
    "acl",
    "noacl",
    "cifsacl",
    "nocase",
    "ignorecase",
    "nobrl",
    "brl",
    "forcemandatorylock",
    "locallease",
    "strictsync",
    "nostrictsync",
    "sharesock",
    "nosharesock",
    "serverino",
    "noserverino",
    "mapchars",
    "nomapchars",
    "mapposix",
    "nomapposix",
    "mfsymlinks",
    "unix",
    "nounix",
    "linux",
    "nolinux",
    "posix",
    "noposix",
    "sfu",
    "handlecache",
    "nohandlecache",
    "forceuid",
    "noforceuid",
    "forcegid",
    "noforcegid",
    "intr",
    "nointr",
    "rdma",
    "resilienthandles",
    "noresilienthandles",
    "persistenthandles",
    "nopersistenthandles",
    "seal",
    "sign",
    "multiuser",
    "fsc",
    "guest",
    "noblocksend",
    "nolease",
    "witness",
];

/// cifs option keys taking a value (mount.cifs(8)): after a password,
/// anything else is taken for the password's tail.
const CIFS_KEYS: &[&str] = &[
    "username",
    "user",
    "password",
    "pass",
    "password2",
    "domain",
    "dom",
    "workgroup",
    "credentials",
    "cred",
    "uid",
    "gid",
    "cruid",
    "backupuid",
    "backupgid",
    "file_mode",
    "dir_mode",
    "vers",
    "sec",
    "cache",
    "actimeo",
    "acregmax",
    "acdirmax",
    "closetimeo",
    "rsize",
    "wsize",
    "bsize",
    "rasize",
    "esize",
    "port",
    "netbiosname",
    "servern",
    "ip",
    "addr",
    "iocharset",
    "echo_interval",
    "max_credits",
    "handletimeout",
    "snapshot",
    "max_channels",
    "multichannel",
    "upcall_target",
    "noperm",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
];

/// Refuses a cifs option list where a password seems cut at a comma.
fn check_cifs_secret_tail(opts: &[String]) -> Result<(), String> {
    for pair in opts.windows(2) {
        let key = pair[0]
            .split('=')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let next = pair[1].to_ascii_lowercase();
        let next_key = next.split('=').next().unwrap_or_default();
        let known = if next.contains('=') {
            CIFS_KEYS.contains(&next_key)
        } else {
            CIFS_FLAGS.contains(&next.as_str())
        };
        if crate::names::is_secret_key(&key) && !known {
            return Err(format!(
                "options: the option after {key}= is no cifs option; a comma inside a password is written ',,' (the option is not shown)"
            ));
        }
    }
    Ok(())
}

/// A vfolder record at `P/vfolders/<uuid>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VfolderSpec {
    /// The user-visible name; the default alias in kernel homes.
    pub name: String,
    /// The owning user.
    pub owner: String,
    /// The volume it lives on.
    pub volume: String,
    /// Default permission for kernels (rw).
    #[serde(default = "rw")]
    pub permission: Permission,
    /// Optional quota, in bytes.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// In the trash: its directory moves to `<volume>/.trash/<hex>` once no
    /// kernel wants it, and back when this goes. Never purges by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trash: bool,
    /// A new vfolder filled from this one (reflinked where the filesystem
    /// can, copied otherwise); its directory appears when the clone is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<Uuid>,
}

fn rw() -> Permission {
    Permission::Rw
}

/// One raw kernel mount entry; validated into [`KernelMount`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernelMount {
    #[serde(default)]
    vfolder: Option<String>,
    #[serde(default, rename = "as")]
    alias: Option<String>,
    #[serde(default)]
    permission: Option<Permission>,
    #[serde(default)]
    volume: Option<String>,
    #[serde(default)]
    token: Option<TokenKind>,
}

/// What a per-user SAS token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// read + list.
    Read,
    /// read, add, create, write, delete, list.
    Write,
}

/// A validated kernel mount entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelMount {
    /// Bind a vfolder into the home.
    Vfolder {
        /// The vfolder's uuid.
        id: Uuid,
        /// Name in the home; defaults to the vfolder's name.
        alias: Option<String>,
        /// Overrides the vfolder's permission.
        permission: Option<Permission>,
    },
    /// A per-user SAS token file for a blob volume (issue 5).
    Token {
        /// The blob volume.
        volume: String,
        /// Token scope.
        kind: TokenKind,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernelSpec {
    #[serde(default)]
    home: Option<PathBuf>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    mounts: Vec<RawKernelMount>,
}

/// A kernel attachment at `P/nodes/<node>/kernels/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    /// The host directory bound as `/home/work`; inside the kernels root.
    pub home: PathBuf,
    /// Owner of created directories.
    pub uid: Option<u32>,
    /// Group of created directories.
    pub gid: Option<u32>,
    /// What to attach.
    pub mounts: Vec<KernelMount>,
}

/// Why a desired object is refused (its status says `Rejected` with this
/// message). The kind decides what happens to what it had: a malformed value
/// holds everything it had in place (an error never unmounts); a policy
/// refusal keeps a volume mounted only while kernels use it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The key or value is malformed (YAML, schema, names, sizes).
    #[error("{0}")]
    Invalid(String),
    /// The policy refuses it; the message names the rule (`policy <rule>: ...`).
    #[error("{0}")]
    Policy(String),
}

impl Rejection {
    /// Whether the policy, not the value's form, refused it.
    pub fn is_policy(&self) -> bool {
        matches!(self, Rejection::Policy(_))
    }

    /// The same rejection with its message redacted.
    fn redacted(self) -> Self {
        match self {
            Rejection::Invalid(m) => Rejection::Invalid(redact(&m)),
            Rejection::Policy(m) => Rejection::Policy(redact(&m)),
        }
    }
}

impl From<String> for Rejection {
    fn from(message: String) -> Self {
        Rejection::Invalid(message)
    }
}

impl From<&str> for Rejection {
    fn from(message: &str) -> Self {
        Rejection::Invalid(message.to_string())
    }
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    redact(&e.to_string())
}

/// Parses and validates a volume value stored under key name `key_name`.
/// Every message is redacted: a rejected value may carry a password or SAS.
pub fn parse_volume(
    key_name: &str,
    value: &[u8],
    policy: &Policy,
) -> Result<VolumeSpec, Rejection> {
    check_volume(key_name, value, policy).map_err(Rejection::redacted)
}

/// Largest desired value accepted: specs are small; a huge one is an attack or a mistake.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest mount source or option string (the kernel's page-sized limit on mount data).
pub const MAX_MOUNT_STRING: usize = 4096;

fn check_size(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes; at most {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

fn check_volume(key_name: &str, value: &[u8], policy: &Policy) -> Result<VolumeSpec, Rejection> {
    check_size(value)?;
    let spec: VolumeSpec = serde_yaml::from_slice(value).map_err(|e| yaml_error(&e))?;
    if let Some(n) = &spec.name {
        if n != key_name {
            return Err(
                format!("name {n:?} does not match the key's volume name {key_name:?}").into(),
            );
        }
    }
    let opts = spec.option_list();
    if spec.mount.fstype == Fstype::Cifs {
        check_cifs_secret_tail(&opts)?;
    }
    // `,,` is a comma inside a password only: anywhere else it would smuggle
    // an option past the policy (`vers=3.0,,ip=...` is checked as `vers`).
    if let Some(o) = opts.iter().find(|o| {
        let key = o.split('=').next().unwrap_or_default().to_ascii_lowercase();
        o.contains(',') && !crate::names::is_secret_key(&key)
    }) {
        let key = o.split('=').next().unwrap_or_default();
        return Err(
            format!("options: option {key:?} holds a comma (',,'); only a password may").into(),
        );
    }
    policy
        .check_volume(spec.mount.fstype.as_str(), &spec.mount.path, &opts)
        .map_err(Rejection::Policy)?;
    if spec.mount.path.len() > MAX_MOUNT_STRING
        || spec
            .mount
            .options
            .as_ref()
            .is_some_and(|o| o.len() > MAX_MOUNT_STRING)
    {
        return Err(
            format!("mount.path and mount.options are at most {MAX_MOUNT_STRING} bytes").into(),
        );
    }
    if spec.mount.path.is_empty() || spec.mount.path.contains(['\0', '\n']) {
        return Err("mount.path must be non-empty and contain no NUL or newline".into());
    }
    if let Some(o) = &spec.mount.options {
        if o.contains(['\0', '\n']) {
            return Err("mount.options must not contain NUL or newline".into());
        }
    }
    match &spec.mount.fstype {
        Fstype::Bind if !Path::new(&spec.mount.path).is_absolute() => {
            return Err("a bind volume's mount.path must be an absolute directory".into())
        }
        Fstype::Cifs if !spec.mount.path.starts_with("//") => {
            return Err("a cifs volume's mount.path must look like //host/share".into())
        }
        Fstype::AzureBlob => {
            crate::azure::BlobLocation::parse(&spec.mount.path).map_err(|e| e.to_string())?;
            if spec.mount.credentials.is_none() {
                return Err(
                    "an azureblob volume needs credentials: <name of the account key file>".into(),
                );
            }
        }
        _ => {}
    }
    let has_inline_secret = opts
        .iter()
        .any(|o| o.to_ascii_lowercase().starts_with("password="));
    if has_inline_secret && spec.mount.fstype != Fstype::Cifs {
        return Err("inline password= is only supported for cifs (it is moved into a 0600 credentials file); use credentials:".into());
    }
    if let Some(c) = &spec.mount.credentials {
        if !is_valid_object_name(c) {
            // Not echoed: a key pasted here by mistake must not reach status.
            return Err(
                "credentials must name a file in the node's credentials directory (letters, digits, '.', '_', '-'; the value is not shown)"
                    .into(),
            );
        }
    }
    Ok(spec)
}

/// Parses and validates a vfolder record (messages redacted).
pub fn parse_vfolder(value: &[u8]) -> Result<VfolderSpec, String> {
    check_vfolder(value).map_err(|e| redact(&e))
}

fn check_vfolder(value: &[u8]) -> Result<VfolderSpec, String> {
    check_size(value)?;
    let spec: VfolderSpec = serde_yaml::from_slice(value).map_err(|e| yaml_error(&e))?;
    check_component_name(&spec.name).map_err(|e| format!("vfolder {e}"))?;
    if !is_valid_object_name(&spec.volume) {
        return Err(format!(
            "volume {:?} is not a valid volume name",
            spec.volume
        ));
    }
    if spec.owner.is_empty() {
        return Err("owner must not be empty".into());
    }
    Ok(spec)
}

/// Parses and validates a kernel value; `kernels_root` is where homes must lie.
/// Every message is redacted: names and paths in it are the user's input.
pub fn parse_kernel(id: &str, value: &[u8], kernels_root: &Path) -> Result<KernelSpec, String> {
    check_kernel(id, value, kernels_root).map_err(|e| redact(&e))
}

fn check_kernel(id: &str, value: &[u8], kernels_root: &Path) -> Result<KernelSpec, String> {
    check_size(value)?;
    let raw: RawKernelSpec = serde_yaml::from_slice(value).map_err(|e| yaml_error(&e))?;
    let home = match raw.home {
        None => kernels_root.join(id).join("work"),
        Some(h) => {
            if !h.is_absolute()
                || h.components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return Err(format!(
                    "home {} must be an absolute path without . or ..",
                    h.display()
                ));
            }
            if !h.starts_with(kernels_root) || h == kernels_root {
                return Err(format!(
                    "home {} must lie inside {}",
                    h.display(),
                    kernels_root.display()
                ));
            }
            h
        }
    };
    let mut mounts = Vec::with_capacity(raw.mounts.len());
    for (i, m) in raw.mounts.into_iter().enumerate() {
        let entry = match (m.vfolder, m.volume) {
            (Some(v), None) => {
                if m.token.is_some() {
                    return Err(format!(
                        "mounts[{i}]: token goes with volume:, not vfolder:"
                    ));
                }
                let id = Uuid::parse_str(&v)
                    .map_err(|_| format!("mounts[{i}]: vfolder {v:?} is not a uuid"))?;
                if let Some(a) = &m.alias {
                    check_component_name(a).map_err(|e| format!("mounts[{i}]: as: {e}"))?;
                }
                KernelMount::Vfolder {
                    id,
                    alias: m.alias,
                    permission: m.permission,
                }
            }
            (None, Some(volume)) => {
                if !is_valid_object_name(&volume) {
                    return Err(format!(
                        "mounts[{i}]: volume {volume:?} is not a valid volume name"
                    ));
                }
                let Some(kind) = m.token else {
                    return Err(format!(
                        "mounts[{i}]: a volume entry needs token: read|write"
                    ));
                };
                if m.alias.is_some() || m.permission.is_some() {
                    return Err(format!(
                        "mounts[{i}]: as/permission go with vfolder:, not volume:"
                    ));
                }
                KernelMount::Token { volume, kind }
            }
            _ => {
                return Err(format!(
                    "mounts[{i}]: exactly one of vfolder: or volume: is required"
                ))
            }
        };
        mounts.push(entry);
    }
    Ok(KernelSpec {
        home,
        uid: raw.uid,
        gid: raw.gid,
        mounts,
    })
}

/// Parses an operator's `apply -f` document: the seed's `volumes:` list or one spec.
pub fn parse_volume_document(text: &str) -> Result<Vec<(String, String)>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct List {
        volumes: Vec<serde_yaml::Value>,
    }
    let values: Vec<serde_yaml::Value> = match serde_yaml::from_str::<List>(text) {
        Ok(list) => list.volumes,
        Err(_) => vec![serde_yaml::from_str(text).map_err(|e| yaml_error(&e))?],
    };
    let mut out = Vec::new();
    for v in values {
        let name = v
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| "every volume in the document needs a name:".to_string())?
            .to_string();
        if !is_valid_object_name(&name) {
            return Err(format!("volume name {name:?} is invalid"));
        }
        let body = serde_yaml::to_string(&v).map_err(|e| yaml_error(&e))?;
        parse_volume(&name, body.as_bytes(), &Policy::default())
            .map_err(|e| format!("volume {name}: {e}"))?;
        out.push((name, body));
    }
    Ok(out)
}

/// The directory of a vfolder under its volume's mount point:
/// `<hex[0:2]>/<hex[2:4]>/<hex>` (Backend.AI's sharding).
pub fn vfolder_relpath(id: &Uuid) -> PathBuf {
    let hex = id.simple().to_string();
    PathBuf::from(&hex[0..2]).join(&hex[2..4]).join(&hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
volumes:

  - name: azure-shard-1
    mount:
      at: requested
      fstype: cifs
      path: "//USERNAME.file.core.windows.net/vfolder"
      options: "vers=3.0,username=USERNAME,password=PASSWORD,dir_mode=0777,file_mode=0777,sec=ntlmssp"

  - name: azure-deeplearning-samples
    mount:
      at: startup
      fstype: cifs
      path: "//USERNAME.file.core.windows.net/dlsamples"
      options: "vers=3.0,username=USERNAME,password=PASSWORD,dir_mode=0777,file_mode=0777,sec=ntlmssp"
"#;

    #[test]
    fn seed_volumes_parse_as_written() {
        let vols = parse_volume_document(SEED).unwrap();
        assert_eq!(vols.len(), 2);
        let spec = parse_volume(&vols[1].0, vols[1].1.as_bytes(), &Policy::default()).unwrap();
        assert_eq!(spec.mount.at, MountAt::Startup);
        assert_eq!(spec.access, Permission::Ro);
    }

    #[test]
    fn volume_unknown_field_is_rejected_naming_it() {
        let err = parse_volume(
            "v",
            b"mount: {at: startup, fstype: tmpfs, path: x, colour: red}\n",
            &Policy::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn volume_forbidden_fstype_and_option_are_rejected() {
        let p = Policy::default();
        assert!(parse_volume(
            "v",
            b"mount: {at: startup, fstype: ext4, path: /dev/sda}\n",
            &p
        )
        .unwrap_err()
        .to_string()
        .contains("ext4"));
        let err = parse_volume(
            "v",
            b"mount: {at: startup, fstype: tmpfs, path: x, options: 'size=1m,suid'}\n",
            &p,
        );
        assert!(err.unwrap_err().to_string().contains("suid"));
    }

    #[test]
    fn volume_error_never_echoes_a_password() {
        let err = parse_volume(
            "v",
            b"mount: {at: password=hunter2, fstype: cifs, path: //a/b}\n",
            &Policy::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// Review findings: `,,` smuggled an option past the policy, and a
    /// password's tail holding `=` passed as an option (and was echoed).
    #[test]
    fn escaped_commas_and_cut_password_tails_are_refused_unseen() {
        let err = |opts: &str| {
            let v = format!("mount: {{at: startup, fstype: cifs, path: '//a.file.core.windows.net/s', options: '{opts}'}}\n");
            parse_volume("v", v.as_bytes(), &Policy::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err("vers=3.0,,ip=203.0.113.7").contains("holds a comma"));
        let e = err("username=u,password=Tr0ub,x9Q=z");
        assert!(e.contains("no cifs option") && !e.contains("x9Q"), "{e}");
        let ok = "mount: {at: startup, fstype: cifs, path: '//a.file.core.windows.net/s', options: 'username=u,password=a,,b,vers=3.0'}\n";
        assert!(parse_volume("v", ok.as_bytes(), &Policy::default()).is_ok());
    }

    #[test]
    fn volume_name_must_match_key() {
        let err = parse_volume(
            "a",
            b"name: b\nmount: {at: startup, fstype: tmpfs, path: t}\n",
            &Policy::default(),
        );
        assert!(err.unwrap_err().to_string().contains("does not match"));
    }

    #[test]
    fn kernel_home_defaults_and_must_stay_inside_root() {
        let root = Path::new("/k");
        assert_eq!(
            parse_kernel("k1", b"mounts: []\n", root).unwrap().home,
            PathBuf::from("/k/k1/work")
        );
        assert!(parse_kernel("k1", b"home: /etc\n", root).is_err());
        assert!(parse_kernel("k1", b"home: /k/../etc\n", root).is_err());
        assert!(parse_kernel("k1", b"home: /k/x/home\n", root).is_ok());
    }

    #[test]
    fn kernel_alias_cannot_escape() {
        let id = Uuid::new_v4();
        for alias in ["..", "a/b", "."] {
            let v = format!("mounts: [{{vfolder: {id}, as: {alias:?}}}]\n");
            assert!(
                parse_kernel("k", v.as_bytes(), Path::new("/k")).is_err(),
                "{alias}"
            );
        }
    }

    #[test]
    fn kernel_mount_entry_shapes() {
        let id = Uuid::new_v4();
        let v =
            format!("mounts: [{{vfolder: {id}, permission: ro}}, {{volume: ds, token: read}}]\n");
        let k = parse_kernel("k", v.as_bytes(), Path::new("/k")).unwrap();
        assert_eq!(k.mounts.len(), 2);
        let bad = format!("mounts: [{{vfolder: {id}, volume: ds}}]\n");
        assert!(parse_kernel("k", bad.as_bytes(), Path::new("/k")).is_err());
    }

    #[test]
    fn vfolder_defaults_to_rw() {
        let v = parse_vfolder(b"{name: data, owner: alice, volume: vol1}").unwrap();
        assert_eq!(v.permission, Permission::Rw);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "mount",
            "at",
            "fstype",
            "path",
            "options",
            "credentials",
            "name",
            "access",
            "create",
            "heal",
            "mounts",
            "vfolder",
            "as",
            "permission",
            "home",
            "uid",
            "gid",
            "volume",
            "token",
            "owner",
            "quota_bytes",
            "x",
        ];
        const VALUES: &[&str] = &[
            "''",
            "..",
            "/",
            "\"\\0\"",
            "-1",
            "18446744073709551616",
            "startup",
            "requested",
            "tmpfs",
            "bind",
            "cifs",
            "azureblob",
            "ro",
            "rw",
            "read",
            "[]",
            "{}",
            "~",
            "true",
            "'//a/b'",
            "'/etc'",
            "'a/b'",
            "'size=1m,suid'",
            "'https://a.blob.core.windows.net/c'",
            "00000000-0000-4000-8000-000000000000",
            "&a",
            "*a",
            "!!binary AA==",
        ];

        fn yamlish() -> impl Strategy<Value = String> {
            let leaf = prop::sample::select(VALUES).prop_map(String::from);
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec((prop::sample::select(KEYS), inner.clone()), 0..5)
                        .prop_map(|kv| {
                            let body: Vec<String> =
                                kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                            format!("{{{}}}", body.join(", "))
                        }),
                    prop::collection::vec(inner, 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// The value → spec → validation path never panics on arbitrary bytes.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), key in "\\PC{0,40}") {
                let _ = parse_volume(&key, &bytes, &Policy::default());
                let _ = parse_vfolder(&bytes);
                let _ = parse_kernel("k", &bytes, Path::new("/k"));
                let _ = parse_volume_document(&String::from_utf8_lossy(&bytes));
                let _ = crate::keys::Keys::new("/p", "n").classify(&key);
            }

            /// Nor on YAML made of the schema's own field names and awkward values.
            #[test]
            fn schema_shaped_yaml_never_panics(doc in yamlish()) {
                let _ = parse_volume("v", doc.as_bytes(), &Policy::default());
                let _ = parse_vfolder(doc.as_bytes());
                let _ = parse_kernel("k", doc.as_bytes(), Path::new("/k"));
            }
        }
    }

    #[test]
    fn vfolder_relpath_is_sharded() {
        let id = Uuid::parse_str("0123abcd-0000-4000-8000-000000000000").unwrap();
        assert_eq!(
            vfolder_relpath(&id),
            PathBuf::from("01/23/0123abcd000040008000000000000000")
        );
    }
}
