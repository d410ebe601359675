//! The HTTP server under the router: HTTP/1.1 (hyper) over TCP or TLS, with the limits a
//! node exposed to careless or hostile clients needs and `axum::serve` does not offer.
//!
//! - **Connections** are capped ([`ServerConfig::connections_max`]). At the cap, a new
//!   connection makes room by closing the connections that have been idle longest (no
//!   request in flight: keep-alive connections, and clients that connected but sent no
//!   complete request), as nginx does; only when every connection has a request in flight is
//!   the new one refused at once (a `503` with a JSON body, then closed). So thousands of
//!   idle connections never keep a health probe on a fresh connection from its answer, and
//!   the node never runs out of file descriptors.
//! - **Header timeout**: a request's head (and, with TLS, the handshake) must arrive within
//!   [`ServerConfig::header_timeout_ms`] of its first byte; a new connection must send its
//!   first request within that time too (slowloris).
//! - **Idle timeout**: a keep-alive connection with no request for
//!   [`ServerConfig::idle_timeout_ms`] is closed, and so is one whose client stopped reading
//!   the response (no write progress for that long).
//! - **Body timeout**: a request body must arrive whole within
//!   [`ServerConfig::body_timeout_ms`] of its head; past it, reading it fails, the handler
//!   answers `408`, and the connection closes.
//! - **Shutdown** ([`Server::shut_down`], then [`Server::close`]): the listener closes at
//!   once (new connections are refused by the kernel), idle connections close, requests in
//!   flight may finish within a grace period; then every connection left is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits of the HTTP server. Every timeout is in milliseconds.
#[derive(Clone)]
pub struct ServerConfig {
    /// Most open connections; see the module docs for what happens at the cap.
    pub connections_max: usize,
    /// Longest a request's head (and a TLS handshake) may take from its first byte, and a
    /// new connection may wait before sending its first request.
    pub header_timeout_ms: u64,
    /// Longest a keep-alive connection may stay without a request, and a response may make
    /// no write progress because the client stopped reading.
    pub idle_timeout_ms: u64,
    /// Longest a request body may take to arrive whole, counted from its head.
    pub body_timeout_ms: u64,
    /// Serve HTTPS with this configuration (see [`super::tls_config`]); plain HTTP if `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            connections_max: 10_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 60_000,
            tls: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("connections_max", &self.connections_max)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("body_timeout_ms", &self.body_timeout_ms)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The answer to a connection refused at the cap, written without reading anything.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n\
retry-after: 1\r\ncontent-length: 94\r\n\r\n\
{\"kind\":\"overloaded\",\"message\":\"this node has as many connections as it takes; retry later\"}";

/// How long the accept loop pauses after running out of file descriptors, so it does not
/// spin while none is free.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one warning per this many milliseconds about refused connections or accept errors.
const WARN_INTERVAL_MS: u64 = 10_000;

/// A running HTTP server.
pub struct Server {
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    config: ServerConfig,
    /// `now_ms` counts from here.
    epoch: Instant,
    connections: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Stop accepting; connections finish their request in flight and close.
    stopping: CancellationToken,
    /// Close every connection at once; each connection's own token is a child of it.
    closing: CancellationToken,
    /// Signalled whenever a connection goes away.
    gone: Notify,
    refused: AtomicU64,
    last_warning_ms: AtomicU64,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        // Never 0, which stands for "not set" in the connection state.
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Whether a rate-limited warning may be logged now.
    fn may_warn(&self) -> bool {
        let now = self.now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= WARN_INTERVAL_MS)
            && self.last_warning_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Makes room for one more connection; `false` when every connection is busy.
    fn make_room(&self) -> bool {
        let mut connections = self.connections.lock();
        if connections.len() < self.config.connections_max {
            return true;
        }
        // Close the longest-idle connections, a batch at once so that a flood of new
        // connections does not scan the table for each.
        let mut idle: Vec<(u64, u64)> = connections
            .iter()
            .filter(|(_, c)| c.in_flight.load(Ordering::Relaxed) == 0)
            .map(|(id, c)| (c.idle_since_ms.load(Ordering::Relaxed), *id))
            .collect();
        if idle.is_empty() {
            return false;
        }
        let batch = (self.config.connections_max / 64).clamp(1, idle.len());
        if batch < idle.len() {
            idle.select_nth_unstable(batch - 1);
        }
        for (_, id) in &idle[..batch] {
            if let Some(connection) = connections.remove(id) {
                connection.close.cancel();
            }
        }
        tracing::debug!(closed = batch, "closed idle connections to make room for a new one");
        true
    }
}

impl Server {
    /// Serves `router` on `listener` until [`Server::shut_down`]. Must be called within a
    /// tokio runtime.
    pub fn start(listener: TcpListener, router: Router, config: ServerConfig) -> Server {
        let shared = Arc::new(Shared {
            config,
            epoch: Instant::now(),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stopping: CancellationToken::new(),
            closing: CancellationToken::new(),
            gone: Notify::new(),
            refused: AtomicU64::new(0),
            last_warning_ms: AtomicU64::new(0),
        });
        let tls = shared.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let accept = tokio::spawn(accept_loop(shared.clone(), listener, router, tls));
        Server { shared, accept }
    }

    /// Open connections now.
    pub fn connections(&self) -> usize {
        self.shared.connections.lock().len()
    }

    /// Stops accepting (the listener closes) and asks every connection to close once its
    /// request in flight is answered; idle ones close at once.
    pub fn shut_down(&self) {
        self.shared.stopping.cancel();
    }

    /// Shuts down (if not yet), waits up to `grace` for the connections to close, then
    /// closes those left. Returns how many had to be closed that way.
    pub async fn close(self, grace: Duration) -> usize {
        self.shut_down();
        let Server { shared, accept } = self;
        let _ = accept.await;
        let waited = tokio::time::timeout(grace, async {
            loop {
                let gone = shared.gone.notified();
                if shared.connections.lock().is_empty() {
                    return;
                }
                gone.await;
            }
        })
        .await;
        let left = shared.connections.lock().len();
        if waited.is_err() {
            shared.closing.cancel();
        }
        left
    }

    /// Whether the accept loop ended (after a shutdown, or because it panicked).
    pub fn is_finished(&self) -> bool {
        self.accept.is_finished()
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let builder = {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The connection's watchdog times headers and idleness itself (see `ConnState`),
        // since hyper's header timeout also cuts keep-alive connections at that time.
        builder.keep_alive(true).header_read_timeout(None);
        Arc::new(builder)
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shared.stopping.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors (EMFILE, ENFILE) or a connection reset before it was
                // accepted: pause briefly instead of spinning, and go on.
                if shared.may_warn() {
                    tracing::warn!(error = %err, "cannot accept a connection");
                }
                tokio::select! {
                    _ = shared.stopping.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        if !shared.make_room() {
            let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if shared.may_warn() {
                tracing::warn!(
                    refused,
                    connections_max = shared.config.connections_max,
                    "refusing connections: every connection has a request in flight"
                );
            }
            if tls.is_none() {
                // The send buffer of a new connection is empty: this never blocks.
                let _ = stream.try_write(REFUSAL);
            }
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let now = shared.now_ms();
        let state = Arc::new(ConnState {
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(now),
            // A new connection must send its first request within the header timeout.
            input_since_ms: AtomicU64::new(now),
            write_stalled_since_ms: AtomicU64::new(0),
            changed: Notify::new(),
            close: shared.closing.child_token(),
            epoch: shared.epoch,
        });
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.connections.lock().insert(id, state.clone());
        let connection =
            Connection { shared: shared.clone(), state, id, peer, router: router.clone(), builder: builder.clone() };
        tokio::spawn(connection.run(stream, tls.clone()));
    }
    // Dropping the listener here makes the kernel refuse new connections at once.
    drop(listener);
}

/// What the watchdog of one connection knows about it. Times are `Shared::now_ms` values,
/// 0 for "not set".
struct ConnState {
    /// Requests being handled: from their head until their response body is done.
    in_flight: AtomicU32,
    /// When the last request was answered (or the connection opened).
    idle_since_ms: AtomicU64,
    /// When the first byte arrived since the connection went idle.
    input_since_ms: AtomicU64,
    /// Since when a write has been waiting for the client to read.
    write_stalled_since_ms: AtomicU64,
    /// Wakes the watchdog when its deadline may have moved.
    changed: Notify,
    /// Closes this connection at once.
    close: CancellationToken,
    epoch: Instant,
}

impl ConnState {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// When the connection is to be closed, if nothing changes before.
    fn deadline_ms(&self, config: &ServerConfig) -> Option<u64> {
        let mut deadline: Option<u64> = None;
        let stalled = self.write_stalled_since_ms.load(Ordering::Relaxed);
        if stalled != 0 {
            deadline = Some(stalled.saturating_add(config.idle_timeout_ms));
        }
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let input = self.input_since_ms.load(Ordering::Relaxed);
            let idle = if input != 0 {
                input.saturating_add(config.header_timeout_ms)
            } else {
                self.idle_since_ms.load(Ordering::Relaxed).saturating_add(config.idle_timeout_ms)
            };
            deadline = Some(deadline.map_or(idle, |d| d.min(idle)));
        }
        deadline
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.input_since_ms.store(0, Ordering::Relaxed);
    }

    fn request_ended(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.input_since_ms.store(0, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.input_since_ms.load(Ordering::Relaxed) == 0 {
            self.input_since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn write_blocked(&self, blocked: bool) {
        let stalled = self.write_stalled_since_ms.load(Ordering::Relaxed);
        if blocked && stalled == 0 {
            self.write_stalled_since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        } else if !blocked && stalled != 0 {
            self.write_stalled_since_ms.store(0, Ordering::Relaxed);
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    id: u64,
    peer: SocketAddr,
    router: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let watched = Watched { inner: stream, state: self.state.clone() };
        match tls {
            None => self.serve(watched).await,
            Some(acceptor) => {
                let header_timeout = Duration::from_millis(self.shared.config.header_timeout_ms);
                let handshake = tokio::select! {
                    _ = self.state.close.cancelled() => None,
                    _ = self.shared.stopping.cancelled() => None,
                    done = tokio::time::timeout(header_timeout, acceptor.accept(watched)) => match done {
                        Ok(Ok(stream)) => Some(stream),
                        Ok(Err(err)) => {
                            tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                            None
                        }
                    },
                };
                if let Some(stream) = handshake {
                    self.serve(stream).await;
                }
            }
        }
        self.shared.connections.lock().remove(&self.id);
        self.shared.gone.notify_waiters();
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(&self, stream: S) {
        let state = self.state.clone();
        let router = self.router.clone();
        let peer = self.peer;
        let body_timeout = Duration::from_millis(self.shared.config.body_timeout_ms);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            state.request_started();
            let guard = InFlight(Some(state.clone()));
            let deadline = tokio::time::Instant::now() + body_timeout;
            let mut request = request.map(|body| Body::new(DeadlineBody::new(body, deadline)));
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| Body::new(GuardedBody { inner: body, guard })))
            }
        });
        let connection = self.builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::pin!(connection);
        let config = &self.shared.config;
        let mut graceful = false;
        loop {
            let deadline = self.state.deadline_ms(config);
            let sleep = async {
                match deadline {
                    Some(ms) => tokio::time::sleep_until((self.state.epoch + Duration::from_millis(ms)).into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.state.close.cancelled() => {
                    tracing::debug!(peer = %peer, "connection closed by the server");
                    return;
                }
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shared.stopping.cancelled(), if !graceful => {
                    graceful = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = self.state.changed.notified() => {}
                _ = sleep => {
                    if self.state.deadline_ms(config).is_some_and(|d| d <= self.state.now_ms()) {
                        tracing::debug!(peer = %peer, "connection timed out");
                        return;
                    }
                }
            }
        }
    }
}

/// Counts a request as in flight until its response body is done or dropped.
struct InFlight(Option<Arc<ConnState>>);

impl InFlight {
    fn end(&mut self) {
        if let Some(state) = self.0.take() {
            state.request_ended();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

/// A response body that ends its request's time in flight when it is done.
struct GuardedBody {
    inner: Body,
    guard: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = polled {
            self.guard.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body could not be read in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the server's body timeout")]
pub struct BodyTimeout;

/// A request body that fails with [`BodyTimeout`] once its deadline passed.
struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: bool,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: tokio::time::Instant) -> DeadlineBody {
        DeadlineBody { inner, sleep: Box::pin(tokio::time::sleep_until(deadline)), timed_out: false }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if self.timed_out {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.timed_out = true;
                    Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's stream that tells its watchdog when input starts and when output stalls.
struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.state.write_blocked(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.state.write_blocked(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.state.write_blocked(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How many connections may wait in the kernel to be accepted (capped by the kernel's
/// `somaxconn`). The standard library's 128 overflows under a burst of new connections,
/// and each connection refused that way waits a second to try again.
const LISTEN_BACKLOG: u32 = 4_096;

/// A listener on `addr` for [`Server::start`], with room for bursts of new connections.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As the standard library does: a restarted node can bind its port again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The number of connections a node can hold given its file-descriptor limit `nofile`:
/// `preferred`, but never so many that the descriptors the node needs for everything else
/// (Redis connections, files, fibers' threads) run out.
pub fn connections_max_for(nofile: u64, preferred: usize) -> usize {
    // Keep an eighth of the descriptors, and at least 256, for everything else.
    let reserve = (nofile / 8).max(256);
    let usable = usize::try_from(nofile.saturating_sub(reserve)).unwrap_or(usize::MAX);
    preferred.min(usable).max(1)
}
