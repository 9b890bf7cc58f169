//! Azure Blob Storage: where a blob volume's container is, its account key,
//! container creation, SAS tokens, and the dataset operations of the seed
//! (create, upload, list, SAS), with `azure_storage_blobs`. Works against
//! Azure (host-style URLs) and the Azurite emulator (path-style URLs).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use azure_storage::prelude::*;
use azure_storage::CloudLocation;
use azure_storage_blobs::prelude::*;
use futures::StreamExt;
use time::OffsetDateTime;
use url::Url;

use crate::secret::Secret;

/// Errors of the Azure operations.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// The volume's `path` is not a container URL.
    #[error("invalid blob container URL {url:?}: {reason}")]
    BadUrl {
        /// The URL (never carries a secret: SAS is not accepted here).
        url: String,
        /// Why.
        reason: String,
    },
    /// The account key file is missing, unreadable or too open.
    #[error("credentials {name}: {reason}")]
    Credentials {
        /// The credential's name.
        name: String,
        /// Why (never the secret).
        reason: String,
    },
    /// The storage service refused or failed a request.
    #[error("blob service {op} failed: {message}")]
    Service {
        /// The operation.
        op: &'static str,
        /// The service's message, redacted.
        message: String,
    },
    /// A local file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn service(op: &'static str) -> impl Fn(azure_core::Error) -> AzureError {
    move |e| AzureError::Service {
        op,
        message: crate::names::redact(&e.to_string()),
    }
}

/// Where a container lives: the blob service endpoint, account and container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    /// Storage account.
    pub account: String,
    /// Container name.
    pub container: String,
    /// The blob service base URL (`https://acct.blob.core.windows.net`, or
    /// `http://127.0.0.1:10000/devstoreaccount1` for Azurite).
    pub endpoint: String,
}

impl BlobLocation {
    /// Parses a container URL: host style (`https://<account>.blob.<suffix>/<container>`)
    /// or path style (`http://host:port/<account>/<container>`, Azurite).
    pub fn parse(url: &str) -> Result<Self, AzureError> {
        // Never echo a query: it may be a SAS.
        let shown = url.split('?').next().unwrap_or_default().to_string();
        let bad = |reason: &str| AzureError::BadUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if u.query().is_some() || !u.username().is_empty() || u.password().is_some() {
            return Err(bad(
                "must not carry a query or credentials (keys live in credential files)",
            ));
        }
        if !matches!(u.scheme(), "https" | "http") {
            return Err(bad("scheme must be https (or http for an emulator)"));
        }
        let host = u.host_str().ok_or_else(|| bad("no host"))?;
        let segs: Vec<&str> = u
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        let origin = u.origin().ascii_serialization();
        let (account, container, endpoint) = match (host.split_once(".blob."), segs.as_slice()) {
            (Some((account, _)), [container]) => (account.to_string(), container.to_string(), origin),
            (None, [account, container]) => (account.to_string(), container.to_string(), format!("{origin}/{account}")),
            _ => return Err(bad("expected https://<account>.blob.core.windows.net/<container> or http://host:port/<account>/<container>")),
        };
        if !is_container_name(&container) {
            return Err(bad("container names are 3-63 characters of lowercase letters, digits and single hyphens"));
        }
        // One account, named as Azure names them: `victim.blob.x.blob.core.windows.net`
        // would sign for `victim` and send the SAS to another host.
        if !(3..=24).contains(&account.len())
            || !account
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || host.matches(".blob.").count() > 1
        {
            return Err(bad(
                "the account name is 3-24 lowercase letters and digits, named once in the host",
            ));
        }
        Ok(Self {
            account,
            container,
            endpoint,
        })
    }
}

/// Azure's container naming rule.
pub fn is_container_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Reads a node-local account key file (`<credentials>/<name>`): root-owned,
/// not readable by group or others, holding the base64 key.
pub fn read_account_key(credentials_dir: &Path, name: &str) -> Result<Secret, AzureError> {
    let err = |reason: String| AzureError::Credentials {
        name: name.to_string(),
        reason,
    };
    let path = crate::secret::secret_file(credentials_dir, name).map_err(err)?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(err(format!("{} is empty", path.display())));
    }
    Ok(Secret::new(key))
}

/// A client for the container, signing with the account key.
pub fn container_client(loc: &BlobLocation, key: &Secret) -> ContainerClient {
    let creds = StorageCredentials::access_key(loc.account.clone(), key.expose().to_string());
    let location = CloudLocation::Custom {
        account: loc.account.clone(),
        uri: loc.endpoint.clone(),
    };
    ClientBuilder::with_location(location, creds).container_client(loc.container.clone())
}

/// Creates the container if it does not exist; returns whether it was created.
pub async fn ensure_container(c: &ContainerClient) -> Result<bool, AzureError> {
    if c.exists().await.map_err(service("container exists"))? {
        return Ok(false);
    }
    match c.create().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_http_error()
                .is_some_and(|h| h.status() == azure_core::StatusCode::Conflict) =>
        {
            Ok(false)
        }
        Err(e) => Err(service("create container")(e)),
    }
}

