//! The daemon: connects to etcd, starts the background tasks (watcher,
//! mount-table events, prober, liveness, status writer, policy and
//! credentials watchers, the HTTP endpoint), holds every pass until the
//! first complete list (the readiness gate), then runs one pass at a time on
//! every change, resync and deadline until shutdown. Errors become status,
//! never an exit; shutdown leaves every mount in place.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::config::{NodeConfig, Role};
use crate::keys::Keys;
use crate::lifecycle::{run_lifecycle, LifecycleBoard};
use crate::metrics::{Health, Metrics};
use crate::policy::Policy;
use crate::reconcile::actual::{MountInfoSource, ProcMountInfo};
use crate::reconcile::bookkeeping::{next_wake, pass_backoff, Linger, PASS_BACKOFF_MIN};
use crate::reconcile::execute::{ExecConfig, Executor};
use crate::reconcile::observe::{Observer, ObserverConfig};
use crate::reconcile::pass::{PassInput, PassOutcome, Reconciler, ReconcilerParts};
use crate::reconcile::plan::NodeView;
use crate::reconcile::probe::{run_prober, CapacityMap, StaleMap, VolumeTargets};
use crate::reconcile::sys::{LinuxMounter, Mounter};
use crate::reconcile::usagescan::{run_usage_scanner, UsageBoard};
use crate::state::brake::ClusterFile;
use crate::state::desired::{Desired, DesiredParser, PolicyHandle};
use crate::state::election::{run_elections, Elections};
use crate::state::ledger::{Ledger, LedgerError};
use crate::state::policywatch::{run_dir_watcher, run_policy_watcher};
use crate::state::status::{
    chrono_now, run_liveness, run_status_writer, LivenessLease, StatusBatch, StatusWriter,
};
use crate::state::watch::{
    parse_listing, run_watcher, BrakeConfig, BrakeState, Changes, DesiredCache,
};

