//! Azure Blob datasets against the Azurite emulator: the seed's create
//! container / upload / list / SAS, as `vfolderd dataset` commands.

mod common;

use azure_storage::prelude::*;
use azure_storage::CloudLocation;
use azure_storage_blobs::prelude::*;
use common::*;
use std::time::{Duration, Instant};

fn sas_token(url: &str) -> String {
    url.split_once('?').unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_push_ls_and_sas_read_back_through_azurite() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "dl-key");
        let spec = format!(
            "mount: {{at: requested, fstype: azureblob, path: {}, credentials: dl-key}}\n",
            azurite.container_url("dlsamples")
        );
        etcd.put(&format!("{P}/volumes/dlsamples"), &spec).await;

        assert_eq!(
            node.cli(&["dataset", "create-container", "dlsamples"])
                .trim(),
            "container dlsamples created"
        );
        assert_eq!(
            node.cli(&["dataset", "create-container", "dlsamples"])
                .trim(),
            "container dlsamples exists"
        );

        let src = node.dir.path().join("upload");
        std::fs::create_dir_all(src.join("images")).unwrap();
        std::fs::write(src.join("images/azure_center.png"), b"\x89PNG fake image").unwrap();
        std::fs::write(src.join("notes.txt"), b"hello from the seed").unwrap();
        std::fs::write(src.join("model.bin"), vec![7u8; 100_000]).unwrap();
        let out = node.cli(&[
            "dataset",
            "push",
            "dlsamples",
            src.to_str().unwrap(),
            "--parallel",
            "2",
        ]);
        assert!(out.contains("pushed 3 files, 100034 bytes"), "{out}");

        let ls = node.cli(&["dataset", "ls", "dlsamples"]);
        let rows: Vec<Vec<&str>> = ls.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(
            rows,
            vec![
                vec!["15", "image/png", "images/azure_center.png"],
                vec!["100000", "application/octet-stream", "model.bin"],
                vec!["19", "text/plain", "notes.txt"],
            ]
        );

        // The seed's AccessTest: read a blob back with nothing but a read SAS.
        let url = node.cli(&["dataset", "sas", "dlsamples", "--read", "--hours", "1"]);
        let creds = StorageCredentials::sas_token(sas_token(url.trim())).unwrap();
        let location = CloudLocation::Custom {
            account: AZURITE_ACCOUNT.into(),
            uri: azurite.endpoint.clone(),
        };
        let c = ClientBuilder::with_location(location.clone(), creds).container_client("dlsamples");
        assert_eq!(
            c.blob_client("notes.txt").get_content().await.unwrap(),
            b"hello from the seed"
        );
        // A read SAS cannot write.
        let err = c
            .blob_client("evil.txt")
            .put_block_blob(b"x".to_vec())
            .await
            .unwrap_err();
        assert_eq!(
            err.as_http_error().map(|h| h.status()),
            Some(azure_core::StatusCode::Forbidden),
            "{err}"
        );
        // A write SAS can.
        let url = node.cli(&["dataset", "sas", "dlsamples", "--write", "--hours", "1"]);
        let creds = StorageCredentials::sas_token(sas_token(url.trim())).unwrap();
        let c = ClientBuilder::with_location(location, creds).container_client("dlsamples");
        c.blob_client("ok.txt")
            .put_block_blob(b"y".to_vec())
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azureblob_volume_without_credentials_or_with_a_bad_url_is_rejected() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        etcd.put(&format!("{P}/volumes/nocreds"), "mount: {at: startup, fstype: azureblob, path: 'https://acct.blob.core.windows.net/data'}\n").await;
        etcd.put(&format!("{P}/volumes/sasurl"), "mount: {at: startup, fstype: azureblob, path: 'https://acct.blob.core.windows.net/data?sig=SECRETSIG', credentials: k}\n").await;
        let st = etcd.wait_state(&node.volume_status("nocreds"), "Rejected").await;
        assert!(st["error"].as_str().unwrap().contains("credentials"), "{st}");
        let st = etcd.wait_state(&node.volume_status("sasurl"), "Rejected").await;
        assert!(!st.to_string().contains("SECRETSIG"), "the SAS is not echoed: {st}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_dataset_is_fuse_mounted_read_only_into_kernels_and_survives_restart_and_daemon_death(
) {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let mut node = Node::start(
            &etcd,
            "n1",
            NodeOpts { extra_config: "probe_interval: 300ms\nprobe_timeout: 2s\nsas_lifetime: 2h\n", ..Default::default() },
        );
        write_azurite_key(&node, "dl-key");
        let spec = format!(
            "mount: {{at: startup, fstype: azureblob, path: {}, credentials: dl-key}}\ncreate: true\n",
            azurite.container_url("dlsamples")
        );
        etcd.put(&format!("{P}/volumes/dlsamples"), &spec).await;
        etcd.wait_state(&node.volume_status("dlsamples"), "Mounted").await;
        let target = node.volumes().join("dlsamples");
        let m = node.mount_at(&target).unwrap();
        assert_eq!(m.fstype, "fuse.rclone");
        assert!(m.is_readonly() && m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");

        // The SAS is in rclone's environment, never in its argv.
        let (pid, argv) = rclone_for(&target).expect("rclone serves the volume");
        assert!(!argv.contains("sig=") && !argv.contains(AZURITE_KEY), "{argv}");
        assert!(!node.log().contains("sig="), "no SAS in the log");
        let series = "vfolderd_sas_expiry_timestamp_seconds{volume=\"dlsamples\"}";
        until("the expiry metric", 10, || node.metric(series).is_some()).await;
        let expiry = node.metric(series).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((expiry - now - 7200.0).abs() < 120.0, "SAS lifetime as configured: {}", expiry - now);

        // A pushed file appears in a kernel's home, read-only.
        let src = node.dir.path().join("push");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("azure_center.png"), b"\x89PNG image bytes").unwrap();
        node.cli(&["dataset", "push", "dlsamples", src.to_str().unwrap()]);
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let file = node.home("k1").join("dlsamples/azure_center.png");
        until("the pushed blob shows in the kernel's home", 30, || std::fs::read(&file).ok() == Some(b"\x89PNG image bytes".to_vec()))
            .await;
        let err = std::fs::write(node.home("k1").join("dlsamples/new.txt"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));

        // A vfolderd restart adopts the rclone mount: same daemon, no action.
        assert!(node.stop());
        node.spawn();
        until("converged after restart", 30, || {
            node.metric_now("vfolderd_reconcile_passes_total{result=\"converged\"}").unwrap_or(0.0) >= 1.0
        })
        .await;
        assert_eq!(rclone_for(&target).map(|(p, _)| p), Some(pid), "the same rclone daemon");
        assert!(!node.metrics().contains("kind=\"mount\""), "nothing remounted");

        // The rclone daemon dies: Stale while k1 uses it, healed once k1 is gone.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        etcd.wait_state(&node.volume_status("dlsamples"), "Stale").await;
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_state(&node.volume_status("dlsamples"), "Mounted").await;
        let (pid2, _) = rclone_for(&target).expect("a new rclone");
        assert_ne!(pid, pid2);
        assert_eq!(std::fs::read(target.join("azure_center.png")).unwrap(), b"\x89PNG image bytes");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_mount_sas_is_renewed_in_its_last_third_once_unused() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                extra_config: "sas_lifetime: 9s\n",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: startup, fstype: azureblob, path: {}, credentials: k}}\ncreate: true\n",
            azurite.container_url("data")
        );
        etcd.put(&format!("{P}/volumes/data"), &spec).await;
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let series = "vfolderd_sas_expiry_timestamp_seconds{volume=\"data\"}";
        until("the expiry metric", 10, || node.metric(series).is_some()).await;
        let first = node.metric(series).unwrap();
        let target = node.volumes().join("data");
        let (pid, _) = rclone_for(&target).unwrap();

        // In use by k1: the renewal waits, and the status says so.
        let st = etcd
            .wait_for(&node.volume_status("data"), "renewal pending", |v| {
                v.get("renewal").is_some()
            })
            .await;
        assert_eq!(st["state"], "Mounted");
        assert_eq!(
            node.metric(series),
            Some(first),
            "not renewed under a running kernel"
        );
        assert_eq!(rclone_for(&target).map(|(p, _)| p), Some(pid));

        etcd.delete(&node.kernel_key("k1")).await;
        until("a fresh SAS", 30, || {
            node.metric(series).is_some_and(|e| e > first)
        })
        .await;
        let (pid2, _) = rclone_for(&target).expect("remounted");
        assert_ne!(pid, pid2, "a new rclone with the new SAS");
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "the old mount is gone"
        );
        etcd.wait_for(&node.volume_status("data"), "no renewal pending", |v| {
            v.get("renewal").is_none() && v["state"] == "Mounted"
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_token_file_reads_cannot_write_is_renewed_expires_and_goes_on_detach() {
    use std::os::unix::fs::MetadataExt;
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                extra_config: "token_lifetime: 6s\n",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: requested, fstype: azureblob, path: {}, credentials: k}}\n",
            azurite.container_url("dlsamples")
        );
        etcd.put(&format!("{P}/volumes/dlsamples"), &spec).await;
        node.cli(&["dataset", "create-container", "dlsamples"]);
        let f = node.dir.path().join("result.png");
        std::fs::write(&f, b"png bytes").unwrap();
        node.cli(&["dataset", "push", "dlsamples", f.to_str().unwrap()]);

        etcd.put(
            &node.kernel_key("k1"),
            "{uid: 1000, gid: 1000, mounts: [{volume: dlsamples, token: read}]}\n",
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let path = node.home("k1").join(".vfolderd/sas/dlsamples");
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!((md.mode() & 0o777, md.uid(), md.gid()), (0o600, 1000, 1000));
        let dir = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!((dir.mode() & 0o777, dir.uid()), (0o700, 1000));
        assert!(
            node.mount_at(&node.volumes().join("dlsamples")).is_none(),
            "a token needs no mount"
        );

        // The seed's AccessTest, with the kernel's token.
        let url = std::fs::read_to_string(&path).unwrap().trim().to_string();
        let location = CloudLocation::Custom {
            account: AZURITE_ACCOUNT.into(),
            uri: azurite.endpoint.clone(),
        };
        let client = |url: &str| {
            let creds = StorageCredentials::sas_token(sas_token(url)).unwrap();
            ClientBuilder::with_location(location.clone(), creds).container_client("dlsamples")
        };
        assert_eq!(
            client(&url)
                .blob_client("result.png")
                .get_content()
                .await
                .unwrap(),
            b"png bytes"
        );
        let err = client(&url)
            .blob_client("x.txt")
            .put_block_blob(b"x".to_vec())
            .await
            .unwrap_err();
        assert_eq!(
            err.as_http_error().map(|h| h.status()),
            Some(azure_core::StatusCode::Forbidden)
        );

        // Renewed at two thirds of its lifetime; the old one is refused once expired.
        let written = Instant::now();
        until("the token is renewed", 20, || {
            std::fs::read_to_string(&path).is_ok_and(|u| u.trim() != url)
        })
        .await;
        assert!(
            written.elapsed() < Duration::from_secs(6),
            "renewed before expiry: {:?}",
            written.elapsed()
        );
        let fresh = std::fs::read_to_string(&path).unwrap().trim().to_string();
        tokio::time::sleep(Duration::from_secs(7).saturating_sub(written.elapsed())).await;
        let err = client(&url)
            .blob_client("result.png")
            .get_content()
            .await
            .unwrap_err();
        assert_eq!(
            err.as_http_error().map(|h| h.status()),
            Some(azure_core::StatusCode::Forbidden),
            "expired: {err}"
        );
        let _ = fresh;

        for (k, v) in etcd.dump(&format!("{P}/status/")).await {
            assert!(!v.contains("sig="), "SAS in status {k}");
        }
        assert!(!node.log().contains("sig="), "SAS in the log");
        assert!(!node.metrics().contains("sig="), "SAS in metrics");

        etcd.delete(&node.kernel_key("k1")).await;
        until("the token file is gone", 20, || !path.exists()).await;
        until("the kernel's directories are gone", 20, || {
            !node.kernels().join("k1").exists()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_files_cifs_with_a_credentials_file_gets_csi_defaults_and_no_secret_anywhere() {
    use std::os::unix::fs::PermissionsExt;
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts { helper_double: true, ..Default::default() });
        let creds = node.dir.path().join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("shard-2"), "username=acct2\npassword=TOPSECRET-2\n").unwrap();
        std::fs::set_permissions(creds.join("shard-2"), std::fs::Permissions::from_mode(0o644)).unwrap();
        etcd.put(&format!("{P}/volumes/shard2"), "mount: {at: startup, fstype: cifs, path: '//acct2.file.core.windows.net/vfolder', credentials: shard-2}\n").await;
        // A world-readable credentials file is refused, saying why.
        let st = etcd.wait_state(&node.volume_status("shard2"), "Failed").await;
        assert!(st["error"].as_str().unwrap().contains("chmod 600"), "{st}");
        std::fs::set_permissions(creds.join("shard-2"), std::fs::Permissions::from_mode(0o600)).unwrap();
        etcd.wait_state(&node.volume_status("shard2"), "Mounted").await;

        let argv = std::fs::read_to_string(node.dir.path().join("helper.log")).unwrap();
        let want = format!(
            "-t cifs -o vers=3.0,actimeo=30,mfsymlinks,uid=1000,gid=1000,forceuid,forcegid,dir_mode=0755,file_mode=0644,credentials={},nosuid,nodev -- //acct2.file.core.windows.net/vfolder {}\n",
            creds.join("shard-2").display(),
            node.volumes().join("shard2").display()
        );
        assert_eq!(argv, want, "the exact command line, read from /proc/<pid>/cmdline");
        let seen = std::fs::read_to_string(node.dir.path().join("helper-creds.log")).unwrap();
        assert_eq!(seen, "600\nusername=acct2\npassword=TOPSECRET-2\n");
        for (k, v) in etcd.dump(&format!("{P}/status/")).await {
            assert!(!v.contains("TOPSECRET"), "secret in status {k}");
        }
        assert!(!node.log().contains("TOPSECRET") && !node.metrics().contains("TOPSECRET"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfolders_live_on_a_read_write_blob_volume_like_on_any_other() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: requested, fstype: azureblob, path: {}, credentials: k}}\ncreate: true\n",
            azurite.container_url("userdata")
        );
        etcd.put(&format!("{P}/volumes/userdata"), &spec).await;
        let id = node.cli(&[
            "vfolder", "create", "--volume", "userdata", "--name", "mine", "--owner", "alice",
        ]);
        let id = id.trim().to_string();
        etcd.wait_state(&format!("{P}/status/vfolders/{id}"), "Ready")
            .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let m = node.mount_at(&node.home("k1").join("mine")).unwrap();
        assert!(!m.is_readonly() && m.has_option("nosuid") && m.has_option("nodev"));

        std::fs::write(
            node.home("k1").join("mine/results.csv"),
            b"epoch,loss\n1,0.5\n",
        )
        .unwrap();
        let hex = id.replace('-', "");
        let blob = format!("{}/{}/{hex}/results.csv", &hex[0..2], &hex[2..4]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ls = node.cli(&["dataset", "ls", "userdata"]);
            if ls
                .lines()
                .any(|l| l.ends_with(&blob) && l.starts_with("17\t"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the file never reached the container:\n{ls}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
}

/// Issue 11 item 6: rclone ran with `--daemon`, whose server re-executes
/// itself in a new session that no kill reaches and whose pid nobody knew.
/// A frozen server was detached and replaced when its volume healed, and
/// stayed behind forever holding its SAS. Now the server is vfolderd's own
/// child, its pid in the ownership record, and it is killed before a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_rclone_is_killed_when_its_volume_heals_and_none_is_left_behind() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                extra_config: "probe_interval: 300ms\nprobe_timeout: 1s\n",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: startup, fstype: azureblob, path: {}, credentials: k}}\ncreate: true\n",
            azurite.container_url("frozen")
        );
        etcd.put(&format!("{P}/volumes/frozen"), &spec).await;
        etcd.wait_state(&node.volume_status("frozen"), "Mounted")
            .await;
        let target = node.volumes().join("frozen");
        let old = rclones_for(&target);
        assert_eq!(old.len(), 1, "one rclone serves the volume: {old:?}");
        let old = nix::unistd::Pid::from_raw(old[0]);
        nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGSTOP).unwrap();

        // The prober finds it stale; nobody uses it, so it heals at once.
        until("the frozen rclone is gone", 60, || {
            !rclones_for(&target).contains(&old.as_raw())
        })
        .await;
        // The status may still say Mounted from before: wait for the new server's mount.
        until("a new rclone serves the volume", 60, || {
            !rclones_for(&target).is_empty() && node.mount_at(&target).is_some()
        })
        .await;
        etcd.wait_state(&node.volume_status("frozen"), "Mounted")
            .await;
        let now = rclones_for(&target);
        assert_eq!(
            now.len(),
            1,
            "exactly one rclone serves the volume: {now:?}"
        );
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "one mount at the target, nothing stacked"
        );
        assert!(std::fs::read_dir(&target).is_ok(), "the new server answers");
    })
    .await;
}

