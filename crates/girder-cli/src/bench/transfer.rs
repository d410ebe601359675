//! `girder bench --transfer`: bytes node to node over loopback, beside a bare TCP copy of
//! the same bytes in the same run: the data plane uncompressed (a request body, and a
//! response body), then lz4 and zstd on compressible (JSON-like records) and on random
//! data. Each figure is the median of a few rounds.
//!
//! The two ends run as two nodes would: each on a thread of its own (a single-threaded
//! runtime), the same two threads for the bare copy and for the data plane, so that both
//! are measured with the same placement (on one shared thread, a copy between tasks stays
//! in one core's cache and measures something else).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use girder::dataplane::{Body, Compression, DataClient, DataConfig, DataServer, Handler, Request, Response};

use super::measure::median;

/// Bytes per write (bare copy) and per chunk (data plane).
const CHUNK_BYTES: usize = 1 << 20;
/// Distinct chunks the payloads cycle through.
const DISTINCT_CHUNKS: usize = 4;
/// Rounds per figure.
const ROUNDS: usize = 3;

/// Reads request bodies to their end and answers with the byte count; a request whose
/// header is a byte count is answered with that many bytes of the sample it names.
struct Drain {
    samples: Vec<Vec<Bytes>>,
}

#[async_trait::async_trait]
impl Handler for Drain {
    async fn handle(&self, mut request: Request) -> Response {
        if let Ok(ask) = <[u8; 9]>::try_from(&request.header[..]) {
            let bytes = u64::from_le_bytes(ask[1..].try_into().unwrap_or_default()) as usize;
            let sample = self.samples.get(usize::from(ask[0])).cloned().unwrap_or_default();
            return Response { header: Bytes::new(), body: cycled(sample, bytes) };
        }
        let mut total = 0u64;
        while let Some(Ok(chunk)) = request.body.next().await {
            total += chunk.len() as u64;
        }
        Response { header: Bytes::from(total.to_le_bytes().to_vec()), body: Body::empty() }
    }
}

/// `bytes` (whole chunks) from `chunks` over and over, produced as they are sent.
fn cycled(chunks: Vec<Bytes>, bytes: usize) -> Body {
    let count = if chunks.is_empty() { 0 } else { bytes / CHUNK_BYTES };
    Body::from_stream(futures::stream::iter((0..count).map(move |i| Ok(chunks[i % chunks.len()].clone()))))
}

/// Chunks of JSON-like records, as a store would hold: field names repeat, values vary.
fn records() -> Vec<Bytes> {
    let mut rng = fastrand::Rng::with_seed(11);
    let cities = ["Lisbon", "Osaka", "Quito", "Tromsø", "Accra", "Perth", "Lyon", "Tucson"];
    let words = ["red", "green", "blue", "batch", "urgent", "archived", "beta", "eu", "us", "apac"];
    (0..DISTINCT_CHUNKS)
        .map(|_| {
            let mut text = String::with_capacity(CHUNK_BYTES + 256);
            while text.len() < CHUNK_BYTES {
                text.push_str(&format!(
                    "{{\"id\":{},\"user\":\"user{:06}\",\"city\":\"{}\",\"score\":{}.{:02},\"active\":{},\
                     \"tags\":[\"{}\",\"{}\"],\"ts\":{}}}\n",
                    rng.u64(..1 << 40),
                    rng.u32(..1_000_000),
                    cities[rng.usize(..cities.len())],
                    rng.u32(..1_000),
                    rng.u8(..100),
                    rng.bool(),
                    words[rng.usize(..words.len())],
                    words[rng.usize(..words.len())],
                    1_732_000_000_000u64 + rng.u64(..100_000_000),
                ));
            }
            Bytes::from(text).slice(..CHUNK_BYTES)
        })
        .collect()
}

fn random() -> Vec<Bytes> {
    let mut rng = fastrand::Rng::with_seed(12);
    (0..DISTINCT_CHUNKS).map(|_| Bytes::from((0..CHUNK_BYTES).map(|_| rng.u8(..)).collect::<Vec<u8>>())).collect()
}

/// A node's thread: a single-threaded runtime that runs what is spawned on it.
struct Side {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Side {
    fn new(name: &str) -> anyhow::Result<Side> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        })?;
        Ok(Side { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// Runs `work` on this side's thread and waits for it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.handle.spawn(work).await?
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// GB/s of a plain copy of `bytes` over a loopback TCP connection from `sender` to
/// `receiver`, a chunk a write, the reader discarding what it reads into one reused buffer.
async fn bare_copy(sender: &Side, receiver: &Side, bytes: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = receiver.run(async { Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?) }).await?;
    let address = listener.local_addr()?;
    let reader = receiver.handle.spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut total = 0usize;
        loop {
            match socket.read(&mut buf).await? {
                0 => return Ok::<usize, std::io::Error>(total),
                n => total += n,
            }
        }
    });
    let data = random().swap_remove(0);
    let begun = sender
        .run(async move {
            let mut socket = tokio::net::TcpStream::connect(address).await?;
            socket.set_nodelay(true)?;
            let begun = Instant::now();
            for _ in 0..bytes / CHUNK_BYTES {
                socket.write_all(&data).await?;
            }
            socket.shutdown().await?;
            Ok(begun)
        })
        .await?;
    let total = reader.await??;
    let took = begun.elapsed();
    anyhow::ensure!(total == bytes / CHUNK_BYTES * CHUNK_BYTES, "the bare copy lost bytes");
    Ok(total as f64 / took.as_secs_f64() / 1e9)
}