/// Errors that stop vfolderd from starting. Once running, nothing stops it but shutdown.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// etcd TLS or auth material is missing or too open.
    #[error(transparent)]
    EtcdSetup(#[from] crate::etcd::EtcdSetupError),
    /// A policy file is invalid at start.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The sled store could not be opened.
    #[error("cannot open the state store")]
    Ledger(#[from] LedgerError),
    /// The state directory or a root could not be made root-only.
    #[error(transparent)]
    NodeFiles(#[from] crate::state::nodefiles::NodeFilesError),
    /// An etcd endpoint is not a URL.
    #[error("etcd endpoint {0:?} is not a URL (http://host:port or https://host:port)")]
    BadEndpoint(String),
    /// A pass task panicked (a bug).
    #[error("reconcile pass panicked: {0}")]
    PassPanicked(String),
}

/// What the daemon talks to; tests pass doubles.
#[derive(Clone)]
pub struct Deps {
    /// Mount syscalls.
    pub mounter: Arc<dyn Mounter>,
    /// The mount table.
    pub mountinfo: Arc<dyn MountInfoSource>,
    /// The file polled for mount-table change events.
    pub mountinfo_path: PathBuf,
    /// Which source `mountinfo` is (reported as a kernel feature).
    pub mount_table: crate::features::MountTableSource,
}

impl Deps {
    /// The real kernel, with `helper` as the mount(8) program for cifs, nfs
    /// and FUSE, and the mount table read as `mode` says.
    pub fn linux(helper: &std::path::Path, mode: crate::config::MountTableMode) -> Self {
        let (mountinfo, kind) = mount_table_source(mode);
        Self {
            mounter: Arc::new(LinuxMounter::new(helper)),
            mountinfo,
            mountinfo_path: ProcMountInfo::default().path,
            mount_table: kind,
        }
    }
}

/// The mount table's source: `statmount` where the kernel has it, unless
/// the config forces mountinfo. Logged: the two differ in cost, and in
/// whether mount ids are ever reused.
pub fn mount_table_source(
    mode: crate::config::MountTableMode,
) -> (Arc<dyn MountInfoSource>, crate::features::MountTableSource) {
    let (source, why) = pick_mount_table(mode, true);
    tracing::info!("mount table: {why}");
    use crate::features::MountTableSource as M;
    let kind = if why.contains("fanotify mount events,") || why.ends_with("fanotify mount events") {
        M::StatmountEvents
    } else if why.starts_with("listmount") {
        M::Statmount
    } else {
        M::Mountinfo
    };
    (source, kind)
}

/// [`mount_table_source`] without the log line, and why; `events: false`
/// for one read (the CLI), which keeps no event queue.
pub fn pick_mount_table(
    mode: crate::config::MountTableMode,
    events: bool,
) -> (Arc<dyn MountInfoSource>, &'static str) {
    use crate::config::MountTableMode;
    use crate::reconcile::mountapi::{self, StatmountTable};
    match mode {
        MountTableMode::Auto if mountapi::available() => match events {
            false => (
                Arc::new(StatmountTable::default()),
                "listmount/statmount (unique mount ids)",
            ),
            true => match StatmountTable::with_events() {
                (t, true) => (
                    Arc::new(t),
                    "listmount/statmount (unique mount ids), kept by fanotify mount events",
                ),
                (t, false) => (
                    Arc::new(t),
                    "listmount/statmount (unique mount ids), kept by listing ids (no fanotify mount events before Linux 6.15)",
                ),
            },
        },
        MountTableMode::Auto => (
            Arc::new(ProcMountInfo::default()),
            "/proc/self/mountinfo (this kernel has no statmount)",
        ),
        MountTableMode::Mountinfo => (
            Arc::new(ProcMountInfo::default()),
            "/proc/self/mountinfo (mount_table: mountinfo)",
        ),
    }
}

/// How long a mount-table wake waits for the rest of its burst.
const MOUNT_WAKE_COALESCE: Duration = Duration::from_millis(1);

/// How many passes may follow each other at once while actions keep making progress.
const MAX_CHAINED_PASSES: usize = 4;
/// How long after a kernel went (or changed) the whole pass that decides
/// whether its volumes are unused runs. Kernel passes tear the kernel down
/// at once; a burst of removals shares one whole pass.
const VOLUME_PASS_DELAY: Duration = Duration::from_millis(500);
/// A pass with this many actions is a burst worth trimming the heap after.
const TRIM_AFTER_ACTIONS: usize = 1000;
/// How long one vfolder's usage scan may take before it is given up (a
/// million files take seconds; a scan still running after this is stuck in
/// a hung volume).
const USAGE_SCAN_TIMEOUT: Duration = Duration::from_secs(600);
/// TTL of the node liveness lease.
const NODE_LEASE_TTL: i64 = 15;

type Shutdown<'a> = Pin<&'a mut dyn Future<Output = ()>>;

/// Runs the daemon until `shutdown` resolves. Mounts are left in place on shutdown.
pub async fn run(
    cfg: NodeConfig,
    deps: Deps,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    crate::keys::set_log_prefix(&cfg.etcd.prefix);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut shutdown: Shutdown<'_> = shutdown.as_mut();
    let keys =
        Keys::new(&cfg.etcd.prefix, &cfg.node).watching_all_kernels(cfg.has_role(Role::Storage));
    let node_dirs = [&cfg.state, &cfg.roots.volumes, &cfg.roots.kernels];
    crate::state::nodefiles::secure_node(node_dirs[0], node_dirs[1], node_dirs[2])?;
    let (ledger, rebuilt) = open_ledger(&cfg).await?;
    // sled made its files with the umask: close them too.
    crate::state::nodefiles::secure_state(&cfg.state)?;
    private_kernels_root(&deps, &cfg.roots.kernels);
    let connect_options = connect_options(&cfg)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (status_tx, status_rx) = tokio::sync::watch::channel(StatusBatch::default());
    let (plans_tx, plans) = tokio::sync::mpsc::channel(8);
    let (events, events_rx) = crate::state::events::EventLog::new();
    let server = HttpServer::start(
        listener,
        crate::http::Served {
            metrics: metrics.clone(),
            health: health.clone(),
            plans: plans_tx,
            events: events.clone(),
            keys: keys.clone(),
            statuses: status_rx.clone(),
        },
    );

    let cache = Arc::new(DesiredCache::default());
    let _ = cache.counters.set(crate::state::watch::WatchCounters {
        events: metrics.watch_events.clone(),
        bytes: metrics.watch_bytes.clone(),
        restarts: metrics.ops.watch_restarts.clone(),
    });
    // An invalid policy at start is fatal: never run with an open policy by accident.
    let policy = Policy::load_dir(&cfg.policies)?.unwrap_or_default();
    tracing::info!(origin = %policy.origin, "policy in force");
    let policy: PolicyHandle = Arc::new(std::sync::RwLock::new(Arc::new(policy)));
    let parser = DesiredParser {
        keys: keys.clone(),
        policy: policy.clone(),
        kernels_root: cfg.roots.kernels.clone(),
    };
    // Fail static, whatever the auth mode: the stored desired state is
    // served before etcd is even connected (with a user, connecting means
    // authenticating, which waits for etcd).
    load_stored_desired(&ledger, &parser, &cache);
    // Writes the store does not flush at once are flushed 500 ms later.
    let _flusher = AbortOnDrop(tokio::spawn({
        let ledger = ledger.clone();
        async move { ledger.flush_behind().await }
    }));
    let shared = Shared {
        cfg: &cfg,
        keys: &keys,
        cache: &cache,
        policy: &policy,
        parser: &parser,
        metrics: &metrics,
        health: &health,
    };
    let tasks = Background::start(&shared, &deps);
    let etcd_side = EtcdSide::start(
        &shared,
        connect_options,
        &ledger,
        status_rx,
        tasks.elections.clone(),
        events_rx,
    );
    let mut rec = reconciler(&shared, &deps, ledger, status_tx, &tasks, events);
    if rebuilt {
        rec.adopt_after_rebuild();
    }

    // A pass may wait for two helpers (mount, then a retry) and a little
    // more; one running longer is stuck, most likely in a hung volume.
    *health.pass_limit.lock().unwrap_or_else(|p| p.into_inner()) =
        cfg.mount_timeout * 2 + Duration::from_secs(30);
    health.alive.store(true, Ordering::Relaxed);
    tracing::info!(node = %cfg.node, roles = ?cfg.roles, "waiting for the first complete list of etcd");
    if wait_for_first_list(&cache, &metrics, &mut shutdown).await {
        let mut passes = PassLoop::new(&shared, tasks.mounts_changed.clone(), plans);
        let rec = passes.run(rec, &mut shutdown).await?;
        drop(tasks);
        // The next process on this node must not resume a lease this one
        // still keeps alive while it finishes (it waits the lease out).
        let _ = std::fs::remove_file(cfg.state.join("election-lease"));
        // Let the last report reach etcd (briefly: etcd may be gone).
        drop(rec);
        etcd_side.finish(Duration::from_secs(2)).await;
    }
    server.stop(&health).await;
    Ok(())
}

/// Makes the kernels root a private mount of its own (a bind of itself
/// unless it is a mount point already), as kubelet does with its root dir:
/// each home below it is then shared in a peer group of its own, and no
/// mount made there propagates to the host's other namespaces. Without it
/// homes still work; a failure is logged.
fn private_kernels_root(deps: &Deps, root: &std::path::Path) {
    use nix::mount::MsFlags;
    let Ok(table) = deps.mountinfo.read() else {
        tracing::error!(root = %root.display(), "cannot read the mount table; the kernels root is left as it is");
        return;
    };
    let is_mount_point = table.top(root).is_some();
    // Binds made before this vfolderd (an upgrade with kernels running)
    // would be covered by a new bind of the root: leave it until they go.
    if !is_mount_point && table.iter().any(|m| m.mount_point.starts_with(root)) {
        tracing::warn!(root = %root.display(), "mounts exist below the kernels root: it becomes a private mount of its own once they are gone (restart vfolderd then)");
        return;
    }
    let bound = if is_mount_point {
        Ok(())
    } else {
        let remount =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        deps.mounter
            .mount(Some(root), root, None, MsFlags::MS_BIND, None)
            .and_then(|()| {
                deps.mounter
                    .mount(None::<&std::path::Path>, root, None, remount, None)
            })
    };
    let private = bound.and_then(|()| {
        deps.mounter.mount(
            None::<&std::path::Path>,
            root,
            None,
            MsFlags::MS_PRIVATE,
            None,
        )
    });
    if let Err(errno) = private {
        tracing::error!(root = %root.display(), %errno, "cannot make the kernels root a private mount; mounts in homes may propagate to other namespaces");
    }
}

/// Opens the sled store (off the runtime: it reads the whole log); a
/// damaged one is moved aside and rebuilt (the `bool` says so), a locked one
/// is an error.
async fn open_ledger(cfg: &NodeConfig) -> Result<(Ledger, bool), DaemonError> {
    let dir = cfg.state.join("db");
    let (ledger, aside) = tokio::task::spawn_blocking(move || Ledger::open_or_rebuild(&dir))
        .await
        .map_err(|e| DaemonError::PassPanicked(e.to_string()))??;
    Ok((ledger, aside.is_some()))
}

/// The etcd connection settings; a bad endpoint or unusable TLS or auth
/// material is fatal at start (a typo must not look like an outage).
fn connect_options(cfg: &NodeConfig) -> Result<ConnectOptions, DaemonError> {
    for e in &cfg.etcd.endpoints {
        url::Url::parse(e).map_err(|_| DaemonError::BadEndpoint(e.clone()))?;
    }
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // Without HTTP/2 keep-alive a watch hangs forever on a frozen etcd;
        // below 5 s the server answers "too_many_pings" (DESIGN.md).
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum must not feed a stale watch silently.
        .with_require_leader(true);
    Ok(crate::etcd::connect_options(&cfg.etcd, options)?)
}

/// The settings the endpoint guard probes members with: TLS, no user (no
/// Authenticate per probe), no require-leader (a member mid-election is
/// alive). `None` if they cannot be built (then there is no guard).
fn probe_options(cfg: &NodeConfig) -> Option<ConnectOptions> {
    let anonymous = crate::config::EtcdConfig {
        user: None,
        password_file: None,
        ..cfg.etcd.clone()
    };
    let base = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    crate::etcd::connect_options(&anonymous, base).ok()
}

/// The etcd client, once etcd answers. Without auth the client connects
/// lazily; with a user it authenticates at once, which fails while etcd is
/// down: retried, while the loop serves the stored desired state.
async fn connect(endpoints: &[String], options: ConnectOptions) -> Client {
    let mut delay = Duration::from_millis(500);
    loop {
        match Client::connect(endpoints, Some(options.clone())).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to etcd yet; serving the stored desired state");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// What needs etcd: the watcher, the node's liveness key and the status
/// writer, started once a client connects (in the background, so a node
/// restarted during an outage repairs from its stored state meanwhile).
struct EtcdSide {
    task: AbortOnDrop<()>,
}

impl EtcdSide {
    fn start(
        s: &Shared<'_>,
        options: ConnectOptions,
        ledger: &Ledger,
        status_rx: tokio::sync::watch::Receiver<StatusBatch>,
        elections: Option<Arc<Elections>>,
        events: tokio::sync::mpsc::Receiver<crate::state::events::Order>,
    ) -> Self {
        let endpoints = s.cfg.etcd.endpoints.clone();
        let (probe, tls) = (probe_options(s.cfg), s.cfg.etcd.tls.is_some());
        let (parser, cache, ledger) = (s.parser.clone(), s.cache.clone(), ledger.clone());
        let (health, metrics, keys) = (s.health.clone(), s.metrics.clone(), s.keys.clone());
        let liveness_value = liveness_value(s);
        let brake = BrakeConfig {
            file: ClusterFile::path(&s.cfg.state),
            storage: s.cfg.has_role(Role::Storage),
        };
        let task = tokio::spawn(async move {
            let client = connect(&endpoints, options.clone()).await;
            let _watcher = {
                let (client, parser, cache, ledger) = (
                    client.clone(),
                    parser.clone(),
                    cache.clone(),
                    ledger.clone(),
                );
                supervised("watcher", health.clone(), metrics.clone(), move || {
                    run_watcher(
                        client.clone(),
                        parser.clone(),
                        cache.clone(),
                        ledger.clone(),
                        brake.clone(),
                    )
                })
            };
            // Dead members out of the client's balancer (it keeps picking them).
            let _endpoint_guard = probe.filter(|_| endpoints.len() > 1).map(|probe| {
                let (client, endpoints) = (client.clone(), endpoints.clone());
                let gauge = metrics.etcd_endpoints_out.clone();
                supervised(
                    "etcd endpoint guard",
                    health.clone(),
                    metrics.clone(),
                    move || {
                        let gauge = gauge.clone();
                        crate::state::endpoints::run_endpoint_guard(
                            client.clone(),
                            endpoints.clone(),
                            probe.clone(),
                            tls,
                            move |n| gauge.set(n as i64),
                        )
                    },
                )
            });
            // An agent follows only the vfolder records its kernels use.
            let _follower = parser.keys.follows_vfolders().then(|| {
                let (client, parser, cache, ledger) = (
                    client.clone(),
                    parser.clone(),
                    cache.clone(),
                    ledger.clone(),
                );
                supervised(
                    "vfolder follower",
                    health.clone(),
                    metrics.clone(),
                    move || {
                        crate::state::follow::run_follower(
                            client.clone(),
                            parser.clone(),
                            cache.clone(),
                            ledger.clone(),
                        )
                    },
                )
            });
            let _liveness = {
                let (client, keys, h) = (client.clone(), keys.clone(), health.clone());
                let shared = elections.as_ref().map(|el| el.lease());
                supervised("liveness", health.clone(), metrics.clone(), move || {
                    let value = liveness_value.clone();
                    let health = h.clone();
                    let lease = match &shared {
                        Some(rx) => LivenessLease::Shared(rx.clone()),
                        None => LivenessLease::Own(NODE_LEASE_TTL),
                    };
                    run_liveness(client.clone(), keys.clone(), lease, move || value(), health)
                })
            };
            let _elector = elections.map(|el| {
                let (client, keys, cache) = (client.clone(), keys.clone(), cache.clone());
                supervised("elector", health.clone(), metrics.clone(), move || {
                    let cache = cache.clone();
                    run_elections(client.clone(), keys.clone(), el.clone(), move || {
                        cache.touch();
                        cache.lifecycle.notify_one();
                    })
                })
            });
            let _events = AbortOnDrop(tokio::spawn(crate::state::events::run_event_writer(
                client.clone(),
                keys.clone(),
                events,
                health.clone(),
            )));
            let writer = StatusWriter::new(client, keys);
            run_status_writer(writer, status_rx, move |n, took| {
                metrics.status_writes.inc_by(n as u64);
                if n > 0 {
                    metrics
                        .ops
                        .status_write_duration
                        .observe(took.as_secs_f64());
                }
            })
            .await;
        });
        Self {
            task: AbortOnDrop(task),
        }
    }

    /// Waits up to `limit` for the last statuses to be written (the status
    /// channel is closed), then stops everything.
    async fn finish(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, &mut self.task.0).await;
    }
}

/// The node liveness value (`P/status/nodes/<node>`), read at each renewal.
fn liveness_value(s: &Shared<'_>) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
    let (cache, health) = (s.cache.clone(), s.health.clone());
    let roles = s.cfg.roles.clone();
    let started = chrono_now();
    Arc::new(move || {
        let held = cache.brake().held;
        json!({
            "state": if held.is_some() { "Held" } else { "Running" },
            "reason": held,
            "version": env!("CARGO_PKG_VERSION"),
            "ready": health.ready.load(Ordering::Relaxed),
            "roles": roles,
            "started_at": started,
        })
    })
}

/// Fail static across restarts: until etcd answers, serve the last good
/// desired state from the store, and never unmount on its behalf.
fn load_stored_desired(ledger: &Ledger, parser: &DesiredParser, cache: &DesiredCache) {
    match ledger.load_desired() {
        Ok(Some((kvs, rev))) => {
            tracing::info!(
                revision = rev,
                keys = kvs.len(),
                "loaded the last good desired state from the store"
            );
            cache.seed_from_store(parse_listing(parser, &kvs, rev));
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot load the stored desired state")
        }
    }
}

/// Readiness gate (invariant 2): nothing is planned before the first list
/// (or, after a restart, before the stored last good state is loaded; then
/// nothing is unmounted until a live list arrives). False on shutdown.
async fn wait_for_first_list(
    cache: &DesiredCache,
    metrics: &Metrics,
    shutdown: &mut Shutdown<'_>,
) -> bool {
    while !cache.synced.load(Ordering::Acquire) {
        metrics
            .etcd_connected
            .set(i64::from(cache.connected.load(Ordering::Relaxed)));
        tokio::select! {
            _ = cache.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.as_mut() => return false,
        }
    }
    true
}

/// What the daemon's parts share while it runs.
struct Shared<'a> {
    cfg: &'a NodeConfig,
    keys: &'a Keys,
    cache: &'a Arc<DesiredCache>,
    policy: &'a PolicyHandle,
    parser: &'a DesiredParser,
    metrics: &'a Arc<Metrics>,
    health: &'a Arc<Health>,
}

/// The HTTP server ([`crate::http`]) and its stop signal.
struct HttpServer {
    stop_tx: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    fn start(listener: tokio::net::TcpListener, served: crate::http::Served) -> Self {
        let (stop_tx, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::http::serve(listener, served, stop).await {
                tracing::error!(error = %e, "http server failed");
            }
        });
        Self { stop_tx, task }
    }

    async fn stop(self, health: &Health) {
        health.alive.store(false, Ordering::Relaxed);
        tracing::info!("shutting down; every mount is left in place for running kernels");
        let _ = self.stop_tx.send(true);
        let _ = self.task.await;
    }
}

/// The background tasks; dropping this stops them (mini-redis `DbDropGuard`).
struct Background {
    /// Woken by mount-table events (their own channel: one that only reports
    /// vfolderd's own mounts, already read, runs no pass).
    mounts_changed: Arc<Notify>,
    /// Closes the mount-table watch while a pass mounts.
    mount_gate: crate::reconcile::mountwatch::WatchGate,
    stale: StaleMap,
    capacity: CapacityMap,
    volume_targets: VolumeTargets,
    usage: Arc<UsageBoard>,
    lifecycle: Arc<LifecycleBoard>,
    /// Per-volume leadership (storage role; the elector runs on the etcd side).
    elections: Option<Arc<Elections>>,
    _tasks: Vec<AbortOnDrop<()>>,
}

impl Background {
    fn start(s: &Shared<'_>, deps: &Deps) -> Self {
        let mounts_changed = Arc::new(Notify::new());
        let (mount_gate, gate_rx) =
            crate::reconcile::mountwatch::WatchGate::new(&deps.mountinfo_path);
        let stale: StaleMap = Arc::default();
        let capacity: CapacityMap = Arc::default();
        let volume_targets: VolumeTargets = Arc::default();
        let usage = Arc::new(UsageBoard::with_histogram(s.metrics.scan_duration.clone()));
        let lifecycle: Arc<LifecycleBoard> = Arc::default();
        // The lease id is kept beside the store: sled admits one process
        // per state directory, so no two daemons ever resume the same lease.
        let elections = s.cfg.has_role(Role::Storage).then(|| {
            let ttl = Duration::from_secs(crate::state::election::LEASE_TTL as u64);
            let file = s.cfg.state.join("election-lease");
            Arc::new(Elections::new(ttl).with_lease_file(file))
        });
        if let Some(e) = &elections {
            lifecycle.led_by(e.clone());
        }
        let mut tasks = vec![
            Self::usage_scanner(s, &usage),
            Self::credentials_watch(s),
            Self::policy_watch(s),
            Self::mount_watch(deps, mounts_changed.clone(), gate_rx),
            Self::prober(s, &volume_targets, (&stale, &capacity)),
            Self::feature_probe(s, deps, &volume_targets, &stale),
        ];
        if s.cfg.has_role(Role::Storage) {
            tasks.push(Self::lifecycle(s, &lifecycle));
        }
        Self {
            mounts_changed,
            mount_gate,
            stale,
            capacity,
            volume_targets,
            usage,
            lifecycle,
            elections,
            _tasks: tasks,
        }
    }

    /// Tries idmapped mounts on each filesystem type volumes are mounted
    /// with ([`crate::features`]).
    fn feature_probe(
        s: &Shared<'_>,
        deps: &Deps,
        targets: &VolumeTargets,
        stale: &StaleMap,
    ) -> AbortOnDrop<()> {
        let features = Arc::new(crate::features::Features::probe(deps.mount_table));
        s.metrics.set_features(&features);
        let _ = s.health.features.set(features.clone());
        let (targets, mountinfo, metrics) =
            (targets.clone(), deps.mountinfo.clone(), s.metrics.clone());
        let every = s.cfg.probe_interval.max(Duration::from_secs(1));
        AbortOnDrop(tokio::spawn(crate::features::run_feature_probe(
            features,
            targets,
            stale.clone(),
            mountinfo,
            metrics,
            every,
        )))
    }

    fn usage_scanner(s: &Shared<'_>, board: &Arc<UsageBoard>) -> AbortOnDrop<()> {
        let (board, cache, period) = (board.clone(), s.cache.clone(), s.cfg.resync);
        AbortOnDrop(tokio::spawn(async move {
            run_usage_scanner(board, period, USAGE_SCAN_TIMEOUT, || cache.touch()).await
        }))
    }

    fn lifecycle(s: &Shared<'_>, board: &Arc<LifecycleBoard>) -> AbortOnDrop<()> {
        let (board, cache, retention) = (board.clone(), s.cache.clone(), s.cfg.trash_retention);
        supervised(
            "lifecycle",
            s.health.clone(),
            s.metrics.clone(),
            move || {
                let (board, cache) = (board.clone(), cache.clone());
                async move {
                    let c = cache.clone();
                    run_lifecycle(board, cache, retention, move || c.touch()).await
                }
            },
        )
    }

    fn credentials_watch(s: &Shared<'_>) -> AbortOnDrop<()> {
        let (dir, cache) = (s.cfg.credentials.clone(), s.cache.clone());
        AbortOnDrop(tokio::spawn(async move {
            run_dir_watcher(dir, move || cache.touch()).await
        }))
    }

    fn policy_watch(s: &Shared<'_>) -> AbortOnDrop<()> {
        let (dir, handle, parser) = (s.cfg.policies.clone(), s.policy.clone(), s.parser.clone());
        let (cache, m) = (s.cache.clone(), s.metrics.clone());
        AbortOnDrop(tokio::spawn(async move {
            run_policy_watcher(dir, handle, parser, cache, move |ok| {
                m.policy_reloads
                    .with_label_values(&[if ok { "ok" } else { "refused" }])
                    .inc();
            })
            .await;
        }))
    }

    fn mount_watch(
        deps: &Deps,
        changed: Arc<Notify>,
        gate: crate::reconcile::mountwatch::GateReceiver,
    ) -> AbortOnDrop<()> {
        let path = deps.mountinfo_path.clone();
        AbortOnDrop(tokio::spawn(async move {
            let wake = || changed.notify_one();
            let watch = crate::reconcile::mountwatch::watch_mountinfo(&path, Some(gate), wake);
            if let Err(e) = watch.await {
                tracing::warn!(error = %e, "mount table events unavailable; relying on resync");
            }
        }))
    }

    fn prober(
        s: &Shared<'_>,
        targets: &VolumeTargets,
        found: (&StaleMap, &CapacityMap),
    ) -> AbortOnDrop<()> {
        let (cache, targets) = (s.cache.clone(), targets.clone());
        let (stale, capacity) = (found.0.clone(), found.1.clone());
        let (interval, timeout) = (s.cfg.probe_interval, s.cfg.probe_timeout);
        supervised("prober", s.health.clone(), s.metrics.clone(), move || {
            let (cache, targets) = (cache.clone(), targets.clone());
            let found = (stale.clone(), capacity.clone());
            async move { run_prober(targets, interval, timeout, found, || cache.touch()).await }
        })
    }
}

/// The reconciler (the roots exist: made at start).
fn reconciler(
    s: &Shared<'_>,
    deps: &Deps,
    ledger: Ledger,
    status_tx: tokio::sync::watch::Sender<StatusBatch>,
    tasks: &Background,
    events: Arc<crate::state::events::EventLog>,
) -> Reconciler {
    let cfg = s.cfg;
    let exec = Executor::new(
        deps.mounter.clone(),
        ledger.clone(),
        ExecConfig::from_node(cfg),
    )
    .with_mount_wait(deps.mountinfo.clone());
    let exec = match tasks.elections.clone() {
        Some(el) => exec.with_dir_gate(Arc::new(move |root: &std::path::Path| {
            let volume = root.file_name().and_then(|n| n.to_str());
            volume.is_some_and(|v| el.may_act(v))
        })),
        None => exec,
    };
    let observer = Observer::new(ObserverConfig {
        mountinfo: deps.mountinfo.clone(),
        mountinfo_path: deps.mountinfo_path.clone(),
        stale: tasks.stale.clone(),
        capacity: tasks.capacity.clone(),
        credentials_dir: cfg.credentials.clone(),
        sas_lifetime: cfg.sas_lifetime,
        token_lifetime: cfg.token_lifetime,
        stat_timeout: cfg.probe_timeout,
    })
    .with_watch_gate(tasks.mount_gate.clone());
    Reconciler::new(ReconcilerParts {
        node: node_view(cfg, s.policy.read().expect("policy lock").clone()),
        keys: s.keys.clone(),
        exec,
        ledger,
        observer,
        linger: Linger::new(cfg.linger),
        status_tx,
        volume_targets: tasks.volume_targets.clone(),
        usage: tasks.usage.clone(),
        lifecycle: tasks.lifecycle.clone(),
        elections: tasks.elections.clone(),
        events,
    })
}

/// The node facts the planner needs, from its config (no election yet).
pub fn node_view(cfg: &NodeConfig, policy: Arc<Policy>) -> NodeView {
    NodeView {
        agent: cfg.has_role(Role::Agent),
        storage: cfg.has_role(Role::Storage),
        volumes_root: cfg.roots.volumes.clone(),
        kernels_root: cfg.roots.kernels.clone(),
        policy,
        identity: crate::reconcile::plan::Identity {
            uid: cfg.kernel_uid,
            gid: cfg.kernel_gid,
        },
        led: None,
        fenced: false,
    }
}

/// One round of work taken from the desired-state cache.
struct Work {
    desired: Arc<Desired>,
    generation: u64,
    scope: Option<std::collections::BTreeSet<String>>,
    live: bool,
    policy: Arc<Policy>,
    /// The periodic resync: also look for remounts nothing announced.
    resync: bool,
}

/// The reconcile loop's own state between passes.
struct PassLoop<'a> {
    s: &'a Shared<'a>,
    mounts_changed: Arc<Notify>,
    next_resync: Instant,
    /// Delay after a whole pass failed.
    backoff: Duration,
    converged_once: bool,
    /// What changed and is not yet handled; the first pass looks at everything.
    pending: Changes,
    /// When the whole pass that kernel removals call for is due.
    volume_pass_at: Option<Instant>,
    /// The safety brake's memory ([`ClusterFile`]).
    cluster_file: std::path::PathBuf,
    /// When the applied revision was last remembered there.
    remembered_at: Option<Instant>,
    /// What the policy's limits refused in the last state taken.
    limits: crate::state::desired::LimitVerdicts,
    /// When the mount table is to be looked at again though nothing signals.
    reread_at: Option<Instant>,
    /// Plans asked over HTTP, answered between passes.
    plans: tokio::sync::mpsc::Receiver<crate::http::PlanRequest>,
}

