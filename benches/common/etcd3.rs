//! A 3-member etcd on loopback and the client calls the multi-node benches
//! share.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};

use super::{free_port, proc_cpu_ticks, Kill};

/// A 3-member etcd on loopback.
pub struct Etcd {
    members: Vec<(String, Option<Kill>)>,
}

impl Etcd {
    pub fn start(dir: &Path, n: usize) -> Self {
        let clients: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let peers: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = (0..n).map(|i| format!("m{i}={}", peers[i])).collect();
        let members = (0..n)
            .map(|i| {
                let child = Command::new("etcd")
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.join(format!("m{i}")))
                    .args(["--listen-client-urls", &clients[i]])
                    .args(["--advertise-client-urls", &clients[i]])
                    .args(["--listen-peer-urls", &peers[i]])
                    .args(["--initial-advertise-peer-urls", &peers[i]])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--quota-backend-bytes", "8589934592"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("etcd (Debian package etcd-server)");
                (clients[i].clone(), Some(Kill(child)))
            })
            .collect();
        Self { members }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|(u, _)| u.clone()).collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|(_, k)| k.as_ref().map(|k| k.0.id()))
            .collect()
    }

    /// Kills the leader; returns its URL.
    pub async fn kill_leader(&mut self) -> Option<String> {
        for (url, member) in &mut self.members {
            if member.is_none() {
                continue;
            }
            let Ok(mut c) = Client::connect([url.as_str()], None).await else {
                continue;
            };
            let Ok(st) = c.status().await else { continue };
            if st.header().map(|h| h.member_id()) == Some(st.leader()) {
                member.take();
                return Some(url.clone());
            }
        }
        None
    }

    /// The largest backend size any live member reports.
    pub async fn db_size(&self) -> i64 {
        let mut size = 0;
        for (url, member) in &self.members {
            if member.is_none() {
                continue;
            }
            if let Ok(mut c) = Client::connect([url.as_str()], None).await {
                if let Ok(st) = c.status().await {
                    size = size.max(st.db_size());
                }
            }
        }
        size
    }
}

/// Puts `kvs` in transactions of 128 (etcd's default `--max-txn-ops`).
pub async fn put_all(c: &mut Client, kvs: Vec<(String, String)>) {
    for chunk in kvs.chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        loop {
            match c.txn(Txn::new().and_then(ops.clone())).await {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// How many keys under `prefix` have a value containing `needle` (one
/// answer of up to 100,000 statuses: far past gRPC's 4 MiB default).
pub async fn count_with(c: &mut Client, prefix: &str, needle: &str) -> usize {
    let mut kv = c.kv_client().max_decoding_message_size(i32::MAX as usize);
    let Ok(resp) = kv
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
    else {
        return 0;
    };
    resp.kvs()
        .iter()
        .filter(|kv| kv.value_str().is_ok_and(|v| v.contains(needle)))
        .count()
}

pub fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// CPU seconds each of `pids` used so far.
pub fn cpu_by_pid(pids: &[u32]) -> std::collections::BTreeMap<u32, f64> {
    pids.iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .map(|p| (*p, proc_cpu_ticks(*p) as f64 / ticks_per_sec()))
        .collect()
}

pub fn cpu_secs(pids: &[u32]) -> f64 {
    let t: u64 = pids
        .iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .map(|p| proc_cpu_ticks(*p))
        .sum();
    t as f64 / ticks_per_sec()
}
