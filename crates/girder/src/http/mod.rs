//! The node's HTTP API (axum). [`ROUTES`] lists every route; `GET /v1/openapi.json`
//! describes them all.
//!
//! - `POST /v1/call/{function}` with a JSON array of arguments returns the JSON result.
//!   `?timeout_ms=N` sets a deadline; `?requests_max=N&depth_max=N` lower the limits of the
//!   call's tree; `?affinity=KEY` runs it on an owner of KEY when one
//!   has a free slot. The response carries the call's id in `girder-call-id`; a caller may
//!   choose it by sending that header (1 to 64 of `[A-Za-z0-9._-]`). Errors are
//!   `{"kind": ..., "message": ...}` with a fitting status: 400 bad request or arguments,
//!   404 unknown function, 409 a call id already in flight, 422 the function returned an
//!   error, 500 it panicked, 503 the grid is unavailable, 504 the deadline passed.
//! - `POST /v1/map/{function}` with a JSON array of argument arrays streams one NDJSON line
//!   per input as it completes (`{"index": I, "value": V}` or `{"index": I, "error": {...}}`);
//!   `?concurrency=N&ordered=true` besides the call's parameters.
//! - `DELETE /v1/calls/{id}` cancels the call or map `id` in flight on this node.
//! - `POST /v1/forget/{function}` with a JSON argument array forgets that memoized result;
//!   `?all=true` (no body) every memoized result of the function's current version.
//! - `GET /v1/functions` lists the functions the grid serves: parameters with their JSON
//!   schemas, result schema, policies; and, from the directory, those only other nodes serve.
//! - `GET /v1/openapi.json` is the OpenAPI 3.1 document of this API, with a path per
//!   function this node knows (`POST /v1/call/NAME` with its arguments' and result's schemas).
//! - `GET /v1/health` returns `{"status": "ok", "node": ID, "slots": N, "busy": N}`, with
//!   `"status": "degraded"` (still `200`, so a busy node is not restarted by a liveness
//!   probe) once every slot has been busy for [`HttpConfig::degraded_after_ms`].
//! - `GET /v1/stats` returns the node's counters.
//! - `GET /v1/status` returns the grid's live nodes as the statekeeper knows them.
//! - `GET /metrics` serves the node's metrics in Prometheus's text format.
//! - `GET /v1/placement/{id}` returns `{"node_id": ..., "node_ids": [...], "flock": N}`.
//! - `/v1/cache/{key}`: `GET` the value (raw bytes), `PUT` it (`?ttl_ms=N`), `POST` to
//!   append to it, `DELETE` it. 404 `not_found`, 409 `wrong_kind`, 413 `too_large`.
//! - `/v1/store/{bucket}/{item}`: `GET` the item (raw bytes, its version in
//!   `girder-version` and `ETag`), `PUT` it (`If-Match: VERSION` or `If-None-Match: *`; 409
//!   `conflict`), `POST` to append, `DELETE` it; `GET /v1/store/{bucket}` streams the whole
//!   bucket as NDJSON, `DELETE` deletes it. Bodies up to [`HttpConfig::store_bytes_max`].
//!   `GET /v1/flocks`: the flocks this node owns or holds, with their digests.
//! - `GET /v1/events`: cluster lifecycle events after a sequence id.
//! - `/v1/workflows/{workflow}/{id}` (the type's `/` sent as `%2F`): `POST` a JSON message
//!   to the instance (`202 {"seq": N}`, its place in the mailbox), `GET` its record (state
//!   as JSON, owner, epoch, positions, `running`/`finished`/`parked` with the error).
//!
//! Calls without `?timeout_ms=` get [`HttpConfig::deadline_ms`]. Calls in flight are
//! limited per node and per caller (see `admission`): beyond, `503`/`429` `overloaded` at
//! once. A body announced larger than [`HttpConfig::body_bytes_max`] is refused with `413`
//! before anything reads it, so a client that sent `Expect: 100-continue` never gets
//! `100 Continue`. [`Server`] serves the router with connection limits, timeouts and TLS.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::{CallError, ErrorKind};

