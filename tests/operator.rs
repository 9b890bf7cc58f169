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
        ready_kernel_with_a_folder(&etcd, &node, "k1").await;
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
        let dashboard = dashboard_exprs().join("\n");
        // Only with a blob volume mounted (tests/azure.rs checks it there).
        let only_with_blob = "vfolderd_sas_expiry_timestamp_seconds";
        let missing: Vec<String> = referenced(&rules)
            .into_iter()
            .chain(referenced(&dashboard))
            .filter(|m| !exported.contains(m) && m != only_with_blob)
            .collect();
        assert!(
            missing.is_empty(),
            "the rules or the dashboard read metrics no node exports: {missing:?}"
        );
    })
    .await;
}

/// Options that give a service a mount (or user, or network) namespace of
/// its own: vfolderd's mounts must be the host's (kernels bind from the
/// host's table), and idmapped binds make user namespaces.
const NAMESPACING: [&str; 20] = [
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateUsers",
    "DynamicUser",
    "MountFlags",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RestrictNamespaces",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "ProtectProc",
];

#[test]
fn the_systemd_unit_verifies_and_keeps_the_hosts_mounts() {
    let unit = std::fs::read_to_string(config("config/systemd/vfolderd.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    for (key, _) in &settings {
        assert!(
            !NAMESPACING.contains(key),
            "{key} would give vfolderd a namespace of its own"
        );
    }
    assert_eq!(
        get("KillMode"),
        ["process"],
        "FUSE daemons outlive a restart"
    );
    assert_eq!(get("Restart"), ["always"]);
    let after = get("After").join(" ");
    for unit in ["network-online.target", "local-fs.target"] {
        assert!(after.contains(unit), "After= {after}");
    }
    assert_eq!(
        get("ExecStart"),
        ["/usr/bin/vfolderd run --config /etc/vfolderd/node.yaml"]
    );

    // systemd-analyze verify checks the command exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let built = unit.replace("/usr/bin/vfolderd", env!("CARGO_BIN_EXE_vfolderd"));
    std::fs::write(dir.path().join("vfolderd.service"), built).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "./vfolderd.service"])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian systemd; scripts/install-deps.sh installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// Every query of the Grafana dashboard, its `$instance` variable set to all.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(config("config/grafana/vfolderd.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().replace("$instance", ".*"))
        .collect()
}

