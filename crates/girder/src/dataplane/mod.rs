//! The data plane: bytes from node to node, directly, never through the statekeeper. It
//! knows nothing of what it carries: a request is a header (opaque bytes) and a body
//! streamed in chunks, and so is its response.
//!
//! On the wire (TCP, `TCP_NODELAY`), both ends first say who they are (`GRDP`, the protocol
//! version, the window they grant and the largest chunk they take); a stranger is refused
//! with [`DataError::Protocol`] on both sides. Then a request is a header frame, body
//! frames and an end frame; the response likewise. Every frame carries a crc32c of its
//! fixed fields and of its payload as sent, checked before anything is used (`frame.rs`).
//! Body frames are compressed one by one with the requester's [`Compression`] (the
//! response's too), and sent raw when compressing does not shrink them; a compressed frame
//! never inflates past its declared length, itself at most the receiver's chunk size.
//!
//! Bodies flow under credits: the receiver grants `window_frames` chunks up front and more
//! as its consumer takes them, so a sender never has more than `window_frames` chunks in
//! flight and a receiver buffers at most `window_frames x chunk_bytes` per stream (in its
//! socket; nothing is read ahead of its consumer). A sender whose receiver takes nothing
//! waits, at most `frame_timeout_ms`.
//!
//! A connection carries one request and its response at a time. The client keeps at most
//! `conns_per_peer_max` connections per peer (requests beyond wait for one) and pools a
//! connection only once both bodies were read to their end; a body dropped early closes
//! its connection, so a connection in an unknown state is never reused. A handler may
//! answer before reading its request body: the server then discards the rest of it (at
//! most a window, since it grants no more credits) while the requester stops at its end.
//! Handlers that panic answer [`DataError::Remote`]; the server lives. A server closing an
//! idle connection says goodbye first and reads nothing after, so a request that crossed
//! it on the wire is known not to have been acted on, and goes again on a new connection
//! (when its body can be sent again); no other failed request is ever sent twice.
//!
//! Memory: a connection holds one receive buffer (a chunk and 64 KiB; let go when idle),
//! and once it compresses, scratch space of a chunk and its compression contexts.

mod body;
mod client;
mod conn;
mod frame;
mod server;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use body::Body;
pub use client::DataClient;
pub use server::DataServer;

/// Largest chunk a peer may send or take, whatever it is configured with.
pub const CHUNK_BYTES_MAX: usize = 8 << 20;

/// Per-transfer compression: each body frame is compressed on its own, and sent raw when
/// that does not shrink it.
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
    /// Payload bytes of one body frame (1 byte to [`CHUNK_BYTES_MAX`]; default 1 MiB). A
    /// sender uses the smaller of its own and its peer's.
    pub chunk_bytes: usize,
    /// Chunks a receiver lets a sender have in flight per body (default 8): what it
    /// buffers per stream is at most `window_frames x chunk_bytes`.
    pub window_frames: u32,
    /// Connections a client opens to one peer at once (default 16); requests beyond wait
    /// for one.
    pub conns_per_peer_max: usize,
    /// Connections a server keeps open at once (default 1,024); more are closed at once.
    pub conns_max: usize,
    /// Largest request or response header (default 64 KiB).
    pub header_bytes_max: usize,
    /// Longest wait for a connection to open and greet (default 2 s).
    pub connect_timeout_ms: u64,
    /// Longest a server keeps a connection that waits for a request (default 30 s); a
    /// client pools one for half as long, so a server configured alike never closes one
    /// under it.
    pub idle_timeout_ms: u64,
    /// Longest a transfer waits on its peer once it began (default 10 s): for a frame, for
    /// credits, for the socket to take a frame, for the response header (so it includes
    /// the handler's time). A peer that stalls longer is cut off.
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
    /// The chunk size, within what the protocol allows.
    fn chunk(&self) -> usize {
        self.chunk_bytes.clamp(1, CHUNK_BYTES_MAX)
    }

    /// The window, within what the protocol allows.
    fn window(&self) -> u32 {
        self.window_frames.max(1)
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
    /// The peer broke the protocol (or is not a girder data plane).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame failed its checksum.
    #[error("a frame failed its checksum")]
    Checksum,
    /// A header, frame or body over its limit.
    #[error("{what} too large: {bytes} bytes, at most {bytes_max}")]
    TooLarge {
        /// What was too large: "header", "frame" or "body".
        what: &'static str,
        /// Its size (for a body, what had arrived when it passed the limit).
        bytes: u64,
        /// The limit.
        bytes_max: u64,
    },
    /// The peer's handler (or a body's producer) failed or panicked.
    #[error("the peer failed: {0}")]
    Remote(String),
    /// The connection closed mid-transfer.
    #[error("the connection closed")]
    Closed,
}

impl DataError {
    fn too_large(what: &'static str, bytes: usize, bytes_max: usize) -> DataError {
        DataError::TooLarge { what, bytes: bytes as u64, bytes_max: bytes_max as u64 }
    }
}

/// A request as a handler receives it.
#[derive(Debug)]
pub struct Request {
    /// The requester's header.
    pub header: bytes::Bytes,
    /// The request body, streamed.
    pub body: Body,
    /// Who sent it.
    pub peer: std::net::SocketAddr,
}

/// A response as a handler returns it (or a requester receives it).
#[derive(Debug)]
pub struct Response {
    /// The response header.
    pub header: bytes::Bytes,
    /// The response body.
    pub body: Body,
}

/// Serves requests.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Serves one request. A panic here is caught and reaches the requester as
    /// [`DataError::Remote`]; the server goes on. The handler is done with the request body
    /// when it returns: it read it, or dropped it (the rest is discarded), but must not
    /// keep it (the request would then fail).
    async fn handle(&self, request: Request) -> Response;
}

/// What a client or a server moved, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Body bytes sent, before compression.
    pub raw_bytes_sent: u64,
    /// Bytes sent on the wire: frames, compressed, with their headers.
    pub wire_bytes_sent: u64,
    /// Body bytes received, after decompression.
    pub raw_bytes_received: u64,
    /// Bytes received on the wire.
    pub wire_bytes_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Requests sent (client) or served (server).
    pub requests: u64,
    /// Connections open now.
    pub conns_open: u64,
    /// Connections opened (client) or accepted (server) so far.
    pub conns_opened: u64,
}

/// Counters shared by the connections of one client or server.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    raw_bytes_sent: AtomicU64,
    wire_bytes_sent: AtomicU64,
    raw_bytes_received: AtomicU64,
    wire_bytes_received: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    requests: AtomicU64,
    conns_open: AtomicU64,
    conns_opened: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn stats(&self) -> DataStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DataStats {
            raw_bytes_sent: get(&self.raw_bytes_sent),
            wire_bytes_sent: get(&self.wire_bytes_sent),
            raw_bytes_received: get(&self.raw_bytes_received),
            wire_bytes_received: get(&self.wire_bytes_received),
            frames_sent: get(&self.frames_sent),
            frames_received: get(&self.frames_received),
            requests: get(&self.requests),
            conns_open: get(&self.conns_open),
            conns_opened: get(&self.conns_opened),
        }
    }
}
