//! The vfolder lifecycle (issue 14 item 1), end to end: the real daemon,
//! a real etcd, real tmpfs and bind mounts. Trash, restore and purge are
//! checked where a user and an operator would look: the files, the kernel's
//! home, and the vfolder's status key. Kernels of other nodes are plain
//! keys under `P/nodes/<other>/kernels/`: the storage node's in-use guard
//! reads every node's desired kernels, whether a daemon runs there or not.

mod common;

use std::path::PathBuf;

use common::*;

/// A 16 MiB tmpfs volume `shard1`, a vfolder `mine` on it with one file
/// written by kernel k1 through its home; the vfolder's uuid and live path.
async fn vfolder_with_a_file(etcd: &Etcd, node: &Node) -> (uuid::Uuid, PathBuf) {
    etcd.put(
        &format!("{P}/volumes/shard1"),
        "mount: {at: requested, fstype: tmpfs, path: t, options: 'size=16m'}\n",
    )
    .await;
    let vf = uuid::Uuid::new_v4();
    etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, false))
        .await;
    etcd.put(&node.kernel_key("k1"), &kernel(vf)).await;
    etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
    std::fs::write(node.home("k1").join("mine/notes.txt"), b"my work").unwrap();
    let live = node.volumes().join("shard1").join(shard(&vf.to_string()));
    assert!(live.join("notes.txt").exists());
    (vf, live)
}

fn record(_vf: uuid::Uuid, trash: bool) -> String {
    format!("{{name: mine, owner: alice, volume: shard1, trash: {trash}}}\n")
}

fn kernel(vf: uuid::Uuid) -> String {
    format!("mounts: [{{vfolder: {vf}}}]\n")
}

fn in_trash(node: &Node, vf: uuid::Uuid) -> PathBuf {
    node.volumes()
        .join("shard1/.trash")
        .join(vf.simple().to_string())
}

async fn wait_gone(etcd: &Etcd, key: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Some(v) = etcd.get_json(key).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} still there: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `trash: true` moves the directory aside (one rename) only once no kernel
/// on any node wants it; meanwhile it is `InUse` naming them, the running
/// kernel keeps its folder, and a new kernel waits saying why. Taking
/// `trash` away moves it back with its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trash_waits_for_every_nodes_kernels_and_restore_brings_the_files_back() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        // Another node's kernel, as that node writes it: a home under its
        // own kernels root, the vfolder as 32 hex digits.
        let other = format!("{P}/nodes/n2/kernels/k9");
        let theirs = format!(
            "{{home: /srv/elsewhere/k9/work, mounts: [{{vfolder: {}}}]}}\n",
            vf.simple()
        );
        etcd.put(&other, &theirs).await;
        let key = format!("{P}/status/vfolders/{vf}");

        etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, true))
            .await;
        let st = etcd.wait_state(&key, "InUse").await;
        assert_eq!(st["kernels"], serde_json::json!(["n1/k1", "n2/k9"]), "{st}");
        assert!(
            live.join("notes.txt").exists(),
            "nothing moves while in use"
        );
        let seen = std::fs::read(node.home("k1").join("mine/notes.txt")).unwrap();
        assert_eq!(seen, b"my work", "the running kernel keeps its folder");

        etcd.delete(&node.kernel_key("k1")).await;
        etcd.put(&node.kernel_key("k2"), &kernel(vf)).await;
        let k2 = etcd.wait_state(&node.kernel_status("k2"), "Pending").await;
        assert!(
            k2["error"].as_str().unwrap().contains("in the trash"),
            "{k2}"
        );
        let st = etcd
            .wait_for(&key, "InUse by n1/k2 and n2/k9", |v| {
                v["kernels"] == serde_json::json!(["n1/k2", "n2/k9"])
            })
            .await;
        assert_eq!(st["state"], "InUse", "{st}");

        etcd.delete(&node.kernel_key("k2")).await;
        etcd.delete(&other).await;
        let st = etcd.wait_state(&key, "Trashed").await;
        assert!(st["trashed_at"].is_string(), "{st}");
        assert!(
            st["purge_at"].is_null(),
            "trash: true alone never purges: {st}"
        );
        assert!(!live.exists());
        assert_eq!(
            std::fs::read(in_trash(&node, vf).join("notes.txt")).unwrap(),
            b"my work"
        );

        etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, false))
            .await;
        etcd.wait_state(&key, "Ready").await;
        assert_eq!(std::fs::read(live.join("notes.txt")).unwrap(), b"my work");
        assert!(!in_trash(&node, vf).exists());
        etcd.put(&node.kernel_key("k3"), &kernel(vf)).await;
        etcd.wait_state(&node.kernel_status("k3"), "Ready").await;
        let seen = std::fs::read(node.home("k3").join("mine/notes.txt")).unwrap();
        assert_eq!(seen, b"my work", "a new kernel sees the restored files");
    })
    .await;
}

