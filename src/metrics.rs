//! Prometheus metrics and the HTTP endpoint serving `/metrics`, `/healthz`, `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::reconcile::pass::PassOutcome;
use crate::reconcile::report::{KernelState, VolumeFigures};
use crate::state::desired::Desired;

/// Every series vfolderd exports (listed in README.md).
pub struct Metrics {
    /// The registry they live in.
    pub registry: Registry,
    /// `vfolderd_reconcile_passes_total{result}`: passes, by converged/not.
    pub passes: IntCounterVec,
    /// `vfolderd_reconcile_duration_seconds`: time of one pass.
    pub pass_duration: Histogram,
    /// `vfolderd_kernel_passes_total`: passes that looked at only the
    /// kernels named by events (the rest are whole-node passes).
    pub kernel_passes: IntCounter,
    /// `vfolderd_whole_passes_total`: passes that looked at the whole node
    /// (a round of `passes` may hold several passes of either kind).
    pub whole_passes: IntCounter,
    /// `vfolderd_actions_total{kind,result}`: executed actions.
    pub actions: IntCounterVec,
    /// `vfolderd_owned_mounts{kind}`: mounts in the ledger.
    pub owned_mounts: IntGaugeVec,
    /// `vfolderd_kernels{state}`: kernels by status.
    pub kernels: IntGaugeVec,
    /// `vfolderd_rejected_objects{kind}`: desired objects currently rejected.
    pub rejected: IntGaugeVec,
    /// `vfolderd_etcd_watch_revision`: last etcd revision applied.
    pub watch_revision: IntGauge,
    /// `vfolderd_etcd_watch_events_total`: events the watch streams brought.
    pub watch_events: IntCounter,
    /// `vfolderd_etcd_watch_bytes_total`: bytes of their keys and values.
    pub watch_bytes: IntCounter,
    /// `vfolderd_etcd_endpoints_out`: configured etcd members taken out of
    /// the client because they did not answer.
    pub etcd_endpoints_out: IntGauge,
    /// `vfolderd_desired_objects{kind}`: records held in the desired state
    /// (an agent holds only the vfolder records its kernels use).
    pub desired_objects: IntGaugeVec,
    /// `vfolderd_etcd_connected`: 1 while etcd answers.
    pub etcd_connected: IntGauge,
    /// `vfolderd_ready`: 1 once listed and converged, with etcd reachable.
    pub ready: IntGauge,
    /// `vfolderd_status_writes_total`: status keys written or deleted.
    pub status_writes: IntCounter,
    /// `vfolderd_stale_volumes`: volume mounts the prober found stale.
    pub stale_volumes: IntGauge,
    /// `vfolderd_sas_expiry_timestamp_seconds{volume}`: when each blob mount's SAS expires.
    pub sas_expiry: IntGaugeVec,
    /// `vfolderd_policy_reloads_total{result="ok"|"refused"}`: policy file changes.
    pub policy_reloads: IntCounterVec,
    /// `vfolderd_policy_conflicts`: refused objects still mounted because kernels use them.
    pub policy_conflicts: IntGauge,
    /// `vfolderd_task_restarts_total{task}`: background tasks that died (a bug) and were restarted.
    pub task_restarts: IntCounterVec,
    /// `vfolderd_volume_capacity_bytes{volume}`: size of each mounted volume's filesystem.
    pub volume_capacity: IntGaugeVec,
    /// `vfolderd_volume_free_bytes{volume}`: what an unprivileged user can still write there.
    pub volume_free: IntGaugeVec,
    /// `vfolderd_volume_used_bytes{volume}`: sum of its vfolders' scanned bytes (storage role).
    pub volume_used: IntGaugeVec,
    /// `vfolderd_vfolders{volume,state}`: vfolders by state (storage role).
    pub vfolders: IntGaugeVec,
    /// `vfolderd_vfolders_over_quota{volume}`: vfolders over their quota (storage role).
    pub vfolders_over_quota: IntGaugeVec,
    /// `vfolderd_usage_scan_duration_seconds`: time of one vfolder's usage scan.
    pub scan_duration: Histogram,
    /// How long mounts, unmounts and status writes take; what went wrong with them.
    pub ops: Ops,
}

