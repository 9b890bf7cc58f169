//! Node configuration: the YAML file `vfolderd run --config F` reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors loading the node configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or has an unknown key (serde names the key).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// serde's message, naming the field and location.
        message: String,
    },
    /// A value parsed but makes no sense (a relative root, an empty node name).
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What a node does; one node may have both roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Mounts startup volumes, requested volumes for local kernels, and binds into kernel homes.
    Agent,
    /// Mounts every volume, creates vfolder directories and measures their usage.
    Storage,
}

/// Where the mount table is read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountTableMode {
    /// `listmount(2)`/`statmount(2)` where the kernel has them (6.8+), else mountinfo.
    #[default]
    Auto,
    /// Always `/proc/self/mountinfo` (the fallback, forced).
    Mountinfo,
}

/// The node config (see DESIGN.md "Node config and CLI").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name in etcd keys; defaults to the host name.
    #[serde(default = "default_node")]
    pub node: String,
    /// Roles of this node.
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
    /// How to reach etcd.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Where mounts go.
    #[serde(default)]
    pub roots: Roots,
    /// The sled directory holding what vfolderd owns.
    #[serde(default = "default_state")]
    pub state: PathBuf,
    /// Directory of node-local secrets, one file per name.
    #[serde(default = "default_credentials")]
    pub credentials: PathBuf,
    /// Directory of policy files (built-in default when empty or missing).
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Period of the full resync, the guard against missed changes and drift.
    #[serde(default = "default_resync", with = "humantime_serde")]
    pub resync: Duration,
    /// How long an unused `at: requested` volume stays mounted.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// How long a mount helper (`mount -t cifs ...`) may run before it is killed.
    #[serde(default = "default_mount_timeout", with = "humantime_serde")]
    pub mount_timeout: Duration,
    /// Lifetime of the container SAS a blob volume is mounted with; it is
    /// renewed (remounted while unused) in its last third.
    #[serde(default = "default_sas_lifetime", with = "humantime_serde")]
    pub sas_lifetime: Duration,
    /// Lifetime of a per-user SAS token file; renewed at two thirds of it.
    #[serde(default = "default_token_lifetime", with = "humantime_serde")]
    pub token_lifetime: Duration,
    /// The rclone binary that FUSE-mounts blob containers.
    #[serde(default = "default_rclone")]
    pub rclone: PathBuf,
    /// The uid kernels run as unless their value says (Backend.AI's `work`
    /// user); also who owns a volume's files unless its spec says.
    #[serde(default = "default_kernel_id")]
    pub kernel_uid: u32,
    /// The gid kernels run as unless their value says.
    #[serde(default = "default_kernel_id")]
    pub kernel_gid: u32,
    /// How long a vfolder whose record was deleted stays in its volume's
    /// trash before it is purged (`0s`: at once).
    #[serde(default = "default_trash_retention", with = "humantime_serde")]
    pub trash_retention: Duration,
    /// How often each owned volume mount is probed for staleness.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a probe may take before the mount counts as stale (hung).
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// The mount(8)-compatible program run for fstypes the kernel cannot be
    /// asked directly (cifs, nfs, FUSE): `HELPER -t FSTYPE -o OPTIONS SOURCE TARGET`.
    #[serde(default = "default_mount_helper")]
    pub mount_helper: PathBuf,
    /// Where the mount table is read from (`auto`: statmount on 6.8+).
    #[serde(default)]
    pub mount_table: MountTableMode,
}

/// etcd connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix `P` of the schema.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// TLS to etcd (use `https://` endpoints).
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// etcd user (auth enabled).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding that user's password (root-owned, 0600).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// TLS material for etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate (PEM) that signed the server's certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM; root-owned, 0600).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The two roots every target must resolve inside.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roots {
    /// Volume `<v>` is mounted at `<volumes>/<v>`.
    #[serde(default = "default_volumes_root")]
    pub volumes: PathBuf,
    /// Kernel `<k>`'s default home is `<kernels>/<k>/work`.
    #[serde(default = "default_kernels_root")]
    pub kernels: PathBuf,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: default_endpoints(),
            prefix: default_prefix(),
            tls: None,
            user: None,
            password_file: None,
        }
    }
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            volumes: default_volumes_root(),
            kernels: default_kernels_root(),
        }
    }
}

