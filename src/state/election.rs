//! Leadership among storage nodes, one election per volume (etcd's
//! election API).
//!
//! Several storage nodes may mount the same volume. Its directory work
//! (create, trash, restore, purge, clone, scan) and its vfolders' statuses
//! must each have one author, or two nodes purge the same trash and write
//! the same status keys. Every storage node campaigns, under one lease of its
//! own, for each volume it serves; the winner holds a [`Term`]: its election
//! key and that key's creation revision.
//!
//! - Status writes compare the term's revision in their transaction, so etcd
//!   refuses a deposed leader's write.
//! - Directory work cannot be refused by etcd, so a leader fences itself: once
//!   its last acknowledged keep-alive was *sent* more than half a TTL ago, it
//!   starts no directory operation ([`Elections::may_act`]). The lease, and so
//!   the term, outlives that moment by at least another half TTL, and only
//!   then can another node win.
//! - Work in progress needs no hand-over: the directories are the journal
//!   (see [`crate::lifecycle`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::keys::Keys;

/// TTL of the leadership lease, in seconds: another storage node takes a
/// volume over at most this long after its leader's last keep-alive.
pub const LEASE_TTL: i64 = 10;

/// Keep-alives per TTL: one lost or slow answer does not fence the leader.
const KEEPALIVES_PER_TTL: u32 = 4;

/// Errors holding a leadership lease (each ends the lease's use: the node
/// leads nothing until it holds a new one).
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// etcd refused or did not answer a lease call.
    #[error("leadership lease call failed")]
    Lease(#[source] etcd_client::Error),
    /// etcd says the lease is gone (it expired: no keep-alive reached it in time).
    #[error("leadership lease expired")]
    Expired,
    /// The keep-alive stream ended.
    #[error("leadership lease keep-alive stream closed")]
    StreamClosed,
}

/// What one election decides.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The statuses of vfolder records that name no volume (malformed ones).
    Cluster,
    /// One volume's vfolder directories and statuses.
    Volume(String),
}

impl Scope {
    /// Its election's name (etcd puts each candidate at `<name>/<lease>`).
    pub fn election(&self, keys: &Keys) -> String {
        match self {
            Scope::Cluster => keys.cluster_election(),
            Scope::Volume(v) => keys.volume_election(v),
        }
    }
}

/// One won election: the leader key and its creation revision (what a
/// transaction compares to prove the leadership still holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// `<election>/<lease id in hex>`.
    pub key: Vec<u8>,
    /// The key's creation revision.
    pub rev: i64,
}

impl Term {
    /// The transaction guard: true while this term holds.
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.rev)
    }
}

/// What this node leads, as one snapshot (a new one at every change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Led {
    terms: BTreeMap<Scope, Term>,
    /// Grows at every change: a cheap "did it change" for caches.
    pub version: u64,
}

impl Led {
    /// The term held for `scope`.
    pub fn term(&self, scope: &Scope) -> Option<&Term> {
        self.terms.get(scope)
    }
    /// Whether this node leads `volume`.
    pub fn volume(&self, volume: &str) -> bool {
        self.terms.contains_key(&Scope::Volume(volume.to_string()))
    }
    /// Whether this node leads the cluster scope.
    pub fn cluster(&self) -> bool {
        self.terms.contains_key(&Scope::Cluster)
    }
    /// Every held term.
    pub fn terms(&self) -> impl Iterator<Item = (&Scope, &Term)> {
        self.terms.iter()
    }
    /// The same, without the volumes `keep` refuses (the cluster scope stays).
    pub fn only(&self, keep: impl Fn(&str) -> bool) -> Self {
        let terms = self
            .terms
            .iter()
            .filter(|(s, _)| match s {
                Scope::Cluster => true,
                Scope::Volume(v) => keep(v),
            })
            .map(|(s, t)| (s.clone(), t.clone()))
            .collect();
        Self {
            terms,
            version: self.version,
        }
    }

    /// A snapshot leading exactly `terms` (tests).
    pub fn of(terms: impl IntoIterator<Item = (Scope, Term)>) -> Self {
        Self {
            terms: terms.into_iter().collect(),
            version: 1,
        }
    }
}