/// The latencies and failures an operator watches a node's work by.
pub struct Ops {
    /// `vfolderd_mount_duration_seconds{op="mount"|"unmount",fstype}`.
    pub mount_duration: HistogramVec,
    /// `vfolderd_mount_helper_timeouts_total{fstype}`: helpers killed at `mount_timeout`.
    pub helper_timeouts: IntCounterVec,
    /// `vfolderd_stale_heals_total`: stale volume mounts detached to be mounted again.
    pub stale_heals: IntCounter,
    /// `vfolderd_etcd_watch_restarts_total{how="resume"|"relist"}`.
    pub watch_restarts: IntCounterVec,
    /// `vfolderd_status_write_duration_seconds`: one write of the changed statuses.
    pub status_write_duration: Histogram,
    /// `vfolderd_kernel_feature{feature,value}` 1: the kernel features in use
    /// ([`crate::features`]).
    pub kernel_feature: IntGaugeVec,
    /// `vfolderd_idmap_supported{fstype}`: whether an idmapped mount of a
    /// volume's filesystem type works (1) or not (0), once tried.
    pub idmap_supported: IntGaugeVec,
}

impl Ops {
    /// Creates the series in `registry`; every label value they can take
    /// starts at 0, so `increase()` sees the first one.
    fn new(registry: &Registry) -> Self {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let mount_duration = HistogramVec::new(
            HistogramOpts::new(
                "vfolderd_mount_duration_seconds",
                "Time of one volume mount, bind or unmount, by fstype",
            )
            .buckets(buckets.clone()),
            &["op", "fstype"],
        )
        .expect("metric");
        let helper_timeouts = IntCounterVec::new(
            Opts::new(
                "vfolderd_mount_helper_timeouts_total",
                "Mount helpers still running at mount_timeout (killed)",
            ),
            &["fstype"],
        )
        .expect("metric");
        let stale_heals = IntCounter::new(
            "vfolderd_stale_heals_total",
            "Stale volume mounts detached to be mounted again",
        )
        .expect("metric");
        let watch_restarts = IntCounterVec::new(
            Opts::new(
                "vfolderd_etcd_watch_restarts_total",
                "Watches of the desired state started again: resumed at their revision, or relisted",
            ),
            &["how"],
        )
        .expect("metric");
        let status_write_duration = Histogram::with_opts(
            HistogramOpts::new(
                "vfolderd_status_write_duration_seconds",
                "Time of one write of the changed status keys to etcd (retries apart)",
            )
            .buckets(buckets),
        )
        .expect("metric");
        let kernel_feature = IntGaugeVec::new(
            Opts::new(
                "vfolderd_kernel_feature",
                "Kernel features in use (1): the mount-table source, the new mount API",
            ),
            &["feature", "value"],
        )
        .expect("metric");
        let idmap_supported = IntGaugeVec::new(
            Opts::new(
                "vfolderd_idmap_supported",
                "Whether idmapped mounts work on a volume filesystem type (tried on a detached copy)",
            ),
            &["fstype"],
        )
        .expect("metric");
        for f in crate::spec::Fstype::LABELS {
            helper_timeouts.with_label_values(&[f]);
        }
        for how in ["resume", "relist"] {
            watch_restarts.with_label_values(&[how]);
        }
        for c in [
            Box::new(mount_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(helper_timeouts.clone()),
            Box::new(stale_heals.clone()),
            Box::new(watch_restarts.clone()),
            Box::new(status_write_duration.clone()),
            Box::new(kernel_feature.clone()),
            Box::new(idmap_supported.clone()),
        ] {
            registry.register(c).expect("register");
        }
        Self {
            mount_duration,
            helper_timeouts,
            stale_heals,
            watch_restarts,
            status_write_duration,
            kernel_feature,
            idmap_supported,
        }
    }

    /// Times and counts what one pass's actions did.
    fn record(&self, a: &crate::reconcile::pass::ActionResult) {
        use crate::reconcile::plan::ActionKind;
        let op = match a.kind {
            ActionKind::Mount | ActionKind::Bind => Some("mount"),
            ActionKind::Unmount => Some("unmount"),
            _ => None,
        };
        if let (Some(op), Some(fstype), true) = (op, a.fstype, a.attempted) {
            self.mount_duration
                .with_label_values(&[op, fstype])
                .observe(a.elapsed.as_secs_f64());
        }
        if a.helper_timeout {
            let fstype = a.fstype.unwrap_or("other");
            self.helper_timeouts.with_label_values(&[fstype]).inc();
        }
        if a.kind == ActionKind::Detach && a.ok {
            self.stale_heals.inc();
        }
    }
}

impl Metrics {
    /// Publishes the kernel features probed at start.
    pub fn set_features(&self, f: &crate::features::Features) {
        let k = &self.ops.kernel_feature;
        k.with_label_values(&["mount_table", f.mount_table.as_str()])
            .set(1);
        let api = if f.new_mount_api { "yes" } else { "no" };
        k.with_label_values(&["new_mount_api", api]).set(1);
    }

