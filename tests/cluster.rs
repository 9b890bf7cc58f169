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
        // The client's balancer keeps picking a dead member: the node took
        // it out, so its requests go to the live ones.
        until("the dead member is out of the node's client", 30, || {
            node.metric("vfolderd_etcd_endpoints_out") == Some(1.0)
        })
        .await;
        let killed = killed.unwrap();
        assert!(
            node.log()
                .lines()
                .any(|l| l.contains("taken out of the client") && l.contains(&killed)),
            "the log names the member taken out ({killed})"
        );
    })
    .await;
}

/// Storage keeps every record; each agent holds, and hears about, only the
/// vfolder records its own kernels use (issue 16 item 1): one storage node
/// and three agents on one etcd, every node a real vfolderd in this test's
/// mount namespace, sharing one bind volume (a host directory standing in
/// for a network share).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_holds_and_hears_only_the_vfolders_its_kernels_use() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let (share, ids) = shared_volume_with_records(&etcd, 20).await;
        let role = |roles| NodeOpts {
            roles,
            ..Default::default()
        };
        let storage = Node::start(&etcd, "s1", role("[storage]"));
        let agents: Vec<Node> = ["a1", "a2", "a3"]
            .iter()
            .map(|n| Node::start(&etcd, n, role("[agent]")))
            .collect();
        for id in &ids {
            etcd.wait_state(&format!("{P}/status/vfolders/{id}"), "Ready")
                .await;
        }
        // a1 uses two records, a2 one, a3 none.
        let uses = [vec![0, 1], vec![2], vec![]];
        for (agent, used) in agents.iter().zip(&uses).filter(|(_, u)| !u.is_empty()) {
            let mounts: Vec<String> = used
                .iter()
                .map(|i| format!("{{vfolder: {}}}", ids[*i]))
                .collect();
            let k = format!("mounts: [{}]\n", mounts.join(", "));
            etcd.put(&agent.kernel_key("k1"), &k).await;
            etcd.wait_state(&agent.kernel_status("k1"), "Ready").await;
        }
        // What each node holds, as its metrics say.
        let held = |n: &Node| n.metric("vfolderd_desired_objects{kind=\"vfolder\"}");
        until("the storage node holds every record", 30, || {
            held(&storage) == Some(20.0)
        })
        .await;
        for (agent, used) in agents.iter().zip(&uses) {
            until("each agent holds only what its kernels use", 30, || {
                held(agent) == Some(used.len() as f64)
            })
            .await;
        }
        // A user writes through a1's bind; the file lands in the share.
        std::fs::write(
            agents[0]
                .home("k1")
                .join(format!("f-{}", &ids[0][..8]))
                .join("x"),
            "1",
        )
        .unwrap();
        assert!(share.path().join(shard(&ids[0])).join("x").exists());

        // Changes to other records and to another node's kernels reach
        // no agent that does not use them: a3 hears only the fence below.
        let events = |n: &Node| n.metric("vfolderd_etcd_watch_events_total").unwrap();
        let before = events(&agents[2]);
        etcd.put(
            &format!("{P}/vfolders/{}", ids[10]),
            "{name: changed, owner: alice, volume: shared, quota_bytes: 1000}\n",
        )
        .await;
        let k = format!(
            "mounts: [{{vfolder: {}}}, {{vfolder: {}}}]\n",
            ids[2], ids[3]
        );
        etcd.put(&agents[1].kernel_key("k1"), &k).await;
        etcd.wait_for(&agents[1].kernel_status("k1"), "two mounts", |v| {
            v["state"] == "Ready" && v["mounts"].as_array().is_some_and(|m| m.len() == 2)
        })
        .await;
        etcd.put(&format!("{P}/volumes/fence"), &tmpfs_volume("requested"))
            .await;
        until("a3 saw the fence", 30, || {
            agents[2].metric("vfolderd_desired_objects{kind=\"volume\"}") == Some(2.0)
        })
        .await;
        assert_eq!(events(&agents[2]) - before, 1.0, "a3 heard only the fence");
        until("a2 follows its new record", 30, || {
            held(&agents[1]) == Some(2.0)
        })
        .await;

        // A record a kernel asks for before it exists: followed from then on.
        let late = uuid::Uuid::new_v4().to_string();
        etcd.put(
            &agents[2].kernel_key("k2"),
            &format!("mounts: [{{vfolder: {late}}}]\n"),
        )
        .await;
        let st = etcd
            .wait_state(&agents[2].kernel_status("k2"), "Pending")
            .await;
        assert!(st.to_string().contains("no record"), "{st}");
        etcd.put(
            &format!("{P}/vfolders/{late}"),
            "{name: late, owner: alice, volume: shared}\n",
        )
        .await;
        etcd.wait_state(&agents[2].kernel_status("k2"), "Ready")
            .await;

        // A followed record deleted: the kernel waits for it (its bind stays).
        etcd.delete(&format!("{P}/vfolders/{}", ids[1])).await;
        etcd.wait_for(&agents[0].kernel_status("k1"), "waiting", |v| {
            v.to_string().contains("no record")
        })
        .await;
        // A kernel gone: its records are forgotten.
        etcd.delete(&agents[0].kernel_key("k1")).await;
        until("a1 forgets the records of its gone kernel", 30, || {
            held(&agents[0]) == Some(0.0)
        })
        .await;
    })
    .await;
}