/// Deleting the record trashes the directory and starts its retention;
/// making the record again before the purge brings the files back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_waits_in_the_trash_and_coming_back_restores_it() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 1h\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        let key = format!("{P}/status/vfolders/{vf}");
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.delete(&format!("{P}/vfolders/{vf}")).await;
        let st = etcd.wait_state(&key, "Trashed").await;
        for field in ["trashed_at", "deleted_at", "purge_at"] {
            assert!(st[field].is_string(), "{field}: {st}");
        }
        assert!(!live.exists());
        assert!(in_trash(&node, vf).join("notes.txt").exists());

        etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, false))
            .await;
        etcd.wait_state(&key, "Ready").await;
        assert_eq!(std::fs::read(live.join("notes.txt")).unwrap(), b"my work");
    })
    .await;
}

/// With a retention of 0s a deleted record's directory is purged, but not
/// while a kernel on another node still wants it; then its status goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_waits_for_a_kernel_on_another_node_then_empties_the_trash() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 0s\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        for i in 0..3000 {
            std::fs::write(live.join(format!("f{i}")), b"x").unwrap();
        }
        let key = format!("{P}/status/vfolders/{vf}");
        let other = format!("{P}/nodes/n2/kernels/k9");
        etcd.put(&other, &kernel(vf)).await;
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.delete(&format!("{P}/vfolders/{vf}")).await;
        let st = etcd.wait_state(&key, "InUse").await;
        assert_eq!(st["kernels"], serde_json::json!(["n2/k9"]), "{st}");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(
            live.join("notes.txt").exists(),
            "nothing deleted while wanted"
        );

        etcd.delete(&other).await;
        wait_gone(&etcd, &key).await;
        assert!(!live.exists());
        let trash: Vec<_> = std::fs::read_dir(node.volumes().join("shard1/.trash"))
            .unwrap()
            .collect();
        assert!(
            trash.is_empty(),
            "the trash is empty after the purge: {trash:?}"
        );
    })
    .await;
}

/// A wiped etcd looks like every record deleted: the safety brake holds
/// trash and purge as it holds unmounts, even with a retention of 0s. Once
/// the operator accepts the new etcd, the deletion is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_etcd_trashes_and_purges_nothing_until_accept_reset() {
    require_private_mount_namespace();
    within(180, async {
        let mut etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 0s\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        let (_vf, live) = vfolder_with_a_file(&etcd, &node).await;
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_for(&format!("{P}/cluster"), "a cluster id", |v| {
            v["id"].is_string()
        })
        .await;
        // Let the node remember the revision it applied (at most once a second).
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

        etcd.stop();
        std::fs::remove_dir_all(etcd.data_dir()).unwrap();
        etcd.restart().await;
        etcd.wait_state(&format!("{P}/status/nodes/n1"), "Held")
            .await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(
            live.join("notes.txt").exists(),
            "a held node trashed or purged a vfolder"
        );

        let out = node.cli(&["accept-reset"]);
        assert!(out.contains("accepts etcd"), "{out}");
        until("the vfolder is purged after accept-reset", 30, || {
            !live.exists()
        })
        .await;
    })
    .await;
}

/// An operator never writes YAML for the lifecycle: `vfolderd vfolder
/// trash|restore|delete|list` do it (trash and restore as a transaction
/// on the record's revision), and a vfolder without a record is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vfolder_verbs_trash_restore_clone_delete_and_list() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 1h\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        etcd.delete(&node.kernel_key("k1")).await;
        let key = format!("{P}/status/vfolders/{vf}");
        let id = vf.to_string();

        node.cli(&["vfolder", "trash", &id]);
        etcd.wait_state(&key, "Trashed").await;
        assert!(!live.exists());
        let list = node.cli(&["vfolder", "list"]);
        let row = list
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(row.contains("mine") && row.contains("Trashed"), "{list}");

        node.cli(&["vfolder", "restore", &id]);
        etcd.wait_state(&key, "Ready").await;
        assert!(live.join("notes.txt").exists());
        let record = etcd.get_json(&format!("{P}/vfolders/{vf}")).await.unwrap();
        assert_eq!(
            record["name"], "mine",
            "the rest of the record is kept: {record}"
        );

        let copy = node.cli(&["vfolder", "clone", &id, "--name", "copy"]);
        let copy: uuid::Uuid = copy.trim().parse().unwrap_or_else(|_| panic!("{copy}"));
        etcd.wait_state(&format!("{P}/status/vfolders/{copy}"), "Ready")
            .await;
        let copied = node.volumes().join("shard1").join(shard(&copy.to_string()));
        assert_eq!(std::fs::read(copied.join("notes.txt")).unwrap(), b"my work");
        let record = etcd
            .get_json(&format!("{P}/vfolders/{copy}"))
            .await
            .unwrap();
        assert_eq!(record["name"], "copy");
        assert_eq!(record["owner"], "alice", "the source's owner: {record}");
        assert_eq!(record["clone_of"], id.as_str());

        node.cli(&["vfolder", "delete", &id]);
        etcd.wait_state(&key, "Trashed").await;
        let list = node.cli(&["vfolder", "list"]);
        let row = list
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(
            row.contains("(deleted)") && row.contains("purge at"),
            "{list}"
        );

        let out = node.cli_output(&["vfolder", "trash", &id]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("has no record"));
    })
    .await;
}

