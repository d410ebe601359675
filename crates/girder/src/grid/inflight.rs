//! Calls in flight on a node by call id, so that a caller can cancel one it started
//! ([`crate::Client::cancel`], HTTP `DELETE /v1/calls/{id}`).
//!
//! A call id names one caller's call (or one `map` of many), not a request: two callers
//! asking for the same request have two ids, and cancelling one leaves the other waiting;
//! the request's evaluation stops only when nobody waits for it any more (see `trees`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// Longest call id, in bytes.
pub const CALL_ID_LEN_MAX: usize = 64;

/// Most calls with an id in flight on one node at once; beyond, new ones are refused.
pub const IN_FLIGHT_MAX: usize = 1 << 20;

/// The id of a call in flight: 1 to 64 characters of `[A-Za-z0-9._-]`, chosen by the
/// caller or made by the node (32 hex digits).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CallId(Arc<str>);

impl CallId {
    /// A new random id.
    pub fn random() -> CallId {
        CallId(format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)).into())
    }

    /// `text` as a call id, or why it is not one.
    pub fn parse(text: &str) -> Result<CallId, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if text.is_empty() || text.len() > CALL_ID_LEN_MAX || !text.chars().all(allowed) {
            return Err(format!("a call id is 1 to {CALL_ID_LEN_MAX} characters of [A-Za-z0-9._-]"));
        }
        Ok(CallId(text.into()))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallId({})", self.0)
    }
}

/// Why a call could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InFlightError {
    /// Another call with this id is in flight on the node.
    #[error("a call with id {0} is already in flight on this node")]
    Duplicate(String),
    /// The node has [`IN_FLIGHT_MAX`] calls with ids in flight.
    #[error("this node has {IN_FLIGHT_MAX} calls in flight; retry later")]
    Full,
}

/// The calls in flight on a node, by id.
#[derive(Default)]
pub(crate) struct InFlight {
    /// Each call's token with the registration's number, so that a registration that
    /// ends after its id was cancelled and taken again removes only itself.
    calls: Mutex<HashMap<CallId, (u64, CancellationToken)>>,
    registered: std::sync::atomic::AtomicU64,
}

/// A registered call: cancelled through [`InFlight::cancel`]; leaves the registry when
/// dropped.
pub(crate) struct Registration {
    in_flight: Arc<InFlight>,
    id: CallId,
    number: u64,
    token: CancellationToken,
}

impl Registration {
    /// Cancelled when someone cancels this call.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut calls = self.in_flight.calls.lock();
        if calls.get(&self.id).is_some_and(|(number, _)| *number == self.number) {
            calls.remove(&self.id);
        }
    }
}

impl InFlight {
    /// Registers the call `id`.
    pub(crate) fn register(self: &Arc<Self>, id: CallId) -> Result<Registration, InFlightError> {
        let mut calls = self.calls.lock();
        if calls.contains_key(&id) {
            return Err(InFlightError::Duplicate(id.to_string()));
        }
        if calls.len() >= IN_FLIGHT_MAX {
            return Err(InFlightError::Full);
        }
        let token = CancellationToken::new();
        let number = self.registered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        calls.insert(id.clone(), (number, token.clone()));
        Ok(Registration { in_flight: self.clone(), id, number, token })
    }

    /// Cancels the call `id`; false when no such call is in flight.
    pub(crate) fn cancel(&self, id: &CallId) -> bool {
        match self.calls.lock().remove(id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(CallId::parse("job-1.a_b").is_ok());
        assert!(CallId::parse("").is_err());
        assert!(CallId::parse("a b").is_err());
        assert!(CallId::parse(&"x".repeat(CALL_ID_LEN_MAX + 1)).is_err());
        assert_eq!(CallId::random().as_str().len(), 32);
    }

    #[test]
    fn a_cancelled_call_is_told_and_an_id_is_free_again_once_its_call_ended() {
        let in_flight = Arc::new(InFlight::default());
        let id = CallId::parse("c1").unwrap();
        let registration = in_flight.register(id.clone()).unwrap();
        assert_eq!(in_flight.register(id.clone()).err(), Some(InFlightError::Duplicate("c1".into())));
        assert!(in_flight.cancel(&id));
        assert!(registration.token().is_cancelled());
        assert!(!in_flight.cancel(&id), "cancelled once");
        let again = in_flight.register(id.clone()).unwrap();
        drop(registration);
        assert!(!again.token().is_cancelled());
        assert!(in_flight.cancel(&id), "the old registration's end left the new one registered");
    }
}
