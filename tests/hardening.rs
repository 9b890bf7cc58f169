//! Issue "No single put, dead volume or etcd accident takes a node down or
//! takes mounts away": each test reproduces one way a single value or
//! mishap stopped a node or took mounts from running kernels.

mod common;

use std::time::Duration;

use common::*;

fn kernel_yaml(vfolder: &uuid::Uuid) -> String {
    format!("mounts: [{{vfolder: {vfolder}}}]\n")
}

/// Item 1: `fstype: "é="` made `redact` panic inside the desired-state lock;
/// one `etcdctl put` took the daemon down, and after a restart the watcher
/// died silently. Now the value is Rejected and everything else converges,
/// across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_put_with_a_multibyte_character_before_an_equals_sign_kills_no_node() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = ready_kernel_with_a_folder(&etcd, &node, "k1").await;

        let bad = "mount: {at: startup, fstype: \"é=\", path: \"ü=x password=hunter2\"}\n";
        etcd.put(&format!("{P}/volumes/bad"), bad).await;
        let status_key = node.volume_status("bad");
        let v = etcd.wait_state(&status_key, "Rejected").await;
        assert!(!v.to_string().contains("hunter2"), "{v}");
        // The node lives on and keeps converging new kernels.
        etcd.put(&node.kernel_key("k2"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        assert!(node.running(), "the daemon died: {}", node.log());
        let (code, _) = http_get(&node.listen, "/healthz");
        assert_eq!(code, 200);

        // A restart lists the same value first thing: still alive, still ready.
        assert!(node.stop());
        node.spawn();
        etcd.put(&node.kernel_key("k3"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k3"), "Ready").await;
        until("readyz says ready after the restart", 30, || {
            http_get(&node.listen, "/readyz").0 == 200
        })
        .await;
        assert!(
            node.running(),
            "the daemon died after a restart: {}",
            node.log()
        );
        assert!(!node.log().contains("hunter2"), "a secret reached the log");
    })
    .await;
}

/// Item 2: a typo in a startup dataset's YAML unmounted its bind from every
/// running kernel. The dataset stays in running kernels' homes (and its
/// volume stays mounted for them) until the value is fixed or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_startup_volume_keeps_its_binds_in_running_kernels() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        etcd.put(&format!("{P}/volumes/ds"), &tmpfs_volume("startup"))
            .await;
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let bind = node.home("k1").join("ds");
        until("the dataset is bound into k1", 20, || {
            mounts_under(&node.kernels())
                .iter()
                .any(|m| m.mount_point == bind)
        })
        .await;

        let typo = "mount: {at: startup, fstype: tmpfs, path: vfolderd-test, colour: red}\n";
        etcd.put(&format!("{P}/volumes/ds"), typo).await;
        let v = etcd.wait_state(&node.volume_status("ds"), "Rejected").await;
        assert!(v.to_string().contains("colour"), "{v}");
        // Several whole passes (resync is 1 s) and a kernel event later...
        etcd.put(&node.kernel_key("k2"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mounts = mounts_under(node.dir.path());
        assert!(
            mounts.iter().any(|m| m.mount_point == bind),
            "k1 lost its dataset: {:?}",
            mounts.iter().map(|m| &m.mount_point).collect::<Vec<_>>()
        );
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_point == node.volumes().join("ds")),
            "the dataset's volume was unmounted under k1"
        );
        // Deleting the kernel still takes its bind away.
        etcd.delete(&node.kernel_key("k1")).await;
        until("k1's bind goes with k1", 20, || {
            !mounts_under(&node.kernels())
                .iter()
                .any(|m| m.mount_point == bind)
        })
        .await;
    })
    .await;
}

