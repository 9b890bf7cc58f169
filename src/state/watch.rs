//! The etcd watcher: one consistent list of the three desired ranges at a
//! revision R (a single transaction), then one watch stream from R+1 with
//! `prev_kv`. It resumes after errors from the last revision seen per range,
//! and relists when that revision was compacted (the whole cache is swapped
//! in one step, so keys deleted meanwhile disappear: mark and sweep for free).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::Notify;

use crate::keys::{Classified, ObjectKey};
use crate::state::brake::{ClusterRecord, Verdict};
use crate::state::desired::{Desired, DesiredParser, Parsed};
use crate::state::ledger::Ledger;
use uuid::Uuid;

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
    /// etcd's revision is behind the one the watch would resume from: etcd
    /// was wiped or restored. Resuming would wait for revisions that mean
    /// something else; a relist (and the safety brake) follows.
    #[error("etcd was reset while the watch was down ({0}): relisting")]
    WentBack(String),
}

impl WatchError {
    /// Whether this looks like etcd being unreachable (transport, timeout,
    /// no leader), as opposed to etcd answering with an error (a message too
    /// large, a compacted revision, a refused request): those are logged as
    /// what they are, not as an outage.
    pub fn is_outage(&self) -> bool {
        use tonic::Code;
        let e = match self {
            WatchError::InitialListFailed(e)
            | WatchError::WatchStartFailed(e)
            | WatchError::StreamFailed(e) => e,
            WatchError::Ended(_) => return true,
            WatchError::WentBack { .. } => return false,
        };
        match e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => {
                matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) && !s.message().contains("decoded message length too large")
            }
            etcd_client::Error::WatchError(_) => true,
            _ => false,
        }
    }
}

/// The largest gRPC message vfolderd accepts from etcd: etcd's own bound
/// (its gRPC send limit, `math.MaxInt32`), not gRPC's 4 MiB default, which a
/// listing page of large values or one delete of many keys exceeds.
pub const MAX_ETCD_MESSAGE: usize = i32::MAX as usize;

/// Keys per listing page. A value is at most etcd's `--max-request-bytes`
/// (1.5 MiB by default), so a page stays far below [`MAX_ETCD_MESSAGE`].
pub const LIST_PAGE: i64 = 500;

/// The smallest key after every key starting with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
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
    /// Woken on every change the loop must see.
    pub changed: Notify,
    /// Woken on every change of the desired state, including other nodes'
    /// kernels (the lifecycle worker's in-use guard).
    pub lifecycle: Notify,
    /// The safety brake, as the last list left it.
    brake: Mutex<BrakeState>,
    /// Woken when this node's kernels may want other vfolder records (an
    /// agent's [`crate::state::follow`] task).
    pub kernels_changed: Notify,
    /// The vfolder records an agent's follower follows: a relist keeps the
    /// values held for them (read later than the listing, or about to be
    /// brought past it by their watch: never back to the listing's).
    pub followed: Mutex<std::collections::HashSet<Uuid>>,
    /// The storage node's verdicts on vfolders this agent's kernels wait
    /// for (read by the follower, applied by the loop as limits).
    pub verdicts: crate::state::verdict::Verdicts,
    /// Counts what the watch streams bring (`vfolderd_etcd_watch_*`), once
    /// the daemon has set them.
    pub counters: std::sync::OnceLock<WatchCounters>,
}

/// What the watch streams brought, for the metrics.
#[derive(Debug, Clone)]
pub struct WatchCounters {
    /// Events received.
    pub events: prometheus::IntCounter,
    /// Bytes of their keys and values.
    pub bytes: prometheus::IntCounter,
    /// Watches started again, by how (`resume` at their revision, `relist`).
    pub restarts: prometheus::IntCounterVec,
}

/// Counts a watch started again (`resume` or `relist`), once counters exist.
fn count_restart(cache: &DesiredCache, how: &str) {
    if let Some(c) = cache.counters.get() {
        c.restarts.with_label_values(&[how]).inc();
    }
}

/// What the safety brake concluded from the last list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrakeState {
    /// Why the node holds (tears nothing down, does no directory work).
    pub held: Option<String>,
    /// `P/cluster`'s id in that list.
    pub etcd_id: Option<Uuid>,
    /// That list's revision.
    pub revision: i64,
    /// The operator's last acceptance when the brake engaged: a new one
    /// (`vfolderd accept-reset`) releases the brake.
    pub accepted_at_hold: Option<String>,
}

impl DesiredCache {
    /// The shared state. A panic elsewhere while it was held (a bug) does
    /// not make it unusable: every writer leaves it consistent between
    /// statements, and parsing happens outside the lock.
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state, its generation, and what changed since the last
    /// call (reset).
    pub fn take(&self) -> (Arc<Desired>, u64, Changes) {
        let mut cur = self.lock();
        let changes = std::mem::take(&mut cur.changes);
        (cur.desired.clone(), cur.generation, changes)
    }

