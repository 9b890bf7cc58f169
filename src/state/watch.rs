//! The etcd watcher: one consistent list of the three desired ranges at a
//! revision R (a single transaction), then one watch stream from R+1 with
//! `prev_kv`. It resumes after errors from the last revision seen per range,
//! and relists when that revision was compacted (the whole cache is swapped
//! in one step, so keys deleted meanwhile disappear: mark and sweep for free).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::sync::Notify;

use crate::keys::{Classified, ObjectKey};
use crate::state::desired::{Desired, DesiredParser};
use crate::state::ledger::Ledger;

/// Errors of the watcher (all transient: it backs off and retries).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The initial list transaction failed.
    #[error("initial list of desired state failed")]
    InitialListFailed(#[source] etcd_client::Error),
    /// Opening the watch stream failed.
    #[error("starting the watch failed")]
    WatchStartFailed(#[source] etcd_client::Error),
    /// The stream broke.
    #[error("watch stream failed")]
    StreamFailed(#[source] etcd_client::Error),
    /// The server closed the stream or cancelled the watch.
    #[error("watch ended: {0}")]
    Ended(String),
}

/// What changed since the loop last took a snapshot: a few kernels (the
/// next pass may look at just those), or anything else (a whole pass).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Something other than a kernel value changed (or an event was not
    /// attributed): the next pass covers everything.
    pub all: bool,
    /// Kernels whose value was put or deleted.
    pub kernels: std::collections::BTreeSet<String>,
    /// A kernel changed or went: a volume may have lost its last user.
    /// Whether a volume is unused is decided over every kernel, so a whole
    /// pass is due (soon, not at once: a volume lingers anyway).
    pub volumes: bool,
}

impl Changes {
    /// Everything changed.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Adds what `other` says changed.
    pub fn merge(&mut self, other: Changes) {
        self.all |= other.all;
        self.volumes |= other.volumes;
        if !self.all {
            self.kernels.extend(other.kernels);
        }
    }
}

/// The state shared by the watcher and the loop.
#[derive(Debug, Default)]
struct Shared {
    /// Shared copy-on-write with the pass reading it.
    desired: Arc<Desired>,
    /// Changes with every change (a policy re-parse included, which keeps the revision).
    generation: u64,
    /// What changed since the last [`DesiredCache::take`].
    changes: Changes,
}

/// The shared desired-state cache: written by the watcher, read by the loop ([`crate::daemon`]).
#[derive(Debug, Default)]
pub struct DesiredCache {
    desired: Mutex<Shared>,
    /// Set once there is a desired state to serve: a live list, or the last
    /// good state from the store (fail static after a restart).
    pub synced: AtomicBool,
    /// Set after the first complete *live* list at one revision: only then
    /// may anything be unmounted (invariant 2).
    pub live: AtomicBool,
    /// Whether the last etcd call succeeded.
    pub connected: AtomicBool,
    /// Latest revision applied.
    pub revision: AtomicI64,
    /// Woken on every change.
    pub changed: Notify,
}

impl DesiredCache {
    /// The current state, its generation, and what changed since the last
    /// call (reset).
    pub fn take(&self) -> (Arc<Desired>, u64, Changes) {
        let mut cur = self.desired.lock().expect("desired lock");
        let changes = std::mem::take(&mut cur.changes);
        (cur.desired.clone(), cur.generation, changes)
    }

    /// Wakes the loop for a change outside the desired state (a stale
    /// volume, rotated credentials, a reconnect): a whole pass.
    pub fn touch(&self) {
        self.desired.lock().expect("desired lock").changes.all = true;
        self.changed.notify_one();
    }

    /// Serves a state loaded from the store until the first live list.
    pub fn seed_from_store(&self, d: Desired) {
        let mut cur = self.desired.lock().expect("desired lock");
        if self.live.load(Ordering::Acquire) {
            return;
        }
        self.revision.store(d.revision, Ordering::Relaxed);
        cur.desired = Arc::new(d);
        cur.generation += 1;
        cur.changes = Changes::all();
        self.synced.store(true, Ordering::Release);
        drop(cur);
        self.changed.notify_one();
    }

    fn replace(&self, d: Desired) {
        let mut cur = self.desired.lock().expect("desired lock");
        self.revision.store(d.revision, Ordering::Relaxed);
        cur.desired = Arc::new(d);
        cur.generation += 1;
        cur.changes = Changes::all();
        self.live.store(true, Ordering::Release);
        self.synced.store(true, Ordering::Release);
        drop(cur);
        self.changed.notify_one();
    }

    /// Re-evaluates every object (the policy changed) and wakes the loop.
    pub fn reparse(&self, parser: &DesiredParser) {
        let mut cur = self.desired.lock().expect("desired lock");
        cur.desired = Arc::new(parser.reparse(&cur.desired));
        cur.generation += 1;
        cur.changes = Changes::all();
        drop(cur);
        self.changed.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut Desired, &mut Changes)) {
        let mut cur = self.desired.lock().expect("desired lock");
        let cur = &mut *cur;
        // Copies the state only while a pass still holds the previous one.
        let d = Arc::make_mut(&mut cur.desired);
        f(d, &mut cur.changes);
        self.revision.store(d.revision, Ordering::Relaxed);
        cur.generation += 1;
        self.changed.notify_one();
    }
}