/// Item 3: the first list read all desired ranges in one response under
/// gRPC's 4 MiB limit, so ~20,000 vfolder records (or a few large rejected
/// values) kept every node from becoming ready; a delete of many keys with
/// `prev_kv` made the watch resume at the same revision forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_32_mib_of_desired_state_lists_watches_and_survives_a_mass_delete() {
    use etcd_client::{Txn, TxnOp};
    require_private_mount_namespace();
    within(300, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        assert!(node.stop());

        // 36 values of 1 MiB (each rejected as too large) and 20,000 small
        // vfolder records: ~38 MiB under the desired prefixes.
        let mut c = etcd.client().await;
        let big = "x".repeat(1 << 20);
        for i in 0..36 {
            let key = format!("{P}/vfolders/{}", uuid::Uuid::from_u128(0xb16_0000 + i));
            c.put(key, big.as_str(), None).await.unwrap();
        }
        let small: Vec<TxnOp> = (0..20_000u128)
            .map(|i| {
                let key = format!("{P}/vfolders/{}", uuid::Uuid::from_u128(0x5_0000_0000 + i));
                TxnOp::put(
                    key,
                    format!("{{name: f{i}, owner: o{i}, volume: data}}"),
                    None,
                )
            })
            .collect();
        for chunk in small.chunks(128) {
            c.txn(Txn::new().and_then(chunk.to_vec())).await.unwrap();
        }

        // A restart lists all of it (in pages), and the node becomes ready.
        node.spawn();
        until("readyz after listing 38 MiB", 120, || {
            http_get(&node.listen, "/readyz").0 == 200
        })
        .await;
        etcd.put(&node.kernel_key("k2"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        let big_status = format!("{P}/status/vfolders/{}", uuid::Uuid::from_u128(0xb16_0000));
        let v = etcd.wait_state(&big_status, "Rejected").await;
        assert!(v.to_string().contains("bytes"), "{v}");

        // One delete of every record but the used one: the watch carries on.
        c.delete(
            format!("{P}/vfolders/0"),
            Some(etcd_client::DeleteOptions::new().with_range(format!("{P}/vfolders/{id}"))),
        )
        .await
        .unwrap();
        c.delete(
            format!("{P}/vfolders/{}", uuid::Uuid::from_u128(id.as_u128() + 1)),
            Some(etcd_client::DeleteOptions::new().with_range(format!("{P}/vfolders0"))),
        )
        .await
        .unwrap();
        etcd.put(&node.kernel_key("k3"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k3"), "Ready").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while etcd.get_json(&big_status).await.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "deleted records' statuses stayed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(node.running(), "{}", node.log());
        assert!(
            !node.log().contains("decoded message length too large"),
            "a message size limit was hit"
        );
    })
    .await;
}

/// Item 9: mountinfo was read as UTF-8, so one mount (any user's FUSE mount)
/// with a non-UTF-8 byte in its path made every read, so every pass, fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_mount_with_a_non_utf8_path_stops_no_pass() {
    use std::os::unix::ffi::OsStrExt;
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let odd = node
            .dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"caf\xe9 mount"));
        std::fs::create_dir_all(&odd).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &odd,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        assert!(
            !node.log().contains("stream did not contain valid UTF-8"),
            "{}",
            node.log()
        );
        nix::mount::umount2(&odd, nix::mount::MntFlags::MNT_DETACH).unwrap();
    })
    .await;
}

