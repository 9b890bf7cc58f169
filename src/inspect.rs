//! `vfolderd get` and `vfolderd describe`: kubectl-like reads of what etcd
//! says an object should be (its record, secrets redacted) and what the
//! nodes say it is (its statuses), with the chain of reasons a kernel is
//! not `Ready`. They read etcd only, so they work whether the daemon runs
//! or not, from any machine with the node's config.

use std::collections::BTreeMap;
use std::fmt::Write;

use etcd_client::Client;
use serde::Serialize;
use serde_json::Value;

mod watch;
pub use watch::watch;

use crate::cli::{connect, CliError};
use crate::config::NodeConfig;
use crate::keys::Keys;

/// What to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Kernels (`P/nodes/<node>/kernels/<id>`).
    #[value(alias = "kernel")]
    Kernels,
    /// Volumes (`P/volumes/<name>`), with each node's status.
    #[value(alias = "volume")]
    Volumes,
    /// vfolders (`P/vfolders/<uuid>`).
    #[value(alias = "vfolder")]
    Vfolders,
}

/// How to print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// More columns.
    Wide,
    /// One JSON array.
    Json,
    /// One YAML list.
    Yaml,
}

/// Which nodes' kernels and statuses to read.
#[derive(Debug, Clone)]
pub enum Nodes {
    /// One node.
    One(String),
    /// Every node.
    All,
}

/// One object as etcd has it: its record (redacted) and one status.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// `kernel`, `volume` or `vfolder`.
    pub kind: &'static str,
    /// Its id or name.
    pub name: String,
    /// The node the status (and for a kernel, the record) is of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The record, secrets replaced by `***`; `None` if there is none.
    pub desired: Option<Value>,
    /// The status; `None` if nobody wrote one.
    pub status: Option<Value>,
}

/// `vfolderd get KIND`.
pub async fn get(
    cfg: &NodeConfig,
    kind: Kind,
    nodes: &Nodes,
    out: Output,
) -> Result<String, CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let items = read(&mut client, &keys, kind, nodes).await?;
    render(kind, &items, out)
}

/// Reads every `kind` object (of `nodes`) with its statuses.
pub async fn read(
    client: &mut Client,
    keys: &Keys,
    kind: Kind,
    nodes: &Nodes,
) -> Result<Vec<Item>, CliError> {
    let p = &keys.prefix;
    let one = match nodes {
        Nodes::One(n) => Some(n.as_str()),
        Nodes::All => None,
    };
    let node_prefix = |what: &str| match nodes {
        Nodes::One(n) => format!("{p}/{what}/{n}/"),
        Nodes::All => format!("{p}/{what}/"),
    };
    Ok(match kind {
        Kind::Kernels => {
            let desired = list(client, &node_prefix("nodes")).await?;
            let status = list(client, &node_prefix("status/nodes")).await?;
            join_kernels(desired, status, one)
        }
        Kind::Volumes => {
            let desired = list(client, &format!("{p}/volumes/")).await?;
            let status = list(client, &node_prefix("status/nodes")).await?;
            join_volumes(desired, status, one)
        }
        Kind::Vfolders => {
            let desired = list(client, &format!("{p}/vfolders/")).await?;
            let status = list(client, &format!("{p}/status/vfolders/")).await?;
            join_by_name(desired, status, "vfolder")
        }
    })
}