    /// Publishes an idmap verdict.
    pub fn set_idmap(&self, fstype: &str, works: bool) {
        self.ops
            .idmap_supported
            .with_label_values(&[fstype])
            .set(i64::from(works));
    }

    /// Creates and registers every series.
    pub fn new() -> Self {
        let registry = Registry::new();
        let passes = IntCounterVec::new(
            Opts::new(
                "vfolderd_reconcile_passes_total",
                "Reconcile passes, by whether they ended converged",
            ),
            &["result"],
        )
        .expect("metric");
        let kernel_passes = IntCounter::new(
            "vfolderd_kernel_passes_total",
            "Reconcile passes that looked only at the kernels events named",
        )
        .expect("metric");
        let whole_passes = IntCounter::new(
            "vfolderd_whole_passes_total",
            "Reconcile passes that looked at the whole node",
        )
        .expect("metric");
        let pass_duration = Histogram::with_opts(
            HistogramOpts::new(
                "vfolderd_reconcile_duration_seconds",
                "Duration of one reconcile pass",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets")),
        )
        .expect("metric");
        let actions = IntCounterVec::new(
            Opts::new(
                "vfolderd_actions_total",
                "Executed actions by kind and result",
            ),
            &["kind", "result"],
        )
        .expect("metric");
        let owned_mounts = IntGaugeVec::new(
            Opts::new("vfolderd_owned_mounts", "Mounts vfolderd owns, by kind"),
            &["kind"],
        )
        .expect("metric");
        let kernels = IntGaugeVec::new(
            Opts::new("vfolderd_kernels", "Kernels on this node by state"),
            &["state"],
        )
        .expect("metric");
        let rejected = IntGaugeVec::new(
            Opts::new(
                "vfolderd_rejected_objects",
                "Desired objects currently rejected, by kind",
            ),
            &["kind"],
        )
        .expect("metric");
        let watch_revision =
            IntGauge::new("vfolderd_etcd_watch_revision", "Last etcd revision applied")
                .expect("metric");
        let etcd_connected =
            IntGauge::new("vfolderd_etcd_connected", "1 while etcd answers").expect("metric");
        let watch_events = IntCounter::new(
            "vfolderd_etcd_watch_events_total",
            "Events the etcd watch streams brought",
        )
        .expect("metric");
        let watch_bytes = IntCounter::new(
            "vfolderd_etcd_watch_bytes_total",
            "Bytes of the keys and values the etcd watch streams brought",
        )
        .expect("metric");
        let etcd_endpoints_out = IntGauge::new(
            "vfolderd_etcd_endpoints_out",
            "Configured etcd members taken out of the client because they did not answer",
        )
        .expect("metric");
        let desired_objects = IntGaugeVec::new(
            Opts::new(
                "vfolderd_desired_objects",
                "Records held in the desired state, by kind",
            ),
            &["kind"],
        )
        .expect("metric");
        let ready = IntGauge::new(
            "vfolderd_ready",
            "1 after the first list and converge, while etcd answers",
        )
        .expect("metric");
        let status_writes = IntCounter::new(
            "vfolderd_status_writes_total",
            "Status keys written or deleted",
        )
        .expect("metric");
        let sas_expiry = IntGaugeVec::new(
            Opts::new(
                "vfolderd_sas_expiry_timestamp_seconds",
                "When the SAS of each blob volume mount expires (unix time)",
            ),
            &["volume"],
        )
        .expect("metric");
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "vfolderd_policy_reloads_total",
                "Policy reloads, by result (ok, or refused and the last good kept)",
            ),
            &["result"],
        )
        .expect("metric");
        let policy_conflicts = IntGauge::new(
            "vfolderd_policy_conflicts",
            "Volumes the policy now refuses that stay mounted because kernels use them",
        )
        .expect("metric");
        let stale_volumes = IntGauge::new(
            "vfolderd_stale_volumes",
            "Volume mounts found stale (ENOTCONN, ESTALE, EIO, EHOSTDOWN, or no answer)",
        )
        .expect("metric");
        let task_restarts = IntCounterVec::new(
            Opts::new(
                "vfolderd_task_restarts_total",
                "Background tasks (watcher, prober, liveness) that died and were restarted",
            ),
            &["task"],
        )
        .expect("metric");
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("metric")
        };
        let volume_capacity = gauge(
            "vfolderd_volume_capacity_bytes",
            "Size of each mounted volume's filesystem (statfs, by the prober)",
            &["volume"],
        );
        let volume_free = gauge(
            "vfolderd_volume_free_bytes",
            "What an unprivileged user can still write on each mounted volume",
            &["volume"],
        );
        let volume_used = gauge(
            "vfolderd_volume_used_bytes",
            "Sum of the scanned bytes of each volume's vfolders (storage role)",
            &["volume"],
        );
        let vfolders = gauge(
            "vfolderd_vfolders",
            "vfolders by volume and state (storage role)",
            &["volume", "state"],
        );
        let vfolders_over_quota = gauge(
            "vfolderd_vfolders_over_quota",
            "vfolders whose last scan found more than their quota_bytes (storage role)",
            &["volume"],
        );
        let scan_duration = Histogram::with_opts(
            HistogramOpts::new(
                "vfolderd_usage_scan_duration_seconds",
                "Time of one vfolder's usage scan (off the loop)",
            )
            .buckets(vec![0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0]),
        )
        .expect("metric");
        for result in ["ok", "refused"] {
            policy_reloads.with_label_values(&[result]);
        }
        let ops = Ops::new(&registry);
        for c in [
            Box::new(task_restarts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(volume_capacity.clone()),
            Box::new(volume_free.clone()),
            Box::new(volume_used.clone()),
            Box::new(vfolders.clone()),
            Box::new(vfolders_over_quota.clone()),
            Box::new(scan_duration.clone()),
            Box::new(passes.clone()),
            Box::new(pass_duration.clone()),
            Box::new(kernel_passes.clone()),
            Box::new(whole_passes.clone()),
            Box::new(actions.clone()),
            Box::new(owned_mounts.clone()),
            Box::new(kernels.clone()),
            Box::new(rejected.clone()),
            Box::new(watch_revision.clone()),
            Box::new(watch_events.clone()),
            Box::new(watch_bytes.clone()),
            Box::new(desired_objects.clone()),
            Box::new(etcd_endpoints_out.clone()),
            Box::new(etcd_connected.clone()),
            Box::new(ready.clone()),
            Box::new(status_writes.clone()),
            Box::new(stale_volumes.clone()),
            Box::new(sas_expiry.clone()),
            Box::new(policy_reloads.clone()),
            Box::new(policy_conflicts.clone()),
        ] {
            registry.register(c).expect("register");
        }
        Self {
            registry,
            passes,
            pass_duration,
            kernel_passes,
            whole_passes,
            actions,
            owned_mounts,
            kernels,
            rejected,
            watch_revision,
            watch_events,
            watch_bytes,
            desired_objects,
            etcd_endpoints_out,
            etcd_connected,
            ready,
            status_writes,
            stale_volumes,
            sas_expiry,
            policy_reloads,
            policy_conflicts,
            task_restarts,
            volume_capacity,
            volume_free,
            volume_used,
            vfolders,
            vfolders_over_quota,
            scan_duration,
            ops,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode");
        String::from_utf8(buf).expect("utf8")
    }
}

impl Metrics {
    /// Counts one pass and the actions it attempted.
    pub fn record_pass(&self, o: &PassOutcome) {
        if o.scope.is_some() {
            self.kernel_passes.inc();
        } else {
            self.whole_passes.inc();
        }
        for a in &o.actions {
            let result = if a.ok { "ok" } else { "error" };
            self.actions
                .with_label_values(&[a.kind.as_str(), result])
                .inc();
            self.ops.record(a);
        }
    }