    /// The safety brake's state.
    pub fn brake(&self) -> BrakeState {
        self.brake.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the safety brake's state (a change wakes the loop for a whole pass).
    pub fn set_brake(&self, b: BrakeState) {
        let changed = {
            let mut cur = self.brake.lock().unwrap_or_else(|p| p.into_inner());
            let changed = cur.held != b.held;
            *cur = b;
            changed
        };
        if changed {
            self.touch();
            self.lifecycle.notify_one();
        }
    }

    /// Wakes the loop for a change outside the desired state (a stale
    /// volume, rotated credentials, a reconnect): a whole pass.
    pub fn touch(&self) {
        self.lock().changes.all = true;
        self.changed.notify_one();
    }

    /// Wakes the loop for a whole pass under a new generation: the storage
    /// node's verdicts (applied with the limits) changed, so what the
    /// state resolved to before no longer holds.
    pub fn verdicts_changed(&self) {
        let mut cur = self.lock();
        cur.generation += 1;
        cur.changes.all = true;
        drop(cur);
        self.changed.notify_one();
    }

    /// Serves a state loaded from the store until the first live list.
    pub fn seed_from_store(&self, d: Desired) {
        let mut cur = self.lock();
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
        self.kernels_changed.notify_one();
    }

    /// Swaps in a fresh listing; `tombstones`: records gone since become
    /// tombstones (storage role: their directories go to the trash);
    /// `followed` (`P/vfolders/`): the listing has no vfolder records (an
    /// agent follows them one by one), so the ones held are kept, for the
    /// follower to bring up to date.
    fn replace(&self, mut d: Desired, tombstones: bool, followed: Option<&str>) {
        let mut cur = self.lock();
        if tombstones {
            d.inherit_tombstones(&cur.desired);
        }
        if let Some(prefix) = followed {
            let ids = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            d.keep_vfolders(&cur.desired, prefix, &ids);
        }
        self.revision.store(d.revision, Ordering::Relaxed);
        cur.desired = Arc::new(d);
        cur.generation += 1;
        cur.changes = Changes::all();
        self.live.store(true, Ordering::Release);
        self.synced.store(true, Ordering::Release);
        drop(cur);
        self.changed.notify_one();
        self.lifecycle.notify_one();
        self.kernels_changed.notify_one();
    }

    /// Re-evaluates every object (the policy changed) and wakes the loop.
    pub fn reparse(&self, parser: &DesiredParser) {
        let mut cur = self.lock();
        cur.desired = Arc::new(parser.reparse(&cur.desired));
        cur.generation += 1;
        cur.changes = Changes::all();
        drop(cur);
        self.changed.notify_one();
    }

    /// Applies `f`; wakes the loop unless `f` says only other nodes'
    /// kernels changed (those matter to the lifecycle worker alone).
    fn update(&self, f: impl FnOnce(&mut Desired, &mut Changes) -> bool) {
        let mut cur = self.lock();
        let cur = &mut *cur;
        // Copies the state only while a pass still holds the previous one.
        let d = Arc::make_mut(&mut cur.desired);
        let wake_loop = f(d, &mut cur.changes);
        self.revision.store(d.revision, Ordering::Relaxed);
        cur.generation += 1;
        if wake_loop {
            self.changed.notify_one();
        }
        self.lifecycle.notify_one();
    }

    /// Drops tombstones the lifecycle worker no longer needs (their
    /// directory is in the trash with its deletion time, or gone). No pass
    /// follows: nothing a pass looks at changed.
    pub fn forget_tombstones(&self, ids: &[Uuid]) {
        let mut cur = self.lock();
        if ids.iter().any(|id| cur.desired.tombstones.contains_key(id)) {
            let d = Arc::make_mut(&mut cur.desired);
            for id in ids {
                d.tombstones.remove(id);
            }
            // A pass reports them from the trash now (or not at all).
            cur.changes.all = true;
            drop(cur);
            self.changed.notify_one();
        }
    }

    /// The current state, without taking what changed (the lifecycle
    /// worker reads who wants a vfolder before each purge batch).
    pub fn peek(&self) -> Arc<Desired> {
        self.lock().desired.clone()
    }
}

/// A consistent listing of the desired ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Every key and value under the desired prefixes.
    pub kvs: Vec<(String, Vec<u8>)>,
    /// Each key's create revision, in the order of `kvs` (may be empty: then
    /// every key counts as created at `revision`).
    pub created: Vec<i64>,
    /// `P/cluster` at the same revision (the safety brake's input).
    pub cluster: Option<Vec<u8>>,
    /// The revision they were read at.
    pub revision: i64,
}

/// One change a watch reported: a put (with its value) or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// The key.
    pub key: String,
    /// The new value; `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// Its mod revision (a delete's revision).
    pub revision: i64,
    /// Its create revision (0 for a delete).
    pub created: i64,
}

/// What one read of the watch stream brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchBatch {
    /// Changes (possibly none: a `created` or progress response).
    Events(Vec<RawEvent>),
    /// The start revision was compacted away: relist.
    Compacted(i64),
    /// The server cancelled the watch for another reason.
    Canceled(String),
}

/// The etcd calls the watcher makes; the real client, or a scripted double.
pub trait EtcdSource: Send {
    /// An open watch stream.
    type Stream: WatchStream;
    /// Lists `prefixes` in one transaction (one revision for all).
    fn list(
        &mut self,
        prefixes: &[String],
    ) -> impl Future<Output = Result<Listing, WatchError>> + Send;
    /// Watches each prefix from its start revision, on one stream.
    fn watch(
        &mut self,
        prefixes: &[String],
        from: &[i64],
    ) -> impl Future<Output = Result<Self::Stream, WatchError>> + Send;
}