/// Why the loop woke.
enum Wake {
    /// Run a pass.
    Pass,
    /// Answer a plan.
    Plan(crate::http::PlanRequest),
    /// Shut down.
    Stop,
}

impl<'a> PassLoop<'a> {
    fn new(
        s: &'a Shared<'a>,
        mounts_changed: Arc<Notify>,
        plans: tokio::sync::mpsc::Receiver<crate::http::PlanRequest>,
    ) -> Self {
        Self {
            s,
            mounts_changed,
            next_resync: Instant::now() + s.cfg.resync,
            backoff: PASS_BACKOFF_MIN,
            converged_once: false,
            pending: Changes::all(),
            volume_pass_at: None,
            cluster_file: ClusterFile::path(&s.cfg.state),
            remembered_at: None,
            limits: Default::default(),
            reread_at: None,
            plans,
        }
    }

    /// Whether the safety brake holds the node. While it does, the verdict is
    /// judged again against the cluster file, which `vfolderd accept-reset`
    /// rewrites; while it does not, the applied revision is remembered (at
    /// most once a second).
    fn held(&mut self, live: bool) -> Option<String> {
        let cache = self.s.cache;
        let b = cache.brake();
        if b.held.is_some() {
            // Only a new acceptance releases: not a revision update, not a
            // file that cannot be read.
            let released = crate::state::brake::accepted(&self.cluster_file)
                .is_some_and(|now| now.is_some() && now != b.accepted_at_hold);
            if !released {
                return b.held;
            }
            tracing::warn!(
                "safety brake released (accept-reset): the desired state is authoritative again"
            );
            cache.set_brake(BrakeState { held: None, ..b });
        }
        let due = self
            .remembered_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if live && due {
            let revision = cache.revision.load(Ordering::Relaxed);
            if let Err(e) = crate::state::brake::remember(&self.cluster_file, None, revision) {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot remember the applied revision");
            }
            self.remembered_at = Some(Instant::now());
        }
        None
    }

