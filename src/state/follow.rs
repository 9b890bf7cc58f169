//! An agent's vfolder records, followed key by key: only those its kernels
//! use are fetched and watched, and a record no kernel uses any more is
//! forgotten (in memory and in the store). An agent's memory and watch
//! traffic then follow its own kernels, not every user's folders in the
//! cluster (a storage node, which serves every vfolder of its volumes,
//! still watches the whole range).
//!
//! Each new record is read in a transaction with the others of its batch
//! (one revision `R` for all), then watched from `R + 1` on one stream, so
//! no change between the read and the watch is missed. Watches carry ids
//! this task assigns, so an event names its record without waiting for the
//! server's `created` answers. A broken stream, a compacted revision or a
//! cancelled watch makes the follower read and watch everything again after
//! a backoff; until then the records held stay (fail static).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, KvClient, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions, WatchResponse,
};
use uuid::Uuid;

use crate::keys::ObjectKey;
use crate::state::desired::DesiredParser;
use crate::state::ledger::Ledger;
use crate::state::verdict::{refusal, RECHECK};
use crate::state::watch::{apply_changes, DesiredCache, RawEvent, WatchError, MAX_ETCD_MESSAGE};

/// Records read per transaction (etcd's `--max-txn-ops` is 128 by default).
const FETCH_BATCH: usize = 64;
/// First delay after an etcd error; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest delay between retries.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Reads `keys` in transactions of [`FETCH_BATCH`], all at `revision` (or
/// at the first transaction's revision): the revision read at, and each
/// key's record if it exists.
pub async fn fetch(
    kv: &mut KvClient,
    keys: &[String],
    revision: Option<i64>,
) -> Result<(i64, Vec<Option<etcd_client::KeyValue>>), WatchError> {
    let mut at = revision;
    let mut out = Vec::with_capacity(keys.len());
    for batch in keys.chunks(FETCH_BATCH) {
        let opts = || at.map(|r| etcd_client::GetOptions::new().with_revision(r));
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|k| TxnOp::get(k.as_str(), opts()))
            .collect();
        let resp = kv
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(WatchError::InitialListFailed)?;
        at = at.or(resp.header().map(|h| h.revision()));
        for op in resp.op_responses() {
            out.push(match op {
                TxnOpResponse::Get(got) => got.kvs().first().cloned(),
                _ => None,
            });
        }
    }
    Ok((at.unwrap_or(0), out))
}

/// The vfolder records a listing's kernels use, read at the listing's
/// revision and added to it: an agent's first pass then sees its kernels'
/// records (not "no record" for the moment the follower takes to read them).
pub async fn add_followed(
    kv: &mut KvClient,
    parser: &DesiredParser,
    l: &mut crate::state::watch::Listing,
) -> Result<(), WatchError> {
    let d = crate::state::watch::parse_listing(parser, &l.kvs, l.revision);
    let keys: Vec<String> = d
        .in_use
        .vfolders()
        .map(|id| parser.keys.object_key(&ObjectKey::Vfolder(*id)))
        .collect();
    let (_, got) = fetch(kv, &keys, Some(l.revision)).await?;
    let with_created = l.created.len() == l.kvs.len();
    for kv in got.into_iter().flatten() {
        l.kvs.push((
            String::from_utf8_lossy(kv.key()).into_owned(),
            kv.value().to_vec(),
        ));
        if with_created {
            l.created.push(kv.create_revision());
        }
    }
    Ok(())
}

/// What to start and stop following: `wanted` minus `followed`, and
/// whatever is held or followed but not wanted (records a restart or relist
/// carried over, a kernel gone during an outage).
pub fn diff(
    wanted: &BTreeSet<Uuid>,
    followed: &HashMap<Uuid, i64>,
    held: &BTreeSet<Uuid>,
) -> (Vec<Uuid>, Vec<Uuid>) {
    let add = wanted
        .iter()
        .filter(|id| !followed.contains_key(id))
        .copied()
        .collect();
    let drop: BTreeSet<Uuid> = followed
        .keys()
        .chain(held)
        .filter(|id| !wanted.contains(id))
        .copied()
        .collect();
    (add, drop.into_iter().collect())
}

/// One answer of the watch stream, as its reader task passes it on.
type Answer = Result<Option<WatchResponse>, etcd_client::Error>;

/// The open watch stream: requests are sent here, answers are read by a
/// task of their own, so thousands of watch requests sent in a row never
/// wait on answers nobody reads (HTTP/2 flow control would stall both).
struct Stream {
    requests: etcd_client::WatchRequestSender,
    answers: tokio::sync::mpsc::UnboundedReceiver<Answer>,
    _reader: crate::daemon::AbortOnDrop<()>,
}

impl Stream {
    fn new(stream: etcd_client::WatchStream) -> Self {
        let (requests, mut responses) = stream.split();
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let answer = responses.message().await;
                let last = !matches!(answer, Ok(Some(_)));
                if tx.send(answer).is_err() || last {
                    return;
                }
            }
        });
        Self {
            requests,
            answers,
            _reader: crate::daemon::AbortOnDrop(reader),
        }
    }
}

