//! Fault injection, for real: etcd stopped under a converged node, a restart
//! during the outage, a watcher whose revision was compacted while it was cut off.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A volume, a vfolder and two kernels using it, all Ready.
async fn two_kernels(etcd: &Etcd, node: &Node) -> String {
    etcd.put(&format!("{P}/volumes/shard1"), &tmpfs_volume("requested"))
        .await;
    etcd.put(&format!("{P}/volumes/datasets"), &tmpfs_volume("startup"))
        .await;
    let id = uuid::Uuid::new_v4().to_string();
    etcd.put(
        &format!("{P}/vfolders/{id}"),
        "{name: data, owner: alice, volume: shard1}\n",
    )
    .await;
    for k in ["k1", "k2"] {
        etcd.put(
            &node.kernel_key(k),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
    }
    for k in ["k1", "k2"] {
        etcd.wait_state(&node.kernel_status(k), "Ready").await;
    }
    id
}

fn targets(node: &Node) -> Vec<std::path::PathBuf> {
    let mut t: Vec<_> = node.mounts().into_iter().map(|m| m.mount_point).collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_unmounts_nothing_even_across_a_restart() {
    require_private_mount_namespace();
    within(120, async {
        let mut etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = two_kernels(&etcd, &node).await;
        let converged = targets(&node);
        assert_eq!(
            converged.len(),
            6,
            "2 volumes + 2 × (vfolder + dataset) binds: {converged:?}"
        );

        etcd.stop();
        until("etcd is seen as gone", 30, || {
            node.metric("vfolderd_etcd_connected") == Some(0.0)
        })
        .await;
        let (code, body) = http_get(&node.listen, "/readyz");
        assert_eq!(code, 503, "not ready while etcd is unreachable");
        assert!(body.contains("degraded"), "{body}");
        assert_eq!(targets(&node), converged, "nothing unmounted");

        // Drift is still repaired against the last good desired state.
        let bind = node.home("k1").join("data");
        nix::mount::umount2(&bind, nix::mount::MntFlags::empty()).unwrap();
        until("the bind is repaired during the outage", 20, || {
            node.mount_at(&bind).is_some()
        })
        .await;

        // A restart during the outage serves the stored desired state: nothing unmounted,
        // drift still repaired, not ready.
        assert!(node.stop());
        node.spawn();
        until("alive again", 20, || {
            http_get(&node.listen, "/healthz").0 == 200
        })
        .await;
        until("a pass ran from the stored state", 20, || {
            node.metric("vfolderd_reconcile_passes_total{result=\"converged\"}")
                .unwrap_or(0.0)
                >= 1.0
        })
        .await;
        assert!(node.log().contains("loaded the last good desired state"));
        nix::mount::umount2(&bind, nix::mount::MntFlags::empty()).unwrap();
        until(
            "the bind is repaired after a restart during the outage",
            20,
            || node.mount_at(&bind).is_some(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            targets(&node),
            converged,
            "nothing unmounted across the restart"
        );
        let (code, body) = http_get(&node.listen, "/readyz");
        assert_eq!(code, 503);
        assert!(
            body.contains("degraded"),
            "serving the stored state: {body}"
        );
        let m = node.metrics();
        assert!(!m.contains("kind=\"unmount\""), "no unmount:\n{m}");

        // etcd returns: changes made now are applied.
        etcd.restart().await;
        etcd.delete(&node.kernel_key("k1")).await;
        until("k1's binds are removed", 30, || {
            node.mount_at(&bind).is_none()
        })
        .await;
        assert!(
            node.mount_at(&node.home("k2").join("data")).is_some(),
            "k2 untouched"
        );
        until("ready again", 30, || {
            http_get(&node.listen, "/readyz").0 == 200
        })
        .await;
        assert!(node.volumes().join("shard1").join(shard(&id)).is_dir());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_cut_off_past_compaction_relists_and_sweeps_deleted_keys() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start(&etcd.endpoint).await;
        let node = Node::start_with_endpoint(&proxy.endpoint, "n1", NodeOpts::default());
        two_kernels(&etcd, &node).await;

        proxy.cut();
        until("the node sees etcd gone", 30, || {
            node.metric("vfolderd_etcd_connected") == Some(0.0)
        })
        .await;
        etcd.delete(&node.kernel_key("k1")).await;
        let mut c = etcd.client().await;
        for i in 0..5 {
            c.put(format!("/unrelated/{i}"), "x", None).await.unwrap();
        }
        let rev = c
            .get("/unrelated/0", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        c.compact(rev, None).await.unwrap();
        assert!(
            node.mount_at(&node.home("k1").join("data")).is_some(),
            "nothing happens while cut off"
        );

        proxy.restore();
        until("k1's binds are swept after the relist", 30, || {
            node.mount_at(&node.home("k1").join("data")).is_none()
        })
        .await;
        assert!(
            node.mount_at(&node.home("k2").join("data")).is_some(),
            "k2 untouched"
        );
        assert!(
            node.mount_at(&node.home("k2").join("datasets")).is_some(),
            "k2 untouched"
        );
        assert!(node.log().contains("compacted"), "the relist is logged");
        let deadline = Instant::now() + Duration::from_secs(10);
        while etcd.get_json(&node.kernel_status("k1")).await.is_some() {
            assert!(Instant::now() < deadline, "k1's status not removed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// etcd's answers held up (not lost) for longer than a keep-alive tick
/// (5 s), though not past the lease's 15 s: the node keeps its liveness
/// lease (a node giving it up for every slow answer multiplied the leases,
/// and the load, at 4,000 nodes behind a grpc-proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_keep_alive_answer_keeps_the_liveness_lease() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start(&etcd.endpoint).await;
        // An agent: a storage node's election lease has keep-alives of its own.
        let opts = NodeOpts {
            roles: "[agent]",
            resync: "1h",
            ..Default::default()
        };
        let node = Node::start_with_endpoint(&proxy.endpoint, "n1", opts);
        let key = format!("{P}/status/nodes/{}", node.name);
        etcd.wait_for(&key, "ready", |v| v["ready"] == true).await;
        let mut c = etcd.client().await;
        let lease = |r: etcd_client::GetResponse| r.kvs().first().map(|kv| kv.lease());
        let before = lease(c.get(key.as_str(), None).await.unwrap());
        assert!(before.is_some_and(|l| l != 0), "the key is under a lease");

        // The lease was granted just before the key became ready, and is
        // renewed every 5 s from then: the stall starts between two
        // keep-alives and holds up at least one answer for over 5 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.stall(true);
        tokio::time::sleep(Duration::from_millis(9_800)).await;
        proxy.stall(false);
        // Past the time a lease given up during the stall is replaced.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let after = lease(c.get(key.as_str(), None).await.unwrap());
        assert_eq!(after, before, "the same lease: {}", node.log());
        let left = c.lease_time_to_live(before.unwrap(), None).await.unwrap();
        assert!(left.ttl() > 0, "and it is alive");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_mount_backs_off_per_object_and_recovers_once_fixed() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                helper_double: true,
                ..Default::default()
            },
        );
        let fail = node.dir.path().join("helper-fail");
        std::fs::write(&fail, "").unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: startup, fstype: nfs, path: 'nfs.example:/export'}\n",
        )
        .await;
        let st = etcd.wait_state(&node.volume_status("nfs1"), "Failed").await;
        assert!(
            st["error"].as_str().unwrap().contains("Host is down"),
            "{st}"
        );
        let started = Instant::now();
        // Other objects converge meanwhile, at once.
        etcd.put(&format!("{P}/volumes/scratch"), &tmpfs_volume("startup"))
            .await;
        etcd.wait_state(&node.volume_status("scratch"), "Mounted")
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not slowed by the failing volume"
        );

        tokio::time::sleep(Duration::from_millis(6500) - started.elapsed()).await;
        let attempts = std::fs::read_to_string(node.dir.path().join("helper.log"))
            .unwrap()
            .lines()
            .count();
        // Backoff 0.5, 1, 2, 4 s: about 4 attempts in 6.5 s, although a 1 s resync ran 6 times.
        assert!((3..=5).contains(&attempts), "{attempts} attempts in 6.5 s");

        std::fs::remove_file(&fail).unwrap();
        etcd.wait_state(&node.volume_status("nfs1"), "Mounted")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuse_volume_whose_daemon_dies_is_stale_and_healed_once_unused() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                helper_double: true,
                extra_config: "probe_interval: 300ms\nprobe_timeout: 2s\n",
                ..Default::default()
            },
        );
        std::fs::write(node.dir.path().join("helper-fuse"), "").unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: requested, fstype: nfs, path: 'fuse.example:/data'}\n",
        )
        .await;
        let id = uuid::Uuid::new_v4().to_string();
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: data, owner: alice, volume: nfs1}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let target = node.volumes().join("nfs1");
        assert_eq!(node.mount_at(&target).unwrap().fstype, "fuse.rclone");
        std::fs::write(node.home("k1").join("data/notes.txt"), b"kept").unwrap();

        let pid = rclone_for(&target).expect("rclone serves the volume").0;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let st = etcd.wait_state(&node.volume_status("nfs1"), "Stale").await;
        assert!(
            st["error"].as_str().unwrap().contains("not connected"),
            "{st}"
        );
        until("the stale metric", 10, || {
            node.metric("vfolderd_stale_volumes") == Some(1.0)
        })
        .await;

        // k1 still uses it: no heal under a running kernel.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            etcd.get_json(&node.volume_status("nfs1")).await.unwrap()["state"],
            "Stale"
        );
        let helper_calls = || {
            std::fs::read_to_string(node.dir.path().join("helper.log"))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(helper_calls(), 1, "not remounted while in use");

        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_state(&node.volume_status("nfs1"), "Mounted")
            .await;
        assert_eq!(helper_calls(), 2, "remounted once");
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "the dead mount is gone"
        );
        nix::sys::statfs::statfs(&target).expect("the new mount answers");
        let hex = id.replace('-', "");
        let file = target
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(&hex)
            .join("notes.txt");
        assert_eq!(
            std::fs::read_to_string(file).unwrap(),
            "kept",
            "data served again"
        );
        until("the stale metric clears", 10, || {
            node.metric("vfolderd_stale_volumes") == Some(0.0)
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_while_kernels_are_desired_then_unmounts_binds_first() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        two_kernels(&etcd, &node).await;
        let converged = targets(&node);
        let homes = node.structure_mounts().len() - 1; // each home; not the kernels root

        let out = node.cli_output(&["drain", "--force"]);
        assert!(!out.status.success(), "refused while the daemon runs");
        assert!(String::from_utf8_lossy(&out.stderr).contains("still running"));

        assert!(node.stop());
        let out = node.cli_output(&["drain"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("k1") && err.contains("k2") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(
            targets(&node),
            converged,
            "nothing unmounted by a refused drain"
        );

        let out = node.cli_output(&["drain", "--force"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("unmounted "))
            .collect();
        // Every bind and volume, and each kernel's home mount.
        assert_eq!(lines.len(), converged.len() + homes, "{stdout}");
        let first_volume = lines.iter().position(|l| l.contains("/volumes/")).unwrap();
        assert!(
            lines[first_volume..]
                .iter()
                .all(|l| l.contains("/volumes/")),
            "binds first:\n{stdout}"
        );
        assert!(node.mounts().is_empty(), "{:?}", node.mounts());
        let left: Vec<_> = std::fs::read_dir(node.kernels())
            .unwrap()
            .flatten()
            .collect();
        assert!(
            left.is_empty(),
            "empty kernel directories removed: {left:?}"
        );
        let ledger =
            vfolderd::state::ledger::Ledger::open(&node.dir.path().join("state/db")).unwrap();
        assert!(ledger.mounts().unwrap().is_empty() && ledger.dirs().unwrap().is_empty());
    })
    .await;
}
