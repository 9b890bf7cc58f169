//! `vfolderd get KIND --watch`: the list, then a row for each object that
//! changes (its record or a status), as kubectl's `get -w` does. It watches
//! the record and status ranges of that kind (of the node asked about)
//! from the revision it listed at, so nothing between the list and the
//! watch is missed. A burst of changes is read once: the list is read again
//! (paged), 300 ms after the first change, and only rows that differ are
//! printed — a cost of one list per burst, for an operator's terminal.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, WatchOptions};
use serde_json::json;

use super::{read, render, Item, Kind, Nodes, Output};
use crate::cli::CliError;
use crate::config::NodeConfig;
use crate::keys::Keys;

/// How long a burst of changes is gathered before the list is read again.
const SETTLE: Duration = Duration::from_millis(300);

/// Prints the list, then changed rows until interrupted (or the watch ends).
pub async fn watch(
    cfg: &NodeConfig,
    kind: Kind,
    nodes: &Nodes,
    out: Output,
    mut emit: impl FnMut(&str),
) -> Result<(), CliError> {
    let keys = Keys::new(&cfg.etcd.prefix, &cfg.node);
    let mut client = connect(cfg).await?;
    let revision = client
        .get(keys.prefix.as_str(), None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let items = read(&mut client, &keys, kind, nodes).await?;
    emit(&first(kind, &items, out)?);
    let mut shown = index(&items);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    // Each range's answers, forwarded to one channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(), CliError>>(64);
    let mut forwarders = Vec::new();
    for prefix in prefixes(&keys, kind, nodes) {
        let mut stream = client.watch(prefix, Some(opts.clone())).await?;
        let tx = tx.clone();
        forwarders.push(crate::daemon::AbortOnDrop(tokio::spawn(async move {
            loop {
                let r = match stream.message().await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(CliError::Invalid("etcd ended the watch".into())),
                    Err(e) => Err(e.into()),
                };
                let end = r.is_err();
                if tx.send(r).await.is_err() || end {
                    return;
                }
            }
        })));
    }
    drop(tx);
    while let Some(r) = rx.recv().await {
        r?;
        // The rest of the burst is read with it.
        tokio::time::sleep(SETTLE).await;
        while let Ok(r) = rx.try_recv() {
            r?;
        }
        let items = read(&mut client, &keys, kind, nodes).await?;
        let now = index(&items);
        let changed = changes(&shown, &now);
        if !changed.is_empty() {
            emit(&rows_only(kind, &changed, out)?);
        }
        shown = now;
    }
    Ok(())
}

/// A connection with HTTP/2 keep-alive and no request timeout (a watch
/// runs as long as the operator looks).
async fn connect(cfg: &NodeConfig) -> Result<Client, CliError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let opts = crate::etcd::connect_options(&cfg.etcd, opts)
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok(Client::connect(&cfg.etcd.endpoints, Some(opts)).await?)
}

/// The record and status ranges of `kind` (of `nodes`' kernels and
/// volume statuses).
fn prefixes(keys: &Keys, kind: Kind, nodes: &Nodes) -> Vec<String> {
    let p = &keys.prefix;
    let of = |what: &str, rest: &str| match nodes {
        Nodes::One(n) => format!("{p}/{what}/{n}/{rest}"),
        Nodes::All => format!("{p}/{what}/"),
    };
    match kind {
        Kind::Kernels => vec![of("nodes", "kernels/"), of("status/nodes", "kernels/")],
        Kind::Volumes => vec![format!("{p}/volumes/"), of("status/nodes", "volumes/")],
        Kind::Vfolders => vec![format!("{p}/vfolders/"), format!("{p}/status/vfolders/")],
    }
}

/// (node, name) → the item and its JSON (to compare).
type Index = BTreeMap<(Option<String>, String), (Item, String)>;

fn index(items: &[Item]) -> Index {
    items
        .iter()
        .map(|it| {
            let text = serde_json::to_string(it).unwrap_or_default();
            ((it.node.clone(), it.name.clone()), (it.clone(), text))
        })
        .collect()
}

/// Items new or changed in `now`, and those gone from it (as `Deleted`).
fn changes(before: &Index, now: &Index) -> Vec<Item> {
    let mut out: Vec<Item> = now
        .iter()
        .filter(|(k, (_, text))| before.get(*k).is_none_or(|(_, t)| t != text))
        .map(|(_, (it, _))| it.clone())
        .collect();
    for (k, (it, _)) in before {
        if !now.contains_key(k) {
            out.push(Item {
                desired: None,
                status: Some(json!({"state": "Deleted"})),
                ..it.clone()
            });
        }
    }
    out
}

/// The whole list: a table, or one JSON object (YAML document) per item.
fn first(kind: Kind, items: &[Item], out: Output) -> Result<String, CliError> {
    match out {
        Output::Table | Output::Wide => render(kind, items, out),
        _ => rows_only(kind, items, out),
    }
}

/// Rows without the header; one compact JSON object per line; YAML
/// documents.
fn rows_only(kind: Kind, items: &[Item], out: Output) -> Result<String, CliError> {
    match out {
        Output::Table | Output::Wide => {
            let table = render(kind, items, out)?;
            Ok(table.lines().skip(1).map(|l| format!("{l}\n")).collect())
        }
        Output::Json => Ok(items
            .iter()
            .map(|it| serde_json::to_string(it).unwrap_or_default() + "\n")
            .collect()),
        Output::Yaml => Ok(items
            .iter()
            .map(|it| format!("---\n{}", serde_yaml::to_string(it).unwrap_or_default()))
            .collect()),
    }
}
