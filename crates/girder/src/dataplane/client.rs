//! The requesting side: a bounded pool of connections per peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::Incoming;
use super::conn::{Conn, Frame};
use super::frame::Kind;
use super::{Body, Compression, Counters, DataConfig, DataError, DataStats, Response};

/// Most peers a client keeps pools for; beyond, peers with no request in flight are
/// forgotten (with their idle connections).
const PEERS_MAX: usize = 4_096;
/// How often idle connections of every peer are looked over (otherwise only their own
/// peer's requests do).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Peer {
    permits: Arc<Semaphore>,
    idle: Vec<(Conn, Instant)>,
}

struct Pools {
    peers: HashMap<String, Peer>,
    swept: Instant,
}

/// Sends requests to peers' data planes, over at most `conns_per_peer_max` connections per
/// peer. Cheap to clone; clones share the pools and the counters.
#[derive(Clone)]
pub struct DataClient {
    config: Arc<DataConfig>,
    pools: Arc<Mutex<Pools>>,
    counters: Arc<Counters>,
}

/// How a request's first attempt failed.
enum Failed {
    /// On a pooled connection whose socket took nothing: the peer cannot have seen any of
    /// the request, which may go again on a fresh connection, with this body.
    Untouched(Body, Option<OwnedSemaphorePermit>, DataError),
    Other(DataError),
}

impl DataClient {
    /// A client with `config`'s limits.
    pub fn new(config: DataConfig) -> DataClient {
        let pools = Pools { peers: HashMap::new(), swept: Instant::now() };
        DataClient { config: Arc::new(config), pools: Arc::new(Mutex::new(pools)), counters: Arc::default() }
    }

    /// What this client moved so far, and its connections.
    pub fn stats(&self) -> DataStats {
        self.counters.stats()
    }

    /// Sends a request to the data plane at `address` and returns its response as soon as
    /// its header arrived (its body streams from the connection, which goes back to the
    /// pool once the body was read to its end). `compression` applies to both bodies.
    ///
    /// A pooled connection the peer closed meanwhile is noticed before use and closed. A
    /// request that fails on a pooled connection goes once more on a fresh one only if the
    /// peer cannot have acted on it: the socket took nothing of it, or the server said
    /// goodbye first (it does when it closes an idle connection, and reads nothing after),
    /// and its body can go again (bytes in memory, or a stream not yet polled). Otherwise
    /// it never goes twice, and the error is returned.
    pub async fn request(
        &self,
        address: &str,
        header: Bytes,
        body: Body,
        compression: Compression,
    ) -> Result<Response, DataError> {
        if header.len() > self.config.header_bytes_max {
            return Err(DataError::too_large("header", header.len(), self.config.header_bytes_max));
        }
        Counters::add(&self.counters.requests, 1);
        let (conn, pooled) = self.checkout(address).await?;
        match self.exchange(address, conn, &header, body, compression, pooled).await {
            Ok(response) => Ok(response),
            Err(Failed::Untouched(body, permit, err)) => {
                tracing::debug!(address, error = %err, "data plane: a pooled connection was dead; sending on a new one");
                let mut conn = self.connect(address).await?;
                conn.permit = permit;
                let again = self.exchange(address, conn, &header, body, compression, false).await;
                again.map_err(|failed| match failed {
                    Failed::Untouched(_, _, err) | Failed::Other(err) => err,
                })
            }
            Err(Failed::Other(err)) => Err(err),
        }
    }

    /// One attempt at a request on `conn`.
    async fn exchange(
        &self,
        address: &str,
        mut conn: Conn,
        header: &[u8],
        body: Body,
        compression: Compression,
        pooled: bool,
    ) -> Result<Response, Failed> {
        let untouched = |conn: &mut Conn, body: Option<Body>, err: DataError| match body {
            Some(body) if pooled && (conn.accepted == 0 || conn.said_goodbye()) => {
                Failed::Untouched(body, conn.permit.take(), err)
            }
            _ => Failed::Other(err),
        };
        if let Err(err) = conn.send(Kind::Header, header, compression).await {
            return Err(untouched(&mut conn, Some(body), err));
        }
        // A body in memory can go again; a stream cannot, so on a pooled connection the
        // header goes alone first, to learn whether the socket is alive before the stream
        // is polled.
        let replay = body.replay();
        let body = match replay {
            Some(_) => body,
            None if pooled => match conn.flush().await {
                Ok(()) => body,
                Err(err) => return Err(untouched(&mut conn, Some(body), err)),
            },
            None => body,
        };
        let early = match conn.send_body(body, compression, true).await {
            Ok(early) => early,
            Err(err) => return Err(untouched(&mut conn, replay, err)),
        };
        let header = match answer(&mut conn, early).await {
            Ok(header) => header,
            Err(err) => return Err(untouched(&mut conn, replay, err)),
        };
        let (pool, address) = (self.clone(), address.to_owned());
        let back = Box::new(move |conn: Conn, finished: bool| {
            if finished {
                pool.check_in(&address, conn);
            }
        });
        Ok(Response { header, body: Body::incoming(Incoming::new(conn, back)) })
    }