/// Item 12: a damaged sled store was fatal at start. Now it is moved aside,
/// the node rebuilds (adopting the mounts at its own targets, stacking
/// nothing), and a store that is merely locked by another process is told
/// apart: refused with a clear error, never moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_moved_aside_and_rebuilt_and_a_locked_one_is_not() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        let bind = node.home("k1").join("mine");
        std::fs::write(bind.join("notebook.ipynb"), "{}").unwrap();
        assert!(node.stop());

        // Locked: an operator command holds the store. Refused, not moved.
        let db = node.dir.path().join("state").join("db");
        {
            let _held = vfolderd::state::ledger::Ledger::open(&db).unwrap();
            node.spawn();
            until("the daemon refuses a locked store", 30, || !node.running()).await;
            assert!(
                node.log().contains("locked by another process"),
                "{}",
                node.log()
            );
        }
        let siblings = || {
            std::fs::read_dir(db.parent().unwrap())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
                .count()
        };
        assert_eq!(siblings(), 0, "a locked store was treated as damaged");

        // Damaged: every file of the store overwritten with garbage.
        for e in walk(&db) {
            std::fs::write(&e, vec![0xa5u8; 4096]).unwrap();
        }
        node.spawn();
        etcd.put(&node.kernel_key("k2"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        let v = etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        assert!(v["error"].is_null(), "{v}");
        assert!(node.running(), "{}", node.log());
        assert_eq!(siblings(), 1, "the damaged store was not moved aside");
        assert!(node.log().contains("moved aside"), "{}", node.log());
        let at_bind = node
            .mounts()
            .iter()
            .filter(|m| m.mount_point == bind)
            .count();
        assert_eq!(at_bind, 1, "a second bind was stacked on k1's folder");
        assert!(bind.join("notebook.ipynb").exists());
        // The adopted bind and home are vfolderd's again: deleting k1 takes
        // both away (an unowned home mount would stay forever).
        let home = node.home("k1");
        let home_mounted = || {
            node.structure_mounts()
                .iter()
                .any(|m| m.mount_point == home)
        };
        assert!(home_mounted(), "k1's home is its own mount");
        etcd.delete(&node.kernel_key("k1")).await;
        until("k1's adopted bind is unmounted", 20, || {
            !node.mounts().iter().any(|m| m.mount_point == bind)
        })
        .await;
        until("k1's adopted home is unmounted", 20, || !home_mounted()).await;
    })
    .await;
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Item 4: any successful list was authoritative, so a wiped etcd (or one
/// restored from an old backup) tore down every bind and volume on every
/// node. Now the node holds: nothing is torn down, node status says `Held`
/// and `/readyz` says why, until `vfolderd accept-reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_etcd_tears_nothing_down_until_accept_reset() {
    require_private_mount_namespace();
    within(180, async {
        let mut etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        ready_kernel_with_a_folder(&etcd, &node, "k1").await;
        // The storage role wrote the cluster id.
        let cluster = etcd
            .wait_for(&format!("{P}/cluster"), "a cluster id", |v| {
                v["id"].is_string()
            })
            .await;
        let bind = node.home("k1").join("mine");
        std::fs::write(bind.join("work.txt"), "precious").unwrap();
        // Let the node remember the revision it applied (at most once a second).
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // etcd is wiped: same address, empty data.
        etcd.stop();
        std::fs::remove_dir_all(etcd.data_dir()).unwrap();
        etcd.restart().await;
        let status = format!("{P}/status/nodes/n1");
        let v = etcd.wait_state(&status, "Held").await;
        assert!(v["reason"].to_string().contains("no cluster id"), "{v}");
        let (code, body) = http_get(&node.listen, "/readyz");
        assert_eq!(code, 503);
        assert!(body.contains("safety brake"), "{body}");
        // Several whole passes later, everything is still there.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(node.mount_at(&bind).is_some(), "k1 lost its folder");
        assert_eq!(
            std::fs::read_to_string(bind.join("work.txt")).unwrap(),
            "precious"
        );
        assert!(node.mount_at(&node.volumes().join("data")).is_some());

        // The operator accepts the new etcd: the (empty) desired state rules.
        let out = node.cli(&["accept-reset"]);
        assert!(out.contains("accepts etcd"), "{out}");
        until("k1's bind is taken down after accept-reset", 30, || {
            node.mount_at(&bind).is_none()
        })
        .await;
        etcd.wait_state(&status, "Running").await;
        assert_ne!(
            etcd.get_json(&format!("{P}/cluster")).await.unwrap()["id"],
            cluster["id"],
            "a new cluster id for the new etcd"
        );
    })
    .await;
}

