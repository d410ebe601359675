//! `/v1/store/...`: the bucket store as raw bytes, and `GET /v1/flocks`, the flocks this
//! node owns or holds (with the digests replicas compare).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use bytes::BytesMut;
use futures::StreamExt;

use super::{ApiError, AppState, ErrorBody, PathParam};
use crate::error::ErrorKind;
use crate::store::{Expect, ItemStore, StoreError};

/// The header that carries an item's version.
pub const VERSION_HEADER: &str = "girder-version";

/// The store routes, with a body limit of their own: items may be larger than calls.
pub(super) fn routes(item_bytes_max: usize) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/store/{bucket}/{item}", get(item_get).put(item_put).post(item_append).delete(item_delete))
        .route("/v1/store/{bucket}", get(bucket_get).delete(bucket_delete))
        .route("/v1/flocks", get(flocks))
        // Writes read their body themselves (see `read_item`); this is for any extractor.
        .layer(axum::extract::DefaultBodyLimit::max(item_bytes_max))
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        let (status, kind) = match &err {
            StoreError::InvalidKey(_) => (StatusCode::BAD_REQUEST, ErrorKind::BadRequest),
            StoreError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge),
            StoreError::Conflict { .. } => (StatusCode::CONFLICT, ErrorKind::Conflict),
            StoreError::Full(_) => (StatusCode::INSUFFICIENT_STORAGE, ErrorKind::Full),
            StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Corrupt),
            StoreError::ReadOnly(_) | StoreError::Unavailable(_) | StoreError::NoStore => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Unavailable)
            }
        };
        ApiError(status, ErrorBody { kind, message: err.to_string() })
    }
}

/// A failed store request: the API's error body, and for a version conflict the item's
/// actual version too (`"version"`, `null` when it does not exist, and in `girder-version`),
/// so a client can retry its conditional write without another read.
struct Failure(Response);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        self.0
    }
}

impl From<ApiError> for Failure {
    fn from(err: ApiError) -> Failure {
        Failure(err.into_response())
    }
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Failure {
        let StoreError::Conflict { expected, actual } = err else {
            return Failure(ApiError::from(err).into_response());
        };
        let wanted = match expected {
            Expect::Any => "any version".to_owned(),
            Expect::Absent => "no item".to_owned(),
            Expect::Version(version) => format!("version {version}"),
        };
        let found =
            actual.map_or_else(|| "the item does not exist".to_owned(), |v| format!("the item is at version {v}"));
        let message = format!("version conflict: the write expected {wanted}, but {found}");
        let body = serde_json::json!({ "kind": ErrorKind::Conflict, "message": message, "version": actual });
        let mut response = (StatusCode::CONFLICT, Json(body)).into_response();
        if let Some(version) = actual {
            response.headers_mut().insert(VERSION_HEADER, header::HeaderValue::from(version));
        }
        Failure(response)
    }
}

fn store(state: &AppState) -> Result<ItemStore, ApiError> {
    Ok(state.node.store()?)
}

/// What a write expects: `If-Match: N` (the item's version), `If-None-Match: *` (absent).
fn expect(headers: &HeaderMap) -> Result<Expect, ApiError> {
    let text = |name| headers.get(name).map(|v| v.to_str().map(|t| t.trim().trim_matches('"').to_owned()));
    match (text(header::IF_MATCH), text(header::IF_NONE_MATCH)) {
        (None, None) => Ok(Expect::Any),
        (None, Some(Ok(star))) if star == "*" => Ok(Expect::Absent),
        (Some(Ok(version)), None) => version
            .parse()
            .map(Expect::Version)
            .map_err(|_| super::bad_request(format!("If-Match must be an item version, got {version:?}"))),
        _ => Err(super::bad_request("use either If-Match: VERSION or If-None-Match: *".into())),
    }
}

/// Most bytes of an oversize item read and thrown away before the `413` goes out: a client
/// that sends its whole body before it reads the answer (most do) then gets the answer,
/// where closing on unread bytes would reset the connection under it.
pub(super) const DRAIN_BYTES_MAX: u64 = 256 << 20;

/// Most bytes reserved for an item before they arrive.
const RESERVE_BYTES_MAX: usize = 1 << 20;

/// The item a write carries, read whole up to the node's item limit (checked as it arrives:
/// a chunked body has no length up front); over it, a `413` that says the limit.
async fn read_item(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.store_bytes_max;
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    // Reserved up front only up to a point: an announced length costs the client nothing.
    let mut item = BytesMut::with_capacity(announced.unwrap_or(0).min(limit).min(RESERVE_BYTES_MAX));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(read_error)?;
        if item.len() + chunk.len() > limit {
            let drained = drain(chunks, DRAIN_BYTES_MAX).await;
            tracing::debug!(limit, drained, "store write over the item limit");
            let message = format!("the item is over this node's limit of {limit} bytes");
            return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, ErrorBody { kind: ErrorKind::TooLarge, message }));
        }
        item.extend_from_slice(&chunk);
    }
    Ok(item.freeze())
}