    /// A connection to `address` holding one of the peer's permits: an idle pooled one
    /// (`true`) or a new one.
    async fn checkout(&self, address: &str) -> Result<(Conn, bool), DataError> {
        let permits = self.pools.lock().peer(address, &self.config).permits.clone();
        let permit = permits.acquire_owned().await.map_err(|_| DataError::Closed)?;
        let pooled = {
            let mut pools = self.pools.lock();
            pools.sweep(self.pooled_for());
            let idle = pools.peers.get_mut(address).map(|p| &mut p.idle);
            idle.and_then(|idle| {
                // Whatever is not usable any more is closed on the way.
                std::iter::from_fn(|| idle.pop()).find(|(conn, since)| usable(conn, *since, self.pooled_for()))
            })
        };
        let (mut conn, pooled) = match pooled {
            Some((conn, _)) => (conn, true),
            None => (self.connect(address).await?, false),
        };
        conn.permit = Some(permit);
        Ok((conn, pooled))
    }

    /// How long a connection stays pooled: half the idle timeout, so that a server
    /// configured alike never closes one under a request.
    fn pooled_for(&self) -> Duration {
        Duration::from_millis(self.config.idle_timeout_ms / 2)
    }

    fn check_in(&self, address: &str, mut conn: Conn) {
        conn.permit = None;
        conn.idle();
        let mut pools = self.pools.lock();
        if let Some(peer) = pools.peers.get_mut(address) {
            if peer.idle.len() < self.config.conns_per_peer_max {
                peer.idle.push((conn, Instant::now()));
            }
        }
    }

    async fn connect(&self, address: &str) -> Result<Conn, DataError> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let begun = Instant::now();
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| DataError::Connect(format!("{address}: no answer in {timeout:?}")))?
            .map_err(|e| DataError::Connect(format!("{address}: {e}")))?;
        let left = timeout.saturating_sub(begun.elapsed());
        Conn::open(stream, &self.config, self.counters.clone(), left).await
    }
}

/// The response's header: `early` if the peer answered before the request body ended,
/// else the next frame but credits (granted for the request body after its last chunk).
async fn answer(conn: &mut Conn, early: Option<Frame>) -> Result<Bytes, DataError> {
    let answer = match early {
        Some(frame) => frame,
        None => loop {
            let frame = conn.read(conn.terms.answer_max()).await?;
            if frame.kind != Kind::Credit {
                break frame;
            }
        },
    };
    match answer.kind {
        Kind::Header => Ok(answer.payload),
        Kind::Error => Err(DataError::Remote(String::from_utf8_lossy(&answer.payload).into_owned())),
        other => Err(DataError::Protocol(format!("a {other:?} frame instead of a response"))),
    }
}

impl Pools {
    fn peer(&mut self, address: &str, config: &DataConfig) -> &mut Peer {
        let conns_max = config.conns_per_peer_max.max(1);
        if self.peers.len() >= PEERS_MAX && !self.peers.contains_key(address) {
            self.peers.retain(|_, p| p.permits.available_permits() < conns_max);
        }
        self.peers
            .entry(address.to_owned())
            .or_insert_with(|| Peer { permits: Arc::new(Semaphore::new(conns_max)), idle: Vec::new() })
    }

    /// Closes the idle connections of every peer that are too old or closed by the peer,
    /// at most every [`SWEEP_EVERY`].
    fn sweep(&mut self, pooled_for: Duration) {
        if self.swept.elapsed() < SWEEP_EVERY {
            return;
        }
        self.swept = Instant::now();
        for peer in self.peers.values_mut() {
            peer.idle.retain(|(conn, since)| usable(conn, *since, pooled_for));
        }
    }
}

fn usable(conn: &Conn, since: Instant, pooled_for: Duration) -> bool {
    since.elapsed() < pooled_for && conn.still_open()
}