/// Files of vfolder `vf` wherever the lifecycle has it: live, trashed, or
/// being purged (the test makes them flat).
fn files_of(node: &Node, vf: uuid::Uuid) -> usize {
    let hex = vf.simple().to_string();
    let vol = node.volumes().join("shard1");
    [
        vol.join(shard(&vf.to_string())),
        vol.join(".trash").join(&hex),
        vol.join(".trash").join(format!("{hex}.purging")),
    ]
    .iter()
    .filter_map(|d| std::fs::read_dir(d).ok())
    .map(|rd| rd.count())
    .sum()
}

/// Makes `n` records on shard1, waits for their directories, fills each with `files` files.
async fn filled_vfolders(etcd: &Etcd, node: &Node, n: usize, files: usize) -> Vec<uuid::Uuid> {
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::new_v4()).collect();
    for vf in &ids {
        etcd.put(&format!("{P}/vfolders/{vf}"), &record(*vf, false))
            .await;
    }
    for vf in &ids {
        etcd.wait_state(&format!("{P}/status/vfolders/{vf}"), "Ready")
            .await;
        let live = node.volumes().join("shard1").join(shard(&vf.to_string()));
        for i in 0..files {
            std::fs::write(live.join(format!("f{i}")), b"").unwrap();
        }
    }
    ids
}

/// `kill -9` at random moments while records are deleted and purged with a
/// retention of 0s, and while kernels on another node take some of them:
/// after 20 rounds, nothing a kernel wanted lost a file once the daemon had
/// seen the kernel, and every vfolder nobody wants is purged completely (no
/// trash entry, no `.purging` left, no status key): the trash is the
/// journal, and a restarted daemon carries on from it.
/// `CRASH_ROUNDS` and `CRASH_SEED` as in `tests/crash.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_the_in_use_guard_survive_kill_9() {
    require_private_mount_namespace();
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("lifecycle crash loop: {rounds} rounds, CRASH_SEED={seed}");
    let mut below = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    within(600, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 0s\n",
            ..Default::default()
        };
        let mut node = Node::start(&etcd, "n1", opts);
        etcd.put(
            &format!("{P}/volumes/shard1"),
            "mount: {at: requested, fstype: tmpfs, path: t, options: 'size=256m'}\n",
        )
        .await;
        // Wanted all along by a kernel on another node; their records go at once.
        let guarded = filled_vfolders(&etcd, &node, 3, 500).await;
        let mounts: Vec<String> = guarded
            .iter()
            .map(|v| format!("{{vfolder: {v}}}"))
            .collect();
        etcd.put(
            &format!("{P}/nodes/n2/kernels/guard"),
            &format!("mounts: [{}]\n", mounts.join(", ")),
        )
        .await;
        for vf in &guarded {
            etcd.delete(&format!("{P}/vfolders/{vf}")).await;
            etcd.wait_state(&format!("{P}/status/vfolders/{vf}"), "InUse")
                .await;
        }
        let mut released = Vec::new();
        let mut late: Vec<(uuid::Uuid, usize)> = Vec::new();
        let mut partly = 0;
        for round in 0..rounds {
            // One a kernel takes while its purge may be running; two nobody wants.
            let taken = filled_vfolders(&etcd, &node, 1, 40_000).await[0];
            let ids = filled_vfolders(&etcd, &node, 2, 1500).await;
            etcd.delete(&format!("{P}/vfolders/{taken}")).await;
            for vf in &ids {
                etcd.delete(&format!("{P}/vfolders/{vf}")).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20 + below(40))).await;
            etcd.put(&format!("{P}/nodes/n2/kernels/late{round}"), &kernel(taken))
                .await;
            released.extend_from_slice(&ids);
            if round % 2 == 1 {
                // Alive: once it has seen the kernel, the purge stops
                // (before its next batch, not at the end of its time slice).
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                let seen = files_of(&node, taken);
                let purging = node
                    .volumes()
                    .join("shard1/.trash")
                    .join(format!("{}.purging", taken.simple()));
                partly += usize::from(purging.exists());
                tokio::time::sleep(std::time::Duration::from_millis(600)).await;
                assert_eq!(
                    files_of(&node, taken),
                    seen,
                    "round {round}: the purge went on while a kernel wanted it"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(below(400))).await;
            node.kill9();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            late.push((taken, files_of(&node, taken)));
            node.spawn();
            for vf in &guarded {
                assert_eq!(
                    files_of(&node, *vf),
                    500,
                    "round {round}: a wanted vfolder lost files"
                );
            }
        }
        eprintln!(
            "in {partly} of {} live rounds the kernel came while the purge was under way",
            rounds / 2
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        for (vf, files) in &late {
            assert_eq!(
                files_of(&node, *vf),
                *files,
                "a vfolder lost files after its kernel was seen"
            );
        }
        for vf in &released {
            wait_gone(&etcd, &format!("{P}/status/vfolders/{vf}")).await;
            assert_eq!(files_of(&node, *vf), 0, "{vf} orphaned");
        }
        // Let go of the late ones and the guarded ones: all purged, nothing left.
        for round in 0..rounds {
            etcd.delete(&format!("{P}/nodes/n2/kernels/late{round}"))
                .await;
        }
        etcd.delete(&format!("{P}/nodes/n2/kernels/guard")).await;
        for vf in late.iter().map(|(v, _)| v).chain(&guarded) {
            wait_gone(&etcd, &format!("{P}/status/vfolders/{vf}")).await;
        }
        let left: Vec<_> = std::fs::read_dir(node.volumes().join("shard1/.trash"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "the trash is not empty: {left:?}");
    })
    .await;
}