/// Lists the desired ranges in one transaction, so all three are at one
/// revision. Returns the raw pairs and the revision.
pub async fn list(
    client: &mut Client,
    parser: &DesiredParser,
) -> Result<(Vec<(String, Vec<u8>)>, i64), WatchError> {
    let ops: Vec<TxnOp> = parser
        .keys
        .desired_prefixes()
        .iter()
        .map(|p| TxnOp::get(p.as_str(), Some(GetOptions::new().with_prefix())))
        .collect();
    let resp = client
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(WatchError::InitialListFailed)?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut kvs = Vec::new();
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(g) = op {
            for kv in g.kvs() {
                kvs.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
            }
        }
    }
    Ok((kvs, revision))
}

/// Parses a listing into a desired state at `revision`.
pub fn parse_listing(parser: &DesiredParser, kvs: &[(String, Vec<u8>)], revision: i64) -> Desired {
    parser.from_list(
        kvs.iter()
            .map(|(k, v)| (k.as_str(), v.as_slice(), revision)),
        revision,
    )
}

enum WatchEnd {
    Compacted(i64),
    Failed(WatchError),
}

/// Runs forever: list, watch, resume, relist. Cancel by dropping the task.
/// Every listing and event is also written to `store` (the last good desired
/// state, served after a restart while etcd is unreachable).
pub async fn run_watcher(
    mut client: Client,
    parser: DesiredParser,
    cache: Arc<DesiredCache>,
    store: Ledger,
) {
    let mut delay = Duration::from_millis(200);
    let max_delay = Duration::from_secs(10);
    loop {
        let (kvs, revision) = match list(&mut client, &parser).await {
            Ok(x) => x,
            Err(e) => {
                cache.connected.store(false, Ordering::Relaxed);
                cache.touch();
                tracing::warn!(error = %crate::error::error_chain(&e), retry_in = ?delay, "etcd unreachable; keeping last desired state");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
                continue;
            }
        };
        let d = parse_listing(&parser, &kvs, revision);
        if let Err(e) = store.store_desired(&kvs, revision) {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot store the desired state; a restart during an etcd outage would start empty");
        }
        let rev = d.revision;
        tracing::info!(
            revision = rev,
            volumes = d.volumes.len(),
            vfolders = d.vfolders.len(),
            kernels = d.kernels.len(),
            "listed desired state"
        );
        cache.connected.store(true, Ordering::Relaxed);
        cache.replace(d);
        delay = Duration::from_millis(200);
        let mut next = [rev + 1; 3];
        loop {
            match watch_once(&mut client, &parser, &cache, &store, &mut next).await {
                WatchEnd::Compacted(c) => {
                    tracing::warn!(
                        compact_revision = c,
                        "watch revision was compacted; relisting"
                    );
                    break;
                }
                WatchEnd::Failed(e) => {
                    cache.connected.store(false, Ordering::Relaxed);
                    cache.touch();
                    tracing::warn!(error = %crate::error::error_chain(&e), retry_in = ?delay, "etcd watch interrupted; will resume");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max_delay);
                }
            }
        }
    }
}

async fn watch_once(
    client: &mut Client,
    parser: &DesiredParser,
    cache: &DesiredCache,
    store: &Ledger,
    next: &mut [i64; 3],
) -> WatchEnd {
    let prefixes = parser.keys.desired_prefixes();
    let opts = |i: usize| {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_start_revision(next[i]),
        )
    };
    let mut stream = match client.watch(prefixes[0].as_str(), opts(0)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(WatchError::WatchStartFailed(e)),
    };
    for (i, prefix) in prefixes.iter().enumerate().skip(1) {
        if let Err(e) = stream.watch(prefix.as_str(), opts(i)).await {
            return WatchEnd::Failed(WatchError::WatchStartFailed(e));
        }
    }
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return WatchEnd::Failed(WatchError::Ended("stream closed by server".into()))
            }
            Err(e) => return WatchEnd::Failed(WatchError::StreamFailed(e)),
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return WatchEnd::Compacted(resp.compact_revision());
            }
            return WatchEnd::Failed(WatchError::Ended(format!(
                "watch cancelled: {}",
                resp.cancel_reason()
            )));
        }
        if !cache.connected.swap(true, Ordering::Relaxed) {
            cache.touch();
        }
        if resp.events().is_empty() {
            continue;
        }
        tracing::trace!(events = resp.events().len(), "watch events");
        cache.update(|d, changes| {
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                // A kernel event is a pass over that kernel. One that changes
                // or goes may leave a volume unused (linger, renewal and
                // healing are decided over every kernel): a whole pass follows.
                match parser.keys.classify(&key) {
                    Classified::Object(ObjectKey::Kernel(id)) => {
                        if ev.event_type() == EventType::Delete || d.kernels.contains_key(&id) {
                            changes.volumes = true;
                        }
                        changes.kernels.insert(id);
                    }
                    Classified::Ignored => {}
                    _ => changes.all = true,
                }
                let rev = kv.mod_revision();
                if let Some(i) = prefixes.iter().position(|p| key.starts_with(p.as_str())) {
                    next[i] = next[i].max(rev + 1);
                }
                let value = match ev.event_type() {
                    EventType::Put => {
                        parser.apply_put(d, &key, kv.value(), rev);
                        Some(kv.value())
                    }
                    EventType::Delete => {
                        parser.apply_delete(d, &key, rev);
                        None
                    }
                };
                if let Err(e) = store.apply_desired(&key, value, rev) {
                    tracing::warn!(error = %crate::error::error_chain(&e), "cannot store a desired-state change");
                }
            }
        });
        tracing::trace!("watch events applied");
    }
}
