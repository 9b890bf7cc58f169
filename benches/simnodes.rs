//! Thousands of simulated agents against one 3-member etcd (issue 16 item
//! 3): what etcd pays per node and per kernel change, where it saturates,
//! and what its own `grpc-proxy` in front changes.
//!
//! A simulated agent makes the etcd calls a real agent makes, with the
//! daemon's own parts where they talk to etcd: it lists its ranges
//! (`Keys::watched_prefixes`: the volumes and its own kernels), reads the
//! vfolder records its kernels use with the follower's `fetch` (64 per
//! transaction, at the listing's revision), watches its ranges and each of
//! those records on one stream, keeps its liveness key under a lease
//! (`run_liveness`), and writes its kernels' statuses with the daemon's
//! `StatusWriter` (`run_status_writer`: batched transactions, only what
//! changed). What it leaves out is the node itself: no planner, no mounts
//! (every kernel it is given is reported `Ready` with its mounts), no sled.
//! Each node has its own etcd client (its own HTTP/2 connection), as nodes
//! do.
//!
//! Root (for the tmpfs under etcd's data and the open-file limit):
//! `sudo cargo bench --bench simnodes -- [--quick] [--proxy]`
//! Flags: `--nodes N` (1000), `--kernels K` per node (100), `--mounts M`
//! per kernel (2), `--vfolders V` (100000), `--rates R1,R2,..` kernel
//! changes per second (200,500,1000,2000,4000), `--phase-secs S` (10),
//! `--proxy` (the nodes talk to `etcd grpc-proxy`, not to the members),
//! `--no-record-watches` (the nodes do not watch each record: for sizes
//! whose 200 watches per node do not fit in this machine's memory),
//! `--nodes-per-connection C` (1: C nodes share one client and HTTP/2
//! connection, each with its own streams; the simulator's memory is mostly
//! its clients), `--settle S` (3: seconds between the last status written and the idle
//! measure),
//! `--quick` (200 nodes × 20 kernels, 10,000 records, rates 100,400).
//! JSON: `target/bench-simnodes[-proxy].json`.
#![allow(missing_docs)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd3::{cpu_secs, put_all, Etcd};
use common::{arg, free_port, pct, proc_rss_kib, Kill};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use serde_json::{json, Value};
use vfolderd::keys::Keys;
use vfolderd::state::status::{
    run_liveness, run_status_writer, LivenessLease, StatusBatch, StatusWriter,
};

const P: &str = "/vfolderd";

/// Whether nodes watch each record their kernels use (`--no-record-watches`
/// leaves them out, to measure the rest at sizes whose per-key watches do
/// not fit this machine's memory).
static WATCH_RECORDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// What all simulated nodes count together.
#[derive(Default)]
struct Counters {
    status_keys_written: AtomicU64,
    watch_events: AtomicU64,
    nodes_up: AtomicU64,
    failures: AtomicU64,
}

