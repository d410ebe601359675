//! The serving side: accepts connections (at most `conns_max`), reads requests one after
//! the other on each, and answers each with its handler's response.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::body::{Conn, Incoming, Slot};
use super::client::handshake;
use super::frame::Kind;
use super::{Body, Compression, Counters, DataConfig, DataError, Handler, Request, Response};

/// How long `shutdown` lets requests in progress finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A data-plane server.
pub struct DataServer {
    address: std::net::SocketAddr,
    cancel: CancellationToken,
    accepting: Mutex<Option<tokio::task::JoinHandle<()>>>,
    open: Arc<Semaphore>,
    conns_max: usize,
}

impl DataServer {
    /// Listens on `address` and serves requests with `handler`.
    pub async fn bind(address: &str, config: DataConfig, handler: Arc<dyn Handler>) -> Result<DataServer, DataError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| DataError::Io(format!("binding {address}: {e}")))?;
        let local = listener.local_addr().map_err(|e| DataError::Io(e.to_string()))?;
        let cancel = CancellationToken::new();
        let open = Arc::new(Semaphore::new(config.conns_max.max(1)));
        let conns_max = config.conns_max.max(1);
        let serving = Serving { config: Arc::new(config), handler, counters: Arc::default(), cancel: cancel.clone() };
        let accepting = tokio::spawn(accept(listener, serving, open.clone()));
        Ok(DataServer { address: local, cancel, accepting: Mutex::new(Some(accepting)), open, conns_max })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Stops accepting, lets requests in progress finish for a moment, then cuts every
    /// connection.
    pub async fn shutdown(&self) {
        if let Some(accepting) = self.accepting.lock().take() {
            accepting.abort();
        }
        let all = u32::try_from(self.conns_max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.open.acquire_many(all)).await;
        self.cancel.cancel();
    }
}

#[derive(Clone)]
struct Serving {
    config: Arc<DataConfig>,
    handler: Arc<dyn Handler>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
}

async fn accept(listener: tokio::net::TcpListener, serving: Serving, open: Arc<Semaphore>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of file descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "data plane: connection refused, too many open");
            continue;
        };
        let serving = serving.clone();
        tokio::spawn(async move {
            let cancel = serving.cancel.clone();
            tokio::select! {
                result = serve(stream, peer, &serving) => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "data plane: connection closed");
                    }
                }
                _ = cancel.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Serves the requests of one connection until it closes, idles out or breaks.
async fn serve(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    serving: &Serving,
) -> Result<(), DataError> {
    let config = &serving.config;
    stream.set_nodelay(true).map_err(super::frame::io)?;
    let frame_timeout = Duration::from_millis(config.frame_timeout_ms);
    let peer_window = tokio::time::timeout(frame_timeout, handshake(&mut stream, config.window_frames))
        .await
        .map_err(|_| DataError::Timeout("no handshake".into()))??;
    let limits = (config.window_frames.max(1), peer_window, config.chunk(), frame_timeout);
    let mut conn = Conn::new(stream, limits, serving.counters.clone());
    let idle = Duration::from_millis(config.idle_timeout_ms);
    loop {
        let read = tokio::time::timeout(idle, super::frame::read(&mut conn.reader, config.header_bytes_max));
        let (header, reply) = match read.await {
            Err(_) | Ok(Err(DataError::Closed)) => return Ok(()),
            Ok(Err(err)) => return Err(err),
            Ok(Ok(frame)) if frame.kind == Kind::Header => (frame.payload, frame.reply),
            // Credits the requester granted for the last response's end, which needed none.
            Ok(Ok(frame)) if frame.kind == Kind::Credit => continue,
            Ok(Ok(frame)) => return Err(DataError::Protocol(format!("a {:?} frame before a header", frame.kind))),
        };
        let slot: Slot = Arc::default();
        let back = {
            let slot = slot.clone();
            Box::new(move |conn: Conn, finished: bool| *slot.lock() = Some((conn, finished)))
        };
        let body = Body::incoming(Incoming::new(conn, back));
        let request = Request { header, body, peer };
        let answer = AssertUnwindSafe(serving.handler.handle(request)).catch_unwind().await;
        // The request body gave the connection back when it was read or dropped.
        let Some((returned, finished)) = slot.lock().take() else { return Ok(()) };
        conn = returned;
        match answer {
            Ok(response) => respond(&mut conn, response, reply).await?,
            Err(_) => {
                tracing::error!(%peer, "data plane: a handler panicked; the request failed");
                conn.write(Kind::Error, b"the handler panicked", Compression::None).await?;
                conn.flush().await?;
                return Ok(());
            }
        }
        if !finished {
            // Part of the request body is still on the wire: the connection cannot be reused.
            return Ok(());
        }
    }
}

/// Sends `response`, its body compressed as the requester asked.
async fn respond(conn: &mut Conn, response: Response, compression: Compression) -> Result<(), DataError> {
    conn.write(Kind::Header, &response.header, Compression::None).await?;
    match conn.send_body(response.body, compression).await? {
        None => Ok(()),
        Some(frame) => Err(DataError::Protocol(format!("a {:?} frame while a response was sent", frame.kind))),
    }
}
