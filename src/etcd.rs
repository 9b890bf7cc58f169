//! etcd connection settings shared by the daemon and the CLI: TLS with a
//! client certificate and user/password auth, from the node config (the
//! password from a file, never from the config itself).

use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::config::EtcdConfig;

/// Errors reading TLS or auth material.
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    /// A certificate, key or password file could not be read or is too open.
    #[error("etcd {what} {path}: {reason}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (never the content).
        reason: String,
    },
}

fn read(what: &'static str, path: &Path, private: bool) -> Result<Vec<u8>, EtcdSetupError> {
    let err = |reason: String| EtcdSetupError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    if private {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::secret::secret_file(dir, &name).map_err(err)?;
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

/// Adds TLS and auth from `cfg` to `base`.
pub fn connect_options(
    cfg: &EtcdConfig,
    mut base: ConnectOptions,
) -> Result<ConnectOptions, EtcdSetupError> {
    if let Some(tls) = &cfg.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read("ca", ca, false)?));
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                t = t.identity(Identity::from_pem(
                    read("cert", cert, false)?,
                    read("key", key, true)?,
                ));
            }
            (None, None) => {}
            _ => {
                let path = tls
                    .cert
                    .clone()
                    .or_else(|| tls.key.clone())
                    .unwrap_or_default();
                return Err(EtcdSetupError::File {
                    what: "tls",
                    path,
                    reason: "cert and key go together".into(),
                });
            }
        }
        base = base.with_tls(t);
    }
    if let Some(user) = &cfg.user {
        let Some(pw_path) = &cfg.password_file else {
            return Err(EtcdSetupError::File {
                what: "user",
                path: PathBuf::new(),
                reason: "needs password_file".into(),
            });
        };
        let pw = String::from_utf8_lossy(&read("password_file", pw_path, true)?)
            .trim()
            .to_string();
        base = base
            .with_user(user.clone(), pw)
            .with_auto_token_refresh(true);
    }
    Ok(base)
}