#[test]
fn the_dashboard_is_grafana_json_whose_queries_parse() {
    let text = std::fs::read_to_string(config("config/grafana/vfolderd.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "vfolderd");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} fits the 24-column grid", p["title"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
    // PromQL that parses: each query as a recording rule for promtool.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 17, "{exprs:?}");
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("vfolderd:dashboard:{i}"), "expr": e}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, file.to_string()).unwrap(); // JSON is YAML
    let (ok, out) = promtool(&["check", "rules", path.to_str().unwrap()], None);
    assert!(ok, "the dashboard's queries: {out}");
}

/// `get` and `describe` as an operator uses them: what is running, what
/// waits and why, no secret shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_describe_show_what_waits_and_why_without_secrets() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let (ok_id, missing) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
            .await;
        // A share whose record carries its password inline; this kernel has
        // no CIFS client, so it fails.
        etcd.put(
            &format!("{P}/volumes/share"),
            "mount: {at: startup, fstype: cifs, path: //acct.file.core.windows.net/share, \
             options: \"username=acct,password=hunter2secret\"}\n",
        )
        .await;
        etcd.put(
            &format!("{P}/vfolders/{ok_id}"),
            "{name: work, owner: alice, volume: data}\n",
        )
        .await;
        let kernel = |id: uuid::Uuid| format!("mounts: [{{vfolder: {id}}}]\n");
        etcd.put(&node.kernel_key("k1"), &kernel(ok_id)).await;
        etcd.put(&node.kernel_key("k2"), &kernel(missing)).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.wait_state(&node.kernel_status("k2"), "Pending").await;
        etcd.wait_state(&node.volume_status("share"), "Failed")
            .await;

        let table = node.cli(&["get", "kernels"]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("NODE") && lines[0].contains("REASON"),
            "{table}"
        );
        let row = |k: &str| {
            lines
                .iter()
                .find(|l| l.split_whitespace().nth(1) == Some(k))
                .copied()
        };
        let k1: Vec<&str> = row("k1").expect("k1 listed").split_whitespace().collect();
        // Its folder is bound; the failed startup share is not (best effort).
        assert_eq!(k1[..4], ["n1", "k1", "Ready", "1/2"], "{table}");
        assert!(
            row("k2").is_some_and(|l| l.contains("Pending") && l.contains("no record")),
            "{table}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&node.cli(&["get", "kernels", "-o", "json"])).unwrap();
        let items = json.as_array().unwrap();
        assert_eq!(items.len(), 2, "{json}");
        assert_eq!(items[0]["name"], "k1");
        assert_eq!(items[0]["status"]["state"], "Ready");
        assert_eq!(
            items[0]["desired"]["mounts"][0]["vfolder"],
            ok_id.to_string()
        );

        for out in [
            node.cli(&["get", "volumes", "-o", "yaml"]),
            node.cli(&["get", "volumes", "-o", "wide"]),
            node.cli(&["describe", "volume", "share"]),
        ] {
            assert!(!out.contains("hunter2"), "a secret shown: {out}");
        }
        let share = node.cli(&["describe", "volume", "share"]);
        assert!(
            share.contains("password=***") && share.contains("State:   Failed"),
            "{share}"
        );

        let k2 = node.cli(&["describe", "kernel", "k2"]);
        let want = format!("mount 1: vfolder {missing}: no record at {P}/vfolders/{missing}");
        assert!(k2.contains(&want), "{k2}");
        let k1 = node.cli(&["describe", "kernel", "k1"]);
        assert!(k1.contains("Why:\n  nothing is in the way"), "{k1}");
        let vf = node.cli(&["describe", "vfolder", &ok_id.to_string()]);
        assert!(
            vf.contains("State:   Ready") && vf.contains("nothing is in the way"),
            "{vf}"
        );

        // Another node's kernels: none; a kernel nobody knows: an error.
        let other = node.cli(&["get", "kernels", "--node", "n9"]);
        assert_eq!(other.lines().count(), 1, "{other}");
        let unknown = node.cli_output(&["describe", "kernel", "nope"]);
        assert!(!unknown.status.success());
        assert!(String::from_utf8_lossy(&unknown.stderr)
            .contains("kernel nope: no record and no status"));
        for cmd in ["get", "describe"] {
            let help = Command::new(env!("CARGO_BIN_EXE_vfolderd"))
                .args([cmd, "--help"])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&help.stdout).contains("Example: vfolderd"),
                "{cmd} --help"
            );
        }
    })
    .await;
}

