//! Crash loop: `kill -9` at random moments while 1,000 kernel attachments
//! converge (and others are torn down), then restart; after each round the
//! mount table holds exactly the desired mounts, once each, and the ledger
//! agrees with it and with the directories on disk.
//!
//! `CRASH_ROUNDS` (default 10) sets the number of rounds, `CRASH_SEED` the
//! random seed (printed, to replay a failure):
//! `CRASH_ROUNDS=100 scripts/test.sh --test crash`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vfolderd::state::ledger::Ledger;

const KERNELS: usize = 250;
const VFOLDERS: usize = 10;
const PER_KERNEL: usize = 4;

/// xorshift64*: enough randomness for crash timing, reproducible from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn kernel_vfolders(k: usize) -> Vec<usize> {
    (0..PER_KERNEL).map(|j| (k + j) % VFOLDERS).collect()
}

fn expected_targets(node: &Node, present: &BTreeSet<usize>) -> Vec<PathBuf> {
    let mut t: Vec<PathBuf> = present
        .iter()
        .flat_map(|k| kernel_vfolders(*k).into_iter().map(move |v| (*k, v)))
        .map(|(k, v)| node.home(&format!("k{k:03}")).join(format!("d{v}")))
        .chain(present.iter().map(|k| node.home(&format!("k{k:03}"))))
        .collect();
    if !present.is_empty() {
        t.push(node.volumes().join("shard1"));
    }
    t.sort();
    t
}

/// Every mount vfolderd keeps under the node's roots — volumes, binds and
/// each home's own shared mount — but the kernels root's bind of itself.
fn actual_targets(node: &Node) -> Vec<PathBuf> {
    let mut t: Vec<PathBuf> = mounts_under(node.dir.path())
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| *p != node.kernels())
        .collect();
    t.sort();
    t
}

fn dirs_under(root: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.insert(e.path());
            // Do not descend into mounted volumes' contents.
            if !e.path().starts_with(root.join("shard1")) {
                dirs_under(&e.path(), out);
            }
        }
    }
}