/// Issue 12 item 2: any kernel got `token: write` (create, write, delete
/// every blob, other users' too) on any blob volume, an `access: ro` dataset
/// included. A write token now needs an `access: rw` volume that the policy
/// lists in `tokens.write`; a refused one is `Rejected`, naming the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_token_needs_an_rw_volume_and_the_policy() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        for (name, access) in [("dataset", "ro"), ("shared", "rw")] {
            let spec = format!(
                "mount: {{at: requested, fstype: azureblob, path: {}, credentials: k}}\naccess: {access}\n",
                azurite.container_url(name)
            );
            etcd.put(&format!("{P}/volumes/{name}"), &spec).await;
            node.cli(&["dataset", "create-container", name]);
        }
        let token = |v: &str, kind: &str| format!("{{mounts: [{{volume: {v}, token: {kind}}}]}}\n");
        etcd.put(&node.kernel_key("k-read"), &token("dataset", "read")).await;
        etcd.put(&node.kernel_key("k-ro"), &token("dataset", "write")).await;
        etcd.put(&node.kernel_key("k-rw"), &token("shared", "write")).await;
        etcd.wait_state(&node.kernel_status("k-read"), "Ready").await;
        let st = etcd.wait_state(&node.kernel_status("k-ro"), "Rejected").await;
        assert!(st["error"].as_str().unwrap().contains("access: rw"), "{st}");
        let st = etcd.wait_state(&node.kernel_status("k-rw"), "Rejected").await;
        assert!(st["error"].as_str().unwrap().contains("policy tokens.write"), "{st}");
        assert!(!node.home("k-rw").join(".vfolderd/sas/shared").exists());

        // The operator allows write tokens on the rw volume: k-rw gets one that writes.
        let policies = node.dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("tokens.yaml"),
            "fstypes: {azureblob: {}}\ntokens: {write: [shared, dataset]}\n",
        )
        .unwrap();
        etcd.wait_state(&node.kernel_status("k-rw"), "Ready").await;
        let st = etcd.get_json(&node.kernel_status("k-ro")).await.unwrap();
        assert_eq!(st["state"], "Rejected", "an ro volume never gets a write token: {st}");
        let url = std::fs::read_to_string(node.home("k-rw").join(".vfolderd/sas/shared")).unwrap();
        let location = CloudLocation::Custom {
            account: AZURITE_ACCOUNT.into(),
            uri: azurite.endpoint.clone(),
        };
        let creds = StorageCredentials::sas_token(sas_token(url.trim())).unwrap();
        ClientBuilder::with_location(location, creds)
            .container_client("shared")
            .blob_client("written.txt")
            .put_block_blob(b"x".to_vec())
            .await
            .expect("the write token writes");
    })
    .await;
}
