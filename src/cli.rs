//! Operator commands beside the daemon: `apply`, `vfolder create`, `status`.
//! Each is a thin etcd client: everything they do can be done with `etcdctl`.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use uuid::Uuid;

use crate::config::NodeConfig;
use crate::keys::Keys;
use crate::names::is_valid_object_name;
use crate::spec::{parse_vfolder, parse_volume_document, Permission, VfolderSpec};

/// Errors of the operator commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// etcd did not answer.
    #[error("etcd request failed")]
    Etcd(#[from] etcd_client::Error),
    /// The input was invalid; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// A blob storage operation failed.
    #[error(transparent)]
    Azure(#[from] crate::azure::AzureError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Connects to the configured etcd with a request timeout (a CLI must not hang).
pub async fn connect(cfg: &NodeConfig) -> Result<Client, CliError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10));
    let opts = crate::etcd::connect_options(&cfg.etcd, opts)
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok(Client::connect(&cfg.etcd.endpoints, Some(opts)).await?)
}

/// `vfolderd apply -f FILE`: puts each volume of the seed's `volumes:` list
/// (or a single spec) at `P/volumes/<name>`, after validating all of them.
pub async fn apply(cfg: &NodeConfig, file: &Path) -> Result<Vec<String>, CliError> {
    let text = std::fs::read_to_string(file).map_err(|source| CliError::Read {
        path: file.display().to_string(),
        source,
    })?;
    let volumes = parse_volume_document(&text).map_err(CliError::Invalid)?;
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let mut names = Vec::new();
    for (name, body) in volumes {
        client
            .put(format!("{}{name}", keys.volumes_prefix()), body, None)
            .await?;
        names.push(name);
    }
    Ok(names)
}

/// What `vfolderd vfolder create` is asked for.
#[derive(Debug, Clone)]
pub struct NewVfolder {
    /// Its volume; `None`: the requested volume with the most free space.
    pub volume: Option<String>,
    /// Its name.
    pub name: String,
    /// Its owner.
    pub owner: String,
    /// ro or rw.
    pub permission: Permission,
    /// Its quota (reported as `OverQuota` when exceeded).
    pub quota_bytes: Option<u64>,
    /// The vfolder whose files it starts with (`clone_of`).
    pub clone_of: Option<Uuid>,
}

/// `vfolderd vfolder create`: writes a record with a fresh uuid v4 and
/// returns it, and the volume it was placed on.
pub async fn vfolder_create(
    cfg: &NodeConfig,
    new: &NewVfolder,
) -> Result<(Uuid, String), CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let volume = match &new.volume {
        Some(v) => v.clone(),
        None => place(&mut client, &keys).await?,
    };
    let id = put_vfolder(&mut client, &keys, new, &volume).await?;
    Ok((id, volume))
}

/// The volume a vfolder goes to when none is named: of the `at: requested`
/// volumes, the one a storage node reports `Mounted` with the most free
/// bytes (a volume the policy refuses is `Rejected` there, never `Mounted`).
async fn place(client: &mut Client, keys: &Keys) -> Result<String, CliError> {
    let prefix = Some(GetOptions::new().with_prefix());
    let specs = client.get(keys.volumes_prefix(), prefix.clone()).await?;
    let requested: std::collections::BTreeSet<String> = specs
        .kvs()
        .iter()
        .filter_map(|kv| {
            let name = kv.key_str().ok()?.strip_prefix(&keys.volumes_prefix())?;
            let v: serde_yaml::Value = serde_yaml::from_slice(kv.value()).ok()?;
            (v["mount"]["at"].as_str() == Some("requested")).then(|| name.to_string())
        })
        .collect();
    let statuses = format!("{}/status/nodes/", keys.prefix);
    let status = client.get(statuses.as_str(), prefix).await?;
    let free = status.kvs().iter().filter_map(|kv| {
        let (_, volume) = kv.key_str().ok()?.rsplit_once("/volumes/")?;
        let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
        let mounted = v["state"].as_str() == Some("Mounted");
        let free = v["free_bytes"].as_u64().filter(|_| mounted)?;
        requested
            .contains(volume)
            .then(|| (free, volume.to_string()))
    });
    // Most free first; of equals, the first name.
    free.max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, v)| v)
        .ok_or_else(|| {
            CliError::Invalid(
                "no requested volume is reported Mounted with its free space: name one with --volume".into(),
            )
        })
}