/// Waits until the (restarted) daemon has finished a converged pass and the
/// mount table is exactly the desired one.
async fn wait_converged(node: &Node, present: &BTreeSet<usize>, round: usize) {
    let want = expected_targets(node, present);
    let deadline = Instant::now() + Duration::from_secs(120);
    while node
        .metric_now("vfolderd_reconcile_passes_total{result=\"converged\"}")
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "round {round}: the restarted daemon never converged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        let got = actual_targets(node);
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            let extra: Vec<_> = got.iter().filter(|t| !want.contains(t)).take(5).collect();
            let missing: Vec<_> = want.iter().filter(|t| !got.contains(t)).take(5).collect();
            panic!(
                "round {round}: not converged: {} mounts, want {}; extra {extra:?}, missing {missing:?}\n{}",
                got.len(),
                want.len(),
                node.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_ledger(node: &Node, round: usize) {
    let ledger = Ledger::open(&node.dir.path().join("state/db")).unwrap();
    let owned: Vec<PathBuf> = ledger.mounts().unwrap().keys().cloned().collect();
    let mounted: BTreeSet<PathBuf> = actual_targets(node).into_iter().collect();
    assert_eq!(
        owned.iter().cloned().collect::<BTreeSet<_>>(),
        mounted,
        "round {round}: ledger mounts = mount table"
    );
    let owned_dirs: BTreeSet<PathBuf> = ledger.dirs().unwrap().keys().cloned().collect();
    let mut on_disk = BTreeSet::new();
    dirs_under(&node.kernels(), &mut on_disk);
    dirs_under(&node.volumes(), &mut on_disk);
    let unowned: Vec<_> = on_disk.difference(&owned_dirs).take(5).collect();
    assert!(
        unowned.is_empty(),
        "round {round}: directories nobody owns leaked: {unowned:?}"
    );
    let gone: Vec<_> = owned_dirs.iter().filter(|d| !d.is_dir()).take(5).collect();
    assert!(
        gone.is_empty(),
        "round {round}: owned directories missing from disk: {gone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_converges_with_no_leaked_stacked_or_doubled_mount() {
    require_private_mount_namespace();
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash loop: {rounds} rounds, CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    within(60 + 90 * rounds as u64, async {
        let etcd = Etcd::start().await;
        // An agent: the volume itself comes and goes with its users, under crashes too. It is a
        // bind of a local directory standing in for a network share holding the vfolders.
        let mut node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                resync: "2s",
                ..Default::default()
            },
        );
        let share = node.dir.path().join("share");
        let ids: Vec<String> = (0..VFOLDERS)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        for id in &ids {
            let hex = id.replace('-', "");
            std::fs::create_dir_all(share.join(&hex[0..2]).join(&hex[2..4]).join(&hex)).unwrap();
        }
        etcd.put(
            &format!("{P}/volumes/shard1"),
            &format!(
                "mount: {{at: requested, fstype: bind, path: {}}}\n",
                share.display()
            ),
        )
        .await;
        for (i, id) in ids.iter().enumerate() {
            etcd.put(
                &format!("{P}/vfolders/{id}"),
                &format!("{{name: d{i}, owner: u, volume: shard1}}\n"),
            )
            .await;
        }
        let kernel_value = |k: usize| {
            let mounts: Vec<String> = kernel_vfolders(k)
                .iter()
                .map(|v| format!("{{vfolder: {}}}", ids[*v]))
                .collect();
            format!("mounts: [{}]\n", mounts.join(", "))
        };
        let mut client = etcd.client().await;
        let mut present: BTreeSet<usize> = BTreeSet::new();
        let mut crashes_mid_flight = 0;
        for round in 0..rounds {
            // Change desired state: the first round attaches all 1,000; later ones toggle ~30%.
            let mut changes: BTreeMap<usize, bool> = BTreeMap::new();
            for k in 0..KERNELS {
                let flip = if round == 0 { true } else { rng.below(10) < 3 };
                if flip {
                    changes.insert(k, !present.contains(&k));
                }
            }
            // In transactions of ≤128 operations (etcd's default limit), so the node gets
            // a burst of work to be crashed in the middle of.
            let ops: Vec<etcd_client::TxnOp> = changes
                .iter()
                .map(|(k, add)| {
                    let key = node.kernel_key(&format!("k{k:03}"));
                    if *add {
                        present.insert(*k);
                        etcd_client::TxnOp::put(key, kernel_value(*k), None)
                    } else {
                        present.remove(k);
                        etcd_client::TxnOp::delete(key, None)
                    }
                })
                .collect();
            for chunk in ops.chunks(128) {
                client
                    .txn(etcd_client::Txn::new().and_then(chunk.to_vec()))
                    .await
                    .unwrap();
            }
            // Crash at a random moment while that converges.
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            if actual_targets(&node) != expected_targets(&node, &present) {
                crashes_mid_flight += 1;
            }
            node.kill9();
            node.spawn();
            wait_converged(&node, &present, round).await;
            assert!(
                node.stop(),
                "clean stop: {}",
                node.log()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            check_ledger(&node, round);
            node.spawn();
        }
        eprintln!("crash loop: {crashes_mid_flight} of {rounds} crashes hit mid-convergence");
        // Finally detach everything: no mount and no directory is left behind.
        for k in present.clone() {
            client
                .delete(node.kernel_key(&format!("k{k:03}")), None)
                .await
                .unwrap();
        }
        present.clear();
        wait_converged(&node, &present, rounds).await;
        assert!(node.stop());
        check_ledger(&node, rounds);
        let left: Vec<_> = std::fs::read_dir(node.kernels())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "kernel directories left: {left:?}");
    })
    .await;
}

/// Issue "No single put..." item 6: the set of running mount helpers lived
/// in memory only, so `kill -9` during a slow helper and a restart started a
/// second helper on the same target: two stacked mounts. The helper's pid is
/// now in the ownership record; the restarted daemon waits for it and adopts
/// its mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_slow_mount_helper_never_starts_a_second_one() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let mut node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                roles: "[agent]",
                helper_double: true,
                mount_timeout: "30s",
                ..Default::default()
            },
        );
        std::fs::write(node.dir.path().join("helper-sleep"), "4").unwrap();
        etcd.put(
            &format!("{P}/volumes/ds"),
            "mount: {at: startup, fstype: cifs, path: '//acct.file.core.windows.net/datasets', options: 'username=u,password=pw'}\n",
        )
        .await;
        let log = node.dir.path().join("helper.log");
        let helper_calls = || {
            std::fs::read_to_string(&log)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while helper_calls() == 0 {
            assert!(Instant::now() < deadline, "the helper never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Mid-mount: the daemon dies, the helper (its own process group) lives on.
        node.kill9();
        node.spawn();
        etcd.wait_state(&node.volume_status("ds"), "Mounted").await;
        let target = node.volumes().join("ds");
        let stacked = node
            .mounts()
            .iter()
            .filter(|m| m.mount_point == target)
            .count();
        assert_eq!(stacked, 1, "mounts stacked at {}", target.display());
        assert_eq!(helper_calls(), 1, "a second helper was started");
        // Issue 12 item 5: the killed run's temporary credentials file is
        // removed at start, not left in the run directory forever.
        let run = node.dir.path().join("state/run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("credentials-"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", run.display());
        // The adopted mount is vfolderd's: deleting the volume takes it away.
        etcd.delete(&format!("{P}/volumes/ds")).await;
        until("the adopted mount is unmounted", 30, || {
            !node.mounts().iter().any(|m| m.mount_point == target)
        })
        .await;
    })
    .await;
}