/// An agent stores exactly the records it follows: restarted during an etcd
/// outage it still has its kernels' vfolder records (the bind is repaired
/// from them), and once etcd is back it hears their changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_its_followed_records_through_an_outage_and_a_restart() {
    outage_and_restart(true).await;
}

/// The same with the kernel in the node's first list, so its record comes
/// with the listing: the relist after the outage (read before the record's
/// deletion is applied) must not bring the deleted record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_never_brings_back_a_record_the_agent_saw_deleted() {
    outage_and_restart(false).await;
}

async fn outage_and_restart(kernel_after_first_list: bool) {
    require_private_mount_namespace();
    within(180, async {
        let mut etcd = Etcd::start().await;
        let mut node = Node::start(
            &etcd,
            "a1",
            NodeOpts {
                roles: "[agent]",
                ..Default::default()
            },
        );
        let share = node.dir.path().join("share");
        let id = uuid::Uuid::new_v4().to_string();
        std::fs::create_dir_all(share.join(shard(&id))).unwrap();
        let volume = format!(
            "mount: {{at: requested, fstype: bind, path: {}}}\n",
            share.display()
        );
        etcd.put(&format!("{P}/volumes/nfs1"), &volume).await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: data, owner: alice, volume: nfs1}\n",
        )
        .await;
        // The kernel comes after the node's first list: its record is
        // followed (read and stored) by the follower, not by the listing.
        if kernel_after_first_list {
            until("the node listed and converged", 30, || {
                node.metric_now("vfolderd_ready") == Some(1.0)
            })
            .await;
        }
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let bind = node.home("k1").join("data");

        etcd.stop();
        assert!(node.stop());
        node.spawn();
        until("a pass ran from the stored state", 30, || {
            node.metric_now("vfolderd_reconcile_passes_total{result=\"converged\"}")
                .unwrap_or(0.0)
                >= 1.0
        })
        .await;
        assert_eq!(
            node.metric("vfolderd_desired_objects{kind=\"vfolder\"}"),
            Some(1.0),
            "the followed record was stored"
        );
        nix::mount::umount2(&bind, nix::mount::MntFlags::empty()).unwrap();
        until("the bind is repaired from the stored record", 30, || {
            node.mount_at(&bind).is_some()
        })
        .await;

        etcd.restart().await;
        until("etcd is seen again", 30, || {
            node.metric("vfolderd_etcd_connected") == Some(1.0)
        })
        .await;
        etcd.delete(&format!("{P}/vfolders/{id}")).await;
        etcd.wait_for(&node.kernel_status("k1"), "waiting for its record", |v| {
            v.to_string().contains("no record")
        })
        .await;
        assert!(
            node.mount_at(&bind).is_some(),
            "a missing record unmounts nothing"
        );
    })
    .await;
}

