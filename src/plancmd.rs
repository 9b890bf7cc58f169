//! `vfolderd plan`: asks the running daemon over its listen address
//! (`GET /plan`); with the daemon stopped, plans here from etcd's desired
//! state (or the stored one when etcd is unreachable), the store and the
//! mount table — the same planner either way, acting on nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{NodeConfig, Role};
use crate::keys::Keys;
use crate::policy::Policy;
use crate::reconcile::explain::{self, PlanSource, PlanView};
use crate::state::desired::{Desired, DesiredParser};
use crate::state::ledger::Ledger;

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The daemon answered with an error.
    #[error("the daemon at {addr} could not plan: {message}")]
    Daemon {
        /// Its address.
        addr: SocketAddr,
        /// Its answer.
        message: String,
    },
    /// The daemon's answer was not a plan.
    #[error("the daemon at {addr} answered something that is not a plan")]
    Answer {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// Nothing answers, and the store is held by another process.
    #[error("the daemon does not answer at {addr}, and the node's store cannot be opened (a daemon still holds it?)")]
    Store {
        /// The listen address tried.
        addr: SocketAddr,
        /// Why the store did not open.
        #[source]
        source: crate::state::ledger::LedgerError,
    },
    /// This node never ran vfolderd: there is no store to plan against.
    #[error("no state directory at {0}: vfolderd never ran on this node")]
    NoState(String),
    /// Neither etcd nor the store has a desired state.
    #[error("etcd is unreachable and the store holds no desired state")]
    NoDesired,
    /// The policy directory is invalid.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// Planning failed (the mount table or the store could not be read).
    #[error(transparent)]
    Pass(#[from] crate::reconcile::pass::PassError),
    /// The output could not be made.
    #[error("{0}")]
    Output(String),
}

/// How long the daemon may take to answer (it answers between passes).
const ASK_TIMEOUT: Duration = Duration::from_secs(40);
/// How long etcd may take to list, with the daemon stopped.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The plan for this node, narrowed to `object` (`kernel/<id>`,
/// `volume/<name>`) if given.
pub async fn plan(cfg: &NodeConfig, object: Option<&str>) -> Result<PlanView, PlanError> {
    let addr = local_addr(cfg.listen);
    let view = match ask_daemon(addr).await? {
        Some(v) => v,
        None => plan_here(cfg, addr).await?,
    };
    Ok(match object {
        Some(o) => view.only(o),
        None => view,
    })
}

/// Where to reach a daemon listening on `listen` from this machine.
fn local_addr(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// The daemon's plan; `None` when nothing listens there (it is stopped).
async fn ask_daemon(addr: SocketAddr) -> Result<Option<PlanView>, PlanError> {
    let client = reqwest::Client::builder()
        .timeout(ASK_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|source| PlanError::Answer { addr, source })?;
    let resp = match client.get(format!("http://{addr}/plan")).send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Ok(None),
        Err(source) => return Err(PlanError::Answer { addr, source }),
    };
    if !resp.status().is_success() {
        let message = resp.text().await.unwrap_or_default().trim().to_string();
        return Err(PlanError::Daemon { addr, message });
    }
    let view = resp
        .json::<PlanView>()
        .await
        .map_err(|source| PlanError::Answer { addr, source })?;
    Ok(Some(view))
}

/// Plans in this process: the daemon is stopped.
async fn plan_here(cfg: &NodeConfig, addr: SocketAddr) -> Result<PlanView, PlanError> {
    // The daemon's store (`<state>/db`): never made here.
    let db = cfg.state.join("db");
    if !db.is_dir() {
        return Err(PlanError::NoState(db.display().to_string()));
    }
    let policy = Arc::new(Policy::load_dir(&cfg.policies)?.unwrap_or_default());
    let keys =
        Keys::new(&cfg.etcd.prefix, &cfg.node).watching_all_kernels(cfg.has_role(Role::Storage));
    let parser = DesiredParser::with_policy(keys, (*policy).clone(), cfg.roots.kernels.clone());
    // etcd first: the store is held only for the plan itself (a daemon
    // starting meanwhile would find it locked).
    let listed = tokio::time::timeout(LIST_TIMEOUT, listed(cfg, &parser)).await;
    let ledger = Ledger::open_guarded(&db).map_err(|source| PlanError::Store { addr, source })?;
    let (mut desired, source) = match listed {
        Ok(Ok(d)) => (d, PlanSource::Etcd),
        _ => (stored(&ledger, &parser)?, PlanSource::Stored),
    };
    desired.enforce_limits(&policy);
    let node = crate::daemon::node_view(cfg, policy);
    let observer = crate::reconcile::observe::Observer::new(observer_config(cfg));
    let live = source == PlanSource::Etcd;
    let name = cfg.node.clone();
    tokio::task::spawn_blocking(move || {
        // A stopped daemon's linger starts again when it starts: every
        // unused volume would be kept that long.
        let (want, actual, actions) = crate::reconcile::pass::plan_once(
            &node,
            &observer,
            &ledger,
            &desired,
            live,
            |owned, wanted| owned.into_iter().filter(|v| !wanted(v)).cloned().collect(),
        )?;
        Ok(PlanView {
            node: name,
            source,
            revision: desired.revision,
            live,
            steps: explain::steps(&actions, &want, &actual, |_| None),
            backoffs: Vec::new(),
        })
    })
    .await
    .map_err(|e| PlanError::Output(e.to_string()))?
}

/// etcd's desired state for this node, with its kernels' vfolder records.
async fn listed(cfg: &NodeConfig, parser: &DesiredParser) -> Result<Desired, PlanError> {
    use crate::state::watch::EtcdSource;
    let client = crate::cli::connect(cfg)
        .await
        .map_err(|_| PlanError::NoDesired)?;
    let mut etcd = crate::state::watch::EtcdClient::new(&client);
    let mut l = etcd
        .list(&parser.keys.desired_prefixes())
        .await
        .map_err(|_| PlanError::NoDesired)?;
    if parser.keys.follows_vfolders() {
        let mut kv = client.kv_client();
        crate::state::follow::add_followed(&mut kv, parser, &mut l)
            .await
            .map_err(|_| PlanError::NoDesired)?;
    }
    Ok(crate::state::watch::parse_listing(
        parser, &l.kvs, l.revision,
    ))
}

/// The last good desired state the daemon stored.
fn stored(ledger: &Ledger, parser: &DesiredParser) -> Result<Desired, PlanError> {
    match ledger.load_desired() {
        Ok(Some((kvs, rev))) => Ok(crate::state::watch::parse_listing(parser, &kvs, rev)),
        _ => Err(PlanError::NoDesired),
    }
}

fn observer_config(cfg: &NodeConfig) -> crate::reconcile::observe::ObserverConfig {
    let deps = crate::daemon::Deps::linux(&cfg.mount_helper, cfg.mount_table);
    crate::reconcile::observe::ObserverConfig {
        mountinfo: deps.mountinfo,
        mountinfo_path: deps.mountinfo_path,
        stale: Default::default(),
        capacity: Default::default(),
        credentials_dir: cfg.credentials.clone(),
        sas_lifetime: cfg.sas_lifetime,
        token_lifetime: cfg.token_lifetime,
        stat_timeout: cfg.probe_timeout,
    }
}

/// The plan as `out` says.
pub fn render(view: &PlanView, out: crate::inspect::Output) -> Result<String, PlanError> {
    use crate::inspect::Output;
    match out {
        Output::Json => serde_json::to_string_pretty(view)
            .map(|s| s + "\n")
            .map_err(|e| PlanError::Output(e.to_string())),
        Output::Yaml => serde_yaml::to_string(view).map_err(|e| PlanError::Output(e.to_string())),
        Output::Table | Output::Wide => Ok(explain::table(view)),
    }
}