/// The follower's state: the records followed, by the id of their watch.
struct Follower {
    kv: KvClient,
    watch: WatchClient,
    parser: DesiredParser,
    cache: Arc<DesiredCache>,
    store: Ledger,
    /// Followed record → its watch id on `stream`.
    followed: HashMap<Uuid, i64>,
    /// Watch id → record.
    by_watch: HashMap<i64, Uuid>,
    stream: Option<Stream>,
    next_watch_id: i64,
    /// What the kernels want may have changed since it was last compared.
    dirty: bool,
    /// When the storage node's refusals are next read again.
    recheck_at: Option<tokio::time::Instant>,
}

/// Runs forever; cancel by dropping the task.
pub async fn run_follower(
    client: Client,
    parser: DesiredParser,
    cache: Arc<DesiredCache>,
    store: Ledger,
) {
    let mut f = Follower {
        kv: client
            .kv_client()
            .max_decoding_message_size(MAX_ETCD_MESSAGE),
        watch: client
            .watch_client()
            .max_decoding_message_size(MAX_ETCD_MESSAGE),
        parser,
        cache,
        store,
        followed: HashMap::new(),
        by_watch: HashMap::new(),
        stream: None,
        next_watch_id: 1,
        dirty: true,
        recheck_at: None,
    };
    let mut delay = RETRY_MIN;
    loop {
        match f.round().await {
            Ok(()) => delay = RETRY_MIN,
            Err(e) => {
                if e.is_outage() {
                    crate::state::endpoints::suspect();
                }
                let error = crate::error::error_chain(&e);
                tracing::warn!(%error, retry_in = ?delay, "following vfolder records failed; keeping the ones held");
                f.restart();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

impl Follower {
    /// Brings the followed records to what this node's kernels use (when
    /// that may have changed), then applies one answer of the stream or
    /// notes that the kernels changed.
    async fn round(&mut self) -> Result<(), WatchError> {
        if std::mem::take(&mut self.dirty) {
            self.sync().await?;
            self.check_verdicts(false).await?;
        }
        let recheck_at = self.recheck_at;
        let recheck = async {
            match recheck_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let (cache, stream) = (&self.cache, &mut self.stream);
        let answer = async {
            match stream.as_mut() {
                Some(s) => s.answers.recv().await,
                None => std::future::pending().await,
            }
        };
        let answer = tokio::select! {
            () = cache.kernels_changed.notified() => {
                self.dirty = true;
                return Ok(());
            }
            () = recheck => return self.check_verdicts(true).await,
            a = answer => a,
        };
        match answer {
            Some(Ok(Some(resp))) => self.apply(&resp),
            Some(Ok(None)) | None => Err(WatchError::Ended("stream closed by server".into())),
            Some(Err(e)) => Err(WatchError::StreamFailed(e)),
        }
    }

    /// Starts and stops following to match the kernels (O(records held)).
    async fn sync(&mut self) -> Result<(), WatchError> {
        let (wanted, held) = {
            let d = self.cache.peek();
            let wanted: BTreeSet<Uuid> = d.in_use.vfolders().copied().collect();
            let held: BTreeSet<Uuid> = d.vfolders.keys().copied().collect();
            (wanted, held)
        };
        let (add, drop) = diff(&wanted, &self.followed, &held);
        // A refusal of a vfolder no kernel here wants any more goes too
        // (after a restart it may be neither followed nor held).
        self.cache.verdicts.retain(&wanted);
        self.forget(&drop).await?;
        for batch in add.chunks(FETCH_BATCH) {
            self.follow(batch).await?;
        }
        Ok(())
    }

    /// Reads the statuses of the followed vfolders a kernel waits for (and,
    /// when `recheck`, of those refused) and takes up the storage node's
    /// verdicts; a verdict that changed wakes the loop for a whole pass.
    async fn check_verdicts(&mut self, recheck: bool) -> Result<(), WatchError> {
        let verdicts = &self.cache.verdicts;
        // Not followed yet (a relist under way): looked up once they are.
        let (ids, later): (BTreeSet<Uuid>, BTreeSet<Uuid>) = verdicts
            .to_check(recheck)
            .into_iter()
            .partition(|id| self.followed.contains_key(id));
        verdicts.wait_for(later);
        if !ids.is_empty() {
            let keys: Vec<String> = ids
                .iter()
                .map(|id| self.parser.keys.vfolder_status(id))
                .collect();
            let got = match fetch(&mut self.kv, &keys, None).await {
                Ok((_, got)) => got,
                Err(e) => {
                    verdicts.wait_for(ids); // asked again after the backoff
                    return Err(e);
                }
            };
            let found = ids
                .iter()
                .zip(got)
                .filter_map(|(id, kv)| Some((*id, refusal(kv?.value())?)))
                .collect();
            if verdicts.record(&ids, found) {
                tracing::info!(vfolders = ?ids, "the storage node's verdicts changed");
                self.cache.verdicts_changed();
            }
        }
        if recheck || self.recheck_at.is_none() {
            self.recheck_at = verdicts
                .any_refused()
                .then(|| tokio::time::Instant::now() + RECHECK);
        }
        Ok(())
    }

    /// Starts over: the next round reads and watches every record again
    /// (the ones held stay meanwhile).
    fn restart(&mut self) {
        self.stream = None;
        self.followed.clear();
        self.by_watch.clear();
        self.published().clear();
        self.dirty = true;
    }

    /// The records the cache knows as followed: a relist keeps the values
    /// the follower holds for those (read later than the listing, or about
    /// to be brought past it by their watch, never back).
    fn published(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Uuid>> {
        self.cache
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, id: &Uuid) -> String {
        self.parser.keys.object_key(&ObjectKey::Vfolder(*id))
    }

    /// Reads `ids` at one revision, applies what they hold (or that they
    /// do not exist), and watches each from the next revision.
    async fn follow(&mut self, ids: &[Uuid]) -> Result<(), WatchError> {
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        let (revision, got) = fetch(&mut self.kv, &keys, None).await?;
        let held: std::collections::HashSet<Uuid> = {
            let d = self.cache.peek();
            ids.iter()
                .filter(|id| d.vfolders.contains_key(id))
                .copied()
                .collect()
        };
        let mut events = Vec::new();
        for ((id, key), kv) in ids.iter().zip(&keys).zip(got) {
            match kv {
                Some(kv) => events.push(RawEvent {
                    key: key.clone(),
                    value: Some(kv.value().to_vec()),
                    revision: kv.mod_revision(),
                    created: kv.create_revision(),
                }),
                // Absent (not made yet, or deleted while not followed): a
                // record held from before goes.
                None if held.contains(id) => events.push(RawEvent {
                    key: key.clone(),
                    value: None,
                    revision,
                    created: 0,
                }),
                None => {}
            }
        }
        // Known as followed before they are applied: a relist meanwhile
        // (read at an older revision) must not replace what is applied.
        self.published().extend(ids.iter().copied());
        if !events.is_empty() {
            apply_changes(&self.parser, &self.cache, &self.store, &events);
        }
        for (id, key) in ids.iter().zip(keys) {
            self.watch_key(*id, key, revision + 1).await?;
        }
        Ok(())
    }

    /// Watches one record from `from`, on the one stream.
    async fn watch_key(&mut self, id: Uuid, key: String, from: i64) -> Result<(), WatchError> {
        let watch_id = self.next_watch_id;
        self.next_watch_id += 1;
        let opts = WatchOptions::new()
            .with_start_revision(from)
            .with_watch_id(watch_id);
        match self.stream.as_mut() {
            Some(s) => s.requests.watch(key, Some(opts)).await,
            None => self
                .watch
                .watch(key, Some(opts))
                .await
                .map(|s| self.stream = Some(Stream::new(s))),
        }
        .map_err(WatchError::WatchStartFailed)?;
        self.followed.insert(id, watch_id);
        self.by_watch.insert(watch_id, id);
        self.published().insert(id);
        Ok(())
    }

    /// Stops following `ids` and forgets them (no kernel here uses them).
    async fn forget(&mut self, ids: &[Uuid]) -> Result<(), WatchError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.cache.verdicts.forget(ids);
        let revision = self
            .cache
            .revision
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut events = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(watch_id) = self.followed.remove(id) {
                self.by_watch.remove(&watch_id);
                self.published().remove(id);
                if let Some(s) = self.stream.as_mut() {
                    s.requests
                        .cancel(watch_id)
                        .await
                        .map_err(WatchError::StreamFailed)?;
                }
            }
            events.push(RawEvent {
                key: self.key(id),
                value: None,
                revision,
                created: 0,
            });
        }
        apply_changes(&self.parser, &self.cache, &self.store, &events);
        Ok(())
    }

    /// Applies one answer of the stream: a record's changes. A watch the
    /// server ended (compacted, refused) fails the round: everything is
    /// read and watched again after the backoff.
    fn apply(&mut self, resp: &WatchResponse) -> Result<(), WatchError> {
        let Some(id) = self.by_watch.get(&resp.watch_id()).copied() else {
            return Ok(()); // a watch cancelled meanwhile, or a progress note
        };
        if resp.canceled() {
            return Err(WatchError::Ended(format!(
                "the watch of vfolder {id} ended (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        let key = self.key(&id);
        let events: Vec<RawEvent> = crate::state::watch::raw_events(resp)
            .into_iter()
            // Only the record this watch is for.
            .filter(|e| e.key == key)
            .collect();
        if !events.is_empty() {
            crate::state::watch::count_received(&self.cache, &events);
            apply_changes(&self.parser, &self.cache, &self.store, &events);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_round_follows_what_is_wanted_and_drops_what_is_not() {
        let wanted: BTreeSet<Uuid> = [id(1), id(2)].into();
        let followed: HashMap<Uuid, i64> = [(id(2), 7), (id(3), 8)].into();
        // Held from the store (id 4) or a relist, wanted by no kernel: dropped too.
        let held: BTreeSet<Uuid> = [id(2), id(4)].into();
        let (add, drop) = diff(&wanted, &followed, &held);
        assert_eq!(add, vec![id(1)]);
        assert_eq!(drop, vec![id(3), id(4)]);
    }
}