/// Item 5: a pass touching a hung volume (a hard NFS mount, a frozen FUSE
/// daemon) put the whole loop to sleep in the kernel while `/healthz` said
/// 200. Now looks below a volume run on their own threads with a timeout: the
/// hung volume's new kernels wait (`Pending`, naming it), every other kernel
/// keeps converging, and the waiting ones attach once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_fuse_volume_stalls_only_the_kernels_that_need_it() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                helper_double: true,
                mount_timeout: "2s",
                extra_config: "probe_interval: 300ms\nprobe_timeout: 1s\n",
                ..Default::default()
            },
        );
        std::fs::write(node.dir.path().join("helper-fuse"), "").unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: requested, fstype: nfs, path: 'fuse.example:/data'}\n",
        )
        .await;
        let on_nfs = uuid::Uuid::new_v4();
        etcd.put(
            &format!("{P}/vfolders/{on_nfs}"),
            "{name: data, owner: alice, volume: nfs1}\n",
        )
        .await;
        etcd.put(&node.kernel_key("k1"), &kernel_yaml(&on_nfs))
            .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

        let target = node.volumes().join("nfs1");
        let pid = rclone_for(&target).expect("rclone serves the volume").0;
        let frozen = Frozen::stop(pid);
        // Past rclone's attribute cache (1 s), every look below it needs the
        // frozen daemon. A new kernel on it may wait (Pending, naming it)...
        tokio::time::sleep(Duration::from_secs(2)).await;
        etcd.put(&node.kernel_key("k2"), &kernel_yaml(&on_nfs))
            .await;
        // ...while kernels on other volumes converge, through whole passes too.
        ready_kernel_with_a_folder(&etcd, &node, "k3").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        etcd.put(&node.kernel_key("k4"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k4"), "Ready").await;
        assert_eq!(http_get(&node.listen, "/healthz").0, 200);
        assert_eq!(
            etcd.get_json(&node.kernel_status("k1")).await.unwrap()["state"],
            "Ready",
            "k1 keeps its bind"
        );
        let k2 = etcd.get_json(&node.kernel_status("k2")).await;
        let k2_state = k2
            .as_ref()
            .map(|v| v["state"].to_string())
            .unwrap_or_default();
        assert!(
            !k2_state.contains("Failed") && !k2_state.contains("Rejected"),
            "k2 must wait, not fail: {k2:?}"
        );
        // The volume answers again: k2 attaches.
        drop(frozen);
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
    })
    .await;
}

/// Item 7: the prober's verdicts were keyed by mountinfo's mount id, which
/// the kernel reuses at once (the lowest free id): a volume remounted at
/// the same point (a heal) usually got the id of the mount it replaced, so
/// a probe of the old mount returning after the heal judged the new one
/// (a second heal; under `heal: always`, binds detached under running
/// kernels). With the unique ids of `statmount` no verdict outlives its mount.
#[test]
fn a_verdict_about_a_replaced_mount_never_lands_on_its_replacement() {
    use std::collections::BTreeMap;
    use vfolderd::reconcile::actual::{MountInfoSource, ProcMountInfo};
    use vfolderd::reconcile::mountapi::StatmountTable;
    use vfolderd::reconcile::probe::current;
    require_private_mount_namespace();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("volume");
    std::fs::create_dir(&target).unwrap();
    let tmpfs = || {
        nix::mount::mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap()
    };
    let (source, _) = vfolderd::daemon::mount_table_source(Default::default());
    let text_id = || {
        ProcMountInfo::default()
            .read()
            .unwrap()
            .top(&target)
            .unwrap()
            .id
    };
    tmpfs();
    // The table as the daemon keeps it: read once, then refreshed.
    let mut table = source.read().unwrap();
    let (old, old_text) = (table.top(&target).unwrap().id, text_id());
    let verdicts = BTreeMap::from([(target.clone(), (old, "stale mount: ENOTCONN".to_string()))]);
    assert_eq!(current(&verdicts, &table).len(), 1, "about this mount");
    // The heal: detach, mount again at the same point.
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    tmpfs();
    source.refresh(&mut table, true).unwrap();
    let (new, new_text) = (table.top(&target).unwrap().id, text_id());
    eprintln!("mountinfo ids: {old_text} then {new_text}; unique ids: {old} then {new}");
    assert_ne!(old, new, "a new mount, a new id");
    let fresh = StatmountTable::default().read().unwrap();
    assert_eq!(Some(new), fresh.top(&target).map(|m| m.id));
    assert!(
        current(&verdicts, &table).is_empty(),
        "the verdict about the replaced mount judged its replacement"
    );
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
}
