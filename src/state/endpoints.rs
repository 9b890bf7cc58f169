//! Keeps dead etcd members out of the client. The client balances requests
//! over every configured member (tower's power-of-two-choices over tonic's
//! reconnecting channels) and keeps choosing a member that is down: after
//! the leader of a 3-member etcd was killed, a node's status writes and
//! reads failed with "tcp connect error" for 16 s (`benches/cluster.rs`; a
//! known limit of the crate, etcdv3/etcd-client#39). So when any part of
//! vfolderd sees etcd fail, each member is asked once (`Status`, 2 s) and
//! those that do not answer are taken out of the client; members taken out
//! are asked again every [`REPROBE`] and put back once they answer. Nothing
//! is asked while every member answers: a node costs etcd nothing here in
//! the steady state.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::Notify;

/// How often members taken out are asked again.
pub const REPROBE: Duration = Duration::from_secs(5);
/// How long a member has to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Woken by any part that saw etcd unreachable.
static SUSPECT: Notify = Notify::const_new();

/// Says etcd looked unreachable: the guard asks every member once.
pub fn suspect() {
    SUSPECT.notify_one();
}

/// The key the client's balancer knows `endpoint` by: the crate prefixes a
/// scheme-less endpoint with `http://`, or `https://` under TLS
/// (`Client::build_endpoint`), and removes by the URI given.
pub fn balancer_key(endpoint: &str, tls: bool) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// Whether `endpoint` answers at all within [`PROBE_TIMEOUT`]. `options`
/// carry TLS but no user (no Authenticate per probe, which would need a
/// leader) and no require-leader (a member mid-election is alive). Any
/// answer counts, an error included (`Status` may be refused to a user
/// without the root role); only a connection that fails or hangs does not.
async fn answers(endpoint: &str, options: &ConnectOptions) -> bool {
    let probe = async {
        let mut c = Client::connect([endpoint], Some(options.clone())).await?;
        c.status().await.map(drop)
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 2, probe).await {
        Err(_) => false,
        Ok(Ok(())) => true,
        Ok(Err(etcd_client::Error::GRpcStatus(s))) => s.code() != tonic::Code::Unavailable,
        Ok(Err(_)) => false,
    }
}

/// Runs forever (for a client over two or more members); `out` reports how
/// many members are taken out, for the metrics. `probe` is the connection
/// setting for the probes (see [`answers`]).
pub async fn run_endpoint_guard(
    client: Client,
    endpoints: Vec<String>,
    probe: ConnectOptions,
    tls: bool,
    out: impl Fn(usize) + Send,
) {
    // A guard restarted after a panic does not know what it took out:
    // every member goes back in, and the next round judges them again (not
    // at the first start: a member put in again gets a new connection, which
    // would break the streams just opened on the old one).
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        for ep in &endpoints {
            if let Err(e) = client.add_endpoint(ep).await {
                tracing::warn!(endpoint = %ep, error = %e, "cannot put an etcd member into the client");
            }
        }
    }
    let mut taken_out: BTreeSet<String> = BTreeSet::new();
    out(0);
    loop {
        if taken_out.is_empty() {
            SUSPECT.notified().await;
        } else {
            tokio::select! {
                () = SUSPECT.notified() => {}
                () = tokio::time::sleep(REPROBE) => {}
            }
        }
        let answered =
            futures::future::join_all(endpoints.iter().map(|ep| answers(ep, &probe))).await;
        // With no member answering, nothing is judged: the client keeps
        // trying them all.
        if !answered.iter().any(|a| *a) {
            continue;
        }
        for (ep, alive) in endpoints.iter().zip(answered) {
            let is_out = taken_out.contains(ep);
            if alive && is_out {
                match client.add_endpoint(ep).await {
                    Ok(()) => {
                        tracing::info!(endpoint = %ep, "etcd member answers again; back in the client");
                        taken_out.remove(ep);
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %ep, error = %e, "cannot put an etcd member back")
                    }
                }
            } else if !alive && !is_out {
                match client.remove_endpoint(balancer_key(ep, tls)).await {
                    Ok(()) => {
                        tracing::warn!(endpoint = %ep, "etcd member does not answer; taken out of the client until it does");
                        taken_out.insert(ep.clone());
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %ep, error = %e, "cannot take an etcd member out")
                    }
                }
            }
        }
        out(taken_out.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate keys its balancer by the URI it built: a scheme-less
    /// endpoint removed as written would stay in.
    #[test]
    fn a_member_is_removed_by_the_key_the_client_added_it_under() {
        assert_eq!(balancer_key("etcd1:2379", false), "http://etcd1:2379");
        assert_eq!(balancer_key("etcd1:2379", true), "https://etcd1:2379");
        assert_eq!(
            balancer_key("http://10.0.0.1:2379", true),
            "http://10.0.0.1:2379"
        );
    }
}