    /// Runs passes until shutdown; returns the reconciler (its drop ends the
    /// status channel, so the writer flushes the last report).
    async fn run(
        &mut self,
        rec: Reconciler,
        shutdown: &mut Shutdown<'_>,
    ) -> Result<Reconciler, DaemonError> {
        let mut rec = rec;
        loop {
            let work = self.take_work();
            let (r, last) = self.run_passes(rec, &work).await?;
            rec = r;
            let wake = self.after_passes(&work, last.as_ref());
            loop {
                match self.wait(wake, &rec, shutdown).await {
                    Wake::Pass => break,
                    Wake::Stop => return Ok(rec),
                    Wake::Plan(ask) => rec = self.answer_plan(rec, ask).await?,
                }
            }
        }
    }

    /// Plans over the desired state as it is now (limits as last applied),
    /// on a blocking thread, acting on nothing.
    /// Every plan asked meanwhile gets the same answer; one nobody waits
    /// for any more (its client gave up) is not made.
    async fn answer_plan(
        &mut self,
        mut rec: Reconciler,
        ask: crate::http::PlanRequest,
    ) -> Result<Reconciler, DaemonError> {
        let mut asks = vec![ask];
        while let Ok(more) = self.plans.try_recv() {
            asks.push(more);
        }
        asks.retain(|a| !a.reply.is_closed());
        if asks.is_empty() {
            return Ok(rec);
        }
        let mut desired = self.s.cache.peek();
        if !self.limits.kernels.is_empty() || !self.limits.vfolders.is_empty() {
            Arc::make_mut(&mut desired).apply_limits(&self.limits);
        }
        let live = self.s.cache.live.load(Ordering::Acquire) && self.s.cache.brake().held.is_none();
        rec.node.policy = self.s.policy.read().expect("policy lock").clone();
        let (rec, result) = tokio::task::spawn_blocking(move || {
            let r = crate::error::guarded("a plan", || rec.plan_now(&desired, live));
            (rec, r)
        })
        .await
        .map_err(|e| DaemonError::PassPanicked(e.to_string()))?;
        let answer = match result {
            Ok(Ok(view)) => Ok(view),
            Ok(Err(e)) => Err(crate::error::error_chain(&e)),
            Err(panic) => Err(panic),
        };
        for a in asks {
            let _ = a.reply.send(answer.clone());
        }
        Ok(rec)
    }