/// A record deleted while no storage node watched (the node rebooted and
/// lost its store, so nothing remembers the record): the directory is found
/// by the sweep at start and goes to the trash with its whole retention
/// ahead, never straight to a purge, and never left behind unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_deleted_while_no_storage_node_watched_is_found_and_trashed_and_a_clones_leftovers_purged(
) {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 1h\n",
            ..Default::default()
        };
        let mut node = Node::start(&etcd, "n1", opts);
        let share = node.dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let spec = format!(
            "mount: {{at: requested, fstype: bind, path: {}}}\n",
            share.display()
        );
        etcd.put(&format!("{P}/volumes/shard1"), &spec).await;
        let vf = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, false))
            .await;
        let key = format!("{P}/status/vfolders/{vf}");
        etcd.wait_state(&key, "Ready").await;
        let live = node.volumes().join("shard1").join(shard(&vf.to_string()));
        std::fs::write(live.join("notes.txt"), b"my work").unwrap();

        assert!(node.stop());
        etcd.delete(&format!("{P}/vfolders/{vf}")).await;
        // A reboot with a lost store: nothing mounted, nothing remembered.
        let flags = nix::mount::MntFlags::MNT_DETACH;
        nix::mount::umount2(&node.volumes().join("shard1"), flags).unwrap();
        std::fs::remove_dir_all(node.dir.path().join("state/db")).unwrap();
        // And a clone that was under way when its record went: its staging
        // directory is a partial copy nothing will finish.
        let gone = uuid::Uuid::new_v4().simple().to_string();
        let staging = share.join(".clone").join(&gone);
        std::fs::create_dir_all(staging.join("sub")).unwrap();
        std::fs::write(staging.join("sub/part.bin"), b"half a copy").unwrap();
        node.spawn();
        let st = etcd.wait_state(&key, "Trashed").await;
        assert!(
            st["deleted_at"].is_string() && st["purge_at"].is_string(),
            "{st}"
        );
        assert!(!live.exists());
        assert!(in_trash(&node, vf).join("notes.txt").exists());
        let purging = share.join(".trash").join(format!("{gone}.purging"));
        until("the leftover staging purged", 30, || {
            !staging.exists() && !purging.exists()
        })
        .await;
        assert!(
            in_trash(&node, vf).join("notes.txt").exists(),
            "the retention still holds for the vfolder"
        );
    })
    .await;
}

/// `clone_of` fills a new vfolder from another, on the same volume and
/// across volumes: contents, modes, mtimes and symlinks (recreated, never
/// followed), the files owned by the target volume's owner; the directory
/// appears only once whole, and a kernel then sees the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_copies_a_vfolder_on_its_volume_and_across_volumes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let (src, live) = vfolder_with_a_file(&etcd, &node).await;
        std::fs::create_dir(live.join("sub")).unwrap();
        let f = live.join("sub/data.csv");
        std::fs::write(&f, b"a,b\n1,2\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", live.join("evil")).unwrap();
        for i in 0..300 {
            std::fs::write(live.join(format!("n{i}")), b"x").unwrap();
        }
        etcd.put(
            &format!("{P}/volumes/shard2"),
            "mount: {at: requested, fstype: tmpfs, path: t2, options: 'size=16m'}\nuid: 2000\ngid: 2000\n",
        )
        .await;
        for (vol, owner) in [("shard1", 1000), ("shard2", 2000)] {
            let copy = uuid::Uuid::new_v4();
            let rec = format!("{{name: copy, owner: bob, volume: {vol}, clone_of: {src}}}\n");
            etcd.put(&format!("{P}/vfolders/{copy}"), &rec).await;
            let st = etcd.wait_state(&format!("{P}/status/vfolders/{copy}"), "Ready").await;
            assert_eq!(st["node"], "n1", "{st}");
            let dir = node.volumes().join(vol).join(shard(&copy.to_string()));
            assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"my work");
            let m = std::fs::metadata(dir.join("sub/data.csv")).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o640, "{vol}");
            assert_eq!(m.mtime(), 1_600_000_000, "{vol}");
            assert_eq!((m.uid(), m.gid()), (owner, owner), "{vol}");
            assert_eq!(std::fs::read_link(dir.join("evil")).unwrap(), std::path::Path::new("/etc/shadow"));
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 303, "{vol}");
            let k = format!("c{vol}");
            etcd.put(&node.kernel_key(&k), &format!("{{mounts: [{{vfolder: {copy}}}], uid: {owner}, gid: {owner}}}\n")).await;
            etcd.wait_state(&node.kernel_status(&k), "Ready").await;
            let seen = std::fs::read(node.home(&k).join("copy/sub/data.csv")).unwrap();
            assert_eq!(seen, b"a,b\n1,2\n");
        }
        assert_eq!(std::fs::read(live.join("notes.txt")).unwrap(), b"my work", "the source is untouched");
    })
    .await;
}

