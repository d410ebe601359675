//! Which calls the HTTP API takes on: at most `calls_max` in flight on the node, and per
//! caller at most its share of the node's slots. Both limits answer at once instead of
//! queueing: `503` when the node is full, `429` when the caller has its share in flight,
//! each with a JSON body and `Retry-After: 1`. A queue would only grow while the calls
//! ahead of it run, and the caller is the one who knows whether to wait.
//!
//! A caller is its `Authorization` header (hashed; the node's token file may hold one token
//! per caller), else its TCP connection (peer address and port).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Who makes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Caller {
    /// By the hash of its `Authorization` header.
    Token([u8; 32]),
    /// By its connection.
    Peer(SocketAddr),
    /// Neither is known (the router served without connection information).
    Unknown,
}

impl Caller {
    /// The caller of `request`.
    pub(super) fn of(request: &axum::extract::Request) -> Caller {
        if let Some(value) = request.headers().get(header::AUTHORIZATION) {
            return Caller::Token(*blake3::hash(value.as_bytes()).as_bytes());
        }
        match request.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => Caller::Peer(*peer),
            None => Caller::Unknown,
        }
    }
}

/// The limits on calls in flight.
pub(super) struct Admission {
    calls: Arc<Semaphore>,
    calls_max: usize,
    share: f64,
    per_caller: Mutex<HashMap<Caller, usize>>,
}

/// A call taken on; it leaves the counts when dropped.
pub(super) struct Ticket {
    admission: Arc<Admission>,
    caller: Caller,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("caller", &self.caller).finish_non_exhaustive()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut per_caller = self.admission.per_caller.lock();
        if let Some(count) = per_caller.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                per_caller.remove(&self.caller);
            }
        }
    }
}

impl Admission {
    /// `calls_max` calls in flight on the node, and per caller `share` (0 < share <= 1) of
    /// the node's slots.
    pub(super) fn new(calls_max: usize, share: f64) -> Admission {
        let calls_max = calls_max.clamp(1, Semaphore::MAX_PERMITS);
        let share = if share.is_finite() { share.clamp(f64::MIN_POSITIVE, 1.0) } else { 1.0 };
        Admission { calls: Arc::new(Semaphore::new(calls_max)), calls_max, share, per_caller: Mutex::default() }
    }

    /// How many calls one caller may have in flight on a node with `slots` slots: its share
    /// of them, at least 1. A gateway (no slots of its own) shares its call limit instead.
    pub(super) fn caller_max(&self, slots: u32) -> usize {
        let capacity = if slots == 0 { self.calls_max as f64 } else { f64::from(slots) };
        ((capacity * self.share).floor() as usize).max(1)
    }

    /// Takes on a call of `caller`, or answers why not.
    pub(super) fn admit(self: &Arc<Self>, caller: Caller, slots: u32) -> Result<Ticket, Refused> {
        let caller_max = self.caller_max(slots);
        let mut per_caller = self.per_caller.lock();
        let count = per_caller.get(&caller).copied().unwrap_or(0);
        if count >= caller_max {
            return Err(Refused(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this caller already has {count} calls in flight, its share of this node's {slots} slots; \
                     retry when one has finished"
                ),
            ));
        }
        let Ok(permit) = self.calls.clone().try_acquire_owned() else {
            return Err(Refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this node already has {} calls in flight, as many as it takes; retry later", self.calls_max),
            ));
        };
        per_caller.insert(caller, count + 1);
        Ok(Ticket { admission: self.clone(), caller, _permit: permit })
    }
}

/// A call the node does not take on now, and why.
#[derive(Debug)]
pub(super) struct Refused(pub StatusCode, pub String);

impl IntoResponse for Refused {
    /// `{"kind": "overloaded", "message": ...}` with `Retry-After: 1`.
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "kind": crate::ErrorKind::Overloaded.as_str(), "message": self.1 });
        let mut response = (self.0, axum::Json(body)).into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_share_and_others_theirs() {
        let admission = Arc::new(Admission::new(100, 0.5));
        let a = Caller::Token([1; 32]);
        let b = Caller::Token([2; 32]);
        let held: Vec<Ticket> = (0..4).map(|_| admission.admit(a, 8).expect("within the share")).collect();
        let refused = admission.admit(a, 8).expect_err("over the share");
        assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS);
        let other = admission.admit(b, 8).expect("another caller has its own share");
        drop(held);
        assert!(admission.admit(a, 8).is_ok(), "finished calls give the share back");
        drop(other);
        assert!(admission.per_caller.lock().is_empty(), "counts of callers with nothing in flight are forgotten");
    }

    #[test]
    fn the_node_limit_holds_whatever_the_callers() {
        let admission = Arc::new(Admission::new(3, 1.0));
        let held: Vec<Ticket> =
            (0..3u8).map(|i| admission.admit(Caller::Token([i; 32]), 8).expect("under the cap")).collect();
        let refused = admission.admit(Caller::Token([9; 32]), 8).expect_err("over the cap").into_response();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
        drop(held);
        assert!(admission.admit(Caller::Token([9; 32]), 8).is_ok());
    }

    #[test]
    fn shares_are_at_least_one_call_and_gateways_share_the_call_limit() {
        let admission = Admission::new(1_000, 0.1);
        assert_eq!(admission.caller_max(4), 1);
        assert_eq!(admission.caller_max(80), 8);
        assert_eq!(admission.caller_max(0), 100);
    }
}