    /// Takes what changed: watch events that name only kernels make a pass
    /// over those kernels (plus any whose mounts changed); anything else,
    /// limits, and the resync make a whole pass.
    fn take_work(&mut self) -> Work {
        let listed = self.s.cache.live.load(Ordering::Acquire);
        // The state first, the brake after: a relist in between is judged
        // (set_brake) before it replaces the state, so this never pairs a
        // wiped state with "not held".
        let (mut desired, generation, changes) = self.s.cache.take();
        // A held node serves the listed state like a stored one: repairs and
        // additions, nothing taken away.
        let live = listed && self.held(listed).is_none();
        self.pending.merge(changes);
        let policy = self.s.policy.read().expect("policy lock").clone();
        self.apply_limits(&mut desired, &policy);
        let resync = Instant::now() >= self.next_resync;
        if resync {
            self.next_resync = Instant::now() + self.s.cfg.resync;
            self.pending.all = true;
        }
        let taken = std::mem::take(&mut self.pending);
        if taken.all {
            self.volume_pass_at = None;
        } else if taken.volumes {
            self.volume_pass_at
                .get_or_insert(Instant::now() + VOLUME_PASS_DELAY);
        }
        Work {
            desired,
            generation,
            scope: (!taken.all).then_some(taken.kernels),
            live,
            policy,
            resync,
        }
    }

