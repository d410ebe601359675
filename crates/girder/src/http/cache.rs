//! `/v1/cache/{key}`: the cache as raw bytes. Keys from HTTP live under
//! [`USER_KEY_PREFIX`], so no caller can reach girder's own state in the same store (its
//! configuration, placement directory, ...).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::{bad_request, body_error, ApiError, AppState, ErrorBody, PathParam};
use crate::error::ErrorKind;
use axum::body::Bytes;
use std::time::Duration;

/// Where keys from HTTP live in the structures store.
pub const USER_KEY_PREFIX: &str = "user/";

fn user_key(key: &str) -> String {
    format!("{USER_KEY_PREFIX}{key}")
}

/// The cache routes.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/cache/{key}", get(cache_get).put(cache_set).post(cache_append).delete(cache_delete))
}

/// The query string of a cache write.
#[derive(Debug, Deserialize)]
struct CacheQuery {
    ttl_ms: Option<u64>,
}

async fn cache_get(
    State(state): State<Arc<AppState>>,
    PathParam(key): PathParam<String>,
) -> Result<Response, ApiError> {
    match state.cache.get_bytes(&user_key(&key)).await? {
        Some(value) => Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], value).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            ErrorBody { kind: ErrorKind::NotFound, message: format!("no cache entry {key:?}") },
        )),
    }
}

async fn cache_set(
    State(state): State<Arc<AppState>>,
    PathParam(key): PathParam<String>,
    query: Result<Query<CacheQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let body = body.map_err(body_error)?;
    let ttl = query.ttl_ms.map(Duration::from_millis);
    state.cache.set_bytes(&user_key(&key), &body, ttl).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cache_append(
    State(state): State<Arc<AppState>>,
    PathParam(key): PathParam<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(body_error)?;
    let stored_bytes = state.cache.append(&user_key(&key), &body).await?;
    Ok(Json(serde_json::json!({ "stored_bytes": stored_bytes })))
}

async fn cache_delete(
    State(state): State<Arc<AppState>>,
    PathParam(key): PathParam<String>,
) -> Result<StatusCode, ApiError> {
    if state.cache.delete(&user_key(&key)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            ErrorBody { kind: ErrorKind::NotFound, message: format!("no cache entry {key:?}") },
        ))
    }
}