/// Key (after `prefix`) → value, for every key under `prefix` (paged).
async fn list(client: &mut Client, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, CliError> {
    Ok(crate::etcd::get_prefix(client, prefix)
        .await?
        .into_iter()
        .filter_map(|(k, v, _)| Some((k.strip_prefix(prefix)?.to_string(), v)))
        .collect())
}

/// Kernels: desired `<node>/kernels/<id>` (`kernels/<id>` when read for
/// one node, `node`) beside the statuses at the same place.
fn join_kernels(
    desired: BTreeMap<String, Vec<u8>>,
    status: BTreeMap<String, Vec<u8>>,
    node: Option<&str>,
) -> Vec<Item> {
    let mut out: BTreeMap<(Option<String>, String), Item> = BTreeMap::new();
    for (key, value) in &desired {
        if let Some(at) = place(key, "kernels", node) {
            slot(&mut out, "kernel", at).desired = Some(redacted_yaml(value));
        }
    }
    for (key, value) in &status {
        if let Some(at) = place(key, "kernels", node) {
            slot(&mut out, "kernel", at).status = status_value(value);
        }
    }
    out.into_values().collect()
}

/// The node and name of `[<node>/]<dir>/<name>` (the node is `node` when
/// the key was read under one node's prefix).
fn place(key: &str, dir: &str, node: Option<&str>) -> Option<(Option<String>, String)> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        [d, name] if *d == dir => Some((node.map(str::to_string), name.to_string())),
        [n, d, name] if *d == dir && node.is_none() => {
            Some((Some(n.to_string()), name.to_string()))
        }
        _ => None,
    }
}

fn slot<'a>(
    out: &'a mut BTreeMap<(Option<String>, String), Item>,
    kind: &'static str,
    (node, name): (Option<String>, String),
) -> &'a mut Item {
    out.entry((node.clone(), name.clone()))
        .or_insert_with(|| Item {
            kind,
            name,
            node,
            desired: None,
            status: None,
        })
}

/// Volumes: one item per node that reports the volume, and one for a
/// volume no node reports.
fn join_volumes(
    desired: BTreeMap<String, Vec<u8>>,
    status: BTreeMap<String, Vec<u8>>,
    node: Option<&str>,
) -> Vec<Item> {
    let mut out = Vec::new();
    let mut reported: BTreeMap<String, Vec<(Option<String>, Value)>> = BTreeMap::new();
    for (key, value) in &status {
        let Some((node, name)) = place(key, "volumes", node) else {
            continue;
        };
        if let Some(v) = status_value(value) {
            reported.entry(name).or_default().push((node, v));
        }
    }
    for (name, value) in &desired {
        let record = Some(redacted_yaml(value));
        let statuses = reported.remove(name).unwrap_or_default();
        if statuses.is_empty() {
            out.push(Item {
                kind: "volume",
                name: name.clone(),
                node: None,
                desired: record.clone(),
                status: None,
            });
        }
        for (node, st) in statuses {
            out.push(Item {
                kind: "volume",
                name: name.clone(),
                node,
                desired: record.clone(),
                status: Some(st),
            });
        }
    }
    // Reported, but the record is gone (kept for a kernel, or unmounting).
    for (name, statuses) in reported {
        for (node, st) in statuses {
            out.push(Item {
                kind: "volume",
                name: name.clone(),
                node,
                desired: None,
                status: Some(st),
            });
        }
    }
    out
}

/// vfolders: record and status at the same uuid.
fn join_by_name(
    desired: BTreeMap<String, Vec<u8>>,
    status: BTreeMap<String, Vec<u8>>,
    kind: &'static str,
) -> Vec<Item> {
    let mut out: BTreeMap<(Option<String>, String), Item> = BTreeMap::new();
    for (name, value) in &desired {
        slot(&mut out, kind, (None, name.clone())).desired = Some(redacted_yaml(value));
    }
    for (name, value) in &status {
        slot(&mut out, kind, (None, name.clone())).status = status_value(value);
    }
    out.into_values().collect()
}

/// A record as JSON with every secret replaced: a value under a
/// secret-looking key, secret `k=v` pairs (a comma-separated option list
/// split on its commas, `user=name%password` too) and key-like runs, in
/// any string and any map key (inline cifs passwords exist in the wild,
/// and `{vers=3.0,password=x}` is a YAML map). A record that does not
/// parse is not shown at all: its text cannot be redacted reliably.
pub fn redacted_yaml(value: &[u8]) -> Value {
    match serde_yaml::from_slice::<Value>(value) {
        Ok(mut v) => {
            redact_value(&mut v);
            v
        }
        Err(_) => Value::String(format!("<unparsable record, {} bytes>", value.len())),
    }
}