    /// On an agent, the vfolders a pass found no directory for are looked
    /// up by the follower (the storage node may refuse them): after every
    /// pass, since a chained pass skips the kernel's binds in backoff.
    fn ask_verdicts(&self, o: &PassOutcome) {
        if !self.s.keys.follows_vfolders() {
            return;
        }
        if self
            .s
            .cache
            .verdicts
            .wait_for(o.missing_vfolders.iter().copied())
        {
            self.s.cache.kernels_changed.notify_one();
        }
    }

    /// Applies the policy's limits to `desired`. Limits count across
    /// objects, so one kernel's change can move another's verdict: those
    /// kernels join the pass; a vfolder's verdict moving makes a whole pass.
    /// The state is copied only when something is refused.
    fn apply_limits(&mut self, desired: &mut Arc<crate::state::desired::Desired>, policy: &Policy) {
        let mut verdicts = desired.limit_verdicts(policy);
        // An agent's own count covers only the records it holds: the
        // storage node's verdicts come on top.
        for (id, why) in self.s.cache.verdicts.refusals() {
            if desired.vfolders.contains_key(&id) {
                verdicts.vfolders.entry(id).or_insert(why);
            }
        }
        if verdicts.vfolders != self.limits.vfolders {
            self.pending.all = true;
        }
        for (id, _) in verdicts.kernels.iter().chain(&self.limits.kernels) {
            if verdicts.kernels.get(id) != self.limits.kernels.get(id) {
                self.pending.kernels.insert(id.clone());
            }
        }
        if !verdicts.kernels.is_empty() || !verdicts.vfolders.is_empty() {
            Arc::make_mut(desired).apply_limits(&verdicts);
        }
        self.limits = verdicts;
    }

