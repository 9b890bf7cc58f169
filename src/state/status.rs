//! Status write-back: keeps etcd's status keys equal to the latest report,
//! writing only what changed (batched in transactions) and deleting what no
//! longer exists; and the node's liveness key under a kept-alive lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use serde_json::Value;

use crate::keys::Keys;

/// Errors writing status (transient: the next pass retries).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Loading the existing status keys failed.
    #[error("reading existing status keys failed")]
    LoadFailed(#[source] etcd_client::Error),
    /// A write transaction failed.
    #[error("writing status keys failed")]
    WriteFailed(#[source] etcd_client::Error),
    /// The lease could not be granted or kept alive.
    #[error("node lease failed")]
    LeaseFailed(#[source] etcd_client::Error),
}

/// Fields that change without the status meaning anything new.
const VOLATILE: &[&str] = &["since", "scanned_at"];

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Status transactions sent at once.
const TXNS_IN_FLIGHT: usize = 8;

/// A digest of what a status value says (volatile fields aside). The
/// writer remembers digests, not values: at 10,000 kernels a second copy of
/// every status was ~15 MiB resident.
fn digest(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn feed(v: &Value, h: &mut impl Hasher, top: bool) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(a) => {
                (4u8, a.len()).hash(h);
                for x in a {
                    feed(x, h, false);
                }
            }
            Value::Object(m) => {
                5u8.hash(h);
                for (k, x) in m {
                    if top && VOLATILE.contains(&k.as_str()) {
                        continue;
                    }
                    k.hash(h);
                    feed(x, h, false);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(v, &mut h, true);
    h.finish()
}

/// Writes status keys, remembering what it wrote.
pub struct StatusWriter {
    client: Client,
    keys: Keys,
    /// Key → digest of the value last written.
    written: Option<BTreeMap<String, u64>>,
}

impl StatusWriter {
    /// A writer for this node.
    pub fn new(client: Client, keys: Keys) -> Self {
        Self {
            client,
            keys,
            written: None,
        }
    }

    /// Loads what this node wrote before (its node subtree, and vfolder
    /// statuses naming it) so a restart rewrites nothing that is unchanged.
    async fn load(&mut self) -> Result<BTreeMap<String, u64>, StatusError> {
        let mut out = BTreeMap::new();
        for (prefix, mine_only) in [
            (self.keys.node_status_prefix(), false),
            (self.keys.vfolder_status_prefix(), true),
        ] {
            let resp = self
                .client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(StatusError::LoadFailed)?;
            for kv in resp.kvs() {
                let Ok(v) = serde_yaml::from_slice::<Value>(kv.value()) else {
                    continue;
                };
                if mine_only
                    && v.get("node").and_then(Value::as_str) != Some(self.keys.node.as_str())
                {
                    continue;
                }
                out.insert(String::from_utf8_lossy(kv.key()).into_owned(), digest(&v));
            }
        }
        Ok(out)
    }

    /// Makes etcd hold exactly `entries` (under this node's keys). Returns
    /// the number of keys written or deleted.
    pub async fn sync(
        &mut self,
        entries: &BTreeMap<String, Arc<Value>>,
    ) -> Result<usize, StatusError> {
        let mut written = match self.written.take() {
            Some(w) => w,
            None => self.load().await?,
        };
        let now = chrono_now();
        let mut ops = Vec::new();
        let mut changes: Vec<(String, Option<u64>)> = Vec::new();
        for (k, v) in entries {
            let d = digest(v);
            if written.get(k) == Some(&d) {
                continue;
            }
            let mut v = Value::clone(v);
            if let Value::Object(m) = &mut v {
                m.insert("since".into(), Value::String(now.clone()));
            }
            ops.push(TxnOp::put(
                k.as_str(),
                serde_json::to_vec(&v).expect("json"),
                None,
            ));
            changes.push((k.clone(), Some(d)));
        }
        for k in written.keys() {
            if !entries.contains_key(k) {
                ops.push(TxnOp::delete(k.as_str(), None));
                changes.push((k.clone(), None));
            }
        }
        let n = ops.len();
        // Several transactions in flight at once (each key is in one of
        // them, so their order does not matter): 10,000 kernels' statuses are
        // 79 round trips, which one at a time took most of a teardown.
        use futures::StreamExt;
        let txns: Vec<(usize, Txn)> = ops
            .chunks(MAX_TXN_OPS)
            .map(|chunk| Txn::new().and_then(chunk.to_vec()))
            .enumerate()
            .collect();
        let results: Vec<(usize, Result<(), etcd_client::Error>)> = futures::stream::iter(txns)
            .map(|(i, txn)| {
                let mut client = self.client.clone();
                async move { (i, client.txn(txn).await.map(drop)) }
            })
            .buffer_unordered(TXNS_IN_FLIGHT)
            .collect()
            .await;
        let mut result = Ok(n);
        let mut done = vec![false; n.div_ceil(MAX_TXN_OPS)];
        for (i, r) in results {
            match r {
                Ok(()) => done[i] = true,
                Err(e) => result = Err(StatusError::WriteFailed(e)),
            }
        }
        for (i, (k, v)) in changes.into_iter().enumerate() {
            if !done[i / MAX_TXN_OPS] {
                continue; // not written: the retry writes it
            }
            match v {
                Some(v) => written.insert(k, v),
                None => written.remove(&k),
            };
        }
        self.written = Some(written);
        result
    }
}

/// The status values a pass wants etcd to hold.
pub type StatusEntries = Arc<BTreeMap<String, Arc<Value>>>;

/// Writes the latest report in the background, so a slow or unreachable etcd
/// never stalls the reconcile loop. Reports that arrive while a write is in
/// flight are coalesced (only the newest is written); a failed write is
/// retried with backoff. Returns once the sender is dropped and the last
/// report is written (or could not be).
pub async fn run_status_writer(
    mut writer: StatusWriter,
    mut rx: tokio::sync::watch::Receiver<StatusEntries>,
    written: impl Fn(usize) + Send,
) {
    let mut delay = Duration::from_millis(200);
    while rx.changed().await.is_ok() {
        loop {
            let entries = rx.borrow_and_update().clone();
            match writer.sync(&entries).await {
                Ok(n) => {
                    tracing::trace!(written = n, "status synced");
                    written(n);
                    delay = Duration::from_millis(200);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), retry_in = ?delay, "status write failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// The current UTC time as RFC 3339 (seconds).
pub fn chrono_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Keeps `P/status/nodes/<node>` alive under a lease while vfolderd runs.
/// `value` is re-read each tick, so readiness and revision stay current.
pub async fn run_liveness(
    mut client: Client,
    keys: Keys,
    ttl: i64,
    value: impl Fn() -> Value + Send,
) {
    let tick = Duration::from_secs((ttl as u64 / 3).max(1));
    loop {
        let lease = match client.lease_grant(ttl, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::debug!(error = %crate::error::error_chain(&StatusError::LeaseFailed(e)), "node lease");
                tokio::time::sleep(tick).await;
                continue;
            }
        };
        let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(tick).await;
                continue;
            }
        };
        let mut last: Option<Value> = None;
        loop {
            let v = value();
            if last.as_ref() != Some(&v) {
                let body = serde_json::to_vec(&v).expect("json");
                if client
                    .put(
                        keys.node_status(),
                        body,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                last = Some(v);
            }
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(tick, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                _ => break, // lease expired or stream broke: grant a new one
            }
            tokio::time::sleep(tick).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::digest;
    use serde_json::json;

    #[test]
    fn digest_ignores_volatile_fields_and_sees_everything_else() {
        let a = json!({"state": "Ready", "mounts": [{"target": "/k/a", "mounted": true}], "since": "t1"});
        let b = json!({"state": "Ready", "mounts": [{"target": "/k/a", "mounted": true}], "since": "t2", "scanned_at": "x"});
        assert_eq!(digest(&a), digest(&b));
        let c = json!({"state": "Ready", "mounts": [{"target": "/k/a", "mounted": false}], "since": "t1"});
        assert_ne!(digest(&a), digest(&c), "a nested change is a change");
        let d = json!({"state": "Pending", "mounts": [{"target": "/k/a", "mounted": true}]});
        assert_ne!(digest(&a), digest(&d));
        // Only top-level `since` is volatile.
        let e = json!({"state": "Ready", "mounts": [{"target": "/k/a", "mounted": true, "since": "x"}]});
        assert_ne!(digest(&a), digest(&e));
    }
}