/// A status value, redacted too (the daemon redacts what it writes; this
/// does not rely on it).
fn status_value(v: &[u8]) -> Option<Value> {
    let mut v = serde_json::from_slice(v).ok()?;
    redact_value(&mut v);
    Some(v)
}

/// Redacts every string and map key in `v`.
pub fn redact_value(v: &mut Value) {
    match v {
        Value::String(s) => *s = redact_text(s),
        Value::Array(a) => a.iter_mut().for_each(redact_value),
        Value::Object(m) => {
            let old = std::mem::take(m);
            for (k, mut x) in old {
                if crate::names::is_secret_key(&k.to_ascii_lowercase()) {
                    x = Value::String("***".into());
                } else {
                    redact_value(&mut x);
                }
                m.insert(redact_text(&k), x);
            }
        }
        _ => {}
    }
}

/// [`crate::names::redact`], after each comma-separated `k=v` part whose
/// key is secret had its whole value replaced (a password may hold `&`,
/// quotes or spaces, where the general rule stops), and a `user=name%pw`
/// part its password.
fn redact_text(s: &str) -> String {
    let parts: Vec<String> = s
        .split(',')
        .map(|part| {
            let Some((k, v)) = part.split_once('=') else {
                return part.to_string();
            };
            let key = k.trim().to_ascii_lowercase();
            if crate::names::is_secret_key(&key) {
                format!("{k}=***")
            } else if matches!(key.as_str(), "user" | "username") && v.contains('%') {
                let name = v.split('%').next().unwrap_or("");
                format!("{k}={name}%***")
            } else {
                part.to_string()
            }
        })
        .collect();
    crate::names::redact(&parts.join(","))
}

/// Prints `items` as asked.
pub fn render(kind: Kind, items: &[Item], out: Output) -> Result<String, CliError> {
    match out {
        Output::Json => Ok(serde_json::to_string_pretty(items)
            .map_err(|e| CliError::Invalid(e.to_string()))?
            + "\n"),
        Output::Yaml => serde_yaml::to_string(items).map_err(|e| CliError::Invalid(e.to_string())),
        Output::Table | Output::Wide => Ok(table(&rows(kind, items, out == Output::Wide))),
    }
}

/// A status field as text (`-` when absent).
fn field(it: &Item, name: &str) -> String {
    match it.status.as_ref().map(|s| &s[name]) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    }
}

/// A record field as text (`-` when absent).
fn record(it: &Item, path: &[&str]) -> String {
    let mut v = it.desired.as_ref();
    for p in path {
        v = v.and_then(|x| x.get(p));
    }
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    }
}

fn rows(kind: Kind, items: &[Item], wide: bool) -> Vec<Vec<String>> {
    let mut out = vec![columns(kind, wide)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>()];
    out.extend(items.iter().map(|it| cells(kind, it, wide)));
    out
}

/// The column names; the reason last (it is the long one).
fn columns(kind: Kind, wide: bool) -> Vec<&'static str> {
    let (mut head, more) = match kind {
        Kind::Kernels => (
            vec!["NODE", "KERNEL", "STATE", "MOUNTS", "AGE"],
            vec!["UID:GID", "TARGETS"],
        ),
        Kind::Volumes => (
            vec!["VOLUME", "FSTYPE", "AT", "NODE", "STATE", "USERS", "FREE"],
            vec!["CAPACITY", "SOURCE"],
        ),
        Kind::Vfolders => (
            vec!["UUID", "NAME", "OWNER", "VOLUME", "STATE", "BYTES"],
            vec!["QUOTA", "FILES", "KERNELS"],
        ),
    };
    if wide {
        head.extend(more);
    }
    head.push("REASON");
    head
}