/// On a filesystem that can (a loop-mounted btrfs here), a clone shares the
/// source's extents (`FICLONE`): a 32 MiB vfolder clones without using
/// 32 MiB more of the disk, as `statvfs` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_on_btrfs_is_a_reflink_and_costs_no_space() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let fs = btrfs_volume(&etcd, &node, false).await;
        let src = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/vfolders/{src}"), &record(src, false))
            .await;
        etcd.wait_state(&format!("{P}/status/vfolders/{src}"), "Ready")
            .await;
        let live = node.volumes().join("shard1").join(shard(&src.to_string()));
        let big: Vec<u8> = (0..32u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(live.join("weights.bin"), &big).unwrap();
        let free = || {
            nix::unistd::sync();
            let st = nix::sys::statvfs::statvfs(&fs).unwrap();
            st.blocks_available() as u64 * st.fragment_size() as u64
        };
        let before = free();
        let copy = uuid::Uuid::new_v4();
        let rec = format!("{{name: copy, owner: bob, volume: shard1, clone_of: {src}}}\n");
        etcd.put(&format!("{P}/vfolders/{copy}"), &rec).await;
        etcd.wait_state(&format!("{P}/status/vfolders/{copy}"), "Ready")
            .await;
        let dir = node.volumes().join("shard1").join(shard(&copy.to_string()));
        assert!(
            std::fs::read(dir.join("weights.bin")).unwrap() == big,
            "the clone differs"
        );
        let used = before.saturating_sub(free());
        assert!(
            used < 8 << 20,
            "the clone used {used} bytes: copied, not reflinked"
        );
    })
    .await;
}