/// Issue "No single put..." item 6, for FUSE volumes (real rclone, Azurite): `kill -9` of vfolderd
/// while rclone is still starting (slowed by a wrapper) and a restart left
/// the first rclone running unknown to the new vfolderd, which started a
/// second: two servers with SASes, two stacked mounts. The first server's
/// pid is in the ownership record before it mounts; the restarted vfolderd
/// kills it and starts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_rclone_starts_leaves_one_server_and_one_mount() {
    require_private_mount_namespace();
    within(180, async {
        use std::os::unix::fs::PermissionsExt;
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let scripts = tempfile::tempdir().unwrap();
        let slow = scripts.path().join("slow-rclone");
        std::fs::write(&slow, "#!/bin/sh\nsleep 4\nexec rclone \"$@\"\n").unwrap();
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
        let extra: &'static str =
            Box::leak(format!("rclone: {}\n", slow.display()).into_boxed_str());
        let mut node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                mount_timeout: "30s",
                extra_config: extra,
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: startup, fstype: azureblob, path: {}, credentials: k}}\ncreate: true\n",
            azurite.container_url("slow")
        );
        etcd.put(&format!("{P}/volumes/slow"), &spec).await;
        let target = node.volumes().join("slow");
        until("the slow rclone starts", 30, || {
            !rclones_for(&target).is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        node.kill9();
        assert!(
            node.mount_at(&target).is_none(),
            "killed before the mount appeared"
        );
        node.spawn();

        etcd.wait_state(&node.volume_status("slow"), "Mounted")
            .await;
        // Past the first server's sleep: had it survived, it would mount now.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let servers = rclones_for(&target);
        assert_eq!(
            servers.len(),
            1,
            "one rclone serves the volume: {servers:?}"
        );
        assert_eq!(
            node.mounts()
                .iter()
                .filter(|m| m.mount_point == target)
                .count(),
            1,
            "one mount at the target, nothing stacked"
        );
        assert_eq!(
            etcd.get_json(&node.volume_status("slow")).await.unwrap()["state"],
            "Mounted"
        );
        assert!(std::fs::read_dir(&target).is_ok(), "the server answers");
    })
    .await;
}