/// One item's row, in the order of [`columns`].
fn cells(kind: Kind, it: &Item, wide: bool) -> Vec<String> {
    let node = it.node.clone().unwrap_or_else(|| "-".into());
    let (mut row, more) = match kind {
        Kind::Kernels => (
            vec![
                node,
                it.name.clone(),
                field(it, "state"),
                mounts(it),
                age(it),
            ],
            vec![
                format!("{}:{}", record(it, &["uid"]), record(it, &["gid"])),
                targets(it),
            ],
        ),
        Kind::Volumes => (
            vec![
                it.name.clone(),
                record(it, &["mount", "fstype"]),
                record(it, &["mount", "at"]),
                node,
                field(it, "state"),
                field(it, "users"),
                bytes(&field(it, "free_bytes")),
            ],
            vec![
                bytes(&field(it, "capacity_bytes")),
                record(it, &["mount", "path"]),
            ],
        ),
        Kind::Vfolders => (
            vec![
                it.name.clone(),
                record(it, &["name"]),
                record(it, &["owner"]),
                record(it, &["volume"]),
                field(it, "state"),
                bytes(&field(it, "bytes")),
            ],
            vec![
                bytes(&record(it, &["quota_bytes"])),
                field(it, "files"),
                kernels(it),
            ],
        ),
    };
    if wide {
        row.extend(more);
    }
    row.push(match (&it.desired, &it.status) {
        (None, _) => "no record".to_string(),
        (_, None) => "no status yet".to_string(),
        (_, Some(st)) => st["error"].as_str().unwrap_or("").to_string(),
    });
    row
}

/// `ready/total` mounts of a kernel's status.
fn mounts(it: &Item) -> String {
    let Some(m) = it.status.as_ref().and_then(|s| s["mounts"].as_array()) else {
        return "-".into();
    };
    let ready = m.iter().filter(|x| x["mounted"] == true).count();
    format!("{ready}/{}", m.len())
}

fn targets(it: &Item) -> String {
    let Some(m) = it.status.as_ref().and_then(|s| s["mounts"].as_array()) else {
        return "-".into();
    };
    let t: Vec<&str> = m.iter().filter_map(|x| x["target"].as_str()).collect();
    if t.is_empty() {
        "-".into()
    } else {
        t.join(",")
    }
}

