//! `POST /v1/forget/{function}`: forgets memoized results, on every node.
//!
//! With a JSON array of arguments as the body (as for `POST /v1/call/{function}`), forgets
//! that one result; with `?all=true` and no body, every result of the function's current
//! version. Answers `200 {"forgotten": N}`: how many results were memoized (0 or 1 for one
//! result). The next call evaluates again. What is guaranteed for evaluations in flight and
//! other nodes' near caches is said in `grid/forget.rs`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{bad_request, body_error, ApiError, AppState, PathParam};

/// The forget routes. Forgetting is a few statekeeper steps (bounded batches for `all`),
/// not an evaluation, so it is not admitted against the call limits.
pub(super) fn routes(_state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new().route("/v1/forget/{*function}", post(forget))
}

/// The query string of a forget.
#[derive(Debug, Deserialize)]
struct ForgetQuery {
    /// Forget every result of the function's current version.
    #[serde(default)]
    all: bool,
}

/// The answer to a forget.
#[derive(Debug, Serialize)]
struct Forgotten {
    /// How many memoized results were forgotten.
    forgotten: u64,
}

async fn forget(
    State(state): State<Arc<AppState>>,
    PathParam(function): PathParam<String>,
    query: Result<Query<ForgetQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Forgotten>, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let body = body.map_err(body_error)?;
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let client = state.node.client();
    if query.all {
        if !blank {
            return Err(bad_request(
                "?all=true forgets every result of the function: send no body (or drop ?all=true to forget one)"
                    .to_owned(),
            ));
        }
        return Ok(Json(Forgotten { forgotten: client.forget_all(&function).await? }));
    }
    let args: serde_json::Value = if blank {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if !args.is_array() {
        return Err(bad_request(
            "the body must be a JSON array with one element per argument, e.g. [90], or use ?all=true".to_owned(),
        ));
    }
    let forgotten = client.forget_json(&function, &args).await?;
    Ok(Json(Forgotten { forgotten: u64::from(forgotten) }))
}
