//! Several real vfolderd nodes against a 3-member etcd on loopback: one
//! storage node and N agents, each a `vfolderd run` in a mount namespace of
//! its own, sharing one bind volume (a directory standing in for a network
//! share). It loads V vfolder records and K kernels per agent through etcd
//! transactions and reports what issue "Scale" asks: time to all-Ready,
//! put→Ready under load, per-node RSS and CPU, etcd CPU and DB size, watch
//! events and bytes per node, status writes per kernel change, and the
//! same latency after the etcd leader is killed.
//!
//! Root in a private mount namespace:
//! `sudo unshare --mount --propagation private cargo bench --bench cluster -- [--quick]`
//! Flags: `--vfolders V` (100000), `--agents N` (4), `--kernels K` per agent
//! (50), `--mounts M` per kernel (2), `--samples S` (100), `--quick` (10000
//! records, 2 agents, 20 kernels: well under two minutes). JSON goes to
//! `target/bench-cluster.json`.
#![allow(missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd3::{count_with, cpu_by_pid, cpu_secs, put_all, Etcd};
use common::{arg, free_port, http_get, pct, proc_rss_kib, Kill};
use etcd_client::Client;

const P: &str = "/vfolderd";

/// One vfolderd in a mount namespace of its own.
struct Node {
    name: String,
    listen: String,
    child: Kill,
}