/// What an operator watching an agent's status keys sees while kernels come
/// (issue 16 item 4): each kernel's status is written once, straight to
/// `Ready`, even though its vfolder record is read only once the kernel
/// names it (no `Pending` "no record" flash); the shared volume's status,
/// whose `users` count moves with every kernel, is rewritten at most once
/// per 10 s; and the node's liveness key is not rewritten at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_each_new_kernel_status_once() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let (_share, ids) = shared_volume_with_records(&etcd, 12).await;
        let (_storage, agent) = storage_and_agent(&etcd);
        for id in &ids {
            etcd.wait_state(&format!("{P}/status/vfolders/{id}"), "Ready")
                .await;
        }
        // The volume is mounted for a first kernel.
        let kernel = |i: usize| format!("mounts: [{{vfolder: {}}}]\n", ids[i]);
        etcd.put(&agent.kernel_key("k0"), &kernel(0)).await;
        etcd.wait_state(&agent.kernel_status("k0"), "Ready").await;
        tokio::time::sleep(Duration::from_secs(1)).await;

        let mut c = etcd.client().await;
        let from = c.get("x", None).await.unwrap().header().unwrap().revision() + 1;
        let t0 = Instant::now();
        let kernels = 10;
        for i in 1..=kernels {
            let k = format!("k{i}");
            etcd.put(&agent.kernel_key(&k), &kernel(i)).await;
            etcd.wait_state(&agent.kernel_status(&k), "Ready").await;
            // Past the whole pass that follows a kernel change (its
            // volumes' `users`), so each change could write the volume.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let elapsed = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Every write under the agent's status keys since `from`, in order.
        let prefix = format!("{P}/status/nodes/a1");
        let fence = format!("{prefix}~fence");
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(from);
        let mut stream = c.watch(prefix.as_str(), Some(opts)).await.unwrap();
        c.put(fence.as_str(), "", None).await.unwrap();
        let mut puts: Vec<(String, serde_json::Value)> = Vec::new();
        'read: while let Some(resp) = stream.message().await.unwrap() {
            for e in resp.events() {
                let kv = e.kv().unwrap();
                let key = kv.key_str().unwrap().to_string();
                if key == fence {
                    break 'read;
                }
                if e.event_type() == etcd_client::EventType::Put {
                    puts.push((key, serde_json::from_slice(kv.value()).unwrap()));
                }
            }
        }
        for i in 1..=kernels {
            let key = agent.kernel_status(&format!("k{i}"));
            let states: Vec<&serde_json::Value> = puts
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| &v["state"])
                .collect();
            assert_eq!(states, ["Ready"], "{key} written once, as Ready: {puts:?}");
        }
        let volume_puts = puts
            .iter()
            .filter(|(k, _)| *k == agent.volume_status("shared"))
            .count();
        let allowed = 1 + elapsed.as_secs() as usize / 10;
        assert!(
            volume_puts <= allowed,
            "the volume's status (its `users` moving with each kernel) written {volume_puts} times in {elapsed:?}: {puts:?}"
        );
        assert!(
            !puts.iter().any(|(k, _)| *k == prefix),
            "the liveness key is not rewritten: {puts:?}"
        );
    })
    .await;
}