fn default_node() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
fn default_roles() -> Vec<Role> {
    vec![Role::Agent]
}
fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_prefix() -> String {
    "/vfolderd".into()
}
fn default_volumes_root() -> PathBuf {
    "/var/lib/vfolderd/volumes".into()
}
fn default_kernels_root() -> PathBuf {
    "/var/lib/vfolderd/kernels".into()
}
fn default_state() -> PathBuf {
    "/var/lib/vfolderd/state".into()
}
fn default_credentials() -> PathBuf {
    "/etc/vfolderd/credentials".into()
}
fn default_policies() -> PathBuf {
    "/etc/vfolderd/policies".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_trash_retention() -> Duration {
    Duration::from_secs(168 * 3600)
}
fn default_resync() -> Duration {
    Duration::from_secs(30)
}
fn default_linger() -> Duration {
    Duration::from_secs(30)
}
fn default_sas_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_kernel_id() -> u32 {
    1000
}
fn default_rclone() -> PathBuf {
    "rclone".into()
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_mount_helper() -> PathBuf {
    "mount".into()
}
fn default_mount_timeout() -> Duration {
    Duration::from_secs(30)
}

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        if !crate::names::is_valid_object_name(&cfg.node) {
            return Err(invalid(format!(
                "node name {:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}",
                cfg.node
            )));
        }
        if cfg.roles.is_empty() {
            return Err(invalid(
                "roles must name at least one of agent, storage".into(),
            ));
        }
        for (what, p) in [
            ("roots.volumes", &cfg.roots.volumes),
            ("roots.kernels", &cfg.roots.kernels),
            ("state", &cfg.state),
        ] {
            if !p.is_absolute() {
                return Err(invalid(format!(
                    "{what} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        if cfg.roots.volumes.starts_with(&cfg.roots.kernels)
            || cfg.roots.kernels.starts_with(&cfg.roots.volumes)
        {
            return Err(invalid(
                "roots.volumes and roots.kernels must not contain each other".into(),
            ));
        }
        if !cfg.etcd.prefix.starts_with('/') || cfg.etcd.prefix.ends_with('/') {
            return Err(invalid(format!(
                "etcd.prefix must start with / and not end with /, got {:?}",
                cfg.etcd.prefix
            )));
        }
        if cfg.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints must not be empty".into()));
        }
        if cfg.resync.is_zero() {
            return Err(invalid("resync must be greater than zero".into()));
        }
        Ok(cfg)
    }

    /// Whether this node has `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_unknown_key_is_an_error_naming_the_key() {
        let err = NodeConfig::parse("node: n1\nrolez: [agent]\n", Path::new("x.yaml")).unwrap_err();
        assert!(err.to_string().contains("rolez"), "{err}");
    }

    #[test]
    fn config_defaults_apply() {
        let cfg = NodeConfig::parse("node: n1\n", Path::new("x.yaml")).unwrap();
        assert_eq!(cfg.roles, vec![Role::Agent]);
        assert_eq!(cfg.etcd.prefix, "/vfolderd");
        assert_eq!(cfg.linger, Duration::from_secs(30));
    }

    #[test]
    fn config_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/node.yaml");
        let cfg = NodeConfig::load(&path).unwrap();
        assert!(cfg.has_role(Role::Storage) && cfg.has_role(Role::Agent));
    }

    #[test]
    fn config_relative_root_is_refused() {
        let err = NodeConfig::parse("node: n1\nroots: {volumes: vols}\n", Path::new("x.yaml"))
            .unwrap_err();
        assert!(err.to_string().contains("roots.volumes"), "{err}");
    }
}