/// An open watch stream.
pub trait WatchStream: Send {
    /// The next batch; `Ok(None)` when the server closed the stream.
    fn next(&mut self) -> impl Future<Output = Result<Option<WatchBatch>, WatchError>> + Send;
}

/// Where the watcher is (kube-runtime's watcher state machine).
pub enum WatchState<S> {
    /// Nothing listed (at start, and after a compaction): list next.
    Empty,
    /// Listed; watching each prefix from `next[i]` (the revision after the
    /// last one seen there). `stream` is `None` after an error: re-watch
    /// from `next`, without a relist.
    Watching {
        /// Per prefix: where a resumed watch starts.
        next: Vec<i64>,
        /// The open stream, if any.
        stream: Option<S>,
    },
}

/// What one [`step`] found, for the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A complete listing: the cache is replaced in one step.
    Listed(Listing),
    /// Changes to apply (connected again if they are the first after an error).
    Applied(Vec<RawEvent>),
    /// The watch's revision was compacted: a relist follows.
    Compacted(i64),
    /// etcd failed; the watcher backs off, then resumes where it was.
    Failed {
        /// What failed, with its causes.
        error: String,
        /// Whether etcd looked unreachable (else it answered with an error).
        outage: bool,
    },
}

/// One step: list, open a watch, or read the next batch.
pub async fn step<E: EtcdSource>(
    etcd: &mut E,
    prefixes: &[String],
    state: WatchState<E::Stream>,
) -> (WatchEvent, WatchState<E::Stream>) {
    let fail = |e: WatchError| WatchEvent::Failed {
        error: crate::error::error_chain(&e),
        outage: e.is_outage(),
    };
    let (mut next, stream) = match state {
        WatchState::Empty => {
            return match etcd.list(prefixes).await {
                Ok(l) => {
                    let next = vec![l.revision + 1; prefixes.len()];
                    (
                        WatchEvent::Listed(l),
                        WatchState::Watching { next, stream: None },
                    )
                }
                Err(e) => (fail(e), WatchState::Empty),
            };
        }
        WatchState::Watching { next, stream } => (next, stream),
    };
    let mut stream = match stream {
        Some(s) => s,
        None => match etcd.watch(prefixes, &next).await {
            Ok(s) => s,
            Err(e @ WatchError::WentBack { .. }) => return (fail(e), WatchState::Empty),
            Err(e) => return (fail(e), WatchState::Watching { next, stream: None }),
        },
    };
    let ended = |why: &str| WatchError::Ended(why.to_string());
    match stream.next().await {
        Ok(Some(WatchBatch::Events(events))) => {
            for ev in &events {
                if let Some(i) = prefixes.iter().position(|p| ev.key.starts_with(p.as_str())) {
                    next[i] = next[i].max(ev.revision + 1);
                }
            }
            let state = WatchState::Watching {
                next,
                stream: Some(stream),
            };
            (WatchEvent::Applied(events), state)
        }
        Ok(Some(WatchBatch::Compacted(rev))) => (WatchEvent::Compacted(rev), WatchState::Empty),
        Ok(Some(WatchBatch::Canceled(reason))) => {
            let e = ended(&format!("watch cancelled: {reason}"));
            (fail(e), WatchState::Watching { next, stream: None })
        }
        Ok(None) => (
            fail(ended("stream closed by server")),
            WatchState::Watching { next, stream: None },
        ),
        Err(e) => (fail(e), WatchState::Watching { next, stream: None }),
    }
}

/// The real etcd: the desired ranges listed in pages at one revision,
/// watched on one stream (without `prev_kv`: nothing here needs the old
/// values, and a delete of many keys with them is a huge response).
pub struct EtcdClient {
    kv: etcd_client::KvClient,
    watch: etcd_client::WatchClient,
    /// `P/cluster`, read with every list (the safety brake).
    cluster_key: Option<String>,
    /// Its value at the last list (or as this node wrote it).
    listed_cluster: Option<Vec<u8>>,
}