mod admission;
mod cache;
mod events;
pub use cache::USER_KEY_PREFIX;
mod calls;
pub mod catalogue;
pub use catalogue::Catalogue;
mod grid;
mod load;
mod openapi;
mod results;
mod server;
pub use server::{bind, connections_max_for, BodyTimeout, Server, ServerConfig};
mod store;
pub use store::VERSION_HEADER;
mod tls;
mod workflow;
use crate::grid::Node;
use crate::structures::{Cache, CacheConfig, DsError};
pub use tls::{tls_config, TlsError};

/// Limits and access of the HTTP API.
#[derive(Clone)]
pub struct HttpConfig {
    /// How the cache routes store values.
    pub cache: CacheConfig,
    /// When not empty, every route but `GET /v1/health` requires `Authorization: Bearer
    /// TOKEN` with one of these tokens. Each token is a caller of its own for fairness.
    pub tokens: Vec<Arc<str>>,
    /// Largest request body accepted, in bytes (store items: `store_bytes_max`).
    pub body_bytes_max: usize,
    /// Largest body of a store write (`/v1/store/...`), in bytes: the store's item limit.
    pub store_bytes_max: usize,
    /// Largest `timeout_ms` a caller may ask for.
    pub timeout_ms_max: u64,
    /// The deadline of a call that names none (`?timeout_ms=`), in milliseconds.
    pub deadline_ms: u64,
    /// Most calls in flight on this node at once; more are answered `503` at once.
    pub calls_max: usize,
    /// The share (0 < share <= 1) of the node's slots one caller may keep busy with calls in
    /// flight (at least one call); more are answered `429` at once.
    pub caller_share: f64,
    /// Health says `degraded` once every slot has been busy for this long, in milliseconds.
    pub degraded_after_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            cache: CacheConfig::default(),
            tokens: Vec::new(),
            body_bytes_max: 4 << 20,
            store_bytes_max: 64 << 20,
            timeout_ms_max: 3_600_000,
            deadline_ms: 300_000,
            calls_max: 4_096,
            caller_share: 0.5,
            degraded_after_ms: 10_000,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("HttpConfig")
            .field("cache", &self.cache)
            .field("tokens", &self.tokens.len())
            .field("body_bytes_max", &self.body_bytes_max)
            .field("store_bytes_max", &self.store_bytes_max)
            .field("timeout_ms_max", &self.timeout_ms_max)
            .field("deadline_ms", &self.deadline_ms)
            .field("calls_max", &self.calls_max)
            .field("caller_share", &self.caller_share)
            .field("degraded_after_ms", &self.degraded_after_ms)
            .finish()
    }
}

struct AppState {
    node: Arc<Node>,
    cache: Cache,
    config: HttpConfig,
    /// The tokens' hashes, compared in constant time.
    token_hashes: Vec<blake3::Hash>,
    admission: Arc<admission::Admission>,
    load: Arc<load::Load>,
    /// The OpenAPI document, built on first request: nothing it says changes while the
    /// node runs.
    openapi: std::sync::OnceLock<axum::body::Bytes>,
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The method, e.g. `GET`.
    pub method: &'static str,
    /// The path in the router's syntax: `{name}` is one path segment, `{*name}` the rest of
    /// the path (function names contain `/`).
    pub path: &'static str,
    /// The route's OpenAPI operation.
    doc: fn(&openapi::Docs) -> serde_json::Value,
}

impl Route {
    /// The path in OpenAPI's syntax, where `{*name}` is written `{name}`.
    pub fn openapi_path(&self) -> String {
        self.path.replace("{*", "{")
    }
}

