//! Upgrades (issue 17 item 8): a node still running the previous release
//! (built from this repository's history by `scripts/previous-release.sh`)
//! meets records carrying fields it does not know — `trash`, `clone_of`,
//! a volume's `uid` — written by the new release's platform. It refuses them, and must
//! keep what it has mounted for them: an error never unmounts. Replaced by
//! this build on the same node (same store, same mounts), the node takes
//! the records as they are, with the kernel's mount left in place.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The previous release's binary (`VFOLDERD_PREVIOUS`, set by
/// scripts/test.sh, or built here).
fn previous_release() -> &'static Path {
    let path = match std::env::var("VFOLDERD_PREVIOUS") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let out = Command::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/previous-release.sh"
            ))
            .output()
            .unwrap();
            assert!(
                out.status.success(),
                "scripts/previous-release.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        }
    };
    Box::leak(path.into_boxed_path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_refuses_new_fields_keeps_its_mounts_and_this_one_takes_over() {
    require_private_mount_namespace();
    let old = previous_release();
    within(120, async {
        let etcd = Etcd::start().await;
        let opts = NodeOpts {
            binary: Some(old),
            ..NodeOpts::default()
        };
        let mut node = Node::start(&etcd, "n1", opts);
        let id = uuid::Uuid::new_v4();
        let vfolder = format!("{P}/vfolders/{id}");
        etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
            .await;
        etcd.put(&vfolder, "{name: work, owner: alice, volume: data}\n")
            .await;
        let kernel = format!("mounts: [{{vfolder: {id}}}]\n");
        etcd.put(&node.kernel_key("k1"), &kernel).await;
        let st = etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let bind = PathBuf::from(st["mounts"][0]["target"].as_str().unwrap());
        std::fs::write(bind.join("notebook.ipynb"), "{}").unwrap();
        let before = node.mount_at(&bind).expect("bound by the previous release");
        let data = node.volumes().join("data");
        let volume_before = node
            .mount_at(&data)
            .expect("mounted by the previous release");

        // The new platform writes the new fields.
        etcd.put(
            &vfolder,
            "{name: work, owner: alice, volume: data, trash: false}\n",
        )
        .await;
        let volume = tmpfs_volume("requested").trim_end().to_string() + "\nuid: 1000\ngid: 1000\n";
        etcd.put(&format!("{P}/volumes/data"), &volume).await;
        let vf = etcd
            .wait_state(&format!("{P}/status/vfolders/{id}"), "Rejected")
            .await;
        assert!(
            vf["error"].as_str().unwrap_or_default().contains("trash"),
            "{vf}"
        );
        let vol = etcd
            .wait_state(&node.volume_status("data"), "Rejected")
            .await;
        assert!(
            vol["error"].as_str().unwrap_or_default().contains("uid"),
            "{vol}"
        );
        let k1 = etcd
            .wait_for(&node.kernel_status("k1"), "its vfolder refused", |v| {
                v["state"] != "Ready"
            })
            .await;
        assert!(
            k1["error"]
                .as_str()
                .unwrap_or_default()
                .contains("rejected"),
            "{k1}"
        );
        let clone = uuid::Uuid::new_v4();
        etcd.put(
            &format!("{P}/vfolders/{clone}"),
            &format!("{{name: copy, owner: alice, volume: data, clone_of: {id}}}\n"),
        )
        .await;
        // Several passes later, nothing it had mounted is gone.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(node.running(), "the previous release kept running");
        let kept = node.mount_at(&bind).expect("an error never unmounts");
        assert_eq!(kept.id, before.id, "the same mount");
        let volume_kept = node.mount_at(&data).expect("a refused volume in use stays");
        assert_eq!(volume_kept.id, volume_before.id);
        assert_eq!(
            std::fs::read_to_string(bind.join("notebook.ipynb")).unwrap(),
            "{}"
        );

        // The upgrade: this build on the same node, store and mounts.
        assert!(node.stop());
        node.binary = PathBuf::from(env!("CARGO_BIN_EXE_vfolderd"));
        node.spawn();
        let st = etcd
            .wait_for(&node.kernel_status("k1"), "Ready under this build", |v| {
                v["state"] == "Ready" && v["revision"].as_i64().is_some()
            })
            .await;
        assert!(st.get("error").is_none(), "{st}");
        let after = node.mount_at(&bind).expect("still bound");
        assert_eq!(after.id, before.id, "taken over, not mounted again");
        etcd.wait_state(&format!("{P}/status/vfolders/{clone}"), "Ready")
            .await;
    })
    .await;
}
