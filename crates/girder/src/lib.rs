//! girder: a distributed cache and compute grid.
//!
//! Functions are registered under namespace-qualified names with `#[girder::function]` and
//! called with serde arguments. A call's identity is a hash of (name, version, arguments);
//! its outcome is memoized grid-wide under that identity, identical calls in flight are
//! evaluated once, and functions may call functions to any depth without starving the grid.
//! Work flows through pools: idle workers volunteer, distributors hand work to volunteers,
//! helpers hoist surplus work from busy members. All shared state lives in a
//! [`Statekeeper`]; [`Embedded`] runs a whole grid in one process.
//!
//! ```no_run
//! use girder::{Ctx, Node, PoolSpec, Registry, WorkerSpec};
//!
//! #[girder::function(name = "demo/square")]
//! async fn square(_ctx: Ctx, x: u64) -> u64 {
//!     x * x
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder()
//!     .registry(Registry::new().with::<square>())
//!     .pool(PoolSpec::new("main"))
//!     .workers(WorkerSpec::new("main", 2, 2))
//!     .start()
//!     .await?;
//! assert_eq!(square::call(&node.client(), 7).await?, 49);
//! node.shutdown().await;
//! # Ok(()) }
//! ```

// Lets `#[girder::function]` expand to `::girder::...` paths inside this crate too.
extern crate self as girder;

pub mod codec;
pub mod component;
pub mod control;
pub mod dataplane;
mod error;
pub mod examples;
mod grid;
pub mod http;
mod id;
mod lease;
pub mod placement;
mod redis;
mod request;
mod retry;
pub mod store;
pub mod structures;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod workflow;

pub use control::{Embedded, EmbeddedConfig, NodeInfo, ResultStoreConfig, Statekeeper};
pub use error::{CallError, ErrorKind, StatekeeperError};
pub use futures::future::BoxFuture;
pub use girder_macros::function;
pub use grid::{
    call, call_blocking, config, encode_args, error_text, Call, CallId, Caller, Client, FnKind, Function,
    InFlightError, Policy, Registry, Schemas, CALL_ID_LEN_MAX, IN_FLIGHT_MAX, MAP_CONCURRENCY_MAX,
};
pub use grid::{
    CallLimits, Ctx, Node, NodeBuilder, NodeError, NodeStats, PoolSpec, WorkerSpec, WorkerStats, SLOTS_MAX, WORKERS_MAX,
};
pub use id::ReqId;
pub use redis::{redacted, RedisConfig, RedisStatekeeper};
pub use request::{Budget, Outcome, Request};
/// The `schemars` crate the catalogue's JSON schemas come from: derive
/// `girder::schemars::JsonSchema` (with `#[schemars(crate = "girder::schemars")]`) on argument
/// and result types to describe them in `GET /v1/functions`.
pub use schemars;
