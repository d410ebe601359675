//! The compute grid: functions, calls, and the node runtime that evaluates them.
//!
//! - [`function`]: the [`Function`] trait the attribute implements, and the [`Registry`].
//! - [`client`]: [`Caller`], [`Client`] and the typed call helpers; `map`: many calls at
//!   once.
//! - `node`: [`Node`]; `builder`: [`NodeBuilder`] and the specs of pools and workers.
//! - `core`: the call path every caller on a node shares (memo, waiters, submit, complete).
//! - `worker`, `fiber`, `ctx`: evaluation in slots; async tasks, blocking fibers, nesting.
//! - `roles`: distributors, helpers and the inbox; `upkeep`: lease, reaping, placement,
//!   configuration and resubmission, each a task of its own.
//! - `trees`: the call trees evaluations belong to, their cancellation; `inflight`: calls
//!   in flight by call id, for cancelling one.
//! - `waiters`, `config`, `metrics`, `system`: what they say.

mod builder;
pub mod client;
pub mod config;
pub(crate) mod core;
mod ctx;
mod fiber;
mod forget;
pub mod function;
mod inflight;
mod map;
pub(crate) mod metrics;
mod node;
mod panics;
mod roles;
mod system;
mod trees;
mod upkeep;
mod waiters;
mod worker;

pub use builder::{NodeBuilder, NodeError, PoolSpec, WorkerSpec, SLOTS_MAX, WORKERS_MAX};
pub use client::{call, call_blocking, Call, Caller, Client};
pub use core::CallLimits;
pub use ctx::Ctx;
pub use function::{encode_args, error_text, FnKind, Function, Policy, Registry, Schemas};
pub use inflight::{CallId, InFlightError, CALL_ID_LEN_MAX, IN_FLIGHT_MAX};
pub use map::MAP_CONCURRENCY_MAX;
pub use node::{Node, NodeStats, WorkerStats};