/// Leadership as the node's parts share it: the elector writes it; the pass,
/// the lifecycle worker and the status writer read it.
pub struct Elections {
    inner: Mutex<Inner>,
    ttl: Duration,
    wanted_changed: Notify,
    /// Where the lease id is kept: a restarted daemon (kill -9, upgrade)
    /// resumes its lease, and so its terms, instead of waiting a TTL for
    /// its own last lease to expire before anyone leads its volumes.
    lease_file: Option<std::path::PathBuf>,
    /// The lease held now: a storage node's liveness key lives under it
    /// too (one lease, one keep-alive stream per node).
    lease: tokio::sync::watch::Sender<Option<i64>>,
}

#[derive(Default)]
struct Inner {
    wanted: BTreeSet<Scope>,
    led: Arc<Led>,
    /// When the last acknowledged keep-alive was sent.
    renewed: Option<Instant>,
}

impl Elections {
    /// Shared state for a lease of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            ttl,
            wanted_changed: Notify::new(),
            lease_file: None,
            lease: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Keeps the lease id in `file` (the node's private state directory).
    pub fn with_lease_file(mut self, file: std::path::PathBuf) -> Self {
        self.lease_file = Some(file);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volumes this node serves (mounted and answering); it campaigns
    /// for each, and for the cluster scope.
    pub fn want(&self, volumes: impl IntoIterator<Item = String>) {
        let wanted: BTreeSet<Scope> = volumes
            .into_iter()
            .map(Scope::Volume)
            .chain([Scope::Cluster])
            .collect();
        let mut i = self.lock();
        if i.wanted != wanted {
            i.wanted = wanted;
            drop(i);
            self.wanted_changed.notify_one();
        }
    }

    /// The lease held now (`None` between a lost lease and the next),
    /// changes included.
    pub fn lease(&self) -> tokio::sync::watch::Receiver<Option<i64>> {
        self.lease.subscribe()
    }

    /// What this node leads now.
    pub fn led(&self) -> Arc<Led> {
        self.lock().led.clone()
    }

    /// Whether the lease was renewed too long ago for directory work to be
    /// safe (see the module doc).
    pub fn fenced(&self) -> bool {
        let renewed = self.lock().renewed;
        renewed.is_none_or(|r| r.elapsed() > self.ttl / 2)
    }

    /// Whether directory work on `volume` may start now.
    pub fn may_act(&self, volume: &str) -> bool {
        !self.fenced() && self.led().volume(volume)
    }

    /// Whether `term` of `scope` is still held.
    pub fn holds(&self, scope: &Scope, term: &Term) -> bool {
        self.lock().led.term(scope) == Some(term)
    }

    fn renewed(&self, sent: Instant) {
        let mut i = self.lock();
        i.renewed = Some(i.renewed.map_or(sent, |r| r.max(sent)));
    }

    fn set(&self, change: impl FnOnce(&mut BTreeMap<Scope, Term>)) {
        let mut i = self.lock();
        let mut led = Led::clone(&i.led);
        change(&mut led.terms);
        if led.terms != i.led.terms {
            led.version += 1;
            i.led = Arc::new(led);
        }
    }

    fn wanted(&self) -> BTreeSet<Scope> {
        self.lock().wanted.clone()
    }
}

/// What a campaign reports to the lease holder.
enum Event {
    Won(Term),
    Lost,
}

/// A campaign's channel to the lease holder, its events tagged with its number.
struct Reporter {
    tx: mpsc::UnboundedSender<(Scope, u64, Event)>,
    id: u64,
}

impl Reporter {
    fn send(&self, scope: Scope, event: Event) -> Result<(), ()> {
        self.tx.send((scope, self.id, event)).map_err(drop)
    }
}

/// Runs forever: holds a lease, campaigns for every wanted scope under it,
/// and when the lease is lost, drops every term and starts over. `wake`
/// runs at every change of what the node leads.
pub async fn run_elections(
    client: Client,
    keys: Keys,
    el: Arc<Elections>,
    wake: impl Fn() + Send + Sync + 'static,
) {
    let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(wake);
    // Restarted after a panic: nothing held before counts (its lease is no
    // longer kept alive).
    el.set(|t| t.clear());
    el.lock().renewed = None;
    el.lease.send_replace(None);
    let mut delay = Duration::from_millis(500);
    loop {
        let sent = Instant::now();
        if let Some((lease, left)) = resumable(&client, &el).await {
            tracing::info!(
                lease = format!("{lease:x}"),
                "resuming the last leadership lease"
            );
            // It ends `left` from now, as if renewed `TTL - left` ago.
            let ttl = Duration::from_secs(LEASE_TTL as u64);
            if let Some(at) = sent.checked_sub(ttl.saturating_sub(left)) {
                el.renewed(at);
            }
            el.lease.send_replace(Some(lease));
            let ended = hold_lease(&client, &keys, &el, lease, &wake).await;
            lease_lost(&client, &el, lease, &ended, &*wake).await;
            continue;
        }
        let lease = match client.lease_client().grant(LEASE_TTL, None).await {
            Ok(r) => r.id(),
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&ElectionError::Lease(e)), retry_in = ?delay, "no leadership lease: leading no volume");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        delay = Duration::from_millis(500);
        el.renewed(sent);
        el.lease.send_replace(Some(lease));
        if let Some(f) = &el.lease_file {
            if let Err(e) = std::fs::write(f, format!("{lease}\n")) {
                tracing::warn!(file = %f.display(), error = %e, "cannot keep the leadership lease id");
            }
        }
        let ended = hold_lease(&client, &keys, &el, lease, &wake).await;
        lease_lost(&client, &el, lease, &ended, &*wake).await;
    }
}

/// Drops every term and frees the lease's candidacies.
async fn lease_lost(
    client: &Client,
    el: &Elections,
    lease: i64,
    ended: &ElectionError,
    wake: &(dyn Fn() + Send + Sync),
) {
    el.set(|t| t.clear());
    el.lease.send_replace(None);
    wake();
    tracing::warn!(error = %crate::error::error_chain(ended), "leadership lease lost: no directory work until this node leads again");
    if let Some(f) = &el.lease_file {
        let _ = std::fs::remove_file(f);
    }
    // Frees this node's candidacies at once (best effort: etcd may be gone).
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_client().revoke(lease)).await;
}