/// `limits.vfolders_per_owner` counts every record, which only the storage
/// node holds: an agent whose kernel asks for a refused folder shows the
/// storage node's verdict (not a wait for a directory that never comes),
/// and once the owner deletes another folder the kernel gets its folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_kernel_shows_the_storage_nodes_refusal_until_it_is_lifted() {
    require_private_mount_namespace();
    within(150, async {
        let etcd = Etcd::start().await;
        let (storage, agent) = storage_and_agent(&etcd);
        for n in [&storage, &agent] {
            let policies = n.dir.path().join("policies");
            std::fs::create_dir_all(&policies).unwrap();
            let limits = "fstypes: {bind: {}}\nlimits: {vfolders_per_owner: 1}\n";
            std::fs::write(policies.join("limits.yaml"), limits).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // the policy watchers
                                                          // alice's first folder is hers; her second is one too many.
        let (share, ids) = shared_volume_with_records(&etcd, 2).await;
        let status = |id: &String| format!("{P}/status/vfolders/{id}");
        etcd.wait_state(&status(&ids[0]), "Ready").await;
        etcd.wait_state(&status(&ids[1]), "Rejected").await;

        let k = format!("mounts: [{{vfolder: {}}}]\n", ids[1]);
        etcd.put(&agent.kernel_key("k1"), &k).await;
        let st = etcd
            .wait_for(
                &agent.kernel_status("k1"),
                "the storage node's verdict",
                |v| {
                    v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("policy limits.vfolders_per_owner"))
                },
            )
            .await;
        assert_eq!(st["state"], "Pending", "{st}");

        // alice deletes her first folder: the second is hers now.
        etcd.delete(&format!("{P}/vfolders/{}", ids[0])).await;
        etcd.wait_state(&status(&ids[1]), "Ready").await;
        etcd.wait_state(&agent.kernel_status("k1"), "Ready").await;
        let folder = agent.home("k1").join(format!("f-{}", &ids[1][..8]));
        std::fs::write(folder.join("notes.txt"), "hello").unwrap();
        let landed = share.path().join(shard(&ids[1])).join("notes.txt");
        assert_eq!(std::fs::read_to_string(landed).unwrap(), "hello");
    })
    .await;
}

/// A node's heartbeat is one lease: an agent's liveness key has its own;
/// a storage node's lives under its leadership lease (one keep-alive
/// stream per node, whatever its roles).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_keeps_one_lease() {
    require_private_mount_namespace();
    within(90, async {
        let etcd = Etcd::start().await;
        let (storage, agent) = storage_and_agent(&etcd);
        let mut c = etcd.client().await;
        let mut leases = Vec::new();
        for n in [&storage, &agent] {
            let key = format!("{P}/status/nodes/{}", n.name);
            etcd.wait_for(&key, "ready", |v| v["ready"] == true).await;
            let r = c.get(key.as_str(), None).await.unwrap();
            leases.push(r.kvs()[0].lease());
        }
        let (s1, a1) = (leases[0], leases[1]);
        // The storage node's candidacy: `P/leaders/cluster/<lease in hex>`.
        let leaders = etcd
            .client()
            .await
            .get(
                format!("{P}/leaders/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        let candidacies: Vec<(String, i64)> = leaders
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.lease()))
            .collect();
        assert_eq!(
            candidacies,
            [(format!("{P}/leaders/cluster/{s1:x}"), s1)],
            "the storage node campaigns under its liveness lease"
        );
        let mut all: Vec<i64> = etcd
            .client()
            .await
            .leases()
            .await
            .unwrap()
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        all.sort();
        let mut want = vec![s1, a1];
        want.sort();
        assert_eq!(all, want, "two nodes, two leases");
    })
    .await;
}

/// A storage node `s1` and an agent `a1`.
fn storage_and_agent(etcd: &Etcd) -> (Node, Node) {
    let role = |roles| NodeOpts {
        roles,
        ..Default::default()
    };
    let storage = Node::start(etcd, "s1", role("[storage]"));
    (storage, Node::start(etcd, "a1", role("[agent]")))
}

/// A bind volume `shared` on a host directory (standing in for a network
/// share) and `n` vfolder records on it: the directory and the ids.
async fn shared_volume_with_records(etcd: &Etcd, n: usize) -> (tempfile::TempDir, Vec<String>) {
    let share = tempfile::tempdir().unwrap();
    let volume = format!(
        "mount: {{at: requested, fstype: bind, path: {}}}\n",
        share.path().display()
    );
    etcd.put(&format!("{P}/volumes/shared"), &volume).await;
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for id in &ids {
        let v = format!("{{name: f-{}, owner: alice, volume: shared}}\n", &id[..8]);
        etcd.put(&format!("{P}/vfolders/{id}"), &v).await;
    }
    (share, ids)
}
