//! Status write-back: keeps etcd's status keys equal to the latest report,
//! writing only what changed (batched in transactions) and deleting what no
//! longer exists; and the node's liveness key under a kept-alive lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde_json::Value;

use crate::keys::Keys;
use crate::state::election::{Led, Scope, Term};

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

/// Figures that move with every kernel (a volume's `users`) or every write
/// a user makes (its free bytes): a change to them alone is written at most
/// once per [`FIGURES_EVERY`] per key. Written with every change, a volume
/// shared by a node's kernels doubled the writes per kernel change, and at
/// thousands of nodes the free bytes of a busy share would be a write per
/// node per probe.
const FIGURES: &[&str] = &["users", "capacity_bytes", "free_bytes"];
/// How often a key whose figures alone changed is rewritten.
const FIGURES_EVERY: Duration = Duration::from_secs(10);
/// How long a status may say `Pending` before it is written: work that
/// ends sooner (a bind, a record the follower is reading) is reported only
/// by its outcome. Work that starts a volume mount is reported at once
/// ([`StatusBatch::prompt`]): it can take seconds.
const PENDING_GRACE: Duration = Duration::from_millis(100);

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Status transactions sent at once.
const TXNS_IN_FLIGHT: usize = 8;

/// Digests of what a status value says (volatile fields aside): of its
/// meaning, and of its [`FIGURES`]. The writer remembers digests, not
/// values: at 10,000 kernels a second copy of every status was ~15 MiB
/// resident.
fn digests(v: &Value) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    fn feed(v: &Value, h: &mut impl Hasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(a) => {
                (4u8, a.len()).hash(h);
                for x in a {
                    feed(x, h);
                }
            }
            Value::Object(m) => {
                5u8.hash(h);
                for (k, x) in m {
                    k.hash(h);
                    feed(x, h);
                }
            }
        }
    }
    let mut meaning = std::collections::hash_map::DefaultHasher::new();
    let mut figures = std::collections::hash_map::DefaultHasher::new();
    match v {
        Value::Object(m) => {
            5u8.hash(&mut meaning);
            for (k, x) in m {
                let h = if FIGURES.contains(&k.as_str()) {
                    // That a figure is there at all is meaning (a volume's
                    // first free bytes place new vfolders), and so is
                    // whether a volume has users (an unused one goes after
                    // its linger).
                    k.hash(&mut meaning);
                    if k == "users" {
                        (k, x.as_u64() == Some(0)).hash(&mut meaning);
                    }
                    &mut figures
                } else if VOLATILE.contains(&k.as_str()) {
                    continue;
                } else {
                    &mut meaning
                };
                k.hash(h);
                feed(x, h);
            }
        }
        v => feed(v, &mut meaning),
    }
    (meaning.finish(), figures.finish())
}

/// Whether a status value says `Pending`.
fn is_pending(v: &Value) -> bool {
    v.get("state").and_then(Value::as_str) == Some("Pending")
}

/// What the writer knows of a key it wrote (or adopted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Written {
    /// Digest of what the value means (its figures and volatile fields aside).
    digest: u64,
    /// Digest of its figures.
    figures: u64,
    /// It says `Pending`.
    pending: bool,
    /// When this process wrote it (`None`: read from etcd).
    at: Option<Instant>,
    /// The revision of the term it was written under ([`Term::rev`]); 0 for
    /// this node's own keys, which need no election.
    term: i64,
    /// Its mod revision as written (0: not known).
    rev: i64,
}

impl Written {
    /// What is remembered of `v`.
    fn of(v: &Value, term: i64, rev: i64, at: Option<Instant>) -> Self {
        let (digest, figures) = digests(v);
        Self {
            digest,
            figures,
            pending: is_pending(v),
            at,
            term,
            rev,
        }
    }
}

/// A put, its key, and what the writer remembers of it once written.
type Put = (TxnOp, String, Written);

/// One transaction and what it changes in the writer's memory if it succeeds.
struct Job {
    txn: Txn,
    /// Key → what it holds afterwards (`None`: deleted). Its `rev` is filled
    /// from the transaction's revision.
    changes: Vec<(String, Option<Written>)>,
}

