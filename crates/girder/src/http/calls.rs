//! Calls with JSON arguments: `POST /v1/call/{function}`, `POST /v1/map/{function}`
//! (NDJSON results as they complete) and `DELETE /v1/calls/{id}` (cancel one in flight).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;

use super::admission::Caller;
use super::{bad_request, body_error, ApiError, AppState, ErrorBody, PathParam};
use crate::error::{CallError, ErrorKind};
use crate::grid::{CallId, Client, InFlightError};

/// The header that carries a call's id: a caller may choose it on the request; every call
/// response carries it.
pub const CALL_ID_HEADER: HeaderName = HeaderName::from_static("girder-call-id");

/// Most inputs one `POST /v1/map` takes.
pub const MAP_INPUTS_MAX: usize = 100_000;

/// The concurrency of a map that names none.
const MAP_CONCURRENCY_DEFAULT: usize = 64;

/// The call routes; calls and maps are admitted (node and caller limits) before their body
/// is read; a map holds its place until its last result is sent. Cancelling is not a call.
pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let calls = Router::new()
        .route("/v1/call/{*function}", post(call))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admit));
    let maps = Router::new()
        .route("/v1/map/{*function}", post(map))
        .route_layer(axum::middleware::from_fn_with_state(state, admit_stream));
    Router::new().merge(calls).merge(maps).route("/v1/calls/{id}", delete(cancel))
}

/// Takes the call on, or answers `503`/`429` at once; the call holds its place until its
/// response is ready.
async fn admit(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.admission.admit(Caller::of(&request), state.load.slots()) {
        Ok(_ticket) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// [`admit`] for streamed responses: the place is held until the body is sent or dropped.
async fn admit_stream(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.admission.admit(Caller::of(&request), state.load.slots()) {
        Ok(ticket) => {
            let (parts, body) = next.run(request).await.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _held = &ticket;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
        Err(refused) => refused.into_response(),
    }
}

/// The query string of a call or a map.
#[derive(Debug, Deserialize)]
struct CallQuery {
    /// The deadline of the call (of each call of a map), in milliseconds.
    timeout_ms: Option<u64>,
    affinity: Option<String>,
    /// Run on a node that holds this bucket of the store (`Client::run_on`).
    bucket: Option<String>,
    /// Lowers the node's limit of new requests of the call's tree.
    requests_max: Option<u64>,
    /// Lowers the node's limit of the call tree's depth.
    depth_max: Option<u32>,
    /// A map's calls in flight at once.
    concurrency: Option<usize>,
    /// Whether a map's results come in input order.
    ordered: Option<bool>,
}

/// The call's id: the caller's, else a new one.
fn call_id(headers: &HeaderMap) -> Result<CallId, ApiError> {
    match headers.get(&CALL_ID_HEADER) {
        None => Ok(CallId::random()),
        Some(value) => {
            let text = value.to_str().map_err(|_| bad_request("girder-call-id is not ASCII".to_owned()))?;
            CallId::parse(text).map_err(|message| bad_request(format!("bad girder-call-id: {message}")))
        }
    }
}

impl From<InFlightError> for ApiError {
    fn from(err: InFlightError) -> ApiError {
        let (status, kind) = match err {
            InFlightError::Duplicate(_) => (axum::http::StatusCode::CONFLICT, ErrorKind::BadRequest),
            InFlightError::Full => (axum::http::StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Overloaded),
        };
        ApiError(status, ErrorBody { kind, message: err.to_string() })
    }
}

/// The client a call or map with `query` uses: its deadline (every call over HTTP has one:
/// the caller's, else the node's default, so no forgotten call waits forever), affinity
/// and limits.
fn client_for(state: &AppState, query: &CallQuery) -> Result<Client, ApiError> {
    let timeout_ms = match query.timeout_ms {
        Some(timeout_ms) if timeout_ms > state.config.timeout_ms_max => {
            return Err(bad_request(format!(
                "timeout_ms is at most {}, got {timeout_ms}",
                state.config.timeout_ms_max
            )));
        }
        Some(timeout_ms) => timeout_ms,
        None => state.config.deadline_ms,
    };
    let mut client = state.node.client().with_deadline(Duration::from_millis(timeout_ms));
    // A bucket is a stronger wish than an affinity (the call must run where the data is).
    match (&query.bucket, &query.affinity) {
        (Some(bucket), _) => {
            crate::store::check_key("bucket", bucket).map_err(ApiError::from)?;
            client = client.run_on(bucket.clone());
        }
        (None, Some(key)) => client = client.with_affinity(key.clone()),
        (None, None) => {}
    }
    if query.requests_max.is_some() || query.depth_max.is_some() {
        // Capped by the node's own limits in the client.
        let limits = crate::CallLimits {
            requests_max: query.requests_max.unwrap_or(u64::MAX),
            depth_max: query.depth_max.unwrap_or(u32::MAX),
        };
        client = client.with_limits(limits);
    }
    Ok(client)
}

type QueryResult = Result<Query<CallQuery>, axum::extract::rejection::QueryRejection>;
type BodyResult = Result<Bytes, axum::extract::rejection::BytesRejection>;

async fn call(
    State(state): State<Arc<AppState>>,
    PathParam(function): PathParam<String>,
    query: QueryResult,
    headers: HeaderMap,
    body: BodyResult,
) -> Response {
    with_id(&headers, |id| async move {
        call_inner(&state, &function, query, id, body).await.map(|value| Json(value).into_response())
    })
    .await
}

/// Runs `handle` under the call id `headers` name (or a new one) and puts the id on its
/// response, error or not.
async fn with_id<F, Fut>(headers: &HeaderMap, handle: F) -> Response
where
    F: FnOnce(CallId) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let id = match call_id(headers) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let mut response = handle(id.clone()).await.unwrap_or_else(IntoResponse::into_response);
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(CALL_ID_HEADER, value);
    }
    response
}

async fn call_inner(
    state: &AppState,
    function: &str,
    query: QueryResult,
    id: CallId,
    body: BodyResult,
) -> Result<serde_json::Value, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    if query.concurrency.is_some() || query.ordered.is_some() {
        return Err(bad_request("concurrency and ordered are for POST /v1/map".to_owned()));
    }
    let body = body.map_err(body_error)?;
    let args: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if !args.is_array() {
        return Err(bad_request("the body must be a JSON array with one element per argument, e.g. [90]".to_owned()));
    }
    let client = client_for(state, &query)?;
    let registration = client.register(id)?;
    Ok(client.cancellable(&registration).call_json(function, &args).await?)
}