async fn put_vfolder(
    client: &mut Client,
    keys: &Keys,
    new: &NewVfolder,
    volume: &str,
) -> Result<Uuid, CliError> {
    if !is_valid_object_name(volume) {
        return Err(CliError::Invalid(format!(
            "volume {volume:?} is not a valid volume name"
        )));
    }
    let spec = VfolderSpec {
        name: new.name.clone(),
        owner: new.owner.clone(),
        volume: volume.to_string(),
        permission: new.permission,
        quota_bytes: new.quota_bytes,
        trash: false,
        clone_of: new.clone_of,
    };
    let body = serde_yaml::to_string(&spec).expect("yaml");
    parse_vfolder(body.as_bytes()).map_err(CliError::Invalid)?;
    let id = Uuid::new_v4();
    client
        .put(format!("{}{id}", keys.vfolders_prefix()), body, None)
        .await?;
    Ok(id)
}

/// What `vfolderd vfolder clone` may change from the source's record.
#[derive(Debug, Clone, Default)]
pub struct CloneAs {
    /// The clone's volume (default: the source's; another volume is copied to).
    pub volume: Option<String>,
    /// Its name (default: the source's).
    pub name: Option<String>,
    /// Its owner (default: the source's).
    pub owner: Option<String>,
}

/// `vfolderd vfolder clone`: a new record, with a fresh uuid, that starts
/// as a copy of `source` (`clone_of`); the storage node fills it (status
/// `Cloning`, then `Ready`). Returns the new uuid.
pub async fn vfolder_clone(cfg: &NodeConfig, source: Uuid, as_: CloneAs) -> Result<Uuid, CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let (src, _) = read_vfolder(&mut client, &keys, source).await?;
    if src.trash {
        return Err(CliError::Invalid(format!(
            "vfolder {source} is in the trash: restore it first"
        )));
    }
    let new = NewVfolder {
        volume: Some(as_.volume.unwrap_or(src.volume.clone())),
        name: as_.name.unwrap_or(src.name),
        owner: as_.owner.unwrap_or(src.owner),
        permission: src.permission,
        quota_bytes: src.quota_bytes,
        clone_of: Some(source),
    };
    let volume = new.volume.clone().unwrap_or(src.volume);
    put_vfolder(&mut client, &keys, &new, &volume).await
}

/// A vfolder's record, parsed, and its mod revision.
async fn read_vfolder(
    client: &mut Client,
    keys: &Keys,
    id: Uuid,
) -> Result<(VfolderSpec, i64), CliError> {
    let got = client
        .get(format!("{}{id}", keys.vfolders_prefix()), None)
        .await?;
    let kv = got
        .kvs()
        .first()
        .ok_or_else(|| CliError::Invalid(format!("vfolder {id} has no record")))?;
    let spec = parse_vfolder(kv.value()).map_err(CliError::Invalid)?;
    Ok((spec, kv.mod_revision()))
}

/// `vfolderd vfolder trash|restore`: sets or clears `trash` in the record.
/// The write is a transaction on the record's mod revision, so an edit made
/// meanwhile is read again rather than overwritten.
pub async fn vfolder_set_trash(cfg: &NodeConfig, id: Uuid, trash: bool) -> Result<(), CliError> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let key = format!("{}{id}", keys.vfolders_prefix());
    let mut client = connect(cfg).await?;
    for _ in 0..5 {
        let (mut spec, revision) = read_vfolder(&mut client, &keys, id).await?;
        spec.trash = trash;
        let body = serde_yaml::to_string(&spec).expect("yaml");
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key.as_str(), body, None)]);
        if client.txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
    Err(CliError::Invalid(format!(
        "vfolder {id}: its record kept changing; nothing written"
    )))
}

/// `vfolderd vfolder delete`: deletes the record. The directory goes to the
/// trash and is purged after the storage nodes' `trash_retention`.
pub async fn vfolder_delete(cfg: &NodeConfig, id: Uuid) -> Result<(), CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let key = format!("{}{id}", keys.vfolders_prefix());
    if client.delete(key, None).await?.deleted() == 0 {
        return Err(CliError::Invalid(format!("vfolder {id} has no record")));
    }
    Ok(())
}

