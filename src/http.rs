//! The daemon's local listen address: metrics and probes
//! ([`crate::metrics::router`]), and `GET /plan` — what this node would do
//! now, asked of the reconcile loop between passes (sled admits one
//! process, so the CLI cannot read the store while the daemon runs).
//! Nothing served here carries a secret.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{Health, Metrics};
use crate::reconcile::explain::PlanView;

/// A plan asked over HTTP, answered by the reconcile loop.
pub struct PlanRequest {
    /// Where the answer goes (an error as text).
    pub reply: oneshot::Sender<Result<PlanView, String>>,
}

/// What the server serves from.
pub struct Served {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Liveness and readiness.
    pub health: Arc<Health>,
    /// Asks the reconcile loop for a plan.
    pub plans: mpsc::Sender<PlanRequest>,
    /// Recent events (the status page).
    pub events: Arc<crate::state::events::EventLog>,
    /// The node's key layout (its name, its status keys).
    pub keys: crate::keys::Keys,
    /// The statuses the last pass reported.
    pub statuses: tokio::sync::watch::Receiver<crate::state::status::StatusBatch>,
}

/// How long `GET /plan` waits for the loop (a pass may be running).
const PLAN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves everything on an already-bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let page = Page {
        node: served.keys.node.clone(),
        keys: served.keys.clone(),
        health: served.health.clone(),
        statuses: served.statuses.clone(),
        events: served.events.clone(),
    };
    let app = crate::metrics::router(served.metrics.clone(), served.health.clone())
        .merge(
            Router::new()
                .route("/plan", get(plan))
                .with_state(served.plans.clone()),
        )
        .merge(Router::new().route("/", get(status_page)).with_state(page));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `?kernel=K` or `?volume=V`: only what serves that object.
#[derive(Debug, Default, Deserialize)]
struct PlanQuery {
    kernel: Option<String>,
    volume: Option<String>,
}

async fn plan(
    State(plans): State<mpsc::Sender<PlanRequest>>,
    Query(q): Query<PlanQuery>,
) -> Response {
    let (reply, answer) = oneshot::channel();
    match plans.try_send(PlanRequest { reply }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return unavailable("plans are already waiting for the reconcile loop; try again")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return unavailable("the reconcile loop is not running")
        }
    }
    match tokio::time::timeout(PLAN_WAIT, answer).await {
        Ok(Ok(Ok(view))) => {
            let view = match (&q.kernel, &q.volume) {
                (Some(k), _) => view.only(&format!("kernel/{k}")),
                (None, Some(v)) => view.only(&format!("volume/{v}")),
                (None, None) => view,
            };
            Json(view).into_response()
        }
        Ok(Ok(Err(e))) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Ok(Err(_)) => unavailable("the reconcile loop stopped"),
        Err(_) => unavailable("the reconcile loop is busy (a pass runs); try again"),
    }
}

fn unavailable(why: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

/// `GET /`: the node at a glance — readiness, volumes with capacity bars,
/// kernels with their mounts, recent events. Plain HTML, no script (it
/// reloads itself every 10 s); every text from etcd is escaped.
async fn status_page(State(p): State<Page>) -> axum::response::Html<String> {
    let batch = p.statuses.borrow().clone();
    axum::response::Html(crate::statuspage::render(&crate::statuspage::PageInput {
        node: &p.node,
        keys: &p.keys,
        ready: p.health.ready.load(std::sync::atomic::Ordering::Relaxed),
        held: p
            .health
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        entries: &batch.entries,
        events: &p.events.recent(),
    }))
}

/// What the status page reads.
#[derive(Clone)]
struct Page {
    node: String,
    keys: crate::keys::Keys,
    health: Arc<Health>,
    statuses: tokio::sync::watch::Receiver<crate::state::status::StatusBatch>,
    events: Arc<crate::state::events::EventLog>,
}