impl EtcdClient {
    /// Wraps a client, raising its receive limits to [`MAX_ETCD_MESSAGE`].
    pub fn new(client: &Client) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_ETCD_MESSAGE),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_ETCD_MESSAGE),
            cluster_key: None,
            listed_cluster: None,
        }
    }

    /// Also reads `key` (`P/cluster`) with every list, at the list's revision.
    pub fn with_cluster_key(mut self, key: String) -> Self {
        self.cluster_key = Some(key);
        self
    }

    /// Writes `P/cluster` with a new id unless it exists; returns the id in force.
    pub async fn ensure_cluster_id(&mut self) -> Result<Option<Uuid>, WatchError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
        let Some(key) = self.cluster_key.clone() else {
            return Ok(None);
        };
        let record = ClusterRecord {
            id: Uuid::new_v4(),
            created: crate::state::status::chrono_now(),
        };
        let value = serde_json::to_vec(&record).expect("plain struct");
        let written = value.clone();
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self
            .kv
            .txn(txn)
            .await
            .map_err(WatchError::InitialListFailed)?;
        if resp.succeeded() {
            tracing::info!(cluster = %record.id, "wrote the cluster id (P/cluster)");
            self.listed_cluster = Some(written);
            return Ok(Some(record.id));
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        self.listed_cluster = existing.clone();
        Ok(existing.as_deref().and_then(parse_cluster_id))
    }

    /// Before a watch resumes: is this still the etcd that was listed? A
    /// watch from a revision etcd has not reached is accepted and waits, so
    /// after a wipe it would miss everything until etcd caught up, and a
    /// replaced etcd would feed revisions that mean something else. A
    /// changed or vanished `P/cluster`, or a revision behind the resume
    /// point, means: relist (and let the safety brake judge).
    async fn check_not_reset(
        &mut self,
        prefixes: &[String],
        from: &[i64],
    ) -> Result<(), WatchError> {
        let resume = from.iter().copied().max().unwrap_or(0);
        let key = self
            .cluster_key
            .clone()
            .unwrap_or_else(|| prefixes[0].clone());
        let resp = self
            .kv
            .get(key.as_str(), None)
            .await
            .map_err(WatchError::WatchStartFailed)?;
        let current = resp.header().map_or(0, |h| h.revision());
        if current + 1 < resume {
            return Err(WatchError::WentBack(format!(
                "revision {current}, behind {}",
                resume - 1
            )));
        }
        if self.cluster_key.is_some() {
            let now = resp.kvs().first().map(|kv| kv.value().to_vec());
            if now != self.listed_cluster {
                return Err(WatchError::WentBack(
                    "its cluster id changed or vanished".into(),
                ));
            }
        }
        Ok(())
    }

    /// Every key under `prefix` at `revision` (0: the current one, which is
    /// returned), page by page.
    async fn list_prefix(
        &mut self,
        prefix: &str,
        revision: &mut i64,
        out: &mut Listing,
    ) -> Result<(), WatchError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if *revision > 0 {
                opts = opts.with_revision(*revision);
            }
            let resp = self
                .kv
                .get(from.clone(), Some(opts))
                .await
                .map_err(WatchError::InitialListFailed)?;
            if *revision == 0 {
                *revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.kvs.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
                out.created.push(kv.create_revision());
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
}

/// The real client's watch stream.
pub struct ClientStream(etcd_client::WatchStream);

impl EtcdSource for EtcdClient {
    type Stream = ClientStream;

    async fn list(&mut self, prefixes: &[String]) -> Result<Listing, WatchError> {
        // Every page of every prefix at the revision of the first page: one
        // consistent snapshot, however large (a compaction in between fails
        // the list, which is then retried from scratch).
        let mut revision = 0;
        let mut out = Listing::default();
        for p in prefixes {
            self.list_prefix(p, &mut revision, &mut out).await?;
        }
        if let Some(key) = &self.cluster_key {
            let opts = GetOptions::new().with_revision(revision);
            let resp = self
                .kv
                .get(key.as_str(), Some(opts))
                .await
                .map_err(WatchError::InitialListFailed)?;
            out.cluster = resp.kvs().first().map(|kv| kv.value().to_vec());
            self.listed_cluster = out.cluster.clone();
        }
        out.revision = revision;
        Ok(out)
    }

    async fn watch(
        &mut self,
        prefixes: &[String],
        from: &[i64],
    ) -> Result<ClientStream, WatchError> {
        self.check_not_reset(prefixes, from).await?;
        let opts = |i: usize| {
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from[i]),
            )
        };
        let mut stream = self
            .watch
            .watch(prefixes[0].as_str(), opts(0))
            .await
            .map_err(WatchError::WatchStartFailed)?;
        for (i, prefix) in prefixes.iter().enumerate().skip(1) {
            stream
                .watch(prefix.as_str(), opts(i))
                .await
                .map_err(WatchError::WatchStartFailed)?;
        }
        Ok(ClientStream(stream))
    }
}

impl WatchStream for ClientStream {
    async fn next(&mut self) -> Result<Option<WatchBatch>, WatchError> {
        let Some(resp) = self.0.message().await.map_err(WatchError::StreamFailed)? else {
            return Ok(None);
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Ok(Some(WatchBatch::Compacted(resp.compact_revision())));
            }
            return Ok(Some(WatchBatch::Canceled(resp.cancel_reason().to_string())));
        }
        Ok(Some(WatchBatch::Events(raw_events(&resp))))
    }
}

/// The changes one watch answer carries.
pub(crate) fn raw_events(resp: &etcd_client::WatchResponse) -> Vec<RawEvent> {
    resp.events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            Some(RawEvent {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                revision: kv.mod_revision(),
                created: kv.create_revision(),
            })
        })
        .collect()
}

/// Lists the desired ranges in one transaction, so all three are at one
/// revision (also used by the operator commands). Returns the raw pairs and
/// the revision.
pub async fn list(
    client: &mut Client,
    parser: &DesiredParser,
) -> Result<(Vec<(String, Vec<u8>)>, i64), WatchError> {
    let mut etcd = EtcdClient::new(client);
    let l = etcd.list(&parser.keys.desired_prefixes()).await?;
    Ok((l.kvs, l.revision))
}

/// Parses a listing into a desired state at `revision`.
pub fn parse_listing(parser: &DesiredParser, kvs: &[(String, Vec<u8>)], revision: i64) -> Desired {
    parser.from_list(
        kvs.iter()
            .map(|(k, v)| (k.as_str(), v.as_slice(), revision)),
        revision,
    )
}