/// The lease this node held before a restart, if etcd still has it: its
/// election keys are still there, and campaigning under it again takes
/// them up as they are (etcd's election finds its own key and keeps it).
async fn resumable(client: &Client, el: &Elections) -> Option<(i64, Duration)> {
    let f = el.lease_file.as_ref()?;
    let lease: i64 = std::fs::read_to_string(f).ok()?.trim().parse().ok()?;
    let r = client.lease_client().time_to_live(lease, None).await.ok()?;
    // Renewed at once below; a lease this close to its end is let go.
    (r.ttl() >= 2).then(|| (lease, Duration::from_secs(r.ttl() as u64)))
}

/// Keeps `lease` alive and runs the campaigns; returns why the lease ended.
async fn hold_lease(
    client: &Client,
    keys: &Keys,
    el: &Arc<Elections>,
    lease: i64,
    wake: &Arc<dyn Fn() + Send + Sync>,
) -> ElectionError {
    let (mut keeper, mut stream) = match client.lease_client().keep_alive(lease).await {
        Ok(x) => x,
        Err(e) => return ElectionError::Lease(e),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut campaigns: BTreeMap<Scope, Campaign> = BTreeMap::new();
    let mut tick = tokio::time::interval(el.ttl / KEEPALIVES_PER_TTL);
    // Answers come in order: each pairs with the oldest unanswered send.
    let mut sent: VecDeque<Instant> = VecDeque::new();
    loop {
        sync_campaigns(client, keys, el, lease, &mut campaigns, &tx);
        tokio::select! {
            _ = tick.tick() => {
                // No answer for a whole TTL: the lease is gone on etcd's side.
                if el.lock().renewed.is_none_or(|r| r.elapsed() > el.ttl) {
                    return ElectionError::Expired;
                }
                if sent.len() >= 2 * KEEPALIVES_PER_TTL as usize {
                    sent.pop_front(); // answers that never came
                }
                sent.push_back(Instant::now());
                if let Err(e) = keeper.keep_alive().await {
                    return ElectionError::Lease(e);
                }
            }
            answer = stream.message() => match answer {
                Ok(Some(r)) if r.ttl() > 0 => {
                    if let Some(at) = sent.pop_front() {
                        let was = el.fenced();
                        el.renewed(at);
                        if was && !el.fenced() {
                            wake(); // directory work skipped while fenced
                        }
                    }
                }
                Ok(Some(_)) => return ElectionError::Expired,
                Ok(None) => return ElectionError::StreamClosed,
                Err(e) => return ElectionError::Lease(e),
            },
            _ = el.wanted_changed.notified() => {}
            Some((scope, id, event)) = rx.recv() => {
                if campaigns.get(&scope).map(|c| c.1) != Some(id) {
                    continue; // from a campaign stopped since
                }
                match event {
                    Event::Won(term) => {
                        tracing::info!(scope = ?scope, rev = term.rev, "elected: this node does the directory work and writes the statuses");
                        el.set(|t| { t.insert(scope, term); });
                    }
                    Event::Lost => {
                        tracing::warn!(scope = ?scope, "leadership lost");
                        el.set(|t| { t.remove(&scope); });
                        campaigns.remove(&scope); // started again if still wanted
                    }
                }
                wake();
            }
        }
    }
}

/// A running campaign (or held term): dropping it stops it. Its number
/// tells its events from those of an earlier campaign for the same scope.
struct Campaign(tokio::task::JoinHandle<()>, u64);

impl Drop for Campaign {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a campaign per wanted scope; stops (and resigns) the others.
fn sync_campaigns(
    client: &Client,
    keys: &Keys,
    el: &Arc<Elections>,
    lease: i64,
    campaigns: &mut BTreeMap<Scope, Campaign>,
    tx: &mpsc::UnboundedSender<(Scope, u64, Event)>,
) {
    let wanted = el.wanted();
    let gone: Vec<Scope> = campaigns
        .keys()
        .filter(|s| !wanted.contains(s))
        .cloned()
        .collect();
    for scope in gone {
        campaigns.remove(&scope);
        el.set(|t| {
            t.remove(&scope);
        });
        // The candidacy's key is `<election>/<lease in hex>` (etcd's
        // election): deleted whether or not the campaign had reported a
        // win, or a won key nobody hears of would lead for ever.
        let key = format!("{}/{lease:x}", scope.election(keys));
        tracing::info!(scope = ?scope, "resigning: the volume is no longer served here");
        let mut kv = client.kv_client();
        tokio::spawn(async move {
            for _ in 0..10 {
                let txn = Txn::new()
                    .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                if kv.txn(txn).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    for scope in wanted {
        if let std::collections::btree_map::Entry::Vacant(slot) = campaigns.entry(scope) {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let scope = slot.key().clone();
            let task = tokio::spawn(campaign(
                client.clone(),
                scope.election(keys),
                keys.node.clone(),
                lease,
                scope,
                Reporter { tx: tx.clone(), id },
            ));
            slot.insert(Campaign(task, id));
        }
    }
}

/// Campaigns for one scope until elected, reports the term, then watches the
/// leader key and reports its loss.
async fn campaign(
    client: Client,
    name: String,
    node: String,
    lease: i64,
    scope: Scope,
    tx: Reporter,
) {
    let term = match client
        .election_client()
        .campaign(name.as_str(), node, lease)
        .await
        .map(|mut r| r.take_leader())
    {
        Ok(Some(l)) => Term {
            key: l.key().to_vec(),
            rev: l.rev(),
        },
        Ok(None) | Err(_) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(scope, Event::Lost);
            return;
        }
    };
    // The answer may come after the key lapsed: it must exist, as created.
    let Some(from) = still_held(&client, &term).await else {
        let _ = tx.send(scope, Event::Lost);
        return;
    };
    if tx.send(scope.clone(), Event::Won(term.clone())).is_err() {
        return;
    }
    watch_until_lost(&client, &term, from).await;
    let _ = tx.send(scope, Event::Lost);
}

/// The revision to watch from if `term`'s key exists as created; `None` if
/// it does not (or etcd does not answer: then nothing is known to hold).
async fn still_held(client: &Client, term: &Term) -> Option<i64> {
    let r = client.kv_client().get(term.key.clone(), None).await.ok()?;
    let kv = r.kvs().first()?;
    (kv.create_revision() == term.rev).then(|| r.header().map_or(0, |h| h.revision()) + 1)
}

/// Returns once `term`'s key is deleted (or can no longer be shown to exist).
async fn watch_until_lost(client: &Client, term: &Term, mut from: i64) {
    loop {
        let opts = WatchOptions::new().with_start_revision(from);
        if let Ok(mut events) = client
            .watch_client()
            .watch(term.key.clone(), Some(opts))
            .await
        {
            while let Ok(Some(r)) = events.message().await {
                if r.canceled() {
                    break;
                }
                if r.events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return;
                }
                from = r.header().map_or(from, |h| h.revision() + 1);
            }
        }
        // The watch broke (etcd restarted, compaction, a network cut): look
        // again. Until the key is shown to be there, it counts as held: the
        // fence, not this, stops directory work while etcd is unreachable.
        tokio::time::sleep(Duration::from_secs(1)).await;
        loop {
            match client.kv_client().get(term.key.clone(), None).await {
                Ok(r) => match r.kvs().first() {
                    Some(kv) if kv.create_revision() == term.rev => {
                        from = r.header().map_or(from, |h| h.revision() + 1);
                        break;
                    }
                    _ => return,
                },
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(rev: i64) -> Term {
        Term {
            key: format!("/p/leaders/volumes/a/{rev:x}").into_bytes(),
            rev,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_fences_itself_half_a_ttl_after_its_last_renewal_was_sent() {
        let el = Elections::new(Duration::from_secs(10));
        el.set(|t| {
            t.insert(Scope::Volume("a".into()), term(5));
        });
        assert!(!el.may_act("a"), "never renewed: fenced");
        el.renewed(Instant::now());
        assert!(el.may_act("a"));
        assert!(!el.may_act("b"), "b is not led");
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert!(el.may_act("a"));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!el.may_act("a"), "5.1 s after the last renewal was sent");
        // An older acknowledgement arriving late never moves it back.
        el.renewed(Instant::now() - Duration::from_secs(8));
        assert!(!el.may_act("a"));
        el.renewed(Instant::now());
        assert!(el.may_act("a"), "renewed again: the term still holds");
    }

    #[test]
    fn a_change_of_terms_is_a_new_version_and_no_change_is_none() {
        let el = Elections::new(Duration::from_secs(10));
        let v0 = el.led().version;
        el.set(|t| {
            t.insert(Scope::Volume("a".into()), term(5));
        });
        let v1 = el.led().version;
        assert!(v1 > v0);
        assert!(el.holds(&Scope::Volume("a".into()), &term(5)));
        assert!(
            !el.holds(&Scope::Volume("a".into()), &term(6)),
            "another term"
        );
        el.set(|t| {
            t.insert(Scope::Volume("a".into()), term(5));
        });
        assert_eq!(el.led().version, v1);
        el.set(|t| t.clear());
        assert!(!el.led().volume("a"));
        assert!(el.led().version > v1);
    }

    #[test]
    fn the_cluster_scope_is_always_wanted_and_a_change_wakes_the_elector() {
        let el = Elections::new(Duration::from_secs(10));
        el.want(["a".to_string()]);
        assert_eq!(
            el.wanted(),
            BTreeSet::from([Scope::Cluster, Scope::Volume("a".into())])
        );
        el.want(Vec::<String>::new());
        assert_eq!(el.wanted(), BTreeSet::from([Scope::Cluster]));
    }
}
