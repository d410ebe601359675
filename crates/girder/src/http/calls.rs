//! `POST /v1/call/{function}`: calls with JSON arguments.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::admission::Caller;
use super::{bad_request, body_error, ApiError, AppState, PathParam};
use axum::body::Bytes;
use std::time::Duration;

/// The call routes; calls are admitted (node and caller limits) before their body is read.
pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/call/{*function}", post(call))
        .route_layer(axum::middleware::from_fn_with_state(state, admit))
}

/// Takes the call on, or answers `503`/`429` at once; the call holds its place until its
/// response is ready.
async fn admit(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let caller = Caller::of(&request);
    match state.admission.admit(caller, state.load.slots()) {
        Ok(ticket) => {
            let response = next.run(request).await;
            drop(ticket);
            response
        }
        Err(refused) => refused.into_response(),
    }
}

/// The query string of a call.
#[derive(Debug, Deserialize)]
struct CallQuery {
    timeout_ms: Option<u64>,
    affinity: Option<String>,
    /// Lowers the node's limit of new requests of the call's tree.
    requests_max: Option<u64>,
    /// Lowers the node's limit of the call tree's depth.
    depth_max: Option<u32>,
}

async fn call(
    State(state): State<Arc<AppState>>,
    PathParam(function): PathParam<String>,
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
    // Every call over HTTP has a deadline: the caller's, else the node's default, so no
    // forgotten call waits forever.
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
    if let Some(key) = query.affinity {
        client = client.with_affinity(key);
    }
    if query.requests_max.is_some() || query.depth_max.is_some() {
        // Capped by the node's own limits in the client.
        let limits = crate::CallLimits {
            requests_max: query.requests_max.unwrap_or(u64::MAX),
            depth_max: query.depth_max.unwrap_or(u32::MAX),
        };
        client = client.with_limits(limits);
    }
    Ok(Json(client.call_json(&function, &args).await?))
}