    /// Publishes the node's state as the last pass of a round left it.
    pub fn record_outcome(&self, o: &PassOutcome, desired: &Desired) {
        let result = if o.summary.converged {
            "converged"
        } else {
            "pending"
        };
        self.passes.with_label_values(&[result]).inc();
        for state in KernelState::ALL {
            let n = o.summary.kernels_by_state.get(&state).copied().unwrap_or(0);
            self.kernels
                .with_label_values(&[state.as_str()])
                .set(n as i64);
        }
        self.stale_volumes.set(o.summary.stale_volumes as i64);
        self.policy_conflicts.set(o.summary.policy_conflicts as i64);
        for (kind, n) in &o.owned {
            self.owned_mounts.with_label_values(&[kind]).set(*n);
        }
        for (kind, n) in desired.rejected_counts() {
            self.rejected.with_label_values(&[kind]).set(n as i64);
        }
        self.sas_expiry.reset();
        for (volume, at) in &o.sas_expiry {
            self.sas_expiry.with_label_values(&[volume]).set(*at as i64);
        }
        self.record_volumes(&o.summary.volumes);
    }

    /// Per-volume size and vfolder figures (series of volumes gone are dropped).
    fn record_volumes(&self, volumes: &std::collections::BTreeMap<String, VolumeFigures>) {
        for g in [
            &self.volume_capacity,
            &self.volume_free,
            &self.volume_used,
            &self.vfolders,
            &self.vfolders_over_quota,
        ] {
            g.reset();
        }
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (volume, f) in volumes {
            let v = [volume.as_str()];
            if let (Some(c), Some(free)) = (f.capacity_bytes, f.free_bytes) {
                self.volume_capacity.with_label_values(&v).set(clamp(c));
                self.volume_free.with_label_values(&v).set(clamp(free));
            }
            if f.vfolders.is_empty() {
                continue;
            }
            self.volume_used
                .with_label_values(&v)
                .set(clamp(f.used_bytes));
            for (state, n) in &f.vfolders {
                self.vfolders
                    .with_label_values(&[volume.as_str(), state])
                    .set(*n as i64);
            }
            let over = f.vfolders.get("OverQuota").copied().unwrap_or(0);
            self.vfolders_over_quota
                .with_label_values(&v)
                .set(over as i64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Liveness and readiness flags the endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    /// The reconcile loop is running.
    pub alive: AtomicBool,
    /// Listed, converged once, and etcd reachable.
    pub ready: AtomicBool,
    /// Serving a desired state (live or stored): `/readyz` then says degraded, not waiting.
    pub serving: AtomicBool,
    /// Background tasks (watcher, prober, liveness) that died and wait to be
    /// restarted: `/healthz` is 503 meanwhile.
    pub tasks_down: std::sync::atomic::AtomicUsize,
    /// Why the safety brake holds the node, if it does.
    pub held: std::sync::Mutex<Option<String>>,
    /// Readiness or the brake changed: the liveness key says so now, not
    /// at its next keep-alive.
    pub changed: tokio::sync::Notify,
    /// When the pass in flight started (none between passes).
    pub pass_started: std::sync::Mutex<Option<std::time::Instant>>,
    /// A pass running longer than this is stuck: `/healthz` says 503.
    pub pass_limit: std::sync::Mutex<std::time::Duration>,
    /// The lease the liveness key is under (events live under it too).
    pub node_lease: crate::state::events::NodeLease,
    /// The kernel features in use (`/readyz` lists them).
    pub features: std::sync::OnceLock<Arc<crate::features::Features>>,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz` and `/readyz` ([`crate::http`] serves them with
/// the rest).
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, String) {
    let running = s
        .health
        .pass_started
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t.elapsed());
    let limit = *s
        .health
        .pass_limit
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(for_) = running.filter(|d| !limit.is_zero() && *d > limit) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "a reconcile pass has run for {}s (a volume may be hung)\n",
                for_.as_secs()
            ),
        );
    }
    let (code, text) = healthz_text(&s.health);
    (code, text.to_string())
}

fn healthz_text(health: &Health) -> (StatusCode, &'static str) {
    if health.tasks_down.load(Ordering::Relaxed) > 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "a background task died and is being restarted\n",
        )
    } else if health.alive.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "reconcile loop not running\n",
        )
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let held = s
        .health
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let features = s
        .health
        .features
        .get()
        .map(|f| f.report())
        .unwrap_or_default();
    if let Some(reason) = held {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("held by the safety brake: {reason}; nothing is torn down until `vfolderd accept-reset`\n{features}"),
        );
    }
    let (code, text) = readyz_text(&s.health);
    (code, format!("{text}{features}"))
}

fn readyz_text(health: &Health) -> (StatusCode, &'static str) {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else if health.serving.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded: etcd unreachable; serving the last good desired state, unmounting nothing\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first complete list of etcd\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        AppState {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
        }
    }

    /// Issue 11 item 5: a pass stuck in a hung volume left `/healthz` at 200.
    #[tokio::test]
    async fn healthz_is_503_while_a_pass_runs_past_its_limit() {
        let s = state();
        s.health.alive.store(true, Ordering::Relaxed);
        *s.health.pass_limit.lock().unwrap() = std::time::Duration::from_secs(50);
        assert_eq!(healthz(State(s.clone())).await.0, StatusCode::OK);
        let started = std::time::Instant::now() - std::time::Duration::from_secs(10);
        *s.health.pass_started.lock().unwrap() = Some(started);
        assert_eq!(
            healthz(State(s.clone())).await.0,
            StatusCode::OK,
            "a slow pass is fine"
        );
        let started = std::time::Instant::now() - std::time::Duration::from_secs(51);
        *s.health.pass_started.lock().unwrap() = Some(started);
        let (code, body) = healthz(State(s.clone())).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("has run for 51s"), "{body}");
        *s.health.pass_started.lock().unwrap() = None;
        assert_eq!(healthz(State(s)).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn readyz_says_why_the_safety_brake_holds() {
        let s = state();
        s.health.ready.store(true, Ordering::Relaxed);
        *s.health.held.lock().unwrap() = Some("etcd has no cluster id".into());
        let (code, body) = readyz(State(s)).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("safety brake") && body.contains("no cluster id"),
            "{body}"
        );
    }
}