/// Writes status keys, remembering what it wrote.
pub struct StatusWriter {
    client: Client,
    keys: Keys,
    /// Key → what was last written there.
    written: Option<BTreeMap<String, Written>>,
    /// Scope → the term whose existing keys were adopted.
    adopted: BTreeMap<Scope, i64>,
    /// Keys whose `Pending` is held back, and since when it is.
    pending_since: BTreeMap<String, Instant>,
    /// When a held-back write is due (the next sync writes it).
    due: Option<Instant>,
    /// Hold young `Pending`s and recent figures back (off for the last
    /// write before the writer ends).
    hold: bool,
}

/// The scope of a vfolder status value: its volume's, or the cluster's for
/// a `Rejected` one that names none (a malformed record). A value written
/// before statuses named their volume belongs to no one until its volume's
/// leader writes it again.
fn scope_of(v: &Value) -> Option<Scope> {
    match v.get("volume").and_then(Value::as_str) {
        Some(vol) => Some(Scope::Volume(vol.to_string())),
        None if v.get("state").and_then(Value::as_str) == Some("Rejected") => Some(Scope::Cluster),
        None => None,
    }
}

impl StatusWriter {
    /// A writer for this node.
    pub fn new(client: Client, keys: Keys) -> Self {
        Self {
            client,
            keys,
            written: None,
            adopted: BTreeMap::new(),
            pending_since: BTreeMap::new(),
            due: None,
            hold: true,
        }
    }

    /// When a write held back by the last sync is due: a `Pending` older
    /// than [`PENDING_GRACE`], or figures older than [`FIGURES_EVERY`].
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Every key under `prefix` whose value parses, with its mod revision.
    async fn read_prefix(&self, prefix: &str) -> Result<Vec<(String, Value, i64)>, StatusError> {
        let kvs = crate::etcd::get_prefix(&self.client, prefix)
            .await
            .map_err(StatusError::LoadFailed)?;
        Ok(kvs
            .into_iter()
            .filter_map(|(k, v, rev)| Some((k, serde_yaml::from_slice::<Value>(&v).ok()?, rev)))
            .collect())
    }

    /// Loads what this node wrote before under its node subtree (and, with
    /// no election, the vfolder statuses naming it) so a restart rewrites
    /// nothing that is unchanged.
    async fn load(&mut self, elected: bool) -> Result<BTreeMap<String, Written>, StatusError> {
        let mut out = BTreeMap::new();
        let mut prefixes = vec![(self.keys.node_status_prefix(), false)];
        if !elected {
            prefixes.push((self.keys.vfolder_status_prefix(), true));
        }
        for (prefix, mine_only) in prefixes {
            for (k, v, rev) in self.read_prefix(&prefix).await? {
                if mine_only
                    && v.get("node").and_then(Value::as_str) != Some(self.keys.node.as_str())
                {
                    continue;
                }
                out.insert(k, Written::of(&v, 0, rev, None));
            }
        }
        Ok(out)
    }

    /// Follows what this node leads: forgets the keys of terms it lost
    /// (their new leader writes them; deleting them would be a second
    /// writer), and adopts the vfolder status keys of each new term as they
    /// are in etcd, so that an unchanged one is not rewritten and one whose
    /// vfolder is gone (its purge finished under the last leader) is deleted.
    async fn follow(
        &mut self,
        led: &Led,
        written: &mut BTreeMap<String, Written>,
    ) -> Result<(), StatusError> {
        written.retain(|_, w| w.term == 0 || led.terms().any(|(_, t)| t.rev == w.term));
        self.adopted
            .retain(|s, rev| led.term(s).is_some_and(|t| t.rev == *rev));
        let new: BTreeMap<Scope, i64> = led
            .terms()
            .filter(|(s, t)| self.adopted.get(*s) != Some(&t.rev))
            .map(|(s, t)| (s.clone(), t.rev))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let prefix = self.keys.vfolder_status_prefix();
        for (k, v, rev) in self.read_prefix(&prefix).await? {
            if let Some(term) = scope_of(&v).and_then(|s| new.get(&s)) {
                written.insert(k, Written::of(&v, *term, rev, None));
            }
        }
        self.adopted.extend(new);
        Ok(())
    }

