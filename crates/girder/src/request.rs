//! A request: a function name, its version and encoded arguments, with their identity.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::CallError;
use crate::id::ReqId;

/// A request to evaluate `function` at `version` on `args` (a MessagePack array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The identity, computed from the other three fields by [`Request::new`].
    pub id: ReqId,
    /// The namespace-qualified function name, e.g. `examples/fib`.
    pub function: Arc<str>,
    /// The function's version; part of the identity.
    pub version: u32,
    /// The MessagePack-encoded argument array.
    pub args: Bytes,
}

impl Request {
    /// Builds a request and computes its identity.
    pub fn new(function: impl Into<Arc<str>>, version: u32, args: Bytes) -> Request {
        let function = function.into();
        let id = ReqId::of(&function, version, &args);
        Request { id, function, version, args }
    }

    /// Bytes this request occupies in memory, for bounds.
    pub fn size_bytes(&self) -> usize {
        self.function.len() + self.args.len() + 64
    }
}

/// What an evaluation produced: the MessagePack-encoded result or why there is none.
pub type Outcome = Result<Bytes, CallError>;