/// The vfolder ids a kernel value names (`mounts: [{vfolder: <id>}, ..]`).
fn vfolders_of(value: &[u8]) -> Vec<String> {
    let v: serde_yaml::Value = serde_yaml::from_slice(value).unwrap_or_default();
    v.get("mounts")
        .and_then(|m| m.as_sequence())
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m.get("vfolder").and_then(|x| x.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The status a node that mounted everything would write.
fn ready(revision: i64, vfolders: &[String]) -> Value {
    let mounts: Vec<Value> = vfolders
        .iter()
        .map(|id| {
            json!({"target": format!("/home/work/{}", &id[..8]), "source": format!("vfolder:{id}"),
                   "permission": "rw", "mounted": true})
        })
        .collect();
    json!({"state": "Ready", "revision": revision, "mounts": mounts})
}

/// One simulated agent: runs until the process ends.
async fn sim_node(
    name: String,
    endpoints: Vec<String>,
    connection: Arc<tokio::sync::OnceCell<Client>>,
    counters: Arc<Counters>,
    gate: Arc<tokio::sync::Semaphore>,
) {
    let permit = gate.acquire_owned().await.unwrap();
    let keys = Keys::new(P, &name);
    let mut client = connection
        .get_or_init(|| async {
            loop {
                match Client::connect(&endpoints, None).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
        .await
        .clone();
    // The listing, at one revision.
    let mut revision = 0;
    let mut kernels: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
    for prefix in keys.watched_prefixes() {
        let opts = GetOptions::new().with_prefix();
        let opts = if revision > 0 {
            opts.with_revision(revision)
        } else {
            opts
        };
        let resp = client.get(prefix.as_str(), Some(opts)).await.unwrap();
        if revision == 0 {
            revision = resp.header().unwrap().revision();
        }
        if prefix == keys.kernels_prefix() {
            for kv in resp.kvs() {
                let id = kv.key_str().unwrap()[prefix.len()..].to_string();
                kernels.insert(id, (kv.mod_revision(), vfolders_of(kv.value())));
            }
        }
    }
    // The records its kernels use, as the follower reads them.
    let records: std::collections::BTreeSet<String> = kernels
        .values()
        .flat_map(|(_, v)| v.iter().map(|id| format!("{P}/vfolders/{id}")))
        .collect();
    let records: Vec<String> = records.into_iter().collect();
    let mut kv = client.kv_client();
    vfolderd::state::follow::fetch(&mut kv, &records, Some(revision))
        .await
        .unwrap();
    // One watch stream: the ranges, then each record.
    let from = WatchOptions::new().with_start_revision(revision + 1);
    let prefixes = keys.watched_prefixes();
    let mut stream = client
        .watch(prefixes[0].as_str(), Some(from.clone().with_prefix()))
        .await
        .unwrap();
    for p in &prefixes[1..] {
        stream
            .watch(p.as_str(), Some(from.clone().with_prefix()))
            .await
            .unwrap();
    }
    if WATCH_RECORDS.load(Ordering::Relaxed) {
        for r in &records {
            stream.watch(r.as_str(), Some(from.clone())).await.unwrap();
        }
    }
    // Liveness under a lease, and the status writer.
    let health = Arc::new(vfolderd::metrics::Health::default());
    health.ready.store(true, Ordering::Relaxed);
    tokio::spawn(run_liveness(
        client.clone(),
        keys.clone(),
        LivenessLease::Own(15),
        || json!({"state": "Running", "ready": true, "roles": ["agent"]}),
        health,
    ));
    let (tx, rx) = tokio::sync::watch::channel(StatusBatch::default());
    let c = counters.clone();
    tokio::spawn(run_status_writer(
        StatusWriter::new(client.clone(), keys.clone()),
        rx,
        move |n, _| {
            c.status_keys_written.fetch_add(n as u64, Ordering::Relaxed);
        },
    ));
    let send = |kernels: &BTreeMap<String, (i64, Vec<String>)>| {
        let entries: BTreeMap<String, Arc<Value>> = kernels
            .iter()
            .map(|(k, (rev, vfs))| (keys.kernel_status(k), Arc::new(ready(*rev, vfs))))
            .collect();
        tx.send_replace(StatusBatch {
            entries: Arc::new(entries),
            ..Default::default()
        });
    };
    send(&kernels);
    counters.nodes_up.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let kprefix = keys.kernels_prefix();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            _ => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut changed = false;
        for e in resp.events() {
            counters.watch_events.fetch_add(1, Ordering::Relaxed);
            let Some(kv) = e.kv() else { continue };
            let Some(id) = kv.key_str().ok().and_then(|k| k.strip_prefix(&kprefix)) else {
                continue;
            };
            changed = true;
            match e.event_type() {
                EventType::Put => {
                    kernels.insert(id.to_string(), (kv.mod_revision(), vfolders_of(kv.value())));
                }
                EventType::Delete => {
                    kernels.remove(id);
                }
            }
        }
        if changed {
            send(&kernels);
        }
    }
}

/// `etcd grpc-proxy` in front of the members.
fn start_proxy(endpoints: &[String]) -> (String, Kill) {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new("etcd")
        .args(["grpc-proxy", "start", "--endpoints"])
        .arg(
            endpoints
                .iter()
                .map(|e| e.trim_start_matches("http://"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .args(["--listen-addr", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd grpc-proxy (Debian package etcd-server)");
    (format!("http://{listen}"), Kill(child))
}

/// Status keys under `P/status/nodes/` (liveness keys included).
async fn status_keys(c: &mut Client) -> i64 {
    c.get(
        format!("{P}/status/nodes/"),
        Some(GetOptions::new().with_prefix().with_count_only()),
    )
    .await
    .map(|r| r.count())
    .unwrap_or(0)
}

/// One churn phase's figures.
struct Phase {
    target: usize,
    achieved: f64,
    answered: usize,
    p50: Duration,
    p99: Duration,
    etcd_cores: f64,
    etcd_ms_per_change: f64,
    proxy_cores: f64,
    sim_cores: f64,
}

/// Puts kernel changes at `rate` per second for `secs` and times each put's
/// acknowledgement → its status naming the new revision.
async fn churn(
    endpoints: &[String],
    nodes: usize,
    kernels: usize,
    vfolder_of: &(dyn Fn(usize) -> String + Sync),
    rate: usize,
    secs: u64,
) -> (usize, Vec<Duration>, Duration) {
    let mut watcher = Client::connect(endpoints, None).await.unwrap();
    let sent: Arc<std::sync::Mutex<HashMap<i64, Instant>>> = Arc::default();
    let mut stream = watcher
        .watch(
            format!("{P}/status/nodes/"),
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    // When a status naming each revision was seen, read as they come.
    let total = rate * secs as usize;
    let reader = tokio::spawn(async move {
        let mut seen: HashMap<i64, Instant> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs + 30);
        while seen.len() < total {
            let msg = tokio::time::timeout_at(deadline, stream.message()).await;
            let Ok(Ok(Some(resp))) = msg else { break };
            let at = Instant::now();
            for e in resp.events() {
                let rev = e
                    .kv()
                    .and_then(|kv| serde_json::from_slice::<Value>(kv.value()).ok())
                    .and_then(|v| v.get("revision").and_then(Value::as_i64));
                if let Some(rev) = rev {
                    seen.entry(rev).or_insert(at);
                }
            }
        }
        seen
    });
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Client::connect(endpoints, None).await.unwrap());
    }
    let t0 = Instant::now();
    let tick = Duration::from_secs_f64(1.0 / rate as f64);
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = t0 + tick * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let n = (i * 7919) % nodes;
        let k = (i * 104_729 / nodes) % kernels;
        let key = format!("{P}/nodes/n{n}/kernels/k{k}");
        let value = format!("mounts: [{{vfolder: {}}}]", vfolder_of(i));
        let mut c = clients[i % clients.len()].clone();
        let sent = sent.clone();
        puts.spawn(async move {
            if let Ok(r) = c.put(key, value, None).await {
                let rev = r.header().unwrap().revision();
                sent.lock().unwrap().insert(rev, Instant::now());
            }
        });
        while puts.len() > 256 {
            puts.join_next().await;
        }
    }
    while puts.join_next().await.is_some() {}
    let put_time = t0.elapsed();
    let seen = reader.await.unwrap();
    let sent = sent.lock().unwrap();
    let lat = sent
        .iter()
        .filter_map(|(rev, t)| seen.get(rev).map(|s| s.saturating_duration_since(*t)))
        .collect();
    (total, lat, put_time)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let proxy = std::env::args().any(|a| a == "--proxy");
    let record_watches = !std::env::args().any(|a| a == "--no-record-watches");
    let per_connection = arg("--nodes-per-connection", 1).max(1);
    WATCH_RECORDS.store(record_watches, Ordering::Relaxed);
    let q = |full: usize, small: usize| if quick { small } else { full };
    let nodes = arg("--nodes", q(1000, 200));
    let kernels = arg("--kernels", q(100, 20));
    let mounts = arg("--mounts", 2);
    let vfolders = arg("--vfolders", q(100_000, 10_000));
    let phase_secs = arg("--phase-secs", 10) as u64;
    let rates: Vec<usize> = std::env::args()
        .skip_while(|a| a != "--rates")
        .nth(1)
        .unwrap_or_else(|| q_str(quick, "200,500,1000,2000,4000", "100,400"))
        .split(',')
        .filter_map(|r| r.parse().ok())
        .collect();
    if !nix::unistd::geteuid().is_root() {
        println!("simnodes bench skipped: run as root (sudo cargo bench --bench simnodes)");
        return;
    }
    // A connection per node, and etcd's own per client.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        1 << 20,
        1 << 20,
    );
    let dir = common::tmpfs_dir("12g");
    let d = dir.path().to_path_buf();
    let etcd = Etcd::start(&d, 3);
    let members = etcd.endpoints();
    let mut c = loop {
        if let Ok(mut c) = Client::connect(&members, None).await {
            if c.put("probe", "1", None).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (node_endpoints, proxy_child) = if proxy {
        let (url, child) = start_proxy(&members);
        (vec![url], Some(child))
    } else {
        (members.clone(), None)
    };
    let proxy_pids: Vec<u32> = proxy_child.iter().map(|k| k.0.id()).collect();
    let etcd_rss =
        |pids: &[u32]| pids.iter().map(|p| proc_rss_kib(*p)).sum::<u64>() as f64 / 1024.0;

    // The records and every node's kernels.
    let ids: Vec<String> = (0..vfolders)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let vfolder_of = |i: usize| ids[(i * 7919) % ids.len()].clone();
    let t_load = Instant::now();
    let mut kvs: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let v = format!("{{name: f{i}, owner: u{}, volume: shared}}", i % 1000);
            (format!("{P}/vfolders/{id}"), v)
        })
        .collect();
    let mut used = 0;
    for n in 0..nodes {
        for k in 0..kernels {
            let ms: Vec<String> = (0..mounts)
                .map(|_| {
                    used += 1;
                    format!("{{vfolder: {}}}", vfolder_of(used))
                })
                .collect();
            kvs.push((
                format!("{P}/nodes/n{n}/kernels/k{k}"),
                format!("mounts: [{}]", ms.join(", ")),
            ));
        }
    }
    let n_records = kvs.len();
    put_all(&mut c, kvs).await;
    let load_secs = t_load.elapsed().as_secs_f64();
    let etcd_rss_loaded = etcd_rss(&etcd.pids());

    // etcd's own idle cost (raft heartbeats), before any node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e0 = cpu_secs(&etcd.pids());
    tokio::time::sleep(Duration::from_secs(phase_secs)).await;
    let base_cores = (cpu_secs(&etcd.pids()) - e0) / phase_secs as f64;

    // The nodes: 64 starting at a time.
    let counters = Arc::new(Counters::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let t0 = Instant::now();
    let cpu0 = cpu_secs(&etcd.pids());
    let mut connection = Arc::default();
    for n in 0..nodes {
        if n % per_connection == 0 {
            connection = Arc::default();
        }
        tokio::spawn(sim_node(
            format!("n{n}"),
            node_endpoints.clone(),
            Arc::clone(&connection),
            counters.clone(),
            gate.clone(),
        ));
    }
    let want = (nodes * kernels + nodes) as i64;
    loop {
        let have = status_keys(&mut c).await;
        if have >= want {
            break;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            println!("not all statuses after 30 min: {have}/{want}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let up_secs = t0.elapsed().as_secs_f64();
    let up_etcd_cpu = cpu_secs(&etcd.pids()) - cpu0;

    // Idle: leases kept alive, nothing changing (after `--settle` seconds).
    tokio::time::sleep(Duration::from_secs(arg("--settle", 3) as u64)).await;
    let idle = Duration::from_secs(phase_secs);
    let (e0, p0, s0) = (
        cpu_secs(&etcd.pids()),
        cpu_secs(&proxy_pids),
        cpu_secs(&[std::process::id()]),
    );
    tokio::time::sleep(idle).await;
    let idle_cores = (cpu_secs(&etcd.pids()) - e0) / idle.as_secs_f64();
    let idle_proxy = (cpu_secs(&proxy_pids) - p0) / idle.as_secs_f64();
    let idle_sim = (cpu_secs(&[std::process::id()]) - s0) / idle.as_secs_f64();
    let etcd_rss_nodes = etcd_rss(&etcd.pids());
    let proxy_rss = etcd_rss(&proxy_pids);
    let sim_rss = proc_rss_kib(std::process::id()) as f64 / 1024.0;

    // Churn: kernel changes at each rate.
    let mut phases = Vec::new();
    for &rate in &rates {
        let (e0, p0, s0) = (
            cpu_secs(&etcd.pids()),
            cpu_secs(&proxy_pids),
            cpu_secs(&[std::process::id()]),
        );
        let t = Instant::now();
        let (total, mut lat, put_time) =
            churn(&members, nodes, kernels, &vfolder_of, rate, phase_secs).await;
        let wall = t.elapsed().as_secs_f64();
        let etcd_cpu = cpu_secs(&etcd.pids()) - e0;
        let phase = Phase {
            target: rate,
            achieved: total as f64 / put_time.as_secs_f64(),
            answered: lat.len(),
            p50: pct(&mut lat, 0.5),
            p99: pct(&mut lat, 0.99),
            etcd_cores: etcd_cpu / wall,
            etcd_ms_per_change: (etcd_cpu - idle_cores * wall) * 1000.0 / total as f64,
            proxy_cores: (cpu_secs(&proxy_pids) - p0) / wall,
            sim_cores: (cpu_secs(&[std::process::id()]) - s0) / wall,
        };
        println!(
            "rate {rate}/s: achieved {:.0}/s, answered {}/{total}, p50 {:.1} ms, p99 {:.1} ms, etcd {:.2} cores",
            phase.achieved,
            phase.answered,
            ms(phase.p50),
            ms(phase.p99),
            phase.etcd_cores
        );
        phases.push(phase);
    }
    let db = etcd.db_size().await as f64 / (1 << 20) as f64;

    println!();
    println!(
        "{} simulated agents × {kernels} kernels × {mounts} vfolders, {vfolders} records, {}{}:",
        nodes,
        if record_watches {
            String::new()
        } else {
            "no per-record watches, ".to_string()
        } + &if per_connection > 1 {
            format!("{per_connection} nodes per connection, ")
        } else {
            String::new()
        },
        if proxy {
            "through one etcd grpc-proxy"
        } else {
            "straight to the 3 members"
        }
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| records loaded ({n_records}: vfolders and kernels, txns of 128) | {load_secs:.1} s |"
    );
    println!(
        "| every node up and every kernel status written ({want} keys) | {up_secs:.1} s (etcd CPU {up_etcd_cpu:.1} s) |"
    );
    println!(
        "| idle, leases kept alive: etcd CPU | {:.3} cores; {base_cores:.3} with no node; {:.1} µs/s per node |",
        idle_cores,
        (idle_cores - base_cores).max(0.0) * 1e6 / nodes as f64
    );
    if proxy {
        println!("| idle: grpc-proxy CPU, RSS | {idle_proxy:.3} cores, {proxy_rss:.0} MiB |");
    }
    println!("| idle: the simulating process | {idle_sim:.3} cores, RSS {sim_rss:.0} MiB |");
    println!(
        "| etcd RSS (3 members): loaded → nodes watching | {etcd_rss_loaded:.0} → {etcd_rss_nodes:.0} MiB ({:.1} KiB per node) |",
        (etcd_rss_nodes - etcd_rss_loaded) * 1024.0 / nodes as f64
    );
    for p in &phases {
        println!(
            "| {} kernel changes/s (achieved {:.0}/s): put → status p50 / p99 | {:.1} / {:.1} ms ({} of {} answered); etcd {:.2} cores, {:.2} ms CPU per change{}; simulator {:.2} cores |",
            p.target,
            p.achieved,
            ms(p.p50),
            ms(p.p99),
            p.answered,
            (p.target as u64 * phase_secs),
            p.etcd_cores,
            p.etcd_ms_per_change,
            if proxy { format!("; proxy {:.2} cores", p.proxy_cores) } else { String::new() },
            p.sim_cores
        );
    }
    println!("| etcd DB size | {db:.1} MiB |");
    println!(
        "| status keys written (all nodes) / watch events heard / stream failures | {} / {} / {} |",
        counters.status_keys_written.load(Ordering::Relaxed),
        counters.watch_events.load(Ordering::Relaxed),
        counters.failures.load(Ordering::Relaxed)
    );

    let out = json!({
        "nodes": nodes, "kernels": kernels, "mounts": mounts, "vfolders": vfolders, "proxy": proxy, "record_watches": record_watches, "nodes_per_connection": per_connection,
        "load_secs": load_secs, "up_secs": up_secs, "up_etcd_cpu": up_etcd_cpu,
        "idle_etcd_cores": idle_cores, "base_etcd_cores": base_cores, "idle_proxy_cores": idle_proxy, "idle_sim_cores": idle_sim,
        "etcd_rss_loaded_mib": etcd_rss_loaded, "etcd_rss_nodes_mib": etcd_rss_nodes,
        "sim_rss_mib": sim_rss, "proxy_rss_mib": proxy_rss, "db_mib": db,
        "phases": phases.iter().map(|p| json!({
            "rate": p.target, "achieved": p.achieved, "answered": p.answered,
            "p50_ms": ms(p.p50), "p99_ms": ms(p.p99), "etcd_cores": p.etcd_cores,
            "etcd_ms_per_change": p.etcd_ms_per_change, "proxy_cores": p.proxy_cores,
            "sim_cores": p.sim_cores,
        })).collect::<Vec<_>>(),
    });
    let path = format!(
        "{}/target/bench-simnodes{}.json",
        env!("CARGO_MANIFEST_DIR"),
        if proxy { "-proxy" } else { "" }
    );
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nJSON: {path}");
    drop(proxy_child);
    let _ = nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH);
}

fn q_str(quick: bool, full: &str, small: &str) -> String {
    if quick { small } else { full }.to_string()
}