/// The package `scripts/package.sh` builds: scripts/test.sh builds it first
/// and names it in `VFOLDERD_DEB`; run alone, this test builds it (in a
/// target directory of its own: the running `cargo test` holds this one).
fn debian_package() -> PathBuf {
    if let Ok(p) = std::env::var("VFOLDERD_DEB") {
        return PathBuf::from(p);
    }
    let out = Command::new(config("scripts/package.sh"))
        .env("CARGO_TARGET_DIR", config("target/package-test"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/package.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn dpkg_deb(args: &[&str]) -> String {
    let out = Command::new("dpkg-deb").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_debian_package_holds_the_binary_the_unit_and_the_config() {
    let deb = debian_package();
    let deb = deb.to_str().unwrap();
    let info = dpkg_deb(&["--info", deb]);
    assert!(info.contains("Package: vfolderd"), "{info}");
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or("");
    for d in ["libc6", "util-linux", "mount"] {
        assert!(
            depends.split(", ").any(|x| x == d),
            "depends on {d}: {info}"
        );
    }
    let files = dpkg_deb(&["--contents", deb]);
    for f in [
        "./usr/bin/vfolderd",
        "./lib/systemd/system/vfolderd.service",
        "./etc/vfolderd/node.yaml",
        "./etc/vfolderd/policies/default.yaml",
        "./usr/share/doc/vfolderd/README.md",
        "./usr/share/doc/vfolderd/prometheus/alerts.yml",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(f)),
            "{f} in the package: {files}"
        );
    }
    // An operator's edits of the config survive an upgrade.
    let conffiles = dpkg_deb(&["--info", deb, "conffiles"]);
    assert!(
        conffiles.lines().any(|l| l == "/etc/vfolderd/node.yaml"),
        "{conffiles}"
    );
    // What it unpacks runs, and its unit is the one in the repository.
    let root = tempfile::tempdir().unwrap();
    dpkg_deb(&["-x", deb, root.path().to_str().unwrap()]);
    let version = Command::new(root.path().join("usr/bin/vfolderd"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    assert_eq!(
        version.trim(),
        format!("vfolderd {}", env!("CARGO_PKG_VERSION"))
    );
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/vfolderd.service")).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(config("config/systemd/vfolderd.service")).unwrap()
    );
}

/// `--log-format json --log-level L`: one JSON object per line for a log
/// shipper, at the level asked (the flag wins over RUST_LOG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_at_the_level_asked() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            run_args: &["--log-format", "json", "--log-level", "info"],
            helper_double: true,
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("startup"))
            .await;
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        // Objects that fail: a share whose helper fails, a kernel that is
        // not a kernel. Every line about them names their key.
        std::fs::write(node.dir.path().join("helper-fail"), "").unwrap();
        let share = format!("{P}/volumes/share");
        etcd.put(
            &share,
            "mount: {at: requested, fstype: cifs, path: //acct.file.core.windows.net/share}\n",
        )
        .await;
        let id = uuid::Uuid::new_v4();
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: work, owner: alice, volume: share}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k2"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.put(&node.kernel_key("bad"), "mounts: [{bogus: 1}]\n")
            .await;
        etcd.wait_state(&node.volume_status("share"), "Failed")
            .await;
        etcd.wait_state(&node.kernel_status("bad"), "Rejected")
            .await;
        let parsed = || -> Vec<serde_json::Value> {
            node.log()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        until("the share's failure event logged", 20, || {
            parsed()
                .iter()
                .any(|v| v["message"] == "event" && v["object"] == "volume/share")
        })
        .await;
        let about = |v: &serde_json::Value, what: &str| {
            v.as_object()
                .unwrap()
                .values()
                .any(|x| x.as_str().is_some_and(|s| s.contains(what)))
        };
        let all = parsed();
        let failed: Vec<_> = all
            .iter()
            .filter(|v| v["message"] == "action failed")
            .collect();
        assert!(!failed.is_empty());
        for v in &failed {
            assert!(v["key"].as_str().is_some_and(|k| k.starts_with(P)), "{v}");
        }
        assert!(
            failed.iter().any(|v| v["key"] == share.as_str()),
            "{failed:?}"
        );
        for v in all.iter().filter(|v| about(v, "share") || about(v, "bad")) {
            let key = v["key"].as_str().unwrap_or_default();
            assert!(
                key.starts_with(P),
                "a line about an object without its key: {v}"
            );
        }
        let bad = node.kernel_key("bad");
        assert!(
            all.iter().any(|v| v["key"] == bad.as_str()),
            "the rejection names its key"
        );
        let log = node.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        for line in lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            // A field named like the line's own (message, target, level)
            // would be a second key a log shipper keeps only one of.
            for own in [
                "\"message\":",
                "\"target\":",
                "\"level\":",
                "\"timestamp\":",
            ] {
                assert_eq!(line.matches(own).count(), 1, "{own} twice in {line}");
            }
            for field in ["timestamp", "level", "target", "message"] {
                assert!(v[field].is_string(), "{field} in {line}");
            }
            let level = v["level"].as_str().unwrap();
            assert!(
                ["INFO", "WARN", "ERROR"].contains(&level),
                "RUST_LOG=debug overridden: {line}"
            );
        }
    })
    .await;
}