/// Reads and drops the rest of a body, at most `bytes_max` of it; how many bytes it read.
async fn drain(mut chunks: axum::body::BodyDataStream, bytes_max: u64) -> u64 {
    let mut drained = 0u64;
    while drained <= bytes_max {
        match chunks.next().await {
            Some(Ok(chunk)) => drained += chunk.len() as u64,
            _ => break,
        }
    }
    drained
}

/// A body that broke off: `408` when it was too slow (see [`super::BodyTimeout`]), else `400`.
fn read_error(err: axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(cause) = source {
        if cause.is::<super::BodyTimeout>() {
            let message = cause.to_string();
            return ApiError(StatusCode::REQUEST_TIMEOUT, ErrorBody { kind: ErrorKind::BadRequest, message });
        }
        source = cause.source();
    }
    super::bad_request(format!("cannot read the request body: {err}"))
}

fn written(version: u64) -> Response {
    let mut response = Json(serde_json::json!({ "version": version })).into_response();
    response.headers_mut().insert(VERSION_HEADER, header::HeaderValue::from(version));
    response
}

async fn item_get(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
) -> Result<Response, ApiError> {
    match store(&state)?.get(&bucket, &item).await? {
        Some(found) => {
            let version = found.version.to_string();
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::ETAG, format!("\"{version}\"")),
                (header::HeaderName::from_static(VERSION_HEADER), version),
            ];
            Ok((headers, found.value).into_response())
        }
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            ErrorBody { kind: ErrorKind::NotFound, message: format!("no item {item:?} in bucket {bucket:?}") },
        )),
    }
}

async fn item_put(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let expect = expect(&headers)?;
    crate::store::item_key(&bucket, &item).map_err(ApiError::from)?;
    let body = read_item(&state, &headers, body).await?;
    Ok(written(store(&state)?.put_if(&bucket, &item, body, expect).await?))
}

async fn item_append(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    crate::store::item_key(&bucket, &item)?;
    let body = read_item(&state, &headers, body).await?;
    Ok(written(store(&state)?.append(&bucket, &item, body).await?))
}

async fn item_delete(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let existed = store(&state)?.delete(&bucket, &item).await?;
    Ok(Json(serde_json::json!({ "existed": existed })))
}

/// The query string of a whole-bucket read.
#[derive(Debug, serde::Deserialize)]
struct BucketQuery {
    /// `false` leaves the values out (a listing: item, version, size).
    values: Option<bool>,
}

/// The whole bucket as NDJSON, streamed as it is read: `{"item", "version", "bytes",
/// "value_b64"}` per item, in item order (`?values=false` leaves `value_b64` out); an error
/// mid-way ends the stream with `{"error": {...}}`.
async fn bucket_get(
    State(state): State<Arc<AppState>>,
    PathParam(bucket): PathParam<String>,
    query: Result<Query<BucketQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| super::bad_request(format!("bad query string: {e}")))?;
    let values = query.values.unwrap_or(true);
    crate::store::check_key("bucket", &bucket).map_err(ApiError::from)?;
    let items = store(&state)?.get_bucket(&bucket);
    // One line per item as it comes: the body never holds more than the page being read.
    let lines = items.map(move |entry| {
        let mut text = match entry {
            Ok((item, found)) => bucket_line(&item, &found, values),
            Err(err) => {
                let ApiError(_, body) = ApiError::from(err);
                serde_json::json!({ "error": body }).to_string()
            }
        };
        text.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
}

/// One item of a whole-bucket read.
fn bucket_line(item: &str, found: &crate::store::Item, values: bool) -> String {
    let mut line = serde_json::json!({ "item": item, "version": found.version, "bytes": found.value.len() });
    if values {
        line["value_b64"] = base64::engine::general_purpose::STANDARD.encode(&found.value).into();
    }
    line.to_string()
}

async fn bucket_delete(
    State(state): State<Arc<AppState>>,
    PathParam(bucket): PathParam<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let deleted = store(&state)?.delete_bucket(&bucket).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })))
}

/// The flocks this node owns or holds: ready, held, copying, items, digest.
async fn flocks(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = store(&state)?;
    Ok(Json(serde_json::json!({ "node": state.node.id(), "flocks": store.flocks(), "stats": store.stats() })))
}