    /// One pass, and more while actions succeed and the state read after
    /// them still is not what is wanted. Each runs on a blocking thread.
    async fn run_passes(
        &mut self,
        mut rec: Reconciler,
        work: &Work,
    ) -> Result<(Reconciler, Option<PassOutcome>), DaemonError> {
        let started = std::time::Instant::now();
        *self
            .s
            .health
            .pass_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(started);
        let span = tracing::info_span!("reconcile", revision = work.desired.revision);
        if work.resync {
            rec.suspect_remounts();
        }
        let mut last: Option<PassOutcome> = None;
        for _ in 0..MAX_CHAINED_PASSES {
            // The watchdog times each pass, not the chain.
            let now = std::time::Instant::now();
            *self
                .s
                .health
                .pass_started
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(now);
            rec.node.policy = work.policy.clone();
            // A chained pass looks again at what the last one looked at
            // (including kernels it found through mount-table changes).
            let scope = match &last {
                Some(o) => o.scope.clone(),
                None => work.scope.clone(),
            };
            let (d, generation, live) = (work.desired.clone(), work.generation, work.live);
            let span = span.clone();
            let (r, result) = tokio::task::spawn_blocking(move || {
                let _e = span.enter();
                let input = PassInput {
                    desired: &d,
                    generation,
                    scope,
                    live,
                };
                let res = rec.guarded_pass(input);
                (rec, res)
            })
            .await
            .map_err(|e| DaemonError::PassPanicked(e.to_string()))?;
            rec = r;
            match result {
                Ok(o) => {
                    self.s.metrics.record_pass(&o);
                    self.ask_verdicts(&o);
                    let again = o.progressed() && !o.scoped_converged;
                    last = Some(o);
                    if !again {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "reconcile pass failed; retrying");
                    // The retry looks at everything.
                    self.pending.all = true;
                    break;
                }
            }
        }
        *self
            .s
            .health
            .pass_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let m = self.s.metrics;
        m.pass_duration.observe(started.elapsed().as_secs_f64());
        if last.as_ref().map_or(0, |o| o.actions.len()) >= TRIM_AFTER_ACTIONS {
            // A burst freed a lot: give it back instead of keeping it resident.
            crate::memory::release_free_memory();
        }
        Ok((rec, last))
    }

