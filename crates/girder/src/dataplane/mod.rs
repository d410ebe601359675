//! The data plane: bytes from node to node, directly, never through the statekeeper.
//!
//! A request is a header (opaque bytes: the store's MessagePack) and a body streamed in
//! chunks; so is its response. On the wire (`frame.rs`) every frame carries a crc32c of its
//! header fields and payload and is compressed on its own (none, lz4 or zstd, chosen by the
//! requester per transfer, sent raw when compressing does not shrink it). Bodies flow under
//! credits: a receiver lets a sender have at most `window_frames` chunks in flight and grants
//! more as its consumer takes them, so it buffers at most `window_frames x chunk_bytes` per
//! stream. A connection carries one request at a time and goes back to its peer's pool
//! (at most `conns_per_peer_max` connections per peer) only once both bodies were read to
//! their end; a body dropped early closes it. Handlers that panic answer with an error
//! frame-level `Remote` error; the server lives.

mod body;
mod client;
mod frame;
mod server;

use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};

pub use body::Body;
pub use client::{DataClient, DataStats};
pub use server::DataServer;

/// Largest chunk a peer may send, whatever it is configured with.
pub const CHUNK_BYTES_MAX: usize = 8 << 20;

/// Per-transfer compression: each chunk is compressed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Bytes as they are.
    #[default]
    None,
    /// lz4 (block format): fast, modest ratio.
    Lz4,
    /// zstd level 1: slower, better ratio.
    Zstd,
}

/// Limits and timeouts of the data plane.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Payload bytes of one body chunk (at most [`CHUNK_BYTES_MAX`]).
    pub chunk_bytes: usize,
    /// Chunks a receiver lets a sender have in flight per stream.
    pub window_frames: u32,
    /// Connections to one peer at once (requests beyond wait for one).
    pub conns_per_peer_max: usize,
    /// Connections a server accepts at once (more are closed at once).
    pub conns_max: usize,
    /// Largest request or response header.
    pub header_bytes_max: usize,
    /// Longest wait for a connection to open.
    pub connect_timeout_ms: u64,
    /// Longest an idle connection stays open (pooled, or waiting for a request).
    pub idle_timeout_ms: u64,
    /// Longest wait for the next frame once a request or response has begun.
    pub frame_timeout_ms: u64,
}

impl Default for DataConfig {
    fn default() -> DataConfig {
        DataConfig {
            chunk_bytes: 1 << 20,
            window_frames: 8,
            conns_per_peer_max: 16,
            conns_max: 1_024,
            header_bytes_max: 64 << 10,
            connect_timeout_ms: 2_000,
            idle_timeout_ms: 30_000,
            frame_timeout_ms: 10_000,
        }
    }
}

impl DataConfig {
    fn chunk(&self) -> usize {
        self.chunk_bytes.clamp(1, CHUNK_BYTES_MAX)
    }
}

/// Why a transfer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    /// The peer could not be reached.
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The connection failed.
    #[error("data plane I/O: {0}")]
    Io(String),
    /// The peer stalled past a timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer broke the protocol (or is not a girder node).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame failed its checksum.
    #[error("a frame failed its checksum")]
    Checksum,
    /// A header, frame or body over its limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The peer's handler failed or panicked.
    #[error("the peer failed: {0}")]
    Remote(String),
    /// The connection closed mid-transfer.
    #[error("the connection closed")]
    Closed,
}

/// A request as a handler receives it.
pub struct Request {
    /// The requester's header.
    pub header: bytes::Bytes,
    /// The request body, streamed.
    pub body: Body,
    /// Who sent it.
    pub peer: std::net::SocketAddr,
}

/// A response as a handler returns it (or a requester receives it).
pub struct Response {
    /// The response header.
    pub header: bytes::Bytes,
    /// The response body.
    pub body: Body,
}

/// Serves requests.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Serves one request. A panic here reaches the requester as [`DataError::Remote`]; the
    /// server goes on.
    async fn handle(&self, request: Request) -> Response;
}

/// Bytes and frames moved, for metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) raw_bytes_sent: AtomicU64,
    pub(crate) wire_bytes_sent: AtomicU64,
    pub(crate) raw_bytes_received: AtomicU64,
    pub(crate) wire_bytes_received: AtomicU64,
    pub(crate) requests: AtomicU64,
}