/// The per-volume metrics an operator graphs and alerts on (issue 14 item
/// 3): size and free space of the volume, what its vfolders hold, how many
/// are in each state and over quota, how long scans take; labels are the
/// volume and the state only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_metrics_say_size_usage_states_and_quota() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        std::fs::write(live.join("big"), vec![1u8; 2 << 20]).unwrap();
        let rec = "{name: mine, owner: alice, volume: shard1, quota_bytes: 1048576}\n";
        etcd.put(&format!("{P}/vfolders/{vf}"), rec).await;
        etcd.wait_state(&format!("{P}/status/vfolders/{vf}"), "OverQuota")
            .await;
        let other = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/vfolders/{other}"), &record(other, true))
            .await;
        etcd.wait_state(&format!("{P}/status/vfolders/{other}"), "Trashed")
            .await;
        let m = |s: &str| node.metric_now(s);
        let v = "{volume=\"shard1\"}";
        until("the volume's metrics", 30, || {
            m("vfolderd_vfolders{state=\"Trashed\",volume=\"shard1\"}") == Some(1.0)
                && m(&format!("vfolderd_vfolders_over_quota{v}")) == Some(1.0)
                && m(&format!("vfolderd_volume_capacity_bytes{v}")).is_some()
        })
        .await;
        assert_eq!(
            m("vfolderd_vfolders{state=\"OverQuota\",volume=\"shard1\"}"),
            Some(1.0)
        );
        assert_eq!(
            m(&format!("vfolderd_volume_capacity_bytes{v}")),
            Some((16u64 << 20) as f64)
        );
        let free = m(&format!("vfolderd_volume_free_bytes{v}")).unwrap();
        assert!(free <= (14u64 << 20) as f64, "free {free}");
        let used = m(&format!("vfolderd_volume_used_bytes{v}")).unwrap();
        assert!(used >= (2u64 << 20) as f64, "used {used}");
        assert!(m("vfolderd_usage_scan_duration_seconds_count").unwrap() >= 1.0);
        let text = node.metrics();
        assert!(!text.contains(&vf.to_string()), "a per-vfolder label");
    })
    .await;
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop-mounted 256 MiB btrfs (quotas enabled if asked, as an operator
/// would with `btrfs quota enable`), served as the bind volume `shard1`.
/// It lies in the node's directory: the node's drop unmounts it (and the
/// loop device goes with it).
async fn btrfs_volume(etcd: &Etcd, node: &Node, quotas: bool) -> PathBuf {
    let img = node.dir.path().join("btrfs.img");
    let fs = node.dir.path().join("btrfs");
    std::fs::create_dir(&fs).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    run("mkfs.btrfs", &["-q".as_ref(), img.as_os_str()]);
    // `-o loop` lets util-linux set autoclear: the loop device goes with the mount.
    let (o, lo) = ("-o".as_ref(), "loop".as_ref());
    run("mount", &[o, lo, img.as_os_str(), fs.as_os_str()]);
    if quotas {
        run(
            "btrfs",
            &["quota".as_ref(), "enable".as_ref(), fs.as_os_str()],
        );
    }
    let spec = format!(
        "mount: {{at: requested, fstype: bind, path: {}}}\n",
        fs.display()
    );
    etcd.put(&format!("{P}/volumes/shard1"), &spec).await;
    etcd.wait_state(&node.volume_status("shard1"), "Mounted")
        .await;
    fs
}

/// On a btrfs volume with quotas enabled each new vfolder is a subvolume
/// with a qgroup limit: the kernel's user cannot write past `quota_bytes`
/// (EDQUOT), the status says `quota: enforced` with the qgroup's bytes,
/// and raising `quota_bytes` lets the same write through, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_on_btrfs_is_enforced_and_changes_live() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        btrfs_volume(&etcd, &node, true).await;
        let vf = uuid::Uuid::new_v4();
        let rec =
            |q: u64| format!("{{name: mine, owner: alice, volume: shard1, quota_bytes: {q}}}\n");
        etcd.put(&format!("{P}/vfolders/{vf}"), &rec(1 << 20)).await;
        etcd.put(&node.kernel_key("k1"), &kernel(vf)).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let big = node.home("k1").join("mine/big");
        let write = || {
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=1000",
                    "--regid=1000",
                    "--clear-groups",
                    "dd",
                    "if=/dev/zero",
                    "bs=1M",
                    "count=3",
                    "conv=fsync",
                ])
                .arg(format!("of={}", big.display()))
                .output()
                .unwrap()
        };
        let out = write();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains("quota exceeded"),
            "{err}"
        );
        let key = format!("{P}/status/vfolders/{vf}");
        let st = etcd
            .wait_for(&key, "enforced, with the qgroup's bytes", |v| {
                v["quota"] == "enforced"
                    && v["bytes"].as_u64().is_some_and(|b| b > 0 && b <= 1 << 20)
            })
            .await;
        assert_eq!(st["quota_bytes"], 1 << 20, "{st}");

        etcd.put(&format!("{P}/vfolders/{vf}"), &rec(8 << 20)).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !write().status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "the raised quota never applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 3 << 20);
    })
    .await;
}

/// A record made again once its purge has started gets a fresh, empty
/// directory at once (the purged files never come back), and the purge
/// still finishes beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_made_again_during_its_purge_gets_a_fresh_directory() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            extra_config: "trash_retention: 0s\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        etcd.put(
            &format!("{P}/volumes/shard1"),
            "mount: {at: requested, fstype: tmpfs, path: t, options: 'size=256m'}\n",
        )
        .await;
        let vf = filled_vfolders(&etcd, &node, 1, 300_000).await[0];
        let key = format!("{P}/status/vfolders/{vf}");
        let purging = node
            .volumes()
            .join("shard1/.trash")
            .join(format!("{}.purging", vf.simple()));
        etcd.delete(&format!("{P}/vfolders/{vf}")).await;
        until("the purge starts", 30, || purging.exists()).await;
        // The status says so too: the `Ready` awaited below is the new
        // record's, not the old one's still in etcd (under load the status
        // write may come after the purge started).
        etcd.wait_for(&key, "no longer the old Ready", |v| v["state"] != "Ready")
            .await;
        etcd.put(&format!("{P}/vfolders/{vf}"), &record(vf, false))
            .await;
        let st = etcd.wait_state(&key, "Ready").await;
        let live = node.volumes().join("shard1").join(shard(&vf.to_string()));
        let old = std::fs::read_dir(&live).unwrap().count();
        assert_eq!(old, 0, "the purged files came back: {st}");
        until("the purge finishes beside the record", 60, || {
            !purging.exists()
        })
        .await;
        assert!(live.exists(), "the fresh directory stays");
        etcd.wait_state(&key, "Ready").await;
    })
    .await;
}

/// The storage node leading `volume` now (the oldest candidate's value).
async fn leader_of(etcd: &Etcd, volume: &str) -> Option<String> {
    let prefix = format!("{P}/leaders/volumes/{volume}/");
    let resp = etcd
        .client()
        .await
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .min_by_key(|kv| kv.create_revision())
        .map(|kv| kv.value_str().unwrap().to_string())
}