    /// Publishes the outcome and readiness; returns when the loop must wake
    /// without being told.
    fn after_passes(&mut self, work: &Work, last: Option<&PassOutcome>) -> Instant {
        let mut now_needed = false;
        let deadlines = match last {
            Some(o) => {
                if o.followup.all || !o.followup.kernels.is_empty() {
                    self.pending.merge(o.followup.clone());
                    now_needed = true;
                }
                if !o.scoped_converged {
                    // Not done with these kernels: the next pass looks at them
                    // again, at once if this one was still making progress.
                    if let Some(kernels) = &o.scope {
                        self.pending.kernels.extend(kernels.iter().cloned());
                    }
                    now_needed |= o.progressed();
                }
                self.s.metrics.record_outcome(o, &work.desired);
                self.converged_once = true;
                self.backoff = PASS_BACKOFF_MIN;
                self.reread_at = o.reread_at;
                vec![o.linger_deadline, o.retry_deadline, o.renew_deadline]
            }
            None => {
                let retry = Instant::now() + self.backoff;
                self.backoff = pass_backoff(self.backoff);
                vec![Some(retry)]
            }
        };
        self.publish_readiness(work.live);
        let wake = next_wake(
            self.next_resync,
            deadlines.into_iter().chain([self.volume_pass_at]),
        );
        if now_needed {
            Instant::now()
        } else {
            wake
        }
    }

    fn publish_readiness(&self, live: bool) {
        let (cache, m, health) = (self.s.cache, self.s.metrics, self.s.health);
        let held = cache.brake().held;
        let was_held = std::mem::replace(
            &mut *health.held.lock().unwrap_or_else(|p| p.into_inner()),
            held.clone(),
        );
        let connected = cache.connected.load(Ordering::Relaxed);
        m.etcd_connected.set(i64::from(connected));
        m.watch_revision.set(cache.revision.load(Ordering::Relaxed));
        let d = cache.peek();
        for (kind, n) in [
            ("volume", d.volumes.len()),
            ("vfolder", d.vfolders.len()),
            ("kernel", d.kernels.len()),
        ] {
            m.desired_objects.with_label_values(&[kind]).set(n as i64);
        }
        let ready = self.converged_once && connected && live;
        let was_ready = health.ready.swap(ready, Ordering::Relaxed);
        if was_ready != ready || was_held != held {
            health.changed.notify_one();
        }
        health.serving.store(self.converged_once, Ordering::Relaxed);
        m.ready.set(i64::from(ready));
    }

    /// Waits for the next reason to run a pass. Leading edge: the first
    /// change runs a pass at once; changes that arrive during a pass are
    /// coalesced into the next one. False on shutdown.
    async fn wait(&mut self, wake: Instant, rec: &Reconciler, shutdown: &mut Shutdown<'_>) -> Wake {
        loop {
            tokio::select! {
                _ = self.s.cache.changed.notified() => return Wake::Pass,
                Some(ask) = self.plans.recv() => return Wake::Plan(ask),
                _ = self.mounts_changed.notified() => {
                    if !rec.mount_table_current() {
                        // A burst (a container runtime's binds) is read once.
                        tokio::time::sleep(MOUNT_WAKE_COALESCE).await;
                        return Wake::Pass;
                    }
                    tracing::trace!("mount-table event already seen");
                }
                _ = sleep_until(wake) => {
                    // A deadline (resync, linger, retry, renewal): a whole pass.
                    self.pending.all = true;
                    return Wake::Pass;
                }
                _ = sleep_until(self.reread_at.unwrap_or(wake)), if self.reread_at.is_some() => {
                    // The table may be behind: a pass over what changed in it.
                    self.reread_at = None;
                    return Wake::Pass;
                }
                _ = shutdown.as_mut() => return Wake::Stop,
            }
        }
    }
}

/// First delay before restarting a background task that died.
const TASK_RESTART_MIN: Duration = Duration::from_secs(1);
/// Longest delay between restarts of a task that keeps dying.
const TASK_RESTART_MAX: Duration = Duration::from_secs(30);

/// Runs a task that should run forever, and restarts it with backoff when it
/// ends or panics (a bug): logged, counted, and `/healthz` says 503 until it
/// runs again, so a dead watcher never leaves the node serving stale state
/// silently. Dropping the guard stops both the supervisor and the task.
fn supervised<F, Fut>(
    name: &'static str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    make: F,
) -> AbortOnDrop<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // At 0 from the start: an alert on its increase sees the first death.
    metrics.task_restarts.with_label_values(&[name]);
    AbortOnDrop(tokio::spawn(async move {
        let mut delay = TASK_RESTART_MIN;
        loop {
            let mut task = AbortOnDrop(tokio::spawn(make()));
            let why = match (&mut task.0).await {
                Ok(()) => "it returned".to_string(),
                Err(e) if e.is_panic() => "it panicked".to_string(),
                Err(e) => e.to_string(),
            };
            health.tasks_down.fetch_add(1, Ordering::Relaxed);
            metrics.task_restarts.with_label_values(&[name]).inc();
            tracing::error!(task = name, why = %why, restart_in = ?delay, "background task died; restarting");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(TASK_RESTART_MAX);
            health.tasks_down.fetch_sub(1, Ordering::Relaxed);
        }
    }))
}

/// Aborts a background task when dropped (mini-redis `DbDropGuard`).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Issue 11 item 1: a watcher that panicked died silently and the node
    /// served stale state forever.
    #[tokio::test(start_paused = true)]
    async fn a_background_task_that_dies_is_noticed_and_restarted_with_backoff() {
        let (health, metrics) = (Arc::new(Health::default()), Arc::new(Metrics::new()));
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let _guard = supervised("watcher", health.clone(), metrics.clone(), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("a bug in the watcher");
                }
                std::future::pending::<()>().await
            }
        });
        let down = || health.tasks_down.load(Ordering::SeqCst);
        let restarts = || metrics.task_restarts.with_label_values(&["watcher"]).get();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((runs.load(Ordering::SeqCst), down(), restarts()), (1, 1, 1));
        // Restarted after 1 s, dies again; the next wait is 2 s.
        tokio::time::sleep(TASK_RESTART_MIN).await;
        assert_eq!((runs.load(Ordering::SeqCst), down(), restarts()), (2, 1, 2));
        tokio::time::sleep(TASK_RESTART_MIN).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "backoff doubled");
        tokio::time::sleep(TASK_RESTART_MIN * 2).await;
        assert_eq!((runs.load(Ordering::SeqCst), down(), restarts()), (3, 0, 2));
    }
}
