//! Forgetting memoized results: one request's, typed or by name with JSON arguments, or
//! every result of a function version.
//!
//! What is guaranteed once a forget returns:
//! - the statekeeper holds none of the forgotten results, so no submission is answered from
//!   them: the next call evaluates again;
//! - an evaluation of a forgotten request in flight at that moment (for `forget_all`, of any
//!   request of that function version) delivers its result to its callers but does not
//!   memoize it, so a completion racing the forget cannot bring a result back;
//! - this node's near cache (Redis) dropped them at once; every other node's drops them when
//!   the forget's notice reaches it (normally within a millisecond), and should a notice be
//!   lost, at its next heartbeat. A node's near cache never refills from a read that began
//!   before a drop.
//!
//! Results memoized by evaluations that start after the forget are memoized as usual (and
//! `forget_all` may forget some of those too while it runs).

use serde_json::Value;

use crate::codec;
use crate::error::CallError;
use crate::grid::client::Client;
use crate::grid::function::{encode_args, Function};
use crate::request::Request;

impl Client {
    /// Forgets the memoized result of `F` on `args` on every node; the next call evaluates
    /// it again. Returns whether a result was memoized.
    pub async fn forget<F: Function>(&self, args: F::Args) -> Result<bool, CallError> {
        let request = Request::new(F::NAME, F::VERSION, encode_args::<F>(&args)?);
        self.core().forget(&request).await
    }

    /// Forgets the memoized result of the function `name` on JSON arguments (an array, one
    /// element per parameter: the same identity as [`Client::call_json`]'s). The version is
    /// the one this node serves, else the one the grid's directory knows. Returns whether a
    /// result was memoized.
    pub async fn forget_json(&self, name: &str, args: &Value) -> Result<bool, CallError> {
        let core = self.core();
        let version = core.version_of(name).await?;
        let encoded = codec::json_args_to_msgpack(args)
            .map_err(|message| CallError::BadArguments { function: name.to_owned(), message })?;
        if let Some(registered) = core.registry.get(name) {
            // Arguments the function cannot take were never memoized: say so, like a call would.
            registered.function.check_args(&encoded)?;
        }
        core.forget(&Request::new(name, version, encoded)).await
    }

    /// Forgets every memoized result of the function `name` at its current version (the one
    /// this node serves, else the one the grid's directory knows), on every node, in bounded
    /// steps. Returns how many results were forgotten.
    pub async fn forget_all(&self, name: &str) -> Result<u64, CallError> {
        self.core().forget_all(name).await
    }
}