/// Every route the router serves, each with its OpenAPI operation (in `openapi.rs`): a
/// route cannot be listed without its documentation, and a test fails on a route of the
/// router that is not listed here.
pub const ROUTES: &[Route] = &[
    Route { method: "POST", path: "/v1/call/{*function}", doc: openapi::call },
    Route { method: "POST", path: "/v1/map/{*function}", doc: openapi::map },
    Route { method: "DELETE", path: "/v1/calls/{id}", doc: openapi::cancel },
    Route { method: "POST", path: "/v1/forget/{*function}", doc: openapi::forget },
    Route { method: "GET", path: "/v1/functions", doc: openapi::functions },
    Route { method: "GET", path: "/v1/openapi.json", doc: openapi::openapi },
    Route { method: "GET", path: "/v1/health", doc: openapi::health },
    Route { method: "GET", path: "/v1/stats", doc: openapi::stats },
    Route { method: "GET", path: "/v1/status", doc: openapi::status },
    Route { method: "GET", path: "/metrics", doc: openapi::metrics },
    Route { method: "GET", path: "/v1/placement/{id}", doc: openapi::placement },
    Route { method: "GET", path: "/v1/cache/{key}", doc: openapi::cache_get },
    Route { method: "PUT", path: "/v1/cache/{key}", doc: openapi::cache_put },
    Route { method: "POST", path: "/v1/cache/{key}", doc: openapi::cache_append },
    Route { method: "DELETE", path: "/v1/cache/{key}", doc: openapi::cache_delete },
    Route { method: "GET", path: "/v1/store/{bucket}/{item}", doc: openapi::store_get },
    Route { method: "PUT", path: "/v1/store/{bucket}/{item}", doc: openapi::store_put },
    Route { method: "POST", path: "/v1/store/{bucket}/{item}", doc: openapi::store_append },
    Route { method: "DELETE", path: "/v1/store/{bucket}/{item}", doc: openapi::store_delete },
    Route { method: "GET", path: "/v1/store/{bucket}", doc: openapi::store_bucket_get },
    Route { method: "DELETE", path: "/v1/store/{bucket}", doc: openapi::store_bucket_delete },
    Route { method: "GET", path: "/v1/flocks", doc: openapi::flocks },
    Route { method: "GET", path: "/v1/workflows/{workflow}/{id}", doc: openapi::workflow_get },
    Route { method: "POST", path: "/v1/workflows/{workflow}/{id}", doc: openapi::workflow_send },
    Route { method: "GET", path: "/v1/workflows/{workflow}", doc: openapi::workflow_list },
    Route { method: "GET", path: "/v1/events", doc: openapi::events },
];

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
        let mut response = (self.0, Json(self.1)).into_response();
        if matches!(self.0, StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE) {
            // The rest of the body may still be on its way: the connection cannot carry
            // another request.
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        response
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
            ErrorKind::Statekeeper | ErrorKind::Shutdown | ErrorKind::NodeLost => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::DeadlineExceeded | ErrorKind::TimeLimitExceeded => StatusCode::GATEWAY_TIMEOUT,
            // The caller's own limits: the request is well formed but asks for too much.
            ErrorKind::BudgetExceeded => StatusCode::UNPROCESSABLE_ENTITY,
            // A tree's last caller left; whoever still gets this answer was not waiting.
            ErrorKind::Cancelled => StatusCode::CONFLICT,
            // Not produced by calls; here for completeness.
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::WrongKind => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Full => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Corrupt => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
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
            DsError::Full(_) => (StatusCode::INSUFFICIENT_STORAGE, ErrorKind::Full),
        };
        ApiError(status, ErrorBody { kind, message: err.to_string() })
    }
}

/// A body that could not be read: over the size limit, too slow (`408`, and the connection
/// closes), or broken off.
fn body_error(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
    while let Some(err) = source {
        if err.is::<BodyTimeout>() {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                ErrorBody { kind: ErrorKind::BadRequest, message: err.to_string() },
            );
        }
        source = err.source();
    }
    let status = rejection.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { ErrorKind::TooLarge } else { ErrorKind::BadRequest };
    ApiError(status, ErrorBody { kind, message: format!("cannot read the request body: {}", rejection.body_text()) })
}

/// A path parameter, whose rejection (e.g. invalid UTF-8) is a JSON `bad_request` like
/// every other error of the API.
struct PathParam<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParam(value)),
            Err(rejection) => Err(bad_request(format!("bad path: {}", rejection.body_text()))),
        }
    }
}

/// Any route the API does not have.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let message = format!("no route {method} {}", uri.path());
    ApiError(StatusCode::NOT_FOUND, ErrorBody { kind: ErrorKind::NotFound, message })
}

