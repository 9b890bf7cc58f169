//! End-to-end: the real vfolderd binary against a real etcd, making real
//! tmpfs and bind mounts in the test's private mount namespace.

mod common;

use std::path::Path;

use common::*;

fn vfolder_yaml(name: &str, volume: &str, permission: &str) -> String {
    format!("{{name: {name}, owner: alice, volume: {volume}, permission: {permission}}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_volumes_apply_and_tmpfs_startup_volume_is_mounted() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                ..Default::default()
            },
        );
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/seed-volumes.yaml");
        let out = node.cli(&["apply", "-f", seed.to_str().unwrap()]);
        assert!(
            out.contains("applied volume azure-shard-1")
                && out.contains("applied volume azure-deeplearning-samples"),
            "{out}"
        );
        etcd.put(&format!("{P}/volumes/datasets"), &tmpfs_volume("startup"))
            .await;

        etcd.wait_state(&node.volume_status("datasets"), "Mounted")
            .await;
        let m = node
            .mount_at(&node.volumes().join("datasets"))
            .expect("datasets mounted");
        assert_eq!(m.fstype, "tmpfs");
        assert!(m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");

        // The seed's startup cifs volume parses (not Rejected); this kernel has no CIFS client,
        // so the mount fails, and the error names no secret.
        let st = etcd
            .wait_state(&node.volume_status("azure-deeplearning-samples"), "Failed")
            .await;
        // The requested one is not needed by any kernel on an agent node.
        etcd.wait_state(&node.volume_status("azure-shard-1"), "Unmounted")
            .await;
        for (k, v) in etcd.dump(&format!("{P}/status/")).await {
            assert!(!v.contains("PASSWORD"), "secret in status {k}: {v}");
        }
        assert!(!node.log().contains("PASSWORD"), "secret in log");
        assert!(!st["error"].as_str().unwrap().is_empty());

        // A broken shared dataset does not hold kernels back: the kernel is Ready with the
        // working startup volume bound, and its mount list shows the broken one unmounted.
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        let k = etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let mounts = k["mounts"].as_array().unwrap();
        let by_source =
            |s: &str| mounts.iter().find(|m| m["source"] == s).unwrap()["mounted"].clone();
        assert_eq!(by_source("volume:datasets"), true, "{k}");
        assert_eq!(by_source("volume:azure-deeplearning-samples"), false, "{k}");
        assert!(node
            .mount_at(&node.home("k1").join("datasets"))
            .unwrap()
            .is_readonly());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfolder_create_makes_the_sharded_directory_and_reports_usage() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[storage]",
                ..Default::default()
            },
        );
        etcd.put(&format!("{P}/volumes/shard1"), &tmpfs_volume("requested"))
            .await;
        let id = node.cli(&[
            "vfolder", "create", "--volume", "shard1", "--name", "mydata", "--owner", "alice",
        ]);
        let id = id.trim();
        uuid::Uuid::parse_str(id).expect("prints a uuid");
        let st = etcd
            .wait_state(&format!("{P}/status/vfolders/{id}"), "Ready")
            .await;
        let dir = node.volumes().join("shard1").join(shard(id));
        assert_eq!(st["path"], dir.display().to_string());
        assert!(dir.is_dir(), "{} exists", dir.display());
        assert_eq!(
            (st["files"].as_u64(), st["bytes"].as_u64()),
            (Some(0), Some(0))
        );

        std::fs::write(dir.join("a.txt"), b"hello").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.bin"), vec![0u8; 1000]).unwrap();
        let st = etcd
            .wait_for(&format!("{P}/status/vfolders/{id}"), "rescanned", |v| {
                v["files"] == 2
            })
            .await;
        assert_eq!(st["bytes"], 1005);
        assert_eq!(st["node"], "n1");
    })
    .await;
}

