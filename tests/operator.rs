//! What an operator's tools say about vfolderd: Prometheus's `promtool`
//! (Debian `prometheus`, installed by `scripts/install-deps.sh`) lints a live
//! `/metrics`, checks the alert rules and runs their unit tests; every metric
//! the rules read is one a running node exports.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn config(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs promtool with `args` (and `stdin`): its exit status and what it printed.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-deps.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The metric families a `/metrics` body declares (`# TYPE name kind`).
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The `vfolderd_*` names an expression file mentions, with a histogram's
/// `_bucket`/`_sum`/`_count` read as its family.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("vfolderd_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let rules = config("config/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules: {out}");
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    let tests = config("config/prometheus/alerts_test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok, "promtool test rules: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_metrics_page_passes_promtool_and_has_every_metric_the_rules_read() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        // Something to count: a volume mounted, a kernel with a folder.
        let id = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: work, owner: alice, volume: data}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.delete(&node.kernel_key("k1")).await;
        until("the kernel's binds are gone", 30, || {
            node.metric("vfolderd_owned_mounts{kind=\"bind\"}") == Some(0.0)
        })
        .await;

        // A volume that stays (the prober reports its capacity).
        etcd.put(&format!("{P}/volumes/scratch"), &tmpfs_volume("startup"))
            .await;
        until("the prober measured the volume", 30, || {
            node.metric("vfolderd_volume_free_bytes{volume=\"scratch\"}")
                .is_some()
        })
        .await;
        let body = node.metrics();
        let (ok, out) = promtool(&["check", "metrics"], Some(&body));
        assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");

        // What the operator's latency panels read: this node's mounts,
        // binds and unmounts by fstype, and its status writes.
        for series in [
            "vfolderd_mount_duration_seconds_count{fstype=\"tmpfs\",op=\"mount\"}",
            "vfolderd_mount_duration_seconds_count{fstype=\"bind\",op=\"mount\"}",
            "vfolderd_mount_duration_seconds_count{fstype=\"bind\",op=\"unmount\"}",
        ] {
            let n = node.metric(series).unwrap_or(0.0);
            assert!(n >= 1.0, "{series} = {n}: {body}");
        }
        let writes = node.metric("vfolderd_status_write_duration_seconds_count");
        assert!(writes.is_some_and(|n| n >= 1.0), "{body}");
        // Counters an alert takes the increase of exist at 0 before their first event.
        for series in [
            "vfolderd_task_restarts_total{task=\"watcher\"} 0",
            "vfolderd_policy_reloads_total{result=\"refused\"} 0",
            "vfolderd_mount_helper_timeouts_total{fstype=\"cifs\"} 0",
            "vfolderd_etcd_watch_restarts_total{how=\"relist\"} 0",
        ] {
            assert!(body.lines().any(|l| l == series), "{series}: {body}");
        }

        let exported = families(&body);
        let rules = std::fs::read_to_string(config("config/prometheus/alerts.yml")).unwrap();
        // Only with a blob volume mounted (tests/azure.rs checks it there).
        let only_with_blob = "vfolderd_sas_expiry_timestamp_seconds";
        let missing: Vec<String> = referenced(&rules)
            .into_iter()
            .filter(|m| !exported.contains(m) && m != only_with_blob)
            .collect();
        assert!(
            missing.is_empty(),
            "the rules read metrics no node exports: {missing:?}"
        );
    })
    .await;
}
