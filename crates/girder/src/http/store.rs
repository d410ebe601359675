//! `/v1/store/...`: the bucket store as raw bytes, and `GET /v1/flocks`, the flocks this
//! node owns or holds (with the digests replicas compare).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt;

use super::{body_error, ApiError, AppState, ErrorBody, PathParam};
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

fn written(version: u64) -> Response {
    let mut response = Json(serde_json::json!({ "version": version })).into_response();
    if let Ok(value) = header::HeaderValue::from_str(&version.to_string()) {
        response.headers_mut().insert(VERSION_HEADER, value);
    }
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
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let expect = expect(&headers)?;
    let body = body.map_err(body_error)?;
    Ok(written(store(&state)?.put_if(&bucket, &item, body, expect).await?))
}

async fn item_append(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    Ok(written(store(&state)?.append(&bucket, &item, body).await?))
}

async fn item_delete(
    State(state): State<Arc<AppState>>,
    PathParam((bucket, item)): PathParam<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let existed = store(&state)?.delete(&bucket, &item).await?;
    Ok(Json(serde_json::json!({ "existed": existed })))
}

/// The whole bucket as NDJSON, streamed as it is read: `{"item", "version", "value_b64"}`
/// per item, in item order; an error mid-way ends the stream with `{"error": {...}}`.
async fn bucket_get(
    State(state): State<Arc<AppState>>,
    PathParam(bucket): PathParam<String>,
) -> Result<Response, ApiError> {
    crate::store::check_key("bucket", &bucket).map_err(ApiError::from)?;
    let items = store(&state)?.get_bucket(&bucket);
    let lines = items.map(|entry| {
        let line = match entry {
            Ok((item, found)) => serde_json::json!({
                "item": item,
                "version": found.version,
                "value_b64": base64::engine::general_purpose::STANDARD.encode(&found.value),
            }),
            Err(err) => {
                let ApiError(_, body) = ApiError::from(err);
                serde_json::json!({ "error": body })
            }
        };
        let mut text = line.to_string();
        text.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
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