/// `vfolderd vfolder list`: every record and status, one line each (and
/// vfolders whose record is gone but whose directory is still in a trash).
pub async fn vfolder_list(cfg: &NodeConfig) -> Result<String, CliError> {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let prefix = Some(GetOptions::new().with_prefix());
    let mut rows: BTreeMap<String, (Option<VfolderSpec>, Option<serde_json::Value>)> =
        BTreeMap::new();
    let records = client.get(keys.vfolders_prefix(), prefix.clone()).await?;
    for kv in records.kvs() {
        let Some(id) = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(&keys.vfolders_prefix()))
        else {
            continue;
        };
        rows.entry(id.to_string()).or_default().0 = parse_vfolder(kv.value()).ok();
    }
    let statuses = client.get(keys.vfolder_status_prefix(), prefix).await?;
    for kv in statuses.kvs() {
        let Some(id) = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(&keys.vfolder_status_prefix()))
        else {
            continue;
        };
        rows.entry(id.to_string()).or_default().1 = serde_json::from_slice(kv.value()).ok();
    }
    let mut out = format!(
        "{:<36}  {:<16} {:<12} {:<14} {:<9} DETAIL\n",
        "UUID", "NAME", "OWNER", "VOLUME", "STATE"
    );
    for (id, (spec, st)) in rows {
        let field = |k: &str| st.as_ref().and_then(|v| v[k].as_str().map(str::to_string));
        let state = field("state").unwrap_or_else(|| "-".into());
        let detail = field("error")
            .or_else(|| field("purge_at").map(|t| format!("purge at {t}")))
            .unwrap_or_default();
        let (name, owner, volume) = spec
            .map_or(("(deleted)".into(), "-".into(), "-".into()), |s| {
                (s.name, s.owner, s.volume)
            });
        let _ = writeln!(
            out,
            "{id:<36}  {name:<16} {owner:<12} {volume:<14} {state:<9} {detail}"
        );
    }
    Ok(out)
}

/// `vfolderd accept-reset`: makes this node's remembered cluster identity
/// etcd's current one (its `P/cluster` id and revision), releasing the safety
/// brake. Returns what it did, for the operator.
pub async fn accept_reset(cfg: &NodeConfig) -> Result<String, CliError> {
    use crate::state::brake::{ClusterFile, ClusterRecord};
    use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let key = keys.cluster();
    // Name the etcd as it is now: its cluster id, written here if it has none.
    let fresh = ClusterRecord {
        id: uuid::Uuid::new_v4(),
        created: crate::state::status::chrono_now(),
    };
    let txn = Txn::new()
        .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            serde_json::to_vec(&fresh).expect("plain struct"),
            None,
        )])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let resp = connect(cfg).await?.txn(txn).await?;
    let id = if resp.succeeded() {
        Some(fresh.id)
    } else {
        resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| serde_yaml::from_slice::<ClusterRecord>(kv.value()).ok())
                .map(|r| r.id),
            _ => None,
        })
    };
    let path = ClusterFile::path(&cfg.state);
    // A damaged file is what accept-reset is for: overwrite it.
    let before = ClusterFile::load(&path).ok().flatten();
    // Revision 0: the node remembers revisions afresh from this etcd on.
    let accepted =
        Some(crate::state::status::chrono_now() + &format!(" #{}", uuid::Uuid::new_v4()));
    ClusterFile {
        id,
        revision: 0,
        accepted,
    }
    .save(&path)
    .map_err(|e| CliError::Invalid(crate::error::error_chain(&e)))?;
    let was = before.map_or("nothing".to_string(), |b| {
        let id = b.id.map_or("(none)".to_string(), |i| i.to_string());
        format!("cluster {id} at revision {}", b.revision)
    });
    Ok(format!(
        "node {} now accepts etcd as it is: cluster {} (it remembered {was})\n",
        cfg.node,
        id.map_or("(none)".to_string(), |i| i.to_string()),
    ))
}

/// `vfolderd status`: a table of every status key under the prefix.
pub async fn status(cfg: &NodeConfig) -> Result<String, CliError> {
    let prefix = format!("{}/status/", cfg.etcd.prefix);
    let resp = connect(cfg)
        .await?
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut rows = vec![["KEY".to_string(), "STATE".into(), "DETAIL".into()]];
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let key = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
        let v: serde_json::Value = serde_yaml::from_slice(kv.value()).unwrap_or_default();
        let state = v
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("?")
            .to_string();
        let detail = match (
            v.get("error").and_then(|e| e.as_str()),
            v.get("users"),
            v.get("files"),
        ) {
            (Some(e), _, _) => e.to_string(),
            (None, Some(u), _) => format!("users={u}"),
            (None, None, Some(f)) => format!(
                "files={f} bytes={}",
                v.get("bytes").cloned().unwrap_or_default()
            ),
            _ => String::new(),
        };
        rows.push([key, state, detail]);
    }
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
    Ok(rows
        .iter()
        .map(|r| {
            format!("{:w0$}  {:w1$}  {}\n", r[0], r[1], r[2])
                .trim_end()
                .to_string()
                + "\n"
        })
        .collect())
}

/// What `vfolderd drain` did.
#[derive(Debug, Default)]
pub struct DrainReport {
    /// Mount points unmounted (binds first).
    pub unmounted: Vec<std::path::PathBuf>,
    /// Actions that failed, with the error.
    pub failed: Vec<String>,
}