/// Issue 17 item 1: `vfolderd plan` says what the node would do, in order and
/// why — from the running daemon (with the backoff of a failing volume), and
/// with the daemon stopped (from etcd, acting on nothing) — and `explain`
/// joins the reason chain to that plan. No option value is ever shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_explain_say_what_the_node_would_do_and_why() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            helper_double: true,
            ..NodeOpts::default()
        };
        let mut node = Node::start(&etcd, "n1", opts);
        ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        let st = etcd.get_json(&node.kernel_status("k1")).await.unwrap();
        let bind = st["mounts"][0]["target"].as_str().unwrap().to_string();

        // Converged: nothing to do.
        let calm = node.cli(&["plan"]);
        assert!(
            calm.contains("No changes: the node is as wanted."),
            "{calm}"
        );
        assert!(calm.contains("plan made by the running daemon"), "{calm}");

        // A share whose helper fails waits out its backoff; the plan says so.
        std::fs::write(node.dir.path().join("helper-fail"), "").unwrap();
        etcd.put(
            &format!("{P}/volumes/share"),
            "mount: {at: startup, fstype: cifs, path: //acct.file.core.windows.net/share, \
             options: \"username=acct,password=hunter2secret\"}\n",
        )
        .await;
        etcd.wait_state(&node.volume_status("share"), "Failed")
            .await;
        // Asked until a plan lands inside a backoff (one can come in the
        // moment between a backoff's end and the retry it lets run).
        let mut json = serde_json::Value::Null;
        for _ in 0..50 {
            json = serde_json::from_str(&node.cli(&["plan", "--volume", "share", "-o", "json"]))
                .unwrap();
            if json["backoffs"].as_array().is_some_and(|b| !b.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let asked = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let step = &json["steps"][0];
        assert_eq!(step["action"], "mount", "{json}");
        assert_eq!(step["object"], "volume/share", "{json}");
        // Inside the backoff when asked: its end is not long before now.
        assert!(
            step["waits_until"]
                .as_u64()
                .is_some_and(|t| t + 10 >= asked && t <= asked + 300),
            "{json}"
        );
        let backoff = &json["backoffs"][0];
        assert_eq!(backoff["object"], "volume/share", "{json}");
        assert!(backoff["attempts"].as_u64().unwrap() >= 1, "{json}");
        assert!(
            backoff["error"].as_str().unwrap().contains("Host is down"),
            "{json}"
        );
        let explained = node.cli(&["explain", "volume", "share"]);
        assert!(
            explained.contains("Plan:") && explained.contains("in backoff until"),
            "{explained}"
        );
        for out in [&explained, &node.cli(&["plan", "-o", "yaml"])] {
            assert!(!out.contains("hunter2"), "a secret shown: {out}");
        }

        // Stopped: the CLI plans itself, from etcd, and acts on nothing.
        assert!(node.stop());
        etcd.delete(&node.kernel_key("k1")).await;
        let stopped: serde_json::Value =
            serde_json::from_str(&node.cli(&["plan", "-o", "json"])).unwrap();
        assert_eq!(stopped["source"], "etcd", "{stopped}");
        let steps = stopped["steps"].as_array().unwrap();
        let unbind = steps
            .iter()
            .find(|s| s["action"] == "unmount" && s["target"] == bind.as_str())
            .unwrap_or_else(|| panic!("no unmount of {bind}: {stopped}"));
        assert_eq!(unbind["object"], "kernel/k1", "{stopped}");
        assert!(
            unbind["why"]
                .as_str()
                .unwrap()
                .contains("kernel k1 no longer wants"),
            "{stopped}"
        );
        // Its volume lingers (a daemon starting now would keep it that long).
        assert!(
            !steps
                .iter()
                .any(|s| s["action"] == "unmount" && s["object"] == "volume/data"),
            "{stopped}"
        );
        let k1 = node.cli(&["plan", "--kernel", "k1"]);
        assert!(
            k1.contains("the daemon is stopped")
                && k1.contains("unmount")
                && k1.contains("kernel/k1"),
            "{k1}"
        );
        assert!(
            node.mount_at(std::path::Path::new(&bind)).is_some(),
            "a plan must not act"
        );
    })
    .await;
}

