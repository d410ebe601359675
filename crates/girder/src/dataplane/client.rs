//! The requesting side: a bounded pool of connections per peer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::body::{Conn, Incoming};
use super::frame::{self, Kind, MAGIC};
use super::{Body, Compression, Counters, DataConfig, DataError, Response};

/// Most peers a client keeps pools for; beyond, the idle connections of others are closed.
const PEERS_MAX: usize = 4_096;

struct Peer {
    permits: Arc<Semaphore>,
    idle: Vec<(Conn, Instant)>,
}

/// Bytes moved by a client and the servers it shares counters with.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DataStats {
    /// Body bytes sent, before compression.
    pub raw_bytes_sent: u64,
    /// Bytes sent on the wire (frames, compressed).
    pub wire_bytes_sent: u64,
    /// Body bytes received, after decompression.
    pub raw_bytes_received: u64,
    /// Bytes received on the wire.
    pub wire_bytes_received: u64,
    /// Requests sent.
    pub requests: u64,
}

/// Sends requests to peers' data planes. Cheap to clone; clones share the pools.
#[derive(Clone)]
pub struct DataClient {
    config: Arc<DataConfig>,
    peers: Arc<Mutex<HashMap<String, Peer>>>,
    counters: Arc<Counters>,
}

impl DataClient {
    /// A client with `config`'s limits.
    pub fn new(config: DataConfig) -> DataClient {
        DataClient { config: Arc::new(config), peers: Arc::default(), counters: Arc::default() }
    }

    /// What this client moved so far.
    pub fn stats(&self) -> DataStats {
        let c = &self.counters;
        DataStats {
            raw_bytes_sent: c.raw_bytes_sent.load(Ordering::Relaxed),
            wire_bytes_sent: c.wire_bytes_sent.load(Ordering::Relaxed),
            raw_bytes_received: c.raw_bytes_received.load(Ordering::Relaxed),
            wire_bytes_received: c.wire_bytes_received.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    /// Sends a request to the data plane at `address` and returns its response as soon as
    /// its header arrived (its body streams from the connection).
    pub async fn request(
        &self,
        address: &str,
        header: Bytes,
        body: Body,
        compression: Compression,
    ) -> Result<Response, DataError> {
        if header.len() > self.config.header_bytes_max {
            return Err(DataError::TooLarge(format!("a header of {} bytes", header.len())));
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.checkout(address).await?;
        conn.write(Kind::Header, &header, compression).await?;
        let early = conn.send_body(body, compression).await?;
        let reusable = early.is_none();
        let answer = match early {
            Some(frame) => frame,
            None => loop {
                let frame = conn.read(self.config.header_bytes_max.max(conn.chunk_max)).await?;
                if frame.kind != Kind::Credit {
                    break frame;
                }
            },
        };
        match answer.kind {
            Kind::Header => {}
            Kind::Error => return Err(DataError::Remote(String::from_utf8_lossy(&answer.payload).into_owned())),
            other => return Err(DataError::Protocol(format!("a {other:?} frame instead of a response header"))),
        }
        let (pool, address) = (self.clone(), address.to_owned());
        let back = Box::new(move |conn: Conn, finished: bool| {
            if finished && reusable {
                pool.check_in(&address, conn);
            }
        });
        Ok(Response { header: answer.payload, body: Body::incoming(Incoming::new(conn, back)) })
    }

    /// An idle pooled connection to `address`, or a new one, holding one of the peer's
    /// connection permits.
    async fn checkout(&self, address: &str) -> Result<Conn, DataError> {
        let permits = {
            let mut peers = self.peers.lock();
            if peers.len() >= PEERS_MAX && !peers.contains_key(address) {
                peers.retain(|_, p| p.permits.available_permits() < self.config.conns_per_peer_max);
            }
            let peer = peers.entry(address.to_owned()).or_insert_with(|| Peer {
                permits: Arc::new(Semaphore::new(self.config.conns_per_peer_max.max(1))),
                idle: Vec::new(),
            });
            peer.permits.clone()
        };
        let permit = permits.acquire_owned().await.map_err(|_| DataError::Closed)?;
        // Half the servers' idle timeout: a pooled connection is dropped here well before a
        // server (configured alike) closes it.
        let idle_timeout = Duration::from_millis(self.config.idle_timeout_ms / 2);
        let pooled = {
            let mut peers = self.peers.lock();
            let idle = peers.get_mut(address).map(|p| &mut p.idle);
            idle.and_then(|idle| {
                idle.retain(|(conn, since)| since.elapsed() < idle_timeout && still_open(conn));
                idle.pop().map(|(conn, _)| conn)
            })
        };
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect(address).await?,
        };
        conn.permit = Some(permit);
        Ok(conn)
    }

    fn check_in(&self, address: &str, mut conn: Conn) {
        conn.permit = None;
        if let Some(peer) = self.peers.lock().get_mut(address) {
            if peer.idle.len() < self.config.conns_per_peer_max {
                peer.idle.push((conn, Instant::now()));
            }
        }
    }

    async fn connect(&self, address: &str) -> Result<Conn, DataError> {
        let config = &self.config;
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| DataError::Connect(format!("{address}: no answer in {timeout:?}")))?
            .map_err(|e| DataError::Connect(format!("{address}: {e}")))?;
        stream.set_nodelay(true).map_err(frame::io)?;
        let mut stream = stream;
        let frame_timeout = Duration::from_millis(config.frame_timeout_ms);
        let peer_window = tokio::time::timeout(frame_timeout, handshake(&mut stream, config.window_frames))
            .await
            .map_err(|_| DataError::Timeout(format!("{address} did not complete the handshake")))??;
        let limits = (config.window_frames.max(1), peer_window, config.chunk(), frame_timeout);
        Ok(Conn::new(stream, limits, self.counters.clone()))
    }
}

/// Whether a pooled connection is still open: the peer sent nothing since (a close shows
/// as the end of the stream, anything else would be a protocol error).
fn still_open(conn: &Conn) -> bool {
    let mut probe = [0u8; 1];
    if !conn.reader.buffer().is_empty() {
        return false;
    }
    matches!(conn.reader.get_ref().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Says who this end is and its window, and reads the peer's: the peer's window.
pub(crate) async fn handshake(stream: &mut tokio::net::TcpStream, window: u32) -> Result<u32, DataError> {
    let mut hello = [0u8; 10];
    hello[..6].copy_from_slice(MAGIC);
    hello[6..].copy_from_slice(&window.max(1).to_le_bytes());
    let (mut reader, mut writer) = stream.split();
    let (wrote, read) = tokio::join!(writer.write_all(&hello), async {
        let mut theirs = [0u8; 10];
        reader.read_exact(&mut theirs).await.map(|_| theirs)
    });
    wrote.map_err(frame::io)?;
    let theirs = read.map_err(frame::io)?;
    if &theirs[..6] != MAGIC {
        return Err(DataError::Protocol("the peer is not a girder data plane of this version".into()));
    }
    let peer_window = u32::from_le_bytes([theirs[6], theirs[7], theirs[8], theirs[9]]);
    if peer_window == 0 {
        return Err(DataError::Protocol("the peer offers no window".into()));
    }
    Ok(peer_window)
}
