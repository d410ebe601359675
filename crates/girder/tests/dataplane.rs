//! The data plane over real loopback sockets: bodies both ways under every compression,
//! credits that bound what a sender produces, connection limits, early answers, and peers
//! that misbehave or stall.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use girder::dataplane::{Body, Compression, DataClient, DataConfig, DataError, DataServer, Handler, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// A handler the test keeps a handle on.
struct Shared<T>(Arc<T>);

async fn start(handler: impl Handler, config: DataConfig) -> (DataServer, String) {
    let server = DataServer::bind("127.0.0.1:0", config, Arc::new(handler)).await.expect("binds");
    let address = server.local_addr().to_string();
    (server, address)
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

async fn echo(client: &DataClient, address: &str, body: Bytes, compression: Compression) -> Result<Bytes, DataError> {
    let response = client.request(address, Bytes::from_static(b"hdr"), Body::from_bytes(body), compression).await?;
    assert_eq!(&response.header[..], b"hdr");
    response.body.collect(1 << 30).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_round_trip_both_ways_under_every_compression() {
    // The server takes smaller chunks than the client sends: the client sends the smaller.
    let (server, address) = start(Echo, DataConfig { chunk_bytes: 16 << 10, ..DataConfig::default() }).await;
    let client = DataClient::new(DataConfig { chunk_bytes: 64 << 10, ..DataConfig::default() });
    let random = Bytes::from((0..300_000).map(|_| fastrand::u8(..)).collect::<Vec<u8>>());
    let text = Bytes::from("girder moves bytes node to node. ".repeat(20_000));
    let bodies = [Bytes::new(), Bytes::from_static(b"x"), pattern(64 << 10, 1), random.clone(), text.clone()];
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for body in &bodies {
            let back = echo(&client, &address, body.clone(), compression).await;
            let back = back.unwrap_or_else(|e| panic!("{compression:?}, {} bytes: {e}", body.len()));
            assert_eq!(&back, body, "{compression:?}, {} bytes", body.len());
        }
        // Text shrinks both ways; random bytes go raw (a header per frame, no more).
        let before = client.stats();
        echo(&client, &address, text.clone(), compression).await.unwrap();
        let mid = client.stats();
        echo(&client, &address, random.clone(), compression).await.unwrap();
        let after = client.stats();
        let (sent, received) =
            (mid.wire_bytes_sent - before.wire_bytes_sent, mid.wire_bytes_received - before.wire_bytes_received);
        if compression == Compression::None {
            assert!(sent > text.len() as u64 && received > text.len() as u64, "{sent} {received}");
        } else {
            assert!(
                sent < text.len() as u64 / 4 && received < text.len() as u64 / 4,
                "{compression:?}: {sent} {received}"
            );
        }
        let overhead = (after.wire_bytes_sent - mid.wire_bytes_sent) as f64 / random.len() as f64;
        assert!((1.0..1.01).contains(&overhead), "{compression:?}: random bytes took {overhead}x on the wire");
    }
    // One connection carried every request, one after the other.
    assert_eq!((client.stats().conns_opened, server.stats().conns_opened), (1, 1));
    server.shutdown().await;
}

/// Takes chunks when the test lets it (or always, if open), counting and checking them.
struct Gate {
    permits: tokio::sync::Semaphore,
    taken: AtomicUsize,
    /// Chunks the client's stream produced.
    produced: Arc<AtomicUsize>,
    /// Most chunks produced and not yet taken, seen when one was taken.
    ahead_max: AtomicUsize,
}

impl Gate {
    fn new(permits: usize) -> Arc<Gate> {
        Arc::new(Gate {
            permits: tokio::sync::Semaphore::new(permits),
            taken: AtomicUsize::new(0),
            produced: Arc::default(),
            ahead_max: AtomicUsize::new(0),
        })
    }

    /// A body of `chunks` chunks of `bytes`, produced on demand and counted.
    fn body(&self, chunks: usize, bytes: usize) -> Body {
        let produced = self.produced.clone();
        Body::from_stream(futures::stream::iter((0..chunks).map(move |i| {
            produced.fetch_add(1, Ordering::SeqCst);
            Ok(pattern(bytes, i as u8))
        })))
    }
}

#[async_trait::async_trait]
impl Handler for Shared<Gate> {
    async fn handle(&self, mut request: Request) -> Response {
        let gate = &self.0;
        let mut bad = 0;
        loop {
            let Ok(permit) = gate.permits.acquire().await else { break };
            permit.forget();
            let Some(Ok(chunk)) = request.body.next().await else { break };
            let taken = gate.taken.fetch_add(1, Ordering::SeqCst);
            let ahead = gate.produced.load(Ordering::SeqCst) - taken;
            gate.ahead_max.fetch_max(ahead, Ordering::SeqCst);
            if chunk != pattern(chunk.len(), taken as u8) {
                bad += 1;
            }
            // A consumer a little slower than the producer, so that credits are what holds
            // the producer back.
            tokio::task::yield_now().await;
        }
        Response { header: Bytes::from(format!("{} {bad}", gate.taken.load(Ordering::SeqCst))), body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_consumed_chunk_by_chunk_within_the_window() {
    let window = 4;
    let config = DataConfig { window_frames: window, ..DataConfig::default() };
    let gate = Gate::new(usize::MAX >> 4);
    let (server, address) = start(Shared(gate.clone()), config.clone()).await;
    let client = DataClient::new(config);
    let body = gate.body(64, 1 << 20); // 64 MiB
    let response = client.request(&address, Bytes::new(), body, Compression::None).await.unwrap();
    assert_eq!(&response.header[..], b"64 0", "chunks taken, and how many were wrong");
    // Ahead of the consumer: at most the window in flight, the chunk waiting for a credit,
    // and the one taken but not yet counted.
    let ahead = gate.ahead_max.load(Ordering::SeqCst);
    assert!(ahead <= window as usize + 2, "the producer ran {ahead} chunks ahead with a window of {window}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_takes_nothing_holds_the_sender_to_its_window() {
    // Small chunks, so that a window of them fits in the sockets' buffers: the sender waits
    // for credits, not for the kernel.
    let (window, chunk) = (4, 64 << 10);
    let config = DataConfig { window_frames: window, chunk_bytes: chunk, ..DataConfig::default() };
    let gate = Gate::new(0);
    let (server, address) = start(Shared(gate.clone()), config.clone()).await;
    let client = DataClient::new(config);
    let chunks = 64;
    let mut request = tokio::spawn({
        let (client, body) = (client.clone(), gate.body(chunks, chunk));
        async move { client.request(&address, Bytes::new(), body, Compression::None).await }
    });
    // Nothing is taken: the sender produces its window and the chunk that waits for a
    // credit, then waits, however long it is left alone.
    until("the sender fills its window", || gate.produced.load(Ordering::SeqCst) > window as usize).await;
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut request).await;
    assert!(waited.is_err(), "the request ended while its receiver took nothing");
    let produced = gate.produced.load(Ordering::SeqCst);
    assert_eq!(produced, window as usize + 1, "the sender produced {produced} chunks with a window of {window}");
    // Let everything through: all 64 chunks arrive, intact.
    gate.permits.add_permits(chunks + 1);
    let response = request.await.unwrap().unwrap();
    assert_eq!(&response.header[..], format!("{chunks} 0").as_bytes());
    server.shutdown().await;
}

/// Counts the requests it serves at once.
#[derive(Default)]
struct Counting {
    open: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for Shared<Counting> {
    async fn handle(&self, request: Request) -> Response {
        let counting = &self.0;
        let now = counting.open.fetch_add(1, Ordering::SeqCst) + 1;
        counting.peak.fetch_max(now, Ordering::SeqCst);
        let body = request.body.collect(1 << 20).await.unwrap_or_default();
        // Long enough for requests to overlap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        counting.open.fetch_sub(1, Ordering::SeqCst);
        Response { header: request.header, body: Body::from_bytes(body) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_a_bounded_pool_of_connections() {
    let config = DataConfig { conns_per_peer_max: 4, chunk_bytes: 16 << 10, ..DataConfig::default() };
    let counting = Arc::new(Counting::default());
    let (server, address) = start(Shared(counting.clone()), config.clone()).await;
    let client = DataClient::new(config);
    let requests = (0..32u8).map(|i| {
        let (client, address) = (client.clone(), address.clone());
        async move {
            let body = pattern(100_000, i);
            assert_eq!(echo(&client, &address, body.clone(), Compression::Lz4).await?, body);
            Ok::<(), DataError>(())
        }
    });
    for result in futures::future::join_all(requests).await {
        result.unwrap();
    }
    let peak = counting.peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "{peak} requests at once");
    let accepted = server.stats().conns_opened;
    assert!((2..=4).contains(&accepted), "the server accepted {accepted} connections");
    assert_eq!(client.stats().conns_opened, accepted);
    assert_eq!(server.stats().requests, 32);
    server.shutdown().await;
}

struct Panics;

#[async_trait::async_trait]
impl Handler for Panics {
    async fn handle(&self, mut request: Request) -> Response {
        if &request.header[..] == b"panic" {
            panic!("a handler bug");
        }
        if &request.header[..] == b"read a little, then panic" {
            let _ = request.body.next().await;
            panic!("another handler bug");
        }
        Response { header: request.header, body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_fails_its_request_and_the_server_goes_on() {
    let (server, address) = start(Panics, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    let failed = client.request(&address, Bytes::from_static(b"panic"), Body::empty(), Compression::None).await;
    assert!(matches!(&failed, Err(DataError::Remote(why)) if why.contains("a handler bug")), "{:?}", failed.err());
    // With a large body it did not read: still an answer, not a broken pipe.
    let header = Bytes::from_static(b"read a little, then panic");
    let failed = client.request(&address, header, Body::from_bytes(pattern(32 << 20, 1)), Compression::None).await;
    assert!(matches!(failed, Err(DataError::Remote(_))), "{:?}", failed.err());
    let ok = client.request(&address, Bytes::from_static(b"fine"), Body::empty(), Compression::None).await.unwrap();
    assert_eq!(&ok.header[..], b"fine");
    server.shutdown().await;
}

/// Answers at once with a body of its own, whatever the request body.
struct Early;

#[async_trait::async_trait]
impl Handler for Early {
    async fn handle(&self, request: Request) -> Response {
        drop(request.body);
        Response { header: Bytes::from_static(b"early"), body: Body::from_bytes(pattern(3 << 20, 9)) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_arrives_whole_and_the_connection_stays_usable() {
    let (server, address) = start(Early, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    for body in [Body::from_bytes(pattern(64 << 20, 1)), Body::from_bytes(pattern(10, 1)), Body::empty()] {
        let response = client.request(&address, Bytes::new(), body, Compression::None).await.unwrap();
        assert_eq!(&response.header[..], b"early");
        assert_eq!(response.body.collect(8 << 20).await.unwrap(), pattern(3 << 20, 9));
    }
    assert_eq!(client.stats().conns_opened, 1, "a connection was not reused after an early answer");
    // Far less than the 64 MiB offered crossed the wire.
    assert!(client.stats().wire_bytes_sent < 16 << 20, "{:?}", client.stats());
    server.shutdown().await;
}

/// A producer that fails after a few chunks.
fn failing_body() -> Body {
    let chunks = (0..4).map(|i| if i < 3 { Ok(pattern(1_000, i)) } else { Err(DataError::Io("disk on fire".into())) });
    Body::from_stream(futures::stream::iter(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_producer_fails_the_transfer_on_both_sides() {
    let (server, address) = start(Echo, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    let failed = client.request(&address, Bytes::new(), failing_body(), Compression::None).await;
    assert!(matches!(&failed, Err(DataError::Io(why)) if why == "disk on fire"), "{:?}", failed.err());
    struct Fails;
    #[async_trait::async_trait]
    impl Handler for Fails {
        async fn handle(&self, _request: Request) -> Response {
            Response { header: Bytes::new(), body: failing_body() }
        }
    }
    let (failing, failing_address) = start(Fails, DataConfig::default()).await;
    let response = client.request(&failing_address, Bytes::new(), Body::empty(), Compression::None).await.unwrap();
    let failed = response.body.collect(1 << 20).await;
    assert!(matches!(&failed, Err(DataError::Remote(why)) if why.contains("disk on fire")), "{:?}", failed.err());
    // Both servers go on.
    assert_eq!(echo(&client, &address, pattern(10, 3), Compression::None).await.unwrap(), pattern(10, 3));
    let again = client.request(&failing_address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(again.is_ok(), "{:?}", again.err());
    failing.shutdown().await;
    server.shutdown().await;
}

/// A frame as the protocol writes it (see `dataplane/frame.rs`).
fn raw_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![kind, flags];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame), payload);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

const HELLO: &[u8; 14] = b"GRDP\x00\x02\x08\x00\x00\x00\x00\x00\x10\x00";

/// A raw connection that greeted the server as a girder peer would.
async fn greeted(address: &str) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.unwrap();
    socket.write_all(HELLO).await.unwrap();
    let mut hello = [0u8; 14];
    socket.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..6], &HELLO[..6]);
    socket
}

/// Whether the server closes `socket` (soon), and what it sent before.
async fn closed_by_server(mut socket: TcpStream) -> Option<Vec<u8>> {
    let mut sent = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut sent)).await {
        Ok(_) => Some(sent),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_strangers_are_cut_off_without_harm() {
    let config = DataConfig { header_bytes_max: 1_024, ..DataConfig::default() };
    let (server, address) = start(Echo, config).await;
    // Not a girder peer, or another version of the protocol: the server closes.
    for greeting in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"GRDP\x00\x09\x08\x00\x00\x00\x00\x00\x10\x00"] {
        let mut stranger = TcpStream::connect(&address).await.unwrap();
        stranger.write_all(greeting).await.unwrap();
        assert!(closed_by_server(stranger).await.is_some(), "the server kept a stranger's connection");
    }
    // The right greeting, then garbage; then a header with a bad checksum: cut off.
    let mut garbage = greeted(&address).await;
    garbage.write_all(&[0xff; 64]).await.unwrap();
    assert!(closed_by_server(garbage).await.is_some(), "the server kept a connection that sent garbage");
    let mut liar = greeted(&address).await;
    let mut frame = raw_frame(1, 0, b"hdr");
    frame[12] ^= 1;
    liar.write_all(&frame).await.unwrap();
    assert!(closed_by_server(liar).await.is_some(), "the server kept a connection that sent a corrupt frame");
    // A header over the server's limit: it says so, and closes.
    let mut oversize = greeted(&address).await;
    oversize.write_all(&raw_frame(1, 0, &[b'h'; 2_000])).await.unwrap();
    let said = closed_by_server(oversize).await.expect("the server kept a connection that sent a huge header");
    assert!(said.len() > 14 && said[0] == 5, "no error frame: {said:?}");
    // A client that only talks to girder peers says what is wrong with a stranger.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_address = other.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        if let Ok((mut socket, _)) = other.accept().await {
            let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            let _ = socket.read(&mut [0u8; 64]).await;
        }
    });
    let client = DataClient::new(DataConfig::default());
    let refused = client.request(&other_address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(matches!(refused, Err(DataError::Protocol(_))), "{:?}", refused.err());
    // And a header over its own limit is refused before anything is sent.
    let small = DataClient::new(DataConfig { header_bytes_max: 1_024, ..DataConfig::default() });
    let huge = small.request(&address, Bytes::from(vec![0u8; 2_048]), Body::empty(), Compression::None).await;
    assert!(matches!(huge, Err(DataError::TooLarge { what: "header", bytes: 2_048, .. })), "{:?}", huge.err());
    // The real server still serves.
    assert_eq!(echo(&client, &address, pattern(10, 1), Compression::None).await.unwrap(), pattern(10, 1));
    assert_eq!(server.stats().conns_open, 1, "the cut-off connections are still open");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_its_connection_limit_closes_new_ones_at_once() {
    let (server, address) = start(Echo, DataConfig { conns_max: 2, ..DataConfig::default() }).await;
    let first = greeted(&address).await;
    let _second = greeted(&address).await;
    let third = TcpStream::connect(&address).await.unwrap();
    assert_eq!(closed_by_server(third).await, Some(Vec::new()), "a connection over the limit was served");
    drop(first);
    until("the server closes the first connection", || server.stats().conns_open == 1).await;
    let client = DataClient::new(DataConfig::default());
    assert_eq!(echo(&client, &address, pattern(10, 1), Compression::None).await.unwrap(), pattern(10, 1));
    server.shutdown().await;
}

/// Reports what its request body ended with.
struct Reports(tokio::sync::mpsc::Sender<(Result<usize, DataError>, Instant)>);

#[async_trait::async_trait]
impl Handler for Reports {
    async fn handle(&self, mut request: Request) -> Response {
        let mut total = 0;
        let ended = loop {
            match request.body.next().await {
                Some(Ok(chunk)) => total += chunk.len(),
                Some(Err(err)) => break Err(err),
                None => break Ok(total),
            }
        };
        let _ = self.0.send((ended, Instant::now())).await;
        Response { header: Bytes::new(), body: Body::empty() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_mid_body_is_cut_off_after_the_frame_timeout() {
    let timeout = Duration::from_millis(300);
    let config = DataConfig { frame_timeout_ms: 300, ..DataConfig::default() };
    // A requester that stalls halfway through a chunk: the handler's body times out.
    let (reports, mut reported) = tokio::sync::mpsc::channel(1);
    let (server, address) = start(Reports(reports), config.clone()).await;
    let mut stalled = greeted(&address).await;
    stalled.write_all(&raw_frame(1, 0, b"hdr")).await.unwrap();
    let chunk = raw_frame(2, 0, &[7u8; 1_000]);
    stalled.write_all(&chunk[..500]).await.unwrap();
    let begun = Instant::now();
    let (ended, at) = reported.recv().await.unwrap();
    assert!(matches!(ended, Err(DataError::Timeout(_))), "{ended:?}");
    let took = at - begun;
    assert!(took >= timeout - Duration::from_millis(50) && took < timeout * 3, "the timeout took {took:?}");
    drop(stalled);
    // A server that answers, then stalls halfway through its body: the reader times out.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_address = fake.local_addr().unwrap().to_string();
    let serving = tokio::spawn(async move {
        let (mut socket, _) = fake.accept().await.unwrap();
        socket.write_all(HELLO).await.unwrap();
        let mut request = [0u8; 14 + 14 + 3 + 14]; // greeting, header "hdr", end
        socket.read_exact(&mut request).await.unwrap();
        socket.write_all(&raw_frame(1, 0, b"answer")).await.unwrap();
        socket.write_all(&raw_frame(2, 0, &[1u8; 100])).await.unwrap();
        socket.write_all(&raw_frame(2, 0, &[2u8; 1_000])[..600]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let client = DataClient::new(config);
    let mut response =
        client.request(&fake_address, Bytes::from_static(b"hdr"), Body::empty(), Compression::None).await.unwrap();
    assert_eq!(&response.header[..], b"answer");
    assert_eq!(response.body.next().await.unwrap().unwrap(), vec![1u8; 100]);
    let begun = Instant::now();
    let stalled = response.body.next().await.unwrap();
    assert!(matches!(stalled, Err(DataError::Timeout(_))), "{stalled:?}");
    assert!(begun.elapsed() < timeout * 3, "the timeout took {:?}", begun.elapsed());
    serving.abort();
    // A handler that never answers: the requester times out as well.
    struct Silent;
    #[async_trait::async_trait]
    impl Handler for Silent {
        async fn handle(&self, _request: Request) -> Response {
            futures::future::pending().await
        }
    }
    let (silent, silent_address) = start(Silent, DataConfig::default()).await;
    let begun = Instant::now();
    let stalled = client.request(&silent_address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(matches!(stalled, Err(DataError::Timeout(_))), "{:?}", stalled.err());
    assert!(begun.elapsed() < timeout * 3, "the timeout took {:?}", begun.elapsed());
    drop(silent); // cut at once: its handler never returns
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_what_its_reader_takes_is_refused_and_its_connection_closed() {
    let (server, address) = start(Echo, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    let response = client.request(&address, Bytes::new(), Body::from_bytes(pattern(5 << 20, 7)), Compression::None);
    let over = response.await.unwrap().body.collect(1 << 20).await;
    assert!(matches!(over, Err(DataError::TooLarge { what: "body", bytes_max: 1_048_576, .. })), "{:?}", over.err());
    // Refused once past the limit: by then at most a window of chunks had come.
    assert!(client.stats().raw_bytes_received <= 2 << 20, "{:?}", client.stats());
    // The abandoned connection is not reused: the next request is whole, on a new one.
    assert_eq!(echo(&client, &address, pattern(10, 1), Compression::None).await.unwrap(), pattern(10, 1));
    assert_eq!(client.stats().conns_opened, 2);
    server.shutdown().await;
}

/// Waits (briefly polling) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let begun = Instant::now();
    while !done() {
        assert!(begun.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_not_used_broken() {
    let (server, address) = start(Echo, DataConfig { idle_timeout_ms: 100, ..DataConfig::default() }).await;
    // The client would keep connections far longer than the server does.
    let client = DataClient::new(DataConfig::default());
    for round in 0..3u8 {
        let back = echo(&client, &address, pattern(1_000, round), Compression::None).await;
        assert_eq!(back.unwrap_or_else(|e| panic!("round {round}: {e}")), pattern(1_000, round));
        until("the server closes the idle connection", || server.stats().conns_open == 0).await;
    }
    assert_eq!(client.stats().conns_opened, 3);
    server.shutdown().await;
}

/// Plays a server on an accepted connection: greets, then answers `answered` requests of
/// an empty body by their header, then says goodbye once the next request begins, unread.
async fn answer_then_say_goodbye(listener: &tokio::net::TcpListener, answered: &[&[u8]]) -> std::io::Result<()> {
    let (mut socket, _) = listener.accept().await?;
    socket.write_all(HELLO).await?;
    socket.read_exact(&mut [0u8; 14]).await?;
    for header in answered {
        let mut request = vec![0u8; 14 + header.len() + 14]; // header frame, end frame
        socket.read_exact(&mut request).await?;
        assert_eq!(&request[14..14 + header.len()], *header);
        socket.write_all(&[raw_frame(1, 0, header), raw_frame(3, 0, b"")].concat()).await?;
    }
    socket.read_exact(&mut [0u8; 1]).await?;
    socket.write_all(&raw_frame(6, 0, b"")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_meets_a_goodbye_goes_again_only_if_it_can() {
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = fake.local_addr().unwrap().to_string();
    let serving = tokio::spawn(async move {
        answer_then_say_goodbye(&fake, &[b"one"]).await?;
        answer_then_say_goodbye(&fake, &[b"two"]).await
    });
    let client = DataClient::new(DataConfig::default());
    let request = |header: &'static [u8], body: Body| {
        client.request(&address, Bytes::from_static(header), body, Compression::None)
    };
    let one = request(b"one", Body::empty()).await.unwrap();
    assert_eq!((&one.header[..], one.body.collect(10).await.unwrap().len()), (&b"one"[..], 0));
    // The pooled connection looks fine, but the server says goodbye to the request: it
    // goes again, on a new connection, where it is answered.
    let two = request(b"two", Body::empty()).await.unwrap();
    assert_eq!((&two.header[..], two.body.collect(10).await.unwrap().len()), (&b"two"[..], 0));
    assert_eq!(client.stats().conns_opened, 2);
    // A streamed body cannot go again: the request fails, and is not sent twice. (The
    // server closes right after its goodbye, so the client may meet the reset first.)
    let stream = futures::stream::iter([Ok(Bytes::from_static(b"three"))]);
    let three = request(b"three", Body::from_stream(stream)).await;
    assert!(matches!(three, Err(DataError::Closed | DataError::Io(_))), "{:?}", three.err());
    assert_eq!(client.stats().conns_opened, 2);
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once_and_stops_accepting() {
    let (server, address) = start(Echo, DataConfig::default()).await;
    let client = DataClient::new(DataConfig::default());
    assert_eq!(echo(&client, &address, pattern(10, 1), Compression::None).await.unwrap(), pattern(10, 1));
    assert_eq!(server.stats().conns_open, 1, "the pooled connection is open");
    let begun = Instant::now();
    server.shutdown().await;
    assert!(begun.elapsed() < Duration::from_secs(1), "an idle connection held shutdown for {:?}", begun.elapsed());
    assert_eq!(server.stats().conns_open, 0);
    let refused = client.request(&address, Bytes::new(), Body::empty(), Compression::None).await;
    assert!(matches!(refused, Err(DataError::Connect(_))), "{:?}", refused.err());
}
