//! What the node and the grid say about themselves: health, stats, status, metrics,
//! placement.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{ApiError, AppState, ErrorBody, PathParam};
use crate::error::ErrorKind;

/// `GET /v1/health`, which answers without a token (for load balancers and probes).
pub(super) fn health_route() -> Router<Arc<AppState>> {
    Router::new().route("/v1/health", get(health))
}

/// The routes about the node and the grid.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/placement/{id}", get(placement))
}

/// `ok`, or `degraded` once every slot has been busy for `degraded_after_ms` (a gateway,
/// with no slots, is never degraded). Always `200`: the node still answers, and a liveness
/// probe that restarted a busy node would lose its work; a load balancer reads the body.
async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let load = state.load.read(&state.node);
    let degraded_after = std::time::Duration::from_millis(state.config.degraded_after_ms);
    let mut body = serde_json::json!({
        "status": "ok",
        "node": state.node.id(),
        "slots": load.slots,
        "busy": load.busy,
    });
    if let Some(busy_for) = load.all_busy_for.filter(|busy_for| *busy_for >= degraded_after) {
        body["status"] = "degraded".into();
        body["all_busy_ms"] = u64::try_from(busy_for.as_millis()).unwrap_or(u64::MAX).into();
        body["message"] =
            format!("every one of the node's {} slots has been busy for {:.1} s", load.slots, busy_for.as_secs_f64())
                .into();
    }
    Json(body)
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let stats = state.node.stats().await;
    let workers: Vec<_> = stats
        .workers
        .iter()
        .map(|w| serde_json::json!({"id": w.id, "pool": w.pool, "slots": w.slots, "executed": w.executed}))
        .collect();
    let pools: Vec<_> = stats
        .pools
        .iter()
        .map(|(name, c)| serde_json::json!({"pool": name, "handed_off": c.handed_off, "hoisted": c.hoisted, "queue_len": c.queue_len}))
        .collect();
    Json(serde_json::json!({
        "node": stats.node,
        "calls": stats.calls,
        "memo_hits": stats.memo_hits,
        "joined": stats.joined,
        "queued": stats.queued,
        "workers": workers,
        "pools": pools,
        "evaluations": stats.evaluations.iter().map(|(n, c)| serde_json::json!({"function": n, "count": c})).collect::<Vec<_>>(),
        "running": stats.running,
        "store": state.node.store().ok().map(|store| store.stats()),
    }))
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = state.node.statekeeper().live_nodes().await.map_err(|e| {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorBody { kind: ErrorKind::Statekeeper, message: e.to_string() })
    })?;
    Ok(Json(serde_json::json!({ "nodes": nodes })))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.node.metrics().await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn placement(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let placement = state.node.placement();
    let node_ids = placement.node_ids(&id).await?;
    let node_id = placement.best_of(&node_ids);
    let flock = crate::placement::flock_of(id.as_bytes());
    Ok(Json(serde_json::json!({ "id": id, "flock": flock, "node_id": node_id, "node_ids": node_ids })))
}