impl Node {
    fn start(dir: &Path, name: &str, roles: &str, endpoints: &[String]) -> Self {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let cfg = format!(
            "node: {name}\nroles: {roles}\netcd: {{endpoints: [\"{eps}\"], prefix: {P}}}\n\
             roots: {{volumes: {d}/volumes, kernels: {d}/kernels}}\nstate: {d}/state\n\
             policies: {d}/policies\nlisten: {listen}\nresync: 1h\n",
            eps = endpoints.join("\", \""),
            d = d.display()
        );
        std::fs::write(d.join("node.yaml"), cfg).unwrap();
        let log = std::fs::File::create(d.join("vfolderd.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(env!("CARGO_BIN_EXE_vfolderd"))
            .args(["run", "--config"])
            .arg(d.join("node.yaml"))
            .env(
                "RUST_LOG",
                std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(log)
            .spawn()
            .expect("unshare (util-linux) and vfolderd");
        Self {
            name: name.into(),
            listen,
            child: Kill(child),
        }
    }

    /// vfolderd's own pid (unshare execs it, so it is the child's).
    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn metric(&self, series: &str) -> f64 {
        http_get(&self.listen, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    fn ready(&self) -> bool {
        http_get(&self.listen, "/readyz").0 == 200
    }
}

/// Puts one kernel and waits until its status is Ready: the time from the
/// put's acknowledgement (a put retried while etcd elects a leader counts
/// from the attempt that was committed).
async fn put_to_ready(c: &mut Client, node: &str, kernel: &str, vfolder: &str) -> Duration {
    let key = format!("{P}/nodes/{node}/kernels/{kernel}");
    let status = format!("{P}/status/nodes/{node}/kernels/{kernel}");
    let value = format!("mounts: [{{vfolder: {vfolder}}}]");
    let t = loop {
        let t = Instant::now();
        if c.put(key.as_str(), value.as_str(), None).await.is_ok() {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    loop {
        if let Ok(r) = c.get(status.as_str(), None).await {
            if r.kvs()
                .first()
                .is_some_and(|kv| kv.value_str().is_ok_and(|v| v.contains("\"Ready\"")))
            {
                return t.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let q = |full: usize, small: usize| if quick { small } else { full };
    let vfolders = arg("--vfolders", q(100_000, 10_000));
    let agents = arg("--agents", q(4, 2));
    let kernels = arg("--kernels", q(50, 20));
    let mounts = arg("--mounts", 2);
    let samples = arg("--samples", q(100, 40));
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    if !nix::unistd::geteuid().is_root() || ours == std::fs::read_link("/proc/1/ns/mnt").ok() {
        println!("cluster bench skipped: run as root in a private mount namespace:");
        println!(
            "  sudo unshare --mount --propagation private cargo bench --bench cluster -- --quick"
        );
        return;
    }
    let dir = common::tmpfs_dir("8g");
    let d = dir.path().to_path_buf();
    let mut etcd = Etcd::start(&d, 3);
    let endpoints = etcd.endpoints();
    let mut c = loop {
        if let Ok(mut c) = Client::connect(&endpoints, None).await {
            if c.put("probe", "1", None).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The records: V vfolders on one shared bind volume.
    let share = d.join("share");
    std::fs::create_dir_all(&share).unwrap();
    c.put(
        format!("{P}/volumes/shared"),
        format!(
            "mount: {{at: requested, fstype: bind, path: {}}}",
            share.display()
        ),
        None,
    )
    .await
    .unwrap();
    let ids: Vec<String> = (0..vfolders)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let t_load = Instant::now();
    put_all(
        &mut c,
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let v = format!("{{name: f{i}, owner: u{}, volume: shared}}", i % 1000);
                (format!("{P}/vfolders/{id}"), v)
            })
            .collect(),
    )
    .await;
    let load_secs = t_load.elapsed().as_secs_f64();

    // The nodes, then every kernel at once.
    let t0 = Instant::now();
    let storage = Node::start(&d, "s1", "[storage]", &endpoints);
    let agent_nodes: Vec<Node> = (0..agents)
        .map(|i| Node::start(&d, &format!("a{i}"), "[agent]", &endpoints))
        .collect();
    let mut used = 0;
    let mut kvs = Vec::new();
    for a in &agent_nodes {
        for k in 0..kernels {
            let ms: Vec<String> = (0..mounts)
                .map(|_| {
                    used += 1;
                    format!("{{vfolder: {}}}", ids[(used * 7919) % ids.len()])
                })
                .collect();
            kvs.push((
                format!("{P}/nodes/{}/kernels/k{k}", a.name),
                format!("mounts: [{}]", ms.join(", ")),
            ));
        }
    }
    put_all(&mut c, kvs).await;
    let want_ready = agents * kernels;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let nodes_ready = storage.ready() && agent_nodes.iter().all(Node::ready);
        let kernels_ready = count_with(&mut c, &format!("{P}/status/nodes/"), "\"Ready\"").await;
        let dirs_ready = count_with(&mut c, &format!("{P}/status/vfolders/"), "\"Ready\"").await;
        if nodes_ready && kernels_ready >= want_ready && dirs_ready >= vfolders {
            break;
        }
        if Instant::now() > deadline {
            println!("not all ready after 600 s: kernels {kernels_ready}/{want_ready}, vfolders {dirs_ready}/{vfolders}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = t0.elapsed();

    // Steady state: what each node holds, costs and heard.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = |n: &Node| n.metric("vfolderd_etcd_watch_events_total");
    let bytes = |n: &Node| n.metric("vfolderd_etcd_watch_bytes_total");
    let others_before: Vec<(f64, f64)> = agent_nodes[1..]
        .iter()
        .map(|n| (events(n), bytes(n)))
        .collect();
    let a0 = &agent_nodes[0];
    let writes_before = a0.metric("vfolderd_status_writes_total");
    let etcd_cpu0 = cpu_by_pid(&etcd.pids());

    // put→Ready on agent a0 under the load of the others, then with the
    // etcd leader killed halfway.
    let mut before_kill = Vec::new();
    let mut after_kill = Vec::new();
    let mut killed = None;
    for s in 0..samples {
        if s == samples / 2 {
            killed = etcd.kill_leader().await;
        }
        let took = put_to_ready(&mut c, &a0.name, &format!("s{s}"), &ids[s % ids.len()]).await;
        if killed.is_some() {
            after_kill.push(took);
        } else {
            before_kill.push(took);
        }
    }
    let writes_per_change =
        (a0.metric("vfolderd_status_writes_total") - writes_before) / samples as f64;
    // A volume every agent watches, as a fence: what an agent heard between
    // is what a0's kernels cost it.
    put_all(
        &mut c,
        vec![(
            format!("{P}/volumes/fence"),
            "mount: {at: requested, fstype: tmpfs, path: f}".into(),
        )],
    )
    .await;
    let fence_bytes = (format!("{P}/volumes/fence").len()
        + "mount: {at: requested, fstype: tmpfs, path: f}".len()) as f64;
    let fenced = |n: &Node| n.metric("vfolderd_desired_objects{kind=\"volume\"}") >= 2.0;
    while !agent_nodes[1..].iter().all(fenced) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let heard: Vec<(f64, f64)> = agent_nodes[1..]
        .iter()
        .zip(&others_before)
        .map(|(n, (e, b))| (events(n) - e - 1.0, bytes(n) - b - fence_bytes))
        .collect();
    // Over the members alive at the end (the killed leader's share is lost).
    let etcd_cpu: f64 = cpu_by_pid(&etcd.pids())
        .iter()
        .map(|(pid, s)| s - etcd_cpu0.get(pid).copied().unwrap_or(0.0))
        .sum();
    let db = etcd.db_size().await;

    // Report.
    let mut all: Vec<&Node> = vec![&storage];
    all.extend(agent_nodes.iter());
    println!("| node | RSS MiB | CPU s | vfolder records held | watch events | watch MiB |");
    println!("|---|---|---|---|---|---|");
    let mut nodes_json = Vec::new();
    for n in &all {
        let rss = proc_rss_kib(n.pid()) as f64 / 1024.0;
        let cpu = cpu_secs(&[n.pid()]);
        let held = n.metric("vfolderd_desired_objects{kind=\"vfolder\"}");
        println!(
            "| {} | {rss:.1} | {cpu:.2} | {held} | {} | {:.2} |",
            n.name,
            events(n),
            bytes(n) / 1048576.0
        );
        nodes_json.push(serde_json::json!({
            "node": n.name, "rss_mib": rss, "cpu_s": cpu, "vfolders_held": held,
            "watch_events": events(n), "watch_bytes": bytes(n),
        }));
    }
    let p = |v: &mut Vec<Duration>, q| common_ms(pct(v, q));
    let (b50, b99) = (p(&mut before_kill, 0.5), p(&mut before_kill, 0.99));
    let (k50, k99) = if after_kill.is_empty() {
        (0.0, 0.0)
    } else {
        (p(&mut after_kill, 0.5), p(&mut after_kill, 0.99))
    };
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| records loaded ({vfolders} vfolders, txns of 128) | {load_secs:.1} s |");
    println!(
        "| 1 storage + {agents} agents × {kernels} kernels × {mounts} vfolders: all nodes ready, every kernel Ready, every directory made | {:.1} s |",
        all_ready.as_secs_f64()
    );
    println!(
        "| put→Ready on a0 ({} samples) | p50 {b50:.1} ms, p99 {b99:.1} ms |",
        before_kill.len()
    );
    println!(
        "| put→Ready after the etcd leader ({}) was killed ({} samples) | p50 {k50:.1} ms, p99 {k99:.1} ms |",
        killed.as_deref().unwrap_or("none"),
        after_kill.len()
    );
    println!("| status writes per kernel change on a0 | {writes_per_change:.2} |");
    for (n, (e, b)) in agent_nodes[1..].iter().zip(&heard) {
        println!(
            "| watch events (bytes) {} heard while a0's kernels changed | {e} ({b}) |",
            n.name
        );
    }
    println!("| etcd CPU during the samples (the members alive at the end) | {etcd_cpu:.2} s |");
    println!("| etcd DB size | {:.1} MiB |", db as f64 / 1048576.0);
    let json = serde_json::json!({
        "vfolders": vfolders, "agents": agents, "kernels": kernels, "mounts": mounts,
        "load_s": load_secs, "all_ready_s": all_ready.as_secs_f64(),
        "put_ready_ms": {"p50": b50, "p99": b99},
        "put_ready_after_leader_kill_ms": {"p50": k50, "p99": k99},
        "status_writes_per_change": writes_per_change,
        "heard_by_other_agents": heard, "etcd_cpu_s": etcd_cpu, "etcd_db_bytes": db,
        "nodes": nodes_json,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-cluster.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nJSON: {}", out.display());
    // The sampled agent's log, for what happened around the leader kill.
    let log = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-cluster-a0.log");
    let _ = std::fs::copy(d.join("a0/vfolderd.log"), &log);
    println!("a0's log: {}", log.display());
    drop(all);
    drop(agent_nodes);
    drop(storage);
    let _ = nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH);
}

fn common_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
