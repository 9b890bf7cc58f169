//! Azure Blob datasets against the Azurite emulator: the seed's create
//! container / upload / list / SAS, as `vfolderd dataset` commands.

mod common;

use azure_storage::prelude::*;
use azure_storage::CloudLocation;
use azure_storage_blobs::prelude::*;
use common::*;

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
