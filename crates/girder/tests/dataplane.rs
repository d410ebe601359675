//! The data plane over real loopback sockets: bodies both ways under every compression,
//! credits that bound what a sender produces, connection limits, and peers that misbehave.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use girder::dataplane::{Body, Compression, DataClient, DataConfig, DataError, DataServer, Handler, Request, Response};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers with the request's header and its body, byte for byte.
struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn handle(&self, request: Request) -> Response {
        match request.body.collect(256 << 20).await {
            Ok(body) => Response { header: request.header, body: Body::from_bytes(body) },
            Err(err) => Response { header: Bytes::from(format!("error: {err}")), body: Body::empty() },
        }
    }
}

async fn server(handler: impl Handler, config: DataConfig) -> (DataServer, String) {
    let server = DataServer::bind("127.0.0.1:0", config, Arc::new(handler)).await.expect("binds");
    let address = server.local_addr().to_string();
    (server, address)
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_round_trip_both_ways_under_every_compression() {
    let config = DataConfig { chunk_bytes: 64 << 10, ..DataConfig::default() };
    let (server, address) = server(Echo, config.clone()).await;
    let client = DataClient::new(config);
    let random = Bytes::from((0..300_000).map(|_| fastrand::u8(..)).collect::<Vec<u8>>());
    let text = Bytes::from("girder moves bytes node to node. ".repeat(20_000));
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for body in [Bytes::new(), Bytes::from_static(b"x"), pattern(64 << 10, 1), random.clone(), text.clone()] {
            let response = client
                .request(&address, Bytes::from_static(b"hdr"), Body::from_bytes(body.clone()), compression)
                .await
                .unwrap_or_else(|e| panic!("{compression:?}, {} bytes: {e}", body.len()));
            assert_eq!(&response.header[..], b"hdr");
            assert_eq!(response.body.collect(1 << 30).await.unwrap(), body, "{compression:?}, {} bytes", body.len());
        }
    }
    let stats = client.stats();
    assert!(stats.wire_bytes_sent < stats.raw_bytes_sent, "compression saved nothing: {stats:?}");
    server.shutdown().await;
}

/// A handler the test keeps a handle on.
struct Shared<T>(Arc<T>);

