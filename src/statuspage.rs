//! The status page (`GET /` on the daemon's listen address): the node,
//! its volumes with capacity bars, its kernels with their mounts, and its
//! recent events, as one small HTML document — no script, no framework,
//! nothing fetched from elsewhere. It reads what the last pass reported
//! (the statuses it handed to the writer), so it costs nothing between
//! requests. Every text that came from etcd is escaped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use serde_json::Value;

use crate::keys::Keys;
use crate::state::events::{Event, EventType};

/// Kernels listed before the page says "and N more".
const MAX_KERNELS: usize = 500;

/// What the page shows.
pub struct PageInput<'a> {
    /// The node's name.
    pub node: &'a str,
    /// Its key layout (which statuses are its own).
    pub keys: &'a Keys,
    /// Whether `/readyz` says ready.
    pub ready: bool,
    /// Why the safety brake holds the node, if it does.
    pub held: Option<String>,
    /// The statuses the last pass reported.
    pub entries: &'a BTreeMap<String, Arc<Value>>,
    /// Recent events, newest first.
    pub events: &'a [Event],
}

/// HTML-escapes `s` for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}.bar{width:12em;height:.9em;background:#e6e6e6;border-radius:3px;display:inline-block;vertical-align:middle}\
.bar>div{height:100%;background:#3a7bd5;border-radius:3px}.bar.full>div{background:#d9534f}\
.n{white-space:nowrap}.s{font-weight:600}.ok{color:#2e7d32}.warn{color:#b26a00}.bad{color:#c62828}.muted{color:#777}code{font-size:.95em}";

/// The page.
pub fn render(p: &PageInput<'_>) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\"><title>vfolderd on {node}</title>\
         <style>{STYLE}</style></head><body><h1>vfolderd on {node}</h1>",
        node = esc(p.node)
    );
    let (class, text) = match (&p.held, p.ready) {
        (Some(why), _) => ("bad", format!("Held by the safety brake: {why}")),
        (None, true) => ("ok", "Ready".to_string()),
        (None, false) => ("warn", "Not ready".to_string()),
    };
    let _ = write!(
        h,
        "<p id=\"node\">Node <b>{}</b>: <span class=\"s {class}\">{}</span> · version {}</p>",
        esc(p.node),
        esc(&text),
        env!("CARGO_PKG_VERSION")
    );
    volumes(&mut h, p);
    kernels(&mut h, p);
    events(&mut h, p.events);
    h.push_str("</body></html>\n");
    h
}

/// The node's own statuses under `dir` (`volumes`, `kernels`), by name.
fn own<'a>(p: &'a PageInput<'_>, dir: &str) -> Vec<(&'a str, &'a Value)> {
    let prefix = format!("{}{dir}/", p.keys.node_status_prefix());
    p.entries
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (&k[prefix.len()..], v.as_ref()))
        .collect()
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

fn state_class(state: &str) -> &'static str {
    match state {
        "Ready" | "Mounted" => "ok",
        "Pending" | "Unmounted" => "warn",
        _ => "bad",
    }
}