fn kernels(it: &Item) -> String {
    match it.status.as_ref().and_then(|s| s["kernels"].as_array()) {
        Some(k) if !k.is_empty() => k
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// How long ago the status's `since` was, as `45s`, `12m`, `3h`, `2d`.
fn age(it: &Item) -> String {
    let Some(since) = it.status.as_ref().and_then(|s| s["since"].as_str()) else {
        return "-".into();
    };
    let Ok(t) = humantime::parse_rfc3339(since) else {
        return "-".into();
    };
    let s = std::time::SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs());
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Bytes as `1.5Gi` (the text as it is if it is not a number).
fn bytes(n: &str) -> String {
    let Ok(mut v) = n.parse::<f64>() else {
        return n.to_string();
    };
    for unit in ["", "Ki", "Mi", "Gi", "Ti"] {
        if v < 1024.0 {
            return if unit.is_empty() {
                format!("{v}")
            } else {
                format!("{v:.1}{unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{v:.1}Pi")
}

/// `rows` (the first is the header) as left-aligned columns, two spaces
/// apart, no trailing blanks, control characters shown as `?`.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
        }
        // A record's text may hold control characters: never to the terminal.
        let line: String = line
            .chars()
            .map(|ch| if ch.is_control() { '?' } else { ch })
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What `explain` finds about one object.
#[derive(Debug, Serialize)]
pub struct Explained {
    /// Its record and status(es).
    pub objects: Vec<Item>,
    /// Why it is not Ready or Mounted, following what it depends on.
    pub why: Vec<String>,
    /// What this node would do for it now (only for this node's objects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::reconcile::explain::PlanView>,
    /// Why there is no plan, if there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_unavailable: Option<String>,
}

/// `vfolderd explain KIND NAME`: the record, the status(es), why the object
/// is not what it should be (reading what it depends on), and — for this
/// node's objects — what the node would do for it now, backoffs included
/// (asked of the daemon, or planned here while it is stopped).
pub async fn explain(
    cfg: &NodeConfig,
    kind: Kind,
    name: &str,
    node: &str,
) -> Result<Explained, CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, node);
    let mut client = connect(cfg).await?;
    let objects: Vec<Item> = read_one(&mut client, &keys, kind, name).await?;
    if objects.is_empty() {
        return Err(CliError::Invalid(format!(
            "{} {name}: no record and no status",
            kind_name(kind)
        )));
    }
    let why = match kind {
        Kind::Kernels => why_kernel(&mut client, &keys, &objects[0]).await?,
        Kind::Volumes => objects.iter().flat_map(why_volume).collect(),
        Kind::Vfolders => why_vfolder(&mut client, &keys, &objects[0]).await?,
    };
    let (plan, plan_unavailable) = if node != cfg.node {
        (
            None,
            Some(format!(
                "plans are made on the node itself (run this on {node})"
            )),
        )
    } else {
        let object = match kind {
            Kind::Kernels => format!("kernel/{name}"),
            Kind::Volumes => format!("volume/{name}"),
            Kind::Vfolders => String::new(),
        };
        match crate::plancmd::plan(cfg, None).await {
            Ok(v) if kind == Kind::Vfolders => (Some(v.touching(name)), None),
            Ok(v) => (Some(v.only(&object)), None),
            Err(e) => (None, Some(crate::error::error_chain(&e))),
        }
    };
    Ok(Explained {
        objects,
        why,
        plan,
        plan_unavailable,
    })
}

/// `explain`'s findings as `out` says.
pub fn render_explained(e: &Explained, out: Output) -> Result<String, CliError> {
    match out {
        Output::Json => Ok(serde_json::to_string_pretty(e)
            .map_err(|e| CliError::Invalid(e.to_string()))?
            + "\n"),
        Output::Yaml => serde_yaml::to_string(e).map_err(|e| CliError::Invalid(e.to_string())),
        Output::Table | Output::Wide => Ok(explained_text(e)),
    }
}

fn explained_text(e: &Explained) -> String {
    let mut out = String::new();
    for it in &e.objects {
        header(&mut out, it);
    }
    out.push_str("Why:\n");
    if e.why.is_empty() {
        out.push_str("  nothing is in the way\n");
    }
    for line in &e.why {
        let _ = writeln!(out, "  - {line}");
    }
    out.push_str("Plan:\n");
    match (&e.plan, &e.plan_unavailable) {
        (Some(p), _) => {
            for line in crate::reconcile::explain::table(p).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "  unavailable: {why}");
        }
        (None, None) => {}
    }
    out
}

/// `vfolderd describe KIND NAME`: what `explain` says, then the object's
/// recent events.
pub async fn describe(
    cfg: &NodeConfig,
    kind: Kind,
    name: &str,
    node: &str,
) -> Result<String, CliError> {
    let e = explain(cfg, kind, name, node).await?;
    let mut out = explained_text(&e);
    // A vfolder's events are its storage node's (the one its status names).
    let writer = match kind {
        Kind::Vfolders => e
            .objects
            .first()
            .and_then(|it| it.status.as_ref())
            .and_then(|s| s["node"].as_str())
            .unwrap_or(node)
            .to_string(),
        _ => node.to_string(),
    };
    let keys = Keys::new(&cfg.etcd.prefix, &writer);
    let mut client = connect(cfg).await?;
    let object = format!("{}/{name}", kind_name(kind));
    let events = crate::state::events::read(&mut client, &keys, &object).await?;
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut rows = vec![["TIME", "TYPE", "REASON", "FROM", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        for ev in events {
            rows.push(vec![
                ev.time,
                format!("{:?}", ev.kind),
                ev.reason,
                ev.from.unwrap_or_else(|| "-".into()),
                redact_text(&ev.message),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    Ok(out)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Kernels => "kernel",
        Kind::Volumes => "volume",
        Kind::Vfolders => "vfolder",
    }
}

/// The object `name` of `kind` (a kernel or a volume: as `keys.node` has it).
async fn read_one(
    client: &mut Client,
    keys: &Keys,
    kind: Kind,
    name: &str,
) -> Result<Vec<Item>, CliError> {
    let p = &keys.prefix;
    let (record_key, status_key) = match kind {
        Kind::Kernels => (keys.kernels_prefix() + name, keys.kernel_status(name)),
        Kind::Volumes => (format!("{p}/volumes/{name}"), keys.volume_status(name)),
        Kind::Vfolders => (
            format!("{p}/vfolders/{name}"),
            format!("{p}/status/vfolders/{name}"),
        ),
    };
    let record = value(client, &record_key).await?;
    let status = value(client, &status_key).await?;
    if record.is_none() && status.is_none() {
        return Ok(Vec::new());
    }
    let node = (kind != Kind::Vfolders).then(|| keys.node.clone());
    Ok(vec![Item {
        kind: kind_name(kind),
        name: name.to_string(),
        node,
        desired: record.as_deref().map(redacted_yaml),
        status: status.as_deref().and_then(status_value),
    }])
}

/// One key's value, if it exists.
async fn value(client: &mut Client, key: &str) -> Result<Option<Vec<u8>>, CliError> {
    let resp = client.get(key, None).await?;
    Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
}

/// `Kind:`, `Name:`, ..., the record and the status, as YAML.
fn header(out: &mut String, it: &Item) {
    let _ = writeln!(out, "Kind:    {}", it.kind);
    let _ = writeln!(out, "Name:    {}", it.name);
    if let Some(n) = &it.node {
        let _ = writeln!(out, "Node:    {n}");
    }
    let state = field(it, "state");
    let _ = writeln!(out, "State:   {state} (for {})", age(it));
    if let Some(e) = it.status.as_ref().and_then(|s| s["error"].as_str()) {
        let _ = writeln!(out, "Reason:  {e}");
    }
    for (title, v) in [("Record", &it.desired), ("Status", &it.status)] {
        let _ = writeln!(out, "{title}:");
        match v {
            None => out.push_str("  (none)\n"),
            Some(v) => {
                let text = serde_yaml::to_string(v).unwrap_or_default();
                for line in text.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
    }
}

/// Why a kernel is not `Ready`: itself, then each of its mounts' vfolder
/// records, their statuses, their volumes and the volumes' statuses here.
async fn why_kernel(client: &mut Client, keys: &Keys, k: &Item) -> Result<Vec<String>, CliError> {
    let mut why = Vec::new();
    if k.desired.is_none() {
        why.push(format!(
            "no record at {}{}: the kernel was deleted; its status goes with the node's next pass",
            keys.kernels_prefix(),
            k.name
        ));
        return Ok(why);
    }
    match k
        .status
        .as_ref()
        .map(|s| (s["state"].as_str(), s["error"].as_str()))
    {
        None => why.push(liveness(client, keys).await?),
        Some((Some(state), Some(e))) if state != "Ready" => why.push(format!("{state}: {e}")),
        _ => {}
    }
    let entries = k
        .desired
        .as_ref()
        .and_then(|d| d["mounts"].as_array())
        .cloned()
        .unwrap_or_default();
    for (i, m) in entries.iter().enumerate() {
        let n = i + 1;
        if let Some(id) = m["vfolder"].as_str() {
            why.extend(why_mount_vfolder(client, keys, n, id).await?);
        } else if let Some(v) = m["volume"].as_str() {
            why.extend(
                why_token(client, keys, &format!("mount {n}: token of volume {v}"), v).await?,
            );
        }
    }
    Ok(why)
}

/// A node that wrote no status: whether its vfolderd is alive at all.
async fn liveness(client: &mut Client, keys: &Keys) -> Result<String, CliError> {
    let key = keys.node_status();
    Ok(match value(client, &key).await? {
        None => format!("no status: node {} has no liveness key ({key}): its vfolderd is not running or cannot reach etcd", keys.node),
        Some(v) => {
            let v = status_value(&v).unwrap_or_default();
            format!("no status yet: node {} is {} (ready: {}); the kernel is new or the node is still listing", keys.node, v["state"].as_str().unwrap_or("?"), v["ready"])
        }
    })
}

/// Mount `n`, a vfolder: its record, its status, its volume.
async fn why_mount_vfolder(
    client: &mut Client,
    keys: &Keys,
    n: usize,
    id: &str,
) -> Result<Vec<String>, CliError> {
    let p = &keys.prefix;
    let what = format!("mount {n}: vfolder {id}");
    let Some(record) = value(client, &format!("{p}/vfolders/{id}")).await? else {
        return Ok(vec![format!(
            "{what}: no record at {p}/vfolders/{id}: the kernel waits for it"
        )]);
    };
    let record = redacted_yaml(&record);
    let mut why = Vec::new();
    if record["trash"] == true {
        why.push(format!(
            "{what}: in the trash (its record says trash: true): a new kernel does not get it"
        ));
    }
    match value(client, &format!("{p}/status/vfolders/{id}")).await? {
        None => why.push(format!(
            "{what}: no status: no storage node leads its volume yet"
        )),
        Some(s) => {
            let s = status_value(&s).unwrap_or_default();
            let state = s["state"].as_str().unwrap_or("?");
            if !matches!(state, "Ready" | "OverQuota" | "InUse") {
                let e = s["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                why.push(format!("{what}: {state}{e}"));
            }
        }
    }
    if let Some(v) = record["volume"].as_str() {
        why.extend(why_mount_volume(client, keys, &format!("{what}: volume {v}"), v).await?);
    }
    Ok(why)
}

/// A volume `what` needs: `Err` (the reason) without a record, else its
/// status on this node (`None` before the node reported it).
async fn volume_here(
    client: &mut Client,
    keys: &Keys,
    what: &str,
    volume: &str,
) -> Result<Result<Option<Value>, String>, CliError> {
    let p = &keys.prefix;
    if value(client, &format!("{p}/volumes/{volume}"))
        .await?
        .is_none()
    {
        return Ok(Err(format!("{what}: no record at {p}/volumes/{volume}")));
    }
    let status = value(client, &keys.volume_status(volume)).await?;
    Ok(Ok(status.as_deref().and_then(status_value)))
}

/// A token file needs its volume's record (not a mount), not refused.
async fn why_token(
    client: &mut Client,
    keys: &Keys,
    what: &str,
    volume: &str,
) -> Result<Vec<String>, CliError> {
    let s = match volume_here(client, keys, what, volume).await? {
        Err(why) => return Ok(vec![why]),
        Ok(s) => s.unwrap_or_default(),
    };
    Ok(match (s["state"].as_str(), s["error"].as_str()) {
        (Some("Rejected"), e) => vec![format!("{what}: Rejected: {}", e.unwrap_or("-"))],
        _ => Vec::new(),
    })
}

/// A volume a mount needs: its record and its status on this node.
async fn why_mount_volume(
    client: &mut Client,
    keys: &Keys,
    what: &str,
    volume: &str,
) -> Result<Vec<String>, CliError> {
    Ok(match volume_here(client, keys, what, volume).await? {
        Err(why) => vec![why],
        Ok(None) => vec![format!("{what}: not reported by node {} yet", keys.node)],
        Ok(Some(s)) => {
            let state = s["state"].as_str().unwrap_or("?");
            let e = s["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            if state == "Mounted" && e.is_empty() {
                Vec::new()
            } else {
                vec![format!("{what}: {state} on {}{e}", keys.node)]
            }
        }
    })
}

/// Why a volume is not `Mounted` on its node.
fn why_volume(it: &Item) -> Vec<String> {
    let node = it.node.clone().unwrap_or_default();
    let mut why = Vec::new();
    if it.desired.is_none() {
        why.push(format!(
            "no record: node {node} keeps it only while kernels use it"
        ));
    }
    let Some(s) = &it.status else {
        why.push(format!("node {node} has not reported it: a requested volume is mounted only for a kernel that needs it"));
        return why;
    };
    let state = s["state"].as_str().unwrap_or("?");
    if let Some(e) = s["error"].as_str() {
        why.push(format!("{state} on {node}: {e}"));
    }
    for (flag, meaning) in [
        ("kept", "kept mounted for the kernels that use it"),
        ("renewal", "waiting to be mounted again with a new SAS"),
        ("change", "a changed spec waits for its kernels to go"),
    ] {
        if !s[flag].is_null() {
            why.push(format!("{flag}: {} ({meaning})", s[flag]));
        }
    }
    why
}

/// Why a vfolder is not `Ready`: its record, its volume, who holds it.
async fn why_vfolder(client: &mut Client, keys: &Keys, it: &Item) -> Result<Vec<String>, CliError> {
    let mut why = Vec::new();
    let Some(record) = &it.desired else {
        why.push(
            "no record: deleted; its directory waits in the volume's trash until purged"
                .to_string(),
        );
        return Ok(why);
    };
    if let Some(s) = &it.status {
        let state = s["state"].as_str().unwrap_or("?");
        let field = |k: &str| s[k].as_str().unwrap_or("-").to_string();
        match (state, s["error"].as_str()) {
            (_, Some(e)) => why.push(format!("{state}: {e}")),
            ("Trashed", None) => why.push(match s["purge_at"].as_str() {
                Some(at) => format!("Trashed (record deleted): purged after {at}"),
                None => format!(
                    "Trashed at {} (trash: true): `vfolderd vfolder restore` brings it back",
                    field("trashed_at")
                ),
            }),
            ("Pending" | "Purging" | "Cloning", None) => why.push(format!("{state}: under way")),
            _ => {}
        }
        if let Some(k) = s["kernels"].as_array().filter(|k| !k.is_empty()) {
            let k: Vec<&str> = k.iter().filter_map(Value::as_str).collect();
            why.push(format!("in use by {}", k.join(", ")));
        }
    } else {
        why.push("no status: no storage node leads its volume yet".to_string());
    }
    if let Some(v) = record["volume"].as_str() {
        let p = &keys.prefix;
        if value(client, &format!("{p}/volumes/{v}")).await?.is_none() {
            why.push(format!("volume {v}: no record at {p}/volumes/{v}"));
        }
    }
    Ok(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(record: &str) -> String {
        redacted_yaml(record.as_bytes()).to_string()
    }

    #[test]
    fn no_secret_survives_in_a_record() {
        let cases = [
            // An option list, a password holding `&` and a quote.
            (
                "mount: {options: \"vers=3.0,password=p&ss'w0rd,uid=1000\"}",
                "ss'w0rd",
            ),
            // cifs `user=name%password`.
            (
                "mount: {options: \"username=bob%s3cret,vers=3.0\"}",
                "s3cret",
            ),
            // A flow map whose keys are the options.
            ("mount: {options: {vers=3.0,password=hunter2}}", "hunter2"),
            // A secret-looking key, nested.
            ("mount: {credentials: {account_key: AbC}}", "AbC"),
            // YAML that does not parse is not echoed.
            ("mount: {password: hunter2\n  bad: [", "hunter2"),
        ];
        for (record, secret) in cases {
            let out = shown(record);
            assert!(!out.contains(secret), "{record} shown as {out}");
        }
        assert!(
            shown("mount: {options: \"vers=3.0,password=x\"}").contains("vers=3.0,password=***")
        );
        assert!(shown("mount: {options: \"username=bob%pw\"}").contains("username=bob%***"));
    }

    #[test]
    fn a_table_never_prints_control_characters() {
        let t = table(&[vec!["NAME".into()], vec!["a\u{1b}[31mred\nx".into()]]);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert_eq!(t.lines().count(), 2, "{t:?}");
    }
}