/// First delay after an etcd error; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest delay between etcd retries.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Runs forever: list, watch, resume, relist. Cancel by dropping the task.
/// Every listing and event is also written to `store` (the last good desired
/// state, served after a restart while etcd is unreachable).
pub async fn run_watcher(
    client: Client,
    parser: DesiredParser,
    cache: Arc<DesiredCache>,
    store: Ledger,
    brake: BrakeConfig,
) {
    let mut etcd = EtcdClient::new(&client).with_cluster_key(parser.keys.cluster());
    let prefixes = parser.keys.watched_prefixes();
    let mut state = WatchState::Empty;
    let mut delay = RETRY_MIN;
    let mut listed_once = false;
    loop {
        let (event, next) = step(&mut etcd, &prefixes, state).await;
        state = next;
        match event {
            WatchEvent::Failed { error, outage } => {
                if matches!(state, WatchState::Watching { .. }) {
                    count_restart(&cache, "resume"); // from its revision, no relist
                }
                cache.connected.store(false, Ordering::Relaxed);
                if outage {
                    crate::state::endpoints::suspect();
                }
                cache.touch();
                if outage {
                    tracing::warn!(%error, retry_in = ?delay, "etcd unreachable or watch interrupted; keeping the last desired state");
                } else {
                    tracing::error!(%error, retry_in = ?delay, "etcd answered with an error (not an outage); keeping the last desired state");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            WatchEvent::Compacted(c) => {
                tracing::warn!(
                    compact_revision = c,
                    "watch revision was compacted; relisting"
                );
            }
            WatchEvent::Listed(mut l) => {
                if parser.keys.follows_vfolders() {
                    // Read at the listing's revision; should it fail, the
                    // follower reads them a moment later.
                    let kv = &mut etcd.kv;
                    if let Err(e) = crate::state::follow::add_followed(kv, &parser, &mut l).await {
                        tracing::warn!(error = %crate::error::error_chain(&e), "cannot read the listed kernels' vfolder records with the listing");
                    }
                }
                judge_listing(&mut etcd, &brake, &cache, &l).await;
                apply_listing(&parser, &cache, &store, l);
                if std::mem::replace(&mut listed_once, true) {
                    count_restart(&cache, "relist");
                }
                delay = RETRY_MIN;
            }
            WatchEvent::Applied(events) => apply_events(&parser, &cache, &store, &events),
        }
    }
}

/// Where the safety brake keeps its memory, and whether this node may
/// create the cluster id.
#[derive(Debug, Clone)]
pub struct BrakeConfig {
    /// The cluster file ([`ClusterFile::path`]).
    pub file: std::path::PathBuf,
    /// Storage role: writes `P/cluster` for a new cluster.
    pub storage: bool,
}

/// Parses `P/cluster`'s value; a value that does not parse counts as none.
fn parse_cluster_id(v: &[u8]) -> Option<Uuid> {
    serde_yaml::from_slice::<ClusterRecord>(v)
        .ok()
        .map(|r| r.id)
}

/// Runs the safety brake over a fresh list and records its verdict.
async fn judge_listing(
    etcd: &mut EtcdClient,
    cfg: &BrakeConfig,
    cache: &DesiredCache,
    l: &Listing,
) {
    let mut etcd_id = l.cluster.as_deref().and_then(parse_cluster_id);
    let mut verdict = crate::state::brake::evaluate(&cfg.file, etcd_id, l.revision);
    if verdict == Verdict::NewCluster && cfg.storage {
        match etcd.ensure_cluster_id().await {
            Ok(id) => etcd_id = id,
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot write the cluster id; will retry on the next list")
            }
        }
        verdict = crate::state::brake::evaluate(&cfg.file, etcd_id, l.revision);
    }
    let accepted_at_hold = crate::state::brake::accepted(&cfg.file).flatten();
    let held = match verdict {
        Verdict::Held(reason) => {
            tracing::error!(%reason, "safety brake: holding; nothing is torn down until `vfolderd accept-reset`");
            Some(reason)
        }
        Verdict::Proceed { adopt } => {
            if let Err(e) = crate::state::brake::remember(&cfg.file, adopt, l.revision) {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot remember the cluster identity");
            }
            None
        }
        Verdict::NewCluster => None,
    };
    cache.set_brake(BrakeState {
        held,
        etcd_id,
        revision: l.revision,
        accepted_at_hold,
    });
}

/// Swaps the cache for a fresh listing in one step (keys deleted meanwhile
/// disappear) and stores it as the last good state.
fn apply_listing(parser: &DesiredParser, cache: &DesiredCache, store: &Ledger, l: Listing) {
    // A held node keeps its last good state in the store: the listing that
    // held it (a wiped or foreign etcd) must not replace it.
    let keep_store = cache.brake().held.is_some();
    let created = |i: usize| l.created.get(i).copied().unwrap_or(l.revision);
    let d = parser.from_listing(
        l.kvs
            .iter()
            .enumerate()
            .map(|(i, (k, v))| (k.as_str(), v.as_slice(), l.revision, created(i))),
        l.revision,
    );
    if keep_store {
        tracing::warn!("safety brake holds: the stored last good desired state is kept");
    } else if let Err(e) = store.store_desired(&l.kvs, &parser.keys.watched_prefixes(), l.revision)
    {
        tracing::warn!(error = %crate::error::error_chain(&e), "cannot store the desired state; a restart during an etcd outage would start empty");
    }
    tracing::info!(
        revision = d.revision,
        volumes = d.volumes.len(),
        vfolders = d.vfolders.len(),
        kernels = d.kernels.len(),
        "listed desired state"
    );
    cache.connected.store(true, Ordering::Relaxed);
    let followed = parser
        .keys
        .follows_vfolders()
        .then(|| parser.keys.vfolders_prefix());
    cache.replace(d, parser.keys.all_kernels, followed.as_deref());
}

/// Applies watch events to the cache and the store, noting what changed.
fn apply_events(parser: &DesiredParser, cache: &DesiredCache, store: &Ledger, events: &[RawEvent]) {
    // "Connected" once these are applied, not before: the lifecycle worker
    // acts only while connected, on a state that has what etcd sent.
    count_received(cache, events);
    apply_changes(parser, cache, store, events);
    if !cache.connected.swap(true, Ordering::Relaxed) {
        cache.touch();
    }
}

/// Counts events a watch stream brought (`vfolderd_etcd_watch_*`).
pub(crate) fn count_received(cache: &DesiredCache, events: &[RawEvent]) {
    if let Some(c) = cache.counters.get() {
        c.events.inc_by(events.len() as u64);
        let bytes: usize = events
            .iter()
            .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len))
            .sum();
        c.bytes.inc_by(bytes as u64);
    }
}