/// One transfer of `bytes` of `sample` (index into the server's samples): GB/s and the
/// ratio of wire bytes to raw bytes.
async fn once(
    client: DataClient,
    address: String,
    samples: Vec<Vec<Bytes>>,
    sample: u8,
    compression: Compression,
    download: bool,
    bytes: usize,
) -> anyhow::Result<(f64, f64)> {
    let before = client.stats();
    let begun = Instant::now();
    let raw = if download {
        let mut ask = vec![sample];
        ask.extend_from_slice(&(bytes as u64).to_le_bytes());
        let mut response = client.request(&address, Bytes::from(ask), Body::empty(), compression).await?;
        let mut total = 0usize;
        while let Some(chunk) = response.body.next().await {
            total += chunk?.len();
        }
        total
    } else {
        let body = cycled(samples[usize::from(sample)].clone(), bytes);
        let response = client.request(&address, Bytes::new(), body, compression).await?;
        let answer: [u8; 8] = response.header[..].try_into().context("a malformed answer")?;
        u64::from_le_bytes(answer) as usize
    };
    let took = begun.elapsed();
    anyhow::ensure!(raw == bytes / CHUNK_BYTES * CHUNK_BYTES, "{raw} bytes arrived of {bytes}");
    let after = client.stats();
    let wire = if download {
        after.wire_bytes_received - before.wire_bytes_received
    } else {
        after.wire_bytes_sent - before.wire_bytes_sent
    };
    Ok((raw as f64 / took.as_secs_f64() / 1e9, wire as f64 / raw as f64))
}

/// Runs the transfer benchmarks, `bytes` per transfer. Rounds interleave the bare copy and
/// every data-plane run, so that a busy moment of the machine weighs on all alike; a run's
/// share of the bare copy is the median of its rounds' shares.
pub(crate) async fn run(bytes: usize) -> anyhow::Result<()> {
    println!(
        "data plane transfer of {} MiB over loopback, {} KiB chunks, median of {ROUNDS} rounds",
        bytes >> 20,
        CHUNK_BYTES >> 10
    );
    let (client_side, server_side) = (Side::new("bench-client")?, Side::new("bench-server")?);
    let samples = vec![random(), records()];
    let handler = Arc::new(Drain { samples: samples.clone() });
    let bind = DataServer::bind("127.0.0.1:0", DataConfig::default(), handler);
    let server = Arc::new(server_side.run(async { Ok(bind.await?) }).await?);
    let address = server.local_addr().to_string();
    let client = DataClient::new(DataConfig::default());
    let (random, json) = (0, 1);
    let runs = [
        ("uncompressed, request body", random, Compression::None, false),
        ("uncompressed, response body", random, Compression::None, true),
        ("lz4, JSON-like records", json, Compression::Lz4, false),
        ("zstd, JSON-like records", json, Compression::Zstd, false),
        ("lz4, random bytes", random, Compression::Lz4, false),
        ("zstd, random bytes", random, Compression::Zstd, false),
    ];
    let mut bare = Vec::new();
    let mut figures = vec![(Vec::new(), Vec::new(), 1.0); runs.len()];
    for _ in 0..ROUNDS {
        let baseline = bare_copy(&client_side, &server_side, bytes).await?;
        bare.push(baseline);
        for ((_, sample, compression, download), (rates, shares, ratio)) in runs.iter().zip(&mut figures) {
            let transfer =
                once(client.clone(), address.clone(), samples.clone(), *sample, *compression, *download, bytes);
            let (rate, wire) = client_side.run(transfer).await?;
            rates.push(rate);
            shares.push(rate / baseline);
            *ratio = wire;
        }
    }
    println!("  {:<46} {:>6.2} GB/s (baseline)", "bare TCP copy, 1 MiB writes", median(bare));
    for ((what, ..), (rates, shares, ratio)) in runs.iter().zip(figures) {
        let (rate, share) = (median(rates), median(shares) * 100.0);
        println!("  data plane, {what:<34} {rate:>6.2} GB/s  {share:>4.0}% of bare  wire/raw {ratio:.3}");
    }
    server_side
        .run(async move {
            server.shutdown().await;
            Ok(())
        })
        .await
}