/// A route the API has, with a method it does not take.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let message = format!("{} does not take {method}", uri.path());
    ApiError(StatusCode::METHOD_NOT_ALLOWED, ErrorBody { kind: ErrorKind::BadRequest, message })
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, ErrorBody { kind: ErrorKind::BadRequest, message })
}

/// The router serving `node`. Within a tokio runtime it also samples the node's load in
/// the background for as long as the router lives.
pub fn router(node: Arc<Node>, config: HttpConfig) -> Router {
    let cache = Cache::new(node.structures(), config.cache);
    let limits = BodyLimits { general: config.body_bytes_max, store: config.store_bytes_max };
    let token_hashes = config.tokens.iter().map(|t| blake3::hash(t.as_bytes())).collect();
    let admission = Arc::new(admission::Admission::new(config.calls_max, config.caller_share));
    let load = Arc::new(load::Load::new(&node));
    load::spawn_sampler(Arc::downgrade(&node), Arc::downgrade(&load));
    let openapi = std::sync::OnceLock::new();
    let state = Arc::new(AppState { node, cache, config, token_hashes, admission, load, openapi });
    let guarded = Router::new()
        .merge(calls::routes(state.clone()))
        .merge(cache::routes())
        .merge(grid::routes())
        .merge(catalogue::routes())
        .merge(openapi::routes())
        .merge(results::routes(state.clone()))
        .merge(store::routes(limits.store))
        .merge(workflow::routes())
        .merge(events::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(guarded)
        .merge(grid::health_route())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(limits.general))
        .layer(axum::middleware::from_fn_with_state(limits, refuse_large_bodies))
        .with_state(state)
}

/// Body limits: store writes carry items, which may be larger than anything else.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    general: usize,
    store: usize,
}

/// Answers `413` to a request whose `Content-Length` is over `body_bytes_max` before
/// anything reads its body: hyper sends `100 Continue` only when the body is first read,
/// so a client that asked for it is told no without sending the body. The connection then
/// closes, since the unread body would otherwise follow.
async fn refuse_large_bodies(
    axum::extract::State(limits): axum::extract::State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let store_write = request.uri().path().starts_with("/v1/store/");
    let body_bytes_max = if store_write { limits.store } else { limits.general };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .map(|value| value.to_str().ok().and_then(|text| text.trim().parse::<u64>().ok()));
    match announced {
        None => next.run(request).await,
        Some(Some(length)) if length <= body_bytes_max as u64 => next.run(request).await,
        // A store write a little over the limit is read and dropped by its handler before
        // the 413, so that a client sending it whole gets the answer (`store::read_item`);
        // one that waits for `100 Continue` is refused here without sending it.
        Some(Some(length))
            if store_write
                && length <= (limits.store as u64).saturating_add(store::DRAIN_BYTES_MAX)
                && !expects_continue(&request) =>
        {
            next.run(request).await
        }
        Some(Some(length)) => {
            let message = format!("the request body of {length} bytes is over this node's limit of {body_bytes_max}");
            ApiError(StatusCode::PAYLOAD_TOO_LARGE, ErrorBody { kind: ErrorKind::TooLarge, message }).into_response()
        }
        // hyper refuses a malformed Content-Length before the router sees it; kept for
        // routers served otherwise.
        Some(None) => bad_request("Content-Length is not a number".to_owned()).into_response(),
    }
}

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(request: &axum::extract::Request) -> bool {
    request.headers().get(header::EXPECT).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Lets a request through when the API has no token or the request carries one of them,
/// compared in constant time (as BLAKE3 hashes, whose equality is constant-time; every
/// token is compared, whichever matches).
async fn require_token(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.token_hashes.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    let given = blake3::hash(given.as_bytes());
    let matches = state.token_hashes.iter().fold(false, |found, token| found | (*token == given));
    if matches {
        return next.run(request).await;
    }
    let message = "this node requires a bearer token: send `Authorization: Bearer TOKEN` \
                   (girder verbs read it from --token-file or GIRDER_TOKEN)"
        .to_owned();
    ApiError(StatusCode::UNAUTHORIZED, ErrorBody { kind: ErrorKind::Unauthorized, message }).into_response()
}
