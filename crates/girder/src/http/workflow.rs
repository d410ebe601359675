//! `/v1/workflows/{workflow}/{id}`: send a message to a workflow instance (`POST`, a JSON
//! body) and read its record (`GET`: state as JSON, owner, epoch, positions, timers,
//! status; how far each source lags is in the node's metrics); `GET /v1/workflows/{workflow}` lists a type's
//! instances. The type name is one path segment: its `/` is sent as `%2F`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::{bad_request, body_error, ApiError, AppState, ErrorBody, PathParam};
use crate::error::ErrorKind;
use crate::workflow::{self, Status, WorkflowError};

/// The workflow routes.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/workflows/{workflow}/{id}", get(read).post(send))
        .route("/v1/workflows/{workflow}", get(list))
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    limit: Option<u32>,
}

/// How many instances of the type exist and the ids of up to `limit` (default 100, at
/// most 1,000), sorted.
async fn list(
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam<String>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let limit = (query.limit.unwrap_or(100) as usize).clamp(1, workflow::LIST_MAX);
    let (count, ids) = workflow::list(&state.node.structures(), &name, limit).await?;
    Ok(Json(serde_json::json!({ "workflow": name, "count": count, "ids": ids })))
}

impl From<WorkflowError> for ApiError {
    fn from(err: WorkflowError) -> ApiError {
        match err {
            WorkflowError::Structures(err) => err.into(),
            other => bad_request(other.to_string()),
        }
    }
}

/// Sends the JSON body to the instance; answers `{"seq": N}`, its place in the mailbox.
async fn send(
    State(state): State<Arc<AppState>>,
    PathParam((name, id)): PathParam<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = body.map_err(body_error)?;
    let message: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("the body is not JSON: {e}")))?;
    let seq = workflow::send(&state.node.structures(), &name, &id, &message).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "seq": seq }))))
}

/// The instance's record, its state decoded to JSON.
async fn read(
    State(state): State<Arc<AppState>>,
    PathParam((name, id)): PathParam<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    workflow::check_name("workflow type", &name)?;
    workflow::check_name("workflow id", &id)?;
    let Some(instance) = workflow::instance(&state.node.structures(), &name, &id).await? else {
        let message = format!("workflow {name}/{id} has had no message yet");
        return Err(ApiError(StatusCode::NOT_FOUND, ErrorBody { kind: ErrorKind::NotFound, message }));
    };
    let decoded = match &instance.state {
        Some(bytes) => rmp_serde::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| bad_request(format!("the stored state is not readable as JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let (status, error) = match &instance.status {
        Status::Running => ("running", None),
        Status::Finished => ("finished", None),
        Status::Parked { error, seq, .. } => ("parked", Some(serde_json::json!({ "message": error, "seq": seq }))),
    };
    Ok(Json(serde_json::json!({
        "workflow": name,
        "id": id,
        "owner": instance.owner,
        "epoch": instance.epoch,
        "claims": instance.claims,
        "timers": instance.timers.iter().map(|(name, t)| (name.clone(), t.due_ms)).collect::<std::collections::BTreeMap<_, _>>(),
        "handled": instance.handled,
        "positions": instance.positions,
        "status": status,
        "error": error,
        "state": decoded,
    })))
}