/// What a SAS allows on a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// read + list.
    Read,
    /// read, add, create, write, delete, list.
    Write,
}

/// A container SAS URL (the secret) and when it expires.
#[derive(Debug, Clone)]
pub struct SasUrl {
    /// `<container url>?<sas>`.
    pub url: Secret,
    /// Expiry.
    pub expires: SystemTime,
}

/// Mints a container SAS valid for `lifetime`, signed with the account key.
pub async fn container_sas(
    c: &ContainerClient,
    access: Access,
    lifetime: Duration,
) -> Result<SasUrl, AzureError> {
    let permissions = match access {
        Access::Read => BlobSasPermissions {
            read: true,
            list: true,
            ..Default::default()
        },
        Access::Write => BlobSasPermissions {
            read: true,
            add: true,
            create: true,
            write: true,
            delete: true,
            list: true,
            ..Default::default()
        },
    };
    let expires = SystemTime::now() + lifetime;
    let expiry = OffsetDateTime::from(expires);
    let sas = c
        .shared_access_signature(permissions, expiry)
        .await
        .map_err(service("sign SAS"))?;
    let url = c
        .generate_signed_container_url(&sas)
        .map_err(service("sign SAS"))?;
    Ok(SasUrl {
        url: Secret::new(url.to_string()),
        expires,
    })
}

/// One blob as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    /// Blob name (path inside the container).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Content type.
    pub content_type: String,
}

/// Lists every blob in the container.
pub async fn list(c: &ContainerClient) -> Result<Vec<BlobEntry>, AzureError> {
    let mut out = Vec::new();
    let mut pages = c.list_blobs().into_stream();
    while let Some(page) = pages.next().await {
        let page = page.map_err(service("list blobs"))?;
        for b in page.blobs.blobs() {
            out.push(BlobEntry {
                name: b.name.clone(),
                size: b.properties.content_length,
                content_type: b.properties.content_type.clone(),
            });
        }
    }
    Ok(out)
}

/// The files to upload from `path` (a file, or every file below a directory),
/// with the blob name each gets (relative path, `/`-separated).
pub fn files_to_push(path: &Path) -> Result<Vec<(PathBuf, String)>, AzureError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AzureError::Io { path: p, source }
    };
    let md = std::fs::symlink_metadata(path).map_err(io(path))?;
    if md.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![(path.to_path_buf(), name)]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let ft = e.file_type().map_err(io(&e.path()))?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(path)
                    .expect("below root")
                    .to_string_lossy()
                    .into_owned();
                out.push((e.path(), rel));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Uploads `files` as block blobs, `parallel` at a time, with content types
/// from the file extensions; `progress` is called with bytes done.
pub async fn push(
    c: &ContainerClient,
    files: Vec<(PathBuf, String)>,
    parallel: usize,
    progress: impl Fn(u64) + Sync,
) -> Result<u64, AzureError> {
    let progress = &progress;
    let results = futures::stream::iter(files.into_iter().map(|(path, name)| async move {
        let body = tokio::fs::read(&path)
            .await
            .map_err(|source| AzureError::Io {
                path: path.clone(),
                source,
            })?;
        let len = body.len() as u64;
        let content_type = mime_guess::from_path(&path)
            .first_or_octet_stream()
            .essence_str()
            .to_string();
        c.blob_client(name)
            .put_block_blob(body)
            .content_type(content_type)
            .await
            .map_err(service("put blob"))?;
        progress(len);
        Ok::<u64, AzureError>(len)
    }))
    .buffer_unordered(parallel.max(1))
    .collect::<Vec<_>>()
    .await;
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_urls_parse_in_both_styles() {
        let a = BlobLocation::parse("https://acct.blob.core.windows.net/dlsamples").unwrap();
        assert_eq!(
            (
                a.account.as_str(),
                a.container.as_str(),
                a.endpoint.as_str()
            ),
            ("acct", "dlsamples", "https://acct.blob.core.windows.net")
        );
        let e = BlobLocation::parse("http://127.0.0.1:10000/devstoreaccount1/data-1").unwrap();
        assert_eq!(e.endpoint, "http://127.0.0.1:10000/devstoreaccount1");
        assert_eq!(e.account, "devstoreaccount1");
        for bad in [
            "https://acct.blob.core.windows.net/Bad_Name",
            "https://acct.blob.core.windows.net/c?sig=x",
            "ftp://a/b/c",
            "https://acct.blob.core.windows.net/",
            "https://u:p@acct.blob.core.windows.net/ccc",
            "https://victim.blob.x.blob.core.windows.net/ccc",
            "https://Acct-1.blob.core.windows.net/ccc",
        ] {
            assert!(BlobLocation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn account_key_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("k"), "a2V5\n").unwrap();
        std::fs::set_permissions(d.path().join("k"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = read_account_key(d.path(), "k").unwrap_err().to_string();
        assert!(err.contains("chmod 600") && !err.contains("a2V5"), "{err}");
        std::fs::set_permissions(d.path().join("k"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(read_account_key(d.path(), "k").unwrap().expose(), "a2V5");
    }
}
