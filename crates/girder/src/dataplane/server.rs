//! The serving side: accepts connections (at most `conns_max` open), reads requests one
//! after the other on each, and answers each with its handler's response.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::body::{Incoming, Slot};
use super::conn::Conn;
use super::frame::Kind;
use super::{Body, Compression, Counters, DataConfig, DataError, DataStats, Handler, Request, Response};

/// How long `shutdown` lets requests in progress finish before it cuts them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Longest panic message passed on to the requester.
const PANIC_TEXT_BYTES_MAX: usize = 1_024;

/// A data-plane server. Dropping it stops it at once; `shutdown` is gentler.
pub struct DataServer {
    address: std::net::SocketAddr,
    /// Stops accepting; idle connections close.
    stopping: CancellationToken,
    /// Cuts every connection.
    cut: CancellationToken,
    accepting: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    open: Arc<Semaphore>,
    conns_max: u32,
    counters: Arc<Counters>,
}

#[derive(Clone)]
struct Serving {
    config: Arc<DataConfig>,
    handler: Arc<dyn Handler>,
    counters: Arc<Counters>,
    stopping: CancellationToken,
}

impl DataServer {
    /// Listens on `address` and serves requests with `handler`.
    pub async fn bind(address: &str, config: DataConfig, handler: Arc<dyn Handler>) -> Result<DataServer, DataError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| DataError::Io(format!("binding {address}: {e}")))?;
        let local = listener.local_addr().map_err(|e| DataError::Io(e.to_string()))?;
        let conns_max = u32::try_from(config.conns_max.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let open = Arc::new(Semaphore::new(conns_max as usize));
        let (stopping, cut, counters) =
            (CancellationToken::new(), CancellationToken::new(), Arc::<Counters>::default());
        let serving =
            Serving { config: Arc::new(config), handler, counters: counters.clone(), stopping: stopping.clone() };
        let accepting = tokio::spawn(accept(listener, serving, open.clone(), cut.clone()));
        Ok(DataServer {
            address: local,
            stopping,
            cut,
            accepting: tokio::sync::Mutex::new(Some(accepting)),
            open,
            conns_max,
            counters,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// What it moved so far, and its connections.
    pub fn stats(&self) -> DataStats {
        self.counters.stats()
    }

    /// Stops accepting (the listening socket is closed when this returns), closes idle
    /// connections, lets requests in progress finish for a moment, then cuts the rest.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        if let Some(accepting) = self.accepting.lock().await.take() {
            let _ = accepting.await;
        }
        let all = tokio::time::timeout(SHUTDOWN_GRACE, self.open.acquire_many(self.conns_max)).await;
        if all.is_err() {
            tracing::info!(address = %self.address, "data plane: requests still in progress cut at shutdown");
        }
        self.cut.cancel();
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        self.stopping.cancel();
        self.cut.cancel();
    }
}

async fn accept(listener: tokio::net::TcpListener, serving: Serving, open: Arc<Semaphore>, cut: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = serving.stopping.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %err, "data plane: accepting failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "data plane: connection refused, too many open");
            continue;
        };
        let (serving, cut) = (serving.clone(), cut.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = serve(stream, peer, &serving) => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "data plane: connection closed");
                    }
                }
                _ = cut.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Serves the requests of one connection until it closes, idles out, breaks, or the
/// server stops.
async fn serve(stream: tokio::net::TcpStream, peer: std::net::SocketAddr, serving: &Serving) -> Result<(), DataError> {
    let config = &serving.config;
    let frame_timeout = Duration::from_millis(config.frame_timeout_ms);
    let mut conn = Conn::open(stream, config, serving.counters.clone(), frame_timeout).await?;
    let idle = Duration::from_millis(config.idle_timeout_ms);
    loop {
        conn.idle();
        let readable = tokio::select! {
            readable = conn.readable(idle) => readable?,
            _ = serving.stopping.cancelled() => false,
        };
        if !readable {
            conn.say_goodbye().await;
            return Ok(());
        }
        let frame = match conn.read(conn.terms.header_bytes_max.max(4)).await {
            Ok(frame) => frame,
            Err(err @ DataError::TooLarge { .. }) => {
                conn.send_error(&err.to_string()).await;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        match frame.kind {
            Kind::Header => {}
            // Credits the requester granted for the last response after its last chunk.
            Kind::Credit => continue,
            other => return Err(DataError::Protocol(format!("a {other:?} frame instead of a request"))),
        }
        Counters::add(&serving.counters.requests, 1);
        conn = serve_one(conn, frame.payload, frame.reply, peer, serving).await?;
        if serving.stopping.is_cancelled() {
            return Ok(());
        }
    }
}

/// Serves one request whose header was read; the connection back, in step for the next.
async fn serve_one(
    conn: Conn,
    header: bytes::Bytes,
    reply: Compression,
    peer: std::net::SocketAddr,
    serving: &Serving,
) -> Result<Conn, DataError> {
    let slot: Slot = Arc::default();
    let back = {
        let slot = slot.clone();
        Box::new(move |conn: Conn, finished: bool| *slot.lock() = Some((conn, finished)))
    };
    let request = Request { header, body: Body::incoming(Incoming::new(conn, back)), peer };
    let answer = AssertUnwindSafe(serving.handler.handle(request)).catch_unwind().await;
    let returned = slot.lock().take();
    let answer = match answer {
        Ok(response) => Ok(response),
        Err(panic) => {
            let text = panic_text(panic.as_ref());
            tracing::error!(%peer, panic = %text, "data plane: a handler panicked; the request failed");
            Err(format!("the handler panicked: {text}"))
        }
    };
    // A response may hold the request body (it was kept): dropping it hands it back.
    let (returned, answer) = match returned {
        Some(returned) => (returned, answer),
        None => {
            drop(answer);
            let returned = slot.lock().take().ok_or(DataError::Closed)?;
            (returned, Err("the handler kept the request body".to_owned()))
        }
    };
    let (mut conn, finished) = returned;
    respond(&mut conn, answer, reply, finished).await?;
    Ok(conn)
}

/// Sends the answer: the response's header, the rest of the request body discarded if the
/// handler did not read it, then the response body; or an error, and the connection closes.
async fn respond(
    conn: &mut Conn,
    answer: Result<Response, String>,
    reply: Compression,
    finished: bool,
) -> Result<(), DataError> {
    let response = match answer {
        Ok(response) if response.header.len() <= conn.terms.header_bytes_max => Ok(response),
        Ok(response) => Err(format!("a response header of {} bytes", response.header.len())),
        Err(why) => Err(why),
    };
    let response = match response {
        Ok(response) => response,
        Err(why) => {
            conn.send_error(&why).await;
            // Closing now, with request frames unread, could make the requester's system
            // drop the error unread: read on until the requester, having read it, closes.
            if !finished {
                let _ = conn.discard_body().await;
            }
            return Err(DataError::Remote(why));
        }
    };
    conn.send(Kind::Header, &response.header, reply).await?;
    if !finished {
        // The requester stops sending once it reads the header (it has no more credits)
        // and ends its body there: the connection is then in step again.
        conn.flush().await?;
        conn.discard_body().await?;
    }
    match conn.send_body(response.body, reply, false).await? {
        None => Ok(()),
        Some(frame) => Err(DataError::Protocol(format!("a {:?} frame while a response was sent", frame.kind))),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => text,
        (_, Some(text)) => text.as_str(),
        _ => "(no message)",
    };
    let mut end = text.len().min(PANIC_TEXT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