/// Runs headless Chromium (Debian `chromium`) on `url` with `args`.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian chromium; scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The width and height of a PNG (its IHDR chunk).
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// Issue 17 items 3 and 6: a failing volume is an event in etcd (under the
/// node's lease, shown by `describe`), and the status page at `GET /`, as
/// headless Chromium renders it, shows the node, the volumes with capacity
/// bars, the kernels with their mounts, and the event — and no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_and_events_show_the_node_in_a_browser() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            helper_double: true,
            extra_config: "probe_interval: 1s\n",
            ..NodeOpts::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        let id = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: work, owner: alice, volume: data}\n",
        )
        .await;
        std::fs::write(node.dir.path().join("helper-fail"), "").unwrap();
        etcd.put(
            &format!("{P}/volumes/share"),
            "mount: {at: startup, fstype: cifs, path: //acct.file.core.windows.net/share, \
             options: \"username=acct,password=hunter2secret\"}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.wait_state(&node.volume_status("share"), "Failed")
            .await;
        etcd.wait_for(&node.volume_status("data"), "a capacity", |v| {
            v["capacity_bytes"].as_u64().is_some()
        })
        .await;

        // The event, as etcdctl would list it, under the node's lease.
        let prefix = format!("{P}/events/n1/volume/share/");
        let mut client = etcd.client().await;
        let got = loop {
            let r = client
                .get(
                    prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            if !r.kvs().is_empty() {
                break r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let kv = &got.kvs()[0];
        let event: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
        assert_eq!(event["type"], "Warning", "{event}");
        assert_eq!(event["reason"], "Failed", "{event}");
        assert!(
            event["message"].as_str().unwrap().contains("Host is down"),
            "{event}"
        );
        assert_ne!(kv.lease(), 0, "an event lives under the node's lease");
        let described = node.cli(&["describe", "volume", "share"]);
        assert!(
            described.contains("Events:") && described.contains("Warning  Failed"),
            "{described}"
        );
        // A kernel that became Ready as planned wrote no event.
        assert!(etcd
            .dump(&format!("{P}/events/n1/kernel/"))
            .await
            .is_empty());
        // An object's events go with it (its status key): the share
        // deleted, its events are deleted.
        etcd.delete(&format!("{P}/volumes/share")).await;
        let mut gone = false;
        for _ in 0..150 {
            if etcd.dump(&prefix).await.is_empty() {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(gone, "the deleted share's events stayed");
        etcd.put(
            &format!("{P}/volumes/share"),
            "mount: {at: startup, fstype: cifs, path: //acct.file.core.windows.net/share, \
             options: \"username=acct,password=hunter2secret\"}\n",
        )
        .await;
        etcd.wait_state(&node.volume_status("share"), "Failed")
            .await;

        let url = format!("http://{}/", node.listen);
        let dom = chromium(&url, &["--dump-dom"]);
        for want in [
            "vfolderd on n1",
            "Ready",
            "Volumes (2)",
            "Kernels (1)",
            &format!("vfolder:{id}"),
            "Host is down",
            "% used",
            "used</td>",
        ] {
            assert!(dom.contains(want), "{want:?} missing from the page: {dom}");
        }
        assert!(
            dom.contains("id=\"events\"") && dom.contains("volume/share"),
            "{dom}"
        );
        assert!(!dom.contains("hunter2"), "a secret on the page: {dom}");
        assert!(!dom.contains("<script"), "the page has no script: {dom}");

        // The screenshot the README shows is what Chromium draws of it.
        let shot = std::env::temp_dir().join(format!("vfolderd-status-{}.png", std::process::id()));
        chromium(
            &url,
            &[
                &format!("--screenshot={}", shot.display()),
                "--window-size=1100,700",
            ],
        );
        let png = std::fs::read(&shot).unwrap();
        assert_eq!(png_size(&png), (1100, 700));
        // (How the README's copy is made.)
        if let Some(dir) = std::env::var_os("VFOLDERD_SCREENSHOT_TO") {
            std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png")).unwrap();
        }
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        assert!(
            readme.contains("](docs/status-page.png)"),
            "the README shows the page"
        );
        let committed =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status-page.png")).unwrap();
        assert_eq!(png_size(&committed), (1100, 700));
        let _ = std::fs::remove_file(&shot);
    })
    .await;
}

/// Issue 17 item 2: every command's `--help` carries an example.
#[test]
fn every_command_has_help_with_an_example() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vfolderd"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} --help");
        String::from_utf8(out.stdout).unwrap()
    };
    // The commands as `--help` lists them (a new one is checked too).
    let commands = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect()
    };
    let top = commands(&help(&[]));
    assert!(top.len() >= 11, "{top:?}");
    let mut checked = 0;
    for c in &top {
        let text = help(&[c]);
        assert!(
            text.contains("Example: vfolderd "),
            "vfolderd {c} --help has no example:\n{text}"
        );
        checked += 1;
        for sub in commands(&text) {
            let text = help(&[c, &sub]);
            assert!(
                text.contains("Example: "),
                "vfolderd {c} {sub} --help has no example:\n{text}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 21, "{checked} commands checked");
}

/// Issue 17 item 2: `get kernels --watch` prints the list, then a row each
/// time a kernel's record or status changes, as `kubectl get -w` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_prints_a_row_when_a_kernel_changes() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = ready_kernel_with_a_folder(&etcd, &node, "k1").await;

        let mut child = Command::new(env!("CARGO_BIN_EXE_vfolderd"))
            .args(["get", "kernels", "--watch", "--config"])
            .arg(&node.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // The next line holding all of `what`.
        let next = |what: &[&str]| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(l) if what.iter().all(|w| l.contains(w)) => return l,
                    Ok(l) => seen.push(l),
                    Err(_) => panic!("no line with {what:?}; got {seen:?}"),
                }
            }
        };
        next(&["NODE", "STATE"]);
        next(&["n1", " k1 ", "Ready"]);
        etcd.put(
            &node.kernel_key("k2"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        next(&["n1", " k2 ", "Ready"]);
        etcd.delete(&node.kernel_key("k1")).await;
        next(&[" k1 ", "Deleted"]);
        let _ = child.kill();
        let _ = child.wait();
    })
    .await;
}