/// The inputs of a map: a JSON array of argument arrays.
fn map_inputs(body: &[u8]) -> Result<Vec<serde_json::Value>, ApiError> {
    let inputs: Vec<serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body must be a JSON array of argument arrays, e.g. [[1], [2]]: {e}")))?;
    if inputs.len() > MAP_INPUTS_MAX {
        return Err(bad_request(format!("a map takes at most {MAP_INPUTS_MAX} inputs, got {}", inputs.len())));
    }
    if let Some(index) = inputs.iter().position(|input| !input.is_array()) {
        return Err(bad_request(format!("input {index} is not an argument array")));
    }
    Ok(inputs)
}

/// One NDJSON line of a map's response.
fn map_line(index: usize, result: Result<serde_json::Value, CallError>) -> Bytes {
    let line = match result {
        Ok(value) => serde_json::json!({ "index": index, "value": value }),
        Err(err) => {
            let ApiError(_, body) = ApiError::from(err);
            serde_json::json!({ "index": index, "error": body })
        }
    };
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn map(
    State(state): State<Arc<AppState>>,
    PathParam(function): PathParam<String>,
    query: QueryResult,
    headers: HeaderMap,
    body: BodyResult,
) -> Response {
    with_id(&headers, |id| map_inner(&state, function, query, id, body)).await
}

async fn map_inner(
    state: &AppState,
    function: String,
    query: QueryResult,
    id: CallId,
    body: BodyResult,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let inputs = map_inputs(&body.map_err(body_error)?)?;
    let client = client_for(state, &query)?;
    // An unknown function is one error, not one per input.
    let version = client.version_of(&function).await?;
    // One caller's map may keep at most its share of the node's calls in flight.
    let share_max = ((state.config.calls_max as f64 * state.config.caller_share) as usize).max(1);
    let concurrency = query.concurrency.unwrap_or(MAP_CONCURRENCY_DEFAULT).clamp(1, share_max);
    let registration = client.register(id)?;
    let client = client.cancellable(&registration);
    let lines = client.map_json(function.into(), version, inputs, concurrency, query.ordered.unwrap_or(false)).map(
        move |(index, result)| {
            // The map can be cancelled by id for as long as it streams.
            let _registered = &registration;
            Ok::<_, Infallible>(map_line(index, result))
        },
    );
    let mut response = Body::from_stream(lines).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// `DELETE /v1/calls/{id}`: cancels the call or map `id` in flight on this node.
async fn cancel(State(state): State<Arc<AppState>>, PathParam(id): PathParam<String>) -> Result<Response, ApiError> {
    let id = CallId::parse(&id).map_err(|message| bad_request(format!("bad call id: {message}")))?;
    if !state.node.client().cancel(&id) {
        let message = format!("no call with id {id} is in flight on this node");
        return Err(ApiError(axum::http::StatusCode::NOT_FOUND, ErrorBody { kind: ErrorKind::NotFound, message }));
    }
    Ok(Json(serde_json::json!({ "id": id.as_str(), "cancelled": true })).into_response())
}
