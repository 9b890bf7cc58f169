//! Per-object events: what happened to a kernel, volume or vfolder, why and
//! when — `P/events/<node>/<kind>/<name>/<seq>`, under the node's lease (a
//! node gone takes its events with it), at most [`PER_OBJECT`] per object,
//! readable with `etcdctl get --prefix` and shown by `vfolderd describe` and
//! the status page.
//!
//! An event is a change of an object's state that involves trouble: into
//! `Failed`, `Rejected`, `Stale` or `OverQuota`, or out of one of them, and
//! a volume mounted or unmounted. A kernel that goes from `Pending` to
//! `Ready` as planned writes no event: at 100,000 kernels the happy path
//! must cost etcd nothing more than its statuses.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keys::Keys;

/// Events kept per object in etcd (older ones are deleted).
pub const PER_OBJECT: usize = 10;
/// Events kept in memory for the status page.
const RECENT: usize = 50;
/// Events waiting for etcd; more are dropped (and counted).
const QUEUE: usize = 4096;

/// Whether an event is routine or needs a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// Things went as they should (a volume mounted, a failure cleared).
    Normal,
    /// Something failed or was refused.
    Warning,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// `kernel/<id>`, `volume/<name>` or `vfolder/<uuid>`.
    pub object: String,
    /// The object's record key (`P/nodes/<node>/kernels/<id>`, ...).
    pub key: String,
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The state it went into (`Failed`, `Mounted`, ...).
    pub reason: String,
    /// The state it left, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Why (the status's error, redacted as statuses are).
    pub message: String,
}

/// States that are trouble: entering or leaving one is an event.
fn troubled(state: &str) -> bool {
    matches!(state, "Failed" | "Rejected" | "Stale" | "OverQuota")
}

/// The event a status change from `old` to `new` makes, if any. `key` is
/// the status key; `keys` tells what object it is about.
pub fn of_change(keys: &Keys, key: &str, old: Option<&Value>, new: &Value) -> Option<Event> {
    let (object, record) = object_of(keys, key)?;
    let state = |v: &Value| v.get("state").and_then(Value::as_str).map(str::to_string);
    let to = state(new)?;
    let from = old.and_then(state);
    if from.as_deref() == Some(to.as_str()) {
        return None;
    }
    let volume_moved =
        object.starts_with("volume/") && (to == "Mounted" || from.as_deref() == Some("Mounted"));
    if !troubled(&to) && !from.as_deref().is_some_and(troubled) && !volume_moved {
        return None;
    }
    let message = new
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| match &from {
            Some(f) => format!("{f} → {to}"),
            None => to.clone(),
        });
    Some(Event {
        time: crate::state::status::chrono_now(),
        kind: if troubled(&to) {
            EventType::Warning
        } else {
            EventType::Normal
        },
        object,
        key: record,
        reason: to,
        from,
        message,
    })
}

/// `kernel/<id>`, `volume/<name>` or `vfolder/<uuid>` for a status key,
/// and the key of its record.
fn object_of(keys: &Keys, key: &str) -> Option<(String, String)> {
    let p = &keys.prefix;
    let mine = key.strip_prefix(&keys.node_status_prefix());
    if let Some(rest) = mine {
        let (dir, name) = rest.split_once('/')?;
        return match dir {
            "kernels" => Some((format!("kernel/{name}"), keys.kernels_prefix() + name)),
            "volumes" => Some((format!("volume/{name}"), format!("{p}/volumes/{name}"))),
            _ => None,
        };
    }
    let id = key.strip_prefix(&keys.vfolder_status_prefix())?;
    Some((format!("vfolder/{id}"), format!("{p}/vfolders/{id}")))
}

/// What the writer is asked to do.
#[derive(Debug)]
pub enum Order {
    /// Write an event.
    Write(Event),
    /// The object is gone (its status went): its events go too.
    Forget(String),
}

/// Where events go: the recent ones in memory, all of them to the writer.
pub struct EventLog {
    recent: Mutex<VecDeque<Event>>,
    tx: tokio::sync::mpsc::Sender<Order>,
    /// Events dropped because etcd fell behind.
    pub dropped: AtomicU64,
}

impl EventLog {
    /// A log and the writer's end of it.
    pub fn new() -> (Arc<Self>, tokio::sync::mpsc::Receiver<Order>) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let log = Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            tx,
            dropped: AtomicU64::new(0),
        };
        (Arc::new(log), rx)
    }

    /// Records `e` (logged, kept for the status page, queued for etcd).
    pub fn record(&self, e: Event) {
        match e.kind {
            EventType::Warning => {
                tracing::warn!(object = %e.object, key = %e.key, reason = %e.reason, detail = %e.message, "event")
            }
            EventType::Normal => {
                tracing::info!(object = %e.object, key = %e.key, reason = %e.reason, detail = %e.message, "event")
            }
        }
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(e.clone());
        }
        self.send(Order::Write(e));
    }

    /// The object whose status key `status_key` was has gone.
    pub fn forget(&self, keys: &Keys, status_key: &str) {
        if let Some((object, _)) = object_of(keys, status_key) {
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|e| e.object != object);
            self.send(Order::Forget(object));
        }
    }

    fn send(&self, o: Order) {
        if self.tx.try_send(o).is_err() {
            // etcd fell behind by a whole queue: said once per thousand.
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                tracing::warn!(dropped = n + 1, "events not written: etcd is behind");
            }
        }
    }

    /// The recent events, newest first.
    pub fn recent(&self) -> Vec<Event> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().rev().cloned().collect()
    }
}

/// The lease the node's liveness key is under (0: none yet), published by
/// the liveness task for the event writer.
#[derive(Debug, Default)]
pub struct NodeLease(AtomicI64);