/// Puts a tmpfs volume and a vfolder on it; returns the vfolder uuid.
async fn volume_and_vfolder(etcd: &Etcd, volume: &str, name: &str, permission: &str) -> String {
    etcd.put(&format!("{P}/volumes/{volume}"), &tmpfs_volume("requested"))
        .await;
    let id = uuid::Uuid::new_v4().to_string();
    etcd.put(
        &format!("{P}/vfolders/{id}"),
        &vfolder_yaml(name, volume, permission),
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_gets_rw_and_ro_binds_with_nosuid_nodev_and_ro_refuses_writes() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let rw = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        let ro = volume_and_vfolder(&etcd, "shard1", "shared", "rw").await;
        etcd.put(&format!("{P}/volumes/datasets"), &tmpfs_volume("startup"))
            .await;
        let kernel = format!(
            "mounts: [{{vfolder: {rw}}}, {{vfolder: {ro}, as: readonly-copy, permission: ro}}]\n"
        );
        etcd.put(&node.kernel_key("k1"), &kernel).await;

        let st = etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        assert_eq!(st["mounts"].as_array().unwrap().len(), 3, "{st}");
        let home = node.home("k1");
        let rw_bind = node.mount_at(&home.join("data")).expect("rw bind");
        let ro_bind = node.mount_at(&home.join("readonly-copy")).expect("ro bind");
        let ds_bind = node
            .mount_at(&home.join("datasets"))
            .expect("startup volume bind");
        for m in [&rw_bind, &ro_bind, &ds_bind] {
            assert!(m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");
        }
        assert!(!rw_bind.is_readonly() && ro_bind.is_readonly() && ds_bind.is_readonly());
        assert_eq!(rw_bind.root, Path::new("/").join(shard(&rw)));

        // The rw bind writes through to the vfolder directory on the volume.
        std::fs::write(home.join("data/x"), b"1").unwrap();
        assert!(node
            .volumes()
            .join("shard1")
            .join(shard(&rw))
            .join("x")
            .exists());
        // The ro bind and the dataset refuse writes with EROFS.
        for p in [home.join("readonly-copy/y"), home.join("datasets/y")] {
            let err = std::fs::write(&p, b"1").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}", p.display());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_volume_stays_while_any_kernel_uses_it() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        // An agent-only node: a requested volume is mounted only for kernels. The volume is a
        // bind of a host directory standing in for a shared network share, where the storage
        // role (elsewhere) already made the vfolder directory.
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                ..Default::default()
            },
        );
        let share = node.dir.path().join("share");
        let id = uuid::Uuid::new_v4().to_string();
        std::fs::create_dir_all(share.join(shard(&id))).unwrap();
        let spec = format!(
            "mount: {{at: requested, fstype: bind, path: {}}}\n",
            share.display()
        );
        etcd.put(&format!("{P}/volumes/nfs1"), &spec).await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            &vfolder_yaml("data", "nfs1", "rw"),
        )
        .await;
        let target = node.volumes().join("nfs1");
        etcd.wait_state(&node.volume_status("nfs1"), "Unmounted")
            .await;
        assert!(
            node.mount_at(&target).is_none(),
            "not mounted before a kernel needs it"
        );

        let k = format!("mounts: [{{vfolder: {id}}}]\n");
        etcd.put(&node.kernel_key("k1"), &k).await;
        etcd.put(&node.kernel_key("k2"), &k).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        let st = etcd
            .wait_for(&node.volume_status("nfs1"), "used by 2", |v| {
                v["users"] == 2
            })
            .await;
        assert_eq!(st["state"], "Mounted");

        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_for(&node.volume_status("nfs1"), "used by 1", |v| {
            v["users"] == 1
        })
        .await;
        assert!(
            node.mount_at(&target).is_some(),
            "volume stays while k2 uses it"
        );
        assert!(
            node.mount_at(&node.home("k1").join("data")).is_none(),
            "k1's bind is gone"
        );
        assert!(
            node.mount_at(&node.home("k2").join("data")).is_some(),
            "k2's bind stays"
        );

        etcd.delete(&node.kernel_key("k2")).await;
        etcd.wait_state(&node.volume_status("nfs1"), "Unmounted")
            .await;
        assert!(
            node.mounts().is_empty(),
            "everything unmounted: {:?}",
            node.mounts()
        );
        assert!(
            !node.kernels().join("k2").exists(),
            "empty kernel directories removed"
        );
        assert!(
            share.join(shard(&id)).is_dir(),
            "the share's data is untouched"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_kernel_keeps_user_data_in_its_home() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        std::fs::write(node.home("k1").join("notebook.ipynb"), b"{}").unwrap();
        std::fs::write(node.home("k1").join("data/result.csv"), b"1,2").unwrap();

        etcd.delete(&node.kernel_key("k1")).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while node.mount_at(&node.home("k1").join("data")).is_some() {
            assert!(std::time::Instant::now() < deadline, "bind not removed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            etcd.get_json(&node.kernel_status("k1")).await.is_none(),
            "kernel status removed"
        );
        assert!(
            node.home("k1").join("notebook.ipynb").exists(),
            "user file in the home kept"
        );
        assert!(
            !node.home("k1").join("data").exists(),
            "empty mount point removed"
        );
        assert!(
            node.volumes()
                .join("shard1")
                .join(shard(&id))
                .join("result.csv")
                .exists(),
            "vfolder data kept"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_unmount_of_a_bind_is_repaired_by_resync() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}, permission: ro}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let target = node.home("k1").join("data");
        assert!(node.mount_at(&target).is_some());
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        // (No check that it is gone: the mount-table event may have the bind
        // back before this test could read mountinfo.)

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let after = loop {
            if let Some(m) = node.mount_at(&target) {
                break m;
            }
            assert!(std::time::Instant::now() < deadline, "bind not restored");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert!(after.is_readonly() && after.has_option("nosuid") && after.has_option("nodev"));
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "not stacked"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_rejected_and_everything_else_converges() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        etcd.put(&format!("{P}/volumes/broken"), "mount: [unclosed\n")
            .await;
        etcd.put(
            &format!("{P}/volumes/colourful"),
            "mount: {at: startup, fstype: tmpfs, path: x, colour: red}\n",
        )
        .await;
        etcd.put(
            &format!("{P}/volumes/ext4"),
            "mount: {at: startup, fstype: ext4, path: /dev/sda1}\n",
        )
        .await;
        etcd.put(&format!("{P}/volumes/bad name"), &tmpfs_volume("startup"))
            .await;
        etcd.put(
            &node.kernel_key("kbad"),
            "mounts: [{vfolder: 1, as: ../../etc}]\n",
        )
        .await;
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(
            &node.kernel_key("kgood"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;

        etcd.wait_state(&node.kernel_status("kgood"), "Ready").await;
        etcd.wait_state(&node.volume_status("broken"), "Rejected")
            .await;
        let st = etcd
            .wait_state(&node.volume_status("colourful"), "Rejected")
            .await;
        assert!(
            st["error"].as_str().unwrap().contains("colour"),
            "names the field: {st}"
        );
        let st = etcd
            .wait_state(&node.volume_status("ext4"), "Rejected")
            .await;
        assert!(st["error"].as_str().unwrap().contains("ext4"), "{st}");
        etcd.wait_state(&node.kernel_status("kbad"), "Rejected")
            .await;
        etcd.wait_state(
            &format!("{P}/status/nodes/n1/rejected/volumes%2Fbad%20name"),
            "Rejected",
        )
        .await;
        assert!(node.mount_at(&node.volumes().join("ext4")).is_none());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while node.metric("vfolderd_rejected_objects{kind=\"volume\"}") != Some(3.0) {
            assert!(std::time::Instant::now() < deadline, "{}", node.metrics());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            node.metric("vfolderd_rejected_objects{kind=\"kernel\"}"),
            Some(1.0)
        );
        assert_eq!(
            node.metric("vfolderd_rejected_objects{kind=\"key\"}"),
            Some(1.0)
        );
        let log = node.log();
        assert!(
            log.contains("rejected desired object") && log.contains("colour"),
            "a log line names the reason"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_over_a_converged_node_adopts_without_mounting_or_unmounting() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(&format!("{P}/volumes/datasets"), &tmpfs_volume("startup"))
            .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let before: Vec<u64> = node.mounts().iter().map(|m| m.id).collect();
        assert_eq!(before.len(), 4, "2 volumes + 2 binds: {:?}", node.mounts());

        assert!(node.stop(), "SIGTERM exits cleanly");
        assert!(node.log().contains("left in place"), "says so in the log");
        let after_stop: Vec<u64> = node.mounts().iter().map(|m| m.id).collect();
        assert_eq!(before, after_stop, "SIGTERM leaves every mount in place");

        node.spawn();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while node
            .metric("vfolderd_reconcile_passes_total{result=\"converged\"}")
            .unwrap_or(0.0)
            < 2.0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no converged passes after restart"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let metrics = node.metrics();
        assert!(
            !metrics.contains("vfolderd_actions_total{"),
            "no action after restart:\n{metrics}"
        );
        let after: Vec<u64> = node.mounts().iter().map(|m| m.id).collect();
        assert_eq!(before, after, "no mount made or removed");
        assert_eq!(
            etcd.get_json(&node.kernel_status("k1")).await.unwrap()["state"],
            "Ready"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_report_and_move() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while http_get(&node.listen, "/readyz").0 != 200 {
            assert!(std::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(http_get(&node.listen, "/healthz").0, 200);
        let m = node.metrics();
        for series in [
            "vfolderd_reconcile_passes_total",
            "vfolderd_whole_passes_total",
            "vfolderd_reconcile_duration_seconds_bucket",
            "vfolderd_owned_mounts",
            "vfolderd_kernels",
            "vfolderd_rejected_objects",
            "vfolderd_etcd_watch_revision",
            "vfolderd_etcd_connected 1",
            "vfolderd_ready 1",
        ] {
            assert!(m.contains(series), "{series} missing:\n{m}");
        }
        let rev0 = node.metric("vfolderd_etcd_watch_revision").unwrap();
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while node.metric("vfolderd_kernels{state=\"Ready\"}") != Some(1.0) {
            assert!(std::time::Instant::now() < deadline, "{}", node.metrics());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(node.metric("vfolderd_etcd_watch_revision").unwrap() > rev0);
        assert_eq!(
            node.metric("vfolderd_actions_total{kind=\"bind\",result=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            node.metric("vfolderd_actions_total{kind=\"mount\",result=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            node.metric("vfolderd_owned_mounts{kind=\"bind\"}"),
            Some(1.0)
        );
        assert_eq!(
            node.metric("vfolderd_owned_mounts{kind=\"volume\"}"),
            Some(1.0)
        );
        let node_status = etcd
            .wait_for(&format!("{P}/status/nodes/n1"), "ready", |v| {
                v["ready"] == true
            })
            .await;
        assert_eq!(node_status["state"], "Running");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_a_kernel_home_is_never_followed() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        let victim = node.dir.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::create_dir_all(node.home("k1")).unwrap();
        std::os::unix::fs::symlink(&victim, node.home("k1").join("data")).unwrap();
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        let st = etcd.wait_state(&node.kernel_status("k1"), "Failed").await;
        assert!(st["error"].as_str().unwrap().contains("symlink"), "{st}");
        assert!(
            node.mount_at(&victim).is_none(),
            "nothing mounted through the symlink"
        );
        // Another kernel is not held back.
        etcd.put(
            &node.kernel_key("k2"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_requested_volume_lingers_then_goes() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                linger: "3s",
                ..Default::default()
            },
        );
        let share = node.dir.path().join("share");
        let id = uuid::Uuid::new_v4().to_string();
        std::fs::create_dir_all(share.join(shard(&id))).unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            &format!(
                "mount: {{at: requested, fstype: bind, path: {}}}\n",
                share.display()
            ),
        )
        .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            &vfolder_yaml("data", "nfs1", "rw"),
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

        etcd.delete(&node.kernel_key("k1")).await;
        let gone = std::time::Instant::now();
        etcd.wait_for(&node.volume_status("nfs1"), "unused", |v| v["users"] == 0)
            .await;
        while node.mount_at(&node.home("k1").join("data")).is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            gone.elapsed() < std::time::Duration::from_secs(2),
            "bind removal took {:?}",
            gone.elapsed()
        );
        assert!(
            node.mount_at(&node.volumes().join("nfs1")).is_some(),
            "the volume lingers after its last user"
        );
        etcd.wait_state(&node.volume_status("nfs1"), "Unmounted")
            .await;
        assert!(
            gone.elapsed() >= std::time::Duration::from_secs(3),
            "not before linger: {:?}",
            gone.elapsed()
        );
        assert!(node.mount_at(&node.volumes().join("nfs1")).is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keys_are_written_only_when_they_change() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.wait_state(&format!("{P}/status/vfolders/{id}"), "Ready")
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let read = || async {
            let mut c = etcd.client().await;
            let r = c
                .get(
                    format!("{P}/status/"),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            r.kvs()
                .iter()
                .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
                .collect::<Vec<_>>()
        };
        let before = read().await;
        let passes0 = node
            .metric("vfolderd_reconcile_passes_total{result=\"converged\"}")
            .unwrap();
        // Several resyncs (every 1 s) later, nothing was rewritten.
        tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
        let passes1 = node
            .metric("vfolderd_reconcile_passes_total{result=\"converged\"}")
            .unwrap();
        assert!(
            passes1 >= passes0 + 2.0,
            "resyncs ran: {passes0} -> {passes1}"
        );
        let after = read().await;
        let stable: Vec<_> = before
            .iter()
            .filter(|(k, _)| !k.ends_with("/status/nodes/n1"))
            .collect();
        for (k, rev) in stable {
            let now = after.iter().find(|(k2, _)| k2 == k).map(|(_, r)| *r);
            assert_eq!(now, Some(*rev), "{k} was rewritten");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_no_action_until_etcd_answers() {
    require_private_mount_namespace();
    within(90, async {
        let port = free_port();
        let node = Node::start_with_endpoint(
            &format!("http://127.0.0.1:{port}"),
            "n1",
            NodeOpts::default(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while http_get(&node.listen, "/healthz").0 != 200 {
            assert!(std::time::Instant::now() < deadline, "never alive");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(
            http_get(&node.listen, "/readyz").0,
            503,
            "not ready before the first list"
        );
        assert_eq!(node.metric("vfolderd_etcd_connected"), Some(0.0));
        assert_eq!(node.metric("vfolderd_ready"), Some(0.0));
        assert!(
            !node.metrics().contains("vfolderd_reconcile_passes_total{"),
            "no pass before the first list"
        );

        let etcd = Etcd::start_on(port).await;
        etcd.put(&format!("{P}/volumes/datasets"), &tmpfs_volume("startup"))
            .await;
        etcd.wait_state(&node.volume_status("datasets"), "Mounted")
            .await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while http_get(&node.listen, "/readyz").0 != 200 {
            assert!(std::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(node.metric("vfolderd_etcd_connected"), Some(1.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_cifs_volumes_mount_through_the_helper_with_the_password_only_in_a_0600_file() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts { helper_double: true, ..Default::default() });
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/seed-volumes.yaml");
        node.cli(&["apply", "-f", seed.to_str().unwrap()]);
        etcd.wait_state(&node.volume_status("azure-deeplearning-samples"), "Mounted").await;
        etcd.wait_state(&node.volume_status("azure-shard-1"), "Mounted").await;

        let argv = std::fs::read_to_string(node.dir.path().join("helper.log")).unwrap();
        let state = node.dir.path().join("state/run");
        let line = |vol: &str, share: &str| {
            format!(
                "-t cifs -o vers=3.0,dir_mode=0777,file_mode=0777,sec=ntlmssp,actimeo=30,mfsymlinks,uid=1000,gid=1000,forceuid,forcegid,credentials={}/credentials-{vol},nosuid,nodev \
                 -- //USERNAME.file.core.windows.net/{share} {}",
                state.display(),
                node.volumes().join(vol).display()
            )
        };
        let want = format!("{}\n{}\n", line("azure-deeplearning-samples", "dlsamples"), line("azure-shard-1", "vfolder"));
        assert_eq!(argv, want, "the exact command lines");
        let creds = std::fs::read_to_string(node.dir.path().join("helper-creds.log")).unwrap();
        assert_eq!(creds, "600\nusername=USERNAME\npassword=PASSWORD\n".repeat(2), "0600 file with the credentials");
        assert!(std::fs::read_dir(&state).unwrap().next().is_none(), "credentials files removed after mounting");

        // A vfolder on the share and a kernel using it.
        let id = node.cli(&["vfolder", "create", "--volume", "azure-shard-1", "--name", "mine", "--owner", "bob"]);
        let id = id.trim().to_string();
        etcd.put(&node.kernel_key("k1"), &format!("mounts: [{{vfolder: {id}}}]\n")).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let share = share_dir(node.dir.path(), "//USERNAME.file.core.windows.net/vfolder");
        assert!(share.join(shard(&id)).is_dir(), "vfolder directory made on the share");

        for (k, v) in etcd.dump(&format!("{P}/")).await {
            if k.contains("/status/") {
                assert!(!v.contains("PASSWORD"), "secret in status {k}: {v}");
            }
        }
        assert!(!node.log().contains("PASSWORD"), "secret in the log");
        assert!(!node.metrics().contains("PASSWORD"), "secret in metrics");
    })
    .await;
}

/// Kernel k1 Ready with vfolder `mine` (record fields `extra` added) on a
/// 16 MiB tmpfs volume `shard1`; the vfolder's uuid.
async fn ready_on_a_16m_volume(etcd: &Etcd, node: &Node, extra: &str) -> uuid::Uuid {
    etcd.put(
        &format!("{P}/volumes/shard1"),
        "mount: {at: requested, fstype: tmpfs, path: t, options: 'size=16m'}\n",
    )
    .await;
    let vf = uuid::Uuid::new_v4();
    etcd.put(
        &format!("{P}/vfolders/{vf}"),
        &format!("{{name: mine, owner: alice, volume: shard1{extra}}}\n"),
    )
    .await;
    etcd.put(
        &node.kernel_key("k1"),
        &format!("mounts: [{{vfolder: {vf}}}]\n"),
    )
    .await;
    etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
    vf
}

/// Issue 14 item 3 (capacity): a mounted volume's status says how big it is
/// and what is left, measured by the prober off the loop, and follows what
/// a user writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_volume_reports_its_capacity_and_free_bytes() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                extra_config: "probe_interval: 200ms\n",
                ..Default::default()
            },
        );
        ready_on_a_16m_volume(&etcd, &node, "").await;
        const MIB: u64 = 1 << 20;
        let st = etcd
            .wait_for(&node.volume_status("shard1"), "capacity reported", |v| {
                v.get("capacity_bytes").is_some()
            })
            .await;
        assert_eq!(st["capacity_bytes"], 16 * MIB, "{st}");
        assert!(st["free_bytes"].as_u64().unwrap() > 15 * MIB, "{st}");

        std::fs::write(
            node.home("k1").join("mine/big"),
            vec![7u8; 4 * MIB as usize],
        )
        .unwrap();
        let st = etcd
            .wait_for(
                &node.volume_status("shard1"),
                "free bytes follow the write",
                |v| v["free_bytes"].as_u64().is_some_and(|f| f <= 12 * MIB),
            )
            .await;
        assert_eq!(st["capacity_bytes"], 16 * MIB, "{st}");
        assert_eq!(st["state"], "Mounted");
    })
    .await;
}

/// Issue 14 item 3 (placement): `vfolder create` needed `--volume`. Without
/// it the record goes to the requested volume a storage node reports
/// Mounted with the most free space, and a fuller volume loses that place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfolder_create_without_a_volume_places_it_where_most_space_is_free() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                extra_config: "probe_interval: 200ms\n",
                ..Default::default()
            },
        );
        let tmpfs = |size: &str| {
            format!("mount: {{at: requested, fstype: tmpfs, path: t, options: 'size={size}'}}\n")
        };
        etcd.put(&format!("{P}/volumes/small"), &tmpfs("16m")).await;
        etcd.put(&format!("{P}/volumes/large"), &tmpfs("32m")).await;
        // A startup dataset with more room is not a place for vfolders.
        let dataset = node.dir.path().join("dataset");
        std::fs::create_dir_all(&dataset).unwrap();
        etcd.put(
            &format!("{P}/volumes/dataset"),
            &format!(
                "mount: {{at: startup, fstype: bind, path: '{}'}}\n",
                dataset.display()
            ),
        )
        .await;
        for v in ["small", "large"] {
            etcd.wait_for(&node.volume_status(v), "capacity reported", |s| {
                s.get("free_bytes").is_some()
            })
            .await;
        }
        let create = |name: &str| {
            let out = node.cli_output(&[
                "vfolder",
                "create",
                "--name",
                name,
                "--owner",
                "alice",
                "--quota-bytes",
                "4096",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let record = |id: &str| {
            let key = format!("{P}/vfolders/{id}");
            let etcd = &etcd;
            async move {
                let (_, v) = etcd
                    .dump(&key)
                    .await
                    .into_iter()
                    .find(|(k, _)| *k == key)
                    .expect("record written");
                serde_yaml::from_str::<serde_yaml::Value>(&v).unwrap()
            }
        };
        let first = create("one");
        let r = record(&first).await;
        assert_eq!(r["volume"].as_str(), Some("large"), "{r:?}");
        assert_eq!(r["quota_bytes"].as_u64(), Some(4096), "{r:?}");

        // Fill the large volume past the small one's free space.
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {first}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        std::fs::write(node.home("k1").join("one/fill"), vec![1u8; 24 << 20]).unwrap();
        etcd.wait_for(&node.volume_status("large"), "the fill seen", |s| {
            s["free_bytes"].as_u64().is_some_and(|f| f < 10 << 20)
        })
        .await;
        let second = create("two");
        assert_eq!(record(&second).await["volume"].as_str(), Some("small"));
    })
    .await;
}

/// Issue 14 item 3 (quotas): `quota_bytes` was parsed and ignored. A
/// vfolder whose scan finds more than its quota is `OverQuota` (saying by
/// how much), and `Ready` again once its user deletes enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vfolder_over_its_quota_says_so_and_recovers() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let vf = ready_on_a_16m_volume(&etcd, &node, ", quota_bytes: 1048576").await;
        let key = format!("{P}/status/vfolders/{vf}");
        let st = etcd.wait_state(&key, "Ready").await;
        assert_eq!(st["quota_bytes"], 1048576, "{st}");

        let big = node.home("k1").join("mine/big");
        std::fs::write(&big, vec![7u8; 2 << 20]).unwrap();
        let st = etcd.wait_state(&key, "OverQuota").await;
        assert_eq!(st["bytes"], 2 << 20, "{st}");
        assert!(
            st["error"]
                .as_str()
                .unwrap()
                .contains("over its quota of 1048576"),
            "{st}"
        );
        let k = etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        assert!(k["error"].is_null(), "the kernel keeps its folder: {k}");

        std::fs::remove_file(&big).unwrap();
        let st = etcd.wait_state(&key, "Ready").await;
        assert!(st["error"].is_null(), "{st}");
    })
    .await;
}

/// Issue 13 item 4: a cifs volume's cache and size options change on the
/// live mount (`mount -o remount,...` with every option of the first mount,
/// the same mount and binds after); a change cifs cannot make live waits
/// for its kernels, and the status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cifs_options_change_in_place_under_a_running_kernel() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts { helper_double: true, ..Default::default() });
        let spec = |opts: &str| {
            format!("mount: {{at: requested, fstype: cifs, path: '//acct.file.core.windows.net/share', options: '{opts}'}}\n")
        };
        etcd.put(&format!("{P}/volumes/files"), &spec("vers=3.0,actimeo=30")).await;
        let vf = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/vfolders/{vf}"), "{name: mine, owner: alice, volume: files}\n").await;
        etcd.put(&node.kernel_key("k1"), &format!("mounts: [{{vfolder: {vf}}}]\n")).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let volume = node.volumes().join("files");
        let bind = node.home("k1").join("mine");
        let ids = || (node.mount_at(&volume).unwrap().id, node.mount_at(&bind).unwrap().id);
        let before = ids();
        let log = node.dir.path().join("helper.log");
        let calls = || std::fs::read_to_string(&log).unwrap();
        let target = volume.display();
        let tail = "mfsymlinks,uid=1000,gid=1000,forceuid,forcegid,dir_mode=0755,file_mode=0644,nosuid,nodev";
        assert_eq!(
            calls(),
            format!("-t cifs -o vers=3.0,actimeo=30,{tail} -- //acct.file.core.windows.net/share {target}\n")
        );

        etcd.put(&format!("{P}/volumes/files"), &spec("vers=3.0,actimeo=5,cache=none")).await;
        until("the helper remounts", 30, || calls().lines().count() == 2).await;
        assert_eq!(
            calls().lines().nth(1).unwrap(),
            format!("-t cifs -o remount,vers=3.0,actimeo=5,cache=none,{tail} -- //acct.file.core.windows.net/share {target}"),
            "every option again, with the new ones"
        );
        assert_eq!(ids(), before, "the same mount and the same bind");
        let st = etcd
            .wait_for(&node.volume_status("files"), "options recorded", |v| v["state"] == "Mounted")
            .await;
        assert!(st.get("change").is_none(), "{st}");

        // Another protocol version needs a new mount: pending while k1 runs.
        etcd.put(&format!("{P}/volumes/files"), &spec("vers=3.1.1,actimeo=5,cache=none")).await;
        let st = etcd
            .wait_for(&node.volume_status("files"), "change pending", |v| v.get("change").is_some())
            .await;
        assert!(st["change"].as_str().unwrap().starts_with("pending"), "{st}");
        assert_eq!(calls().lines().count(), 2, "no remount tried");
        assert_eq!(ids(), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_is_pending_while_its_volume_mounts_then_ready() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                helper_double: true,
                ..Default::default()
            },
        );
        std::fs::write(node.dir.path().join("helper-sleep"), "2").unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        std::fs::create_dir_all(share_dir(node.dir.path(), "nfs.example:/export").join(shard(&id)))
            .unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: requested, fstype: nfs, path: 'nfs.example:/export'}\n",
        )
        .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            &vfolder_yaml("data", "nfs1", "rw"),
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        let pending = etcd.wait_state(&node.kernel_status("k1"), "Pending").await;
        assert!(
            node.mount_at(&node.volumes().join("nfs1")).is_none(),
            "Pending is said before the slow mount ends"
        );
        assert!(pending["revision"].as_i64().unwrap() > 0);
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let argv = std::fs::read_to_string(node.dir.path().join("helper.log")).unwrap();
        assert_eq!(
            argv,
            format!(
                "-t nfs -o nosuid,nodev -- nfs.example:/export {}\n",
                node.volumes().join("nfs1").display()
            )
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_mount_helper_times_out_fails_and_recovers_without_stacking() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                helper_double: true,
                mount_timeout: "1s",
                ..Default::default()
            },
        );
        let sleep_file = node.dir.path().join("helper-sleep");
        std::fs::write(&sleep_file, "30").unwrap();
        etcd.put(
            &format!("{P}/volumes/nfs1"),
            "mount: {at: startup, fstype: nfs, path: 'nfs.example:/export'}\n",
        )
        .await;
        // Failed, timed out (a retry may say first that the killed helper is
        // still being reaped: on a loaded machine that status can come first).
        etcd.wait_for(&node.volume_status("nfs1"), "Failed: timeout", |v| {
            v["state"] == "Failed" && v["error"].as_str().unwrap_or("").contains("timeout")
        })
        .await;
        assert!(node.mount_at(&node.volumes().join("nfs1")).is_none());
        // Other objects are not held back by the hung one.
        etcd.put(&format!("{P}/volumes/scratch"), &tmpfs_volume("startup"))
            .await;
        etcd.wait_state(&node.volume_status("scratch"), "Mounted")
            .await;

        std::fs::remove_file(&sleep_file).unwrap();
        etcd.wait_state(&node.volume_status("nfs1"), "Mounted")
            .await;
        let target = node.volumes().join("nfs1");
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "exactly one mount"
        );
    })
    .await;
}