    /// Makes etcd hold exactly `batch`'s entries (under this node's keys,
    /// and the vfolder keys of the terms it holds). Returns the number of
    /// keys written or deleted.
    pub async fn sync(&mut self, batch: &StatusBatch) -> Result<usize, StatusError> {
        let mut written = match self.written.take() {
            Some(w) => w,
            None => self.load(batch.led.is_some()).await?,
        };
        if let Some(led) = &batch.led {
            if let Err(e) = self.follow(led, &mut written).await {
                self.written = Some(written);
                return Err(e);
            }
        }
        let jobs = self.jobs(batch, &written);
        let n: usize = jobs.iter().map(|j| j.changes.len()).sum();
        // Several transactions in flight at once (each key is in one of
        // them, so their order does not matter): 10,000 kernels' statuses are
        // 79 round trips, which one at a time took most of a teardown.
        use futures::StreamExt;
        let results: Vec<(Job, Result<Option<i64>, etcd_client::Error>)> =
            futures::stream::iter(jobs)
                .map(|job| {
                    let mut client = self.client.clone();
                    async move {
                        let r = client.txn(job.txn.clone()).await.map(|r| {
                            let rev = r.header().map_or(0, |h| h.revision());
                            r.succeeded().then_some(rev)
                        });
                        (job, r)
                    }
                })
                .buffer_unordered(TXNS_IN_FLIGHT)
                .collect()
                .await;
        let mut result = Ok(n);
        for (job, r) in results {
            match r {
                // Written: remembered.
                Ok(Some(rev)) => {
                    for (k, w) in job.changes {
                        match w {
                            Some(w) => written.insert(k, Written { rev, ..w }),
                            None => written.remove(&k),
                        };
                    }
                }
                // A guard failed: the term is over (the elector will say
                // so), or another node wrote the key since. Nothing written;
                // a key that was to go is not this node's to delete (any
                // more): forgotten, not tried again.
                Ok(None) => {
                    tracing::debug!("a guarded status write found its term over");
                    for (k, w) in job.changes {
                        if w.is_none() {
                            written.remove(&k);
                        }
                    }
                }
                Err(e) => result = Err(StatusError::WriteFailed(e)),
            }
        }
        self.written = Some(written);
        result
    }

    /// The transactions that make etcd hold `batch`.
    fn jobs(&mut self, batch: &StatusBatch, written: &BTreeMap<String, Written>) -> Vec<Job> {
        let now = chrono_now();
        let at = Instant::now();
        let mut held = BTreeMap::new();
        self.due = None;
        let vfolders = self.keys.vfolder_status_prefix();
        // Term revision (0: no guard) → its term and puts.
        let mut puts: BTreeMap<i64, (Option<&Term>, Vec<Put>)> = BTreeMap::new();
        for (k, v) in batch.entries.iter() {
            let term = match &batch.led {
                Some(led) if k.starts_with(&vfolders) => {
                    match scope_of(v).and_then(|s| led.term(&s)) {
                        Some(t) => Some(t),
                        None => continue, // another node's to write
                    }
                }
                _ => None,
            };
            let w = Written::of(v, term.map_or(0, |t| t.rev), 0, Some(at));
            let old = written.get(k);
            let hold = match old {
                Some(o) if o.digest == w.digest && o.term == w.term => {
                    // The same meaning: written again only for figures, and
                    // not more often than every FIGURES_EVERY.
                    match o.at {
                        _ if o.figures == w.figures => continue,
                        Some(t) if at < t + FIGURES_EVERY => Some(t + FIGURES_EVERY),
                        _ => None,
                    }
                }
                // A new `Pending`: held back while it is young.
                _ if w.pending && !batch.prompt && old.is_none_or(|o| !o.pending) => {
                    let since = self.pending_since.get(k).copied().unwrap_or(at);
                    held.insert(k.clone(), since);
                    (at < since + PENDING_GRACE).then_some(since + PENDING_GRACE)
                }
                _ => None,
            };
            if let Some(due) = hold.filter(|_| self.hold) {
                self.due = Some(self.due.map_or(due, |d| d.min(due)));
                continue;
            }
            tracing::trace!(key = %k, "status put");
            let mut v = Value::clone(v);
            if let Value::Object(m) = &mut v {
                m.insert("since".into(), Value::String(now.clone()));
            }
            let op = TxnOp::put(k.as_str(), serde_json::to_vec(&v).expect("json"), None);
            let group = puts.entry(w.term).or_insert((term, Vec::new()));
            group.1.push((op, k.clone(), w));
        }
        let mut jobs = Vec::new();
        for (term, ops) in puts.into_values() {
            let room = MAX_TXN_OPS - usize::from(term.is_some());
            for chunk in ops.chunks(room) {
                // etcd-client panics on `when` after `and_then`.
                let guard: Vec<Compare> = term.iter().map(|t| t.compare()).collect();
                let ops: Vec<TxnOp> = chunk.iter().map(|c| c.0.clone()).collect();
                jobs.push(Job {
                    txn: Txn::new().when(guard).and_then(ops),
                    changes: chunk.iter().map(|c| (c.1.clone(), Some(c.2))).collect(),
                });
            }
        }
        self.pending_since = held;
        jobs.extend(self.deletions(batch, written));
        jobs
    }

