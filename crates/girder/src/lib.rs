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

mod client;
pub mod codec;
mod error;
pub mod examples;
mod function;
pub mod http;
mod id;
mod lease;
mod node;
pub mod placement;
mod request;
mod retry;
pub mod statekeeper;
pub mod structures;
pub mod testing;

pub use client::{call, call_blocking, Caller, Client};
pub use error::{CallError, ErrorKind, StatekeeperError};
pub use function::{encode_args, error_text, FnKind, Function, Registry};
pub use futures::future::BoxFuture;
pub use girder_macros::function;
pub use id::ReqId;
pub use node::config;
pub use node::{
    Ctx, Node, NodeBuilder, NodeError, NodeStats, PoolSpec, WorkerSpec, WorkerStats, SLOTS_MAX, WORKERS_MAX,
};
pub use request::{Outcome, Request};
pub use statekeeper::{
    Embedded, EmbeddedConfig, NodeInfo, RedisConfig, RedisStatekeeper, ResultStoreConfig, Statekeeper,
};