/// A node whose resync is far beyond any test's deadline (only a
/// mount-table event can bring a change back), with kernel `k1` Ready and
/// its rw bind `data`; returns the node and the bind's target.
async fn ready_bind_without_resync(etcd: &Etcd) -> (Node, std::path::PathBuf) {
    let node = Node::start(
        etcd,
        "n1",
        NodeOpts {
            resync: "1h",
            ..Default::default()
        },
    );
    let id = volume_and_vfolder(etcd, "shard1", "data", "rw").await;
    etcd.put(
        &node.kernel_key("k1"),
        &format!("mounts: [{{vfolder: {id}}}]\n"),
    )
    .await;
    etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
    let target = node.home("k1").join("data");
    (node, target)
}

/// A remount makes and removes no mount, so `listmount` shows the same ids:
/// the flags of a bind changed from outside (nosuid dropped, read-write
/// made read-only) are still put back without a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_remount_of_a_bind_is_put_back_without_a_resync() {
    use nix::mount::MsFlags;
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let (node, target) = ready_bind_without_resync(&etcd).await;
        assert!(!node.mount_at(&target).unwrap().is_readonly());
        nix::mount::mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
        // Read again within a second of the change (5 s: a slow machine).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let m = node.mount_at(&target).expect("still mounted");
            if !m.is_readonly() && m.has_option("nosuid") && m.has_option("nodev") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the bind stayed {:?} without a resync",
                m.mount_options
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Another program (a container runtime, an operator's debugging mount)
/// mounts over a kernel's bind. When the kernel goes, unmounting its bind
/// by path would take the other program's mount: vfolderd's records name
/// their mounts by id, so theirs stays, and vfolderd's bind (and the home it
/// sits in) goes once theirs is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_someone_put_over_a_bind_outlives_the_kernel_and_the_bind_goes_after() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let (node, target) = ready_bind_without_resync(&etcd).await;
        let home = node.home("k1");
        nix::mount::mount(
            Some("theirs"),
            &target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(target.join("theirs.txt"), "not vfolderd's").unwrap();
        etcd.delete(&node.kernel_key("k1")).await;
        // The status goes in the pass that acted on the deletion.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while etcd.get_json(&node.kernel_status("k1")).await.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel's status stayed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(
            std::fs::read_to_string(target.join("theirs.txt"))
                .ok()
                .as_deref(),
            Some("not vfolderd's"),
            "vfolderd unmounted the mount someone put over its bind"
        );
        assert_eq!(node.mount_at(&target).unwrap().fstype, "tmpfs");
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        until("vfolderd's bind and the home are unmounted", 30, || {
            node.mount_at(&target).is_none() && node.mount_at(&home).is_none()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_unmount_is_repaired_on_the_mount_table_event_not_the_resync() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let (node, target) = ready_bind_without_resync(&etcd).await;
        for _ in 0..3 {
            nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while node.mount_at(&target).is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "not repaired without a resync"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1
        );
        // The table was read the way this run asked (scripts/test.sh runs
        // the daemon tests once more with mountinfo forced).
        let events = vfolderd::reconcile::mountevents::MountEvents::open().is_ok();
        let source = match std::env::var("VFOLDERD_TEST_MOUNT_TABLE").as_deref() {
            Ok("mountinfo") => "mount table: /proc/self/mountinfo",
            _ if events => {
                "mount table: listmount/statmount (unique mount ids), kept by fanotify mount events"
            }
            _ => "mount table: listmount/statmount (unique mount ids), kept by listing ids",
        };
        assert!(node.log().contains(source), "{}", node.log());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kernel_is_a_kernel_pass_and_a_removal_brings_one_whole_pass() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        // No resync during the test: every whole pass has a cause we make.
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                resync: "1h",
                ..Default::default()
            },
        );
        let id = volume_and_vfolder(&etcd, "shard1", "data", "rw").await;
        let value = format!("mounts: [{{vfolder: {id}}}]\n");
        etcd.put(&node.kernel_key("k1"), &value).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        // Passes, not rounds: a round may take a second kernel pass (seen
        // in the fresh-machine run, which read it as a whole pass less).
        let counts = || {
            let m = |s: &str| node.metric_now(s).unwrap_or(0.0);
            (
                m("vfolderd_kernel_passes_total"),
                m("vfolderd_whole_passes_total"),
            )
        };
        // Let any pass still in flight finish before counting.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let (k0, whole0) = counts();

        etcd.put(&node.kernel_key("k2"), &value).await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (k1, whole1) = counts();
        assert!(k1 > k0, "the put ran a kernel pass ({k0} → {k1})");
        assert_eq!(
            whole1,
            whole0,
            "and no whole-node pass: {}",
            node.log()
                .lines()
                .filter(|l| l.contains("pass phases"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(node.mount_at(&node.home("k1").join("data")).is_some());

        etcd.delete(&node.kernel_key("k2")).await;
        until("k2's bind gone", 10, || {
            node.mount_at(&node.home("k2").join("data")).is_none()
        })
        .await;
        // The volume decision (still used by k1: it stays) is one whole pass, shortly after.
        until("one whole pass after the removal", 10, || {
            counts().1 > whole1
        })
        .await;
        assert!(
            node.mount_at(&node.volumes().join("shard1")).is_some(),
            "k1 still uses the volume"
        );
        assert!(node.mount_at(&node.home("k1").join("data")).is_some());
    })
    .await;
}