/// `vfolderd drain`: unmounts everything vfolderd owns on this node, binds
/// first, then removes the empty directories it made. The daemon must be
/// stopped (it holds the store). Refuses while kernels are desired on this
/// node (or etcd cannot say) unless `force`.
pub async fn drain(cfg: &NodeConfig, force: bool) -> Result<DrainReport, CliError> {
    use crate::reconcile::execute::{ExecConfig, Executor};
    use crate::reconcile::plan::{plan, Actual, NodeView, Want};
    use crate::reconcile::sys::LinuxMounter;
    use crate::state::ledger::Ledger;

    let ledger = Ledger::open(&cfg.state.join("db")).map_err(|e| {
        CliError::Invalid(format!(
            "cannot open the state store ({}): is vfolderd still running? stop it first",
            crate::error::error_chain(&e)
        ))
    })?;
    if !force {
        let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
        let prefix = keys.kernels_prefix();
        let kernels = match connect(cfg).await {
            Ok(mut c) => c
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(|e| {
                    CliError::Invalid(format!(
                        "cannot ask etcd which kernels are desired ({e}); use --force"
                    ))
                })?,
            Err(e) => {
                return Err(CliError::Invalid(format!(
                    "cannot reach etcd ({e}); use --force"
                )))
            }
        };
        if !kernels.kvs().is_empty() {
            let ids: Vec<String> = kernels
                .kvs()
                .iter()
                .map(|kv| {
                    String::from_utf8_lossy(kv.key())
                        .trim_start_matches(&prefix)
                        .to_string()
                })
                .collect();
            return Err(CliError::Invalid(format!(
                "{} kernel(s) are still desired on node {}: {}; delete them or use --force",
                ids.len(),
                cfg.node,
                ids.join(", ")
            )));
        }
    }
    let mounts = crate::daemon::pick_mount_table(cfg.mount_table, false)
        .0
        .read()
        .map_err(|e| CliError::Invalid(crate::error::error_chain(&e)))?;
    let store =
        |e: crate::state::ledger::LedgerError| CliError::Invalid(crate::error::error_chain(&e));
    let actual = Actual {
        mounts: mounts.into(),
        owned_mounts: ledger.mounts().map_err(store)?,
        owned_dirs: ledger.dirs().map_err(store)?,
        ..Actual::default()
    };
    let node = NodeView {
        agent: true,
        storage: true,
        volumes_root: cfg.roots.volumes.clone(),
        kernels_root: cfg.roots.kernels.clone(),
        policy: std::sync::Arc::new(crate::policy::Policy::default()),
        identity: crate::reconcile::plan::Identity {
            uid: cfg.kernel_uid,
            gid: cfg.kernel_gid,
        },
        led: None,
        fenced: false,
    };
    // Planning against an empty desired state yields exactly the teardown, in order.
    let actions = plan(&node, &Want::default(), &actual, &Default::default());
    let exec = Executor::new(
        std::sync::Arc::new(LinuxMounter::new(&cfg.mount_helper)),
        ledger,
        ExecConfig::from_node(cfg),
    );
    let mut report = DrainReport::default();
    for o in exec.execute(actions, &actual.owned_mounts, &Default::default()) {
        match (&o.action, o.result) {
            (crate::reconcile::plan::Action::Unmount { target, .. }, Ok(())) => {
                report.unmounted.push(target.clone())
            }
            (_, Ok(())) => {}
            (a, Err(e)) => {
                report
                    .failed
                    .push(format!("{}: {}", a.kind(), crate::error::error_chain(&e)))
            }
        }
    }
    Ok(report)
}

/// A blob volume's container, looked up from its spec in etcd.
pub async fn blob_container(
    cfg: &NodeConfig,
    volume: &str,
) -> Result<
    (
        crate::azure::BlobLocation,
        azure_storage_blobs::prelude::ContainerClient,
    ),
    CliError,
> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let resp = connect(cfg)
        .await?
        .get(format!("{}{volume}", keys.volumes_prefix()), None)
        .await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| CliError::Invalid(format!("volume {volume} does not exist")))?;
    let spec = crate::spec::parse_volume(volume, kv.value(), &crate::policy::Policy::default())
        .map_err(|e| CliError::Invalid(format!("volume {volume}: {e}")))?;
    if spec.mount.fstype != crate::spec::Fstype::AzureBlob {
        return Err(CliError::Invalid(format!(
            "volume {volume} is {}, not azureblob",
            spec.mount.fstype
        )));
    }
    let loc = crate::azure::BlobLocation::parse(&spec.mount.path)?;
    let name = spec.mount.credentials.as_deref().unwrap_or_default();
    let key = crate::azure::read_account_key(&cfg.credentials, name)?;
    let client = crate::azure::container_client(&loc, &key);
    Ok((loc, client))
}