fn volumes(h: &mut String, p: &PageInput<'_>) {
    let rows = own(p, "volumes");
    let _ = write!(h, "<h2>Volumes ({})</h2>", rows.len());
    if rows.is_empty() {
        h.push_str("<p class=\"muted\">None on this node.</p>");
        return;
    }
    h.push_str("<table id=\"volumes\"><tr><th>Volume</th><th>State</th><th>Kernels</th><th>Capacity</th><th>Reason</th></tr>");
    for (name, v) in rows {
        let state = text(v, "state");
        let cap = v.get("capacity_bytes").and_then(Value::as_u64);
        let free = v.get("free_bytes").and_then(Value::as_u64);
        let bar = match (cap, free) {
            (Some(c), Some(f)) if c > 0 => {
                let used = c.saturating_sub(f);
                let pct = (used as f64 * 100.0 / c as f64).clamp(0.0, 100.0);
                format!(
                    "<div class=\"bar{}\" title=\"{pct:.0}% used\"><div style=\"width:{pct:.1}%\"></div></div> {} of {} used",
                    if pct >= 95.0 { " full" } else { "" },
                    bytes(used),
                    bytes(c)
                )
            }
            _ => "<span class=\"muted\">-</span>".into(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"s {}\">{}</td><td>{}</td><td class=\"n\">{bar}</td><td>{}</td></tr>",
            esc(name),
            state_class(state),
            esc(state),
            v.get("users").and_then(Value::as_u64).unwrap_or(0),
            esc(text(v, "error"))
        );
    }
    h.push_str("</table>");
}

fn kernels(h: &mut String, p: &PageInput<'_>) {
    let rows = own(p, "kernels");
    let _ = write!(h, "<h2>Kernels ({})</h2>", rows.len());
    if rows.is_empty() {
        h.push_str("<p class=\"muted\">None on this node.</p>");
        return;
    }
    h.push_str("<table id=\"kernels\"><tr><th>Kernel</th><th>State</th><th>Mounts</th><th>Reason</th></tr>");
    for (id, v) in rows.iter().take(MAX_KERNELS) {
        let state = text(v, "state");
        let mut mounts = String::new();
        for m in v
            .get("mounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mark = if m.get("mounted").and_then(Value::as_bool) == Some(true) {
                "✓"
            } else {
                "✗"
            };
            let _ = write!(
                mounts,
                "<div>{mark} <code>{}</code> → <code>{}</code> ({})</div>",
                esc(text(m, "source")),
                esc(text(m, "target")),
                esc(text(m, "permission"))
            );
        }
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"s {}\">{}</td><td>{mounts}</td><td>{}</td></tr>",
            esc(id),
            state_class(state),
            esc(state),
            esc(text(v, "error"))
        );
    }
    h.push_str("</table>");
    if rows.len() > MAX_KERNELS {
        let _ = write!(
            h,
            "<p class=\"muted\">and {} more (vfolderd get kernels)</p>",
            rows.len() - MAX_KERNELS
        );
    }
}

fn events(h: &mut String, events: &[Event]) {
    let _ = write!(h, "<h2>Recent events ({})</h2>", events.len());
    if events.is_empty() {
        h.push_str("<p class=\"muted\">None since this vfolderd started.</p>");
        return;
    }
    h.push_str(
        "<table id=\"events\"><tr><th>Time</th><th>Object</th><th>Event</th><th>Message</th></tr>",
    );
    for e in events {
        let class = match e.kind {
            EventType::Warning => "bad",
            EventType::Normal => "ok",
        };
        let _ = write!(
            h,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"s {class}\">{}</td><td>{}</td></tr>",
            esc(&e.time),
            esc(&e.object),
            esc(&e.reason),
            esc(&e.message)
        );
    }
    h.push_str("</table>");
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_from_etcd_is_escaped_everywhere() {
        let keys = Keys::new("/p", "n1");
        let mut entries = BTreeMap::new();
        entries.insert(
            keys.kernel_status("<k>"),
            Arc::new(json!({"state": "Failed", "error": "<script>x</script>", "mounts": [
                {"source": "vfolder:\"a", "target": "/k/<b>", "permission": "rw", "mounted": false}]})),
        );
        let events = [Event {
            time: "t".into(),
            object: "kernel/<k>".into(),
            key: "/p/nodes/n1/kernels/<k>".into(),
            kind: EventType::Warning,
            reason: "Failed".into(),
            from: None,
            message: "<img src=x>".into(),
        }];
        let page = render(&PageInput {
            node: "n<1>",
            keys: &keys,
            ready: true,
            held: None,
            entries: &entries,
            events: &events,
        });
        for bad in ["<script>", "<img", "/k/<b>", "<k>", "n<1>", "vfolder:\"a"] {
            assert!(!page.contains(bad), "{bad} unescaped: {page}");
        }
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
    }
}