/// Every event under `P/` from `from` up to a marker put now, in order.
async fn history(etcd: &Etcd, from: i64) -> Vec<etcd_client::Event> {
    let marker = format!("{P}/test-end");
    etcd.put(&marker, "x").await;
    let mut c = etcd.client().await;
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(from);
    let mut stream = c.watch(format!("{P}/"), Some(opts)).await.unwrap();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        for e in r.events() {
            let key = e.kv().map(|kv| kv.key_str().unwrap().to_string());
            if key.as_deref() == Some(marker.as_str()) {
                return out;
            }
            out.push(e.clone());
        }
    }
    panic!("the watch ended before the marker");
}

/// Issue 14 item 6: three storage nodes, each in a mount namespace of its
/// own (as on three hosts), serve one volume (a bind of one shared tmpfs).
/// One is elected and does all of that volume's directory work. 500
/// vfolders are made; 40 of them, 2,500 files each, are deleted, and the
/// leader is killed with SIGKILL while it purges them. Another node takes
/// over once the dead leader's lease expires and finishes the purge from
/// the trash as it was left. Every vfolder directory was made exactly once
/// (the daemons' logs), and at every revision each vfolder status key was
/// written only by the node that led its volume at that revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_storage_nodes_elect_one_writer_per_volume_and_a_killed_leaders_purge_finishes() {
    require_private_mount_namespace();
    within(300, async {
        let etcd = Etcd::start().await;
        let shared = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m", "vfolderd-shared"])
            .arg(shared.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount the shared tmpfs");
        let from = etcd
            .client()
            .await
            .get("x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let opts = || NodeOpts {
            roles: "[storage]",
            own_namespace: true,
            extra_config: "trash_retention: 0s\n",
            ..Default::default()
        };
        let mut nodes: Vec<Node> = ["s1", "s2", "s3"]
            .iter()
            .map(|n| Node::start(&etcd, n, opts()))
            .collect();
        etcd.put(
            &format!("{P}/volumes/shared"),
            &format!(
                "mount: {{at: requested, fstype: bind, path: '{}'}}\n",
                shared.path().display()
            ),
        )
        .await;
        let ids: Vec<uuid::Uuid> = (0..500).map(|_| uuid::Uuid::new_v4()).collect();
        let mut c = etcd.client().await;
        for chunk in ids.chunks(100) {
            let puts: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|id| {
                    let v = "{name: f, owner: alice, volume: shared}\n";
                    etcd_client::TxnOp::put(format!("{P}/vfolders/{id}"), v, None)
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(puts)).await.unwrap();
        }
        let statuses = format!("{P}/status/vfolders/");
        let ready = || async {
            etcd.dump(&statuses)
                .await
                .iter()
                .filter(|(_, v)| v.contains("\"state\":\"Ready\""))
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while ready().await < ids.len() {
            assert!(std::time::Instant::now() < deadline, "not all 500 Ready");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let dir = |id: &uuid::Uuid| shared.path().join(shard(&id.to_string()));
        assert!(ids.iter().all(|id| dir(id).is_dir()));
        let doomed = &ids[..40];
        for id in doomed {
            for i in 0..2500 {
                std::fs::write(dir(id).join(format!("f{i}")), b"x").unwrap();
            }
        }
        // One that stays, with data its leader has scanned.
        let kept = ids[40];
        std::fs::write(dir(&kept).join("data.bin"), vec![7u8; 1000]).unwrap();
        etcd.wait_for(&format!("{statuses}{kept}"), "scanned", |v| {
            v["bytes"] == 1000
        })
        .await;
        let leader = leader_of(&etcd, "shared").await.expect("a leader");
        let deletes: Vec<etcd_client::TxnOp> = doomed
            .iter()
            .map(|id| etcd_client::TxnOp::delete(format!("{P}/vfolders/{id}"), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(deletes))
            .await
            .unwrap();
        let trash = shared.path().join(".trash");
        let purging = || {
            std::fs::read_dir(&trash)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".purging"))
        };
        until("a purge under way", 60, purging).await;
        let dead = nodes.iter().position(|n| n.name == leader).unwrap();
        nodes[dead].kill9();
        let files_left: usize = doomed
            .iter()
            .map(|id| {
                let p = trash.join(format!("{}.purging", id.simple()));
                std::fs::read_dir(p).map_or(0, |d| d.count())
            })
            .sum();
        eprintln!("leader {leader} killed with {files_left} files left in purging directories");

        // Another node takes over and finishes the purge.
        for id in doomed {
            let key = format!("{statuses}{id}");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while etcd.get_json(&key).await.is_some() {
                assert!(std::time::Instant::now() < deadline, "{key} is still there");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let left: Vec<_> = std::fs::read_dir(&trash)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "the trash is not empty: {left:?}");
        let next = leader_of(&etcd, "shared").await.expect("a new leader");
        assert_ne!(next, leader, "the dead node still leads");
        for id in &ids[40..] {
            assert!(dir(id).is_dir(), "{id} lost its directory");
        }
        assert_eq!(ready().await, ids.len() - doomed.len());

        // Every vfolder directory made exactly once, by one node.
        let mut made: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for n in &nodes {
            for line in n
                .log()
                .lines()
                .filter(|l| l.contains("vfolder directory made"))
            {
                let hex = ids
                    .iter()
                    .map(|id| id.simple().to_string())
                    .find(|h| line.contains(h.as_str()));
                made.entry(hex.expect("a vfolder of the test"))
                    .or_default()
                    .push(n.name.clone());
            }
        }
        assert_eq!(made.len(), ids.len(), "every vfolder directory made");
        let twice: Vec<_> = made.iter().filter(|(_, by)| by.len() > 1).collect();
        assert!(twice.is_empty(), "made more than once: {twice:?}");

        // One writer per status key: its volume's leader at that revision.
        let mut candidates: std::collections::BTreeMap<String, (i64, String)> = Default::default();
        let mut writers: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let kept_key = format!("{statuses}{kept}");
        let mut kept_scanned = false;
        let leaders = format!("{P}/leaders/volumes/shared/");
        for e in history(&etcd, from).await {
            let kv = e.kv().unwrap();
            let key = kv.key_str().unwrap().to_string();
            let put = e.event_type() == etcd_client::EventType::Put;
            if key.starts_with(&leaders) {
                if put {
                    let value = kv.value_str().unwrap().to_string();
                    candidates.insert(key, (kv.create_revision(), value));
                } else {
                    candidates.remove(&key);
                }
            } else if key.starts_with(&statuses) && put {
                let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                let by = v["node"].as_str().unwrap().to_string();
                let now = candidates.values().min().map(|(_, n)| n.clone());
                assert_eq!(
                    now.as_deref(),
                    Some(by.as_str()),
                    "{key} written at revision {} by {by}, not by the leader",
                    kv.mod_revision()
                );
                if key == kept_key {
                    // Unknown until the new leader scans it, never "0 bytes".
                    assert!(
                        !(kept_scanned && v["bytes"] == 0),
                        "{key} said 0 bytes after a takeover: {v}"
                    );
                    kept_scanned |= v["bytes"] == 1000;
                }
                let w = writers.entry(key).or_default();
                if w.last() != Some(&by) {
                    w.push(by);
                }
            }
        }
        assert!(writers.len() >= ids.len(), "every status written");
        let handed: Vec<_> = writers.values().filter(|w| w.len() > 1).collect();
        eprintln!(
            "{} status keys changed hands once, with the leadership",
            handed.len()
        );
        assert!(handed.iter().all(|w| w.len() == 2 && w[0] == leader));
        drop(nodes);
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(shared.path())
            .status();
    })
    .await;
}

/// A volume the lifecycle cannot read (its FUSE daemon frozen, as a hard NFS
/// mount whose server is gone would be) holds up only itself: the round
/// stuck in it is left behind after its limit, and another volume's record,
/// deleted meanwhile, is still trashed and purged. The prober is slowed so
/// that nothing else notices the hang first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_volume_holds_up_only_its_own_lifecycle() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            helper_double: true,
            mount_timeout: "2s",
            extra_config: "probe_interval: 600s\nprobe_timeout: 1s\ntrash_retention: 0s\n",
            ..Default::default()
        };
        let node = Node::start(&etcd, "n1", opts);
        std::fs::write(node.dir.path().join("helper-fuse"), "").unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: requested, fstype: nfs, path: 'fuse.example:/data'}\n",
        )
        .await;
        let (vf, live) = vfolder_with_a_file(&etcd, &node).await;
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_state(&node.volume_status("nfs1"), "Mounted")
            .await;
        let target = node.volumes().join("nfs1");
        let pid = rclone_for(&target).expect("rclone serves the volume").0;
        let frozen = Frozen::stop(pid);
        // Past rclone's attribute cache: every look into nfs1 now hangs.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        // The worker wakes, looks at nfs1 first (by name) and hangs there.
        etcd.delete(&format!("{P}/vfolders/{vf}")).await;
        // Meanwhile the status says what is going on, rather than vanishing.
        let key = format!("{P}/status/vfolders/{vf}");
        etcd.wait_for(&key, "Pending: moving to the trash", |v| {
            v["state"] == "Pending"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("record deleted"))
        })
        .await;
        let purged = || {
            let trash = node.volumes().join("shard1/.trash");
            let hex = vf.simple().to_string();
            !live.exists()
                && std::fs::read_dir(&trash)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .all(|e| !e.file_name().to_string_lossy().starts_with(&hex))
        };
        until("shard1's purge, with nfs1 hung", 120, purged).await;
        wait_gone(&etcd, &format!("{P}/status/vfolders/{vf}")).await;
        assert!(node.log().contains("the lifecycle is stuck in this volume"));
        drop(frozen);
    })
    .await;
}
