//! The node's HTTP API (axum).
//!
//! - `POST /v1/call/{function}` with a JSON array of arguments returns the JSON result.
//!   `?timeout_ms=N` sets a deadline; `?affinity=KEY` runs it on an owner of KEY when one
//!   has a free slot. Errors are `{"kind": ..., "message": ...}` with a
//!   fitting status: 400 bad request or arguments, 404 unknown function, 422 the function
//!   returned an error, 500 it panicked, 503 the grid is unavailable, 504 the deadline passed.
//! - `GET /v1/health` returns `{"status": "ok", "node": ID}`.
//! - `GET /v1/stats` returns the node's counters.
//! - `GET /v1/status` returns the grid's live nodes as the statekeeper knows them.
//! - `GET /metrics` serves the node's metrics in Prometheus's text format.
//! - `GET /v1/placement/{id}` returns `{"node_id": ..., "node_ids": [...], "flock": N}`.
//! - `/v1/cache/{key}`: `GET` the value (raw bytes), `PUT` it (`?ttl_ms=N`), `POST` to
//!   append to it, `DELETE` it. 404 `not_found`, 409 `wrong_kind`, 413 `too_large`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::{CallError, ErrorKind};
use crate::node::Node;
use crate::structures::{Cache, CacheConfig, DsError};

/// Limits of the HTTP API.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    /// How the cache routes store values.
    pub cache: CacheConfig,
    /// Largest request body accepted, in bytes.
    pub body_bytes_max: usize,
    /// Largest `timeout_ms` a caller may ask for.
    pub timeout_ms_max: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { cache: CacheConfig::default(), body_bytes_max: 4 << 20, timeout_ms_max: 3_600_000 }
    }
}

struct AppState {
    node: Arc<Node>,
    cache: Cache,
    config: HttpConfig,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The error's kind, e.g. `unknown_function`.
    pub kind: ErrorKind,
    /// A message a person can act on.
    pub message: String,
}

/// An error response.
struct ApiError(StatusCode, ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<CallError> for ApiError {
    fn from(err: CallError) -> ApiError {
        let status = match err.kind() {
            ErrorKind::BadArguments | ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::UnknownFunction => StatusCode::NOT_FOUND,
            ErrorKind::FunctionError => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Panic | ErrorKind::BlockingInAsync | ErrorKind::NoPool => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::BadResult => StatusCode::BAD_GATEWAY,
            ErrorKind::Statekeeper | ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // Not produced by calls; here for completeness.
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::WrongKind => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        };
        ApiError(status, ErrorBody { kind: err.kind(), message: err.to_string() })
    }
}

impl From<DsError> for ApiError {
    fn from(err: DsError) -> ApiError {
        let (status, kind) = match &err {
            DsError::WrongKind { .. } => (StatusCode::CONFLICT, ErrorKind::WrongKind),
            DsError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge),
            DsError::BadKey { .. } | DsError::Invalid(_) | DsError::Encode { .. } => {
                (StatusCode::BAD_REQUEST, ErrorKind::BadRequest)
            }
            DsError::Decode { .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::BadResult),
            DsError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorKind::DeadlineExceeded),
            DsError::Gap { .. } | DsError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Statekeeper),
        };
        ApiError(status, ErrorBody { kind, message: err.to_string() })
    }
}

/// A body that could not be read: over the size limit, or broken off.
fn body_error(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    let status = rejection.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { ErrorKind::TooLarge } else { ErrorKind::BadRequest };
    ApiError(status, ErrorBody { kind, message: format!("cannot read the request body: {}", rejection.body_text()) })
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, ErrorBody { kind: ErrorKind::BadRequest, message })
}

/// The query string of a call.
#[derive(Debug, Deserialize)]
struct CallQuery {
    timeout_ms: Option<u64>,
    affinity: Option<String>,
}

/// The router serving `node`.
pub fn router(node: Arc<Node>, config: HttpConfig) -> Router {
    let cache = Cache::new(node.structures(), config.cache);
    let state = Arc::new(AppState { node, cache, config });
    Router::new()
        .route("/v1/call/{*function}", post(call))
        .route("/v1/cache/{key}", get(cache_get).put(cache_set).post(cache_append).delete(cache_delete))
        .route("/v1/health", get(health))
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/placement/{id}", get(placement))
        .layer(DefaultBodyLimit::max(config.body_bytes_max))
        .with_state(state)
}

async fn call(
    State(state): State<Arc<AppState>>,
    Path(function): Path<String>,
    query: Result<Query<CallQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let body = body.map_err(body_error)?;
    let args: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if !args.is_array() {
        return Err(bad_request("the body must be a JSON array with one element per argument, e.g. [90]".to_owned()));
    }
    let mut client = state.node.client();
    if let Some(timeout_ms) = query.timeout_ms {
        if timeout_ms > state.config.timeout_ms_max {
            return Err(bad_request(format!(
                "timeout_ms is at most {}, got {timeout_ms}",
                state.config.timeout_ms_max
            )));
        }
        client = client.with_deadline(Duration::from_millis(timeout_ms));
    }
    if let Some(key) = query.affinity {
        client = client.with_affinity(key);
    }
    Ok(Json(client.call_json(&function, &args).await?))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "node": state.node.id() }))
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
    }))
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = state.node.statekeeper().live_nodes().await.map_err(|e| {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorBody { kind: ErrorKind::Statekeeper, message: e.to_string() })
    })?;
    Ok(Json(serde_json::json!({ "nodes": nodes })))
}

/// The query string of a cache write.
#[derive(Debug, Deserialize)]
struct CacheQuery {
    ttl_ms: Option<u64>,
}

async fn cache_get(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Result<Response, ApiError> {
    match state.cache.get_bytes(&key).await? {
        Some(value) => Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], value).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            ErrorBody { kind: ErrorKind::NotFound, message: format!("no cache entry {key:?}") },
        )),
    }
}

async fn cache_set(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    query: Result<Query<CacheQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let body = body.map_err(body_error)?;
    let ttl = query.ttl_ms.map(Duration::from_millis);
    state.cache.set_bytes(&key, &body, ttl).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cache_append(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(body_error)?;
    let stored_bytes = state.cache.append(&key, &body).await?;
    Ok(Json(serde_json::json!({ "stored_bytes": stored_bytes })))
}

async fn cache_delete(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    if state.cache.delete(&key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            ErrorBody { kind: ErrorKind::NotFound, message: format!("no cache entry {key:?}") },
        ))
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.node.metrics().await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn placement(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let placement = state.node.placement();
    let node_ids = placement.node_ids(&id).await?;
    let node_id = placement.best_of(&node_ids);
    let flock = crate::placement::flock_of(id.as_bytes());
    Ok(Json(serde_json::json!({ "id": id, "flock": flock, "node_id": node_id, "node_ids": node_ids })))
}