impl NodeLease {
    /// The lease now, if there is one.
    pub fn get(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|l| *l != 0)
    }

    /// The lease changed.
    pub fn set(&self, lease: Option<i64>) {
        self.0.store(lease.unwrap_or(0), Ordering::Relaxed);
    }
}

/// `P/events/<node>/<kind>/<name>/<seq>`: `seq` is the time in
/// microseconds, zero-padded, so keys sort by time (and stay unique within
/// this node: at least one more than the last).
fn event_key(keys: &Keys, object: &str, seq: u64) -> String {
    format!("{}{object}/{seq:020}", keys.events_prefix())
}

/// Writes events to etcd in order, each under the node's lease, trimming
/// each object to its newest [`PER_OBJECT`] and deleting the events of
/// objects that went. Runs until the log is dropped.
pub async fn run_event_writer(
    mut client: Client,
    keys: Keys,
    mut rx: tokio::sync::mpsc::Receiver<Order>,
    health: Arc<crate::metrics::Health>,
) {
    let lease = &health.node_lease;
    // The keys written before (a restart keeps the cap), read once etcd answers.
    let mut kept: Option<HashMap<String, VecDeque<String>>> = None;
    let mut last_seq = 0u64;
    while let Some(order) = rx.recv().await {
        let lease = loop {
            match lease.get() {
                Some(l) => break l,
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        if kept.is_none() {
            kept = existing(&client, &keys).await;
        }
        // Until etcd said what it holds, this event is written uncounted
        // (and the next one asks again).
        let mut scratch = HashMap::new();
        let known = kept.as_mut().unwrap_or(&mut scratch);
        let ops = match order {
            Order::Write(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                last_seq = now.max(last_seq + 1);
                write_ops(&keys, known, &e, last_seq, lease)
            }
            Order::Forget(object) => {
                known.remove(&object);
                let prefix = format!("{}{object}/", keys.events_prefix());
                vec![TxnOp::delete(
                    prefix.as_str(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )]
            }
        };
        if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
            tracing::debug!(error = %crate::error::error_chain(&e), "event not written");
        }
    }
}

/// The put of `e` as `seq` under `lease`, and the deletes that keep its
/// object at [`PER_OBJECT`].
fn write_ops(
    keys: &Keys,
    known: &mut HashMap<String, VecDeque<String>>,
    e: &Event,
    seq: u64,
    lease: i64,
) -> Vec<TxnOp> {
    let key = event_key(keys, &e.object, seq);
    let body = serde_json::to_vec(e).expect("json");
    let queue = known.entry(e.object.clone()).or_default();
    queue.push_back(key.clone());
    let mut ops = vec![TxnOp::put(
        key.as_str(),
        body,
        Some(PutOptions::new().with_lease(lease)),
    )];
    while queue.len() > PER_OBJECT {
        if let Some(old) = queue.pop_front() {
            ops.push(TxnOp::delete(old.as_str(), None));
        }
    }
    ops
}

/// The event keys this node wrote before, by object (paged); `None` if
/// etcd did not answer (asked again with the next event).
async fn existing(client: &Client, keys: &Keys) -> Option<HashMap<String, VecDeque<String>>> {
    let prefix = keys.events_prefix();
    let all = crate::etcd::get_prefix(client, &prefix).await.ok()?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, _, _) in all {
        if let Some((object, _)) = key[prefix.len()..].rsplit_once('/') {
            out.entry(object.to_string()).or_default().push(key);
        }
    }
    Some(
        out.into_iter()
            .map(|(o, mut ks)| {
                ks.sort();
                (o, ks.into())
            })
            .collect(),
    )
}

/// An object's events as etcd holds them, oldest first (for `describe`).
pub async fn read(
    client: &mut Client,
    keys: &Keys,
    object: &str,
) -> Result<Vec<Event>, etcd_client::Error> {
    let prefix = format!("{}{object}/", keys.events_prefix());
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> Keys {
        Keys::new("/p", "n1")
    }

    #[test]
    fn trouble_and_its_end_are_events_and_the_happy_path_is_not() {
        let k = keys();
        let kernel = k.kernel_status("k1");
        let ready = json!({"state": "Ready"});
        let pending = json!({"state": "Pending"});
        assert_eq!(of_change(&k, &kernel, Some(&pending), &ready), None);
        assert_eq!(of_change(&k, &kernel, None, &pending), None);
        let failed = json!({"state": "Failed", "error": "mount error(112)"});
        let e = of_change(&k, &kernel, Some(&pending), &failed).unwrap();
        assert_eq!(
            (
                e.object.as_str(),
                e.kind,
                e.reason.as_str(),
                e.message.as_str()
            ),
            (
                "kernel/k1",
                EventType::Warning,
                "Failed",
                "mount error(112)"
            )
        );
        let e = of_change(&k, &kernel, Some(&failed), &ready).unwrap();
        assert_eq!(
            (e.kind, e.from.as_deref()),
            (EventType::Normal, Some("Failed"))
        );
        assert_eq!(of_change(&k, &kernel, Some(&failed), &failed), None);
        let vol = k.volume_status("data");
        let mounted = json!({"state": "Mounted"});
        assert!(of_change(&k, &vol, None, &mounted).is_some());
        let vf = format!("{}{}", k.vfolder_status_prefix(), "abc");
        assert_eq!(
            of_change(&k, &vf, Some(&ready), &json!({"state": "OverQuota"}))
                .unwrap()
                .object,
            "vfolder/abc"
        );
        assert_eq!(of_change(&k, "/p/elsewhere", None, &failed), None);
    }
}