/// Issue 17 item 8: `/readyz` and the metrics say which kernel features
/// the node runs on — the mount-table source, the new mount API, and,
/// tried on a detached copy of a mounted volume, idmapped mounts per fstype.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_report_the_kernel_features_in_use() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "probe_interval: 1s\n",
            ..NodeOpts::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        until("an idmap verdict for tmpfs", 30, || {
            node.metric_now("vfolderd_idmap_supported{fstype=\"tmpfs\"}")
                .is_some()
        })
        .await;
        // The source the daemon logged it picked is the one reported.
        let log = node.log();
        let source = if log.contains("kept by fanotify mount events") {
            "statmount+fanotify"
        } else if log.contains("mount table: listmount") {
            "statmount"
        } else {
            "mountinfo"
        };
        let series =
            format!("vfolderd_kernel_feature{{feature=\"mount_table\",value=\"{source}\"}}");
        assert_eq!(node.metric_now(&series), Some(1.0), "{series}");
        let (code, body) = http_get(&node.listen, "/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("mount table: {source}")), "{body}");
        assert!(
            body.contains("new mount API (open_tree, mount_setattr): yes"),
            "{body}"
        );
        // Linux 6.3+ idmaps tmpfs; the verdict was a real try on it.
        let works = node.metric_now("vfolderd_idmap_supported{fstype=\"tmpfs\"}");
        assert_eq!(works, Some(1.0));
        assert!(body.contains("idmapped mounts on tmpfs: yes"), "{body}");
    })
    .await;
}
