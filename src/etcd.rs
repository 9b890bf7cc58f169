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

/// Every key under `prefix` with its value and mod revision, read 1,000 keys a page, every
/// page at the first page's revision (one snapshot), with the answer size
/// the daemon allows: a cluster's records do not fit etcd's default 4 MiB.
pub async fn get_prefix(
    client: &etcd_client::Client,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>, i64)>, etcd_client::Error> {
    use etcd_client::GetOptions;
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(crate::state::watch::MAX_ETCD_MESSAGE);
    let end = crate::keys::prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let (mut out, mut revision) = (Vec::new(), 0);
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(1000);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            out.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
                kv.mod_revision(),
            ));
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}
