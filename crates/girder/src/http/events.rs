//! `GET /v1/events?after=N&limit=M&wait_ms=W`: cluster lifecycle events (nodes joining,
//! leaving, dying; components starting, stopping, moving) after sequence id `after`,
//! waiting up to `wait_ms` (at most 5 s) for one when there is none yet.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};

use super::{bad_request, ApiError, AppState};
use crate::component::events;

/// Longest wait for an event a caller may ask for (a long poll asks again).
pub(super) const WAIT_MS_MAX: u64 = 5_000;

/// The events route.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/events", get(read))
}

#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<u32>,
    wait_ms: Option<u64>,
}

/// The events after `after`, each with its `seq`, and `next`: the `after` of the next read.
async fn read(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let after = query.after.unwrap_or(0);
    let limit = (query.limit.unwrap_or(100) as usize).clamp(1, events::EVENTS_READ_MAX);
    let wait_ms = query.wait_ms.unwrap_or(0);
    if wait_ms > WAIT_MS_MAX {
        return Err(bad_request(format!("wait_ms is at most {WAIT_MS_MAX}")));
    }
    let found = events::read(&state.node.structures(), after, limit, wait_ms).await?;
    let next = found.last().map_or(after, |(seq, _)| *seq);
    let events: Vec<serde_json::Value> = found
        .into_iter()
        .map(|(seq, event)| {
            let mut value = serde_json::to_value(event).unwrap_or_default();
            if let Some(map) = value.as_object_mut() {
                map.insert("seq".to_owned(), seq.into());
            }
            value
        })
        .collect();
    Ok(Json(serde_json::json!({ "events": events, "next": next })))
}
