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
        let id = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: mine, owner: alice, volume: data}",
        )
        .await;
        etcd.put(&node.kernel_key("k1"), &kernel_yaml(&id)).await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

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