    /// Deletes the keys written before that `batch` no longer holds: this
    /// node's own in batches; a vfolder's alone, guarded by its term and by
    /// its revision (a key another node wrote since is not this node's).
    fn deletions(&self, batch: &StatusBatch, written: &BTreeMap<String, Written>) -> Vec<Job> {
        let gone = written
            .iter()
            .filter(|(k, _)| !batch.entries.contains_key(*k));
        let mut plain = Vec::new();
        let mut jobs = Vec::new();
        for (k, w) in gone {
            let term = batch
                .led
                .as_ref()
                .and_then(|led| led.terms().find(|(_, t)| t.rev == w.term).map(|(_, t)| t));
            match (w.term, term) {
                (0, _) => plain.push(k.clone()),
                (_, Some(t)) => {
                    let mut when = vec![t.compare()];
                    if w.rev > 0 {
                        when.push(Compare::mod_revision(k.as_str(), CompareOp::Equal, w.rev));
                    }
                    jobs.push(Job {
                        txn: Txn::new()
                            .when(when)
                            .and_then([TxnOp::delete(k.as_str(), None)]),
                        changes: vec![(k.clone(), None)],
                    });
                }
                (_, None) => {} // forgotten by `follow`
            }
        }
        for chunk in plain.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.as_str(), None))
                .collect();
            jobs.push(Job {
                txn: Txn::new().and_then(ops),
                changes: chunk.iter().map(|k| (k.clone(), None)).collect(),
            });
        }
        jobs
    }
}

/// The status values a pass wants etcd to hold.
pub type StatusEntries = Arc<BTreeMap<String, Arc<Value>>>;

/// What the writer is handed: the statuses, and what the node leads (under
/// whose terms the shared vfolder status keys are written).
#[derive(Debug, Clone, Default)]
pub struct StatusBatch {
    /// Key → value.
    pub entries: StatusEntries,
    /// `None`: no election (a node alone, or an agent).
    pub led: Option<Arc<Led>>,
    /// Write its `Pending` states at once (a volume mount is starting),
    /// rather than only once they outlast [`PENDING_GRACE`].
    pub prompt: bool,
}