/// Takes chunks only when the test lets it, counting what it took.
struct Gate {
    open: tokio::sync::Semaphore,
    taken: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for Shared<Gate> {
    async fn handle(&self, mut request: Request) -> Response {
        let gate = &self.0;
        loop {
            let Ok(permit) = gate.open.acquire().await else { break };
            permit.forget();
            match request.body.next().await {
                Some(Ok(_)) => {
                    gate.taken.fetch_add(1, Ordering::SeqCst);
                }
                _ => break,
            }
        }
        Response { header: Bytes::from(gate.taken.load(Ordering::SeqCst).to_string()), body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_takes_nothing_holds_the_sender_to_its_window() {
    let window = 4;
    let config = DataConfig { chunk_bytes: 1 << 20, window_frames: window, ..DataConfig::default() };
    let gate = Arc::new(Gate { open: tokio::sync::Semaphore::new(0), taken: AtomicUsize::new(0) });
    let (server, address) = server(Shared(gate.clone()), config.clone()).await;
    let client = DataClient::new(config);
    let produced = Arc::new(AtomicUsize::new(0));
    let chunks = 64; // 64 MiB in all
    let stream = {
        let produced = produced.clone();
        futures::stream::iter((0..chunks).map(move |i| {
            produced.fetch_add(1, Ordering::SeqCst);
            Ok(pattern(1 << 20, i as u8))
        }))
    };
    let request = tokio::spawn({
        let client = client.clone();
        async move { client.request(&address, Bytes::new(), Body::from_stream(stream), Compression::None).await }
    });
    // Nothing is taken: the sender may produce its window (and the chunk that waits for a
    // credit), never more, however long it is left alone.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(300) {
        let now = produced.load(Ordering::SeqCst);
        assert!(now <= window as usize + 1, "the sender produced {now} chunks with a window of {window}");
        tokio::task::yield_now().await;
    }
    // Let everything through: all 64 chunks arrive.
    gate.open.add_permits(chunks + 1);
    let response = request.await.unwrap().unwrap();
    assert_eq!(&response.header[..], chunks.to_string().as_bytes());
    server.shutdown().await;
}

/// Counts the connections it serves at once.
struct Counting {
    peers: Mutex<HashSet<std::net::SocketAddr>>,
    open: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for Shared<Counting> {
    async fn handle(&self, request: Request) -> Response {
        let counting = &self.0;
        counting.peers.lock().insert(request.peer);
        let now = counting.open.fetch_add(1, Ordering::SeqCst) + 1;
        counting.peak.fetch_max(now, Ordering::SeqCst);
        tokio::task::yield_now().await;
        let body = request.body.collect(1 << 20).await.unwrap_or_default();
        counting.open.fetch_sub(1, Ordering::SeqCst);
        Response { header: Bytes::new(), body: Body::from_bytes(body) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_a_bounded_pool_of_connections() {
    let config = DataConfig { conns_per_peer_max: 4, ..DataConfig::default() };
    let counting = Arc::new(Counting { peers: Mutex::default(), open: AtomicUsize::new(0), peak: AtomicUsize::new(0) });
    let (server, address) = server(Shared(counting.clone()), config.clone()).await;
    let client = DataClient::new(config);
    let requests = (0..32u8).map(|i| {
        let (client, address) = (client.clone(), address.clone());
        async move {
            let body = pattern(100_000, i);
            let response =
                client.request(&address, Bytes::new(), Body::from_bytes(body.clone()), Compression::Lz4).await?;
            assert_eq!(response.body.collect(1 << 20).await?, body);
            Ok::<(), DataError>(())
        }
    });
    for result in futures::future::join_all(requests).await {
        result.unwrap();
    }
    assert!(counting.peak.load(Ordering::SeqCst) <= 4, "{} requests at once", counting.peak.load(Ordering::SeqCst));
    assert!(counting.peers.lock().len() <= 4, "{} connections opened", counting.peers.lock().len());
    server.shutdown().await;
}

struct Panics;

#[async_trait::async_trait]
impl Handler for Panics {
    async fn handle(&self, request: Request) -> Response {
        if &request.header[..] == b"panic" {
            panic!("a handler bug");
        }
        Response { header: request.header, body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_fails_its_request_and_the_server_goes_on() {
    let (server, address) = server(Panics, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    let failed = client.request(&address, Bytes::from_static(b"panic"), Body::empty(), Compression::None).await;
    assert!(matches!(failed, Err(DataError::Remote(_))), "{:?}", failed.err());
    let ok = client.request(&address, Bytes::from_static(b"fine"), Body::empty(), Compression::None).await.unwrap();
    assert_eq!(&ok.header[..], b"fine");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_strangers_are_cut_off_without_harm() {
    let (server, address) = server(Echo, DataConfig::default()).await;
    // Not a girder peer: the server closes the connection.
    let mut stranger = tokio::net::TcpStream::connect(&address).await.unwrap();
    stranger.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stranger.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server kept a stranger's connection open");
    // The right greeting, then a frame with a bad checksum: cut off as well.
    let mut liar = tokio::net::TcpStream::connect(&address).await.unwrap();
    liar.write_all(b"GRDP\x00\x01\x08\x00\x00\x00").await.unwrap();
    let mut hello = [0u8; 10];
    liar.read_exact(&mut hello).await.unwrap();
    let mut frame = vec![1u8, 0, 3, 0, 0, 0, 3, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    frame.extend_from_slice(b"hdr");
    liar.write_all(&frame).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), liar.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server kept a connection that sent a corrupt frame");
    // A client that only talks to girder peers says what is wrong with a stranger.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_address = other.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        if let Ok((mut socket, _)) = other.accept().await {
            let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        }
    });
    let client = DataClient::new(DataConfig::default());
    let refused = client.request(&other_address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(matches!(refused, Err(DataError::Protocol(_) | DataError::Closed)), "{:?}", refused.err());
    // The real server still serves.
    let ok = client.request(&address, Bytes::from_static(b"ok"), Body::empty(), Compression::None).await.unwrap();
    assert_eq!(&ok.header[..], b"ok");
    server.shutdown().await;
}

struct Silent;

#[async_trait::async_trait]
impl Handler for Silent {
    async fn handle(&self, _request: Request) -> Response {
        futures::future::pending::<()>().await;
        Response { header: Bytes::new(), body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_timeouts_hold() {
    let config = DataConfig { frame_timeout_ms: 300, header_bytes_max: 1_024, ..DataConfig::default() };
    let (silent, silent_address) = server(Silent, config.clone()).await;
    let client = DataClient::new(config.clone());
    let begun = Instant::now();
    let stalled = client.request(&silent_address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(matches!(stalled, Err(DataError::Timeout(_))), "{:?}", stalled.err());
    assert!(begun.elapsed() < Duration::from_secs(3), "the timeout took {:?}", begun.elapsed());
    let huge = client.request(&silent_address, Bytes::from(vec![0u8; 2_048]), Body::empty(), Compression::None).await;
    assert!(matches!(huge, Err(DataError::TooLarge { .. })), "{:?}", huge.err());
    silent.shutdown().await;
    // A body over what its reader takes is refused without being buffered whole.
    let (echo, address) = server(Echo, config).await;
    let response = client.request(&address, Bytes::new(), Body::from_bytes(pattern(3 << 20, 7)), Compression::None);
    let over = response.await.unwrap().body.collect(1 << 20).await;
    assert!(matches!(over, Err(DataError::TooLarge { .. })), "{:?}", over.err());
    // The connection of an abandoned body is not reused: the next request is whole.
    let next =
        client.request(&address, Bytes::from_static(b"again"), Body::from_bytes(pattern(10, 1)), Compression::None);
    let next = next.await.unwrap();
    assert_eq!(&next.header[..], b"again");
    assert_eq!(next.body.collect(1 << 20).await.unwrap(), pattern(10, 1));
    echo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_not_used_broken() {
    let config = DataConfig { idle_timeout_ms: 100, ..DataConfig::default() };
    let (server, address) = server(Echo, config).await;
    // The client keeps connections longer than the server does.
    let client = DataClient::new(DataConfig::default());
    for round in 0..3u8 {
        let body = pattern(1_000, round);
        let response = client.request(&address, Bytes::new(), Body::from_bytes(body.clone()), Compression::None);
        let response = response.await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(response.body.collect(1 << 20).await.unwrap(), body);
        // Long enough for the server to close the idle connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    server.shutdown().await;
}
