//! A 3-member etcd cluster on loopback: the leader is killed in the middle of
//! a stream of changes, and every change still converges on the node.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_mid_stream_loses_no_change() {
    require_private_mount_namespace();
    within(240, async {
        let mut cluster = Cluster::start(3).await;
        // The node's config lists all three members.
        let endpoints = cluster.endpoints.join("\", \"");
        let node = Node::start_with_endpoint(&endpoints, "n1", NodeOpts::default());
        let c = cluster.client().await;
        let mut deleter = c.clone();
        let put = |key: String, value: String| {
            let mut c = c.clone();
            async move {
                // An election makes a few requests fail: retry, as a platform would.
                let deadline = Instant::now() + Duration::from_secs(60);
                while let Err(e) = c.put(key.as_str(), value.as_str(), None).await {
                    assert!(Instant::now() < deadline, "put {key} kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        put(format!("{P}/volumes/shard1"), tmpfs_volume("requested")).await;
        let id = uuid::Uuid::new_v4().to_string();
        put(
            format!("{P}/vfolders/{id}"),
            "{name: data, owner: u, volume: shard1}\n".into(),
        )
        .await;

        const N: usize = 120;
        let mut killed = None;
        for i in 0..N {
            put(
                node.kernel_key(&format!("k{i:03}")),
                format!("mounts: [{{vfolder: {id}}}]\n"),
            )
            .await;
            if i == N / 3 {
                killed = Some(cluster.kill_leader().await);
            }
            if i == 2 * N / 3 {
                // And some deletes after the election, which must converge too.
                for j in 0..10 {
                    let key = node.kernel_key(&format!("k{j:03}"));
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while deleter.delete(key.as_str(), None).await.is_err() {
                        assert!(Instant::now() < deadline);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        eprintln!("killed leader {killed:?}");
        let deadline = Instant::now() + Duration::from_secs(90);
        let want: Vec<_> = (10..N)
            .map(|i| node.home(&format!("k{i:03}")).join("data"))
            .collect();
        loop {
            let mounts = node.mounts();
            let binds: Vec<_> = mounts
                .iter()
                .filter(|m| m.mount_point.starts_with(node.kernels()))
                .collect();
            let all_there = want
                .iter()
                .all(|t| binds.iter().any(|m| &m.mount_point == t));
            if all_there && binds.len() == want.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not converged after the leader was killed: {} binds, want {}\n{}",
                binds.len(),
                want.len(),
                node.log()
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Statuses reach etcd through the surviving members too.
        let mut c2 = cluster.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let key = format!("{P}/status/nodes/n1/kernels/k{:03}", N - 1);
            if let Ok(r) = c2.get(key.as_str(), None).await {
                if r.kvs()
                    .first()
                    .is_some_and(|kv| kv.value_str().unwrap().contains("\"Ready\""))
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "last kernel's status never Ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