/// Writes the latest report in the background, so a slow or unreachable etcd
/// never stalls the reconcile loop. Reports that arrive while a write is in
/// flight are coalesced (only the newest is written); a failed write is
/// retried with backoff. Returns once the sender is dropped and the last
/// report is written (or could not be).
pub async fn run_status_writer(
    mut writer: StatusWriter,
    mut rx: tokio::sync::watch::Receiver<StatusBatch>,
    written: impl Fn(usize, Duration) + Send,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        // A new report, or the time a write held back is due.
        let closed = match writer.due() {
            Some(due) => tokio::select! {
                r = rx.changed() => r.is_err(),
                () = tokio::time::sleep_until(due) => false,
            },
            None => rx.changed().await.is_err(),
        };
        if closed {
            // The last report, held-back parts included.
            if writer.due().is_some() {
                writer.hold = false;
                let last = rx.borrow().clone();
                let t = Instant::now();
                if let Ok(n) = writer.sync(&last).await {
                    written(n, t.elapsed());
                }
            }
            return;
        }
        loop {
            let entries = rx.borrow_and_update().clone();
            let t = Instant::now();
            match writer.sync(&entries).await {
                Ok(n) => {
                    tracing::trace!(written = n, held_until = ?writer.due(), "status synced");
                    written(n, t.elapsed());
                    delay = Duration::from_millis(200);
                    break;
                }
                Err(e) => {
                    crate::state::endpoints::suspect();
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

/// Which lease the liveness key lives under.
pub enum LivenessLease {
    /// One of its own, of this TTL in seconds, kept alive here (an agent).
    Own(i64),
    /// The storage node's leadership lease, kept alive by the elector
    /// ([`crate::state::election::Elections::lease`]): one lease per node.
    Shared(tokio::sync::watch::Receiver<Option<i64>>),
}

/// Keeps `P/status/nodes/<node>` alive under a lease while vfolderd runs.
/// The lease's keep-alives are the heartbeat; the key is rewritten only
/// when its value changes (`value` is re-read at each keep-alive and when
/// `health` says readiness or the brake changed).
pub async fn run_liveness(
    client: Client,
    keys: Keys,
    lease: LivenessLease,
    value: impl Fn() -> Value + Send,
    health: Arc<crate::metrics::Health>,
) {
    match lease {
        LivenessLease::Own(ttl) => own_lease(client, keys, ttl, value, health).await,
        LivenessLease::Shared(rx) => shared_lease(client, keys, rx, value, health).await,
    }
}

/// Puts the key under each lease the elector holds, and again when its
/// value changes; a failed put is tried again every second. While the
/// elector holds no lease the key is gone with the last one: the node is
/// not live to anyone reading it, which is what it is.
async fn shared_lease(
    mut client: Client,
    keys: Keys,
    mut rx: tokio::sync::watch::Receiver<Option<i64>>,
    value: impl Fn() -> Value + Send,
    health: Arc<crate::metrics::Health>,
) {
    let mut last: Option<(i64, Value)> = None;
    loop {
        let lease = *rx.borrow_and_update();
        health.node_lease.set(lease);
        let mut retry = false;
        if let Some(lease) = lease {
            let v = value();
            if last.as_ref() != Some(&(lease, v.clone())) {
                let body = serde_json::to_vec(&v).expect("json");
                let opts = Some(PutOptions::new().with_lease(lease));
                match client.put(keys.node_status(), body, opts).await {
                    Ok(_) => last = Some((lease, v)),
                    Err(e) => {
                        retry = true;
                        tracing::debug!(error = %crate::error::error_chain(&StatusError::LeaseFailed(e)), "node liveness key; retried in 1 s");
                    }
                }
            }
        }
        let again = async {
            match retry {
                true => tokio::time::sleep(Duration::from_secs(1)).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = health.changed.notified() => {}
            () = again => {}
        }
    }
}

/// Grants and keeps a lease of its own. A keep-alive goes a tick (`ttl / 3`)
/// after the last one's answer, or after waiting a tick for it in vain (etcd's
/// own client, too, asks again without an answer). Behind a grpc-proxy at
/// 4,000 nodes an answer can be late or never come, and a loop that waited
/// for each one before asking again kept only ~2,400 of 4,000 liveness
/// keys, where this one kept them all (BENCHMARKS.md). The
/// lease is taken as renewed when an answer arrives, whenever that is (an
/// answer that came after its wait ended is read before the lease is
/// judged gone); a lease that in fact ended says so at the next answer
/// (`ttl` 0), and only then, or when no answer came for a whole TTL, or the
/// stream broke, is a new lease granted. A failed put keeps the lease too.
async fn own_lease(
    mut client: Client,
    keys: Keys,
    ttl: i64,
    value: impl Fn() -> Value + Send,
    health: Arc<crate::metrics::Health>,
) {
    let tick = Duration::from_secs((ttl as u64 / 3).max(1));
    let ttl_time = Duration::from_secs(ttl.max(1) as u64);
    loop {
        let lease = match client.lease_grant(ttl, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::debug!(error = %crate::error::error_chain(&StatusError::LeaseFailed(e)), "node lease");
                tokio::time::sleep(tick).await;
                continue;
            }
        };
        let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else {
            tokio::time::sleep(tick).await;
            continue;
        };
        health.node_lease.set(Some(lease));
        let mut last: Option<Value> = None;
        let mut next_keep_alive = Instant::now();
        let mut renewed = Instant::now();
        let why = loop {
            if let Err(why) = read_late_answers(&mut stream, &mut renewed).await {
                break why;
            }
            if renewed.elapsed() >= ttl_time {
                break "no keep-alive answer for a whole TTL";
            }
            let v = value();
            if last.as_ref() != Some(&v) {
                let body = serde_json::to_vec(&v).expect("json");
                let opts = Some(PutOptions::new().with_lease(lease));
                match client.put(keys.node_status(), body, opts).await {
                    Ok(_) => last = Some(v),
                    Err(e) => {
                        tracing::debug!(error = %crate::error::error_chain(&StatusError::LeaseFailed(e)), "node liveness key; retried at the next keep-alive");
                    }
                }
            }
            if Instant::now() >= next_keep_alive {
                if keeper.keep_alive().await.is_err() {
                    break "the keep-alive stream broke";
                }
                match tokio::time::timeout(tick, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = Instant::now(),
                    Err(_) => {} // no answer yet: the lease holds; asked again
                    Ok(Ok(Some(_))) => break "etcd says the lease expired",
                    Ok(_) => break "the keep-alive stream broke",
                }
                // A tick after the answer (or the wait) ended: the cadence
                // measured behind the proxy (BENCHMARKS.md). A slow answer
                // stretches it to at most two ticks, inside the TTL.
                next_keep_alive = Instant::now() + tick;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_keep_alive) => {}
                () = health.changed.notified() => {}
            }
        };
        health.node_lease.set(None);
        tracing::info!(
            lease = format!("{lease:x}"),
            why,
            "node liveness lease given up; granting another"
        );
    }
}

/// Reads the keep-alive answers already here (they came after their wait
/// ended): each renews the lease; a gone lease or a broken stream is an error.
async fn read_late_answers(
    stream: &mut etcd_client::LeaseKeepAliveStream,
    renewed: &mut Instant,
) -> Result<(), &'static str> {
    loop {
        // A zero timeout polls the answer once: ready, or not yet.
        match tokio::time::timeout(Duration::ZERO, stream.message()).await {
            Err(_) => return Ok(()),
            Ok(Ok(Some(r))) if r.ttl() > 0 => *renewed = Instant::now(),
            Ok(Ok(Some(_))) => return Err("etcd says the lease expired"),
            Ok(_) => return Err("the keep-alive stream broke"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::digests;
    use serde_json::json;

    fn digest(v: &serde_json::Value) -> u64 {
        digests(v).0
    }

    #[test]
    fn figures_are_digested_apart_from_the_meaning() {
        let a = json!({"state": "Mounted", "users": 2, "free_bytes": 10, "capacity_bytes": 20});
        let b = json!({"state": "Mounted", "users": 3, "free_bytes": 9, "capacity_bytes": 20});
        assert_eq!(digests(&a).0, digests(&b).0, "the same meaning");
        assert_ne!(digests(&a).1, digests(&b).1, "other figures");
        let c = json!({"state": "Stale", "users": 2, "free_bytes": 10, "capacity_bytes": 20});
        assert_ne!(digests(&a).0, digests(&c).0);
        assert_eq!(digests(&a).1, digests(&c).1);
        let unused =
            json!({"state": "Mounted", "users": 0, "free_bytes": 10, "capacity_bytes": 20});
        assert_ne!(digests(&a).0, digests(&unused).0, "no users at all is news");
    }

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