/// Applies changes (from a watch, or records an agent read or forgot) to
/// the cache and the store, noting what changed.
pub(crate) fn apply_changes(
    parser: &DesiredParser,
    cache: &DesiredCache,
    store: &Ledger,
    events: &[RawEvent],
) {
    if events.is_empty() {
        return;
    }
    tracing::trace!(events = events.len(), "desired-state changes");
    let follows = parser.keys.follows_vfolders();
    let mut kernels_changed = false;
    // Parse first, outside the lock: parsing is the part that meets hostile input.
    let held = cache.brake().held.is_some();
    let parsed: Vec<Option<Parsed>> = events
        .iter()
        .map(|ev| {
            ev.value
                .as_ref()
                .map(|v| parser.parse(&ev.key, v, ev.revision, ev.created))
        })
        .collect();
    cache.update(|d, changes| {
        let mut wake_loop = false;
        for (ev, parsed) in events.iter().zip(parsed) {
            // A kernel event is a pass over that kernel. One that changes
            // or goes may leave a volume unused (linger, renewal and
            // healing are decided over every kernel): a whole pass follows.
            match parser.keys.classify(&ev.key) {
                Classified::Object(ObjectKey::Kernel(id)) => {
                    if ev.value.is_none() || d.kernels.contains_key(&id) {
                        changes.volumes = true;
                    }
                    changes.kernels.insert(id);
                    kernels_changed = true;
                }
                // A followed record concerns the kernels that use it (and,
                // as their kernel events do, the volumes they may leave).
                Classified::Object(ObjectKey::Vfolder(id)) if follows => {
                    let node = format!("{}/", parser.keys.node);
                    let users = d.in_use.users(&id);
                    changes.volumes |= !users.is_empty();
                    changes.kernels.extend(
                        users
                            .into_iter()
                            .filter_map(|k| k.strip_prefix(&node).map(String::from)),
                    );
                }
                // Another node's kernel matters only to the in-use guard
                // (the lifecycle worker is woken below), not to a pass here.
                Classified::Object(ObjectKey::ForeignKernel(_)) => {}
                Classified::Ignored => wake_loop = true,
                _ => changes.all = true,
            }
            wake_loop |= changes.all || !changes.kernels.is_empty();
            match (&ev.value, parsed) {
                (Some(v), Some(p)) => d.apply_parsed(&ev.key, v, ev.revision, p),
                _ => parser.apply_delete(d, &ev.key, ev.revision),
            }
            if held {
                continue;
            }
            if let Err(e) = store.apply_desired(&ev.key, ev.value.as_deref(), ev.revision) {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot store a desired-state change");
            }
        }
        wake_loop
    });
    if kernels_changed {
        cache.kernels_changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex as StdMutex;

    /// What the scripted etcd answers, in order (kube's `mock_tests` `Scenario`).
    enum Answer {
        List(Result<Listing, ()>),
        Watch(Result<(), ()>),
        /// etcd is behind the watch's revision (wiped or restored).
        WentBack,
        Batch(Result<Option<WatchBatch>, ()>),
    }

    /// A scripted etcd that records every call.
    #[derive(Clone, Default)]
    struct Scripted {
        answers: Arc<StdMutex<VecDeque<Answer>>>,
        calls: Arc<StdMutex<Vec<String>>>,
    }

    struct ScriptedStream(Scripted);

    fn down() -> etcd_client::Error {
        etcd_client::Error::WatchError("etcd down".into())
    }

    impl Scripted {
        fn new(answers: Vec<Answer>) -> Self {
            Self {
                answers: Arc::new(StdMutex::new(answers.into())),
                calls: Arc::default(),
            }
        }
        fn answer(&self) -> Answer {
            let next = self.answers.lock().unwrap().pop_front();
            next.expect("the watcher asked more than the script says")
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl EtcdSource for Scripted {
        type Stream = ScriptedStream;
        async fn list(&mut self, _: &[String]) -> Result<Listing, WatchError> {
            self.calls.lock().unwrap().push("list".into());
            match self.answer() {
                Answer::List(r) => r.map_err(|()| WatchError::InitialListFailed(down())),
                _ => panic!("list out of script"),
            }
        }
        async fn watch(
            &mut self,
            _: &[String],
            from: &[i64],
        ) -> Result<ScriptedStream, WatchError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("watch from {from:?}"));
            match self.answer() {
                Answer::Watch(r) => r
                    .map(|()| ScriptedStream(self.clone()))
                    .map_err(|()| WatchError::WatchStartFailed(down())),
                Answer::WentBack => Err(WatchError::WentBack(format!(
                    "revision 3, behind {}",
                    from.iter().copied().max().unwrap_or(0)
                ))),
                _ => panic!("watch out of script"),
            }
        }
    }

    impl WatchStream for ScriptedStream {
        async fn next(&mut self) -> Result<Option<WatchBatch>, WatchError> {
            match self.0.answer() {
                Answer::Batch(r) => r.map_err(|()| WatchError::StreamFailed(down())),
                _ => panic!("read out of script"),
            }
        }
    }

    fn prefixes() -> Vec<String> {
        ["/p/volumes/", "/p/vfolders/", "/p/nodes/n/kernels/"]
            .map(String::from)
            .to_vec()
    }

    fn listing(revision: i64) -> Answer {
        Answer::List(Ok(Listing {
            kvs: vec![("/p/volumes/v".into(), b"x".to_vec())],
            created: vec![revision],
            cluster: None,
            revision,
        }))
    }

    fn put(key: &str, revision: i64) -> RawEvent {
        RawEvent {
            key: key.into(),
            value: Some(b"v".to_vec()),
            revision,
            created: revision,
        }
    }

    /// Runs `n` steps from `Empty`, returning the events.
    async fn run(etcd: &mut Scripted, n: usize) -> Vec<WatchEvent> {
        let fut = async {
            let mut state = WatchState::Empty;
            let mut out = Vec::new();
            for _ in 0..n {
                let (ev, next) = step(etcd, &prefixes(), state).await;
                out.push(ev);
                state = next;
            }
            out
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("the watcher likely deadlocked")
    }

    #[tokio::test]
    async fn a_list_is_followed_by_a_watch_from_the_next_revision() {
        let mut etcd = Scripted::new(vec![
            listing(10),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![put(
                "/p/nodes/n/kernels/k",
                12,
            )])))),
        ]);
        let evs = run(&mut etcd, 2).await;
        assert!(matches!(&evs[0], WatchEvent::Listed(l) if l.revision == 10));
        assert_eq!(
            evs[1],
            WatchEvent::Applied(vec![put("/p/nodes/n/kernels/k", 12)])
        );
        assert_eq!(etcd.calls(), ["list", "watch from [11, 11, 11]"]);
    }

    #[tokio::test]
    async fn a_broken_stream_resumes_each_range_after_its_last_revision_without_a_relist() {
        let mut etcd = Scripted::new(vec![
            listing(10),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![
                put("/p/vfolders/a", 14),
                put("/p/nodes/n/kernels/k", 15),
            ])))),
            Answer::Batch(Err(())),
            // Opening the watch again fails once, then works.
            Answer::Watch(Err(())),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![])))),
        ]);
        let evs = run(&mut etcd, 5).await;
        assert!(matches!(&evs[2], WatchEvent::Failed { error: e, .. } if e.contains("etcd down")));
        assert!(matches!(&evs[3], WatchEvent::Failed { .. }));
        assert_eq!(evs[4], WatchEvent::Applied(vec![]));
        assert_eq!(
            etcd.calls(),
            [
                "list",
                "watch from [11, 11, 11]",
                "watch from [11, 15, 16]",
                "watch from [11, 15, 16]"
            ]
        );
    }

    #[tokio::test]
    async fn a_compacted_revision_relists_and_watches_from_the_new_listing() {
        let mut etcd = Scripted::new(vec![
            listing(10),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Compacted(30)))),
            listing(40),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![])))),
        ]);
        let evs = run(&mut etcd, 4).await;
        assert_eq!(evs[1], WatchEvent::Compacted(30));
        assert!(matches!(&evs[2], WatchEvent::Listed(l) if l.revision == 40));
        assert_eq!(
            etcd.calls(),
            [
                "list",
                "watch from [11, 11, 11]",
                "list",
                "watch from [41, 41, 41]"
            ]
        );
    }

    /// After etcd is wiped, a watch resumed from the old revision would wait
    /// silently for revisions that mean something else: relist instead.
    #[tokio::test]
    async fn an_etcd_behind_the_watch_revision_is_relisted_not_resumed() {
        let mut etcd = Scripted::new(vec![
            listing(10),
            Answer::Watch(Ok(())),
            Answer::Batch(Err(())),
            Answer::WentBack,
            listing(3),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![])))),
        ]);
        let evs = run(&mut etcd, 5).await;
        assert!(matches!(&evs[2], WatchEvent::Failed { error: e, .. } if e.contains("behind")));
        assert!(matches!(&evs[3], WatchEvent::Listed(l) if l.revision == 3));
        assert_eq!(
            etcd.calls(),
            [
                "list",
                "watch from [11, 11, 11]",
                "watch from [11, 11, 11]",
                "list",
                "watch from [4, 4, 4]"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_list_is_retried_as_a_list() {
        let mut etcd = Scripted::new(vec![
            Answer::List(Err(())),
            Answer::List(Err(())),
            listing(7),
        ]);
        let evs = run(&mut etcd, 3).await;
        assert!(
            matches!(&evs[0], WatchEvent::Failed { error: e, .. } if e.contains("initial list"))
        );
        assert!(matches!(&evs[1], WatchEvent::Failed { .. }));
        assert!(matches!(&evs[2], WatchEvent::Listed(l) if l.revision == 7));
        assert_eq!(etcd.calls(), ["list", "list", "list"]);
    }

    #[tokio::test]
    async fn a_cancel_or_a_closed_stream_rewatches_from_where_it_was() {
        let mut etcd = Scripted::new(vec![
            listing(10),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Canceled("too many requests".into())))),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(None)),
            Answer::Watch(Ok(())),
            Answer::Batch(Ok(Some(WatchBatch::Events(vec![put("/p/volumes/v", 11)])))),
        ]);
        let evs = run(&mut etcd, 4).await;
        assert!(
            matches!(&evs[1], WatchEvent::Failed { error: e, .. } if e.contains("too many requests"))
        );
        assert!(
            matches!(&evs[2], WatchEvent::Failed { error: e, .. } if e.contains("closed by server"))
        );
        assert_eq!(evs[3], WatchEvent::Applied(vec![put("/p/volumes/v", 11)]));
        assert_eq!(
            etcd.calls(),
            [
                "list",
                "watch from [11, 11, 11]",
                "watch from [11, 11, 11]",
                "watch from [11, 11, 11]"
            ]
        );
    }

    fn parser() -> DesiredParser {
        DesiredParser {
            keys: crate::keys::Keys::new("/p", "n"),
            policy: Arc::default(),
            kernels_root: "/k".into(),
        }
    }

    #[test]
    fn a_relist_swaps_the_cache_so_keys_deleted_meanwhile_disappear() {
        let dir = tempfile::tempdir().unwrap();
        let store = Ledger::open(dir.path()).unwrap();
        let (p, cache) = (parser(), DesiredCache::default());
        let kernel = |k: &str| (format!("/p/nodes/n/kernels/{k}"), b"mounts: []".to_vec());
        let l = |kvs, revision| Listing {
            kvs,
            created: vec![],
            cluster: None,
            revision,
        };
        apply_listing(&p, &cache, &store, l(vec![kernel("a"), kernel("b")], 5));
        // `b` was deleted while the watch was down, then its revision compacted.
        apply_listing(&p, &cache, &store, l(vec![kernel("a")], 9));
        let (d, _, changes) = cache.take();
        assert_eq!(d.kernels.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(d.revision, 9);
        assert!(changes.all, "a relist is a whole pass");
        assert!(cache.live.load(Ordering::Acquire));
    }

    #[test]
    fn kernel_events_name_their_kernels_and_a_removal_asks_for_a_volume_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = Ledger::open(dir.path()).unwrap();
        let (p, cache) = (parser(), DesiredCache::default());
        apply_listing(&p, &cache, &store, Listing::default());
        cache.take();
        apply_events(&p, &cache, &store, &[put("/p/nodes/n/kernels/k1", 3)]);
        let (d, _, changes) = cache.take();
        assert!(d.kernels.contains_key("k1"));
        assert_eq!((changes.all, changes.volumes), (false, false));
        assert_eq!(changes.kernels.iter().collect::<Vec<_>>(), ["k1"]);
        let delete = RawEvent {
            key: "/p/nodes/n/kernels/k1".into(),
            value: None,
            revision: 4,
            created: 0,
        };
        apply_events(&p, &cache, &store, &[delete]);
        let (d, _, changes) = cache.take();
        assert!(d.kernels.is_empty());
        assert!(changes.volumes && !changes.all);
        apply_events(&p, &cache, &store, &[put("/p/volumes/v", 5)]);
        assert!(cache.take().2.all, "anything but a kernel is a whole pass");
    }

    #[test]
    fn a_prefix_ends_at_the_next_key_after_all_its_keys() {
        assert_eq!(prefix_end(b"/p/"), b"/p0");
        assert_eq!(prefix_end(&[0x61, 0xff]), [0x62]);
        assert_eq!(prefix_end(&[0xff]), [0]);
    }

    #[test]
    fn only_an_unreachable_etcd_is_logged_as_an_outage() {
        let status = |s| WatchError::InitialListFailed(etcd_client::Error::GRpcStatus(s));
        assert!(status(tonic::Status::unavailable("connection refused")).is_outage());
        assert!(status(tonic::Status::deadline_exceeded("timeout")).is_outage());
        let too_big =
            tonic::Status::out_of_range("decoded message length too large: found 16076520 bytes");
        assert!(!status(too_big).is_outage());
        let too_big = tonic::Status::unknown("decoded message length too large");
        assert!(!status(too_big).is_outage());
        assert!(!status(tonic::Status::resource_exhausted("quota")).is_outage());
        assert!(!status(tonic::Status::invalid_argument("bad")).is_outage());
    }
}
